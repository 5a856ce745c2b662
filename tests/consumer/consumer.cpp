// consumer.cpp - a C++ program built against the installed dmattn exactly as a user builds it
// (pkg-config): a causal dense forward on small random inputs, checked against the naive
// softmax(q k^T / sqrt(D)) v computed here in double precision. Exit 0 when every output is
// within 1e-5 of it (plus 1e-5 relative), 1 otherwise.
#include <dmattn.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main()
{
    const int B = 1, L = 37, H = 2, D = 20;
    std::mt19937 gen(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> q(B * L * H * D), k(q.size()), v(q.size()), out(q.size());
    for (size_t i = 0; i < q.size(); i++) {
        q[i] = u(gen);
        k[i] = u(gen);
        v[i] = u(gen);
    }
    dma_context *ctx = nullptr;
    if (dma_context_create(nullptr, &ctx) != DMA_OK) {
        std::fprintf(stderr, "consumer: dma_context_create failed\n");
        return 1;
    }
    dma_tensor tq = dma_tensor_4d(q.data(), DMA_F32, B, L, H, D);
    dma_tensor tk = dma_tensor_4d(k.data(), DMA_F32, B, L, H, D);
    dma_tensor tv = dma_tensor_4d(v.data(), DMA_F32, B, L, H, D);
    dma_tensor to = dma_tensor_4d(out.data(), DMA_F32, B, L, H, D);
    dma_attn_params params = {};
    params.causal = 1;
    dma_status st = dma_forward(ctx, &tq, &tk, &tv, nullptr, nullptr, &params, &to, nullptr);
    if (st != DMA_OK) {
        std::fprintf(stderr, "consumer: dma_forward: %s (%s)\n", dma_status_string(st),
                     dma_context_last_error(ctx));
        return 1;
    }
    double worst = 0.0;
    for (int h = 0; h < H; h++)
        for (int i = 0; i < L; i++) {
            std::vector<double> p(i + 1);
            double mx = -INFINITY, sum = 0.0;
            for (int j = 0; j <= i; j++) {
                double s = 0.0;
                for (int d = 0; d < D; d++)
                    s += (double)q[(i * H + h) * D + d] * k[(j * H + h) * D + d];
                p[j] = s / std::sqrt((double)D);
                mx = std::fmax(mx, p[j]);
            }
            for (int j = 0; j <= i; j++)
                sum += p[j] = std::exp(p[j] - mx);
            for (int d = 0; d < D; d++) {
                double want = 0.0;
                for (int j = 0; j <= i; j++)
                    want += p[j] / sum * v[(j * H + h) * D + d];
                double err = std::fabs(out[(i * H + h) * D + d] - want) / (1e-5 + 1e-5 * std::fabs(want));
                worst = std::fmax(worst, err);
            }
        }
    std::printf("consumer (C++, %s): causal forward L %d, H %d, D %d; worst error %.3f of the "
                "tolerance\n", dma_isa_name(dma_context_isa(ctx)), L, H, D, worst);
    dma_context_destroy(ctx);
    return worst <= 1.0 ? 0 : 1;
}

/*
 * mlp.c - the SwiGLU MLP: gu = x [Wg | Wu], h = silu(g) * u, y = h Wd, with
 * silu(g) = g * sigmoid(g) and silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
 */
#include <math.h>

#include "layers.h"
#include "vmath.h"

static inline float sigmoidf(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

void mlp_forward(float *out, float *gu, float *h, const float *x, const float *w_gu,
                 const float *w_down, int N, int C, int F, int threads)
{
    linear_forward(gu, x, w_gu, N, C, 2 * F, 0, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < N; t++) {
        const float *g = gu + (size_t)t * 2 * F, *u = g + F;
        float *hr = h + (size_t)t * F;
#pragma omp simd
        for (int f = 0; f < F; f++)
            hr[f] = g[f] * sigmoidf(g[f]) * u[f];
    }
    linear_forward(out, h, w_down, N, F, C, 1, threads);
}

void mlp_backward(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                  const float *gu, const float *h, const float *w_gu, const float *w_down,
                  float *dgu, float *dh, int N, int C, int F, int threads)
{
    linear_backward(dh, dw_down, dout, h, w_down, N, F, C, 0, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < N; t++) {
        const float *g = gu + (size_t)t * 2 * F, *u = g + F, *dhr = dh + (size_t)t * F;
        float *dg = dgu + (size_t)t * 2 * F, *du = dg + F;
#pragma omp simd
        for (int f = 0; f < F; f++) {
            float s = sigmoidf(g[f]);
            du[f] = dhr[f] * g[f] * s;
            dg[f] = dhr[f] * u[f] * s * (1.0f + g[f] * (1.0f - s));
        }
    }
    linear_backward(dx, dw_gu, dgu, x, w_gu, N, C, 2 * F, 0, threads);
}

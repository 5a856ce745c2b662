/*
 * backward.cu - the attention backward over the tile unions on the GPU (DESIGN §3): one block
 * per (batch, query head, tile), as the forward. P is recomputed from the saved lse, chunk by
 * chunk of 32 union keys: dP = dO V^T, dS = P (dP - rowsum(dO * O)); dq accumulates in
 * registers (thread (r, sub) keeps dimensions sub, sub + 4, ... of row r) and is written once;
 * the chunk's dk = scale dS^T Q and dv = P^T dO are summed over the tile's 64 rows in the block
 * and added to the gradients with atomic adds (so their last bits may change from run to run;
 * see dmattn.h), as is dbias.
 */
#include <algorithm>

#include "attn_common.cuh"

namespace {

constexpr int NC = 32; /* keys per chunk */

struct grads {
    dcu_tensor dout, dq, dk, dv, dbias;
};

template <int DV>
__global__ void __launch_bounds__(DCU_ITEM_THREADS)
backward_simt(dcu_attn a, grads g)
{
    extern __shared__ float sm[];
    const int D = (int)a.D, ld = D + 1, lp = NC + 1;
    float *Qs = sm;                   /* [64][ld] */
    float *dOs = Qs + DCU_TILE * ld;  /* [64][ld] */
    float *Ks = dOs + DCU_TILE * ld;  /* [NC][ld] */
    float *Vs = Ks + NC * ld;         /* [NC][ld] */
    float *Ps = Vs + NC * ld;         /* [64][lp] */
    float *dSb = Ps + DCU_TILE * lp;  /* [64][lp]: dS, the bias's gradient */
    float *dSq = dSb + DCU_TILE * lp; /* [64][lp]: dS times softcap's derivative */
    __shared__ int32_t keys[NC];
    __shared__ float kbias[NC];

    const dcu_item it = dcu_item_of(a, blockIdx.x);
    const int r = threadIdx.x >> 2, sub = threadIdx.x & 3;
    const int64_t i = it.r0 + r;
    dcu_load_rows(a.q, it.b, it.r0, it.nrows, it.h, D, Qs, ld, a.Lq);
    dcu_load_rows(g.dout, it.b, it.r0, it.nrows, it.h, D, dOs, ld, a.Lq);
    __syncthreads();

    /* Row constants: lse and delta = sum_d dO * O. */
    float lse = -INFINITY, delta = 0.0f;
    if (r < it.nrows) {
        lse = ((const float *)a.lse.data)[it.b * a.lse.stride[0] + it.h * a.lse.stride[1] +
                                          i * a.lse.stride[2]];
        const int64_t ob = it.b * a.out.stride[0] + i * a.out.stride[1] + it.h * a.out.stride[2];
        for (int d = sub; d < D; d += 4)
            delta += dcu_load(a.out.data, a.out.dtype, ob + d) * dOs[r * ld + d];
    }
    delta += __shfl_xor_sync(0xffffffffu, delta, 1);
    delta += __shfl_xor_sync(0xffffffffu, delta, 2);
    const bool live = lse != -INFINITY; /* rows that selected nothing add nothing */

    float dq[DV];
#pragma unroll
    for (int k = 0; k < DV; k++)
        dq[k] = 0.0f;
    float *dk = (float *)g.dk.data, *dv = (float *)g.dv.data;
    const int64_t dkbase = it.b * g.dk.stride[0] + it.hkv * g.dk.stride[2];
    const int64_t dvbase = it.b * g.dv.stride[0] + it.hkv * g.dv.stride[2];
    for (int c0 = 0; c0 < it.t.count; c0 += NC) {
        dcu_load_chunk<NC>(a, it, c0, keys, kbias, Ks, Vs, ld);
        const int n = min(NC, it.t.count - c0);
#pragma unroll
        for (int q = 0; q < NC / 4; q++) {
            const int j = sub + 4 * q;
            float p = 0.0f, ds = 0.0f, dcap = 1.0f;
            if (live && j < n && dcu_item_selects(a, it, r, c0 + j, keys[j])) {
                float dot = 0.0f, dp = 0.0f;
                for (int d = 0; d < D; d++) {
                    dot += Qs[r * ld + d] * Ks[j * ld + d];
                    dp += dOs[r * ld + d] * Vs[j * ld + d];
                }
                const float s = dcu_capped(a, dot, &dcap) +
                                dcu_score_bias(a, it, i, keys[j], kbias[j]);
                p = __expf(s - lse);
                ds = p * (dp - delta);
            }
            Ps[r * lp + j] = p;
            dSb[r * lp + j] = ds;
            dSq[r * lp + j] = ds * dcap;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < DV; k++) {
            const int d = sub + 4 * k;
            if (d < D) {
                float acc = dq[k];
                for (int j = 0; j < n; j++)
                    acc += dSq[r * lp + j] * Ks[j * ld + d];
                dq[k] = acc;
            }
        }
        /* The chunk's dk and dv, summed over the tile's rows, then added. */
        for (int x = threadIdx.x; x < n * D; x += blockDim.x) {
            const int j = x / D, d = x % D;
            float sk = 0.0f, sv = 0.0f;
            for (int rr = 0; rr < it.nrows; rr++) {
                sk += dSq[rr * lp + j] * Qs[rr * ld + d];
                sv += Ps[rr * lp + j] * dOs[rr * ld + d];
            }
            if (sk != 0.0f || sv != 0.0f) { /* NaN too */
                atomicAdd(dk + dkbase + keys[j] * g.dk.stride[1] + d, a.scale * sk);
                atomicAdd(dv + dvbase + keys[j] * g.dv.stride[1] + d, sv);
            }
        }
        if (g.dbias.data) {
            float *db = (float *)g.dbias.data;
            if (it.per_key_bias) {
                if (threadIdx.x < n) {
                    const int j = threadIdx.x;
                    float sum = 0.0f;
                    for (int rr = 0; rr < it.nrows; rr++)
                        sum += dSb[rr * lp + j];
                    if (sum != 0.0f) /* NaN too */
                        atomicAdd(db + dcu_off(g.dbias, it.b, it.hb, 0, keys[j]), sum);
                }
            } else if (r < it.nrows) {
                for (int j = sub; j < n; j += 4) {
                    const float ds = dSb[r * lp + j];
                    if (ds != 0.0f) /* NaN too */
                        atomicAdd(db + dcu_off(g.dbias, it.b, it.hb, i, keys[j]), ds);
                }
            }
        }
    }
    if (r >= it.nrows)
        return;
    float *out = (float *)g.dq.data;
    const int64_t qb = it.b * g.dq.stride[0] + i * g.dq.stride[1] + it.h * g.dq.stride[2];
#pragma unroll
    for (int k = 0; k < DV; k++) {
        const int d = sub + 4 * k;
        if (d < D)
            out[qb + d] = a.scale * dq[k];
    }
}

/* Zero a float32 tensor of up to 4 dimensions (any strides). */
__global__ void zero4(dcu_tensor t, int64_t n)
{
    for (int64_t x = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; x < n;
         x += (int64_t)gridDim.x * blockDim.x) {
        int64_t rest = x, off = 0;
        for (int d = 3; d >= 0; d--) {
            off += (rest % t.shape[d]) * t.stride[d];
            rest /= t.shape[d];
        }
        ((float *)t.data)[off] = 0.0f;
    }
}

int zero(const dcu_tensor &t, cudaStream_t stream)
{
    if (!t.data)
        return 0;
    const int64_t n = t.shape[0] * t.shape[1] * t.shape[2] * t.shape[3];
    if (n == 0)
        return 0;
    const int blocks = (int)std::min<int64_t>((n + 255) / 256, 4096);
    zero4<<<blocks, 256, 0, stream>>>(t, n);
    DCU_LAUNCHED("backward: zeroing the gradients");
    return 0;
}

template <int DV>
int launch(const dcu_attn *a, const grads &g, int64_t items, cudaStream_t stream)
{
    const int ld = (int)a->D + 1;
    const size_t smem = sizeof(float) * ((size_t)(2 * DCU_TILE + 2 * NC) * ld +
                                         (size_t)3 * DCU_TILE * (NC + 1));
    DCU_TRY(cudaFuncSetAttribute(backward_simt<DV>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)smem));
    backward_simt<DV><<<(unsigned)items, DCU_ITEM_THREADS, smem, stream>>>(*a, g);
    DCU_LAUNCHED("backward");
    return 0;
}

} // namespace

extern "C" int dcu_backward(const dcu_attn *a, const dcu_tensor *dout, const dcu_tensor *dq,
                            const dcu_tensor *dk, const dcu_tensor *dv, const dcu_tensor *dbias,
                            void *stream_)
{
    cudaStream_t stream = (cudaStream_t)stream_;
    const grads g = {*dout, *dq, *dk, *dv, *dbias};
    if (zero(g.dk, stream) || zero(g.dv, stream) || zero(g.dbias, stream))
        return -1;
    const int64_t items = a->B * a->Hq * a->sp.ntiles;
    if (items == 0)
        return 0;
    if (dcu_backward_mma_fits(a, dout))
        return dcu_backward_mma(a, dout, dq, dk, dv, dbias, items, stream);
    if (a->D <= 32)
        return launch<8>(a, g, items, stream);
    if (a->D <= 64)
        return launch<16>(a, g, items, stream);
    if (a->D <= 128)
        return launch<32>(a, g, items, stream);
    return launch<64>(a, g, items, stream);
}

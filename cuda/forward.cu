/*
 * forward.cu - the attention forward over the tile unions on the GPU (DESIGN §3), for every
 * storage type: one block per (batch, query head, tile of 64 rows), 4 threads a row. The
 * union is read in chunks of 32 keys: K and V of the chunk go to shared memory once for the
 * tile's 64 rows; scores, an online softmax in float32 and P V follow (flash attention's
 * recurrence). Thread (r, sub) keeps dimensions sub, sub + 4, ... of row r's output.
 */
#include "attn_common.cuh"

namespace {

constexpr int NC = 32; /* keys per chunk */

template <int DV> /* DV = output dimensions a thread keeps: ceil(D / 4) rounded up */
__global__ void __launch_bounds__(DCU_ITEM_THREADS)
forward_simt(dcu_attn a)
{
    extern __shared__ float sm[];
    const int D = (int)a.D, ld = D + 1;
    float *Qs = sm;                  /* [64][ld] */
    float *Ks = Qs + DCU_TILE * ld;  /* [NC][ld] */
    float *Vs = Ks + NC * ld;        /* [NC][ld] */
    float *Ps = Vs + NC * ld;        /* [64][NC + 1] */
    __shared__ int32_t keys[NC];
    __shared__ float kbias[NC];

    const dcu_item it = dcu_item_of(a, blockIdx.x);
    const int r = threadIdx.x >> 2, sub = threadIdx.x & 3;
    const int64_t i = it.r0 + r;
    dcu_load_rows(a.q, it.b, it.r0, it.nrows, it.h, D, Qs, ld, a.Lq);

    float o[DV];
#pragma unroll
    for (int k = 0; k < DV; k++)
        o[k] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int c0 = 0; c0 < it.t.count; c0 += NC) {
        dcu_load_chunk<NC>(a, it, c0, keys, kbias, Ks, Vs, ld);
        const int n = min(NC, it.t.count - c0);
        /* Scores of this thread's keys j = sub, sub + 4, ... */
        float s[NC / 4];
        float cmax = -INFINITY;
#pragma unroll
        for (int q = 0; q < NC / 4; q++) {
            const int j = sub + 4 * q;
            s[q] = -INFINITY;
            if (j < n && dcu_item_selects(a, it, r, c0 + j, keys[j])) {
                float dot = 0.0f;
                for (int d = 0; d < D; d++)
                    dot += Qs[r * ld + d] * Ks[j * ld + d];
                float dcap;
                s[q] = dcu_capped(a, dot, &dcap) +
                       dcu_score_bias(a, it, i, keys[j], kbias[j]);
            }
            cmax = fmaxf(cmax, s[q]);
        }
        cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, 1));
        cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, 2));
        const float m_new = fmaxf(m, cmax);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = __expf(m - m_use);
        float psum = 0.0f;
#pragma unroll
        for (int q = 0; q < NC / 4; q++) {
            const float p = s[q] == -INFINITY ? 0.0f : __expf(s[q] - m_use);
            Ps[r * (NC + 1) + sub + 4 * q] = p;
            psum += p;
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        psum += __shfl_xor_sync(0xffffffffu, psum, 2);
        l = l * alpha + psum;
        m = m_new;
        __syncwarp();
#pragma unroll
        for (int k = 0; k < DV; k++) {
            const int d = sub + 4 * k;
            if (d < D) {
                float acc = o[k] * alpha;
                for (int j = 0; j < n; j++)
                    acc += Ps[r * (NC + 1) + j] * Vs[j * ld + d];
                o[k] = acc;
            }
        }
    }
    if (r >= it.nrows)
        return;
    const bool empty = l == 0.0f;
    const float inv = empty ? 0.0f : 1.0f / l;
    const int64_t obase = it.b * a.out.stride[0] + i * a.out.stride[1] + it.h * a.out.stride[2];
#pragma unroll
    for (int k = 0; k < DV; k++) {
        const int d = sub + 4 * k;
        if (d < D)
            dcu_store((void *)a.out.data, a.out.dtype, obase + d, empty ? 0.0f : o[k] * inv);
    }
    if (a.lse.data && sub == 0)
        ((float *)a.lse.data)[it.b * a.lse.stride[0] + it.h * a.lse.stride[1] + i * a.lse.stride[2]] =
            empty ? -INFINITY : m + logf(l);
}

template <int DV>
int launch(const dcu_attn *a, int64_t items, cudaStream_t stream)
{
    const int ld = (int)a->D + 1;
    const size_t smem = sizeof(float) * ((size_t)(DCU_TILE + 2 * NC) * ld + DCU_TILE * (NC + 1));
    DCU_TRY(cudaFuncSetAttribute(forward_simt<DV>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)smem));
    forward_simt<DV><<<(unsigned)items, DCU_ITEM_THREADS, smem, stream>>>(*a);
    DCU_LAUNCHED("forward");
    return 0;
}

} // namespace

extern "C" int dcu_forward(const dcu_attn *a, void *stream)
{
    const int64_t items = a->B * a->Hq * a->sp.ntiles;
    if (items == 0)
        return 0;
    if (dcu_forward_mma_fits(a))
        return dcu_forward_mma(a, items, stream);
    cudaStream_t s = (cudaStream_t)stream;
    if (a->D <= 32)
        return launch<8>(a, items, s);
    if (a->D <= 64)
        return launch<16>(a, items, s);
    if (a->D <= 128)
        return launch<32>(a, items, s);
    return launch<64>(a, items, s);
}

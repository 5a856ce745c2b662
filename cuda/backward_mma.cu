/*
 * backward_mma.cu - the bf16 / f16 backward on tensor cores (mma.sync m16n8k16, float32
 * accumulation), for D a multiple of 16 up to 128 and 16-byte aligned rows. One block per
 * (batch, query head, tile of 64 rows), 4 warps; the union is read in chunks of 64 positions as
 * in the forward. Per chunk:
 *   1. each warp, for its 16 rows: S = Q K^T and dP = dO V^T; P = exp(S - lse) where selected,
 *      dS = P (dP - delta); dq += dS K stays in registers (written once, so dq is reproducible);
 *   2. P and dS go to shared memory rounded to the storage type (flash attention's choice; the
 *      documented exception of dmattn.h) and the chunk's K and V are no longer needed, so the
 *      next chunk's copies start here and overlap step 3;
 *   3. each warp, for 16 keys of the chunk: dk = scale dS^T Q and dv = P^T dO over the tile's
 *      64 rows, added to the gradients with atomic adds (four floats at once on sm_90).
 * dbias is summed from the float32 dS: per key over the tile's rows in shared memory, or per
 * element for a per-row bias, then added atomically.
 */
#include <type_traits>

#include "mma.cuh"

namespace {

using namespace dcu_mma;

struct grads {
    dcu_tensor dout, dq, dk, dv, dbias;
    int vec; /* floats a dk / dv atomic add: 4 (16-byte aligned rows, sm_90), 2 (8-byte), 1 */
};

/* dst[off], dst[off + 1] += x, y; skipped when both are 0 (NaN is not). */
static __device__ __forceinline__ void add_pair(float *dst, int64_t off, float x, float y,
                                                int vec)
{
    if (x == 0.0f && y == 0.0f)
        return;
#if __CUDA_ARCH__ >= 900
    if (vec >= 2) {
        atomicAdd((float2 *)(dst + off), make_float2(x, y));
        return;
    }
#endif
    (void)vec;
    atomicAdd(dst + off, x);
    atomicAdd(dst + off + 1, y);
}

/* acc[16 keys][D] += A^T B over the tile's 64 rows, for this warp's 16 keys (k0): A is a
 * [64 rows][CH + 8] panel of P or dS, B the [64 rows][LDS] panel of dO or Q. */
template <bool BF16, int D>
static __device__ __forceinline__ void keys_by_rows(float (*acc)[4], const uint16_t *A,
                                                    const uint16_t *B, int k0, int lane)
{
    constexpr int LDS = D + 8, LDP = CH + 8;
    const int mi = lane >> 3;
#pragma unroll
    for (int n = 0; n < D / 8; n++)
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
    for (int rs = 0; rs < DCU_TILE / 16; rs++) {
        uint32_t af[4]; /* A^T's fragment: stored [row][key], read transposed */
        ldmatrix_x4(af, A + (rs * 16 + (lane & 7) + ((mi >> 1) ? 8 : 0)) * LDP + k0 +
                            ((mi & 1) ? 8 : 0),
                    true);
#pragma unroll
        for (int np = 0; np < D / 16; np++) {
            uint32_t bf[4];
            ldmatrix_x4(bf, B + (rs * 16 + (lane & 7) + ((mi & 1) ? 8 : 0)) * LDS + np * 16 +
                                ((mi >> 1) ? 8 : 0),
                        true);
            mma16816<BF16>(acc[2 * np], af, bf[0], bf[1]);
            mma16816<BF16>(acc[2 * np + 1], af, bf[2], bf[3]);
        }
    }
}

/* Add a warp's acc[16 keys][D] (times s) to grad rows keys[k0 + ...] of (b, hkv). */
template <int D>
static __device__ __forceinline__ void add_key_rows(const dcu_tensor &t, int64_t b, int64_t hkv,
                                                    const int32_t *keys, int k0,
                                                    const float (*acc)[4], float s, int lane,
                                                    int vec)
{
    float *dst = (float *)t.data;
    const int g = lane >> 2, q = lane & 3;
    const int32_t ka = keys[k0 + g], kb = keys[k0 + g + 8];
    const int64_t base = b * t.stride[0] + hkv * t.stride[2];
#if __CUDA_ARCH__ >= 900
    if (vec == 4) {
        /* Lanes q and q ^ 1 hold two dims each of keys a and b; they trade halves, and the even
         * one adds four dims of key a, the odd one four of key b: one 16-byte atomic add
         * where there were two of 8 bytes (the atomics are a large part of this kernel). */
        const bool odd = q & 1;
        const int32_t key = odd ? kb : ka;
        const int64_t row = base + key * t.stride[1];
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            const float got0 = __shfl_xor_sync(0xffffffffu, odd ? acc[n][0] : acc[n][2], 1);
            const float got1 = __shfl_xor_sync(0xffffffffu, odd ? acc[n][1] : acc[n][3], 1);
            const float4 v = odd ? make_float4(s * got0, s * got1, s * acc[n][2], s * acc[n][3])
                                 : make_float4(s * acc[n][0], s * acc[n][1], s * got0, s * got1);
            if (key >= 0 && (v.x != 0.0f || v.y != 0.0f || v.z != 0.0f || v.w != 0.0f))
                atomicAdd((float4 *)(dst + row + n * 8 + 2 * (q & ~1)), v);
        }
        return;
    }
#endif
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        const int d = n * 8 + 2 * q;
        if (ka >= 0)
            add_pair(dst, base + ka * t.stride[1] + d, s * acc[n][0], s * acc[n][1], vec);
        if (kb >= 0)
            add_pair(dst, base + kb * t.stride[1] + d, s * acc[n][2], s * acc[n][3], vec);
    }
}

template <bool BF16, int D, bool PLAIN>
__global__ void __launch_bounds__(128, 2) backward_mma(dcu_attn a, grads gr)
{
    constexpr int LDS = D + 8, LDP = CH + 8;
    constexpr int KS = D / 16, NT = D / 8;
    extern __shared__ __align__(16) uint16_t smh[];
    uint16_t *Qs = smh, *dOs = Qs + DCU_TILE * LDS, *Ks = dOs + DCU_TILE * LDS;
    uint16_t *Vs = Ks + CH * LDS, *Ps = Vs + CH * LDS, *dSs = Ps + DCU_TILE * LDP;
    __shared__ int32_t keys_buf[2][CH];
    __shared__ float kbias_buf[2][CH];
    __shared__ float colsum[CH];
    __shared__ float lse_s[DCU_TILE], delta_s[DCU_TILE];

    const dcu_item it = dcu_item_of(a, blockIdx.x);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int ra = warp * 16 + g, rb = ra + 8; /* this thread's two rows of the tile */
    const int64_t ia = it.r0 + ra, ib = it.r0 + rb;
    /* the last key each row sees when causal (within int32: i + off < Lk) */
    const int32_t lim_a = (int32_t)(ia + a.off), lim_b = (int32_t)(ib + a.off);
    const bool key_dbias = gr.dbias.data && it.per_key_bias;
    const bool row_dbias = gr.dbias.data && it.row_bias;

    /* Row constants: lse and delta = sum_d dO * O (two threads a row). */
    {
        const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
        const int64_t i = it.r0 + r;
        float lse = -INFINITY, delta = 0.0f;
        if (r < it.nrows) {
            lse = ((const float *)a.lse.data)[it.b * a.lse.stride[0] + it.h * a.lse.stride[1] +
                                              i * a.lse.stride[2]];
            const int64_t ob = it.b * a.out.stride[0] + i * a.out.stride[1] + it.h * a.out.stride[2];
            const int64_t db = it.b * gr.dout.stride[0] + i * gr.dout.stride[1] +
                               it.h * gr.dout.stride[2];
            for (int d = half; d < D; d += 2)
                delta += dcu_load(a.out.data, a.out.dtype, ob + d) *
                         dcu_load(gr.dout.data, gr.dout.dtype, db + d);
        }
        delta += __shfl_xor_sync(0xffffffffu, delta, 1);
        if (!half) {
            lse_s[r] = lse;
            delta_s[r] = delta;
        }
        if (threadIdx.x < CH)
            colsum[threadIdx.x] = 0.0f;
    }
    __syncthreads();

    /* Q and dO rows; rows that selected nothing (lse -inf) and rows past Lq as zeros, so that
     * they add nothing to dk and dv whatever their q holds. */
    {
        const uint16_t *qg = (const uint16_t *)a.q.data, *og = (const uint16_t *)gr.dout.data;
        for (int x = threadIdx.x; x < DCU_TILE * (D / 8); x += blockDim.x) {
            const int r = x / (D / 8), d = (x % (D / 8)) * 8;
            const bool live = lse_s[r] != -INFINITY;
            const int64_t i = live ? it.r0 + r : 0;
            cp_async16(Qs + r * LDS + d,
                       qg + it.b * a.q.stride[0] + i * a.q.stride[1] + it.h * a.q.stride[2] + d,
                       live);
            cp_async16(dOs + r * LDS + d,
                       og + it.b * gr.dout.stride[0] + i * gr.dout.stride[1] +
                           it.h * gr.dout.stride[2] + d,
                       live);
        }
    }
    union_loader<D, 128> load;
    load.init(a, it);
    if (it.t.count > 0)
        load.template issue<LDS>(a, it, 0, Ks, Vs, keys_buf[0], kbias_buf[0]);
    else
        cp_async_commit();

    const float lse_a = lse_s[ra], lse_b = lse_s[rb];
    const float delta_a = delta_s[ra], delta_b = delta_s[rb];
    const float LOG2E = 1.4426950408889634f;
    const float lse2_a = lse_a * LOG2E, lse2_b = lse_b * LOG2E; /* log2 units, as score2's */
    const row_sel sel_a = row_sel_of(a, it, ra, lse_a != -INFINITY);
    const row_sel sel_b = row_sel_of(a, it, rb, lse_b != -INFINITY);
    uint64_t mka = row_sel_word(sel_a, 0), mkb = row_sel_word(sel_b, 0);
    float dq[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
        dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

    for (int c0 = 0, bi = 0; c0 < it.t.count; c0 += CH, bi ^= 1) {
        cp_async_wait<0>();
        __syncthreads(); /* chunk c0's K, V, keys and biases are in place */
        const int32_t *keys = keys_buf[bi];
        const float *kbias = kbias_buf[bi];
        /* the next chunk's mask words, read now, used next time round */
        const uint64_t nka = row_sel_word(sel_a, c0 + CH), nkb = row_sel_word(sel_b, c0 + CH);
        const bool any = __syncthreads_or((mka | mkb) != 0);
        if (any) {
            /* S = Q K^T and dP = dO V^T for this warp's 16 rows and the chunk's 64 keys. */
            float s[8][4], dp[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                uint32_t qf[4], of[4];
                const int arow = warp * 16 + (lane & 15), acol = ks * 16 + (lane >> 4) * 8;
                ldmatrix_x4(qf, Qs + arow * LDS + acol, false);
                ldmatrix_x4(of, dOs + arow * LDS + acol, false);
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    const int mi = lane >> 3;
                    const int key = np * 16 + (lane & 7) + (mi >= 2 ? 8 : 0);
                    const int dim = ks * 16 + (mi & 1) * 8;
                    uint32_t kf[4], vf[4];
                    ldmatrix_x4(kf, Ks + key * LDS + dim, false);
                    ldmatrix_x4(vf, Vs + key * LDS + dim, false);
                    mma16816<BF16>(s[2 * np], qf, kf[0], kf[1]);
                    mma16816<BF16>(s[2 * np + 1], qf, kf[2], kf[3]);
                    mma16816<BF16>(dp[2 * np], of, vf[0], vf[1]);
                    mma16816<BF16>(dp[2 * np + 1], of, vf[2], vf[3]);
                }
            }
            /* P and dS where selected (0 elsewhere); s becomes dS times softcap's derivative,
             * dp becomes P. */
            /* keys ascend along the union: see the forward */
            const bool cz = a.causal && keys[min(CH, it.t.count - c0) - 1] > it.r0 + a.off;
            float cs[8][2]; /* per-key dbias: this thread's two rows' dS, per column */
            const uint64_t sha = mka >> (2 * t), shb = mkb >> (2 * t);
            /* Most chunks of a top-k union are selected whole by every row of the warp (see the
             * forward): those take a copy of the loop without the bit and causal tests. */
            const bool whole = __all_sync(0xffffffffu, (mka & mkb) == ~0ull &&
                                                           !(cz && keys[CH - 1] > lim_a));
            auto pair_loop = [&](auto whole_t) {
                constexpr bool WHOLE = decltype(whole_t)::value;
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int j = nt * 8 + 2 * t + e;
                        const int32_t key = keys[j];
                        const float kb = kbias[j];
                        float col = 0.0f;
#pragma unroll
                        for (int lower = 0; lower < 2; lower++) {
                            const uint64_t sh = lower ? shb : sha;
                            const int64_t i = lower ? ib : ia;
                            const int x = lower ? 2 + e : e;
                            float p = 0.0f, ds = 0.0f, dsq = 0.0f;
                            if (WHOLE || (((sh >> (nt * 8 + e)) & 1) &&
                                          !(cz && key > (lower ? lim_b : lim_a)))) {
                                float dcap;
                                const float sc = score2<PLAIN>(a, it, s[nt][x], i, key, kb, &dcap);
                                p = exp2_fast(sc - (lower ? lse2_b : lse2_a));
                                ds = p * (dp[nt][x] - (lower ? delta_b : delta_a));
                                dsq = ds * dcap;
                                if (!PLAIN && row_dbias && ds != 0.0f) /* NaN too */
                                    atomicAdd((float *)gr.dbias.data +
                                                  dcu_off(gr.dbias, it.b, it.hb, i, key),
                                              ds);
                            }
                            col += ds;
                            s[nt][x] = dsq;
                            dp[nt][x] = p;
                        }
                        cs[nt][e] = col;
                    }
            };
            if (whole)
                pair_loop(std::true_type{});
            else
                pair_loop(std::false_type{});
            if (key_dbias) {
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float v = cs[nt][e];
                        v += __shfl_xor_sync(0xffffffffu, v, 4);
                        v += __shfl_xor_sync(0xffffffffu, v, 8);
                        v += __shfl_xor_sync(0xffffffffu, v, 16);
                        if (g == 0 && v != 0.0f)
                            atomicAdd(&colsum[nt * 8 + 2 * t + e], v);
                    }
            }
            /* P and dS to shared memory for step 3; dS as A fragments for dq. */
            uint32_t df[4][4];
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                const int j = nt * 8 + 2 * t, kk = nt >> 1, hi = nt & 1;
                *(uint32_t *)(Ps + ra * LDP + j) = mma_type<BF16>::pack(dp[nt][0], dp[nt][1]);
                *(uint32_t *)(Ps + rb * LDP + j) = mma_type<BF16>::pack(dp[nt][2], dp[nt][3]);
                df[kk][hi ? 2 : 0] = mma_type<BF16>::pack(s[nt][0], s[nt][1]);
                df[kk][hi ? 3 : 1] = mma_type<BF16>::pack(s[nt][2], s[nt][3]);
                *(uint32_t *)(dSs + ra * LDP + j) = df[kk][hi ? 2 : 0];
                *(uint32_t *)(dSs + rb * LDP + j) = df[kk][hi ? 3 : 1];
            }
            /* dq += dS K. */
            mma_rows_by_chunk<BF16, D, LDS>(dq, df, Ks, lane);
        }
        mka = nka;
        mkb = nkb;
        __syncthreads(); /* K and V are consumed; P, dS and the column sums are complete */
        if (key_dbias && threadIdx.x < CH) {
            const int j = threadIdx.x;
            if (colsum[j] != 0.0f && keys[j] >= 0) /* NaN too */
                atomicAdd((float *)gr.dbias.data + dcu_off(gr.dbias, it.b, it.hb, 0, keys[j]),
                          colsum[j]);
            colsum[j] = 0.0f;
        }
        if (c0 + CH < it.t.count)
            load.template issue<LDS>(a, it, c0 + CH, Ks, Vs, keys_buf[bi ^ 1], kbias_buf[bi ^ 1]);
        if (!any)
            continue;
        /* dk and dv of this warp's 16 keys of the chunk. */
        float acc[NT][4];
        const int k0 = warp * 16;
        keys_by_rows<BF16, D>(acc, dSs, Qs, k0, lane);
        add_key_rows<D>(gr.dk, it.b, it.hkv, keys, k0, acc, a.scale, lane, gr.vec);
        keys_by_rows<BF16, D>(acc, Ps, dOs, k0, lane);
        add_key_rows<D>(gr.dv, it.b, it.hkv, keys, k0, acc, 1.0f, lane, gr.vec);
    }
    cp_async_wait<0>();

    /* dq = scale dS K; rows that selected nothing get exact zeros. */
    float *out = (float *)gr.dq.data;
    const int64_t qb = it.b * gr.dq.stride[0] + it.h * gr.dq.stride[2];
    const float sa = lse_a == -INFINITY ? 0.0f : a.scale, sb = lse_b == -INFINITY ? 0.0f : a.scale;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int d = n * 8 + 2 * t;
        if (ra < it.nrows) {
            out[qb + ia * gr.dq.stride[1] + d] = sa == 0.0f ? 0.0f : sa * dq[n][0];
            out[qb + ia * gr.dq.stride[1] + d + 1] = sa == 0.0f ? 0.0f : sa * dq[n][1];
        }
        if (rb < it.nrows) {
            out[qb + ib * gr.dq.stride[1] + d] = sb == 0.0f ? 0.0f : sb * dq[n][2];
            out[qb + ib * gr.dq.stride[1] + d + 1] = sb == 0.0f ? 0.0f : sb * dq[n][3];
        }
    }
}

template <bool BF16, int D, bool PLAIN>
int launch_kind(const dcu_attn *a, const grads &g, int64_t items, cudaStream_t stream)
{
    const size_t smem =
        sizeof(uint16_t) * ((size_t)(DCU_TILE + CH) * 2 * (D + 8) + (size_t)2 * DCU_TILE * (CH + 8));
    DCU_TRY(cudaFuncSetAttribute(backward_mma<BF16, D, PLAIN>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    backward_mma<BF16, D, PLAIN><<<(unsigned)items, 128, smem, stream>>>(*a, g);
    DCU_LAUNCHED("backward (tensor cores)");
    return 0;
}

template <bool BF16, int D>
int launch(const dcu_attn *a, const grads &g, int64_t items, cudaStream_t stream)
{
    if (a->softcap > 0.0f || (a->bias.data && a->bias.shape[2] != 1))
        return launch_kind<BF16, D, false>(a, g, items, stream);
    return launch_kind<BF16, D, true>(a, g, items, stream);
}

template <bool BF16>
int launch_d(const dcu_attn *a, const grads &g, int64_t items, cudaStream_t stream)
{
    switch (a->D) {
    case 16: return launch<BF16, 16>(a, g, items, stream);
    case 32: return launch<BF16, 32>(a, g, items, stream);
    case 48: return launch<BF16, 48>(a, g, items, stream);
    case 64: return launch<BF16, 64>(a, g, items, stream);
    case 80: return launch<BF16, 80>(a, g, items, stream);
    case 96: return launch<BF16, 96>(a, g, items, stream);
    case 112: return launch<BF16, 112>(a, g, items, stream);
    default: return launch<BF16, 128>(a, g, items, stream);
    }
}

/* Whether every (b, kv head, key) row of t starts at a multiple of n floats. */
bool rows_aligned(const dcu_tensor &t, int n)
{
    return ((uintptr_t)t.data % (4 * n)) == 0 && t.stride[0] % n == 0 && t.stride[1] % n == 0 &&
           t.stride[2] % n == 0;
}

} // namespace

extern "C" int dcu_backward_mma_fits(const dcu_attn *a, const dcu_tensor *dout)
{
    return (a->q.dtype == DCU_BF16 || a->q.dtype == DCU_F16) && a->D % 16 == 0 && a->D <= 128 &&
           dcu_aligned16(a->q) && dcu_aligned16(a->k) && dcu_aligned16(a->v) &&
           dcu_aligned16(*dout);
}

extern "C" int dcu_backward_mma(const dcu_attn *a, const dcu_tensor *dout, const dcu_tensor *dq,
                                const dcu_tensor *dk, const dcu_tensor *dv,
                                const dcu_tensor *dbias, int64_t items, void *stream)
{
    int dev = 0, major = 0;
    DCU_TRY(cudaGetDevice(&dev));
    DCU_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    const int vec = major < 9                                           ? 1
                    : rows_aligned(*dk, 4) && rows_aligned(*dv, 4) ? 4
                    : rows_aligned(*dk, 2) && rows_aligned(*dv, 2) ? 2
                                                                   : 1;
    const grads g = {*dout, *dq, *dk, *dv, *dbias, vec};
    if (a->q.dtype == DCU_BF16)
        return launch_d<true>(a, g, items, (cudaStream_t)stream);
    return launch_d<false>(a, g, items, (cudaStream_t)stream);
}

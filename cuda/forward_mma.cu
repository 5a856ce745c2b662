/*
 * forward_mma.cu - the bf16 / f16 forward on tensor cores (mma.sync m16n8k16, float32
 * accumulation), for D a multiple of 16 up to 128 and 16-byte aligned rows. One block per
 * (batch, query head, tile of 64 rows), 4 warps of 16 rows. The union is read in chunks of 64
 * positions, which line up with the 64-bit words of the rows' bitmasks: a row's mask for a
 * chunk is one word. Per chunk: K and V rows to shared memory, S = Q K^T (Q's fragments stay
 * in registers), mask, scale, softcap, bias, the online softmax in float32, then P V with P
 * rounded to the storage type (flash attention's choice; the documented exception of
 * dmattn.h).
 */
#include "attn_common.cuh"

namespace {

constexpr int CH = 64; /* union positions per chunk */

template <bool BF16> struct mma_type;
template <> struct mma_type<true> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *(uint32_t *)&v;
    }
    static __device__ __forceinline__ void store2(void *p, float lo, float hi)
    {
        *(__nv_bfloat162 *)p = __floats2bfloat162_rn(lo, hi);
    }
};
template <> struct mma_type<false> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __half2 v = __floats2half2_rn(lo, hi);
        return *(uint32_t *)&v;
    }
    static __device__ __forceinline__ void store2(void *p, float lo, float hi)
    {
        *(__half2 *)p = __floats2half2_rn(lo, hi);
    }
};

template <bool BF16>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    if (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                     "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                     "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* 16 bytes global -> shared without passing through registers; zeros when !valid. */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid)
{
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *p, bool trans)
{
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

/* A row's selection within chunk [c0, c0 + 64) as a bit word. */
__device__ __forceinline__ uint64_t row_mask(const dcu_attn &a, const dcu_item &it, int r, int c0)
{
    if (r >= it.nrows)
        return 0;
    const int64_t row = it.slab * a.Lq + it.r0 + r;
    const int lo = max(a.sp.row_lo[row] - c0, 0), hi = min(a.sp.row_hi[row] - c0, CH);
    if (lo >= hi)
        return 0;
    if (it.t.word_off >= 0)
        return a.sp.words[it.t.word_off + (int64_t)r * it.t.words_per_row + c0 / 64];
    const uint64_t upto_hi = hi >= 64 ? ~0ull : ((1ull << hi) - 1);
    return upto_hi & (~0ull << lo);
}

template <bool BF16, int D>
__global__ void __launch_bounds__(128) forward_mma(dcu_attn a)
{
    constexpr int LDS = D + 8; /* shared row stride in elements: 16 bytes of padding */
    constexpr int KS = D / 16; /* k-steps of Q K^T */
    constexpr int NT = D / 8;  /* n-tiles of P V */
    /* Two buffers of K and V rows: the next chunk's copies (cp.async) overlap this chunk's
     * arithmetic. */
    extern __shared__ __align__(16) uint16_t smh[];
    __shared__ int32_t keys_buf[2][CH];
    __shared__ float kbias_buf[2][CH];

    const dcu_item it = dcu_item_of(a, blockIdx.x);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int ra = warp * 16 + g, rb = ra + 8; /* this thread's two rows of the tile */
    const int64_t ia = it.r0 + ra, ib = it.r0 + rb;

    /* Q's A fragments for the whole of D, once. */
    uint32_t qf[KS][4];
    {
        const uint16_t *q = (const uint16_t *)a.q.data;
        const int64_t base = it.b * a.q.stride[0] + it.h * a.q.stride[2];
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            const int d0 = ks * 16 + 2 * t;
            qf[ks][0] = ra < it.nrows ? *(const uint32_t *)(q + base + ia * a.q.stride[1] + d0) : 0;
            qf[ks][1] = rb < it.nrows ? *(const uint32_t *)(q + base + ib * a.q.stride[1] + d0) : 0;
            qf[ks][2] = ra < it.nrows ? *(const uint32_t *)(q + base + ia * a.q.stride[1] + d0 + 8) : 0;
            qf[ks][3] = rb < it.nrows ? *(const uint32_t *)(q + base + ib * a.q.stride[1] + d0 + 8) : 0;
        }
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float ma = -INFINITY, mb = -INFINITY, la = 0.0f, lb = 0.0f;
    const int64_t kbase = it.b * a.k.stride[0] + it.hkv * a.k.stride[2];
    const int64_t vbase = it.b * a.v.stride[0] + it.hkv * a.v.stride[2];
    const uint16_t *kg = (const uint16_t *)a.k.data, *vg = (const uint16_t *)a.v.data;
    const float LOG2E = 1.4426950408889634f;

    /* Start the copies of chunk c0 into buffer bi: its keys, per-key biases, K and V rows
     * (zeros past the union). */
    auto issue = [&](int c0, int bi) {
        const int n = min(CH, it.t.count - c0);
        if (threadIdx.x < CH) {
            const int j = threadIdx.x;
            const int32_t key = j < n ? dcu_tile_key(a.sp, it.t, c0 + j) : -1;
            keys_buf[bi][j] = key;
            kbias_buf[bi][j] = it.per_key_bias && key >= 0 ? dcu_bias_at(a, it.b, it.hb, 0, key) : 0.0f;
        }
        uint16_t *Kd = smh + bi * 2 * CH * LDS, *Vd = Kd + CH * LDS;
        for (int x = threadIdx.x; x < CH * (D / 8); x += blockDim.x) {
            const int j = x / (D / 8), d = (x % (D / 8)) * 8;
            const int32_t key = j < n ? dcu_tile_key(a.sp, it.t, c0 + j) : -1;
            const int64_t kk = key >= 0 ? key : 0;
            cp_async16(Kd + j * LDS + d, kg + kbase + kk * a.k.stride[1] + d, key >= 0);
            cp_async16(Vd + j * LDS + d, vg + vbase + kk * a.v.stride[1] + d, key >= 0);
        }
        cp_async_commit();
    };
    if (it.t.count > 0)
        issue(0, 0);
    for (int c0 = 0, bi = 0; c0 < it.t.count; c0 += CH, bi ^= 1) {
        if (c0 + CH < it.t.count) {
            issue(c0 + CH, bi ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads(); /* chunk c0's rows, keys and biases are in place */
        const uint16_t *Ks = smh + bi * 2 * CH * LDS, *Vs = Ks + CH * LDS;
        const int32_t *keys = keys_buf[bi];
        const float *kbias = kbias_buf[bi];
        const uint64_t mka = row_mask(a, it, ra, c0), mkb = row_mask(a, it, rb, c0);
        if (!__syncthreads_or((mka | mkb) != 0))
            continue; /* no row of the tile selects any key of this chunk */
        /* S = Q K^T for this warp's 16 rows and the chunk's 64 keys. */
        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ks++)
#pragma unroll
            for (int np = 0; np < 4; np++) { /* pairs of n-tiles: 16 keys */
                const int mi = lane >> 3;
                const int key = np * 16 + (lane & 7) + (mi >= 2 ? 8 : 0);
                const int dim = ks * 16 + (mi & 1) * 8;
                uint32_t bf[4];
                ldmatrix_x4(bf, Ks + key * LDS + dim, false);
                mma16816<BF16>(s[2 * np], qf[ks], bf[0], bf[1]);
                mma16816<BF16>(s[2 * np + 1], qf[ks], bf[2], bf[3]);
            }
        /* Scale, softcap, bias and mask; the row maxima. */
        float cmax_a = -INFINITY, cmax_b = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = nt * 8 + 2 * t + (e & 1);
                const bool lower = e >= 2;
                const uint64_t mk = lower ? mkb : mka;
                const int64_t i = lower ? ib : ia;
                float v = -INFINITY;
                if (((mk >> j) & 1) && !(a.causal && keys[j] > i + a.off)) {
                    float dcap;
                    v = dcu_capped(a, s[nt][e], &dcap) +
                        dcu_score_bias(a, it, i, keys[j], kbias[j]);
                }
                s[nt][e] = v;
                if (lower)
                    cmax_b = fmaxf(cmax_b, v);
                else
                    cmax_a = fmaxf(cmax_a, v);
            }
        cmax_a = fmaxf(cmax_a, __shfl_xor_sync(0xffffffffu, cmax_a, 1));
        cmax_a = fmaxf(cmax_a, __shfl_xor_sync(0xffffffffu, cmax_a, 2));
        cmax_b = fmaxf(cmax_b, __shfl_xor_sync(0xffffffffu, cmax_b, 1));
        cmax_b = fmaxf(cmax_b, __shfl_xor_sync(0xffffffffu, cmax_b, 2));
        const float mna = fmaxf(ma, cmax_a), mnb = fmaxf(mb, cmax_b);
        const float ua = mna == -INFINITY ? 0.0f : mna, ub = mnb == -INFINITY ? 0.0f : mnb;
        const float alpha_a = exp2f((ma - ua) * LOG2E), alpha_b = exp2f((mb - ub) * LOG2E);
        float sa = 0.0f, sb = 0.0f;
        uint32_t pf[4][4]; /* P as A fragments of the 4 k-steps of P V */
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            const float p0 = s[nt][0] == -INFINITY ? 0.0f : exp2f((s[nt][0] - ua) * LOG2E);
            const float p1 = s[nt][1] == -INFINITY ? 0.0f : exp2f((s[nt][1] - ua) * LOG2E);
            const float p2 = s[nt][2] == -INFINITY ? 0.0f : exp2f((s[nt][2] - ub) * LOG2E);
            const float p3 = s[nt][3] == -INFINITY ? 0.0f : exp2f((s[nt][3] - ub) * LOG2E);
            sa += p0 + p1;
            sb += p2 + p3;
            const int kk = nt >> 1, hi = nt & 1;
            pf[kk][hi ? 2 : 0] = mma_type<BF16>::pack(p0, p1);
            pf[kk][hi ? 3 : 1] = mma_type<BF16>::pack(p2, p3);
        }
        sa += __shfl_xor_sync(0xffffffffu, sa, 1);
        sa += __shfl_xor_sync(0xffffffffu, sa, 2);
        sb += __shfl_xor_sync(0xffffffffu, sb, 1);
        sb += __shfl_xor_sync(0xffffffffu, sb, 2);
        la = la * alpha_a + sa;
        lb = lb * alpha_b + sb;
        ma = mna;
        mb = mnb;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            o[nt][0] *= alpha_a;
            o[nt][1] *= alpha_a;
            o[nt][2] *= alpha_b;
            o[nt][3] *= alpha_b;
        }
        /* O += P V. */
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                const int mi = lane >> 3;
                const int key = kk * 16 + (lane & 7) + ((mi & 1) ? 8 : 0);
                const int dim = np * 16 + ((mi >> 1) ? 8 : 0);
                uint32_t bf[4];
                ldmatrix_x4(bf, Vs + key * LDS + dim, true);
                mma16816<BF16>(o[2 * np], pf[kk], bf[0], bf[1]);
                mma16816<BF16>(o[2 * np + 1], pf[kk], bf[2], bf[3]);
            }
        __syncthreads(); /* K, V and keys are rewritten by the next chunk */
    }
    /* out = O / l (0 for an empty row) and lse. */
    uint16_t *out = (uint16_t *)a.out.data;
    const int64_t obase = it.b * a.out.stride[0] + it.h * a.out.stride[2];
    const float inva = la == 0.0f ? 0.0f : 1.0f / la, invb = lb == 0.0f ? 0.0f : 1.0f / lb;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int d = nt * 8 + 2 * t;
        if (ra < it.nrows)
            mma_type<BF16>::store2(out + obase + ia * a.out.stride[1] + d, o[nt][0] * inva,
                                   o[nt][1] * inva);
        if (rb < it.nrows)
            mma_type<BF16>::store2(out + obase + ib * a.out.stride[1] + d, o[nt][2] * invb,
                                   o[nt][3] * invb);
    }
    if (a.lse.data && t == 0) {
        float *lse = (float *)a.lse.data;
        const int64_t lb0 = it.b * a.lse.stride[0] + it.h * a.lse.stride[1];
        if (ra < it.nrows)
            lse[lb0 + ia * a.lse.stride[2]] = la == 0.0f ? -INFINITY : ma + logf(la);
        if (rb < it.nrows)
            lse[lb0 + ib * a.lse.stride[2]] = lb == 0.0f ? -INFINITY : mb + logf(lb);
    }
}

template <bool BF16, int D>
int launch(const dcu_attn *a, int64_t items, cudaStream_t stream)
{
    const size_t smem = (size_t)4 * CH * (D + 8) * sizeof(uint16_t);
    DCU_TRY(cudaFuncSetAttribute(forward_mma<BF16, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)smem));
    forward_mma<BF16, D><<<(unsigned)items, 128, smem, stream>>>(*a);
    DCU_LAUNCHED("forward (tensor cores)");
    return 0;
}

template <bool BF16>
int launch_d(const dcu_attn *a, int64_t items, cudaStream_t stream)
{
    switch (a->D) {
    case 16: return launch<BF16, 16>(a, items, stream);
    case 32: return launch<BF16, 32>(a, items, stream);
    case 48: return launch<BF16, 48>(a, items, stream);
    case 64: return launch<BF16, 64>(a, items, stream);
    case 80: return launch<BF16, 80>(a, items, stream);
    case 96: return launch<BF16, 96>(a, items, stream);
    case 112: return launch<BF16, 112>(a, items, stream);
    default: return launch<BF16, 128>(a, items, stream);
    }
}

bool aligned16(const dcu_tensor &t)
{
    return ((uintptr_t)t.data % 16) == 0 && t.stride[0] % 8 == 0 && t.stride[1] % 8 == 0 &&
           t.stride[2] % 8 == 0;
}

} // namespace

/* Whether the tensor-core forward takes this call (else the float32 SIMT kernel does). */
extern "C" int dcu_forward_mma_fits(const dcu_attn *a)
{
    return (a->q.dtype == DCU_BF16 || a->q.dtype == DCU_F16) && a->D % 16 == 0 && a->D <= 128 &&
           aligned16(a->q) && aligned16(a->k) && aligned16(a->v) && aligned16(a->out);
}

extern "C" int dcu_forward_mma(const dcu_attn *a, int64_t items, void *stream)
{
    if (a->q.dtype == DCU_BF16)
        return launch_d<true>(a, items, (cudaStream_t)stream);
    return launch_d<false>(a, items, (cudaStream_t)stream);
}

/* mma.cuh - what the tensor-core kernels (forward_mma.cu, backward_mma.cu) share: the 16-bit
 * types' packing, mma.sync m16n8k16 with float32 accumulation, cp.async and ldmatrix, a
 * row's selection within a chunk of 64 union positions as one bit word (chunks line up with
 * the 64-bit words of the rows' bitmasks), and the copies of the union's K and V rows. */
#ifndef DMATTN_CUDA_MMA_CUH
#define DMATTN_CUDA_MMA_CUH

#include "attn_common.cuh"

namespace dcu_mma {

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
static __device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
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
static __device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid)
{
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0));
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> static __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

static __device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *p, bool trans)
{
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

/* acc[16 rows][D] += A B for one warp: A the 16 x 64 A fragments of the chunk's 4 k-steps of
 * 16 positions (P or dS, from registers), B the chunk's [64 positions][LDS] rows of V or K in
 * shared memory, read transposed. */
template <bool BF16, int D, int LDS>
static __device__ __forceinline__ void mma_rows_by_chunk(float (*acc)[4], const uint32_t (*af)[4],
                                                         const uint16_t *B, int lane)
{
    const int mi = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int np = 0; np < D / 16; np++) {
            const int key = kk * 16 + (lane & 7) + ((mi & 1) ? 8 : 0);
            const int dim = np * 16 + ((mi >> 1) ? 8 : 0);
            uint32_t bf[4];
            ldmatrix_x4(bf, B + key * LDS + dim, true);
            mma16816<BF16>(acc[2 * np], af[kk], bf[0], bf[1]);
            mma16816<BF16>(acc[2 * np + 1], af[kk], bf[2], bf[3]);
        }
}

/* The score of a selected pair in log2 units (times log2 e): scale, softcap and bias. PLAIN:
 * no softcap and no per-row bias, so it is one multiply-add of the staged per-key bias. */
template <bool PLAIN>
static __device__ __forceinline__ float score2(const dcu_attn &a, const dcu_item &it, float dot,
                                              int64_t i, int32_t key, float kbias, float *dcap)
{
    constexpr float LOG2E = 1.4426950408889634f;
    if (PLAIN) {
        *dcap = 1.0f;
        return fmaf(dot, a.scale * LOG2E, kbias * LOG2E);
    }
    return (dcu_capped(a, dot, dcap) + dcu_score_bias(a, it, i, key, kbias)) * LOG2E;
}

/* One row of a tile: where its selection lies among the union's positions. */
struct row_sel {
    int lo, hi;            /* positions [lo, hi) may be selected; lo >= hi: none */
    const uint64_t *words; /* the row's bitmask words; NULL: every position of [lo, hi) */
};

/* Tile row r's selection; none for rows past Lq and when !live. */
static __device__ __forceinline__ row_sel row_sel_of(const dcu_attn &a, const dcu_item &it, int r,
                                                     bool live)
{
    if (!live || r >= it.nrows)
        return {0, 0, nullptr};
    const int64_t row = it.slab * a.Lq + it.r0 + r;
    return {a.sp.row_lo[row], a.sp.row_hi[row],
            it.t.word_off >= 0 ? a.sp.words + it.t.word_off + (int64_t)r * it.t.words_per_row
                               : nullptr};
}

/* The row's selection within chunk [c0, c0 + 64) as a bit word. */
static __device__ __forceinline__ uint64_t row_sel_word(const row_sel &s, int c0)
{
    const int lo = max(s.lo - c0, 0), hi = min(s.hi - c0, CH);
    if (lo >= hi)
        return 0;
    if (s.words)
        return s.words[c0 / 64];
    const uint64_t upto_hi = hi >= 64 ? ~0ull : ((1ull << hi) - 1);
    return upto_hi & (~0ull << lo);
}

/* Copies a tile's union into shared memory chunk by chunk (cp.async; zero rows past the union).
 * THREADS / 64 threads share a key row, taking its 16-byte segments in turn (so that a warp's
 * copies read whole 32-byte sectors). A thread's key is read from global memory two chunks
 * ahead and its per-key bias one chunk ahead, so that no copy waits for either. */
template <int D, int THREADS> struct union_loader {
    static constexpr int P = THREADS / CH, SEGS = D / 8;
    const uint16_t *kg, *vg;
    int64_t kbase, vbase, kstride, vstride;
    int j, part;
    int32_t key1, key2; /* the keys of the next chunk to copy and of the one after */
    float bias1;        /* key1's per-key bias (0 without one) */

    __device__ __forceinline__ int32_t key_at(const dcu_attn &a, const dcu_item &it, int c0) const
    {
        return c0 + j < it.t.count ? dcu_tile_key(a.sp, it.t, c0 + j) : -1;
    }
    __device__ __forceinline__ float bias_of(const dcu_attn &a, const dcu_item &it, int32_t key) const
    {
        return it.per_key_bias && key >= 0 ? dcu_bias_at(a, it.b, it.hb, 0, key) : 0.0f;
    }
    __device__ __forceinline__ void init(const dcu_attn &a, const dcu_item &it)
    {
        kg = (const uint16_t *)a.k.data, vg = (const uint16_t *)a.v.data;
        kbase = it.b * a.k.stride[0] + it.hkv * a.k.stride[2];
        vbase = it.b * a.v.stride[0] + it.hkv * a.v.stride[2];
        kstride = a.k.stride[1], vstride = a.v.stride[1];
        j = threadIdx.x / P, part = threadIdx.x % P;
        key1 = key_at(a, it, 0);
        key2 = key_at(a, it, CH);
        bias1 = part == 0 ? bias_of(a, it, key1) : 0.0f;
    }
    /* Start the copies of chunk c0 (the next one: key1's) into K, V (row stride LDS), its keys
     * and per-key biases into keys, kbias; then read ahead. */
    template <int LDS>
    __device__ __forceinline__ void issue(const dcu_attn &a, const dcu_item &it, int c0,
                                          uint16_t *K, uint16_t *V, int32_t *keys, float *kbias)
    {
        if (part == 0) {
            keys[j] = key1;
            kbias[j] = bias1;
        }
        const bool valid = key1 >= 0;
        const int64_t kk = valid ? key1 : 0;
        const uint16_t *ks = kg + kbase + kk * kstride, *vs = vg + vbase + kk * vstride;
        uint16_t *kd = K + j * LDS, *vd = V + j * LDS;
#pragma unroll
        for (int s = 0; s < (SEGS + P - 1) / P; s++) {
            const int seg = part + P * s;
            if (SEGS % P == 0 || seg < SEGS) {
                cp_async16(kd + 8 * seg, ks + 8 * seg, valid);
                cp_async16(vd + 8 * seg, vs + 8 * seg, valid);
            }
        }
        cp_async_commit();
        key1 = key2;
        bias1 = part == 0 ? bias_of(a, it, key1) : 0.0f;
        key2 = key_at(a, it, c0 + 2 * CH);
    }
};

/* 2^x on the special function unit; subnormal results flush to 0 (weights below 2^-126 of the
 * row's largest). */
static __device__ __forceinline__ float exp2_fast(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* mbarriers in shared memory (sm_80+): a phase completes when `count` arrivals have come. */
static __device__ __forceinline__ void mbar_init(uint64_t *bar, int count)
{
    asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"((uint32_t)__cvta_generic_to_shared(bar)),
                 "r"(count) : "memory");
}
/* An arrival (release: this thread's earlier writes and reads are ordered before it). */
static __device__ __forceinline__ void mbar_arrive(uint64_t *bar)
{
    asm volatile("{ .reg .b64 st; mbarrier.arrive.shared.b64 st, [%0]; }\n" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(bar)) : "memory");
}
/* An arrival made when this thread's cp.async copies so far have landed (counted in `count`). */
static __device__ __forceinline__ void mbar_arrive_copies(uint64_t *bar)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(bar)) : "memory");
}
/* Wait until the phase of the given parity has completed (acquire). */
static __device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity)
{
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(bar);
    uint32_t done = 0;
    while (!done)
        asm volatile("{ .reg .pred p; mbarrier.test_wait.parity.shared.b64 p, [%1], %2; "
                     "selp.u32 %0, 1, 0, p; }\n"
                     : "=r"(done) : "r"(addr), "r"(parity) : "memory");
}

/* Whether a 16-bit tensor's rows start on 16-byte boundaries (cp.async and ldmatrix need it). */
static inline bool dcu_aligned16(const dcu_tensor &t)
{
    return ((uintptr_t)t.data % 16) == 0 && t.stride[0] % 8 == 0 && t.stride[1] % 8 == 0 &&
           t.stride[2] % 8 == 0;
}

} // namespace dcu_mma

#endif

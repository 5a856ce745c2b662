/*
 * kernels.h - the inner kernels of the forward, behind one dispatch table.
 *
 * lib/kernels_scalar.c holds the portable C version of every kernel (the readable reference);
 * simd/<arch>/<isa>/ holds one file per ISA that fills the same table with intrinsics.
 * The forward driver (lib/forward.c) only ever calls through a `dma_kernels` table, so a new ISA
 * never touches the driver and a new mask kind never touches a kernel.
 *
 * Data layouts the kernels share (all float32):
 *   - Q rows:  q[r * ldq + d], already multiplied by the attention scale, zero-padded to ldq.
 *   - K panel: keys packed transposed in blocks of `nr` keys:
 *              kp[(c / nr) * (D * nr) + d * nr + (c % nr)] = K[key c][d]; the last block is
 *              zero-filled past n. So the panel for keys [c0, ...) with c0 % nr == 0 starts at
 *              kp + c0 * D.
 *   - V panel: vp[c * ldv + d] = V[key c][d], ldv a multiple of 16 floats, zero-padded past D.
 *   - S / P:   s[r * lds + c], one row per query row of the block.
 *   - O:       o[r * ldo + d] (ldo a multiple of 16, >= D), the running un-normalised output.
 * Every pointer handed to a kernel is 64-byte aligned except q/s/o/vp row starts offset by
 * a column block, which stay 32-byte aligned (offsets are multiples of nr >= 8 floats).
 */
#ifndef DMATTN_KERNELS_H
#define DMATTN_KERNELS_H

#include <stdint.h>

typedef struct dma_kernels {
    const char *name;
    int mr;  /* largest row count `scores` and `accum_pv` are called with (a block of query rows) */
    int nr;  /* keys per packed K block; a multiple of 8 and a divisor of DMA_CHUNK and of 64 */
    int select_step; /* keys scores_select's calls start and end at, and scores' calls end
                      * at: a divisor of nr */
    int pv_rows; /* rows (<= mr) of accum_pv's fastest register block, for callers free to
                  * choose their blocks of rows (the backward's dQ) */
    int tn_rows; /* rows of Q (or dout) one accum_tn call of the backward may take: 64 in
                  * every table (a 64-float-wide block of them stays in a 32 KiB L1); the
                  * context raises it to 128 on CPUs where that pays (context.c) */

    /* Gather n keys and pack them transposed into kp (layout above, n rounded up to nr with
     * zeros). Key c is row `keys[c]` of `base` (row stride ld floats) or, if keys is NULL,
     * row first + c. D floats per row. */
    void (*pack_k)(float *kp, const float *base, int64_t ld, const int32_t *keys, int32_t first,
                   int n, int D);

    /* Gather n value rows into vp (row stride ldv, zero-padded from D to ldv). Same addressing. */
    void (*pack_v)(float *vp, int ldv, const float *base, int64_t ld, const int32_t *keys,
                   int32_t first, int n, int D);

    /* s[r][c] = sum_d q[r][d] * K[c][d] for r < m (m <= mr), c < n (n a multiple of
     * select_step: a call may end inside a packed block, as the backward's blocks of rows do).
     * kp points at the packed block of key 0 of this call. */
    void (*scores)(float *s, int lds, const float *q, int ldq, int m, const float *kp, int n,
                   int D);

    /* One row of the online softmax over a chunk of n scores (n <= DMA_CHUNK_MAX, multiple of nr).
     * Position c is selected iff lo <= c < hi and (bits == NULL or bit (bit0 + c) of the
     * little-endian word array `bits` is set). For selected c the score is
     *     x = softcap > 0 ? softcap * tanh(s[c] / softcap) : s[c];   x += bias ? bias[c] : 0
     * With m_new = max(*m, max selected x): s[c] becomes exp(x - m_new) for selected c and 0
     * elsewhere (every c < n is written); *l = *l * exp(*m - m_new) + sum of the new s; *m = m_new.
     * Returns the factor exp(m_old - m_new) the row's O must be scaled by (1 when m_new is -inf,
     * in which case s is all 0 and *m, *l are unchanged).
     * NaN: the max skips a NaN x, which then gives a NaN s[c] (so a NaN *l). If no selected x is
     * above -inf but one is NaN, m_new is NaN (not the empty case): the factor, *m and *l
     * become NaN, and so does s[c] at every selected c (unselected s[c] are 0 or NaN, per ISA).
     * A NaN *m stays NaN. Each ISA's exp must keep NaN for this to hold. */
    float (*softmax_row)(float *s, int n, const float *bias, const uint64_t *bits, int bit0,
                         int lo, int hi, float softcap, float *m, float *l);

    /* scores and softmax_row's first pass in one kernel (softcap 0 only). Every table here
     * has them; a table that leaves them NULL makes the driver run scores and softmax_row. The
     * call covers the n keys from key `off` of the packed block at kp (off < nr and n both
     * multiples of select_step): calls may start and end inside a block, so a block of rows
     * computes the columns its rows select to select_step keys, not nr. For r < m (m <= mr)
     * and c < n, with row r's selection as softmax_row's (bits[r], bit0, lo[r], hi[r]; bits[r]
     * may be NULL):
     *     s[r][c] = <q_r, K[off + c]> + (bias[r] ? bias[r][c] : 0) where row r selects c, else
     *               -inf;
     *     rowmax[r] = the max of row r's selected s, NaN skipped (-inf if none).
     * softmax_exp(s_r, n, rowmax[r], m, l) then finishes row r: s, *m, *l and the factor it
     * returns are bitwise what scores over the blocks, then softmax_row(..., softcap 0) over
     * the same n positions give, except that when *m ends NaN the unselected positions may be
     * NaN instead of 0 (the row is NaN anyway). Fused, the mask, bias and max are applied while
     * the block of scores is in registers (x86) or L1 (NEON), not in a separate pass over s. */
    void (*scores_select)(float *s, int lds, const float *q, int ldq, int m, const float *kp,
                          int off, int n, int D, const float *const *bias,
                          const uint64_t *const *bits, int bit0, const int *lo, const int *hi,
                          float *rowmax);
    float (*softmax_exp)(float *s, int n, float chunk_max, float *m, float *l);

    /* o[r][d] = alpha[r] * o[r][d] + sum_{c<n} p[r][c] * vp[c][d] for r < m (m <= mr), d < D.
     * Columns D..ldo-1 of o may be written with zeros-in, zeros-out values. */
    void (*accum_pv)(float *o, int ldo, const float *alpha, const float *p, int ldp, int m,
                     const float *vp, int ldv, int n, int D);

    /* ---- backward ---- */

    /* One row of the backward over a chunk of n positions (selection rule as softmax_row).
     * In: s[c] the scaled score <q, k_c>, dp[c] = <dout, v_c>. For selected c:
     *     t = softcap > 0 ? softcap * tanh(s / softcap) : s;  x = t + (bias ? bias[c] : 0)
     *     p = exp(x - lse);  dx = p * (dp - delta);  ds = dx * (softcap > 0 ? 1 - (t/softcap)^2 : 1)
     * Out: s[c] = p, dp[c] = ds, and dx_sum[c] += dx when dx_sum is not NULL; every c < n is
     * written, with p = ds = 0 (and nothing added) where c is not selected or lse is -inf.
     * A NaN lse (a NaN row of the forward) is not -inf: it gives p = ds = NaN where selected. */
    void (*grad_row)(float *s, float *dp, int n, const float *bias, const uint64_t *bits,
                     int bit0, int lo, int hi, float softcap, float lse, float delta,
                     float *dx_sum);

    /* o[c][d] += sum_{r<k} p[r][c] * x[r][d] for c < m (any m >= 1), d < D: the transposed-P
     * product that accumulates dK (p = dS, x = Q) and dV (p = P, x = dout) over k query rows.
     * With `overwrite` o is not read: o[c][d] = the sum (so the caller need not zero it first).
     * p has row stride ldp, x and o row strides ldx and ldo (multiples of 16, zero-padded).
     * The kernel walks the keys in register blocks over the same k x D block of x, so the
     * caller keeps that block small enough for L1. */
    void (*accum_tn)(float *o, int ldo, const float *p, int ldp, int m, const float *x, int ldx,
                     int k, int D, int overwrite);

    /* dst[j][i] += src[j][i] for j < m, i < n: one IEEE add per element, so every table gives
     * the same bits. The backward adds each key's private dk and dv rows into the gradients
     * with it; those rows are scattered and mostly out of L1, and wide vectors keep more of
     * them in flight than the portable loop. Any alignment; a dst row overlaps no src row. */
    void (*add_rows)(float *const *dst, const float *const *src, int m, int n);

    /* dst[i] = s * src[i] for i < n, one IEEE multiply per element, so every table gives the
     * same bits; returns nonzero iff some dst[i] is NaN. The rows the drivers move between the
     * tensors and their panels go through it (q scaled as it is loaded, O normalised into out,
     * dQ scaled into dq): those rows mostly miss the cache, and wide loads and stores keep more
     * of them in flight than the portable loop. Any alignment; dst is src or does not overlap
     * it. */
    int (*scale_row)(float *dst, const float *src, float s, int n);

    /* Ask for the cache lines of [p, p + bytes) in the state a store needs, ahead of the
     * stores (the forward's out rows): a hint, with no effect on any value. Every table has
     * dma_prefetch_write; on an x86 CPU with PREFETCHW the context installs
     * dma_x86_prefetch_write, which fetches each line for ownership, so that the stores that
     * follow do not wait on a request for it (an MHA D 64 forward on Zen 4: 3.5-5.4% faster
     * while the host ran slow, the same otherwise). */
    void (*prefetch_write)(const void *p, int64_t bytes);

    /* ---- half-precision storage ---- */

    /* dst[i] = src[i] as float32 for i < n: bf16 (f16 == 0) or IEEE binary16 (f16 != 0). Exact:
     * every bf16 and binary16 value is a float. NaN keeps its sign and payload; a binary16 NaN
     * comes out quiet (bit 0x00400000 set, as F16C and Arm do), a bf16 NaN is just shifted
     * (src << 16). No alignment is required; dst and src do not overlap. */
    void (*to_f32)(float *dst, const uint16_t *src, int64_t n, int f16);

    /* dst[i] = src[i] rounded to bf16 (f16 == 0) or binary16 (f16 != 0) for i < n: round to
     * nearest, ties to even (x86 ignores MXCSR here; Arm's FCVT follows FPCR, assumed at its
     * default). Overflow gives +-inf (binary16: from 65520 up), underflow is gradual
     * (subnormals), +-0 and +-inf are kept. A NaN stays a quiet NaN with its sign and the top
     * bits of its payload: bf16 (bits >> 16) | 0x0040, binary16 sign | 0x7e00 |
     * ((bits >> 13) & 0x3ff) (what F16C and Arm's FCVT give). Bitwise the same on every ISA.
     * No alignment is required; dst and src do not overlap. */
    void (*from_f32)(uint16_t *dst, const float *src, int64_t n, int f16);

    /* pack_k from 16-bit rows (bf16 or binary16, as to_f32): the same packed panel pack_k makes
     * from the rows converted to float32, bit for bit, in one pass (the decode over a bf16 KV
     * cache streams its keys through here). ld counts uint16_t elements. */
    void (*pack_k_half)(float *kp, const uint16_t *base, int64_t ld, const int32_t *keys,
                        int32_t first, int n, int D, int f16);

    /* ---- decode ---- */

    /* s[r * lds + c] = sum_d q[r * ldq + d] * k[c * ldk + d] for r < m (1 <= m <= 8), c < n:
     * scores against keys in rows (not packed). A decode's few query rows per key do not pay
     * for packing K; this reads each key row once for all m rows. Any alignment. */
    void (*dots)(float *s, int lds, const float *q, int ldq, int m, const float *k, int ldk,
                 int n, int D);

    /* ---- bf16 dot products: NULL in every table except AVX-512 on a CPU with AVX512_BF16 ---- */

    /* Pack n bf16 keys as pairs of dimensions for VDPBF16PS, in blocks of nr keys:
     *   kp[(c / nr) * (D * nr) + (d / 2) * (2 * nr) + (c % nr) * 2 + d % 2] = K[key c][d]
     * (D even; the last block zero-filled past n), so the panel for keys [c0, ...) with
     * c0 % nr == 0 starts at kp + c0 * D. Addressing as pack_k; ld counts uint16_t elements and
     * is even, and the rows start 4-byte aligned. */
    void (*pack_k_bf16)(uint16_t *kp, const uint16_t *base, int64_t ld, const int32_t *keys,
                        int32_t first, int n, int D);

    /* s[r][c] = scale * sum_d q[r][d] * K[c][d] for r < m (m <= mr), c < n (n a multiple of
     * nr): bf16 query rows (unscaled, row stride ldq elements, even) against a pack_k_bf16
     * panel. Each product of two bf16 values is exact in float32 and the sums are float32, so
     * s differs from `scores` on the same values by float32 rounding only (VDPBF16PS reads bf16
     * subnormals as zero and flushes subnormal sums). */
    void (*scores_bf16)(float *s, int lds, const uint16_t *q, int ldq, int m, const uint16_t *kp,
                        int n, int D, float scale);
} dma_kernels;

/* Keys per chunk of the union the driver processes at once (a multiple of 64 and of every nr). */
#define DMA_CHUNK 256
/* The forward's last chunk of a union also takes a tail of up to 64 keys (a union of w + a few
 * keys would otherwise end in a chunk of a few keys that costs every row a softmax pass and a
 * rescale of its output for little work): a forward chunk holds at most this many. */
#define DMA_CHUNK_MAX (DMA_CHUNK + 64)

extern const dma_kernels dma_kernels_scalar;
/* The write prefetch of every line of [p, p + bytes) (none for bytes <= 0), as the function it
 * is inlined into compiles __builtin_prefetch: the one loop of both prefetch_write versions. */
static inline __attribute__((always_inline)) void dma_prefetch_lines(const void *p, int64_t bytes)
{
    const uintptr_t end = (uintptr_t)p + (uintptr_t)(bytes > 0 ? bytes : 0);
    for (uintptr_t line = (uintptr_t)p & ~(uintptr_t)63; line < end; line += 64)
        __builtin_prefetch((const void *)line, 1, 3);
}
/* prefetch_write of every table: the compiler's prefetch for writing (x86: PREFETCHT0, which
 * baseline x86-64 has; aarch64: PRFM PSTL1KEEP). */
void dma_prefetch_write(const void *p, int64_t bytes);
#if defined(DMATTN_HAVE_AVX2)
extern const dma_kernels dma_kernels_avx2;
/* prefetch_write with PREFETCHW (simd/x86/prefetch_x86.c): for CPUs with the PRFCHW cpuid bit
 * only, which the context checks. */
void dma_x86_prefetch_write(const void *p, int64_t bytes);
#endif
#if defined(DMATTN_HAVE_AVX512)
extern const dma_kernels dma_kernels_avx512;
/* The AVX512_BF16 members (pack_k_bf16, scores_bf16) the context adds to the AVX-512 table
 * when the CPU has that extension. */
void dma_avx512_pack_k_bf16(uint16_t *kp, const uint16_t *base, int64_t ld, const int32_t *keys,
                            int32_t first, int n, int D);
void dma_avx512_scores_bf16(float *s, int lds, const uint16_t *q, int ldq, int m,
                            const uint16_t *kp, int n, int D, float scale);
#endif
#if defined(DMATTN_HAVE_NEON)
extern const dma_kernels dma_kernels_neon;
#endif

#endif /* DMATTN_KERNELS_H */

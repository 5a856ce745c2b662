/*
 * kernels_avx512.c - the inner kernels for x86-64 AVX-512 (F, BW, VL, DQ) + FMA (layouts and exact
 * semantics in lib/kernels.h; lib/kernels_scalar.c is the readable reference). The structure
 * mirrors simd/x86/avx2/kernels_avx2.c with 16-float vectors, 32 registers and mask registers.
 *
 * Register blocking (32 zmm registers):
 *   scores    MR x NR = 8 query rows x 32 keys: 16 accumulators, 2 loads of the packed K block
 *             and 8 broadcasts of Q per step of the reduction over D (any D). MR = 8 divides the
 *             64-row tiles of the sparsity object, so a tile has no short row block. A call may
 *             end half way into a block (select_step 16: the backward's blocks of rows end
 *             there); that half takes 8 accumulators.
 *   accum_pv  8 rows x 32 floats of D: 16 accumulators, 2 loads of a V row and 8 broadcasts of P
 *             per key; D is rounded up to 16 (rows are zero-padded to ld, a multiple of 16) and a
 *             last block of 16 floats takes 8 accumulators. Up to 6 rows (PV_ROWS, the block
 *             the backward's dQ asks for) it runs 64 floats of D at a time: 24 accumulators,
 *             4 loads and 6 broadcasts per key.
 *   accum_tn  6 rows of o (keys) x 64 floats of D: 24 accumulators, 4 loads of an x row and 6
 *             broadcasts of P per query row (10 loads per 24 FMAs, against 10 per 16 for the
 *             8 x 32 block; measured 13% faster on a Xeon). It runs over all the keys of a
 *             call, 6 at a time, so the block of x the caller keeps in L1 serves every block of
 *             keys.
 * scores_select is scores with softmax_row's first pass (bias, selection, row max) applied to
 *             each 8 x 32 block while it is in registers; calls start and end at 16 keys (a half
 *             block, 8 accumulators) so that a block of rows computes its columns to 16 keys.
 * softmax_row / grad_row run 16 lanes at a time with the same exp and tanh as the AVX2 file
 * (bitwise the same results per lane); the selection of 16 positions is 16 bits of the row's
 * bitmask, used directly as a __mmask16. Only words holding a bit of [lo, hi) are read.
 * Everything is single-threaded and runs in a fixed order: results are deterministic.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "../x86_shared.h"

#define NR 32
#define MR 8
#define TK 6      /* keys per register block of accum_tn */
#define PV_ROWS 6 /* rows up to which accum_pv runs 64 floats of D at a time */
#define VW 16 /* floats per vector */


/* ------------------------------------------------------------------------------------------ */
/* Vector math                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* exp(x) for x <= 88, ~1 ulp (Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and the Cephes
 * polynomial). Results below FLT_MIN (x < ln(FLT_MIN)) flush to 0, an absolute error under
 * 1.2e-38, so exp(-inf) = 0; NaN stays NaN. n is rounded by adding 1.5 * 2^23 + 127, which
 * leaves n + 127 in the low mantissa bits: shifted left by 23 they are the exponent of 2^n. */
INLINE __m512 exp16(__m512 x)
{
    const __m512 magic = _mm512_set1_ps(12583039.0f); /* 1.5 * 2^23 + 127 */
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
    __m512 n = _mm512_sub_ps(t, magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23)));
    /* x < ln(FLT_MIN) (also -inf, whose r is NaN): 0. NaN is "not less" and stays NaN. */
    __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654475f), _CMP_NLT_UQ);
    return _mm512_maskz_mov_ps(keep, y);
}

/* tanh(x), ~2 ulp; NaN stays NaN. */
INLINE __m512 tanh16(__m512 x)
{
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512 ax = _mm512_andnot_ps(sign, x);
    /* |x| < 0.625: x + x^3 P(x^2) */
    __m512 z = _mm512_mul_ps(x, x);
    __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
    __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
    /* otherwise: 1 - 2 / (exp(2|x|) + 1), |x| clamped to 10 (tanh(10) rounds to 1); min with
     * the NaN second keeps a NaN */
    __m512 a10 = _mm512_min_ps(_mm512_set1_ps(10.0f), ax);
    __m512 e = exp16(_mm512_add_ps(a10, a10));
    __m512 big = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                               _mm512_div_ps(_mm512_set1_ps(2.0f),
                                             _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
    big = _mm512_or_ps(big, _mm512_and_ps(sign, x));
    __mmask16 use_small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
    return _mm512_mask_blend_ps(use_small, big, small);
}

/* Lanes of the 16 positions from c that exist (c < n). */
INLINE __mmask16 live_lanes(int c, int n)
{
    return n - c >= VW ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1u);
}

/* ------------------------------------------------------------------------------------------ */
/* Packing (simd/x86/x86_shared.h), in blocks of NR keys                                      */
/* ------------------------------------------------------------------------------------------ */

static void pack_k(float *kp, const float *base, int64_t ld, const int32_t *keys, int32_t first,
                   int n, int D)
{
    pack_k_blocks(kp, base, ld, keys, first, n, D, NR);
}

static void pack_v(float *vp, int ldv, const float *base, int64_t ld, const int32_t *keys,
                   int32_t first, int n, int D)
{
    pack_rows(vp, ldv, base, ld, keys, first, n, D);
}

/* ------------------------------------------------------------------------------------------ */
/* scores: S = Q K^T                                                                          */
/* ------------------------------------------------------------------------------------------ */

/* acc[r][0..1] = the scores of M (compile-time after inlining) rows against the NR keys of the
 * packed block at panel. */
INLINE void block_scores(__m512 acc[MR][2], const float *const *qr, const float *panel, int D,
                         const int M)
{
#pragma GCC unroll 16
    for (int r = 0; r < M; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        __m512 b0 = _mm512_loadu_ps(panel + (int64_t)d * NR);
        __m512 b1 = _mm512_loadu_ps(panel + (int64_t)d * NR + VW);
#pragma GCC unroll 16
        for (int r = 0; r < M; r++) {
            __m512 a = _mm512_set1_ps(qr[r][d]);
            acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
        }
    }
}

/* acc[r] = the scores of M rows against the 16 keys of half `half` (0 or 1) of the packed
 * block at panel: the same sums, in the same order, as block_scores' acc[r][half]. */
INLINE void half_scores(__m512 acc[MR], const float *const *qr, const float *panel, int half,
                        int D, const int M)
{
#pragma GCC unroll 16
    for (int r = 0; r < M; r++)
        acc[r] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        __m512 b = _mm512_loadu_ps(panel + (int64_t)d * NR + half * VW);
#pragma GCC unroll 16
        for (int r = 0; r < M; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d]), b, acc[r]);
    }
}

/* M rows x all n keys (n a multiple of 16): whole blocks, then half a block if one is left. */
INLINE void scores_rows(float *s, int lds, const float *q, int ldq, const float *kp, int n,
                        int D, const int M)
{
    const float *qr[MR];
#pragma GCC unroll 16
    for (int r = 0; r < M; r++)
        qr[r] = q + (int64_t)r * ldq;
    int c0 = 0;
    for (; c0 + NR <= n; c0 += NR) {
        __m512 acc[MR][2];
        block_scores(acc, qr, kp + (int64_t)c0 * D, D, M);
#pragma GCC unroll 16
        for (int r = 0; r < M; r++) {
            _mm512_storeu_ps(s + (int64_t)r * lds + c0, acc[r][0]);
            _mm512_storeu_ps(s + (int64_t)r * lds + c0 + VW, acc[r][1]);
        }
    }
    if (c0 < n) {
        __m512 acc[MR];
        half_scores(acc, qr, kp + (int64_t)c0 * D, 0, D, M);
#pragma GCC unroll 16
        for (int r = 0; r < M; r++)
            _mm512_storeu_ps(s + (int64_t)r * lds + c0, acc[r]);
    }
}

#define SCORES_M(M)                                                                            \
    static void scores_##M(float *s, int lds, const float *q, int ldq, const float *kp, int n, \
                           int D)                                                              \
    {                                                                                          \
        scores_rows(s, lds, q, ldq, kp, n, D, M);                                              \
    }
SCORES_M(1)
SCORES_M(2)
SCORES_M(3)
SCORES_M(4)
SCORES_M(5)
SCORES_M(6)
SCORES_M(7)
SCORES_M(8)

static void scores(float *s, int lds, const float *q, int ldq, int m, const float *kp, int n,
                   int D)
{
    switch (m) {
    case 1: scores_1(s, lds, q, ldq, kp, n, D); break;
    case 2: scores_2(s, lds, q, ldq, kp, n, D); break;
    case 3: scores_3(s, lds, q, ldq, kp, n, D); break;
    case 4: scores_4(s, lds, q, ldq, kp, n, D); break;
    case 5: scores_5(s, lds, q, ldq, kp, n, D); break;
    case 6: scores_6(s, lds, q, ldq, kp, n, D); break;
    case 7: scores_7(s, lds, q, ldq, kp, n, D); break;
    case 8: scores_8(s, lds, q, ldq, kp, n, D); break;
    default: break;
    }
}

/* softmax_row's pass 1 on the 16 scores x of row r at call position c (a multiple of 16): the
 * bias added, -inf where the row does not select, the running max (NaN skipped, positions
 * ascending as in softmax_row), stored. sel holds the row's selection of the 64 positions from
 * c & ~63, refreshed at each multiple of 64. */
INLINE void select16(float *srow, int c, __m512 x, const float *bias, const uint64_t *bits,
                     int bit0, int lo, int hi, uint64_t *sel, __m512 *vmax)
{
    if ((c & 63) == 0)
        *sel = sel_bits(bits, bit0, c, lo, hi);
    if (bias)
        x = _mm512_add_ps(x, _mm512_loadu_ps(bias + c));
    x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), (__mmask16)(*sel >> (c & 63)), x);
    *vmax = _mm512_max_ps(x, *vmax);
    _mm512_storeu_ps(srow + c, x);
}

/* Scores of M rows against 16 keys, half `half` (0 or 1) of the packed block at panel, then
 * select16: the ends of a call that do not fill a block. */
INLINE void select_half(float *s, int lds, const float *const *qr, const float *panel, int half,
                        int c, int D, const float *const *bias, const uint64_t *const *bits,
                        int bit0, const int *lo, const int *hi, uint64_t *sel, __m512 *vmax,
                        const int M)
{
    __m512 acc[MR];
    half_scores(acc, qr, panel, half, D, M);
#pragma GCC unroll 16
    for (int r = 0; r < M; r++)
        select16(s + (int64_t)r * lds, c, acc[r], bias[r], bits[r], bit0, lo[r], hi[r], &sel[r],
                 &vmax[r]);
}

/* scores_rows with softmax_row's first pass in its epilogue, while the block is in registers.
 * The call starts `off` (0 or 16) keys into the block at kp and covers n (a multiple of 16)
 * keys: a half block first if off is 16, whole blocks, a half block last if one is left. */
INLINE void scores_select_rows(float *s, int lds, const float *q, int ldq, const float *kp,
                               int off, int n, int D, const float *const *bias,
                               const uint64_t *const *bits, int bit0, const int *lo,
                               const int *hi, float *rowmax, const int M)
{
    const float *qr[MR];
    __m512 vmax[MR];
    uint64_t sel[MR] = {0};
#pragma GCC unroll 16
    for (int r = 0; r < M; r++) {
        qr[r] = q + (int64_t)r * ldq;
        vmax[r] = _mm512_set1_ps(-INFINITY);
    }
    const float *panel = kp;
    int c = 0;
    if (off && n > 0) {
        select_half(s, lds, qr, panel, 1, c, D, bias, bits, bit0, lo, hi, sel, vmax, M);
        c += VW;
        panel += (int64_t)NR * D;
    }
    for (; c + NR <= n; c += NR, panel += (int64_t)NR * D) {
        __m512 acc[MR][2];
        block_scores(acc, qr, panel, D, M);
#pragma GCC unroll 16
        for (int r = 0; r < M; r++) {
            float *srow = s + (int64_t)r * lds;
            select16(srow, c, acc[r][0], bias[r], bits[r], bit0, lo[r], hi[r], &sel[r], &vmax[r]);
            select16(srow, c + VW, acc[r][1], bias[r], bits[r], bit0, lo[r], hi[r], &sel[r],
                     &vmax[r]);
        }
    }
    if (c < n)
        select_half(s, lds, qr, panel, 0, c, D, bias, bits, bit0, lo, hi, sel, vmax, M);
#pragma GCC unroll 16
    for (int r = 0; r < M; r++)
        rowmax[r] = _mm512_reduce_max_ps(vmax[r]);
}

#define SCORES_SELECT_M(M)                                                                     \
    static void scores_select_##M(float *s, int lds, const float *q, int ldq, const float *kp, \
                                  int off, int n, int D, const float *const *bias,             \
                                  const uint64_t *const *bits, int bit0, const int *lo,        \
                                  const int *hi, float *rowmax)                                \
    {                                                                                          \
        scores_select_rows(s, lds, q, ldq, kp, off, n, D, bias, bits, bit0, lo, hi, rowmax,    \
                           M);                                                                 \
    }
SCORES_SELECT_M(1)
SCORES_SELECT_M(2)
SCORES_SELECT_M(3)
SCORES_SELECT_M(4)
SCORES_SELECT_M(5)
SCORES_SELECT_M(6)
SCORES_SELECT_M(7)
SCORES_SELECT_M(8)

static void scores_select(float *s, int lds, const float *q, int ldq, int m, const float *kp,
                          int off, int n, int D, const float *const *bias,
                          const uint64_t *const *bits, int bit0, const int *lo, const int *hi,
                          float *rowmax)
{
    switch (m) {
    case 1: scores_select_1(s, lds, q, ldq, kp, off, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 2: scores_select_2(s, lds, q, ldq, kp, off, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 3: scores_select_3(s, lds, q, ldq, kp, off, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 4: scores_select_4(s, lds, q, ldq, kp, off, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 5: scores_select_5(s, lds, q, ldq, kp, off, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 6: scores_select_6(s, lds, q, ldq, kp, off, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 7: scores_select_7(s, lds, q, ldq, kp, off, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 8: scores_select_8(s, lds, q, ldq, kp, off, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    default: break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* accum_pv: O = alpha O + P V;  accum_tn: O += P^T X                                          */
/* ------------------------------------------------------------------------------------------ */

/* Rows r < M of o, NV * 16 floats (NV <= 4) from column d0:
 *   o[r][d] = (fresh ? 0 : (alpha ? alpha[r] : 1) * o[r][d]) + sum_{c < n} w(r, c) * x[c][d],
 * where w(r, c) = w[r * wr + c * wc] (accum_pv: wr = ldp, wc = 1; accum_tn: wr = 1, wc = ldp). */
INLINE void rank_block(float *o, int ldo, const float *alpha, const float *w, int64_t wr,
                       int64_t wc, const float *x, int ldx, int n, int d0, const int M,
                       const int NV, int fresh)
{
    __m512 acc[MR][4]; /* M * NV <= 24: 8 x 2, or 6 x 4 (accum_tn, and accum_pv up to 6 rows) */
#pragma GCC unroll 16
    for (int r = 0; r < M; r++) {
        const float *orow = o + (int64_t)r * ldo + d0;
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            acc[r][v] = fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(orow + v * VW);
            if (alpha && !fresh)
                acc[r][v] = _mm512_mul_ps(acc[r][v], _mm512_set1_ps(alpha[r]));
        }
    }
    const float *xc = x + d0;
    const float *wcol = w;
    for (int c = 0; c < n; c++, xc += ldx, wcol += wc) {
        __m512 xv[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            xv[v] = _mm512_loadu_ps(xc + v * VW);
#pragma GCC unroll 16
        for (int r = 0; r < M; r++) {
            __m512 a = _mm512_set1_ps(wcol[r * wr]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++)
                acc[r][v] = _mm512_fmadd_ps(a, xv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < M; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            _mm512_storeu_ps(o + (int64_t)r * ldo + d0 + v * VW, acc[r][v]);
}

/* D rounded up to 16 (the padding columns are zeros in and zeros out), in blocks of up to
 * NVMAX vectors. */
INLINE void rank_update(float *o, int ldo, const float *alpha, const float *w, int64_t wr,
                        int64_t wc, const float *x, int ldx, int n, int D, const int M,
                        const int NVMAX, int fresh)
{
    const int nv16 = (D + 15) / VW; /* vectors of 16 floats */
    for (int v0 = 0; v0 < nv16; v0 += NVMAX) {
        const int nv = nv16 - v0 < NVMAX ? nv16 - v0 : NVMAX, d0 = v0 * VW;
        if (NVMAX >= 4 && nv == 4)
            rank_block(o, ldo, alpha, w, wr, wc, x, ldx, n, d0, M, 4, fresh);
        else if (NVMAX >= 3 && nv == 3)
            rank_block(o, ldo, alpha, w, wr, wc, x, ldx, n, d0, M, 3, fresh);
        else if (nv == 2)
            rank_block(o, ldo, alpha, w, wr, wc, x, ldx, n, d0, M, 2, fresh);
        else
            rank_block(o, ldo, alpha, w, wr, wc, x, ldx, n, d0, M, 1, fresh);
    }
}

#define PV_M(M)                                                                                \
    static void pv_##M(float *o, int ldo, const float *alpha, const float *p, int ldp,          \
                       const float *vp, int ldv, int n, int D)                                 \
    {                                                                                          \
        rank_update(o, ldo, alpha, p, ldp, 1, vp, ldv, n, D, M, M <= PV_ROWS ? 4 : 2, 0);      \
    }
PV_M(1)
PV_M(2)
PV_M(3)
PV_M(4)
PV_M(5)
PV_M(6)
PV_M(7)
PV_M(8)

/* M keys of accum_tn over all k rows, 64 floats of D at a time. */
#define TN_M(M)                                                                                \
    static void tn_##M(float *o, int ldo, const float *p, int ldp, const float *x, int ldx,     \
                       int k, int D, int overwrite)                                            \
    {                                                                                          \
        rank_update(o, ldo, NULL, p, 1, ldp, x, ldx, k, D, M, 4, overwrite);                   \
    }
TN_M(1)
TN_M(2)
TN_M(3)
TN_M(4)
TN_M(5)
TN_M(6)

static void accum_pv(float *o, int ldo, const float *alpha, const float *p, int ldp, int m,
                     const float *vp, int ldv, int n, int D)
{
    switch (m) {
    case 1: pv_1(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 2: pv_2(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 3: pv_3(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 4: pv_4(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 5: pv_5(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 6: pv_6(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 7: pv_7(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 8: pv_8(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    default: break;
    }
}

/* All m keys, TK at a time: the caller's block of x stays in L1 for every block of keys. */
static void accum_tn(float *o, int ldo, const float *p, int ldp, int m, const float *x, int ldx,
                     int k, int D, int overwrite)
{
    int c = 0;
    for (; c + TK <= m; c += TK)
        tn_6(o + (int64_t)c * ldo, ldo, p + c, ldp, x, ldx, k, D, overwrite);
    o += (int64_t)c * ldo;
    p += c;
    switch (m - c) {
    case 1: tn_1(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 2: tn_2(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 3: tn_3(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 4: tn_4(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 5: tn_5(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    default: break;
    }
}

/* add_rows of lib/kernels.h: 16 floats per add, the tail under a mask. */
static void add_rows(float *const *dst, const float *const *src, int m, int n)
{
    for (int j = 0; j < m; j++) {
        float *o = dst[j];
        const float *x = src[j];
        int i = 0;
        for (; i + VW <= n; i += VW)
            _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_loadu_ps(o + i), _mm512_loadu_ps(x + i)));
        if (i < n) {
            const __mmask16 live = (__mmask16)((1u << (n - i)) - 1u);
            _mm512_mask_storeu_ps(o + i, live, _mm512_add_ps(_mm512_maskz_loadu_ps(live, o + i),
                                                             _mm512_maskz_loadu_ps(live, x + i)));
        }
    }
}

/* scale_row of lib/kernels.h: 16 floats per multiply, the tail under a mask. */
static int scale_row(float *dst, const float *src, float s, int n)
{
    const __m512 vs = _mm512_set1_ps(s);
    __mmask16 nan = 0;
    int i = 0;
    for (; i + VW <= n; i += VW) {
        __m512 y = _mm512_mul_ps(_mm512_loadu_ps(src + i), vs);
        _mm512_storeu_ps(dst + i, y);
        nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    }
    if (i < n) {
        const __mmask16 live = (__mmask16)((1u << (n - i)) - 1u);
        __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, src + i), vs);
        _mm512_mask_storeu_ps(dst + i, live, y);
        nan |= _mm512_mask_cmp_ps_mask(live, y, y, _CMP_UNORD_Q);
    }
    return nan != 0;
}

/* ------------------------------------------------------------------------------------------ */
/* softmax_row                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* softmax_row's second pass, over a chunk its first pass (softmax_impl or scores_select) left
 * -inf where not selected: p = exp(x - m_new). */
static float softmax_exp(float *s, int n, float chunk_max, float *m, float *l)
{
    float m_new = chunk_max > *m ? chunk_max : *m;
    if (m_new == -INFINITY) {
        /* Rare: no selected logit above -inf so far. The max skipped NaN, so look for a
         * selected NaN logit (the only NaN s can hold): it makes the row NaN, carried by
         * m_new = NaN into alpha, p, *l and *m (the vector exp keeps NaN). */
        __mmask16 nan = 0;
        for (int c = 0; c < n; c += VW) {
            __m512 x = _mm512_maskz_loadu_ps(live_lanes(c, n), s + c);
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        }
        if (!nan) {
            memset(s, 0, sizeof(float) * (size_t)n);
            return 1.0f;
        }
        m_new = NAN;
    }
    float alpha = _mm512_cvtss_f32(exp16(_mm512_set1_ps(*m - m_new)));
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps();
    for (int c = 0; c < n; c += VW) {
        __mmask16 live = live_lanes(c, n);
        __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + c), vm));
        vsum = _mm512_add_ps(vsum, p);
        _mm512_mask_storeu_ps(s + c, live, p);
    }
    *l = *l * alpha + _mm512_reduce_add_ps(vsum);
    *m = m_new;
    return alpha;
}

/* n is a multiple of 8 (of NR, in fact) and at most DMA_CHUNK_MAX; a last group of fewer than 16
 * positions is handled with masked loads and stores. */
INLINE float softmax_impl(float *s, int n, const float *bias, const uint64_t *bits, int bit0,
                          int lo, int hi, float softcap, float *m, float *l, const int CAP)
{
    const __m512 ninf = _mm512_set1_ps(-INFINITY), cap = _mm512_set1_ps(softcap);
    __m512 vmax = ninf;
    /* Pass 1: logits of the selected positions, -inf elsewhere; their max. */
    for (int c64 = 0; c64 < n; c64 += 64) {
        uint64_t sb = sel_bits(bits, bit0, c64, lo, hi);
        int end = n - c64 < 64 ? n : c64 + 64;
        for (int c = c64; c < end; c += VW, sb >>= VW) {
            __mmask16 live = live_lanes(c, n), k = (__mmask16)(sb & 0xFFFF);
            if (!k) {
                _mm512_mask_storeu_ps(s + c, live, ninf);
                continue;
            }
            __m512 x = _mm512_maskz_loadu_ps(live, s + c);
            if (CAP)
                x = _mm512_mul_ps(cap, tanh16(_mm512_div_ps(x, cap)));
            if (bias)
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(live, bias + c));
            x = _mm512_mask_mov_ps(ninf, k, x);
            /* a NaN x is skipped (max_ps returns its second operand, the running max, when
             * either is NaN), as in the scalar code; pass 2 turns it into a NaN p (exp16 keeps
             * NaN), and softmax_exp's rare branch a chunk of only NaN or -inf logits */
            vmax = _mm512_max_ps(x, vmax);
            _mm512_mask_storeu_ps(s + c, live, x);
        }
    }
    /* pass 1 left -inf at every unselected position: softmax_exp is pass 2 (vmax holds no
     * NaN) */
    return softmax_exp(s, n, _mm512_reduce_max_ps(vmax), m, l);
}


static float softmax_row(float *s, int n, const float *bias, const uint64_t *bits, int bit0,
                         int lo, int hi, float softcap, float *m, float *l)
{
    if (softcap > 0.0f)
        return softmax_impl(s, n, bias, bits, bit0, lo, hi, softcap, m, l, 1);
    return softmax_impl(s, n, bias, bits, bit0, lo, hi, softcap, m, l, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* grad_row (backward)                                                                        */
/* ------------------------------------------------------------------------------------------ */

INLINE void grad_impl(float *s, float *dp, int n, const float *bias, const uint64_t *bits,
                      int bit0, int lo, int hi, float softcap, float lse, float delta,
                      float *dx_sum, const int CAP)
{
    const __m512 zero = _mm512_setzero_ps(), cap = _mm512_set1_ps(softcap);
    const __m512 vlse = _mm512_set1_ps(lse), vdelta = _mm512_set1_ps(delta);
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int c64 = 0; c64 < n; c64 += 64) {
        uint64_t sb = lse == -INFINITY ? 0 : sel_bits(bits, bit0, c64, lo, hi);
        int end = n - c64 < 64 ? n : c64 + 64;
        for (int c = c64; c < end; c += VW, sb >>= VW) {
            __mmask16 live = live_lanes(c, n), k = (__mmask16)(sb & 0xFFFF);
            if (!k) {
                _mm512_mask_storeu_ps(s + c, live, zero);
                _mm512_mask_storeu_ps(dp + c, live, zero);
                continue;
            }
            __m512 t = _mm512_maskz_loadu_ps(live, s + c);
            if (CAP)
                t = _mm512_mul_ps(cap, tanh16(_mm512_div_ps(t, cap)));
            __m512 x = bias ? _mm512_add_ps(t, _mm512_maskz_loadu_ps(live, bias + c)) : t;
            /* x - lse <= 0 for a consistent lse; the clamp only keeps exp16 in its range. min_ps
             * returns its second operand when either is NaN: a NaN lse or logit gives p = NaN. */
            __m512 p = exp16(_mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_sub_ps(x, vlse)));
            __m512 dx = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(live, dp + c), vdelta));
            __m512 ds = dx;
            if (CAP) {
                __m512 u = _mm512_div_ps(t, cap);
                ds = _mm512_mul_ps(dx, _mm512_fnmadd_ps(u, u, one));
            }
            if (dx_sum)
                _mm512_mask_storeu_ps(dx_sum + c, k,
                                      _mm512_add_ps(_mm512_maskz_loadu_ps(k, dx_sum + c), dx));
            _mm512_mask_storeu_ps(s + c, live, _mm512_maskz_mov_ps(k, p));
            _mm512_mask_storeu_ps(dp + c, live, _mm512_maskz_mov_ps(k, ds));
        }
    }
}

static void grad_row(float *s, float *dp, int n, const float *bias, const uint64_t *bits,
                     int bit0, int lo, int hi, float softcap, float lse, float delta,
                     float *dx_sum)
{
    if (softcap > 0.0f)
        grad_impl(s, dp, n, bias, bits, bit0, lo, hi, softcap, lse, delta, dx_sum, 1);
    else
        grad_impl(s, dp, n, bias, bits, bit0, lo, hi, softcap, lse, delta, dx_sum, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Half precision: AVX512F conversions for binary16; bf16 by integer rounding (AVX512_BF16's   */
/* VCVTNEPS2BF16 flushes subnormals, unlike the scalar rule); tails are masked                 */
/* ------------------------------------------------------------------------------------------ */

INLINE __m512 half16_to_f32(__m256i h, int f16)
{
    return f16 ? _mm512_cvtph_ps(h)
               : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* bf16: round to nearest even on the bits, NaN -> (bits >> 16) | 0x40, as the scalar code.
 * binary16: VCVTPS2PH rounds by the immediate (nearest even; MXCSR ignored), gives subnormals
 * and turns NaN into the quiet NaN with the top payload bits: the scalar rule. */
INLINE __m256i half16_from_f32(__m512 f, int f16)
{
    if (f16)
        return _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
    const __m512i x = _mm512_castps_si512(f);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r); /* lanes are <= 0xffff: truncation is exact */
}

static void to_f32(float *dst, const uint16_t *src, int64_t n, int f16)
{
    int64_t i = 0;
    for (; i + VW <= n; i += VW)
        _mm512_storeu_ps(dst + i,
                         half16_to_f32(_mm256_loadu_si256((const __m256i *)(src + i)), f16));
    if (i < n) {
        __mmask16 live = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(dst + i, live,
                              half16_to_f32(_mm256_maskz_loadu_epi16(live, src + i), f16));
    }
}

static void pack_k_half(float *kp, const uint16_t *base, int64_t ld, const int32_t *keys,
                        int32_t first, int n, int D, int f16)
{
    pack_k_blocks_half(kp, base, ld, keys, first, n, D, NR, f16, to_f32);
}

static void from_f32(uint16_t *dst, const float *src, int64_t n, int f16)
{
    int64_t i = 0;
    for (; i + VW <= n; i += VW)
        _mm256_storeu_si256((__m256i *)(dst + i), half16_from_f32(_mm512_loadu_ps(src + i), f16));
    if (i < n) {
        __mmask16 live = (__mmask16)((1u << (n - i)) - 1u);
        _mm256_mask_storeu_epi16(dst + i, live,
                                 half16_from_f32(_mm512_maskz_loadu_ps(live, src + i), f16));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* bf16 dot products (AVX512_BF16; the context adds them to the table when the CPU has it)     */
/* ------------------------------------------------------------------------------------------ */

/* A pair of bf16 dimensions is one 32-bit word, so the pair panel is pack_k's transposed panel
 * of D / 2 words per key. */
void dma_avx512_pack_k_bf16(uint16_t *kp, const uint16_t *base, int64_t ld, const int32_t *keys,
                            int32_t first, int n, int D)
{
    pack_k_blocks((float *)kp, (const float *)base, ld / 2, keys, first, n, D / 2, NR);
}

/* M rows x all n keys: per pair of dimensions, the pair (q[d], q[d+1]) of each row broadcast
 * against 16 keys' pairs per vector. */
__attribute__((target("avx512f,avx512bf16"), always_inline)) static inline void
scores_rows_bf16(float *s, int lds, const uint16_t *q, int ldq, const uint16_t *kp, int n,
                 int D, float scale, const int M)
{
    const __m512 sc = _mm512_set1_ps(scale);
    for (int c0 = 0; c0 < n; c0 += NR) {
        const uint16_t *panel = kp + (int64_t)c0 * D;
        __m512 acc[MR][2];
#pragma GCC unroll 16
        for (int r = 0; r < M; r++)
            acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 2) {
            const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + (int64_t)d * NR);
            const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + (int64_t)d * NR + 2 * VW);
#pragma GCC unroll 16
            for (int r = 0; r < M; r++) {
                uint32_t pair;
                memcpy(&pair, q + (int64_t)r * ldq + d, sizeof pair);
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
            }
        }
#pragma GCC unroll 16
        for (int r = 0; r < M; r++) {
            _mm512_storeu_ps(s + (int64_t)r * lds + c0, _mm512_mul_ps(sc, acc[r][0]));
            _mm512_storeu_ps(s + (int64_t)r * lds + c0 + VW, _mm512_mul_ps(sc, acc[r][1]));
        }
    }
}

#define SCORES_BF16_M(M)                                                                       \
    __attribute__((target("avx512f,avx512bf16"))) static void scores_bf16_##M(                 \
        float *s, int lds, const uint16_t *q, int ldq, const uint16_t *kp, int n, int D,       \
        float scale)                                                                           \
    {                                                                                          \
        scores_rows_bf16(s, lds, q, ldq, kp, n, D, scale, M);                                  \
    }
SCORES_BF16_M(1)
SCORES_BF16_M(2)
SCORES_BF16_M(3)
SCORES_BF16_M(4)
SCORES_BF16_M(5)
SCORES_BF16_M(6)
SCORES_BF16_M(7)
SCORES_BF16_M(8)

void dma_avx512_scores_bf16(float *s, int lds, const uint16_t *q, int ldq, int m,
                            const uint16_t *kp, int n, int D, float scale)
{
    switch (m) {
    case 1: scores_bf16_1(s, lds, q, ldq, kp, n, D, scale); break;
    case 2: scores_bf16_2(s, lds, q, ldq, kp, n, D, scale); break;
    case 3: scores_bf16_3(s, lds, q, ldq, kp, n, D, scale); break;
    case 4: scores_bf16_4(s, lds, q, ldq, kp, n, D, scale); break;
    case 5: scores_bf16_5(s, lds, q, ldq, kp, n, D, scale); break;
    case 6: scores_bf16_6(s, lds, q, ldq, kp, n, D, scale); break;
    case 7: scores_bf16_7(s, lds, q, ldq, kp, n, D, scale); break;
    case 8: scores_bf16_8(s, lds, q, ldq, kp, n, D, scale); break;
    default: break;
    }
}

const dma_kernels dma_kernels_avx512 = {
    .name = "avx512",
    .mr = MR,
    .nr = NR,
    .select_step = VW,
    .pv_rows = PV_ROWS,
    .tn_rows = 64,
    .pack_k = pack_k,
    .pack_v = pack_v,
    .scores = scores,
    .softmax_row = softmax_row,
    .accum_pv = accum_pv,
    .grad_row = grad_row,
    .accum_tn = accum_tn,
    .add_rows = add_rows,
    .scale_row = scale_row,
    .prefetch_write = dma_prefetch_write,
    .to_f32 = to_f32,
    .from_f32 = from_f32,
    .pack_k_half = pack_k_half,
    .dots = dots,
    .scores_select = scores_select,
    .softmax_exp = softmax_exp,
};

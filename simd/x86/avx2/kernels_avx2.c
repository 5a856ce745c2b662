/*
 * kernels_avx2.c - the inner kernels for x86-64 AVX2 + FMA (layouts and exact semantics in
 * lib/kernels.h; lib/kernels_scalar.c is the readable reference).
 *
 * Register blocking (16 ymm registers):
 *   scores    MR x NR = 6 query rows x 16 keys: 12 accumulators, 2 loads of the packed K block
 *             and 6 broadcasts of Q per step of the reduction over D (any D: the reduction is
 *             over scalars, the vectors run along keys).
 *   accum_pv  6 rows x 16 floats of D: 12 accumulators, 2 loads of a V row and 6 broadcasts of
 *             P per key. D is rounded up to 16 (rows are zero-padded to ld, a multiple of 16).
 *   accum_tn  the same shape, 6 rows of o (keys) x 16 floats of D per query row, over all the
 *             keys of a call 6 at a time.
 * scores_select is scores with softmax_row's first pass (bias, selection, row max) applied to
 *             each 6 x 16 block while it is in registers (the rows' running maxima in L1).
 * softmax_row / grad_row run on 8 lanes (two vectors per step in softmax_row) with a vectorised
 * exp (Cody-Waite range reduction + the Cephes polynomial, < 1 ulp) and tanh (odd polynomial
 * near 0, 1 - 2/(e^2x + 1) elsewhere). The row's selection is read 64 positions at a time from
 * the bitmask (only words that hold a bit of [lo, hi) are read) and expanded 8 bits at a time to
 * a lane mask. Packing prefetches the next block's key rows (sparse gathers defeat the hardware
 * prefetcher).
 * Everything is single-threaded and runs in a fixed order: results are deterministic.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "../x86_shared.h"

#define NR 16
#define MR 6
#define VW 8 /* floats per vector */


/* ------------------------------------------------------------------------------------------ */
/* Vector math                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* exp(x) for x <= 88, ~1 ulp (Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and the Cephes
 * polynomial). Results below FLT_MIN (x < ln(FLT_MIN)) flush to 0, an absolute error under
 * 1.2e-38, so exp(-inf) = 0; NaN stays NaN. n is rounded by adding 1.5 * 2^23 + 127, which
 * leaves n + 127 in the low mantissa bits: shifted left by 23 they are the exponent of 2^n. */
INLINE __m256 exp8(__m256 x)
{
    const __m256 magic = _mm256_set1_ps(12583039.0f); /* 1.5 * 2^23 + 127 */
    __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
    __m256 n = _mm256_sub_ps(t, magic); /* round(x / ln2) + 127 - 127 */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
    /* x < ln(FLT_MIN) (also -inf, whose r is NaN): 0. A NaN x compares false and stays NaN. */
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.33654475f), _CMP_LT_OQ), y);
}

/* tanh(x), ~2 ulp; NaN stays NaN. */
INLINE __m256 tanh8(__m256 x)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 ax = _mm256_andnot_ps(sign, x);
    /* |x| < 0.625: x + x^3 P(x^2) */
    __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    /* otherwise: 1 - 2 / (exp(2|x|) + 1), |x| clamped to 10 (tanh(10) rounds to 1) */
    __m256 e = exp8(_mm256_add_ps(_mm256_min_ps(_mm256_set1_ps(10.0f), ax),
                                  _mm256_min_ps(_mm256_set1_ps(10.0f), ax)));
    __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                               _mm256_div_ps(_mm256_set1_ps(2.0f),
                                             _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
    big = _mm256_or_ps(big, _mm256_and_ps(sign, x));
    return _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}

INLINE float hmax8(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Lane j of the result is all ones iff bit j of `byte` is set. */
INLINE __m256 lane_mask8(unsigned byte)
{
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i v = _mm256_and_si256(_mm256_set1_epi32((int)byte), bit);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, bit));
}

/* Lane j of the result has its sign bit set iff bit j of `byte` is set (the other bits are
 * the byte's higher bits): enough for blendv, one shift cheaper than lane_mask8. */
INLINE __m256 lane_sign8(unsigned byte)
{
    const __m256i shift = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    return _mm256_castsi256_ps(_mm256_sllv_epi32(_mm256_set1_epi32((int)byte), shift));
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
INLINE void block_scores(__m256 acc[MR][2], const float *const *qr, const float *panel, int D,
                         const int M)
{
#pragma GCC unroll 8
    for (int r = 0; r < M; r++)
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int d = 0; d < D; d++) {
        __m256 b0 = _mm256_loadu_ps(panel + (int64_t)d * NR);
        __m256 b1 = _mm256_loadu_ps(panel + (int64_t)d * NR + VW);
#pragma GCC unroll 8
        for (int r = 0; r < M; r++) {
            __m256 a = _mm256_broadcast_ss(qr[r] + d);
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
    }
}

/* M rows x all n keys. */
INLINE void scores_rows(float *s, int lds, const float *q, int ldq, const float *kp, int n,
                        int D, const int M)
{
    const float *qr[MR];
#pragma GCC unroll 8
    for (int r = 0; r < M; r++)
        qr[r] = q + (int64_t)r * ldq;
    for (int c0 = 0; c0 < n; c0 += NR) {
        __m256 acc[MR][2];
        block_scores(acc, qr, kp + (int64_t)c0 * D, D, M);
#pragma GCC unroll 8
        for (int r = 0; r < M; r++) {
            _mm256_storeu_ps(s + (int64_t)r * lds + c0, acc[r][0]);
            _mm256_storeu_ps(s + (int64_t)r * lds + c0 + VW, acc[r][1]);
        }
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
    default: break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* accum_pv: O = alpha O + P V;  accum_tn: O += P^T X                                          */
/* ------------------------------------------------------------------------------------------ */

/* Rows r < M of o, 16 floats at a time over D rounded up to 16:
 *   o[r][d] = (fresh ? 0 : (alpha ? alpha[r] : 1) * o[r][d]) + sum_{c < n} w(r, c) * x[c][d],
 * where w(r, c) = w[r * wr + c * wc] (accum_pv: wr = ldp, wc = 1; accum_tn: wr = 1, wc = ldp). */
INLINE void rank_update(float *o, int ldo, const float *alpha, const float *w, int64_t wr,
                        int64_t wc, const float *x, int ldx, int n, int D, const int M, int fresh)
{
    const int D16 = (D + 15) & ~15;
    for (int d0 = 0; d0 < D16; d0 += 2 * VW) {
        __m256 acc[MR][2];
#pragma GCC unroll 8
        for (int r = 0; r < M; r++) {
            const float *orow = o + (int64_t)r * ldo + d0;
            if (fresh) {
                acc[r][0] = acc[r][1] = _mm256_setzero_ps();
                continue;
            }
            acc[r][0] = _mm256_loadu_ps(orow);
            acc[r][1] = _mm256_loadu_ps(orow + VW);
            if (alpha) {
                __m256 a = _mm256_broadcast_ss(alpha + r);
                acc[r][0] = _mm256_mul_ps(acc[r][0], a);
                acc[r][1] = _mm256_mul_ps(acc[r][1], a);
            }
        }
        const float *xc = x + d0;
        const float *wcol = w;
        for (int c = 0; c < n; c++, xc += ldx, wcol += wc) {
            __m256 v0 = _mm256_loadu_ps(xc), v1 = _mm256_loadu_ps(xc + VW);
#pragma GCC unroll 8
            for (int r = 0; r < M; r++) {
                __m256 a = _mm256_broadcast_ss(wcol + r * wr);
                acc[r][0] = _mm256_fmadd_ps(a, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, v1, acc[r][1]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < M; r++) {
            float *orow = o + (int64_t)r * ldo + d0;
            _mm256_storeu_ps(orow, acc[r][0]);
            _mm256_storeu_ps(orow + VW, acc[r][1]);
        }
    }
}

#define PV_M(M)                                                                                \
    static void pv_##M(float *o, int ldo, const float *alpha, const float *p, int ldp,          \
                       const float *vp, int ldv, int n, int D)                                 \
    {                                                                                          \
        rank_update(o, ldo, alpha, p, ldp, 1, vp, ldv, n, D, M, 0);                            \
    }                                                                                          \
    static void tn_##M(float *o, int ldo, const float *p, int ldp, const float *x, int ldx,     \
                       int k, int D, int overwrite)                                            \
    {                                                                                          \
        rank_update(o, ldo, NULL, p, 1, ldp, x, ldx, k, D, M, overwrite);                      \
    }
PV_M(1)
PV_M(2)
PV_M(3)
PV_M(4)
PV_M(5)
PV_M(6)

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
    default: break;
    }
}

/* All m keys, MR at a time: the caller's block of x stays in L1 for every block of keys. */
static void accum_tn(float *o, int ldo, const float *p, int ldp, int m, const float *x, int ldx,
                     int k, int D, int overwrite)
{
    int c = 0;
    for (; c + MR <= m; c += MR)
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

/* add_rows of lib/kernels.h: 8 floats per add, then the tail one by one. */
static void add_rows(float *const *dst, const float *const *src, int m, int n)
{
    for (int j = 0; j < m; j++) {
        float *o = dst[j];
        const float *x = src[j];
        int i = 0;
        for (; i + VW <= n; i += VW)
            _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(o + i), _mm256_loadu_ps(x + i)));
        for (; i < n; i++)
            o[i] += x[i];
    }
}

/* scale_row of lib/kernels.h: 8 floats per multiply, then the tail one by one. */
static int scale_row(float *dst, const float *src, float s, int n)
{
    const __m256 vs = _mm256_set1_ps(s);
    __m256 nan = _mm256_setzero_ps();
    int i = 0;
    for (; i + VW <= n; i += VW) {
        __m256 y = _mm256_mul_ps(_mm256_loadu_ps(src + i), vs);
        _mm256_storeu_ps(dst + i, y);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
    }
    int tail = 0;
    for (; i < n; i++) {
        dst[i] = s * src[i];
        tail |= isnan(dst[i]);
    }
    return _mm256_movemask_ps(nan) != 0 || tail;
}

/* ------------------------------------------------------------------------------------------ */
/* softmax_row                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* x = softcap * tanh(s / softcap) (if CAP) + bias (if bias). */
INLINE __m256 logit8(__m256 s, const float *bias, int c, __m256 cap, const int CAP)
{
    if (CAP)
        s = _mm256_mul_ps(cap, tanh8(_mm256_div_ps(s, cap)));
    if (bias)
        s = _mm256_add_ps(s, _mm256_loadu_ps(bias + c));
    return s;
}

/* Pass 1 on 8 positions whose selection is `byte`: logits, -inf where unselected. */
INLINE __m256 logits8(float *s, const float *bias, int c, unsigned byte, __m256 cap,
                      const int CAP)
{
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    if (!byte)
        return ninf;
    __m256 x = logit8(_mm256_loadu_ps(s + c), bias, c, cap, CAP);
    /* Always the blend: most rows select most but not all of their span, so whether a byte is
     * full is a coin toss for the branch predictor, and a miss costs more than the blend. */
    return _mm256_blendv_ps(ninf, x, lane_sign8(byte));
}

/* scores_rows with softmax_row's first pass in its epilogue, while the block is in registers:
 * x = s (+ bias[r][c]) where row r selects c, -inf elsewhere, stored; the row's two running maxima
 * (of its even and odd groups of 8, as softmax_impl keeps them) live in vmax, in L1: 12 more
 * registers than AVX2 has. */
INLINE void scores_select_rows(float *s, int lds, const float *q, int ldq, const float *kp, int n,
                               int D, const float *const *bias, const uint64_t *const *bits,
                               int bit0, const int *lo, const int *hi, float *rowmax, const int M)
{
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    const float *qr[MR];
    __m256 vmax[MR][2];
    uint64_t sel[MR] = {0};
#pragma GCC unroll 8
    for (int r = 0; r < M; r++) {
        qr[r] = q + (int64_t)r * ldq;
        vmax[r][0] = vmax[r][1] = ninf;
    }
    for (int c0 = 0; c0 < n; c0 += NR) {
        __m256 acc[MR][2];
        block_scores(acc, qr, kp + (int64_t)c0 * D, D, M);
#pragma GCC unroll 8
        for (int r = 0; r < M; r++) {
            if ((c0 & 63) == 0)
                sel[r] = sel_bits(bits[r], bit0, c0, lo[r], hi[r]);
            const unsigned sb = (unsigned)(sel[r] >> (c0 & 63));
            __m256 x0 = acc[r][0], x1 = acc[r][1];
            if (bias[r]) {
                x0 = _mm256_add_ps(x0, _mm256_loadu_ps(bias[r] + c0));
                x1 = _mm256_add_ps(x1, _mm256_loadu_ps(bias[r] + c0 + VW));
            }
            x0 = _mm256_blendv_ps(ninf, x0, lane_sign8(sb & 0xFF));
            x1 = _mm256_blendv_ps(ninf, x1, lane_sign8((sb >> VW) & 0xFF));
            vmax[r][0] = _mm256_max_ps(x0, vmax[r][0]);
            vmax[r][1] = _mm256_max_ps(x1, vmax[r][1]);
            _mm256_storeu_ps(s + (int64_t)r * lds + c0, x0);
            _mm256_storeu_ps(s + (int64_t)r * lds + c0 + VW, x1);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; r++)
        rowmax[r] = hmax8(_mm256_max_ps(vmax[r][0], vmax[r][1]));
}

#define SCORES_SELECT_M(M)                                                                     \
    static void scores_select_##M(float *s, int lds, const float *q, int ldq, const float *kp, \
                                  int n, int D, const float *const *bias,                      \
                                  const uint64_t *const *bits, int bit0, const int *lo,        \
                                  const int *hi, float *rowmax)                                \
    {                                                                                          \
        scores_select_rows(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax, M);     \
    }
SCORES_SELECT_M(1)
SCORES_SELECT_M(2)
SCORES_SELECT_M(3)
SCORES_SELECT_M(4)
SCORES_SELECT_M(5)
SCORES_SELECT_M(6)

/* select_step is NR: a call always starts at a block (off == 0). */
static void scores_select(float *s, int lds, const float *q, int ldq, int m, const float *kp,
                          int off, int n, int D, const float *const *bias,
                          const uint64_t *const *bits, int bit0, const int *lo, const int *hi,
                          float *rowmax)
{
    (void)off;
    switch (m) {
    case 1: scores_select_1(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 2: scores_select_2(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 3: scores_select_3(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 4: scores_select_4(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 5: scores_select_5(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 6: scores_select_6(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    default: break;
    }
}


/* softmax_row's second pass, over a chunk its first pass (softmax_impl or scores_select) left
 * -inf where not selected: p = exp(x - m_new), two sums of alternate groups of 8. */
static float softmax_exp(float *s, int n, float chunk_max, float *m, float *l)
{
    float m_new = chunk_max > *m ? chunk_max : *m;
    if (m_new == -INFINITY) {
        /* Rare: no selected logit above -inf so far. The max skipped NaN, so look for a
         * selected NaN logit (the only NaN s can hold): it makes the row NaN, carried by
         * m_new = NaN into alpha, p, *l and *m (the vector exp keeps NaN). */
        __m256 nan = _mm256_setzero_ps();
        for (int c = 0; c < n; c += VW) {
            __m256 x = _mm256_loadu_ps(s + c);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        }
        if (!_mm256_movemask_ps(nan)) {
            memset(s, 0, sizeof(float) * (size_t)n);
            return 1.0f;
        }
        m_new = NAN;
    }
    float alpha = _mm256_cvtss_f32(exp8(_mm256_set1_ps(*m - m_new)));
    const __m256 vm = _mm256_set1_ps(m_new), zero = _mm256_setzero_ps();
    __m256 vsum0 = zero, vsum1 = zero;
    int c = 0;
    for (; c + 2 * VW <= n; c += 2 * VW) {
        __m256 p0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vm));
        __m256 p1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c + VW), vm));
        vsum0 = _mm256_add_ps(vsum0, p0);
        vsum1 = _mm256_add_ps(vsum1, p1);
        _mm256_storeu_ps(s + c, p0);
        _mm256_storeu_ps(s + c + VW, p1);
    }
    if (c < n) { /* n is a multiple of 8: a last 8 */
        __m256 p0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vm));
        vsum0 = _mm256_add_ps(vsum0, p0);
        _mm256_storeu_ps(s + c, p0);
    }
    *l = *l * alpha + hsum8(_mm256_add_ps(vsum0, vsum1));
    *m = m_new;
    return alpha;
}

/* n is a multiple of 8 (of NR, in fact) and at most DMA_CHUNK_MAX. Positions go 16 at a time (two
 * independent vectors per step for the out-of-order core), then 8. */
INLINE float softmax_impl(float *s, int n, const float *bias, const uint64_t *bits, int bit0,
                          int lo, int hi, float softcap, float *m, float *l, const int CAP)
{
    const __m256 ninf = _mm256_set1_ps(-INFINITY), cap = _mm256_set1_ps(softcap);
    __m256 vmax0 = ninf, vmax1 = ninf;
    /* Pass 1: logits of the selected positions, -inf elsewhere; their max. A NaN logit is
     * skipped by the max (_mm256_max_ps returns its second operand, the running max, when
     * either is NaN), as in the scalar code; pass 2 turns it into a NaN p (exp8 keeps NaN), and
     * softmax_exp's rare branch catches a chunk whose selected logits are all NaN or -inf. */
    for (int c64 = 0; c64 < n; c64 += 64) {
        uint64_t sb = sel_bits(bits, bit0, c64, lo, hi);
        int end = n - c64 < 64 ? n : c64 + 64, c = c64;
        for (; c + 2 * VW <= end; c += 2 * VW, sb >>= 2 * VW) {
            if (!(sb & 0xFFFF)) {
                _mm256_storeu_ps(s + c, ninf);
                _mm256_storeu_ps(s + c + VW, ninf);
                continue;
            }
            __m256 x0 = logits8(s, bias, c, (unsigned)(sb & 0xFF), cap, CAP);
            __m256 x1 = logits8(s, bias, c + VW, (unsigned)((sb >> VW) & 0xFF), cap, CAP);
            vmax0 = _mm256_max_ps(x0, vmax0);
            vmax1 = _mm256_max_ps(x1, vmax1);
            _mm256_storeu_ps(s + c, x0);
            _mm256_storeu_ps(s + c + VW, x1);
        }
        if (c < end) {
            __m256 x0 = logits8(s, bias, c, (unsigned)(sb & 0xFF), cap, CAP);
            vmax0 = _mm256_max_ps(x0, vmax0);
            _mm256_storeu_ps(s + c, x0);
        }
    }
    /* pass 1 left -inf at every unselected position: softmax_exp is pass 2 */
    return softmax_exp(s, n, hmax8(_mm256_max_ps(vmax0, vmax1)), m, l);
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
    const __m256 zero = _mm256_setzero_ps(), cap = _mm256_set1_ps(softcap);
    const __m256 vlse = _mm256_set1_ps(lse), vdelta = _mm256_set1_ps(delta);
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int c64 = 0; c64 < n; c64 += 64) {
        uint64_t sb = lse == -INFINITY ? 0 : sel_bits(bits, bit0, c64, lo, hi);
        int end = n - c64 < 64 ? n : c64 + 64;
        for (int c = c64; c < end; c += VW, sb >>= VW) {
            unsigned byte = (unsigned)(sb & 0xFF);
            if (!byte) {
                _mm256_storeu_ps(s + c, zero);
                _mm256_storeu_ps(dp + c, zero);
                continue;
            }
            __m256 t = _mm256_loadu_ps(s + c);
            if (CAP)
                t = _mm256_mul_ps(cap, tanh8(_mm256_div_ps(t, cap)));
            __m256 x = bias ? _mm256_add_ps(t, _mm256_loadu_ps(bias + c)) : t;
            /* x - lse <= 0 for a consistent lse; the clamp only keeps exp8 in its range. min_ps
             * returns its second operand when either is NaN: a NaN lse or logit gives p = NaN. */
            __m256 p = exp8(_mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_sub_ps(x, vlse)));
            __m256 dx = _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + c), vdelta));
            __m256 ds = dx;
            if (CAP) {
                __m256 u = _mm256_div_ps(t, cap);
                ds = _mm256_mul_ps(dx, _mm256_fnmadd_ps(u, u, one));
            }
            /* Masked whether or not the byte is full: no branch to mispredict (see logits8). */
            const __m256 k = lane_mask8(byte);
            p = _mm256_and_ps(k, p);
            ds = _mm256_and_ps(k, ds);
            if (dx_sum) {
                __m256 old = _mm256_loadu_ps(dx_sum + c);
                _mm256_storeu_ps(dx_sum + c, _mm256_blendv_ps(old, _mm256_add_ps(old, dx), k));
            }
            _mm256_storeu_ps(s + c, p);
            _mm256_storeu_ps(dp + c, ds);
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
/* Half precision: F16C for binary16, integer rounding for bf16 (kernels.h has the rules)      */
/* ------------------------------------------------------------------------------------------ */

/* 8 floats -> bf16: round to nearest even on the bits (add 0x7fff + bit 16, keep the top
 * half); NaN -> (bits >> 16) | 0x40, as lib/kernels_scalar.c. */
INLINE __m128i bf16_from_f32x8(__m256 f)
{
    const __m256i x = _mm256_castps_si256(f);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb);
    r = _mm256_srli_epi32(r, 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, quiet, nan);
    /* every lane is <= 0xffff, so packus's unsigned saturation is exact */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* 8 values each way. F16C rounds by the immediate (nearest even; MXCSR ignored), gives
 * subnormals, and turns NaN into the quiet NaN with the top payload bits: the scalar rule. */
INLINE void half8_to_f32(float *dst, const uint16_t *src, int f16)
{
    __m128i h = _mm_loadu_si128((const __m128i *)src);
    __m256 f = f16 ? _mm256_cvtph_ps(h)
                   : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm256_storeu_ps(dst, f);
}

INLINE void half8_from_f32(uint16_t *dst, const float *src, int f16)
{
    __m256 f = _mm256_loadu_ps(src);
    __m128i h = f16 ? _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT) : bf16_from_f32x8(f);
    _mm_storeu_si128((__m128i *)dst, h);
}

/* Tails (n % 8 values) go through the same 8-wide code on a zero-padded copy. */
static void to_f32(float *dst, const uint16_t *src, int64_t n, int f16)
{
    int64_t i = 0;
    for (; i + VW <= n; i += VW)
        half8_to_f32(dst + i, src + i, f16);
    if (i < n) {
        uint16_t h[VW] = {0};
        float f[VW];
        memcpy(h, src + i, sizeof(uint16_t) * (size_t)(n - i));
        half8_to_f32(f, h, f16);
        memcpy(dst + i, f, sizeof(float) * (size_t)(n - i));
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
        half8_from_f32(dst + i, src + i, f16);
    if (i < n) {
        float f[VW] = {0};
        uint16_t h[VW];
        memcpy(f, src + i, sizeof(float) * (size_t)(n - i));
        half8_from_f32(h, f, f16);
        memcpy(dst + i, h, sizeof(uint16_t) * (size_t)(n - i));
    }
}

const dma_kernels dma_kernels_avx2 = {
    .name = "avx2",
    .mr = MR,
    .nr = NR,
    .select_step = NR,
    .pv_rows = MR,
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

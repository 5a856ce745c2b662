/*
 * kernels_neon.c - the inner kernels for Arm Advanced SIMD (aarch64 NEON): the table, the
 * forward's kernels and half precision; the backward's are in kernels_neon_backward.c, and the
 * vector exp and tanh and the selection bytes in neon_shared.h.
 *
 * Same semantics as lib/kernels_scalar.c (the reference); layouts are described in kernels.h.
 *
 *   scores:      register block of up to MR = 8 query rows x NR = 8 keys, 16 float32x4
 *                accumulators; Q is read 4 head-dims at a time and broadcast by lane (fmla by
 *                element), so every accumulator lane sums over d in the same order as the scalar
 *                kernel.
 *   accum_pv:    register block of up to 8 rows x 8 output columns (16 accumulators), P read
 *                4 keys at a time and broadcast by lane.
 *   softmax_row: 8 positions at a time; the selection (lo/hi and the bitmask) becomes one byte
 *                per 8 positions, then a lane mask; exp and tanh are vectorised (neon_shared.h).
 *   scores_select / softmax_exp: softmax_row's two passes split at the max, the first applied
 *                to each 8-key block of scores as it is stored (while in L1).
 *   pack_k:      8 keys at a time, 4x4 in-register transposes.
 *
 * No kernel reads outside the documented extents: Q rows up to D (the D % 4 tail is read a
 * float at a time), V / X / O rows up to D rounded up to 4 (<= ldv, ldx, ldo: zero-padding, so
 * O's padding columns stay zero), P rows of accum_tn up to column m - 1, bitmask words only up
 * to the one holding position bit0 + hi - 1.
 */
#include <arm_neon.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "kernels.h"
#include "kernels_generic.h"
#include "neon_shared.h"

/* ------------------------------------------------------------------------------------------ */
/* Packing                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Source of the padding keys of the last block (D <= 256). */
static const float zero_row[256];

static const float *key_row(const float *base, int64_t ld, const int32_t *keys, int32_t first,
                            int c)
{
    return base + (int64_t)(keys ? keys[c] : first + c) * ld;
}

static void pack_k(float *kp, const float *base, int64_t ld, const int32_t *keys, int32_t first,
                   int n, int D)
{
    for (int c0 = 0; c0 < n; c0 += NR) {
        const float *src[NR];
        for (int j = 0; j < NR; j++)
            src[j] = c0 + j < n ? key_row(base, ld, keys, first, c0 + j) : zero_row;
        float *dst = kp + (ptrdiff_t)c0 * D;
        int d = 0;
        for (; d + 4 <= D; d += 4) {
            for (int h = 0; h < 2; h++) {
                const float *const *s4 = src + 4 * h;
                float32x4_t a = vld1q_f32(s4[0] + d), b = vld1q_f32(s4[1] + d);
                float32x4_t c = vld1q_f32(s4[2] + d), e = vld1q_f32(s4[3] + d);
                float32x4_t t0 = vtrn1q_f32(a, b), t1 = vtrn2q_f32(a, b);
                float32x4_t t2 = vtrn1q_f32(c, e), t3 = vtrn2q_f32(c, e);
                float64x2_t u0 = vreinterpretq_f64_f32(t0), u1 = vreinterpretq_f64_f32(t1);
                float64x2_t u2 = vreinterpretq_f64_f32(t2), u3 = vreinterpretq_f64_f32(t3);
                float *o = dst + d * NR + 4 * h;
                vst1q_f32(o + 0 * NR, vreinterpretq_f32_f64(vtrn1q_f64(u0, u2)));
                vst1q_f32(o + 1 * NR, vreinterpretq_f32_f64(vtrn1q_f64(u1, u3)));
                vst1q_f32(o + 2 * NR, vreinterpretq_f32_f64(vtrn2q_f64(u0, u2)));
                vst1q_f32(o + 3 * NR, vreinterpretq_f32_f64(vtrn2q_f64(u1, u3)));
            }
        }
        for (; d < D; d++)
            for (int j = 0; j < NR; j++)
                dst[d * NR + j] = src[j][d];
    }
}

static void pack_v(float *vp, int ldv, const float *base, int64_t ld, const int32_t *keys,
                   int32_t first, int n, int D)
{
    for (int c = 0; c < n; c++) {
        float *dst = vp + (ptrdiff_t)c * ldv;
        memcpy(dst, key_row(base, ld, keys, first, c), sizeof(float) * (size_t)D);
        memset(dst + D, 0, sizeof(float) * (size_t)(ldv - D));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* scores: S = Q K^T                                                                           */
/* ------------------------------------------------------------------------------------------ */

#define SC_LANE(L)                                                                             \
    do {                                                                                       \
        float32x4_t k0 = vld1q_f32(kk + (L) * NR), k1 = vld1q_f32(kk + (L) * NR + 4);          \
        _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)                                    \
        {                                                                                      \
            acc0[r] = vfmaq_laneq_f32(acc0[r], k0, qv[r], L);                                  \
            acc1[r] = vfmaq_laneq_f32(acc1[r], k1, qv[r], L);                                  \
        }                                                                                      \
    } while (0)

/* M (compile-time after inlining) rows x 8 keys of one packed block. */
ALWAYS_INLINE void scores_block(const int M, float *s, int lds, const float *q, int ldq,
                                const float *panel, int D)
{
    float32x4_t acc0[MR], acc1[MR];
    _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)
    {
        acc0[r] = vdupq_n_f32(0.0f);
        acc1[r] = vdupq_n_f32(0.0f);
    }
    int d = 0;
    for (; d + 4 <= D; d += 4) {
        float32x4_t qv[MR];
        _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)
            qv[r] = vld1q_f32(q + (ptrdiff_t)r * ldq + d);
        const float *kk = panel + d * NR;
        SC_LANE(0);
        SC_LANE(1);
        SC_LANE(2);
        SC_LANE(3);
    }
    for (; d < D; d++) {
        float32x4_t k0 = vld1q_f32(panel + d * NR), k1 = vld1q_f32(panel + d * NR + 4);
        _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)
        {
            float qs = q[(ptrdiff_t)r * ldq + d];
            acc0[r] = vfmaq_n_f32(acc0[r], k0, qs);
            acc1[r] = vfmaq_n_f32(acc1[r], k1, qs);
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)
    {
        vst1q_f32(s + (ptrdiff_t)r * lds, acc0[r]);
        vst1q_f32(s + (ptrdiff_t)r * lds + 4, acc1[r]);
    }
}

#define SCORES_M(M)                                                                            \
    static void scores_m##M(float *s, int lds, const float *q, int ldq, const float *kp, int n, \
                            int D)                                                             \
    {                                                                                          \
        for (int c0 = 0; c0 < n; c0 += NR)                                                     \
            scores_block(M, s + c0, lds, q, ldq, kp + (ptrdiff_t)c0 * D, D);                   \
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
    case 1: scores_m1(s, lds, q, ldq, kp, n, D); break;
    case 2: scores_m2(s, lds, q, ldq, kp, n, D); break;
    case 3: scores_m3(s, lds, q, ldq, kp, n, D); break;
    case 4: scores_m4(s, lds, q, ldq, kp, n, D); break;
    case 5: scores_m5(s, lds, q, ldq, kp, n, D); break;
    case 6: scores_m6(s, lds, q, ldq, kp, n, D); break;
    case 7: scores_m7(s, lds, q, ldq, kp, n, D); break;
    case 8: scores_m8(s, lds, q, ldq, kp, n, D); break;
    default: /* more keys than one register block: MR at a time */
        for (int r = 0; r < m; r += MR)
            scores(s + (ptrdiff_t)r * lds, lds, q + (ptrdiff_t)r * ldq, ldq,
                   m - r < MR ? m - r : MR, kp, n, D);
        break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* softmax_row                                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* x = softcap * tanh(s / softcap) + bias on 8 positions; stores x, returns max over the
 * selected ones (or -inf) merged into vmax. */
ALWAYS_INLINE float32x4_t sm_pass1(float *s, const float *bias, float softcap, unsigned byte,
                                   uint32x4_t lb0, uint32x4_t lb1, float32x4_t vmax)
{
    const float32x4_t ninf = vdupq_n_f32(-INFINITY);
    float32x4_t x0 = vld1q_f32(s), x1 = vld1q_f32(s + 4);
    if (softcap > 0.0f) {
        float32x4_t sc = vdupq_n_f32(softcap);
        x0 = vmulq_f32(sc, v_tanh(vdivq_f32(x0, sc)));
        x1 = vmulq_f32(sc, v_tanh(vdivq_f32(x1, sc)));
    }
    if (bias) {
        x0 = vaddq_f32(x0, vld1q_f32(bias));
        x1 = vaddq_f32(x1, vld1q_f32(bias + 4));
    }
    vst1q_f32(s, x0);
    vst1q_f32(s + 4, x1);
    uint32x4_t bv = vdupq_n_u32(byte);
    uint32x4_t m0 = vtstq_u32(bv, lb0), m1 = vtstq_u32(bv, lb1);
    /* FMAXNM skips NaN, as the scalar `x > max` does. */
    vmax = vmaxnmq_f32(vmax, vbslq_f32(m0, x0, ninf));
    return vmaxnmq_f32(vmax, vbslq_f32(m1, x1, ninf));
}

/* Lanes of the 8 positions at s that are selected (byte) and hold NaN: all ones there. */
ALWAYS_INLINE uint32x4_t sm_nan(const float *s, unsigned byte, uint32x4_t lb0, uint32x4_t lb1)
{
    uint32x4_t bv = vdupq_n_u32(byte);
    float32x4_t x0 = vld1q_f32(s), x1 = vld1q_f32(s + 4);
    uint32x4_t n0 = vbicq_u32(vtstq_u32(bv, lb0), vceqq_f32(x0, x0));
    uint32x4_t n1 = vbicq_u32(vtstq_u32(bv, lb1), vceqq_f32(x1, x1));
    return vorrq_u32(n0, n1);
}

/* s = selected ? exp(s - m_new) : 0 on 8 positions; returns the running sums. */
ALWAYS_INLINE void sm_pass2(float *s, float32x4_t vm, unsigned byte, uint32x4_t lb0,
                            uint32x4_t lb1, float32x4_t *sum0, float32x4_t *sum1)
{
    if (!byte) {
        vst1q_f32(s, vdupq_n_f32(0.0f));
        vst1q_f32(s + 4, vdupq_n_f32(0.0f));
        return;
    }
    uint32x4_t bv = vdupq_n_u32(byte);
    uint32x4_t m0 = vtstq_u32(bv, lb0), m1 = vtstq_u32(bv, lb1);
    float32x4_t p0 = v_exp(vsubq_f32(vld1q_f32(s), vm));
    float32x4_t p1 = v_exp(vsubq_f32(vld1q_f32(s + 4), vm));
    p0 = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(p0), m0));
    p1 = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(p1), m1));
    vst1q_f32(s, p0);
    vst1q_f32(s + 4, p1);
    *sum0 = vaddq_f32(*sum0, p0);
    *sum1 = vaddq_f32(*sum1, p1);
}

static float softmax_row(float *s, int n, const float *bias, const uint64_t *bits, int bit0,
                         int lo, int hi, float softcap, float *m, float *l)
{
    const uint32x4_t lb0 = vld1q_u32(lane_bits), lb1 = vld1q_u32(lane_bits + 4);
    if (lo < 0)
        lo = 0;
    if (hi > n)
        hi = n;
    const int n8 = n & ~7;
    /* Only blocks that hold selected positions are touched in pass 1. */
    int cfirst = lo < hi ? lo & ~7 : n8, clast = lo < hi ? hi : 0;
    if (clast > n8)
        clast = n8;
    float tail_s[8], tail_b[8];
    unsigned tail_byte = 0;
    if (n8 < n) { /* n % 8 != 0 is outside the contract (n is a multiple of NR); handled anyway */
        tail_byte = sel_byte(bits, bit0, lo, hi, n8);
        memset(tail_b, 0, sizeof tail_b);
        memset(tail_s, 0, sizeof tail_s);
        memcpy(tail_s, s + n8, sizeof(float) * (size_t)(n - n8));
        if (bias)
            memcpy(tail_b, bias + n8, sizeof(float) * (size_t)(n - n8));
    }

    float32x4_t vmax = vdupq_n_f32(-INFINITY);
    for (int c = cfirst; c < clast; c += 8) {
        unsigned byte = sel_byte(bits, bit0, lo, hi, c);
        if (byte)
            vmax = sm_pass1(s + c, bias ? bias + c : NULL, softcap, byte, lb0, lb1, vmax);
    }
    if (tail_byte)
        vmax = sm_pass1(tail_s, bias ? tail_b : NULL, softcap, tail_byte, lb0, lb1, vmax);
    float chunk_max = vmaxnmvq_f32(vmax);
    float m_new = chunk_max > *m ? chunk_max : *m;
    if (m_new == -INFINITY) {
        /* Rare: no selected logit above -inf so far. FMAXNM skipped NaN, so look for a selected
         * NaN logit among the blocks pass 1 wrote (its unselected lanes hold whatever the score
         * was, hence the mask): it makes the row NaN, carried by m_new = NaN into alpha, p, *l
         * and *m (v_exp keeps NaN: FMAX and FMIN return NaN when either operand is NaN). */
        uint32x4_t nan = vdupq_n_u32(0);
        for (int c = cfirst; c < clast; c += 8) {
            unsigned byte = sel_byte(bits, bit0, lo, hi, c);
            if (byte)
                nan = vorrq_u32(nan, sm_nan(s + c, byte, lb0, lb1));
        }
        if (tail_byte)
            nan = vorrq_u32(nan, sm_nan(tail_s, tail_byte, lb0, lb1));
        if (vmaxvq_u32(nan) == 0) {
            memset(s, 0, sizeof(float) * (size_t)n);
            return 1.0f;
        }
        m_new = NAN;
    }
    float alpha = expf(*m - m_new);
    const float32x4_t vm = vdupq_n_f32(m_new);
    float32x4_t sum0 = vdupq_n_f32(0.0f), sum1 = vdupq_n_f32(0.0f);
    for (int c = 0; c < n8; c += 8) {
        unsigned byte = c >= cfirst && c < clast ? sel_byte(bits, bit0, lo, hi, c) : 0;
        sm_pass2(s + c, vm, byte, lb0, lb1, &sum0, &sum1);
    }
    if (n8 < n) {
        sm_pass2(tail_s, vm, tail_byte, lb0, lb1, &sum0, &sum1);
        memcpy(s + n8, tail_s, sizeof(float) * (size_t)(n - n8));
    }
    float sum = vaddvq_f32(vaddq_f32(sum0, sum1));
    *l = *l * alpha + sum;
    *m = m_new;
    return alpha;
}

/* ------------------------------------------------------------------------------------------ */
/* scores_select + softmax_exp: the scores with softmax_row's first pass, then its second      */
/* ------------------------------------------------------------------------------------------ */

/* M rows x 8 keys of one packed block (scores_block), then, while the block is in L1, each
 * row's logits (bias added) where it selects, -inf elsewhere, stored, and merged into the row's
 * running max in the order of sm_pass1 (FMAXNM skips NaN). */
ALWAYS_INLINE void select_block(const int M, float *s, int lds, const float *q, int ldq,
                                const float *panel, int D, int c, const float *const *bias,
                                const uint64_t *const *bits, int bit0, const int *lo,
                                const int *hi, float32x4_t *vmax)
{
    const uint32x4_t lb0 = vld1q_u32(lane_bits), lb1 = vld1q_u32(lane_bits + 4);
    const float32x4_t ninf = vdupq_n_f32(-INFINITY);
    scores_block(M, s + c, lds, q, ldq, panel, D);
    _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)
    {
        float *x = s + (ptrdiff_t)r * lds + c;
        float32x4_t x0 = vld1q_f32(x), x1 = vld1q_f32(x + 4);
        if (bias[r]) {
            x0 = vaddq_f32(x0, vld1q_f32(bias[r] + c));
            x1 = vaddq_f32(x1, vld1q_f32(bias[r] + c + 4));
        }
        uint32x4_t bv = vdupq_n_u32(sel_byte(bits[r], bit0, lo[r], hi[r], c));
        x0 = vbslq_f32(vtstq_u32(bv, lb0), x0, ninf);
        x1 = vbslq_f32(vtstq_u32(bv, lb1), x1, ninf);
        vmax[r] = vmaxnmq_f32(vmaxnmq_f32(vmax[r], x0), x1);
        vst1q_f32(x, x0);
        vst1q_f32(x + 4, x1);
    }
}

#define SELECT_M(M)                                                                            \
    static void select_m##M(float *s, int lds, const float *q, int ldq, const float *kp, int n, \
                            int D, const float *const *bias, const uint64_t *const *bits,      \
                            int bit0, const int *lo, const int *hi, float *rowmax)             \
    {                                                                                          \
        float32x4_t vmax[MR];                                                                  \
        for (int r = 0; r < M; r++)                                                            \
            vmax[r] = vdupq_n_f32(-INFINITY);                                                  \
        for (int c = 0; c < n; c += NR)                                                        \
            select_block(M, s, lds, q, ldq, kp + (ptrdiff_t)c * D, D, c, bias, bits, bit0, lo, \
                         hi, vmax);                                                            \
        for (int r = 0; r < M; r++)                                                            \
            rowmax[r] = vmaxnmvq_f32(vmax[r]);                                                 \
    }
SELECT_M(1)
SELECT_M(2)
SELECT_M(3)
SELECT_M(4)
SELECT_M(5)
SELECT_M(6)
SELECT_M(7)
SELECT_M(8)

/* select_step is NR: a call always starts at a block (off == 0); n is a multiple of NR. */
static void scores_select(float *s, int lds, const float *q, int ldq, int m, const float *kp,
                          int off, int n, int D, const float *const *bias,
                          const uint64_t *const *bits, int bit0, const int *lo, const int *hi,
                          float *rowmax)
{
    (void)off;
    switch (m) {
    case 1: select_m1(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 2: select_m2(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 3: select_m3(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 4: select_m4(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 5: select_m5(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 6: select_m6(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 7: select_m7(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    case 8: select_m8(s, lds, q, ldq, kp, n, D, bias, bits, bit0, lo, hi, rowmax); break;
    default: break;
    }
}

/* softmax_row's second pass over a row scores_select wrote (-inf, whose exp is +0, where not
 * selected): the same two sums as sm_pass2. */
static float softmax_exp(float *s, int n, float chunk_max, float *m, float *l)
{
    float m_new = chunk_max > *m ? chunk_max : *m;
    if (m_new == -INFINITY) {
        /* as softmax_row: a selected NaN logit (the only NaN s can hold) makes the row NaN */
        uint32x4_t nan = vdupq_n_u32(0);
        for (int c = 0; c < n; c += 4) {
            float32x4_t x = vld1q_f32(s + c);
            nan = vorrq_u32(nan, vmvnq_u32(vceqq_f32(x, x)));
        }
        if (vmaxvq_u32(nan) == 0) {
            memset(s, 0, sizeof(float) * (size_t)n);
            return 1.0f;
        }
        m_new = NAN;
    }
    float alpha = expf(*m - m_new);
    const float32x4_t vm = vdupq_n_f32(m_new);
    float32x4_t sum0 = vdupq_n_f32(0.0f), sum1 = vdupq_n_f32(0.0f);
    for (int c = 0; c < n; c += 8) {
        float32x4_t p0 = v_exp(vsubq_f32(vld1q_f32(s + c), vm));
        float32x4_t p1 = v_exp(vsubq_f32(vld1q_f32(s + c + 4), vm));
        vst1q_f32(s + c, p0);
        vst1q_f32(s + c + 4, p1);
        sum0 = vaddq_f32(sum0, p0);
        sum1 = vaddq_f32(sum1, p1);
    }
    *l = *l * alpha + vaddvq_f32(vaddq_f32(sum0, sum1));
    *m = m_new;
    return alpha;
}

/* ------------------------------------------------------------------------------------------ */
/* accum_pv: O = alpha O + P V                                                                 */
/* ------------------------------------------------------------------------------------------ */

#define PV_LANE(L)                                                                             \
    do {                                                                                       \
        const float *vr = vp + (ptrdiff_t)(c + (L)) * ldv;                                     \
        float32x4_t v0 = vld1q_f32(vr), v1 = W > 1 ? vld1q_f32(vr + 4) : v0;                   \
        _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)                                    \
        {                                                                                      \
            acc0[r] = vfmaq_laneq_f32(acc0[r], v0, pv[r], L);                                  \
            if (W > 1)                                                                         \
                acc1[r] = vfmaq_laneq_f32(acc1[r], v1, pv[r], L);                              \
        }                                                                                      \
    } while (0)

/* M rows x 4 W columns (W = 1 or 2) of O, starting at o (and vp at the same column). */
ALWAYS_INLINE void pv_block(const int M, const int W, float *o, int ldo, const float *alpha,
                            const float *p, int ldp, const float *vp, int ldv, int n)
{
    float32x4_t acc0[MR], acc1[MR];
    _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)
    {
        acc0[r] = vmulq_n_f32(vld1q_f32(o + (ptrdiff_t)r * ldo), alpha[r]);
        acc1[r] = W > 1 ? vmulq_n_f32(vld1q_f32(o + (ptrdiff_t)r * ldo + 4), alpha[r]) : acc0[r];
    }
    int c = 0;
    for (; c + 4 <= n; c += 4) {
        float32x4_t pv[MR];
        _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)
            pv[r] = vld1q_f32(p + (ptrdiff_t)r * ldp + c);
        PV_LANE(0);
        PV_LANE(1);
        PV_LANE(2);
        PV_LANE(3);
    }
    for (; c < n; c++) {
        const float *vr = vp + (ptrdiff_t)c * ldv;
        float32x4_t v0 = vld1q_f32(vr), v1 = W > 1 ? vld1q_f32(vr + 4) : v0;
        _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)
        {
            float pc = p[(ptrdiff_t)r * ldp + c];
            acc0[r] = vfmaq_n_f32(acc0[r], v0, pc);
            if (W > 1)
                acc1[r] = vfmaq_n_f32(acc1[r], v1, pc);
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < M; r++)
    {
        vst1q_f32(o + (ptrdiff_t)r * ldo, acc0[r]);
        if (W > 1)
            vst1q_f32(o + (ptrdiff_t)r * ldo + 4, acc1[r]);
    }
}

#define PV_M(M)                                                                                \
    static void pv_m##M(float *o, int ldo, const float *alpha, const float *p, int ldp,        \
                        const float *vp, int ldv, int n, int D)                                \
    {                                                                                          \
        const int D4 = (D + 3) & ~3; /* <= ldo, ldv; columns D..D4-1 are zero-padding */       \
        int d = 0;                                                                             \
        for (; d + 8 <= D4; d += 8)                                                            \
            pv_block(M, 2, o + d, ldo, alpha, p, ldp, vp + d, ldv, n);                         \
        if (d < D4)                                                                            \
            pv_block(M, 1, o + d, ldo, alpha, p, ldp, vp + d, ldv, n);                         \
    }
PV_M(1)
PV_M(2)
PV_M(3)
PV_M(4)
PV_M(5)
PV_M(6)
PV_M(7)
PV_M(8)

static void accum_pv(float *o, int ldo, const float *alpha, const float *p, int ldp, int m,
                     const float *vp, int ldv, int n, int D)
{
    switch (m) {
    case 1: pv_m1(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 2: pv_m2(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 3: pv_m3(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 4: pv_m4(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 5: pv_m5(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 6: pv_m6(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 7: pv_m7(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    case 8: pv_m8(o, ldo, alpha, p, ldp, vp, ldv, n, D); break;
    default: /* more keys than one register block: MR at a time */
        for (int r = 0; r < m; r += MR)
            accum_pv(o + (ptrdiff_t)r * ldo, ldo, alpha + r, p + (ptrdiff_t)r * ldp, ldp,
                     m - r < MR ? m - r : MR, vp, ldv, n, D);
        break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Half precision: FCVT for binary16, shifts and integer rounding for bf16                     */
/* ------------------------------------------------------------------------------------------ */

/* 4 floats -> bf16: round to nearest even on the bits (add 0x7fff + bit 16, keep the top
 * half); NaN -> (bits >> 16) | 0x40, as lib/kernels_scalar.c. */
ALWAYS_INLINE uint16x4_t bf16_from_f32x4(float32x4_t f)
{
    const uint32x4_t x = vreinterpretq_u32_f32(f);
    uint32x4_t lsb = vandq_u32(vshrq_n_u32(x, 16), vdupq_n_u32(1));
    uint32x4_t r = vaddq_u32(vaddq_u32(x, vdupq_n_u32(0x7fff)), lsb);
    uint32x4_t nan = vcgtq_u32(vandq_u32(x, vdupq_n_u32(0x7fffffff)), vdupq_n_u32(0x7f800000));
    uint16x4_t quiet = vorr_u16(vshrn_n_u32(x, 16), vdup_n_u16(0x40));
    return vbsl_u16(vmovn_u32(nan), quiet, vshrn_n_u32(r, 16));
}

/* 8 values each way. With FPCR at Linux's default (round to nearest even, no flush to zero, DN
 * clear), FCVT gives subnormals and turns NaN into the quiet NaN with the top payload bits:
 * the scalar rule. */
ALWAYS_INLINE void half8_to_f32(float *dst, const uint16_t *src, int f16)
{
    uint16x8_t h = vld1q_u16(src);
    float32x4_t lo, hi;
    if (f16) {
        lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
        hi = vcvt_high_f32_f16(vreinterpretq_f16_u16(h));
    } else {
        lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
        hi = vreinterpretq_f32_u32(vshll_high_n_u16(h, 16));
    }
    vst1q_f32(dst, lo);
    vst1q_f32(dst + 4, hi);
}

ALWAYS_INLINE void half8_from_f32(uint16_t *dst, const float *src, int f16)
{
    float32x4_t lo = vld1q_f32(src), hi = vld1q_f32(src + 4);
    uint16x8_t h;
    if (f16)
        h = vreinterpretq_u16_f16(vcvt_high_f16_f32(vcvt_f16_f32(lo), hi));
    else
        h = vcombine_u16(bf16_from_f32x4(lo), bf16_from_f32x4(hi));
    vst1q_u16(dst, h);
}

/* Tails (n % 8 values) go through the same 8-wide code on a zero-padded copy. */
static void to_f32(float *dst, const uint16_t *src, int64_t n, int f16)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        half8_to_f32(dst + i, src + i, f16);
    if (i < n) {
        uint16_t h[8] = {0};
        float f[8];
        memcpy(h, src + i, sizeof(uint16_t) * (size_t)(n - i));
        half8_to_f32(f, h, f16);
        memcpy(dst + i, f, sizeof(float) * (size_t)(n - i));
    }
}

static void from_f32(uint16_t *dst, const float *src, int64_t n, int f16)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        half8_from_f32(dst + i, src + i, f16);
    if (i < n) {
        float f[8] = {0};
        uint16_t h[8];
        memcpy(f, src + i, sizeof(float) * (size_t)(n - i));
        half8_from_f32(h, f, f16);
        memcpy(dst + i, h, sizeof(uint16_t) * (size_t)(n - i));
    }
}

/* pack_k_half of lib/kernels.h: rows converted, then this table's pack_k. */
static void pack_k_half(float *kp, const uint16_t *base, int64_t ld, const int32_t *keys,
                        int32_t first, int n, int D, int f16)
{
    generic_pack_k_half(kp, base, ld, keys, first, n, D, f16, NR, to_f32, pack_k);
}

/* dots of lib/kernels.h: four lanes of partial sums per row, one key row at a time. */
static void dots(float *s, int lds, const float *q, int ldq, int m, const float *k, int ldk,
                 int n, int D)
{
    const int D4 = D / 4 * 4;
    for (int c = 0; c < n; c++) {
        const float *kr = k + (ptrdiff_t)c * ldk;
        for (int r = 0; r < m; r++) {
            const float *qr = q + (ptrdiff_t)r * ldq;
            float32x4_t acc = vdupq_n_f32(0.0f);
            for (int d = 0; d < D4; d += 4)
                acc = vfmaq_f32(acc, vld1q_f32(qr + d), vld1q_f32(kr + d));
            float t = vaddvq_f32(acc);
            for (int d = D4; d < D; d++)
                t += qr[d] * kr[d];
            s[(ptrdiff_t)r * lds + c] = t;
        }
    }
}

/* scale_row of lib/kernels.h: 4 floats per multiply, then the tail one by one. */
static int scale_row(float *dst, const float *src, float s, int n)
{
    uint32x4_t same = vdupq_n_u32(~0u); /* lanes that were never NaN */
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t y = vmulq_n_f32(vld1q_f32(src + i), s);
        vst1q_f32(dst + i, y);
        same = vandq_u32(same, vceqq_f32(y, y));
    }
    int tail = 0;
    for (; i < n; i++) {
        dst[i] = s * src[i];
        tail |= isnan(dst[i]);
    }
    return vminvq_u32(same) == 0 || tail;
}

const dma_kernels dma_kernels_neon = {
    .name = "neon",
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
    .grad_row = dma_neon_grad_row,
    .accum_tn = dma_neon_accum_tn,
    .add_rows = dma_neon_add_rows,
    .scale_row = scale_row,
    .prefetch_write = dma_prefetch_write,
    .to_f32 = to_f32,
    .from_f32 = from_f32,
    .pack_k_half = pack_k_half,
    .dots = dots,
    .scores_select = scores_select,
    .softmax_exp = softmax_exp,
};

/*
 * kernels_neon.c - the inner kernels (forward and backward) for Arm Advanced SIMD (aarch64 NEON).
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
 *                per 8 positions, then a lane mask; exp and tanh are vectorised (below).
 *   scores_select / softmax_exp: softmax_row's two passes split at the max, the first applied
 *                to each 8-key block of scores as it is stored (while in L1).
 *   pack_k:      8 keys at a time, 4x4 in-register transposes.
 *   grad_row:    as softmax_row, 8 positions at a time (p, ds, and dx_sum only where selected).
 *   accum_tn:    register block of up to 8 keys x 8 columns of o; the 8 P values of a query row
 *                are one or two vector loads (lanes loaded one by one below 8 keys, so nothing
 *                past column m - 1 of P is read); rows in passes of TN_KC to keep X in L1.
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

#define NR 8
#define MR 8

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------------------------------ */
/* Vector exp and tanh                                                                         */
/* ------------------------------------------------------------------------------------------ */

/*
 * exp(x) for x <= 88, max error about 1.05 ulp (subnormal results included: they are scaled in
 * two steps so they are rounded once); x <= -104 and -inf give +0, NaN gives NaN.
 * x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, Cody-Waite), exp(r) = 1 + r + r^2 P(r) with
 * P the Taylor series to r^7 (truncation below 0.05 ulp), exp(x) = 2^n + 2^n (r + r^2 P(r)).
 */
ALWAYS_INLINE float32x4_t v_exp(float32x4_t x)
{
    const float32x4_t shift = vdupq_n_f32(0x1.8p23f);
    x = vmaxq_f32(x, vdupq_n_f32(-104.0f)); /* FMAX keeps NaN */
    x = vminq_f32(x, vdupq_n_f32(88.0f));
    /* z = shift + round(x / ln2): the low mantissa bits of z hold n. */
    float32x4_t z = vfmaq_f32(shift, x, vdupq_n_f32(0x1.715476p+0f));
    float32x4_t n = vsubq_f32(z, shift);
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0x1.62e4p-1f));
    r = vfmsq_f32(r, n, vdupq_n_f32(0x1.7f7d1cp-20f));
    /* P(r) = 1/2 + r/6 + r^2/24 + r^3/120 + r^4/720 + r^5/5040 */
    float32x4_t p = vfmaq_f32(vdupq_n_f32(1.0f / 720.0f), r, vdupq_n_f32(1.0f / 5040.0f));
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120.0f), r, p);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24.0f), r, p);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6.0f), r, p);
    p = vfmaq_f32(vdupq_n_f32(0.5f), r, p);
    float32x4_t poly = vfmaq_f32(r, vmulq_f32(r, r), p); /* exp(r) - 1 */
    /* 2^n with n in the exponent field. */
    uint32x4_t e = vshlq_n_u32(vreinterpretq_u32_f32(z), 23);
    float32x4_t scale = vreinterpretq_f32_u32(vaddq_u32(e, vdupq_n_u32(0x3f800000u)));
    uint32x4_t tiny = vcltq_f32(n, vdupq_n_f32(-125.0f));
    if (vmaxvq_u32(tiny) == 0)
        return vfmaq_f32(scale, poly, scale);
    /* n in [-150, -126]: (2^(n+64) (1 + poly)) * 2^-64, one rounding into the subnormals. */
    float32x4_t s2 = vreinterpretq_f32_u32(vaddq_u32(e, vdupq_n_u32(0x3f800000u + (64u << 23))));
    float32x4_t small = vmulq_f32(vfmaq_f32(s2, poly, s2), vdupq_n_f32(0x1p-64f));
    return vbslq_f32(tiny, small, vfmaq_f32(scale, poly, scale));
}

/*
 * expm1(x) for 0 <= x <= 20 (the only range tanh below needs), a couple of ulp:
 * x = i ln2 + f, expm1(x) = 2^i expm1(f) + (2^i - 1), expm1(f) by its Taylor series to f^7
 * (truncation < 0.4 ulp on |f| <= ln2/2).
 */
ALWAYS_INLINE float32x4_t v_expm1_pos(float32x4_t x)
{
    const float32x4_t shift = vdupq_n_f32(0x1.8p23f);
    float32x4_t z = vfmaq_f32(shift, x, vdupq_n_f32(0x1.715476p+0f));
    float32x4_t n = vsubq_f32(z, shift);
    float32x4_t f = vfmsq_f32(x, n, vdupq_n_f32(0x1.62e4p-1f));
    f = vfmsq_f32(f, n, vdupq_n_f32(0x1.7f7d1cp-20f));
    /* P(f) = 1/2 + f/6 + f^2/24 + f^3/120 + f^4/720 + f^5/5040 */
    float32x4_t p = vfmaq_f32(vdupq_n_f32(1.0f / 720.0f), f, vdupq_n_f32(1.0f / 5040.0f));
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120.0f), f, p);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24.0f), f, p);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6.0f), f, p);
    p = vfmaq_f32(vdupq_n_f32(0.5f), f, p);
    float32x4_t em1f = vfmaq_f32(f, vmulq_f32(f, f), p);
    uint32x4_t e = vshlq_n_u32(vreinterpretq_u32_f32(z), 23);
    float32x4_t t = vreinterpretq_f32_u32(vaddq_u32(e, vdupq_n_u32(0x3f800000u)));
    return vfmaq_f32(vsubq_f32(t, vdupq_n_f32(1.0f)), em1f, t);
}

/* tanh(x) = sign(x) * e / (e + 2), e = expm1(2|x|); |x| is clamped at 10 (tanh = 1 in float
 * from about 9.01). A few ulp; NaN gives NaN. */
ALWAYS_INLINE float32x4_t v_tanh(float32x4_t x)
{
    uint32x4_t sign = vandq_u32(vreinterpretq_u32_f32(x), vdupq_n_u32(0x80000000u));
    float32x4_t a = vminq_f32(vabsq_f32(x), vdupq_n_f32(10.0f)); /* FMIN keeps NaN */
    float32x4_t e = v_expm1_pos(vaddq_f32(a, a));
    float32x4_t t = vdivq_f32(e, vaddq_f32(e, vdupq_n_f32(2.0f)));
    return vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(t), sign));
}

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

/* Selection byte of positions c..c+7 (bit j = position c + j), given 0 <= lo, hi <= n. Reads
 * only the bitmask words holding selected-range positions [max(lo, c), min(hi, c + 8)). */
ALWAYS_INLINE unsigned sel_byte(const uint64_t *bits, int bit0, int lo, int hi, int c)
{
    int a = lo - c, e = hi - c;
    if (e <= 0 || a >= 8 || e <= a)
        return 0;
    a = a < 0 ? 0 : a;
    e = e > 8 ? 8 : e;
    unsigned r = (0xffu >> (8 - (e - a))) << a;
    if (bits) {
        uint64_t pos = (uint64_t)(int64_t)bit0 + (uint64_t)(c + a);
        uint64_t w = pos >> 6;
        unsigned sh = (unsigned)(pos & 63);
        uint64_t v = bits[w] >> sh;
        if (sh + (unsigned)(e - a) > 64) /* the range runs into the next word */
            v |= bits[w + 1] << (64 - sh);
        r &= (unsigned)(v << a) & 0xffu;
    }
    return r;
}

static const uint32_t lane_bits[8] = {1, 2, 4, 8, 16, 32, 64, 128};

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
/* Backward: grad_row, accum_tn                                                                */
/* ------------------------------------------------------------------------------------------ */

/* One 4-lane half of grad_row: mask selects the lanes; dx_sum may be NULL. */
ALWAYS_INLINE void gr_quad(float *s, float *dp, const float *bias, float softcap, float32x4_t vlse,
                           float32x4_t vdelta, float *dx_sum, uint32x4_t mask)
{
    float32x4_t t = vld1q_f32(s), slope = vdupq_n_f32(1.0f);
    if (softcap > 0.0f) {
        float32x4_t sc = vdupq_n_f32(softcap);
        t = vmulq_f32(sc, v_tanh(vdivq_f32(t, sc)));
        float32x4_t u = vdivq_f32(t, sc);
        slope = vfmsq_f32(slope, u, u);
    }
    float32x4_t x = bias ? vaddq_f32(t, vld1q_f32(bias)) : t;
    float32x4_t p = v_exp(vsubq_f32(x, vlse));
    float32x4_t dx = vmulq_f32(p, vsubq_f32(vld1q_f32(dp), vdelta));
    float32x4_t ds = softcap > 0.0f ? vmulq_f32(dx, slope) : dx;
    vst1q_f32(s, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(p), mask)));
    vst1q_f32(dp, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(ds), mask)));
    if (dx_sum) { /* unselected lanes keep their exact bits */
        float32x4_t acc = vld1q_f32(dx_sum);
        vst1q_f32(dx_sum, vbslq_f32(mask, vaddq_f32(acc, dx), acc));
    }
}

/* grad_row on positions c..c+7 with selection byte `byte`. */
ALWAYS_INLINE void gr_block(float *s, float *dp, const float *bias, float softcap,
                            float32x4_t vlse, float32x4_t vdelta, float *dx_sum, unsigned byte,
                            uint32x4_t lb0, uint32x4_t lb1)
{
    if (!byte) {
        vst1q_f32(s, vdupq_n_f32(0.0f));
        vst1q_f32(s + 4, vdupq_n_f32(0.0f));
        vst1q_f32(dp, vdupq_n_f32(0.0f));
        vst1q_f32(dp + 4, vdupq_n_f32(0.0f));
        return;
    }
    uint32x4_t bv = vdupq_n_u32(byte);
    gr_quad(s, dp, bias, softcap, vlse, vdelta, dx_sum, vtstq_u32(bv, lb0));
    gr_quad(s + 4, dp + 4, bias ? bias + 4 : NULL, softcap, vlse, vdelta,
            dx_sum ? dx_sum + 4 : NULL, vtstq_u32(bv, lb1));
}

static void grad_row(float *s, float *dp, int n, const float *bias, const uint64_t *bits,
                     int bit0, int lo, int hi, float softcap, float lse, float delta,
                     float *dx_sum)
{
    if (lse == -INFINITY) {
        memset(s, 0, sizeof(float) * (size_t)n);
        memset(dp, 0, sizeof(float) * (size_t)n);
        return;
    }
    const uint32x4_t lb0 = vld1q_u32(lane_bits), lb1 = vld1q_u32(lane_bits + 4);
    const float32x4_t vlse = vdupq_n_f32(lse), vdelta = vdupq_n_f32(delta);
    if (lo < 0)
        lo = 0;
    if (hi > n)
        hi = n;
    const int n8 = n & ~7;
    for (int c = 0; c < n8; c += 8)
        gr_block(s + c, dp + c, bias ? bias + c : NULL, softcap, vlse, vdelta,
                 dx_sum ? dx_sum + c : NULL, sel_byte(bits, bit0, lo, hi, c), lb0, lb1);
    if (n8 < n) { /* n % 8 != 0 is outside the contract (n is a multiple of NR); handled anyway */
        const size_t tail = sizeof(float) * (size_t)(n - n8);
        float ts[8] = {0}, tdp[8] = {0}, tb[8] = {0}, tsum[8] = {0};
        memcpy(ts, s + n8, tail);
        memcpy(tdp, dp + n8, tail);
        if (bias)
            memcpy(tb, bias + n8, tail);
        if (dx_sum)
            memcpy(tsum, dx_sum + n8, tail);
        gr_block(ts, tdp, bias ? tb : NULL, softcap, vlse, vdelta, dx_sum ? tsum : NULL,
                 sel_byte(bits, bit0, lo, hi, n8), lb0, lb1);
        memcpy(s + n8, ts, tail);
        memcpy(dp + n8, tdp, tail);
        if (dx_sum)
            memcpy(dx_sum + n8, tsum, tail);
    }
}

/* The first `cnt` (1..3) floats at p in lanes 0..cnt-1, zeros above (reads nothing past them). */
ALWAYS_INLINE float32x4_t load_part(const float *p, const int cnt)
{
    float32x4_t v = vld1q_lane_f32(p, vdupq_n_f32(0.0f), 0);
    if (cnt > 1)
        v = vld1q_lane_f32(p + 1, v, 1);
    if (cnt > 2)
        v = vld1q_lane_f32(p + 2, v, 2);
    return v;
}

#define TN_KEY(J, PV, L)                                                                       \
    do {                                                                                       \
        if (M > (J)) {                                                                         \
            acc0[J] = vfmaq_laneq_f32(acc0[J], x0, PV, L);                                     \
            if (W > 1)                                                                         \
                acc1[J] = vfmaq_laneq_f32(acc1[J], x1, PV, L);                                 \
        }                                                                                      \
    } while (0)

/* Rows of x (and of p) per pass over a column strip: keeps the strip of x in L1. */
#define TN_KC 64

/* M keys x 4 W columns (W = 1 or 2) of o += p^T x over k rows, starting at column o / x;
 * with `fresh`, o = p^T x (o is not read). */
ALWAYS_INLINE void tn_block(const int M, const int W, float *o, int ldo, const float *p, int ldp,
                            const float *x, int ldx, int k, int fresh)
{
    float32x4_t acc0[MR], acc1[MR];
    _Pragma("GCC unroll 8") for (int c = 0; c < M; c++)
    {
        acc0[c] = fresh ? vdupq_n_f32(0.0f) : vld1q_f32(o + (ptrdiff_t)c * ldo);
        acc1[c] = fresh ? acc0[c] : W > 1 ? vld1q_f32(o + (ptrdiff_t)c * ldo + 4) : acc0[c];
    }
    for (int r = 0; r < k; r++) {
        const float *pr = p + (ptrdiff_t)r * ldp, *xr = x + (ptrdiff_t)r * ldx;
        float32x4_t pv0 = M >= 4 ? vld1q_f32(pr) : load_part(pr, M);
        float32x4_t pv1 = M == 8 ? vld1q_f32(pr + 4) : M > 4 ? load_part(pr + 4, M - 4) : pv0;
        float32x4_t x0 = vld1q_f32(xr), x1 = W > 1 ? vld1q_f32(xr + 4) : x0;
        TN_KEY(0, pv0, 0);
        TN_KEY(1, pv0, 1);
        TN_KEY(2, pv0, 2);
        TN_KEY(3, pv0, 3);
        TN_KEY(4, pv1, 0);
        TN_KEY(5, pv1, 1);
        TN_KEY(6, pv1, 2);
        TN_KEY(7, pv1, 3);
    }
    _Pragma("GCC unroll 8") for (int c = 0; c < M; c++)
    {
        vst1q_f32(o + (ptrdiff_t)c * ldo, acc0[c]);
        if (W > 1)
            vst1q_f32(o + (ptrdiff_t)c * ldo + 4, acc1[c]);
    }
}

#define TN_M(M)                                                                                \
    static void tn_m##M(float *o, int ldo, const float *p, int ldp, const float *x, int ldx,  \
                        int k, int D, int overwrite)                                           \
    {                                                                                          \
        const int D4 = (D + 3) & ~3; /* <= ldo, ldx; columns D..D4-1 are zero-padding */       \
        for (int r0 = 0; r0 < k; r0 += TN_KC) {                                                \
            const int kc = k - r0 < TN_KC ? k - r0 : TN_KC;                                    \
            const float *pc = p + (ptrdiff_t)r0 * ldp, *xc = x + (ptrdiff_t)r0 * ldx;          \
            int d = 0;                                                                         \
            for (; d + 8 <= D4; d += 8)                                                        \
                tn_block(M, 2, o + d, ldo, pc, ldp, xc + d, ldx, kc, overwrite && r0 == 0);    \
            if (d < D4)                                                                        \
                tn_block(M, 1, o + d, ldo, pc, ldp, xc + d, ldx, kc, overwrite && r0 == 0);    \
        }                                                                                      \
    }
TN_M(1)
TN_M(2)
TN_M(3)
TN_M(4)
TN_M(5)
TN_M(6)
TN_M(7)
TN_M(8)

static void accum_tn(float *o, int ldo, const float *p, int ldp, int m, const float *x, int ldx,
                     int k, int D, int overwrite)
{
    switch (m) {
    case 1: tn_m1(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 2: tn_m2(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 3: tn_m3(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 4: tn_m4(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 5: tn_m5(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 6: tn_m6(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 7: tn_m7(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    case 8: tn_m8(o, ldo, p, ldp, x, ldx, k, D, overwrite); break;
    default: /* more keys than one register block: MR at a time */
        for (int c = 0; c < m; c += MR)
            accum_tn(o + (ptrdiff_t)c * ldo, ldo, p + c, ldp, m - c < MR ? m - c : MR, x, ldx, k,
                     D, overwrite);
        break;
    }
}

/* add_rows of lib/kernels.h: 4 floats per add, then the tail one by one. */
static void add_rows(float *const *dst, const float *const *src, int m, int n)
{
    for (int j = 0; j < m; j++) {
        float *o = dst[j];
        const float *x = src[j];
        int i = 0;
        for (; i + 4 <= n; i += 4)
            vst1q_f32(o + i, vaddq_f32(vld1q_f32(o + i), vld1q_f32(x + i)));
        for (; i < n; i++)
            o[i] += x[i];
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

const dma_kernels dma_kernels_neon = {
    .name = "neon",
    .mr = MR,
    .nr = NR,
    .select_step = NR,
    .pv_rows = MR,
    .pack_k = pack_k,
    .pack_v = pack_v,
    .scores = scores,
    .softmax_row = softmax_row,
    .accum_pv = accum_pv,
    .grad_row = grad_row,
    .accum_tn = accum_tn,
    .add_rows = add_rows,
    .to_f32 = to_f32,
    .from_f32 = from_f32,
    .pack_k_half = pack_k_half,
    .dots = dots,
    .scores_select = scores_select,
    .softmax_exp = softmax_exp,
};

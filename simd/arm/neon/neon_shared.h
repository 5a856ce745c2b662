/*
 * neon_shared.h - what the NEON kernel files (kernels_neon.c: the table, the forward's kernels,
 * half precision; kernels_neon_backward.c: the backward's) share: block sizes, the vector exp and
 * tanh, the selection bytes, and the backward kernels the table points to.
 */
#ifndef DMATTN_NEON_SHARED_H
#define DMATTN_NEON_SHARED_H

#include <arm_neon.h>
#include <stdint.h>

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
/* Selection                                                                                   */
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

/* The backward's kernels (kernels_neon_backward.c), as lib/kernels.h describes them. */
void dma_neon_grad_row(float *s, float *dp, int n, const float *bias, const uint64_t *bits,
                       int bit0, int lo, int hi, float softcap, float lse, float delta,
                       float *dx_sum);
void dma_neon_accum_tn(float *o, int ldo, const float *p, int ldp, int m, const float *x,
                       int ldx, int k, int D, int overwrite);
void dma_neon_add_rows(float *const *dst, const float *const *src, int m, int n);

#endif

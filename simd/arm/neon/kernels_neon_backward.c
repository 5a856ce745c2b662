/*
 * kernels_neon_backward.c - the backward's inner kernels for Arm Advanced SIMD (aarch64 NEON),
 * which the NEON table (kernels_neon.c) points to. Same semantics as lib/kernels_scalar.c.
 *
 *   grad_row:    as softmax_row, 8 positions at a time (p, ds, and dx_sum only where selected).
 *   accum_tn:    register block of up to 8 keys x 8 columns of o; the 8 P values of a query row
 *                are one or two vector loads (lanes loaded one by one below 8 keys, so nothing
 *                past column m - 1 of P is read); rows in passes of TN_KC to keep X in L1.
 *   add_rows:    4 floats per add.
 */
#include <arm_neon.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "kernels.h"
#include "neon_shared.h"

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

void dma_neon_grad_row(float *s, float *dp, int n, const float *bias, const uint64_t *bits,
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

void dma_neon_accum_tn(float *o, int ldo, const float *p, int ldp, int m, const float *x,
                       int ldx, int k, int D, int overwrite)
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
            dma_neon_accum_tn(o + (ptrdiff_t)c * ldo, ldo, p + c, ldp, m - c < MR ? m - c : MR,
                              x, ldx, k, D, overwrite);
        break;
    }
}

/* add_rows of lib/kernels.h: 4 floats per add, then the tail one by one. */
void dma_neon_add_rows(float *const *dst, const float *const *src, int m, int n)
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

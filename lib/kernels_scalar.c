/*
 * kernels_scalar.c - the portable C inner kernels of the forward: the readable reference for
 * every SIMD file. Layouts are described in kernels.h.
 *
 * The softmax lives in softmax_row() below (and in its SIMD twins).
 */
#include <math.h>
#include <string.h>

#include "kernels.h"

#define NR 8
#define MR 4

static const float *key_row(const float *base, int64_t ld, const int32_t *keys, int32_t first,
                            int c)
{
    return base + (int64_t)(keys ? keys[c] : first + c) * ld;
}

static void pack_k(float *kp, const float *base, int64_t ld, const int32_t *keys, int32_t first,
                   int n, int D)
{
    int n_pad = (n + NR - 1) / NR * NR;
    for (int c = 0; c < n_pad; c++) {
        float *dst = kp + (c / NR) * (D * NR) + c % NR;
        if (c < n) {
            const float *src = key_row(base, ld, keys, first, c);
            for (int d = 0; d < D; d++)
                dst[d * NR] = src[d];
        } else {
            for (int d = 0; d < D; d++)
                dst[d * NR] = 0.0f;
        }
    }
}

static void pack_v(float *vp, int ldv, const float *base, int64_t ld, const int32_t *keys,
                   int32_t first, int n, int D)
{
    for (int c = 0; c < n; c++) {
        memcpy(vp + (int64_t)c * ldv, key_row(base, ld, keys, first, c), sizeof(float) * D);
        memset(vp + (int64_t)c * ldv + D, 0, sizeof(float) * (ldv - D));
    }
}

static void scores(float *s, int lds, const float *q, int ldq, int m, const float *kp, int n,
                   int D)
{
    for (int c0 = 0; c0 < n; c0 += NR) {
        const float *panel = kp + (int64_t)c0 * D;
        for (int r = 0; r < m; r++) {
            float acc[NR] = {0};
            for (int d = 0; d < D; d++) {
                float qv = q[(int64_t)r * ldq + d];
                for (int j = 0; j < NR; j++)
                    acc[j] += qv * panel[d * NR + j];
            }
            memcpy(s + (int64_t)r * lds + c0, acc, sizeof acc);
        }
    }
}

static int selected(const uint64_t *bits, int bit0, int lo, int hi, int c)
{
    if (c < lo || c >= hi)
        return 0;
    if (!bits)
        return 1;
    int b = bit0 + c;
    return (int)((bits[b >> 6] >> (b & 63)) & 1u);
}

static float softmax_row(float *s, int n, const float *bias, const uint64_t *bits, int bit0,
                         int lo, int hi, float softcap, float *m, float *l)
{
    float chunk_max = -INFINITY;
    for (int c = 0; c < n; c++) {
        if (!selected(bits, bit0, lo, hi, c))
            continue;
        float x = s[c];
        if (softcap > 0.0f)
            x = softcap * tanhf(x / softcap);
        if (bias)
            x += bias[c];
        s[c] = x;
        if (x > chunk_max)
            chunk_max = x;
    }
    float m_new = chunk_max > *m ? chunk_max : *m;
    if (m_new == -INFINITY) {
        /* Rare: no selected logit above -inf so far. The max skips NaN, so look for a selected
         * NaN logit: it makes the row NaN (m_new = NaN carries it into p, l, m and alpha);
         * without one the row is (still) empty. */
        int nan = 0;
        for (int c = lo > 0 ? lo : 0; c < hi && c < n && !nan; c++)
            nan = selected(bits, bit0, lo, hi, c) && isnan(s[c]);
        if (!nan) {
            memset(s, 0, sizeof(float) * n);
            return 1.0f;
        }
        m_new = NAN;
    }
    float alpha = expf(*m - m_new);
    float sum = 0.0f;
    for (int c = 0; c < n; c++) {
        float p = selected(bits, bit0, lo, hi, c) ? expf(s[c] - m_new) : 0.0f;
        s[c] = p;
        sum += p;
    }
    *l = *l * alpha + sum;
    *m = m_new;
    return alpha;
}

static void accum_pv(float *o, int ldo, const float *alpha, const float *p, int ldp, int m,
                     const float *vp, int ldv, int n, int D)
{
    for (int r = 0; r < m; r++) {
        float *orow = o + (int64_t)r * ldo;
        for (int d = 0; d < D; d++)
            orow[d] *= alpha[r];
        for (int c = 0; c < n; c++) {
            float pc = p[(int64_t)r * ldp + c];
            const float *vrow = vp + (int64_t)c * ldv;
            for (int d = 0; d < D; d++)
                orow[d] += pc * vrow[d];
        }
    }
}

static void grad_row(float *s, float *dp, int n, const float *bias, const uint64_t *bits,
                     int bit0, int lo, int hi, float softcap, float lse, float delta,
                     float *dx_sum)
{
    for (int c = 0; c < n; c++) {
        if (lse == -INFINITY || !selected(bits, bit0, lo, hi, c)) {
            s[c] = dp[c] = 0.0f;
            continue;
        }
        float t = softcap > 0.0f ? softcap * tanhf(s[c] / softcap) : s[c];
        float x = t + (bias ? bias[c] : 0.0f);
        float p = expf(x - lse);
        float dx = p * (dp[c] - delta);
        float slope = softcap > 0.0f ? 1.0f - (t / softcap) * (t / softcap) : 1.0f;
        s[c] = p;
        dp[c] = dx * slope;
        if (dx_sum)
            dx_sum[c] += dx;
    }
}

static void accum_tn(float *o, int ldo, const float *p, int ldp, int m, const float *x, int ldx,
                     int k, int D, int overwrite)
{
    for (int c = 0; c < m; c++) {
        float *orow = o + (int64_t)c * ldo;
        if (overwrite)
            for (int d = 0; d < D; d++)
                orow[d] = 0.0f;
        for (int r = 0; r < k; r++) {
            float pc = p[(int64_t)r * ldp + c];
            const float *xrow = x + (int64_t)r * ldx;
            for (int d = 0; d < D; d++)
                orow[d] += pc * xrow[d];
        }
    }
}

const dma_kernels dma_kernels_scalar = {
    .name = "scalar",
    .mr = MR,
    .nr = NR,
    /* not a divisor of MR: the reference path also runs the backward's dQ in blocks of rows
     * that straddle blocks of MR rows, as the AVX-512 path does */
    .pv_rows = 3,
    .pack_k = pack_k,
    .pack_v = pack_v,
    .scores = scores,
    .softmax_row = softmax_row,
    .accum_pv = accum_pv,
    .grad_row = grad_row,
    .accum_tn = accum_tn,
};

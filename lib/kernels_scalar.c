/*
 * kernels_scalar.c - the portable C inner kernels of the forward: the readable reference for
 * every SIMD file. Layouts are described in kernels.h.
 *
 * The softmax lives in softmax_row() below (and in its SIMD twins).
 */
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "kernels_generic.h"

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

/* softmax_row's first pass: x = softcap * tanh(s / softcap) (if softcap > 0) + bias at the
 * selected positions, -inf at the others; returns the max of the selected x (-inf if none; a
 * NaN x is skipped, as `x > max` does). */
static float select_row(float *s, int n, const float *bias, const uint64_t *bits, int bit0,
                        int lo, int hi, float softcap)
{
    float chunk_max = -INFINITY;
    for (int c = 0; c < n; c++) {
        if (!selected(bits, bit0, lo, hi, c)) {
            s[c] = -INFINITY;
            continue;
        }
        float x = s[c];
        if (softcap > 0.0f)
            x = softcap * tanhf(x / softcap);
        if (bias)
            x += bias[c];
        s[c] = x;
        if (x > chunk_max)
            chunk_max = x;
    }
    return chunk_max;
}

/* softmax_row's second pass over a row select_row wrote: -inf marks the unselected, whose exp
 * is 0. */
static float softmax_exp(float *s, int n, float chunk_max, float *m, float *l)
{
    float m_new = chunk_max > *m ? chunk_max : *m;
    if (m_new == -INFINITY) {
        /* Rare: no selected logit above -inf so far. The max skips NaN, so look for a selected
         * NaN logit (the only NaN s can hold): it makes the row NaN (m_new = NaN carries it into
         * p, l, m and alpha); without one the row is (still) empty. */
        int nan = 0;
        for (int c = 0; c < n && !nan; c++)
            nan = isnan(s[c]);
        if (!nan) {
            memset(s, 0, sizeof(float) * n);
            return 1.0f;
        }
        m_new = NAN;
    }
    float alpha = expf(*m - m_new);
    float sum = 0.0f;
    for (int c = 0; c < n; c++) {
        s[c] = expf(s[c] - m_new);
        sum += s[c];
    }
    *l = *l * alpha + sum;
    *m = m_new;
    return alpha;
}

static float softmax_row(float *s, int n, const float *bias, const uint64_t *bits, int bit0,
                         int lo, int hi, float softcap, float *m, float *l)
{
    return softmax_exp(s, n, select_row(s, n, bias, bits, bit0, lo, hi, softcap), m, l);
}

/* The scores of the n keys from key `off` of the block at kp (any off < NR, any n), then
 * select_row on each row (no softcap): softmax_row's first pass in the same call. */
static void scores_select(float *s, int lds, const float *q, int ldq, int m, const float *kp,
                          int off, int n, int D, const float *const *bias,
                          const uint64_t *const *bits, int bit0, const int *lo, const int *hi,
                          float *rowmax)
{
    for (int r = 0; r < m; r++) {
        float *row = s + (int64_t)r * lds;
        for (int c = 0; c < n; c++) {
            const int j = off + c; /* the key's place in the panel */
            const float *kcol = kp + (int64_t)(j / NR) * (D * NR) + j % NR;
            float acc = 0.0f;
            for (int d = 0; d < D; d++)
                acc += q[(int64_t)r * ldq + d] * kcol[d * NR];
            row[c] = acc;
        }
        rowmax[r] = select_row(row, n, bias[r], bits[r], bit0, lo[r], hi[r], 0.0f);
    }
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

/* add_rows of lib/kernels.h: the definition every table must match. */
static void add_rows(float *const *dst, const float *const *src, int m, int n)
{
    for (int j = 0; j < m; j++)
        for (int i = 0; i < n; i++)
            dst[j][i] += src[j][i];
}

/* scale_row of lib/kernels.h: the definition every table must match. */
static int scale_row(float *dst, const float *src, float s, int n)
{
    int nan = 0;
    for (int i = 0; i < n; i++) {
        dst[i] = s * src[i];
        nan |= isnan(dst[i]);
    }
    return nan;
}

/* ---- half precision: plain bit manipulation, the definition every SIMD file must match ---- */

static uint32_t f32_bits(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return x;
}

static float bits_f32(uint32_t x)
{
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

/* binary16 -> float32 bits. */
static uint32_t f16_to_bits(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) /* inf, or NaN made quiet with its payload */
        return sign | 0x7f800000u | (m << 13) | (m ? 0x00400000u : 0u);
    if (e)
        return sign | ((e + 112) << 23) | (m << 13); /* rebias 15 -> 127 */
    if (!m)
        return sign;
    /* subnormal m * 2^-24: normalise so bit 10 is the implicit one */
    e = 113; /* the float exponent field of 2^-14, the binade of m = 0x400 */
    while (!(m & 0x400u)) {
        m <<= 1;
        e--;
    }
    return sign | (e << 23) | ((m & 0x3ffu) << 13);
}

/* float32 bits -> binary16, round to nearest even. */
static uint16_t f16_from_bits(uint32_t x)
{
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: quiet, top 10 payload bits kept */
        return sign | 0x7e00u | (uint16_t)((a >> 13) & 0x3ffu);
    if (a >= 0x47800000u) /* >= 2^16 and inf: past anything that rounds to 65504 */
        return sign | 0x7c00u;
    if (a >= 0x38800000u) { /* binary16 normal: round at bit 13, then rebias the exponent; */
        a += 0xfffu + ((a >> 13) & 1u); /* a carry out of 65504's binade gives inf (0x7c00) */
        return sign | (uint16_t)((a - 0x38000000u) >> 13);
    }
    /* binary16 subnormal or zero: the value m * 2^(e - 150) is m >> (126 - e) units of 2^-24 */
    int shift = 126 - (int)(a >> 23);
    if (shift > 24) /* below 2^-25 (float zeros and subnormals too): rounds to 0 */
        return sign;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (q & 1u)))
        q++; /* may reach 0x400, the smallest normal: the encoding is still right */
    return sign | (uint16_t)q;
}

/* float32 bits -> bf16, round to nearest even at bit 16 (subnormals and overflow to inf follow
 * from the carry). */
static uint16_t bf16_from_bits(uint32_t x)
{
    if ((x & 0x7fffffffu) > 0x7f800000u) /* NaN: keep sign and top payload bits, make quiet */
        return (uint16_t)((x >> 16) | 0x0040u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static void to_f32(float *dst, const uint16_t *src, int64_t n, int f16)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = bits_f32(f16 ? f16_to_bits(src[i]) : (uint32_t)src[i] << 16);
}

static void from_f32(uint16_t *dst, const float *src, int64_t n, int f16)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = f16 ? f16_from_bits(f32_bits(src[i])) : bf16_from_bits(f32_bits(src[i]));
}

/* pack_k_half of lib/kernels.h: rows converted, then this table's pack_k. */
static void pack_k_half(float *kp, const uint16_t *base, int64_t ld, const int32_t *keys,
                        int32_t first, int n, int D, int f16)
{
    generic_pack_k_half(kp, base, ld, keys, first, n, D, f16, NR, to_f32, pack_k);
}

/* dots of lib/kernels.h: one key row at a time for all m rows. */
static void dots(float *s, int lds, const float *q, int ldq, int m, const float *k, int ldk,
                 int n, int D)
{
    for (int c = 0; c < n; c++)
        for (int r = 0; r < m; r++) {
            float acc = 0.0f;
            for (int d = 0; d < D; d++)
                acc += q[(int64_t)r * ldq + d] * k[(int64_t)c * ldk + d];
            s[(int64_t)r * lds + c] = acc;
        }
}

void dma_prefetch_write(const void *p, int64_t bytes) { dma_prefetch_lines(p, bytes); }

const dma_kernels dma_kernels_scalar = {
    .name = "scalar",
    .mr = MR,
    .nr = NR,
    .select_step = NR,
    /* not a divisor of MR: the reference path also runs the backward's dQ in blocks of rows
     * that straddle blocks of MR rows, as the AVX-512 path does */
    .pv_rows = 3,
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

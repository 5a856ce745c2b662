/*
 * test_kernels_half.c - the half-precision conversions of every kernel table the host can run
 * (lib/kernels.h: to_f32, from_f32) against independent references written here, bit for bit,
 * over every bf16 and binary16 pattern and millions of floats; and the SIMD tables against the
 * scalar one at every length and alignment, with guard elements that catch writes past the end.
 */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernel_test.h"
#include "kernels.h"

/* ------------------------------------------------------------------------------------------ */
/* Half precision: to_f32, from_f32                                                           */
/* ------------------------------------------------------------------------------------------ */

/* Failures are rare, so the loops over millions of values test with a plain `if` and abort with
 * a message (ck_assert_msg records a mark point on every call). */

static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The value of a bf16 / binary16 pattern (NaN for a NaN), from the format's definition. */
static double half_value(uint16_t h, int f16)
{
    if (!f16)
        return (double)u2f((uint32_t)h << 16);
    double sign = (h & 0x8000) ? -1.0 : 1.0;
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f)
        return m ? NAN : sign * INFINITY;
    return sign * (e ? ldexp(1024 + m, e - 25) : ldexp(m, -24));
}

/* to_f32's bits: bf16 is the top half of a float; binary16 the exact value, a NaN made quiet
 * with its sign and payload (kernels.h). */
static uint32_t ref_to_f32(uint16_t h, int f16)
{
    if (!f16)
        return (uint32_t)h << 16;
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff))
        return (uint32_t)(h & 0x8000) << 16 | 0x7fc00000u | (uint32_t)(h & 0x3ff) << 13;
    return f2u((float)half_value(h, 1));
}

/* x rounded to p significant bits, nearest even, with exponents >= emin (gradual underflow) and
 * +-inf past max. Every step is exact in double. */
static double round_sig(double x, int p, int emin, double max)
{
    double ax = fabs(x);
    if (ax == 0.0 || isinf(ax))
        return x;
    int e = ilogb(ax);
    if (e < emin)
        e = emin;
    double q = ldexp(ax, p - 1 - e), fl = floor(q), frac = q - fl;
    if (frac > 0.5 || (frac == 0.5 && fmod(fl, 2.0) == 1.0))
        fl += 1.0;
    double v = ldexp(fl, e - p + 1);
    return copysign(v > max ? INFINITY : v, x);
}

/* Whether h is from_f32's right answer for x: the value round_sig gives (sign of zero
 * included), a NaN by kernels.h's rule, and for binary16 the bits of the compiler's _Float16
 * conversion (IEEE, nearest even) where it has one. */
static int from_f32_ok(uint16_t h, float x, int f16)
{
    uint32_t u = f2u(x);
    if (isnan(x))
        return h == (f16 ? (uint16_t)(((u >> 16) & 0x8000) | 0x7e00 | ((u >> 13) & 0x3ff))
                         : (uint16_t)((u >> 16) | 0x40));
    double want = f16 ? round_sig(x, 11, -14, 65504.0) : round_sig(x, 8, -126, ldexp(255, 120));
    double got = half_value(h, f16);
    if (!(got == want && !signbit(got) == !signbit(want)))
        return 0;
#if defined(__FLT16_MAX__)
    if (f16) {
        _Float16 y = (_Float16)x;
        uint16_t yb;
        memcpy(&yb, &y, sizeof yb);
        return h == yb;
    }
#endif
    return 1;
}

/* Values the guard elements around a kernel's output hold. */
static const uint16_t GUARD16 = 0xdead;
static const uint32_t GUARD32 = 0xdeadbeefu;

/* Runs k->to_f32 on src[0..n), copied to element offset `off` of an exactly-sized buffer (ASan
 * sees its end; odd offsets leave it unaligned), into a buffer of `doff` guard floats, the n
 * results and `guard` guard floats; checks the guards and returns the n results (malloc'd). */
static float *run_to_f32(const dma_kernels *k, const uint16_t *src, int64_t n, int f16, int off,
                         int doff, int guard)
{
    uint16_t *in = malloc(sizeof(uint16_t) * (size_t)(off + n));
    float *out = malloc(sizeof(float) * (size_t)(doff + n + guard));
    ck_assert_ptr_nonnull(in);
    ck_assert_ptr_nonnull(out);
    memcpy(in + off, src, sizeof(uint16_t) * (size_t)n);
    for (int64_t i = 0; i < doff + n + guard; i++)
        out[i] = u2f(GUARD32);
    k->to_f32(out + doff, in + off, n, f16);
    for (int64_t i = 0; i < doff + n + guard; i++)
        if ((i < doff || i >= doff + n) && f2u(out[i]) != GUARD32)
            ck_abort_msg("%s to_f32 f16=%d n=%lld wrote element %lld outside [%d, %lld)",
                         k->name, f16, (long long)n, (long long)i, doff, (long long)(doff + n));
    float *res = malloc(sizeof(float) * (size_t)(n ? n : 1));
    ck_assert_ptr_nonnull(res);
    memcpy(res, out + doff, sizeof(float) * (size_t)n);
    free(in);
    free(out);
    return res;
}

/* The same for from_f32. */
static uint16_t *run_from_f32(const dma_kernels *k, const float *src, int64_t n, int f16,
                              int off, int doff, int guard)
{
    float *in = malloc(sizeof(float) * (size_t)(off + n));
    uint16_t *out = malloc(sizeof(uint16_t) * (size_t)(doff + n + guard));
    ck_assert_ptr_nonnull(in);
    ck_assert_ptr_nonnull(out);
    memcpy(in + off, src, sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < doff + n + guard; i++)
        out[i] = GUARD16;
    k->from_f32(out + doff, in + off, n, f16);
    for (int64_t i = 0; i < doff + n + guard; i++)
        if ((i < doff || i >= doff + n) && out[i] != GUARD16)
            ck_abort_msg("%s from_f32 f16=%d n=%lld wrote element %lld outside [%d, %lld)",
                         k->name, f16, (long long)n, (long long)i, doff, (long long)(doff + n));
    uint16_t *res = malloc(sizeof(uint16_t) * (size_t)(n ? n : 1));
    ck_assert_ptr_nonnull(res);
    memcpy(res, out + doff, sizeof(uint16_t) * (size_t)n);
    free(in);
    free(out);
    return res;
}

/* Every one of the 65536 patterns, both formats: the scalar table against the reference decode,
 * every table against the scalar one bit for bit (all at once from unaligned pointers, and in
 * runs of 1..40 for the tails), and back through from_f32 to the same pattern (a NaN comes back
 * quiet). */
START_TEST(half_to_f32)
{
    table tb[4];
    int nt = kernel_tables(tb);
    const dma_kernels *ref = &dma_kernels_scalar;
    const int64_t N = 65536;
    uint16_t *all = malloc(sizeof(uint16_t) * (size_t)N);
    ck_assert_ptr_nonnull(all);
    for (int64_t i = 0; i < N; i++)
        all[i] = (uint16_t)i;
    test_rng r = rng_make(808);
    for (int f16 = 0; f16 <= 1; f16++) {
        float *want = run_to_f32(ref, all, N, f16, 0, 0, 0);
        for (int64_t i = 0; i < N; i++)
            if (f2u(want[i]) != ref_to_f32((uint16_t)i, f16))
                ck_abort_msg("scalar to_f32 f16=%d of 0x%04x: 0x%08x, reference 0x%08x", f16,
                             (unsigned)i, f2u(want[i]), ref_to_f32((uint16_t)i, f16));
        for (int t = 0; t < nt; t++) {
            const dma_kernels *k = tb[t].k;
            float *got = run_to_f32(k, all, N, f16, 1, 3, 40);
            for (int64_t i = 0; i < N; i++)
                if (f2u(got[i]) != f2u(want[i]))
                    ck_abort_msg("%s to_f32 f16=%d of 0x%04x: 0x%08x, scalar 0x%08x", k->name,
                                 f16, (unsigned)i, f2u(got[i]), f2u(want[i]));
            free(got);
            /* tails: runs of n from starts near zero, the subnormals, inf / NaN and at random */
            for (int n = 1; n <= 40; n++)
                for (int rep = 0; rep < 6; rep++) {
                    static const int64_t starts[] = {0, 0x3f0, 0x7bf0, 0x7c00, 0xfbf8};
                    int64_t s0 = rep < 5 ? starts[rep] : rng_int(&r, 0, N - 40);
                    int off = (int)rng_int(&r, 0, 7), doff = (int)rng_int(&r, 0, 7);
                    float *part = run_to_f32(k, all + s0, n, f16, off, doff, 24);
                    for (int i = 0; i < n; i++)
                        ck_assert_msg(f2u(part[i]) == f2u(want[s0 + i]),
                                      "%s to_f32 f16=%d n=%d off=%d/%d of 0x%04x: 0x%08x, "
                                      "scalar 0x%08x", k->name, f16, n, off, doff,
                                      (unsigned)(s0 + i), f2u(part[i]), f2u(want[s0 + i]));
                    free(part);
                }
            /* round trip */
            uint16_t *back = run_from_f32(k, want, N, f16, 0, 0, 0);
            for (int64_t i = 0; i < N; i++) {
                uint16_t h = (uint16_t)i;
                int nan = f16 ? (h & 0x7c00) == 0x7c00 && (h & 0x3ff)
                              : (h & 0x7f80) == 0x7f80 && (h & 0x7f);
                uint16_t exp = nan ? (uint16_t)(h | (f16 ? 0x200 : 0x40)) : h;
                if (back[i] != exp)
                    ck_abort_msg("%s f16=%d: 0x%04x -> 0x%08x -> 0x%04x, not 0x%04x", k->name,
                                 f16, (unsigned)h, f2u(want[i]), (unsigned)back[i],
                                 (unsigned)exp);
            }
            free(back);
        }
        free(want);
    }
    free(all);
}
END_TEST

/* A growing list of floats, given by their bits. */
typedef struct float_list {
    float *v;
    int64_t n, cap;
} float_list;

static void push_bits(float_list *l, uint32_t u)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 1 << 16;
        l->v = realloc(l->v, sizeof(float) * (size_t)l->cap);
        ck_assert_ptr_nonnull(l->v);
    }
    memcpy(&l->v[l->n++], &u, sizeof u); /* bytes: a signalling NaN stays as it is */
}

static void push_both_signs(float_list *l, float x)
{
    push_bits(l, f2u(x) & 0x7fffffffu);
    push_bits(l, f2u(x) | 0x80000000u);
}

/* The inputs of half_from_f32: rounding ties of both formats and their neighbours, the binary16
 * overflow threshold and subnormal range, zeros, infinities, NaN payloads, and random bits. */
static float_list from_f32_inputs(void)
{
    float_list l = {NULL, 0, 0};
    /* Every float with the low 13 bits zero (all binary16 mantissas at every exponent), and
     * next to it the binary16 normal tie (0x1000) with its neighbours. */
    static const uint32_t offs13[] = {0, 1, 0xfff, 0x1000, 0x1001, 0x1fff};
    for (uint32_t i = 0; i < (1u << 19); i++)
        for (size_t j = 0; j < sizeof offs13 / sizeof offs13[0]; j++)
            push_bits(&l, (i << 13) + offs13[j]);
    /* bf16 ties (low half 0x8000, bit 16 odd or even) and neighbours, every upper half; this
     * includes the bf16 overflow (0x7f7f8000 rounds to inf) and NaNs with every payload. */
    static const uint32_t offs16[] = {0, 1, 0x7fff, 0x8000, 0x8001, 0xffff};
    for (uint32_t i = 0; i < (1u << 16); i++)
        for (size_t j = 0; j < sizeof offs16 / sizeof offs16[0]; j++)
            push_bits(&l, (i << 16) + offs16[j]);
    /* binary16 subnormals: k * 2^-25 (odd k: ties) and the floats beside them */
    for (int k = 0; k <= 2 * 1024 + 2; k++) {
        float x = ldexpf((float)k, -25);
        push_both_signs(&l, x);
        push_both_signs(&l, nextafterf(x, 0.0f));
        push_both_signs(&l, nextafterf(x, INFINITY));
    }
    /* around the binary16 overflow threshold */
    static const float big[] = {65504.0f, 65505.0f, 65519.0f, 65519.99f, 65520.0f, 65521.0f,
                                65536.0f, 1e5f, 3.3895314e38f, FLT_MAX, INFINITY, 0.0f};
    for (size_t j = 0; j < sizeof big / sizeof big[0]; j++) {
        push_both_signs(&l, big[j]);
        push_both_signs(&l, nextafterf(big[j], 0.0f));
        push_both_signs(&l, nextafterf(big[j], INFINITY));
    }
    /* NaNs: quiet and signalling, payloads in the kept and in the dropped bits */
    static const uint32_t nans[] = {0x7f800001u, 0x7f801fffu, 0x7f802000u, 0x7fa00000u,
                                    0x7fbfffffu, 0x7fc00000u, 0x7fc00001u, 0x7fffe000u,
                                    0x7fffffffu, 0x7f80ffffu, 0x7f810000u};
    for (size_t j = 0; j < sizeof nans / sizeof nans[0]; j++) {
        push_bits(&l, nans[j]);
        push_bits(&l, nans[j] | 0x80000000u);
    }
    /* ~1M random patterns; half of them with an exponent where binary16 rounds (2^-27..2^17) */
    test_rng r = rng_make(909);
    for (int i = 0; i < (1 << 20); i++) {
        uint32_t u = (uint32_t)rng_u64(&r);
        if (i & 1)
            u = (u & 0x807fffffu) | (uint32_t)rng_int(&r, 100, 144) << 23;
        push_bits(&l, u);
    }
    return l;
}

START_TEST(half_from_f32)
{
    table tb[4];
    int nt = kernel_tables(tb);
    const dma_kernels *ref = &dma_kernels_scalar;
    float_list in = from_f32_inputs();
    const float *x = in.v;
    const int64_t N = in.n;
    test_rng r = rng_make(1010);
    for (int f16 = 0; f16 <= 1; f16++) {
        uint16_t *want = run_from_f32(ref, x, N, f16, 0, 0, 0);
        for (int64_t i = 0; i < N; i++)
            if (!from_f32_ok(want[i], x[i], f16))
                ck_abort_msg("scalar from_f32 f16=%d of 0x%08x (%.9g): 0x%04x, wrong", f16,
                             f2u(x[i]), (double)x[i], (unsigned)want[i]);
        for (int t = 0; t < nt; t++) {
            const dma_kernels *k = tb[t].k;
            uint16_t *got = run_from_f32(k, x, N, f16, 1, 1, 40);
            for (int64_t i = 0; i < N; i++)
                if (got[i] != want[i])
                    ck_abort_msg("%s from_f32 f16=%d of 0x%08x (%.9g): 0x%04x, scalar 0x%04x",
                                 k->name, f16, f2u(x[i]), (double)x[i], (unsigned)got[i],
                                 (unsigned)want[i]);
            free(got);
            for (int n = 1; n <= 40; n++)
                for (int rep = 0; rep < 8; rep++) {
                    int64_t s0 = rng_int(&r, 0, N - 40);
                    int off = (int)rng_int(&r, 0, 7), doff = (int)rng_int(&r, 0, 7);
                    uint16_t *part = run_from_f32(k, x + s0, n, f16, off, doff, 24);
                    for (int i = 0; i < n; i++)
                        ck_assert_msg(part[i] == want[s0 + i],
                                      "%s from_f32 f16=%d n=%d off=%d/%d of 0x%08x: 0x%04x, "
                                      "scalar 0x%04x", k->name, f16, n, off, doff,
                                      f2u(x[s0 + i]), (unsigned)part[i],
                                      (unsigned)want[s0 + i]);
                    free(part);
                }
        }
        free(want);
    }
    free(in.v);
}
END_TEST

static Suite *kernels_half_suite(void)
{
    Suite *s = suite_create("kernels_half");
    TCase *tc = tcase_create("conversions");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, half_to_f32);
    tcase_add_test(tc, half_from_f32);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(kernels_half_suite()); }

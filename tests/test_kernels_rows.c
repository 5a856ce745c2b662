/*
 * test_kernels_rows.c - the row kernels (lib/kernels.h: add_rows, scale_row) of every table the
 * host runs: one IEEE operation per element, so every element must be bit for bit what the test
 * computes (NaN, infinities, signed zeros and subnormals included), at any length and alignment,
 * with nothing written outside the row (exact-size buffers for ASan, a guard element either side).
 * Also prefetch_write, a hint that must leave every byte as it was.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_test.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
/* NULL where the library was built without the x86 tables. */
extern void dma_x86_prefetch_write(const void *p, int64_t bytes) __attribute__((weak));
#endif

static const float special[6] = {NAN, INFINITY, -INFINITY, -0.0f, 0.0f, 1e-40f};

/* Mostly uniform in [-4, 4), one in ten a special value. */
static float draw_value(test_rng *r)
{
    return rng_int(r, 0, 9) == 0 ? special[rng_int(r, 0, 5)] : rng_float(r, -4.0f, 4.0f);
}

/* add_rows: every element is dst + src, one float add, bit for bit (NaN, inf and signed zeros
 * included), at any length and alignment, and nothing past the n floats of each row is touched
 * (rows are exact-size buffers for ASan, with a guard element either side checked here). */
START_TEST(add_rows_exact)
{
    table tb[4];
    int nt = kernel_tables(tb);
    test_rng r = rng_make(606);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int n = 0; n <= 70; n++)
            for (int m = 1; m <= 3; m++) {
                float *dbuf[3], *sbuf[3], *dst[3], *src[3], *want[3];
                for (int j = 0; j < m; j++) {
                    const int off = (int)rng_int(&r, 0, 3); /* rows not 64-byte aligned */
                    dbuf[j] = fbuf((size_t)(n + off + 2));
                    sbuf[j] = fbuf((size_t)(n + off));
                    dst[j] = dbuf[j] + off + 1;
                    src[j] = sbuf[j] + off;
                    want[j] = fbuf((size_t)n);
                    dst[j][-1] = dst[j][n] = 7.0f;
                    for (int i = 0; i < n; i++) {
                        dst[j][i] = draw_value(&r);
                        src[j][i] = draw_value(&r);
                        volatile float sum = dst[j][i] + src[j][i];
                        want[j][i] = sum;
                    }
                }
                k->add_rows(dst, (const float *const *)src, m, n);
                for (int j = 0; j < m; j++) {
                    ck_assert_msg(dst[j][-1] == 7.0f && dst[j][n] == 7.0f,
                                  "%s add_rows n=%d wrote outside row %d", k->name, n, j);
                    for (int i = 0; i < n; i++)
                        ck_assert_msg(memcmp(&dst[j][i], &want[j][i], sizeof(float)) == 0,
                                      "%s add_rows n=%d row %d [%d]: %a, want %a", k->name, n,
                                      j, i, (double)dst[j][i], (double)want[j][i]);
                    free(dbuf[j]);
                    free(sbuf[j]);
                    free(want[j]);
                }
            }
    }
}
END_TEST

/* scale_row: dst = s * src, bit for bit, and its return says whether some dst is NaN; in place
 * (dst = src) as well. */
START_TEST(scale_row_exact)
{
    table tb[4];
    int nt = kernel_tables(tb);
    test_rng r = rng_make(607);
    const float scales[5] = {0.125f, -2.5f, 1.0f / 3.0f, 0.0f, INFINITY};
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int n = 0; n <= 70; n++)
            for (int rep = 0; rep < 6; rep++) {
                const int off = (int)rng_int(&r, 0, 3), in_place = rep == 5;
                const float s = rep < 5 ? scales[rep] : rng_float(&r, -3.0f, 3.0f);
                /* rep 1: no special values, so that a NaN result comes only from s (never here) */
                const int specials = rep != 1;
                float *dbuf = fbuf((size_t)(n + off + 2)), *sbuf = fbuf((size_t)(n + off));
                float *dst = dbuf + off + 1, *src = in_place ? dst : sbuf + off;
                float *want = fbuf((size_t)n);
                int want_nan = 0;
                dst[-1] = dst[n] = 7.0f;
                for (int i = 0; i < n; i++) {
                    src[i] = specials ? draw_value(&r) : rng_float(&r, -4.0f, 4.0f);
                    volatile float y = s * src[i];
                    want[i] = y;
                    want_nan |= isnan(want[i]);
                }
                const int got_nan = k->scale_row(dst, src, s, n);
                ck_assert_msg(dst[-1] == 7.0f && dst[n] == 7.0f,
                              "%s scale_row n=%d wrote outside the row", k->name, n);
                for (int i = 0; i < n; i++)
                    ck_assert_msg(memcmp(&dst[i], &want[i], sizeof(float)) == 0,
                                  "%s scale_row n=%d s=%g [%d]: %a, want %a", k->name, n,
                                  (double)s, i, (double)dst[i], (double)want[i]);
                ck_assert_msg((got_nan != 0) == want_nan,
                              "%s scale_row n=%d s=%g: returned %d, a NaN is %s", k->name, n,
                              (double)s, got_nan, want_nan ? "there" : "not there");
                free(dbuf);
                free(sbuf);
                free(want);
            }
    }
}
END_TEST

/* One prefetch_write over every length 0..300 bytes and 4096, from every offset 0..63 into a
 * line: every byte around and inside the range is unchanged afterwards. */
static void check_prefetch(const char *name, void (*prefetch_write)(const void *, int64_t))
{
    enum { SIZE = 64 + 4096 + 128 };
    unsigned char *buf = NULL, want[SIZE];
    ck_assert_int_eq(posix_memalign((void **)&buf, 64, SIZE), 0);
    for (int i = 0; i < SIZE; i++)
        buf[i] = want[i] = (unsigned char)(i * 37 + 11);
    for (int off = 0; off < 64; off++)
        for (int i = 0; i <= 301; i++) {
            const int bytes = i <= 300 ? i : 4096;
            prefetch_write(buf + 64 + off, bytes);
            ck_assert_msg(memcmp(buf, want, SIZE) == 0,
                          "%s prefetch_write (offset %d, %d bytes) changed memory", name, off,
                          bytes);
        }
    free(buf);
}

START_TEST(prefetch_write_harmless)
{
    table tb[4];
    int nt = kernel_tables(tb);
    for (int t = 0; t < nt; t++)
        check_prefetch(tb[t].k->name, tb[t].k->prefetch_write);
#if defined(__x86_64__) || defined(__i386__)
    /* the PREFETCHW one, which the context installs where cpuid reports PRFCHW */
    unsigned a, b, c, d;
    if (dma_x86_prefetch_write && __get_cpuid(0x80000001, &a, &b, &c, &d) && (c & (1u << 8)))
        check_prefetch("x86 (PREFETCHW)", dma_x86_prefetch_write);
#endif
}
END_TEST

static Suite *kernels_rows_suite(void)
{
    Suite *s = suite_create("kernels_rows");
    TCase *tc = tcase_create("exact");
    tcase_add_test(tc, add_rows_exact);
    tcase_add_test(tc, scale_row_exact);
    tcase_add_test(tc, prefetch_write_harmless);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(kernels_rows_suite()); }

/*
 * test_kernels_backward.c - the backward's kernels (lib/kernels.h: accum_tn, grad_row) of every
 * table the host runs against the scalar table, within TOL of the size of the terms (with every
 * selection rule, bias, softcap and dbias sum); exact-size buffers and guards catch reads and
 * writes past the contract. add_rows is test_kernels_rows.c's.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_test.h"

/* ------------------------------------------------------------------------------------------ */
/* accum_tn                                                                                   */
/* ------------------------------------------------------------------------------------------ */

START_TEST(accum_tn_vs_scalar)
{
    table tb[4];
    int nt = kernel_tables(tb);
    const dma_kernels *ref = &dma_kernels_scalar;
    test_rng r = rng_make(505);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int di = 0; di < N_HEAD_DIMS; di++)
            /* m = 1 .. mr, then more keys than one register block (the kernels walk the keys
             * in blocks of up to 12): full blocks followed by short ones of every size */
            for (int mi = 0; mi < k->mr + 6; mi++)
                for (int rep = 0; rep < 4; rep++) {
                    const int more[6] = {k->mr + 1, k->mr + 2, k->mr + 3, 2 * k->mr + 5, 24, 37};
                    const int m = mi < k->mr ? mi + 1 : more[mi - k->mr];
                    /* overwrite: o's old values (NaN here) must not be read; k > 64 rows
                     * covers the kernels' later passes over rows, which accumulate */
                    const int overwrite = rep % 2;
                    const int D = (int)head_dims[di], ld = round_up(D, 16);
                    const int ldo = ld, ldx = ld + (int)rng_int(&r, 0, 1) * 16;
                    const int kk = (int)rng_int(&r, 1, 150);
                    const int ldp = (int)rng_int(&r, m, m + 40);
                    const int rows = m + 1; /* one more row than m: must stay put */
                    float *o = fbuf((size_t)rows * ldo), *o_ref = fbuf((size_t)rows * ldo);
                    float *p = fbuf((size_t)(kk - 1) * ldp + m), *x = fbuf((size_t)kk * ldx);
                    for (int i = 0; i < rows; i++)
                        for (int d = 0; d < ldo; d++)
                            o[i * ldo + d] = d >= D                ? 0.0f
                                             : overwrite && i < m ? NAN
                                                                  : rng_float(&r, -3.0f, 3.0f);
                    memcpy(o_ref, o, sizeof(float) * (size_t)rows * ldo);
                    for (int i = 0; i < kk; i++)
                        for (int c = 0; c < m; c++)
                            p[(size_t)i * ldp + c] = rng_float(&r, -1.0f, 1.0f);
                    for (int i = 0; i < kk; i++)
                        for (int d = 0; d < ldx; d++)
                            x[(size_t)i * ldx + d] = d < D ? rng_float(&r, -2.0f, 2.0f) : 0.0f;
                    k->accum_tn(o, ldo, p, ldp, m, x, ldx, kk, D, overwrite);
                    ref->accum_tn(o_ref, ldo, p, ldp, m, x, ldx, kk, D, overwrite);
                    for (int c = 0; c < rows; c++)
                        for (int d = 0; d < ldo; d++) {
                            float got = o[c * ldo + d], want = o_ref[c * ldo + d];
                            if (c >= m) {
                                ck_assert_msg(got == want, "%s accum_tn touched row %d", k->name,
                                              c);
                                continue;
                            }
                            ck_assert_msg(isfinite(got), "%s accum_tn (overwrite %d) [%d][%d] "
                                          "is %g", k->name, overwrite, c, d, (double)got);
                            if (d >= D) {
                                ck_assert_msg(got == 0.0f, "%s accum_tn: padding column %d is %g",
                                              k->name, d, (double)got);
                                continue;
                            }
                            double mag = fabs((double)o_ref[c * ldo + d]);
                            for (int i = 0; i < kk; i++)
                                mag += fabs((double)p[(size_t)i * ldp + c] * x[(size_t)i * ldx + d]);
                            ck_assert_msg(fabs((double)got - want) <= TOL * (mag + 1.0),
                                          "%s accum_tn D=%d m=%d k=%d overwrite %d [%d][%d]: "
                                          "%.9g vs %.9g", k->name, D, m, kk, overwrite, c, d,
                                          (double)got, (double)want);
                        }
                    free(o);
                    free(o_ref);
                    free(p);
                    free(x);
                }
    }
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* grad_row                                                                                   */
/* ------------------------------------------------------------------------------------------ */

START_TEST(grad_row_vs_scalar)
{
    table tb[4];
    int nt = kernel_tables(tb);
    const dma_kernels *ref = &dma_kernels_scalar;
    test_rng r = rng_make(606);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int iter = 0; iter < 2000; iter++) {
            int n = draw_n(&r, k->nr);
            row_sel rs = draw_sel(&r, n, rng_bernoulli(&r, 0.6));
            int use_bias = rng_bernoulli(&r, 0.5), use_sum = rng_bernoulli(&r, 0.5);
            float softcap = rng_bernoulli(&r, 0.3) ? (rng_bernoulli(&r, 0.5) ? 5.0f : 30.0f)
                                                   : 0.0f;
            float *s = fbuf((size_t)n), *s_ref = fbuf((size_t)n);
            float *dp = fbuf((size_t)n), *dp_ref = fbuf((size_t)n), *dp_in = fbuf((size_t)n);
            float *bias = use_bias ? fbuf((size_t)n) : NULL;
            float *sum = use_sum ? fbuf((size_t)n) : NULL, *sum_ref = use_sum ? fbuf((size_t)n) : NULL;
            float smax = -INFINITY;
            for (int c = 0; c < n; c++) {
                s[c] = s_ref[c] = rng_float(&r, -6.0f, 6.0f);
                dp[c] = dp_ref[c] = dp_in[c] = rng_float(&r, -1.0f, 1.0f);
                if (bias)
                    bias[c] = rng_bernoulli(&r, 0.1) ? -INFINITY : rng_float(&r, -2.0f, 2.0f);
                if (sum)
                    sum[c] = sum_ref[c] = rng_bernoulli(&r, 0.1) ? -0.0f : rng_float(&r, -1, 1);
                if (s[c] > smax)
                    smax = s[c];
            }
            /* an lse near the row's log-sum-exp keeps p in (0, 1]; sometimes -inf */
            float lse = rng_bernoulli(&r, 0.1) ? -INFINITY
                                               : smax + (bias ? 2.0f : 0.0f) +
                                                     rng_float(&r, 0.0f, 5.0f);
            float delta = rng_float(&r, -0.5f, 0.5f);
            k->grad_row(s, dp, n, bias, rs.bits, rs.bit0, rs.lo, rs.hi, softcap, lse, delta, sum);
            ref->grad_row(s_ref, dp_ref, n, bias, rs.bits, rs.bit0, rs.lo, rs.hi, softcap, lse,
                          delta, sum_ref);
            for (int c = 0; c < n; c++) {
                int sel = lse != -INFINITY && is_selected(&rs, c);
                if (!sel) {
                    ck_assert_msg(s[c] == 0.0f && dp[c] == 0.0f,
                                  "%s grad_row: unselected %d gives p %g ds %g", k->name, c,
                                  (double)s[c], (double)dp[c]);
                    if (sum)
                        ck_assert_msg(memcmp(&sum[c], &sum_ref[c], sizeof(float)) == 0,
                                      "%s grad_row added to dx_sum at unselected %d", k->name, c);
                    continue;
                }
                double pm = fabs((double)s_ref[c]);
                double dmag = pm * (fabs((double)dp_in[c]) + fabs((double)delta));
                ck_assert_msg(close_rel(s[c], s_ref[c], TOL, 1e-37),
                              "%s grad_row p n=%d cap=%g pos %d: %.9g vs %.9g", k->name, n,
                              (double)softcap, c, (double)s[c], (double)s_ref[c]);
                ck_assert_msg(fabs((double)dp[c] - dp_ref[c]) <= TOL * dmag + 1e-37,
                              "%s grad_row ds n=%d cap=%g pos %d: %.9g vs %.9g", k->name, n,
                              (double)softcap, c, (double)dp[c], (double)dp_ref[c]);
                if (sum)
                    ck_assert_msg(fabs((double)sum[c] - sum_ref[c]) <= TOL * (dmag + fabs(sum_ref[c])) + 1e-37,
                                  "%s grad_row dx_sum pos %d: %.9g vs %.9g", k->name, c,
                                  (double)sum[c], (double)sum_ref[c]);
            }
            free(s);
            free(s_ref);
            free(dp);
            free(dp_ref);
            free(dp_in);
            free(bias);
            free(sum);
            free(sum_ref);
            free(rs.bits);
        }
    }
}
END_TEST

static Suite *kernels_backward_suite(void)
{
    Suite *s = suite_create("kernels_backward");
    TCase *tc = tcase_create("vs_scalar");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, accum_tn_vs_scalar);
    tcase_add_test(tc, grad_row_vs_scalar);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(kernels_backward_suite()); }

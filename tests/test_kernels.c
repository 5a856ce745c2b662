/*
 * test_kernels.c - every kernel table the host can run (lib/kernels.h) against the portable
 * reference table dma_kernels_scalar, kernel by kernel, on random inputs.
 *
 * Packing must match the layout of kernels.h exactly (for the table's own nr); scores, the
 * softmax row and the P*V update must agree with the scalar kernels within a tolerance of about
 * 1e-5 relative to the size of the terms; exp and tanh are checked to a few ulp against double
 * precision. Buffers are allocated at their exact sizes (bitmask rows included) so that ASan
 * builds catch any read past what the contract allows, and guard areas catch writes past it.
 * The backward's kernels are test_kernels_backward.c's, the half-precision conversions
 * test_kernels_half.c's; kernel_test.c lists the tables the host runs.
 */
#include <check.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernel_test.h"
#include "kernels.h"

/* Weak: NULL when the library was built without AVX-512 (kernel_test.c has the others). */
extern const dma_kernels dma_kernels_avx512 __attribute__((weak));
/* The AVX512_BF16 kernels the context adds to the AVX-512 table (kernels.h). */
extern void dma_avx512_pack_k_bf16(uint16_t *kp, const uint16_t *base, int64_t ld,
                                   const int32_t *keys, int32_t first, int n, int D)
    __attribute__((weak));
extern void dma_avx512_scores_bf16(float *s, int lds, const uint16_t *q, int ldq, int m,
                                   const uint16_t *kp, int n, int D, float scale)
    __attribute__((weak));

/* ------------------------------------------------------------------------------------------ */
/* Packing                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Addressing of the packers: key c is keys[c] or first + c. */
typedef struct key_list {
    int32_t *keys; /* NULL: contiguous from first */
    int32_t first;
} key_list;

static key_list draw_keys(test_rng *r, int n, int64_t nkeys)
{
    key_list kl = {NULL, 0};
    if (rng_bernoulli(r, 0.5)) {
        kl.first = (int32_t)rng_int(r, 0, nkeys - n);
    } else {
        kl.keys = malloc(sizeof(int32_t) * (size_t)n);
        ck_assert_ptr_nonnull(kl.keys);
        for (int c = 0; c < n; c++) /* any keys, repeats allowed: the packers just gather */
            kl.keys[c] = (int32_t)rng_int(r, 0, nkeys - 1);
    }
    return kl;
}

static int32_t key_of(const key_list *kl, int c) { return kl->keys ? kl->keys[c] : kl->first + c; }

START_TEST(pack_layouts)
{
    table tb[4];
    int nt = kernel_tables(tb);
    test_rng r = rng_make(101);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int iter = 0; iter < 120; iter++) {
            int D = (int)head_dims[iter % N_HEAD_DIMS];
            int n = (int)rng_int(&r, 1, DMA_CHUNK);
            int64_t ld = D + rng_int(&r, 0, 3) * 5; /* source row stride */
            int64_t nkeys = n + rng_int(&r, 0, 40);
            int ldv = round_up(D, 16) + (int)rng_int(&r, 0, 1) * 16;
            float *base = random_rows(&r, nkeys, ld);
            key_list kl = draw_keys(&r, n, nkeys);
            int n_pad = round_up(n, k->nr);

            /* K: exact layout, zeros past n, nothing written past n_pad keys. */
            size_t kp_len = (size_t)n_pad * D, guard = 64;
            float *kp = fbuf(kp_len + guard);
            fill_guard(kp, kp_len + guard);
            k->pack_k(kp, base, ld, kl.keys, kl.first, n, D);
            for (int c = 0; c < n_pad; c++)
                for (int d = 0; d < D; d++) {
                    float got = kp[(size_t)(c / k->nr) * (size_t)(D * k->nr) +
                                   (size_t)d * k->nr + c % k->nr];
                    float want = c < n ? base[key_of(&kl, c) * ld + d] : 0.0f;
                    ck_assert_msg(memcmp(&got, &want, sizeof got) == 0,
                                  "%s pack_k D=%d n=%d key %d d %d: %g != %g", k->name, D, n, c,
                                  d, (double)got, (double)want);
                }
            for (size_t i = kp_len; i < kp_len + guard; i++)
                ck_assert_msg(kp[i] == GUARD, "%s pack_k wrote past the panel", k->name);

            /* V: rows of ldv, zero-padded from D. */
            size_t vp_len = (size_t)n * ldv;
            float *vp = fbuf(vp_len + guard);
            fill_guard(vp, vp_len + guard);
            k->pack_v(vp, ldv, base, ld, kl.keys, kl.first, n, D);
            for (int c = 0; c < n; c++)
                for (int d = 0; d < ldv; d++) {
                    float got = vp[(size_t)c * ldv + d];
                    float want = d < D ? base[key_of(&kl, c) * ld + d] : 0.0f;
                    ck_assert_msg(memcmp(&got, &want, sizeof got) == 0,
                                  "%s pack_v D=%d n=%d key %d d %d: %g != %g", k->name, D, n, c,
                                  d, (double)got, (double)want);
                }
            for (size_t i = vp_len; i < vp_len + guard; i++)
                ck_assert_msg(vp[i] == GUARD, "%s pack_v wrote past the panel", k->name);
            free(kp);
            free(vp);
            free(base);
            free(kl.keys);
        }
    }
}
END_TEST

/* pack_k_half: the panel pack_k makes from the rows converted to float32, bit for bit (random
 * bit patterns, NaNs included), zeros past n, nothing written past n_pad keys. */
START_TEST(pack_k_half_layout)
{
    table tb[4];
    int nt = kernel_tables(tb);
    test_rng r = rng_make(103);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int iter = 0; iter < 120; iter++) {
            const int f16 = iter % 2, D = (int)head_dims[iter % N_HEAD_DIMS];
            const int n = (int)rng_int(&r, 1, DMA_CHUNK);
            const int64_t ld = D + rng_int(&r, 0, 3) * 3, nkeys = n + rng_int(&r, 0, 40);
            uint16_t *base = malloc(sizeof(uint16_t) * (size_t)(nkeys * ld));
            float *wide = fbuf((size_t)(nkeys * ld));
            for (int64_t i = 0; i < nkeys * ld; i++)
                base[i] = (uint16_t)rng_u64(&r);
            dma_kernels_scalar.to_f32(wide, base, nkeys * ld, f16);
            key_list kl = draw_keys(&r, n, nkeys);
            const int n_pad = round_up(n, k->nr);
            const size_t kp_len = (size_t)n_pad * D, guard = 64;
            float *got = fbuf(kp_len + guard), *want = fbuf(kp_len);
            fill_guard(got, kp_len + guard);
            k->pack_k_half(got, base, ld, kl.keys, kl.first, n, D, f16);
            k->pack_k(want, wide, ld, kl.keys, kl.first, n, D);
            ck_assert_msg(memcmp(got, want, sizeof(float) * kp_len) == 0,
                          "%s pack_k_half D=%d n=%d f16=%d differs from pack_k", k->name, D, n,
                          f16);
            for (size_t i = kp_len; i < kp_len + guard; i++)
                ck_assert_msg(got[i] == GUARD, "%s pack_k_half wrote past the panel", k->name);
            free(base);
            free(wide);
            free(got);
            free(want);
            free(kl.keys);
        }
    }
}
END_TEST

/* dots: scores against key rows, against a double reference, every table, m = 1..8, odd D,
 * strided rows; nothing written outside s's m x n block. */
START_TEST(dots_vs_reference)
{
    table tb[4];
    int nt = kernel_tables(tb);
    test_rng r = rng_make(107);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int iter = 0; iter < 200; iter++) {
            const int m = 1 + iter % 8, D = (int)head_dims[iter % N_HEAD_DIMS];
            const int n = (int)rng_int(&r, 1, 70), ldq = D + (int)rng_int(&r, 0, 5);
            const int ldk = D + (int)rng_int(&r, 0, 5), lds = n + (int)rng_int(&r, 0, 9);
            float *q = random_rows(&r, m, ldq), *kr = random_rows(&r, n, ldk);
            const size_t s_len = (size_t)m * lds;
            float *s = fbuf(s_len + 64);
            fill_guard(s, s_len + 64);
            k->dots(s, lds, q, ldq, m, kr, ldk, n, D);
            for (int i = 0; i < m; i++)
                for (int c = 0; c < lds; c++) {
                    const float got = s[(size_t)i * lds + c];
                    if (c >= n) {
                        ck_assert_msg(got == GUARD, "%s dots wrote column %d >= n", k->name, c);
                        continue;
                    }
                    double want = 0, mag = 0;
                    for (int d = 0; d < D; d++) {
                        want += (double)q[(size_t)i * ldq + d] * kr[(size_t)c * ldk + d];
                        mag += fabs((double)q[(size_t)i * ldq + d] * kr[(size_t)c * ldk + d]);
                    }
                    ck_assert_msg(fabs(got - want) <= TOL * (1 + mag),
                                  "%s dots m=%d D=%d row %d key %d: %g, want %g", k->name, m, D,
                                  i, c, (double)got, want);
                }
            for (size_t i = s_len; i < s_len + 64; i++)
                ck_assert_msg(s[i] == GUARD, "%s dots wrote past s", k->name);
            free(q);
            free(kr);
            free(s);
        }
    }
}
END_TEST

/* The bf16 dot products (AVX512_BF16): the pair panel's exact layout (zeros past n, nothing
 * written past it), and scale * Q K^T against a double reference on the same bf16 values, m =
 * 1..8, strided and gathered keys. A context has them only with DMATTN_BF16_DOT=1, and only an
 * AVX-512 one. */
START_TEST(bf16_dots_vs_reference)
{
    static const dma_isa isas[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512, DMA_ISA_NEON};
    int have = 0;
    for (int opt_in = 0; opt_in <= 1; opt_in++)
        for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
            if (!dma_isa_supported(isas[i]))
                continue;
            if (opt_in)
                setenv("DMATTN_BF16_DOT", "1", 1);
            dma_context *ctx;
            ck_assert_int_eq(dma_context_create(&(dma_context_options){.threads = 1,
                                                                       .isa = isas[i]}, &ctx),
                             DMA_OK);
            unsetenv("DMATTN_BF16_DOT");
            const int dot = dma_context_bf16_dot(ctx);
            ck_assert_msg(!dot || (opt_in && isas[i] == DMA_ISA_AVX512),
                          "%s reports bf16 dot products (DMATTN_BF16_DOT %s)",
                          dma_isa_name(isas[i]), opt_in ? "set" : "unset");
            have |= dot;
            dma_context_destroy(ctx);
        }
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    ck_assert_msg(have || !dma_isa_supported(DMA_ISA_AVX512) ||
                      !__builtin_cpu_supports("avx512bf16"),
                  "the CPU has AVX512_BF16 but no opted-in AVX-512 context uses it");
#endif
    if (!have)
        return; /* this CPU has no AVX512_BF16: the kernels cannot run here */
    ck_assert(dma_avx512_pack_k_bf16 && dma_avx512_scores_bf16);
    const int nr = dma_kernels_avx512.nr;
    static const int dims[] = {2, 16, 40, 64, 100, 128, 256};
    test_rng r = rng_make(109);
    for (int iter = 0; iter < 300; iter++) {
        const int m = 1 + iter % 8, D = dims[iter % 7];
        const int n = (int)rng_int(&r, 1, DMA_CHUNK), n_pad = round_up(n, nr);
        const int64_t ld = D + 2 * rng_int(&r, 0, 3), nkeys = n + rng_int(&r, 0, 40);
        const int ldq = D + 2 * (int)rng_int(&r, 0, 3), lds = n_pad + (int)rng_int(&r, 0, 9);
        uint16_t *base = malloc(sizeof(uint16_t) * (size_t)(nkeys * ld));
        uint16_t *q = malloc(sizeof(uint16_t) * (size_t)(m * ldq));
        for (int64_t i = 0; i < nkeys * ld; i++)
            base[i] = test_to_bf16(rng_float(&r, -2, 2));
        for (int64_t i = 0; i < (int64_t)m * ldq; i++)
            q[i] = test_to_bf16(rng_float(&r, -2, 2));
        key_list kl = draw_keys(&r, n, nkeys);
        const size_t kp_len = (size_t)n_pad * D, guard = 64;
        uint16_t *kp = malloc(sizeof(uint16_t) * (kp_len + guard));
        for (size_t i = 0; i < kp_len + guard; i++)
            kp[i] = 0xBEEF;
        dma_avx512_pack_k_bf16(kp, base, ld, kl.keys, kl.first, n, D);
        for (int c = 0; c < n_pad; c++)
            for (int d = 0; d < D; d++) {
                const uint16_t got = kp[(size_t)(c / nr) * D * nr + (size_t)(d / 2) * 2 * nr +
                                        (size_t)(c % nr) * 2 + d % 2];
                const int32_t key = kl.keys ? kl.keys[c < n ? c : 0] : kl.first + c;
                const uint16_t want = c < n ? base[(int64_t)key * ld + d] : 0;
                ck_assert_msg(got == want, "pack_k_bf16 D=%d n=%d key %d dim %d: 0x%04x, want "
                              "0x%04x", D, n, c, d, got, want);
            }
        for (size_t i = kp_len; i < kp_len + guard; i++)
            ck_assert_msg(kp[i] == 0xBEEF, "pack_k_bf16 wrote past the panel");

        const float scale = rng_float(&r, 0.05f, 1.0f);
        const size_t s_len = (size_t)m * lds;
        float *s = fbuf(s_len + 64);
        fill_guard(s, s_len + 64);
        dma_avx512_scores_bf16(s, lds, q, ldq, m, kp, n_pad, D, scale);
        for (int i = 0; i < m; i++)
            for (int c = 0; c < lds; c++) {
                const float got = s[(size_t)i * lds + c];
                if (c >= n_pad) {
                    ck_assert_msg(got == GUARD, "scores_bf16 wrote column %d >= n", c);
                    continue;
                }
                double want = 0, mag = 0;
                for (int d = 0; d < D && c < n; d++) {
                    const int32_t key = kl.keys ? kl.keys[c] : kl.first + c;
                    const double x = (double)test_from_half(q[(size_t)i * ldq + d], DMA_BF16) *
                                     test_from_half(base[(int64_t)key * ld + d], DMA_BF16);
                    want += x;
                    mag += fabs(x);
                }
                ck_assert_msg(fabs(got - scale * want) <= TOL * scale * (1 + mag),
                              "scores_bf16 m=%d D=%d row %d key %d: %g, want %g", m, D, i, c,
                              (double)got, scale * want);
            }
        for (size_t i = s_len; i < s_len + 64; i++)
            ck_assert_msg(s[i] == GUARD, "scores_bf16 wrote past s");
        free(base);
        free(q);
        free(kp);
        free(s);
        free(kl.keys);
    }
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* scores                                                                                     */
/* ------------------------------------------------------------------------------------------ */

START_TEST(scores_vs_scalar)
{
    table tb[4];
    int nt = kernel_tables(tb);
    const dma_kernels *ref = &dma_kernels_scalar;
    test_rng r = rng_make(202);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int di = 0; di < N_HEAD_DIMS; di++)
            for (int m = 1; m <= k->mr; m++)
                for (int rep = 0; rep < 3; rep++) {
                    const int D = (int)head_dims[di], ldq = round_up(D, 16);
                    /* A chunk of `total` keys; the call covers keys [ca, ca + n) as the driver's
                     * column blocks do: from a packed block's start, to the end of a block or
                     * of a select_step inside one (the backward's ends). */
                    int total = draw_n(&r, k->nr), step = k->select_step;
                    int ca = (int)rng_int(&r, 0, total / k->nr - 1) * k->nr;
                    int n = (int)rng_int(&r, 1, (total - ca) / step) * step;
                    float *kbase = random_rows(&r, total, D);
                    float *q = fbuf((size_t)m * ldq);
                    for (int i = 0; i < m; i++)
                        for (int d = 0; d < ldq; d++)
                            q[i * ldq + d] = d < D ? rng_float(&r, -2.0f, 2.0f) : 0.0f;
                    float *kp = fbuf((size_t)total * D), *kp_ref = fbuf((size_t)total * D);
                    k->pack_k(kp, kbase, D, NULL, 0, total, D);
                    ref->pack_k(kp_ref, kbase, D, NULL, 0, total, D);
                    /* S: rows of lds with guards around each row's n columns. */
                    const int lds = DMA_CHUNK + 8, rows = k->mr;
                    float *s = fbuf((size_t)rows * lds), *s_ref = fbuf((size_t)rows * lds);
                    fill_guard(s, (size_t)rows * lds);
                    k->scores(s + 4, lds, q, ldq, m, kp + (size_t)ca * D, n, D);
                    ref->scores(s_ref + 4, lds, q, ldq, m, kp_ref + (size_t)ca * D, n, D);
                    for (int i = 0; i < rows; i++)
                        for (int x = 0; x < lds; x++) {
                            float got = s[i * lds + x];
                            int c = x - 4;
                            if (i >= m || c < 0 || c >= n) {
                                ck_assert_msg(got == GUARD, "%s scores wrote row %d col %d "
                                              "(m=%d n=%d)", k->name, i, c, m, n);
                                continue;
                            }
                            double mag = 0.0;
                            for (int d = 0; d < D; d++)
                                mag += fabs((double)q[i * ldq + d] *
                                            (double)kbase[(int64_t)(ca + c) * D + d]);
                            float want = s_ref[i * lds + x];
                            ck_assert_msg(fabs((double)got - want) <= TOL * mag + 1e-30,
                                          "%s scores D=%d m=%d n=%d ca=%d [%d][%d]: %.9g vs "
                                          "%.9g", k->name, D, m, n, ca, i, c, (double)got,
                                          (double)want);
                        }
                    free(kbase);
                    free(q);
                    free(kp);
                    free(kp_ref);
                    free(s);
                    free(s_ref);
                }
    }
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* softmax_row                                                                                */
/* ------------------------------------------------------------------------------------------ */

START_TEST(softmax_vs_scalar)
{
    table tb[4];
    int nt = kernel_tables(tb);
    const dma_kernels *ref = &dma_kernels_scalar;
    test_rng r = rng_make(303);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int iter = 0; iter < 3000; iter++) {
            int n = draw_n(&r, k->nr);
            row_sel rs = draw_sel(&r, n, rng_bernoulli(&r, 0.6));
            int use_bias = rng_bernoulli(&r, 0.5);
            float softcap = rng_bernoulli(&r, 0.3) ? (rng_bernoulli(&r, 0.5) ? 5.0f : 30.0f)
                                                   : 0.0f;
            float sscale = (float)rng_pick(&r, (const int64_t[]){1, 4, 20}, 3);
            float *s = fbuf((size_t)n), *s_ref = fbuf((size_t)n);
            float *bias = use_bias ? fbuf((size_t)n) : NULL;
            for (int c = 0; c < n; c++) {
                s[c] = s_ref[c] = rng_float(&r, -sscale, sscale);
                if (bias)
                    bias[c] = rng_bernoulli(&r, 0.1) ? -INFINITY : rng_float(&r, -3.0f, 3.0f);
            }
            float m0, l0;
            switch (rng_int(&r, 0, 2)) {
            case 0: m0 = -INFINITY; l0 = 0.0f; break;
            case 1: m0 = rng_float(&r, -sscale, sscale); l0 = rng_float(&r, 0.5f, 30.0f); break;
            default: m0 = 3.0f * sscale + 10.0f; l0 = rng_float(&r, 0.5f, 30.0f); break;
            }
            float m = m0, l = l0, m_ref = m0, l_ref = l0;
            float a = k->softmax_row(s, n, bias, rs.bits, rs.bit0, rs.lo, rs.hi, softcap, &m, &l);
            float a_ref = ref->softmax_row(s_ref, n, bias, rs.bits, rs.bit0, rs.lo, rs.hi,
                                           softcap, &m_ref, &l_ref);
            const char *what = k->name;
            ck_assert_msg(close_rel(m, m_ref, TOL, 1e-6) && close_rel(l, l_ref, TOL, 0.0) &&
                              close_rel(a, a_ref, TOL, 1e-30),
                          "%s softmax n=%d lo=%d hi=%d bits=%d bit0=%d cap=%g bias=%d m0=%g: "
                          "m %.9g/%.9g l %.9g/%.9g alpha %.9g/%.9g",
                          what, n, rs.lo, rs.hi, rs.bits != NULL, rs.bit0, (double)softcap,
                          use_bias, (double)m0, (double)m, (double)m_ref, (double)l,
                          (double)l_ref, (double)a, (double)a_ref);
            for (int c = 0; c < n; c++) {
                if (!is_selected(&rs, c))
                    ck_assert_msg(s[c] == 0.0f && !signbit(s[c]),
                                  "%s softmax: unselected position %d is %g", what, c,
                                  (double)s[c]);
                else
                    ck_assert_msg(close_rel(s[c], s_ref[c], TOL, 1e-37),
                                  "%s softmax n=%d cap=%g pos %d: %.9g vs %.9g", what, n,
                                  (double)softcap, c, (double)s[c], (double)s_ref[c]);
            }
            free(s);
            free(s_ref);
            free(bias);
            free(rs.bits);
        }
    }
}
END_TEST

/* The m_new == -inf case: nothing selected (or every selected logit -inf) with *m = -inf gives
 * alpha = 1, an all-zero row and *m, *l unchanged. */
START_TEST(softmax_empty_rows)
{
    table tb[4];
    int nt = kernel_tables(tb);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int variant = 0; variant < 3; variant++) {
            int n = 2 * k->nr;
            float *s = fbuf((size_t)n), *bias = fbuf((size_t)n);
            for (int c = 0; c < n; c++) {
                s[c] = (float)c;
                bias[c] = -INFINITY;
            }
            uint64_t zero_bits[1] = {0};
            float m = -INFINITY, l = 0.0f, a;
            if (variant == 0) /* empty span */
                a = k->softmax_row(s, n, NULL, NULL, 0, 3, 3, 0.0f, &m, &l);
            else if (variant == 1) /* span without a set bit */
                a = k->softmax_row(s, n, NULL, zero_bits, 0, 0, n < 64 ? n : 64, 0.0f, &m, &l);
            else /* every selected logit -inf */
                a = k->softmax_row(s, n, bias, NULL, 0, 0, n, 0.0f, &m, &l);
            ck_assert_msg(a == 1.0f && m == -INFINITY && l == 0.0f,
                          "%s empty row %d: alpha %g m %g l %g", k->name, variant, (double)a,
                          (double)m, (double)l);
            for (int c = 0; c < n; c++)
                ck_assert_msg(s[c] == 0.0f, "%s empty row %d: s[%d] = %g", k->name, variant, c,
                              (double)s[c]);
            free(s);
            free(bias);
        }
    }
}
END_TEST

/* ulps between two finite floats of the same sign. */
static double ulp_diff(float got, double want)
{
    float w = (float)want;
    if (got == w)
        return 0.0;
    double ulp = nextafterf(fabsf(w), INFINITY) - fabsf(w);
    return fabs((double)got - want) / ulp;
}

/* exp through softmax_row: s = {0, x_1, ...} with *m = -inf gives p_c = exp(x_c) exactly up to
 * the kernel's exp; tanh through softcap = 1: p_c = exp(tanh(x_c) - max tanh). */
START_TEST(exp_tanh_accuracy)
{
    table tb[4];
    int nt = kernel_tables(tb);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        const int n = DMA_CHUNK;
        float *s = fbuf(n);
        double worst_exp = 0.0, worst_tanh = 0.0;
        float at_exp = 0.0f, at_tanh = 0.0f;
        for (int block = 0; block < 2000; block++) {
            /* exp over [-87.3, 0]: the range the kernels see after max subtraction */
            float x[DMA_CHUNK];
            x[0] = 0.0f;
            for (int c = 1; c < n; c++) {
                double u = ((double)block * (n - 1) + (c - 1)) / (2000.0 * (n - 1));
                x[c] = (float)(-87.3 * u);
                if (block < 8) /* some tiny arguments too */
                    x[c] = (float)(-ldexp(1.0, -(block * 4 + (c % 20))) * (c & 1 ? 1 : 0.7));
                s[c] = x[c];
            }
            s[0] = 0.0f;
            float m = -INFINITY, l = 0.0f;
            k->softmax_row(s, n, NULL, NULL, 0, 0, n, 0.0f, &m, &l);
            ck_assert(m == 0.0f);
            for (int c = 0; c < n; c++) {
                double e = ulp_diff(s[c], exp((double)x[c]));
                if (e > worst_exp) {
                    worst_exp = e;
                    at_exp = x[c];
                }
            }
            /* tanh over [-12, 12] (softcap 1: logits tanh(x) exactly up to the kernel's tanh) */
            double tmax = -2.0;
            for (int c = 0; c < n; c++) {
                double u = ((double)block * n + c) / (2000.0 * n);
                x[c] = (float)(-12.0 + 24.0 * u);
                if (block < 8)
                    x[c] = (float)(ldexp(1.0, -(block * 3 + (c % 24))) * (c & 1 ? 1 : -1));
                s[c] = x[c];
                if (tanh((double)x[c]) > tmax)
                    tmax = tanh((double)x[c]);
            }
            m = -INFINITY;
            l = 0.0f;
            k->softmax_row(s, n, NULL, NULL, 0, 0, n, 1.0f, &m, &l);
            ck_assert_msg(fabs(m - tmax) <= 3e-7 * fabs(tmax) + 1e-30, "%s tanh max %.9g vs %.9g",
                          k->name, (double)m, tmax);
            for (int c = 0; c < n; c++) {
                /* p = exp(t - m) with t the kernel's tanh: the error of t shows up in p as an
                 * absolute error of the exponent (|t| <= 1, so a few 1e-8). */
                double want = exp(tanh((double)x[c]) - (double)m);
                double e = fabs((double)s[c] - want) / (want * 0x1p-24);
                if (e > worst_tanh) {
                    worst_tanh = e;
                    at_tanh = x[c];
                }
            }
        }
        ck_assert_msg(worst_exp <= 2.0, "%s exp: %.2f ulp at x = %.9g", k->name, worst_exp,
                      (double)at_exp);
        /* tanh: a couple of ulp of t plus the exp's ulp and the rounding of t - m */
        ck_assert_msg(worst_tanh <= 6.0, "%s tanh: %.2f ulp(p) at x = %.9g", k->name,
                      worst_tanh, (double)at_tanh);
        free(s);
    }
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* scores_select + softmax_exp against the same table's scores + softmax_row                  */
/* ------------------------------------------------------------------------------------------ */

static int same_bits(float x, float y)
{
    uint32_t a, b;
    memcpy(&a, &x, sizeof a);
    memcpy(&b, &y, sizeof b);
    return a == b;
}

/* The fused pair must leave S, m, l and the factor bitwise as the two kernels it replaces, on
 * every table that has it: rows of a block with their own spans, bitmasks (one bit0) and biases
 * (absent, with -inf, with NaN), empty rows, and running maxima below, inside and above the
 * chunk's. */
START_TEST(scores_select_vs_parts)
{
    table tb[4];
    int nt = kernel_tables(tb);
    test_rng r = rng_make(404);
    int tested = 0;
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        ck_assert_msg(!k->scores_select == !k->softmax_exp, "%s: half of the fused pair",
                      k->name);
        if (!k->scores_select)
            continue;
        tested += tb[t].isa == DMA_ISA_SCALAR;
        for (int di = 0; di < N_HEAD_DIMS; di++)
            for (int m = 1; m <= k->mr; m++)
                for (int rep = 0; rep < 4; rep++) {
                    const int D = (int)head_dims[di], ldq = round_up(D, 16);
                    /* a call from any multiple of select_step to any later one; the parts
                     * score the whole blocks around it */
                    const int total = draw_n(&r, k->nr), step = k->select_step;
                    const int ca = (int)rng_int(&r, 0, total / step - 1) * step;
                    const int n = (int)rng_int(&r, 1, (total - ca) / step) * step;
                    const int ca_block = ca / k->nr * k->nr;
                    const int end_block = round_up(ca + n, k->nr);
                    const int bit0 = (int)rng_int(&r, 0, 300), lds = DMA_CHUNK;
                    const float qscale = rng_bernoulli(&r, 0.3) ? 8.0f : 1.0f;
                    float *kbase = random_rows(&r, total, D);
                    float *q = fbuf((size_t)m * ldq), *kp = fbuf((size_t)total * D);
                    for (int i = 0; i < m * ldq; i++)
                        q[i] = i % ldq < D ? rng_float(&r, -qscale, qscale) : 0.0f;
                    k->pack_k(kp, kbase, D, NULL, 0, total, D);
                    const float *bias[16];
                    const uint64_t *bits[16];
                    uint64_t *bits_own[16];
                    float *bias_own[16];
                    int lo[16], hi[16];
                    for (int i = 0; i < m; i++) {
                        row_sel rs = draw_sel(&r, n, 0);
                        lo[i] = rs.lo;
                        hi[i] = rs.hi;
                        bits_own[i] = NULL;
                        if (rng_bernoulli(&r, 0.7)) {
                            const int words = (bit0 + n + 63) / 64;
                            const double density = rng_unit(&r);
                            bits_own[i] = malloc(sizeof(uint64_t) * (size_t)words);
                            ck_assert_ptr_nonnull(bits_own[i]);
                            for (int w = 0; w < words; w++) {
                                uint64_t x = 0;
                                for (int b = 0; b < 64; b++)
                                    x |= (uint64_t)rng_bernoulli(&r, density) << b;
                                bits_own[i][w] = x;
                            }
                        }
                        bits[i] = bits_own[i];
                        bias_own[i] = NULL;
                        if (rng_bernoulli(&r, 0.7)) {
                            const double nan_rate = rng_bernoulli(&r, 0.2) ? 0.02 : 0.0;
                            bias_own[i] = fbuf((size_t)n);
                            for (int c = 0; c < n; c++)
                                bias_own[i][c] = rng_bernoulli(&r, nan_rate) ? NAN
                                                 : rng_bernoulli(&r, 0.1)
                                                     ? -INFINITY
                                                     : rng_float(&r, -3.0f, 3.0f);
                        }
                        bias[i] = bias_own[i];
                    }
                    float *sf = fbuf((size_t)m * lds), *sp = fbuf((size_t)m * lds);
                    float rowmax[16];
                    k->scores_select(sf, lds, q, ldq, m, kp + (size_t)ca_block * D,
                                     ca - ca_block, n, D, bias, bits, bit0, lo, hi, rowmax);
                    k->scores(sp, lds, q, ldq, m, kp + (size_t)ca_block * D,
                              end_block - ca_block, D);
                    for (int i = 0; i < m; i++) {
                        float m0 = -INFINITY, l0 = 0.0f;
                        if (rng_bernoulli(&r, 0.5)) {
                            m0 = rng_float(&r, -10.0f, 10.0f);
                            l0 = rng_float(&r, 0.5f, 30.0f);
                        }
                        float mf = m0, lf = l0, mp = m0, lp = l0;
                        const float af = k->softmax_exp(sf + i * lds, n, rowmax[i], &mf, &lf);
                        float *row = sp + i * lds + (ca - ca_block);
                        const float ap = k->softmax_row(row, n, bias[i], bits[i], bit0, lo[i],
                                                        hi[i], 0.0f, &mp, &lp);
                        ck_assert_msg(same_bits(af, ap) && same_bits(mf, mp) && same_bits(lf, lp),
                                      "%s fused D=%d m=%d ca=%d n=%d row %d: alpha %.9g/%.9g m "
                                      "%.9g/%.9g l %.9g/%.9g", k->name, D, m, ca, n, i, (double)af,
                                      (double)ap, (double)mf, (double)mp, (double)lf,
                                      (double)lp);
                        for (int c = 0; c < n; c++) {
                            const float x = sf[i * lds + c], y = row[c];
                            ck_assert_msg(same_bits(x, y) || (isnan(mf) && isnan(x)),
                                          "%s fused D=%d m=%d n=%d row %d pos %d: %.9g vs %.9g",
                                          k->name, D, m, n, i, c, (double)x, (double)y);
                        }
                    }
                    for (int i = 0; i < m; i++) {
                        free(bits_own[i]);
                        free(bias_own[i]);
                    }
                    free(kbase);
                    free(q);
                    free(kp);
                    free(sf);
                    free(sp);
                }
    }
    ck_assert_msg(tested == 1, "the scalar table has no fused pair");
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* accum_pv                                                                                   */
/* ------------------------------------------------------------------------------------------ */

START_TEST(accum_pv_vs_scalar)
{
    table tb[4];
    int nt = kernel_tables(tb);
    const dma_kernels *ref = &dma_kernels_scalar;
    test_rng r = rng_make(404);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int di = 0; di < N_HEAD_DIMS; di++)
            for (int m = 1; m <= k->mr; m++)
                for (int rep = 0; rep < 3; rep++) {
                    const int D = (int)head_dims[di], ld = round_up(D, 16);
                    const int ldo = ld + (int)rng_int(&r, 0, 1) * 16;
                    const int ldv = ld + (int)rng_int(&r, 0, 1) * 16;
                    const int n = draw_n(&r, k->nr);
                    const int ldp = rng_bernoulli(&r, 0.5) ? DMA_CHUNK : n;
                    const int rows = k->mr + 1; /* one more row than allowed: must stay put */
                    float *o = fbuf((size_t)rows * ldo), *o_ref = fbuf((size_t)rows * ldo);
                    float *p = fbuf((size_t)(m - 1) * ldp + n), *vp = fbuf((size_t)n * ldv);
                    float alpha[16];
                    for (int i = 0; i < rows; i++)
                        for (int d = 0; d < ldo; d++)
                            o[i * ldo + d] = d < D ? rng_float(&r, -3.0f, 3.0f) : 0.0f;
                    memcpy(o_ref, o, sizeof(float) * (size_t)rows * ldo);
                    for (int i = 0; i < m; i++) {
                        int64_t kind = rng_int(&r, 0, 3);
                        alpha[i] = kind == 0 ? 0.0f : kind == 1 ? 1.0f : rng_float(&r, 0.0f, 1.0f);
                        for (int c = 0; c < n; c++)
                            p[(size_t)i * ldp + c] =
                                rng_bernoulli(&r, 0.2) ? 0.0f : rng_float(&r, 0.0f, 1.0f);
                    }
                    for (int c = 0; c < n; c++)
                        for (int d = 0; d < ldv; d++)
                            vp[(size_t)c * ldv + d] = d < D ? rng_float(&r, -1.0f, 1.0f) : 0.0f;
                    k->accum_pv(o, ldo, alpha, p, ldp, m, vp, ldv, n, D);
                    ref->accum_pv(o_ref, ldo, alpha, p, ldp, m, vp, ldv, n, D);
                    for (int i = 0; i < rows; i++)
                        for (int d = 0; d < ldo; d++) {
                            float got = o[i * ldo + d], want = o_ref[i * ldo + d];
                            if (i >= m) {
                                ck_assert_msg(got == want, "%s accum_pv touched row %d", k->name,
                                              i);
                                continue;
                            }
                            if (d >= D) {
                                ck_assert_msg(got == 0.0f, "%s accum_pv: padding column %d of "
                                              "row %d is %g", k->name, d, i, (double)got);
                                continue;
                            }
                            double mag = fabs((double)alpha[i] * o_ref[i * ldo + d]);
                            for (int c = 0; c < n; c++)
                                mag += fabs((double)p[(size_t)i * ldp + c] *
                                            vp[(size_t)c * ldv + d]);
                            ck_assert_msg(fabs((double)got - want) <= TOL * (mag + 1.0),
                                          "%s accum_pv D=%d m=%d n=%d [%d][%d]: %.9g vs %.9g",
                                          k->name, D, m, n, i, d, (double)got, (double)want);
                        }
                    free(o);
                    free(o_ref);
                    free(p);
                    free(vp);
                }
    }
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* A whole chunk the way the driver runs it, twice: bitwise identical results                 */
/* ------------------------------------------------------------------------------------------ */

START_TEST(chunk_deterministic)
{
    table tb[4];
    int nt = kernel_tables(tb);
    test_rng r = rng_make(707);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        const int D = 100, ld = round_up(D, 16), n = DMA_CHUNK, m = k->mr;
        float *kbase = random_rows(&r, n, D);
        float *q = fbuf((size_t)m * ld), *kp = fbuf((size_t)n * D), *vp = fbuf((size_t)n * ld);
        for (int i = 0; i < m * ld; i++)
            q[i] = i % ld < D ? rng_float(&r, -1.0f, 1.0f) : 0.0f;
        k->pack_k(kp, kbase, D, NULL, 0, n, D);
        k->pack_v(vp, ld, kbase, D, NULL, 0, n, D);
        float *o[2];
        for (int run = 0; run < 2; run++) {
            float *s = fbuf((size_t)m * DMA_CHUNK), alpha[16], mm[16], ll[16];
            o[run] = fbuf((size_t)m * ld);
            memset(o[run], 0, sizeof(float) * (size_t)m * ld);
            k->scores(s, DMA_CHUNK, q, ld, m, kp, n, D);
            for (int i = 0; i < m; i++) {
                mm[i] = -INFINITY;
                ll[i] = 0.0f;
                alpha[i] = k->softmax_row(s + i * DMA_CHUNK, n, NULL, NULL, 0, i, n - i, 0.0f,
                                          &mm[i], &ll[i]);
            }
            k->accum_pv(o[run], ld, alpha, s, DMA_CHUNK, m, vp, ld, n, D);
            free(s);
        }
        ck_assert_msg(memcmp(o[0], o[1], sizeof(float) * (size_t)m * ld) == 0,
                      "%s: two identical runs differ", k->name);
        free(o[0]);
        free(o[1]);
        free(kbase);
        free(q);
        free(kp);
        free(vp);
    }
}
END_TEST

static Suite *kernels_suite(void)
{
    Suite *s = suite_create("kernels");
    TCase *tc = tcase_create("vs_scalar");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, pack_layouts);
    tcase_add_test(tc, pack_k_half_layout);
    tcase_add_test(tc, dots_vs_reference);
    tcase_add_test(tc, bf16_dots_vs_reference);
    tcase_add_test(tc, scores_vs_scalar);
    tcase_add_test(tc, softmax_vs_scalar);
    tcase_add_test(tc, softmax_empty_rows);
    tcase_add_test(tc, scores_select_vs_parts);
    tcase_add_test(tc, exp_tanh_accuracy);
    tcase_add_test(tc, accum_pv_vs_scalar);
    tcase_add_test(tc, chunk_deterministic);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(kernels_suite()); }

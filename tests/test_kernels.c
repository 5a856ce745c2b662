/*
 * test_kernels.c - every kernel table the host can run (lib/kernels.h) against the portable
 * reference table dma_kernels_scalar, kernel by kernel, on random inputs.
 *
 * Packing must match the layout of kernels.h exactly (for the table's own nr); scores, the
 * softmax row, the P*V and P^T*X updates and the backward row must agree with the scalar kernels
 * within a tolerance of about 1e-5 relative to the size of the terms; exp and tanh are checked to
 * a few ulp against double precision. The half-precision conversions must agree bit for bit,
 * and the scalar ones with independent references written here. Buffers are allocated at their
 * exact sizes (bitmask rows included) so that ASan builds catch any read past what the contract
 * allows, and guard areas catch writes past it.
 *
 * Build by hand (until tests/meson.build registers it), e.g.:
 *   gcc -O2 -Iinclude -Ilib tests/test_kernels.c tests/common.c <library> -lcheck -lm
 * The SIMD tables are declared weak here, so the file needs no DMATTN_HAVE_* define: a table
 * that was not built is simply skipped (dma_isa_supported() says 0 for it).
 */
#include <check.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

/* Weak references: NULL when the library was built without that ISA. */
extern const dma_kernels dma_kernels_avx2 __attribute__((weak));
extern const dma_kernels dma_kernels_avx512 __attribute__((weak));
extern const dma_kernels dma_kernels_neon __attribute__((weak));
/* The AVX512_BF16 kernels the context adds to the AVX-512 table (kernels.h). */
extern void dma_avx512_pack_k_bf16(uint16_t *kp, const uint16_t *base, int64_t ld,
                                   const int32_t *keys, int32_t first, int n, int D)
    __attribute__((weak));
extern void dma_avx512_scores_bf16(float *s, int lds, const uint16_t *q, int ldq, int m,
                                   const uint16_t *kp, int n, int D, float scale)
    __attribute__((weak));

#define TOL 1e-5

/* ------------------------------------------------------------------------------------------ */
/* Tables and buffers                                                                         */
/* ------------------------------------------------------------------------------------------ */

typedef struct table {
    dma_isa isa;
    const dma_kernels *k;
} table;

/* Every table this host runs, scalar first. */
static int tables(table out[4])
{
    int n = 0;
    out[n++] = (table){DMA_ISA_SCALAR, &dma_kernels_scalar};
    const struct {
        dma_isa isa;
        const dma_kernels *k;
    } simd[] = {{DMA_ISA_AVX2, &dma_kernels_avx2},
                {DMA_ISA_AVX512, &dma_kernels_avx512},
                {DMA_ISA_NEON, &dma_kernels_neon}};
    for (size_t i = 0; i < sizeof simd / sizeof simd[0]; i++) {
        if (!dma_isa_supported(simd[i].isa))
            continue;
        ck_assert_msg(simd[i].k != NULL, "%s is supported but its table is not linked",
                      dma_isa_name(simd[i].isa));
        out[n++] = (table){simd[i].isa, simd[i].k};
    }
    for (int i = 0; i < n; i++) {
        const dma_kernels *k = out[i].k;
        ck_assert_msg(k->nr >= 8 && k->nr % 8 == 0 && DMA_CHUNK % k->nr == 0,
                      "%s: nr = %d", k->name, k->nr);
        ck_assert_msg(k->mr >= 1 && k->mr <= 16, "%s: mr = %d", k->name, k->mr);
        ck_assert_msg(k->pv_rows >= 1 && k->pv_rows <= k->mr, "%s: pv_rows = %d", k->name,
                      k->pv_rows);
        ck_assert_msg(k->select_step >= 8 && k->nr % k->select_step == 0,
                      "%s: select_step = %d", k->name, k->select_step);
        ck_assert_msg(k->pack_k && k->pack_v && k->scores && k->softmax_row && k->accum_pv &&
                          k->grad_row && k->accum_tn && k->add_rows && k->to_f32 && k->from_f32 &&
                          k->pack_k_half && k->dots,
                      "%s: a kernel is missing", k->name);
    }
    return n;
}

/* 64-byte aligned (as the driver's panels are) but of exactly `count` floats, so that ASan sees
 * the true end of the buffer. */
static float *fbuf(size_t count)
{
    void *p = NULL;
    ck_assert_int_eq(posix_memalign(&p, 64, count ? count * sizeof(float) : 1), 0);
    return p;
}

static const int64_t head_dims[] = {1, 7, 16, 40, 64, 100, 128, 256};
#define N_HEAD_DIMS ((int)(sizeof head_dims / sizeof head_dims[0]))

static int round_up(int a, int b) { return (a + b - 1) / b * b; }

/* A random multiple of nr in [nr, DMA_CHUNK], biased to the ends. */
static int draw_n(test_rng *r, int nr)
{
    int64_t u = rng_int(r, 0, 9);
    if (u == 0)
        return nr;
    if (u == 1)
        return DMA_CHUNK;
    return (int)rng_int(r, 1, DMA_CHUNK / nr) * nr;
}

/* Guard pattern for "untouched" checks. */
static const float GUARD = -12345.678f;

static void fill_guard(float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = GUARD;
}

/* Key rows of a random K: `nkeys` rows of `ld` floats (ld >= D, values past D are garbage the
 * packers must not copy). */
static float *random_rows(test_rng *r, int64_t nkeys, int64_t ld)
{
    float *x = fbuf((size_t)(nkeys * ld));
    for (int64_t i = 0; i < nkeys * ld; i++)
        x[i] = rng_float(r, -1.0f, 1.0f);
    return x;
}

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
    int nt = tables(tb);
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
    int nt = tables(tb);
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
    int nt = tables(tb);
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
    int nt = tables(tb);
    const dma_kernels *ref = &dma_kernels_scalar;
    test_rng r = rng_make(202);
    for (int t = 0; t < nt; t++) {
        const dma_kernels *k = tb[t].k;
        for (int di = 0; di < N_HEAD_DIMS; di++)
            for (int m = 1; m <= k->mr; m++)
                for (int rep = 0; rep < 3; rep++) {
                    const int D = (int)head_dims[di], ldq = round_up(D, 16);
                    /* A chunk of `total` keys; the call covers keys [ca, ca + n) as the driver's
                     * column blocks do. */
                    int total = draw_n(&r, k->nr);
                    int ca = (int)rng_int(&r, 0, total / k->nr - 1) * k->nr;
                    int n = (int)rng_int(&r, 1, (total - ca) / k->nr) * k->nr;
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
/* Row selection: the bitmask, the span [lo, hi)                                              */
/* ------------------------------------------------------------------------------------------ */

typedef struct row_sel {
    uint64_t *bits; /* NULL: no mask */
    int bit0, lo, hi;
} row_sel;

/* A random selection of an n-position chunk. The bitmask row is allocated with exactly the words
 * that hold the bits of positions bit0 + [0, hi) (at least one word), as the shortest row the
 * driver could hand over; bits past the row's end do not exist for the kernel. */
static row_sel draw_sel(test_rng *r, int n, int use_bits)
{
    row_sel rs = {NULL, 0, 0, n};
    switch (rng_int(r, 0, 5)) {
    case 0: break;                                      /* whole chunk */
    case 1: rs.lo = rs.hi = (int)rng_int(r, 0, n); break; /* empty */
    default:
        rs.lo = (int)rng_int(r, 0, n);
        rs.hi = (int)rng_int(r, rs.lo, n);
        break;
    }
    if (use_bits) {
        rs.bit0 = (int)rng_int(r, 0, 3) == 0 ? (int)rng_int(r, 0, 8) * 64
                                              : (int)rng_int(r, 0, 600);
        int words = (rs.bit0 + rs.hi + 63) / 64;
        if (words < 1)
            words = 1;
        rs.bits = malloc(sizeof(uint64_t) * (size_t)words);
        ck_assert_ptr_nonnull(rs.bits);
        double density = rng_unit(r);
        for (int w = 0; w < words; w++) {
            uint64_t x = 0;
            for (int b = 0; b < 64; b++)
                x |= (uint64_t)rng_bernoulli(r, density) << b;
            rs.bits[w] = x;
        }
    }
    return rs;
}

static int is_selected(const row_sel *rs, int c)
{
    if (c < rs->lo || c >= rs->hi)
        return 0;
    if (!rs->bits)
        return 1;
    int b = rs->bit0 + c;
    return (int)((rs->bits[b >> 6] >> (b & 63)) & 1u);
}

static int close_rel(double got, double want, double rel, double abs_tol)
{
    if (isnan(want))
        return isnan(got);
    if (isinf(want))
        return got == want;
    return fabs(got - want) <= rel * fabs(want) + abs_tol;
}

/* ------------------------------------------------------------------------------------------ */
/* softmax_row                                                                                */
/* ------------------------------------------------------------------------------------------ */

START_TEST(softmax_vs_scalar)
{
    table tb[4];
    int nt = tables(tb);
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
    int nt = tables(tb);
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
    int nt = tables(tb);
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
    int nt = tables(tb);
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
/* accum_pv and accum_tn                                                                      */
/* ------------------------------------------------------------------------------------------ */

START_TEST(accum_pv_vs_scalar)
{
    table tb[4];
    int nt = tables(tb);
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

START_TEST(accum_tn_vs_scalar)
{
    table tb[4];
    int nt = tables(tb);
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

/* add_rows: every element is dst + src, one float add, bit for bit (NaN, inf and signed zeros
 * included), at any length and alignment, and nothing past the n floats of each row is touched
 * (rows are exact-size buffers for ASan, with a guard element either side checked here). */
START_TEST(add_rows_exact)
{
    table tb[4];
    int nt = tables(tb);
    test_rng r = rng_make(606);
    const float special[6] = {NAN, INFINITY, -INFINITY, -0.0f, 0.0f, 1e-40f};
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
                        dst[j][i] = rng_int(&r, 0, 9) == 0 ? special[rng_int(&r, 0, 5)]
                                                           : rng_float(&r, -4.0f, 4.0f);
                        src[j][i] = rng_int(&r, 0, 9) == 0 ? special[rng_int(&r, 0, 5)]
                                                           : rng_float(&r, -4.0f, 4.0f);
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

/* ------------------------------------------------------------------------------------------ */
/* grad_row                                                                                   */
/* ------------------------------------------------------------------------------------------ */

START_TEST(grad_row_vs_scalar)
{
    table tb[4];
    int nt = tables(tb);
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

/* ------------------------------------------------------------------------------------------ */
/* A whole chunk the way the driver runs it, twice: bitwise identical results                 */
/* ------------------------------------------------------------------------------------------ */

START_TEST(chunk_deterministic)
{
    table tb[4];
    int nt = tables(tb);
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
    int nt = tables(tb);
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
    int nt = tables(tb);
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
    tcase_add_test(tc, accum_tn_vs_scalar);
    tcase_add_test(tc, add_rows_exact);
    tcase_add_test(tc, grad_row_vs_scalar);
    tcase_add_test(tc, chunk_deterministic);
    tcase_add_test(tc, half_to_f32);
    tcase_add_test(tc, half_from_f32);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(kernels_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

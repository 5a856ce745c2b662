/*
 * test_from_mask.c - dma_sparsity_from_mask (random and strided boolean masks, the builder's own
 * selection fed back, objects with no rows over many slabs) and dma_sparsity_to_dense's buffer
 * size, against the masks read directly. Every case runs on every context of
 * test_contexts_create() (each supported ISA, threads 1 and 2).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "reference.h"

/* ------------------------------------------------------------------------------------------ */
/* dma_sparsity_from_mask                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Reads the mask through `t` (any strides) into a contiguous 0/1 array: the expected result. */
static void logical_mask(const dma_tensor *t, uint8_t *dst)
{
    const uint8_t *src = t->data;
    int64_t x = 0;
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int64_t h = 0; h < t->shape[1]; h++)
            for (int64_t i = 0; i < t->shape[2]; i++)
                for (int64_t j = 0; j < t->shape[3]; j++)
                    dst[x++] = src[b * t->stride[0] + h * t->stride[1] + i * t->stride[2] +
                                   j * t->stride[3]] != 0;
}

static void check_from_mask(const dma_tensor *t, const test_ctx *ctxs, int nctx, const char *what)
{
    const int64_t n = t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3];
    uint8_t *expect = test_malloc((size_t)n);
    uint8_t *got = test_malloc((size_t)n);
    logical_mask(t, expect);
    for (int c = 0; c < nctx; c++) {
        dma_sparsity *sp = NULL;
        dma_status st = dma_sparsity_from_mask(ctxs[c].ctx, t, &sp);
        ck_assert_msg(st == DMA_OK && sp != NULL, "%s: from_mask: %s", what,
                      dma_status_string(st));
        int64_t sB, sH, sLq, sLk;
        dma_sparsity_shape(sp, &sB, &sH, &sLq, &sLk);
        ck_assert_msg(sB == t->shape[0] && sH == t->shape[1] && sLq == t->shape[2] &&
                          sLk == t->shape[3],
                      "%s: shape", what);
        memset(got, 0x77, (size_t)n);
        ck_assert_int_eq(dma_sparsity_to_dense(sp, got, (size_t)n), DMA_OK);
        ck_assert_msg(memcmp(got, expect, (size_t)n) == 0, "%s: %s/%d: dense mask differs", what,
                      dma_isa_name(ctxs[c].isa), ctxs[c].threads);
        ck_assert_msg(dma_sparsity_nnz(sp) == ref_popcount(expect, n), "%s: nnz", what);
        dma_sparsity_destroy(sp);
    }
    free(expect);
    free(got);
}

START_TEST(from_mask_random)
{
    static const uint8_t truthy[] = {1, 2, 0x80, 255};
    static const double densities[] = {0.0, 0.03, 0.5, 0.97, 1.0};
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    test_rng r = rng_make(1600);
    for (int t = 0; t < 40; t++) {
        int64_t B = rng_int(&r, 1, 2), H = rng_int(&r, 1, 3);
        int64_t Lq = rng_int(&r, 0, 150), Lk = rng_int(&r, 0, 150);
        if (t == 0) { Lq = 1; Lk = 1; }
        if (t == 1) { Lq = 300; Lk = 300; }
        double density = densities[t % 5];
        uint8_t *m = test_malloc((size_t)(B * H * Lq * Lk));
        for (int64_t x = 0; x < B * H * Lq * Lk; x++)
            m[x] = rng_bernoulli(&r, density) ? truthy[rng_int(&r, 0, 3)] : 0;
        /* some fully empty and fully set rows */
        for (int64_t row = 0; row < B * H * Lq; row++) {
            if (rng_bernoulli(&r, 0.05))
                memset(m + row * Lk, 0, (size_t)Lk);
            else if (rng_bernoulli(&r, 0.05))
                memset(m + row * Lk, 1, (size_t)Lk);
        }
        dma_tensor tm = dma_tensor_4d(m, DMA_BOOL, B, H, Lq, Lk);
        char what[96];
        snprintf(what, sizeof what, "random mask t=%d (%lld,%lld,%lld,%lld) density %.2f", t,
                 (long long)B, (long long)H, (long long)Lq, (long long)Lk, density);
        check_from_mask(&tm, ctxs, nctx, what);
        free(m);
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(from_mask_strided)
{
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    test_rng r = rng_make(1700);
    enum { B = 2, H = 3, Lq = 37, Lk = 53, PAD = 5 };
    uint8_t *m = test_malloc((size_t)B * H * Lq * (Lk + PAD));
    for (size_t x = 0; x < (size_t)B * H * Lq * (Lk + PAD); x++)
        m[x] = (uint8_t)(rng_bernoulli(&r, 0.4) ? rng_int(&r, 1, 255) : 0);

    /* broadcast (1, 1, Lq, Lk) data over B and H */
    dma_tensor t1 = dma_tensor_4d(m, DMA_BOOL, B, H, Lq, Lk);
    t1.stride[0] = 0;
    t1.stride[1] = 0;
    check_from_mask(&t1, ctxs, nctx, "stride 0 over B and H");

    /* one row broadcast over every query (stride 0 over Lq) */
    dma_tensor t2 = dma_tensor_4d(m, DMA_BOOL, B, H, Lq, Lk);
    t2.stride[2] = 0;
    check_from_mask(&t2, ctxs, nctx, "stride 0 over Lq");

    /* padded rows: row stride Lk + PAD */
    dma_tensor t3 = dma_tensor_4d(m, DMA_BOOL, B, H, Lq, Lk + PAD);
    t3.shape[3] = Lk;
    check_from_mask(&t3, ctxs, nctx, "row stride Lk + 5");

    /* memory laid out (H, B, Lq, Lk): batch and head strides swapped */
    dma_tensor t4 = dma_tensor_4d(m, DMA_BOOL, B, H, Lq, Lk);
    t4.stride[0] = (int64_t)Lq * Lk;
    t4.stride[1] = (int64_t)B * Lq * Lk;
    check_from_mask(&t4, ctxs, nctx, "(H, B, Lq, Lk) layout");

    free(m);
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(no_rows_many_slabs)
{
    /* Lq = 0 over 2^40 (batch, head) slabs: an empty object, made without per-slab bookkeeping
     * (a terabyte of it before; the fuzzer found the from_mask case) */
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    const int64_t big = (int64_t)1 << 20;
    uint8_t m[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    dma_tensor t = dma_tensor_4d(m, DMA_BOOL, big, big, 0, 8);
    t.stride[0] = t.stride[1] = t.stride[2] = 0;
    for (int c = 0; c < nctx; c++) {
        for (int how = 0; how < 2; how++) {
            dma_sparsity *sp = NULL;
            dma_mask_params mp = {.kind = DMA_MASK_WINDOW, .causal = 1, .window = 4};
            dma_status st = how ? dma_sparsity_from_mask(ctxs[c].ctx, &t, &sp)
                                : dma_sparsity_build(ctxs[c].ctx, &mp, big, big, 0, 8, NULL,
                                                     NULL, &sp);
            ck_assert_msg(st == DMA_OK && sp, "%s: %s", how ? "from_mask" : "build",
                          dma_context_last_error(ctxs[c].ctx));
            int64_t B, H, Lq, Lk;
            dma_sparsity_shape(sp, &B, &H, &Lq, &Lk);
            ck_assert(B == big && H == big && Lq == 0 && Lk == 8);
            ck_assert_int_eq(dma_sparsity_nnz(sp), 0);
            dma_sparsity_destroy(sp);
        }
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(from_mask_matches_builder)
{
    /* the reference top-k mask fed to from_mask gives the same selection as the builder */
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    enum { Lq = 70, Lk = 90, W = 9 };
    test_rng r = rng_make(1800);
    float bias[Lk];
    uint8_t *expect = test_malloc(Lq * Lk), *got = test_malloc(Lq * Lk);
    for (int j = 0; j < Lk; j++)
        bias[j] = rng_float(&r, -1.0f, 1.0f);
    ref_mask_args ra = {.kind = DMA_MASK_TOPK, .causal = 1, .window = W, .B = 1, .H = 1,
                        .Lq = Lq, .Lk = Lk, .bias = bias, .Bb = 1, .Hb = 1, .Lb = 1};
    ref_mask(&ra, expect);
    dma_tensor tm = dma_tensor_4d(expect, DMA_BOOL, 1, 1, Lq, Lk);
    dma_tensor tb = dma_tensor_4d(bias, DMA_F32, 1, 1, 1, Lk);
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = W};
    for (int c = 0; c < nctx; c++) {
        dma_sparsity *s1 = NULL, *s2 = NULL;
        ck_assert_int_eq(dma_sparsity_from_mask(ctxs[c].ctx, &tm, &s1), DMA_OK);
        ck_assert_int_eq(dma_sparsity_build(ctxs[c].ctx, &mp, 1, 1, Lq, Lk, &tb, NULL, &s2),
                         DMA_OK);
        ck_assert_int_eq(dma_sparsity_to_dense(s1, got, Lq * Lk), DMA_OK);
        ck_assert(memcmp(got, expect, Lq * Lk) == 0);
        ck_assert_int_eq(dma_sparsity_to_dense(s2, got, Lq * Lk), DMA_OK);
        ck_assert(memcmp(got, expect, Lq * Lk) == 0);
        ck_assert_int_eq(dma_sparsity_nnz(s1), dma_sparsity_nnz(s2));
        dma_sparsity_destroy(s1);
        dma_sparsity_destroy(s2);
    }
    free(expect);
    free(got);
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(to_dense_exact_size)
{
    /* a buffer of exactly B*H*Lq*Lk bytes is enough, a larger one is fine too */
    dma_context *ctx = test_scalar_context();
    enum { B = 2, H = 2, Lq = 5, Lk = 6, N = B * H * Lq * Lk };
    dma_mask_params mp = {.kind = DMA_MASK_DENSE, .causal = 1};
    dma_sparsity *sp = NULL;
    uint8_t buf[N + 16];
    ck_assert_int_eq(dma_sparsity_build(ctx, &mp, B, H, Lq, Lk, NULL, NULL, &sp), DMA_OK);
    ck_assert_int_eq(dma_sparsity_to_dense(sp, buf, N), DMA_OK);
    memset(buf, 0x77, sizeof buf);
    ck_assert_int_eq(dma_sparsity_to_dense(sp, buf, sizeof buf), DMA_OK);
    for (int x = 0; x < N; x++) {
        int i = (x / Lk) % Lq, j = x % Lk;
        REQUIRE(buf[x] == (j <= i + (Lk - Lq)), "element %d: %u", x, buf[x]);
    }
    ck_assert_int_eq(dma_sparsity_nnz(sp), B * H * (2 + 3 + 4 + 5 + 6));
    dma_sparsity_destroy(sp);
    dma_context_destroy(ctx);
}
END_TEST

static Suite *from_mask_suite(void)
{
    Suite *s = suite_create("from_mask");
    TCase *tm = tcase_create("from_mask");
    tcase_set_timeout(tm, 300);
    tcase_add_test(tm, from_mask_random);
    tcase_add_test(tm, from_mask_strided);
    tcase_add_test(tm, from_mask_matches_builder);
    tcase_add_test(tm, no_rows_many_slabs);
    tcase_add_test(tm, to_dense_exact_size);
    suite_add_tcase(s, tm);
    return s;
}

int main(void) { return test_run_suite(from_mask_suite()); }

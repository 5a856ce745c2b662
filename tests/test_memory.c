/*
 * test_memory.c - the sparse path's memory at 128K tokens: B = 1, L = 131072, Hq = 8, Hkv = 2,
 * D = 64, causal top-k window w = 1024 over a random per-key bias. The inputs and outputs are
 * allocated and touched first; then dma_sparsity_build, dma_forward and dma_backward run (2
 * threads), and the growth of the process's peak resident memory must stay within
 *
 *   bound = 2 x Hkv x ceil(L / 64) x (w + 64) x 16 bytes  +  64 MiB  (= 200 MiB here)
 *
 * The first term is twice the largest sparsity object the builder can make: per (kv head, tile
 * of 64 query rows), a causal top-w union holds at most w + 64 keys (each next row's set differs
 * from the last by one key in and one out), at 16 bytes per key at most (its index, its carried
 * bias, and 64 rows x 1 bit). The 64 MiB are the per-thread scratch of the forward and backward
 * (a few MiB each) and the allocator's slack. A regression that allocates anything O(L^2)
 * (2 GiB for one head's bitmask) or O(L x w) per row (1 GiB) fails. The object's own size,
 * dma_sparsity_bytes, is checked against the first term as well. Measured here: the peak grew
 * by 101 MiB, the object is 51 MiB.
 *
 * Peak RSS is the kernel's (getrusage), so this runs only in builds without sanitizers and not
 * under an emulator (tests/meson.build registers it so).
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "common.h"

enum { L = 131072, HQ = 8, HKV = 2, D = 64, W = 1024, TILE = 64 };

static size_t peak_rss_bytes(void)
{
    struct rusage ru;
    ck_assert_int_eq(getrusage(RUSAGE_SELF, &ru), 0);
    return (size_t)ru.ru_maxrss * 1024; /* Linux reports KiB */
}

/* n floats, every page written: random values (r), or NaN (r == NULL: outputs, so that the
 * check below sees that they were written). */
static float *touched(size_t n, test_rng *r)
{
    float *x = test_malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++)
        x[i] = r ? rng_float(r, -1.0f, 1.0f) : NAN;
    return x;
}

START_TEST(sparse_path_memory_at_128k)
{
    test_rng r = rng_make(131);
    const size_t nq = (size_t)L * HQ * D, nk = (size_t)L * HKV * D;
    float *q = touched(nq, &r), *k = touched(nk, &r), *v = touched(nk, &r);
    float *bias = touched((size_t)HKV * L, &r), *dout = touched(nq, &r);
    float *out = touched(nq, NULL), *lse = touched((size_t)HQ * L, NULL);
    float *dq = touched(nq, NULL), *dk = touched(nk, NULL), *dv = touched(nk, NULL);
    float *dbias = touched((size_t)HKV * L, NULL);
    dma_context *ctx;
    ck_assert_int_eq(dma_context_create(&(dma_context_options){.threads = 2}, &ctx), DMA_OK);
    const size_t before = peak_rss_bytes();

    const size_t object_bound = (size_t)HKV * ((L + TILE - 1) / TILE) * (W + TILE) * 16;
    const size_t bound = 2 * object_bound + ((size_t)64 << 20);
    dma_tensor tq = dma_tensor_4d(q, DMA_F32, 1, L, HQ, D), tk = dma_tensor_4d(k, DMA_F32, 1, L, HKV, D);
    dma_tensor tv = dma_tensor_4d(v, DMA_F32, 1, L, HKV, D), to = dma_tensor_4d(out, DMA_F32, 1, L, HQ, D);
    dma_tensor tl = dma_tensor_3d(lse, DMA_F32, 1, HQ, L), tb = dma_tensor_4d(bias, DMA_F32, 1, HKV, 1, L);
    dma_tensor tdo = dma_tensor_4d(dout, DMA_F32, 1, L, HQ, D), tdq = dma_tensor_4d(dq, DMA_F32, 1, L, HQ, D);
    dma_tensor tdk = dma_tensor_4d(dk, DMA_F32, 1, L, HKV, D), tdv = dma_tensor_4d(dv, DMA_F32, 1, L, HKV, D);
    dma_tensor tdb = dma_tensor_4d(dbias, DMA_F32, 1, HKV, 1, L);
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = W};
    dma_sparsity *sp = NULL;
    ck_assert_int_eq(dma_sparsity_build(ctx, &mp, 1, HKV, L, L, &tb, NULL, &sp), DMA_OK);
    const size_t object = dma_sparsity_bytes(sp);
    ck_assert_msg(object <= object_bound, "the sparsity object takes %zu bytes, above %zu",
                  object, object_bound);
    dma_attn_params ap = {.causal = 1};
    ck_assert_int_eq(dma_forward(ctx, &tq, &tk, &tv, &tb, sp, &ap, &to, &tl), DMA_OK);
    ck_assert_int_eq(dma_backward(ctx, &tq, &tk, &tv, &tb, sp, &ap, &to, &tl, &tdo, &tdq, &tdk,
                                  &tdv, &tdb), DMA_OK);
    const size_t growth = peak_rss_bytes() - before;
    ck_assert_msg(growth <= bound, "build + forward + backward grew the peak resident memory "
                  "by %.1f MiB, above the bound of %.1f MiB (sparsity object %.1f MiB)",
                  growth / 1048576.0, bound / 1048576.0, object / 1048576.0);
    /* the work was done: the outputs, NaN before, are numbers now */
    for (size_t i = 0; i < nq; i += 4099)
        ck_assert_msg(isfinite(out[i]) && isfinite(dq[i]), "out or dq not written at %zu", i);
    for (size_t i = 0; i < nk; i += 4099)
        ck_assert_msg(isfinite(dk[i]) && isfinite(dv[i]), "dk or dv not written at %zu", i);
    if (getenv("DMATTN_TEST_VERBOSE"))
        printf("memory at L %d: peak grew %.1f MiB (bound %.1f), sparsity object %.1f MiB\n",
               L, growth / 1048576.0, bound / 1048576.0, object / 1048576.0);
    dma_sparsity_destroy(sp);
    dma_context_destroy(ctx);
    free(q); free(k); free(v); free(bias); free(dout); free(out); free(lse);
    free(dq); free(dk); free(dv); free(dbias);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("memory");
    TCase *tc = tcase_create("bounds");
    tcase_set_timeout(tc, 900);
    tcase_add_test(tc, sparse_path_memory_at_128k);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

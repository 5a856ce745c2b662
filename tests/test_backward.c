/*
 * test_backward.c - dma_backward (dq, dk, dv, dbias) against
 *   - the double precision reference of reference_backward.c, on a randomised grid with fixed
 *     seeds and on hand-picked shapes (every ISA the host runs, threads 1 and 2);
 *   - itself: bitwise identical results for any thread count and for repeated calls.
 * Its checks against finite differences (which also validate the reference backward) are in
 * test_backward_fd.c, its bad-input cases in test_backward_errors.c; its harness (cases, data,
 * calls, checks) in backward_cases.c.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "backward_cases.h"
#include "common.h"

/* ------------------------------------------------------------------------------------------ */
/* Against the reference                                                                      */
/* ------------------------------------------------------------------------------------------ */

START_TEST(random_small)
{
    run_random(101, 90, 48, 2e5);
}
END_TEST

START_TEST(random_medium)
{
    run_random(102, 16, 300, 2e6);
}
END_TEST

START_TEST(every_head_dim)
{
    /* every D with each head layout: causal top-k 7 over a per-key bias that is also the
     * attention bias (the DMA case) */
    bwd_case cases[7 * 4];
    int n = 0;
    test_rng r = rng_make(103);
    for (int d = 0; d < 7; d++)
        for (int hp = 0; hp < 4; hp++) {
            bwd_case c = plain_case(2, 37, 53, TEST_HEADS[hp][0], TEST_HEADS[hp][1], TEST_DIMS[d],
                                    rng_u64(&r));
            c.causal = 1;
            set_topk(&r, &c, 0, 7);
            c.mask_causal = 1;
            c.Bs = c.mBb = 2;
            c.Hs = c.mHb = c.Hkv;
            bias_from_mbias(&c);
            c.softcap = (d % 2) ? 5.0f : 0.0f;
            cases[n++] = c;
        }
    run_cases(cases, n);
}
END_TEST

START_TEST(large)
{
    /* the largest shapes, a few times */
    bwd_case cases[4];
    test_rng r = rng_make(104);
    cases[0] = plain_case(1, 300, 300, 1, 1, 256, rng_u64(&r)); /* dense causal, D = 256 */
    cases[0].causal = 1;
    cases[0].Bb = 1;
    cases[0].Hb = 1;
    cases[0].Lb = 1;
    cases[1] = plain_case(1, 300, 300, 2, 1, 128, rng_u64(&r)); /* top-k 64, per-key bias */
    cases[1].causal = 1;
    set_topk(&r, &cases[1], 0, 64);
    cases[1].mask_causal = 1;
    cases[1].Hs = cases[1].mHb = 1;
    bias_from_mbias(&cases[1]);
    cases[2] = plain_case(1, 257, 300, 2, 2, 100, rng_u64(&r)); /* per-row bias top-k 64 */
    cases[2].softcap = 5.0f;
    set_topk(&r, &cases[2], 1, 64);
    cases[2].Hs = cases[2].mHb = 2;
    cases[2].Bs = cases[2].mBb = 1;
    bias_from_mbias(&cases[2]);
    cases[3] = plain_case(1, 280, 300, 4, 1, 64, rng_u64(&r)); /* window >= Lk, strided */
    set_topk(&r, &cases[3], 0, 300);
    bias_from_mbias(&cases[3]);
    cases[3].strided = 1;
    run_cases(cases, 4);
}
END_TEST

START_TEST(paired_tiles)
{
    /* Causal top-k over a per-key bias that falls with the key, with a few late risers:
     * consecutive tiles select nearly the same keys, so the backward pairs tiles t, t + 1 into
     * one work item over their merged union (with these shapes most tiles pair). Covered: a
     * partial last tile, unions of more than one chunk, GQA with two items per tile (Hq / Hkv >
     * heads per item), softcap, a batch of two, and strided tensors. */
    bwd_case cases[5];
    test_rng r = rng_make(131);
    cases[0] = plain_case(1, 600, 600, 4, 2, 32, rng_u64(&r));
    set_topk(&r, &cases[0], 0, 128);
    cases[1] = plain_case(2, 400, 450, 8, 2, 32, rng_u64(&r));
    set_topk(&r, &cases[1], 0, 64);
    cases[1].softcap = 5.0f;
    cases[2] = plain_case(1, 520, 520, 16, 1, 24, rng_u64(&r));
    set_topk(&r, &cases[2], 0, 96);
    cases[3] = plain_case(1, 700, 700, 2, 1, 40, rng_u64(&r));
    set_topk(&r, &cases[3], 0, 300);
    cases[3].strided = 1;
    cases[4] = plain_case(1, 333, 333, 4, 4, 16, rng_u64(&r));
    set_topk(&r, &cases[4], 0, 40);
    for (int i = 0; i < 5; i++) {
        cases[i].causal = cases[i].mask_causal = 1;
        cases[i].decaying = 1;
        cases[i].Bs = cases[i].mBb = cases[i].B;
        cases[i].Hs = cases[i].mHb = cases[i].Hkv;
        cases[i].Bp = 0;
        bias_from_mbias(&cases[i]);
    }
    run_cases(cases, 5);
}
END_TEST

START_TEST(lq_differs_from_lk)
{
    /* bottom-right causal alignment both ways; decoding (Lq = 1); Lq > Lk gives empty rows */
    static const int64_t lens[][2] = {{5, 80}, {80, 5}, {100, 37}, {37, 100}, {1, 131},
                                      {131, 1}, {2, 300}, {300, 2}};
    bwd_case cases[8 * 3];
    int n = 0;
    test_rng r = rng_make(105);
    for (int l = 0; l < 8; l++)
        for (int v = 0; v < 3; v++) {
            int hp = (int)rng_int(&r, 0, 3);
            bwd_case c = plain_case(rng_int(&r, 1, 2), lens[l][0], lens[l][1], TEST_HEADS[hp][0],
                                    TEST_HEADS[hp][1], rng_pick(&r, TEST_DIMS, 5), rng_u64(&r));
            c.causal = v != 2;
            if (v == 0) {
                random_bias(&r, &c);
            } else {
                set_topk(&r, &c, v == 2, random_window(&r, &c));
                c.mask_causal = c.causal;
                bias_from_mbias(&c);
            }
            cases[n++] = c;
        }
    run_cases(cases, n);
}
END_TEST

START_TEST(bias_broadcasts)
{
    /* every attention bias shape (Bb, Hb, Lb) in {1, B} x {1, Hkv, Hq} x {1, Lq}, with the
     * selection from a per-key (object H = Hkv) and from a per-row (H = Hq) top-k */
    bwd_case cases[2 * 3 * 2 * 2];
    int n = 0;
    test_rng r = rng_make(106);
    for (int bb = 0; bb < 2; bb++)
        for (int hb = 0; hb < 3; hb++)
            for (int lb = 0; lb < 2; lb++)
                for (int per_row = 0; per_row < 2; per_row++) {
                    bwd_case c = plain_case(2, 29, 43, 8, 2, 16, rng_u64(&r));
                    c.causal = (int)rng_int(&r, 0, 1);
                    set_topk(&r, &c, per_row, 7);
                    c.Bs = c.mBb = 2;
                    c.Hs = c.mHb = per_row ? 8 : 2;
                    c.Bb = bb ? 2 : 1;
                    c.Hb = hb == 0 ? 1 : hb == 1 ? 2 : 8;
                    c.Lb = lb ? c.Lq : 1;
                    c.softcap = (n % 3 == 0) ? 1.5f : 0.0f;
                    cases[n++] = c;
                }
    run_cases(cases, n);
}
END_TEST

START_TEST(topk_windows)
{
    /* window 1, 7, 64 and >= Lk, per-key and per-row, with and without key padding */
    static const int64_t windows[] = {1, 7, 64, 97, 500};
    bwd_case cases[5 * 2 * 2];
    int n = 0;
    test_rng r = rng_make(107);
    for (int w = 0; w < 5; w++)
        for (int per_row = 0; per_row < 2; per_row++)
            for (int padded = 0; padded < 2; padded++) {
                int hp = (int)rng_int(&r, 0, 3);
                bwd_case c = plain_case(1 + padded, 71, 97, TEST_HEADS[hp][0], TEST_HEADS[hp][1],
                                        40, rng_u64(&r));
                c.causal = (int)rng_int(&r, 0, 1);
                set_topk(&r, &c, per_row, windows[w]);
                c.mask_causal = c.causal;
                c.Bp = padded ? c.Bs : 0;
                if (rng_bernoulli(&r, 0.5))
                    bias_from_mbias(&c);
                else
                    random_bias(&r, &c);
                cases[n++] = c;
            }
    run_cases(cases, n);
}
END_TEST

START_TEST(empty_rows)
{
    /* rows that select nothing give zero gradients; keys nobody selects get dk = dv = 0 */
    bwd_case cases[7];
    test_rng r = rng_make(108);
    cases[0] = plain_case(2, 50, 20, 4, 1, 16, rng_u64(&r)); /* causal, Lq > Lk */
    cases[0].causal = 1;
    random_bias(&r, &cases[0]);
    cases[1] = plain_case(1, 40, 40, 4, 4, 64, rng_u64(&r)); /* empty mask */
    cases[1].sel = SEL_MASK;
    cases[1].Hs = 4;
    cases[1].density = 0.0;
    cases[1].Bb = cases[1].Hb = cases[1].Lb = 1;
    cases[2] = plain_case(2, 40, 33, 8, 2, 100, rng_u64(&r)); /* sparse mask: some empty rows */
    cases[2].sel = SEL_MASK;
    cases[2].Bs = 2;
    cases[2].Hs = 8;
    cases[2].density = 0.03;
    random_bias(&r, &cases[2]);
    cases[3] = plain_case(1, 30, 30, 4, 2, 40, rng_u64(&r)); /* top-k with window 0 */
    set_topk(&r, &cases[3], 0, 0);
    bias_from_mbias(&cases[3]);
    cases[4] = plain_case(2, 60, 45, 4, 2, 40, rng_u64(&r)); /* causal top-k, Lq > Lk, padding */
    cases[4].causal = 1;
    set_topk(&r, &cases[4], 0, 3);
    cases[4].mask_causal = 1;
    cases[4].Bp = cases[4].Bs;
    bias_from_mbias(&cases[4]);
    cases[5] = plain_case(2, 33, 47, 4, 2, 64, rng_u64(&r)); /* -inf attention bias entries */
    cases[5].Bb = 2;
    cases[5].Hb = 4;
    cases[5].Lb = 33;
    cases[5].bias_neginf = 1;
    cases[6] = plain_case(1, 30, 12, 4, 4, 16, rng_u64(&r)); /* causal, Lq > Lk, softcap */
    cases[6].causal = 1;
    cases[6].softcap = 1.5f;
    cases[6].strided = 1;
    random_bias(&r, &cases[6]);
    run_cases(cases, 7);
}
END_TEST

START_TEST(zero_lengths)
{
    /* Lk = 0: every row is empty, dq = 0; Lq = 0: dk = dv = dbias = 0 */
    bwd_case cases[4];
    test_rng r = rng_make(109);
    cases[0] = plain_case(2, 7, 0, 4, 2, 16, rng_u64(&r));
    cases[0].Bb = 2;
    cases[0].Hb = 2;
    cases[0].Lb = 1;
    cases[1] = plain_case(2, 7, 0, 4, 2, 16, rng_u64(&r));
    cases[1].causal = 1;
    cases[2] = plain_case(2, 0, 9, 4, 2, 16, rng_u64(&r));
    cases[2].Bb = 1;
    cases[2].Hb = 4;
    cases[2].Lb = 1;
    cases[3] = plain_case(1, 0, 0, 1, 1, 1, rng_u64(&r));
    run_cases(cases, 4);
}
END_TEST

START_TEST(softcap_and_scale)
{
    bwd_case cases[12];
    test_rng r = rng_make(110);
    static const float softcaps[] = {0.0f, 0.25f, 1.5f, 30.0f};
    for (int i = 0; i < 12; i++) {
        cases[i] = plain_case(1, 41, 41, 4, 2, 64, rng_u64(&r));
        cases[i].softcap = softcaps[i % 4];
        cases[i].scale = (i / 4 == 0) ? 0.0f : (i / 4 == 1) ? 0.05f : 0.5f;
        cases[i].causal = i % 2;
        random_bias(&r, &cases[i]);
    }
    run_cases(cases, 12);
}
END_TEST

START_TEST(dbias_optional)
{
    /* a bias without dbias: dq, dk, dv are still right and nothing is written for dbias */
    bwd_case cases[4];
    test_rng r = rng_make(111);
    for (int i = 0; i < 4; i++) {
        cases[i] = plain_case(2, 35, 50, 4, 2, 32, rng_u64(&r));
        cases[i].causal = i % 2;
        set_topk(&r, &cases[i], i >= 2, 7);
        bias_from_mbias(&cases[i]);
        cases[i].no_dbias = 1;
        cases[i].strided = i == 3;
    }
    run_cases(cases, 4);
}
END_TEST

START_TEST(strided_views)
{
    bwd_case cases[12];
    test_rng r = rng_make(112);
    for (int i = 0; i < 12; i++) {
        cases[i] = random_case(&r, 70, 3e5);
        cases[i].strided = 1;
    }
    run_cases(cases, 12);
}
END_TEST

START_TEST(every_isa)
{
    /* each instruction set the host runs, one context each, against the reference */
    static const dma_isa isas[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512, DMA_ISA_NEON};
    enum { N = 10 };
    bwd_case cases[N];
    test_rng r = rng_make(113);
    for (int i = 0; i < N; i++) {
        cases[i] = random_case(&r, 120, 6e5);
        cases[i].D = TEST_DIMS[i % 7];
    }
    int tested = 0;
    CHECK(dma_isa_supported(DMA_ISA_SCALAR), "the scalar path must always run");
    for (size_t s = 0; s < sizeof isas / sizeof isas[0]; s++) {
        if (!dma_isa_supported(isas[s]))
            continue;
        dma_context_options opts;
        memset(&opts, 0, sizeof opts);
        opts.isa = isas[s];
        opts.threads = 1 + (int)(s % 2);
        test_ctx tc = {NULL, isas[s], opts.threads};
        dma_status st = dma_context_create(&opts, &tc.ctx);
        CHECK(st == DMA_OK, "context for %s: %s", dma_isa_name(isas[s]),
                      dma_status_string(st));
        ck_assert_int_eq(dma_context_isa(tc.ctx), isas[s]);
        for (int i = 0; i < N; i++)
            run_case(&cases[i], &tc, 1);
        dma_context_destroy(tc.ctx);
        tested++;
    }
    ck_assert_int_ge(tested, 1);
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* Determinism                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* Case c's forward and backward on ctx[0] (checked against the reference), then its backward
 * on ctx[1 .. n) (threads[t] threads each): every call's gradients bitwise those of the first. */
static void backward_agrees(const bwd_case *c, dma_context **ctx, const int *threads, int n)
{
    bwd_data f;
    data_make(c, &f);
    dma_sparsity *sp = make_sparsity(c, &f, ctx[0]);
    call_forward(c, &f, ctx[0], sp);
    check_forward(c, &f, ctx[0]);
    call_backward(c, &f, ctx[0], sp);
    check_against_reference(c, &f, ctx[0]);
    snapshot first;
    snap_take(&first, &f);
    for (int t = 1; t < n; t++) {
        call_backward(c, &f, ctx[t], sp);
        const char *d = snap_diff(&first, &f, 0, 11);
        CHECK(d == NULL, "%s: %s differs between threads %d and %d (call %d) %s",
              dma_isa_name(dma_context_isa(ctx[t])), d ? d : "", threads[0], threads[t], t + 1,
              describe(c));
    }
    snap_free(&first);
    dma_sparsity_destroy(sp);
    data_free(&f);
}

/* One context per entry of threads[n], all on `isa`. */
static void contexts_for_threads(dma_isa isa, const int *threads, int n, dma_context **ctx)
{
    for (int t = 0; t < n; t++) {
        dma_context_options opts;
        memset(&opts, 0, sizeof opts);
        opts.isa = isa;
        opts.threads = threads[t];
        ctx[t] = NULL;
        ck_assert_int_eq(dma_context_create(&opts, &ctx[t]), DMA_OK);
    }
}

START_TEST(deterministic)
{
    /* one forward; backward with threads 1, 2, 3 and again 1 and 2, on every ISA: the gradients
     * must be bitwise identical (dk, dv, dbias sum over rows, heads and batches here) */
    bwd_case cases[5];
    test_rng r = rng_make(130);
    cases[0] = plain_case(2, 200, 200, 8, 2, 64, rng_u64(&r)); /* DMA: causal top-16 */
    cases[0].causal = 1;
    set_topk(&r, &cases[0], 0, 16);
    cases[0].mask_causal = 1;
    cases[0].Bs = cases[0].mBb = 2;
    cases[0].Hs = cases[0].mHb = 2;
    bias_from_mbias(&cases[0]);
    cases[1] = plain_case(1, 150, 190, 4, 1, 40, rng_u64(&r)); /* per-row top-32, softcap */
    set_topk(&r, &cases[1], 1, 32);
    cases[1].Hs = cases[1].mHb = 4;
    bias_from_mbias(&cases[1]);
    cases[1].softcap = 5.0f;
    cases[2] = plain_case(2, 130, 130, 4, 4, 16, rng_u64(&r)); /* dense causal, bias (1,1,1,Lk) */
    cases[2].causal = 1;
    cases[2].Bb = cases[2].Hb = cases[2].Lb = 1;
    /* unions of several chunks (the backward adds a chunk as soon as it is done once the
     * item's turn has come, else at the item's end: both must give the same bits), two kv
     * heads adding independently */
    cases[3] = plain_case(1, 700, 700, 4, 2, 32, rng_u64(&r));
    cases[3].causal = 1;
    set_topk(&r, &cases[3], 0, 400);
    cases[3].mask_causal = 1;
    cases[3].Hs = cases[3].mHb = 2;
    bias_from_mbias(&cases[3]);
    /* consecutive tiles with nearly the same keys: the backward pairs them into one work item
     * over their merged union (rows of two tiles, bitmasks remapped) */
    cases[4] = plain_case(1, 600, 600, 4, 2, 32, rng_u64(&r));
    cases[4].causal = 1;
    set_topk(&r, &cases[4], 0, 128);
    cases[4].mask_causal = 1;
    cases[4].decaying = 1;
    cases[4].Hs = cases[4].mHb = 2;
    bias_from_mbias(&cases[4]);

    static const dma_isa isas[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512, DMA_ISA_NEON};
    static const int threads[] = {1, 2, 3, 1, 2};
    for (size_t s = 0; s < sizeof isas / sizeof isas[0]; s++) {
        if (!dma_isa_supported(isas[s]))
            continue;
        dma_context *ctx[5];
        contexts_for_threads(isas[s], threads, 5, ctx);
        for (int i = 0; i < 5; i++)
            backward_agrees(&cases[i], ctx, threads, 5);
        for (int t = 0; t < 5; t++)
            dma_context_destroy(ctx[t]);
    }
}
END_TEST

START_TEST(tn_rows_invariant)
{
    /* The backward's dK and dV calls take 64 rows, or two blocks of 64 that cover the same
     * columns when the context's tn_rows is 128 (the default on Zen 4; DMATTN_TN_ROWS picks
     * either on any CPU). The kernels sum each output row by row in order, so the
     * gradients must be bitwise the same both ways, on every ISA. */
    bwd_case cases[4];
    test_rng r = rng_make(133);
    /* a per-key bias per kv head: the two query heads of a kv head select the same keys, so
     * their blocks of rows cover the same columns and share calls */
    cases[0] = plain_case(1, 300, 300, 4, 2, 32, rng_u64(&r));
    cases[0].causal = 1;
    set_topk(&r, &cases[0], 0, 64);
    cases[0].decaying = 1;
    cases[0].Hs = cases[0].mHb = 2;
    /* MHA, every key kept: within an item of two tiles the second tile's rows see 64 keys the
     * first's cannot (calls stay apart across that diagonal); unions of several chunks */
    cases[1] = plain_case(1, 520, 520, 2, 2, 24, rng_u64(&r));
    cases[1].causal = 1;
    set_topk(&r, &cases[1], 0, 520);
    cases[1].Hs = cases[1].mHb = 2;
    /* per-row top-k of each query head: blocks cover different columns */
    cases[2] = plain_case(2, 200, 260, 8, 2, 48, rng_u64(&r));
    set_topk(&r, &cases[2], 1, 40);
    cases[2].Hs = cases[2].mHb = 8;
    cases[2].Bs = cases[2].mBb = 2;
    /* eight query heads a kv head, D 136 (a last block of D narrower than 64) */
    cases[3] = plain_case(1, 140, 140, 8, 1, 136, rng_u64(&r));
    cases[3].causal = 1;
    set_topk(&r, &cases[3], 0, 48);
    cases[3].mask_causal = 1;
    for (int i = 0; i < 4; i++) {
        cases[i].mask_causal = cases[i].causal;
        bias_from_mbias(&cases[i]);
    }

    static const dma_isa isas[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512, DMA_ISA_NEON};
    static const int threads[] = {2, 2, 1};
    static const char *const rows[] = {"64", "128", "128"};
    for (size_t s = 0; s < sizeof isas / sizeof isas[0]; s++) {
        if (!dma_isa_supported(isas[s]))
            continue;
        dma_context *ctx[3];
        for (int t = 0; t < 3; t++) {
            ck_assert_int_eq(setenv("DMATTN_TN_ROWS", rows[t], 1), 0);
            contexts_for_threads(isas[s], &threads[t], 1, &ctx[t]);
        }
        ck_assert_int_eq(unsetenv("DMATTN_TN_ROWS"), 0);
        for (int i = 0; i < 4; i++)
            backward_agrees(&cases[i], ctx, threads, 3);
        for (int t = 0; t < 3; t++)
            dma_context_destroy(ctx[t]);
    }
}
END_TEST

START_TEST(parked_spans)
{
    /* More threads than the machine has cores, on streams of many spans: threads finish spans
     * before their turn and park them, and whoever passes the turn adds them (lib/backward.c,
     * "Parking"). The gradients must still be bitwise those of one thread, call after call. */
    bwd_case cases[4];
    test_rng r = rng_make(131);
    /* one stream (Hkv = 1) of paired tiles: a parked pair's merged view must outlive the spans
     * its thread computes after it */
    cases[0] = plain_case(1, 1536, 1536, 4, 1, 32, rng_u64(&r));
    cases[0].causal = 1;
    set_topk(&r, &cases[0], 0, 192);
    cases[0].decaying = 1;
    /* two streams (a bias per kv head), unions over two chunks: a span may add its first chunk
     * late and the rest as it goes */
    cases[1] = plain_case(1, 1536, 1536, 4, 2, 32, rng_u64(&r));
    cases[1].causal = 1;
    set_topk(&r, &cases[1], 0, 320);
    cases[1].Hs = 2;
    /* one stream of both batches and kv heads: dbias broadcast over them */
    cases[2] = plain_case(2, 768, 768, 2, 2, 32, rng_u64(&r));
    cases[2].causal = 1;
    set_topk(&r, &cases[2], 0, 128);
    cases[2].Bs = 2;
    cases[2].Hs = 2;
    /* four streams (kv heads): with 8 and 6 threads they are taken in groups of 4 and of 3
     * and 1 (ceil(threads / 2) streams a group), about two threads to a stream */
    cases[3] = plain_case(1, 1024, 1024, 4, 4, 32, rng_u64(&r));
    cases[3].causal = 1;
    set_topk(&r, &cases[3], 0, 192);
    cases[3].Hs = 4;
    for (int i = 0; i < 4; i++) {
        cases[i].mask_causal = 1;
        cases[i].mBb = cases[i].Bs;
        cases[i].mHb = cases[i].Hs;
        cases[i].Bp = 0;
        bias_from_mbias(&cases[i]);
    }
    cases[2].Bb = cases[2].Hb = 1;
    cases[2].bias_is_mbias = 0;

    static const int threads[] = {1, 8, 6, 8};
    enum { NT = sizeof threads / sizeof threads[0] };
    dma_context *ctx[NT];
    contexts_for_threads(DMA_ISA_AUTO, threads, NT, ctx);
    for (int i = 0; i < 4; i++)
        backward_agrees(&cases[i], ctx, threads, NT);
    for (int t = 0; t < NT; t++)
        dma_context_destroy(ctx[t]);
}
END_TEST

START_TEST(scratch_kept)
{
    /* A context keeps its forward's and backward's scratch between calls (dma_context_trim
     * frees it): whether it grows for a larger case, is reused by a smaller one after a larger
     * one (holding that one's panels), or comes back after a trim, the calls must agree with
     * the reference and bitwise with a fresh context's. */
    bwd_case small = plain_case(1, 200, 200, 4, 2, 32, 1401);
    bwd_case big = plain_case(1, 400, 400, 4, 2, 64, 1402); /* longer, D 64: more scratch */
    test_rng r = rng_make(132);
    bwd_case *cases[] = {&small, &big};
    for (int i = 0; i < 2; i++) {
        cases[i]->causal = 1;
        set_topk(&r, cases[i], 0, i ? 192 : 48);
        cases[i]->mask_causal = 1;
        cases[i]->Hs = cases[i]->mHb = 2;
        bias_from_mbias(cases[i]);
    }
    static const int threads[] = {2, 2};
    dma_context *used[2], *fresh[2];
    contexts_for_threads(DMA_ISA_AUTO, threads, 1, used);
    const bwd_case *order[] = {&small, &big, &small};
    for (int i = 0; i < 3; i++) {
        contexts_for_threads(DMA_ISA_AUTO, threads, 1, fresh);
        used[1] = fresh[0];
        backward_agrees(order[i], used, threads, 2);
        dma_context_destroy(fresh[0]);
    }
    dma_context_trim(used[0]);
    dma_context_trim(used[0]); /* twice: nothing left to free */
    dma_context_trim(NULL);
    contexts_for_threads(DMA_ISA_AUTO, threads, 1, fresh);
    used[1] = fresh[0];
    backward_agrees(&small, used, threads, 2);
    dma_context_destroy(fresh[0]);
    dma_context_destroy(used[0]);
}
END_TEST

/* ------------------------------------------------------------------------------------------ */

static Suite *backward_suite(void)
{
    Suite *s = suite_create("backward");
    TCase *tc = tcase_create("reference");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, random_small);
    tcase_add_test(tc, random_medium);
    tcase_add_test(tc, every_head_dim);
    tcase_add_test(tc, large);
    tcase_add_test(tc, paired_tiles);
    tcase_add_test(tc, lq_differs_from_lk);
    tcase_add_test(tc, bias_broadcasts);
    tcase_add_test(tc, topk_windows);
    tcase_add_test(tc, empty_rows);
    tcase_add_test(tc, zero_lengths);
    tcase_add_test(tc, softcap_and_scale);
    tcase_add_test(tc, dbias_optional);
    tcase_add_test(tc, strided_views);
    tcase_add_test(tc, every_isa);
    suite_add_tcase(s, tc);

    TCase *td = tcase_create("determinism");
    tcase_set_timeout(td, 600);
    tcase_add_test(td, deterministic);
    tcase_add_test(td, tn_rows_invariant);
    tcase_add_test(td, parked_spans);
    tcase_add_test(td, scratch_kept);
    suite_add_tcase(s, td);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(backward_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

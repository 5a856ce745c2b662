/*
 * test_forward.c - dma_forward against the double precision reference of reference.c.
 *
 * Every case runs on every context of test_contexts_create() (each ISA the host supports,
 * threads 1 and 2). Outputs must be within 1e-5 of the reference (out and lse), empty rows must
 * give out == 0 and lse == -inf, and threads 1 and 2 of one ISA must agree bitwise. The cases'
 * data, their runs and the random case generators are in forward_cases.c.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "forward_cases.h"
#include "reference.h"

/* ------------------------------------------------------------------------------------------ */
/* Tests                                                                                      */
/* ------------------------------------------------------------------------------------------ */

START_TEST(random_small)
{
    run_random(11, 160, 48, 2e5);
}
END_TEST

START_TEST(random_medium)
{
    run_random(12, 90, 300, 2e6);
}
END_TEST

START_TEST(every_head_dim)
{
    /* every D with each head layout, causal top-k over a per-key bias (the DMA case) */
    fwd_case cases[7 * 4];
    int n = 0;
    test_rng r = rng_make(13);
    for (int d = 0; d < 7; d++) {
        for (int hp = 0; hp < 4; hp++) {
            fwd_case c = plain_case(2, 37, 53, TEST_HEADS[hp][0], TEST_HEADS[hp][1], TEST_DIMS[d],
                                    rng_u64(&r));
            c.causal = 1;
            c.Bb = 2;
            c.Hb = c.Hkv;
            c.Lb = 1;
            make_build(&r, &c, DMA_MASK_TOPK);
            c.mask_causal = 1;
            c.window = 7;
            c.Bs = 2;
            c.Hs = c.Hkv;
            c.mBb = 2;
            c.mHb = c.Hkv;
            c.mLb = 1;
            cases[n++] = c;
        }
    }
    run_cases(cases, n);
}
END_TEST

START_TEST(large)
{
    /* the biggest shapes, a few times: D = 256 with L = 300, long dense rows, long windows */
    fwd_case cases[5];
    test_rng r = rng_make(14);
    cases[0] = plain_case(1, 300, 300, 4, 1, 256, rng_u64(&r)); /* dense causal baseline */
    cases[0].causal = 1;
    cases[1] = plain_case(1, 300, 300, 8, 2, 128, rng_u64(&r)); /* top-k 64, per-key bias */
    cases[1].causal = 1;
    cases[1].Bb = 1;
    cases[1].Hb = 2;
    cases[1].Lb = 1;
    make_build(&r, &cases[1], DMA_MASK_TOPK);
    cases[1].window = 64;
    cases[1].mask_causal = 1;
    cases[1].block_size = 0;
    cases[2] = plain_case(2, 257, 300, 4, 4, 100, rng_u64(&r)); /* per-row bias and top-k */
    cases[2].Bb = 2;
    cases[2].Hb = 4;
    cases[2].Lb = 257;
    cases[2].softcap = 5.0f;
    make_build(&r, &cases[2], DMA_MASK_TOPK);
    cases[2].Hs = 4;
    cases[2].mHb = 4;
    cases[2].mLb = 257;
    cases[2].window = 64;
    cases[3] = plain_case(1, 300, 300, 1, 1, 256, rng_u64(&r)); /* window >= Lk, strided */
    make_build(&r, &cases[3], DMA_MASK_WINDOW);
    cases[3].window = 1000;
    cases[3].strided = 1;
    cases[4] = plain_case(1, 300, 300, 4, 1, 64, rng_u64(&r)); /* smoothed top-k, padding */
    cases[4].causal = 1;
    make_build(&r, &cases[4], DMA_MASK_TOPK);
    cases[4].mask_causal = 1;
    cases[4].window = 64;
    cases[4].block_size = 16;
    cases[4].Bp = 1;
    run_cases(cases, 5);
}
END_TEST

START_TEST(paired_tiles)
{
    /* Causal top-k over a builder bias that falls with the key, with a few late risers: with one
     * query head per kv head (or per head of the object) the forward runs tiles t, t + 1 as one
     * item over their merged union (most tiles pair here). Covered: MHA, an object per query
     * head over GQA, Lq != Lk, a partial last tile, unions of more than one chunk, a per-key
     * and a per-row forward bias, softcap, a batch of two, and strided tensors. */
    fwd_case cases[5];
    test_rng r = rng_make(23);
    cases[0] = plain_case(1, 600, 600, 4, 4, 32, rng_u64(&r));
    cases[0].window = 128;
    cases[1] = plain_case(2, 400, 450, 2, 2, 40, rng_u64(&r));
    cases[1].window = 64;
    cases[1].softcap = 5.0f;
    cases[1].Bb = 2;
    cases[1].Hb = 2;
    cases[1].Lb = 1;
    cases[2] = plain_case(1, 700, 700, 2, 2, 64, rng_u64(&r));
    cases[2].window = 300;
    cases[2].strided = 1;
    cases[3] = plain_case(1, 333, 333, 4, 1, 16, rng_u64(&r));
    cases[3].window = 40;
    cases[4] = plain_case(1, 520, 520, 1, 1, 24, rng_u64(&r));
    cases[4].window = 96;
    cases[4].Bb = cases[4].Hb = 1;
    cases[4].Lb = 520;
    for (int i = 0; i < 5; i++) {
        fwd_case *c = &cases[i];
        c->causal = c->mask_causal = 1;
        c->sel = SEL_BUILD;
        c->kind = DMA_MASK_TOPK;
        c->decaying = 1;
        c->Bs = c->mBb = c->B;
        c->Hs = c->mHb = i == 3 ? c->Hq : c->Hkv; /* case 3: one object head per query head */
    }
    run_cases(cases, 5);
}
END_TEST

START_TEST(chunk_edges)
{
    /* Unions of 256 keys (one chunk), 257 to 320 (one chunk that takes the tail), 321 (256 and
     * a chunk of 65), 576 and 577 (256, then 320 in one, or 256 + 65), with and without a
     * causal mask and a per-key bias: the forward's chunking against the reference. */
    static const int64_t lks[] = {256, 257, 300, 320, 321, 576, 577};
    fwd_case cases[14];
    int n = 0;
    test_rng r = rng_make(29);
    for (int l = 0; l < 7; l++)
        for (int v = 0; v < 2; v++) {
            fwd_case c = plain_case(1, v ? lks[l] : 70, lks[l], 2, 1, rng_pick(&r, TEST_DIMS, 7),
                                    rng_u64(&r));
            c.causal = v;
            if (v)
                make_bias(&r, &c);
            cases[n++] = c;
        }
    run_cases(cases, n);
}
END_TEST

START_TEST(decode)
{
    /* Lq = 1 (one new token against a KV cache) and Lk = 1 */
    fwd_case cases[24];
    int n = 0;
    test_rng r = rng_make(15);
    static const int64_t lks[] = {1, 2, 31, 64, 299, 300};
    for (int l = 0; l < 6; l++) {
        for (int v = 0; v < 4; v++) {
            fwd_case c = plain_case(2, v == 3 ? lks[l] : 1, v == 3 ? 1 : lks[l], 8, 2,
                                    rng_pick(&r, TEST_DIMS, 7), rng_u64(&r));
            c.causal = v != 1;
            if (v >= 1) {
                make_bias(&r, &c);
                make_build(&r, &c, v == 2 ? DMA_MASK_WINDOW : DMA_MASK_TOPK);
            }
            cases[n++] = c;
        }
    }
    run_cases(cases, n);
}
END_TEST

START_TEST(lq_differs_from_lk)
{
    /* bottom-right causal alignment both ways; Lq > Lk causal gives empty leading rows */
    fwd_case cases[32];
    int n = 0;
    test_rng r = rng_make(16);
    static const int64_t lens[][2] = {{5, 80}, {80, 5}, {100, 37}, {37, 100},
                                      {129, 64}, {64, 129}, {2, 300}, {300, 2}};
    for (int l = 0; l < 8; l++) {
        for (int v = 0; v < 4; v++) {
            int hp = (int)rng_int(&r, 0, 3);
            fwd_case c = plain_case(rng_int(&r, 1, 2), lens[l][0], lens[l][1], TEST_HEADS[hp][0],
                                    TEST_HEADS[hp][1], rng_pick(&r, TEST_DIMS, 6), rng_u64(&r));
            c.causal = v != 3;
            if (v == 1 || v == 3) {
                make_bias(&r, &c);
                make_build(&r, &c, DMA_MASK_TOPK);
                c.mask_causal = c.causal;
            } else if (v == 2) {
                make_build(&r, &c, DMA_MASK_WINDOW);
            }
            cases[n++] = c;
        }
    }
    run_cases(cases, n);
}
END_TEST

START_TEST(sparsity_heads_and_batches)
{
    /* object H in {1, Hkv, Hq} and B in {1, B}, from the builder and from a mask */
    fwd_case cases[2 * 3 * 2 * 2];
    int n = 0;
    test_rng r = rng_make(17);
    for (int src = 0; src < 2; src++)
        for (int hs = 0; hs < 3; hs++)
            for (int bs = 0; bs < 2; bs++)
                for (int causal = 0; causal <= 1; causal++) {
                    fwd_case c = plain_case(2, 45, 61, 8, 2, 40, rng_u64(&r));
                    c.causal = causal;
                    make_bias(&r, &c);
                    if (src == 0)
                        make_build(&r, &c, DMA_MASK_TOPK);
                    else
                        make_mask(&r, &c);
                    const int64_t heads[] = {1, 2, 8};
                    c.Hs = heads[hs];
                    c.Bs = bs ? 2 : 1;
                    c.mBb = c.Bs;
                    c.mHb = c.Hs;
                    if (c.Bp > 1)
                        c.Bp = c.Bs;
                    if (src == 1)
                        c.density = 0.3;
                    cases[n++] = c;
                }
    run_cases(cases, n);
}
END_TEST

START_TEST(block_smoothing)
{
    fwd_case cases[16];
    int n = 0;
    test_rng r = rng_make(18);
    static const dma_mask_kind kinds[] = {DMA_MASK_TOPK, DMA_MASK_RELU, DMA_MASK_WINDOW,
                                          DMA_MASK_DENSE};
    static const int64_t blocks[] = {2, 3, 16, 1000};
    for (int kd = 0; kd < 4; kd++)
        for (int bl = 0; bl < 4; bl++) {
            int hp = (int)rng_int(&r, 0, 3);
            fwd_case c = plain_case(1, rng_int(&r, 20, 90), rng_int(&r, 20, 90), TEST_HEADS[hp][0],
                                    TEST_HEADS[hp][1], 64, rng_u64(&r));
            c.causal = (int)rng_int(&r, 0, 1);
            make_bias(&r, &c);
            make_build(&r, &c, kinds[kd]);
            c.block_size = blocks[bl];
            cases[n++] = c;
        }
    run_cases(cases, n);
}
END_TEST

START_TEST(strided_views)
{
    fwd_case cases[20];
    test_rng r = rng_make(19);
    for (int i = 0; i < 20; i++) {
        cases[i] = random_case(&r, 80, 4e5);
        cases[i].strided = 1;
        if (i % 2 == 0)
            make_bias(&r, &cases[i]);
    }
    run_cases(cases, 20);
}
END_TEST

START_TEST(empty_rows)
{
    /* rows with nothing selected: out == 0 and lse == -inf, never NaN */
    fwd_case cases[6];
    test_rng r = rng_make(20);
    cases[0] = plain_case(2, 50, 20, 4, 1, 16, rng_u64(&r)); /* causal, Lq > Lk */
    cases[0].causal = 1;
    cases[1] = plain_case(1, 40, 40, 4, 4, 64, rng_u64(&r)); /* empty mask */
    make_mask(&r, &cases[1]);
    cases[1].density = 0.0;
    cases[2] = plain_case(2, 40, 33, 8, 2, 100, rng_u64(&r)); /* sparse mask: some empty rows */
    make_mask(&r, &cases[2]);
    cases[2].density = 0.03;
    cases[3] = plain_case(1, 30, 30, 1, 1, 40, rng_u64(&r)); /* top-k with window 0 */
    make_build(&r, &cases[3], DMA_MASK_TOPK);
    cases[3].window = 0;
    cases[4] = plain_case(1, 60, 60, 4, 2, 40, rng_u64(&r)); /* heavy padding, causal window */
    make_build(&r, &cases[4], DMA_MASK_WINDOW);
    cases[4].Bp = 1;
    cases[4].window = 2;
    cases[4].causal = 1;
    cases[5] = plain_case(1, 30, 30, 4, 4, 16, rng_u64(&r)); /* mask non-causal, attn causal */
    make_mask(&r, &cases[5]);
    cases[5].density = 0.1;
    cases[5].causal = 1;
    run_cases(cases, 6);
}
END_TEST

START_TEST(bias_with_neg_inf)
{
    /* -inf bias entries (never at key 0, which every non-causal row sees) weigh nothing */
    fwd_case cases[4];
    test_rng r = rng_make(21);
    for (int i = 0; i < 4; i++) {
        cases[i] = plain_case(2, 33, 47, 4, 2, 64, rng_u64(&r));
        make_bias(&r, &cases[i]);
        cases[i].bias_neginf = 1;
    }
    run_cases(cases, 4);
}
END_TEST

START_TEST(zero_lengths)
{
    /* Lk = 0: every row is empty; Lq = 0: nothing to write */
    fwd_case cases[4];
    test_rng r = rng_make(22);
    cases[0] = plain_case(2, 7, 0, 4, 2, 16, rng_u64(&r));
    cases[1] = plain_case(2, 7, 0, 4, 2, 16, rng_u64(&r));
    cases[1].causal = 1;
    cases[2] = plain_case(2, 0, 9, 4, 2, 16, rng_u64(&r));
    cases[3] = plain_case(1, 0, 0, 1, 1, 1, rng_u64(&r));
    run_cases(cases, 4);
}
END_TEST

START_TEST(params_null_is_default)
{
    /* params = NULL behaves as all-zero parameters */
    fwd_case cases[6];
    test_rng r = rng_make(23);
    for (int i = 0; i < 6; i++) {
        cases[i] = random_case(&r, 60, 3e5);
        cases[i].scale = 0.0f;
        cases[i].softcap = 0.0f;
        cases[i].causal = 0;
        cases[i].params_null = 1;
    }
    run_cases(cases, 6);
}
END_TEST

START_TEST(lse_optional)
{
    /* lse = NULL: out is the same, lse's buffer is not touched */
    fwd_case cases[6];
    test_rng r = rng_make(24);
    for (int i = 0; i < 6; i++) {
        cases[i] = random_case(&r, 60, 3e5);
        cases[i].lse_null = 1;
        cases[i].strided = i % 2;
    }
    run_cases(cases, 6);
}
END_TEST

START_TEST(softcap_and_scale)
{
    fwd_case cases[12];
    test_rng r = rng_make(25);
    static const float softcaps[] = {0.0f, 0.25f, 1.5f, 30.0f};
    for (int i = 0; i < 12; i++) {
        cases[i] = plain_case(1, 41, 41, 4, 2, 64, rng_u64(&r));
        cases[i].softcap = softcaps[i % 4];
        cases[i].scale = (i / 4 == 0) ? 0.0f : (i / 4 == 1) ? 0.05f : 0.25f;
        cases[i].causal = i % 2;
        make_bias(&r, &cases[i]);
    }
    run_cases(cases, 12);
}
END_TEST

START_TEST(same_sparsity_shared_between_calls)
{
    /* one object, built once, reused for many calls and contexts: results are unchanged */
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    test_rng r = rng_make(26);
    fwd_case c = plain_case(2, 64, 64, 4, 2, 32, rng_u64(&r));
    c.causal = 1;
    make_bias(&r, &c);
    make_build(&r, &c, DMA_MASK_TOPK);
    c.window = 7;
    fwd_data f;
    fwd_data_make(&c, &f);
    dma_sparsity *sp = make_sparsity(&c, &f, &ctxs[0]);
    dma_attn_params ap = {.causal = 1};
    for (int rep = 0; rep < 3; rep++) {
        for (int n = 0; n < nctx; n++) {
            fill_sentinel(f.outbuf, f.out_bytes);
            fill_sentinel(f.lsebuf, f.lse_bytes);
            ck_assert_int_eq(dma_forward(ctxs[n].ctx, &f.tq, &f.tk, &f.tv, &f.tbias, sp, &ap,
                                         &f.tout, &f.tlse),
                             DMA_OK);
            check_against_reference(&c, &f, &ctxs[n]);
        }
    }
    dma_sparsity_destroy(sp);
    fwd_data_free(&f);
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

static Suite *forward_suite(void)
{
    Suite *s = suite_create("forward");
    TCase *tc = tcase_create("forward");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, random_small);
    tcase_add_test(tc, random_medium);
    tcase_add_test(tc, every_head_dim);
    tcase_add_test(tc, large);
    tcase_add_test(tc, paired_tiles);
    tcase_add_test(tc, chunk_edges);
    tcase_add_test(tc, decode);
    tcase_add_test(tc, lq_differs_from_lk);
    tcase_add_test(tc, sparsity_heads_and_batches);
    tcase_add_test(tc, block_smoothing);
    tcase_add_test(tc, strided_views);
    tcase_add_test(tc, empty_rows);
    tcase_add_test(tc, bias_with_neg_inf);
    tcase_add_test(tc, zero_lengths);
    tcase_add_test(tc, params_null_is_default);
    tcase_add_test(tc, lse_optional);
    tcase_add_test(tc, softcap_and_scale);
    tcase_add_test(tc, same_sparsity_shared_between_calls);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(forward_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

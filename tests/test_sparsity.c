/*
 * test_sparsity.c - the mask generators of dma_sparsity_build against the brute-force masks of
 * reference.c, read back through dma_sparsity_to_dense, with dma_sparsity_nnz and
 * dma_sparsity_shape (dma_sparsity_from_mask: test_from_mask.c). Every case runs on every
 * context of test_contexts_create() (each supported ISA, threads 1 and 2).
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "reference.h"

/* ------------------------------------------------------------------------------------------ */
/* One builder case                                                                           */
/* ------------------------------------------------------------------------------------------ */

typedef enum bias_values {
    VALS_UNIFORM,  /* uniform in [-2, 2): ties are unlikely */
    VALS_SMALLINT, /* integers in {-1, 0, 1, 2}: many ties */
    VALS_NEGINF    /* small integers with about 20% -inf */
} bias_values;

typedef struct build_case {
    dma_mask_kind kind;
    int causal;
    int64_t window, block_size;
    int64_t B, H, Lq, Lk;
    int has_bias;          /* 0: bias NULL (only for WINDOW and DENSE) */
    int64_t Bb, Hb, Lb;    /* bias shape (Bb, Hb, Lb, Lk) */
    bias_values vals;
    int64_t Bp;            /* key padding (Bp, Lk); 0: no padding mask */
    int stride0;           /* pass broadcast dims as full-size dims with stride 0 */
    uint64_t seed;
} build_case;

static const char *kind_name(dma_mask_kind kind)
{
    switch (kind) {
    case DMA_MASK_TOPK: return "topk";
    case DMA_MASK_RELU: return "relu";
    case DMA_MASK_WINDOW: return "window";
    case DMA_MASK_DENSE: return "dense";
    }
    return "?";
}

static const char *describe(const build_case *c)
{
    static char buf[512];
    snprintf(buf, sizeof buf,
             "{kind=%s causal=%d window=%lld block=%lld B=%lld H=%lld Lq=%lld Lk=%lld "
             "bias=%s(%lld,%lld,%lld) vals=%d Bp=%lld stride0=%d seed=%llu}",
             kind_name(c->kind), c->causal, (long long)c->window, (long long)c->block_size,
             (long long)c->B, (long long)c->H, (long long)c->Lq, (long long)c->Lk,
             c->has_bias ? "yes" : "none", (long long)c->Bb, (long long)c->Hb, (long long)c->Lb,
             (int)c->vals, (long long)c->Bp, c->stride0, (unsigned long long)c->seed);
    return buf;
}

static float draw_bias(test_rng *r, bias_values vals)
{
    switch (vals) {
    case VALS_UNIFORM:
        return rng_float(r, -2.0f, 2.0f);
    case VALS_SMALLINT:
        return (float)rng_int(r, -1, 2);
    case VALS_NEGINF:
        return rng_bernoulli(r, 0.2) ? -INFINITY : (float)rng_int(r, -1, 2);
    }
    return 0.0f;
}

/* Padding: a random tail of missing keys per batch plus scattered holes. Nonzero values vary
 * (1, 2, 255) because "anything else = true". */
static void draw_padding(test_rng *r, uint8_t *pad, int64_t Bp, int64_t Lk)
{
    static const uint8_t truthy[] = {1, 2, 255};
    for (int64_t b = 0; b < Bp; b++) {
        int64_t tail = Lk > 0 ? rng_int(r, 0, Lk / 3) : 0;
        for (int64_t j = 0; j < Lk; j++) {
            int present = j < Lk - tail && !rng_bernoulli(r, 0.1);
            pad[b * Lk + j] = present ? truthy[rng_int(r, 0, 2)] : 0;
        }
    }
}

static void check_build_case(const build_case *c, const test_ctx *ctxs, int nctx)
{
    test_rng r = rng_make(c->seed);
    const int64_t nbias = c->has_bias ? c->Bb * c->Hb * c->Lb * c->Lk : 0;
    const int64_t ncells = c->B * c->H * c->Lq * c->Lk;
    float *bias = test_malloc((size_t)nbias * sizeof *bias);
    uint8_t *pad = test_malloc((size_t)(c->Bp * c->Lk));
    uint8_t *expect = test_malloc((size_t)ncells);
    uint8_t *got = test_malloc((size_t)ncells);

    for (int64_t x = 0; x < nbias; x++)
        bias[x] = draw_bias(&r, c->vals);
    draw_padding(&r, pad, c->Bp, c->Lk);

    ref_mask_args ra = {
        .kind = c->kind, .causal = c->causal, .window = c->window, .block_size = c->block_size,
        .B = c->B, .H = c->H, .Lq = c->Lq, .Lk = c->Lk,
        .bias = c->has_bias ? bias : NULL, .Bb = c->Bb, .Hb = c->Hb, .Lb = c->Lb,
        .padding = c->Bp ? pad : NULL, .Bp = c->Bp,
    };
    ref_mask(&ra, expect);
    const int64_t expect_nnz = ref_popcount(expect, ncells);

    dma_tensor tb = dma_tensor_4d(bias, DMA_F32, c->Bb, c->Hb, c->Lb, c->Lk);
    dma_tensor tp = dma_tensor_2d(pad, DMA_BOOL, c->Bp, c->Lk);
    if (c->stride0) {
        /* the same data seen as (B, H, Lq, Lk) and (B, Lk) with stride 0 on broadcast dims */
        tb.shape[0] = c->B;
        tb.shape[1] = c->H;
        tb.shape[2] = c->Lq;
        if (c->Bb == 1) tb.stride[0] = 0;
        if (c->Hb == 1) tb.stride[1] = 0;
        if (c->Lb == 1) tb.stride[2] = 0;
        tp.shape[0] = c->B;
        if (c->Bp == 1) tp.stride[0] = 0;
    }

    dma_mask_params mp;
    memset(&mp, 0, sizeof mp);
    mp.kind = c->kind;
    mp.causal = c->causal;
    mp.window = c->window;
    mp.block_size = c->block_size;

    for (int n = 0; n < nctx; n++) {
        dma_sparsity *sp = NULL;
        dma_status st = dma_sparsity_build(ctxs[n].ctx, &mp, c->B, c->H, c->Lq, c->Lk,
                                           c->has_bias ? &tb : NULL, c->Bp ? &tp : NULL, &sp);
        ck_assert_msg(st == DMA_OK && sp != NULL, "%s/%d: build failed: %s (%s) %s",
                      dma_isa_name(ctxs[n].isa), ctxs[n].threads, dma_status_string(st),
                      dma_context_last_error(ctxs[n].ctx), describe(c));

        int64_t sB = -1, sH = -1, sLq = -1, sLk = -1;
        dma_sparsity_shape(sp, &sB, &sH, &sLq, &sLk);
        ck_assert_msg(sB == c->B && sH == c->H && sLq == c->Lq && sLk == c->Lk,
                      "shape (%lld,%lld,%lld,%lld) %s", (long long)sB, (long long)sH,
                      (long long)sLq, (long long)sLk, describe(c));
        dma_sparsity_shape(sp, NULL, NULL, NULL, NULL); /* every output may be NULL */

        memset(got, 0x77, (size_t)ncells);
        st = dma_sparsity_to_dense(sp, got, (size_t)ncells);
        ck_assert_msg(st == DMA_OK, "to_dense: %s %s", dma_status_string(st), describe(c));
        for (int64_t x = 0; x < ncells; x++) {
            if (got[x] != expect[x]) {
                int64_t j = x % c->Lk, i = (x / c->Lk) % c->Lq;
                int64_t h = (x / (c->Lk * c->Lq)) % c->H, b = x / (c->Lk * c->Lq * c->H);
                ck_abort_msg("%s/%d: mask differs at b=%lld h=%lld i=%lld j=%lld: got %u, "
                             "expected %u %s",
                             dma_isa_name(ctxs[n].isa), ctxs[n].threads, (long long)b,
                             (long long)h, (long long)i, (long long)j, got[x], expect[x],
                             describe(c));
            }
        }
        int64_t nnz = dma_sparsity_nnz(sp);
        ck_assert_msg(nnz == expect_nnz, "nnz %lld, expected %lld %s", (long long)nnz,
                      (long long)expect_nnz, describe(c));
        dma_sparsity_destroy(sp);
    }
    free(bias);
    free(pad);
    free(expect);
    free(got);
}

/* A case with the given kind and lengths; the other fields get plain defaults. */
static build_case base_case(dma_mask_kind kind, int causal, int64_t Lq, int64_t Lk,
                            int64_t window, uint64_t seed)
{
    build_case c;
    memset(&c, 0, sizeof c);
    c.kind = kind;
    c.causal = causal;
    c.window = window;
    c.B = 1;
    c.H = 1;
    c.Lq = Lq;
    c.Lk = Lk;
    c.has_bias = 1;
    c.Bb = 1;
    c.Hb = 1;
    c.Lb = 1;
    c.vals = VALS_UNIFORM;
    c.seed = seed;
    return c;
}

/* Lengths that cover square, Lq < Lk, Lq > Lk, decode (Lq = 1) and a single key (Lk = 1). */
static const int64_t LENGTHS[][2] = {{1, 1},   {1, 40},  {40, 1},   {17, 17},  {50, 50},
                                     {33, 97}, {97, 33}, {64, 200}, {300, 300}};
#define N_LENGTHS ((int)(sizeof LENGTHS / sizeof LENGTHS[0]))

/* The window values of the brief: 0, 1, 7, 64, Lk and more than Lk. */
static int64_t window_value(int w, int64_t Lk)
{
    static const int64_t fixed[] = {0, 1, 7, 64};
    if (w < 4)
        return fixed[w];
    return w == 4 ? Lk : Lk + 9;
}
#define N_WINDOWS 6

/* Runs every length x window combination of one configuration. */
static void sweep(dma_mask_kind kind, int causal, int64_t B, int64_t H, int64_t Bb, int64_t Hb,
                  int per_row, bias_values vals, int64_t Bp, int64_t block_size, uint64_t seed)
{
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    for (int l = 0; l < N_LENGTHS; l++) {
        for (int w = 0; w < N_WINDOWS; w++) {
            build_case c = base_case(kind, causal, LENGTHS[l][0], LENGTHS[l][1],
                                     window_value(w, LENGTHS[l][1]), seed + 1000u * l + w);
            c.B = B;
            c.H = H;
            c.Bb = Bb;
            c.Hb = Hb;
            c.Lb = per_row ? c.Lq : 1;
            c.vals = vals;
            c.Bp = Bp;
            c.block_size = block_size;
            check_build_case(&c, ctxs, nctx);
            if (kind == DMA_MASK_RELU || kind == DMA_MASK_DENSE)
                break; /* the window does not matter */
        }
    }
    test_contexts_destroy(ctxs, nctx);
}

/* ------------------------------------------------------------------------------------------ */
/* dma_sparsity_build                                                                         */
/* ------------------------------------------------------------------------------------------ */

START_TEST(topk_causal_per_key)
{
    sweep(DMA_MASK_TOPK, 1, 1, 1, 1, 1, 0, VALS_UNIFORM, 0, 0, 101);
    sweep(DMA_MASK_TOPK, 1, 2, 3, 2, 3, 0, VALS_UNIFORM, 0, 0, 102);
}
END_TEST

START_TEST(topk_noncausal_per_key)
{
    sweep(DMA_MASK_TOPK, 0, 1, 1, 1, 1, 0, VALS_UNIFORM, 0, 0, 201);
    sweep(DMA_MASK_TOPK, 0, 2, 2, 2, 2, 0, VALS_UNIFORM, 0, 0, 202);
}
END_TEST

START_TEST(topk_per_row)
{
    sweep(DMA_MASK_TOPK, 1, 1, 2, 1, 2, 1, VALS_UNIFORM, 0, 0, 301);
    sweep(DMA_MASK_TOPK, 0, 2, 1, 2, 1, 1, VALS_UNIFORM, 0, 0, 302);
}
END_TEST

START_TEST(topk_broadcast_bias)
{
    /* Bb = 1 with B = 2, Hb = 1 with H = 3, both, per key and per row */
    sweep(DMA_MASK_TOPK, 1, 2, 3, 1, 3, 0, VALS_UNIFORM, 0, 0, 401);
    sweep(DMA_MASK_TOPK, 1, 2, 3, 2, 1, 0, VALS_UNIFORM, 0, 0, 402);
    sweep(DMA_MASK_TOPK, 0, 2, 3, 1, 1, 1, VALS_UNIFORM, 0, 0, 403);
}
END_TEST

START_TEST(topk_padding)
{
    sweep(DMA_MASK_TOPK, 1, 2, 2, 2, 2, 0, VALS_UNIFORM, 2, 0, 501);
    sweep(DMA_MASK_TOPK, 1, 2, 2, 2, 2, 0, VALS_UNIFORM, 1, 0, 502);
    sweep(DMA_MASK_TOPK, 0, 2, 1, 2, 1, 1, VALS_UNIFORM, 2, 0, 503);
}
END_TEST

START_TEST(topk_neg_inf)
{
    sweep(DMA_MASK_TOPK, 1, 1, 2, 1, 2, 0, VALS_NEGINF, 0, 0, 601);
    sweep(DMA_MASK_TOPK, 0, 1, 2, 1, 2, 1, VALS_NEGINF, 1, 0, 602);
}
END_TEST

START_TEST(topk_all_neg_inf)
{
    /* every bias -inf: nothing is ever kept, whatever the window */
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    dma_tensor tb;
    float bias[23];
    for (int j = 0; j < 23; j++)
        bias[j] = -INFINITY;
    tb = dma_tensor_4d(bias, DMA_F32, 1, 1, 1, 23);
    for (int causal = 0; causal <= 1; causal++) {
        for (int n = 0; n < nctx; n++) {
            dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = causal, .window = 5};
            dma_sparsity *sp = NULL;
            ck_assert_int_eq(dma_sparsity_build(ctxs[n].ctx, &mp, 1, 1, 23, 23, &tb, NULL, &sp),
                             DMA_OK);
            ck_assert_int_eq(dma_sparsity_nnz(sp), 0);
            dma_sparsity_destroy(sp);
        }
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(topk_ties)
{
    sweep(DMA_MASK_TOPK, 1, 1, 2, 1, 2, 0, VALS_SMALLINT, 0, 0, 701);
    sweep(DMA_MASK_TOPK, 0, 1, 2, 1, 2, 0, VALS_SMALLINT, 0, 0, 702);
    sweep(DMA_MASK_TOPK, 1, 2, 1, 2, 1, 1, VALS_SMALLINT, 2, 0, 703);
}
END_TEST

START_TEST(topk_all_equal)
{
    /* all biases equal: the earliest visible keys win */
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    enum { L = 30, W = 4 };
    float bias[L];
    uint8_t dense[L * L];
    for (int j = 0; j < L; j++)
        bias[j] = 0.5f;
    dma_tensor tb = dma_tensor_4d(bias, DMA_F32, 1, 1, 1, L);
    for (int causal = 0; causal <= 1; causal++) {
        for (int n = 0; n < nctx; n++) {
            dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = causal, .window = W};
            dma_sparsity *sp = NULL;
            ck_assert_int_eq(dma_sparsity_build(ctxs[n].ctx, &mp, 1, 1, L, L, &tb, NULL, &sp),
                             DMA_OK);
            ck_assert_int_eq(dma_sparsity_to_dense(sp, dense, sizeof dense), DMA_OK);
            for (int i = 0; i < L; i++)
                for (int j = 0; j < L; j++)
                    REQUIRE(dense[i * L + j] == (j < W && (!causal || j <= i)),
                                  "causal=%d row %d key %d: %u", causal, i, j, dense[i * L + j]);
            dma_sparsity_destroy(sp);
        }
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(relu)
{
    sweep(DMA_MASK_RELU, 1, 1, 2, 1, 2, 0, VALS_UNIFORM, 0, 0, 801);
    sweep(DMA_MASK_RELU, 0, 2, 2, 2, 1, 0, VALS_SMALLINT, 0, 0, 802);
    sweep(DMA_MASK_RELU, 1, 2, 1, 1, 1, 1, VALS_NEGINF, 2, 0, 803);
    sweep(DMA_MASK_RELU, 0, 1, 3, 1, 3, 1, VALS_UNIFORM, 1, 0, 804);
}
END_TEST

START_TEST(window)
{
    /* the sliding window ignores `causal` and the bias (which may be NULL) */
    sweep(DMA_MASK_WINDOW, 1, 1, 1, 1, 1, 0, VALS_UNIFORM, 0, 0, 901);
    sweep(DMA_MASK_WINDOW, 0, 2, 2, 2, 2, 1, VALS_UNIFORM, 0, 0, 902);
    sweep(DMA_MASK_WINDOW, 1, 2, 1, 1, 1, 0, VALS_UNIFORM, 2, 0, 903);
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    for (int l = 0; l < N_LENGTHS; l++) {
        for (int w = 0; w < N_WINDOWS; w++) {
            for (int causal = 0; causal <= 1; causal++) {
                build_case c = base_case(DMA_MASK_WINDOW, causal, LENGTHS[l][0], LENGTHS[l][1],
                                         window_value(w, LENGTHS[l][1]), 950u + l);
                c.has_bias = 0;
                c.Bp = (l + w) % 2; /* with and without a padding mask */
                check_build_case(&c, ctxs, nctx);
            }
        }
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(dense)
{
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    for (int l = 0; l < N_LENGTHS; l++) {
        for (int causal = 0; causal <= 1; causal++) {
            for (int64_t Bp = 0; Bp <= 2; Bp++) {
                build_case c = base_case(DMA_MASK_DENSE, causal, LENGTHS[l][0], LENGTHS[l][1], 0,
                                         1000u + l);
                c.B = 2;
                c.H = 2;
                c.has_bias = (l % 2 == 0); /* ignored either way */
                c.Bp = Bp;
                check_build_case(&c, ctxs, nctx);
            }
        }
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(block_smoothing)
{
    static const dma_mask_kind kinds[] = {DMA_MASK_TOPK, DMA_MASK_RELU, DMA_MASK_WINDOW,
                                          DMA_MASK_DENSE};
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    test_rng r = rng_make(1100);
    int turn = 0;
    for (int kd = 0; kd < 4; kd++) {
        for (int l = 0; l < N_LENGTHS; l++) {
            const int64_t Lk = LENGTHS[l][1];
            const int64_t blocks[] = {1, 2, 3, 4, 16, Lk, Lk + 5};
            for (int causal = 0; causal <= 1; causal++) {
                for (int k = 0; k < 2; k++) { /* two block sizes per case, taking turns */
                    const int bi = turn++ % 7;
                    build_case c = base_case(kinds[kd], causal, LENGTHS[l][0], Lk,
                                             window_value((int)rng_int(&r, 1, 5), Lk),
                                             rng_u64(&r));
                    c.block_size = blocks[bi];
                    c.B = 2;
                    c.Bb = rng_int(&r, 1, 2);
                    c.Lb = rng_bernoulli(&r, 0.3) ? c.Lq : 1;
                    c.vals = (bias_values)rng_int(&r, 0, 2);
                    c.Bp = rng_int(&r, 0, 2);
                    check_build_case(&c, ctxs, nctx);
                }
            }
        }
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(empty_lengths)
{
    /* Lq = 0 and/or Lk = 0: a valid, empty object */
    static const int64_t lens[][2] = {{0, 0}, {0, 7}, {7, 0}};
    static const dma_mask_kind kinds[] = {DMA_MASK_TOPK, DMA_MASK_RELU, DMA_MASK_WINDOW,
                                          DMA_MASK_DENSE};
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    for (int l = 0; l < 3; l++) {
        for (int kd = 0; kd < 4; kd++) {
            for (int causal = 0; causal <= 1; causal++) {
                build_case c = base_case(kinds[kd], causal, lens[l][0], lens[l][1], 3, 1200u + l);
                c.B = 2;
                c.H = 3;
                c.Bp = 1;
                check_build_case(&c, ctxs, nctx);
            }
        }
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(stride0_broadcast)
{
    /* bias given as (B, H, Lq, Lk) with stride 0 over the broadcast dims, padding as (B, Lk)
     * with stride 0 over the batch: the same selection as the compact shapes */
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    test_rng r = rng_make(1300);
    for (int t = 0; t < 40; t++) {
        build_case c = base_case((dma_mask_kind)rng_int(&r, 0, 1), (int)rng_int(&r, 0, 1),
                                 rng_int(&r, 1, 90), rng_int(&r, 1, 90), rng_int(&r, 0, 20),
                                 rng_u64(&r));
        c.B = 2;
        c.H = 3;
        c.Bb = rng_int(&r, 0, 1) ? 2 : 1;
        c.Hb = rng_int(&r, 0, 1) ? 3 : 1;
        c.Lb = rng_bernoulli(&r, 0.3) ? c.Lq : 1;
        c.vals = (bias_values)rng_int(&r, 0, 2);
        c.Bp = rng_int(&r, 0, 1);
        c.stride0 = 1;
        check_build_case(&c, ctxs, nctx);
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

START_TEST(random_builds)
{
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    test_rng r = rng_make(1400);
    static const int64_t windows[] = {0, 1, 2, 7, 16, 64, 1000};
    static const int64_t blocks[] = {0, 0, 0, 1, 2, 4, 5, 32};
    for (int t = 0; t < 150; t++) {
        build_case c = base_case((dma_mask_kind)rng_int(&r, 0, 3), (int)rng_int(&r, 0, 1),
                                 rng_int(&r, 1, 130), rng_int(&r, 1, 130),
                                 rng_pick(&r, windows, 7), rng_u64(&r));
        c.B = rng_int(&r, 1, 2);
        c.H = rng_int(&r, 1, 3);
        c.Bb = rng_int(&r, 0, 1) ? c.B : 1;
        c.Hb = rng_int(&r, 0, 1) ? c.H : 1;
        c.Lb = rng_bernoulli(&r, 0.3) ? c.Lq : 1;
        c.vals = (bias_values)rng_int(&r, 0, 2);
        const int64_t paddings[] = {0, 1, c.B};
        c.Bp = rng_pick(&r, paddings, 3);
        c.block_size = rng_pick(&r, blocks, 8);
        c.stride0 = rng_bernoulli(&r, 0.2);
        check_build_case(&c, ctxs, nctx);
    }
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

/* A top-k whose window covers every key, with finite biases and no padding, selects every
 * visible key: its object is the dense one (ranges, no bitmasks: the same bytes as a DENSE
 * build). One -inf key or one padded key keeps the top-k object. Selections match the
 * reference either way. */
START_TEST(topk_full_window_is_dense)
{
    dma_context *ctx;
    ck_assert_int_eq(dma_context_create(NULL, &ctx), DMA_OK);
    const int64_t shapes[][2] = {{70, 70}, {40, 130}, {130, 40}, {1, 200}, {257, 257}};
    test_rng r = rng_make(77);
    for (size_t n = 0; n < sizeof shapes / sizeof shapes[0]; n++)
        for (int causal = 0; causal < 2; causal++)
            for (int per_row = 0; per_row < 2; per_row++)
                for (int spoil = 0; spoil < 3; spoil++) { /* none, a -inf key, a padded key */
                    const int64_t B = 2, H = 2, Lq = shapes[n][0], Lk = shapes[n][1];
                    const int64_t Lb = per_row ? Lq : 1, nb = B * H * Lb * Lk;
                    float *bias = test_malloc((size_t)nb * sizeof *bias);
                    uint8_t *pad = test_malloc((size_t)(B * Lk));
                    for (int64_t x = 0; x < nb; x++)
                        bias[x] = (float)rng_int(&r, -2, 2); /* ties everywhere */
                    memset(pad, 1, (size_t)(B * Lk));
                    if (spoil == 1)
                        bias[rng_int(&r, 0, (int)nb - 1)] = -INFINITY;
                    if (spoil == 2)
                        pad[rng_int(&r, 0, (int)(B * Lk) - 1)] = 0;
                    const dma_tensor tb = dma_tensor_4d(bias, DMA_F32, B, H, Lb, Lk);
                    const dma_tensor tp = dma_tensor_2d(pad, DMA_BOOL, B, Lk);
                    const dma_mask_params topk = {.kind = DMA_MASK_TOPK, .causal = causal,
                                                  .window = Lk + (int64_t)n};
                    const dma_mask_params dense = {.kind = DMA_MASK_DENSE, .causal = causal};
                    dma_sparsity *sp, *dn;
                    ck_assert_int_eq(dma_sparsity_build(ctx, &topk, B, H, Lq, Lk, &tb, &tp, &sp),
                                     DMA_OK);
                    ck_assert_int_eq(dma_sparsity_build(ctx, &dense, B, H, Lq, Lk, NULL, NULL, &dn),
                                     DMA_OK);
                    const size_t cells = (size_t)(B * H * Lq * Lk);
                    uint8_t *got = test_malloc(cells), *want = test_malloc(cells);
                    ref_mask_args ra = {.kind = DMA_MASK_TOPK, .causal = causal,
                                        .window = topk.window, .B = B, .H = H, .Lq = Lq,
                                        .Lk = Lk, .bias = bias, .Bb = B, .Hb = H, .Lb = Lb,
                                        .padding = pad, .Bp = B};
                    ref_mask(&ra, want);
                    ck_assert_int_eq(dma_sparsity_to_dense(sp, got, cells), DMA_OK);
                    ck_assert_msg(memcmp(got, want, cells) == 0, "Lq %lld Lk %lld causal %d "
                                  "per_row %d spoil %d: selection differs from the reference",
                                  (long long)Lq, (long long)Lk, causal, per_row, spoil);
                    if (spoil == 0)
                        ck_assert_uint_eq(dma_sparsity_bytes(sp), dma_sparsity_bytes(dn));
                    else if (dma_sparsity_nnz(sp) > 0)
                        ck_assert_uint_gt(dma_sparsity_bytes(sp), dma_sparsity_bytes(dn));
                    dma_sparsity_destroy(sp);
                    dma_sparsity_destroy(dn);
                    free(got);
                    free(want);
                    free(bias);
                    free(pad);
                }
    dma_context_destroy(ctx);
}
END_TEST

START_TEST(topk_memory_not_quadratic)
{
    /* causal top-k with a per-key bias over 8192 keys: the object must not hold a dense mask
     * (8192^2 bits = 8 MiB); each row keeps min(window, i + 1) keys */
    enum { L = 8192, W = 8 };
    dma_context *ctx = test_scalar_context();
    float *bias = test_malloc(L * sizeof *bias);
    test_rng r = rng_make(1500);
    for (int j = 0; j < L; j++)
        bias[j] = rng_float(&r, -1.0f, 1.0f);
    dma_tensor tb = dma_tensor_4d(bias, DMA_F32, 1, 1, 1, L);
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = W};
    dma_sparsity *sp = NULL;
    ck_assert_int_eq(dma_sparsity_build(ctx, &mp, 1, 1, L, L, &tb, NULL, &sp), DMA_OK);
    int64_t expect = 0;
    for (int64_t i = 0; i < L; i++)
        expect += i + 1 < W ? i + 1 : W;
    ck_assert_int_eq(dma_sparsity_nnz(sp), expect);
    size_t bytes = dma_sparsity_bytes(sp);
    ck_assert_msg(bytes > 0 && bytes < (size_t)L * L / 16, "dma_sparsity_bytes = %zu", bytes);
    dma_sparsity_destroy(sp);
    free(bias);
    dma_context_destroy(ctx);
}
END_TEST

static Suite *sparsity_suite(void)
{
    Suite *s = suite_create("sparsity");
    TCase *tc = tcase_create("build");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, topk_causal_per_key);
    tcase_add_test(tc, topk_noncausal_per_key);
    tcase_add_test(tc, topk_per_row);
    tcase_add_test(tc, topk_broadcast_bias);
    tcase_add_test(tc, topk_padding);
    tcase_add_test(tc, topk_neg_inf);
    tcase_add_test(tc, topk_all_neg_inf);
    tcase_add_test(tc, topk_ties);
    tcase_add_test(tc, topk_all_equal);
    tcase_add_test(tc, relu);
    tcase_add_test(tc, window);
    tcase_add_test(tc, dense);
    tcase_add_test(tc, block_smoothing);
    tcase_add_test(tc, empty_lengths);
    tcase_add_test(tc, stride0_broadcast);
    tcase_add_test(tc, random_builds);
    tcase_add_test(tc, topk_memory_not_quadratic);
    tcase_add_test(tc, topk_full_window_is_dense);
    suite_add_tcase(s, tc);

    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(sparsity_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

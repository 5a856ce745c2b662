/*
 * test_sparsity_parallel.c - the causal top-k builder that splits one slab among threads
 * (lib/mask_topk_parallel.c) against the sequential builder (lib/mask_build.c), array by array:
 * tiles, row_lo, row_hi, keys, words and nnz must be identical for every thread count and
 * block size; and dma_sparsity_to_dense of each object against the reference of reference.c.
 *
 * Two ways in: dma_topk_causal_build called directly with small blocks (so that short slabs,
 * every window and many blocks per slab are covered quickly), and dma_sparsity_build with
 * contexts of 1, 2, 3, 4 and 7 threads on slabs long enough for the library to split them.
 * Also dma_sparsity_rebuild through a run of builders and shapes: each object equals a fresh
 * build's, array by array, and each array is reused while large enough.
 * Needs the library's internals (lib/internal.h): linked with the static library.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "internal.h"
#include "mask_topk_parallel.h"
#include "reference.h"
#include "select.h"

static const int THREADS[] = {1, 2, 3, 4, 7};
#define N_THREADS ((int)(sizeof THREADS / sizeof THREADS[0]))

typedef enum bias_values {
    VALS_UNIFORM,  /* uniform in [-2, 2): ties are unlikely */
    VALS_SMALLINT, /* integers in {-1, 0, 1, 2}: many ties */
    VALS_NEGINF    /* small integers with about 20% -inf */
} bias_values;

/* One causal top-k problem: per-key bias (B, H, 1, Lk), optional padding (B, Lk). */
typedef struct tcase_data {
    int64_t B, H, Lq, Lk, window;
    int padded;
    bias_values vals;
    float *bias;
    uint8_t *pad;
    char what[160];
} tcase_data;

static void case_make(tcase_data *c, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                      int64_t window, int padded, bias_values vals, uint64_t seed)
{
    memset(c, 0, sizeof *c);
    c->B = B;
    c->H = H;
    c->Lq = Lq;
    c->Lk = Lk;
    c->window = window;
    c->padded = padded;
    c->vals = vals;
    test_rng r = rng_make(seed);
    c->bias = test_malloc((size_t)(B * H * Lk) * sizeof(float));
    for (int64_t x = 0; x < B * H * Lk; x++) {
        switch (vals) {
        case VALS_UNIFORM: c->bias[x] = rng_float(&r, -2.0f, 2.0f); break;
        case VALS_SMALLINT: c->bias[x] = (float)rng_int(&r, -1, 2); break;
        case VALS_NEGINF:
            c->bias[x] = rng_bernoulli(&r, 0.2) ? -INFINITY : (float)rng_int(&r, -1, 2);
            break;
        }
    }
    /* Padding: a random tail of missing keys per batch plus scattered holes; nonzero values
     * vary because "anything else = true". */
    c->pad = test_malloc((size_t)(B * Lk));
    static const uint8_t truthy[] = {1, 2, 255};
    for (int64_t b = 0; b < B; b++) {
        int64_t tail = padded && Lk > 0 ? rng_int(&r, 0, Lk / 3) : 0;
        for (int64_t j = 0; j < Lk; j++) {
            int present = !padded || (j < Lk - tail && !rng_bernoulli(&r, 0.1));
            c->pad[b * Lk + j] = present ? truthy[rng_int(&r, 0, 2)] : 0;
        }
    }
    snprintf(c->what, sizeof c->what,
             "{B=%lld H=%lld Lq=%lld Lk=%lld window=%lld padded=%d vals=%d seed=%llu}",
             (long long)B, (long long)H, (long long)Lq, (long long)Lk, (long long)window, padded,
             (int)vals, (unsigned long long)seed);
}

static void case_free(tcase_data *c)
{
    free(c->bias);
    free(c->pad);
}

static dma_context *make_ctx(int threads)
{
    dma_context_options o;
    memset(&o, 0, sizeof o);
    o.threads = threads;
    dma_context *ctx = NULL;
    ck_assert_msg(dma_context_create(&o, &ctx) == DMA_OK, "context with %d threads", threads);
    return ctx;
}

/* dma_sparsity_build of the case (causal top-k); asserts success. */
static dma_sparsity *build_public(dma_context *ctx, const tcase_data *c)
{
    dma_tensor tb = dma_tensor_4d(c->bias, DMA_F32, c->B, c->H, 1, c->Lk);
    dma_tensor tp = dma_tensor_2d(c->pad, DMA_BOOL, c->B, c->Lk);
    dma_mask_params mp;
    memset(&mp, 0, sizeof mp);
    mp.kind = DMA_MASK_TOPK;
    mp.causal = 1;
    mp.window = c->window;
    dma_sparsity *sp = NULL;
    dma_status st = dma_sparsity_build(ctx, &mp, c->B, c->H, c->Lq, c->Lk, &tb,
                                       c->padded ? &tp : NULL, &sp);
    ck_assert_msg(st == DMA_OK && sp, "build (%d threads): %s (%s) %s",
                  dma_context_threads(ctx), dma_status_string(st), dma_context_last_error(ctx),
                  c->what);
    return sp;
}

/* The builder called directly on every slab, with `threads` threads, each slab cut into about
 * `threads` segments of at least min_block keys. Returns the status (*out = NULL on failure). */
static dma_status build_split(dma_context *ctx, const tcase_data *c, int threads,
                              int64_t min_block, dma_sparsity **out)
{
    dma_sparsity *sp = NULL;
    dma_status st = dma_sparsity_alloc(ctx, c->B, c->H, c->Lq, c->Lk, NULL, &sp);
    ck_assert_int_eq(st, DMA_OK);
    int64_t nslab = c->B * c->H;
    dma_topk_slab *in = test_calloc((size_t)nslab + 1, sizeof(dma_topk_slab));
    for (int64_t s = 0; s < nslab; s++) {
        int64_t b = s / c->H;
        in[s] = (dma_topk_slab){.bias = c->bias + s * c->Lk,
                                .pad = c->padded ? c->pad + b * c->Lk : NULL,
                                .Lq = c->Lq, .Lk = c->Lk,
                                .window = c->window < c->Lk ? c->window : c->Lk,
                                .tiles = sp->tiles + s * sp->ntiles,
                                .row_lo = sp->row_lo + s * c->Lq, .row_hi = sp->row_hi + s * c->Lq};
    }
    st = dma_topk_causal_build(in, nslab, threads, threads, min_block, sp);
    free(in);
    if (st != DMA_OK) {
        dma_sparsity_destroy(sp);
        sp = NULL;
    }
    *out = sp;
    return st;
}

/* Every internal array of b equals a's. */
static void assert_same(const dma_sparsity *a, const dma_sparsity *b, const char *how,
                        const tcase_data *c)
{
    REQUIRE(a->B == b->B && a->H == b->H && a->Lq == b->Lq && a->Lk == b->Lk &&
                a->ntiles == b->ntiles,
            "%s: shape differs %s", how, c->what);
    REQUIRE(a->nnz == b->nnz, "%s: nnz %lld, expected %lld %s", how, (long long)b->nnz,
            (long long)a->nnz, c->what);
    REQUIRE(a->nkeys == b->nkeys && a->nwords == b->nwords,
            "%s: nkeys %lld nwords %lld, expected %lld and %lld %s", how, (long long)b->nkeys,
            (long long)b->nwords, (long long)a->nkeys, (long long)a->nwords, c->what);
    REQUIRE(!a->vals && !b->vals, "%s: vals set %s", how, c->what);
    int64_t ntile = a->B * a->H * a->ntiles, nrow = a->B * a->H * a->Lq;
    for (int64_t t = 0; t < ntile; t++) {
        const dma_tile *x = &a->tiles[t], *y = &b->tiles[t];
        REQUIRE(x->key_off == y->key_off && x->word_off == y->word_off && x->first == y->first &&
                    x->count == y->count && x->words_per_row == y->words_per_row,
                "%s: tile %lld differs: (%lld %lld %d %d %d) vs (%lld %lld %d %d %d) %s", how,
                (long long)t, (long long)y->key_off, (long long)y->word_off, y->first, y->count,
                y->words_per_row, (long long)x->key_off, (long long)x->word_off, x->first,
                x->count, x->words_per_row, c->what);
    }
    REQUIRE(!memcmp(a->row_lo, b->row_lo, sizeof(int32_t) * (size_t)nrow), "%s: row_lo %s",
            how, c->what);
    REQUIRE(!memcmp(a->row_hi, b->row_hi, sizeof(int32_t) * (size_t)nrow), "%s: row_hi %s",
            how, c->what);
    REQUIRE(!a->nkeys || !memcmp(a->keys, b->keys, sizeof(int32_t) * (size_t)a->nkeys),
            "%s: keys %s", how, c->what);
    REQUIRE(!a->nwords || !memcmp(a->words, b->words, sizeof(uint64_t) * (size_t)a->nwords),
            "%s: words %s", how, c->what);
}

/* The reference selection of the case, (B, H, Lq, Lk) bytes. */
static uint8_t *reference_mask(const tcase_data *c)
{
    size_t n = (size_t)(c->B * c->H * c->Lq * c->Lk);
    uint8_t *m = test_malloc(n);
    ref_mask_args ra = {.kind = DMA_MASK_TOPK, .causal = 1, .window = c->window,
                        .B = c->B, .H = c->H, .Lq = c->Lq, .Lk = c->Lk,
                        .bias = c->bias, .Bb = c->B, .Hb = c->H, .Lb = 1,
                        .padding = c->padded ? c->pad : NULL, .Bp = c->B};
    ref_mask(&ra, m);
    return m;
}

static void assert_dense(const dma_sparsity *sp, const uint8_t *expect, uint8_t *got,
                         const char *how, const tcase_data *c)
{
    size_t n = (size_t)(c->B * c->H * c->Lq * c->Lk);
    memset(got, 0x77, n);
    ck_assert_int_eq(dma_sparsity_to_dense(sp, got, n), DMA_OK);
    for (size_t x = 0; x < n; x++)
        REQUIRE(got[x] == expect[x], "%s: to_dense differs from the reference at %zu (row %lld, "
                "key %lld): %u vs %u %s", how, x, (long long)((x / (size_t)c->Lk) % (size_t)c->Lq),
                (long long)(x % (size_t)c->Lk), got[x], expect[x], c->what);
}

/* ------------------------------------------------------------------------------------------ */

/* Lengths: square, Lq < Lk, Lq > Lk, decode, one key, not multiples of 64. */
static const int64_t LENGTHS[][2] = {{1, 1},   {1, 300},  {64, 64},   {100, 100}, {130, 257},
                                     {257, 130}, {300, 700}, {700, 300}, {513, 513}, {64, 1000},
                                     {0, 90},   {70, 0}};
#define N_LENGTHS ((int)(sizeof LENGTHS / sizeof LENGTHS[0]))

START_TEST(split_direct_matches_sequential)
{
    dma_context *ctx1 = make_ctx(1);
    static const int64_t min_blocks[] = {1, 3, 64};
    test_rng r = rng_make(1601);
    int64_t checked = 0;
    for (int li = 0; li < N_LENGTHS; li++) {
        const int64_t Lq = LENGTHS[li][0], Lk = LENGTHS[li][1];
        const int64_t windows[] = {0, 1, 7, 64, 300, Lk, Lk + 5};
        for (int wi = 0; wi < 7; wi++) {
            tcase_data c;
            int64_t B = rng_int(&r, 1, 2), H = 3 - B;
            case_make(&c, B, H, Lq, Lk, windows[wi], (int)rng_int(&r, 0, 1),
                      (bias_values)rng_int(&r, 0, 2), rng_u64(&r));
            /* One thread, one segment: the sequential builder (what dma_sparsity_build runs per
             * slab, except for a window that covers every key, built as the dense object). */
            dma_sparsity *seq = NULL;
            ck_assert_int_eq(build_split(ctx1, &c, 1, INT64_MAX / 4, &seq), DMA_OK);
            uint8_t *expect = reference_mask(&c);
            uint8_t *got = test_malloc((size_t)(c.B * c.H * c.Lq * c.Lk) + 1);
            assert_dense(seq, expect, got, "sequential", &c);
            for (int ti = 0; ti < N_THREADS; ti++)
                for (int mi = 0; mi < 3; mi++) {
                    char how[64];
                    snprintf(how, sizeof how, "split threads=%d min_block=%lld", THREADS[ti],
                             (long long)min_blocks[mi]);
                    dma_sparsity *par = NULL;
                    dma_status st = build_split(ctx1, &c, THREADS[ti], min_blocks[mi], &par);
                    ck_assert_msg(st == DMA_OK, "%s: %s %s", how, dma_status_string(st), c.what);
                    assert_same(seq, par, how, &c);
                    assert_dense(par, expect, got, how, &c);
                    dma_sparsity_destroy(par);
                    checked++;
                }
            dma_sparsity_destroy(seq);
            free(expect);
            free(got);
            case_free(&c);
        }
    }
    ck_assert_int_eq(checked, N_LENGTHS * 7 * N_THREADS * 3);
    dma_context_destroy(ctx1);
}
END_TEST

/* Long slabs through dma_sparsity_build: every thread count's object is the one-thread one. */
static void check_public(const tcase_data *c, dma_context *const ctxs[], int with_reference)
{
    dma_sparsity *seq = build_public(ctxs[0], c);
    uint8_t *expect = with_reference ? reference_mask(c) : NULL;
    uint8_t *got = with_reference ? test_malloc((size_t)(c->B * c->H * c->Lq * c->Lk)) : NULL;
    if (with_reference)
        assert_dense(seq, expect, got, "threads=1", c);
    for (int ti = 1; ti < N_THREADS; ti++) {
        char how[32];
        snprintf(how, sizeof how, "threads=%d", THREADS[ti]);
        dma_sparsity *par = build_public(ctxs[ti], c);
        assert_same(seq, par, how, c);
        if (with_reference)
            assert_dense(par, expect, got, how, c);
        dma_sparsity_destroy(par);
    }
    dma_sparsity_destroy(seq);
    free(expect);
    free(got);
}

START_TEST(split_public_matches_sequential)
{
    dma_context *ctxs[N_THREADS];
    for (int ti = 0; ti < N_THREADS; ti++)
        ctxs[ti] = make_ctx(THREADS[ti]);
    /* Long enough to split (DMA_TOPK_SPLIT_MIN_KEYS) except where the window is too large;
     * Lq = Lk, Lq < Lk (pieces before the first row), Lq > Lk (rows before the first key). */
    static const struct {
        int64_t B, H, Lq, Lk;
        bias_values vals;
        int padded, with_reference;
    } shapes[] = {
        {1, 1, 4160, 4160, VALS_SMALLINT, 1, 0},
        {1, 2, 1000, 9001, VALS_NEGINF, 1, 1},
        {2, 1, 4500, 4100, VALS_UNIFORM, 0, 0},
        {1, 1, 1, 10000, VALS_SMALLINT, 0, 1},
        {1, 1, 333, 5555, VALS_UNIFORM, 1, 1},
    };
    static const int64_t windows[] = {1, 7, 64, 300, 1024, 20000};
    test_rng r = rng_make(1602);
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int wi = 0; wi < 6; wi++) {
            tcase_data c;
            case_make(&c, shapes[si].B, shapes[si].H, shapes[si].Lq, shapes[si].Lk, windows[wi],
                      shapes[si].padded, shapes[si].vals, rng_u64(&r));
            /* the reference costs O(Lq Lk log Lk): the short-Lq shapes, and one square case */
            int ref = shapes[si].with_reference || (si == 0 && windows[wi] == 64);
            check_public(&c, ctxs, ref);
            case_free(&c);
        }
    for (int ti = 0; ti < N_THREADS; ti++)
        dma_context_destroy(ctxs[ti]);
}
END_TEST

/* A NaN or +inf bias anywhere (also in a later block than the first) fails the build, for
 * every thread count and block size. */
START_TEST(split_bad_bias)
{
    dma_context *ctxs[N_THREADS];
    for (int ti = 0; ti < N_THREADS; ti++)
        ctxs[ti] = make_ctx(THREADS[ti]);
    static const int64_t where[] = {0, 17, 4321, 6999};
    for (int k = 0; k < 4; k++)
        for (int bad = 0; bad < 2; bad++) {
            tcase_data c;
            case_make(&c, 1, 1, k == 1 ? 100 : 7000, 7000, 64, 0, VALS_UNIFORM, 77 + (uint64_t)k);
            c.bias[where[k]] = bad ? INFINITY : NAN;
            dma_tensor tb = dma_tensor_4d(c.bias, DMA_F32, 1, 1, 1, c.Lk);
            dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = 64};
            for (int ti = 0; ti < N_THREADS; ti++) {
                dma_sparsity *sp = NULL;
                dma_status st = dma_sparsity_build(ctxs[ti], &mp, 1, 1, c.Lq, c.Lk, &tb, NULL, &sp);
                ck_assert_msg(st == DMA_ERR_BAD_VALUE && sp == NULL,
                              "threads=%d bad bias at %lld: %s", THREADS[ti],
                              (long long)where[k], dma_status_string(st));
                dma_sparsity *par = NULL;
                st = build_split(ctxs[0], &c, THREADS[ti], 5, &par);
                ck_assert_msg(st == DMA_ERR_BAD_VALUE && par == NULL,
                              "split threads=%d bad bias at %lld: %s", THREADS[ti],
                              (long long)where[k], dma_status_string(st));
            }
            case_free(&c);
        }
    for (int ti = 0; ti < N_THREADS; ti++)
        dma_context_destroy(ctxs[ti]);
}
END_TEST

/* When the split pays: only with fewer slabs than threads, long slabs, small windows. */
START_TEST(split_policy)
{
    ck_assert(!dma_topk_split_pays(2, 2, 8192, 8192, 64));     /* as many slabs as threads */
    ck_assert(dma_topk_split_pays(1, 2, 8192, 8192, 64));
    ck_assert(!dma_topk_split_pays(1, 8, 1000, 1000, 64));     /* short */
    ck_assert(!dma_topk_split_pays(1, 8, 8192, 8192, 4096));   /* window too large */
    ck_assert(dma_topk_split_pays(1, 8, 1, 65536, 64));        /* decode: the prefix splits */
}
END_TEST

/* ---- dma_sparsity_rebuild ---- */

/* One build of the rebuild sequence. */
typedef struct rebuild_step {
    dma_mask_kind kind;
    int64_t B, H, Lq, Lk, window, block_size;
    int per_row; /* bias (B, H, Lq, Lk) instead of (B, H, 1, Lk) */
    int padded;
} rebuild_step;

/* Larger, smaller and equal objects in turn, through every builder: the streaming top-k (split
 * among threads where Lk >= DMA_TOPK_SPLIT_MIN_KEYS), per-row top-k, relu, window, block
 * smoothing, a window that keeps every key (the dense object), no rows. */
static const rebuild_step REBUILD_STEPS[] = {
    {DMA_MASK_TOPK, 2, 2, 700, 700, 64, 0, 0, 0},
    {DMA_MASK_TOPK, 2, 2, 700, 700, 64, 0, 0, 1},
    {DMA_MASK_TOPK, 1, 1, 5000, 5000, 100, 0, 0, 0},
    {DMA_MASK_WINDOW, 1, 1, 300, 300, 32, 0, 0, 0},
    {DMA_MASK_TOPK, 1, 2, 200, 260, 16, 0, 1, 0},
    {DMA_MASK_RELU, 2, 1, 150, 150, 0, 0, 1, 1},
    {DMA_MASK_TOPK, 1, 1, 5000, 5000, 100, 0, 0, 0},
    {DMA_MASK_TOPK, 2, 1, 400, 400, 50, 4, 0, 0},
    {DMA_MASK_TOPK, 1, 1, 90, 90, 90, 0, 0, 0},
    {DMA_MASK_TOPK, 1, 1, 0, 90, 8, 0, 0, 0},
    {DMA_MASK_TOPK, 1, 1, 6000, 6000, 300, 0, 0, 1},
};
#define N_REBUILD_STEPS ((int)(sizeof REBUILD_STEPS / sizeof REBUILD_STEPS[0]))

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

START_TEST(rebuild_matches_build)
{
    static const int threads[] = {1, 3};
    for (int ti = 0; ti < 2; ti++) {
        dma_context *ctx = make_ctx(threads[ti]);
        test_rng r = rng_make(1603);
        dma_sparsity *sp = NULL;
        if (ti == 1) { /* start from an object of dma_sparsity_from_mask */
            uint8_t mask[2 * 40 * 50];
            for (size_t x = 0; x < sizeof mask; x++)
                mask[x] = (uint8_t)rng_bernoulli(&r, 0.4);
            dma_tensor tm = dma_tensor_4d(mask, DMA_BOOL, 1, 2, 40, 50);
            ck_assert_int_eq(dma_sparsity_from_mask(ctx, &tm, &sp), DMA_OK);
        }
        /* Every array's capacity is the largest size asked of it so far: reused, never
         * reallocated for a smaller or equal one. */
        size_t cap_tiles = sp ? sp->cap_tiles : 0, cap_rows = sp ? sp->cap_lo : 0;
        size_t cap_keys = sp ? sp->cap_keys : 0, cap_words = sp ? sp->cap_words : 0;
        for (int k = 0; k < N_REBUILD_STEPS; k++) {
            const rebuild_step *st = &REBUILD_STEPS[k];
            const int64_t Lb = st->per_row ? st->Lq : 1;
            const int64_t nbias = st->B * st->H * Lb * st->Lk;
            float *bias = test_malloc(sizeof(float) * (size_t)(nbias + 1));
            for (int64_t x = 0; x < nbias; x++)
                bias[x] = rng_bernoulli(&r, 0.3) ? (float)rng_int(&r, -1, 1)
                                                 : rng_float(&r, -2.0f, 2.0f);
            uint8_t *pad = test_malloc((size_t)(st->B * st->Lk + 1));
            for (int64_t x = 0; x < st->B * st->Lk; x++)
                pad[x] = (uint8_t)(!st->padded || !rng_bernoulli(&r, 0.2));
            dma_tensor tb = dma_tensor_4d(bias, DMA_F32, st->B, st->H, Lb, st->Lk);
            dma_tensor tp = dma_tensor_2d(pad, DMA_BOOL, st->B, st->Lk);
            dma_mask_params mp = {.kind = st->kind, .causal = 1, .window = st->window,
                                  .block_size = st->block_size};
            const dma_tensor *pp = st->padded ? &tp : NULL;
            tcase_data c;
            memset(&c, 0, sizeof c);
            snprintf(c.what, sizeof c.what, "{step %d, threads %d}", k, threads[ti]);

            dma_sparsity *fresh = NULL;
            ck_assert_int_eq(dma_sparsity_build(ctx, &mp, st->B, st->H, st->Lq, st->Lk, &tb, pp,
                                                &fresh),
                             DMA_OK);
            dma_sparsity *before = sp;
            dma_status s = dma_sparsity_rebuild(ctx, &mp, st->B, st->H, st->Lq, st->Lk, &tb, pp,
                                                &sp);
            ck_assert_msg(s == DMA_OK && sp, "rebuild %s: %s (%s)", c.what, dma_status_string(s),
                          dma_context_last_error(ctx));
            REQUIRE(!before || sp == before, "rebuild %s: a new object", c.what);
            assert_same(fresh, sp, "rebuild", &c);
            ck_assert_uint_eq(dma_sparsity_bytes(sp), dma_sparsity_bytes(fresh));
            const int64_t nslab = st->B * st->H;
            cap_tiles = max_size(cap_tiles,
                                 (size_t)(nslab * fresh->ntiles) * sizeof(dma_tile));
            cap_rows = max_size(cap_rows, (size_t)(nslab * st->Lq) * sizeof(int32_t));
            cap_keys = max_size(cap_keys, (size_t)fresh->nkeys * sizeof(int32_t));
            cap_words = max_size(cap_words, (size_t)fresh->nwords * sizeof(uint64_t));
            REQUIRE(sp->cap_tiles == cap_tiles && sp->cap_lo == cap_rows &&
                        sp->cap_hi == cap_rows && sp->cap_keys == cap_keys &&
                        sp->cap_words == cap_words,
                    "rebuild %s: capacities %zu %zu %zu %zu %zu, expected %zu %zu %zu %zu",
                    c.what, sp->cap_tiles, sp->cap_lo, sp->cap_hi, sp->cap_keys, sp->cap_words,
                    cap_tiles, cap_rows, cap_keys, cap_words);
            dma_sparsity_destroy(fresh);
            free(bias);
            free(pad);
        }
        dma_sparsity_destroy(sp);
        dma_context_destroy(ctx);
    }
}
END_TEST

/* A failed rebuild frees the old object and leaves NULL (no stale or partial object); with
 * *sp NULL a rebuild is a build. Leaks would show under ASan. */
START_TEST(rebuild_errors)
{
    dma_context *ctx = make_ctx(3);
    enum { L = 5000 };
    float *bias = test_malloc(sizeof(float) * L);
    test_rng r = rng_make(1604);
    for (int x = 0; x < L; x++)
        bias[x] = rng_float(&r, -1.0f, 1.0f);
    dma_tensor tb = dma_tensor_4d(bias, DMA_F32, 1, 1, 1, L);
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = 64};
    for (int bad = 0; bad < 5; bad++) {
        dma_sparsity *sp = NULL;
        ck_assert_int_eq(dma_sparsity_rebuild(ctx, &mp, 1, 1, L, L, &tb, NULL, &sp), DMA_OK);
        ck_assert_ptr_nonnull(sp);
        dma_status want = DMA_ERR_BAD_VALUE, got;
        switch (bad) {
        case 0: /* a NaN found by the split builder's step 1, late in the slab */
            bias[4321] = NAN;
            got = dma_sparsity_rebuild(ctx, &mp, 1, 1, L, L, &tb, NULL, &sp);
            bias[4321] = 0.5f;
            break;
        case 1: /* +inf through the per-row builder */
            bias[17] = INFINITY;
            got = dma_sparsity_rebuild(ctx, &mp, 1, 1, 1, L, &tb, NULL, &sp);
            bias[17] = 0.5f;
            break;
        case 2: /* a bias of the wrong shape */
            want = DMA_ERR_SHAPE;
            got = dma_sparsity_rebuild(ctx, &mp, 1, 1, L, L - 1, &tb, NULL, &sp);
            break;
        case 3:
            want = DMA_ERR_NULL;
            got = dma_sparsity_rebuild(ctx, NULL, 1, 1, L, L, &tb, NULL, &sp);
            break;
        default:
            want = DMA_ERR_WINDOW;
            mp.window = -1;
            got = dma_sparsity_rebuild(ctx, &mp, 1, 1, L, L, &tb, NULL, &sp);
            mp.window = 64;
            break;
        }
        ck_assert_msg(got == want && sp == NULL, "case %d: %s, sp %p", bad,
                      dma_status_string(got), (void *)sp);
        static const char *const says[] = {"bias: NaN or +inf", "bias: NaN or +inf",
                                           "bias: shape (1, 1, 1, 5000) is not",
                                           "sparsity_rebuild: ctx and params are required",
                                           "sparsity_rebuild: window -1"};
        ck_assert_msg(strstr(dma_context_last_error(ctx), says[bad]) != NULL,
                      "case %d: message \"%s\", expected \"%s\"", bad,
                      dma_context_last_error(ctx), says[bad]);
    }
    ck_assert_int_eq(dma_sparsity_rebuild(ctx, &mp, 1, 1, L, L, &tb, NULL, NULL), DMA_ERR_NULL);
    free(bias);
    dma_context_destroy(ctx);
}
END_TEST

static Suite *split_suite(void)
{
    Suite *s = suite_create("sparsity_parallel");
    TCase *tc = tcase_create("split");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, split_policy);
    tcase_add_test(tc, split_direct_matches_sequential);
    tcase_add_test(tc, split_public_matches_sequential);
    tcase_add_test(tc, split_bad_bias);
    suite_add_tcase(s, tc);
    TCase *tr = tcase_create("rebuild");
    tcase_set_timeout(tr, 300);
    tcase_add_test(tr, rebuild_matches_build);
    tcase_add_test(tr, rebuild_errors);
    suite_add_tcase(s, tr);
    return s;
}

int main(void)
{
    return test_run_suite(split_suite());
}

/*
 * test_kvcache.c - the KV cache (dma_kv_cache_*) and the forward over it (dma_kv_forward):
 * the incremental selection against dma_sparsity_build() and the independent reference mask
 * (bitwise, in any chunking), decode and chunked prefill against the double reference, ragged
 * batches, bf16/f16 storage, the page pool, and bad input that must leave the cache as it was.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "reference.h"

/* Store float data as `dt`; returns the buffer to hand the library and rounds `x` in place to
 * what was stored (so the reference sees the same inputs). */
static void *store_as(float *x, int64_t n, dma_dtype dt)
{
    if (dt == DMA_F32)
        return x;
    uint16_t *h = test_malloc(sizeof(uint16_t) * (size_t)n);
    for (int64_t i = 0; i < n; i++) {
        h[i] = dt == DMA_BF16 ? test_to_bf16(x[i]) : test_to_f16(x[i]);
        x[i] = test_from_half(h[i], dt);
    }
    return h;
}

static float load_from(const void *p, int64_t i, dma_dtype dt)
{
    if (dt == DMA_F32)
        return ((const float *)p)[i];
    return test_from_half(((const uint16_t *)p)[i], dt);
}

/* ---- a random sequence: k, v (B, L, Hkv, D) and a per-key bias (B, Hkv, 1, L) ---- */

typedef struct seq {
    int64_t B, L, Hkv, D;
    float *k, *v, *bias;
} seq;

static seq seq_make(test_rng *r, int64_t B, int64_t L, int64_t Hkv, int64_t D, int ties)
{
    seq s = {B, L, Hkv, D, NULL, NULL, NULL};
    int64_t n = B * L * Hkv * D;
    s.k = test_malloc(sizeof(float) * (size_t)n);
    s.v = test_malloc(sizeof(float) * (size_t)n);
    s.bias = test_malloc(sizeof(float) * (size_t)(B * Hkv * L));
    for (int64_t i = 0; i < n; i++) {
        s.k[i] = rng_float(r, -1, 1);
        s.v[i] = rng_float(r, -1, 1);
    }
    for (int64_t i = 0; i < B * Hkv * L; i++) {
        /* Few distinct values make ties common; some keys are -inf (never selected). */
        s.bias[i] = ties ? (float)rng_int(r, 0, 5) * 0.5f : rng_float(r, -2, 2);
        if (rng_bernoulli(r, 0.05))
            s.bias[i] = -INFINITY;
    }
    return s;
}

static void seq_free(seq *s)
{
    free(s->k);
    free(s->v);
    free(s->bias);
}

/* Views of tokens [t0, t0 + n) of a sequence (strided into the whole arrays). */
static dma_tensor kv_view(const float *x, const seq *s, int64_t t0, int64_t n, dma_dtype dt,
                          const void *stored)
{
    size_t esz = dt == DMA_F32 ? 4 : 2;
    dma_tensor t = dma_tensor_4d((char *)(dt == DMA_F32 ? (const void *)x : stored) +
                                     (size_t)(t0 * s->Hkv * s->D) * esz,
                                 dt, s->B, n, s->Hkv, s->D);
    t.stride[0] = s->L * s->Hkv * s->D;
    return t;
}

static dma_tensor bias_view(const seq *s, int64_t t0, int64_t n)
{
    dma_tensor t = dma_tensor_4d(s->bias + t0, DMA_F32, s->B, s->Hkv, 1, n);
    t.stride[0] = s->Hkv * s->L;
    t.stride[1] = s->L;
    t.stride[2] = s->L;
    return t;
}

/* The whole-sequence selection by dma_sparsity_build (B, Hkv, L, L) as bytes. */
static uint8_t *whole_selection(dma_context *ctx, const seq *s, int64_t window)
{
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = window};
    dma_tensor tb = dma_tensor_4d(s->bias, DMA_F32, s->B, s->Hkv, 1, s->L);
    dma_sparsity *sp;
    ck_assert_int_eq(dma_sparsity_build(ctx, &mp, s->B, s->Hkv, s->L, s->L, &tb, NULL, &sp),
                     DMA_OK);
    size_t n = (size_t)(s->B * s->Hkv * s->L * s->L);
    uint8_t *m = test_malloc(n);
    ck_assert_int_eq(dma_sparsity_to_dense(sp, m, n), DMA_OK);
    dma_sparsity_destroy(sp);
    /* ... which must be the independent reference's. */
    uint8_t *ref = test_malloc(n);
    ref_mask_args ra = {.kind = DMA_MASK_TOPK, .causal = 1, .window = window, .B = s->B,
                        .H = s->Hkv, .Lq = s->L, .Lk = s->L, .bias = s->bias, .Bb = s->B,
                        .Hb = s->Hkv, .Lb = 1};
    ref_mask(&ra, ref);
    ck_assert_msg(memcmp(m, ref, n) == 0, "dma_sparsity_build differs from the reference");
    free(ref);
    return m;
}

/* Compare the cache's selection of its newest `rows` rows with the whole selection. */
static void check_rows(dma_context *ctx, const dma_kv_cache *c, const seq *s,
                       const uint8_t *whole, int64_t len, int64_t rows, const char *what)
{
    dma_sparsity *sp;
    ck_assert_int_eq(dma_kv_cache_sparsity(ctx, c, rows, &sp), DMA_OK);
    int64_t B, H, Lq, Lk;
    dma_sparsity_shape(sp, &B, &H, &Lq, &Lk);
    ck_assert(B == s->B && H == s->Hkv && Lq == rows && Lk == len);
    size_t n = (size_t)(B * H * rows * len);
    uint8_t *got = test_malloc(n ? n : 1);
    ck_assert_int_eq(dma_sparsity_to_dense(sp, got, n), DMA_OK);
    int64_t nnz = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < rows; i++) {
                const int64_t p = len - rows + i;
                const uint8_t *want = whole + ((b * H + h) * s->L + p) * s->L;
                const uint8_t *row = got + ((b * H + h) * rows + i) * len;
                REQUIRE(memcmp(row, want, (size_t)len) == 0,
                        "%s: row %lld of entry %lld head %lld differs", what, (long long)p,
                        (long long)b, (long long)h);
                for (int64_t j = len; j < s->L; j++)
                    REQUIRE(!want[j], "%s: the whole selection sees the future", what);
                nnz += ref_popcount(want, len);
            }
    ck_assert_int_eq(dma_sparsity_nnz(sp), nnz);
    free(got);
    /* A cache's object (it carries each key's bias) rebuilds as any other: a causal window of
     * 3 over the same rows, whose row at position p keeps min(3, p + 1) keys. */
    dma_mask_params win = {.kind = DMA_MASK_WINDOW, .causal = 1, .window = 3};
    ck_assert_int_eq(dma_sparsity_rebuild(ctx, &win, 1, 1, rows, len, NULL, NULL, &sp), DMA_OK);
    int64_t win_nnz = 0;
    for (int64_t i = 0; i < rows; i++)
        win_nnz += len - rows + i + 1 < 3 ? len - rows + i + 1 : 3;
    ck_assert_int_eq(dma_sparsity_nnz(sp), win_nnz);
    dma_sparsity_destroy(sp);
    /* The newest row through dma_kv_cache_selection. */
    int32_t keys[600];
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            int64_t nk = -1;
            ck_assert_int_eq(dma_kv_cache_selection(c, b, h, keys, 600, &nk), DMA_OK);
            const uint8_t *want = whole + ((b * H + h) * s->L + len - 1) * s->L;
            ck_assert_int_eq(nk, ref_popcount(want, len));
            for (int64_t x = 0; x < nk; x++) {
                REQUIRE(want[keys[x]], "%s: selection key %d not selected", what, keys[x]);
                REQUIRE(x == 0 || keys[x] > keys[x - 1], "%s: selection not sorted", what);
            }
        }
}

static dma_kv_cache *make_cache(dma_context *ctx, const seq *s, int64_t window, dma_dtype dt,
                                int64_t page_len)
{
    dma_kv_cache_params p = {.batch = s->B, .kv_heads = s->Hkv, .head_dim = s->D, .dtype = dt,
                             .max_len = s->L, .window = window, .page_len = page_len};
    dma_kv_cache *c = NULL;
    ck_assert_int_eq(dma_kv_cache_create(ctx, &p, &c), DMA_OK);
    return c;
}

/* Append in the given chunking and check every append's rows. */
START_TEST(selection_equals_whole_build_in_any_chunking)
{
    dma_context *ctx = test_scalar_context();
    test_rng r = rng_make(11);
    const int64_t windows[] = {1, 5, 64, 200, 400};
    for (int w = 0; w < 5; w++)
        for (int ties = 0; ties < 2; ties++) {
            seq s = seq_make(&r, 2, 300, 2, 4, ties);
            uint8_t *whole = whole_selection(ctx, &s, windows[w]);
            for (int chunking = 0; chunking < 4; chunking++) {
                dma_kv_cache *c = make_cache(ctx, &s, windows[w], DMA_F32, chunking == 3 ? 7 : 0);
                int64_t len = 0;
                while (len < s.L) {
                    int64_t n = chunking == 0   ? 1
                                : chunking == 1 ? 64
                                : chunking == 2 ? rng_int(&r, 1, 90)
                                                : s.L;
                    n = n < s.L - len ? n : s.L - len;
                    dma_tensor tk = kv_view(s.k, &s, len, n, DMA_F32, NULL);
                    dma_tensor tv = kv_view(s.v, &s, len, n, DMA_F32, NULL);
                    dma_tensor tb = bias_view(&s, len, n);
                    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &tk, &tv, &tb, NULL), DMA_OK);
                    len += n;
                    ck_assert_int_eq(dma_kv_cache_length(c, 1), len);
                    /* Every row of the append, and a suffix of it. */
                    check_rows(ctx, c, &s, whole, len, n, "all rows");
                    if (n > 3)
                        check_rows(ctx, c, &s, whole, len, n / 3, "suffix");
                }
                dma_kv_cache_destroy(c);
            }
            free(whole);
            seq_free(&s);
        }
    dma_context_destroy(ctx);
}
END_TEST

/* Reference attention of entry b's rows at positions [len - n, len) over its first len keys. */
static void ref_rows(const seq *s, int64_t b, int64_t len, int64_t n, int64_t Hq,
                     const float *q_rows /* (n, Hq, D) */, const uint8_t *sel /* (Hs, n, len) */,
                     int64_t Hs, int add_bias, double *out, double *lse)
{
    const int64_t Hkv = s->Hkv, D = s->D;
    float *k = test_malloc(sizeof(float) * (size_t)(len * Hkv * D + 1));
    float *v = test_malloc(sizeof(float) * (size_t)(len * Hkv * D + 1));
    float *bias = test_malloc(sizeof(float) * (size_t)(Hkv * len + 1));
    memcpy(k, s->k + b * s->L * Hkv * D, sizeof(float) * (size_t)(len * Hkv * D));
    memcpy(v, s->v + b * s->L * Hkv * D, sizeof(float) * (size_t)(len * Hkv * D));
    for (int64_t h = 0; h < Hkv; h++)
        for (int64_t j = 0; j < len; j++)
            bias[h * len + j] = s->bias[(b * Hkv + h) * s->L + j];
    ref_fwd_args ra = {.B = 1, .Lq = n, .Lk = len, .Hq = Hq, .Hkv = Hkv, .D = D, .q = q_rows,
                       .k = k, .v = v, .bias = add_bias ? bias : NULL, .Bb = 1, .Hb = Hkv,
                       .Lb = 1, .sel = sel, .Bs = 1, .Hs = Hs, .causal = 1};
    ref_forward(&ra, out, lse);
    free(k);
    free(v);
    free(bias);
}

/* Decode and chunked prefill with TOPK/DENSE/WINDOW against the reference, ragged, per dtype. */
static void forward_case(test_ctx *tc, dma_dtype dt, uint64_t seed)
{
    test_rng r = rng_make(seed);
    const int64_t B = 3, L = 260, Hkv = 2, Hq = 4, D = dt == DMA_F32 ? 19 : 16, window = 40;
    seq s = seq_make(&r, B, L, Hkv, D, 0);
    void *ks = store_as(s.k, B * L * Hkv * D, dt), *vs = store_as(s.v, B * L * Hkv * D, dt);
    uint8_t *whole = whole_selection(tc->ctx, &s, window);
    /* 32-token pages split every chunk; 256-token ones let contiguous chunks read a page */
    dma_kv_cache *c = make_cache(tc->ctx, &s, window, dt, seed % 2 ? 32 : 0);
    const double tol = dt == DMA_F32 ? 2e-5 : dt == DMA_BF16 ? 1.2e-2 : 2e-3;
    int64_t done[3] = {0, 0, 0};
    int step = 0;
    while (done[0] < L || done[1] < L || done[2] < L) {
        /* Ragged: each entry appends its own count (decode steps of 1 mixed with chunks). */
        int64_t n = step % 3 == 0 ? rng_int(&r, 1, 70) : 1, counts[3];
        for (int64_t b = 0; b < B; b++) {
            counts[b] = b == step % 3 ? 0 : (n < L - done[b] ? n : L - done[b]);
            if (step < 3)
                counts[b] = n < L - done[b] ? n : L - done[b]; /* everyone starts */
        }
        step++;
        /* Tokens [done_b, done_b + counts_b) of entry b, gathered into (B, n, Hkv, D). */
        size_t esz = dt == DMA_F32 ? 4 : 2;
        char *kb = test_calloc((size_t)(B * n * Hkv * D), esz);
        char *vb = test_calloc((size_t)(B * n * Hkv * D), esz);
        float *bb = test_calloc((size_t)(B * Hkv * n), sizeof(float));
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = 0; t < counts[b]; t++) {
                size_t row = (size_t)(Hkv * D) * esz;
                memcpy(kb + (size_t)(b * n + t) * row,
                       (char *)(dt == DMA_F32 ? (void *)s.k : ks) +
                           (size_t)((b * L + done[b] + t) * Hkv * D) * esz, row);
                memcpy(vb + (size_t)(b * n + t) * row,
                       (char *)(dt == DMA_F32 ? (void *)s.v : vs) +
                           (size_t)((b * L + done[b] + t) * Hkv * D) * esz, row);
                for (int64_t h = 0; h < Hkv; h++)
                    bb[(b * Hkv + h) * n + t] = s.bias[(b * Hkv + h) * L + done[b] + t];
            }
        dma_tensor tk = dma_tensor_4d(kb, dt, B, n, Hkv, D), tv = dma_tensor_4d(vb, dt, B, n, Hkv, D);
        dma_tensor tb = dma_tensor_4d(bb, DMA_F32, B, Hkv, 1, n);
        ck_assert_int_eq(dma_kv_cache_append(tc->ctx, c, &tk, &tv, &tb, counts), DMA_OK);
        for (int64_t b = 0; b < B; b++)
            done[b] += counts[b];
        free(kb);
        free(vb);
        free(bb);

        /* Queries for the rows each entry just added (rows past counts[b] must come out empty). */
        float *q = test_malloc(sizeof(float) * (size_t)(B * n * Hq * D));
        for (int64_t i = 0; i < B * n * Hq * D; i++)
            q[i] = rng_float(&r, -1, 1);
        void *qs = store_as(q, B * n * Hq * D, dt);
        size_t esz_out = dt == DMA_F32 ? 4 : 2;
        void *out = test_malloc(esz_out * (size_t)(B * n * Hq * D));
        float *lse = test_malloc(sizeof(float) * (size_t)(B * Hq * n));
        dma_tensor tq = dma_tensor_4d(qs, dt, B, n, Hq, D), to = dma_tensor_4d(out, dt, B, n, Hq, D);
        dma_tensor tl = dma_tensor_3d(lse, DMA_F32, B, Hq, n);
        for (int kind = 0; kind < 3; kind++) {
            dma_kv_attn_params ap = {.kind = kind == 0 ? DMA_MASK_TOPK
                                             : kind == 1 ? DMA_MASK_DENSE
                                                         : DMA_MASK_WINDOW,
                                     .window = 25, .add_bias = kind != 1};
            ck_assert_int_eq(dma_kv_forward(tc->ctx, c, &tq, counts, &ap, &to, &tl), DMA_OK);
            for (int64_t b = 0; b < B; b++) {
                const int64_t nb = counts[b], len = done[b];
                const int64_t Hs = kind == 0 ? Hkv : 1;
                uint8_t *sel = test_calloc((size_t)(Hs * (nb ? nb : 1) * (len ? len : 1)), 1);
                for (int64_t h = 0; h < Hs; h++)
                    for (int64_t i = 0; i < nb; i++) {
                        const int64_t p = len - nb + i;
                        for (int64_t j = 0; j < len; j++)
                            sel[(h * nb + i) * len + j] =
                                kind == 0 ? whole[((b * Hkv + h) * L + p) * L + j]
                                : kind == 1 ? j <= p
                                            : j <= p && j > p - 25;
                    }
                double *ro = test_malloc(sizeof(double) * (size_t)(nb * Hq * D + 1));
                double *rl = test_malloc(sizeof(double) * (size_t)(Hq * nb + 1));
                float *qb = test_malloc(sizeof(float) * (size_t)(nb * Hq * D + 1));
                memcpy(qb, q + b * n * Hq * D, sizeof(float) * (size_t)(nb * Hq * D));
                if (nb)
                    ref_rows(&s, b, len, nb, Hq, qb, sel, Hs, ap.add_bias, ro, rl);
                for (int64_t i = 0; i < n; i++)
                    for (int64_t h = 0; h < Hq; h++) {
                        const float gl = lse[(b * Hq + h) * n + i];
                        if (i >= nb) {
                            REQUIRE(gl == -INFINITY, "row past counts must be empty");
                            for (int64_t d = 0; d < D; d++)
                                REQUIRE(load_from(out, ((b * n + i) * Hq + h) * D + d, dt) == 0.0f,
                                        "row past counts must be 0");
                            continue;
                        }
                        const double wl = rl[h * nb + i];
                        REQUIRE((isinf(wl) && gl == -INFINITY) || fabs(gl - wl) < 1e-4 * (1 + fabs(wl)),
                                "%s kind %d entry %lld row %lld head %lld: lse %g, want %g",
                                dma_isa_name(tc->isa), kind, (long long)b, (long long)i,
                                (long long)h, gl, wl);
                        for (int64_t d = 0; d < D; d++) {
                            const double want = ro[(i * Hq + h) * D + d];
                            const float got = load_from(out, ((b * n + i) * Hq + h) * D + d, dt);
                            REQUIRE(fabs(got - want) <= tol * (1 + fabs(want)),
                                    "%s dtype %d kind %d entry %lld row %lld: out %g, want %g",
                                    dma_isa_name(tc->isa), (int)dt, kind, (long long)b,
                                    (long long)i, got, want);
                        }
                    }
                free(ro);
                free(rl);
                free(qb);
                free(sel);
            }
        }
        if (dt != DMA_F32) {
            /* float32 q and out over a 16-bit cache: the same computation (q holds the stored
             * values), so out is the 16-bit call's before its rounding, bit for bit. */
            float *o32 = test_malloc(sizeof(float) * (size_t)(B * n * Hq * D));
            dma_tensor q32 = dma_tensor_4d(q, DMA_F32, B, n, Hq, D);
            dma_tensor t32 = dma_tensor_4d(o32, DMA_F32, B, n, Hq, D);
            dma_kv_attn_params ap = {.kind = DMA_MASK_TOPK, .add_bias = 1};
            ck_assert_int_eq(dma_kv_forward(tc->ctx, c, &tq, counts, &ap, &to, &tl), DMA_OK);
            ck_assert_int_eq(dma_kv_forward(tc->ctx, c, &q32, counts, &ap, &t32, NULL), DMA_OK);
            for (int64_t i = 0; i < B * n * Hq * D; i++) {
                const uint16_t want = dt == DMA_BF16 ? test_to_bf16(o32[i]) : test_to_f16(o32[i]);
                REQUIRE(((const uint16_t *)out)[i] == want, "%s: f32 q and %d-bit q differ at %lld",
                        dma_isa_name(tc->isa), (int)dt, (long long)i);
            }
            free(o32);
        }
        if (qs != q)
            free(qs);
        free(q);
        free(out);
        free(lse);
    }
    dma_kv_cache_destroy(c);
    free(whole);
    if (ks != s.k)
        free(ks);
    if (vs != s.v)
        free(vs);
    seq_free(&s);
}

START_TEST(forward_over_cache_matches_reference)
{
    test_ctx list[TEST_MAX_CTX];
    int n = test_contexts_create(list);
    for (int i = 0; i < n; i++)
        for (int dt = 0; dt < 3; dt++)
            forward_case(&list[i], dt == 0 ? DMA_F32 : dt == 1 ? DMA_BF16 : DMA_F16,
                         100 + (uint64_t)(i * 3 + dt));
    test_contexts_destroy(list, n);
}
END_TEST

/* Bad input: a clear status, and the cache exactly as it was (the next appends give what a
 * cache that never saw the bad call gives). */
START_TEST(bad_input_leaves_the_cache_untouched)
{
    dma_context *ctx = test_scalar_context();
    test_rng r = rng_make(5);
    seq s = seq_make(&r, 2, 64, 2, 8, 0);
    seq s2 = seq_make(&r, 2, 64, 2, 8, 0); /* a second sequence for wrong-shaped calls */
    dma_kv_cache_params p = {.batch = 2, .kv_heads = 2, .head_dim = 8, .dtype = DMA_F32,
                             .max_len = 40, .window = 6, .page_len = 8, .max_pages = 9};
    dma_kv_cache *c, *clean;
    ck_assert_int_eq(dma_kv_cache_create(ctx, &p, &c), DMA_OK);
    ck_assert_int_eq(dma_kv_cache_create(ctx, &p, &clean), DMA_OK);
    dma_tensor tk = kv_view(s.k, &s, 0, 20, DMA_F32, NULL), tv = kv_view(s.v, &s, 0, 20, DMA_F32, NULL);
    dma_tensor tb = bias_view(&s, 0, 20);
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &tk, &tv, &tb, NULL), DMA_OK);
    ck_assert_int_eq(dma_kv_cache_append(ctx, clean, &tk, &tv, &tb, NULL), DMA_OK);
    int64_t used0, alloc0;
    dma_kv_cache_pages(c, &used0, &alloc0);
    ck_assert_int_eq(used0, 6); /* 2 entries x ceil(20 / 8) */

    dma_tensor k2 = kv_view(s.k, &s, 20, 21, DMA_F32, NULL), v2 = kv_view(s.v, &s, 20, 21, DMA_F32, NULL);
    dma_tensor b2 = bias_view(&s, 20, 21);
    /* Past max_len (20 + 21 > 40). */
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k2, &v2, &b2, NULL), DMA_ERR_SHAPE);
    /* Wrong dtype. */
    dma_tensor kbad = k2;
    kbad.dtype = DMA_BF16;
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &kbad, &v2, &b2, NULL), DMA_ERR_DTYPE);
    /* Wrong shapes: head dim, heads, bias length, a count above n. */
    dma_tensor kd = k2;
    kd.shape[3] = 7;
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &kd, &v2, &b2, NULL), DMA_ERR_SHAPE);
    dma_tensor kh = k2;
    kh.shape[2] = 1;
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &kh, &v2, &b2, NULL), DMA_ERR_SHAPE);
    dma_tensor bl = bias_view(&s, 20, 5);
    dma_tensor k5 = kv_view(s.k, &s, 20, 4, DMA_F32, NULL), v5 = kv_view(s.v, &s, 20, 4, DMA_F32, NULL);
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k5, &v5, &bl, NULL), DMA_ERR_SHAPE);
    int64_t counts[2] = {2, 5};
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k5, &v5, &bl, counts), DMA_ERR_SHAPE);
    /* No bias on a cache with a window; a NaN and a +inf bias in the last token of entry 1. */
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k5, &v5, NULL, NULL), DMA_ERR_NULL);
    dma_tensor b4 = bias_view(&s2, 20, 4);
    s2.bias[1 * 2 * 64 + 1 * 64 + 23] = NAN;
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k5, &v5, &b4, NULL), DMA_ERR_BAD_VALUE);
    s2.bias[1 * 2 * 64 + 1 * 64 + 23] = INFINITY;
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k5, &v5, &b4, NULL), DMA_ERR_BAD_VALUE);
    /* The pool: 9 pages, 6 in use; 20 more tokens per entry need 2 x 3 - 2 x ... > 3 more. */
    dma_tensor k20 = kv_view(s.k, &s, 20, 20, DMA_F32, NULL), v20 = kv_view(s.v, &s, 20, 20, DMA_F32, NULL);
    dma_tensor b20 = bias_view(&s, 20, 20);
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k20, &v20, &b20, NULL), DMA_ERR_NOMEM);
    ck_assert_str_ne(dma_context_last_error(ctx), "");
    /* NULLs. */
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, NULL, &v5, &b4, NULL), DMA_ERR_NULL);
    ck_assert_int_eq(dma_kv_cache_append(ctx, NULL, &k5, &v5, &b4, NULL), DMA_ERR_NULL);

    /* Nothing changed: same lengths, pages, selection; and the same future as the clean cache. */
    ck_assert_int_eq(dma_kv_cache_length(c, 0), 20);
    ck_assert_int_eq(dma_kv_cache_length(c, 1), 20);
    int64_t used, alloc;
    dma_kv_cache_pages(c, &used, &alloc);
    ck_assert_int_eq(used, used0);
    dma_tensor k10 = kv_view(s.k, &s, 20, 10, DMA_F32, NULL), v10 = kv_view(s.v, &s, 20, 10, DMA_F32, NULL);
    dma_tensor b10 = bias_view(&s, 20, 10);
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k10, &v10, &b10, NULL), DMA_OK);
    ck_assert_int_eq(dma_kv_cache_append(ctx, clean, &k10, &v10, &b10, NULL), DMA_OK);
    float q[2 * 10 * 4 * 8], o1[2 * 10 * 4 * 8], o2[2 * 10 * 4 * 8], l1[2 * 4 * 10], l2[2 * 4 * 10];
    for (int i = 0; i < 2 * 10 * 4 * 8; i++)
        q[i] = rng_float(&r, -1, 1);
    dma_tensor tq = dma_tensor_4d(q, DMA_F32, 2, 10, 4, 8);
    dma_tensor t1 = dma_tensor_4d(o1, DMA_F32, 2, 10, 4, 8), t2 = dma_tensor_4d(o2, DMA_F32, 2, 10, 4, 8);
    dma_tensor tl1 = dma_tensor_3d(l1, DMA_F32, 2, 4, 10), tl2 = dma_tensor_3d(l2, DMA_F32, 2, 4, 10);
    dma_kv_attn_params ap = {.kind = DMA_MASK_TOPK, .add_bias = 1};
    ck_assert_int_eq(dma_kv_forward(ctx, c, &tq, NULL, &ap, &t1, &tl1), DMA_OK);
    ck_assert_int_eq(dma_kv_forward(ctx, clean, &tq, NULL, &ap, &t2, &tl2), DMA_OK);
    ck_assert(memcmp(o1, o2, sizeof o1) == 0 && memcmp(l1, l2, sizeof l1) == 0);

    /* Forward errors leave out and lse untouched. */
    fill_sentinel(o1, sizeof o1);
    fill_sentinel(l1, sizeof l1);
    dma_tensor q11 = dma_tensor_4d(q, DMA_F32, 2, 11, 4, 8), o11 = dma_tensor_4d(o1, DMA_F32, 2, 11, 4, 8);
    ck_assert_int_eq(dma_kv_forward(ctx, c, &q11, NULL, &ap, &o11, NULL), DMA_ERR_SHAPE); /* 11 > last append */
    dma_tensor q3 = dma_tensor_4d(q, DMA_F32, 2, 10, 3, 8);
    ck_assert_int_eq(dma_kv_forward(ctx, c, &q3, NULL, &ap, &t1, &tl1), DMA_ERR_HEADS);
    /* no in-place forward: out over q, lse over out */
    dma_tensor in_place = dma_tensor_4d(q, DMA_F32, 2, 10, 4, 8);
    dma_tensor lse_over_out = dma_tensor_3d(o1 + 8, DMA_F32, 2, 4, 10);
    ck_assert_int_eq(dma_kv_forward(ctx, c, &tq, NULL, &ap, &in_place, &tl1), DMA_ERR_OVERLAP);
    ck_assert_int_eq(dma_kv_forward(ctx, c, &tq, NULL, &ap, &t1, &lse_over_out),
                     DMA_ERR_OVERLAP);
    dma_kv_attn_params relu = {.kind = DMA_MASK_RELU};
    ck_assert_int_eq(dma_kv_forward(ctx, c, &tq, NULL, &relu, &t1, &tl1), DMA_ERR_ARG);
    dma_kv_attn_params nanscale = {.kind = DMA_MASK_DENSE, .scale = NAN};
    ck_assert_int_eq(dma_kv_forward(ctx, c, &tq, NULL, &nanscale, &t1, &tl1), DMA_ERR_BAD_VALUE);
    dma_tensor qb = tq;
    qb.dtype = DMA_F16;
    ck_assert_int_eq(dma_kv_forward(ctx, c, &qb, NULL, &ap, &t1, &tl1), DMA_ERR_DTYPE);
    ck_assert(is_sentinel(o1, sizeof o1) && is_sentinel(l1, sizeof l1));

    /* Create errors. */
    dma_kv_cache *x = NULL;
    dma_kv_cache_params bad = p;
    bad.head_dim = 0;
    ck_assert_int_eq(dma_kv_cache_create(ctx, &bad, &x), DMA_ERR_HEAD_DIM);
    bad = p;
    bad.dtype = DMA_BOOL;
    ck_assert_int_eq(dma_kv_cache_create(ctx, &bad, &x), DMA_ERR_DTYPE);
    bad = p;
    bad.window = -1;
    ck_assert_int_eq(dma_kv_cache_create(ctx, &bad, &x), DMA_ERR_WINDOW);
    bad = p;
    bad.max_len = 0;
    ck_assert_int_eq(dma_kv_cache_create(ctx, &bad, &x), DMA_ERR_SHAPE);
    ck_assert_ptr_null(x);
    ck_assert_int_eq(dma_kv_cache_reset(c, 2), DMA_ERR_SHAPE);
    int32_t keys[4];
    int64_t nk = 0;
    ck_assert_int_eq(dma_kv_cache_selection(c, 0, 0, keys, 4, &nk), DMA_ERR_BUFFER);
    ck_assert_int_eq(nk, 6);

    dma_kv_cache_destroy(c);
    dma_kv_cache_destroy(clean);
    seq_free(&s);
    seq_free(&s2);
    dma_context_destroy(ctx);
}
END_TEST

/* After a reset, an entry selects for its new sequence exactly what a fresh cache selects (the
 * heap and journal start over; its reused pages hold only the new tokens), while the other entry
 * keeps its own. */
START_TEST(reset_entry_starts_over)
{
    dma_context *ctx = test_scalar_context();
    test_rng r = rng_make(13);
    seq a = seq_make(&r, 2, 120, 2, 4, 1), fresh = seq_make(&r, 2, 120, 2, 4, 1);
    uint8_t *whole_fresh = whole_selection(ctx, &fresh, 9), *whole_a = whole_selection(ctx, &a, 9);
    dma_kv_cache *c = make_cache(ctx, &a, 9, DMA_F32, 16);
    dma_tensor tk = kv_view(a.k, &a, 0, 120, DMA_F32, NULL), tv = kv_view(a.v, &a, 0, 120, DMA_F32, NULL);
    dma_tensor tb = bias_view(&a, 0, 120);
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &tk, &tv, &tb, NULL), DMA_OK);
    ck_assert_int_eq(dma_kv_cache_reset(c, 0), DMA_OK);
    ck_assert_int_eq(dma_kv_cache_length(c, 0), 0);
    ck_assert_int_eq(dma_kv_cache_length(c, 1), 120);
    int64_t len = 0;
    while (len < 120) {
        int64_t n = rng_int(&r, 1, 30), counts[2] = {0, 0};
        n = n < 120 - len ? n : 120 - len;
        counts[0] = n;
        dma_tensor k = kv_view(fresh.k, &fresh, len, n, DMA_F32, NULL);
        dma_tensor v = kv_view(fresh.v, &fresh, len, n, DMA_F32, NULL);
        dma_tensor b = bias_view(&fresh, len, n);
        ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k, &v, &b, counts), DMA_OK);
        len += n;
        for (int64_t e = 0; e < 2; e++)
            for (int64_t h = 0; h < 2; h++) {
                int32_t keys[16];
                int64_t nk = 0;
                ck_assert_int_eq(dma_kv_cache_selection(c, e, h, keys, 16, &nk), DMA_OK);
                /* entry 0: row len - 1 of the fresh sequence; entry 1: still a's last row */
                const int64_t L = e == 0 ? len : 120;
                const uint8_t *want = (e == 0 ? whole_fresh : whole_a) + ((e * 2 + h) * 120 + L - 1) * 120;
                ck_assert_int_eq(nk, ref_popcount(want, L));
                for (int64_t x = 0; x < nk; x++)
                    ck_assert_msg(want[keys[x]], "entry %lld head %lld: key %d not selected",
                                  (long long)e, (long long)h, keys[x]);
            }
    }
    dma_kv_cache_destroy(c);
    free(whole_fresh);
    free(whole_a);
    seq_free(&a);
    seq_free(&fresh);
    dma_context_destroy(ctx);
}
END_TEST

/* Entries share one pool: pages an entry gives back are reused, and no page is shared. */
START_TEST(pages_are_shared_and_reused)
{
    dma_context *ctx = test_scalar_context();
    test_rng r = rng_make(9);
    seq s = seq_make(&r, 2, 48, 1, 4, 0);
    dma_kv_cache_params p = {.batch = 2, .kv_heads = 1, .head_dim = 4, .dtype = DMA_F32,
                             .max_len = 48, .window = 0, .page_len = 16, .max_pages = 4};
    dma_kv_cache *c;
    ck_assert_int_eq(dma_kv_cache_create(ctx, &p, &c), DMA_OK);
    ck_assert_int_eq(dma_kv_cache_get_params(c).max_pages, 4);
    dma_tensor k = kv_view(s.k, &s, 0, 48, DMA_F32, NULL), v = kv_view(s.v, &s, 0, 48, DMA_F32, NULL);
    int64_t c0[2] = {48, 0}, c1[2] = {0, 48}, used, alloc;
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k, &v, NULL, c0), DMA_OK); /* 3 pages */
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k, &v, NULL, c1), DMA_ERR_NOMEM); /* 3 more */
    ck_assert_int_eq(dma_kv_cache_length(c, 1), 0);
    ck_assert_int_eq(dma_kv_cache_reset(c, 0), DMA_OK);
    dma_kv_cache_pages(c, &used, &alloc);
    ck_assert(used == 0 && alloc >= 3 && alloc <= 4); /* pages come in arenas */
    const int64_t alloc_before = alloc;
    ck_assert_int_eq(dma_kv_cache_append(ctx, c, &k, &v, NULL, c1), DMA_OK); /* reuses them */
    dma_kv_cache_pages(c, &used, &alloc);
    ck_assert(used == 3 && alloc == alloc_before);
    /* Entry 1 now holds the data: a dense decode of its last token equals the reference. */
    float q[2 * 1 * 2 * 4] = {0.5f, -1, 0.25f, 1, 0.1f, 0.2f, 0.3f, 0.4f};
    float o[2 * 2 * 4], l[2 * 2];
    dma_tensor tq = dma_tensor_4d(q, DMA_F32, 2, 1, 2, 4), to = dma_tensor_4d(o, DMA_F32, 2, 1, 2, 4);
    dma_tensor tl = dma_tensor_3d(l, DMA_F32, 2, 2, 1);
    int64_t rows[2] = {0, 1};
    dma_kv_attn_params ap = {.kind = DMA_MASK_DENSE};
    ck_assert_int_eq(dma_kv_forward(ctx, c, &tq, rows, &ap, &to, &tl), DMA_OK);
    double ro[2 * 4], rl[2];
    ref_fwd_args ra = {.B = 1, .Lq = 1, .Lk = 48, .Hq = 2, .Hkv = 1, .D = 4, .q = q + 8,
                       .k = s.k + 48 * 4, .v = s.v + 48 * 4, .causal = 1};
    ref_forward(&ra, ro, rl);
    for (int h = 0; h < 2; h++) {
        ck_assert_double_eq_tol(l[2 + h], rl[h], 1e-5);
        ck_assert(l[h] == -INFINITY); /* entry 0: no rows asked for */
        for (int d = 0; d < 4; d++)
            ck_assert_double_eq_tol(o[8 + h * 4 + d], ro[h * 4 + d], 1e-5);
    }
    dma_kv_cache_destroy(c);
    seq_free(&s);
    dma_context_destroy(ctx);
}
END_TEST

/* append_dynamic == append with the bias dma_dynamic_bias_forward gives. */
START_TEST(append_dynamic_uses_the_value_bias)
{
    dma_context *ctx = test_scalar_context();
    test_rng r = rng_make(21);
    const int64_t B = 1, L = 50, H = 2, D = 6;
    seq s = seq_make(&r, B, L, H, D, 0);
    float w[2 * 6 * 2], bdt[2] = {0.1f, -0.2f}, a[2] = {1.0f, 0.7f};
    for (int i = 0; i < 24; i++)
        w[i] = rng_float(&r, -1, 1);
    dma_tensor tw = dma_tensor_2d(w, DMA_F32, H * D, H), tbd = dma_tensor_1d(bdt, DMA_F32, H),
               ta = dma_tensor_1d(a, DMA_F32, H);
    for (int pass = 0; pass < 2; pass++) {
        /* f32 storage, then bf16 (whose values the library converts for the bias op). */
        const dma_dtype dt = pass ? DMA_BF16 : DMA_F32;
        void *ks = store_as(s.k, B * L * H * D, dt), *vs = store_as(s.v, B * L * H * D, dt);
        dma_tensor tv32 = dma_tensor_4d(s.v, DMA_F32, B, L, H, D);
        dma_tensor tb = dma_tensor_4d(s.bias, DMA_F32, B, H, 1, L);
        ck_assert_int_eq(dma_dynamic_bias_forward(ctx, &tv32, &tw, &tbd, &ta, &tb), DMA_OK);
        dma_tensor tv = dma_tensor_4d(vs, dt, B, L, H, D), tk = dma_tensor_4d(ks, dt, B, L, H, D);
        dma_kv_cache_params p = {.batch = B, .kv_heads = H, .head_dim = D, .dtype = dt,
                                 .max_len = L, .window = 7};
        dma_kv_cache *c1, *c2;
        ck_assert_int_eq(dma_kv_cache_create(ctx, &p, &c1), DMA_OK);
        ck_assert_int_eq(dma_kv_cache_create(ctx, &p, &c2), DMA_OK);
        ck_assert_int_eq(dma_kv_cache_append(ctx, c1, &tk, &tv, &tb, NULL), DMA_OK);
        ck_assert_int_eq(dma_kv_cache_append_dynamic(ctx, c2, &tk, &tv, &tw, &tbd, &ta, NULL),
                         DMA_OK);
        int32_t k1[8], k2[8];
        int64_t n1, n2;
        for (int64_t h = 0; h < H; h++) {
            ck_assert_int_eq(dma_kv_cache_selection(c1, 0, h, k1, 8, &n1), DMA_OK);
            ck_assert_int_eq(dma_kv_cache_selection(c2, 0, h, k2, 8, &n2), DMA_OK);
            ck_assert_int_eq(n1, 7);
            ck_assert(n1 == n2 && memcmp(k1, k2, sizeof(int32_t) * (size_t)n1) == 0);
        }
        ck_assert_int_eq(dma_kv_cache_append_dynamic(ctx, c2, &tk, &tv, &tw, &tbd, &ta, NULL),
                         DMA_ERR_SHAPE); /* past max_len */
        dma_kv_cache_destroy(c1);
        dma_kv_cache_destroy(c2);
        if (pass) {
            free(ks);
            free(vs);
        }
    }
    seq_free(&s);
    dma_context_destroy(ctx);
}
END_TEST

/* One thread or two: the same bits. */
START_TEST(results_do_not_depend_on_threads)
{
    test_ctx list[TEST_MAX_CTX];
    int n = test_contexts_create(list);
    test_rng r = rng_make(33);
    seq s = seq_make(&r, 2, 400, 2, 32, 0);
    float *q = test_malloc(sizeof(float) * 2 * 100 * 8 * 32);
    for (int i = 0; i < 2 * 100 * 8 * 32; i++)
        q[i] = rng_float(&r, -1, 1);
    float *o[2], *l[2];
    for (int i = 0; i + 1 < n; i += 2) {
        for (int t = 0; t < 2; t++) {
            dma_context *ctx = list[i + t].ctx;
            dma_kv_cache *c = make_cache(ctx, &s, 64, DMA_F32, 0);
            dma_tensor tk = kv_view(s.k, &s, 0, 300, DMA_F32, NULL), tv = kv_view(s.v, &s, 0, 300, DMA_F32, NULL);
            dma_tensor tb = bias_view(&s, 0, 300);
            ck_assert_int_eq(dma_kv_cache_append(ctx, c, &tk, &tv, &tb, NULL), DMA_OK);
            tk = kv_view(s.k, &s, 300, 100, DMA_F32, NULL);
            tv = kv_view(s.v, &s, 300, 100, DMA_F32, NULL);
            tb = bias_view(&s, 300, 100);
            ck_assert_int_eq(dma_kv_cache_append(ctx, c, &tk, &tv, &tb, NULL), DMA_OK);
            o[t] = test_malloc(sizeof(float) * 2 * 100 * 8 * 32);
            l[t] = test_malloc(sizeof(float) * 2 * 8 * 100);
            dma_tensor tq = dma_tensor_4d(q, DMA_F32, 2, 100, 8, 32), to = dma_tensor_4d(o[t], DMA_F32, 2, 100, 8, 32);
            dma_tensor tl = dma_tensor_3d(l[t], DMA_F32, 2, 8, 100);
            dma_kv_attn_params ap = {.kind = DMA_MASK_TOPK, .add_bias = 1};
            ck_assert_int_eq(dma_kv_forward(ctx, c, &tq, NULL, &ap, &to, &tl), DMA_OK);
            dma_kv_cache_destroy(c);
        }
        ck_assert(memcmp(o[0], o[1], sizeof(float) * 2 * 100 * 8 * 32) == 0);
        ck_assert(memcmp(l[0], l[1], sizeof(float) * 2 * 8 * 100) == 0);
        for (int t = 0; t < 2; t++) {
            free(o[t]);
            free(l[t]);
        }
    }
    free(q);
    seq_free(&s);
    test_contexts_destroy(list, n);
}
END_TEST

Suite *kvcache_suite(void)
{
    Suite *s = suite_create("kvcache");
    TCase *tc = tcase_create("selection");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, selection_equals_whole_build_in_any_chunking);
    suite_add_tcase(s, tc);
    tc = tcase_create("forward");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, forward_over_cache_matches_reference);
    tcase_add_test(tc, results_do_not_depend_on_threads);
    suite_add_tcase(s, tc);
    tc = tcase_create("api");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, bad_input_leaves_the_cache_untouched);
    tcase_add_test(tc, pages_are_shared_and_reused);
    tcase_add_test(tc, reset_entry_starts_over);
    tcase_add_test(tc, append_dynamic_uses_the_value_bias);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(kvcache_suite()); }

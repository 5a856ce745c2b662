/*
 * test_nan.c - non-finite values propagate consistently through dma_forward and dma_backward
 * (DESIGN §1, the comments of dma_forward and dma_backward in dmattn.h):
 *   - a NaN in q, k, v or the bias of a row's selected keys gives a NaN out row and a NaN lse
 *     (for v: the out element of the NaN's column), and NaN gradients for that row: its dq row,
 *     and the dk / dv / dbias entries of the keys it selected;
 *   - a row with no selected key stays out = 0, lse = -inf and zero gradients, even with a NaN
 *     in its q (or a NaN in K or V of the keys other rows of its tile selected);
 *   - the scores of keys a row did not select never matter; only the products 0 * NaN of the
 *     dense tile blocks (P V in the forward, dS K and dS^T Q in the backward) may carry a NaN of
 *     V, K or Q to other rows or keys of the same tile's key union, and what they carry to an
 *     out row also makes its lse NaN.
 * Every context of test_contexts_create() (every ISA the host runs, threads 1 and 2), head dims
 * 24 and 33, causal top-k (window 10 and 1), dense and causal defaults, softcap, and shapes with
 * empty rows. Each NaN run is compared with the clean run of the same context: what the NaN
 * cannot reach must be bitwise equal.
 */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* The query tile of the sparsity object is DMA_TILE = 64 rows (lib/internal.h) and the forward
 * and the backward may merge tiles 2t and 2t + 1 into one work item. The union of the keys an
 * item's rows selected is what the 0 * NaN products of an item can reach; the bounds below
 * over-approximate it by the range of keys selected in aligned windows of rows (valid for any
 * DMA_TILE that divides 64). */
#define FWD_ROWS 128
#define BWD_ROWS 128

typedef enum nan_kind { NAN_Q, NAN_K, NAN_V, NAN_BIAS, NAN_Q_EMPTY } nan_kind;
static const char *const KIND_NAME[] = {"q", "k", "v", "bias", "q of an empty row"};

typedef struct config {
    const char *name;
    int64_t B, Lq, Lk, Hq, Hkv;
    int causal;
    float softcap;
    int topk;        /* 1: dma_sparsity_build(TOPK) from the per-key bias; 0: sp = NULL */
    int64_t window;  /* topk */
    int64_t npad;    /* topk: keys 0 .. npad - 1 are padding (rows that see only them are empty) */
} config;

typedef struct prob {
    const config *cf;
    int64_t D;
    float *q, *k, *v, *bias, *dout; /* bias: (B, Hkv, 1, Lk), per key */
    dma_sparsity *sp;
    uint8_t *sel; /* (B, Hq, Lq, Lk): 1 = row (b, h, i) selects key j */
    /* [w][(b * Hkv + g) * nwin + window]: the first and last key selected by a row of the
     * aligned window of FWD_ROWS (w = 0) or BWD_ROWS (w = 1) rows, any head of kv head g */
    int64_t *wlo[2], *whi[2];
} prob;

typedef struct result {
    float *out, *lse, *dq, *dk, *dv, *dbias;
} result;

/* ---- indexing ---- */

static size_t n_q(const prob *p) { return (size_t)(p->cf->B * p->cf->Lq * p->cf->Hq * p->D); }
static size_t n_kv(const prob *p) { return (size_t)(p->cf->B * p->cf->Lk * p->cf->Hkv * p->D); }
static size_t n_lse(const prob *p) { return (size_t)(p->cf->B * p->cf->Hq * p->cf->Lq); }
static size_t n_bias(const prob *p) { return (size_t)(p->cf->B * p->cf->Hkv * p->cf->Lk); }

static size_t iq(const prob *p, int64_t b, int64_t i, int64_t h)
{
    return (size_t)(((b * p->cf->Lq + i) * p->cf->Hq + h) * p->D);
}
static size_t ikv(const prob *p, int64_t b, int64_t j, int64_t g)
{
    return (size_t)(((b * p->cf->Lk + j) * p->cf->Hkv + g) * p->D);
}
static size_t ilse(const prob *p, int64_t b, int64_t h, int64_t i)
{
    return (size_t)((b * p->cf->Hq + h) * p->cf->Lq + i);
}
static size_t ibias(const prob *p, int64_t b, int64_t g, int64_t j)
{
    return (size_t)((b * p->cf->Hkv + g) * p->cf->Lk + j);
}
static int sel(const prob *p, int64_t b, int64_t h, int64_t i, int64_t j)
{
    return p->sel[((b * p->cf->Hq + h) * p->cf->Lq + i) * p->cf->Lk + j];
}
static int64_t group_of(const prob *p, int64_t h) { return h / (p->cf->Hq / p->cf->Hkv); }

static int same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* Whether key j lies within the range of keys that the rows of the aligned window of `rows`
 * rows holding row i (every query head of kv head g) selected: the keys a work item holding
 * row i can touch. */
static int in_window(const prob *p, int64_t b, int64_t g, int64_t i, int64_t j, int64_t rows)
{
    const int w = rows == FWD_ROWS ? 0 : 1;
    const int64_t nwin = (p->cf->Lq + rows - 1) / rows, x = (b * p->cf->Hkv + g) * nwin + i / rows;
    return p->wlo[w][x] <= j && j <= p->whi[w][x];
}

static void windows_make(prob *p)
{
    const config *cf = p->cf;
    const int64_t hpg = cf->Hq / cf->Hkv;
    for (int w = 0; w < 2; w++) {
        const int64_t rows = w ? BWD_ROWS : FWD_ROWS, nwin = (cf->Lq + rows - 1) / rows;
        p->wlo[w] = test_malloc(sizeof(int64_t) * (size_t)(cf->B * cf->Hkv * nwin));
        p->whi[w] = test_malloc(sizeof(int64_t) * (size_t)(cf->B * cf->Hkv * nwin));
        for (int64_t b = 0; b < cf->B; b++)
            for (int64_t g = 0; g < cf->Hkv; g++)
                for (int64_t x = 0; x < nwin; x++) {
                    int64_t lo = INT64_MAX, hi = -1;
                    for (int64_t h = g * hpg; h < (g + 1) * hpg; h++)
                        for (int64_t r = x * rows; r < (x + 1) * rows && r < cf->Lq; r++)
                            for (int64_t c = 0; c < cf->Lk; c++)
                                if (sel(p, b, h, r, c)) {
                                    lo = c < lo ? c : lo;
                                    hi = c > hi ? c : hi;
                                }
                    p->wlo[w][(b * cf->Hkv + g) * nwin + x] = lo;
                    p->whi[w][(b * cf->Hkv + g) * nwin + x] = hi;
                }
    }
}

static int row_selects_any(const prob *p, int64_t b, int64_t h, int64_t i)
{
    for (int64_t j = 0; j < p->cf->Lk; j++)
        if (sel(p, b, h, i, j))
            return 1;
    return 0;
}

/* ---- setup ---- */

static void prob_make(prob *p, const config *cf, int64_t D, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    p->cf = cf;
    p->D = D;
    test_rng r = rng_make(seed);
    p->q = test_malloc(sizeof(float) * n_q(p));
    p->dout = test_malloc(sizeof(float) * n_q(p));
    p->k = test_malloc(sizeof(float) * n_kv(p));
    p->v = test_malloc(sizeof(float) * n_kv(p));
    p->bias = test_malloc(sizeof(float) * n_bias(p));
    for (size_t x = 0; x < n_q(p); x++) {
        p->q[x] = rng_float(&r, -1.0f, 1.0f);
        p->dout[x] = rng_float(&r, -1.0f, 1.0f);
    }
    for (size_t x = 0; x < n_kv(p); x++) {
        p->k[x] = rng_float(&r, -1.0f, 1.0f);
        p->v[x] = rng_float(&r, -1.0f, 1.0f);
    }
    for (size_t x = 0; x < n_bias(p); x++)
        p->bias[x] = rng_float(&r, -2.0f, 2.0f);

    const int64_t B = cf->B, Lq = cf->Lq, Lk = cf->Lk, Hq = cf->Hq, Hkv = cf->Hkv;
    p->sel = test_calloc((size_t)(B * Hq * Lq * Lk), 1);
    if (cf->topk) {
        dma_context *ctx = test_scalar_context();
        dma_mask_params mp;
        memset(&mp, 0, sizeof mp);
        mp.kind = DMA_MASK_TOPK;
        mp.causal = cf->causal;
        mp.window = cf->window;
        dma_tensor mb = dma_tensor_4d(p->bias, DMA_F32, B, Hkv, 1, Lk);
        uint8_t *pad = NULL;
        dma_tensor padt;
        if (cf->npad > 0) {
            pad = test_malloc((size_t)(B * Lk));
            for (int64_t x = 0; x < B * Lk; x++)
                pad[x] = x % Lk >= cf->npad;
            padt = dma_tensor_2d(pad, DMA_BOOL, B, Lk);
        }
        dma_status st = dma_sparsity_build(ctx, &mp, B, Hkv, Lq, Lk, &mb, pad ? &padt : NULL,
                                           &p->sp);
        ck_assert_msg(st == DMA_OK, "dma_sparsity_build: %s", dma_status_string(st));
        size_t bytes = (size_t)(B * Hkv * Lq * Lk);
        uint8_t *dense = test_malloc(bytes);
        st = dma_sparsity_to_dense(p->sp, dense, bytes);
        ck_assert_msg(st == DMA_OK, "dma_sparsity_to_dense: %s", dma_status_string(st));
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < Hq; h++)
                memcpy(p->sel + ((b * Hq + h) * Lq) * Lk,
                       dense + ((b * Hkv + group_of(p, h)) * Lq) * Lk, (size_t)(Lq * Lk));
        free(dense);
        free(pad);
        dma_context_destroy(ctx);
    } else {
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < Hq; h++)
                for (int64_t i = 0; i < Lq; i++)
                    for (int64_t j = 0; j < Lk; j++)
                        p->sel[((b * Hq + h) * Lq + i) * Lk + j] =
                            !cf->causal || j <= i + (Lk - Lq);
    }
    windows_make(p);
}

static void prob_free(prob *p)
{
    free(p->q);
    free(p->k);
    free(p->v);
    free(p->bias);
    free(p->dout);
    free(p->sel);
    for (int w = 0; w < 2; w++) {
        free(p->wlo[w]);
        free(p->whi[w]);
    }
    dma_sparsity_destroy(p->sp);
}

static void result_alloc(const prob *p, result *r)
{
    r->out = test_malloc(sizeof(float) * n_q(p));
    r->lse = test_malloc(sizeof(float) * n_lse(p));
    r->dq = test_malloc(sizeof(float) * n_q(p));
    r->dk = test_malloc(sizeof(float) * n_kv(p));
    r->dv = test_malloc(sizeof(float) * n_kv(p));
    r->dbias = test_malloc(sizeof(float) * n_bias(p));
}

static void result_free(result *r)
{
    free(r->out);
    free(r->lse);
    free(r->dq);
    free(r->dk);
    free(r->dv);
    free(r->dbias);
}

/* Forward, then backward from the forward's own out and lse, on the given inputs. */
static void run(const prob *p, const test_ctx *tc, const float *q, const float *k,
                const float *v, const float *bias, result *r)
{
    const config *cf = p->cf;
    const int64_t B = cf->B, Lq = cf->Lq, Lk = cf->Lk, Hq = cf->Hq, Hkv = cf->Hkv, D = p->D;
    dma_tensor tq = dma_tensor_4d((void *)q, DMA_F32, B, Lq, Hq, D);
    dma_tensor tk = dma_tensor_4d((void *)k, DMA_F32, B, Lk, Hkv, D);
    dma_tensor tv = dma_tensor_4d((void *)v, DMA_F32, B, Lk, Hkv, D);
    dma_tensor tb = dma_tensor_4d((void *)bias, DMA_F32, B, Hkv, 1, Lk);
    dma_tensor tout = dma_tensor_4d(r->out, DMA_F32, B, Lq, Hq, D);
    dma_tensor tlse = dma_tensor_3d(r->lse, DMA_F32, B, Hq, Lq);
    dma_tensor tdout = dma_tensor_4d(p->dout, DMA_F32, B, Lq, Hq, D);
    dma_tensor tdq = dma_tensor_4d(r->dq, DMA_F32, B, Lq, Hq, D);
    dma_tensor tdk = dma_tensor_4d(r->dk, DMA_F32, B, Lk, Hkv, D);
    dma_tensor tdv = dma_tensor_4d(r->dv, DMA_F32, B, Lk, Hkv, D);
    dma_tensor tdb = dma_tensor_4d(r->dbias, DMA_F32, B, Hkv, 1, Lk);
    dma_attn_params ap;
    memset(&ap, 0, sizeof ap);
    ap.causal = cf->causal;
    ap.softcap = cf->softcap;
    dma_status st = dma_forward(tc->ctx, &tq, &tk, &tv, &tb, p->sp, &ap, &tout, &tlse);
    ck_assert_msg(st == DMA_OK, "dma_forward: %s", dma_status_string(st));
    st = dma_backward(tc->ctx, &tq, &tk, &tv, &tb, p->sp, &ap, &tout, &tlse, &tdout, &tdq, &tdk,
                      &tdv, &tdb);
    ck_assert_msg(st == DMA_OK, "dma_backward: %s", dma_status_string(st));
}

/* ---- one NaN ---- */

typedef struct target {
    nan_kind kind;
    int64_t b, h, g, i; /* the row (b, h, i) whose selected key (or q) is poisoned; g its kv head */
    int64_t j, d;       /* the key (k, v, bias) and the column (q, k, v) */
} target;

/* Checks one NaN run `x` against the clean run `c` (rules in the file comment). */
static void check_nan_run(const prob *p, const test_ctx *tc, const target *t, const result *c,
                          const result *x)
{
    const config *cf = p->cf;
    const int64_t B = cf->B, Lq = cf->Lq, Lk = cf->Lk, Hq = cf->Hq, Hkv = cf->Hkv, D = p->D;
    char where[200];
    snprintf(where, sizeof where, "%s D=%lld %s/%d, NaN in %s (row %lld head %lld key %lld col %lld)",
             cf->name, (long long)D, dma_isa_name(tc->isa), tc->threads, KIND_NAME[t->kind],
             (long long)t->i, (long long)t->h, (long long)t->j, (long long)t->d);

    /* Forward. */
    uint8_t *nan_row = test_calloc(n_lse(p), 1); /* rows whose lse is NaN in the NaN run */
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t i = 0; i < Lq; i++) {
                const int64_t g = group_of(p, h);
                const float *oc = c->out + iq(p, b, i, h), *ox = x->out + iq(p, b, i, h);
                const float lc = c->lse[ilse(p, b, h, i)], lx = x->lse[ilse(p, b, h, i)];
                const int empty = lc == -INFINITY;
                REQUIRE(empty == !row_selects_any(p, b, h, i),
                        "%s: clean lse %g of row %lld head %lld disagrees with its selection",
                        where, lc, (long long)i, (long long)h);
                nan_row[ilse(p, b, h, i)] = (uint8_t)isnan(lx);
                const int same_kv = b == t->b && g == t->g;
                int want_nan = 0; /* every out element and lse NaN */
                int want_col = 0; /* out[d] and lse NaN, the other columns equal */
                int may_col = 0;  /* out[d] and lse NaN, or all equal; the other columns equal */
                switch (t->kind) {
                case NAN_Q: want_nan = b == t->b && h == t->h && i == t->i; break;
                case NAN_K:
                case NAN_BIAS: want_nan = same_kv && sel(p, b, h, i, t->j); break;
                case NAN_V:
                    want_col = same_kv && sel(p, b, h, i, t->j);
                    may_col = same_kv && !want_col && !empty &&
                              in_window(p, b, g, i, t->j, FWD_ROWS);
                    break;
                case NAN_Q_EMPTY: break;
                }
                if (want_nan) {
                    for (int64_t d = 0; d < D; d++)
                        REQUIRE(isnan(ox[d]), "%s: row %lld head %lld out[%lld] = %g, want NaN",
                                where, (long long)i, (long long)h, (long long)d, ox[d]);
                    REQUIRE(isnan(lx), "%s: row %lld head %lld lse = %g, want NaN", where,
                            (long long)i, (long long)h, lx);
                    continue;
                }
                int col_nan = 0;
                if (want_col || may_col) {
                    col_nan = isnan(ox[t->d]);
                    REQUIRE(col_nan || !want_col, "%s: row %lld head %lld out[%lld] = %g, want NaN",
                            where, (long long)i, (long long)h, (long long)t->d, ox[t->d]);
                    REQUIRE(col_nan || same_bits(ox[t->d], oc[t->d]),
                            "%s: row %lld head %lld out[%lld] = %.9g, clean %.9g", where,
                            (long long)i, (long long)h, (long long)t->d, ox[t->d], oc[t->d]);
                }
                for (int64_t d = 0; d < D; d++)
                    REQUIRE((col_nan && d == t->d) || same_bits(ox[d], oc[d]),
                            "%s: row %lld head %lld out[%lld] = %.9g, clean %.9g", where,
                            (long long)i, (long long)h, (long long)d, ox[d], oc[d]);
                if (col_nan)
                    REQUIRE(isnan(lx), "%s: row %lld head %lld has a NaN out but lse = %g", where,
                            (long long)i, (long long)h, lx);
                else
                    REQUIRE(same_bits(lx, lc), "%s: row %lld head %lld lse = %.9g, clean %.9g",
                            where, (long long)i, (long long)h, lx, lc);
                if (empty) /* also 0 and -inf in the NaN run (equal to the clean run) */
                    for (int64_t d = 0; d < D; d++)
                        REQUIRE(ox[d] == 0.0f && lx == -INFINITY,
                                "%s: empty row %lld head %lld: out[%lld] = %g, lse = %g", where,
                                (long long)i, (long long)h, (long long)d, ox[d], lx);
            }

    /* Keys that a NaN row (NaN lse) selected: their dk, dv and dbias are NaN. */
    uint8_t *nan_key = test_calloc((size_t)(B * Hkv * Lk), 1);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t i = 0; i < Lq; i++)
                if (nan_row[ilse(p, b, h, i)])
                    for (int64_t j = 0; j < Lk; j++)
                        if (sel(p, b, h, i, j))
                            nan_key[ibias(p, b, group_of(p, h), j)] = 1;

    /* dq: NaN rows all NaN; empty rows 0; others equal, except that a NaN of K (column d) may
     * reach column d of rows whose item holds the key (0 * NaN in dS K). */
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t i = 0; i < Lq; i++) {
                const float *gc = c->dq + iq(p, b, i, h), *gx = x->dq + iq(p, b, i, h);
                const int empty = c->lse[ilse(p, b, h, i)] == -INFINITY;
                if (nan_row[ilse(p, b, h, i)]) {
                    for (int64_t d = 0; d < D; d++)
                        REQUIRE(isnan(gx[d]), "%s: NaN row %lld head %lld: dq[%lld] = %g", where,
                                (long long)i, (long long)h, (long long)d, gx[d]);
                    continue;
                }
                const int may = t->kind == NAN_K && b == t->b && group_of(p, h) == t->g &&
                                !empty && in_window(p, b, t->g, i, t->j, BWD_ROWS);
                for (int64_t d = 0; d < D; d++) {
                    REQUIRE(!empty || gx[d] == 0.0f, "%s: empty row %lld head %lld: dq[%lld] = %g",
                            where, (long long)i, (long long)h, (long long)d, gx[d]);
                    REQUIRE(same_bits(gx[d], gc[d]) || (may && d == t->d && isnan(gx[d])),
                            "%s: row %lld head %lld dq[%lld] = %.9g, clean %.9g", where,
                            (long long)i, (long long)h, (long long)d, gx[d], gc[d]);
                }
            }

    /* dk, dv, dbias: keys a NaN row selected are NaN; others equal, except that a NaN of q
     * (column d) may reach column d of dk of the keys its item holds (0 * NaN in dS^T Q). */
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < Hkv; g++)
            for (int64_t j = 0; j < Lk; j++) {
                const size_t o = ikv(p, b, j, g), ob = ibias(p, b, g, j);
                if (nan_key[ob]) {
                    for (int64_t d = 0; d < D; d++)
                        REQUIRE(isnan(x->dk[o + d]) && isnan(x->dv[o + d]),
                                "%s: key %lld kv head %lld (a NaN row's): dk[%lld] = %g, dv = %g",
                                where, (long long)j, (long long)g, (long long)d, x->dk[o + d],
                                x->dv[o + d]);
                    REQUIRE(isnan(x->dbias[ob]), "%s: key %lld kv head %lld: dbias = %g", where,
                            (long long)j, (long long)g, x->dbias[ob]);
                    continue;
                }
                const int may = t->kind == NAN_Q && b == t->b && g == t->g &&
                                in_window(p, b, g, t->i, j, BWD_ROWS);
                for (int64_t d = 0; d < D; d++) {
                    REQUIRE(same_bits(x->dk[o + d], c->dk[o + d]) ||
                                (may && d == t->d && isnan(x->dk[o + d])),
                            "%s: key %lld kv head %lld dk[%lld] = %.9g, clean %.9g", where,
                            (long long)j, (long long)g, (long long)d, x->dk[o + d], c->dk[o + d]);
                    REQUIRE(same_bits(x->dv[o + d], c->dv[o + d]),
                            "%s: key %lld kv head %lld dv[%lld] = %.9g, clean %.9g", where,
                            (long long)j, (long long)g, (long long)d, x->dv[o + d], c->dv[o + d]);
                }
                REQUIRE(same_bits(x->dbias[ob], c->dbias[ob]),
                        "%s: key %lld kv head %lld dbias = %.9g, clean %.9g", where, (long long)j,
                        (long long)g, x->dbias[ob], c->dbias[ob]);
            }

    /* The cases the rules are about happened at all. */
    switch (t->kind) {
    case NAN_Q:
    case NAN_K:
    case NAN_V:
    case NAN_BIAS:
        ck_assert_msg(nan_row[ilse(p, t->b, t->h, t->i)], "%s: the target row is not NaN", where);
        ck_assert_msg(nan_key[ibias(p, t->b, t->g, t->j)], "%s: the target key is not NaN", where);
        break;
    case NAN_Q_EMPTY:
        for (size_t r = 0; r < n_lse(p); r++)
            ck_assert_msg(!nan_row[r], "%s: a NaN row", where);
        break;
    }
    free(nan_row);
    free(nan_key);
}

/* The selected key in the middle of row (b, h, i)'s selection. */
static int64_t middle_key(const prob *p, int64_t b, int64_t h, int64_t i)
{
    int64_t n = 0;
    for (int64_t j = 0; j < p->cf->Lk; j++)
        n += sel(p, b, h, i, j);
    ck_assert_msg(n > 0, "row %lld head %lld selects nothing", (long long)i, (long long)h);
    for (int64_t j = 0, seen = 0; j < p->cf->Lk; j++)
        if (sel(p, b, h, i, j) && seen++ == n / 2)
            return j;
    return -1;
}

/* Every NaN case of one configuration, for every context and D in {24, 33}. */
static void run_config(const config *cf, uint64_t seed)
{
    static const int64_t DIMS[] = {24, 33};
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    for (size_t di = 0; di < sizeof DIMS / sizeof DIMS[0]; di++) {
        prob p;
        prob_make(&p, cf, DIMS[di], seed + di);
        const int64_t D = p.D, Lq = cf->Lq, Hq = cf->Hq;
        /* Rows: the first non-empty row of head 1 (in the tile of the empty rows, if any) and a
         * row of the last tile of head Hq - 2 (another kv head), at b = B - 1. */
        const int64_t b = cf->B - 1;
        int64_t first = 0;
        while (first < Lq && !row_selects_any(&p, b, 1, first))
            first++;
        ck_assert_msg(first < Lq - 3, "%s: no non-empty row", cf->name);
        const int64_t rows[2][2] = {{first, 1}, {Lq - 3, Hq - 2}};
        target targets[16];
        int nt = 0;
        for (int ri = 0; ri < 2; ri++) {
            const int64_t i = rows[ri][0], h = rows[ri][1], g = group_of(&p, h);
            const int64_t j = middle_key(&p, b, h, i);
            targets[nt++] = (target){NAN_Q, b, h, g, i, j, (i * 7) % D};
            targets[nt++] = (target){NAN_K, b, h, g, i, j, D - 1};
            targets[nt++] = (target){NAN_V, b, h, g, i, j, D / 2};
            targets[nt++] = (target){NAN_BIAS, b, h, g, i, j, 0};
        }
        if (first > 0) /* empty rows 0 .. first - 1 of head 1 */
            targets[nt++] = (target){NAN_Q_EMPTY, b, 1, group_of(&p, 1), first / 2, 0, D - 1};

        float *q = test_malloc(sizeof(float) * n_q(&p));
        float *k = test_malloc(sizeof(float) * n_kv(&p));
        float *v = test_malloc(sizeof(float) * n_kv(&p));
        float *bias = test_malloc(sizeof(float) * n_bias(&p));
        for (int ci = 0; ci < nctx; ci++) {
            result clean, dirty;
            result_alloc(&p, &clean);
            result_alloc(&p, &dirty);
            run(&p, &ctxs[ci], p.q, p.k, p.v, p.bias, &clean);
            for (size_t x = 0; x < n_lse(&p); x++)
                ck_assert_msg(!isnan(clean.lse[x]), "%s: NaN lse in the clean run", cf->name);
            for (int ti = 0; ti < nt; ti++) {
                const target *t = &targets[ti];
                memcpy(q, p.q, sizeof(float) * n_q(&p));
                memcpy(k, p.k, sizeof(float) * n_kv(&p));
                memcpy(v, p.v, sizeof(float) * n_kv(&p));
                memcpy(bias, p.bias, sizeof(float) * n_bias(&p));
                switch (t->kind) {
                case NAN_Q:
                case NAN_Q_EMPTY: q[iq(&p, t->b, t->i, t->h) + (size_t)t->d] = NAN; break;
                case NAN_K: k[ikv(&p, t->b, t->j, t->g) + (size_t)t->d] = NAN; break;
                case NAN_V: v[ikv(&p, t->b, t->j, t->g) + (size_t)t->d] = NAN; break;
                case NAN_BIAS: bias[ibias(&p, t->b, t->g, t->j)] = NAN; break;
                }
                run(&p, &ctxs[ci], q, k, v, bias, &dirty);
                check_nan_run(&p, &ctxs[ci], t, &clean, &dirty);
            }
            result_free(&clean);
            result_free(&dirty);
        }
        free(q);
        free(k);
        free(v);
        free(bias);
        prob_free(&p);
    }
    test_contexts_destroy(ctxs, nctx);
}

/* ---- tests ---- */

START_TEST(topk_causal)
{
    const config cf = {"topk w=10 causal", 1, 70, 90, 4, 2, 1, 0.0f, 1, 10, 0};
    run_config(&cf, 1001);
}
END_TEST

START_TEST(topk_softcap)
{
    const config cf = {"topk w=10 causal softcap 4", 1, 70, 90, 4, 2, 1, 4.0f, 1, 10, 0};
    run_config(&cf, 1002);
}
END_TEST

START_TEST(topk_one_key_two_chunks)
{
    /* window 1: a NaN in the only selected logit of a row is the whole chunk's max (the rare
     * branch); Lk > 256 keys make two chunks of the union */
    const config cf = {"topk w=1 causal Lk=300", 1, 70, 300, 4, 2, 1, 0.0f, 1, 1, 0};
    run_config(&cf, 1003);
}
END_TEST

START_TEST(dense_causal)
{
    const config cf = {"causal default", 1, 70, 90, 4, 2, 1, 0.0f, 0, 0, 0};
    run_config(&cf, 1004);
}
END_TEST

START_TEST(dense_two_chunks)
{
    /* non-causal over 300 keys: a row's NaN m carries from the first chunk into the second */
    const config cf = {"dense default Lk=300", 1, 70, 300, 4, 2, 0, 0.0f, 0, 0, 0};
    run_config(&cf, 1005);
}
END_TEST

START_TEST(empty_rows_topk)
{
    /* keys 0..29 are padding: rows 0..9 (which see keys <= i + 20) select nothing */
    const config cf = {"topk w=10 causal padded", 1, 70, 90, 4, 2, 1, 0.0f, 1, 10, 30};
    run_config(&cf, 1006);
}
END_TEST

START_TEST(empty_rows_causal)
{
    /* Lq > Lk, causal (bottom-right): rows 0..19 see no key */
    const config cf = {"causal default Lq > Lk", 1, 90, 70, 4, 2, 1, 0.0f, 0, 0, 0};
    run_config(&cf, 1007);
}
END_TEST

START_TEST(empty_rows_softcap_batch)
{
    /* two batches, softcap, padding: the poisoned rows are in the last batch */
    const config cf = {"topk w=6 padded softcap 2 B=2", 2, 70, 90, 4, 2, 1, 2.0f, 1, 6, 25};
    run_config(&cf, 1008);
}
END_TEST

static Suite *nan_suite(void)
{
    Suite *s = suite_create("nan");
    TCase *tc = tcase_create("nan");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, topk_causal);
    tcase_add_test(tc, topk_softcap);
    tcase_add_test(tc, topk_one_key_two_chunks);
    tcase_add_test(tc, dense_causal);
    tcase_add_test(tc, dense_two_chunks);
    tcase_add_test(tc, empty_rows_topk);
    tcase_add_test(tc, empty_rows_causal);
    tcase_add_test(tc, empty_rows_softcap_batch);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(nan_suite()); }

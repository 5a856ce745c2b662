/*
 * backward.c - attention backward over a sparsity object (DESIGN §3).
 *
 * Per work item (the forward's items) and chunk of the tile's union it recomputes P from the
 * saved lse, then  dP = dout V^T,  dS = P (dP - delta),  dQ += dS K  (rows are the item's own),
 * and  dK[U] += dS^T Q,  dV[U] += P^T dout,  dbias[U] += dS  into the item's private buffers.
 * Items run in waves (natural order, bounded memory); after each wave the private buffers are
 * added into dk, dv and dbias in item order, so every element is summed in the same order
 * whatever the thread count or the waves' sizes: results are bitwise reproducible.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "internal.h"

/* Private gradient buffers of one wave, in floats (16 MiB: they are still in the last-level
 * cache when the wave is reduced); a wave holds at least 2 items per thread. */
#define WAVE_BUDGET_FLOATS ((int64_t)4 << 20)

/* Row stride of the Q, dout and dQ panels: D rounded up to 16, plus 16 floats, for the same
 * reason as PS_LD (accum_tn walks 64 of their rows at a time). */
#define ROWS_LD(a) ((a)->ld + 16)

/* Row stride of the P and dS panels: one chunk plus 16 floats, so that walking down a column (as
 * accum_tn does) does not map every row to the same few L1 sets, as a 1 KiB stride would. */
#define PS_LD (DMA_CHUNK + 16)

typedef struct bwd {
    dma_attn a;
    const dma_tensor *dout, *dq, *dk, *dv, *dbias;
    bool per_row_bias;
} bwd;

/* The private buffers of an item: dk and dv [count_pad][ld], then dbias; placed at `offset`
 * floats into the buffer of the item's wave. */
typedef struct item_grads {
    float *dk, *dv, *dbias;
    int64_t offset, floats; /* place and size in the wave's buffer */
    int64_t count_pad, nbh; /* union rounded up to DMA_CHUNK; bias heads the item touches */
} item_grads;

static int64_t bias_head(const bwd *w, int64_t h) { return h / (w->a.Hq / w->dbias->shape[1]); }

/* Sizes of an item's private buffers. */
static void item_layout(const bwd *w, const dma_item *it, item_grads *g)
{
    dma_item_view iv;
    dma_item_view_init(&w->a, it, &iv);
    g->count_pad = dma_div_up(iv.tile->count, DMA_CHUNK) * DMA_CHUNK;
    g->nbh = w->dbias ? bias_head(w, iv.h0 + iv.nh - 1) - bias_head(w, iv.h0) + 1 : 0;
    int64_t n = 2 * g->count_pad * w->a.ld + g->nbh * (w->per_row_bias ? iv.nrows : 1) * g->count_pad;
    g->floats = (n + 15) / 16 * 16;
}

static size_t backward_scratch_floats(const dma_attn *a)
{
    int64_t M = DMA_HEADS_PER_ITEM * DMA_TILE;
    size_t n = (size_t)(3 * M * ROWS_LD(a) + 2 * DMA_CHUNK * a->ld + DMA_CHUNK * a->ld +
                        2 * M * PS_LD + DMA_HEADS_PER_ITEM * DMA_CHUNK + 2 * M + 64);
    return (n + 15) / 16 * 16;
}

static void backward_item(const bwd *w, const dma_item *it, item_grads *g, float *scratch)
{
    const dma_attn *a = &w->a;
    const dma_kernels *kern = a->kern;
    const int64_t D = a->D, ld = a->ld, qld = ROWS_LD(a), mr = kern->mr, nr = kern->nr;
    dma_item_view iv;
    dma_item_view_init(a, it, &iv);
    const int64_t M = iv.M, nrows = iv.nrows;

    float *Q = scratch;                     /* [M][qld] scaled queries */
    float *dO = Q + M * qld;                /* [M][qld] */
    float *dQ = dO + M * qld;               /* [M][qld] accumulates dS K */
    float *Kp = dQ + M * qld;               /* [DMA_CHUNK][D] K^T packed */
    float *Vt = Kp + DMA_CHUNK * ld;        /* [DMA_CHUNK][D] V^T packed */
    float *Kr = Vt + DMA_CHUNK * ld;        /* [DMA_CHUNK][ld] K rows */
    float *P = Kr + DMA_CHUNK * ld;         /* [M][PS_LD] */
    float *dS = P + M * PS_LD;              /* [M][PS_LD] */
    float *bias_buf = dS + M * PS_LD;       /* [heads][DMA_CHUNK] */
    float *row_lse = bias_buf + DMA_HEADS_PER_ITEM * DMA_CHUNK;
    float *row_delta = row_lse + M;
    float *ones = row_delta + M;            /* [mr] */

    dma_item_load_rows(a, it, &iv, a->q, a->scale, Q, qld);
    dma_item_load_rows(a, it, &iv, w->dout, 1.0f, dO, qld);
    memset(dQ, 0, sizeof(float) * (size_t)(M * qld));
    for (int64_t r = 0; r < mr; r++)
        ones[r] = 1.0f;
    for (int64_t hh = 0; hh < iv.nh; hh++)
        for (int64_t i = 0; i < nrows; i++) {
            int64_t r = hh * nrows + i, h = iv.h0 + hh, row = iv.r0 + i;
            row_lse[r] = f32(a->lse)[it->b * a->lse->stride[0] + h * a->lse->stride[1] +
                                     row * a->lse->stride[2]];
            const float *o = f32(a->out) + it->b * a->out->stride[0] +
                             row * a->out->stride[1] + h * a->out->stride[2];
            const float *d = dO + r * qld;
            float delta = 0.0f;
            for (int64_t x = 0; x < D; x++)
                delta += d[x] * o[x];
            row_delta[r] = delta;
        }
    const int64_t hb0 = w->dbias ? bias_head(w, iv.h0) : 0;

    for (int64_t c0 = 0; c0 < iv.tile->count; c0 += DMA_CHUNK) {
        const int64_t n = dma_min64(DMA_CHUNK, iv.tile->count - c0);
        const int64_t n_pad = dma_div_up(n, nr) * nr;
        /* The chunk's rows of the private dk/dv, zeroed here while they are about to be used. */
        memset(g->dk + c0 * ld, 0, sizeof(float) * (size_t)(n_pad * ld));
        memset(g->dv + c0 * ld, 0, sizeof(float) * (size_t)(n_pad * ld));
        if (!dma_chunk_active(&iv, c0, n))
            continue;
        const int32_t *keys = iv.keys ? iv.keys + c0 : NULL;
        const int32_t first = (int32_t)(iv.tile->first + c0);
        kern->pack_k(Kp, iv.kbase, a->k->stride[1], keys, first, (int)n, (int)D);
        kern->pack_k(Vt, iv.vbase, a->v->stride[1], keys, first, (int)n, (int)D);
        kern->pack_v(Kr, (int)ld, iv.kbase, a->k->stride[1], keys, first, (int)n, (int)D);
        if (a->bias && !w->per_row_bias)
            for (int64_t hh = 0; hh < iv.nh; hh++)
                dma_gather_key_bias(a, it, &iv, hh, c0, n, n_pad, bias_buf + hh * DMA_CHUNK);
        int64_t used_lo = n_pad, used_hi = 0; /* columns any block touched */
        /* Blocks of mr rows run across head boundaries, as in the forward. */
        for (int64_t row0 = 0; row0 < M; row0 += mr) {
            const int64_t m = dma_min64(mr, M - row0);
            int64_t ca = 0, cb = 0;
            bool active = dma_block_cols(&iv, row0, m, c0, n, nr, &ca, &cb);
            /* Rows of P and dS are zero outside [ca, cb): accum_tn reads whole columns. */
            for (int64_t r = 0; r < m; r++) {
                float *pr = P + (row0 + r) * PS_LD, *dr = dS + (row0 + r) * PS_LD;
                memset(pr, 0, sizeof(float) * (size_t)ca);
                memset(dr, 0, sizeof(float) * (size_t)ca);
                memset(pr + cb, 0, sizeof(float) * (size_t)(n_pad - cb));
                memset(dr + cb, 0, sizeof(float) * (size_t)(n_pad - cb));
            }
            if (!active)
                continue;
            used_lo = ca < used_lo ? ca : used_lo;
            used_hi = cb > used_hi ? cb : used_hi;
            float *Pb = P + row0 * PS_LD + ca, *dSb = dS + row0 * PS_LD + ca;
            kern->scores(Pb, PS_LD, Q + row0 * qld, (int)qld, (int)m, Kp + ca * D,
                         (int)(cb - ca), (int)D);
            kern->scores(dSb, PS_LD, dO + row0 * qld, (int)qld, (int)m, Vt + ca * D,
                         (int)(cb - ca), (int)D);
            for (int64_t r = 0; r < m; r++) {
                const int64_t hh = (row0 + r) / nrows, i = (row0 + r) % nrows;
                const float *brow = NULL;
                if (w->per_row_bias) {
                    brow = bias_buf;
                    dma_gather_row_bias(a, it, &iv, hh, i, c0, ca, cb, n, bias_buf);
                } else if (a->bias) {
                    brow = bias_buf + hh * DMA_CHUNK + ca;
                }
                float *dx_sum = NULL;
                if (w->dbias) {
                    int64_t hbi = bias_head(w, iv.h0 + hh) - hb0;
                    dx_sum = g->dbias + (w->per_row_bias ? hbi * nrows + i : hbi) *
                                            g->count_pad + c0 + ca;
                }
                int lo, hi;
                dma_row_span(&iv, i, c0, ca, cb, &lo, &hi);
                kern->grad_row(Pb + r * PS_LD, dSb + r * PS_LD, (int)(cb - ca), brow,
                               dma_row_bits(a, &iv, i), (int)(c0 + ca), lo, hi, a->softcap,
                               row_lse[row0 + r], row_delta[row0 + r], dx_sum);
            }
            /* dS is zero past n, and K rows past n were never packed: stop at n. */
            kern->accum_pv(dQ + row0 * qld, (int)qld, ones, dSb, PS_LD, (int)m, Kr + ca * ld,
                           (int)ld, (int)(dma_min64(cb, n) - ca), (int)D);
        }
        /* dK[U] += dS^T Q and dV[U] += P^T dO over all the item's rows, mr keys at a time. */
        for (int64_t c = used_lo; c < used_hi; c += mr) {
            const int64_t m = dma_min64(mr, used_hi - c);
            kern->accum_tn(g->dk + (c0 + c) * ld, (int)ld, dS + c, PS_LD, (int)m, Q, (int)qld,
                           (int)M, (int)D);
            kern->accum_tn(g->dv + (c0 + c) * ld, (int)ld, P + c, PS_LD, (int)m, dO, (int)qld,
                           (int)M, (int)D);
        }
    }

    for (int64_t hh = 0; hh < iv.nh; hh++)
        for (int64_t i = 0; i < nrows; i++) {
            float *dst = f32(w->dq) + it->b * w->dq->stride[0] + (iv.r0 + i) * w->dq->stride[1] +
                         (iv.h0 + hh) * w->dq->stride[2];
            const float *src = dQ + (hh * nrows + i) * qld;
            for (int64_t x = 0; x < D; x++)
                dst[x] = a->scale * src[x];
        }
}

/* Add a wave's private buffers into dk/dv columns [d0, d1), and (when `bias_part`) the dbias
 * entries this thread owns, always in item order. */
static void reduce_wave(const bwd *w, const dma_item *items, const item_grads *grads,
                        int64_t first, int64_t last, int64_t d0, int64_t d1, int part, int parts)
{
    const dma_attn *a = &w->a;
    for (int64_t x = first; x < last; x++) {
        const dma_item *it = &items[x];
        const item_grads *g = &grads[x];
        dma_item_view iv;
        dma_item_view_init(a, it, &iv);
        for (int64_t u = 0; u < iv.tile->count; u++) {
            int64_t key = dma_tile_key(a->sp, iv.tile, (int32_t)u);
            float *dk = f32(w->dk) + it->b * w->dk->stride[0] + key * w->dk->stride[1] +
                        iv.hkv * w->dk->stride[2];
            float *dv = f32(w->dv) + it->b * w->dv->stride[0] + key * w->dv->stride[1] +
                        iv.hkv * w->dv->stride[2];
            const float *gk = g->dk + u * a->ld, *gv = g->dv + u * a->ld;
            for (int64_t d = d0; d < d1; d++) {
                dk[d] += gk[d];
                dv[d] += gv[d];
            }
        }
        if (!w->dbias)
            continue;
        const dma_tensor *db = w->dbias;
        int64_t hb0 = bias_head(w, iv.h0);
        for (int64_t hbi = 0; hbi < g->nbh; hbi++) {
            int64_t rows = w->per_row_bias ? iv.nrows : 1;
            for (int64_t i = 0; i < rows; i++) {
                /* Per-key dbias belongs to part 0; per-row dbias rows are dealt round-robin. */
                if ((w->per_row_bias ? (iv.r0 + i) % parts : 0) != part)
                    continue;
                const float *src = g->dbias + (hbi * rows + i) * g->count_pad;
                for (int64_t u = 0; u < iv.tile->count; u++)
                    if (src[u] != 0.0f)
                        f32(db)[dma_offset4(db, it->b, hb0 + hbi, iv.r0 + i,
                                            dma_tile_key(a->sp, iv.tile, (int32_t)u))] += src[u];
            }
        }
    }
}

/* Zero a 4-D float tensor, one last-dimension row at a time (any strides). */
static void zero_tensor(const dma_tensor *t)
{
    for (int64_t a = 0; a < t->shape[0]; a++)
        for (int64_t b = 0; b < t->shape[1]; b++)
            for (int64_t c = 0; c < t->shape[2]; c++)
                memset(f32(t) + a * t->stride[0] + b * t->stride[1] + c * t->stride[2], 0,
                       sizeof(float) * (size_t)t->shape[3]);
}

static dma_status check_grad(dma_context *ctx, const char *name, const dma_tensor *g,
                             const dma_tensor *like)
{
    if (!g)
        return dma_fail(ctx, DMA_ERR_NULL, "backward: %s is required", name);
    dma_status st = dma_check_tensor(ctx, name, g, DMA_F32, 4);
    if (st != DMA_OK)
        return st;
    for (int d = 0; d < 4; d++)
        if (g->shape[d] != like->shape[d])
            return dma_fail(ctx, DMA_ERR_SHAPE, "backward: %s differs in dimension %d from the "
                            "tensor it is the gradient of", name, d);
    return DMA_OK;
}

dma_status dma_backward(dma_context *ctx, const dma_tensor *q, const dma_tensor *k,
                        const dma_tensor *v, const dma_tensor *bias, const dma_sparsity *sp,
                        const dma_attn_params *params, const dma_tensor *out,
                        const dma_tensor *lse, const dma_tensor *dout, dma_tensor *dq,
                        dma_tensor *dk, dma_tensor *dv, dma_tensor *dbias)
{
    if (!ctx)
        return DMA_ERR_NULL;
    if (!lse)
        return dma_fail(ctx, DMA_ERR_NULL, "backward: lse (from the forward) is required");
    bwd w = {.dout = dout, .dq = dq, .dk = dk, .dv = dv, .dbias = dbias};
    dma_status st = dma_attn_check(ctx, q, k, v, bias, sp, params, out, lse, &w.a);
    if (st != DMA_OK)
        return st;
    if ((st = check_grad(ctx, "dout", dout, q)) || (st = check_grad(ctx, "dq", dq, q)) ||
        (st = check_grad(ctx, "dk", dk, k)) || (st = check_grad(ctx, "dv", dv, v)))
        return st;
    if (dbias) {
        if (!bias)
            return dma_fail(ctx, DMA_ERR_NULL, "backward: dbias needs the bias it is the "
                            "gradient of");
        if ((st = check_grad(ctx, "dbias", dbias, bias)))
            return st;
    }
    w.per_row_bias = bias && bias->shape[2] != 1;
    if ((st = dma_attn_prepare(ctx, &w.a)) != DMA_OK)
        return st;

    dma_item *items = NULL;
    int64_t nitems = 0;
    float *scratch = NULL, *wave_buf = NULL;
    item_grads *grads = NULL;
    int64_t *wave_end = NULL, nwaves = 0, wave_floats = 0;
    if ((st = dma_attn_items(ctx, &w.a, &items, &nitems)) != DMA_OK)
        goto done;
    /* Waves: consecutive items, closed once the budget is reached and every thread has two
     * items. Any grouping gives the same results: each element of dk, dv and dbias receives
     * its contributions in item order, wave after wave. */
    int threads = (int)dma_max64(1, ctx->threads);
    wave_end = malloc(sizeof(int64_t) * (size_t)(nitems + 1));
    grads = malloc(sizeof(item_grads) * (size_t)(nitems + 1));
    if (!wave_end || !grads) {
        st = dma_fail(ctx, DMA_ERR_NOMEM, "backward: out of memory");
        goto done;
    }
    for (int64_t x = 0; x < nitems; x++)
        item_layout(&w, &items[x], &grads[x]);
    for (int64_t x = 0, start = 0, floats = 0; x < nitems; x++) {
        grads[x].offset = floats;
        floats += grads[x].floats;
        if (x + 1 == nitems || (x + 1 - start >= 2 * threads &&
                                floats + grads[x + 1].floats > WAVE_BUDGET_FLOATS)) {
            wave_end[nwaves++] = x + 1;
            wave_floats = floats > wave_floats ? floats : wave_floats;
            start = x + 1;
            floats = 0;
        }
    }
    size_t per_thread = backward_scratch_floats(&w.a);
    scratch = dma_alloc(sizeof(float) * per_thread * (size_t)threads);
    /* Two wave buffers: wave k + 1 computes into one while wave k is reduced from the other. */
    wave_buf = dma_alloc(sizeof(float) * (size_t)(2 * wave_floats));
    if (!scratch || !wave_buf) {
        st = dma_fail(ctx, DMA_ERR_NOMEM, "backward: out of memory for scratch");
        goto done;
    }
    for (int64_t wv = 0; wv < nwaves; wv++)
        for (int64_t x = wv ? wave_end[wv - 1] : 0; x < wave_end[wv]; x++) {
            item_grads *g = &grads[x];
            g->dk = wave_buf + (wv % 2) * wave_floats + g->offset;
            g->dv = g->dk + g->count_pad * w.a.ld;
            g->dbias = g->dv + g->count_pad * w.a.ld;
        }

    zero_tensor(dk);
    zero_tensor(dv);
    if (dbias)
        zero_tensor(dbias);
    if (nitems == 0)
        goto done;
    /* Tasks: the items of a wave compute in any order on any thread; once they are all done,
     * one reduction task per slice of D columns adds the wave into dk/dv/dbias, overlapping
     * with the next wave's items. The taskwait before each wave's reductions also waits for the
     * previous wave's, so every element still receives its contributions in item order. */
#pragma omp parallel num_threads(threads)
#pragma omp single
    for (int64_t wv = 0; wv < nwaves; wv++) {
        const int64_t first = wv ? wave_end[wv - 1] : 0, last = wave_end[wv];
        for (int64_t x = first; x < last; x++) {
#pragma omp task firstprivate(x)
            {
                float *mine = scratch + per_thread * (size_t)omp_get_thread_num();
                item_grads *g = &grads[x];
                memset(g->dbias, 0, sizeof(float) * (size_t)(g->floats - (g->dbias - g->dk)));
                backward_item(&w, &items[x], g, mine);
            }
        }
#pragma omp taskwait
        for (int part = 0; part < threads; part++) {
#pragma omp task firstprivate(part)
            reduce_wave(&w, items, grads, first, last, w.a.D * part / threads,
                        w.a.D * (part + 1) / threads, part, threads);
        }
    }
done:
    free(items);
    free(wave_end);
    free(grads);
    dma_free(scratch);
    dma_free(wave_buf);
    dma_attn_release(&w.a);
    return st;
}

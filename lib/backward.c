/*
 * backward.c - attention backward over a sparsity object (DESIGN §3): the work items.
 *
 * A work item is one of the forward's items, or two consecutive tiles of the same heads over
 * their merged union (see "Pairs" in backward_turns.c). Per work item and chunk of its union it
 * recomputes P from the saved lse, then  dP = dout V^T,  dS = P (dP - delta),  dQ += dS K  (rows
 * are the item's own), and  dK[U] += dS^T Q,  dV[U] += P^T dout,  dbias[U] += dS  into the
 * item's private buffers.
 * Items add their private buffers into dk, dv and dbias in turn: turns follow item order, last
 * tile first, within each stream of items that add into the same elements, so every element is
 * summed in the same order whatever the thread count (results are bitwise reproducible). Once an
 * item's turn has come it adds each chunk as soon as the chunk is done, while its rows are in
 * cache. An item finished before its turn is parked in one of its thread's few buffer slots, and
 * whoever passes the turn to it adds it, so that no thread waits for a turn. The spans, streams,
 * turns and parking are backward_turns.c's.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "backward.h"

/* Row stride of the Q, dout and dQ panels: D rounded up to 16, plus 16 floats, for the same
 * reason as PS_LD (accum_tn walks 64 of their rows at a time). */
#define ROWS_LD(a) ((a)->ld + 16)

/* Row stride of the P and dS panels: one chunk plus 16 floats, so that walking down a column (as
 * accum_tn does) does not map every row to the same few L1 sets, as a 1 KiB stride would. */
#define PS_LD (DMA_CHUNK + 16)

/* Columns of D and rows of Q per call of accum_tn: DB is a multiple of 16 (the kernels round D
 * up to 16, so a block must not end inside a group of 16) and wide enough for the widest
 * register block (AVX-512: 64 floats); a DB x TN_ROWS block of Q is 16 KiB, which stays in L1
 * while every used key of the chunk runs past it. Where the kernel table's tn_rows allows,
 * two such blocks go to one call (tn_calls). */
#define DB 64
#define TN_ROWS 64

/* Rows whose P and dS a chunk holds at once (groups are balanced, so a group may have mr - 1
 * more; P_ROWS leaves room): bounds those panels to 2 x 289 KiB. */
#define GROUP_ROWS 256
#define P_ROWS (GROUP_ROWS + 16)

static int64_t bias_head(const bwd *w, int64_t h) { return h / (w->a.Hq / w->dbias->shape[1]); }

/* Sizes of an item's private buffers. */
void dma_bwd_item_layout(const bwd *w, const dma_item_view *iv, item_grads *g)
{
    g->count_pad = dma_div_up(iv->count, DMA_CHUNK) * DMA_CHUNK;
    g->nbh = w->dbias ? bias_head(w, iv->h0 + iv->nh - 1) - bias_head(w, iv->h0) + 1 : 0;
    int64_t rows = w->per_row_bias ? iv->nrows : 1;
    int64_t n = 2 * g->count_pad * w->a.ld + g->nbh * rows * g->count_pad;
    g->floats = (n + 15) / 16 * 16;
}

/* Floats of per-thread panels backward_item() uses. */
static size_t backward_scratch_floats(const dma_attn *a)
{
    size_t n = (size_t)(3 * BWD_ROWS * ROWS_LD(a) + 3 * DMA_CHUNK * a->ld +
                        2 * P_ROWS * PS_LD + DMA_HEADS_PER_ITEM * DMA_CHUNK + 2 * BWD_ROWS +
                        64);
    return (n + 15) / 16 * 16;
}

static inline float *grad_row_of(const dma_tensor *t, int64_t b, int64_t key, int64_t h)
{
    return f32(t) + b * t->stride[0] + key * t->stride[1] + h * t->stride[2];
}

/* Ask for the dk and dv rows of union position u to be brought into the cache: the rows of a
 * union are scattered over the sequence, so the hardware cannot guess them. Always inlined: GCC
 * takes a function whose only effect is prefetching for one without effect, and drops its
 * calls. */
static inline __attribute__((always_inline)) void
prefetch_rows(const bwd *w, const dma_item *it, const dma_item_view *iv, int64_t u)
{
    int64_t key = dma_view_key(iv, u);
    const char *pk = (const char *)grad_row_of(w->dk, it->b, key, iv->hkv);
    const char *pv = (const char *)grad_row_of(w->dv, it->b, key, iv->hkv);
    for (int64_t byte = 0; byte < w->a.D * 4; byte += 64) {
        __builtin_prefetch(pk + byte, 0, 2);
        __builtin_prefetch(pv + byte, 0, 2);
    }
}

/* Zero the private dk/dv rows [u0, u1) (u0 > u1 does nothing). */
static void zero_rows(const item_grads *g, int64_t u0, int64_t u1, int64_t ld)
{
    if (u1 <= u0)
        return;
    memset(g->dk + u0 * ld, 0, sizeof(float) * (size_t)((u1 - u0) * ld));
    memset(g->dv + u0 * ld, 0, sizeof(float) * (size_t)((u1 - u0) * ld));
}

/* Keys ahead whose dk/dv rows dma_bwd_reduce_range() prefetches. */
#define REDUCE_AHEAD 4

/* Add positions [u0, u1) of an item's private buffers into dk, dv and dbias. */
void dma_bwd_reduce_range(const bwd *w, const dma_item *it, const dma_item_view *iv,
                          const item_grads *g, int64_t u0, int64_t u1)
{
    const dma_attn *a = &w->a;
    for (int64_t u = u0; u < u1; u++) {
        if (u + REDUCE_AHEAD < u1)
            prefetch_rows(w, it, iv, u + REDUCE_AHEAD);
        int64_t key = dma_view_key(iv, u);
        float *dk = grad_row_of(w->dk, it->b, key, iv->hkv);
        float *dv = grad_row_of(w->dv, it->b, key, iv->hkv);
        const float *gk = g->dk + u * a->ld, *gv = g->dv + u * a->ld;
        float *dst[2] = {dk, dv};
        const float *src[2] = {gk, gv};
        a->kern->add_rows(dst, src, 2, (int)a->D);
    }
    if (!w->dbias)
        return;
    const dma_tensor *db = w->dbias;
    const int64_t hb0 = bias_head(w, iv->h0), rows = w->per_row_bias ? iv->nrows : 1;
    for (int64_t hbi = 0; hbi < g->nbh; hbi++)
        for (int64_t i = 0; i < rows; i++) {
            const float *src = g->dbias + (hbi * rows + i) * g->count_pad;
            for (int64_t u = u0; u < u1; u++)
                if (src[u] != 0.0f)
                    f32(db)[dma_offset4(db, it->b, hb0 + hbi, iv->r0 + i,
                                        dma_view_key(iv, u))] += src[u];
        }
}

/* The chunk columns [*ca, *cb) that the blocks of mr rows holding rows [r0, r1) cover, given
 * each block's [blk_ca, blk_cb) (empty where blk_cb <= blk_ca); *ca = n_pad, *cb = 0 if none. */
static void rows_cols(const int64_t *blk_ca, const int64_t *blk_cb, int64_t mr, int64_t n_pad,
                      int64_t r0, int64_t r1, int64_t *ca, int64_t *cb)
{
    *ca = n_pad;
    *cb = 0;
    for (int64_t b = r0 / mr; b < dma_div_up(r1, mr); b++)
        if (blk_cb[b] > blk_ca[b]) {
            *ca = dma_min64(*ca, blk_ca[b]);
            *cb = dma_max64(*cb, blk_cb[b]);
        }
}

/* One call of accum_tn: rows [r0, r1) of the group, over chunk columns [ca, cb). */
typedef struct tn_call {
    int64_t r0, r1, ca, cb;
} tn_call;

/* The accum_tn calls over a group's rows [g0, g1): blocks of TN_ROWS rows, each over the
 * columns its blocks of mr rows cover. With tn_rows > TN_ROWS, neighbouring blocks that cover
 * the same columns (the query heads of a kv head sharing a selection, or rows in the middle
 * of a union) share a call, which loads and stores its output rows once for all of them.
 * Blocks whose columns differ stay apart, so no call computes more products than before.
 * Returns the number of calls. */
static int tn_calls(const int64_t *blk_ca, const int64_t *blk_cb, int64_t mr, int64_t n_pad,
                    int64_t g0, int64_t g1, int64_t tn_rows, tn_call *calls)
{
    int n = 0;
    for (int64_t r0 = g0; r0 < g1; r0 += TN_ROWS) {
        tn_call c = {.r0 = r0, .r1 = dma_min64(g1, r0 + TN_ROWS)};
        rows_cols(blk_ca, blk_cb, mr, n_pad, c.r0, c.r1, &c.ca, &c.cb);
        tn_call *last = n > 0 ? &calls[n - 1] : NULL;
        if (last && c.r1 - last->r0 <= tn_rows && c.ca == last->ca && c.cb == last->cb)
            last->r1 = c.r1;
        else
            calls[n++] = c;
    }
    return n;
}

/* Ask for row r of dout and out (which 0) or of q (1): the span's first products run while
 * they arrive (loading every row up front left the span waiting on memory). */
static inline __attribute__((always_inline)) void
prefetch_row(const bwd *w, const dma_item *it, const dma_item_view *iv, int which, int64_t r)
{
    if (which == 0) {
        dma_prefetch_rows(&w->a, it, iv, w->dout, false, r, r + 1);
        dma_prefetch_rows(&w->a, it, iv, w->a.out, false, r, r + 1);
    } else {
        dma_prefetch_rows(&w->a, it, iv, w->a.q, false, r, r + 1);
    }
}

/* Rows [r0, r1) of q, scaled, into Q. */
static void load_q(const bwd *w, const dma_item *it, const dma_item_view *iv,
                   const float *row_lse, float *Q, int64_t qld, int64_t r0, int64_t r1)
{
    dma_item_load_rows_range(&w->a, it, iv, w->a.q, w->a.scale, Q, qld, r0, r1);
    for (int64_t r = r0; r < r1; r++)
        if (row_lse[r] == -INFINITY) /* see load_dout */
            memset(Q + r * qld, 0, sizeof(float) * (size_t)qld);
}

/* Rows [r0, r1) of dout into dO, and their delta = rowsum(dout * out). */
static void load_dout(const bwd *w, const dma_item *it, const dma_item_view *iv,
                      const float *row_lse, float *dO, int64_t qld, float *row_delta, int64_t r0,
                      int64_t r1)
{
    const dma_attn *a = &w->a;
    const int64_t D = a->D;
    dma_item_load_rows_range(a, it, iv, w->dout, 1.0f, dO, qld, r0, r1);
    for (int64_t r = r0; r < r1; r++) {
        if (row_lse[r] == -INFINITY)
            /* A row that selected nothing (a NaN lse is not one): its P and dS are 0, and zero
             * q and dout rows keep a non-finite q or dout of it out of dK and dV, where
             * 0 * NaN would reach every key of the union. */
            memset(dO + r * qld, 0, sizeof(float) * (size_t)qld);
        const int64_t o_off = dma_item_row_offset(a->out, it, iv, r);
        float o_row[DMA_MAX_HEAD_DIM];
        const float *o = f32(a->out) + o_off;
        if (a->out->dtype != DMA_F32) {
            a->kern->to_f32(o_row, (const uint16_t *)a->out->data + o_off, D,
                            a->out->dtype == DMA_F16);
            o = o_row;
        }
        const float *d = dO + r * qld;
        float delta = 0.0f;
        /* in vector lanes: one serial chain of D adds would cost more than the row's copy */
#pragma omp simd reduction(+ : delta)
        for (int64_t e = 0; e < D; e++)
            delta += d[e] * o[e];
        row_delta[r] = delta;
    }
}

/* Span x's gradients over the view `iv` (one tile, or a pair merged). Each chunk's private
 * dk/dv rows are added into dk/dv as soon as the chunk is done (while they are still in cache)
 * once the span's turn has come; returns the end of the positions [0, end) left to add at its
 * turn (commit). */
static int64_t backward_item(const bwd *w, const turn_plan *plan, int64_t x,
                             const dma_item_view *iv, item_grads *g, float *scratch)
{
    const dma_item *it = &w->items[plan->span_item[x]];
    const dma_attn *a = &w->a;
    const dma_kernels *kern = a->kern;
    const int64_t D = a->D, ld = a->ld, qld = ROWS_LD(a), mr = kern->mr, nr = kern->nr;
    const int64_t pv_rows = kern->pv_rows;
    const int64_t M = iv->M, nrows = iv->nrows;

    float *Q = scratch;                     /* [M][qld] scaled queries */
    float *dO = Q + BWD_ROWS * qld;         /* [M][qld] */
    float *dQ = dO + BWD_ROWS * qld;        /* [M][qld] accumulates dS K */
    float *Kp = dQ + BWD_ROWS * qld;        /* [DMA_CHUNK][D] K^T packed */
    float *Vt = Kp + DMA_CHUNK * ld;        /* [DMA_CHUNK][D] V^T packed */
    float *Kr = Vt + DMA_CHUNK * ld;        /* [DMA_CHUNK][ld] K rows */
    float *P = Kr + DMA_CHUNK * ld;         /* [P_ROWS][PS_LD], a group of rows at a time */
    float *dS = P + P_ROWS * PS_LD;         /* [P_ROWS][PS_LD] */
    float *bias_buf = dS + P_ROWS * PS_LD;  /* [heads][DMA_CHUNK] */
    float *row_lse = bias_buf + DMA_HEADS_PER_ITEM * DMA_CHUNK;
    float *row_delta = row_lse + BWD_ROWS;
    float *ones = row_delta + BWD_ROWS;     /* [mr] */

    memset(dQ, 0, sizeof(float) * (size_t)(M * qld));
    for (int64_t r = 0; r < mr; r++)
        ones[r] = 1.0f;
    for (int64_t hh = 0; hh < iv->nh; hh++)
        for (int64_t i = 0; i < nrows; i++) {
            int64_t r = hh * nrows + i, h = iv->h0 + hh, row = iv->r0 + i;
            row_lse[r] = f32(a->lse)[it->b * a->lse->stride[0] + h * a->lse->stride[1] +
                                     row * a->lse->stride[2]];
        }
    /* Rows are loaded group by group as the first active chunk reaches them: q before the
     * group's S, dout (and delta) before its dP, each asked for while earlier products run. */
    int64_t loaded = 0; /* rows [0, loaded) of Q, dO and row_delta are loaded */
    const int64_t hb0 = w->dbias ? bias_head(w, iv->h0) : 0;
    /* Blocks of mr rows run across head boundaries, as in the forward; groups of them (as many
     * as the rows need for groups of about GROUP_ROWS, balanced) share the P and dS panels. */
    const int64_t nblocks = dma_div_up(M, mr);
    const int64_t group_blocks = dma_div_up(nblocks, dma_div_up(M, GROUP_ROWS)); /* balanced */
    int64_t deferred = 0; /* positions [0, deferred) are left to the caller */
    bool direct = false;   /* the turn has come: chunks are added here */
    int64_t blk_ca[BWD_ROWS], blk_cb[BWD_ROWS];

    for (int64_t c0 = 0; c0 < iv->count; c0 += DMA_CHUNK) {
        const int64_t n = dma_min64(DMA_CHUNK, iv->count - c0);
        const int64_t n_pad = dma_div_up(n, nr) * nr;
        if (!dma_chunk_active(iv, c0, n)) {
            if (!direct) { /* zeros: added with the rest */
                zero_rows(g, c0, c0 + n_pad, ld);
                deferred = c0 + n;
            }
            continue;
        }
        const int32_t *keys = iv->keys ? iv->keys + c0 : NULL;
        const int32_t first = (int32_t)(iv->first + c0);
        if (a->k->dtype == DMA_F32) {
            kern->pack_k(Kp, iv->kbase, a->k->stride[1], keys, first, (int)n, (int)D);
            kern->pack_k(Vt, iv->vbase, a->v->stride[1], keys, first, (int)n, (int)D);
            kern->pack_v(Kr, (int)ld, iv->kbase, a->k->stride[1], keys, first, (int)n, (int)D);
        } else { /* 16-bit storage, converted as it is packed */
            const int f16 = a->k->dtype == DMA_F16;
            kern->pack_k_half(Kp, (const uint16_t *)a->k->data + iv->koff, a->k->stride[1], keys,
                              first, (int)n, (int)D, f16);
            kern->pack_k_half(Vt, (const uint16_t *)a->v->data + iv->voff, a->v->stride[1], keys,
                              first, (int)n, (int)D, f16);
            dma_gather_rows(a, a->k, iv->koff, keys, first, (int)n, Kr, (int)ld);
        }
        if (a->bias && !w->per_row_bias)
            for (int64_t hh = 0; hh < iv->nh; hh++)
                dma_gather_key_bias(a, it, iv, hh, c0, n, n_pad, bias_buf + hh * DMA_CHUNK);
        /* The columns [ca, cb) of the chunk each block covers; a block's rows of P and dS are
         * zero outside them, since accum_tn reads whole columns. */
        for (int64_t b = 0; b < nblocks; b++)
            if (!dma_block_cols(iv, b * mr, dma_min64(mr, M - b * mr), c0, n, kern->select_step,
                                &blk_ca[b], &blk_cb[b]))
                blk_ca[b] = blk_cb[b] = 0;
            else /* scores runs whole packed blocks from a multiple of nr */
                blk_ca[b] = blk_ca[b] / nr * nr;
        int64_t used_lo, used_hi; /* columns any block covers */
        rows_cols(blk_ca, blk_cb, mr, n_pad, 0, M, &used_lo, &used_hi);
        /* Private rows no block covers stay zero; accum_tn writes the others. */
        zero_rows(g, c0, c0 + used_lo, ld);
        zero_rows(g, c0 + used_hi, c0 + n_pad, ld);

        for (int64_t b0 = 0; b0 < nblocks; b0 += group_blocks) {
            const int64_t b1 = dma_min64(nblocks, b0 + group_blocks);
            const int64_t g0 = b0 * mr, g1 = dma_min64(M, b1 * mr); /* the group's rows */
            for (int64_t b = b0; b < b1; b++) {
                const int64_t row0 = b * mr - g0, m = dma_min64(mr, M - b * mr);
                for (int64_t r = 0; r < m; r++) {
                    float *pr = P + (row0 + r) * PS_LD, *dr = dS + (row0 + r) * PS_LD;
                    memset(pr, 0, sizeof(float) * (size_t)blk_ca[b]);
                    memset(dr, 0, sizeof(float) * (size_t)blk_ca[b]);
                    memset(pr + blk_cb[b], 0, sizeof(float) * (size_t)(n_pad - blk_cb[b]));
                    memset(dr + blk_cb[b], 0, sizeof(float) * (size_t)(n_pad - blk_cb[b]));
                }
            }
            /* The loops below run over the operand that stays in L1 on the outside: one packed
             * panel of nr keys (scores) or one block of Q or dout (accum_tn), while the rows of
             * the other operand stream past it. */
            const bool first = loaded < g1; /* the span's first active chunk reaches the group */
            if (first)
                load_q(w, it, iv, row_lse, Q, qld, g0, g1);
            /* S = Q K^T and dP = dout V^T, one panel of nr keys at a time. Rows to ask for, one
             * per product: in pass 0 the group's dout, in pass 1 the next group's q. */
            int64_t ask = first ? g0 : g1, ask_end = g1;
            for (int pass = 0; pass < 2; pass++) {
                float *dst = pass ? dS : P;
                const float *rows = pass ? dO : Q, *panel = pass ? Vt : Kp;
                if (pass == 1) {
                    if (first) {
                        load_dout(w, it, iv, row_lse, dO, qld, row_delta, g0, g1);
                        loaded = g1;
                    }
                    ask = loaded;
                    ask_end = dma_min64(M, (b1 + group_blocks) * mr);
                }
                for (int64_t c = used_lo; c < used_hi; c += nr)
                    for (int64_t b = b0; b < b1; b++)
                        if (blk_ca[b] <= c && c < blk_cb[b]) {
                            if (ask < ask_end)
                                prefetch_row(w, it, iv, pass, ask++);
                            kern->scores(dst + (b * mr - g0) * PS_LD + c, PS_LD,
                                         rows + b * mr * qld, (int)qld,
                                         (int)dma_min64(mr, M - b * mr), panel + c * D,
                                         (int)dma_min64(nr, blk_cb[b] - c), (int)D);
                        }
            }
            /* P and dS, row by row. */
            for (int64_t b = b0; b < b1; b++) {
                const int64_t row0 = b * mr, m = dma_min64(mr, M - row0);
                const int64_t ca = blk_ca[b], cb = blk_cb[b];
                if (cb <= ca)
                    continue;
                for (int64_t r = 0; r < m; r++) {
                    const int64_t hh = (row0 + r) / nrows, i = (row0 + r) % nrows;
                    const float *brow = NULL;
                    if (w->per_row_bias) {
                        brow = bias_buf;
                        dma_gather_row_bias(a, it, iv, hh, i, c0, ca, cb, n, bias_buf);
                    } else if (a->bias) {
                        brow = bias_buf + hh * DMA_CHUNK + ca;
                    }
                    float *dx_sum = NULL;
                    if (w->dbias) {
                        int64_t hbi = bias_head(w, iv->h0 + hh) - hb0;
                        dx_sum = g->dbias + (w->per_row_bias ? hbi * nrows + i : hbi) *
                                                g->count_pad + c0 + ca;
                    }
                    int lo, hi;
                    dma_row_span(iv, i, c0, ca, cb, &lo, &hi);
                    float *prow = P + (row0 - g0 + r) * PS_LD + ca;
                    float *dsrow = dS + (row0 - g0 + r) * PS_LD + ca;
                    kern->grad_row(prow, dsrow, (int)(cb - ca), brow, dma_row_bits(iv, i),
                                   (int)(c0 + ca), lo, hi, a->softcap, row_lse[row0 + r],
                                   row_delta[row0 + r], dx_sum);
                }
            }
            /* dQ += dS K, in blocks of the kernel's best row count (pv_rows <= mr) over the
             * columns of the blocks of mr rows they overlap: a row's dS is zero outside its
             * own block's columns. dS is zero past n, and K rows past n were never packed:
             * stop at n. */
            for (int64_t r = g0; r < g1; r += pv_rows) {
                const int64_t m = dma_min64(pv_rows, g1 - r);
                int64_t ca, cb;
                rows_cols(blk_ca, blk_cb, mr, n_pad, r, r + m, &ca, &cb);
                cb = dma_min64(cb, n);
                if (cb > ca)
                    kern->accum_pv(dQ + r * qld, (int)qld, ones, dS + (r - g0) * PS_LD + ca,
                                   PS_LD, (int)m, Kr + ca * ld, (int)ld, (int)(cb - ca), (int)D);
            }
            /* dK[U] (+)= dS^T Q and dV[U] (+)= P^T dout over the group's rows, in blocks of DB
             * columns and TN_ROWS (or tn_rows) rows of Q (or dout): the kernel runs the keys the
             * block's rows select (the columns its blocks of mr rows cover: the rows of a pair's
             * first tile skip the keys only its second selects) past that block, which stays in
             * L1. The chunk's first call overwrites its columns of the private rows; the used
             * columns it does not cover are zeroed first, for the other calls to add into. */
            tn_call calls[BWD_ROWS / TN_ROWS + 1];
            const int ncalls = tn_calls(blk_ca, blk_cb, mr, n_pad, g0, g1, kern->tn_rows, calls);
            if (g0 == 0) { /* zero what the overwrite leaves */
                if (calls[0].cb <= calls[0].ca)
                    calls[0].ca = calls[0].cb = used_lo;
                zero_rows(g, c0 + used_lo, c0 + calls[0].ca, ld);
                zero_rows(g, c0 + calls[0].cb, c0 + used_hi, ld);
            }
            for (int pass = 0; pass < 2; pass++) {
                float *dst = pass ? g->dv : g->dk;
                const float *weights = pass ? P : dS, *rows = pass ? dO : Q;
                for (int64_t d0 = 0; d0 < ld; d0 += DB)
                    for (int t = 0; t < ncalls; t++) {
                        const tn_call *c = &calls[t];
                        if (c->cb > c->ca)
                            kern->accum_tn(dst + (c0 + c->ca) * ld + d0, (int)ld,
                                           weights + (c->r0 - g0) * PS_LD + c->ca, PS_LD,
                                           (int)(c->cb - c->ca), rows + c->r0 * qld + d0,
                                           (int)qld, (int)(c->r1 - c->r0),
                                           (int)dma_min64(DB, ld - d0), c->r0 == 0);
                    }
            }
        }
        /* Until the turn comes every chunk is left to the caller, so [0, deferred) is a prefix.
         * Once it has come, each chunk is added as soon as it is done, while in cache. */
        if (direct || (direct = dma_bwd_my_turn(plan, x)))
            dma_bwd_reduce_range(w, it, iv, g, c0, c0 + n);
        else
            deferred = c0 + n;
    }

    for (int64_t r = 0; r < M; r++) {
        float *dst = f32(w->dq) + dma_item_row_offset(w->dq, it, iv, r);
        if (row_lse[r] == -INFINITY) /* 0, not 0 * K (a NaN in K of the union) */
            memset(dst, 0, sizeof(float) * (size_t)D);
        else
            kern->scale_row(dst, dQ + r * qld, a->scale, (int)D);
    }
    return deferred;
}

/* Zero part `part` of `parts` of a 4-D float tensor's last-dimension rows (any strides). */
static void zero_tensor_part(const dma_tensor *t, int part, int parts)
{
    const int64_t n1 = t->shape[1], n2 = t->shape[2], rows = t->shape[0] * n1 * n2;
    for (int64_t r = rows * part / parts; r < rows * (part + 1) / parts; r++) {
        const int64_t a = r / (n1 * n2), b = r / n2 % n1, c = r % n2;
        memset(f32(t) + a * t->stride[0] + b * t->stride[1] + c * t->stride[2], 0,
               sizeof(float) * (size_t)t->shape[3]);
    }
}

/* dk, dv and dbias start at zero (items add into them): zero part `part` of `parts` of them, so
 * that the threads share the 2 * Lk * Hkv * D floats (32 MiB at the bench's shape). */
static void zero_grads(const bwd *w, int part, int parts)
{
    zero_tensor_part(w->dk, part, parts);
    zero_tensor_part(w->dv, part, parts);
    if (w->dbias)
        zero_tensor_part(w->dbias, part, parts);
}

/* g must exist, have `like`'s shape and the element type `dtype`. */
static dma_status check_grad(dma_context *ctx, const char *name, const dma_tensor *g,
                             const dma_tensor *like, dma_dtype dtype)
{
    if (!g)
        return dma_fail(ctx, DMA_ERR_NULL, "backward: %s is required", name);
    dma_status st = dma_check_tensor(ctx, name, g, dtype, 4);
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
    /* dout has the storage of out (and q); gradients are float32 whatever the storage. */
    if ((st = check_grad(ctx, "dout", dout, q, q->dtype)) ||
        (st = check_grad(ctx, "dq", dq, q, DMA_F32)) ||
        (st = check_grad(ctx, "dk", dk, k, DMA_F32)) ||
        (st = check_grad(ctx, "dv", dv, v, DMA_F32)))
        return st;
    if (dbias) {
        if (!bias)
            return dma_fail(ctx, DMA_ERR_NULL, "backward: dbias needs the bias it is the "
                            "gradient of");
        if ((st = check_grad(ctx, "dbias", dbias, bias, DMA_F32)))
            return st;
    }
    const dma_named_tensor grads[] = {{"dq", dq}, {"dk", dk}, {"dv", dv}, {"dbias", dbias}};
    const dma_named_tensor inputs[] = {{"q", q}, {"k", k}, {"v", v}, {"bias", bias},
                                       {"out", out}, {"lse", lse}, {"dout", dout}};
    if ((st = dma_check_apart(ctx, grads, 4, inputs, 7, false)))
        return st;
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_device_backward(ctx, &w.a, dout, dq, dk, dv, dbias);
    w.per_row_bias = bias && bias->shape[2] != 1;
    if ((st = dma_attn_prepare(ctx, &w.a)) != DMA_OK)
        return st;

    dma_item *items = NULL;
    int64_t nitems = 0;
    float *scratch = NULL;
    grad_slot *slots = NULL;
    turn_plan plan = {0};
    if ((st = dma_attn_items(ctx, &w.a, &items, &nitems)) != DMA_OK)
        goto done;
    w.items = items;
    if (nitems == 0) { /* B or Lq is 0: nothing to add */
        zero_grads(&w, 0, 1);
        goto done;
    }
    if (!dma_bwd_plan_turns(&w, nitems, ctx->threads, &plan)) {
        st = dma_fail(ctx, DMA_ERR_NOMEM, "backward: out of memory");
        goto done;
    }
    /* Per thread: the panels, then its slots, each with room to merge two tiles' views and the
     * private buffers of the largest span. */
    int threads = (int)dma_max64(1, dma_min64(ctx->threads, plan.nspans));
    /* dma_merge_views: dma_merge_ints(tile_keys) ints, DMA_VIEW_ROWS rows of 2 * tile_keys bits */
    const int64_t tile_keys = plan.tile_keys;
    const int64_t merge_int_floats = (dma_merge_ints(tile_keys) + 1) / 2 * 2; /* 8-byte aligned */
    const size_t merge_floats = (size_t)merge_int_floats +
                                (size_t)(2 * DMA_VIEW_ROWS * dma_div_up(2 * tile_keys, 64)) + 16;
    const size_t panel_floats = backward_scratch_floats(&w.a);
    const size_t slot_floats = (merge_floats + (size_t)plan.grads_floats + 15) / 16 * 16;
    /* Slots per thread: MAX_SLOTS (a thread goes on past two parked spans), but no more than fit
     * in SLOT_BYTES when slots are large (unions of many thousand keys), and at least one: a
     * thread's slots take at most the larger of SLOT_BYTES and one slot. One thread never
     * parks, so it has one. Slots a thread never needs are never touched. */
    const int nslots = threads == 1 ? 1
                                    : (int)dma_max64(1, dma_min64(MAX_SLOTS, SLOT_BYTES /
                                                                   (sizeof(float) * slot_floats)));
    const size_t per_thread = panel_floats + (size_t)nslots * slot_floats;
    scratch = dma_context_scratch(ctx, sizeof(float) * per_thread * (size_t)threads);
    slots = calloc((size_t)(threads * nslots), sizeof(grad_slot));
    if (!scratch || !slots) {
        st = dma_fail(ctx, DMA_ERR_NOMEM, "backward: out of memory for scratch");
        goto done;
    }
    for (int s = 0; s < threads * nslots; s++) {
        float *base = scratch + per_thread * (size_t)(s / nslots) + panel_floats +
                      slot_floats * (size_t)(s % nslots);
        slots[s].merge_keys = (int32_t *)base;
        slots[s].merge_bits = (uint64_t *)(base + merge_int_floats);
        slots[s].grads = base + merge_floats;
    }
    _Atomic int64_t next = 0;
#pragma omp parallel num_threads(threads)
    {
        zero_grads(&w, omp_get_thread_num(), omp_get_num_threads());
#pragma omp barrier
        float *panels = scratch + per_thread * (size_t)omp_get_thread_num();
        grad_slot *mine = slots + nslots * omp_get_thread_num();
        for (;;) {
            /* A slot first, then a span (see "Parking"). */
            grad_slot *slot = dma_bwd_take_slot(mine, nslots, &next, plan.nspans);
            if (!slot)
                break;
            int64_t k = atomic_fetch_add_explicit(&next, 1, memory_order_relaxed);
            if (k >= plan.nspans)
                break;
            const int64_t sx = plan.order[k], x = plan.span_item[sx];
            dma_item_view *iv = &slot->iv;
            dma_item_view_init(&w.a, &items[x], iv);
            if (plan.span_pair[sx]) {
                dma_item_view first = *iv, second;
                dma_item_view_init(&w.a, &items[x + 1], &second);
                dma_merge_views(&first, &second, iv, slot->merge_keys, slot->merge_bits);
            }
            item_grads *g = &slot->g;
            dma_bwd_item_layout(&w, iv, g);
            g->dk = slot->grads;
            g->dv = g->dk + g->count_pad * w.a.ld;
            g->dbias = g->dv + g->count_pad * w.a.ld;
            memset(g->dbias, 0, sizeof(float) * (size_t)(g->floats - (g->dbias - g->dk)));
            slot->deferred = backward_item(&w, &plan, sx, iv, g, panels);
            if (dma_bwd_my_turn(&plan, sx) || !dma_bwd_park(&plan, sx, slot))
                dma_bwd_commit(&w, &plan, sx, slot);
        }
    }
done:
    free(items);
    dma_bwd_plan_free(&plan);
    free(slots);
    dma_attn_release(&w.a);
    return st;
}

/*
 * forward.c - attention forward over a sparsity object (DESIGN §3).
 *
 * Work item: (batch, group of query heads sharing one kv head and one sparsity head, query tile).
 * For each chunk of the tile's key union it gathers K and V into packed panels once, then every
 * block of query rows of every head of the group computes its scores, the online softmax and its
 * P*V update against those panels. The dense and causal baselines run through the same code with
 * a union that is simply every visible key.
 * Threads take runs of consecutive tiles of the same heads (spans), tile-major; with one head per
 * item, tiles 2t and 2t + 1 of a run run as one item over their merged union when that pays.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "internal.h"
#include "kvcache.h"

/* Pairs (lib/tile_pairs.c): with one head per item (MHA), each K and V row gathered serves only
 * a tile's rows, so tiles t, t + 1 run as one item over their merged union when its rows fit
 * PAIR_ROWS and it costs at most PAIR_GROWTH times the products of the two tiles apart. */
#define PAIR_ROWS DMA_VIEW_ROWS
#define PAIR_GROWTH 1.04

/* Whether tiles may pair: items of one head (two tiles of more heads exceed PAIR_ROWS), not over
 * a KV cache (its per-key bias is read by tile). */
static bool forward_pairs(const dma_attn *a)
{
    return !a->cache && a->sp->ntiles > 1 &&
           dma_min64(DMA_HEADS_PER_ITEM, a->heads_per_group) * 2 * DMA_TILE <= PAIR_ROWS;
}

/* Floats of per-thread scratch forward_item() uses. */
static size_t forward_scratch_floats(const dma_attn *a)
{
    /* the most rows an item has: decode (Lq = 1) needs a few, not a whole tile's */
    int64_t M = forward_pairs(a) ? PAIR_ROWS
                                 : dma_min64(DMA_HEADS_PER_ITEM, a->heads_per_group) *
                                       dma_min64(DMA_TILE, a->Lq);
    /* + DMA_CHUNK_MAX rows of `stage` for the K rows gathered from a cache */
    size_t n = (size_t)(2 * M * a->ld + (a->cache ? 3 : 2) * DMA_CHUNK_MAX * a->ld +
                        (a->kern->mr + DMA_HEADS_PER_ITEM) * DMA_CHUNK_MAX + 2 * M + 64);
    if (a->bf16_dots) /* + the bf16 query rows */
        n += (size_t)(M * a->ld / 2);
    return (n + 15) / 16 * 16; /* keeps every thread's part 64-byte aligned */
}

/* The item's query rows r0 <= r < r1 as stored (bf16, unscaled), zero-padded to ld:
 * scores_bf16's rows (row r = hh * nrows + i, as dma_item_load_rows). */
static void load_rows_bf16(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                           uint16_t *dst, int64_t ld, int64_t r0, int64_t r1)
{
    const dma_tensor *q = a->q;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t off = dma_item_row_offset(q, it, iv, r);
        uint16_t *d = dst + r * ld;
        memcpy(d, (const uint16_t *)q->data + off, sizeof(uint16_t) * (size_t)a->D);
        memset(d + a->D, 0, sizeof(uint16_t) * (size_t)(ld - a->D));
    }
}

/* Whether the forward's Q K^T can run on the bf16 dot products: q and k bf16, the kernels
 * have them, and K's pairs of dimensions are aligned 32-bit words (D, the row stride and the
 * start even). */
static bool use_bf16_dots(const dma_attn *a)
{
    const dma_tensor *k = a->k;
    return a->kern->scores_bf16 && !a->cache && a->q->dtype == DMA_BF16 &&
           k->dtype == DMA_BF16 && a->D % 2 == 0 && k->stride[1] % 2 == 0 &&
           k->stride[0] % 2 == 0 && k->stride[2] % 2 == 0 && ((uintptr_t)k->data & 3) == 0;
}

/* Rows of the next block when `rest` rows are left: mr, except that the last (at most four)
 * blocks share the rest evenly when it is not a multiple of mr (with mr = 6, a pair's 128 rows
 * are 18 x 6 + 4 x 5, not 21 x 6 + 2: a block of few rows has too few accumulators to keep the
 * FMA units busy). Results do not depend on the blocks. */
static inline int64_t block_rows(int64_t rest, int64_t mr)
{
    if (rest % mr && rest <= 4 * mr) {
        const int64_t blocks = dma_div_up(rest, mr);
        return dma_div_up(rest, blocks);
    }
    return mr;
}

/* Normalise rows r0 <= r < r1 of the item's running output and write them out (with their lse).
 * A row that selected nothing has l == 0 (a selected key adds exp(0) = 1 at the max): out = 0
 * (written, not O * 0, which a NaN in V of the tile's union would turn into NaN) and
 * lse = -inf. Any other l, NaN included (a NaN logit), is a row; a NaN in the row written
 * (also from V, which never enters l) makes its lse NaN. */
static void write_rows(const dma_attn *a, const dma_item *it, const dma_item_view *iv, float *O,
                       const float *row_m, const float *row_l, int64_t r0, int64_t r1)
{
    const int64_t D = a->D, ld = a->ld;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t hh = r / iv->nrows, i = r % iv->nrows;
        const int64_t off = dma_item_row_offset(a->out, it, iv, r);
        /* 16-bit outputs are rounded once from the row in O (normalised in place). */
        float *dst = a->out->dtype == DMA_F32 ? f32(a->out) + off : O + r * ld;
        float row_lse = -INFINITY;
        if (row_l[r] == 0.0f) {
            memset(dst, 0, sizeof(float) * (size_t)D);
        } else {
            const int nan = a->kern->scale_row(dst, O + r * ld, 1.0f / row_l[r], (int)D);
            row_lse = nan ? NAN : row_m[r] + logf(row_l[r]);
        }
        if (a->out->dtype != DMA_F32)
            a->kern->from_f32((uint16_t *)a->out->data + off, dst, D, a->out->dtype == DMA_F16);
        if (a->lse)
            f32(a->lse)[it->b * a->lse->stride[0] + (iv->h0 + hh) * a->lse->stride[1] +
                        (iv->r0 + i) * a->lse->stride[2]] = row_lse;
    }
}

/* Keys of the chunk of iv's union from position c0: DMA_CHUNK, or all the rest when they fit
 * DMA_CHUNK_MAX (a union's last chunk takes a short tail along). */
static int64_t chunk_keys(const dma_item_view *iv, int64_t c0)
{
    const int64_t rest = iv->count - c0;
    return rest <= DMA_CHUNK_MAX ? rest : DMA_CHUNK;
}

/* Prefetch rows [*asked, upto) of t for the item (to be written if `write`), and remember that
 * rows up to there were asked for. */
static void ask_rows(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                     const dma_tensor *t, bool write, int64_t *asked, int64_t upto)
{
    if (upto > *asked) {
        dma_prefetch_rows(a, it, iv, t, write, *asked, upto);
        *asked = upto;
    }
}

/* Rows a block asks for ahead of it: the query rows (output rows) of the blocks that follow are
 * fetched while it computes. */
#define ROWS_AHEAD(mr) (2 * (mr))

/* The scores of item rows row0 .. row0 + m - 1 against chunk columns [ca, cb) of chunk c0 (Kp
 * the chunk's panel; ca, cb multiples of select_step) and their softmax, by the fused kernels:
 * scores_select (scores, bias, selection and each row's max in one pass while the block is in
 * registers), then softmax_exp per row. The same S, alpha, m and l, bit for bit, as scores
 * followed by softmax_row; softmax_row's pass over S to mask it, add the bias and find the max
 * cost a D = 64 MHA forward 4-5%, and columns to select_step (16 on AVX-512) instead of nr
 * (32) compute 5% fewer products there. Key bias only, no softcap. */
static void scores_softmax_fused(const dma_attn *a, const dma_item_view *iv, int64_t row0,
                                 int64_t m, int64_t c0, int64_t ca, int64_t cb, const float *Q,
                                 const float *Kp, const float *bias_buf, float *S, float *alpha,
                                 float *row_m, float *row_l)
{
    enum { MR_MAX = 16 }; /* the most rows a table's block has (test_kernels checks mr) */
    const float *bias[MR_MAX] = {NULL};
    const uint64_t *bits[MR_MAX] = {NULL};
    int lo[MR_MAX] = {0}, hi[MR_MAX] = {0};
    float rowmax[MR_MAX];
    int64_t hh = row0 / iv->nrows, i = row0 % iv->nrows; /* row r's head and tile row */
    for (int64_t r = 0; r < m; r++) {
        bias[r] = a->bias || a->cache_bias ? bias_buf + hh * DMA_CHUNK_MAX + ca : NULL;
        bits[r] = dma_row_bits(iv, i);
        dma_row_span(iv, i, c0, ca, cb, &lo[r], &hi[r]);
        if (++i == iv->nrows) {
            i = 0;
            hh++;
        }
    }
    const int64_t nr = a->kern->nr;
    a->kern->scores_select(S, DMA_CHUNK_MAX, Q, (int)a->ld, (int)m, Kp + ca / nr * nr * a->D,
                           (int)(ca % nr), (int)(cb - ca), (int)a->D, bias, bits, (int)(c0 + ca),
                           lo, hi, rowmax);
    for (int64_t r = 0; r < m; r++)
        alpha[r] = a->kern->softmax_exp(S + r * DMA_CHUNK_MAX, (int)(cb - ca), rowmax[r],
                                        &row_m[r], &row_l[r]);
}

/* Decode over a cache: one query row per head, whose heads' rows are few (<= mr <= 8). */
static bool decode_item(const dma_attn *a, const dma_item_view *iv)
{
    return a->cache && iv->nrows == 1 && a->kern->mr <= 8;
}

/* The same by the separate kernels (scores, scores_bf16 or dots, then softmax_row per row):
 * every other case (softcap, a per-row bias, bf16 dots, decode). Kp is the chunk's panel, or
 * for decode the K rows gathered from the cache. */
static void scores_softmax(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                           int64_t row0, int64_t m, int64_t c0, int64_t n, int64_t ca, int64_t cb,
                           const float *Q, const uint16_t *Qh, const float *Kp, float *bias_buf,
                           float *S, float *alpha, float *row_m, float *row_l)
{
    const dma_kernels *kern = a->kern;
    const int64_t D = a->D, ld = a->ld;
    const bool per_row_bias = a->bias && a->bias->shape[2] != 1;
    const bool decode = decode_item(a, iv);
    if (a->bf16_dots)
        kern->scores_bf16(S, DMA_CHUNK_MAX, Qh, (int)ld, (int)m, (const uint16_t *)Kp + ca * D,
                          (int)(cb - ca), (int)D, a->scale);
    else if (decode)
        kern->dots(S, DMA_CHUNK_MAX, Q, (int)ld, (int)m, Kp + ca * D, (int)D, (int)(cb - ca),
                   (int)D);
    else
        kern->scores(S, DMA_CHUNK_MAX, Q, (int)ld, (int)m, Kp + ca * D, (int)(cb - ca), (int)D);
    for (int64_t r = 0; r < m; r++) {
        const int64_t hh = (row0 + r) / iv->nrows, i = (row0 + r) % iv->nrows;
        const float *brow = NULL;
        if (per_row_bias) {
            brow = bias_buf;
            dma_gather_row_bias(a, it, iv, hh, i, c0, ca, cb, n, bias_buf);
        } else if (a->bias || a->cache_bias) {
            brow = bias_buf + hh * DMA_CHUNK_MAX + ca;
        }
        int lo, hi;
        dma_row_span(iv, i, c0, ca, cb, &lo, &hi);
        alpha[r] = kern->softmax_row(S + r * DMA_CHUNK_MAX, (int)(cb - ca), brow,
                                     dma_row_bits(iv, i), (int)(c0 + ca), lo, hi, a->softcap,
                                     &row_m[r], &row_l[r]);
    }
}

/* The forward of item `it` over the view iv: its own, or its pair's merged (rows r0 on). */
static void forward_item(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                         float *scratch)
{
    const dma_kernels *kern = a->kern;
    const int64_t D = a->D, ld = a->ld, mr = kern->mr, nr = kern->nr;
    const bool per_row_bias = a->bias && a->bias->shape[2] != 1;
    const int64_t M = iv->M;

    float *Q = scratch;                        /* [M][ld] scaled queries */
    float *O = Q + M * ld;                     /* [M][ld] running output */
    float *Kp = O + M * ld;                    /* [DMA_CHUNK_MAX][D] packed K^T */
    float *Vp = Kp + DMA_CHUNK_MAX * ld;       /* [DMA_CHUNK_MAX][ld] */
    float *S = Vp + DMA_CHUNK_MAX * ld;        /* [mr][DMA_CHUNK_MAX] scores, then P */
    float *bias_buf = S + mr * DMA_CHUNK_MAX;  /* [heads][DMA_CHUNK_MAX] */
    float *row_m = bias_buf + DMA_HEADS_PER_ITEM * DMA_CHUNK_MAX;
    float *row_l = row_m + M;
    float *alpha = row_l + M;                  /* [mr] */
    float *stage = alpha + mr;                 /* [DMA_CHUNK_MAX][D] K rows from a cache */
    /* bf16 dots: [M][ld] bf16 query rows (unscaled) and the bf16 pair panel in Kp's place */
    uint16_t *Qh = (uint16_t *)(stage + (a->cache ? DMA_CHUNK_MAX * ld : 0));

    const bool decode = decode_item(a, iv);
    /* scores and the softmax's first pass in one kernel where the table has it */
    const bool fused = kern->scores_select && !a->bf16_dots && !decode && a->softcap == 0.0f &&
                       !per_row_bias;
    memset(O, 0, sizeof(float) * (size_t)(M * ld));
    for (int64_t r = 0; r < M; r++) {
        row_m[r] = -INFINITY;
        row_l[r] = 0.0f;
    }
    /* The chunks that run: a block's query rows are loaded where the first of them reaches it,
     * and its output is written where the last one leaves it. Loading every row first and
     * writing every row last waited on memory for 13-15% of an MHA forward (each row a few
     * lines a row stride apart, missed line by line); block by block, the rows a few blocks
     * ahead are fetched while a block computes. */
    int64_t first_c0 = -1, last_c0 = -1;
    for (int64_t c0 = 0, n; c0 < iv->count; c0 += n) {
        n = chunk_keys(iv, c0);
        if (dma_chunk_active(iv, c0, n)) {
            first_c0 = first_c0 < 0 ? c0 : first_c0;
            last_c0 = c0;
        }
    }
    if (first_c0 < 0) { /* no row selects a key: every row is written as such */
        write_rows(a, it, iv, O, row_m, row_l, 0, M);
        return;
    }
    int64_t q_asked = 0, out_asked = 0;
    ask_rows(a, it, iv, a->q, false, &q_asked, dma_min64(M, ROWS_AHEAD(mr)));

    for (int64_t c0 = first_c0, n; c0 <= last_c0; c0 += n) {
        n = chunk_keys(iv, c0);
        if (!dma_chunk_active(iv, c0, n))
            continue;
        const int32_t *keys = iv->keys ? iv->keys + c0 : NULL;
        const int32_t first = (int32_t)(iv->first + c0);
        if (a->cache) {
            /* A decode item (one row per head) scores the key rows directly (dots). */
            const int n_pad = (int)(dma_div_up(n, nr) * nr);
            dma_kv_gather(a->cache, kern, it->b, iv->hkv, keys, first, (int)n, n_pad,
                          decode ? NULL : Kp, Vp, (int)ld, stage);
            if (a->cache_bias) { /* one kv head's bias, the same for every head of the item */
                dma_kv_gather_bias(a->cache, a->sp, it->b, iv->hkv, keys, first, (int)n, n_pad,
                                   bias_buf);
                for (int64_t hh = 1; hh < iv->nh; hh++)
                    memcpy(bias_buf + hh * DMA_CHUNK_MAX, bias_buf, sizeof(float) * (size_t)n_pad);
            }
        } else {
            dma_pack_kv(a, iv, keys, first, (int)n, Kp, Vp);
        }
        if (a->bias && !per_row_bias)
            for (int64_t hh = 0; hh < iv->nh; hh++)
                dma_gather_key_bias(a, it, iv, hh, c0, n, dma_div_up(n, nr) * nr,
                                    bias_buf + hh * DMA_CHUNK_MAX);
        if (c0 == last_c0)
            ask_rows(a, it, iv, a->out, true, &out_asked, dma_min64(M, ROWS_AHEAD(mr)));
        /* Blocks of rows run across head boundaries (rows of all heads are contiguous in Q),
         * so only the item's last blocks are short. */
        for (int64_t row0 = 0, m; row0 < M; row0 += m) {
            m = block_rows(M - row0, mr);
            const int64_t ahead = dma_min64(M, row0 + m + ROWS_AHEAD(mr));
            if (c0 == first_c0) {
                ask_rows(a, it, iv, a->q, false, &q_asked, ahead);
                /* the bf16 dots read the stored rows; every other path the scaled float32 ones */
                if (a->bf16_dots)
                    load_rows_bf16(a, it, iv, Qh, ld, row0, row0 + m);
                else
                    dma_item_load_rows_range(a, it, iv, a->q, a->scale, Q, ld, row0, row0 + m);
            }
            if (c0 == last_c0)
                ask_rows(a, it, iv, a->out, true, &out_asked, ahead);
            int64_t ca, cb;
            if (dma_block_cols(iv, row0, m, c0, n, fused ? kern->select_step : nr, &ca, &cb)) {
                if (fused) {
                    scores_softmax_fused(a, iv, row0, m, c0, ca, cb, Q + row0 * ld, Kp, bias_buf,
                                         S, alpha, row_m + row0, row_l + row0);
                } else {
                    scores_softmax(a, it, iv, row0, m, c0, n, ca, cb, Q + row0 * ld,
                                   Qh + row0 * ld, decode ? stage : Kp, bias_buf, S, alpha,
                                   row_m + row0, row_l + row0);
                }
                /* P is zero past n, and V rows past n were never packed: stop at n. */
                kern->accum_pv(O + row0 * ld, (int)ld, alpha, S, DMA_CHUNK_MAX, (int)m,
                               Vp + ca * ld, (int)ld, (int)(dma_min64(cb, n) - ca), (int)D);
            }
            if (c0 == last_c0)
                write_rows(a, it, iv, O, row_m, row_l, row0, row0 + m);
        }
    }
}

/* A unit of the schedule: a run of items of consecutive tiles of the same heads, taken by one
 * thread tile after tile, so that each tile finds most of its union's K and V rows in cache
 * (the unions of nearby tiles nearly agree). */
typedef struct span {
    int64_t item, n, work;
    int64_t rank; /* its place among spans of the same work class: tile-major */
} span;

/* Tiles per run at most. Runs start at a tile that is a multiple of their length, so pairs
 * (t even, t + 1) never straddle two runs. A run's first tile gathers its K and V rows from
 * memory, the others mostly find them in cache: 16 was 1-2% faster than 8 on MHA shapes at 2
 * threads (4K-16K, D 64 and 128), 32 no faster than 16. */
#define RUN_TILES 16

static int by_work_desc(const void *x, const void *y)
{
    const span *p = x, *q = y;
    if (p->work != q->work)
        return p->work < q->work ? 1 : -1;
    return p->rank < q->rank ? -1 : (p->rank > q->rank);
}

/* Work classes of the schedule: spans are taken largest class first (late causal tiles, the
 * heaviest, do not end the schedule), and within a class tile by tile, all heads of a tile
 * together: their query and out rows share cache lines and pages (a row of all heads is
 * contiguous), which head after head, each a few lines per row, leaves to be missed one by
 * one. The order never changes results, only speed. */
#define WORK_CLASSES 16

static void order_spans(const dma_attn *a, const dma_item *items, span *spans, int64_t nspans)
{
    int64_t most = 0;
    for (int64_t x = 0; x < nspans; x++)
        most = dma_max64(most, spans[x].work);
    const int64_t groups = a->Hq / a->heads_per_group;
    for (int64_t x = 0; x < nspans; x++) {
        const dma_item *it = &items[spans[x].item];
        spans[x].work = spans[x].work * WORK_CLASSES / (most + 1);
        spans[x].rank = ((it->b * a->sp->ntiles + it->tile) * groups + it->group) *
                            a->items_per_group + it->sub;
    }
    qsort(spans, (size_t)nspans, sizeof(span), by_work_desc);
}

/* Tiles per run. Without pairs (a group of several heads per item, GQA) every tile is its own
 * span: its K and V rows serve all the group's heads already, and runs, coarse units of the
 * dynamic schedule, cost GQA 5-8% at 16 threads (Xeon) for no gain at 2. With pairs,
 * RUN_TILES, halved while that leaves fewer than 4 spans per thread (small problems on many
 * threads), but never below 2. Which tiles pair does not depend on it (pairs are tiles 2t,
 * 2t + 1), so neither do the results. */
static int64_t run_tiles(const dma_attn *a, int threads, bool pairs)
{
    if (!pairs)
        return 1;
    const int64_t lanes = a->B * (a->Hq / a->heads_per_group) * a->items_per_group;
    int64_t run = RUN_TILES;
    while (run > 2 && lanes * dma_div_up(a->sp->ntiles, run) < 4 * threads)
        run /= 2;
    return run;
}

/* The items of a span, tile after tile; where pairs are on, tiles 2t and 2t + 1 that pair run
 * as one item over their merged union. */
static void forward_span(const dma_attn *a, const dma_item *items, const span *sp, bool pairs,
                         float *scratch, int32_t *merge_ints, uint64_t *merge_bits)
{
    for (int64_t k = 0; k < sp->n; k++) {
        const dma_item *it = &items[sp->item + k];
        dma_item_view A, B, merged;
        dma_item_view_init(a, it, &A);
        if (pairs && k + 1 < sp->n && dma_items_adjacent(it, it + 1)) {
            dma_item_view_init(a, it + 1, &B);
            int64_t n;
            if (dma_views_may_pair(&A, &B, PAIR_ROWS) &&
                dma_pair_worth(&A, &B, n = dma_merge_union(&A, &B, merge_ints), PAIR_GROWTH)) {
                dma_merge_rows(&A, &B, n, merge_ints, merge_bits, &merged);
                forward_item(a, it, &merged, scratch);
            } else {
                forward_item(a, it, &A, scratch);
                forward_item(a, it + 1, &B, scratch);
            }
            k++;
        } else {
            forward_item(a, it, &A, scratch);
        }
    }
}

dma_status dma_forward(dma_context *ctx, const dma_tensor *q, const dma_tensor *k,
                       const dma_tensor *v, const dma_tensor *bias, const dma_sparsity *sp,
                       const dma_attn_params *params, dma_tensor *out, dma_tensor *lse)
{
    if (!ctx)
        return DMA_ERR_NULL;
    dma_attn a;
    dma_status st = dma_attn_check(ctx, q, k, v, bias, sp, params, out, lse, &a);
    if (st == DMA_OK)
        st = dma_check_apart(ctx, (dma_named_tensor[]){{"out", out}, {"lse", lse}}, 2,
                             (dma_named_tensor[]){{"q", q}, {"k", k}, {"v", v}, {"bias", bias}},
                             4, true);
    if (st != DMA_OK || a.B == 0 || a.Lq == 0)
        return st;
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_device_forward(ctx, &a);
    if ((st = dma_attn_prepare(ctx, &a)) != DMA_OK)
        return st;
    a.bf16_dots = use_bf16_dots(&a);
    st = dma_forward_run(ctx, &a);
    dma_attn_release(&a);
    return st;
}

dma_status dma_forward_run(dma_context *ctx, const dma_attn *a)
{
    dma_item *items = NULL;
    span *spans = NULL;
    int64_t nitems = 0, nspans = 0;
    float *scratch = NULL;
    dma_status st = dma_attn_items(ctx, a, &items, &nitems);
    if (st != DMA_OK)
        goto done;
    const bool pairs = forward_pairs(a);
    spans = malloc(sizeof(span) * (size_t)(nitems ? nitems : 1));
    if (!spans) {
        st = dma_fail(ctx, DMA_ERR_NOMEM, "forward: out of memory for work items");
        goto done;
    }
    /* Items come in natural order (b, group, sub, tile): a run ends at a multiple of `run`
     * tiles or where the heads change. */
    const int64_t run = run_tiles(a, ctx->threads, pairs);
    for (int64_t x = 0; x < nitems;) {
        int64_t e = x + 1, work = items[x].work;
        while (e < nitems && items[e].tile % run && items[e].tile == items[e - 1].tile + 1 &&
               items[e].b == items[x].b && items[e].group == items[x].group &&
               items[e].sub == items[x].sub)
            work += items[e++].work;
        spans[nspans++] = (span){x, e - x, work, 0};
        x = e;
    }
    /* Merge scratch for the largest tile of the object (a pair's union is at most twice it). */
    int64_t tile_keys = 0;
    if (pairs)
        for (int64_t t = 0; t < a->sp->B * a->sp->H * a->sp->ntiles; t++)
            tile_keys = dma_max64(tile_keys, a->sp->tiles[t].count);
    const size_t panel_floats = forward_scratch_floats(a);
    const int64_t merge_int_floats = (dma_merge_ints(tile_keys) + 1) / 2 * 2; /* 8-byte aligned */
    const size_t merge_floats =
        pairs ? (size_t)(merge_int_floats + 2 * PAIR_ROWS * dma_div_up(2 * tile_keys, 64) + 16)
              : 0;
    int threads = (int)dma_max64(1, dma_min64(ctx->threads, nspans));
    size_t per_thread = (panel_floats + merge_floats + 15) / 16 * 16;
    scratch = dma_context_scratch(ctx, sizeof(float) * per_thread * (size_t)threads);
    if (!scratch) {
        st = dma_fail(ctx, DMA_ERR_NOMEM, "forward: out of memory for scratch");
        goto done;
    }
    order_spans(a, items, spans, nspans);
#pragma omp parallel num_threads(threads)
    {
        float *mine = scratch + per_thread * (size_t)omp_get_thread_num();
        int32_t *merge_ints = (int32_t *)(mine + panel_floats);
        uint64_t *merge_bits = (uint64_t *)(mine + panel_floats + merge_int_floats);
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < nspans; x++)
            forward_span(a, items, &spans[x], pairs, mine, merge_ints, merge_bits);
    }
done:
    free(items);
    free(spans);
    return st;
}

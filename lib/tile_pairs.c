/*
 * tile_pairs.c - two consecutive tiles of the same heads as one work item over their merged
 * union (the forward and the backward both use it).
 *
 * A causal top-k union changes from one tile to the next only by the keys that enter or leave
 * the top w within the tile, so tiles t and t + 1 select nearly the same keys. One work item of
 * both gathers K and V (and, in the backward, adds into dk and dv) once for both: half the
 * gathers per row, for a few more products.
 */
#include <string.h>

#include "internal.h"

/* Keys in the union of two views' unions (both sorted). */
static int64_t merged_count(const dma_item_view *A, const dma_item_view *B)
{
    int64_t i = 0, j = 0, n = 0;
    while (i < A->count && j < B->count) {
        int32_t ka = dma_view_key(A, i), kb = dma_view_key(B, j);
        i += ka <= kb;
        j += kb <= ka;
        n++;
    }
    return n + (A->count - i) + (B->count - j);
}

bool dma_items_adjacent(const dma_item *p, const dma_item *q)
{
    return p->tile % 2 == 0 && q->tile == p->tile + 1 && q->b == p->b && q->group == p->group &&
           q->sub == p->sub;
}

bool dma_views_pair(const dma_item_view *A, const dma_item_view *B, int64_t max_rows,
                    double growth, int64_t *count)
{
    if (!dma_views_may_pair(A, B, max_rows))
        return false;
    *count = merged_count(A, B);
    return dma_pair_worth(A, B, *count, growth);
}

bool dma_views_may_pair(const dma_item_view *A, const dma_item_view *B, int64_t max_rows)
{
    return A->bits && B->bits && A->nh * (A->nrows + B->nrows) <= max_rows;
}

/* dst bits [d, d + len) |= src bits [s, s + len) (src NULL: all ones), one destination word
 * per step. */
static void or_bits(uint64_t *dst, int64_t d, const uint64_t *src, int64_t s, int64_t len)
{
    while (len > 0) {
        const int64_t take = dma_min64(len, 64 - (d & 63));
        const uint64_t mask = take == 64 ? ~(uint64_t)0 : ((uint64_t)1 << take) - 1;
        uint64_t chunk = mask;
        if (src) {
            const int64_t w = s >> 6, sh = s & 63;
            chunk = src[w] >> sh;
            if (sh && sh + take > 64)
                chunk |= src[w + 1] << (64 - sh);
            chunk &= mask;
        }
        dst[d >> 6] |= chunk << (d & 63);
        s += take;
        d += take;
        len -= take;
    }
}

/* How a tile's union positions map into the merged union: run k takes positions
 * [src[k], src[k + 1]) to the consecutive positions from dst[k] on (src[nruns] = the tile's
 * count). The two unions differ in a few keys, so there are few runs. */
typedef struct pos_runs {
    int32_t *src, *dst;
    int64_t nruns;
} pos_runs;

static void add_position(pos_runs *runs, int32_t pos, int32_t to)
{
    int64_t k = runs->nruns;
    if (k == 0 || to != runs->dst[k - 1] + (pos - runs->src[k - 1])) {
        runs->src[k] = pos;
        runs->dst[k] = to;
        runs->nruns = k + 1;
    }
}

/* Mark row `row` of `out` with the positions tile view T's row i selects, moved run by run. */
static void merge_row(const dma_item_view *T, int64_t i, const pos_runs *runs, dma_item_view *out,
                      int64_t row)
{
    uint64_t *dst = (uint64_t *)out->bits + row * out->words_per_row;
    const uint64_t *src = dma_row_bits(T, i);
    const int64_t lo = T->lo[i], hi = T->hi[i];
    if (hi <= lo) {
        out->lo[row] = out->hi[row] = 0;
        return;
    }
    if (runs->nruns == 1 && runs->dst[0] == 0 && src) {
        /* The tile's union is the merged union's start (tile t of a causal top-k pair): the
         * row's words as they are, cut to [lo, hi). */
        const int64_t w0 = lo >> 6, w1 = (hi - 1) >> 6;
        for (int64_t w = w0; w <= w1; w++)
            dst[w] = src[w];
        dst[w0] &= ~(uint64_t)0 << (lo & 63);
        if (hi & 63)
            dst[w1] &= ((uint64_t)1 << (hi & 63)) - 1;
    } else {
        for (int64_t k = 0; k < runs->nruns && runs->src[k] < hi; k++) {
            int64_t s = dma_max64(runs->src[k], lo), e = dma_min64(runs->src[k + 1], hi);
            if (e > s)
                or_bits(dst, runs->dst[k] + (s - runs->src[k]), src, s, e - s);
        }
    }
    /* The row's bounds: its first and last set bit. */
    int64_t first = -1, last = -1;
    for (int64_t w = 0; w < out->words_per_row; w++)
        if (dst[w]) {
            if (first < 0)
                first = w * 64 + __builtin_ctzll(dst[w]);
            last = w * 64 + 63 - __builtin_clzll(dst[w]) + 1;
        }
    out->lo[row] = first >= 0 ? (int32_t)first : 0;
    out->hi[row] = first >= 0 ? (int32_t)last : 0;
}

int64_t dma_merge_ints(int64_t tile_keys) { return 2 * tile_keys + 2 * (2 * tile_keys + 2); }

/* Where dma_merge_union() leaves the runs of tile A and tile B in `ints`. */
static void runs_of(const dma_item_view *A, const dma_item_view *B, int32_t *ints, pos_runs *ra,
                    pos_runs *rb)
{
    ra->src = ints + A->count + B->count;
    ra->dst = ra->src + A->count + 1;
    rb->src = ra->dst + A->count + 1;
    rb->dst = rb->src + B->count + 1;
}

int64_t dma_merge_union(const dma_item_view *A, const dma_item_view *B, int32_t *ints)
{
    int32_t *keys = ints;
    pos_runs ra, rb;
    runs_of(A, B, ints, &ra, &rb);
    ra.nruns = rb.nruns = 0;
    int32_t i = 0, j = 0, n = 0;
    while (i < A->count || j < B->count) {
        int32_t ka = i < A->count ? dma_view_key(A, i) : INT32_MAX;
        int32_t kb = j < B->count ? dma_view_key(B, j) : INT32_MAX;
        if (ka <= kb)
            add_position(&ra, i++, n);
        if (kb <= ka)
            add_position(&rb, j++, n);
        keys[n++] = ka < kb ? ka : kb;
    }
    ra.src[ra.nruns] = A->count;
    rb.src[rb.nruns] = B->count;
    /* the run counts, kept past each tile's end marker */
    ra.dst[A->count] = (int32_t)ra.nruns;
    rb.dst[B->count] = (int32_t)rb.nruns;
    return n;
}

void dma_merge_rows(const dma_item_view *A, const dma_item_view *B, int64_t n, int32_t *ints,
                    uint64_t *bits, dma_item_view *out)
{
    pos_runs ra, rb;
    runs_of(A, B, ints, &ra, &rb);
    ra.nruns = ra.dst[A->count];
    rb.nruns = rb.dst[B->count];
    *out = *A;
    out->nrows = A->nrows + B->nrows;
    out->M = A->nh * out->nrows;
    out->keys = ints;
    out->first = 0;
    out->count = (int32_t)n;
    out->words_per_row = dma_div_up(n, 64);
    out->bits = bits;
    memset(bits, 0, sizeof(uint64_t) * (size_t)(out->nrows * out->words_per_row));
    for (int64_t r = 0; r < A->nrows; r++)
        merge_row(A, r, &ra, out, r);
    for (int64_t r = 0; r < B->nrows; r++)
        merge_row(B, r, &rb, out, A->nrows + r);
}

void dma_merge_views(const dma_item_view *A, const dma_item_view *B, dma_item_view *out,
                     int32_t *ints, uint64_t *bits)
{
    dma_merge_rows(A, B, dma_merge_union(A, B, ints), ints, bits, out);
}

bool dma_pair_worth(const dma_item_view *A, const dma_item_view *B, int64_t count,
                    double growth)
{
    return (double)count * (double)(A->nrows + B->nrows) <=
           growth * (double)(A->count * A->nrows + B->count * B->nrows);
}

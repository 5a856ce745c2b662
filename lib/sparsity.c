/*
 * sparsity.c - the sparsity object (DESIGN §2): allocation and inspection. The mask generators
 * (including the dense/causal object the forward makes when it is given none) are in
 * mask_build.c.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "select.h"

void *dma_sparsity_room(void *old, size_t *cap, size_t bytes)
{
    if (old && bytes <= *cap)
        return old;
    dma_free(old);
    void *p = dma_alloc(bytes);
    *cap = p ? bytes : 0;
    return p;
}

dma_status dma_sparsity_alloc(dma_context *ctx, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                              dma_sparsity *reuse, dma_sparsity **out)
{
    int64_t ntiles = dma_div_up(Lq, DMA_TILE), nslab, ntile_all, nrows;
    if (!dma_mul_ok(B, H, &nslab) || !dma_mul_ok(nslab, ntiles, &ntile_all) ||
        !dma_mul_ok(nslab, Lq, &nrows) || ntile_all > (int64_t)(SIZE_MAX / 4 / sizeof(dma_tile)) ||
        nrows > (int64_t)(SIZE_MAX / 8 / sizeof(int32_t))) {
        dma_sparsity_destroy(reuse);
        return dma_fail(ctx, DMA_ERR_OVERFLOW, "sparsity: B*H*Lq = %lld*%lld*%lld overflows",
                        (long long)B, (long long)H, (long long)Lq);
    }
    dma_sparsity *sp = reuse ? reuse : calloc(1, sizeof *sp);
    if (sp) {
        /* Only the arrays survive a rebuild; vals (a KV cache's selection) is never rebuilt. */
        dma_sparsity keep = *sp;
        dma_free(keep.vals);
        *sp = (dma_sparsity){.tiles = keep.tiles, .row_lo = keep.row_lo, .row_hi = keep.row_hi,
                             .keys = keep.keys, .words = keep.words, .cap_tiles = keep.cap_tiles,
                             .cap_lo = keep.cap_lo, .cap_hi = keep.cap_hi,
                             .cap_keys = keep.cap_keys, .cap_words = keep.cap_words};
        const size_t rows = (size_t)nrows * sizeof(int32_t);
        sp->tiles = dma_sparsity_room(sp->tiles, &sp->cap_tiles,
                                      (size_t)ntile_all * sizeof(dma_tile));
        sp->row_lo = dma_sparsity_room(sp->row_lo, &sp->cap_lo, rows);
        sp->row_hi = dma_sparsity_room(sp->row_hi, &sp->cap_hi, rows);
    }
    if (!sp || !sp->tiles || !sp->row_lo || !sp->row_hi) {
        dma_sparsity_destroy(sp);
        return dma_fail(ctx, DMA_ERR_NOMEM, "sparsity: out of memory for %lld rows",
                        (long long)nrows);
    }
    sp->B = B;
    sp->H = H;
    sp->Lq = Lq;
    sp->Lk = Lk;
    sp->ntiles = ntiles;
    *out = sp;
    return DMA_OK;
}

void dma_sparsity_destroy(dma_sparsity *sp)
{
    if (!sp)
        return;
    if (sp->cuda) {
        dma_device_sparsity_free(sp);
        return;
    }
    dma_free(sp->tiles);
    dma_free(sp->row_lo);
    dma_free(sp->row_hi);
    dma_free(sp->keys);
    dma_free(sp->vals);
    dma_free(sp->words);
    free(sp);
}

void dma_sparsity_shape(const dma_sparsity *sp, int64_t *B, int64_t *H, int64_t *Lq, int64_t *Lk)
{
    if (B) *B = sp->B;
    if (H) *H = sp->H;
    if (Lq) *Lq = sp->Lq;
    if (Lk) *Lk = sp->Lk;
}

int64_t dma_sparsity_nnz(const dma_sparsity *sp) { return sp->nnz; }

size_t dma_sparsity_bytes(const dma_sparsity *sp)
{
    int64_t ntile_all = sp->B * sp->H * sp->ntiles, nrows = sp->B * sp->H * sp->Lq;
    return sizeof *sp + (size_t)ntile_all * sizeof(dma_tile) + (size_t)nrows * 2 * sizeof(int32_t) +
           (size_t)sp->nkeys * (sizeof(int32_t) + (sp->vals ? sizeof(float) : 0)) +
           (size_t)sp->nwords * sizeof(uint64_t);
}

int32_t dma_tile_cut(const dma_sparsity *sp, const dma_tile *t, int64_t last)
{
    if (t->key_off < 0)
        return (int32_t)dma_max64(0, dma_min64(t->count, last - t->first + 1));
    const int32_t *k = sp->keys + t->key_off;
    int32_t lo = 0, hi = t->count; /* first position with key > last */
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        if (k[mid] <= last)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

dma_status dma_sparsity_to_dense(const dma_sparsity *sp, uint8_t *out, size_t out_bytes)
{
    if (!sp || !out)
        return DMA_ERR_NULL;
    int64_t total = sp->B * sp->H * sp->Lq * sp->Lk; /* fits: checked when built */
    if ((uint64_t)total > (uint64_t)out_bytes)
        return DMA_ERR_BUFFER;
    if (sp->cuda)
        return dma_device_sparsity_to_dense(sp, out, out_bytes);
    memset(out, 0, (size_t)total);
    for (int64_t s = 0; s < sp->B * sp->H; s++)
        for (int64_t i = 0; i < sp->Lq; i++) {
            const dma_tile *t = &sp->tiles[s * sp->ntiles + i / DMA_TILE];
            int64_t row = s * sp->Lq + i;
            uint8_t *dst = out + row * sp->Lk;
            const uint64_t *bits =
                t->word_off >= 0 ? sp->words + t->word_off + (i % DMA_TILE) * t->words_per_row
                                 : NULL;
            for (int32_t pos = sp->row_lo[row]; pos < sp->row_hi[row]; pos++)
                if (!bits || ((bits[pos >> 6] >> (pos & 63)) & 1u))
                    dst[dma_tile_key(sp, t, pos)] = 1;
        }
    return DMA_OK;
}

/* One slab's keys and words, and where they go in the object. */
typedef struct piece {
    const slab *src;
    int64_t kdst, wdst;
    int64_t task0; /* its first copy task; its tasks end at the next piece's task0 */
} piece;

/* Copies of at most this many bytes a task, so that a few large slabs still use every thread. */
#define ASSEMBLE_CHUNK ((int64_t)1 << 18)

static void copy_piece_part(const piece *pc, int64_t part, int64_t nchunks, dma_sparsity *sp)
{
    const int64_t nk = pc->src->nkeys, nw = pc->src->nwords;
    const int64_t kb = nk * part / nchunks, ke = nk * (part + 1) / nchunks;
    const int64_t wb = nw * part / nchunks, we = nw * (part + 1) / nchunks;
    if (ke > kb)
        memcpy(sp->keys + pc->kdst + kb, pc->src->keys + kb, sizeof(int32_t) * (size_t)(ke - kb));
    if (we > wb)
        memcpy(sp->words + pc->wdst + wb, pc->src->words + wb,
               sizeof(uint64_t) * (size_t)(we - wb));
}

dma_status dma_sparsity_assemble(dma_context *ctx, dma_sparsity *sp, slab *slabs, int64_t nslab,
                                 dma_sparsity **out)
{
    dma_status st = DMA_OK;
    /* First failure in slab order (deterministic whatever the threads did). */
    for (int64_t s = 0; s < nslab && st == DMA_OK; s++)
        st = slabs[s].status;
    int64_t nkeys = 0, nwords = 0;
    for (int64_t s = 0; s < nslab; s++) {
        nkeys += slabs[s].nkeys;
        nwords += slabs[s].nwords;
        sp->nnz += slabs[s].nnz;
    }
    piece *pieces = NULL;
    if (st == DMA_OK) {
        sp->keys = dma_sparsity_room(sp->keys, &sp->cap_keys, (size_t)nkeys * sizeof(int32_t));
        bool with_vals = false;
        for (int64_t s = 0; s < nslab; s++)
            with_vals |= slabs[s].vals != NULL;
        if (with_vals && !(sp->vals = dma_alloc((size_t)nkeys * sizeof(float))))
            st = DMA_ERR_NOMEM;
        sp->words =
            dma_sparsity_room(sp->words, &sp->cap_words, (size_t)nwords * sizeof(uint64_t));
        pieces = malloc(sizeof(piece) * (size_t)(nslab + 1));
        if (!sp->keys || !sp->words || !pieces)
            st = DMA_ERR_NOMEM;
    }
    if (st == DMA_OK) {
        int64_t kb = 0, wb = 0, tasks = 0;
        for (int64_t s = 0; s < nslab; s++) {
            const slab *sl = &slabs[s];
            pieces[s] = (piece){sl, kb, wb, tasks};
            tasks += 1 + (sl->nkeys * 4 + sl->nwords * 8) / ASSEMBLE_CHUNK;
            if (sp->vals && sl->nkeys) {
                if (sl->vals)
                    memcpy(sp->vals + kb, sl->vals, sizeof(float) * (size_t)sl->nkeys);
                else
                    for (int64_t i = 0; i < sl->nkeys; i++)
                        sp->vals[kb + i] = NAN;
            }
            for (int64_t t = 0; t < sp->ntiles; t++) {
                dma_tile *tile = &sp->tiles[s * sp->ntiles + t];
                if (tile->key_off >= 0)
                    tile->key_off += kb;
                if (tile->word_off >= 0)
                    tile->word_off += wb;
            }
            kb += sl->nkeys;
            wb += sl->nwords;
        }
        /* Task x of piece p: chunk x - task0 of its chunks (fresh pages fault in parallel). */
        pieces[nslab].task0 = tasks;
        const int threads = tasks > 1 ? ctx->threads : 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t x = 0; x < tasks; x++) {
            int64_t p = 0;
            while (pieces[p + 1].task0 <= x)
                p++;
            copy_piece_part(&pieces[p], x - pieces[p].task0, pieces[p + 1].task0 - pieces[p].task0,
                            sp);
        }
        sp->nkeys = nkeys;
        sp->nwords = nwords;
    }
    free(pieces);
    for (int64_t s = 0; s < nslab; s++) {
        free(slabs[s].keys);
        free(slabs[s].vals);
        free(slabs[s].words);
    }
    free(slabs);
    if (st != DMA_OK)
        return dma_sparsity_fail(ctx, sp, st);
    *out = sp;
    return DMA_OK;
}

dma_status dma_sparsity_fail(dma_context *ctx, dma_sparsity *sp, dma_status st)
{
    dma_sparsity_destroy(sp);
    if (st == DMA_ERR_BAD_VALUE)
        return dma_fail(ctx, st, "bias: NaN or +inf where a mask is generated");
    return dma_fail(ctx, st, "sparsity: out of memory");
}

/*
 * kvcache_select.c - the selection of a KV cache's newest rows as a sparsity object, in
 * O(n * log(window) + tiles * (window + n)) per (entry, head) for n rows, never O(length).
 *
 * Top-k: the heap after the last append holds the newest row's keys; walking the append's
 * journal backwards gives the keys live at its first row (heap keys and keys pushed out later,
 * that are not newer than that row). Every candidate key then has an interval of rows
 * [start, end) that select it: a key live at the first row from there, an appended key from its
 * own position, until the position that pushed it out. Tiles and row bitmasks follow the format of
 * mask_build.c's streaming builder, so the result equals dma_sparsity_build() for the same rows.
 */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "kvcache.h"

static void select_topk_slab(const dma_kv_cache *c, const dma_sparsity *sp, int64_t b, int64_t h,
                             int64_t nrows, slab *sl)
{
    const int64_t H = c->p.kv_heads, s = b * H + h, len = c->len[b];
    const int64_t first_row = len - nrows, journal0 = len - c->last_n[b];
    const int32_t *jout = c->jout ? c->jout + s * c->jcap : NULL;
    const uint8_t *jin = c->jin ? c->jin + s * c->jcap : NULL;
    const heap_item *heap = c->heap + s * c->p.window;
    const int64_t hn = c->heap_n[s];
    int32_t *lo = sp->row_lo + s * sp->Lq, *hi = sp->row_hi + s * sp->Lq;

    int64_t ncand = 0, cap = hn + nrows + 1;
    int32_t *cand = malloc(sizeof(int32_t) * (size_t)(3 * cap));
    float *cval = malloc(sizeof(float) * (size_t)cap);
    heap_item *items = malloc(sizeof(heap_item) * (size_t)(2 * cap));
    if (!cand || !cval || !items) {
        free(cand);
        free(cval);
        free(items);
        sl->status = DMA_ERR_NOMEM;
        return;
    }
    int32_t *start = cand + cap, *end = start + cap;
    if (nrows > 0) {
        /* Keys live at the first row, sorted, with their biases (the heap's for keys still in
         * it, the page's for keys pushed out later); then the keys that enter at later rows. */
        int64_t ni = 0;
        for (int64_t i = 0; i < hn; i++)
            if (heap[i].key <= first_row)
                items[ni++] = heap[i];
        for (int64_t p = first_row + 1; p < len; p++) {
            int32_t k = jout[p - journal0];
            if (k >= 0 && k <= first_row)
                items[ni++] = (heap_item){dma_kv_bias_at(c, b, h, k), k};
        }
        sort_items_by_key(items, ni, items + cap);
        for (int64_t i = 0; i < ni; i++) {
            cand[ncand] = items[i].key;
            cval[ncand] = items[i].val;
            start[ncand++] = INT32_MIN;
        }
        for (int64_t p = first_row + 1; p < len; p++)
            if (jin[p - journal0]) {
                start[ncand] = (int32_t)p;
                cval[ncand] = dma_kv_bias_at(c, b, h, p);
                cand[ncand++] = (int32_t)p;
            }
        for (int64_t i = 0; i < ncand; i++)
            end[i] = INT32_MAX;
        for (int64_t p = first_row + 1; p < len; p++) {
            int32_t k = jout[p - journal0];
            if (k >= 0)
                end[find_pos(cand, (int32_t)ncand, k)] = (int32_t)p;
        }
    }

    for (int64_t t = 0; t < sp->ntiles; t++) {
        const int64_t r0 = t * DMA_TILE, r1 = dma_min64(sp->Lq, r0 + DMA_TILE);
        const int64_t valid = dma_max64(0, dma_min64(r1, nrows) - r0);
        dma_tile *tile = &sp->tiles[s * sp->ntiles + t];
        for (int64_t i = r0; i < r1; i++)
            lo[i] = hi[i] = 0;
        if (valid == 0) {
            *tile = (dma_tile){.key_off = -1, .word_off = -1};
            continue;
        }
        const int64_t P0 = first_row + r0, P1 = P0 + valid - 1;
        int64_t count = 0;
        for (int64_t i = 0; i < ncand && cand[i] <= P1; i++)
            count += end[i] > P0;
        int64_t base = sl->nkeys;
        int32_t *u = slab_keys(sl, count);
        float *uv = u ? slab_vals(sl, count) : NULL;
        if (!u || !uv) {
            sl->status = DMA_ERR_NOMEM;
            break;
        }
        int64_t x = 0;
        for (int64_t i = 0; i < ncand && cand[i] <= P1; i++)
            if (end[i] > P0) {
                uv[x] = cval[i];
                u[x++] = cand[i];
            }
        const int32_t wpr = (int32_t)dma_div_up(count, 64);
        const int64_t wbase = sl->nwords;
        uint64_t *words = slab_words(sl, (r1 - r0) * (int64_t)wpr);
        if (!words) {
            sl->status = DMA_ERR_NOMEM;
            break;
        }
        u = sl->keys + base; /* (slab_words moves only words; stay obvious) */
        *tile = (dma_tile){.key_off = base, .word_off = wbase, .first = 0,
                           .count = (int32_t)count, .words_per_row = wpr};
        for (int64_t r = 0; r < valid; r++) {
            const int64_t p = P0 + r;
            uint64_t *row = words + r * wpr;
            if (r == 0) {
                int64_t pos = 0;
                for (int64_t i = 0; i < ncand && cand[i] <= P1; i++)
                    if (end[i] > P0) {
                        if (start[i] <= p)
                            bit_set(row, (int32_t)pos);
                        pos++;
                    }
            } else {
                memcpy(row, row - wpr, sizeof(uint64_t) * (size_t)wpr);
                if (jin[p - journal0])
                    bit_set(row, find_pos(u, (int32_t)count, (int32_t)p));
                int32_t gone = jout[p - journal0];
                if (gone >= 0)
                    bit_clear(row, find_pos(u, (int32_t)count, gone));
            }
            bits_bounds(row, wpr, &lo[r0 + r], &hi[r0 + r], &sl->nnz);
        }
    }
    free(cand);
    free(cval);
    free(items);
}

/* DENSE or WINDOW rows of entry b: contiguous key ranges, no index arrays. */
static void select_ranges(const dma_kv_cache *c, dma_sparsity *sp, dma_mask_kind kind,
                          int64_t window, int64_t b, int64_t nrows)
{
    const int64_t first_row = c->len[b] - nrows;
    int32_t *lo = sp->row_lo + b * sp->Lq, *hi = sp->row_hi + b * sp->Lq;
    for (int64_t t = 0; t < sp->ntiles; t++) {
        const int64_t r0 = t * DMA_TILE, r1 = dma_min64(sp->Lq, r0 + DMA_TILE);
        int64_t ulo = INT64_MAX, uhi = 0;
        for (int64_t i = r0; i < r1; i++) {
            lo[i] = hi[i] = 0;
            if (i >= nrows)
                continue;
            const int64_t p = first_row + i;
            const int64_t klo = kind == DMA_MASK_WINDOW ? dma_max64(0, p - window + 1) : 0;
            if (p + 1 > klo) {
                ulo = dma_min64(ulo, klo);
                uhi = dma_max64(uhi, p + 1);
            }
        }
        if (ulo >= uhi)
            ulo = uhi = 0;
        for (int64_t i = r0; i < dma_min64(r1, nrows); i++) {
            const int64_t p = first_row + i;
            const int64_t klo = kind == DMA_MASK_WINDOW ? dma_max64(0, p - window + 1) : 0;
            if (p + 1 > klo) {
                lo[i] = (int32_t)(klo - ulo);
                hi[i] = (int32_t)(p + 1 - ulo);
                sp->nnz += p + 1 - klo;
            }
        }
        sp->tiles[b * sp->ntiles + t] = (dma_tile){.key_off = -1, .word_off = -1,
                                                   .first = (int32_t)ulo,
                                                   .count = (int32_t)(uhi - ulo)};
    }
}

dma_status dma_kv_select(dma_context *ctx, const dma_kv_cache *c, dma_mask_kind kind,
                         int64_t window, int64_t Lq, const int64_t *counts, dma_sparsity **out)
{
    const int64_t B = c->p.batch, H = kind == DMA_MASK_TOPK ? c->p.kv_heads : 1;
    int64_t Lk = 0;
    for (int64_t b = 0; b < B; b++)
        Lk = dma_max64(Lk, c->len[b]);
    dma_sparsity *sp;
    dma_status st = dma_sparsity_alloc(ctx, B, H, Lq, Lk, NULL, &sp);
    if (st != DMA_OK)
        return st;
    if (kind != DMA_MASK_TOPK) {
        for (int64_t b = 0; b < B; b++)
            select_ranges(c, sp, kind, window, b, counts ? counts[b] : Lq);
        *out = sp;
        return DMA_OK;
    }
    slab *slabs = calloc((size_t)(B * H), sizeof(slab));
    if (!slabs) {
        dma_sparsity_destroy(sp);
        return dma_fail(ctx, DMA_ERR_NOMEM, "kv cache: out of memory for the selection");
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(ctx->threads)
    for (int64_t s = 0; s < B * H; s++)
        select_topk_slab(c, sp, s / H, s % H, counts ? counts[s / H] : Lq, &slabs[s]);
    return dma_sparsity_assemble(ctx, sp, slabs, B * H, out);
}

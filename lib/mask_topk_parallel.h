/*
 * mask_topk_parallel.h - the causal top-k builder over a per-key bias (lib/mask_topk_parallel.c):
 * every slab at once, each slab's key axis split among threads when there are fewer slabs than
 * threads; its object is the one-thread builder's, byte for byte. Not installed.
 */
#ifndef DMATTN_MASK_TOPK_PARALLEL_H
#define DMATTN_MASK_TOPK_PARALLEL_H

#include <stdbool.h>
#include <stdint.h>

#include "internal.h"
#include "select.h"

/* Below this many keys a slab is built by one thread: the split's fixed costs (a top-w merge
 * per block, seeding every block's heap) are not worth it. */
#define DMA_TOPK_SPLIT_MIN_KEYS 4096

/* One slab of a causal top-k build. */
typedef struct dma_topk_slab {
    const float *bias;        /* key j's bias is bias[j] (finite or -inf, else an error) */
    const uint8_t *pad;       /* NULL, or key j exists iff pad[j] != 0 */
    int64_t Lq, Lk, window;   /* 0 <= window <= Lk; row i's last visible key is i + Lk - Lq */
    dma_tile *tiles;          /* the slab's ceil(Lq / DMA_TILE) tiles */
    int32_t *row_lo, *row_hi; /* the slab's Lq rows */
} dma_topk_slab;

/* The fewest keys per block the split makes for a window (a block shorter than about 2 windows
 * costs more in seeding and merging than its scan saves). */
int64_t dma_topk_min_block(int64_t window);

/* Whether splitting slabs pays: fewer slabs than threads, and a slab long enough to be cut into
 * at least two blocks of dma_topk_min_block(window) keys. */
bool dma_topk_split_pays(int64_t nslab, int threads, int64_t Lq, int64_t Lk, int64_t window);

/* Builds every slab of a causal top-k object into sp (from dma_sparsity_alloc, with in[s].tiles,
 * row_lo and row_hi pointing at slab s's; all slabs share Lq, Lk and window) with up to
 * `threads` OpenMP threads: writes the tiles, row bounds and nnz, and allocates and fills
 * sp->keys and sp->words. Each slab's key axis is cut into about `split` (>= 1) segments of at
 * least min_block (>= 1) keys. The object does not depend on threads, split or min_block.
 * Returns DMA_OK, DMA_ERR_BAD_VALUE for a NaN or +inf bias, or DMA_ERR_NOMEM; on failure sp
 * is left for the caller to destroy. */
dma_status dma_topk_causal_build(const dma_topk_slab *in, int64_t nslab, int threads,
                                 int64_t split, int64_t min_block, dma_sparsity *sp);

#endif /* DMATTN_MASK_TOPK_PARALLEL_H */

/*
 * internal.h - what the library's own files share: the context, the sparsity object's layout,
 * validation helpers and small utilities. Not installed.
 */
#ifndef DMATTN_INTERNAL_H
#define DMATTN_INTERNAL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dmattn.h"
#include "kernels.h"

/* Query rows per tile of the sparsity object (DESIGN §2). */
#define DMA_TILE 64

struct dma_context {
    int threads;
    dma_isa isa;
    const dma_kernels *kernels;
    char last_error[256];
};

/* Record a message in the context (if any) and return the status, so that validation code reads
 * `return dma_fail(ctx, DMA_ERR_SHAPE, "q: ...", ...);`. */
dma_status dma_fail(dma_context *ctx, dma_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * One tile of the sparsity object: the union U of the keys its rows selected, and how each row
 * picks from U.
 *   key_off >= 0: U is keys[key_off .. key_off + count) (sorted, unique);
 *   key_off <  0: U is the contiguous range first .. first + count - 1 (no index array needed).
 *   word_off >= 0: row r of the tile selects U positions whose bit is set in
 *                  words[word_off + r * words_per_row ...]; row_lo/row_hi bound the set bits.
 *   word_off <  0: row r selects exactly the positions [row_lo, row_hi).
 */
typedef struct dma_tile {
    int64_t key_off;
    int64_t word_off;
    int32_t first;
    int32_t count;
    int32_t words_per_row;
} dma_tile;

struct dma_sparsity {
    int64_t B, H, Lq, Lk;
    int64_t ntiles;     /* tiles per (b, h): ceil(Lq / DMA_TILE) */
    dma_tile *tiles;    /* [B][H][ntiles] */
    int32_t *row_lo;    /* [B][H][Lq] first selected position in the tile's U */
    int32_t *row_hi;    /* [B][H][Lq] one past the last selected position */
    int32_t *keys;      /* explicit unions, concatenated */
    uint64_t *words;    /* row bitmasks, concatenated */
    int64_t nkeys, nwords;
    int64_t nnz;
};

static inline int64_t dma_div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t dma_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t dma_max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Key of position `pos` in a tile's union. */
static inline int32_t dma_tile_key(const dma_sparsity *sp, const dma_tile *t, int32_t pos)
{
    return t->key_off >= 0 ? sp->keys[t->key_off + pos] : t->first + pos;
}

/* Number of union positions whose key is <= last (U is sorted): the causal cut of a row. */
int32_t dma_tile_cut(const dma_sparsity *sp, const dma_tile *t, int64_t last);

/* ---- validation ---- */

/* Check a tensor's dtype, ndim, unit last stride, non-negative strides, and that every element
 * offset fits int64. `name` is used in the message. */
dma_status dma_check_tensor(dma_context *ctx, const char *name, const dma_tensor *t,
                            dma_dtype dtype, int ndim);

/* Check that `got` is 1 or `full` (a broadcastable size). */
bool dma_is_bcast(int64_t got, int64_t full);

/* Overflow-checked multiply of non-negative sizes; false on overflow. */
static inline bool dma_mul_ok(int64_t a, int64_t b, int64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/* Element offset of a 4-D index with broadcasting: a size-1 dimension ignores its index. */
static inline int64_t dma_offset4(const dma_tensor *t, int64_t i0, int64_t i1, int64_t i2,
                                  int64_t i3)
{
    return (t->shape[0] == 1 ? 0 : i0 * t->stride[0]) + (t->shape[1] == 1 ? 0 : i1 * t->stride[1]) +
           (t->shape[2] == 1 ? 0 : i2 * t->stride[2]) + (t->shape[3] == 1 ? 0 : i3 * t->stride[3]);
}

/* ---- memory ---- */

/* 64-byte aligned allocation of `bytes` (0 allowed); NULL on failure or on size overflow. */
void *dma_alloc(size_t bytes);
void dma_free(void *p);

/* ---- sparsity internals shared by the builders ---- */

/* Allocate an empty object with B*H*ntiles tiles and B*H*Lq row ranges (keys/words NULL). */
dma_status dma_sparsity_alloc(dma_context *ctx, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                              dma_sparsity **out);

/* A dense (or causal) object over every visible key, B = H = 1, contiguous unions, no masks.
 * Used by the forward when no sparsity is given. */
dma_status dma_sparsity_dense(dma_context *ctx, int64_t Lq, int64_t Lk, bool causal,
                              dma_sparsity **out);

#endif /* DMATTN_INTERNAL_H */

/*
 * select.h - what the selection builders share (lib/mask_build.c for whole sequences,
 * lib/kvcache_select.c for a KV cache's newest rows): the top-k heap, the growable per-slab
 * output of a builder, and row bitmask helpers. Not installed.
 */
#ifndef DMATTN_SELECT_H
#define DMATTN_SELECT_H

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* A slab's growing output and its scratch memory. */
typedef struct slab {
    int32_t *keys;
    int64_t nkeys, cap_keys;
    float *vals;             /* optional: each key's bias, beside keys (the KV cache's builder) */
    int64_t cap_vals;
    uint64_t *words;
    int64_t nwords, cap_words;
    int64_t nnz;
    dma_status status;
} slab;

static inline bool grow(void **p, int64_t *cap, int64_t need, size_t elem)
{
    if (need <= *cap)
        return true;
    int64_t n = dma_max64(need, *cap * 2 + 64);
    void *q = realloc(*p, (size_t)n * elem);
    if (!q)
        return false;
    *p = q;
    *cap = n;
    return true;
}

/* Room for n more keys at the end of the slab; NULL on allocation failure. */
static inline int32_t *slab_keys(slab *sl, int64_t n)
{
    if (!grow((void **)&sl->keys, &sl->cap_keys, sl->nkeys + n + 1, sizeof(int32_t)))
        return NULL;
    int32_t *p = sl->keys + sl->nkeys;
    sl->nkeys += n;
    return p;
}

/* The bias values of the last n keys slab_keys() gave (allocated on first use); NULL on
 * allocation failure. */
static inline float *slab_vals(slab *sl, int64_t n)
{
    if (!grow((void **)&sl->vals, &sl->cap_vals, sl->nkeys + 1, sizeof(float)))
        return NULL;
    return sl->vals + sl->nkeys - n;
}

/* n more zeroed words at the end of the slab; NULL on allocation failure. */
static inline uint64_t *slab_words(slab *sl, int64_t n)
{
    if (!grow((void **)&sl->words, &sl->cap_words, sl->nwords + n + 1, sizeof(uint64_t)))
        return NULL;
    uint64_t *p = sl->words + sl->nwords;
    memset(p, 0, (size_t)n * sizeof(uint64_t));
    sl->nwords += n;
    return p;
}

/* A bias that may rank keys: finite or -inf. */
static inline bool bias_ok(float x) { return !isnan(x) && x != INFINITY; }

/* ---- a min-heap of (value, key) ordered so that the key to drop comes out first ---- */

typedef struct heap_item {
    float val;
    int32_t key;
} heap_item;

/* a is dropped before b: smaller value, or the same value and a later key (earlier key wins). */
static inline bool drops_first(heap_item a, heap_item b)
{
    return a.val < b.val || (a.val == b.val && a.key > b.key);
}

static inline void heap_push(heap_item *h, int64_t *n, heap_item x)
{
    int64_t i = (*n)++;
    while (i > 0) {
        int64_t parent = (i - 1) / 2;
        if (!drops_first(x, h[parent]))
            break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = x;
}

/* Puts x in the root's place (n >= 1 items) and sifts it down. */
static inline void heap_replace_top(heap_item *h, int64_t n, heap_item x)
{
    int64_t i = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && drops_first(h[c + 1], h[c]))
            c++;
        if (!drops_first(h[c], x))
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

static inline heap_item heap_pop(heap_item *h, int64_t *n)
{
    heap_item top = h[0], x = h[--(*n)];
    heap_replace_top(h, *n, x);
    return top;
}

/* Push x, keeping at most `cap` items; returns the key dropped, or -1. */
static inline int32_t heap_offer(heap_item *h, int64_t *n, int64_t cap, heap_item x)
{
    if (cap == 0)
        return x.key;
    if (*n < cap) {
        heap_push(h, n, x);
        return -1;
    }
    if (!drops_first(h[0], x))
        return x.key;
    const int32_t old = h[0].key; /* one sift-down, not a pop and a push */
    heap_replace_top(h, *n, x);
    return old;
}

static inline int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Row bounds and nnz of a bitmask row. */
static inline void bits_bounds(const uint64_t *w, int32_t nw, int32_t *lo, int32_t *hi, int64_t *nnz)
{
    int32_t first = -1, last = -1;
    for (int32_t k = 0; k < nw; k++) {
        if (!w[k])
            continue;
        if (first < 0)
            first = k * 64 + __builtin_ctzll(w[k]);
        last = k * 64 + 63 - __builtin_clzll(w[k]);
        *nnz += __builtin_popcountll(w[k]);
    }
    *lo = first < 0 ? 0 : first;
    *hi = first < 0 ? 0 : last + 1;
}

/* Row bounds of a bitmask row (0, 0 when empty), from its first and last non-zero words:
 * no population count (a library call where the ISA baseline has no POPCNT). */
static inline void bits_ends(const uint64_t *w, int32_t nw, int32_t *lo, int32_t *hi)
{
    int32_t a = 0, b = nw - 1;
    while (a < nw && !w[a])
        a++;
    if (a == nw) {
        *lo = *hi = 0;
        return;
    }
    while (!w[b])
        b--;
    *lo = a * 64 + __builtin_ctzll(w[a]);
    *hi = b * 64 + 64 - __builtin_clzll(w[b]);
}

static inline void bit_set(uint64_t *w, int32_t pos) { w[pos >> 6] |= 1ull << (pos & 63); }
static inline void bit_clear(uint64_t *w, int32_t pos) { w[pos >> 6] &= ~(1ull << (pos & 63)); }

static inline int32_t find_pos(const int32_t *u, int32_t n, int32_t key)
{
    int32_t lo = 0, hi = n;
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        if (u[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Sort n items by their non-negative keys, ascending: insertion sort when short, else an LSD
 * radix sort in three passes of 11 bits through tmp (n more items). The KV cache sorts a heap's
 * window of keys for every decode step, where qsort's comparator calls cost as much as the
 * attention. */
static inline void sort_items_by_key(heap_item *a, int64_t n, heap_item *tmp)
{
    if (n <= 32) {
        for (int64_t i = 1; i < n; i++) {
            heap_item x = a[i];
            int64_t j = i;
            for (; j > 0 && a[j - 1].key > x.key; j--)
                a[j] = a[j - 1];
            a[j] = x;
        }
        return;
    }
    heap_item *src = a, *dst = tmp;
    for (int shift = 0; shift < 33; shift += 11) {
        int64_t count[2048] = {0};
        for (int64_t i = 0; i < n; i++)
            count[((uint32_t)src[i].key >> shift) & 2047]++;
        for (int64_t d = 0, sum = 0; d < 2048; d++) {
            int64_t c = count[d];
            count[d] = sum;
            sum += c;
        }
        for (int64_t i = 0; i < n; i++)
            dst[count[((uint32_t)src[i].key >> shift) & 2047]++] = src[i];
        heap_item *t = src;
        src = dst;
        dst = t;
    }
    if (src != a) /* three passes end in tmp */
        memcpy(a, src, sizeof(heap_item) * (size_t)n);
}

/* Concatenate the slabs' keys and words into sp with ctx's threads (tiles' offsets made
 * global) and free the slabs and their arrays. The status is the first failure of any slab, or
 * DMA_OK. On failure sp is destroyed and the status recorded in ctx; on success *out = sp. */
dma_status dma_sparsity_assemble(dma_context *ctx, dma_sparsity *sp, slab *slabs, int64_t nslab,
                                 dma_sparsity **out);

/* A build's failure st (DMA_ERR_BAD_VALUE: a NaN or +inf bias; otherwise out of memory):
 * destroys sp, records the message in ctx and returns st. */
dma_status dma_sparsity_fail(dma_context *ctx, dma_sparsity *sp, dma_status st);

#endif /* DMATTN_SELECT_H */

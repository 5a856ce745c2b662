/*
 * kvcache.h - the KV cache's layout (DESIGN §2 "KV cache"), shared by the cache itself
 * (lib/kvcache.c), the selection of its newest rows (lib/kvcache_select.c) and the forward over
 * it (lib/kvcache_forward.c, lib/forward.c). Not installed.
 *
 * A page holds page_len consecutive tokens of one entry: K as [Hkv][page_len][D], then V the same,
 * then the per-key bias as float [Hkv][page_len]; elements are float32 or 16-bit (bf16/f16).
 * The journal of an entry's last non-empty append records, per (entry, kv head) and appended
 * position, whether its key entered the top-window heap and which key it pushed out: with the heap
 * after the append, that gives the selection of every row the append added (kvcache_select.c).
 */
#ifndef DMATTN_KVCACHE_H
#define DMATTN_KVCACHE_H

#include "internal.h"
#include "select.h"

struct dma_kv_cache {
    dma_kv_cache_params p;    /* page_len and max_pages resolved */
    size_t elem;              /* bytes per K/V element: 4 or 2 */
    size_t head_bytes;        /* K (or V) bytes of one kv head in one page */
    size_t page_bytes;
    int64_t pages_per_entry;  /* ceil(max_len / page_len) */
    int page_shift;           /* log2(page_len) when it is a power of two, else -1 */
    unsigned char **pages;    /* [max_pages]: the pool's pages, the first npages allocated */
    int64_t npages;
    unsigned char **arenas;   /* the allocations the pages are carved from */
    int64_t narenas;
    int64_t *free_ids;        /* [max_pages]: page ids no entry uses */
    int64_t nfree;
    int64_t *table;           /* [B][pages_per_entry]: page id of each of an entry's pages */
    int64_t *len;             /* [B] tokens held */
    int64_t *last_n;          /* [B] tokens of the entry's last non-empty append */
    heap_item *heap;          /* [B * Hkv][window] */
    int64_t *heap_n;          /* [B * Hkv] */
    int32_t *jout;            /* [B * Hkv][jcap]: key pushed out at each appended position, -1 */
    uint8_t *jin;             /* [B * Hkv][jcap]: 1 when the position's own key entered */
    int64_t jcap;
};

/* Page index and row within the page of position pos (a shift for power-of-two pages: the
 * decode gathers thousands of scattered rows per step, where a division each costs). */
static inline int64_t dma_kv_page_of(const dma_kv_cache *c, int64_t pos, int64_t *row)
{
    if (c->page_shift >= 0) {
        *row = pos & (c->p.page_len - 1);
        return pos >> c->page_shift;
    }
    *row = pos % c->p.page_len;
    return pos / c->p.page_len;
}

/* Row `pos` of entry b, kv head h: its K row, V row and bias. */
static inline const unsigned char *dma_kv_k_row(const dma_kv_cache *c, int64_t b, int64_t h,
                                                int64_t pos)
{
    int64_t row, pg = dma_kv_page_of(c, pos, &row);
    const unsigned char *page = c->pages[c->table[b * c->pages_per_entry + pg]];
    return page + (size_t)h * c->head_bytes + (size_t)row * (size_t)c->p.head_dim * c->elem;
}

static inline const unsigned char *dma_kv_v_row(const dma_kv_cache *c, int64_t b, int64_t h,
                                                int64_t pos)
{
    return dma_kv_k_row(c, b, h, pos) + (size_t)c->p.kv_heads * c->head_bytes;
}

static inline const float *dma_kv_bias_ptr(const dma_kv_cache *c, int64_t b, int64_t h,
                                           int64_t pos)
{
    int64_t row, pg = dma_kv_page_of(c, pos, &row);
    const unsigned char *page = c->pages[c->table[b * c->pages_per_entry + pg]];
    const float *bias = (const float *)(page + 2 * (size_t)c->p.kv_heads * c->head_bytes);
    return bias + h * c->p.page_len + row;
}

static inline float dma_kv_bias_at(const dma_kv_cache *c, int64_t b, int64_t h, int64_t pos)
{
    return *dma_kv_bias_ptr(c, b, h, pos);
}

/* The selection of the newest rows of every entry as a sparsity object (B, H, Lq, max length):
 * TOPK (H = Hkv) from the heaps and journals, DENSE or WINDOW (H = 1) as ranges. Entry b's rows
 * 0 .. n_b - 1 are its positions len_b - n_b + i, n_b = counts ? counts[b] : Lq; later rows are
 * empty. The caller has checked n_b <= len_b (and <= last_n[b] for TOPK). */
dma_status dma_kv_select(dma_context *ctx, const dma_kv_cache *cache, dma_mask_kind kind,
                         int64_t window, int64_t Lq, const int64_t *counts, dma_sparsity **out);

/* Gather n keys of entry b, head h (keys[c], or first + c when keys is NULL) for the forward:
 * K as float32 rows in `stage` (n * D floats, row stride D; rows n .. n_pad - 1 zeroed when kp
 * is NULL) and, unless kp is NULL, packed from there into kp; V into float32 rows of vp with
 * stride ldv (zero-padded to ldv), whatever the storage. */
void dma_kv_gather(const dma_kv_cache *cache, const dma_kernels *kern, int64_t b, int64_t h,
                   const int32_t *keys, int32_t first, int n, int n_pad, float *kp, float *vp,
                   int ldv, float *stage);

/* The bias of those n keys into dst, zero from n to n_pad: from the selection sp when keys is
 * its union (dma_kv_select carries each key's bias), else read from the pages. */
void dma_kv_gather_bias(const dma_kv_cache *cache, const dma_sparsity *sp, int64_t b, int64_t h,
                        const int32_t *keys, int32_t first, int n, int n_pad, float *dst);

#endif /* DMATTN_KVCACHE_H */

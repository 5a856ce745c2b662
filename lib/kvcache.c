/*
 * kvcache.c - the paged KV cache (DESIGN §2 "KV cache"): creation, the page pool, appends with
 * the incremental top-window selection, and what the forward gathers from it. The selection of
 * an append's rows is rebuilt in kvcache_select.c, the attention over the cache runs in
 * kvcache_forward.c.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>
#include <sys/mman.h>

#include "kvcache.h"

static size_t dtype_bytes(dma_dtype t) { return t == DMA_F32 ? 4 : 2; }

dma_status dma_kv_cache_create(dma_context *ctx, const dma_kv_cache_params *params,
                               dma_kv_cache **out)
{
    if (!ctx || !params || !out)
        return dma_fail(ctx, DMA_ERR_NULL, "kv_cache_create: ctx, params and out are required");
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_cpu_only(ctx, "kv_cache_create");
    dma_kv_cache_params p = *params;
    if (p.page_len == 0)
        p.page_len = 256;
    if (p.batch < 1 || p.kv_heads < 1 || p.max_len < 1 || p.max_len > INT32_MAX ||
        p.page_len < 1 || p.page_len > INT32_MAX || p.max_pages < 0)
        return dma_fail(ctx, DMA_ERR_SHAPE, "kv_cache_create: batch, kv_heads, max_len (<= 2^31-1) "
                        "and page_len must be >= 1, max_pages >= 0");
    if (p.head_dim < 1 || p.head_dim > DMA_MAX_HEAD_DIM)
        return dma_fail(ctx, DMA_ERR_HEAD_DIM, "kv_cache_create: head_dim %lld is outside 1..%d",
                        (long long)p.head_dim, DMA_MAX_HEAD_DIM);
    if (p.dtype != DMA_F32 && p.dtype != DMA_BF16 && p.dtype != DMA_F16)
        return dma_fail(ctx, DMA_ERR_DTYPE, "kv_cache_create: dtype must be F32, BF16 or F16");
    if (p.window < 0)
        return dma_fail(ctx, DMA_ERR_WINDOW, "kv_cache_create: window %lld must be >= 0",
                        (long long)p.window);
    p.window = dma_min64(p.window, p.max_len); /* never more keys than a row can see */
    int64_t per_entry = dma_div_up(p.max_len, p.page_len), all_pages, slabs, heap_items, bytes;
    if (!dma_mul_ok(p.batch, per_entry, &all_pages) || !dma_mul_ok(p.batch, p.kv_heads, &slabs) ||
        !dma_mul_ok(slabs, p.window, &heap_items) ||
        !dma_mul_ok(p.page_len, p.head_dim * (int64_t)dtype_bytes(p.dtype), &bytes) ||
        !dma_mul_ok(bytes, 2 * p.kv_heads, &bytes) || bytes > INT64_MAX / 2)
        return dma_fail(ctx, DMA_ERR_OVERFLOW, "kv_cache_create: sizes overflow");
    if (p.max_pages == 0 || p.max_pages > all_pages)
        p.max_pages = all_pages;

    dma_kv_cache *c = calloc(1, sizeof *c);
    if (!c)
        return dma_fail(ctx, DMA_ERR_NOMEM, "kv_cache_create: out of memory");
    c->p = p;
    c->elem = dtype_bytes(p.dtype);
    c->head_bytes = (size_t)p.page_len * (size_t)p.head_dim * c->elem;
    c->page_bytes = 2 * (size_t)p.kv_heads * c->head_bytes +
                    (size_t)p.kv_heads * (size_t)p.page_len * sizeof(float);
    c->pages_per_entry = per_entry;
    c->page_shift = -1;
    if ((p.page_len & (p.page_len - 1)) == 0)
        c->page_shift = __builtin_ctzll((unsigned long long)p.page_len);
    c->pages = calloc((size_t)p.max_pages, sizeof *c->pages);
    c->arenas = calloc((size_t)p.max_pages, sizeof *c->arenas); /* at most one per page */
    c->free_ids = malloc(sizeof(int64_t) * (size_t)p.max_pages);
    c->table = malloc(sizeof(int64_t) * (size_t)all_pages);
    c->len = calloc((size_t)p.batch, sizeof(int64_t));
    c->last_n = calloc((size_t)p.batch, sizeof(int64_t));
    c->heap = malloc(sizeof(heap_item) * (size_t)(heap_items ? heap_items : 1));
    c->heap_n = calloc((size_t)slabs, sizeof(int64_t));
    if (!c->pages || !c->arenas || !c->free_ids || !c->table || !c->len || !c->last_n || !c->heap ||
        !c->heap_n) {
        dma_kv_cache_destroy(c);
        return dma_fail(ctx, DMA_ERR_NOMEM, "kv_cache_create: out of memory");
    }
    for (int64_t i = 0; i < all_pages; i++)
        c->table[i] = -1;
    *out = c;
    return DMA_OK;
}

void dma_kv_cache_destroy(dma_kv_cache *c)
{
    if (!c)
        return;
    for (int64_t i = 0; i < c->narenas; i++)
        free(c->arenas[i]);
    free(c->arenas);
    free(c->pages);
    free(c->free_ids);
    free(c->table);
    free(c->len);
    free(c->last_n);
    free(c->heap);
    free(c->heap_n);
    free(c->jout);
    free(c->jin);
    free(c);
}

dma_kv_cache_params dma_kv_cache_get_params(const dma_kv_cache *c) { return c->p; }

int64_t dma_kv_cache_length(const dma_kv_cache *c, int64_t b)
{
    return b >= 0 && b < c->p.batch ? c->len[b] : -1;
}

void dma_kv_cache_pages(const dma_kv_cache *c, int64_t *in_use, int64_t *allocated)
{
    if (in_use)
        *in_use = c->npages - c->nfree;
    if (allocated)
        *allocated = c->npages;
}

static void reset_entry(dma_kv_cache *c, int64_t b)
{
    int64_t *row = c->table + b * c->pages_per_entry;
    for (int64_t i = 0; i < c->pages_per_entry && row[i] >= 0; i++) {
        c->free_ids[c->nfree++] = row[i];
        row[i] = -1;
    }
    c->len[b] = 0;
    c->last_n[b] = 0;
    for (int64_t h = 0; h < c->p.kv_heads; h++)
        c->heap_n[b * c->p.kv_heads + h] = 0;
}

dma_status dma_kv_cache_reset(dma_kv_cache *c, int64_t b)
{
    if (!c)
        return DMA_ERR_NULL;
    if (b < -1 || b >= c->p.batch)
        return DMA_ERR_SHAPE;
    for (int64_t e = b < 0 ? 0 : b; e < (b < 0 ? c->p.batch : b + 1); e++)
        reset_entry(c, e);
    return DMA_OK;
}

/* ---- append ---- */

static dma_status check_kv(dma_context *ctx, const dma_kv_cache *c, const dma_tensor *k,
                           const dma_tensor *v, const dma_tensor *bias, const int64_t *counts)
{
    dma_status st;
    const dma_kv_cache_params *p = &c->p;
    if (!k || !v)
        return dma_fail(ctx, DMA_ERR_NULL, "kv_cache_append: k and v are required");
    if ((st = dma_check_tensor(ctx, "k", k, p->dtype, 4)) ||
        (st = dma_check_tensor(ctx, "v", v, p->dtype, 4)))
        return st;
    const int64_t n = k->shape[1];
    if (k->shape[0] != p->batch || k->shape[2] != p->kv_heads || k->shape[3] != p->head_dim)
        return dma_fail(ctx, DMA_ERR_SHAPE, "k: shape (%lld, %lld, %lld, %lld) is not (B %lld, n, "
                        "Hkv %lld, D %lld)", (long long)k->shape[0], (long long)n,
                        (long long)k->shape[2], (long long)k->shape[3], (long long)p->batch,
                        (long long)p->kv_heads, (long long)p->head_dim);
    for (int d = 0; d < 4; d++)
        if (v->shape[d] != k->shape[d])
            return dma_fail(ctx, DMA_ERR_SHAPE, "v: shape differs from k's in dimension %d", d);
    if (p->window > 0 && !bias)
        return dma_fail(ctx, DMA_ERR_NULL, "kv_cache_append: a cache with a window needs a bias");
    if (p->window == 0 && bias)
        return dma_fail(ctx, DMA_ERR_ARG, "kv_cache_append: a cache without a window takes no "
                        "bias");
    if (bias) {
        if ((st = dma_check_tensor(ctx, "bias", bias, DMA_F32, 4)))
            return st;
        if (bias->shape[0] != p->batch || bias->shape[1] != p->kv_heads || bias->shape[2] != 1 ||
            bias->shape[3] != n)
            return dma_fail(ctx, DMA_ERR_SHAPE, "bias: shape must be (B, Hkv, 1, n)");
    }
    for (int64_t b = 0; b < p->batch; b++) {
        int64_t cnt = counts ? counts[b] : n;
        if (cnt < 0 || cnt > n)
            return dma_fail(ctx, DMA_ERR_SHAPE, "counts[%lld] = %lld is outside 0..%lld",
                            (long long)b, (long long)cnt, (long long)n);
        if (cnt > p->max_len - c->len[b])
            return dma_fail(ctx, DMA_ERR_SHAPE, "entry %lld: %lld + %lld tokens exceed max_len %lld",
                            (long long)b, (long long)c->len[b], (long long)cnt,
                            (long long)p->max_len);
        if (!bias)
            continue;
        for (int64_t h = 0; h < p->kv_heads; h++)
            for (int64_t t = 0; t < cnt; t++) {
                float x = f32(bias)[b * bias->stride[0] + h * bias->stride[1] + t * bias->stride[3]];
                if (!bias_ok(x))
                    return dma_fail(ctx, DMA_ERR_BAD_VALUE, "bias: NaN or +inf at entry %lld, "
                                    "head %lld, token %lld", (long long)b, (long long)h,
                                    (long long)t);
            }
    }
    return DMA_OK;
}

/* Room in the journal for an append of n tokens, keeping what entries not appending hold. */
static bool grow_journal(dma_kv_cache *c, int64_t n)
{
    if (n <= c->jcap || c->p.window == 0)
        return true;
    int64_t slabs = c->p.batch * c->p.kv_heads, cap = dma_max64(n, 2 * c->jcap);
    int32_t *jout = malloc(sizeof(int32_t) * (size_t)(slabs * cap));
    uint8_t *jin = malloc((size_t)(slabs * cap));
    if (!jout || !jin) {
        free(jout);
        free(jin);
        return false;
    }
    for (int64_t s = 0; s < slabs; s++) {
        int64_t keep = c->last_n[s / c->p.kv_heads];
        if (keep) {
            memcpy(jout + s * cap, c->jout + s * c->jcap, sizeof(int32_t) * (size_t)keep);
            memcpy(jin + s * cap, c->jin + s * c->jcap, (size_t)keep);
        }
    }
    free(c->jout);
    free(c->jin);
    c->jout = jout;
    c->jin = jin;
    c->jcap = cap;
    return true;
}

/* Pages are carved from arenas of several pages. A large arena is 2 MiB aligned and marked for
 * transparent huge pages: a decode step reads thousands of rows scattered over the whole cache,
 * and with 4 KiB pages nearly every row would cost a TLB miss. */
#define ARENA_BYTES ((size_t)8 << 20)
#define HUGE_BYTES ((size_t)2 << 20)

static unsigned char *new_arena(size_t bytes)
{
    if (bytes < HUGE_BYTES)
        return dma_alloc(bytes);
    bytes = (bytes + HUGE_BYTES - 1) / HUGE_BYTES * HUGE_BYTES;
    unsigned char *a = aligned_alloc(HUGE_BYTES, bytes);
#ifdef MADV_HUGEPAGE
    if (a)
        madvise(a, bytes, MADV_HUGEPAGE); /* a hint: failure changes nothing */
#endif
    return a;
}

/* Make sure the pool can give `need` pages: allocate what the free list lacks, in arenas. All
 * or nothing. */
static bool reserve_pages(dma_kv_cache *c, int64_t need)
{
    int64_t missing = need - c->nfree;
    if (missing <= 0)
        return true;
    if (missing > c->p.max_pages - c->npages)
        return false;
    const int64_t first = c->npages, first_arena = c->narenas;
    while (c->npages - first < missing) {
        /* As many pages as fit an arena (at least one), but never beyond max_pages. */
        int64_t per_arena = dma_max64(1, (int64_t)(ARENA_BYTES / c->page_bytes));
        per_arena = dma_min64(per_arena, c->p.max_pages - c->npages);
        unsigned char *a = new_arena((size_t)per_arena * c->page_bytes);
        if (!a) {
            for (int64_t j = first_arena; j < c->narenas; j++)
                free(c->arenas[j]);
            c->narenas = first_arena;
            c->npages = first;
            return false;
        }
        c->arenas[c->narenas++] = a;
        for (int64_t j = 0; j < per_arena; j++)
            c->pages[c->npages++] = a + (size_t)j * c->page_bytes;
    }
    /* New pages join the free list only once all exist, so a failure leaves it as it was. */
    for (int64_t j = first; j < c->npages; j++)
        c->free_ids[c->nfree++] = j;
    return true;
}

/* Copy token t of (b, h) from a (B, n, Hkv, D) tensor into its page row. */
static void store_row(unsigned char *dst, const dma_tensor *src, size_t elem, int64_t b,
                      int64_t t, int64_t h, int64_t D)
{
    const unsigned char *s = (const unsigned char *)src->data +
        (size_t)(b * src->stride[0] + t * src->stride[1] + h * src->stride[2]) * elem;
    memcpy(dst, s, (size_t)D * elem);
}

/* Offer the appended keys of (b, h) to its heap, recording the journal. */
static void select_append(dma_kv_cache *c, int64_t b, int64_t h, int64_t first, int64_t cnt)
{
    const int64_t s = b * c->p.kv_heads + h, w = c->p.window;
    heap_item *heap = c->heap + s * w;
    int32_t *jout = c->jout + s * c->jcap;
    uint8_t *jin = c->jin + s * c->jcap;
    for (int64_t t = 0; t < cnt; t++) {
        const int64_t pos = first + t;
        const float x = dma_kv_bias_at(c, b, h, pos);
        jin[t] = 0;
        jout[t] = -1;
        if (x == -INFINITY)
            continue; /* never kept, pushes nothing out */
        int32_t gone = heap_offer(heap, &c->heap_n[s], w, (heap_item){x, (int32_t)pos});
        if (gone == (int32_t)pos)
            continue;
        jin[t] = 1;
        jout[t] = gone;
    }
}

dma_status dma_kv_cache_append(dma_context *ctx, dma_kv_cache *c, const dma_tensor *k,
                               const dma_tensor *v, const dma_tensor *bias,
                               const int64_t *counts)
{
    if (!ctx || !c)
        return dma_fail(ctx, DMA_ERR_NULL, "kv_cache_append: ctx and cache are required");
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_cpu_only(ctx, "kv_cache_append");
    dma_status st = check_kv(ctx, c, k, v, bias, counts);
    if (st != DMA_OK)
        return st;
    const dma_kv_cache_params *p = &c->p;
    const int64_t n = k->shape[1], P = p->page_len, B = p->batch, H = p->kv_heads;
    int64_t need = 0, most = 0;
    for (int64_t b = 0; b < B; b++) {
        int64_t cnt = counts ? counts[b] : n;
        need += dma_div_up(c->len[b] + cnt, P) - dma_div_up(c->len[b], P);
        most = dma_max64(most, cnt);
    }
    if (!grow_journal(c, most))
        return dma_fail(ctx, DMA_ERR_NOMEM, "kv_cache_append: out of memory for the journal");
    if (!reserve_pages(c, need))
        return dma_fail(ctx, DMA_ERR_NOMEM, "kv_cache_append: the pool cannot give %lld more "
                        "pages (%lld of %lld in use)", (long long)need,
                        (long long)(c->npages - c->nfree), (long long)p->max_pages);
    /* Everything is checked and reserved: from here on nothing fails. */
    for (int64_t b = 0; b < B; b++) {
        int64_t cnt = counts ? counts[b] : n;
        int64_t *row = c->table + b * c->pages_per_entry;
        for (int64_t pg = dma_div_up(c->len[b], P); pg < dma_div_up(c->len[b] + cnt, P); pg++)
            row[pg] = c->free_ids[--c->nfree];
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(ctx->threads)
    for (int64_t s = 0; s < B * H; s++) {
        const int64_t b = s / H, h = s % H, cnt = counts ? counts[b] : n, len = c->len[b];
        for (int64_t t = 0; t < cnt; t++) {
            unsigned char *krow = (unsigned char *)dma_kv_k_row(c, b, h, len + t);
            store_row(krow, k, c->elem, b, t, h, p->head_dim);
            store_row((unsigned char *)dma_kv_v_row(c, b, h, len + t), v, c->elem, b, t, h,
                      p->head_dim);
            if (bias)
                *(float *)dma_kv_bias_ptr(c, b, h, len + t) =
                    f32(bias)[b * bias->stride[0] + h * bias->stride[1] + t * bias->stride[3]];
        }
        if (p->window > 0 && cnt > 0)
            select_append(c, b, h, len, cnt);
    }
    for (int64_t b = 0; b < B; b++) {
        int64_t cnt = counts ? counts[b] : n;
        c->len[b] += cnt;
        if (cnt > 0)
            c->last_n[b] = cnt;
    }
    return DMA_OK;
}

dma_status dma_kv_cache_append_dynamic(dma_context *ctx, dma_kv_cache *c, const dma_tensor *k,
                                       const dma_tensor *v, const dma_tensor *w_dt,
                                       const dma_tensor *b_dt, const dma_tensor *a,
                                       const int64_t *counts)
{
    if (!ctx || !c)
        return dma_fail(ctx, DMA_ERR_NULL, "kv_cache_append_dynamic: ctx and cache are required");
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_cpu_only(ctx, "kv_cache_append_dynamic");
    if (c->p.window == 0)
        return dma_fail(ctx, DMA_ERR_ARG, "kv_cache_append_dynamic: the cache has no window");
    if (!k || !v)
        return dma_fail(ctx, DMA_ERR_NULL, "kv_cache_append_dynamic: k and v are required");
    dma_status st = dma_check_tensor(ctx, "v", v, c->p.dtype, 4);
    if (st != DMA_OK)
        return st;
    const int64_t B = v->shape[0], n = v->shape[1], H = v->shape[2], D = v->shape[3];
    int64_t elems;
    if (!dma_mul_ok(B * n, H * D, &elems) || B * n < 0)
        return dma_fail(ctx, DMA_ERR_OVERFLOW, "v: size overflows");
    /* The bias op reads float32 values: convert 16-bit storage into a contiguous copy. */
    float *v32 = NULL, *bias = malloc(sizeof(float) * (size_t)dma_max64(1, B * H * n));
    dma_tensor vf = *v;
    if (bias && c->p.dtype != DMA_F32) {
        v32 = malloc(sizeof(float) * (size_t)dma_max64(1, elems));
        if (v32) {
            for (int64_t b = 0; b < B; b++)
                for (int64_t t = 0; t < n; t++)
                    for (int64_t h = 0; h < H; h++)
                        ctx->kernels->to_f32(v32 + ((b * n + t) * H + h) * D,
                                             (const uint16_t *)v->data + b * v->stride[0] +
                                                 t * v->stride[1] + h * v->stride[2],
                                             D, c->p.dtype == DMA_F16);
            vf = dma_tensor_4d(v32, DMA_F32, B, n, H, D);
        }
    }
    if (!bias || (c->p.dtype != DMA_F32 && !v32)) {
        free(bias);
        free(v32);
        return dma_fail(ctx, DMA_ERR_NOMEM, "kv_cache_append_dynamic: out of memory");
    }
    dma_tensor tb = dma_tensor_4d(bias, DMA_F32, B, H, 1, n);
    st = dma_dynamic_bias_forward(ctx, &vf, w_dt, b_dt, a, &tb);
    if (st == DMA_OK)
        st = dma_kv_cache_append(ctx, c, k, v, &tb, counts);
    free(bias);
    free(v32);
    return st;
}

dma_status dma_kv_cache_selection(const dma_kv_cache *c, int64_t b, int64_t h, int32_t *keys,
                                  int64_t cap, int64_t *n)
{
    if (!c || !keys || !n)
        return DMA_ERR_NULL;
    if (b < 0 || b >= c->p.batch || h < 0 || h >= c->p.kv_heads)
        return DMA_ERR_SHAPE;
    if (c->p.window == 0)
        return DMA_ERR_ARG;
    const int64_t s = b * c->p.kv_heads + h, count = c->heap_n[s];
    if (cap < count) {
        *n = count;
        return DMA_ERR_BUFFER;
    }
    for (int64_t i = 0; i < count; i++)
        keys[i] = c->heap[s * c->p.window + i].key;
    qsort(keys, (size_t)count, sizeof(int32_t), cmp_i32);
    *n = count;
    return DMA_OK;
}

dma_status dma_kv_cache_sparsity(dma_context *ctx, const dma_kv_cache *c, int64_t Lq,
                                 dma_sparsity **out)
{
    if (!ctx || !c || !out)
        return dma_fail(ctx, DMA_ERR_NULL, "kv_cache_sparsity: ctx, cache and out are required");
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_cpu_only(ctx, "kv_cache_sparsity");
    if (c->p.window == 0)
        return dma_fail(ctx, DMA_ERR_ARG, "kv_cache_sparsity: the cache has no window");
    for (int64_t b = 0; b < c->p.batch; b++)
        if (Lq < 0 || Lq > c->last_n[b])
            return dma_fail(ctx, DMA_ERR_SHAPE, "kv_cache_sparsity: %lld rows, but entry %lld's "
                            "last append added %lld", (long long)Lq, (long long)b,
                            (long long)c->last_n[b]);
    return dma_kv_select(ctx, c, DMA_MASK_TOPK, 0, Lq, NULL, out);
}

/* ---- what the forward reads ---- */

void dma_kv_gather(const dma_kv_cache *c, const dma_kernels *kern, int64_t b, int64_t h,
                   const int32_t *keys, int32_t first, int n, int n_pad, float *kp, float *vp,
                   int ldv, float *stage)
{
    const int D = (int)c->p.head_dim;
    if (!kp) /* rows dots reads past n, up to the block: zeros, as pack_k's */
        memset(stage + (int64_t)n * D, 0, sizeof(float) * (size_t)(n_pad - n) * (size_t)D);
    const int f16 = c->p.dtype == DMA_F16;
    const int64_t P = c->p.page_len;
    if (!keys && n > 0 && first / P == (first + n - 1) / P) {
        /* A run of keys within one page (the dense decode's case). K is copied in one
         * sequential memcpy and packed from there: the hardware streams the copy at full speed,
         * where the packing transpose reading 8 rows at a time from memory does not. Reading
         * float32 V in place for accum_pv was measured slower than copying it, for the same
         * reason. */
        const unsigned char *krow = dma_kv_k_row(c, b, h, first);
        const unsigned char *vrow = dma_kv_v_row(c, b, h, first);
        if (c->p.dtype != DMA_F32) {
            if (kp) {
                memcpy(stage, krow, sizeof(uint16_t) * (size_t)n * (size_t)D);
                kern->pack_k_half(kp, (const uint16_t *)stage, D, NULL, 0, n, D, f16);
            } else {
                kern->to_f32(stage, (const uint16_t *)krow, (int64_t)n * D, f16);
            }
            for (int i = 0; i < n; i++) {
                kern->to_f32(vp + (int64_t)i * ldv, (const uint16_t *)vrow + (int64_t)i * D, D,
                             f16);
                memset(vp + (int64_t)i * ldv + D, 0, sizeof(float) * (size_t)(ldv - D));
            }
            return;
        }
        memcpy(stage, krow, sizeof(float) * (size_t)n * (size_t)D);
        if (kp)
            kern->pack_k(kp, stage, D, NULL, 0, n, D);
        kern->pack_v(vp, ldv, (const float *)vrow, D, NULL, 0, n, D);
        return;
    }
    /* Selected keys are scattered over the pages: ask for rows a few keys ahead, so that the
     * memory latencies overlap instead of adding up. */
    enum { AHEAD = 16 };
    const size_t row_bytes = (size_t)D * c->elem;
    for (int i = keys ? -AHEAD : 0; i < n; i++) {
        if (keys && i + AHEAD < n) {
            const unsigned char *next = dma_kv_k_row(c, b, h, keys[i + AHEAD]);
            for (size_t x = 0; x < row_bytes; x += 64) {
                __builtin_prefetch(next + x);
                __builtin_prefetch(next + (size_t)c->p.kv_heads * c->head_bytes + x);
            }
        }
        if (i < 0)
            continue;
        const int64_t pos = keys ? keys[i] : first + i;
        const unsigned char *krow = dma_kv_k_row(c, b, h, pos);
        const unsigned char *vrow = krow + (size_t)c->p.kv_heads * c->head_bytes;
        float *vdst = vp + (int64_t)i * ldv;
        if (c->p.dtype == DMA_F32) {
            memcpy(stage + (int64_t)i * D, krow, sizeof(float) * (size_t)D);
            memcpy(vdst, vrow, sizeof(float) * (size_t)D);
        } else {
            kern->to_f32(stage + (int64_t)i * D, (const uint16_t *)krow, D, f16);
            kern->to_f32(vdst, (const uint16_t *)vrow, D, f16);
        }
        memset(vdst + D, 0, sizeof(float) * (size_t)(ldv - D));
    }
    if (kp)
        kern->pack_k(kp, stage, D, NULL, 0, n, D);
}

void dma_kv_gather_bias(const dma_kv_cache *c, const dma_sparsity *sp, int64_t b, int64_t h,
                        const int32_t *keys, int32_t first, int n, int n_pad, float *dst)
{
    if (keys) /* a selection's union: the selection carries the biases (no scattered reads) */
        memcpy(dst, sp->vals + (keys - sp->keys), sizeof(float) * (size_t)n);
    else
        for (int i = 0; i < n; i++)
            dst[i] = dma_kv_bias_at(c, b, h, first + i);
    for (int i = n; i < n_pad; i++)
        dst[i] = 0.0f;
}

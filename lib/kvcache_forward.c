/*
 * kvcache_forward.c - attention of the newest rows over a KV cache (decode, chunked prefill,
 * ragged batches): validation, the selection of those rows (kvcache_select.c), then the
 * forward's own work items (forward.c) with K, V and the bias gathered from the cache's pages.
 */
#include <math.h>
#include <stdlib.h>

#include "kvcache.h"

static dma_status check_forward(dma_context *ctx, const dma_kv_cache *c, const dma_tensor *q,
                                const int64_t *counts, const dma_kv_attn_params *p,
                                const dma_tensor *out, const dma_tensor *lse)
{
    dma_status st;
    const dma_kv_cache_params *cp = &c->p;
    if (!q || !out)
        return dma_fail(ctx, DMA_ERR_NULL, "kv_forward: q and out are required");
    if (q->dtype != DMA_F32 && q->dtype != cp->dtype)
        return dma_fail(ctx, DMA_ERR_DTYPE, "q: dtype must be float32 or the cache's");
    if ((st = dma_check_tensor(ctx, "q", q, q->dtype, 4)) ||
        (st = dma_check_tensor(ctx, "out", out, q->dtype, 4)))
        return st;
    const int64_t B = q->shape[0], Lq = q->shape[1], Hq = q->shape[2], D = q->shape[3];
    if (B != cp->batch || D != cp->head_dim)
        return dma_fail(ctx, DMA_ERR_SHAPE, "q: batch %lld and head dim %lld must be the cache's "
                        "(%lld, %lld)", (long long)B, (long long)D, (long long)cp->batch,
                        (long long)cp->head_dim);
    if (Hq < 1 || Hq % cp->kv_heads != 0)
        return dma_fail(ctx, DMA_ERR_HEADS, "q: Hq = %lld is not a positive multiple of Hkv = "
                        "%lld", (long long)Hq, (long long)cp->kv_heads);
    for (int d = 0; d < 4; d++)
        if (out->shape[d] != q->shape[d])
            return dma_fail(ctx, DMA_ERR_SHAPE, "out: shape differs from q's in dimension %d", d);
    if ((st = dma_check_lse(ctx, lse, B, Hq, Lq)))
        return st;
    if (p->kind != DMA_MASK_TOPK && p->kind != DMA_MASK_WINDOW && p->kind != DMA_MASK_DENSE)
        return dma_fail(ctx, DMA_ERR_ARG, "kv_forward: kind must be TOPK, WINDOW or DENSE");
    if ((p->kind == DMA_MASK_TOPK || p->add_bias) && cp->window == 0)
        return dma_fail(ctx, DMA_ERR_ARG, "kv_forward: TOPK and add_bias need a cache with a "
                        "window");
    if (p->kind == DMA_MASK_WINDOW && p->window < 0)
        return dma_fail(ctx, DMA_ERR_WINDOW, "kv_forward: window %lld must be >= 0",
                        (long long)p->window);
    if ((st = dma_check_scale(ctx, p->scale, p->softcap)))
        return st;
    for (int64_t b = 0; b < B; b++) {
        int64_t n = counts ? counts[b] : Lq;
        int64_t most = p->kind == DMA_MASK_TOPK ? c->last_n[b] : c->len[b];
        if (n < 0 || n > Lq || n > most)
            return dma_fail(ctx, DMA_ERR_SHAPE, "entry %lld: %lld rows, but it has %lld%s (and q "
                            "%lld rows)", (long long)b, (long long)n, (long long)most,
                            p->kind == DMA_MASK_TOPK ? " rows from its last append" : " tokens",
                            (long long)Lq);
    }
    return dma_check_apart(ctx, (dma_named_tensor[]){{"out", out}, {"lse", lse}}, 2,
                           (dma_named_tensor[]){{"q", q}}, 1, true);
}

dma_status dma_kv_forward(dma_context *ctx, const dma_kv_cache *cache, const dma_tensor *q,
                          const int64_t *counts, const dma_kv_attn_params *params,
                          dma_tensor *out, dma_tensor *lse)
{
    if (!ctx || !cache || !params)
        return dma_fail(ctx, DMA_ERR_NULL, "kv_forward: ctx, cache and params are required");
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_cpu_only(ctx, "kv_forward");
    dma_status st = check_forward(ctx, cache, q, counts, params, out, lse);
    if (st != DMA_OK || q->shape[1] == 0)
        return st;
    const int64_t Lq = q->shape[1], Hq = q->shape[2], D = q->shape[3];
    dma_sparsity *sp;
    st = dma_kv_select(ctx, cache, params->kind, dma_min64(params->window, INT32_MAX), Lq, counts,
                       &sp);
    if (st != DMA_OK)
        return st;
    dma_attn a = {.kern = ctx->kernels, .B = cache->p.batch, .Lq = Lq, .Lk = sp->Lk, .Hq = Hq,
                  .Hkv = cache->p.kv_heads, .D = D,
                  .scale = dma_scale_or_default(params->scale, D),
                  .softcap = params->softcap, .q = q, .out = out, .lse = lse, .sp = sp,
                  .heads_per_group = Hq / cache->p.kv_heads, .cache = cache,
                  .cache_bias = params->add_bias != 0};
    a.items_per_group = dma_div_up(a.heads_per_group, DMA_HEADS_PER_ITEM);
    a.ld = (int)dma_div_up(D, 16) * 16;
    st = dma_forward_run(ctx, &a);
    dma_sparsity_destroy(sp);
    return st;
}

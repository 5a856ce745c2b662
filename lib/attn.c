/*
 * attn.c - what the forward and the backward share: argument validation, the work items, and the
 * per-item views of rows, unions, masks and biases.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

dma_status dma_check_lse(dma_context *ctx, const dma_tensor *lse, int64_t B, int64_t Hq,
                         int64_t Lq)
{
    if (!lse)
        return DMA_OK;
    dma_status st = dma_check_tensor(ctx, "lse", lse, DMA_F32, 3);
    if (st == DMA_OK && (lse->shape[0] != B || lse->shape[1] != Hq || lse->shape[2] != Lq))
        st = dma_fail(ctx, DMA_ERR_SHAPE, "lse: shape must be (B, Hq, Lq)");
    return st;
}

dma_status dma_check_scale(dma_context *ctx, float scale, float softcap)
{
    if (!isfinite(scale) || !isfinite(softcap) || softcap < 0.0f)
        return dma_fail(ctx, DMA_ERR_BAD_VALUE, "params: scale must be finite and softcap finite "
                        "and >= 0");
    return DMA_OK;
}

dma_status dma_attn_check(dma_context *ctx, const dma_tensor *q, const dma_tensor *k,
                          const dma_tensor *v, const dma_tensor *bias, const dma_sparsity *sp,
                          const dma_attn_params *params, const dma_tensor *out,
                          const dma_tensor *lse, dma_attn *a)
{
    dma_status st;
    if (!q || !k || !v || !out)
        return dma_fail(ctx, DMA_ERR_NULL, "q, k, v and out are required");
    /* q, k, v and out share one storage type: float32, bf16 or f16 (computed in float32). */
    const dma_dtype dt = dma_is_float(q->dtype) ? q->dtype : DMA_F32;
    if ((st = dma_check_tensor(ctx, "q", q, dt, 4)) ||
        (st = dma_check_tensor(ctx, "k", k, dt, 4)) ||
        (st = dma_check_tensor(ctx, "v", v, dt, 4)) ||
        (st = dma_check_tensor(ctx, "out", out, dt, 4)))
        return st;
    const int64_t B = q->shape[0], Lq = q->shape[1], Hq = q->shape[2], D = q->shape[3];
    const int64_t Lk = k->shape[1], Hkv = k->shape[2];
    if (D < 1 || D > DMA_MAX_HEAD_DIM)
        return dma_fail(ctx, DMA_ERR_HEAD_DIM, "q: head dimension %lld is outside 1..%d",
                        (long long)D, DMA_MAX_HEAD_DIM);
    if (Hq < 1 || Hkv < 1 || Hq % Hkv != 0)
        return dma_fail(ctx, DMA_ERR_HEADS, "heads: Hq = %lld must be a positive multiple of "
                        "Hkv = %lld", (long long)Hq, (long long)Hkv);
    if (k->shape[0] != B || k->shape[3] != D)
        return dma_fail(ctx, DMA_ERR_SHAPE, "k: shape (%lld, %lld, %lld, %lld) does not match q's "
                        "batch %lld and head dim %lld", (long long)k->shape[0], (long long)Lk,
                        (long long)Hkv, (long long)k->shape[3], (long long)B, (long long)D);
    for (int d = 0; d < 4; d++) {
        if (v->shape[d] != k->shape[d])
            return dma_fail(ctx, DMA_ERR_SHAPE, "v: shape differs from k's in dimension %d", d);
        if (out->shape[d] != q->shape[d])
            return dma_fail(ctx, DMA_ERR_SHAPE, "out: shape differs from q's in dimension %d", d);
    }
    if (Lq > INT32_MAX || Lk > INT32_MAX)
        return dma_fail(ctx, DMA_ERR_OVERFLOW, "Lq and Lk must be <= 2^31-1");
    if (bias) {
        if ((st = dma_check_tensor(ctx, "bias", bias, DMA_F32, 4)))
            return st;
        if (!dma_is_bcast(bias->shape[0], B) ||
            !(bias->shape[1] == 1 || bias->shape[1] == Hkv || bias->shape[1] == Hq) ||
            !dma_is_bcast(bias->shape[2], Lq) || bias->shape[3] != Lk)
            return dma_fail(ctx, DMA_ERR_SHAPE, "bias: shape (%lld, %lld, %lld, %lld) is not "
                            "(1|B, 1|Hkv|Hq, 1|Lq, Lk)", (long long)bias->shape[0],
                            (long long)bias->shape[1], (long long)bias->shape[2],
                            (long long)bias->shape[3]);
    }
    if (sp && (sp->Lq != Lq || sp->Lk != Lk || !dma_is_bcast(sp->B, B) ||
               !(sp->H == 1 || sp->H == Hkv || sp->H == Hq)))
        return dma_fail(ctx, DMA_ERR_SHAPE, "sparsity: (B %lld, H %lld, Lq %lld, Lk %lld) does "
                        "not fit (B %lld, H 1|%lld|%lld, Lq %lld, Lk %lld)", (long long)sp->B,
                        (long long)sp->H, (long long)sp->Lq, (long long)sp->Lk, (long long)B,
                        (long long)Hkv, (long long)Hq, (long long)Lq, (long long)Lk);
    if (sp && (st = dma_device_match(ctx, sp)))
        return st;
    if ((st = dma_check_lse(ctx, lse, B, Hq, Lq)))
        return st;
    dma_attn_params p = {0};
    if (params)
        p = *params;
    if ((st = dma_check_scale(ctx, p.scale, p.softcap)))
        return st;
    int64_t hs = sp ? sp->H : 1;
    *a = (dma_attn){.kern = ctx->kernels, .B = B, .Lq = Lq, .Lk = Lk, .Hq = Hq, .Hkv = Hkv,
                    .D = D, .off = Lk - Lq,
                    .scale = dma_scale_or_default(p.scale, D),
                    .softcap = p.softcap, .causal = p.causal != 0, .q = q, .k = k, .v = v,
                    .bias = bias, .out = out, .lse = lse, .sp = sp,
                    .heads_per_group = Hq / (Hkv > hs ? Hkv : hs)};
    a->items_per_group = dma_div_up(a->heads_per_group, DMA_HEADS_PER_ITEM);
    a->ld = (int)dma_div_up(D, 16) * 16;
    return DMA_OK;
}

dma_status dma_attn_prepare(dma_context *ctx, dma_attn *a)
{
    if (a->sp)
        return DMA_OK;
    /* Every visible key: the DENSE builder makes contiguous unions and row ranges, no masks. */
    dma_mask_params dense = {.kind = DMA_MASK_DENSE, .causal = a->causal};
    dma_status st = dma_sparsity_build(ctx, &dense, 1, 1, a->Lq, a->Lk, NULL, NULL, &a->owned_sp);
    a->sp = a->owned_sp;
    return st;
}

void dma_attn_release(dma_attn *a)
{
    dma_sparsity_destroy(a->owned_sp);
    a->owned_sp = NULL;
}

dma_status dma_attn_items(dma_context *ctx, const dma_attn *a, dma_item **items, int64_t *nitems)
{
    const dma_sparsity *sp = a->sp;
    int64_t groups = a->Hq / a->heads_per_group;
    int64_t n = a->B * groups * a->items_per_group * sp->ntiles;
    dma_item *list = malloc(sizeof(dma_item) * (size_t)(n ? n : 1));
    if (!list)
        return dma_fail(ctx, DMA_ERR_NOMEM, "out of memory for %lld work items", (long long)n);
    int64_t x = 0;
    for (int64_t b = 0; b < a->B; b++)
        for (int64_t gi = 0; gi < groups; gi++)
            for (int64_t sub = 0; sub < a->items_per_group; sub++)
                for (int64_t t = 0; t < sp->ntiles; t++) {
                    int64_t h0 = gi * a->heads_per_group;
                    int64_t slab = (sp->B == 1 ? 0 : b) * sp->H + h0 / (a->Hq / sp->H);
                    list[x++] = (dma_item){b, gi, sub, t, sp->tiles[slab * sp->ntiles + t].count};
                }
    *items = list;
    *nitems = n;
    return DMA_OK;
}

void dma_item_view_init(const dma_attn *a, const dma_item *it, dma_item_view *iv)
{
    const dma_sparsity *sp = a->sp;
    const int64_t g = a->heads_per_group;
    iv->h0 = it->group * g + it->sub * DMA_HEADS_PER_ITEM;
    iv->nh = dma_min64(DMA_HEADS_PER_ITEM, g - it->sub * DMA_HEADS_PER_ITEM);
    iv->hkv = iv->h0 / (a->Hq / a->Hkv);
    iv->slab = (sp->B == 1 ? 0 : it->b) * sp->H + iv->h0 / (a->Hq / sp->H);
    const dma_tile *tile = &sp->tiles[iv->slab * sp->ntiles + it->tile];
    iv->keys = tile->key_off >= 0 ? sp->keys + tile->key_off : NULL;
    iv->first = tile->first;
    iv->count = tile->count;
    iv->bits = tile->word_off >= 0 ? sp->words + tile->word_off : NULL;
    iv->words_per_row = tile->words_per_row;
    iv->r0 = it->tile * DMA_TILE;
    iv->nrows = dma_min64(a->Lq, iv->r0 + DMA_TILE) - iv->r0;
    iv->M = iv->nh * iv->nrows;
    iv->koff = a->k ? it->b * a->k->stride[0] + iv->hkv * a->k->stride[2] : 0;
    iv->voff = a->v ? it->b * a->v->stride[0] + iv->hkv * a->v->stride[2] : 0;
    iv->kbase = a->k && a->k->dtype == DMA_F32 ? f32(a->k) + iv->koff : NULL;
    iv->vbase = a->v && a->v->dtype == DMA_F32 ? f32(a->v) + iv->voff : NULL;
    /* The causal cut (positions of keys <= the row's last visible key) grows by at most one a
     * row (keys are distinct): one search for the first row, then a step. */
    int32_t cut = a->causal ? dma_tile_cut(sp, tile, iv->r0 + a->off) : 0;
    for (int64_t i = 0; i < iv->nrows; i++) {
        int64_t row = iv->slab * sp->Lq + iv->r0 + i;
        int32_t lo = sp->row_lo[row], hi = sp->row_hi[row];
        if (a->causal) {
            if (i > 0) {
                const int64_t last = iv->r0 + i + a->off;
                cut += cut < iv->count && dma_view_key(iv, cut) <= last;
            }
            hi = hi < cut ? hi : cut;
        }
        iv->lo[i] = hi > lo ? lo : 0;
        iv->hi[i] = hi > lo ? hi : 0;
    }
}

void dma_item_load_rows_range(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                              const dma_tensor *src, float scale, float *dst, int64_t ld,
                              int64_t r0, int64_t r1)
{
    for (int64_t r = r0; r < r1; r++) {
        const int64_t off = dma_item_row_offset(src, it, iv, r);
        float *d = dst + r * ld;
        if (src->dtype == DMA_F32) {
            a->kern->scale_row(d, f32(src) + off, scale, (int)a->D);
        } else {
            a->kern->to_f32(d, (const uint16_t *)src->data + off, a->D, src->dtype == DMA_F16);
            a->kern->scale_row(d, d, scale, (int)a->D);
        }
        memset(d + a->D, 0, sizeof(float) * (size_t)(ld - a->D));
    }
}

void dma_item_load_rows(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                        const dma_tensor *src, float scale, float *dst, int64_t ld)
{
    dma_item_load_rows_range(a, it, iv, src, scale, dst, ld, 0, iv->M);
}

void dma_prefetch_rows(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                       const dma_tensor *t, bool write, int64_t r0, int64_t r1)
{
    const int64_t size = t->dtype == DMA_F32 ? 4 : 2;
    for (int64_t r = r0; r < r1; r++) {
        const char *row = (const char *)t->data + size * dma_item_row_offset(t, it, iv, r);
        if (write)
            a->kern->prefetch_write(row, size * a->D);
        else
            for (int64_t byte = 0; byte < size * a->D; byte += 64)
                __builtin_prefetch(row + byte, 0, 3);
    }
}

void dma_gather_rows(const dma_attn *a, const dma_tensor *t, int64_t off, const int32_t *keys,
                     int32_t first, int n, float *dst, int ld)
{
    const int64_t D = a->D;
    for (int c = 0; c < n; c++) {
        const int64_t at = off + (int64_t)(keys ? keys[c] : first + c) * t->stride[1];
        float *row = dst + (int64_t)c * ld;
        if (t->dtype == DMA_F32)
            memcpy(row, f32(t) + at, sizeof(float) * (size_t)D);
        else
            a->kern->to_f32(row, (const uint16_t *)t->data + at, D, t->dtype == DMA_F16);
        memset(row + D, 0, sizeof(float) * (size_t)(ld - D));
    }
}

void dma_pack_kv(const dma_attn *a, const dma_item_view *iv, const int32_t *keys, int32_t first,
                 int n, float *kp, float *vp)
{
    const dma_kernels *kern = a->kern;
    if (a->bf16_dots)
        kern->pack_k_bf16((uint16_t *)kp, (const uint16_t *)a->k->data + iv->koff,
                          a->k->stride[1], keys, first, n, (int)a->D);
    if (a->k->dtype == DMA_F32) {
        kern->pack_k(kp, iv->kbase, a->k->stride[1], keys, first, n, (int)a->D);
        kern->pack_v(vp, a->ld, iv->vbase, a->v->stride[1], keys, first, n, (int)a->D);
        return;
    }
    if (!a->bf16_dots)
        kern->pack_k_half(kp, (const uint16_t *)a->k->data + iv->koff, a->k->stride[1], keys,
                          first, n, (int)a->D, a->k->dtype == DMA_F16);
    dma_gather_rows(a, a->v, iv->voff, keys, first, n, vp, a->ld);
}

bool dma_chunk_active(const dma_item_view *iv, int64_t c0, int64_t n)
{
    for (int64_t i = 0; i < iv->nrows; i++)
        if (iv->lo[i] < c0 + n && iv->hi[i] > c0)
            return true;
    return false;
}

static inline int64_t bias_head(const dma_attn *a, const dma_item_view *iv, int64_t hh)
{
    return (iv->h0 + hh) / (a->Hq / a->bias->shape[1]);
}

void dma_gather_key_bias(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                         int64_t hh, int64_t c0, int64_t n, int64_t n_pad, float *dst)
{
    int64_t hb = bias_head(a, iv, hh);
    for (int64_t c = 0; c < n; c++)
        dst[c] = f32(a->bias)[dma_offset4(a->bias, it->b, hb, 0,
                                          dma_view_key(iv, c0 + c))];
    for (int64_t c = n; c < n_pad; c++)
        dst[c] = 0.0f;
}

void dma_gather_row_bias(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                         int64_t hh, int64_t i, int64_t c0, int64_t ca, int64_t cb, int64_t n,
                         float *dst)
{
    int64_t hb = bias_head(a, iv, hh);
    for (int64_t c = ca; c < cb; c++)
        dst[c - ca] = c < n ? f32(a->bias)[dma_offset4(a->bias, it->b, hb, iv->r0 + i,
                                                       dma_view_key(iv, c0 + c))]
                            : 0.0f;
}


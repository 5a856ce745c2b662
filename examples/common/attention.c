/*
 * attention.c - causal self-attention, forward and backward, through libdmattn:
 *   qkv = x W_qkv;  q, k rotated (RoPE);  att = attention(q, k, v);  y = att W_o.
 * The three kinds differ only in which keys a query sees:
 *   dense  every earlier key (no sparsity object: the library's dense path);
 *   swa    the last `window` keys (a WINDOW sparsity object);
 *   dma    bias = A * softplus(v W_dt + b_dt) per key (dma_dynamic_bias_forward), the `window`
 *          earlier keys of largest bias (a TOPK object), and that bias added to the scores; the
 *          backward returns dbias, which dma_dynamic_bias_backward turns into the gradients of
 *          W_dt, b_dt and A and into more gradient for v.
 * q, k and v are strided views into the fused qkv rows, which the library reads in place.
 */
#include <stdio.h>
#include <string.h>

#include "layers.h"

const char *attn_kind_name(attn_kind kind)
{
    switch (kind) {
    case ATTN_DENSE: return "dense";
    case ATTN_SWA: return "swa";
    case ATTN_DMA: return "dma";
    default: return NULL;
    }
}

int attn_kind_parse(const char *name)
{
    for (int k = ATTN_DENSE; k <= ATTN_DMA; k++)
        if (name && !strcmp(name, attn_kind_name((attn_kind)k)))
            return k;
    return -1;
}

/* The tensors of one call: q, k, v (and their gradients) are views into qkv-shaped rows. */
typedef struct attn_views {
    dma_tensor q, k, v, out, lse, bias;
} attn_views;

static attn_views make_views(const attn_dims *d, float *qkv, float *att, float *lse,
                             float *bias)
{
    const int64_t QKV = (int64_t)(d->Hq + 2 * d->Hkv) * d->D;
    attn_views w;
    w.q = dma_tensor_4d(qkv, DMA_F32, d->B, d->L, d->Hq, d->D);
    w.k = dma_tensor_4d(qkv + (int64_t)d->Hq * d->D, DMA_F32, d->B, d->L, d->Hkv, d->D);
    w.v = dma_tensor_4d(qkv + (int64_t)(d->Hq + d->Hkv) * d->D, DMA_F32, d->B, d->L, d->Hkv,
                        d->D);
    for (dma_tensor *t = &w.q; t <= &w.v; t++) { /* token rows are QKV floats apart */
        t->stride[0] = (int64_t)d->L * QKV;
        t->stride[1] = QKV;
    }
    w.out = dma_tensor_4d(att, DMA_F32, d->B, d->L, d->Hq, d->D);
    w.lse = dma_tensor_3d(lse, DMA_F32, d->B, d->Hq, d->L);
    w.bias = dma_tensor_4d(bias, DMA_F32, d->B, d->Hkv, 1, d->L);
    return w;
}

static int fail(dma_context *ctx, dma_status st, const char *what, const attn_dims *d,
                char *err, size_t errlen)
{
    snprintf(err, errlen, "attention (%s): %s failed: %s (%s)", attn_kind_name(d->kind), what,
             dma_status_string(st), dma_context_last_error(ctx));
    return -1;
}

int attention_forward(dma_context *ctx, const attn_dims *d, const attn_params *p, attn_acts *a,
                      const float *cos_t, const float *sin_t, const float *x, float *out,
                      char *err, size_t errlen)
{
    const int N = d->B * d->L, QKV = (d->Hq + 2 * d->Hkv) * d->D;
    const int threads = dma_context_threads(ctx);
    linear_forward(a->qkv, x, p->w_qkv, N, d->C, QKV, 0, threads);
    rope_forward(a->qkv, d->B, d->L, d->Hq + d->Hkv, d->D, QKV, cos_t, sin_t, threads);

    attn_views w = make_views(d, a->qkv, a->att, a->lse, a->bias);
    /* Each step's mask is built into the last step's object: its memory is reused. */
    dma_status st = DMA_OK;
    if (d->kind == ATTN_SWA) {
        dma_mask_params mask = {.kind = DMA_MASK_WINDOW, .causal = 1, .window = d->window};
        if ((st = dma_sparsity_rebuild(ctx, &mask, 1, 1, d->L, d->L, NULL, NULL, &a->sp)))
            return fail(ctx, st, "dma_sparsity_rebuild", d, err, errlen);
    } else if (d->kind == ATTN_DMA) {
        dma_tensor w_dt = dma_tensor_2d(p->w_dt, DMA_F32, (int64_t)d->Hkv * d->D, d->Hkv);
        dma_tensor b_dt = dma_tensor_1d(p->b_dt, DMA_F32, d->Hkv);
        dma_tensor a_dt = dma_tensor_1d(p->a_dt, DMA_F32, d->Hkv);
        if ((st = dma_dynamic_bias_forward(ctx, &w.v, &w_dt, &b_dt, &a_dt, &w.bias)))
            return fail(ctx, st, "dma_dynamic_bias_forward", d, err, errlen);
        /* A NaN bias (diverged training) is reported here as DMA_ERR_BAD_VALUE. */
        dma_mask_params mask = {.kind = DMA_MASK_TOPK, .causal = 1, .window = d->window};
        if ((st = dma_sparsity_rebuild(ctx, &mask, d->B, d->Hkv, d->L, d->L, &w.bias, NULL,
                                       &a->sp)))
            return fail(ctx, st, "dma_sparsity_rebuild", d, err, errlen);
    } else {
        dma_sparsity_destroy(a->sp);
        a->sp = NULL;
    }
    dma_attn_params params = {.causal = 1};
    if ((st = dma_forward(ctx, &w.q, &w.k, &w.v, d->kind == ATTN_DMA ? &w.bias : NULL, a->sp,
                          &params, &w.out, &w.lse)))
        return fail(ctx, st, "dma_forward", d, err, errlen);
    linear_forward(out, a->att, p->w_o, N, d->Hq * d->D, d->C, 1, threads);
    return 0;
}

int attention_backward(dma_context *ctx, const attn_dims *d, const attn_params *p,
                       const attn_params *g, const attn_acts *a, attn_scratch *s,
                       const float *cos_t, const float *sin_t, const float *x,
                       const float *dout, float *dx, char *err, size_t errlen)
{
    const int N = d->B * d->L, QKV = (d->Hq + 2 * d->Hkv) * d->D;
    const int threads = dma_context_threads(ctx);
    linear_backward(s->datt, g->w_o, dout, a->att, p->w_o, N, d->Hq * d->D, d->C, 0, threads);

    attn_views w = make_views(d, a->qkv, a->att, a->lse, a->bias);
    attn_views dw = make_views(d, s->dqkv, s->datt, a->lse, s->dbias);
    const int dma = d->kind == ATTN_DMA;
    dma_attn_params params = {.causal = 1};
    dma_status st = dma_backward(ctx, &w.q, &w.k, &w.v, dma ? &w.bias : NULL, a->sp, &params,
                                 &w.out, &w.lse, &dw.out, &dw.q, &dw.k, &dw.v,
                                 dma ? &dw.bias : NULL);
    if (st)
        return fail(ctx, st, "dma_backward", d, err, errlen);
    if (dma) {
        dma_tensor w_dt = dma_tensor_2d(p->w_dt, DMA_F32, (int64_t)d->Hkv * d->D, d->Hkv);
        dma_tensor b_dt = dma_tensor_1d(p->b_dt, DMA_F32, d->Hkv);
        dma_tensor a_dt = dma_tensor_1d(p->a_dt, DMA_F32, d->Hkv);
        dma_tensor gw_dt = dma_tensor_2d(g->w_dt, DMA_F32, (int64_t)d->Hkv * d->D, d->Hkv);
        dma_tensor gb_dt = dma_tensor_1d(g->b_dt, DMA_F32, d->Hkv);
        dma_tensor ga_dt = dma_tensor_1d(g->a_dt, DMA_F32, d->Hkv);
        /* adds the mask generator's share of dv to what dma_backward wrote */
        if ((st = dma_dynamic_bias_backward(ctx, &w.v, &w_dt, &b_dt, &a_dt, &dw.bias, &dw.v,
                                            &gw_dt, &gb_dt, &ga_dt)))
            return fail(ctx, st, "dma_dynamic_bias_backward", d, err, errlen);
    }
    rope_backward(s->dqkv, d->B, d->L, d->Hq + d->Hkv, d->D, QKV, cos_t, sin_t, threads);
    linear_backward(dx, g->w_qkv, s->dqkv, x, p->w_qkv, N, d->C, QKV, 0, threads);
    return 0;
}

void attention_acts_release(attn_acts *a)
{
    dma_sparsity_destroy(a->sp);
    a->sp = NULL;
}

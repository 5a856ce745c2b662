/*
 * test_errors.c - bad input (DESIGN section 7, include/dmattn.h): every rule gets its own test
 * that checks the exact status, that no output was touched (output buffers keep a sentinel
 * pattern, `out` pointers keep their value) and that the context explains the failure.
 * Also: the small pure API functions, context creation and the DMATTN_ISA variable. The
 * sparsity builders' bad input is test_sparsity_errors.c's.
 *
 * Each error test starts from a call that is checked to succeed, and changes one thing.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "error_checks.h"


/* ------------------------------------------------------------------------------------------ */
/* dma_forward                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* The valid call: B=2, Lq=5, Lk=6, Hq=4, Hkv=2, D=8, bias (2, 2, 1, 6), sparsity (2, 2, 5, 6).
 * Every buffer holds BUF floats, enough for any shape a mutation below gives a valid-looking
 * stride to, so a library that reads before validating does not fault. */
enum { FB = 2, FLQ = 5, FLK = 6, FHQ = 4, FHKV = 2, FD = 8, BUF = 1 << 16 };

typedef struct fwd_call {
    dma_context *ctx;
    dma_tensor q, k, v, bias, out, lse;
    const dma_tensor *pq, *pk, *pv, *pbias;
    dma_tensor *pout, *plse;
    const dma_sparsity *sp;
    dma_attn_params params;
    const dma_attn_params *pparams;
    /* owned */
    dma_context *own_ctx;
    float *buf[6];
    dma_sparsity *sp_ok, *sp_short_q, *sp_short_k, *sp_b3, *sp_h3;
} fwd_call;

static dma_status fwd_run(fwd_call *c)
{
    return dma_forward(c->ctx, c->pq, c->pk, c->pv, c->pbias, c->sp, c->pparams, c->pout,
                       c->plse);
}

static void fwd_init(fwd_call *c)
{
    memset(c, 0, sizeof *c);
    c->own_ctx = test_scalar_context();
    c->ctx = c->own_ctx;
    test_rng r = rng_make(99);
    for (int i = 0; i < 6; i++) {
        c->buf[i] = test_malloc(BUF * sizeof(float));
        for (int x = 0; x < BUF; x++)
            c->buf[i][x] = rng_float(&r, -1.0f, 1.0f);
    }
    c->q = dma_tensor_4d(c->buf[0], DMA_F32, FB, FLQ, FHQ, FD);
    c->k = dma_tensor_4d(c->buf[1], DMA_F32, FB, FLK, FHKV, FD);
    c->v = dma_tensor_4d(c->buf[2], DMA_F32, FB, FLK, FHKV, FD);
    c->bias = dma_tensor_4d(c->buf[3], DMA_F32, FB, FHKV, 1, FLK);
    c->out = dma_tensor_4d(c->buf[4], DMA_F32, FB, FLQ, FHQ, FD);
    c->lse = dma_tensor_3d(c->buf[5], DMA_F32, FB, FHQ, FLQ);
    c->pq = &c->q;
    c->pk = &c->k;
    c->pv = &c->v;
    c->pbias = &c->bias;
    c->pout = &c->out;
    c->plse = &c->lse;
    c->sp_ok = dense_sparsity(c->ctx, FB, FHKV, FLQ, FLK);
    c->sp_short_q = dense_sparsity(c->ctx, FB, FHKV, FLQ - 1, FLK);
    c->sp_short_k = dense_sparsity(c->ctx, FB, FHKV, FLQ, FLK - 1);
    c->sp_b3 = dense_sparsity(c->ctx, 3, FHKV, FLQ, FLK);
    c->sp_h3 = dense_sparsity(c->ctx, FB, 3, FLQ, FLK);
    c->sp = c->sp_ok;
    c->params.causal = 1;
    c->params.softcap = 10.0f;
    c->params.scale = 0.25f;
    c->pparams = &c->params;
    /* the unmodified call must succeed, or the error tests would prove nothing */
    dma_status st = fwd_run(c);
    ck_assert_msg(st == DMA_OK, "the valid forward fails: %s (%s)", dma_status_string(st),
                  dma_context_last_error(c->ctx));
}

static void fwd_free(fwd_call *c)
{
    for (int i = 0; i < 6; i++)
        free(c->buf[i]);
    dma_sparsity_destroy(c->sp_ok);
    dma_sparsity_destroy(c->sp_short_q);
    dma_sparsity_destroy(c->sp_short_k);
    dma_sparsity_destroy(c->sp_b3);
    dma_sparsity_destroy(c->sp_h3);
    dma_context_destroy(c->own_ctx);
}

/* Sets D on q, k, v and out (contiguous). */
static void set_head_dim(fwd_call *c, int64_t D)
{
    c->q = dma_tensor_4d(c->buf[0], DMA_F32, FB, FLQ, FHQ, D);
    c->k = dma_tensor_4d(c->buf[1], DMA_F32, FB, FLK, FHKV, D);
    c->v = dma_tensor_4d(c->buf[2], DMA_F32, FB, FLK, FHKV, D);
    c->out = dma_tensor_4d(c->buf[4], DMA_F32, FB, FLQ, FHQ, D);
}

/* Sets consistent lengths on every tensor (strides from the shapes); bias and sparsity off. */
static void set_lengths(fwd_call *c, int64_t B, int64_t Lq, int64_t Lk, int64_t D)
{
    c->q = dma_tensor_4d(c->buf[0], DMA_F32, B, Lq, FHQ, D);
    c->k = dma_tensor_4d(c->buf[1], DMA_F32, B, Lk, FHKV, D);
    c->v = dma_tensor_4d(c->buf[2], DMA_F32, B, Lk, FHKV, D);
    c->out = dma_tensor_4d(c->buf[4], DMA_F32, B, Lq, FHQ, D);
    c->lse = dma_tensor_3d(c->buf[5], DMA_F32, B, FHQ, Lq);
    c->pbias = NULL;
    c->sp = NULL;
}

/* Sets the head counts on every tensor; bias and sparsity off (they depend on the heads). */
static void set_heads(fwd_call *c, int64_t Hq, int64_t Hkv)
{
    c->q = dma_tensor_4d(c->buf[0], DMA_F32, FB, FLQ, Hq, FD);
    c->k = dma_tensor_4d(c->buf[1], DMA_F32, FB, FLK, Hkv, FD);
    c->v = dma_tensor_4d(c->buf[2], DMA_F32, FB, FLK, Hkv, FD);
    c->out = dma_tensor_4d(c->buf[4], DMA_F32, FB, FLQ, Hq, FD);
    c->lse = dma_tensor_3d(c->buf[5], DMA_F32, FB, Hq, FLQ);
    c->pbias = NULL;
    c->sp = NULL;
}

/* A 3-D view of the same memory as a 4-D tensor's last two dims merged. */
static void merge_last_two(dma_tensor *t)
{
    t->ndim = 3;
    t->shape[2] *= t->shape[3];
    t->stride[2] = 1;
    t->shape[3] = 0;
    t->stride[3] = 0;
}

/* NULL pointers */
static void f_ctx_null(fwd_call *c) { c->ctx = NULL; }
static void f_q_null(fwd_call *c) { c->pq = NULL; }
static void f_k_null(fwd_call *c) { c->pk = NULL; }
static void f_v_null(fwd_call *c) { c->pv = NULL; }
static void f_out_null(fwd_call *c) { c->pout = NULL; }
static void f_q_data_null(fwd_call *c) { c->q.data = NULL; }
static void f_k_data_null(fwd_call *c) { c->k.data = NULL; }
static void f_v_data_null(fwd_call *c) { c->v.data = NULL; }
static void f_bias_data_null(fwd_call *c) { c->bias.data = NULL; }
static void f_out_data_null(fwd_call *c) { c->out.data = NULL; }
static void f_lse_data_null(fwd_call *c) { c->lse.data = NULL; }
/* shapes */
static void f_q_ndim3(fwd_call *c) { merge_last_two(&c->q); }
static void f_q_neg_dim(fwd_call *c) { c->q.shape[1] = -5; }
static void f_k_batch(fwd_call *c) { c->k.shape[0] = 1; }
static void f_v_batch(fwd_call *c) { c->v.shape[0] = 1; }
static void f_k_ndim3(fwd_call *c) { merge_last_two(&c->k); }
static void f_v_length(fwd_call *c) { c->v.shape[1] = FLK - 1; }
static void f_k_length(fwd_call *c) { c->k.shape[1] = FLK - 1; }
static void f_v_heads(fwd_call *c) { c->v.shape[2] = 1; }
static void f_k_heads(fwd_call *c) { c->k.shape[2] = 1; }
static void f_k_dim(fwd_call *c) { c->k.shape[3] = FD - 1; }
static void f_v_dim(fwd_call *c) { c->v.shape[3] = FD - 1; }
static void f_out_batch(fwd_call *c) { c->out.shape[0] = 1; }
static void f_out_length(fwd_call *c) { c->out.shape[1] = FLQ - 1; }
static void f_out_heads(fwd_call *c) { c->out.shape[2] = FHKV; }
static void f_out_dim(fwd_call *c) { c->out.shape[3] = FD - 1; }
static void f_out_ndim3(fwd_call *c) { merge_last_two(&c->out); }
static void f_lse_length(fwd_call *c) { c->lse.shape[2] = FLQ - 1; }
static void f_lse_heads(fwd_call *c) { c->lse = dma_tensor_3d(c->buf[5], DMA_F32, FB, FHKV, FLQ); }
static void f_lse_batch(fwd_call *c) { c->lse.shape[0] = 1; }
static void f_lse_bshd(fwd_call *c) { c->lse = dma_tensor_3d(c->buf[5], DMA_F32, FB, FLQ, FHQ); }
static void f_lse_ndim4(fwd_call *c)
{
    c->lse = dma_tensor_4d(c->buf[5], DMA_F32, FB, FHQ, FLQ, 1);
}
static void f_bias_batch3(fwd_call *c) { c->bias.shape[0] = 3; }
static void f_bias_heads3(fwd_call *c) { c->bias.shape[1] = 3; }
static void f_bias_rows2(fwd_call *c) { c->bias.shape[2] = 2; c->bias.stride[2] = FLK; }
static void f_bias_keys(fwd_call *c) { c->bias.shape[3] = FLK - 1; }
static void f_bias_ndim3(fwd_call *c)
{
    c->bias = dma_tensor_3d(c->buf[3], DMA_F32, FB, FHKV, FLK);
}
static void f_sp_lq(fwd_call *c) { c->sp = c->sp_short_q; }
static void f_sp_lk(fwd_call *c) { c->sp = c->sp_short_k; }
static void f_sp_batch(fwd_call *c) { c->sp = c->sp_b3; }
static void f_sp_heads(fwd_call *c) { c->sp = c->sp_h3; }
/* strides */
static void f_q_last_stride(fwd_call *c) { c->q.stride[3] = 2; }
static void f_k_last_stride(fwd_call *c) { c->k.stride[3] = 2; }
static void f_v_last_stride(fwd_call *c) { c->v.stride[3] = 0; }
static void f_out_last_stride(fwd_call *c) { c->out.stride[3] = 2; }
static void f_lse_last_stride(fwd_call *c) { c->lse.stride[2] = 2; }
static void f_bias_last_stride(fwd_call *c) { c->bias.stride[3] = 0; }
static void f_q_neg_stride(fwd_call *c) { c->q.stride[1] = -c->q.stride[1]; }
static void f_k_neg_stride(fwd_call *c) { c->k.stride[0] = -c->k.stride[0]; }
static void f_v_neg_stride(fwd_call *c) { c->v.stride[2] = -c->v.stride[2]; }
static void f_out_neg_stride(fwd_call *c) { c->out.stride[1] = -c->out.stride[1]; }
static void f_lse_neg_stride(fwd_call *c) { c->lse.stride[1] = -c->lse.stride[1]; }
static void f_bias_neg_stride(fwd_call *c) { c->bias.stride[0] = -c->bias.stride[0]; }
/* heads and head dim */
static void f_heads_not_multiple(fwd_call *c) { set_heads(c, 4, 3); }
static void f_hkv_zero(fwd_call *c) { set_heads(c, 4, 0); }
static void f_hq_zero(fwd_call *c) { set_heads(c, 0, 1); }
static void f_hkv_gt_hq(fwd_call *c) { set_heads(c, 2, 4); }
static void f_d_zero(fwd_call *c) { set_head_dim(c, 0); }
static void f_d_257(fwd_call *c) { set_head_dim(c, DMA_MAX_HEAD_DIM + 1); }
/* dtypes */
static void f_q_f16(fwd_call *c) { c->q.dtype = DMA_F16; }
static void f_k_bf16(fwd_call *c) { c->k.dtype = DMA_BF16; }
static void f_v_f16(fwd_call *c) { c->v.dtype = DMA_F16; }
static void f_q_bool(fwd_call *c) { c->q.dtype = DMA_BOOL; }
static void f_bias_bf16(fwd_call *c) { c->bias.dtype = DMA_BF16; }
static void f_out_bf16(fwd_call *c) { c->out.dtype = DMA_BF16; }
static void f_lse_f16(fwd_call *c) { c->lse.dtype = DMA_F16; }
static void f_dtype_unknown(fwd_call *c) { c->q.dtype = (dma_dtype)42; }
/* sizes that overflow */
static void f_huge_lengths(fwd_call *c) { set_lengths(c, FB, TWO40, TWO40, FD); }
static void f_product_overflow(fwd_call *c) { set_lengths(c, TWO40, TWO40, TWO40, FD); }
static void f_lk_too_big(fwd_call *c)
{
    c->k = dma_tensor_4d(c->buf[1], DMA_F32, FB, BIG_LK, FHKV, FD);
    c->v = dma_tensor_4d(c->buf[2], DMA_F32, FB, BIG_LK, FHKV, FD);
    c->pbias = NULL;
    c->sp = NULL;
}
static void f_lq_too_big(fwd_call *c)
{
    c->q = dma_tensor_4d(c->buf[0], DMA_F32, FB, BIG_LK, FHQ, FD);
    c->out = dma_tensor_4d(c->buf[4], DMA_F32, FB, BIG_LK, FHQ, FD);
    c->lse = dma_tensor_3d(c->buf[5], DMA_F32, FB, FHQ, BIG_LK);
    c->pbias = NULL;
    c->sp = NULL;
}
/* scalars */
static void f_scale_nan(fwd_call *c) { c->params.scale = NAN; }
static void f_scale_inf(fwd_call *c) { c->params.scale = INFINITY; }
static void f_scale_neg_inf(fwd_call *c) { c->params.scale = -INFINITY; }
static void f_softcap_neg(fwd_call *c) { c->params.softcap = -1.0f; }
static void f_softcap_nan(fwd_call *c) { c->params.softcap = NAN; }
static void f_softcap_inf(fwd_call *c) { c->params.softcap = INFINITY; }
/* outputs over inputs, or over each other (no in-place forward) */
static void f_out_over_q(fwd_call *c) { c->out.data = c->buf[0]; }
static void f_out_over_v_tail(fwd_call *c) { c->out.data = c->buf[2] + 7; }
static void f_out_over_bias(fwd_call *c) { c->out.data = c->buf[3]; }
static void f_lse_over_k(fwd_call *c) { c->lse.data = c->buf[1] + 3; }
static void f_lse_over_out(fwd_call *c) { c->lse.data = c->buf[4] + 5; }

typedef struct fwd_error {
    const char *name;
    void (*mutate)(fwd_call *);
    dma_status expect;
} fwd_error;

#define FWD_ERR(fn, st) {#fn, fn, st}
static const fwd_error FWD_ERRORS[] = {
    FWD_ERR(f_ctx_null, DMA_ERR_NULL),
    FWD_ERR(f_q_null, DMA_ERR_NULL),
    FWD_ERR(f_k_null, DMA_ERR_NULL),
    FWD_ERR(f_v_null, DMA_ERR_NULL),
    FWD_ERR(f_out_null, DMA_ERR_NULL),
    FWD_ERR(f_q_data_null, DMA_ERR_NULL),
    FWD_ERR(f_k_data_null, DMA_ERR_NULL),
    FWD_ERR(f_v_data_null, DMA_ERR_NULL),
    FWD_ERR(f_bias_data_null, DMA_ERR_NULL),
    FWD_ERR(f_out_data_null, DMA_ERR_NULL),
    FWD_ERR(f_lse_data_null, DMA_ERR_NULL),
    FWD_ERR(f_q_ndim3, DMA_ERR_SHAPE),
    FWD_ERR(f_q_neg_dim, DMA_ERR_SHAPE),
    FWD_ERR(f_k_batch, DMA_ERR_SHAPE),
    FWD_ERR(f_v_batch, DMA_ERR_SHAPE),
    FWD_ERR(f_k_ndim3, DMA_ERR_SHAPE),
    FWD_ERR(f_v_length, DMA_ERR_SHAPE),
    FWD_ERR(f_k_length, DMA_ERR_SHAPE),
    FWD_ERR(f_v_heads, DMA_ERR_SHAPE),
    FWD_ERR(f_k_heads, DMA_ERR_SHAPE),
    FWD_ERR(f_k_dim, DMA_ERR_SHAPE),
    FWD_ERR(f_v_dim, DMA_ERR_SHAPE),
    FWD_ERR(f_out_batch, DMA_ERR_SHAPE),
    FWD_ERR(f_out_length, DMA_ERR_SHAPE),
    FWD_ERR(f_out_heads, DMA_ERR_SHAPE),
    FWD_ERR(f_out_dim, DMA_ERR_SHAPE),
    FWD_ERR(f_out_ndim3, DMA_ERR_SHAPE),
    FWD_ERR(f_lse_length, DMA_ERR_SHAPE),
    FWD_ERR(f_lse_heads, DMA_ERR_SHAPE),
    FWD_ERR(f_lse_batch, DMA_ERR_SHAPE),
    FWD_ERR(f_lse_bshd, DMA_ERR_SHAPE),
    FWD_ERR(f_lse_ndim4, DMA_ERR_SHAPE),
    FWD_ERR(f_bias_batch3, DMA_ERR_SHAPE),
    FWD_ERR(f_bias_heads3, DMA_ERR_SHAPE),
    FWD_ERR(f_bias_rows2, DMA_ERR_SHAPE),
    FWD_ERR(f_bias_keys, DMA_ERR_SHAPE),
    FWD_ERR(f_bias_ndim3, DMA_ERR_SHAPE),
    FWD_ERR(f_sp_lq, DMA_ERR_SHAPE),
    FWD_ERR(f_sp_lk, DMA_ERR_SHAPE),
    FWD_ERR(f_sp_batch, DMA_ERR_SHAPE),
    FWD_ERR(f_sp_heads, DMA_ERR_SHAPE),
    FWD_ERR(f_q_last_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_k_last_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_v_last_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_out_last_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_lse_last_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_bias_last_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_q_neg_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_k_neg_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_v_neg_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_out_neg_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_lse_neg_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_bias_neg_stride, DMA_ERR_STRIDE),
    FWD_ERR(f_heads_not_multiple, DMA_ERR_HEADS),
    FWD_ERR(f_hkv_zero, DMA_ERR_HEADS),
    FWD_ERR(f_hq_zero, DMA_ERR_HEADS),
    FWD_ERR(f_hkv_gt_hq, DMA_ERR_HEADS),
    FWD_ERR(f_d_zero, DMA_ERR_HEAD_DIM),
    FWD_ERR(f_d_257, DMA_ERR_HEAD_DIM),
    FWD_ERR(f_q_f16, DMA_ERR_DTYPE),
    FWD_ERR(f_k_bf16, DMA_ERR_DTYPE),
    FWD_ERR(f_v_f16, DMA_ERR_DTYPE),
    FWD_ERR(f_q_bool, DMA_ERR_DTYPE),
    FWD_ERR(f_bias_bf16, DMA_ERR_DTYPE),
    FWD_ERR(f_out_bf16, DMA_ERR_DTYPE),
    FWD_ERR(f_lse_f16, DMA_ERR_DTYPE),
    FWD_ERR(f_dtype_unknown, DMA_ERR_DTYPE),
    FWD_ERR(f_huge_lengths, DMA_ERR_OVERFLOW),
    FWD_ERR(f_product_overflow, DMA_ERR_OVERFLOW),
    FWD_ERR(f_lk_too_big, DMA_ERR_OVERFLOW),
    FWD_ERR(f_lq_too_big, DMA_ERR_OVERFLOW),
    FWD_ERR(f_scale_nan, DMA_ERR_BAD_VALUE),
    FWD_ERR(f_scale_inf, DMA_ERR_BAD_VALUE),
    FWD_ERR(f_scale_neg_inf, DMA_ERR_BAD_VALUE),
    FWD_ERR(f_softcap_neg, DMA_ERR_BAD_VALUE),
    FWD_ERR(f_softcap_nan, DMA_ERR_BAD_VALUE),
    FWD_ERR(f_softcap_inf, DMA_ERR_BAD_VALUE),
    FWD_ERR(f_out_over_q, DMA_ERR_OVERLAP),
    FWD_ERR(f_out_over_v_tail, DMA_ERR_OVERLAP),
    FWD_ERR(f_out_over_bias, DMA_ERR_OVERLAP),
    FWD_ERR(f_lse_over_k, DMA_ERR_OVERLAP),
    FWD_ERR(f_lse_over_out, DMA_ERR_OVERLAP),
};
#define N_FWD_ERRORS ((int)(sizeof FWD_ERRORS / sizeof FWD_ERRORS[0]))

START_TEST(forward_errors)
{
    const fwd_error *e = &FWD_ERRORS[_i];
    fwd_call c;
    fwd_init(&c);
    e->mutate(&c);
    fill_sentinel(c.buf[4], BUF * sizeof(float));
    fill_sentinel(c.buf[5], BUF * sizeof(float));
    dma_status st = fwd_run(&c);
    ck_assert_msg(st == e->expect, "%s: got %d (%s), expected %d (%s)", e->name, (int)st,
                  dma_status_string(st), (int)e->expect, dma_status_string(e->expect));
    ck_assert_msg(is_sentinel(c.buf[4], BUF * sizeof(float)), "%s: out was written", e->name);
    ck_assert_msg(is_sentinel(c.buf[5], BUF * sizeof(float)), "%s: lse was written", e->name);
    if (c.ctx != NULL)
        expect_last_error(c.ctx, e->name);
    fwd_free(&c);
}
END_TEST

START_TEST(forward_optional_arguments)
{
    /* controls for the NULL tests: bias, sparsity, params and lse may each be NULL */
    for (int which = 0; which < 4; which++) {
        fwd_call c;
        fwd_init(&c);
        if (which == 0) c.pbias = NULL;
        if (which == 1) c.sp = NULL;
        if (which == 2) c.pparams = NULL;
        if (which == 3) c.plse = NULL;
        ck_assert_msg(fwd_run(&c) == DMA_OK, "optional argument %d", which);
        fwd_free(&c);
    }
}
END_TEST

START_TEST(forward_valid_broadcasts)
{
    /* controls for the bias shape tests: every allowed bias and sparsity shape is accepted */
    static const int64_t bshapes[][3] = {{1, 1, 1}, {FB, 1, 1}, {1, FHKV, 1}, {1, FHQ, 1},
                                         {1, 1, FLQ}, {FB, FHQ, FLQ}};
    for (int s = 0; s < 6; s++) {
        fwd_call c;
        fwd_init(&c);
        c.bias = dma_tensor_4d(c.buf[3], DMA_F32, bshapes[s][0], bshapes[s][1], bshapes[s][2],
                               FLK);
        ck_assert_msg(fwd_run(&c) == DMA_OK, "bias shape %d", s);
        fwd_free(&c);
    }
    static const int64_t sshapes[][2] = {{1, 1}, {FB, 1}, {1, FHQ}, {FB, FHQ}, {FB, FHKV}};
    for (int s = 0; s < 5; s++) {
        fwd_call c;
        fwd_init(&c);
        dma_sparsity *sp = dense_sparsity(c.ctx, sshapes[s][0], sshapes[s][1], FLQ, FLK);
        c.sp = sp;
        ck_assert_msg(fwd_run(&c) == DMA_OK, "sparsity shape %d", s);
        dma_sparsity_destroy(sp);
        fwd_free(&c);
    }
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* Context and environment                                                                    */
/* ------------------------------------------------------------------------------------------ */

static dma_status create_with(int threads, dma_isa isa, dma_context **out)
{
    dma_context_options opts;
    memset(&opts, 0, sizeof opts);
    opts.threads = threads;
    opts.isa = isa;
    return dma_context_create(&opts, out);
}

START_TEST(context_errors)
{
    dma_context *ctx = UNTOUCHED_CTX;
    ck_assert_int_eq(create_with(-1, DMA_ISA_AUTO, &ctx), DMA_ERR_ARG);
    ck_assert(ctx == UNTOUCHED_CTX);
    ck_assert_int_eq(create_with(-1000, DMA_ISA_SCALAR, &ctx), DMA_ERR_ARG);
    ck_assert(ctx == UNTOUCHED_CTX);
    ck_assert_int_eq(create_with(1, (dma_isa)99, &ctx), DMA_ERR_ARG);
    ck_assert(ctx == UNTOUCHED_CTX);
    ck_assert_int_eq(create_with(1, (dma_isa)-1, &ctx), DMA_ERR_ARG);
    ck_assert(ctx == UNTOUCHED_CTX);
    ck_assert_int_eq(create_with(1, DMA_ISA_SCALAR, NULL), DMA_ERR_NULL);
    ck_assert_int_eq(dma_context_create(NULL, NULL), DMA_ERR_NULL);
}
END_TEST

START_TEST(context_unsupported_isa)
{
    /* an ISA this CPU or build lacks (NEON on x86, AVX2/AVX-512 on Arm, AVX-512 on an AVX2
     * machine) is DMA_ERR_ISA, whatever the thread count */
    static const dma_isa isas[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512, DMA_ISA_NEON};
    int unsupported = 0;
    ck_assert(dma_isa_supported(DMA_ISA_SCALAR));
    ck_assert(!dma_isa_supported((dma_isa)99));
    ck_assert(!(dma_isa_supported(DMA_ISA_NEON) && dma_isa_supported(DMA_ISA_AVX2)));
    for (int i = 0; i < 4; i++) {
        dma_context *ctx = UNTOUCHED_CTX;
        dma_status st = create_with(i % 2, isas[i], &ctx);
        if (dma_isa_supported(isas[i])) {
            ck_assert_msg(st == DMA_OK, "%s: %s", dma_isa_name(isas[i]), dma_status_string(st));
            ck_assert_int_eq(dma_context_isa(ctx), isas[i]);
            dma_context_destroy(ctx);
        } else {
            unsupported++;
            ck_assert_msg(st == DMA_ERR_ISA, "%s: got %s, expected DMA_ERR_ISA",
                          dma_isa_name(isas[i]), dma_status_string(st));
            ck_assert(ctx == UNTOUCHED_CTX);
        }
    }
    ck_assert_msg(unsupported > 0, "no CPU runs both x86 and Arm kernels");
}
END_TEST

START_TEST(context_defaults)
{
    unsetenv("DMATTN_ISA");
    dma_context *ctx = NULL;
    ck_assert_int_eq(dma_context_create(NULL, &ctx), DMA_OK);
    ck_assert(dma_context_isa(ctx) != DMA_ISA_AUTO);
    ck_assert(dma_isa_supported(dma_context_isa(ctx)));
    ck_assert_int_ge(dma_context_threads(ctx), 1);
    ck_assert_msg(dma_context_last_error(ctx) != NULL && dma_context_last_error(ctx)[0] == '\0',
                  "a fresh context has an error message");
    dma_context_destroy(ctx);
    ck_assert_int_eq(create_with(0, DMA_ISA_AUTO, &ctx), DMA_OK);
    ck_assert_int_ge(dma_context_threads(ctx), 1);
    dma_context_destroy(ctx);
    ck_assert_int_eq(create_with(3, DMA_ISA_SCALAR, &ctx), DMA_OK);
    ck_assert_int_eq(dma_context_threads(ctx), 3);
    ck_assert_int_eq(dma_context_isa(ctx), DMA_ISA_SCALAR);
    dma_context_destroy(ctx);
    dma_context_destroy(NULL);
    dma_sparsity_destroy(NULL);
}
END_TEST

START_TEST(env_isa)
{
    dma_context *ctx = UNTOUCHED_CTX;

    setenv("DMATTN_ISA", "bogus", 1);
    ck_assert_int_eq(create_with(1, DMA_ISA_AUTO, &ctx), DMA_ERR_ARG);
    ck_assert(ctx == UNTOUCHED_CTX);
    ck_assert_int_eq(dma_context_create(NULL, &ctx), DMA_ERR_ARG);
    ck_assert(ctx == UNTOUCHED_CTX);
    /* an explicit option forces its ISA; the variable only fills in DMA_ISA_AUTO */
    ck_assert_int_eq(create_with(1, DMA_ISA_SCALAR, &ctx), DMA_OK);
    ck_assert_int_eq(dma_context_isa(ctx), DMA_ISA_SCALAR);
    dma_context_destroy(ctx);

    setenv("DMATTN_ISA", "scalar", 1);
    ctx = NULL;
    ck_assert_int_eq(create_with(1, DMA_ISA_AUTO, &ctx), DMA_OK);
    ck_assert_int_eq(dma_context_isa(ctx), DMA_ISA_SCALAR);
    dma_context_destroy(ctx);
    ctx = NULL;
    ck_assert_int_eq(dma_context_create(NULL, &ctx), DMA_OK);
    ck_assert_int_eq(dma_context_isa(ctx), DMA_ISA_SCALAR);
    dma_context_destroy(ctx);

    /* every known name: the ISA when supported, DMA_ERR_ISA when not */
    static const dma_isa isas[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512, DMA_ISA_NEON};
    for (int i = 0; i < 4; i++) {
        setenv("DMATTN_ISA", dma_isa_name(isas[i]), 1);
        ctx = UNTOUCHED_CTX;
        dma_status st = create_with(1, DMA_ISA_AUTO, &ctx);
        if (dma_isa_supported(isas[i])) {
            ck_assert_msg(st == DMA_OK, "DMATTN_ISA=%s: %s", dma_isa_name(isas[i]),
                          dma_status_string(st));
            ck_assert_int_eq(dma_context_isa(ctx), isas[i]);
            dma_context_destroy(ctx);
        } else {
            ck_assert_msg(st == DMA_ERR_ISA, "DMATTN_ISA=%s: got %s, expected DMA_ERR_ISA",
                          dma_isa_name(isas[i]), dma_status_string(st));
            ck_assert(ctx == UNTOUCHED_CTX);
        }
    }
    unsetenv("DMATTN_ISA");

    /* the variable is read at creation only: a context keeps its ISA */
    setenv("DMATTN_ISA", "scalar", 1);
    ctx = NULL;
    ck_assert_int_eq(create_with(1, DMA_ISA_AUTO, &ctx), DMA_OK);
    unsetenv("DMATTN_ISA");
    ck_assert_int_eq(dma_context_isa(ctx), DMA_ISA_SCALAR);
    dma_context_destroy(ctx);
}
END_TEST

START_TEST(env_tn_rows)
{
    /* DMATTN_TN_ROWS (the backward's rows per dK/dV call, for tests): 64 or 128, else
     * DMA_ERR_ARG and no context; empty means unset. Its effect on the results (none) is
     * test_backward's tn_rows_invariant. */
    static const char *const bad[] = {"0", "32", "256", "64x", "bogus", " 64"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        setenv("DMATTN_TN_ROWS", bad[i], 1);
        dma_context *ctx = UNTOUCHED_CTX;
        ck_assert_msg(create_with(1, DMA_ISA_SCALAR, &ctx) == DMA_ERR_ARG,
                      "DMATTN_TN_ROWS=\"%s\" accepted", bad[i]);
        ck_assert(ctx == UNTOUCHED_CTX);
    }
    static const char *const good[] = {"64", "128", ""};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        setenv("DMATTN_TN_ROWS", good[i], 1);
        dma_context *ctx = NULL;
        ck_assert_msg(create_with(1, DMA_ISA_AUTO, &ctx) == DMA_OK,
                      "DMATTN_TN_ROWS=\"%s\" refused", good[i]);
        dma_context_destroy(ctx);
    }
    unsetenv("DMATTN_TN_ROWS");
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* Small pure functions                                                                       */
/* ------------------------------------------------------------------------------------------ */

START_TEST(status_strings)
{
    for (int s = 0; s < DMA_STATUS_COUNT_; s++) {
        const char *msg = dma_status_string((dma_status)s);
        ck_assert_msg(msg != NULL && msg[0] != '\0', "status %d has no name", s);
        ck_assert_msg(strcmp(msg, "unknown status") != 0, "status %d is called unknown", s);
        for (int t = 0; t < s; t++)
            ck_assert_msg(strcmp(msg, dma_status_string((dma_status)t)) != 0,
                          "statuses %d and %d share the name \"%s\"", t, s, msg);
    }
    static const int unknown[] = {DMA_STATUS_COUNT_, DMA_STATUS_COUNT_ + 1, 1000, -1};
    for (int i = 0; i < 4; i++) {
        const char *msg = dma_status_string((dma_status)unknown[i]);
        ck_assert_msg(msg != NULL && strcmp(msg, "unknown status") == 0, "status %d: \"%s\"",
                      unknown[i], msg ? msg : "(null)");
    }
    ck_assert_int_eq(DMA_OK, 0);
}
END_TEST

START_TEST(isa_names)
{
    ck_assert_str_eq(dma_isa_name(DMA_ISA_AUTO), "auto");
    ck_assert_str_eq(dma_isa_name(DMA_ISA_SCALAR), "scalar");
    ck_assert_str_eq(dma_isa_name(DMA_ISA_AVX2), "avx2");
    ck_assert_str_eq(dma_isa_name(DMA_ISA_AVX512), "avx512");
    ck_assert_str_eq(dma_isa_name(DMA_ISA_NEON), "neon");
    ck_assert_str_eq(dma_isa_name((dma_isa)99), "unknown");
    ck_assert_str_eq(dma_isa_name((dma_isa)-1), "unknown");
}
END_TEST

START_TEST(tensor_helpers)
{
    int dummy;
    dma_tensor t = dma_tensor_4d(&dummy, DMA_F32, 2, 3, 4, 5);
    ck_assert_ptr_eq(t.data, &dummy);
    ck_assert_int_eq(t.dtype, DMA_F32);
    ck_assert_int_eq(t.ndim, 4);
    ck_assert(t.shape[0] == 2 && t.shape[1] == 3 && t.shape[2] == 4 && t.shape[3] == 5);
    ck_assert(t.stride[0] == 60 && t.stride[1] == 20 && t.stride[2] == 5 && t.stride[3] == 1);
    t = dma_tensor_3d(&dummy, DMA_BOOL, 7, 8, 9);
    ck_assert_int_eq(t.dtype, DMA_BOOL);
    ck_assert_int_eq(t.ndim, 3);
    ck_assert(t.shape[0] == 7 && t.shape[1] == 8 && t.shape[2] == 9);
    ck_assert(t.stride[0] == 72 && t.stride[1] == 9 && t.stride[2] == 1);
    t = dma_tensor_2d(NULL, DMA_F16, 6, 11);
    ck_assert_ptr_null(t.data);
    ck_assert_int_eq(t.ndim, 2);
    ck_assert(t.shape[0] == 6 && t.shape[1] == 11 && t.stride[0] == 11 && t.stride[1] == 1);
}
END_TEST

START_TEST(last_error_is_per_context)
{
    /* an error on one context leaves another context's message alone */
    dma_context *a = test_scalar_context(), *b = test_scalar_context();
    dma_mask_params mp = {.kind = DMA_MASK_DENSE, .block_size = -1};
    dma_sparsity *sp = NULL;
    ck_assert_int_eq(dma_sparsity_build(a, &mp, 1, 1, 4, 4, NULL, NULL, &sp), DMA_ERR_WINDOW);
    ck_assert(dma_context_last_error(a)[0] != '\0');
    ck_assert_str_eq(dma_context_last_error(b), "");
    dma_context_destroy(a);
    dma_context_destroy(b);
}
END_TEST

static Suite *errors_suite(void)
{
    Suite *s = suite_create("errors");
    TCase *tf = tcase_create("forward");
    tcase_set_timeout(tf, 60);
    tcase_add_loop_test(tf, forward_errors, 0, N_FWD_ERRORS);
    tcase_add_test(tf, forward_optional_arguments);
    tcase_add_test(tf, forward_valid_broadcasts);
    suite_add_tcase(s, tf);

    TCase *tc = tcase_create("api");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, context_errors);
    tcase_add_test(tc, context_unsupported_isa);
    tcase_add_test(tc, context_defaults);
    tcase_add_test(tc, env_isa);
    tcase_add_test(tc, env_tn_rows);
    tcase_add_test(tc, status_strings);
    tcase_add_test(tc, isa_names);
    tcase_add_test(tc, tensor_helpers);
    tcase_add_test(tc, last_error_is_per_context);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(errors_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

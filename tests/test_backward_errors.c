/*
 * test_backward_errors.c - dma_backward on bad input: every mutation of one valid call gives its
 * status and a message, leaves every input's bytes and every output's sentinel untouched; the
 * optional arguments really are optional.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* Calls Check only when it fails (as backward_cases.h's CHECK). */
#define CHECK(expr, ...)                                                                         \
    do {                                                                                         \
        if (!(expr))                                                                             \
            ck_abort_msg(__VA_ARGS__);                                                           \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* Bad input                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* The valid call: B=2, Lq=5, Lk=6, Hq=4, Hkv=2, D=8, bias (2, 2, 1, 6), causal top-3 sparsity
 * (2, 2, 5, 6) built from it. Every buffer holds EBUF floats, enough for every shape a mutation
 * below gives, so a library that writes before validating does not fault (it fails the test). */
enum { EB = 2, ELQ = 5, ELK = 6, EHQ = 4, EHKV = 2, ED = 8, EBUF = 1 << 15 };
enum { I_Q, I_K, I_V, I_BIAS, I_OUT, I_LSE, I_DOUT, I_DQ, I_DK, I_DV, I_DBIAS, N_BUFS };

typedef struct err_call {
    dma_context *ctx;
    dma_tensor t[N_BUFS];
    const dma_tensor *p[N_BUFS];
    const dma_sparsity *sp;
    dma_attn_params params;
    const dma_attn_params *pparams;
    /* owned */
    dma_context *own_ctx;
    float *buf[N_BUFS];
    dma_sparsity *sp_ok, *sp_short_q, *sp_h3;
} err_call;

static dma_status err_run(err_call *c)
{
    return dma_backward(c->ctx, c->p[I_Q], c->p[I_K], c->p[I_V], c->p[I_BIAS], c->sp, c->pparams,
                        c->p[I_OUT], c->p[I_LSE], c->p[I_DOUT], (dma_tensor *)c->p[I_DQ],
                        (dma_tensor *)c->p[I_DK], (dma_tensor *)c->p[I_DV],
                        (dma_tensor *)c->p[I_DBIAS]);
}

/* Every tensor with the given sizes, contiguous in its own buffer. */
static void err_shapes(err_call *c, int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,
                       int64_t D)
{
    c->t[I_Q] = dma_tensor_4d(c->buf[I_Q], DMA_F32, B, Lq, Hq, D);
    c->t[I_K] = dma_tensor_4d(c->buf[I_K], DMA_F32, B, Lk, Hkv, D);
    c->t[I_V] = dma_tensor_4d(c->buf[I_V], DMA_F32, B, Lk, Hkv, D);
    c->t[I_BIAS] = dma_tensor_4d(c->buf[I_BIAS], DMA_F32, B, Hkv, 1, Lk);
    c->t[I_OUT] = dma_tensor_4d(c->buf[I_OUT], DMA_F32, B, Lq, Hq, D);
    c->t[I_LSE] = dma_tensor_3d(c->buf[I_LSE], DMA_F32, B, Hq, Lq);
    c->t[I_DOUT] = dma_tensor_4d(c->buf[I_DOUT], DMA_F32, B, Lq, Hq, D);
    c->t[I_DQ] = dma_tensor_4d(c->buf[I_DQ], DMA_F32, B, Lq, Hq, D);
    c->t[I_DK] = dma_tensor_4d(c->buf[I_DK], DMA_F32, B, Lk, Hkv, D);
    c->t[I_DV] = dma_tensor_4d(c->buf[I_DV], DMA_F32, B, Lk, Hkv, D);
    c->t[I_DBIAS] = dma_tensor_4d(c->buf[I_DBIAS], DMA_F32, B, Hkv, 1, Lk);
}

static void err_init(err_call *c)
{
    memset(c, 0, sizeof *c);
    c->own_ctx = test_scalar_context();
    c->ctx = c->own_ctx;
    test_rng r = rng_make(140);
    for (int i = 0; i < N_BUFS; i++) {
        c->buf[i] = test_malloc(EBUF * sizeof(float));
        for (int x = 0; x < EBUF; x++)
            c->buf[i][x] = rng_float(&r, -1.0f, 1.0f);
        c->p[i] = &c->t[i];
    }
    err_shapes(c, EB, ELQ, ELK, EHQ, EHKV, ED);
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = 3};
    ck_assert_int_eq(dma_sparsity_build(c->ctx, &mp, EB, EHKV, ELQ, ELK, &c->t[I_BIAS], NULL,
                                        &c->sp_ok),
                     DMA_OK);
    mp.kind = DMA_MASK_DENSE;
    ck_assert_int_eq(dma_sparsity_build(c->ctx, &mp, EB, EHKV, ELQ - 1, ELK, NULL, NULL,
                                        &c->sp_short_q),
                     DMA_OK);
    ck_assert_int_eq(dma_sparsity_build(c->ctx, &mp, EB, 3, ELQ, ELK, NULL, NULL, &c->sp_h3),
                     DMA_OK);
    c->sp = c->sp_ok;
    c->params.causal = 1;
    c->params.softcap = 10.0f;
    c->params.scale = 0.25f;
    c->pparams = &c->params;
    /* out and lse from the forward, then the unmodified call must succeed, or the error tests
     * would prove nothing */
    ck_assert_int_eq(dma_forward(c->ctx, &c->t[I_Q], &c->t[I_K], &c->t[I_V], &c->t[I_BIAS],
                                 c->sp, &c->params, &c->t[I_OUT], &c->t[I_LSE]),
                     DMA_OK);
    dma_status st = err_run(c);
    CHECK(st == DMA_OK, "the valid backward fails: %s (%s)", dma_status_string(st),
                  dma_context_last_error(c->ctx));
}

static void err_free(err_call *c)
{
    for (int i = 0; i < N_BUFS; i++)
        free(c->buf[i]);
    dma_sparsity_destroy(c->sp_ok);
    dma_sparsity_destroy(c->sp_short_q);
    dma_sparsity_destroy(c->sp_h3);
    dma_context_destroy(c->own_ctx);
}

static void merge_last_two(dma_tensor *t)
{
    t->ndim = 3;
    t->shape[2] *= t->shape[3];
    t->stride[2] = 1;
    t->shape[3] = 0;
    t->stride[3] = 0;
}

/* NULL pointers */
static void e_ctx_null(err_call *c) { c->ctx = NULL; }
static void e_q_null(err_call *c) { c->p[I_Q] = NULL; }
static void e_k_null(err_call *c) { c->p[I_K] = NULL; }
static void e_v_null(err_call *c) { c->p[I_V] = NULL; }
static void e_out_null(err_call *c) { c->p[I_OUT] = NULL; }
static void e_lse_null(err_call *c) { c->p[I_LSE] = NULL; }
static void e_dout_null(err_call *c) { c->p[I_DOUT] = NULL; }
static void e_dq_null(err_call *c) { c->p[I_DQ] = NULL; }
static void e_dk_null(err_call *c) { c->p[I_DK] = NULL; }
static void e_dv_null(err_call *c) { c->p[I_DV] = NULL; }
static void e_dbias_without_bias(err_call *c) { c->p[I_BIAS] = NULL; }
static void e_lse_data_null(err_call *c) { c->t[I_LSE].data = NULL; }
static void e_dout_data_null(err_call *c) { c->t[I_DOUT].data = NULL; }
static void e_dq_data_null(err_call *c) { c->t[I_DQ].data = NULL; }
static void e_dk_data_null(err_call *c) { c->t[I_DK].data = NULL; }
static void e_dv_data_null(err_call *c) { c->t[I_DV].data = NULL; }
static void e_dbias_data_null(err_call *c) { c->t[I_DBIAS].data = NULL; }
/* gradient shapes */
static void e_dq_batch(err_call *c) { c->t[I_DQ].shape[0] = 1; }
static void e_dq_length(err_call *c) { c->t[I_DQ].shape[1] = ELQ - 1; }
static void e_dq_heads(err_call *c) { c->t[I_DQ].shape[2] = EHKV; }
static void e_dq_dim(err_call *c) { c->t[I_DQ].shape[3] = ED - 1; }
static void e_dq_ndim3(err_call *c) { merge_last_two(&c->t[I_DQ]); }
static void e_dk_length(err_call *c) { c->t[I_DK].shape[1] = ELK - 1; }
static void e_dk_heads(err_call *c)
{
    c->t[I_DK] = dma_tensor_4d(c->buf[I_DK], DMA_F32, EB, ELK, EHQ, ED);
}
static void e_dk_batch(err_call *c) { c->t[I_DK].shape[0] = 1; }
static void e_dv_dim(err_call *c) { c->t[I_DV].shape[3] = ED - 1; }
static void e_dv_batch(err_call *c) { c->t[I_DV].shape[0] = 1; }
static void e_dv_length(err_call *c)
{
    c->t[I_DV] = dma_tensor_4d(c->buf[I_DV], DMA_F32, EB, ELK + 1, EHKV, ED);
}
static void e_dbias_per_row(err_call *c)
{
    c->t[I_DBIAS] = dma_tensor_4d(c->buf[I_DBIAS], DMA_F32, EB, EHKV, ELQ, ELK);
}
static void e_dbias_heads(err_call *c)
{
    c->t[I_DBIAS] = dma_tensor_4d(c->buf[I_DBIAS], DMA_F32, EB, EHQ, 1, ELK);
}
static void e_dbias_batch(err_call *c) { c->t[I_DBIAS].shape[0] = 1; }
static void e_dbias_keys(err_call *c) { c->t[I_DBIAS].shape[3] = ELK - 1; }
static void e_dbias_ndim3(err_call *c)
{
    c->t[I_DBIAS] = dma_tensor_3d(c->buf[I_DBIAS], DMA_F32, EB, EHKV, ELK);
}
/* shapes of the other inputs */
static void e_dout_length(err_call *c) { c->t[I_DOUT].shape[1] = ELQ - 1; }
static void e_dout_heads(err_call *c) { c->t[I_DOUT].shape[2] = EHKV; }
static void e_dout_dim(err_call *c) { c->t[I_DOUT].shape[3] = ED - 1; }
static void e_out_length(err_call *c) { c->t[I_OUT].shape[1] = ELQ - 1; }
static void e_lse_length(err_call *c) { c->t[I_LSE].shape[2] = ELQ - 1; }
static void e_lse_heads(err_call *c)
{
    c->t[I_LSE] = dma_tensor_3d(c->buf[I_LSE], DMA_F32, EB, EHKV, ELQ);
}
static void e_k_length(err_call *c) { c->t[I_K].shape[1] = ELK - 1; }
static void e_bias_keys(err_call *c) { c->t[I_BIAS].shape[3] = ELK - 1; }
static void e_sp_lq(err_call *c) { c->sp = c->sp_short_q; }
static void e_sp_heads(err_call *c) { c->sp = c->sp_h3; }
/* strides */
static void e_dq_last_stride(err_call *c) { c->t[I_DQ].stride[3] = 2; }
static void e_dk_last_stride(err_call *c) { c->t[I_DK].stride[3] = 0; }
static void e_dv_neg_stride(err_call *c) { c->t[I_DV].stride[1] = -c->t[I_DV].stride[1]; }
static void e_dbias_last_stride(err_call *c) { c->t[I_DBIAS].stride[3] = 2; }
static void e_dout_last_stride(err_call *c) { c->t[I_DOUT].stride[3] = 2; }
static void e_lse_last_stride(err_call *c) { c->t[I_LSE].stride[2] = 2; }
/* dtypes */
static void e_dq_bf16(err_call *c) { c->t[I_DQ].dtype = DMA_BF16; }
static void e_dk_f16(err_call *c) { c->t[I_DK].dtype = DMA_F16; }
static void e_dv_bool(err_call *c) { c->t[I_DV].dtype = DMA_BOOL; }
static void e_dbias_bf16(err_call *c) { c->t[I_DBIAS].dtype = DMA_BF16; }
static void e_dout_f16(err_call *c) { c->t[I_DOUT].dtype = DMA_F16; }
static void e_lse_bf16(err_call *c) { c->t[I_LSE].dtype = DMA_BF16; }
static void e_out_f16(err_call *c) { c->t[I_OUT].dtype = DMA_F16; }
static void e_q_bf16(err_call *c) { c->t[I_Q].dtype = DMA_BF16; }
static void e_dq_unknown(err_call *c) { c->t[I_DQ].dtype = (dma_dtype)42; }
/* heads, head dim, scalars (the forward's errors) */
static void e_heads_not_multiple(err_call *c)
{
    err_shapes(c, EB, ELQ, ELK, 4, 3, ED);
    c->p[I_BIAS] = NULL;
    c->p[I_DBIAS] = NULL;
    c->sp = NULL;
}
static void e_d_zero(err_call *c)
{
    err_shapes(c, EB, ELQ, ELK, EHQ, EHKV, 0);
    c->sp = NULL;
}
static void e_d_257(err_call *c)
{
    err_shapes(c, EB, ELQ, ELK, EHQ, EHKV, DMA_MAX_HEAD_DIM + 1);
    c->sp = NULL;
}
static void e_softcap_neg(err_call *c) { c->params.softcap = -1.0f; }
static void e_scale_nan(err_call *c) { c->params.scale = NAN; }
/* gradients over inputs */
static void e_dq_over_q(err_call *c) { c->t[I_DQ].data = c->buf[I_Q]; }
static void e_dk_over_dout(err_call *c) { c->t[I_DK].data = c->buf[I_DOUT] + 5; }
static void e_dv_over_out(err_call *c) { c->t[I_DV].data = c->buf[I_OUT]; }
static void e_dbias_over_bias(err_call *c) { c->t[I_DBIAS].data = c->buf[I_BIAS]; }
static void e_dq_over_lse(err_call *c) { c->t[I_DQ].data = c->buf[I_LSE] + 1; }

typedef struct err_case {
    const char *name;
    void (*mutate)(err_call *);
    dma_status expect;
} err_case;

#define ERR(fn, st) {#fn, fn, st}
static const err_case ERRORS[] = {
    ERR(e_ctx_null, DMA_ERR_NULL),
    ERR(e_q_null, DMA_ERR_NULL),
    ERR(e_k_null, DMA_ERR_NULL),
    ERR(e_v_null, DMA_ERR_NULL),
    ERR(e_out_null, DMA_ERR_NULL),
    ERR(e_lse_null, DMA_ERR_NULL),
    ERR(e_dout_null, DMA_ERR_NULL),
    ERR(e_dq_null, DMA_ERR_NULL),
    ERR(e_dk_null, DMA_ERR_NULL),
    ERR(e_dv_null, DMA_ERR_NULL),
    ERR(e_dbias_without_bias, DMA_ERR_NULL),
    ERR(e_lse_data_null, DMA_ERR_NULL),
    ERR(e_dout_data_null, DMA_ERR_NULL),
    ERR(e_dq_data_null, DMA_ERR_NULL),
    ERR(e_dk_data_null, DMA_ERR_NULL),
    ERR(e_dv_data_null, DMA_ERR_NULL),
    ERR(e_dbias_data_null, DMA_ERR_NULL),
    ERR(e_dq_batch, DMA_ERR_SHAPE),
    ERR(e_dq_length, DMA_ERR_SHAPE),
    ERR(e_dq_heads, DMA_ERR_SHAPE),
    ERR(e_dq_dim, DMA_ERR_SHAPE),
    ERR(e_dq_ndim3, DMA_ERR_SHAPE),
    ERR(e_dk_length, DMA_ERR_SHAPE),
    ERR(e_dk_heads, DMA_ERR_SHAPE),
    ERR(e_dk_batch, DMA_ERR_SHAPE),
    ERR(e_dv_dim, DMA_ERR_SHAPE),
    ERR(e_dv_batch, DMA_ERR_SHAPE),
    ERR(e_dv_length, DMA_ERR_SHAPE),
    ERR(e_dbias_per_row, DMA_ERR_SHAPE),
    ERR(e_dbias_heads, DMA_ERR_SHAPE),
    ERR(e_dbias_batch, DMA_ERR_SHAPE),
    ERR(e_dbias_keys, DMA_ERR_SHAPE),
    ERR(e_dbias_ndim3, DMA_ERR_SHAPE),
    ERR(e_dout_length, DMA_ERR_SHAPE),
    ERR(e_dout_heads, DMA_ERR_SHAPE),
    ERR(e_dout_dim, DMA_ERR_SHAPE),
    ERR(e_out_length, DMA_ERR_SHAPE),
    ERR(e_lse_length, DMA_ERR_SHAPE),
    ERR(e_lse_heads, DMA_ERR_SHAPE),
    ERR(e_k_length, DMA_ERR_SHAPE),
    ERR(e_bias_keys, DMA_ERR_SHAPE),
    ERR(e_sp_lq, DMA_ERR_SHAPE),
    ERR(e_sp_heads, DMA_ERR_SHAPE),
    ERR(e_dq_last_stride, DMA_ERR_STRIDE),
    ERR(e_dk_last_stride, DMA_ERR_STRIDE),
    ERR(e_dv_neg_stride, DMA_ERR_STRIDE),
    ERR(e_dbias_last_stride, DMA_ERR_STRIDE),
    ERR(e_dout_last_stride, DMA_ERR_STRIDE),
    ERR(e_lse_last_stride, DMA_ERR_STRIDE),
    ERR(e_dq_bf16, DMA_ERR_DTYPE),
    ERR(e_dk_f16, DMA_ERR_DTYPE),
    ERR(e_dv_bool, DMA_ERR_DTYPE),
    ERR(e_dbias_bf16, DMA_ERR_DTYPE),
    ERR(e_dout_f16, DMA_ERR_DTYPE),
    ERR(e_lse_bf16, DMA_ERR_DTYPE),
    ERR(e_out_f16, DMA_ERR_DTYPE),
    ERR(e_q_bf16, DMA_ERR_DTYPE),
    ERR(e_dq_unknown, DMA_ERR_DTYPE),
    ERR(e_heads_not_multiple, DMA_ERR_HEADS),
    ERR(e_d_zero, DMA_ERR_HEAD_DIM),
    ERR(e_d_257, DMA_ERR_HEAD_DIM),
    ERR(e_softcap_neg, DMA_ERR_BAD_VALUE),
    ERR(e_scale_nan, DMA_ERR_BAD_VALUE),
    ERR(e_dq_over_q, DMA_ERR_OVERLAP),
    ERR(e_dk_over_dout, DMA_ERR_OVERLAP),
    ERR(e_dv_over_out, DMA_ERR_OVERLAP),
    ERR(e_dbias_over_bias, DMA_ERR_OVERLAP),
    ERR(e_dq_over_lse, DMA_ERR_OVERLAP),
};
#define N_ERRORS ((int)(sizeof ERRORS / sizeof ERRORS[0]))

START_TEST(bad_input)
{
    const err_case *e = &ERRORS[_i];
    err_call c;
    err_init(&c);
    e->mutate(&c);
    /* inputs: the bytes must not change; outputs: must keep the sentinel */
    unsigned char *copy[N_BUFS];
    for (int i = 0; i < N_BUFS; i++) {
        if (i >= I_DQ)
            fill_sentinel(c.buf[i], EBUF * sizeof(float));
        copy[i] = test_malloc(EBUF * sizeof(float));
        memcpy(copy[i], c.buf[i], EBUF * sizeof(float));
    }
    dma_status st = err_run(&c);
    CHECK(st == e->expect, "%s: got %d (%s), expected %d (%s)", e->name, (int)st,
                  dma_status_string(st), (int)e->expect, dma_status_string(e->expect));
    static const char *names[N_BUFS] = {"q", "k", "v", "bias", "out", "lse", "dout",
                                        "dq", "dk", "dv", "dbias"};
    for (int i = 0; i < N_BUFS; i++) {
        CHECK(memcmp(copy[i], c.buf[i], EBUF * sizeof(float)) == 0, "%s: %s was written",
                      e->name, names[i]);
        free(copy[i]);
    }
    if (c.ctx != NULL)
        CHECK(dma_context_last_error(c.ctx)[0] != '\0',
                      "%s: dma_context_last_error is empty", e->name);
    err_free(&c);
}
END_TEST

/* Gradients that are interleaved views of one fused array (dq, dk, dv in the rows of one dqkv
 * buffer, as the examples' trainer keeps them) are accepted and equal separate buffers'. */
START_TEST(interleaved_gradients)
{
    err_call c;
    err_init(&c);
    ck_assert_int_eq(err_run(&c), DMA_OK);
    const int64_t qn = EB * ELQ * EHQ * ED, kn = EB * ELK * EHKV * ED;
    float *sep[3] = {test_malloc(sizeof(float) * qn), test_malloc(sizeof(float) * kn),
                     test_malloc(sizeof(float) * kn)};
    memcpy(sep[0], c.buf[I_DQ], sizeof(float) * qn);
    memcpy(sep[1], c.buf[I_DK], sizeof(float) * kn);
    memcpy(sep[2], c.buf[I_DV], sizeof(float) * kn);
    /* one row per (b, token) of Hq + 2 Hkv heads; Lq == Lk is not needed: rows past a tensor's
     * length are simply not part of its view */
    const int64_t L = ELQ > ELK ? ELQ : ELK, row = (EHQ + 2 * EHKV) * ED;
    float *fused = test_malloc(sizeof(float) * EB * L * row);
    c.t[I_DQ] = dma_tensor_4d(fused, DMA_F32, EB, ELQ, EHQ, ED);
    c.t[I_DK] = dma_tensor_4d(fused + EHQ * ED, DMA_F32, EB, ELK, EHKV, ED);
    c.t[I_DV] = dma_tensor_4d(fused + (EHQ + EHKV) * ED, DMA_F32, EB, ELK, EHKV, ED);
    for (int g = I_DQ; g <= I_DV; g++) {
        c.t[g].stride[0] = L * row;
        c.t[g].stride[1] = row;
    }
    ck_assert_int_eq(err_run(&c), DMA_OK);
    for (int g = 0; g < 3; g++) {
        const dma_tensor *t = &c.t[I_DQ + g];
        for (int64_t b = 0, i = 0; b < t->shape[0]; b++)
            for (int64_t l = 0; l < t->shape[1]; l++)
                for (int64_t x = 0; x < t->shape[2] * ED; x++, i++)
                    CHECK(((float *)t->data)[b * t->stride[0] + l * t->stride[1] + x] ==
                              sep[g][i], "gradient %d differs in the fused array at %lld", g,
                          (long long)i);
        free(sep[g]);
    }
    free(fused);
    err_free(&c);
}
END_TEST

START_TEST(optional_arguments)
{
    /* controls for the NULL tests: dbias, bias + dbias, sparsity and params may be left out */
    for (int which = 0; which < 4; which++) {
        err_call c;
        err_init(&c);
        if (which == 0) c.p[I_DBIAS] = NULL;
        if (which == 1) { c.p[I_BIAS] = NULL; c.p[I_DBIAS] = NULL; }
        if (which == 2) c.sp = NULL;
        if (which == 3) c.pparams = NULL;
        fill_sentinel(c.buf[I_DBIAS], EBUF * sizeof(float));
        dma_status st = err_run(&c);
        CHECK(st == DMA_OK, "optional argument %d: %s", which, dma_status_string(st));
        if (which <= 1)
            CHECK(is_sentinel(c.buf[I_DBIAS], EBUF * sizeof(float)),
                          "dbias written though NULL");
        err_free(&c);
    }
}
END_TEST


static Suite *backward_errors_suite(void)
{
    Suite *s = suite_create("backward_errors");
    TCase *te = tcase_create("errors");
    tcase_set_timeout(te, 60);
    tcase_add_loop_test(te, bad_input, 0, N_ERRORS);
    tcase_add_test(te, optional_arguments);
    tcase_add_test(te, interleaved_gradients);
    suite_add_tcase(s, te);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(backward_errors_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * test_sparsity_errors.c - bad input to the sparsity builders (dma_sparsity_build,
 * dma_sparsity_from_mask) and to dma_sparsity_to_dense (DESIGN section 7, include/dmattn.h):
 * every rule gets its own test that checks the exact status, that no output was touched and that
 * the context explains the failure. Each error test starts from a call that is checked to
 * succeed, and changes one thing.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "error_checks.h"

/* ------------------------------------------------------------------------------------------ */
/* dma_sparsity_build                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* The valid call: causal top-k, window 3, B=2, H=2, Lq=5, Lk=6, bias (2, 2, 1, 6) and
 * padding (2, 6); buf holds a per-row bias (2, 2, 5, 6) for the per-row mutations. */
enum { SB = 2, SH = 2, SLQ = 5, SLK = 6, SBUF = 4096 };

typedef struct build_call {
    dma_context *ctx;
    dma_mask_params params;
    const dma_mask_params *pparams;
    int64_t B, H, Lq, Lk;
    dma_tensor bias, pad;
    const dma_tensor *pbias, *ppad;
    dma_sparsity **pout;
    dma_sparsity *out;
    /* owned */
    dma_context *own_ctx;
    float *bbuf;
    uint8_t *pbuf;
} build_call;

static dma_status build_run(build_call *c)
{
    return dma_sparsity_build(c->ctx, c->pparams, c->B, c->H, c->Lq, c->Lk, c->pbias, c->ppad,
                              c->pout);
}

static void build_init(build_call *c)
{
    memset(c, 0, sizeof *c);
    c->own_ctx = test_scalar_context();
    c->ctx = c->own_ctx;
    c->bbuf = test_malloc(SBUF * sizeof(float));
    c->pbuf = test_malloc(SBUF);
    test_rng r = rng_make(7);
    for (int x = 0; x < SBUF; x++) {
        c->bbuf[x] = rng_float(&r, -1.0f, 1.0f);
        c->pbuf[x] = 1;
    }
    c->params.kind = DMA_MASK_TOPK;
    c->params.causal = 1;
    c->params.window = 3;
    c->pparams = &c->params;
    c->B = SB;
    c->H = SH;
    c->Lq = SLQ;
    c->Lk = SLK;
    c->bias = dma_tensor_4d(c->bbuf, DMA_F32, SB, SH, 1, SLK);
    c->pad = dma_tensor_2d(c->pbuf, DMA_BOOL, SB, SLK);
    c->pbias = &c->bias;
    c->ppad = &c->pad;
    c->pout = &c->out;
    c->out = NULL;
    dma_status st = build_run(c);
    ck_assert_msg(st == DMA_OK, "the valid build fails: %s (%s)", dma_status_string(st),
                  dma_context_last_error(c->ctx));
    dma_sparsity_destroy(c->out);
}

static void build_free(build_call *c)
{
    free(c->bbuf);
    free(c->pbuf);
    dma_context_destroy(c->own_ctx);
}

static void per_row(build_call *c) { c->bias = dma_tensor_4d(c->bbuf, DMA_F32, SB, SH, SLQ, SLK); }
static void dense_no_bias(build_call *c)
{
    c->params.kind = DMA_MASK_DENSE;
    c->pbias = NULL;
    c->ppad = NULL;
}

/* NULL pointers */
static void b_ctx_null(build_call *c) { c->ctx = NULL; }
static void b_params_null(build_call *c) { c->pparams = NULL; }
static void b_out_null(build_call *c) { c->pout = NULL; }
static void b_bias_null_topk(build_call *c) { c->pbias = NULL; }
static void b_bias_null_relu(build_call *c) { c->pbias = NULL; c->params.kind = DMA_MASK_RELU; }
static void b_bias_data_null(build_call *c) { c->bias.data = NULL; }
static void b_pad_data_null(build_call *c) { c->pad.data = NULL; }
/* enum, window, block size */
static void b_kind_unknown(build_call *c) { c->params.kind = (dma_mask_kind)17; }
static void b_kind_negative(build_call *c) { c->params.kind = (dma_mask_kind)-1; }
static void b_window_negative(build_call *c) { c->params.window = -1; }
static void b_window_negative_win(build_call *c)
{
    c->params.kind = DMA_MASK_WINDOW;
    c->params.window = -3;
}
static void b_block_negative(build_call *c) { c->params.block_size = -1; }
static void b_block_negative_dense(build_call *c) { dense_no_bias(c); c->params.block_size = -4; }
/* shapes */
static void b_B_negative(build_call *c) { c->B = -1; }
static void b_H_negative(build_call *c) { c->H = -2; }
static void b_Lq_negative(build_call *c) { c->Lq = -1; }
static void b_Lk_negative(build_call *c) { c->Lk = -1; }
static void b_bias_batch3(build_call *c) { c->bias.shape[0] = 3; }
static void b_bias_heads3(build_call *c) { c->bias.shape[1] = 3; }
static void b_bias_rows2(build_call *c) { c->bias.shape[2] = 2; c->bias.stride[2] = SLK; }
static void b_bias_keys(build_call *c) { c->bias.shape[3] = SLK - 1; }
static void b_bias_keys_more(build_call *c) { c->bias.shape[3] = SLK + 1; }
static void b_bias_ndim3(build_call *c) { c->bias = dma_tensor_3d(c->bbuf, DMA_F32, SB, SH, SLK); }
static void b_bias_neg_dim(build_call *c) { c->bias.shape[1] = -2; }
static void b_pad_batch3(build_call *c) { c->pad.shape[0] = 3; }
static void b_pad_keys(build_call *c) { c->pad.shape[1] = SLK - 1; }
static void b_pad_ndim1(build_call *c)
{
    c->pad.ndim = 1;
    c->pad.shape[0] = SLK;
    c->pad.stride[0] = 1;
}
static void b_pad_ndim3(build_call *c)
{
    c->pad = dma_tensor_3d(c->pbuf, DMA_BOOL, SB, 1, SLK);
}
/* strides */
static void b_bias_last_stride(build_call *c) { c->bias.stride[3] = 2; }
static void b_bias_neg_stride(build_call *c) { c->bias.stride[1] = -c->bias.stride[1]; }
static void b_pad_last_stride(build_call *c) { c->pad.stride[1] = 0; }
static void b_pad_neg_stride(build_call *c) { c->pad.stride[0] = -c->pad.stride[0]; }
/* dtypes */
static void b_bias_f16(build_call *c) { c->bias.dtype = DMA_F16; }
static void b_bias_bf16(build_call *c) { c->bias.dtype = DMA_BF16; }
static void b_bias_bool(build_call *c) { c->bias.dtype = DMA_BOOL; }
static void b_pad_f32(build_call *c) { c->pad.dtype = DMA_F32; }
static void b_pad_f16(build_call *c) { c->pad.dtype = DMA_F16; }
/* sizes */
static void b_lk_too_big(build_call *c) { dense_no_bias(c); c->Lk = BIG_LK; }
static void b_lq_too_big(build_call *c) { dense_no_bias(c); c->Lq = BIG_LK; }
static void b_huge_lengths(build_call *c) { dense_no_bias(c); c->Lq = c->Lk = TWO40; }
static void b_product_overflow(build_call *c)
{
    dense_no_bias(c);
    c->B = c->H = TWO40;
    c->Lq = c->Lk = 64;
}
/* bad bias values, anywhere in the bias */
static void b_nan_first(build_call *c) { c->bbuf[0] = NAN; }
static void b_inf_last(build_call *c) { c->bbuf[SB * SH * SLK - 1] = INFINITY; }
static void b_nan_padded_key(build_call *c) { c->pbuf[3] = 0; c->bbuf[3] = NAN; }
static void b_nan_invisible(build_call *c)
{
    per_row(c);
    c->bbuf[SLK - 1] = NAN; /* row 0 sees keys j <= 1 only (causal) */
}
static void b_inf_per_row(build_call *c) { per_row(c); c->bbuf[SB * SH * SLQ * SLK / 2] = INFINITY; }
static void b_relu_nan(build_call *c) { c->params.kind = DMA_MASK_RELU; c->bbuf[7] = NAN; }
static void b_relu_inf(build_call *c) { c->params.kind = DMA_MASK_RELU; c->bbuf[11] = INFINITY; }
static void b_relu_nan_per_row(build_call *c)
{
    per_row(c);
    c->params.kind = DMA_MASK_RELU;
    c->bbuf[SB * SH * SLQ * SLK - 1] = NAN;
}
static void b_noncausal_inf(build_call *c) { c->params.causal = 0; c->bbuf[13] = INFINITY; }
/* no query rows, so nothing is selected: the bias is still checked (as on the GPU) */
static void b_nan_no_rows(build_call *c) { c->Lq = 0; c->bbuf[SB * SH * SLK - 2] = NAN; }
static void b_relu_inf_no_rows(build_call *c)
{
    c->params.kind = DMA_MASK_RELU;
    c->Lq = 0;
    c->bbuf[1] = INFINITY;
}

typedef struct build_error {
    const char *name;
    void (*mutate)(build_call *);
    dma_status expect;
} build_error;

#define BUILD_ERR(fn, st) {#fn, fn, st}
static const build_error BUILD_ERRORS[] = {
    BUILD_ERR(b_ctx_null, DMA_ERR_NULL),
    BUILD_ERR(b_params_null, DMA_ERR_NULL),
    BUILD_ERR(b_out_null, DMA_ERR_NULL),
    BUILD_ERR(b_bias_null_topk, DMA_ERR_NULL),
    BUILD_ERR(b_bias_null_relu, DMA_ERR_NULL),
    BUILD_ERR(b_bias_data_null, DMA_ERR_NULL),
    BUILD_ERR(b_pad_data_null, DMA_ERR_NULL),
    BUILD_ERR(b_kind_unknown, DMA_ERR_ARG),
    BUILD_ERR(b_kind_negative, DMA_ERR_ARG),
    BUILD_ERR(b_window_negative, DMA_ERR_WINDOW),
    BUILD_ERR(b_window_negative_win, DMA_ERR_WINDOW),
    BUILD_ERR(b_block_negative, DMA_ERR_WINDOW),
    BUILD_ERR(b_block_negative_dense, DMA_ERR_WINDOW),
    BUILD_ERR(b_B_negative, DMA_ERR_SHAPE),
    BUILD_ERR(b_H_negative, DMA_ERR_SHAPE),
    BUILD_ERR(b_Lq_negative, DMA_ERR_SHAPE),
    BUILD_ERR(b_Lk_negative, DMA_ERR_SHAPE),
    BUILD_ERR(b_bias_batch3, DMA_ERR_SHAPE),
    BUILD_ERR(b_bias_heads3, DMA_ERR_SHAPE),
    BUILD_ERR(b_bias_rows2, DMA_ERR_SHAPE),
    BUILD_ERR(b_bias_keys, DMA_ERR_SHAPE),
    BUILD_ERR(b_bias_keys_more, DMA_ERR_SHAPE),
    BUILD_ERR(b_bias_ndim3, DMA_ERR_SHAPE),
    BUILD_ERR(b_bias_neg_dim, DMA_ERR_SHAPE),
    BUILD_ERR(b_pad_batch3, DMA_ERR_SHAPE),
    BUILD_ERR(b_pad_keys, DMA_ERR_SHAPE),
    BUILD_ERR(b_pad_ndim1, DMA_ERR_SHAPE),
    BUILD_ERR(b_pad_ndim3, DMA_ERR_SHAPE),
    BUILD_ERR(b_bias_last_stride, DMA_ERR_STRIDE),
    BUILD_ERR(b_bias_neg_stride, DMA_ERR_STRIDE),
    BUILD_ERR(b_pad_last_stride, DMA_ERR_STRIDE),
    BUILD_ERR(b_pad_neg_stride, DMA_ERR_STRIDE),
    BUILD_ERR(b_bias_f16, DMA_ERR_DTYPE),
    BUILD_ERR(b_bias_bf16, DMA_ERR_DTYPE),
    BUILD_ERR(b_bias_bool, DMA_ERR_DTYPE),
    BUILD_ERR(b_pad_f32, DMA_ERR_DTYPE),
    BUILD_ERR(b_pad_f16, DMA_ERR_DTYPE),
    BUILD_ERR(b_lk_too_big, DMA_ERR_OVERFLOW),
    BUILD_ERR(b_lq_too_big, DMA_ERR_OVERFLOW),
    BUILD_ERR(b_huge_lengths, DMA_ERR_OVERFLOW),
    BUILD_ERR(b_product_overflow, DMA_ERR_OVERFLOW),
    BUILD_ERR(b_nan_first, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_inf_last, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_nan_padded_key, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_nan_invisible, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_inf_per_row, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_relu_nan, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_relu_inf, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_relu_nan_per_row, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_noncausal_inf, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_nan_no_rows, DMA_ERR_BAD_VALUE),
    BUILD_ERR(b_relu_inf_no_rows, DMA_ERR_BAD_VALUE),
};
#define N_BUILD_ERRORS ((int)(sizeof BUILD_ERRORS / sizeof BUILD_ERRORS[0]))

START_TEST(build_errors)
{
    const build_error *e = &BUILD_ERRORS[_i];
    build_call c;
    build_init(&c);
    e->mutate(&c);
    c.out = UNTOUCHED_SP;
    dma_status st = build_run(&c);
    ck_assert_msg(st == e->expect, "%s: got %d (%s), expected %d (%s)", e->name, (int)st,
                  dma_status_string(st), (int)e->expect, dma_status_string(e->expect));
    ck_assert_msg(c.out == UNTOUCHED_SP, "%s: *out was written", e->name);
    if (c.ctx != NULL)
        expect_last_error(c.ctx, e->name);
    build_free(&c);
}
END_TEST

START_TEST(build_neg_inf_is_fine)
{
    /* control for the bad-value tests: -inf is a valid bias (never kept) */
    build_call c;
    build_init(&c);
    c.bbuf[0] = -INFINITY;
    c.bbuf[5] = -INFINITY;
    ck_assert_int_eq(build_run(&c), DMA_OK);
    dma_sparsity_destroy(c.out);
    c.params.kind = DMA_MASK_RELU;
    ck_assert_int_eq(build_run(&c), DMA_OK);
    dma_sparsity_destroy(c.out);
    build_free(&c);
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* dma_sparsity_from_mask, dma_sparsity_to_dense                                              */
/* ------------------------------------------------------------------------------------------ */

START_TEST(from_mask_errors)
{
    dma_context *ctx = test_scalar_context();
    uint8_t *m = test_calloc(4096, 1);
    const dma_tensor ok = dma_tensor_4d(m, DMA_BOOL, 2, 2, 5, 6);
    dma_sparsity *sp = NULL;
    ck_assert_int_eq(dma_sparsity_from_mask(ctx, &ok, &sp), DMA_OK);
    dma_sparsity_destroy(sp);

    struct {
        const char *name;
        dma_tensor t;
        dma_status expect;
    } cases[16];
    int n = 0;
#define ADD_CASE(nm, st) (cases[n].name = nm, cases[n].t = ok, cases[n].expect = st, &cases[n++].t)
    ADD_CASE("data NULL", DMA_ERR_NULL)->data = NULL;
    *ADD_CASE("ndim 3", DMA_ERR_SHAPE) = dma_tensor_3d(m, DMA_BOOL, 4, 5, 6);
    ADD_CASE("negative size", DMA_ERR_SHAPE)->shape[2] = -5;
    ADD_CASE("dtype f32", DMA_ERR_DTYPE)->dtype = DMA_F32;
    ADD_CASE("dtype f16", DMA_ERR_DTYPE)->dtype = DMA_F16;
    ADD_CASE("last stride 2", DMA_ERR_STRIDE)->stride[3] = 2;
    ADD_CASE("negative stride", DMA_ERR_STRIDE)->stride[1] = -30;
    {
        dma_tensor *t = ADD_CASE("2^40 x 2^40", DMA_ERR_OVERFLOW);
        t->shape[0] = t->shape[1] = t->shape[2] = TWO40;
        t->stride[0] = t->stride[1] = t->stride[2] = 0;
    }
    {
        dma_tensor *t = ADD_CASE("Lq > INT32_MAX", DMA_ERR_OVERFLOW);
        t->shape[2] = BIG_LK;
        t->stride[2] = 0;
    }
    ADD_CASE("Lk > INT32_MAX", DMA_ERR_OVERFLOW)->shape[3] = BIG_LK;
#undef ADD_CASE

    for (int i = 0; i < n; i++) {
        sp = UNTOUCHED_SP;
        dma_status st = dma_sparsity_from_mask(ctx, &cases[i].t, &sp);
        ck_assert_msg(st == cases[i].expect, "%s: got %s, expected %s", cases[i].name,
                      dma_status_string(st), dma_status_string(cases[i].expect));
        ck_assert_msg(sp == UNTOUCHED_SP, "%s: *out was written", cases[i].name);
        expect_last_error(ctx, cases[i].name);
    }

    sp = UNTOUCHED_SP;
    ck_assert_int_eq(dma_sparsity_from_mask(NULL, &ok, &sp), DMA_ERR_NULL);
    ck_assert(sp == UNTOUCHED_SP);
    ck_assert_int_eq(dma_sparsity_from_mask(ctx, NULL, &sp), DMA_ERR_NULL);
    ck_assert(sp == UNTOUCHED_SP);
    ck_assert_int_eq(dma_sparsity_from_mask(ctx, &ok, NULL), DMA_ERR_NULL);
    free(m);
    dma_context_destroy(ctx);
}
END_TEST

START_TEST(to_dense_errors)
{
    dma_context *ctx = test_scalar_context();
    dma_sparsity *sp = dense_sparsity(ctx, 2, 3, 4, 5);
    enum { N = 2 * 3 * 4 * 5 };
    uint8_t buf[N + 8];
    fill_sentinel(buf, sizeof buf);
    ck_assert_int_eq(dma_sparsity_to_dense(sp, buf, N - 1), DMA_ERR_BUFFER);
    ck_assert_msg(is_sentinel(buf, sizeof buf), "written though too small");
    ck_assert_int_eq(dma_sparsity_to_dense(sp, buf, 0), DMA_ERR_BUFFER);
    ck_assert_msg(is_sentinel(buf, sizeof buf), "written though too small");
    ck_assert_int_eq(dma_sparsity_to_dense(sp, NULL, N), DMA_ERR_NULL);
    ck_assert_int_eq(dma_sparsity_to_dense(NULL, buf, N), DMA_ERR_NULL);
    ck_assert_msg(is_sentinel(buf, sizeof buf), "written though sp is NULL");
    ck_assert_int_eq(dma_sparsity_to_dense(sp, buf, N), DMA_OK);
    dma_sparsity_destroy(sp);
    dma_context_destroy(ctx);
}
END_TEST

static Suite *sparsity_errors_suite(void)
{
    Suite *s = suite_create("sparsity_errors");
    TCase *tb = tcase_create("sparsity");
    tcase_set_timeout(tb, 60);
    tcase_add_loop_test(tb, build_errors, 0, N_BUILD_ERRORS);
    tcase_add_test(tb, build_neg_inf_is_fine);
    tcase_add_test(tb, from_mask_errors);
    tcase_add_test(tb, to_dense_errors);
    suite_add_tcase(s, tb);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(sparsity_errors_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

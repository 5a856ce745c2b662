/*
 * test_dynbias_args.c - the dynamic bias's arguments (dma_dynamic_bias_forward / _backward,
 * include/dmattn.h): every bad input gives its exact status, leaves the outputs untouched and
 * explains itself in the context; b_dt NULL is b_dt = 0, bit for bit. The values are
 * test_dynbias.c's.
 */
#include <check.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__SANITIZE_ADDRESS__)
/* The out-of-memory tests ask for petabytes: ASan must return NULL as malloc does, not abort. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1"; }
#endif

/* ------------------------------------------------------------------------------------------ */
/* Bad input: exact status, outputs untouched, a message                                       */
/* ------------------------------------------------------------------------------------------ */

/* The valid call: B = 2, Lk = 5, Hkv = 2, D = 3. Every buffer holds EBUF floats, so a library
 * that read before validating would not fault on the mutated shapes. */
enum { EB = 2, ELK = 5, EH = 2, ED = 3, EBUF = 4096 };
#define BIG ((int64_t)1 << 24)

enum { I_V, I_W, I_BDT, I_A, I_G, O_BIAS, O_DV, O_DW, O_DB, O_DA, N_BUFS };

typedef struct err_call {
    dma_context *ctx, *own;
    dma_tensor t[N_BUFS];   /* by the indices above; t[I_G] is dbias */
    dma_tensor *p[N_BUFS];  /* what is passed: &t[i], or NULL */
    float *buf[N_BUFS];
    bool backward;
} err_call;

static dma_status err_run(err_call *c)
{
    if (!c->backward)
        return dma_dynamic_bias_forward(c->ctx, c->p[I_V], c->p[I_W], c->p[I_BDT], c->p[I_A],
                                        c->p[O_BIAS]);
    return dma_dynamic_bias_backward(c->ctx, c->p[I_V], c->p[I_W], c->p[I_BDT], c->p[I_A],
                                     c->p[I_G], c->p[O_DV], c->p[O_DW], c->p[O_DB], c->p[O_DA]);
}

static void err_fill_outputs(err_call *c)
{
    for (int i = O_BIAS; i < N_BUFS; i++)
        fill_sentinel(c->buf[i], EBUF * sizeof(float));
}

static void err_init(err_call *c, bool backward)
{
    memset(c, 0, sizeof *c);
    c->own = c->ctx = test_scalar_context();
    c->backward = backward;
    test_rng r = rng_make(4242);
    for (int i = 0; i < N_BUFS; i++) {
        c->buf[i] = test_malloc(EBUF * sizeof(float));
        for (int x = 0; x < EBUF; x++)
            c->buf[i][x] = rng_float(&r, -1.0f, 1.0f);
        c->p[i] = &c->t[i];
    }
    c->t[I_V] = dma_tensor_4d(c->buf[I_V], DMA_F32, EB, ELK, EH, ED);
    c->t[I_W] = dma_tensor_2d(c->buf[I_W], DMA_F32, EH * ED, EH);
    c->t[I_BDT] = dma_tensor_1d(c->buf[I_BDT], DMA_F32, EH);
    c->t[I_A] = dma_tensor_1d(c->buf[I_A], DMA_F32, EH);
    c->t[I_G] = dma_tensor_4d(c->buf[I_G], DMA_F32, EB, EH, 1, ELK);
    c->t[O_BIAS] = dma_tensor_4d(c->buf[O_BIAS], DMA_F32, EB, EH, 1, ELK);
    c->t[O_DV] = dma_tensor_4d(c->buf[O_DV], DMA_F32, EB, ELK, EH, ED);
    c->t[O_DW] = dma_tensor_2d(c->buf[O_DW], DMA_F32, EH * ED, EH);
    c->t[O_DB] = dma_tensor_1d(c->buf[O_DB], DMA_F32, EH);
    c->t[O_DA] = dma_tensor_1d(c->buf[O_DA], DMA_F32, EH);
    /* the unmodified call must succeed, or the error tests would prove nothing */
    dma_status st = err_run(c);
    ck_assert_msg(st == DMA_OK, "the valid call fails: %s (%s)", dma_status_string(st),
                  dma_context_last_error(c->ctx));
}

static void err_free(err_call *c)
{
    for (int i = 0; i < N_BUFS; i++)
        free(c->buf[i]);
    dma_context_destroy(c->own);
}

/* (B, Lk, Hkv, D) views of v (and dv) and (B, Hkv, 1, Lk) views of the bias (and dbias) with
 * zero strides: huge logical sizes over the small buffers. */
static void err_huge(err_call *c, int64_t B, int64_t Lk, int64_t H)
{
    const int ib = c->backward ? I_G : O_BIAS;
    int64_t vs[4] = {0, 0, H > EH ? 0 : ED, 1}, bs[4] = {0, 0, 0, 1};
    c->t[I_V].shape[0] = c->t[O_DV].shape[0] = c->t[ib].shape[0] = B;
    c->t[I_V].shape[1] = c->t[O_DV].shape[1] = c->t[ib].shape[3] = Lk;
    c->t[I_V].shape[2] = c->t[O_DV].shape[2] = H;
    memcpy(c->t[I_V].stride, vs, sizeof vs);
    memcpy(c->t[O_DV].stride, vs, sizeof vs);
    memcpy(c->t[ib].stride, bs, sizeof bs);
}

/* Mutation i of the valid call (forward or backward); returns the status it must give. The
 * bias tensor is the forward's output or the backward's dbias. */
#define N_SHARED_ERRORS 44
#define N_BWD_ERRORS 20

static dma_status err_mutate(err_call *c, int i)
{
    const int ib = c->backward ? I_G : O_BIAS;
    dma_tensor *v = &c->t[I_V], *w = &c->t[I_W], *bdt = &c->t[I_BDT], *a = &c->t[I_A];
    dma_tensor *bias = &c->t[ib], *dv = &c->t[O_DV];
    switch (i) {
    case 0: c->ctx = NULL; return DMA_ERR_NULL;
    case 1: c->p[I_V] = NULL; return DMA_ERR_NULL;
    case 2: c->p[I_W] = NULL; return DMA_ERR_NULL;
    case 3: c->p[I_A] = NULL; return DMA_ERR_NULL;
    case 4: c->p[ib] = NULL; return DMA_ERR_NULL;
    case 5: v->data = NULL; return DMA_ERR_NULL;
    case 6: w->data = NULL; return DMA_ERR_NULL;
    case 7: bdt->data = NULL; return DMA_ERR_NULL;
    case 8: a->data = NULL; return DMA_ERR_NULL;
    case 9: bias->data = NULL; return DMA_ERR_NULL;
    case 10: v->dtype = DMA_BF16; return DMA_ERR_DTYPE;
    case 11: w->dtype = DMA_F16; return DMA_ERR_DTYPE;
    case 12: bdt->dtype = DMA_BOOL; return DMA_ERR_DTYPE;
    case 13: a->dtype = DMA_BF16; return DMA_ERR_DTYPE;
    case 14: bias->dtype = DMA_F16; return DMA_ERR_DTYPE;
    case 15: *v = dma_tensor_3d(v->data, DMA_F32, EB, ELK, EH * ED); return DMA_ERR_SHAPE;
    case 16: *w = dma_tensor_1d(w->data, DMA_F32, EH * ED * EH); return DMA_ERR_SHAPE;
    case 17: *bdt = dma_tensor_2d(bdt->data, DMA_F32, EH, 1); return DMA_ERR_SHAPE;
    case 18: *a = dma_tensor_2d(a->data, DMA_F32, 1, EH); return DMA_ERR_SHAPE;
    case 19: *bias = dma_tensor_3d(bias->data, DMA_F32, EB, EH, ELK); return DMA_ERR_SHAPE;
    case 20: v->stride[3] = 2; return DMA_ERR_STRIDE;
    case 21: v->stride[1] = -1; return DMA_ERR_STRIDE;
    case 22: w->stride[1] = 0; return DMA_ERR_STRIDE;
    case 23: bdt->stride[0] = 2; return DMA_ERR_STRIDE;
    case 24: a->stride[0] = 0; return DMA_ERR_STRIDE;
    case 25: bias->stride[0] = -5; return DMA_ERR_STRIDE;
    case 26: v->shape[2] = 0; return DMA_ERR_HEADS;
    case 27: v->shape[3] = 0; return DMA_ERR_HEAD_DIM;
    case 28: v->shape[3] = DMA_MAX_HEAD_DIM + 1; return DMA_ERR_HEAD_DIM;
    case 29: v->shape[2] = 3; return DMA_ERR_SHAPE; /* w_dt is no longer (Hkv * D, Hkv) */
    case 30: w->shape[0] = EH * ED - 1; return DMA_ERR_SHAPE;
    case 31: w->shape[1] = EH + 1; return DMA_ERR_SHAPE;
    case 32: bdt->shape[0] = EH + 1; return DMA_ERR_SHAPE;
    case 33: a->shape[0] = 1; return DMA_ERR_SHAPE;
    case 34: bias->shape[0] = 1; return DMA_ERR_SHAPE;
    case 35: bias->shape[1] = 1; return DMA_ERR_SHAPE;
    case 36: bias->shape[2] = 2; return DMA_ERR_SHAPE;
    case 37: bias->shape[3] = ELK - 1; return DMA_ERR_SHAPE;
    case 38: v->shape[0] = -1; return DMA_ERR_SHAPE;
    case 39: err_huge(c, EB, (int64_t)INT32_MAX + 1, EH); return DMA_ERR_OVERFLOW; /* Lk */
    case 40: err_huge(c, (int64_t)1 << 40, (int64_t)1 << 30, EH); return DMA_ERR_OVERFLOW;
    case 41: err_huge(c, EB, ELK, (int64_t)1 << 62); return DMA_ERR_OVERFLOW; /* Hkv * D */
    case 42: /* 2^51 bytes of scratch; the huge bias is moved above every buffer, so that its
              * address range overlaps none (it is never read: the allocation fails first) */
        err_huge(c, BIG, BIG, EH);
        for (int k = 0; k < N_BUFS; k++)
            if ((uintptr_t)(c->buf[k] + EBUF) > (uintptr_t)bias->data)
                bias->data = c->buf[k] + EBUF;
        return DMA_ERR_NOMEM;
    case 43: /* the bias (an output) over the input a, or dbias (an input) over db_dt */
        bias->data = c->backward ? c->buf[O_DB] : c->buf[I_A];
        return DMA_ERR_OVERLAP;
    default: break;
    }
    switch (i - N_SHARED_ERRORS) { /* the backward's gradients */
    case 0: c->t[O_DV].dtype = DMA_BF16; return DMA_ERR_DTYPE;
    case 1: *dv = dma_tensor_3d(dv->data, DMA_F32, EB, ELK, EH * ED); return DMA_ERR_SHAPE;
    case 2: dv->shape[0] = EB + 1; return DMA_ERR_SHAPE;
    case 3: dv->shape[1] = ELK - 1; return DMA_ERR_SHAPE;
    case 4: dv->shape[2] = 1; return DMA_ERR_SHAPE;
    case 5: dv->shape[3] = ED + 1; return DMA_ERR_SHAPE;
    case 6: dv->stride[3] = 2; return DMA_ERR_STRIDE;
    case 7: dv->data = NULL; return DMA_ERR_NULL;
    case 8: c->t[O_DW].shape[0] = EH * ED + 1; return DMA_ERR_SHAPE;
    case 9: c->t[O_DW].shape[1] = 1; return DMA_ERR_SHAPE;
    case 10: c->t[O_DW] = dma_tensor_1d(c->buf[O_DW], DMA_F32, EH * ED * EH); return DMA_ERR_SHAPE;
    case 11: c->t[O_DW].dtype = DMA_F16; return DMA_ERR_DTYPE;
    case 12: c->t[O_DW].stride[1] = 2; return DMA_ERR_STRIDE;
    case 13: c->t[O_DB].shape[0] = EH + 1; return DMA_ERR_SHAPE;
    case 14: c->t[O_DB] = dma_tensor_2d(c->buf[O_DB], DMA_F32, EH, 1); return DMA_ERR_SHAPE;
    case 15: c->t[O_DB].stride[0] = 0; return DMA_ERR_STRIDE;
    case 16: c->t[O_DA].shape[0] = 1; return DMA_ERR_SHAPE;
    case 17: c->t[O_DA].data = NULL; return DMA_ERR_NULL;
    case 18: dv->data = c->buf[I_V]; return DMA_ERR_OVERLAP;            /* dv over v */
    case 19: c->t[O_DW].data = c->buf[I_W] + 1; return DMA_ERR_OVERLAP; /* dw_dt over w_dt */
    default: ck_abort_msg("no mutation %d", i);
    }
    return DMA_OK;
}

static void check_error(bool backward, int i)
{
    err_call c;
    err_init(&c, backward);
    dma_status want = err_mutate(&c, i);
    err_fill_outputs(&c);
    dma_status st = err_run(&c);
    ck_assert_msg(st == want, "%s mutation %d: status %s, expected %s (%s)",
                  backward ? "backward" : "forward", i, dma_status_string(st),
                  dma_status_string(want), c.ctx ? dma_context_last_error(c.ctx) : "no context");
    for (int k = O_BIAS; k < N_BUFS; k++)
        ck_assert_msg(is_sentinel(c.buf[k], EBUF * sizeof(float)),
                      "%s mutation %d: output buffer %d was written",
                      backward ? "backward" : "forward", i, k);
    if (c.ctx)
        ck_assert_msg(dma_context_last_error(c.ctx)[0] != '\0', "mutation %d: no message", i);
    err_free(&c);
}

START_TEST(forward_errors) { check_error(false, _i); }
END_TEST

START_TEST(backward_errors) { check_error(true, _i); }
END_TEST

START_TEST(optional_b_dt)
{
    /* b_dt NULL is b_dt = 0, in the forward and the backward, bit for bit */
    err_call c;
    err_init(&c, false);
    memset(c.buf[I_BDT], 0, EH * sizeof(float));
    float *first[N_BUFS] = {0};
    for (int pass = 0; pass < 2; pass++) {
        c.p[I_BDT] = pass ? NULL : &c.t[I_BDT];
        err_fill_outputs(&c);
        for (int bw = 0; bw < 2; bw++) {
            c.backward = bw;
            ck_assert_int_eq(err_run(&c), DMA_OK);
        }
        for (int k = O_BIAS; k < N_BUFS; k++) {
            if (pass == 0) {
                first[k] = test_malloc(EBUF * sizeof(float));
                memcpy(first[k], c.buf[k], EBUF * sizeof(float));
            } else {
                ck_assert_msg(memcmp(first[k], c.buf[k], EBUF * sizeof(float)) == 0,
                              "output %d differs between b_dt = 0 and b_dt = NULL", k);
            }
        }
    }
    for (int k = O_BIAS; k < N_BUFS; k++)
        free(first[k]);
    err_free(&c);
}
END_TEST

static Suite *dynbias_args_suite(void)
{
    Suite *s = suite_create("dynbias_args");
    TCase *tx = tcase_create("errors");
    tcase_set_timeout(tx, 60);
    tcase_add_loop_test(tx, forward_errors, 0, N_SHARED_ERRORS);
    tcase_add_loop_test(tx, backward_errors, 0, N_SHARED_ERRORS + N_BWD_ERRORS);
    suite_add_tcase(s, tx);
    TCase *to = tcase_create("optional");
    tcase_add_test(to, optional_b_dt);
    suite_add_tcase(s, to);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(dynbias_args_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

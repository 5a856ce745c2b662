/*
 * test_half.c - bf16 and f16 storage in the training path (dma_forward, dma_backward): inputs
 * are converted exactly to float32 and computed as float32, so on rounded inputs the 16-bit
 * forward must give exactly the float32 forward's output rounded once (checked bit for bit with
 * an independent round-to-nearest-even), the same lse, and the backward the float32 backward's
 * gradients bit for bit; and both stay within the documented tolerance of the double reference.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "reference.h"
#include "reference_backward.h"

/* 16-bit copy of x, and x rounded in place to the stored values. */
static uint16_t *to_half(float *x, int64_t n, dma_dtype dt)
{
    uint16_t *h = test_malloc(sizeof(uint16_t) * (size_t)(n ? n : 1));
    for (int64_t i = 0; i < n; i++) {
        h[i] = dt == DMA_BF16 ? test_to_bf16(x[i]) : test_to_f16(x[i]);
        x[i] = test_from_half(h[i], dt);
    }
    return h;
}

static float *randf(test_rng *r, int64_t n, float lo, float hi)
{
    float *x = test_malloc(sizeof(float) * (size_t)(n ? n : 1));
    for (int64_t i = 0; i < n; i++)
        x[i] = rng_float(r, lo, hi);
    return x;
}

static void half_case(test_ctx *tc, dma_dtype dt, test_rng *r, int check_reference)
{
    const int64_t B = 2, Lq = rng_int(r, 1, 90), Lk = Lq + rng_int(r, 0, 40), Hkv = 2,
                  Hq = 4, D = rng_pick(r, (const int64_t[]){7, 24, 64}, 3), window = 20;
    const int64_t nq = B * Lq * Hq * D, nk = B * Lk * Hkv * D;
    float *q = randf(r, nq, -1, 1), *k = randf(r, nk, -1, 1), *v = randf(r, nk, -1, 1);
    float *bias = randf(r, B * Hkv * Lk, -1, 1), *dout = randf(r, nq, -1, 1);
    uint16_t *qh = to_half(q, nq, dt), *kh = to_half(k, nk, dt), *vh = to_half(v, nk, dt);
    uint16_t *douth = to_half(dout, nq, dt);
    dma_tensor tb = dma_tensor_4d(bias, DMA_F32, B, Hkv, 1, Lk);
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = window};
    dma_sparsity *sp;
    ck_assert_int_eq(dma_sparsity_build(tc->ctx, &mp, B, Hkv, Lq, Lk, &tb, NULL, &sp), DMA_OK);
    dma_attn_params ap = {.causal = 1};

    /* float32 on the rounded values */
    float *out32 = test_malloc(sizeof(float) * (size_t)nq), *lse32 = test_malloc(sizeof(float) * (size_t)(B * Hq * Lq));
    dma_tensor tq = dma_tensor_4d(q, DMA_F32, B, Lq, Hq, D), tk = dma_tensor_4d(k, DMA_F32, B, Lk, Hkv, D);
    dma_tensor tv = dma_tensor_4d(v, DMA_F32, B, Lk, Hkv, D), to = dma_tensor_4d(out32, DMA_F32, B, Lq, Hq, D);
    dma_tensor tl = dma_tensor_3d(lse32, DMA_F32, B, Hq, Lq);
    ck_assert_int_eq(dma_forward(tc->ctx, &tq, &tk, &tv, &tb, sp, &ap, &to, &tl), DMA_OK);

    /* 16-bit */
    uint16_t *outh = test_malloc(sizeof(uint16_t) * (size_t)nq);
    float *lseh = test_malloc(sizeof(float) * (size_t)(B * Hq * Lq));
    dma_tensor hq = dma_tensor_4d(qh, dt, B, Lq, Hq, D), hk = dma_tensor_4d(kh, dt, B, Lk, Hkv, D);
    dma_tensor hv = dma_tensor_4d(vh, dt, B, Lk, Hkv, D), ho = dma_tensor_4d(outh, dt, B, Lq, Hq, D);
    dma_tensor hl = dma_tensor_3d(lseh, DMA_F32, B, Hq, Lq);
    ck_assert_int_eq(dma_forward(tc->ctx, &hq, &hk, &hv, &tb, sp, &ap, &ho, &hl), DMA_OK);
    if (dt == DMA_BF16 && dma_context_bf16_dot(tc->ctx) && D % 2 == 0) {
        /* bf16 dot products: the same exact products summed in another order, so the output
         * is within float32 rounding of the float32 forward's before its own rounding */
        for (int64_t i = 0; i < nq; i++)
            REQUIRE(fabsf(test_from_half(outh[i], dt) - out32[i]) <=
                        fabsf(out32[i]) / 64 + 1e-6f,
                    "%s bf16 dots: out[%lld] = %g, float32 forward %g", dma_isa_name(tc->isa),
                    (long long)i, test_from_half(outh[i], dt), out32[i]);
        for (int64_t i = 0; i < B * Hq * Lq; i++)
            REQUIRE(fabsf(lseh[i] - lse32[i]) <= 1e-5f * (1 + fabsf(lse32[i])),
                    "%s bf16 dots: lse[%lld] = %g, float32 forward %g", dma_isa_name(tc->isa),
                    (long long)i, lseh[i], lse32[i]);
    } else {
        for (int64_t i = 0; i < nq; i++) {
            uint16_t want = dt == DMA_BF16 ? test_to_bf16(out32[i]) : test_to_f16(out32[i]);
            REQUIRE(outh[i] == want, "%s dtype %d: out[%lld] = 0x%04x, want 0x%04x (from %g)",
                    dma_isa_name(tc->isa), (int)dt, (long long)i, outh[i], want, out32[i]);
        }
        ck_assert(memcmp(lse32, lseh, sizeof(float) * (size_t)(B * Hq * Lq)) == 0);
    }

    /* Backward: 16-bit q, k, v, out, dout; float32 gradients equal the float32 backward's. */
    float *out_w = test_malloc(sizeof(float) * (size_t)nq);
    for (int64_t i = 0; i < nq; i++)
        out_w[i] = test_from_half(outh[i], dt);
    float *g32[4], *gh[4];
    const int64_t gn[4] = {nq, nk, nk, B * Hkv * Lk};
    for (int x = 0; x < 4; x++) {
        g32[x] = test_malloc(sizeof(float) * (size_t)gn[x]);
        gh[x] = test_malloc(sizeof(float) * (size_t)gn[x]);
    }
    dma_tensor tow = dma_tensor_4d(out_w, DMA_F32, B, Lq, Hq, D), tdo = dma_tensor_4d(dout, DMA_F32, B, Lq, Hq, D);
    dma_tensor hdo = dma_tensor_4d(douth, dt, B, Lq, Hq, D);
    dma_tensor d32[4] = {dma_tensor_4d(g32[0], DMA_F32, B, Lq, Hq, D), dma_tensor_4d(g32[1], DMA_F32, B, Lk, Hkv, D),
                         dma_tensor_4d(g32[2], DMA_F32, B, Lk, Hkv, D), dma_tensor_4d(g32[3], DMA_F32, B, Hkv, 1, Lk)};
    dma_tensor dh[4] = {dma_tensor_4d(gh[0], DMA_F32, B, Lq, Hq, D), dma_tensor_4d(gh[1], DMA_F32, B, Lk, Hkv, D),
                        dma_tensor_4d(gh[2], DMA_F32, B, Lk, Hkv, D), dma_tensor_4d(gh[3], DMA_F32, B, Hkv, 1, Lk)};
    ck_assert_int_eq(dma_backward(tc->ctx, &tq, &tk, &tv, &tb, sp, &ap, &tow, &hl, &tdo, &d32[0],
                                  &d32[1], &d32[2], &d32[3]), DMA_OK);
    ck_assert_int_eq(dma_backward(tc->ctx, &hq, &hk, &hv, &tb, sp, &ap, &ho, &hl, &hdo, &dh[0],
                                  &dh[1], &dh[2], &dh[3]), DMA_OK);
    for (int x = 0; x < 4; x++)
        ck_assert_msg(memcmp(g32[x], gh[x], sizeof(float) * (size_t)gn[x]) == 0,
                      "%s dtype %d: gradient %d differs from the float32 backward's",
                      dma_isa_name(tc->isa), (int)dt, x);
    /* A 16-bit gradient buffer is refused (gradients are float32). */
    dma_tensor bad = dh[0];
    bad.dtype = dt;
    ck_assert_int_eq(dma_backward(tc->ctx, &hq, &hk, &hv, &tb, sp, &ap, &ho, &hl, &hdo, &bad,
                                  &dh[1], &dh[2], NULL), DMA_ERR_DTYPE);
    /* Mixed storage is refused. */
    ck_assert_int_eq(dma_forward(tc->ctx, &hq, &tk, &hv, &tb, sp, &ap, &ho, &hl), DMA_ERR_DTYPE);

    if (check_reference) {
        /* The documented tolerance against the double reference on the rounded inputs:
         * |out - ref| <= 2^-8 |ref| (bf16) or 2^-11 |ref| (f16), plus float32 rounding. */
        uint8_t *sel = test_malloc((size_t)(B * Hkv * Lq * Lk));
        ck_assert_int_eq(dma_sparsity_to_dense(sp, sel, (size_t)(B * Hkv * Lq * Lk)), DMA_OK);
        double *ro = test_malloc(sizeof(double) * (size_t)nq), *rl = test_malloc(sizeof(double) * (size_t)(B * Hq * Lq));
        ref_fwd_args ra = {.B = B, .Lq = Lq, .Lk = Lk, .Hq = Hq, .Hkv = Hkv, .D = D, .q = q, .k = k,
                           .v = v, .bias = bias, .Bb = B, .Hb = Hkv, .Lb = 1, .sel = sel,
                           .Bs = B, .Hs = Hkv, .causal = 1};
        ref_forward(&ra, ro, rl);
        const double rel = dt == DMA_BF16 ? 1.0 / 256 : 1.0 / 2048;
        for (int64_t i = 0; i < nq; i++)
            REQUIRE(fabs(test_from_half(outh[i], dt) - ro[i]) <= rel * fabs(ro[i]) + 1e-5,
                    "out[%lld] = %g, reference %g", (long long)i, test_from_half(outh[i], dt), ro[i]);
        free(sel);
        free(ro);
        free(rl);
    }

    for (int x = 0; x < 4; x++) {
        free(g32[x]);
        free(gh[x]);
    }
    dma_sparsity_destroy(sp);
    free(q); free(k); free(v); free(bias); free(dout);
    free(qh); free(kh); free(vh); free(douth);
    free(out32); free(lse32); free(outh); free(lseh); free(out_w);
}

START_TEST(half_storage_is_float32_on_the_stored_values)
{
    test_ctx list[TEST_MAX_CTX];
    int n = test_contexts_create(list);
    test_rng r = rng_make(77);
    for (int i = 0; i < n; i++)
        for (int rep = 0; rep < 4; rep++) {
            half_case(&list[i], DMA_BF16, &r, rep == 0);
            half_case(&list[i], DMA_F16, &r, rep == 0);
        }
    test_contexts_destroy(list, n);
    /* The opt-in bf16 dot products (AVX512_BF16 CPUs only). */
    setenv("DMATTN_BF16_DOT", "1", 1);
    test_ctx dots = {.isa = DMA_ISA_AVX512, .threads = 2};
    dma_status st = dma_context_create(&(dma_context_options){.threads = 2,
                                                              .isa = DMA_ISA_AVX512}, &dots.ctx);
    unsetenv("DMATTN_BF16_DOT");
    if (st == DMA_OK && dma_context_bf16_dot(dots.ctx))
        for (int rep = 0; rep < 8; rep++)
            half_case(&dots, DMA_BF16, &r, rep < 2);
    if (st == DMA_OK)
        dma_context_destroy(dots.ctx);
}
END_TEST

Suite *half_suite(void)
{
    Suite *s = suite_create("half");
    TCase *tc = tcase_create("storage");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, half_storage_is_float32_on_the_stored_values);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(half_suite()); }

/*
 * test_backward_fd.c - dma_backward (dq, dk, dv, dbias) against central finite differences of
 * L = sum(out * G) on small shapes with dyadic inputs: of the library's own forward (every ISA
 * the host runs, threads 1), and of the reference forward, which also validates the reference
 * backward of reference_backward.c that test_backward.c checks the library against. Its harness
 * (cases, data, calls, checks) is in backward_cases.c.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "backward_cases.h"
#include "common.h"
#include "reference.h"

/* ------------------------------------------------------------------------------------------ */
/* Finite differences                                                                         */
/* ------------------------------------------------------------------------------------------ */

/*
 * L = sum(out * G) with G = dout, so dL/dx is exactly what dma_backward returns. All inputs are
 * multiples of 1/256 with |x| <= 2, so x +- 2^-6 and x +- 2^-7 are exact in float32 and the
 * perturbation is exactly the h we divide by.
 *
 * The library (float32 forward): central difference with h = 2^-7. Truncation error is
 * h^2/6 |L'''| ~ 3e-6 |L'''|; the float32 rounding noise of L (a double sum of float32 outputs
 * of relative error ~1e-7, of which only the rows the entry reaches change) is ~1e-7..1e-6,
 * divided by 2h it is ~1e-5..1e-4. FD_ATOL = 3e-4 and FD_RTOL = 3e-3 sit above both (the worst
 * error measured is 0.05 of the tolerance) and well below any real error: the gradients checked
 * are ~0.05-1 (the entries are chosen among those a selected key reaches), so a missing factor
 * (scale, softcap derivative, P) or a lost contribution (another query head, another row
 * through a broadcast bias) shows. An entry nothing reaches must have gradient 0 and leave L
 * bitwise unchanged.
 *
 * The reference (double forward): Richardson extrapolation of the h = 2^-6 and 2^-7 central
 * differences, error O(h^4) ~ 1e-8 (measured: < 1e-9); checks reference_backward.c itself
 * to 1e-7 + 1e-6 |g|.
 */
#define FD_H (1.0f / 128.0f)
#define FD_ATOL 3e-4
#define FD_RTOL 3e-3
#define REF_FD_ATOL 1e-7
#define REF_FD_RTOL 1e-6

static double worst_fd_ratio = 0.0, worst_ref_fd_ratio = 0.0;

static double loss_library(const bwd_case *c, bwd_data *f, dma_context *ctx,
                           const dma_sparsity *sp)
{
    call_forward(c, f, ctx, sp);
    double L = 0.0;
    for (int64_t x = 0; x < pt_count(&f->pout); x++)
        L += (double)*pt_at(&f->pout, x) * (double)f->dout[x];
    return L;
}

static double loss_reference(const bwd_case *c, const bwd_data *f)
{
    const int64_t nq = c->B * c->Lq * c->Hq * c->D;
    double *out = test_malloc((size_t)nq * sizeof(double));
    double *lse = test_malloc((size_t)(c->B * c->Hq * c->Lq) * sizeof(double));
    ref_fwd_args ra = ref_args(c, f);
    ref_forward(&ra, out, lse);
    double L = 0.0;
    for (int64_t x = 0; x < nq; x++)
        L += out[x] * (double)f->dout[x];
    free(out);
    free(lse);
    return L;
}

/* Sets entry x of a tensor in both the logical array and the library's view. */
static void set_entry(float *logical, ptensor *view, int64_t x, float value)
{
    logical[x] = value;
    *pt_at(view, x) = value;
}

/* Picks an entry of a tensor of n entries whose live flag (live[x / div]) equals want; -1 when
 * there is none. */
static int64_t pick_entry(test_rng *r, const uint8_t *live, int64_t div, int64_t n, int want)
{
    int64_t count = 0;
    for (int64_t x = 0; x < n; x++)
        count += (live[x / div] != 0) == want;
    if (count == 0)
        return -1;
    int64_t k = rng_int(r, 0, count - 1);
    for (int64_t x = 0; x < n; x++)
        if ((live[x / div] != 0) == want && k-- == 0)
            return x;
    return -1;
}

typedef struct fd_tensor {
    const char *name;
    float *logical;
    ptensor *view, *grad;
    const double *ref_grad;
    const uint8_t *live;
    int64_t live_div, n;
} fd_tensor;

static void check_fd_entry(const bwd_case *c, bwd_data *f, dma_context *ctx,
                           const dma_sparsity *sp, const fd_tensor *t, int64_t x, int live)
{
    const float x0 = t->logical[x];
    const float g = *pt_at(t->grad, x);

    /* the library: central difference of its own forward */
    set_entry(t->logical, t->view, x, x0 + FD_H);
    double lp = loss_library(c, f, ctx, sp);
    set_entry(t->logical, t->view, x, x0 - FD_H);
    double lm = loss_library(c, f, ctx, sp);
    set_entry(t->logical, t->view, x, x0);
    double fd = (lp - lm) / (2.0 * (double)FD_H);
    double tol = FD_ATOL + FD_RTOL * fabs((double)g);
    if (live && fabs(fd - (double)g) / tol > worst_fd_ratio)
        worst_fd_ratio = fabs(fd - (double)g) / tol;
    CHECK(isfinite(g) && fabs(fd - (double)g) <= tol,
                  "%s/%d: d%s[%lld] = %.9g, finite difference %.9g (tol %.3g) %s",
                  dma_isa_name(dma_context_isa(ctx)), dma_context_threads(ctx), t->name,
                  (long long)x, (double)g, fd, tol, describe(c));
    if (!live) {
        /* nothing reaches the entry: the selection is fixed, so out does not move at all */
        CHECK(g == 0.0f && lp == lm,
                      "%s/%d: d%s[%lld] = %.9g, L(+h) - L(-h) = %.3g; nothing selects it %s",
                      dma_isa_name(dma_context_isa(ctx)), dma_context_threads(ctx), t->name,
                      (long long)x, (double)g, lp - lm, describe(c));
        return;
    }

    /* the reference: Richardson extrapolation of two central differences, checks the
     * reference backward itself (only once per case, on the first context) */
    if (ctx != NULL && dma_context_isa(ctx) == DMA_ISA_SCALAR) {
        double d[2];
        for (int s = 0; s < 2; s++) {
            float h = s == 0 ? 2.0f * FD_H : FD_H;
            set_entry(t->logical, t->view, x, x0 + h);
            double rp = loss_reference(c, f);
            set_entry(t->logical, t->view, x, x0 - h);
            double rm = loss_reference(c, f);
            set_entry(t->logical, t->view, x, x0);
            d[s] = (rp - rm) / (2.0 * (double)h);
        }
        double rich = (4.0 * d[1] - d[0]) / 3.0;
        double rg = t->ref_grad[x];
        double rtol = REF_FD_ATOL + REF_FD_RTOL * fabs(rg);
        if (fabs(rich - rg) / rtol > worst_ref_fd_ratio)
            worst_ref_fd_ratio = fabs(rich - rg) / rtol;
        CHECK(fabs(rich - rg) <= rtol,
                      "reference d%s[%lld] = %.12g, finite difference %.12g (tol %.3g) %s",
                      t->name, (long long)x, rg, rich, rtol, describe(c));
    }
}

static void run_fd_case(const bwd_case *c, dma_context *ctx, uint64_t pick_seed)
{
    bwd_data f;
    data_make(c, &f);
    /* the selection is built once from the unperturbed builder bias and kept: it is a fixed
     * choice of keys, gradients flow through the bias values only */
    dma_sparsity *sp = make_sparsity(c, &f, ctx);
    call_forward(c, &f, ctx, sp);
    check_forward(c, &f, ctx);
    call_backward(c, &f, ctx, sp);
    check_against_reference(c, &f, ctx);

    const int64_t nq = c->B * c->Lq * c->Hq * c->D, nkv = c->B * c->Lk * c->Hkv * c->D;
    fd_tensor ts[4] = {
        {"q", f.q, &f.pq, &f.pdq, f.dq_ref, f.live_q, c->D, nq},
        {"k", f.k, &f.pk, &f.pdk, f.dk_ref, f.live_kv, c->D, nkv},
        {"v", f.v, &f.pv, &f.pdv, f.dv_ref, f.live_kv, c->D, nkv},
        {"bias", f.bias, &f.pbias, &f.pdbias, f.dbias_ref, f.live_bias, 1,
         c->Bb * c->Hb * c->Lb * c->Lk},
    };
    test_rng r = rng_make(pick_seed);
    int checked = 0;
    for (int ti = 0; ti < (c->Bb ? 4 : 3); ti++) {
        for (int e = 0; e < 4; e++) {
            int64_t x = pick_entry(&r, ts[ti].live, ts[ti].live_div, ts[ti].n, 1);
            if (x >= 0) {
                check_fd_entry(c, &f, ctx, sp, &ts[ti], x, 1);
                checked++;
            }
        }
        /* one entry nothing reaches, where there is one */
        int64_t x = pick_entry(&r, ts[ti].live, ts[ti].live_div, ts[ti].n, 0);
        if (x >= 0)
            check_fd_entry(c, &f, ctx, sp, &ts[ti], x, 0);
    }
    CHECK(checked >= 12, "only %d live entries to check %s", checked, describe(c));
    dma_sparsity_destroy(sp);
    data_free(&f);
}

static int fd_cases(bwd_case *cases)
{
    int n = 0;
    test_rng r = rng_make(120);
    bwd_case c;

    /* DMA: causal top-3 over a per-key bias (B, Hkv, 1, Lk) that is also the attention bias */
    c = plain_case(2, 6, 9, 4, 2, 8, rng_u64(&r));
    c.causal = 1;
    set_topk(&r, &c, 0, 3);
    c.mask_causal = 1;
    c.Bs = c.mBb = 2;
    c.Hs = c.mHb = 2;
    c.Bp = 0;
    bias_from_mbias(&c);
    cases[n++] = c;

    /* per-row bias (1, Hq, Lq, Lk) top-4 with softcap on and a scale that makes it matter */
    c = plain_case(1, 7, 7, 2, 1, 5, rng_u64(&r));
    set_topk(&r, &c, 1, 4);
    c.mask_causal = 0;
    c.Bs = c.mBb = 1;
    c.Hs = c.mHb = 2;
    c.Bp = 0;
    bias_from_mbias(&c);
    c.softcap = 0.75f;
    c.scale = 0.6f;
    cases[n++] = c;

    /* dense, Lq != Lk, bias (1, 1, Lq, Lk) broadcast over batch and heads (MQA) */
    c = plain_case(2, 5, 8, 4, 1, 3, rng_u64(&r));
    c.Bb = 1;
    c.Hb = 1;
    c.Lb = 5;
    cases[n++] = c;

    /* causal, Lq > Lk (empty rows), bias (1, Hkv, 1, Lk), softcap */
    c = plain_case(1, 9, 5, 2, 2, 4, rng_u64(&r));
    c.causal = 1;
    c.Bb = 1;
    c.Hb = 2;
    c.Lb = 1;
    c.softcap = 1.5f;
    cases[n++] = c;

    /* non-causal top-7 with key padding, per-key selection bias and a separate per-row
     * attention bias broadcast over heads */
    c = plain_case(2, 6, 10, 4, 4, 6, rng_u64(&r));
    set_topk(&r, &c, 0, 7);
    c.mask_causal = 0;
    c.Bs = c.mBb = 2;
    c.Hs = c.mHb = 4;
    c.Bp = 2;
    c.Bb = 2;
    c.Hb = 1;
    c.Lb = 6;
    cases[n++] = c;

    for (int i = 0; i < n; i++)
        cases[i].dyadic = 1;
    return n;
}

START_TEST(finite_differences)
{
    bwd_case cases[8];
    int n = fd_cases(cases);
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < nctx; k++)
            if (ctxs[k].threads == 1) /* every ISA; threads do not change results */
                run_fd_case(&cases[i], ctxs[k].ctx, 1000 + (uint64_t)i);
    test_contexts_destroy(ctxs, nctx);
    if (getenv("DMATTN_TEST_VERBOSE"))
        fprintf(stderr, "worst FD error / tolerance: library %.3g, reference %.3g\n",
                worst_fd_ratio, worst_ref_fd_ratio);
}
END_TEST

/* ------------------------------------------------------------------------------------------ */

static Suite *backward_fd_suite(void)
{
    Suite *s = suite_create("backward_fd");
    TCase *tf = tcase_create("finite_differences");
    tcase_set_timeout(tf, 600);
    tcase_add_test(tf, finite_differences);
    suite_add_tcase(s, tf);
    return s;
}

int main(void) { return test_run_suite(backward_fd_suite()); }

/*
 * forward_cases.c - test_forward's harness (forward_cases.h): building a case's data, running it
 * on every context against the double precision reference, and generating cases.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forward_cases.h"
#include "reference.h"

static const char *describe(const fwd_case *c)
{
    static char buf[768];
    static const char *sel_names[] = {"none", "build", "mask"};
    static const char *kind_names[] = {"topk", "relu", "window", "dense"};
    snprintf(buf, sizeof buf,
             "{B=%lld Lq=%lld Lk=%lld Hq=%lld Hkv=%lld D=%lld causal=%d scale=%g softcap=%g "
             "bias=(%lld,%lld,%lld) neginf=%d sel=%s Bs=%lld Hs=%lld kind=%s mask_causal=%d "
             "window=%lld block=%lld mbias=(%lld,%lld,%lld) Bp=%lld density=%.2f strided=%d "
             "params_null=%d lse_null=%d decaying=%d seed=%llu}",
             (long long)c->B, (long long)c->Lq, (long long)c->Lk, (long long)c->Hq,
             (long long)c->Hkv, (long long)c->D, c->causal, (double)c->scale,
             (double)c->softcap, (long long)c->Bb, (long long)c->Hb, (long long)c->Lb,
             c->bias_neginf, sel_names[c->sel], (long long)c->Bs, (long long)c->Hs,
             kind_names[c->kind], c->mask_causal, (long long)c->window,
             (long long)c->block_size, (long long)c->mBb, (long long)c->mHb, (long long)c->mLb,
             (long long)c->Bp, c->density, c->strided, c->params_null, c->lse_null,
             c->decaying, (unsigned long long)c->seed);
    return buf;
}

/* ------------------------------------------------------------------------------------------ */
/* Buffers: the logical (contiguous) arrays for the reference, the laid-out ones for dmattn   */
/* ------------------------------------------------------------------------------------------ */

static void fill_uniform(test_rng *r, float *p, int64_t n, float lo, float hi)
{
    for (int64_t x = 0; x < n; x++)
        p[x] = rng_float(r, lo, hi);
}

void fwd_data_make(const fwd_case *c, fwd_data *f)
{
    const int64_t B = c->B, Lq = c->Lq, Lk = c->Lk, Hq = c->Hq, Hkv = c->Hkv, D = c->D;
    test_rng r = rng_make(c->seed);
    memset(f, 0, sizeof *f);

    f->q = test_malloc((size_t)(B * Lq * Hq * D) * sizeof(float));
    f->k = test_malloc((size_t)(B * Lk * Hkv * D) * sizeof(float));
    f->v = test_malloc((size_t)(B * Lk * Hkv * D) * sizeof(float));
    fill_uniform(&r, f->q, B * Lq * Hq * D, -1.0f, 1.0f);
    fill_uniform(&r, f->k, B * Lk * Hkv * D, -1.0f, 1.0f);
    fill_uniform(&r, f->v, B * Lk * Hkv * D, -1.0f, 1.0f);

    if (c->Bb) {
        int64_t n = c->Bb * c->Hb * c->Lb * Lk;
        f->bias = test_malloc((size_t)n * sizeof(float));
        fill_uniform(&r, f->bias, n, -2.0f, 2.0f);
        if (c->bias_neginf)
            for (int64_t x = 0; x < n; x++)
                if (x % Lk != 0 && rng_bernoulli(&r, 0.3))
                    f->bias[x] = -INFINITY;
    }

    const int64_t nsel = c->Bs * c->Hs * Lq * Lk;
    if (c->sel == SEL_BUILD) {
        int64_t nb = c->mBb * c->mHb * c->mLb * Lk;
        f->mbias = test_malloc((size_t)nb * sizeof(float));
        for (int64_t x = 0; x < nb; x++) /* a mix of ties and distinct values */
            f->mbias[x] = c->decaying ? -0.01f * (float)(x % Lk) +
                                            (rng_bernoulli(&r, 0.03) ? 20.0f : 0.0f)
                          : (c->seed & 1) ? (float)rng_int(&r, -1, 3)
                                          : rng_float(&r, -1.0f, 1.0f);
        f->pad = test_malloc((size_t)(c->Bp * Lk));
        for (int64_t x = 0; x < c->Bp * Lk; x++)
            f->pad[x] = !rng_bernoulli(&r, 0.2);
        f->sel = test_malloc((size_t)nsel);
        ref_mask_args ra = {
            .kind = c->kind, .causal = c->mask_causal, .window = c->window,
            .block_size = c->block_size, .B = c->Bs, .H = c->Hs, .Lq = Lq, .Lk = Lk,
            .bias = f->mbias, .Bb = c->mBb, .Hb = c->mHb, .Lb = c->mLb,
            .padding = c->Bp ? f->pad : NULL, .Bp = c->Bp,
        };
        ref_mask(&ra, f->sel);
        f->tmbias = dma_tensor_4d(f->mbias, DMA_F32, c->mBb, c->mHb, c->mLb, Lk);
        f->tpad = dma_tensor_2d(f->pad, DMA_BOOL, c->Bp, Lk);
    } else if (c->sel == SEL_MASK) {
        test_random_mask(&r, c->density, nsel, &f->mask, &f->sel);
        f->tmask = dma_tensor_4d(f->mask, DMA_BOOL, c->Bs, c->Hs, Lq, Lk);
    }

    f->out_ref = test_malloc((size_t)(B * Lq * Hq * D) * sizeof(double));
    f->lse_ref = test_malloc((size_t)(B * Hq * Lq) * sizeof(double));
    ref_fwd_args ra = {
        .B = B, .Lq = Lq, .Lk = Lk, .Hq = Hq, .Hkv = Hkv, .D = D,
        .q = f->q, .k = f->k, .v = f->v,
        .bias = f->bias, .Bb = c->Bb, .Hb = c->Hb, .Lb = c->Lb,
        .sel = f->sel, .Bs = c->Bs, .Hs = c->Hs,
        .causal = c->causal, .scale = c->scale, .softcap = c->softcap,
    };
    ref_forward(&ra, f->out_ref, f->lse_ref);

    if (!c->strided) {
        f->tq = dma_tensor_4d(f->q, DMA_F32, B, Lq, Hq, D);
        f->tk = dma_tensor_4d(f->k, DMA_F32, B, Lk, Hkv, D);
        f->tv = dma_tensor_4d(f->v, DMA_F32, B, Lk, Hkv, D);
        if (c->Bb)
            f->tbias = dma_tensor_4d(f->bias, DMA_F32, c->Bb, c->Hb, c->Lb, Lk);
        f->out_bytes = (size_t)(B * Lq * Hq * D) * sizeof(float);
        f->lse_bytes = (size_t)(B * Hq * Lq) * sizeof(float);
        f->outbuf = test_malloc(f->out_bytes);
        f->lsebuf = test_malloc(f->lse_bytes);
        f->tout = dma_tensor_4d(f->outbuf, DMA_F32, B, Lq, Hq, D);
        f->tlse = dma_tensor_3d(f->lsebuf, DMA_F32, B, Hq, Lq);
        return;
    }

    /* q: every head vector padded to D + Q_PAD floats */
    f->qbuf = test_malloc((size_t)(B * Lq * Hq * (D + Q_PAD)) * sizeof(float));
    fill_sentinel(f->qbuf, (size_t)(B * Lq * Hq * (D + Q_PAD)) * sizeof(float));
    f->tq = dma_tensor_4d(f->qbuf, DMA_F32, B, Lq, Hq, D + Q_PAD);
    f->tq.shape[3] = D;
    /* k and v interleaved per token: (B, Lk, 2, Hkv, D) */
    f->kvbuf = test_malloc((size_t)(B * Lk * 2 * Hkv * D) * sizeof(float));
    f->tk = dma_tensor_4d(f->kvbuf, DMA_F32, B, Lk, 2 * Hkv, D);
    f->tk.shape[1] = Lk;
    f->tk.shape[2] = Hkv;
    f->tv = f->tk;
    f->tv.data = f->kvbuf + Hkv * D;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < Lq; t++)
            for (int64_t h = 0; h < Hq; h++)
                memcpy(f->qbuf + b * f->tq.stride[0] + t * f->tq.stride[1] + h * f->tq.stride[2],
                       f->q + ((b * Lq + t) * Hq + h) * D, (size_t)D * sizeof(float));
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < Lk; t++)
            for (int64_t h = 0; h < Hkv; h++) {
                int64_t off = b * f->tk.stride[0] + t * f->tk.stride[1] + h * f->tk.stride[2];
                memcpy(f->kvbuf + off, f->k + ((b * Lk + t) * Hkv + h) * D,
                       (size_t)D * sizeof(float));
                memcpy(f->kvbuf + Hkv * D + off, f->v + ((b * Lk + t) * Hkv + h) * D,
                       (size_t)D * sizeof(float));
            }
    /* bias: full-size dims with stride 0 where the logical bias broadcasts */
    if (c->Bb) {
        f->tbias = dma_tensor_4d(f->bias, DMA_F32, c->Bb, c->Hb, c->Lb, Lk);
        f->tbias.shape[0] = B;
        f->tbias.shape[1] = c->Hb == 1 ? Hq : c->Hb;
        f->tbias.shape[2] = Lq;
        if (c->Bb == 1) f->tbias.stride[0] = 0;
        if (c->Hb == 1) f->tbias.stride[1] = 0;
        if (c->Lb == 1) f->tbias.stride[2] = 0;
    }
    /* out and lse written into bigger buffers whose gaps must stay untouched */
    f->out_bytes = (size_t)(B * Lq * Hq * (D + OUT_PAD)) * sizeof(float);
    f->outbuf = test_malloc(f->out_bytes);
    f->tout = dma_tensor_4d(f->outbuf, DMA_F32, B, Lq, Hq, D + OUT_PAD);
    f->tout.shape[3] = D;
    f->lse_bytes = (size_t)(B * Hq * (Lq + LSE_PAD)) * sizeof(float);
    f->lsebuf = test_malloc(f->lse_bytes);
    f->tlse = dma_tensor_3d(f->lsebuf, DMA_F32, B, Hq, Lq + LSE_PAD);
    f->tlse.shape[2] = Lq;
}

void fwd_data_free(fwd_data *f)
{
    free(f->q); free(f->k); free(f->v); free(f->bias);
    free(f->sel); free(f->mbias); free(f->pad); free(f->mask);
    free(f->out_ref); free(f->lse_ref);
    free(f->qbuf); free(f->kvbuf); free(f->outbuf); free(f->lsebuf);
}

/* ------------------------------------------------------------------------------------------ */
/* Running one case                                                                           */
/* ------------------------------------------------------------------------------------------ */

dma_sparsity *make_sparsity(const fwd_case *c, fwd_data *f, const test_ctx *tc)
{
    dma_sparsity *sp = NULL;
    dma_status st = DMA_OK;
    if (c->sel == SEL_BUILD) {
        dma_mask_params mp;
        memset(&mp, 0, sizeof mp);
        mp.kind = c->kind;
        mp.causal = c->mask_causal;
        mp.window = c->window;
        mp.block_size = c->block_size;
        st = dma_sparsity_build(tc->ctx, &mp, c->Bs, c->Hs, c->Lq, c->Lk, &f->tmbias,
                                c->Bp ? &f->tpad : NULL, &sp);
    } else if (c->sel == SEL_MASK) {
        st = dma_sparsity_from_mask(tc->ctx, &f->tmask, &sp);
    }
    ck_assert_msg(st == DMA_OK, "%s/%d: sparsity: %s (%s) %s", dma_isa_name(tc->isa),
                  tc->threads, dma_status_string(st), dma_context_last_error(tc->ctx),
                  describe(c));
    return sp;
}

/* Compares dmattn's out and lse with the reference. */
void check_against_reference(const fwd_case *c, const fwd_data *f, const test_ctx *tc)
{
    const float *out = f->outbuf, *lse = f->lsebuf;
    const int64_t *so = f->tout.stride, *sl = f->tlse.stride;
    for (int64_t b = 0; b < c->B; b++) {
        for (int64_t h = 0; h < c->Hq; h++) {
            for (int64_t i = 0; i < c->Lq; i++) {
                double lr = f->lse_ref[(b * c->Hq + h) * c->Lq + i];
                int empty = isinf(lr) && lr < 0;
                if (!c->lse_null) {
                    float lg = lse[b * sl[0] + h * sl[1] + i * sl[2]];
                    if (empty)
                        REQUIRE(isinf(lg) && lg < 0,
                                      "%s/%d: empty row b=%lld h=%lld i=%lld: lse %g, expected "
                                      "-inf %s",
                                      dma_isa_name(tc->isa), tc->threads, (long long)b,
                                      (long long)h, (long long)i, (double)lg, describe(c));
                    else
                        REQUIRE(isfinite(lg) && fabs((double)lg - lr) <= TOL,
                                      "%s/%d: lse b=%lld h=%lld i=%lld: %.9g, expected %.9g %s",
                                      dma_isa_name(tc->isa), tc->threads, (long long)b,
                                      (long long)h, (long long)i, (double)lg, lr, describe(c));
                }
                for (int64_t d = 0; d < c->D; d++) {
                    float og = out[b * so[0] + i * so[1] + h * so[2] + d];
                    double orf = f->out_ref[((b * c->Lq + i) * c->Hq + h) * c->D + d];
                    int ok = empty ? og == 0.0f : isfinite(og) && fabs((double)og - orf) <= TOL;
                    REQUIRE(ok,
                                  "%s/%d: out b=%lld i=%lld h=%lld d=%lld: %.9g, expected %.9g%s "
                                  "%s",
                                  dma_isa_name(tc->isa), tc->threads, (long long)b, (long long)i,
                                  (long long)h, (long long)d, (double)og, orf,
                                  empty ? " (empty row)" : "", describe(c));
                }
            }
        }
    }
}

/* In strided mode, every float of the out/lse buffers outside the view must still hold the
 * sentinel: restore the view's slots from a fresh sentinel image and compare the whole buffer. */
static void check_gaps_untouched(const fwd_case *c, const fwd_data *f, const test_ctx *tc)
{
    if (!c->strided)
        return;
    unsigned char *pat = test_malloc(f->out_bytes);
    float *copy = test_malloc(f->out_bytes);
    fill_sentinel(pat, f->out_bytes);
    memcpy(copy, f->outbuf, f->out_bytes);
    const int64_t *so = f->tout.stride;
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t i = 0; i < c->Lq; i++)
            for (int64_t h = 0; h < c->Hq; h++) {
                size_t off = (size_t)(b * so[0] + i * so[1] + h * so[2]) * sizeof(float);
                memcpy((unsigned char *)copy + off, pat + off, (size_t)c->D * sizeof(float));
            }
    ck_assert_msg(is_sentinel(copy, f->out_bytes), "%s/%d: out written outside its view %s",
                  dma_isa_name(tc->isa), tc->threads, describe(c));
    free(pat);
    free(copy);

    if (c->lse_null) {
        ck_assert_msg(is_sentinel(f->lsebuf, f->lse_bytes), "lse written though NULL %s",
                      describe(c));
        return;
    }
    float *lcopy = test_malloc(f->lse_bytes);
    unsigned char *lpat = test_malloc(f->lse_bytes);
    fill_sentinel(lpat, f->lse_bytes);
    memcpy(lcopy, f->lsebuf, f->lse_bytes);
    const int64_t *sl = f->tlse.stride;
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t h = 0; h < c->Hq; h++)
            for (int64_t i = 0; i < c->Lq; i++) {
                size_t off = (size_t)(b * sl[0] + h * sl[1] + i * sl[2]) * sizeof(float);
                memcpy((unsigned char *)lcopy + off, lpat + off, sizeof(float));
            }
    ck_assert_msg(is_sentinel(lcopy, f->lse_bytes), "%s/%d: lse written outside its view %s",
                  dma_isa_name(tc->isa), tc->threads, describe(c));
    free(lcopy);
    free(lpat);
}

static void run_case(const fwd_case *c, const test_ctx *ctxs, int nctx)
{
    fwd_data f;
    fwd_data_make(c, &f);
    unsigned char *prev_out = test_malloc(f.out_bytes);
    unsigned char *prev_lse = test_malloc(f.lse_bytes);
    dma_attn_params ap;
    memset(&ap, 0, sizeof ap);
    ap.scale = c->scale;
    ap.softcap = c->softcap;
    ap.causal = c->causal;

    for (int n = 0; n < nctx; n++) {
        const test_ctx *tc = &ctxs[n];
        dma_sparsity *sp = make_sparsity(c, &f, tc);
        fill_sentinel(f.outbuf, f.out_bytes);
        fill_sentinel(f.lsebuf, f.lse_bytes);
        dma_status st = dma_forward(tc->ctx, &f.tq, &f.tk, &f.tv, c->Bb ? &f.tbias : NULL, sp,
                                    c->params_null ? NULL : &ap, &f.tout,
                                    c->lse_null ? NULL : &f.tlse);
        ck_assert_msg(st == DMA_OK, "%s/%d: dma_forward: %s (%s) %s", dma_isa_name(tc->isa),
                      tc->threads, dma_status_string(st), dma_context_last_error(tc->ctx),
                      describe(c));
        dma_sparsity_destroy(sp);

        check_against_reference(c, &f, tc);
        check_gaps_untouched(c, &f, tc);
        if (c->lse_null && !c->strided)
            ck_assert_msg(is_sentinel(f.lsebuf, f.lse_bytes), "lse written though NULL %s",
                          describe(c));

        /* threads 2 must reproduce threads 1 of the same ISA bit for bit */
        if (n > 0 && ctxs[n - 1].isa == tc->isa) {
            ck_assert_msg(memcmp(prev_out, f.outbuf, f.out_bytes) == 0,
                          "%s: out differs between threads %d and %d %s", dma_isa_name(tc->isa),
                          ctxs[n - 1].threads, tc->threads, describe(c));
            ck_assert_msg(memcmp(prev_lse, f.lsebuf, f.lse_bytes) == 0,
                          "%s: lse differs between threads %d and %d %s", dma_isa_name(tc->isa),
                          ctxs[n - 1].threads, tc->threads, describe(c));
        }
        memcpy(prev_out, f.outbuf, f.out_bytes);
        memcpy(prev_lse, f.lsebuf, f.lse_bytes);
    }
    free(prev_out);
    free(prev_lse);
    fwd_data_free(&f);
}

void run_cases(const fwd_case *cases, int n)
{
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    for (int i = 0; i < n; i++)
        run_case(&cases[i], ctxs, nctx);
    test_contexts_destroy(ctxs, nctx);
}

/* ------------------------------------------------------------------------------------------ */
/* Case generation                                                                            */
/* ------------------------------------------------------------------------------------------ */

/* A plain dense, non-causal case without bias; tests then change what they are about. */
fwd_case plain_case(int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,
                    int64_t D, uint64_t seed)
{
    fwd_case c;
    memset(&c, 0, sizeof c);
    c.B = B;
    c.Lq = Lq;
    c.Lk = Lk;
    c.Hq = Hq;
    c.Hkv = Hkv;
    c.D = D;
    c.sel = SEL_NONE;
    c.Bs = 1;
    c.Hs = 1;
    c.mBb = c.mHb = c.mLb = 1;
    c.seed = seed;
    return c;
}

/* A sparsity object's head count: 1, Hkv or Hq. */
static int64_t pick_heads(test_rng *r, const fwd_case *c)
{
    const int64_t choices[] = {1, c->Hkv, c->Hq};
    return rng_pick(r, choices, 3);
}

/* Turns c into a SEL_BUILD case of the given kind with random object and builder-bias shapes. */
void make_build(test_rng *r, fwd_case *c, dma_mask_kind kind)
{
    static const int64_t windows[] = {1, 7, 64, -1, -2}; /* -1: Lk, -2: Lk + 3 */
    static const int64_t blocks[] = {0, 0, 0, 2, 4, 16};
    c->sel = SEL_BUILD;
    c->kind = kind;
    c->mask_causal = rng_bernoulli(r, 0.7) ? c->causal : (int)rng_int(r, 0, 1);
    c->window = rng_pick(r, windows, 5);
    if (c->window == -1)
        c->window = c->Lk;
    else if (c->window == -2)
        c->window = c->Lk + 3;
    c->block_size = rng_pick(r, blocks, 6);
    c->Bs = rng_int(r, 0, 1) ? c->B : 1;
    c->Hs = pick_heads(r, c);
    c->mBb = rng_int(r, 0, 1) ? c->Bs : 1;
    c->mHb = rng_int(r, 0, 1) ? c->Hs : 1;
    c->mLb = rng_bernoulli(r, 0.3) ? c->Lq : 1;
    const int64_t paddings[] = {0, 0, 1, c->Bs};
    c->Bp = rng_pick(r, paddings, 4);
}

void make_mask(test_rng *r, fwd_case *c)
{
    static const double densities[] = {0.0, 0.05, 0.3, 0.9};
    c->sel = SEL_MASK;
    c->Bs = rng_int(r, 0, 1) ? c->B : 1;
    c->Hs = pick_heads(r, c);
    c->density = densities[rng_int(r, 0, 3)];
}

void make_bias(test_rng *r, fwd_case *c)
{
    c->Bb = rng_int(r, 0, 1) ? c->B : 1;
    const int64_t heads[] = {1, c->Hkv, c->Hq};
    c->Hb = rng_pick(r, heads, 3);
    c->Lb = rng_bernoulli(r, 0.4) ? c->Lq : 1;
}

/* A random case whose size B*Hq*Lq*Lk*D stays below max_work. */
fwd_case random_case(test_rng *r, int64_t max_len, double max_work)
{
    int hp = (int)rng_int(r, 0, 3);
    fwd_case c = plain_case(rng_int(r, 1, 2), rng_int(r, 1, max_len), rng_int(r, 1, max_len),
                            TEST_HEADS[hp][0], TEST_HEADS[hp][1], rng_pick(r, TEST_DIMS, 7),
                            rng_u64(r));
    test_fit_work((double)c.B * c.Hq * c.D, &c.Lq, &c.Lk, max_work);
    c.causal = (int)rng_int(r, 0, 1);
    if (rng_bernoulli(r, 0.3))
        c.scale = (float)(rng_bernoulli(r, 0.5) ? 0.7 : 1.3) / sqrtf((float)c.D);
    if (rng_bernoulli(r, 0.3))
        c.softcap = rng_bernoulli(r, 0.5) ? 1.5f : 5.0f;
    if (rng_bernoulli(r, 0.7))
        make_bias(r, &c);
    double u = rng_unit(r);
    if (u < 0.25) {
        /* SEL_NONE: the dense / causal baseline */
    } else if (u < 0.8) {
        static const dma_mask_kind kinds[] = {DMA_MASK_TOPK, DMA_MASK_TOPK, DMA_MASK_TOPK,
                                              DMA_MASK_RELU, DMA_MASK_WINDOW, DMA_MASK_DENSE};
        make_build(r, &c, kinds[rng_int(r, 0, 5)]);
    } else {
        make_mask(r, &c);
    }
    c.strided = rng_bernoulli(r, 0.2);
    return c;
}

void run_random(uint64_t seed, int n, int64_t max_len, double max_work)
{
    test_rng r = rng_make(seed);
    fwd_case *cases = test_calloc((size_t)n, sizeof *cases);
    for (int i = 0; i < n; i++)
        cases[i] = random_case(&r, max_len, max_work);
    run_cases(cases, n);
    free(cases);
}


/*
 * test_forward.c - dma_forward against the double precision reference of reference.c.
 *
 * Every case runs on every context of test_contexts_create() (each ISA the host supports,
 * threads 1 and 2). Outputs must be within 1e-5 of the reference (out and lse), empty rows must
 * give out == 0 and lse == -inf, and threads 1 and 2 of one ISA must agree bitwise.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "reference.h"

#define TOL 1e-5

typedef enum sel_mode {
    SEL_NONE,  /* sp = NULL: every visible key */
    SEL_BUILD, /* dma_sparsity_build; the reference uses ref_mask */
    SEL_MASK   /* a random boolean mask through dma_sparsity_from_mask */
} sel_mode;

typedef struct fwd_case {
    int64_t B, Lq, Lk, Hq, Hkv, D;
    int causal;           /* dma_attn_params.causal */
    float scale, softcap; /* dma_attn_params */
    int64_t Bb, Hb, Lb;   /* forward bias (Bb, Hb, Lb, Lk); Bb == 0: no bias */
    int bias_neginf;      /* put -inf in the forward bias at some keys j > 0 */
    sel_mode sel;
    int64_t Bs, Hs;       /* the sparsity object's B and H */
    /* SEL_BUILD: */
    dma_mask_kind kind;
    int mask_causal;
    int64_t window, block_size;
    int64_t mBb, mHb, mLb; /* the builder's bias shape */
    int64_t Bp;            /* key padding (Bp, Lk); 0: none */
    /* SEL_MASK: */
    double density;
    int strided;      /* non-contiguous q, k, v, out, lse; stride-0 broadcast bias */
    int params_null;  /* pass params = NULL (scale, softcap and causal must then be 0) */
    int lse_null;     /* pass lse = NULL */
    int decaying;     /* SEL_BUILD: the builder's bias falls with the key, with a few late
                         risers, so that consecutive tiles select nearly the same keys */
    uint64_t seed;
} fwd_case;

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

enum { Q_PAD = 5, OUT_PAD = 3, LSE_PAD = 2 };

typedef struct fwd_data {
    /* logical, contiguous */
    float *q, *k, *v, *bias;
    uint8_t *sel;            /* (Bs, Hs, Lq, Lk) for the reference; NULL for SEL_NONE */
    float *mbias;            /* builder bias */
    uint8_t *pad;            /* builder key padding */
    uint8_t *mask;           /* SEL_MASK input */
    double *out_ref, *lse_ref;
    /* as given to dmattn */
    float *qbuf, *kvbuf, *outbuf, *lsebuf;
    size_t out_bytes, lse_bytes;
    dma_tensor tq, tk, tv, tbias, tout, tlse, tmbias, tpad, tmask;
} fwd_data;

static void fill_uniform(test_rng *r, float *p, int64_t n, float lo, float hi)
{
    for (int64_t x = 0; x < n; x++)
        p[x] = rng_float(r, lo, hi);
}

static void fwd_data_make(const fwd_case *c, fwd_data *f)
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
        f->mask = test_malloc((size_t)nsel);
        f->sel = test_malloc((size_t)nsel);
        for (int64_t x = 0; x < nsel; x++) {
            f->mask[x] = rng_bernoulli(&r, c->density) ? (uint8_t)rng_int(&r, 1, 3) : 0;
            f->sel[x] = f->mask[x] != 0;
        }
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

static void fwd_data_free(fwd_data *f)
{
    free(f->q); free(f->k); free(f->v); free(f->bias);
    free(f->sel); free(f->mbias); free(f->pad); free(f->mask);
    free(f->out_ref); free(f->lse_ref);
    free(f->qbuf); free(f->kvbuf); free(f->outbuf); free(f->lsebuf);
}

/* ------------------------------------------------------------------------------------------ */
/* Running one case                                                                           */
/* ------------------------------------------------------------------------------------------ */

static dma_sparsity *make_sparsity(const fwd_case *c, fwd_data *f, const test_ctx *tc)
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
static void check_against_reference(const fwd_case *c, const fwd_data *f, const test_ctx *tc)
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

static void run_cases(const fwd_case *cases, int n)
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

static const int64_t HEADS[][2] = {{1, 1}, {4, 4}, {8, 2}, {4, 1}}; /* Hq, Hkv */
static const int64_t DIMS[] = {1, 16, 40, 64, 100, 128, 256};

/* A plain dense, non-causal case without bias; tests then change what they are about. */
static fwd_case plain_case(int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,
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
static void make_build(test_rng *r, fwd_case *c, dma_mask_kind kind)
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

static void make_mask(test_rng *r, fwd_case *c)
{
    static const double densities[] = {0.0, 0.05, 0.3, 0.9};
    c->sel = SEL_MASK;
    c->Bs = rng_int(r, 0, 1) ? c->B : 1;
    c->Hs = pick_heads(r, c);
    c->density = densities[rng_int(r, 0, 3)];
}

static void make_bias(test_rng *r, fwd_case *c)
{
    c->Bb = rng_int(r, 0, 1) ? c->B : 1;
    const int64_t heads[] = {1, c->Hkv, c->Hq};
    c->Hb = rng_pick(r, heads, 3);
    c->Lb = rng_bernoulli(r, 0.4) ? c->Lq : 1;
}

/* A random case whose size B*Hq*Lq*Lk*D stays below max_work. */
static fwd_case random_case(test_rng *r, int64_t max_len, double max_work)
{
    int hp = (int)rng_int(r, 0, 3);
    fwd_case c = plain_case(rng_int(r, 1, 2), rng_int(r, 1, max_len), rng_int(r, 1, max_len),
                            HEADS[hp][0], HEADS[hp][1], rng_pick(r, DIMS, 7), rng_u64(r));
    while ((double)c.B * c.Hq * c.Lq * c.Lk * c.D > max_work) {
        if (c.Lq >= c.Lk)
            c.Lq = (c.Lq + 1) / 2;
        else
            c.Lk = (c.Lk + 1) / 2;
    }
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

/* ------------------------------------------------------------------------------------------ */
/* Tests                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static void run_random(uint64_t seed, int n, int64_t max_len, double max_work)
{
    test_rng r = rng_make(seed);
    fwd_case *cases = test_calloc((size_t)n, sizeof *cases);
    for (int i = 0; i < n; i++)
        cases[i] = random_case(&r, max_len, max_work);
    run_cases(cases, n);
    free(cases);
}

START_TEST(random_small)
{
    run_random(11, 160, 48, 2e5);
}
END_TEST

START_TEST(random_medium)
{
    run_random(12, 90, 300, 2e6);
}
END_TEST

START_TEST(every_head_dim)
{
    /* every D with each head layout, causal top-k over a per-key bias (the DMA case) */
    fwd_case cases[7 * 4];
    int n = 0;
    test_rng r = rng_make(13);
    for (int d = 0; d < 7; d++) {
        for (int hp = 0; hp < 4; hp++) {
            fwd_case c = plain_case(2, 37, 53, HEADS[hp][0], HEADS[hp][1], DIMS[d], rng_u64(&r));
            c.causal = 1;
            c.Bb = 2;
            c.Hb = c.Hkv;
            c.Lb = 1;
            make_build(&r, &c, DMA_MASK_TOPK);
            c.mask_causal = 1;
            c.window = 7;
            c.Bs = 2;
            c.Hs = c.Hkv;
            c.mBb = 2;
            c.mHb = c.Hkv;
            c.mLb = 1;
            cases[n++] = c;
        }
    }
    run_cases(cases, n);
}
END_TEST

START_TEST(large)
{
    /* the biggest shapes, a few times: D = 256 with L = 300, long dense rows, long windows */
    fwd_case cases[5];
    test_rng r = rng_make(14);
    cases[0] = plain_case(1, 300, 300, 4, 1, 256, rng_u64(&r)); /* dense causal baseline */
    cases[0].causal = 1;
    cases[1] = plain_case(1, 300, 300, 8, 2, 128, rng_u64(&r)); /* top-k 64, per-key bias */
    cases[1].causal = 1;
    cases[1].Bb = 1;
    cases[1].Hb = 2;
    cases[1].Lb = 1;
    make_build(&r, &cases[1], DMA_MASK_TOPK);
    cases[1].window = 64;
    cases[1].mask_causal = 1;
    cases[1].block_size = 0;
    cases[2] = plain_case(2, 257, 300, 4, 4, 100, rng_u64(&r)); /* per-row bias and top-k */
    cases[2].Bb = 2;
    cases[2].Hb = 4;
    cases[2].Lb = 257;
    cases[2].softcap = 5.0f;
    make_build(&r, &cases[2], DMA_MASK_TOPK);
    cases[2].Hs = 4;
    cases[2].mHb = 4;
    cases[2].mLb = 257;
    cases[2].window = 64;
    cases[3] = plain_case(1, 300, 300, 1, 1, 256, rng_u64(&r)); /* window >= Lk, strided */
    make_build(&r, &cases[3], DMA_MASK_WINDOW);
    cases[3].window = 1000;
    cases[3].strided = 1;
    cases[4] = plain_case(1, 300, 300, 4, 1, 64, rng_u64(&r)); /* smoothed top-k, padding */
    cases[4].causal = 1;
    make_build(&r, &cases[4], DMA_MASK_TOPK);
    cases[4].mask_causal = 1;
    cases[4].window = 64;
    cases[4].block_size = 16;
    cases[4].Bp = 1;
    run_cases(cases, 5);
}
END_TEST

START_TEST(paired_tiles)
{
    /* Causal top-k over a builder bias that falls with the key, with a few late risers: with one
     * query head per kv head (or per head of the object) the forward runs tiles t, t + 1 as one
     * item over their merged union (most tiles pair here). Covered: MHA, an object per query
     * head over GQA, Lq != Lk, a partial last tile, unions of more than one chunk, a per-key
     * and a per-row forward bias, softcap, a batch of two, and strided tensors. */
    fwd_case cases[5];
    test_rng r = rng_make(23);
    cases[0] = plain_case(1, 600, 600, 4, 4, 32, rng_u64(&r));
    cases[0].window = 128;
    cases[1] = plain_case(2, 400, 450, 2, 2, 40, rng_u64(&r));
    cases[1].window = 64;
    cases[1].softcap = 5.0f;
    cases[1].Bb = 2;
    cases[1].Hb = 2;
    cases[1].Lb = 1;
    cases[2] = plain_case(1, 700, 700, 2, 2, 64, rng_u64(&r));
    cases[2].window = 300;
    cases[2].strided = 1;
    cases[3] = plain_case(1, 333, 333, 4, 1, 16, rng_u64(&r));
    cases[3].window = 40;
    cases[4] = plain_case(1, 520, 520, 1, 1, 24, rng_u64(&r));
    cases[4].window = 96;
    cases[4].Bb = cases[4].Hb = 1;
    cases[4].Lb = 520;
    for (int i = 0; i < 5; i++) {
        fwd_case *c = &cases[i];
        c->causal = c->mask_causal = 1;
        c->sel = SEL_BUILD;
        c->kind = DMA_MASK_TOPK;
        c->decaying = 1;
        c->Bs = c->mBb = c->B;
        c->Hs = c->mHb = i == 3 ? c->Hq : c->Hkv; /* case 3: one object head per query head */
    }
    run_cases(cases, 5);
}
END_TEST

START_TEST(chunk_edges)
{
    /* Unions of 256 keys (one chunk), 257 to 320 (one chunk that takes the tail), 321 (256 and
     * a chunk of 65), 576 and 577 (256, then 320 in one, or 256 + 65), with and without a
     * causal mask and a per-key bias: the forward's chunking against the reference. */
    static const int64_t lks[] = {256, 257, 300, 320, 321, 576, 577};
    fwd_case cases[14];
    int n = 0;
    test_rng r = rng_make(29);
    for (int l = 0; l < 7; l++)
        for (int v = 0; v < 2; v++) {
            fwd_case c = plain_case(1, v ? lks[l] : 70, lks[l], 2, 1, rng_pick(&r, DIMS, 7),
                                    rng_u64(&r));
            c.causal = v;
            if (v)
                make_bias(&r, &c);
            cases[n++] = c;
        }
    run_cases(cases, n);
}
END_TEST

START_TEST(decode)
{
    /* Lq = 1 (one new token against a KV cache) and Lk = 1 */
    fwd_case cases[24];
    int n = 0;
    test_rng r = rng_make(15);
    static const int64_t lks[] = {1, 2, 31, 64, 299, 300};
    for (int l = 0; l < 6; l++) {
        for (int v = 0; v < 4; v++) {
            fwd_case c = plain_case(2, v == 3 ? lks[l] : 1, v == 3 ? 1 : lks[l], 8, 2,
                                    rng_pick(&r, DIMS, 7), rng_u64(&r));
            c.causal = v != 1;
            if (v >= 1) {
                make_bias(&r, &c);
                make_build(&r, &c, v == 2 ? DMA_MASK_WINDOW : DMA_MASK_TOPK);
            }
            cases[n++] = c;
        }
    }
    run_cases(cases, n);
}
END_TEST

START_TEST(lq_differs_from_lk)
{
    /* bottom-right causal alignment both ways; Lq > Lk causal gives empty leading rows */
    fwd_case cases[32];
    int n = 0;
    test_rng r = rng_make(16);
    static const int64_t lens[][2] = {{5, 80}, {80, 5}, {100, 37}, {37, 100},
                                      {129, 64}, {64, 129}, {2, 300}, {300, 2}};
    for (int l = 0; l < 8; l++) {
        for (int v = 0; v < 4; v++) {
            int hp = (int)rng_int(&r, 0, 3);
            fwd_case c = plain_case(rng_int(&r, 1, 2), lens[l][0], lens[l][1], HEADS[hp][0],
                                    HEADS[hp][1], rng_pick(&r, DIMS, 6), rng_u64(&r));
            c.causal = v != 3;
            if (v == 1 || v == 3) {
                make_bias(&r, &c);
                make_build(&r, &c, DMA_MASK_TOPK);
                c.mask_causal = c.causal;
            } else if (v == 2) {
                make_build(&r, &c, DMA_MASK_WINDOW);
            }
            cases[n++] = c;
        }
    }
    run_cases(cases, n);
}
END_TEST

START_TEST(sparsity_heads_and_batches)
{
    /* object H in {1, Hkv, Hq} and B in {1, B}, from the builder and from a mask */
    fwd_case cases[2 * 3 * 2 * 2];
    int n = 0;
    test_rng r = rng_make(17);
    for (int src = 0; src < 2; src++)
        for (int hs = 0; hs < 3; hs++)
            for (int bs = 0; bs < 2; bs++)
                for (int causal = 0; causal <= 1; causal++) {
                    fwd_case c = plain_case(2, 45, 61, 8, 2, 40, rng_u64(&r));
                    c.causal = causal;
                    make_bias(&r, &c);
                    if (src == 0)
                        make_build(&r, &c, DMA_MASK_TOPK);
                    else
                        make_mask(&r, &c);
                    const int64_t heads[] = {1, 2, 8};
                    c.Hs = heads[hs];
                    c.Bs = bs ? 2 : 1;
                    c.mBb = c.Bs;
                    c.mHb = c.Hs;
                    if (c.Bp > 1)
                        c.Bp = c.Bs;
                    if (src == 1)
                        c.density = 0.3;
                    cases[n++] = c;
                }
    run_cases(cases, n);
}
END_TEST

START_TEST(block_smoothing)
{
    fwd_case cases[16];
    int n = 0;
    test_rng r = rng_make(18);
    static const dma_mask_kind kinds[] = {DMA_MASK_TOPK, DMA_MASK_RELU, DMA_MASK_WINDOW,
                                          DMA_MASK_DENSE};
    static const int64_t blocks[] = {2, 3, 16, 1000};
    for (int kd = 0; kd < 4; kd++)
        for (int bl = 0; bl < 4; bl++) {
            int hp = (int)rng_int(&r, 0, 3);
            fwd_case c = plain_case(1, rng_int(&r, 20, 90), rng_int(&r, 20, 90), HEADS[hp][0],
                                    HEADS[hp][1], 64, rng_u64(&r));
            c.causal = (int)rng_int(&r, 0, 1);
            make_bias(&r, &c);
            make_build(&r, &c, kinds[kd]);
            c.block_size = blocks[bl];
            cases[n++] = c;
        }
    run_cases(cases, n);
}
END_TEST

START_TEST(strided_views)
{
    fwd_case cases[20];
    test_rng r = rng_make(19);
    for (int i = 0; i < 20; i++) {
        cases[i] = random_case(&r, 80, 4e5);
        cases[i].strided = 1;
        if (i % 2 == 0)
            make_bias(&r, &cases[i]);
    }
    run_cases(cases, 20);
}
END_TEST

START_TEST(empty_rows)
{
    /* rows with nothing selected: out == 0 and lse == -inf, never NaN */
    fwd_case cases[6];
    test_rng r = rng_make(20);
    cases[0] = plain_case(2, 50, 20, 4, 1, 16, rng_u64(&r)); /* causal, Lq > Lk */
    cases[0].causal = 1;
    cases[1] = plain_case(1, 40, 40, 4, 4, 64, rng_u64(&r)); /* empty mask */
    make_mask(&r, &cases[1]);
    cases[1].density = 0.0;
    cases[2] = plain_case(2, 40, 33, 8, 2, 100, rng_u64(&r)); /* sparse mask: some empty rows */
    make_mask(&r, &cases[2]);
    cases[2].density = 0.03;
    cases[3] = plain_case(1, 30, 30, 1, 1, 40, rng_u64(&r)); /* top-k with window 0 */
    make_build(&r, &cases[3], DMA_MASK_TOPK);
    cases[3].window = 0;
    cases[4] = plain_case(1, 60, 60, 4, 2, 40, rng_u64(&r)); /* heavy padding, causal window */
    make_build(&r, &cases[4], DMA_MASK_WINDOW);
    cases[4].Bp = 1;
    cases[4].window = 2;
    cases[4].causal = 1;
    cases[5] = plain_case(1, 30, 30, 4, 4, 16, rng_u64(&r)); /* mask non-causal, attn causal */
    make_mask(&r, &cases[5]);
    cases[5].density = 0.1;
    cases[5].causal = 1;
    run_cases(cases, 6);
}
END_TEST

START_TEST(bias_with_neg_inf)
{
    /* -inf bias entries (never at key 0, which every non-causal row sees) weigh nothing */
    fwd_case cases[4];
    test_rng r = rng_make(21);
    for (int i = 0; i < 4; i++) {
        cases[i] = plain_case(2, 33, 47, 4, 2, 64, rng_u64(&r));
        make_bias(&r, &cases[i]);
        cases[i].bias_neginf = 1;
    }
    run_cases(cases, 4);
}
END_TEST

START_TEST(zero_lengths)
{
    /* Lk = 0: every row is empty; Lq = 0: nothing to write */
    fwd_case cases[4];
    test_rng r = rng_make(22);
    cases[0] = plain_case(2, 7, 0, 4, 2, 16, rng_u64(&r));
    cases[1] = plain_case(2, 7, 0, 4, 2, 16, rng_u64(&r));
    cases[1].causal = 1;
    cases[2] = plain_case(2, 0, 9, 4, 2, 16, rng_u64(&r));
    cases[3] = plain_case(1, 0, 0, 1, 1, 1, rng_u64(&r));
    run_cases(cases, 4);
}
END_TEST

START_TEST(params_null_is_default)
{
    /* params = NULL behaves as all-zero parameters */
    fwd_case cases[6];
    test_rng r = rng_make(23);
    for (int i = 0; i < 6; i++) {
        cases[i] = random_case(&r, 60, 3e5);
        cases[i].scale = 0.0f;
        cases[i].softcap = 0.0f;
        cases[i].causal = 0;
        cases[i].params_null = 1;
    }
    run_cases(cases, 6);
}
END_TEST

START_TEST(lse_optional)
{
    /* lse = NULL: out is the same, lse's buffer is not touched */
    fwd_case cases[6];
    test_rng r = rng_make(24);
    for (int i = 0; i < 6; i++) {
        cases[i] = random_case(&r, 60, 3e5);
        cases[i].lse_null = 1;
        cases[i].strided = i % 2;
    }
    run_cases(cases, 6);
}
END_TEST

START_TEST(softcap_and_scale)
{
    fwd_case cases[12];
    test_rng r = rng_make(25);
    static const float softcaps[] = {0.0f, 0.25f, 1.5f, 30.0f};
    for (int i = 0; i < 12; i++) {
        cases[i] = plain_case(1, 41, 41, 4, 2, 64, rng_u64(&r));
        cases[i].softcap = softcaps[i % 4];
        cases[i].scale = (i / 4 == 0) ? 0.0f : (i / 4 == 1) ? 0.05f : 0.25f;
        cases[i].causal = i % 2;
        make_bias(&r, &cases[i]);
    }
    run_cases(cases, 12);
}
END_TEST

START_TEST(same_sparsity_shared_between_calls)
{
    /* one object, built once, reused for many calls and contexts: results are unchanged */
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    test_rng r = rng_make(26);
    fwd_case c = plain_case(2, 64, 64, 4, 2, 32, rng_u64(&r));
    c.causal = 1;
    make_bias(&r, &c);
    make_build(&r, &c, DMA_MASK_TOPK);
    c.window = 7;
    fwd_data f;
    fwd_data_make(&c, &f);
    dma_sparsity *sp = make_sparsity(&c, &f, &ctxs[0]);
    dma_attn_params ap = {.causal = 1};
    for (int rep = 0; rep < 3; rep++) {
        for (int n = 0; n < nctx; n++) {
            fill_sentinel(f.outbuf, f.out_bytes);
            fill_sentinel(f.lsebuf, f.lse_bytes);
            ck_assert_int_eq(dma_forward(ctxs[n].ctx, &f.tq, &f.tk, &f.tv, &f.tbias, sp, &ap,
                                         &f.tout, &f.tlse),
                             DMA_OK);
            check_against_reference(&c, &f, &ctxs[n]);
        }
    }
    dma_sparsity_destroy(sp);
    fwd_data_free(&f);
    test_contexts_destroy(ctxs, nctx);
}
END_TEST

static Suite *forward_suite(void)
{
    Suite *s = suite_create("forward");
    TCase *tc = tcase_create("forward");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, random_small);
    tcase_add_test(tc, random_medium);
    tcase_add_test(tc, every_head_dim);
    tcase_add_test(tc, large);
    tcase_add_test(tc, paired_tiles);
    tcase_add_test(tc, chunk_edges);
    tcase_add_test(tc, decode);
    tcase_add_test(tc, lq_differs_from_lk);
    tcase_add_test(tc, sparsity_heads_and_batches);
    tcase_add_test(tc, block_smoothing);
    tcase_add_test(tc, strided_views);
    tcase_add_test(tc, empty_rows);
    tcase_add_test(tc, bias_with_neg_inf);
    tcase_add_test(tc, zero_lengths);
    tcase_add_test(tc, params_null_is_default);
    tcase_add_test(tc, lse_optional);
    tcase_add_test(tc, softcap_and_scale);
    tcase_add_test(tc, same_sparsity_shared_between_calls);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(forward_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

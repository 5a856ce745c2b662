/*
 * backward_cases.c - the harness of test_backward.c and test_backward_fd.c (backward_cases.h):
 * cases, their padded data and reference results, the calls into dmattn, the checks, snapshots,
 * and runs on every context.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backward_cases.h"
#include "reference_backward.h"

/* ------------------------------------------------------------------------------------------ */
/* Cases                                                                                      */
/* ------------------------------------------------------------------------------------------ */

const char *describe(const bwd_case *c)
{
    static char buf[768];
    static const char *sel_names[] = {"none", "topk", "mask"};
    snprintf(buf, sizeof buf,
             "{B=%lld Lq=%lld Lk=%lld Hq=%lld Hkv=%lld D=%lld causal=%d scale=%g softcap=%g "
             "bias=(%lld,%lld,%lld) bias_is_mbias=%d neginf=%d no_dbias=%d sel=%s Bs=%lld "
             "Hs=%lld mask_causal=%d window=%lld mbias=(%lld,%lld,%lld) decaying=%d Bp=%lld "
             "density=%.2f "
             "strided=%d params_null=%d seed=%llu}",
             (long long)c->B, (long long)c->Lq, (long long)c->Lk, (long long)c->Hq,
             (long long)c->Hkv, (long long)c->D, c->causal, (double)c->scale,
             (double)c->softcap, (long long)c->Bb, (long long)c->Hb, (long long)c->Lb,
             c->bias_is_mbias, c->bias_neginf, c->no_dbias, sel_names[c->sel],
             (long long)c->Bs, (long long)c->Hs, c->mask_causal, (long long)c->window,
             (long long)c->mBb, (long long)c->mHb, (long long)c->mLb, c->decaying,
             (long long)c->Bp, c->density, c->strided, c->params_null, (unsigned long long)c->seed);
    return buf;
}

/* A dense, non-causal case without bias; tests then change what they are about. */
bwd_case plain_case(int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,
                    int64_t D, uint64_t seed)
{
    bwd_case c;
    memset(&c, 0, sizeof c);
    c.B = B;
    c.Lq = Lq;
    c.Lk = Lk;
    c.Hq = Hq;
    c.Hkv = Hkv;
    c.D = D;
    c.sel = SEL_NONE;
    c.Bs = c.Hs = 1;
    c.mBb = c.mHb = c.mLb = 1;
    c.seed = seed;
    return c;
}

/* Top-k over a builder bias. per_row: bias (mBb, mHb, Lq, Lk) and object H in {Hq, Hkv, 1};
 * else the DMA per-key bias (mBb, mHb, 1, Lk) and object H in {Hkv, 1}. */
void set_topk(test_rng *r, bwd_case *c, int per_row, int64_t window)
{
    c->sel = SEL_TOPK;
    c->window = window;
    c->mask_causal = rng_bernoulli(r, 0.8) ? c->causal : (int)rng_int(r, 0, 1);
    if (per_row) {
        const int64_t hs[] = {c->Hq, c->Hq, c->Hkv, 1};
        c->Hs = rng_pick(r, hs, 4);
        c->mLb = c->Lq;
    } else {
        c->Hs = rng_bernoulli(r, 0.75) ? c->Hkv : 1;
        c->mLb = 1;
    }
    c->Bs = rng_bernoulli(r, 0.8) ? c->B : 1;
    c->mBb = rng_bernoulli(r, 0.75) ? c->Bs : 1;
    c->mHb = rng_bernoulli(r, 0.75) ? c->Hs : 1;
    const int64_t paddings[] = {0, 0, 1, c->Bs};
    c->Bp = rng_pick(r, paddings, 4);
}

/* The attention bias is the builder's bias (same values, same shape). */
void bias_from_mbias(bwd_case *c)
{
    c->bias_is_mbias = 1;
    c->Bb = c->mBb;
    c->Hb = c->mHb;
    c->Lb = c->mLb;
}

void random_bias(test_rng *r, bwd_case *c)
{
    c->Bb = rng_int(r, 0, 1) ? c->B : 1;
    const int64_t heads[] = {1, c->Hkv, c->Hq};
    c->Hb = rng_pick(r, heads, 3);
    c->Lb = rng_bernoulli(r, 0.4) ? c->Lq : 1;
}

int64_t random_window(test_rng *r, const bwd_case *c)
{
    const int64_t windows[] = {1, 7, 64, c->Lk, c->Lk + 3};
    return rng_pick(r, windows, 5);
}

/* A random case whose size B * Hq * Lq * Lk * D stays below max_work. */
bwd_case random_case(test_rng *r, int64_t max_len, double max_work)
{
    int hp = (int)rng_int(r, 0, 3);
    bwd_case c = plain_case(rng_int(r, 1, 2), rng_int(r, 1, max_len), rng_int(r, 1, max_len),
                            TEST_HEADS[hp][0], TEST_HEADS[hp][1], rng_pick(r, TEST_DIMS, 7),
                            rng_u64(r));
    test_fit_work((double)c.B * c.Hq * c.D, &c.Lq, &c.Lk, max_work);
    c.causal = (int)rng_int(r, 0, 1);
    if (rng_bernoulli(r, 0.3))
        c.scale = (float)(rng_bernoulli(r, 0.5) ? 0.7 : 1.3) / sqrtf((float)c.D);
    if (rng_bernoulli(r, 0.3)) {
        const float caps[] = {0.5f, 1.5f, 5.0f};
        c.softcap = caps[rng_int(r, 0, 2)];
    }
    double u = rng_unit(r);
    if (u < 0.25) {
        /* SEL_NONE */
    } else if (u < 0.85) {
        set_topk(r, &c, rng_bernoulli(r, 0.4), 0);
        c.window = random_window(r, &c);
    } else {
        static const double densities[] = {0.0, 0.05, 0.3, 0.9};
        const int64_t hs[] = {1, c.Hkv, c.Hq};
        c.sel = SEL_MASK;
        c.Bs = rng_int(r, 0, 1) ? c.B : 1;
        c.Hs = rng_pick(r, hs, 3);
        c.density = densities[rng_int(r, 0, 3)];
    }
    if (c.sel == SEL_TOPK && rng_bernoulli(r, 0.6)) {
        bias_from_mbias(&c);
    } else if (rng_bernoulli(r, 0.75)) {
        random_bias(r, &c);
        c.bias_neginf = rng_bernoulli(r, 0.1);
    }
    if (c.Bb)
        c.no_dbias = rng_bernoulli(r, 0.1);
    c.strided = rng_bernoulli(r, 0.2);
    if (rng_bernoulli(r, 0.05)) {
        c.params_null = 1;
        c.scale = c.softcap = 0.0f;
        c.causal = 0;
    }
    return c;
}

/* ------------------------------------------------------------------------------------------ */
/* Padded tensors: a (rows x inner) array laid out with `pad` extra floats after every row     */
/* ------------------------------------------------------------------------------------------ */

/* A 4-D (ndim 4) or 3-D (ndim 3) float view whose last dimension is padded; filled with the
 * sentinel pattern. */
static void pt_make(ptensor *p, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
                    int64_t pad)
{
    memset(p, 0, sizeof *p);
    p->inner = ndim == 4 ? d3 : d2;
    p->rows = ndim == 4 ? d0 * d1 * d2 : d0 * d1;
    p->pad = pad;
    p->bytes = (size_t)(p->rows * (p->inner + pad)) * sizeof(float);
    p->buf = test_malloc(p->bytes);
    fill_sentinel(p->buf, p->bytes);
    if (ndim == 4) {
        p->t = dma_tensor_4d(p->buf, DMA_F32, d0, d1, d2, d3 + pad);
        p->t.shape[3] = d3;
    } else {
        p->t = dma_tensor_3d(p->buf, DMA_F32, d0, d1, d2 + pad);
        p->t.shape[2] = d2;
    }
}

int64_t pt_count(const ptensor *p)
{
    return p->rows * p->inner;
}

/* The element with logical (contiguous) index x. */
float *pt_at(const ptensor *p, int64_t x)
{
    return p->buf + (x / p->inner) * (p->inner + p->pad) + x % p->inner;
}

static void pt_load(ptensor *p, const float *src)
{
    for (int64_t x = 0; x < pt_count(p); x++)
        *pt_at(p, x) = src[x];
}

/* 1 if the padding floats after each row still hold the sentinel pattern. */
static int pt_gaps_untouched(const ptensor *p)
{
    if (p->pad == 0)
        return 1;
    unsigned char *pat = test_malloc(p->bytes);
    fill_sentinel(pat, p->bytes);
    int ok = 1;
    const size_t gap = (size_t)p->pad * sizeof(float);
    for (int64_t r = 0; r < p->rows && ok; r++) {
        size_t off = (size_t)(r * (p->inner + p->pad) + p->inner) * sizeof(float);
        ok = memcmp((unsigned char *)p->buf + off, pat + off, gap) == 0;
    }
    free(pat);
    return ok;
}

static void pt_free(ptensor *p)
{
    free(p->buf);
    p->buf = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Data of one case                                                                           */
/* ------------------------------------------------------------------------------------------ */

static float random_value(test_rng *r, const bwd_case *c, float range)
{
    if (c->dyadic)
        return (float)rng_int(r, -(int64_t)(256 * range), (int64_t)(256 * range)) / 256.0f;
    return rng_float(r, -range, range);
}

ref_fwd_args ref_args(const bwd_case *c, const bwd_data *f)
{
    ref_fwd_args ra = {
        .B = c->B, .Lq = c->Lq, .Lk = c->Lk, .Hq = c->Hq, .Hkv = c->Hkv, .D = c->D,
        .q = f->q, .k = f->k, .v = f->v,
        .bias = c->Bb ? f->bias : NULL, .Bb = c->Bb, .Hb = c->Hb, .Lb = c->Lb,
        .sel = f->sel, .Bs = c->Bs, .Hs = c->Hs,
        .causal = c->causal, .scale = c->scale, .softcap = c->softcap,
    };
    return ra;
}

static void run_reference(const bwd_case *c, bwd_data *f)
{
    ref_fwd_args ra = ref_args(c, f);
    ref_bwd_out o = {
        .dq = f->dq_ref, .dk = f->dk_ref, .dv = f->dv_ref, .dbias = f->dbias_ref,
        .live_q = f->live_q, .live_kv = f->live_kv, .live_bias = f->live_bias,
        .dq_mag = f->dq_mag, .dk_mag = f->dk_mag, .dv_mag = f->dv_mag, .dbias_mag = f->dbias_mag,
    };
    ref_backward(&ra, f->dout, &o);
    ref_forward(&ra, f->out_ref, f->lse_ref);
}

void data_make(const bwd_case *c, bwd_data *f)
{
    const int64_t B = c->B, Lq = c->Lq, Lk = c->Lk, Hq = c->Hq, Hkv = c->Hkv, D = c->D;
    const int64_t nq = B * Lq * Hq * D, nkv = B * Lk * Hkv * D;
    const int64_t nbias = c->Bb * c->Hb * c->Lb * Lk;
    test_rng r = rng_make(c->seed);
    memset(f, 0, sizeof *f);

    f->q = test_malloc((size_t)nq * sizeof(float));
    f->k = test_malloc((size_t)nkv * sizeof(float));
    f->v = test_malloc((size_t)nkv * sizeof(float));
    f->dout = test_malloc((size_t)nq * sizeof(float));
    for (int64_t x = 0; x < nq; x++)
        f->q[x] = random_value(&r, c, 1.0f);
    for (int64_t x = 0; x < nkv; x++)
        f->k[x] = random_value(&r, c, 1.0f);
    for (int64_t x = 0; x < nkv; x++)
        f->v[x] = random_value(&r, c, 1.0f);
    for (int64_t x = 0; x < nq; x++)
        f->dout[x] = rng_float(&r, -1.0f, 1.0f);

    const int64_t nsel = c->Bs * c->Hs * Lq * Lk;
    if (c->sel == SEL_TOPK) {
        int64_t nb = c->mBb * c->mHb * c->mLb * Lk;
        f->mbias = test_malloc((size_t)nb * sizeof(float));
        for (int64_t x = 0; x < nb; x++) /* ties (small integers) or distinct values */
            f->mbias[x] = c->decaying ? -0.01f * (float)(x % Lk) +
                                            (rng_bernoulli(&r, 0.03) ? 20.0f : 0.0f)
                          : (!c->dyadic && (c->seed & 1)) ? (float)rng_int(&r, -1, 3)
                                                          : random_value(&r, c, 2.0f);
        f->pad = test_malloc((size_t)(c->Bp * Lk));
        for (int64_t x = 0; x < c->Bp * Lk; x++)
            f->pad[x] = !rng_bernoulli(&r, 0.2);
        f->sel = test_malloc((size_t)nsel);
        ref_mask_args ma = {
            .kind = DMA_MASK_TOPK, .causal = c->mask_causal, .window = c->window,
            .block_size = 0, .B = c->Bs, .H = c->Hs, .Lq = Lq, .Lk = Lk,
            .bias = f->mbias, .Bb = c->mBb, .Hb = c->mHb, .Lb = c->mLb,
            .padding = c->Bp ? f->pad : NULL, .Bp = c->Bp,
        };
        ref_mask(&ma, f->sel);
        f->tmbias = dma_tensor_4d(f->mbias, DMA_F32, c->mBb, c->mHb, c->mLb, Lk);
        f->tpad = dma_tensor_2d(f->pad, DMA_BOOL, c->Bp, Lk);
    } else if (c->sel == SEL_MASK) {
        test_random_mask(&r, c->density, nsel, &f->mask, &f->sel);
        f->tmask = dma_tensor_4d(f->mask, DMA_BOOL, c->Bs, c->Hs, Lq, Lk);
    }

    if (c->Bb) {
        f->bias = test_malloc((size_t)nbias * sizeof(float));
        if (c->bias_is_mbias) {
            memcpy(f->bias, f->mbias, (size_t)nbias * sizeof(float));
        } else {
            for (int64_t x = 0; x < nbias; x++)
                f->bias[x] = random_value(&r, c, 2.0f);
            if (c->bias_neginf)
                for (int64_t x = 0; x < nbias; x++)
                    if (rng_bernoulli(&r, 0.3))
                        f->bias[x] = -INFINITY;
        }
    }

    f->out_ref = test_malloc((size_t)nq * sizeof(double));
    f->lse_ref = test_malloc((size_t)(B * Hq * Lq) * sizeof(double));
    f->dq_ref = test_malloc((size_t)nq * sizeof(double));
    f->dk_ref = test_malloc((size_t)nkv * sizeof(double));
    f->dv_ref = test_malloc((size_t)nkv * sizeof(double));
    f->dbias_ref = test_malloc((size_t)nbias * sizeof(double));
    f->dq_mag = test_malloc((size_t)nq * sizeof(double));
    f->dk_mag = test_malloc((size_t)nkv * sizeof(double));
    f->dv_mag = test_malloc((size_t)nkv * sizeof(double));
    f->dbias_mag = test_malloc((size_t)nbias * sizeof(double));
    f->live_q = test_malloc((size_t)(B * Lq * Hq));
    f->live_kv = test_malloc((size_t)(B * Lk * Hkv));
    f->live_bias = test_malloc((size_t)nbias);
    run_reference(c, f);

    /* the library's views; with `strided`, every row gets a few floats of padding */
    const int s = c->strided;
    pt_make(&f->pq, 4, B, Lq, Hq, D, s ? 5 : 0);
    pt_make(&f->pk, 4, B, Lk, Hkv, D, s ? 3 : 0);
    pt_make(&f->pv, 4, B, Lk, Hkv, D, s ? 2 : 0);
    pt_make(&f->pdout, 4, B, Lq, Hq, D, s ? 4 : 0);
    pt_make(&f->pout, 4, B, Lq, Hq, D, s ? 3 : 0);
    pt_make(&f->plse, 3, B, Hq, Lq, 0, s ? 2 : 0);
    pt_make(&f->pdq, 4, B, Lq, Hq, D, s ? 3 : 0);
    pt_make(&f->pdk, 4, B, Lk, Hkv, D, s ? 1 : 0);
    pt_make(&f->pdv, 4, B, Lk, Hkv, D, s ? 2 : 0);
    pt_make(&f->pbias, 4, c->Bb, c->Hb, c->Lb, Lk, s ? 2 : 0);
    pt_make(&f->pdbias, 4, c->Bb, c->Hb, c->Lb, Lk, s ? 3 : 0);
    pt_load(&f->pq, f->q);
    pt_load(&f->pk, f->k);
    pt_load(&f->pv, f->v);
    pt_load(&f->pdout, f->dout);
    if (c->Bb)
        pt_load(&f->pbias, f->bias);
}

void data_free(bwd_data *f)
{
    free(f->q); free(f->k); free(f->v); free(f->bias); free(f->dout);
    free(f->mbias); free(f->pad); free(f->mask); free(f->sel);
    free(f->out_ref); free(f->lse_ref);
    free(f->dq_ref); free(f->dk_ref); free(f->dv_ref); free(f->dbias_ref);
    free(f->dq_mag); free(f->dk_mag); free(f->dv_mag); free(f->dbias_mag);
    free(f->live_q); free(f->live_kv); free(f->live_bias);
    pt_free(&f->pq); pt_free(&f->pk); pt_free(&f->pv); pt_free(&f->pbias);
    pt_free(&f->pdout); pt_free(&f->pout); pt_free(&f->plse);
    pt_free(&f->pdq); pt_free(&f->pdk); pt_free(&f->pdv); pt_free(&f->pdbias);
}

/* ------------------------------------------------------------------------------------------ */
/* Calling dmattn                                                                             */
/* ------------------------------------------------------------------------------------------ */

/*
 * Fills freed heap memory with NaN (0xFF bytes) so that a library that reads scratch memory it
 * never wrote gets NaN (and fails the checks) every time, instead of whatever the allocator
 * happened to hand back (zeros in a fresh process, stale data later: a flaky failure). The
 * blocks are freed in allocation order and glibc reuses them for the library's next allocations
 * (freeing a block above the mmap threshold also raises the threshold, so blocks up to 512 KiB
 * come from the heap afterwards). Harmless where the allocator works differently (ASan).
 */
static void dirty_heap(void)
{
    enum { N_BLOCKS = 40 };
    void *blocks[N_BLOCKS];
    int n = 0;
    for (size_t size = 48; size <= ((size_t)512 << 10) && n < N_BLOCKS; size += size / 2) {
        blocks[n] = malloc(size);
        if (blocks[n] != NULL)
            memset(blocks[n++], 0xFF, size);
    }
    for (int i = 0; i < n; i++)
        free(blocks[i]);
}

dma_sparsity *make_sparsity(const bwd_case *c, bwd_data *f, dma_context *ctx)
{
    dma_sparsity *sp = NULL;
    dma_status st = DMA_OK;
    if (c->sel == SEL_TOPK) {
        dma_mask_params mp;
        memset(&mp, 0, sizeof mp);
        mp.kind = DMA_MASK_TOPK;
        mp.causal = c->mask_causal;
        mp.window = c->window;
        st = dma_sparsity_build(ctx, &mp, c->Bs, c->Hs, c->Lq, c->Lk, &f->tmbias,
                                c->Bp ? &f->tpad : NULL, &sp);
    } else if (c->sel == SEL_MASK) {
        st = dma_sparsity_from_mask(ctx, &f->tmask, &sp);
    }
    CHECK(st == DMA_OK, "%s: sparsity: %s (%s) %s", dma_isa_name(dma_context_isa(ctx)),
                  dma_status_string(st), dma_context_last_error(ctx), describe(c));
    return sp;
}

static dma_attn_params attn_params(const bwd_case *c)
{
    dma_attn_params ap;
    memset(&ap, 0, sizeof ap);
    ap.scale = c->scale;
    ap.softcap = c->softcap;
    ap.causal = c->causal;
    return ap;
}

void call_forward(const bwd_case *c, bwd_data *f, dma_context *ctx, const dma_sparsity *sp)
{
    dma_attn_params ap = attn_params(c);
    dirty_heap();
    dma_status st = dma_forward(ctx, &f->pq.t, &f->pk.t, &f->pv.t, c->Bb ? &f->pbias.t : NULL,
                                sp, c->params_null ? NULL : &ap, &f->pout.t, &f->plse.t);
    CHECK(st == DMA_OK, "%s/%d: dma_forward: %s (%s) %s",
                  dma_isa_name(dma_context_isa(ctx)), dma_context_threads(ctx),
                  dma_status_string(st), dma_context_last_error(ctx), describe(c));
}

/* Fills the gradient buffers with the sentinel, then runs the backward; must succeed. */
void call_backward(const bwd_case *c, bwd_data *f, dma_context *ctx, const dma_sparsity *sp)
{
    dma_attn_params ap = attn_params(c);
    fill_sentinel(f->pdq.buf, f->pdq.bytes);
    fill_sentinel(f->pdk.buf, f->pdk.bytes);
    fill_sentinel(f->pdv.buf, f->pdv.bytes);
    fill_sentinel(f->pdbias.buf, f->pdbias.bytes);
    int want_dbias = c->Bb && !c->no_dbias;
    dirty_heap();
    dma_status st = dma_backward(ctx, &f->pq.t, &f->pk.t, &f->pv.t, c->Bb ? &f->pbias.t : NULL,
                                 sp, c->params_null ? NULL : &ap, &f->pout.t, &f->plse.t,
                                 &f->pdout.t, &f->pdq.t, &f->pdk.t, &f->pdv.t,
                                 want_dbias ? &f->pdbias.t : NULL);
    CHECK(st == DMA_OK, "%s/%d: dma_backward: %s (%s) %s",
                  dma_isa_name(dma_context_isa(ctx)), dma_context_threads(ctx),
                  dma_status_string(st), dma_context_last_error(ctx), describe(c));
}

/* ------------------------------------------------------------------------------------------ */
/* Checking                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* Largest |got - ref| / (ATOL + RTOL * max|ref|) seen (printed with DMATTN_TEST_VERBOSE). */
static double worst_ratio = 0.0;
static char worst_where[1024];

/* One gradient tensor against the reference: entry x within ATOL + RTOL * mag[x]. live[x /
 * live_div] == 0 means nothing reaches the entry: it must be exactly zero. */
static void check_grad(const char *name, const ptensor *got, const double *ref, const double *mag,
                       const uint8_t *live, int64_t live_div, const bwd_case *c, dma_context *ctx)
{
    const int64_t n = pt_count(got);
    for (int64_t x = 0; x < n; x++) {
        const float g = *pt_at(got, x);
        const int is_live = live[x / live_div] != 0;
        const double tol = ATOL + RTOL * mag[x];
        const double err = fabs((double)g - ref[x]);
        int ok = is_live ? (isfinite(g) && err <= tol) : g == 0.0f;
        if (is_live && isfinite(g) && err / tol > worst_ratio) {
            worst_ratio = err / tol;
            snprintf(worst_where, sizeof worst_where, "%s/%d %s[%lld] got %.9g ref %.9g %s",
                     dma_isa_name(dma_context_isa(ctx)), dma_context_threads(ctx), name,
                     (long long)x, (double)g, ref[x], describe(c));
        }
        CHECK(ok,
              "%s/%d: %s[%lld] (row %lld of %lld, col %lld): %.9g, expected %.9g (tol %.3g)%s %s",
              dma_isa_name(dma_context_isa(ctx)), dma_context_threads(ctx), name, (long long)x,
              (long long)(x / got->inner), (long long)got->rows, (long long)(x % got->inner),
              (double)g, ref[x], tol, is_live ? "" : " (nothing reaches it: must be 0)",
              describe(c));
    }
    CHECK(pt_gaps_untouched(got), "%s/%d: %s written outside its view %s",
          dma_isa_name(dma_context_isa(ctx)), dma_context_threads(ctx), name, describe(c));
}

void check_against_reference(const bwd_case *c, const bwd_data *f, dma_context *ctx)
{
    check_grad("dq", &f->pdq, f->dq_ref, f->dq_mag, f->live_q, c->D, c, ctx);
    check_grad("dk", &f->pdk, f->dk_ref, f->dk_mag, f->live_kv, c->D, c, ctx);
    check_grad("dv", &f->pdv, f->dv_ref, f->dv_mag, f->live_kv, c->D, c, ctx);
    if (c->Bb && !c->no_dbias)
        check_grad("dbias", &f->pdbias, f->dbias_ref, f->dbias_mag, f->live_bias, 1, c, ctx);
    else
        CHECK(is_sentinel(f->pdbias.buf, f->pdbias.bytes), "dbias written though NULL");
}

/* The forward's out and lse, which the backward reads, must be right before the backward can
 * be: checked loosely (test_forward.c checks them tightly) so that a forward failure is named as
 * one. */
void check_forward(const bwd_case *c, const bwd_data *f, dma_context *ctx)
{
    for (int64_t x = 0; x < pt_count(&f->plse); x++) {
        float g = *pt_at(&f->plse, x);
        double r = f->lse_ref[x];
        int ok = isinf(r) ? g == (float)r : fabs((double)g - r) <= FWD_TOL;
        CHECK(ok, "%s/%d: forward lse[%lld] = %.9g, expected %.9g %s",
                      dma_isa_name(dma_context_isa(ctx)), dma_context_threads(ctx), (long long)x,
                      (double)g, r, describe(c));
    }
    for (int64_t x = 0; x < pt_count(&f->pout); x++) {
        float g = *pt_at(&f->pout, x);
        CHECK(fabs((double)g - f->out_ref[x]) <= FWD_TOL,
                      "%s/%d: forward out[%lld] = %.9g, expected %.9g %s",
                      dma_isa_name(dma_context_isa(ctx)), dma_context_threads(ctx), (long long)x,
                      (double)g, f->out_ref[x], describe(c));
    }
}

static const ptensor *snap_member(const bwd_data *f, int i)
{
    const ptensor *m[11] = {&f->pq, &f->pk, &f->pv, &f->pbias, &f->pdout, &f->pout, &f->plse,
                            &f->pdq, &f->pdk, &f->pdv, &f->pdbias};
    return m[i];
}
static const char *const SNAP_NAMES[11] = {"q", "k", "v", "bias", "dout", "out", "lse",
                                           "dq", "dk", "dv", "dbias"};

void snap_take(snapshot *s, const bwd_data *f)
{
    for (int i = 0; i < 11; i++) {
        const ptensor *p = snap_member(f, i);
        s->n[i] = p->bytes;
        s->p[i] = test_malloc(p->bytes);
        memcpy(s->p[i], p->buf, p->bytes);
    }
}

/* Name of the first buffer in [from, to) that differs from the snapshot, or NULL. */
const char *snap_diff(const snapshot *s, const bwd_data *f, int from, int to)
{
    for (int i = from; i < to; i++)
        if (memcmp(s->p[i], snap_member(f, i)->buf, s->n[i]) != 0)
            return SNAP_NAMES[i];
    return NULL;
}

void snap_free(snapshot *s)
{
    for (int i = 0; i < 11; i++)
        free(s->p[i]);
}

/* ------------------------------------------------------------------------------------------ */
/* Running cases                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* Forward + backward of one case on every context; each against the reference; threads 2 of an
 * ISA must reproduce threads 1 bit for bit; the inputs of the backward must not change. */
void run_case(const bwd_case *c, const test_ctx *ctxs, int nctx)
{
    bwd_data f;
    data_make(c, &f);
    snapshot prev, inputs;
    int have_prev = 0;
    for (int n = 0; n < nctx; n++) {
        dma_context *ctx = ctxs[n].ctx;
        dma_sparsity *sp = make_sparsity(c, &f, ctx);
        call_forward(c, &f, ctx, sp);
        check_forward(c, &f, ctx);
        snap_take(&inputs, &f);
        call_backward(c, &f, ctx, sp);
        dma_sparsity_destroy(sp);

        const char *changed = snap_diff(&inputs, &f, 0, SNAP_FIRST_GRAD);
        CHECK(changed == NULL, "%s/%d: dma_backward changed its input %s %s",
                      dma_isa_name(ctxs[n].isa), ctxs[n].threads, changed ? changed : "",
                      describe(c));
        snap_free(&inputs);
        check_against_reference(c, &f, ctx);

        if (have_prev && ctxs[n - 1].isa == ctxs[n].isa) {
            const char *d = snap_diff(&prev, &f, SNAP_FIRST_OUTPUT, SNAP_FIRST_GRAD);
            CHECK(d == NULL, "%s: forward %s differs between threads %d and %d %s",
                          dma_isa_name(ctxs[n].isa), d ? d : "", ctxs[n - 1].threads,
                          ctxs[n].threads, describe(c));
            d = snap_diff(&prev, &f, SNAP_FIRST_GRAD, 11);
            CHECK(d == NULL, "%s: %s differs between threads %d and %d %s",
                          dma_isa_name(ctxs[n].isa), d ? d : "", ctxs[n - 1].threads,
                          ctxs[n].threads, describe(c));
        }
        if (have_prev)
            snap_free(&prev);
        snap_take(&prev, &f);
        have_prev = 1;
    }
    if (have_prev)
        snap_free(&prev);
    data_free(&f);
}

void run_cases(const bwd_case *cases, int n)
{
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    for (int i = 0; i < n; i++)
        run_case(&cases[i], ctxs, nctx);
    test_contexts_destroy(ctxs, nctx);
    if (getenv("DMATTN_TEST_VERBOSE"))
        fprintf(stderr, "worst error / tolerance so far: %.3g (%s)\n", worst_ratio, worst_where);
}

void run_random(uint64_t seed, int n, int64_t max_len, double max_work)
{
    test_rng r = rng_make(seed);
    bwd_case *cases = test_calloc((size_t)n, sizeof *cases);
    for (int i = 0; i < n; i++)
        cases[i] = random_case(&r, max_len, max_work);
    run_cases(cases, n);
    free(cases);
}

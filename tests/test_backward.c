/*
 * test_backward.c - dma_backward (dq, dk, dv, dbias) against
 *   - the double precision reference of reference_backward.c, on a randomised grid with fixed
 *     seeds and on hand-picked shapes (every ISA the host runs, threads 1 and 2);
 *   - central finite differences of L = sum(out * G) on small shapes (the library's own
 *     forward, and the reference forward, which also validates the reference backward);
 *   - itself: bitwise identical results for any thread count and for repeated calls.
 * Its bad-input cases are in test_backward_errors.c.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "reference.h"
#include "reference_backward.h"

/* ck_assert_msg() reports every passing check to the Check runner (a write per call in fork
 * mode): far too slow for per-element checks. CHECK only calls Check when it fails. */
#define CHECK(expr, ...)                                                                         \
    do {                                                                                         \
        if (!(expr))                                                                             \
            ck_abort_msg(__VA_ARGS__);                                                           \
    } while (0)

/*
 * Tolerance against the reference, per entry: |got - ref| <= ATOL + RTOL * mag, where mag is
 * the same sum as the entry with every factor replaced by its absolute value (the reference
 * computes it: reference_backward.h). That is the scale of the entry's float32 rounding error:
 * an entry is a sum over up to Lq * Hq / Hkv (<= 1200 here) rows of products whose factor
 * dP - delta is itself the difference of two D-term dot products (D <= 256) that cancel (a row
 * with one key has dP == delta exactly, so its exact dbias is 0 while the float one is not).
 * Error bounds for such sums are ~n * eps * mag with eps = 6e-8 and n the number of terms on
 * the longest path (D + rows + keys, < 2000 here): 1e-4 * mag covers it, and real rounding
 * errors grow like sqrt(n) * eps * mag: the largest measured in this suite is 0.015 of the
 * tolerance (x86 scalar/AVX2, aarch64 scalar/NEON; DMATTN_TEST_VERBOSE=1 prints it). Any real
 * error (a missing softcap derivative, a wrong scale, a dropped or doubled key, a wrong
 * reduction over broadcast axes) is off by a large fraction of mag. A tolerance relative to
 * the entry or to the tensor's largest entry would fail on those cancelling entries. ATOL
 * covers entries whose every term is tiny.
 */
#define ATOL 1e-6
#define RTOL 1e-4
#define FWD_TOL 1e-4 /* out and lse of the forward (only to name a forward failure as one) */

static const int64_t HEADS[][2] = {{1, 1}, {4, 4}, {8, 2}, {4, 1}}; /* Hq, Hkv */
static const int64_t DIMS[] = {1, 16, 40, 64, 100, 128, 256};

/* ------------------------------------------------------------------------------------------ */
/* Cases                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef enum sel_mode {
    SEL_NONE, /* sp = NULL: every visible key (dense, or causal) */
    SEL_TOPK, /* dma_sparsity_build(TOPK); the reference uses ref_mask */
    SEL_MASK  /* a random boolean mask through dma_sparsity_from_mask */
} sel_mode;

typedef struct bwd_case {
    int64_t B, Lq, Lk, Hq, Hkv, D;
    int causal;           /* dma_attn_params.causal */
    float scale, softcap; /* dma_attn_params */
    int64_t Bb, Hb, Lb;   /* attention bias (Bb, Hb, Lb, Lk); Bb == 0: no bias */
    int bias_is_mbias;    /* the attention bias holds the builder's bias values (the DMA way) */
    int bias_neginf;      /* some attention bias entries are -inf */
    int no_dbias;         /* a bias but dbias = NULL */
    sel_mode sel;
    int64_t Bs, Hs; /* the sparsity object's B and H */
    /* SEL_TOPK: */
    int mask_causal;
    int64_t window;
    int64_t mBb, mHb, mLb; /* the builder's bias shape */
    int64_t Bp;            /* key padding (Bp, Lk); 0: none */
    /* SEL_MASK: */
    double density;
    int strided;     /* every tensor with padded rows; the gaps of outputs must stay untouched */
    int params_null; /* params = NULL (scale, softcap, causal must be 0) */
    int dyadic;      /* q, k, v, biases are multiples of 1/256 (finite differences) */
    int decaying;    /* SEL_TOPK: the builder's bias falls with the key, with a few late risers,
                        so that consecutive tiles select nearly the same keys */
    uint64_t seed;
} bwd_case;

static const char *describe(const bwd_case *c)
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
static bwd_case plain_case(int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,
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
static void set_topk(test_rng *r, bwd_case *c, int per_row, int64_t window)
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
static void bias_from_mbias(bwd_case *c)
{
    c->bias_is_mbias = 1;
    c->Bb = c->mBb;
    c->Hb = c->mHb;
    c->Lb = c->mLb;
}

static void random_bias(test_rng *r, bwd_case *c)
{
    c->Bb = rng_int(r, 0, 1) ? c->B : 1;
    const int64_t heads[] = {1, c->Hkv, c->Hq};
    c->Hb = rng_pick(r, heads, 3);
    c->Lb = rng_bernoulli(r, 0.4) ? c->Lq : 1;
}

static int64_t random_window(test_rng *r, const bwd_case *c)
{
    const int64_t windows[] = {1, 7, 64, c->Lk, c->Lk + 3};
    return rng_pick(r, windows, 5);
}

/* A random case whose size B * Hq * Lq * Lk * D stays below max_work. */
static bwd_case random_case(test_rng *r, int64_t max_len, double max_work)
{
    int hp = (int)rng_int(r, 0, 3);
    bwd_case c = plain_case(rng_int(r, 1, 2), rng_int(r, 1, max_len), rng_int(r, 1, max_len),
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

typedef struct ptensor {
    float *buf;
    size_t bytes;
    int64_t rows, inner, pad;
    dma_tensor t;
} ptensor;

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

static int64_t pt_count(const ptensor *p)
{
    return p->rows * p->inner;
}

/* The element with logical (contiguous) index x. */
static float *pt_at(const ptensor *p, int64_t x)
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

typedef struct bwd_data {
    /* logical, contiguous */
    float *q, *k, *v, *bias, *dout;
    float *mbias;  /* builder bias (SEL_TOPK) */
    uint8_t *pad;  /* builder key padding */
    uint8_t *mask; /* SEL_MASK input */
    uint8_t *sel;  /* (Bs, Hs, Lq, Lk) selection for the reference; NULL for SEL_NONE */
    /* reference */
    double *out_ref, *lse_ref; /* the forward, to tell forward failures from backward ones */
    double *dq_ref, *dk_ref, *dv_ref, *dbias_ref;
    double *dq_mag, *dk_mag, *dv_mag, *dbias_mag; /* error scale of each entry */
    uint8_t *live_q, *live_kv, *live_bias;
    /* as given to dmattn */
    ptensor pq, pk, pv, pbias, pdout, pout, plse, pdq, pdk, pdv, pdbias;
    dma_tensor tmbias, tpad, tmask;
} bwd_data;

static float random_value(test_rng *r, const bwd_case *c, float range)
{
    if (c->dyadic)
        return (float)rng_int(r, -(int64_t)(256 * range), (int64_t)(256 * range)) / 256.0f;
    return rng_float(r, -range, range);
}

static ref_fwd_args ref_args(const bwd_case *c, const bwd_data *f)
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

static void data_make(const bwd_case *c, bwd_data *f)
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
        f->mask = test_malloc((size_t)nsel);
        f->sel = test_malloc((size_t)nsel);
        for (int64_t x = 0; x < nsel; x++) {
            f->mask[x] = rng_bernoulli(&r, c->density) ? (uint8_t)rng_int(&r, 1, 3) : 0;
            f->sel[x] = f->mask[x] != 0;
        }
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

static void data_free(bwd_data *f)
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

static dma_sparsity *make_sparsity(const bwd_case *c, bwd_data *f, dma_context *ctx)
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

static void call_forward(const bwd_case *c, bwd_data *f, dma_context *ctx, const dma_sparsity *sp)
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
static void call_backward(const bwd_case *c, bwd_data *f, dma_context *ctx, const dma_sparsity *sp)
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

static void check_against_reference(const bwd_case *c, const bwd_data *f, dma_context *ctx)
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
static void check_forward(const bwd_case *c, const bwd_data *f, dma_context *ctx)
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

/* Byte copies of every buffer, to compare runs bit for bit. */
typedef struct snapshot {
    unsigned char *p[11];
    size_t n[11];
} snapshot;

static const ptensor *snap_member(const bwd_data *f, int i)
{
    const ptensor *m[11] = {&f->pq, &f->pk, &f->pv, &f->pbias, &f->pdout, &f->pout, &f->plse,
                            &f->pdq, &f->pdk, &f->pdv, &f->pdbias};
    return m[i];
}
static const char *const SNAP_NAMES[11] = {"q", "k", "v", "bias", "dout", "out", "lse",
                                           "dq", "dk", "dv", "dbias"};
enum { SNAP_FIRST_OUTPUT = 5, SNAP_FIRST_GRAD = 7 };

static void snap_take(snapshot *s, const bwd_data *f)
{
    for (int i = 0; i < 11; i++) {
        const ptensor *p = snap_member(f, i);
        s->n[i] = p->bytes;
        s->p[i] = test_malloc(p->bytes);
        memcpy(s->p[i], p->buf, p->bytes);
    }
}

/* Name of the first buffer in [from, to) that differs from the snapshot, or NULL. */
static const char *snap_diff(const snapshot *s, const bwd_data *f, int from, int to)
{
    for (int i = from; i < to; i++)
        if (memcmp(s->p[i], snap_member(f, i)->buf, s->n[i]) != 0)
            return SNAP_NAMES[i];
    return NULL;
}

static void snap_free(snapshot *s)
{
    for (int i = 0; i < 11; i++)
        free(s->p[i]);
}

/* ------------------------------------------------------------------------------------------ */
/* Running cases                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* Forward + backward of one case on every context; each against the reference; threads 2 of an
 * ISA must reproduce threads 1 bit for bit; the inputs of the backward must not change. */
static void run_case(const bwd_case *c, const test_ctx *ctxs, int nctx)
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

static void run_cases(const bwd_case *cases, int n)
{
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    for (int i = 0; i < n; i++)
        run_case(&cases[i], ctxs, nctx);
    test_contexts_destroy(ctxs, nctx);
    if (getenv("DMATTN_TEST_VERBOSE"))
        fprintf(stderr, "worst error / tolerance so far: %.3g (%s)\n", worst_ratio, worst_where);
}

static void run_random(uint64_t seed, int n, int64_t max_len, double max_work)
{
    test_rng r = rng_make(seed);
    bwd_case *cases = test_calloc((size_t)n, sizeof *cases);
    for (int i = 0; i < n; i++)
        cases[i] = random_case(&r, max_len, max_work);
    run_cases(cases, n);
    free(cases);
}

/* ------------------------------------------------------------------------------------------ */
/* Against the reference                                                                      */
/* ------------------------------------------------------------------------------------------ */

START_TEST(random_small)
{
    run_random(101, 90, 48, 2e5);
}
END_TEST

START_TEST(random_medium)
{
    run_random(102, 16, 300, 2e6);
}
END_TEST

START_TEST(every_head_dim)
{
    /* every D with each head layout: causal top-k 7 over a per-key bias that is also the
     * attention bias (the DMA case) */
    bwd_case cases[7 * 4];
    int n = 0;
    test_rng r = rng_make(103);
    for (int d = 0; d < 7; d++)
        for (int hp = 0; hp < 4; hp++) {
            bwd_case c = plain_case(2, 37, 53, HEADS[hp][0], HEADS[hp][1], DIMS[d], rng_u64(&r));
            c.causal = 1;
            set_topk(&r, &c, 0, 7);
            c.mask_causal = 1;
            c.Bs = c.mBb = 2;
            c.Hs = c.mHb = c.Hkv;
            bias_from_mbias(&c);
            c.softcap = (d % 2) ? 5.0f : 0.0f;
            cases[n++] = c;
        }
    run_cases(cases, n);
}
END_TEST

START_TEST(large)
{
    /* the largest shapes, a few times */
    bwd_case cases[4];
    test_rng r = rng_make(104);
    cases[0] = plain_case(1, 300, 300, 1, 1, 256, rng_u64(&r)); /* dense causal, D = 256 */
    cases[0].causal = 1;
    cases[0].Bb = 1;
    cases[0].Hb = 1;
    cases[0].Lb = 1;
    cases[1] = plain_case(1, 300, 300, 2, 1, 128, rng_u64(&r)); /* top-k 64, per-key bias */
    cases[1].causal = 1;
    set_topk(&r, &cases[1], 0, 64);
    cases[1].mask_causal = 1;
    cases[1].Hs = cases[1].mHb = 1;
    bias_from_mbias(&cases[1]);
    cases[2] = plain_case(1, 257, 300, 2, 2, 100, rng_u64(&r)); /* per-row bias top-k 64 */
    cases[2].softcap = 5.0f;
    set_topk(&r, &cases[2], 1, 64);
    cases[2].Hs = cases[2].mHb = 2;
    cases[2].Bs = cases[2].mBb = 1;
    bias_from_mbias(&cases[2]);
    cases[3] = plain_case(1, 280, 300, 4, 1, 64, rng_u64(&r)); /* window >= Lk, strided */
    set_topk(&r, &cases[3], 0, 300);
    bias_from_mbias(&cases[3]);
    cases[3].strided = 1;
    run_cases(cases, 4);
}
END_TEST

START_TEST(paired_tiles)
{
    /* Causal top-k over a per-key bias that falls with the key, with a few late risers:
     * consecutive tiles select nearly the same keys, so the backward pairs tiles t, t + 1 into
     * one work item over their merged union (with these shapes most tiles pair). Covered: a
     * partial last tile, unions of more than one chunk, GQA with two items per tile (Hq / Hkv >
     * heads per item), softcap, a batch of two, and strided tensors. */
    bwd_case cases[5];
    test_rng r = rng_make(131);
    cases[0] = plain_case(1, 600, 600, 4, 2, 32, rng_u64(&r));
    set_topk(&r, &cases[0], 0, 128);
    cases[1] = plain_case(2, 400, 450, 8, 2, 32, rng_u64(&r));
    set_topk(&r, &cases[1], 0, 64);
    cases[1].softcap = 5.0f;
    cases[2] = plain_case(1, 520, 520, 16, 1, 24, rng_u64(&r));
    set_topk(&r, &cases[2], 0, 96);
    cases[3] = plain_case(1, 700, 700, 2, 1, 40, rng_u64(&r));
    set_topk(&r, &cases[3], 0, 300);
    cases[3].strided = 1;
    cases[4] = plain_case(1, 333, 333, 4, 4, 16, rng_u64(&r));
    set_topk(&r, &cases[4], 0, 40);
    for (int i = 0; i < 5; i++) {
        cases[i].causal = cases[i].mask_causal = 1;
        cases[i].decaying = 1;
        cases[i].Bs = cases[i].mBb = cases[i].B;
        cases[i].Hs = cases[i].mHb = cases[i].Hkv;
        cases[i].Bp = 0;
        bias_from_mbias(&cases[i]);
    }
    run_cases(cases, 5);
}
END_TEST

START_TEST(lq_differs_from_lk)
{
    /* bottom-right causal alignment both ways; decoding (Lq = 1); Lq > Lk gives empty rows */
    static const int64_t lens[][2] = {{5, 80}, {80, 5}, {100, 37}, {37, 100}, {1, 131},
                                      {131, 1}, {2, 300}, {300, 2}};
    bwd_case cases[8 * 3];
    int n = 0;
    test_rng r = rng_make(105);
    for (int l = 0; l < 8; l++)
        for (int v = 0; v < 3; v++) {
            int hp = (int)rng_int(&r, 0, 3);
            bwd_case c = plain_case(rng_int(&r, 1, 2), lens[l][0], lens[l][1], HEADS[hp][0],
                                    HEADS[hp][1], rng_pick(&r, DIMS, 5), rng_u64(&r));
            c.causal = v != 2;
            if (v == 0) {
                random_bias(&r, &c);
            } else {
                set_topk(&r, &c, v == 2, random_window(&r, &c));
                c.mask_causal = c.causal;
                bias_from_mbias(&c);
            }
            cases[n++] = c;
        }
    run_cases(cases, n);
}
END_TEST

START_TEST(bias_broadcasts)
{
    /* every attention bias shape (Bb, Hb, Lb) in {1, B} x {1, Hkv, Hq} x {1, Lq}, with the
     * selection from a per-key (object H = Hkv) and from a per-row (H = Hq) top-k */
    bwd_case cases[2 * 3 * 2 * 2];
    int n = 0;
    test_rng r = rng_make(106);
    for (int bb = 0; bb < 2; bb++)
        for (int hb = 0; hb < 3; hb++)
            for (int lb = 0; lb < 2; lb++)
                for (int per_row = 0; per_row < 2; per_row++) {
                    bwd_case c = plain_case(2, 29, 43, 8, 2, 16, rng_u64(&r));
                    c.causal = (int)rng_int(&r, 0, 1);
                    set_topk(&r, &c, per_row, 7);
                    c.Bs = c.mBb = 2;
                    c.Hs = c.mHb = per_row ? 8 : 2;
                    c.Bb = bb ? 2 : 1;
                    c.Hb = hb == 0 ? 1 : hb == 1 ? 2 : 8;
                    c.Lb = lb ? c.Lq : 1;
                    c.softcap = (n % 3 == 0) ? 1.5f : 0.0f;
                    cases[n++] = c;
                }
    run_cases(cases, n);
}
END_TEST

START_TEST(topk_windows)
{
    /* window 1, 7, 64 and >= Lk, per-key and per-row, with and without key padding */
    static const int64_t windows[] = {1, 7, 64, 97, 500};
    bwd_case cases[5 * 2 * 2];
    int n = 0;
    test_rng r = rng_make(107);
    for (int w = 0; w < 5; w++)
        for (int per_row = 0; per_row < 2; per_row++)
            for (int padded = 0; padded < 2; padded++) {
                int hp = (int)rng_int(&r, 0, 3);
                bwd_case c = plain_case(1 + padded, 71, 97, HEADS[hp][0], HEADS[hp][1], 40,
                                        rng_u64(&r));
                c.causal = (int)rng_int(&r, 0, 1);
                set_topk(&r, &c, per_row, windows[w]);
                c.mask_causal = c.causal;
                c.Bp = padded ? c.Bs : 0;
                if (rng_bernoulli(&r, 0.5))
                    bias_from_mbias(&c);
                else
                    random_bias(&r, &c);
                cases[n++] = c;
            }
    run_cases(cases, n);
}
END_TEST

START_TEST(empty_rows)
{
    /* rows that select nothing give zero gradients; keys nobody selects get dk = dv = 0 */
    bwd_case cases[7];
    test_rng r = rng_make(108);
    cases[0] = plain_case(2, 50, 20, 4, 1, 16, rng_u64(&r)); /* causal, Lq > Lk */
    cases[0].causal = 1;
    random_bias(&r, &cases[0]);
    cases[1] = plain_case(1, 40, 40, 4, 4, 64, rng_u64(&r)); /* empty mask */
    cases[1].sel = SEL_MASK;
    cases[1].Hs = 4;
    cases[1].density = 0.0;
    cases[1].Bb = cases[1].Hb = cases[1].Lb = 1;
    cases[2] = plain_case(2, 40, 33, 8, 2, 100, rng_u64(&r)); /* sparse mask: some empty rows */
    cases[2].sel = SEL_MASK;
    cases[2].Bs = 2;
    cases[2].Hs = 8;
    cases[2].density = 0.03;
    random_bias(&r, &cases[2]);
    cases[3] = plain_case(1, 30, 30, 4, 2, 40, rng_u64(&r)); /* top-k with window 0 */
    set_topk(&r, &cases[3], 0, 0);
    bias_from_mbias(&cases[3]);
    cases[4] = plain_case(2, 60, 45, 4, 2, 40, rng_u64(&r)); /* causal top-k, Lq > Lk, padding */
    cases[4].causal = 1;
    set_topk(&r, &cases[4], 0, 3);
    cases[4].mask_causal = 1;
    cases[4].Bp = cases[4].Bs;
    bias_from_mbias(&cases[4]);
    cases[5] = plain_case(2, 33, 47, 4, 2, 64, rng_u64(&r)); /* -inf attention bias entries */
    cases[5].Bb = 2;
    cases[5].Hb = 4;
    cases[5].Lb = 33;
    cases[5].bias_neginf = 1;
    cases[6] = plain_case(1, 30, 12, 4, 4, 16, rng_u64(&r)); /* causal, Lq > Lk, softcap */
    cases[6].causal = 1;
    cases[6].softcap = 1.5f;
    cases[6].strided = 1;
    random_bias(&r, &cases[6]);
    run_cases(cases, 7);
}
END_TEST

START_TEST(zero_lengths)
{
    /* Lk = 0: every row is empty, dq = 0; Lq = 0: dk = dv = dbias = 0 */
    bwd_case cases[4];
    test_rng r = rng_make(109);
    cases[0] = plain_case(2, 7, 0, 4, 2, 16, rng_u64(&r));
    cases[0].Bb = 2;
    cases[0].Hb = 2;
    cases[0].Lb = 1;
    cases[1] = plain_case(2, 7, 0, 4, 2, 16, rng_u64(&r));
    cases[1].causal = 1;
    cases[2] = plain_case(2, 0, 9, 4, 2, 16, rng_u64(&r));
    cases[2].Bb = 1;
    cases[2].Hb = 4;
    cases[2].Lb = 1;
    cases[3] = plain_case(1, 0, 0, 1, 1, 1, rng_u64(&r));
    run_cases(cases, 4);
}
END_TEST

START_TEST(softcap_and_scale)
{
    bwd_case cases[12];
    test_rng r = rng_make(110);
    static const float softcaps[] = {0.0f, 0.25f, 1.5f, 30.0f};
    for (int i = 0; i < 12; i++) {
        cases[i] = plain_case(1, 41, 41, 4, 2, 64, rng_u64(&r));
        cases[i].softcap = softcaps[i % 4];
        cases[i].scale = (i / 4 == 0) ? 0.0f : (i / 4 == 1) ? 0.05f : 0.5f;
        cases[i].causal = i % 2;
        random_bias(&r, &cases[i]);
    }
    run_cases(cases, 12);
}
END_TEST

START_TEST(dbias_optional)
{
    /* a bias without dbias: dq, dk, dv are still right and nothing is written for dbias */
    bwd_case cases[4];
    test_rng r = rng_make(111);
    for (int i = 0; i < 4; i++) {
        cases[i] = plain_case(2, 35, 50, 4, 2, 32, rng_u64(&r));
        cases[i].causal = i % 2;
        set_topk(&r, &cases[i], i >= 2, 7);
        bias_from_mbias(&cases[i]);
        cases[i].no_dbias = 1;
        cases[i].strided = i == 3;
    }
    run_cases(cases, 4);
}
END_TEST

START_TEST(strided_views)
{
    bwd_case cases[12];
    test_rng r = rng_make(112);
    for (int i = 0; i < 12; i++) {
        cases[i] = random_case(&r, 70, 3e5);
        cases[i].strided = 1;
    }
    run_cases(cases, 12);
}
END_TEST

START_TEST(every_isa)
{
    /* each instruction set the host runs, one context each, against the reference */
    static const dma_isa isas[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512, DMA_ISA_NEON};
    enum { N = 10 };
    bwd_case cases[N];
    test_rng r = rng_make(113);
    for (int i = 0; i < N; i++) {
        cases[i] = random_case(&r, 120, 6e5);
        cases[i].D = DIMS[i % 7];
    }
    int tested = 0;
    CHECK(dma_isa_supported(DMA_ISA_SCALAR), "the scalar path must always run");
    for (size_t s = 0; s < sizeof isas / sizeof isas[0]; s++) {
        if (!dma_isa_supported(isas[s]))
            continue;
        dma_context_options opts;
        memset(&opts, 0, sizeof opts);
        opts.isa = isas[s];
        opts.threads = 1 + (int)(s % 2);
        test_ctx tc = {NULL, isas[s], opts.threads};
        dma_status st = dma_context_create(&opts, &tc.ctx);
        CHECK(st == DMA_OK, "context for %s: %s", dma_isa_name(isas[s]),
                      dma_status_string(st));
        ck_assert_int_eq(dma_context_isa(tc.ctx), isas[s]);
        for (int i = 0; i < N; i++)
            run_case(&cases[i], &tc, 1);
        dma_context_destroy(tc.ctx);
        tested++;
    }
    ck_assert_int_ge(tested, 1);
}
END_TEST

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
/* Determinism                                                                                */
/* ------------------------------------------------------------------------------------------ */

START_TEST(deterministic)
{
    /* one forward; backward with threads 1, 2, 3 and again 1 and 2, on every ISA: the gradients
     * must be bitwise identical (dk, dv, dbias sum over rows, heads and batches here) */
    bwd_case cases[5];
    test_rng r = rng_make(130);
    cases[0] = plain_case(2, 200, 200, 8, 2, 64, rng_u64(&r)); /* DMA: causal top-16 */
    cases[0].causal = 1;
    set_topk(&r, &cases[0], 0, 16);
    cases[0].mask_causal = 1;
    cases[0].Bs = cases[0].mBb = 2;
    cases[0].Hs = cases[0].mHb = 2;
    bias_from_mbias(&cases[0]);
    cases[1] = plain_case(1, 150, 190, 4, 1, 40, rng_u64(&r)); /* per-row top-32, softcap */
    set_topk(&r, &cases[1], 1, 32);
    cases[1].Hs = cases[1].mHb = 4;
    bias_from_mbias(&cases[1]);
    cases[1].softcap = 5.0f;
    cases[2] = plain_case(2, 130, 130, 4, 4, 16, rng_u64(&r)); /* dense causal, bias (1,1,1,Lk) */
    cases[2].causal = 1;
    cases[2].Bb = cases[2].Hb = cases[2].Lb = 1;
    /* unions of several chunks (the backward adds a chunk as soon as it is done once the
     * item's turn has come, else at the item's end: both must give the same bits), two kv
     * heads adding independently */
    cases[3] = plain_case(1, 700, 700, 4, 2, 32, rng_u64(&r));
    cases[3].causal = 1;
    set_topk(&r, &cases[3], 0, 400);
    cases[3].mask_causal = 1;
    cases[3].Hs = cases[3].mHb = 2;
    bias_from_mbias(&cases[3]);
    /* consecutive tiles with nearly the same keys: the backward pairs them into one work item
     * over their merged union (rows of two tiles, bitmasks remapped) */
    cases[4] = plain_case(1, 600, 600, 4, 2, 32, rng_u64(&r));
    cases[4].causal = 1;
    set_topk(&r, &cases[4], 0, 128);
    cases[4].mask_causal = 1;
    cases[4].decaying = 1;
    cases[4].Hs = cases[4].mHb = 2;
    bias_from_mbias(&cases[4]);

    static const dma_isa isas[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512, DMA_ISA_NEON};
    static const int threads[] = {1, 2, 3, 1, 2};
    for (size_t s = 0; s < sizeof isas / sizeof isas[0]; s++) {
        if (!dma_isa_supported(isas[s]))
            continue;
        dma_context *ctx[5];
        for (int t = 0; t < 5; t++) {
            dma_context_options opts;
            memset(&opts, 0, sizeof opts);
            opts.isa = isas[s];
            opts.threads = threads[t];
            ctx[t] = NULL;
            ck_assert_int_eq(dma_context_create(&opts, &ctx[t]), DMA_OK);
        }
        for (int i = 0; i < 5; i++) {
            const bwd_case *c = &cases[i];
            bwd_data f;
            data_make(c, &f);
            dma_sparsity *sp = make_sparsity(c, &f, ctx[0]);
            call_forward(c, &f, ctx[0], sp);
            check_forward(c, &f, ctx[0]);
            call_backward(c, &f, ctx[0], sp);
            check_against_reference(c, &f, ctx[0]);
            snapshot first;
            snap_take(&first, &f);
            for (int t = 1; t < 5; t++) {
                call_backward(c, &f, ctx[t], sp);
                const char *d = snap_diff(&first, &f, 0, 11);
                CHECK(d == NULL, "%s: %s differs between threads 1 and %d (call %d) %s",
                              dma_isa_name(isas[s]), d ? d : "", threads[t], t + 1,
                              describe(c));
            }
            snap_free(&first);
            dma_sparsity_destroy(sp);
            data_free(&f);
        }
        for (int t = 0; t < 5; t++)
            dma_context_destroy(ctx[t]);
    }
}
END_TEST

/* ------------------------------------------------------------------------------------------ */

static Suite *backward_suite(void)
{
    Suite *s = suite_create("backward");
    TCase *tc = tcase_create("reference");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, random_small);
    tcase_add_test(tc, random_medium);
    tcase_add_test(tc, every_head_dim);
    tcase_add_test(tc, large);
    tcase_add_test(tc, paired_tiles);
    tcase_add_test(tc, lq_differs_from_lk);
    tcase_add_test(tc, bias_broadcasts);
    tcase_add_test(tc, topk_windows);
    tcase_add_test(tc, empty_rows);
    tcase_add_test(tc, zero_lengths);
    tcase_add_test(tc, softcap_and_scale);
    tcase_add_test(tc, dbias_optional);
    tcase_add_test(tc, strided_views);
    tcase_add_test(tc, every_isa);
    suite_add_tcase(s, tc);

    TCase *tf = tcase_create("finite_differences");
    tcase_set_timeout(tf, 600);
    tcase_add_test(tf, finite_differences);
    suite_add_tcase(s, tf);

    TCase *td = tcase_create("determinism");
    tcase_set_timeout(td, 600);
    tcase_add_test(td, deterministic);
    suite_add_tcase(s, td);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(backward_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

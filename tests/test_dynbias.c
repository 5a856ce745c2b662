/*
 * test_dynbias.c - the value-derived dynamic bias, dma_dynamic_bias_forward / _backward
 * (DESIGN section 1 "Dynamic bias from values", include/dmattn.h), against
 *   - the double-precision reference of reference_dynbias.c, on hand-picked and random shapes,
 *     with contiguous and strided v (a view into a fused qkv buffer, padded strides, a zero token
 *     stride), strided outputs and w_dt rows, with and without b_dt, on every context;
 *   - the backward's contract: dv is added to, each optional output may be NULL;
 *   - central finite differences of L = sum(bias * R) of the reference forward;
 *   - itself: bitwise identical results for threads 1 and 2;
 *   - extreme dt (softplus / sigmoid stability) and empty shapes.
 * Bad input and the optional b_dt are test_dynbias_args.c's.
 */
#include <check.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "reference_dynbias.h"

/* Per entry: |got - ref| <= RTOL * (|ref| + mag), mag = the sum with absolute values (the scale
 * of float rounding; see reference_dynbias.h). FD_RTOL is the same against finite differences. */
#define RTOL 1e-5
#define FD_RTOL 1e-5
#define MAXH 8

static bool close_to(double got, double ref, double mag, double rtol)
{
    return fabs(got - ref) <= rtol * (fabs(ref) + mag) + 1e-30;
}

static bool same_bits(float x, float y) { return memcmp(&x, &y, sizeof x) == 0; }

/* ------------------------------------------------------------------------------------------ */
/* Strided views                                                                              */
/* ------------------------------------------------------------------------------------------ */

enum layout { L_CONTIG, L_QKV, L_PADDED, L_ZERO_TOKEN, N_LAYOUTS };

/* A float buffer of n floats and a 4-D view into it; inview[i] says the view covers float i. */
typedef struct view4 {
    float *buf;
    uint8_t *inview;
    size_t n;
    dma_tensor t;
} view4;

static int64_t at4(const dma_tensor *t, int64_t i0, int64_t i1, int64_t i2, int64_t i3)
{
    return i0 * t->stride[0] + i1 * t->stride[1] + i2 * t->stride[2] + i3 * t->stride[3];
}

/* L_QKV: the v part (heads 2*d2 .. 3*d2-1) of a (d0, d1, 3*d2, d3) buffer; L_PADDED: gaps after
 * every head, token and batch entry; L_ZERO_TOKEN (d1 == 1 only): token stride 0. */
static void view_make(view4 *w, int lay, int64_t d0, int64_t d1, int64_t d2, int64_t d3)
{
    int64_t s[4] = {d1 * d2 * d3, d2 * d3, d3, 1}, off = 0;
    if (lay == L_QKV) {
        s[1] = 3 * d2 * d3;
        s[0] = d1 * s[1];
        off = 2 * d2 * d3;
    } else if (lay == L_PADDED) {
        s[2] = d3 + 2;
        s[1] = d2 * s[2] + 5;
        s[0] = d1 * s[1] + 3;
        off = 7;
    } else if (lay == L_ZERO_TOKEN) {
        ck_assert_int_eq(d1, 1);
        s[1] = 0;
    }
    int64_t n = off + 1, dims[4] = {d0, d1, d2, d3};
    for (int d = 0; d < 4; d++)
        n += dims[d] > 0 ? (dims[d] - 1) * s[d] : 0;
    w->n = (size_t)n + 4;
    w->buf = test_malloc(w->n * sizeof(float));
    w->inview = test_calloc(w->n, 1);
    w->t = dma_tensor_4d(w->buf + off, DMA_F32, d0, d1, d2, d3);
    memcpy(w->t.stride, s, sizeof s);
    for (int64_t a = 0; a < d0; a++)
        for (int64_t b = 0; b < d1; b++)
            for (int64_t c = 0; c < d2; c++)
                for (int64_t x = 0; x < d3; x++)
                    w->inview[off + at4(&w->t, a, b, c, x)] = 1;
}

static void view_free(view4 *w)
{
    free(w->buf);
    free(w->inview);
}

static float *view_at(const view4 *w, int64_t i0, int64_t i1, int64_t i2, int64_t i3)
{
    return (float *)w->t.data + at4(&w->t, i0, i1, i2, i3);
}

/* Floats of the buffer outside the view equal those of `before`. */
static void require_outside_untouched(const view4 *w, const float *before, const char *name)
{
    for (size_t i = 0; i < w->n; i++)
        REQUIRE(w->inview[i] || same_bits(w->buf[i], before[i]),
                "%s: float %zu outside the view was written", name, i);
}

static float *dup_floats(const float *p, size_t n)
{
    float *q = test_malloc(n * sizeof(float));
    memcpy(q, p, n * sizeof(float));
    return q;
}

/* ------------------------------------------------------------------------------------------ */
/* A problem: inputs as the library sees them and as contiguous doubles for the reference       */
/* ------------------------------------------------------------------------------------------ */

typedef struct dyn_case {
    ref_dyn_dims d;
    view4 v;
    float *w;
    dma_tensor wt;
    float bdt[MAXH], a[MAXH];
    dma_tensor bdt_t, a_t;
    bool with_bdt;
    double *vd, *wd, bd[MAXH], ad[MAXH];
} dyn_case;

/* w_pad: w_dt rows are H + 3 floats apart instead of H. */
static void case_make(dyn_case *c, uint64_t seed, int64_t B, int64_t Lk, int64_t H, int64_t D,
                      int vlay, bool with_bdt, bool w_pad)
{
    ck_assert(H >= 1 && H <= MAXH);
    memset(c, 0, sizeof *c);
    test_rng r = rng_make(seed);
    c->d = (ref_dyn_dims){B, Lk, H, D};
    const int64_t HD = H * D, ldw = w_pad ? H + 3 : H;
    view_make(&c->v, vlay, B, Lk, H, D);
    for (size_t i = 0; i < c->v.n; i++)
        c->v.buf[i] = rng_float(&r, -1.0f, 1.0f);
    /* |dt| of order 1..3: softplus and sigmoid are exercised away from their tails too */
    const float ws = 3.0f / sqrtf((float)HD);
    c->w = test_malloc(sizeof(float) * (size_t)(HD * ldw));
    for (int64_t i = 0; i < HD * ldw; i++)
        c->w[i] = ws * rng_float(&r, -1.0f, 1.0f);
    c->wt = dma_tensor_2d(c->w, DMA_F32, HD, H);
    c->wt.stride[0] = ldw;
    c->with_bdt = with_bdt;
    for (int64_t h = 0; h < H; h++) {
        c->bdt[h] = with_bdt ? rng_float(&r, -1.0f, 1.0f) : 0.0f;
        c->a[h] = rng_float(&r, -1.5f, 2.0f);
        c->bd[h] = c->bdt[h];
        c->ad[h] = c->a[h];
    }
    c->bdt_t = dma_tensor_1d(c->bdt, DMA_F32, H);
    c->a_t = dma_tensor_1d(c->a, DMA_F32, H);
    c->vd = test_malloc(sizeof(double) * (size_t)(B * Lk * HD + 1));
    c->wd = test_malloc(sizeof(double) * (size_t)(HD * H));
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < Lk; t++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t x = 0; x < D; x++)
                    c->vd[((b * Lk + t) * H + h) * D + x] = *view_at(&c->v, b, t, h, x);
    for (int64_t x = 0; x < HD; x++)
        for (int64_t h = 0; h < H; h++)
            c->wd[x * H + h] = c->w[x * ldw + h];
}

static void case_free(dyn_case *c)
{
    view_free(&c->v);
    free(c->w);
    free(c->vd);
    free(c->wd);
}

static const dma_tensor *case_bdt(const dyn_case *c) { return c->with_bdt ? &c->bdt_t : NULL; }
static const double *case_bd(const dyn_case *c) { return c->with_bdt ? c->bd : NULL; }

/* ------------------------------------------------------------------------------------------ */
/* Forward against the reference, every context, threads 1 and 2 bitwise equal                */
/* ------------------------------------------------------------------------------------------ */

static void check_forward(dyn_case *c, int out_lay)
{
    const ref_dyn_dims d = c->d;
    const size_t n = (size_t)(d.B * d.H * d.Lk);
    double *ref = test_malloc(sizeof(double) * (n + 1)), *mag = test_malloc(sizeof(double) * (n + 1));
    ref_dyn_forward(d, c->vd, c->wd, case_bd(c), c->ad, ref, mag);
    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    view4 first = {0};
    for (int k = 0; k < nctx; k++) {
        view4 out;
        view_make(&out, out_lay, d.B, d.H, 1, d.Lk);
        fill_sentinel(out.buf, out.n * sizeof(float));
        float *before = dup_floats(out.buf, out.n);
        dma_status st = dma_dynamic_bias_forward(ctxs[k].ctx, &c->v.t, &c->wt, case_bdt(c),
                                                 &c->a_t, &out.t);
        ck_assert_msg(st == DMA_OK, "forward failed: %s (%s)", dma_status_string(st),
                      dma_context_last_error(ctxs[k].ctx));
        for (int64_t b = 0; b < d.B; b++)
            for (int64_t h = 0; h < d.H; h++)
                for (int64_t t = 0; t < d.Lk; t++) {
                    size_t o = (size_t)((b * d.H + h) * d.Lk + t);
                    float got = *view_at(&out, b, h, 0, t);
                    REQUIRE(close_to(got, ref[o], mag[o], RTOL),
                            "bias[%lld,%lld,0,%lld] = %.9g, reference %.9g (B %lld Lk %lld H %lld "
                            "D %lld, %s/%d threads)", (long long)b, (long long)h, (long long)t,
                            got, ref[o], (long long)d.B, (long long)d.Lk, (long long)d.H,
                            (long long)d.D, dma_isa_name(ctxs[k].isa), ctxs[k].threads);
                    if (ctxs[k].threads > 1)
                        REQUIRE(same_bits(got, *view_at(&first, b, h, 0, t)),
                                "bias differs between threads 1 and %d", ctxs[k].threads);
                }
        require_outside_untouched(&out, before, "bias");
        free(before);
        if (ctxs[k].threads == 1) {
            if (first.buf)
                view_free(&first);
            first = out;
        } else {
            view_free(&out);
        }
    }
    if (first.buf)
        view_free(&first);
    test_contexts_destroy(ctxs, nctx);
    free(ref);
    free(mag);
}

/* ------------------------------------------------------------------------------------------ */
/* Backward                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* The backward's outputs: dv (a view holding `pre` before the call), dw_dt with a padded row
 * stride, db_dt and da (with a float of guard each). */
typedef struct bwd_out {
    view4 dv;
    float *dw, db[MAXH + 1], da[MAXH + 1];
    int64_t ldw;
    dma_tensor dwt, dbt, dat;
} bwd_out;

static void bwd_out_make(bwd_out *o, const dyn_case *c, int dv_lay, const float *pre)
{
    const ref_dyn_dims d = c->d;
    view_make(&o->dv, dv_lay, d.B, d.Lk, d.H, d.D);
    memcpy(o->dv.buf, pre, o->dv.n * sizeof(float));
    o->ldw = d.H + 2;
    o->dw = test_malloc(sizeof(float) * (size_t)(d.H * d.D * o->ldw));
    fill_sentinel(o->dw, sizeof(float) * (size_t)(d.H * d.D * o->ldw));
    fill_sentinel(o->db, sizeof o->db);
    fill_sentinel(o->da, sizeof o->da);
    o->dwt = dma_tensor_2d(o->dw, DMA_F32, d.H * d.D, d.H);
    o->dwt.stride[0] = o->ldw;
    o->dbt = dma_tensor_1d(o->db, DMA_F32, d.H);
    o->dat = dma_tensor_1d(o->da, DMA_F32, d.H);
}

static void bwd_out_free(bwd_out *o)
{
    view_free(&o->dv);
    free(o->dw);
}

/* skip: bit 0 dv, 1 dw_dt, 2 db_dt, 3 da are passed as NULL. */
static dma_status bwd_run(dma_context *ctx, const dyn_case *c, const dma_tensor *dbias,
                          bwd_out *o, unsigned skip)
{
    return dma_dynamic_bias_backward(ctx, &c->v.t, &c->wt, case_bdt(c), &c->a_t, dbias,
                                     skip & 1 ? NULL : &o->dv.t, skip & 2 ? NULL : &o->dwt,
                                     skip & 4 ? NULL : &o->dbt, skip & 8 ? NULL : &o->dat);
}

/* Outputs of `o` not skipped are bitwise those of `full`; skipped ones were not touched. */
static void require_same_outputs(const bwd_out *o, const bwd_out *full, const dyn_case *c,
                                 const float *pre, unsigned skip)
{
    const size_t nw = (size_t)(c->d.H * c->d.D * o->ldw), nh = (size_t)c->d.H;
    REQUIRE(memcmp(o->dv.buf, skip & 1 ? pre : full->dv.buf, o->dv.n * sizeof(float)) == 0,
            "dv differs (skip mask %u)", skip);
    REQUIRE(skip & 2 ? is_sentinel(o->dw, nw * sizeof(float))
                     : memcmp(o->dw, full->dw, nw * sizeof(float)) == 0,
            "dw_dt differs (skip mask %u)", skip);
    REQUIRE(skip & 4 ? is_sentinel(o->db, sizeof o->db)
                     : memcmp(o->db, full->db, nh * sizeof(float)) == 0,
            "db_dt differs (skip mask %u)", skip);
    REQUIRE(skip & 8 ? is_sentinel(o->da, sizeof o->da)
                     : memcmp(o->da, full->da, nh * sizeof(float)) == 0,
            "da differs (skip mask %u)", skip);
}

/* Reference gradient arrays for the case's shape, in one allocation (returned; free it). */
static double *ref_grads_alloc(const ref_dyn_dims d, ref_dyn_grads *g)
{
    const size_t nv = (size_t)(d.B * d.Lk * d.H * d.D) + 1, nw = (size_t)(d.H * d.D * d.H);
    double *p = test_malloc(sizeof(double) * 2 * (nv + nw + 2 * MAXH));
    double **arrays[8] = {&g->dv, &g->dw, &g->db, &g->da, &g->dv_mag, &g->dw_mag, &g->db_mag,
                          &g->da_mag};
    const size_t sizes[4] = {nv, nw, MAXH, MAXH};
    double *q = p;
    for (int i = 0; i < 8; i++) {
        *arrays[i] = q;
        q += sizes[i % 4];
    }
    return p;
}

static void check_backward(dyn_case *c, int dv_lay, uint64_t seed)
{
    const ref_dyn_dims d = c->d;
    const int64_t HD = d.H * d.D, H = d.H;
    test_rng r = rng_make(seed ^ 0x5eedull);
    const size_t ng = (size_t)(d.B * H * d.Lk);
    float *g = test_malloc(sizeof(float) * (ng + 1));
    double *gd = test_malloc(sizeof(double) * (ng + 1));
    for (size_t i = 0; i < ng; i++)
        gd[i] = g[i] = rng_float(&r, -1.0f, 1.0f);
    dma_tensor dbias = dma_tensor_4d(g, DMA_F32, d.B, H, 1, d.Lk);
    ref_dyn_grads ref;
    double *buf = ref_grads_alloc(d, &ref);
    ref_dyn_backward(d, c->vd, c->wd, case_bd(c), c->ad, gd, &ref);
    /* what dv holds before the call: the contribution must be added to it */
    view4 tmp;
    view_make(&tmp, dv_lay, d.B, d.Lk, H, d.D);
    float *pre = dup_floats(tmp.buf, tmp.n);
    for (size_t i = 0; i < tmp.n; i++)
        pre[i] = rng_float(&r, -2.0f, 2.0f);
    view_free(&tmp);

    test_ctx ctxs[TEST_MAX_CTX];
    int nctx = test_contexts_create(ctxs);
    bwd_out first = {0};
    for (int k = 0; k < nctx; k++) {
        bwd_out o;
        bwd_out_make(&o, c, dv_lay, pre);
        dma_status st = bwd_run(ctxs[k].ctx, c, &dbias, &o, 0);
        ck_assert_msg(st == DMA_OK, "backward failed: %s (%s)", dma_status_string(st),
                      dma_context_last_error(ctxs[k].ctx));
        for (int64_t b = 0; b < d.B; b++)
            for (int64_t t = 0; t < d.Lk; t++)
                for (int64_t h = 0; h < H; h++)
                    for (int64_t x = 0; x < d.D; x++) {
                        size_t i = (size_t)(((b * d.Lk + t) * H + h) * d.D + x);
                        float *p = view_at(&o.dv, b, t, h, x);
                        double p0 = pre[p - o.dv.buf];
                        REQUIRE(close_to(*p, p0 + ref.dv[i], fabs(p0) + ref.dv_mag[i], RTOL),
                                "dv[%lld,%lld,%lld,%lld] = %.9g, expected %.9g + %.9g",
                                (long long)b, (long long)t, (long long)h, (long long)x, *p, p0,
                                ref.dv[i]);
                    }
        require_outside_untouched(&o.dv, pre, "dv");
        for (int64_t x = 0; x < HD; x++)
            for (int64_t h = 0; h < H; h++)
                REQUIRE(close_to(o.dw[x * o.ldw + h], ref.dw[x * H + h], ref.dw_mag[x * H + h],
                                 RTOL), "dw_dt[%lld,%lld] = %.9g, reference %.9g", (long long)x,
                        (long long)h, o.dw[x * o.ldw + h], ref.dw[x * H + h]);
        for (int64_t h = 0; h < H; h++) {
            REQUIRE(close_to(o.db[h], ref.db[h], ref.db_mag[h], RTOL),
                    "db_dt[%lld] = %.9g, reference %.9g", (long long)h, o.db[h], ref.db[h]);
            REQUIRE(close_to(o.da[h], ref.da[h], ref.da_mag[h], RTOL),
                    "da[%lld] = %.9g, reference %.9g", (long long)h, o.da[h], ref.da[h]);
        }
        /* padding of dw_dt rows and the guard floats stay untouched */
        bwd_out clean;
        bwd_out_make(&clean, c, dv_lay, pre);
        for (int64_t x = 0; x < HD; x++)
            REQUIRE(memcmp(o.dw + x * o.ldw + H, clean.dw + x * o.ldw + H, 2 * sizeof(float)) == 0,
                    "dw_dt: row padding written");
        REQUIRE(same_bits(o.db[H], clean.db[H]) && same_bits(o.da[H], clean.da[H]),
                "db_dt / da: written past Hkv");
        bwd_out_free(&clean);
        if (ctxs[k].threads == 1) {
            if (first.dw)
                bwd_out_free(&first);
            first = o;
            /* each optional output NULL in turn, and all of them: the rest is unchanged */
            static const unsigned skips[] = {1, 2, 4, 8, 15, 6};
            for (size_t s = 0; s < sizeof skips / sizeof skips[0]; s++) {
                bwd_out_make(&o, c, dv_lay, pre);
                ck_assert_int_eq(bwd_run(ctxs[k].ctx, c, &dbias, &o, skips[s]), DMA_OK);
                require_same_outputs(&o, &first, c, pre, skips[s]);
                bwd_out_free(&o);
            }
        } else {
            require_same_outputs(&o, &first, c, pre, 0); /* bitwise: threads 1 vs 2 */
            bwd_out_free(&o);
        }
    }
    if (first.dw)
        bwd_out_free(&first);
    test_contexts_destroy(ctxs, nctx);
    free(pre);
    free(buf);
    free(g);
    free(gd);
}

/* ------------------------------------------------------------------------------------------ */
/* Shapes                                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef struct shape_case {
    int64_t B, Lk, H, D;
    int vlay, bdt, out_lay, w_pad;
} shape_case;

/* Lk 1 and odd, several chunks of tokens (> 512), Hkv 1..4, D 1, 5, 64, 130, 256, every layout. */
static const shape_case fixed_cases[] = {
    {1, 1, 1, 1, L_CONTIG, 1, L_CONTIG, 0},     {1, 1, 3, 5, L_ZERO_TOKEN, 0, L_PADDED, 1},
    {2, 7, 2, 5, L_QKV, 1, L_PADDED, 0},        {3, 33, 4, 64, L_PADDED, 1, L_CONTIG, 1},
    {1, 101, 1, 130, L_QKV, 0, L_QKV, 0},       {2, 513, 2, 64, L_CONTIG, 1, L_PADDED, 0},
    {1, 1100, 3, 16, L_PADDED, 1, L_QKV, 1},    {3, 2, 4, 256, L_QKV, 1, L_CONTIG, 0},
    {2, 65, 1, 1, L_PADDED, 0, L_CONTIG, 1},    {1, 17, 4, 130, L_CONTIG, 1, L_PADDED, 0},
    {3, 1, 2, 130, L_ZERO_TOKEN, 1, L_ZERO_TOKEN, 1},
};
#define N_FIXED ((int)(sizeof fixed_cases / sizeof fixed_cases[0]))
#define N_RANDOM 20

static shape_case shape_for(int i)
{
    if (i < N_FIXED)
        return fixed_cases[i];
    static const int64_t lks[] = {1, 2, 3, 7, 16, 33, 100, 257, 511, 513, 1029};
    static const int64_t ds[] = {1, 2, 5, 8, 16, 33, 64, 100, 130, 256};
    test_rng r = rng_make(1000 + (uint64_t)i);
    shape_case s = {rng_int(&r, 1, 3), rng_pick(&r, lks, 11), rng_int(&r, 1, 4),
                    rng_pick(&r, ds, 10), (int)rng_int(&r, 0, 2), rng_bernoulli(&r, 0.5),
                    (int)rng_int(&r, 0, 2), rng_bernoulli(&r, 0.5)};
    if (s.Lk == 1 && rng_bernoulli(&r, 0.5))
        s.vlay = L_ZERO_TOKEN;
    return s;
}

START_TEST(forward_vs_reference)
{
    shape_case s = shape_for(_i);
    dyn_case c;
    case_make(&c, 77 + (uint64_t)_i, s.B, s.Lk, s.H, s.D, s.vlay, s.bdt, s.w_pad);
    /* the bias is (B, H, 1, Lk): a QKV-style view makes no sense for it, padded does */
    check_forward(&c, s.out_lay == L_CONTIG ? L_CONTIG : L_PADDED);
    case_free(&c);
}
END_TEST

START_TEST(backward_vs_reference)
{
    shape_case s = shape_for(_i);
    dyn_case c;
    case_make(&c, 177 + (uint64_t)_i, s.B, s.Lk, s.H, s.D, s.vlay, s.bdt, s.w_pad);
    check_backward(&c, s.out_lay == L_ZERO_TOKEN && s.Lk != 1 ? L_CONTIG : s.out_lay,
                   (uint64_t)_i);
    case_free(&c);
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* Finite differences                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* L = sum(bias * R) with the reference forward, in double. */
static double fd_loss(const dyn_case *c, const double *bd, const double *R, double *bias)
{
    ref_dyn_forward(c->d, c->vd, c->wd, bd, c->ad, bias, NULL);
    double L = 0.0;
    for (int64_t i = 0; i < c->d.B * c->d.H * c->d.Lk; i++)
        L += bias[i] * R[i];
    return L;
}

/* Central difference of L in *x (an element of the case's double inputs). */
static double fd_grad(const dyn_case *c, double *bd, const double *R, double *bias, double *x)
{
    const double h = 1e-5 * (1.0 + fabs(*x)), x0 = *x;
    *x = x0 + h;
    double lp = fd_loss(c, bd, R, bias);
    *x = x0 - h;
    double lm = fd_loss(c, bd, R, bias);
    *x = x0;
    return (lp - lm) / (2.0 * h);
}

START_TEST(finite_differences)
{
    /* small shapes, every input element; the last one with b_dt NULL (its gradient exists) */
    static const shape_case fc[] = {{2, 5, 2, 3, L_PADDED, 1, L_CONTIG, 1},
                                    {1, 4, 3, 2, L_QKV, 1, L_CONTIG, 0},
                                    {2, 3, 1, 4, L_CONTIG, 0, L_CONTIG, 0}};
    const shape_case s = fc[_i];
    dyn_case c;
    case_make(&c, 500 + (uint64_t)_i, s.B, s.Lk, s.H, s.D, s.vlay, s.bdt, s.w_pad);
    for (int64_t h = 0; h < s.H; h++) /* larger |dt| too: the softplus tails */
        c.a[h] = c.ad[h] = 1.0f + 0.5f * (float)h;
    const int64_t HD = s.H * s.D, ng = s.B * s.H * s.Lk;
    test_rng r = rng_make(600 + (uint64_t)_i);
    float *g = test_malloc(sizeof(float) * (size_t)ng);
    double *R = test_malloc(sizeof(double) * (size_t)ng), *bias = test_malloc(sizeof(double) * (size_t)ng);
    for (int64_t i = 0; i < ng; i++)
        R[i] = g[i] = rng_float(&r, -1.0f, 1.0f);
    dma_tensor dbias = dma_tensor_4d(g, DMA_F32, s.B, s.H, 1, s.Lk);
    float *zero = test_calloc(c.v.n, sizeof(float));
    bwd_out o;
    bwd_out_make(&o, &c, s.vlay, zero);
    dma_context *ctx = test_scalar_context();
    ck_assert_int_eq(bwd_run(ctx, &c, &dbias, &o, 0), DMA_OK);
    ref_dyn_grads ref;
    double *gbuf = ref_grads_alloc(c.d, &ref);
    ref_dyn_backward(c.d, c.vd, c.wd, case_bd(&c), c.ad, R, &ref); /* for the magnitudes */
    double bd[MAXH];
    memcpy(bd, c.bd, sizeof bd); /* zeros when b_dt is NULL: the gradient is still defined */
    for (int64_t b = 0; b < s.B; b++)
        for (int64_t t = 0; t < s.Lk; t++)
            for (int64_t x = 0; x < HD; x++) {
                int64_t i = (b * s.Lk + t) * HD + x;
                double fd = fd_grad(&c, bd, R, bias, &c.vd[i]);
                float got = *view_at(&o.dv, b, t, x / s.D, x % s.D);
                REQUIRE(close_to(got, fd, ref.dv_mag[i], FD_RTOL), "dv %lld: %.9g, fd %.9g",
                        (long long)i, got, fd);
            }
    for (int64_t i = 0; i < HD * s.H; i++) {
        double fd = fd_grad(&c, bd, R, bias, &c.wd[i]);
        float got = o.dw[i / s.H * o.ldw + i % s.H];
        REQUIRE(close_to(got, fd, ref.dw_mag[i], FD_RTOL), "dw_dt %lld: %.9g, fd %.9g",
                (long long)i, got, fd);
    }
    for (int64_t h = 0; h < s.H; h++) {
        double fdb = fd_grad(&c, bd, R, bias, &bd[h]), fda = fd_grad(&c, bd, R, bias, &c.ad[h]);
        ck_assert_msg(close_to(o.db[h], fdb, ref.db_mag[h], FD_RTOL), "db_dt %lld: %.9g, fd %.9g",
                      (long long)h, o.db[h], fdb);
        ck_assert_msg(close_to(o.da[h], fda, ref.da_mag[h], FD_RTOL), "da %lld: %.9g, fd %.9g",
                      (long long)h, o.da[h], fda);
    }
    dma_context_destroy(ctx);
    bwd_out_free(&o);
    free(gbuf);
    free(zero);
    free(g);
    free(R);
    free(bias);
    case_free(&c);
}
END_TEST

/* ------------------------------------------------------------------------------------------ */
/* Extreme dt, empty shapes, the 1-D view helper                                               */
/* ------------------------------------------------------------------------------------------ */

START_TEST(softplus_tails)
{
    /* H = D = 1, w = 100, v = 1, -1, 10, -10: dt = 100, -100, 1000, -1000 */
    float v[4] = {1.0f, -1.0f, 10.0f, -10.0f}, w = 100.0f, a = 0.7f, g[4] = {1, 1, 1, 1};
    float bias[4], dv[4] = {0}, dw, db, da;
    dma_tensor vt = dma_tensor_4d(v, DMA_F32, 1, 4, 1, 1), wt = dma_tensor_2d(&w, DMA_F32, 1, 1);
    dma_tensor at = dma_tensor_1d(&a, DMA_F32, 1), bt = dma_tensor_4d(bias, DMA_F32, 1, 1, 1, 4);
    dma_tensor gt = dma_tensor_4d(g, DMA_F32, 1, 1, 1, 4), dvt = dma_tensor_4d(dv, DMA_F32, 1, 4, 1, 1);
    dma_tensor dwt = dma_tensor_2d(&dw, DMA_F32, 1, 1), dbt = dma_tensor_1d(&db, DMA_F32, 1);
    dma_tensor dat = dma_tensor_1d(&da, DMA_F32, 1);
    dma_context *ctx = test_scalar_context();
    ck_assert_int_eq(dma_dynamic_bias_forward(ctx, &vt, &wt, NULL, &at, &bt), DMA_OK);
    for (int i = 0; i < 4; i++)
        ck_assert_msg(isfinite(bias[i]) && bias[i] >= 0.0f, "bias[%d] = %g", i, bias[i]);
    ck_assert_float_eq_tol(bias[0], 70.0f, 1e-5f);
    ck_assert_float_eq_tol(bias[2], 700.0f, 1e-4f);
    ck_assert_float_eq(bias[3], 0.0f);
    /* 0.7 e^-100 = 2.6e-44 is subnormal in float: within a few units of 1.4e-45 */
    ck_assert_msg(fabs(bias[1] - 0.7 * exp(-100.0)) <= 5e-45, "bias[1] = %g, expected %g",
                  bias[1], 0.7 * exp(-100.0));
    ck_assert_int_eq(dma_dynamic_bias_backward(ctx, &vt, &wt, NULL, &at, &gt, &dvt, &dwt, &dbt,
                                               &dat), DMA_OK);
    for (int i = 0; i < 4; i++)
        ck_assert_msg(isfinite(dv[i]), "dv[%d] = %g", i, dv[i]);
    ck_assert(isfinite(dw) && isfinite(db) && isfinite(da));
    /* ddt = 0.7 sigmoid(dt): 0.7, 0.7 e^-100, 0.7, 0 */
    ck_assert_float_eq_tol(dv[0], 70.0f, 1e-5f);
    ck_assert_float_eq_tol(dv[2], 70.0f, 1e-5f);
    ck_assert_msg(fabs(dv[1]) < 1e-40f && dv[3] == 0.0f, "dv = %g, %g", dv[1], dv[3]);
    ck_assert_float_eq_tol(dw, 0.7f * 1.0f + 0.7f * 10.0f, 1e-5f); /* sum v * ddt */
    ck_assert_float_eq_tol(db, 1.4f, 1e-6f);
    ck_assert_float_eq_tol(da, 1100.0f, 1e-3f); /* sum softplus(dt) */
    dma_context_destroy(ctx);
}
END_TEST

START_TEST(empty_shapes)
{
    /* B = 0, then Lk = 0: valid; nothing to write but dw_dt, db_dt and da, which become 0 */
    for (int which = 0; which < 2; which++) {
        const int64_t B = which == 0 ? 0 : 2, Lk = which == 0 ? 3 : 0, H = 2, D = 3;
        float in[64] = {0}, out[4][64];
        for (int k = 0; k < 4; k++)
            fill_sentinel(out[k], sizeof out[k]);
        dma_tensor v = dma_tensor_4d(in, DMA_F32, B, Lk, H, D);
        dma_tensor w = dma_tensor_2d(in, DMA_F32, H * D, H), a = dma_tensor_1d(in, DMA_F32, H);
        dma_tensor g = dma_tensor_4d(in, DMA_F32, B, H, 1, Lk);
        dma_tensor bias = dma_tensor_4d(out[0], DMA_F32, B, H, 1, Lk);
        dma_tensor dv = dma_tensor_4d(out[0], DMA_F32, B, Lk, H, D);
        dma_tensor dw = dma_tensor_2d(out[1], DMA_F32, H * D, H);
        dma_tensor db = dma_tensor_1d(out[2], DMA_F32, H), da = dma_tensor_1d(out[3], DMA_F32, H);
        dma_context *ctx = test_scalar_context();
        ck_assert_int_eq(dma_dynamic_bias_forward(ctx, &v, &w, &a, &a, &bias), DMA_OK);
        ck_assert(is_sentinel(out[0], sizeof out[0]));
        ck_assert_int_eq(dma_dynamic_bias_backward(ctx, &v, &w, &a, &a, &g, &dv, &dw, &db, &da),
                         DMA_OK);
        ck_assert(is_sentinel(out[0], sizeof out[0]));
        for (int i = 0; i < H * D * H; i++)
            ck_assert(out[1][i] == 0.0f);
        for (int i = 0; i < H; i++)
            ck_assert(out[2][i] == 0.0f && out[3][i] == 0.0f);
        /* nothing past the H (or H * D x H) floats: the sentinel pattern is still there */
        float pattern[64];
        fill_sentinel(pattern, sizeof pattern);
        ck_assert(memcmp(&out[1][H * D * H], &pattern[H * D * H], sizeof(float)) == 0);
        ck_assert(memcmp(&out[2][H], &pattern[H], sizeof(float)) == 0);
        ck_assert(memcmp(&out[3][H], &pattern[H], sizeof(float)) == 0);
        dma_context_destroy(ctx);
    }
}
END_TEST

START_TEST(tensor_1d)
{
    int dummy;
    dma_tensor t = dma_tensor_1d(&dummy, DMA_BF16, 9);
    ck_assert_ptr_eq(t.data, &dummy);
    ck_assert_int_eq(t.dtype, DMA_BF16);
    ck_assert_int_eq(t.ndim, 1);
    ck_assert(t.shape[0] == 9 && t.stride[0] == 1);
}
END_TEST

static Suite *dynbias_suite(void)
{
    Suite *s = suite_create("dynbias");
    TCase *tr = tcase_create("reference");
    tcase_set_timeout(tr, 300);
    tcase_add_loop_test(tr, forward_vs_reference, 0, N_FIXED + N_RANDOM);
    tcase_add_loop_test(tr, backward_vs_reference, 0, N_FIXED + N_RANDOM);
    tcase_add_loop_test(tr, finite_differences, 0, 3);
    suite_add_tcase(s, tr);
    TCase *te = tcase_create("edges");
    tcase_set_timeout(te, 60);
    tcase_add_test(te, softplus_tails);
    tcase_add_test(te, empty_shapes);
    tcase_add_test(te, tensor_1d);
    suite_add_tcase(s, te);
    return s;
}

int main(void) { return test_run_suite(dynbias_suite()); }

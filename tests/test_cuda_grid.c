/*
 * test_cuda_grid.c - the CUDA forward and backward against the CPU context's, on a randomised
 * grid of shapes (fixed seeds): float32, bf16 and f16 forwards and backwards;
 * D in {1, 13, 64, 80, 128, 256}; Lq != Lk; GQA, MQA, MHA; per-key and per-row biases; causal
 * or not; softcap; default and custom scales; sp NULL (dense) or a top-k object built by each
 * context; strided views; empty rows. Tolerances (GPU vs CPU, same stored inputs):
 *   - float32 forward: out within 2e-5 (1 + |out|), lse within 2e-5 (1 + |lse|), also against
 *     the double precision reference (tests/reference.c) where that is cheap;
 *   - bf16/f16 forward (dmattn.h's exception (1): P rounded to the storage type before P V):
 *     out within 2^-8 max_j |v_j| + one storage ulp, lse within 1e-4 + 1e-5 |lse|;
 *   - empty rows (CPU lse -inf): out exactly 0 and lse exactly -inf;
 *   - backward, given the same out and lse (the CPU forward's) and dout: each gradient entry
 *     within 1e-6 + 1e-4 mag, mag the entry's sum with every factor taken absolute (computed
 *     by tests/reference_backward.c; backward_cases.h explains why that is the scale of float32
 *     rounding); bf16/f16 within 1e-6 + (1e-4 + 2^-8) mag (exception (3): the tensor-core
 *     backward rounds P and dS to the storage type before the products, a relative error of at
 *     most 2^-8 each, and every |dS| or |P| factor is in mag); entries no selected pair reaches
 *     exactly 0; a second GPU run gives the same out, lse and dq bit for bit, and dk, dv,
 *     dbias within 1e-6 mag (exception (2): atomic adds).
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "reference.h"
#include "reference_backward.h"
#include "test_cuda.h"

#if DMATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

#define F32_TOL 2e-5
#define BWD_ATOL 1e-6
#define BWD_RTOL 1e-4
#define BWD16_RTOL (1e-4 + 1.0 / 256) /* + one rounding of P or dS to bf16 */
#define RERUN_RTOL 1e-6
#define REF_MAX_WORK 3e7 /* B Hq Lq Lk D up to which the double references run */

typedef enum bias_kind { BIAS_NONE, BIAS_KEY, BIAS_ROW } bias_kind;

typedef struct gcase {
    dma_dtype dt;
    int64_t B, Lq, Lk, Hq, Hkv, D;
    int causal;
    float scale, softcap;
    bias_kind bias;
    int64_t Bb, Hb;  /* bias (Bb, Hb, 1 or Lq, Lk) */
    int neginf;      /* 1: -inf at some bias entries; 2: also whole bias rows of -inf */
    int64_t window;  /* >= 0: a top-k object (causal: the GPU builder); -1: sp = NULL */
    int64_t Bs, Hs;  /* the object's B and H */
    int mask_causal; /* the builder's causal flag */
    int quant;       /* builder bias of small integers (ties) */
    int64_t Bp;      /* the builder's key padding (Bp, Lk); 0: none */
    int64_t pad;     /* > 0: every tensor's rows padded (strided views; gaps must stay) */
    int64_t gpad;    /* > 0: the gradients' rows padded by this instead (their atomic adds
                      * take 4, 2 or 1 floats at a time by alignment) */
    int no_dbias;    /* backward: a bias but dbias = NULL */
    uint64_t seed;
} gcase;

static const char *gdesc(const gcase *c)
{
    static char buf[512];
    snprintf(buf, sizeof buf, "{dt=%d B=%lld Lq=%lld Lk=%lld Hq=%lld Hkv=%lld D=%lld causal=%d "
             "scale=%g softcap=%g bias=%d (%lld,%lld) neginf=%d window=%lld Bs=%lld Hs=%lld "
             "mask_causal=%d quant=%d Bp=%lld pad=%lld gpad=%lld no_dbias=%d seed=%llu}",
             (int)c->dt, (long long)c->B, (long long)c->Lq, (long long)c->Lk, (long long)c->Hq,
             (long long)c->Hkv, (long long)c->D, c->causal, (double)c->scale,
             (double)c->softcap, (int)c->bias, (long long)c->Bb, (long long)c->Hb, c->neginf,
             (long long)c->window, (long long)c->Bs, (long long)c->Hs, c->mask_causal, c->quant,
             (long long)c->Bp, (long long)c->pad, (long long)c->gpad, c->no_dbias,
             (unsigned long long)c->seed);
    return buf;
}

/* ------------------------------------------------------------------------------------------ */
/* Data                                                                                       */
/* ------------------------------------------------------------------------------------------ */

typedef struct gdata {
    tbuf q, k, v, out, lse, bias, mbias, kpad, dout, dq, dk, dv, dbias;
    float *fq, *fk, *fv, *fbias, *fdout; /* the stored values, logical order */
    int own_mbias;                       /* the builder's bias is mbias, not bias */
    dma_sparsity *spc, *spg;             /* built by the CPU and by the GPU context */
    uint8_t *sel;                        /* the CPU object's dense selection */
    int64_t sB, sH;
} gdata;

static float *fill(test_rng *r, tbuf *t, float lo, float hi)
{
    float *v = test_malloc((size_t)tb_count(t) * sizeof(float));
    for (int64_t x = 0; x < tb_count(t); x++)
        v[x] = rng_float(r, lo, hi);
    tb_store(t, v);
    return v;
}

static void make4(tbuf *t, dma_dtype dt, int64_t a, int64_t b, int64_t c, int64_t d, int64_t pad)
{
    const int64_t s[4] = {a, b, c, d};
    tb_make(t, dt, 4, s, pad);
}

static void gdata_make(const gcase *c, gdata *g, dma_context *cpu, dma_context *gpu, int grads)
{
    test_rng r = rng_make(c->seed);
    const int64_t B = c->B, Lq = c->Lq, Lk = c->Lk, Hq = c->Hq, Hkv = c->Hkv, D = c->D;
    const int64_t Lb = c->bias == BIAS_ROW ? Lq : 1;
    memset(g, 0, sizeof *g);
    make4(&g->q, c->dt, B, Lq, Hq, D, c->pad);
    make4(&g->k, c->dt, B, Lk, Hkv, D, c->pad);
    make4(&g->v, c->dt, B, Lk, Hkv, D, c->pad);
    make4(&g->out, c->dt, B, Lq, Hq, D, c->pad);
    const int64_t ls[3] = {B, Hq, Lq};
    tb_make(&g->lse, DMA_F32, 3, ls, c->pad ? 2 : 0);
    g->fq = fill(&r, &g->q, -1.0f, 1.0f);
    g->fk = fill(&r, &g->k, -1.0f, 1.0f);
    g->fv = fill(&r, &g->v, -1.0f, 1.0f);
    if (c->bias != BIAS_NONE) {
        make4(&g->bias, DMA_F32, c->Bb, c->Hb, Lb, Lk, c->pad);
        g->fbias = test_malloc((size_t)tb_count(&g->bias) * sizeof(float));
        for (int64_t x = 0; x < tb_count(&g->bias); x++) {
            g->fbias[x] = rng_float(&r, -2.0f, 2.0f);
            if (c->neginf && rng_bernoulli(&r, 0.2))
                g->fbias[x] = -INFINITY;
            if (c->neginf == 2 && (x / Lk) % 5 == 1) /* every fifth bias row: nothing visible */
                g->fbias[x] = -INFINITY;
        }
        tb_store(&g->bias, g->fbias);
    }
    if (grads) {
        make4(&g->dout, c->dt, B, Lq, Hq, D, c->pad);
        g->fdout = fill(&r, &g->dout, -1.0f, 1.0f);
        const int64_t gp = c->gpad > 0 ? c->gpad : c->pad;
        make4(&g->dq, DMA_F32, B, Lq, Hq, D, gp);
        make4(&g->dk, DMA_F32, B, Lk, Hkv, D, gp);
        make4(&g->dv, DMA_F32, B, Lk, Hkv, D, gp);
        if (c->bias != BIAS_NONE)
            make4(&g->dbias, DMA_F32, c->Bb, c->Hb, Lb, Lk, gp);
    }
    if (c->window < 0)
        return;
    /* the top-k object: from the attention bias when it is a per-key bias of fitting shape
     * (the DMA way), else from a bias of its own */
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = c->mask_causal, .window = c->window};
    g->own_mbias = !(c->bias == BIAS_KEY && (c->Bb == 1 || c->Bb == c->Bs) &&
                     (c->Hb == 1 || c->Hb == c->Hs));
    tbuf *mb = &g->bias;
    if (g->own_mbias) {
        make4(&g->mbias, DMA_F32, c->Bs, c->Hs, 1, Lk, 0);
        float *v = test_malloc((size_t)tb_count(&g->mbias) * sizeof(float));
        for (int64_t x = 0; x < tb_count(&g->mbias); x++)
            v[x] = c->quant ? (float)rng_int(&r, -2, 2) : rng_float(&r, -1.0f, 1.0f);
        tb_store(&g->mbias, v);
        free(v);
        mb = &g->mbias;
    }
    if (c->Bp) {
        const int64_t ps[2] = {c->Bp, Lk};
        tb_make(&g->kpad, DMA_BOOL, 2, ps, 0);
        float *v = test_malloc((size_t)tb_count(&g->kpad) * sizeof(float));
        for (int64_t x = 0; x < tb_count(&g->kpad); x++)
            v[x] = (float)!rng_bernoulli(&r, 0.2);
        tb_store(&g->kpad, v);
        free(v);
    }
    dma_status st = dma_sparsity_build(cpu, &mp, c->Bs, c->Hs, Lq, Lk, &mb->th,
                                       c->Bp ? &g->kpad.th : NULL, &g->spc);
    ck_assert_msg(st == DMA_OK, "CPU build: %s (%s) %s", dma_status_string(st),
                  dma_context_last_error(cpu), gdesc(c));
    st = dma_sparsity_build(gpu, &mp, c->Bs, c->Hs, Lq, Lk, &mb->td, c->Bp ? &g->kpad.td : NULL,
                            &g->spg);
    ck_assert_msg(st == DMA_OK, "GPU build: %s (%s) %s", dma_status_string(st),
                  dma_context_last_error(gpu), gdesc(c));
    REQUIRE(dma_sparsity_nnz(g->spc) == dma_sparsity_nnz(g->spg), "objects differ: %s", gdesc(c));
    size_t n;
    g->sel = sp_dense(g->spc, &n);
    dma_sparsity_shape(g->spc, &g->sB, &g->sH, NULL, NULL);
}

static void gdata_free(gdata *g)
{
    tbuf *all[] = {&g->q, &g->k, &g->v, &g->out, &g->lse, &g->bias, &g->mbias, &g->kpad,
                   &g->dout, &g->dq, &g->dk, &g->dv, &g->dbias};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i]->host)
            tb_free(all[i]);
    free(g->fq); free(g->fk); free(g->fv); free(g->fbias); free(g->fdout); free(g->sel);
    dma_sparsity_destroy(g->spc);
    dma_sparsity_destroy(g->spg);
}

static ref_fwd_args ref_args(const gcase *c, const gdata *g)
{
    ref_fwd_args a = {.B = c->B, .Lq = c->Lq, .Lk = c->Lk, .Hq = c->Hq, .Hkv = c->Hkv,
                      .D = c->D, .q = g->fq, .k = g->fk, .v = g->fv,
                      .bias = c->bias != BIAS_NONE ? g->fbias : NULL, .Bb = c->Bb, .Hb = c->Hb,
                      .Lb = c->bias == BIAS_ROW ? c->Lq : 1, .sel = g->sel, .Bs = g->sB,
                      .Hs = g->sH, .causal = c->causal, .scale = c->scale,
                      .softcap = c->softcap};
    return a;
}

static double work(const gcase *c)
{
    return (double)c->B * c->Hq * c->Lq * c->Lk * c->D;
}

/* ------------------------------------------------------------------------------------------ */
/* Forward                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* One step of the storage type at x (the spacing of the binade of |x|; subnormals: the
 * smallest). */
static double storage_ulp(double x, dma_dtype dt)
{
    const int mant = dt == DMA_BF16 ? 7 : 10;
    const double minnorm = dt == DMA_BF16 ? ldexp(1.0, -126) : ldexp(1.0, -14);
    if (fabs(x) < minnorm)
        return ldexp(minnorm, -mant);
    int e;
    frexp(fabs(x), &e);
    return ldexp(1.0, e - 1 - mant);
}

static dma_status gpu_forward(dma_context *gpu, const gcase *c, gdata *g, const dma_sparsity *sp)
{
    dma_attn_params ap = {.scale = c->scale, .softcap = c->softcap, .causal = c->causal};
    tb_reset(&g->out);
    tb_reset(&g->lse);
    dma_status st = dma_forward(gpu, &g->q.td, &g->k.td, &g->v.td,
                                c->bias != BIAS_NONE ? &g->bias.td : NULL, sp, &ap, &g->out.td,
                                &g->lse.td);
    tb_download(&g->out);
    tb_download(&g->lse);
    return st;
}

/* Runs both forwards and compares; leaves the CPU's out and lse in the host images. */
static void forward_check(const gcase *c, gdata *g, dma_context *cpu, dma_context *gpu)
{
    const int64_t B = c->B, Lq = c->Lq, Hq = c->Hq, Hkv = c->Hkv, D = c->D, Lk = c->Lk;
    dma_attn_params ap = {.scale = c->scale, .softcap = c->softcap, .causal = c->causal};
    dma_status st = dma_forward(cpu, &g->q.th, &g->k.th, &g->v.th,
                                c->bias != BIAS_NONE ? &g->bias.th : NULL, g->spc, &ap,
                                &g->out.th, &g->lse.th);
    ck_assert_msg(st == DMA_OK, "CPU forward: %s (%s) %s", dma_status_string(st),
                  dma_context_last_error(cpu), gdesc(c));
    st = gpu_forward(gpu, c, g, g->spg);
    ck_assert_msg(st == DMA_OK, "GPU forward: %s (%s) %s", dma_status_string(st),
                  dma_context_last_error(gpu), gdesc(c));
    REQUIRE(tb_gaps_untouched(&g->out, g->out.back) && tb_gaps_untouched(&g->lse, g->lse.back),
            "GPU forward wrote outside its view %s", gdesc(c));

    /* max_j |v_jd| per (b, kv head, d): the scale of the P rounding error */
    double *vmax = test_calloc((size_t)(B * Hkv * D), sizeof(double));
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < Lk; j++)
            for (int64_t x = 0; x < Hkv * D; x++)
                vmax[b * Hkv * D + x] = fmax(vmax[b * Hkv * D + x],
                                             fabs(g->fv[(b * Lk + j) * Hkv * D + x]));
    double *oref = NULL, *lref = NULL;
    if (c->dt == DMA_F32 && work(c) <= REF_MAX_WORK) {
        oref = test_malloc((size_t)(B * Lq * Hq * D) * sizeof(double));
        lref = test_malloc((size_t)(B * Hq * Lq) * sizeof(double));
        ref_fwd_args ra = ref_args(c, g);
        ref_forward(&ra, oref, lref);
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t i = 0; i < Lq; i++) {
                const int64_t li = (b * Hq + h) * Lq + i;
                const double lc = tb_at(&g->lse, g->lse.host, li);
                const double lg = tb_at(&g->lse, g->lse.back, li);
                const int empty = isinf(lc) && lc < 0;
                if (empty) {
                    REQUIRE(isinf(lg) && lg < 0, "empty row b=%lld h=%lld i=%lld: GPU lse %g %s",
                            (long long)b, (long long)h, (long long)i, lg, gdesc(c));
                } else {
                    const double tol = c->dt == DMA_F32 ? F32_TOL * (1 + fabs(lc))
                                                        : 1e-4 + 1e-5 * fabs(lc);
                    REQUIRE(isfinite(lg) && fabs(lg - lc) <= tol,
                            "lse b=%lld h=%lld i=%lld: GPU %.9g, CPU %.9g %s", (long long)b,
                            (long long)h, (long long)i, lg, lc, gdesc(c));
                    stat_note(c->dt == DMA_F32 ? "fwd f32 lse" : "fwd 16-bit lse",
                              fabs(lg - lc), tol);
                    if (lref) {
                        REQUIRE(fabs(lg - lref[li]) <= F32_TOL * (1 + fabs(lref[li])),
                                "lse b=%lld h=%lld i=%lld: GPU %.9g, reference %.9g %s",
                                (long long)b, (long long)h, (long long)i, lg, lref[li], gdesc(c));
                        stat_note("fwd f32 lse vs ref", fabs(lg - lref[li]),
                                  F32_TOL * (1 + fabs(lref[li])));
                    }
                }
                for (int64_t d = 0; d < D; d++) {
                    const int64_t x = ((b * Lq + i) * Hq + h) * D + d;
                    const double oc = tb_at(&g->out, g->out.host, x);
                    const double og = tb_at(&g->out, g->out.back, x);
                    if (empty) {
                        REQUIRE(og == 0.0, "empty row b=%lld h=%lld i=%lld d=%lld: GPU out %g %s",
                                (long long)b, (long long)h, (long long)i, (long long)d, og,
                                gdesc(c));
                        continue;
                    }
                    const double tol =
                        c->dt == DMA_F32
                            ? F32_TOL * (1 + fabs(oc))
                            : ldexp(vmax[(b * Hkv + h / (Hq / Hkv)) * D + d], -8) +
                                  storage_ulp(fmax(fabs(oc), fabs(og)), c->dt);
                    REQUIRE(isfinite(og) && fabs(og - oc) <= tol,
                            "out b=%lld i=%lld h=%lld d=%lld: GPU %.9g, CPU %.9g (tol %.3g) %s",
                            (long long)b, (long long)i, (long long)h, (long long)d, og, oc, tol,
                            gdesc(c));
                    stat_note(c->dt == DMA_F32 ? "fwd f32 out" : "fwd 16-bit out",
                              fabs(og - oc), tol);
                    if (oref) {
                        const double t2 = F32_TOL * (1 + fabs(oref[x]));
                        REQUIRE(fabs(og - oref[x]) <= t2,
                                "out b=%lld i=%lld h=%lld d=%lld: GPU %.9g, reference %.9g %s",
                                (long long)b, (long long)i, (long long)h, (long long)d, og,
                                oref[x], gdesc(c));
                        stat_note("fwd f32 out vs ref", fabs(og - oref[x]), t2);
                    }
                }
            }
    free(vmax);
    free(oref);
    free(lref);

    /* a second GPU run: bitwise the same */
    unsigned char *o1 = test_malloc(g->out.bytes), *l1 = test_malloc(g->lse.bytes);
    memcpy(o1, g->out.back, g->out.bytes);
    memcpy(l1, g->lse.back, g->lse.bytes);
    ck_assert_int_eq(gpu_forward(gpu, c, g, g->spg), DMA_OK);
    REQUIRE(memcmp(o1, g->out.back, g->out.bytes) == 0 &&
            memcmp(l1, g->lse.back, g->lse.bytes) == 0,
            "GPU forward: out or lse differ between two runs %s", gdesc(c));
    free(o1);
    free(l1);
}

/* ------------------------------------------------------------------------------------------ */
/* Backward                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static dma_status gpu_backward(dma_context *gpu, const gcase *c, gdata *g)
{
    dma_attn_params ap = {.scale = c->scale, .softcap = c->softcap, .causal = c->causal};
    const int db = c->bias != BIAS_NONE && !c->no_dbias;
    tbuf *grads[] = {&g->dq, &g->dk, &g->dv, &g->dbias};
    for (int i = 0; i < 3 + db; i++)
        tb_reset(grads[i]);
    dma_status st = dma_backward(gpu, &g->q.td, &g->k.td, &g->v.td,
                                 c->bias != BIAS_NONE ? &g->bias.td : NULL, g->spg, &ap,
                                 &g->out.td, &g->lse.td, &g->dout.td, &g->dq.td, &g->dk.td,
                                 &g->dv.td, db ? &g->dbias.td : NULL);
    for (int i = 0; i < 3 + db; i++)
        tb_download(grads[i]);
    return st;
}

/* GPU (back image) against CPU (host image) within BWD_ATOL + BWD_RTOL mag (BWD16_RTOL for
 * 16-bit inputs); entries no pair
 * reaches (live[x / per] == 0) exactly 0 on the GPU. */
static void grad_check(const char *name, const tbuf *t, const double *mag, const uint8_t *live,
                       int64_t per, const gcase *c)
{
    REQUIRE(tb_gaps_untouched(t, t->back), "GPU %s written outside its view %s", name, gdesc(c));
    for (int64_t x = 0; x < tb_count(t); x++) {
        const double gc = tb_at(t, t->host, x), gg = tb_at(t, t->back, x);
        if (!live[x / per]) {
            REQUIRE(gg == 0.0, "%s[%lld]: GPU %g where no selected pair reaches (CPU %g) %s",
                    name, (long long)x, gg, gc, gdesc(c));
            continue;
        }
        const double tol = BWD_ATOL + (c->dt == DMA_F32 ? BWD_RTOL : BWD16_RTOL) * mag[x];
        REQUIRE(isfinite(gg) && fabs(gg - gc) <= tol,
                "%s[%lld]: GPU %.9g, CPU %.9g, tolerance %.3g %s", name, (long long)x, gg, gc, tol,
                gdesc(c));
        stat_note(name, fabs(gg - gc), tol);
    }
}

static void backward_check(const gcase *c, gdata *g, dma_context *cpu, dma_context *gpu)
{
    const int db = c->bias != BIAS_NONE && !c->no_dbias;
    /* both backwards read the CPU forward's out and lse */
    tb_upload(&g->out);
    tb_upload(&g->lse);
    dma_attn_params ap = {.scale = c->scale, .softcap = c->softcap, .causal = c->causal};
    dma_status st = dma_backward(cpu, &g->q.th, &g->k.th, &g->v.th,
                                 c->bias != BIAS_NONE ? &g->bias.th : NULL, g->spc, &ap,
                                 &g->out.th, &g->lse.th, &g->dout.th, &g->dq.th, &g->dk.th,
                                 &g->dv.th, db ? &g->dbias.th : NULL);
    ck_assert_msg(st == DMA_OK, "CPU backward: %s (%s) %s", dma_status_string(st),
                  dma_context_last_error(cpu), gdesc(c));
    st = gpu_backward(gpu, c, g);
    ck_assert_msg(st == DMA_OK, "GPU backward: %s (%s) %s", dma_status_string(st),
                  dma_context_last_error(gpu), gdesc(c));

    /* the scale of each entry's rounding error, and which entries must be 0 */
    const size_t nq = (size_t)tb_count(&g->dq), nk = (size_t)tb_count(&g->dk);
    const size_t nb = c->bias != BIAS_NONE ? (size_t)tb_count(&g->dbias) : 1;
    ref_bwd_out o = {
        .dq = test_malloc(nq * 8), .dk = test_malloc(nk * 8), .dv = test_malloc(nk * 8),
        .dbias = test_malloc(nb * 8), .live_q = test_malloc(nq), .live_kv = test_malloc(nk),
        .live_bias = test_malloc(nb), .dq_mag = test_malloc(nq * 8),
        .dk_mag = test_malloc(nk * 8), .dv_mag = test_malloc(nk * 8),
        .dbias_mag = test_malloc(nb * 8)};
    ref_fwd_args ra = ref_args(c, g);
    ref_backward(&ra, g->fdout, &o);
    static const char *names_of[3][4] = {
        {"bwd f32 dq", "bwd f32 dk", "bwd f32 dv", "bwd f32 dbias"},
        {"bwd bf16 dq", "bwd bf16 dk", "bwd bf16 dv", "bwd bf16 dbias"},
        {"bwd f16 dq", "bwd f16 dk", "bwd f16 dv", "bwd f16 dbias"}};
    const char **gn = names_of[c->dt == DMA_F32 ? 0 : c->dt == DMA_BF16 ? 1 : 2];
    grad_check(gn[0], &g->dq, o.dq_mag, o.live_q, c->D, c);
    grad_check(gn[1], &g->dk, o.dk_mag, o.live_kv, c->D, c);
    grad_check(gn[2], &g->dv, o.dv_mag, o.live_kv, c->D, c);
    if (db)
        grad_check(gn[3], &g->dbias, o.dbias_mag, o.live_bias, 1, c);

    /* a second run: dq bit for bit, dk, dv and dbias within RERUN_RTOL mag */
    tbuf *grads[] = {&g->dq, &g->dk, &g->dv, &g->dbias};
    const double *mags[] = {o.dq_mag, o.dk_mag, o.dv_mag, o.dbias_mag};
    unsigned char *first[4];
    for (int i = 0; i < 3 + db; i++) {
        first[i] = test_malloc(grads[i]->bytes);
        memcpy(first[i], grads[i]->back, grads[i]->bytes);
    }
    ck_assert_int_eq(gpu_backward(gpu, c, g), DMA_OK);
    REQUIRE(memcmp(first[0], g->dq.back, g->dq.bytes) == 0, "dq differs between runs %s",
            gdesc(c));
    static const char *names[] = {"dq", "dk", "dv", "dbias"};
    for (int i = 1; i < 3 + db; i++) {
        for (int64_t x = 0; x < tb_count(grads[i]); x++) {
            const double a = tb_at(grads[i], first[i], x), b = tb_at(grads[i], grads[i]->back, x);
            const double tol = RERUN_RTOL * mags[i][x];
            REQUIRE(fabs(a - b) <= tol || a == b, "%s[%lld] differs between runs: %.9g, %.9g %s",
                    names[i], (long long)x, a, b, gdesc(c));
            stat_note("bwd rerun dk/dv/dbias", fabs(a - b), tol);
        }
    }
    for (int i = 0; i < 3 + db; i++)
        free(first[i]);
    free(o.dq); free(o.dk); free(o.dv); free(o.dbias); free(o.live_q); free(o.live_kv);
    free(o.live_bias); free(o.dq_mag); free(o.dk_mag); free(o.dv_mag); free(o.dbias_mag);
}

/* ------------------------------------------------------------------------------------------ */
/* Cases                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static const int64_t DIMS[] = {1, 13, 64, 80, 128, 256};

/* A random case: max_work bounds B Hq Lq Lk D, max_pairs B Hq Lq Lk (per-row biases). */
static gcase random_case(test_rng *r, dma_dtype dt, int64_t D, double max_work,
                         double max_pairs)
{
    static const int64_t heads[][2] = {{8, 2}, {8, 1}, {4, 4}, {1, 1}, {6, 3}};
    static const int64_t lens[] = {1, 5, 17, 63, 64, 65, 100, 129, 257, 300, 517, 1000};
    gcase c;
    memset(&c, 0, sizeof c);
    c.dt = dt;
    c.D = D;
    c.seed = rng_u64(r);
    const int hp = (int)rng_int(r, 0, 4);
    c.Hq = heads[hp][0];
    c.Hkv = heads[hp][1];
    c.B = rng_int(r, 1, 2);
    c.Lq = rng_pick(r, lens, 12);
    c.Lk = rng_bernoulli(r, 0.3) ? c.Lq : rng_pick(r, lens, 12);
    while (work(&c) > max_work || work(&c) / (double)D > max_pairs) {
        if (c.Lq >= c.Lk)
            c.Lq = (c.Lq + 1) / 2;
        else
            c.Lk = (c.Lk + 1) / 2;
    }
    c.causal = rng_bernoulli(r, 0.6);
    if (rng_bernoulli(r, 0.3)) {
        const float s[] = {0.5f, 2.0f, 0.05f};
        c.scale = s[rng_int(r, 0, 2)] / sqrtf((float)D);
    }
    if (rng_bernoulli(r, 0.3)) {
        const float caps[] = {0.5f, 1.5f, 5.0f, 30.0f};
        c.softcap = caps[rng_int(r, 0, 3)];
    }
    const double u = rng_unit(r);
    c.bias = u < 0.2 ? BIAS_NONE : u < 0.7 ? BIAS_KEY : BIAS_ROW;
    c.Bb = rng_bernoulli(r, 0.6) ? c.B : 1;
    if (c.bias == BIAS_KEY) {
        c.Hb = rng_bernoulli(r, 0.7) ? c.Hkv : 1;
    } else if (c.bias == BIAS_ROW) {
        const int64_t hb[] = {c.Hq, c.Hq, c.Hkv, 1};
        c.Hb = rng_pick(r, hb, 4);
    }
    c.neginf = rng_bernoulli(r, 0.15) ? (int)rng_int(r, 1, 2) : 0;
    c.window = -1;
    c.Bs = c.Hs = 1;
    if (rng_bernoulli(r, 0.65)) {
        const int64_t w[] = {0, 1, 7, 64, 256, c.Lk, c.Lk + 3};
        c.window = rng_bernoulli(r, 0.05) ? 0 : w[rng_int(r, 1, 6)];
        c.mask_causal = rng_bernoulli(r, 0.85) ? c.causal : 1;
        c.Bs = rng_bernoulli(r, 0.7) ? c.B : 1;
        const int64_t hs[] = {c.Hkv, c.Hkv, 1, c.Hq};
        c.Hs = rng_pick(r, hs, 4);
        c.quant = rng_bernoulli(r, 0.5);
        const int64_t bp[] = {0, 0, 1, c.Bs};
        c.Bp = rng_pick(r, bp, 4);
    }
    c.pad = rng_bernoulli(r, 0.2) ? 3 : 0;
    c.no_dbias = c.bias != BIAS_NONE && rng_bernoulli(r, 0.1);
    return c;
}

static void run_cases(const gcase *cases, int n, int grads)
{
    dma_context *cpu = cpu_ctx(), *gpu = cuda_ctx(NULL);
    for (int i = 0; i < n; i++) {
        gdata g;
        gdata_make(&cases[i], &g, cpu, gpu, grads);
        forward_check(&cases[i], &g, cpu, gpu);
        if (grads)
            backward_check(&cases[i], &g, cpu, gpu);
        gdata_free(&g);
    }
    dma_context_destroy(cpu);
    dma_context_destroy(gpu);
}

START_TEST(forward_grid)
{
    static const dma_dtype dts[] = {DMA_F32, DMA_BF16, DMA_F16};
    test_rng r = rng_make(201);
    gcase cases[3 * 6 * 4];
    int n = 0;
    for (int t = 0; t < 3; t++)
        for (int d = 0; d < 6; d++)
            for (int v = 0; v < 4; v++)
                cases[n++] = random_case(&r, dts[t], DIMS[d], 4e7, 4e6);
    run_cases(cases, n, 0);
    stat_print("forward_grid");
}
END_TEST

/* A dense, non-causal case without bias: hand-picked cases set what they are about. */
static gcase plain_case(test_rng *r, dma_dtype dt, int64_t B, int64_t Lq, int64_t Lk,
                        int64_t Hq, int64_t Hkv, int64_t D)
{
    gcase c;
    memset(&c, 0, sizeof c);
    c.dt = dt, c.B = B, c.Lq = Lq, c.Lk = Lk, c.Hq = Hq, c.Hkv = Hkv, c.D = D;
    c.window = -1, c.Bs = c.Hs = 1, c.seed = rng_u64(r);
    return c;
}

/* A causal top-k object (B, H) over its own per-key bias. */
static void set_topk(gcase *c, int64_t window, int64_t Bs, int64_t Hs)
{
    c->causal = c->mask_causal = 1;
    c->window = window, c->Bs = Bs, c->Hs = Hs;
}

/* Hand-picked: long sequences, decode, Lq > Lk, empty objects, all -inf rows, MQA. */
START_TEST(forward_special)
{
    static const dma_dtype dts[] = {DMA_F32, DMA_BF16, DMA_F16};
    test_rng r = rng_make(202);
    gcase cases[3 * 7];
    int n = 0;
    for (int t = 0; t < 3; t++) {
        gcase c;
        /* the DMA case at length: causal top-256 of the per-key attention bias, GQA */
        c = plain_case(&r, dts[t], 1, 4097, 4097, 8, 2, 128);
        set_topk(&c, 256, 1, 2);
        c.bias = BIAS_KEY, c.Bb = 1, c.Hb = 2;
        cases[n++] = c;
        /* the dense causal path at length 1000, D = 256, MQA, softcap */
        c = plain_case(&r, dts[t], 1, 1000, 1000, 4, 1, 256);
        c.causal = 1, c.softcap = 30.0f;
        cases[n++] = c;
        /* decode: one row over 1000 keys, top-64, custom scale */
        c = plain_case(&r, dts[t], 2, 1, 1000, 8, 1, 80);
        set_topk(&c, 64, 2, 1);
        c.bias = BIAS_KEY, c.Bb = 2, c.Hb = 1, c.scale = 0.2f, c.Bp = 2;
        cases[n++] = c;
        /* Lq > Lk causal: leading rows see nothing; strided views */
        c = plain_case(&r, dts[t], 2, 300, 100, 4, 2, 13);
        c.causal = 1, c.pad = 3;
        cases[n++] = c;
        /* window 0: every row empty */
        c = plain_case(&r, dts[t], 1, 129, 129, 4, 4, 64);
        set_topk(&c, 0, 1, 4);
        cases[n++] = c;
        /* per-row bias with whole rows of -inf */
        c = plain_case(&r, dts[t], 2, 65, 200, 8, 2, 64);
        c.bias = BIAS_ROW, c.Bb = 2, c.Hb = 8, c.neginf = 2;
        cases[n++] = c;
        /* Lk = 1, D = 1 */
        c = plain_case(&r, dts[t], 2, 64, 1, 8, 2, 1);
        c.bias = BIAS_KEY, c.Bb = 1, c.Hb = 2;
        cases[n++] = c;
    }
    run_cases(cases, n, 0);
    stat_print("forward_special");
}
END_TEST

START_TEST(backward_grid)
{
    static const dma_dtype dts[] = {DMA_F32, DMA_BF16, DMA_F16};
    test_rng r = rng_make(203);
    gcase cases[3 * 6 * 3 + 3 * 4 + 2 * 3];
    int n = 0;
    for (int t = 0; t < 3; t++)
        for (int d = 0; d < 6; d++)
            for (int v = 0; v < 3; v++)
                cases[n++] = random_case(&r, dts[t], DIMS[d], 1.5e7, 2e6);
    /* every bias layout of the gradient: per-key, broadcast over the batch, per-row */
    for (int t = 0; t < 3; t++)
        for (int b = 0; b < 4; b++) {
            gcase c = plain_case(&r, dts[t], 2, 129, 300, 8, 2, 64);
            c.bias = b < 2 ? BIAS_KEY : BIAS_ROW;
            c.Bb = b % 2 ? 1 : 2;
            c.Hb = b < 2 ? 2 : 8;
            if (b != 3)
                set_topk(&c, 64, 2, 2);
            else
                c.causal = 1;
            cases[n++] = c;
        }
    /* the DMA case on tensor cores: many chunks, causal top-k of the per-key bias, GQA, dbias;
     * gradients of 16-byte aligned rows (4 floats an atomic add on sm_90), of rows padded by
     * 2 floats (8-byte aligned: 2 floats) and by 1 (one float) */
    for (int t = 1; t < 3; t++)
        for (int gpad = 0; gpad < 3; gpad++) {
            gcase c = plain_case(&r, dts[t], 1, 1100, 1100, 8, 2, 128);
            set_topk(&c, 200, 1, 2);
            c.bias = BIAS_KEY, c.Bb = 1, c.Hb = 2, c.gpad = gpad == 0 ? 0 : 3 - gpad;
            cases[n++] = c;
        }
    run_cases(cases, n, 1);
    stat_print("backward_grid");
}
END_TEST

START_TEST(stream_and_shared_object)
{
    /* a context on its own stream gives what the default stream's does, bit for bit, and an
     * object built on one context of the GPU serves another */
    cudaStream_t s;
    ck_assert_int_eq(cudaStreamCreate(&s), cudaSuccess);
    dma_context *cpu = cpu_ctx(), *g0 = cuda_ctx(NULL), *g1 = cuda_ctx((void *)s);
    test_rng r = rng_make(204);
    gcase c = plain_case(&r, DMA_BF16, 2, 517, 517, 8, 2, 128);
    set_topk(&c, 64, 2, 2);
    c.bias = BIAS_KEY, c.Bb = 2, c.Hb = 2;
    gdata g;
    gdata_make(&c, &g, cpu, g1, 1);
    ck_assert_int_eq(gpu_forward(g0, &c, &g, g.spg), DMA_OK);
    unsigned char *o0 = test_malloc(g.out.bytes), *q0 = test_malloc(g.dq.bytes);
    memcpy(o0, g.out.back, g.out.bytes);
    ck_assert_int_eq(gpu_forward(g1, &c, &g, g.spg), DMA_OK);
    ck_assert_msg(memcmp(o0, g.out.back, g.out.bytes) == 0, "out differs between streams");
    ck_assert_int_eq(gpu_backward(g0, &c, &g), DMA_OK); /* reads the GPU forward's out, lse */
    memcpy(q0, g.dq.back, g.dq.bytes);
    ck_assert_int_eq(gpu_backward(g1, &c, &g), DMA_OK);
    ck_assert_msg(memcmp(q0, g.dq.back, g.dq.bytes) == 0, "dq differs between streams");

    /* Forwards are stream-ordered: on a non-blocking stream (not ordered with the legacy
     * stream the downloads use) out is complete once that stream is synchronised, and an
     * object destroyed right after the call outlives the call's kernels. */
    cudaStream_t ns;
    ck_assert_int_eq(cudaStreamCreateWithFlags(&ns, cudaStreamNonBlocking), cudaSuccess);
    dma_context *g2 = cuda_ctx((void *)ns);
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = c.mask_causal, .window = c.window};
    dma_sparsity *sp2 = NULL;
    ck_assert_int_eq(dma_sparsity_build(g2, &mp, c.Bs, c.Hs, c.Lq, c.Lk, &g.bias.td, NULL, &sp2),
                     DMA_OK);
    dma_attn_params ap = {.scale = c.scale, .softcap = c.softcap, .causal = c.causal};
    tb_reset(&g.out);
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess); /* the reset has landed */
    ck_assert_int_eq(dma_forward(g2, &g.q.td, &g.k.td, &g.v.td, &g.bias.td, sp2, &ap, &g.out.td,
                                 NULL), DMA_OK);
    dma_sparsity_destroy(sp2);
    ck_assert_int_eq(cudaStreamSynchronize(ns), cudaSuccess);
    tb_download(&g.out);
    ck_assert_msg(memcmp(o0, g.out.back, g.out.bytes) == 0, "out differs on a non-blocking stream");
    /* A GPU build returns before its kernel ends: an object built on ns and used at once on the
     * legacy stream, which ns is not ordered with, gives the same out (the forward waits for the
     * object's build). */
    ck_assert_int_eq(dma_sparsity_build(g2, &mp, c.Bs, c.Hs, c.Lq, c.Lk, &g.bias.td, NULL, &sp2),
                     DMA_OK);
    ck_assert_int_eq(gpu_forward(g0, &c, &g, sp2), DMA_OK);
    ck_assert_msg(memcmp(o0, g.out.back, g.out.bytes) == 0,
                  "out differs with an object still being built on another stream");
    dma_sparsity_destroy(sp2);
    /* sp NULL: the dense object the call makes for itself is freed on the stream, after it */
    ck_assert_int_eq(dma_forward(g2, &g.q.td, &g.k.td, &g.v.td, NULL, NULL, &ap, &g.out.td, NULL),
                     DMA_OK);
    ck_assert_int_eq(cudaStreamSynchronize(ns), cudaSuccess);
    ck_assert_int_eq(cudaGetLastError(), cudaSuccess);
    dma_context_destroy(g2);
    ck_assert_int_eq(cudaStreamDestroy(ns), cudaSuccess);
    free(o0);
    free(q0);
    gdata_free(&g);
    dma_context_destroy(cpu);
    dma_context_destroy(g0);
    dma_context_destroy(g1);
    ck_assert_int_eq(cudaStreamDestroy(s), cudaSuccess);
}
END_TEST

void cuda_grid_add_tests(TCase *tc)
{
    tcase_add_test(tc, forward_grid);
    tcase_add_test(tc, forward_special);
    tcase_add_test(tc, backward_grid);
    tcase_add_test(tc, stream_and_shared_object);
}

#else
typedef int test_cuda_grid_needs_cuda; /* no CUDA runtime: nothing here (ISO C wants a decl) */
#endif /* DMATTN_HAVE_CUDA */

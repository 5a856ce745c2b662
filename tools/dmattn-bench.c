/*
 * dmattn-bench - benchmark of the dmattn forward against the library's own dense path and an
 * OpenBLAS dense attention, with an OpenBLAS SGEMM reference (DESIGN.md section 8).
 *
 * Every number is the median wall-clock time (CLOCK_MONOTONIC) of --runs timed calls after
 * --warmup untimed ones. GFLOP/s are *effective*: 4 * D * (selected (row, key) pairs over all
 * batches and query heads) / time, so a sparse run is credited only with the work it must do.
 *
 * Output: a table by default; with --json one JSON object per line per measurement (other tools
 * parse it: see --help for the fields, and tools/plot_bench.py).
 *
 * Fairness notes: dmattn and the OpenBLAS baseline get exactly --threads threads each. OpenBLAS
 * (pthreads build) workers busy-wait for a while after start-up and after each multi-threaded
 * call, stealing cores from OpenMP; the tool sleeps untimed until they are idle (settle_blas)
 * before timing anything else. The OpenBLAS kernel set is reported (blas_core) and checked.
 *
 * The backward (--backward): the dma forward and backward calls alternate (forward, backward,
 * forward, ...), so that the bwd/fwd ratio compares calls that saw the same machine: on a shared
 * machine whose speed drifts by 10-20% from second to second, two series timed one after the
 * other give a ratio that drifts as much. The dma backward line also gives the median of the
 * per-round ratios (backward call / the forward call just before it), which drift between
 * rounds does not move at all. Op "backward" lines for impl dma and dense time dma_backward()
 * on the out/lse their own forward produced (each impl has its own out and lse buffers), with a
 * random dout of a fixed seed; dq, dk, dv and dbias are allocated once per problem. dma uses the
 * bias and sparsity of its forward, causal=1, and asks for dbias whenever there is a bias (the
 * DMA bias is trainable); dense uses no sparsity, no bias and the dense forward's causal. Its
 * effective GFLOP/s count 10 * D flops per pair: 5 matmuls of 2 * D each (QK^T recomputed, dP,
 * dQ, dK, dV), i.e. 2.5x the forward's matrix work.
 *
 * Exit status: 0 success, 1 a library or allocation error (the library's status and last error
 * are printed), 2 a bad command line.
 */
#include <dmattn.h>

#include "bench_common.h"
#include "bench_decode.h"

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#ifdef DMATTN_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* Enumerations and names (the names are part of the output format)                          */
/* ------------------------------------------------------------------------------------------ */

enum mask_mode { MASK_TOPK, MASK_WINDOW, MASK_CAUSAL, MASK_DENSE };
static const char *const mask_names[] = {"topk", "window", "causal", "dense"};

enum op_kind { OP_FORWARD, OP_MASK_BUILD, OP_SGEMM, OP_BACKWARD };
static const char *const op_names[] = {"forward", "mask_build", "sgemm", "backward"};

enum impl_kind { IMPL_DMA, IMPL_DENSE, IMPL_OPENBLAS };
static const char *const impl_names[] = {"dma", "dense", "openblas"};

/* Rows per block of the OpenBLAS baseline (bounds its scratch to threads * ROWS * Lk floats). */
#define BLAS_ROWS 256

/* In the sweep, dense and openblas at L >= this are timed with 1 run and no warm-up. */
#define SWEEP_LONG_L 16384

#define MAX_LIST 32

typedef struct int_list {
    int n;
    int64_t v[MAX_LIST];
} int_list;

typedef struct options {
    int64_t B, Lq, Lk, Hq, Hkv, D, window;
    int threads;
    int mask;
    int runs, warmup;
    double max_ms;
    int json;
    int sgemm;
    int64_t sgemm_n;
    dma_isa isa;
    int no_dense, no_openblas;
    int sweep, sweep_quick;
    int backward;
    int_list sw_lens, sw_windows, sw_dims, sw_hkvs, sw_threads;
    /* --decode, --prefill CHUNK (bench_decode.c) */
    int decode;
    int64_t prefill;
    int ndtypes;
    dma_dtype dtypes[BENCH_MAX_DTYPES];
} options;

/* One measurement: one output line. Integer fields < 0 and double fields that are NaN print as
 * null in JSON (and "-" in the table). */
typedef struct result {
    int op, impl;
    const char *mask;     /* NULL for sgemm */
    int64_t B, Lq, Lk, Hq, Hkv, D, window;
    int causal;           /* -1: not applicable */
    int threads;
    const char *isa;
    int runs, warmup;
    double ms_median, ms_min, ms_max;
    double gflops;        /* NaN: not applicable */
    int64_t pairs;        /* (row, key) pairs credited, over all batches and query heads */
    /* dma lines */
    int64_t nnz;          /* dma_sparsity_nnz of the object (its own B and H) */
    double work_ratio;    /* dense (visible) pairs / dma pairs */
    double sparsity_bytes;
    /* ratios filled by link_results() */
    double pct_of_forward;      /* mask_build only */
    double speedup_vs_dense;    /* forward, backward lines: dense ms / this ms (same op) */
    double speedup_vs_openblas; /* forward lines: openblas ms / this ms (backward: none) */
    double gflops_vs_sgemm;     /* forward, backward: this gflops / sgemm gflops (same threads) */
    double bwd_fwd_ratio;       /* backward lines: this ms / the same impl's forward ms */
    double bwd_fwd_per_call;    /* dma backward: median of (backward call / forward call) */
    double max_abs_diff;        /* dense line: max |dense - openblas| */
    int64_t sgemm_n;
    const char *blas_core;      /* openblas lines: openblas_get_corename() */
} result;

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* Visible (row, key) pairs of one (batch, head): causal is bottom-right aligned. */
static int64_t visible_pairs(int64_t Lq, int64_t Lk, int causal)
{
    if (!causal)
        return Lq * Lk;
    int64_t off = Lk - Lq, sum = 0;
    for (int64_t i = 0; i < Lq; i++) {
        int64_t n = i + off + 1;
        sum += n < 0 ? 0 : (n > Lk ? Lk : n);
    }
    return sum;
}

/* Effective flops per selected (row, key) pair. Forward: QK^T and PV, 2 * D each. Backward:
 * 5 matmuls of 2 * D each, i.e. 10 * D = 2.5x the forward: the recomputed QK^T, dP = dout V^T,
 * dQ = dS K, dK = dS^T Q, dV = P^T dout (the elementwise softmax work is not counted). */
static double flops_per_pair(int op, int64_t D)
{
    if (op == OP_FORWARD)
        return 4.0 * (double)D;
    if (op == OP_BACKWARD)
        return 10.0 * (double)D;
    return 0.0;
}

static result new_result(int op, int impl, const char *isa, int threads, timing tm)
{
    result r;
    memset(&r, 0, sizeof r);
    r.op = op;
    r.impl = impl;
    r.mask = NULL;
    r.B = r.Lq = r.Lk = r.Hq = r.Hkv = r.D = r.window = -1;
    r.causal = -1;
    r.threads = threads;
    r.isa = isa;
    r.runs = tm.runs;
    r.warmup = tm.warmup;
    r.ms_median = tm.median;
    r.ms_min = tm.min;
    r.ms_max = tm.max;
    r.gflops = NAN;
    r.pairs = -1;
    r.nnz = -1;
    r.work_ratio = NAN;
    r.sparsity_bytes = NAN;
    r.pct_of_forward = NAN;
    r.speedup_vs_dense = NAN;
    r.speedup_vs_openblas = NAN;
    r.gflops_vs_sgemm = NAN;
    r.bwd_fwd_ratio = NAN;
    r.bwd_fwd_per_call = op == OP_BACKWARD ? tm.per_call : NAN;
    r.max_abs_diff = NAN;
    r.sgemm_n = -1;
    r.blas_core = NULL;
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* The problem: inputs and outputs of one shape                                               */
/* ------------------------------------------------------------------------------------------ */

/* Each impl has its own out and lse (lse: dma, lse_dense: dense), so that a backward always
 * reads what its own forward wrote. With `backward`, dout (random, fixed seed) and the gradients
 * dq, dk, dv, dbias are allocated too (once per problem; both backwards write them whole). */
typedef struct problem {
    int64_t B, Lq, Lk, Hq, Hkv, D;
    int64_t n_q, n_kv, n_bias, n_lse;
    int backward;
    float *q, *k, *v, *bias;
    float *out_dma, *out_dense, *out_blas, *lse, *lse_dense;
    float *dout, *dq, *dk, *dv, *dbias; /* NULL without backward */
    dma_tensor tq, tk, tv, tbias, tout_dma, tout_dense, tlse, tlse_dense;
    dma_tensor tdout, tdq, tdk, tdv, tdbias;
} problem;

static void problem_init(problem *p, int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,
                         int64_t D, int backward)
{
    memset(p, 0, sizeof *p);
    p->B = B;
    p->Lq = Lq;
    p->Lk = Lk;
    p->Hq = Hq;
    p->Hkv = Hkv;
    p->D = D;
    p->n_q = mul4(B, Lq, Hq, D, "q");
    p->n_kv = mul4(B, Lk, Hkv, D, "k/v");
    p->n_bias = mul4(B, Hkv, 1, Lk, "bias");
    p->n_lse = mul4(B, Hq, Lq, 1, "lse");
    p->q = xalloc(p->n_q, sizeof(float), "q");
    p->k = xalloc(p->n_kv, sizeof(float), "k");
    p->v = xalloc(p->n_kv, sizeof(float), "v");
    p->bias = xalloc(p->n_bias, sizeof(float), "bias");
    p->out_dma = xalloc(p->n_q, sizeof(float), "out (dma)");
    p->out_dense = xalloc(p->n_q, sizeof(float), "out (dense)");
    p->out_blas = xalloc(p->n_q, sizeof(float), "out (openblas)");
    p->lse = xalloc(p->n_lse, sizeof(float), "lse (dma)");
    p->lse_dense = xalloc(p->n_lse, sizeof(float), "lse (dense)");
    p->backward = backward;
    if (backward) {
        p->dout = xalloc(p->n_q, sizeof(float), "dout");
        p->dq = xalloc(p->n_q, sizeof(float), "dq");
        p->dk = xalloc(p->n_kv, sizeof(float), "dk");
        p->dv = xalloc(p->n_kv, sizeof(float), "dv");
        p->dbias = xalloc(p->n_bias, sizeof(float), "dbias");
        fill_uniform(p->dout, p->n_q, 5, -1.0f, 1.0f);
        memset(p->dq, 0, (size_t)p->n_q * sizeof(float));
        memset(p->dk, 0, (size_t)p->n_kv * sizeof(float));
        memset(p->dv, 0, (size_t)p->n_kv * sizeof(float));
        memset(p->dbias, 0, (size_t)p->n_bias * sizeof(float));
        p->tdout = dma_tensor_4d(p->dout, DMA_F32, B, Lq, Hq, D);
        p->tdq = dma_tensor_4d(p->dq, DMA_F32, B, Lq, Hq, D);
        p->tdk = dma_tensor_4d(p->dk, DMA_F32, B, Lk, Hkv, D);
        p->tdv = dma_tensor_4d(p->dv, DMA_F32, B, Lk, Hkv, D);
        p->tdbias = dma_tensor_4d(p->dbias, DMA_F32, B, Hkv, 1, Lk);
    }
    /* Fixed seeds: the same shape always gets the same data. */
    fill_uniform(p->q, p->n_q, 1, -1.0f, 1.0f);
    fill_uniform(p->k, p->n_kv, 2, -1.0f, 1.0f);
    fill_uniform(p->v, p->n_kv, 3, -1.0f, 1.0f);
    fill_uniform(p->bias, p->n_bias, 4, 0.0f, 1.0f); /* per-key bias (B, Hkv, 1, Lk) */
    memset(p->out_dma, 0, (size_t)p->n_q * sizeof(float));
    memset(p->out_dense, 0, (size_t)p->n_q * sizeof(float));
    memset(p->out_blas, 0, (size_t)p->n_q * sizeof(float));
    p->tq = dma_tensor_4d(p->q, DMA_F32, B, Lq, Hq, D);
    p->tk = dma_tensor_4d(p->k, DMA_F32, B, Lk, Hkv, D);
    p->tv = dma_tensor_4d(p->v, DMA_F32, B, Lk, Hkv, D);
    p->tbias = dma_tensor_4d(p->bias, DMA_F32, B, Hkv, 1, Lk);
    p->tout_dma = dma_tensor_4d(p->out_dma, DMA_F32, B, Lq, Hq, D);
    p->tout_dense = dma_tensor_4d(p->out_dense, DMA_F32, B, Lq, Hq, D);
    p->tlse = dma_tensor_3d(p->lse, DMA_F32, B, Hq, Lq);
    p->tlse_dense = dma_tensor_3d(p->lse_dense, DMA_F32, B, Hq, Lq);
}

static void problem_free(problem *p)
{
    free(p->q);
    free(p->k);
    free(p->v);
    free(p->bias);
    free(p->out_dma);
    free(p->out_dense);
    free(p->out_blas);
    free(p->lse);
    free(p->lse_dense);
    free(p->dout); /* the gradients are NULL without backward */
    free(p->dq);
    free(p->dk);
    free(p->dv);
    free(p->dbias);
    memset(p, 0, sizeof *p);
}

static void fill_shape(result *r, const problem *p)
{
    r->B = p->B;
    r->Lq = p->Lq;
    r->Lk = p->Lk;
    r->Hq = p->Hq;
    r->Hkv = p->Hkv;
    r->D = p->D;
}

static void set_gflops(result *r)
{
    double fl = flops_per_pair(r->op, r->D) * (double)r->pairs;
    r->gflops = r->ms_median > 0 ? fl / (r->ms_median * 1e6) : NAN;
}

/* Warn (stderr) when an output holds a NaN or an infinity: that is a library bug. */
static void check_finite(const float *x, int64_t n, const char *what)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++)
        bad += !isfinite(x[i]);
    if (bad)
        fprintf(stderr, PROG ": warning: %lld non-finite values in %s\n", (long long)bad, what);
}

/* ------------------------------------------------------------------------------------------ */
/* dmattn measurements                                                                        */
/* ------------------------------------------------------------------------------------------ */

typedef struct fwd_arg {
    dma_context *ctx;
    const problem *p;
    const dma_tensor *bias;
    const dma_sparsity *sp;
    dma_attn_params prm;
    dma_tensor *out;
    dma_tensor *lse;
} fwd_arg;

static void run_forward(void *a)
{
    fwd_arg *f = a;
    check(f->ctx, dma_forward(f->ctx, &f->p->tq, &f->p->tk, &f->p->tv, f->bias, f->sp, &f->prm,
                              f->out, f->lse),
          "dma_forward");
}

typedef struct bwd_arg {
    dma_context *ctx;
    const problem *p;
    const dma_tensor *bias;
    const dma_sparsity *sp;
    dma_attn_params prm;
    const dma_tensor *out, *lse;
    dma_tensor *dq, *dk, *dv, *dbias;
} bwd_arg;

static void run_backward(void *a)
{
    bwd_arg *g = a;
    check(g->ctx, dma_backward(g->ctx, &g->p->tq, &g->p->tk, &g->p->tv, g->bias, g->sp, &g->prm,
                               g->out, g->lse, &g->p->tdout, g->dq, g->dk, g->dv, g->dbias),
          "dma_backward");
}

/* Warn when a backward wrote a NaN or an infinity into a gradient. */
static void check_grads_finite(const problem *p, int with_dbias, const char *impl)
{
    char what[64];
    snprintf(what, sizeof what, "the %s dq", impl);
    check_finite(p->dq, p->n_q, what);
    snprintf(what, sizeof what, "the %s dk", impl);
    check_finite(p->dk, p->n_kv, what);
    snprintf(what, sizeof what, "the %s dv", impl);
    check_finite(p->dv, p->n_kv, what);
    if (with_dbias) {
        snprintf(what, sizeof what, "the %s dbias", impl);
        check_finite(p->dbias, p->n_bias, what);
    }
}

typedef struct build_arg {
    dma_context *ctx;
    dma_mask_params mp;
    int64_t B, H, Lq, Lk;
    const dma_tensor *bias;
    dma_sparsity *sp;
} build_arg;

static void build_before(void *a)
{
    build_arg *b = a;
    dma_sparsity_destroy(b->sp);
    b->sp = NULL;
}

static void run_build(void *a)
{
    build_arg *b = a;
    check(b->ctx, dma_sparsity_build(b->ctx, &b->mp, b->B, b->H, b->Lq, b->Lk, b->bias, NULL,
                                     &b->sp),
          "dma_sparsity_build");
}

/* The library's dense path: no sparsity, no bias; causal as asked. The lse is written (the
 * training forward; the backward needs it). */
static result measure_dense(dma_context *ctx, problem *p, int causal, runspec rs)
{
    fwd_arg f = {ctx, p, NULL, NULL, {0.0f, 0.0f, causal}, &p->tout_dense, &p->tlse_dense};
    timing tm = time_it(run_forward, NULL, &f, rs);
    result r = new_result(OP_FORWARD, IMPL_DENSE, dma_isa_name(dma_context_isa(ctx)),
                          dma_context_threads(ctx), tm);
    fill_shape(&r, p);
    r.mask = causal ? "causal" : "dense";
    r.causal = causal;
    r.pairs = visible_pairs(p->Lq, p->Lk, causal) * p->B * p->Hq;
    set_gflops(&r);
    check_finite(p->out_dense, p->n_q, "the dense output");
    return r;
}

/* The dense backward: dma_backward with no sparsity and no bias (so no dbias), causal as the
 * dense forward, on the out/lse that measure_dense() left (call it after that, same causal). */
static result measure_dense_backward(dma_context *ctx, problem *p, int causal, runspec rs)
{
    if (!p->backward)
        fatal("internal error: backward buffers were not allocated");
    bwd_arg g = {.ctx = ctx,
                 .p = p,
                 .bias = NULL,
                 .sp = NULL,
                 .prm = {0.0f, 0.0f, causal},
                 .out = &p->tout_dense,
                 .lse = &p->tlse_dense,
                 .dq = &p->tdq,
                 .dk = &p->tdk,
                 .dv = &p->tdv,
                 .dbias = NULL};
    timing tm = time_it(run_backward, NULL, &g, rs);
    result r = new_result(OP_BACKWARD, IMPL_DENSE, dma_isa_name(dma_context_isa(ctx)),
                          dma_context_threads(ctx), tm);
    fill_shape(&r, p);
    r.mask = causal ? "causal" : "dense";
    r.causal = causal;
    r.pairs = visible_pairs(p->Lq, p->Lk, causal) * p->B * p->Hq;
    set_gflops(&r);
    check_grads_finite(p, 0, "dense");
    return r;
}

/* The dma backward's arguments: dma_backward with the forward's bias, sparsity and params, on
 * the out/lse the dma forward leaves; dbias is requested whenever there is a bias (it is
 * trainable). */
static bwd_arg dma_backward_arg(dma_context *ctx, problem *p, const dma_tensor *bias,
                                const dma_sparsity *sp, dma_attn_params prm)
{
    if (!p->backward)
        fatal("internal error: backward buffers were not allocated");
    return (bwd_arg){.ctx = ctx,
                     .p = p,
                     .bias = bias,
                     .sp = sp,
                     .prm = prm,
                     .out = &p->tout_dma,
                     .lse = &p->tlse,
                     .dq = &p->tdq,
                     .dk = &p->tdk,
                     .dv = &p->tdv,
                     .dbias = bias ? &p->tdbias : NULL};
}

/* dma with a generated sparsity: mask_build line (res[0]) and forward line (res[1]); with
 * p->backward also a backward line (res[2]), timed while the sparsity object still exists.
 * topk: per-key bias (B, Hkv, 1, Lk), causal top-k, object (B, Hkv); the forward gets the bias.
 * window: sliding window, object (1, 1) (it is the same for every batch and head), no bias.
 * Both causal. Returns the number of lines written (2 or 3). */
static int measure_dma(dma_context *ctx, problem *p, int mask, int64_t window, runspec rs,
                       result res[3])
{
    const char *isa = dma_isa_name(dma_context_isa(ctx));
    int threads = dma_context_threads(ctx);
    build_arg b;
    memset(&b, 0, sizeof b);
    b.ctx = ctx;
    b.mp.kind = mask == MASK_TOPK ? DMA_MASK_TOPK : DMA_MASK_WINDOW;
    b.mp.causal = 1;
    b.mp.window = window;
    b.mp.block_size = 0;
    b.Lq = p->Lq;
    b.Lk = p->Lk;
    if (mask == MASK_TOPK) {
        b.B = p->B;
        b.H = p->Hkv;
        b.bias = &p->tbias;
    } else {
        b.B = 1;
        b.H = 1;
        b.bias = NULL;
    }
    timing tb = time_it(run_build, build_before, &b, rs);
    dma_sparsity *sp = b.sp; /* the object of the last timed build */

    int64_t sB = 0, sH = 0, sLq = 0, sLk = 0;
    dma_sparsity_shape(sp, &sB, &sH, &sLq, &sLk);
    if (sB < 1 || sH < 1 || p->B % sB || p->Hq % sH || sLq != p->Lq || sLk != p->Lk)
        fatal("dma_sparsity_shape gave (B=%lld, H=%lld, Lq=%lld, Lk=%lld) for a build of "
              "(%lld, %lld, %lld, %lld)",
              (long long)sB, (long long)sH, (long long)sLq, (long long)sLk, (long long)b.B,
              (long long)b.H, (long long)p->Lq, (long long)p->Lk);
    int64_t nnz = dma_sparsity_nnz(sp);
    if (nnz < 0)
        fatal("dma_sparsity_nnz returned %lld", (long long)nnz);
    int64_t pairs = nnz * (p->Hq / sH) * (p->B / sB);

    fwd_arg f = {ctx, p, mask == MASK_TOPK ? &p->tbias : NULL, sp, {0.0f, 0.0f, 1},
                 &p->tout_dma, &p->tlse};
    /* With the backward, forward and backward calls alternate (each backward runs on the
     * forward just before it), so that the bwd/fwd ratio compares like with like. */
    timing tfg[2];
    bwd_arg g;
    if (p->backward) {
        g = dma_backward_arg(ctx, p, f.bias, sp, f.prm);
        time_alternating(2, (bench_fn[]){run_forward, run_backward}, (void *[]){&f, &g}, NULL,
                         rs, tfg);
        check_grads_finite(p, f.bias != NULL, "dma");
    } else {
        tfg[0] = time_it(run_forward, NULL, &f, rs);
    }
    check_finite(p->out_dma, p->n_q, "the dma output");

    const int nres = p->backward ? 3 : 2;
    result *rb = &res[0], *rf = &res[1];
    *rb = new_result(OP_MASK_BUILD, IMPL_DMA, isa, threads, tb);
    *rf = new_result(OP_FORWARD, IMPL_DMA, isa, threads, tfg[0]);
    if (p->backward)
        res[2] = new_result(OP_BACKWARD, IMPL_DMA, isa, threads, tfg[1]);
    for (int i = 0; i < nres; i++) {
        result *r = &res[i];
        fill_shape(r, p);
        r->mask = mask_names[mask];
        r->window = window;
        r->causal = 1;
        r->nnz = nnz;
        r->pairs = pairs;
        r->work_ratio = pairs > 0 ? (double)(visible_pairs(p->Lq, p->Lk, 1) * p->B * p->Hq) /
                                        (double)pairs
                                  : NAN;
        r->sparsity_bytes = (double)dma_sparsity_bytes(sp);
    }
    rb->gflops = 0.0;
    set_gflops(rf);
    if (p->backward)
        set_gflops(&res[2]);
    dma_sparsity_destroy(sp);
    return nres;
}

/* ------------------------------------------------------------------------------------------ */
/* OpenBLAS baseline and SGEMM reference                                                      */
/* ------------------------------------------------------------------------------------------ */

#ifdef DMATTN_BENCH_HAVE_OPENBLAS

static const char *blas_core(void)
{
    const char *c = openblas_get_corename();
    return c ? c : "unknown";
}

/* OpenBLAS (pthreads build) picks its kernels from the CPU model; a model it does not know (a
 * VM that hides it, a new CPU) gets the generic "Prescott" kernels, several times slower, and
 * then the openblas and sgemm lines say nothing about the hardware. Seen on a 16-core Xeon VM. */
static void check_blas_core(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    static const char *const avx2_cores[] = {"haswell", "skylakex", "cooperlake",
                                             "sapphirerapids", "zen", "excavator"};
    const char *c = blas_core();
    int ok = 0;
    for (size_t i = 0; i < sizeof avx2_cores / sizeof *avx2_cores; i++)
        ok |= !strcasecmp(c, avx2_cores[i]);
    if (!ok && __builtin_cpu_supports("avx2"))
        fprintf(stderr,
                PROG ": warning: OpenBLAS uses its '%s' kernels although this CPU has AVX2 (it "
                     "does not recognise the CPU model): the openblas and sgemm lines are far "
                     "below the hardware. Set OPENBLAS_CORETYPE=Haswell (SkylakeX with "
                     "AVX-512) in the environment.\n",
                c);
#endif
}

/* OpenBLAS's worker threads busy-wait (sched_yield) for ~0.1 s after the library is loaded and
 * after every multi-threaded call before they sleep; meanwhile they steal cores from the OpenMP
 * threads of dmattn (seen: a 0.3 ms mask_build timed at 8 ms on a 16-core VM, a 0.1 ms forward
 * at 13 ms right after a 16-thread SGEMM). Wait for them to sleep before timing anything else. */
static void settle_blas(void)
{
    struct timespec ts = {0, 300 * 1000 * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* The softmax of the baseline is vectorised for the host like the GEMMs (OpenBLAS picks its
 * kernels at run time): clones for AVX-512, AVX2 and the baseline ISA on x86-64 Linux/GCC. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define BENCH_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define BENCH_CLONES
#endif

/* exp(x) for x <= 0 (the softmax argument), Cephes expf polynomial; rel. error ~2e-7;
 * branch-free so that the loops below vectorise. */
static inline __attribute__((always_inline)) float exp_neg(float x)
{
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest (|t| < 2^22) */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } u;
    u.i = ((int32_t)n + 127) << 23;
    return y * u.f;
}

/* Row i of a block: s[0..n) are scores, the rest of the row (to ncols) is masked. In place,
 * s becomes the probabilities (0 where masked). n == 0: an empty row, all 0 (out = 0). */
BENCH_CLONES static void softmax_rows(float *s, int64_t lds, int64_t m, const int64_t *nvis,
                                      int64_t ncols)
{
    for (int64_t r = 0; r < m; r++) {
        float *row = s + r * lds;
        int64_t n = nvis[r];
        if (n > 0) {
            float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < n; j++)
                mx = row[j] > mx ? row[j] : mx;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < n; j++) {
                float e = exp_neg(row[j] - mx);
                row[j] = e;
                sum += e;
            }
            float inv = 1.0f / sum;
#pragma omp simd
            for (int64_t j = 0; j < n; j++)
                row[j] *= inv;
        } else {
            n = 0;
        }
        if (ncols > n)
            memset(row + n, 0, (size_t)(ncols - n) * sizeof(float));
    }
}

typedef struct blas_arg {
    const problem *p;
    int causal;
    int threads;
    float *ws; /* threads * (BLAS_ROWS * Lk + BLAS_ROWS) floats */
    int64_t ws_per_thread;
} blas_arg;

/* Plain dense attention with OpenBLAS. Threading (the fairest simple way): OpenMP over the
 * independent (batch, query head, row block) items with exactly `threads` threads, each item
 * calling single-threaded cblas_sgemm (openblas_set_num_threads(1)); items are handed out
 * dynamically, longest (last, causal) row blocks first. Per item: S = scale Q_blk K^T over the
 * visible key prefix of the block (lda = Hq*D, ldb = Hkv*D thanks to BSHD), per-row masked
 * softmax, O_blk = P V written straight into out (ldc = Hq*D). */
static void run_blas(void *a)
{
    const blas_arg *ba = a;
    const problem *p = ba->p;
    const int64_t B = p->B, Lq = p->Lq, Lk = p->Lk, Hq = p->Hq, Hkv = p->Hkv, D = p->D;
    const int64_t group = Hq / Hkv, off = Lk - Lq;
    const int64_t nblk = (Lq + BLAS_ROWS - 1) / BLAS_ROWS, items = B * Hq * nblk;
    const float scale = 1.0f / sqrtf((float)D);
    const int causal = ba->causal;
    openblas_set_num_threads(1);
#pragma omp parallel for num_threads(ba->threads) schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
        /* all (batch, head) items of the last (longest, causal) row block first, then the next */
        const int64_t blk = nblk - 1 - it / (B * Hq), bh = it % (B * Hq);
        const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
        const int64_t i0 = blk * BLAS_ROWS;
        const int64_t m = Lq - i0 < BLAS_ROWS ? Lq - i0 : BLAS_ROWS;
        float *S = ba->ws + (int64_t)omp_get_thread_num() * ba->ws_per_thread;
        int64_t *nv = (int64_t *)(S + BLAS_ROWS * Lk);
        const float *Q = p->q + ((b * Lq + i0) * Hq + h) * D;
        const float *K = p->k + (b * Lk * Hkv + hk) * D;
        const float *V = p->v + (b * Lk * Hkv + hk) * D;
        float *O = p->out_blas + ((b * Lq + i0) * Hq + h) * D;
        int64_t ncols = Lk;
        if (causal) {
            ncols = i0 + m - 1 + off + 1;
            ncols = ncols < 0 ? 0 : (ncols > Lk ? Lk : ncols);
        }
        if (ncols == 0) {
            for (int64_t r = 0; r < m; r++)
                memset(O + r * Hq * D, 0, (size_t)D * sizeof(float));
            continue;
        }
        for (int64_t r = 0; r < m; r++) {
            int64_t n = ncols;
            if (causal) {
                n = i0 + r + off + 1;
                n = n < 0 ? 0 : (n > ncols ? ncols : n);
            }
            nv[r] = n;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)ncols, (int)D, scale,
                    Q, (int)(Hq * D), K, (int)(Hkv * D), 0.0f, S, (int)ncols);
        softmax_rows(S, ncols, m, nv, ncols);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)D, (int)ncols, 1.0f,
                    S, (int)ncols, V, (int)(Hkv * D), 0.0f, O, (int)(Hq * D));
    }
}

static result measure_openblas(problem *p, int causal, int threads, const char *isa, runspec rs)
{
    if (p->Lk > INT32_MAX / BLAS_ROWS || p->Hq * p->D > INT32_MAX)
        fatal("shape too large for the OpenBLAS baseline's int sizes");
    blas_arg ba;
    ba.p = p;
    ba.causal = causal;
    ba.threads = threads;
    /* scores block + the per-row visible counts (int64, 2 floats each), padded to 64 bytes */
    ba.ws_per_thread = ((BLAS_ROWS * p->Lk + 2 * BLAS_ROWS) + 15) / 16 * 16;
    ba.ws = xalloc(mul4(threads, ba.ws_per_thread, 1, 1, "openblas scratch"), sizeof(float),
                   "openblas scratch");
    timing tm = time_it(run_blas, NULL, &ba, rs);
    free(ba.ws);
    result r = new_result(OP_FORWARD, IMPL_OPENBLAS, isa, threads, tm);
    r.blas_core = blas_core();
    fill_shape(&r, p);
    r.mask = causal ? "causal" : "dense";
    r.causal = causal;
    r.pairs = visible_pairs(p->Lq, p->Lk, causal) * p->B * p->Hq;
    set_gflops(&r);
    return r;
}

typedef struct sgemm_arg {
    int64_t n;
    int threads;
    float *a, *b, *c;
} sgemm_arg;

static void run_sgemm(void *arg)
{
    sgemm_arg *s = arg;
    openblas_set_num_threads(s->threads);
    int n = (int)s->n;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, s->a, n, s->b, n, 0.0f,
                s->c, n);
}

/* C = A B, square N, single precision, OpenBLAS with exactly `threads` threads. */
static result measure_sgemm(int64_t n, int threads, const char *isa, runspec rs)
{
    sgemm_arg s;
    s.n = n;
    s.threads = threads;
    int64_t nn = mul4(n, n, 1, 1, "sgemm matrices");
    s.a = xalloc(nn, sizeof(float), "sgemm A");
    s.b = xalloc(nn, sizeof(float), "sgemm B");
    s.c = xalloc(nn, sizeof(float), "sgemm C");
    fill_uniform(s.a, nn, 11, -1.0f, 1.0f);
    fill_uniform(s.b, nn, 12, -1.0f, 1.0f);
    memset(s.c, 0, (size_t)nn * sizeof(float));
    timing tm = time_it(run_sgemm, NULL, &s, rs);
    openblas_set_num_threads(1);
    free(s.a);
    free(s.b);
    free(s.c);
    settle_blas(); /* its workers spin for a while after the last call */
    result r = new_result(OP_SGEMM, IMPL_OPENBLAS, isa, threads, tm);
    r.blas_core = blas_core();
    r.sgemm_n = n;
    r.gflops = tm.median > 0 ? 2.0 * (double)n * (double)n * (double)n / (tm.median * 1e6) : NAN;
    return r;
}

#define HAVE_OPENBLAS 1
#else
#define HAVE_OPENBLAS 0
static void check_blas_core(void)
{
}
static void settle_blas(void)
{
}
#endif /* DMATTN_BENCH_HAVE_OPENBLAS */

/* ------------------------------------------------------------------------------------------ */
/* Ratios between the lines of one shape                                                      */
/* ------------------------------------------------------------------------------------------ */

static int same_shape(const result *a, const result *b)
{
    return a->B == b->B && a->Lq == b->Lq && a->Lk == b->Lk && a->Hq == b->Hq &&
           a->Hkv == b->Hkv && a->D == b->D && a->threads == b->threads;
}

/* Fill speed-ups, the mask_build percentage and the SGEMM ratio among r[0..n) (any order);
 * sgemm may be NULL. Baselines are matched on the shape and thread count. */
static void link_results(result *r, int n, const result *sgemm)
{
    for (int i = 0; i < n; i++) {
        if (r[i].op != OP_FORWARD)
            continue;
        for (int j = 0; j < n; j++) {
            if (r[j].op != OP_FORWARD || !same_shape(&r[i], &r[j]) || r[j].ms_median <= 0)
                continue;
            if (r[j].impl == IMPL_DENSE)
                r[i].speedup_vs_dense = r[j].ms_median / r[i].ms_median;
            if (r[j].impl == IMPL_OPENBLAS)
                r[i].speedup_vs_openblas = r[j].ms_median / r[i].ms_median;
        }
        if (sgemm && sgemm->threads == r[i].threads && sgemm->gflops > 0)
            r[i].gflops_vs_sgemm = r[i].gflops / sgemm->gflops;
    }
    for (int i = 0; i < n; i++) {
        if (r[i].op != OP_MASK_BUILD)
            continue;
        for (int j = 0; j < n; j++)
            if (r[j].op == OP_FORWARD && r[j].impl == IMPL_DMA && same_shape(&r[i], &r[j]) &&
                r[j].window == r[i].window && r[j].mask == r[i].mask && r[j].ms_median > 0)
                r[i].pct_of_forward = 100.0 * r[i].ms_median / r[j].ms_median;
    }
    /* backward lines: vs the dense backward of the shape, and vs the forward of the same impl
     * (and, for dma, the same mask and window) */
    for (int i = 0; i < n; i++) {
        if (r[i].op != OP_BACKWARD || r[i].ms_median <= 0)
            continue;
        for (int j = 0; j < n; j++) {
            if (!same_shape(&r[i], &r[j]) || r[j].ms_median <= 0)
                continue;
            if (r[j].op == OP_BACKWARD && r[j].impl == IMPL_DENSE)
                r[i].speedup_vs_dense = r[j].ms_median / r[i].ms_median;
            if (r[j].op == OP_FORWARD && r[j].impl == r[i].impl && r[j].window == r[i].window &&
                r[j].causal == r[i].causal && r[j].mask && r[i].mask &&
                !strcmp(r[j].mask, r[i].mask))
                r[i].bwd_fwd_ratio = r[i].ms_median / r[j].ms_median;
        }
        if (sgemm && sgemm->threads == r[i].threads && sgemm->gflops > 0)
            r[i].gflops_vs_sgemm = r[i].gflops / sgemm->gflops;
    }
}

static double max_abs_diff(const float *a, const float *b, int64_t n)
{
    double m = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= m)) /* catches NaN too */
            m = d;
    }
    return m;
}

/* ------------------------------------------------------------------------------------------ */
/* Output                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static void print_json(const result *r)
{
    printf("{\"op\":\"%s\"", op_names[r->op]);
    json_str("impl", impl_names[r->impl]);
    json_str("mask", r->mask);
    json_int("B", r->B, 0);
    json_int("Lq", r->Lq, 0);
    json_int("Lk", r->Lk, 0);
    json_int("Hq", r->Hq, 0);
    json_int("Hkv", r->Hkv, 0);
    json_int("D", r->D, 0);
    json_int("window", r->window, 0);
    json_int("causal", r->causal, 0);
    json_int("threads", r->threads, 0);
    json_str("isa", r->isa);
    json_int("runs", r->runs, 0);
    json_int("warmup", r->warmup, 0);
    json_num("ms_median", r->ms_median);
    json_num("ms_min", r->ms_min);
    json_num("ms_max", r->ms_max);
    json_num("gflops", r->gflops);
    if (r->op != OP_SGEMM)
        json_int("pairs", r->pairs, 0);
    if (r->impl == IMPL_DMA) {
        json_int("nnz", r->nnz, 0);
        json_num("work_ratio", r->work_ratio);
        json_num("sparsity_bytes", r->sparsity_bytes);
    }
    if (r->op == OP_MASK_BUILD)
        json_num("pct_of_forward", r->pct_of_forward);
    if (r->op == OP_FORWARD || r->op == OP_BACKWARD) {
        json_num("speedup_vs_dense", r->speedup_vs_dense);
        json_num("speedup_vs_openblas", r->speedup_vs_openblas); /* backward: always null */
        json_num("gflops_vs_sgemm", r->gflops_vs_sgemm);
    }
    if (r->op == OP_BACKWARD) {
        json_num("bwd_fwd_ratio", r->bwd_fwd_ratio);
        json_num("bwd_fwd_per_call", r->bwd_fwd_per_call);
    }
    if (r->impl == IMPL_DENSE && r->op == OP_FORWARD)
        json_num("max_abs_diff_vs_openblas", r->max_abs_diff);
    if (r->op == OP_SGEMM)
        json_int("N", r->sgemm_n, 0);
    if (r->impl == IMPL_OPENBLAS)
        json_str("blas_core", r->blas_core);
    printf("}\n");
}

static void print_table_header(int with_shape)
{
    if (with_shape)
        printf("%-8s %-10s %-6s %6s %4s %3s %6s %3s %11s %9s %8s  %s\n", "impl", "op", "mask",
               "L", "D", "Hkv", "window", "thr", "ms_median", "GFLOP/s", "vs_dense", "note");
    else
        printf("%-8s %-10s %-6s %6s %11s %9s %8s  %s\n", "impl", "op", "mask", "window",
               "ms_median", "GFLOP/s", "vs_dense", "note");
}

static void print_table_row(const result *r, int with_shape)
{
    char win[32], ms[32], gf[32], sp[32], note[256];
    if (r->window >= 0)
        snprintf(win, sizeof win, "%lld", (long long)r->window);
    else
        snprintf(win, sizeof win, "-");
    fmt_num(ms, sizeof ms, "%.3f", r->ms_median);
    fmt_num(gf, sizeof gf, "%.2f", r->op == OP_MASK_BUILD ? NAN : r->gflops);
    fmt_num(sp, sizeof sp, "%.2fx", r->speedup_vs_dense);
    note[0] = 0;
    size_t o = 0;
#define NOTE(...) o += (size_t)snprintf(note + o, o < sizeof note ? sizeof note - o : 0, __VA_ARGS__)
    if (r->op == OP_MASK_BUILD && isfinite(r->pct_of_forward))
        NOTE("%.1f%% of dma forward", r->pct_of_forward);
    if (r->op == OP_MASK_BUILD && isfinite(r->sparsity_bytes))
        NOTE("%ssparsity %.2f MiB", o ? ", " : "", r->sparsity_bytes / 1048576.0);
    if (r->op == OP_BACKWARD && isfinite(r->bwd_fwd_ratio))
        NOTE("bwd/fwd=%.2fx", r->bwd_fwd_ratio);
    if (r->op == OP_BACKWARD && isfinite(r->bwd_fwd_per_call))
        NOTE(" (per call %.2fx)", r->bwd_fwd_per_call);
    if ((r->op == OP_FORWARD || r->op == OP_BACKWARD) && r->impl == IMPL_DMA)
        NOTE("%snnz=%lld work_ratio=%.2f", o ? " " : "", (long long)r->nnz, r->work_ratio);
    if (r->op == OP_FORWARD && isfinite(r->speedup_vs_openblas) && r->impl != IMPL_OPENBLAS)
        NOTE("%svs_openblas=%.2fx", o ? " " : "", r->speedup_vs_openblas);
    if ((r->op == OP_FORWARD || r->op == OP_BACKWARD) && isfinite(r->gflops_vs_sgemm))
        NOTE("%sof_sgemm=%.3f", o ? " " : "", r->gflops_vs_sgemm);
    if (r->impl == IMPL_DENSE && r->op == OP_FORWARD && !isnan(r->max_abs_diff))
        NOTE("%smax|dense-openblas|=%.1e", o ? " " : "", r->max_abs_diff);
    if (r->op == OP_SGEMM)
        NOTE("N=%lld", (long long)r->sgemm_n);
    if (r->impl == IMPL_OPENBLAS && r->blas_core)
        NOTE("%score=%s", o ? " " : "", r->blas_core);
    if (r->runs == 1 && r->warmup == 0)
        NOTE("%s(1 run, no warm-up)", o ? " " : "");
#undef NOTE
    if (with_shape) {
        char L[32], D[16], hkv[16];
        if (r->Lq < 0)
            snprintf(L, sizeof L, "-");
        else if (r->Lq == r->Lk)
            snprintf(L, sizeof L, "%lld", (long long)r->Lq);
        else
            snprintf(L, sizeof L, "%lld/%lld", (long long)r->Lq, (long long)r->Lk);
        snprintf(D, sizeof D, "%lld", (long long)r->D);
        snprintf(hkv, sizeof hkv, "%lld", (long long)r->Hkv);
        printf("%-8s %-10s %-6s %6s %4s %3s %6s %3d %11s %9s %8s  %s\n", impl_names[r->impl],
               op_names[r->op], r->mask ? r->mask : "-", L, r->D < 0 ? "-" : D,
               r->Hkv < 0 ? "-" : hkv, win, r->threads, ms, gf, sp, note);
    } else {
        printf("%-8s %-10s %-6s %6s %11s %9s %8s  %s\n", impl_names[r->impl], op_names[r->op],
               r->mask ? r->mask : "-", win, ms, gf, sp, note);
    }
}

static void emit(const options *o, const result *r, int with_shape)
{
    if (o->json)
        print_json(r);
    else
        print_table_row(r, with_shape);
}

/* Lines of one shape in a fixed order: dma (mask_build, forward[, backward]; per window, in the
 * order measured), then dense (forward[, backward]), then openblas. */
static void emit_group(const options *o, const result *r, int n, int with_shape)
{
    static const int order[] = {IMPL_DMA, IMPL_DENSE, IMPL_OPENBLAS};
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < n; i++)
            if (r[i].impl == order[k])
                emit(o, &r[i], with_shape);
    fflush(stdout);
}

/* ------------------------------------------------------------------------------------------ */
/* Command line                                                                               */
/* ------------------------------------------------------------------------------------------ */

static void print_help(void)
{
    printf(
        "Usage: " PROG " [options]\n"
        "Times the dmattn forward (impl dma) against the library's dense path (impl dense) and a\n"
        "plain OpenBLAS dense attention (impl openblas); with --backward also the backward of\n"
        "dma and dense. Median wall-clock time of --runs calls after --warmup untimed calls.\n"
        "--decode and --prefill CHUNK time inference over a KV cache instead (see below; other\n"
        "defaults there).\n"
        "\n"
        "Shape and mask (one shape unless --sweep):\n"
        "  --batch N        batch B (default 1)\n"
        "  --lq N, --lk N   query / key length; each defaults to the other (default 2048)\n"
        "  --len N          sets both --lq and --lk\n"
        "  --hq N           query heads (default 8)\n"
        "  --hkv N          key/value heads, divides --hq (default 2)\n"
        "  --dim N          head dimension D, 1..%d (default 64)\n"
        "  --window N       keys kept per row (topk) or window length (window) (default 256)\n"
        "  --mask M         topk | window | causal | dense (default topk)\n"
        "      topk:   a random per-key bias (B, Hkv, 1, Lk), uniform [0,1), fixed seed;\n"
        "              dma_sparsity_build(TOPK, causal=1, window) timed as op mask_build, then\n"
        "              dma_forward with that bias and sparsity, causal=1\n"
        "      window: dma_sparsity_build(WINDOW, causal=1, window) with B=H=1 (mask_build),\n"
        "              then dma_forward with that sparsity, no bias, causal=1\n"
        "      causal, dense: the dma forward would be the dense path itself (sparsity NULL,\n"
        "              causal 1 resp. 0), so only the dense and openblas lines are printed\n"
        "  --threads N      threads for dmattn and OpenBLAS alike (default: all, %d here)\n"
        "  --isa NAME       scalar | avx2 | avx512 | neon | auto (default auto: the best, or\n"
        "                   $DMATTN_ISA)\n"
        "\n"
        "Measurement:\n"
        "  --runs N         timed runs, median reported (default 5)\n"
        "  --warmup N       untimed runs first (default 1)\n"
        "  --max-time S     stop a measurement's timed runs once they total S seconds (at\n"
        "                   least 1 run; \"runs\" says how many were taken); 0 = off (default)\n"
        "  --sgemm          add an OpenBLAS SGEMM reference line (square N, same threads)\n"
        "  --sgemm-n N      its size (default 2048; implies --sgemm)\n"
        "  --no-dense       skip the library's dense path\n"
        "  --no-openblas    skip the OpenBLAS dense attention\n"
        "  --backward       also time dma_backward (op backward) for impl dma and dense, on the\n"
        "                   out/lse their forward produced and a random dout (fixed seed):\n"
        "                   dma with the forward's bias and sparsity, causal=1, dbias requested\n"
        "                   when there is a bias (topk); dense with no sparsity, no bias, causal\n"
        "                   as the dense forward. Works with --sweep too. (No OpenBLAS backward.)\n"
        "  --json           JSON lines only (one object per measurement) instead of the table\n"
        "\n"
        "Sweep (--sweep): mask topk (or --mask window), causal, impls dma, dense, openblas, and\n"
        "one sgemm line per thread count, over\n"
        "  L in {1024, 4096, 16384, 32768}, window in {256, 1024, 4096}, D in {64, 128},\n"
        "  Hq = --hq (8), Hkv in {8, 2}, threads in {1, 2}, B = --batch.\n"
        "  dense and openblas do not depend on the window: they are timed once per\n"
        "  (L, D, Hkv, threads), with window null; at L >= %d they get 1 run and no warm-up\n"
        "  (their lines say so in \"runs\"/\"warmup\"). --backward adds a backward line per dma\n"
        "  forward and per dense forward (the dense backward runs like the dense forward).\n"
        "  --sweep-quick          L in {1024, 4096} only\n"
        "  --sweep-lens LIST      override the lists (comma-separated integers), e.g.\n"
        "  --sweep-windows LIST   --sweep-threads 1,2,16\n"
        "  --sweep-dims LIST\n"
        "  --sweep-hkvs LIST\n"
        "  --sweep-threads LIST\n"
        "\n"
        "JSON fields: op (forward|mask_build|sgemm|backward), impl (dma|dense|openblas), mask\n"
        "(the mask the line computed: topk|window for dma, causal|dense for dense/openblas, null\n"
        "for sgemm), B, Lq, Lk, Hq, Hkv, D, window (null where the line does not depend on it),\n"
        "causal, threads, isa (the dmattn context's ISA, on every line), runs, warmup,\n"
        "ms_median, ms_min, ms_max, gflops (effective: 4*D*pairs/time; backward: 10*D*pairs/time,\n"
        "i.e. 5 matmuls of 2*D flops per pair, 2.5x the forward; 0 for mask_build;\n"
        "2*N^3/time for sgemm), pairs (selected (row, key) pairs over all batches and query\n"
        "heads; dma: dma_sparsity_nnz scaled to B and Hq). dma lines add nnz, work_ratio (dense\n"
        "pairs / dma pairs), sparsity_bytes; mask_build adds pct_of_forward; forward lines add\n"
        "speedup_vs_dense, speedup_vs_openblas, gflops_vs_sgemm (null when not measured); the\n"
        "dense line adds max_abs_diff_vs_openblas; sgemm adds N. backward lines carry the\n"
        "forward lines' fields (speedup_vs_dense: dense backward ms / this ms;\n"
        "speedup_vs_openblas always null) plus bwd_fwd_ratio (this ms / the forward ms of the\n"
        "same impl, mask and window) and bwd_fwd_per_call (dma: the median over rounds of each\n"
        "backward call's time over the forward call's just before it; dense: null).\n"
        "\n"
        "The OpenBLAS attention: per (batch, query head, block of %d rows) cblas_sgemm\n"
        "S = scale Q K^T over the block's visible key prefix, masked softmax, cblas_sgemm O = P V;\n"
        "OpenMP over the blocks with exactly --threads threads, single-threaded OpenBLAS inside.\n"
        "openblas and sgemm lines carry blas_core (openblas_get_corename()); a generic core on a\n"
        "CPU with AVX2 gets a warning: set OPENBLAS_CORETYPE (e.g. Haswell, SkylakeX) then.\n"
        "%s"
        "\n",
        DMA_MAX_HEAD_DIM, omp_get_max_threads(), SWEEP_LONG_L, BLAS_ROWS,
        HAVE_OPENBLAS ? "" : "(This build has no OpenBLAS: the openblas and sgemm lines are "
                             "not available.)\n");
    bench_decode_print_help();
    printf("\nExit status: 0 ok, 1 library or allocation error, 2 bad command line.\n");
}

static void parse_list(const char *flag, const char *s, int64_t lo, int64_t hi, int_list *out)
{
    out->n = 0;
    const char *p = s;
    while (1) {
        char item[64];
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (len == 0 || len >= sizeof item)
            usage_error("%s expects a comma-separated list of integers, got '%s'", flag, s);
        if (out->n >= MAX_LIST)
            usage_error("%s: at most %d values", flag, MAX_LIST);
        memcpy(item, p, len);
        item[len] = 0;
        out->v[out->n++] = parse_int(flag, item, lo, hi);
        if (!comma)
            break;
        p = comma + 1;
    }
}

static void set_list(int_list *l, const int64_t *v, int n)
{
    l->n = n;
    for (int i = 0; i < n; i++)
        l->v[i] = v[i];
}

static void parse_args(int argc, char **argv, options *o)
{
    memset(o, 0, sizeof *o);
    o->B = 1;
    o->Lq = -1;
    o->Lk = -1;
    o->Hq = 8;
    o->Hkv = 2;
    o->D = -1;      /* the defaults of D, window and threads depend on the mode: below */
    o->window = -1;
    o->threads = -1;
    o->mask = MASK_TOPK;
    o->runs = 5;
    o->warmup = 1;
    o->sgemm_n = 2048;
    o->isa = DMA_ISA_AUTO;
    int lens_set = 0, quick_lens_only = 0, mask_set = 0, dtype_set = 0;
    o->sw_lens.n = o->sw_windows.n = o->sw_dims.n = o->sw_hkvs.n = o->sw_threads.n = 0;

    const int64_t LMAX = INT32_MAX;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            print_help();
            exit(0);
        }
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0')
            usage_error("unexpected argument '%s'", arg);
        char name[64];
        const char *val = NULL;
        const char *eq = strchr(arg, '=');
        size_t nlen = eq ? (size_t)(eq - arg) : strlen(arg);
        if (nlen >= sizeof name)
            usage_error("unknown option '%s'", arg);
        memcpy(name, arg, nlen);
        name[nlen] = 0;
        if (eq)
            val = eq + 1;

#define IS(s) (!strcmp(name, (s)))
#define FLAG()                                                                                    \
    do {                                                                                          \
        if (val)                                                                                  \
            usage_error("option '%s' takes no value", name);                                      \
    } while (0)
#define VALUE()                                                                                   \
    (val ? val : (i + 1 < argc ? argv[++i] : (usage_error("option '%s' needs a value", name), "")))

        if (IS("--batch"))
            o->B = parse_int(name, VALUE(), 1, 1 << 20);
        else if (IS("--lq"))
            o->Lq = parse_int(name, VALUE(), 1, LMAX);
        else if (IS("--lk"))
            o->Lk = parse_int(name, VALUE(), 1, LMAX);
        else if (IS("--len"))
            o->Lq = o->Lk = parse_int(name, VALUE(), 1, LMAX);
        else if (IS("--hq"))
            o->Hq = parse_int(name, VALUE(), 1, 1 << 16);
        else if (IS("--hkv"))
            o->Hkv = parse_int(name, VALUE(), 1, 1 << 16);
        else if (IS("--dim"))
            o->D = parse_int(name, VALUE(), 1, DMA_MAX_HEAD_DIM);
        else if (IS("--window"))
            o->window = parse_int(name, VALUE(), 0, LMAX);
        else if (IS("--threads"))
            o->threads = (int)parse_int(name, VALUE(), 1, 4096);
        else if (IS("--runs"))
            o->runs = (int)parse_int(name, VALUE(), 1, 1000000);
        else if (IS("--warmup"))
            o->warmup = (int)parse_int(name, VALUE(), 0, 1000000);
        else if (IS("--max-time"))
            o->max_ms = 1000.0 * (double)parse_int(name, VALUE(), 0, 1000000);
        else if (IS("--mask")) {
            const char *m = VALUE();
            int k = -1;
            for (int j = 0; j < 4; j++)
                if (!strcmp(m, mask_names[j]))
                    k = j;
            if (k < 0)
                usage_error("--mask must be topk, window, causal or dense, got '%s'", m);
            o->mask = k;
            mask_set = 1;
        } else if (IS("--isa")) {
            const char *s = VALUE();
            static const struct {
                const char *name;
                dma_isa isa;
            } isas[] = {{"auto", DMA_ISA_AUTO},
                        {"scalar", DMA_ISA_SCALAR},
                        {"avx2", DMA_ISA_AVX2},
                        {"avx512", DMA_ISA_AVX512},
                        {"neon", DMA_ISA_NEON}};
            int k = -1;
            for (int j = 0; j < 5; j++)
                if (!strcmp(s, isas[j].name))
                    k = j;
            if (k < 0)
                usage_error("--isa must be scalar, avx2, avx512, neon or auto, got '%s'", s);
            o->isa = isas[k].isa;
        } else if (IS("--json")) {
            FLAG();
            o->json = 1;
        } else if (IS("--sgemm")) {
            FLAG();
            o->sgemm = 1;
        } else if (IS("--sgemm-n")) {
            o->sgemm_n = parse_int(name, VALUE(), 1, 65536);
            o->sgemm = 1;
        } else if (IS("--no-dense")) {
            FLAG();
            o->no_dense = 1;
        } else if (IS("--no-openblas")) {
            FLAG();
            o->no_openblas = 1;
        } else if (IS("--backward")) {
            FLAG();
            o->backward = 1;
        } else if (IS("--decode")) {
            FLAG();
            o->decode = 1;
        } else if (IS("--prefill")) {
            o->prefill = parse_int(name, VALUE(), 1, LMAX);
        } else if (IS("--dtype")) {
            decode_options d;
            memset(&d, 0, sizeof d);
            bench_decode_parse_dtypes(name, VALUE(), &d);
            o->ndtypes = d.ndtypes;
            memcpy(o->dtypes, d.dtypes, sizeof o->dtypes);
            dtype_set = 1;
        } else if (IS("--sweep")) {
            FLAG();
            o->sweep = 1;
        } else if (IS("--sweep-quick")) {
            FLAG();
            o->sweep_quick = 1;
            quick_lens_only = 1;
        } else if (IS("--sweep-lens")) {
            parse_list(name, VALUE(), 1, LMAX, &o->sw_lens);
            lens_set = 1;
        } else if (IS("--sweep-windows"))
            parse_list(name, VALUE(), 0, LMAX, &o->sw_windows);
        else if (IS("--sweep-dims"))
            parse_list(name, VALUE(), 1, DMA_MAX_HEAD_DIM, &o->sw_dims);
        else if (IS("--sweep-hkvs"))
            parse_list(name, VALUE(), 1, 1 << 16, &o->sw_hkvs);
        else if (IS("--sweep-threads"))
            parse_list(name, VALUE(), 1, 4096, &o->sw_threads);
        else
            usage_error("unknown option '%s'", arg);
#undef IS
#undef FLAG
#undef VALUE
    }

    int sweep_opts = lens_set || quick_lens_only || o->sw_windows.n || o->sw_dims.n ||
                     o->sw_hkvs.n || o->sw_threads.n;
    if (o->decode || o->prefill) {
        /* the decode and prefill modes (bench_decode.c) take their own defaults */
        const char *bad = o->Lq >= 0 ? "--lq/--len" : mask_set ? "--mask"
                        : o->backward ? "--backward" : o->sgemm ? "--sgemm/--sgemm-n"
                        : o->no_dense ? "--no-dense" : o->no_openblas ? "--no-openblas"
                        : (o->sweep || sweep_opts) ? "--sweep*" : NULL;
        if (bad)
            usage_error("%s does not apply to --decode/--prefill", bad);
        if (o->Lk < 0)
            o->Lk = DECODE_DEFAULT_LK;
        if (o->D < 0)
            o->D = DECODE_DEFAULT_DIM;
        if (o->window < 0)
            o->window = DECODE_DEFAULT_WINDOW;
        if (o->threads < 0)
            o->threads = DECODE_DEFAULT_THREADS;
        if (o->window < 1)
            usage_error("--decode/--prefill need --window >= 1 (the top-k selection)");
        if (!dtype_set) {
            o->ndtypes = 1;
            o->dtypes[0] = DMA_F32;
        }
        if (o->Hq % o->Hkv != 0)
            usage_error("--hq (%lld) must be a multiple of --hkv (%lld)", (long long)o->Hq,
                        (long long)o->Hkv);
        return;
    }
    if (dtype_set)
        usage_error("--dtype needs --decode or --prefill");
    if (o->D < 0)
        o->D = 64;
    if (o->window < 0)
        o->window = 256;
    if (o->threads < 0)
        o->threads = omp_get_max_threads();
    if (o->Lq < 0 && o->Lk < 0)
        o->Lq = o->Lk = 2048;
    else if (o->Lq < 0)
        o->Lq = o->Lk;
    else if (o->Lk < 0)
        o->Lk = o->Lq;
    if (o->Hq % o->Hkv != 0)
        usage_error("--hq (%lld) must be a multiple of --hkv (%lld)", (long long)o->Hq,
                    (long long)o->Hkv);

    if (sweep_opts && !o->sweep)
        usage_error("the --sweep-* options need --sweep");
    if (o->sweep) {
        if (o->mask != MASK_TOPK && o->mask != MASK_WINDOW)
            usage_error("--sweep measures --mask topk or window, not %s", mask_names[o->mask]);
        if (lens_set && quick_lens_only)
            usage_error("--sweep-quick and --sweep-lens exclude each other");
        static const int64_t lens[] = {1024, 4096, 16384, 32768}, wins[] = {256, 1024, 4096},
                             dims[] = {64, 128}, hkvs[] = {8, 2}, thr[] = {1, 2};
        if (!lens_set)
            set_list(&o->sw_lens, lens, o->sweep_quick ? 2 : 4);
        if (!o->sw_windows.n)
            set_list(&o->sw_windows, wins, 3);
        if (!o->sw_dims.n)
            set_list(&o->sw_dims, dims, 2);
        if (!o->sw_hkvs.n)
            set_list(&o->sw_hkvs, hkvs, 2);
        if (!o->sw_threads.n)
            set_list(&o->sw_threads, thr, 2);
    }
    if (!HAVE_OPENBLAS) {
        if (o->sgemm)
            fprintf(stderr, PROG ": note: built without OpenBLAS; no sgemm line\n");
        o->sgemm = 0;
        o->no_openblas = 1;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Modes                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static int run_single(const options *o)
{
    dma_context *ctx = make_context(o->threads, o->isa);
    const char *isa = dma_isa_name(dma_context_isa(ctx));
    problem p;
    problem_init(&p, o->B, o->Lq, o->Lk, o->Hq, o->Hkv, o->D, o->backward);

    result r[6], sg;
    int n = 0, have_sg = 0;
    memset(&sg, 0, sizeof sg);
    const int causal = o->mask != MASK_DENSE;
    const runspec rs = {o->warmup, o->runs, o->max_ms};
#if HAVE_OPENBLAS
    if (o->sgemm) {
        sg = measure_sgemm(o->sgemm_n, o->threads, isa, rs);
        have_sg = 1;
    }
#endif
    if (o->mask == MASK_TOPK || o->mask == MASK_WINDOW)
        n += measure_dma(ctx, &p, o->mask, o->window, rs, &r[n]);
    int i_dense = -1, i_blas = -1;
    if (!o->no_dense) {
        i_dense = n;
        r[n++] = measure_dense(ctx, &p, causal, rs);
        if (o->backward)
            r[n++] = measure_dense_backward(ctx, &p, causal, rs);
    }
#if HAVE_OPENBLAS
    if (!o->no_openblas) {
        i_blas = n;
        r[n++] = measure_openblas(&p, causal, o->threads, isa, rs);
    }
#endif
    if (i_dense >= 0 && i_blas >= 0)
        r[i_dense].max_abs_diff = max_abs_diff(p.out_dense, p.out_blas, p.n_q);
    link_results(r, n, have_sg ? &sg : NULL);

    if (!o->json) {
        printf("dmattn-bench: B=%lld Lq=%lld Lk=%lld Hq=%lld Hkv=%lld D=%lld window=%lld "
               "mask=%s threads=%d isa=%s runs=%d warmup=%d\n",
               (long long)o->B, (long long)o->Lq, (long long)o->Lk, (long long)o->Hq,
               (long long)o->Hkv, (long long)o->D, (long long)o->window, mask_names[o->mask],
               o->threads, isa, o->runs, o->warmup);
        print_table_header(0);
    }
    emit_group(o, r, n, 0);
    if (have_sg) {
        emit(o, &sg, 0);
        if (!o->json) {
            for (int i = 0; i < n; i++)
                if ((r[i].op == OP_FORWARD || r[i].op == OP_BACKWARD) &&
                    isfinite(r[i].gflops_vs_sgemm))
                    printf("  %s %s: %.2f GFLOP/s = %.3f of SGEMM (%.2f GFLOP/s)\n",
                           impl_names[r[i].impl], op_names[r[i].op], r[i].gflops,
                           r[i].gflops_vs_sgemm, sg.gflops);
        }
    }
    problem_free(&p);
    dma_context_destroy(ctx);
    return 0;
}

static int run_sweep(const options *o)
{
    int progress = isatty(STDERR_FILENO) && !isatty(STDOUT_FILENO);
    if (!o->json) {
        printf("dmattn-bench sweep: mask=%s causal B=%lld Hq=%lld runs=%d warmup=%d "
               "(dense/openblas at L >= %d: 1 run, no warm-up)\n",
               mask_names[o->mask], (long long)o->B, (long long)o->Hq, o->runs, o->warmup,
               SWEEP_LONG_L);
        print_table_header(1);
    }
    const int nwin = o->sw_windows.n;
    const runspec rs = {o->warmup, o->runs, o->max_ms};
    result *r = xalloc(3 * nwin + 3, sizeof *r, "results");
    for (int ti = 0; ti < o->sw_threads.n; ti++) {
        const int threads = (int)o->sw_threads.v[ti];
        dma_context *ctx = make_context(threads, o->isa);
        const char *isa = dma_isa_name(dma_context_isa(ctx));
        (void)isa; /* used by the OpenBLAS lines only */
        result sg;
        int have_sg = 0;
        memset(&sg, 0, sizeof sg);
#if HAVE_OPENBLAS
        sg = measure_sgemm(o->sgemm_n, threads, isa, rs);
        have_sg = 1;
        emit(o, &sg, 1);
#endif
        for (int di = 0; di < o->sw_dims.n; di++) {
            for (int hi = 0; hi < o->sw_hkvs.n; hi++) {
                const int64_t D = o->sw_dims.v[di], Hkv = o->sw_hkvs.v[hi];
                if (o->Hq % Hkv) {
                    fprintf(stderr, PROG ": skipping Hkv=%lld: does not divide Hq=%lld\n",
                            (long long)Hkv, (long long)o->Hq);
                    continue;
                }
                for (int li = 0; li < o->sw_lens.n; li++) {
                    const int64_t L = o->sw_lens.v[li];
                    if (progress)
                        fprintf(stderr, "[sweep] threads=%d D=%lld Hkv=%lld L=%lld\n", threads,
                                (long long)D, (long long)Hkv, (long long)L);
                    problem p;
                    problem_init(&p, o->B, L, L, o->Hq, Hkv, D, o->backward);
                    const int long_l = L >= SWEEP_LONG_L;
                    /* dense and openblas are slow at long L: 1 run, no warm-up there */
                    const runspec brs = long_l ? (runspec){0, 1, 0.0} : rs;
                    int n = 0, i_dense = -1, i_blas = -1;
                    if (!o->no_dense) {
                        i_dense = n;
                        r[n++] = measure_dense(ctx, &p, 1, brs);
                        if (o->backward)
                            r[n++] = measure_dense_backward(ctx, &p, 1, brs);
                    }
#if HAVE_OPENBLAS
                    if (!o->no_openblas) {
                        i_blas = n;
                        r[n++] = measure_openblas(&p, 1, threads, isa, brs);
                    }
#endif
                    if (i_dense >= 0 && i_blas >= 0)
                        r[i_dense].max_abs_diff = max_abs_diff(p.out_dense, p.out_blas, p.n_q);
                    for (int wi = 0; wi < nwin; wi++)
                        n += measure_dma(ctx, &p, o->mask, o->sw_windows.v[wi], rs, &r[n]);
                    link_results(r, n, have_sg ? &sg : NULL);
                    emit_group(o, r, n, 1);
                    problem_free(&p);
                }
            }
        }
        dma_context_destroy(ctx);
    }
    free(r);
    return 0;
}

static int run_decode(const options *o)
{
    decode_options d;
    memset(&d, 0, sizeof d);
    d.decode = o->decode;
    d.prefill = o->prefill;
    d.B = o->B;
    d.lk = o->Lk;
    d.hq = o->Hq;
    d.hkv = o->Hkv;
    d.dim = o->D;
    d.window = o->window;
    d.threads = o->threads;
    d.isa = o->isa;
    d.ndtypes = o->ndtypes;
    memcpy(d.dtypes, o->dtypes, sizeof d.dtypes);
    d.runs = o->runs;
    d.warmup = o->warmup;
    d.max_ms = o->max_ms;
    d.json = o->json;
    settle_blas(); /* OpenBLAS's workers spin for a while after the library is loaded */
    return bench_decode_run(&d);
}

int main(int argc, char **argv)
{
    options o;
    parse_args(argc, argv, &o);
    if (o.decode || o.prefill)
        return run_decode(&o);
    if (o.sweep || o.sgemm || !o.no_openblas)
        check_blas_core();
    settle_blas(); /* OpenBLAS's workers spin for a while after the library is loaded */
    return o.sweep ? run_sweep(&o) : run_single(&o);
}

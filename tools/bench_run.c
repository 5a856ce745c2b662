/*
 * bench_run.c - the core of dmattn-bench (see bench_run.h): the problem of one shape in every
 * storage type asked for, and the dmattn measurements. Moved out of dmattn-bench.c.
 */
#include "bench_run.h"

#include "bench_dtype.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(2 * BENCH_MAX_DTYPES <= BENCH_MAX_FN, "measure_dma alternates 2 calls per dtype");

/* ------------------------------------------------------------------------------------------ */
/* Enumerations and names (the names are part of the output format)                          */
/* ------------------------------------------------------------------------------------------ */

const char *const mask_names[4] = {"topk", "window", "causal", "dense"};
const char *const op_names[4] = {"forward", "mask_build", "sgemm", "backward"};
const char *const impl_names[3] = {"dma", "dense", "openblas"};

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* Visible (row, key) pairs of one (batch, head): causal is bottom-right aligned. */
int64_t visible_pairs(int64_t Lq, int64_t Lk, int causal)
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

result new_result(int op, int impl, const char *isa, int threads, timing tm)
{
    result r;
    memset(&r, 0, sizeof r);
    r.op = op;
    r.impl = impl;
    r.mask = NULL;
    r.dtype = DMA_F32;
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
    r.fresh_ms = NAN;
    r.pct_of_forward = NAN;
    r.speedup_vs_dense = NAN;
    r.speedup_vs_openblas = NAN;
    r.gflops_vs_sgemm = NAN;
    r.bwd_fwd_ratio = NAN;
    r.bwd_fwd_per_call = op == OP_BACKWARD ? tm.per_call : NAN;
    r.speedup_vs_f32 = NAN;
    r.max_abs_diff = NAN;
    r.sgemm_n = -1;
    r.blas_core = NULL;
    r.base_threads = -1;
    r.thread_speedup = NAN;
    r.thread_efficiency = NAN;
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* The problem: inputs and outputs of one shape                                               */
/* ------------------------------------------------------------------------------------------ */

/* The views of storage type t: f32 aliases the problem's float arrays; a 16-bit type gets q, k,
 * v (and dout) rounded to it (bench_dtype.c), its own zeroed outputs and float32 lse. */
static void problem_dtype_init(problem *p, problem_dtype *d, dma_dtype t)
{
    const int64_t B = p->B, Lq = p->Lq, Lk = p->Lk, Hq = p->Hq, Hkv = p->Hkv, D = p->D;
    memset(d, 0, sizeof *d);
    d->t = t;
    if (t == DMA_F32) {
        d->q = p->q;
        d->k = p->k;
        d->v = p->v;
        d->dout = p->dout;
        d->out_dma = p->out_dma;
        d->out_dense = p->out_dense;
        d->lse = p->lse;
        d->lse_dense = p->lse_dense;
    } else {
        const size_t es = dtype_size(t);
        d->q = xalloc(p->n_q, es, "q (16-bit)");
        d->k = xalloc(p->n_kv, es, "k (16-bit)");
        d->v = xalloc(p->n_kv, es, "v (16-bit)");
        store_as(d->q, t, p->q, p->n_q);
        store_as(d->k, t, p->k, p->n_kv);
        store_as(d->v, t, p->v, p->n_kv);
        if (p->backward) {
            d->dout = xalloc(p->n_q, es, "dout (16-bit)");
            store_as(d->dout, t, p->dout, p->n_q);
        }
        d->out_dma = xalloc(p->n_q, es, "out (dma, 16-bit)");
        d->out_dense = xalloc(p->n_q, es, "out (dense, 16-bit)");
        memset(d->out_dma, 0, (size_t)p->n_q * es);
        memset(d->out_dense, 0, (size_t)p->n_q * es);
        d->lse = xalloc(p->n_lse, sizeof(float), "lse (dma, 16-bit)");
        d->lse_dense = xalloc(p->n_lse, sizeof(float), "lse (dense, 16-bit)");
    }
    d->tq = dma_tensor_4d(d->q, t, B, Lq, Hq, D);
    d->tk = dma_tensor_4d(d->k, t, B, Lk, Hkv, D);
    d->tv = dma_tensor_4d(d->v, t, B, Lk, Hkv, D);
    if (p->backward)
        d->tdout = dma_tensor_4d(d->dout, t, B, Lq, Hq, D);
    d->tout_dma = dma_tensor_4d(d->out_dma, t, B, Lq, Hq, D);
    d->tout_dense = dma_tensor_4d(d->out_dense, t, B, Lq, Hq, D);
    d->tlse = dma_tensor_3d(d->lse, DMA_F32, B, Hq, Lq);
    d->tlse_dense = dma_tensor_3d(d->lse_dense, DMA_F32, B, Hq, Lq);
}

void problem_init(problem *p, int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,
                  int64_t D, int backward, int ndt, const dma_dtype *dts)
{
    if (ndt < 1 || ndt > BENCH_MAX_DTYPES)
        fatal("internal error: %d storage types", ndt);
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
    p->tbias = dma_tensor_4d(p->bias, DMA_F32, B, Hkv, 1, Lk);
    p->ndt = ndt;
    for (int i = 0; i < ndt; i++)
        problem_dtype_init(p, &p->dt[i], dts[i]);
}

void problem_free(problem *p)
{
    for (int i = 0; i < p->ndt; i++) {
        problem_dtype *d = &p->dt[i];
        if (d->t == DMA_F32)
            continue; /* aliases of the float arrays below */
        free(d->q);
        free(d->k);
        free(d->v);
        free(d->dout);
        free(d->out_dma);
        free(d->out_dense);
        free(d->lse);
        free(d->lse_dense);
    }
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

void fill_shape(result *r, const problem *p)
{
    r->B = p->B;
    r->Lq = p->Lq;
    r->Lk = p->Lk;
    r->Hq = p->Hq;
    r->Hkv = p->Hkv;
    r->D = p->D;
}

void set_gflops(result *r)
{
    double fl = flops_per_pair(r->op, r->D) * (double)r->pairs;
    r->gflops = r->ms_median > 0 ? fl / (r->ms_median * 1e6) : NAN;
}

/* "the <impl> <what>" for f32 (as before there were storage types), else "the <impl> <dtype>
 * <what>": the subject of a warning about non-finite values. */
static void what_of(char *buf, size_t n, const char *impl, dma_dtype t, const char *what)
{
    if (t == DMA_F32)
        snprintf(buf, n, "the %s %s", impl, what);
    else
        snprintf(buf, n, "the %s %s %s", impl, dtype_name(t), what);
}

/* ------------------------------------------------------------------------------------------ */
/* dmattn measurements                                                                        */
/* ------------------------------------------------------------------------------------------ */

typedef struct fwd_arg {
    dma_context *ctx;
    const problem_dtype *d; /* q, k, v of one storage type */
    const dma_tensor *bias;
    const dma_sparsity *sp;
    dma_attn_params prm;
    dma_tensor *out;
    dma_tensor *lse;
} fwd_arg;

static void run_forward(void *a)
{
    fwd_arg *f = a;
    check(f->ctx, dma_forward(f->ctx, &f->d->tq, &f->d->tk, &f->d->tv, f->bias, f->sp, &f->prm,
                              f->out, f->lse),
          "dma_forward");
}

typedef struct bwd_arg {
    dma_context *ctx;
    const problem_dtype *d; /* q, k, v, dout of one storage type */
    const dma_tensor *bias;
    const dma_sparsity *sp;
    dma_attn_params prm;
    const dma_tensor *out, *lse;
    dma_tensor *dq, *dk, *dv, *dbias;
} bwd_arg;

static void run_backward(void *a)
{
    bwd_arg *g = a;
    check(g->ctx, dma_backward(g->ctx, &g->d->tq, &g->d->tk, &g->d->tv, g->bias, g->sp, &g->prm,
                               g->out, g->lse, &g->d->tdout, g->dq, g->dk, g->dv, g->dbias),
          "dma_backward");
}

/* Warn when a backward wrote a NaN or an infinity into a gradient (float32 whatever the storage
 * type t of its inputs). */
static void check_grads_finite(const problem *p, int with_dbias, const char *impl, dma_dtype t)
{
    char what[64];
    what_of(what, sizeof what, impl, t, "dq");
    check_finite_as(p->dq, DMA_F32, p->n_q, what);
    what_of(what, sizeof what, impl, t, "dk");
    check_finite_as(p->dk, DMA_F32, p->n_kv, what);
    what_of(what, sizeof what, impl, t, "dv");
    check_finite_as(p->dv, DMA_F32, p->n_kv, what);
    if (with_dbias) {
        what_of(what, sizeof what, impl, t, "dbias");
        check_finite_as(p->dbias, DMA_F32, p->n_bias, what);
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

/* A fresh build (build_before freed the last object first): new memory, whose pages fault. */
static void run_build(void *a)
{
    build_arg *b = a;
    check(b->ctx, dma_sparsity_build(b->ctx, &b->mp, b->B, b->H, b->Lq, b->Lk, b->bias, NULL,
                                     &b->sp),
          "dma_sparsity_build");
}

/* A rebuild into the last run's object, as a training step makes its mask. */
static void run_rebuild(void *a)
{
    build_arg *b = a;
    check(b->ctx, dma_sparsity_rebuild(b->ctx, &b->mp, b->B, b->H, b->Lq, b->Lk, b->bias, NULL,
                                       &b->sp),
          "dma_sparsity_rebuild");
}

/* The fields of a dense line (forward or backward) of storage type t. */
static result dense_result(dma_context *ctx, const problem *p, int op, int causal, dma_dtype t,
                           timing tm)
{
    result r = new_result(op, IMPL_DENSE, dma_isa_name(dma_context_isa(ctx)),
                          dma_context_threads(ctx), tm);
    fill_shape(&r, p);
    r.mask = causal ? "causal" : "dense";
    r.dtype = t;
    r.causal = causal;
    r.pairs = visible_pairs(p->Lq, p->Lk, causal) * p->B * p->Hq;
    set_gflops(&r);
    return r;
}

/* The library's dense path: no sparsity, no bias; causal as asked. The lse is written (the
 * training forward; the backward needs it). The calls of the storage types alternate. */
int measure_dense(dma_context *ctx, problem *p, int causal, runspec rs, result res[])
{
    fwd_arg f[BENCH_MAX_DTYPES];
    bench_fn fn[BENCH_MAX_DTYPES];
    void *arg[BENCH_MAX_DTYPES];
    for (int i = 0; i < p->ndt; i++) {
        problem_dtype *d = &p->dt[i];
        f[i] = (fwd_arg){ctx, d, NULL, NULL, {0.0f, 0.0f, causal}, &d->tout_dense,
                         &d->tlse_dense};
        fn[i] = run_forward;
        arg[i] = &f[i];
    }
    timing tm[BENCH_MAX_DTYPES];
    time_alternating(p->ndt, fn, arg, NULL, rs, tm);
    for (int i = 0; i < p->ndt; i++) {
        res[i] = dense_result(ctx, p, OP_FORWARD, causal, p->dt[i].t, tm[i]);
        char what[64];
        what_of(what, sizeof what, "dense", p->dt[i].t, "output");
        check_finite_as(p->dt[i].out_dense, p->dt[i].t, p->n_q, what);
    }
    return p->ndt;
}

/* The dense backward: dma_backward with no sparsity and no bias (so no dbias), causal as the
 * dense forward, on the out/lse that measure_dense() left (call it after that, same causal).
 * The calls of the storage types alternate. */
int measure_dense_backward(dma_context *ctx, problem *p, int causal, runspec rs, result res[])
{
    if (!p->backward)
        fatal("internal error: backward buffers were not allocated");
    bwd_arg g[BENCH_MAX_DTYPES];
    bench_fn fn[BENCH_MAX_DTYPES];
    void *arg[BENCH_MAX_DTYPES];
    for (int i = 0; i < p->ndt; i++) {
        problem_dtype *d = &p->dt[i];
        g[i] = (bwd_arg){.ctx = ctx,
                         .d = d,
                         .bias = NULL,
                         .sp = NULL,
                         .prm = {0.0f, 0.0f, causal},
                         .out = &d->tout_dense,
                         .lse = &d->tlse_dense,
                         .dq = &p->tdq,
                         .dk = &p->tdk,
                         .dv = &p->tdv,
                         .dbias = NULL};
        fn[i] = run_backward;
        arg[i] = &g[i];
    }
    timing tm[BENCH_MAX_DTYPES];
    time_alternating(p->ndt, fn, arg, NULL, rs, tm);
    for (int i = 0; i < p->ndt; i++) {
        tm[i].per_call = NAN; /* no forward call before each: bwd_fwd_per_call is null */
        res[i] = dense_result(ctx, p, OP_BACKWARD, causal, p->dt[i].t, tm[i]);
    }
    check_grads_finite(p, 0, "dense", p->dt[p->ndt - 1].t); /* the last type's gradients */
    return p->ndt;
}

/* The dma backward's arguments: dma_backward with the forward's bias, sparsity and params, on
 * the out/lse the dma forward of the same storage type leaves; dbias is requested whenever
 * there is a bias (it is trainable). */
static bwd_arg dma_backward_arg(dma_context *ctx, problem *p, problem_dtype *d,
                                const dma_tensor *bias, const dma_sparsity *sp,
                                dma_attn_params prm)
{
    if (!p->backward)
        fatal("internal error: backward buffers were not allocated");
    return (bwd_arg){.ctx = ctx,
                     .d = d,
                     .bias = bias,
                     .sp = sp,
                     .prm = prm,
                     .out = &d->tout_dma,
                     .lse = &d->tlse,
                     .dq = &p->tdq,
                     .dk = &p->tdk,
                     .dv = &p->tdv,
                     .dbias = bias ? &p->tdbias : NULL};
}

/* dma with a generated sparsity: mask_build line (res[0]; it reads the float32 bias only, so it
 * is timed once, and its line carries the first storage type), then per storage type a forward
 * line and, with p->backward, a backward line, timed while the sparsity object still exists.
 * topk: per-key bias (B, Hkv, 1, Lk), causal top-k, object (B, Hkv); the forward gets the bias.
 * window: sliding window, object (1, 1) (it is the same for every batch and head), no bias.
 * Both causal. Returns the number of lines written (1 + ndt * (1 + backward)). */
int measure_dma(dma_context *ctx, problem *p, int mask, int64_t window, runspec rs,
                result res[])
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
    /* Alternating: a fresh build (the last object freed first), then a rebuild into it. */
    const bench_fn build_fns[2] = {run_build, run_rebuild};
    void *const build_args[2] = {&b, &b};
    timing tbuild[2];
    time_alternating(2, build_fns, build_args, build_before, rs, tbuild);
    const timing tb = tbuild[1];
    dma_sparsity *sp = b.sp; /* the object of the last timed rebuild */

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

    /* All calls alternate: forward (and backward) of the first storage type, then of the next,
     * ... With the backward, each backward runs on the forward just before it, so that the
     * bwd/fwd ratio compares like with like; the storage types alternate so that their ratio
     * does too. */
    const dma_tensor *bias = mask == MASK_TOPK ? &p->tbias : NULL;
    const dma_attn_params prm = {0.0f, 0.0f, 1};
    fwd_arg f[BENCH_MAX_DTYPES];
    bwd_arg g[BENCH_MAX_DTYPES];
    bench_fn fn[2 * BENCH_MAX_DTYPES];
    void *arg[2 * BENCH_MAX_DTYPES];
    timing tm[2 * BENCH_MAX_DTYPES];
    int nfn = 0;
    for (int i = 0; i < p->ndt; i++) {
        problem_dtype *d = &p->dt[i];
        f[i] = (fwd_arg){ctx, d, bias, sp, prm, &d->tout_dma, &d->tlse};
        fn[nfn] = run_forward;
        arg[nfn++] = &f[i];
        if (p->backward) {
            g[i] = dma_backward_arg(ctx, p, d, bias, sp, prm);
            fn[nfn] = run_backward;
            arg[nfn++] = &g[i];
        }
    }
    time_alternating(nfn, fn, arg, NULL, rs, tm);
    if (p->backward)
        check_grads_finite(p, bias != NULL, "dma", p->dt[p->ndt - 1].t);
    for (int i = 0; i < p->ndt; i++) {
        char what[64];
        what_of(what, sizeof what, "dma", p->dt[i].t, "output");
        check_finite_as(p->dt[i].out_dma, p->dt[i].t, p->n_q, what);
    }

    int nres = 0;
    res[nres] = new_result(OP_MASK_BUILD, IMPL_DMA, isa, threads, tb);
    res[nres].fresh_ms = tbuild[0].median;
    res[nres++].dtype = p->dt[0].t;
    for (int i = 0, k = 0; i < p->ndt; i++) {
        res[nres] = new_result(OP_FORWARD, IMPL_DMA, isa, threads, tm[k++]);
        res[nres++].dtype = p->dt[i].t;
        if (p->backward) {
            res[nres] = new_result(OP_BACKWARD, IMPL_DMA, isa, threads, tm[k++]);
            res[nres++].dtype = p->dt[i].t;
        }
    }
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
        if (r->op == OP_MASK_BUILD)
            r->gflops = 0.0;
        else
            set_gflops(r);
    }
    dma_sparsity_destroy(sp);
    return nres;
}

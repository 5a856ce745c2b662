/*
 * bench_run.h - the core of dmattn-bench's regular and sweep modes: the names of what is
 * measured, one measurement (result), the inputs and outputs of one shape (problem) in every
 * storage type asked for, and the dmattn measurements (the dma mask build, forward and
 * backward; the library's dense forward and backward). Implemented in bench_run.c; the OpenBLAS
 * baseline is in bench_blas.c, the reporters in bench_report.c.
 */
#ifndef DMATTN_BENCH_RUN_H
#define DMATTN_BENCH_RUN_H

#include <dmattn.h>

#include "bench_common.h"
#include "bench_decode.h" /* BENCH_MAX_DTYPES */

#include <stdint.h>

/* ------------------------------------------------------------------------------------------ */
/* Enumerations and names (the names are part of the output format)                          */
/* ------------------------------------------------------------------------------------------ */

enum mask_mode { MASK_TOPK, MASK_WINDOW, MASK_CAUSAL, MASK_DENSE };
extern const char *const mask_names[4]; /* "topk", "window", "causal", "dense" */

enum op_kind { OP_FORWARD, OP_MASK_BUILD, OP_SGEMM, OP_BACKWARD };
extern const char *const op_names[4]; /* "forward", "mask_build", "sgemm", "backward" */

enum impl_kind { IMPL_DMA, IMPL_DENSE, IMPL_OPENBLAS };
extern const char *const impl_names[3]; /* "dma", "dense", "openblas" */

/* One measurement: one output line. Integer fields < 0 and double fields that are NaN print as
 * null in JSON (and "-" in the table). */
typedef struct result {
    int op, impl;
    const char *mask;     /* NULL for sgemm */
    dma_dtype dtype;      /* storage of q, k, v, out (and dout); f32 for openblas and sgemm */
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
    double fresh_ms;      /* mask_build: median of fresh builds (the line times rebuilds) */
    /* ratios filled by link_results() */
    double pct_of_forward;      /* mask_build only */
    double speedup_vs_dense;    /* forward, backward lines: dense ms / this ms (same op, dtype) */
    double speedup_vs_openblas; /* forward lines: openblas ms / this ms (backward: none) */
    double gflops_vs_sgemm;     /* forward, backward: this gflops / sgemm gflops (same threads) */
    double bwd_fwd_ratio;       /* backward lines: this ms / the same impl's forward ms */
    double bwd_fwd_per_call;    /* dma backward: median of (backward call / forward call) */
    double speedup_vs_f32;      /* 16-bit forward, backward: the f32 line's ms / this ms */
    double max_abs_diff;        /* dense line: max |dense - openblas| */
    int64_t sgemm_n;
    const char *blas_core;      /* openblas lines: openblas_get_corename() */
    /* thread scaling (--sweep-threads without --sweep), filled by link_thread_scaling() */
    int base_threads;           /* the fewest threads measured (the base); -1: not a sweep */
    double thread_speedup;      /* the base's ms / this ms (same op, impl, dtype) */
    double thread_efficiency;   /* thread_speedup / (threads / base_threads) */
} result;

/* A result with every optional field unset (null). */
result new_result(int op, int impl, const char *isa, int threads, timing tm);

/* Visible (row, key) pairs of one (batch, head): causal is bottom-right aligned. */
int64_t visible_pairs(int64_t Lq, int64_t Lk, int causal);

/* ------------------------------------------------------------------------------------------ */
/* The problem: inputs and outputs of one shape                                               */
/* ------------------------------------------------------------------------------------------ */

/* The inputs and outputs of one storage type. f32 uses the problem's own float arrays; a
 * 16-bit type has q, k, v (and dout) rounded from them, its own out_dma and out_dense of that
 * type, and float32 lse. */
typedef struct problem_dtype {
    dma_dtype t;
    void *q, *k, *v, *dout, *out_dma, *out_dense; /* f32: aliases; dout NULL without backward */
    float *lse, *lse_dense;                       /* f32: aliases */
    dma_tensor tq, tk, tv, tdout, tout_dma, tout_dense, tlse, tlse_dense;
} problem_dtype;

/* Each impl has its own out and lse (lse: dma, lse_dense: dense), so that a backward always
 * reads what its own forward wrote; so has each storage type. With `backward`, dout (random,
 * fixed seed) and the float32 gradients dq, dk, dv, dbias are allocated too (once per problem;
 * every backward writes them whole). The float32 arrays are always there (the data is made in
 * float32, and the OpenBLAS baseline reads them). */
typedef struct problem {
    int64_t B, Lq, Lk, Hq, Hkv, D;
    int64_t n_q, n_kv, n_bias, n_lse;
    int backward;
    float *q, *k, *v, *bias;
    float *out_dma, *out_dense, *out_blas, *lse, *lse_dense;
    float *dout, *dq, *dk, *dv, *dbias; /* NULL without backward */
    dma_tensor tbias, tdq, tdk, tdv, tdbias;
    int ndt;                            /* storage types measured, f32 (when asked) first */
    problem_dtype dt[BENCH_MAX_DTYPES];
} problem;

/* Allocate and fill the problem (fixed seeds: the same shape always gets the same data), with
 * the ndt storage types dts[] (in that order; 1..BENCH_MAX_DTYPES, no repeats). */
void problem_init(problem *p, int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,
                  int64_t D, int backward, int ndt, const dma_dtype *dts);
void problem_free(problem *p);

/* The problem's shape into r. */
void fill_shape(result *r, const problem *p);

/* r->gflops from r->op, r->D, r->pairs and r->ms_median. */
void set_gflops(result *r);

/* ------------------------------------------------------------------------------------------ */
/* dmattn measurements                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* The library's dense path (no sparsity, no bias; causal as asked; the lse is written) in every
 * storage type of the problem, their calls alternating: one forward line per type into res[].
 * Returns p->ndt. */
int measure_dense(dma_context *ctx, problem *p, int causal, runspec rs, result res[]);

/* The dense backward: dma_backward with no sparsity and no bias (so no dbias), causal as the
 * dense forward, on the out/lse that measure_dense() left (call it after that, same causal), in
 * every storage type, alternating: one backward line per type. Returns p->ndt. */
int measure_dense_backward(dma_context *ctx, problem *p, int causal, runspec rs, result res[]);

/* dma with a generated sparsity (mask topk or window, causal): one mask_build line (res[0]),
 * then per storage type a forward line and, with p->backward, a backward line. Returns the
 * number of lines: 1 + p->ndt * (1 + p->backward). */
int measure_dma(dma_context *ctx, problem *p, int mask, int64_t window, runspec rs,
                result res[]);

#endif /* DMATTN_BENCH_RUN_H */

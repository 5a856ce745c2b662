/*
 * bench_blas.h - the OpenBLAS side of dmattn-bench: a plain dense attention with OpenBLAS (impl
 * openblas, float32) and the SGEMM reference (op sgemm), plus the care OpenBLAS's threads need
 * on a shared machine. Implemented in bench_blas.c; without OpenBLAS (the build does not define
 * DMATTN_BENCH_HAVE_OPENBLAS) only the two no-op helpers exist and HAVE_OPENBLAS is 0.
 */
#ifndef DMATTN_BENCH_BLAS_H
#define DMATTN_BENCH_BLAS_H

#include "bench_run.h"

#ifdef DMATTN_BENCH_HAVE_OPENBLAS
#define HAVE_OPENBLAS 1
#else
#define HAVE_OPENBLAS 0
#endif

/* Rows per block of the OpenBLAS baseline (bounds its scratch to threads * ROWS * Lk floats). */
#define BLAS_ROWS 256

/* Warn (stderr) when OpenBLAS runs its generic kernels on a CPU with AVX2. No-op without it. */
void check_blas_core(void);

/* Sleep (untimed) until OpenBLAS's busy-waiting worker threads are idle. No-op without it. */
void settle_blas(void);

#if HAVE_OPENBLAS
/* The OpenBLAS dense attention over the problem's float32 q, k, v into p->out_blas (causal or
 * not), OpenMP over row blocks with exactly `threads` threads: one forward line, dtype f32. */
result measure_openblas(problem *p, int causal, int threads, const char *isa, runspec rs);

/* C = A B, square N, single precision, OpenBLAS with exactly `threads` threads: the sgemm line. */
result measure_sgemm(int64_t n, int threads, const char *isa, runspec rs);
#endif

#endif /* DMATTN_BENCH_BLAS_H */

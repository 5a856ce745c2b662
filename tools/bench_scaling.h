/*
 * bench_scaling.h - the thread-scaling mode of dmattn-bench (--sweep-threads LIST without
 * --sweep): one shape, the dma mask build, forward and backward (and the OpenBLAS SGEMM
 * reference) at each thread count, with the speed-up and efficiency over the fewest threads.
 * Implemented in bench_scaling.c.
 */
#ifndef DMATTN_BENCH_SCALING_H
#define DMATTN_BENCH_SCALING_H

#include <dmattn.h>

#include "bench_common.h"
#include "bench_decode.h" /* BENCH_MAX_DTYPES */

#include <stdint.h>

typedef struct scaling_options {
    int64_t B, Lq, Lk, Hq, Hkv, D, window;
    int mask;                /* MASK_TOPK or MASK_WINDOW */
    int nthreads;
    const int64_t *threads;  /* the thread counts, in the order given */
    dma_isa isa;
    int ndtypes;             /* f32 first when present */
    const dma_dtype *dtypes;
    runspec rs;
    int64_t sgemm_n;         /* the SGEMM reference's size (without OpenBLAS: none) */
    int json;
} scaling_options;

/* Run the mode; output on stdout (JSON lines or a table). Returns the exit status (0); library
 * and allocation failures exit 1. */
int bench_scaling_run(const scaling_options *o);

#endif /* DMATTN_BENCH_SCALING_H */

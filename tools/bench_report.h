/*
 * bench_report.h - the reporters of dmattn-bench's regular and sweep modes: the ratios between
 * the lines of one shape (link_results), JSON lines and the table. Implemented in
 * bench_report.c.
 */
#ifndef DMATTN_BENCH_REPORT_H
#define DMATTN_BENCH_REPORT_H

#include "bench_run.h"

#include <stdint.h>

/* How lines are printed: JSON (one object a line) or table rows; the table with the shape
 * columns (L, D, Hkv, thr: the sweep) and with a dtype column (more than one storage type). */
typedef struct report_style {
    int json, with_shape, with_dtype;
} report_style;

/* Fill speed-ups, the mask_build percentage, the SGEMM ratio and the 16-bit lines' ratio to
 * f32 among r[0..n) (any order); sgemm may be NULL. Baselines are matched on the shape and
 * thread count; speedup_vs_dense, pct_of_forward and bwd_fwd_ratio on the dtype too (the
 * openblas baseline and sgemm are float32 and serve every dtype). */
void link_results(result *r, int n, const result *sgemm);

/* Thread scaling among r[0..n) (one shape at several thread counts): each line's speed-up
 * over the line of the same op, impl and dtype with the fewest threads, and that speed-up
 * divided by the thread ratio (the scaling efficiency). */
void link_thread_scaling(result *r, int n);

/* max |a[i] - b[i]| (NaN anywhere gives NaN or the largest difference, never hides it). */
double max_abs_diff(const float *a, const float *b, int64_t n);

/* The table's column titles (nothing in JSON mode: callers check). */
void print_table_header(report_style st);

/* One line: a JSON object or a table row. */
void emit(report_style st, const result *r);

/* Lines of one shape in a fixed order: dma (mask_build, forward[, backward]; per window and
 * dtype, in the order measured), then dense (forward[, backward]), then openblas. */
void emit_group(report_style st, const result *r, int n);

/* The table's closing lines for an sgemm reference: each forward and backward line's GFLOP/s
 * as a fraction of sg's. */
void print_sgemm_summary(report_style st, const result *r, int n, const result *sg);

/* The table's closing lines for 16-bit storage: each 16-bit forward and backward line's time
 * against the f32 line's, and their ratio. */
void print_dtype_summary(const result *r, int n);

/* The thread-scaling table: per op and dtype, one row per thread count with the time, the
 * speed-up and efficiency over the fewest threads, GFLOP/s and the fraction of the SGEMM
 * GFLOP/s at the same thread count. */
void print_scaling_table(const result *r, int n);

#endif /* DMATTN_BENCH_REPORT_H */

/*
 * bench_report.c - the reporters of dmattn-bench (see bench_report.h): the ratios between the
 * lines of one shape, JSON lines and the table. Moved out of dmattn-bench.c.
 */
#include "bench_report.h"

#include "bench_dtype.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Ratios between the lines of one shape                                                      */
/* ------------------------------------------------------------------------------------------ */

static int same_shape(const result *a, const result *b)
{
    return a->B == b->B && a->Lq == b->Lq && a->Lk == b->Lk && a->Hq == b->Hq &&
           a->Hkv == b->Hkv && a->D == b->D && a->threads == b->threads;
}

/* Same measurement but for the storage type: op, impl, mask, window, causal. */
static int same_line(const result *a, const result *b)
{
    return a->op == b->op && a->impl == b->impl && a->window == b->window &&
           a->causal == b->causal && a->mask && b->mask && !strcmp(a->mask, b->mask);
}

void link_results(result *r, int n, const result *sgemm)
{
    for (int i = 0; i < n; i++) {
        if (r[i].op != OP_FORWARD)
            continue;
        for (int j = 0; j < n; j++) {
            if (r[j].op != OP_FORWARD || !same_shape(&r[i], &r[j]) || r[j].ms_median <= 0)
                continue;
            if (r[j].impl == IMPL_DENSE && r[j].dtype == r[i].dtype)
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
                r[j].window == r[i].window && r[j].mask == r[i].mask &&
                r[j].dtype == r[i].dtype && r[j].ms_median > 0)
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
            if (r[j].op == OP_BACKWARD && r[j].impl == IMPL_DENSE && r[j].dtype == r[i].dtype)
                r[i].speedup_vs_dense = r[j].ms_median / r[i].ms_median;
            if (r[j].op == OP_FORWARD && r[j].impl == r[i].impl && r[j].window == r[i].window &&
                r[j].causal == r[i].causal && r[j].mask && r[i].mask &&
                !strcmp(r[j].mask, r[i].mask) && r[j].dtype == r[i].dtype)
                r[i].bwd_fwd_ratio = r[i].ms_median / r[j].ms_median;
        }
        if (sgemm && sgemm->threads == r[i].threads && sgemm->gflops > 0)
            r[i].gflops_vs_sgemm = r[i].gflops / sgemm->gflops;
    }
    /* 16-bit forward and backward lines: vs the f32 line of the same measurement */
    for (int i = 0; i < n; i++) {
        if ((r[i].op != OP_FORWARD && r[i].op != OP_BACKWARD) || r[i].dtype == DMA_F32 ||
            r[i].ms_median <= 0)
            continue;
        for (int j = 0; j < n; j++)
            if (r[j].dtype == DMA_F32 && same_line(&r[i], &r[j]) && same_shape(&r[i], &r[j]) &&
                r[j].ms_median > 0)
                r[i].speedup_vs_f32 = r[j].ms_median / r[i].ms_median;
    }
}

void link_thread_scaling(result *r, int n)
{
    for (int i = 0; i < n; i++) {
        const result *base = NULL;
        for (int j = 0; j < n; j++)
            if (r[j].op == r[i].op && r[j].impl == r[i].impl && r[j].dtype == r[i].dtype &&
                r[j].ms_median > 0 && (!base || r[j].threads < base->threads))
                base = &r[j];
        if (!base || !(r[i].ms_median > 0))
            continue;
        r[i].base_threads = base->threads;
        r[i].thread_speedup = base->ms_median / r[i].ms_median;
        r[i].thread_efficiency =
            r[i].thread_speedup * (double)base->threads / (double)r[i].threads;
    }
}

double max_abs_diff(const float *a, const float *b, int64_t n)
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
    json_str("dtype", dtype_name(r->dtype));
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
    if (r->op == OP_MASK_BUILD) {
        json_num("pct_of_forward", r->pct_of_forward);
        json_num("fresh_build_ms", r->fresh_ms);
    }
    if (r->op == OP_FORWARD || r->op == OP_BACKWARD) {
        json_num("speedup_vs_dense", r->speedup_vs_dense);
        json_num("speedup_vs_openblas", r->speedup_vs_openblas); /* backward: always null */
        json_num("gflops_vs_sgemm", r->gflops_vs_sgemm);
        if (r->dtype != DMA_F32)
            json_num("speedup_vs_f32", r->speedup_vs_f32);
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
    if (r->base_threads > 0) {
        json_int("base_threads", r->base_threads, 0);
        json_num("thread_speedup", r->thread_speedup);
        json_num("thread_efficiency", r->thread_efficiency);
    }
    printf("}\n");
}

/* "%-5s " with the dtype (or its column's title) when the table has that column, else "". */
static const char *dtype_col(char *buf, size_t n, int with_dtype, const char *s)
{
    if (!with_dtype)
        return "";
    snprintf(buf, n, "%-5s ", s);
    return buf;
}

void print_table_header(report_style st)
{
    char dt[16];
    const char *c = dtype_col(dt, sizeof dt, st.with_dtype, "dtype");
    if (st.with_shape)
        printf("%-8s %-10s %-6s %s%6s %4s %3s %6s %3s %11s %9s %8s  %s\n", "impl", "op", "mask",
               c, "L", "D", "Hkv", "window", "thr", "ms_median", "GFLOP/s", "vs_dense", "note");
    else
        printf("%-8s %-10s %-6s %s%6s %11s %9s %8s  %s\n", "impl", "op", "mask", c, "window",
               "ms_median", "GFLOP/s", "vs_dense", "note");
}

static void print_table_row(const result *r, report_style st)
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
    if (r->op == OP_MASK_BUILD && isfinite(r->fresh_ms))
        NOTE("%sfresh build %.3f ms", o ? ", " : "", r->fresh_ms);
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
    if ((r->op == OP_FORWARD || r->op == OP_BACKWARD) && isfinite(r->speedup_vs_f32))
        NOTE("%svs_f32=%.2fx", o ? " " : "", r->speedup_vs_f32);
    if (r->runs == 1 && r->warmup == 0)
        NOTE("%s(1 run, no warm-up)", o ? " " : "");
#undef NOTE
    char dt[16];
    const char *c = dtype_col(dt, sizeof dt, st.with_dtype, dtype_name(r->dtype));
    if (st.with_shape) {
        char L[32], D[16], hkv[16];
        if (r->Lq < 0)
            snprintf(L, sizeof L, "-");
        else if (r->Lq == r->Lk)
            snprintf(L, sizeof L, "%lld", (long long)r->Lq);
        else
            snprintf(L, sizeof L, "%lld/%lld", (long long)r->Lq, (long long)r->Lk);
        snprintf(D, sizeof D, "%lld", (long long)r->D);
        snprintf(hkv, sizeof hkv, "%lld", (long long)r->Hkv);
        printf("%-8s %-10s %-6s %s%6s %4s %3s %6s %3d %11s %9s %8s  %s\n", impl_names[r->impl],
               op_names[r->op], r->mask ? r->mask : "-", c, L, r->D < 0 ? "-" : D,
               r->Hkv < 0 ? "-" : hkv, win, r->threads, ms, gf, sp, note);
    } else {
        printf("%-8s %-10s %-6s %s%6s %11s %9s %8s  %s\n", impl_names[r->impl],
               op_names[r->op], r->mask ? r->mask : "-", c, win, ms, gf, sp, note);
    }
}

void emit(report_style st, const result *r)
{
    if (st.json)
        print_json(r);
    else
        print_table_row(r, st);
}

void emit_group(report_style st, const result *r, int n)
{
    static const int order[] = {IMPL_DMA, IMPL_DENSE, IMPL_OPENBLAS};
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < n; i++)
            if (r[i].impl == order[k])
                emit(st, &r[i]);
    fflush(stdout);
}

void print_sgemm_summary(report_style st, const result *r, int n, const result *sg)
{
    for (int i = 0; i < n; i++) {
        if ((r[i].op != OP_FORWARD && r[i].op != OP_BACKWARD) || !isfinite(r[i].gflops_vs_sgemm))
            continue;
        if (st.with_dtype)
            printf("  %s %s %s: %.2f GFLOP/s = %.3f of SGEMM (%.2f GFLOP/s)\n",
                   impl_names[r[i].impl], op_names[r[i].op], dtype_name(r[i].dtype), r[i].gflops,
                   r[i].gflops_vs_sgemm, sg->gflops);
        else
            printf("  %s %s: %.2f GFLOP/s = %.3f of SGEMM (%.2f GFLOP/s)\n",
                   impl_names[r[i].impl], op_names[r[i].op], r[i].gflops, r[i].gflops_vs_sgemm,
                   sg->gflops);
    }
}

void print_dtype_summary(const result *r, int n)
{
    for (int i = 0; i < n; i++)
        if ((r[i].op == OP_FORWARD || r[i].op == OP_BACKWARD) && isfinite(r[i].speedup_vs_f32))
            printf("  %s %s %s vs f32: %.3f ms vs %.3f ms, speedup_vs_f32 = %.2fx\n",
                   impl_names[r[i].impl], op_names[r[i].op], dtype_name(r[i].dtype),
                   r[i].ms_median, r[i].ms_median * r[i].speedup_vs_f32, r[i].speedup_vs_f32);
}

void print_scaling_table(const result *r, int n)
{
    static const int order[] = {OP_MASK_BUILD, OP_FORWARD, OP_BACKWARD, OP_SGEMM};
    printf("%-10s %-8s %-5s %7s %11s %8s %10s %9s %8s\n", "op", "impl", "dtype", "threads",
           "ms_median", "speedup", "efficiency", "GFLOP/s", "of_sgemm");
    for (int k = 0; k < 4; k++) {
        /* one block per (op, dtype), threads in the order measured */
        for (int i = 0; i < n; i++) {
            if (r[i].op != order[k])
                continue;
            int first = 1;
            for (int j = 0; j < i; j++)
                first &= !(r[j].op == r[i].op && r[j].dtype == r[i].dtype);
            if (!first)
                continue;
            for (int j = i; j < n; j++) {
                if (r[j].op != r[i].op || r[j].dtype != r[i].dtype)
                    continue;
                char ms[32], spd[32], eff[32], gf[32], of[32];
                fmt_num(ms, sizeof ms, "%.3f", r[j].ms_median);
                fmt_num(spd, sizeof spd, "%.2fx", r[j].thread_speedup);
                fmt_num(eff, sizeof eff, "%.0f%%", 100.0 * r[j].thread_efficiency);
                fmt_num(gf, sizeof gf, "%.2f", r[j].op == OP_MASK_BUILD ? NAN : r[j].gflops);
                fmt_num(of, sizeof of, "%.3f", r[j].gflops_vs_sgemm);
                printf("%-10s %-8s %-5s %7d %11s %8s %10s %9s %8s\n", op_names[r[j].op],
                       impl_names[r[j].impl], dtype_name(r[j].dtype), r[j].threads, ms, spd, eff,
                       gf, of);
            }
        }
    }
    fflush(stdout);
}

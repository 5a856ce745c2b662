/*
 * bench_common.c - the helpers the modes of dmattn-bench share (see bench_common.h), moved
 * out of dmattn-bench.c unchanged.
 */
#include "bench_common.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                              */
/* ------------------------------------------------------------------------------------------ */

void usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nTry '" PROG " --help'.\n", stderr);
    exit(2);
}

void fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* Every library call goes through here: on error print the status and the context's sentence. */
void check(const dma_context *ctx, dma_status st, const char *what)
{
    if (st == DMA_OK)
        return;
    fprintf(stderr, PROG ": %s failed: %s (status %d)", what, dma_status_string(st), (int)st);
    if (ctx) {
        const char *e = dma_context_last_error(ctx);
        if (e && *e)
            fprintf(stderr, ": %s", e);
    }
    fputc('\n', stderr);
    exit(1);
}

/* 64-byte aligned array of n elements of `size` bytes, overflow-checked; exits on failure. */
void *xalloc(int64_t n, size_t size, const char *what)
{
    if (n < 0 || (n > 0 && (uint64_t)n > (SIZE_MAX - 64) / size))
        fatal("allocation size overflow for %s (%lld elements)", what, (long long)n);
    size_t bytes = (size_t)n * size;
    bytes = (bytes + 63) & ~(size_t)63;
    if (bytes == 0)
        bytes = 64;
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes) != 0 || !p)
        fatal("out of memory allocating %zu bytes for %s", bytes, what);
    return p;
}

/* n = a * b * c * d with overflow check (all >= 0). */
int64_t mul4(int64_t a, int64_t b, int64_t c, int64_t d, const char *what)
{
    int64_t f[4] = {a, b, c, d}, n = 1;
    for (int i = 0; i < 4; i++) {
        if (f[i] < 0 || (f[i] > 0 && n > INT64_MAX / f[i]))
            fatal("size overflow for %s", what);
        n *= f[i];
    }
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* Timing                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static timing summarize(double *t, int runs, int warmup)
{
    timing r;
    r.median = sort_median(t, runs);
    r.min = t[0];
    r.max = t[runs - 1];
    r.per_call = NAN;
    r.runs = runs;
    r.warmup = warmup;
    return r;
}

/* Time `nfn` (1..BENCH_MAX_FN) functions, alternating between them call by call: measurements
 * taken this way see the same machine (frequency, neighbours), so their ratios are steadier than
 * those of measurements taken one after the other. out[f].per_call (f >= 1) is the median, over
 * rounds, of fn[f]'s call over fn[f - 1]'s call of the same round: a ratio of neighbours in time,
 * which drift between rounds does not move (out[0].per_call is NaN). `before` (optional,
 * untimed) runs before every call of fn[0]. max_ms bounds the total of all timed calls. */
void time_alternating(int nfn, bench_fn const fn[], void *const arg[], bench_fn before,
                      runspec rs, timing out[])
{
    if (nfn < 1 || nfn > BENCH_MAX_FN)
        fatal("internal error: time_alternating of %d functions", nfn);
    const int warmup = rs.warmup;
    int runs = rs.runs;
    double *t = xalloc((int64_t)nfn * runs, sizeof *t, "timings"), total = 0.0;
    for (int i = 0; i < warmup + runs; i++) {
        for (int f = 0; f < nfn; f++) {
            if (before && f == 0)
                before(arg[0]);
            double t0 = now_ms();
            fn[f](arg[f]);
            double t1 = now_ms();
            if (i >= warmup) {
                t[f * rs.runs + i - warmup] = t1 - t0;
                total += t1 - t0;
            }
        }
        if (i >= warmup && rs.max_ms > 0 && total >= rs.max_ms) {
            runs = i - warmup + 1;
            break;
        }
    }
    double per_call[BENCH_MAX_FN]; /* before summarize() sorts each function's times */
    per_call[0] = NAN;
    if (nfn >= 2) {
        double *ratio = xalloc(runs, sizeof *ratio, "timings");
        for (int f = 1; f < nfn; f++) {
            for (int i = 0; i < runs; i++)
                ratio[i] = t[f * rs.runs + i] / t[(f - 1) * rs.runs + i];
            per_call[f] = summarize(ratio, runs, warmup).median;
        }
        free(ratio);
    }
    for (int f = 0; f < nfn; f++) {
        out[f] = summarize(t + f * rs.runs, runs, warmup);
        out[f].per_call = per_call[f];
    }
    free(t);
}

/* `before` (optional, untimed) runs before every call of `fn`. */
timing time_it(bench_fn fn, bench_fn before, void *arg, runspec rs)
{
    timing tm;
    time_alternating(1, &fn, &arg, before, rs, &tm);
    return tm;
}

/* ------------------------------------------------------------------------------------------ */
/* Output and command line                                                                    */
/* ------------------------------------------------------------------------------------------ */

void json_int(const char *key, int64_t v, int first)
{
    if (v < 0)
        printf("%s\"%s\":null", first ? "" : ",", key);
    else
        printf("%s\"%s\":%lld", first ? "" : ",", key, (long long)v);
}

void json_num(const char *key, double v)
{
    if (isfinite(v))
        printf(",\"%s\":%.6g", key, v);
    else
        printf(",\"%s\":null", key);
}

void json_str(const char *key, const char *s)
{
    if (s)
        printf(",\"%s\":\"%s\"", key, s); /* our strings never need escaping */
    else
        printf(",\"%s\":null", key);
}

void fmt_num(char *buf, size_t n, const char *fmt, double v)
{
    if (isfinite(v))
        snprintf(buf, n, fmt, v);
    else
        snprintf(buf, n, "-");
}

int64_t parse_int(const char *flag, const char *s, int64_t lo, int64_t hi)
{
    errno = 0;
    char *end = NULL;
    long long v = strtoll(s, &end, 10);
    if (errno == ERANGE || end == s || *end != '\0')
        usage_error("%s expects an integer, got '%s'", flag, s);
    if (v < lo || v > hi)
        usage_error("%s must be in %lld..%lld, got %lld", flag, (long long)lo, (long long)hi, v);
    return (int64_t)v;
}

dma_context *make_context(int threads, dma_isa isa)
{
    dma_context_options co;
    memset(&co, 0, sizeof co);
    co.threads = threads;
    co.isa = isa;
    dma_context *ctx = NULL;
    dma_status st = dma_context_create(&co, &ctx);
    if (st != DMA_OK) {
        /* no context yet, so no dma_context_last_error(): say what was asked for */
        fprintf(stderr, PROG ": dma_context_create(threads=%d, isa=%s) failed: %s (status %d)",
                threads, dma_isa_name(isa), dma_status_string(st), (int)st);
        if (isa != DMA_ISA_AUTO && !dma_isa_supported(isa))
            fprintf(stderr, "; this build or CPU does not support isa %s", dma_isa_name(isa));
        else if (isa == DMA_ISA_AUTO && getenv("DMATTN_ISA"))
            fprintf(stderr, "; check DMATTN_ISA=%s", getenv("DMATTN_ISA"));
        fputc('\n', stderr);
        exit(1);
    }
    if (!ctx)
        fatal("dma_context_create returned DMA_OK but no context");
    return ctx;
}

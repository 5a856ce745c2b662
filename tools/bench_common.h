/*
 * bench_common.h - what the modes of dmattn-bench share: error exits, aligned allocation,
 * the timing loop, the JSON field printers, the integer option parser and the context
 * constructor (implemented in bench_common.c), and through bench_numbers.h the clock, seeded
 * random fills and the median.
 */
#ifndef DMATTN_BENCH_COMMON_H
#define DMATTN_BENCH_COMMON_H

#include <dmattn.h>

#include "bench_numbers.h"

#include <stddef.h>
#include <stdint.h>

#define PROG "dmattn-bench"

/* ------------------------------------------------------------------------------------------ */
/* Errors, allocation, sizes                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* A bad command line: print the message and a pointer to --help on stderr, exit 2. */
void usage_error(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

/* A library or allocation failure: print the message on stderr, exit 1. */
void fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

/* Every library call goes through here: on error print the status and the context's sentence
 * (ctx may be NULL) and exit 1. */
void check(const dma_context *ctx, dma_status st, const char *what);

/* 64-byte aligned array of n elements of `size` bytes, overflow-checked; exits on failure. */
void *xalloc(int64_t n, size_t size, const char *what);

/* n = a * b * c * d with overflow check (all >= 0); exits on overflow. */
int64_t mul4(int64_t a, int64_t b, int64_t c, int64_t d, const char *what);

/* ------------------------------------------------------------------------------------------ */
/* Timing                                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef void (*bench_fn)(void *arg);

/* How to time one measurement: `warmup` untimed calls, then up to `runs` timed calls; with
 * max_ms > 0 the timed calls stop once they total max_ms (at least one is always taken). */
typedef struct runspec {
    int warmup, runs;
    double max_ms;
} runspec;

typedef struct timing {
    double median, min, max;
    double per_call; /* alternated fn[f > 0]: median over rounds of its call / fn[f-1]'s call */
    int runs, warmup;
} timing;

/* Most functions time_alternating() takes. */
#define BENCH_MAX_FN 8

/* Time `nfn` (1..BENCH_MAX_FN) functions, alternating between them call by call: measurements
 * taken this way see the same machine (frequency, neighbours), so their ratios are steadier than
 * those of measurements taken one after the other. out[f].per_call (f >= 1) is the median, over
 * rounds, of fn[f]'s call over fn[f - 1]'s call of the same round: a ratio of neighbours in time,
 * which drift between rounds does not move (out[0].per_call is NaN). `before` (optional,
 * untimed) runs before every call of fn[0]. max_ms bounds the total of all timed calls. */
void time_alternating(int nfn, bench_fn const fn[], void *const arg[], bench_fn before,
                      runspec rs, timing out[]);

/* `before` (optional, untimed) runs before every call of `fn`. */
timing time_it(bench_fn fn, bench_fn before, void *arg, runspec rs);

/* ------------------------------------------------------------------------------------------ */
/* Output and command line                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* JSON fields on stdout: `,"key":value` (json_int without the comma when `first`). A negative
 * integer and a non-finite number print as null, a NULL string as null. */
void json_int(const char *key, int64_t v, int first);
void json_num(const char *key, double v);
void json_str(const char *key, const char *s);

/* snprintf of one number for the table; "-" when it is not finite. */
void fmt_num(char *buf, size_t n, const char *fmt, double v);

/* The integer value of option `flag` in lo..hi; anything else is a usage error (exit 2). */
int64_t parse_int(const char *flag, const char *s, int64_t lo, int64_t hi);

/* A dmattn context with `threads` threads and the given ISA; exits 1 (with the reason) when it
 * cannot be made. */
dma_context *make_context(int threads, dma_isa isa);

#endif /* DMATTN_BENCH_COMMON_H */

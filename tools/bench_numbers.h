/*
 * bench_numbers.h - the library-free pieces the benchmark tools share: the clock, seeded
 * random fills and the median. dmattn-ab uses them without linking the library (it loads two
 * builds of it with dlopen); dmattn-bench through bench_common.h. Implemented in
 * bench_numbers.c.
 */
#ifndef DMATTN_BENCH_NUMBERS_H
#define DMATTN_BENCH_NUMBERS_H

#include <stdint.h>

/* CLOCK_MONOTONIC in milliseconds. */
double now_ms(void);

uint64_t splitmix64(uint64_t *s);

/* Uniform in [lo, hi), deterministic for a given seed. */
void fill_uniform(float *x, int64_t n, uint64_t seed, float lo, float hi);

/* Sorts t[0..n) (n >= 1) ascending and returns its median (the mean of the middle two for an
 * even n). */
double sort_median(double *t, int n);

#endif

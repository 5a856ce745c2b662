/*
 * bench_numbers.c - the clock, seeded random fills and the median (see bench_numbers.h).
 */
#include "bench_numbers.h"

#include <stdlib.h>
#include <time.h>

double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void fill_uniform(float *x, int64_t n, uint64_t seed, float lo, float hi)
{
    uint64_t s = seed * 0x2545F4914F6CDD1Dull + 12345u;
    for (int64_t i = 0; i < n; i++) {
        float u = (float)(splitmix64(&s) >> 40) * (1.0f / 16777216.0f);
        x[i] = lo + (hi - lo) * u;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double sort_median(double *t, int n)
{
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

/*
 * kernel_test.h - what the kernel suites (test_kernels.c, test_kernels_backward.c,
 * test_kernels_half.c) share: the kernel tables (lib/kernels.h) this host runs, buffers of exact
 * size, random key rows and random row selections.
 */
#ifndef DMATTN_TEST_KERNEL_TEST_H
#define DMATTN_TEST_KERNEL_TEST_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "dmattn.h"
#include "kernels.h"

/* Tolerance of the kernels against the scalar table, relative to the size of the terms. */
#define TOL 1e-5

typedef struct table {
    dma_isa isa;
    const dma_kernels *k;
} table;

/* Every table this host runs, scalar first (at most 4); asserts (Check) that each has every
 * kernel and sane block sizes. Call inside a test. */
int kernel_tables(table out[4]);

/* 64-byte aligned (as the driver's panels are) but of exactly `count` floats, so that ASan sees
 * the true end of the buffer; free() it. */
float *fbuf(size_t count);

/* The head dimensions the suites sweep. */
#define N_HEAD_DIMS 8
extern const int64_t head_dims[N_HEAD_DIMS];

int round_up(int a, int b);

/* A random multiple of nr in [nr, DMA_CHUNK], biased to the ends. */
int draw_n(test_rng *r, int nr);

/* Guard pattern for "untouched" checks. */
#define GUARD (-12345.678f)
void fill_guard(float *p, size_t n);

/* Key rows of a random K: `nkeys` rows of `ld` floats (an fbuf). */
float *random_rows(test_rng *r, int64_t nkeys, int64_t ld);

/* A row's selection of a chunk (the kernels' bits, bit0, lo, hi). */
typedef struct row_sel {
    uint64_t *bits; /* NULL: no mask */
    int bit0, lo, hi;
} row_sel;

/* A random selection of an n-position chunk, its bitmask row (use_bits) of exactly the words
 * that hold positions bit0 + [0, hi) (free() it). */
row_sel draw_sel(test_rng *r, int n, int use_bits);

/* Whether position c is selected. */
int is_selected(const row_sel *rs, int c);

/* |got - want| <= rel |want| + abs_tol, NaN only for NaN, an infinity only for itself. */
int close_rel(double got, double want, double rel, double abs_tol);

#endif

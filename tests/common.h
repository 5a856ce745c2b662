/*
 * common.h - small helpers shared by the dmattn test suites: a seeded PRNG, the list of
 * contexts to test (every ISA the host supports x threads 1 and 2), sentinel buffers.
 */
#ifndef DMATTN_TESTS_COMMON_H
#define DMATTN_TESTS_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include <check.h>

#include "dmattn.h"

/* Like ck_assert_msg, but silent while the condition holds. (Check's ck_assert_* report every
 * passing assertion to the parent process with a system call; loops over elements use this.) */
#define REQUIRE(cond, ...)                                                                    \
    do {                                                                                      \
        if (!(cond))                                                                          \
            ck_abort_msg(__VA_ARGS__);                                                        \
    } while (0)

/* ---- PRNG: splitmix64 (Steele, Lea, Flood 2014); fixed seeds make every run identical ---- */

typedef struct test_rng {
    uint64_t state;
} test_rng;

test_rng rng_make(uint64_t seed);
uint64_t rng_u64(test_rng *r);
/** Uniform double in [0, 1). */
double rng_unit(test_rng *r);
/** Uniform float in [lo, hi). */
float rng_float(test_rng *r, float lo, float hi);
/** Uniform integer in [lo, hi] (inclusive). */
int64_t rng_int(test_rng *r, int64_t lo, int64_t hi);
/** One element of `values` (n of them), uniformly. */
int64_t rng_pick(test_rng *r, const int64_t *values, int n);
/** 1 with probability p, else 0. */
int rng_bernoulli(test_rng *r, double p);

/* ---- random attention shapes (the forward and backward suites) ---- */

/** Head pairs (Hq, Hkv) and head dimensions the random cases pick from. */
extern const int64_t TEST_HEADS[4][2];
extern const int64_t TEST_DIMS[7];
/** Halves the longer of *Lq and *Lk (Lq on a tie) while per_pair * Lq * Lk > max_work, where
 *  per_pair is the work of one (query, key) pair (B * Hq * D). */
void test_fit_work(double per_pair, int64_t *Lq, int64_t *Lk, double max_work);
/** A random boolean mask of n bytes (nonzero, 1 to 3, with probability density) into *mask and
 *  its 0/1 selection into *sel, both allocated with test_malloc. */
void test_random_mask(test_rng *r, double density, int64_t n, uint8_t **mask, uint8_t **sel);

/* ---- contexts ---- */

#define TEST_MAX_CTX 8

typedef struct test_ctx {
    dma_context *ctx;
    dma_isa isa;
    int threads;
} test_ctx;

/** Creates one context per (supported ISA, threads in {1, 2}), in the order
 *  scalar/1, scalar/2, avx2/1, avx2/2, ... Fails the current Check test if a supported ISA
 *  cannot be given a context. Returns the number of contexts written to `list`. */
int test_contexts_create(test_ctx list[TEST_MAX_CTX]);
void test_contexts_destroy(test_ctx list[TEST_MAX_CTX], int n);

/** A context on the portable path with one thread (for setup work). */
dma_context *test_scalar_context(void);

/* ---- memory ---- */

/** malloc that fails the current Check test instead of returning NULL (n == 0 allowed). */
void *test_malloc(size_t n);
void *test_calloc(size_t count, size_t size);

/** Fill `n` bytes with a recognisable, position-dependent pattern. */
void fill_sentinel(void *p, size_t n);
/** 1 if the `n` bytes still hold the fill_sentinel pattern. */
int is_sentinel(const void *p, size_t n);

/* ---- 16-bit storage: an independent round to nearest even (bf16 by bits, binary16 by the
 * compiler's _Float16), for tests of bf16/f16 inputs ---- */

uint16_t test_to_bf16(float x);
uint16_t test_to_f16(float x);
/** The float a bf16 (DMA_BF16) or binary16 (DMA_F16) bit pattern holds. */
float test_from_half(uint16_t h, dma_dtype dt);

/* ---- running ---- */

/** Run every test of the suite (CK_NORMAL output), free it, and return the process exit status
 *  (EXIT_SUCCESS when nothing failed): the whole main() of a suite's executable. */
int test_run_suite(Suite *s);

#endif /* DMATTN_TESTS_COMMON_H */

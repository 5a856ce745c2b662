/*
 * prng.h - the seeded random numbers of the training code: splitmix64 (Steele, Lea, Flood 2014).
 * Small, fast and fully determined by its 64-bit state, so a run is reproduced by its seed and
 * a data stream can be restarted at any step from (seed, step).
 */
#ifndef DMTRAIN_PRNG_H
#define DMTRAIN_PRNG_H

#include <stdint.h>

typedef struct prng {
    uint64_t state;
} prng;

/** A generator whose stream is a function of `seed` and `stream` only (e.g. a step number). */
prng prng_seeded(uint64_t seed, uint64_t stream);
uint64_t prng_u64(prng *r);
/** Uniform in [0, 1) with 53 random bits. */
double prng_unit(prng *r);
/** Uniform integer in [0, n), n >= 1 (Lemire's unbiased multiply-shift rejection). */
uint32_t prng_below(prng *r, uint32_t n);
/** Standard normal (Box-Muller; one of the pair is used, so the stream stays simple). */
float prng_normal(prng *r);

#endif /* DMTRAIN_PRNG_H */

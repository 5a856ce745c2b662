/* prng.c - splitmix64 and the distributions the training code draws from (see prng.h). */
#include "prng.h"

#include <math.h>

prng prng_seeded(uint64_t seed, uint64_t stream)
{
    /* Two rounds of mixing make nearby (seed, stream) pairs unrelated. */
    prng r = {seed ^ 0x243F6A8885A308D3ull};
    prng_u64(&r);
    r.state ^= stream * 0x9E3779B97F4A7C15ull;
    prng_u64(&r);
    return r;
}

uint64_t prng_u64(prng *r)
{
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double prng_unit(prng *r) { return (double)(prng_u64(r) >> 11) * 0x1.0p-53; }

uint32_t prng_below(prng *r, uint32_t n)
{
    uint64_t m = (uint64_t)(uint32_t)prng_u64(r) * n;
    uint32_t low = (uint32_t)m;
    if (low < n) {
        uint32_t floor = (uint32_t)(-n) % n;
        while (low < floor) {
            m = (uint64_t)(uint32_t)prng_u64(r) * n;
            low = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

float prng_normal(prng *r)
{
    double u1 = prng_unit(r), u2 = prng_unit(r);
    return (float)(sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2));
}

/*
 * bench_dtype.c - storage types of the decode mode of dmattn-bench (see bench_dtype.h): names,
 * sizes, float32 -> bf16/f16 rounding (to nearest even), finiteness checks, random buffers.
 */
#include "bench_dtype.h"

#include "bench_common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *dtype_name(dma_dtype t)
{
    switch (t) {
    case DMA_F32:
        return "f32";
    case DMA_BF16:
        return "bf16";
    case DMA_F16:
        return "f16";
    default:
        return "?";
    }
}

size_t dtype_size(dma_dtype t)
{
    return t == DMA_F32 ? 4 : 2;
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN. */
uint16_t f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float32 -> IEEE binary16, round to nearest even (subnormals included); overflow gives inf. */
uint16_t f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u, ax = u & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or NaN */
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) /* >= 65520: rounds to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { /* below 2^-14: a subnormal half or zero */
        if (ax < 0x33000000u) /* below 2^-25: rounds to zero */
            return (uint16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14..24: the value in units of 2^-24 is m >> shift */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u)))
            r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = (ax - 0x38000000u) >> 13, rem = ax & 0x1fffu; /* rebias 127 -> 15 */
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u)))
        r++; /* a carry into the exponent is the right result */
    return (uint16_t)(sign | r);
}

/* dst[0..n) = src[0..n) stored as dtype t. */
void store_as(void *dst, dma_dtype t, const float *src, int64_t n)
{
    if (t == DMA_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++)
        d[i] = t == DMA_BF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
}

/* Warn (stderr) when an output of dtype t holds a NaN or an infinity: a library bug. */
void check_finite_as(const void *x, dma_dtype t, int64_t n, const char *what)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        if (t == DMA_F32)
            bad += !isfinite(((const float *)x)[i]);
        else if (t == DMA_BF16)
            bad += (((const uint16_t *)x)[i] & 0x7f80u) == 0x7f80u;
        else
            bad += (((const uint16_t *)x)[i] & 0x7c00u) == 0x7c00u;
    }
    if (bad)
        fprintf(stderr, PROG ": warning: %lld non-finite values in %s\n", (long long)bad, what);
}

/* n random values uniform in [lo, hi) (fixed seed) stored as dtype t in a new buffer. */
void *random_as(dma_dtype t, int64_t n, uint64_t seed, float lo, float hi,
                       const char *what)
{
    float *f = xalloc(n, sizeof(float), what);
    fill_uniform(f, n, seed, lo, hi);
    if (t == DMA_F32)
        return f;
    void *d = xalloc(n, dtype_size(t), what);
    store_as(d, t, f, n);
    free(f);
    return d;
}

/*
 * bench_dtype.h - storage types (DMA_F32, DMA_BF16, DMA_F16) for dmattn-bench (--dtype):
 * names, element sizes, rounding float32 to bf16/f16 (to nearest even, the tool's own
 * converters) and random buffers of a storage type. Implemented in bench_dtype.c.
 */
#ifndef DMATTN_BENCH_DTYPE_H
#define DMATTN_BENCH_DTYPE_H

#include <dmattn.h>

#include <stddef.h>
#include <stdint.h>

/* "f32", "bf16", "f16" ("?" for anything else). */
const char *dtype_name(dma_dtype t);

/* Bytes per element: 4 for f32, 2 for bf16 and f16. */
size_t dtype_size(dma_dtype t);

/* float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN. */
uint16_t f32_to_bf16(float f);

/* float32 -> IEEE binary16, round to nearest even (subnormals included); overflow gives inf. */
uint16_t f32_to_f16(float f);

/* dst[0..n) = src[0..n) stored as dtype t. */
void store_as(void *dst, dma_dtype t, const float *src, int64_t n);

/* Warn (stderr) when an output of dtype t holds a NaN or an infinity: a library bug. */
void check_finite_as(const void *x, dma_dtype t, int64_t n, const char *what);

/* n random values uniform in [lo, hi) (fixed seed) stored as dtype t in a new buffer (free()). */
void *random_as(dma_dtype t, int64_t n, uint64_t seed, float lo, float hi, const char *what);

#endif /* DMATTN_BENCH_DTYPE_H */

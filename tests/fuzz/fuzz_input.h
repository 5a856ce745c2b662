/*
 * fuzz_input.h - what the fuzz targets share: reading numbers from the fuzzer's bytes, and
 * tensor descriptors made from them, hostile ones included (negative or huge sizes and strides,
 * wrong dtypes and ranks) but never pointing past the buffer behind them unless the library
 * must refuse them (an offset that overflows 64 bits).
 */
#ifndef DMATTN_FUZZ_INPUT_H
#define DMATTN_FUZZ_INPUT_H

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <dmattn.h>

typedef struct fuzz_input {
    const uint8_t *p;
    size_t left;
} fuzz_input;

/* The next byte, or 0 once the input is used up (so every input is a valid stream). */
static inline uint8_t fz_u8(fuzz_input *in)
{
    if (!in->left)
        return 0;
    in->left--;
    return *in->p++;
}

static inline uint32_t fz_u32(fuzz_input *in)
{
    uint32_t x = 0;
    for (int i = 0; i < 4; i++)
        x |= (uint32_t)fz_u8(in) << (8 * i);
    return x;
}

/* An integer in [0, n). */
static inline int64_t fz_below(fuzz_input *in, int64_t n) { return n > 0 ? fz_u32(in) % n : 0; }

/* A float that is often special: 0, +-inf, NaN, tiny, huge, or a small ordinary value. */
static inline float fz_float(fuzz_input *in)
{
    switch (fz_u8(in) % 12) {
    case 0: return 0.0f;
    case 1: return INFINITY;
    case 2: return -INFINITY;
    case 3: return NAN;
    case 4: return 1e-40f;
    case 5: return 3e38f;
    default: return (float)((int)fz_u8(in) - 128) / 16.0f;
    }
}

/* Fill n floats from what is left of the input, cycling over it (zeros when nothing is left),
 * without consuming it: call this after reading every parameter. */
static inline void fz_fill_floats(const fuzz_input *in, float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        fuzz_input at = {in->left ? in->p + i % in->left : NULL, in->left ? 2 : 0};
        if (at.p && at.p + 1 >= in->p + in->left)
            at.left = 1;
        x[i] = fz_float(&at);
    }
}

/* The same for bytes, reduced to 0 or 1 (masks, key padding). */
static inline void fz_fill_bits(const fuzz_input *in, uint8_t *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = in->left ? (in->p[i % in->left] >> 3) & 1 : 0;
}

/* A size that is usually small and sometimes hostile. */
static inline int64_t fz_size(fuzz_input *in, int64_t small)
{
    switch (fz_u8(in) % 16) {
    case 0: return -1 - fz_below(in, 4);
    case 1: return (int64_t)1 << (31 + fz_below(in, 32));
    case 2: return 0;
    default: return fz_below(in, small + 1);
    }
}

/* Bytes a descriptor's elements span from its data pointer; -1 when that overflows or a size or
 * stride is negative (the library must refuse it before reading anything). */
static inline int64_t fz_span_bytes(const dma_tensor *t)
{
    if (t->ndim < 1 || t->ndim > 4)
        return -1;
    int64_t last = 0;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0 || t->stride[d] < 0)
            return -1;
        if (t->shape[d] == 0)
            return 0;
        int64_t e;
        if (__builtin_mul_overflow(t->shape[d] - 1, t->stride[d], &e) ||
            __builtin_add_overflow(last, e, &last))
            return -1;
    }
    int64_t bytes;
    if (__builtin_add_overflow(last, 1, &last) || __builtin_mul_overflow(last, 4, &bytes))
        return -1;
    return bytes;
}

/* Whether calling the library with this descriptor is a fair test: its span fits the buffer
 * (so a library that reads it all stays inside), or the span cannot be computed (the library
 * must refuse it). Descriptors that are valid but larger than the buffer are the caller's error,
 * not the library's, and are skipped. */
static inline bool fz_fair(const dma_tensor *t, size_t buffer_bytes)
{
    if (!t)
        return true;
    int64_t s = fz_span_bytes(t);
    return s < 0 || (uint64_t)s <= buffer_bytes;
}

/* Mutate a well-formed descriptor now and then: a size, a stride, the dtype or the rank. */
static inline void fz_mutate(fuzz_input *in, dma_tensor *t)
{
    uint8_t what = fz_u8(in);
    if (what % 8 != 0)
        return;
    int d = (int)fz_below(in, 4);
    switch ((what / 8) % 5) {
    case 0: t->shape[d] = fz_size(in, 8); break;
    case 1: t->stride[d] = fz_size(in, 64); break;
    case 2: t->dtype = (dma_dtype)fz_below(in, 6); break;
    case 3: t->ndim = (int)fz_below(in, 6); break;
    default: t->data = NULL; break;
    }
}

#endif /* DMATTN_FUZZ_INPUT_H */

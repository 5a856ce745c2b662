/* util.c - status names, tensor views, error messages, aligned memory, tensor validation. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

const char *dma_status_string(dma_status status)
{
    switch (status) {
    case DMA_OK: return "ok";
    case DMA_ERR_NULL: return "required pointer is NULL";
    case DMA_ERR_SHAPE: return "shape mismatch";
    case DMA_ERR_STRIDE: return "invalid stride";
    case DMA_ERR_DTYPE: return "unsupported or mismatched element type";
    case DMA_ERR_HEADS: return "invalid head counts";
    case DMA_ERR_HEAD_DIM: return "head dimension outside 1..256";
    case DMA_ERR_WINDOW: return "invalid window or block size";
    case DMA_ERR_OVERFLOW: return "size overflows the index types";
    case DMA_ERR_NOMEM: return "out of memory";
    case DMA_ERR_BAD_VALUE: return "invalid value (NaN, infinity or out of range)";
    case DMA_ERR_ISA: return "instruction set not available";
    case DMA_ERR_ARG: return "invalid argument";
    case DMA_ERR_BUFFER: return "output buffer too small";
    case DMA_ERR_OVERLAP: return "an output overlaps an input or another output";
    case DMA_ERR_DEVICE: return "CUDA device unavailable or memory on the wrong device";
    default: return "unknown status";
    }
}

dma_tensor dma_tensor_4d(void *data, dma_dtype dtype, int64_t d0, int64_t d1, int64_t d2,
                         int64_t d3)
{
    dma_tensor t = {data, dtype, 4, {d0, d1, d2, d3}, {d1 * d2 * d3, d2 * d3, d3, 1}};
    return t;
}

dma_tensor dma_tensor_3d(void *data, dma_dtype dtype, int64_t d0, int64_t d1, int64_t d2)
{
    dma_tensor t = {data, dtype, 3, {d0, d1, d2, 0}, {d1 * d2, d2, 1, 0}};
    return t;
}

dma_tensor dma_tensor_2d(void *data, dma_dtype dtype, int64_t d0, int64_t d1)
{
    dma_tensor t = {data, dtype, 2, {d0, d1, 0, 0}, {d1, 1, 0, 0}};
    return t;
}

dma_tensor dma_tensor_1d(void *data, dma_dtype dtype, int64_t d0)
{
    dma_tensor t = {data, dtype, 1, {d0, 0, 0, 0}, {1, 0, 0, 0}};
    return t;
}

dma_status dma_fail(dma_context *ctx, dma_status status, const char *fmt, ...)
{
    if (ctx) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->last_error, sizeof ctx->last_error, fmt, ap);
        va_end(ap);
    }
    return status;
}

/* Larger requests fail as out of memory without reaching the allocator: no machine has them,
 * and sanitizer allocators abort on them instead of returning NULL. */
#define DMA_ALLOC_MAX ((size_t)1 << 40)

void *dma_alloc(size_t bytes)
{
    if (bytes > DMA_ALLOC_MAX)
        return NULL;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    return aligned_alloc(64, rounded ? rounded : 64);
}

void dma_free(void *p) { free(p); }

bool dma_is_bcast(int64_t got, int64_t full) { return got == 1 || got == full; }

static const char *dtype_name(dma_dtype d)
{
    switch (d) {
    case DMA_F32: return "f32";
    case DMA_BF16: return "bf16";
    case DMA_F16: return "f16";
    case DMA_BOOL: return "bool";
    default: return "unknown";
    }
}

dma_status dma_check_tensor(dma_context *ctx, const char *name, const dma_tensor *t,
                            dma_dtype dtype, int ndim)
{
    if (!t->data)
        return dma_fail(ctx, DMA_ERR_NULL, "%s: data pointer is NULL", name);
    if (t->dtype != dtype)
        return dma_fail(ctx, DMA_ERR_DTYPE, "%s: dtype %s, expected %s", name,
                        dtype_name(t->dtype), dtype_name(dtype));
    if (t->ndim != ndim)
        return dma_fail(ctx, DMA_ERR_SHAPE, "%s: %d dimensions, expected %d", name, t->ndim, ndim);
    if (t->stride[ndim - 1] != 1)
        return dma_fail(ctx, DMA_ERR_STRIDE, "%s: last stride is %lld, must be 1", name,
                        (long long)t->stride[ndim - 1]);
    int64_t span = 0;
    for (int d = 0; d < ndim; d++) {
        if (t->shape[d] < 0)
            return dma_fail(ctx, DMA_ERR_SHAPE, "%s: dimension %d has negative size %lld", name,
                            d, (long long)t->shape[d]);
        if (t->stride[d] < 0)
            return dma_fail(ctx, DMA_ERR_STRIDE, "%s: stride %d is negative (%lld)", name, d,
                            (long long)t->stride[d]);
        int64_t extent;
        if (t->shape[d] > 0 &&
            (!dma_mul_ok(t->shape[d] - 1, t->stride[d], &extent) ||
             __builtin_add_overflow(span, extent, &span)))
            return dma_fail(ctx, DMA_ERR_OVERFLOW, "%s: element offsets overflow 64 bits", name);
    }
    /* The byte offset of the last element must fit too. */
    if (span > INT64_MAX / 8)
        return dma_fail(ctx, DMA_ERR_OVERFLOW, "%s: byte offsets overflow", name);
    return DMA_OK;
}

/* The bytes [*lo, *hi) a checked tensor's elements span (empty when a dimension is 0). */
static void tensor_bytes(const dma_tensor *t, uintptr_t *lo, uintptr_t *hi)
{
    const size_t elem = t->dtype == DMA_F32 ? 4 : 2;
    int64_t last = 0;
    *lo = *hi = (uintptr_t)t->data;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] == 0)
            return;
        last += (t->shape[d] - 1) * t->stride[d];
    }
    *hi = *lo + (uintptr_t)(last + 1) * elem;
}

static bool tensors_overlap(const dma_tensor *x, const dma_tensor *y)
{
    uintptr_t xl, xh, yl, yh;
    tensor_bytes(x, &xl, &xh);
    tensor_bytes(y, &yl, &yh);
    return xl < xh && yl < yh && xl < yh && yl < xh;
}

dma_status dma_check_apart(dma_context *ctx, const dma_named_tensor *outs, int n_out,
                           const dma_named_tensor *ins, int n_in, bool pairwise)
{
    for (int i = 0; i < n_out; i++) {
        if (!outs[i].t)
            continue;
        for (int j = 0; j < n_in; j++)
            if (ins[j].t && tensors_overlap(outs[i].t, ins[j].t))
                return dma_fail(ctx, DMA_ERR_OVERLAP, "%s: its memory overlaps %s's (an output "
                                "may not share memory with an input it is computed from)",
                                outs[i].name, ins[j].name);
        for (int j = i + 1; pairwise && j < n_out; j++)
            if (outs[j].t && tensors_overlap(outs[i].t, outs[j].t))
                return dma_fail(ctx, DMA_ERR_OVERLAP, "%s and %s: their memory overlaps",
                                outs[i].name, outs[j].name);
    }
    return DMA_OK;
}

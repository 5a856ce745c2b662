/* common.cuh - what the backend's .cu files share: error recording, element loads and stores
 * of the three storage types, and the sparsity object's per-row queries. */
#ifndef DMATTN_CUDA_COMMON_CUH
#define DMATTN_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "dma_cuda.h"

/* Record a runtime error for dcu_last_error(); returns -1. */
int dcu_fail(cudaError_t e, const char *where);

/* Return -1 from the enclosing function when a runtime call fails. */
#define DCU_TRY(call)                                                                         \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        if (e_ != cudaSuccess)                                                                \
            return dcu_fail(e_, #call);                                                       \
    } while (0)

#define DCU_LAUNCHED(where) DCU_TRY(cudaGetLastError())

enum { DCU_F32 = 0, DCU_BF16 = 1, DCU_F16 = 2, DCU_BOOL = 3 };

/* Query rows per tile of the sparsity object (lib/internal.h's DMA_TILE). */
#define DCU_TILE 64

static __device__ __forceinline__ float dcu_load(const void *p, int dtype, int64_t i)
{
    if (dtype == DCU_F32)
        return ((const float *)p)[i];
    if (dtype == DCU_BF16)
        return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    return __half2float(((const __half *)p)[i]);
}

static __device__ __forceinline__ void dcu_store(void *p, int dtype, int64_t i, float x)
{
    if (dtype == DCU_F32)
        ((float *)p)[i] = x;
    else if (dtype == DCU_BF16)
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(x);
    else
        ((__half *)p)[i] = __float2half_rn(x);
}

/* Element offset of (i0, i1, i2, i3) in a tensor; a size-1 dimension broadcasts. */
static __device__ __forceinline__ int64_t dcu_off(const dcu_tensor &t, int64_t i0, int64_t i1,
                                                  int64_t i2, int64_t i3)
{
    return (t.shape[0] == 1 ? 0 : i0 * t.stride[0]) + (t.shape[1] == 1 ? 0 : i1 * t.stride[1]) +
           (t.shape[2] == 1 ? 0 : i2 * t.stride[2]) + (t.shape[3] == 1 ? 0 : i3 * t.stride[3]);
}

/* Key of union position pos of a tile. */
static __device__ __forceinline__ int32_t dcu_tile_key(const dcu_sparsity &sp, const dcu_tile &t,
                                                       int32_t pos)
{
    return t.key_off >= 0 ? sp.keys[t.key_off + pos] : t.first + pos;
}

/* Whether row `row` (global row index within its slab's rows array) selects union position pos. */
static __device__ __forceinline__ bool dcu_selects(const dcu_sparsity &sp, const dcu_tile &t,
                                                  int64_t row, int r, int32_t pos)
{
    if (pos < sp.row_lo[row] || pos >= sp.row_hi[row])
        return false;
    if (t.word_off < 0)
        return true;
    const uint64_t w = sp.words[t.word_off + (int64_t)r * t.words_per_row + (pos >> 6)];
    return (w >> (pos & 63)) & 1;
}

/* The object's slab for (batch b, query head h) of an attention with Hq heads. */
static __device__ __forceinline__ int64_t dcu_slab(const dcu_sparsity &sp, int64_t b, int64_t h,
                                                   int64_t Hq)
{
    const int64_t sb = sp.B == 1 ? 0 : b, sh = h / (Hq / sp.H);
    return sb * sp.H + sh;
}

#endif

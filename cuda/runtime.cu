/* runtime.cu - the backend's runtime calls: devices, memory, copies, errors. */
#include <stdio.h>

#include "common.cuh"

static thread_local char last_error[256];

int dcu_fail(cudaError_t e, const char *where)
{
    snprintf(last_error, sizeof last_error, "%s (%s)", cudaGetErrorString(e), where);
    cudaGetLastError(); /* clear a sticky launch error where it can be cleared */
    return -1;
}

extern "C" const char *dcu_last_error(void) { return last_error; }

extern "C" int dcu_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" int dcu_set_device(int device)
{
    DCU_TRY(cudaSetDevice(device));
    return 0;
}

extern "C" int dcu_init(int device)
{
    DCU_TRY(cudaSetDevice(device));
    /* Keep the stream-ordered pool's memory between calls: without a threshold it is handed
     * back to the driver at every synchronisation and each call pays for new allocations. */
    cudaMemPool_t pool;
    DCU_TRY(cudaDeviceGetDefaultMemPool(&pool, device));
    uint64_t keep = UINT64_MAX;
    DCU_TRY(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    return 0;
}

extern "C" int dcu_on_device(const void *p, int device)
{
    cudaPointerAttributes at;
    if (cudaPointerGetAttributes(&at, p) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    if (at.type == cudaMemoryTypeManaged)
        return 1;
    return at.type == cudaMemoryTypeDevice && at.device == device;
}

extern "C" int dcu_malloc(void **p, size_t bytes, void *stream)
{
    *p = NULL;
    /* From the device's stream-ordered pool (kept between calls, see dcu_init). */
    DCU_TRY(cudaMallocAsync(p, bytes ? bytes : 1, (cudaStream_t)stream));
    return 0;
}

extern "C" void dcu_free(void *p, void *stream)
{
    if (p)
        cudaFreeAsync(p, (cudaStream_t)stream);
}

extern "C" int dcu_copy_to_device(void *dst, const void *src, size_t bytes, void *stream)
{
    DCU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream));
    return 0;
}

extern "C" int dcu_copy_to_host(void *dst, const void *src, size_t bytes, void *stream)
{
    DCU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)stream));
    DCU_TRY(cudaStreamSynchronize((cudaStream_t)stream));
    return 0;
}

extern "C" int dcu_device_sync(void)
{
    DCU_TRY(cudaDeviceSynchronize());
    return 0;
}

extern "C" int dcu_sync(void *stream)
{
    DCU_TRY(cudaStreamSynchronize((cudaStream_t)stream));
    return 0;
}

extern "C" void dcu_sparsity_free(dcu_sparsity *sp, void *stream)
{
    dcu_free(sp->tiles, stream);
    dcu_free(sp->row_lo, stream);
    dcu_free(sp->row_hi, stream);
    dcu_free(sp->keys, stream);
    dcu_free(sp->words, stream);
    sp->tiles = NULL;
    sp->row_lo = sp->row_hi = sp->keys = NULL;
    sp->words = NULL;
}

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

extern "C" int dcu_init(int device, dcu_state *st)
{
    DCU_TRY(cudaSetDevice(device));
    *st = dcu_state{};
    DCU_TRY(cudaDeviceGetAttribute(&st->sms, cudaDevAttrMultiProcessorCount, device));
    DCU_TRY(cudaDeviceGetAttribute(&st->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                   device));
    /* Keep the stream-ordered pool's memory between calls: without a threshold it is handed
     * back to the driver at every synchronisation and each call pays for new allocations. */
    cudaMemPool_t pool;
    DCU_TRY(cudaDeviceGetDefaultMemPool(&pool, device));
    uint64_t keep = UINT64_MAX;
    DCU_TRY(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    return 0;
}

extern "C" void dcu_state_free(dcu_state *st)
{
    if (st->slots)
        cudaFreeHost(st->slots);
    st->slots = st->slots_dev = NULL;
    st->slot_bytes = 0;
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

extern "C" int dcu_sparsity_alloc(dcu_sparsity *sp, int64_t nkeys, int64_t nwords, void *stream)
{
    /* each array at a 256-byte boundary, as cudaMalloc would place it */
    const auto up = [](size_t n) { return (n + 255) & ~(size_t)255; };
    const size_t ntiles = (size_t)(sp->B * sp->H * sp->ntiles);
    const size_t rows = (size_t)(sp->B * sp->H * sp->Lq);
    const size_t o_lo = up(ntiles * sizeof(dcu_tile)), o_hi = o_lo + up(rows * 4),
                 o_keys = o_hi + up(rows * 4), o_words = o_keys + up((size_t)nkeys * 4),
                 bytes = o_words + (size_t)nwords * 8;
    void *base = NULL;
    /* from the device's stream-ordered pool (kept between calls, see dcu_init) */
    const cudaError_t e = cudaMallocAsync(&base, bytes ? bytes : 1, (cudaStream_t)stream);
    if (e != cudaSuccess)
        return dcu_fail(e, "sparsity object: device allocation");
    unsigned char *p = (unsigned char *)base;
    sp->tiles = (dcu_tile *)p;
    sp->row_lo = (int32_t *)(p + o_lo);
    sp->row_hi = (int32_t *)(p + o_hi);
    sp->keys = (int32_t *)(p + o_keys);
    sp->words = (uint64_t *)(p + o_words);
    sp->nkeys = nkeys;
    sp->nwords = nwords;
    return 0;
}

extern "C" int dcu_ready_wait(const dcu_sparsity *sp, void *stream)
{
    if (sp->ready)
        DCU_TRY(cudaStreamWaitEvent((cudaStream_t)stream, (cudaEvent_t)sp->ready, 0));
    return 0;
}

extern "C" int dcu_ready_sync(const dcu_sparsity *sp)
{
    if (sp->ready)
        DCU_TRY(cudaEventSynchronize((cudaEvent_t)sp->ready));
    return 0;
}

extern "C" void dcu_ready_free(dcu_sparsity *sp)
{
    if (sp->ready)
        cudaEventDestroy((cudaEvent_t)sp->ready);
    sp->ready = NULL;
}

extern "C" void dcu_sparsity_free(dcu_sparsity *sp, void *stream)
{
    if (sp->tiles) /* the base of the one allocation; after the work enqueued on `stream` */
        cudaFreeAsync(sp->tiles, (cudaStream_t)stream);
    sp->tiles = NULL;
    sp->row_lo = sp->row_hi = sp->keys = NULL;
    sp->words = NULL;
}

/* block_ops.cuh - the block-wide steps of mask_topk.cu's kernel (1024 threads a block): warp
 * and block prefix sums, barriers over groups of warps, and a sort of up to 1024 rank keys. */
#ifndef DMATTN_CUDA_BLOCK_OPS_CUH
#define DMATTN_CUDA_BLOCK_OPS_CUH

#include <stdint.h>

namespace {

constexpr int THREADS = 1024, WARPS = THREADS / 32;
constexpr int SORT_N = 1024;
constexpr uint64_t PAD = ~0ull; /* sorts after every rank key */
constexpr unsigned FULL = 0xffffffffu;
static_assert(SORT_N == THREADS, "block_sort: a thread an element");

/* bar.sync over a group of warps (id 1.., n threads); the whole block for n == THREADS. */
__device__ __forceinline__ void group_sync(int id, int n)
{
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}

template <class T> __device__ __forceinline__ T warp_incl_scan(T x)
{
    const int lane = threadIdx.x & 31;
    for (int d = 1; d < 32; d <<= 1) {
        const T y = __shfl_up_sync(FULL, x, d);
        if (lane >= d)
            x += y;
    }
    return x;
}

/* Exclusive prefix over the block of x (every thread); *all = the block's sum. tmp: WARPS + 1. */
template <class T> __device__ T block_excl_scan(T x, T *tmp, T *all)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const T incl = warp_incl_scan(x);
    if (lane == 31)
        tmp[warp] = incl;
    __syncthreads();
    if (warp == 0) { /* the warps' totals, scanned by one warp */
        const T v = tmp[lane], vi = warp_incl_scan(v);
        tmp[lane] = vi - v;
        if (lane == 31)
            tmp[WARPS] = vi;
    }
    __syncthreads();
    const T before = tmp[warp];
    *all = tmp[WARPS];
    __syncthreads(); /* tmp again */
    return before + incl - x;
}

/* a[0, n) ascending (n a power of 2 <= SORT_N; tmp: n more); every thread of the block calls
 * it, thread t < n holding a[t]. Each warp sorts 32 (bitonic, between lanes), then sorted runs
 * merge in pairs: an element's place is its place in its run plus the count of the other run's
 * elements before it (a binary search), five rounds for 1024 where a bitonic sort has fifteen
 * strides through shared memory. Up to 64 elements, one warp does it all. */
__device__ void block_sort(uint64_t *a, int n, uint64_t *tmp)
{
    const int t = threadIdx.x, lane = t & 31;
    if (n <= 64) { /* one warp, two elements a lane: no barrier but the last */
        if (t < 32) {
            uint64_t x[2] = {t < n ? a[t] : PAD, t + 32 < n ? a[t + 32] : PAD};
            for (int k = 2; k <= 64; k <<= 1)
                for (int j = k >> 1; j > 0; j >>= 1) {
                    if (j == 32) { /* k == 64: element t against t + 32, ascending */
                        const uint64_t lo = min(x[0], x[1]), hi = max(x[0], x[1]);
                        x[0] = lo;
                        x[1] = hi;
                        continue;
                    }
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const int i = t + 32 * h;
                        const uint64_t y = __shfl_xor_sync(FULL, x[h], j);
                        x[h] = (((i & j) == 0) == ((i & k) == 0)) ? min(x[h], y) : max(x[h], y);
                    }
                }
            if (t < n)
                a[t] = x[0];
            if (t + 32 < n)
                a[t + 32] = x[1];
        }
        __syncthreads();
        return;
    }
    uint64_t x = t < n ? a[t] : PAD;
    for (int k = 2; k <= 32; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            const uint64_t y = __shfl_xor_sync(FULL, x, j);
            /* the lower of a pair keeps the smaller in an ascending run of k */
            x = (((lane & j) == 0) == ((lane & k) == 0)) ? min(x, y) : max(x, y);
        }
    uint64_t *src = a, *dst = tmp;
    if (t < n)
        src[t] = x;
    for (int width = 32; width < n; width <<= 1) {
        __syncthreads();
        if (t < n) {
            x = src[t];
            const int run = t / width, i = t % width;
            const uint64_t *other = src + (run ^ 1) * width;
            const bool left = (run & 1) == 0; /* ties (the pads): the left run's first */
            int lo = 0, hi = width;
            while (lo < hi) {
                const int mid = (lo + hi) >> 1;
                if (left ? other[mid] < x : other[mid] <= x)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            dst[(run & ~1) * width + i + lo] = x;
        }
        uint64_t *sw = src;
        src = dst;
        dst = sw;
    }
    __syncthreads();
    if (src != a && t < n)
        a[t] = src[t];
    __syncthreads();
}

} // namespace

#endif

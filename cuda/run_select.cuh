/* run_select.cuh - mask_topk.cu's selection over a run's prefix: rank keys, and the histogram
 * and candidate steps that find the key of a given rank among the prefix's staged codes. */
#ifndef DMATTN_CUDA_RUN_SELECT_CUH
#define DMATTN_CUDA_RUN_SELECT_CUH

#include <math.h>

#include "block_ops.cuh"

namespace {

constexpr int BINS = 4096, BIN_BITS = 12;

/* An order-preserving code of a bias (larger bias, larger code; -0 as +0); 0 for a key that
 * takes no part (padding, -inf, NaN). Finite biases code to at least 0x00800000. */
__device__ __forceinline__ uint32_t order_code(float v, bool exists)
{
    if (!exists || !(v > -INFINITY))
        return 0;
    const uint32_t u = __float_as_uint(v == 0.0f ? 0.0f : v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t rank_key(uint32_t code, int64_t j)
{
    return (uint64_t)code << 32 | (uint32_t)(0xffffffffu - (uint32_t)j);
}

__device__ __forceinline__ int32_t key_of(uint64_t K)
{
    return (int32_t)(0xffffffffu - (uint32_t)K);
}

/* What the selection works in (shared memory): the prefix's code histogram and the
 * narrowing's, two candidate lists, and the block's small variables. */
struct sel_mem {
    uint32_t *hist, *hist2;
    uint64_t *cand, *cand2; /* CAND_CAP each */
    int *tmp32;             /* WARPS + 1: block_excl_scan's */
    int *found;             /* [0, 3): narrow's bin, keys above it, in it; [3]: a list's length */
    uint64_t *result;       /* rank_in's */
};

constexpr int CAND_CAP = 1024, RANK_CAP = 64, SMALL_BINS = 256;
static_assert(CAND_CAP <= THREADS, "rank_among: a candidate a thread");

/* The prefix [0, n) of a slab: its codes, staged in shared memory. */
struct prefix {
    const uint32_t *staged; /* the codes, zero up to a multiple of 4 */
    int64_t n;
    /* f(j, code) for every key (and for the zeros up to a multiple of 4), four a thread */
    template <class F> __device__ __forceinline__ void each(F f) const
    {
        const uint4 *v = (const uint4 *)staged;
        for (int q = threadIdx.x; 4 * q < (int)n; q += THREADS) { /* n fits shared memory */
            const uint4 c = v[q];
            f(4 * q, c.x);
            f(4 * q + 1, c.y);
            f(4 * q + 2, c.z);
            f(4 * q + 3, c.w);
        }
    }
};

/* A histogram's bins, thread t holding bins 4095 - 4t - k (k < 4, the largest first), and
 * the keys in the bins above them (a block-wide prefix: one serves any number of ranks). */
struct hist_bins {
    uint32_t h[4], before;
};

__device__ hist_bins scan_bins(const uint32_t *hist, const sel_mem &m)
{
    hist_bins hb;
    uint32_t sum = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        hb.h[k] = hist[BINS - 1 - 4 * threadIdx.x - k];
        sum += hb.h[k];
    }
    int all;
    hb.before = (uint32_t)block_excl_scan<int>((int)sum, m.tmp32, &all);
    return hb;
}

/* The bin that holds rank r (1-based, from the largest): slot[0] the bin, slot[1] the keys
 * above it, slot[2] in it (three ints of shared memory; every thread reads them after). */
__device__ void pick_bin(const hist_bins &hb, int r, int *slot)
{
    uint32_t before = hb.before;
    for (int k = 0; k < 4; k++) {
        if ((int)before < r && r <= (int)(before + hb.h[k])) {
            slot[0] = BINS - 1 - 4 * threadIdx.x - k;
            slot[1] = (int)before;
            slot[2] = (int)hb.h[k];
        }
        before += hb.h[k];
    }
    __syncthreads();
}

/* Histogram of the rank keys in [lo, lo + (BINS << sh)) over the candidates or the prefix,
 * then the bin holding the r-th largest: *lo, *hi narrowed to it, *r made relative to it
 * (1-based), returns its count. */
template <class Each>
__device__ int narrow(Each each, uint64_t *lo, uint64_t *hi, int *r, const sel_mem &m)
{
    const int tid = threadIdx.x;
    const uint64_t span = *hi - *lo, base = *lo;
    const int sh = max(0, (span ? 64 - __clzll((long long)span) : 0) - BIN_BITS);
    for (int x = tid; x < BINS; x += THREADS)
        m.hist2[x] = 0;
    __syncthreads();
    each([&](uint64_t K) {
        if (K - base <= span)
            atomicAdd(&m.hist2[(K - base) >> sh], 1u);
    });
    __syncthreads();
    pick_bin(scan_bins(m.hist2, m), *r, m.found);
    const uint64_t bin = (uint64_t)m.found[0];
    *lo = base + (bin << sh);
    *hi = min(*hi, *lo + (((uint64_t)1 << sh) - 1));
    *r -= m.found[1];
    const int count = m.found[2];
    __syncthreads(); /* found */
    return count;
}

/* narrow() for a list of at most THREADS candidates, all in [*lo, *hi]: 256 bins, which one
 * warp scans, so that a round costs three barriers and no block-wide prefix. */
__device__ int narrow_list(const uint64_t *cand, int n, uint64_t *lo, uint64_t *hi, int *r,
                           const sel_mem &m)
{
    const int tid = threadIdx.x;
    const uint64_t span = *hi - *lo, base = *lo;
    const int sh = max(0, (span ? 64 - __clzll((long long)span) : 0) - 8);
    if (tid < SMALL_BINS)
        m.hist2[tid] = 0;
    __syncthreads();
    if (tid < n)
        atomicAdd(&m.hist2[(cand[tid] - base) >> sh], 1u);
    __syncthreads();
    if (tid < 32) { /* lane l: bins 255 - 8l - k (k < 8), the largest first */
        uint32_t h[8], sum = 0;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            h[k] = m.hist2[SMALL_BINS - 1 - 8 * tid - k];
            sum += h[k];
        }
        uint32_t before = warp_incl_scan(sum) - sum;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if ((int)before < *r && *r <= (int)(before + h[k])) {
                m.found[0] = SMALL_BINS - 1 - 8 * tid - k;
                m.found[1] = (int)before;
                m.found[2] = (int)h[k];
            }
            before += h[k];
        }
    }
    __syncthreads();
    *lo = base + ((uint64_t)m.found[0] << sh);
    *hi = min(*hi, *lo + (((uint64_t)1 << sh) - 1));
    *r -= m.found[1];
    return m.found[2]; /* found is written again only after two more barriers */
}

/* The r-th largest (1-based) of cand[0, n), n <= RANK_CAP: a count of those above each. */
__device__ uint64_t rank_in(const uint64_t *cand, int n, int r, const sel_mem &m)
{
    for (int i = threadIdx.x; i < n; i += THREADS) {
        const uint64_t K = cand[i];
        int above_me = 0;
        for (int x = 0; x < n; x++)
            above_me += cand[x] > K;
        if (above_me == r - 1)
            *m.result = K;
    }
    __syncthreads();
    const uint64_t K = *m.result;
    __syncthreads();
    return K;
}

/* Sets key K's bit in a mask of the prefix (bit l of word 4b + i: key 128b + 4l + i). */
__device__ __forceinline__ void mark(uint32_t *mask, uint64_t K)
{
    const int64_t j = key_of(K);
    atomicOr(&mask[4 * (j >> 7) + (j & 3)], 1u << ((j >> 2) & 31));
}

/* The r-th largest (1-based) rank key of src[0, n) (n <= CAND_CAP), all in [lo, hi]: bins
 * narrow it (into cand2; src is left as it is) until at most RANK_CAP are left, then a count.
 * With a mask, the keys of src from the result up are marked in it. The keys are distinct, so
 * every round shrinks the range 256 times. */
__device__ uint64_t rank_among(const uint64_t *src, int n, uint64_t lo, uint64_t hi, int r,
                               const sel_mem &m, uint32_t *mask)
{
    const int tid = threadIdx.x;
    const uint64_t *cand = src;
    while (n > RANK_CAP) {
        const int nn = n;
        n = narrow_list(cand, nn, &lo, &hi, &r, m);
        const uint64_t x = tid < nn ? cand[tid] : 0; /* one a thread: then cand2 in place */
        if (tid == 0)
            m.found[3] = 0;
        __syncthreads();
        if (tid < nn) {
            if (x > hi && mask)
                mark(mask, x);
            else if (x >= lo && x <= hi)
                m.cand2[atomicAdd(&m.found[3], 1)] = x;
        }
        __syncthreads();
        cand = m.cand2;
    }
    const uint64_t K = rank_in(cand, n, r, m);
    if (mask) /* the last candidates from the result up */
        for (int i = tid; i < n; i += THREADS)
            if (cand[i] >= K)
                mark(mask, cand[i]);
    __syncthreads();
    return K;
}

/* The prefix's keys in the code range [clo, chi] (which holds rank r, 1-based, with `above`
 * keys above it and `count` in it) into m.cand: *lo, *hi their K range, *r the rank among
 * them; returns how many. A range of more than CAND_CAP keys (many equal biases) is narrowed
 * over the prefix first. With a mask, the keys above the range are marked in it. */
__device__ int collect(const prefix &pf, int *r, uint32_t clo, uint32_t chi, int above,
                       int count, const sel_mem &m, uint32_t *mask, uint64_t *lo, uint64_t *hi)
{
    const int tid = threadIdx.x, lane = tid & 31;
    *lo = (uint64_t)clo << 32;
    *hi = (uint64_t)chi << 32 | FULL;
    *r -= above;
    while (count > CAND_CAP)
        count = narrow(
            [&](auto f) {
                pf.each([&](int64_t j, uint32_t c) {
                    if (c)
                        f(rank_key(c, j));
                });
            },
            lo, hi, r, m);
    if (tid == 0)
        m.found[3] = 0;
    __syncthreads();
    const uint64_t L = *lo, H = *hi;
    /* not narrowed (the usual case): the range is whole codes, compared without the keys */
    const bool codes = (uint32_t)L == 0 && (uint32_t)H == FULL;
    const uint32_t cl = (uint32_t)(L >> 32), ch = (uint32_t)(H >> 32);
    const uint4 *v = (const uint4 *)pf.staged;
    const int n = (int)pf.n;
    for (int qb = tid - lane; 4 * qb < n; qb += THREADS) {
        const int q = qb + lane;
        const uint4 c4 = 4 * q < n ? v[q] : make_uint4(0, 0, 0, 0);
        const uint32_t c[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            bool in, above;
            if (codes) { /* a code of 0 (no part) is below any bin's: finite codes are at
                          * least 0x00800000, and so is every bin that holds one */
                in = c[i] >= cl && c[i] <= ch;
                above = c[i] > ch;
            } else {
                const uint64_t K = rank_key(c[i], 4 * q + i);
                in = c[i] && K >= L && K <= H;
                above = c[i] && K > H;
            }
            if (in)
                m.cand[atomicAdd(&m.found[3], 1)] = rank_key(c[i], 4 * q + i);
            if (mask) {
                const unsigned above_bits = __ballot_sync(FULL, above);
                if (lane == i)
                    mask[4 * (qb >> 5) + i] = above_bits;
            }
        }
    }
    __syncthreads();
    return count;
}

/* The code bin (2^sh codes from cmin) that holds rank r: its code range, the keys above it and
 * in it. slot: three ints of shared memory of its own. */
__device__ void find_bin(const hist_bins &hb, int r, uint32_t cmin, uint32_t cmax, int sh,
                         int *slot, uint32_t *clo, uint32_t *chi, int *above, int *count)
{
    pick_bin(hb, r, slot);
    const uint32_t b = (uint32_t)slot[0];
    *clo = cmin + (b << sh);
    *chi = min(cmax, *clo + ((1u << sh) - 1));
    *above = slot[1];
    *count = slot[2];
}

} // namespace

#endif

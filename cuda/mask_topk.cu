/*
 * mask_topk.cu - the causal top-w selection over a per-key bias on the GPU (DESIGN §2, §5),
 * with no O(Lq * Lk) work or memory. It produces the object the CPU's streaming builder
 * produces: per tile of 64 query rows, the sorted union U of the keys its rows select and one
 * bitmask row per query over U.
 *
 * Order: key j's rank key is K_j = (order code of its bias) << 32 | (2^32 - 1 - j), so a larger
 * K beats a smaller one and equal biases go to the earlier key. Padding keys, -inf and NaN biases
 * take no part (code 0). Row i sits at key position p = i + Lk - Lq and selects the w best keys
 * of [0, p]. Write theta_p for the w-th largest K of [0, p] (0 while fewer than w keys take part):
 * row p keeps j iff j <= p and K_j >= theta_p, and theta_p never decreases as p grows.
 *
 * One thread block takes a run of up to 8 consecutive tiles (P <= 512 rows from position p0) of
 * one slab and needs nothing from any other block, so the whole build is one launch:
 * 1. the codes of the prefix [0, p0] are staged in shared memory (the host sends key axes too
 *    long for that to mask_topk_tree.cu), with a histogram of their top 12 bits (made again
 *    over the prefix's own code range where that is more than 4 times finer). It gives the bin
 *    of rank |S| = min(w, keys that take part); its keys are collected and ranked
 *    (run_select.cuh): theta_p0. The same pass marks the keys above the bin in a bitmask, and
 *    the ranked keys from theta_p0 up: S, the keys row p0 keeps;
 * 2. N = the run's new keys (p0, p_last] that beat theta_p0, in key order. Within the run theta
 *    is always an element of B, the bottom |N| + 1 keys of S, or of N: a row with m keys of N
 *    up to it has theta = the (|S| + m - w + 1)-th smallest of B and those m keys (none when
 *    that is < 1), since no more than m keys left. B's top is a second rank of the histogram;
 *    S is written out in key order from the bitmask, and B with it;
 * 3. C = B + N (<= 1023). Only its bottom min(|C|, |N| + 1) can be theta in the run (theta at
 *    its end is the top of those), so a longer C is cut to them, and sorted. theta changes only
 *    where a key of N arrives: a warp takes a run of arrivals, finds its first theta by a
 *    select over the bits of C that are present, and then moves it to the next present element
 *    whenever a key above it arrives;
 * 4. each key of S + N (in key order) is kept from max(j, p0) to the first arrival whose theta
 *    passes its K (its end, "evict" in DESIGN §2); the run's tiles are then built from those
 *    rows, at once by groups of warps (build_tile: mask_topk_tile.cuh, whose head comment
 *    tells how).
 * Work: O(p0) per run for the prefix (the runs are one wave of blocks), O(P log P) for C,
 * O(w + P) per tile; no scratch memory but a slot per block in mapped host memory for its nnz
 * and whether it saw a NaN or +inf bias. Both are known once the keys are staged (a row keeps
 * min(w, keys taking part up to it)), so each block writes its slot then and the host returns
 * while the tiles are being built: the object is complete at an event on the stream.
 * The costliest runs are the first ones whose S is full, where nearly every new key enters
 * (|N| near P), and the last ones, with the longest prefixes; blocks the wave leaves over take
 * halves of the former (run_tiles).
 */
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "run_select.cuh"

namespace {

constexpr int RUN_TILES = 8, RUN_ROWS = RUN_TILES * DCU_TILE; /* P <= 512 */
constexpr int16_t NOT_IN_C = 0x7fff; /* cidx of a key of N that C no longer holds */
static_assert(SORT_N >= 2 * RUN_ROWS - 1, "C: |B| <= P and |N| <= P - 1");
static_assert((RUN_ROWS + WARPS - 1) / WARPS <= 32, "events: a lane each of a warp's");

struct slab_in {
    dcu_tensor bias, pad;
    int64_t H, Lk;
};

/* A slab's keys: its bias row and padding row, read with one multiply a key. */
struct slab_keys {
    const float *bias;
    int64_t bstride;
    const uint8_t *pad; /* NULL: no padding */
    int64_t pstride;
};

__device__ __forceinline__ slab_keys slab_of(const slab_in &in, int64_t s)
{
    const int64_t b = s / in.H, h = s % in.H;
    slab_keys k;
    k.bias = (const float *)in.bias.data + dcu_off(in.bias, b, h, 0, 0);
    k.bstride = in.bias.shape[3] == 1 ? 0 : in.bias.stride[3];
    k.pad = nullptr;
    k.pstride = 0;
    if (in.pad.data) {
        k.pad = (const uint8_t *)in.pad.data + (in.pad.shape[0] == 1 ? 0 : b * in.pad.stride[0]);
        k.pstride = in.pad.stride[1];
    }
    return k;
}

/* Key j's order code; *bad set for a NaN or +inf bias. */
__device__ __forceinline__ uint32_t code_of(const slab_keys &k, int64_t j, bool *bad)
{
    const float v = __ldg(k.bias + j * k.bstride);
    *bad |= isnan(v) || v == INFINITY;
    return order_code(v, !k.pad || __ldg(k.pad + j * k.pstride) != 0);
}

/* A block's result, in mapped host memory: one 64-bit word, written by one store as soon as the
 * block has staged its keys, so that the host can return while the tiles are still being built:
 * the nnz of the block's rows (each keeps min(w, keys taking part up to it), so the count needs
 * no tile), whether its keys hold a NaN or +inf bias, and the build's number, which tells the
 * host the word is this build's. An aligned 8-byte store arrives whole: no fence is needed. */
constexpr int SLOT_NNZ_BITS = 26; /* a run's nnz <= P * w < 512 * 2^16 (a staged key axis) */
constexpr unsigned long long SLOT_NNZ_MASK = (1ull << SLOT_NNZ_BITS) - 1,
                             SLOT_BAD = 1ull << SLOT_NNZ_BITS;
constexpr int SLOT_BUILD_SHIFT = SLOT_NNZ_BITS + 1;
__host__ __device__ constexpr unsigned long long slot_build(unsigned long long build)
{
    return build & (~0ull >> SLOT_BUILD_SHIFT); /* the 37 bits the word holds */
}

struct run_out {
    dcu_tile *tiles;
    int32_t *row_lo, *row_hi, *keys;
    uint64_t *words;
    unsigned long long *slots; /* a block each */
    unsigned long long build;
    int64_t Lq, off, ntiles, capU, wcap, run;
    int64_t split0, nsplit; /* runs split in two halves: split0 to split0 + nsplit - 1 */
    int w, groups; /* groups: tile groups the shared memory holds (a power of 2, <= 8) */
    int64_t mask_words; /* S's mask: 4 words a 128 keys of the longest prefix */
    /* shared-memory layout, in bytes from the start of the dynamic part */
    int64_t o_sK, o_pack, o_nK, o_thK, o_C, o_nrank, o_cidx, o_area, group_bytes;
};

__device__ __forceinline__ void write_slot(const run_out &o, unsigned long long nnz, bool bad)
{
    volatile unsigned long long *slot = o.slots + blockIdx.y * gridDim.x + blockIdx.x;
    *slot = slot_build(o.build) << SLOT_BUILD_SHIFT | (bad ? SLOT_BAD : 0) | nnz;
}

} // namespace

#include "mask_topk_tile.cuh"

namespace {

/* The tiles [*t0, *t1) of a slab's block x: runs of o.run tiles, but for nsplit runs from
 * split0, which take two blocks of half a run each (the costliest runs: S just full and
 * nearly every new key entering, when blocks are left over from the wave). */
__device__ __forceinline__ void run_tiles(const run_out &o, int64_t x, int64_t *t0, int64_t *t1)
{
    const int64_t half = o.run / 2;
    if (x < o.split0) {
        *t0 = x * o.run;
        *t1 = *t0 + o.run;
    } else if (x < o.split0 + 2 * o.nsplit) {
        const int64_t r = o.split0 + (x - o.split0) / 2;
        *t0 = r * o.run + ((x - o.split0) & 1) * half;
        *t1 = (x - o.split0) & 1 ? (r + 1) * o.run : r * o.run + half;
    } else {
        *t0 = (x - o.nsplit) * o.run;
        *t1 = *t0 + o.run;
    }
    *t1 = min(*t1, o.ntiles);
    *t0 = min(*t0, *t1);
}

__global__ void __launch_bounds__(THREADS, 1) build_runs(slab_in in, run_out o)
{
    extern __shared__ __align__(16) unsigned char smem[];
    uint64_t *sK = (uint64_t *)(smem + o.o_sK), *nK = (uint64_t *)(smem + o.o_nK),
             *thK = (uint64_t *)(smem + o.o_thK), *C = (uint64_t *)(smem + o.o_C);
    uint32_t *pack = (uint32_t *)(smem + o.o_pack);
    int16_t *nrank = (int16_t *)(smem + o.o_nrank), *cidx = (int16_t *)(smem + o.o_cidx);
    unsigned char *area = smem + o.o_area;
    __shared__ unsigned long long tmp64[WARPS + 1];
    __shared__ int tmp32[WARPS + 1], found[12], nB, wnew[WARPS];
    __shared__ unsigned wnnz[WARPS];
    __shared__ uint64_t result;
    sel_mem m;
    m.hist = (uint32_t *)area;
    m.hist2 = m.hist + BINS;
    m.cand = (uint64_t *)(m.hist2 + BINS);
    m.cand2 = m.cand + CAND_CAP;
    uint32_t *smask = (uint32_t *)(m.cand2 + CAND_CAP); /* S's keys, 4 words a 128 keys */
    uint32_t *staged = smask + o.mask_words;
    m.tmp32 = tmp32;
    m.found = found;
    m.result = &result;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t s = blockIdx.y, Lk = in.Lk;
    int64_t t0, t1;
    run_tiles(o, blockIdx.x, &t0, &t1);
    const int w = o.w;
    const slab_keys sk = slab_of(in, s);
    bool bad = false;

    if (t0 >= t1) { /* no tiles (Lq == 0): only the bias check */
        for (int64_t j = tid; j < Lk; j += THREADS)
            code_of(sk, j, &bad);
        bad = __syncthreads_or(bad);
        if (tid == 0)
            write_slot(o, 0, bad);
        return;
    }
    const int64_t r0 = t0 * DCU_TILE, rend = min(o.Lq, t1 * DCU_TILE);
    const int P = (int)(rend - r0);
    const int64_t p0 = r0 + o.off, plast = rend - 1 + o.off;
    const int64_t npre = p0 >= 0 ? p0 + 1 : 0; /* the prefix [0, p0]; p0 < Lk */
    const prefix pf = {staged, npre}; /* the host made the whole prefix fit */

    /* 1. The prefix's codes (staged) and their histogram; the bias check. How many take part
     * and their code range are read off the histogram after (the range to whole bins, which
     * is all the bins below need): the staging pass is bound by its instructions a key. */
    auto take = [&](uint32_t c) { /* a key that takes no part (0) adds nothing */
        if (c)
            atomicAdd(&m.hist[c >> (32 - BIN_BITS)], 1u);
    };
    for (int x = tid; x < BINS; x += THREADS)
        m.hist[x] = 0;
    __syncthreads();
    const int64_t n4 = (npre + 3) / 4; /* staged: zeros up to a multiple of 4 */
    /* the run's new keys (p0, plast]: their codes, loaded with the prefix's */
    const int64_t nlo = max(p0 + 1, (int64_t)0);
    const int nnew = (int)max((int64_t)0, plast - nlo + 1); /* <= P - 1 */
    const uint32_t cnew = tid < nnew ? code_of(sk, nlo + tid, &bad) : 0;
    if (sk.bstride == 1 && !sk.pad && ((uintptr_t)sk.bias & 15) == 0) {
        constexpr int BATCH = 4; /* float4 loads in flight a thread */
        const int np = (int)npre, nq = (int)n4; /* a staged prefix fits 32-bit indices */
        for (int q0 = tid; q0 < nq; q0 += BATCH * THREADS) {
            float4 v[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; u++) {
                const int q = q0 + u * THREADS, j = 4 * q;
                v[u] = make_float4(0, 0, 0, 0);
                if (j + 3 < np)
                    v[u] = __ldg((const float4 *)sk.bias + q);
                else if (j < np) /* the last, partial vector: no read past the prefix */
                    v[u] = {__ldg(sk.bias + j), j + 1 < np ? __ldg(sk.bias + j + 1) : 0.0f,
                            j + 2 < np ? __ldg(sk.bias + j + 2) : 0.0f, 0.0f};
            }
#pragma unroll
            for (int u = 0; u < BATCH; u++) {
                const int q = q0 + u * THREADS, j = 4 * q;
                if (q >= nq)
                    break;
                const float x[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
                uint32_t c[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const bool here = j + i < np; /* past it: 0.0f, which is not bad */
                    bad |= isnan(x[i]) || x[i] == INFINITY;
                    c[i] = here ? order_code(x[i], true) : 0;
                    take(c[i]);
                }
                ((uint4 *)staged)[q] = make_uint4(c[0], c[1], c[2], c[3]);
            }
        }
    } else {
        for (int64_t q = tid; q < n4; q += THREADS) {
            uint32_t c[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int64_t j = 4 * q + i;
                c[i] = j < npre ? code_of(sk, j, &bad) : 0;
                take(c[i]);
            }
            ((uint4 *)staged)[q] = make_uint4(c[0], c[1], c[2], c[3]);
        }
    }
    __syncthreads(); /* the histogram */
    static_assert(BINS == 4 * THREADS, "four bins a thread");
    const uint4 h4 = ((const uint4 *)m.hist)[tid];
    const uint32_t h[4] = {h4.x, h4.y, h4.z, h4.w};
    int cnt = 0;
    uint32_t cmin = FULL, cmax = 0;
#pragma unroll
    for (int k = 0; k < 4; k++)
        if (h[k]) {
            cnt += (int)h[k];
            cmin = min(cmin, (uint32_t)(4 * tid + k));
            cmax = max(cmax, (uint32_t)(4 * tid + k));
        }
    cnt = __reduce_add_sync(FULL, (unsigned)cnt);
    cmin = __reduce_min_sync(FULL, cmin); /* bins here; codes below */
    cmax = __reduce_max_sync(FULL, cmax);
    const unsigned vnew = __ballot_sync(FULL, cnew != 0); /* the new keys that take part */
    bad = __any_sync(FULL, bad);
    if (lane == 0) {
        tmp32[warp] = cnt;
        tmp64[warp] = (unsigned long long)cmin << 32 | cmax;
        wnew[warp] = __popc(vnew) | (int)bad << 16;
    }
    __syncthreads();
    /* Each warp combines the warps' figures, a lane a warp (WARPS == 32): three loads a
     * thread, where a loop over them made the block queue for shared memory. vbefore: the new
     * keys taking part, of the warps before this one. */
    static_assert(WARPS == 32, "a lane a warp's figures");
    const int nvalid = (int)__reduce_add_sync(FULL, (unsigned)tmp32[lane]);
    const unsigned long long span = tmp64[lane];
    cmin = __reduce_min_sync(FULL, (uint32_t)(span >> 32));
    cmax = __reduce_max_sync(FULL, (uint32_t)span);
    if (cmin != FULL) { /* some key takes part: from bins to codes (cmax: its bin's last) */
        cmin <<= 32 - BIN_BITS;
        cmax = cmax << (32 - BIN_BITS) | (FULL >> BIN_BITS);
    }
    const int wn = wnew[lane];
    const int vbefore = (int)__reduce_add_sync(FULL, lane < warp ? (unsigned)(wn & 0xffff) : 0u);
    bad = __any_sync(FULL, (wn >> 16) != 0);
    /* The block's nnz, written out now (see write_slot): row p keeps min(w, V_p) keys, V_p the
     * keys taking part in [0, p]. Thread t takes row p = nlo - 1 + t, whose V_p is the
     * prefix's nvalid plus the new keys before thread t's. */
    {
        const int64_t p = nlo - 1 + tid;
        const int v = nvalid + vbefore + __popc(vnew & ((1u << lane) - 1));
        const unsigned kept = p >= max(p0, (int64_t)0) && p <= plast ? (unsigned)min(w, v) : 0u;
        const unsigned wk = __reduce_add_sync(FULL, kept);
        if (lane == 0)
            wnnz[warp] = wk;
    }
    __syncthreads();
    if (warp == 0) { /* the sum < 2^26 (the host's check): 32 bits hold it */
        const unsigned all = __reduce_add_sync(FULL, wnnz[lane]);
        if (lane == 0)
            write_slot(o, all, bad);
    }
    const int hi_rank = min(w, nvalid); /* |S| */

    /* 2. The code histogram of the prefix; theta_p0 = the rank key of rank hi_rank, and smask
     * marks S, the keys from theta_p0 up. The staging pass made the histogram over the codes'
     * top bits; bins over the prefix's own code range are finer when that range is narrow,
     * and then the pass is made again over it. */
    const uint32_t cspan = cmax - cmin;
    const int csh = max(0, (cspan ? 32 - __clz((int)cspan) : 0) - BIN_BITS);
    const bool top_bits = csh >= 32 - BIN_BITS - 2; /* at most 4 times coarser */
    const uint32_t hmin = top_bits ? 0 : cmin;
    const int hsh = top_bits ? 32 - BIN_BITS : csh;
    uint64_t K_hi = 0;
    hist_bins cbins;
    uint32_t hclo = 0; /* theta_p0's code bin; its keys in m.cand, their K range */
    int hn = 0;
    uint64_t hlo = 0, hhi = 0;
    if (hi_rank > 0) {
        if (!top_bits) {
            for (int x = tid; x < BINS; x += THREADS)
                m.hist[x] = 0;
            __syncthreads();
            pf.each([&](int64_t, uint32_t c) {
                const uint32_t d = c - cmin; /* a key that takes no part (0) wraps past cspan */
                if (d <= cspan)
                    atomicAdd(&m.hist[d >> csh], 1u);
            });
            __syncthreads();
        }
        uint32_t clo, chi;
        int ab, ct;
        cbins = scan_bins(m.hist, m);
        find_bin(cbins, hi_rank, hmin, cmax, hsh, found + 4, &clo, &chi, &ab, &ct);
        int r = hi_rank;
        hn = collect(pf, &r, clo, chi, ab, ct, m, smask, &hlo, &hhi);
        K_hi = rank_among(m.cand, hn, hlo, hhi, r, m, smask);
        hclo = clo;
    }

    /* 3. N = the new keys (p0, plast] that beat theta_p0 (any key that takes part, while S is
     * not full), in key order. */
    const uint64_t theta0 = hi_rank == w ? K_hi : 0;
    bool inN = false;
    uint64_t KN = 0;
    if (tid < nnew) {
        KN = rank_key(cnew, nlo + tid);
        inN = cnew && w > 0 && KN > theta0;
    }
    const unsigned nm = __ballot_sync(FULL, inN);
    int nN;
    const int nat = block_excl_scan<int>(lane == 0 ? __popc(nm) : 0, tmp32, &nN);
    const int nbase = __shfl_sync(FULL, nat, 0);
    if (inN) {
        const int r = nbase + __popc(nm & ((1u << lane) - 1));
        nK[r] = KN;
        nrank[tid] = (int16_t)r;
    }

    /* 4. B = the bottom min(|S|, |N| + 1) of S: enough, since theta within the run is the
     * (|S| + m - w + 1)-th smallest of B and the m first keys of N. Its top: rank lo_rank. */
    const int lo_rank = max(1, hi_rank - nN);
    uint64_t K_lo = 0;
    if (hi_rank > 0) {
        uint32_t clo, chi;
        int ab, ct;
        find_bin(cbins, lo_rank, hmin, cmax, hsh, found + 8, &clo, &chi, &ab, &ct);
        int r = lo_rank;
        if (lo_rank == hi_rank) {
            K_lo = K_hi;
        } else if (clo == hclo && hlo == (uint64_t)clo << 32 &&
                   hhi == ((uint64_t)chi << 32 | FULL)) {
            /* theta_p0's code bin, not narrowed over the prefix: its keys are in m.cand */
            K_lo = rank_among(m.cand, hn, hlo, hhi, r - ab, m, nullptr);
        } else {
            uint64_t lo, hi;
            const int n = collect(pf, &r, clo, chi, ab, ct, m, nullptr, &lo, &hi);
            K_lo = rank_among(m.cand, n, lo, hi, r, m, nullptr);
        }
    }

    /* 5. S = the prefix's keys with K >= K_hi (smask) in key order: the counts of the 128-key
     * blocks, a prefix over them, then a warp a block writes its keys; those with K <= K_lo
     * go to C (B). */
    if (tid == 0)
        nB = 0;
    const int nblk = hi_rank > 0 ? (int)((npre + 127) / 128) : 0; /* <= THREADS * 4 */
    int bc[4], bsum = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int b = 4 * tid + k;
        bc[k] = 0;
        if (b < nblk)
            bc[k] = __popc(smask[4 * b]) + __popc(smask[4 * b + 1]) + __popc(smask[4 * b + 2]) +
                    __popc(smask[4 * b + 3]);
        bsum += bc[k];
    }
    int stot;
    int bat = block_excl_scan<int>(bsum, tmp32, &stot);
    int *boff = (int *)m.hist2; /* the blocks' first places in S */
#pragma unroll
    for (int k = 0; k < 4; k++) {
        if (4 * tid + k < nblk)
            boff[4 * tid + k] = bat;
        bat += bc[k];
    }
    __syncthreads();
    const uint32_t cl = (uint32_t)(K_lo >> 32);
    const int64_t jl = key_of(K_lo);
    for (int b = warp; b < nblk; b += WARPS) {
        const uint32_t w0 = smask[4 * b], w1 = smask[4 * b + 1], w2 = smask[4 * b + 2],
                       w3 = smask[4 * b + 3];
        const unsigned mine = ((w0 >> lane) & 1) | ((w1 >> lane) & 1) << 1 |
                              ((w2 >> lane) & 1) << 2 | ((w3 >> lane) & 1) << 3;
        const unsigned below = (1u << lane) - 1; /* the keys of the lanes before this one */
        int at = boff[b] + __popc(w0 & below) + __popc(w1 & below) + __popc(w2 & below) +
                 __popc(w3 & below);
#pragma unroll
        for (int i = 0; i < 4; i++)
            if ((mine >> i) & 1) {
                const int64_t j = 128 * (int64_t)b + 4 * lane + i;
                const uint32_t c = staged[j];
                const uint64_t K = rank_key(c, j);
                sK[at++] = K;
                if (c < cl || (c == cl && j >= jl))
                    C[atomicAdd(&nB, 1)] = K;
            }
    }
    __syncthreads();
    const int nB_ = nB, nCall = nB_ + nN;
    for (int r = nB_ + tid; r < nCall; r += THREADS)
        C[r] = nK[r - nB_];
    for (int e = tid; e < nN; e += THREADS)
        cidx[e] = NOT_IN_C;
    __syncthreads();
    /* Only the bottom min(|C|, |N| + 1) of C can be theta within the run (theta at its end is
     * the top of those), so the rest is dropped before the sort. */
    int nC = nCall;
    const int keep = min(nCall, nN + 1);
    if (keep < nCall && nCall > 128) { /* a short C is cheaper sorted whole */
        uint32_t lo = FULL, hi = 0; /* C's code range */
        if (tid < nCall)
            lo = hi = (uint32_t)(C[tid] >> 32);
        lo = __reduce_min_sync(FULL, lo);
        hi = __reduce_max_sync(FULL, hi);
        if (lane == 0)
            tmp64[warp] = (unsigned long long)lo << 32 | hi;
        __syncthreads();
        const unsigned long long span = tmp64[lane]; /* a lane a warp's, as above */
        lo = __reduce_min_sync(FULL, (uint32_t)(span >> 32));
        hi = __reduce_max_sync(FULL, (uint32_t)span);
        const uint64_t top = rank_among(C, nCall, (uint64_t)lo << 32,
                                        (uint64_t)hi << 32 | FULL, nCall - keep + 1, m, nullptr);
        const uint64_t x = tid < nCall ? C[tid] : PAD;
        if (tid == 0)
            nB = 0;
        __syncthreads();
        if (x <= top)
            C[atomicAdd(&nB, 1)] = x;
        nC = keep;
    }
    int n2 = 64;
    while (n2 < nC)
        n2 <<= 1;
    for (int r = nC + tid; r < n2; r += THREADS)
        C[r] = PAD;
    __syncthreads();
    block_sort(C, n2, (uint64_t *)(area + 4096)); /* after `arrival` below */
    /* arrival: -1 for B, else the rank in N (in the area: the selection is done) */
    int16_t *arrival = (int16_t *)area;
    if (tid < nC) {
        const int64_t key = key_of(C[tid]);
        const int16_t a = key > p0 ? nrank[key - nlo] : (int16_t)-1;
        arrival[tid] = a;
        if (a >= 0)
            cidx[a] = (int16_t)tid;
    }
    __syncthreads();

    /* 6. theta after each key of N arrives (event e: the e + 1 first keys of N present): the
     * (|S| + e + 1 - w + 1)-th smallest present element of C. A warp takes a run of events;
     * lane l holds the presence bits of C[32l, 32l + 32). The warp's first theta is a select;
     * after it, an arrival below theta leaves it where it is, and one above moves it to the
     * next present element (the arrival itself or the one after theta). */
    {
        const int per = (nN + WARPS - 1) / WARPS;
        const int e0 = warp * per, e1 = min(nN, e0 + per);
        if (e0 < e1) {
            unsigned have = 0; /* word l by the warp: lane x tests C[32l + x] */
            for (int l = 0; l < (nC + 31) / 32; l++) {
                const int i = 32 * l + lane;
                const unsigned word = __ballot_sync(FULL, i < nC && arrival[i] < e0);
                if (lane == l)
                    have = word;
            }
            /* the warp's events' places in C, a lane each (per <= 32), and theta's place
             * after each, kept by the event's lane: no memory in the loop's chain */
            const int myci = e0 + lane < e1 ? cidx[e0 + lane] : NOT_IN_C;
            int q = -1, myq = -1; /* theta's place in C, once it is one of C */
            for (int e = e0; e < e1; e++) {
                const int ci = __shfl_sync(FULL, myci, e - e0);
                if (ci < nC && (ci >> 5) == lane)
                    have |= 1u << (ci & 31);
                const int idx = hi_rank + e + 1 - w; /* 0-based, among the present */
                if (idx >= 0 && q < 0) {
                    const int c = __popc(have), incl = warp_incl_scan(c);
                    const unsigned hit = __ballot_sync(FULL, incl > idx);
                    const int src = __ffs(hit) - 1;
                    /* the (idx - before + 1)-th set bit of the source lane's word */
                    int want = idx - (incl - c), pos = 0;
                    unsigned x = have;
#pragma unroll
                    for (int width = 16; width > 0; width >>= 1) {
                        const int low = __popc(x & ((1u << width) - 1));
                        if (want >= low) {
                            want -= low;
                            x >>= width;
                            pos += width;
                        }
                    }
                    pos = __shfl_sync(FULL, pos, max(src, 0));
                    if (hit)
                        q = 32 * src + pos;
                } else if (idx >= 0 && ci > q) {
                    const int from = q + 1, wq = from >> 5;
                    const unsigned mw = lane > wq    ? have
                                        : lane == wq ? have & (FULL << (from & 31))
                                                     : 0u;
                    const unsigned any = __ballot_sync(FULL, mw != 0);
                    const int src = __ffs(any) - 1, bit = __ffs(mw) - 1;
                    const int b = __shfl_sync(FULL, bit, max(src, 0));
                    if (any)
                        q = 32 * src + b;
                }
                if (lane == e - e0)
                    myq = q;
            }
            if (e0 + lane < e1)
                thK[e0 + lane] = myq >= 0 ? C[myq] : 0;
        }
    }
    __syncthreads();

    /* 7. L = S + N; each one's rows in the run: from max(j, p0), to the first event whose
     * theta passes its K (the run's end if none). */
    const int nS = hi_rank, nL = nS + nN;
    for (int u = tid; u < nL; u += THREADS) {
        const uint64_t K = u < nS ? sK[u] : nK[u - nS];
        int lo = 0, hi = nN; /* thK is nondecreasing: the first e with thK[e] > K */
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (thK[mid] > K)
                hi = mid;
            else
                lo = mid + 1;
        }
        const int64_t key = key_of(K);
        const int rs = (int)max(key - p0, (int64_t)0);
        const int re = lo < nN ? (int)(key_of(nK[lo]) - p0) : P;
        pack[u] = (uint32_t)rs | (uint32_t)max(re, 0) << 16;
        if (u >= nS) /* N follows S in L */
            sK[u] = K;
    }
    __syncthreads();

    /* 8. The run's tiles, a group of warps each (the area is free now). */
    const int ntile = (int)(t1 - t0);
    int G = 1;
    while (G < ntile && G < o.groups)
        G <<= 1;
    const int gsize = THREADS / G, gid = tid / gsize;
    for (int64_t tile = t0 + gid; tile < t1; tile += G)
        build_tile(o, s, tile, (int)((tile - t0) * DCU_TILE), sK, pack, nL,
                   area + gid * o.group_bytes, gid + 1, gsize);
}

/* Waits until every block has written its slot for build `build` (spinning on them returns
 * before the kernel ends: they are written once the keys are staged). Every millisecond without
 * them, the stream is asked whether it failed (or, which cannot happen, ended without them). */
cudaError_t wait_slots(const volatile unsigned long long *host, size_t n, unsigned long long build,
                       cudaStream_t stream)
{
    const auto arrived = [&](size_t i) { return host[i] >> SLOT_BUILD_SHIFT == slot_build(build); };
    auto last = std::chrono::steady_clock::now();
    for (size_t i = 0; i < n; i++) {
        unsigned spins = 0;
        while (!arrived(i)) {
            if (++spins % 256)
                continue;
            const auto now = std::chrono::steady_clock::now();
            if (now - last < std::chrono::milliseconds(1))
                continue;
            last = now;
            const cudaError_t e = cudaStreamQuery(stream);
            if (e == cudaSuccess && !arrived(i))
                return cudaErrorUnknown; /* the kernel ended without writing a slot */
            if (e != cudaSuccess && e != cudaErrorNotReady)
                return e;
        }
    }
    return cudaSuccess;
}

} // namespace

extern "C" int dcu_build_topk_causal(int64_t window, const dcu_tensor *bias, const dcu_tensor *pad,
                                     dcu_sparsity *sp, dcu_state *st, void *stream_)
{
    cudaStream_t stream = (cudaStream_t)stream_;
    const int64_t nslab = sp->B * sp->H, Lk = sp->Lk, Lq = sp->Lq;
    const int w = (int)std::min<int64_t>(window, Lk);
    const int64_t capU = std::min<int64_t>(w + 64, std::max<int64_t>(Lk, 1));
    const int64_t wcap = (capU + 63) / 64;
    const int max_smem = st->smem_optin, sms = st->sms;

    /* Shared memory: the lists that live through the block (S + N's rank keys and rows, N,
     * the thetas, C, N's ranks and places in C), then an area that the selection uses
     * (histograms, candidate lists, S's bitmask, the staged prefix) and then the tile groups. */
    run_out o = {};
    const auto up = [](int64_t n) { return (n + 15) & ~(int64_t)15; };
    int64_t at = 0;
    o.o_sK = at, at += up((int64_t)(w + RUN_ROWS) * 8);
    o.o_pack = at, at += up((int64_t)(w + RUN_ROWS) * 4);
    o.o_nK = at, at += up(RUN_ROWS * 8);
    o.o_thK = at, at += up(RUN_ROWS * 8);
    o.o_C = at, at += up(SORT_N * 8);
    o.o_nrank = at, at += up(RUN_ROWS * 2);
    o.o_cidx = at, at += up(RUN_ROWS * 2);
    o.o_area = at;
    /* the words, adm, evi and flips, moves, wcnt */
    o.group_bytes = up(DCU_TILE * wcap * 8 + WALK_BLOCKS * 5 * wcap * 4 + DCU_TILE * 4 + 32 * 4);
    o.mask_words = 4 * ((Lk + 127) / 128);
    const int64_t select_bytes =
        2 * BINS * 4 + 2 * CAND_CAP * 8 + o.mask_words * 4 + (Lk + 3) / 4 * 4 * 4;
    const int64_t static_smem = 2048, budget = max_smem - static_smem - at;
    int groups = RUN_TILES;
    while (groups > 0 && groups * o.group_bytes > budget)
        groups >>= 1;
    /* a prefix too long to stage (or a run's nnz too large for its slot): the tree */
    if (groups == 0 || select_bytes > budget || (int64_t)RUN_ROWS * w > (int64_t)SLOT_NNZ_MASK)
        return dcu_build_topk_causal_tree(window, bias, pad, sp, stream_);
    o.groups = groups;
    const int64_t area = std::max(select_bytes, groups * o.group_bytes);
    const size_t smem = (size_t)(at + area);

    /* Runs of tiles: one wave of blocks where the tiles allow, at most 8 tiles a run. */
    const int64_t ntile_all = nslab * sp->ntiles;
    int64_t run = (ntile_all + sms - 1) / std::max(sms, 1);
    run = std::max<int64_t>(1, std::min<int64_t>(RUN_TILES, run));
    int64_t nruns = sp->ntiles > 0 ? (sp->ntiles + run - 1) / run : 1;
    /* Blocks the wave has left: split the runs that start where S is first full (p0 >= w - 1,
     * theta rising and nearly every new key entering), a block a half. */
    int64_t split0 = nruns, nsplit = 0;
    if (run >= 2 && nslab > 0 && nslab * nruns < sms) {
        /* the row where p0 = w - 1 */
        const int64_t first = std::max<int64_t>(0, w - 1 - (Lk - Lq));
        split0 = std::min<int64_t>(nruns, (first + run * DCU_TILE - 1) / (run * DCU_TILE));
        nsplit = std::min<int64_t>((sms - nslab * nruns) / nslab, nruns - split0);
        nruns += nsplit;
    }
    const size_t nslots = (size_t)(nslab * nruns); /* a block each */

    /* The slots: host memory the kernel writes, read as soon as every block's is there. */
    const size_t slot_bytes = nslots * sizeof(unsigned long long);
    if (st->slot_bytes < slot_bytes) {
        dcu_state_free(st);
        const size_t bytes = std::max<size_t>(slot_bytes, 4096);
        DCU_TRY(cudaHostAlloc(&st->slots, bytes, cudaHostAllocMapped));
        memset(st->slots, 0, bytes); /* no build's number */
        const cudaError_t e = cudaHostGetDevicePointer(&st->slots_dev, st->slots, 0);
        if (e != cudaSuccess) {
            dcu_state_free(st);
            return dcu_fail(e, "sparsity_build: mapped host memory");
        }
        st->slot_bytes = bytes;
    }
    const volatile unsigned long long *host = (const volatile unsigned long long *)st->slots;
    dcu_sparsity out = *sp;
    out.tiles = nullptr;
    if (dcu_sparsity_alloc(&out, ntile_all * capU, ntile_all * DCU_TILE * wcap, stream) != 0)
        return -1;
    o.tiles = out.tiles;
    o.row_lo = out.row_lo;
    o.row_hi = out.row_hi;
    o.keys = out.keys;
    o.words = out.words;
    o.slots = (unsigned long long *)st->slots_dev;
    o.build = ++st->builds;
    o.Lq = Lq;
    o.off = Lk - Lq;
    o.ntiles = sp->ntiles;
    o.capU = capU;
    o.wcap = wcap;
    o.run = run;
    o.split0 = split0;
    o.nsplit = nsplit;
    o.w = w;
    slab_in in = {*bias, *pad, sp->H, Lk};
    cudaError_t e = cudaSuccess;
    cudaEvent_t ready = nullptr;
    if (nslab > 0) {
        if ((int)smem > st->topk_smem) { /* once per context: the most the device allows */
            e = cudaFuncSetAttribute(build_runs, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     max_smem - (int)static_smem);
            st->topk_smem = e == cudaSuccess ? max_smem - (int)static_smem : 0;
        }
        if (e == cudaSuccess) {
            build_runs<<<dim3((unsigned)nruns, (unsigned)nslab), THREADS, smem, stream>>>(in, o);
            e = cudaGetLastError();
        }
        /* the object is complete where the stream passes this event (made while the GPU
         * stages: the host waits for the slots anyway) */
        if (e == cudaSuccess)
            e = cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
        if (e == cudaSuccess)
            e = cudaEventRecord(ready, stream);
    }
    if (e == cudaSuccess && nslots > 0)
        e = wait_slots(host, nslots, o.build, stream);
    unsigned long long total = 0, bad = 0;
    for (size_t i = 0; e == cudaSuccess && i < nslots; i++) {
        total += host[i] & SLOT_NNZ_MASK;
        bad |= host[i] & SLOT_BAD;
    }
    if (e != cudaSuccess || bad) {
        if (ready)
            cudaEventDestroy(ready); /* released once the stream passes it */
        dcu_sparsity_free(&out, stream);
        return e != cudaSuccess ? dcu_fail(e, "sparsity_build") : 1;
    }
    out.ready = ready;
    out.nnz = (int64_t)total;
    *sp = out;
    return 0;
}

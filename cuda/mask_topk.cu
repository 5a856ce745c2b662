/*
 * mask_topk.cu - the causal top-w selection over a per-key bias on the GPU (DESIGN §2, §5),
 * with no O(Lq * Lk) work or memory. It produces the object the CPU's streaming builder
 * produces: per tile of 64 query rows, the sorted union U of the keys its rows select and one
 * bitmask row per query over U.
 *
 * Order: key a beats key b when bias_a > bias_b, or they are equal and a < b (the earlier key
 * wins ties). Keys that are padding or whose bias is -inf never take part. Row i (key position
 * p = i + Lk - Lq) selects the w best keys of [0, p].
 *
 * 1. base lists: for every block of 64 keys, its keys in beat order (truncated to w);
 * 2. an up-sweep tree: a node of level k holds the best w keys of 2^k consecutive blocks,
 *    merged from its two children (merging two sorted lists is a rank computation: an
 *    element's place is its own index plus the number of the other list's elements that beat
 *    it, a binary search);
 * 3. per tile (one thread block): the best w keys T of the blocks before the tile,
 *    [0, A) with A = 64 * floor(p0 / 64), merged from the <= log2 nodes that cover [0, A); then
 *    the <= 127 keys [A, p1] of its own rows arrive in order. A key of T at beat rank a is kept
 *    until w - a of those arrivals beat it; an arriving key starts with the number of T's keys
 *    that beat it. So every candidate's rows form one interval [start, end) of the tile, found
 *    by one pass over the arrivals; the candidates with a non-empty interval are U (sorted by
 *    key with a bitonic sort in shared memory), and bit (r, u) is start_u <= r < end_u.
 * Work: O(Lk log Lk) for the tree, O(w log w + 127 w) per tile; memory O(Lk log Lk) scratch.
 */
#include <algorithm>
#include <cstring>

#include "common.cuh"

namespace {

/* Threads of a tile's block: with 16 merge elements a thread, windows up to 4096. */
constexpr int TILE_THREADS = 512;

struct entry {
    float x;
    int32_t k;
};

__device__ __forceinline__ bool beats(entry a, entry b)
{
    return a.x > b.x || (a.x == b.x && a.k < b.k);
}

/* Number of elements of the beat-ordered list l[0..n) that beat e (they form a prefix). */
__device__ __forceinline__ int count_beating(const entry *l, int n, entry e)
{
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (beats(l[mid], e))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

struct slab_in {
    dcu_tensor bias, pad;
    int64_t H, Lk;
};

__device__ __forceinline__ float key_bias(const slab_in &in, int64_t s, int64_t j)
{
    const int64_t b = s / in.H, h = s % in.H;
    return ((const float *)in.bias.data)[dcu_off(in.bias, b, h, 0, j)];
}

__device__ __forceinline__ bool key_exists(const slab_in &in, int64_t s, int64_t j)
{
    if (!in.pad.data)
        return true;
    const int64_t b = s / in.H;
    const int64_t o = (in.pad.shape[0] == 1 ? 0 : b * in.pad.stride[0]) + j * in.pad.stride[1];
    return ((const uint8_t *)in.pad.data)[o] != 0;
}

/* Tree layout: level k has nodes[k] nodes of capacity cap[k] each, per slab. */
struct tree {
    int levels;
    int64_t nodes[32], cap[32], off[32], cnt_off[32];
    int64_t slab_elems, slab_counts;
};

/* Level 0: each block of 64 keys in beat order; also finds NaN / +inf biases. */
__global__ void base_lists(slab_in in, tree t, entry *elems, int *counts, int *bad)
{
    const int64_t s = blockIdx.y, blk = blockIdx.x;
    const int64_t j = blk * 64 + threadIdx.x;
    __shared__ entry e[64];
    __shared__ bool ok[64];
    float x = -INFINITY;
    bool valid = false;
    if (j < in.Lk) {
        x = key_bias(in, s, j);
        if (isnan(x) || x == INFINITY)
            atomicOr(bad, 1);
        valid = x != -INFINITY && !isnan(x) && key_exists(in, s, j);
    }
    e[threadIdx.x] = {x, (int32_t)j};
    ok[threadIdx.x] = valid;
    __syncthreads();
    int rank = 0, n = 0;
    for (int i = 0; i < 64; i++) {
        n += ok[i];
        rank += ok[i] && beats(e[i], e[threadIdx.x]);
    }
    const int64_t cap = t.cap[0];
    entry *out = elems + s * t.slab_elems + blk * cap;
    if (valid && rank < cap)
        out[rank] = e[threadIdx.x];
    if (threadIdx.x == 0)
        counts[s * t.slab_counts + blk] = (int)min((int64_t)n, cap);
}

/* Level k: node i = the best cap[k] of its children 2i and 2i + 1 (level k - 1). */
__global__ void merge_level(tree t, int k, entry *elems, int *counts)
{
    extern __shared__ entry sm[];
    const int64_t s = blockIdx.y, i = blockIdx.x;
    const int64_t ccap = t.cap[k - 1], cap = t.cap[k];
    const entry *child = elems + s * t.slab_elems + t.off[k - 1];
    const int *ccount = counts + s * t.slab_counts + t.cnt_off[k - 1];
    const int nl = ccount[2 * i];
    const int nr = 2 * i + 1 < t.nodes[k - 1] ? ccount[2 * i + 1] : 0;
    entry *l = sm, *r = sm + ccap;
    for (int x = threadIdx.x; x < nl; x += blockDim.x)
        l[x] = child[2 * i * ccap + x];
    for (int x = threadIdx.x; x < nr; x += blockDim.x)
        r[x] = child[(2 * i + 1) * ccap + x];
    __syncthreads();
    entry *out = elems + s * t.slab_elems + t.off[k] + i * cap;
    for (int x = threadIdx.x; x < nl + nr; x += blockDim.x) {
        const bool left = x < nl;
        const entry e = left ? l[x] : r[x - nl];
        const int rank = left ? x + count_beating(r, nr, e) : (x - nl) + count_beating(l, nl, e);
        if (rank < cap)
            out[rank] = e;
    }
    if (threadIdx.x == 0)
        counts[s * t.slab_counts + t.cnt_off[k] + i] = (int)min((int64_t)(nl + nr), cap);
}

struct tile_out {
    dcu_tile *tiles;
    int32_t *row_lo, *row_hi, *keys;
    uint64_t *words;
    unsigned long long *nnz;
    int64_t Lq, off, ntiles, capU, wcap; /* wcap: words per row reserved per tile */
};

/* One tile of one slab: T, the arrivals, the intervals, U, the bit rows. */
__global__ void build_tiles(slab_in in, tree t, const entry *elems, const int *counts, int w,
                            int W2, tile_out o)
{
    extern __shared__ unsigned char smraw[];
    entry *cur = (entry *)smraw;                     /* W2: T in beat order */
    entry *nxt = cur + W2;                           /* W2: merge output, then the sort */
    int2 *span = (int2 *)(nxt + W2);                 /* w + 128: [start, end) by U position */
    __shared__ entry loc[128];
    __shared__ bool loc_ok[128];
    __shared__ int n_cur, n_T_surv, n_L_surv;
    __shared__ int list_off[32], list_n[32], n_lists;

    const int64_t s = blockIdx.y, tile = blockIdx.x;
    const int64_t r0 = tile * DCU_TILE, r1 = min(o.Lq, r0 + DCU_TILE);
    const int nrows = (int)(r1 - r0);
    const int64_t p0 = r0 + o.off, p1 = r1 - 1 + o.off;
    const int64_t tix = s * o.ntiles + tile;
    int32_t *lo = o.row_lo + s * o.Lq + r0, *hi = o.row_hi + s * o.Lq + r0;

    if (p1 < 0) { /* every row sees no key */
        if (threadIdx.x == 0)
            o.tiles[tix] = {tix * o.capU, tix * DCU_TILE * o.wcap, 0, 0, 0, 0};
        for (int r = threadIdx.x; r < nrows; r += blockDim.x)
            lo[r] = hi[r] = 0;
        return;
    }
    const int64_t A = p0 > 0 ? (p0 / 64) * 64 : 0;
    /* The nodes covering [0, A): one per set bit of A / 64, the largest first. */
    if (threadIdx.x == 0) {
        int64_t nb = A / 64, base = 0;
        int n = 0;
        for (int k = t.levels - 1; k >= 0; k--)
            if (nb & ((int64_t)1 << k)) {
                const int64_t node = base >> k;
                list_off[n] = (int)(t.off[k] + node * t.cap[k]);
                list_n[n] = counts[s * t.slab_counts + t.cnt_off[k] + node];
                n++;
                base += (int64_t)1 << k;
            }
        n_lists = n;
        n_cur = 0;
    }
    __syncthreads();
    const entry *se = elems + s * t.slab_elems;
    /* T: merge the lists one after another, keeping the best w. */
    for (int li = 0; li < n_lists; li++) {
        const int nl = n_cur, nr = list_n[li];
        const entry *r = se + list_off[li];
        /* nxt[0 .. nr) holds the incoming list (in shared memory for the searches). */
        entry *in_r = nxt;
        for (int x = threadIdx.x; x < nr; x += blockDim.x)
            in_r[x] = r[x];
        __syncthreads();
        /* Ranks first (into registers: at most 16 elements a thread, see the launch), then
         * the writes, so that cur can be rewritten in place. */
        entry mine[16];
        int rank[16];
        int m = 0;
        for (int x = threadIdx.x; x < nl + nr; x += blockDim.x, m++) {
            const bool left = x < nl;
            const entry e = left ? cur[x] : in_r[x - nl];
            mine[m] = e;
            rank[m] = left ? x + count_beating(in_r, nr, e) : (x - nl) + count_beating(cur, nl, e);
        }
        __syncthreads();
        for (int q = 0; q < m; q++)
            if (rank[q] < w)
                cur[rank[q]] = mine[q];
        __syncthreads();
        if (threadIdx.x == 0)
            n_cur = min(nl + nr, w);
        __syncthreads();
    }
    const int nT = n_cur;
    /* The arrivals: keys [A, p1] (<= 127). */
    const int nloc = (int)(p1 - A + 1);
    for (int x = threadIdx.x; x < nloc; x += blockDim.x) {
        const int64_t j = A + x;
        const float v = key_bias(in, s, j);
        loc[x] = {v, (int32_t)j};
        loc_ok[x] = v != -INFINITY && !isnan(v) && key_exists(in, s, j);
    }
    if (threadIdx.x == 0)
        n_T_surv = n_L_surv = 0;
    __syncthreads();
    /* Interval of rows of candidate e that starts with `beaten` better keys present. */
    auto interval = [&](entry e, int beaten, int *start, int *end) {
        const int rs = (int)max((int64_t)0, max((int64_t)e.k - p0, -p0));
        int re = nrows;
        if (beaten >= w)
            re = rs;
        else if (beaten >= w - nloc) { /* arrivals may push it out */
            int cnt = beaten;
            for (int x = 0; x < nloc; x++) {
                if (!loc_ok[x] || loc[x].k == e.k || !beats(loc[x], e))
                    continue;
                if (++cnt >= w) {
                    re = (int)max((int64_t)rs, min((int64_t)nrows, (int64_t)loc[x].k - p0));
                    break;
                }
            }
        }
        *start = rs;
        *end = max(re, rs);
    };
    /* T's candidates go to the sort array as (key << 16 | start << 8 | end), the rest as the
     * largest value so that they sort last. */
    uint64_t *sorted = (uint64_t *)nxt;
    for (int x = threadIdx.x; x < W2; x += blockDim.x) {
        uint64_t v = ~0ull;
        if (x < nT) {
            int a, b;
            interval(cur[x], x, &a, &b);
            if (a < b) {
                v = ((uint64_t)cur[x].k << 16) | ((uint64_t)a << 8) | (uint64_t)b;
                atomicAdd(&n_T_surv, 1);
            }
        }
        sorted[x] = v;
    }
    __syncthreads();
    for (int size = 2; size <= W2; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int x = threadIdx.x; x < W2 / 2; x += blockDim.x) {
                const int i = 2 * x - (x & (stride - 1));
                const int j = i + stride;
                const bool up = (i & size) == 0;
                const uint64_t a = sorted[i], b = sorted[j];
                if ((a > b) == up) {
                    sorted[i] = b;
                    sorted[j] = a;
                }
            }
            __syncthreads();
        }
    const int nTs = n_T_surv;
    int32_t *keys = o.keys + tix * o.capU;
    for (int x = threadIdx.x; x < nTs; x += blockDim.x) {
        const uint64_t v = sorted[x];
        keys[x] = (int32_t)(v >> 16);
        span[x] = make_int2((int)((v >> 8) & 255), (int)(v & 255));
    }
    /* The arrivals that some row keeps, in key order after T's (they are all >= A). */
    if (threadIdx.x < 32) {
        int base = 0;
        for (int x0 = 0; x0 < nloc; x0 += 32) {
            const int x = x0 + threadIdx.x;
            int a = 0, b = 0;
            if (x < nloc && loc_ok[x])
                interval(loc[x], count_beating(cur, nT, loc[x]), &a, &b);
            const bool keep = a < b;
            const unsigned ball = __ballot_sync(0xffffffffu, keep);
            if (keep) {
                const int pos = nTs + base + __popc(ball & ((1u << threadIdx.x) - 1));
                keys[pos] = loc[x].k;
                span[pos] = make_int2(a, b);
            }
            base += __popc(ball);
        }
        if (threadIdx.x == 0)
            n_L_surv = base;
    }
    __syncthreads();
    const int count = nTs + n_L_surv;
    const int wpr = (count + 63) / 64;
    if (threadIdx.x == 0)
        o.tiles[tix] = {tix * o.capU, tix * DCU_TILE * o.wcap, 0, count, wpr, 0};
    uint64_t *words = o.words + tix * DCU_TILE * o.wcap;
    /* Neighbouring threads take neighbouring rows of one word: their reads of span[] are the
     * same address (a broadcast; a row's words side by side would all hit one bank). */
    for (int x = threadIdx.x; x < nrows * wpr; x += blockDim.x) {
        const int wd = x / nrows, r = x % nrows;
        uint64_t bits = 0;
        for (int b = 0; b < 64; b++) {
            const int u = wd * 64 + b;
            if (u < count && span[u].x <= r && r < span[u].y)
                bits |= 1ull << b;
        }
        words[(int64_t)r * wpr + wd] = bits;
    }
    __syncthreads();
    unsigned long long nnz = 0;
    for (int r = threadIdx.x; r < nrows; r += blockDim.x) {
        int first = -1, last = -1;
        for (int wd = 0; wd < wpr; wd++) {
            const uint64_t b = words[(int64_t)r * wpr + wd];
            if (!b)
                continue;
            if (first < 0)
                first = wd * 64 + __ffsll((long long)b) - 1;
            last = wd * 64 + 63 - __clzll((long long)b);
            nnz += __popcll(b);
        }
        lo[r] = first < 0 ? 0 : first;
        hi[r] = first < 0 ? 0 : last + 1;
    }
    if (nnz)
        atomicAdd(o.nnz, nnz);
}

} // namespace

extern "C" int dcu_build_topk_causal(int64_t window, const dcu_tensor *bias, const dcu_tensor *pad,
                                     dcu_sparsity *sp, void *stream_)
{
    cudaStream_t stream = (cudaStream_t)stream_;
    const int64_t nslab = sp->B * sp->H, Lk = sp->Lk, Lq = sp->Lq;
    const int w = (int)std::min<int64_t>(window, Lk);
    const int64_t nb = std::max<int64_t>(1, (Lk + 63) / 64);
    tree t = {};
    int64_t n = nb, cap = std::min<int64_t>(w, 64), eo = 0, co = 0;
    for (int k = 0;; k++) {
        t.nodes[k] = n;
        t.cap[k] = std::max<int64_t>(cap, 1);
        t.off[k] = eo;
        t.cnt_off[k] = co;
        eo += n * t.cap[k];
        co += n;
        t.levels = k + 1;
        if (n == 1)
            break;
        n = (n + 1) / 2;
        cap = std::min<int64_t>(w, cap * 2);
    }
    t.slab_elems = eo;
    t.slab_counts = co;
    const int W2 = [&] { int p = 1; while (p < std::max(w, 1)) p <<= 1; return p; }();
    const size_t tile_smem = (size_t)W2 * sizeof(entry) * 2 + (size_t)(w + 128) * sizeof(int2);
    int dev = 0, max_smem = 0;
    DCU_TRY(cudaGetDevice(&dev));
    DCU_TRY(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (tile_smem > (size_t)max_smem || 2 * (int64_t)w > 16 * TILE_THREADS)
        return 2; /* too large a window for this GPU: the caller builds it on the host */

    const int64_t ntile_all = nslab * sp->ntiles;
    const int64_t capU = std::min<int64_t>(w + 64, std::max<int64_t>(Lk, 1));
    const int64_t wcap = (capU + 63) / 64;
    entry *elems = nullptr;
    int *counts = nullptr, *bad = nullptr; /* bad: the NaN flag, then the nnz (8-aligned) */
    unsigned long long *nnz = nullptr;
    dcu_sparsity out = *sp;
    out.tiles = nullptr;
    out.row_lo = out.row_hi = out.keys = nullptr;
    out.words = nullptr;
    auto release = [&] {
        cudaFreeAsync(elems, stream);
        cudaFreeAsync(counts, stream);
        cudaFreeAsync(bad, stream);
    };
    cudaError_t e = cudaSuccess;
    const size_t rows = (size_t)(nslab * Lq);
#define ALLOC(p, bytes) if (e == cudaSuccess) e = cudaMallocAsync((void **)&(p), std::max<size_t>(bytes, 8), stream)
    ALLOC(elems, (size_t)(nslab * t.slab_elems) * sizeof(entry));
    ALLOC(counts, (size_t)(nslab * t.slab_counts) * sizeof(int));
    ALLOC(bad, 16);
    ALLOC(out.tiles, (size_t)ntile_all * sizeof(dcu_tile));
    ALLOC(out.row_lo, rows * 4);
    ALLOC(out.row_hi, rows * 4);
    ALLOC(out.keys, (size_t)(ntile_all * capU) * 4);
    ALLOC(out.words, (size_t)(ntile_all * DCU_TILE * wcap) * 8);
#undef ALLOC
    if (e == cudaSuccess) {
        nnz = (unsigned long long *)(bad + 2);
        e = cudaMemsetAsync(bad, 0, 16, stream);
    }
    if (e != cudaSuccess) {
        release();
        dcu_sparsity_free(&out);
        return dcu_fail(e, "sparsity_build: allocation");
    }
    slab_in in = {*bias, *pad, sp->H, Lk};
    if (Lk > 0) {
        base_lists<<<dim3((unsigned)nb, (unsigned)nslab), 64, 0, stream>>>(in, t, elems, counts, bad);
        for (int k = 1; k < t.levels; k++) {
            const size_t smem = (size_t)t.cap[k - 1] * 2 * sizeof(entry);
            if (smem > 48 * 1024) /* the default limit; the call costs host time */
                cudaFuncSetAttribute(merge_level, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
            /* the top levels have few nodes of long lists: more threads a node there */
            const int threads = t.cap[k] >= 512 ? 1024 : 256;
            merge_level<<<dim3((unsigned)t.nodes[k], (unsigned)nslab), threads, smem, stream>>>(t, k, elems, counts);
        }
    }
    if (sp->ntiles > 0) {
        if (tile_smem > 48 * 1024)
            cudaFuncSetAttribute(build_tiles, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tile_smem);
        tile_out o = {out.tiles, out.row_lo, out.row_hi, out.keys, out.words, nnz,
                      Lq, Lk - Lq, sp->ntiles, capU, wcap};
        build_tiles<<<dim3((unsigned)sp->ntiles, (unsigned)nslab), TILE_THREADS, tile_smem, stream>>>(
            in, t, elems, counts, w, W2, o);
    }
    int host[4] = {0, 0, 0, 0};
    e = cudaGetLastError();
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(host, bad, 16, cudaMemcpyDeviceToHost, stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(stream);
    release();
    if (e != cudaSuccess || host[0]) {
        dcu_sparsity_free(&out);
        return e != cudaSuccess ? dcu_fail(e, "sparsity_build") : 1;
    }
    unsigned long long total;
    memcpy(&total, host + 2, sizeof total);
    out.nkeys = ntile_all * capU;
    out.nwords = ntile_all * DCU_TILE * wcap;
    out.nnz = (int64_t)total;
    *sp = out;
    return 0;
}

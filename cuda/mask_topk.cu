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
 *    it, a binary search). Steps 1 and 2 are one launch (build_tree): a block makes the
 *    levels of 16 blocks in shared memory, then climbs, the second of two sibling blocks to
 *    finish merging them into their parent;
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
#include <climits>
#include <cstring>

#include "common.cuh"

namespace {

/* Threads of a tile's block: with 16 merge elements a thread, windows up to 4096. */
constexpr int TILE_THREADS = 512;

struct __align__(8) entry {
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

/* The tree kernel: a block takes GROUP_BLOCKS blocks of 64 keys (their levels 0 .. GROUP_LEVELS
 * in shared memory), then climbs: of the two blocks whose nodes are a parent's children, the
 * one that finishes second merges them (a counter per parent tells which), and goes on up.
 * So the whole tree is one launch and its top levels run without launch gaps. */
constexpr int GROUP_LEVELS = 4, GROUP_BLOCKS = 1 << GROUP_LEVELS, GROUP_KEYS = 64 * GROUP_BLOCKS;

/* An entry another block wrote (read past L1, which is not coherent between blocks). */
__device__ __forceinline__ entry load_cg(const entry *p)
{
    const int2 v = __ldcg((const int2 *)p);
    return {__int_as_float(v.x), v.y};
}

/* out = the best cap entries of the beat-ordered lists l and r (every thread of the block). */
__device__ __forceinline__ void merge_lists(const entry *l, int nl, const entry *r, int nr,
                                            entry *out, int cap)
{
    for (int x = threadIdx.x; x < nl + nr; x += blockDim.x) {
        const bool left = x < nl;
        const entry e = left ? l[x] : r[x - nl];
        const int rank = left ? x + count_beating(r, nr, e) : (x - nl) + count_beating(l, nl, e);
        if (rank < cap)
            out[rank] = e;
    }
}

__global__ void __launch_bounds__(GROUP_KEYS) build_tree(slab_in in, tree t, entry *elems,
                                                         int *counts, int *arrivals, int *bad)
{
    extern __shared__ entry sm[]; /* 2 * max(GROUP_KEYS, top capacity) */
    __shared__ bool ok[GROUP_KEYS];
    __shared__ int n_cur[GROUP_BLOCKS], n_nxt[GROUP_BLOCKS];
    __shared__ int go;
    const int64_t s = blockIdx.y, g = blockIdx.x;
    entry *se = elems + s * t.slab_elems;
    int *sc = counts + s * t.slab_counts;
    entry *cur = sm, *nxt = sm + GROUP_KEYS;

    /* Level 0: each block of 64 keys in beat order; NaN and +inf biases are flagged. */
    const int x = threadIdx.x, lb = x >> 6;
    const int64_t blk = g * GROUP_BLOCKS + lb, j = blk * 64 + (x & 63);
    float v = -INFINITY;
    bool valid = false;
    if (j < in.Lk) {
        v = key_bias(in, s, j);
        if (isnan(v) || v == INFINITY)
            atomicOr(bad, 1);
        valid = v != -INFINITY && !isnan(v) && key_exists(in, s, j);
    }
    const entry me = {v, (int32_t)j};
    nxt[x] = me;
    ok[x] = valid;
    __syncthreads();
    int rank = 0, n = 0;
    for (int i = 0; i < 64; i++) {
        const int o = (lb << 6) + i;
        n += ok[o];
        rank += ok[o] && beats(nxt[o], me);
    }
    const int cap0 = (int)t.cap[0];
    if (valid && rank < cap0) {
        cur[lb * cap0 + rank] = me;
        se[t.off[0] + blk * cap0 + rank] = me;
    }
    if ((x & 63) == 0) {
        n_cur[lb] = blk < t.nodes[0] ? min(n, cap0) : 0;
        if (blk < t.nodes[0])
            sc[t.cnt_off[0] + blk] = n_cur[lb];
    }
    __syncthreads();

    /* Levels 1 .. GROUP_LEVELS inside the group, in shared memory (each level holds at most
     * GROUP_KEYS entries: a node's capacity is at most its keys). */
    const int top = min(GROUP_LEVELS, t.levels - 1);
    for (int k = 1; k <= top; k++) {
        const int ccap = (int)t.cap[k - 1], cap = (int)t.cap[k], nodes = GROUP_BLOCKS >> k;
        for (int y = x; y < 2 * nodes * ccap; y += blockDim.x) {
            const int c = y / ccap, i = y % ccap;
            if (i >= n_cur[c])
                continue;
            const entry e = cur[y];
            const int sib = c ^ 1;
            const int r = i + count_beating(cur + sib * ccap, n_cur[sib], e);
            if (r < cap) {
                const int64_t node = g * nodes + (c >> 1);
                nxt[(c >> 1) * cap + r] = e;
                se[t.off[k] + node * cap + r] = e;
            }
        }
        __syncthreads();
        if (x < nodes) {
            const int64_t node = g * nodes + x;
            n_nxt[x] = min(n_cur[2 * x] + n_cur[2 * x + 1], cap);
            if (node < t.nodes[k])
                sc[t.cnt_off[k] + node] = n_nxt[x];
        }
        __syncthreads();
        if (x < nodes)
            n_cur[x] = n_nxt[x];
        entry *tmp = cur;
        cur = nxt;
        nxt = tmp;
        __syncthreads();
    }

    /* The climb: this block's node at level k; the second of two siblings merges them. */
    int64_t node = g;
    for (int k = top; k + 1 < t.levels; k++) {
        const int64_t parent = node >> 1;
        if ((node ^ 1) < t.nodes[k]) {
            __threadfence(); /* this block's node, before its arrival */
            __syncthreads();
            if (x == 0)
                go = atomicAdd(&arrivals[s * t.slab_counts + t.cnt_off[k + 1] + parent], 1) == 1;
            __syncthreads();
            if (!go)
                return;
            __threadfence(); /* the sibling's node, after its arrival */
        }
        const int64_t ccap = t.cap[k], cap = t.cap[k + 1], li = 2 * parent, ri = li + 1;
        const int nl = __ldcg(sc + t.cnt_off[k] + li);
        const int nr = ri < t.nodes[k] ? __ldcg(sc + t.cnt_off[k] + ri) : 0;
        entry *l = sm, *r = sm + ccap;
        const entry *child = se + t.off[k];
        for (int y = x; y < nl; y += blockDim.x)
            l[y] = load_cg(child + li * ccap + y);
        for (int y = x; y < nr; y += blockDim.x)
            r[y] = load_cg(child + ri * ccap + y);
        __syncthreads();
        merge_lists(l, nl, r, nr, se + t.off[k + 1] + parent * cap, (int)cap);
        if (x == 0)
            sc[t.cnt_off[k + 1] + parent] = (int)min((int64_t)(nl + nr), cap);
        __syncthreads();
        node = parent;
    }
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
            if (a < b)
                v = ((uint64_t)cur[x].k << 16) | ((uint64_t)a << 8) | (uint64_t)b;
        }
        sorted[x] = v;
        /* one shared atomic a warp, not one a survivor */
        const unsigned act = __activemask(), kept = __ballot_sync(act, v != ~0ull);
        if ((threadIdx.x & 31) == __ffs(act) - 1)
            atomicAdd(&n_T_surv, __popc(kept));
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
    /* The arrivals that some row keeps, in key order after T's (they are all >= A): at most
     * 127, one a thread of the first 4 warps, placed by the warps' ballots. */
    __shared__ int warp_kept[4];
    unsigned ball = 0;
    int a = 0, b = 0;
    const int tx = threadIdx.x;
    if (tx < 128) {
        if (tx < nloc && loc_ok[tx])
            interval(loc[tx], count_beating(cur, nT, loc[tx]), &a, &b);
        ball = __ballot_sync(0xffffffffu, a < b);
        if ((tx & 31) == 0)
            warp_kept[tx >> 5] = __popc(ball);
    }
    __syncthreads();
    if (a < b) {
        int pos = nTs + __popc(ball & ((1u << (tx & 31)) - 1));
        for (int i = 0; i < (tx >> 5); i++)
            pos += warp_kept[i];
        keys[pos] = loc[tx].k;
        span[pos] = make_int2(a, b);
    }
    if (tx == 0)
        n_L_surv = warp_kept[0] + warp_kept[1] + warp_kept[2] + warp_kept[3];
    __syncthreads();
    const int count = nTs + n_L_surv;
    const int wpr = (count + 63) / 64;
    if (threadIdx.x == 0)
        o.tiles[tix] = {tix * o.capU, tix * DCU_TILE * o.wcap, 0, count, wpr, 0};
    uint64_t *words = o.words + tix * DCU_TILE * o.wcap;
    /* Each row's first and last selected position and count, gathered as its words are made
     * (reading the words back from global memory was a chain of L2 latencies per row). */
    __shared__ int row_first[DCU_TILE], row_end[DCU_TILE], row_count[DCU_TILE];
    if (threadIdx.x < DCU_TILE) {
        row_first[threadIdx.x] = INT_MAX;
        row_end[threadIdx.x] = 0;
        row_count[threadIdx.x] = 0;
    }
    __syncthreads();
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
        if (bits) {
            atomicMin(&row_first[r], wd * 64 + __ffsll((long long)bits) - 1);
            atomicMax(&row_end[r], wd * 64 + 64 - __clzll((long long)bits));
            atomicAdd(&row_count[r], __popcll(bits));
        }
    }
    __syncthreads();
    unsigned long long nnz = 0;
    for (int r = threadIdx.x; r < nrows; r += blockDim.x) {
        const bool any = row_count[r] > 0;
        lo[r] = any ? row_first[r] : 0;
        hi[r] = any ? row_end[r] : 0;
        nnz += row_count[r];
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
    /* One scratch allocation: the flags (NaN seen, then the nnz, 8-aligned), the climb's
     * arrival counters (zeroed with the flags), the node counts, the nodes. */
    const size_t n_counts = (size_t)(nslab * t.slab_counts);
    const size_t zeroed = 16 + ((n_counts * sizeof(int) + 15) & ~(size_t)15);
    const size_t scratch_bytes = zeroed + n_counts * sizeof(int) + 8 +
                                 (size_t)(nslab * t.slab_elems) * sizeof(entry);
    unsigned char *scratch = nullptr;
    dcu_sparsity out = *sp;
    out.tiles = nullptr;
    out.row_lo = out.row_hi = out.keys = nullptr;
    out.words = nullptr;
    cudaError_t e = cudaSuccess;
    const size_t rows = (size_t)(nslab * Lq);
#define ALLOC(p, bytes) if (e == cudaSuccess) e = cudaMallocAsync((void **)&(p), std::max<size_t>(bytes, 8), stream)
    ALLOC(scratch, scratch_bytes);
    ALLOC(out.tiles, (size_t)ntile_all * sizeof(dcu_tile));
    ALLOC(out.row_lo, rows * 4);
    ALLOC(out.row_hi, rows * 4);
    ALLOC(out.keys, (size_t)(ntile_all * capU) * 4);
    ALLOC(out.words, (size_t)(ntile_all * DCU_TILE * wcap) * 8);
#undef ALLOC
    if (e == cudaSuccess)
        e = cudaMemsetAsync(scratch, 0, zeroed, stream);
    if (e != cudaSuccess) {
        cudaFreeAsync(scratch, stream);
        dcu_sparsity_free(&out, stream);
        return dcu_fail(e, "sparsity_build: allocation");
    }
    int *bad = (int *)scratch, *arrivals = (int *)(scratch + 16);
    unsigned long long *nnz = (unsigned long long *)(scratch + 8);
    int *counts = (int *)(scratch + zeroed);
    entry *elems = (entry *)(((uintptr_t)(counts + n_counts) + 7) & ~(uintptr_t)7);
    slab_in in = {*bias, *pad, sp->H, Lk};
    if (Lk > 0) {
        const size_t smem = (size_t)2 * std::max<int64_t>(GROUP_KEYS, t.cap[t.levels - 1]) * sizeof(entry);
        if (smem > 48 * 1024) /* the default limit; the call costs host time */
            cudaFuncSetAttribute(build_tree, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        const int64_t groups = (nb + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
        build_tree<<<dim3((unsigned)groups, (unsigned)nslab), GROUP_KEYS, smem, stream>>>(
            in, t, elems, counts, arrivals, bad);
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
    cudaFreeAsync(scratch, stream);
    if (e != cudaSuccess || host[0]) {
        dcu_sparsity_free(&out, stream);
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

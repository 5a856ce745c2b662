/*
 * mask_topk_tree.cu - the causal top-w selection over a per-key bias on the GPU for key axes
 * too long for mask_topk.cu's runs to stage their prefix in shared memory (DESIGN §2, §5),
 * with no O(Lq * Lk) work or memory. It produces the object the CPU's streaming builder
 * produces: per tile of 64 query rows, the sorted union U of the keys its rows select and one
 * bitmask row per query over U.
 *
 * Order: key a beats key b when bias_a > bias_b, or they are equal and a < b (the earlier key
 * wins ties). Keys that are padding or whose bias is -inf never take part. Row i (key position
 * p = i + Lk - Lq) selects the w best keys of [0, p].
 *
 * 1. base lists: for every block of 64 keys, its keys in beat order (truncated to w), by a
 *    bitonic sort in one warp;
 * 2. an up-sweep tree: a node of level k holds the best w keys of 2^k consecutive blocks,
 *    merged from its two children (merging two sorted lists is a rank computation: an
 *    element's place is its own index plus the number of the other list's elements that beat
 *    it, a binary search). Steps 1 and 2 are one launch (build_tree): a block makes the
 *    levels of 16 blocks in shared memory, then climbs, the second of two sibling blocks to
 *    finish merging them into their parent. A list holds sentinels (beating no key) past its
 *    count;
 * 3. evict times (evict_times, a thread a key): key j leaves the best w of [0, p] at the p
 *    of the w-th key, in key order, that beats it (never, if fewer than w do); found by one
 *    descent of the tree, whose left children's lists count the keys that beat j well enough
 *    to choose the side. Row p keeps j iff j <= p < evict_j. Most keys of a long sequence
 *    never enter (w keys before them beat them); they are told apart first. For each word of
 *    32 keys, which of them enter and the latest evict time among those;
 * 4. per run of consecutive tiles (build_tiles, one thread block): the tiles' unions and bit
 *    rows, from the evict times (mask_topk_tree_tiles.cuh, whose head comment tells how).
 * Work: O(Lk log Lk) for the tree, O(log Lk log w) per key for its evict time, O(Lk) per run
 * and O(w + 64) per tile for the unions; memory O(Lk log Lk) scratch.
 */
#include <algorithm>
#include <climits>
#include <cstring>

#include "common.cuh"

namespace {

struct __align__(8) entry {
    float x;
    int32_t k;
};

__device__ __forceinline__ bool beats(entry a, entry b)
{
    return a.x > b.x || (a.x == b.x && a.k < b.k);
}

/* The entry past a list's count: it beats no key, so searches may run over the whole capacity
 * and never need the count. */
constexpr entry SENTINEL = {-INFINITY, INT_MAX};

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
    int64_t vals_per_slab; /* keys' biases, contiguous (-inf for a key that takes no part) */
};

/* The tree kernel: a block takes GROUP_BLOCKS blocks of 64 keys (their levels 0 .. GROUP_LEVELS
 * in shared memory), then climbs: of the two blocks whose nodes are a parent's children, the
 * one that finishes second merges them (a counter per parent tells which), and goes on up.
 * So the whole tree is one launch and its top levels run without launch gaps. */
constexpr int GROUP_LEVELS = 4, GROUP_BLOCKS = 1 << GROUP_LEVELS, GROUP_KEYS = 64 * GROUP_BLOCKS;

/* Orders this thread's writes before, and its reads after, at device scope: with the climb's
 * arrival counter, a release and an acquire. __threadfence() is a sequentially consistent
 * fence, which also empties L1; the climb needs only this. */
__device__ __forceinline__ void fence_acq_rel()
{
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
}

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
    for (int x = nl + nr + threadIdx.x; x < cap; x += blockDim.x)
        out[x] = SENTINEL;
}

__global__ void __launch_bounds__(GROUP_KEYS) build_tree(slab_in in, tree t, entry *elems,
                                                         int *counts, int *arrivals, int *bad,
                                                         float *vals)
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
    /* a key that takes no part sorts after every key that does */
    nxt[x] = {valid ? v : -INFINITY, (int32_t)j};
    ok[x] = valid;
    if (blk < t.nodes[0])
        vals[s * t.vals_per_slab + j] = valid ? v : -INFINITY;
    __syncthreads();
    const int cap0 = (int)t.cap[0];
    if (x < 32 * GROUP_BLOCKS) { /* a warp a leaf block: a bitonic sort of its 64 keys */
        const int wb = x >> 5, lane = x & 31;
        const int64_t wblk = g * GROUP_BLOCKS + wb;
        entry e0 = nxt[wb * 64 + lane], e1 = nxt[wb * 64 + 32 + lane];
        const int n = __popc(__ballot_sync(0xffffffffu, ok[wb * 64 + lane])) +
                      __popc(__ballot_sync(0xffffffffu, ok[wb * 64 + 32 + lane]));
        for (int k = 2; k <= 64; k <<= 1)
            for (int jj = k >> 1; jj > 0; jj >>= 1) {
                if (jj == 32) { /* k == 64: element lane against lane + 32, best first */
                    if (!beats(e0, e1)) {
                        const entry tmp = e0;
                        e0 = e1;
                        e1 = tmp;
                    }
                    continue;
                }
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    entry &m = h ? e1 : e0;
                    const int i = lane + 32 * h;
                    entry o;
                    o.x = __shfl_xor_sync(0xffffffffu, m.x, jj);
                    o.k = __shfl_xor_sync(0xffffffffu, m.k, jj);
                    const bool lower = (i & jj) == 0, best_first = (i & k) == 0;
                    /* the lower index keeps the better of the two in a best-first run */
                    if ((lower == best_first) != beats(m, o))
                        m = o;
                }
            }
        if (wblk < t.nodes[0]) {
            if (lane < cap0) {
                cur[wb * cap0 + lane] = e0;
                se[t.off[0] + wblk * cap0 + lane] = e0;
            }
            if (lane + 32 < cap0) {
                cur[wb * cap0 + lane + 32] = e1;
                se[t.off[0] + wblk * cap0 + lane + 32] = e1;
            }
        }
        if (lane == 0) {
            n_cur[wb] = wblk < t.nodes[0] ? min(n, cap0) : 0;
            if (wblk < t.nodes[0])
                sc[t.cnt_off[0] + wblk] = n_cur[wb];
        }
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
        for (int y = x; y < nodes * cap; y += blockDim.x) { /* sentinels past each count */
            const int c = y / cap, i = y % cap;
            const int64_t node = g * nodes + c;
            if (i >= n_nxt[c] && node < t.nodes[k])
                se[t.off[k] + node * cap + i] = SENTINEL;
        }
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
            fence_acq_rel(); /* this block's node, before its arrival */
            __syncthreads();
            if (x == 0)
                go = atomicAdd(&arrivals[s * t.slab_counts + t.cnt_off[k + 1] + parent], 1) == 1;
            __syncthreads();
            if (!go)
                return;
            fence_acq_rel(); /* the sibling's node, after its arrival */
        }
        const int64_t ccap = t.cap[k], cap = t.cap[k + 1], li = 2 * parent, ri = li + 1;
        const bool right = ri < t.nodes[k];
        const int nl = __ldcg(sc + t.cnt_off[k] + li);
        const int nr = right ? __ldcg(sc + t.cnt_off[k] + ri) : 0;
        entry *l = sm, *r = sm + ccap;
        const entry *child = se + t.off[k];
        /* whole lists (sentinels past the counts), so that these loads need not wait for the
         * counts: one round trip a level fewer */
        for (int y = x; y < ccap; y += blockDim.x) {
            l[y] = load_cg(child + li * ccap + y);
            if (right)
                r[y] = load_cg(child + ri * ccap + y);
        }
        __syncthreads();
        merge_lists(l, nl, r, nr, se + t.off[k + 1] + parent * cap, (int)cap);
        if (x == 0)
            sc[t.cnt_off[k + 1] + parent] = (int)min((int64_t)(nl + nr), cap);
        __syncthreads();
        node = parent;
    }
}

/* count_beating over a list in global memory: seven probes a step whose loads are independent
 * (the beating entries are a prefix, so the probes that beat are too), then the last <= 8
 * entries at once: 4 rounds of loads for 1024 entries where a binary search waits on 10.
 * narrow_beating is one step: l[0, lo) are known to beat e and l[hi, ..) not to. */
__device__ __forceinline__ void narrow_beating(const entry *l, entry e, int &lo, int &hi)
{
    if (hi - lo <= 8)
        return;
    const int step = (hi - lo) / 8;
    int c = 0;
#pragma unroll
    for (int i = 1; i <= 7; i++)
        c += beats(l[lo + i * step], e);
    const int nhi = c < 7 ? lo + (c + 1) * step : hi;
    lo = c ? lo + c * step + 1 : lo;
    hi = nhi;
}

__device__ __forceinline__ int count_beating_wide(const entry *l, int n, entry e, int lo = 0)
{
    int hi = n; /* l[0, lo) beat e; l[hi, n) do not */
    while (hi - lo > 8)
        narrow_beating(l, e, lo, hi);
    int c = 0;
#pragma unroll
    for (int i = 0; i < 8; i++)
        c += lo + i < hi && beats(l[lo + i], e);
    return lo + c;
}

/* Whether at least need (>= 1) entries of the beat-ordered list l[0, n) beat e: exactly when
 * l[need - 1] does. If not, *cnt is how many do. The test's load goes out with the first
 * round of the count's, so the answer "yes" costs one round of loads. */
__device__ __forceinline__ bool beaten_by(const entry *l, int n, int need, entry e, int *cnt)
{
    const bool probe = need <= n;
    const entry pe = probe ? l[need - 1] : SENTINEL;
    int lo = 0, hi = probe ? need - 1 : n; /* if not, the count lies in [0, hi] */
    narrow_beating(l, e, lo, hi); /* its loads go out with pe's */
    if (beats(pe, e))
        return true;
    *cnt = count_beating_wide(l, hi, e, lo);
    return false;
}

/* evict[j] (one row of es per slab): the first position p >= j at which key j is no longer
 * among the best w keys of [0, p], that is, the position of the w-th key (in key order) that
 * beats j, or Lk when fewer than w keys beat it; j itself for a key that never takes part.
 * The row at position p keeps j iff j <= p < evict[j] (DESIGN §2's evict times).
 * One thread a key descends the tree from the root: a node's list holds the keys of the node
 * that beat j exactly when fewer than its capacity do (they are then among its best), and a
 * full list otherwise, so "at least `need` of them beat j" is read off the left child alone
 * (beaten_by: one load when it holds, a count when the descent goes right); the leaf block of
 * 64 keys is scanned in key order. Lists hold sentinels past their counts,
 * so a search takes the level's capacity and waits on no count.
 * Also wsum, for each word of 32 keys: which of them some row keeps (evict > j) and the latest
 * evict time among those (0 if none), which lets the unions' scans skip the words that no row
 * keeps any more. The row of evict times is written up to a whole word (es = 32 * ew), so
 * that a word can be read whole. */
__global__ void evict_times(slab_in in, tree t, const entry *elems, int w,
                            int64_t es, int32_t *evict, int64_t ew, int2 *wsum,
                            const float *vals)
{
    const int64_t s = blockIdx.y, j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool here = j < in.Lk;
    const float v = here ? key_bias(in, s, j) : -INFINITY;
    int64_t ev = j;
    if (here && w > 0 && v != -INFINITY && !isnan(v) && key_exists(in, s, j)) { /* w 0: none kept */
        const entry e = {v, (int32_t)j};
        const entry *se = elems + s * t.slab_elems;
        int k = t.levels - 1;
        /* If the w-th best key of the largest aligned node before j's leaf block beats j, at
         * least w keys before j beat it: it never enters (most keys of a long sequence), and
         * its lane leaves the descent, which saves memory traffic where the warps are many.
         * If the root's w-th best does not beat j, fewer than w keys do: it is never evicted.
         * (A list's sentinels beat no key, so neither test needs the list's count.) Both loads
         * go out together. */
        const int64_t blk = j >> 6;
        entry first = SENTINEL;
        if (blk > 0) {
            const int kf = 63 - __clzll((long long)blk);
            if (kf < t.levels && t.cap[kf] >= w)
                first = se[t.off[kf] + (w - 1)];
        }
        const entry root = t.cap[k] >= w ? se[t.off[k] + (w - 1)] : SENTINEL;
        if (beats(first, e)) {
            ev = j;
        } else if (!beats(root, e)) {
            ev = in.Lk;
        } else {
            int need = w;
            int64_t node = 0;
            for (; k > 0; k--) {
                const int64_t l = 2 * node;
                int cl = 0;
                if (beaten_by(se + t.off[k - 1] + l * t.cap[k - 1], (int)t.cap[k - 1], need, e,
                              &cl)) {
                    node = l;
                } else {
                    need -= cl;
                    node = l + 1;
                }
            }
            /* The leaf's keys in key order, eight biases a load pair (the contiguous copy of
             * build_tree, -inf for keys that take no part), up to the need-th that beats j. */
            const float4 *lv = (const float4 *)(vals + s * t.vals_per_slab + node * 64);
            int64_t pos = node * 64 + 63; /* not kept: the root counted w keys that beat j */
            for (int q = 0; q < 16 && need > 0; q += 2) {
                const float4 u0 = __ldg(lv + q), u1 = __ldg(lv + q + 1);
                const float u[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const int64_t key = node * 64 + 4 * q + i;
                    if (beats({u[i], (int32_t)key}, e) && need > 0 && --need == 0)
                        pos = key;
                }
            }
            ev = max(j, pos);
        }
    }
    if (j < es)
        evict[s * es + j] = (int32_t)ev;
    const int last = __reduce_max_sync(0xffffffffu, here && ev > j ? (int)ev : 0);
    const unsigned enter = __ballot_sync(0xffffffffu, here && ev > j);
    if ((threadIdx.x & 31) == 0 && here)
        wsum[s * ew + (j >> 5)] = make_int2(last, (int)enter);
}

} // namespace

#include "mask_topk_tree_tiles.cuh"

extern "C" int dcu_build_topk_causal_tree(int64_t window, const dcu_tensor *bias,
                                          const dcu_tensor *pad, dcu_sparsity *sp, void *stream_)
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
    t.vals_per_slab = nb * 64;
    const int64_t capU = std::min<int64_t>(w + 64, std::max<int64_t>(Lk, 1));
    const size_t tile_smem = (size_t)capU * 4 * sizeof(int32_t) +
                             (size_t)2 * DCU_TILE * ((capU + 63) / 64) * sizeof(uint64_t);
    const size_t tree_smem = (size_t)2 * std::max<int64_t>(GROUP_KEYS, t.cap[t.levels - 1]) * sizeof(entry);
    int dev = 0, max_smem = 0, sms = 0;
    DCU_TRY(cudaGetDevice(&dev));
    DCU_TRY(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    DCU_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    /* A block's shared memory is its static part (under 2 KiB in these kernels) and the
     * dynamic part; over 48 KiB in all, a kernel must opt in (a call that costs host time,
     * so made only then), up to the device's limit. */
    const size_t static_smem = 2048;
    if (std::max(tile_smem, tree_smem) + static_smem > (size_t)max_smem)
        return 2; /* too large a window for this GPU: the caller builds it on the host */

    const int64_t ntile_all = nslab * sp->ntiles;
    const int64_t wcap = (capU + 63) / 64;
    /* One scratch allocation: the flags (NaN seen, then the nnz, 8-aligned), the climb's
     * arrival counters (zeroed with the flags), the node counts, the nodes, the evict times
     * (128-aligned), the words' summaries, the keys' biases (16-aligned). */
    const size_t n_counts = (size_t)(nslab * t.slab_counts);
    const size_t zeroed = 16 + ((n_counts * sizeof(int) + 15) & ~(size_t)15);
    const int64_t ew = (Lk + 31) / 32, es = 32 * ew;
    const size_t scratch_bytes = zeroed + n_counts * sizeof(int) + 8 +
                                 (size_t)(nslab * t.slab_elems) * sizeof(entry) +
                                 (size_t)(nslab * es) * sizeof(int32_t) +
                                 (size_t)(nslab * ew) * sizeof(int2) +
                                 (size_t)(nslab * t.vals_per_slab) * sizeof(float) + 16 + 128;
    unsigned char *scratch = nullptr;
    dcu_sparsity out = *sp;
    out.tiles = nullptr;
    cudaError_t e = cudaMallocAsync((void **)&scratch, scratch_bytes, stream);
    if (e == cudaSuccess)
        e = cudaMemsetAsync(scratch, 0, zeroed, stream);
    if (e != cudaSuccess) {
        cudaFreeAsync(scratch, stream);
        return dcu_fail(e, "sparsity_build: allocation");
    }
    int *bad = (int *)scratch, *arrivals = (int *)(scratch + 16);
    unsigned long long *nnz = (unsigned long long *)(scratch + 8);
    int *counts = (int *)(scratch + zeroed);
    entry *elems = (entry *)(((uintptr_t)(counts + n_counts) + 7) & ~(uintptr_t)7);
    /* 128-aligned: offer_words reads a word's 32 evict times as 16-byte loads */
    int32_t *evict =
        (int32_t *)(((uintptr_t)(elems + nslab * t.slab_elems) + 127) & ~(uintptr_t)127);
    int2 *wsum = (int2 *)(evict + nslab * es);
    float *vals = (float *)(((uintptr_t)(wsum + nslab * ew) + 15) & ~(uintptr_t)15);
    slab_in in = {*bias, *pad, sp->H, Lk};
    if (Lk > 0) {
        if (tree_smem + static_smem > 48 * 1024)
            cudaFuncSetAttribute(build_tree, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tree_smem);
        const int64_t groups = (nb + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
        build_tree<<<dim3((unsigned)groups, (unsigned)nslab), GROUP_KEYS, tree_smem, stream>>>(
            in, t, elems, counts, arrivals, bad, vals);
    }
    /* the object's allocation (host time) while the GPU builds the tree */
    if (dcu_sparsity_alloc(&out, ntile_all * capU, ntile_all * DCU_TILE * wcap, stream) != 0) {
        cudaFreeAsync(scratch, stream);
        return -1;
    }
    if (Lk > 0)
        evict_times<<<dim3((unsigned)((Lk + 255) / 256), (unsigned)nslab), 256, 0, stream>>>(
            in, t, elems, w, es, evict, ew, wsum, vals);
    if (sp->ntiles > 0) {
        if (tile_smem + static_smem > 48 * 1024)
            cudaFuncSetAttribute(build_tiles, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tile_smem);
        tile_out o = {out.tiles, out.row_lo, out.row_hi, out.keys, out.words, nnz,
                      Lq, Lk - Lq, sp->ntiles, capU, wcap};
        /* Runs of tiles: one wave of four blocks a multiprocessor (a run's first tile scans
         * the word summaries of every key before it, which costs less than a second wave). */
        const int64_t slots = UNION_BLOCKS * (int64_t)std::max(sms, 1);
        const int64_t run = std::max<int64_t>(1, (ntile_all + slots - 1) / slots);
        build_tiles<<<dim3((unsigned)((sp->ntiles + run - 1) / run), (unsigned)nslab), UNION_THREADS,
                      tile_smem, stream>>>(evict, es, run, o, wsum, ew);
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
    out.nnz = (int64_t)total;
    *sp = out;
    return 0;
}

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
 * 4. per run of consecutive tiles (build_tiles, one thread block): a tile's union U is the
 *    keys j <= p1 with evict_j > max(p0, j), found in key order by a stream compaction (ballots
 *    and a prefix over the block's warps), so no sort: the run's first tile compacts the keys
 *    of [0, p1] in the words whose latest evict time passes p0, each later tile the previous U
 *    and its own new keys that enter;
 *    bit (r, u) is key_u <= p0 + r < evict_u, built from each key's start and end rows.
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

struct tile_out {
    dcu_tile *tiles;
    int32_t *row_lo, *row_hi, *keys;
    uint64_t *words;
    unsigned long long *nnz;
    int64_t Lq, off, ntiles, capU, wcap; /* wcap: words per row reserved per tile */
};

/* A tile block: 8 warps; a warp offers 512 consecutive candidates a round. */
constexpr int UNION_THREADS = 256, UNION_WARPS = UNION_THREADS / 32, WARP_KEYS = 16 * 32;
/* blocks a multiprocessor the launch bounds promise (so at most 64 registers a thread); the
 * runs of tiles are sized to one wave of them */
constexpr int UNION_BLOCKS = 1024 / UNION_THREADS;

/* Append to (okey, oev), in order, the candidates i in [0, n) that a row at a position in
 * [a, a + 63] keeps: evict time > max(a, key) (some such p has key <= p < evict). Candidate i
 * is get(i) = (key, evict). Every thread of the block calls it; returns the new length. */
template <class Get>
__device__ __forceinline__ int offer(Get get, int64_t n, int64_t a, int len, int32_t *okey,
                                     int32_t *oev, int cap, int *warp_cnt)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int64_t base = 0; base < n; base += (int64_t)UNION_WARPS * WARP_KEYS) {
        const int64_t wbase = base + (int64_t)warp * WARP_KEYS;
        int32_t key[16], ev[16];
        unsigned kept[16];
        int wc = 0;
#pragma unroll
        for (int q = 0; q < 16; q++) {
            const int64_t i = wbase + q * 32 + lane;
            key[q] = ev[q] = 0;
            if (i < n)
                get(i, &key[q], &ev[q]);
        }
#pragma unroll
        for (int q = 0; q < 16; q++) {
            const int64_t i = wbase + q * 32 + lane;
            kept[q] = __ballot_sync(0xffffffffu, i < n && (int64_t)ev[q] > max(a, (int64_t)key[q]));
            wc += __popc(kept[q]);
        }
        if (lane == 0)
            warp_cnt[warp] = wc;
        __syncthreads();
        int at = len, all = 0;
        for (int x = 0; x < UNION_WARPS; x++) {
            at += x < warp ? warp_cnt[x] : 0;
            all += warp_cnt[x];
        }
#pragma unroll
        for (int q = 0; q < 16; q++) {
            if ((kept[q] >> lane) & 1) {
                const int pos = at + __popc(kept[q] & ((1u << lane) - 1));
                if (pos < cap) { /* always: a tile's union holds at most w + 63 keys */
                    okey[pos] = key[q];
                    oev[pos] = ev[q];
                }
            }
            at += __popc(kept[q]);
        }
        len += all;
        __syncthreads(); /* warp_cnt again */
    }
    return min(len, cap);
}

/* Append to (okey, oev), in key order, the keys q in [from, to] that a row at a position in
 * [a, a + 63] keeps (evict > max(a, q)). A thread a word of 32 keys, read only when the latest
 * evict time of its keys passes a (wsum): its keys that enter, up to eight loads that go out
 * together, or the whole word as eight 16-byte loads when more than eight enter. So a scan over
 * a long prefix costs two rounds of loads per 256 words, however many of its keys once entered
 * (all of them, for a rising bias). A block-wide prefix of the kept counts places them.
 * Returns the new length. */
__device__ int offer_words(const int2 *wsum, const int32_t *ev, int64_t from, int64_t to,
                           int64_t a, int len, int32_t *okey, int32_t *oev, int cap,
                           int *warp_cnt)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t w0 = from >> 5, w1 = to >> 5;
    for (int64_t base = w0; base <= w1; base += UNION_THREADS) {
        const int64_t wd = base + threadIdx.x;
        uint32_t kept = 0;
        const int2 sum = wd <= w1 ? __ldg(wsum + wd) : make_int2(0, 0);
        const int32_t *row = ev + wd * 32;
        uint32_t enter = (uint32_t)sum.y;
        if (wd == w0)
            enter &= ~0u << (from & 31);
        if (wd == w1 && (to & 31) != 31)
            enter &= (1u << ((to & 31) + 1)) - 1;
        if ((int64_t)sum.x <= max(a, (int64_t)0) || !enter) {
            /* no key of the word is kept by a row from a on */
        } else if (__popc(enter) > 8) {
            int4 v[8];
#pragma unroll
            for (int i = 0; i < 8; i++)
                v[i] = __ldg((const int4 *)row + i);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int e4[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
#pragma unroll
                for (int b = 0; b < 4; b++)
                    if ((enter >> (4 * i + b)) & 1 && (int64_t)e4[b] > max(a, wd * 32 + 4 * i + b))
                        kept |= 1u << (4 * i + b);
            }
        } else {
            int bit[8], e[8];
            uint32_t m = enter;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                bit[i] = m ? __ffs(m) - 1 : -1;
                m &= m - 1;
                e[i] = bit[i] >= 0 ? __ldg(row + bit[i]) : 0;
            }
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (bit[i] >= 0 && (int64_t)e[i] > max(a, wd * 32 + bit[i]))
                    kept |= 1u << bit[i];
        }
        const int c = __popc(kept);
        int incl = c;
        for (int d = 1; d < 32; d <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, d);
            if (lane >= d)
                incl += y;
        }
        if (lane == 31)
            warp_cnt[warp] = incl;
        __syncthreads();
        int at = len + incl - c, all = 0;
        for (int x = 0; x < UNION_WARPS; x++) {
            at += x < warp ? warp_cnt[x] : 0;
            all += warp_cnt[x];
        }
        for (uint32_t b = kept; b; b &= b - 1, at++) {
            const int i = __ffs(b) - 1;
            if (at < cap) { /* always: a tile's union holds at most w + 63 keys */
                okey[at] = (int32_t)(wd * 32 + i);
                oev[at] = __ldg(row + i); /* in L1: read just above */
            }
        }
        len += all;
        __syncthreads(); /* warp_cnt again */
    }
    return min(len, cap);
}

/* A run of consecutive tiles of one slab. A tile's union U is the keys j <= p1 with evict[j] >
 * max(p0, j) (p0, p1: the positions of its first and last rows), already in key order: the
 * run's first tile offers keys [0, p1] from the evict times, each later tile the previous U
 * (a key that leaves stays out) and its own new keys. Bit (r, u) is key_u <= p0 + r < evict_u. */
__global__ void __launch_bounds__(UNION_THREADS, UNION_BLOCKS)
    build_tiles(const int32_t *evict, int64_t es, int64_t run, tile_out o, const int2 *wsum,
                int64_t ew)
{
    /* 2 * 64 * wcap event words; 4 * capU: keys and evict times of U, two copies */
    extern __shared__ unsigned long long smw[];
    unsigned long long *st_ev = smw, *en_ev = st_ev + DCU_TILE * o.wcap;
    int32_t *ukey = (int32_t *)(en_ev + DCU_TILE * o.wcap), *uev = ukey + o.capU;
    int32_t *nkey = uev + o.capU, *nev = nkey + o.capU;
    __shared__ int warp_cnt[UNION_WARPS];
    __shared__ int row_first[DCU_TILE], row_end[DCU_TILE], row_count[DCU_TILE];
    const int64_t s = blockIdx.y;
    const int32_t *ev = evict + s * es;
    const int cap = (int)o.capU;
    int n = 0;
    int64_t offered = 0; /* keys [0, offered) have been offered */
    unsigned long long run_nnz = 0;
    const int64_t t_end = min(o.ntiles, ((int64_t)blockIdx.x + 1) * run);
    for (int64_t tile = blockIdx.x * run; tile < t_end; tile++) {
        const int64_t r0 = tile * DCU_TILE, r1 = min(o.Lq, r0 + DCU_TILE);
        const int nrows = (int)(r1 - r0);
        const int64_t p0 = r0 + o.off, p1 = r1 - 1 + o.off;
        const int64_t tix = s * o.ntiles + tile;

        const int32_t *pk = ukey, *pe = uev;
        int len = offer([&](int64_t i, int32_t *k, int32_t *e) { *k = pk[i]; *e = pe[i]; }, n, p0,
                        0, nkey, nev, cap, warp_cnt);
        const int64_t from = offered;
        if (p1 + 1 > from) {
            len = offer_words(wsum + s * ew, ev, from, p1, p0, len, nkey, nev, cap, warp_cnt);
            offered = p1 + 1;
        }
        int32_t *tk = ukey, *te = uev;
        ukey = nkey;
        uev = nev;
        nkey = tk;
        nev = te;
        n = len;

        const int wpr = (n + 63) / 64;
        if (threadIdx.x == 0)
            o.tiles[tix] = {tix * o.capU, tix * DCU_TILE * o.wcap, 0, n, wpr, 0};
        int32_t *keys = o.keys + tix * o.capU;
        for (int x = threadIdx.x; x < n; x += blockDim.x)
            keys[x] = ukey[x];
        /* The bit rows from events: position u is set in rows [start_u, end_u) (start_u =
         * key_u - p0, end_u = evict_u - p0, clipped to the tile), so each column word of row r
         * is (the positions started by r) & ~(those ended by r): two prefix ORs down the rows
         * of a column, not a test of every position for every row. */
        for (int x = threadIdx.x; x < DCU_TILE * wpr; x += blockDim.x) {
            st_ev[x] = 0;
            en_ev[x] = 0;
        }
        if (threadIdx.x < DCU_TILE) {
            row_first[threadIdx.x] = INT_MAX;
            row_end[threadIdx.x] = 0;
            row_count[threadIdx.x] = 0;
        }
        __syncthreads();
        for (int ub = 0; ub < n; ub += blockDim.x) {
            const int u = ub + threadIdx.x;
            const bool in = u < n;
            const int rs = in ? (int)max((int64_t)ukey[u] - p0, (int64_t)0) : -1;
            const int64_t re = in ? (int64_t)uev[u] - p0 : INT_MAX; /* > rs: U holds only kept keys */
            const unsigned long long bit = 1ull << (u & 63);
            /* the keys before the tile all start at row 0: one word per warp, not 32 atomics
             * on one address */
            const unsigned r0 = __ballot_sync(0xffffffffu, rs == 0);
            const int u0 = ub + (threadIdx.x & ~31);
            if ((threadIdx.x & 31) == 0 && r0)
                atomicOr(&st_ev[u0 >> 6], (unsigned long long)r0 << (u0 & 63));
            if (rs > 0)
                atomicOr(&st_ev[rs * wpr + (u >> 6)], bit);
            if (re < nrows)
                atomicOr(&en_ev[(int)re * wpr + (u >> 6)], bit);
        }
        __syncthreads();
        /* A warp a column: lane l holds rows 2l and 2l + 1 and scans the ORs across lanes. */
        uint64_t *words = o.words + tix * DCU_TILE * o.wcap;
        const int lane = threadIdx.x & 31;
        for (int wd = threadIdx.x >> 5; wd < wpr; wd += UNION_WARPS) {
            const int ra = 2 * lane, rb = ra + 1;
            const unsigned long long sa = st_ev[ra * wpr + wd], ea = en_ev[ra * wpr + wd];
            unsigned long long S = sa | st_ev[rb * wpr + wd], E = ea | en_ev[rb * wpr + wd];
            for (int d = 1; d < 32; d <<= 1) {
                const unsigned long long s2 = __shfl_up_sync(0xffffffffu, S, d);
                const unsigned long long e2 = __shfl_up_sync(0xffffffffu, E, d);
                if (lane >= d) {
                    S |= s2;
                    E |= e2;
                }
            }
            /* S, E: through row rb; through row ra is the previous lane's plus row ra's own */
            unsigned long long Sp = __shfl_up_sync(0xffffffffu, S, 1);
            unsigned long long Ep = __shfl_up_sync(0xffffffffu, E, 1);
            if (lane == 0)
                Sp = Ep = 0;
            const unsigned long long wa = (Sp | sa) & ~(Ep | ea), wb = S & ~E;
            const int rr[2] = {ra, rb};
            const unsigned long long ww[2] = {wa, wb};
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int r = rr[i];
                const unsigned long long bits = ww[i];
                if (r >= nrows)
                    continue;
                words[(int64_t)r * wpr + wd] = bits;
                if (bits) {
                    atomicMin(&row_first[r], wd * 64 + __ffsll((long long)bits) - 1);
                    atomicMax(&row_end[r], wd * 64 + 64 - __clzll((long long)bits));
                    atomicAdd(&row_count[r], __popcll(bits));
                }
            }
        }
        __syncthreads();
        int32_t *lo = o.row_lo + s * o.Lq + r0, *hi = o.row_hi + s * o.Lq + r0;
        for (int r = threadIdx.x; r < nrows; r += blockDim.x) {
            const bool any = row_count[r] > 0;
            lo[r] = any ? row_first[r] : 0;
            hi[r] = any ? row_end[r] : 0;
            run_nnz += row_count[r];
        }
        __syncthreads(); /* the rows' gathers and U, before the next tile rewrites them */
    }
    /* One atomic a block: 64 a tile on one address were a queue at the L2. */
    for (int d = 16; d > 0; d >>= 1)
        run_nnz += __shfl_down_sync(0xffffffffu, run_nnz, d);
    __shared__ unsigned long long warp_nnz[UNION_WARPS];
    if ((threadIdx.x & 31) == 0)
        warp_nnz[threadIdx.x >> 5] = run_nnz;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long all = 0;
        for (int x = 0; x < UNION_WARPS; x++)
            all += warp_nnz[x];
        if (all)
            atomicAdd(o.nnz, all);
    }
}

} // namespace

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

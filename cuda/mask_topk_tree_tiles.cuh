/*
 * mask_topk_tree_tiles.cuh - step 4 of mask_topk_tree.cu's build (its head comment has steps
 * 1-3: the tree and the evict times): per run of consecutive tiles (build_tiles, one thread
 * block), each tile's union U and bitmask rows. A tile's union U is the keys j <= p1 with
 * evict_j > max(p0, j), found in key order by a stream compaction (ballots and a prefix over
 * the block's warps), so no sort: the run's first tile compacts the keys of [0, p1] in the
 * words whose latest evict time passes p0 (offer_words), each later tile the previous U and
 * its own new keys that enter (offer); bit (r, u) is key_u <= p0 + r < evict_u, built from
 * each key's start and end rows.
 *
 * A file of its own because it is a job of its own: it reads only the evict times and the
 * words' summaries that evict_times leaves in global memory, and writes the object. Not a
 * header to include anywhere else: mask_topk_tree.cu includes it once, after evict_times, and
 * its contents go into the same anonymous namespace as that file's kernels, so nothing here
 * has external linkage.
 */
#ifndef DMATTN_CUDA_MASK_TOPK_TREE_TILES_CUH
#define DMATTN_CUDA_MASK_TOPK_TREE_TILES_CUH

#include <climits>

#include "common.cuh"

namespace {

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

#endif

/*
 * mask_topk_tile.cuh - step 4 of mask_topk.cu's build (its head comment has steps 1-3): one
 * tile of a run, its union U and its bitmask rows, built by a group of warps (build_tile).
 * Each key of L = S + N (in key order) is kept from max(j, p0) to the first arrival whose theta
 * passes its K (its end, "evict" in DESIGN §2); the kernel works those rows out (pack) before
 * its tiles. A tile's U is the keys kept by one of its rows, compacted in key order; a row
 * admits and evicts at most one of them, so its words are a walk down the tile. The run's tiles
 * are built at once by groups of warps, a tile a group.
 *
 * A file of its own because it is a job of its own: it reads only L and each key's rows, which
 * the selection in mask_topk.cu leaves in shared memory, and writes only the tile's part of
 * the object (its keys, words, row ranges and tile record). Not a header to include anywhere
 * else: mask_topk.cu includes it once, after run_out (the object's layout, which build_tile
 * writes through), and its contents go into the same anonymous namespace as the kernel's, so
 * nothing here has external linkage.
 */
#ifndef DMATTN_CUDA_MASK_TOPK_TILE_CUH
#define DMATTN_CUDA_MASK_TOPK_TILE_CUH

#include "common.cuh"
#include "run_select.cuh"

namespace {

/* build_tile's walk: blocks of rows, each started from what the blocks before it did */
constexpr int WALK_SHIFT = 4, WALK_ROWS = 1 << WALK_SHIFT, WALK_BLOCKS = DCU_TILE / WALK_ROWS;
static_assert(WALK_ROWS <= 32 && DCU_TILE % WALK_ROWS == 0, "flips: a bit a row of a block");

/* A group's tile. L = S + N in key order (rank keys LK; pack: the run-relative row of each
 * one's first and last-plus-one kept row, rs | re << 16); the members are those a row of the
 * tile keeps, U in key order. A row admits at most one member (its own key) and evicts at most
 * one (theta before the arrival that moved it), so the rows' words are a walk down the tile:
 * row 0 keeps all of U but the members admitted later; each row then sets its admitted bit
 * and clears its evicted one. The walk is cut into blocks of 16 rows, each started from what
 * the blocks before it admitted and evicted, so that a thread takes a word over a block; most
 * words change at no row of a block. The words are built in shared memory and copied out
 * whole. gsize is a power of 2 (>= 64). */
__device__ void build_tile(const run_out &o, int64_t s, int64_t tile, int rel0, const uint64_t *LK,
                           const uint32_t *pack, int nL, unsigned char *gmem, int gid,
                           int gsize)
{
    const int glog = 31 - __clz(gsize);
    const int gt = threadIdx.x & (gsize - 1), lane = threadIdx.x & 31, gw = gt >> 5;
    const int gwarps = gsize >> 5;
    /* a row's admitted and evicted member, each plus one (0: none): admit | evict << 16 */
    uint32_t *moves = (uint32_t *)gmem; /* 16-byte aligned: read four rows at a time */
    int *wcnt = (int *)(moves + DCU_TILE); /* [32] members a warp */
    unsigned long long *wbuf = (unsigned long long *)(wcnt + 32); /* [nrows][wpr] */
    /* per block of rows and word of U: the members the block admits (after row 0) and
     * evicts (written as 32-bit halves, low first, and read as words), and its rows that
     * admit or evict one of the word's members */
    uint32_t *adm = (uint32_t *)(wbuf + DCU_TILE * o.wcap);
    uint32_t *evi = adm + WALK_BLOCKS * 2 * o.wcap;
    uint32_t *flips = evi + WALK_BLOCKS * 2 * o.wcap; /* [WALK_BLOCKS][wcap] */
    const int64_t r0 = tile * DCU_TILE, r1 = min(o.Lq, r0 + DCU_TILE);
    const int nrows = (int)(r1 - r0), T0 = rel0, T1 = rel0 + nrows;
    const int64_t tix = s * o.ntiles + tile;

    /* count the members per warp (a contiguous chunk of L each) */
    const int chunk = (((nL + gwarps - 1) >> (glog - 5)) + 31) & ~31;
    const int c0 = gw * chunk, c1 = min(nL, c0 + chunk);
    int cnt = 0;
    for (int b = c0; b < c1; b += 32) {
        const int u = b + lane;
        const uint32_t pk = u < c1 ? pack[u] : 0;
        const int rs = (int)(pk & 0xffff), re = (int)(pk >> 16);
        cnt += __popc(__ballot_sync(FULL, rs < T1 && re > max(rs, T0)));
    }
    if (lane == 0)
        wcnt[gw] = cnt;
    for (int x = gt; x < DCU_TILE; x += gsize)
        moves[x] = 0;
    for (int x = gt; x < WALK_BLOCKS * 5 * o.wcap; x += gsize)
        adm[x] = 0; /* and evi, flips */
    group_sync(gid, gsize);
    int at = 0, n = 0;
    for (int x = 0; x < gwarps; x++) {
        at += x < gw ? wcnt[x] : 0;
        n += wcnt[x];
    }
    const int wpr = (n + 63) / 64;
    int32_t *keys = o.keys + tix * o.capU;
    for (int b = c0; b < c1; b += 32) {
        const int u = b + lane;
        const uint32_t pk = u < c1 ? pack[u] : 0;
        const int rs = (int)(pk & 0xffff), re = (int)(pk >> 16);
        const bool in = rs < T1 && re > max(rs, T0);
        const unsigned mk = __ballot_sync(FULL, in);
        if (in) {
            const int pos = at + __popc(mk & ((1u << lane) - 1));
            keys[pos] = key_of(LK[u]);
            /* row r admits it (moves' low half, adm) or evicts it (high half, evi); written
             * out twice, as a lambda made ptxas spill */
            const uint32_t bit = 1u << (pos & 31);
            const int hwd = pos >> 5;
            if (rs > T0) {
                const int r = rs - T0, blk = r >> WALK_SHIFT;
                atomicOr(&moves[r], (uint32_t)pos + 1);
                atomicOr(&adm[blk * 2 * o.wcap + hwd], bit);
                atomicOr(&flips[blk * o.wcap + (pos >> 6)], 1u << (r & (WALK_ROWS - 1)));
            }
            if (re < T1) {
                const int r = re - T0, blk = r >> WALK_SHIFT;
                atomicOr(&moves[r], ((uint32_t)pos + 1) << 16);
                atomicOr(&evi[blk * 2 * o.wcap + hwd], bit);
                atomicOr(&flips[blk * o.wcap + (pos >> 6)], 1u << (r & (WALK_ROWS - 1)));
            }
        }
        at += __popc(mk);
    }
    if (gt == 0)
        o.tiles[tix] = {tix * o.capU, tix * DCU_TILE * o.wcap, 0, n, wpr, 0};
    group_sync(gid, gsize);
    /* The walk: a thread takes a word's column over a block of rows, from the state the
     * earlier blocks left; it changes only at the rows that flips lists. */
    const uint64_t *adm64 = (const uint64_t *)adm, *evi64 = (const uint64_t *)evi;
    for (int x = gt; x < WALK_BLOCKS * wpr; x += gsize) {
        const int wd = x % wpr, blk = x / wpr, rb0 = WALK_ROWS * blk, lo = 64 * wd;
        uint64_t bits = n - lo >= 64 ? ~0ull : (1ull << (n - lo)) - 1, in = 0, out = 0;
        for (int b = 0; b < WALK_BLOCKS; b++) { /* admitted after row 0, and before rb0 */
            const uint64_t ab = adm64[b * o.wcap + wd];
            bits &= ~ab;
            if (b < blk) {
                in |= ab;
                out |= evi64[b * o.wcap + wd];
            }
        }
        bits = (bits | in) & ~out;
        const uint32_t fl = flips[blk * o.wcap + wd];
        unsigned long long *col = wbuf + rb0 * wpr + wd;
#pragma unroll
        for (int k = 0; k < WALK_ROWS; k++) {
            if ((fl >> k) & 1) {
                const uint32_t mv = moves[rb0 + k];
                const int a = (int)(mv & 0xffff) - 1, e = (int)(mv >> 16) - 1;
                if (a >= lo && a < lo + 64)
                    bits |= 1ull << (a - lo);
                if (e >= lo && e < lo + 64)
                    bits &= ~(1ull << (e - lo));
            }
            if (rb0 + k < nrows)
                col[k * wpr] = bits;
        }
    }
    group_sync(gid, gsize);
    int32_t *rlo = o.row_lo + s * o.Lq + r0, *rhi = o.row_hi + s * o.Lq + r0;
    {
        /* whether a row keeps any member: gsize / 64 threads a row (adjacent lanes), each a
         * share of its words; then its first and last-plus-one member, from its first and
         * last nonzero words (nearly always the row's first and last) */
        const int plog = glog - 6, parts = 1 << plog, r = gt >> plog, part = gt & (parts - 1);
        const unsigned long long *row = wbuf + r * wpr;
        int c = 0;
        if (r < nrows)
            for (int wd = part; wd < wpr; wd += parts)
                c += __popcll(row[wd]);
        for (int d = 1; d < parts; d <<= 1)
            c += __shfl_xor_sync(FULL, c, d);
        if (part == 0 && r < nrows) {
            int f = 0, e = 0;
            if (c) {
                int wd = 0;
                while (!row[wd])
                    wd++;
                f = wd * 64 + __ffsll((long long)row[wd]) - 1;
                wd = wpr - 1;
                while (!row[wd])
                    wd--;
                e = wd * 64 + 64 - __clzll((long long)row[wd]);
            }
            rlo[r] = f;
            rhi[r] = e;
        }
    }
    uint64_t *words = o.words + tix * DCU_TILE * o.wcap;
    for (int x = gt; x < nrows * wpr; x += gsize)
        words[x] = wbuf[x];
    group_sync(gid, gsize); /* the words, before the next tile rewrites them */
}

} // namespace

#endif

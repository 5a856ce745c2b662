/*
 * mask_topk_parallel.c - causal top-k over a per-key bias with one slab split among threads
 * (DESIGN §2, "Many cores").
 *
 * The sequential builder (mask_build.c, build_topk_causal) scans the keys in order with a heap
 * of the `window` (w) best, in the total order "larger bias, or equal bias and earlier key";
 * row i (last visible key p = i + Lk - Lq) selects the heap's content after key p was offered.
 * That content is a function of the prefix alone: the top w of keys 0..p. So:
 *
 *   1. Cut the key axis into blocks: pieces of [0, k_start) (the keys before the first row's
 *      position, Lq < Lk) and one segment per group of consecutive query tiles, a segment's
 *      keys being the positions of its rows. In parallel, each block's own top w (a heap over
 *      the block, then sorted best first), checking every bias (NaN, +inf: an error).
 *   2. A prefix over the blocks, in order: S(block 0) = {}, S(next) = the w best of
 *      S(block) merged with the block's own top w: one O(w) merge of two sorted lists per
 *      block (keys of different blocks differ, so the order is strict). S(segment) is the heap
 *      content just before the segment's first key.
 *   3. In parallel per segment: seed a heap with S(segment) (sorted worst first it already is a
 *      min-heap) and a key-ordered live list with its keys, scan the segment's keys recording
 *      which enter and which key each evicts, and produce the segment's tiles exactly as the
 *      sequential builder does (same union, same row bitmasks), into a private output.
 *   4. Concatenate the segments' keys and words in tile order (in parallel, at offsets from a
 *      prefix sum), shifting their tiles' offsets.
 *
 * Every heap state, hence every eviction, equals the sequential scan's, and the tiles are
 * produced by the same steps in the same order: the object is the sequential one byte for byte
 * for any thread count and block size (tests/test_sparsity_parallel.c). Cost: O(Lk log w / T)
 * per thread for the scans and tiles, plus O(blocks * w) for the sequential prefix and
 * O(w log w) per segment for seeding; blocks of at least 2w keys keep those below the scan.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "mask_topk_parallel.h"

int64_t dma_topk_min_block(int64_t window)
{
    return dma_max64(2 * window, 1024);
}

/* The blocks of step 1: p pieces of the keys before the first row's position, g segments. */
typedef struct plan {
    int64_t ntiles, k_start, p, g;
} plan;

static plan make_plan(int64_t Lq, int64_t Lk, int threads, int64_t min_block)
{
    plan pl;
    pl.ntiles = dma_div_up(Lq, DMA_TILE);
    pl.k_start = dma_max64(0, dma_min64(Lk - Lq, Lk));
    int64_t t = dma_max64(threads, 1);
    pl.p = pl.k_start > 0 ? dma_max64(1, dma_min64(t, pl.k_start / min_block)) : 0;
    pl.g = pl.ntiles > 0 ? dma_max64(1, dma_min64(dma_min64(t, pl.ntiles),
                                                 (Lk - pl.k_start) / min_block))
                         : 0;
    return pl;
}

bool dma_topk_split_pays(int64_t nslab, int threads, int64_t Lq, int64_t Lk, int64_t window)
{
    if (nslab >= threads || Lk < DMA_TOPK_SPLIT_MIN_KEYS)
        return false;
    plan pl = make_plan(Lq, Lk, threads, dma_topk_min_block(window));
    return pl.p + pl.g >= 2;
}

/* a ranks before b: larger bias, or equal bias and the earlier key. */
static inline bool better(heap_item a, heap_item b) { return drops_first(b, a); }

static int cmp_best_first(const void *pa, const void *pb)
{
    heap_item a = *(const heap_item *)pa, b = *(const heap_item *)pb;
    return better(a, b) ? -1 : better(b, a) ? 1 : 0;
}

/* Step 1 for keys [k0, k1): their top w into top[] (room for min(w, k1 - k0)), best first.
 * Returns how many, or -1 for a NaN or +inf bias. */
static int64_t block_top(const dma_topk_slab *in, int64_t k0, int64_t k1, heap_item *top)
{
    int64_t n = 0;
    for (int64_t j = k0; j < k1; j++) {
        float x = in->bias[j];
        if (!bias_ok(x))
            return -1;
        if ((in->pad && !in->pad[j]) || x == -INFINITY)
            continue;
        heap_offer(top, &n, in->window, (heap_item){x, (int32_t)j});
    }
    qsort(top, (size_t)n, sizeof *top, cmp_best_first);
    return n;
}

/* Step 1 for the last block, whose top set nobody reads: only the biases' check. */
static int64_t block_check(const dma_topk_slab *in, int64_t k0, int64_t k1)
{
    for (int64_t j = k0; j < k1; j++)
        if (!bias_ok(in->bias[j]))
            return -1;
    return 0;
}

/* Step 2: the w best of two best-first lists, best first; returns how many. */
static int64_t merge_top(const heap_item *a, int64_t na, const heap_item *b, int64_t nb,
                         int64_t w, heap_item *out)
{
    int64_t i = 0, j = 0, n = 0;
    while (n < w && (i < na || j < nb))
        out[n++] = j >= nb || (i < na && better(a[i], b[j])) ? a[i++] : b[j++];
    return n;
}

/* A segment's scan and its live keys: the heap's content in key order, as an array (keys
 * arrive in increasing order, so an entering key is appended; a leaving key is marked
 * removed, as -1 - key, found by binary search). Each tile's pass over it drops the marks,
 * so it holds at most w + 64 slots. */
typedef struct seg {
    int64_t k0;
    const uint8_t *enters; /* [p - k0]: key p entered the heap */
    const int32_t *evk;    /* [p - k0]: the key whose place p took, or -1 */
    int32_t *live;         /* ascending keys; removed ones as -1 - key */
    int64_t nslots;
    int64_t swept;         /* live holds the heap after key `swept` was offered */
} seg;

static inline int32_t slot_key(int32_t x) { return x >= 0 ? x : -1 - x; }

static inline void seg_sweep(seg *g, int64_t p)
{
    int64_t d = p - g->k0;
    if (g->enters[d])
        g->live[g->nslots++] = (int32_t)p;
    int32_t e = g->evk[d];
    if (e >= 0) {
        int64_t lo = 0, hi = g->nslots;
        while (lo < hi) {
            int64_t mid = lo + (hi - lo) / 2;
            if (slot_key(g->live[mid]) < e)
                lo = mid + 1;
            else
                hi = mid;
        }
        g->live[lo] = -1 - e;
    }
    g->swept = p;
}

/* Copies the live keys to u (ascending) and drops the removed slots; returns their number. */
static inline int64_t seg_collect(seg *g, int32_t *u)
{
    int64_t n = 0;
    for (int64_t x = 0; x < g->nslots; x++) {
        const int32_t k = g->live[x];
        g->live[n] = k;
        u[n] = k;
        n += k >= 0;
    }
    g->nslots = n;
    return n;
}

/* Step 3: tiles [t0, t1), whose rows' positions are keys [k0, k1), given the heap content
 * before k0 (seed, ns items, best first). Tiles get offsets into ps (shifted in step 4). */
static void build_segment(const dma_topk_slab *in, int64_t t0, int64_t t1, int64_t k0,
                          int64_t k1, const heap_item *seed, int64_t ns, slab *ps)
{
    const int64_t w = in->window, off = in->Lk - in->Lq, len = k1 - k0;
    heap_item *heap = malloc(sizeof(heap_item) * (size_t)(w + 1));
    int32_t *buf = malloc(sizeof(int32_t) * (size_t)(len + ns + w + 2 * DMA_TILE + 1));
    uint8_t *enters = malloc((size_t)len + 1);
    if (!heap || !buf || !enters) {
        ps->status = DMA_ERR_NOMEM;
        goto done;
    }
    /* live: the seed's keys, then at most a tile's rows of arrivals between two passes */
    seg g = {.k0 = k0, .enters = enters, .evk = buf, .live = buf + len, .nslots = ns,
             .swept = k0 - 1};
    int32_t *evk = buf;
    /* Room for the segment's tiles at once (a tile's union holds at most w live keys and its
     * rows' 63 newer ones): no regrowth and copy while it is written. */
    const int64_t ucap = dma_min64(w + DMA_TILE, in->Lk) + 1;
    if (!grow((void **)&ps->keys, &ps->cap_keys, ps->nkeys + (t1 - t0) * ucap, sizeof(int32_t)) ||
        !grow((void **)&ps->words, &ps->cap_words,
              ps->nwords + (t1 - t0) * DMA_TILE * dma_div_up(ucap, 64), sizeof(uint64_t))) {
        ps->status = DMA_ERR_NOMEM;
        goto done;
    }
    /* Best first reversed is worst first: parents drop before children, a valid min-heap. */
    int64_t hn = ns;
    for (int64_t k = 0; k < ns; k++) {
        heap[k] = seed[ns - 1 - k];
        g.live[k] = seed[k].key;
    }
    qsort(g.live, (size_t)ns, sizeof *g.live, cmp_i32);
    /* The biases were checked in step 1. */
    for (int64_t p = k0; p < k1; p++) {
        float x = in->bias[p];
        enters[p - k0] = 0;
        evk[p - k0] = -1;
        if ((in->pad && !in->pad[p]) || x == -INFINITY)
            continue;
        int32_t out = heap_offer(heap, &hn, w, (heap_item){x, (int32_t)p});
        if (out == (int32_t)p)
            continue; /* rejected at once */
        enters[p - k0] = 1;
        evk[p - k0] = out;
    }

    /* The tiles: the sequential builder's steps. */
    for (int64_t t = t0; t < t1; t++) {
        int64_t r0 = t * DMA_TILE, r1 = dma_min64(in->Lq, r0 + DMA_TILE);
        int64_t p0 = r0 + off, p1 = r1 - 1 + off;
        while (g.swept < p0)
            seg_sweep(&g, g.swept + 1);
        /* the union: the live keys (in order), then the keys that enter at the later rows */
        const int64_t base = ps->nkeys;
        int32_t *u = ps->keys + base; /* within the room made above */
        int64_t n_live = p0 >= 0 ? seg_collect(&g, u) : 0, c = n_live;
        for (int64_t j = dma_max64(p0 + 1, 0); j <= p1; j++)
            if (enters[j - k0])
                u[c++] = (int32_t)j;
        const int64_t count = c;
        ps->nkeys += count;
        int32_t wpr = (int32_t)dma_div_up(count, 64);
        int64_t wbase = ps->nwords;
        uint64_t *words = slab_words(ps, (r1 - r0) * (int64_t)wpr);
        if (!words) {
            ps->status = DMA_ERR_NOMEM;
            goto done;
        }
        in->tiles[t] = (dma_tile){.key_off = base, .word_off = wbase, .first = 0,
                                  .count = (int32_t)count, .words_per_row = wpr};
        int32_t next_new = (int32_t)n_live;
        int64_t selected = 0; /* the row's set bits: the heap's size after its key */
        for (int64_t i = r0; i < r1; i++) {
            int64_t p = i + off;
            uint64_t *row = words + (i - r0) * wpr;
            if (p >= 0 && i == r0) {
                /* positions 0 .. n_live - 1: whole words, then the low bits of one (the
                 * words were zeroed) */
                for (int64_t k = 0; k < n_live / 64; k++)
                    row[k] = ~0ull;
                if (n_live % 64)
                    row[n_live / 64] = (1ull << (n_live % 64)) - 1;
                selected = n_live;
            } else if (p >= 0) {
                memcpy(row, row - wpr, sizeof(uint64_t) * (size_t)wpr);
                int32_t e = evk[p - k0];
                bool entered = enters[p - k0];
                seg_sweep(&g, p);
                if (entered) {
                    bit_set(row, next_new++);
                    selected++;
                }
                if (e >= 0) {
                    bit_clear(row, find_pos(u, (int32_t)count, e));
                    selected--;
                }
            }
            bits_ends(row, wpr, &in->row_lo[i], &in->row_hi[i]);
            ps->nnz += selected;
        }
    }
done:
    free(heap);
    free(buf);
    free(enters);
}

void dma_topk_causal_split(const dma_topk_slab *in, int threads, int64_t min_block, slab *sl)
{
    const int64_t Lk = in->Lk, w = in->window, off = in->Lk - in->Lq;
    const plan pl = make_plan(in->Lq, Lk, threads, dma_max64(min_block, 1));
    const int64_t nb = pl.p + pl.g;
    /* Per block b (pieces first, then segments): keys [kb[b], kb[b + 1]), its own top set at
     * tops + toff[b] (ntop[b] items, -1: a bad bias). Per segment s: its seed's size, and the
     * offsets of its keys and words in sl. */
    int64_t *idx = malloc(sizeof(int64_t) * (size_t)(3 * nb + 3 * pl.g + 1));
    slab *parts = calloc((size_t)pl.g + 1, sizeof(slab));
    heap_item *tops = NULL, *seeds = NULL, *chain = NULL;
    if (!idx || !parts) {
        sl->status = DMA_ERR_NOMEM;
        goto done;
    }
    int64_t *kb = idx, *toff = kb + nb + 1, *ntop = toff + nb, *nseed = ntop + nb,
            *kpos = nseed + pl.g, *wpos = kpos + pl.g;
    for (int64_t m = 0; m < pl.p; m++)
        kb[m] = pl.k_start * m / pl.p;
    for (int64_t s = 0; s <= pl.g && pl.g > 0; s++) {
        int64_t t = pl.ntiles * s / pl.g;
        kb[pl.p + s] = dma_max64(0, dma_min64(Lk, t * DMA_TILE + off));
    }
    if (pl.g == 0)
        kb[pl.p] = Lk; /* no rows: the pieces cover every key (their biases are still checked) */
    int64_t room = 0;
    for (int64_t b = 0; b < nb; b++) {
        toff[b] = room;
        room += dma_min64(w, kb[b + 1] - kb[b]);
    }
    tops = malloc(sizeof(heap_item) * (size_t)(room + 1));
    seeds = malloc(sizeof(heap_item) * (size_t)(pl.g * w + 1));
    chain = malloc(sizeof(heap_item) * (size_t)(2 * w + 1));
    if (!tops || !seeds || !chain) {
        sl->status = DMA_ERR_NOMEM;
        goto done;
    }
    const int64_t kbase = sl->nkeys, wbase = sl->nwords;
    dma_status st = DMA_OK; /* shared; written in `single` blocks, read after their barrier */

#pragma omp parallel num_threads(threads)
    {
        /* Step 1. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < nb; b++)
            ntop[b] = b == nb - 1 ? block_check(in, kb[b], kb[b + 1])
                                  : block_top(in, kb[b], kb[b + 1], tops + toff[b]);

#pragma omp single
        {
            for (int64_t b = 0; b < nb; b++)
                if (ntop[b] < 0)
                    st = DMA_ERR_BAD_VALUE;
            /* Step 2: the running top w alternates between chain[0, w) and chain[w, 2w). */
            int64_t ncur = 0;
            heap_item *cur = chain, *nxt = chain + w;
            for (int64_t b = 0; b < nb && st == DMA_OK; b++) {
                if (b >= pl.p) {
                    memcpy(seeds + (b - pl.p) * w, cur, sizeof(heap_item) * (size_t)ncur);
                    nseed[b - pl.p] = ncur;
                }
                ncur = merge_top(cur, ncur, tops + toff[b], ntop[b], w, nxt);
                heap_item *x = cur;
                cur = nxt;
                nxt = x;
            }
        }

        if (st == DMA_OK && pl.g == 1) {
            /* One segment (the sequential builder): straight into sl, nothing to move. */
#pragma omp single
            {
                build_segment(in, 0, pl.ntiles, kb[pl.p], kb[pl.p + 1], seeds, nseed[0], sl);
                st = sl->status;
            }
        } else if (st == DMA_OK) {
            /* Step 3. */
#pragma omp for schedule(dynamic, 1)
            for (int64_t s = 0; s < pl.g; s++)
                build_segment(in, pl.ntiles * s / pl.g, pl.ntiles * (s + 1) / pl.g,
                              kb[pl.p + s], kb[pl.p + s + 1], seeds + s * w, nseed[s],
                              &parts[s]);

#pragma omp single
            {
                /* Step 4: the parts follow sl's own arrays, in tile order; the object's
                 * assembly copies them (once). */
                int64_t nk = 0, nw = 0;
                for (int64_t s = 0; s < pl.g; s++) {
                    if (parts[s].status != DMA_OK && st == DMA_OK)
                        st = parts[s].status;
                    kpos[s] = kbase + nk;
                    wpos[s] = wbase + nw;
                    nk += parts[s].nkeys;
                    nw += parts[s].nwords;
                    sl->nnz += parts[s].nnz;
                }
                if (st == DMA_OK) {
                    sl->nkeys = kbase + nk;
                    sl->nwords = wbase + nw;
                }
            }

            if (st == DMA_OK) {
#pragma omp for schedule(static)
                for (int64_t s = 0; s < pl.g; s++)
                    for (int64_t t = pl.ntiles * s / pl.g; t < pl.ntiles * (s + 1) / pl.g; t++) {
                        in->tiles[t].key_off += kpos[s];
                        in->tiles[t].word_off += wpos[s];
                    }
            }
        }
    }
    if (st == DMA_OK && pl.g > 1) {
        sl->parts = parts; /* sl owns them now */
        sl->nparts = pl.g;
        parts = NULL;
    }
    if (st != DMA_OK)
        sl->status = st;

done:
    if (parts)
        for (int64_t s = 0; s < pl.g; s++) {
            free(parts[s].keys);
            free(parts[s].words);
        }
    free(parts);
    free(idx);
    free(tops);
    free(seeds);
    free(chain);
}

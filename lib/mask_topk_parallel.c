/*
 * mask_topk_parallel.c - causal top-k over a per-key bias (DESIGN §2), every slab at once,
 * each slab's key axis split among threads when there are fewer slabs than threads.
 *
 * The streaming scan keeps a heap of the `window` (w) best keys in the total order "larger
 * bias, or equal bias and earlier key"; row i (last visible key p = i + Lk - Lq) selects the
 * heap's content after key p was offered. That content is a function of the prefix alone: the
 * top w of keys 0..p. So, for all slabs together, in phases separated by barriers:
 *
 *   1. Cut each slab's key axis into blocks: pieces of [0, k_start) (the keys before the first
 *      row's position, Lq < Lk) and one segment per group of consecutive query tiles, a
 *      segment's keys being the positions of its rows. In parallel over every block of every
 *      slab: the block's own top w (a heap, then sorted best first), checking every bias
 *      (NaN, +inf: an error).
 *   2. In parallel over slabs, a prefix over their blocks: S(block 0) = {}, S(next) = the w
 *      best of S(block) merged with the block's own top w, one O(w) merge of two sorted lists
 *      a block (keys of different blocks differ, so the order is strict). S(segment) is the
 *      heap content just before the segment's first key.
 *   3. In parallel over every segment: seed a heap with S(segment) (sorted worst first it is a
 *      min-heap) and scan the segment's keys, recording which enter and which key each evicts.
 *      From those, each tile's union size (the live keys at its first row plus the keys that
 *      enter at its later rows) and so its share of the object's arrays.
 *   4. One thread: the prefix of those sizes over (slab, tile) gives every tile its offsets;
 *      the object's key and word arrays are allocated at their final size.
 *   5. In parallel over every segment: replay the scan's record and write the tiles' unions,
 *      row bitmasks and row bounds in place. A tile's first row is the previous tile's last
 *      row one key on (the seed's keys, sorted, before a segment's first tile), so no live set
 *      is kept or searched besides the unions themselves.
 *
 * Every heap state, hence every eviction, equals the sequential scan's, and the tiles are
 * written by the same steps at the offsets the sequential builder gives them: the object is the
 * one-thread one byte for byte, for any thread count and plan (tests/test_sparsity_parallel.c).
 * Nothing is built twice or copied: each tile is written once, where it stays, by the thread
 * that also first touches those pages. Cost: O(Lk log w / T) per thread for the scans and
 * tiles, plus O(blocks * w) per slab for the prefix and O(w log w) per segment for seeding;
 * blocks of at least 2w keys keep those below the scan.
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

/* The blocks of step 1, the same for every slab (all slabs share Lq, Lk and w): p pieces of
 * the keys before the first row's position, then g segments; block b holds keys
 * [kb[b], kb[b + 1]). */
typedef struct plan {
    int64_t ntiles, k_start, p, g, nb;
} plan;

static plan make_plan(int64_t Lq, int64_t Lk, int64_t split, int64_t min_block)
{
    plan pl;
    pl.ntiles = dma_div_up(Lq, DMA_TILE);
    pl.k_start = dma_max64(0, dma_min64(Lk - Lq, Lk));
    int64_t t = dma_max64(split, 1);
    pl.p = pl.k_start > 0 ? dma_max64(1, dma_min64(t, pl.k_start / min_block)) : 0;
    pl.g = pl.ntiles > 0 ? dma_max64(1, dma_min64(dma_min64(t, pl.ntiles),
                                                 (Lk - pl.k_start) / min_block))
                         : 0;
    pl.nb = pl.p + pl.g;
    return pl;
}

bool dma_topk_split_pays(int64_t nslab, int threads, int64_t Lq, int64_t Lk, int64_t window)
{
    if (nslab >= threads || Lk < DMA_TOPK_SPLIT_MIN_KEYS)
        return false;
    plan pl = make_plan(Lq, Lk, threads, dma_topk_min_block(window));
    return pl.nb >= 2;
}

/* a ranks before b: larger bias, or equal bias and the earlier key. */
static inline bool better(heap_item a, heap_item b) { return drops_first(b, a); }

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
    /* Popping the min-heap yields worst first: fill from the back (heap sort, in place). */
    const int64_t count = n;
    while (n > 0) {
        heap_item worst = heap_pop(top, &n);
        top[n] = worst;
    }
    return count;
}

/* Step 1 for a slab's last block, whose top set nobody reads: only the biases' check. */
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

/* One segment: tiles [t0, t1) of one slab, whose rows' positions are keys [k0, k1). */
typedef struct segment {
    const dma_topk_slab *in;
    int64_t t0, t1, k0, k1;
    const heap_item *seed; /* the heap's content before k0, best first */
    int64_t nseed;
    uint8_t *enters;       /* [p - k0]: key p entered the heap (step 3) */
    int32_t *evk;          /* [p - k0]: the key whose place p took, or -1 (step 3) */
    int64_t nkeys, nwords; /* its tiles' share of the object's arrays (step 3) */
    int64_t key_base, word_base; /* where that share starts (step 4) */
    int64_t nnz;           /* step 5 */
    dma_status status;
} segment;

/* Step 3: the scan, then each tile's union size (the tile's offsets, relative to the
 * segment's share until step 4 adds its base). */
static void scan_segment(segment *sg)
{
    const dma_topk_slab *in = sg->in;
    const int64_t w = in->window, off = in->Lk - in->Lq, len = sg->k1 - sg->k0;
    heap_item *heap = malloc(sizeof(heap_item) * (size_t)(w + 1));
    sg->enters = malloc((size_t)len + 1);
    sg->evk = malloc(sizeof(int32_t) * (size_t)(len + 1));
    if (!heap || !sg->enters || !sg->evk) {
        sg->status = DMA_ERR_NOMEM;
        free(heap);
        return;
    }
    /* Best first reversed is worst first: parents drop before children, a valid min-heap. */
    int64_t hn = sg->nseed;
    for (int64_t k = 0; k < hn; k++)
        heap[k] = sg->seed[hn - 1 - k];
    /* The biases were checked in step 1. */
    for (int64_t p = sg->k0; p < sg->k1; p++) {
        float x = in->bias[p];
        int32_t out = (int32_t)p; /* a missing or -inf key never enters */
        if (!(in->pad && !in->pad[p]) && x != -INFINITY)
            out = heap_offer(heap, &hn, w, (heap_item){x, (int32_t)p});
        sg->enters[p - sg->k0] = out != (int32_t)p;
        sg->evk[p - sg->k0] = out != (int32_t)p ? out : -1;
    }
    free(heap);

    /* The live keys at a tile's first row p0: the seed's, plus those that entered at keys
     * k0..p0, less those evicted there. */
    int64_t live = sg->nseed, q = sg->k0, nkeys = 0, nwords = 0;
    for (int64_t t = sg->t0; t < sg->t1; t++) {
        const int64_t r0 = t * DMA_TILE, r1 = dma_min64(in->Lq, r0 + DMA_TILE);
        const int64_t p0 = r0 + off, p1 = r1 - 1 + off;
        for (; q <= p0; q++)
            live += sg->enters[q - sg->k0] - (sg->evk[q - sg->k0] >= 0);
        int64_t count = p0 >= 0 ? live : 0;
        for (int64_t j = dma_max64(p0 + 1, 0); j <= p1; j++)
            count += sg->enters[j - sg->k0];
        const int32_t wpr = (int32_t)dma_div_up(count, 64);
        in->tiles[t] = (dma_tile){.key_off = nkeys, .word_off = nwords, .first = 0,
                                  .count = (int32_t)count, .words_per_row = wpr};
        nkeys += count;
        nwords += (r1 - r0) * wpr;
    }
    sg->nkeys = nkeys;
    sg->nwords = nwords;
}

/* Step 5: the live keys at a tile's first row p0, ascending, into u; returns how many. They
 * are the keys of prev (the previous tile's union, or the seed's keys for a segment's first
 * tile) whose bit is set in alive (the previous tile's last row; NULL: every key), except the
 * one at position gone (evicted at p0; -1: none), then p0 itself if it entered. */
static int32_t collect_live(const int32_t *prev, int32_t nprev, const uint64_t *alive,
                            int32_t gone, int32_t entering, int32_t *u)
{
    int32_t n = 0;
    if (!alive) {
        for (int32_t x = 0; x < nprev; x++)
            if (x != gone)
                u[n++] = prev[x];
    } else {
        /* Word by word, the runs of live keys between the dead ones (a tile's rows evict a
         * few keys, so runs are long). */
        for (int32_t k = 0; k * 64 < nprev; k++) {
            const int32_t valid = nprev - k * 64 < 64 ? nprev - k * 64 : 64;
            uint64_t dead = ~alive[k] & (valid < 64 ? (1ull << valid) - 1 : ~0ull);
            if (gone >= 0 && gone >> 6 == k)
                dead |= 1ull << (gone & 63);
            int32_t from = 0;
            for (;; dead &= dead - 1) {
                const int32_t to = dead ? __builtin_ctzll(dead) : valid;
                memcpy(u + n, prev + k * 64 + from, sizeof(int32_t) * (size_t)(to - from));
                n += to - from;
                from = to + 1;
                if (!dead)
                    break;
            }
        }
    }
    if (entering >= 0)
        u[n++] = entering;
    return n;
}

/* Step 5: the segment's tiles into the object's arrays, as the sequential builder writes
 * them. A tile's union is the live keys at its first row, then the keys that enter at its
 * later rows; each row's bits are the previous row's, plus the key that entered, less the one
 * evicted. */
static void write_segment(segment *sg, int32_t *keys, uint64_t *words)
{
    const dma_topk_slab *in = sg->in;
    const int64_t off = in->Lk - in->Lq, k0 = sg->k0;
    int32_t *seed = malloc(sizeof(int32_t) * (size_t)(sg->nseed + 1));
    if (!seed) {
        sg->status = DMA_ERR_NOMEM;
        return;
    }
    for (int64_t k = 0; k < sg->nseed; k++)
        seed[k] = sg->seed[k].key;
    qsort(seed, (size_t)sg->nseed, sizeof *seed, cmp_i32);
    const int32_t *prev = seed;      /* the keys live before the next tile's first row ... */
    int32_t nprev = (int32_t)sg->nseed;
    const uint64_t *alive = NULL;    /* ... are those of prev whose bit is set here */
    int64_t nnz = 0;
    for (int64_t t = sg->t0; t < sg->t1; t++) {
        const dma_tile *tile = &in->tiles[t];
        const int64_t r0 = t * DMA_TILE, r1 = dma_min64(in->Lq, r0 + DMA_TILE);
        const int64_t p0 = r0 + off, p1 = r1 - 1 + off;
        int32_t *u = keys + tile->key_off;
        const int32_t count = tile->count, wpr = tile->words_per_row;
        int32_t n_live = 0;
        if (p0 >= 0) {
            const int32_t e = sg->evk[p0 - k0];
            n_live = collect_live(prev, nprev, alive, e >= 0 ? find_pos(prev, nprev, e) : -1,
                                  sg->enters[p0 - k0] ? (int32_t)p0 : -1, u);
        }
        int32_t c = n_live;
        for (int64_t j = dma_max64(p0 + 1, 0); j <= p1; j++)
            if (sg->enters[j - k0])
                u[c++] = (int32_t)j;
        uint64_t *bits = words + tile->word_off;
        int32_t next_new = n_live;
        int64_t selected = 0; /* the row's set bits: the heap's size after its key */
        for (int64_t i = r0; i < r1; i++) {
            const int64_t p = i + off;
            uint64_t *row = bits + (i - r0) * wpr;
            if (p < 0 || i == r0)
                memset(row, 0, sizeof(uint64_t) * (size_t)wpr); /* later rows copy theirs */
            if (p >= 0 && i == r0) {
                /* positions 0 .. n_live - 1: whole words, then the low bits of one */
                for (int32_t k = 0; k < n_live / 64; k++)
                    row[k] = ~0ull;
                if (n_live % 64)
                    row[n_live / 64] = (1ull << (n_live % 64)) - 1;
                selected = n_live;
            } else if (p >= 0) {
                memcpy(row, row - wpr, sizeof(uint64_t) * (size_t)wpr);
                const int32_t e = sg->evk[p - k0];
                if (sg->enters[p - k0]) {
                    bit_set(row, next_new++);
                    selected++;
                }
                if (e >= 0) {
                    bit_clear(row, find_pos(u, count, e));
                    selected--;
                }
            }
            bits_ends(row, wpr, &in->row_lo[i], &in->row_hi[i]);
            nnz += selected;
        }
        prev = u;
        nprev = count;
        alive = bits + (r1 - 1 - r0) * wpr;
    }
    sg->nnz = nnz;
    free(seed);
}

dma_status dma_topk_causal_build(const dma_topk_slab *in, int64_t nslab, int threads,
                                 int64_t split, int64_t min_block, dma_sparsity *sp)
{
    if (nslab == 0 || in[0].Lq == 0)
        return DMA_OK; /* no rows: nothing to select (the biases are not read) */
    const int64_t Lk = in[0].Lk, w = in[0].window, off = in[0].Lk - in[0].Lq;
    const plan pl = make_plan(in[0].Lq, Lk, split, dma_max64(min_block, 1));
    const int64_t nb = pl.nb, g = pl.g, nseg = nslab * g;
    dma_status st = DMA_OK;
    /* kb[nb + 1]: the blocks' keys; per slab, toff[b]: block b's top set at tops + s * room +
     * toff[b] (the last block has none); ntop[s * nb + b]: its size, -1 for a bad bias;
     * slab_st[s]: step 2's verdict on slab s. */
    int64_t *idx = malloc(sizeof(int64_t) * (size_t)(2 * nb + 1 + nslab * nb));
    dma_status *slab_st = malloc(sizeof(dma_status) * (size_t)nslab);
    segment *segs = calloc((size_t)nseg, sizeof(segment));
    heap_item *tops = NULL, *seeds = NULL;
    if (!idx || !slab_st || !segs) {
        st = DMA_ERR_NOMEM;
        goto done;
    }
    int64_t *kb = idx, *toff = kb + nb + 1, *ntop = toff + nb;
    for (int64_t m = 0; m < pl.p; m++)
        kb[m] = pl.k_start * m / pl.p;
    for (int64_t s = 0; s <= g; s++) {
        int64_t t = pl.ntiles * s / g;
        kb[pl.p + s] = dma_max64(0, dma_min64(Lk, t * DMA_TILE + off));
    }
    int64_t room = 0;
    for (int64_t b = 0; b < nb; b++) {
        toff[b] = room;
        room += b < nb - 1 ? dma_min64(w, kb[b + 1] - kb[b]) : 0;
    }
    /* With one block a slab (one segment, no pieces) every seed is empty: no prefix. */
    if (nb > 1) {
        tops = malloc(sizeof(heap_item) * (size_t)(nslab * room + 1));
        seeds = malloc(sizeof(heap_item) * (size_t)(nseg * w + 1));
        if (!tops || !seeds) {
            st = DMA_ERR_NOMEM;
            goto done;
        }
    }
    for (int64_t x = 0; x < nseg; x++) {
        const int64_t s = x / g, j = x % g;
        segs[x] = (segment){.in = &in[s], .t0 = pl.ntiles * j / g,
                            .t1 = pl.ntiles * (j + 1) / g, .k0 = kb[pl.p + j],
                            .k1 = kb[pl.p + j + 1], .seed = seeds ? seeds + x * w : NULL,
                            .status = DMA_OK};
    }

#pragma omp parallel num_threads(threads)
    {
        /* Step 1 (a slab with one block only checks its biases). */
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < nslab * nb; x++) {
            const int64_t s = x / nb, b = x % nb;
            ntop[x] = b == nb - 1 ? block_check(&in[s], kb[b], kb[b + 1])
                                  : block_top(&in[s], kb[b], kb[b + 1], tops + s * room + toff[b]);
        }

        /* Step 2: per slab, the running top w alternates between two halves of a scratch. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < nslab; s++) {
            bool ok = true;
            for (int64_t b = 0; b < nb; b++)
                ok &= ntop[s * nb + b] >= 0;
            slab_st[s] = ok ? DMA_OK : DMA_ERR_BAD_VALUE;
            if (!ok || nb == 1)
                continue;
            heap_item *chain = malloc(sizeof(heap_item) * (size_t)(2 * w + 1));
            if (!chain) {
                slab_st[s] = DMA_ERR_NOMEM;
                continue;
            }
            int64_t ncur = 0;
            heap_item *cur = chain, *nxt = chain + w;
            for (int64_t b = 0; b < nb - 1; b++) {
                if (b >= pl.p) {
                    segment *sg = &segs[s * g + b - pl.p];
                    memcpy(seeds + (s * g + b - pl.p) * w, cur, sizeof(heap_item) * (size_t)ncur);
                    sg->nseed = ncur;
                }
                ncur = merge_top(cur, ncur, tops + s * room + toff[b], ntop[s * nb + b], w, nxt);
                heap_item *x = cur;
                cur = nxt;
                nxt = x;
            }
            memcpy(seeds + (s * g + g - 1) * w, cur, sizeof(heap_item) * (size_t)ncur);
            segs[s * g + g - 1].nseed = ncur;
            free(chain);
        }

        /* Step 3 (skipped for a slab whose biases failed: the build fails). */
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < nseg; x++)
            if (slab_st[x / g] == DMA_OK)
                scan_segment(&segs[x]);

#pragma omp single
        {
            /* Step 4: the first failure in slab order decides the status. */
            int64_t nkeys = 0, nwords = 0;
            for (int64_t x = 0; x < nseg && st == DMA_OK; x++) {
                st = x % g == 0 ? slab_st[x / g] : DMA_OK;
                st = st == DMA_OK ? segs[x].status : st;
                segs[x].key_base = nkeys;
                segs[x].word_base = nwords;
                nkeys += segs[x].nkeys;
                nwords += segs[x].nwords;
            }
            if (st == DMA_OK) {
                sp->keys = dma_sparsity_room(sp->keys, &sp->cap_keys,
                                             (size_t)nkeys * sizeof(int32_t));
                sp->words = dma_sparsity_room(sp->words, &sp->cap_words,
                                              (size_t)nwords * sizeof(uint64_t));
                if (!sp->keys || !sp->words)
                    st = DMA_ERR_NOMEM;
                sp->nkeys = nkeys;
                sp->nwords = nwords;
            }
        }

        if (st == DMA_OK) {
            /* Step 5. */
#pragma omp for schedule(dynamic, 1)
            for (int64_t x = 0; x < nseg; x++) {
                segment *sg = &segs[x];
                for (int64_t t = sg->t0; t < sg->t1; t++) {
                    sg->in->tiles[t].key_off += sg->key_base;
                    sg->in->tiles[t].word_off += sg->word_base;
                }
                write_segment(sg, sp->keys, sp->words);
            }
        }
    }
    for (int64_t x = 0; x < nseg && st == DMA_OK; x++) {
        st = segs[x].status;
        sp->nnz += segs[x].nnz;
    }

done:
    if (segs)
        for (int64_t x = 0; x < nseg; x++) {
            free(segs[x].enters);
            free(segs[x].evk);
        }
    free(segs);
    free(slab_st);
    free(idx);
    free(tops);
    free(seeds);
    return st;
}

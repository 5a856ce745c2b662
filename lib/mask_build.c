/*
 * mask_build.c - the mask generators (DESIGN §1 "Mask generation") that build a dma_sparsity.
 *
 * Each (batch, head) pair is a "slab". Three paths:
 *   - causal top-k over a per-key bias: the streaming heap/evict builder (O(Lk log w),
 *     mask_topk_parallel.c), every slab at once and written in place; with fewer slabs than
 *     threads each slab is split among them;
 *   - non-causal top-k, relu, dense and window over a per-key bias (or none): one sorted list of
 *     candidate keys per slab, of which every tile's union is a slice and every row a range;
 *   - everything else (per-row bias, block smoothing, a user's dense mask): one sorted key list
 *     per row, merged per tile into the union and row bitmasks.
 * The last two build each slab independently (OpenMP over slabs) into its own growable arrays,
 * concatenated at the end.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "internal.h"
#include "mask_topk_parallel.h"
#include "select.h"

/* Internal kind for dma_sparsity_from_mask(). */
#define KIND_FROM_MASK ((dma_mask_kind)100)

typedef struct build {
    dma_mask_kind kind;
    bool causal;
    int64_t window, block_size;
    int64_t B, H, Lq, Lk, off; /* off = Lk - Lq: row i's last visible key is i + off */
    const dma_tensor *bias, *pad, *mask;
    dma_sparsity *sp;
} build;

static inline float bias_at(const build *bd, int64_t b, int64_t h, int64_t i, int64_t j)
{
    const dma_tensor *t = bd->bias;
    return ((const float *)t->data)[dma_offset4(t, b, h, i, j)];
}

static inline bool key_exists(const build *bd, int64_t b, int64_t j)
{
    const dma_tensor *t = bd->pad;
    if (!t)
        return true;
    return ((const uint8_t *)t->data)[(t->shape[0] == 1 ? 0 : b * t->stride[0]) + j] != 0;
}

/* ================================================================================== */
/* Path 1: causal top-k over a per-key bias, streaming (DESIGN §2).                    */
/* ================================================================================== */

/*
 * Scan keys in order with a heap of the `window` best, recording for each key p whether it
 * entered and which key it evicted. Row i (last visible key p = i + off) keeps the heap's
 * content after p: within a tile each row differs from the previous by at most one key in and
 * one key out, and a tile's first row is the previous tile's last row (the keys of its union
 * whose bits are set) one step on, so no set is ever sorted (mask_topk_parallel.c).
 */
/* One slab's input to the causal top-k builder (mask_topk_parallel.c). */
static dma_topk_slab topk_slab(const build *bd, int64_t s)
{
    const dma_tensor *t = bd->bias, *pad = bd->pad;
    const int64_t b = s / bd->H, h = s % bd->H;
    const int64_t pad_row = pad && pad->shape[0] != 1 ? b * pad->stride[0] : 0;
    dma_sparsity *sp = bd->sp;
    return (dma_topk_slab){.bias = f32(t) + dma_offset4(t, b, h, 0, 0),
                           .pad = pad ? (const uint8_t *)pad->data + pad_row : NULL,
                           .Lq = bd->Lq, .Lk = bd->Lk, .window = bd->window,
                           .tiles = sp->tiles + s * sp->ntiles,
                           .row_lo = sp->row_lo + s * bd->Lq, .row_hi = sp->row_hi + s * bd->Lq};
}

/* ================================================================================== */
/* Path 2: per-key selections that are the same for every row up to a causal cut.      */
/* ================================================================================== */

/*
 * cand: the sorted keys a row may pick from, identical for every row of the slab:
 *   top-k non-causal: the `window` best keys; relu: keys with bias > 0; dense/window: every key
 *   that exists. Then row i selects cand positions [cnt(lo_key), cnt(hi_key)) where cnt(x) counts
 *   cand keys < x, and each tile's union is the slice covering its rows.
 */
static void build_shared(const build *bd, int64_t b, int64_t h, slab *sl)
{
    const int64_t Lk = bd->Lk;
    dma_sparsity *sp = bd->sp;
    int64_t s = b * bd->H + h;
    int32_t *cnt = malloc(sizeof(int32_t) * (size_t)(Lk + 1));
    heap_item *heap = NULL;
    if (!cnt) {
        sl->status = DMA_ERR_NOMEM;
        return;
    }
    /* Mark the candidate keys in cnt[] (1 = candidate), reading and checking the bias. */
    int64_t hn = 0;
    if (bd->kind == DMA_MASK_TOPK) {
        heap = malloc(sizeof(heap_item) * (size_t)(dma_min64(bd->window, Lk) + 1));
        if (!heap) {
            sl->status = DMA_ERR_NOMEM;
            goto done;
        }
    }
    for (int64_t j = 0; j < Lk; j++) {
        bool is_cand = key_exists(bd, b, j);
        if (bd->kind == DMA_MASK_TOPK || bd->kind == DMA_MASK_RELU) {
            float x = bias_at(bd, b, h, 0, j);
            if (!bias_ok(x)) {
                sl->status = DMA_ERR_BAD_VALUE;
                goto done;
            }
            if (bd->kind == DMA_MASK_RELU)
                is_cand = is_cand && x > 0.0f;
            else if (is_cand && x != -INFINITY)
                heap_offer(heap, &hn, bd->window, (heap_item){x, (int32_t)j});
            if (bd->kind == DMA_MASK_TOPK)
                is_cand = false;
        }
        cnt[j] = is_cand;
    }
    for (int64_t k = 0; k < hn; k++)
        cnt[heap[k].key] = 1;
    /* Candidate list and prefix counts: cnt[x] = number of candidates < x. */
    int64_t ncand = 0;
    for (int64_t j = 0; j < Lk; j++)
        ncand += cnt[j];
    bool implicit = ncand == Lk; /* every key: no index array needed */
    int64_t cand_off = -1;
    if (!implicit) {
        int32_t *cand = slab_keys(sl, ncand);
        if (!cand) {
            sl->status = DMA_ERR_NOMEM;
            goto done;
        }
        cand_off = sl->nkeys - ncand;
        int64_t c = 0;
        for (int64_t j = 0; j < Lk; j++)
            if (cnt[j])
                cand[c++] = (int32_t)j;
    }
    int32_t run = 0;
    for (int64_t j = 0; j <= Lk; j++) {
        int32_t here = j < Lk ? cnt[j] : 0;
        cnt[j] = run;
        run += here;
    }
    bool causal = bd->causal || bd->kind == DMA_MASK_WINDOW;
    int32_t *lo = sp->row_lo + s * bd->Lq, *hi = sp->row_hi + s * bd->Lq;
    for (int64_t t = 0; t < sp->ntiles; t++) {
        int64_t r0 = t * DMA_TILE, r1 = dma_min64(bd->Lq, r0 + DMA_TILE);
        int32_t ulo = INT32_MAX, uhi = 0;
        for (int64_t i = r0; i < r1; i++) {
            int64_t p = i + bd->off;
            int64_t khi = causal ? dma_max64(0, dma_min64(Lk, p + 1)) : Lk;
            int64_t klo = bd->kind == DMA_MASK_WINDOW ? dma_max64(0, dma_min64(khi, p - bd->window + 1)) : 0;
            lo[i] = cnt[klo];
            hi[i] = cnt[khi];
            if (hi[i] > lo[i]) {
                ulo = lo[i] < ulo ? lo[i] : ulo;
                uhi = hi[i] > uhi ? hi[i] : uhi;
                sl->nnz += hi[i] - lo[i];
            } else {
                lo[i] = hi[i] = 0;
            }
        }
        if (ulo > uhi)
            ulo = uhi = 0;
        for (int64_t i = r0; i < r1; i++)
            if (hi[i] > lo[i]) {
                lo[i] -= ulo;
                hi[i] -= ulo;
            }
        sp->tiles[s * sp->ntiles + t] = (dma_tile){
            .key_off = implicit ? -1 : cand_off + ulo, .word_off = -1,
            .first = implicit ? ulo : 0, .count = uhi - ulo, .words_per_row = 0};
    }
done:
    free(cnt);
    free(heap);
}

/* ================================================================================== */
/* Path 3: one key list per row, merged per tile.                                       */
/* ================================================================================== */

typedef struct row_scratch {
    int32_t *list;     /* the tile's row lists, concatenated */
    int64_t nlist, cap;
    int64_t start[DMA_TILE + 1];
    int32_t *tmp;      /* Lk: a row before smoothing */
    heap_item *heap;   /* window + 1 */
    int32_t *pos_of;   /* Lk: -1, or the key's position in the tile's union */
} row_scratch;

static inline bool visible(const build *bd, int64_t b, int64_t j, int64_t p)
{
    bool causal = bd->causal || bd->kind == DMA_MASK_WINDOW;
    return key_exists(bd, b, j) && (!causal || j <= p);
}

/* Append row i's sorted selection to rs->list. Returns a status. */
static dma_status select_row(const build *bd, int64_t b, int64_t h, int64_t i, row_scratch *rs)
{
    const int64_t Lk = bd->Lk, p = i + bd->off;
    int32_t *out = rs->tmp;
    int64_t n = 0;
    if (bd->kind == DMA_MASK_TOPK) {
        int64_t hn = 0;
        for (int64_t j = 0; j < Lk; j++) {
            float x = bias_at(bd, b, h, i, j);
            if (!bias_ok(x))
                return DMA_ERR_BAD_VALUE;
            if (x != -INFINITY && visible(bd, b, j, p))
                heap_offer(rs->heap, &hn, bd->window, (heap_item){x, (int32_t)j});
        }
        for (int64_t k = 0; k < hn; k++)
            out[n++] = rs->heap[k].key;
        qsort(out, (size_t)n, sizeof(int32_t), cmp_i32);
    } else if (bd->kind == DMA_MASK_RELU) {
        for (int64_t j = 0; j < Lk; j++) {
            float x = bias_at(bd, b, h, i, j);
            if (!bias_ok(x))
                return DMA_ERR_BAD_VALUE;
            if (x > 0.0f && visible(bd, b, j, p))
                out[n++] = (int32_t)j;
        }
    } else if (bd->kind == KIND_FROM_MASK) {
        const dma_tensor *m = bd->mask;
        const uint8_t *row = (const uint8_t *)m->data + b * m->stride[0] + h * m->stride[1] +
                             i * m->stride[2];
        for (int64_t j = 0; j < Lk; j++)
            if (row[j])
                out[n++] = (int32_t)j;
    } else {
        int64_t klo = bd->kind == DMA_MASK_WINDOW ? dma_max64(0, p - bd->window + 1) : 0;
        int64_t khi = bd->causal || bd->kind == DMA_MASK_WINDOW ? dma_min64(Lk, p + 1) : Lk;
        for (int64_t j = klo; j < khi; j++)
            if (visible(bd, b, j, p))
                out[n++] = (int32_t)j;
    }
    int64_t bs = bd->block_size;
    if (bs > 1) {
        /* Block smoothing: a block is kept whole when more than half of it was selected. */
        int64_t m = 0;
        int32_t *smooth = out + n; /* tmp has room for 2 * Lk keys */
        for (int64_t k = 0; k < n;) {
            int64_t blk = out[k] / bs, kb0 = blk * bs, kb1 = dma_min64(Lk, kb0 + bs), c = 0;
            while (k < n && out[k] < kb1) {
                k++;
                c++;
            }
            if (2 * c > kb1 - kb0)
                for (int64_t j = kb0; j < kb1; j++)
                    if (visible(bd, b, j, p))
                        smooth[m++] = (int32_t)j;
        }
        memmove(out, smooth, sizeof(int32_t) * (size_t)m);
        n = m;
    }
    if (!grow((void **)&rs->list, &rs->cap, rs->nlist + n + 1, sizeof(int32_t)))
        return DMA_ERR_NOMEM;
    memcpy(rs->list + rs->nlist, out, sizeof(int32_t) * (size_t)n);
    rs->nlist += n;
    return DMA_OK;
}

static void build_rows(const build *bd, int64_t b, int64_t h, slab *sl)
{
    const int64_t Lk = bd->Lk;
    dma_sparsity *sp = bd->sp;
    int64_t s = b * bd->H + h;
    row_scratch rs = {0};
    rs.tmp = malloc(sizeof(int32_t) * (size_t)(3 * Lk + 1));
    rs.heap = malloc(sizeof(heap_item) * (size_t)(dma_min64(bd->window, Lk) + 1));
    if (!rs.tmp || !rs.heap) {
        sl->status = DMA_ERR_NOMEM;
        goto done;
    }
    rs.pos_of = rs.tmp + 2 * Lk;
    for (int64_t j = 0; j < Lk; j++)
        rs.pos_of[j] = -1;
    int32_t *lo = sp->row_lo + s * bd->Lq, *hi = sp->row_hi + s * bd->Lq;
    for (int64_t t = 0; t < sp->ntiles; t++) {
        int64_t r0 = t * DMA_TILE, r1 = dma_min64(bd->Lq, r0 + DMA_TILE), nr = r1 - r0;
        rs.nlist = 0;
        int32_t kmin = INT32_MAX, kmax = -1;
        for (int64_t r = 0; r < nr; r++) {
            rs.start[r] = rs.nlist;
            dma_status st = select_row(bd, b, h, r0 + r, &rs);
            if (st != DMA_OK) {
                sl->status = st;
                goto done;
            }
            if (rs.nlist > rs.start[r]) {
                kmin = rs.list[rs.start[r]] < kmin ? rs.list[rs.start[r]] : kmin;
                kmax = rs.list[rs.nlist - 1] > kmax ? rs.list[rs.nlist - 1] : kmax;
            }
        }
        rs.start[nr] = rs.nlist;
        /* Union: mark every listed key, then number the marks in key order. */
        for (int64_t k = 0; k < rs.nlist; k++)
            rs.pos_of[rs.list[k]] = 0;
        int64_t count = 0;
        for (int32_t j = kmin; j <= kmax; j++)
            count += rs.pos_of[j] == 0;
        int64_t base = sl->nkeys;
        int32_t *u = slab_keys(sl, count);
        if (!u) {
            sl->status = DMA_ERR_NOMEM;
            goto done;
        }
        int32_t c = 0;
        for (int32_t j = kmin; j <= kmax; j++)
            if (rs.pos_of[j] == 0) {
                u[c] = j;
                rs.pos_of[j] = c++;
            }
        bool ranges = true;
        for (int64_t r = 0; r < nr && ranges; r++) {
            int64_t a = rs.start[r], e = rs.start[r + 1];
            if (e > a && rs.pos_of[rs.list[e - 1]] - rs.pos_of[rs.list[a]] + 1 != e - a)
                ranges = false;
        }
        int32_t wpr = ranges ? 0 : (int32_t)dma_div_up(count, 64);
        int64_t wbase = ranges ? -1 : sl->nwords;
        uint64_t *words = ranges ? NULL : slab_words(sl, nr * wpr);
        if (!ranges && !words) {
            sl->status = DMA_ERR_NOMEM;
            goto done;
        }
        for (int64_t r = 0; r < nr; r++) {
            int64_t a = rs.start[r], e = rs.start[r + 1], i = r0 + r;
            if (ranges) {
                lo[i] = e > a ? rs.pos_of[rs.list[a]] : 0;
                hi[i] = e > a ? rs.pos_of[rs.list[e - 1]] + 1 : 0;
                sl->nnz += e - a;
            } else {
                uint64_t *row = words + r * wpr;
                for (int64_t k = a; k < e; k++)
                    bit_set(row, rs.pos_of[rs.list[k]]);
                bits_bounds(row, wpr, &lo[i], &hi[i], &sl->nnz);
            }
        }
        for (int32_t k = 0; k < c; k++)
            rs.pos_of[sl->keys[base + k]] = -1;
        sp->tiles[s * sp->ntiles + t] = (dma_tile){.key_off = base, .word_off = wbase, .first = 0,
                                                   .count = (int32_t)count, .words_per_row = wpr};
    }
done:
    free(rs.list);
    free(rs.tmp);
    free(rs.heap);
}

/* ================================================================================== */
/* Driver                                                                               */
/* ================================================================================== */

/* Whether every value of the bias passes ok. */
static bool bias_all(const build *bd, bool (*ok)(float))
{
    const dma_tensor *t = bd->bias;
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int64_t h = 0; h < t->shape[1]; h++)
            for (int64_t i = 0; i < t->shape[2]; i++)
                for (int64_t j = 0; j < t->shape[3]; j++)
                    if (!ok(bias_at(bd, b, h, i, j)))
                        return false;
    return true;
}

/* The object of bd, into reuse's memory (a host object, or NULL); reuse is consumed. */
static dma_status run_build(dma_context *ctx, build *bd, dma_sparsity *reuse, dma_sparsity **out)
{
    dma_sparsity *sp;
    dma_status st = dma_sparsity_alloc(ctx, bd->B, bd->H, bd->Lq, bd->Lk, reuse, &sp);
    if (st != DMA_OK)
        return st;
    bd->sp = sp;
    if (bd->Lq == 0) { /* no rows: nothing to select, and no per-slab bookkeeping for B*H slabs */
        /* The builders find a NaN or +inf bias as they select; with no rows it is looked for
         * here, so that the status never depends on Lq (the GPU builder checks every key too). */
        if (bd->bias && !bias_all(bd, bias_ok))
            return dma_sparsity_fail(ctx, sp, DMA_ERR_BAD_VALUE);
        return dma_sparsity_assemble(ctx, sp, NULL, 0, out);
    }
    const int64_t nslab = bd->B * bd->H;
    const bool per_key = !bd->bias || bd->bias->shape[2] == 1;
    const bool streaming =
        bd->kind == DMA_MASK_TOPK && bd->causal && per_key && bd->block_size <= 1;
    const bool shared = !streaming && bd->kind != KIND_FROM_MASK && per_key && bd->block_size <= 1;

    if (streaming) {
        /* Every slab at once, written in place; with fewer slabs than threads each slab is
         * split among about threads / nslab of them (mask_topk_parallel.c). */
        dma_topk_slab *in = malloc(sizeof(dma_topk_slab) * (size_t)nslab);
        if (!in)
            return dma_sparsity_fail(ctx, sp, DMA_ERR_NOMEM);
        for (int64_t s = 0; s < nslab; s++)
            in[s] = topk_slab(bd, s);
        const bool split = dma_topk_split_pays(nslab, ctx->threads, bd->Lq, bd->Lk, bd->window);
        st = dma_topk_causal_build(in, nslab, ctx->threads,
                                   split ? dma_div_up(ctx->threads, nslab) : 1,
                                   split ? dma_topk_min_block(bd->window) : INT64_MAX / 4, sp);
        free(in);
        if (st != DMA_OK)
            return dma_sparsity_fail(ctx, sp, st);
        *out = sp;
        return DMA_OK;
    }

    slab *slabs = calloc((size_t)nslab, sizeof(slab));
    if (!slabs)
        return dma_sparsity_fail(ctx, sp, DMA_ERR_NOMEM);
#pragma omp parallel for schedule(dynamic, 1) num_threads(ctx->threads)
    for (int64_t s = 0; s < nslab; s++) {
        int64_t b = s / bd->H, h = s % bd->H;
        if (shared) {
            build_shared(bd, b, h, &slabs[s]);
        } else {
            build_rows(bd, b, h, &slabs[s]);
        }
    }

    return dma_sparsity_assemble(ctx, sp, slabs, nslab, out);
}

/* A top-k whose window covers every key keeps every visible key that exists and has a finite
 * bias. When that is every key, the object is the dense one: contiguous ranges instead of
 * bitmasks, which the kernels run as fast as the dense baseline. A NaN or +inf bias answers
 * "no", so that the builder proper reports it. */
static bool bias_finite(float x) { return x > -INFINITY && x < INFINITY; }

static bool topk_keeps_all(const build *bd)
{
    if (bd->kind != DMA_MASK_TOPK || bd->window < bd->Lk || bd->block_size > 1)
        return false;
    if (bd->pad)
        for (int64_t b = 0; b < bd->pad->shape[0]; b++)
            for (int64_t j = 0; j < bd->Lk; j++)
                if (!key_exists(bd, b, j))
                    return false;
    return bias_all(bd, bias_finite);
}

static dma_status check_lengths(dma_context *ctx, int64_t B, int64_t H, int64_t Lq, int64_t Lk)
{
    if (B < 1 || H < 1)
        return dma_fail(ctx, DMA_ERR_SHAPE, "sparsity: B = %lld and H = %lld must be >= 1",
                        (long long)B, (long long)H);
    if (Lq < 0 || Lk < 0)
        return dma_fail(ctx, DMA_ERR_SHAPE, "sparsity: negative length (Lq %lld, Lk %lld)",
                        (long long)Lq, (long long)Lk);
    int64_t total;
    if (Lq > INT32_MAX || Lk > INT32_MAX || !dma_mul_ok(B, H, &total) ||
        !dma_mul_ok(total, Lq, &total) || !dma_mul_ok(total, Lk, &total))
        return dma_fail(ctx, DMA_ERR_OVERFLOW,
                        "sparsity: Lq, Lk must be <= 2^31-1 and B*H*Lq*Lk fit 64 bits");
    return DMA_OK;
}

/* The checks of dma_sparsity_build's arguments; *bias becomes NULL where the kind reads none.
 * fn names the public call in messages. */
static dma_status check_build(dma_context *ctx, const char *fn, const dma_mask_params *params,
                              int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                              const dma_tensor **biasp, const dma_tensor *key_padding)
{
    const dma_tensor *bias = *biasp;
    dma_mask_kind kind = params->kind;
    if (kind != DMA_MASK_TOPK && kind != DMA_MASK_RELU && kind != DMA_MASK_WINDOW &&
        kind != DMA_MASK_DENSE)
        return dma_fail(ctx, DMA_ERR_ARG, "%s: unknown mask kind %d", fn, (int)kind);
    if (params->window < 0 || params->block_size < 0)
        return dma_fail(ctx, DMA_ERR_WINDOW, "%s: window %lld and block_size %lld must be >= 0",
                        fn, (long long)params->window, (long long)params->block_size);
    dma_status st = check_lengths(ctx, B, H, Lq, Lk);
    if (st != DMA_OK)
        return st;
    bool needs_bias = kind == DMA_MASK_TOPK || kind == DMA_MASK_RELU;
    if (needs_bias && !bias)
        return dma_fail(ctx, DMA_ERR_NULL, "%s: top-k and relu need a bias", fn);
    if (!needs_bias)
        *biasp = bias = NULL;
    if (bias) {
        if ((st = dma_check_tensor(ctx, "bias", bias, DMA_F32, 4)) != DMA_OK)
            return st;
        if (!dma_is_bcast(bias->shape[0], B) || !dma_is_bcast(bias->shape[1], H) ||
            !dma_is_bcast(bias->shape[2], Lq) || bias->shape[3] != Lk)
            return dma_fail(ctx, DMA_ERR_SHAPE,
                            "bias: shape (%lld, %lld, %lld, %lld) is not (1|%lld, 1|%lld, 1|%lld, %lld)",
                            (long long)bias->shape[0], (long long)bias->shape[1],
                            (long long)bias->shape[2], (long long)bias->shape[3], (long long)B,
                            (long long)H, (long long)Lq, (long long)Lk);
    }
    if (key_padding) {
        if ((st = dma_check_tensor(ctx, "key_padding", key_padding, DMA_BOOL, 2)) != DMA_OK)
            return st;
        if (!dma_is_bcast(key_padding->shape[0], B) || key_padding->shape[1] != Lk)
            return dma_fail(ctx, DMA_ERR_SHAPE, "key_padding: shape (%lld, %lld) is not (1|%lld, %lld)",
                            (long long)key_padding->shape[0], (long long)key_padding->shape[1],
                            (long long)B, (long long)Lk);
    }
    return DMA_OK;
}

/* dma_sparsity_build into reuse's memory where it is a host object and ctx a CPU context;
 * reuse (or NULL) is consumed whatever happens. fn names the public call in messages. */
static dma_status build_into(dma_context *ctx, const char *fn, const dma_mask_params *params,
                             int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                             const dma_tensor *bias, const dma_tensor *key_padding,
                             dma_sparsity *reuse, dma_sparsity **out)
{
    dma_status st = check_build(ctx, fn, params, B, H, Lq, Lk, &bias, key_padding);
    if (st != DMA_OK || ctx->device == DMA_DEVICE_CUDA || (reuse && reuse->cuda)) {
        dma_sparsity_destroy(reuse);
        reuse = NULL;
    }
    if (st != DMA_OK)
        return st;
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_device_sparsity_build(ctx, params, B, H, Lq, Lk, bias, key_padding, out);
    const dma_mask_kind kind = params->kind;
    build bd = {.kind = kind, .causal = params->causal != 0,
                .window = kind == DMA_MASK_TOPK || kind == DMA_MASK_WINDOW ? params->window : 0,
                .block_size = params->block_size, .B = B, .H = H, .Lq = Lq, .Lk = Lk,
                .off = Lk - Lq, .bias = bias, .pad = key_padding};
    /* A window of Lk or more selects the same keys as Lk (every row's last key is < Lk); the
     * clamp keeps heaps small and p - window free of overflow. */
    bd.window = dma_min64(bd.window, Lk);
    if (topk_keeps_all(&bd)) {
        bd.kind = DMA_MASK_DENSE;
        bd.bias = NULL;
        bd.window = 0;
    }
    return run_build(ctx, &bd, reuse, out);
}

dma_status dma_sparsity_build(dma_context *ctx, const dma_mask_params *params, int64_t B,
                              int64_t H, int64_t Lq, int64_t Lk, const dma_tensor *bias,
                              const dma_tensor *key_padding, dma_sparsity **out)
{
    if (!ctx || !params || !out)
        return dma_fail(ctx, DMA_ERR_NULL, "sparsity_build: ctx, params and out are required");
    return build_into(ctx, "sparsity_build", params, B, H, Lq, Lk, bias, key_padding, NULL, out);
}

dma_status dma_sparsity_rebuild(dma_context *ctx, const dma_mask_params *params, int64_t B,
                                int64_t H, int64_t Lq, int64_t Lk, const dma_tensor *bias,
                                const dma_tensor *key_padding, dma_sparsity **sp)
{
    if (!sp)
        return dma_fail(ctx, DMA_ERR_NULL, "sparsity_rebuild: sp is required");
    dma_sparsity *old = *sp;
    *sp = NULL; /* set again on success only */
    if (!ctx || !params) {
        dma_sparsity_destroy(old);
        return dma_fail(ctx, DMA_ERR_NULL, "sparsity_rebuild: ctx and params are required");
    }
    return build_into(ctx, "sparsity_rebuild", params, B, H, Lq, Lk, bias, key_padding, old, sp);
}

dma_status dma_sparsity_from_mask(dma_context *ctx, const dma_tensor *mask, dma_sparsity **out)
{
    if (!ctx || !mask || !out)
        return dma_fail(ctx, DMA_ERR_NULL, "sparsity_from_mask: ctx, mask and out are required");
    dma_status st = dma_check_tensor(ctx, "mask", mask, DMA_BOOL, 4);
    if (st != DMA_OK)
        return st;
    if ((st = check_lengths(ctx, mask->shape[0], mask->shape[1], mask->shape[2],
                            mask->shape[3])) != DMA_OK)
        return st;
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_device_sparsity_from_mask(ctx, mask, out);
    build bd = {.kind = KIND_FROM_MASK, .B = mask->shape[0], .H = mask->shape[1],
                .Lq = mask->shape[2], .Lk = mask->shape[3],
                .off = mask->shape[3] - mask->shape[2], .mask = mask};
    return run_build(ctx, &bd, NULL, out);
}

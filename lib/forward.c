/*
 * forward.c - attention forward over a sparsity object (DESIGN §3).
 *
 * Work item: (batch, group of query heads sharing one kv head and one sparsity head, query tile).
 * For each chunk of the tile's key union it gathers K and V into packed panels once, then every
 * block of query rows of every head of the group computes its scores, the online softmax and its
 * P*V update against those panels. The dense and causal baselines run through the same code with
 * a union that is simply every visible key.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "internal.h"

/* Query heads handled by one work item at most (bounds per-thread scratch for MQA shapes). */
#define HEADS_PER_ITEM 8

typedef struct fwd {
    const dma_kernels *kern;
    int64_t B, Lq, Lk, Hq, Hkv, D, off;
    float scale, softcap;
    bool causal;
    const dma_tensor *q, *k, *v, *bias, *out, *lse;
    const dma_sparsity *sp;
    int64_t heads_per_group; /* query heads that share a kv head and a sparsity head */
    int64_t items_per_group; /* ceil(heads_per_group / HEADS_PER_ITEM) */
    int ld;                  /* row stride of Q, O and V panels: D rounded up to 16 */
    size_t scratch_floats;   /* per thread */
} fwd;

typedef struct item {
    int64_t b, group, sub, tile, work;
} item;

static int by_work_desc(const void *a, const void *b)
{
    const item *x = a, *y = b;
    if (x->work != y->work)
        return x->work < y->work ? 1 : -1;
    /* Fixed order for equal work: the schedule never changes results, only speed. */
    if (x->b != y->b) return x->b < y->b ? -1 : 1;
    if (x->group != y->group) return x->group < y->group ? -1 : 1;
    if (x->sub != y->sub) return x->sub < y->sub ? -1 : 1;
    return x->tile < y->tile ? -1 : (x->tile > y->tile);
}

static inline float *f32(const dma_tensor *t) { return (float *)t->data; }

/* Compute one work item. `scratch` holds f->scratch_floats floats, 64-byte aligned. */
static void forward_item(const fwd *f, const item *it, float *scratch)
{
    const dma_kernels *kern = f->kern;
    const dma_sparsity *sp = f->sp;
    const int64_t D = f->D, ld = f->ld, mr = kern->mr, nr = kern->nr;
    const int64_t g = f->heads_per_group;
    const int64_t h0 = it->group * g + it->sub * HEADS_PER_ITEM;
    const int64_t nh = dma_min64(HEADS_PER_ITEM, g - it->sub * HEADS_PER_ITEM);
    const int64_t hkv = h0 / (f->Hq / f->Hkv);
    const int64_t bs = sp->B == 1 ? 0 : it->b, hs = h0 / (f->Hq / sp->H);
    const int64_t slab = bs * sp->H + hs;
    const dma_tile *tile = &sp->tiles[slab * sp->ntiles + it->tile];
    const int64_t r0 = it->tile * DMA_TILE, nrows = dma_min64(f->Lq, r0 + DMA_TILE) - r0;
    const int64_t M = nh * nrows;
    const int32_t *keys = tile->key_off >= 0 ? sp->keys + tile->key_off : NULL;
    const bool per_row_bias = f->bias && f->bias->shape[2] != 1;

    float *Q = scratch;                       /* [M][ld] */
    float *O = Q + M * ld;                    /* [M][ld] */
    float *Kp = O + M * ld;                   /* [DMA_CHUNK][D] packed */
    float *Vp = Kp + DMA_CHUNK * ld;          /* [DMA_CHUNK][ld] */
    float *S = Vp + DMA_CHUNK * ld;           /* [mr][DMA_CHUNK] */
    float *bias_buf = S + mr * DMA_CHUNK;     /* [nh][DMA_CHUNK] */
    float *row_m = bias_buf + HEADS_PER_ITEM * DMA_CHUNK;
    float *row_l = row_m + M;
    float *alpha = row_l + M;                 /* [mr] */
    int32_t *lo = (int32_t *)(alpha + 64);    /* [nrows] selected positions [lo, hi) */
    int32_t *hi = lo + DMA_TILE;

    /* Q rows of every head, pre-multiplied by the scale; row r = hh * nrows + (i - r0). */
    for (int64_t hh = 0; hh < nh; hh++)
        for (int64_t i = 0; i < nrows; i++) {
            const float *src = f32(f->q) + it->b * f->q->stride[0] + (r0 + i) * f->q->stride[1] +
                               (h0 + hh) * f->q->stride[2];
            float *dst = Q + (hh * nrows + i) * ld;
            for (int64_t d = 0; d < D; d++)
                dst[d] = f->scale * src[d];
            memset(dst + D, 0, sizeof(float) * (size_t)(ld - D));
        }
    memset(O, 0, sizeof(float) * (size_t)(M * ld));
    for (int64_t r = 0; r < M; r++) {
        row_m[r] = -INFINITY;
        row_l[r] = 0.0f;
    }
    for (int64_t i = 0; i < nrows; i++) {
        int64_t row = slab * sp->Lq + r0 + i;
        lo[i] = sp->row_lo[row];
        hi[i] = sp->row_hi[row];
        if (f->causal) {
            int32_t cut = dma_tile_cut(sp, tile, r0 + i + f->off);
            hi[i] = hi[i] < cut ? hi[i] : cut;
        }
        if (hi[i] <= lo[i])
            lo[i] = hi[i] = 0;
    }

    const float *kbase = f32(f->k) + it->b * f->k->stride[0] + hkv * f->k->stride[2];
    const float *vbase = f32(f->v) + it->b * f->v->stride[0] + hkv * f->v->stride[2];
    for (int64_t c0 = 0; c0 < tile->count; c0 += DMA_CHUNK) {
        const int64_t n = dma_min64(DMA_CHUNK, tile->count - c0);
        bool any = false;
        for (int64_t i = 0; i < nrows && !any; i++)
            any = lo[i] < c0 + n && hi[i] > c0;
        if (!any)
            continue;
        kern->pack_k(Kp, kbase, f->k->stride[1], keys ? keys + c0 : NULL,
                     (int32_t)(tile->first + c0), (int)n, (int)D);
        kern->pack_v(Vp, (int)ld, vbase, f->v->stride[1], keys ? keys + c0 : NULL,
                     (int32_t)(tile->first + c0), (int)n, (int)D);
        const int64_t n_pad = dma_div_up(n, nr) * nr;
        if (f->bias && !per_row_bias)
            for (int64_t hh = 0; hh < nh; hh++) {
                float *dst = bias_buf + hh * DMA_CHUNK;
                int64_t hb = (h0 + hh) / (f->Hq / f->bias->shape[1]);
                for (int64_t c = 0; c < n; c++)
                    dst[c] = f32(f->bias)[dma_offset4(f->bias, it->b, hb, 0,
                                                      dma_tile_key(sp, tile, (int32_t)(c0 + c)))];
                for (int64_t c = n; c < n_pad; c++)
                    dst[c] = 0.0f;
            }
        for (int64_t hh = 0; hh < nh; hh++)
            for (int64_t rb = 0; rb < nrows; rb += mr) {
                const int64_t m = dma_min64(mr, nrows - rb);
                /* Columns of this chunk any row of the block selects, widened to whole nr blocks. */
                int64_t ca = n, cb = 0;
                for (int64_t i = rb; i < rb + m; i++) {
                    int64_t a = dma_max64(lo[i], c0) - c0, e = dma_min64(hi[i], c0 + n) - c0;
                    if (e > a) {
                        ca = a < ca ? a : ca;
                        cb = e > cb ? e : cb;
                    }
                }
                if (cb <= ca)
                    continue;
                ca = ca / nr * nr;
                cb = dma_div_up(cb, nr) * nr;
                const int64_t row0 = hh * nrows + rb;
                kern->scores(S, DMA_CHUNK, Q + row0 * ld, (int)ld, (int)m, Kp + ca * D,
                             (int)(cb - ca), (int)D);
                for (int64_t r = 0; r < m; r++) {
                    const int64_t i = rb + r;
                    const float *brow = NULL;
                    if (per_row_bias) {
                        float *dst = bias_buf + hh * DMA_CHUNK;
                        int64_t hb = (h0 + hh) / (f->Hq / f->bias->shape[1]);
                        for (int64_t c = ca; c < cb; c++)
                            dst[c - ca] = c < n ? f32(f->bias)[dma_offset4(
                                                      f->bias, it->b, hb, r0 + i,
                                                      dma_tile_key(sp, tile, (int32_t)(c0 + c)))]
                                                : 0.0f;
                        brow = dst;
                    } else if (f->bias) {
                        brow = bias_buf + hh * DMA_CHUNK + ca;
                    }
                    const uint64_t *bits =
                        tile->word_off >= 0
                            ? sp->words + tile->word_off + i * tile->words_per_row
                            : NULL;
                    int64_t a = dma_max64(lo[i] - c0 - ca, 0), e = dma_min64(hi[i] - c0 - ca, cb - ca);
                    if (e < a)
                        e = a;
                    alpha[r] = kern->softmax_row(S + r * DMA_CHUNK, (int)(cb - ca), brow, bits,
                                                 (int)(c0 + ca), (int)a, (int)e, f->softcap,
                                                 &row_m[row0 + r], &row_l[row0 + r]);
                }
                kern->accum_pv(O + row0 * ld, (int)ld, alpha, S, DMA_CHUNK, (int)m, Vp + ca * ld,
                               (int)ld, (int)(cb - ca), (int)D);
            }
    }

    /* Normalise and write out; rows that selected nothing give 0 and lse = -inf. */
    for (int64_t hh = 0; hh < nh; hh++)
        for (int64_t i = 0; i < nrows; i++) {
            const int64_t r = hh * nrows + i;
            float *dst = f32(f->out) + it->b * f->out->stride[0] + (r0 + i) * f->out->stride[1] +
                         (h0 + hh) * f->out->stride[2];
            float inv = row_l[r] > 0.0f ? 1.0f / row_l[r] : 0.0f;
            for (int64_t d = 0; d < D; d++)
                dst[d] = O[r * ld + d] * inv;
            if (f->lse)
                f32(f->lse)[it->b * f->lse->stride[0] + (h0 + hh) * f->lse->stride[1] +
                            (r0 + i) * f->lse->stride[2]] =
                    row_l[r] > 0.0f ? row_m[r] + logf(row_l[r]) : -INFINITY;
        }
}

static dma_status run_forward(dma_context *ctx, fwd *f)
{
    const dma_sparsity *sp = f->sp;
    int64_t groups = f->Hq / f->heads_per_group;
    int64_t nitems = f->B * groups * f->items_per_group * sp->ntiles;
    item *items = malloc(sizeof(item) * (size_t)(nitems ? nitems : 1));
    int threads = ctx->threads;
    if (nitems < threads)
        threads = (int)(nitems > 0 ? nitems : 1);
    float *scratch = dma_alloc(sizeof(float) * f->scratch_floats * (size_t)threads);
    if (!items || !scratch) {
        free(items);
        dma_free(scratch);
        return dma_fail(ctx, DMA_ERR_NOMEM, "forward: out of memory for scratch");
    }
    int64_t n = 0;
    for (int64_t b = 0; b < f->B; b++)
        for (int64_t gi = 0; gi < groups; gi++)
            for (int64_t sub = 0; sub < f->items_per_group; sub++)
                for (int64_t t = 0; t < sp->ntiles; t++) {
                    int64_t h0 = gi * f->heads_per_group;
                    int64_t slab = (sp->B == 1 ? 0 : b) * sp->H + h0 / (f->Hq / sp->H);
                    items[n++] = (item){b, gi, sub, t, sp->tiles[slab * sp->ntiles + t].count + 1};
                }
    /* Largest first, then dynamic: balances causal shapes whose late tiles are the heaviest. */
    qsort(items, (size_t)nitems, sizeof(item), by_work_desc);
#pragma omp parallel num_threads(threads)
    {
        float *mine = scratch + f->scratch_floats * (size_t)omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < nitems; x++)
            forward_item(f, &items[x], mine);
    }
    free(items);
    dma_free(scratch);
    return DMA_OK;
}

/* Shapes, strides and dtypes of the forward's arguments; fills f. Writes nothing else. */
static dma_status check_forward(dma_context *ctx, const dma_tensor *q, const dma_tensor *k,
                                const dma_tensor *v, const dma_tensor *bias,
                                const dma_sparsity *sp, const dma_attn_params *params,
                                const dma_tensor *out, const dma_tensor *lse, fwd *f)
{
    dma_status st;
    if (!q || !k || !v || !out)
        return dma_fail(ctx, DMA_ERR_NULL, "forward: q, k, v and out are required");
    if ((st = dma_check_tensor(ctx, "q", q, DMA_F32, 4)) ||
        (st = dma_check_tensor(ctx, "k", k, DMA_F32, 4)) ||
        (st = dma_check_tensor(ctx, "v", v, DMA_F32, 4)) ||
        (st = dma_check_tensor(ctx, "out", out, DMA_F32, 4)))
        return st;
    const int64_t B = q->shape[0], Lq = q->shape[1], Hq = q->shape[2], D = q->shape[3];
    const int64_t Lk = k->shape[1], Hkv = k->shape[2];
    if (D < 1 || D > DMA_MAX_HEAD_DIM)
        return dma_fail(ctx, DMA_ERR_HEAD_DIM, "q: head dimension %lld is outside 1..%d",
                        (long long)D, DMA_MAX_HEAD_DIM);
    if (Hq < 1 || Hkv < 1 || Hq % Hkv != 0)
        return dma_fail(ctx, DMA_ERR_HEADS, "heads: Hq = %lld must be a positive multiple of "
                        "Hkv = %lld", (long long)Hq, (long long)Hkv);
    if (k->shape[0] != B || k->shape[3] != D)
        return dma_fail(ctx, DMA_ERR_SHAPE, "k: shape (%lld, %lld, %lld, %lld) does not match q's "
                        "batch %lld and head dim %lld", (long long)k->shape[0], (long long)Lk,
                        (long long)Hkv, (long long)k->shape[3], (long long)B, (long long)D);
    for (int d = 0; d < 4; d++) {
        if (v->shape[d] != k->shape[d])
            return dma_fail(ctx, DMA_ERR_SHAPE, "v: shape differs from k's in dimension %d", d);
        if (out->shape[d] != q->shape[d])
            return dma_fail(ctx, DMA_ERR_SHAPE, "out: shape differs from q's in dimension %d", d);
    }
    if (Lq > INT32_MAX || Lk > INT32_MAX)
        return dma_fail(ctx, DMA_ERR_OVERFLOW, "forward: Lq and Lk must be <= 2^31-1");
    if (bias) {
        if ((st = dma_check_tensor(ctx, "bias", bias, DMA_F32, 4)))
            return st;
        if (!dma_is_bcast(bias->shape[0], B) ||
            !(bias->shape[1] == 1 || bias->shape[1] == Hkv || bias->shape[1] == Hq) ||
            !dma_is_bcast(bias->shape[2], Lq) || bias->shape[3] != Lk)
            return dma_fail(ctx, DMA_ERR_SHAPE, "bias: shape (%lld, %lld, %lld, %lld) is not "
                            "(1|B, 1|Hkv|Hq, 1|Lq, Lk)", (long long)bias->shape[0],
                            (long long)bias->shape[1], (long long)bias->shape[2],
                            (long long)bias->shape[3]);
    }
    if (sp && (sp->Lq != Lq || sp->Lk != Lk || !dma_is_bcast(sp->B, B) ||
               !(sp->H == 1 || sp->H == Hkv || sp->H == Hq)))
        return dma_fail(ctx, DMA_ERR_SHAPE, "sparsity: (B %lld, H %lld, Lq %lld, Lk %lld) does "
                        "not fit (B %lld, H 1|%lld|%lld, Lq %lld, Lk %lld)", (long long)sp->B,
                        (long long)sp->H, (long long)sp->Lq, (long long)sp->Lk, (long long)B,
                        (long long)Hkv, (long long)Hq, (long long)Lq, (long long)Lk);
    if (lse) {
        if ((st = dma_check_tensor(ctx, "lse", lse, DMA_F32, 3)))
            return st;
        if (lse->shape[0] != B || lse->shape[1] != Hq || lse->shape[2] != Lq)
            return dma_fail(ctx, DMA_ERR_SHAPE, "lse: shape must be (B, Hq, Lq)");
    }
    dma_attn_params p = {0};
    if (params)
        p = *params;
    if (!isfinite(p.scale) || !isfinite(p.softcap) || p.softcap < 0.0f)
        return dma_fail(ctx, DMA_ERR_BAD_VALUE, "params: scale must be finite and softcap finite "
                        "and >= 0");
    int64_t hs = sp ? sp->H : 1;
    *f = (fwd){.kern = ctx->kernels, .B = B, .Lq = Lq, .Lk = Lk, .Hq = Hq, .Hkv = Hkv, .D = D,
               .off = Lk - Lq, .scale = p.scale != 0.0f ? p.scale : 1.0f / sqrtf((float)D),
               .softcap = p.softcap, .causal = p.causal != 0, .q = q, .k = k, .v = v,
               .bias = bias, .out = out, .lse = lse, .sp = sp,
               .heads_per_group = Hq / (Hkv > hs ? Hkv : hs)};
    f->items_per_group = dma_div_up(f->heads_per_group, HEADS_PER_ITEM);
    f->ld = (int)dma_div_up(D, 16) * 16;
    int64_t M = HEADS_PER_ITEM * DMA_TILE;
    f->scratch_floats = (size_t)(2 * M * f->ld + 2 * DMA_CHUNK * f->ld +
                                 (ctx->kernels->mr + HEADS_PER_ITEM) * DMA_CHUNK + 2 * M + 64 +
                                 2 * DMA_TILE + 64);
    f->scratch_floats = (f->scratch_floats + 15) / 16 * 16; /* keep each thread 64-byte aligned */
    return DMA_OK;
}

dma_status dma_forward(dma_context *ctx, const dma_tensor *q, const dma_tensor *k,
                       const dma_tensor *v, const dma_tensor *bias, const dma_sparsity *sp,
                       const dma_attn_params *params, dma_tensor *out, dma_tensor *lse)
{
    if (!ctx)
        return DMA_ERR_NULL;
    fwd f;
    dma_status st = check_forward(ctx, q, k, v, bias, sp, params, out, lse, &f);
    if (st != DMA_OK)
        return st;
    if (f.B == 0 || f.Lq == 0)
        return DMA_OK;
    dma_sparsity *dense = NULL;
    if (!sp) {
        if ((st = dma_sparsity_dense(ctx, f.Lq, f.Lk, f.causal, &dense)) != DMA_OK)
            return st;
        f.sp = dense;
        f.heads_per_group = f.Hq / f.Hkv;
        f.items_per_group = dma_div_up(f.heads_per_group, HEADS_PER_ITEM);
    }
    st = run_forward(ctx, &f);
    dma_sparsity_destroy(dense);
    return st;
}

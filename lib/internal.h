/*
 * internal.h - what the library's own files share: the context, the sparsity object's layout,
 * validation helpers and small utilities. Not installed.
 */
#ifndef DMATTN_INTERNAL_H
#define DMATTN_INTERNAL_H

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dmattn.h"
#include "kernels.h"

/* Query rows per tile of the sparsity object (DESIGN §2). */
#define DMA_TILE 64

struct dma_context {
    int threads;
    dma_isa isa;
    const dma_kernels *kernels; /* -> table: the ISA's kernels, with the bf16 dot products added
                                   when the CPU has them */
    dma_kernels table;
    dma_device device;  /* DMA_DEVICE_CUDA: the calls route to lib/device.c (cuda/) */
    int cuda_device;    /* the GPU's ordinal */
    void *cuda_stream;  /* cudaStream_t, NULL = legacy default stream */
    struct dcu_state *cuda_state; /* cuda/'s per-context state (dma_cuda.h); NULL on the CPU */
    void *scratch;      /* the forward's and backward's per-thread panels, kept between calls */
    size_t scratch_bytes;
    char last_error[256];
};

/* At least `bytes` of the context's scratch (64-byte aligned, contents undefined), valid until
 * the next call on ctx; NULL when out of memory. Kept between calls: a call's fresh pages cost
 * a page fault each, and at 16 threads the backward's panels are tens of MiB. */
void *dma_context_scratch(dma_context *ctx, size_t bytes);

/* Record a message in the context (if any) and return the status, so that validation code reads
 * `return dma_fail(ctx, DMA_ERR_SHAPE, "q: ...", ...);`. */
dma_status dma_fail(dma_context *ctx, dma_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * One tile of the sparsity object: the union U of the keys its rows selected, and how each row
 * picks from U.
 *   key_off >= 0: U is keys[key_off .. key_off + count) (sorted, unique);
 *   key_off <  0: U is the contiguous range first .. first + count - 1 (no index array needed).
 *   word_off >= 0: row r of the tile selects U positions whose bit is set in
 *                  words[word_off + r * words_per_row ...]; row_lo/row_hi bound the set bits.
 *   word_off <  0: row r selects exactly the positions [row_lo, row_hi).
 */
typedef struct dma_tile {
    int64_t key_off;
    int64_t word_off;
    int32_t first;
    int32_t count;
    int32_t words_per_row;
} dma_tile;

struct dma_sparsity {
    int64_t B, H, Lq, Lk;
    int64_t ntiles;     /* tiles per (b, h): ceil(Lq / DMA_TILE) */
    dma_tile *tiles;    /* [B][H][ntiles] */
    int32_t *row_lo;    /* [B][H][Lq] first selected position in the tile's U */
    int32_t *row_hi;    /* [B][H][Lq] one past the last selected position */
    int32_t *keys;      /* explicit unions, concatenated */
    float *vals;        /* NULL, or each key's bias beside keys (from a KV cache's heap) */
    uint64_t *words;    /* row bitmasks, concatenated */
    int64_t nkeys, nwords;
    int64_t nnz;
    /* Bytes allocated for tiles, row_lo, row_hi, keys and words (host objects): a rebuild
     * reuses each array that is large enough (dma_sparsity_room). */
    size_t cap_tiles, cap_lo, cap_hi, cap_keys, cap_words;
    int cuda;           /* 1: tiles, row_lo, row_hi, keys and words are device memory of GPU
                           cuda_device (built by a CUDA context; vals is then NULL) */
    int cuda_device;
    void *cuda_ready;   /* NULL, or the cudaEvent_t those arrays are complete at (a GPU top-k
                           build returns before its kernel ends); owned by the object */
};

/* The float data of a validated DMA_F32 tensor. */
static inline float *f32(const dma_tensor *t) { return (float *)t->data; }

static inline int64_t dma_div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t dma_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t dma_max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Key of position `pos` in a tile's union. */
static inline int32_t dma_tile_key(const dma_sparsity *sp, const dma_tile *t, int32_t pos)
{
    return t->key_off >= 0 ? sp->keys[t->key_off + pos] : t->first + pos;
}

/* Number of union positions whose key is <= last (U is sorted): the causal cut of a row. */
int32_t dma_tile_cut(const dma_sparsity *sp, const dma_tile *t, int64_t last);

/* ---- validation ---- */

/* Check a tensor's dtype, ndim, unit last stride, non-negative strides, and that every element
 * offset fits int64. `name` is used in the message. */
dma_status dma_check_tensor(dma_context *ctx, const char *name, const dma_tensor *t,
                            dma_dtype dtype, int ndim);

/* An argument and its name, for dma_check_apart. */
typedef struct dma_named_tensor {
    const char *name;
    const dma_tensor *t; /* NULL: absent, skipped */
} dma_named_tensor;

/* DMA_ERR_OVERLAP when the address range of an output overlaps an input's, or (pairwise)
 * another output's. Conservative: interleaved views of one buffer count as overlapping, which
 * is why the gradients, often views into one fused array, are not checked pairwise. The
 * tensors must have passed dma_check_tensor. */
dma_status dma_check_apart(dma_context *ctx, const dma_named_tensor *outs, int n_out,
                           const dma_named_tensor *ins, int n_in, bool pairwise);

/* Check that `got` is 1 or `full` (a broadcastable size). */
bool dma_is_bcast(int64_t got, int64_t full);

/* Overflow-checked multiply of non-negative sizes; false on overflow. */
static inline bool dma_mul_ok(int64_t a, int64_t b, int64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/* Element offset of a 4-D index with broadcasting: a size-1 dimension ignores its index. */
static inline int64_t dma_offset4(const dma_tensor *t, int64_t i0, int64_t i1, int64_t i2,
                                  int64_t i3)
{
    return (t->shape[0] == 1 ? 0 : i0 * t->stride[0]) + (t->shape[1] == 1 ? 0 : i1 * t->stride[1]) +
           (t->shape[2] == 1 ? 0 : i2 * t->stride[2]) + (t->shape[3] == 1 ? 0 : i3 * t->stride[3]);
}

/* ---- the CUDA backend's entry points (lib/device.c; DMA_ERR_DEVICE when not built) ---- */

/* DMA_ERR_DEVICE with "<call>: not available with a CUDA context" when ctx is a CUDA context. */
dma_status dma_cpu_only(dma_context *ctx, const char *call);
/* Whether the object lives where the context computes (DMA_ERR_DEVICE with a message if not). */
dma_status dma_device_match(dma_context *ctx, const dma_sparsity *sp);
dma_status dma_device_init(dma_context *ctx); /* dma_context_create: select and check the GPU */
void dma_device_release(dma_context *ctx);   /* dma_context_destroy: what dma_device_init made */
dma_status dma_device_sparsity_build(dma_context *ctx, const dma_mask_params *params, int64_t B,
                                     int64_t H, int64_t Lq, int64_t Lk, const dma_tensor *bias,
                                     const dma_tensor *key_padding, dma_sparsity **out);
dma_status dma_device_sparsity_from_mask(dma_context *ctx, const dma_tensor *mask,
                                         dma_sparsity **out);
dma_status dma_device_sparsity_to_dense(const dma_sparsity *sp, uint8_t *out, size_t bytes);
void dma_device_sparsity_free(dma_sparsity *sp);

/* ---- memory ---- */

/* 64-byte aligned allocation of `bytes` (0 allowed); NULL on failure or on size overflow. */
void *dma_alloc(size_t bytes);
void dma_free(void *p);

/* ---- sparsity internals shared by the builders ---- */

/* An empty object with B*H*ntiles tiles and B*H*Lq row ranges. Given a host object `reuse`
 * (else NULL), that object is emptied and returned instead: its arrays are kept, keys and words
 * for the builder to size with dma_sparsity_room, and freed on failure. Fresh objects have
 * keys and words NULL. */
dma_status dma_sparsity_alloc(dma_context *ctx, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                              dma_sparsity *reuse, dma_sparsity **out);

/* An array of `bytes` in place of `old` (allocated with *cap bytes): old itself when it is large
 * enough (its contents are left to be overwritten), else a fresh one, old being freed. Sets *cap;
 * NULL when out of memory. */
void *dma_sparsity_room(void *old, size_t *cap, size_t bytes);

/* ---- attention problems shared by the forward and the backward (lib/attn.c) ---- */

/* Query heads handled by one work item at most (bounds per-thread scratch for MQA shapes). */
#define DMA_HEADS_PER_ITEM 8

/* A validated attention call. */
typedef struct dma_attn {
    const dma_kernels *kern;
    int64_t B, Lq, Lk, Hq, Hkv, D, off; /* off = Lk - Lq: row i's last visible key is i + off */
    float scale, softcap;
    bool causal;
    const dma_tensor *q, *k, *v, *bias, *out, *lse;
    const dma_sparsity *sp;  /* never NULL once dma_attn_prepare succeeded */
    dma_sparsity *owned_sp;  /* the dense object made when the caller gave none */
    int64_t heads_per_group; /* query heads sharing one kv head and one sparsity head */
    int64_t items_per_group; /* ceil(heads_per_group / DMA_HEADS_PER_ITEM) */
    int ld;                  /* row stride of Q, O and V panels: D rounded up to 16 */
    const dma_kv_cache *cache; /* keys, values (and bias) come from a KV cache (k, v NULL) */
    bool cache_bias;         /* add the cache's per-key bias to the scores */
    bool bf16_dots;          /* the forward's Q K^T runs on the kernels' bf16 dot products */
} dma_attn;

/* Work item: (batch, head group, sub-group of at most DMA_HEADS_PER_ITEM heads, query tile). */
typedef struct dma_item {
    int64_t b, group, sub, tile, work;
} dma_item;

/* Rows a view can hold: the forward and the backward merge two tiles into one view
 * (lib/tile_pairs.c). */
#define DMA_VIEW_ROWS (2 * DMA_TILE)

/* What a work item reads: its heads, rows, union and each row's selected positions. */
typedef struct dma_item_view {
    int64_t h0, nh, hkv, r0, nrows, M, slab;
    const int32_t *keys;        /* the union's keys, or NULL for a contiguous union */
    int32_t first, count;       /* the union: keys[0 .. count), or first .. first + count - 1 */
    const uint64_t *bits;       /* row i's bitmask at bits + i * words_per_row, or NULL */
    int64_t words_per_row;
    const float *kbase, *vbase; /* float32 K and V of (b, hkv): key c at base + c * stride[1]
                                 * (NULL for 16-bit storage, which koff/voff address) */
    int64_t koff, voff;         /* element offsets of K and V of (b, hkv) in their tensors */
    int32_t lo[DMA_VIEW_ROWS], hi[DMA_VIEW_ROWS]; /* row i selects positions within [lo, hi) */
} dma_item_view;

/* Key of union position `pos` of a view. */
static inline int32_t dma_view_key(const dma_item_view *iv, int64_t pos)
{
    return iv->keys ? iv->keys[pos] : iv->first + (int32_t)pos;
}

/* Validate the arguments the forward and backward share and fill `a` (no sparsity is made yet).
 * `out_name` names the tensor checked against q's shape ("out"). */
dma_status dma_attn_check(dma_context *ctx, const dma_tensor *q, const dma_tensor *k,
                          const dma_tensor *v, const dma_tensor *bias, const dma_sparsity *sp,
                          const dma_attn_params *params, const dma_tensor *out,
                          const dma_tensor *lse, dma_attn *a);

/* Optional lse (B, Hq, Lq) float32, and finite scale / softcap >= 0: the attention calls
 * shared checks (status and message in ctx). */
dma_status dma_check_lse(dma_context *ctx, const dma_tensor *lse, int64_t B, int64_t Hq,
                         int64_t Lq);
dma_status dma_check_scale(dma_context *ctx, float scale, float softcap);

/* The attention scale a call asked for: 0 means 1/sqrt(D). */
static inline float dma_scale_or_default(float scale, int64_t D)
{
    return scale != 0.0f ? scale : 1.0f / sqrtf((float)D);
}

/* Run the forward's work items of a prepared problem over the context's threads. */
dma_status dma_forward_run(dma_context *ctx, const dma_attn *a);

/* Make the dense/causal sparsity when none was given. Free with dma_attn_release. */
dma_status dma_attn_prepare(dma_context *ctx, dma_attn *a);
void dma_attn_release(dma_attn *a);

/* All work items in natural order (b, group, sub, tile); work = union size. Caller frees. */
dma_status dma_attn_items(dma_context *ctx, const dma_attn *a, dma_item **items,
                          int64_t *nitems);

void dma_item_view_init(const dma_attn *a, const dma_item *it, dma_item_view *iv);

/* Element offset of item row r (r = hh * nrows + i: head h0 + hh, query row r0 + i) in a
 * (B, L, H, D) tensor. */
static inline int64_t dma_item_row_offset(const dma_tensor *t, const dma_item *it,
                                          const dma_item_view *iv, int64_t r)
{
    return it->b * t->stride[0] + (iv->r0 + r % iv->nrows) * t->stride[1] +
           (iv->h0 + r / iv->nrows) * t->stride[2];
}

/* Rows of a (B, L, H, D) tensor (float32, bf16 or f16) for the item's heads and rows into
 * dst[M][ld] (ld >= D) as float32, times `scale`, zero-padded to ld; row r = hh * nrows + i.
 * The _range form loads rows r0 <= r < r1 only (into dst[r]). */
void dma_item_load_rows(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                        const dma_tensor *src, float scale, float *dst, int64_t ld);
void dma_item_load_rows_range(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                              const dma_tensor *src, float scale, float *dst, int64_t ld,
                              int64_t r0, int64_t r1);

/* Ask for the item's rows r0 <= r < r1 (r = hh * nrows + i) of a (B, L, H, D) tensor to be
 * brought into the cache (to be written if `write`): a head's rows are a few lines each, one
 * row stride apart, which the hardware prefetchers do not follow far enough; with one head per
 * item, loading them missed on nearly every line. */
void dma_prefetch_rows(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                       const dma_tensor *t, bool write, int64_t r0, int64_t r1);

/* n rows of a (B, L, H, D) tensor of any storage type (key c is row keys[c], or first + c, at
 * element offset off + key * stride[1]) as float32 rows dst[c * ld ...], zero-padded to ld. */
void dma_gather_rows(const dma_attn *a, const dma_tensor *t, int64_t off, const int32_t *keys,
                     int32_t first, int n, float *dst, int ld);

/* K^T packed into kp and V rows into vp (stride ld) for n keys of the item's kv head, from
 * float32 or 16-bit k and v. */
void dma_pack_kv(const dma_attn *a, const dma_item_view *iv, const int32_t *keys, int32_t first,
                 int n, float *kp, float *vp);

/* ---- pairs of consecutive tiles over their merged union (lib/tile_pairs.c) ---- */

/* Whether items p and q are tiles t, t + 1 (t even) of the same heads. */
bool dma_items_adjacent(const dma_item *p, const dma_item *q);

/* Whether the views of two adjacent items are worth one work item: both select through
 * bitmasks, the pair has at most max_rows rows (heads x tile rows), and the merged union costs
 * at most `growth` times the products of the two tiles apart. *count receives the merged
 * union's size when they pair. */
bool dma_views_pair(const dma_item_view *A, const dma_item_view *B, int64_t max_rows,
                    double growth, int64_t *count);

/* Whether two adjacent views may pair at all: both select through bitmasks and the pair has at
 * most max_rows rows. */
bool dma_views_may_pair(const dma_item_view *A, const dma_item_view *B, int64_t max_rows);

/* Whether a merged union of `count` keys costs at most `growth` times the products of the two
 * tiles apart. */
bool dma_pair_worth(const dma_item_view *A, const dma_item_view *B, int64_t count,
                    double growth);

/* Ints the merge of two tiles of at most tile_keys keys each needs: the merged keys, then how
 * each tile's positions map into them. */
int64_t dma_merge_ints(int64_t tile_keys);

/* The merged union of views A and B into `ints` (dma_merge_ints(max(A.count, B.count))): its
 * size. */
int64_t dma_merge_union(const dma_item_view *A, const dma_item_view *B, int32_t *ints);

/* After dma_merge_union() gave n: the view of tiles A and B together, rows of A then of B, over
 * the merged union; `bits` holds (A.nrows + B.nrows) rows of ceil(n / 64) words. */
void dma_merge_rows(const dma_item_view *A, const dma_item_view *B, int64_t n, int32_t *ints,
                    uint64_t *bits, dma_item_view *out);

/* Both steps: the view of tiles A and B together. `bits` holds (A.nrows + B.nrows) rows of
 * ceil((A.count + B.count) / 64) words. */
void dma_merge_views(const dma_item_view *A, const dma_item_view *B, dma_item_view *out,
                     int32_t *ints, uint64_t *bits);

/* Whether a dtype is one the attention computes on (float32, bf16, f16). */
static inline bool dma_is_float(dma_dtype t)
{
    return t == DMA_F32 || t == DMA_BF16 || t == DMA_F16;
}

/* Whether any row selects a position of chunk [c0, c0 + n). */
bool dma_chunk_active(const dma_item_view *iv, int64_t c0, int64_t n);

/* Columns [ca, cb) of the chunk that item rows rb .. rb+m-1 select (row r is tile row
 * r % nrows of head r / nrows), widened to multiples of `step` (nr, or select_step for the
 * fused kernels); false if none. Inline, as the helpers below: the forward asks for every
 * block of rows of every chunk. */
static inline bool dma_block_cols(const dma_item_view *iv, int64_t rb, int64_t m, int64_t c0,
                                  int64_t n, int64_t step, int64_t *ca, int64_t *cb)
{
    int64_t lo = n, hi = 0, i = rb % iv->nrows;
    for (int64_t r = 0; r < m; r++, i = i + 1 == iv->nrows ? 0 : i + 1) {
        const int64_t s = dma_max64(iv->lo[i], c0) - c0, e = dma_min64(iv->hi[i], c0 + n) - c0;
        if (e > s) {
            lo = s < lo ? s : lo;
            hi = e > hi ? e : hi;
        }
    }
    if (hi <= lo)
        return false;
    *ca = lo / step * step;
    *cb = dma_div_up(hi, step) * step;
    return true;
}

/* A per-key bias (Lb == 1) of head hh over chunk positions [c0, c0 + n), zero up to n_pad. */
void dma_gather_key_bias(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                         int64_t hh, int64_t c0, int64_t n, int64_t n_pad, float *dst);

/* A per-row bias of head hh, row i over chunk positions c0 + [ca, cb), zero past n. */
void dma_gather_row_bias(const dma_attn *a, const dma_item *it, const dma_item_view *iv,
                         int64_t hh, int64_t i, int64_t c0, int64_t ca, int64_t cb, int64_t n,
                         float *dst);

/* Row i's bitmask (or NULL) and its selected span within the block columns c0 + [ca, cb). */
static inline const uint64_t *dma_row_bits(const dma_item_view *iv, int64_t i)
{
    return iv->bits ? iv->bits + i * iv->words_per_row : NULL;
}

static inline void dma_row_span(const dma_item_view *iv, int64_t i, int64_t c0, int64_t ca,
                                int64_t cb, int *lo, int *hi)
{
    int64_t s = dma_max64(iv->lo[i] - c0 - ca, 0), e = dma_min64(iv->hi[i] - c0 - ca, cb - ca);
    *lo = (int)s;
    *hi = (int)(e > s ? e : s);
}

/* The CUDA forward and backward of a validated attention call (dma_attn_check done, no
 * sparsity made yet; lib/device.c). */
dma_status dma_device_forward(dma_context *ctx, dma_attn *a);
dma_status dma_device_backward(dma_context *ctx, dma_attn *a, const dma_tensor *dout,
                               dma_tensor *dq, dma_tensor *dk, dma_tensor *dv,
                               dma_tensor *dbias);

#endif /* DMATTN_INTERNAL_H */

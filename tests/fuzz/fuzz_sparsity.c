/*
 * fuzz_sparsity.c - libFuzzer target: dma_sparsity_build (every kind, causal or not, windows,
 * block sizes, per-key and per-row biases with NaN and infinities, key padding) and
 * dma_sparsity_from_mask, on descriptors that are sometimes hostile. Any status is fine; a crash,
 * a sanitizer report, or a built object that breaks its contract is a finding:
 *   - dma_sparsity_to_dense's count equals dma_sparsity_nnz;
 *   - causal: no row selects a key past its diagonal; no row selects a padded key; TOPK: no
 *     row selects more than `window` keys; TOPK and RELU never select a -inf key, RELU only
 *     keys of bias > 0 (block_size <= 1);
 *   - an error leaves the output pointer alone and sets the context's message;
 *   - dma_sparsity_rebuild into the object the previous input left (any shape and kind) gives
 *     the build's status, and on success the same selection; on error it leaves NULL.
 */
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_input.h"

enum { MAXB = 3, MAXH = 3, MAXL = 70, BUF = 1 << 16 };

static float fbuf[BUF / 4];
static uint8_t bbuf[BUF], dense[MAXB * MAXH * MAXL * MAXL], dense_built[sizeof dense];

static void check_object(const dma_sparsity *sp, const dma_mask_params *mp, int64_t B, int64_t H,
                         int64_t Lq, int64_t Lk, const dma_tensor *bias, const dma_tensor *pad)
{
    /* larger objects (stride-0 masks over many slabs) are only built, not walked */
    const int64_t room = (int64_t)sizeof dense;
    if (B > room || H > room || B * H > room || Lq > room || Lk > room || B * H * Lq * Lk > room)
        return;
    if (dma_sparsity_to_dense(sp, dense, sizeof dense) != DMA_OK)
        abort();
    int64_t count = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < Lq; i++) {
                int64_t row = 0;
                for (int64_t j = 0; j < Lk; j++) {
                    if (!dense[((b * H + h) * Lq + i) * Lk + j])
                        continue;
                    row++;
                    if (mp->causal && j > i + (Lk - Lq))
                        abort(); /* past the diagonal */
                    if (pad) {
                        const uint8_t *pp = pad->data;
                        int64_t pb = pad->shape[0] == 1 ? 0 : b;
                        if (!pp[pb * pad->stride[0] + j * pad->stride[1]])
                            abort(); /* a padded key */
                    }
                    if ((mp->kind == DMA_MASK_TOPK || mp->kind == DMA_MASK_RELU) && bias &&
                        mp->block_size <= 1) {
                        const float *bp = bias->data;
                        int64_t at = (bias->shape[0] == 1 ? 0 : b) * bias->stride[0] +
                                     (bias->shape[1] == 1 ? 0 : h) * bias->stride[1] +
                                     (bias->shape[2] == 1 ? 0 : i) * bias->stride[2] +
                                     j * bias->stride[3];
                        if (bp[at] == -INFINITY)
                            abort(); /* a -inf key */
                        if (mp->kind == DMA_MASK_RELU && !(bp[at] > 0.0f))
                            abort(); /* RELU keeps bias > 0 only */
                    }
                }
                if (mp->kind == DMA_MASK_TOPK && mp->block_size <= 1 && row > mp->window)
                    abort(); /* more than window keys */
                count += row;
            }
    if (count != dma_sparsity_nnz(sp))
        abort();
}

/* Whether a mask's shape asks for a modest object: a stride-0 mask may name billions of rows
 * over a small buffer, and its object is then an honest request for gigabytes, which the
 * sanitizer's allocator aborts on (or libFuzzer's malloc limit reports) instead of the NULL that
 * the library turns into DMA_ERR_NOMEM. Shapes whose size overflows stay in: they must be
 * refused. Rows with no keys still cost a row each, hence max(Lk, 1). */
static bool modest_mask(const dma_tensor *m)
{
    if (m->ndim != 4)
        return true;
    int64_t n = 1;
    for (int d = 0; d < 4; d++) {
        int64_t e = d == 3 && m->shape[d] == 0 ? 1 : m->shape[d];
        if (e < 0 || __builtin_mul_overflow(n, e, &n))
            return true;
    }
    return n <= (int64_t)1 << 20;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size};
    static dma_context *ctx;
    if (!ctx && dma_context_create(&(dma_context_options){.threads = 1}, &ctx) != DMA_OK)
        abort();
    const int64_t B = 1 + fz_below(&in, MAXB), H = 1 + fz_below(&in, MAXH);
    const int64_t Lq = fz_below(&in, MAXL + 1), Lk = fz_below(&in, MAXL + 1);
    dma_mask_params mp = {.kind = (dma_mask_kind)fz_below(&in, 6), .causal = fz_u8(&in) & 1,
                          .window = fz_size(&in, 80), .block_size = fz_size(&in, 9)};
    /* the bias: per key, per row, broadcast, or absent */
    dma_tensor bias = dma_tensor_4d(fbuf, DMA_F32, fz_u8(&in) & 1 ? 1 : B, fz_u8(&in) & 1 ? 1 : H,
                                    fz_u8(&in) & 1 ? Lq : 1, Lk);
    fz_mutate(&in, &bias);
    dma_tensor pad = dma_tensor_2d(bbuf, DMA_BOOL, fz_u8(&in) & 1 ? 1 : B, Lk);
    fz_mutate(&in, &pad);
    const dma_tensor *pbias = fz_u8(&in) % 5 ? &bias : NULL;
    const dma_tensor *ppad = fz_u8(&in) % 3 ? NULL : &pad;
    dma_tensor mask = dma_tensor_4d(bbuf, DMA_BOOL, B, H, Lq, Lk);
    fz_mutate(&in, &mask);
    /* the values: what is left of the input, cycled */
    fz_fill_floats(&in, fbuf, sizeof fbuf / sizeof fbuf[0]);
    fz_fill_bits(&in, bbuf, sizeof bbuf);
    if (fz_fair(pbias, sizeof fbuf) && fz_fair(ppad, sizeof bbuf)) {
        dma_sparsity *sp = NULL;
        dma_status st = dma_sparsity_build(ctx, &mp, B, H, Lq, Lk, pbias, ppad, &sp);
        if (st == DMA_OK) {
            check_object(sp, &mp, B, H, Lq, Lk, pbias, ppad);
            memcpy(dense_built, dense, sizeof dense);
        } else if (sp || !dma_context_last_error(ctx)[0]) {
            abort(); /* an error must leave out alone and say why */
        }
        /* the same into the memory of the object the last input left */
        static dma_sparsity *kept;
        if (dma_sparsity_rebuild(ctx, &mp, B, H, Lq, Lk, pbias, ppad, &kept) != st ||
            (st != DMA_OK) != (kept == NULL))
            abort();
        if (st == DMA_OK) {
            if (dma_sparsity_nnz(kept) != dma_sparsity_nnz(sp))
                abort();
            check_object(kept, &mp, B, H, Lq, Lk, pbias, ppad);
            if (memcmp(dense, dense_built, sizeof dense))
                abort(); /* check_object wrote both selections to dense, or neither */
        }
        dma_sparsity_destroy(sp);
    }
    /* a dense boolean mask */
    if (fz_fair(&mask, sizeof bbuf) && modest_mask(&mask)) {
        dma_sparsity *sp = NULL;
        if (dma_sparsity_from_mask(ctx, &mask, &sp) == DMA_OK) {
            dma_mask_params all = {.kind = DMA_MASK_DENSE};
            check_object(sp, &all, mask.shape[0], mask.shape[1], mask.shape[2], mask.shape[3],
                         NULL, NULL);
            dma_sparsity_destroy(sp);
        }
    }
    return 0;
}

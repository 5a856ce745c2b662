/*
 * fuzz_attention.c - libFuzzer target: dma_forward and dma_backward argument validation, on
 * tensor descriptors that are sometimes hostile (negative, huge or overflowing sizes and strides,
 * wrong dtypes and ranks, NULL data, overlapping outputs), with and without a sparsity object,
 * bias, lse and params, non-finite scale and softcap. Any status is fine; a crash, a sanitizer
 * report, or an error that wrote to an output (every output starts as a sentinel pattern and
 * must keep it when the call fails) is a finding.
 */
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_input.h"

enum { NB = 11, BUF = 1 << 13 }; /* floats per buffer: more than the largest tensor (5120) */
enum { Q, K, V, BIAS, OUT, LSE, DOUT, DQ, DK, DV, DBIAS };
static float buf[NB][BUF];
static const uint32_t SENTINEL = 0x7fc0dead; /* a NaN no computation produces */

static void fill(int which)
{
    for (int i = 0; i < BUF; i++)
        memcpy(&buf[which][i], &SENTINEL, 4);
}

static void expect_untouched(int which)
{
    for (int i = 0; i < BUF; i++)
        if (memcmp(&buf[which][i], &SENTINEL, 4) != 0)
            abort(); /* a failed call wrote an output */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size};
    static dma_context *ctx;
    if (!ctx && dma_context_create(&(dma_context_options){.threads = 1}, &ctx) != DMA_OK)
        abort();
    const int64_t B = 1 + fz_below(&in, 2), Lq = fz_below(&in, 33), Lk = fz_below(&in, 33);
    const int64_t Hkv = 1 + fz_below(&in, 2), Hq = Hkv * (1 + fz_below(&in, 2));
    const int64_t D = 1 + fz_below(&in, 40);
    dma_tensor t[NB];
    t[Q] = dma_tensor_4d(buf[Q], DMA_F32, B, Lq, Hq, D);
    t[K] = dma_tensor_4d(buf[K], DMA_F32, B, Lk, Hkv, D);
    t[V] = dma_tensor_4d(buf[V], DMA_F32, B, Lk, Hkv, D);
    t[BIAS] = dma_tensor_4d(buf[BIAS], DMA_F32, fz_u8(&in) & 1 ? 1 : B,
                            fz_u8(&in) & 1 ? Hkv : Hq, fz_u8(&in) & 1 ? 1 : Lq, Lk);
    t[OUT] = dma_tensor_4d(buf[OUT], DMA_F32, B, Lq, Hq, D);
    t[LSE] = dma_tensor_3d(buf[LSE], DMA_F32, B, Hq, Lq);
    t[DOUT] = t[DQ] = t[OUT];
    t[DOUT].data = buf[DOUT];
    t[DQ].data = buf[DQ];
    t[DK] = t[K];
    t[DK].data = buf[DK];
    t[DV] = t[V];
    t[DV].data = buf[DV];
    t[DBIAS] = t[BIAS];
    t[DBIAS].data = buf[DBIAS];

    /* a sparsity object from the (well-formed) bias, sometimes for another shape: built below */
    const bool with_sp = fz_u8(&in) & 1;
    dma_mask_params mp = {.kind = (dma_mask_kind)fz_below(&in, 4), .causal = fz_u8(&in) & 1,
                          .window = fz_below(&in, 40), .block_size = fz_below(&in, 4)};
    dma_tensor kb = dma_tensor_4d(buf[BIAS], DMA_F32, B, Hkv, 1, Lk + (fz_u8(&in) % 8 == 0));
    dma_sparsity *sp = NULL;
    for (int b = 0; b < NB; b++)
        fz_mutate(&in, &t[b]);
    if (fz_u8(&in) % 16 == 0) /* an output over an input */
        t[OUT + fz_below(&in, 2)].data = buf[fz_below(&in, 4)];
    dma_attn_params params = {.causal = fz_u8(&in) & 1};
    if (fz_u8(&in) % 4 == 0) {
        params.scale = fz_float(&in);
        params.softcap = fz_float(&in);
    }
    const bool with_bias = fz_u8(&in) % 3 != 0, with_lse = fz_u8(&in) % 4 != 0;
    const bool with_params = fz_u8(&in) % 8 != 0;
    for (int b = 0; b < NB; b++)
        if (!fz_fair(&t[b], sizeof buf[b]))
            goto done;
    /* the values: what is left of the input, cycled (each buffer from another offset) */
    for (int b = Q; b <= DOUT; b++) {
        const size_t skip = in.left ? (size_t)b % in.left : 0;
        fuzz_input rest = {in.p + skip, in.left - skip};
        fz_fill_floats(&rest, buf[b], BUF);
    }
    if (with_sp)
        dma_sparsity_build(ctx, &mp, B, Hkv, Lq, kb.shape[3], &kb, NULL, &sp);

    for (int b = OUT; b < NB; b++)
        if (b != DOUT)
            fill(b);
    dma_status st = dma_forward(ctx, &t[Q], &t[K], &t[V], with_bias ? &t[BIAS] : NULL, sp,
                                with_params ? &params : NULL, &t[OUT], with_lse ? &t[LSE] : NULL);
    if (st != DMA_OK) {
        expect_untouched(OUT);
        expect_untouched(LSE);
        if (!dma_context_last_error(ctx)[0])
            abort();
        goto done;
    }
    st = dma_backward(ctx, &t[Q], &t[K], &t[V], with_bias ? &t[BIAS] : NULL, sp,
                      with_params ? &params : NULL, &t[OUT], with_lse ? &t[LSE] : NULL, &t[DOUT],
                      &t[DQ], &t[DK], &t[DV], with_bias && fz_u8(&in) & 1 ? &t[DBIAS] : NULL);
    if (st != DMA_OK)
        for (int b = DQ; b < NB; b++)
            expect_untouched(b);
done:
    dma_sparsity_destroy(sp);
    return 0;
}

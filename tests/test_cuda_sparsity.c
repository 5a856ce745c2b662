/*
 * test_cuda_sparsity.c - the CUDA context's sparsity objects against the CPU context's (same
 * shape, same nnz, the same dense selection), fixed seeds:
 *   - the GPU builder (causal top-k over a per-key bias) at every length and window, with ties,
 *     -inf entries, key padding, biases that rise or fall along the keys, a long key axis, ties
 *     over the selection's candidate limit, and runs split where S is first full, also built on
 *     a non-blocking stream;
 *   - what the library builds on the host for a CUDA context (other kinds, per-row biases,
 *     blocks, a window above the GPU builder's), and dma_sparsity_from_mask on device masks;
 *   - the builders' errors: a NaN or +inf bias, no query rows, host memory given to a CUDA
 *     context, and argument errors (the CPU's status on both).
 *   - dma_sparsity_rebuild through a chain of shapes and kinds, between host and GPU objects,
 *     and its failures (the old object freed, NULL left).
 * Registered into test_cuda.c's suite by cuda_sparsity_add_tests (test_cuda.h).
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "reference.h"
#include "test_cuda.h"

#if DMATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

typedef struct scase {
    dma_mask_kind kind;
    int causal;
    int64_t window, block;
    int64_t B, H, Lq, Lk;
    int64_t Bb, Hb, Lb; /* builder bias (Bb, Hb, Lb, Lk); Bb == 0: none */
    int quant;          /* bias values are small integers: many ties */
    int ramp;           /* +1 / -1: the bias rises / falls along the keys, on top of the noise
                           (nearly every key enters / few enter after the first w) */
    double neginf;      /* probability of a -inf bias entry */
    int64_t Bp;         /* key padding (Bp, Lk); 0: none */
    uint64_t seed;
} scase;

static const char *sdesc(const scase *c)
{
    static char buf[512];
    static const char *kinds[] = {"topk", "relu", "window", "dense"};
    snprintf(buf, sizeof buf, "{kind=%s causal=%d window=%lld block=%lld B=%lld H=%lld Lq=%lld "
             "Lk=%lld bias=(%lld,%lld,%lld) quant=%d ramp=%d neginf=%.2f Bp=%lld seed=%llu}",
             kinds[c->kind], c->causal, (long long)c->window, (long long)c->block,
             (long long)c->B, (long long)c->H, (long long)c->Lq, (long long)c->Lk,
             (long long)c->Bb, (long long)c->Hb, (long long)c->Lb, c->quant, c->ramp, c->neginf,
             (long long)c->Bp, (unsigned long long)c->seed);
    return buf;
}

/* Same shape, same nnz, the same dense selection. */
static void sparsity_same(const dma_sparsity *sc, const dma_sparsity *sg, const char *desc)
{
    int64_t a[4], g[4];
    dma_sparsity_shape(sc, &a[0], &a[1], &a[2], &a[3]);
    dma_sparsity_shape(sg, &g[0], &g[1], &g[2], &g[3]);
    for (int d = 0; d < 4; d++)
        REQUIRE(a[d] == g[d], "object shape[%d]: GPU %lld, CPU %lld %s", d, (long long)g[d],
                (long long)a[d], desc);
    size_t n, m;
    uint8_t *dc = sp_dense(sc, &n), *dg = sp_dense(sg, &m);
    if (memcmp(dc, dg, n) != 0) {
        size_t first = 0, diff = 0;
        for (size_t x = n; x-- > 0;)
            if (dc[x] != dg[x])
                first = x, diff++;
        const size_t Lk = (size_t)a[3], Lq = (size_t)a[2], H = (size_t)a[1];
        ck_abort_msg("selection differs at %zu entries; first (b %zu, h %zu, i %zu, j %zu): "
                     "GPU %d, CPU %d %s", diff, first / Lk / Lq / H, first / Lk / Lq % H,
                     first / Lk % Lq, first % Lk, dg[first], dc[first], desc);
    }
    REQUIRE(dma_sparsity_nnz(sc) == dma_sparsity_nnz(sg), "nnz: GPU %lld, CPU %lld %s",
            (long long)dma_sparsity_nnz(sg), (long long)dma_sparsity_nnz(sc), desc);
    REQUIRE(dma_sparsity_nnz(sc) == ref_popcount(dc, (int64_t)n), "CPU nnz %s", desc);
    free(dc);
    free(dg);
}

static void run_scase(dma_context *cpu, dma_context *gpu, const scase *c)
{
    test_rng r = rng_make(c->seed);
    tbuf bias, pad;
    if (c->Bb) {
        const int64_t shape[4] = {c->Bb, c->Hb, c->Lb, c->Lk};
        tb_make(&bias, DMA_F32, 4, shape, 0);
        float *v = test_malloc((size_t)tb_count(&bias) * sizeof(float));
        for (int64_t x = 0; x < tb_count(&bias); x++) {
            v[x] = rng_bernoulli(&r, c->neginf) ? -INFINITY
                   : c->quant                   ? (float)rng_int(&r, -2, 2)
                                                : rng_float(&r, -1.0f, 1.0f);
            /* the ramp moves the bias by 4 (2-4x the noise) over 1000 keys */
            v[x] += (float)c->ramp * 4.0f * (float)(x % c->Lk) / 1000.0f;
        }
        tb_store(&bias, v);
        free(v);
    }
    if (c->Bp) {
        const int64_t shape[2] = {c->Bp, c->Lk};
        tb_make(&pad, DMA_BOOL, 2, shape, 0);
        float *v = test_malloc((size_t)tb_count(&pad) * sizeof(float) + 4);
        for (int64_t x = 0; x < tb_count(&pad); x++)
            v[x] = (float)!rng_bernoulli(&r, 0.15);
        tb_store(&pad, v);
        free(v);
    }
    dma_mask_params mp = {.kind = c->kind, .causal = c->causal, .window = c->window,
                          .block_size = c->block};
    dma_sparsity *sc = NULL, *sg = NULL;
    dma_status st = dma_sparsity_build(cpu, &mp, c->B, c->H, c->Lq, c->Lk,
                                       c->Bb ? &bias.th : NULL, c->Bp ? &pad.th : NULL, &sc);
    ck_assert_msg(st == DMA_OK, "CPU build: %s (%s) %s", dma_status_string(st),
                  dma_context_last_error(cpu), sdesc(c));
    st = dma_sparsity_build(gpu, &mp, c->B, c->H, c->Lq, c->Lk, c->Bb ? &bias.td : NULL,
                            c->Bp ? &pad.td : NULL, &sg);
    ck_assert_msg(st == DMA_OK, "GPU build: %s (%s) %s", dma_status_string(st),
                  dma_context_last_error(gpu), sdesc(c));
    sparsity_same(sc, sg, sdesc(c));
    dma_sparsity_destroy(sc);
    dma_sparsity_destroy(sg);
    if (c->Bb)
        tb_free(&bias);
    if (c->Bp)
        tb_free(&pad);
}

/* B 1-2 and H 1-3 while B * H * Lq * Lk stays small enough for the dense comparison. */
static void random_bh(test_rng *r, scase *c)
{
    c->B = rng_int(r, 1, 2);
    c->H = rng_int(r, 1, 3);
    while ((double)c->B * c->H * c->Lq * c->Lk > 4e7 && c->B * c->H > 1) {
        if (c->H > 1)
            c->H--;
        else
            c->B--;
    }
}

START_TEST(sparsity_topk_causal)
{
    /* the GPU builder: causal top-k over a per-key bias, every length and window */
    static const int64_t lens[][2] = {{1, 1}, {1, 64}, {64, 1}, {37, 37}, {63, 63}, {64, 64},
                                      {65, 200}, {200, 65}, {129, 1000}, {1000, 129},
                                      {1000, 1000}, {300, 4097}, {4097, 300}, {4097, 4097}};
    static const int64_t windows[] = {0, 1, 7, 64, 256, 1000, -1, -2}; /* -1: Lk, -2: Lk + 5 */
    static const double neginfs[] = {0.0, 0.0, 0.05, 0.6};
    dma_context *cpu = cpu_ctx(), *gpu = cuda_ctx(NULL);
    test_rng r = rng_make(101);
    for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++)
        for (size_t w = 0; w < sizeof windows / sizeof windows[0]; w++) {
            scase c = {.kind = DMA_MASK_TOPK, .causal = 1, .Lq = lens[l][0], .Lk = lens[l][1],
                       .Lb = 1, .seed = rng_u64(&r)};
            c.window = windows[w] == -1 ? c.Lk : windows[w] == -2 ? c.Lk + 5 : windows[w];
            random_bh(&r, &c);
            c.Bb = rng_int(&r, 0, 1) ? c.B : 1;
            c.Hb = rng_int(&r, 0, 1) ? c.H : 1;
            c.quant = (int)rng_int(&r, 0, 1);
            c.neginf = neginfs[rng_int(&r, 0, 3)];
            const int64_t pads[] = {0, 0, 1, c.B};
            c.Bp = rng_pick(&r, pads, 4);
            run_scase(cpu, gpu, &c);
        }
    /* Biases that rise or fall along the keys, and a long key axis (70000 keys: a deeper
     * tree; the last 300 rows only, for the dense comparison). */
    static const int64_t ramp_lens[][2] = {{4097, 4097}, {300, 70000}};
    static const int64_t ramp_windows[] = {64, 1000, 5000};
    for (size_t l = 0; l < 2; l++)
        for (size_t w = 0; w < sizeof ramp_windows / sizeof ramp_windows[0]; w++)
            for (int ramp = -1; ramp <= 1; ramp++) {
                scase c = {.kind = DMA_MASK_TOPK, .causal = 1, .window = ramp_windows[w], .B = 1,
                           .H = 1, .Lq = ramp_lens[l][0], .Lk = ramp_lens[l][1], .Bb = 1, .Hb = 1,
                           .Lb = 1, .ramp = ramp, .seed = rng_u64(&r)};
                c.quant = (int)rng_int(&r, 0, 1);
                c.neginf = rng_bernoulli(&r, 0.3) ? 0.05 : 0.0;
                c.Bp = rng_int(&r, 0, 1);
                run_scase(cpu, gpu, &c);
            }
    /* Ties over the selection's candidate limit: about 1600 keys share the largest of five
     * bias values, so theta's histogram bin is narrowed by key over the prefix first. */
    for (int64_t w = 256; w <= 2048; w *= 8) {
        scase ties = {.kind = DMA_MASK_TOPK, .causal = 1, .window = w, .B = 1, .H = 2,
                      .Lq = 300, .Lk = 8192, .Bb = 1, .Hb = 2, .Lb = 1, .quant = 1,
                      .seed = rng_u64(&r)};
        run_scase(cpu, gpu, &ties);
    }
    /* Runs split in halves where S is first full (the blocks a wave leaves over): 8192 rows
     * of two slabs, with rising, flat and falling biases. Each is built a second time on a
     * context whose stream is non-blocking: a build returns once its blocks have checked the
     * bias and counted the object, before the tiles are written, and the object is complete
     * where its stream passes the build. Read on the host at once (dma_sparsity_to_dense
     * copies on the legacy stream, which a non-blocking one does not order with), it must be
     * whole: to_dense waits for it. */
    cudaStream_t ns;
    ck_assert_int_eq(cudaStreamCreateWithFlags(&ns, cudaStreamNonBlocking), cudaSuccess);
    dma_context *gpu2 = cuda_ctx((void *)ns);
    for (int ramp = -1; ramp <= 1; ramp++) {
        scase split = {.kind = DMA_MASK_TOPK, .causal = 1, .window = 1024, .B = 1, .H = 2,
                       .Lq = 8192, .Lk = 8192, .Bb = 1, .Hb = 2, .Lb = 1, .ramp = ramp,
                       .seed = rng_u64(&r)};
        run_scase(cpu, gpu, &split);
        run_scase(cpu, gpu2, &split);
    }
    dma_context_destroy(gpu2);
    ck_assert_int_eq(cudaStreamDestroy(ns), cudaSuccess);
    dma_context_destroy(cpu);
    dma_context_destroy(gpu);
}
END_TEST

START_TEST(sparsity_other_kinds)
{
    /* what the library builds on the host for a CUDA context: still the same object */
    static const int64_t lens[][2] = {{1, 1}, {37, 100}, {100, 37}, {64, 64}, {200, 200},
                                      {1000, 129}};
    typedef struct { dma_mask_kind kind; int causal; int64_t window, block; int per_row; } var;
    static const var vars[] = {
        {DMA_MASK_TOPK, 0, 7, 0, 0},    {DMA_MASK_TOPK, 0, 64, 0, 0},
        {DMA_MASK_TOPK, 1, 7, 0, 1},    {DMA_MASK_TOPK, 0, 64, 0, 1},
        {DMA_MASK_TOPK, 1, 7, 4, 0},    {DMA_MASK_TOPK, 1, 64, 4, 1},
        {DMA_MASK_RELU, 1, 0, 0, 0},    {DMA_MASK_RELU, 0, 0, 0, 1},
        {DMA_MASK_RELU, 1, 0, 4, 0},    {DMA_MASK_WINDOW, 1, 1, 0, 0},
        {DMA_MASK_WINDOW, 0, 7, 0, 0},  {DMA_MASK_WINDOW, 1, 64, 4, 0},
        {DMA_MASK_WINDOW, 1, 1000, 0, 0}, {DMA_MASK_DENSE, 1, 0, 0, 0},
        {DMA_MASK_DENSE, 0, 0, 0, 0},   {DMA_MASK_DENSE, 1, 0, 4, 0},
    };
    dma_context *cpu = cpu_ctx(), *gpu = cuda_ctx(NULL);
    test_rng r = rng_make(102);
    for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++)
        for (size_t v = 0; v < sizeof vars / sizeof vars[0]; v++) {
            scase c = {.kind = vars[v].kind, .causal = vars[v].causal,
                       .window = vars[v].window, .block = vars[v].block, .Lq = lens[l][0],
                       .Lk = lens[l][1], .seed = rng_u64(&r)};
            random_bh(&r, &c);
            if (c.kind == DMA_MASK_TOPK || c.kind == DMA_MASK_RELU || rng_bernoulli(&r, 0.5)) {
                c.Bb = rng_int(&r, 0, 1) ? c.B : 1;
                c.Hb = rng_int(&r, 0, 1) ? c.H : 1;
                c.Lb = vars[v].per_row ? c.Lq : 1;
            }
            c.quant = (int)rng_int(&r, 0, 1);
            c.neginf = rng_bernoulli(&r, 0.3) ? 0.1 : 0.0;
            const int64_t pads[] = {0, 0, 1, c.B};
            c.Bp = rng_pick(&r, pads, 4);
            run_scase(cpu, gpu, &c);
        }
    /* a window above what the GPU builder takes (built on the host) */
    scase big = {.kind = DMA_MASK_TOPK, .causal = 1, .window = 4500, .B = 1, .H = 1, .Lq = 5000,
                 .Lk = 5000, .Bb = 1, .Hb = 1, .Lb = 1, .quant = 1, .Bp = 1, .seed = 7};
    run_scase(cpu, gpu, &big);
    dma_context_destroy(cpu);
    dma_context_destroy(gpu);
}
END_TEST

START_TEST(sparsity_from_mask)
{
    static const int64_t shapes[][4] = {{1, 1, 1, 1}, {2, 3, 37, 100}, {1, 2, 100, 37},
                                        {2, 1, 64, 64}, {1, 1, 300, 1000}};
    static const double densities[] = {0.0, 0.03, 0.5, 1.0};
    dma_context *cpu = cpu_ctx(), *gpu = cuda_ctx(NULL);
    test_rng r = rng_make(103);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int dn = 0; dn < 4; dn++)
            for (int bcast = 0; bcast < 2; bcast++) {
                tbuf m; /* bytes 0..3: any nonzero byte is true */
                tb_make(&m, DMA_BOOL, 4, shapes[s], 0);
                for (int64_t x = 0; x < tb_count(&m); x++)
                    m.host[x] = rng_bernoulli(&r, densities[dn]) ? (uint8_t)rng_int(&r, 1, 3) : 0;
                tb_upload(&m);
                if (bcast) { /* dims 0 and 1 of stride 0: (B, H) = (2, 3) views of plane 0 */
                    m.th.shape[0] = m.td.shape[0] = 2;
                    m.th.shape[1] = m.td.shape[1] = 3;
                    m.th.stride[0] = m.td.stride[0] = 0;
                    m.th.stride[1] = m.td.stride[1] = 0;
                }
                dma_sparsity *sc = NULL, *sg = NULL;
                ck_assert_int_eq(dma_sparsity_from_mask(cpu, &m.th, &sc), DMA_OK);
                dma_status st = dma_sparsity_from_mask(gpu, &m.td, &sg);
                ck_assert_msg(st == DMA_OK, "GPU from_mask: %s (%s)", dma_status_string(st),
                              dma_context_last_error(gpu));
                char desc[128];
                snprintf(desc, sizeof desc, "{from_mask shape %zu density %.2f bcast %d}", s,
                         densities[dn], bcast);
                sparsity_same(sc, sg, desc);
                dma_sparsity_destroy(sc);
                dma_sparsity_destroy(sg);
                tb_free(&m);
            }
    dma_context_destroy(cpu);
    dma_context_destroy(gpu);
}
END_TEST

START_TEST(sparsity_errors)
{
    dma_context *cpu = cpu_ctx(), *gpu = cuda_ctx(NULL);
    const int64_t Lk = 1000, shape[4] = {2, 2, 1, Lk}, rshape[4] = {1, 2, 50, Lk};
    tbuf bias, rbias, pad, mask;
    tb_make(&bias, DMA_F32, 4, shape, 0);
    tb_make(&rbias, DMA_F32, 4, rshape, 0);
    const int64_t pshape[2] = {2, Lk}, mshape[4] = {1, 1, 50, Lk};
    tb_make(&pad, DMA_BOOL, 2, pshape, 0);
    tb_make(&mask, DMA_BOOL, 4, mshape, 0);
    test_rng r = rng_make(104);
    float *v = test_malloc((size_t)tb_count(&rbias) * sizeof(float));
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = 64};
    dma_sparsity *sp = NULL;
    /* a NaN or +inf anywhere in the bias: DMA_ERR_BAD_VALUE from the GPU builder and the host */
    const int64_t at[] = {0, Lk - 1, Lk, 2 * Lk + 517, 4 * Lk - 1};
    for (int bad = 0; bad < 2; bad++)
        for (size_t a = 0; a < sizeof at / sizeof at[0]; a++)
            for (int row = 0; row < 2; row++) {
                tbuf *b = row ? &rbias : &bias;
                for (int64_t x = 0; x < tb_count(b); x++)
                    v[x] = rng_float(&r, -1.0f, 1.0f);
                v[at[a] % tb_count(b)] = bad ? INFINITY : NAN;
                tb_store(b, v);
                for (int g = 0; g < 2; g++) { /* per-key (2, 2, 1, Lk) or per-row (1, 2, 50, Lk) */
                    dma_status st = dma_sparsity_build(g ? gpu : cpu, &mp, row ? 1 : 2, 2,
                                                       row ? 50 : 300, Lk,
                                                       g ? &b->td : &b->th, NULL, &sp);
                    ck_assert_msg(st == DMA_ERR_BAD_VALUE, "%s: %s bias at %lld, per-row %d: %s",
                                  g ? "GPU" : "CPU", bad ? "+inf" : "NaN", (long long)at[a], row,
                                  dma_status_string(st));
                    ck_assert_ptr_null(sp);
                }
            }
    /* no query rows (one block a slab that only checks the bias): the same status as the host,
     * and an empty object for a clean bias */
    for (int bad = 0; bad < 2; bad++) {
        for (int64_t x = 0; x < tb_count(&bias); x++)
            v[x] = rng_float(&r, -1.0f, 1.0f);
        if (bad)
            v[2 * Lk + 517] = NAN;
        tb_store(&bias, v);
        for (int g = 0; g < 2; g++) {
            dma_status st = dma_sparsity_build(g ? gpu : cpu, &mp, 2, 2, 0, Lk,
                                               g ? &bias.td : &bias.th, NULL, &sp);
            ck_assert_msg(st == (bad ? DMA_ERR_BAD_VALUE : DMA_OK), "%s, Lq 0, NaN %d: %s",
                          g ? "GPU" : "CPU", bad, dma_status_string(st));
            if (!bad) {
                ck_assert_int_eq(dma_sparsity_nnz(sp), 0);
                dma_sparsity_destroy(sp);
                sp = NULL;
            }
        }
    }
    /* host memory given to a CUDA context */
    ck_assert_int_eq(dma_sparsity_build(gpu, &mp, 2, 2, 300, Lk, &bias.th, NULL, &sp),
                     DMA_ERR_DEVICE);
    ck_assert_str_ne(dma_context_last_error(gpu), "");
    ck_assert_int_eq(dma_sparsity_build(gpu, &mp, 2, 2, 300, Lk, &bias.td, &pad.th, &sp),
                     DMA_ERR_DEVICE);
    ck_assert_int_eq(dma_sparsity_from_mask(gpu, &mask.th, &sp), DMA_ERR_DEVICE);
    ck_assert_ptr_null(sp);
    /* argument errors: the CPU's status, on both */
    struct { dma_mask_params p; int64_t B, H; int dtype_bf16, null_out; dma_status want; } errs[] = {
        {{DMA_MASK_TOPK, 1, -1, 0}, 2, 2, 0, 0, DMA_ERR_WINDOW},
        {{DMA_MASK_TOPK, 1, 64, -2}, 2, 2, 0, 0, DMA_ERR_WINDOW},
        {{(dma_mask_kind)9, 1, 64, 0}, 2, 2, 0, 0, DMA_ERR_ARG},
        {{DMA_MASK_TOPK, 1, 64, 0}, 2, 3, 0, 0, DMA_ERR_SHAPE},
        {{DMA_MASK_TOPK, 1, 64, 0}, 1, 2, 0, 0, DMA_ERR_SHAPE},
        {{DMA_MASK_TOPK, 1, 64, 0}, 2, 2, 1, 0, DMA_ERR_DTYPE},
        {{DMA_MASK_TOPK, 1, 64, 0}, 2, 2, 0, 1, DMA_ERR_NULL},
    };
    for (size_t e = 0; e < sizeof errs / sizeof errs[0]; e++)
        for (int g = 0; g < 2; g++) {
            dma_tensor t = g ? bias.td : bias.th;
            if (errs[e].dtype_bf16)
                t.dtype = DMA_BF16;
            dma_status st = dma_sparsity_build(g ? gpu : cpu, &errs[e].p, errs[e].B, errs[e].H,
                                               300, Lk, &t, NULL, errs[e].null_out ? NULL : &sp);
            ck_assert_msg(st == errs[e].want, "%s: error case %zu: %s, expected %s",
                          g ? "GPU" : "CPU", e, dma_status_string(st),
                          dma_status_string(errs[e].want));
            ck_assert_ptr_null(sp);
        }
    free(v);
    tb_free(&bias);
    tb_free(&rbias);
    tb_free(&pad);
    tb_free(&mask);
    dma_context_destroy(cpu);
    dma_context_destroy(gpu);
}
END_TEST

START_TEST(sparsity_rebuild)
{
    /* dma_sparsity_rebuild with a CUDA context: into the GPU object the last step left (other
     * shapes and kinds), into a host object, and a host context's rebuild into a GPU object;
     * each result has the CPU build's selection. A failed rebuild frees the object and leaves
     * NULL (a leak or a double free would show under compute-sanitizer or as a crash). */
    dma_context *cpu = cpu_ctx(), *gpu = cuda_ctx(NULL);
    static const struct { dma_mask_kind kind; int64_t B, H, Lq, Lk, window; } steps[] = {
        {DMA_MASK_TOPK, 1, 2, 300, 300, 64},   {DMA_MASK_TOPK, 2, 1, 1000, 1000, 200},
        {DMA_MASK_WINDOW, 1, 2, 100, 37, 16},  {DMA_MASK_TOPK, 2, 2, 500, 500, 500},
        {DMA_MASK_TOPK, 1, 1, 64, 64, 8},      {DMA_MASK_RELU, 1, 2, 200, 200, 0},
    };
    enum { NSTEPS = sizeof steps / sizeof steps[0] };
    test_rng r = rng_make(105);
    dma_sparsity *sg = NULL; /* rebuilt by the GPU context step after step */
    for (int k = 0; k < NSTEPS + 2; k++) {
        const int i = k % NSTEPS;
        const int64_t B = steps[i].B, H = steps[i].H, Lq = steps[i].Lq, Lk = steps[i].Lk;
        const int64_t shape[4] = {B, H, steps[i].kind == DMA_MASK_RELU ? Lq : 1, Lk};
        tbuf bias;
        tb_make(&bias, DMA_F32, 4, shape, 0);
        float *v = test_malloc((size_t)tb_count(&bias) * sizeof(float));
        for (int64_t x = 0; x < tb_count(&bias); x++)
            v[x] = rng_float(&r, -1.0f, 1.0f);
        tb_store(&bias, v);
        const dma_mask_params mp = {.kind = steps[i].kind, .causal = 1, .window = steps[i].window};
        const dma_tensor *bh = steps[i].kind == DMA_MASK_WINDOW ? NULL : &bias.th;
        const dma_tensor *bd = steps[i].kind == DMA_MASK_WINDOW ? NULL : &bias.td;
        char desc[128];
        snprintf(desc, sizeof desc, "(step %d: kind %d B %lld H %lld Lq %lld Lk %lld w %lld)", k,
                 (int)mp.kind, (long long)B, (long long)H, (long long)Lq, (long long)Lk,
                 (long long)mp.window);
        dma_sparsity *sc = NULL;
        ck_assert_int_eq(dma_sparsity_build(cpu, &mp, B, H, Lq, Lk, bh, NULL, &sc), DMA_OK);
        dma_status st = dma_sparsity_rebuild(gpu, &mp, B, H, Lq, Lk, bd, NULL, &sg);
        ck_assert_msg(st == DMA_OK && sg, "GPU rebuild: %s (%s) %s", dma_status_string(st),
                      dma_context_last_error(gpu), desc);
        sparsity_same(sc, sg, desc);
        /* a host object (another kind and shape) into a GPU rebuild, then that GPU object
         * into a host rebuild */
        const dma_mask_params other = {.kind = DMA_MASK_WINDOW, .causal = 1, .window = 3};
        dma_sparsity *sx = NULL;
        ck_assert_int_eq(dma_sparsity_build(cpu, &other, 1, 1, 7, 9, NULL, NULL, &sx), DMA_OK);
        ck_assert_int_eq(dma_sparsity_rebuild(gpu, &mp, B, H, Lq, Lk, bd, NULL, &sx), DMA_OK);
        sparsity_same(sc, sx, desc);
        ck_assert_int_eq(dma_sparsity_rebuild(cpu, &mp, B, H, Lq, Lk, bh, NULL, &sx), DMA_OK);
        sparsity_same(sc, sx, desc);
        dma_sparsity_destroy(sx);
        dma_sparsity_destroy(sc);
        if (k == NSTEPS) { /* failures: host memory given to the GPU, a NaN in the bias */
            ck_assert_int_eq(dma_sparsity_rebuild(gpu, &mp, B, H, Lq, Lk, bh, NULL, &sg),
                             DMA_ERR_DEVICE);
            ck_assert_ptr_null(sg);
            ck_assert_int_eq(dma_sparsity_rebuild(gpu, &mp, B, H, Lq, Lk, bd, NULL, &sg), DMA_OK);
            v[tb_count(&bias) / 2] = NAN;
            tb_store(&bias, v);
            ck_assert_int_eq(dma_sparsity_rebuild(gpu, &mp, B, H, Lq, Lk, bd, NULL, &sg),
                             DMA_ERR_BAD_VALUE);
            ck_assert_ptr_null(sg);
        }
        free(v);
        tb_free(&bias);
    }
    dma_sparsity_destroy(sg);
    dma_context_destroy(cpu);
    dma_context_destroy(gpu);
}
END_TEST

void cuda_sparsity_add_tests(TCase *tc)
{
    tcase_add_test(tc, sparsity_topk_causal);
    tcase_add_test(tc, sparsity_other_kinds);
    tcase_add_test(tc, sparsity_from_mask);
    tcase_add_test(tc, sparsity_errors);
    tcase_add_test(tc, sparsity_rebuild);
}

#else
typedef int test_cuda_sparsity_needs_cuda; /* no CUDA runtime: nothing here (ISO C wants a decl) */
#endif /* DMATTN_HAVE_CUDA */

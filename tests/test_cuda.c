/*
 * test_cuda.c - the CUDA backend against the CPU implementation of the same library.
 *
 * Without a usable GPU (dma_cuda_device_count() == 0: no backend in this build, no driver or no
 * device) the suite prints one line and only checks that a CUDA context is refused with
 * DMA_ERR_DEVICE. With one, every CUDA call is compared with the same call on a CPU context,
 * tensors copied with cudaMemcpy:
 *   - here: the sparsity builders (dense selections identical, nnz equal), their errors, objects
 *     and memory on the wrong side, and the argument errors of the forward and the backward
 *     (same status on both sides, nothing written);
 *   - test_cuda_grid.c: the forward (float32, bf16, f16) and the backward (float32, bf16) on a
 *     grid of shapes, with the tolerances of dmattn.h's documented exceptions.
 * Fixed seeds; DMATTN_TEST_VERBOSE=1 prints the worst error / tolerance of each check.
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
#endif

/* The suite's one check without a GPU: a CUDA context is refused, and the output untouched. */
START_TEST(cuda_context_refused)
{
    ck_assert_int_eq(dma_cuda_device_count(), 0);
    dma_context_options o;
    memset(&o, 0, sizeof o);
    o.device = DMA_DEVICE_CUDA;
    dma_context *ctx = (dma_context *)&o; /* any non-NULL value: must stay as it is */
    ck_assert_int_eq(dma_context_create(&o, &ctx), DMA_ERR_DEVICE);
    ck_assert_ptr_eq(ctx, (dma_context *)&o);
    o.cuda_device = 1;
    ck_assert_int_eq(dma_context_create(&o, &ctx), DMA_ERR_DEVICE);
    ck_assert_ptr_eq(ctx, (dma_context *)&o);
}
END_TEST

#if DMATTN_HAVE_CUDA

/* ------------------------------------------------------------------------------------------ */
/* Helpers (test_cuda.h)                                                                      */
/* ------------------------------------------------------------------------------------------ */

#define CU(call)                                                                              \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        REQUIRE(e_ == cudaSuccess, "%s: %s", #call, cudaGetErrorString(e_));                  \
    } while (0)

void *dev_alloc(size_t bytes)
{
    void *p = NULL;
    CU(cudaMalloc(&p, bytes < 256 ? 256 : bytes));
    return p;
}

void dev_free(void *p)
{
    if (p)
        CU(cudaFree(p));
}

void dev_put(void *dev, const void *host, size_t bytes)
{
    if (bytes)
        CU(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice));
}

void dev_get(void *host, const void *dev, size_t bytes)
{
    if (bytes)
        CU(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost));
}

dma_context *cuda_ctx(void *stream)
{
    dma_context_options o;
    memset(&o, 0, sizeof o);
    o.device = DMA_DEVICE_CUDA;
    o.cuda_stream = stream;
    dma_context *ctx = NULL;
    dma_status st = dma_context_create(&o, &ctx);
    ck_assert_msg(st == DMA_OK && ctx, "CUDA context: %s", dma_status_string(st));
    ck_assert_int_eq(dma_context_device(ctx), DMA_DEVICE_CUDA);
    return ctx;
}

dma_context *cpu_ctx(void)
{
    dma_context *ctx = NULL;
    dma_status st = dma_context_create(NULL, &ctx);
    ck_assert_msg(st == DMA_OK && ctx, "CPU context: %s", dma_status_string(st));
    ck_assert_int_eq(dma_context_device(ctx), DMA_DEVICE_CPU);
    return ctx;
}

void tb_make(tbuf *b, dma_dtype dt, int ndim, const int64_t *shape, int64_t pad)
{
    memset(b, 0, sizeof *b);
    b->dt = dt;
    b->ndim = ndim;
    b->pad = pad;
    b->inner = shape[ndim - 1];
    b->rows = 1;
    for (int d = 0; d < ndim - 1; d++)
        b->rows *= shape[d];
    b->esize = dt == DMA_F32 ? 4 : dt == DMA_BOOL ? 1 : 2;
    b->bytes = (size_t)(b->rows * (b->inner + pad)) * b->esize;
    b->host = test_malloc(b->bytes);
    b->back = test_malloc(b->bytes);
    b->dev = dev_alloc(b->bytes);
    b->th.data = b->host;
    b->th.dtype = dt;
    b->th.ndim = ndim;
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        b->th.shape[d] = shape[d];
        b->th.stride[d] = stride;
        stride *= d == ndim - 1 ? shape[d] + pad : shape[d];
    }
    b->td = b->th;
    b->td.data = b->dev;
    fill_sentinel(b->host, b->bytes);
    tb_reset(b);
}

void tb_free(tbuf *b)
{
    free(b->host);
    free(b->back);
    dev_free(b->dev);
    memset(b, 0, sizeof *b);
}

int64_t tb_count(const tbuf *b) { return b->rows * b->inner; }

static size_t tb_off(const tbuf *b, int64_t x)
{
    return (size_t)((x / b->inner) * (b->inner + b->pad) + x % b->inner) * b->esize;
}

void tb_store(tbuf *b, float *vals)
{
    for (int64_t x = 0; x < tb_count(b); x++) {
        unsigned char *p = b->host + tb_off(b, x);
        if (b->dt == DMA_F32) {
            memcpy(p, &vals[x], 4);
        } else if (b->dt == DMA_BOOL) {
            *p = vals[x] != 0.0f;
            vals[x] = *p;
        } else {
            uint16_t h = b->dt == DMA_BF16 ? test_to_bf16(vals[x]) : test_to_f16(vals[x]);
            memcpy(p, &h, 2);
            vals[x] = test_from_half(h, b->dt);
        }
    }
    tb_upload(b);
}

void tb_upload(tbuf *b) { dev_put(b->dev, b->host, b->bytes); }

void tb_download(tbuf *b) { dev_get(b->back, b->dev, b->bytes); }

void tb_reset(tbuf *b)
{
    fill_sentinel(b->back, b->bytes);
    dev_put(b->dev, b->back, b->bytes);
}

float tb_at(const tbuf *b, const unsigned char *img, int64_t x)
{
    const unsigned char *p = img + tb_off(b, x);
    if (b->dt == DMA_F32) {
        float f;
        memcpy(&f, p, 4);
        return f;
    }
    if (b->dt == DMA_BOOL)
        return *p;
    uint16_t h;
    memcpy(&h, p, 2);
    return test_from_half(h, b->dt);
}

int tb_gaps_untouched(const tbuf *b, const unsigned char *img)
{
    if (b->pad == 0)
        return 1;
    unsigned char *pat = test_malloc(b->bytes);
    fill_sentinel(pat, b->bytes);
    int ok = 1;
    for (int64_t r = 0; r < b->rows && ok; r++) {
        size_t off = (size_t)(r * (b->inner + b->pad) + b->inner) * b->esize;
        ok = memcmp(img + off, pat + off, (size_t)b->pad * b->esize) == 0;
    }
    free(pat);
    return ok;
}

uint8_t *sp_dense(const dma_sparsity *sp, size_t *n)
{
    int64_t B, H, Lq, Lk;
    dma_sparsity_shape(sp, &B, &H, &Lq, &Lk);
    *n = (size_t)(B * H * Lq * Lk);
    uint8_t *m = test_malloc(*n);
    dma_status st = dma_sparsity_to_dense(sp, m, *n);
    ck_assert_msg(st == DMA_OK, "dma_sparsity_to_dense: %s", dma_status_string(st));
    return m;
}

enum { STAT_MAX = 32 };
static struct {
    const char *name;
    double worst;
} stats[STAT_MAX];

void stat_note(const char *name, double err, double tol)
{
    const double ratio = tol > 0 ? err / tol : (err > 0 ? INFINITY : 0);
    for (int i = 0; i < STAT_MAX; i++) {
        if (!stats[i].name)
            stats[i].name = name;
        if (strcmp(stats[i].name, name) == 0) {
            if (ratio > stats[i].worst)
                stats[i].worst = ratio;
            return;
        }
    }
}

void stat_print(const char *test)
{
    const char *v = getenv("DMATTN_TEST_VERBOSE");
    for (int i = 0; i < STAT_MAX && stats[i].name; i++) {
        if (v && *v && strcmp(v, "0") != 0)
            printf("test_cuda %s: worst %s error = %.3g of its tolerance\n", test,
                   stats[i].name, stats[i].worst);
        stats[i].name = NULL;
        stats[i].worst = 0;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Sparsity: the GPU builders against the CPU's                                               */
/* ------------------------------------------------------------------------------------------ */

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

/* ------------------------------------------------------------------------------------------ */
/* Argument errors of the forward and the backward: the same status, nothing written          */
/* ------------------------------------------------------------------------------------------ */

enum { EB = 2, ELQ = 33, ELK = 47, EHQ = 4, EHKV = 2, ED = 64 };
enum { E_CAP = EB * 64 * 8 * 300 }; /* elements of every buffer: room for any view below */

/* One side's arguments (host buffers for the CPU, device ones for the GPU). */
typedef struct eargs {
    dma_tensor q, k, v, bias, out, lse, dout, dq, dk, dv, dbias;
    const dma_tensor *pbias, *plse, *pdbias;
    dma_attn_params ap;
    const dma_sparsity *sp;
} eargs;

static dma_tensor view4(void *p, dma_dtype dt, int64_t a, int64_t b, int64_t c, int64_t d)
{
    return dma_tensor_4d(p, dt, a, b, c, d);
}

static void eargs_base(eargs *e, void *const *buf, const dma_sparsity *sp)
{
    e->q = view4(buf[0], DMA_F32, EB, ELQ, EHQ, ED);
    e->k = view4(buf[1], DMA_F32, EB, ELK, EHKV, ED);
    e->v = view4(buf[2], DMA_F32, EB, ELK, EHKV, ED);
    e->bias = view4(buf[3], DMA_F32, EB, EHKV, 1, ELK);
    e->out = view4(buf[4], DMA_F32, EB, ELQ, EHQ, ED);
    e->lse = dma_tensor_3d(buf[5], DMA_F32, EB, EHQ, ELQ);
    e->dout = view4(buf[6], DMA_F32, EB, ELQ, EHQ, ED);
    e->dq = view4(buf[7], DMA_F32, EB, ELQ, EHQ, ED);
    e->dk = view4(buf[8], DMA_F32, EB, ELK, EHKV, ED);
    e->dv = view4(buf[9], DMA_F32, EB, ELK, EHKV, ED);
    e->dbias = view4(buf[10], DMA_F32, EB, EHKV, 1, ELK);
    e->pbias = &e->bias;
    e->plse = &e->lse;
    e->pdbias = &e->dbias;
    e->ap = (dma_attn_params){.causal = 1};
    e->sp = sp;
}

/* The mutations: each breaks one rule; `bwd` marks those only the backward sees. */
static int mutate(eargs *e, int m, const dma_sparsity *sp_wrong, int *bwd, dma_status *want)
{
    *bwd = 0;
    switch (m) {
    case 0: e->q = view4(e->q.data, DMA_F32, EB, ELQ, 6, ED);
        e->out = view4(e->out.data, DMA_F32, EB, ELQ, 6, ED);
        e->k = view4(e->k.data, DMA_F32, EB, ELK, 4, ED);
        e->v = view4(e->v.data, DMA_F32, EB, ELK, 4, ED);
        e->lse = dma_tensor_3d(e->lse.data, DMA_F32, EB, 6, ELQ);
        e->pbias = NULL; e->pdbias = NULL; e->sp = NULL;
        *want = DMA_ERR_HEADS; return 1;
    case 1: e->q = view4(e->q.data, DMA_F32, EB, ELQ, EHQ, 300);
        e->k = view4(e->k.data, DMA_F32, EB, ELK, EHKV, 300);
        e->v = view4(e->v.data, DMA_F32, EB, ELK, EHKV, 300);
        e->out = view4(e->out.data, DMA_F32, EB, ELQ, EHQ, 300);
        *want = DMA_ERR_HEAD_DIM; return 1;
    case 2: e->k.dtype = DMA_BF16; *want = DMA_ERR_DTYPE; return 1;
    case 3: e->out.dtype = DMA_BF16; *want = DMA_ERR_DTYPE; return 1;
    case 4: e->bias.shape[1] = 3; *want = DMA_ERR_SHAPE; return 1;
    case 5: e->bias.dtype = DMA_BF16; *want = DMA_ERR_DTYPE; return 1;
    case 6: e->lse.shape[2] = ELQ - 1; *want = DMA_ERR_SHAPE; return 1;
    case 7: e->out.data = e->q.data; *want = DMA_ERR_OVERLAP; return 1;
    case 8: e->lse.data = e->out.data; *want = DMA_ERR_OVERLAP; return 1;
    case 9: e->q.stride[3] = 2; *want = DMA_ERR_STRIDE; return 1;
    case 10: e->ap.scale = NAN; *want = DMA_ERR_BAD_VALUE; return 1;
    case 11: e->ap.softcap = -1.0f; *want = DMA_ERR_BAD_VALUE; return 1;
    case 12: e->sp = sp_wrong; *want = DMA_ERR_SHAPE; return 1;
    case 13: e->q.data = NULL; *want = DMA_ERR_NULL; return 1;
    case 14: e->v.shape[1] = ELK - 1; *want = DMA_ERR_SHAPE; return 1;
    case 15: e->bias.shape[3] = ELK + 1; *want = DMA_ERR_SHAPE; return 1;
    case 16: *bwd = 1; e->dq.dtype = DMA_BF16; *want = DMA_ERR_DTYPE; return 1;
    case 17: *bwd = 1; e->pbias = NULL; *want = DMA_ERR_NULL; return 1;
    case 18: *bwd = 1; e->dk.shape[1] = ELK - 1; *want = DMA_ERR_SHAPE; return 1;
    case 19: *bwd = 1; e->dout.dtype = DMA_BF16; *want = DMA_ERR_DTYPE; return 1;
    case 20: *bwd = 1; e->dq.data = e->q.data; *want = DMA_ERR_OVERLAP; return 1;
    case 21: *bwd = 1; e->plse = NULL; *want = DMA_ERR_NULL; return 1;
    case 22: *bwd = 1; e->dbias.shape[0] = 1; *want = DMA_ERR_SHAPE; return 1;
    default: return 0;
    }
}

static dma_status call(dma_context *ctx, eargs *e, int bwd)
{
    if (!bwd)
        return dma_forward(ctx, &e->q, &e->k, &e->v, e->pbias, e->sp, &e->ap,
                           &e->out, (dma_tensor *)e->plse);
    return dma_backward(ctx, &e->q, &e->k, &e->v, e->pbias, e->sp, &e->ap, &e->out, e->plse,
                        &e->dout, &e->dq, &e->dk, &e->dv, (dma_tensor *)e->pdbias);
}

START_TEST(argument_errors)
{
    dma_context *cpu = cpu_ctx(), *gpu = cuda_ctx(NULL);
    const size_t bytes = (size_t)E_CAP * sizeof(float);
    void *hbuf[11], *dbuf[11];
    unsigned char *img = test_malloc(bytes);
    test_rng r = rng_make(105);
    float *v = test_malloc(bytes);
    for (int i = 0; i < 11; i++) {
        for (int64_t x = 0; x < E_CAP; x++)
            v[x] = rng_float(&r, -1.0f, 1.0f);
        hbuf[i] = test_malloc(bytes);
        memcpy(hbuf[i], v, bytes);
        dbuf[i] = dev_alloc(bytes);
        dev_put(dbuf[i], v, bytes);
    }
    /* outputs (out, lse, dq, dk, dv, dbias) start as the sentinel pattern; lse is finite (the
     * forward's) so that the backward's own checks are what fails */
    static const int outs[] = {4, 5, 7, 8, 9, 10};
    fill_sentinel(img, bytes);
    for (int i = 0; i < 6; i++) {
        memcpy(hbuf[outs[i]], img, bytes);
        dev_put(dbuf[outs[i]], img, bytes);
    }
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = 7};
    dma_tensor hb = view4(hbuf[3], DMA_F32, EB, EHKV, 1, ELK), db = hb;
    db.data = dbuf[3];
    dma_sparsity *spc = NULL, *spg = NULL, *wc = NULL, *wg = NULL;
    ck_assert_int_eq(dma_sparsity_build(cpu, &mp, EB, EHKV, ELQ, ELK, &hb, NULL, &spc), DMA_OK);
    ck_assert_int_eq(dma_sparsity_build(gpu, &mp, EB, EHKV, ELQ, ELK, &db, NULL, &spg), DMA_OK);
    ck_assert_int_eq(dma_sparsity_build(cpu, &mp, EB, EHKV, ELQ + 1, ELK, NULL, NULL, &wc),
                     DMA_ERR_NULL); /* top-k needs a bias: a window object instead */
    mp.kind = DMA_MASK_WINDOW;
    ck_assert_int_eq(dma_sparsity_build(cpu, &mp, EB, EHKV, ELQ + 1, ELK, NULL, NULL, &wc), DMA_OK);
    ck_assert_int_eq(dma_sparsity_build(gpu, &mp, EB, EHKV, ELQ + 1, ELK, NULL, NULL, &wg), DMA_OK);

    int bwd;
    dma_status want;
    for (int m = 0;; m++) {
        eargs ec, eg;
        eargs_base(&ec, hbuf, spc);
        eargs_base(&eg, dbuf, spg);
        if (!mutate(&ec, m, wc, &bwd, &want))
            break;
        mutate(&eg, m, wg, &bwd, &want);
        dma_status sc = call(cpu, &ec, bwd), sg = call(gpu, &eg, bwd);
        ck_assert_msg(sc == want, "mutation %d: CPU %s, expected %s", m, dma_status_string(sc),
                      dma_status_string(want));
        ck_assert_msg(sg == sc, "mutation %d: GPU %s (%s), CPU %s", m, dma_status_string(sg),
                      dma_context_last_error(gpu), dma_status_string(sc));
        for (int i = 0; i < 6; i++) {
            if (outs[i] == 5 && bwd)
                continue; /* lse is an input of the backward */
            dev_get(v, dbuf[outs[i]], bytes);
            ck_assert_msg(is_sentinel(v, bytes), "mutation %d: GPU output %d written", m, i);
            ck_assert_msg(is_sentinel(hbuf[outs[i]], bytes), "mutation %d: CPU output %d written",
                          m, i);
        }
    }
    /* host memory given to a CUDA call; a CPU object to a CUDA call and the reverse */
    for (int k = 0; k < 4; k++) {
        eargs ec, eg;
        eargs_base(&ec, hbuf, spc);
        eargs_base(&eg, dbuf, spg);
        if (k == 0)
            eg.q = ec.q;
        else if (k == 1)
            eg.sp = spc;
        else
            ec.sp = spg;
        dma_status st = k < 2 ? call(gpu, &eg, 0) : call(cpu, &ec, k == 3);
        ck_assert_msg(st == DMA_ERR_DEVICE, "device case %d: %s", k, dma_status_string(st));
        dev_get(v, dbuf[4], bytes);
        ck_assert_msg(is_sentinel(v, bytes) && is_sentinel(hbuf[4], bytes),
                      "device case %d: out written", k);
    }
    dma_sparsity_destroy(spc);
    dma_sparsity_destroy(spg);
    dma_sparsity_destroy(wc);
    dma_sparsity_destroy(wg);
    for (int i = 0; i < 11; i++) {
        free(hbuf[i]);
        dev_free(dbuf[i]);
    }
    free(v);
    free(img);
    dma_context_destroy(cpu);
    dma_context_destroy(gpu);
}
END_TEST

START_TEST(device_ordinals)
{
    const int n = dma_cuda_device_count();
    dma_context_options o;
    memset(&o, 0, sizeof o);
    o.device = DMA_DEVICE_CUDA;
    dma_context *ctx = NULL;
    for (int d = 0; d < n; d++) {
        o.cuda_device = d;
        ck_assert_int_eq(dma_context_create(&o, &ctx), DMA_OK);
        ck_assert_int_eq(dma_context_device(ctx), DMA_DEVICE_CUDA);
        dma_context_destroy(ctx);
        ctx = NULL;
    }
    const int bad[] = {-1, n, 1000};
    for (int i = 0; i < 3; i++) {
        o.cuda_device = bad[i];
        ck_assert_int_eq(dma_context_create(&o, &ctx), DMA_ERR_DEVICE);
        ck_assert_ptr_null(ctx);
    }
    o.device = (dma_device)7;
    ck_assert_int_eq(dma_context_create(&o, &ctx), DMA_ERR_ARG);
}
END_TEST

#endif /* DMATTN_HAVE_CUDA */

int main(void)
{
    Suite *s = suite_create("cuda");
    TCase *tc = tcase_create("cuda");
    tcase_set_timeout(tc, 600);
    if (dma_cuda_device_count() == 0) {
        printf("test_cuda: no CUDA device, GPU cases skipped\n");
        fflush(stdout);
        tcase_add_test(tc, cuda_context_refused);
    } else {
#if DMATTN_HAVE_CUDA
        tcase_add_test(tc, device_ordinals);
        tcase_add_test(tc, sparsity_topk_causal);
        tcase_add_test(tc, sparsity_other_kinds);
        tcase_add_test(tc, sparsity_from_mask);
        tcase_add_test(tc, sparsity_errors);
        tcase_add_test(tc, argument_errors);
        cuda_grid_add_tests(tc);
#endif
    }
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}

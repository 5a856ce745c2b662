/*
 * test_cuda.c - the CUDA backend against the CPU implementation of the same library.
 *
 * Without a usable GPU (dma_cuda_device_count() == 0: no backend in this build, no driver or no
 * device) the suite prints one line and only checks that a CUDA context is refused with
 * DMA_ERR_DEVICE. With one, every CUDA call is compared with the same call on a CPU context,
 * tensors copied with cudaMemcpy:
 *   - here: device ordinals, and the argument errors of the forward and the backward (same
 *     status on both sides, nothing written), objects and memory on the wrong side; also the
 *     helpers the three files share (test_cuda.h);
 *   - test_cuda_sparsity.c: the sparsity builders (dense selections identical, nnz equal), their
 *     errors, objects and memory on the wrong side;
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
        cuda_sparsity_add_tests(tc);
        tcase_add_test(tc, argument_errors);
        cuda_grid_add_tests(tc);
#endif
    }
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}

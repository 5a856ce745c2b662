/*
 * device.c - the public calls of a CUDA context (DESIGN §5): device checks, the host fallbacks
 * and the hand-over to cuda/. Without the CUDA backend every entry says so (DMA_ERR_DEVICE).
 *
 * What runs where: the causal top-k builder over a per-key bias (the DMA case) runs on the GPU;
 * every other mask (window, dense, relu, per-row biases, block smoothing, a dense boolean mask)
 * is built by the CPU builder from host copies of its inputs and uploaded, so the object is the
 * same whatever built it. The forward and the backward run on the GPU.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(DMATTN_HAVE_CUDA)
#include "dma_cuda.h"
#endif

dma_status dma_cpu_only(dma_context *ctx, const char *call)
{
    return dma_fail(ctx, DMA_ERR_DEVICE, "%s: not available with a CUDA context in this version "
                    "(use a CPU context)", call);
}

dma_status dma_device_match(dma_context *ctx, const dma_sparsity *sp)
{
    const int want = ctx->device == DMA_DEVICE_CUDA;
    if (sp->cuda != want)
        return dma_fail(ctx, DMA_ERR_DEVICE, "sparsity: built by a %s context, used with a %s "
                        "context", sp->cuda ? "CUDA" : "CPU", want ? "CUDA" : "CPU");
    if (want && sp->cuda_device != ctx->cuda_device)
        return dma_fail(ctx, DMA_ERR_DEVICE, "sparsity: lives on GPU %d, the context uses GPU %d",
                        sp->cuda_device, ctx->cuda_device);
    return DMA_OK;
}

#if !defined(DMATTN_HAVE_CUDA)

int dma_cuda_device_count(void) { return 0; }

static dma_status not_built(dma_context *ctx)
{
    return dma_fail(ctx, DMA_ERR_DEVICE, "this build of dmattn has no CUDA backend (built "
                    "without nvcc, or with -Dcuda=disabled)");
}

dma_status dma_device_init(dma_context *ctx) { (void)ctx; return DMA_ERR_DEVICE; }

void dma_device_release(dma_context *ctx) { (void)ctx; }

dma_status dma_device_sparsity_build(dma_context *ctx, const dma_mask_params *params, int64_t B,
                                     int64_t H, int64_t Lq, int64_t Lk, const dma_tensor *bias,
                                     const dma_tensor *key_padding, dma_sparsity **out)
{
    (void)params, (void)B, (void)H, (void)Lq, (void)Lk, (void)bias, (void)key_padding, (void)out;
    return not_built(ctx);
}

dma_status dma_device_sparsity_from_mask(dma_context *ctx, const dma_tensor *mask,
                                         dma_sparsity **out)
{
    (void)mask, (void)out;
    return not_built(ctx);
}

dma_status dma_device_sparsity_to_dense(const dma_sparsity *sp, uint8_t *out, size_t bytes)
{
    (void)sp, (void)out, (void)bytes;
    return DMA_ERR_DEVICE;
}

void dma_device_sparsity_free(dma_sparsity *sp) { free(sp); }

dma_status dma_device_forward(dma_context *ctx, dma_attn *a)
{
    (void)a;
    return not_built(ctx);
}

dma_status dma_device_backward(dma_context *ctx, dma_attn *a, const dma_tensor *dout,
                               dma_tensor *dq, dma_tensor *dk, dma_tensor *dv, dma_tensor *dbias)
{
    (void)a, (void)dout, (void)dq, (void)dk, (void)dv, (void)dbias;
    return not_built(ctx);
}

#else /* DMATTN_HAVE_CUDA */

_Static_assert(sizeof(dcu_tile) == sizeof(dma_tile), "dcu_tile must mirror dma_tile");
_Static_assert(offsetof(dcu_tile, words_per_row) == offsetof(dma_tile, words_per_row),
               "dcu_tile must mirror dma_tile");

int dma_cuda_device_count(void) { return dcu_device_count(); }

static dma_status runtime_error(dma_context *ctx, const char *what)
{
    return dma_fail(ctx, DMA_ERR_DEVICE, "%s: CUDA error: %s", what, dcu_last_error());
}

dma_status dma_device_init(dma_context *ctx)
{
    const int n = dcu_device_count();
    if (ctx->cuda_device < 0 || ctx->cuda_device >= n)
        return DMA_ERR_DEVICE;
    if (!(ctx->cuda_state = calloc(1, sizeof *ctx->cuda_state)))
        return DMA_ERR_NOMEM;
    if (dcu_init(ctx->cuda_device, ctx->cuda_state) != 0) {
        dma_device_release(ctx);
        return DMA_ERR_DEVICE;
    }
    return DMA_OK;
}

void dma_device_release(dma_context *ctx)
{
    if (ctx->cuda_state)
        dcu_state_free(ctx->cuda_state);
    free(ctx->cuda_state);
    ctx->cuda_state = NULL;
}

/* Every element a (validated) tensor spans: 1 + sum (shape - 1) * stride, 0 if it is empty. */
static int64_t span_elems(const dma_tensor *t)
{
    int64_t span = 1;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] == 0)
            return 0;
        span += (t->shape[d] - 1) * t->stride[d];
    }
    return span;
}

static size_t dtype_bytes(dma_dtype t) { return t == DMA_F32 ? 4 : t == DMA_BOOL ? 1 : 2; }

/* Device memory of the context's GPU, or DMA_ERR_DEVICE naming the argument. */
static dma_status check_on_device(dma_context *ctx, const char *name, const dma_tensor *t)
{
    if (!t || !t->data || span_elems(t) == 0)
        return DMA_OK;
    if (!dcu_on_device(t->data, ctx->cuda_device))
        return dma_fail(ctx, DMA_ERR_DEVICE, "%s: not device memory of GPU %d (a CUDA context "
                        "takes device pointers)", name, ctx->cuda_device);
    return DMA_OK;
}

static dcu_tensor to_dcu(const dma_tensor *t)
{
    dcu_tensor d = {0};
    if (!t)
        return d;
    d.data = t->data;
    d.dtype = (int)t->dtype;
    for (int i = 0; i < 4; i++) {
        d.shape[i] = i < t->ndim ? t->shape[i] : 1;
        d.stride[i] = i < t->ndim ? t->stride[i] : 0;
    }
    return d;
}

/* A host copy of a device tensor (same shape and strides over a copy of its span). */
static dma_status download(dma_context *ctx, const dma_tensor *t, dma_tensor *host, void **buf)
{
    *host = *t;
    *buf = NULL;
    const int64_t n = span_elems(t);
    const size_t bytes = (size_t)(n > 0 ? n : 1) * dtype_bytes(t->dtype);
    if (!(*buf = malloc(bytes)))
        return dma_fail(ctx, DMA_ERR_NOMEM, "out of host memory for a copy of %zu bytes", bytes);
    if (n > 0 && dcu_copy_to_host(*buf, t->data, bytes, ctx->cuda_stream) != 0) {
        free(*buf);
        *buf = NULL;
        return runtime_error(ctx, "copy to host");
    }
    host->data = *buf;
    return DMA_OK;
}

/* A CPU context with ctx's threads, for the host builders. */
static dma_status host_context(dma_context *ctx, dma_context **cpu)
{
    dma_context_options o = {.threads = ctx->threads};
    if (dma_context_create(&o, cpu) != DMA_OK)
        return dma_fail(ctx, DMA_ERR_NOMEM, "out of memory for a host context");
    return DMA_OK;
}

/* The status of a call made with the helper context, its message copied into ctx. */
static dma_status relay(dma_context *ctx, dma_context *cpu, dma_status st)
{
    if (st != DMA_OK)
        dma_fail(ctx, st, "%s", dma_context_last_error(cpu));
    return st;
}

static dma_sparsity *device_object(dma_context *ctx, int64_t B, int64_t H, int64_t Lq, int64_t Lk)
{
    dma_sparsity *sp = malloc(sizeof *sp);
    if (sp)
        *sp = (dma_sparsity){.B = B, .H = H, .Lq = Lq, .Lk = Lk,
                             .ntiles = dma_div_up(Lq, DMA_TILE), .cuda = 1,
                             .cuda_device = ctx->cuda_device};
    return sp;
}

/* The backend's view of a device object (the same arrays). */
static dcu_sparsity to_dcu_sparsity(const dma_sparsity *sp)
{
    return (dcu_sparsity){.B = sp->B, .H = sp->H, .Lq = sp->Lq, .Lk = sp->Lk,
                          .ntiles = sp->ntiles, .tiles = (dcu_tile *)sp->tiles,
                          .row_lo = sp->row_lo, .row_hi = sp->row_hi, .keys = sp->keys,
                          .words = sp->words, .nkeys = sp->nkeys, .nwords = sp->nwords,
                          .nnz = sp->nnz, .ready = sp->cuda_ready};
}

/* The arrays and counts of the backend's view back into a device object. */
static void from_dcu_sparsity(dma_sparsity *sp, const dcu_sparsity *d)
{
    sp->tiles = (dma_tile *)d->tiles;
    sp->row_lo = d->row_lo;
    sp->row_hi = d->row_hi;
    sp->keys = d->keys;
    sp->words = d->words;
    sp->nkeys = d->nkeys;
    sp->nwords = d->nwords;
    sp->nnz = d->nnz;
    sp->cuda_ready = d->ready;
}

void dma_device_sparsity_free(dma_sparsity *sp)
{
    /* Forwards and backwards return before their kernels end (stream-ordered), and the owner
     * frees without a stream: wait for every stream of the device first, as cudaFree does. */
    dcu_sparsity d = to_dcu_sparsity(sp);
    if (dcu_set_device(sp->cuda_device) == 0)
        dcu_device_sync();
    dcu_sparsity_free(&d, NULL);
    dcu_ready_free(&d);
    free(sp);
}

/* The dense object a call made for itself (sp NULL), freed after the call's work on the
 * context's stream, without waiting for it. */
static void release_on_stream(dma_context *ctx, dma_attn *a)
{
    if (a->owned_sp && a->owned_sp->cuda) {
        dcu_sparsity d = to_dcu_sparsity(a->owned_sp);
        dcu_sparsity_free(&d, ctx->cuda_stream);
        free(a->owned_sp);
        a->owned_sp = NULL;
    }
    dma_attn_release(a);
}

static int upload_array(void *dst, const void *src, size_t bytes, void *stream)
{
    return bytes == 0 ? 0 : dcu_copy_to_device(dst, src, bytes, stream);
}

/* A device copy of a host object. */
static dma_status upload(dma_context *ctx, const dma_sparsity *h, dma_sparsity **out)
{
    dma_sparsity *d = device_object(ctx, h->B, h->H, h->Lq, h->Lk);
    if (!d)
        return dma_fail(ctx, DMA_ERR_NOMEM, "sparsity: out of host memory");
    const size_t ntile_all = (size_t)(h->B * h->H * h->ntiles), nrows = (size_t)(h->B * h->H * h->Lq);
    dcu_sparsity a = to_dcu_sparsity(d);
    if (dcu_sparsity_alloc(&a, h->nkeys, h->nwords, ctx->cuda_stream) != 0) {
        free(d);
        return runtime_error(ctx, "sparsity upload");
    }
    from_dcu_sparsity(d, &a);
    d->nnz = h->nnz;
    if (upload_array(d->tiles, h->tiles, ntile_all * sizeof(dma_tile), ctx->cuda_stream) ||
        upload_array(d->row_lo, h->row_lo, nrows * 4, ctx->cuda_stream) ||
        upload_array(d->row_hi, h->row_hi, nrows * 4, ctx->cuda_stream) ||
        upload_array(d->keys, h->keys, (size_t)h->nkeys * 4, ctx->cuda_stream) ||
        upload_array(d->words, h->words, (size_t)h->nwords * 8, ctx->cuda_stream) ||
        dcu_sync(ctx->cuda_stream)) {
        dma_status st = runtime_error(ctx, "sparsity upload");
        dma_device_sparsity_free(d);
        return st;
    }
    *out = d;
    return DMA_OK;
}

/* A host copy of a device object (for dma_sparsity_to_dense). */
static int download_object(const dma_sparsity *d, dma_sparsity *h)
{
    *h = *d;
    h->cuda = 0;
    h->cuda_ready = NULL;
    h->vals = NULL;
    const size_t ntile_all = (size_t)(d->B * d->H * d->ntiles), nrows = (size_t)(d->B * d->H * d->Lq);
    h->tiles = malloc(ntile_all * sizeof(dma_tile) + 1);
    h->row_lo = malloc(nrows * 4 + 1);
    h->row_hi = malloc(nrows * 4 + 1);
    h->keys = malloc((size_t)d->nkeys * 4 + 1);
    h->words = malloc((size_t)d->nwords * 8 + 1);
    if (!h->tiles || !h->row_lo || !h->row_hi || !h->keys || !h->words)
        return -2;
    if ((ntile_all && dcu_copy_to_host(h->tiles, d->tiles, ntile_all * sizeof(dma_tile), NULL)) ||
        (nrows && dcu_copy_to_host(h->row_lo, d->row_lo, nrows * 4, NULL)) ||
        (nrows && dcu_copy_to_host(h->row_hi, d->row_hi, nrows * 4, NULL)) ||
        (d->nkeys && dcu_copy_to_host(h->keys, d->keys, (size_t)d->nkeys * 4, NULL)) ||
        (d->nwords && dcu_copy_to_host(h->words, d->words, (size_t)d->nwords * 8, NULL)))
        return -1;
    return 0;
}

dma_status dma_device_sparsity_to_dense(const dma_sparsity *sp, uint8_t *out, size_t bytes)
{
    const dcu_sparsity d = to_dcu_sparsity(sp);
    if (dcu_set_device(sp->cuda_device) != 0 || dcu_ready_sync(&d) != 0) /* built to the end */
        return DMA_ERR_DEVICE;
    dma_sparsity h;
    int rc = download_object(sp, &h);
    dma_status st = rc == -2 ? DMA_ERR_NOMEM : rc ? DMA_ERR_DEVICE : DMA_OK;
    if (st == DMA_OK)
        st = dma_sparsity_to_dense(&h, out, bytes);
    free(h.tiles);
    free(h.row_lo);
    free(h.row_hi);
    free(h.keys);
    free(h.words);
    return st;
}

/* Build on the host from host copies of the inputs, then upload. */
static dma_status build_on_host(dma_context *ctx, const dma_mask_params *params, int64_t B,
                                int64_t H, int64_t Lq, int64_t Lk, const dma_tensor *bias,
                                const dma_tensor *pad, const dma_tensor *mask, dma_sparsity **out)
{
    dma_context *cpu = NULL;
    dma_tensor hb, hp, hm;
    void *bb = NULL, *pb = NULL, *mb = NULL;
    dma_sparsity *hs = NULL;
    dma_status st = host_context(ctx, &cpu);
    if (st == DMA_OK && bias)
        st = download(ctx, bias, &hb, &bb);
    if (st == DMA_OK && pad)
        st = download(ctx, pad, &hp, &pb);
    if (st == DMA_OK && mask)
        st = download(ctx, mask, &hm, &mb);
    if (st == DMA_OK)
        st = relay(ctx, cpu, mask ? dma_sparsity_from_mask(cpu, &hm, &hs)
                                  : dma_sparsity_build(cpu, params, B, H, Lq, Lk,
                                                       bias ? &hb : NULL, pad ? &hp : NULL, &hs));
    if (st == DMA_OK)
        st = upload(ctx, hs, out);
    dma_sparsity_destroy(hs);
    free(bb);
    free(pb);
    free(mb);
    dma_context_destroy(cpu);
    return st;
}

dma_status dma_device_sparsity_build(dma_context *ctx, const dma_mask_params *params, int64_t B,
                                     int64_t H, int64_t Lq, int64_t Lk, const dma_tensor *bias,
                                     const dma_tensor *key_padding, dma_sparsity **out)
{
    dma_status st;
    if ((st = check_on_device(ctx, "bias", bias)) ||
        (st = check_on_device(ctx, "key_padding", key_padding)))
        return st;
    if (dcu_set_device(ctx->cuda_device) != 0)
        return runtime_error(ctx, "sparsity_build");
    const int64_t window = dma_min64(params->window, Lk);
    const bool gpu = params->kind == DMA_MASK_TOPK && params->causal && bias &&
                     bias->shape[2] == 1 && params->block_size <= 1;
    if (!gpu)
        return build_on_host(ctx, params, B, H, Lq, Lk, bias, key_padding, NULL, out);
    dma_sparsity *sp = device_object(ctx, B, H, Lq, Lk);
    if (!sp)
        return dma_fail(ctx, DMA_ERR_NOMEM, "sparsity: out of host memory");
    dcu_sparsity d = {.B = B, .H = H, .Lq = Lq, .Lk = Lk, .ntiles = sp->ntiles};
    const dcu_tensor b = to_dcu(bias), p = to_dcu(key_padding);
    int rc = dcu_build_topk_causal(window, &b, &p, &d, ctx->cuda_state, ctx->cuda_stream);
    if (rc == 2) { /* a window whose lists need more shared memory than the GPU has */
        free(sp);
        return build_on_host(ctx, params, B, H, Lq, Lk, bias, key_padding, NULL, out);
    }
    if (rc != 0) {
        free(sp);
        if (rc == 1)
            return dma_fail(ctx, DMA_ERR_BAD_VALUE, "bias: holds a NaN or +inf (a mask cannot "
                            "be generated from it)");
        return runtime_error(ctx, "sparsity_build");
    }
    from_dcu_sparsity(sp, &d);
    *out = sp;
    return DMA_OK;
}

dma_status dma_device_sparsity_from_mask(dma_context *ctx, const dma_tensor *mask,
                                         dma_sparsity **out)
{
    dma_status st = check_on_device(ctx, "mask", mask);
    if (st != DMA_OK)
        return st;
    if (dcu_set_device(ctx->cuda_device) != 0)
        return runtime_error(ctx, "sparsity_from_mask");
    return build_on_host(ctx, NULL, 0, 0, 0, 0, NULL, NULL, mask, out);
}

/* The inputs on the device, the GPU selected, and the dense object made when none was given. */
static dma_status device_prepare(dma_context *ctx, dma_attn *a, dcu_attn *d)
{
    dma_status st;
    if ((st = check_on_device(ctx, "q", a->q)) || (st = check_on_device(ctx, "k", a->k)) ||
        (st = check_on_device(ctx, "v", a->v)) || (st = check_on_device(ctx, "bias", a->bias)) ||
        (st = check_on_device(ctx, "out", a->out)) || (st = check_on_device(ctx, "lse", a->lse)))
        return st;
    if (dcu_set_device(ctx->cuda_device) != 0)
        return runtime_error(ctx, "attention");
    if (!a->sp) {
        dma_mask_params dense = {.kind = DMA_MASK_DENSE, .causal = a->causal};
        if ((st = build_on_host(ctx, &dense, 1, 1, a->Lq, a->Lk, NULL, NULL, NULL,
                                &a->owned_sp)))
            return st;
        a->sp = a->owned_sp;
    }
    *d = (dcu_attn){.B = a->B, .Lq = a->Lq, .Lk = a->Lk, .Hq = a->Hq, .Hkv = a->Hkv, .D = a->D,
                    .off = a->off, .scale = a->scale, .softcap = a->softcap,
                    .causal = a->causal, .q = to_dcu(a->q), .k = to_dcu(a->k),
                    .v = to_dcu(a->v), .bias = to_dcu(a->bias), .out = to_dcu(a->out),
                    .lse = to_dcu(a->lse), .sp = to_dcu_sparsity(a->sp)};
    /* an object still being built (on its builder's stream, maybe not this one) */
    if (dcu_ready_wait(&d->sp, ctx->cuda_stream) != 0)
        return runtime_error(ctx, "attention");
    return DMA_OK;
}

dma_status dma_device_forward(dma_context *ctx, dma_attn *a)
{
    dcu_attn d;
    dma_status st = device_prepare(ctx, a, &d);
    if (st == DMA_OK && dcu_forward(&d, ctx->cuda_stream))
        st = runtime_error(ctx, "forward");
    release_on_stream(ctx, a);
    return st;
}

dma_status dma_device_backward(dma_context *ctx, dma_attn *a, const dma_tensor *dout,
                               dma_tensor *dq, dma_tensor *dk, dma_tensor *dv, dma_tensor *dbias)
{
    dma_status st;
    if ((st = check_on_device(ctx, "dout", dout)) || (st = check_on_device(ctx, "dq", dq)) ||
        (st = check_on_device(ctx, "dk", dk)) || (st = check_on_device(ctx, "dv", dv)) ||
        (st = check_on_device(ctx, "dbias", dbias)))
        return st;
    dcu_attn d;
    if ((st = device_prepare(ctx, a, &d)) == DMA_OK) {
        const dcu_tensor o = to_dcu(dout), gq = to_dcu(dq), gk = to_dcu(dk), gv = to_dcu(dv),
                         gb = to_dcu(dbias);
        if (dcu_backward(&d, &o, &gq, &gk, &gv, &gb, ctx->cuda_stream))
            st = runtime_error(ctx, "backward");
    }
    release_on_stream(ctx, a);
    return st;
}

#endif /* DMATTN_HAVE_CUDA */

/*
 * dynbias.c - the value-derived dynamic bias, DMA's trainable mask generator (DESIGN §1
 * "Dynamic bias from values"): bias[b, h, 0, t] = a[h] * softplus(v_flat[b, t, :] . w_dt[:, h]
 * + b_dt[h]), and its backward.
 *
 * The projections (v_flat . w_dt and the two products of the backward) are matrix products per
 * (batch entry, kv head) straight on the caller's strided views, so no layout needs a copy. They
 * run on OpenBLAS sgemm when the library has it, always from the calling thread (the pthread
 * OpenBLAS warns on stderr and oversubscribes when called inside an OpenMP region), else on a
 * portable loop. The elementwise parts run on the context's threads over fixed chunks of tokens;
 * the backward's reductions add per-chunk partials in chunk order. Every sum therefore has one
 * order whatever the thread count, and results are bitwise identical for any context.
 */
#include <limits.h>
#include <math.h>
#include <string.h>

#ifdef DMATTN_HAVE_CBLAS
#include <cblas.h>
#endif

#include "internal.h"

/* Tokens per elementwise work item. A constant, not a function of the thread count, so that the
 * per-item partial sums (and their total) are the same for any number of threads. */
#define DYN_CHUNK 512

/* A validated call. dt scratch is (B, Lk, H) row-major: batch entry b is an Lk x H matrix. */
typedef struct dyn_problem {
    int64_t B, Lk, H, D;
    const dma_tensor *v, *w, *bdt, *a;
    int64_t nchunks; /* ceil(Lk / DYN_CHUNK): work items per batch entry */
    int threads;     /* the context's */
} dyn_problem;

/* softplus(x) = log(1 + e^x) without overflow for large x or loss of the tail for very negative
 * x: max(x, 0) + log1p(e^-|x|). NaN stays NaN, +inf gives +inf, -inf gives 0. */
static inline float softplus(float x)
{
    return (x > 0.0f ? x : 0.0f) + log1pf(expf(-fabsf(x)));
}

/* sigmoid(x) = 1 / (1 + e^-x), exp taken of a non-positive number only, so it never overflows. */
static inline float sigmoid(float x)
{
    if (x >= 0.0f)
        return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

/* Check a 1-D float32 tensor of Hkv elements. */
static dma_status check_heads_vec(dma_context *ctx, const char *name, const dma_tensor *t,
                                  int64_t H)
{
    dma_status st = dma_check_tensor(ctx, name, t, DMA_F32, 1);
    if (st == DMA_OK && t->shape[0] != H)
        st = dma_fail(ctx, DMA_ERR_SHAPE, "%s: %lld elements, expected Hkv = %lld", name,
                      (long long)t->shape[0], (long long)H);
    return st;
}

/* Check the arguments the forward and the backward share (`bias` is the forward's output or the
 * backward's dbias, named `bias_name`) and fill `p`. */
static dma_status dyn_check(dma_context *ctx, const dma_tensor *v, const dma_tensor *w,
                            const dma_tensor *bdt, const dma_tensor *a, const char *bias_name,
                            const dma_tensor *bias, dyn_problem *p)
{
    dma_status st;
    if (!v || !w || !a || !bias)
        return dma_fail(ctx, DMA_ERR_NULL, "v, w_dt, a and %s are required", bias_name);
    if ((st = dma_check_tensor(ctx, "v", v, DMA_F32, 4)) ||
        (st = dma_check_tensor(ctx, "w_dt", w, DMA_F32, 2)) ||
        (bdt && (st = dma_check_tensor(ctx, "b_dt", bdt, DMA_F32, 1))) ||
        (st = dma_check_tensor(ctx, "a", a, DMA_F32, 1)) ||
        (st = dma_check_tensor(ctx, bias_name, bias, DMA_F32, 4)))
        return st;
    const int64_t B = v->shape[0], Lk = v->shape[1], H = v->shape[2], D = v->shape[3];
    if (H < 1)
        return dma_fail(ctx, DMA_ERR_HEADS, "v: Hkv = %lld, must be >= 1", (long long)H);
    if (D < 1 || D > DMA_MAX_HEAD_DIM)
        return dma_fail(ctx, DMA_ERR_HEAD_DIM, "v: head dimension %lld is outside 1..%d",
                        (long long)D, DMA_MAX_HEAD_DIM);
    if (Lk > INT32_MAX)
        return dma_fail(ctx, DMA_ERR_OVERFLOW, "v: Lk = %lld, must be <= 2^31-1", (long long)Lk);
    int64_t HD, n;
    /* n * 8 bytes bounds the scratch: B * Lk * H floats, plus partials over fewer items. */
    if (!dma_mul_ok(H, D, &HD) || !dma_mul_ok(B, Lk, &n) || !dma_mul_ok(n, H, &n) ||
        !dma_mul_ok(n, 2 * (int64_t)sizeof(double), &n))
        return dma_fail(ctx, DMA_ERR_OVERFLOW, "v: sizes (%lld, %lld, %lld, %lld) overflow the "
                        "scratch size", (long long)B, (long long)Lk, (long long)H, (long long)D);
    if (w->shape[0] != HD || w->shape[1] != H)
        return dma_fail(ctx, DMA_ERR_SHAPE, "w_dt: shape (%lld, %lld), expected (Hkv * D, Hkv) = "
                        "(%lld, %lld)", (long long)w->shape[0], (long long)w->shape[1],
                        (long long)HD, (long long)H);
    if ((bdt && (st = check_heads_vec(ctx, "b_dt", bdt, H))) ||
        (st = check_heads_vec(ctx, "a", a, H)))
        return st;
    if (bias->shape[0] != B || bias->shape[1] != H || bias->shape[2] != 1 || bias->shape[3] != Lk)
        return dma_fail(ctx, DMA_ERR_SHAPE, "%s: shape (%lld, %lld, %lld, %lld), expected (B, Hkv, "
                        "1, Lk) = (%lld, %lld, 1, %lld)", bias_name, (long long)bias->shape[0],
                        (long long)bias->shape[1], (long long)bias->shape[2],
                        (long long)bias->shape[3], (long long)B, (long long)H, (long long)Lk);
    *p = (dyn_problem){.B = B, .Lk = Lk, .H = H, .D = D, .v = v, .w = w, .bdt = bdt, .a = a,
                       .nchunks = dma_div_up(Lk, DYN_CHUNK), .threads = ctx->threads};
    return DMA_OK;
}

/*
 * C (m x n, row stride ldc) = op(A) op(B) (+ C when acc), row-major; op(A) is m x k, op(B) is
 * k x n; ta / tb: that operand is stored transposed (A as k x m, B as n x k). OpenBLAS runs it
 * when it accepts the arguments (int sizes, leading dimensions at least the row length: it would
 * print an error for others, e.g. a zero token stride); otherwise the portable loop, in which
 * every element of C is one thread's sum in a fixed order.
 */
static void gemm(int threads, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float *A,
                 int64_t lda, const float *Bm, int64_t ldb, bool acc, float *C, int64_t ldc)
{
#ifdef DMATTN_HAVE_CBLAS
    const int64_t row_a = ta ? m : k, row_b = tb ? k : n;
    if (m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
        ldc <= INT_MAX && lda >= row_a && ldb >= row_b && ldc >= n) {
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    (int)m, (int)n, (int)k, 1.0f, A, (int)lda, Bm, (int)ldb, acc ? 1.0f : 0.0f,
                    C, (int)ldc);
        return;
    }
#endif
    /* Rows of C that overlap (ldc < n) must be written by one thread, in order. */
    int nt = (ldc >= n && m >= 64) ? (int)dma_min64(threads, m) : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        float *c = C + i * ldc;
        if (!acc)
            for (int64_t j = 0; j < n; j++)
                c[j] = 0.0f;
        if (tb) {
            for (int64_t j = 0; j < n; j++) {
                float s = 0.0f;
                for (int64_t q = 0; q < k; q++)
                    s += (ta ? A[q * lda + i] : A[i * lda + q]) * Bm[j * ldb + q];
                c[j] += s;
            }
        } else {
            for (int64_t q = 0; q < k; q++) {
                const float x = ta ? A[q * lda + i] : A[i * lda + q];
                const float *b = Bm + q * ldb;
                for (int64_t j = 0; j < n; j++)
                    c[j] += x * b[j];
            }
        }
    }
}

/* Start of kv head h's D values of token 0 of batch entry b in v (or dv). */
static inline float *head_slice(const dma_tensor *t, int64_t b, int64_t h)
{
    return f32(t) + b * t->stride[0] + h * t->stride[2];
}

/* Rows h*D .. h*D + D - 1 of w_dt (or dw_dt): the weights kv head h's values feed. */
static inline float *w_rows(const dma_tensor *w, int64_t D, int64_t h)
{
    return f32(w) + h * D * w->stride[0];
}

/* dt[b] = v_flat[b] . w_dt for every b, without b_dt: one product per kv head slice of v. */
static void project(const dyn_problem *p, float *dt)
{
    for (int64_t b = 0; b < p->B; b++)
        for (int64_t h = 0; h < p->H; h++)
            gemm(p->threads, false, false, p->Lk, p->H, p->D, head_slice(p->v, b, h),
                 p->v->stride[1], w_rows(p->w, p->D, h), p->w->stride[0], h > 0,
                 dt + b * p->Lk * p->H, p->H);
}

/* Threads for the elementwise pass: the context's, at most one per work item. */
static int item_threads(const dyn_problem *p)
{
    return (int)dma_max64(1, dma_min64(p->threads, p->B * p->nchunks));
}

/* Token range [t0, t1) and batch entry of elementwise work item `it`. */
static inline void item_range(const dyn_problem *p, int64_t it, int64_t *b, int64_t *t0,
                              int64_t *t1)
{
    *b = it / p->nchunks;
    *t0 = it % p->nchunks * DYN_CHUNK;
    *t1 = dma_min64(p->Lk, *t0 + DYN_CHUNK);
}

dma_status dma_dynamic_bias_forward(dma_context *ctx, const dma_tensor *v, const dma_tensor *w_dt,
                                    const dma_tensor *b_dt, const dma_tensor *a, dma_tensor *bias)
{
    if (!ctx)
        return DMA_ERR_NULL;
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_cpu_only(ctx, "dynamic_bias_forward");
    dyn_problem p;
    dma_status st = dyn_check(ctx, v, w_dt, b_dt, a, "bias", bias, &p);
    if (st == DMA_OK)
        st = dma_check_apart(ctx, (dma_named_tensor[]){{"bias", bias}}, 1,
                             (dma_named_tensor[]){{"v", v}, {"w_dt", w_dt}, {"b_dt", b_dt},
                                                  {"a", a}}, 4, false);
    if (st != DMA_OK || p.B == 0 || p.Lk == 0)
        return st;
    float *dt = dma_alloc(sizeof(float) * (size_t)(p.B * p.Lk * p.H));
    if (!dt)
        return dma_fail(ctx, DMA_ERR_NOMEM, "dynamic bias: out of memory for %lld x %lld x %lld "
                        "floats of scratch", (long long)p.B, (long long)p.Lk, (long long)p.H);
    project(&p, dt);
    const int64_t H = p.H, nitems = p.B * p.nchunks;
#pragma omp parallel for num_threads(item_threads(&p)) schedule(static)
    for (int64_t it = 0; it < nitems; it++) {
        int64_t b, t0, t1;
        item_range(&p, it, &b, &t0, &t1);
        const float *d = dt + b * p.Lk * H;
        for (int64_t h = 0; h < H; h++) {
            const float ah = f32(a)[h], bh = b_dt ? f32(b_dt)[h] : 0.0f;
            float *out = f32(bias) + b * bias->stride[0] + h * bias->stride[1];
            for (int64_t t = t0; t < t1; t++)
                out[t] = ah * softplus(d[t * H + h] + bh);
        }
    }
    dma_free(dt);
    return DMA_OK;
}

/* Write zeros to a validated float tensor of 1 or 2 dimensions (any row stride). */
static void zero_tensor(dma_tensor *t)
{
    const int64_t rows = t->ndim == 2 ? t->shape[0] : 1, cols = t->shape[t->ndim - 1];
    for (int64_t r = 0; r < rows; r++)
        memset(f32(t) + (t->ndim == 2 ? r * t->stride[0] : 0), 0, sizeof(float) * (size_t)cols);
}

/* Check an optional gradient against its input's shape. */
static dma_status check_grad(dma_context *ctx, const char *name, const dma_tensor *g,
                             const dma_tensor *like)
{
    if (!g)
        return DMA_OK;
    dma_status st = dma_check_tensor(ctx, name, g, DMA_F32, like->ndim);
    for (int d = 0; st == DMA_OK && d < like->ndim; d++)
        if (g->shape[d] != like->shape[d])
            st = dma_fail(ctx, DMA_ERR_SHAPE, "%s: size %lld in dimension %d, its input has %lld",
                          name, (long long)g->shape[d], d, (long long)like->shape[d]);
    return st;
}

dma_status dma_dynamic_bias_backward(dma_context *ctx, const dma_tensor *v,
                                     const dma_tensor *w_dt, const dma_tensor *b_dt,
                                     const dma_tensor *a, const dma_tensor *dbias,
                                     dma_tensor *dv, dma_tensor *dw_dt, dma_tensor *db_dt,
                                     dma_tensor *da)
{
    if (!ctx)
        return DMA_ERR_NULL;
    if (ctx->device == DMA_DEVICE_CUDA)
        return dma_cpu_only(ctx, "dynamic_bias_backward");
    dyn_problem p;
    dma_status st = dyn_check(ctx, v, w_dt, b_dt, a, "dbias", dbias, &p);
    if (st != DMA_OK)
        return st;
    /* db_dt is b_dt's gradient even when b_dt was NULL (zero): its shape is (Hkv). */
    const dma_tensor heads_vec = dma_tensor_1d(NULL, DMA_F32, p.H);
    if ((st = check_grad(ctx, "dv", dv, v)) || (st = check_grad(ctx, "dw_dt", dw_dt, w_dt)) ||
        (st = check_grad(ctx, "db_dt", db_dt, &heads_vec)) ||
        (st = check_grad(ctx, "da", da, &heads_vec)))
        return st;
    /* dv is added to (it holds dma_backward's share), so it is an output here */
    const dma_named_tensor grads[] = {{"dv", dv}, {"dw_dt", dw_dt}, {"db_dt", db_dt}, {"da", da}};
    const dma_named_tensor inputs[] = {{"v", v}, {"w_dt", w_dt}, {"b_dt", b_dt}, {"a", a},
                                       {"dbias", dbias}};
    if ((st = dma_check_apart(ctx, grads, 4, inputs, 5, false)))
        return st;
    if (p.B == 0 || p.Lk == 0) {
        /* Empty sums: the written-whole gradients are zero; dv has no elements. */
        dma_tensor *whole[3] = {dw_dt, db_dt, da};
        for (int i = 0; i < 3; i++)
            if (whole[i])
                zero_tensor(whole[i]);
        return DMA_OK;
    }
    const int64_t H = p.H, nitems = p.B * p.nchunks;
    const bool sums = db_dt || da;
    float *dt = dma_alloc(sizeof(float) * (size_t)(p.B * p.Lk * H));
    double *part = dt && sums ? dma_alloc(2 * sizeof(double) * (size_t)(nitems * H)) : NULL;
    if (!dt || (sums && !part)) {
        dma_free(dt);
        return dma_fail(ctx, DMA_ERR_NOMEM, "dynamic bias backward: out of memory for %lld x "
                        "%lld x %lld floats of scratch", (long long)p.B, (long long)p.Lk,
                        (long long)H);
    }
    project(&p, dt);
    /* dt becomes ddt in place; item `it` leaves its sums of g * softplus(dt) and of ddt per head
     * in part[it][0][h] and part[it][1][h]. */
#pragma omp parallel for num_threads(item_threads(&p)) schedule(static)
    for (int64_t it = 0; it < nitems; it++) {
        int64_t b, t0, t1;
        item_range(&p, it, &b, &t0, &t1);
        float *d = dt + b * p.Lk * H;
        for (int64_t h = 0; h < H; h++) {
            const float ah = f32(a)[h], bh = b_dt ? f32(b_dt)[h] : 0.0f;
            const float *g = f32(dbias) + b * dbias->stride[0] + h * dbias->stride[1];
            double sa = 0.0, sb = 0.0;
            for (int64_t t = t0; t < t1; t++) {
                const float x = d[t * H + h] + bh;
                const float ddt = g[t] * ah * sigmoid(x);
                sa += (double)g[t] * (double)softplus(x);
                sb += (double)ddt;
                d[t * H + h] = ddt;
            }
            if (sums) {
                part[(it * 2) * H + h] = sa;
                part[(it * 2 + 1) * H + h] = sb;
            }
        }
    }
    /* Partials in item order (batch entry, then chunk): one summation order for any thread count. */
    for (int64_t h = 0; sums && h < H; h++) {
        double sa = 0.0, sb = 0.0;
        for (int64_t it = 0; it < nitems; it++) {
            sa += part[(it * 2) * H + h];
            sb += part[(it * 2 + 1) * H + h];
        }
        if (da)
            f32(da)[h] = (float)sa;
        if (db_dt)
            f32(db_dt)[h] = (float)sb;
    }
    /* dw_dt rows of head h = sum over b of V[b, :, h, :]^T ddt[b]; batch entries added in order. */
    for (int64_t h = 0; dw_dt && h < H; h++)
        for (int64_t b = 0; b < p.B; b++)
            gemm(p.threads, true, false, p.D, H, p.Lk, head_slice(v, b, h), v->stride[1],
                 dt + b * p.Lk * H, H, b > 0, w_rows(dw_dt, p.D, h), dw_dt->stride[0]);
    /* dv[b, :, h, :] += ddt[b] . (w_dt rows of head h)^T. */
    for (int64_t b = 0; dv && b < p.B; b++)
        for (int64_t h = 0; h < H; h++)
            gemm(p.threads, false, true, p.Lk, p.D, H, dt + b * p.Lk * H, H,
                 w_rows(w_dt, p.D, h), w_dt->stride[0], true, head_slice(dv, b, h),
                 dv->stride[1]);
    dma_free(part);
    dma_free(dt);
    return DMA_OK;
}

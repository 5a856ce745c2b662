/*
 * bench_blas.c - the OpenBLAS dense attention baseline and the SGEMM reference of dmattn-bench
 * (see bench_blas.h). Moved out of dmattn-bench.c.
 */
#include "bench_blas.h"

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#ifdef DMATTN_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* OpenBLAS baseline and SGEMM reference                                                      */
/* ------------------------------------------------------------------------------------------ */

#ifdef DMATTN_BENCH_HAVE_OPENBLAS

static const char *blas_core(void)
{
    const char *c = openblas_get_corename();
    return c ? c : "unknown";
}

/* OpenBLAS (pthreads build) picks its kernels from the CPU model; a model it does not know (a
 * VM that hides it, a new CPU) gets the generic "Prescott" kernels, several times slower, and
 * then the openblas and sgemm lines say nothing about the hardware. Seen on a 16-core Xeon VM. */
void check_blas_core(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    static const char *const avx2_cores[] = {"haswell", "skylakex", "cooperlake",
                                             "sapphirerapids", "zen", "excavator"};
    const char *c = blas_core();
    int ok = 0;
    for (size_t i = 0; i < sizeof avx2_cores / sizeof *avx2_cores; i++)
        ok |= !strcasecmp(c, avx2_cores[i]);
    if (!ok && __builtin_cpu_supports("avx2"))
        fprintf(stderr,
                PROG ": warning: OpenBLAS uses its '%s' kernels although this CPU has AVX2 (it "
                     "does not recognise the CPU model): the openblas and sgemm lines are far "
                     "below the hardware. Set OPENBLAS_CORETYPE=Haswell (SkylakeX with "
                     "AVX-512) in the environment.\n",
                c);
#endif
}

/* OpenBLAS's worker threads busy-wait (sched_yield) for ~0.1 s after the library is loaded and
 * after every multi-threaded call before they sleep; meanwhile they steal cores from the OpenMP
 * threads of dmattn (seen: a 0.3 ms mask_build timed at 8 ms on a 16-core VM, a 0.1 ms forward
 * at 13 ms right after a 16-thread SGEMM). Wait for them to sleep before timing anything else. */
void settle_blas(void)
{
    struct timespec ts = {0, 300 * 1000 * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* The softmax of the baseline is vectorised for the host like the GEMMs (OpenBLAS picks its
 * kernels at run time): clones for AVX-512, AVX2 and the baseline ISA on x86-64 Linux/GCC. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define BENCH_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define BENCH_CLONES
#endif

/* exp(x) for x <= 0 (the softmax argument), Cephes expf polynomial; rel. error ~2e-7;
 * branch-free so that the loops below vectorise. */
static inline __attribute__((always_inline)) float exp_neg(float x)
{
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest (|t| < 2^22) */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } u;
    u.i = ((int32_t)n + 127) << 23;
    return y * u.f;
}

/* Row i of a block: s[0..n) are scores, the rest of the row (to ncols) is masked. In place,
 * s becomes the probabilities (0 where masked). n == 0: an empty row, all 0 (out = 0). */
BENCH_CLONES static void softmax_rows(float *s, int64_t lds, int64_t m, const int64_t *nvis,
                                      int64_t ncols)
{
    for (int64_t r = 0; r < m; r++) {
        float *row = s + r * lds;
        int64_t n = nvis[r];
        if (n > 0) {
            float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < n; j++)
                mx = row[j] > mx ? row[j] : mx;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < n; j++) {
                float e = exp_neg(row[j] - mx);
                row[j] = e;
                sum += e;
            }
            float inv = 1.0f / sum;
#pragma omp simd
            for (int64_t j = 0; j < n; j++)
                row[j] *= inv;
        } else {
            n = 0;
        }
        if (ncols > n)
            memset(row + n, 0, (size_t)(ncols - n) * sizeof(float));
    }
}

typedef struct blas_arg {
    const problem *p;
    int causal;
    int threads;
    float *ws; /* threads * (BLAS_ROWS * Lk + BLAS_ROWS) floats */
    int64_t ws_per_thread;
} blas_arg;

/* Plain dense attention with OpenBLAS. Threading (the fairest simple way): OpenMP over the
 * independent (batch, query head, row block) items with exactly `threads` threads, each item
 * calling single-threaded cblas_sgemm (openblas_set_num_threads(1)); items are handed out
 * dynamically, longest (last, causal) row blocks first. Per item: S = scale Q_blk K^T over the
 * visible key prefix of the block (lda = Hq*D, ldb = Hkv*D thanks to BSHD), per-row masked
 * softmax, O_blk = P V written straight into out (ldc = Hq*D). */
static void run_blas(void *a)
{
    const blas_arg *ba = a;
    const problem *p = ba->p;
    const int64_t B = p->B, Lq = p->Lq, Lk = p->Lk, Hq = p->Hq, Hkv = p->Hkv, D = p->D;
    const int64_t group = Hq / Hkv, off = Lk - Lq;
    const int64_t nblk = (Lq + BLAS_ROWS - 1) / BLAS_ROWS, items = B * Hq * nblk;
    const float scale = 1.0f / sqrtf((float)D);
    const int causal = ba->causal;
    openblas_set_num_threads(1);
#pragma omp parallel for num_threads(ba->threads) schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
        /* all (batch, head) items of the last (longest, causal) row block first, then the next */
        const int64_t blk = nblk - 1 - it / (B * Hq), bh = it % (B * Hq);
        const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
        const int64_t i0 = blk * BLAS_ROWS;
        const int64_t m = Lq - i0 < BLAS_ROWS ? Lq - i0 : BLAS_ROWS;
        float *S = ba->ws + (int64_t)omp_get_thread_num() * ba->ws_per_thread;
        int64_t *nv = (int64_t *)(S + BLAS_ROWS * Lk);
        const float *Q = p->q + ((b * Lq + i0) * Hq + h) * D;
        const float *K = p->k + (b * Lk * Hkv + hk) * D;
        const float *V = p->v + (b * Lk * Hkv + hk) * D;
        float *O = p->out_blas + ((b * Lq + i0) * Hq + h) * D;
        int64_t ncols = Lk;
        if (causal) {
            ncols = i0 + m - 1 + off + 1;
            ncols = ncols < 0 ? 0 : (ncols > Lk ? Lk : ncols);
        }
        if (ncols == 0) {
            for (int64_t r = 0; r < m; r++)
                memset(O + r * Hq * D, 0, (size_t)D * sizeof(float));
            continue;
        }
        for (int64_t r = 0; r < m; r++) {
            int64_t n = ncols;
            if (causal) {
                n = i0 + r + off + 1;
                n = n < 0 ? 0 : (n > ncols ? ncols : n);
            }
            nv[r] = n;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)ncols, (int)D, scale,
                    Q, (int)(Hq * D), K, (int)(Hkv * D), 0.0f, S, (int)ncols);
        softmax_rows(S, ncols, m, nv, ncols);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)D, (int)ncols, 1.0f,
                    S, (int)ncols, V, (int)(Hkv * D), 0.0f, O, (int)(Hq * D));
    }
}

result measure_openblas(problem *p, int causal, int threads, const char *isa, runspec rs)
{
    if (p->Lk > INT32_MAX / BLAS_ROWS || p->Hq * p->D > INT32_MAX)
        fatal("shape too large for the OpenBLAS baseline's int sizes");
    blas_arg ba;
    ba.p = p;
    ba.causal = causal;
    ba.threads = threads;
    /* scores block + the per-row visible counts (int64, 2 floats each), padded to 64 bytes */
    ba.ws_per_thread = ((BLAS_ROWS * p->Lk + 2 * BLAS_ROWS) + 15) / 16 * 16;
    ba.ws = xalloc(mul4(threads, ba.ws_per_thread, 1, 1, "openblas scratch"), sizeof(float),
                   "openblas scratch");
    timing tm = time_it(run_blas, NULL, &ba, rs);
    free(ba.ws);
    result r = new_result(OP_FORWARD, IMPL_OPENBLAS, isa, threads, tm);
    r.blas_core = blas_core();
    fill_shape(&r, p);
    r.mask = causal ? "causal" : "dense";
    r.causal = causal;
    r.pairs = visible_pairs(p->Lq, p->Lk, causal) * p->B * p->Hq;
    set_gflops(&r);
    return r;
}

typedef struct sgemm_arg {
    int64_t n;
    int threads;
    float *a, *b, *c;
} sgemm_arg;

static void run_sgemm(void *arg)
{
    sgemm_arg *s = arg;
    openblas_set_num_threads(s->threads);
    int n = (int)s->n;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, s->a, n, s->b, n, 0.0f,
                s->c, n);
}

/* C = A B, square N, single precision, OpenBLAS with exactly `threads` threads. */
result measure_sgemm(int64_t n, int threads, const char *isa, runspec rs)
{
    sgemm_arg s;
    s.n = n;
    s.threads = threads;
    int64_t nn = mul4(n, n, 1, 1, "sgemm matrices");
    s.a = xalloc(nn, sizeof(float), "sgemm A");
    s.b = xalloc(nn, sizeof(float), "sgemm B");
    s.c = xalloc(nn, sizeof(float), "sgemm C");
    fill_uniform(s.a, nn, 11, -1.0f, 1.0f);
    fill_uniform(s.b, nn, 12, -1.0f, 1.0f);
    memset(s.c, 0, (size_t)nn * sizeof(float));
    timing tm = time_it(run_sgemm, NULL, &s, rs);
    openblas_set_num_threads(1);
    free(s.a);
    free(s.b);
    free(s.c);
    settle_blas(); /* its workers spin for a while after the last call */
    result r = new_result(OP_SGEMM, IMPL_OPENBLAS, isa, threads, tm);
    r.blas_core = blas_core();
    r.sgemm_n = n;
    r.gflops = tm.median > 0 ? 2.0 * (double)n * (double)n * (double)n / (tm.median * 1e6) : NAN;
    return r;
}

#else
void check_blas_core(void)
{
}
void settle_blas(void)
{
}
#endif /* DMATTN_BENCH_HAVE_OPENBLAS */

/*
 * test_threads.c - the library from several application threads at once: each thread has its
 * own context, all share one sparsity object and the read-only inputs, and each runs forwards
 * and backwards into its own outputs at the same time as the others. Every result must equal,
 * bit for bit, the one computed alone before the threads start. scripts/test.sh also runs this
 * suite in a ThreadSanitizer build (contexts of one OpenMP thread each there, so that only the
 * library's own sharing is checked, not libgomp's uninstrumented runtime).
 */
#include <check.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

enum { NTHREADS = 4, ROUNDS = 4, B = 2, LQ = 700, LK = 760, HQ = 4, HKV = 2, D = 24, W = 96 };
#define NQ ((size_t)B * LQ * HQ * D)
#define NK ((size_t)B * LK * HKV * D)

typedef struct shared {
    const float *q, *k, *v, *bias, *dout;
    const dma_sparsity *sp;
    int omp_threads;
} shared;

typedef struct result {
    float out[NQ], lse[B * HQ * LQ], dq[NQ], dk[NK], dv[NK], dbias[B * HKV * LK];
} result;

typedef struct job {
    const shared *s;
    const result *want;
    result *got;
    int mismatches;
    dma_status status;
} job;

static dma_status run_once(dma_context *ctx, const shared *s, result *r)
{
    dma_tensor tq = dma_tensor_4d((void *)s->q, DMA_F32, B, LQ, HQ, D);
    dma_tensor tk = dma_tensor_4d((void *)s->k, DMA_F32, B, LK, HKV, D);
    dma_tensor tv = dma_tensor_4d((void *)s->v, DMA_F32, B, LK, HKV, D);
    dma_tensor tb = dma_tensor_4d((void *)s->bias, DMA_F32, B, HKV, 1, LK);
    dma_tensor tdo = dma_tensor_4d((void *)s->dout, DMA_F32, B, LQ, HQ, D);
    dma_tensor to = dma_tensor_4d(r->out, DMA_F32, B, LQ, HQ, D);
    dma_tensor tl = dma_tensor_3d(r->lse, DMA_F32, B, HQ, LQ);
    dma_tensor tdq = dma_tensor_4d(r->dq, DMA_F32, B, LQ, HQ, D);
    dma_tensor tdk = dma_tensor_4d(r->dk, DMA_F32, B, LK, HKV, D);
    dma_tensor tdv = dma_tensor_4d(r->dv, DMA_F32, B, LK, HKV, D);
    dma_tensor tdb = dma_tensor_4d(r->dbias, DMA_F32, B, HKV, 1, LK);
    dma_attn_params ap = {.causal = 1, .softcap = 20.0f};
    dma_status st = dma_forward(ctx, &tq, &tk, &tv, &tb, s->sp, &ap, &to, &tl);
    if (st == DMA_OK)
        st = dma_backward(ctx, &tq, &tk, &tv, &tb, s->sp, &ap, &to, &tl, &tdo, &tdq, &tdk, &tdv,
                          &tdb);
    return st;
}

static void *worker(void *arg)
{
    job *j = arg;
    dma_context *ctx = NULL;
    j->status = dma_context_create(&(dma_context_options){.threads = j->s->omp_threads}, &ctx);
    for (int round = 0; round < ROUNDS && j->status == DMA_OK; round++) {
        j->status = run_once(ctx, j->s, j->got);
        if (j->status == DMA_OK && memcmp(j->got, j->want, sizeof *j->got) != 0)
            j->mismatches++;
    }
    dma_context_destroy(ctx);
    return NULL;
}

START_TEST(threads_share_a_sparsity_object)
{
    test_rng r = rng_make(2027);
    float *q = test_malloc(sizeof(float) * NQ), *k = test_malloc(sizeof(float) * NK);
    float *v = test_malloc(sizeof(float) * NK), *dout = test_malloc(sizeof(float) * NQ);
    float *bias = test_malloc(sizeof(float) * B * HKV * LK);
    for (size_t i = 0; i < NQ; i++) {
        q[i] = rng_float(&r, -1, 1);
        dout[i] = rng_float(&r, -1, 1);
    }
    for (size_t i = 0; i < NK; i++) {
        k[i] = rng_float(&r, -1, 1);
        v[i] = rng_float(&r, -1, 1);
    }
    for (size_t i = 0; i < (size_t)B * HKV * LK; i++)
        bias[i] = rng_float(&r, -2, 2);
    /* ThreadSanitizer builds keep each context to one OpenMP thread (see the top comment) */
    const char *env = getenv("DMATTN_TEST_OMP_THREADS");
    shared s = {q, k, v, bias, dout, NULL, env ? atoi(env) : 2};
    ck_assert_int_ge(s.omp_threads, 1);

    dma_context *ctx;
    ck_assert_int_eq(dma_context_create(&(dma_context_options){.threads = s.omp_threads}, &ctx),
                     DMA_OK);
    dma_tensor tb = dma_tensor_4d(bias, DMA_F32, B, HKV, 1, LK);
    dma_mask_params mp = {.kind = DMA_MASK_TOPK, .causal = 1, .window = W};
    dma_sparsity *sp;
    ck_assert_int_eq(dma_sparsity_build(ctx, &mp, B, HKV, LQ, LK, &tb, NULL, &sp), DMA_OK);
    s.sp = sp;
    result *want = test_malloc(sizeof *want);
    ck_assert_int_eq(run_once(ctx, &s, want), DMA_OK);
    dma_context_destroy(ctx);

    job *jobs = test_malloc(sizeof(job) * NTHREADS);
    pthread_t tid[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) {
        jobs[t] = (job){.s = &s, .want = want, .got = test_malloc(sizeof(result))};
        ck_assert_int_eq(pthread_create(&tid[t], NULL, worker, &jobs[t]), 0);
    }
    for (int t = 0; t < NTHREADS; t++) {
        ck_assert_int_eq(pthread_join(tid[t], NULL), 0);
        ck_assert_msg(jobs[t].status == DMA_OK, "thread %d: %s", t,
                      dma_status_string(jobs[t].status));
        ck_assert_msg(jobs[t].mismatches == 0, "thread %d: %d of %d rounds differ from the "
                      "serial result", t, jobs[t].mismatches, ROUNDS);
        free(jobs[t].got);
    }
    free(jobs);
    free(want);
    dma_sparsity_destroy(sp);
    free(q); free(k); free(v); free(dout); free(bias);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("threads");
    TCase *tc = tcase_create("shared");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, threads_share_a_sparsity_object);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

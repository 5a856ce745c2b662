/*
 * bench_scaling.c - the thread-scaling mode of dmattn-bench (see bench_scaling.h).
 *
 * The problem (data of fixed seeds) is made once; per thread count, in the order given: a
 * context with that many threads, the SGEMM reference on as many OpenBLAS threads, then
 * measure_dma (mask build, and per storage type the forward and the backward, alternating).
 * The thread counts are timed one after the other, not interleaved: on a shared machine their
 * ratios drift with the load (the lines carry ms_min and ms_max to judge by).
 */
#include "bench_scaling.h"

#include "bench_blas.h"
#include "bench_dtype.h"
#include "bench_report.h"
#include "bench_run.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int bench_scaling_run(const scaling_options *o)
{
    problem p;
    problem_init(&p, o->B, o->Lq, o->Lk, o->Hq, o->Hkv, o->D, 1, o->ndtypes, o->dtypes);
    /* per thread count: mask_build + (forward, backward) per dtype, and sgemm */
    const int per = 1 + 2 * o->ndtypes + 1;
    result *r = xalloc((int64_t)o->nthreads * per, sizeof *r, "results");
    int n = 0;
    const char *isa = NULL;
    int progress = isatty(STDERR_FILENO) && !isatty(STDOUT_FILENO);
    for (int ti = 0; ti < o->nthreads; ti++) {
        const int threads = (int)o->threads[ti];
        if (progress)
            fprintf(stderr, "[sweep-threads] threads=%d\n", threads);
        dma_context *ctx = make_context(threads, o->isa);
        isa = dma_isa_name(dma_context_isa(ctx));
        result *mine = &r[n];
        int k = 0;
        const result *sg = NULL;
#if HAVE_OPENBLAS
        mine[k] = measure_sgemm(o->sgemm_n, threads, isa, o->rs);
        sg = &mine[k++];
#endif
        k += measure_dma(ctx, &p, o->mask, o->window, o->rs, &mine[k]);
        link_results(mine, k, sg);
        n += k;
        dma_context_destroy(ctx);
    }
    link_thread_scaling(r, n);
    if (o->json) {
        const report_style st = {1, 0, 0};
        for (int i = 0; i < n; i++)
            emit(st, &r[i]);
        fflush(stdout);
    } else {
        printf("dmattn-bench thread scaling: B=%lld Lq=%lld Lk=%lld Hq=%lld Hkv=%lld D=%lld "
               "window=%lld mask=%s isa=%s runs=%d warmup=%d (speedup and efficiency over the "
               "fewest threads; of_sgemm: GFLOP/s over SGEMM N=%lld at the same threads)\n",
               (long long)o->B, (long long)o->Lq, (long long)o->Lk, (long long)o->Hq,
               (long long)o->Hkv, (long long)o->D, (long long)o->window, mask_names[o->mask],
               isa ? isa : "-", o->rs.runs, o->rs.warmup, (long long)o->sgemm_n);
        print_scaling_table(r, n);
    }
    free(r);
    problem_free(&p);
    return 0;
}

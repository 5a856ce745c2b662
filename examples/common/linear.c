/*
 * linear.c - y = x W and its backward on OpenBLAS sgemm (row-major, W stored in x out).
 *
 * The products are split across the OpenMP threads here, each thread calling a one-thread
 * sgemm on its block (model_create sets OpenBLAS to one thread). One thread pool then serves
 * the whole step: OpenBLAS's own pthreads, spinning beside OpenMP's between calls, made a
 * two-thread step 50x slower on a two-core machine. Every element is still one dot product of
 * one sgemm call, so the result does not depend on which thread computed it.
 */
#include <cblas.h>

#include <omp.h>

#include "layers.h"

static inline int omp_thread(void) { return omp_get_thread_num(); }

/* Rows [*lo, *hi) of n for thread `tid` of `nt`, in blocks of 16 rows. */
static void split(int n, int tid, int nt, int *lo, int *hi)
{
    int blocks = (n + 15) / 16;
    *lo = (int)((long)blocks * tid / nt) * 16;
    *hi = (int)((long)blocks * (tid + 1) / nt) * 16;
    *hi = *hi < n ? *hi : n;
    *lo = *lo < n ? *lo : n;
}

/* Threads worth using for a product with `rows` rows to split (about 64 rows each at least). */
static int useful(int threads, int rows)
{
    int t = rows / 64;
    return t < 1 ? 1 : (t < threads ? t : threads);
}

void linear_forward(float *out, const float *x, const float *w, int N, int n_in, int n_out,
                    int accumulate, int threads)
{
    const int nt = useful(threads, N);
#pragma omp parallel num_threads(nt)
    {
        int lo, hi;
        split(N, omp_thread(), nt, &lo, &hi);
        if (hi > lo)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, hi - lo, n_out, n_in, 1.0f,
                        x + (size_t)lo * n_in, n_in, w, n_out, accumulate ? 1.0f : 0.0f,
                        out + (size_t)lo * n_out, n_out);
    }
}

void linear_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                     int N, int n_in, int n_out, int accumulate_dx, int threads)
{
    if (dx) { /* dx = dout W^T, split over tokens */
        const int nt = useful(threads, N);
#pragma omp parallel num_threads(nt)
        {
            int lo, hi;
            split(N, omp_thread(), nt, &lo, &hi);
            if (hi > lo)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, hi - lo, n_in, n_out, 1.0f,
                            dout + (size_t)lo * n_out, n_out, w, n_out,
                            accumulate_dx ? 1.0f : 0.0f, dx + (size_t)lo * n_in, n_in);
        }
    }
    /* dW = x^T dout: a sum over tokens, so split over the rows of dW (inputs) or its columns
     * (outputs), whichever is longer; each element sums every token in one call. */
    const int by_rows = n_in >= n_out;
    const int nt = useful(threads, by_rows ? n_in : n_out);
#pragma omp parallel num_threads(nt)
    {
        int lo, hi;
        split(by_rows ? n_in : n_out, omp_thread(), nt, &lo, &hi);
        if (hi > lo && by_rows)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, hi - lo, n_out, N, 1.0f, x + lo,
                        n_in, dout, n_out, 0.0f, dw + (size_t)lo * n_out, n_out);
        else if (hi > lo)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n_in, hi - lo, N, 1.0f, x, n_in,
                        dout + lo, n_out, 0.0f, dw + lo, n_out);
    }
}

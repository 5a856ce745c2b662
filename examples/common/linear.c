/*
 * linear.c - y = x W and its backward on OpenBLAS sgemm (row-major). W is stored in x out, or
 * out x in for the _t variants (a tied LM head reads the embedding table, vocab x d_model).
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

/* Threads worth using for a product whose split dimension has n rows (64 or more each). */
static int useful(int threads, int n)
{
    int t = n / 64;
    return t < 1 ? 1 : (t < threads ? t : threads);
}

/*
 * C (m x n, ldc) = op(A) op(B) (+ C when acc), where op(A) is m x k and op(B) k x n; ta / tb say
 * that A is stored k x m / B is stored n x k. The rows of C (split_rows) or its columns are cut
 * in blocks of 16 among the threads.
 */
static void product(int threads, int split_rows, int ta, int tb, int m, int n, int k,
                    const float *A, int lda, const float *B, int ldb, int acc, float *C, int ldc)
{
    const int len = split_rows ? m : n, nt = useful(threads, len), blocks = (len + 15) / 16;
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        int lo = (int)((long)blocks * tid / nt) * 16, hi = (int)((long)blocks * (tid + 1) / nt) * 16;
        hi = hi < len ? hi : len;
        if (hi > lo) {
            /* the block's first row of op(A) / column of op(B), wherever the operand keeps it */
            const float *a = A, *b = B;
            float *c = C;
            int mm = m, nn = n;
            if (split_rows) {
                a += (size_t)lo * (ta ? 1 : (size_t)lda);
                c += (size_t)lo * ldc;
                mm = hi - lo;
            } else {
                b += (size_t)lo * (tb ? (size_t)ldb : 1);
                c += lo;
                nn = hi - lo;
            }
            cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
                        tb ? CblasTrans : CblasNoTrans, mm, nn, k, 1.0f, a, lda, b, ldb,
                        acc ? 1.0f : 0.0f, c, ldc);
        }
    }
}

void linear_forward(float *out, const float *x, const float *w, int N, int n_in, int n_out,
                    int accumulate, int threads)
{
    product(threads, 1, 0, 0, N, n_out, n_in, x, n_in, w, n_out, accumulate, out, n_out);
}

void linear_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                     int N, int n_in, int n_out, int accumulate_dx, int threads)
{
    if (dx) /* dx = dout W^T, split over tokens */
        product(threads, 1, 0, 1, N, n_in, n_out, dout, n_out, w, n_out, accumulate_dx, dx,
                n_in);
    /* dW = x^T dout: a sum over tokens, so split over the rows of dW (inputs) or its columns
     * (outputs), whichever is longer; each element sums every token in one call. */
    product(threads, n_in >= n_out, 1, 0, n_in, n_out, N, x, n_in, dout, n_out, 0, dw, n_out);
}

void linear_forward_t(float *out, const float *x, const float *w, int N, int n_in, int n_out,
                      int accumulate, int threads)
{
    product(threads, 1, 0, 1, N, n_out, n_in, x, n_in, w, n_in, accumulate, out, n_out);
}

void linear_backward_t(float *dx, float *dw, const float *dout, const float *x, const float *w,
                       int N, int n_in, int n_out, int accumulate_dx, int threads)
{
    if (dx) /* dx = dout W */
        product(threads, 1, 0, 0, N, n_in, n_out, dout, n_out, w, n_in, accumulate_dx, dx,
                n_in);
    /* dW (n_out x n_in) = dout^T x */
    product(threads, n_out >= n_in, 1, 0, n_out, n_in, N, dout, n_out, x, n_in, 0, dw, n_in);
}

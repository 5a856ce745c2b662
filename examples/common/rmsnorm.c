/*
 * rmsnorm.c - RMSNorm: y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps).
 * Backward, with xh = x * rstd and g = dy * w:
 *   dx = rstd * (g - xh * mean(g * xh)),   dw = sum over tokens of dy * xh.
 */
#include <math.h>
#include <string.h>

#include "layers.h"

/* Tokens per partial sum of dw: a constant, so the summation order never depends on threads. */
#define NORM_BLOCK 64

void rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C,
                     float eps, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < N; t++) {
        const float *xr = x + (size_t)t * C;
        float *yr = out + (size_t)t * C;
        float ss = 0.0f;
        for (int c = 0; c < C; c++)
            ss += xr[c] * xr[c];
        float r = 1.0f / sqrtf(ss / (float)C + eps);
        rstd[t] = r;
        for (int c = 0; c < C; c++)
            yr[c] = xr[c] * r * w[c];
    }
}

size_t rmsnorm_scratch_floats(int N, int C)
{
    return (size_t)((N + NORM_BLOCK - 1) / NORM_BLOCK) * (size_t)C;
}

void rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                      const float *rstd, int N, int C, float *scratch, int threads)
{
    const int nblocks = (N + NORM_BLOCK - 1) / NORM_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < nblocks; blk++) {
        float *part = scratch + (size_t)blk * C;
        memset(part, 0, sizeof(float) * (size_t)C);
        int t1 = (blk + 1) * NORM_BLOCK < N ? (blk + 1) * NORM_BLOCK : N;
        for (int t = blk * NORM_BLOCK; t < t1; t++) {
            const float *xr = x + (size_t)t * C, *gr = dout + (size_t)t * C;
            float *dxr = dx + (size_t)t * C;
            const float r = rstd[t];
            float dot = 0.0f; /* sum of g * xh */
            for (int c = 0; c < C; c++)
                dot += gr[c] * w[c] * xr[c] * r;
            const float mean = dot / (float)C;
            for (int c = 0; c < C; c++) {
                float xh = xr[c] * r;
                dxr[c] += r * (gr[c] * w[c] - xh * mean);
                part[c] += gr[c] * xh;
            }
        }
    }
    for (int c = 0; c < C; c++) {
        float s = 0.0f;
        for (int blk = 0; blk < nblocks; blk++)
            s += scratch[(size_t)blk * C + c];
        dw[c] = s;
    }
}

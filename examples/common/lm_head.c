/*
 * lm_head.c - the model's output: final RMSNorm, logits = hn W_head and softmax cross-entropy,
 * formed only at the labelled positions (MQAR and needle tasks label a few answer tokens per
 * sequence, so the vocabulary-wide product is skipped everywhere else).
 * Backward: dlogits = (softmax - onehot) * scale, dhn = dlogits W_head^T, then RMSNorm's
 * backward, scattered back to the labelled token rows.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "layers.h"
#include "vmath.h"

double lm_head_forward(lm_head_acts *a, const float *x, const int32_t *labels, int N, int C,
                       int V, const float *lnf_w, const float *w_head, int tied, float eps,
                       int *correct, int threads)
{
    int M = 0;
    for (int t = 0; t < N; t++)
        if (labels[t] >= 0) {
            a->pos[M] = t;
            a->label[M] = labels[t];
            M++;
        }
    a->M = M;
    *correct = 0;
    if (M == 0)
        return 0.0;
    for (int i = 0; i < M; i++)
        memcpy(a->xg + (size_t)i * C, x + (size_t)a->pos[i] * C, sizeof(float) * (size_t)C);
    rmsnorm_forward(a->hn, a->rstd, a->xg, lnf_w, M, C, eps, threads);
    if (tied)
        linear_forward_t(a->probs, a->hn, w_head, M, C, V, 0, threads);
    else
        linear_forward(a->probs, a->hn, w_head, M, C, V, 0, threads);

    double loss = 0.0;
    int hits = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : hits)
    for (int i = 0; i < M; i++) {
        float *z = a->probs + (size_t)i * V;
        int best = 0;
        for (int c = 1; c < V; c++)
            if (z[c] > z[best])
                best = c;
        hits += best == a->label[i];
        /* the softmax in vector lanes: a fixed lane order, so the sum is reproducible */
        const float zmax = z[best];
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int c = 0; c < V; c++) {
            z[c] = exp_approx(z[c] - zmax);
            sum += z[c];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int c = 0; c < V; c++)
            z[c] *= inv;
    }
    /* -log p[label], summed in position order (fixed, whatever the threads); a NaN logit row
     * makes the loss NaN, which the trainer reports. */
    for (int i = 0; i < M; i++) {
        float p = a->probs[(size_t)i * V + a->label[i]];
        /* an underflowed p costs -log(tiny), not +inf; a NaN stays NaN */
        loss -= isnan(p) ? (double)NAN : log(fmax((double)p, (double)FLT_MIN * FLT_EPSILON));
    }
    *correct = hits;
    return loss;
}

void lm_head_backward(float *dx, float *dlnf_w, float *dw_head, const lm_head_acts *a,
                      float scale, const float *lnf_w, const float *w_head, int tied, int N,
                      int C, int V, float *dlogits, float *dhn, float *dxg, float *norm_scratch,
                      int threads)
{
    const int M = a->M;
    memset(dx, 0, sizeof(float) * (size_t)N * (size_t)C);
    if (M == 0) {
        memset(dlnf_w, 0, sizeof(float) * (size_t)C);
        memset(dw_head, 0, sizeof(float) * (size_t)C * (size_t)V);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < M; i++) {
        const float *p = a->probs + (size_t)i * V;
        float *g = dlogits + (size_t)i * V;
        for (int c = 0; c < V; c++)
            g[c] = p[c] * scale;
        g[a->label[i]] -= scale;
    }
    if (tied)
        linear_backward_t(dhn, dw_head, dlogits, a->hn, w_head, M, C, V, 0, threads);
    else
        linear_backward(dhn, dw_head, dlogits, a->hn, w_head, M, C, V, 0, threads);
    memset(dxg, 0, sizeof(float) * (size_t)M * (size_t)C);
    rmsnorm_backward(dxg, dlnf_w, dhn, a->xg, lnf_w, a->rstd, M, C, norm_scratch, threads);
    for (int i = 0; i < M; i++)
        memcpy(dx + (size_t)a->pos[i] * C, dxg + (size_t)i * C, sizeof(float) * (size_t)C);
}

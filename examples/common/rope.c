/*
 * rope.c - rotary position embedding. Pair p of a head is (x[p], x[p + D/2]) (the GPT-NeoX
 * "rotate half" layout), turned by the angle i * theta^(-2p/D) at position i. The rotation is
 * orthogonal, so the backward turns the gradient back by the same angle.
 */
#include <math.h>

#include "layers.h"

void rope_table(float *cos_t, float *sin_t, int L, int D, float theta)
{
    const int P = D / 2;
    for (int i = 0; i < L; i++)
        for (int p = 0; p < P; p++) {
            double angle = i * pow((double)theta, -2.0 * p / D);
            cos_t[(size_t)i * P + p] = (float)cos(angle);
            sin_t[(size_t)i * P + p] = (float)sin(angle);
        }
}

/* Turn every head of every row by +angle (dir = 1) or -angle (dir = -1). */
static void rotate(float *x, int B, int L, int H, int D, int ld, const float *cos_t,
                   const float *sin_t, float dir, int threads)
{
    const int P = D / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < B * L; t++) {
        const float *c = cos_t + (size_t)(t % L) * P, *s = sin_t + (size_t)(t % L) * P;
        for (int h = 0; h < H; h++) {
            float *v = x + (size_t)t * ld + (size_t)h * D;
            for (int p = 0; p < P; p++) {
                float a = v[p], b = v[p + P], sn = dir * s[p];
                v[p] = a * c[p] - b * sn;
                v[p + P] = b * c[p] + a * sn;
            }
        }
    }
}

void rope_forward(float *x, int B, int L, int H, int D, int ld, const float *cos_t,
                  const float *sin_t, int threads)
{
    rotate(x, B, L, H, D, ld, cos_t, sin_t, 1.0f, threads);
}

void rope_backward(float *dx, int B, int L, int H, int D, int ld, const float *cos_t,
                   const float *sin_t, int threads)
{
    rotate(dx, B, L, H, D, ld, cos_t, sin_t, -1.0f, threads);
}

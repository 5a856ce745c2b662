/* embedding.c - token and position embeddings: forward (a gather) and backward (a scatter-add). */
#include <string.h>

#include "layers.h"

void embedding_forward(float *out, const int32_t *tokens, const float *table, int N, int C,
                       int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < N; t++)
        memcpy(out + (size_t)t * C, table + (size_t)tokens[t] * C, sizeof(float) * (size_t)C);
}

void embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int N, int C)
{
    /* Tokens repeat, so rows are added in token order by one thread: a fixed summation order
     * (the cost, N * C adds, is small next to any matrix product). */
    for (int t = 0; t < N; t++) {
        float *row = dtable + (size_t)tokens[t] * C;
        const float *g = dout + (size_t)t * C;
        for (int c = 0; c < C; c++)
            row[c] += g[c];
    }
}

void position_forward(float *x, const float *table, int B, int L, int C, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < B * L; t++) {
        const float *p = table + (size_t)(t % L) * C;
        float *row = x + (size_t)t * C;
        for (int c = 0; c < C; c++)
            row[c] += p[c];
    }
}

void position_backward(float *dtable, const float *dout, int B, int L, int rows, int C,
                       int threads)
{
    /* position i sums its B rows in batch order; rows past L get 0 */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < rows; i++) {
        float *d = dtable + (size_t)i * C;
        memset(d, 0, sizeof(float) * (size_t)C);
        for (int b = 0; i < L && b < B; b++) {
            const float *g = dout + ((size_t)b * L + i) * C;
            for (int c = 0; c < C; c++)
                d[c] += g[c];
        }
    }
}

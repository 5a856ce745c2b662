/* embedding.c - token embedding: forward (a gather) and backward (a scatter-add). */
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

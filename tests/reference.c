/*
 * reference.c - see reference.h. Written for clarity, not speed: every rule of DESIGN.md
 * section 1 appears once, in the order the design states it.
 */
#include "reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Masks                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct candidate {
    float bias;
    int64_t key;
} candidate;

/* Larger bias first; among equal biases the earlier key first. */
static int candidate_order(const void *pa, const void *pb)
{
    const candidate *a = pa, *b = pb;
    if (a->bias > b->bias)
        return -1;
    if (a->bias < b->bias)
        return 1;
    return (a->key > b->key) - (a->key < b->key);
}

/* Whether row i may see key j at all: the key exists, and it is not in the future when the
 * mask is causal. The sliding window is always limited to j <= p, whatever `causal` says. */
static int key_visible(const ref_mask_args *a, int64_t b, int64_t i, int64_t j)
{
    int64_t p = i + (a->Lk - a->Lq); /* the diagonal, bottom-right aligned */
    if (a->padding != NULL) {
        int64_t bp = (a->Bp == 1) ? 0 : b;
        if (a->padding[bp * a->Lk + j] == 0)
            return 0;
    }
    if (a->kind == DMA_MASK_WINDOW || a->causal)
        return j <= p;
    return 1;
}

void ref_mask(const ref_mask_args *a, uint8_t *mask)
{
    const int64_t Lq = a->Lq, Lk = a->Lk;
    candidate *cand = malloc((size_t)(Lk > 0 ? Lk : 1) * sizeof *cand);
    uint8_t *row_sel = malloc((size_t)(Lk > 0 ? Lk : 1));

    for (int64_t b = 0; b < a->B; b++) {
        for (int64_t h = 0; h < a->H; h++) {
            for (int64_t i = 0; i < Lq; i++) {
                const float *bias = NULL;
                if (a->bias != NULL) {
                    int64_t bb = (a->Bb == 1) ? 0 : b;
                    int64_t hb = (a->Hb == 1) ? 0 : h;
                    int64_t lb = (a->Lb == 1) ? 0 : i;
                    bias = a->bias + ((bb * a->Hb + hb) * a->Lb + lb) * Lk;
                }
                int64_t p = i + (Lk - Lq);

                /* 1. the kind's own selection */
                memset(row_sel, 0, (size_t)Lk);
                switch (a->kind) {
                case DMA_MASK_DENSE:
                    for (int64_t j = 0; j < Lk; j++)
                        row_sel[j] = (uint8_t)key_visible(a, b, i, j);
                    break;
                case DMA_MASK_RELU:
                    for (int64_t j = 0; j < Lk; j++)
                        row_sel[j] = (uint8_t)(key_visible(a, b, i, j) && bias[j] > 0.0f);
                    break;
                case DMA_MASK_WINDOW:
                    for (int64_t j = 0; j < Lk; j++)
                        row_sel[j] = (uint8_t)(key_visible(a, b, i, j) && j > p - a->window);
                    break;
                case DMA_MASK_TOPK: {
                    int64_t n = 0;
                    for (int64_t j = 0; j < Lk; j++) {
                        if (key_visible(a, b, i, j) && bias[j] != -INFINITY) {
                            cand[n].bias = bias[j];
                            cand[n].key = j;
                            n++;
                        }
                    }
                    qsort(cand, (size_t)n, sizeof *cand, candidate_order);
                    for (int64_t r = 0; r < n && r < a->window; r++)
                        row_sel[cand[r].key] = 1;
                    break;
                }
                }

                /* 2. block smoothing: a block is kept whole when more than half of it was kept,
                 *    then the row is limited to the visible keys again */
                if (a->block_size > 1) {
                    for (int64_t start = 0; start < Lk; start += a->block_size) {
                        int64_t end = start + a->block_size < Lk ? start + a->block_size : Lk;
                        int64_t count = 0;
                        for (int64_t j = start; j < end; j++)
                            count += row_sel[j] != 0;
                        uint8_t keep = (uint8_t)(2 * count > end - start);
                        for (int64_t j = start; j < end; j++)
                            row_sel[j] = keep;
                    }
                    for (int64_t j = 0; j < Lk; j++)
                        row_sel[j] = (uint8_t)(row_sel[j] && key_visible(a, b, i, j));
                }

                memcpy(mask + ((b * a->H + h) * Lq + i) * Lk, row_sel, (size_t)Lk);
            }
        }
    }
    free(cand);
    free(row_sel);
}

int64_t ref_popcount(const uint8_t *p, int64_t n)
{
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++)
        count += p[i] != 0;
    return count;
}

/* ------------------------------------------------------------------------------------------ */
/* Forward                                                                                    */
/* ------------------------------------------------------------------------------------------ */

void ref_row_keys(const ref_fwd_args *a, int64_t b, int64_t h, int64_t i, uint8_t *use)
{
    const int64_t Lq = a->Lq, Lk = a->Lk;
    for (int64_t j = 0; j < Lk; j++) {
        int selected = 1;
        if (a->sel != NULL) {
            int64_t bs = (a->Bs == 1) ? 0 : b;
            int64_t hs = h / (a->Hq / a->Hs);
            selected = a->sel[((bs * a->Hs + hs) * Lq + i) * Lk + j] != 0;
        }
        if (a->causal && j > i + (Lk - Lq))
            selected = 0;
        use[j] = (uint8_t)selected;
    }
}

void ref_forward(const ref_fwd_args *a, double *out, double *lse)
{
    const int64_t B = a->B, Lq = a->Lq, Lk = a->Lk, Hq = a->Hq, Hkv = a->Hkv, D = a->D;
    const double scale = (a->scale != 0.0) ? a->scale : 1.0 / sqrt((double)D);
    double *score = malloc((size_t)(Lk > 0 ? Lk : 1) * sizeof *score);
    uint8_t *use = malloc((size_t)(Lk > 0 ? Lk : 1));

    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < Hq; h++) {
            const int64_t hk = h / (Hq / Hkv);
            for (int64_t i = 0; i < Lq; i++) {
                const float *qi = a->q + ((b * Lq + i) * Hq + h) * D;
                double *oi = out + ((b * Lq + i) * Hq + h) * D;
                double *li = lse + (b * Hq + h) * Lq + i;

                ref_row_keys(a, b, h, i, use);

                /* scores: scale * <q, k>, softcap, + bias */
                double max = -INFINITY;
                for (int64_t j = 0; j < Lk; j++) {
                    if (!use[j])
                        continue;
                    const float *kj = a->k + ((b * Lk + j) * Hkv + hk) * D;
                    double dot = 0.0;
                    for (int64_t d = 0; d < D; d++)
                        dot += (double)qi[d] * (double)kj[d];
                    double s = scale * dot;
                    if (a->softcap > 0.0)
                        s = a->softcap * tanh(s / a->softcap);
                    if (a->bias != NULL) {
                        int64_t bb = (a->Bb == 1) ? 0 : b;
                        int64_t hb = h / (Hq / a->Hb);
                        int64_t lb = (a->Lb == 1) ? 0 : i;
                        s += (double)a->bias[((bb * a->Hb + hb) * a->Lb + lb) * Lk + j];
                    }
                    score[j] = s;
                    if (s > max)
                        max = s;
                }

                /* softmax-weighted sum of v; an empty row (or one whose every score is -inf)
                 * gives out = 0 and lse = -inf */
                for (int64_t d = 0; d < D; d++)
                    oi[d] = 0.0;
                if (max == -INFINITY) {
                    *li = -INFINITY;
                    continue;
                }
                double sum = 0.0;
                for (int64_t j = 0; j < Lk; j++) {
                    if (!use[j])
                        continue;
                    double w = exp(score[j] - max);
                    const float *vj = a->v + ((b * Lk + j) * Hkv + hk) * D;
                    for (int64_t d = 0; d < D; d++)
                        oi[d] += w * (double)vj[d];
                    sum += w;
                }
                for (int64_t d = 0; d < D; d++)
                    oi[d] /= sum;
                *li = max + log(sum);
            }
        }
    }
    free(score);
    free(use);
}

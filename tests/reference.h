/*
 * reference.h - an independent, deliberately naive reference for dmattn, written from
 * DESIGN.md section 1 and the documentation in include/dmattn.h (not from lib/).
 *
 * Everything here is dense and brute force: a boolean (B, H, Lq, Lk) mask and a double
 * precision attention forward. All arrays are contiguous and row-major.
 */
#ifndef DMATTN_TESTS_REFERENCE_H
#define DMATTN_TESTS_REFERENCE_H

#include <stdint.h>

#include "dmattn.h"

/* Mask generation (dma_sparsity_build). */
typedef struct ref_mask_args {
    dma_mask_kind kind;
    int causal;
    int64_t window;
    int64_t block_size;
    int64_t B, H, Lq, Lk;
    /* bias: contiguous (Bb, Hb, Lb, Lk), Bb in {1, B}, Hb in {1, H}, Lb in {1, Lq};
     * NULL allowed for WINDOW and DENSE (the bias is not used by them). */
    const float *bias;
    int64_t Bb, Hb, Lb;
    /* key padding: contiguous (Bp, Lk), Bp in {1, B}, nonzero = the key exists; NULL = all exist. */
    const uint8_t *padding;
    int64_t Bp;
} ref_mask_args;

/** Writes the selection as a dense (B, H, Lq, Lk) array of 0/1 bytes. */
void ref_mask(const ref_mask_args *a, uint8_t *mask);

/** Number of nonzero bytes in p[0..n). */
int64_t ref_popcount(const uint8_t *p, int64_t n);

/* Attention forward (dma_forward). */
typedef struct ref_fwd_args {
    int64_t B, Lq, Lk, Hq, Hkv, D;
    const float *q; /* (B, Lq, Hq, D) */
    const float *k; /* (B, Lk, Hkv, D) */
    const float *v; /* (B, Lk, Hkv, D) */
    /* optional bias (Bb, Hb, Lb, Lk): Bb in {1, B}, Hb in {1, Hkv, Hq}, Lb in {1, Lq};
     * query head h reads bias head h / (Hq / Hb). */
    const float *bias;
    int64_t Bb, Hb, Lb;
    /* optional selection (Bs, Hs, Lq, Lk), nonzero = selected: Bs in {1, B}, Hs in {1, Hkv, Hq};
     * query head h uses selection head h / (Hq / Hs). NULL: every key is selected. */
    const uint8_t *sel;
    int64_t Bs, Hs;
    int causal;     /* nonzero: key j is hidden from query i when j > i + Lk - Lq */
    double scale;   /* 0: 1 / sqrt(D) */
    double softcap; /* > 0: score = softcap * tanh(score / softcap), before the bias */
} ref_fwd_args;

/** out: (B, Lq, Hq, D); lse: (B, Hq, Lq). A row without a selected key gets out = 0 and
 *  lse = -inf. */
void ref_forward(const ref_fwd_args *a, double *out, double *lse);

/** Which keys query row i of batch b, head h attends to (the selection, then the causal rule):
 *  use[j] = 1 or 0 for j < Lk. Shared by the forward and backward references. */
void ref_row_keys(const ref_fwd_args *a, int64_t b, int64_t h, int64_t i, uint8_t *use);

#endif /* DMATTN_TESTS_REFERENCE_H */

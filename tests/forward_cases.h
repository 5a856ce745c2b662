/*
 * forward_cases.h - test_forward's harness: a case (shapes, bias, selection, layout), its data,
 * and running it on every context of test_contexts_create() against reference.c.
 */
#ifndef DMATTN_TEST_FORWARD_CASES_H
#define DMATTN_TEST_FORWARD_CASES_H

#include <stdint.h>

#include "common.h"

#define TOL 1e-5

typedef enum sel_mode {
    SEL_NONE,  /* sp = NULL: every visible key */
    SEL_BUILD, /* dma_sparsity_build; the reference uses ref_mask */
    SEL_MASK   /* a random boolean mask through dma_sparsity_from_mask */
} sel_mode;

typedef struct fwd_case {
    int64_t B, Lq, Lk, Hq, Hkv, D;
    int causal;           /* dma_attn_params.causal */
    float scale, softcap; /* dma_attn_params */
    int64_t Bb, Hb, Lb;   /* forward bias (Bb, Hb, Lb, Lk); Bb == 0: no bias */
    int bias_neginf;      /* put -inf in the forward bias at some keys j > 0 */
    sel_mode sel;
    int64_t Bs, Hs;       /* the sparsity object's B and H */
    /* SEL_BUILD: */
    dma_mask_kind kind;
    int mask_causal;
    int64_t window, block_size;
    int64_t mBb, mHb, mLb; /* the builder's bias shape */
    int64_t Bp;            /* key padding (Bp, Lk); 0: none */
    /* SEL_MASK: */
    double density;
    int strided;      /* non-contiguous q, k, v, out, lse; stride-0 broadcast bias */
    int params_null;  /* pass params = NULL (scale, softcap and causal must then be 0) */
    int lse_null;     /* pass lse = NULL */
    int decaying;     /* SEL_BUILD: the builder's bias falls with the key, with a few late
                         risers, so that consecutive tiles select nearly the same keys */
    uint64_t seed;
} fwd_case;

enum { Q_PAD = 5, OUT_PAD = 3, LSE_PAD = 2 };

typedef struct fwd_data {
    /* logical, contiguous */
    float *q, *k, *v, *bias;
    uint8_t *sel;            /* (Bs, Hs, Lq, Lk) for the reference; NULL for SEL_NONE */
    float *mbias;            /* builder bias */
    uint8_t *pad;            /* builder key padding */
    uint8_t *mask;           /* SEL_MASK input */
    double *out_ref, *lse_ref;
    /* as given to dmattn */
    float *qbuf, *kvbuf, *outbuf, *lsebuf;
    size_t out_bytes, lse_bytes;
    dma_tensor tq, tk, tv, tbias, tout, tlse, tmbias, tpad, tmask;
} fwd_data;

/* The case's inputs, its reference out and lse, and dmattn's (laid-out) tensors. */
void fwd_data_make(const fwd_case *c, fwd_data *f);
/* Frees what fwd_data_make allocated. */
void fwd_data_free(fwd_data *f);
/* The case's sparsity object on context tc (NULL for SEL_NONE). */
dma_sparsity *make_sparsity(const fwd_case *c, fwd_data *f, const test_ctx *tc);
/* Compares dmattn's out and lse with the reference. */
void check_against_reference(const fwd_case *c, const fwd_data *f, const test_ctx *tc);
/* Runs each case on every context (reference, untouched gaps, bitwise threads). */
void run_cases(const fwd_case *cases, int n);
/* A plain dense, non-causal case without bias; tests change what they are about. */
fwd_case plain_case(int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv, int64_t D,
                    uint64_t seed);
/* Turns c into a SEL_BUILD case of the given kind (random object, builder bias). */
void make_build(test_rng *r, fwd_case *c, dma_mask_kind kind);
/* Turns c into a SEL_MASK case (a random boolean mask). */
void make_mask(test_rng *r, fwd_case *c);
/* Gives c a forward bias of random broadcast shape. */
void make_bias(test_rng *r, fwd_case *c);
/* A random case whose size B*Hq*Lq*Lk*D stays below max_work. */
fwd_case random_case(test_rng *r, int64_t max_len, double max_work);
/* n random cases from seed, run as run_cases does. */
void run_random(uint64_t seed, int n, int64_t max_len, double max_work);

#endif /* DMATTN_TEST_FORWARD_CASES_H */

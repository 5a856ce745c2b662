/*
 * backward_cases.h - the harness of test_backward.c and test_backward_fd.c: a case (shapes, bias,
 * selection, padded layouts), its data and reference, the calls into dmattn, the checks against
 * the reference, byte snapshots of every buffer, and running cases on every context of
 * test_contexts_create().
 */
#ifndef DMATTN_TEST_BACKWARD_CASES_H
#define DMATTN_TEST_BACKWARD_CASES_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "reference.h"

/* ck_assert_msg() reports every passing check to the Check runner (a write per call in fork
 * mode): far too slow for per-element checks. CHECK only calls Check when it fails. */
#define CHECK(expr, ...)                                                                         \
    do {                                                                                         \
        if (!(expr))                                                                             \
            ck_abort_msg(__VA_ARGS__);                                                           \
    } while (0)

/*
 * Tolerance against the reference, per entry: |got - ref| <= ATOL + RTOL * mag, where mag is
 * the same sum as the entry with every factor replaced by its absolute value (the reference
 * computes it: reference_backward.h). That is the scale of the entry's float32 rounding error:
 * an entry is a sum over up to Lq * Hq / Hkv (<= 1200 here) rows of products whose factor
 * dP - delta is itself the difference of two D-term dot products (D <= 256) that cancel (a row
 * with one key has dP == delta exactly, so its exact dbias is 0 while the float one is not).
 * Error bounds for such sums are ~n * eps * mag with eps = 6e-8 and n the number of terms on
 * the longest path (D + rows + keys, < 2000 here): 1e-4 * mag covers it, and real rounding
 * errors grow like sqrt(n) * eps * mag: the largest measured in this suite is 0.015 of the
 * tolerance (x86 scalar/AVX2, aarch64 scalar/NEON; DMATTN_TEST_VERBOSE=1 prints it). Any real
 * error (a missing softcap derivative, a wrong scale, a dropped or doubled key, a wrong
 * reduction over broadcast axes) is off by a large fraction of mag. A tolerance relative to
 * the entry or to the tensor's largest entry would fail on those cancelling entries. ATOL
 * covers entries whose every term is tiny.
 */
#define ATOL 1e-6
#define RTOL 1e-4
#define FWD_TOL 1e-4 /* out and lse of the forward (only to name a forward failure as one) */

typedef enum sel_mode {
    SEL_NONE, /* sp = NULL: every visible key (dense, or causal) */
    SEL_TOPK, /* dma_sparsity_build(TOPK); the reference uses ref_mask */
    SEL_MASK  /* a random boolean mask through dma_sparsity_from_mask */
} sel_mode;

typedef struct bwd_case {
    int64_t B, Lq, Lk, Hq, Hkv, D;
    int causal;           /* dma_attn_params.causal */
    float scale, softcap; /* dma_attn_params */
    int64_t Bb, Hb, Lb;   /* attention bias (Bb, Hb, Lb, Lk); Bb == 0: no bias */
    int bias_is_mbias;    /* the attention bias holds the builder's bias values (the DMA way) */
    int bias_neginf;      /* some attention bias entries are -inf */
    int no_dbias;         /* a bias but dbias = NULL */
    sel_mode sel;
    int64_t Bs, Hs; /* the sparsity object's B and H */
    /* SEL_TOPK: */
    int mask_causal;
    int64_t window;
    int64_t mBb, mHb, mLb; /* the builder's bias shape */
    int64_t Bp;            /* key padding (Bp, Lk); 0: none */
    /* SEL_MASK: */
    double density;
    int strided;     /* every tensor with padded rows; the gaps of outputs must stay untouched */
    int params_null; /* params = NULL (scale, softcap, causal must be 0) */
    int dyadic;      /* q, k, v, biases are multiples of 1/256 (finite differences) */
    int decaying;    /* SEL_TOPK: the builder's bias falls with the key, with a few late risers,
                        so that consecutive tiles select nearly the same keys */
    uint64_t seed;
} bwd_case;

/* A padded tensor: a (rows x inner) array laid out with `pad` extra floats after every row,
 * and its dma_tensor view. */
typedef struct ptensor {
    float *buf;
    size_t bytes;
    int64_t rows, inner, pad;
    dma_tensor t;
} ptensor;

typedef struct bwd_data {
    /* logical, contiguous */
    float *q, *k, *v, *bias, *dout;
    float *mbias;  /* builder bias (SEL_TOPK) */
    uint8_t *pad;  /* builder key padding */
    uint8_t *mask; /* SEL_MASK input */
    uint8_t *sel;  /* (Bs, Hs, Lq, Lk) selection for the reference; NULL for SEL_NONE */
    /* reference */
    double *out_ref, *lse_ref; /* the forward, to tell forward failures from backward ones */
    double *dq_ref, *dk_ref, *dv_ref, *dbias_ref;
    double *dq_mag, *dk_mag, *dv_mag, *dbias_mag; /* error scale of each entry */
    uint8_t *live_q, *live_kv, *live_bias;
    /* as given to dmattn */
    ptensor pq, pk, pv, pbias, pdout, pout, plse, pdq, pdk, pdv, pdbias;
    dma_tensor tmbias, tpad, tmask;
} bwd_data;

/* Byte copies of every buffer, to compare runs bit for bit. */
typedef struct snapshot {
    unsigned char *p[11];
    size_t n[11];
} snapshot;

/* The snapshot's buffers: inputs [0, 5), outputs [5, 7), gradients [7, 11). */
enum { SNAP_FIRST_OUTPUT = 5, SNAP_FIRST_GRAD = 7 };

/* The case's fields, for failure messages (a static buffer). */
const char *describe(const bwd_case *c);

/* A dense, non-causal case without bias; tests then change what they are about. */
bwd_case plain_case(int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv,
                    int64_t D, uint64_t seed);

/* Top-k over a builder bias. per_row: bias (mBb, mHb, Lq, Lk) and object H in {Hq, Hkv, 1};
 * else the DMA per-key bias (mBb, mHb, 1, Lk) and object H in {Hkv, 1}. */
void set_topk(test_rng *r, bwd_case *c, int per_row, int64_t window);

/* The attention bias is the builder's bias (same values, same shape). */
void bias_from_mbias(bwd_case *c);

/* An attention bias of random broadcast shape. */
void random_bias(test_rng *r, bwd_case *c);

/* A window for a top-k case: 1, 7, 64, Lk or Lk + 3. */
int64_t random_window(test_rng *r, const bwd_case *c);

/* A random case whose size B * Hq * Lq * Lk * D stays below max_work. */
bwd_case random_case(test_rng *r, int64_t max_len, double max_work);

/* The element with logical (contiguous) index x. */
float *pt_at(const ptensor *p, int64_t x);

/* Elements of the logical (contiguous) array. */
int64_t pt_count(const ptensor *p);

/* The reference forward's arguments for the case's logical arrays. */
ref_fwd_args ref_args(const bwd_case *c, const bwd_data *f);

/* The case's inputs (logical and laid out), selection and reference results. */
void data_make(const bwd_case *c, bwd_data *f);

/* Frees what data_make allocated. */
void data_free(bwd_data *f);

/* The case's sparsity object on ctx (NULL for SEL_NONE). */
dma_sparsity *make_sparsity(const bwd_case *c, bwd_data *f, dma_context *ctx);

/* Runs the forward into out and lse; must succeed. */
void call_forward(const bwd_case *c, bwd_data *f, dma_context *ctx, const dma_sparsity *sp);

/* Fills the gradient buffers with the sentinel, then runs the backward; must succeed. */
void call_backward(const bwd_case *c, bwd_data *f, dma_context *ctx, const dma_sparsity *sp);

/* dq, dk, dv and dbias against the reference within ATOL + RTOL * mag; a NULL dbias left
 * unwritten. */
void check_against_reference(const bwd_case *c, const bwd_data *f, dma_context *ctx);

/* The forward's out and lse, which the backward reads, must be right before the backward can
 * be: checked loosely (test_forward.c checks them tightly) so that a forward failure is named as
 * one. */
void check_forward(const bwd_case *c, const bwd_data *f, dma_context *ctx);

/* Copies every buffer into s. */
void snap_take(snapshot *s, const bwd_data *f);

/* Name of the first buffer in [from, to) that differs from the snapshot, or NULL. */
const char *snap_diff(const snapshot *s, const bwd_data *f, int from, int to);

/* Frees s's copies. */
void snap_free(snapshot *s);

/* Forward + backward of one case on every context; each against the reference; threads 2 of an
 * ISA must reproduce threads 1 bit for bit; the inputs of the backward must not change. */
void run_case(const bwd_case *c, const test_ctx *ctxs, int nctx);

/* run_case on every context of test_contexts_create(), for each case. */
void run_cases(const bwd_case *cases, int n);

/* n random cases from seed, run as run_cases does. */
void run_random(uint64_t seed, int n, int64_t max_len, double max_work);

#endif /* DMATTN_TEST_BACKWARD_CASES_H */

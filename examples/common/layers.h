/*
 * layers.h - the layers of the small decoder-only model, each as a forward and a backward
 * function side by side in one file (embedding.c, rmsnorm.c, rope.c, linear.c, mlp.c,
 * attention.c, lm_head.c). model.c chains them into a training step.
 *
 * Conventions:
 * - Activations are row-major token-by-feature matrices: N = B * L tokens, token t = b * L + i.
 * - Weights of linear maps are stored (in, out): y = x W.
 * - A parameter's gradient is written whole by the one layer that uses the parameter (each is used
 *   once per step); gradients of activations are written or added as each function says.
 * - `threads` is the OpenMP thread count; matrix products run on OpenBLAS sgemm, split across
 *   those threads by linear.c (OpenBLAS itself runs one thread: model_create sets it).
 * - Reductions over tokens run in a fixed order: a given thread count reproduces its results
 *   bit for bit.
 */
#ifndef DMTRAIN_LAYERS_H
#define DMTRAIN_LAYERS_H

#include <stddef.h>
#include <stdint.h>

#include <dmattn.h>

/* ---- embedding.c: token and position embeddings ---- */

/** out[t] = table[tokens[t]] for t < N (rows of C floats). Tokens must be in [0, vocab). */
void embedding_forward(float *out, const int32_t *tokens, const float *table, int N, int C,
                       int threads);
/** dtable (vocab x C) += the sum of dout[t] over the tokens t that read each row (added: a tied
 *  LM head has written its share first). */
void embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int N, int C);

/** x (B*L rows of C) += table[i] at position i of each sequence: a learned absolute position
 *  embedding. */
void position_forward(float *x, const float *table, int B, int L, int C, int threads);
/** dtable (rows x C, rows >= L) = the sum over the batch of dout at each position (rows past L
 *  get 0: written whole). */
void position_backward(float *dtable, const float *dout, int B, int L, int rows, int C,
                       int threads);

/* ---- rmsnorm.c: y = x / rms(x) * w ---- */

/** out, x: N x C; rstd (N) receives 1 / sqrt(mean(x^2) + eps) for the backward. */
void rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C,
                     float eps, int threads);
/** Floats of scratch rmsnorm_backward needs: the per-block partial sums of dw. */
size_t rmsnorm_scratch_floats(int N, int C);
/** dx (N x C) += d/dx, dw (C) = d/dw (written); `scratch` as rmsnorm_scratch_floats. */
void rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                      const float *rstd, int N, int C, float *scratch, int threads);

/* ---- rope.c: rotary position embedding (halves of each head rotated, GPT-NeoX style) ---- */

/** cos/sin tables (L x D/2): angle of pair p at position i = i * theta^(-2p/D). D is even. */
void rope_table(float *cos_t, float *sin_t, int L, int D, float theta);
/** Rotate, in place, the first H heads (D floats each) of every token row of x (B*L rows with
 *  row stride ld floats); token t = b * L + i is at position i. */
void rope_forward(float *x, int B, int L, int H, int D, int ld, const float *cos_t,
                  const float *sin_t, int threads);
/** The backward: the inverse rotation of the gradient, in place (same layout). */
void rope_backward(float *dx, int B, int L, int H, int D, int ld, const float *cos_t,
                   const float *sin_t, int threads);

/* ---- linear.c: y = x W on sgemm ---- */

/** out (N x n_out) = x (N x n_in) W (n_in x n_out), or out += x W when `accumulate`. */
void linear_forward(float *out, const float *x, const float *w, int N, int n_in, int n_out,
                    int accumulate, int threads);
/** dx (N x n_in) = dout W^T (or += when `accumulate_dx`; dx may be NULL: not computed);
 *  dw (n_in x n_out) = x^T dout (written). */
void linear_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                     int N, int n_in, int n_out, int accumulate_dx, int threads);

/** The same with W stored transposed, n_out x n_in (out = x W^T; dW written n_out x n_in):
 *  the tied LM head multiplies by the embedding table. */
void linear_forward_t(float *out, const float *x, const float *w, int N, int n_in, int n_out,
                      int accumulate, int threads);
void linear_backward_t(float *dx, float *dw, const float *dout, const float *x, const float *w,
                       int N, int n_in, int n_out, int accumulate_dx, int threads);

/* ---- mlp.c: SwiGLU MLP, y = (silu(x Wg) * (x Wu)) Wd ---- */

/** w_gu is C x 2F: columns [0, F) are the gate, [F, 2F) the up projection; w_down is F x C.
 *  gu (N x 2F) and h (N x F) are kept for the backward. out (N x C) += the MLP's output (the
 *  residual add is fused into the last product). */
void mlp_forward(float *out, float *gu, float *h, const float *x, const float *w_gu,
                 const float *w_down, int N, int C, int F, int threads);
/** dx (N x C) = the gradient of x (written); dw_gu, dw_down written. dgu (N x 2F) and dh
 *  (N x F) are scratch. */
void mlp_backward(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                  const float *gu, const float *h, const float *w_gu, const float *w_down,
                  float *dgu, float *dh, int N, int C, int F, int threads);

/* ---- attention.c: causal self-attention through libdmattn ---- */

typedef enum attn_kind {
    ATTN_DENSE = 0, /* every earlier key (causal MHA/GQA, the library's dense path) */
    ATTN_SWA = 1,   /* the last `window` keys (the library's WINDOW mask) */
    ATTN_DMA = 2    /* the `window` keys of largest value-derived bias (dynamic mask) */
} attn_kind;

/** "dense", "swa", "dma"; NULL for an unknown kind. */
const char *attn_kind_name(attn_kind kind);
/** The kind named `name`; -1 if none. */
int attn_kind_parse(const char *name);

/** Shapes of one attention layer call. qkv rows are [q (Hq*D) | k (Hkv*D) | v (Hkv*D)]. */
typedef struct attn_dims {
    int B, L, C, Hq, Hkv, D;
    attn_kind kind;
    int window;
} attn_dims;

/** Parameters: w_qkv (C x (Hq+2Hkv)D), w_o (Hq*D x C); for ATTN_DMA also the mask generator
 *  w_dt (Hkv*D x Hkv), b_dt (Hkv), a_dt (Hkv) of DESIGN §1. */
typedef struct attn_params {
    float *w_qkv, *w_o, *w_dt, *b_dt, *a_dt;
} attn_params;

/** What the forward keeps for the backward. qkv holds q and k after RoPE. sp is owned: made by
 *  every forward (the previous one is freed), freed by attention_acts_release. */
typedef struct attn_acts {
    float *qkv;  /* N x (Hq+2Hkv)D */
    float *att;  /* N x Hq*D: the attention output before w_o */
    float *lse;  /* B x Hq x L */
    float *bias; /* B x Hkv x L (dma) */
    dma_sparsity *sp;
} attn_acts;

/** Backward scratch: dqkv (N x (Hq+2Hkv)D), datt (N x Hq*D), dbias (B x Hkv x L). */
typedef struct attn_scratch {
    float *dqkv, *datt, *dbias;
} attn_scratch;

/** out (N x C) += attention(x) W_o, x (N x C) normalised input. 0 on success; otherwise -1
 *  with a sentence in err (a libdmattn status, e.g. a non-finite dynamic bias). */
int attention_forward(dma_context *ctx, const attn_dims *d, const attn_params *p, attn_acts *a,
                      const float *cos_t, const float *sin_t, const float *x, float *out,
                      char *err, size_t errlen);
/** dx (N x C) = the gradient of x (written); the gradients of p are written into g (same
 *  fields). */
int attention_backward(dma_context *ctx, const attn_dims *d, const attn_params *p,
                       const attn_params *g, const attn_acts *a, attn_scratch *s,
                       const float *cos_t, const float *sin_t, const float *x,
                       const float *dout, float *dx, char *err, size_t errlen);
void attention_acts_release(attn_acts *a);

/* ---- lm_head.c: final RMSNorm, logits and cross-entropy at labelled positions only ---- */

/** What the forward keeps: the M labelled positions, their gathered inputs, norms and
 *  softmax probabilities. Buffers sized by the caller for the largest M (the token count). */
typedef struct lm_head_acts {
    int M;
    int32_t *pos;    /* M token indices */
    int32_t *label;  /* M labels */
    float *xg;       /* M x C gathered inputs */
    float *hn;       /* M x C normalised */
    float *rstd;     /* M */
    float *probs;    /* M x V */
} lm_head_acts;

/** Loss over the positions t with labels[t] >= 0 (labels < vocab): returns the sum over them of
 *  -log softmax(logits)[label] (double), sets a->M and *correct (argmax == label, first
 *  maximum on ties). Logits of unlabelled positions are never formed. w_head is C x V, or
 *  V x C when `tied` (the embedding table itself). */
double lm_head_forward(lm_head_acts *a, const float *x, const int32_t *labels, int N, int C,
                       int V, const float *lnf_w, const float *w_head, int tied, float eps,
                       int *correct, int threads);
/** Gradient of loss_sum * scale (scale = 1 / labelled count for a mean): dx (N x C) written whole
 *  (zero at unlabelled tokens), dlnf_w and dw_head written. dlogits (M x V), dhn and dxg
 *  (M x C each) and norm_scratch (rmsnorm_scratch_floats(M, C)) are scratch. */
void lm_head_backward(float *dx, float *dlnf_w, float *dw_head, const lm_head_acts *a,
                      float scale, const float *lnf_w, const float *w_head, int tied, int N,
                      int C, int V, float *dlogits, float *dhn, float *dxg, float *norm_scratch,
                      int threads);

#endif /* DMTRAIN_LAYERS_H */

/*
 * model.h - a small decoder-only language model trained on the CPU, with attention through
 * libdmattn (dense, sliding window or dynamic mask), and its AdamW optimizer.
 *
 *   tokens -> embedding -> n_layers x [x += attention(rmsnorm(x)); x += mlp(rmsnorm(x))]
 *          -> rmsnorm -> logits at labelled positions -> cross-entropy
 * (attn_only drops the MLP half of each block).
 *
 * One training step is model_train_step(): model_forward, model_backward, model_update, in
 * model.c, top to bottom. Parameters, gradients and the AdamW moments are four flat float
 * arrays with one layout (model->tensors names its pieces), which is also what a checkpoint
 * stores.
 *
 * Errors: functions that can fail return 0 on success and -1 otherwise, with a sentence in
 * model->error (or in the caller's buffer for model_create); they never print or abort.
 * Threads: `threads` OpenMP threads run everything: the elementwise loops, libdmattn, and the
 * matrix products, which linear.c splits into one-thread OpenBLAS calls (model_create calls
 * openblas_set_num_threads(1), a setting of the whole process). Results are bitwise
 * reproducible for a given thread count.
 */
#ifndef DMTRAIN_MODEL_H
#define DMTRAIN_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "layers.h"

/** Model shape. d_model = n_heads * head_dim; head_dim (d_model / n_heads) must be even. */
typedef struct model_config {
    int vocab;      /* token ids are 0 .. vocab-1 */
    int d_model;    /* C */
    int n_layers;
    int n_heads;    /* query heads Hq */
    int n_kv_heads; /* key/value heads Hkv (divides n_heads) */
    int d_ff;       /* SwiGLU hidden width F */
    int max_seq;    /* longest sequence (RoPE table, activation buffers) */
    attn_kind attn;
    int window;     /* keys per query for swa and dma (ignored by dense) */
    int attn_only;  /* nonzero: blocks without the MLP, x += attention(rmsnorm(x)) only (the
                       recall models of Zoology, whose "state mixer" is the identity) */
    int tie_embeddings; /* nonzero: the LM head multiplies by the embedding table (as Zoology's
                           models do), no separate w_head */
    int pos_embeddings; /* nonzero: a learned absolute position embedding (max_seq x d_model)
                           added to the token embedding (as Zoology's attention models), besides
                           RoPE */
    float rope_theta;
    float norm_eps;
    float init_std; /* standard deviation of the weights; output projections get
                       init_std / sqrt(2 n_layers) */
} model_config;

/** A config with the defaults filled in: d_ff = 4 * d_model rounded to a multiple of 8 when 0,
 *  rope_theta 10000, norm_eps 1e-5, init_std 0.02, n_kv_heads = n_heads when 0. */
model_config model_config_defaults(model_config c);

/** 0 if every field is in range; otherwise -1 and a sentence in err. */
int model_config_check(const model_config *c, char *err, size_t errlen);

/** The number of parameters a configuration (checked by model_config_check) has, without
 *  allocating anything: what a checkpoint's stored count must equal before a model is made. */
size_t model_param_count(const model_config *c);

/** AdamW with linear warm-up and cosine decay to min_lr at total_steps, global-norm clipping. */
typedef struct adamw_config {
    float lr, min_lr;
    float beta1, beta2, eps;
    float weight_decay;  /* decoupled; applied to matrices only (not norms, b_dt, A) */
    float grad_clip;     /* > 0: scale the gradient to this global norm when above it */
    int warmup_steps, total_steps;
} adamw_config;

/** lr 1e-3, min_lr lr/10, betas 0.9/0.95, eps 1e-8, weight decay 0.1, clip 1, no warm-up,
 *  total_steps 1000 (fields that are 0 in c get these). */
adamw_config adamw_config_defaults(adamw_config c);
/** The learning rate of step `step` (0-based). */
float adamw_lr(const adamw_config *o, int64_t step);
int adamw_config_check(const adamw_config *o, char *err, size_t errlen);

/** One named piece of the flat parameter array. */
typedef struct param_tensor {
    char name[32];
    size_t offset, count;
    int rows, cols;  /* cols == 1 for vectors */
    int decay;       /* weight decay applies */
} param_tensor;

/** A batch: B sequences of L tokens (row-major), labels[t] the target at token t or -1. */
typedef struct batch {
    int B, L;
    const int32_t *tokens;
    const int32_t *labels;
} batch;

/** What one step measured. */
typedef struct step_stats {
    double loss;       /* mean cross-entropy over labelled positions */
    int correct;       /* labelled positions whose argmax is the label */
    int labelled;
    double grad_norm;  /* global norm before clipping */
    float lr;
    double seconds;    /* wall time of the step */
} step_stats;

/** Wall time per phase, summed over calls (model_profile_reset zeroes it). */
enum {
    PROF_EMBED, PROF_NORM, PROF_ATTN_FWD, PROF_MLP_FWD, PROF_HEAD_FWD, PROF_HEAD_BWD,
    PROF_MLP_BWD, PROF_ATTN_BWD, PROF_NORM_BWD, PROF_EMBED_BWD, PROF_UPDATE, PROF_COUNT
};
extern const char *const model_profile_names[PROF_COUNT];

/* The parameters of one block, as pointers into a flat array (parameters or gradients). */
typedef struct block_params {
    float *ln1_w, *ln2_w, *w_gu, *w_down;
    attn_params attn;
} block_params;

/* What one block's forward keeps for the backward. */
typedef struct block_acts {
    float *x_mid;            /* N x C: x after the attention's residual add */
    float *ln1, *ln1_rstd;   /* N x C, N */
    float *ln2, *ln2_rstd;
    attn_acts attn;
    float *gu, *h;           /* N x 2F, N x F */
} block_acts;

typedef struct model {
    model_config cfg;
    int max_batch, threads;
    dma_context *ctx;

    /* flat arrays of n_params floats, one layout */
    size_t n_params;
    float *params, *grads, *adam_m, *adam_v;
    int n_tensors;
    param_tensor *tensors;
    int64_t step; /* optimizer steps taken */

    /* views into params and grads */
    float *tok_emb, *pos_emb, *lnf_w, *w_head;
    float *g_tok_emb, *g_pos_emb, *g_lnf_w, *g_w_head;
    block_params *blocks, *g_blocks;

    /* the last forward: its batch shape, tokens, activations */
    int B, L;
    int32_t *tokens;
    float **resid;           /* n_layers + 1 arrays N x C: the input of each block, then the
                                output of the last */
    block_acts *acts;
    lm_head_acts head;
    int head_capacity;       /* labelled positions the head's buffers hold */
    float *rope_cos, *rope_sin;

    /* backward scratch */
    float *d_resid, *d_norm, *norm_scratch, *d_gu, *d_h, *d_logits, *d_hn, *d_xg;
    attn_scratch attn_scratch;

    double prof[PROF_COUNT];
    char error[512];
} model;

/** Allocate a model for batches of up to max_batch sequences of up to cfg->max_seq tokens and
 *  initialise its weights from `seed` (normal(0, init_std) matrices, unit norm weights,
 *  b_dt = 0 and A = 0 for dma, as flash-dmattn's Doge model). 0 on success; -1 with a sentence
 *  in err. */
int model_create(const model_config *cfg, int max_batch, int threads, uint64_t seed,
                 model **out, char *err, size_t errlen);
void model_destroy(model *m);

/** Forward of a batch: fills st->loss, correct, labelled. -1 on a bad batch (shape, token or
 *  label out of range) or a library error, with the message in m->error. */
int model_forward(model *m, const batch *b, step_stats *st);
/** Backward of the last forward: m->grads written whole. */
int model_backward(model *m);
/** Global norm of the gradient, clipping, one AdamW step, step + 1. Fails, changing nothing,
 *  when the gradient norm is not finite. */
int model_update(model *m, const adamw_config *opt, step_stats *st);
/** All three, plus a stop with a clear message when the loss is not finite. */
int model_train_step(model *m, const adamw_config *opt, const batch *b, step_stats *st);

void model_profile_reset(model *m);

#endif /* DMTRAIN_MODEL_H */

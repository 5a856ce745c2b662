/*
 * train_loop.h - the training loop the example programs share (mqar, niah): open a run (resume
 * its checkpoint, or create the model), then step through it with progress output, periodic
 * evaluation, checkpoints, and the time and accuracy budgets. What differs between the programs
 * (their data and their held-out test) comes in as two hooks.
 *
 * A run's checkpoint carries, as its caller's section, the run's description (`run_id`, which
 * the program writes from its data settings) followed by " secs=<training seconds so far>". A
 * checkpoint whose description, model configuration or optimizer settings differ from the
 * run's is refused, so a resumed run is the unbroken one, bit for bit.
 *
 * Errors: 0 on success; -1 with a sentence in err (which names the program). Nothing prints
 * except the progress output (stdout) when not `quiet`.
 */
#ifndef DMTRAIN_TRAIN_LOOP_H
#define DMTRAIN_TRAIN_LOOP_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

typedef struct train_settings {
    const char *program;    /* prefixes messages, e.g. "mqar" */
    const char *run_id;     /* the data settings, e.g. "mqar v1 L=256 kv=8 ..." (< 200 chars) */
    const char *checkpoint; /* save here every save_every steps; NULL: never save */
    int batch, seq_len;     /* every training batch is batch x seq_len tokens */
    int steps;              /* the run's length (the optimizer's schedule is set for it) */
    int save_every;         /* steps between checkpoints */
    int eval_every;         /* evaluate every N steps (0: never during training) */
    float max_minutes;      /* stop after this much training time, earlier sessions included
                               (0: no limit) */
    float stop_at;          /* with eval_every: stop once the evaluation reaches this accuracy */
    int quiet;              /* no progress output */
} train_settings;

typedef struct train_hooks {
    void *ctx;
    /* Fill tokens and labels (batch x seq_len) with the training batch of step `step`. */
    void (*make_batch)(void *ctx, int64_t step, int32_t *tokens, int32_t *labels);
    /* Accuracy and loss on held-out data; 0, or -1 with the reason in m->error. Only called
       when eval_every > 0. */
    int (*evaluate)(void *ctx, model *m, double *accuracy, double *loss);
} train_hooks;

typedef struct train_outcome {
    double seconds;      /* training time of the whole run, earlier sessions included */
    double last_loss;    /* the last step's loss (NaN when no step ran in this session) */
    double tokens_per_s; /* of the whole run */
    int stopped_early;   /* 1: max_minutes or stop_at ended it before `steps` */
} train_outcome;

/**
 * Resume the run from s->checkpoint when that file exists (its model, optimizer step and
 * training time), else create the model from `seed`. The model is made for batches of
 * `max_batch` sequences and `threads` threads. *trained_seconds receives the time of earlier
 * sessions (0 for a new run).
 */
int train_open(const train_settings *s, const model_config *mc, const adamw_config *opt,
               uint64_t seed, int max_batch, int threads, model **out, double *trained_seconds,
               char *err, size_t errlen);

/**
 * Train from the model's step to s->steps (or a budget): one model_train_step per batch, the
 * progress line, an evaluation every eval_every steps (printed), a checkpoint every save_every
 * steps and when the run ends or stops. The model must have been made for batches of at least
 * s->batch sequences of s->seq_len tokens.
 */
int train_run(model *m, const adamw_config *opt, const train_settings *s,
              const train_hooks *h, double trained_seconds, train_outcome *o, char *err,
              size_t errlen);

/** The examples' AdamW settings: betas 0.9 / 0.95, eps 1e-8; min_lr 0 means lr / 10, warmup 0
 *  means 5% of the steps (at most all of them). 0, or -1 with a sentence in err. */
int train_adamw(float lr, float min_lr, float weight_decay, float grad_clip, int steps,
                int warmup, adamw_config *out, char *err, size_t errlen);

/** Forward-only scores summed over batches: the evaluations of the example programs. */
typedef struct eval_sum {
    long correct, labelled;
    double loss_sum; /* loss x labelled positions */
} eval_sum;

/** model_forward of one batch, added to *s. 0, or -1 with the reason in m->error. */
int eval_add(model *m, const batch *b, eval_sum *s);

/** Accuracy (correct / labelled) and mean loss of the sums so far (0 when nothing was
 *  labelled). */
void eval_result(const eval_sum *s, double *accuracy, double *loss);

#endif /* DMTRAIN_TRAIN_LOOP_H */

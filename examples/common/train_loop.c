/* train_loop.c - see train_loop.h. */
#include "train_loop.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <omp.h>

#include "checkpoint.h"
#include "progress.h"

/* The caller's section of a checkpoint: "<run_id> secs=<seconds>". */
static int describe(const train_settings *s, char *buf, size_t len, double seconds)
{
    return snprintf(buf, len, "%s secs=%.3f", s->run_id, seconds);
}

int train_open(const train_settings *s, const model_config *mc, const adamw_config *opt,
               uint64_t seed, int max_batch, int threads, model **out, double *trained_seconds,
               char *err, size_t errlen)
{
    *trained_seconds = 0.0;
    if (!s->checkpoint || access(s->checkpoint, F_OK) != 0)
        return model_create(mc, max_batch, threads, seed, out, err, errlen);

    model *m = NULL;
    adamw_config saved;
    char got[CHECKPOINT_USER_MAX + 1];
    uint32_t n = 0;
    if (checkpoint_load(s->checkpoint, max_batch, threads, &m, &saved, got,
                        CHECKPOINT_USER_MAX, &n, err, errlen))
        return -1;
    got[n] = '\0';
    /* the same run: data settings (all but the time), model configuration, optimizer */
    const char *secs = strstr(got, " secs=");
    size_t id_len = strlen(s->run_id);
    if (!secs || (size_t)(secs - got) != id_len || strncmp(got, s->run_id, id_len) != 0 ||
        memcmp(&m->cfg, mc, sizeof *mc) != 0 || memcmp(&saved, opt, sizeof *opt) != 0) {
        snprintf(err, errlen, "%s: %s belongs to another run (%s, %s attention, d_model %d, "
                 "%d layers); this run is %s with %s attention, d_model %d, %d layers",
                 s->program, s->checkpoint, got, attn_kind_name(m->cfg.attn), m->cfg.d_model,
                 m->cfg.n_layers, s->run_id, attn_kind_name(mc->attn), mc->d_model,
                 mc->n_layers);
        model_destroy(m);
        return -1;
    }
    *trained_seconds = atof(secs + 6);
    *out = m;
    return 0;
}

static int save(model *m, const adamw_config *opt, const train_settings *s, double seconds,
                char *err, size_t errlen)
{
    char user[512];
    int n = describe(s, user, sizeof user, seconds);
    if (n < 0 || (size_t)n >= sizeof user) {
        snprintf(err, errlen, "%s: the run's description is too long", s->program);
        return -1;
    }
    return checkpoint_save(m, opt, user, (uint32_t)n, s->checkpoint, err, errlen);
}

int train_run(model *m, const adamw_config *opt, const train_settings *s,
              const train_hooks *h, double trained_seconds, train_outcome *o, char *err,
              size_t errlen)
{
    const size_t n = (size_t)s->batch * (size_t)s->seq_len;
    int32_t *tok = malloc(sizeof(int32_t) * n), *lab = malloc(sizeof(int32_t) * n);
    if (!tok || !lab) {
        free(tok);
        free(lab);
        snprintf(err, errlen, "%s: out of memory for a batch of %zu tokens", s->program, n);
        return -1;
    }
    progress prog;
    if (!s->quiet)
        progress_begin(&prog, stdout, "train", m->step, s->steps);
    const int64_t first_step = m->step;
    double running_acc = -1.0, t_start = omp_get_wtime();
    o->last_loss = NAN;
    o->stopped_early = 0;
    int status = 0, ended = 0;
    while (m->step < s->steps) {
        h->make_batch(h->ctx, m->step, tok, lab);
        batch bt = {s->batch, s->seq_len, tok, lab};
        step_stats st;
        if (model_train_step(m, opt, &bt, &st)) {
            snprintf(err, errlen, "%s: %s", s->program, m->error);
            status = -1;
            break;
        }
        o->last_loss = st.loss;
        double acc = st.labelled ? (double)st.correct / st.labelled : 0.0;
        running_acc = running_acc < 0 ? acc : 0.95 * running_acc + 0.05 * acc;
        double elapsed = omp_get_wtime() - t_start;
        double rate = (double)(m->step - first_step) * (double)n / elapsed;
        if (!s->quiet)
            progress_step(&prog, m->step, st.loss, running_acc, rate);
        /* The budget counts the time of earlier sessions of a resumed run too. */
        int out_of_time = s->max_minutes > 0 &&
                          trained_seconds + elapsed > 60.0 * s->max_minutes;
        int learnt = 0;
        if (s->eval_every > 0 && (m->step % s->eval_every == 0 || out_of_time)) {
            double ea, el;
            if (h->evaluate(h->ctx, m, &ea, &el)) {
                snprintf(err, errlen, "%s: %s", s->program, m->error);
                status = -1;
                break;
            }
            if (!s->quiet) {
                if (prog.tty)
                    progress_end(&prog);
                printf("eval step %lld: test accuracy %.2f%%, test loss %.4f (%.0f s)\n",
                       (long long)m->step, 100.0 * ea, el, trained_seconds + elapsed);
                fflush(stdout);
            }
            learnt = s->stop_at > 0 && ea >= s->stop_at;
        }
        if (s->checkpoint &&
            (m->step % s->save_every == 0 || m->step == s->steps || out_of_time || learnt) &&
            save(m, opt, s, trained_seconds + elapsed, err, errlen)) {
            status = -1;
            break;
        }
        if (out_of_time || learnt) {
            o->stopped_early = 1;
            if (!s->quiet) {
                progress_end(&prog);
                ended = 1;
                if (learnt)
                    printf("stopping at step %lld of %d: the accuracy %g was reached\n",
                           (long long)m->step, s->steps, (double)s->stop_at);
                else
                    printf("stopping at step %lld of %d: %g minutes of training reached\n",
                           (long long)m->step, s->steps, (double)s->max_minutes);
            }
            break;
        }
    }
    if (!s->quiet && !ended)
        progress_end(&prog);
    o->seconds = trained_seconds + (omp_get_wtime() - t_start);
    o->tokens_per_s = o->seconds > 0 ? (double)m->step * (double)n / o->seconds : 0.0;
    free(tok);
    free(lab);
    return status;
}

int eval_add(model *m, const batch *b, eval_sum *s)
{
    step_stats st;
    if (model_forward(m, b, &st))
        return -1;
    s->correct += st.correct;
    s->labelled += st.labelled;
    s->loss_sum += st.loss * st.labelled;
    return 0;
}

void eval_result(const eval_sum *s, double *accuracy, double *loss)
{
    *accuracy = s->labelled ? (double)s->correct / (double)s->labelled : 0.0;
    *loss = s->labelled ? s->loss_sum / (double)s->labelled : 0.0;
}

int train_adamw(float lr, float min_lr, float weight_decay, float grad_clip, int steps,
                int warmup, adamw_config *out, char *err, size_t errlen)
{
    adamw_config o = {.lr = lr, .min_lr = min_lr > 0 ? min_lr : lr / 10, .beta1 = 0.9f,
                      .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = weight_decay,
                      .grad_clip = grad_clip, .total_steps = steps,
                      .warmup_steps = warmup ? warmup : steps / 20};
    if (o.warmup_steps > o.total_steps)
        o.warmup_steps = o.total_steps;
    if (adamw_config_check(&o, err, errlen))
        return -1;
    *out = o;
    return 0;
}

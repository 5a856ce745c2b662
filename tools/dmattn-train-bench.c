/*
 * dmattn-train-bench - training throughput of the examples' model (examples/common) per
 * attention kind, with the wall time of every phase of a step.
 *
 *   dmattn-train-bench [--attn dense|swa|dma|all] [--seq 256] [--d-model 128] [--layers 2]
 *                      [--heads 4] [--kv-heads 0] [--batch 32] [--vocab 8192] [--window 64]
 *                      [--label-every 4] [--threads 0] [--steps 10] [--warmup 2] [--json]
 *
 * The data are random tokens with a label on every `label-every`-th position (MQAR-like tasks
 * label a fraction of the positions; logits are formed only there). Steps are real training
 * steps (forward, backward, AdamW). All kinds run in one process, one after the other, so their
 * ratios compare runs that saw the same machine.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "flags.h"
#include "model.h"
#include "prng.h"
#include "progress.h"

typedef struct options {
    int attn; /* -1 = all */
    int seq, d_model, layers, heads, kv_heads, batch, vocab, window, label_every, threads;
    int steps, warmup, json;
} options;

static const char *const synopsis =
    "Training throughput of the examples' model (examples/common) per attention kind, with the\n"
    "wall time of every phase of a step. Random tokens, a label every --label-every positions.";

static int parse(int argc, char **argv, options *o)
{
    *o = (options){.attn = -1, .seq = 256, .d_model = 128, .layers = 2, .heads = 4,
                   .batch = 32, .vocab = 8192, .window = 64, .label_every = 4, .steps = 10,
                   .warmup = 2};
    const char *attn = "all";
    const flag flags[] = {
        {"--attn", FLAG_STRING, &attn, 0, 0, "dense, swa, dma or all"},
        {"--seq", FLAG_INT, &o->seq, 1, 1 << 20, "sequence length"},
        {"--d-model", FLAG_INT, &o->d_model, 2, 16384, "model width"},
        {"--layers", FLAG_INT, &o->layers, 1, 1024, "blocks"},
        {"--heads", FLAG_INT, &o->heads, 1, 1024, "query heads"},
        {"--kv-heads", FLAG_INT, &o->kv_heads, 0, 1024, "key/value heads (0: as many as heads)"},
        {"--batch", FLAG_INT, &o->batch, 1, 1 << 16, "sequences per step"},
        {"--vocab", FLAG_INT, &o->vocab, 2, 1 << 24, "vocabulary"},
        {"--window", FLAG_INT, &o->window, 1, 1 << 24, "keys per query of swa and dma"},
        {"--label-every", FLAG_INT, &o->label_every, 1, 1 << 20, "a label every N positions"},
        {"--threads", FLAG_INT, &o->threads, 0, 4096, "threads (0: all)"},
        {"--steps", FLAG_INT, &o->steps, 1, 1 << 24, "timed steps"},
        {"--warmup", FLAG_INT, &o->warmup, 0, 1 << 24, "untimed steps first"},
        {"--json", FLAG_SWITCH, &o->json, 0, 0, "one JSON line per kind"},
    };
    int rc = flags_parse(argc, argv, "dmattn-train-bench", synopsis, flags,
                         (int)(sizeof flags / sizeof flags[0]));
    if (rc)
        exit(rc > 0 ? 0 : 2);
    o->attn = strcmp(attn, "all") ? attn_kind_parse(attn) : -1;
    if (strcmp(attn, "all") && o->attn < 0) {
        fprintf(stderr, "dmattn-train-bench: --attn is dense, swa, dma or all, not %s\n", attn);
        return -1;
    }
    if (o->threads == 0)
        o->threads = omp_get_max_threads();
    return 0;
}

/* Time `steps` training steps of one attention kind; prints one result and its profile. */
static int run_kind(const options *o, attn_kind kind, const int32_t *tokens,
                    const int32_t *labels, double *tok_per_s)
{
    model_config c = {.vocab = o->vocab, .d_model = o->d_model, .n_layers = o->layers,
                      .n_heads = o->heads, .n_kv_heads = o->kv_heads, .max_seq = o->seq,
                      .attn = kind, .window = o->window};
    c = model_config_defaults(c);
    adamw_config opt = adamw_config_defaults((adamw_config){.lr = 1e-3f});
    model *m;
    char err[512];
    if (model_create(&c, o->batch, o->threads, 1, &m, err, sizeof err)) {
        fprintf(stderr, "dmattn-train-bench: %s\n", err);
        return -1;
    }
    batch b = {.B = o->batch, .L = o->seq, .tokens = tokens, .labels = labels};
    step_stats st;
    progress prog;
    progress_begin(&prog, stderr, attn_kind_name(kind), 0, o->warmup + o->steps);
    for (int i = 0; i < o->warmup + o->steps; i++) {
        if (i == o->warmup)
            model_profile_reset(m);
        if (model_train_step(m, &opt, &b, &st)) {
            progress_end(&prog);
            fprintf(stderr, "dmattn-train-bench: %s\n", m->error);
            model_destroy(m);
            return -1;
        }
        progress_step(&prog, i + 1, st.loss, (double)st.correct / (st.labelled ? st.labelled : 1),
                      o->batch * o->seq / st.seconds);
    }
    progress_end(&prog);
    double total = 0.0;
    for (int p = 0; p < PROF_COUNT; p++)
        total += m->prof[p];
    const double tokens_run = (double)o->steps * o->batch * o->seq;
    *tok_per_s = tokens_run / total;
    const char *name = attn_kind_name(kind);
    if (o->json) {
        printf("{\"attn\":\"%s\",\"seq\":%d,\"d_model\":%d,\"layers\":%d,\"heads\":%d,"
               "\"kv_heads\":%d,\"batch\":%d,\"vocab\":%d,\"window\":%d,\"threads\":%d,"
               "\"steps\":%d,\"ms_per_step\":%.3f,\"tokens_per_s\":%.1f,\"params\":%zu,"
               "\"profile_ms\":{",
               name, o->seq, o->d_model, o->layers, o->heads, c.n_kv_heads, o->batch, o->vocab,
               kind == ATTN_DENSE ? 0 : o->window, o->threads, o->steps,
               1e3 * total / o->steps, *tok_per_s, m->n_params);
        for (int p = 0; p < PROF_COUNT; p++)
            printf("%s\"%s\":%.3f", p ? "," : "", model_profile_names[p],
                   1e3 * m->prof[p] / o->steps);
        printf("}}\n");
    } else {
        printf("%-6s %9.2f ms/step %10.0f tokens/s   (%zu parameters, last loss %.4f)\n", name,
               1e3 * total / o->steps, *tok_per_s, m->n_params, st.loss);
        for (int p = 0; p < PROF_COUNT; p++)
            printf("         %-15s %8.2f ms %5.1f%%\n", model_profile_names[p],
                   1e3 * m->prof[p] / o->steps, 100.0 * m->prof[p] / total);
    }
    model_destroy(m);
    return 0;
}

int main(int argc, char **argv)
{
    options o;
    if (parse(argc, argv, &o))
        return 2;
    const size_t N = (size_t)o.batch * o.seq;
    int32_t *tokens = malloc(sizeof(int32_t) * N), *labels = malloc(sizeof(int32_t) * N);
    if (!tokens || !labels) {
        fprintf(stderr, "dmattn-train-bench: out of memory\n");
        return 1;
    }
    prng r = prng_seeded(7, 0);
    for (size_t t = 0; t < N; t++) {
        tokens[t] = (int32_t)prng_below(&r, (uint32_t)o.vocab);
        labels[t] = (int)(t % (size_t)o.seq) % o.label_every == o.label_every - 1
                        ? (int32_t)prng_below(&r, (uint32_t)o.vocab) : -1;
    }
    if (!o.json)
        printf("model: seq %d, d_model %d, %d layers, %d heads, batch %d, vocab %d, a label "
               "every %d tokens; %d threads; %d timed steps after %d warm-up\n",
               o.seq, o.d_model, o.layers, o.heads, o.batch, o.vocab, o.label_every, o.threads,
               o.steps, o.warmup);
    int rc = 0;
    double dense_rate = 0.0;
    for (int k = ATTN_DENSE; k <= ATTN_DMA && !rc; k++) {
        if (o.attn >= 0 && k != o.attn)
            continue;
        double rate;
        rc = run_kind(&o, (attn_kind)k, tokens, labels, &rate);
        if (!rc && k == ATTN_DENSE)
            dense_rate = rate;
        else if (!rc && dense_rate > 0.0 && !o.json)
            printf("         %s/dense tokens/s = %.2fx\n", attn_kind_name((attn_kind)k),
                   rate / dense_rate);
    }
    free(tokens);
    free(labels);
    return rc ? 1 : 0;
}

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

#include "model.h"
#include "prng.h"

typedef struct options {
    int attn; /* -1 = all */
    int seq, d_model, layers, heads, kv_heads, batch, vocab, window, label_every, threads;
    int steps, warmup, json;
} options;

static void usage(FILE *f)
{
    fprintf(f, "usage: dmattn-train-bench [--attn dense|swa|dma|all] [--seq N] [--d-model N]\n"
               "         [--layers N] [--heads N] [--kv-heads N] [--batch N] [--vocab N]\n"
               "         [--window N] [--label-every N] [--threads N] [--steps N] [--warmup N]"
               " [--json]\n");
}

static int parse_int(const char *flag, const char *s, int lo, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > 1 << 30) {
        fprintf(stderr, "dmattn-train-bench: %s needs an integer >= %d, got '%s'\n", flag, lo, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse(int argc, char **argv, options *o)
{
    *o = (options){.attn = -1, .seq = 256, .d_model = 128, .layers = 2, .heads = 4,
                   .batch = 32, .vocab = 8192, .window = 64, .label_every = 4, .steps = 10,
                   .warmup = 2};
    struct { const char *name; int *field; int lo; } ints[] = {
        {"--seq", &o->seq, 1}, {"--d-model", &o->d_model, 2}, {"--layers", &o->layers, 1},
        {"--heads", &o->heads, 1}, {"--kv-heads", &o->kv_heads, 0}, {"--batch", &o->batch, 1},
        {"--vocab", &o->vocab, 2}, {"--window", &o->window, 1},
        {"--label-every", &o->label_every, 1}, {"--threads", &o->threads, 0},
        {"--steps", &o->steps, 1}, {"--warmup", &o->warmup, 0}};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--json")) {
            o->json = 1;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "dmattn-train-bench: unknown flag or missing value: %s\n", a);
            usage(stderr);
            return -1;
        }
        if (!strcmp(a, "--attn")) {
            const char *v = argv[++i];
            o->attn = strcmp(v, "all") ? attn_kind_parse(v) : -1;
            if (strcmp(v, "all") && o->attn < 0) {
                fprintf(stderr, "dmattn-train-bench: --attn is dense, swa, dma or all\n");
                return -1;
            }
            continue;
        }
        size_t k = 0;
        while (k < sizeof ints / sizeof ints[0] && strcmp(a, ints[k].name))
            k++;
        if (k == sizeof ints / sizeof ints[0]) {
            fprintf(stderr, "dmattn-train-bench: unknown flag: %s\n", a);
            usage(stderr);
            return -1;
        }
        if (parse_int(a, argv[++i], ints[k].lo, ints[k].field))
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
    for (int i = 0; i < o->warmup + o->steps; i++) {
        if (i == o->warmup)
            model_profile_reset(m);
        if (model_train_step(m, &opt, &b, &st)) {
            fprintf(stderr, "dmattn-train-bench: %s\n", m->error);
            model_destroy(m);
            return -1;
        }
    }
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

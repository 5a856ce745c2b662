/*
 * mqar - train the examples' model on multi-query associative recall (MQAR) and report its test
 * accuracy: the paper's central experiment, with dense, sliding-window or dynamic-mask attention.
 *
 *   mqar --attn dma --window 64 --kv 16 --seq-len 256 --steps 2000 --results results.jsonl
 *
 * Training draws fresh sequences every step (example s * batch + b of the training stream), or
 * cycles through a fixed set with --train-examples. The test set (--test-examples sequences of
 * the test stream, another seed) is the same for every model of a configuration. With
 * --checkpoint the run saves itself every --save-every steps and, started again, resumes where
 * it stopped; the resumed run is the unbroken one, bit for bit. At the end it prints the test
 * accuracy and appends one JSON line to --results.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "flags.h"
#include "model.h"
#include "mqar_data.h"
#include "train_loop.h"

/* Salts that keep the training, test and initialisation streams apart for one --seed. */
#define TRAIN_STREAM 0x7261696eull
#define TEST_STREAM 0x74657374ull

typedef struct run {
    mqar_config data;
    const char *attn_name, *checkpoint, *results;
    int d_model, layers, heads, kv_heads, d_ff, window;
    int steps, epochs, train_examples, test_examples, batch, warmup, save_every, threads, seed;
    float lr, min_lr, weight_decay, grad_clip, max_minutes, stop_at;
    int eval_every, mlp, untied, pos_emb, quiet;
} run;

/* The run's data settings, which its checkpoint carries: a resume with other settings is
 * refused. */
static void describe(const run *r, char *buf, size_t len)
{
    snprintf(buf, len, "mqar v1 L=%d kv=%d V=%d a=%.9g steps=%d batch=%d train_examples=%d "
             "seed=%d", r->data.seq_len, r->data.kv, r->data.vocab, (double)r->data.power_a,
             r->steps, r->batch, r->train_examples, r->seed);
}

/* Fill a batch: examples first .. first + B - 1 of a stream (modulo `cycle` when > 0). */
static void make_batch(mqar_gen *g, uint64_t stream, uint64_t first, int B, int cycle, int L,
                       int32_t *tok, int32_t *lab)
{
    for (int b = 0; b < B; b++) {
        uint64_t i = first + (uint64_t)b;
        if (cycle > 0)
            i %= (uint64_t)cycle;
        mqar_example(g, stream, i, tok + (size_t)b * L, lab + (size_t)b * L, NULL);
    }
}

/* Accuracy over the first `count` sequences of the test set (forward only). */
static int evaluate(model *m, mqar_gen *g, const run *r, int count, int32_t *tok, int32_t *lab,
                    double *accuracy, double *loss)
{
    const int L = r->data.seq_len;
    eval_sum sum = {0};
    for (int first = 0; first < count; first += r->batch) {
        int B = count - first < r->batch ? count - first : r->batch;
        make_batch(g, (uint64_t)r->seed * 0x9E3779B97F4A7C15ull ^ TEST_STREAM, (uint64_t)first,
                   B, 0, L, tok, lab);
        batch bt = {B, L, tok, lab};
        if (eval_add(m, &bt, &sum))
            return -1;
    }
    eval_result(&sum, accuracy, loss);
    return 0;
}

/* The training loop's hooks: the batch of a step, and the accuracy on (up to 256) test
 * sequences during training. */
typedef struct hooks_ctx {
    const run *r;
    mqar_gen *gen;
    int32_t *tok, *lab; /* the evaluation's batch */
    uint64_t train_stream;
} hooks_ctx;

static void hook_batch(void *ctx, int64_t step, int32_t *tok, int32_t *lab)
{
    const hooks_ctx *h = ctx;
    make_batch(h->gen, h->train_stream, (uint64_t)step * (uint64_t)h->r->batch, h->r->batch,
               h->r->train_examples, h->r->data.seq_len, tok, lab);
}

static int hook_evaluate(void *ctx, model *m, double *accuracy, double *loss)
{
    const hooks_ctx *h = ctx;
    int count = h->r->test_examples < 256 ? h->r->test_examples : 256;
    return evaluate(m, h->gen, h->r, count, h->tok, h->lab, accuracy, loss);
}

static int append_result(const run *r, const model *m, double acc, double test_loss,
                         double last_loss, double seconds, double tok_per_s)
{
    if (!r->results)
        return 0;
    FILE *f = fopen(r->results, "a");
    if (!f) {
        fprintf(stderr, "mqar: cannot append to %s: %s\n", r->results, strerror(errno));
        return -1;
    }
    const model_config *c = &m->cfg;
    fprintf(f, "{\"attn\":\"%s\",\"seq_len\":%d,\"kv\":%d,\"vocab\":%d,\"power_a\":%g,"
               "\"d_model\":%d,\"layers\":%d,\"heads\":%d,\"kv_heads\":%d,\"mlp\":%d,\"d_ff\":%d,"
               "\"tied\":%d,\"pos_emb\":%d,"
               "\"window\":%d,\"steps\":%d,\"batch\":%d,\"train_examples\":%d,\"lr\":%g,"
               "\"seed\":%d,\"threads\":%d,\"max_minutes\":%g,\"stop_at\":%g,"
               "\"steps_done\":%lld,\"test_examples\":%d,"
               "\"test_accuracy\":%.6f,"
               "\"test_loss\":%.6f,\"final_train_loss\":%.6f,\"train_seconds\":%.1f,"
               "\"tokens_per_s\":%.1f,\"params\":%zu}\n",
            attn_kind_name(c->attn), r->data.seq_len, r->data.kv, r->data.vocab,
            (double)r->data.power_a, c->d_model, c->n_layers, c->n_heads, c->n_kv_heads,
            !c->attn_only, c->attn_only ? 0 : c->d_ff, c->tie_embeddings, c->pos_embeddings, c->attn == ATTN_DENSE ? 0 : c->window, r->steps, r->batch,
            r->train_examples, (double)r->lr, r->seed, r->threads, (double)r->max_minutes,
            (double)r->stop_at, (long long)m->step,
            r->test_examples, acc,
            test_loss, last_loss, seconds, tok_per_s, m->n_params);
    return fclose(f) == 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
    run r = {.data = {.seq_len = 256, .kv = 8, .vocab = 8192, .power_a = 0.01f},
             .attn_name = "dma", .d_model = 128, .layers = 2, .heads = 2, .window = 64,
             .steps = 2000, .test_examples = 1000, .batch = 64, .save_every = 200,
             .seed = 1, .lr = 3e-3f, .weight_decay = 0.1f, .grad_clip = 1.0f};
    const flag flags[] = {
        {"--seq-len", FLAG_INT, &r.data.seq_len, 4, 1 << 20, "tokens per sequence (even)"},
        {"--kv", FLAG_INT, &r.data.kv, 1, 1 << 18, "key-value pairs (and queries) per sequence"},
        {"--vocab", FLAG_INT, &r.data.vocab, 8, 1 << 24, "vocabulary (half keys, half values)"},
        {"--power-a", FLAG_FLOAT, &r.data.power_a, 1e-6, 1, "the query gaps' power law"},
        {"--attn", FLAG_STRING, &r.attn_name, 0, 0, "attention: dense, swa or dma"},
        {"--window", FLAG_INT, &r.window, 1, 1 << 24, "keys per query (swa, dma)"},
        {"--d-model", FLAG_INT, &r.d_model, 2, 16384, "model width"},
        {"--layers", FLAG_INT, &r.layers, 1, 1024, "blocks"},
        {"--heads", FLAG_INT, &r.heads, 1, 1024, "query heads"},
        {"--kv-heads", FLAG_INT, &r.kv_heads, 0, 1024, "key/value heads (0: as many as heads)"},
        {"--mlp", FLAG_SWITCH, &r.mlp, 0, 0,
         "blocks with a SwiGLU MLP (off: attention only, as Zoology's MQAR models)"},
        {"--d-ff", FLAG_INT, &r.d_ff, 0, 1 << 20, "SwiGLU width with --mlp (0: 4 d_model)"},
        {"--untied", FLAG_SWITCH, &r.untied, 0, 0,
         "an LM head of its own (off: tied to the embedding, as Zoology's models)"},
        {"--pos-emb", FLAG_SWITCH, &r.pos_emb, 0, 0,
         "learned absolute positions besides RoPE (Zoology's attention models have them; here "
         "they slowed learning: dma at kv 32 learnt in 1000 steps without, not in 1200 with)"},
        {"--steps", FLAG_INT, &r.steps, 1, 1 << 30, "training steps"},
        {"--train-examples", FLAG_INT, &r.train_examples, 0, 1 << 30,
         "a fixed training set of N sequences (0: fresh sequences every step)"},
        {"--epochs", FLAG_INT, &r.epochs, 0, 1 << 20,
         "with --train-examples: steps = epochs * examples / batch (overrides --steps)"},
        {"--batch", FLAG_INT, &r.batch, 1, 1 << 16, "sequences per step"},
        {"--lr", FLAG_FLOAT, &r.lr, 1e-7, 10, "peak learning rate"},
        {"--min-lr", FLAG_FLOAT, &r.min_lr, 0, 10, "final learning rate (0: lr / 10)"},
        {"--warmup", FLAG_INT, &r.warmup, 0, 1 << 30, "warm-up steps (0: 5% of the steps)"},
        {"--weight-decay", FLAG_FLOAT, &r.weight_decay, 0, 10, "AdamW weight decay"},
        {"--grad-clip", FLAG_FLOAT, &r.grad_clip, 0, 1e6, "gradient norm clip (0: none)"},
        {"--test-examples", FLAG_INT, &r.test_examples, 1, 1 << 24, "test sequences"},
        {"--threads", FLAG_INT, &r.threads, 0, 4096, "threads (0: all)"},
        {"--seed", FLAG_INT, &r.seed, 0, 1 << 30, "seed of the weights and both data streams"},
        {"--checkpoint", FLAG_STRING, &r.checkpoint, 0, 0, "save here; resume from it if it exists"},
        {"--save-every", FLAG_INT, &r.save_every, 1, 1 << 30, "steps between checkpoints"},
        {"--results", FLAG_STRING, &r.results, 0, 0, "append the result as one JSON line"},
        {"--eval-every", FLAG_INT, &r.eval_every, 0, 1 << 30,
         "print the accuracy on (up to 256) test sequences every N steps (0: never)"},
        {"--max-minutes", FLAG_FLOAT, &r.max_minutes, 0, 1e6,
         "stop training after this many minutes of this run (0: no limit), then test"},
        {"--stop-at", FLAG_FLOAT, &r.stop_at, 0, 1,
         "with --eval-every: stop training once that accuracy reaches this (0: never)"},
        {"--quiet", FLAG_SWITCH, &r.quiet, 0, 0, "no progress output"},
    };
    const char *synopsis =
        "Multi-query associative recall (Zoology's MQAR) with dense, sliding-window (swa) or\n"
        "dynamic-mask (dma) attention: trains, then prints the test accuracy.";
    int rc = flags_parse(argc, argv, "mqar", synopsis, flags, (int)(sizeof flags / sizeof flags[0]));
    if (rc)
        return rc > 0 ? 0 : 2;
    char err[512];
    int kind = attn_kind_parse(r.attn_name);
    if (kind < 0) {
        fprintf(stderr, "mqar: --attn is dense, swa or dma, not %s\n", r.attn_name);
        return 2;
    }
    if (mqar_check(&r.data, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    if (r.epochs > 0) {
        if (r.train_examples == 0) {
            fprintf(stderr, "mqar: --epochs needs --train-examples (a fixed training set)\n");
            return 2;
        }
        r.steps = (int)(((int64_t)r.epochs * r.train_examples + r.batch - 1) / r.batch);
    }
    if (r.threads == 0)
        r.threads = omp_get_max_threads();
    const int L = r.data.seq_len;
    model_config mc = model_config_defaults((model_config){
        .vocab = r.data.vocab, .d_model = r.d_model, .n_layers = r.layers, .n_heads = r.heads,
        .n_kv_heads = r.kv_heads, .d_ff = r.d_ff, .max_seq = L, .attn = (attn_kind)kind,
        .window = r.window, .attn_only = !r.mlp, .tie_embeddings = !r.untied,
        .pos_embeddings = r.pos_emb});
    adamw_config opt;
    if (train_adamw(r.lr, r.min_lr, r.weight_decay, r.grad_clip, r.steps, r.warmup, &opt, err,
                    sizeof err)) {
        fprintf(stderr, "mqar: %s\n", err);
        return 2;
    }

    /* Resume or start. */
    char run_id[256];
    describe(&r, run_id, sizeof run_id);
    train_settings ts = {.program = "mqar", .run_id = run_id, .checkpoint = r.checkpoint,
                         .batch = r.batch, .seq_len = L, .steps = r.steps,
                         .save_every = r.save_every, .eval_every = r.eval_every,
                         .max_minutes = r.max_minutes, .stop_at = r.stop_at, .quiet = r.quiet};
    model *m = NULL;
    double trained_seconds = 0.0;
    if (train_open(&ts, &mc, &opt, (uint64_t)r.seed, r.batch, r.threads, &m, &trained_seconds,
                   err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    if (!r.quiet && m->step > 0)
        printf("resuming %s at step %lld of %d\n", r.checkpoint, (long long)m->step, r.steps);
    mqar_gen *gen;
    if (mqar_gen_create(&r.data, &gen, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        model_destroy(m);
        return 1;
    }
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)r.batch * L);
    int32_t *lab = malloc(sizeof(int32_t) * (size_t)r.batch * L);
    if (!tok || !lab) {
        fprintf(stderr, "mqar: out of memory\n");
        return 1;
    }
    if (!r.quiet)
        printf("mqar: L %d, kv %d, vocab %d | %s attention%s, d_model %d, %d layers, %d heads, "
               "%zu parameters | %d steps of %d, lr %g, %d threads\n",
               L, r.data.kv, r.data.vocab, r.attn_name,
               kind == ATTN_DENSE ? "" : (kind == ATTN_SWA ? " (window)" : " (top-k)"),
               r.d_model, r.layers, r.heads, m->n_params, r.steps, r.batch, (double)r.lr,
               r.threads);

    /* Train. */
    hooks_ctx hc = {.r = &r, .gen = gen, .tok = tok, .lab = lab,
                    .train_stream = (uint64_t)r.seed * 0x9E3779B97F4A7C15ull ^ TRAIN_STREAM};
    train_hooks hooks = {.ctx = &hc, .make_batch = hook_batch, .evaluate = hook_evaluate};
    train_outcome out;
    int status = 0;
    if (train_run(m, &opt, &ts, &hooks, trained_seconds, &out, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        status = 1;
    }

    /* Test. */
    double acc = 0.0, test_loss = 0.0;
    if (status == 0 && evaluate(m, gen, &r, r.test_examples, tok, lab, &acc, &test_loss)) {
        fprintf(stderr, "mqar: %s\n", m->error);
        status = 1;
    }
    if (status == 0) {
        const double seconds = out.seconds, tok_per_s = out.tokens_per_s;
        printf("test accuracy %.2f%% (%d sequences, %d queries each), test loss %.4f; "
               "trained %.0f s, %.0f tokens/s\n", 100.0 * acc, r.test_examples, r.data.kv,
               test_loss, seconds, tok_per_s);
        if (append_result(&r, m, acc, test_loss, out.last_loss, seconds, tok_per_s))
            status = 1;
    }
    free(tok);
    free(lab);
    mqar_gen_destroy(gen);
    model_destroy(m);
    return status;
}

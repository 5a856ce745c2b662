/*
 * niah - needle in a haystack: train the examples' model (dense, sliding-window or dynamic-mask
 * attention) to retrieve a passkey at one training length, then evaluate a grid of context
 * lengths x needle depths from its checkpoint.
 *
 *   niah --attn dma --window 256 --train-len 1024 --steps 3000 --eval-every 250 \
 *        --checkpoint runs/niah/dma.ckpt --out runs/niah/dma
 *
 * Training resumes from --checkpoint (the examples' shared loop, train_loop.c); a finished run
 * goes straight to the grid. --init-from starts a new run from another run's weights: the
 * README's experiment (scripts/niah.sh) trains at 256 tokens first, then at 1024. Each cell (length, depth) scores --samples sequences of the test
 * stream (another seed than training): a sequence counts as retrieved when every value token of
 * the answer is the model's top prediction. Finished cells are appended to <out>.cells.jsonl as
 * they finish, and a restarted run skips them. At the end the grid is printed and written whole
 * to <out>.csv and <out>.json; tools/niah-plot draws the heat maps.
 *
 * Evaluation runs the library's causal forward over the whole sequence (batch 1), in a second
 * model made for the longest length with the trained weights; the attention's time per sequence
 * (projections included) is recorded with every cell.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "checkpoint.h"
#include "flags.h"
#include "model.h"
#include "niah_data.h"
#include "progress.h"
#include "train_loop.h"

/* Salts that keep the training and test streams apart for one --seed. */
#define TRAIN_STREAM 0x7261696eull
#define TEST_STREAM 0x74657374ull
#define MAX_LENGTHS 32
#define MAX_DEPTHS 101

typedef struct run {
    niah_config data; /* seq_len is the training length */
    const char *attn_name, *checkpoint, *out, *lengths_arg, *init_from;
    int d_model, layers, heads, kv_heads, window, mlp;
    int steps, batch, warmup, save_every, eval_every, threads, seed, samples, depths, quiet;
    float lr, min_lr, weight_decay, grad_clip, max_minutes, stop_at;
    int n_lengths, lengths[MAX_LENGTHS];
} run;

static uint64_t stream(const run *r, uint64_t salt)
{
    return (uint64_t)r->seed * 0x9E3779B97F4A7C15ull ^ salt;
}

/* The run's data settings: its checkpoint carries them, so a resume with others is refused. */
static void describe(const run *r, char *buf, size_t len)
{
    int n = snprintf(buf, len, "niah v1 L=%d key=%d value=%d V=%d sentences=%dx%d steps=%d "
                     "batch=%d seed=%d", r->data.seq_len, r->data.key_len, r->data.value_len,
                     r->data.vocab, r->data.sentences, r->data.sentence_len, r->steps, r->batch,
                     r->seed);
    if (r->init_from && n > 0 && (size_t)n < len) {
        const char *base = strrchr(r->init_from, '/');
        snprintf(buf + n, len - (size_t)n, " init=%s", base ? base + 1 : r->init_from);
    }
}

/* A new run that starts from the weights of another run's checkpoint (a length curriculum:
 * trained at a shorter length first). The two models must have the same parameters: their
 * configurations may differ only in the longest sequence, the window, and between dense and
 * swa (which have the same parameters) the attention kind. The optimizer starts afresh. */
static int init_from(model *m, const char *path, char *err, size_t errlen)
{
    model *src = NULL;
    adamw_config o;
    static char user[CHECKPOINT_USER_MAX];
    uint32_t n = 0;
    if (checkpoint_load(path, 1, m->threads, &src, &o, user, sizeof user, &n, err, errlen))
        return -1;
    model_config a = src->cfg;
    a.max_seq = m->cfg.max_seq;
    a.window = m->cfg.window;
    if ((a.attn == ATTN_DENSE || a.attn == ATTN_SWA) &&
        (m->cfg.attn == ATTN_DENSE || m->cfg.attn == ATTN_SWA))
        a.attn = m->cfg.attn;
    int same = memcmp(&a, &m->cfg, sizeof a) == 0 && src->n_params == m->n_params;
    if (same)
        memcpy(m->params, src->params, sizeof(float) * m->n_params);
    else
        snprintf(err, errlen, "niah: --init-from %s: its model (%s attention, d_model %d, %d "
                 "layers, vocab %d) is not this run's", path, attn_kind_name(src->cfg.attn),
                 src->cfg.d_model, src->cfg.n_layers, src->cfg.vocab);
    model_destroy(src);
    return same ? 0 : -1;
}

/* ---- training hooks: random depths; the check during training uses 64 test sequences ---- */

typedef struct hooks_ctx {
    const run *r;
    int32_t *tok, *lab;
} hooks_ctx;

static void hook_batch(void *ctx, int64_t step, int32_t *tok, int32_t *lab)
{
    const hooks_ctx *h = ctx;
    const int L = h->r->data.seq_len;
    for (int b = 0; b < h->r->batch; b++)
        niah_example(&h->r->data, stream(h->r, TRAIN_STREAM),
                     (uint64_t)step * (uint64_t)h->r->batch + (uint64_t)b, -1.0,
                     tok + (size_t)b * L, lab + (size_t)b * L);
}

static int hook_evaluate(void *ctx, model *m, double *accuracy, double *loss)
{
    const hooks_ctx *h = ctx;
    const int L = h->r->data.seq_len, B = h->r->batch;
    eval_sum sum = {0};
    for (int first = 0; first < 64; first += B) {
        int n = 64 - first < B ? 64 - first : B;
        for (int b = 0; b < n; b++)
            niah_example(&h->r->data, stream(h->r, TEST_STREAM), (uint64_t)(first + b), -1.0,
                         h->tok + (size_t)b * L, h->lab + (size_t)b * L);
        batch bt = {n, L, h->tok, h->lab};
        if (eval_add(m, &bt, &sum))
            return -1;
    }
    eval_result(&sum, accuracy, loss);
    return 0;
}

/* ---- the grid ---- */

typedef struct cell {
    int length;
    double depth;
    int done;
    int retrieved;           /* sequences whose whole answer was right */
    double token_accuracy;   /* answer tokens right */
    double attn_seconds;     /* attention forward time per sequence */
} cell;

static double depth_of(const run *r, int i) { return r->depths > 1 ? (double)i / (r->depths - 1) : 1.0; }

/* The cells already in <out>.cells.jsonl for this model (same run and step). */
static void load_cells(const char *path, const char *model_id, cell *cells, int n)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char line[2048], key[600];
    snprintf(key, sizeof key, "\"model\":\"%s\"", model_id);
    while (fgets(line, sizeof line, f)) {
        if (!strstr(line, key))
            continue;
        const char *pl = strstr(line, "\"length\":"), *pd = strstr(line, "\"depth\":"),
                   *pr = strstr(line, "\"retrieved\":"), *pa = strstr(line, "\"token_accuracy\":"),
                   *pt = strstr(line, "\"attn_seconds\":");
        if (!pl || !pd || !pr || !pa || !pt)
            continue;
        int length = atoi(pl + 9);
        double depth = atof(pd + 8);
        for (int i = 0; i < n; i++)
            if (cells[i].length == length && fabs(cells[i].depth - depth) < 1e-6) {
                cells[i].done = 1;
                cells[i].retrieved = atoi(pr + 12);
                cells[i].token_accuracy = atof(pa + 17);
                cells[i].attn_seconds = atof(pt + 15);
            }
    }
    fclose(f);
}

/* Score one cell: `samples` test sequences at the cell's length and depth, batch 1. */
static int eval_cell(model *m, const run *r, cell *c, int32_t *tok, int32_t *lab)
{
    niah_config d = r->data;
    d.seq_len = c->length;
    long correct = 0, labelled = 0;
    int retrieved = 0;
    model_profile_reset(m);
    for (int i = 0; i < r->samples; i++) {
        niah_example(&d, stream(r, TEST_STREAM), (uint64_t)i, c->depth, tok, lab);
        batch bt = {1, c->length, tok, lab};
        step_stats st;
        if (model_forward(m, &bt, &st))
            return -1;
        correct += st.correct;
        labelled += st.labelled;
        retrieved += st.correct == st.labelled;
    }
    c->retrieved = retrieved;
    c->token_accuracy = labelled ? (double)correct / (double)labelled : 0.0;
    c->attn_seconds = m->prof[PROF_ATTN_FWD] / r->samples;
    c->done = 1;
    return 0;
}

static int append_cell(const char *path, const char *model_id, const run *r, const model *m,
                       const cell *c)
{
    FILE *f = fopen(path, "a");
    if (!f) {
        fprintf(stderr, "niah: cannot append to %s: %s\n", path, strerror(errno));
        return -1;
    }
    fprintf(f, "{\"model\":\"%s\",\"attn\":\"%s\",\"window\":%d,\"train_len\":%d,"
               "\"length\":%d,\"depth\":%.4f,\"samples\":%d,\"retrieved\":%d,"
               "\"token_accuracy\":%.6f,\"attn_seconds\":%.6f,\"threads\":%d}\n",
            model_id, attn_kind_name(m->cfg.attn), m->cfg.attn == ATTN_DENSE ? 0 : m->cfg.window,
            r->data.seq_len, c->length, c->depth, r->samples, c->retrieved, c->token_accuracy,
            c->attn_seconds, r->threads);
    return fclose(f) == 0 ? 0 : -1;
}

static FILE *open_out(const run *r, const char *ext, char *path, size_t len)
{
    snprintf(path, len, "%s%s", r->out, ext);
    FILE *f = fopen(path, "w");
    if (!f)
        fprintf(stderr, "niah: cannot write %s: %s\n", path, strerror(errno));
    return f;
}

/* The grid, printed (rows: depths; columns: lengths; % retrieved) and written as CSV + JSON. */
static int report(const run *r, const model *m, const char *model_id, const cell *cells)
{
    const int nd = r->depths, nl = r->n_lengths;
    printf("\n%s attention%s, trained at %d tokens: %% of %d sequences retrieved\n",
           attn_kind_name(m->cfg.attn), m->cfg.attn == ATTN_DENSE ? "" : " (window)",
           r->data.seq_len, r->samples);
    printf("depth ");
    for (int j = 0; j < nl; j++)
        printf(" %6d", r->lengths[j]);
    printf("\n");
    for (int i = 0; i < nd; i++) {
        printf("%4.0f%% ", 100.0 * depth_of(r, i));
        for (int j = 0; j < nl; j++)
            printf(" %6.1f", 100.0 * cells[j * nd + i].retrieved / r->samples);
        printf("\n");
    }
    printf("attn s");
    for (int j = 0; j < nl; j++) {
        double s = 0;
        for (int i = 0; i < nd; i++)
            s += cells[j * nd + i].attn_seconds;
        printf(" %6.3f", s / nd);
    }
    printf("  (attention forward per sequence, all layers)\n");

    char path[1024];
    FILE *f = open_out(r, ".csv", path, sizeof path);
    if (!f)
        return -1;
    fprintf(f, "attn,window,train_len,length,depth,samples,retrieved,retrieved_pct,"
               "token_accuracy,attn_seconds\n");
    for (int k = 0; k < nd * nl; k++)
        fprintf(f, "%s,%d,%d,%d,%.4f,%d,%d,%.2f,%.6f,%.6f\n", attn_kind_name(m->cfg.attn),
                m->cfg.attn == ATTN_DENSE ? 0 : m->cfg.window, r->data.seq_len,
                cells[k].length, cells[k].depth, r->samples, cells[k].retrieved,
                100.0 * cells[k].retrieved / r->samples, cells[k].token_accuracy,
                cells[k].attn_seconds);
    if (fclose(f))
        return -1;
    if (!(f = open_out(r, ".json", path, sizeof path)))
        return -1;
    fprintf(f, "{\"model\":\"%s\",\"attn\":\"%s\",\"window\":%d,\"train_len\":%d,"
               "\"d_model\":%d,\"layers\":%d,\"heads\":%d,\"kv_heads\":%d,\"steps\":%lld,"
               "\"samples\":%d,\"threads\":%d,\"lengths\":[",
            model_id, attn_kind_name(m->cfg.attn), m->cfg.attn == ATTN_DENSE ? 0 : m->cfg.window,
            r->data.seq_len, m->cfg.d_model, m->cfg.n_layers, m->cfg.n_heads, m->cfg.n_kv_heads,
            (long long)m->step, r->samples, r->threads);
    for (int j = 0; j < nl; j++)
        fprintf(f, "%s%d", j ? "," : "", r->lengths[j]);
    fprintf(f, "],\"depths\":[");
    for (int i = 0; i < nd; i++)
        fprintf(f, "%s%.4f", i ? "," : "", depth_of(r, i));
    fprintf(f, "],\"cells\":[");
    for (int k = 0; k < nd * nl; k++)
        fprintf(f, "%s\n{\"length\":%d,\"depth\":%.4f,\"retrieved\":%d,\"token_accuracy\":%.6f,"
                   "\"attn_seconds\":%.6f}", k ? "," : "", cells[k].length, cells[k].depth,
                cells[k].retrieved, cells[k].token_accuracy, cells[k].attn_seconds);
    fprintf(f, "\n]}\n");
    return fclose(f) ? -1 : 0;
}

/* Evaluate every cell not yet in the cells file, with a model made for the longest length. */
static int evaluate_grid(const run *r, const model *trained, const char *run_id)
{
    int max_len = 0;
    for (int j = 0; j < r->n_lengths; j++)
        max_len = r->lengths[j] > max_len ? r->lengths[j] : max_len;
    model_config ec = trained->cfg;
    ec.max_seq = max_len;
    model *m = NULL;
    char err[512];
    if (model_create(&ec, 1, r->threads, 0, &m, err, sizeof err)) {
        fprintf(stderr, "niah: the evaluation model for %d tokens: %s\n", max_len, err);
        return -1;
    }
    /* the same layout: no tensor depends on max_seq (learned positions are refused) */
    memcpy(m->params, trained->params, sizeof(float) * m->n_params);
    m->step = trained->step;

    char model_id[512], cells_path[1024];
    snprintf(model_id, sizeof model_id, "%s %s w=%d d=%d layers=%d step=%lld", run_id,
             attn_kind_name(ec.attn), ec.attn == ATTN_DENSE ? 0 : ec.window, ec.d_model,
             ec.n_layers, (long long)trained->step);
    snprintf(cells_path, sizeof cells_path, "%s.cells.jsonl", r->out);
    const int n = r->n_lengths * r->depths;
    cell *cells = calloc((size_t)n, sizeof *cells);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)max_len);
    int32_t *lab = malloc(sizeof(int32_t) * (size_t)max_len);
    int status = 0;
    if (!cells || !tok || !lab) {
        fprintf(stderr, "niah: out of memory\n");
        status = -1;
        goto done;
    }
    for (int j = 0; j < r->n_lengths; j++)
        for (int i = 0; i < r->depths; i++)
            cells[j * r->depths + i] = (cell){.length = r->lengths[j], .depth = depth_of(r, i)};
    load_cells(cells_path, model_id, cells, n);
    int todo = 0;
    for (int k = 0; k < n; k++)
        todo += !cells[k].done;
    if (!r->quiet && todo < n)
        printf("%d of %d cells already in %s\n", n - todo, n, cells_path);

    /* Cells of one length are the same work, so the ETA weighs each by its length's cost as
       measured so far (the first cell of a length is timed before it is extrapolated). */
    double t0 = omp_get_wtime(), work_done = 0.0, work_left = 0.0;
    for (int k = 0; k < n; k++)
        if (!cells[k].done)
            work_left += (double)cells[k].length * cells[k].length;
    int finished = 0;
    for (int k = 0; k < n && status == 0; k++) {
        if (cells[k].done)
            continue;
        if (eval_cell(m, r, &cells[k], tok, lab)) {
            fprintf(stderr, "niah: %s\n", m->error);
            status = -1;
            break;
        }
        if (append_cell(cells_path, model_id, r, m, &cells[k]))
            status = -1;
        finished++;
        double w = (double)cells[k].length * cells[k].length;
        work_done += w;
        work_left -= w;
        if (!r->quiet) {
            double elapsed = omp_get_wtime() - t0;
            char eta[32];
            progress_format_seconds(eta, sizeof eta, elapsed / work_done * work_left);
            printf("cell %d/%d  L %6d  depth %3.0f%%  retrieved %3d/%d  attn %.3f s/seq  "
                   "ETA %s (quadratic guess)\n", finished, todo, cells[k].length,
                   100.0 * cells[k].depth, cells[k].retrieved, r->samples,
                   cells[k].attn_seconds, eta);
            fflush(stdout);
        }
    }
    if (status == 0)
        status = report(r, m, model_id, cells);
done:
    free(cells);
    free(tok);
    free(lab);
    model_destroy(m);
    return status;
}

/* --lengths, each a length the generator can fill. */
static int parse_lengths(run *r)
{
    char err[512];
    r->n_lengths = flags_int_list(r->lengths_arg, "niah: --lengths", 1, 1 << 22, r->lengths,
                                  MAX_LENGTHS, err, sizeof err);
    for (int j = 0; j < r->n_lengths; j++) {
        niah_config d = r->data;
        d.seq_len = r->lengths[j];
        if (niah_check(&d, err, sizeof err)) {
            r->n_lengths = -1;
            break;
        }
    }
    if (r->n_lengths < 0)
        fprintf(stderr, "%s\n", err);
    return r->n_lengths < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
    /* The defaults are the README's experiment (scripts/niah.sh). */
    run r = {.data = {.seq_len = 1024, .key_len = 4, .value_len = 4, .vocab = 512},
             .attn_name = "dma", .out = "niah", .d_model = 128, .layers = 2, .heads = 2,
             .window = 256, .steps = 3000, .batch = 16, .save_every = 100, .seed = 1,
             .samples = 20, .depths = 11, .lr = 3e-3f, .weight_decay = 0.1f, .grad_clip = 1.0f,
             .lengths_arg = "1024,2048,4096,8192,16384,32768"};
    const flag flags[] = {
        {"--attn", FLAG_STRING, &r.attn_name, 0, 0, "attention: dense, swa or dma"},
        {"--window", FLAG_INT, &r.window, 1, 1 << 24, "keys per query (swa, dma)"},
        {"--train-len", FLAG_INT, &r.data.seq_len, 16, 1 << 16, "training sequence length"},
        {"--key-len", FLAG_INT, &r.data.key_len, 1, 64, "tokens of the needle's key"},
        {"--value-len", FLAG_INT, &r.data.value_len, 1, 64, "tokens of the needle's value"},
        {"--vocab", FLAG_INT, &r.data.vocab, 8, 1 << 20,
         "vocabulary (half filler, a quarter keys, a quarter values)"},
        {"--sentences", FLAG_INT, &r.data.sentences, 0, 4096,
         "a haystack of this many repeated filler sentences (0: random filler tokens)"},
        {"--sentence-len", FLAG_INT, &r.data.sentence_len, 0, 4096, "tokens per sentence"},
        {"--d-model", FLAG_INT, &r.d_model, 2, 16384, "model width"},
        {"--layers", FLAG_INT, &r.layers, 1, 1024, "blocks"},
        {"--heads", FLAG_INT, &r.heads, 1, 1024, "query heads"},
        {"--kv-heads", FLAG_INT, &r.kv_heads, 0, 1024, "key/value heads (0: as many as heads)"},
        {"--mlp", FLAG_SWITCH, &r.mlp, 0, 0, "blocks with a SwiGLU MLP (off: attention only)"},
        {"--steps", FLAG_INT, &r.steps, 1, 1 << 30, "training steps"},
        {"--batch", FLAG_INT, &r.batch, 1, 1 << 16, "sequences per step"},
        {"--lr", FLAG_FLOAT, &r.lr, 1e-7, 10, "peak learning rate"},
        {"--min-lr", FLAG_FLOAT, &r.min_lr, 0, 10, "final learning rate (0: lr / 10)"},
        {"--warmup", FLAG_INT, &r.warmup, 0, 1 << 30, "warm-up steps (0: 5% of the steps)"},
        {"--weight-decay", FLAG_FLOAT, &r.weight_decay, 0, 10, "AdamW weight decay"},
        {"--grad-clip", FLAG_FLOAT, &r.grad_clip, 0, 1e6, "gradient norm clip (0: none)"},
        {"--seed", FLAG_INT, &r.seed, 0, 1 << 30, "seed of the weights and both data streams"},
        {"--threads", FLAG_INT, &r.threads, 0, 4096, "threads (0: all)"},
        {"--checkpoint", FLAG_STRING, &r.checkpoint, 0, 0,
         "save here; resume from it if it exists (required)"},
        {"--save-every", FLAG_INT, &r.save_every, 1, 1 << 30, "steps between checkpoints"},
        {"--init-from", FLAG_STRING, &r.init_from, 0, 0,
         "start a new run from this checkpoint's weights (same model, e.g. trained at a "
         "shorter --train-len: a length curriculum)"},
        {"--eval-every", FLAG_INT, &r.eval_every, 0, 1 << 30,
         "print the accuracy on 64 test sequences every N steps (0: never)"},
        {"--max-minutes", FLAG_FLOAT, &r.max_minutes, 0, 1e6,
         "stop training after this many minutes (0: no limit), then evaluate"},
        {"--stop-at", FLAG_FLOAT, &r.stop_at, 0, 1,
         "with --eval-every: stop training once that accuracy reaches this (0: never)"},
        {"--lengths", FLAG_STRING, &r.lengths_arg, 0, 0, "context lengths of the grid"},
        {"--depths", FLAG_INT, &r.depths, 1, MAX_DEPTHS,
         "needle depths of the grid, evenly from 0% to 100%"},
        {"--samples", FLAG_INT, &r.samples, 1, 1 << 20, "test sequences per cell"},
        {"--out", FLAG_STRING, &r.out, 0, 0,
         "prefix of the results: <out>.cells.jsonl (resumable), <out>.csv, <out>.json"},
        {"--quiet", FLAG_SWITCH, &r.quiet, 0, 0, "no progress output"},
    };
    const char *synopsis =
        "Needle in a haystack with dense, sliding-window (swa) or dynamic-mask (dma) attention:\n"
        "trains at --train-len, then evaluates a grid of lengths x depths from the checkpoint.";
    int rc = flags_parse(argc, argv, "niah", synopsis, flags, (int)(sizeof flags / sizeof flags[0]));
    if (rc)
        return rc > 0 ? 0 : 2;
    char err[512];
    int kind = attn_kind_parse(r.attn_name);
    if (kind < 0) {
        fprintf(stderr, "niah: --attn is dense, swa or dma, not %s\n", r.attn_name);
        return 2;
    }
    if (!r.checkpoint) {
        fprintf(stderr, "niah: --checkpoint is required (the grid is evaluated from it)\n");
        return 2;
    }
    if (niah_check(&r.data, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    if (parse_lengths(&r))
        return 2;
    if (r.threads == 0)
        r.threads = omp_get_max_threads();
    model_config mc = model_config_defaults((model_config){
        .vocab = r.data.vocab, .d_model = r.d_model, .n_layers = r.layers, .n_heads = r.heads,
        .n_kv_heads = r.kv_heads, .max_seq = r.data.seq_len, .attn = (attn_kind)kind,
        .window = r.window, .attn_only = !r.mlp, .tie_embeddings = 1});
    adamw_config opt;
    if (train_adamw(r.lr, r.min_lr, r.weight_decay, r.grad_clip, r.steps, r.warmup, &opt, err,
                    sizeof err)) {
        fprintf(stderr, "niah: %s\n", err);
        return 2;
    }

    char run_id[256];
    describe(&r, run_id, sizeof run_id);
    train_settings ts = {.program = "niah", .run_id = run_id, .checkpoint = r.checkpoint,
                         .batch = r.batch, .seq_len = r.data.seq_len, .steps = r.steps,
                         .save_every = r.save_every, .eval_every = r.eval_every,
                         .max_minutes = r.max_minutes, .stop_at = r.stop_at, .quiet = r.quiet};
    model *m = NULL;
    double trained_seconds = 0.0;
    if (train_open(&ts, &mc, &opt, (uint64_t)r.seed, r.batch, r.threads, &m, &trained_seconds,
                   err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    int status = 0;
    if (r.init_from && m->step == 0 && trained_seconds == 0.0) {
        if (init_from(m, r.init_from, err, sizeof err)) {
            fprintf(stderr, "%s\n", err);
            model_destroy(m);
            return 1;
        }
        if (!r.quiet)
            printf("niah: starting from the weights of %s\n", r.init_from);
    }
    if (m->step < r.steps) {
        const int L = r.data.seq_len;
        int32_t *tok = malloc(sizeof(int32_t) * (size_t)r.batch * L);
        int32_t *lab = malloc(sizeof(int32_t) * (size_t)r.batch * L);
        if (!tok || !lab) {
            fprintf(stderr, "niah: out of memory\n");
            return 1;
        }
        if (!r.quiet)
            printf("niah: train at L %d (needle %d + %d tokens, vocab %d) | %s attention, "
                   "window %d, d_model %d, %d layers, %d heads, %zu parameters | %s step %lld "
                   "of %d, batch %d, lr %g, %d threads\n", L, r.data.key_len,
                   r.data.value_len, r.data.vocab, r.attn_name, r.window, r.d_model, r.layers,
                   r.heads, m->n_params, m->step ? "resuming at" : "from", (long long)m->step,
                   r.steps, r.batch, (double)r.lr, r.threads);
        hooks_ctx hc = {.r = &r, .tok = tok, .lab = lab};
        train_hooks hooks = {.ctx = &hc, .make_batch = hook_batch, .evaluate = hook_evaluate};
        train_outcome out;
        if (train_run(m, &opt, &ts, &hooks, trained_seconds, &out, err, sizeof err)) {
            fprintf(stderr, "%s\n", err);
            status = 1;
        } else if (!r.quiet) {
            char t[32];
            progress_format_seconds(t, sizeof t, out.seconds);
            printf("trained %lld steps in %s (%.0f tokens/s)\n", (long long)m->step, t,
                   out.tokens_per_s);
        }
        free(tok);
        free(lab);
    } else if (!r.quiet) {
        printf("niah: %s is trained (%lld steps); evaluating\n", r.checkpoint,
               (long long)m->step);
    }
    if (status == 0 && evaluate_grid(&r, m, run_id))
        status = 1;
    model_destroy(m);
    return status;
}

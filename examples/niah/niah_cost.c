/*
 * niah-cost - what the attention of the needle models costs per sequence, dense against dma,
 * measured in one run over a list of context lengths: the cost line of the NIAH experiment.
 *
 *   niah-cost --lengths 1024,2048,4096,8192,16384,32768 --window 256 --out runs/niah-cost
 *
 * Per layer and sequence, dma runs what the trained model runs: the value-derived bias
 * (dma_dynamic_bias_forward), the causal top-`window` selection (dma_sparsity_build) and the
 * sparse forward (dma_forward with that bias); dense runs the causal dense forward. Inputs are
 * random (the cost does not depend on the weights). Each figure is the best of --repeats runs,
 * times --layers. Writes <out>.csv and <out>.json; tools/niah-plot draws the line plot.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include <dmattn.h>

#include "flags.h"
#include "prng.h"

#define MAX_LENGTHS 32

typedef struct cost_run {
    const char *lengths_arg, *out;
    int heads, kv_heads, head_dim, window, layers, threads, repeats;
    int n_lengths, lengths[MAX_LENGTHS];
} cost_run;

static void fill_normal(float *x, size_t n, uint64_t seed)
{
    prng r = prng_seeded(seed, 0);
    for (size_t i = 0; i < n; i++)
        x[i] = prng_normal(&r);
}

/* Seconds of one layer's attention forward at length L, the best of `repeats`. */
static int time_layer(dma_context *ctx, const cost_run *c, int L, int dma, double *best)
{
    const int Hq = c->heads, Hkv = c->kv_heads, D = c->head_dim;
    const size_t nq = (size_t)L * Hq * D, nk = (size_t)L * Hkv * D;
    float *q = malloc(sizeof(float) * nq), *k = malloc(sizeof(float) * nk),
          *v = malloc(sizeof(float) * nk), *o = malloc(sizeof(float) * nq),
          *lse = malloc(sizeof(float) * (size_t)Hq * L),
          *bias = malloc(sizeof(float) * (size_t)Hkv * L),
          *w_dt = malloc(sizeof(float) * (size_t)Hkv * D * Hkv);
    float b_dt[1024], a_dt[1024];
    int status = 0;
    if (!q || !k || !v || !o || !lse || !bias || !w_dt) {
        fprintf(stderr, "niah-cost: out of memory at L %d\n", L);
        status = -1;
        goto done;
    }
    fill_normal(q, nq, 1);
    fill_normal(k, nk, 2);
    fill_normal(v, nk, 3);
    fill_normal(w_dt, (size_t)Hkv * D * Hkv, 4);
    for (int h = 0; h < Hkv; h++) {
        b_dt[h] = 0.0f;
        a_dt[h] = 0.5f;
    }
    dma_tensor tq = dma_tensor_4d(q, DMA_F32, 1, L, Hq, D),
               tk = dma_tensor_4d(k, DMA_F32, 1, L, Hkv, D),
               tv = dma_tensor_4d(v, DMA_F32, 1, L, Hkv, D),
               to = dma_tensor_4d(o, DMA_F32, 1, L, Hq, D),
               tl = dma_tensor_3d(lse, DMA_F32, 1, Hq, L),
               tb = dma_tensor_4d(bias, DMA_F32, 1, Hkv, 1, L),
               tw = dma_tensor_2d(w_dt, DMA_F32, (int64_t)Hkv * D, Hkv),
               tbd = dma_tensor_1d(b_dt, DMA_F32, Hkv), tad = dma_tensor_1d(a_dt, DMA_F32, Hkv);
    dma_attn_params params = {.causal = 1};
    dma_mask_params mask = {.kind = DMA_MASK_TOPK, .causal = 1, .window = c->window};
    *best = INFINITY;
    for (int rep = 0; rep < c->repeats && status == 0; rep++) {
        double t0 = omp_get_wtime();
        dma_sparsity *sp = NULL;
        dma_status st = DMA_OK;
        if (dma) {
            st = dma_dynamic_bias_forward(ctx, &tv, &tw, &tbd, &tad, &tb);
            if (!st)
                st = dma_sparsity_build(ctx, &mask, 1, Hkv, L, L, &tb, NULL, &sp);
        }
        if (!st)
            st = dma_forward(ctx, &tq, &tk, &tv, dma ? &tb : NULL, sp, &params, &to, &tl);
        dma_sparsity_destroy(sp);
        double t = omp_get_wtime() - t0;
        if (st) {
            fprintf(stderr, "niah-cost: %s at L %d: %s (%s)\n", dma ? "dma" : "dense", L,
                    dma_status_string(st), dma_context_last_error(ctx));
            status = -1;
        }
        *best = t < *best ? t : *best;
    }
done:
    free(q); free(k); free(v); free(o); free(lse); free(bias); free(w_dt);
    return status;
}

static int parse_lengths(cost_run *c)
{
    char err[512];
    c->n_lengths = flags_int_list(c->lengths_arg, "niah-cost: --lengths", 1, 1 << 22,
                                  c->lengths, MAX_LENGTHS, err, sizeof err);
    if (c->n_lengths < 0)
        fprintf(stderr, "%s\n", err);
    return c->n_lengths < 0 ? -1 : 0;
}

/* <out>.csv and <out>.json; -1 with a message when a file cannot be written. */
static int write_results(const cost_run *c, const dma_context *ctx, const double *dense,
                         const double *dma)
{
    char path[1024];
    snprintf(path, sizeof path, "%s.csv", c->out);
    FILE *f = fopen(path, "w");
    if (!f)
        goto fail;
    fprintf(f, "length,dense_seconds,dma_seconds\n");
    for (int j = 0; j < c->n_lengths; j++)
        fprintf(f, "%d,%.6f,%.6f\n", c->lengths[j], dense[j], dma[j]);
    if (fclose(f))
        goto fail;
    snprintf(path, sizeof path, "%s.json", c->out);
    if (!(f = fopen(path, "w")))
        goto fail;
    fprintf(f, "{\"layers\":%d,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"window\":%d,"
               "\"threads\":%d,\"rows\":[", c->layers, c->heads, c->kv_heads, c->head_dim,
            c->window, dma_context_threads(ctx));
    for (int j = 0; j < c->n_lengths; j++)
        fprintf(f, "%s\n{\"length\":%d,\"dense_seconds\":%.6f,\"dma_seconds\":%.6f}",
                j ? "," : "", c->lengths[j], dense[j], dma[j]);
    fprintf(f, "\n]}\n");
    if (fclose(f))
        goto fail;
    return 0;
fail:
    fprintf(stderr, "niah-cost: cannot write %s: %s\n", path, strerror(errno));
    return -1;
}

int main(int argc, char **argv)
{
    cost_run c = {.lengths_arg = "1024,2048,4096,8192,16384,32768", .out = "niah-cost",
                  .heads = 2, .head_dim = 64, .window = 256, .layers = 2, .threads = 1,
                  .repeats = 3};
    const flag flags[] = {
        {"--lengths", FLAG_STRING, &c.lengths_arg, 0, 0, "context lengths"},
        {"--heads", FLAG_INT, &c.heads, 1, 1024, "query heads"},
        {"--kv-heads", FLAG_INT, &c.kv_heads, 0, 1024, "key/value heads (0: as many as heads)"},
        {"--head-dim", FLAG_INT, &c.head_dim, 1, 1024, "head dimension"},
        {"--window", FLAG_INT, &c.window, 1, 1 << 24, "dma's keys per query"},
        {"--layers", FLAG_INT, &c.layers, 1, 1024, "attention layers per sequence"},
        {"--threads", FLAG_INT, &c.threads, 0, 4096, "threads (0: all)"},
        {"--repeats", FLAG_INT, &c.repeats, 1, 1000, "runs per figure (the best is kept)"},
        {"--out", FLAG_STRING, &c.out, 0, 0, "prefix of the results: <out>.csv, <out>.json"},
    };
    int rc = flags_parse(argc, argv, "niah-cost",
                         "Attention time per sequence, dense vs dma, by context length.", flags,
                         (int)(sizeof flags / sizeof flags[0]));
    if (rc)
        return rc > 0 ? 0 : 2;
    if (parse_lengths(&c))
        return 2;
    if (c.kv_heads == 0)
        c.kv_heads = c.heads;
    if (c.heads % c.kv_heads) {
        fprintf(stderr, "niah-cost: --kv-heads must divide --heads\n");
        return 2;
    }
    dma_context *ctx;
    dma_context_options o = {.threads = c.threads};
    dma_status st = dma_context_create(&o, &ctx);
    if (st) {
        fprintf(stderr, "niah-cost: dma_context_create: %s\n", dma_status_string(st));
        return 1;
    }
    double dense[MAX_LENGTHS], dma[MAX_LENGTHS];
    printf("attention per sequence (%d layers, Hq %d, Hkv %d, D %d, dma window %d, %d threads)\n"
           "%8s %12s %12s %8s\n", c.layers, c.heads, c.kv_heads, c.head_dim, c.window,
           dma_context_threads(ctx), "length", "dense s", "dma s", "ratio");
    int status = 0;
    for (int j = 0; j < c.n_lengths && status == 0; j++) {
        double td, tm;
        if (time_layer(ctx, &c, c.lengths[j], 0, &td) || time_layer(ctx, &c, c.lengths[j], 1, &tm)) {
            status = 1;
            break;
        }
        dense[j] = td * c.layers;
        dma[j] = tm * c.layers;
        printf("%8d %12.5f %12.5f %7.1fx\n", c.lengths[j], dense[j], dma[j], dense[j] / dma[j]);
        fflush(stdout);
    }
    if (status == 0 && write_results(&c, ctx, dense, dma))
        status = 1;
    dma_context_destroy(ctx);
    return status;
}

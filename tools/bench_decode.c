/*
 * bench_decode.c - dmattn-bench --decode and --prefill CHUNK (see bench_decode.h and --help).
 *
 * Per storage dtype, one KV cache (dma_kv_cache_create) of --lk tokens of random keys, values
 * and per-key biases, then:
 *   read_bw / memory  one streaming pass summing a float buffer of the dense decode's K+V bytes;
 *   decode / dense    append one token + dma_kv_forward(DENSE) of one query row, all heads;
 *   decode / dma      append one token + dma_kv_forward(TOPK, add_bias) (the append is the
 *                     selection update); dense and dma steps alternate call by call;
 *   prefill / dma     append CHUNK tokens + dma_kv_forward(TOPK, add_bias) of those CHUNK rows;
 *   forward / dma     dma_sparsity_build(TOPK, causal, per-key bias) + dma_forward, Lq = Lk =
 *                     CHUNK, float32; prefill and forward alternate call by call.
 * A cache cannot be shrunk, so it grows: every decode step adds one token and every prefill
 * run CHUNK tokens, and the cache is created with room for all of them.
 */
#include "bench_decode.h"

#include "bench_common.h"
#include "bench_dtype.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Tokens per append while the cache is filled to --lk. */
#define FILL_CHUNK 4096
/* Distinct random tokens the timed decode steps cycle through. */
#define TOKEN_POOL 64
/* Floats per work item of the read_bw pass. */
#define READ_BLOCK 65536

/* The configuration and targets (printed in the table's notes). */
#define TARGET_READ_BW 0.60
#define TARGET_DMA_SPEEDUP 100.0
#define TARGET_BF16_SPEEDUP 1.6
#define TARGET_PREFILL_RATIO 2.0

/* ------------------------------------------------------------------------------------------ */
/* Command line                                                                               */
/* ------------------------------------------------------------------------------------------ */

void bench_decode_parse_dtypes(const char *flag, const char *s, decode_options *o)
{
    static const dma_dtype all[] = {DMA_F32, DMA_BF16, DMA_F16};
    o->ndtypes = 0;
    const char *p = s;
    while (1) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        int k = -1;
        for (int j = 0; j < 3; j++)
            if (strlen(dtype_name(all[j])) == len && !strncmp(p, dtype_name(all[j]), len))
                k = j;
        if (k < 0)
            usage_error("%s expects f32, bf16, f16 or a comma-separated list of them, got '%s'",
                        flag, s);
        for (int j = 0; j < o->ndtypes; j++)
            if (o->dtypes[j] == all[k])
                usage_error("%s: %s is listed twice in '%s'", flag, dtype_name(all[k]), s);
        o->dtypes[o->ndtypes++] = all[k];
        if (!comma)
            break;
        p = comma + 1;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Results                                                                                    */
/* ------------------------------------------------------------------------------------------ */

enum { OP_READ_BW, OP_DECODE, OP_PREFILL, OP_FORWARD };
static const char *const op_names[] = {"read_bw", "decode", "prefill", "forward"};
enum { IMPL_MEMORY, IMPL_DENSE, IMPL_DMA };
static const char *const impl_names[] = {"memory", "dense", "dma"};

/* One measurement: one output line. NaN doubles and negative integers print as null. */
typedef struct dec_result {
    int op, impl;
    dma_dtype dtype;
    int64_t lk;           /* --lk; forward: CHUNK (its Lk) */
    int64_t length;       /* decode: cache length of the first timed step, after its append;
                             prefill: length before the first timed chunk */
    int64_t chunk;        /* prefill, forward */
    timing tm;
    double bytes, gbps;   /* read_bw, decode */
    double vs_read_bw;    /* decode: this gbps / read_bw gbps of the same dtype */
    double speedup;       /* dma decode: dense ms / this ms */
    double speedup_call;  /* dma decode: 1 / median over rounds of (dma call / dense call) */
    double vs_f32;        /* non-f32 decode: the f32 line's ms / this ms (same impl) */
    double vs_forward;    /* prefill: this ms / forward ms */
    double vs_fwd_call;   /* prefill: median over rounds of (prefill call / forward call) */
} dec_result;

static dec_result new_line(int op, int impl, dma_dtype dt, int64_t lk, timing tm)
{
    dec_result r;
    memset(&r, 0, sizeof r);
    r.op = op;
    r.impl = impl;
    r.dtype = dt;
    r.lk = lk;
    r.length = -1;
    r.chunk = -1;
    r.tm = tm;
    r.bytes = r.gbps = r.vs_read_bw = r.speedup = r.speedup_call = NAN;
    r.vs_f32 = r.vs_forward = r.vs_fwd_call = NAN;
    return r;
}

static double gbps_of(double bytes, double ms)
{
    return ms > 0 ? bytes / (ms * 1e6) : NAN;
}

static void print_line_json(const decode_options *o, const char *isa, const dec_result *r)
{
    printf("{\"op\":\"%s\"", op_names[r->op]);
    json_str("impl", impl_names[r->impl]);
    json_str("dtype", dtype_name(r->dtype));
    json_int("B", o->B, 0);
    json_int("lk", r->lk, 0);
    json_int("hq", o->hq, 0);
    json_int("hkv", o->hkv, 0);
    json_int("dim", o->dim, 0);
    json_int("window", o->window, 0);
    json_int("threads", o->threads, 0);
    json_str("isa", isa);
    json_int("runs", r->tm.runs, 0);
    json_int("warmup", r->tm.warmup, 0);
    json_num("ms", r->tm.median);
    json_num("ms_min", r->tm.min);
    json_num("ms_max", r->tm.max);
    if (r->op == OP_READ_BW || r->op == OP_DECODE) {
        json_num("bytes", r->bytes);
        json_num("gbps", r->gbps);
    }
    if (r->op == OP_DECODE) {
        json_int("length", r->length, 0);
        json_num("gbps_vs_read_bw", r->vs_read_bw);
        json_num("speedup", r->speedup);
        json_num("speedup_per_call", r->speedup_call);
        json_num("speedup_vs_f32", r->vs_f32);
    }
    if (r->op == OP_PREFILL || r->op == OP_FORWARD)
        json_int("chunk", r->chunk, 0);
    if (r->op == OP_PREFILL) {
        json_int("length", r->length, 0);
        json_num("vs_forward", r->vs_forward);
        json_num("vs_forward_per_call", r->vs_fwd_call);
    }
    printf("}\n");
    fflush(stdout);
}

static void print_line_table(const dec_result *r)
{
    char ms[32], gb[32], sp[32], len[32], note[256];
    fmt_num(ms, sizeof ms, "%.4f", r->tm.median);
    fmt_num(gb, sizeof gb, "%.2f", r->gbps);
    fmt_num(sp, sizeof sp, "%.1fx", r->speedup);
    if (r->length >= 0)
        snprintf(len, sizeof len, "%lld", (long long)r->length);
    else
        snprintf(len, sizeof len, "%lld", (long long)r->lk);
    note[0] = 0;
    size_t n = 0;
#define NOTE(...) n += (size_t)snprintf(note + n, n < sizeof note ? sizeof note - n : 0, __VA_ARGS__)
    if (isfinite(r->vs_read_bw))
        NOTE("%.2f of read_bw ", r->vs_read_bw);
    if (isfinite(r->speedup_call))
        NOTE("per call %.1fx ", r->speedup_call);
    if (isfinite(r->vs_f32))
        NOTE("%.2fx vs f32 ", r->vs_f32);
    if (r->chunk >= 0)
        NOTE("chunk=%lld ", (long long)r->chunk);
    if (isfinite(r->vs_forward))
        NOTE("%.2fx the forward (per call %.2fx) ", r->vs_forward, r->vs_fwd_call);
    if (r->tm.runs == 1 && r->tm.warmup == 0)
        NOTE("(1 run, no warm-up)");
#undef NOTE
    while (n > 0 && n < sizeof note && note[n - 1] == ' ')
        note[--n] = 0;
    printf("%-8s %-7s %-5s %8s %11s %8s %8s  %s\n", op_names[r->op], impl_names[r->impl],
           dtype_name(r->dtype), len, ms, gb, sp, note);
    fflush(stdout);
}

static void emit_line(const decode_options *o, const char *isa, const dec_result *r)
{
    if (o->json)
        print_line_json(o, isa, r);
    else
        print_line_table(r);
}

/* ------------------------------------------------------------------------------------------ */
/* read_bw: a plain streaming read                                                            */
/* ------------------------------------------------------------------------------------------ */

/* Keeps the sums observable, so that the read is not optimised away. */
static volatile float read_sink;

/* Sum of x[0..n) with 32 independent accumulators (the compiler vectorises the inner loop). */
static float sum_span(const float *restrict x, int64_t n)
{
    float acc[32];
    for (int j = 0; j < 32; j++)
        acc[j] = 0.0f;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 32; j++)
            acc[j] += x[i + j];
    float s = 0.0f;
    for (; i < n; i++)
        s += x[i];
    for (int j = 0; j < 32; j++)
        s += acc[j];
    return s;
}

typedef struct read_arg {
    const float *x;
    int64_t n;
    int threads;
} read_arg;

static void run_read(void *a)
{
    const read_arg *ra = a;
    const int64_t nblk = (ra->n + READ_BLOCK - 1) / READ_BLOCK;
    float total = 0.0f;
#pragma omp parallel for num_threads(ra->threads) schedule(static) reduction(+ : total)
    for (int64_t b = 0; b < nblk; b++) {
        int64_t i0 = b * READ_BLOCK, m = ra->n - i0 < READ_BLOCK ? ra->n - i0 : READ_BLOCK;
        total += sum_span(ra->x + i0, m);
    }
    read_sink = total;
}

static dec_result measure_read_bw(const decode_options *o, dma_dtype dt, int64_t bytes,
                                  runspec rs)
{
    read_arg ra;
    ra.n = bytes / (int64_t)sizeof(float);
    ra.threads = o->threads;
    float *x = xalloc(ra.n, sizeof(float), "read_bw buffer");
    /* written by the same threads and schedule that read it (first touch) */
    const int64_t nblk = (ra.n + READ_BLOCK - 1) / READ_BLOCK;
#pragma omp parallel for num_threads(ra.threads) schedule(static)
    for (int64_t b = 0; b < nblk; b++)
        for (int64_t i = b * READ_BLOCK; i < ra.n && i < (b + 1) * READ_BLOCK; i++)
            x[i] = (float)(i & 1023) * (1.0f / 1024.0f);
    ra.x = x;
    timing tm = time_it(run_read, NULL, &ra, rs);
    free(x);
    dec_result r = new_line(OP_READ_BW, IMPL_MEMORY, dt, o->lk, tm);
    r.bytes = (double)ra.n * sizeof(float);
    r.gbps = gbps_of(r.bytes, tm.median);
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* The cache                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Append n tokens of dtype-t keys/values k, v (B, n, Hkv, D) and float bias (B, Hkv, 1, n). */
static void append(dma_context *ctx, dma_kv_cache *c, const decode_options *o, dma_dtype t,
                   void *k, void *v, float *bias, int64_t n)
{
    dma_tensor tk = dma_tensor_4d(k, t, o->B, n, o->hkv, o->dim);
    dma_tensor tv = dma_tensor_4d(v, t, o->B, n, o->hkv, o->dim);
    dma_tensor tb = dma_tensor_4d(bias, DMA_F32, o->B, o->hkv, 1, n);
    check(ctx, dma_kv_cache_append(ctx, c, &tk, &tv, &tb, NULL), "dma_kv_cache_append");
}

/* A cache of dtype t with room for max_len tokens, filled with o->lk random tokens (k, v
 * uniform in [-1, 1), bias in [0, 4), fixed seeds: every dtype gets the same values, rounded)
 * in appends of FILL_CHUNK; progress on stderr once it takes more than 2 s. */
static dma_kv_cache *make_cache(dma_context *ctx, const decode_options *o, dma_dtype t,
                                int64_t max_len)
{
    dma_kv_cache_params cp;
    memset(&cp, 0, sizeof cp);
    cp.batch = o->B;
    cp.kv_heads = o->hkv;
    cp.head_dim = o->dim;
    cp.dtype = t;
    cp.max_len = max_len;
    cp.window = o->window;
    cp.page_len = 0;
    cp.max_pages = 0;
    dma_kv_cache *c = NULL;
    check(ctx, dma_kv_cache_create(ctx, &cp, &c), "dma_kv_cache_create");

    const int64_t cmax = o->lk < FILL_CHUNK ? o->lk : FILL_CHUNK;
    const int64_t nkv = mul4(o->B, cmax, o->hkv, o->dim, "fill chunk");
    float *kf = xalloc(nkv, sizeof(float), "fill k"), *vf = xalloc(nkv, sizeof(float), "fill v");
    float *bias = xalloc(mul4(o->B, o->hkv, cmax, 1, "fill bias"), sizeof(float), "fill bias");
    void *k = t == DMA_F32 ? (void *)kf : xalloc(nkv, dtype_size(t), "fill k");
    void *v = t == DMA_F32 ? (void *)vf : xalloc(nkv, dtype_size(t), "fill v");
    const int tty = isatty(STDERR_FILENO);
    const double t0 = now_ms();
    double last = t0;
    int shown = 0;
    for (int64_t pos = 0, ci = 0; pos < o->lk; pos += cmax, ci++) {
        const int64_t n = o->lk - pos < cmax ? o->lk - pos : cmax;
        const int64_t nn = o->B * n * o->hkv * o->dim;
        fill_uniform(kf, nn, 1000 + 3 * (uint64_t)ci, -1.0f, 1.0f);
        fill_uniform(vf, nn, 1001 + 3 * (uint64_t)ci, -1.0f, 1.0f);
        fill_uniform(bias, o->B * o->hkv * n, 1002 + 3 * (uint64_t)ci, 0.0f, 4.0f);
        if (t != DMA_F32) {
            store_as(k, t, kf, nn);
            store_as(v, t, vf, nn);
        }
        append(ctx, c, o, t, k, v, bias, n);
        const double now = now_ms();
        if (now - t0 > 2000.0 && now - last > (tty ? 500.0 : 5000.0)) {
            fprintf(stderr, "%s[fill %s] %lld/%lld tokens%s", tty ? "\r" : "",
                    dtype_name(t), (long long)(pos + n), (long long)o->lk, tty ? "" : "\n");
            last = now;
            shown = 1;
        }
    }
    if (shown)
        fprintf(stderr, "%s[fill %s] %lld tokens in %.1f s\n", tty ? "\r" : "", dtype_name(t),
                (long long)o->lk, (now_ms() - t0) * 1e-3);
    if (dma_kv_cache_length(c, 0) != o->lk)
        fatal("the cache holds %lld tokens after appending %lld",
              (long long)dma_kv_cache_length(c, 0), (long long)o->lk);
    if (k != kf)
        free(k);
    if (v != vf)
        free(v);
    free(kf);
    free(vf);
    free(bias);
    return c;
}

/* ------------------------------------------------------------------------------------------ */
/* Decode steps                                                                               */
/* ------------------------------------------------------------------------------------------ */

typedef struct step_state {
    dma_context *ctx;
    dma_kv_cache *cache;
    const decode_options *o;
    dma_dtype t;
    void *k, *v;        /* TOKEN_POOL tokens, each (B, 1, Hkv, D) of dtype t */
    float *bias;        /* TOKEN_POOL tokens, each (B, Hkv, 1, 1) */
    int64_t next;       /* the pool token the next step appends */
    void *q, *out;      /* (B, 1, Hq, D) of dtype t */
    dma_tensor tq, tout;
} step_state;

typedef struct step_arg {
    step_state *s;
    dma_kv_attn_params prm;
} step_arg;

static void run_step(void *a)
{
    const step_arg *sa = a;
    step_state *s = sa->s;
    const decode_options *o = s->o;
    const int64_t tok = s->next++ % TOKEN_POOL, nkv = o->B * o->hkv * o->dim;
    append(s->ctx, s->cache, o, s->t, (char *)s->k + tok * nkv * (int64_t)dtype_size(s->t),
           (char *)s->v + tok * nkv * (int64_t)dtype_size(s->t), s->bias + tok * o->B * o->hkv,
           1);
    check(s->ctx, dma_kv_forward(s->ctx, s->cache, &s->tq, NULL, &sa->prm, &s->tout, NULL),
          "dma_kv_forward");
}

/* The dense and dma decode steps, alternating call by call (dense first): res[0], res[1]. */
static void measure_decode(dma_context *ctx, dma_kv_cache *c, const decode_options *o,
                           dma_dtype t, runspec rs, dec_result res[2])
{
    step_state s;
    memset(&s, 0, sizeof s);
    s.ctx = ctx;
    s.cache = c;
    s.o = o;
    s.t = t;
    const int64_t nkv = mul4(TOKEN_POOL, o->B, o->hkv, o->dim, "decode tokens");
    const int64_t nq = mul4(o->B, 1, o->hq, o->dim, "decode q");
    s.k = random_as(t, nkv, 21, -1.0f, 1.0f, "decode k");
    s.v = random_as(t, nkv, 22, -1.0f, 1.0f, "decode v");
    s.bias = xalloc(TOKEN_POOL * o->B * o->hkv, sizeof(float), "decode bias");
    fill_uniform(s.bias, TOKEN_POOL * o->B * o->hkv, 23, 0.0f, 4.0f);
    s.q = random_as(t, nq, 24, -1.0f, 1.0f, "decode q");
    s.out = xalloc(nq, dtype_size(t), "decode out");
    memset(s.out, 0, (size_t)nq * dtype_size(t));
    s.tq = dma_tensor_4d(s.q, t, o->B, 1, o->hq, o->dim);
    s.tout = dma_tensor_4d(s.out, t, o->B, 1, o->hq, o->dim);

    step_arg dense, dma;
    memset(&dense, 0, sizeof dense);
    memset(&dma, 0, sizeof dma);
    dense.s = dma.s = &s;
    dense.prm.kind = DMA_MASK_DENSE;
    dense.prm.add_bias = 0;
    dma.prm.kind = DMA_MASK_TOPK;
    dma.prm.add_bias = 1;
    const int64_t len0 = dma_kv_cache_length(c, 0);
    timing tm[2];
    time_alternating(2, (bench_fn[]){run_step, run_step}, (void *[]){&dense, &dma}, NULL, rs,
                     tm);
    check_finite_as(s.out, t, nq, "the decode output");

    /* the first timed dense step sees len0 + 2 * warmup + 1 tokens, the dma step one more */
    const int64_t ld = len0 + 2 * (int64_t)rs.warmup + 1, lm = ld + 1;
    const double row = (double)o->B * (double)o->hkv * (double)o->dim * 2.0 * dtype_size(t);
    res[0] = new_line(OP_DECODE, IMPL_DENSE, t, o->lk, tm[0]);
    res[0].length = ld;
    res[0].bytes = (double)ld * row;
    res[1] = new_line(OP_DECODE, IMPL_DMA, t, o->lk, tm[1]);
    res[1].length = lm;
    res[1].bytes = (double)(o->window < lm ? o->window : lm) * row;
    for (int i = 0; i < 2; i++)
        res[i].gbps = gbps_of(res[i].bytes, res[i].tm.median);
    if (tm[1].median > 0)
        res[1].speedup = tm[0].median / tm[1].median;
    if (tm[1].per_call > 0)
        res[1].speedup_call = 1.0 / tm[1].per_call;
    free(s.k);
    free(s.v);
    free(s.bias);
    free(s.q);
    free(s.out);
}

/* ------------------------------------------------------------------------------------------ */
/* Prefill against the forward                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef struct prefill_arg {
    dma_context *ctx;
    dma_kv_cache *cache;
    const decode_options *o;
    dma_dtype t;
    void *k, *v, *q, *out;  /* dtype t: (B, CHUNK, Hkv, D) and (B, CHUNK, Hq, D) */
    float *bias;            /* (B, Hkv, 1, CHUNK) */
    dma_tensor tq, tout;
    dma_kv_attn_params prm;
} prefill_arg;

static void run_prefill(void *a)
{
    prefill_arg *p = a;
    append(p->ctx, p->cache, p->o, p->t, p->k, p->v, p->bias, p->o->prefill);
    check(p->ctx, dma_kv_forward(p->ctx, p->cache, &p->tq, NULL, &p->prm, &p->tout, NULL),
          "dma_kv_forward");
}

typedef struct fwd_arg {
    dma_context *ctx;
    const decode_options *o;
    dma_mask_params mp;
    dma_tensor tq, tk, tv, tbias, tout;
    dma_sparsity *sp;
} fwd_arg;

static void fwd_before(void *a)
{
    fwd_arg *f = a;
    dma_sparsity_destroy(f->sp);
    f->sp = NULL;
}

static void run_fwd(void *a)
{
    fwd_arg *f = a;
    const dma_attn_params prm = {0.0f, 0.0f, 1};
    check(f->ctx, dma_sparsity_build(f->ctx, &f->mp, f->o->B, f->o->hkv, f->o->prefill,
                                     f->o->prefill, &f->tbias, NULL, &f->sp),
          "dma_sparsity_build");
    check(f->ctx, dma_forward(f->ctx, &f->tq, &f->tk, &f->tv, &f->tbias, f->sp, &prm, &f->tout,
                              NULL),
          "dma_forward");
}

/* The forward (res[0]) and the prefill (res[1]), alternating call by call (forward first):
 * the same random chunk (k, v, bias, q) is appended by every prefill run and is the forward's
 * input (in float32). */
static void measure_prefill(dma_context *ctx, dma_kv_cache *c, const decode_options *o,
                            dma_dtype t, runspec rs, dec_result res[2])
{
    const int64_t n = o->prefill;
    const int64_t nkv = mul4(o->B, n, o->hkv, o->dim, "prefill k/v");
    const int64_t nq = mul4(o->B, n, o->hq, o->dim, "prefill q");
    const int64_t nb = mul4(o->B, o->hkv, 1, n, "prefill bias");
    float *kf = xalloc(nkv, sizeof(float), "forward k"), *vf = xalloc(nkv, sizeof(float), "v");
    float *qf = xalloc(nq, sizeof(float), "forward q"), *of = xalloc(nq, sizeof(float), "out");
    float *bias = xalloc(nb, sizeof(float), "prefill bias");
    fill_uniform(kf, nkv, 31, -1.0f, 1.0f);
    fill_uniform(vf, nkv, 32, -1.0f, 1.0f);
    fill_uniform(qf, nq, 33, -1.0f, 1.0f);
    fill_uniform(bias, nb, 34, 0.0f, 4.0f);
    memset(of, 0, (size_t)nq * sizeof(float));

    prefill_arg p;
    memset(&p, 0, sizeof p);
    p.ctx = ctx;
    p.cache = c;
    p.o = o;
    p.t = t;
    p.bias = bias;
    p.k = kf;
    p.v = vf;
    p.q = qf;
    if (t != DMA_F32) {
        p.k = xalloc(nkv, dtype_size(t), "prefill k");
        p.v = xalloc(nkv, dtype_size(t), "prefill v");
        p.q = xalloc(nq, dtype_size(t), "prefill q");
        store_as(p.k, t, kf, nkv);
        store_as(p.v, t, vf, nkv);
        store_as(p.q, t, qf, nq);
    }
    p.out = xalloc(nq, dtype_size(t), "prefill out");
    memset(p.out, 0, (size_t)nq * dtype_size(t));
    p.tq = dma_tensor_4d(p.q, t, o->B, n, o->hq, o->dim);
    p.tout = dma_tensor_4d(p.out, t, o->B, n, o->hq, o->dim);
    p.prm.kind = DMA_MASK_TOPK;
    p.prm.add_bias = 1;

    fwd_arg f;
    memset(&f, 0, sizeof f);
    f.ctx = ctx;
    f.o = o;
    f.mp.kind = DMA_MASK_TOPK;
    f.mp.causal = 1;
    f.mp.window = o->window;
    f.mp.block_size = 0;
    f.tq = dma_tensor_4d(qf, DMA_F32, o->B, n, o->hq, o->dim);
    f.tk = dma_tensor_4d(kf, DMA_F32, o->B, n, o->hkv, o->dim);
    f.tv = dma_tensor_4d(vf, DMA_F32, o->B, n, o->hkv, o->dim);
    f.tbias = dma_tensor_4d(bias, DMA_F32, o->B, o->hkv, 1, n);
    f.tout = dma_tensor_4d(of, DMA_F32, o->B, n, o->hq, o->dim);

    const int64_t len0 = dma_kv_cache_length(c, 0);
    timing tm[2];
    time_alternating(2, (bench_fn[]){run_fwd, run_prefill}, (void *[]){&f, &p}, fwd_before, rs,
                     tm);
    fwd_before(&f);
    check_finite_as(p.out, t, nq, "the prefill output");
    check_finite_as(of, DMA_F32, nq, "the forward output");

    res[0] = new_line(OP_FORWARD, IMPL_DMA, DMA_F32, n, tm[0]);
    res[0].chunk = n;
    res[1] = new_line(OP_PREFILL, IMPL_DMA, t, o->lk, tm[1]);
    res[1].chunk = n;
    res[1].length = len0 + (int64_t)rs.warmup * n;
    if (tm[0].median > 0)
        res[1].vs_forward = tm[1].median / tm[0].median;
    res[1].vs_fwd_call = tm[1].per_call;
    if (p.k != kf) {
        free(p.k);
        free(p.v);
        free(p.q);
    }
    free(p.out);
    free(kf);
    free(vf);
    free(qf);
    free(of);
    free(bias);
}

/* ------------------------------------------------------------------------------------------ */
/* The mode                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static const dec_result *find(const dec_result *r, int n, int op, int impl, dma_dtype t)
{
    for (int i = 0; i < n; i++)
        if (r[i].op == op && r[i].impl == impl && r[i].dtype == t)
            return &r[i];
    return NULL;
}

/* The four targets, from the lines measured (those not measured say how). */
static void print_notes(const decode_options *o, const dec_result *r, int n)
{
    const dec_result *bw = find(r, n, OP_READ_BW, IMPL_MEMORY, DMA_F32);
    const dec_result *d32 = find(r, n, OP_DECODE, IMPL_DENSE, DMA_F32);
    const dec_result *m32 = find(r, n, OP_DECODE, IMPL_DMA, DMA_F32);
    const dec_result *d16 = find(r, n, OP_DECODE, IMPL_DENSE, DMA_BF16);
    printf("notes (the issue's targets, at lk 262144, hq 8, hkv 2, dim 128, window 1024, "
           "1 thread):\n");
    if (o->lk != 262144 || o->hq != 8 || o->hkv != 2 || o->dim != 128 || o->window != 1024 ||
        o->threads != 1 || o->B != 1)
        printf("  (this run's shape differs from the targets' configuration)\n");
    if (d32 && bw)
        printf("  dense decode f32: %.3f of read_bw (%.2f of %.2f GB/s; target >= %.2f)\n",
               d32->vs_read_bw, d32->gbps, bw->gbps, TARGET_READ_BW);
    else
        printf("  dense decode f32 vs read_bw: not measured (needs --decode with f32)\n");
    if (m32)
        printf("  dma decode f32: %.1fx faster than dense (per call %.1fx; target >= %.0fx)\n",
               m32->speedup, m32->speedup_call, TARGET_DMA_SPEEDUP);
    else
        printf("  dma decode vs dense: not measured (needs --decode with f32)\n");
    if (d16 && d32)
        printf("  dense decode bf16: %.2fx faster than f32 (target >= %.1fx)\n", d16->vs_f32,
               TARGET_BF16_SPEEDUP);
    else
        printf("  dense decode bf16 vs f32: not measured (needs --decode --dtype f32,bf16)\n");
    int any = 0;
    for (int i = 0; i < n; i++)
        if (r[i].op == OP_PREFILL) {
            printf("  prefill %s of %lld onto %lld: %.2fx the %lld-token forward (per call "
                   "%.2fx; target < %.1fx)\n",
                   dtype_name(r[i].dtype), (long long)r[i].chunk, (long long)r[i].length,
                   r[i].vs_forward, (long long)r[i].chunk, r[i].vs_fwd_call,
                   TARGET_PREFILL_RATIO);
            any = 1;
        }
    if (!any)
        printf("  prefill vs forward: not measured (needs --prefill 4096)\n");
}

int bench_decode_run(const decode_options *o)
{
    const int steps = o->warmup + o->runs;
    int64_t room = o->decode ? 2 * (int64_t)steps : 0;
    if (o->prefill > 0) {
        if (o->prefill > (int64_t)INT32_MAX / steps)
            usage_error("--prefill %lld times %d runs does not fit a cache",
                        (long long)o->prefill, steps);
        room += o->prefill * steps;
    }
    const int64_t max_len = o->lk + room;
    if (max_len > INT32_MAX)
        usage_error("--lk %lld plus the timed steps and chunks (%lld tokens) exceeds the cache's "
                    "limit of %d tokens",
                    (long long)o->lk, (long long)room, INT32_MAX);

    dma_context *ctx = make_context(o->threads, o->isa);
    const char *isa = dma_isa_name(dma_context_isa(ctx));
    const runspec rs = {o->warmup, o->runs, o->max_ms};
    /* f32 first, so that the other dtypes' lines can be compared with it */
    dma_dtype order[BENCH_MAX_DTYPES];
    int nd = 0;
    for (int i = 0; i < o->ndtypes; i++)
        if (o->dtypes[i] == DMA_F32)
            order[nd++] = DMA_F32;
    for (int i = 0; i < o->ndtypes; i++)
        if (o->dtypes[i] != DMA_F32)
            order[nd++] = o->dtypes[i];

    if (!o->json) {
        printf(PROG " decode: B=%lld lk=%lld hq=%lld hkv=%lld dim=%lld window=%lld threads=%d "
                    "isa=%s runs=%d warmup=%d",
               (long long)o->B, (long long)o->lk, (long long)o->hq, (long long)o->hkv,
               (long long)o->dim, (long long)o->window, o->threads, isa, o->runs, o->warmup);
        if (o->prefill > 0)
            printf(" prefill=%lld", (long long)o->prefill);
        printf("\n%-8s %-7s %-5s %8s %11s %8s %8s  %s\n", "op", "impl", "dtype", "length",
               "ms_median", "GB/s", "speedup", "note");
    }
    dec_result res[BENCH_MAX_DTYPES * 5];
    int n = 0;
    for (int di = 0; di < nd; di++) {
        const dma_dtype t = order[di];
        dma_kv_cache *c = make_cache(ctx, o, t, max_len);
        if (o->decode) {
            const double kv_bytes = (double)o->lk * (double)o->B * (double)o->hkv *
                                    (double)o->dim * 2.0 * dtype_size(t);
            dec_result *bw = &res[n];
            res[n++] = measure_read_bw(o, t, (int64_t)kv_bytes, rs);
            measure_decode(ctx, c, o, t, rs, &res[n]);
            for (int i = 0; i < 2; i++) {
                dec_result *d = &res[n + i];
                d->vs_read_bw = bw->gbps > 0 ? d->gbps / bw->gbps : NAN;
                const dec_result *f = t == DMA_F32 ? NULL : find(res, n, OP_DECODE, d->impl,
                                                                 DMA_F32);
                if (f && d->tm.median > 0)
                    d->vs_f32 = f->tm.median / d->tm.median;
            }
            n += 2;
            for (int i = n - 3; i < n; i++)
                emit_line(o, isa, &res[i]);
        }
        if (o->prefill > 0) {
            measure_prefill(ctx, c, o, t, rs, &res[n]);
            emit_line(o, isa, &res[n + 1]);
            emit_line(o, isa, &res[n]);
            n += 2;
        }
        dma_kv_cache_destroy(c);
    }
    if (!o->json)
        print_notes(o, res, n);
    dma_context_destroy(ctx);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Help                                                                                       */
/* ------------------------------------------------------------------------------------------ */

void bench_decode_print_help(void)
{
    printf(
        "Decode and prefill over a KV cache (dma_kv_cache_*, dma_kv_forward):\n"
        "  --decode         time, in one run and per dtype: op read_bw (impl memory): one\n"
        "                   streaming pass summing a float buffer as large as the dense\n"
        "                   decode's K+V bytes (lk * B * Hkv * D * 2 * element size), OpenMP on\n"
        "                   --threads; op decode, impl dense: one step = dma_kv_cache_append of\n"
        "                   one token (k, v, bias) + dma_kv_forward(DENSE, no bias) of one query\n"
        "                   row (Lq = 1), all heads; op decode, impl dma: the same step with\n"
        "                   TOPK and add_bias = 1 (the append is the selection update). dense and\n"
        "                   dma steps alternate call by call (dense first).\n"
        "  --prefill CHUNK  time chunked prefill, op prefill, impl dma: dma_kv_cache_append of\n"
        "                   CHUNK tokens + dma_kv_forward(TOPK, add_bias) of those CHUNK rows,\n"
        "                   against op forward, impl dma: dma_sparsity_build(TOPK, causal,\n"
        "                   per-key bias, --window) + dma_forward, Lq = Lk = CHUNK, float32,\n"
        "                   timed together; the two alternate call by call (forward first).\n"
        "                   A cache cannot be shrunk back to --lk (and refilling one per run is\n"
        "                   too slow at 262144), so the cache grows: it is made with room for\n"
        "                   every run, and each run (warm-up included) appends onto what the\n"
        "                   ones before left; \"length\" is the length before the first timed\n"
        "                   run, the last one starts at length + (runs - 1) * CHUNK. With\n"
        "                   --decode too, both use the same cache, decode first.\n"
        "  --dtype LIST     storage of the cache, q and out: f32, bf16, f16 or a comma-separated\n"
        "                   list (e.g. f32,bf16): one cache per dtype, f32 first (default f32).\n"
        "                   bf16/f16 values are rounded to nearest even from the same floats.\n"
        "  With --decode/--prefill the defaults are --lk %d --hq 8 --hkv 2 --dim %d\n"
        "  --window %d --threads %d --batch 1 (--window >= 1); --lk, --hq, --hkv, --dim,\n"
        "  --window, --threads, --batch, --isa, --runs, --warmup, --max-time and --json apply,\n"
        "  --lq, --len, --mask, --backward, --sgemm*, --no-dense, --no-openblas, --sweep* do not.\n"
        "  The cache: dma_kv_cache_create(B, Hkv, D, dtype, window, max_len = lk + room for every\n"
        "  timed step and chunk, default page_len), filled with lk tokens in appends of %d:\n"
        "  k and v uniform in [-1, 1), bias uniform in [0, 4), fixed seeds (progress on stderr\n"
        "  when filling takes over 2 s). Every decode step appends one token (cycling through %d\n"
        "  random tokens), so the cache grows by one per step.\n"
        "  gbps: K/V bytes the attention reads / median time. dense: length*B*Hkv*D*2*size;\n"
        "  dma: min(window, length)*B*Hkv*D*2*size; length: the cache length at the first timed\n"
        "  step, after its append. read_bw: the buffer's bytes / time.\n"
        "  JSON fields: op (read_bw|decode|prefill|forward), impl (memory|dense|dma), dtype,\n"
        "  B, lk (--lk; forward: CHUNK), hq, hkv, dim, window, threads, isa, runs, warmup, ms\n"
        "  (median), ms_min, ms_max; read_bw and decode add bytes, gbps; decode adds length,\n"
        "  gbps_vs_read_bw (this gbps / read_bw gbps of the same dtype), speedup (dma: dense ms /\n"
        "  dma ms), speedup_per_call (dma: 1 / the median over rounds of the dma call / the\n"
        "  dense call just before it), speedup_vs_f32 (bf16/f16: the f32 line's ms / this ms,\n"
        "  same impl); prefill and forward add chunk; prefill adds length, vs_forward (prefill\n"
        "  ms / forward ms) and vs_forward_per_call (median over rounds of prefill call /\n"
        "  forward call). The forward line's dtype is f32 whatever --dtype says.\n"
        "  The table's notes give the issue's targets (lk 262144, hq 8, hkv 2, dim 128, window\n"
        "  1024, 1 thread): dense decode f32 >= %.2f of read_bw; dma decode >= %.0fx faster than\n"
        "  dense; dense decode bf16 >= %.1fx faster than f32 (--dtype f32,bf16); prefill of 4096\n"
        "  onto 262144 < %.0fx the 4096-token forward. All four in one run:\n"
        "    " PROG " --decode --prefill 4096 --dtype f32,bf16\n",
        DECODE_DEFAULT_LK, DECODE_DEFAULT_DIM, DECODE_DEFAULT_WINDOW, DECODE_DEFAULT_THREADS,
        FILL_CHUNK, TOKEN_POOL, TARGET_READ_BW, TARGET_DMA_SPEEDUP, TARGET_BF16_SPEEDUP,
        TARGET_PREFILL_RATIO);
}

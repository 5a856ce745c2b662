/*
 * model.c - the model's memory, its initialisation, and one training step read top to bottom:
 * model_forward, model_backward, model_update (see model.h for the architecture).
 */
#include "model.h"

#include <cblas.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "prng.h"

const char *const model_profile_names[PROF_COUNT] = {
    "embedding fwd", "rmsnorm fwd", "attention fwd", "mlp fwd", "lm head fwd", "lm head bwd",
    "mlp bwd", "attention bwd", "rmsnorm bwd", "embedding bwd", "adamw update"};

static int fail(model *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(model *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->error, sizeof m->error, fmt, ap);
    va_end(ap);
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* Configuration                                                                              */
/* ------------------------------------------------------------------------------------------ */

model_config model_config_defaults(model_config c)
{
    if (c.d_ff == 0)
        c.d_ff = (4 * c.d_model + 7) / 8 * 8;
    if (c.n_kv_heads == 0)
        c.n_kv_heads = c.n_heads;
    if (c.rope_theta == 0.0f)
        c.rope_theta = 10000.0f;
    if (c.norm_eps == 0.0f)
        c.norm_eps = 1e-5f;
    if (c.init_std == 0.0f)
        c.init_std = 0.02f;
    return c;
}

int model_config_check(const model_config *c, char *err, size_t errlen)
{
#define REQ(cond, ...)                                                                        \
    if (!(cond)) {                                                                            \
        snprintf(err, errlen, __VA_ARGS__);                                                   \
        return -1;                                                                            \
    }
    REQ(c->vocab >= 2 && c->vocab <= (1 << 24), "vocab %d is outside 2..2^24", c->vocab);
    REQ(c->d_model >= 2 && c->d_model <= 16384, "d_model %d is outside 2..16384", c->d_model);
    REQ(c->n_layers >= 1 && c->n_layers <= 1024, "n_layers %d is outside 1..1024", c->n_layers);
    REQ(c->n_heads >= 1 && c->d_model % c->n_heads == 0,
        "n_heads %d must be >= 1 and divide d_model %d", c->n_heads, c->d_model);
    int D = c->d_model / (c->n_heads > 0 ? c->n_heads : 1);
    REQ(D % 2 == 0 && D <= DMA_MAX_HEAD_DIM,
        "head dim d_model / n_heads = %d must be even and at most %d (RoPE, libdmattn)", D,
        DMA_MAX_HEAD_DIM);
    REQ(c->n_kv_heads >= 1 && c->n_heads % c->n_kv_heads == 0,
        "n_kv_heads %d must be >= 1 and divide n_heads %d", c->n_kv_heads, c->n_heads);
    REQ(c->d_ff >= 1 && c->d_ff <= (1 << 20), "d_ff %d is outside 1..2^20", c->d_ff);
    REQ(c->max_seq >= 1 && c->max_seq <= (1 << 24), "max_seq %d is outside 1..2^24",
        c->max_seq);
    REQ(attn_kind_name(c->attn) != NULL, "attention kind %d is unknown", (int)c->attn);
    REQ(c->attn_only == 0 || c->attn_only == 1, "attn_only must be 0 or 1");
    REQ(c->tie_embeddings == 0 || c->tie_embeddings == 1, "tie_embeddings must be 0 or 1");
    REQ(c->pos_embeddings == 0 || c->pos_embeddings == 1, "pos_embeddings must be 0 or 1");
    REQ(c->attn == ATTN_DENSE || c->window >= 1, "window %d must be >= 1 for %s", c->window,
        attn_kind_name(c->attn));
    REQ(isfinite(c->rope_theta) && c->rope_theta > 1.0f, "rope_theta must be finite and > 1");
    REQ(isfinite(c->norm_eps) && c->norm_eps > 0.0f, "norm_eps must be finite and > 0");
    REQ(isfinite(c->init_std) && c->init_std > 0.0f, "init_std must be finite and > 0");
#undef REQ
    return 0;
}

adamw_config adamw_config_defaults(adamw_config c)
{
    if (c.lr == 0.0f)
        c.lr = 1e-3f;
    if (c.min_lr == 0.0f)
        c.min_lr = c.lr / 10.0f;
    if (c.beta1 == 0.0f)
        c.beta1 = 0.9f;
    if (c.beta2 == 0.0f)
        c.beta2 = 0.95f;
    if (c.eps == 0.0f)
        c.eps = 1e-8f;
    if (c.weight_decay == 0.0f)
        c.weight_decay = 0.1f;
    if (c.grad_clip == 0.0f)
        c.grad_clip = 1.0f;
    if (c.total_steps == 0)
        c.total_steps = 1000;
    return c;
}

int adamw_config_check(const adamw_config *o, char *err, size_t errlen)
{
    int ok = isfinite(o->lr) && o->lr > 0.0f && isfinite(o->min_lr) && o->min_lr >= 0.0f &&
             o->min_lr <= o->lr && o->beta1 >= 0.0f && o->beta1 < 1.0f && o->beta2 >= 0.0f &&
             o->beta2 < 1.0f && isfinite(o->eps) && o->eps > 0.0f && isfinite(o->weight_decay) &&
             o->weight_decay >= 0.0f && isfinite(o->grad_clip) && o->grad_clip >= 0.0f &&
             o->warmup_steps >= 0 && o->total_steps >= 1 && o->warmup_steps <= o->total_steps;
    if (!ok)
        snprintf(err, errlen, "optimizer: need lr > 0, 0 <= min_lr <= lr, betas in [0, 1), "
                              "eps > 0, weight_decay >= 0, grad_clip >= 0 and "
                              "0 <= warmup_steps <= total_steps, total_steps >= 1");
    return ok ? 0 : -1;
}

float adamw_lr(const adamw_config *o, int64_t step)
{
    if (step < o->warmup_steps)
        return o->lr * (float)(step + 1) / (float)o->warmup_steps;
    if (step >= o->total_steps)
        return o->min_lr;
    double progress = (double)(step - o->warmup_steps) /
                      (double)(o->total_steps - o->warmup_steps > 0
                                   ? o->total_steps - o->warmup_steps : 1);
    double cosine = 0.5 * (1.0 + cos(3.14159265358979323846 * progress));
    return (float)(o->min_lr + (o->lr - o->min_lr) * cosine);
}

/* ------------------------------------------------------------------------------------------ */
/* Memory                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Append a named tensor to the layout (a dry run when m->tensors is NULL counts them). */
static size_t add_tensor(model *m, const char *name, int layer, int rows, int cols, int decay)
{
    size_t offset = m->n_params;
    if (m->tensors) {
        param_tensor *t = &m->tensors[m->n_tensors];
        if (layer >= 0)
            snprintf(t->name, sizeof t->name, "layer%d.%s", layer, name);
        else
            snprintf(t->name, sizeof t->name, "%s", name);
        t->offset = offset;
        t->count = (size_t)rows * (size_t)cols;
        t->rows = rows;
        t->cols = cols;
        t->decay = decay;
    }
    m->n_tensors++;
    m->n_params += (size_t)rows * (size_t)cols;
    return offset;
}

/* The layout, in checkpoint order. Twice: once to count, once to record. Pointers into params
 * and grads are set when `bind` is nonzero. */
static void layout(model *m, int bind)
{
    const model_config *c = &m->cfg;
    const int C = c->d_model, D = C / c->n_heads, Hq = c->n_heads, Hkv = c->n_kv_heads;
    const int QKV = (Hq + 2 * Hkv) * D, F = c->d_ff;
    m->n_params = 0;
    m->n_tensors = 0;
#define T(field, gfield, ...)                                                                  \
    do {                                                                                      \
        size_t off = add_tensor(m, __VA_ARGS__);                                              \
        if (bind) {                                                                           \
            field = m->params + off;                                                          \
            gfield = m->grads + off;                                                          \
        }                                                                                     \
    } while (0)
    T(m->tok_emb, m->g_tok_emb, "tok_emb", -1, c->vocab, C, 1);
    if (c->pos_embeddings)
        T(m->pos_emb, m->g_pos_emb, "pos_emb", -1, c->max_seq, C, 1);
    else if (bind)
        m->pos_emb = m->g_pos_emb = NULL;
    for (int l = 0; l < c->n_layers; l++) {
        block_params *p = bind ? &m->blocks[l] : NULL, *g = bind ? &m->g_blocks[l] : NULL;
        block_params unused, *pp = p ? p : &unused, *gg = g ? g : &unused;
        T(pp->ln1_w, gg->ln1_w, "ln1_w", l, C, 1, 0);
        T(pp->attn.w_qkv, gg->attn.w_qkv, "w_qkv", l, C, QKV, 1);
        T(pp->attn.w_o, gg->attn.w_o, "w_o", l, Hq * D, C, 1);
        if (c->attn == ATTN_DMA) {
            T(pp->attn.w_dt, gg->attn.w_dt, "w_dt", l, Hkv * D, Hkv, 1);
            T(pp->attn.b_dt, gg->attn.b_dt, "b_dt", l, Hkv, 1, 0);
            T(pp->attn.a_dt, gg->attn.a_dt, "a_dt", l, Hkv, 1, 0);
        } else {
            pp->attn.w_dt = pp->attn.b_dt = pp->attn.a_dt = NULL;
            gg->attn.w_dt = gg->attn.b_dt = gg->attn.a_dt = NULL;
        }
        if (c->attn_only) {
            pp->ln2_w = pp->w_gu = pp->w_down = NULL;
            gg->ln2_w = gg->w_gu = gg->w_down = NULL;
        } else {
            T(pp->ln2_w, gg->ln2_w, "ln2_w", l, C, 1, 0);
            T(pp->w_gu, gg->w_gu, "w_gu", l, C, 2 * F, 1);
            T(pp->w_down, gg->w_down, "w_down", l, F, C, 1);
        }
    }
    T(m->lnf_w, m->g_lnf_w, "lnf_w", -1, C, 1, 0);
    if (c->tie_embeddings) {
        m->w_head = bind ? m->tok_emb : NULL;
        m->g_w_head = bind ? m->g_tok_emb : NULL;
    } else {
        T(m->w_head, m->g_w_head, "w_head", -1, C, c->vocab, 1);
    }
#undef T
}

size_t model_param_count(const model_config *c)
{
    model m = {.cfg = *c}; /* no tensors: layout only counts */
    layout(&m, 0);
    return m.n_params;
}

/* calloc of count elements of `size` bytes, recording a failure in *ok. */
static void *zalloc(size_t count, size_t size, int *ok)
{
    void *p = count ? calloc(count, size) : NULL;
    if (count && !p)
        *ok = 0;
    return p;
}

/* Make the lm head's buffers hold M labelled positions (all or nothing). */
static int grow_head(model *m, int M)
{
    if (M <= m->head_capacity)
        return 0;
    const size_t C = (size_t)m->cfg.d_model, V = (size_t)m->cfg.vocab, n = (size_t)M;
    int ok = 1;
    lm_head_acts h = {0};
    h.pos = zalloc(n, sizeof(int32_t), &ok);
    h.label = zalloc(n, sizeof(int32_t), &ok);
    h.xg = zalloc(n * C, sizeof(float), &ok);
    h.hn = zalloc(n * C, sizeof(float), &ok);
    h.rstd = zalloc(n, sizeof(float), &ok);
    h.probs = zalloc(n * V, sizeof(float), &ok);
    float *d_logits = zalloc(n * V, sizeof(float), &ok);
    float *d_hn = zalloc(n * C, sizeof(float), &ok);
    float *d_xg = zalloc(n * C, sizeof(float), &ok);
    if (!ok) {
        free(h.pos); free(h.label); free(h.xg); free(h.hn); free(h.rstd); free(h.probs);
        free(d_logits); free(d_hn); free(d_xg);
        return fail(m, "out of memory for the logits of %d labelled positions", M);
    }
    free(m->head.pos); free(m->head.label); free(m->head.xg); free(m->head.hn);
    free(m->head.rstd); free(m->head.probs); free(m->d_logits); free(m->d_hn); free(m->d_xg);
    m->head = h;
    m->d_logits = d_logits;
    m->d_hn = d_hn;
    m->d_xg = d_xg;
    m->head_capacity = M;
    return 0;
}

/* Normal(0, std) weights, unit norm weights, b_dt = 0 and A = 0; each tensor from its own
 * stream of the seed, so a tensor's values do not depend on the sizes of the others. A = 0 is
 * the reference implementation's start (flash-dmattn's Doge model): every bias is 0, so the
 * first selection is the earliest keys (ties go to the earlier key), and the first steps train
 * A alone. Started at A = 1 instead, a model on MQAR (L 128, kv 16, window 64) stayed near
 * chance for 5000 steps, where A = 0 reached 83% in 4000. */
static void init_weights(model *m, uint64_t seed)
{
    const float out_std = m->cfg.init_std / sqrtf(2.0f * (float)m->cfg.n_layers);
    for (int i = 0; i < m->n_tensors; i++) {
        const param_tensor *t = &m->tensors[i];
        float *p = m->params + t->offset;
        const char *base = strrchr(t->name, '.') ? strrchr(t->name, '.') + 1 : t->name;
        if (!strcmp(base, "ln1_w") || !strcmp(base, "ln2_w") || !strcmp(base, "lnf_w")) {
            for (size_t j = 0; j < t->count; j++)
                p[j] = 1.0f;
        } else if (!strcmp(base, "b_dt") || !strcmp(base, "a_dt")) {
            memset(p, 0, sizeof(float) * t->count);
        } else {
            float std = !strcmp(base, "w_o") || !strcmp(base, "w_down") ? out_std
                                                                         : m->cfg.init_std;
            prng r = prng_seeded(seed, (uint64_t)i);
            for (size_t j = 0; j < t->count; j++)
                p[j] = std * prng_normal(&r);
        }
    }
}

int model_create(const model_config *cfg, int max_batch, int threads, uint64_t seed,
                 model **out, char *err, size_t errlen)
{
    if (!cfg || !out) {
        snprintf(err, errlen, "model_create: cfg and out are required");
        return -1;
    }
    if (model_config_check(cfg, err, errlen))
        return -1;
    const model_config c = *cfg;
    const int C = c.d_model, D = C / c.n_heads, Hq = c.n_heads, Hkv = c.n_kv_heads;
    const size_t QKV = (size_t)(Hq + 2 * Hkv) * D, F = (size_t)c.d_ff;
    if (max_batch < 1 || threads < 1 || (int64_t)max_batch * c.max_seq > (1 << 26)) {
        snprintf(err, errlen, "model_create: need max_batch >= 1, threads >= 1 and "
                 "max_batch * max_seq <= 2^26 tokens");
        return -1;
    }
    model *m = calloc(1, sizeof(model));
    if (!m) {
        snprintf(err, errlen, "model_create: out of memory");
        return -1;
    }
    m->cfg = c;
    m->max_batch = max_batch;
    m->threads = threads;
    dma_context_options o = {.threads = threads};
    dma_status st = dma_context_create(&o, &m->ctx);
    if (st != DMA_OK) {
        snprintf(err, errlen, "model_create: dma_context_create: %s", dma_status_string(st));
        free(m);
        return -1;
    }
    openblas_set_num_threads(1); /* linear.c splits the products across our threads */

    layout(m, 0); /* count */
    const size_t N = (size_t)max_batch * (size_t)c.max_seq, L = (size_t)c.max_seq;
    int ok = 1;
    m->tensors = zalloc((size_t)m->n_tensors, sizeof(param_tensor), &ok);
    m->blocks = zalloc((size_t)c.n_layers, sizeof(block_params), &ok);
    m->g_blocks = zalloc((size_t)c.n_layers, sizeof(block_params), &ok);
    m->acts = zalloc((size_t)c.n_layers, sizeof(block_acts), &ok);
    m->resid = zalloc((size_t)c.n_layers + 1, sizeof(float *), &ok);
    m->params = zalloc(m->n_params, sizeof(float), &ok);
    m->grads = zalloc(m->n_params, sizeof(float), &ok);
    m->adam_m = zalloc(m->n_params, sizeof(float), &ok);
    m->adam_v = zalloc(m->n_params, sizeof(float), &ok);
    m->tokens = zalloc(N, sizeof(int32_t), &ok);
    m->rope_cos = zalloc(L * (size_t)(D / 2), sizeof(float), &ok);
    m->rope_sin = zalloc(L * (size_t)(D / 2), sizeof(float), &ok);
    for (int l = 0; ok && l <= c.n_layers; l++)
        m->resid[l] = zalloc(N * (size_t)C, sizeof(float), &ok);
    for (int l = 0; ok && l < c.n_layers; l++) {
        block_acts *a = &m->acts[l];
        a->x_mid = zalloc(N * (size_t)C, sizeof(float), &ok);
        a->ln1 = zalloc(N * (size_t)C, sizeof(float), &ok);
        a->ln1_rstd = zalloc(N, sizeof(float), &ok);
        if (!c.attn_only) {
            a->ln2 = zalloc(N * (size_t)C, sizeof(float), &ok);
            a->ln2_rstd = zalloc(N, sizeof(float), &ok);
            a->gu = zalloc(N * 2 * F, sizeof(float), &ok);
            a->h = zalloc(N * F, sizeof(float), &ok);
        }
        a->attn.qkv = zalloc(N * QKV, sizeof(float), &ok);
        a->attn.att = zalloc(N * (size_t)Hq * D, sizeof(float), &ok);
        a->attn.lse = zalloc(N * (size_t)Hq, sizeof(float), &ok);
        a->attn.bias = c.attn == ATTN_DMA ? zalloc(N * (size_t)Hkv, sizeof(float), &ok) : NULL;
    }
    m->d_resid = zalloc(N * (size_t)C, sizeof(float), &ok);
    m->d_norm = zalloc(N * (size_t)C, sizeof(float), &ok);
    m->norm_scratch = zalloc(rmsnorm_scratch_floats((int)N, C), sizeof(float), &ok);
    m->d_gu = c.attn_only ? NULL : zalloc(N * 2 * F, sizeof(float), &ok);
    m->d_h = c.attn_only ? NULL : zalloc(N * F, sizeof(float), &ok);
    m->attn_scratch.dqkv = zalloc(N * QKV, sizeof(float), &ok);
    m->attn_scratch.datt = zalloc(N * (size_t)Hq * D, sizeof(float), &ok);
    m->attn_scratch.dbias = c.attn == ATTN_DMA ? zalloc(N * (size_t)Hkv, sizeof(float), &ok)
                                               : NULL;
    if (!ok) {
        snprintf(err, errlen, "model_create: out of memory (%zu parameters, %zu tokens)",
                 m->n_params, N);
        model_destroy(m);
        return -1;
    }
    layout(m, 1); /* record names and bind the views */
    init_weights(m, seed);
    rope_table(m->rope_cos, m->rope_sin, c.max_seq, D, c.rope_theta);
    *out = m;
    return 0;
}

void model_destroy(model *m)
{
    if (!m)
        return;
    for (int l = 0; m->acts && l < m->cfg.n_layers; l++) {
        block_acts *a = &m->acts[l];
        free(a->x_mid); free(a->ln1); free(a->ln1_rstd); free(a->ln2); free(a->ln2_rstd);
        free(a->attn.qkv); free(a->attn.att); free(a->attn.lse); free(a->attn.bias);
        attention_acts_release(&a->attn);
        free(a->gu); free(a->h);
    }
    for (int l = 0; m->resid && l <= m->cfg.n_layers; l++)
        free(m->resid[l]);
    free(m->resid); free(m->acts); free(m->blocks); free(m->g_blocks); free(m->tensors);
    free(m->params); free(m->grads); free(m->adam_m); free(m->adam_v); free(m->tokens);
    free(m->rope_cos); free(m->rope_sin);
    free(m->head.pos); free(m->head.label); free(m->head.xg); free(m->head.hn);
    free(m->head.rstd); free(m->head.probs);
    free(m->d_resid); free(m->d_norm); free(m->norm_scratch); free(m->d_gu); free(m->d_h);
    free(m->d_logits); free(m->d_hn); free(m->d_xg);
    free(m->attn_scratch.dqkv); free(m->attn_scratch.datt); free(m->attn_scratch.dbias);
    dma_context_destroy(m->ctx);
    free(m);
}

void model_profile_reset(model *m) { memset(m->prof, 0, sizeof m->prof); }

/* ------------------------------------------------------------------------------------------ */
/* One training step                                                                          */
/* ------------------------------------------------------------------------------------------ */

static attn_dims dims_of(const model *m)
{
    const model_config *c = &m->cfg;
    return (attn_dims){.B = m->B, .L = m->L, .C = c->d_model, .Hq = c->n_heads,
                       .Hkv = c->n_kv_heads, .D = c->d_model / c->n_heads, .kind = c->attn,
                       .window = c->window};
}

/* Time since *t, added to m->prof[phase]; *t moves to now. */
static void lap(model *m, int phase, double *t)
{
    double now = omp_get_wtime();
    m->prof[phase] += now - *t;
    *t = now;
}

int model_forward(model *m, const batch *b, step_stats *st)
{
    const model_config *c = &m->cfg;
    if (!b || !b->tokens || !b->labels || !st)
        return fail(m, "model_forward: batch, its tokens and labels, and stats are required");
    if (b->B < 1 || b->B > m->max_batch || b->L < 1 || b->L > c->max_seq)
        return fail(m, "model_forward: batch of %d x %d tokens; this model takes 1..%d "
                    "sequences of 1..%d tokens", b->B, b->L, m->max_batch, c->max_seq);
    const int N = b->B * b->L, C = c->d_model, V = c->vocab, F = c->d_ff;
    int labelled = 0;
    for (int t = 0; t < N; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= V)
            return fail(m, "model_forward: token %d at position %d is outside 0..%d",
                        b->tokens[t], t, V - 1);
        if (b->labels[t] >= V)
            return fail(m, "model_forward: label %d at position %d is outside 0..%d",
                        b->labels[t], t, V - 1);
        labelled += b->labels[t] >= 0;
    }
    if (grow_head(m, labelled))
        return -1;
    m->B = b->B;
    m->L = b->L;
    memcpy(m->tokens, b->tokens, sizeof(int32_t) * (size_t)N);
    const attn_dims d = dims_of(m);
    double t = omp_get_wtime();

    embedding_forward(m->resid[0], m->tokens, m->tok_emb, N, C, m->threads);
    if (c->pos_embeddings)
        position_forward(m->resid[0], m->pos_emb, m->B, m->L, C, m->threads);
    lap(m, PROF_EMBED, &t);
    for (int l = 0; l < c->n_layers; l++) {
        const block_params *p = &m->blocks[l];
        block_acts *a = &m->acts[l];
        const float *x = m->resid[l];
        /* x_mid = x + attention(rmsnorm(x)) */
        rmsnorm_forward(a->ln1, a->ln1_rstd, x, p->ln1_w, N, C, c->norm_eps, m->threads);
        lap(m, PROF_NORM, &t);
        memcpy(a->x_mid, x, sizeof(float) * (size_t)N * C);
        if (attention_forward(m->ctx, &d, &p->attn, &a->attn, m->rope_cos, m->rope_sin, a->ln1,
                              a->x_mid, m->error, sizeof m->error)) {
            size_t n = strlen(m->error);
            snprintf(m->error + n, sizeof m->error - n, " in layer %d at step %lld", l,
                     (long long)m->step);
            return -1;
        }
        lap(m, PROF_ATTN_FWD, &t);
        /* out = x_mid + mlp(rmsnorm(x_mid)) */
        memcpy(m->resid[l + 1], a->x_mid, sizeof(float) * (size_t)N * C);
        if (c->attn_only)
            continue;
        rmsnorm_forward(a->ln2, a->ln2_rstd, a->x_mid, p->ln2_w, N, C, c->norm_eps, m->threads);
        lap(m, PROF_NORM, &t);
        mlp_forward(m->resid[l + 1], a->gu, a->h, a->ln2, p->w_gu, p->w_down, N, C, F,
                    m->threads);
        lap(m, PROF_MLP_FWD, &t);
    }
    double loss_sum = lm_head_forward(&m->head, m->resid[c->n_layers], b->labels, N, C, V,
                                      m->lnf_w, m->w_head, c->tie_embeddings, c->norm_eps,
                                      &st->correct,
                                      m->threads);
    lap(m, PROF_HEAD_FWD, &t);
    st->labelled = m->head.M;
    st->loss = m->head.M ? loss_sum / m->head.M : 0.0;
    return 0;
}

int model_backward(model *m)
{
    const model_config *c = &m->cfg;
    const int N = m->B * m->L, C = c->d_model, V = c->vocab, F = c->d_ff;
    const attn_dims d = dims_of(m);
    float *dx = m->d_resid; /* the gradient of the residual stream, carried down the layers */
    double t = omp_get_wtime();

    const float scale = m->head.M ? 1.0f / (float)m->head.M : 0.0f; /* the loss is a mean */
    /* a tied head writes the embedding's gradient first; embedding_backward adds to it */
    if (!c->tie_embeddings)
        memset(m->g_tok_emb, 0, sizeof(float) * (size_t)V * C);
    lm_head_backward(dx, m->g_lnf_w, m->g_w_head, &m->head, scale, m->lnf_w, m->w_head,
                     c->tie_embeddings, N, C, V, m->d_logits, m->d_hn, m->d_xg, m->norm_scratch,
                     m->threads);
    lap(m, PROF_HEAD_BWD, &t);
    for (int l = c->n_layers - 1; l >= 0; l--) {
        const block_params *p = &m->blocks[l];
        const block_params *g = &m->g_blocks[l];
        block_acts *a = &m->acts[l];
        /* out = x_mid + mlp(rmsnorm(x_mid)): dx passes through and gets the MLP's share */
        if (!c->attn_only) {
            mlp_backward(m->d_norm, g->w_gu, g->w_down, dx, a->ln2, a->gu, a->h, p->w_gu,
                         p->w_down, m->d_gu, m->d_h, N, C, F, m->threads);
            lap(m, PROF_MLP_BWD, &t);
            rmsnorm_backward(dx, g->ln2_w, m->d_norm, a->x_mid, p->ln2_w, a->ln2_rstd, N, C,
                             m->norm_scratch, m->threads);
            lap(m, PROF_NORM_BWD, &t);
        }
        /* x_mid = x + attention(rmsnorm(x)) */
        if (attention_backward(m->ctx, &d, &p->attn, &g->attn, &a->attn, &m->attn_scratch,
                               m->rope_cos, m->rope_sin, a->ln1, dx, m->d_norm, m->error,
                               sizeof m->error)) {
            size_t n = strlen(m->error);
            snprintf(m->error + n, sizeof m->error - n, " in layer %d at step %lld", l,
                     (long long)m->step);
            return -1;
        }
        lap(m, PROF_ATTN_BWD, &t);
        rmsnorm_backward(dx, g->ln1_w, m->d_norm, m->resid[l], p->ln1_w, a->ln1_rstd, N, C,
                         m->norm_scratch, m->threads);
        lap(m, PROF_NORM_BWD, &t);
    }
    embedding_backward(m->g_tok_emb, dx, m->tokens, N, C);
    if (c->pos_embeddings)
        position_backward(m->g_pos_emb, dx, m->B, m->L, c->max_seq, C, m->threads);
    lap(m, PROF_EMBED_BWD, &t);
    return 0;
}

/* Elements per partial sum of the gradient norm: fixed, so the sum's order is too. */
#define NORM_CHUNK 4096

int model_update(model *m, const adamw_config *opt, step_stats *st)
{
    if (adamw_config_check(opt, m->error, sizeof m->error))
        return -1;
    double t = omp_get_wtime();
    const size_t n = m->n_params, nchunks = (n + NORM_CHUNK - 1) / NORM_CHUNK;
    double *partial = malloc(sizeof(double) * (nchunks ? nchunks : 1));
    if (!partial)
        return fail(m, "step %lld: out of memory for the gradient norm", (long long)m->step);
#pragma omp parallel for num_threads(m->threads) schedule(static)
    for (size_t k = 0; k < nchunks; k++) {
        double s = 0.0;
        size_t end = (k + 1) * NORM_CHUNK < n ? (k + 1) * NORM_CHUNK : n;
        for (size_t i = k * NORM_CHUNK; i < end; i++)
            s += (double)m->grads[i] * m->grads[i];
        partial[k] = s;
    }
    double sumsq = 0.0;
    for (size_t k = 0; k < nchunks; k++)
        sumsq += partial[k];
    free(partial);
    const double norm = sqrt(sumsq);
    st->grad_norm = norm;
    if (!isfinite(norm))
        return fail(m, "step %lld: the gradient norm is %g (not finite): training diverged; "
                    "parameters not updated", (long long)m->step, norm);

    const float clip = opt->grad_clip > 0.0f && norm > opt->grad_clip
                           ? (float)(opt->grad_clip / norm) : 1.0f;
    const float lr = adamw_lr(opt, m->step);
    const double step1 = (double)(m->step + 1);
    const float bc1 = (float)(1.0 - pow(opt->beta1, step1));
    const float bc2 = (float)(1.0 - pow(opt->beta2, step1));
    for (int i = 0; i < m->n_tensors; i++) {
        const param_tensor *pt = &m->tensors[i];
        const float wd = pt->decay ? opt->weight_decay : 0.0f;
        float *p = m->params + pt->offset, *g = m->grads + pt->offset;
        float *mo = m->adam_m + pt->offset, *vo = m->adam_v + pt->offset;
#pragma omp parallel for num_threads(m->threads) schedule(static)
        for (size_t j = 0; j < pt->count; j++) {
            float gj = g[j] * clip;
            mo[j] = opt->beta1 * mo[j] + (1.0f - opt->beta1) * gj;
            vo[j] = opt->beta2 * vo[j] + (1.0f - opt->beta2) * gj * gj;
            float mhat = mo[j] / bc1, vhat = vo[j] / bc2;
            p[j] -= lr * (mhat / (sqrtf(vhat) + opt->eps) + wd * p[j]);
        }
    }
    m->step++;
    st->lr = lr;
    lap(m, PROF_UPDATE, &t);
    return 0;
}

int model_train_step(model *m, const adamw_config *opt, const batch *b, step_stats *st)
{
    double t0 = omp_get_wtime();
    if (model_forward(m, b, st))
        return -1;
    if (!isfinite(st->loss))
        return fail(m, "step %lld: the training loss is %g (not finite): training diverged; "
                    "stopping before the update", (long long)m->step, st->loss);
    if (model_backward(m) || model_update(m, opt, st))
        return -1;
    st->seconds = omp_get_wtime() - t0;
    return 0;
}

/*
 * test_train_model.c - the whole model of the training library (examples/common/model.h): its
 * gradient against finite differences for every attention kind, a 50-step overfit of 8
 * sequences per kind, reproducibility, the stop on non-finite losses and gradients, and the
 * rejection of bad configurations and batches.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"
#include "progress.h"
#include "train_support.h"

static model *make_model(model_config c, int max_batch, int threads, uint64_t seed)
{
    model *m = NULL;
    char err[512];
    c = model_config_defaults(c);
    ck_assert_msg(model_create(&c, max_batch, threads, seed, &m, err, sizeof err) == 0, "%s",
                  err);
    return m;
}

/* Random tokens; labels on every `every`-th position (the rest -1). */
static void random_batch(test_rng *r, int B, int L, int V, int every, int32_t *tok,
                         int32_t *lab)
{
    for (int t = 0; t < B * L; t++) {
        tok[t] = (int32_t)rng_int(r, 0, V - 1);
        lab[t] = t % every == 0 ? (int32_t)rng_int(r, 0, V - 1) : -1;
    }
}

/* ---- gradient of the whole model ---- */

typedef struct model_case {
    model *m;
    batch b;
    uint8_t *sel0, *sel; /* every layer's selection at the unperturbed point, and the latest */
    size_t sel_bytes;    /* per layer */
} model_case;

static double model_loss(void *s)
{
    model_case *k = s;
    step_stats st;
    REQUIRE(model_forward(k->m, &k->b, &st) == 0, "model_forward: %s", k->m->error);
    return st.loss;
}

static void selections(model_case *k, uint8_t *dst)
{
    for (int l = 0; l < k->m->cfg.n_layers; l++)
        ck_assert_int_eq(dma_sparsity_to_dense(k->m->acts[l].attn.sp, dst + l * k->sel_bytes,
                                               k->sel_bytes), DMA_OK);
}

static int model_selection_changed(void *s)
{
    model_case *k = s;
    selections(k, k->sel);
    return memcmp(k->sel, k->sel0, k->sel_bytes * (size_t)k->m->cfg.n_layers) != 0;
}

static void check_model_gradient(attn_kind kind, int window, int attn_only, uint64_t seed)
{
    enum { B = 2, L = 12, V = 29 };
    model_config c = {.vocab = V, .d_model = 16, .n_layers = 2, .n_heads = 2, .n_kv_heads = 1,
                      .d_ff = 24, .max_seq = L, .attn = kind, .window = window,
                      .attn_only = attn_only, .tie_embeddings = attn_only,
                      .pos_embeddings = attn_only,
                      .init_std = 0.3f}; /* weights large enough for every layer to matter */
    model *m = make_model(c, B, 2, seed);
    test_rng r = rng_make(seed);
    int32_t tok[B * L], lab[B * L];
    random_batch(&r, B, L, V, 2, tok, lab);
    /* distinct tokens within a sequence: equal tokens have equal values, hence equal biases,
     * and near-equal ones in later layers, which a small step would reorder */
    for (int t = 0; t < B * L; t++)
        for (int u = (t / L) * L; u < t; u++)
            if (tok[u] == tok[t]) {
                tok[t] = (tok[t] + 1) % V;
                u = (t / L) * L - 1; /* check again from the sequence start */
            }
    model_case k = {.m = m, .b = {B, L, tok, lab}};
    if (kind == ATTN_DMA) /* biases spread wide, so that small steps rarely reorder them */
        for (int l = 0; l < m->cfg.n_layers; l++)
            for (int h = 0; h < m->cfg.n_kv_heads; h++)
                m->blocks[l].attn.a_dt[h] = 4.0f;
    model_loss(&k);
    if (kind == ATTN_DMA) {
        k.sel_bytes = (size_t)B * m->cfg.n_kv_heads * L * L;
        k.sel0 = test_malloc(k.sel_bytes * m->cfg.n_layers);
        k.sel = test_malloc(k.sel_bytes * m->cfg.n_layers);
        selections(&k, k.sel0);
    }
    ck_assert_msg(model_backward(m) == 0, "%s", m->error);
    float *grads = test_malloc(sizeof(float) * m->n_params);
    memcpy(grads, m->grads, sizeof(float) * m->n_params);
    for (int i = 0; i < m->n_tensors; i++) {
        const param_tensor *t = &m->tensors[i];
        double gmax = 0.0;
        /* (an fmax() reduction here made the aarch64 gcc 12 vectoriser crash) */
        for (size_t j = 0; j < t->count; j++)
            if (fabs(grads[t->offset + j]) > gmax)
                gmax = fabs(grads[t->offset + j]);
        ck_assert_msg(gmax > 0.0, "%s: no gradient at all", t->name);
        /* a short step where a top-k choice may flip; the float loss's rounding (~1e-7 of
         * ~3) over 2h is the floor of what a difference can resolve */
        const float h = kind == ATTN_DMA && window < L ? 1e-3f : 1e-2f;
        fd_check(t->name, m->params + t->offset, grads + t->offset, t->count, model_loss, &k,
                 kind == ATTN_DMA ? model_selection_changed : NULL, &r, 12, h,
                 1e-2 * gmax + 1e-6 / h, 2e-2);
    }
    free(grads);
    free(k.sel0);
    free(k.sel);
    model_destroy(m);
}

START_TEST(gradient_dense) { check_model_gradient(ATTN_DENSE, 0, 0, 21); }
END_TEST
START_TEST(gradient_swa) { check_model_gradient(ATTN_SWA, 4, 0, 22); }
END_TEST
START_TEST(gradient_dma) { check_model_gradient(ATTN_DMA, 4, 0, 23); }
END_TEST
/* blocks without the MLP and a tied LM head (Zoology's recall models) */
START_TEST(gradient_attention_only)
{
    check_model_gradient(ATTN_DENSE, 0, 1, 24);
    check_model_gradient(ATTN_DMA, 12, 1, 25); /* every key kept: the bias alone shapes it */
}
END_TEST

/* ---- overfit ---- */

/* 8 random sequences of 16 tokens with distinct first tokens, every next token labelled:
 * memorisable by any of the kinds (each window of 8 keys starts inside one sequence). */
static double overfit(attn_kind kind)
{
    enum { B = 8, L = 16, V = 16, STEPS = 50 };
    model_config c = {.vocab = V, .d_model = 32, .n_layers = 2, .n_heads = 2, .max_seq = L,
                      .attn = kind, .window = 8};
    model *m = make_model(c, B, 2, 5);
    test_rng r = rng_make(77);
    int32_t tok[B * L], lab[B * L];
    for (int b = 0; b < B; b++)
        for (int i = 0; i < L; i++)
            tok[b * L + i] = i == 0 ? (int32_t)(2 * b) : (int32_t)rng_int(&r, 0, V - 1);
    for (int b = 0; b < B; b++)
        for (int i = 0; i < L; i++)
            lab[b * L + i] = i + 1 < L ? tok[b * L + i + 1] : (int32_t)rng_int(&r, 0, V - 1);
    adamw_config opt = adamw_config_defaults((adamw_config){
        .lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 5, .total_steps = STEPS,
        .weight_decay = 1e-9f});
    batch b = {B, L, tok, lab};
    step_stats st = {0};
    double first = 0.0;
    for (int s = 0; s < STEPS; s++) {
        ck_assert_msg(model_train_step(m, &opt, &b, &st) == 0, "%s", m->error);
        if (s == 0)
            first = st.loss;
    }
    ck_assert_msg(model_forward(m, &b, &st) == 0, "%s", m->error);
    ck_assert_msg(first > 2.0, "%s: the first loss %.3f is that of an untrained model",
                  attn_kind_name(kind), first);
    ck_assert_msg(st.loss < 0.05, "%s: loss after %d steps %.4f (first %.3f)",
                  attn_kind_name(kind), STEPS, st.loss, first);
    ck_assert_int_eq(st.correct, st.labelled);
    model_destroy(m);
    return st.loss;
}

START_TEST(overfit_dense) { overfit(ATTN_DENSE); }
END_TEST
START_TEST(overfit_swa) { overfit(ATTN_SWA); }
END_TEST
START_TEST(overfit_dma) { overfit(ATTN_DMA); }
END_TEST

/* ---- reproducibility ---- */

START_TEST(same_seed_same_run)
{
    enum { B = 3, L = 20, V = 30 };
    for (int kind = ATTN_DENSE; kind <= ATTN_DMA; kind++) {
        model_config c = {.vocab = V, .d_model = 32, .n_layers = 2, .n_heads = 4,
                          .n_kv_heads = 2, .max_seq = L, .attn = (attn_kind)kind, .window = 6};
        model *a = make_model(c, B, 2, 9), *b = make_model(c, B, 2, 9);
        model *other = make_model(c, B, 2, 10);
        ck_assert_msg(memcmp(a->params, other->params, sizeof(float) * a->n_params) != 0,
                      "another seed gives other weights");
        adamw_config opt = adamw_config_defaults((adamw_config){.lr = 3e-3f});
        test_rng r = rng_make(3);
        int32_t tok[B * L], lab[B * L];
        for (int s = 0; s < 3; s++) {
            random_batch(&r, B, L, V, 3, tok, lab);
            batch bt = {B, L, tok, lab};
            step_stats sa, sb;
            ck_assert_msg(model_train_step(a, &opt, &bt, &sa) == 0, "%s", a->error);
            ck_assert_msg(model_train_step(b, &opt, &bt, &sb) == 0, "%s", b->error);
            ck_assert(sa.loss == sb.loss && sa.grad_norm == sb.grad_norm);
        }
        ck_assert(memcmp(a->params, b->params, sizeof(float) * a->n_params) == 0);
        ck_assert(memcmp(a->adam_v, b->adam_v, sizeof(float) * a->n_params) == 0);
        model_destroy(a);
        model_destroy(b);
        model_destroy(other);
    }
}
END_TEST

/* ---- divergence ---- */

START_TEST(nan_loss_stops_training)
{
    enum { B = 2, L = 10, V = 12 };
    for (int kind = ATTN_DENSE; kind <= ATTN_DMA; kind++) {
        model_config c = {.vocab = V, .d_model = 16, .n_layers = 2, .n_heads = 2,
                          .max_seq = L, .attn = (attn_kind)kind, .window = 4};
        model *m = make_model(c, B, 2, 4);
        test_rng r = rng_make(8);
        int32_t tok[B * L], lab[B * L];
        random_batch(&r, B, L, V, 2, tok, lab);
        batch b = {B, L, tok, lab};
        adamw_config opt = adamw_config_defaults((adamw_config){0});
        step_stats st;
        ck_assert_msg(model_train_step(m, &opt, &b, &st) == 0, "%s", m->error);
        m->tok_emb[tok[3] * 16 + 5] = NAN; /* one weight of a token the batch reads */
        float *before = test_malloc(sizeof(float) * m->n_params);
        memcpy(before, m->params, sizeof(float) * m->n_params);
        ck_assert_int_eq(model_train_step(m, &opt, &b, &st), -1);
        if (kind == ATTN_DMA) /* the NaN reaches v, the dynamic bias, and the mask builder */
            ck_assert_msg(strstr(m->error, "dma_sparsity_rebuild") && strstr(m->error, "step 1") &&
                          strstr(m->error, "layer 0"), "message: %s", m->error);
        else
            ck_assert_msg(strstr(m->error, "step 1") && strstr(m->error, "loss is nan"),
                          "message: %s", m->error);
        ck_assert_int_eq(m->step, 1);
        /* nothing was updated (bytes compared: the NaN weight equals itself) */
        ck_assert(memcmp(before, m->params, sizeof(float) * m->n_params) == 0);
        free(before);
        model_destroy(m);
    }
}
END_TEST

START_TEST(non_finite_gradient_norm_stops_the_update)
{
    enum { B = 2, L = 10, V = 12 };
    model_config c = {.vocab = V, .d_model = 16, .n_layers = 1, .n_heads = 2, .max_seq = L};
    model *m = make_model(c, B, 1, 4);
    test_rng r = rng_make(8);
    int32_t tok[B * L], lab[B * L];
    random_batch(&r, B, L, V, 2, tok, lab);
    batch b = {B, L, tok, lab};
    adamw_config opt = adamw_config_defaults((adamw_config){0});
    step_stats st;
    ck_assert(model_forward(m, &b, &st) == 0 && model_backward(m) == 0);
    m->grads[m->n_params / 2] = INFINITY;
    float *before = test_malloc(sizeof(float) * m->n_params);
    memcpy(before, m->params, sizeof(float) * m->n_params);
    ck_assert_int_eq(model_update(m, &opt, &st), -1);
    ck_assert_msg(strstr(m->error, "step 0") && strstr(m->error, "gradient norm is inf"),
                  "message: %s", m->error);
    ck_assert(memcmp(before, m->params, sizeof(float) * m->n_params) == 0);
    ck_assert_int_eq(m->step, 0);
    free(before);
    model_destroy(m);
}
END_TEST

/* ---- bad input ---- */

START_TEST(bad_configs_are_refused)
{
    model_config ok = model_config_defaults((model_config){
        .vocab = 10, .d_model = 16, .n_layers = 1, .n_heads = 2, .max_seq = 8,
        .attn = ATTN_DMA, .window = 4});
    model_config bad[8];
    for (int i = 0; i < 8; i++)
        bad[i] = ok;
    bad[0].vocab = 1;
    bad[1].n_heads = 3;                  /* does not divide d_model */
    bad[2].n_heads = 16;                 /* head dim 1 is odd (RoPE) */
    bad[3].n_kv_heads = 3;               /* does not divide n_heads */
    bad[4].window = 0;                   /* dma needs a window */
    bad[5].attn = (attn_kind)7;
    bad[6].norm_eps = NAN;
    bad[7].max_seq = 0;
    for (int i = 0; i < 8; i++) {
        if (i == 0) { /* also: attn_only is a flag */
            model_config b = ok;
            b.attn_only = 2;
            char e[256];
            ck_assert_int_eq(model_config_check(&b, e, sizeof e), -1);
        }
        model *m = (model *)&bad; /* a sentinel: must stay as it is */
        char err[512] = "";
        ck_assert_int_eq(model_create(&bad[i], 2, 1, 1, &m, err, sizeof err), -1);
        ck_assert_msg(m == (model *)&bad && err[0], "config %d: %s", i, err);
    }
    model *m = NULL;
    char err[512];
    ck_assert_int_eq(model_create(&ok, 0, 1, 1, &m, err, sizeof err), -1);
    ck_assert_ptr_null(m);
}
END_TEST

START_TEST(bad_batches_are_refused)
{
    enum { B = 2, L = 8, V = 10 };
    model_config c = {.vocab = V, .d_model = 16, .n_layers = 1, .n_heads = 2, .max_seq = L};
    model *m = make_model(c, B, 1, 1);
    int32_t tok[B * L], lab[B * L];
    test_rng r = rng_make(1);
    random_batch(&r, B, L, V, 2, tok, lab);
    step_stats st;
    batch cases[6] = {{B + 1, L, tok, lab}, {B, L + 1, tok, lab}, {0, L, tok, lab},
                      {B, L, NULL, lab},    {B, L, tok, lab},     {B, L, tok, lab}};
    int32_t tok_bad[B * L], lab_bad[B * L];
    memcpy(tok_bad, tok, sizeof tok);
    memcpy(lab_bad, lab, sizeof lab);
    tok_bad[5] = V;
    lab_bad[0] = V;
    cases[4].tokens = tok_bad;
    cases[5].labels = lab_bad;
    for (int i = 0; i < 6; i++) {
        m->error[0] = '\0';
        ck_assert_int_eq(model_forward(m, &cases[i], &st), -1);
        ck_assert_msg(m->error[0], "case %d has a message", i);
    }
    /* a batch without labels is fine: loss 0, zero gradients */
    for (int t = 0; t < B * L; t++)
        lab[t] = -1;
    batch none = {B, L, tok, lab};
    ck_assert(model_forward(m, &none, &st) == 0 && st.labelled == 0 && st.loss == 0.0);
    ck_assert(model_backward(m) == 0);
    for (size_t i = 0; i < m->n_params; i++)
        REQUIRE(m->grads[i] == 0.0f, "gradient %zu of an unlabelled batch", i);
    model_destroy(m);
}
END_TEST

START_TEST(learning_rate_schedule)
{
    adamw_config o = adamw_config_defaults((adamw_config){
        .lr = 1.0f, .min_lr = 0.1f, .warmup_steps = 4, .total_steps = 14});
    ck_assert_float_eq_tol(adamw_lr(&o, 0), 0.25f, 1e-6f);
    ck_assert_float_eq_tol(adamw_lr(&o, 3), 1.0f, 1e-6f);
    ck_assert_float_eq_tol(adamw_lr(&o, 4), 1.0f, 1e-6f);
    ck_assert_float_eq_tol(adamw_lr(&o, 9), 0.55f, 1e-6f); /* half way down the cosine */
    ck_assert_float_eq_tol(adamw_lr(&o, 14), 0.1f, 1e-6f);
    ck_assert_float_eq_tol(adamw_lr(&o, 100), 0.1f, 1e-6f);
}
END_TEST

START_TEST(progress_lines_in_a_log)
{
    FILE *f = tmpfile();
    ck_assert_ptr_nonnull(f);
    progress p;
    progress_begin(&p, f, "mqar", 2, 5); /* a run resumed at step 2 */
    p.interval = 0.0;                    /* a line at every step */
    for (int s = 3; s <= 5; s++)
        progress_step(&p, s, 1.0 / s, 0.25 * (s - 1), 1000.0 * s);
    progress_end(&p);
    rewind(f);
    char text[1024] = "";
    size_t n = fread(text, 1, sizeof text - 1, f);
    text[n] = '\0';
    fclose(f);
    ck_assert_msg(strstr(text, "mqar step 3/5  loss 0.3333  acc  50.0%  3000 tok/s  ETA ") &&
                  strstr(text, "mqar step 5/5  loss 0.2000  acc 100.0%  5000 tok/s  ETA 0.0s\n"),
                  "log:\n%s", text);
    ck_assert_msg(!strchr(text, '\r') && !strchr(text, '\033'), "no terminal codes in a log");
    char buf[32];
    progress_format_seconds(buf, sizeof buf, 3725.0);
    ck_assert_str_eq(buf, "1h02m");
    progress_format_seconds(buf, sizeof buf, 185.0);
    ck_assert_str_eq(buf, "3m05s");
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("train_model");
    TCase *tc = tcase_create("model");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, gradient_dense);
    tcase_add_test(tc, gradient_swa);
    tcase_add_test(tc, gradient_dma);
    tcase_add_test(tc, gradient_attention_only);
    tcase_add_test(tc, overfit_dense);
    tcase_add_test(tc, overfit_swa);
    tcase_add_test(tc, overfit_dma);
    tcase_add_test(tc, same_seed_same_run);
    tcase_add_test(tc, nan_loss_stops_training);
    tcase_add_test(tc, non_finite_gradient_norm_stops_the_update);
    tcase_add_test(tc, bad_configs_are_refused);
    tcase_add_test(tc, bad_batches_are_refused);
    tcase_add_test(tc, learning_rate_schedule);
    tcase_add_test(tc, progress_lines_in_a_log);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(suite()); }

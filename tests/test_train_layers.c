/*
 * test_train_layers.c - every layer of the training library (examples/common/layers.h): each
 * backward against central finite differences of a scalar loss, and the forwards against
 * direct double-precision evaluation where that is simple.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "layers.h"
#include "train_support.h"

/* ---- embedding ---- */

START_TEST(embedding_gather_and_scatter)
{
    enum { N = 23, C = 5, V = 7 };
    test_rng r = rng_make(1);
    int32_t tokens[N];
    float table[V * C], out[N * C], dout[N * C], dtable[V * C];
    for (int t = 0; t < N; t++)
        tokens[t] = (int32_t)rng_int(&r, 0, V - 2); /* the last row is never read */
    fill_uniform(&r, table, V * C, 1.0f);
    fill_uniform(&r, dout, N * C, 1.0f);
    embedding_forward(out, tokens, table, N, C, 2);
    for (int t = 0; t < N; t++)
        for (int c = 0; c < C; c++)
            REQUIRE(out[t * C + c] == table[tokens[t] * C + c], "gather at %d,%d", t, c);
    for (int i = 0; i < V * C; i++)
        dtable[i] = 0.5f; /* it adds */
    embedding_backward(dtable, dout, tokens, N, C);
    for (int v = 0; v < V; v++)
        for (int c = 0; c < C; c++) {
            double s = 0.5;
            for (int t = 0; t < N; t++)
                s += tokens[t] == v ? dout[t * C + c] : 0.0;
            REQUIRE(fabs(dtable[v * C + c] - s) <= 1e-6, "dtable[%d][%d] %g, expected %g", v,
                    c, dtable[v * C + c], s);
        }
}
END_TEST

/* ---- rmsnorm ---- */

typedef struct norm_case {
    int N, C;
    float *x, *w, *y, *rstd, *R;
} norm_case;

static double norm_loss(void *s)
{
    norm_case *k = s;
    rmsnorm_forward(k->y, k->rstd, k->x, k->w, k->N, k->C, 1e-5f, 2);
    return weighted_sum(k->y, k->R, (size_t)k->N * k->C);
}

START_TEST(rmsnorm_matches_definition_and_finite_differences)
{
    enum { N = 9, C = 13 };
    test_rng r = rng_make(2);
    float x[N * C], w[C], y[N * C], rstd[N], R[N * C], dx[N * C], dw[C];
    float scratch[64 * C];
    ck_assert_uint_le(rmsnorm_scratch_floats(N, C), sizeof scratch / sizeof scratch[0]);
    fill_uniform(&r, x, N * C, 2.0f);
    for (int c = 0; c < C; c++)
        w[c] = rng_float(&r, 0.5f, 1.5f);
    fill_uniform(&r, R, N * C, 1.0f);
    norm_case k = {N, C, x, w, y, rstd, R};
    norm_loss(&k);
    for (int t = 0; t < N; t++) {
        double ss = 0.0;
        for (int c = 0; c < C; c++)
            ss += (double)x[t * C + c] * x[t * C + c];
        double rs = 1.0 / sqrt(ss / C + 1e-5);
        for (int c = 0; c < C; c++)
            REQUIRE(fabs(y[t * C + c] - x[t * C + c] * rs * w[c]) <= 1e-5 * (1 + fabs(y[t * C + c])),
                    "y[%d][%d]", t, c);
    }
    for (int i = 0; i < N * C; i++)
        dx[i] = 0.25f; /* the backward adds into dx */
    rmsnorm_backward(dx, dw, R, x, w, rstd, N, C, scratch, 2);
    for (int i = 0; i < N * C; i++)
        dx[i] -= 0.25f;
    fd_check("rmsnorm dx", x, dx, N * C, norm_loss, &k, NULL, &r, 40, 1e-2f, 2e-3, 1e-2);
    fd_check("rmsnorm dw", w, dw, C, norm_loss, &k, NULL, &r, 40, 1e-2f, 2e-3, 1e-2);
}
END_TEST

/* ---- rope ---- */

typedef struct rope_case {
    int B, L, H, D, ld;
    float *x, *y, *cos_t, *sin_t, *R;
} rope_case;

static double rope_loss(void *s)
{
    rope_case *k = s;
    size_t n = (size_t)k->B * k->L * k->ld;
    memcpy(k->y, k->x, sizeof(float) * n);
    rope_forward(k->y, k->B, k->L, k->H, k->D, k->ld, k->cos_t, k->sin_t, 2);
    return weighted_sum(k->y, k->R, n);
}

START_TEST(rope_rotates_pairs_and_backward_matches)
{
    enum { B = 2, L = 7, H = 3, D = 6, LD = H * D + 5 }; /* 5 extra floats per row: untouched */
    test_rng r = rng_make(3);
    float cos_t[L * D / 2], sin_t[L * D / 2];
    float x[B * L * LD], y[B * L * LD], R[B * L * LD], g[B * L * LD];
    rope_table(cos_t, sin_t, L, D, 100.0f);
    fill_uniform(&r, x, B * L * LD, 1.0f);
    fill_uniform(&r, R, B * L * LD, 1.0f);
    rope_case k = {B, L, H, D, LD, x, y, cos_t, sin_t, R};
    rope_loss(&k);
    for (int t = 0; t < B * L; t++)
        for (int i = 0; i < LD; i++) {
            int h = i / D, d = i % D, pos = t % L;
            double want = x[t * LD + i];
            if (h < H) {
                int p = d % (D / 2);
                double angle = pos * pow(100.0, -2.0 * p / D);
                double a = x[t * LD + h * D + p], b = x[t * LD + h * D + p + D / 2];
                want = d < D / 2 ? a * cos(angle) - b * sin(angle) : b * cos(angle) + a * sin(angle);
            }
            REQUIRE(fabs(y[t * LD + i] - want) <= 1e-5, "rope at token %d float %d", t, i);
        }
    memcpy(g, R, sizeof g);
    rope_backward(g, B, L, H, D, LD, cos_t, sin_t, 2);
    fd_check("rope dx", x, g, B * L * LD, rope_loss, &k, NULL, &r, 60, 1e-2f, 1e-3, 1e-3);
}
END_TEST

/* ---- linear ---- */

START_TEST(linear_matches_double_products_for_any_threads)
{
    enum { N = 200, NI = 19, NO = 23 };
    test_rng r = rng_make(4);
    float *x = test_malloc(sizeof(float) * N * NI), *w = test_malloc(sizeof(float) * NI * NO);
    float *y = test_malloc(sizeof(float) * N * NO), *dy = test_malloc(sizeof(float) * N * NO);
    float *dx = test_malloc(sizeof(float) * N * NI), *dw = test_malloc(sizeof(float) * NI * NO);
    fill_uniform(&r, x, N * NI, 1.0f);
    fill_uniform(&r, w, NI * NO, 1.0f);
    fill_uniform(&r, dy, N * NO, 1.0f);
    for (int threads = 1; threads <= 3; threads++)
        for (int acc = 0; acc <= 1; acc++) {
            for (int i = 0; i < N * NO; i++)
                y[i] = 0.5f;
            for (int i = 0; i < N * NI; i++)
                dx[i] = -0.5f;
            linear_forward(y, x, w, N, NI, NO, acc, threads);
            linear_backward(dx, dw, dy, x, w, N, NI, NO, acc, threads);
            for (int t = 0; t < N; t++)
                for (int o = 0; o < NO; o++) {
                    double s = acc ? 0.5 : 0.0;
                    for (int i = 0; i < NI; i++)
                        s += (double)x[t * NI + i] * w[i * NO + o];
                    REQUIRE(fabs(y[t * NO + o] - s) <= 1e-5 * (1 + fabs(s)), "y[%d][%d]", t, o);
                }
            for (int t = 0; t < N; t++)
                for (int i = 0; i < NI; i++) {
                    double s = acc ? -0.5 : 0.0;
                    for (int o = 0; o < NO; o++)
                        s += (double)dy[t * NO + o] * w[i * NO + o];
                    REQUIRE(fabs(dx[t * NI + i] - s) <= 1e-5 * (1 + fabs(s)), "dx[%d][%d]", t, i);
                }
            for (int i = 0; i < NI; i++)
                for (int o = 0; o < NO; o++) {
                    double s = 0.0;
                    for (int t = 0; t < N; t++)
                        s += (double)x[t * NI + i] * dy[t * NO + o];
                    REQUIRE(fabs(dw[i * NO + o] - s) <= 1e-4 * (1 + fabs(s)), "dw[%d][%d]", i, o);
                }
        }
    /* the transposed variants (W stored n_out x n_in), both splits of dW */
    float *wt = test_malloc(sizeof(float) * NO * NI), *dwt = test_malloc(sizeof(float) * NO * NI);
    for (int i = 0; i < NI; i++)
        for (int o = 0; o < NO; o++)
            wt[o * NI + i] = w[i * NO + o];
    for (int threads = 1; threads <= 3; threads += 2) {
        float *y2 = test_malloc(sizeof(float) * N * NO), *dx2 = test_malloc(sizeof(float) * N * NI);
        linear_forward(y, x, w, N, NI, NO, 0, threads);
        linear_backward(dx, dw, dy, x, w, N, NI, NO, 0, threads);
        linear_forward_t(y2, x, wt, N, NI, NO, 0, threads);
        linear_backward_t(dx2, dwt, dy, x, wt, N, NI, NO, 0, threads);
        for (int i = 0; i < N * NO; i++)
            REQUIRE(fabs(y2[i] - y[i]) <= 1e-5 * (1 + fabs(y[i])), "y_t[%d]", i);
        for (int i = 0; i < N * NI; i++)
            REQUIRE(fabs(dx2[i] - dx[i]) <= 1e-5 * (1 + fabs(dx[i])), "dx_t[%d]", i);
        for (int i = 0; i < NI; i++)
            for (int o = 0; o < NO; o++)
                REQUIRE(fabs(dwt[o * NI + i] - dw[i * NO + o]) <= 1e-4 * (1 + fabs(dw[i * NO + o])),
                        "dw_t[%d][%d]", o, i);
        linear_backward_t(NULL, dwt, x, dy, w, N, NO, NI, 0, threads); /* n_out < n_in */
        for (int i = 0; i < NI; i++)
            for (int o = 0; o < NO; o++) {
                double s = 0.0;
                for (int t = 0; t < N; t++)
                    s += (double)x[t * NI + i] * dy[t * NO + o];
                REQUIRE(fabs(dwt[i * NO + o] - s) <= 1e-4 * (1 + fabs(s)), "dw_t2[%d][%d]", i, o);
            }
        free(y2);
        free(dx2);
    }
    free(wt);
    free(dwt);
    /* dW split by columns: more outputs than inputs */
    float *dw2 = test_malloc(sizeof(float) * NO * NI);
    linear_backward(NULL, dw2, x, dy, w, N, NO, NI, 0, 3);
    for (int i = 0; i < NO; i++)
        for (int o = 0; o < NI; o++) {
            double s = 0.0;
            for (int t = 0; t < N; t++)
                s += (double)dy[t * NO + i] * x[t * NI + o];
            REQUIRE(fabs(dw2[i * NI + o] - s) <= 1e-4 * (1 + fabs(s)), "dw2[%d][%d]", i, o);
        }
    free(x); free(w); free(y); free(dy); free(dx); free(dw); free(dw2);
}
END_TEST

/* ---- SwiGLU MLP ---- */

typedef struct mlp_case {
    int N, C, F;
    float *x, *w_gu, *w_down, *gu, *h, *y, *R;
} mlp_case;

static double mlp_loss(void *s)
{
    mlp_case *k = s;
    memset(k->y, 0, sizeof(float) * (size_t)k->N * k->C);
    mlp_forward(k->y, k->gu, k->h, k->x, k->w_gu, k->w_down, k->N, k->C, k->F, 2);
    return weighted_sum(k->y, k->R, (size_t)k->N * k->C);
}

START_TEST(mlp_backward_matches_finite_differences)
{
    enum { N = 10, C = 6, F = 7 };
    test_rng r = rng_make(5);
    float x[N * C], w_gu[C * 2 * F], w_down[F * C], gu[N * 2 * F], h[N * F], y[N * C],
        R[N * C];
    float dx[N * C], dw_gu[C * 2 * F], dw_down[F * C], dgu[N * 2 * F], dh[N * F];
    fill_uniform(&r, x, N * C, 1.0f);
    fill_uniform(&r, w_gu, C * 2 * F, 1.0f);
    fill_uniform(&r, w_down, F * C, 1.0f);
    fill_uniform(&r, R, N * C, 1.0f);
    mlp_case k = {N, C, F, x, w_gu, w_down, gu, h, y, R};
    mlp_loss(&k);
    /* the forward against the formula, in double */
    for (int t = 0; t < N; t++)
        for (int c = 0; c < C; c++) {
            double s = 0.0;
            for (int f = 0; f < F; f++) {
                double g = 0.0, u = 0.0;
                for (int i = 0; i < C; i++) {
                    g += (double)x[t * C + i] * w_gu[i * 2 * F + f];
                    u += (double)x[t * C + i] * w_gu[i * 2 * F + F + f];
                }
                s += g / (1.0 + exp(-g)) * u * w_down[f * C + c];
            }
            REQUIRE(fabs(y[t * C + c] - s) <= 1e-5 * (1 + fabs(s)), "mlp y[%d][%d]", t, c);
        }
    mlp_backward(dx, dw_gu, dw_down, R, x, gu, h, w_gu, w_down, dgu, dh, N, C, F, 2);
    fd_check("mlp dx", x, dx, N * C, mlp_loss, &k, NULL, &r, 40, 1e-2f, 2e-3, 1e-2);
    fd_check("mlp dw_gu", w_gu, dw_gu, C * 2 * F, mlp_loss, &k, NULL, &r, 40, 1e-2f, 2e-3, 1e-2);
    fd_check("mlp dw_down", w_down, dw_down, F * C, mlp_loss, &k, NULL, &r, 40, 1e-2f, 2e-3,
             1e-2);
}
END_TEST

/* ---- attention ---- */

typedef struct attn_case {
    dma_context *ctx;
    attn_dims d;
    attn_params p;
    attn_acts a;
    float *x, *y, *R, *cos_t, *sin_t;
    uint8_t *sel0, *sel; /* the selection at the unperturbed point, and the latest one */
    size_t sel_bytes;
} attn_case;

static double attn_loss(void *s)
{
    attn_case *k = s;
    char err[256];
    memset(k->y, 0, sizeof(float) * (size_t)k->d.B * k->d.L * k->d.C);
    int rc = attention_forward(k->ctx, &k->d, &k->p, &k->a, k->cos_t, k->sin_t, k->x, k->y, err,
                               sizeof err);
    REQUIRE(rc == 0, "attention_forward: %s", err);
    return weighted_sum(k->y, k->R, (size_t)k->d.B * k->d.L * k->d.C);
}

/* A finite difference across a change of the top-k selection is meaningless: skip it. */
static int attn_selection_changed(void *s)
{
    attn_case *k = s;
    if (!k->a.sp)
        return 0;
    ck_assert_int_eq(dma_sparsity_to_dense(k->a.sp, k->sel, k->sel_bytes), DMA_OK);
    return memcmp(k->sel, k->sel0, k->sel_bytes) != 0;
}

static void check_attention(attn_kind kind, int window, int Hq, int Hkv, uint64_t seed)
{
    const int B = 2, L = 19, D = 4, C = Hq * D, N = B * L, QKV = (Hq + 2 * Hkv) * D;
    test_rng r = rng_make(seed);
    attn_case k = {.d = {.B = B, .L = L, .C = C, .Hq = Hq, .Hkv = Hkv, .D = D, .kind = kind,
                         .window = window}};
    dma_context_options o = {.threads = 2};
    ck_assert_int_eq(dma_context_create(&o, &k.ctx), DMA_OK);
    float *mem[32];
    int nm = 0;
#define ALLOC(n) (mem[nm++] = test_calloc((size_t)(n), sizeof(float)))
    k.x = ALLOC(N * C);
    k.y = ALLOC(N * C);
    k.R = ALLOC(N * C);
    k.cos_t = ALLOC(L * D / 2);
    k.sin_t = ALLOC(L * D / 2);
    k.p.w_qkv = ALLOC(C * QKV);
    k.p.w_o = ALLOC(Hq * D * C);
    k.p.w_dt = ALLOC(Hkv * D * Hkv);
    k.p.b_dt = ALLOC(Hkv);
    k.p.a_dt = ALLOC(Hkv);
    attn_params g = {ALLOC(C * QKV), ALLOC(Hq * D * C), ALLOC(Hkv * D * Hkv), ALLOC(Hkv),
                     ALLOC(Hkv)};
    k.a.qkv = ALLOC(N * QKV);
    k.a.att = ALLOC(N * Hq * D);
    k.a.lse = ALLOC(N * Hq);
    k.a.bias = ALLOC(N * Hkv);
    attn_scratch s = {ALLOC(N * QKV), ALLOC(N * Hq * D), ALLOC(N * Hkv)};
    float *dx = ALLOC(N * C);
#undef ALLOC
    rope_table(k.cos_t, k.sin_t, L, D, 10000.0f);
    fill_uniform(&r, k.x, N * C, 1.0f);
    fill_uniform(&r, k.R, N * C, 1.0f);
    fill_uniform(&r, k.p.w_qkv, C * QKV, 0.7f);
    fill_uniform(&r, k.p.w_o, Hq * D * C, 0.7f);
    /* a mask generator whose biases lie well apart, so that small steps rarely reorder them */
    fill_uniform(&r, k.p.w_dt, Hkv * D * Hkv, 2.0f);
    fill_uniform(&r, k.p.b_dt, Hkv, 0.5f);
    for (int h = 0; h < Hkv; h++)
        k.p.a_dt[h] = rng_float(&r, 0.5f, 1.5f);
    attn_loss(&k);
    if (k.a.sp) {
        k.sel_bytes = (size_t)(kind == ATTN_DMA ? B * Hkv : 1) * L * L;
        k.sel0 = test_malloc(k.sel_bytes);
        k.sel = test_malloc(k.sel_bytes);
        ck_assert_int_eq(dma_sparsity_to_dense(k.a.sp, k.sel0, k.sel_bytes), DMA_OK);
        /* the selection is what the kind promises: at most `window` keys per row */
        for (size_t row = 0; row < k.sel_bytes / L; row++) {
            int n = 0;
            for (int j = 0; j < L; j++)
                n += k.sel0[row * L + j];
            REQUIRE(n == (int)(row % L + 1 < (size_t)window ? row % L + 1 : (size_t)window),
                    "row %zu selects %d keys", row, n);
        }
    }
    char err[256];
    ck_assert_msg(attention_backward(k.ctx, &k.d, &k.p, &g, &k.a, &s, k.cos_t, k.sin_t, k.x,
                                     k.R, dx, err, sizeof err) == 0, "%s", err);
    int (*skip)(void *) = kind == ATTN_DMA ? attn_selection_changed : NULL;
    const float h = 3e-3f;
    fd_check("attention dx", k.x, dx, N * C, attn_loss, &k, skip, &r, 30, h, 3e-3, 2e-2);
    fd_check("attention dw_qkv", k.p.w_qkv, g.w_qkv, C * QKV, attn_loss, &k, skip, &r, 30, h,
             3e-3, 2e-2);
    fd_check("attention dw_o", k.p.w_o, g.w_o, Hq * D * C, attn_loss, &k, skip, &r, 20, h, 3e-3,
             2e-2);
    if (kind == ATTN_DMA) {
        fd_check("attention dw_dt", k.p.w_dt, g.w_dt, Hkv * D * Hkv, attn_loss, &k, skip, &r, 30,
                 h, 3e-3, 2e-2);
        fd_check("attention db_dt", k.p.b_dt, g.b_dt, Hkv, attn_loss, &k, skip, &r, 30, h, 3e-3,
                 2e-2);
        fd_check("attention da_dt", k.p.a_dt, g.a_dt, Hkv, attn_loss, &k, skip, &r, 30, h, 3e-3,
                 2e-2);
        double gsum = 0.0;
        for (int i = 0; i < Hkv * D * Hkv; i++)
            gsum += fabs(g.w_dt[i]);
        ck_assert_msg(gsum > 1e-3, "the mask generator gets a gradient (|dW_dt| = %g)", gsum);
    }
    attention_acts_release(&k.a);
    dma_context_destroy(k.ctx);
    for (int i = 0; i < nm; i++)
        free(mem[i]);
    free(k.sel0);
    free(k.sel);
}

START_TEST(attention_dense_matches_finite_differences)
{
    check_attention(ATTN_DENSE, 0, 4, 2, 11);
}
END_TEST

START_TEST(attention_swa_matches_finite_differences)
{
    check_attention(ATTN_SWA, 5, 2, 2, 12);
}
END_TEST

START_TEST(attention_dma_matches_finite_differences)
{
    check_attention(ATTN_DMA, 5, 4, 2, 13);  /* GQA, top-5 of up to 19 keys */
    check_attention(ATTN_DMA, 64, 2, 1, 14); /* every key selected: the bias alone matters */
}
END_TEST

/* ---- lm head ---- */

typedef struct head_case {
    int N, C, V, tied;
    float *x, *lnf_w, *w_head;
    const int32_t *labels;
    lm_head_acts a;
    int correct;
} head_case;

static double head_loss(void *s)
{
    head_case *k = s;
    return lm_head_forward(&k->a, k->x, k->labels, k->N, k->C, k->V, k->lnf_w, k->w_head,
                           k->tied, 1e-5f, &k->correct, 2);
}

/* The head with its own C x V weights, or tied to a V x C embedding table. */
static void check_head(int tied)
{
    enum { N = 30, C = 8, V = 11 };
    test_rng r = rng_make(6 + (uint64_t)tied);
    float x[N * C], lnf_w[C], w_head[C * V], dx[N * C], dlnf[C], dhead[C * V];
    int32_t labels[N], pos[N], lab[N];
    float xg[N * C], hn[N * C], rstd[N], probs[N * V], dlogits[N * V], dhn[N * C], dxg[N * C];
    float scratch[64 * C];
    for (int t = 0; t < N; t++)
        labels[t] = t % 3 == 1 ? (int32_t)rng_int(&r, 0, V - 1) : -1;
    fill_uniform(&r, x, N * C, 1.0f);
    fill_uniform(&r, w_head, C * V, 1.0f);
    for (int c = 0; c < C; c++)
        lnf_w[c] = rng_float(&r, 0.5f, 1.5f);
    head_case k = {N, C, V, tied, x, lnf_w, w_head, labels, {0, pos, lab, xg, hn, rstd, probs}, 0};
    double loss = head_loss(&k);
    ck_assert_int_eq(k.a.M, N / 3);
    /* the loss and the hits against a direct evaluation in double */
    double want = 0.0;
    int hits = 0;
    for (int t = 0; t < N; t++) {
        if (labels[t] < 0)
            continue;
        double ss = 0.0, z[V], zmax = -INFINITY, sum = 0.0;
        for (int c = 0; c < C; c++)
            ss += (double)x[t * C + c] * x[t * C + c];
        double rs = 1.0 / sqrt(ss / C + 1e-5);
        int best = 0;
        for (int v = 0; v < V; v++) {
            z[v] = 0.0;
            for (int c = 0; c < C; c++)
                z[v] += x[t * C + c] * rs * lnf_w[c] * (tied ? w_head[v * C + c] : w_head[c * V + v]);
            if (z[v] > zmax) {
                zmax = z[v];
                best = v;
            }
        }
        for (int v = 0; v < V; v++)
            sum += exp(z[v] - zmax);
        want += -(z[labels[t]] - zmax - log(sum));
        hits += best == labels[t];
    }
    ck_assert_msg(fabs(loss - want) <= 1e-5 * want, "loss %.8g, expected %.8g", loss, want);
    ck_assert_int_eq(k.correct, hits);
    fill_sentinel(dx, sizeof dx);
    lm_head_backward(dx, dlnf, dhead, &k.a, 1.0f, lnf_w, w_head, tied, N, C, V, dlogits, dhn,
                     dxg, scratch, 2);
    for (int t = 0; t < N; t++)
        if (labels[t] < 0)
            for (int c = 0; c < C; c++)
                REQUIRE(dx[t * C + c] == 0.0f, "unlabelled token %d gets no gradient", t);
    fd_check("lm head dx", x, dx, N * C, head_loss, &k, NULL, &r, 60, 1e-2f, 2e-3, 1e-2);
    fd_check("lm head dlnf_w", lnf_w, dlnf, C, head_loss, &k, NULL, &r, 20, 1e-2f, 2e-3, 1e-2);
    fd_check("lm head dw_head", w_head, dhead, C * V, head_loss, &k, NULL, &r, 40, 1e-2f, 2e-3,
             1e-2);
}

START_TEST(lm_head_loss_and_gradients) { check_head(0); }
END_TEST

START_TEST(lm_head_tied_to_the_embedding) { check_head(1); }
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("train_layers");
    TCase *tc = tcase_create("layers");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, embedding_gather_and_scatter);
    tcase_add_test(tc, rmsnorm_matches_definition_and_finite_differences);
    tcase_add_test(tc, rope_rotates_pairs_and_backward_matches);
    tcase_add_test(tc, linear_matches_double_products_for_any_threads);
    tcase_add_test(tc, mlp_backward_matches_finite_differences);
    tcase_add_test(tc, attention_dense_matches_finite_differences);
    tcase_add_test(tc, attention_swa_matches_finite_differences);
    tcase_add_test(tc, attention_dma_matches_finite_differences);
    tcase_add_test(tc, lm_head_loss_and_gradients);
    tcase_add_test(tc, lm_head_tied_to_the_embedding);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(suite()); }

/*
 * test_checkpoint.c - checkpoints of the training library (examples/common/checkpoint.h): the
 * round trip, the exact resume (N steps == k steps, save, load, N - k steps, bit for bit), and
 * files that must be refused without creating anything: missing, empty, truncated anywhere,
 * any corrupted byte, foreign, another version, a valid hash over a bad configuration,
 * trailing data, a caller's section too large.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoint.h"
#include "common.h"

enum { B = 2, L = 14, V = 21 };

static char dir[64];

/* A fresh private directory for the test's files (removed at its end). */
static void make_dir(void)
{
    strcpy(dir, "/tmp/dmattn-ckpt-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void path_of(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", dir, name);
}

static model *new_model(attn_kind kind, uint64_t seed)
{
    model_config c = model_config_defaults((model_config){
        .vocab = V, .d_model = 16, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .max_seq = L,
        .attn = kind, .window = 5, .attn_only = kind == ATTN_SWA, /* both block kinds */
        .tie_embeddings = kind != ATTN_DENSE,                       /* both heads */
        .pos_embeddings = kind == ATTN_DMA});
    model *m;
    char err[512];
    ck_assert_msg(model_create(&c, B, 2, seed, &m, err, sizeof err) == 0, "%s", err);
    return m;
}

/* The batch of step s: a function of s only, as a resumable data stream must be. */
static batch batch_of(int s, int32_t *tok, int32_t *lab)
{
    test_rng r = rng_make(1000 + (uint64_t)s);
    for (int t = 0; t < B * L; t++) {
        tok[t] = (int32_t)rng_int(&r, 0, V - 1);
        lab[t] = t % 3 == 2 ? (int32_t)rng_int(&r, 0, V - 1) : -1;
    }
    return (batch){B, L, tok, lab};
}

static void train(model *m, const adamw_config *o, int from, int to, double *losses)
{
    int32_t tok[B * L], lab[B * L];
    for (int s = from; s < to; s++) {
        batch b = batch_of(s, tok, lab);
        step_stats st;
        ck_assert_msg(model_train_step(m, o, &b, &st) == 0, "%s", m->error);
        losses[s] = st.loss;
    }
}

static const adamw_config opt_settings = {.lr = 3e-3f, .min_lr = 3e-4f, .beta1 = 0.9f,
                                          .beta2 = 0.99f, .eps = 1e-8f, .weight_decay = 0.05f,
                                          .grad_clip = 0.5f, .warmup_steps = 2,
                                          .total_steps = 8};

START_TEST(round_trip)
{
    make_dir();
    char path[256];
    path_of(path, sizeof path, "round.ckpt");
    model *m = new_model(ATTN_DMA, 3);
    double losses[3];
    train(m, &opt_settings, 0, 3, losses);
    const char user[] = "mqar kv=8 seed=4";
    char err[512];
    ck_assert_msg(checkpoint_save(m, &opt_settings, user, sizeof user, path, err, sizeof err) ==
                  0, "%s", err);
    ck_assert_int_ne(access(path, F_OK), -1);
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    ck_assert_int_eq(access(tmp, F_OK), -1); /* renamed into place */

    model *n = NULL;
    adamw_config o;
    char got[64];
    uint32_t got_bytes = 0;
    ck_assert_msg(checkpoint_load(path, B, 1, &n, &o, got, sizeof got, &got_bytes, err,
                                  sizeof err) == 0, "%s", err);
    ck_assert(memcmp(&n->cfg, &m->cfg, sizeof m->cfg) == 0);
    ck_assert_int_eq(n->step, 3);
    ck_assert_uint_eq(n->n_params, m->n_params);
    ck_assert(memcmp(n->params, m->params, sizeof(float) * m->n_params) == 0);
    ck_assert(memcmp(n->adam_m, m->adam_m, sizeof(float) * m->n_params) == 0);
    ck_assert(memcmp(n->adam_v, m->adam_v, sizeof(float) * m->n_params) == 0);
    ck_assert(memcmp(&o, &opt_settings, sizeof o) == 0);
    ck_assert_uint_eq(got_bytes, sizeof user);
    ck_assert_str_eq(got, user);
    ck_assert_int_eq(n->threads, 1); /* threads and batch size are the loader's choice */
    model_destroy(n);
    model_destroy(m);
    unlink(path);
    rmdir(dir);
}
END_TEST

/* N steps in one go == k steps, save, load into a fresh process-like state, N - k steps. */
static void check_resume(attn_kind kind)
{
    enum { N = 6, K = 3 };
    make_dir();
    char path[256], err[512];
    path_of(path, sizeof path, "resume.ckpt");
    double straight[N], resumed[N];
    model *a = new_model(kind, 11);
    train(a, &opt_settings, 0, N, straight);

    model *b = new_model(kind, 11);
    train(b, &opt_settings, 0, K, resumed);
    ck_assert_msg(checkpoint_save(b, &opt_settings, NULL, 0, path, err, sizeof err) == 0, "%s",
                  err);
    model_destroy(b);
    model *c = NULL;
    adamw_config o;
    ck_assert_msg(checkpoint_load(path, B, 2, &c, &o, NULL, 0, NULL, err, sizeof err) == 0, "%s",
                  err);
    train(c, &o, (int)c->step, N, resumed);
    for (int s = 0; s < N; s++)
        ck_assert_msg(straight[s] == resumed[s], "%s step %d: loss %.9g vs %.9g resumed",
                      attn_kind_name(kind), s, straight[s], resumed[s]);
    ck_assert_int_eq(c->step, N);
    ck_assert_msg(memcmp(a->params, c->params, sizeof(float) * a->n_params) == 0,
                  "%s: resumed parameters differ", attn_kind_name(kind));
    ck_assert(memcmp(a->adam_v, c->adam_v, sizeof(float) * a->n_params) == 0);
    model_destroy(a);
    model_destroy(c);
    unlink(path);
    rmdir(dir);
}

START_TEST(resume_is_exact_dense) { check_resume(ATTN_DENSE); }
END_TEST
START_TEST(resume_is_exact_swa) { check_resume(ATTN_SWA); }
END_TEST
START_TEST(resume_is_exact_dma) { check_resume(ATTN_DMA); }
END_TEST

/* ---- bad files ---- */

static unsigned char *file_bytes(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = test_malloc(*n);
    ck_assert_uint_eq(fread(p, 1, *n, f), *n);
    fclose(f);
    return p;
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(p, 1, n, f), n);
    fclose(f);
}

/* Loading must fail with a message containing `expect` and leave every output as it was. */
static void expect_refused(const char *path, const char *expect, const char *what)
{
    model *sentinel = (model *)&sentinel, *m = sentinel;
    adamw_config o, o0;
    fill_sentinel(&o, sizeof o);
    memcpy(&o0, &o, sizeof o);
    char user[8], err[512] = "";
    uint32_t ub = 12345;
    fill_sentinel(user, sizeof user);
    int rc = checkpoint_load(path, B, 1, &m, &o, user, sizeof user, &ub, err, sizeof err);
    REQUIRE(rc == -1, "%s: loaded", what);
    REQUIRE(m == sentinel && memcmp(&o, &o0, sizeof o) == 0 && ub == 12345 &&
                is_sentinel(user, sizeof user), "%s: an output was written", what);
    REQUIRE(strstr(err, expect) != NULL, "%s: message \"%s\" lacks \"%s\"", what, err, expect);
}

/* copy[at .. at + count) = value (a checked helper: gcc's bounds warning cannot see n). */
static void poke(unsigned char *copy, size_t n, size_t at, int value, size_t count)
{
    ck_assert_uint_le(at + count, n);
    for (size_t i = 0; i < count; i++)
        copy[at + i] = (unsigned char)value;
}

/* FNV-1a of the file's body into its last 8 bytes (for files that must fail a later check). */
static void rehash(unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n - 8; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    for (int i = 0; i < 8; i++)
        p[n - 8 + i] = (unsigned char)(h >> (8 * i));
}

START_TEST(bad_files_load_nothing)
{
    make_dir();
    char good[256], bad[256], err[512];
    path_of(good, sizeof good, "good.ckpt");
    path_of(bad, sizeof bad, "bad.ckpt");
    model *m = new_model(ATTN_DMA, 5);
    const char user[] = "abc";
    ck_assert_msg(checkpoint_save(m, &opt_settings, user, sizeof user, good, err, sizeof err) ==
                  0, "%s", err);
    model_destroy(m);
    size_t n;
    unsigned char *img = file_bytes(good, &n);
    unsigned char *copy = test_malloc(n + 16);

    expect_refused(bad, "cannot open", "missing file");
    write_bytes(bad, "", 0);
    expect_refused(bad, "not a dmattn training checkpoint", "empty file");
    const char *text = "this is a text file, not a checkpoint\n";
    write_bytes(bad, text, strlen(text));
    expect_refused(bad, "not a dmattn training checkpoint", "foreign file");

    /* truncated anywhere: every length up to the payload, then a spread through it */
    for (size_t len = 8; len < n; len += len < 200 ? 1 : 997) {
        write_bytes(bad, img, len);
        expect_refused(bad, "truncated", "truncated file");
    }
    /* any corrupted byte (past the magic): refused, by the hash or by an earlier check */
    for (size_t at = 8; at < n; at += at < 200 ? 1 : 1201) {
        memcpy(copy, img, n);
        copy[at] ^= 0x10;
        write_bytes(bad, copy, n);
        expect_refused(bad, "checkpoint", "corrupted byte");
    }
    memcpy(copy, img, n);
    copy[n / 2] ^= 1;
    write_bytes(bad, copy, n);
    expect_refused(bad, "checksum mismatch", "flipped bit in the parameters");

    /* valid hashes over bad contents: each must be caught by its own check */
    memcpy(copy, img, n);
    poke(copy, n, 8, 2, 1); /* version 2 */
    rehash(copy, n);
    write_bytes(bad, copy, n);
    expect_refused(bad, "format version 2", "future version");
    memcpy(copy, img, n);
    poke(copy, n, 16 + 3 * 4, 3, 1); /* n_heads 3 does not divide d_model 16 */
    rehash(copy, n);
    write_bytes(bad, copy, n);
    expect_refused(bad, "bad model configuration", "bad configuration");
    memcpy(copy, img, n);
    poke(copy, n, 76, 0xff, 4); /* lr = NaN */
    rehash(copy, n);
    write_bytes(bad, copy, n);
    expect_refused(bad, "bad optimizer settings", "bad optimizer settings");
    memcpy(copy, img, n);
    copy[120] ^= 4; /* a parameter count the configuration does not have */
    rehash(copy, n);
    write_bytes(bad, copy, n);
    expect_refused(bad, "checkpoint", "wrong parameter count");
    /* a valid configuration of a model far larger than the stored parameters (vocab 2^24,
     * d_model 16384, 64 heads: 2^38 embedding floats): refused by the count before any model
     * of it is made (making one first failed for memory, or aborted under ASan) */
    memcpy(copy, img, n);
    const int32_t forged[][2] = {{16, 1 << 24}, {20, 16384}, {28, 64}, {32, 64}};
    for (size_t f = 0; f < sizeof forged / sizeof forged[0]; f++)
        for (int i = 0; i < 4; i++)
            copy[forged[f][0] + i] = (unsigned char)((uint32_t)forged[f][1] >> (8 * i));
    rehash(copy, n);
    write_bytes(bad, copy, n);
    expect_refused(bad, "parameters stored", "forged configuration of a huge model");
    memcpy(copy, img, n);
    poke(copy, n + 16, n, 0, 16);
    write_bytes(bad, copy, n + 16);
    expect_refused(bad, "trailing data", "trailing bytes");

    /* a caller's section larger than the caller expects */
    model *m2 = new_model(ATTN_DENSE, 5);
    char big[100];
    memset(big, 'x', sizeof big);
    ck_assert(checkpoint_save(m2, &opt_settings, big, sizeof big, bad, err, sizeof err) == 0);
    model_destroy(m2);
    expect_refused(bad, "more than the 8", "large caller's section");

    /* the good file still loads */
    model *ok = NULL;
    adamw_config o;
    char got[8];
    ck_assert_msg(checkpoint_load(good, B, 1, &ok, &o, got, sizeof got, NULL, err, sizeof err) ==
                  0, "%s", err);
    model_destroy(ok);
    free(img);
    free(copy);
    unlink(good);
    unlink(bad);
    rmdir(dir);
}
END_TEST

START_TEST(save_errors)
{
    model *m = new_model(ATTN_SWA, 1);
    char err[512] = "";
    ck_assert_int_eq(checkpoint_save(m, &opt_settings, NULL, 0, "/nonexistent-dir/x.ckpt", err,
                                     sizeof err), -1);
    ck_assert_msg(strstr(err, "cannot write"), "%s", err);
    const char *never = "/tmp/dmattn-never-written.ckpt";
    ck_assert_int_eq(checkpoint_save(m, &opt_settings, "x", CHECKPOINT_USER_MAX + 1, never, err,
                                     sizeof err), -1);
    ck_assert_msg(strstr(err, "at most"), "%s", err);
    ck_assert_int_eq(access(never, F_OK), -1);
    model_destroy(m);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("checkpoint");
    TCase *tc = tcase_create("checkpoint");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, round_trip);
    tcase_add_test(tc, resume_is_exact_dense);
    tcase_add_test(tc, resume_is_exact_swa);
    tcase_add_test(tc, resume_is_exact_dma);
    tcase_add_test(tc, bad_files_load_nothing);
    tcase_add_test(tc, save_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(suite()); }

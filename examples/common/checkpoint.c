/* checkpoint.c - the checkpoint file of checkpoint.h: writing, and loading with every check. */
#include "checkpoint.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAGIC "DMATRAIN"
#define FIXED_BYTES 116 /* from offset 16 to the caller's section */
#define USER_OFFSET 132

static uint64_t fnv1a(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* ---- little-endian encoding, whatever the host's byte order ---- */

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put_f32(uint8_t *p, float f)
{
    uint32_t v;
    memcpy(&v, &f, 4);
    put_u32(p, v);
}
static uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}
static float get_f32(const uint8_t *p)
{
    uint32_t v = get_u32(p);
    float f;
    memcpy(&f, &v, 4);
    return f;
}
static void put_floats(uint8_t *p, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        put_f32(p + 4 * i, x[i]);
}
static void get_floats(float *x, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = get_f32(p + 4 * i);
}

/* The fixed header (offsets 0 .. USER_OFFSET) of a configuration. */
static void put_header(uint8_t *h, const model_config *c, const adamw_config *o, int64_t step,
                       uint64_t n_params, uint32_t user_bytes)
{
    memcpy(h, MAGIC, 8);
    put_u32(h + 8, CHECKPOINT_VERSION);
    put_u32(h + 12, FIXED_BYTES);
    const int32_t ints[12] = {c->vocab, c->d_model, c->n_layers, c->n_heads, c->n_kv_heads,
                              c->d_ff, c->max_seq, (int32_t)c->attn, c->window, c->attn_only,
                              c->tie_embeddings, c->pos_embeddings};
    for (int i = 0; i < 12; i++)
        put_u32(h + 16 + 4 * i, (uint32_t)ints[i]);
    put_f32(h + 64, c->rope_theta);
    put_f32(h + 68, c->norm_eps);
    put_f32(h + 72, c->init_std);
    const float of[7] = {o->lr, o->min_lr, o->beta1, o->beta2, o->eps, o->weight_decay,
                         o->grad_clip};
    for (int i = 0; i < 7; i++)
        put_f32(h + 76 + 4 * i, of[i]);
    put_u32(h + 104, (uint32_t)o->warmup_steps);
    put_u32(h + 108, (uint32_t)o->total_steps);
    put_u64(h + 112, (uint64_t)step);
    put_u64(h + 120, n_params);
    put_u32(h + 128, user_bytes);
}

int checkpoint_save(const model *m, const adamw_config *opt, const void *user,
                    uint32_t user_bytes, const char *path, char *err, size_t errlen)
{
    if (!m || !opt || !path || (user_bytes && !user)) {
        snprintf(err, errlen, "checkpoint_save: model, optimizer and path are required");
        return -1;
    }
    if (user_bytes > CHECKPOINT_USER_MAX) {
        snprintf(err, errlen, "checkpoint_save: the caller's section has %u bytes, at most %d",
                 user_bytes, CHECKPOINT_USER_MAX);
        return -1;
    }
    const size_t n = m->n_params;
    const size_t total = USER_OFFSET + user_bytes + 12 * n + 8;
    uint8_t *buf = malloc(total);
    if (!buf) {
        snprintf(err, errlen, "checkpoint_save: out of memory for %zu bytes", total);
        return -1;
    }
    put_header(buf, &m->cfg, opt, m->step, n, user_bytes);
    if (user_bytes)
        memcpy(buf + USER_OFFSET, user, user_bytes);
    uint8_t *p = buf + USER_OFFSET + user_bytes;
    put_floats(p, m->params, n);
    put_floats(p + 4 * n, m->adam_m, n);
    put_floats(p + 8 * n, m->adam_v, n);
    put_u64(buf + total - 8, fnv1a(buf, total - 8));

    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) {
        free(buf);
        snprintf(err, errlen, "checkpoint_save: out of memory");
        return -1;
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE *f = fopen(tmp, "wb");
    int ok = f && fwrite(buf, 1, total, f) == total;
    int saved_errno = errno;
    if (f && fclose(f) != 0 && ok) {
        ok = 0;
        saved_errno = errno;
    }
    if (ok && rename(tmp, path) != 0) {
        ok = 0;
        saved_errno = errno;
    }
    if (!ok) {
        snprintf(err, errlen, "checkpoint_save: cannot write %s: %s", path,
                 strerror(saved_errno));
        remove(tmp);
    }
    free(tmp);
    free(buf);
    return ok ? 0 : -1;
}

/* Read a whole file; NULL with err set when it cannot be read. */
static uint8_t *read_file(const char *path, size_t *size, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "checkpoint %s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    uint8_t *buf = malloc(cap);
    while (buf) {
        len += fread(buf + len, 1, cap - len, f);
        if (len < cap)
            break;
        uint8_t *bigger = cap <= SIZE_MAX / 2 ? realloc(buf, cap * 2) : NULL;
        if (!bigger) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    int bad = !buf || ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        snprintf(err, errlen, "checkpoint %s: cannot read it (I/O error or out of memory)",
                 path);
        return NULL;
    }
    *size = len;
    return buf;
}

int checkpoint_load(const char *path, int max_batch, int threads, model **out,
                    adamw_config *opt, void *user, uint32_t user_capacity, uint32_t *user_bytes,
                    char *err, size_t errlen)
{
    if (!path || !out || !opt) {
        snprintf(err, errlen, "checkpoint_load: path, out and opt are required");
        return -1;
    }
    size_t size = 0;
    uint8_t *buf = read_file(path, &size, err, errlen);
    if (!buf)
        return -1;
    char why[400];
    int rc = -1;
    model *m = NULL;
#define BAD(...)                                                                              \
    do {                                                                                      \
        snprintf(why, sizeof why, __VA_ARGS__);                                               \
        goto bad;                                                                             \
    } while (0)
    if (size < 8 || memcmp(buf, MAGIC, 8) != 0)
        BAD("not a dmattn training checkpoint (no \"" MAGIC "\" magic)");
    if (size < USER_OFFSET + 8)
        BAD("truncated: %zu bytes, shorter than the %d-byte header", size, USER_OFFSET + 8);
    if (get_u32(buf + 8) != CHECKPOINT_VERSION)
        BAD("format version %u; this program reads version %d", get_u32(buf + 8),
            CHECKPOINT_VERSION);
    if (get_u32(buf + 12) != FIXED_BYTES)
        BAD("header size %u, expected %d", get_u32(buf + 12), FIXED_BYTES);
    model_config c = {0};
    int32_t ints[12];
    for (int i = 0; i < 12; i++)
        ints[i] = (int32_t)get_u32(buf + 16 + 4 * i);
    c.vocab = ints[0], c.d_model = ints[1], c.n_layers = ints[2], c.n_heads = ints[3];
    c.n_kv_heads = ints[4], c.d_ff = ints[5], c.max_seq = ints[6], c.attn = (attn_kind)ints[7];
    c.window = ints[8], c.attn_only = ints[9], c.tie_embeddings = ints[10];
    c.pos_embeddings = ints[11];
    c.rope_theta = get_f32(buf + 64);
    c.norm_eps = get_f32(buf + 68);
    c.init_std = get_f32(buf + 72);
    char cfg_err[256];
    if (model_config_check(&c, cfg_err, sizeof cfg_err))
        BAD("bad model configuration: %s", cfg_err);
    adamw_config o = {.lr = get_f32(buf + 76), .min_lr = get_f32(buf + 80),
                      .beta1 = get_f32(buf + 84), .beta2 = get_f32(buf + 88),
                      .eps = get_f32(buf + 92), .weight_decay = get_f32(buf + 96),
                      .grad_clip = get_f32(buf + 100),
                      .warmup_steps = (int32_t)get_u32(buf + 104),
                      .total_steps = (int32_t)get_u32(buf + 108)};
    if (adamw_config_check(&o, cfg_err, sizeof cfg_err))
        BAD("bad optimizer settings: %s", cfg_err);
    const int64_t step = (int64_t)get_u64(buf + 112);
    if (step < 0)
        BAD("negative step count %lld", (long long)step);
    const uint64_t n = get_u64(buf + 120);
    const uint32_t ub = get_u32(buf + 128);
    if (ub > CHECKPOINT_USER_MAX)
        BAD("the caller's section claims %u bytes, at most %d", ub, CHECKPOINT_USER_MAX);
    if (n > (SIZE_MAX - USER_OFFSET - CHECKPOINT_USER_MAX - 8) / 12)
        BAD("parameter count %llu is impossible", (unsigned long long)n);
    const size_t expect = USER_OFFSET + ub + 12 * (size_t)n + 8;
    if (size < expect)
        BAD("truncated: %zu bytes, the header promises %zu", size, expect);
    if (size > expect)
        BAD("%zu bytes of trailing data after the %zu the header promises", size - expect,
            expect);
    if (get_u64(buf + size - 8) != fnv1a(buf, size - 8))
        BAD("checksum mismatch: the file is corrupted");
    if (ub > user_capacity || (ub && !user))
        BAD("its own section has %u bytes, more than the %u this program expects", ub,
            user_capacity);
    /* The configuration must describe the stored parameters before a model of it is made (a
     * forged configuration must not size an allocation). */
    if (model_param_count(&c) != n)
        BAD("%llu parameters stored, but its configuration has %zu", (unsigned long long)n,
            model_param_count(&c));
    if (model_create(&c, max_batch, threads, 0, &m, cfg_err, sizeof cfg_err))
        BAD("%s", cfg_err);
    const uint8_t *p = buf + USER_OFFSET + ub;
    get_floats(m->params, p, n);
    get_floats(m->adam_m, p + 4 * n, n);
    get_floats(m->adam_v, p + 8 * n, n);
    m->step = step;
    if (ub)
        memcpy(user, buf + USER_OFFSET, ub);
    if (user_bytes)
        *user_bytes = ub;
    *opt = o;
    *out = m;
    m = NULL;
    rc = 0;
    goto done;
bad:
    snprintf(err, errlen, "checkpoint %s: %s", path, why);
done:
#undef BAD
    model_destroy(m);
    free(buf);
    return rc;
}

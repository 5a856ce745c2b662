/* niah_data.c - the needle-in-a-haystack generator (see niah_data.h). */
#include "niah_data.h"

#include <math.h>
#include <stdio.h>

#include "prng.h"

/* Salts that keep an example's needle/haystack draws apart from the stream's sentence bank. */
#define SALT_SENTENCES 0x5e9735a1c3b2d4e7ull

static int filler_end(const niah_config *c) { return c->vocab / 2; }
static int key_end(const niah_config *c) { return filler_end(c) + (c->vocab - filler_end(c)) / 2; }

int niah_haystack_len(const niah_config *c) { return c->seq_len - c->key_len - c->value_len; }

int niah_check(const niah_config *c, char *err, size_t errlen)
{
    const char *why = NULL;
    const int64_t needle = (int64_t)c->key_len + c->value_len;
    if (c->key_len < 1 || c->value_len < 1 || c->key_len > 64 || c->value_len > 64)
        why = "key_len and value_len must be 1 .. 64";
    else if (c->seq_len > (1 << 24) || c->seq_len < 2 * needle)
        why = "the sequence must hold a haystack of at least one needle and the query (L >= "
              "2 (key_len + value_len)), L <= 2^24";
    else if (c->vocab < 8 || c->vocab > (1 << 24))
        why = "the vocabulary must be 8 .. 2^24";
    else if (key_end(c) - filler_end(c) < 2 || c->vocab - key_end(c) < 2 ||
             key_end(c) - filler_end(c) < c->key_len || c->vocab - key_end(c) < c->value_len)
        why = "the key and value ranges (a quarter of the vocabulary each) need at least 2 "
              "tokens each, and as many as key_len and value_len (the needle's tokens are "
              "distinct)";
    else if (c->sentences < 0 || c->sentences > 4096 ||
             (c->sentences > 0 && (c->sentence_len < 1 || c->sentence_len > 4096)))
        why = "sentences must be 0 .. 4096, and sentence_len 1 .. 4096 when sentences > 0";
    if (why)
        snprintf(err, errlen, "niah: %s (L %d, key %d, value %d, vocab %d, sentences %d x %d)",
                 why, c->seq_len, c->key_len, c->value_len, c->vocab, c->sentences,
                 c->sentence_len);
    return why ? -1 : 0;
}

int niah_needle_pos(const niah_config *c, double depth)
{
    const int room = niah_haystack_len(c) - c->key_len - c->value_len;
    if (!(depth > 0.0))
        return 0;
    if (depth >= 1.0)
        return room;
    return (int)lround(depth * room);
}

/* Token j of sentence s of the stream's bank: a function of (seed, s, j) only. */
static int32_t sentence_token(const niah_config *c, uint64_t seed, int s, int j)
{
    prng r = prng_seeded(seed ^ SALT_SENTENCES, (uint64_t)s * 4099u + (uint64_t)j);
    return 1 + (int32_t)prng_below(&r, (uint32_t)(filler_end(c) - 1));
}

/* n distinct tokens drawn uniformly from [lo, hi) (n <= hi - lo, and n <= 64). */
static void draw_distinct(prng *r, int32_t *out, int n, int lo, int hi)
{
    for (int i = 0; i < n; i++) {
        int32_t t;
        int fresh;
        do {
            t = lo + (int32_t)prng_below(r, (uint32_t)(hi - lo));
            fresh = 1;
            for (int j = 0; j < i; j++)
                fresh &= out[j] != t;
        } while (!fresh);
        out[i] = t;
    }
}

int niah_example(const niah_config *c, uint64_t seed, uint64_t index, double depth,
                 int32_t *tokens, int32_t *labels)
{
    prng r = prng_seeded(seed, index);
    const int H = niah_haystack_len(c), L = c->seq_len;
    const int nf = filler_end(c) - 1, ke = key_end(c);
    /* Haystack: random filler, or whole sentences drawn from the bank (the last one cut). */
    for (int t = 0; t < H;) {
        if (c->sentences == 0) {
            tokens[t++] = 1 + (int32_t)prng_below(&r, (uint32_t)nf);
            continue;
        }
        const int s = (int)prng_below(&r, (uint32_t)c->sentences);
        for (int j = 0; j < c->sentence_len && t < H; j++)
            tokens[t++] = sentence_token(c, seed, s, j);
    }
    /* A random depth is uniform, with about 5.6% of the draws at each end exactly: the needle
     * right at the start or right before the query is otherwise almost never trained on. */
    if (depth < 0.0)
        depth = fmin(1.0, fmax(0.0, (prng_unit(&r) - 0.05) / 0.9));
    /* The needle: its key tokens, then its value tokens, distinct within each (a repeated
     * token would make "the token after this one" ambiguous, and exact retrieval impossible). */
    const int pos = niah_needle_pos(c, depth);
    draw_distinct(&r, tokens + pos, c->key_len, filler_end(c), ke);
    draw_distinct(&r, tokens + pos + c->key_len, c->value_len, ke, c->vocab);
    /* The query: the key again, then the value as the answer. */
    for (int i = 0; i < c->key_len + c->value_len; i++)
        tokens[H + i] = tokens[pos + i];
    for (int t = 0; t < L; t++)
        labels[t] = -1;
    for (int i = 0; i < c->value_len; i++)
        labels[H + c->key_len - 1 + i] = tokens[H + c->key_len + i];
    return pos;
}

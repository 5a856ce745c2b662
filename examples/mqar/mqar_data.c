/* mqar_data.c - the MQAR generator (see mqar_data.h). */
#include "mqar_data.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "prng.h"

int mqar_check(const mqar_config *c, char *err, size_t errlen)
{
    const char *why = NULL;
    if (c->seq_len < 4 || c->seq_len % 2 != 0 || c->seq_len > (1 << 20))
        why = "the sequence length must be even, 4 .. 2^20";
    else if (c->kv < 1 || 4 * (int64_t)c->kv > c->seq_len)
        why = "kv must be >= 1, with 4 kv <= the sequence length (the pairs and a slot per query)";
    else if (c->vocab <= c->seq_len || c->vocab > (1 << 24))
        why = "the vocabulary must be larger than the sequence length (Zoology's rule), <= 2^24";
    else if (c->vocab / 2 - 1 < c->kv)
        why = "the vocabulary needs at least kv keys (V/2 - 1 >= kv)";
    else if (!(c->power_a > 0.0f && c->power_a <= 1.0f))
        why = "power_a must be in (0, 1]";
    if (why)
        snprintf(err, errlen, "mqar: %s (L %d, kv %d, vocab %d, power_a %g)", why, c->seq_len,
                 c->kv, c->vocab, (double)c->power_a);
    return why ? -1 : 0;
}

int mqar_slots(const mqar_config *c) { return (c->seq_len - 2 * c->kv) / 2; }

/* k distinct integers of [lo, lo + n), uniformly (a partial Fisher-Yates over a pool). */
static void distinct(prng *r, int32_t lo, int32_t n, int k, int32_t *out, int32_t *pool)
{
    for (int i = 0; i < n; i++)
        pool[i] = lo + i;
    for (int i = 0; i < k; i++) {
        int j = i + (int)prng_below(r, (uint32_t)(n - i));
        int32_t t = pool[i];
        pool[i] = pool[j];
        pool[j] = t;
        out[i] = pool[i];
    }
}

struct mqar_gen {
    mqar_config c;
    int32_t *pool, *keys, *vals, *gaps;
    double *w;
};

int mqar_gen_create(const mqar_config *c, mqar_gen **out, char *err, size_t errlen)
{
    if (mqar_check(c, err, errlen))
        return -1;
    /* The pool holds the larger of the value range (V - V/2 tokens: odd V has one more value
     * than keys) and the gap slots. */
    const int values = c->vocab - c->vocab / 2, slots = mqar_slots(c);
    mqar_gen *g = calloc(1, sizeof *g);
    if (g) {
        g->c = *c;
        g->pool = malloc(sizeof(int32_t) * (size_t)(values > slots ? values : slots));
        g->keys = malloc(sizeof(int32_t) * (size_t)c->kv);
        g->vals = malloc(sizeof(int32_t) * (size_t)c->kv);
        g->gaps = malloc(sizeof(int32_t) * (size_t)c->kv);
        g->w = malloc(sizeof(double) * (size_t)slots);
    }
    if (!g || !g->pool || !g->keys || !g->vals || !g->gaps || !g->w) {
        mqar_gen_destroy(g);
        snprintf(err, errlen, "mqar: out of memory");
        return -1;
    }
    *out = g;
    return 0;
}

void mqar_gen_destroy(mqar_gen *g)
{
    if (!g)
        return;
    free(g->pool);
    free(g->keys);
    free(g->vals);
    free(g->gaps);
    free(g->w);
    free(g);
}

void mqar_example(mqar_gen *gen, uint64_t seed, uint64_t index, int32_t *tokens, int32_t *labels,
                  int32_t *gaps_out)
{
    const mqar_config *c = &gen->c;
    const int L = c->seq_len, kv = c->kv, V = c->vocab, half = V / 2, slots = mqar_slots(c);
    int32_t *keys = gen->keys, *vals = gen->vals, *gaps = gen->gaps;
    double *w = gen->w;
    prng r = prng_seeded(seed, index);
    distinct(&r, 1, half - 1, kv, keys, gen->pool);
    distinct(&r, half, V - half, kv, vals, gen->pool);

    /* Gaps: kv slots without replacement, slot g with weight (g + 1)^(a - 1), each draw from
     * what is left (as numpy's choice(replace=False, p=...) draws them). */
    double total = 0.0;
    for (int g = 0; g < slots; g++)
        total += (w[g] = pow(g + 1.0, (double)c->power_a - 1.0));
    for (int i = 0; i < kv; i++) {
        double u = prng_unit(&r) * total, acc = 0.0;
        int g = 0, last = -1;
        for (; g < slots; g++) {
            if (w[g] == 0.0)
                continue;
            last = g;
            acc += w[g];
            if (u < acc)
                break;
        }
        if (g == slots) /* rounding at the very end of the range */
            g = last;
        gaps[i] = g;
        total -= w[g];
        w[g] = 0.0;
    }

    for (int t = 0; t < L; t++) {
        tokens[t] = (int32_t)prng_below(&r, (uint32_t)V); /* filler, overwritten below */
        labels[t] = -1;
    }
    for (int i = 0; i < kv; i++) {
        tokens[2 * i] = keys[i];
        tokens[2 * i + 1] = vals[i];
        const int q = 2 * kv + 2 * gaps[i];
        tokens[q] = keys[i];
        labels[q] = vals[i];
    }
    if (gaps_out)
        for (int i = 0; i < kv; i++)
            gaps_out[i] = gaps[i];
}

/*
 * mqar_data.h - multi-query associative recall (MQAR) sequences as Zoology defines them
 * (Arora, Eyuboglu et al., "Zoology: measuring and improving recall in efficient language
 * models", 2023; its multiquery_ar generator), generated in C.
 *
 * The vocabulary is split in two: keys are tokens 1 .. V/2 - 1, values V/2 .. V - 1. A sequence
 * of L tokens holds
 *   - at positions 0 .. 2kv - 1: kv pairs "key value", the kv keys distinct and the kv values
 *     distinct, each drawn uniformly;
 *   - after them, (L - 2kv) / 2 two-token slots; kv of the slots, drawn without replacement with
 *     probability proportional to (g + 1)^(a - 1) for slot g (a power law: a = 0.01 puts most
 *     queries close to the pairs), start with a query: the key of one pair (each key queried
 *     once, in pair order);
 *   - every other position: a random token of the whole vocabulary.
 * The label of a query's position is its pair's value (the next token a model must predict);
 * every other position has label -1 (ignored).
 * Example i of stream `seed` is a pure function of (seed, i), so a data stream can be restarted
 * at any example, and train and test use different seeds.
 */
#ifndef MQAR_DATA_H
#define MQAR_DATA_H

#include <stddef.h>
#include <stdint.h>

typedef struct mqar_config {
    int seq_len;   /* L: even, > 2 kv + 2 kv (pairs, and a slot per query) */
    int kv;        /* key-value pairs (and queries) per sequence, >= 1 */
    int vocab;     /* V: > seq_len, and V/2 - 1 >= kv keys */
    float power_a; /* the gap law's exponent a, in (0, 1]; 1 is uniform. Zoology: 0.01 */
} mqar_config;

/** 0 if the configuration can generate sequences; otherwise -1 and a sentence in err. */
int mqar_check(const mqar_config *c, char *err, size_t errlen);

/** Slots (query places) after the pairs: (L - 2 kv) / 2. */
int mqar_slots(const mqar_config *c);

/** A generator: the configuration and its scratch (one per thread). */
typedef struct mqar_gen mqar_gen;

/** 0 and a generator, or -1 with a sentence in err (a bad configuration, out of memory). */
int mqar_gen_create(const mqar_config *c, mqar_gen **out, char *err, size_t errlen);
void mqar_gen_destroy(mqar_gen *g);

/** Example `index` of stream `seed`: tokens[L], labels[L] (-1 where nothing is asked), and,
 *  when `gaps` is not NULL, the slot of each pair's query (gaps[kv]). */
void mqar_example(mqar_gen *g, uint64_t seed, uint64_t index, int32_t *tokens, int32_t *labels,
                  int32_t *gaps);

#endif /* MQAR_DATA_H */

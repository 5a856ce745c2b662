/*
 * niah_data.h - needle-in-a-haystack sequences (passkey style), generated in C.
 *
 * The vocabulary V is split in three ranges: filler tokens 1 .. F - 1, key tokens F .. K - 1,
 * value tokens K .. V - 1 (token 0 is never used), with F = V / 2 and K = F + (V - F) / 2. A
 * sequence of L tokens is
 *   - a haystack of L - key_len - value_len filler tokens: random ones, or (sentences > 0) a
 *     random succession of `sentences` filler "sentences" of sentence_len tokens, the sentences
 *     themselves a function of the stream's seed;
 *   - with one needle written over the haystack: key_len distinct key tokens then value_len
 *     distinct value tokens, starting at round(depth * (H - N)), H the haystack length,
 *     N = key_len + value_len;
 *   - then, at the end, the query: the needle's key again, followed by its value as the answer.
 * Labels: the answer's value tokens, each at the position before it (the next token a model must
 * predict: the query's last key token is labelled with the first value token, ...); every other
 * position has label -1. Filler never uses a key or value token, so the needle is in the
 * haystack exactly once. Example i of stream `seed` is a pure function of (seed, i, depth).
 */
#ifndef NIAH_DATA_H
#define NIAH_DATA_H

#include <stddef.h>
#include <stdint.h>

typedef struct niah_config {
    int seq_len;      /* L: room for the haystack (>= one needle) and the query */
    int key_len;      /* tokens of the needle's key (>= 1) */
    int value_len;    /* tokens of the needle's value (>= 1) */
    int vocab;        /* V >= 8, each range large enough for distinct key and value tokens */
    int sentences;    /* 0: random filler tokens; > 0: that many filler sentences, repeated */
    int sentence_len; /* tokens per sentence (>= 1 when sentences > 0) */
} niah_config;

/** 0 if the configuration can generate sequences; otherwise -1 and a sentence in err. */
int niah_check(const niah_config *c, char *err, size_t errlen);

/** Haystack length L - key_len - value_len, and the first position of the query. */
int niah_haystack_len(const niah_config *c);

/** The position where the needle starts for a depth in [0, 1]. */
int niah_needle_pos(const niah_config *c, double depth);

/**
 * Example `index` of stream `seed` with the needle at `depth` (0 = the start of the haystack,
 * 1 = its end; a negative depth draws one from the example's own randomness, for training:
 * uniform, with about 5.6% of the draws exactly at each end): tokens[L] and labels[L]. The configuration must pass niah_check(). Returns the
 * needle's start position.
 */
int niah_example(const niah_config *c, uint64_t seed, uint64_t index, double depth,
                 int32_t *tokens, int32_t *labels);

#endif /* NIAH_DATA_H */

/*
 * test_mqar.c - the MQAR generator (examples/mqar/mqar_data.h) against Zoology's definition:
 * every labelled query's label is the value paired with its key, every key appears once in the
 * prefix, the pairs come first, labels sit only on the queries, the query gaps follow the power
 * law, streams are reproducible and different seeds give different data.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "mqar_data.h"

static mqar_gen *gen_for(mqar_config c)
{
    mqar_gen *g = NULL;
    char err[256];
    ck_assert_msg(mqar_gen_create(&c, &g, err, sizeof err) == 0, "%s", err);
    return g;
}

static void check_structure(mqar_config c, uint64_t seed, int examples)
{
    mqar_gen *g = gen_for(c);
    const int L = c.seq_len, kv = c.kv, half = c.vocab / 2;
    int32_t *tok = test_malloc(sizeof(int32_t) * L), *lab = test_malloc(sizeof(int32_t) * L);
    int32_t *gaps = test_malloc(sizeof(int32_t) * kv);
    int32_t *value_of = test_malloc(sizeof(int32_t) * c.vocab); /* key -> value, -1 */
    int32_t *seen = test_malloc(sizeof(int32_t) * c.vocab);
    for (int e = 0; e < examples; e++) {
        mqar_example(g, seed, (uint64_t)e, tok, lab, gaps);
        for (int v = 0; v < c.vocab; v++)
            value_of[v] = -1, seen[v] = 0;
        /* the prefix: kv pairs, keys in [1, V/2), values in [V/2, V), each key once */
        for (int i = 0; i < kv; i++) {
            int32_t k = tok[2 * i], v = tok[2 * i + 1];
            REQUIRE(k >= 1 && k < half, "example %d pair %d: key %d outside the key range", e,
                    i, k);
            REQUIRE(v >= half && v < c.vocab, "example %d pair %d: value %d outside the value "
                    "range", e, i, v);
            REQUIRE(value_of[k] == -1, "example %d: key %d appears twice in the prefix", e, k);
            REQUIRE(!seen[v], "example %d: value %d appears twice in the prefix", e, v);
            value_of[k] = v;
            seen[v] = 1;
            REQUIRE(lab[2 * i] == -1 && lab[2 * i + 1] == -1, "no label in the prefix");
        }
        /* labels: exactly kv, each at a query of a prefix key, labelled with its value */
        int labelled = 0;
        for (int t = 2 * kv; t < L; t++) {
            if (lab[t] < 0) {
                REQUIRE(lab[t] == -1, "an unlabelled position holds -1");
                REQUIRE(tok[t] >= 0 && tok[t] < c.vocab, "filler token in range");
                continue;
            }
            labelled++;
            REQUIRE((t - 2 * kv) % 2 == 0, "example %d: a query at odd offset %d", e, t);
            REQUIRE(tok[t] >= 1 && tok[t] < half && value_of[tok[t]] >= 0,
                    "example %d: the query at %d (token %d) is not a key of the prefix", e, t,
                    tok[t]);
            REQUIRE(lab[t] == value_of[tok[t]], "example %d: query %d of key %d is labelled %d, "
                    "its value is %d", e, t, tok[t], lab[t], value_of[tok[t]]);
            value_of[tok[t]] = -2; /* each key is queried once */
        }
        REQUIRE(labelled == kv, "example %d: %d labels, expected %d", e, labelled, kv);
        for (int i = 0; i < kv; i++) {
            REQUIRE(gaps[i] >= 0 && gaps[i] < mqar_slots(&c), "gap in range");
            REQUIRE(lab[2 * kv + 2 * gaps[i]] == tok[2 * i + 1], "pair %d is asked at its gap",
                    i);
        }
    }
    free(tok); free(lab); free(gaps); free(value_of); free(seen);
    mqar_gen_destroy(g);
}

START_TEST(queries_recall_their_pairs)
{
    check_structure((mqar_config){256, 8, 8192, 0.01f}, 1, 200);
    check_structure((mqar_config){256, 64, 8192, 0.01f}, 2, 50);  /* kv = slots: all taken */
    check_structure((mqar_config){128, 16, 1024, 0.01f}, 3, 100);
    check_structure((mqar_config){64, 4, 100, 1.0f}, 4, 200);    /* uniform gaps */
}
END_TEST

/* kv = 1: the one gap is drawn with probability (g + 1)^(a - 1) / sum; the histogram of many
 * examples must follow it (each bin within 5 standard deviations) and fall like the power law. */
START_TEST(gaps_follow_the_power_law)
{
    const mqar_config c = {256, 1, 8192, 0.01f};
    const int slots = mqar_slots(&c), n = 200000;
    mqar_gen *g = gen_for(c);
    int32_t tok[256], lab[256], gap;
    long *hist = test_calloc((size_t)slots, sizeof(long));
    for (int e = 0; e < n; e++) {
        mqar_example(g, 99, (uint64_t)e, tok, lab, &gap);
        hist[gap]++;
    }
    double total = 0.0;
    for (int s = 0; s < slots; s++)
        total += pow(s + 1.0, c.power_a - 1.0);
    for (int s = 0; s < slots; s++) {
        double p = pow(s + 1.0, c.power_a - 1.0) / total, mean = n * p;
        double sd = sqrt(n * p * (1 - p));
        REQUIRE(fabs(hist[s] - mean) <= 5 * sd + 1, "slot %d: %ld draws, expected %.1f +- %.1f",
                s, hist[s], mean, sd);
    }
    /* the shape: log-log slope of the binned counts near a - 1 = -0.99 */
    double lo = 0, hi = 0;
    for (int s = 3; s < 7; s++)
        lo += hist[s];
    for (int s = 39; s < 79; s++)
        hi += hist[s];
    double slope = log((hi / 40) / (lo / 4)) / log(58.5 / 5.5); /* bin centres 5.5 and 58.5 */
    ck_assert_msg(slope < -0.85 && slope > -1.15, "log-log slope %.3f, expected about -0.99",
                  slope);
    free(hist);
    mqar_gen_destroy(g);
}
END_TEST

START_TEST(streams_are_reproducible_and_seeds_differ)
{
    const mqar_config c = {256, 16, 8192, 0.01f};
    mqar_gen *g = gen_for(c);
    int32_t a[256], la[256], b[256], lb[256];
    mqar_example(g, 5, 17, a, la, NULL);
    mqar_example(g, 5, 3, b, lb, NULL);
    mqar_example(g, 5, 17, b, lb, NULL); /* after another example: the same again */
    ck_assert(memcmp(a, b, sizeof a) == 0 && memcmp(la, lb, sizeof la) == 0);
    int differ_seed = 0, differ_index = 0;
    for (int e = 0; e < 50; e++) {
        mqar_example(g, 5, (uint64_t)e, a, la, NULL);
        mqar_example(g, 6, (uint64_t)e, b, lb, NULL);
        differ_seed += memcmp(a, b, sizeof a) != 0;
        mqar_example(g, 5, (uint64_t)e + 1, b, lb, NULL);
        differ_index += memcmp(a, b, sizeof a) != 0;
    }
    ck_assert_int_eq(differ_seed, 50);
    ck_assert_int_eq(differ_index, 50);
    /* a train stream and a test stream share no sequence */
    mqar_example(g, 5, 0, a, la, NULL);
    for (int e = 0; e < 1000; e++) {
        mqar_example(g, 6, (uint64_t)e, b, lb, NULL);
        REQUIRE(memcmp(a, b, sizeof a) != 0, "test example %d equals a training one", e);
    }
    mqar_gen_destroy(g);
}
END_TEST

START_TEST(bad_configurations_are_refused)
{
    const mqar_config bad[] = {
        {255, 8, 8192, 0.01f},  /* odd length */
        {256, 0, 8192, 0.01f},  /* no pairs */
        {256, 65, 8192, 0.01f}, /* 4 kv > L: no room for the queries */
        {256, 8, 256, 0.01f},   /* the vocabulary must exceed L */
        {256, 8, 8192, 0.0f},   /* the exponent is in (0, 1] */
        {256, 8, 8192, 1.5f},
        {8, 2, 9, 0.5f},        /* V/2 - 1 = 3 keys: enough... */
    };
    for (size_t i = 0; i + 1 < sizeof bad / sizeof bad[0]; i++) {
        mqar_gen *g = (mqar_gen *)&bad; /* a sentinel: must stay as it is */
        char err[256] = "";
        ck_assert_int_eq(mqar_gen_create(&bad[i], &g, err, sizeof err), -1);
        ck_assert_msg(g == (mqar_gen *)&bad && strstr(err, "mqar: "), "case %zu: %s", i, err);
    }
    char err[256];
    ck_assert_int_eq(mqar_check(&bad[6], err, sizeof err), 0); /* ... for 2 pairs */
    const mqar_config too_few_keys = {10, 2, 11, 0.5f};      /* V/2 - 1 = 4 keys, fine */
    ck_assert_int_eq(mqar_check(&too_few_keys, err, sizeof err), 0);
    const mqar_config one_key = {4, 1, 5, 0.5f}; /* keys 1 .. 1 */
    ck_assert_int_eq(mqar_check(&one_key, err, sizeof err), 0);
    mqar_gen *g;
    ck_assert_int_eq(mqar_gen_create(&one_key, &g, err, sizeof err), 0);
    int32_t tok[4], lab[4];
    mqar_example(g, 1, 0, tok, lab, NULL);
    ck_assert(tok[0] == 1 && tok[1] == 2 && tok[2] == 1 && lab[2] == 2);
    mqar_gen_destroy(g);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("mqar");
    TCase *tc = tcase_create("generator");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, queries_recall_their_pairs);
    tcase_add_test(tc, gaps_follow_the_power_law);
    tcase_add_test(tc, streams_are_reproducible_and_seeds_differ);
    tcase_add_test(tc, bad_configurations_are_refused);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(suite()); }

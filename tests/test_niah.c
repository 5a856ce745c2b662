/*
 * test_niah.c - the needle-in-a-haystack generator (examples/niah/niah_data.h): the needle is in
 * the haystack exactly once, at the requested depth; the query repeats its key; labels sit only
 * on the answer and are the needle's value; filler never uses key or value tokens; sentence
 * haystacks repeat their bank; streams are reproducible and different seeds differ.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "niah_data.h"

static int occurrences(const int32_t *hay, int H, const int32_t *pat, int n, int *at)
{
    int count = 0;
    for (int t = 0; t + n <= H; t++)
        if (memcmp(hay + t, pat, sizeof(int32_t) * (size_t)n) == 0) {
            count++;
            *at = t;
        }
    return count;
}

static void check_example(const niah_config *c, uint64_t seed, uint64_t index, double depth)
{
    const int L = c->seq_len, H = niah_haystack_len(c), K = c->key_len, V = c->value_len;
    const int N = K + V, fe = c->vocab / 2, ke = fe + (c->vocab - fe) / 2;
    int32_t *tok = test_malloc(sizeof(int32_t) * (size_t)L);
    int32_t *lab = test_malloc(sizeof(int32_t) * (size_t)L);
    const int pos = niah_example(c, seed, index, depth, tok, lab);
    ck_assert_int_eq(H, L - N);
    /* The needle at the requested depth (within one needle length), inside the haystack. */
    REQUIRE(pos >= 0 && pos + N <= H, "needle at %d outside the haystack of %d", pos, H);
    if (depth >= 0.0) {
        const double want = depth * (H - N);
        REQUIRE(pos >= want - N && pos <= want + N, "depth %g: needle at %d, want about %g",
                depth, pos, want);
    }
    /* Key tokens then value tokens; every other haystack token is filler. */
    for (int t = 0; t < H; t++) {
        const int32_t x = tok[t];
        if (t >= pos && t < pos + K)
            REQUIRE(x >= fe && x < ke, "needle key token %d at %d not a key token", x, t);
        else if (t >= pos + K && t < pos + N)
            REQUIRE(x >= ke && x < c->vocab, "needle value token %d at %d", x, t);
        else
            REQUIRE(x >= 1 && x < fe, "haystack token %d at %d is not filler", x, t);
    }
    /* The key's tokens are distinct, and so are the value's. */
    for (int i = 0; i < N; i++)
        for (int j = i + 1; j < (i < K ? K : N); j++)
            REQUIRE(tok[pos + i] != tok[pos + j], "needle tokens %d and %d repeat %d", i, j,
                    tok[pos + i]);
    /* Exactly once in the haystack (key run and whole needle). */
    int at = -1;
    REQUIRE(occurrences(tok, H, tok + pos, K, &at) == 1 && at == pos, "the key occurs again");
    REQUIRE(occurrences(tok, H, tok + pos, N, &at) == 1 && at == pos, "the needle occurs again");
    /* The query repeats the key, the answer is the value. */
    REQUIRE(memcmp(tok + H, tok + pos, sizeof(int32_t) * (size_t)N) == 0, "query != needle");
    /* Labels: only the answer, each the next token. */
    int labelled = 0;
    for (int t = 0; t < L; t++) {
        if (lab[t] < 0)
            continue;
        labelled++;
        REQUIRE(t >= H + K - 1 && t < H + K - 1 + V, "label at %d outside the answer", t);
        REQUIRE(t + 1 < L && lab[t] == tok[t + 1], "label at %d is not the next token", t);
        REQUIRE(lab[t] == tok[pos + K + (t - (H + K - 1))], "label at %d is not the value", t);
    }
    ck_assert_int_eq(labelled, V);
    free(tok);
    free(lab);
}

START_TEST(needle_once_at_depth_and_labels_on_the_answer)
{
    const niah_config configs[] = {
        {.seq_len = 1024, .key_len = 4, .value_len = 4, .vocab = 512},
        {.seq_len = 300, .key_len = 1, .value_len = 6, .vocab = 64, .sentences = 5,
         .sentence_len = 9},
        {.seq_len = 16, .key_len = 2, .value_len = 2, .vocab = 8},
        {.seq_len = 4000, .key_len = 8, .value_len = 3, .vocab = 8192, .sentences = 40,
         .sentence_len = 17},
    };
    char err[256];
    for (size_t ci = 0; ci < sizeof configs / sizeof configs[0]; ci++) {
        ck_assert_msg(niah_check(&configs[ci], err, sizeof err) == 0, "%s", err);
        for (int d = 0; d <= 10; d++)
            for (uint64_t i = 0; i < 5; i++)
                check_example(&configs[ci], 11 + ci, i, d / 10.0);
        for (uint64_t i = 0; i < 50; i++)
            check_example(&configs[ci], 12 + ci, i, -1.0);
    }
}
END_TEST

/* depth 0 and 1 are the haystack's two ends; a random depth covers the whole range. */
START_TEST(depths_span_the_haystack)
{
    const niah_config c = {.seq_len = 2048, .key_len = 4, .value_len = 4, .vocab = 1024};
    const int H = niah_haystack_len(&c), N = 8;
    ck_assert_int_eq(niah_needle_pos(&c, 0.0), 0);
    ck_assert_int_eq(niah_needle_pos(&c, 1.0), H - N);
    ck_assert_int_eq(niah_needle_pos(&c, 0.5), (H - N + 1) / 2);
    int32_t *tok = test_malloc(sizeof(int32_t) * 2048), *lab = test_malloc(sizeof(int32_t) * 2048);
    int lo = H, hi = 0, tenths[10] = {0};
    for (uint64_t i = 0; i < 400; i++) {
        int pos = niah_example(&c, 3, i, -1.0, tok, lab);
        lo = pos < lo ? pos : lo;
        hi = pos > hi ? pos : hi;
        tenths[pos * 10 / (H - N + 1)]++;
    }
    ck_assert_int_lt(lo, (H - N) / 20);
    ck_assert_int_gt(hi, (H - N) * 19 / 20);
    for (int k = 0; k < 10; k++) /* 36 expected per tenth, 58 in the two end tenths */
        ck_assert_msg(tenths[k] >= 15 && tenths[k] <= 80, "tenth %d holds %d of 400", k,
                      tenths[k]);
    int ends = 0; /* exactly at 0 or 1: 11.1% expected, 44 of 400 */
    for (uint64_t i = 0; i < 400; i++) {
        int pos = niah_example(&c, 3, i, -1.0, tok, lab);
        ends += pos == 0 || pos == H - N;
    }
    ck_assert_msg(ends >= 25 && ends <= 65, "%d of 400 needles at an end", ends);
    free(tok);
    free(lab);
}
END_TEST

/* A stream is a function of (seed, index, depth); other seeds give other haystacks and needles;
 * a sentence haystack is made of its bank's sentences only. */
START_TEST(streams_reproduce_and_seeds_differ)
{
    const niah_config c = {.seq_len = 512, .key_len = 3, .value_len = 3, .vocab = 256,
                           .sentences = 4, .sentence_len = 11};
    const niah_config r = {.seq_len = 512, .key_len = 3, .value_len = 3, .vocab = 256};
    int32_t a[512], b[512], la[512], lb[512];
    for (int mode = 0; mode < 2; mode++) {
        const niah_config *cc = mode ? &c : &r;
        niah_example(cc, 5, 7, 0.3, a, la);
        niah_example(cc, 5, 7, 0.3, b, lb);
        ck_assert(memcmp(a, b, sizeof a) == 0 && memcmp(la, lb, sizeof la) == 0);
        niah_example(cc, 6, 7, 0.3, b, lb);
        int differ = 0;
        for (int t = 0; t < niah_haystack_len(cc); t++)
            differ += a[t] != b[t];
        ck_assert_int_gt(differ, niah_haystack_len(cc) / 4);
        niah_example(cc, 5, 8, 0.3, b, lb);
        ck_assert(memcmp(a, b, sizeof a) != 0);
    }
    /* Sentence mode: the haystack (outside the needle) is a succession of the 4 sentences, so
     * it uses at most 4 x 11 distinct tokens, and every aligned 11-token piece recurs. */
    int pos = niah_example(&c, 9, 0, 0.9, a, la);
    int used[256] = {0}, distinct = 0;
    for (int t = 0; t < pos; t++)
        distinct += used[a[t]]++ == 0;
    ck_assert_int_le(distinct, 44);
    int repeated = 0;
    for (int s = 0; s + 11 <= pos && s < 110; s += 11)
        for (int u = s + 11; u + 11 <= pos; u += 11)
            if (memcmp(a + s, a + u, sizeof(int32_t) * 11) == 0) {
                repeated++;
                break;
            }
    ck_assert_int_ge(repeated, 5);
}
END_TEST

START_TEST(bad_configurations_are_refused)
{
    char err[256];
    const niah_config bad[] = {
        {.seq_len = 10, .key_len = 4, .value_len = 4, .vocab = 64},  /* no room */
        {.seq_len = 100, .key_len = 0, .value_len = 4, .vocab = 64}, /* empty key */
        {.seq_len = 100, .key_len = 2, .value_len = 2, .vocab = 6},  /* vocabulary too small */
        {.seq_len = 100, .key_len = 2, .value_len = 2, .vocab = 64, .sentences = 3},
        {.seq_len = 100, .key_len = 2, .value_len = 2, .vocab = 64, .sentences = -1},
        {.seq_len = 100, .key_len = 5, .value_len = 2, .vocab = 16}, /* 4 key tokens < 5 */
        {.seq_len = 100, .key_len = 2, .value_len = 5, .vocab = 16}, /* 4 value tokens < 5 */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        ck_assert_int_eq(niah_check(&bad[i], err, sizeof err), -1);
        ck_assert_msg(strncmp(err, "niah: ", 6) == 0, "message: %s", err);
    }
}
END_TEST

static Suite *niah_suite(void)
{
    Suite *s = suite_create("niah");
    TCase *tc = tcase_create("generator");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, needle_once_at_depth_and_labels_on_the_answer);
    tcase_add_test(tc, depths_span_the_haystack);
    tcase_add_test(tc, streams_reproduce_and_seeds_differ);
    tcase_add_test(tc, bad_configurations_are_refused);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run_suite(niah_suite()); }

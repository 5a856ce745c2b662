/* common.c - see common.h. */
#include "common.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

test_rng rng_make(uint64_t seed)
{
    test_rng r = {seed};
    return r;
}

uint64_t rng_u64(test_rng *r)
{
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double rng_unit(test_rng *r)
{
    return (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); /* 53 bits / 2^53 */
}

float rng_float(test_rng *r, float lo, float hi)
{
    return lo + (hi - lo) * (float)rng_unit(r);
}

int64_t rng_int(test_rng *r, int64_t lo, int64_t hi)
{
    uint64_t span = (uint64_t)(hi - lo) + 1u;
    return lo + (int64_t)(rng_u64(r) % span);
}

int64_t rng_pick(test_rng *r, const int64_t *values, int n)
{
    return values[rng_int(r, 0, n - 1)];
}

int rng_bernoulli(test_rng *r, double p)
{
    return rng_unit(r) < p;
}

int test_contexts_create(test_ctx list[TEST_MAX_CTX])
{
    static const dma_isa isas[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512, DMA_ISA_NEON};
    int n = 0;
    ck_assert_msg(dma_isa_supported(DMA_ISA_SCALAR), "the scalar path must always be supported");
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        if (!dma_isa_supported(isas[i]))
            continue;
        for (int threads = 1; threads <= 2; threads++) {
            dma_context_options opts;
            memset(&opts, 0, sizeof opts);
            opts.isa = isas[i];
            opts.threads = threads;
            dma_context *ctx = NULL;
            dma_status st = dma_context_create(&opts, &ctx);
            ck_assert_msg(st == DMA_OK && ctx != NULL,
                          "dma_context_create(isa=%s, threads=%d) failed: %s",
                          dma_isa_name(isas[i]), threads, dma_status_string(st));
            ck_assert_msg(dma_context_isa(ctx) == isas[i], "context isa %s, asked for %s",
                          dma_isa_name(dma_context_isa(ctx)), dma_isa_name(isas[i]));
            ck_assert_int_eq(dma_context_threads(ctx), threads);
            ck_assert_int_lt(n, TEST_MAX_CTX);
            list[n].ctx = ctx;
            list[n].isa = isas[i];
            list[n].threads = threads;
            n++;
        }
    }
    return n;
}

void test_contexts_destroy(test_ctx list[TEST_MAX_CTX], int n)
{
    for (int i = 0; i < n; i++)
        dma_context_destroy(list[i].ctx);
}

dma_context *test_scalar_context(void)
{
    dma_context_options opts;
    memset(&opts, 0, sizeof opts);
    opts.isa = DMA_ISA_SCALAR;
    opts.threads = 1;
    dma_context *ctx = NULL;
    dma_status st = dma_context_create(&opts, &ctx);
    ck_assert_msg(st == DMA_OK && ctx != NULL, "dma_context_create(scalar, 1) failed: %s",
                  dma_status_string(st));
    return ctx;
}

void *test_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    ck_assert_msg(p != NULL, "out of memory (%zu bytes)", n);
    return p;
}

void *test_calloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    ck_assert_msg(p != NULL, "out of memory (%zu x %zu bytes)", count, size);
    return p;
}

static unsigned char sentinel_byte(size_t i)
{
    return (unsigned char)(0xA5u ^ (i * 29u));
}

void fill_sentinel(void *p, size_t n)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        b[i] = sentinel_byte(i);
}

int is_sentinel(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != sentinel_byte(i))
            return 0;
    return 1;
}

const int64_t TEST_HEADS[4][2] = {{1, 1}, {4, 4}, {8, 2}, {4, 1}};
const int64_t TEST_DIMS[7] = {1, 16, 40, 64, 100, 128, 256};

void test_fit_work(double per_pair, int64_t *Lq, int64_t *Lk, double max_work)
{
    while (per_pair * (double)*Lq * (double)*Lk > max_work) {
        if (*Lq >= *Lk)
            *Lq = (*Lq + 1) / 2;
        else
            *Lk = (*Lk + 1) / 2;
    }
}

void test_random_mask(test_rng *r, double density, int64_t n, uint8_t **mask, uint8_t **sel)
{
    *mask = test_malloc((size_t)n);
    *sel = test_malloc((size_t)n);
    for (int64_t x = 0; x < n; x++) {
        (*mask)[x] = rng_bernoulli(r, density) ? (uint8_t)rng_int(r, 1, 3) : 0;
        (*sel)[x] = (*mask)[x] != 0;
    }
}

int test_run_suite(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* ---- 16-bit storage ---- */

uint16_t test_to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if (isnan(x))
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

uint16_t test_to_f16(float x)
{
    _Float16 h = (_Float16)x;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

float test_from_half(uint16_t h, dma_dtype dt)
{
    if (dt == DMA_BF16) {
        uint32_t u = (uint32_t)h << 16;
        float x;
        memcpy(&x, &u, 4);
        return x;
    }
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

/*
 * kernel_test.c - kernel_test.h's helpers.
 *
 * The SIMD tables are declared weak here, so that no DMATTN_HAVE_* define is needed: a table that
 * was not built is simply skipped (dma_isa_supported() says 0 for it).
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>

#include "kernel_test.h"

/* Weak references: NULL when the library was built without that ISA. */
extern const dma_kernels dma_kernels_avx2 __attribute__((weak));
extern const dma_kernels dma_kernels_avx512 __attribute__((weak));
extern const dma_kernels dma_kernels_neon __attribute__((weak));

int kernel_tables(table out[4])
{
    int n = 0;
    out[n++] = (table){DMA_ISA_SCALAR, &dma_kernels_scalar};
    const struct {
        dma_isa isa;
        const dma_kernels *k;
    } simd[] = {{DMA_ISA_AVX2, &dma_kernels_avx2},
                {DMA_ISA_AVX512, &dma_kernels_avx512},
                {DMA_ISA_NEON, &dma_kernels_neon}};
    for (size_t i = 0; i < sizeof simd / sizeof simd[0]; i++) {
        if (!dma_isa_supported(simd[i].isa))
            continue;
        ck_assert_msg(simd[i].k != NULL, "%s is supported but its table is not linked",
                      dma_isa_name(simd[i].isa));
        out[n++] = (table){simd[i].isa, simd[i].k};
    }
    for (int i = 0; i < n; i++) {
        const dma_kernels *k = out[i].k;
        ck_assert_msg(k->nr >= 8 && k->nr % 8 == 0 && DMA_CHUNK % k->nr == 0,
                      "%s: nr = %d", k->name, k->nr);
        ck_assert_msg(k->mr >= 1 && k->mr <= 16, "%s: mr = %d", k->name, k->mr);
        ck_assert_msg(k->pv_rows >= 1 && k->pv_rows <= k->mr, "%s: pv_rows = %d", k->name,
                      k->pv_rows);
        ck_assert_msg(k->tn_rows == 64, "%s: tn_rows = %d (the backward merges blocks of 64)",
                      k->name, k->tn_rows);
        ck_assert_msg(k->select_step >= 8 && k->nr % k->select_step == 0,
                      "%s: select_step = %d", k->name, k->select_step);
        ck_assert_msg(k->pack_k && k->pack_v && k->scores && k->softmax_row && k->accum_pv &&
                          k->grad_row && k->accum_tn && k->add_rows && k->scale_row && k->to_f32 &&
                          k->prefetch_write && k->from_f32 && k->pack_k_half && k->dots,
                      "%s: a kernel is missing", k->name);
    }
    return n;
}

/* 64-byte aligned (as the driver's panels are) but of exactly `count` floats, so that ASan sees
 * the true end of the buffer. */
float *fbuf(size_t count)
{
    void *p = NULL;
    ck_assert_int_eq(posix_memalign(&p, 64, count ? count * sizeof(float) : 1), 0);
    return p;
}

const int64_t head_dims[N_HEAD_DIMS] = {1, 7, 16, 40, 64, 100, 128, 256};

int round_up(int a, int b) { return (a + b - 1) / b * b; }

/* A random multiple of nr in [nr, DMA_CHUNK], biased to the ends. */
int draw_n(test_rng *r, int nr)
{
    int64_t u = rng_int(r, 0, 9);
    if (u == 0)
        return nr;
    if (u == 1)
        return DMA_CHUNK;
    return (int)rng_int(r, 1, DMA_CHUNK / nr) * nr;
}

void fill_guard(float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = GUARD;
}

/* Key rows of a random K: `nkeys` rows of `ld` floats (ld >= D, values past D are garbage the
 * packers must not copy). */
float *random_rows(test_rng *r, int64_t nkeys, int64_t ld)
{
    float *x = fbuf((size_t)(nkeys * ld));
    for (int64_t i = 0; i < nkeys * ld; i++)
        x[i] = rng_float(r, -1.0f, 1.0f);
    return x;
}

/* A random selection of an n-position chunk. The bitmask row is allocated with exactly the words
 * that hold the bits of positions bit0 + [0, hi) (at least one word), as the shortest row the
 * driver could hand over; bits past the row's end do not exist for the kernel. */
row_sel draw_sel(test_rng *r, int n, int use_bits)
{
    row_sel rs = {NULL, 0, 0, n};
    switch (rng_int(r, 0, 5)) {
    case 0: break;                                      /* whole chunk */
    case 1: rs.lo = rs.hi = (int)rng_int(r, 0, n); break; /* empty */
    default:
        rs.lo = (int)rng_int(r, 0, n);
        rs.hi = (int)rng_int(r, rs.lo, n);
        break;
    }
    if (use_bits) {
        rs.bit0 = (int)rng_int(r, 0, 3) == 0 ? (int)rng_int(r, 0, 8) * 64
                                              : (int)rng_int(r, 0, 600);
        int words = (rs.bit0 + rs.hi + 63) / 64;
        if (words < 1)
            words = 1;
        rs.bits = malloc(sizeof(uint64_t) * (size_t)words);
        ck_assert_ptr_nonnull(rs.bits);
        double density = rng_unit(r);
        for (int w = 0; w < words; w++) {
            uint64_t x = 0;
            for (int b = 0; b < 64; b++)
                x |= (uint64_t)rng_bernoulli(r, density) << b;
            rs.bits[w] = x;
        }
    }
    return rs;
}

int is_selected(const row_sel *rs, int c)
{
    if (c < rs->lo || c >= rs->hi)
        return 0;
    if (!rs->bits)
        return 1;
    int b = rs->bit0 + c;
    return (int)((rs->bits[b >> 6] >> (b & 63)) & 1u);
}

int close_rel(double got, double want, double rel, double abs_tol)
{
    if (isnan(want))
        return isnan(got);
    if (isinf(want))
        return got == want;
    return fabs(got - want) <= rel * fabs(want) + abs_tol;
}

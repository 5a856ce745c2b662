/*
 * error_checks.h - what the bad-input suites (test_errors.c, test_sparsity_errors.c) share: sizes
 * that overflow, the sentinel an `out` pointer keeps through a failing call, and the check that
 * the context explains a failure.
 */
#ifndef DMATTN_TEST_ERROR_CHECKS_H
#define DMATTN_TEST_ERROR_CHECKS_H

#include <check.h>
#include <stdint.h>

#include "dmattn.h"

#define TWO40 ((int64_t)1 << 40)
#define BIG_LK ((int64_t)INT32_MAX + 1)

/* The value an `out` pointer argument holds before a failing call; it must hold it after. */
static char out_marker;
#define UNTOUCHED_SP ((dma_sparsity *)(void *)&out_marker)
#define UNTOUCHED_CTX ((dma_context *)(void *)&out_marker)

static inline void expect_last_error(dma_context *ctx, const char *what)
{
    const char *msg = dma_context_last_error(ctx);
    ck_assert_msg(msg != NULL && msg[0] != '\0', "%s: dma_context_last_error is empty", what);
}

/* A causal dense sparsity object (asserted to build). */
static inline dma_sparsity *dense_sparsity(dma_context *ctx, int64_t B, int64_t H, int64_t Lq,
                                           int64_t Lk)
{
    dma_mask_params mp = {.kind = DMA_MASK_DENSE, .causal = 1};
    dma_sparsity *sp = NULL;
    ck_assert_int_eq(dma_sparsity_build(ctx, &mp, B, H, Lq, Lk, NULL, NULL, &sp), DMA_OK);
    return sp;
}

#endif

/*
 * train_support.h - what the training-library suites share: random fills and a central
 * finite-difference check of one gradient against a scalar loss.
 */
#ifndef DMATTN_TESTS_TRAIN_SUPPORT_H
#define DMATTN_TESTS_TRAIN_SUPPORT_H

#include <stddef.h>

#include "common.h"

/** x[i] = uniform in [-scale, scale). */
void fill_uniform(test_rng *r, float *x, size_t n, float scale);

/** A scalar loss of the current parameter values (recomputes the forward). */
typedef double (*loss_fn)(void *state);

/** Checks grad[i] against (loss(p + h) - loss(p - h)) / (p+h - (p-h)) for `samples` random i
 *  (every i when n <= samples): |fd - grad| <= atol + rtol * |grad| must hold. `skip`, when
 *  not NULL, is asked after each evaluation whether the point is unfit for a finite difference
 *  (a discrete choice such as a top-k selection changed); such samples are not counted, and at
 *  least half of the samples must be usable. Returns the number of samples checked. */
int fd_check(const char *what, float *param, const float *grad, size_t n, loss_fn loss,
             void *state, int (*skip)(void *state), test_rng *r, int samples, float h,
             double atol, double rtol);

/** sum_i y[i] * w[i] in double (the scalar loss of layer tests: dL/dy = w). */
double weighted_sum(const float *y, const float *w, size_t n);

#endif /* DMATTN_TESTS_TRAIN_SUPPORT_H */

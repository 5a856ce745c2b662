/*
 * reference_dynbias.h - an independent, naive double-precision reference of the value-derived
 * dynamic bias (DESIGN.md section 1 "Dynamic bias from values", dma_dynamic_bias_forward and
 * _backward in include/dmattn.h), written from the formulas, not from lib/.
 *
 * Every array is contiguous, row-major double:
 *   v (B, Lk, H, D), w (H * D, H), bdt (H) or NULL (= 0), a (H), bias and g (B, H, Lk).
 * The "mag" outputs hold, per entry, the same sum with every term replaced by its absolute
 * value: the scale of the float rounding the library may make, used for tolerances.
 */
#ifndef DMATTN_TESTS_REFERENCE_DYNBIAS_H
#define DMATTN_TESTS_REFERENCE_DYNBIAS_H

#include <stdint.h>

typedef struct ref_dyn_dims {
    int64_t B, Lk, H, D;
} ref_dyn_dims;

/** log(1 + e^x), accurate for any x. */
double ref_softplus(double x);
/** 1 / (1 + e^-x). */
double ref_sigmoid(double x);

/** bias[b][h][t] = a[h] * softplus(sum_x v[b][t][x] w[x][h] + bdt[h]); mag may be NULL. */
void ref_dyn_forward(ref_dyn_dims d, const double *v, const double *w, const double *bdt,
                     const double *a, double *bias, double *mag);

/** Gradients of the forward for dbias g; each array is written whole (dv is not added to). */
typedef struct ref_dyn_grads {
    double *dv, *dw, *db, *da;                 /* (B, Lk, H, D), (H*D, H), (H), (H) */
    double *dv_mag, *dw_mag, *db_mag, *da_mag; /* same shapes */
} ref_dyn_grads;

void ref_dyn_backward(ref_dyn_dims d, const double *v, const double *w, const double *bdt,
                      const double *a, const double *g, ref_dyn_grads *out);

#endif /* DMATTN_TESTS_REFERENCE_DYNBIAS_H */

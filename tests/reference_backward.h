/*
 * reference_backward.h - an independent, deliberately naive double precision reference for
 * dma_backward, written from the math of DESIGN.md sections 1 and 3 (not from lib/).
 *
 * It takes exactly the arguments of the forward reference (ref_fwd_args in reference.h: the same
 * shapes, the same broadcasting of the bias and of the dense selection, the same causal rule) plus
 * the upstream gradient dout, and recomputes everything it needs (scores, P, O) itself, without
 * any saved lse or out. All arrays are contiguous and row-major.
 */
#ifndef DMATTN_TESTS_REFERENCE_BACKWARD_H
#define DMATTN_TESTS_REFERENCE_BACKWARD_H

#include <stdint.h>

#include "reference.h"

/* Outputs of ref_backward. dq, dk, dv are required; the others may be NULL. */
typedef struct ref_bwd_out {
    double *dq;    /* (B, Lq, Hq, D) */
    double *dk;    /* (B, Lk, Hkv, D) */
    double *dv;    /* (B, Lk, Hkv, D) */
    double *dbias; /* (Bb, Hb, Lb, Lk), the bias's own shape; only used when a->bias != NULL */
    /* Structure, not values: 1 where at least one (row, key) pair of a non-empty row reaches the
     * entry, 0 where nothing does (the library must then write an exact 0). */
    uint8_t *live_q;    /* (B, Lq, Hq): the row has a key with a finite score */
    uint8_t *live_kv;   /* (B, Lk, Hkv): some non-empty row selected the key */
    uint8_t *live_bias; /* (Bb, Hb, Lb, Lk): some non-empty row selected the key through it */
    /* Optional, same shapes as dq, dk, dv, dbias: the same sums with every factor replaced by
     * its absolute value (|dout|.|v_j| + |dout|.|O| for dP - delta, |k|, |q|, |dout|, and
     * |softcap'|). Rounding errors of a float computation of an entry are proportional to this,
     * not to the entry itself, which may cancel to ~0 (e.g. a row with one key: dP = delta). */
    double *dq_mag, *dk_mag, *dv_mag, *dbias_mag;
} ref_bwd_out;

/**
 * Gradients of L = sum(out * dout) with respect to q, k, v and the bias, where out is the
 * attention of `a` (see ref_forward). dout: (B, Lq, Hq, D). Every output is overwritten.
 * For each (b, query head h, row i), with the selected keys j:
 *   s_j = scale <q_i, k_j>,  t_j = softcap > 0 ? softcap tanh(s_j / softcap) : s_j,
 *   x_j = t_j + bias(i, j),  P = softmax(x),  O = sum_j P_j v_j,  delta = <dout_i, O>,
 *   dx_j = P_j (<dout_i, v_j> - delta),  ds_j = dx_j (softcap > 0 ? 1 - (t_j / softcap)^2 : 1),
 *   dq_i += scale sum_j ds_j k_j,  dk_j += scale ds_j q_i,  dv_j += P_j dout_i,
 *   dbias(i, j) += dx_j, summed into the bias entry that (b, h, i, j) reads.
 * Rows with no selected key (or only keys whose score is -inf) contribute nothing.
 */
void ref_backward(const ref_fwd_args *a, const float *dout, const ref_bwd_out *o);

#endif /* DMATTN_TESTS_REFERENCE_BACKWARD_H */

/*
 * reference_backward.c - see reference_backward.h. One (batch, query head, row) at a time, dense
 * over the keys, in double precision; every formula of the header appears once, in order.
 */
#include "reference_backward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void ref_backward(const ref_fwd_args *a, const float *dout, const ref_bwd_out *o)
{
    const int64_t B = a->B, Lq = a->Lq, Lk = a->Lk, Hq = a->Hq, Hkv = a->Hkv, D = a->D;
    const double scale = (a->scale != 0.0) ? a->scale : 1.0 / sqrt((double)D);
    const double softcap = a->softcap;
    const size_t nk = (size_t)(Lk > 0 ? Lk : 1);
    uint8_t *use = malloc(nk);
    double *t = malloc(nk * sizeof *t);  /* score after the softcap, before the bias */
    double *x = malloc(nk * sizeof *x);  /* t + bias */
    double *p = malloc(nk * sizeof *p);  /* softmax */
    int64_t *bias_at = malloc(nk * sizeof *bias_at); /* index of the bias entry read */
    double *outrow = malloc((size_t)(D > 0 ? D : 1) * sizeof *outrow);

    memset(o->dq, 0, (size_t)(B * Lq * Hq * D) * sizeof(double));
    memset(o->dk, 0, (size_t)(B * Lk * Hkv * D) * sizeof(double));
    memset(o->dv, 0, (size_t)(B * Lk * Hkv * D) * sizeof(double));
    const int64_t nbias = a->bias != NULL ? a->Bb * a->Hb * a->Lb * Lk : 0;
    if (o->dbias != NULL && a->bias != NULL)
        memset(o->dbias, 0, (size_t)nbias * sizeof(double));
    if (o->live_q != NULL)
        memset(o->live_q, 0, (size_t)(B * Lq * Hq));
    if (o->live_kv != NULL)
        memset(o->live_kv, 0, (size_t)(B * Lk * Hkv));
    if (o->live_bias != NULL && a->bias != NULL)
        memset(o->live_bias, 0, (size_t)nbias);
    if (o->dq_mag != NULL)
        memset(o->dq_mag, 0, (size_t)(B * Lq * Hq * D) * sizeof(double));
    if (o->dk_mag != NULL)
        memset(o->dk_mag, 0, (size_t)(B * Lk * Hkv * D) * sizeof(double));
    if (o->dv_mag != NULL)
        memset(o->dv_mag, 0, (size_t)(B * Lk * Hkv * D) * sizeof(double));
    if (o->dbias_mag != NULL && a->bias != NULL)
        memset(o->dbias_mag, 0, (size_t)nbias * sizeof(double));

    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < Hq; h++) {
            const int64_t hk = h / (Hq / Hkv);
            for (int64_t i = 0; i < Lq; i++) {
                const int64_t row = (b * Lq + i) * Hq + h; /* (b, i, h) in BSHD */
                const float *qi = a->q + row * D;
                const float *gi = dout + row * D;

                ref_row_keys(a, b, h, i, use);

                /* x_j = softcap(scale <q, k>) + bias */
                double max = -INFINITY;
                for (int64_t j = 0; j < Lk; j++) {
                    if (!use[j])
                        continue;
                    const float *kj = a->k + ((b * Lk + j) * Hkv + hk) * D;
                    double dot = 0.0;
                    for (int64_t d = 0; d < D; d++)
                        dot += (double)qi[d] * (double)kj[d];
                    double s = scale * dot;
                    t[j] = (softcap > 0.0) ? softcap * tanh(s / softcap) : s;
                    x[j] = t[j];
                    bias_at[j] = -1;
                    if (a->bias != NULL) {
                        int64_t bb = (a->Bb == 1) ? 0 : b;
                        int64_t hb = h / (Hq / a->Hb);
                        int64_t lb = (a->Lb == 1) ? 0 : i;
                        bias_at[j] = ((bb * a->Hb + hb) * a->Lb + lb) * Lk + j;
                        x[j] += (double)a->bias[bias_at[j]];
                    }
                    if (x[j] > max)
                        max = x[j];
                }
                if (max == -INFINITY)
                    continue; /* empty row: no gradient anywhere */
                if (o->live_q != NULL)
                    o->live_q[row] = 1;

                /* P = softmax over the selected keys; O = P V */
                double sum = 0.0;
                for (int64_t j = 0; j < Lk; j++) {
                    if (!use[j])
                        continue;
                    p[j] = exp(x[j] - max);
                    sum += p[j];
                }
                for (int64_t d = 0; d < D; d++)
                    outrow[d] = 0.0;
                for (int64_t j = 0; j < Lk; j++) {
                    if (!use[j])
                        continue;
                    p[j] /= sum;
                    const float *vj = a->v + ((b * Lk + j) * Hkv + hk) * D;
                    for (int64_t d = 0; d < D; d++)
                        outrow[d] += p[j] * (double)vj[d];
                }

                /* delta = <dout, O> */
                double delta = 0.0, delta_mag = 0.0;
                for (int64_t d = 0; d < D; d++) {
                    delta += (double)gi[d] * outrow[d];
                    delta_mag += fabs((double)gi[d] * outrow[d]);
                }

                double *dqi = o->dq + row * D;
                for (int64_t j = 0; j < Lk; j++) {
                    if (!use[j])
                        continue;
                    const int64_t kvrow = (b * Lk + j) * Hkv + hk;
                    const float *kj = a->k + kvrow * D;
                    const float *vj = a->v + kvrow * D;
                    double *dkj = o->dk + kvrow * D;
                    double *dvj = o->dv + kvrow * D;

                    double dp = 0.0, dp_mag = 0.0; /* <dout, v_j> */
                    for (int64_t d = 0; d < D; d++) {
                        dp += (double)gi[d] * (double)vj[d];
                        dp_mag += fabs((double)gi[d] * (double)vj[d]);
                    }
                    double dx = p[j] * (dp - delta);
                    double ds = dx;
                    double dcap = 1.0; /* d t / d s */
                    if (softcap > 0.0) {
                        double th = t[j] / softcap;
                        dcap = 1.0 - th * th;
                        ds = dx * dcap;
                    }

                    for (int64_t d = 0; d < D; d++) {
                        dqi[d] += scale * ds * (double)kj[d];
                        dkj[d] += scale * ds * (double)qi[d];
                        dvj[d] += p[j] * (double)gi[d];
                    }

                    /* the same sums over absolute values */
                    double dx_mag = p[j] * (dp_mag + delta_mag);
                    double ds_mag = dx_mag * fabs(dcap);
                    for (int64_t d = 0; d < D; d++) {
                        if (o->dq_mag != NULL)
                            o->dq_mag[row * D + d] += fabs(scale) * ds_mag * fabs((double)kj[d]);
                        if (o->dk_mag != NULL)
                            o->dk_mag[kvrow * D + d] += fabs(scale) * ds_mag * fabs((double)qi[d]);
                        if (o->dv_mag != NULL)
                            o->dv_mag[kvrow * D + d] += p[j] * fabs((double)gi[d]);
                    }
                    if (o->dbias_mag != NULL && bias_at[j] >= 0)
                        o->dbias_mag[bias_at[j]] += dx_mag;
                    if (o->live_kv != NULL)
                        o->live_kv[kvrow] = 1;
                    if (bias_at[j] >= 0) {
                        if (o->dbias != NULL)
                            o->dbias[bias_at[j]] += dx;
                        if (o->live_bias != NULL)
                            o->live_bias[bias_at[j]] = 1;
                    }
                }
            }
        }
    }
    free(use);
    free(t);
    free(x);
    free(p);
    free(bias_at);
    free(outrow);
}

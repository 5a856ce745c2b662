/* reference_dynbias.c - see reference_dynbias.h. Loops straight from the formulas. */
#include "reference_dynbias.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

double ref_softplus(double x)
{
    /* log(1 + e^x) = x + log(1 + e^-x): use the form whose exponent is not positive */
    return x > 0.0 ? x + log1p(exp(-x)) : log1p(exp(x));
}

double ref_sigmoid(double x)
{
    return x >= 0.0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x));
}

/* dt[b][t][h] and, optionally, the sum of the absolute values of its terms. */
static void ref_dt(ref_dyn_dims d, const double *v, const double *w, const double *bdt,
                   int64_t b, int64_t t, int64_t h, double *dt, double *abs_terms)
{
    const int64_t HD = d.H * d.D;
    double s = bdt ? bdt[h] : 0.0, m = bdt ? fabs(bdt[h]) : 0.0;
    for (int64_t x = 0; x < HD; x++) {
        double term = v[(b * d.Lk + t) * HD + x] * w[x * d.H + h];
        s += term;
        m += fabs(term);
    }
    *dt = s;
    if (abs_terms)
        *abs_terms = m;
}

void ref_dyn_forward(ref_dyn_dims d, const double *v, const double *w, const double *bdt,
                     const double *a, double *bias, double *mag)
{
    for (int64_t b = 0; b < d.B; b++)
        for (int64_t h = 0; h < d.H; h++)
            for (int64_t t = 0; t < d.Lk; t++) {
                double dt, m;
                ref_dt(d, v, w, bdt, b, t, h, &dt, &m);
                int64_t o = (b * d.H + h) * d.Lk + t;
                bias[o] = a[h] * ref_softplus(dt);
                if (mag)
                    mag[o] = fabs(a[h]) * (ref_softplus(dt) + m);
            }
}

void ref_dyn_backward(ref_dyn_dims d, const double *v, const double *w, const double *bdt,
                      const double *a, const double *g, ref_dyn_grads *out)
{
    const int64_t HD = d.H * d.D;
    const size_t nv = (size_t)(d.B * d.Lk * HD), nw = (size_t)(HD * d.H), nh = (size_t)d.H;
    memset(out->dv, 0, sizeof(double) * nv);
    memset(out->dv_mag, 0, sizeof(double) * nv);
    memset(out->dw, 0, sizeof(double) * nw);
    memset(out->dw_mag, 0, sizeof(double) * nw);
    memset(out->db, 0, sizeof(double) * nh);
    memset(out->db_mag, 0, sizeof(double) * nh);
    memset(out->da, 0, sizeof(double) * nh);
    memset(out->da_mag, 0, sizeof(double) * nh);
    for (int64_t b = 0; b < d.B; b++)
        for (int64_t t = 0; t < d.Lk; t++)
            for (int64_t h = 0; h < d.H; h++) {
                double dt, m;
                ref_dt(d, v, w, bdt, b, t, h, &dt, &m);
                double gg = g[(b * d.H + h) * d.Lk + t];
                double ddt = gg * a[h] * ref_sigmoid(dt);
                /* the float ddt carries the rounding of dt (sigmoid' <= 1/4) as well */
                double ddt_mag = fabs(ddt) + fabs(gg * a[h]) * 0.25 * m;
                out->da[h] += gg * ref_softplus(dt);
                out->da_mag[h] += fabs(gg) * (ref_softplus(dt) + m);
                out->db[h] += ddt;
                out->db_mag[h] += ddt_mag;
                for (int64_t x = 0; x < HD; x++) {
                    int64_t iv = (b * d.Lk + t) * HD + x;
                    out->dv[iv] += ddt * w[x * d.H + h];
                    out->dv_mag[iv] += ddt_mag * fabs(w[x * d.H + h]);
                    out->dw[x * d.H + h] += v[iv] * ddt;
                    out->dw_mag[x * d.H + h] += fabs(v[iv]) * ddt_mag;
                }
            }
}

/* train_support.c - see train_support.h. */
#include "train_support.h"

#include <math.h>

void fill_uniform(test_rng *r, float *x, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rng_float(r, -scale, scale);
}

double weighted_sum(const float *y, const float *w, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)y[i] * w[i];
    return s;
}

int fd_check(const char *what, float *param, const float *grad, size_t n, loss_fn loss,
             void *state, int (*skip)(void *state), test_rng *r, int samples, float h,
             double atol, double rtol)
{
    int all = n <= (size_t)samples, tried = 0, checked = 0;
    for (size_t s = 0; s < (all ? n : (size_t)samples); s++) {
        size_t i = all ? s : (size_t)rng_int(r, 0, (int64_t)n - 1);
        const float old = param[i];
        const float up = old + h, down = old - h;
        param[i] = up;
        double lp = loss(state);
        int bad = skip && skip(state);
        param[i] = down;
        double lm = loss(state);
        bad = bad || (skip && skip(state));
        param[i] = old;
        tried++;
        if (bad)
            continue;
        checked++;
        double fd = (lp - lm) / ((double)up - (double)down);
        REQUIRE(fabs(fd - grad[i]) <= atol + rtol * fabs(grad[i]),
                "%s[%zu]: analytic gradient %.6g, finite difference %.6g", what, i, grad[i], fd);
    }
    if (skip)
        loss(state); /* leave the state at the unperturbed point */
    REQUIRE(2 * checked >= tried, "%s: only %d of %d finite differences were usable", what,
            checked, tried);
    return checked;
}

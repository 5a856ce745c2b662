/*
 * vmath.h - exp for the training code's elementwise loops (softmax of the LM head, SwiGLU's
 * sigmoid), written so that the compiler vectorises a loop that calls it (`omp simd`, and
 * -fno-trapping-math, which examples/common/meson.build sets): no libm call, no branch. Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-6
 * polynomial: relative error under 2 ulp on [-87, 88]; below -87.3 (and at -inf) it gives 0,
 * above 88.7 +inf; a NaN stays NaN.
 */
#ifndef DMTRAIN_VMATH_H
#define DMTRAIN_VMATH_H

#include <stdint.h>
#include <string.h>

#pragma omp declare simd notinbranch
static inline float exp_approx(float x)
{
    /* clamp to where 2^n is a normal float; NaN fails both tests and passes through. The
     * quiet comparisons (isless, isgreater) never trap, so the compiler may if-convert them */
    const float lo = -87.33654475f, hi = 88.72283905f;
    const int under = __builtin_isless(x, lo), over = __builtin_isgreater(x, hi);
    const int nan = __builtin_isunordered(x, x);
    /* a NaN computes at 0 (keeps the integer conversion below defined) and is returned as is */
    float xc = nan ? 0.0f : (under ? lo : (over ? hi : x));
    /* round to nearest by adding and taking away 1.5 * 2^23 (vectorises without SSE4.1) */
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    uint32_t e = (uint32_t)((int32_t)n + 127) << 23; /* n in [-126, 128]: a biased exponent */
    float scale;
    memcpy(&scale, &e, sizeof scale);
    y *= scale;
    y = under ? 0.0f : y;                      /* underflow (and -inf) */
    y = over ? __builtin_inff() : y;           /* overflow */
    return nan ? x : y; /* NaN */
}

#endif /* DMTRAIN_VMATH_H */

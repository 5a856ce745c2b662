/*
 * kernels_generic.h - pack_k_half for kernel tables without a fused version (scalar, NEON):
 * each block of nr keys converted to float32 rows with the table's own to_f32, then packed with
 * its own pack_k. Included by those tables' files, compiled with their flags. Not installed.
 */
#ifndef DMATTN_KERNELS_GENERIC_H
#define DMATTN_KERNELS_GENERIC_H

#include <stdint.h>

static inline void generic_pack_k_half(
    float *kp, const uint16_t *base, int64_t ld, const int32_t *keys, int32_t first, int n, int D,
    int f16, int nr, void (*to_f32)(float *, const uint16_t *, int64_t, int),
    void (*pack_k)(float *, const float *, int64_t, const int32_t *, int32_t, int, int))
{
    float rows[32 * 256]; /* nr <= 32 keys of D <= 256 */
    for (int c0 = 0; c0 < n; c0 += nr) {
        const int m = n - c0 < nr ? n - c0 : nr;
        for (int j = 0; j < m; j++)
            to_f32(rows + j * D, base + (int64_t)(keys ? keys[c0 + j] : first + c0 + j) * ld, D,
                   f16);
        pack_k(kp + (int64_t)c0 * D, rows, D, NULL, 0, m, D);
    }
}

#endif /* DMATTN_KERNELS_GENERIC_H */

/*
 * x86_shared.h - the parts of the AVX2 and AVX-512 kernels that are the same code in both: the
 * reading of a row's selection, 64 positions at a time, and the packing of K and V (256-bit
 * loads, stores and transposes, which AVX-512 machines run as well). Included by
 * simd/x86/avx2/kernels_avx2.c and simd/x86/avx512/kernels_avx512.c, each compiled with its own
 * flags; everything here is static inline.
 */
#ifndef DMATTN_X86_SHARED_H
#define DMATTN_X86_SHARED_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------------------------------ */
/* Selection: positions c .. c+63 of a row, as one 64-bit word                                */
/* ------------------------------------------------------------------------------------------ */

/* Bit j set iff lo <= c + j < hi. */
/* Sum of the 8 lanes (fixed order: the same bits on every x86 table that uses it). */
INLINE float hsum8_shared(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
}

INLINE uint64_t range_bits(int c, int lo, int hi)
{
    int a = lo - c, b = hi - c;
    if (a < 0)
        a = 0;
    if (b > 64)
        b = 64;
    if (b <= a)
        return 0;
    uint64_t m = b - a == 64 ? ~(uint64_t)0 : ((uint64_t)1 << (b - a)) - 1;
    return m << a;
}

/* Bit j set iff position c + j is selected. Reads only the words of `bits` that hold a bit of a
 * position in [lo, hi), so it never reads past the row's last word. */
INLINE uint64_t sel_bits(const uint64_t *bits, int bit0, int c, int lo, int hi)
{
    uint64_t r = range_bits(c, lo, hi);
    if (!r || !bits)
        return r;
    int64_t b = (int64_t)bit0 + c;
    int64_t first = b + __builtin_ctzll(r), last = b + 63 - __builtin_clzll(r);
    int64_t w0 = b >> 6;
    int sh = (int)(b & 63);
    uint64_t win = (first >> 6) == w0 ? bits[w0] >> sh : 0;
    if (sh && (last >> 6) > w0)
        win |= bits[w0 + 1] << (64 - sh);
    return win & r;
}

/* ------------------------------------------------------------------------------------------ */
/* Packing                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static const float zero_row[256]; /* D <= 256: the source of the zero keys past n */

INLINE const float *key_row(const float *base, int64_t ld, const int32_t *keys, int32_t first,
                            int c)
{
    return base + (int64_t)(keys ? keys[c] : first + c) * ld;
}

INLINE void transpose8(__m256 r[8])
{
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* Software prefetch of the D floats of a key row (the gathers of a sparse union defeat the
 * hardware prefetcher). */
INLINE void prefetch_row(const float *row, int D)
{
    for (int d = 0; d < D; d += 16)
        _mm_prefetch((const char *)(row + d), _MM_HINT_T0);
    _mm_prefetch((const char *)(row + D - 1), _MM_HINT_T0);
}

/* pack_k of lib/kernels.h for blocks of nr keys (a multiple of 8, at most 32), 8 keys at a time
 * through a transpose of 8 x 8 floats. */
INLINE void pack_k_blocks(float *kp, const float *base, int64_t ld, const int32_t *keys,
                          int32_t first, int n, int D, const int nr)
{
    const float *src[32];
    for (int c0 = 0; c0 < n; c0 += nr) {
        float *blk = kp + (int64_t)c0 * D;
        for (int j = 0; j < nr; j++)
            src[j] = c0 + j < n ? key_row(base, ld, keys, first, c0 + j) : zero_row;
        for (int j = nr; j < 2 * nr && c0 + j < n; j++)
            prefetch_row(key_row(base, ld, keys, first, c0 + j), D);
        for (int j0 = 0; j0 < nr; j0 += 8) {
            const float *const *s8 = src + j0;
            int d = 0;
            for (; d + 8 <= D; d += 8) {
                __m256 r[8];
                for (int j = 0; j < 8; j++)
                    r[j] = _mm256_loadu_ps(s8[j] + d);
                transpose8(r);
                for (int j = 0; j < 8; j++)
                    _mm256_storeu_ps(blk + (int64_t)(d + j) * nr + j0, r[j]);
            }
            for (; d < D; d++)
                for (int j = 0; j < 8; j++)
                    blk[(int64_t)d * nr + j0 + j] = s8[j][d];
        }
    }
}

/* 8 bf16 or binary16 values as floats (exact; binary16 through F16C). */
INLINE __m256 load8_half(const uint16_t *p, int f16)
{
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return f16 ? _mm256_cvtph_ps(h)
               : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static const uint16_t zero_row_half[256];

/* pack_k_half of lib/kernels.h: pack_k_blocks with the conversion in the loads. A row's last
 * D % 8 values go through to_f32_tail (the ISA's exact scalar conversion). */
INLINE void pack_k_blocks_half(float *kp, const uint16_t *base, int64_t ld, const int32_t *keys,
                               int32_t first, int n, int D, const int nr, int f16,
                               void (*to_f32_tail)(float *, const uint16_t *, int64_t, int))
{
    const uint16_t *src[32];
    for (int c0 = 0; c0 < n; c0 += nr) {
        float *blk = kp + (int64_t)c0 * D;
        for (int j = 0; j < nr; j++)
            src[j] = c0 + j < n ? base + (int64_t)(keys ? keys[c0 + j] : first + c0 + j) * ld
                                : zero_row_half;
        for (int j = nr; j < 2 * nr && c0 + j < n; j++)
            prefetch_row((const float *)(base + (int64_t)(keys ? keys[c0 + j] : first + c0 + j) *
                                                    ld), D / 2 + 1);
        for (int j0 = 0; j0 < nr; j0 += 8) {
            const uint16_t *const *s8 = src + j0;
            int d = 0;
            for (; d + 8 <= D; d += 8) {
                __m256 r[8];
                for (int j = 0; j < 8; j++)
                    r[j] = load8_half(s8[j] + d, f16);
                transpose8(r);
                for (int j = 0; j < 8; j++)
                    _mm256_storeu_ps(blk + (int64_t)(d + j) * nr + j0, r[j]);
            }
            if (d < D)
                for (int j = 0; j < 8; j++) {
                    float tail[16]; /* room for a 16-wide conversion (GCC cannot see n < 8) */
                    to_f32_tail(tail, s8[j] + d, D - d, f16);
                    for (int e = d; e < D; e++)
                        blk[(int64_t)e * nr + j0 + j] = tail[e - d];
                }
        }
    }
}

/* dots of lib/kernels.h for M rows (compile-time after inlining), two keys at a time so that
 * each q load serves two FMAs. */
INLINE void dots_rows(float *s, int lds, const float *q, int ldq, const float *k, int ldk, int n,
                      int D, const int M)
{
    const int D8 = D / 8 * 8;
    int c = 0;
    for (; c + 2 <= n; c += 2) {
        const float *k0 = k + (int64_t)c * ldk, *k1 = k0 + ldk;
        __m256 a0[8], a1[8];
#pragma GCC unroll 8
        for (int r = 0; r < M; r++)
            a0[r] = a1[r] = _mm256_setzero_ps();
        for (int d = 0; d < D8; d += 8) {
            const __m256 x0 = _mm256_loadu_ps(k0 + d), x1 = _mm256_loadu_ps(k1 + d);
#pragma GCC unroll 8
            for (int r = 0; r < M; r++) {
                const __m256 qv = _mm256_loadu_ps(q + (int64_t)r * ldq + d);
                a0[r] = _mm256_fmadd_ps(qv, x0, a0[r]);
                a1[r] = _mm256_fmadd_ps(qv, x1, a1[r]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < M; r++) {
            float t0 = hsum8_shared(a0[r]), t1 = hsum8_shared(a1[r]);
            for (int d = D8; d < D; d++) {
                t0 += q[(int64_t)r * ldq + d] * k0[d];
                t1 += q[(int64_t)r * ldq + d] * k1[d];
            }
            s[(int64_t)r * lds + c] = t0;
            s[(int64_t)r * lds + c + 1] = t1;
        }
    }
    for (; c < n; c++) {
        const float *k0 = k + (int64_t)c * ldk;
#pragma GCC unroll 8
        for (int r = 0; r < M; r++) {
            __m256 a = _mm256_setzero_ps();
            for (int d = 0; d < D8; d += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(q + (int64_t)r * ldq + d),
                                    _mm256_loadu_ps(k0 + d), a);
            float t = hsum8_shared(a);
            for (int d = D8; d < D; d++)
                t += q[(int64_t)r * ldq + d] * k0[d];
            s[(int64_t)r * lds + c] = t;
        }
    }
}

#define DEFINE_DOTS(M)                                                                          \
    static void dots_##M(float *s, int lds, const float *q, int ldq, const float *k, int ldk,   \
                         int n, int D)                                                          \
    {                                                                                           \
        dots_rows(s, lds, q, ldq, k, ldk, n, D, M);                                             \
    }
DEFINE_DOTS(1)
DEFINE_DOTS(2)
DEFINE_DOTS(3)
DEFINE_DOTS(4)
DEFINE_DOTS(5)
DEFINE_DOTS(6)
DEFINE_DOTS(7)
DEFINE_DOTS(8)
#undef DEFINE_DOTS

static void dots(float *s, int lds, const float *q, int ldq, int m, const float *k, int ldk,
                 int n, int D)
{
    static void (*const by_rows[8])(float *, int, const float *, int, const float *, int, int,
                                    int) = {dots_1, dots_2, dots_3, dots_4,
                                            dots_5, dots_6, dots_7, dots_8};
    by_rows[m - 1](s, lds, q, ldq, k, ldk, n, D);
}

/* pack_v of lib/kernels.h. */
INLINE void pack_rows(float *vp, int ldv, const float *base, int64_t ld, const int32_t *keys,
                      int32_t first, int n, int D)
{
    for (int c = 0; c < n; c++) {
        if (c + 8 < n)
            prefetch_row(key_row(base, ld, keys, first, c + 8), D);
        float *dst = vp + (int64_t)c * ldv;
        const float *src = key_row(base, ld, keys, first, c);
        /* 64-byte pieces of constant size, which the compiler inlines as vector moves: a
         * library memcpy and memset call per row (a D = 64 row is 256 bytes) took 1-2% of a
         * D = 64 MHA forward */
        int d = 0;
        for (; d + 16 <= D; d += 16)
            memcpy(dst + d, src + d, 64);
        for (; d < D; d++)
            dst[d] = src[d];
        for (; d < ldv; d++)
            dst[d] = 0.0f;
    }
}

#endif /* DMATTN_X86_SHARED_H */

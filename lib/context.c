/* context.c - context creation and the choice of the kernel table (dispatch). */
#include <stdlib.h>
#include <string.h>

#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "internal.h"

const char *dma_isa_name(dma_isa isa)
{
    switch (isa) {
    case DMA_ISA_AUTO: return "auto";
    case DMA_ISA_SCALAR: return "scalar";
    case DMA_ISA_AVX2: return "avx2";
    case DMA_ISA_AVX512: return "avx512";
    case DMA_ISA_NEON: return "neon";
    default: return "unknown";
    }
}

/* The kernel table compiled for an ISA, or NULL if this build lacks it. */
static const dma_kernels *kernels_built(dma_isa isa)
{
    switch (isa) {
    case DMA_ISA_SCALAR: return &dma_kernels_scalar;
#if defined(DMATTN_HAVE_AVX2)
    case DMA_ISA_AVX2: return &dma_kernels_avx2;
#endif
#if defined(DMATTN_HAVE_AVX512)
    case DMA_ISA_AVX512: return &dma_kernels_avx512;
#endif
#if defined(DMATTN_HAVE_NEON)
    case DMA_ISA_NEON: return &dma_kernels_neon;
#endif
    default: return NULL;
    }
}

#if defined(__x86_64__) || defined(__i386__)
/* F16C (the AVX2 table's binary16 conversions). GCC's __builtin_cpu_supports knows "f16c";
 * clang's does not (yet), so there cpuid leaf 1 ECX bit 29 answers. */
static int cpu_has_f16c(void)
{
#if defined(__clang__)
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
#else
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c");
#endif
}
#endif

#if defined(DMATTN_HAVE_AVX2)
/* PRFCHW (PREFETCHW): cpuid leaf 0x80000001, ECX bit 8. */
static int cpu_has_prfchw(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(0x80000001, &a, &b, &c, &d) && (c & (1u << 8));
}
#endif

#if defined(DMATTN_HAVE_AVX512)
/* AVX512_BF16 (VDPBF16PS): cpuid leaf 7, subleaf 1, EAX bit 5. */
static int cpu_has_avx512_bf16(void)
{
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
}

/* AMD family 19h: Zen 4 (Zen 3, the family's other cores, has no AVX-512). */
static int cpu_is_amd_family_19h(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u || d != 0x69746e65u ||
        c != 0x444d4163u) /* "AuthenticAMD" */
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    unsigned family = (a >> 8) & 0xfu;
    if (family == 0xfu)
        family += (a >> 20) & 0xffu;
    return family == 0x19u;
}

/* An environment variable that is set to something other than "" or "0". */
static int getenv_flag(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}
#endif

/* Whether the running CPU (and OS) can execute the ISA. */
static int cpu_has(dma_isa isa)
{
    switch (isa) {
    case DMA_ISA_SCALAR: return 1;
#if defined(__x86_64__) || defined(__i386__)
    case DMA_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    case DMA_ISA_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && cpu_has_f16c();
#endif
#if defined(__aarch64__)
    case DMA_ISA_NEON: return 1; /* Advanced SIMD is mandatory on aarch64 */
#endif
    default: return 0;
    }
}

int dma_isa_supported(dma_isa isa) { return kernels_built(isa) != NULL && cpu_has(isa); }

static dma_isa best_isa(void)
{
    static const dma_isa order[] = {DMA_ISA_AVX512, DMA_ISA_AVX2, DMA_ISA_NEON};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (dma_isa_supported(order[i]))
            return order[i];
    return DMA_ISA_SCALAR;
}

dma_status dma_context_create(const dma_context_options *opts, dma_context **out)
{
    if (!out)
        return DMA_ERR_NULL;
    dma_context_options o = {.threads = 0, .isa = DMA_ISA_AUTO};
    if (opts)
        o = *opts;
    if (o.threads < 0)
        return DMA_ERR_ARG;
    if (o.device != DMA_DEVICE_CPU && o.device != DMA_DEVICE_CUDA)
        return DMA_ERR_ARG;
    if (o.isa < DMA_ISA_AUTO || o.isa > DMA_ISA_NEON)
        return DMA_ERR_ARG;
    dma_isa isa = o.isa;
    if (isa == DMA_ISA_AUTO) {
        const char *env = getenv("DMATTN_ISA");
        if (env && *env && strcmp(env, "auto") != 0) {
            static const dma_isa named[] = {DMA_ISA_SCALAR, DMA_ISA_AVX2, DMA_ISA_AVX512,
                                            DMA_ISA_NEON};
            isa = DMA_ISA_AUTO;
            for (size_t i = 0; i < sizeof named / sizeof named[0]; i++)
                if (strcmp(env, dma_isa_name(named[i])) == 0)
                    isa = named[i];
            if (isa == DMA_ISA_AUTO)
                return DMA_ERR_ARG;
        }
    }
    if (isa == DMA_ISA_AUTO)
        isa = best_isa();
    if (!dma_isa_supported(isa))
        return DMA_ERR_ISA;
    int tn_rows = 0; /* DMATTN_TN_ROWS: rows per accum_tn call of the backward, for tests */
    const char *tn_env = getenv("DMATTN_TN_ROWS");
    if (tn_env && *tn_env) {
        if (strcmp(tn_env, "64") != 0 && strcmp(tn_env, "128") != 0)
            return DMA_ERR_ARG;
        tn_rows = atoi(tn_env);
    }
    dma_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return DMA_ERR_NOMEM;
    ctx->threads = o.threads > 0 ? o.threads : omp_get_max_threads();
    if (ctx->threads < 1)
        ctx->threads = 1;
    ctx->isa = isa;
    ctx->table = *kernels_built(isa);
#if defined(DMATTN_HAVE_AVX2)
    if ((isa == DMA_ISA_AVX2 || isa == DMA_ISA_AVX512) && cpu_has_prfchw())
        ctx->table.prefetch_write = dma_x86_prefetch_write;
#endif
#if defined(DMATTN_HAVE_AVX512)
    if (isa == DMA_ISA_AVX512 && cpu_has_avx512_bf16() && getenv_flag("DMATTN_BF16_DOT")) {
        ctx->table.pack_k_bf16 = dma_avx512_pack_k_bf16;
        ctx->table.scores_bf16 = dma_avx512_scores_bf16;
    }
    /* The backward's accum_tn calls take two blocks of 64 rows where they cover the same
     * keys. Chosen by measurement: about 1% faster backwards with the AVX-512 kernels on
     * Zen 4; no faster at 16 threads and 2-6% slower at 2 on a Sapphire Rapids Xeon; no
     * change with the AVX2 kernels on Zen 4. */
    if (isa == DMA_ISA_AVX512 && cpu_is_amd_family_19h())
        ctx->table.tn_rows = 128;
#endif
    if (tn_rows)
        ctx->table.tn_rows = tn_rows;
    ctx->kernels = &ctx->table;
    ctx->device = o.device;
    ctx->cuda_device = o.cuda_device;
    ctx->cuda_stream = o.cuda_stream;
    if (o.device == DMA_DEVICE_CUDA) {
        dma_status st = dma_device_init(ctx);
        if (st != DMA_OK) {
            free(ctx);
            return st;
        }
    }
    *out = ctx;
    return DMA_OK;
}

void dma_context_destroy(dma_context *ctx)
{
    if (ctx) {
        dma_free(ctx->scratch);
        dma_device_release(ctx);
    }
    free(ctx);
}

void dma_context_trim(dma_context *ctx)
{
    if (!ctx)
        return;
    dma_free(ctx->scratch);
    ctx->scratch = NULL;
    ctx->scratch_bytes = 0;
}

void *dma_context_scratch(dma_context *ctx, size_t bytes)
{
    if (bytes <= ctx->scratch_bytes)
        return ctx->scratch;
    dma_context_trim(ctx);
    ctx->scratch = dma_alloc(bytes);
    ctx->scratch_bytes = ctx->scratch ? bytes : 0;
    return ctx->scratch;
}

dma_isa dma_context_isa(const dma_context *ctx) { return ctx->isa; }

int dma_context_threads(const dma_context *ctx) { return ctx->threads; }

dma_device dma_context_device(const dma_context *ctx) { return ctx->device; }

int dma_context_bf16_dot(const dma_context *ctx) { return ctx->kernels->scores_bf16 != NULL; }

const char *dma_context_last_error(const dma_context *ctx) { return ctx->last_error; }

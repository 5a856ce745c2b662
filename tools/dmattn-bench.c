/*
 * dmattn-bench - benchmark of the dmattn forward against the library's own dense path and an
 * OpenBLAS dense attention, with an OpenBLAS SGEMM reference (DESIGN.md section 8).
 *
 * Every number is the median wall-clock time (CLOCK_MONOTONIC) of --runs timed calls after
 * --warmup untimed ones. GFLOP/s are *effective*: 4 * D * (selected (row, key) pairs over all
 * batches and query heads) / time, so a sparse run is credited only with the work it must do.
 *
 * Output: a table by default; with --json one JSON object per line per measurement (other tools
 * parse it: see --help for the fields, and tools/plot_bench.py).
 *
 * Fairness notes: dmattn and the OpenBLAS baseline get exactly --threads threads each. OpenBLAS
 * (pthreads build) workers busy-wait for a while after start-up and after each multi-threaded
 * call, stealing cores from OpenMP; the tool sleeps untimed until they are idle (settle_blas)
 * before timing anything else. The OpenBLAS kernel set is reported (blas_core) and checked.
 *
 * The backward (--backward): the dma forward and backward calls alternate (forward, backward,
 * forward, ...), so that the bwd/fwd ratio compares calls that saw the same machine: on a shared
 * machine whose speed drifts by 10-20% from second to second, two series timed one after the
 * other give a ratio that drifts as much. The dma backward line also gives the median of the
 * per-round ratios (backward call / the forward call just before it), which drift between
 * rounds does not move at all. Op "backward" lines for impl dma and dense time dma_backward()
 * on the out/lse their own forward produced (each impl has its own out and lse buffers), with a
 * random dout of a fixed seed; dq, dk, dv and dbias are allocated once per problem. dma uses the
 * bias and sparsity of its forward, causal=1, and asks for dbias whenever there is a bias (the
 * DMA bias is trainable); dense uses no sparsity, no bias and the dense forward's causal. Its
 * effective GFLOP/s count 10 * D flops per pair: 5 matmuls of 2 * D each (QK^T recomputed, dP,
 * dQ, dK, dV), i.e. 2.5x the forward's matrix work.
 *
 * Storage types (--dtype f32,bf16,f16, a list): per type, q, k, v (and dout) rounded from the
 * same floats (bench_dtype.c), dma_forward/dma_backward on them with a 16-bit out, float32 lse,
 * bias and gradients. The calls of all types alternate (f32 first), as the forward and backward
 * do, so that the 16-bit lines' speedup_vs_f32 compares calls that saw the same machine.
 * mask_build reads only the float32 bias and is timed once; the OpenBLAS baseline and SGEMM are
 * float32 only.
 *
 * Files: this one holds the options, the help and the modes (one shape, the sweep); the core
 * (problems, dmattn measurements) is bench_run.c, the OpenBLAS baseline bench_blas.c, the
 * reporters bench_report.c, the decode and prefill modes bench_decode.c, the thread-scaling
 * mode (--sweep-threads without --sweep) bench_scaling.c.
 *
 * Exit status: 0 success, 1 a library or allocation error (the library's status and last error
 * are printed), 2 a bad command line.
 */
#include <dmattn.h>

#include "bench_blas.h"
#include "bench_common.h"
#include "bench_decode.h"
#include "bench_dtype.h"
#include "bench_report.h"
#include "bench_run.h"
#include "bench_scaling.h"

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* In the sweep, dense and openblas at L >= this are timed with 1 run and no warm-up. */
#define SWEEP_LONG_L 16384

#define MAX_LIST 32

typedef struct int_list {
    int n;
    int64_t v[MAX_LIST];
} int_list;

typedef struct options {
    int64_t B, Lq, Lk, Hq, Hkv, D, window;
    int threads;
    int mask;
    int runs, warmup;
    double max_ms;
    int json;
    int sgemm;
    int64_t sgemm_n;
    dma_isa isa;
    int no_dense, no_openblas;
    int sweep, sweep_quick;
    int scaling; /* --sweep-threads without --sweep: the thread-scaling mode */
    int backward;
    int_list sw_lens, sw_windows, sw_dims, sw_hkvs, sw_threads;
    /* --decode, --prefill CHUNK (bench_decode.c) */
    int decode;
    int64_t prefill;
    /* --dtype LIST (decode, prefill and the regular modes); f32 first in the regular modes */
    int ndtypes;
    dma_dtype dtypes[BENCH_MAX_DTYPES];
    int dtype_set;
} options;

/* ------------------------------------------------------------------------------------------ */
/* Command line                                                                               */
/* ------------------------------------------------------------------------------------------ */

static void print_help(void)
{
    printf(
        "Usage: " PROG " [options]\n"
        "Times the dmattn forward (impl dma) against the library's dense path (impl dense) and a\n"
        "plain OpenBLAS dense attention (impl openblas); with --backward also the backward of\n"
        "dma and dense. Median wall-clock time of --runs calls after --warmup untimed calls.\n"
        "--decode and --prefill CHUNK time inference over a KV cache instead (see below; other\n"
        "defaults there).\n"
        "\n"
        "Shape and mask (one shape unless --sweep):\n"
        "  --batch N        batch B (default 1)\n"
        "  --lq N, --lk N   query / key length; each defaults to the other (default 2048)\n"
        "  --len N          sets both --lq and --lk\n"
        "  --hq N           query heads (default 8)\n"
        "  --hkv N          key/value heads, divides --hq (default 2)\n"
        "  --dim N          head dimension D, 1..%d (default 64)\n"
        "  --window N       keys kept per row (topk) or window length (window) (default 256)\n"
        "  --mask M         topk | window | causal | dense (default topk)\n"
        "      topk:   a random per-key bias (B, Hkv, 1, Lk), uniform [0,1), fixed seed;\n"
        "              dma_sparsity_rebuild(TOPK, causal=1, window) into the last run's object\n"
        "              timed as op mask_build (as a training step makes its mask; its note\n"
        "              gives a fresh dma_sparsity_build's time, timed alternately), then\n"
        "              dma_forward with that bias and sparsity, causal=1\n"
        "      window: the same with (WINDOW, causal=1, window) and B=H=1 (mask_build),\n"
        "              then dma_forward with that sparsity, no bias, causal=1\n"
        "      causal, dense: the dma forward would be the dense path itself (sparsity NULL,\n"
        "              causal 1 resp. 0), so only the dense and openblas lines are printed\n"
        "  --threads N      threads for dmattn and OpenBLAS alike (default: all, %d here)\n"
        "  --isa NAME       scalar | avx2 | avx512 | neon | auto (default auto: the best, or\n"
        "                   $DMATTN_ISA)\n"
        "\n"
        "Measurement:\n"
        "  --runs N         timed runs, median reported (default 5)\n"
        "  --warmup N       untimed runs first (default 1)\n"
        "  --max-time S     stop a measurement's timed runs once they total S seconds (at\n"
        "                   least 1 run; \"runs\" says how many were taken); 0 = off (default)\n"
        "  --sgemm          add an OpenBLAS SGEMM reference line (square N, same threads)\n"
        "  --sgemm-n N      its size (default 2048; implies --sgemm)\n"
        "  --no-dense       skip the library's dense path\n"
        "  --no-openblas    skip the OpenBLAS dense attention\n"
        "  --backward       also time dma_backward (op backward) for impl dma and dense, on the\n"
        "                   out/lse their forward produced and a random dout (fixed seed):\n"
        "                   dma with the forward's bias and sparsity, causal=1, dbias requested\n"
        "                   when there is a bias (topk); dense with no sparsity, no bias, causal\n"
        "                   as the dense forward. Works with --sweep too. (No OpenBLAS backward.)\n"
        "  --dtype LIST     storage of q, k, v, out (and dout): f32, bf16, f16 or a comma-\n"
        "                   separated list (e.g. f32,bf16), measured in one run, f32 first\n"
        "                   (default f32). 16-bit: q, k, v, dout rounded to nearest even from\n"
        "                   the same floats; dma_forward/dma_backward on them, out 16-bit, lse,\n"
        "                   bias and gradients float32. Per dtype a forward (and backward) line\n"
        "                   for dma and dense; the calls of all dtypes alternate call by call.\n"
        "                   mask_build (it reads the float32 bias) is timed once, openblas and\n"
        "                   sgemm are float32 only. More than one dtype: the table gets a dtype\n"
        "                   column and closing \"vs f32\" lines. Works with --sweep too. (For\n"
        "                   --decode/--prefill, see below.)\n"
        "  --json           JSON lines only (one object per measurement) instead of the table\n"
        "\n"
        "Sweep (--sweep): mask topk (or --mask window), causal, impls dma, dense, openblas, and\n"
        "one sgemm line per thread count, over\n"
        "  L in {1024, 4096, 16384, 32768}, window in {256, 1024, 4096}, D in {64, 128},\n"
        "  Hq = --hq (8), Hkv in {8, 2}, threads in {1, 2}, B = --batch.\n"
        "  dense and openblas do not depend on the window: they are timed once per\n"
        "  (L, D, Hkv, threads), with window null; at L >= %d they get 1 run and no warm-up\n"
        "  (their lines say so in \"runs\"/\"warmup\"). --backward adds a backward line per dma\n"
        "  forward and per dense forward (the dense backward runs like the dense forward).\n"
        "  --sweep-quick          L in {1024, 4096} only\n"
        "  --sweep-lens LIST      override the lists (comma-separated integers), e.g.\n"
        "  --sweep-windows LIST   --sweep-threads 1,2,16\n"
        "  --sweep-dims LIST\n"
        "  --sweep-hkvs LIST\n"
        "  --sweep-threads LIST\n"
        "\n"
        "Thread scaling (--sweep-threads LIST without --sweep, e.g. --sweep-threads 1,2,4,8):\n"
        "  the one shape above (mask topk or window) at each thread count: the dma mask_build,\n"
        "  forward and backward (always on here), and an OpenBLAS sgemm line (--sgemm-n) on as\n"
        "  many threads. Per op: time, speed-up and efficiency over the fewest threads listed,\n"
        "  GFLOP/s and their fraction of SGEMM at the same thread count (of_sgemm). The counts\n"
        "  run one after the other: on a busy machine, read ms_min/ms_max too. The mask build\n"
        "  splits a (batch, kv head) slab among threads only when B*Hkv is below the thread\n"
        "  count (try --hkv 1). Plot with tools/plot_bench.py.\n"
        "\n"
        "JSON fields: op (forward|mask_build|sgemm|backward), impl (dma|dense|openblas), mask\n"
        "(the mask the line computed: topk|window for dma, causal|dense for dense/openblas, null\n"
        "for sgemm), B, Lq, Lk, Hq, Hkv, D, window (null where the line does not depend on it),\n"
        "causal, threads, isa (the dmattn context's ISA, on every line), runs, warmup,\n"
        "ms_median, ms_min, ms_max, gflops (effective: 4*D*pairs/time; backward: 10*D*pairs/time,\n"
        "i.e. 5 matmuls of 2*D flops per pair, 2.5x the forward; 0 for mask_build;\n"
        "2*N^3/time for sgemm), pairs (selected (row, key) pairs over all batches and query\n"
        "heads; dma: dma_sparsity_nnz scaled to B and Hq). dma lines add nnz, work_ratio (dense\n"
        "pairs / dma pairs), sparsity_bytes; mask_build adds pct_of_forward and fresh_build_ms;\n"
        "forward lines add speedup_vs_dense, speedup_vs_openblas, gflops_vs_sgemm (null when\n"
        "not measured); the dense line adds max_abs_diff_vs_openblas; sgemm adds N. backward\n"
        "lines carry the forward lines' fields (speedup_vs_dense: dense backward ms / this ms;\n"
        "speedup_vs_openblas always null) plus bwd_fwd_ratio (this ms / the forward ms of the\n"
        "same impl, mask and window) and bwd_fwd_per_call (dma: the median over rounds of each\n"
        "backward call's time over the forward call's just before it; dense: null).\n"
        "Thread-scaling lines add base_threads (the fewest threads listed), thread_speedup (the\n"
        "base line's ms / this ms: same op, impl, dtype) and thread_efficiency (thread_speedup *\n"
        "base_threads / threads).\n"
        "dtype (f32|bf16|f16, --dtype) is on every line: the storage of q, k, v, out, dout;\n"
        "f32 for openblas and sgemm; mask_build carries the first dtype measured. The 16-bit\n"
        "forward and backward lines add speedup_vs_f32 (the f32 line's ms / this ms: same op,\n"
        "impl, mask, window, shape); their speedup_vs_dense and bwd_fwd_ratio compare lines of\n"
        "the same dtype, speedup_vs_openblas and gflops_vs_sgemm the float32 baselines.\n"
        "\n"
        "The OpenBLAS attention: per (batch, query head, block of %d rows) cblas_sgemm\n"
        "S = scale Q K^T over the block's visible key prefix, masked softmax, cblas_sgemm O = P V;\n"
        "OpenMP over the blocks with exactly --threads threads, single-threaded OpenBLAS inside.\n"
        "openblas and sgemm lines carry blas_core (openblas_get_corename()); a generic core on a\n"
        "CPU with AVX2 gets a warning: set OPENBLAS_CORETYPE (e.g. Haswell, SkylakeX) then.\n"
        "%s"
        "\n",
        DMA_MAX_HEAD_DIM, omp_get_max_threads(), SWEEP_LONG_L, BLAS_ROWS,
        HAVE_OPENBLAS ? "" : "(This build has no OpenBLAS: the openblas and sgemm lines are "
                             "not available.)\n");
    bench_decode_print_help();
    printf("\nExit status: 0 ok, 1 library or allocation error, 2 bad command line.\n");
}

static void parse_list(const char *flag, const char *s, int64_t lo, int64_t hi, int_list *out)
{
    out->n = 0;
    const char *p = s;
    while (1) {
        char item[64];
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (len == 0 || len >= sizeof item)
            usage_error("%s expects a comma-separated list of integers, got '%s'", flag, s);
        if (out->n >= MAX_LIST)
            usage_error("%s: at most %d values", flag, MAX_LIST);
        memcpy(item, p, len);
        item[len] = 0;
        out->v[out->n++] = parse_int(flag, item, lo, hi);
        if (!comma)
            break;
        p = comma + 1;
    }
}

static void set_list(int_list *l, const int64_t *v, int n)
{
    l->n = n;
    for (int i = 0; i < n; i++)
        l->v[i] = v[i];
}

static void parse_args(int argc, char **argv, options *o)
{
    memset(o, 0, sizeof *o);
    o->B = 1;
    o->Lq = -1;
    o->Lk = -1;
    o->Hq = 8;
    o->Hkv = 2;
    o->D = -1;      /* the defaults of D, window and threads depend on the mode: below */
    o->window = -1;
    o->threads = -1;
    o->mask = MASK_TOPK;
    o->runs = 5;
    o->warmup = 1;
    o->sgemm_n = 2048;
    o->isa = DMA_ISA_AUTO;
    int lens_set = 0, quick_lens_only = 0, mask_set = 0, dtype_set = 0;
    o->sw_lens.n = o->sw_windows.n = o->sw_dims.n = o->sw_hkvs.n = o->sw_threads.n = 0;

    const int64_t LMAX = INT32_MAX;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            print_help();
            exit(0);
        }
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0')
            usage_error("unexpected argument '%s'", arg);
        char name[64];
        const char *val = NULL;
        const char *eq = strchr(arg, '=');
        size_t nlen = eq ? (size_t)(eq - arg) : strlen(arg);
        if (nlen >= sizeof name)
            usage_error("unknown option '%s'", arg);
        memcpy(name, arg, nlen);
        name[nlen] = 0;
        if (eq)
            val = eq + 1;

#define IS(s) (!strcmp(name, (s)))
#define FLAG()                                                                                    \
    do {                                                                                          \
        if (val)                                                                                  \
            usage_error("option '%s' takes no value", name);                                      \
    } while (0)
#define VALUE()                                                                                   \
    (val ? val : (i + 1 < argc ? argv[++i] : (usage_error("option '%s' needs a value", name), "")))

        if (IS("--batch"))
            o->B = parse_int(name, VALUE(), 1, 1 << 20);
        else if (IS("--lq"))
            o->Lq = parse_int(name, VALUE(), 1, LMAX);
        else if (IS("--lk"))
            o->Lk = parse_int(name, VALUE(), 1, LMAX);
        else if (IS("--len"))
            o->Lq = o->Lk = parse_int(name, VALUE(), 1, LMAX);
        else if (IS("--hq"))
            o->Hq = parse_int(name, VALUE(), 1, 1 << 16);
        else if (IS("--hkv"))
            o->Hkv = parse_int(name, VALUE(), 1, 1 << 16);
        else if (IS("--dim"))
            o->D = parse_int(name, VALUE(), 1, DMA_MAX_HEAD_DIM);
        else if (IS("--window"))
            o->window = parse_int(name, VALUE(), 0, LMAX);
        else if (IS("--threads"))
            o->threads = (int)parse_int(name, VALUE(), 1, 4096);
        else if (IS("--runs"))
            o->runs = (int)parse_int(name, VALUE(), 1, 1000000);
        else if (IS("--warmup"))
            o->warmup = (int)parse_int(name, VALUE(), 0, 1000000);
        else if (IS("--max-time"))
            o->max_ms = 1000.0 * (double)parse_int(name, VALUE(), 0, 1000000);
        else if (IS("--mask")) {
            const char *m = VALUE();
            int k = -1;
            for (int j = 0; j < 4; j++)
                if (!strcmp(m, mask_names[j]))
                    k = j;
            if (k < 0)
                usage_error("--mask must be topk, window, causal or dense, got '%s'", m);
            o->mask = k;
            mask_set = 1;
        } else if (IS("--isa")) {
            const char *s = VALUE();
            static const struct {
                const char *name;
                dma_isa isa;
            } isas[] = {{"auto", DMA_ISA_AUTO},
                        {"scalar", DMA_ISA_SCALAR},
                        {"avx2", DMA_ISA_AVX2},
                        {"avx512", DMA_ISA_AVX512},
                        {"neon", DMA_ISA_NEON}};
            int k = -1;
            for (int j = 0; j < 5; j++)
                if (!strcmp(s, isas[j].name))
                    k = j;
            if (k < 0)
                usage_error("--isa must be scalar, avx2, avx512, neon or auto, got '%s'", s);
            o->isa = isas[k].isa;
        } else if (IS("--json")) {
            FLAG();
            o->json = 1;
        } else if (IS("--sgemm")) {
            FLAG();
            o->sgemm = 1;
        } else if (IS("--sgemm-n")) {
            o->sgemm_n = parse_int(name, VALUE(), 1, 65536);
            o->sgemm = 1;
        } else if (IS("--no-dense")) {
            FLAG();
            o->no_dense = 1;
        } else if (IS("--no-openblas")) {
            FLAG();
            o->no_openblas = 1;
        } else if (IS("--backward")) {
            FLAG();
            o->backward = 1;
        } else if (IS("--decode")) {
            FLAG();
            o->decode = 1;
        } else if (IS("--prefill")) {
            o->prefill = parse_int(name, VALUE(), 1, LMAX);
        } else if (IS("--dtype")) {
            decode_options d;
            memset(&d, 0, sizeof d);
            bench_decode_parse_dtypes(name, VALUE(), &d);
            o->ndtypes = d.ndtypes;
            memcpy(o->dtypes, d.dtypes, sizeof o->dtypes);
            dtype_set = 1;
        } else if (IS("--sweep")) {
            FLAG();
            o->sweep = 1;
        } else if (IS("--sweep-quick")) {
            FLAG();
            o->sweep_quick = 1;
            quick_lens_only = 1;
        } else if (IS("--sweep-lens")) {
            parse_list(name, VALUE(), 1, LMAX, &o->sw_lens);
            lens_set = 1;
        } else if (IS("--sweep-windows"))
            parse_list(name, VALUE(), 0, LMAX, &o->sw_windows);
        else if (IS("--sweep-dims"))
            parse_list(name, VALUE(), 1, DMA_MAX_HEAD_DIM, &o->sw_dims);
        else if (IS("--sweep-hkvs"))
            parse_list(name, VALUE(), 1, 1 << 16, &o->sw_hkvs);
        else if (IS("--sweep-threads"))
            parse_list(name, VALUE(), 1, 4096, &o->sw_threads);
        else
            usage_error("unknown option '%s'", arg);
#undef IS
#undef FLAG
#undef VALUE
    }

    int grid_opts = lens_set || quick_lens_only || o->sw_windows.n || o->sw_dims.n ||
                    o->sw_hkvs.n;
    int sweep_opts = grid_opts || o->sw_threads.n;
    if (o->decode || o->prefill) {
        /* the decode and prefill modes (bench_decode.c) take their own defaults */
        const char *bad = o->Lq >= 0 ? "--lq/--len" : mask_set ? "--mask"
                        : o->backward ? "--backward" : o->sgemm ? "--sgemm/--sgemm-n"
                        : o->no_dense ? "--no-dense" : o->no_openblas ? "--no-openblas"
                        : (o->sweep || sweep_opts) ? "--sweep*" : NULL;
        if (bad)
            usage_error("%s does not apply to --decode/--prefill", bad);
        if (o->Lk < 0)
            o->Lk = DECODE_DEFAULT_LK;
        if (o->D < 0)
            o->D = DECODE_DEFAULT_DIM;
        if (o->window < 0)
            o->window = DECODE_DEFAULT_WINDOW;
        if (o->threads < 0)
            o->threads = DECODE_DEFAULT_THREADS;
        if (o->window < 1)
            usage_error("--decode/--prefill need --window >= 1 (the top-k selection)");
        if (!dtype_set) {
            o->ndtypes = 1;
            o->dtypes[0] = DMA_F32;
        }
        if (o->Hq % o->Hkv != 0)
            usage_error("--hq (%lld) must be a multiple of --hkv (%lld)", (long long)o->Hq,
                        (long long)o->Hkv);
        return;
    }
    /* storage types of the regular modes: f32 first (the 16-bit lines are compared with it),
     * then the others in the order given; default f32 */
    o->dtype_set = dtype_set;
    if (!dtype_set) {
        o->ndtypes = 1;
        o->dtypes[0] = DMA_F32;
    }
    for (int i = 1; i < o->ndtypes; i++) {
        if (o->dtypes[i] == DMA_F32) {
            memmove(o->dtypes + 1, o->dtypes, (size_t)i * sizeof *o->dtypes);
            o->dtypes[0] = DMA_F32;
        }
    }
    if (o->D < 0)
        o->D = 64;
    if (o->window < 0)
        o->window = 256;
    if (o->threads < 0)
        o->threads = omp_get_max_threads();
    if (o->Lq < 0 && o->Lk < 0)
        o->Lq = o->Lk = 2048;
    else if (o->Lq < 0)
        o->Lq = o->Lk;
    else if (o->Lk < 0)
        o->Lk = o->Lq;
    if (o->Hq % o->Hkv != 0)
        usage_error("--hq (%lld) must be a multiple of --hkv (%lld)", (long long)o->Hq,
                    (long long)o->Hkv);

    if (grid_opts && !o->sweep)
        usage_error("the --sweep-* options other than --sweep-threads need --sweep");
    o->scaling = o->sw_threads.n && !o->sweep;
    if (o->scaling) {
        if (o->mask != MASK_TOPK && o->mask != MASK_WINDOW)
            usage_error("--sweep-threads measures --mask topk or window, not %s",
                        mask_names[o->mask]);
        o->backward = 1;
    }
    if (o->sweep) {
        if (o->mask != MASK_TOPK && o->mask != MASK_WINDOW)
            usage_error("--sweep measures --mask topk or window, not %s", mask_names[o->mask]);
        if (lens_set && quick_lens_only)
            usage_error("--sweep-quick and --sweep-lens exclude each other");
        static const int64_t lens[] = {1024, 4096, 16384, 32768}, wins[] = {256, 1024, 4096},
                             dims[] = {64, 128}, hkvs[] = {8, 2}, thr[] = {1, 2};
        if (!lens_set)
            set_list(&o->sw_lens, lens, o->sweep_quick ? 2 : 4);
        if (!o->sw_windows.n)
            set_list(&o->sw_windows, wins, 3);
        if (!o->sw_dims.n)
            set_list(&o->sw_dims, dims, 2);
        if (!o->sw_hkvs.n)
            set_list(&o->sw_hkvs, hkvs, 2);
        if (!o->sw_threads.n)
            set_list(&o->sw_threads, thr, 2);
    }
    if (!HAVE_OPENBLAS) {
        if (o->sgemm)
            fprintf(stderr, PROG ": note: built without OpenBLAS; no sgemm line\n");
        o->sgemm = 0;
        o->no_openblas = 1;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Modes                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* " dtype=f32,bf16" for the table's first line when --dtype was given, else "". */
static const char *dtype_list(const options *o, char *buf, size_t n)
{
    buf[0] = 0;
    if (!o->dtype_set)
        return buf;
    size_t k = (size_t)snprintf(buf, n, " dtype=");
    for (int i = 0; i < o->ndtypes && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%s", i ? "," : "", dtype_name(o->dtypes[i]));
    return buf;
}

/* Whether the OpenBLAS baseline's output can be compared with the dense one: both measured,
 * and the dense line of the first storage type is float32 (the baseline's). */
static int compare_blas(const problem *p, int i_dense, int i_blas)
{
    return i_dense >= 0 && i_blas >= 0 && p->dt[0].t == DMA_F32;
}

static int run_single(const options *o)
{
    dma_context *ctx = make_context(o->threads, o->isa);
    const char *isa = dma_isa_name(dma_context_isa(ctx));
    problem p;
    problem_init(&p, o->B, o->Lq, o->Lk, o->Hq, o->Hkv, o->D, o->backward, o->ndtypes,
                 o->dtypes);
    const report_style st = {o->json, 0, o->ndtypes > 1};

    result r[2 + 4 * BENCH_MAX_DTYPES], sg;
    int n = 0, have_sg = 0;
    memset(&sg, 0, sizeof sg);
    const int causal = o->mask != MASK_DENSE;
    const runspec rs = {o->warmup, o->runs, o->max_ms};
#if HAVE_OPENBLAS
    if (o->sgemm) {
        sg = measure_sgemm(o->sgemm_n, o->threads, isa, rs);
        have_sg = 1;
    }
#endif
    if (o->mask == MASK_TOPK || o->mask == MASK_WINDOW)
        n += measure_dma(ctx, &p, o->mask, o->window, rs, &r[n]);
    int i_dense = -1, i_blas = -1;
    if (!o->no_dense) {
        i_dense = n;
        n += measure_dense(ctx, &p, causal, rs, &r[n]);
        if (o->backward)
            n += measure_dense_backward(ctx, &p, causal, rs, &r[n]);
    }
#if HAVE_OPENBLAS
    if (!o->no_openblas) {
        i_blas = n;
        r[n++] = measure_openblas(&p, causal, o->threads, isa, rs);
    }
#endif
    if (compare_blas(&p, i_dense, i_blas))
        r[i_dense].max_abs_diff = max_abs_diff(p.out_dense, p.out_blas, p.n_q);
    link_results(r, n, have_sg ? &sg : NULL);

    if (!o->json) {
        char dts[64];
        printf("dmattn-bench: B=%lld Lq=%lld Lk=%lld Hq=%lld Hkv=%lld D=%lld window=%lld "
               "mask=%s threads=%d isa=%s runs=%d warmup=%d%s\n",
               (long long)o->B, (long long)o->Lq, (long long)o->Lk, (long long)o->Hq,
               (long long)o->Hkv, (long long)o->D, (long long)o->window, mask_names[o->mask],
               o->threads, isa, o->runs, o->warmup, dtype_list(o, dts, sizeof dts));
        print_table_header(st);
    }
    emit_group(st, r, n);
    if (have_sg) {
        emit(st, &sg);
        if (!o->json)
            print_sgemm_summary(st, r, n, &sg);
    }
    if (!o->json && o->ndtypes > 1)
        print_dtype_summary(r, n);
    problem_free(&p);
    dma_context_destroy(ctx);
    return 0;
}

static int run_sweep(const options *o)
{
    int progress = isatty(STDERR_FILENO) && !isatty(STDOUT_FILENO);
    const report_style st = {o->json, 1, o->ndtypes > 1};
    if (!o->json) {
        char dts[64];
        printf("dmattn-bench sweep: mask=%s causal B=%lld Hq=%lld runs=%d warmup=%d%s "
               "(dense/openblas at L >= %d: 1 run, no warm-up)\n",
               mask_names[o->mask], (long long)o->B, (long long)o->Hq, o->runs, o->warmup,
               dtype_list(o, dts, sizeof dts), SWEEP_LONG_L);
        print_table_header(st);
    }
    const int nwin = o->sw_windows.n, nd = o->ndtypes;
    const runspec rs = {o->warmup, o->runs, o->max_ms};
    /* per window: mask_build + forward[, backward] per dtype; dense likewise; openblas */
    result *r = xalloc((int64_t)nwin * (1 + 2 * nd) + 2 * nd + 1, sizeof *r, "results");
    for (int ti = 0; ti < o->sw_threads.n; ti++) {
        const int threads = (int)o->sw_threads.v[ti];
        dma_context *ctx = make_context(threads, o->isa);
        const char *isa = dma_isa_name(dma_context_isa(ctx));
        (void)isa; /* used by the OpenBLAS lines only */
        result sg;
        int have_sg = 0;
        memset(&sg, 0, sizeof sg);
#if HAVE_OPENBLAS
        sg = measure_sgemm(o->sgemm_n, threads, isa, rs);
        have_sg = 1;
        emit(st, &sg);
#endif
        for (int di = 0; di < o->sw_dims.n; di++) {
            for (int hi = 0; hi < o->sw_hkvs.n; hi++) {
                const int64_t D = o->sw_dims.v[di], Hkv = o->sw_hkvs.v[hi];
                if (o->Hq % Hkv) {
                    fprintf(stderr, PROG ": skipping Hkv=%lld: does not divide Hq=%lld\n",
                            (long long)Hkv, (long long)o->Hq);
                    continue;
                }
                for (int li = 0; li < o->sw_lens.n; li++) {
                    const int64_t L = o->sw_lens.v[li];
                    if (progress)
                        fprintf(stderr, "[sweep] threads=%d D=%lld Hkv=%lld L=%lld\n", threads,
                                (long long)D, (long long)Hkv, (long long)L);
                    problem p;
                    problem_init(&p, o->B, L, L, o->Hq, Hkv, D, o->backward, nd, o->dtypes);
                    const int long_l = L >= SWEEP_LONG_L;
                    /* dense and openblas are slow at long L: 1 run, no warm-up there */
                    const runspec brs = long_l ? (runspec){0, 1, 0.0} : rs;
                    int n = 0, i_dense = -1, i_blas = -1;
                    if (!o->no_dense) {
                        i_dense = n;
                        n += measure_dense(ctx, &p, 1, brs, &r[n]);
                        if (o->backward)
                            n += measure_dense_backward(ctx, &p, 1, brs, &r[n]);
                    }
#if HAVE_OPENBLAS
                    if (!o->no_openblas) {
                        i_blas = n;
                        r[n++] = measure_openblas(&p, 1, threads, isa, brs);
                    }
#endif
                    if (compare_blas(&p, i_dense, i_blas))
                        r[i_dense].max_abs_diff = max_abs_diff(p.out_dense, p.out_blas, p.n_q);
                    for (int wi = 0; wi < nwin; wi++)
                        n += measure_dma(ctx, &p, o->mask, o->sw_windows.v[wi], rs, &r[n]);
                    link_results(r, n, have_sg ? &sg : NULL);
                    emit_group(st, r, n);
                    problem_free(&p);
                }
            }
        }
        dma_context_destroy(ctx);
    }
    free(r);
    return 0;
}

static int run_scaling(const options *o)
{
    scaling_options so = {.B = o->B, .Lq = o->Lq, .Lk = o->Lk, .Hq = o->Hq, .Hkv = o->Hkv,
                          .D = o->D, .window = o->window, .mask = o->mask,
                          .nthreads = o->sw_threads.n, .threads = o->sw_threads.v, .isa = o->isa,
                          .ndtypes = o->ndtypes, .dtypes = o->dtypes,
                          .rs = {o->warmup, o->runs, o->max_ms}, .sgemm_n = o->sgemm_n,
                          .json = o->json};
    return bench_scaling_run(&so);
}

static int run_decode(const options *o)
{
    decode_options d;
    memset(&d, 0, sizeof d);
    d.decode = o->decode;
    d.prefill = o->prefill;
    d.B = o->B;
    d.lk = o->Lk;
    d.hq = o->Hq;
    d.hkv = o->Hkv;
    d.dim = o->D;
    d.window = o->window;
    d.threads = o->threads;
    d.isa = o->isa;
    d.ndtypes = o->ndtypes;
    memcpy(d.dtypes, o->dtypes, sizeof d.dtypes);
    d.runs = o->runs;
    d.warmup = o->warmup;
    d.max_ms = o->max_ms;
    d.json = o->json;
    settle_blas(); /* OpenBLAS's workers spin for a while after the library is loaded */
    return bench_decode_run(&d);
}

int main(int argc, char **argv)
{
    options o;
    parse_args(argc, argv, &o);
    if (o.decode || o.prefill)
        return run_decode(&o);
    if (o.sweep || o.scaling || o.sgemm || !o.no_openblas)
        check_blas_core();
    settle_blas(); /* OpenBLAS's workers spin for a while after the library is loaded */
    if (o.scaling)
        return run_scaling(&o);
    return o.sweep ? run_sweep(&o) : run_single(&o);
}

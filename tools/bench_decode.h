/*
 * bench_decode.h - the decode and chunked-prefill modes of dmattn-bench (--decode,
 * --prefill CHUNK): a KV cache (dma_kv_cache_*) of --lk tokens, one decode step of the dense
 * and the dma attention (dma_kv_forward) against a plain memory read of the same bytes, and a
 * prefill chunk against the dma forward of the same length. Implemented in bench_decode.c.
 */
#ifndef DMATTN_BENCH_DECODE_H
#define DMATTN_BENCH_DECODE_H

#include <dmattn.h>

#include <stdint.h>

#define BENCH_MAX_DTYPES 3

/* Defaults of the decode and prefill modes (the configuration). */
#define DECODE_DEFAULT_LK 262144
#define DECODE_DEFAULT_DIM 128
#define DECODE_DEFAULT_WINDOW 1024
#define DECODE_DEFAULT_THREADS 1

typedef struct decode_options {
    int decode;                          /* time read_bw and the dense and dma decode steps */
    int64_t prefill;                     /* > 0: time prefill of this many tokens; 0: none */
    int64_t B, lk, hq, hkv, dim, window;
    int threads;
    dma_isa isa;
    int ndtypes;                         /* 1..BENCH_MAX_DTYPES; f32 is measured first */
    dma_dtype dtypes[BENCH_MAX_DTYPES];
    int runs, warmup;
    double max_ms;
    int json;
} decode_options;

/* Parse the value of --dtype: f32, bf16, f16 or a comma-separated list of them (no repeats)
 * into o->dtypes / o->ndtypes; anything else is a usage error (exit 2). */
void bench_decode_parse_dtypes(const char *flag, const char *s, decode_options *o);

/* The --help section of the decode and prefill modes (on stdout). */
void bench_decode_print_help(void);

/* Run the modes o asks for; output on stdout (JSON lines or a table). Returns the exit status
 * (0); library and allocation failures exit 1, a size the cache cannot hold exits 2. */
int bench_decode_run(const decode_options *o);

#endif /* DMATTN_BENCH_DECODE_H */

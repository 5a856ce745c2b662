/*
 * test_cuda.h - what test_cuda.c (main, errors, helpers), test_cuda_sparsity.c (the sparsity
 * builders) and test_cuda_grid.c (the forward and backward grids) share: device memory, tensors
 * laid out once and given to a CPU context (host image) and to a CUDA context (device copy),
 * tolerance statistics, and the tests each file adds to the suite.
 * Everything below needs the CUDA runtime: only built when DMATTN_HAVE_CUDA is defined.
 */
#ifndef DMATTN_TESTS_TEST_CUDA_H
#define DMATTN_TESTS_TEST_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

#if DMATTN_HAVE_CUDA

/* ---- device memory: every CUDA error fails the current test ---- */

/** cudaMalloc of max(bytes, 256) bytes (an empty tensor still gets a non-NULL pointer). */
void *dev_alloc(size_t bytes);
void dev_free(void *p);
void dev_put(void *dev, const void *host, size_t bytes);
void dev_get(void *host, const void *dev, size_t bytes);

/** A CUDA context on GPU 0 (stream: NULL = the legacy default stream); a CPU context with every
 *  core and the best ISA. Both fail the test when they cannot be made. */
dma_context *cuda_ctx(void *stream);
dma_context *cpu_ctx(void);

/* ---- a tensor laid out once: a host image for the CPU context, its copy on the GPU ---- */

typedef struct tbuf {
    dma_dtype dt;
    int ndim;
    int64_t rows, inner, pad; /* logical rows x inner; `pad` elements after every row */
    size_t esize, bytes;      /* element size; bytes of the image */
    unsigned char *host;      /* the image the CPU context reads or writes */
    unsigned char *back;      /* the image downloaded from the GPU (tb_get) */
    void *dev;                /* the image on the GPU */
    dma_tensor th, td;        /* the same view over host and over dev */
} tbuf;

/** ndim 1..4 sizes; the last dimension padded by `pad` elements (a strided view when > 0).
 *  Both images start as the sentinel pattern (the device copy too). */
void tb_make(tbuf *b, dma_dtype dt, int ndim, const int64_t *shape, int64_t pad);
void tb_free(tbuf *b);
int64_t tb_count(const tbuf *b);
/** Stores logical values (rounded to nearest even for bf16/f16; nonzero -> 1 for bool) into the
 *  host image; `vals` is overwritten with the values stored (as float). Then uploads. */
void tb_store(tbuf *b, float *vals);
/** Host image -> device; device -> back image. */
void tb_upload(tbuf *b);
void tb_download(tbuf *b);
/** The device copy and the back image to the sentinel pattern (the host image is kept). */
void tb_reset(tbuf *b);
/** Logical element x of an image (host or back), as float. */
float tb_at(const tbuf *b, const unsigned char *img, int64_t x);
/** 1 if every padding element of the image still holds the sentinel pattern. */
int tb_gaps_untouched(const tbuf *b, const unsigned char *img);

/* ---- sparsity objects ---- */

/** The dense (B, H, Lq, Lk) selection of an object (malloc'd), its size in *n. */
uint8_t *sp_dense(const dma_sparsity *sp, size_t *n);

/* ---- tolerance statistics: the worst err / tol seen per named check, printed with
 *      DMATTN_TEST_VERBOSE=1 (to see how much room the tolerances leave) ---- */

void stat_note(const char *name, double err, double tol);
void stat_print(const char *test);

/* ---- the tests of the other files, added to test_cuda.c's one TCase ---- */

/** The sparsity builders against the CPU's (test_cuda_sparsity.c). */
void cuda_sparsity_add_tests(TCase *tc);
/** The forward and backward grids (test_cuda_grid.c). */
void cuda_grid_add_tests(TCase *tc);

#endif /* DMATTN_HAVE_CUDA */

#endif /* DMATTN_TESTS_TEST_CUDA_H */

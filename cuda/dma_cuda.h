/*
 * dma_cuda.h - the C interface of the CUDA backend (the .cu files of cuda/), called by lib/device.c only.
 * Plain structs, no library types: the .cu files are C++ and do not include lib/internal.h.
 * Functions return 0 on success; a negative value is a CUDA runtime error, which
 * dcu_last_error() describes (per thread).
 */
#ifndef DMATTN_CUDA_H
#define DMATTN_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A strided tensor of up to 4 dimensions in device memory; data NULL = absent.
 * dtype: 0 float32, 1 bf16, 2 f16, 3 bool (dma_dtype's values). */
typedef struct dcu_tensor {
    const void *data;
    int dtype;
    int64_t shape[4];
    int64_t stride[4];
} dcu_tensor;

/* One tile of the sparsity object: the layout of lib/internal.h's dma_tile (checked there). */
typedef struct dcu_tile {
    int64_t key_off, word_off;
    int32_t first, count, words_per_row, pad_;
} dcu_tile;

/* A sparsity object's device arrays (lib/internal.h explains each). ready: NULL, or a
 * cudaEvent_t that the arrays are complete at (a build that returned before its kernel ended);
 * work on another stream waits for it (dcu_ready_wait), host reads sync on it. */
typedef struct dcu_sparsity {
    int64_t B, H, Lq, Lk, ntiles;
    dcu_tile *tiles;
    int32_t *row_lo, *row_hi, *keys;
    uint64_t *words;
    int64_t nkeys, nwords, nnz;
    void *ready;
} dcu_sparsity;

/* A validated attention call. */
typedef struct dcu_attn {
    int64_t B, Lq, Lk, Hq, Hkv, D, off;
    float scale, softcap;
    int causal;
    dcu_tensor q, k, v, bias, out, lse;
    dcu_sparsity sp;
} dcu_attn;

/* What a context keeps between calls: the device's figures, read once, and the mask build's
 * result slots (host memory the GPU writes directly, so that a build reads its result without
 * a copy, and sees it arrive without synchronising the stream; grown when a call needs more,
 * freed by dcu_state_free). */
typedef struct dcu_state {
    int sms, smem_optin; /* multiprocessors; shared memory a block may opt in to */
    int topk_smem;       /* the mask build kernel's shared-memory limit, as set */
    void *slots;         /* mapped, pinned host memory */
    void *slots_dev;     /* the same memory, as the GPU addresses it */
    size_t slot_bytes;
    unsigned long long builds; /* the number of the last build, which its slots carry */
} dcu_state;

const char *dcu_last_error(void);
int dcu_device_count(void);
int dcu_set_device(int device);
/* Select the device, set up its memory pool and fill st (once per context). */
int dcu_init(int device, dcu_state *st);
/* Frees st's host memory (not st itself). */
void dcu_state_free(dcu_state *st);
/* 1 if p is memory GPU `device` can read as device memory (device or managed), else 0. */
int dcu_on_device(const void *p, int device);
int dcu_copy_to_device(void *dst, const void *src, size_t bytes, void *stream);
int dcu_copy_to_host(void *dst, const void *src, size_t bytes, void *stream);
int dcu_sync(void *stream);
/* Waits for all work of the current device (every stream). */
int dcu_device_sync(void);

/* Causal top-`window` selection over a per-key bias (Bb, Hb, 1, Lk) float32 for an object of
 * (B, H, Lq, Lk), bottom-right aligned; pad optional (Bp, Lk) bool. Allocates sp's arrays
 * (free with dcu_sparsity_free, and dcu_ready_free) and fills sp; it may return before the
 * arrays are complete, with sp->ready set (nnz and the bias check are final). Returns 0; 1
 * when the bias holds a NaN or +inf; 2 when the window is too large for it (its lists need
 * more shared memory than the GPU has: build it on the host); < 0 on a runtime error.
 * Nothing is allocated unless it returns 0. */
int dcu_build_topk_causal(int64_t window, const dcu_tensor *bias, const dcu_tensor *pad,
                          dcu_sparsity *sp, dcu_state *st, void *stream);
/* The same for key axes too long for dcu_build_topk_causal's shared memory (mask_topk_tree.cu:
 * a merge tree of best-w lists and a descent per key); called by it. */
int dcu_build_topk_causal_tree(int64_t window, const dcu_tensor *bias, const dcu_tensor *pad,
                               dcu_sparsity *sp, void *stream);
/* Allocates sp's arrays for sp->B * sp->H * sp->ntiles tiles, sp->B * sp->H * sp->Lq rows,
 * nkeys keys and nwords words, from the device's pool, ordered on `stream`: one allocation
 * (its base is sp->tiles), so that a build pays for one call, not five. Sets the pointers
 * and nkeys, nwords; on failure sets none and returns < 0. */
int dcu_sparsity_alloc(dcu_sparsity *sp, int64_t nkeys, int64_t nwords, void *stream);
/* Frees sp's arrays (dcu_sparsity_alloc's allocation) ordered on `stream`. */
void dcu_sparsity_free(dcu_sparsity *sp, void *stream);
/* Orders `stream`'s later work after the object's arrays are complete (nothing when sp->ready
 * is NULL); dcu_ready_sync waits for that on the host; dcu_ready_free releases the event. */
int dcu_ready_wait(const dcu_sparsity *sp, void *stream);
int dcu_ready_sync(const dcu_sparsity *sp);
void dcu_ready_free(dcu_sparsity *sp);

int dcu_forward(const dcu_attn *a, void *stream);
/* The tensor-core forward (bf16 / f16, D % 16 == 0, D <= 128, 16-byte aligned rows): whether
 * it takes a call, and the call over `items` work items. */
int dcu_forward_mma_fits(const dcu_attn *a);
int dcu_forward_mma(const dcu_attn *a, int64_t items, void *stream);
/* The tensor-core backward (bf16 / f16, D % 16 == 0, D <= 128, 16-byte aligned rows of q, k,
 * v and dout): whether it takes a call, and the call over `items` work items (dk, dv, dbias
 * already zeroed). */
int dcu_backward_mma_fits(const dcu_attn *a, const dcu_tensor *dout);
int dcu_backward_mma(const dcu_attn *a, const dcu_tensor *dout, const dcu_tensor *dq,
                     const dcu_tensor *dk, const dcu_tensor *dv, const dcu_tensor *dbias,
                     int64_t items, void *stream);
/* dq, dk, dv float32 written whole; dbias (data NULL = not asked) written whole. */
int dcu_backward(const dcu_attn *a, const dcu_tensor *dout, const dcu_tensor *dq,
                 const dcu_tensor *dk, const dcu_tensor *dv, const dcu_tensor *dbias,
                 void *stream);

#ifdef __cplusplus
}
#endif

#endif

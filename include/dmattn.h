/*
 * dmattn.h - the whole public C API of dmattn, a CPU-first library for
 * trainable Dynamic Mask Attention (DMA; Shi et al., arXiv 2508.02124).
 *
 * Conventions that hold for every function below
 * ------------------------------------------------
 * - Shapes: B batch, Lq query length, Lk key length, Hq query heads, Hkv key/value heads,
 *   D head dimension (1..256). Tensors are "BSHD": q (B, Lq, Hq, D), k and v (B, Lk, Hkv, D),
 *   out (B, Lq, Hq, D). Hq must be a multiple of Hkv; query head h reads kv head h / (Hq / Hkv).
 * - Tensors are described by dma_tensor: a data pointer, a dtype, ndim sizes and ndim strides
 *   counted in elements. The last stride must be 1; the others may be anything >= 0.
 * - Causal masks are bottom-right aligned: key j is visible to query i iff j <= i + (Lk - Lq).
 * - Every function validates all its arguments before it writes anything. On error it returns a
 *   dma_status other than DMA_OK, leaves every output untouched, prints nothing and never aborts.
 *   dma_status_string() names the status; dma_context_last_error() gives a sentence about the
 *   latest failure of a call made with that context.
 * - Ownership: the caller owns every buffer it passes in. Objects the library allocates
 *   (dma_context, dma_sparsity) are opaque and freed with their _destroy function.
 * - Threading: the library runs OpenMP threads inside a call (the context's thread count). A
 *   context must not be used by two threads at the same time (it holds the last error message);
 *   make one context per calling thread, they are cheap. A dma_sparsity is read-only once built
 *   and may be shared by any number of threads and calls. There is no global mutable state.
 * - Results do not depend on the thread count: the same inputs give bitwise identical outputs for
 *   any number of threads.
 */
#ifndef DMATTN_H
#define DMATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Marks the library's exported functions; everything else in the shared library is hidden. */
#if defined(__GNUC__) && !defined(DMATTN_STATIC_ONLY)
#define DMA_API __attribute__((visibility("default")))
#else
#define DMA_API
#endif

#define DMATTN_VERSION_MAJOR 0
#define DMATTN_VERSION_MINOR 1
#define DMATTN_VERSION_PATCH 0

/** Largest head dimension D the kernels accept. */
#define DMA_MAX_HEAD_DIM 256

/* ------------------------------------------------------------------------------------------ */
/* Status codes                                                                               */
/* ------------------------------------------------------------------------------------------ */

/** Result of every fallible call. DMA_OK is 0; every other value is an error. */
typedef enum dma_status {
    DMA_OK = 0,
    DMA_ERR_NULL,           /**< a required pointer argument is NULL */
    DMA_ERR_SHAPE,          /**< sizes disagree with each other or with the documented shape */
    DMA_ERR_STRIDE,         /**< a last stride is not 1, or a stride is negative */
    DMA_ERR_DTYPE,          /**< wrong or not yet supported element type */
    DMA_ERR_HEADS,          /**< Hq is not a multiple of Hkv, or a head count is < 1 */
    DMA_ERR_HEAD_DIM,       /**< D is outside 1..DMA_MAX_HEAD_DIM */
    DMA_ERR_WINDOW,         /**< window or block size is negative or out of range */
    DMA_ERR_OVERFLOW,       /**< a size or an offset does not fit the library's index types */
    DMA_ERR_NOMEM,          /**< memory allocation failed */
    DMA_ERR_BAD_VALUE,      /**< a NaN or +inf bias where a mask is generated, or a bad scalar */
    DMA_ERR_ISA,            /**< the requested instruction set is not supported by this CPU/build */
    DMA_ERR_ARG,            /**< any other invalid argument (unknown enum value, ...) */
    DMA_ERR_BUFFER,         /**< a caller-given output buffer is too small */
    DMA_ERR_OVERLAP,        /**< an output's memory overlaps an input it is computed from, or
                                 another output (address ranges spanned by the tensors) */
    DMA_ERR_DEVICE,         /**< CUDA: no backend in this build, no usable GPU, a CUDA runtime
                                 error, memory on the wrong side (host vs device), an object of
                                 the other kind of context, or a call a CUDA context lacks */
    DMA_STATUS_COUNT_       /**< number of status codes (not a status) */
} dma_status;

/** A short, static, human-readable name for a status ("invalid head dimension", ...).
 *  Never NULL; unknown values give "unknown status". Thread-safe. */
DMA_API const char *dma_status_string(dma_status status);

/* ------------------------------------------------------------------------------------------ */
/* Tensors                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/** Element types. DMA_BF16 (bfloat16) and DMA_F16 (IEEE binary16) are storage types: the
 *  attention (q, k, v, out, dout; the KV cache) reads them into float32 exactly and computes in
 *  float32; a 16-bit output is the float32 result rounded once to nearest-even, so it is within
 *  2^-9 (bf16) or 2^-12 (f16) relative of the float32 output on the same stored inputs. (Where
 *  dma_context_bf16_dot() says so, the forward's bf16 Q K^T sums exact bf16 products in float32
 *  in another order: the output can then differ from the float32 forward's by float32 rounding
 *  before its own rounding, one bf16 step at most.) Biases,
 *  lse and gradients are always float32. The 16-bit tensors hold the raw bit patterns
 *  (uint16_t). */
typedef enum dma_dtype {
    DMA_F32 = 0,
    DMA_BF16 = 1,
    DMA_F16 = 2,
    DMA_BOOL = 3 /**< one byte per element, 0 = false, anything else = true */
} dma_dtype;

/** Maximum number of dimensions of a dma_tensor. */
#define DMA_MAX_DIMS 4

/** A non-owning view of a strided array. Strides are in elements, not bytes. */
typedef struct dma_tensor {
    void *data;                    /**< first element; owned by the caller */
    dma_dtype dtype;               /**< element type */
    int ndim;                      /**< number of dimensions used, 1..DMA_MAX_DIMS */
    int64_t shape[DMA_MAX_DIMS];   /**< sizes, each >= 0 */
    int64_t stride[DMA_MAX_DIMS];  /**< element strides, each >= 0; stride[ndim-1] must be 1 */
} dma_tensor;

/** A contiguous row-major 4-D view (strides computed from the shape). No validation; pure. */
DMA_API dma_tensor dma_tensor_4d(void *data, dma_dtype dtype, int64_t d0, int64_t d1, int64_t d2,
                         int64_t d3);

/** A contiguous row-major 3-D view, e.g. lse (B, Hq, Lq). No validation; pure. */
DMA_API dma_tensor dma_tensor_3d(void *data, dma_dtype dtype, int64_t d0, int64_t d1, int64_t d2);

/** A contiguous row-major 2-D view, e.g. a key padding mask (B, Lk). No validation; pure. */
DMA_API dma_tensor dma_tensor_2d(void *data, dma_dtype dtype, int64_t d0, int64_t d1);

/** A contiguous 1-D view, e.g. the per-head A (Hkv) of the dynamic bias. No validation; pure. */
DMA_API dma_tensor dma_tensor_1d(void *data, dma_dtype dtype, int64_t d0);

/* ------------------------------------------------------------------------------------------ */
/* Context                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/** Instruction sets of the CPU kernels. */
typedef enum dma_isa {
    DMA_ISA_AUTO = 0,   /**< the best the CPU supports (or the one DMATTN_ISA names) */
    DMA_ISA_SCALAR,     /**< the portable C path, on any CPU */
    DMA_ISA_AVX2,       /**< x86-64 AVX2 + FMA */
    DMA_ISA_AVX512,     /**< x86-64 AVX-512 F (+BW, VL, DQ) */
    DMA_ISA_NEON        /**< aarch64 Advanced SIMD */
} dma_isa;

/** Where a context computes. */
typedef enum dma_device {
    DMA_DEVICE_CPU = 0, /**< the CPU kernels (default) */
    DMA_DEVICE_CUDA     /**< an NVIDIA GPU (the optional cuda/ backend; see below) */
} dma_device;

/** Options for dma_context_create(). Zero-initialise, then set what you need. */
typedef struct dma_context_options {
    int threads;   /**< OpenMP threads per call; 0 = omp_get_max_threads(); must be >= 0 */
    dma_isa isa;   /**< DMA_ISA_AUTO honours the environment variable DMATTN_ISA
                        (scalar|avx2|avx512|neon); any other value forces that ISA */
    dma_device device;  /**< DMA_DEVICE_CPU (0, default) or DMA_DEVICE_CUDA */
    int cuda_device;    /**< DMA_DEVICE_CUDA: the device ordinal (0 = the first GPU) */
    void *cuda_stream;  /**< DMA_DEVICE_CUDA: the cudaStream_t the calls run on; NULL = the
                             legacy default stream (which orders with PyTorch's default) */
} dma_context_options;

/** Opaque context: thread count, chosen kernels, last error message. */
typedef struct dma_context dma_context;

/**
 * Create a context.
 * @param opts  options, or NULL for all defaults.
 * @param out   receives the new context on success; untouched on error.
 * @return DMA_OK; DMA_ERR_NULL (out is NULL); DMA_ERR_ARG (negative threads, unknown isa or
 *         device, a DMATTN_ISA value that is not a known name, or a DMATTN_TN_ROWS value
 *         other than 64 or 128); DMA_ERR_ISA (the ISA asked for, by option or environment,
 *         is not supported by this CPU or was not built);
 *         DMA_ERR_DEVICE (DMA_DEVICE_CUDA without a CUDA backend in this build, or the device
 *         ordinal names no usable GPU); DMA_ERR_NOMEM.
 * With the environment variable DMATTN_BF16_DOT=1, an AVX-512 context on a CPU with
 * AVX512_BF16 computes the Q K^T of forwards whose q and k are both bf16 with VDPBF16PS (bf16
 * products are exact; bf16 subnormals count as zero). It is off by default because it was
 * slower than the float32 path on the Xeon (Sapphire Rapids) it was measured on, which issues
 * one VDPBF16PS per cycle against two float32 FMAs: the same products per cycle.
 * DMATTN_TN_ROWS=64|128 sets how many query rows one of dma_backward's dK and dV products may
 * take at once (128: two blocks of 64 that cover the same keys go together). The default is
 * 128 for the AVX-512 kernels on AMD Zen 4, where it measured about 1% faster, and 64
 * elsewhere (128 was no faster on a Sapphire Rapids Xeon, and slower there at 2 threads). The
 * gradients are bitwise the same either way; any other non-empty value gives DMA_ERR_ARG.
 * Thread-safe (no shared state). The environment is read only here.
 */
DMA_API dma_status dma_context_create(const dma_context_options *opts, dma_context **out);

/*
 * CUDA contexts (DMA_DEVICE_CUDA; built when nvcc was found, see README). A CUDA context runs
 * dma_sparsity_build, dma_sparsity_from_mask, dma_forward and dma_backward on the GPU:
 * - every tensor's data is device memory of that GPU (cudaMalloc, managed memory, or a PyTorch
 *   CUDA tensor's data_ptr()); host memory gives DMA_ERR_DEVICE, before anything runs;
 * - a sparsity object built by a CUDA context lives on its GPU and is usable only with CUDA
 *   contexts of that GPU (DMA_ERR_DEVICE otherwise, and for a CPU object given to a CUDA call);
 *   dma_sparsity_nnz, _shape, _bytes and _to_dense (into host memory) work on it;
 * - validation, status codes, messages and semantics (DESIGN §1) are those of the CPU path;
 *   a NaN or +inf bias is found by the GPU builder and reported as DMA_ERR_BAD_VALUE;
 * - dma_forward and dma_backward are stream-ordered, as CUDA kernels and PyTorch operations
 *   are: they validate, enqueue their work on the context's stream and return; out, lse and
 *   the gradients are complete once that stream reaches this point (cudaStreamSynchronize, an
 *   event, or later work on the same stream). Keep their tensors alive until then. An error
 *   of the kernels' execution (not of their launch) shows at a later call.
 *   dma_sparsity_from_mask and dma_sparsity_to_dense are synchronous. dma_sparsity_build
 *   returns with its status and the object's nnz final (it reports a NaN or +inf bias, and
 *   the object's size is known), but the GPU's causal top-k build returns as soon as its
 *   blocks have checked and counted the keys, early in its kernel (about a fifth of the way
 *   in at 32K keys): the object's tiles are complete once the context's stream reaches the
 *   point of the call, as a forward's out is. Nothing needs to be done for that: dma_forward and dma_backward with
 *   the object, on any CUDA context, enqueue a wait for it on their own stream first, and
 *   dma_sparsity_to_dense waits for it. Meanwhile the calling thread spins on the blocks'
 *   results in host memory, whatever the device's scheduling flags (as cudaStreamSynchronize
 *   does by default). An error of that kernel's execution after those results shows at a
 *   later call. dma_sparsity_destroy of a GPU object first waits for all work of its GPU, as
 *   cudaFree does, so an object may be destroyed right after a call;
 * - exceptions, documented and tested: (1) bf16/f16 forwards on tensor cores round the softmax
 *   weights P to the storage type before P V (as flash attention does): out is within
 *   2^-8 * sum_j p_ij |v_j| (plus the output's own rounding) of the float32 result, lse within
 *   1e-5 relative; float32 inputs are computed in float32. (2) the backward adds the
 *   contributions to dk, dv and dbias with atomic float32 adds, so their last bits may change
 *   from run to run; out, lse and dq are bitwise reproducible. (On sm_90 the tensor-core
 *   backward (3) adds four floats at once where every row of dk and dv starts 16-byte
 *   aligned, as in contiguous float32 gradients; two where rows are 8-byte aligned; else one:
 *   padded gradients are as correct, and slower.) (3) bf16/f16 backwards on
 *   tensor cores (D a multiple of 16 up to 128, 16-byte aligned rows) round P and dS to the
 *   storage type before the products dq = dS K, dk = dS^T Q, dv = P^T dout (as flash attention
 *   does; everything else, dbias included, is float32): each gradient entry is within
 *   2^-8 * (its sum with every factor taken absolute) of the float32 result; with f16, a dS
 *   beyond f16's range (65504) becomes infinite;
 * - dma_dynamic_bias_forward/_backward and the KV cache return DMA_ERR_DEVICE with a CUDA
 *   context in this version (compute the bias with your framework, or on a CPU context);
 * - a CUDA context keeps, until dma_context_destroy, a few KiB of pinned host memory that the
 *   GPU mask build writes its per-block results to (grown by a build that needs more), and
 *   reads the GPU's figures once, at dma_context_create.
 * The library needs no CUDA library at run time (the CUDA runtime is linked statically and
 * loads the driver only when a CUDA context is created).
 */

/** Number of CUDA devices a CUDA context can use: 0 when this build has no CUDA backend or no
 *  driver or GPU is present. Thread-safe. */
DMA_API int dma_cuda_device_count(void);

/** Where the context computes. ctx must not be NULL. */
DMA_API dma_device dma_context_device(const dma_context *ctx);

/** Free a context and the scratch memory it keeps. NULL is a no-op. */
DMA_API void dma_context_destroy(dma_context *ctx);

/**
 * Free the scratch memory the context keeps between calls. A CPU context's dma_forward and
 * dma_backward keep their per-thread working memory (panels of the largest call so far: a few
 * MiB per thread, more for wide unions and D) for the next call, so that calls do not pay a page
 * fault for every fresh page; it is freed here or by dma_context_destroy. Calls after this one
 * allocate it again. NULL is a no-op.
 */
DMA_API void dma_context_trim(dma_context *ctx);

/** The ISA the context's kernels use (never DMA_ISA_AUTO). ctx must not be NULL. */
DMA_API dma_isa dma_context_isa(const dma_context *ctx);

/** The thread count the context's calls use (>= 1). ctx must not be NULL. */
DMA_API int dma_context_threads(const dma_context *ctx);

/** 1 if the context's forward computes Q K^T of bf16 q and k with bf16 dot-product
 *  instructions (an AVX-512 context on a CPU with AVX512_BF16 when DMATTN_BF16_DOT=1 was set;
 *  see dma_context_create), else 0. ctx must not be NULL. */
DMA_API int dma_context_bf16_dot(const dma_context *ctx);

/** Lower-case name of an ISA: "auto", "scalar", "avx2", "avx512", "neon"; "unknown" otherwise. */
DMA_API const char *dma_isa_name(dma_isa isa);

/** 1 if this build and this CPU can run the ISA's kernels, else 0. Thread-safe. */
DMA_API int dma_isa_supported(dma_isa isa);

/** A sentence describing the latest error of a call made with ctx ("" if none yet). The string
 *  belongs to the context and is valid until the next call with it. ctx must not be NULL. */
DMA_API const char *dma_context_last_error(const dma_context *ctx);

/* ------------------------------------------------------------------------------------------ */
/* Sparsity: which keys each query row attends to                                             */
/* ------------------------------------------------------------------------------------------ */

/** Opaque sparsity object (DESIGN §2): for every (batch, head, tile of query rows), the sorted
 *  union of the keys any row of the tile selected and, per row, which of those it selected.
 *  Memory is O(Lq * (window + tile)) for causal top-k, never O(Lq * Lk) unless the selection
 *  itself is that large. Read-only after it is built; shareable across threads. */
typedef struct dma_sparsity dma_sparsity;

/** Mask kinds (DESIGN §1 "Mask generation"). */
typedef enum dma_mask_kind {
    DMA_MASK_TOPK = 0,  /**< per row, the `window` visible keys with the largest bias */
    DMA_MASK_RELU,      /**< per row, the visible keys with bias > 0 */
    DMA_MASK_WINDOW,    /**< sliding window: keys p - window < j <= p, p = i + (Lk - Lq) */
    DMA_MASK_DENSE      /**< every visible key (causal or not): the MHA baseline */
} dma_mask_kind;

/** Parameters of a mask generator. Zero-initialise, then set what you need. */
typedef struct dma_mask_params {
    dma_mask_kind kind;
    int causal;          /**< nonzero: a row sees only keys j <= i + (Lk - Lq) (bottom-right) */
    int64_t window;      /**< TOPK: keys kept per row (>= 0); WINDOW: window length (>= 0);
                              ignored by RELU and DENSE */
    int64_t block_size;  /**< 0 or 1: no smoothing. > 1: along the key axis, blocks of
                              block_size keys (the last may be shorter) are kept whole when more
                              than half of the block's keys were kept, else dropped; the result is
                              then limited to the visible keys (causal, padding) again */
} dma_mask_params;

/**
 * Build a sparsity object for attention of Lq query rows over Lk keys.
 *
 * @param ctx          context (threads, error message).
 * @param params       mask kind and its parameters.
 * @param B, H         batch and head count of the object (H is usually Hkv for a per-key bias,
 *                     Hq for a per-row bias, or 1). The forward accepts an object whose B is 1 or
 *                     its batch, and whose H is 1, Hkv or Hq.
 * @param Lq, Lk       query and key lengths (>= 0, each at most INT32_MAX).
 * @param bias         float32 (Bb, Hb, Lb, Lk) with Bb in {1, B}, Hb in {1, H}, Lb in {1, Lq}:
 *                     the selection score. Lb == 1 is a per-key bias (the DMA case, fast
 *                     streaming builder); Lb == Lq a per-row bias. Required for TOPK and RELU,
 *                     ignored (may be NULL) for WINDOW and DENSE. NaN or +inf anywhere in it gives
 *                     DMA_ERR_BAD_VALUE; a -inf key is never kept.
 * @param key_padding  optional DMA_BOOL (Bp, Lk) with Bp in {1, B}: nonzero = the key exists;
 *                     zero = padding, never kept. NULL: every key exists.
 * @param out          receives the new object on success; untouched on error.
 *
 * Rows that can see fewer keys than `window` keep every visible key. Top-k ties go to the earlier
 * key. Cost of the causal top-k builder with a per-key bias: O(B*H*Lk*log(window)) time plus the
 * size of the object; no O(Lq*Lk) memory anywhere. With a CUDA context the GPU's top-k build
 * may return before the object's tiles are written (its status and nnz are final); every use
 * of the object waits for them (see "CUDA contexts" above).
 * Errors: DMA_ERR_NULL, DMA_ERR_ARG (unknown kind), DMA_ERR_SHAPE, DMA_ERR_STRIDE, DMA_ERR_DTYPE,
 * DMA_ERR_WINDOW (negative window or block_size), DMA_ERR_OVERFLOW, DMA_ERR_BAD_VALUE,
 * DMA_ERR_NOMEM.
 */
DMA_API dma_status dma_sparsity_build(dma_context *ctx, const dma_mask_params *params, int64_t B,
                              int64_t H, int64_t Lq, int64_t Lk, const dma_tensor *bias,
                              const dma_tensor *key_padding, dma_sparsity **out);

/**
 * Build a sparsity object again, in the memory of one the caller has: the arguments and the
 * result are those of dma_sparsity_build(), byte for byte, but each of the old object's arrays
 * that is large enough is reused instead of allocated afresh. A training loop that rebuilds its
 * mask every step with this call allocates nothing large once the sizes settle, and writes
 * into pages it has already touched (a fresh build of a 6 MiB object spends more time in page
 * faults than in selecting, measured on 2 cores).
 *
 * @param sp  in: NULL (the call is then dma_sparsity_build()) or any object (of any builder,
 *            shape and kind); out: the new object.
 *            An object of a CUDA context, or any object when ctx is a CUDA context, is freed
 *            and a new one built. The old object must not be in use by another call.
 * On error *sp is freed and set to NULL, so that no stale or partly written object is left
 * behind; the status and message are those of dma_sparsity_build() (DMA_ERR_NULL where sp,
 * ctx or params is NULL); messages of argument checks that name the call say
 * sparsity_rebuild (a CUDA runtime error's still says sparsity_build). Threads: as
 * dma_sparsity_build().
 */
DMA_API dma_status dma_sparsity_rebuild(dma_context *ctx, const dma_mask_params *params, int64_t B,
                                int64_t H, int64_t Lq, int64_t Lk, const dma_tensor *bias,
                                const dma_tensor *key_padding, dma_sparsity **sp);

/**
 * Build a sparsity object from a dense boolean mask (compatibility with flash-sparse-attn):
 * `mask` is DMA_BOOL (B, H, Lq, Lk), nonzero = attend. Any dimension may have stride 0 to
 * broadcast; the object gets the mask's B and H. Costs O(B*H*Lq*Lk) time to read the mask.
 * Errors: DMA_ERR_NULL, DMA_ERR_SHAPE, DMA_ERR_STRIDE, DMA_ERR_DTYPE, DMA_ERR_OVERFLOW,
 * DMA_ERR_NOMEM.
 */
DMA_API dma_status dma_sparsity_from_mask(dma_context *ctx, const dma_tensor *mask, dma_sparsity **out);

/** Free a sparsity object. NULL is a no-op. */
DMA_API void dma_sparsity_destroy(dma_sparsity *sp);

/** Sizes of a sparsity object; any output pointer may be NULL. sp must not be NULL. */
DMA_API void dma_sparsity_shape(const dma_sparsity *sp, int64_t *B, int64_t *H, int64_t *Lq,
                        int64_t *Lk);

/** Number of selected (row, key) pairs over all batches and heads of the object. */
DMA_API int64_t dma_sparsity_nnz(const dma_sparsity *sp);

/** Bytes of memory the object's selection takes (for reporting; not a promise about allocator
 *  overhead). A rebuilt object may hold more: the arrays of its largest earlier selection. */
DMA_API size_t dma_sparsity_bytes(const dma_sparsity *sp);

/**
 * Write the selection as a dense boolean array (B, H, Lq, Lk), row-major, 1 = selected.
 * Meant for tests and inspection: it is O(B*H*Lq*Lk).
 * @param out        caller's buffer; `out_bytes` must be >= B*H*Lq*Lk, else DMA_ERR_BUFFER and
 *                   nothing is written.
 * Errors: DMA_ERR_NULL, DMA_ERR_BUFFER.
 */
DMA_API dma_status dma_sparsity_to_dense(const dma_sparsity *sp, uint8_t *out, size_t out_bytes);

/* ------------------------------------------------------------------------------------------ */
/* Attention                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/** Scalar parameters of attention. Zero-initialise, then set what you need. */
typedef struct dma_attn_params {
    float scale;    /**< multiplies <q, k>; 0 means 1/sqrt(D). Must be finite. */
    float softcap;  /**< > 0: score = softcap * tanh(score / softcap); 0: off. Must be finite, >= 0 */
    int causal;     /**< nonzero: keys j > i + (Lk - Lq) are never attended, whatever the sparsity */
} dma_attn_params;

/**
 * Attention forward over the selected keys (DESIGN §1):
 *   score(i, j) = scale * <q_i, k_j>, then softcap, then + bias(i, j); unselected keys are -inf;
 *   p = softmax over the row; out_i = sum_j p_ij v_j; lse_i = log sum_j exp(score(i, j)).
 * A row with no selected key gives out = 0 and lse = -inf, whatever its q holds.
 * Non-finite values propagate, so that divergence in training is never hidden as an empty row:
 * a NaN in q_i, or in k, v or the bias of a key that row i selected, gives row i a NaN out (every
 * element; for a NaN in v[j][d], element d) and a NaN lse. The scores of keys a row did not
 * select never matter. But, as in any dense masked implementation (0 * NaN = NaN), the P V
 * product multiplies the zero weights of a block of rows with the values of every key that rows
 * of their query tile (DESIGN §2) selected, or of two consecutive tiles, which the forward may
 * process together: a NaN in v[j][d] may also give a NaN out[d] to rows of those tiles and kv
 * head that did not select key j. An out row that holds a NaN always has a
 * NaN lse. An infinite input may give NaN (inf - inf), or an empty row where it makes every
 * selected score -inf (as a -inf bias does).
 *
 * @param q, k, v   (B, Lq, Hq, D), (B, Lk, Hkv, D), (B, Lk, Hkv, D): float32, bf16 or f16, all
 *                  three (and out) of one type; 16-bit inputs are computed on as float32.
 * @param bias      optional float32 (Bb, Hb, Lb, Lk): Bb in {1, B}, Hb in {1, Hkv, Hq},
 *                  Lb in {1, Lq}; query head h reads bias head h / (Hq / Hb). Not scanned: a
 *                  NaN at a key a row selected makes that row NaN (above); a NaN at a key it
 *                  did not select is never read into its result.
 * @param sp        optional sparsity with Lq, Lk equal to the inputs', B in {1, B} and H in
 *                  {1, Hkv, Hq} (query head h uses object head h / (Hq / H)). NULL: every
 *                  visible key (dense, or causal with params->causal): the dense baseline runs
 *                  through the same kernels.
 * @param params    scale, softcap, causal. NULL: defaults (all zero).
 * @param out       (B, Lq, Hq, D) of q's type, written whole (16-bit: the float32 result
 *                  rounded once to nearest-even).
 * @param lse       optional float32 (B, Hq, Lq): the log-sum-exp of each row (needed by the
 *                  backward). NULL: not written.
 * Work and memory are proportional to the number of selected keys, not to Lq * Lk.
 * Errors: DMA_ERR_NULL, DMA_ERR_SHAPE, DMA_ERR_STRIDE, DMA_ERR_DTYPE, DMA_ERR_HEADS,
 * DMA_ERR_HEAD_DIM, DMA_ERR_OVERFLOW, DMA_ERR_BAD_VALUE (non-finite scale or softcap, negative
 * softcap), DMA_ERR_OVERLAP (the address range of out or lse overlaps q's, k's, v's, bias's
 * or each other's: no in-place forward), DMA_ERR_NOMEM.
 */
DMA_API dma_status dma_forward(dma_context *ctx, const dma_tensor *q, const dma_tensor *k,
                       const dma_tensor *v, const dma_tensor *bias, const dma_sparsity *sp,
                       const dma_attn_params *params, dma_tensor *out, dma_tensor *lse);

/**
 * Attention backward over the same selection as the forward (DESIGN §3). P is recomputed from
 * the saved lse; with dS = P * (dP - rowsum(dout * out)) (times softcap's derivative when on):
 *   dq = scale * dS K,  dk = scale * dS^T Q,  dv = P^T dout,  dbias = dS reduced over every axis
 *   the bias broadcasts over (the query axis of a (B, H, 1, Lk) bias, the query heads that share
 *   a bias head, the batch of a (1, ...) bias).
 * Rows that selected nothing (lse = -inf) give zero gradients: a zero dq row and nothing added
 * to dk, dv or dbias, even where their q is not finite. A NaN lse (a NaN row of the forward, see
 * dma_forward) gives that row a NaN dq row and NaN dk, dv and dbias at every key it selected;
 * NaN inputs reach the gradients as they reach the forward's rows. What other rows and keys get
 * is unchanged, except for the products 0 * NaN within the key union of a query tile (or of two
 * consecutive tiles, which the backward may process together), as in any dense masked
 * implementation: a NaN in k[j][d] may give a NaN dq[d] to rows of that tile that did not select
 * key j, and a NaN in q_i[d] a NaN dk[d] to keys of the union that row i did not select.
 *
 * @param q, k, v, bias, sp, params   exactly what the forward was called with.
 * @param out, lse  the forward's outputs: (B, Lq, Hq, D) of q's type and float32 (B, Hq, Lq);
 *                  both required.
 * @param dout      (B, Lq, Hq, D) of q's type: the gradient of the loss with respect to out.
 *                  With bf16/f16 inputs everything is read into float32 exactly and the
 *                  gradients below are float32 (on a CPU context equal, bit for bit, to the
 *                  float32 backward on the same stored values; CUDA contexts: see exception (3)
 *                  above).
 * @param dq        float32 (B, Lq, Hq, D), written whole.
 * @param dk, dv    float32 (B, Lk, Hkv, D), written whole (keys nobody selected get 0).
 * @param dbias     optional float32 with the bias's shape, written whole; requires bias.
 *                  NULL: not computed.
 * Results are bitwise identical for any thread count: contributions to dk, dv and dbias are
 * summed in a fixed order (work items add into them in turn). Scratch memory is per thread: the
 * panels of one work item (1.8 MiB at D = 128) and the private dk/dv/dbias of one work item,
 * O((window + tile) * D); nothing is O(Lq * Lk) except a per-row dbias, which is that size
 * itself.
 * Errors: those of dma_forward, plus DMA_ERR_NULL (lse, dout, dq, dk or dv missing; dbias without
 * bias), DMA_ERR_SHAPE (a gradient's shape differs from its input's), DMA_ERR_DTYPE (dout not
 * of q's type, or a gradient that is not float32) and DMA_ERR_OVERLAP (a gradient's address
 * range overlaps that of q, k, v, bias, out, lse or dout). The gradients may be interleaved
 * views of one buffer (dq, dk and dv in the rows of one fused array), as they are written
 * element by element; gradients that share elements give undefined values.
 */
DMA_API dma_status dma_backward(dma_context *ctx, const dma_tensor *q, const dma_tensor *k,
                        const dma_tensor *v, const dma_tensor *bias, const dma_sparsity *sp,
                        const dma_attn_params *params, const dma_tensor *out,
                        const dma_tensor *lse, const dma_tensor *dout, dma_tensor *dq,
                        dma_tensor *dk, dma_tensor *dv, dma_tensor *dbias);

/* ------------------------------------------------------------------------------------------ */
/* Dynamic bias from values: the trainable mask generator (DESIGN §1)                         */
/* ------------------------------------------------------------------------------------------ */

/**
 * The value-derived per-key bias that DMA's top-k mask is built from. For every batch b, key t
 * and kv head h, with v_flat[b, t, :] the Hkv * D values of key t of all kv heads concatenated
 * (head 0 first):
 *   dt[b, t, h]      = sum_x v_flat[b, t, x] * w_dt[x, h] + b_dt[h]
 *   bias[b, h, 0, t] = a[h] * softplus(dt[b, t, h]),   softplus(x) = log(1 + exp(x))
 * The result has the shape dma_sparsity_build() and dma_forward() take for a per-key bias.
 *
 * @param v     float32 (B, Lk, Hkv, D), any strides with a unit last stride (a view into a
 *              fused qkv buffer is fine).
 * @param w_dt  float32 (Hkv * D, Hkv), 2-D.
 * @param b_dt  optional float32 (Hkv), 1-D; NULL means zero.
 * @param a     float32 (Hkv), 1-D.
 * @param bias  float32 (B, Hkv, 1, Lk), written whole.
 * The projection runs on OpenBLAS sgemm when the library was built with OpenBLAS (with
 * OpenBLAS's own threads, OPENBLAS_NUM_THREADS), else on a portable loop (also used for views
 * OpenBLAS cannot take, e.g. a token stride of 0 when Lk == 1); the rest uses the context's
 * threads. Results do not depend on the context's thread count. Scratch: B * Lk * Hkv floats.
 * B == 0 or Lk == 0 is valid and writes nothing. Non-finite values propagate (a NaN in v gives
 * a NaN bias, which dma_sparsity_build() then reports).
 * Errors: DMA_ERR_NULL, DMA_ERR_SHAPE, DMA_ERR_STRIDE, DMA_ERR_DTYPE, DMA_ERR_HEADS (Hkv < 1),
 * DMA_ERR_HEAD_DIM, DMA_ERR_OVERFLOW, DMA_ERR_OVERLAP (bias shares memory with an input),
 * DMA_ERR_NOMEM.
 */
DMA_API dma_status dma_dynamic_bias_forward(dma_context *ctx, const dma_tensor *v,
                                            const dma_tensor *w_dt, const dma_tensor *b_dt,
                                            const dma_tensor *a, dma_tensor *bias);

/**
 * Backward of dma_dynamic_bias_forward(): from dbias (the gradient dma_backward() gives for the
 * bias), with g = dbias[b, h, 0, t] and ddt = g * a[h] * sigmoid(dt[b, t, h]):
 *   dv_flat[b, t, x] += sum_h ddt[b, t, h] * w_dt[x, h]     (ADDED into the caller's dv)
 *   dw_dt[x, h]       = sum_{b,t} v_flat[b, t, x] * ddt[b, t, h]
 *   db_dt[h]          = sum_{b,t} ddt[b, t, h]
 *   da[h]             = sum_{b,t} g * softplus(dt[b, t, h])
 * dt is recomputed from v (nothing is saved by the forward).
 *
 * @param v, w_dt, b_dt, a   exactly what the forward was called with.
 * @param dbias     float32 (B, Hkv, 1, Lk).
 * @param dv        optional float32 (B, Lk, Hkv, D), any strides with a unit last stride: the
 *                  contribution is added to what it holds (usually dma_backward()'s dv). NULL:
 *                  not computed.
 * @param dw_dt     optional float32 (Hkv * D, Hkv), written whole. NULL: not computed.
 * @param db_dt     optional float32 (Hkv), written whole. NULL: not computed.
 * @param da        optional float32 (Hkv), written whole. NULL: not computed.
 * db_dt may be asked for when b_dt is NULL (its gradient at zero). With B == 0 or Lk == 0 the
 * sums are empty: dw_dt, db_dt and da become 0. Scratch: B * Lk * Hkv floats, plus
 * 2 * B * ceil(Lk / 512) * Hkv doubles when db_dt or da is asked for.
 * Sums over b and t run in a fixed order: results do not depend on the context's thread count.
 * Errors: those of the forward; a gradient is checked like its input (DMA_ERR_NULL for a NULL
 * data pointer, DMA_ERR_DTYPE, DMA_ERR_STRIDE, DMA_ERR_SHAPE when its shape differs);
 * DMA_ERR_OVERLAP when the address range of dv or of a parameter gradient overlaps an input's
 * (v, w_dt, b_dt, a, dbias).
 */
DMA_API dma_status dma_dynamic_bias_backward(dma_context *ctx, const dma_tensor *v,
                                             const dma_tensor *w_dt, const dma_tensor *b_dt,
                                             const dma_tensor *a, const dma_tensor *dbias,
                                             dma_tensor *dv, dma_tensor *dw_dt,
                                             dma_tensor *db_dt, dma_tensor *da);

/* ------------------------------------------------------------------------------------------ */
/* Inference: a paged KV cache with an incremental top-k selection (DESIGN §2 "KV cache")      */
/* ------------------------------------------------------------------------------------------ */

/** Opaque KV cache: for B sequences ("entries") and Hkv kv heads, the keys, values and per-key
 *  biases appended so far, stored in pages of `page_len` tokens taken from one pool shared by
 *  all entries, and, per (entry, kv head), the state of the causal top-`window` selection (the
 *  heap of dma_sparsity_build()'s streaming builder). Memory: the pages in use, plus O(window)
 *  per (entry, head) for the selection, plus O(n) for the journal of the last append of n
 *  tokens; nothing is O(L^2). Threads: an append or a reset must not run at the same time as any
 *  other call on the same cache; dma_kv_forward() and the inspection calls only read the cache and
 *  may run concurrently with each other (each with its own context). */
typedef struct dma_kv_cache dma_kv_cache;

/** Parameters of dma_kv_cache_create(). Zero-initialise, then set what you need. */
typedef struct dma_kv_cache_params {
    int64_t batch;      /**< B: sequences the cache holds (>= 1) */
    int64_t kv_heads;   /**< Hkv (>= 1) */
    int64_t head_dim;   /**< D (1..DMA_MAX_HEAD_DIM) */
    dma_dtype dtype;    /**< storage of keys and values: DMA_F32, DMA_BF16 or DMA_F16 */
    int64_t max_len;    /**< most tokens one entry may hold (>= 1, <= INT32_MAX) */
    int64_t window;     /**< keys kept per row by the incremental causal top-k selection (>= 0;
                             one above max_len means max_len, as get_params reports).
                             0: no selection state (appends take no bias; only the DMA_MASK_DENSE
                             and DMA_MASK_WINDOW kinds of dma_kv_forward() can be used) */
    int64_t page_len;   /**< tokens per page (>= 1); 0 = 256 */
    int64_t max_pages;  /**< pages the pool may hold at once (>= 0); 0 = enough for every entry
                             at max_len. A smaller pool is shared first come, first served:
                             an append that needs a page the pool cannot give fails with
                             DMA_ERR_NOMEM and changes nothing */
} dma_kv_cache_params;

/**
 * Create an empty KV cache. Pages are allocated as entries grow (never copied when they do);
 * pages an entry frees (dma_kv_cache_reset) are reused by any entry.
 * Errors: DMA_ERR_NULL (ctx, params or out), DMA_ERR_SHAPE (batch, kv_heads, max_len, page_len
 * or max_pages out of range), DMA_ERR_HEAD_DIM, DMA_ERR_DTYPE (not F32, BF16 or F16),
 * DMA_ERR_WINDOW (negative window), DMA_ERR_OVERFLOW, DMA_ERR_NOMEM. `out` is untouched on error.
 */
DMA_API dma_status dma_kv_cache_create(dma_context *ctx, const dma_kv_cache_params *params,
                                       dma_kv_cache **out);

/** Free a cache and all its pages. NULL is a no-op. */
DMA_API void dma_kv_cache_destroy(dma_kv_cache *cache);

/** The parameters the cache was created with (page_len and max_pages with their defaults
 *  resolved). cache must not be NULL. */
DMA_API dma_kv_cache_params dma_kv_cache_get_params(const dma_kv_cache *cache);

/** Tokens entry b holds (0 <= b < B), or -1 when b is out of range. cache must not be NULL. */
DMA_API int64_t dma_kv_cache_length(const dma_kv_cache *cache, int64_t b);

/** Pages the pool holds in use / allocated in all (either pointer may be NULL). Pages are
 *  allocated in groups of up to 8 MiB (2 MiB aligned and marked for transparent huge pages, so
 *  that scattered decode reads do not miss the TLB at every row), never beyond max_pages. */
DMA_API void dma_kv_cache_pages(const dma_kv_cache *cache, int64_t *in_use, int64_t *allocated);

/**
 * Empty entry b (or every entry when b == -1): its length becomes 0, its selection state is
 * cleared and its pages go back to the pool for any entry to reuse.
 * Errors: DMA_ERR_NULL, DMA_ERR_SHAPE (b outside -1..B-1; nothing is reset).
 */
DMA_API dma_status dma_kv_cache_reset(dma_kv_cache *cache, int64_t b);

/**
 * Append n tokens to every entry, or counts[b] <= n tokens to entry b (a ragged append: entry b
 * takes rows 0 .. counts[b]-1 of its slice of k, v and bias).
 *
 * @param k, v    (B, n, Hkv, D) of the cache's dtype, any strides with a unit last stride.
 * @param bias    float32 (B, Hkv, 1, n): the per-key selection score (and the bias
 *                dma_kv_forward() adds to the scores). Required when the cache has a window,
 *                must be NULL when it has none. NaN or +inf gives DMA_ERR_BAD_VALUE; a -inf key is
 *                never selected.
 * @param counts  NULL (every entry appends n) or B values in 0..n.
 * Each appended key is offered to the (entry, head)'s top-window heap: O(log window) per key
 * and head. The selection of the newest row after the append, and of every row the append
 * added, is what dma_sparsity_build() (TOPK, causal, per-key bias) gives for the same rows over
 * the whole sequence, bit for bit, whatever the chunking of the appends.
 * All or nothing: every argument, every count against max_len, every bias value and the pages
 * needed are checked (and the pages taken) before anything is written; on error the cache is as
 * it was. Uses the context's threads over (entry, head).
 * Errors: DMA_ERR_NULL, DMA_ERR_SHAPE (sizes, a count outside 0..n, or an entry that would
 * exceed max_len), DMA_ERR_STRIDE, DMA_ERR_DTYPE, DMA_ERR_BAD_VALUE, DMA_ERR_ARG (a bias for
 * a cache without a window), DMA_ERR_NOMEM (memory, or the pool's max_pages).
 */
DMA_API dma_status dma_kv_cache_append(dma_context *ctx, dma_kv_cache *cache,
                                       const dma_tensor *k, const dma_tensor *v,
                                       const dma_tensor *bias, const int64_t *counts);

/**
 * dma_kv_cache_append() with the value-derived bias of dma_dynamic_bias_forward() computed by
 * the library from v (converted to float32 first when the cache stores bf16/f16), w_dt, b_dt
 * and a. The cache must have a window. Errors: those of both functions.
 */
DMA_API dma_status dma_kv_cache_append_dynamic(dma_context *ctx, dma_kv_cache *cache,
                                               const dma_tensor *k, const dma_tensor *v,
                                               const dma_tensor *w_dt, const dma_tensor *b_dt,
                                               const dma_tensor *a, const int64_t *counts);

/**
 * The keys the newest row of entry b, kv head h selects (the top-window keys of its prefix by
 * bias), sorted ascending, into keys[0 .. *n). At most min(window, length) keys.
 * Errors: DMA_ERR_NULL, DMA_ERR_SHAPE (b or h out of range), DMA_ERR_ARG (the cache has no
 * window), DMA_ERR_BUFFER (cap too small; *n receives the count needed, keys is untouched).
 */
DMA_API dma_status dma_kv_cache_selection(const dma_kv_cache *cache, int64_t b, int64_t h,
                                          int32_t *keys, int64_t cap, int64_t *n);

/**
 * The selection of the newest Lq rows of every entry as a sparsity object (B, Hkv, Lq, Lk) with
 * Lk = the longest entry's length; row i of entry b is position length_b - Lq + i, and its keys
 * are positions of entry b. Meant for tests and inspection (dma_sparsity_to_dense()); the rows
 * must lie within each entry's last append (Lq <= that append's count for every entry).
 * Cost O(Lq * log(window) + tiles * (window + Lq)) per (entry, head).
 * Errors: DMA_ERR_NULL, DMA_ERR_ARG (no window), DMA_ERR_SHAPE (Lq < 0, or more rows than an
 * entry's last append added), DMA_ERR_NOMEM.
 */
DMA_API dma_status dma_kv_cache_sparsity(dma_context *ctx, const dma_kv_cache *cache, int64_t Lq,
                                         dma_sparsity **out);

/** Parameters of dma_kv_forward(). Zero-initialise, then set what you need. */
typedef struct dma_kv_attn_params {
    dma_mask_kind kind; /**< DMA_MASK_TOPK: the cache's incremental selection (needs a window);
                             DMA_MASK_WINDOW: the last `window` positions; DMA_MASK_DENSE: every
                             cached key up to the row's position. RELU is not supported. */
    int64_t window;     /**< DMA_MASK_WINDOW only (>= 0) */
    int add_bias;       /**< nonzero: add the cached per-key bias to the scores (the cache must
                             hold biases, i.e. have a window) */
    float scale;        /**< 0 = 1/sqrt(D); must be finite */
    float softcap;      /**< as in dma_attn_params */
} dma_kv_attn_params;

/**
 * Attention of the newest rows of every entry over the cache: decode (Lq = 1) or chunked
 * prefill (Lq up to the last append's count), causal, bottom-right aligned per entry.
 *
 * @param q       (B, Lq, Hq, D) of the cache's dtype (or float32), Hq a multiple of Hkv. Row i
 *                of entry b is position length_b - n_b + i, n_b = counts ? counts[b] : Lq.
 * @param counts  NULL or B values in 0..Lq: ragged batches, one call for entries of different
 *                lengths and different numbers of new rows. Rows i >= n_b are written as empty
 *                rows (out 0, lse -inf).
 * @param out     (B, Lq, Hq, D), the dtype of q, written whole. The output is rounded once
 *                from the fp32 accumulator.
 * @param lse     optional float32 (B, Hq, Lq).
 * For TOPK, a chunk's selection is rebuilt from the cache's heap and the last append's journal
 * in O(n_b * log(window) + (window + n_b) * tiles) per (entry, head), never O(length); the
 * selected keys are gathered from their pages (converted to float32 for bf16/f16 storage).
 * The rows must lie within each entry's last append for TOPK (DMA_ERR_SHAPE otherwise); DENSE
 * and WINDOW serve any n_b <= length_b.
 * Results match dma_forward() over the same keys, values, bias and selection to float32
 * rounding (not bitwise: the order of the sums may differ); with bf16/f16 storage the inputs are
 * what was stored.
 * Errors: DMA_ERR_NULL, DMA_ERR_SHAPE, DMA_ERR_STRIDE, DMA_ERR_DTYPE, DMA_ERR_HEADS,
 * DMA_ERR_ARG (kind not supported, or TOPK/add_bias on a cache without a window),
 * DMA_ERR_WINDOW, DMA_ERR_BAD_VALUE (scale, softcap), DMA_ERR_OVERLAP (out or lse shares
 * memory with q or each other), DMA_ERR_NOMEM.
 */
DMA_API dma_status dma_kv_forward(dma_context *ctx, const dma_kv_cache *cache,
                                  const dma_tensor *q, const int64_t *counts,
                                  const dma_kv_attn_params *params, dma_tensor *out,
                                  dma_tensor *lse);

#ifdef __cplusplus
}
#endif

#endif /* DMATTN_H */

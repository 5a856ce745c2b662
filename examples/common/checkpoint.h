/*
 * checkpoint.h - saving and resuming a training run.
 *
 * File format, version 1. Every number is little-endian; i32/u32/i64/u64 are two's complement
 * integers, f32 IEEE-754 binary32.
 *
 *   offset  size        field
 *   0       8           magic "DMATRAIN"
 *   8       4   u32     format version (1)
 *   12      4   u32     bytes of the fixed header that follows (116 in version 1)
 *   16      48  12 x i32 vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff, max_seq,
 *                       attention kind (0 dense, 1 swa, 2 dma), window, attn_only,
 *                       tie_embeddings, pos_embeddings
 *   64      12  3 x f32 rope_theta, norm_eps, init_std
 *   76      28  7 x f32 lr, min_lr, beta1, beta2, eps, weight_decay, grad_clip
 *   104     8   2 x i32 warmup_steps, total_steps
 *   112     8   i64     optimizer steps taken
 *   120     8   u64     n, the parameter count (must equal the count the config implies)
 *   128     4   u32     u, bytes of the caller's own section (at most 65536)
 *   132     u           the caller's section (e.g. the example's data settings)
 *   132+u   4n  f32[n]  parameters, in the order of model->tensors
 *           4n  f32[n]  AdamW first moments
 *           4n  f32[n]  AdamW second moments
 *   end-8   8   u64     FNV-1a 64-bit hash of every byte before it
 *
 * Loading checks, before it creates anything: the magic, the version, the header size, every
 * configuration field (model_config_check, adamw_config_check), n against the configuration,
 * the file's exact length, and the hash. A truncated, corrupted or foreign file gives -1 and a
 * sentence in err, and every output is left untouched.
 * Saving writes `path`.tmp and renames it over `path`, so a crash never leaves half a file.
 */
#ifndef DMTRAIN_CHECKPOINT_H
#define DMTRAIN_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

#define CHECKPOINT_VERSION 1
#define CHECKPOINT_USER_MAX 65536

/** Save the model's configuration, parameters, optimizer moments and step, the optimizer's
 *  settings and `user_bytes` bytes of `user` (NULL when 0). 0 or -1 with a sentence in err. */
int checkpoint_save(const model *m, const adamw_config *opt, const void *user,
                    uint32_t user_bytes, const char *path, char *err, size_t errlen);

/** Create a model (for batches of up to max_batch sequences, `threads` threads) from a
 *  checkpoint and fill *opt. The caller's section is copied to `user` (user_capacity bytes;
 *  a larger section is an error) and its size to *user_bytes (either may be NULL when the
 *  caller expects none). 0, or -1 with a sentence in err and nothing written. */
int checkpoint_load(const char *path, int max_batch, int threads, model **out,
                    adamw_config *opt, void *user, uint32_t user_capacity, uint32_t *user_bytes,
                    char *err, size_t errlen);

#endif /* DMTRAIN_CHECKPOINT_H */

/* attn_common.cuh - what the forward and the backward kernels share: one work item is (batch,
 * query head, tile of 64 query rows); the tile's key union is read in chunks. */
#ifndef DMATTN_CUDA_ATTN_COMMON_CUH
#define DMATTN_CUDA_ATTN_COMMON_CUH

#include "common.cuh"

/* Threads of a work item's block: 4 per query row of the tile. */
#define DCU_ITEM_THREADS (4 * DCU_TILE)

struct dcu_item {
    int64_t b, h, tile, hkv, slab, r0;
    int nrows;
    dcu_tile t;
    bool per_key_bias, row_bias; /* a bias of shape (., ., 1, Lk), or (., ., Lq, Lk) */
    int64_t hb;                  /* the bias head this query head reads */
};

static __device__ __forceinline__ dcu_item dcu_item_of(const dcu_attn &a, int64_t id)
{
    dcu_item it;
    const int64_t ntiles = a.sp.ntiles;
    it.tile = id % ntiles;
    it.h = (id / ntiles) % a.Hq;
    it.b = id / ntiles / a.Hq;
    it.hkv = it.h / (a.Hq / a.Hkv);
    it.slab = dcu_slab(a.sp, it.b, it.h, a.Hq);
    it.r0 = it.tile * DCU_TILE;
    it.nrows = (int)min((int64_t)DCU_TILE, a.Lq - it.r0);
    it.t = a.sp.tiles[it.slab * ntiles + it.tile];
    it.per_key_bias = a.bias.data && a.bias.shape[2] == 1;
    it.row_bias = a.bias.data && !it.per_key_bias;
    it.hb = a.bias.data ? it.h / (a.Hq / a.bias.shape[1]) : 0;
    return it;
}

/* Whether tile row r (query row i) selects chunk position pos holding key `key`. */
static __device__ __forceinline__ bool dcu_item_selects(const dcu_attn &a, const dcu_item &it,
                                                        int r, int32_t pos, int32_t key)
{
    if (r >= it.nrows || pos >= it.t.count)
        return false;
    const int64_t i = it.r0 + r;
    if (a.causal && key > i + a.off)
        return false;
    return dcu_selects(a.sp, it.t, it.slab * a.Lq + i, r, pos);
}

/* The score of (row i, key) before the bias: scale * <q, k>, then softcap. Also returns
 * softcap's derivative factor (1 - tanh^2), 1 without softcap. */
static __device__ __forceinline__ float dcu_capped(const dcu_attn &a, float dot, float *dcap)
{
    float s = a.scale * dot;
    if (a.softcap > 0.0f) {
        const float t = tanhf(s / a.softcap);
        *dcap = 1.0f - t * t;
        return a.softcap * t;
    }
    *dcap = 1.0f;
    return s;
}

/* Load `rows` rows of a (B, L, H, D) tensor at head h into dst[rows][ld] as float. */
static __device__ __forceinline__ void dcu_load_rows(const dcu_tensor &t, int64_t b, int64_t row0,
                                                     int rows, int64_t h, int D, float *dst,
                                                     int ld, int64_t L)
{
    for (int x = threadIdx.x; x < rows * D; x += blockDim.x) {
        const int r = x / D, d = x % D;
        const int64_t row = row0 + r;
        dst[r * ld + d] = row < L ? dcu_load(t.data, t.dtype, b * t.stride[0] + row * t.stride[1] +
                                                              h * t.stride[2] + d)
                                  : 0.0f;
    }
}

/* The bias element (b, hb, i, key) (i ignored by a per-key bias), or 0 without a bias. */
static __device__ __forceinline__ float dcu_bias_at(const dcu_attn &a, int64_t b, int64_t hb,
                                                    int64_t i, int32_t key)
{
    if (!a.bias.data)
        return 0.0f;
    return ((const float *)a.bias.data)[dcu_off(a.bias, b, hb, i, key)];
}

/* The bias added to the score of (row i, key): a per-row bias's element, else the chunk's
 * staged per-key value (0 without a bias). */
static __device__ __forceinline__ float dcu_score_bias(const dcu_attn &a, const dcu_item &it,
                                                       int64_t i, int32_t key, float staged)
{
    return it.row_bias ? dcu_bias_at(a, it.b, it.hb, i, key) : staged;
}

/* Chunk [c0, c0 + NC) of the item's union into shared memory for the float32 kernels: the keys
 * (-1 past the union), the per-key bias (0 without one) and K, V rows as float32 with row
 * stride ld (zero rows past the union). Starts and ends with a barrier. */
template <int NC>
static __device__ __forceinline__ void dcu_load_chunk(const dcu_attn &a, const dcu_item &it,
                                                      int c0, int32_t *keys, float *kbias, float *Ks,
                                                      float *Vs, int ld)
{
    __syncthreads(); /* the previous chunk is consumed */
    const int n = min(NC, it.t.count - c0), D = (int)a.D;
    if (threadIdx.x < NC) {
        const int j = threadIdx.x;
        const int32_t key = j < n ? dcu_tile_key(a.sp, it.t, c0 + j) : -1;
        keys[j] = key;
        kbias[j] = it.per_key_bias && key >= 0 ? dcu_bias_at(a, it.b, it.hb, 0, key) : 0.0f;
    }
    __syncthreads();
    const int64_t kbase = it.b * a.k.stride[0] + it.hkv * a.k.stride[2];
    const int64_t vbase = it.b * a.v.stride[0] + it.hkv * a.v.stride[2];
    for (int x = threadIdx.x; x < NC * D; x += blockDim.x) {
        const int j = x / D, d = x % D;
        const int32_t key = keys[j];
        Ks[j * ld + d] = key >= 0 ? dcu_load(a.k.data, a.k.dtype, kbase + key * a.k.stride[1] + d) : 0.0f;
        Vs[j * ld + d] = key >= 0 ? dcu_load(a.v.data, a.v.dtype, vbase + key * a.v.stride[1] + d) : 0.0f;
    }
    __syncthreads();
}

#endif

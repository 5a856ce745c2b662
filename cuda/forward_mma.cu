/*
 * forward_mma.cu - the bf16 / f16 forward on tensor cores (mma.sync m16n8k16, float32
 * accumulation), for D a multiple of 16 up to 128 and 16-byte aligned rows. One block per
 * (batch, query head, tile of 64 rows), 4 warps of 16 rows; where two query heads share the
 * tile's union, its K, V and per-key bias (GQA), one block of 8 warps takes both, so that each
 * chunk is copied once for twice the arithmetic. The union is read in chunks of 64 positions,
 * which line up with the 64-bit words of the rows' bitmasks: a row's mask for a chunk is one
 * word. Per chunk: K and V rows to shared memory (copied one or two chunks ahead of the
 * arithmetic; mbarriers, not block barriers, order the buffers), S = Q K^T (Q's fragments
 * stay in registers), mask, scale, softcap, bias, the online softmax in float32 and log2
 * units, then P V with P rounded to the storage type (flash attention's choice; the
 * documented exception of dmattn.h).
 */
#include "mma.cuh"

namespace {

using namespace dcu_mma;


/* The work item of a warp of a block that takes HP query heads of one group (4 warps each). */
template <int HP>
static __device__ __forceinline__ dcu_item pair_item(const dcu_attn &a, int hh)
{
    int64_t id = blockIdx.x;
    if (HP > 1) {
        const int64_t ntiles = a.sp.ntiles, groups = a.Hq / HP;
        const int64_t tile = id % ntiles, hg = (id / ntiles) % groups, b = id / ntiles / groups;
        id = (b * a.Hq + hg * HP + hh) * ntiles + tile;
    }
    return dcu_item_of(a, id);
}

template <bool BF16, int D, bool PLAIN, int HP>
__global__ void __launch_bounds__(128 * HP, HP == 1 ? 2 : 1) forward_mma(dcu_attn a)
{
    constexpr int LDS = D + 8; /* shared row stride in elements: 16 bytes of padding */
    constexpr int KS = D / 16; /* k-steps of Q K^T */
    constexpr int NT = D / 8;  /* n-tiles of P V */
    /* NB buffers of K and V rows. The copies of chunks c + 1 .. c + AHEAD run while chunk c
     * is computed (two ahead with a block's four buffers: 3.5% off the 32K forward on the
     * H200, where one ahead left the gathers' latency exposed); full[b] completes when buffer
     * b's copies have landed, empty[b] when every warp has read it, so that warps wait only
     * for the data they need and for the readers of the buffer they fill (NB - AHEAD chunks
     * back: a buffer of slack for slow warps), not for each other every chunk. */
    constexpr int NB = HP == 2 ? 4 : 3, WARPS = 4 * HP, AHEAD = NB - 2;
    extern __shared__ __align__(16) uint16_t smh[];
    __shared__ int32_t keys_buf[NB][CH];
    __shared__ float kbias_buf[NB][CH];
    __shared__ uint64_t full[NB], empty[NB];
    if (threadIdx.x < NB) {
        mbar_init(&full[threadIdx.x], 2 * 128 * HP); /* each thread: its copies, its writes */
        mbar_init(&empty[threadIdx.x], WARPS);
    }
    __syncthreads();

    /* HP heads share the chunks: the same slab, kv head and per-key bias (see launch) */
    const dcu_item it = pair_item<HP>(a, threadIdx.x >> 7);
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int ra = warp * 16 + g, rb = ra + 8; /* this thread's two rows of the tile */
    const int64_t ia = it.r0 + ra, ib = it.r0 + rb;
    /* the last key each row sees when causal (within int32: i + off < Lk) */
    const int32_t lim_a = (int32_t)(ia + a.off), lim_b = (int32_t)(ib + a.off);

    union_loader<D, 128 * HP> load;
    load.init(a, it);
    auto issue = [&](int c0) {
        if (c0 >= it.t.count)
            return;
        const int n = c0 / CH, bi = n % NB;
        if (n >= NB)
            mbar_wait(&empty[bi], (n / NB - 1) & 1); /* chunk n - NB is read */
        uint16_t *Kd = smh + bi * 2 * CH * LDS;
        load.template issue<LDS>(a, it, c0, Kd, Kd + CH * LDS, keys_buf[bi], kbias_buf[bi]);
        mbar_arrive_copies(&full[bi]);
        mbar_arrive(&full[bi]);
    };
    for (int n = 0; n < AHEAD; n++)
        issue(n * CH);

    /* Q's A fragments for the whole of D, once. */
    uint32_t qf[KS][4];
    {
        const uint16_t *q = (const uint16_t *)a.q.data;
        const int64_t base = it.b * a.q.stride[0] + it.h * a.q.stride[2];
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            const int d0 = ks * 16 + 2 * t;
            qf[ks][0] = ra < it.nrows ? *(const uint32_t *)(q + base + ia * a.q.stride[1] + d0) : 0;
            qf[ks][1] = rb < it.nrows ? *(const uint32_t *)(q + base + ib * a.q.stride[1] + d0) : 0;
            qf[ks][2] = ra < it.nrows ? *(const uint32_t *)(q + base + ia * a.q.stride[1] + d0 + 8) : 0;
            qf[ks][3] = rb < it.nrows ? *(const uint32_t *)(q + base + ib * a.q.stride[1] + d0 + 8) : 0;
        }
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    /* Row maxima (log2 units) and sums. */
    float ma = -INFINITY, mb = -INFINITY, la = 0.0f, lb = 0.0f;
    const row_sel sel_a = row_sel_of(a, it, ra, true), sel_b = row_sel_of(a, it, rb, true);
    uint64_t mka = row_sel_word(sel_a, 0), mkb = row_sel_word(sel_b, 0);

    for (int c0 = 0; c0 < it.t.count; c0 += CH) {
        const int bi = (c0 / CH) % NB;
        issue(c0 + AHEAD * CH);
        /* the next chunk's mask words, read now, used next time round */
        const uint64_t nka = row_sel_word(sel_a, c0 + CH), nkb = row_sel_word(sel_b, c0 + CH);
        mbar_wait(&full[bi], (c0 / CH / NB) & 1); /* chunk c0 is in place */
        const bool any = __any_sync(0xffffffffu, (mka | mkb) != 0);
        if (any) {
            const uint16_t *Ks = smh + bi * 2 * CH * LDS, *Vs = Ks + CH * LDS;
            const int32_t *keys = keys_buf[bi];
            const float *kbias = kbias_buf[bi];
            /* S = Q K^T for this warp's 16 rows and the chunk's 64 keys. */
            float s[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KS; ks++)
#pragma unroll
                for (int np = 0; np < 4; np++) { /* pairs of n-tiles: 16 keys */
                    const int mi = lane >> 3;
                    const int key = np * 16 + (lane & 7) + (mi >= 2 ? 8 : 0);
                    const int dim = ks * 16 + (mi & 1) * 8;
                    uint32_t bf[4];
                    ldmatrix_x4(bf, Ks + key * LDS + dim, false);
                    mma16816<BF16>(s[2 * np], qf[ks], bf[0], bf[1]);
                    mma16816<BF16>(s[2 * np + 1], qf[ks], bf[2], bf[3]);
                }
            /* Scores of the selected pairs (log2 units), -inf elsewhere; the row maxima. Keys
             * ascend along the union: only a chunk whose last key passes the tile's first row
             * needs the causal test. */
            const int32_t last = keys[min(CH, it.t.count - c0) - 1];
            const bool cz = a.causal && last > it.r0 + a.off;
            const uint64_t sha = mka >> (2 * t), shb = mkb >> (2 * t);
            float cmax_a = -INFINITY, cmax_b = -INFINITY;
            /* Most chunks of a top-k union are selected whole by every row of the warp (a
             * tile's rows differ by the few keys that enter or leave): those skip the pair
             * tests (3.4% off the 32K forward on the H200). Decided per warp, so the two loops
             * never diverge; the scores are the same either way. */
            const bool whole = __all_sync(0xffffffffu, (mka & mkb) == ~0ull && !(cz && last > lim_a));
            if (whole) {
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int j = nt * 8 + 2 * t + e;
                        float dcap;
                        s[nt][e] = score2<PLAIN>(a, it, s[nt][e], ia, keys[j], kbias[j], &dcap);
                        s[nt][2 + e] = score2<PLAIN>(a, it, s[nt][2 + e], ib, keys[j], kbias[j], &dcap);
                        cmax_a = fmaxf(cmax_a, s[nt][e]);
                        cmax_b = fmaxf(cmax_b, s[nt][2 + e]);
                    }
            } else {
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int j = nt * 8 + 2 * t + e;
                        const int32_t key = keys[j];
                        const float kb = kbias[j];
                        float dcap;
                        float va = -INFINITY, vb = -INFINITY;
                        if (((sha >> (nt * 8 + e)) & 1) && !(cz && key > lim_a))
                            va = score2<PLAIN>(a, it, s[nt][e], ia, key, kb, &dcap);
                        if (((shb >> (nt * 8 + e)) & 1) && !(cz && key > lim_b))
                            vb = score2<PLAIN>(a, it, s[nt][2 + e], ib, key, kb, &dcap);
                        s[nt][e] = va;
                        s[nt][2 + e] = vb;
                        cmax_a = fmaxf(cmax_a, va);
                        cmax_b = fmaxf(cmax_b, vb);
                    }
            }
            cmax_a = fmaxf(cmax_a, __shfl_xor_sync(0xffffffffu, cmax_a, 1));
            cmax_a = fmaxf(cmax_a, __shfl_xor_sync(0xffffffffu, cmax_a, 2));
            cmax_b = fmaxf(cmax_b, __shfl_xor_sync(0xffffffffu, cmax_b, 1));
            cmax_b = fmaxf(cmax_b, __shfl_xor_sync(0xffffffffu, cmax_b, 2));
            const float mna = fmaxf(ma, cmax_a), mnb = fmaxf(mb, cmax_b);
            /* exp2(-inf - u) = 0 for a finite u: unselected pairs need no test */
            const float ua = mna == -INFINITY ? 0.0f : mna, ub = mnb == -INFINITY ? 0.0f : mnb;
            const float alpha_a = exp2_fast(ma - ua), alpha_b = exp2_fast(mb - ub);
            float sa = 0.0f, sb = 0.0f;
            uint32_t pf[4][4]; /* P as A fragments of the 4 k-steps of P V */
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                const float p0 = exp2_fast(s[nt][0] - ua), p1 = exp2_fast(s[nt][1] - ua);
                const float p2 = exp2_fast(s[nt][2] - ub), p3 = exp2_fast(s[nt][3] - ub);
                sa += p0 + p1;
                sb += p2 + p3;
                const int kk = nt >> 1, hi = nt & 1;
                pf[kk][hi ? 2 : 0] = mma_type<BF16>::pack(p0, p1);
                pf[kk][hi ? 3 : 1] = mma_type<BF16>::pack(p2, p3);
            }
            sa += __shfl_xor_sync(0xffffffffu, sa, 1);
            sa += __shfl_xor_sync(0xffffffffu, sa, 2);
            sb += __shfl_xor_sync(0xffffffffu, sb, 1);
            sb += __shfl_xor_sync(0xffffffffu, sb, 2);
            la = la * alpha_a + sa;
            lb = lb * alpha_b + sb;
            ma = mna;
            mb = mnb;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                o[nt][0] *= alpha_a;
                o[nt][1] *= alpha_a;
                o[nt][2] *= alpha_b;
                o[nt][3] *= alpha_b;
            }
            /* O += P V. */
            mma_rows_by_chunk<BF16, D, LDS>(o, pf, Vs, lane);
        }
        mka = nka;
        mkb = nkb;
        __syncwarp();
        if (lane == 0)
            mbar_arrive(&empty[bi]); /* this warp is done with buffer bi */
    }
    /* out = O / l (0 for an empty row) and lse = m ln 2 + ln l. */
    uint16_t *out = (uint16_t *)a.out.data;
    const int64_t obase = it.b * a.out.stride[0] + it.h * a.out.stride[2];
    const float inva = la == 0.0f ? 0.0f : 1.0f / la, invb = lb == 0.0f ? 0.0f : 1.0f / lb;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int d = nt * 8 + 2 * t;
        if (ra < it.nrows)
            mma_type<BF16>::store2(out + obase + ia * a.out.stride[1] + d, o[nt][0] * inva,
                                   o[nt][1] * inva);
        if (rb < it.nrows)
            mma_type<BF16>::store2(out + obase + ib * a.out.stride[1] + d, o[nt][2] * invb,
                                   o[nt][3] * invb);
    }
    if (a.lse.data && t == 0) {
        const float LN2 = 0.6931471805599453f;
        float *lse = (float *)a.lse.data;
        const int64_t lb0 = it.b * a.lse.stride[0] + it.h * a.lse.stride[1];
        if (ra < it.nrows)
            lse[lb0 + ia * a.lse.stride[2]] = la == 0.0f ? -INFINITY : ma * LN2 + logf(la);
        if (rb < it.nrows)
            lse[lb0 + ib * a.lse.stride[2]] = lb == 0.0f ? -INFINITY : mb * LN2 + logf(lb);
    }
}

template <bool BF16, int D, bool PLAIN, int HP>
int launch_kind(const dcu_attn *a, int64_t items, cudaStream_t stream)
{
    const size_t smem = (size_t)2 * (HP == 2 ? 4 : 3) * CH * (D + 8) * sizeof(uint16_t);
    DCU_TRY(cudaFuncSetAttribute(forward_mma<BF16, D, PLAIN, HP>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    forward_mma<BF16, D, PLAIN, HP><<<(unsigned)(items / HP), 128 * HP, smem, stream>>>(*a);
    DCU_LAUNCHED("forward (tensor cores)");
    return 0;
}

/* Whether pairs of query heads (2k, 2k + 1) share a slab, a kv head and a per-key bias head. */
bool heads_pair(const dcu_attn *a)
{
    const int64_t Hb = a->bias.data ? a->bias.shape[1] : 1;
    return a->Hq % 2 == 0 && (a->Hq / a->Hkv) % 2 == 0 && (a->Hq / a->sp.H) % 2 == 0 &&
           (a->Hq / Hb) % 2 == 0;
}

template <bool BF16, int D>
int launch(const dcu_attn *a, int64_t items, cudaStream_t stream)
{
    const bool plain = !(a->softcap > 0.0f || (a->bias.data && a->bias.shape[2] != 1));
    if (heads_pair(a))
        return plain ? launch_kind<BF16, D, true, 2>(a, items, stream)
                     : launch_kind<BF16, D, false, 2>(a, items, stream);
    return plain ? launch_kind<BF16, D, true, 1>(a, items, stream)
                 : launch_kind<BF16, D, false, 1>(a, items, stream);
}

template <bool BF16>
int launch_d(const dcu_attn *a, int64_t items, cudaStream_t stream)
{
    switch (a->D) {
    case 16: return launch<BF16, 16>(a, items, stream);
    case 32: return launch<BF16, 32>(a, items, stream);
    case 48: return launch<BF16, 48>(a, items, stream);
    case 64: return launch<BF16, 64>(a, items, stream);
    case 80: return launch<BF16, 80>(a, items, stream);
    case 96: return launch<BF16, 96>(a, items, stream);
    case 112: return launch<BF16, 112>(a, items, stream);
    default: return launch<BF16, 128>(a, items, stream);
    }
}

} // namespace

/* Whether the tensor-core forward takes this call (else the float32 SIMT kernel does). */
extern "C" int dcu_forward_mma_fits(const dcu_attn *a)
{
    return (a->q.dtype == DCU_BF16 || a->q.dtype == DCU_F16) && a->D % 16 == 0 && a->D <= 128 &&
           dcu_aligned16(a->q) && dcu_aligned16(a->k) && dcu_aligned16(a->v) && dcu_aligned16(a->out);
}

extern "C" int dcu_forward_mma(const dcu_attn *a, int64_t items, void *stream)
{
    if (a->q.dtype == DCU_BF16)
        return launch_d<true>(a, items, (cudaStream_t)stream);
    return launch_d<false>(a, items, (cudaStream_t)stream);
}

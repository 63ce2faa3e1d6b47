// gemm.cu -- fully connected layer: y = act(x @ w.T + b).
// fp32 in, fp32 accumulate, FFMA only (no TF32). The tile core is
// gemm_tile.cuh (shared with conv.cu); activations come from activations.h.
//
// x: (N, D)   w: (O, D)   b: (O,) or NULL   y: (N, O)   all row-major
// act, act_p: the epilogue's activation (MDNN_ACT_* code and its parameter).
//
// fc_tile: tiled SGEMM "NT" (both operands D-contiguous): a block computes a
//   (BM rows of x) x (BN rows of w) tile of y with tile_mainloop, both slabs
//   fetched by RowTile. Split-K over D like conv.cu: with gridDim.z > 1 the
//   host passes b = NULL, act = identity, out_zstride = N*O and eltwise.cu's
//   splitk_reduce finishes the job.
// fc_small: N <= 8 (batch-1 latency): one warp per output column j reads
//   w[j, :] once, coalesced, and dots it with every row of x.

#include "gemm_tile.cuh"

// Bias (per column), activation, store to C (M, Nn) or to this slice's slab.
template <int BM, int BN, int BK, int TM, int TN, int ACT>
__device__ __forceinline__ void fc_epilogue(
    const float (&acc)[TM][TN], const float* __restrict__ bias, float* __restrict__ out,
    int i0, int j0, int M, int Nn, int act, float act_p, int vec_store)
{
    using T = TileShape<BM, BN, BK, TM, TN>;
    constexpr int GM = T::GM, GN = T::GN;
    const int tx = T::tx(), ty = T::ty();
#pragma unroll
    for (int gi = 0; gi < GM; ++gi)
#pragma unroll
    for (int i4 = 0; i4 < 4; ++i4) {
        const int i = i0 + T::row(ty, gi * 4 + i4);
        if (i >= M) continue;
#pragma unroll
        for (int gj = 0; gj < GN; ++gj) {
            const int j = j0 + T::col(tx, gj * 4);
            if (j >= Nn) continue;
            float v[4];
#pragma unroll
            for (int j4 = 0; j4 < 4; ++j4) {
                float t = acc[gi * 4 + i4][gj * 4 + j4];
                if (bias && j + j4 < Nn) t += __ldg(bias + j + j4);
                v[j4] = tile_act<ACT>(act, t, act_p);
            }
            float* o = out + (size_t)i * Nn + j;
            if (vec_store && j + 3 < Nn) {
                *reinterpret_cast<float4*>(o) = make_float4(v[0], v[1], v[2], v[3]);
            } else {
#pragma unroll
                for (int j4 = 0; j4 < 4; ++j4)
                    if (j + j4 < Nn) o[j4] = v[j4];
            }
        }
    }
}

// C[i, j] = act(sum_k A[i, k] * B[j, k] + bias[j]);  A: (M, Kd), B: (Nn, Kd), C: (M, Nn)
template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void sgemm_nt(
    const float* __restrict__ A, const float* __restrict__ B,
    const float* __restrict__ bias, float* __restrict__ Cout,
    int M, int Nn, int Kd, int act, float act_p, int kchunk, long long out_zstride, int vec_store)
{
    constexpr int NT = TileShape<BM, BN, BK, TM, TN>::NT;
    const int j0 = blockIdx.x * BN;
    const int i0 = blockIdx.y * BM;
    const int kbeg = blockIdx.z * kchunk;
    const int kend = min(Kd, kbeg + kchunk);

    RowTile<BM, BK, NT> la(A, M, Kd, i0);
    RowTile<BN, BK, NT> lb(B, Nn, Kd, j0);
    float acc[TM][TN];
    tile_mainloop<BM, BN, BK, TM, TN, false>(la, lb, kbeg, kend, acc);

    float* out = Cout + (long long)blockIdx.z * out_zstride;
#define FC_EPILOGUE(ACT) \
    fc_epilogue<BM, BN, BK, TM, TN, ACT>(acc, bias, out, i0, j0, M, Nn, act, act_p, vec_store)
    MDNN_TILE_ACT_DISPATCH(act, FC_EPILOGUE);
#undef FC_EPILOGUE
}

// y (N, O) = x (N, D) @ w (O, D)^T: 64 rows of x by 64 rows of w per block.
// (256, 3): up to 85 registers; ptxas then takes 80 (3 blocks per SM, as the
// 73 of the kernel before the shared core), where without a minimum it takes
// 64 and spills.
extern "C" __global__ void __launch_bounds__(256, 3) fc_tile(
    const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ b, float* __restrict__ y,
    int N, int O, int D, int act, float act_p, int kchunk, long long out_zstride, int vec_store)
{
    sgemm_nt<64, 64, 16, 4, 4>(x, w, b, y, N, O, D, act, act_p, kchunk, out_zstride, vec_store);
}

#define FC_SMALL_NB 8

// N <= 8. Block: 8 warps; warp v of block blk computes column j = blk*8 + v
// for every sample. vec4: D % 4 == 0 and x, w 16-byte aligned. After the
// butterfly reduction every lane holds every sample's sum (bit for bit: each
// step adds the same two values in every lane), so lane n < N finishes and
// stores sample n.
extern "C" __global__ void __launch_bounds__(256) fc_small(
    const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ b, float* __restrict__ y,
    int N, int O, int D, int act, float act_p, int vec4)
{
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (j >= O) return;
    float acc[FC_SMALL_NB];
#pragma unroll
    for (int n = 0; n < FC_SMALL_NB; ++n) acc[n] = 0.f;
    const float* wj = w + (size_t)j * D;
    if (vec4) {
        const int D4 = D >> 2;
        const float4* w4 = reinterpret_cast<const float4*>(wj);
        for (int d = lane; d < D4; d += 32) {
            const float4 wv = __ldg(w4 + d);
#pragma unroll
            for (int n = 0; n < FC_SMALL_NB; ++n) {
                if (n < N) {
                    const float4 xv = __ldg(reinterpret_cast<const float4*>(x + (size_t)n * D) + d);
                    acc[n] = fmaf(wv.x, xv.x, acc[n]);
                    acc[n] = fmaf(wv.y, xv.y, acc[n]);
                    acc[n] = fmaf(wv.z, xv.z, acc[n]);
                    acc[n] = fmaf(wv.w, xv.w, acc[n]);
                }
            }
        }
    } else {
        for (int d = lane; d < D; d += 32) {
            const float wv = __ldg(wj + d);
#pragma unroll
            for (int n = 0; n < FC_SMALL_NB; ++n)
                if (n < N) acc[n] = fmaf(wv, __ldg(x + (size_t)n * D + d), acc[n]);
        }
    }
    float mine = 0.f;                  // sample `lane`'s sum, for lanes < N
#pragma unroll
    for (int n = 0; n < FC_SMALL_NB; ++n) {
        float v = acc[n];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == n) mine = v;
    }
    if (lane < N) {
        const float bias = b ? __ldg(b + j) : 0.f;
        y[(size_t)lane * O + j] = mdnn_act(act, mine + bias, act_p);
    }
}

// gemm_tile.cuh -- the tile core shared by conv.cu (implicit-GEMM convolution)
// and gemm.cu (fully connected): one block computes one (BM x BN) tile of
//
//     acc[m, n] = sum_q A[m, q] * B[n, q],   q in [kbeg, kend)
//
// fp32 in, fp32 accumulate, FFMA only (no TF32). Each thread owns a TM x TN
// micro tile of acc. The operands travel global -> registers -> shared memory
// (double buffered: the next k-slab is loaded into registers while the FMAs of
// this one run, then stored into the other buffer) -> registers -> FFMA.
//
// What differs between the two users is only how a k-slab of each operand is
// fetched, so the loaders are parameters of tile_mainloop:
//   RowTile     a (ROWS x BK) slab of a row-major (nrows, ld) matrix, rows
//               row0.., columns k0..: the filters of conv.cu (A = w (F, Kd)),
//               both operands of gemm.cu (A = x (N, D), B = w (O, D)).
//   conv.cu's ConvGather   the implicit im2col slab of x.
// A loader has load(k0, kend) (global -> its registers; zeros outside the
// matrix and past kend) and store(S, buf) (its registers -> S[buf], transposed
// so that S[buf][kk][row] holds element (row, k0 + kk)).
//
// Thread layout, for an epilogue: 256 threads; thread t has tx = t % (BN/TN),
// ty = t / (BN/TN), and acc[i][j] is tile element
//   (TileShape::row(ty, i), TileShape::col(tx, j)),
// so each thread's rows (and columns) come in groups of 4 consecutive ones,
// GM = TM/4 (GN = TN/4) groups BM/GM (BN/GN) apart: float4 loads from shared
// memory, float4 stores of 4 consecutive columns.
//
// Epilogue activations (MDNN_ACT_* of activations.h) are data: a kernel takes
// (int act, float act_p) and dispatches once, outside its unrolled epilogue,
// to the epilogue instantiated for MDNN_ACT_IDENTITY, MDNN_ACT_RELU (constant:
// the common cases cost what the old bool did) or MDNN_TILE_ACT_ANY (any code,
// through one out-of-line call per element: the unrolled epilogue stays small).
#ifndef MINIDNN_GEMM_TILE_CUH
#define MINIDNN_GEMM_TILE_CUH

#include "activations.h"

#define MDNN_SMEM_PAD 4   // keeps float4 alignment, breaks store bank conflicts

template <int BM, int BN, int BK, int TM, int TN>
struct TileShape {
    static constexpr int NT = (BM / TM) * (BN / TN);   // threads per block
    static constexpr int GM = TM / 4, GN = TN / 4;     // float4 groups per thread and dim
    static_assert(TM % 4 == 0 && TN % 4 == 0, "micro tile");
    static __device__ __forceinline__ int tx() { return threadIdx.x % (BN / TN); }
    static __device__ __forceinline__ int ty() { return threadIdx.x / (BN / TN); }
    // tile row of acc[i][*] and tile column of acc[*][j]
    static __device__ __forceinline__ int row(int ty, int i)
    {
        return (i / 4) * (BM / GM) + ty * 4 + (i % 4);
    }
    static __device__ __forceinline__ int col(int tx, int j)
    {
        return (j / 4) * (BN / GN) + tx * 4 + (j % 4);
    }
};

// A (ROWS x BK) slab of the row-major matrix m (nrows, ld), rows row0 ..
// row0 + ROWS - 1, reduction index q = k0 .. k0 + BK - 1 (zero where
// row >= nrows or q >= kend). NT threads share it: thread t loads elements
// e = t + i*NT, i < L, element e being (row0 + e / BK, k0 + e % BK).
template <int ROWS, int BK, int NT>
struct RowTile {
    static constexpr int L = ROWS * BK / NT;
    static_assert((ROWS * BK) % NT == 0, "tile");
    const float* __restrict__ m;
    int nrows, ld, row0;
    float r[L];

    __device__ __forceinline__ RowTile(const float* __restrict__ m_, int nrows_, int ld_, int row0_)
        : m(m_), nrows(nrows_), ld(ld_), row0(row0_) {}

    __device__ __forceinline__ void load(int k0, int kend)
    {
#pragma unroll
        for (int i = 0; i < L; ++i) {
            const int e = threadIdx.x + i * NT;
            const int row = row0 + e / BK, q = k0 + e % BK;
            r[i] = (row < nrows && q < kend) ? __ldg(m + (size_t)row * ld + q) : 0.f;
        }
    }

    __device__ __forceinline__ void store(float (&S)[2][BK][ROWS + MDNN_SMEM_PAD], int buf) const
    {
#pragma unroll
        for (int i = 0; i < L; ++i) {
            const int e = threadIdx.x + i * NT;
            S[buf][e % BK][e / BK] = r[i];
        }
    }
};

// acc (TM x TN per thread, zeroed here) = the tile's A x B^T over q in [kbeg, kend).
// la fetches A's slabs (BM rows), lb B's (BN rows). Ends with a __syncthreads().
//
// GUARD_PREFETCH: whether the next slab's loads sit behind `if (more)`. Either
// way the result is the same (past kend every load is predicated off), but
// ptxas (nvcc 13.0, sm_90) schedules the two differently. Guarded, it sinks
// fc_tile's row loads below the FMAs, so nothing overlaps their latency;
// unguarded, conv_128x128 spills 8 bytes. Both ways as chosen (conv.cu
// guarded, gemm.cu not), every tile kernel issues the next slab's loads before
// its FMAs, as the kernels did before this core was shared, without spills
// (`python minidnn/backends/cuda/source.py --nvcc` prints the spills).
template <int BM, int BN, int BK, int TM, int TN, bool GUARD_PREFETCH, class LoadA, class LoadB>
__device__ __forceinline__ void tile_mainloop(LoadA& la, LoadB& lb, int kbeg, int kend,
                                              float (&acc)[TM][TN])
{
    using T = TileShape<BM, BN, BK, TM, TN>;
    constexpr int GM = T::GM, GN = T::GN;
    __shared__ __align__(16) float As[2][BK][BM + MDNN_SMEM_PAD];
    __shared__ __align__(16) float Bs[2][BK][BN + MDNN_SMEM_PAD];
    const int tx = T::tx(), ty = T::ty();

#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

    la.load(kbeg, kend);
    lb.load(kbeg, kend);
    la.store(As, 0);
    lb.store(Bs, 0);
    __syncthreads();

    int buf = 0;
    for (int k0 = kbeg; k0 < kend; k0 += BK) {
        const bool more = k0 + BK < kend;
        if (more || !GUARD_PREFETCH) {   // global loads in flight during the FMAs
            la.load(k0 + BK, kend);
            lb.load(k0 + BK, kend);
        }
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM], bv[TN];
#pragma unroll
            for (int g = 0; g < GM; ++g) {
                const float4 t = *reinterpret_cast<const float4*>(&As[buf][kk][g * (BM / GM) + ty * 4]);
                a[g * 4 + 0] = t.x; a[g * 4 + 1] = t.y; a[g * 4 + 2] = t.z; a[g * 4 + 3] = t.w;
            }
#pragma unroll
            for (int g = 0; g < GN; ++g) {
                const float4 t = *reinterpret_cast<const float4*>(&Bs[buf][kk][g * (BN / GN) + tx * 4]);
                bv[g * 4 + 0] = t.x; bv[g * 4 + 1] = t.y; bv[g * 4 + 2] = t.z; bv[g * 4 + 3] = t.w;
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
        }
        if (more) {                      // the other buffer: nobody reads it now
            la.store(As, buf ^ 1);
            lb.store(Bs, buf ^ 1);
        }
        __syncthreads();
        buf ^= 1;
    }
}

// ---------------------------------------------------------------- epilogue activation
#define MDNN_TILE_ACT_ANY (-1)

// mdnn_act, not inlined: the MDNN_TILE_ACT_ANY epilogue calls it once per element
__device__ __noinline__ float mdnn_act_outline(int act, float v, float p)
{
    return mdnn_act(act, v, p);
}

// act(v) for an epilogue instantiated for ACT (a constant code, or MDNN_TILE_ACT_ANY:
// the runtime code `act`)
template <int ACT>
__device__ __forceinline__ float tile_act(int act, float v, float p)
{
    if (ACT == MDNN_TILE_ACT_ANY) return mdnn_act_outline(act, v, p);
    return mdnn_act(ACT, v, p);
}

// EPI(ACT_CODE) expands to a call of the epilogue instantiated for ACT_CODE; this
// runs the one that applies `act`.
#define MDNN_TILE_ACT_DISPATCH(act, EPI)                              \
    do {                                                              \
        if ((act) == MDNN_ACT_IDENTITY) { EPI(MDNN_ACT_IDENTITY); }   \
        else if ((act) == MDNN_ACT_RELU) { EPI(MDNN_ACT_RELU); }      \
        else { EPI(MDNN_TILE_ACT_ANY); }                              \
    } while (0)

#endif

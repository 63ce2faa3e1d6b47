// conv.cu -- 2-D convolution (cross-correlation) as a tiled implicit GEMM.
// fp32 in, fp32 accumulate, FFMA only (no TF32). Compiled at run time by
// PyCUDA (minidnn/backends/cuda/kernels.py), with gemm_tile.cuh (the tile core
// it shares with gemm.cu) and activations.h (kernels/common) inlined into the
// source first (minidnn/backends/cuda/source.py), so that PyCUDA's disk cache
// keys on the whole text.
//
// x: (N, K, R, C)   w: (F, K, nr, nc)   b: (F,) or NULL   y: (N, F, Ro, Co)
// z: (N, F, Ro, Co) or NULL: a residual added before the activation
//    (conv2d_residual); it never aliases y.
// act, act_p: the epilogue's activation (MDNN_ACT_* code and its parameter).
//
// GEMM view, per output element:
//   y[f, p] = act(sum_q w[f, q] * X[q, p] + b[f] + z[f, p])
//   f in [0, F)                  GEMM rows     (M)
//   p = (n, oy, ox), P = Ro*Co   GEMM columns  (Ncols = N*P)
//   q = (k, r, c)                reduction     (Kd = K*nr*nc; w is (F, Kd) row-major)
//   X[q, p] = x[n, k, oy*sy - py + r, ox*sx - px + c], 0 outside the image
// X is never materialised: each block gathers its (BK x BN) slab of X into
// shared memory straight from x (ConvGather). tab[q] = {k*R*C + r*C + c,
// (r << 16) | c} is a per-shape table the host builds once, so the gather
// needs no division.
//
// Split-K: blockIdx.z takes the reduction range [z*kchunk, (z+1)*kchunk);
// with gridDim.z > 1 the host passes b = z = NULL, act = identity and
// out_zstride = |y|, each slice writes raw partial sums to its own slab of a
// workspace, and eltwise.cu's splitk_reduce adds them up and applies bias,
// residual and activation.

#include "gemm_tile.cuh"

// The B operand of the convolution's GEMM: a (BK x BN) slab of X. Thread t
// gathers the one output pixel (GEMM column) jb = t % BN, reduction rows
// kkb + i*KSTEP of the slab.
template <int BN, int BK, int NT>
struct ConvGather {
    static constexpr int L = BK * BN / NT;
    static constexpr int KSTEP = NT / BN;      // row step between a thread's elements
    static_assert(NT % BN == 0 && (BK * BN) % NT == 0, "tile");
    const int2* __restrict__ tab;
    const float* xs;                            // x of this thread's sample
    int R, C, iy0, ix0, pix_off, jb, kkb;
    bool pvalid;
    float r[L];

    __device__ __forceinline__ ConvGather(const float* __restrict__ x, const int2* __restrict__ tab_,
                                          int p0, int Ncols, int P, int Co, int KRC, int R_, int C_,
                                          int sy, int sx, int py, int px)
        : tab(tab_), xs(x), R(R_), C(C_), iy0(0), ix0(0)
    {
        jb = threadIdx.x % BN;
        kkb = threadIdx.x / BN;
        const int pb = p0 + jb;
        pvalid = pb < Ncols;
        if (pvalid) {
            const int n = pb / P;
            const int pix = pb - n * P;
            const int oy = pix / Co;
            const int ox = pix - oy * Co;
            iy0 = oy * sy - py;
            ix0 = ox * sx - px;
            xs = x + (size_t)n * KRC;
        }
        pix_off = iy0 * C + ix0;                // may be negative; only used in bounds
    }

    __device__ __forceinline__ void load(int k0, int kend)
    {
#pragma unroll
        for (int i = 0; i < L; ++i) {
            const int q = k0 + kkb + i * KSTEP;
            float v = 0.f;
            if (pvalid && q < kend) {
                const int2 t = __ldg(tab + q);
                const int iy = iy0 + (t.y >> 16);
                const int ix = ix0 + (t.y & 0xffff);
                if ((unsigned)iy < (unsigned)R && (unsigned)ix < (unsigned)C)
                    v = __ldg(xs + pix_off + t.x);
            }
            r[i] = v;
        }
    }

    __device__ __forceinline__ void store(float (&S)[2][BK][BN + MDNN_SMEM_PAD], int buf) const
    {
#pragma unroll
        for (int i = 0; i < L; ++i) S[buf][kkb + i * KSTEP][jb] = r[i];
    }
};

// Bias, residual, activation, store to y (N, F, Ro, Co) or to this slice's slab.
// z (same layout and alignment class as y) is read at the offsets y is written to.
template <int BM, int BN, int BK, int TM, int TN, int ACT>
__device__ __forceinline__ void conv_epilogue(
    const float (&acc)[TM][TN], const float* __restrict__ b, const float* __restrict__ z,
    float* __restrict__ out, int m0, int p0, int F, int P, int Ncols, int act, float act_p,
    int vec_store)
{
    using T = TileShape<BM, BN, BK, TM, TN>;
    constexpr int GM = T::GM, GN = T::GN;
    const int tx = T::tx(), ty = T::ty();
#pragma unroll
    for (int gi = 0; gi < GM; ++gi)
#pragma unroll
    for (int i4 = 0; i4 < 4; ++i4) {
        const int f = m0 + T::row(ty, gi * 4 + i4);
        if (f >= F) continue;
        const float bias = b ? __ldg(b + f) : 0.f;
#pragma unroll
        for (int gj = 0; gj < GN; ++gj) {
            const int p = p0 + T::col(tx, gj * 4);      // multiple of 4
            if (p >= Ncols) continue;
            float v[4];
#pragma unroll
            for (int j4 = 0; j4 < 4; ++j4) v[j4] = acc[gi * 4 + i4][gj * 4 + j4] + bias;
            const int n = p / P;
            const int pix = p - n * P;
            if (vec_store && p + 3 < Ncols) {
                // P % 4 == 0 and p % 4 == 0: the 4 columns are one sample's,
                // consecutive and 16-byte aligned (in z too).
                const size_t o = ((size_t)n * F + f) * P + pix;
                if (z) {
                    const float4 r = __ldg(reinterpret_cast<const float4*>(z + o));
                    v[0] += r.x; v[1] += r.y; v[2] += r.z; v[3] += r.w;
                }
#pragma unroll
                for (int j4 = 0; j4 < 4; ++j4) v[j4] = tile_act<ACT>(act, v[j4], act_p);
                *reinterpret_cast<float4*>(out + o) = make_float4(v[0], v[1], v[2], v[3]);
            } else {
#pragma unroll
                for (int j4 = 0; j4 < 4; ++j4) {
                    const int pj = p + j4;
                    if (pj < Ncols) {
                        const int nj = pj / P;
                        const size_t o = ((size_t)nj * F + f) * P + (pj - nj * P);
                        float t = v[j4];
                        if (z) t += __ldg(z + o);
                        out[o] = tile_act<ACT>(act, t, act_p);
                    }
                }
            }
        }
    }
}

template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void conv_igemm(
    const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ b, const float* __restrict__ z, float* __restrict__ y,
    const int2* __restrict__ tab,
    int F, int Kd, int R, int C, int KRC, int Co, int P, int Ncols,
    int sy, int sx, int py, int px, int act, float act_p, int kchunk,
    long long out_zstride, int vec_store)
{
    constexpr int NT = TileShape<BM, BN, BK, TM, TN>::NT;
    const int p0 = blockIdx.x * BN;
    const int m0 = blockIdx.y * BM;
    const int kbeg = blockIdx.z * kchunk;
    const int kend = min(Kd, kbeg + kchunk);

    RowTile<BM, BK, NT> la(w, F, Kd, m0);
    ConvGather<BN, BK, NT> lb(x, tab, p0, Ncols, P, Co, KRC, R, C, sy, sx, py, px);
    float acc[TM][TN];
    tile_mainloop<BM, BN, BK, TM, TN, true>(la, lb, kbeg, kend, acc);

    float* out = y + (long long)blockIdx.z * out_zstride;
#define CONV_EPILOGUE(ACT)                                                       \
    conv_epilogue<BM, BN, BK, TM, TN, ACT>(acc, b, z, out, m0, p0, F, P, Ncols, act, act_p, \
                                           vec_store)
    MDNN_TILE_ACT_DISPATCH(act, CONV_EPILOGUE);
#undef CONV_EPILOGUE
}

// The kernels' parameters (the host derives each kernel's argument format
// from its signature: minidnn/backends/cuda/source.py).
#define CONV_ARGS                                                              \
    const float* __restrict__ x, const float* __restrict__ w,                  \
    const float* __restrict__ b, const float* __restrict__ z,                  \
    float* __restrict__ y,                                                     \
    const int2* __restrict__ tab,                                              \
    int F, int Kd, int R, int C, int KRC, int Co, int P, int Ncols,            \
    int sy, int sx, int py, int px, int act, float act_p, int kchunk,          \
    long long out_zstride, int vec_store
#define CONV_PASS x, w, b, z, y, tab, F, Kd, R, C, KRC, Co, P, Ncols, sy, sx, py, px, \
    act, act_p, kchunk, out_zstride, vec_store

// 128 filters x 128 pixels per block, 8x8 per thread: large layers.
extern "C" __global__ void __launch_bounds__(256, 2) conv_128x128(CONV_ARGS)
{
    conv_igemm<128, 128, 8, 8, 8>(CONV_PASS);
}

// 64 filters x 64 pixels per block, 4x4 per thread: small layers, more blocks.
extern "C" __global__ void __launch_bounds__(256) conv_64x64(CONV_ARGS)
{
    conv_igemm<64, 64, 16, 4, 4>(CONV_PASS);
}

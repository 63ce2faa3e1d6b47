// conv.cu -- 2-D convolution (cross-correlation) as a tiled implicit GEMM.
// fp32 in, fp32 accumulate, FFMA only (no TF32). Compiled at run time by
// PyCUDA (minidnn/backends/cuda.py); self-contained: no #include, so that
// PyCUDA's disk cache keys on this text alone.
//
// x: (N, K, R, C)   w: (F, K, nr, nc)   b: (F,) or NULL   y: (N, F, Ro, Co)
// z: (N, F, Ro, Co) or NULL: a residual added before the relu (conv2d_residual);
//    it never aliases y.
//
// GEMM view, per output element:
//   y[f, p] = sum_q w[f, q] * X[q, p]  (+ b[f], + z[f, p], then max(., 0) if relu)
//   f in [0, F)                  GEMM rows     (M)
//   p = (n, oy, ox), P = Ro*Co   GEMM columns  (Ncols = N*P)
//   q = (k, r, c)                reduction     (Kd = K*nr*nc; w is (F, Kd) row-major)
//   X[q, p] = x[n, k, oy*sy - py + r, ox*sx - px + c], 0 outside the image
// X is never materialised: each block gathers its (BK x BN) tile of X into
// shared memory straight from x. tab[q] = {k*R*C + r*C + c, (r << 16) | c}
// is a per-shape table the host builds once, so the gather needs no division.
//
// Split-K: blockIdx.z takes the reduction range [z*kchunk, (z+1)*kchunk);
// with gridDim.z > 1 the host passes b = z = NULL, relu = 0 and out_zstride =
// |y|, each slice writes raw partial sums to its own slab of a workspace, and
// eltwise.cu's splitk_reduce adds them up and applies bias, residual and ReLU.

#define SMEM_PAD 4   // keeps float4 alignment, breaks store bank conflicts

template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void conv_igemm(
    const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ b, const float* __restrict__ z, float* __restrict__ y,
    const int2* __restrict__ tab,
    int F, int Kd, int R, int C, int KRC, int Co, int P, int Ncols,
    int sy, int sx, int py, int px, int relu, int kchunk,
    long long out_zstride, int vec_store)
{
    constexpr int NT = (BM / TM) * (BN / TN);   // threads per block
    constexpr int LA = BM * BK / NT;            // A (weights) elements per thread
    constexpr int LB = BK * BN / NT;            // B (gathered x) elements per thread
    constexpr int KSTEP = NT / BN;              // row step between a thread's B elements
    constexpr int GM = TM / 4, GN = TN / 4;     // float4 groups per thread and dim
    static_assert(NT % BN == 0 && (BM * BK) % NT == 0 && (BK * BN) % NT == 0, "tile");
    static_assert(TM % 4 == 0 && TN % 4 == 0, "micro tile");

    __shared__ __align__(16) float As[2][BK][BM + SMEM_PAD];
    __shared__ __align__(16) float Bs[2][BK][BN + SMEM_PAD];

    const int tid = threadIdx.x;
    const int tx = tid % (BN / TN);
    const int ty = tid / (BN / TN);
    const int p0 = blockIdx.x * BN;
    const int m0 = blockIdx.y * BM;
    const int kbeg = blockIdx.z * kchunk;
    const int kend = min(Kd, kbeg + kchunk);

    // The one output pixel (GEMM column) this thread gathers for B.
    const int jb = tid % BN;
    const int kkb = tid / BN;
    const int pb = p0 + jb;
    const bool pvalid = pb < Ncols;
    int iy0 = 0, ix0 = 0;
    const float* xs = x;
    if (pvalid) {
        const int n = pb / P;
        const int pix = pb - n * P;
        const int oy = pix / Co;
        const int ox = pix - oy * Co;
        iy0 = oy * sy - py;
        ix0 = ox * sx - px;
        xs = x + (size_t)n * KRC;
    }
    const int pix_off = iy0 * C + ix0;   // may be negative; only used in bounds

    float ra[LA], rb[LB];
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

    auto load_tiles = [&](int k0) {
#pragma unroll
        for (int i = 0; i < LA; ++i) {
            const int e = tid + i * NT;
            const int m = e / BK, kk = e % BK;
            const int f = m0 + m, q = k0 + kk;
            ra[i] = (f < F && q < kend) ? __ldg(w + (size_t)f * Kd + q) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) {
            const int q = k0 + kkb + i * KSTEP;
            float v = 0.f;
            if (pvalid && q < kend) {
                const int2 t = __ldg(tab + q);
                const int iy = iy0 + (t.y >> 16);
                const int ix = ix0 + (t.y & 0xffff);
                if ((unsigned)iy < (unsigned)R && (unsigned)ix < (unsigned)C)
                    v = __ldg(xs + pix_off + t.x);
            }
            rb[i] = v;
        }
    };
    auto store_tiles = [&](int buf) {
#pragma unroll
        for (int i = 0; i < LA; ++i) {
            const int e = tid + i * NT;
            As[buf][e % BK][e / BK] = ra[i];
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) Bs[buf][kkb + i * KSTEP][jb] = rb[i];
    };

    load_tiles(kbeg);
    store_tiles(0);
    __syncthreads();

    int buf = 0;
    for (int k0 = kbeg; k0 < kend; k0 += BK) {
        const bool more = k0 + BK < kend;
        if (more) load_tiles(k0 + BK);   // global loads in flight during the FMAs
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
        if (more) store_tiles(buf ^ 1);   // the other buffer: nobody reads it now
        __syncthreads();
        buf ^= 1;
    }

    // Epilogue: bias, residual, ReLU, store to y (N, F, Ro, Co) or to this
    // slice's slab. z (same layout and alignment class as y) is read at the
    // offsets y is written to.
    float* out = y + (long long)blockIdx.z * out_zstride;
#pragma unroll
    for (int gi = 0; gi < GM; ++gi)
#pragma unroll
    for (int i4 = 0; i4 < 4; ++i4) {
        const int f = m0 + gi * (BM / GM) + ty * 4 + i4;
        if (f >= F) continue;
        const float bias = b ? __ldg(b + f) : 0.f;
#pragma unroll
        for (int gj = 0; gj < GN; ++gj) {
            const int p = p0 + gj * (BN / GN) + tx * 4;   // multiple of 4
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
                for (int j4 = 0; j4 < 4; ++j4) v[j4] = relu ? fmaxf(v[j4], 0.f) : v[j4];
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
                        out[o] = relu ? fmaxf(t, 0.f) : t;
                    }
                }
            }
        }
    }
}

#define CONV_ARGS                                                              \
    const float* __restrict__ x, const float* __restrict__ w,                  \
    const float* __restrict__ b, const float* __restrict__ z,                  \
    float* __restrict__ y,                                                     \
    const int2* __restrict__ tab,                                              \
    int F, int Kd, int R, int C, int KRC, int Co, int P, int Ncols,            \
    int sy, int sx, int py, int px, int relu, int kchunk,                      \
    long long out_zstride, int vec_store
#define CONV_PASS x, w, b, z, y, tab, F, Kd, R, C, KRC, Co, P, Ncols, sy, sx, py, px, \
    relu, kchunk, out_zstride, vec_store

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

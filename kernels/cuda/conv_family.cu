// conv_family.cu -- the convolution family of the layer catalogue on the GPU:
// conv2d_grouped (depthwise, grouped, dilated) and conv2d_transpose (dlib's cont_).
// fp32 in, fp32 accumulate, FFMA only. Compiled at run time by PyCUDA
// (minidnn/backends/cuda/kernels.py) with gemm_tile.cuh and activations.h inlined
// (minidnn/backends/cuda/source.py); the host side is
// minidnn/backends/cuda/conv_family.py.
//
// Every kernel takes (x, w, b, y, ...): b (F,) or NULL, then the activation of its
// epilogue as (act, act_p) (MDNN_ACT_* of activations.h), applied in the same pass.
// Tensors are NCHW float32, C-contiguous; sizes < 2**31 elements (the host checks),
// offsets of whole planes are computed in size_t.
//
// conv2d_grouped: x (N, K, R, C), w (F, K/G, nr, nc), y (N, F, Ro, Co), G groups;
//   output channel f of group g = f / (F/G) sums over input channels
//   [g K/G, (g+1) K/G), tap (i, j) reading x[n, k, oy*sy - py + i*dy, ox*sx - px + j*dx]
//   (zero outside the image).
// conv2d_transpose: x (N, K, R, C), w (K, F, nr, nc), y (N, F, Ro, Co),
//   Ro = sy (R-1) + nr - 2 py: x[n,k,i,j] w[k,f,a,c] lands on
//   y[n, f, i*sy - py + a, j*sx - px + c]. Computed as a gather (no atomics): each
//   output element sums the inputs that land on it.

#include "gemm_tile.cuh"

// The epilogue's activation: identity and relu inline, any other code through
// gemm_tile.cuh's out-of-line mdnn_act (one call per element: keeps the kernels
// small and free of spills).
__device__ __forceinline__ float cf_act(int act, float v, float p)
{
    if (act == MDNN_ACT_IDENTITY) return v;
    if (act == MDNN_ACT_RELU) return mdnn_act_relu(v);
    return mdnn_act_outline(act, v, p);
}

// ======================================================================= depthwise
// G == K (w (F, 1, nr, nc)), F = m K: output channel f reads input channel f / m
// (m: the channel multiplier).

// y[e] for one output element (n, f, oy, ox) = flat index e of y. NR, NC > 0: the
// filter size as constants (unrolled taps); 0: the runtime nr, nc.
template <int NR, int NC>
__device__ __forceinline__ float dw_point(
    const float* __restrict__ x, const float* __restrict__ w, long long e,
    int K, int R, int C, int F, int m, int Ro, int Co, int nr_, int nc_,
    int sy, int sx, int py, int px, int dy, int dx, int* f_out)
{
    const int nr = NR > 0 ? NR : nr_;
    const int nc = NC > 0 ? NC : nc_;
    const int ei = (int)e;                      // y has < 2**31 elements: 32-bit division
    const int ox = ei % Co;
    int t = ei / Co;
    const int oy = t % Ro;
    t /= Ro;
    const int f = t % F;
    const int n = t / F;
    const int k = f / m;
    const float* __restrict__ xp = x + ((size_t)n * K + k) * ((size_t)R * C);
    const float* __restrict__ wp = w + (size_t)f * nr * nc;
    const int iy0 = oy * sy - py, ix0 = ox * sx - px;
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < nr; ++i) {              // constant trip counts when NR, NC > 0
        const int iy = iy0 + i * dy;
        if ((unsigned)iy >= (unsigned)R) continue;
        const float* __restrict__ xr = xp + (size_t)iy * C;
        const float* __restrict__ wr = wp + i * nc;
#pragma unroll
        for (int j = 0; j < nc; ++j) {
            const int ix = ix0 + j * dx;
            if ((unsigned)ix < (unsigned)C) acc = fmaf(__ldg(xr + ix), __ldg(wr + j), acc);
        }
    }
    *f_out = f;
    return acc;
}

// One thread per output element (grid-stride over all N*F*Ro*Co of them), taps read
// from global memory (L1) with bounds checks. 3x3 filters take the unrolled body.
extern "C" __global__ void __launch_bounds__(256) dw_direct(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, long long total, int K, int R, int C, int F, int m, int Ro, int Co,
    int nr, int nc, int sy, int sx, int py, int px, int dy, int dx, int act, float act_p)
{
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += step) {
        int f;
        float v;
        if (nr == 3 && nc == 3)
            v = dw_point<3, 3>(x, w, e, K, R, C, F, m, Ro, Co, nr, nc, sy, sx, py, px, dy, dx, &f);
        else
            v = dw_point<0, 0>(x, w, e, K, R, C, F, m, Ro, Co, nr, nc, sy, sx, py, px, dy, dx, &f);
        if (b) v += __ldg(b + f);
        y[e] = cf_act(act, v, act_p);
    }
}

// Shared-memory tiles: a block computes a DW_TH x DW_TW tile of one output plane
// (n, f), one output per thread (256 threads). It first stages the input patch the
// tile reads, sh_h x sh_w floats, sh_h = (DW_TH-1) sy + (nr-1) dy + 1 (sh_w likewise,
// zeros outside the image), and the plane's nr x nc filter in dynamic shared memory
// ((sh_h sh_w + nr nc) floats; the host keeps it within 48 KiB). blockIdx.x =
// plane * tiles_per_plane + tile, tile = tile row * tiles_x + tile column.
#define DW_TH 8
#define DW_TW 32
extern "C" __global__ void __launch_bounds__(256) dw_tile(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int tiles_x, int tiles_per_plane, int K, int R, int C, int F, int m,
    int Ro, int Co, int nr, int nc, int sy, int sx, int py, int px, int dy, int dx,
    int sh_h, int sh_w, int act, float act_p)
{
    extern __shared__ float dw_smem[];
    float* patch = dw_smem;
    float* wsm = dw_smem + sh_h * sh_w;
    const unsigned plane = blockIdx.x / (unsigned)tiles_per_plane;
    const int tile = (int)(blockIdx.x - plane * (unsigned)tiles_per_plane);
    const int ty0 = (tile / tiles_x) * DW_TH;
    const int tx0 = (tile - (tile / tiles_x) * tiles_x) * DW_TW;
    const int f = (int)(plane % (unsigned)F);
    const int n = (int)(plane / (unsigned)F);
    const int k = f / m;
    const float* __restrict__ xp = x + ((size_t)n * K + k) * ((size_t)R * C);
    const int iy0 = ty0 * sy - py, ix0 = tx0 * sx - px;
    const int npatch = sh_h * sh_w;
    for (int e = threadIdx.x; e < npatch; e += blockDim.x) {
        const int r = e / sh_w, c = e - r * sh_w;
        const int iy = iy0 + r, ix = ix0 + c;
        patch[e] = ((unsigned)iy < (unsigned)R && (unsigned)ix < (unsigned)C)
                       ? __ldg(xp + (size_t)iy * C + ix) : 0.f;
    }
    const int nw = nr * nc;
    for (int e = threadIdx.x; e < nw; e += blockDim.x) wsm[e] = __ldg(w + (size_t)f * nw + e);
    __syncthreads();
    const int lx = threadIdx.x % DW_TW, ly = threadIdx.x / DW_TW;
    const int ox = tx0 + lx, oy = ty0 + ly;
    if (ox >= Co || oy >= Ro) return;            // after the block's only barrier
    const float* sp = patch + (ly * sy) * sh_w + lx * sx;
    float acc = 0.f;
    if (nr == 3 && nc == 3) {
#pragma unroll
        for (int i = 0; i < 3; ++i)
#pragma unroll
            for (int j = 0; j < 3; ++j)
                acc = fmaf(sp[i * dy * sh_w + j * dx], wsm[i * 3 + j], acc);
    } else {
        for (int i = 0; i < nr; ++i)
            for (int j = 0; j < nc; ++j)
                acc = fmaf(sp[i * dy * sh_w + j * dx], wsm[i * nc + j], acc);
    }
    if (b) acc += __ldg(b + f);
    y[((size_t)plane * Ro + oy) * Co + ox] = cf_act(act, acc, act_p);
}

// ======================================================================= grouped GEMM
// Per group g (blockIdx.z) an implicit GEMM on the tile core of gemm_tile.cuh:
//   y[n, g Fg + f, p] = act(sum_q w[g Fg + f, q] * X_g[q, p] + b[g Fg + f])
//   f in [0, Fg)  GEMM rows;  p = (n, oy, ox) columns (Ncols = N Ro Co);
//   q = (k, i, j), k in [0, K/G): reduction (Kd = K/G nr nc; w is (F, Kd) row-major)
//   X_g[q, p] = x[n, g K/G + k, oy sy - py + i dy, ox sx - px + j dx]
// tab[q] = {k R C + i dy C + j dx, (i dy) << 16 | j dx} (dilation is in the table;
// the host checks (nr-1) dy and (nc-1) dx < 65536).

// The B operand: a (BK x BN) slab of X_g, gathered from x (the group's first channel:
// the caller offsets x). As conv.cu's ConvGather: thread t gathers column
// jb = t % BN, reduction rows kkb + i*KSTEP.
template <int BN, int BK, int NT>
struct GroupGather {
    static constexpr int L = BK * BN / NT;
    static constexpr int KSTEP = NT / BN;
    static_assert(NT % BN == 0 && (BK * BN) % NT == 0, "tile");
    const int2* __restrict__ tab;
    const float* xs;                            // x of this thread's sample (and group)
    int R, C, iy0, ix0, pix_off, jb, kkb;
    bool pvalid;
    float r[L];

    __device__ __forceinline__ GroupGather(const float* __restrict__ x,
                                           const int2* __restrict__ tab_, int p0, int Ncols,
                                           int P, int Co, int KRC, int R_, int C_,
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

// Bias, activation, store: rows f < Fg of the group (b and out offset to the group's
// first channel), y's layout (N, F, Ro, Co) with F channels in all.
template <int BM, int BN, int BK, int TM, int TN, int ACT>
__device__ __forceinline__ void group_epilogue(
    const float (&acc)[TM][TN], const float* __restrict__ b, float* __restrict__ out,
    int m0, int p0, int Fg, int F, int P, int Ncols, int act, float act_p, int vec_store)
{
    using T = TileShape<BM, BN, BK, TM, TN>;
    constexpr int GM = T::GM, GN = T::GN;
    const int tx = T::tx(), ty = T::ty();
#pragma unroll
    for (int gi = 0; gi < GM; ++gi)
#pragma unroll
    for (int i4 = 0; i4 < 4; ++i4) {
        const int f = m0 + T::row(ty, gi * 4 + i4);
        if (f >= Fg) continue;
        const float bias = b ? __ldg(b + f) : 0.f;
#pragma unroll
        for (int gj = 0; gj < GN; ++gj) {
            const int p = p0 + T::col(tx, gj * 4);      // multiple of 4
            if (p >= Ncols) continue;
            float v[4];
#pragma unroll
            for (int j4 = 0; j4 < 4; ++j4)
                v[j4] = tile_act<ACT>(act, acc[gi * 4 + i4][gj * 4 + j4] + bias, act_p);
            const int n = p / P;
            const int pix = p - n * P;
            if (vec_store && p + 3 < Ncols) {
                // P % 4 == 0, p % 4 == 0: one sample's 4 consecutive, 16-byte aligned columns
                const size_t o = ((size_t)n * F + f) * P + pix;
                *reinterpret_cast<float4*>(out + o) = make_float4(v[0], v[1], v[2], v[3]);
            } else {
#pragma unroll
                for (int j4 = 0; j4 < 4; ++j4) {
                    const int pj = p + j4;
                    if (pj < Ncols) {
                        const int nj = pj / P;
                        out[((size_t)nj * F + f) * P + (pj - nj * P)] = v[j4];
                    }
                }
            }
        }
    }
}

template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void gconv_igemm(
    const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ b, float* __restrict__ y, const int2* __restrict__ tab,
    int Fg, int F, int Kd, int R, int C, int KRC, int KgRC, int Co, int P, int Ncols,
    int sy, int sx, int py, int px, int act, float act_p, int vec_store)
{
    constexpr int NT = TileShape<BM, BN, BK, TM, TN>::NT;
    const int g = blockIdx.z;
    const int p0 = blockIdx.x * BN;
    const int m0 = blockIdx.y * BM;
    RowTile<BM, BK, NT> la(w + (size_t)g * Fg * Kd, Fg, Kd, m0);
    GroupGather<BN, BK, NT> lb(x + (size_t)g * KgRC, tab, p0, Ncols, P, Co, KRC, R, C,
                               sy, sx, py, px);
    float acc[TM][TN];
    tile_mainloop<BM, BN, BK, TM, TN, true>(la, lb, 0, Kd, acc);
    const float* bg = b ? b + (size_t)g * Fg : b;
    float* out = y + (size_t)g * Fg * P;
#define GCONV_EPILOGUE(ACT)                                                           \
    group_epilogue<BM, BN, BK, TM, TN, ACT>(acc, bg, out, m0, p0, Fg, F, P, Ncols, act, \
                                            act_p, vec_store)
    MDNN_TILE_ACT_DISPATCH(act, GCONV_EPILOGUE);
#undef GCONV_EPILOGUE
}

#define GCONV_ARGS                                                             \
    const float* __restrict__ x, const float* __restrict__ w,                  \
    const float* __restrict__ b, float* __restrict__ y,                        \
    const int2* __restrict__ tab,                                              \
    int Fg, int F, int Kd, int R, int C, int KRC, int KgRC, int Co, int P,     \
    int Ncols, int sy, int sx, int py, int px, int act, float act_p, int vec_store
#define GCONV_PASS x, w, b, y, tab, Fg, F, Kd, R, C, KRC, KgRC, Co, P, Ncols, sy, sx, py, px, \
    act, act_p, vec_store

// grid (ceil(Ncols / BN), ceil(Fg / BM), G); 256 threads, 4x4 per thread.
// 64 filters x 64 pixels: groups of many filters.
extern "C" __global__ void __launch_bounds__(256) gconv_64x64(GCONV_ARGS)
{
    gconv_igemm<64, 64, 16, 4, 4>(GCONV_PASS);
}

// 32 filters x 128 pixels.
extern "C" __global__ void __launch_bounds__(256) gconv_32x128(GCONV_ARGS)
{
    gconv_igemm<32, 128, 16, 4, 4>(GCONV_PASS);
}

// 16 filters x 256 pixels: groups of few filters (ResNeXt-like, small F/G).
extern "C" __global__ void __launch_bounds__(256) gconv_16x256(GCONV_ARGS)
{
    gconv_igemm<16, 256, 16, 4, 4>(GCONV_PASS);
}

// ======================================================================= transposed
// One thread per output pixel (n, oy, ox) (blockIdx.x * 256 + threadIdx.x over
// N Ro Co) and FT consecutive output channels f0 = blockIdx.y * FT .. (a register
// tile: each gathered x value feeds FT filters). The inputs landing on (oy, ox) are
// the taps a = (oy + py) mod sy + t sy with input row i = (oy + py - a) / sy in
// [0, R) (columns likewise), over every input channel k.
template <int FT>
__device__ __forceinline__ void tconv_body(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, long long npix, int K, int R, int C, int F, int Ro, int Co,
    int nr, int nc, int sy, int sx, int py, int px, int act, float act_p)
{
    const long long pid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (pid >= npix) return;
    const int f0 = blockIdx.y * FT;
    const int pi = (int)pid;                    // npix < 2**31: 32-bit division
    const int ox = pi % Co;
    const int t = pi / Co;
    const int oy = t % Ro;
    const int n = t / Ro;
    const size_t RC = (size_t)R * C;
    const size_t wk = (size_t)F * nr * nc;      // w's stride between input channels
    const float* __restrict__ xn = x + (size_t)n * K * RC;
    // filter offsets of the FT channels (past F: channel f0's, computed and dropped)
    int woff[FT];
#pragma unroll
    for (int u = 0; u < FT; ++u) woff[u] = (f0 + u < F ? f0 + u : f0) * nr * nc;
    float acc[FT];
#pragma unroll
    for (int u = 0; u < FT; ++u) acc[u] = 0.f;
    const int ty = oy + py, tx = ox + px;       // >= 0
    for (int a = ty % sy; a < nr; a += sy) {
        const int i = (ty - a) / sy;            // (ty - a) is a multiple of sy
        if (i < 0) break;                       // decreases with a
        if (i >= R) continue;
        for (int c = tx % sx; c < nc; c += sx) {
            const int j = (tx - c) / sx;
            if (j < 0) break;
            if (j >= C) continue;
            const float* __restrict__ xp = xn + (size_t)i * C + j;
            const float* __restrict__ wp = w + a * nc + c;
            for (int k = 0; k < K; ++k) {
                const float xv = __ldg(xp + k * RC);
                const float* __restrict__ wq = wp + k * wk;
#pragma unroll
                for (int u = 0; u < FT; ++u) acc[u] = fmaf(xv, __ldg(wq + woff[u]), acc[u]);
            }
        }
    }
#pragma unroll
    for (int u = 0; u < FT; ++u) {
        const int f = f0 + u;
        if (f < F) {
            const float v = acc[u] + (b ? __ldg(b + f) : 0.f);
            y[(((size_t)n * F + f) * Ro + oy) * Co + ox] = cf_act(act, v, act_p);
        }
    }
}

#define TCONV_ARGS                                                             \
    const float* __restrict__ x, const float* __restrict__ w,                  \
    const float* __restrict__ b, float* __restrict__ y, long long npix,        \
    int K, int R, int C, int F, int Ro, int Co, int nr, int nc,                \
    int sy, int sx, int py, int px, int act, float act_p
#define TCONV_PASS x, w, b, y, npix, K, R, C, F, Ro, Co, nr, nc, sy, sx, py, px, act, act_p

// grid (ceil(N Ro Co / 256), ceil(F / FT)); 256 threads.
extern "C" __global__ void __launch_bounds__(256) tconv_f1(TCONV_ARGS)
{
    tconv_body<1>(TCONV_PASS);
}

extern "C" __global__ void __launch_bounds__(256) tconv_f4(TCONV_ARGS)
{
    tconv_body<4>(TCONV_PASS);
}

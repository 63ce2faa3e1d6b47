// tensor.cu -- the catalogue's tensor and routing ops (minidnn/ops.py, section "tensor and
// routing layers"), on the GPU: mul_scalar, mul (dlib's multiply_zero_padded), add of
// operands of other shapes (dlib's zero-padded tt::add, with the act epilogue),
// scale_channels, copy_range, l2normalize, reorg, resize_bilinear, and a block-per-row
// softmax for long rows (softmax_all). The formulas are those of kernels/cpu/tensor.pyx.
//
// Every kernel is a grid-stride loop over 64-bit indices: the host caps the grid
// (tensor_ops.py), so any tensor size runs with a bounded grid (gridDim.y <= 65535 too).
// Sizes are long long; per-dimension extents are int (the host checks they fit).
// No kernel allocates or synchronises the host: all are graph-capture safe.
// Elementwise kernels accept y == x (each element is read, then written, by one thread).

#include "activations.h"

typedef long long ll;

#define MDNN_GRID_STRIDE(i, n) \
    for (ll i = (ll)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (ll)gridDim.x * blockDim.x)

// ------------------------------------------------------------------ mul_scalar
// y = v * x; n elements
extern "C" __global__ void mul_scalar_f(const float* x, float* y, long long n, float v)
{
    MDNN_GRID_STRIDE(i, n) y[i] = x[i] * v;
}
extern "C" __global__ void mul_scalar_v4(const float4* x, float4* y, long long n4, float v)
{
    MDNN_GRID_STRIDE(i, n4) {
        const float4 u = x[i];
        y[i] = make_float4(u.x * v, u.y * v, u.z * v, u.w * v);
    }
}

// ------------------------------------------------------------------ mul
// same shapes: y = a * b; n elements
extern "C" __global__ void mul_f(const float* a, const float* b, float* y, long long n)
{
    MDNN_GRID_STRIDE(i, n) y[i] = a[i] * b[i];
}
extern "C" __global__ void mul_v4(const float4* a, const float4* b, float4* y, long long n4)
{
    MDNN_GRID_STRIDE(i, n4) {
        const float4 u = a[i], v = b[i];
        y[i] = make_float4(u.x * v.x, u.y * v.y, u.z * v.z, u.w * v.w);
    }
}

// The flat offset of (n, k, r, c) in an (Na, Ka, Ra, Ca) operand, or -1 when the operand
// has no such index (it counts as 0: dlib's zero padding).
__device__ __forceinline__ ll mdnn_padded_at(int n, int k, int r, int c,
                                            int Na, int Ka, int Ra, int Ca)
{
    if (n >= Na || k >= Ka || r >= Ra || c >= Ca) return -1;
    return (((ll)n * Ka + k) * Ra + r) * Ca + c;
}

// y (n = N*K*R*C elements, shape (N, K, R, C)) = a * b, each index of y that a or b lacks
// giving 0 (kernels/cpu/tensor.pyx mul: exactly 0, whatever the other operand holds).
// y never overlaps a or b (the host checks).
extern "C" __global__ void mul_padded(const float* __restrict__ a, const float* __restrict__ b,
                                      float* __restrict__ y, long long n, int K, int R, int C,
                                      int Na, int Ka, int Ra, int Ca,
                                      int Nb, int Kb, int Rb, int Cb)
{
    MDNN_GRID_STRIDE(i, n) {
        const int c = (int)(i % C);
        ll t = i / C;
        const int r = (int)(t % R);
        t /= R;
        const int k = (int)(t % K);
        const int nn = (int)(t / K);
        const ll ia = mdnn_padded_at(nn, k, r, c, Na, Ka, Ra, Ca);
        const ll ib = mdnn_padded_at(nn, k, r, c, Nb, Kb, Rb, Cb);
        y[i] = (ia >= 0 && ib >= 0) ? __ldg(a + ia) * __ldg(b + ib) : 0.f;
    }
}

// ------------------------------------------------------------------ add, zero padded
// y (shape (N, K, R, C), n elements) = act(a + b), each index of y that an operand lacks
// counting as 0 in it (dlib's tt::add of tensors of other shapes; add_prev_'s shortcut of
// a downsampling ResNet block). y never overlaps a or b (the host checks).
extern "C" __global__ void add_padded(const float* __restrict__ a, const float* __restrict__ b,
                                      float* __restrict__ y, long long n, int K, int R, int C,
                                      int Na, int Ka, int Ra, int Ca,
                                      int Nb, int Kb, int Rb, int Cb, int act, float act_p)
{
    MDNN_GRID_STRIDE(i, n) {
        const int c = (int)(i % C);
        ll t = i / C;
        const int r = (int)(t % R);
        t /= R;
        const int k = (int)(t % K);
        const int nn = (int)(t / K);
        const ll ia = mdnn_padded_at(nn, k, r, c, Na, Ka, Ra, Ca);
        const ll ib = mdnn_padded_at(nn, k, r, c, Nb, Kb, Rb, Cb);
        const float u = ia >= 0 ? __ldg(a + ia) : 0.f;
        const float v = ib >= 0 ? __ldg(b + ib) : 0.f;
        y[i] = mdnn_act(act, u + v, act_p);
    }
}

// ------------------------------------------------------------------ scale_channels
// x, y: (N, K, R, C), P = R*C, s: (N, K, 1, 1): y[i] = x[i] * s[i / P]
extern "C" __global__ void scale_channels_f(const float* x, const float* __restrict__ s,
                                            float* y, long long n, long long P)
{
    MDNN_GRID_STRIDE(i, n) y[i] = x[i] * __ldg(s + i / P);
}
// P % 4 == 0: the 4 values of a float4 share their plane
extern "C" __global__ void scale_channels_v4(const float4* x, const float* __restrict__ s,
                                             float4* y, long long n4, long long P4)
{
    MDNN_GRID_STRIDE(i, n4) {
        const float g = __ldg(s + i / P4);
        const float4 u = x[i];
        y[i] = make_float4(u.x * g, u.y * g, u.z * g, u.w * g);
    }
}

// ------------------------------------------------------------------ copy_range
// For each sample n < N: y[n*Dy + yo + j] = x[n*Dx + xo + j], j < count. blockIdx.y walks
// the samples (grid-stride), blockIdx.x / threadIdx.x the range. The host passes the
// pointers already advanced by xo and yo (in floats, or float4s for the _v4 variant, used
// when Dx, Dy, xo, yo and count are multiples of 4 and both bases 16-byte aligned).
// The ranges of x and y never overlap here (see copy_range_overlap).
extern "C" __global__ void copy_range_f(const float* x, float* y, int N, long long Dx,
                                        long long Dy, long long count)
{
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const float* xp = x + (ll)n * Dx;
        float* yp = y + (ll)n * Dy;
        MDNN_GRID_STRIDE(j, count) yp[j] = xp[j];
    }
}
extern "C" __global__ void copy_range_v4(const float4* x, float4* y, int N, long long Dx4,
                                         long long Dy4, long long count4)
{
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const float4* xp = x + (ll)n * Dx4;
        float4* yp = y + (ll)n * Dy4;
        MDNN_GRID_STRIDE(j, count4) yp[j] = xp[j];
    }
}

// One sample whose source and destination ranges overlap (the CPU's memmove): ONE block
// moves the range in chunks of blockDim.x values, every thread reading its value of a
// chunk before any writes it (__syncthreads), the chunks in the order that never
// overwrites a value still to be read: ascending when y is below x, else descending.
extern "C" __global__ void copy_range_overlap(const float* x, float* y, long long count)
{
    const ll B = blockDim.x;
    const ll chunks = (count + B - 1) / B;
    const bool up = y < x;
    for (ll q = 0; q < chunks; ++q) {
        const ll j = (up ? q : chunks - 1 - q) * B + threadIdx.x;
        float v = 0.f;
        if (j < count) v = x[j];
        __syncthreads();
        if (j < count) y[j] = v;
        __syncthreads();
    }
}

// ------------------------------------------------------------------ l2normalize
// Sum over the block of one double per thread, in a fixed order (deterministic); the result
// is returned to every thread. red: blockDim.x / 32 doubles of shared memory (<= 32).
__device__ __forceinline__ double mdnn_block_sum(double v, double* red)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    __syncthreads();                       // red may still be read from a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double s = 0.0;
    const int nw = (blockDim.x + 31) >> 5;
    for (int w = 0; w < nw; ++w) s += red[w];
    return s;
}

// Samples of up to a few thousand values: one block per sample (grid-stride over the N
// samples): sum of squares (double), then y = x * (float)(1 / sqrt(sum + eps)), as
// kernels/cpu/tensor.pyx. y may be x: each thread rescales the values it summed, after
// the block's sum (a barrier) is known.
extern "C" __global__ void l2normalize_block(const float* x, float* y, int N, long long D,
                                             double eps)
{
    __shared__ double red[32];
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const float* xp = x + (ll)n * D;
        float* yp = y + (ll)n * D;
        double s = 0.0;
        for (ll j = threadIdx.x; j < D; j += blockDim.x) {
            const double v = xp[j];
            s += v * v;
        }
        s = mdnn_block_sum(s, red);
        const float inv = (float)(1.0 / sqrt(s + eps));
        for (ll j = threadIdx.x; j < D; j += blockDim.x) yp[j] = xp[j] * inv;
    }
}

// Large samples, two passes. l2_partial: block b (of B, gridDim.x == B) of sample n writes
// the sum of squares of its strided share of x[n] to ws[n*B + b]; l2_scale: every block of
// sample n sums ws[n*B .. n*B+B) in order (the same in each block: deterministic) and
// rescales its share of x[n] into y[n]. y may be x (the second kernel reads x after the
// first has finished).
extern "C" __global__ void l2_partial(const float* x, double* __restrict__ ws, int N,
                                      long long D, int B)
{
    __shared__ double red[32];
    const ll step = (ll)B * blockDim.x;
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const float* xp = x + (ll)n * D;
        double s = 0.0;
        for (ll j = (ll)blockIdx.x * blockDim.x + threadIdx.x; j < D; j += step) {
            const double v = xp[j];
            s += v * v;
        }
        s = mdnn_block_sum(s, red);
        if (threadIdx.x == 0) ws[(ll)n * B + blockIdx.x] = s;
    }
}
extern "C" __global__ void l2_scale(const float* x, const double* __restrict__ ws, float* y,
                                    int N, long long D, int B, double eps)
{
    __shared__ float inv_s;
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        __syncthreads();                   // inv_s of the previous sample has been read
        if (threadIdx.x == 0) {
            double s = 0.0;
            for (int b = 0; b < B; ++b) s += ws[(ll)n * B + b];
            inv_s = (float)(1.0 / sqrt(s + eps));
        }
        __syncthreads();
        const float inv = inv_s;
        const float* xp = x + (ll)n * D;
        float* yp = y + (ll)n * D;
        MDNN_GRID_STRIDE(j, D) yp[j] = xp[j] * inv;
    }
}

// ------------------------------------------------------------------ reorg
// dlib's reorg: x (N, K, R, C) -> y (N, Ko = K*rs*cs, Ro = R/rs, Co = C/cs),
// y[n, (dr*cs + dc)*K + k, r, c] = x[n, k, r*rs + dr, c*cs + dc]; one thread per output
// value (coalesced stores). y never overlaps x.
extern "C" __global__ void reorg_f(const float* __restrict__ x, float* __restrict__ y,
                                   long long n, int K, int R, int C, int Ko, int Ro, int Co,
                                   int rs, int cs)
{
    MDNN_GRID_STRIDE(i, n) {
        const int c = (int)(i % Co);
        ll t = i / Co;
        const int r = (int)(t % Ro);
        t /= Ro;
        const int ko = (int)(t % Ko);
        const ll nn = t / Ko;
        const int j = ko / K, k = ko - j * K;
        const int dr = j / cs, dc = j - dr * cs;
        y[i] = __ldg(x + ((nn * K + k) * R + (ll)r * rs + dr) * C + (ll)c * cs + dc);
    }
}

// ------------------------------------------------------------------ resize_bilinear
// dlib's resize_image (kernels/cpu/tensor.pyx _bl_pos): output index i reads input
// positions lo = clamp(floor(i*scale), 0, n_in-1) and hi = min(lo+1, n_in-1), weight frac
// = i*scale - lo on hi (the coordinate in double, as on the CPU).
__device__ __forceinline__ void mdnn_bl_pos(int i, double scale, int n_in, int& lo, int& hi,
                                            float& frac)
{
    const double p = i * scale;
    int l = (int)floor(p);
    if (l > n_in - 1) l = n_in - 1;
    if (l < 0) l = 0;
    lo = l;
    hi = l + 1 < n_in ? l + 1 : n_in - 1;
    frac = (float)(p - l);
}

// x: (N, K, R, C) -> y: (N, K, Ro, Co); n = N*K*Ro*Co; sy = (R-1)/max(Ro-1,1),
// sx = (C-1)/max(Co-1,1) (aligned corners). Horizontal lerp of the two input rows, then
// the vertical lerp, as the CPU kernel. y never overlaps x.
extern "C" __global__ void resize_bilinear_f(const float* __restrict__ x, float* __restrict__ y,
                                             long long n, int R, int C, int Ro, int Co,
                                             double sy, double sx)
{
    MDNN_GRID_STRIDE(i, n) {
        const int oc = (int)(i % Co);
        const ll t = i / Co;
        const int orow = (int)(t % Ro);
        const ll plane = t / Ro;
        int top, bot, cl, cr;
        float ty, cf;
        mdnn_bl_pos(orow, sy, R, top, bot, ty);
        mdnn_bl_pos(oc, sx, C, cl, cr, cf);
        const float* p = x + plane * R * C;
        const float* pt = p + (ll)top * C;
        const float* pb = p + (ll)bot * C;
        const float t0 = __ldg(pt + cl), t1 = __ldg(pt + cr);
        const float b0 = __ldg(pb + cl), b1 = __ldg(pb + cr);
        const float ht = t0 + cf * (t1 - t0);
        const float hb = b0 + cf * (b1 - b0);
        y[i] = ht + ty * (hb - ht);
    }
}

// ------------------------------------------------------------------ softmax of long rows
// Rows of K contiguous values (softmax over channels at R*C == 1: softmax_all's view of a
// sample as (1, K*R*C, 1, 1)), one block per row (grid-stride over the N rows) for rows
// too long for softmax.cu's warp per row. Stable (max first); three passes over the row.
// y may be x (each thread writes only the values it read, after the block's max and sum
// are known).
__device__ __forceinline__ float mdnn_block_reduce_f(float v, float* red, bool is_max)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = red[0];
    const int nw = (blockDim.x + 31) >> 5;
    for (int w = 1; w < nw; ++w) s = is_max ? fmaxf(s, red[w]) : s + red[w];
    return s;
}

extern "C" __global__ void softmax_rows_block(const float* x, float* y, int N, long long K)
{
    __shared__ float red[32];
    for (int row = blockIdx.x; row < N; row += gridDim.x) {
        const float* xp = x + (ll)row * K;
        float* yp = y + (ll)row * K;
        float m = -INFINITY;
        for (ll k = threadIdx.x; k < K; k += blockDim.x) m = fmaxf(m, xp[k]);
        m = mdnn_block_reduce_f(m, red, true);
        float s = 0.f;
        for (ll k = threadIdx.x; k < K; k += blockDim.x) s += expf(xp[k] - m);
        s = mdnn_block_reduce_f(s, red, false);
        const float inv = 1.f / s;
        for (ll k = threadIdx.x; k < K; k += blockDim.x) yp[k] = expf(xp[k] - m) * inv;
    }
}

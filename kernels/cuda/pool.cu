// pool.cu -- max and average pooling over (nr x nc) windows.
// Self-contained (no #include). One thread per output element.
//
// x: (N, K, R, C)   y: (N, K, Ro, Co)
// Window of output (oy, ox): rows oy*sy - py .. +nr-1, cols ox*sx - px .. +nc-1,
// clipped to the image. Padding is never a value: max ignores it and the
// average divides by the number of in-bounds pixels (COUNT_EXCLUDE_PADDING).
// The caller guarantees pad < window, so every window holds a real pixel.

__device__ __forceinline__ void pool_window(
    int idx, int R, int C, int Ro, int Co, int nr, int nc,
    int sy, int sx, int py, int px,
    int& nk, int& r0, int& r1, int& c0, int& c1)
{
    const int ox = idx % Co;
    const int t = idx / Co;
    const int oy = t % Ro;
    nk = t / Ro;
    const int ys = oy * sy - py, xs = ox * sx - px;
    r0 = max(ys, 0); r1 = min(ys + nr, R);
    c0 = max(xs, 0); c1 = min(xs + nc, C);
}

extern "C" __global__ void max_pool(
    const float* __restrict__ x, float* __restrict__ y, int total,
    int R, int C, int Ro, int Co, int nr, int nc, int sy, int sx, int py, int px)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int nk, r0, r1, c0, c1;
    pool_window(idx, R, C, Ro, Co, nr, nc, sy, sx, py, px, nk, r0, r1, c0, c1);
    const float* xp = x + (size_t)nk * R * C;
    float m = -INFINITY;
    for (int r = r0; r < r1; ++r)
        for (int c = c0; c < c1; ++c) m = fmaxf(m, __ldg(xp + r * C + c));
    y[idx] = m;
}

extern "C" __global__ void avg_pool(
    const float* __restrict__ x, float* __restrict__ y, int total,
    int R, int C, int Ro, int Co, int nr, int nc, int sy, int sx, int py, int px)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int nk, r0, r1, c0, c1;
    pool_window(idx, R, C, Ro, Co, nr, nc, sy, sx, py, px, nk, r0, r1, c0, c1);
    const float* xp = x + (size_t)nk * R * C;
    float s = 0.f;
    for (int r = r0; r < r1; ++r)
        for (int c = c0; c < c1; ++c) s += __ldg(xp + r * C + c);
    y[idx] = s / (float)((r1 - r0) * (c1 - c0));
}

// Global pooling (window = whole image, no padding, one output per (n, k)):
// one warp per (n, k) plane, coalesced reads, shuffle reduction.
extern "C" __global__ void global_pool(
    const float* __restrict__ x, float* __restrict__ y, int planes, int RC, int is_max)
{
    const int lane = threadIdx.x & 31;
    const int plane = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (plane >= planes) return;
    const float* xp = x + (size_t)plane * RC;
    float v = is_max ? -INFINITY : 0.f;
    for (int i = lane; i < RC; i += 32) {
        const float t = __ldg(xp + i);
        v = is_max ? fmaxf(v, t) : v + t;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) y[plane] = is_max ? v : v / (float)RC;
}

// softmax.cu -- softmax over channels k for every (n, r, c) (dlib's softmax_).
// Self-contained (no #include). Numerically stable: subtract the max first.
// x, y: (N, K, R, C); y may be x (each thread or warp reads its values
// before writing them).

// R*C > 1: one thread per (n, pixel); the K values are RC apart, and
// neighbouring threads read neighbouring pixels (coalesced).
extern "C" __global__ void softmax_strided(const float* x, float* y, int N, int K, int RC)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * RC) return;
    const int n = t / RC, pix = t - n * RC;
    const float* xp = x + (size_t)n * K * RC + pix;
    float* yp = y + (size_t)n * K * RC + pix;
    float m = -INFINITY;
    for (int k = 0; k < K; ++k) m = fmaxf(m, xp[(size_t)k * RC]);
    float s = 0.f;
    for (int k = 0; k < K; ++k) s += expf(xp[(size_t)k * RC] - m);
    const float inv = 1.f / s;
    for (int k = 0; k < K; ++k) yp[(size_t)k * RC] = expf(xp[(size_t)k * RC] - m) * inv;
}

// R*C == 1: rows of K contiguous values; one warp per row.
extern "C" __global__ void softmax_rows(const float* x, float* y, int N, int K)
{
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;
    const float* xp = x + (size_t)row * K;
    float* yp = y + (size_t)row * K;
    float m = -INFINITY;
    for (int k = lane; k < K; k += 32) m = fmaxf(m, xp[k]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float s = 0.f;
    for (int k = lane; k < K; k += 32) s += expf(xp[k] - m);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const float inv = 1.f / s;
    for (int k = lane; k < K; k += 32) yp[k] = expf(xp[k] - m) * inv;
}

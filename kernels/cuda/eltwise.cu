// eltwise.cu -- affine, relu, add, and the split-K reduction epilogue.
// Self-contained (no #include). Memory-bound: *_v4 variants move 16 bytes per
// thread and are used when the host has checked size % 4 == 0 and 16-byte
// alignment. Every kernel accepts y == x (in place): each element is read
// once, then written by the same thread.

__device__ __forceinline__ float relu_if(float v, int relu) { return relu ? fmaxf(v, 0.f) : v; }

// y = max(x, 0); n elements
extern "C" __global__ void relu_f(const float* x, float* y, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = fmaxf(x[i], 0.f);
}
extern "C" __global__ void relu_v4(const float4* x, float4* y, int n4)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) {
        float4 v = x[i];
        v.x = fmaxf(v.x, 0.f); v.y = fmaxf(v.y, 0.f); v.z = fmaxf(v.z, 0.f); v.w = fmaxf(v.w, 0.f);
        y[i] = v;
    }
}

// y = a + b (then relu); n elements
extern "C" __global__ void add_f(const float* a, const float* b, float* y, int n, int relu)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = relu_if(a[i] + b[i], relu);
}
extern "C" __global__ void add_v4(const float4* a, const float4* b, float4* y, int n4, int relu)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) {
        const float4 u = a[i], v = b[i];
        y[i] = make_float4(relu_if(u.x + v.x, relu), relu_if(u.y + v.y, relu),
                           relu_if(u.z + v.z, relu), relu_if(u.w + v.w, relu));
    }
}

// x, y: (N, K, R, C) with RC = R*C; y = x*gamma[k] + beta[k] (then relu)
extern "C" __global__ void affine_f(const float* x, const float* __restrict__ gamma,
                                    const float* __restrict__ beta, float* y,
                                    int n, int K, int RC, int relu)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const int k = (i / RC) % K;
        y[i] = relu_if(fmaf(x[i], __ldg(gamma + k), __ldg(beta + k)), relu);
    }
}
// RC % 4 == 0, so the 4 elements of a float4 share their channel k.
extern "C" __global__ void affine_v4(const float4* x, const float* __restrict__ gamma,
                                     const float* __restrict__ beta, float4* y,
                                     int n4, int K, int RC4, int relu)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) {
        const int k = (i / RC4) % K;
        const float g = __ldg(gamma + k), h = __ldg(beta + k);
        const float4 v = x[i];
        y[i] = make_float4(relu_if(fmaf(v.x, g, h), relu), relu_if(fmaf(v.y, g, h), relu),
                           relu_if(fmaf(v.z, g, h), relu), relu_if(fmaf(v.w, g, h), relu));
    }
}

// Split-K epilogue for conv.cu and gemm.cu: ws holds S slabs of n partial
// sums each, in y's layout. y[i] = sum_s ws[s*n + i] + b[(i / inner) % F]
// (b may be NULL) + z[i] (z may be NULL: the residual of conv2d_residual, never
// y itself), then relu. conv: inner = Ro*Co, F = filters; fc: inner = 1, F = O.
extern "C" __global__ void splitk_reduce(const float* __restrict__ ws, const float* __restrict__ b,
                                         const float* __restrict__ z, float* __restrict__ y,
                                         int n, int S, int inner, int F, int relu)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.f;
    for (int k = 0; k < S; ++k) s += __ldg(ws + (size_t)k * n + i);
    if (b) s += __ldg(b + (i / inner) % F);
    if (z) s += __ldg(z + i);
    y[i] = relu_if(s, relu);
}

// Busy-waits on the GPU for `ns` nanoseconds (one thread). The backend's
// autotuner launches it before timing candidates, so the host can queue the
// timed launches meanwhile and host launch overhead stays out of the timing.
extern "C" __global__ void spin_wait(long long ns)
{
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while ((long long)(t - t0) < ns);
}

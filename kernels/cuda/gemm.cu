// gemm.cu -- fully connected layer: y = x @ w.T + b, then ReLU if asked.
// fp32 in, fp32 accumulate, FFMA only (no TF32). Self-contained (no #include).
//
// x: (N, D)   w: (O, D)   b: (O,) or NULL   y: (N, O)   all row-major
//
// fc_tile: tiled SGEMM "NT" (both operands D-contiguous). A block computes a
//   (BM rows of x) x (BN rows of w) tile of y; tiles of both operands are
//   loaded D-contiguous and stored transposed into shared memory, double
//   buffered through registers. Split-K over D like conv.cu: with
//   gridDim.z > 1 the host passes b = NULL, relu = 0, out_zstride = N*O and
//   eltwise.cu's splitk_reduce finishes the job.
// fc_small: N <= 8 (batch-1 latency): one warp per output column j reads
//   w[j, :] once, coalesced, and dots it with every row of x.

#define SMEM_PAD 4

template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void sgemm_nt(
    const float* __restrict__ A, const float* __restrict__ B,
    const float* __restrict__ bias, float* __restrict__ Cout,
    int M, int Nn, int Kd, int relu, int kchunk, long long out_zstride, int vec_store)
{
    // C[i, j] = sum_k A[i, k] * B[j, k];  A: (M, Kd), B: (Nn, Kd), C: (M, Nn)
    constexpr int NT = (BM / TM) * (BN / TN);
    constexpr int LA = BM * BK / NT;
    constexpr int LB = BN * BK / NT;
    constexpr int GM = TM / 4, GN = TN / 4;
    static_assert((BM * BK) % NT == 0 && (BN * BK) % NT == 0, "tile");

    __shared__ __align__(16) float As[2][BK][BM + SMEM_PAD];
    __shared__ __align__(16) float Bs[2][BK][BN + SMEM_PAD];

    const int tid = threadIdx.x;
    const int tx = tid % (BN / TN);
    const int ty = tid / (BN / TN);
    const int j0 = blockIdx.x * BN;
    const int i0 = blockIdx.y * BM;
    const int kbeg = blockIdx.z * kchunk;
    const int kend = min(Kd, kbeg + kchunk);

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
            const int r = i0 + e / BK, q = k0 + e % BK;
            ra[i] = (r < M && q < kend) ? __ldg(A + (size_t)r * Kd + q) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) {
            const int e = tid + i * NT;
            const int r = j0 + e / BK, q = k0 + e % BK;
            rb[i] = (r < Nn && q < kend) ? __ldg(B + (size_t)r * Kd + q) : 0.f;
        }
    };
    auto store_tiles = [&](int buf) {
#pragma unroll
        for (int i = 0; i < LA; ++i) {
            const int e = tid + i * NT;
            As[buf][e % BK][e / BK] = ra[i];
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) {
            const int e = tid + i * NT;
            Bs[buf][e % BK][e / BK] = rb[i];
        }
    };

    load_tiles(kbeg);
    store_tiles(0);
    __syncthreads();
    int buf = 0;
    for (int k0 = kbeg; k0 < kend; k0 += BK) {
        const bool more = k0 + BK < kend;
        if (more) load_tiles(k0 + BK);
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
        if (more) store_tiles(buf ^ 1);
        __syncthreads();
        buf ^= 1;
    }

    float* out = Cout + (long long)blockIdx.z * out_zstride;
#pragma unroll
    for (int gi = 0; gi < GM; ++gi)
#pragma unroll
    for (int i4 = 0; i4 < 4; ++i4) {
        const int i = i0 + gi * (BM / GM) + ty * 4 + i4;
        if (i >= M) continue;
#pragma unroll
        for (int gj = 0; gj < GN; ++gj) {
            const int j = j0 + gj * (BN / GN) + tx * 4;
            if (j >= Nn) continue;
            float v[4];
#pragma unroll
            for (int j4 = 0; j4 < 4; ++j4) {
                float t = acc[gi * 4 + i4][gj * 4 + j4];
                if (bias && j + j4 < Nn) t += __ldg(bias + j + j4);
                v[j4] = relu ? fmaxf(t, 0.f) : t;
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

// y (N, O) = x (N, D) @ w (O, D)^T: 64 rows of x by 64 rows of w per block.
extern "C" __global__ void __launch_bounds__(256) fc_tile(
    const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ b, float* __restrict__ y,
    int N, int O, int D, int relu, int kchunk, long long out_zstride, int vec_store)
{
    sgemm_nt<64, 64, 16, 4, 4>(x, w, b, y, N, O, D, relu, kchunk, out_zstride, vec_store);
}

#define FC_SMALL_NB 8

// N <= 8. Block: 8 warps; warp v of block blk computes column j = blk*8 + v
// for every sample. vec4: D % 4 == 0 and x, w 16-byte aligned.
extern "C" __global__ void __launch_bounds__(256) fc_small(
    const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ b, float* __restrict__ y,
    int N, int O, int D, int relu, int vec4)
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
    const float bias = b ? __ldg(b + j) : 0.f;
#pragma unroll
    for (int n = 0; n < FC_SMALL_NB; ++n) {
        float v = acc[n];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0 && n < N) {
            v += bias;
            y[(size_t)n * O + j] = relu ? fmaxf(v, 0.f) : v;
        }
    }
}

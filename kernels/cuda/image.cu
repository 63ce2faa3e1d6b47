// image.cu -- dlib's image input layers on the GPU: uint8 images -> float planes, the levels
// of a tiled image pyramid, and dlib's bilinear resize of uint8 images (pyramid_up).
// Self-contained (no #include).
//
// The arithmetic is kernels/cpu/image.pyx's (dlib's resize_image, reproduced bit for bit
// there), operation for operation, with every float and double multiply and add written
// as a round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __dmul_rn, __dadd_rn): nvcc never
// contracts those into an FMA, and the CPU code is compiled with fp-contract off.
//
// The geometry of a resize (for each destination column: the two source columns and the
// lane weights dlib's simd4f code accumulates in float32 across groups of four columns, or
// the scalar tail's; for each destination row: the two source rows and their weights) is
// the same for every plane and every call of an image size: backends/cuda/image_ops.py
// computes it once per shape on the host, with the CPU kernel's arithmetic, into tables:
//
//   ci[2*c]  = left, ci[2*c+1] = right      source columns of destination column c
//   cf[2*c]  = wl,   cf[2*c+1] = wr         vector lanes (c < nvec): 1 - lr and lr (float)
//                                           scalar tail (c >= nvec): 1 - lr_frac, lr_frac
//   cd[c]    = lr_frac in double            (the RGB uint8 tail; 0 for vector columns)
//   ri[2*r]  = top,  ri[2*r+1] = bottom     source rows of destination row r
//   rf[2*r]  = fitb, rf[2*r+1] = ftb        float (1 - tb_frac), float tb_frac
//   rd[2*r]  = 1 - tb_frac, rd[2*r+1] = tb_frac   (double)
//
// A level descriptor lv[LV * i ...] (LV = 11 ints) says where level i's source and
// destination rectangles are in the plane and where its table rows start:
//   sl, st, snr, snc, dl, dt, dnr, dnc, col_off, row_off, nvec

#define LV 11

// One destination pixel of dlib's float resize_image (image.pyx mdnn_dlib_resize_row).
// st, sb: the source rows. Not __restrict__: in pyramid_levels_block a level reads what
// other threads of the block wrote (no non-coherent loads).
__device__ __forceinline__ float resize_px(
    const float* st, const float* sb, int c, int nvec,
    const int* __restrict__ ci, const float* __restrict__ cf, float fitb, float ftb,
    double omtb, double tb)
{
    const int l = ci[2 * c], r = ci[2 * c + 1];
    const float wl = cf[2 * c], wr = cf[2 * c + 1];
    if (c < nvec) {
        const float tlf = __fmul_rn(fitb, wl), trf = __fmul_rn(fitb, wr);
        const float blf = __fmul_rn(ftb, wl), brf = __fmul_rn(ftb, wr);
        float out = __fmul_rn(tlf, st[l]);
        out = __fadd_rn(out, __fmul_rn(trf, st[r]));
        out = __fadd_rn(out, __fmul_rn(blf, sb[l]));
        out = __fadd_rn(out, __fmul_rn(brf, sb[r]));
        return out;
    }
    const float a = __fadd_rn(__fmul_rn(wl, st[l]), __fmul_rn(wr, st[r]));
    const float b = __fadd_rn(__fmul_rn(wl, sb[l]), __fmul_rn(wr, sb[r]));
    return __double2float_rn(__dadd_rn(__dmul_rn(omtb, (double)a), __dmul_rn(tb, (double)b)));
}

// One pixel (plane p, row r, column c of the destination) of level `level`.
__device__ __forceinline__ void level_px(
    float* x, const int* __restrict__ d, int p, int r, int c,
    long long plane, int C,
    const int* __restrict__ ci, const float* __restrict__ cf,
    const int* __restrict__ ri, const float* __restrict__ rf, const double* __restrict__ rd)
{
    const int sl = d[0], stp = d[1], dl = d[4], dtp = d[5];
    const int co = d[8], ro = d[9], nvec = d[10];
    const int rr = ro + r;
    float* base = x + (long long)p * plane;
    const float* st = base + (long long)(stp + ri[2 * rr]) * C + sl;
    const float* sb = base + (long long)(stp + ri[2 * rr + 1]) * C + sl;
    base[(long long)(dtp + r) * C + dl + c] =
        resize_px(st, sb, c, nvec, ci + 2 * co, cf + 2 * co, rf[2 * rr], rf[2 * rr + 1],
                  rd[2 * rr], rd[2 * rr + 1]);
}

// One level of the pyramid for every plane: one thread per destination pixel.
// planes = N * K, plane = R * C.
extern "C" __global__ void pyramid_level(
    float* x, const int* __restrict__ lv,
    const int* __restrict__ ci, const float* __restrict__ cf,
    const int* __restrict__ ri, const float* __restrict__ rf, const double* __restrict__ rd,
    int level, int planes, long long plane, int C)
{
    const int* d = lv + LV * level;
    const int dnr = d[6], dnc = d[7];
    const long long per = (long long)dnr * dnc;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= per * planes) return;
    const int p = (int)(idx / per);
    const int q = (int)(idx - p * per);
    const int r = q / dnc, c = q - r * dnc;
    level_px(x, d, p, r, c, plane, C, ci, cf, ri, rf, rd);
}

// The small levels first .. last-1 of every plane, one block per plane: each level is
// made from the one before it, the block's threads meeting at __syncthreads between
// levels (global writes of a block are visible to the block after it).
extern "C" __global__ void pyramid_levels_block(
    float* x, const int* __restrict__ lv,
    const int* __restrict__ ci, const float* __restrict__ cf,
    const int* __restrict__ ri, const float* __restrict__ rf, const double* __restrict__ rd,
    int first, int last, long long plane, int C)
{
    const int p = blockIdx.x;
    for (int level = first; level < last; ++level) {
        const int* d = lv + LV * level;
        const int dnr = d[6], dnc = d[7];
        const int per = dnr * dnc;
        for (int q = threadIdx.x; q < per; q += blockDim.x) {
            const int r = q / dnc, c = q - r * dnc;
            level_px(x, d, p, r, c, plane, C, ci, cf, ri, rf, rd);
        }
        __syncthreads();
    }
}

// Level 0: N uint8 images (H, W, ch) (ch = 1: (H, W)), one after the other in img, into
// rectangle (left, top) of planes 0 .. ch-1 of x (N, ch, R, C): (p - mean_k) / 256 in
// float32 as input.py's _planes computes it (p - m rounded, then times 1/256, exact).
// Grayscale: means 0 (p - 0 == p). One thread per pixel of one image.
extern "C" __global__ void image_planes(
    const unsigned char* __restrict__ img, float* __restrict__ x,
    int N, int H, int W, int ch, int R, int C, int left, int top,
    float m0, float m1, float m2)
{
    const long long HW = (long long)H * W;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= HW * N) return;
    const int n = (int)(idx / HW);
    const int q = (int)(idx - n * HW);
    const int r = q / W, c = q - r * W;
    const unsigned char* s = img + idx * ch;
    float* o = x + (long long)n * ch * R * C + (long long)(top + r) * C + left + c;
    const long long plane = (long long)R * C;
    const float inv = 0.00390625f;                      // 1/256, exact
    if (ch == 3) {
        o[0] = __fmul_rn(__fsub_rn((float)s[0], m0), inv);
        o[plane] = __fmul_rn(__fsub_rn((float)s[1], m1), inv);
        o[2 * plane] = __fmul_rn(__fsub_rn((float)s[2], m2), inv);
    } else {
        o[0] = __fmul_rn(__fsub_rn((float)s[0], m0), inv);
    }
}

// dlib's resize_image with bilinear interpolation of N uint8 images (snr x snc x ch) into
// (dnr x dnc x ch) (image.pyx mdnn_dlib_resize_u8_row): RGB (ch = 3) lanes truncate, its
// tail is all double and truncates; grayscale (ch = 1) lanes round with value + 0.5 in
// double, its tail is float/double mixed and truncates after clamping. Tables as above
// (col_off = row_off = 0). One thread per destination pixel (all its channels).
extern "C" __global__ void resize_u8(
    const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
    int N, int snr, int snc, int dnr, int dnc, int ch, int nvec,
    const int* __restrict__ ci, const float* __restrict__ cf, const double* __restrict__ cd,
    const int* __restrict__ ri, const float* __restrict__ rf, const double* __restrict__ rd)
{
    const long long per = (long long)dnr * dnc;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= per * N) return;
    const int n = (int)(idx / per);
    const int q = (int)(idx - n * per);
    const int r = q / dnc, c = q - r * dnc;
    const unsigned char* s = src + (long long)n * snr * snc * ch;
    const unsigned char* st = s + (long long)ri[2 * r] * snc * ch;
    const unsigned char* sb = s + (long long)ri[2 * r + 1] * snc * ch;
    unsigned char* o = dst + idx * ch;
    const int l = ci[2 * c] * ch, rt = ci[2 * c + 1] * ch;
    const float wl = cf[2 * c], wr = cf[2 * c + 1];
    const float fitb = rf[2 * r], ftb = rf[2 * r + 1];
    const double omtb = rd[2 * r], tb = rd[2 * r + 1];
    if (c < nvec) {
        const float tlf = __fmul_rn(fitb, wl), trf = __fmul_rn(fitb, wr);
        const float blf = __fmul_rn(ftb, wl), brf = __fmul_rn(ftb, wr);
        for (int k = 0; k < ch; ++k) {
            float out = __fmul_rn(tlf, (float)st[l + k]);
            out = __fadd_rn(out, __fmul_rn(trf, (float)st[rt + k]));
            out = __fadd_rn(out, __fmul_rn(blf, (float)sb[l + k]));
            out = __fadd_rn(out, __fmul_rn(brf, (float)sb[rt + k]));
            if (ch == 3)
                o[k] = (unsigned char)__float2int_rz(out);
            else
                o[k] = (unsigned char)__double2int_rz(__dadd_rn((double)out, 0.5));
        }
        return;
    }
    if (ch == 3) {
        const double lr = cd[c], omlr = __dadd_rn(1.0, -lr);
        for (int k = 0; k < 3; ++k) {
            const double tl = st[l + k], tr = st[rt + k], bl = sb[l + k], br = sb[rt + k];
            const double top = __dadd_rn(__dmul_rn(omlr, tl), __dmul_rn(lr, tr));
            const double bot = __dadd_rn(__dmul_rn(omlr, bl), __dmul_rn(lr, br));
            const double v = __dadd_rn(__dmul_rn(omtb, top), __dmul_rn(tb, bot));
            o[k] = (unsigned char)__double2int_rz(v);
        }
    } else {
        const float a = __fadd_rn(__fmul_rn(wl, (float)st[l]), __fmul_rn(wr, (float)st[rt]));
        const float b = __fadd_rn(__fmul_rn(wl, (float)sb[l]), __fmul_rn(wr, (float)sb[rt]));
        const float v = __double2float_rn(__dadd_rn(__dmul_rn(omtb, (double)a),
                                                    __dmul_rn(tb, (double)b)));
        o[0] = v > 255.0f ? (unsigned char)255 : (v >= 0.0f ? (unsigned char)__float2int_rz(v)
                                                            : (unsigned char)0);
    }
}

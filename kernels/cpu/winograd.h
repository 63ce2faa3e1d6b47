/* Winograd convolution F(m x m, 3 x 3), m = 2, 4 or 6, for 3x3 stride-1
 * convolutions with any zero padding (kernels/cpu/winograd.pyx drives it).
 *
 *   y[n, f] = A^T [ sum_k U[f, k] (.) V[k, tile] ] A,  U = G w[f, k] G^T,
 *   V = B^T d B for each alpha x alpha input tile d (alpha = m + 2), tiles
 *   m apart, so each output tile of m x m pixels costs alpha^2 multiplies per
 *   (filter, channel) instead of 9 m^2 (F(4x4): 36 vs 144, 4x fewer).
 *
 * The alpha^2 products summed over channels are alpha^2 GEMMs, one per
 * position xi of the tile:  M[xi] (tiles x F) = V[xi] (tiles x K) U[xi]^T.
 * Layouts, chosen so that every transform is vectorised over 8 contiguous
 * channels or filters and the GEMMs run on gemm_avx2.h's 6x16 micro-kernel
 * (mdnn_kernel) as it is:
 *   u  (alpha^2, S = ceil(F/16), K, 16): U[xi]^T packed once (at compile
 *      time, mdnn_wino_filters) in 16-filter slivers, the micro-kernel's B;
 *      the filters past F are zero.
 *   band (per thread): the input rows of the tiles of one tile row in a
 *      chunk, 8 channels at a time, channels contiguous: band[r][c][8]
 *      (zeros past K and outside the image), converted from NCHW with 8x8
 *      transposes; B^T is applied down its columns in place (tiles that
 *      overlap share them), then along each tile's rows into V.
 *   V  (per thread): V[xi][t][k], t < T tiles of the chunk, K8 = K rounded
 *      up to 8 floats per tile; the GEMM's A, read in place by the
 *      micro-kernel (row stride K8).
 *   M  (per thread): M[xi][t][f], a block of fbw filters (a multiple of 16):
 *      the micro-kernel's output (row stride fbw); the output transform reads
 *      8 contiguous filters of one tile per load.
 * The output transform adds the bias (8 filters per vector), transposes the
 * 8 filters x m x m outputs of a tile to y's NCHW rows, adds the residual z
 * (conv2d_residual's), applies the activation (mdnn_act_array) and stores
 * the rows that lie inside the output (a ragged last tile row or column is
 * computed whole and clipped).
 *
 * Work: a task is a chunk of T consecutive tiles (flattened (n, tile row,
 * tile column)) and a part of the filters; its working set (V and one M
 * block) is sized to sit in L2. Per task:
 *   input transform of the chunk (once per chunk and thread: a thread that
 *   takes the next filter part of the same chunk keeps V)
 *   for each block of fbw filters of the part:
 *     for xi < alpha^2: for K block (<= kc): for 16-filter sliver:
 *       for 6 tiles: micro-kernel                    [V[xi] in L2, sliver in L1]
 *     output transform + epilogue of the block       [M in L2]
 * Without AVX2 a portable 8-float vector type stands in for __m256 and the
 * micro-kernel is gemm_avx2.h's portable one (conv2d never routes here then,
 * but tests force it).
 */
#ifndef MINIDNN_WINOGRAD_H
#define MINIDNN_WINOGRAD_H

#include "gemm_avx2.h"

typedef struct {
    const float* x;     /* (N, K, R, C) */
    const float* u;     /* (alpha^2, S, K, 16) */
    const float* b;     /* (F,) or NULL */
    const float* z;     /* (N, F, Ro, Co) residual, or NULL */
    float* y;           /* (N, F, Ro, Co) */
    int N, K, R, C, F, py, px, Ro, Co;
    int m, alpha, A2;   /* output tile, input tile, alpha^2 */
    int tr, tc;         /* tile rows and columns per sample */
    long ntiles;        /* N * tr * tc */
    int K8, S;          /* K rounded up to 8; ceil(F / 16) */
    int act;
    float act_p;
    /* the plan (winograd.pyx _wino_plan) */
    int unit;           /* tiles per chunk unit: tc (chunks of whole tile rows) or 1 */
    long nunits;        /* ntiles / unit */
    int nchunks;        /* chunk c: units [c*nunits/nchunks, (c+1)*nunits/nchunks) */
    int Tst;            /* most tiles in a chunk (the stride of V and M) */
    int fbw;            /* filters per block (multiple of 16) */
    int nparts;         /* filter parts (tasks per chunk) */
    int part_blocks;    /* blocks of fbw filters per part */
    int kc;             /* K block of the GEMMs */
    long ws_band, ws_V, ws_M;   /* floats of the per-thread workspace parts */
} mdnn_wino_t;

/* ------------------------------------------------------- 8-float vectors */
#if MDNN_HAVE_AVX2
typedef __m256 wv;
#define WV_LOAD(p) _mm256_loadu_ps(p)
#define WV_STORE(p, v) _mm256_storeu_ps((p), (v))
#define WV_ADD(a, b) _mm256_add_ps((a), (b))
#define WV_SUB(a, b) _mm256_sub_ps((a), (b))
#define WV_MUL(a, b) _mm256_mul_ps((a), (b))
#define WV_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define WV_SET1(s) _mm256_set1_ps(s)
#define WV_ZERO() _mm256_setzero_ps()
#else
typedef struct { float v[8]; } wv;
static inline wv wv_load(const float* p) { wv r; int i; for (i = 0; i < 8; i++) r.v[i] = p[i]; return r; }
static inline void wv_store(float* p, wv a) { int i; for (i = 0; i < 8; i++) p[i] = a.v[i]; }
static inline wv wv_add(wv a, wv b) { int i; for (i = 0; i < 8; i++) a.v[i] += b.v[i]; return a; }
static inline wv wv_sub(wv a, wv b) { int i; for (i = 0; i < 8; i++) a.v[i] -= b.v[i]; return a; }
static inline wv wv_mul(wv a, wv b) { int i; for (i = 0; i < 8; i++) a.v[i] *= b.v[i]; return a; }
static inline wv wv_fma(wv a, wv b, wv c) { int i; for (i = 0; i < 8; i++) c.v[i] += a.v[i] * b.v[i]; return c; }
static inline wv wv_set1(float s) { wv r; int i; for (i = 0; i < 8; i++) r.v[i] = s; return r; }
#define WV_LOAD(p) wv_load(p)
#define WV_STORE(p, v) wv_store((p), (v))
#define WV_ADD(a, b) wv_add((a), (b))
#define WV_SUB(a, b) wv_sub((a), (b))
#define WV_MUL(a, b) wv_mul((a), (b))
#define WV_FMA(a, b, c) wv_fma((a), (b), (c))
#define WV_SET1(s) wv_set1(s)
#define WV_ZERO() wv_set1(0.0f)
#endif

#define WV_C(s) WV_SET1((float)(s))

/* ------------------------------------------- the 1-D transforms, r = T d */

/* B^T (alpha x alpha) applied to d[0..alpha): F(2x2,3x3), alpha = 4 */
static inline __attribute__((always_inline)) void wino_bt4(const wv* d, wv* r)
{
    r[0] = WV_SUB(d[0], d[2]);
    r[1] = WV_ADD(d[1], d[2]);
    r[2] = WV_SUB(d[2], d[1]);
    r[3] = WV_SUB(d[1], d[3]);
}

/* F(4x4,3x3), alpha = 6 (interpolation points 0, +-1, +-2, inf) */
static inline __attribute__((always_inline)) void wino_bt6(const wv* d, wv* r)
{
    wv t, s;
    r[0] = WV_FMA(WV_C(4), d[0], WV_FMA(WV_C(-5), d[2], d[4]));
    t = WV_FMA(WV_C(-4), d[2], d[4]);
    s = WV_FMA(WV_C(-4), d[1], d[3]);
    r[1] = WV_ADD(t, s);
    r[2] = WV_SUB(t, s);
    t = WV_SUB(d[4], d[2]);
    s = WV_MUL(WV_C(2), WV_SUB(d[3], d[1]));
    r[3] = WV_ADD(t, s);
    r[4] = WV_SUB(t, s);
    r[5] = WV_FMA(WV_C(4), d[1], WV_FMA(WV_C(-5), d[3], d[5]));
}

/* F(6x6,3x3), alpha = 8 (points 0, +-1, +-2, +-1/2, inf) */
static inline __attribute__((always_inline)) void wino_bt8(const wv* d, wv* r)
{
    wv t, s;
    r[0] = WV_FMA(WV_C(5.25), WV_SUB(d[4], d[2]), WV_SUB(d[0], d[6]));
    r[7] = WV_FMA(WV_C(5.25), WV_SUB(d[3], d[5]), WV_SUB(d[7], d[1]));
    t = WV_FMA(WV_C(-4.25), d[4], WV_ADD(d[2], d[6]));
    s = WV_FMA(WV_C(-4.25), d[3], WV_ADD(d[1], d[5]));
    r[1] = WV_ADD(t, s);
    r[2] = WV_SUB(t, s);
    t = WV_FMA(WV_C(0.25), d[2], WV_FMA(WV_C(-1.25), d[4], d[6]));
    s = WV_FMA(WV_C(0.5), d[1], WV_FMA(WV_C(-2.5), d[3], WV_MUL(WV_C(2), d[5])));
    r[3] = WV_ADD(t, s);
    r[4] = WV_SUB(t, s);
    t = WV_FMA(WV_C(4), d[2], WV_FMA(WV_C(-5), d[4], d[6]));
    s = WV_FMA(WV_C(2), d[1], WV_FMA(WV_C(-2.5), d[3], WV_MUL(WV_C(0.5), d[5])));
    r[5] = WV_ADD(t, s);
    r[6] = WV_SUB(t, s);
}

/* A^T (m x alpha) applied to d[0..alpha) */
static inline __attribute__((always_inline)) void wino_at4(const wv* d, wv* r)
{
    r[0] = WV_ADD(WV_ADD(d[0], d[1]), d[2]);
    r[1] = WV_SUB(WV_SUB(d[1], d[2]), d[3]);
}

static inline __attribute__((always_inline)) void wino_at6(const wv* d, wv* r)
{
    wv a1 = WV_ADD(d[1], d[2]), s1 = WV_SUB(d[1], d[2]);
    wv a2 = WV_ADD(d[3], d[4]), s2 = WV_SUB(d[3], d[4]);
    r[0] = WV_ADD(WV_ADD(d[0], a1), a2);
    r[1] = WV_FMA(WV_C(2), s2, s1);
    r[2] = WV_FMA(WV_C(4), a2, a1);
    r[3] = WV_ADD(WV_FMA(WV_C(8), s2, s1), d[5]);
}

static inline __attribute__((always_inline)) void wino_at8(const wv* d, wv* r)
{
    wv a1 = WV_ADD(d[1], d[2]), s1 = WV_SUB(d[1], d[2]);
    wv a2 = WV_ADD(d[3], d[4]), s2 = WV_SUB(d[3], d[4]);
    wv a3 = WV_ADD(d[5], d[6]), s3 = WV_SUB(d[5], d[6]);
    r[0] = WV_ADD(WV_ADD(d[0], a1), WV_ADD(a2, a3));
    r[1] = WV_FMA(WV_C(0.5), s3, WV_FMA(WV_C(2), s2, s1));
    r[2] = WV_FMA(WV_C(0.25), a3, WV_FMA(WV_C(4), a2, a1));
    r[3] = WV_FMA(WV_C(0.125), s3, WV_FMA(WV_C(8), s2, s1));
    r[4] = WV_FMA(WV_C(0.0625), a3, WV_FMA(WV_C(16), a2, a1));
    r[5] = WV_ADD(WV_FMA(WV_C(0.03125), s3, WV_FMA(WV_C(32), s2, s1)), d[7]);
}

/* ------------------------------------------------------- the filter side */

/* G (alpha x 3) of each variant, float64 */
static const double mdnn_wino_g4[4][3] = {
    {1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
static const double mdnn_wino_g6[6][3] = {
    {1.0 / 4, 0, 0}, {-1.0 / 6, -1.0 / 6, -1.0 / 6}, {-1.0 / 6, 1.0 / 6, -1.0 / 6},
    {1.0 / 24, 1.0 / 12, 1.0 / 6}, {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};
static const double mdnn_wino_g8[8][3] = {
    {1, 0, 0}, {-2.0 / 9, -2.0 / 9, -2.0 / 9}, {-2.0 / 9, 2.0 / 9, -2.0 / 9},
    {1.0 / 90, 1.0 / 45, 2.0 / 45}, {1.0 / 90, -1.0 / 45, 2.0 / 45},
    {32.0 / 45, 16.0 / 45, 8.0 / 45}, {32.0 / 45, -16.0 / 45, 8.0 / 45}, {0, 0, 1}};

/* u[xi][f/16][k][f%16] = (G w[f][k] G^T)[xi] for filters f0 <= f < f1 of w
 * (F, K, 3, 3), computed in float64; u's lanes for f >= F (the last sliver's
 * tail) are zeroed by the caller. */
static void mdnn_wino_filters(const float* w, float* u, int F, int K, int m, int f0, int f1)
{
    const int A = m + 2, A2 = A * A, S = (F + 15) / 16;
    const double* G = m == 2 ? &mdnn_wino_g4[0][0] : (m == 4 ? &mdnn_wino_g6[0][0] : &mdnn_wino_g8[0][0]);
    double t[8][3];
    int f, k, i, j, a, c;
    (void)A2;
    for (f = f0; f < f1; f++) {
        for (k = 0; k < K; k++) {
            const float* g = w + ((long)f * K + k) * 9;
            for (i = 0; i < A; i++)          /* t = G g (alpha x 3) */
                for (c = 0; c < 3; c++) {
                    double s = 0;
                    for (a = 0; a < 3; a++) s += G[i * 3 + a] * g[a * 3 + c];
                    t[i][c] = s;
                }
            for (i = 0; i < A; i++)          /* U = t G^T (alpha x alpha) */
                for (j = 0; j < A; j++) {
                    double s = 0;
                    for (c = 0; c < 3; c++) s += t[i][c] * G[j * 3 + c];
                    u[(((long)(i * A + j) * S + f / 16) * K + k) * 16 + f % 16] = (float)s;
                }
        }
    }
}

/* ------------------------------------------------------------ the input */

#if MDNN_HAVE_AVX2
/* columns of 8 rows: o[j] = (r0[j], ..., r7[j]) */
static inline __attribute__((always_inline)) void wino_tr8(__m256* r)
{
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

/* The input rows of tiles txa..txa+seg-1 of tile row ty of sample n, for
 * channels k0..k0+7, channels contiguous:
 *   band[(r * Wb + c) * 8 + q] = x[n][k0 + q][ty*m - py + r][txa*m - px + c]
 * for r < alpha, c < Wb = seg*m + 2 (zero outside the image and for
 * k0 + q >= K). */
static void wino_band(const mdnn_wino_t* w, int n, int ty, int txa, int seg, int k0, float* band)
{
    const int m = w->m, A = w->alpha, K = w->K, R = w->R, C = w->C;
    const int Wb = seg * m + 2, ix0 = txa * m - w->px;
    const int kn = K - k0 < 8 ? K - k0 : 8;
    const long plane = (long)R * C;
    const float* xk = w->x + ((long)n * K + k0) * plane;
    int r, c, q;
    for (r = 0; r < A; r++) {
        const int iy = ty * m - w->py + r;
        float* br = band + (long)r * Wb * 8;
        const float* src = xk + (long)iy * C;
        if (iy < 0 || iy >= R) {
            memset(br, 0, (size_t)Wb * 8 * sizeof(float));
            continue;
        }
        c = 0;
        while (c < Wb) {
            const int ix = ix0 + c;
            float* d = br + (long)c * 8;
#if MDNN_HAVE_AVX2
            if (kn == 8 && ix >= 0 && ix + 8 <= C && c + 8 <= Wb) {
                __m256 v[8];
                for (q = 0; q < 8; q++) v[q] = _mm256_loadu_ps(src + q * plane + ix);
                wino_tr8(v);
                for (q = 0; q < 8; q++) _mm256_storeu_ps(d + q * 8, v[q]);
                c += 8;
                continue;
            }
#endif
            if (ix >= 0 && ix < C) {
                for (q = 0; q < kn; q++) d[q] = src[q * plane + ix];
                for (; q < 8; q++) d[q] = 0.0f;
            } else {
                for (q = 0; q < 8; q++) d[q] = 0.0f;
            }
            c++;
        }
    }
}

/* B^T d B of the seg tiles of a band (8 channels): first B^T down each of
 * the band's columns, in place (a column is shared by the tiles that
 * overlap on it), then along each row of each tile, into
 *   V[(i*alpha + j) * xs + t * ts] (8 floats), t < seg. */
#define WINO_INPUT(A)                                                                   \
static void wino_in_##A(float* band, int Wb, int seg, int m, float* v, long ts, long xs) \
{                                                                                       \
    wv d[A], r[A];                                                                      \
    int c, t, i, l;                                                                     \
    for (c = 0; c < Wb; c++) {                                                          \
        float* col = band + (long)c * 8;                                                \
        for (l = 0; l < A; l++) d[l] = WV_LOAD(col + (long)l * Wb * 8);                 \
        wino_bt##A(d, r);                                                               \
        for (i = 0; i < A; i++) WV_STORE(col + (long)i * Wb * 8, r[i]);                 \
    }                                                                                   \
    for (t = 0; t < seg; t++) {                                                         \
        for (i = 0; i < A; i++) {                                                       \
            const float* row = band + ((long)i * Wb + t * m) * 8;                       \
            float* vo = v + (long)i * A * xs + t * ts;                                  \
            for (l = 0; l < A; l++) d[l] = WV_LOAD(row + l * 8);                        \
            wino_bt##A(d, r);                                                           \
            for (l = 0; l < A; l++) WV_STORE(vo + l * xs, r[l]);                        \
        }                                                                               \
    }                                                                                   \
}
WINO_INPUT(4)
WINO_INPUT(6)
WINO_INPUT(8)
#undef WINO_INPUT

/* V[xi][t][k] for the nt tiles t0.. of a chunk: one tile row segment and 8
 * channels at a time (band: alpha x (seg*m + 2) x 8 floats, in L1) */
static void wino_input(const mdnn_wino_t* w, long t0, int nt, float* band, float* V)
{
    const int per = w->tr * w->tc, m = w->m, K8 = w->K8;
    const long xs = (long)w->Tst * K8;
    int t = 0;
    while (t < nt) {
        long g = t0 + t;
        int n = (int)(g / per), rem = (int)(g - (long)n * per);
        int ty = rem / w->tc, txa = rem - ty * w->tc;
        int seg = w->tc - txa, k0;
        if (seg > nt - t) seg = nt - t;
        for (k0 = 0; k0 < K8; k0 += 8) {
            float* v = V + (long)t * K8 + k0;
            wino_band(w, n, ty, txa, seg, k0, band);
            switch (w->alpha) {
            case 4: wino_in_4(band, seg * m + 2, seg, m, v, K8, xs); break;
            case 6: wino_in_6(band, seg * m + 2, seg, m, v, K8, xs); break;
            default: wino_in_8(band, seg * m + 2, seg, m, v, K8, xs); break;
            }
        }
        t += seg;
    }
}

/* ------------------------------------------------------------ the GEMMs */

/* M[xi][t][s*16 + 0..15] = sum_k V[xi][t][k] U[xi][s0 + s][k][0..15], for
 * t < nt, s < ns */
static void wino_gemm(const mdnn_wino_t* w, const float* V, float* M, int nt, int s0, int ns)
{
    const int K = w->K, K8 = w->K8, fbw = w->fbw;
    const int nkb = (K + w->kc - 1) / w->kc, kcs = (K + nkb - 1) / nkb;
    int xi, k0, s, t, mr;
    for (xi = 0; xi < w->A2; xi++) {
        const float* Vx = V + (long)xi * w->Tst * K8;
        float* Mx = M + (long)xi * w->Tst * fbw;
        for (k0 = 0; k0 < K; k0 += kcs) {
            const int kc = K - k0 < kcs ? K - k0 : kcs;
            const int mode = k0 > 0 ? MDNN_ACC : 0;
            for (s = 0; s < ns; s++) {
                const float* bp = w->u + (((long)xi * w->S + s0 + s) * K + k0) * MDNN_NR;
                for (t = 0; t < nt; t += mr) {
                    mr = mdnn_tile_rows(t, nt);
                    mdnn_kernel(mr, kc, Vx + (long)t * K8 + k0, K8, bp,
                                Mx + (long)t * fbw + s * MDNN_NR, fbw, mode, NULL, NULL, 0, 0.0f);
                }
            }
        }
    }
}

/* ------------------------------------------------------------ the output */

/* The general store of a tile (edges of the output, fewer than 8 filters,
 * activations other than identity and relu): ob[(i*m + j)*8 + q] holds
 * conv + bias of tile (n, oy0, ox0), filters f..f+nq-1 (nq <= 8); add z,
 * apply the activation and store what lies inside y. */
static void wino_store(const mdnn_wino_t* w, const float* ob, int n, int f, int nq, int oy0, int ox0)
{
    const int m = w->m, mm = m * m, Ro = w->Ro, Co = w->Co;
    const int mi = Ro - oy0 < m ? Ro - oy0 : m, mj = Co - ox0 < m ? Co - ox0 : m;
    const long P = (long)Ro * Co;
    const long base = ((long)n * w->F + f) * P + (long)oy0 * Co + ox0;
    float sc[8 * 36];           /* sc[q*mm + i*m + j] */
    int q, i, j;
    for (q = 0; q < nq; q++)
        for (i = 0; i < mi; i++)
            for (j = 0; j < mj; j++)
                sc[q * mm + i * m + j] = ob[(i * m + j) * 8 + q];
    if (w->z) {
        for (q = 0; q < nq; q++)
            for (i = 0; i < mi; i++) {
                const float* zr = w->z + base + q * P + (long)i * Co;
                for (j = 0; j < mj; j++) sc[q * mm + i * m + j] += zr[j];
            }
    }
    if (w->act != MDNN_ACT_IDENTITY)
        mdnn_act_array(w->act, w->act_p, sc, sc, (long)nq * mm);
    for (q = 0; q < nq; q++)
        for (i = 0; i < mi; i++) {
            float* yr = w->y + base + q * P + (long)i * Co;
            for (j = 0; j < mj; j++) yr[j] = sc[q * mm + i * m + j];
        }
}

#if MDNN_HAVE_AVX2
/* o[q*P + j] = relu?(r[j][q] + z[q*P + j]) for 8 filters q, j < MO: one output
 * row of a whole interior tile, the 8 x MO block transposed in registers */
static inline __attribute__((always_inline)) void
wino_row_out(const __m256* r, int MO, float* o, const float* z, long P, int relu)
{
    const __m128 zero = _mm_setzero_ps();
    int q;
    if (MO >= 4) {
        __m128 a0 = _mm256_castps256_ps128(r[0]), a1 = _mm256_castps256_ps128(r[1]);
        __m128 a2 = _mm256_castps256_ps128(r[2]), a3 = _mm256_castps256_ps128(r[3]);
        __m128 b0 = _mm256_extractf128_ps(r[0], 1), b1 = _mm256_extractf128_ps(r[1], 1);
        __m128 b2 = _mm256_extractf128_ps(r[2], 1), b3 = _mm256_extractf128_ps(r[3], 1);
        __m128 row[8];
        _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
        _MM_TRANSPOSE4_PS(b0, b1, b2, b3);
        row[0] = a0; row[1] = a1; row[2] = a2; row[3] = a3;
        row[4] = b0; row[5] = b1; row[6] = b2; row[7] = b3;
        for (q = 0; q < 8; q++) {
            __m128 v = row[q];
            if (z) v = _mm_add_ps(v, _mm_loadu_ps(z + q * P));
            if (relu) v = _mm_max_ps(zero, v);
            _mm_storeu_ps(o + q * P, v);
        }
    }
    if (MO == 2 || MO == 6) {
        /* the last two columns: pairs (r[c][q], r[c+1][q]) */
        const int c = MO - 2;
        __m256 lo = _mm256_unpacklo_ps(r[c], r[c + 1]), hi = _mm256_unpackhi_ps(r[c], r[c + 1]);
        __m128 p[4];
        p[0] = _mm256_castps256_ps128(lo);          /* filters 0, 1 */
        p[1] = _mm256_castps256_ps128(hi);          /* filters 2, 3 */
        p[2] = _mm256_extractf128_ps(lo, 1);        /* filters 4, 5 */
        p[3] = _mm256_extractf128_ps(hi, 1);        /* filters 6, 7 */
        for (q = 0; q < 4; q++) {
            __m128 v = p[q];
            float* o0 = o + (2 * q) * P + c;
            float* o1 = o + (2 * q + 1) * P + c;
            if (z) {
                __m128 zz = _mm_loadh_pi(_mm_loadl_pi(zero, (const __m64*)(z + (2 * q) * P + c)),
                                         (const __m64*)(z + (2 * q + 1) * P + c));
                v = _mm_add_ps(v, zz);
            }
            if (relu) v = _mm_max_ps(zero, v);
            _mm_storel_pi((__m64*)o0, v);
            _mm_storeh_pi((__m64*)o1, v);
        }
    }
}
#endif

/* A^T M A + bias of one tile for 8 filters (vectors M[l][j] = mm[(l*alpha +
 * j) * xs]), first down the tile's columns, then along each row, and the
 * tile's store: straight into y for a whole interior tile of 8 filters
 * with an identity or relu epilogue, else through wino_store. */
#define WINO_OUTPUT(A, MO)                                                              \
static void wino_out_##A(const mdnn_wino_t* w, const float* mm, long xs, wv bias,       \
                         int n, int f, int nq, int oy0, int ox0)                        \
{                                                                                       \
    wv d[A], r[MO];                                                                     \
    float tmp[MO * A * 8], ob[MO * MO * 8];                                             \
    const long P = (long)w->Ro * w->Co;                                                 \
    const int fast = MDNN_HAVE_AVX2 && nq == 8 && w->act <= MDNN_ACT_RELU                \
                     && oy0 + MO <= w->Ro && ox0 + MO <= w->Co;                         \
    const long base = ((long)n * w->F + f) * P + (long)oy0 * w->Co + ox0;               \
    int i, j, l;                                                                        \
    for (j = 0; j < A; j++) {                                                           \
        for (l = 0; l < A; l++) d[l] = WV_LOAD(mm + (long)(l * A + j) * xs);            \
        wino_at##A(d, r);                                                               \
        for (i = 0; i < MO; i++) WV_STORE(tmp + (i * A + j) * 8, r[i]);                 \
    }                                                                                   \
    for (i = 0; i < MO; i++) {                                                          \
        for (l = 0; l < A; l++) d[l] = WV_LOAD(tmp + (i * A + l) * 8);                  \
        wino_at##A(d, r);                                                               \
        for (j = 0; j < MO; j++) r[j] = WV_ADD(r[j], bias);                             \
        if (fast) {                                                                     \
            WINO_ROW_OUT(r, MO, w->y + base + (long)i * w->Co,                          \
                         w->z ? w->z + base + (long)i * w->Co : NULL, P,                \
                         w->act == MDNN_ACT_RELU);                                      \
        } else {                                                                        \
            for (j = 0; j < MO; j++) WV_STORE(ob + (i * MO + j) * 8, r[j]);             \
        }                                                                               \
    }                                                                                   \
    if (!fast)                                                                          \
        wino_store(w, ob, n, f, nq, oy0, ox0);                                          \
}
#if MDNN_HAVE_AVX2
#define WINO_ROW_OUT(r, MO, o, z, P, relu) wino_row_out(r, MO, o, z, P, relu)
#else
#define WINO_ROW_OUT(r, MO, o, z, P, relu) ((void)0)
#endif
WINO_OUTPUT(4, 2)
WINO_OUTPUT(6, 4)
WINO_OUTPUT(8, 6)
#undef WINO_OUTPUT
#undef WINO_ROW_OUT

/* The output transform and epilogue of the nt tiles t0.. of a chunk for
 * filters f0 <= f < f1 (M holds them from column 0) */
static void wino_output(const mdnn_wino_t* w, const float* M, long t0, int nt, int f0, int f1)
{
    const int per = w->tr * w->tc, m = w->m;
    const long xs = (long)w->Tst * w->fbw;
    int t, f, q;
    for (t = 0; t < nt; t++) {
        long g = t0 + t;
        int n = (int)(g / per), rem = (int)(g - (long)n * per);
        int ty = rem / w->tc, tx = rem - ty * w->tc;
        const float* mt = M + (long)t * w->fbw;
        for (f = f0; f < f1; f += 8) {
            int nq = f1 - f < 8 ? f1 - f : 8;
            wv bias;
            if (w->b == NULL) {
                bias = WV_ZERO();
            } else if (nq == 8) {
                bias = WV_LOAD(w->b + f);
            } else {
                float bb[8];
                for (q = 0; q < 8; q++) bb[q] = q < nq ? w->b[f + q] : 0.0f;
                bias = WV_LOAD(bb);
            }
            switch (w->alpha) {
            case 4: wino_out_4(w, mt + (f - f0), xs, bias, n, f, nq, ty * m, tx * m); break;
            case 6: wino_out_6(w, mt + (f - f0), xs, bias, n, f, nq, ty * m, tx * m); break;
            default: wino_out_8(w, mt + (f - f0), xs, bias, n, f, nq, ty * m, tx * m); break;
            }
        }
    }
}

/* ------------------------------------------------------------------ a task */

/* Task (chunk, part): the chunk's input transform (skipped when this thread's
 * last task had the same chunk: *last), then each block of the part's
 * filters through the GEMMs and the output transform. ws: this thread's
 * ws_band + ws_V + ws_M floats. */
static void mdnn_wino_task(const mdnn_wino_t* w, int chunk, int part, float* ws, int* last)
{
    const long t0 = (long)chunk * w->nunits / w->nchunks * w->unit;
    const long t1 = (long)(chunk + 1) * w->nunits / w->nchunks * w->unit;
    const int nt = (int)(t1 - t0);
    float* band = ws;
    float* V = ws + w->ws_band;
    float* M = V + w->ws_V;
    int blk, b0 = part * w->part_blocks, b1 = b0 + w->part_blocks;
    if (*last != chunk) {
        wino_input(w, t0, nt, band, V);
        *last = chunk;
    }
    for (blk = b0; blk < b1; blk++) {
        int f0 = blk * w->fbw, f1 = f0 + w->fbw;
        if (f0 >= w->F) break;
        if (f1 > w->F) f1 = w->F;
        wino_gemm(w, V, M, nt, f0 / MDNN_NR, (f1 - f0 + MDNN_NR - 1) / MDNN_NR);
        wino_output(w, M, t0, nt, f0, f1);
    }
}

#endif

/* Implicit-GEMM convolution: a BLIS-style GEMM with a register-blocked
 * AVX2/FMA micro-kernel whose B operand comes straight from the image (no
 * materialised im2col matrix).
 *
 *   y[n] (F x P) = W (F x KRS) * col(x[n]) (KRS x P), then + b[f], + z[n]
 *   (the residual of conv2d_residual, if any), max(0, .)
 *
 * The columns of the GEMM are the flattened output pixels of all samples,
 * q = n*P + p (0 <= q < N*P), so small images (P = 49, 64) still give wide
 * panels. The micro-tile is MDNN_MR = 6 filters x MDNN_NR = 16 pixels
 * (12 ymm accumulators, 2 loads of B and 6 broadcasts of W per step):
 *   - A (filters) is read in place from W (row-major F x KRS): each step
 *     broadcasts one weight of each of the tile's rows (measured: packing W
 *     was 5-10% slower on the reference machine).
 *   - B (pixels), two ways:
 *       packed (mdnn_conv_task): each thread packs kc x ncols of col(x) into
 *         slivers of NR columns (dst[s*kc*NR + k*NR + (0..NR-1)]), and
 *       padded rows (mdnn_conv_task_direct): when every 8 output pixels of a
 *         tile lie in one output row (Co % 8 == 0), the input rows a chunk
 *         needs are copied once into a zero-padded buffer and the kernel reads
 *         B from there through a table of row offsets (no per-tap copies);
 *         a 1x1 stride-1 unpadded conv with P % NR == 0 needs no buffer: the
 *         table points into the image itself (mdnn_direct_zero_copy).
 *   - a ragged last tile of <= MDNN_NARROW (4) columns (batch 1 at 7x7:
 *     49 = 3*16 + 1) runs as dot products along K (mdnn_kernel_narrow), not
 *     as a 16-column tile that is mostly padding.
 *   - the result is stored along pixels (contiguous in y), with the bias,
 *     the residual z (read at y's offsets; c->z == NULL for plain conv2d)
 *     and the ReLU applied in the store of the last K block (epilogue);
 *     tiles that straddle samples or the ragged end go through a scratch
 *     tile.
 * Without AVX2+FMA a portable C micro-kernel is used for the packed variant
 * (conv2d then prefers OpenBLAS; the tests force this path anyway).
 *
 * Loop nest of one task (a range of columns x a range of filters):
 *   for K block (kc <= mdnn_kc):  pack B (kc x ncols)          [L2]
 *     for filter block (<= mdnn_mc rows)                        [W rows in L2]
 *       for tile of NR columns                                  [B sliver in L1]
 *         for tile of <= MR filters: micro-kernel
 */
#ifndef MINIDNN_GEMM_AVX2_H
#define MINIDNN_GEMM_AVX2_H

#include <string.h>
#include <stddef.h>
#include "activations.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MDNN_HAVE_AVX2 1
#else
#define MDNN_HAVE_AVX2 0
#endif

#define MDNN_MR 6
#define MDNN_NR 16
#define MDNN_KC 512      /* max K block */
#define MDNN_MC 240      /* max filter block */

typedef struct {
    const float* x;     /* (N, K, R, C) */
    const float* w;     /* (F, K, nr, nc) = (F, KRS) row-major */
    const float* b;     /* (F,) or NULL */
    const float* z;     /* (N, F, Ro, Co) residual added before the activation, or NULL */
    float* y;           /* (N, F, Ro, Co) */
    int N, K, R, C, F, nr, nc, sy, sx, py, px, Ro, Co, P, KRS;
    int act;            /* the epilogue's activation (activations.h) and its parameter */
    float act_p;
} mdnn_conv_t;

static int mdnn_kc = 320;   /* tuning knobs (<= the compile-time maxima) */
static int mdnn_mc = 120;
static inline int mdnn_have_avx2(void) { return MDNN_HAVE_AVX2; }

/* ------------------------------------------------------------- packing B */

/* d[u] = src[(a0+u)*sx] for u < len where lo <= a0+u < hi, else 0
 * (src == NULL: all zero). len <= room <= NR; d[len..room) may be
 * overwritten with anything (the caller writes those columns later). */
static inline void mdnn_copy_piece(float* d, const float* src, int a0, int len,
                                   int lo, int hi, int sx, int room)
{
#if MDNN_HAVE_AVX2
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int c;
    for (c = 0; c < len; c += 8) {
        __m256 v;
        if (src == NULL) {
            v = _mm256_setzero_ps();
        } else if (a0 + c >= lo && a0 + c + 8 <= hi && sx == 1) {
            v = _mm256_loadu_ps(src + a0 + c);
        } else if (sx == 1) {
            /* masked lanes are never read: no fault past the image */
            __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(a0 + c), lane);
            __m256i m = _mm256_and_si256(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(lo - 1)),
                                         _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), idx));
            v = _mm256_maskload_ps(src + a0 + c, m);
        } else if (sx == 2) {
            /* 16 consecutive inputs, keep the even ones */
            const float* sp = src + 2 * (a0 + c);
            __m256 L, H, S;
            if (a0 + c >= lo && a0 + c + 8 <= hi) {
                L = _mm256_loadu_ps(sp);   /* sp[15] (odd, unused) may lie past the image */
                H = _mm256_maskload_ps(sp + 8, _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0));
            } else {
                const __m256i half = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
                const __m256i even = _mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0);
                __m256i lo1 = _mm256_set1_epi32(lo - 1), hiv = _mm256_set1_epi32(hi);
                __m256i i0 = _mm256_add_epi32(_mm256_set1_epi32(a0 + c), half);
                __m256i i1 = _mm256_add_epi32(_mm256_set1_epi32(a0 + c + 4), half);
                __m256i m0 = _mm256_and_si256(even, _mm256_and_si256(
                    _mm256_cmpgt_epi32(i0, lo1), _mm256_cmpgt_epi32(hiv, i0)));
                __m256i m1 = _mm256_and_si256(even, _mm256_and_si256(
                    _mm256_cmpgt_epi32(i1, lo1), _mm256_cmpgt_epi32(hiv, i1)));
                L = _mm256_maskload_ps(sp, m0);
                H = _mm256_maskload_ps(sp + 8, m1);
            }
            S = _mm256_shuffle_ps(L, H, _MM_SHUFFLE(2, 0, 2, 0));
            v = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(S),
                                                       _MM_SHUFFLE(3, 1, 2, 0)));
        } else {
            float tmp[8];
            int u;
            for (u = 0; u < 8; u++) {
                int ix = a0 + c + u;
                tmp[u] = (ix >= lo && ix < hi) ? src[(long)ix * sx] : 0.0f;
            }
            v = _mm256_loadu_ps(tmp);
        }
        if (room - c >= 8)
            _mm256_storeu_ps(d + c, v);
        else
            _mm256_maskstore_ps(d + c, _mm256_cmpgt_epi32(_mm256_set1_epi32(len - c), lane), v);
    }
#else
    int u;
    (void)room;
    for (u = 0; u < len; u++) {
        int ix = a0 + u;
        d[u] = (src != NULL && ix >= lo && ix < hi) ? src[(long)ix * sx] : 0.0f;
    }
#endif
}

/* Pack rows k0..k0+kc-1 of the implicit im2col matrix, columns
 * q0..q0+ncols-1 (flattened (n, p)), into NR-wide slivers at dst
 * (ceil(ncols/NR) * kc * NR floats; the tail of the last sliver is zero).
 * Loop order: pieces (a run of one output row inside one sliver) outside,
 * the kc rows inside, so the inner loop is a few loads and stores with the
 * per-row offsets read from small tables. */
static __attribute__((noinline)) void mdnn_pack_b(const mdnn_conv_t* c, long q0, int ncols,
                                                  int k0, int kc, float* dst)
{
    const int P = c->P, Co = c->Co, R = c->R, C = c->C, sx = c->sx, sy = c->sy;
    const int nrc = c->nr * c->nc;
    const long xs = (long)c->K * R * C;
    int off[MDNN_KC], ki[MDNN_KC], klo[MDNN_KC], khi[MDNN_KC];
    int kk;
    int nsl = (ncols + MDNN_NR - 1) / MDNN_NR;
    long q = q0, qe = q0 + ncols;
    int n, p, oy, ox, t = 0;
    for (kk = 0; kk < kc; kk++) {
        int k = k0 + kk;
        int ch = k / nrc, rem = k - ch * nrc;
        int i = rem / c->nc, j = rem - i * c->nc;
        int lo = c->px - j > 0 ? (c->px - j + sx - 1) / sx : 0;
        int hi = (C - 1 + c->px - j) >= 0 ? (C - 1 + c->px - j) / sx + 1 : 0;
        if (hi > Co) hi = Co;
        if (hi < lo) hi = lo;
        /* valid ox for this j: lo <= ox < hi (0 <= ox*sx - px + j < C) */
        off[kk] = (ch * R + i) * C - c->px + j;
        ki[kk] = i;
        klo[kk] = lo;
        khi[kk] = hi;
    }
    n = (int)(q / P);
    p = (int)(q - (long)n * P);
    oy = p / Co;
    ox = p - oy * Co;
    while (q < qe) {
        int seg = Co - ox, done = 0;
        int iy0 = oy * sy - c->py;
        const float* xb = c->x + n * xs + (long)iy0 * C;
        if (seg > qe - q) seg = (int)(qe - q);
        while (done < seg) {
            int s = t / MDNN_NR, o = t - s * MDNN_NR;
            int len = MDNN_NR - o, a0 = ox + done;
            float* d = dst + (long)s * kc * MDNN_NR + o;
            if (len > seg - done) len = seg - done;
            for (kk = 0; kk < kc; kk++, d += MDNN_NR) {
                int iy = iy0 + ki[kk];
                const float* src = (iy >= 0 && iy < R) ? xb + off[kk] : NULL;
#if MDNN_HAVE_AVX2
                if (src != NULL && sx == 1 && len <= 8 && o <= 8 && a0 >= klo[kk]
                        && a0 + 8 <= khi[kk]) {
                    _mm256_storeu_ps(d, _mm256_loadu_ps(src + a0));   /* d[len..8): later columns */
                    continue;
                }
                if (src != NULL && len == 16 && a0 >= klo[kk] && a0 + 16 <= khi[kk]) {
                    if (sx == 1) {
                        _mm256_storeu_ps(d, _mm256_loadu_ps(src + a0));
                        _mm256_storeu_ps(d + 8, _mm256_loadu_ps(src + a0 + 8));
                        continue;
                    }
                    if (sx == 2) {
                        const float* sp = src + 2 * a0;
                        __m256 S0 = _mm256_shuffle_ps(_mm256_loadu_ps(sp), _mm256_loadu_ps(sp + 8),
                                                      _MM_SHUFFLE(2, 0, 2, 0));
                        /* the last odd input (sp[31]) may lie past the image: not read */
                        __m256 S1 = _mm256_shuffle_ps(_mm256_loadu_ps(sp + 16),
                            _mm256_maskload_ps(sp + 24, _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0)),
                            _MM_SHUFFLE(2, 0, 2, 0));
                        _mm256_storeu_ps(d, _mm256_castpd_ps(_mm256_permute4x64_pd(
                            _mm256_castps_pd(S0), _MM_SHUFFLE(3, 1, 2, 0))));
                        _mm256_storeu_ps(d + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(
                            _mm256_castps_pd(S1), _MM_SHUFFLE(3, 1, 2, 0))));
                        continue;
                    }
                }
#endif
                mdnn_copy_piece(d, src, a0, len, klo[kk], khi[kk], sx, MDNN_NR - o);
            }
            done += len;
            t += len;
        }
        q += seg;
        ox += seg;
        if (ox == Co) {
            ox = 0;
            if (++oy == c->Ro) { oy = 0; n++; }
        }
    }
    if (ncols % MDNN_NR) {
        /* zero the tail of the last sliver (all kc rows); last, since the
         * pieces above may have scribbled there */
        int s = nsl - 1, t0 = ncols % MDNN_NR;
        float* d = dst + (long)s * kc * MDNN_NR;
        for (kk = 0; kk < kc; kk++)
            memset(d + kk * MDNN_NR + t0, 0, (MDNN_NR - t0) * sizeof(float));
    }
}

/* ---------------------------------------------------------- micro-kernel */

/* mode: 0 = overwrite, 1 = accumulate, and bit 2 = apply the epilogue:
 * + bias[r], + zt[r*ldo + u] (the residual, laid out like out; NULL: none),
 * then the activation act (parameter ap; activations.h).
 * out: row stride ldo; if out is a scratch tile (scatter path) ldo = NR. */
#define MDNN_ACC 1
#define MDNN_EPI 2

#if MDNN_HAVE_AVX2
/* The activations cheap enough to apply to the accumulators themselves
 * (act_avx2.h's mdnn_act8: activations.h's formulas lane by lane); the others
 * run over the finished tile (mdnn_act_array). */
static inline int mdnn_act_in_registers(int act)
{
    return act == MDNN_ACT_CLIPPED_RELU || act == MDNN_ACT_LEAKY_RELU || act == MDNN_ACT_PRELU
           || act == MDNN_ACT_SMELU;
}

/* One row of the tile into out (the store of the micro-kernel below). */
static inline __attribute__((always_inline)) void
mdnn_store_row(float* o, __m256 v0, __m256 v1, int mode, const float* bias,
               const float* zr, int act, float ap)
{
    if (mode & MDNN_ACC) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(o));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(o + 8));
    }
    if (mode & MDNN_EPI) {
        if (bias) {
            __m256 bv = _mm256_broadcast_ss(bias);
            v0 = _mm256_add_ps(v0, bv);
            v1 = _mm256_add_ps(v1, bv);
        }
        if (zr) {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(zr));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(zr + 8));
        }
        if (act == MDNN_ACT_RELU) {
            /* max(0, v): a NaN in v passes through, as in numpy */
            v0 = _mm256_max_ps(_mm256_setzero_ps(), v0);
            v1 = _mm256_max_ps(_mm256_setzero_ps(), v1);
        } else if (act > MDNN_ACT_RELU && mdnn_act_in_registers(act)) {
            v0 = mdnn_act8(act, v0, ap);
            v1 = mdnn_act8(act, v1, ap);
        }
    }
    _mm256_storeu_ps(o, v0);
    _mm256_storeu_ps(o + 8, v1);
}

/* The accumulators are named variables, one pair per row, not arrays: with
 * arrays GCC kept them in memory when lda is not a compile-time constant
 * (12 stores per k step: the kernel ran at half speed). mr is a constant
 * at every call (mdnn_kernel's switch), so the rows past it vanish. */
#define MDNN_KROW(R)                                                            \
    if (mr > R) {                                                               \
        __m256 av = _mm256_broadcast_ss(a##R + k);                              \
        c##R##0 = _mm256_fmadd_ps(av, b0, c##R##0);                             \
        c##R##1 = _mm256_fmadd_ps(av, b1, c##R##1);                             \
    }
#define MDNN_SROW(R)                                                            \
    if (mr > R)                                                                 \
        mdnn_store_row(out + R * ldo, c##R##0, c##R##1, mode, bias ? bias + R : NULL, \
                       zt ? zt + R * ldo : NULL, act, ap);

static inline __attribute__((always_inline)) void
mdnn_kernel_avx2(int mr, int kc, const float* a, long lda, const float* bp,
                 const int* boff, long b1off, float* out, long ldo, int mode,
                 const float* bias, const float* zt, int act, float ap)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
    const float *a4 = a + 4 * lda, *a5 = a + 5 * lda;
    int k;
#pragma GCC unroll 4
    for (k = 0; k < kc; k++) {
        /* B row k: packed (bp + k*NR), or straight from a padded image
         * (bp + boff[k]; its second half b1off floats further on) */
        const float* bk = boff ? bp + boff[k] : bp + k * MDNN_NR;
        __m256 b0 = _mm256_loadu_ps(bk);
        __m256 b1 = _mm256_loadu_ps(bk + (boff ? b1off : 8));
        MDNN_KROW(0) MDNN_KROW(1) MDNN_KROW(2) MDNN_KROW(3) MDNN_KROW(4) MDNN_KROW(5)
    }
    MDNN_SROW(0) MDNN_SROW(1) MDNN_SROW(2) MDNN_SROW(3) MDNN_SROW(4) MDNN_SROW(5)
    /* Any other activation once the accumulators are dead: an out-of-line call
     * between two rows' stores made GCC spill and reload the live accumulators
     * (every ymm register is caller-saved), which cost 3-4x on a 1x1 conv with
     * clipped_relu. The tile's rows are still in L1. */
    if ((mode & MDNN_EPI) && act > MDNN_ACT_RELU && !mdnn_act_in_registers(act)) {
        if (ldo == MDNN_NR) {
            mdnn_act_array(act, ap, out, out, (long)mr * MDNN_NR);
        } else {
            int r;
            for (r = 0; r < mr; r++)
                mdnn_act_array(act, ap, out + r * ldo, out + r * ldo, MDNN_NR);
        }
    }
}
#undef MDNN_KROW
#undef MDNN_SROW
#endif

/* Portable micro-kernel: same contract. */
static inline void
mdnn_kernel_c(int mr, int kc, const float* a, long lda, const float* bp,
              float* out, long ldo, int mode, const float* bias, const float* zt, int act, float ap)
{
    float acc[MDNN_MR][MDNN_NR];
    int r, k, u;
    for (r = 0; r < mr; r++)
        for (u = 0; u < MDNN_NR; u++) acc[r][u] = 0.0f;
    for (k = 0; k < kc; k++) {
        const float* bk = bp + k * MDNN_NR;
        for (r = 0; r < mr; r++) {
            float av = a[r * lda + k];
            for (u = 0; u < MDNN_NR; u++) acc[r][u] += av * bk[u];
        }
    }
    for (r = 0; r < mr; r++) {
        float* o = out + r * ldo;
        for (u = 0; u < MDNN_NR; u++) {
            float v = acc[r][u];
            if (mode & MDNN_ACC) v += o[u];
            if (mode & MDNN_EPI) {
                if (bias) v += bias[r];
                if (zt) v += zt[r * ldo + u];
                v = mdnn_act(act, v, ap);
            }
            o[u] = v;
        }
    }
}

static void mdnn_kernel(int mr, int kc, const float* a, long lda, const float* bp,
                        float* out, long ldo, int mode, const float* bias, const float* zt,
                        int act, float ap)
{
#if MDNN_HAVE_AVX2
    switch (mr) {   /* constant mr: the row loops unroll, unused rows vanish */
    case 6: mdnn_kernel_avx2(6, kc, a, lda, bp, NULL, 8, out, ldo, mode, bias, zt, act, ap); return;
    case 5: mdnn_kernel_avx2(5, kc, a, lda, bp, NULL, 8, out, ldo, mode, bias, zt, act, ap); return;
    case 4: mdnn_kernel_avx2(4, kc, a, lda, bp, NULL, 8, out, ldo, mode, bias, zt, act, ap); return;
    case 3: mdnn_kernel_avx2(3, kc, a, lda, bp, NULL, 8, out, ldo, mode, bias, zt, act, ap); return;
    case 2: mdnn_kernel_avx2(2, kc, a, lda, bp, NULL, 8, out, ldo, mode, bias, zt, act, ap); return;
    default: mdnn_kernel_avx2(1, kc, a, lda, bp, NULL, 8, out, ldo, mode, bias, zt, act, ap); return;
    }
#else
    mdnn_kernel_c(mr, kc, a, lda, bp, out, ldo, mode, bias, zt, act, ap);
#endif
}

#if MDNN_HAVE_AVX2
static void mdnn_kernel_d(int mr, int kc, const float* a, long lda, const float* bp,
                          const int* boff, long b1off, float* out, long ldo, int mode,
                          const float* bias, const float* zt, int act, float ap)
{
    switch (mr) {
    case 6: mdnn_kernel_avx2(6, kc, a, lda, bp, boff, b1off, out, ldo, mode, bias, zt, act, ap); return;
    case 5: mdnn_kernel_avx2(5, kc, a, lda, bp, boff, b1off, out, ldo, mode, bias, zt, act, ap); return;
    case 4: mdnn_kernel_avx2(4, kc, a, lda, bp, boff, b1off, out, ldo, mode, bias, zt, act, ap); return;
    case 3: mdnn_kernel_avx2(3, kc, a, lda, bp, boff, b1off, out, ldo, mode, bias, zt, act, ap); return;
    case 2: mdnn_kernel_avx2(2, kc, a, lda, bp, boff, b1off, out, ldo, mode, bias, zt, act, ap); return;
    default: mdnn_kernel_avx2(1, kc, a, lda, bp, boff, b1off, out, ldo, mode, bias, zt, act, ap); return;
    }
}
#endif

/* ------------------------------------------- narrow tiles: dot products */

/* The ragged last tile of few columns (batch 1 at 7x7: 49 = 3*16 + 1; at
 * 14x14: 196 = 12*16 + 4) would waste most of a 16-column micro-tile. For
 * at most MDNN_NARROW columns we vectorise along K instead:
 *   out[yoff[u] + r*ldo] (+)= sum_k a[r*lda + k] * bt[u*kc + k]
 * for r < mr (<= MR) filters and u < w columns, bt holding the columns
 * transposed (K contiguous). Columns go in pairs: 6 x 2 ymm accumulators,
 * 6 loads of A and 2 of B per 12 FMAs, a horizontal sum per output. */
#define MDNN_NARROW 4

#if MDNN_HAVE_AVX2
static inline float mdnn_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void
mdnn_narrow_avx2(const int mr, const int uw, int kc, const float* a, long lda,
                 const float* bt, float* out, const long* yoff, long ldo, int mode,
                 const float* bias, const float* zb, int act, float ap)
{
    __m256 acc[MDNN_MR][2];
    int r, u, k;
    for (r = 0; r < MDNN_MR; r++) {
        acc[r][0] = _mm256_setzero_ps();
        acc[r][1] = _mm256_setzero_ps();
    }
    for (k = 0; k + 8 <= kc; k += 8) {
        __m256 b0 = _mm256_loadu_ps(bt + k);
        __m256 b1 = uw > 1 ? _mm256_loadu_ps(bt + kc + k) : b0;
        for (r = 0; r < MDNN_MR; r++) {
            if (r < mr) {
                __m256 av = _mm256_loadu_ps(a + r * lda + k);
                acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                if (uw > 1) acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
            }
        }
    }
    if (k < kc) {
        /* masked lanes are never read: no fault past the end of w */
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(kc - k), lane);
        __m256 b0 = _mm256_maskload_ps(bt + k, m);
        __m256 b1 = uw > 1 ? _mm256_maskload_ps(bt + kc + k, m) : b0;
        for (r = 0; r < MDNN_MR; r++) {
            if (r < mr) {
                __m256 av = _mm256_maskload_ps(a + r * lda + k, m);
                acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                if (uw > 1) acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
            }
        }
    }
    for (r = 0; r < MDNN_MR; r++) {
        if (r < mr) {
            for (u = 0; u < uw; u++) {
                float* o = out + yoff[u] + r * ldo;
                float v = mdnn_hsum(acc[r][u]);
                if (mode & MDNN_ACC) v += *o;
                if (mode & MDNN_EPI) {
                    if (bias) v += bias[r];
                    if (zb) v += zb[yoff[u] + r * ldo];
                    v = mdnn_act(act, v, ap);
                }
                *o = v;
            }
        }
    }
}

#define MDNN_NARROW_CASES(UW)                                                              \
    switch (mr) {                                                                          \
    case 6: mdnn_narrow_avx2(6, UW, kc, a, lda, bt, out, yoff, ldo, mode, bias, zb, act, ap); break; \
    case 5: mdnn_narrow_avx2(5, UW, kc, a, lda, bt, out, yoff, ldo, mode, bias, zb, act, ap); break; \
    case 4: mdnn_narrow_avx2(4, UW, kc, a, lda, bt, out, yoff, ldo, mode, bias, zb, act, ap); break; \
    case 3: mdnn_narrow_avx2(3, UW, kc, a, lda, bt, out, yoff, ldo, mode, bias, zb, act, ap); break; \
    case 2: mdnn_narrow_avx2(2, UW, kc, a, lda, bt, out, yoff, ldo, mode, bias, zb, act, ap); break; \
    default: mdnn_narrow_avx2(1, UW, kc, a, lda, bt, out, yoff, ldo, mode, bias, zb, act, ap); break; \
    }

/* w <= MDNN_NARROW columns, in pairs */
static void mdnn_kernel_narrow(int mr, int w, int kc, const float* a, long lda,
                               const float* bt, float* out, const long* yoff, long ldo,
                               int mode, const float* bias, const float* zb, int act, float ap)
{
    for (; w >= 2; w -= 2, bt += 2 * (long)kc, yoff += 2) {
        MDNN_NARROW_CASES(2)
    }
    if (w == 1) {
        MDNN_NARROW_CASES(1)
    }
}
#else
/* Portable version: same contract (used by fc only when AVX2 is there, but
 * it must exist for the extension to link). */
static void mdnn_kernel_narrow(int mr, int w, int kc, const float* a, long lda,
                               const float* bt, float* out, const long* yoff, long ldo,
                               int mode, const float* bias, const float* zb, int act, float ap)
{
    int r, u, k;
    for (r = 0; r < mr; r++) {
        for (u = 0; u < w; u++) {
            float* o = out + yoff[u] + r * ldo;
            float v = 0.0f;
            for (k = 0; k < kc; k++) v += a[r * lda + k] * bt[(long)u * kc + k];
            if (mode & MDNN_ACC) v += *o;
            if (mode & MDNN_EPI) {
                if (bias) v += bias[r];
                if (zb) v += zb[yoff[u] + r * ldo];
                v = mdnn_act(act, v, ap);
            }
            *o = v;
        }
    }
}
#endif

/* Row count of the tile starting at row f of a block of rows [f, fe):
 * full MR tiles, but a remainder of 1-3 rows is merged with the previous
 * tile and the pair split evenly (7 -> 4+3, 8 -> 4+4, 9 -> 5+4), so no tile
 * runs at the latency-bound 1-2 rows. */
static inline int mdnn_tile_rows(int f, int fe)
{
    int left = fe - f;
    if (left <= MDNN_MR) return left;
    if (left < MDNN_MR + 4) return (left + 1) / 2;
    return MDNN_MR;
}

/* ---------------------------------------------------------------- a task */

/* Columns q0..q0+ncols-1, filters f0..f0+nf-1. bpack: a per-thread buffer of
 * at least ceil(ncols/NR)*NR*min(KRS, KC) floats. */
static void mdnn_conv_task(const mdnn_conv_t* c, long q0, int ncols, int f0, int nf,
                           float* bpack)
{
    const int KRS = c->KRS, P = c->P, F = c->F;
    const long ys = (long)F * P;
    int nkb = (KRS + mdnn_kc - 1) / mdnn_kc;
    int kcs = (KRS + nkb - 1) / nkb;       /* even K blocks */
    int k0, kb;
    float tile[MDNN_MR * MDNN_NR];
#if MDNN_HAVE_AVX2
    float bt[MDNN_NARROW * MDNN_KC];
#endif
    for (kb = 0, k0 = 0; k0 < KRS; kb++, k0 += kcs) {
        int kc = KRS - k0 < kcs ? KRS - k0 : kcs;
        int mode = (k0 > 0 ? MDNN_ACC : 0) | (k0 + kc >= KRS ? MDNN_EPI : 0);
        int m0, me;
        mdnn_pack_b(c, q0, ncols, k0, kc, bpack);
        /* filter blocks of mdnn_mc rows; a remainder thinner than MR joins the
         * last block, and the next block starts where this one ended (me) */
        for (m0 = f0; m0 < f0 + nf; m0 = me) {
            int t;
            me = m0 + mdnn_mc < f0 + nf ? m0 + mdnn_mc : f0 + nf;
            if (me < f0 + nf && f0 + nf - me < MDNN_MR) me = f0 + nf;  /* no sliver-thin last block */
            for (t = 0; t < ncols; t += MDNN_NR) {
                const float* bp = bpack + (long)(t / MDNN_NR) * kc * MDNN_NR;
                long q = q0 + t;
                int n = (int)(q / P), p = (int)(q - (long)n * P);
                int width = ncols - t < MDNN_NR ? ncols - t : MDNN_NR;
                int direct = width == MDNN_NR && p + MDNN_NR <= P;
                int f = m0, mr;
#if MDNN_HAVE_AVX2
                if (width <= MDNN_NARROW) {
                    /* ragged end of few columns: transpose them (K
                     * contiguous) and take dot products along K */
                    long yoff[MDNN_NARROW];
                    int u, kk;
                    for (u = 0; u < width; u++) {
                        long qu = q + u;
                        int nu = (int)(qu / P);
                        yoff[u] = nu * ys + (qu - (long)nu * P);
                        for (kk = 0; kk < kc; kk++)
                            bt[u * kc + kk] = bp[kk * MDNN_NR + u];
                    }
                    for (; f < me; f += mr) {
                        mr = mdnn_tile_rows(f, me);
                        mdnn_kernel_narrow(mr, width, kc, c->w + (long)f * KRS + k0, KRS, bt,
                                           c->y + (long)f * P, yoff, P, mode,
                                           c->b ? c->b + f : NULL,
                                           c->z ? c->z + (long)f * P : NULL, c->act, c->act_p);
                    }
                    continue;
                }
#endif
                for (; f < me; f += mr) {
                    const float* a = c->w + (long)f * KRS + k0;
                    const float* bias = c->b ? c->b + f : NULL;
                    mr = mdnn_tile_rows(f, me);
                    if (direct) {
                        long o = n * ys + (long)f * P + p;
                        mdnn_kernel(mr, kc, a, KRS, bp, c->y + o, P, mode, bias,
                                    c->z ? c->z + o : NULL, c->act, c->act_p);
                    } else {
                        /* the tile straddles samples or is the ragged end:
                         * through a scratch tile, then run by run (one
                         * sample each) into y */
                        int r, u, u0 = 0, nn = n, pp = p, run;
                        mdnn_kernel(mr, kc, a, KRS, bp, tile, MDNN_NR, 0, NULL, NULL, 0, 0.0f);
                        for (; u0 < width; u0 += run, nn++, pp = 0) {
                            long oo = nn * ys + (long)f * P + pp;
                            float* o = c->y + oo;
                            run = P - pp < width - u0 ? P - pp : width - u0;
                            for (r = 0; r < mr; r++) {
                                float* orow = o + (long)r * P;
                                const float* zrow = c->z ? c->z + oo + (long)r * P : NULL;
                                const float* tr = tile + r * MDNN_NR + u0;
                                float bv = bias ? bias[r] : 0.0f;
                                for (u = 0; u < run; u++) {
                                    float v = tr[u];
                                    if (mode & MDNN_ACC) v += orow[u];
                                    if (mode & MDNN_EPI) {
                                        v += bv;
                                        if (zrow) v += zrow[u];
                                        v = mdnn_act(c->act, v, c->act_p);
                                    }
                                    orow[u] = v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/* ---------------------------- padded rows: output rows a multiple of 8 */

/* Row k = (ch, i, j) of a tile's B panel is, for each run of the tile's
 * pixels inside one output row, the zero-padded input row
 * (ch, oy*sy + i - py) read from column ox*sx + j - px with step sx. Copy the
 * rows a chunk needs once into a buffer, zero-padded and split by column
 * phase (phase ph holds padded columns ph, ph+sx, ph+2sx, ...), and that run
 * is consecutive floats of phase j % sx. With Co % 8 == 0 (and P % 16 == 0)
 * each 8-pixel half of a tile lies in one output row, so the micro-kernel
 * reads each half of B straight from the buffer through a table of row
 * offsets: no packing (which copies each input element once per filter tap
 * it meets: 9x for 3x3 at stride 1). Not for strided 1x1 convs (the buffer
 * would copy the rows and columns they skip). */
/* A 1x1 stride-1 unpadded conv (MobileNet's pointwise layers) needs no buffer at all:
 * row k of B is channel k of the image itself, so the kernel reads the tile's 16
 * pixels straight from x (boff[kk] = k*P, the second half 8 floats on). Any P that
 * is a multiple of NR (every tile inside one sample, 16 consecutive pixels). */
static int mdnn_zc_rows_outer = 16;  /* largest KRS of the filter-tiles-outside order */
static inline int mdnn_direct_zero_copy(const mdnn_conv_t* c)
{
    return c->nr == 1 && c->nc == 1 && c->sy == 1 && c->sx == 1 && c->py == 0 && c->px == 0;
}

static int mdnn_direct_ok(const mdnn_conv_t* c)
{
    if (MDNN_HAVE_AVX2 && mdnn_direct_zero_copy(c))
        return c->P % MDNN_NR == 0;
    return MDNN_HAVE_AVX2 && c->Co % 8 == 0 && c->P % MDNN_NR == 0
           && ((c->sy == 1 && c->sx == 1) || c->nr * c->nc >= 4);
}

/* floats of padded buffer a task of at most ncw columns needs */
static long mdnn_direct_ws(const mdnn_conv_t* c, int ncw)
{
    if (mdnn_direct_zero_copy(c))
        return MDNN_NR;
    long rows = (long)(ncw / c->Co + 2) * c->sy + c->nr;
    long Lp = c->Co + (c->nc - 1) / c->sx;
    return (long)c->K * rows * c->sx * Lp + MDNN_NR;
}

static void mdnn_conv_task_direct(const mdnn_conv_t* c, long q0, int ncols, int f0, int nf,
                                  float* pbuf)
{
#if MDNN_HAVE_AVX2
    const int KRS = c->KRS, P = c->P, F = c->F, Co = c->Co, R = c->R, C = c->C;
    const int sx = c->sx, sy = c->sy, nrc = c->nr * c->nc;
    const int Lp = Co + (c->nc - 1) / sx;         /* floats per phase row */
    const long rowp = (long)sy * sx * Lp;          /* buffer floats per output row */
    const long ys = (long)F * P, xs = (long)c->K * R * C;
    int nkb = (KRS + mdnn_kc - 1) / mdnn_kc;
    int kcs = (KRS + nkb - 1) / nkb;
    int boff[MDNN_KC];
    long q = q0, qe = q0 + ncols;
    while (q < qe) {            /* one sample at a time */
        int n = (int)(q / P);
        int p0 = (int)(q - (long)n * P);
        int p1 = (qe - ((long)n * P) < P) ? (int)(qe - (long)n * P) : P;
        int oya = p0 / Co, oyb = (p1 - 1) / Co;
        int Rp = (oyb - oya) * sy + c->nr;        /* padded input rows */
        int ch, r, ph, e, k0;
        const int zero_copy = mdnn_direct_zero_copy(c);
        /* pbuf[ch][r][ph][e] = x[n][ch][oya*sy - py + r][e*sx + ph - px], 0 outside */
        for (ch = 0; ch < (zero_copy ? 0 : c->K); ch++) {
            for (r = 0; r < Rp; r++) {
                int iy = oya * sy - c->py + r;
                const float* sr = c->x + n * xs + ((long)ch * R + iy) * C;
                for (ph = 0; ph < sx; ph++) {
                    float* d = pbuf + (((long)ch * Rp + r) * sx + ph) * Lp;
                    if (iy < 0 || iy >= R) {
                        memset(d, 0, Lp * sizeof(float));
                    } else if (sx == 1) {
                        int lo = c->px, hi = c->px + C;      /* e with a real pixel */
                        if (hi > Lp) hi = Lp;
                        for (e = 0; e < lo && e < Lp; e++) d[e] = 0.0f;
                        if (hi > lo) memcpy(d + lo, sr, (hi - lo) * sizeof(float));
                        for (e = hi > lo ? hi : lo; e < Lp; e++) d[e] = 0.0f;
                    } else if (sx == 2 && ph == 1) {
                        /* done with phase 0 */
                    } else if (sx == 2) {
                        /* both phases at once: deinterleave 16 padded columns
                         * 2e0 .. 2e0+15 (inputs 2e0-px ..) into 8 + 8 */
                        float* d1 = d + Lp;
                        e = 0;
                        for (; e < Lp; e++) {       /* left edge, scalar */
                            int ix = 2 * e - c->px;
                            if (ix >= 0 && e + 8 <= Lp && ix + 16 <= C) break;
                            d[e] = (ix >= 0 && ix < C) ? sr[ix] : 0.0f;
                            d1[e] = (ix + 1 >= 0 && ix + 1 < C) ? sr[ix + 1] : 0.0f;
                        }
                        for (; e + 8 <= Lp && 2 * e - c->px + 16 <= C; e += 8) {
                            const float* sp = sr + 2 * e - c->px;
                            __m256 L = _mm256_loadu_ps(sp), H = _mm256_loadu_ps(sp + 8);
                            __m256 ev = _mm256_shuffle_ps(L, H, _MM_SHUFFLE(2, 0, 2, 0));
                            __m256 od = _mm256_shuffle_ps(L, H, _MM_SHUFFLE(3, 1, 3, 1));
                            _mm256_storeu_ps(d + e, _mm256_castpd_ps(_mm256_permute4x64_pd(
                                _mm256_castps_pd(ev), _MM_SHUFFLE(3, 1, 2, 0))));
                            _mm256_storeu_ps(d1 + e, _mm256_castpd_ps(_mm256_permute4x64_pd(
                                _mm256_castps_pd(od), _MM_SHUFFLE(3, 1, 2, 0))));
                        }
                        for (; e < Lp; e++) {       /* right edge, scalar */
                            int ix = 2 * e - c->px;
                            d[e] = (ix >= 0 && ix < C) ? sr[ix] : 0.0f;
                            d1[e] = (ix + 1 >= 0 && ix + 1 < C) ? sr[ix + 1] : 0.0f;
                        }
                    } else {
                        for (e = 0; e < Lp; e++) {
                            int ix = e * sx + ph - c->px;
                            d[e] = (ix >= 0 && ix < C) ? sr[ix] : 0.0f;
                        }
                    }
                }
            }
        }
        for (k0 = 0; k0 < KRS; k0 += kcs) {
            int kc = KRS - k0 < kcs ? KRS - k0 : kcs;
            int mode = (k0 > 0 ? MDNN_ACC : 0) | (k0 + kc >= KRS ? MDNN_EPI : 0);
            int kk, m0, me;
            for (kk = 0; kk < kc; kk++) {
                int k = k0 + kk, chh = k / nrc, rem = k - chh * nrc;
                int i = rem / c->nc, j = rem - i * c->nc;
                boff[kk] = zero_copy ? k * P : ((chh * Rp + i) * sx + j % sx) * Lp + j / sx;
            }
            for (m0 = f0; m0 < f0 + nf; m0 = me) {     /* as in mdnn_conv_task */
                int p;
                me = m0 + mdnn_mc < f0 + nf ? m0 + mdnn_mc : f0 + nf;
                if (me < f0 + nf && f0 + nf - me < MDNN_MR) me = f0 + nf;
                if (zero_copy && KRS <= mdnn_zc_rows_outer) {
                    /* short reductions (MobileNet-v2's 16 > 96 at 112x112: 4.8 MB of
                     * output from 0.8 MB of input): filter tiles outside, so that each
                     * tile's rows of y are written as a few sequential streams while
                     * the chunk's columns of x stay in cache; in a whole forward (y
                     * not in cache) 0.37 -> 0.29 ms. Longer reductions lost by it. */
                    int f = m0, mr;
                    for (; f < me; f += mr) {
                        mr = mdnn_tile_rows(f, me);
                        for (p = p0; p < p1; p += MDNN_NR) {
                            long o = n * ys + (long)f * P + p;
                            mdnn_kernel_d(mr, kc, c->w + (long)f * KRS + k0, KRS,
                                          c->x + n * xs + p, boff, 8,
                                          c->y + o, P, mode, c->b ? c->b + f : NULL,
                                          c->z ? c->z + o : NULL, c->act, c->act_p);
                        }
                    }
                    continue;
                }
                for (p = p0; p < p1; p += MDNN_NR) {
                    int oy = p / Co, ox = p - oy * Co;
                    int oy2 = (p + 8) / Co, ox2 = p + 8 - oy2 * Co;
                    const float* bb = pbuf + (long)(oy - oya) * rowp + ox;
                    long b1off = (long)(oy2 - oy) * rowp + (ox2 - ox);
                    if (zero_copy) {
                        bb = c->x + n * xs + p;
                        b1off = 8;
                    }
                    int f = m0, mr;
                    for (; f < me; f += mr) {
                        mr = mdnn_tile_rows(f, me);
                        long o = n * ys + (long)f * P + p;
                        mdnn_kernel_d(mr, kc, c->w + (long)f * KRS + k0, KRS, bb, boff, b1off,
                                      c->y + o, P, mode, c->b ? c->b + f : NULL,
                                      c->z ? c->z + o : NULL, c->act, c->act_p);
                    }
                }
            }
        }
        q = (long)n * P + p1;
    }
#else
    (void)c; (void)q0; (void)ncols; (void)f0; (void)nf; (void)pbuf;
#endif
}

#endif

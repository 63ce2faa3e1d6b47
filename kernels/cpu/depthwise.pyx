# cython: language_level=3
"""Grouped and dilated convolutions on the CPU: the op conv2d_grouped.

conv2d_grouped(x, w, b, y, stride_y, stride_x, pad_y, pad_x, dilation_y, dilation_x,
groups, act): x (N, K, R, C), w (F, K/groups, nr, nc), y (N, F, Ro, Co) with
Ro = 1 + (R + 2 pad_y - (dilation_y (nr - 1) + 1)) // stride_y; output channel f
sees the input channels of its group g = f // (F/groups). Two routes, chosen by
_grouped_route (tests force each with _set_grouped_path):

  - depthwise (groups == K: one input channel per group, F = m K with a channel
    multiplier m): no GEMM at all. Tasks of the parallel-for are runs of whole (sample,
    output channel) planes (at least DW_TASK_OUTPUTS outputs a task while there are
    DW_TASKS_PER_THREAD tasks a thread). 3x3 filters at column stride 1 or 2 (column
    dilation 1) on the padded plane run mdnn_dw_plane33: the nine taps, the bias and
    the activation parameter in registers for the whole plane, one FMA chain per block
    of 8 outputs in the scalar loop's order, two output rows from four input rows at
    row stride 1, stride 2 from buffer rows stored de-interleaved (the even padded
    columns, then the odd ones: three plain loads per window row), the cheap
    activations in registers and the transcendental ones (act_avx2.h) over ~1024
    finished outputs, whole-vector stores (non-temporal when the output passes
    DW_STREAM_BYTES: no read for ownership). Otherwise each output row is computed in
    blocks of MDNN_DW_W = 8 columns in
    AVX2 registers (4 independent accumulators: rows 2r and 2r + 1 of the
    window into two, a last odd row into the other two). The input plane is
    first copied into a zero-bordered per-thread buffer (once per input channel:
    planes of a channel multiplier reuse it; its rows 64-byte aligned, its borders
    zeroed once a call), so every block reads plain
    unmasked loads (stride 2 as 16 loaded and de-interleaved floats, other
    strides as gathers); a plane whose buffer would pass DW_PAD_MAX_BYTES reads
    x in place instead, with masked loads (masked lanes are never read) for the
    border blocks and the window rows in the padding skipped. 3x3 and 5x5 at stride 1
    and 2 (dilation 1) are compiled as their own loops (the taps unrolled, 3x3's
    weights held in registers); any other nr x nc, stride and dilation runs the
    same code with run-time bounds. The bias starts the accumulators; the
    activation runs over each finished row with mdnn_act_array
    (activations.h) while the row is in L1. Without AVX2 (or with
    _set_depthwise_vector(False)) a scalar loop computes every column.
    The input and output are touched once: it runs near memory speed
    (bench/bench_depthwise.py).
  - gemm (1 < groups < K, dilation, or forced): one GEMM per (sample, group,
    pixel chunk): im2col (im2col.pxi, with the dilation) of the group's K/groups
    channels into this thread's workspace, scipy's sgemm (single-threaded, as in
    conv.pyx) into the group's F/groups output rows, then the bias/activation
    epilogue while the block is in cache. A 1x1 stride-1 unpadded undilated
    convolution reads x in place (no im2col).

The implicit GEMM of gemm_avx2.h is not used here (it has no dilation and one
sample stride per call); conv2d (conv.pyx) stays the route of every ungrouped,
undilated convolution: con_ only emits conv2d_grouped when groups > 1 or a
dilation > 1.

Threading: OpenMP owns the cores; tasks are planes (depthwise) or (sample,
group, pixel chunk) triples (gemm), statically or dynamically scheduled; the
result never depends on the thread count (every output element is summed by
one thread in a fixed order). Workspace: one grow-only buffer (workspace.pxi).
"""
include "check.pxi"
include "act.pxi"

from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemm

cdef extern from *:
    """
    #include <string.h>
    #include "activations.h"
    #if defined(__AVX2__) && defined(__FMA__)
    #include <immintrin.h>
    #define MDNN_DW_AVX2 1
    #else
    #define MDNN_DW_AVX2 0
    #endif
    #define MDNN_DW_W 8          /* output columns per vector block */

    typedef struct {
        const float* x;          /* (N, K, R, C) */
        const float* w;          /* (F, 1, nr, nc), F = m K: filter f reads channel f / m */
        const float* b;          /* (F,) or NULL */
        float* y;                /* (N, F, Ro, Co) */
        int N, K, R, C, F, m, nr, nc, sy, sx, py, px, dy, dx, Ro, Co;
        int act;                 /* the epilogue's activation (activations.h) and its parameter */
        float act_p;
        int vec;                 /* 0: the scalar loop for every column */
        int pad;                 /* 1: the padded-plane variant (vec only) */
        int Rp, Wb;              /* its buffer: Rp rows of Wb floats */
        int Hb;                  /* 3x3 stride 2: each buffer row is the padded row's even
                                  * columns [0, Hb) then its odd ones [Hb, 2 Hb = Wb) */
        long planes, ppt;        /* N F planes; planes per parallel task */
        int pairs;               /* 3x3 at row stride 1: two output rows at a time */
        int stream;              /* 3x3: non-temporal stores (16-byte aligned halves) */
        float* ws;               /* per-thread slots of ws_per floats: a 16-float header
                                  * (the plane held), then the Rp x Wb buffer */
        long ws_per;
    } mdnn_dw_t;

    static inline int mdnn_dw_have_avx2(void) { return MDNN_DW_AVX2; }

    /* one output column, any geometry: the taps inside the image only */
    static inline float mdnn_dw_col(const float* xp, const float* w, float bv, int ox, int iy0,
                                    int i0, int i1, int NC, int SX, int DX, int DY, int C, int px)
    {
        float acc = bv;
        int i, j;
        for (i = i0; i < i1; i++) {
            const float* xr = xp + (long)(iy0 + i * DY) * C;
            for (j = 0; j < NC; j++) {
                int ix = ox * SX - px + j * DX;
                if (ix >= 0 && ix < C)
                    acc += w[i * NC + j] * xr[ix];
            }
        }
        return acc;
    }

    #if MDNN_DW_AVX2
    /* the 8 inputs xr[s0 + u*SX], u < 8, of one tap for a block of 8 output columns;
     * masked: lanes whose input lies outside [0, C) read as 0 (and are never read) */
    static inline __attribute__((always_inline)) __m256
    mdnn_dw_load(const float* xr, int s0, const int SX, int C, const int masked)
    {
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i m1 = _mm256_set1_epi32(-1), cv = _mm256_set1_epi32(C);
        if (SX == 1) {
            __m256i idx, m;
            if (!masked)
                return _mm256_loadu_ps(xr + s0);
            idx = _mm256_add_epi32(_mm256_set1_epi32(s0), lane);
            m = _mm256_and_si256(_mm256_cmpgt_epi32(idx, m1), _mm256_cmpgt_epi32(cv, idx));
            return _mm256_maskload_ps(xr + s0, m);
        }
        if (SX == 2) {
            __m256 L, H, S;
            if (!masked) {
                /* xr[s0 .. s0+14]: the odd xr[s0+15] may lie past the image: not read */
                L = _mm256_loadu_ps(xr + s0);
                H = _mm256_maskload_ps(xr + s0 + 8, _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0));
            } else {
                const __m256i even = _mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0);
                __m256i i0 = _mm256_add_epi32(_mm256_set1_epi32(s0), lane);
                __m256i i1 = _mm256_add_epi32(_mm256_set1_epi32(s0 + 8), lane);
                __m256i k0 = _mm256_and_si256(even, _mm256_and_si256(_mm256_cmpgt_epi32(i0, m1),
                                                                     _mm256_cmpgt_epi32(cv, i0)));
                __m256i k1 = _mm256_and_si256(even, _mm256_and_si256(_mm256_cmpgt_epi32(i1, m1),
                                                                     _mm256_cmpgt_epi32(cv, i1)));
                L = _mm256_maskload_ps(xr + s0, k0);
                H = _mm256_maskload_ps(xr + s0 + 8, k1);
            }
            S = _mm256_shuffle_ps(L, H, _MM_SHUFFLE(2, 0, 2, 0));
            return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(S), _MM_SHUFFLE(3, 1, 2, 0)));
        }
        {
            __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(s0),
                                           _mm256_mullo_epi32(lane, _mm256_set1_epi32(SX)));
            __m256i m;
            if (!masked)
                return _mm256_i32gather_ps(xr, idx, 4);
            m = _mm256_and_si256(_mm256_cmpgt_epi32(idx, m1), _mm256_cmpgt_epi32(cv, idx));
            return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), xr, idx, _mm256_castsi256_ps(m), 4);
        }
    }

    /* one block of 8 output columns ox0.. of output row oy (window rows i0..i1-1 inside
     * the image); wv: the taps broadcast (hoist) or NULL (broadcast from w) */
    static inline __attribute__((always_inline)) void
    mdnn_dw_block(const float* xp, const float* w, const __m256* wv, float bv, float* yr,
                  int ox0, int iy0, int i0, int i1, const int NC, const int SX, const int DX,
                  int DY, int C, int px, int Co, const int masked)
    {
        __m256 a0 = _mm256_set1_ps(bv), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int i = i0, j;
        const int s = ox0 * SX - px;
    #define MDNN_DW_WV(t) (wv ? wv[t] : _mm256_broadcast_ss(w + (t)))
        for (; i + 1 < i1; i += 2) {
            const float* r0 = xp + (long)(iy0 + i * DY) * C;
            const float* r1 = r0 + (long)DY * C;
            for (j = 0; j < NC; j++) {
                a0 = _mm256_fmadd_ps(MDNN_DW_WV(i * NC + j), mdnn_dw_load(r0, s + j * DX, SX, C, masked), a0);
                a1 = _mm256_fmadd_ps(MDNN_DW_WV((i + 1) * NC + j), mdnn_dw_load(r1, s + j * DX, SX, C, masked), a1);
            }
        }
        if (i < i1) {
            const float* r0 = xp + (long)(iy0 + i * DY) * C;
            for (j = 0; j + 1 < NC; j += 2) {
                a2 = _mm256_fmadd_ps(MDNN_DW_WV(i * NC + j), mdnn_dw_load(r0, s + j * DX, SX, C, masked), a2);
                a3 = _mm256_fmadd_ps(MDNN_DW_WV(i * NC + j + 1), mdnn_dw_load(r0, s + (j + 1) * DX, SX, C, masked), a3);
            }
            if (j < NC)
                a2 = _mm256_fmadd_ps(MDNN_DW_WV(i * NC + j), mdnn_dw_load(r0, s + j * DX, SX, C, masked), a2);
        }
    #undef MDNN_DW_WV
        a0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        if (ox0 + MDNN_DW_W <= Co) {
            _mm256_storeu_ps(yr + ox0, a0);
        } else {
            const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_maskstore_ps(yr + ox0, _mm256_cmpgt_epi32(_mm256_set1_epi32(Co - ox0), lane), a0);
        }
    }

    /* one output row of a 3x3 filter from three padded input rows (no masks): the nine
     * taps and the bias in registers, three accumulators (one per window row) */
    static inline __attribute__((always_inline)) void
    mdnn_dw_row33(const float* r0, const float* r1, const float* r2, const float* w, float bv,
                  float* yr, int Co, const int SX, const int DX)
    {
        const __m256 w0 = _mm256_broadcast_ss(w), w1 = _mm256_broadcast_ss(w + 1);
        const __m256 w2 = _mm256_broadcast_ss(w + 2), w3 = _mm256_broadcast_ss(w + 3);
        const __m256 w4 = _mm256_broadcast_ss(w + 4), w5 = _mm256_broadcast_ss(w + 5);
        const __m256 w6 = _mm256_broadcast_ss(w + 6), w7 = _mm256_broadcast_ss(w + 7);
        const __m256 w8 = _mm256_broadcast_ss(w + 8), bb = _mm256_set1_ps(bv);
        int ox;
        for (ox = 0; ox < Co; ox += MDNN_DW_W) {
            const int s = ox * SX;
            __m256 a0 = _mm256_fmadd_ps(w0, mdnn_dw_load(r0, s, SX, 0, 0), bb);
            __m256 a1 = _mm256_mul_ps(w3, mdnn_dw_load(r1, s, SX, 0, 0));
            __m256 a2 = _mm256_mul_ps(w6, mdnn_dw_load(r2, s, SX, 0, 0));
            a0 = _mm256_fmadd_ps(w1, mdnn_dw_load(r0, s + DX, SX, 0, 0), a0);
            a1 = _mm256_fmadd_ps(w4, mdnn_dw_load(r1, s + DX, SX, 0, 0), a1);
            a2 = _mm256_fmadd_ps(w7, mdnn_dw_load(r2, s + DX, SX, 0, 0), a2);
            a0 = _mm256_fmadd_ps(w2, mdnn_dw_load(r0, s + 2 * DX, SX, 0, 0), a0);
            a1 = _mm256_fmadd_ps(w5, mdnn_dw_load(r1, s + 2 * DX, SX, 0, 0), a1);
            a2 = _mm256_fmadd_ps(w8, mdnn_dw_load(r2, s + 2 * DX, SX, 0, 0), a2);
            a0 = _mm256_add_ps(_mm256_add_ps(a0, a1), a2);
            if (ox + MDNN_DW_W <= Co) {
                _mm256_storeu_ps(yr + ox, a0);
            } else {
                const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_maskstore_ps(yr + ox, _mm256_cmpgt_epi32(_mm256_set1_epi32(Co - ox), lane), a0);
            }
        }
    }
    #endif

    #if MDNN_DW_AVX2
    /* the input plane xp (R x C) into the interior of this thread's padded buffer (its
     * borders were zeroed once per call and are never written); deint: the 3x3 stride-2
     * layout, padded column q in row half q % 2 at q / 2 */
    static inline void mdnn_dw_fill(const mdnn_dw_t* d, const float* xp, float* buf, const int deint)
    {
        const int R = d->R, C = d->C, Wb = d->Wb, py = d->py, px = d->px, Hb = d->Hb;
        int r, c, k;
        for (r = 0; r < R; r++) {
            const float* xr = xp + (long)r * C;
            float* br = buf + (long)(py + r) * Wb;
            if (!deint) {
                /* the last 1..7 floats: a masked load (the lanes past the row read as 0 and
                 * are never read), stored whole onto the right padding, which stays 0
                 * (Wb >= C + 2 px + 8: _dw_buffer) */
                const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                br += px;
                for (c = 0; c + 8 <= C; c += 8)
                    _mm256_storeu_ps(br + c, _mm256_loadu_ps(xr + c));
                if (c < C)
                    _mm256_storeu_ps(br + c, _mm256_maskload_ps(
                                         xr + c, _mm256_cmpgt_epi32(_mm256_set1_epi32(C - c), lane)));
            } else {
                /* x[2k] and x[2k+1] land at padded columns 2k + px and 2k + 1 + px */
                float* ev = br + ((px & 1) ? Hb + (px - 1) / 2 : px / 2);
                float* od = br + ((px & 1) ? (px + 1) / 2 : Hb + px / 2);
                for (c = 0, k = 0; c + 16 <= C; c += 16, k += 8) {
                    __m256 L = _mm256_loadu_ps(xr + c), H = _mm256_loadu_ps(xr + c + 8);
                    __m256 e = _mm256_shuffle_ps(L, H, _MM_SHUFFLE(2, 0, 2, 0));
                    __m256 o = _mm256_shuffle_ps(L, H, _MM_SHUFFLE(3, 1, 3, 1));
                    _mm256_storeu_ps(ev + k, _mm256_castpd_ps(_mm256_permute4x64_pd(
                                                 _mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0))));
                    _mm256_storeu_ps(od + k, _mm256_castpd_ps(_mm256_permute4x64_pd(
                                                 _mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0))));
                }
                for (; c < C; c++) {
                    if (c & 1) od[c >> 1] = xr[c];
                    else ev[c >> 1] = xr[c];
                }
            }
        }
    }

    /* one (sample, output channel) plane of a 3x3 filter (column stride SX = 1 or 2,
     * column dilation 1, any row stride/dilation) from the padded buffer: the nine taps,
     * the bias and the activation parameter in registers for the whole plane; per block
     * of 8 output columns 9 unaligned loads (stride 2: from the de-interleaved rows, taps
     * E[ox], O[ox], E[ox + 1]) and one chain of 9 multiply-adds from the bias in the
     * taps' row-major order (the scalar loop's order: the same bits as mdnn_dw_col). At
     * row stride 1 (and row dilation 1) two output rows are computed together from four
     * input rows, each loaded vector serving both (12 loads per 2 blocks instead of 18:
     * the loop is bound by loads, two per cycle). ACT (a compile-time code: identity or a
     * cheap one) is applied in registers, the transcendental ones over the finished rows
     * (mdnn_act_array, ~1024 floats at a time, still in L1). A block whose 8 lanes stay
     * inside the plane is stored whole: lanes past the row's end land on the next row's
     * first columns, which are computed (overwritten) later; the first row of a pair
     * and the plane's last blocks go through a small buffer at the row's end. (A pair
     * running its blocks from the last, so that both rows could spill, measured 1.3x
     * slower on a 150 MB batch: descending stores defeat the write prefetch.) */
    #define MDNN_DW33_LD(r, t) _mm256_loadu_ps((r) + ox + ((t) == 0 ? 0 : (t) == 1 ? o2 : o3))
    #define MDNN_DW33_FMA(acc, wv, r, t) acc = _mm256_fmadd_ps(wv, MDNN_DW33_LD(r, t), acc)
    /* the same for the block X columns further on */
    #define MDNN_DW33_LDX(r, t, X) _mm256_loadu_ps((r) + ox + (X) + ((t) == 0 ? 0 : (t) == 1 ? o2 : o3))
    #define MDNN_DW33_FMAX(acc, wv, r, t, X) acc = _mm256_fmadd_ps(wv, MDNN_DW33_LDX(r, t, X), acc)
    /* one output row's block at ox + X from window rows r0 r1 r2: the nine taps in order */
    #define MDNN_DW33_ROW(acc, X)                                                          \
        MDNN_DW33_FMAX(acc, w0, r0, 0, X); MDNN_DW33_FMAX(acc, w1, r0, 1, X);              \
        MDNN_DW33_FMAX(acc, w2, r0, 2, X); MDNN_DW33_FMAX(acc, w3, r1, 0, X);              \
        MDNN_DW33_FMAX(acc, w4, r1, 1, X); MDNN_DW33_FMAX(acc, w5, r1, 2, X);              \
        MDNN_DW33_FMAX(acc, w6, r2, 0, X); MDNN_DW33_FMAX(acc, w7, r2, 1, X);              \
        MDNN_DW33_FMAX(acc, w8, r2, 2, X)
    static inline __attribute__((always_inline)) void
    mdnn_dw_store33(float* yr, int ox, long room, int Co, __m256 v, int stream)
    {
        if (ox + MDNN_DW_W <= room) {
            if (stream && ((unsigned long)(yr + ox) & 15) == 0) {
                /* two 16-byte halves: numpy's large arrays are only 16-byte aligned */
                _mm_stream_ps(yr + ox, _mm256_castps256_ps128(v));
                _mm_stream_ps(yr + ox + 4, _mm256_extractf128_ps(v, 1));
            } else {
                _mm256_storeu_ps(yr + ox, v);
            }
        } else {
            float tmp[MDNN_DW_W];
            int c;
            _mm256_storeu_ps(tmp, v);
            for (c = 0; c < Co - ox; c++)
                yr[ox + c] = tmp[c];
        }
    }

    static inline __attribute__((always_inline)) void
    mdnn_dw_plane33(const mdnn_dw_t* d, long plane, int tid, const int SX, const int ACT)
    {
        const int Ro = d->Ro, Co = d->Co, Wb = d->Wb, SY = d->sy, DY = d->dy;
        const int f = (int)(plane % d->F), n = (int)(plane / d->F);
        const float* xp = d->x + ((long)n * d->K + f / d->m) * (long)d->R * d->C;
        const float* w = d->w + (long)f * 9;
        float* yp = d->y + plane * (long)Ro * Co;
        const long size = (long)Ro * Co;
        float* slot = d->ws + (long)tid * d->ws_per;
        float* buf = slot + 16;
        const long key = (long)n * d->K + f / d->m;
        const long o2 = SX == 2 ? d->Hb : 1;       /* the second tap's offset */
        const long o3 = SX == 2 ? 1 : 2;           /* the third's */
        const int pairs = d->pairs && SY == 1 && DY == 1;
        /* a transcendental: after the rows */
        const int late = ACT == MDNN_ACT_IDENTITY && d->act != MDNN_ACT_IDENTITY;
        /* an output far larger than the caches: its blocks bypass them (no read for
         * ownership of lines written whole); not when the rows are read again for a
         * transcendental */
        const int stream = d->stream && !late;
        long held, pend = 0;
        int oy = 0, ox, rows;
        memcpy(&held, slot, sizeof held);
        if (held != key) {
            mdnn_dw_fill(d, xp, buf, SX == 2);
            memcpy(slot, &key, sizeof key);
        }
        {
            const __m256 w0 = _mm256_broadcast_ss(w), w1 = _mm256_broadcast_ss(w + 1);
            const __m256 w2 = _mm256_broadcast_ss(w + 2), w3 = _mm256_broadcast_ss(w + 3);
            const __m256 w4 = _mm256_broadcast_ss(w + 4), w5 = _mm256_broadcast_ss(w + 5);
            const __m256 w6 = _mm256_broadcast_ss(w + 6), w7 = _mm256_broadcast_ss(w + 7);
            const __m256 w8 = _mm256_broadcast_ss(w + 8);
            const __m256 bb = _mm256_set1_ps(d->b ? d->b[f] : 0.0f);
            const float ap = d->act_p;
            for (; oy < Ro; oy += rows) {
                const float* r0 = buf + (long)oy * SY * Wb;
                const float* r1 = r0 + (long)DY * Wb;
                const float* r2 = r1 + (long)DY * Wb;
                float* yr = yp + (long)oy * Co;
                const long room = size - (long)oy * Co;   /* floats left in the plane from yr */
                rows = pairs && oy + 1 < Ro ? 2 : 1;
                if (rows == 2) {
                    /* row oy's blocks stay inside the row (row oy + 1's first columns are
                     * already stored), row oy + 1's may spill onto row oy + 2 */
                    const float* r3 = r2 + Wb;
                    /* rows of one block (Co <= 8): row oy's block is stored before row
                     * oy + 1's, so it may spill too */
                    const long roomA = Co <= MDNN_DW_W ? room : Co;
                    /* two column blocks at a time: four independent chains of nine
                     * multiply-adds (with two, the loop was bound by their latency, not
                     * by the FMA units); each output's chain is unchanged */
                    for (ox = 0; ox + MDNN_DW_W < Co; ox += 2 * MDNN_DW_W) {
                        __m256 a = bb, b = bb, c = bb, e = bb, v0, v1, v2;
                        MDNN_DW33_FMA(a, w0, r0, 0); MDNN_DW33_FMAX(c, w0, r0, 0, MDNN_DW_W);
                        MDNN_DW33_FMA(a, w1, r0, 1); MDNN_DW33_FMAX(c, w1, r0, 1, MDNN_DW_W);
                        MDNN_DW33_FMA(a, w2, r0, 2); MDNN_DW33_FMAX(c, w2, r0, 2, MDNN_DW_W);
                        v0 = MDNN_DW33_LD(r1, 0); v1 = MDNN_DW33_LD(r1, 1); v2 = MDNN_DW33_LD(r1, 2);
                        a = _mm256_fmadd_ps(w3, v0, a); b = _mm256_fmadd_ps(w0, v0, b);
                        a = _mm256_fmadd_ps(w4, v1, a); b = _mm256_fmadd_ps(w1, v1, b);
                        a = _mm256_fmadd_ps(w5, v2, a); b = _mm256_fmadd_ps(w2, v2, b);
                        v0 = MDNN_DW33_LDX(r1, 0, MDNN_DW_W); v1 = MDNN_DW33_LDX(r1, 1, MDNN_DW_W);
                        v2 = MDNN_DW33_LDX(r1, 2, MDNN_DW_W);
                        c = _mm256_fmadd_ps(w3, v0, c); e = _mm256_fmadd_ps(w0, v0, e);
                        c = _mm256_fmadd_ps(w4, v1, c); e = _mm256_fmadd_ps(w1, v1, e);
                        c = _mm256_fmadd_ps(w5, v2, c); e = _mm256_fmadd_ps(w2, v2, e);
                        v0 = MDNN_DW33_LD(r2, 0); v1 = MDNN_DW33_LD(r2, 1); v2 = MDNN_DW33_LD(r2, 2);
                        a = _mm256_fmadd_ps(w6, v0, a); b = _mm256_fmadd_ps(w3, v0, b);
                        a = _mm256_fmadd_ps(w7, v1, a); b = _mm256_fmadd_ps(w4, v1, b);
                        a = _mm256_fmadd_ps(w8, v2, a); b = _mm256_fmadd_ps(w5, v2, b);
                        v0 = MDNN_DW33_LDX(r2, 0, MDNN_DW_W); v1 = MDNN_DW33_LDX(r2, 1, MDNN_DW_W);
                        v2 = MDNN_DW33_LDX(r2, 2, MDNN_DW_W);
                        c = _mm256_fmadd_ps(w6, v0, c); e = _mm256_fmadd_ps(w3, v0, e);
                        c = _mm256_fmadd_ps(w7, v1, c); e = _mm256_fmadd_ps(w4, v1, e);
                        c = _mm256_fmadd_ps(w8, v2, c); e = _mm256_fmadd_ps(w5, v2, e);
                        MDNN_DW33_FMA(b, w6, r3, 0); MDNN_DW33_FMAX(e, w6, r3, 0, MDNN_DW_W);
                        MDNN_DW33_FMA(b, w7, r3, 1); MDNN_DW33_FMAX(e, w7, r3, 1, MDNN_DW_W);
                        MDNN_DW33_FMA(b, w8, r3, 2); MDNN_DW33_FMAX(e, w8, r3, 2, MDNN_DW_W);
                        if (ACT != MDNN_ACT_IDENTITY) {
                            a = mdnn_act8(ACT, a, ap);
                            b = mdnn_act8(ACT, b, ap);
                            c = mdnn_act8(ACT, c, ap);
                            e = mdnn_act8(ACT, e, ap);
                        }
                        mdnn_dw_store33(yr, ox, roomA, Co, a, stream);
                        mdnn_dw_store33(yr + Co, ox, room - Co, Co, b, stream);
                        mdnn_dw_store33(yr, ox + MDNN_DW_W, roomA, Co, c, stream);
                        mdnn_dw_store33(yr + Co, ox + MDNN_DW_W, room - Co, Co, e, stream);
                    }
                    for (; ox < Co; ox += MDNN_DW_W) {
                        __m256 a = bb, b = bb, v0, v1, v2;
                        MDNN_DW33_FMA(a, w0, r0, 0); MDNN_DW33_FMA(a, w1, r0, 1); MDNN_DW33_FMA(a, w2, r0, 2);
                        v0 = MDNN_DW33_LD(r1, 0); v1 = MDNN_DW33_LD(r1, 1); v2 = MDNN_DW33_LD(r1, 2);
                        a = _mm256_fmadd_ps(w3, v0, a); b = _mm256_fmadd_ps(w0, v0, b);
                        a = _mm256_fmadd_ps(w4, v1, a); b = _mm256_fmadd_ps(w1, v1, b);
                        a = _mm256_fmadd_ps(w5, v2, a); b = _mm256_fmadd_ps(w2, v2, b);
                        v0 = MDNN_DW33_LD(r2, 0); v1 = MDNN_DW33_LD(r2, 1); v2 = MDNN_DW33_LD(r2, 2);
                        a = _mm256_fmadd_ps(w6, v0, a); b = _mm256_fmadd_ps(w3, v0, b);
                        a = _mm256_fmadd_ps(w7, v1, a); b = _mm256_fmadd_ps(w4, v1, b);
                        a = _mm256_fmadd_ps(w8, v2, a); b = _mm256_fmadd_ps(w5, v2, b);
                        MDNN_DW33_FMA(b, w6, r3, 0); MDNN_DW33_FMA(b, w7, r3, 1); MDNN_DW33_FMA(b, w8, r3, 2);
                        if (ACT != MDNN_ACT_IDENTITY) {
                            a = mdnn_act8(ACT, a, ap);
                            b = mdnn_act8(ACT, b, ap);
                        }
                        mdnn_dw_store33(yr, ox, roomA, Co, a, stream);
                        mdnn_dw_store33(yr + Co, ox, room - Co, Co, b, stream);
                    }
                } else {
                    /* four column blocks at a time: four independent chains */
                    for (ox = 0; ox + 3 * MDNN_DW_W < Co; ox += 4 * MDNN_DW_W) {
                        __m256 a = bb, b = bb, c = bb, e = bb;
                        MDNN_DW33_ROW(a, 0);
                        MDNN_DW33_ROW(b, MDNN_DW_W);
                        MDNN_DW33_ROW(c, 2 * MDNN_DW_W);
                        MDNN_DW33_ROW(e, 3 * MDNN_DW_W);
                        if (ACT != MDNN_ACT_IDENTITY) {
                            a = mdnn_act8(ACT, a, ap);
                            b = mdnn_act8(ACT, b, ap);
                            c = mdnn_act8(ACT, c, ap);
                            e = mdnn_act8(ACT, e, ap);
                        }
                        mdnn_dw_store33(yr, ox, room, Co, a, stream);
                        mdnn_dw_store33(yr, ox + MDNN_DW_W, room, Co, b, stream);
                        mdnn_dw_store33(yr, ox + 2 * MDNN_DW_W, room, Co, c, stream);
                        mdnn_dw_store33(yr, ox + 3 * MDNN_DW_W, room, Co, e, stream);
                    }
                    for (; ox < Co; ox += MDNN_DW_W) {
                        __m256 a = bb;
                        MDNN_DW33_FMA(a, w0, r0, 0); MDNN_DW33_FMA(a, w1, r0, 1); MDNN_DW33_FMA(a, w2, r0, 2);
                        MDNN_DW33_FMA(a, w3, r1, 0); MDNN_DW33_FMA(a, w4, r1, 1); MDNN_DW33_FMA(a, w5, r1, 2);
                        MDNN_DW33_FMA(a, w6, r2, 0); MDNN_DW33_FMA(a, w7, r2, 1); MDNN_DW33_FMA(a, w8, r2, 2);
                        if (ACT != MDNN_ACT_IDENTITY)
                            a = mdnn_act8(ACT, a, ap);
                        mdnn_dw_store33(yr, ox, room, Co, a, stream);
                    }
                }
                if (late && ((oy + (long)rows) * Co - pend >= 1024 || oy + rows == Ro)) {
                    mdnn_act_array(d->act, ap, yp + pend, yp + pend, (oy + (long)rows) * Co - pend);
                    pend = (oy + (long)rows) * Co;
                }
            }
        }
        if (stream)
            _mm_sfence();       /* the streamed blocks are visible before the task counts as done */
    }
    #undef MDNN_DW33_LD
    #undef MDNN_DW33_FMA
    #undef MDNN_DW33_LDX
    #undef MDNN_DW33_FMAX
    #undef MDNN_DW33_ROW

    /* the in-register epilogues of mdnn_dw_plane33 (the rest: identity, then the array) */
    #define MDNN_DW33_SWITCH(SX)                                                         \
        switch (d->act) {                                                                \
        case MDNN_ACT_RELU: mdnn_dw_plane33(d, p, t, SX, MDNN_ACT_RELU); break;          \
        case MDNN_ACT_LEAKY_RELU:                                                        \
        case MDNN_ACT_PRELU: mdnn_dw_plane33(d, p, t, SX, MDNN_ACT_LEAKY_RELU); break;   \
        case MDNN_ACT_CLIPPED_RELU: mdnn_dw_plane33(d, p, t, SX, MDNN_ACT_CLIPPED_RELU); break; \
        case MDNN_ACT_SMELU: mdnn_dw_plane33(d, p, t, SX, MDNN_ACT_SMELU); break;        \
        default: mdnn_dw_plane33(d, p, t, SX, MDNN_ACT_IDENTITY);                        \
        }
    #endif

    /* one (sample, output channel) plane; NR, NC, SX, DX are compile-time constants in
     * the specialised instances below (HOIST: keep the NR*NC <= 9 taps in registers) */
    static inline __attribute__((always_inline)) void
    mdnn_dw_plane_t(const mdnn_dw_t* d, long plane, int tid, const int NR, const int NC,
                    const int SX, const int DX, const int HOIST)
    {
        const int R = d->R, C = d->C, Ro = d->Ro, Co = d->Co, DY = d->dy, px = d->px;
        const int f = (int)(plane % d->F), n = (int)(plane / d->F);
        const float* xp = d->x + ((long)n * d->K + f / d->m) * (long)R * C;
        const float* w = d->w + (long)f * NR * NC;
        const float bv = d->b ? d->b[f] : 0.0f;
        float* yp = d->y + plane * (long)Ro * Co;
        /* interior columns [lo, hi): every tap inside [0, C) */
        int lo = (px + SX - 1) / SX, t = C - 1 + px - (NC - 1) * DX;
        int hi = t >= 0 ? t / SX + 1 : 0;
        int oy, ox;
    #if MDNN_DW_AVX2
        __m256 wv[9];
        if (HOIST)
            for (t = 0; t < NR * NC && t < 9; t++)
                wv[t] = _mm256_broadcast_ss(w + t);
    #endif
        if (hi > Co) hi = Co;
        if (lo > hi) lo = hi;
    #if MDNN_DW_AVX2
        if (d->vec && d->pad) {
            /* padded plane: the input plane copied once (per thread, per input channel:
             * a channel multiplier reuses it) into a zero-bordered buffer wide enough for
             * every block's loads; then no masks, no row checks */
            float* slot = d->ws + (long)tid * d->ws_per;
            float* buf = slot + 16;
            const int Wb = d->Wb, Rp = d->Rp, py = d->py;
            long key = (long)n * d->K + f / d->m, held;
            memcpy(&held, slot, sizeof held);
            (void)Rp; (void)py;
            if (held != key) {
                mdnn_dw_fill(d, xp, buf, 0);
                memcpy(slot, &key, sizeof key);
            }
            for (oy = 0; oy < Ro; oy++) {
                float* yr = yp + (long)oy * Co;
                if (HOIST && NR == 3 && NC == 3) {
                    const float* r0 = buf + (long)oy * d->sy * Wb;
                    mdnn_dw_row33(r0, r0 + (long)DY * Wb, r0 + 2L * DY * Wb, w, bv, yr, Co, SX, DX);
                    if (d->act)
                        mdnn_act_array(d->act, d->act_p, yr, yr, Co);
                    continue;
                }
                for (ox = 0; ox < Co; ox += MDNN_DW_W) {
                    if (HOIST)
                        mdnn_dw_block(buf, w, wv, bv, yr, ox, oy * d->sy, 0, NR, NC, SX, DX, DY, Wb, 0, Co, 0);
                    else
                        mdnn_dw_block(buf, w, NULL, bv, yr, ox, oy * d->sy, 0, NR, NC, SX, DX, DY, Wb, 0, Co, 0);
                }
                if (d->act)
                    mdnn_act_array(d->act, d->act_p, yr, yr, Co);
            }
            return;
        }
    #endif
        for (oy = 0; oy < Ro; oy++) {
            float* yr = yp + (long)oy * Co;
            const int iy0 = oy * d->sy - d->py;
            /* window rows i0..i1-1 inside the image: 0 <= iy0 + i*DY < R */
            int i0 = iy0 >= 0 ? 0 : (-iy0 + DY - 1) / DY;
            int i1 = R - 1 - iy0 >= 0 ? (R - 1 - iy0) / DY + 1 : 0;
            if (i1 > NR) i1 = NR;
            if (i0 > i1) i0 = i1;
    #if MDNN_DW_AVX2
            if (d->vec && HOIST && i0 == 0 && i1 == NR) {
                /* every window row inside the image (all but the first and last rows):
                 * the rows are compile-time constants too, so the taps stay in registers */
                for (ox = 0; ox < Co; ox += MDNN_DW_W) {
                    if (ox >= lo && ox + MDNN_DW_W <= hi)
                        mdnn_dw_block(xp, w, wv, bv, yr, ox, iy0, 0, NR, NC, SX, DX, DY, C, px, Co, 0);
                    else
                        mdnn_dw_block(xp, w, wv, bv, yr, ox, iy0, 0, NR, NC, SX, DX, DY, C, px, Co, 1);
                }
            } else if (d->vec) {
                for (ox = 0; ox < Co; ox += MDNN_DW_W) {
                    if (ox >= lo && ox + MDNN_DW_W <= hi)
                        mdnn_dw_block(xp, w, NULL, bv, yr, ox, iy0, i0, i1, NC, SX, DX, DY, C, px, Co, 0);
                    else
                        mdnn_dw_block(xp, w, NULL, bv, yr, ox, iy0, i0, i1, NC, SX, DX, DY, C, px, Co, 1);
                }
            } else
    #endif
            {
                for (ox = 0; ox < Co; ox++)
                    yr[ox] = mdnn_dw_col(xp, w, bv, ox, iy0, i0, i1, NC, SX, DX, DY, C, px);
            }
            if (d->act)
                mdnn_act_array(d->act, d->act_p, yr, yr, Co);
        }
    }

    static void mdnn_dw_plane_3x3s1(const mdnn_dw_t* d, long p, int t)
    {
    #if MDNN_DW_AVX2
        if (d->vec && d->pad) { MDNN_DW33_SWITCH(1) return; }
    #endif
        mdnn_dw_plane_t(d, p, t, 3, 3, 1, 1, 1);
    }
    static void mdnn_dw_plane_3x3s2(const mdnn_dw_t* d, long p, int t)
    {
    #if MDNN_DW_AVX2
        if (d->vec && d->pad) { MDNN_DW33_SWITCH(2) return; }
    #endif
        mdnn_dw_plane_t(d, p, t, 3, 3, 2, 1, 1);
    }
    static void mdnn_dw_plane_5x5s1(const mdnn_dw_t* d, long p, int t) { mdnn_dw_plane_t(d, p, t, 5, 5, 1, 1, 0); }
    static void mdnn_dw_plane_5x5s2(const mdnn_dw_t* d, long p, int t) { mdnn_dw_plane_t(d, p, t, 5, 5, 2, 1, 0); }
    static void mdnn_dw_plane_any(const mdnn_dw_t* d, long p, int t)
    {
        /* stride 1 and 2 keep their vector loads with run-time taps and dilation */
        if (d->sx == 1)
            mdnn_dw_plane_t(d, p, t, d->nr, d->nc, 1, d->dx, 0);
        else if (d->sx == 2)
            mdnn_dw_plane_t(d, p, t, d->nr, d->nc, 2, d->dx, 0);
        else
            mdnn_dw_plane_t(d, p, t, d->nr, d->nc, d->sx, d->dx, 0);
    }

    typedef void (*mdnn_dw_fn)(const mdnn_dw_t*, long, int);

    /* the plane loop for this geometry; *name: which one (for tests and tuning) */
    static mdnn_dw_fn mdnn_dw_pick(const mdnn_dw_t* d, int* which)
    {
        if (d->dx == 1 && d->nr == 3 && d->nc == 3 && d->sx == 1) { *which = 1; return mdnn_dw_plane_3x3s1; }
        if (d->dx == 1 && d->nr == 3 && d->nc == 3 && d->sx == 2) { *which = 2; return mdnn_dw_plane_3x3s2; }
        if (d->dx == 1 && d->nr == 5 && d->nc == 5 && d->sx == 1) { *which = 3; return mdnn_dw_plane_5x5s1; }
        if (d->dx == 1 && d->nr == 5 && d->nc == 5 && d->sx == 2) { *which = 4; return mdnn_dw_plane_5x5s2; }
        *which = 0;
        return mdnn_dw_plane_any;
    }
    """
    ctypedef struct mdnn_dw_t:
        const float* x
        const float* w
        const float* b
        float* y
        int N, K, R, C, F, m, nr, nc, sy, sx, py, px, dy, dx, Ro, Co
        int act
        float act_p
        int vec
        int pad
        int Rp, Wb, Hb
        long planes, ppt
        int pairs
        int stream
        float* ws
        long ws_per
    ctypedef void (*mdnn_dw_fn)(const mdnn_dw_t*, long, int) noexcept nogil
    mdnn_dw_fn mdnn_dw_pick(const mdnn_dw_t* d, int* which) nogil
    int mdnn_dw_have_avx2() nogil
    int MDNN_DW_W

include "workspace.pxi"
include "parallel.pxi"
include "im2col.pxi"


def workspace_bytes():
    """Size of this module's grow-only workspace, in bytes (for tests/benchmarks)."""
    return _ws_n * sizeof(float)


# ------------------------------------------------------------------ settings

# Route choice (tests force a route; 0 = by shape): 1 = depthwise, 2 = gemm.
cdef int _force_route = 0
cdef bint _dw_vec = True
# Depthwise, padded-plane variant (each input plane copied once into a zero-bordered
# per-thread buffer: no masked loads, no per-row bounds, the taps in registers on every
# row): measured 1.2-2.3x faster than reading x in place on every MobileNet shape
# (112x112 down to 7x7), so it is taken whenever its buffer fits DW_PAD_MAX_BYTES
# (else the in-place variant, masked border blocks); 0 = by that rule, 1 = always,
# 2 = never.
cdef isize DW_PAD_MAX_BYTES = 4 * 1024 * 1024
cdef int _dw_pad_mode = 0
# 3x3 plane loop at row stride 1: two output rows from four input rows (each loaded
# vector used twice); False: one row at a time (tests and tuning)
cdef bint _dw_pairs = True
# 3x3 plane loop: outputs (N F Ro Co floats) larger than this many bytes are written with
# non-temporal stores where a block is 16-byte aligned (no read for ownership of the
# lines it overwrites: a third of a large convolution's memory traffic)
cdef isize DW_STREAM_BYTES = 16 * 1024 * 1024
# Work (output elements x taps) below which a call stays on one thread.
cdef double MIN_PARALLEL_WORK = 100000.0
# gemm route: one chunk of im2col columns (KgRS x pw floats) sized to sit in L2
# while sgemm packs it, at least GR_MIN_PW columns; at 2+ threads a sample with
# few (group, chunk) tasks is cut into narrower chunks (halved down to
# GR_MIN_PW) until there are 4 tasks per thread.
cdef isize GR_PW_BYTES = 256 * 1024
cdef int GR_MIN_PW = 64


def _set_grouped_path(str name):
    """Force conv2d_grouped's route: "auto", "depthwise" (groups == K only) or "gemm".
    For tests and tuning; returns the previous name."""
    global _force_route
    names = ("auto", "depthwise", "gemm")
    if name not in names:
        raise ValueError(f"_set_grouped_path: expected one of {names}, got {name!r}")
    prev = names[_force_route]
    _force_route = names.index(name)
    return prev


def _set_depthwise_vector(bint on):
    """Allow (True) or forbid the AVX2 blocks of the depthwise route (False: the
    scalar loop, as on a machine without AVX2); returns the previous setting."""
    global _dw_vec
    prev = _dw_vec
    _dw_vec = on
    return prev


def _set_depthwise_row_pairs(bint on):
    """The 3x3 plane loop's two-rows-at-a-time step at row stride 1 (True) or one row at a
    time; returns the previous setting."""
    global _dw_pairs
    prev = _dw_pairs
    _dw_pairs = on
    return prev


def _set_depthwise_stream_bytes(isize v):
    """Tuning knob: the output size above which the 3x3 plane loop streams its stores
    (DW_STREAM_BYTES); returns the previous."""
    global DW_STREAM_BYTES
    prev = DW_STREAM_BYTES
    DW_STREAM_BYTES = v
    return prev


def _set_depthwise_padded(str mode):
    """Force the depthwise route's padded-plane variant: "auto" (when its buffer fits
    DW_PAD_MAX_BYTES), "always" or "never"; returns the previous mode."""
    global _dw_pad_mode
    names = ("auto", "always", "never")
    if mode not in names:
        raise ValueError(f"_set_depthwise_padded: expected one of {names}, got {mode!r}")
    prev = names[_dw_pad_mode]
    _dw_pad_mode = names.index(mode)
    return prev


cdef inline bint _use_padded(isize buf_floats) noexcept nogil:
    if _dw_pad_mode == 1:
        return True
    if _dw_pad_mode == 2:
        return False
    return 4 * buf_floats <= DW_PAD_MAX_BYTES


def _set_pw_bytes(isize v):
    """Tuning knob: bytes of im2col columns per task of the gemm route; returns the previous."""
    global GR_PW_BYTES
    prev = GR_PW_BYTES
    GR_PW_BYTES = v if v > 0 else 1
    return prev


def _dw_have_avx2():
    """Whether the depthwise route was compiled with its AVX2 blocks."""
    return bool(mdnn_dw_have_avx2())


def _blocking():
    """The blocking constants of this module (tests/test_conv_family.py checks them)."""
    return dict(dw_block=MDNN_DW_W, dw_pad_max_bytes=DW_PAD_MAX_BYTES, gr_pw_bytes=GR_PW_BYTES,
                dw_task_outputs=DW_TASK_OUTPUTS, dw_tasks_per_thread=DW_TASKS_PER_THREAD,
                dw_stream_bytes=DW_STREAM_BYTES,
                gr_min_pw=GR_MIN_PW, min_parallel_work=MIN_PARALLEL_WORK)


cdef inline bint _use_depthwise(int K, int groups) noexcept nogil:
    if groups != K:
        return False
    return _force_route != 2


# ------------------------------------------------------------------ validation

cdef struct GArgs:
    const float* x
    const float* w
    const float* b
    float* y
    float* ws
    isize ws_per_thread
    int N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, Ro, Co, P
    int G, Kg, Fg, KgRS
    int pw, n_pc       # pixel chunk width, chunks per (sample, group)
    bint direct        # 1x1, stride 1, no pad, no dilation: x is the column matrix
    int act
    float act_p


cdef tuple _geometry(str op, tuple xs, tuple ws, int sy, int sx, int py, int px, int dy, int dx,
                     int groups):
    """(Ro, Co) for x (N, K, R, C) and w (F, K/groups, nr, nc); ValueError for a bad call."""
    N, K, R, C = xs
    F, Kg, nr, nc = ws
    if sy < 1 or sx < 1 or py < 0 or px < 0 or dy < 1 or dx < 1:
        raise ValueError(f"{op}: strides and dilations must be >= 1 and pads >= 0, got "
                         f"stride ({sy}, {sx}) pad ({py}, {px}) dilation ({dy}, {dx})")
    if K < 1:
        raise ValueError(f"{op}: x {xs} has no channels")
    if groups < 1 or K % groups or F % groups:
        raise ValueError(f"{op}: groups = {groups} must be >= 1 and divide both the input "
                         f"channels ({K}) and the filters ({F})")
    if Kg != K // groups:
        raise ValueError(f"{op}: w {ws} does not match x {xs} with groups = {groups} "
                         f"(expected w.shape[1] == {K // groups})")
    if nr < 1 or nc < 1 or dy * (nr - 1) + 1 > R + 2 * py or dx * (nc - 1) + 1 > C + 2 * px:
        raise ValueError(f"{op}: filter {nr}x{nc} dilated by ({dy}, {dx}) does not fit the "
                         f"padded input {R}x{C} (pad {py}, {px})")
    return mdnn_out_size(R, nr, sy, py, dy), mdnn_out_size(C, nc, sx, px, dx)


cdef inline isize _ceil(isize a, isize b) noexcept nogil:
    return (a + b - 1) // b


cdef void _gr_plan(GArgs* a, int nt) noexcept nogil:
    cdef isize pw = GR_PW_BYTES // (4 * (a.KgRS if a.KgRS > 0 else 1))
    cdef isize tasks
    if pw < GR_MIN_PW:
        pw = GR_MIN_PW
    pw = pw // 16 * 16 if pw >= 16 else pw
    if a.direct or pw >= a.P:
        pw = a.P
    tasks = <isize>a.N * a.G * _ceil(a.P, pw)
    while nt > 1 and tasks < 4 * nt and pw > GR_MIN_PW and not a.direct:
        pw = _ceil(pw // 2, 16) * 16
        if pw < GR_MIN_PW:
            pw = GR_MIN_PW
        tasks = <isize>a.N * a.G * _ceil(a.P, pw)
    a.pw = <int>pw
    a.n_pc = <int>_ceil(a.P, pw)
    a.ws_per_thread = 0 if a.direct else (<isize>a.KgRS * a.pw + 15) // 16 * 16


cdef void _gr_task(const GArgs* a, isize task, int tid) noexcept nogil:
    """(sample, group, pixel chunk): im2col of the group's channels, one sgemm into the
    group's output rows, then the bias/activation on the block."""
    cdef int per_n = a.G * a.n_pc
    cdef int n = <int>(task // per_n)
    cdef int r = <int>(task - <isize>n * per_n)
    cdef int g = r // a.n_pc
    cdef int pc = r - g * a.n_pc
    cdef int p0 = pc * a.pw
    cdef int pwid = a.pw if p0 + a.pw <= a.P else a.P - p0
    cdef const float* xg = a.x + (<isize>n * a.K + <isize>g * a.Kg) * a.R * a.C
    cdef float* yg = a.y + (<isize>n * a.F + <isize>g * a.Fg) * a.P + p0
    cdef const float* wg = a.w + <isize>g * a.Fg * a.KgRS
    cdef float* A
    cdef int lda, ldb = a.KgRS, ldc = a.P, kk = a.KgRS, fg = a.Fg, f, c
    cdef float one = 1.0, zero = 0.0, bv
    cdef float* yr
    if a.direct:
        A = <float*>xg + p0
        lda = a.P
    else:
        A = a.ws + tid * a.ws_per_thread
        lda = pwid
        _im2col(xg, A, a.Kg, a.R, a.C, a.nr, a.nc, a.sy, a.sx, a.py, a.px, a.dy, a.dx,
                a.Co, p0, pwid, pwid)
    # column-major: y_g^T (pw x Fg) = col^T (pw x KgRS) * w_g^T (KgRS x Fg)
    sgemm(b"N", b"N", &pwid, &fg, &kk, &one, A, &lda, <float*>wg, &ldb, &zero, yg, &ldc)
    if a.b == NULL and a.act == MDNN_ACT_IDENTITY:
        return
    for f in range(a.Fg):
        yr = yg + <isize>f * a.P
        if a.b != NULL:
            bv = a.b[g * a.Fg + f]
            for c in range(pwid):
                yr[c] = yr[c] + bv
        if a.act != MDNN_ACT_IDENTITY:
            mdnn_act_array(a.act, a.act_p, yr, yr, pwid)


def _grouped_route_for(x_shape, w_shape, int groups):
    """The route conv2d_grouped takes for these shapes: "depthwise" or "gemm"."""
    return "depthwise" if _use_depthwise(x_shape[1], groups) else "gemm"


def _grouped_plan(x_shape, w_shape, int stride_y, int stride_x, int pad_y, int pad_x,
                  int dilation_y, int dilation_x, int groups, int nt):
    """The gemm route's task plan (for tests and tuning): a dict."""
    cdef GArgs a
    Ro, Co = _geometry("_grouped_plan", tuple(x_shape), tuple(w_shape), stride_y, stride_x,
                       pad_y, pad_x, dilation_y, dilation_x, groups)
    _fill(&a, tuple(x_shape), tuple(w_shape), stride_y, stride_x, pad_y, pad_x,
          dilation_y, dilation_x, groups, Ro, Co)
    _gr_plan(&a, nt)
    return dict(pw=a.pw, n_pc=a.n_pc, tasks=a.N * a.G * a.n_pc, direct=bool(a.direct),
                ws_per_thread=a.ws_per_thread)


cdef void _fill(GArgs* a, tuple xs, tuple ws, int sy, int sx, int py, int px, int dy, int dx,
                int groups, isize Ro, isize Co):
    a.N, a.K, a.R, a.C = xs
    a.F, a.Kg, a.nr, a.nc = ws
    a.sy = sy; a.sx = sx; a.py = py; a.px = px; a.dy = dy; a.dx = dx
    a.Ro = <int>Ro; a.Co = <int>Co; a.P = <int>(Ro * Co)
    a.G = groups; a.Fg = a.F // groups; a.KgRS = a.Kg * a.nr * a.nc
    a.direct = a.nr == 1 and a.nc == 1 and sy == 1 and sx == 1 and py == 0 and px == 0 \
        and dy == 1 and dx == 1


def conv2d_grouped(x, w, b, y, int stride_y, int stride_x, int pad_y, int pad_x,
                   int dilation_y, int dilation_x, int groups, act):
    """y (N,F,Ro,Co) = the grouped, dilated cross-correlation of x (N,K,R,C) with
    w (F,K/groups,nr,nc): output channel f of group g = f // (F/groups) sums over the
    input channels [g K/groups, (g+1) K/groups), tap (i, j) reading
    x[n, k, oy*stride_y - pad_y + i*dilation_y, ox*stride_x - pad_x + j*dilation_x]
    (zero outside); + b (F,) unless None; then the activation act."""
    op = "conv2d_grouped"
    cdef float act_p
    cdef int act_code = _act(act, &act_p, op)
    cdef cnp.ndarray ax = _f32_nd(x, op + " x", 4)
    cdef cnp.ndarray aw = _f32_nd(w, op + " w", 4)
    cdef cnp.ndarray ay = _f32_nd(y, op + " y", 4, True)
    cdef cnp.ndarray ab = None
    xs, wsh = _shape(ax), _shape(aw)
    Ro, Co = _geometry(op, xs, wsh, stride_y, stride_x, pad_y, pad_x, dilation_y, dilation_x, groups)
    N, K, F = xs[0], xs[1], wsh[0]
    if _shape(ay) != (N, F, Ro, Co):
        raise ValueError(f"{op}: y has shape {_shape(ay)}, expected {(N, F, Ro, Co)}")
    if b is not None:
        ab = _f32(b, op + " b")
        if cnp.PyArray_SIZE(ab) != F:
            raise ValueError(f"{op}: b has {cnp.PyArray_SIZE(ab)} elements, expected {F}")
    _no_alias(ay, ax, op)
    _no_alias(ay, aw, op)
    _check_int(N * max(K * xs[2] * xs[3], F * Ro * Co), op + " N*K*R*C")
    _check_int((K // groups) * wsh[2] * wsh[3] * Ro * Co, op + " K/groups*nr*nc*Ro*Co")
    _check_int(F * (K // groups) * wsh[2] * wsh[3], op + " w")
    if N == 0 or F == 0:
        return
    cdef GArgs a
    _fill(&a, xs, wsh, stride_y, stride_x, pad_y, pad_x, dilation_y, dilation_x, groups, Ro, Co)
    a.x = _ptr(ax); a.w = _ptr(aw); a.y = _ptr(ay)
    a.b = _ptr(ab) if ab is not None else NULL
    a.act = act_code; a.act_p = act_p
    cdef int nt = _threads()
    if <double>a.N * a.F * a.P * (a.KgRS if a.KgRS > 0 else 1) < MIN_PARALLEL_WORK:
        nt = 1
    if _use_depthwise(a.K, groups):
        _depthwise(&a, nt)
        return
    _gr_plan(&a, nt)
    cdef isize ntasks = <isize>a.N * a.G * a.n_pc, t
    if ntasks < nt:
        nt = <int>ntasks
    cdef bint private = False
    cdef float* wsp = _workspace_acquire(<size_t>(a.ws_per_thread * nt), &private)
    a.ws = wsp
    try:
        with nogil:
            mdnn_parallel_for(ntasks, nt, _gr_task_run, &a)
    finally:
        _workspace_release(wsp, private)


cdef struct DwRun:
    mdnn_dw_fn fn
    const mdnn_dw_t* d


cdef void _dw_run(void* ctx, long task, int tid) noexcept nogil:
    # task: planes [task ppt, (task + 1) ppt)
    cdef const DwRun* r = <const DwRun*>ctx
    cdef long p = task * r.d.ppt, e = p + r.d.ppt
    if e > r.d.planes:
        e = r.d.planes
    while p < e:
        r.fn(r.d, p, tid)
        p += 1


cdef void _gr_task_run(void* ctx, long task, int tid) noexcept nogil:
    _gr_task(<const GArgs*>ctx, task, tid)


cdef int _depthwise(const GArgs* a, int nt) except -1:
    cdef DwRun dw
    cdef mdnn_dw_t d
    cdef int which, t
    d.x = a.x; d.w = a.w; d.b = a.b; d.y = a.y
    d.N = a.N; d.K = a.K; d.R = a.R; d.C = a.C; d.F = a.F; d.m = a.F // a.K
    d.nr = a.nr; d.nc = a.nc; d.sy = a.sy; d.sx = a.sx; d.py = a.py; d.px = a.px
    d.dy = a.dy; d.dx = a.dx; d.Ro = a.Ro; d.Co = a.Co
    d.act = a.act; d.act_p = a.act_p; d.vec = 1 if _dw_vec and mdnn_dw_have_avx2() else 0
    cdef mdnn_dw_fn fn = mdnn_dw_pick(&d, &which)
    cdef long planes = <long>a.N * a.F, p
    if nt > planes:
        nt = <int>planes
    if nt < 1:
        nt = 1
    d.Rp, d.Wb, d.Hb = _dw_buffer(a.R, a.C, a.Co, a.nc, a.sy, a.sx, a.py, a.px, a.dx, which)
    d.pad = 1 if d.vec and _use_padded(<isize>d.Rp * d.Wb) else 0
    d.ws_per = (16 + <isize>d.Rp * d.Wb + 15) // 16 * 16 if d.pad else 0
    d.planes = planes
    d.pairs = 1 if _dw_pairs else 0
    d.stream = 1 if 4 * <isize>planes * a.Ro * a.Co > DW_STREAM_BYTES else 0
    d.ppt = _dw_ppt(planes, a.Ro * a.Co, nt)
    cdef long ntasks = _ceil(planes, d.ppt)
    if nt > ntasks:
        nt = <int>ntasks
    cdef bint private = False
    cdef float* ws = _workspace_acquire(<size_t>(d.ws_per * nt), &private)
    cdef long none = -1
    d.ws = ws
    if d.pad:
        # the buffers' borders are zero for the whole call (the fills write the interior)
        memset(ws, 0, <size_t>(d.ws_per * nt) * sizeof(float))
        for t in range(nt):
            memcpy(ws + t * d.ws_per, &none, sizeof(long))      # no plane held yet
    try:
        dw.fn, dw.d = fn, &d
        with nogil:
            if nt <= 1:
                for p in range(planes):
                    fn(&d, p, 0)
            else:
                mdnn_parallel_for(ntasks, nt, _dw_run, &dw)
    finally:
        _workspace_release(ws, private)
    return 0


# Depthwise tasks: runs of whole planes of at least DW_TASK_OUTPUTS outputs (small planes:
# 14x14, 7x7 ... cost a claim of the shared counter each), while there are at least
# DW_TASKS_PER_THREAD tasks per thread.
cdef long DW_TASK_OUTPUTS = 2048
cdef long DW_TASKS_PER_THREAD = 4


cdef long _dw_ppt(long planes, long plane_size, int nt) noexcept nogil:
    cdef long ppt = _ceil(DW_TASK_OUTPUTS, plane_size if plane_size > 0 else 1)
    cdef long cap = planes // (DW_TASKS_PER_THREAD * nt) if nt > 1 else planes
    if ppt > cap:
        ppt = cap
    return ppt if ppt >= 1 else 1


cdef tuple _dw_buffer(isize R, isize C, isize Co, int nc, int sy, int sx, int py, int px, int dx,
                      int which):
    """(Rp, Wb, Hb): the padded plane's rows, row length, and (3x3 stride 2) half row."""
    cdef isize nb = _ceil(Co, MDNN_DW_W), Hb = 0, Wb
    if which == 2:
        # de-interleaved: the padded row's even columns then its odd ones; a block of 8
        # at ox reads E[ox .. ox + 8] and O[ox .. ox + 7]
        Hb = max(_ceil(C + 2 * px, 2), nb * MDNN_DW_W + 1)
        Hb = _ceil(Hb, 16) * 16
        Wb = 2 * Hb
    else:
        Wb = max(C + 2 * px + 8, (nb * MDNN_DW_W - 1) * sx + (nc - 1) * dx + 1 + 8)
    # rows start on 64-byte lines (the workspace and each thread's slot are 64-byte
    # aligned): a block's first tap (and at stride 2 its second) never straddles two lines
    Wb = _ceil(Wb, 16) * 16
    return R + 2 * py, Wb, Hb


def _dw_plan_for(x_shape, w_shape, int stride_y, int stride_x, int pad_y, int pad_x,
                 int dilation_y=1, int dilation_x=1):
    """The depthwise route's choices for these shapes (for tests and tuning): a dict with
    the padded-plane buffer (rows Rp, row length Wb) and whether it is used."""
    N, K, R, C = x_shape
    F, _, nr, nc = w_shape
    Ro, Co = _geometry("_dw_plan_for", tuple(x_shape), tuple(w_shape), stride_y, stride_x,
                       pad_y, pad_x, dilation_y, dilation_x, K)
    variant = _depthwise_variant(nr, nc, stride_x, dilation_x)
    which = ("any", "3x3s1", "3x3s2", "5x5s1", "5x5s2").index(variant)
    Rp, Wb, Hb = _dw_buffer(R, C, Co, nc, stride_y, stride_x, pad_y, pad_x, dilation_x, which)
    vec = _dw_vec and mdnn_dw_have_avx2()
    return dict(vec=bool(vec), padded=bool(vec and _use_padded(Rp * Wb)), Rp=Rp, Wb=Wb, Hb=Hb,
                variant=variant)


def _dw_tasks_for(x_shape, w_shape, int stride_y, int stride_x, int pad_y, int pad_x, int nt,
                  int dilation_y=1, int dilation_x=1):
    """The depthwise route's parallel split at nt threads: (planes per task, tasks)."""
    Ro, Co = _geometry("_dw_tasks_for", tuple(x_shape), tuple(w_shape), stride_y, stride_x,
                       pad_y, pad_x, dilation_y, dilation_x, x_shape[1])
    planes = x_shape[0] * w_shape[0]
    ppt = _dw_ppt(planes, Ro * Co, nt)
    return ppt, -(-planes // ppt)


def _depthwise_variant(int nr, int nc, int stride_x, int dilation_x):
    """Which compiled plane loop the depthwise route runs for this filter and column
    stride/dilation: "3x3s1", "3x3s2", "5x5s1", "5x5s2" or "any"."""
    cdef mdnn_dw_t d
    cdef int which
    d.nr = nr; d.nc = nc; d.sx = stride_x; d.dx = dilation_x
    mdnn_dw_pick(&d, &which)
    return ("any", "3x3s1", "3x3s2", "5x5s1", "5x5s2")[which]

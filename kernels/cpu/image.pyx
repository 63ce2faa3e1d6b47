# cython: language_level=3
"""Image kernels of dlib's input layers: the levels of a tiled image pyramid.

dlib's input_rgb_image_pyramid / input_grayscale_image_pyramid put every level of
an image pyramid into one tensor (impl::compute_tiled_image_pyramid_details decides
where) and make each level from the previous one *inside the tensor* with
tt::resize_bilinear, which on the CPU is dlib's resize_image of float images
(dlib/image_transforms/interpolation.h, the grayscale same-type overload; dlib/cuda/
cpu_dlib.cpp resize_bilinear). This kernel reproduces that code's arithmetic
exactly, so that the tensor equals dlib's bit for bit: columns are taken four at a
time in float32 lanes whose source positions are accumulated in float32 (as dlib's
simd4f code does), truncated to ints (_mm_cvttps_epi32), weighted in float32 in
dlib's order; the columns after the last full group of four use dlib's scalar tail
(double positions, float/double mixed as written there). The C below is compiled
with floating-point contraction off: an FMA would round differently from dlib's
separate multiplies and adds.

The kernels validate their arguments before touching memory (check.pxi), allocate
only a row table and run with the GIL released; parallel.h's parallel-for takes the
rows (of each level) when there are enough pixels to pay for it.
"""
include "check.pxi"
include "parallel.pxi"

from libc.stdlib cimport malloc, free

# destination pixels per thread below which a level stays on one thread
cdef isize GRAIN = 1 << 14

cdef extern from *:
    """
    #include <math.h>
    #pragma GCC push_options
    #pragma GCC optimize ("fp-contract=off")
    /* One row r of dlib's resize_image(src, dst) for float planes (row strides in
       floats): dst (dnr x dnc) from src (snr x snc), both at least 1 x 1. */
    /* The source row position of each destination row: dlib accumulates it in double,
       y = -y_scale, then y += y_scale before each row. */
    static void mdnn_dlib_resize_rows(long snr, long dnr, double* ys)
    {
        const double y_scale = (snr - 1) / (double)(dnr - 1 > 1 ? dnr - 1 : 1);
        double y = -y_scale;
        long r;
        for (r = 0; r < dnr; ++r) {
            y += y_scale;
            ys[r] = y;
        }
    }
    /* One row of dlib's resize_image(src, dst) for float planes (row stride srs
       floats), y its source position (mdnn_dlib_resize_rows). */
    static void mdnn_dlib_resize_row(const float* src, long snr, long snc, long srs,
                                     float* dst, long dnc, double y)
    {
        const double x_scale = (snc - 1) / (double)(dnc - 1 > 1 ? dnc - 1 : 1);
        const long top = (long)floor(y);
        const long bottom = top + 1 < snr - 1 ? top + 1 : snr - 1;
        const double tb_frac = y - top;
        const float* st = src + top * srs;
        const float* sb = src + bottom * srs;
        double x = -4 * x_scale;
        const float ftb = (float)tb_frac, fitb = (float)(1 - tb_frac);
        const float fxs = (float)(4 * x_scale);
        float lx[4];
        lx[0] = (float)x; lx[1] = (float)(x + x_scale);
        lx[2] = (float)(x + 2 * x_scale); lx[3] = (float)(x + 3 * x_scale);
        long c = 0;
        int j;
        for (;; c += 4) {
            int fl[4], fr[4];
            float lr[4], ilr[4];
            for (j = 0; j < 4; ++j) {
                lx[j] = lx[j] + fxs;
                fl[j] = (int)lx[j];                 /* truncation, as _mm_cvttps_epi32 */
                lr[j] = lx[j] - (float)fl[j];
                ilr[j] = 1.0f - lr[j];
                fr[j] = fl[j] + 1;
            }
            if (fr[3] >= snc || c + 3 >= dnc)
                break;
            for (j = 0; j < 4; ++j) {
                const float tlf = fitb * ilr[j], trf = fitb * lr[j];
                const float blf = ftb * ilr[j], brf = ftb * lr[j];
                float out = tlf * st[fl[j]];
                out = out + trf * st[fr[j]];
                out = out + blf * sb[fl[j]];
                out = out + brf * sb[fr[j]];
                dst[c + j] = out;
            }
        }
        x = -x_scale + c * x_scale;
        for (; c < dnc; ++c) {
            x += x_scale;
            const long left = (long)floor(x);
            const long right = left + 1 < snc - 1 ? left + 1 : snc - 1;
            const float lr_frac = (float)(x - left);
            const float tl = st[left], tr = st[right], bl = sb[left], br = sb[right];
            const float a = (1 - lr_frac) * tl + lr_frac * tr;
            const float b = (1 - lr_frac) * bl + lr_frac * br;
            dst[c] = (float)((1 - tb_frac) * a + tb_frac * b);
        }
    }
    /* One row of dlib's resize_image(src, dst) with bilinear interpolation for uint8
       images, its optimised paths: RGB (ch = 3, interleaved; lanes truncate, the tail is
       all double and truncates) and grayscale (ch = 1; lanes round with value + 0.5 in
       double, the tail mixes float and double and truncates after clamping). */
    static void mdnn_dlib_resize_u8_row(const unsigned char* src, long snr, long snc, int ch,
                                        unsigned char* dst, long dnc, double y)
    {
        const double x_scale = (snc - 1) / (double)(dnc - 1 > 1 ? dnc - 1 : 1);
        const long top = (long)floor(y);
        const long bottom = top + 1 < snr - 1 ? top + 1 : snr - 1;
        const double tb_frac = y - top;
        const unsigned char* st = src + top * snc * ch;
        const unsigned char* sb = src + bottom * snc * ch;
        double x = -4 * x_scale;
        const float ftb = (float)tb_frac, fitb = (float)(1 - tb_frac);
        const float fxs = (float)(4 * x_scale);
        float lx[4];
        lx[0] = (float)x; lx[1] = (float)(x + x_scale);
        lx[2] = (float)(x + 2 * x_scale); lx[3] = (float)(x + 3 * x_scale);
        long c = 0;
        int j, k;
        for (;; c += 4) {
            int fl[4], fr[4];
            float lr[4], ilr[4];
            for (j = 0; j < 4; ++j) {
                lx[j] = lx[j] + fxs;
                fl[j] = (int)lx[j];
                lr[j] = lx[j] - (float)fl[j];
                ilr[j] = 1.0f - lr[j];
                fr[j] = fl[j] + 1;
            }
            if (fr[3] >= snc || c + 3 >= dnc)
                break;
            for (j = 0; j < 4; ++j) {
                const float tlf = fitb * ilr[j], trf = fitb * lr[j];
                const float blf = ftb * ilr[j], brf = ftb * lr[j];
                for (k = 0; k < ch; ++k) {
                    float out = tlf * (float)st[fl[j] * ch + k];
                    out = out + trf * (float)st[fr[j] * ch + k];
                    out = out + blf * (float)sb[fl[j] * ch + k];
                    out = out + brf * (float)sb[fr[j] * ch + k];
                    if (ch == 3)
                        dst[(c + j) * 3 + k] = (unsigned char)(int)out;
                    else
                        dst[c + j] = (unsigned char)((double)out + 0.5);
                }
            }
        }
        x = -x_scale + c * x_scale;
        for (; c < dnc; ++c) {
            x += x_scale;
            const long left = (long)floor(x);
            const long right = left + 1 < snc - 1 ? left + 1 : snc - 1;
            for (k = 0; k < ch; ++k) {
                if (ch == 3) {
                    const double lr_frac = x - left;
                    const double tl = st[left * 3 + k], tr = st[right * 3 + k];
                    const double bl = sb[left * 3 + k], br = sb[right * 3 + k];
                    const double v = (1 - tb_frac) * ((1 - lr_frac) * tl + lr_frac * tr) +
                                     tb_frac * ((1 - lr_frac) * bl + lr_frac * br);
                    dst[c * 3 + k] = (unsigned char)v;
                } else {
                    const float lr_frac = (float)(x - left);
                    const float tl = st[left], tr = st[right], bl = sb[left], br = sb[right];
                    const float a = (1 - lr_frac) * tl + lr_frac * tr;
                    const float b = (1 - lr_frac) * bl + lr_frac * br;
                    const float v = (float)((1 - tb_frac) * a + tb_frac * b);
                    dst[c] = v > 255 ? 255 : (v >= 0 ? (unsigned char)v : 0);
                }
            }
        }
    }
    #pragma GCC pop_options
    """
    void mdnn_dlib_resize_rows(long snr, long dnr, double* ys) nogil
    void mdnn_dlib_resize_u8_row(const unsigned char* src, long snr, long snc, int ch,
                                 unsigned char* dst, long dnc, double y) nogil
    void mdnn_dlib_resize_row(const float* src, long snr, long snc, long srs,
                              float* dst, long dnc, double y) nogil


def tiled_pyramid(x, rects):
    """In place on x (N, K, R, C), whose rectangle rects[0] holds level 0 of a tiled
    image pyramid: fills rects[i] (i >= 1) of every plane with dlib's bilinear resize
    of rects[i - 1] (dlib's create_tiled_pyramid). ``rects`` is a sequence of
    (left, top, right, bottom) integer rectangles (inclusive), each inside the plane."""
    cdef cnp.ndarray ax = _f32_nd(x, "tiled_pyramid x", 4, True)
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), R = _dim(ax, 2), C = _dim(ax, 3)
    cdef list rs = []
    cdef long l, t, rr, b
    for q in rects:
        try:
            l, t, rr, b = (int(v) for v in q)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"tiled_pyramid: expected rectangles (left, top, right, bottom), "
                             f"got {q!r}") from None
        if not (0 <= l <= rr < C and 0 <= t <= b < R):
            raise ValueError(f"tiled_pyramid: rectangle {(l, t, rr, b)} is not inside the "
                             f"{R} x {C} plane")
        rs.append((l, t, rr, b))
    _check_int(N * K * R, "tiled_pyramid")
    if not rs:
        return
    cdef float* base = _ptr(ax)
    cdef isize plane = R * C, planes = N * K
    cdef long most = max([q[3] - q[1] + 1 for q in rs])
    cdef double* ys = <double*>malloc(most * sizeof(double))   # one small table, reused
    if ys == NULL:
        raise MemoryError("tiled_pyramid: no memory for the row table")
    try:
        _levels(base, rs, plane, planes, C, ys)
    finally:
        free(ys)


cdef struct LevelArgs:
    float* base
    isize plane, C
    long sl, stp, snr, snc, dl, dtp, dnr, dnc
    const double* ys


cdef void _level_row(void* ctx, long task, int tid) noexcept nogil:
    cdef LevelArgs* a = <LevelArgs*>ctx
    cdef long p = task // a.dnr
    cdef long row = task - p * a.dnr
    mdnn_dlib_resize_row(a.base + p * a.plane + a.stp * a.C + a.sl, a.snr, a.snc, a.C,
                         a.base + p * a.plane + (a.dtp + row) * a.C + a.dl, a.dnc, a.ys[row])


cdef int _levels(float* base, list rs, isize plane, isize planes, isize C, double* ys) except -1:
    cdef isize i, task, tasks
    cdef int nt
    cdef LevelArgs a
    a.base, a.plane, a.C, a.ys = base, plane, C, ys
    for i in range(1, len(rs)):
        a.sl, a.stp = rs[i - 1][0], rs[i - 1][1]
        a.snc, a.snr = rs[i - 1][2] - a.sl + 1, rs[i - 1][3] - a.stp + 1
        a.dl, a.dtp = rs[i][0], rs[i][1]
        a.dnc, a.dnr = rs[i][2] - a.dl + 1, rs[i][3] - a.dtp + 1
        tasks = planes * a.dnr
        nt = _threads_for(tasks * a.dnc, GRAIN)
        with nogil:
            mdnn_dlib_resize_rows(a.snr, a.dnr, ys)
            if nt == 1:
                for task in range(tasks):
                    _level_row(&a, task, 0)
            else:
                mdnn_parallel_for(tasks, nt, _level_row, &a)
    return 0


cdef struct U8Args:
    const unsigned char* src
    unsigned char* dst
    long snr, snc, dnc
    int ch
    const double* ys


cdef void _u8_row(void* ctx, long r, int tid) noexcept nogil:
    cdef U8Args* u = <U8Args*>ctx
    mdnn_dlib_resize_u8_row(u.src, u.snr, u.snc, u.ch, u.dst + r * u.dnc * u.ch, u.dnc, u.ys[r])


def resize_image_u8(img, out):
    """out = dlib's resize_image(img) with bilinear interpolation, for uint8 images: img
    (H, W, 3) RGB or (H, W) grayscale, out (H2, W2[, 3]) of the same kind, both
    C-contiguous; dlib's optimised RGB / grayscale code reproduced bit for bit."""
    if not cnp.PyArray_Check(img) or not cnp.PyArray_Check(out):
        raise ValueError("resize_image_u8: expected numpy.ndarray images")
    cdef cnp.ndarray a = <cnp.ndarray>img
    cdef cnp.ndarray b = <cnp.ndarray>out
    for arr, what in ((a, "img"), (b, "out")):
        if cnp.PyArray_TYPE(arr) != cnp.NPY_UINT8 or not cnp.PyArray_IS_C_CONTIGUOUS(arr):
            raise ValueError(f"resize_image_u8 {what}: expected a C-contiguous uint8 array")
    cdef int nd = cnp.PyArray_NDIM(a)
    if nd not in (2, 3) or cnp.PyArray_NDIM(b) != nd or (nd == 3 and (_dim(a, 2) != 3 or _dim(b, 2) != 3)):
        raise ValueError(f"resize_image_u8: expected (H, W, 3) or (H, W) images of one kind, got "
                         f"{_shape(a)} and {_shape(b)}")
    if not cnp.PyArray_ISWRITEABLE(b):
        raise ValueError("resize_image_u8: the output array is read-only")
    if _overlap(a, b):
        raise ValueError("resize_image_u8: the output must not share memory with the input")
    cdef long snr = _dim(a, 0), snc = _dim(a, 1), dnr = _dim(b, 0), dnc = _dim(b, 1)
    cdef int ch = 3 if nd == 3 else 1
    if snr * snc == 0 or dnr * dnc == 0:
        return
    _check_int(snr * snc * ch, "resize_image_u8")
    _check_int(dnr * dnc * ch, "resize_image_u8")
    cdef const unsigned char* ps = <const unsigned char*>cnp.PyArray_DATA(a)
    cdef unsigned char* pd = <unsigned char*>cnp.PyArray_DATA(b)
    cdef double* ys = <double*>malloc(dnr * sizeof(double))
    if ys == NULL:
        raise MemoryError("resize_image_u8: no memory for the row table")
    cdef long r
    cdef int nt = _threads_for(dnr * dnc * ch, GRAIN)
    cdef U8Args u
    u.src, u.dst, u.snr, u.snc, u.ch, u.dnc, u.ys = ps, pd, snr, snc, ch, dnc, ys
    try:
        with nogil:
            mdnn_dlib_resize_rows(snr, dnr, ys)
            if nt == 1:
                for r in range(dnr):
                    _u8_row(&u, r, 0)
            else:
                mdnn_parallel_for(dnr, nt, _u8_row, &u)
    finally:
        free(ys)

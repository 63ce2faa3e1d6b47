# cython: language_level=3
"""Pooling CPU kernels: max_pool, avg_pool over (N,K,R,C) planes.

Padding is never counted: a window is clipped to the input before the
max / mean (avg divides by the number of in-bounds pixels). The N*K planes are
the tasks of parallel.h's parallel-for."""
include "check.pxi"
include "parallel.pxi"

from libc.math cimport INFINITY

cdef isize GRAIN = 1 << 14


cdef inline isize _ceil(isize a, isize b) noexcept nogil:
    return (a + b - 1) // b


cdef void _max_plane(const float* x, float* y, int R, int C, int Ro, int Co,
                     int nr, int nc, int sy, int sx, int py, int px) noexcept nogil:
    cdef int oy, ox, iy, ix, y0, y1, x0, x1
    cdef float m
    cdef const float* xr
    for oy in range(Ro):
        y0 = oy * sy - py
        y1 = min(y0 + nr, R)
        y0 = max(y0, 0)
        for ox in range(Co):
            x0 = ox * sx - px
            x1 = min(x0 + nc, C)
            x0 = max(x0, 0)
            m = x[y0 * C + x0]
            for iy in range(y0, y1):
                xr = x + iy * C
                for ix in range(x0, x1):
                    m = max(m, xr[ix])
            y[oy * Co + ox] = m


# Separable max pooling (below) keeps two padded rows on the stack.
DEF MAXROW = 4096


cdef inline float _fmax(float a, float b) noexcept nogil:
    return a if a > b else b


cdef void _max_plane_sep(const float* x, float* y, int R, int C, int Ro, int Co,
                         int nr, int nc, int sy, int sx, int py, int px) noexcept nogil:
    """The same as _max_plane, separably and vectorisable: for each output
    row, v = column-wise max of the window's (clipped) input rows on a row
    padded with -inf (padded column e is input column e - px), then
    h[e] = max(v[e .. e+nc-1]) by nc - 1 shifted passes, and y[ox] = h[ox*sx].
    Padding is -inf, so it never wins: every window holds a real pixel.
    Needs (Co - 1)*sx + nc <= MAXROW."""
    cdef float v[MAXROW]
    cdef float h[MAXROW]
    cdef int W = (Co - 1) * sx + nc          # padded columns the windows cover
    cdef int H = (Co - 1) * sx + 1           # window starts
    cdef int lo = px if px < W else W        # [lo, hi): padded columns with a real pixel
    cdef int hi = px + C if px + C < W else W
    cdef int oy, iy, e, j, y0, y1, ox
    cdef const float* xr
    cdef float* out
    cdef float ninf = -INFINITY
    for e in range(lo):
        v[e] = ninf
    for e in range(hi, W):
        v[e] = ninf
    for oy in range(Ro):
        y0 = oy * sy - py
        y1 = min(y0 + nr, R)
        y0 = max(y0, 0)
        xr = x + <isize>y0 * C - px
        for e in range(lo, hi):
            v[e] = xr[e]
        for iy in range(y0 + 1, y1):
            xr = x + <isize>iy * C - px
            for e in range(lo, hi):
                v[e] = _fmax(v[e], xr[e])
        out = y + <isize>oy * Co
        if sx == 1:
            # h is the output row itself
            for e in range(H):
                out[e] = v[e]
            for j in range(1, nc):
                for e in range(H):
                    out[e] = _fmax(out[e], v[e + j])
        else:
            for e in range(H):
                h[e] = v[e]
            for j in range(1, nc):
                for e in range(H):
                    h[e] = _fmax(h[e], v[e + j])
            for ox in range(Co):
                out[ox] = h[ox * sx]


cdef float _plane_mean(const float* x, isize n) noexcept nogil:
    """The mean of n contiguous floats: eight partial sums (independent add chains; one
    chain is bound by the add latency), then combined pairwise."""
    cdef float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0
    cdef isize i = 0
    while i + 8 <= n:
        s0 = s0 + x[i]
        s1 = s1 + x[i + 1]
        s2 = s2 + x[i + 2]
        s3 = s3 + x[i + 3]
        s4 = s4 + x[i + 4]
        s5 = s5 + x[i + 5]
        s6 = s6 + x[i + 6]
        s7 = s7 + x[i + 7]
        i += 8
    while i < n:
        s0 = s0 + x[i]
        i += 1
    return (((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))) / <float>n


cdef void _avg_plane(const float* x, float* y, int R, int C, int Ro, int Co,
                     int nr, int nc, int sy, int sx, int py, int px) noexcept nogil:
    cdef int oy, ox, iy, ix, y0, y1, x0, x1
    cdef float s
    cdef const float* xr
    if Ro == 1 and Co == 1 and nr == R and nc == C and py == 0 and px == 0:
        # the window is the plane (avg_pool_everything, MobileNet's 7x7 head)
        y[0] = _plane_mean(x, <isize>R * C)
        return
    for oy in range(Ro):
        y0 = oy * sy - py
        y1 = min(y0 + nr, R)
        y0 = max(y0, 0)
        for ox in range(Co):
            x0 = ox * sx - px
            x1 = min(x0 + nc, C)
            x0 = max(x0, 0)
            s = 0.0
            for iy in range(y0, y1):
                xr = x + iy * C
                for ix in range(x0, x1):
                    s = s + xr[ix]
            y[oy * Co + ox] = s / <float>((y1 - y0) * (x1 - x0))


cdef object _check_pool(str op, x, y, int nr, int nc, int stride_y, int stride_x,
                        int pad_y, int pad_x):
    cdef cnp.ndarray ax = _f32_nd(x, op + " x", 4)
    cdef cnp.ndarray ay = _f32_nd(y, op + " y", 4, True)
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), R = _dim(ax, 2), C = _dim(ax, 3)
    if nr < 1 or nc < 1 or stride_y < 1 or stride_x < 1:
        raise ValueError(f"{op}: window and strides must be >= 1, got window "
                         f"{nr}x{nc} stride ({stride_y}, {stride_x})")
    if pad_y < 0 or pad_x < 0 or pad_y >= nr or pad_x >= nc:
        raise ValueError(f"{op}: need 0 <= pad < window, got pad ({pad_y}, {pad_x}) "
                         f"window {nr}x{nc}")
    if nr > R + 2 * pad_y or nc > C + 2 * pad_x:
        raise ValueError(f"{op}: window {nr}x{nc} does not fit the padded input {R}x{C}")
    cdef isize Ro = mdnn_out_size(R, nr, stride_y, pad_y, 1)
    cdef isize Co = mdnn_out_size(C, nc, stride_x, pad_x, 1)
    if _dim(ay, 0) != N or _dim(ay, 1) != K or _dim(ay, 2) != Ro or _dim(ay, 3) != Co:
        raise ValueError(f"{op}: y has shape {_shape(ay)}, expected {(N, K, Ro, Co)}")
    _no_alias(ay, ax, op)
    _check_int(R * C, op + " R*C")
    return ax, ay


cdef struct PoolArgs:
    const float* x
    float* y
    int R, C, Ro, Co, nr, nc, sy, sx, py, px
    isize pin, pout
    int kind               # 0 average, 1 max, 2 separable max
    isize NK, per          # planes, planes per task


cdef void _pool_task(void* ctx, long t, int tid) noexcept nogil:
    """Task t: planes [t * per, (t + 1) * per) (each plane by one thread, in order)."""
    cdef const PoolArgs* a = <const PoolArgs*>ctx
    cdef isize i, e = (t + 1) * a.per
    if e > a.NK:
        e = a.NK
    for i in range(t * a.per, e):
        _pool_run(ctx, i, tid)


cdef void _pool_run(void* ctx, long i, int tid) noexcept nogil:
    cdef const PoolArgs* a = <const PoolArgs*>ctx
    if a.kind == 2:
        _max_plane_sep(a.x + i * a.pin, a.y + i * a.pout, a.R, a.C, a.Ro, a.Co, a.nr, a.nc,
                       a.sy, a.sx, a.py, a.px)
    elif a.kind == 1:
        _max_plane(a.x + i * a.pin, a.y + i * a.pout, a.R, a.C, a.Ro, a.Co, a.nr, a.nc,
                   a.sy, a.sx, a.py, a.px)
    else:
        _avg_plane(a.x + i * a.pin, a.y + i * a.pout, a.R, a.C, a.Ro, a.Co, a.nr, a.nc,
                   a.sy, a.sx, a.py, a.px)


def _pool(bint is_max, str op, x, y, int nr, int nc, int stride_y, int stride_x,
          int pad_y, int pad_x):
    cdef cnp.ndarray ax, ay
    ax, ay = _check_pool(op, x, y, nr, nc, stride_y, stride_x, pad_y, pad_x)
    cdef isize NK = _dim(ax, 0) * _dim(ax, 1)
    cdef int R = <int>_dim(ax, 2), C = <int>_dim(ax, 3)
    cdef int Ro = <int>_dim(ay, 2), Co = <int>_dim(ay, 3)
    if NK == 0 or <isize>Ro * Co == 0:
        return
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    cdef isize i
    cdef isize pin = <isize>R * C, pout = <isize>Ro * Co
    cdef int nt = _threads_for(NK * pout * nr * nc, GRAIN)
    # separable max for windows wider than one pixel, rows that fit the stack
    cdef bint sep = nr * nc > 1 and <isize>(Co - 1) * stride_x + nc <= MAXROW
    cdef PoolArgs a
    a.x, a.y, a.R, a.C, a.Ro, a.Co, a.nr, a.nc = px, py, R, C, Ro, Co, nr, nc
    a.sy, a.sx, a.py, a.px, a.pin, a.pout = stride_y, stride_x, pad_y, pad_x, pin, pout
    a.kind = (2 if sep else 1) if is_max else 0
    # tasks of whole planes, at least GRAIN / 4 window reads each (a task per small plane
    # cost more in claiming it than in pooling it: 1280 planes of 7x7 took 76 us)
    a.NK = NK
    a.per = max(1, min(_ceil(NK, nt), (GRAIN // 4) // max(1, pout * nr * nc)))
    with nogil:
        if nt == 1:
            for i in range(NK):
                _pool_run(&a, i, 0)
        else:
            mdnn_parallel_for(_ceil(NK, a.per), nt, _pool_task, &a)


def max_pool(x, y, int nr, int nc, int stride_y, int stride_x, int pad_y, int pad_x):
    """y (N,K,Ro,Co) = max over the in-bounds part of each nr x nc window of x
    (N,K,R,C); padding is ignored, never counted as 0."""
    _pool(True, "max_pool", x, y, nr, nc, stride_y, stride_x, pad_y, pad_x)


def avg_pool(x, y, int nr, int nc, int stride_y, int stride_x, int pad_y, int pad_x):
    """y (N,K,Ro,Co) = mean over the in-bounds part of each nr x nc window of
    x (N,K,R,C) (the count excludes padding)."""
    _pool(False, "avg_pool", x, y, nr, nc, stride_y, stride_x, pad_y, pad_x)

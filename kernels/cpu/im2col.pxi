# im2col and col2im, shared by conv.pyx (the BLAS route of conv2d, conv2d_transpose),
# depthwise.pyx (the grouped route of conv2d_grouped) and grad.pyx (the backward
# convolutions); textually included. Tap (i, j) of output pixel (oy, ox) reads input
# (oy*sy - py + i*dy, ox*sx - px + j*dx): dy, dx are the dilations (1: a dense window).
# Output size: geometry.h's rule Ro = 1 + (R + 2*py - (dy*(nr-1) + 1)) // sy.

from libc.string cimport memset, memcpy


cdef inline int _cdiv(int a, int b) noexcept nogil:
    return (a + b - 1) // b


cdef void _im2col(const float* xn, float* col, int K, int R, int C,
                  int nr, int nc, int sy, int sx, int py, int px, int dy, int dx,
                  int Co, int p0, int pw, isize ld) noexcept nogil:
    """col (K*nr*nc rows, row stride ld): column t < pw holds the receptive
    field of output pixel p0+t (row-major over (oy, ox)) of sample xn
    (K, R, C), taps dilated by (dy, dx); zero padding."""
    cdef int k, i, j, p, oy, ox, iy, seg, t, lo, hi, a, e, ixs, jj
    cdef float* dst
    cdef const float* src
    for k in range(K):
        for i in range(nr):
            for j in range(nc):
                dst = col + ((k * nr + i) * nc + j) * ld
                jj = j * dx
                # valid ox range for this j: 0 <= ox*sx - px + j*dx < C
                lo = _cdiv(px - jj, sx) if px - jj > 0 else 0
                hi = (C - 1 + px - jj) // sx + 1 if C - 1 + px - jj >= 0 else 0
                if hi > Co:
                    hi = Co
                p = p0
                oy = p0 // Co
                ox = p0 - oy * Co
                while p < p0 + pw:
                    seg = Co - ox
                    if seg > p0 + pw - p:
                        seg = p0 + pw - p
                    iy = oy * sy - py + i * dy
                    if iy < 0 or iy >= R or hi <= lo:
                        memset(dst, 0, seg * sizeof(float))
                    else:
                        src = xn + (k * R + iy) * <isize>C
                        # [ox, ox+seg) = zeros [.., lo) copy [lo, hi) zeros [hi, ..),
                        # with ox <= a <= e <= ox+seg (a segment may start past hi:
                        # a chunk that begins near the end of an output row)
                        a = lo if lo > ox else ox
                        e = hi if hi < ox + seg else ox + seg
                        if e < ox:
                            e = ox
                        if a > e:
                            a = e
                        for t in range(ox, a):
                            dst[t - ox] = 0.0
                        ixs = a * sx - px + jj
                        if sx == 1:
                            if e > a:
                                memcpy(dst + (a - ox), src + ixs, (e - a) * sizeof(float))
                        else:
                            for t in range(a, e):
                                dst[t - ox] = src[ixs + (t - a) * sx]
                        for t in range(e, ox + seg):
                            dst[t - ox] = 0.0
                    dst += seg
                    p += seg
                    oy += 1
                    ox = 0


cdef void _im2col_full(const float* xn, float* col, int K, int R, int C, int nr, int nc,
                       int sy, int sx, int py, int px, int dy, int dx,
                       int Ro, int Co) noexcept nogil:
    """col (K*nr*nc, Ro*Co): row (k, i, j) holds x[k, oy*sy-py+i*dy, ox*sx-px+j*dx]
    (0 outside): _im2col over all Ro*Co output pixels."""
    _im2col(xn, col, K, R, C, nr, nc, sy, sx, py, px, dy, dx, Co, 0, Ro * Co, <isize>Ro * Co)


cdef void _col2im(const float* col, float* dxn, int K, int R, int C, int nr, int nc,
                  int sy, int sx, int py, int px, int dy, int dx,
                  int Ro, int Co) noexcept nogil:
    """dxn (K, R, C) = 0, then += every column entry at the pixel it was read from
    (the adjoint of _im2col_full with the same geometry and dilation)."""
    cdef int k, i, j, oy, ox, iy, ix
    cdef isize P = <isize>Ro * Co
    cdef const float* row
    cdef float* dst
    memset(dxn, 0, <isize>K * R * C * sizeof(float))
    for k in range(K):
        for i in range(nr):
            for j in range(nc):
                row = col + ((k * nr + i) * nc + j) * P
                for oy in range(Ro):
                    iy = oy * sy - py + i * dy
                    if iy < 0 or iy >= R:
                        continue
                    dst = dxn + (k * R + iy) * <isize>C
                    for ox in range(Co):
                        ix = ox * sx - px + j * dx
                        if 0 <= ix < C:
                            dst[ix] += row[oy * Co + ox]

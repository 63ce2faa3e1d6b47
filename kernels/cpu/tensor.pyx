# cython: language_level=3
"""CPU kernels of the catalogue's tensor and routing layers (minidnn/ops.py, section
"tensor and routing layers"): scalar and elementwise products, per-channel scales,
per-sample range copies (concat, extract), per-sample L2 normalisation, reorg
(space to depth), bilinear resizing with dlib's aligned corners, and dropout's
counter-hashed mask; with the training kernels of each.

Each kernel validates its arguments before touching memory (check.pxi), allocates
nothing, runs with the GIL released and uses OpenMP only when the tensor is large
enough to pay for a parallel region (GRAIN elements per thread)."""
include "check.pxi"

from cython.parallel cimport prange
from libc.string cimport memcpy, memmove, memset
from libc.math cimport floor, sqrt, ceil

# elements per thread below which a parallel region is not worth it
cdef isize GRAIN = 1 << 15
# contiguous block handed to one OpenMP iteration (elementwise kernels)
cdef isize BLOCK = 1 << 14
# chunk of one sample's sum of squares (float partial sums over at most CHUNK values)
cdef isize CHUNK = 1024
# columns of the bilinear tables kept on the stack (wider rows are done in pieces)
DEF TAB = 1024

cdef extern from *:
    """
    #define MDNN_GOLDEN 0x9E3779B97F4A7C15ULL
    #define MDNN_MIX1 0xBF58476D1CE4E5B9ULL
    #define MDNN_MIX2 0x94D049BB133111EBULL
    """
    unsigned long long MDNN_GOLDEN
    unsigned long long MDNN_MIX1
    unsigned long long MDNN_MIX2


# --------------------------------------------------------------------------- helpers
cdef inline isize _per_sample(cnp.ndarray a) noexcept:
    cdef isize n = _dim(a, 0)
    return cnp.PyArray_SIZE(a) // n if n else 0


cdef inline int _rank4(cnp.ndarray a, str what) except -1:
    if cnp.PyArray_NDIM(a) != 4:
        raise ValueError(f"{what}: expected 4 dimensions (N, K, R, C), got shape {_shape(a)}")
    return 0


# --------------------------------------------------------------------------- mul_scalar
cdef inline void _mul_scalar_block(const float* x, float* y, isize n, float v) noexcept nogil:
    cdef isize i
    for i in range(n):
        y[i] = x[i] * v


def mul_scalar(x, y, val):
    """y = val * x elementwise; same shapes; y may be x."""
    cdef float v = val
    cdef cnp.ndarray ax = _f32(x, "mul_scalar x")
    cdef cnp.ndarray ay = _f32(y, "mul_scalar y", True)
    if not _same_shape(ax, ay):
        raise ValueError(f"mul_scalar: y has shape {_shape(ay)}, x has {_shape(ax)}")
    _same_or_disjoint(ay, ax, "mul_scalar")
    cdef isize n = cnp.PyArray_SIZE(ax), nb = (n + BLOCK - 1) // BLOCK, i, o
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    cdef int nt = _threads_for(n, GRAIN)
    with nogil:
        if nt == 1:
            _mul_scalar_block(px, py, n, v)
        else:
            for i in prange(nb, num_threads=nt, schedule="static"):
                o = i * BLOCK
                _mul_scalar_block(px + o, py + o, min(BLOCK, n - o), v)


# --------------------------------------------------------------------------- mul
cdef inline void _mul_block(const float* a, const float* b, float* y, isize n) noexcept nogil:
    cdef isize i
    for i in range(n):
        y[i] = a[i] * b[i]


cdef void _mul_row(const float* a, isize la, const float* b, isize lb, float* y,
                   isize n) noexcept nogil:
    """y[c] = a[c] * b[c] for c < min(la, lb) (la, lb: the valid lengths of the rows, 0 when
    the row is outside the operand), 0 for the rest of the n columns."""
    cdef isize c, m = min(min(la, lb), n)
    for c in range(m):
        y[c] = a[c] * b[c]
    for c in range(m, n):
        y[c] = 0.0


def mul(a, b, y):
    """y[n,k,r,c] = a[n,k,r,c] * b[n,k,r,c] for every index of y (N,K,R,C), an operand
    without that index counting as 0 (dlib's multiply_zero_padded); a, b, y may all have
    different shapes. With one shape for all three, y may be a or b."""
    cdef cnp.ndarray aa = _f32_nd(a, "mul a", 4)
    cdef cnp.ndarray ab = _f32_nd(b, "mul b", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "mul y", 4, True)
    cdef const float* pa = _ptr(aa)
    cdef const float* pb = _ptr(ab)
    cdef float* py = _ptr(ay)
    cdef isize n = cnp.PyArray_SIZE(ay), nb, i, o
    cdef int nt = _threads_for(n, GRAIN)
    if _same_shape(aa, ay) and _same_shape(ab, ay):
        _same_or_disjoint(ay, aa, "mul")
        _same_or_disjoint(ay, ab, "mul")
        nb = (n + BLOCK - 1) // BLOCK
        with nogil:
            if nt == 1:
                _mul_block(pa, pb, py, n)
            else:
                for i in prange(nb, num_threads=nt, schedule="static"):
                    o = i * BLOCK
                    _mul_block(pa + o, pb + o, py + o, min(BLOCK, n - o))
        return
    _no_alias(ay, aa, "mul (operands of other shapes than y)")
    _no_alias(ay, ab, "mul (operands of other shapes than y)")
    cdef isize N = _dim(ay, 0), K = _dim(ay, 1), R = _dim(ay, 2), C = _dim(ay, 3)
    cdef isize Ka = _dim(aa, 1), Ra = _dim(aa, 2), Ca = _dim(aa, 3), Na = _dim(aa, 0)
    cdef isize Kb = _dim(ab, 1), Rb = _dim(ab, 2), Cb = _dim(ab, 3), Nb = _dim(ab, 0)
    cdef isize rows = N * K * R, t, nn, kk, rr, la, lb
    cdef const float* ra
    cdef const float* rb
    nt = _threads_for(n, GRAIN)
    with nogil:
        for t in prange(rows, num_threads=nt, schedule="static"):
            rr = t % R
            kk = (t // R) % K
            nn = t // (R * K)
            la = 0
            lb = 0
            ra = pa
            rb = pb
            if nn < Na and kk < Ka and rr < Ra:
                la = Ca
                ra = pa + ((nn * Ka + kk) * Ra + rr) * Ca
            if nn < Nb and kk < Kb and rr < Rb:
                lb = Cb
                rb = pb + ((nn * Kb + kk) * Rb + rr) * Cb
            _mul_row(ra, la, rb, lb, py + t * C, C)


# --------------------------------------------------------------------------- scale_channels
cdef inline void _scale_plane(const float* x, float* y, isize n, float s) noexcept nogil:
    cdef isize i
    for i in range(n):
        y[i] = x[i] * s


def scale_channels(x, s, y):
    """y[n,k,r,c] = x[n,k,r,c] * s[n,k] for x, y (N,K,R,C) and s (N,K,1,1); y may be x."""
    cdef cnp.ndarray ax = _f32_nd(x, "scale_channels x", 4)
    cdef cnp.ndarray asc = _f32_nd(s, "scale_channels s", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "scale_channels y", 4, True)
    if not _same_shape(ax, ay):
        raise ValueError(f"scale_channels: y has shape {_shape(ay)}, x has {_shape(ax)}")
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), P = _dim(ax, 2) * _dim(ax, 3), i
    if _dim(asc, 0) != N or _dim(asc, 1) != K or _dim(asc, 2) != 1 or _dim(asc, 3) != 1:
        raise ValueError(f"scale_channels: s must have shape ({N}, {K}, 1, 1), got {_shape(asc)}")
    _same_or_disjoint(ay, ax, "scale_channels")
    _no_alias(ay, asc, "scale_channels")
    cdef const float* px = _ptr(ax)
    cdef const float* ps = _ptr(asc)
    cdef float* py = _ptr(ay)
    cdef int nt = _threads_for(N * K * P, GRAIN)
    with nogil:
        if nt == 1:
            for i in range(N * K):
                _scale_plane(px + i * P, py + i * P, P, ps[i])
        else:
            for i in prange(N * K, num_threads=nt, schedule="static"):
                _scale_plane(px + i * P, py + i * P, P, ps[i])


cdef inline float _dot_plane(const float* a, const float* b, isize n) noexcept nogil:
    cdef double s = 0.0
    cdef isize i
    for i in range(n):
        s += <double>a[i] * b[i]
    return <float>s


def dot_channels(a, b, y):
    """y[n,k,0,0] = sum over (r, c) of a[n,k,r,c] * b[n,k,r,c]; a, b (N,K,R,C), y (N,K,1,1)."""
    cdef cnp.ndarray aa = _f32_nd(a, "dot_channels a", 4)
    cdef cnp.ndarray ab = _f32_nd(b, "dot_channels b", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "dot_channels y", 4, True)
    if not _same_shape(aa, ab):
        raise ValueError(f"dot_channels: a has shape {_shape(aa)}, b has {_shape(ab)}")
    cdef isize N = _dim(aa, 0), K = _dim(aa, 1), P = _dim(aa, 2) * _dim(aa, 3), i
    if _dim(ay, 0) != N or _dim(ay, 1) != K or _dim(ay, 2) != 1 or _dim(ay, 3) != 1:
        raise ValueError(f"dot_channels: y must have shape ({N}, {K}, 1, 1), got {_shape(ay)}")
    _no_alias(ay, aa, "dot_channels")
    _no_alias(ay, ab, "dot_channels")
    cdef const float* pa = _ptr(aa)
    cdef const float* pb = _ptr(ab)
    cdef float* py = _ptr(ay)
    cdef int nt = _threads_for(N * K * P, GRAIN)
    with nogil:
        if nt == 1:
            for i in range(N * K):
                py[i] = _dot_plane(pa + i * P, pb + i * P, P)
        else:
            for i in prange(N * K, num_threads=nt, schedule="static"):
                py[i] = _dot_plane(pa + i * P, pb + i * P, P)


# --------------------------------------------------------------------------- copy_range
def copy_range(x, y, x_offset, y_offset, count):
    """For each sample n: y[n].flat[y_offset : y_offset+count] = x[n].flat[x_offset : ...];
    the rest of y is left as it is. x and y have the same number of samples (dimension 0).
    They may share memory only with one sample (the copy is then a memmove)."""
    cdef cnp.ndarray ax = _f32(x, "copy_range x")
    cdef cnp.ndarray ay = _f32(y, "copy_range y", True)
    if cnp.PyArray_NDIM(ax) < 1 or cnp.PyArray_NDIM(ay) < 1 or _dim(ax, 0) != _dim(ay, 0):
        raise ValueError(f"copy_range: x {_shape(ax)} and y {_shape(ay)} must have the same "
                         f"number of samples (dimension 0)")
    cdef isize xo = x_offset, yo = y_offset, cnt = count
    if xo < 0 or yo < 0 or cnt < 0:
        raise ValueError(f"copy_range: offsets and count must be >= 0, got {xo}, {yo}, {cnt}")
    cdef isize N = _dim(ax, 0), Dx = _per_sample(ax), Dy = _per_sample(ay), n
    if xo + cnt > Dx or yo + cnt > Dy:
        raise ValueError(f"copy_range: range [{xo}, {xo + cnt}) of x's {Dx} values per sample "
                         f"or [{yo}, {yo + cnt}) of y's {Dy} does not fit")
    cdef bint overlap = _overlap(ax, ay)
    if overlap and N != 1:
        raise ValueError("copy_range: x and y share memory (allowed with one sample only)")
    if cnt == 0 or N == 0:
        return
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    cdef size_t nbytes = cnt * sizeof(float)
    cdef int nt = _threads_for(N * cnt, GRAIN)
    with nogil:
        if overlap:
            memmove(py + yo, px + xo, nbytes)
        elif nt == 1 or N == 1:
            for n in range(N):
                memcpy(py + n * Dy + yo, px + n * Dx + xo, nbytes)
        else:
            for n in prange(N, num_threads=nt, schedule="static"):
                memcpy(py + n * Dy + yo, px + n * Dx + xo, nbytes)


# --------------------------------------------------------------------------- l2normalize
cdef double _sumsq(const float* p, isize n) noexcept nogil:
    """sum of p[i]^2 for n <= CHUNK values: 16 float lanes (vectorised), summed in double."""
    cdef float acc[16]
    cdef isize i, j, m = n - n % 16
    cdef double s = 0.0
    for j in range(16):
        acc[j] = 0.0
    i = 0
    while i < m:
        for j in range(16):
            acc[j] += p[i + j] * p[i + j]
        i += 16
    for j in range(16):
        s += acc[j]
    for i in range(m, n):
        s += <double>p[i] * p[i]
    return s


cdef double _sample_sumsq(const float* p, isize D) noexcept nogil:
    cdef double s = 0.0
    cdef isize c = 0
    while c < D:
        s += _sumsq(p + c, min(CHUNK, D - c))
        c += CHUNK
    return s


cdef void _l2_sample(const float* x, float* y, isize D, double eps) noexcept nogil:
    cdef float inv = <float>(1.0 / sqrt(_sample_sumsq(x, D) + eps))
    _mul_scalar_block(x, y, D, inv)


def l2normalize(x, y, eps):
    """y[n] = x[n] / sqrt(eps + sum of x[n]^2) for each sample n of x, y (N,K,R,C) (dlib's
    tt::inverse_norms then scale_rows); y may be x."""
    cdef double e = eps
    cdef cnp.ndarray ax = _f32_nd(x, "l2normalize x", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "l2normalize y", 4, True)
    if not _same_shape(ax, ay):
        raise ValueError(f"l2normalize: y has shape {_shape(ay)}, x has {_shape(ax)}")
    _same_or_disjoint(ay, ax, "l2normalize")
    cdef isize N = _dim(ax, 0), D = _per_sample(ax), n, c, nch
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    cdef int nt = _threads_for(N * D, GRAIN)
    cdef double s
    cdef float inv
    if N * D == 0:
        return
    with nogil:
        if nt == 1:
            for n in range(N):
                _l2_sample(px + n * D, py + n * D, D, e)
        elif N >= nt:
            for n in prange(N, num_threads=nt, schedule="static"):
                _l2_sample(px + n * D, py + n * D, D, e)
        else:
            # few large samples: each sample's sum and scaling split over the threads
            nch = (D + CHUNK - 1) // CHUNK
            for n in range(N):
                s = 0.0
                for c in prange(nch, num_threads=nt, schedule="static"):
                    s += _sumsq(px + n * D + c * CHUNK, min(CHUNK, D - c * CHUNK))
                inv = <float>(1.0 / sqrt(s + e))
                for c in prange(nch, num_threads=nt, schedule="static"):
                    _mul_scalar_block(px + n * D + c * CHUNK, py + n * D + c * CHUNK,
                                      min(CHUNK, D - c * CHUNK), inv)


cdef void _l2_grad_sample(const float* x, const float* y, const float* dy, float* dx,
                          isize D, double eps) noexcept nogil:
    cdef double d = 0.0
    cdef isize i
    for i in range(D):
        d += <double>dy[i] * y[i]
    cdef float inv = <float>(1.0 / sqrt(_sample_sumsq(x, D) + eps))
    cdef float fd = <float>d
    for i in range(D):
        dx[i] = (dy[i] - y[i] * fd) * inv


def l2normalize_grad(x, y, dy, dx, eps):
    """The backward of l2normalize (dlib's dot_prods and scale_rows2): per sample,
    dx = (dy - y * sum(dy * y)) / sqrt(eps + sum x^2); dx may be dy."""
    cdef double e = eps
    cdef cnp.ndarray ax = _f32_nd(x, "l2normalize_grad x", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "l2normalize_grad y", 4)
    cdef cnp.ndarray ady = _f32_nd(dy, "l2normalize_grad dy", 4)
    cdef cnp.ndarray adx = _f32_nd(dx, "l2normalize_grad dx", 4, True)
    if not (_same_shape(ax, ay) and _same_shape(ax, ady) and _same_shape(ax, adx)):
        raise ValueError(f"l2normalize_grad: shapes differ: x {_shape(ax)}, y {_shape(ay)}, "
                         f"dy {_shape(ady)}, dx {_shape(adx)}")
    _no_alias(adx, ax, "l2normalize_grad")
    _no_alias(adx, ay, "l2normalize_grad")
    _same_or_disjoint(adx, ady, "l2normalize_grad")
    cdef isize N = _dim(ax, 0), D = _per_sample(ax), n
    cdef const float* px = _ptr(ax)
    cdef const float* pyy = _ptr(ay)
    cdef const float* pdy = _ptr(ady)
    cdef float* pdx = _ptr(adx)
    cdef int nt = min(_threads_for(N * D, GRAIN), <int>max(N, 1))
    with nogil:
        if nt <= 1:
            for n in range(N):
                _l2_grad_sample(px + n * D, pyy + n * D, pdy + n * D, pdx + n * D, D, e)
        else:
            for n in prange(N, num_threads=nt, schedule="static"):
                _l2_grad_sample(px + n * D, pyy + n * D, pdy + n * D, pdx + n * D, D, e)


# --------------------------------------------------------------------------- reorg
cdef inline int _reorg_shapes(cnp.ndarray ax, cnp.ndarray ay, isize rs, isize cs,
                              str what) except -1:
    """ax is the (N,K,R,C) side, ay the (N,K*rs*cs,R/rs,C/cs) side."""
    if rs < 1 or cs < 1:
        raise ValueError(f"{what}: row_stride and col_stride must be >= 1, got {rs}, {cs}")
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), R = _dim(ax, 2), C = _dim(ax, 3)
    if R % rs or C % cs:
        raise ValueError(f"{what}: the input's rows and columns {R, C} must be multiples of "
                         f"the strides {rs, cs}")
    if _dim(ay, 0) != N or _dim(ay, 1) != K * rs * cs or _dim(ay, 2) != R // rs or \
            _dim(ay, 3) != C // cs:
        raise ValueError(f"{what}: expected the shape ({N}, {K * rs * cs}, {R // rs}, "
                         f"{C // cs}) for an input {_shape(ax)}, got {_shape(ay)}")
    _no_alias(ay, ax, what)
    return 0


cdef void _reorg_plane(const float* x, float* y, isize R, isize C, isize Ro, isize Co,
                       isize dr, isize dc, isize rs, isize cs, bint back) noexcept nogil:
    """One output plane: y[r, c] = x[r*rs + dr, c*cs + dc] (back: the other way round)."""
    cdef isize r, c
    cdef const float* xr
    cdef float* xw
    cdef float* yr
    cdef const float* yc
    if not back:
        for r in range(Ro):
            xr = x + (r * rs + dr) * C + dc
            yr = y + r * Co
            for c in range(Co):
                yr[c] = xr[c * cs]
    else:
        for r in range(Ro):
            xw = <float*>x + (r * rs + dr) * C + dc
            yc = y + r * Co
            for c in range(Co):
                xw[c * cs] = yc[c]


cdef void _reorg_run(float* x, float* y, isize N, isize K, isize R, isize C, isize rs,
                     isize cs, bint back) noexcept nogil:
    cdef isize Ko = K * rs * cs, Ro = R // rs, Co = C // cs, t, n, ko, j, k
    cdef int nt = _threads_for(N * K * R * C, GRAIN)
    if nt == 1:
        for t in range(N * Ko):
            n = t // Ko
            ko = t % Ko
            j = ko // K
            k = ko % K
            _reorg_plane(x + (n * K + k) * R * C, y + t * Ro * Co, R, C, Ro, Co,
                         j // cs, j % cs, rs, cs, back)
    else:
        for t in prange(N * Ko, num_threads=nt, schedule="static"):
            n = t // Ko
            ko = t % Ko
            j = ko // K
            k = ko % K
            _reorg_plane(x + (n * K + k) * R * C, y + t * Ro * Co, R, C, Ro, Co,
                         j // cs, j % cs, rs, cs, back)


def reorg(x, y, row_stride, col_stride):
    """dlib's reorg (space to depth): x (N,K,R,C) -> y (N, K*rs*cs, R/rs, C/cs) with
    y[n, (dr*cs + dc)*K + k, r, c] = x[n, k, r*rs + dr, c*cs + dc]."""
    cdef isize rs = row_stride, cs = col_stride
    cdef cnp.ndarray ax = _f32_nd(x, "reorg x", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "reorg y", 4, True)
    _reorg_shapes(ax, ay, rs, cs, "reorg")
    cdef float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), R = _dim(ax, 2), C = _dim(ax, 3)
    with nogil:
        _reorg_run(px, py, N, K, R, C, rs, cs, False)


def reorg_grad(dy, dx, row_stride, col_stride):
    """The backward of reorg (dlib's reorg_gradient): dx (N,K,R,C) from dy
    (N, K*rs*cs, R/rs, C/cs); reorg is a permutation, so every dx value is one dy value."""
    cdef isize rs = row_stride, cs = col_stride
    cdef cnp.ndarray ady = _f32_nd(dy, "reorg_grad dy", 4)
    cdef cnp.ndarray adx = _f32_nd(dx, "reorg_grad dx", 4, True)
    _reorg_shapes(adx, ady, rs, cs, "reorg_grad")
    cdef float* px = _ptr(adx)
    cdef float* py = _ptr(ady)
    cdef isize N = _dim(adx, 0), K = _dim(adx, 1), R = _dim(adx, 2), C = _dim(adx, 3)
    with nogil:
        _reorg_run(px, py, N, K, R, C, rs, cs, True)


# --------------------------------------------------------------------------- resize_bilinear
cdef inline double _bl_scale(isize n_in, isize n_out) noexcept nogil:
    """dlib's resize_image: (in - 1) / max(out - 1, 1): the corners are aligned."""
    return (n_in - 1) / <double>(n_out - 1 if n_out > 1 else 1)


cdef inline void _bl_pos(isize i, double scale, isize n_in, isize* lo, isize* hi,
                         float* frac) noexcept nogil:
    """Output index i reads input positions lo and hi = min(lo + 1, n_in - 1) with weight
    frac on hi: the source coordinate is i * scale (dlib's resize_image)."""
    cdef double p = i * scale
    cdef isize l = <isize>floor(p)
    if l > n_in - 1:
        l = n_in - 1
    if l < 0:
        l = 0
    lo[0] = l
    hi[0] = l + 1 if l + 1 < n_in else n_in - 1
    frac[0] = <float>(p - l)


cdef inline void _bl_hrow(const float* xr, float* h, const isize* cl, const isize* cr,
                          const float* cf, isize w) noexcept nogil:
    """One input row interpolated horizontally at the w columns of the tables."""
    cdef isize c
    for c in range(w):
        h[c] = xr[cl[c]] + cf[c] * (xr[cr[c]] - xr[cl[c]])


cdef void _bl_plane(const float* x, float* y, isize R, isize C, isize Ro, isize Co,
                    double sy, double sx) noexcept nogil:
    """Separably, by column chunks of TAB: each input row a chunk needs is interpolated
    horizontally once (rows ha, hb, reused by consecutive output rows), then each output
    row is the vertical lerp of two of them (a vectorised loop)."""
    cdef isize cl[TAB]
    cdef isize cr[TAB]
    cdef float cf[TAB]
    cdef float bufa[TAB]
    cdef float bufb[TAB]
    cdef float* ha
    cdef float* hb
    cdef float* tmp
    cdef isize c0, w, c, r, top, bot, ra, rb
    cdef float ty
    cdef float* yr
    c0 = 0
    while c0 < Co:
        w = min(<isize>TAB, Co - c0)
        for c in range(w):
            _bl_pos(c0 + c, sx, C, &cl[c], &cr[c], &cf[c])
        ha, hb = bufa, bufb
        ra, rb = -1, -1                   # the input rows ha and hb hold
        for r in range(Ro):
            _bl_pos(r, sy, R, &top, &bot, &ty)
            if ra != top:
                if rb == top:
                    tmp, ha, hb = ha, hb, ha
                    ra, rb = rb, ra
                else:
                    _bl_hrow(x + top * C, ha, cl, cr, cf, w)
                    ra = top
            if rb != bot:
                _bl_hrow(x + bot * C, hb, cl, cr, cf, w)
                rb = bot
            yr = y + r * Co + c0
            for c in range(w):
                yr[c] = ha[c] + ty * (hb[c] - ha[c])
        c0 += TAB


cdef void _bl_grad_plane(const float* dy, float* dx, isize R, isize C, isize Ro, isize Co,
                         double sy, double sx) noexcept nogil:
    cdef isize cl[TAB]
    cdef isize cr[TAB]
    cdef float cf[TAB]
    cdef isize c0, w, c, r, top, bot
    cdef float ty, g, gt, gb
    cdef float* xt
    cdef float* xb
    cdef const float* yr
    memset(dx, 0, R * C * sizeof(float))
    c0 = 0
    while c0 < Co:
        w = min(<isize>TAB, Co - c0)
        for c in range(w):
            _bl_pos(c0 + c, sx, C, &cl[c], &cr[c], &cf[c])
        for r in range(Ro):
            _bl_pos(r, sy, R, &top, &bot, &ty)
            xt = dx + top * C
            xb = dx + bot * C
            yr = dy + r * Co + c0
            for c in range(w):
                g = yr[c]
                gt = g * (1 - ty)
                gb = g * ty
                xt[cl[c]] += gt * (1 - cf[c])
                xt[cr[c]] += gt * cf[c]
                xb[cl[c]] += gb * (1 - cf[c])
                xb[cr[c]] += gb * cf[c]
        c0 += TAB


cdef inline int _bl_shapes(cnp.ndarray small, cnp.ndarray big, str what) except -1:
    if _dim(small, 0) != _dim(big, 0) or _dim(small, 1) != _dim(big, 1):
        raise ValueError(f"{what}: x {_shape(small)} and y {_shape(big)} must have the same "
                         f"samples and channels (N, K)")
    _no_alias(big, small, what)
    return 0


def resize_bilinear(x, y):
    """Bilinear resize of each (n, k) plane of x (N,K,R,C) to y (N,K,Ro,Co), corners aligned
    as dlib's resize_image: output (i, j) samples input (i*sy, j*sx) with
    sy = (R-1)/max(Ro-1, 1), sx = (C-1)/max(Co-1, 1)."""
    cdef cnp.ndarray ax = _f32_nd(x, "resize_bilinear x", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "resize_bilinear y", 4, True)
    _bl_shapes(ax, ay, "resize_bilinear")
    cdef isize NK = _dim(ax, 0) * _dim(ax, 1), R = _dim(ax, 2), C = _dim(ax, 3)
    cdef isize Ro = _dim(ay, 2), Co = _dim(ay, 3), i
    cdef double sy = _bl_scale(R, Ro), sx = _bl_scale(C, Co)
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    cdef int nt = _threads_for(NK * Ro * Co, GRAIN // 2)
    if NK * Ro * Co == 0 or R * C == 0:
        return
    with nogil:
        if nt == 1:
            for i in range(NK):
                _bl_plane(px + i * R * C, py + i * Ro * Co, R, C, Ro, Co, sy, sx)
        else:
            for i in prange(NK, num_threads=nt, schedule="static"):
                _bl_plane(px + i * R * C, py + i * Ro * Co, R, C, Ro, Co, sy, sx)


def resize_bilinear_grad(dy, dx):
    """The backward of resize_bilinear: dx (N,K,R,C) = the transpose of the resize applied
    to dy (N,K,Ro,Co) (dlib's resize_bilinear_gradient)."""
    cdef cnp.ndarray ady = _f32_nd(dy, "resize_bilinear_grad dy", 4)
    cdef cnp.ndarray adx = _f32_nd(dx, "resize_bilinear_grad dx", 4, True)
    _bl_shapes(adx, ady, "resize_bilinear_grad")
    cdef isize NK = _dim(adx, 0) * _dim(adx, 1), R = _dim(adx, 2), C = _dim(adx, 3)
    cdef isize Ro = _dim(ady, 2), Co = _dim(ady, 3), i
    cdef double sy = _bl_scale(R, Ro), sx = _bl_scale(C, Co)
    cdef const float* pdy = _ptr(ady)
    cdef float* pdx = _ptr(adx)
    cdef int nt = _threads_for(NK * Ro * Co, GRAIN // 2)
    if NK * R * C == 0:
        return
    with nogil:
        if nt == 1:
            for i in range(NK):
                _bl_grad_plane(pdy + i * Ro * Co, pdx + i * R * C, R, C, Ro, Co, sy, sx)
        else:
            for i in prange(NK, num_threads=nt, schedule="static"):
                _bl_grad_plane(pdy + i * Ro * Co, pdx + i * R * C, R, C, Ro, Co, sy, sx)


# --------------------------------------------------------------------------- dropout
cdef inline unsigned long long _mix(unsigned long long z) noexcept nogil:
    """splitmix64's finaliser."""
    z = (z ^ (z >> 30)) * MDNN_MIX1
    z = (z ^ (z >> 27)) * MDNN_MIX2
    return z ^ (z >> 31)


cdef void _dropout_block(const float* x, float* y, float* m, isize n, isize i0,
                         unsigned long long key, unsigned long long thr) noexcept nogil:
    cdef isize i
    cdef float keep
    for i in range(n):
        keep = 1.0 if (_mix(key + <unsigned long long>(i0 + i + 1) * MDNN_GOLDEN) >> 40) >= thr \
            else 0.0
        m[i] = keep
        y[i] = x[i] * keep


def dropout_train(x, y, mask, drop_rate, key):
    """Dropout's training forward: for each flat index i of x, u_i = the top 24 bits of
    splitmix64(key + (i+1) * 0x9E3779B97F4A7C15) (an integer in [0, 2^24)); mask[i] = 1 if
    u_i >= ceil(drop_rate * 2^24) else 0, and y = x * mask (dlib's dropout_: no rescaling).
    The mask depends only on (key, i): the same for every thread count."""
    cdef double p = drop_rate
    cdef unsigned long long k = key
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"dropout_train: drop_rate must be in [0, 1], got {drop_rate!r}")
    cdef cnp.ndarray ax = _f32(x, "dropout_train x")
    cdef cnp.ndarray ay = _f32(y, "dropout_train y", True)
    cdef cnp.ndarray am = _f32(mask, "dropout_train mask", True)
    if not _same_shape(ax, ay) or not _same_shape(ax, am):
        raise ValueError(f"dropout_train: shapes differ: x {_shape(ax)}, y {_shape(ay)}, "
                         f"mask {_shape(am)}")
    _same_or_disjoint(ay, ax, "dropout_train")
    _no_alias(am, ax, "dropout_train")
    _no_alias(am, ay, "dropout_train")
    cdef unsigned long long thr = <unsigned long long>ceil(p * 16777216.0)
    cdef isize n = cnp.PyArray_SIZE(ax), nb = (n + BLOCK - 1) // BLOCK, i, o
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    cdef float* pm = _ptr(am)
    cdef int nt = _threads_for(n, GRAIN // 4)
    with nogil:
        if nt == 1:
            _dropout_block(px, py, pm, n, 0, k, thr)
        else:
            for i in prange(nb, num_threads=nt, schedule="static"):
                o = i * BLOCK
                _dropout_block(px + o, py + o, pm + o, min(BLOCK, n - o), o, k, thr)

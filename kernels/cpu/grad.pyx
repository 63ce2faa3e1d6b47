# cython: language_level=3
"""Training kernels for the CPU: backward passes, batch-norm in training mode,
the losses and the solver updates.

Shapes follow docs/INTERNALS.md: float32, C-contiguous, (N, K, R, C); the
caller preallocates every output. Gradients are *written*, never
accumulated into (the trainer adds the gradients that meet at a tag).

Threading and determinism: OpenMP over samples, channels or planes, always
with a static partition that depends only on the shapes and the number of
threads, and reductions over samples (conv/fc parameter gradients) are
summed per partition and then added in partition order. The same inputs
and thread count therefore give bit-identical results on every run, which
is what lets an interrupted training resume exactly. sgemm is scipy's BLAS,
pinned to one thread by backends/cpu.py (each OpenMP thread calls its own).

Workspace: one grow-only buffer per module (im2col columns and per-thread
partial sums), see workspace.pxi.
"""
include "check.pxi"
include "act.pxi"

from cython.parallel cimport prange
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from libc.math cimport sqrt, exp, log, isfinite
from scipy.linalg.cython_blas cimport sgemm

# elements below which a parallel region costs more than it saves
cdef isize GRAIN = 1 << 15

include "workspace.pxi"


cdef inline isize _round16(isize n) noexcept nogil:
    return (n + 15) // 16 * 16


cdef inline int _nthreads(double work, isize parts) noexcept nogil:
    """Threads for `work` flops split in `parts` independent pieces."""
    cdef int nt = _threads()
    if work < 200000.0:
        return 1
    if parts < nt:
        return <int>parts if parts > 0 else 1
    return nt


include "im2col.pxi"


# ------------------------------------------------------------------ conv2d

cdef struct ConvG:
    const float* x
    const float* w
    const float* dy
    float* dx
    float* dw
    float* db
    float* ws
    isize ws_per
    int N, K, R, C, F, nr, nc, sy, sx, py, px, Ro, Co, P, KRS, nparts
    bint direct


cdef tuple _conv_shapes(str op, cnp.ndarray ax, cnp.ndarray aw, cnp.ndarray ady,
                        int sy, int sx, int py, int px):
    """Validate (N,K,R,C) x, (F,K,nr,nc) w and (N,F,Ro,Co) dy; return the sizes."""
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), R = _dim(ax, 2), C = _dim(ax, 3)
    cdef isize F = _dim(aw, 0), nr = _dim(aw, 2), nc = _dim(aw, 3)
    if sy < 1 or sx < 1 or py < 0 or px < 0:
        raise ValueError(f"{op}: strides must be >= 1 and pads >= 0, got "
                         f"stride ({sy}, {sx}) pad ({py}, {px})")
    if _dim(aw, 1) != K:
        raise ValueError(f"{op}: w {_shape(aw)} does not match x {_shape(ax)} (channels)")
    if nr < 1 or nc < 1 or nr > R + 2 * py or nc > C + 2 * px:
        raise ValueError(f"{op}: filter {nr}x{nc} does not fit the padded input {R}x{C}")
    cdef isize Ro = mdnn_out_size(R, nr, sy, py, 1), Co = mdnn_out_size(C, nc, sx, px, 1)
    if _dim(ady, 0) != N or _dim(ady, 1) != F or _dim(ady, 2) != Ro or _dim(ady, 3) != Co:
        raise ValueError(f"{op}: dy has shape {_shape(ady)}, expected {(N, F, Ro, Co)}")
    for v in (N, K * R * C, F * Ro * Co, K * nr * nc * Ro * Co, F * K * nr * nc):
        _check_int(v, op)
    return N, K, R, C, F, nr, nc, Ro, Co


cdef void _conv_fill(ConvG* a, tuple s, int sy, int sx, int py, int px):
    a.N, a.K, a.R, a.C, a.F, a.nr, a.nc, a.Ro, a.Co = s
    a.sy = sy; a.sx = sx; a.py = py; a.px = px
    a.P = a.Ro * a.Co
    a.KRS = a.K * a.nr * a.nc
    a.direct = a.nr == 1 and a.nc == 1 and sy == 1 and sx == 1 and py == 0 and px == 0


cdef void _conv_data_task(const ConvG* a, int n, int part) noexcept nogil:
    cdef float one = 1.0, zero = 0.0
    cdef float* dxn = a.dx + <isize>n * a.K * a.R * a.C
    cdef float* col = dxn if a.direct else a.ws + part * a.ws_per
    cdef int P = a.P, KRS = a.KRS, F = a.F
    # column-major: col^T (P x KRS) = dy_n^T (P x F) * w (F x KRS)
    sgemm(b"N", b"T", &P, &KRS, &F, &one, <float*>a.dy + <isize>n * a.F * a.P, &P,
          <float*>a.w, &KRS, &zero, col, &P)
    if not a.direct:
        _col2im(col, dxn, a.K, a.R, a.C, a.nr, a.nc, a.sy, a.sx, a.py, a.px, 1, 1, a.Ro, a.Co)


def conv2d_grad_data(dy, w, dx, int stride_y, int stride_x, int pad_y, int pad_x):
    """dx (N,K,R,C) = the gradient of sum(dy * conv2d(x, w)) with respect to x,
    for dy (N,F,Ro,Co) and w (F,K,nr,nc) (the transposed convolution of dy)."""
    cdef cnp.ndarray ady = _f32_nd(dy, "conv2d_grad_data dy", 4)
    cdef cnp.ndarray aw = _f32_nd(w, "conv2d_grad_data w", 4)
    cdef cnp.ndarray adx = _f32_nd(dx, "conv2d_grad_data dx", 4, True)
    s = _conv_shapes("conv2d_grad_data", adx, aw, ady, stride_y, stride_x, pad_y, pad_x)
    _no_alias(adx, ady, "conv2d_grad_data")
    _no_alias(adx, aw, "conv2d_grad_data")
    cdef ConvG a
    _conv_fill(&a, s, stride_y, stride_x, pad_y, pad_x)
    if a.N == 0:
        return
    if a.F == 0 or a.P == 0:
        memset(_ptr(adx), 0, cnp.PyArray_NBYTES(adx))
        return
    a.dy = _ptr(ady); a.w = _ptr(aw); a.dx = _ptr(adx)
    cdef int nt = _nthreads(<double>a.N * a.F * a.P * a.KRS, a.N)
    a.ws_per = 0 if a.direct else _round16(<isize>a.KRS * a.P)
    cdef bint private = False
    cdef float* ws = _workspace_acquire(<size_t>(a.ws_per * nt), &private)
    a.ws = ws
    cdef int t, n, lo, hi, chunk = (a.N + nt - 1) // nt
    try:
        with nogil:
            for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
                lo = t * chunk
                hi = min(lo + chunk, a.N)
                for n in range(lo, hi):
                    _conv_data_task(&a, n, t)
    finally:
        _workspace_release(ws, private)


cdef void _conv_param_part(const ConvG* a, int part, int lo, int hi) noexcept nogil:
    """Partial sums over samples [lo, hi) into this part's (F*KRS + F) slot
    (part 0 writes straight into dw, db)."""
    cdef float one = 1.0
    cdef float* slot = a.ws + part * a.ws_per
    cdef float* col = slot
    cdef float* dw = a.dw
    cdef float* db = a.db
    cdef int n, f, p, P = a.P, KRS = a.KRS, F = a.F
    cdef const float* dyn
    cdef double acc
    if a.direct:
        col = NULL
    else:
        col = slot
        slot = slot + _round16(<isize>a.KRS * a.P)
    if part > 0:
        dw = slot
        db = slot + _round16(<isize>a.F * a.KRS) if a.db != NULL else NULL
    memset(dw, 0, <isize>F * KRS * sizeof(float))
    if db != NULL:
        memset(db, 0, F * sizeof(float))
    for n in range(lo, hi):
        dyn = a.dy + <isize>n * F * P
        if a.direct:
            col = <float*>a.x + <isize>n * a.K * a.R * a.C
        else:
            _im2col_full(a.x + <isize>n * a.K * a.R * a.C, col, a.K, a.R, a.C, a.nr, a.nc,
                    a.sy, a.sx, a.py, a.px, 1, 1, a.Ro, a.Co)
        # column-major: dw^T (KRS x F) += col_n (KRS x P) * dy_n^T (P x F)
        sgemm(b"T", b"N", &KRS, &F, &P, &one, col, &P, <float*>dyn, &P, &one, dw, &KRS)
        if db != NULL:
            for f in range(F):
                acc = 0.0
                for p in range(P):
                    acc = acc + dyn[<isize>f * P + p]
                db[f] = db[f] + <float>acc


def conv2d_grad_params(x, dy, dw, db, int stride_y, int stride_x, int pad_y, int pad_x):
    """dw (F,K,nr,nc) = the gradient of sum(dy * conv2d(x, w)) with respect to w,
    db (F,) = sum of dy over samples and pixels (skipped when db is None);
    x (N,K,R,C), dy (N,F,Ro,Co)."""
    cdef cnp.ndarray ax = _f32_nd(x, "conv2d_grad_params x", 4)
    cdef cnp.ndarray ady = _f32_nd(dy, "conv2d_grad_params dy", 4)
    cdef cnp.ndarray adw = _f32_nd(dw, "conv2d_grad_params dw", 4, True)
    cdef cnp.ndarray adb = None
    s = _conv_shapes("conv2d_grad_params", ax, adw, ady, stride_y, stride_x, pad_y, pad_x)
    if db is not None:
        adb = _f32(db, "conv2d_grad_params db", True)
        if cnp.PyArray_SIZE(adb) != _dim(adw, 0):
            raise ValueError(f"conv2d_grad_params: db has {cnp.PyArray_SIZE(adb)} elements, "
                             f"expected {_dim(adw, 0)}")
        _no_alias(adb, ady, "conv2d_grad_params")
    _no_alias(adw, ax, "conv2d_grad_params")
    _no_alias(adw, ady, "conv2d_grad_params")
    cdef ConvG a
    _conv_fill(&a, s, stride_y, stride_x, pad_y, pad_x)
    a.x = _ptr(ax); a.dy = _ptr(ady); a.dw = _ptr(adw)
    a.db = _ptr(adb) if adb is not None else NULL
    cdef int nt = _nthreads(<double>a.N * a.F * a.P * a.KRS, a.N)
    a.nparts = nt
    a.ws_per = (0 if a.direct else _round16(<isize>a.KRS * a.P)) \
        + _round16(<isize>a.F * a.KRS) + _round16(a.F)
    cdef bint private = False
    cdef float* ws = _workspace_acquire(<size_t>(a.ws_per * nt), &private)
    a.ws = ws
    cdef int t, u, lo, hi, chunk = (a.N + nt - 1) // nt if a.N > 0 else 0
    cdef isize i, FW = <isize>a.F * a.KRS
    cdef float* slot
    try:
        with nogil:
            for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
                lo = t * chunk
                hi = min(lo + chunk, a.N)
                if hi < lo:
                    hi = lo
                _conv_param_part(&a, t, lo, hi)
            # add the partial sums in part order (deterministic)
            for u in range(1, nt):
                slot = ws + u * a.ws_per + (0 if a.direct else _round16(<isize>a.KRS * a.P))
                for i in range(FW):
                    a.dw[i] += slot[i]
                if a.db != NULL:
                    slot = slot + _round16(FW)
                    for i in range(a.F):
                        a.db[i] += slot[i]
    finally:
        _workspace_release(ws, private)


# --------------------------------------------------- conv2d_grouped (grouped, dilated)
#
# The backward of conv2d_grouped, one GEMM per (sample, group) as in its gemm route:
# grad data: col (Kg*nr*nc x P) = w_g^T dy_g, then col2im (with the dilation) into
# dx's group channels; grad params: im2col of x's group channels, dw_g += dy_g col^T,
# per-part partial sums over samples added in part order (deterministic, as above).

cdef struct GConvG:
    const float* x
    const float* w
    const float* dy
    float* dx
    float* dw
    float* db
    float* ws
    isize ws_per
    int N, K, R, C, F, nr, nc, sy, sx, py, px, dly, dlx, Ro, Co, P
    int G, Kg, Fg, KgRS
    bint direct


cdef int _gconv_shapes(str op, GConvG* a, tuple xs, tuple ws, tuple dys, int sy, int sx,
                       int py, int px, int dly, int dlx, int groups) except -1:
    """Validate (N,K,R,C) x, (F,K/groups,nr,nc) w and (N,F,Ro,Co) dy; fill a."""
    N, K, R, C = xs
    F, Kg, nr, nc = ws
    if sy < 1 or sx < 1 or py < 0 or px < 0 or dly < 1 or dlx < 1:
        raise ValueError(f"{op}: strides and dilations must be >= 1 and pads >= 0, got "
                         f"stride ({sy}, {sx}) pad ({py}, {px}) dilation ({dly}, {dlx})")
    if K < 1 or groups < 1 or K % groups or F % groups or Kg != K // groups:
        raise ValueError(f"{op}: w {ws} does not match x {xs} with groups = {groups} "
                         f"(groups must divide K and F, and w.shape[1] == K/groups)")
    if nr < 1 or nc < 1 or dly * (nr - 1) + 1 > R + 2 * py or dlx * (nc - 1) + 1 > C + 2 * px:
        raise ValueError(f"{op}: filter {nr}x{nc} dilated by ({dly}, {dlx}) does not fit the "
                         f"padded input {R}x{C}")
    Ro, Co = mdnn_out_size(R, nr, sy, py, dly), mdnn_out_size(C, nc, sx, px, dlx)
    if dys != (N, F, Ro, Co):
        raise ValueError(f"{op}: dy has shape {dys}, expected {(N, F, Ro, Co)}")
    for v in (N * K * R * C, N * F * Ro * Co, Kg * nr * nc * Ro * Co, F * Kg * nr * nc):
        _check_int(v, op)
    a.N, a.K, a.R, a.C, a.F, a.nr, a.nc, a.Ro, a.Co = N, K, R, C, F, nr, nc, Ro, Co
    a.sy = sy; a.sx = sx; a.py = py; a.px = px; a.dly = dly; a.dlx = dlx
    a.P = a.Ro * a.Co
    a.G = groups; a.Kg = Kg; a.Fg = F // groups; a.KgRS = Kg * nr * nc
    a.direct = nr == 1 and nc == 1 and sy == 1 and sx == 1 and py == 0 and px == 0 \
        and dly == 1 and dlx == 1
    return 0


cdef void _gconv_data_task(const GConvG* a, int n, int part) noexcept nogil:
    cdef float one = 1.0, zero = 0.0
    cdef int g, P = a.P, KgRS = a.KgRS, Fg = a.Fg
    cdef isize plane = <isize>a.R * a.C
    cdef float* dxg
    cdef float* col
    for g in range(a.G):
        dxg = a.dx + (<isize>n * a.K + <isize>g * a.Kg) * plane
        col = dxg if a.direct else a.ws + part * a.ws_per
        # column-major: col^T (P x KgRS) = dy_g^T (P x Fg) * w_g (Fg x KgRS)
        sgemm(b"N", b"T", &P, &KgRS, &Fg, &one,
              <float*>a.dy + (<isize>n * a.F + <isize>g * a.Fg) * a.P, &P,
              <float*>a.w + <isize>g * a.Fg * a.KgRS, &KgRS, &zero, col, &P)
        if not a.direct:
            _col2im(col, dxg, a.Kg, a.R, a.C, a.nr, a.nc, a.sy, a.sx, a.py, a.px,
                    a.dly, a.dlx, a.Ro, a.Co)


def conv2d_grouped_grad_data(dy, w, dx, int stride_y, int stride_x, int pad_y, int pad_x,
                             int dilation_y, int dilation_x, int groups):
    """dx (N,K,R,C) = the gradient of sum(dy * conv2d_grouped(x, w)) with respect to x,
    for dy (N,F,Ro,Co) and w (F,K/groups,nr,nc)."""
    op = "conv2d_grouped_grad_data"
    cdef cnp.ndarray ady = _f32_nd(dy, op + " dy", 4)
    cdef cnp.ndarray aw = _f32_nd(w, op + " w", 4)
    cdef cnp.ndarray adx = _f32_nd(dx, op + " dx", 4, True)
    cdef GConvG a
    _gconv_shapes(op, &a, _shape(adx), _shape(aw), _shape(ady), stride_y, stride_x, pad_y, pad_x,
                  dilation_y, dilation_x, groups)
    _no_alias(adx, ady, op)
    _no_alias(adx, aw, op)
    if a.N == 0:
        return
    if a.F == 0 or a.P == 0:
        memset(_ptr(adx), 0, cnp.PyArray_NBYTES(adx))
        return
    a.dy = _ptr(ady); a.w = _ptr(aw); a.dx = _ptr(adx)
    cdef int nt = _nthreads(<double>a.N * a.F * a.P * a.KgRS, a.N)
    a.ws_per = 0 if a.direct else _round16(<isize>a.KgRS * a.P)
    cdef bint private = False
    cdef float* ws = _workspace_acquire(<size_t>(a.ws_per * nt), &private)
    a.ws = ws
    cdef int t, n, lo, hi, chunk = (a.N + nt - 1) // nt
    try:
        with nogil:
            for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
                lo = t * chunk
                hi = min(lo + chunk, a.N)
                for n in range(lo, hi):
                    _gconv_data_task(&a, n, t)
    finally:
        _workspace_release(ws, private)


cdef void _gconv_param_part(const GConvG* a, int part, int lo, int hi) noexcept nogil:
    """Partial sums over samples [lo, hi) into this part's (F*KgRS + F) slot
    (part 0 writes straight into dw, db)."""
    cdef float one = 1.0
    cdef float* slot = a.ws + part * a.ws_per
    cdef float* col = NULL
    cdef float* dw = a.dw
    cdef float* db = a.db
    cdef int n, g, f, p, P = a.P, KgRS = a.KgRS, Fg = a.Fg
    cdef isize plane = <isize>a.R * a.C
    cdef const float* dyn
    cdef double acc
    if not a.direct:
        col = slot
        slot = slot + _round16(<isize>a.KgRS * a.P)
    if part > 0:
        dw = slot
        db = slot + _round16(<isize>a.F * a.KgRS) if a.db != NULL else NULL
    memset(dw, 0, <isize>a.F * KgRS * sizeof(float))
    if db != NULL:
        memset(db, 0, a.F * sizeof(float))
    for n in range(lo, hi):
        dyn = a.dy + <isize>n * a.F * P
        for g in range(a.G):
            if a.direct:
                col = <float*>a.x + (<isize>n * a.K + <isize>g * a.Kg) * plane
            else:
                _im2col_full(a.x + (<isize>n * a.K + <isize>g * a.Kg) * plane, col, a.Kg, a.R, a.C,
                             a.nr, a.nc, a.sy, a.sx, a.py, a.px, a.dly, a.dlx, a.Ro, a.Co)
            # column-major: dw_g^T (KgRS x Fg) += col (KgRS x P) * dy_g^T (P x Fg)
            sgemm(b"T", b"N", &KgRS, &Fg, &P, &one, col, &P,
                  <float*>dyn + <isize>g * a.Fg * P, &P, &one, dw + <isize>g * a.Fg * KgRS, &KgRS)
        if db != NULL:
            for f in range(a.F):
                acc = 0.0
                for p in range(P):
                    acc = acc + dyn[<isize>f * P + p]
                db[f] = db[f] + <float>acc


def conv2d_grouped_grad_params(x, dy, dw, db, int stride_y, int stride_x, int pad_y, int pad_x,
                               int dilation_y, int dilation_x, int groups):
    """dw (F,K/groups,nr,nc) = the gradient of sum(dy * conv2d_grouped(x, w)) with respect
    to w, db (F,) = sum of dy over samples and pixels (skipped when db is None);
    x (N,K,R,C), dy (N,F,Ro,Co)."""
    op = "conv2d_grouped_grad_params"
    cdef cnp.ndarray ax = _f32_nd(x, op + " x", 4)
    cdef cnp.ndarray ady = _f32_nd(dy, op + " dy", 4)
    cdef cnp.ndarray adw = _f32_nd(dw, op + " dw", 4, True)
    cdef cnp.ndarray adb = None
    cdef GConvG a
    _gconv_shapes(op, &a, _shape(ax), _shape(adw), _shape(ady), stride_y, stride_x, pad_y, pad_x,
                  dilation_y, dilation_x, groups)
    if db is not None:
        adb = _f32(db, op + " db", True)
        if cnp.PyArray_SIZE(adb) != a.F:
            raise ValueError(f"{op}: db has {cnp.PyArray_SIZE(adb)} elements, expected {a.F}")
        _no_alias(adb, ady, op)
        _no_alias(adb, ax, op)
        _no_alias(adb, adw, op)
    _no_alias(adw, ax, op)
    _no_alias(adw, ady, op)
    a.x = _ptr(ax); a.dy = _ptr(ady); a.dw = _ptr(adw)
    a.db = _ptr(adb) if adb is not None else NULL
    cdef int nt = _nthreads(<double>a.N * a.F * a.P * a.KgRS, a.N)
    a.ws_per = (0 if a.direct else _round16(<isize>a.KgRS * a.P)) \
        + _round16(<isize>a.F * a.KgRS) + _round16(a.F)
    cdef bint private = False
    cdef float* ws = _workspace_acquire(<size_t>(a.ws_per * nt), &private)
    a.ws = ws
    cdef int t, u, lo, hi, chunk = (a.N + nt - 1) // nt if a.N > 0 else 0
    cdef isize i, FW = <isize>a.F * a.KgRS
    cdef float* slot
    try:
        with nogil:
            for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
                lo = t * chunk
                hi = min(lo + chunk, a.N)
                if hi < lo:
                    hi = lo
                _gconv_param_part(&a, t, lo, hi)
            for u in range(1, nt):
                slot = ws + u * a.ws_per + (0 if a.direct else _round16(<isize>a.KgRS * a.P))
                for i in range(FW):
                    a.dw[i] += slot[i]
                if a.db != NULL:
                    slot = slot + _round16(FW)
                    for i in range(a.F):
                        a.db[i] += slot[i]
    finally:
        _workspace_release(ws, private)


# ---------------------------------------------------------------------- fc

cdef tuple _fc_shapes(str op, cnp.ndarray ax, cnp.ndarray aw, cnp.ndarray ady):
    cdef isize O = _dim(aw, 0), D = _dim(aw, 1), N
    if cnp.PyArray_NDIM(ax) < 1 or cnp.PyArray_NDIM(ady) < 1:
        raise ValueError(f"{op}: x and dy must have a sample axis")
    N = _dim(ax, 0)
    if cnp.PyArray_SIZE(ax) != N * D:
        raise ValueError(f"{op}: x {_shape(ax)} does not hold N*D = {N}*{D} values (w is {_shape(aw)})")
    if _dim(ady, 0) != N or cnp.PyArray_SIZE(ady) != N * O:
        raise ValueError(f"{op}: dy has shape {_shape(ady)}, expected {(N, O)}")
    for v in (N, O, D):
        _check_int(v, op)
    return N, O, D


def fc_grad_data(dy, w, dx):
    """dx (N,D) = dy (N,O) @ w (O,D): the gradient of sum(dy * fc(x, w)) w.r.t. x.
    dx and dy may be any C-contiguous (N, ...) arrays of N*D and N*O values."""
    cdef cnp.ndarray ady = _f32(dy, "fc_grad_data dy")
    cdef cnp.ndarray aw = _f32_nd(w, "fc_grad_data w", 2)
    cdef cnp.ndarray adx = _f32(dx, "fc_grad_data dx", True)
    N, O, D = _fc_shapes("fc_grad_data", adx, aw, ady)
    _no_alias(adx, ady, "fc_grad_data")
    _no_alias(adx, aw, "fc_grad_data")
    if N == 0 or D == 0:
        return
    if O == 0:
        memset(_ptr(adx), 0, cnp.PyArray_NBYTES(adx))
        return
    cdef int n_ = N, o_ = O, d_ = D
    cdef float one = 1.0, zero = 0.0
    cdef const float* pdy = _ptr(ady)
    cdef const float* pw = _ptr(aw)
    cdef float* pdx = _ptr(adx)
    cdef int nt = _nthreads(<double>N * O * D, N // 8)
    cdef int t, lo, nn, chunk = (n_ + nt - 1) // nt
    with nogil:
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            lo = t * chunk
            nn = min(chunk, n_ - lo)
            if nn > 0:
                # column-major: dx^T (D x nn) = w^T (D x O) * dy^T (O x nn)
                sgemm(b"N", b"N", &d_, &nn, &o_, &one, <float*>pw, &d_,
                      <float*>pdy + <isize>lo * o_, &o_, &zero, pdx + <isize>lo * d_, &d_)


def fc_grad_params(x, dy, dw, db):
    """dw (O,D) = dy (N,O).T @ x (N,D); db (O,) = sum of dy over samples (skipped
    when db is None)."""
    cdef cnp.ndarray ax = _f32(x, "fc_grad_params x")
    cdef cnp.ndarray ady = _f32(dy, "fc_grad_params dy")
    cdef cnp.ndarray adw = _f32_nd(dw, "fc_grad_params dw", 2, True)
    cdef cnp.ndarray adb = None
    N, O, D = _fc_shapes("fc_grad_params", ax, adw, ady)
    if db is not None:
        adb = _f32(db, "fc_grad_params db", True)
        if cnp.PyArray_SIZE(adb) != O:
            raise ValueError(f"fc_grad_params: db has {cnp.PyArray_SIZE(adb)} elements, expected {O}")
    _no_alias(adw, ax, "fc_grad_params")
    _no_alias(adw, ady, "fc_grad_params")
    cdef int n_ = N, o_ = O, d_ = D
    cdef float one = 1.0, zero = 0.0
    cdef const float* px = _ptr(ax)
    cdef const float* pdy = _ptr(ady)
    cdef float* pdw = _ptr(adw)
    cdef float* pdb = _ptr(adb) if adb is not None else NULL
    if O == 0:
        return
    if N == 0:
        memset(pdw, 0, cnp.PyArray_NBYTES(adw))
        if pdb != NULL:
            memset(pdb, 0, O * sizeof(float))
        return
    cdef int nt = _nthreads(<double>N * O * D, O // 8)
    cdef int t, lo, no, n, o, chunk = (o_ + nt - 1) // nt
    cdef double acc
    with nogil:
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            lo = t * chunk
            no = min(chunk, o_ - lo)
            if no > 0 and d_ > 0:
                # column-major: dw^T (D x no) = x^T (D x N) * dy[:, lo:lo+no] (N x no)
                sgemm(b"N", b"T", &d_, &no, &n_, &one, <float*>px, &d_,
                      <float*>pdy + lo, &o_, &zero, pdw + <isize>lo * d_, &d_)
            if no > 0 and pdb != NULL:
                for o in range(lo, lo + no):
                    acc = 0.0
                    for n in range(n_):
                        acc = acc + pdy[<isize>n * o_ + o]
                    pdb[o] = <float>acc


# -------------------------------------------------------------- elementwise

def activation_grad(x, y, dy, dx, act):
    """dx = dy * act'(x), given x and y = act(x) (kernels/common/activations.h says which
    the derivative reads: relu, sigmoid, tanh read y; the others x; pass None for one it
    does not read); same shapes; dx may be dy."""
    cdef float p
    cdef int code = _act(act, &p, "activation_grad")
    cdef cnp.ndarray ady = _f32(dy, "activation_grad dy")
    cdef cnp.ndarray adx = _f32(dx, "activation_grad dx", True)
    cdef cnp.ndarray ax = None
    cdef cnp.ndarray ay = None
    if not _same_shape(ady, adx):
        raise ValueError(f"activation_grad: shapes differ: dy {_shape(ady)}, dx {_shape(adx)}")
    _same_or_disjoint(adx, ady, "activation_grad")
    if x is not None:
        ax = _f32(x, "activation_grad x")
        if not _same_shape(ax, ady):
            raise ValueError(f"activation_grad: x has shape {_shape(ax)}, dy {_shape(ady)}")
        _no_alias(adx, ax, "activation_grad")
    if y is not None:
        ay = _f32(y, "activation_grad y")
        if not _same_shape(ay, ady):
            raise ValueError(f"activation_grad: y has shape {_shape(ay)}, dy {_shape(ady)}")
        _no_alias(adx, ay, "activation_grad")
    if mdnn_act_reads_y(code) and ay is None:
        raise ValueError(f"activation_grad: {act!r} needs y (the activation's output)")
    if mdnn_act_reads_x(code) and ax is None:
        raise ValueError(f"activation_grad: {act!r} needs x (the activation's input)")
    cdef isize n = cnp.PyArray_SIZE(ady), i, nb = (n + 16383) // 16384, o
    cdef const float* px = _ptr(ax) if ax is not None else NULL
    cdef const float* py = _ptr(ay) if ay is not None else NULL
    cdef const float* pdy = _ptr(ady)
    cdef float* pdx = _ptr(adx)
    cdef int nt = _threads_for(n, GRAIN)
    with nogil:
        for i in prange(nb, num_threads=nt, schedule="static"):
            o = i * 16384
            mdnn_act_grad_array(code, p, px + o if px != NULL else NULL,
                                py + o if py != NULL else NULL, pdy + o, pdx + o,
                                min(16384, n - o))


def prelu_alpha_grad(x, dy, dalpha):
    """dalpha[0] = sum of dy * x where x <= 0 (float64 accumulation, per block, then in
    block order: deterministic for a given shape and thread count)."""
    cdef cnp.ndarray ax = _f32(x, "prelu_alpha_grad x")
    cdef cnp.ndarray ady = _f32(dy, "prelu_alpha_grad dy")
    cdef cnp.ndarray ada = _f32(dalpha, "prelu_alpha_grad dalpha", True)
    if not _same_shape(ax, ady):
        raise ValueError(f"prelu_alpha_grad: shapes differ: x {_shape(ax)}, dy {_shape(ady)}")
    if cnp.PyArray_SIZE(ada) != 1:
        raise ValueError(f"prelu_alpha_grad: dalpha must have 1 element, got {_shape(ada)}")
    cdef isize n = cnp.PyArray_SIZE(ax), nb = (n + 16383) // 16384, b, i, e
    cdef const float* px = _ptr(ax)
    cdef const float* pdy = _ptr(ady)
    cdef double total = 0.0
    cdef double* part = <double*>malloc(<size_t>(nb if nb > 0 else 1) * sizeof(double))
    if part == NULL:
        raise MemoryError("prelu_alpha_grad: out of memory")
    cdef int nt = _threads_for(n, GRAIN)
    with nogil:
        for b in prange(nb, num_threads=nt, schedule="static"):
            part[b] = 0.0
            e = min(n, (b + 1) * 16384)
            for i in range(b * 16384, e):
                if px[i] <= 0:
                    part[b] += <double>pdy[i] * px[i]
        for b in range(nb):
            total += part[b]
    free(part)
    (<float*>_ptr(ada))[0] = <float>total


# ----------------------------------------------- per-channel (bn, affine)

cdef inline int _per_channel_check(str op, cnp.ndarray ax, object a, str what) except -1:
    if a is None:
        return 0
    cdef cnp.ndarray aa = _f32(a, f"{op} {what}")
    if cnp.PyArray_SIZE(aa) != _dim(ax, 1):
        raise ValueError(f"{op}: {what} has {cnp.PyArray_SIZE(aa)} elements, expected one per "
                         f"channel of x {_shape(ax)} ({_dim(ax, 1)})")
    return 0


def bn_forward_train(x, gamma, beta, y, mean, invstd, running_mean, running_var,
                     double avg_factor, double eps):
    """Batch normalisation with the statistics of this batch, per channel k of
    x (N,K,R,C) (per unit: callers pass x viewed as (N, D, 1, 1)):
    mean[k], var[k] over the N*R*C values (biased), invstd = 1/sqrt(var + eps),
    y = gamma * (x - mean) * invstd + beta. Then, unless avg_factor is 0,
    running_mean = (1 - a) * running_mean + a * mean and
    running_var = (1 - a) * running_var + a * var * M/(M-1) (unbiased, M = N*R*C).
    All per-channel arrays are (K,); mean and invstd are outputs (kept for bn_grad)."""
    op = "bn_forward_train"
    cdef cnp.ndarray ax = _f32_nd(x, op + " x", 4)
    cdef cnp.ndarray ay = _f32_nd(y, op + " y", 4, True)
    if not _same_shape(ax, ay):
        raise ValueError(f"{op}: y has shape {_shape(ay)}, x has {_shape(ax)}")
    for a, what in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (invstd, "invstd"),
                    (running_mean, "running_mean"), (running_var, "running_var")):
        _per_channel_check(op, ax, a, what)
    for a, what in ((mean, "mean"), (invstd, "invstd"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        _f32(a, f"{op} {what}", True)
    _no_alias(ay, ax, op)
    if not (eps > 0) or not (0 <= avg_factor <= 1):
        raise ValueError(f"{op}: need eps > 0 and 0 <= avg_factor <= 1, got {eps}, {avg_factor}")
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), S = _dim(ax, 2) * _dim(ax, 3)
    cdef isize M = N * S
    if M == 0:
        raise ValueError(f"{op}: empty batch {_shape(ax)}")
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    cdef const float* pg = _ptr(gamma)
    cdef const float* pb = _ptr(beta)
    cdef float* pm = _ptr(mean)
    cdef float* pi = _ptr(invstd)
    cdef float* prm = _ptr(running_mean)
    cdef float* prv = _ptr(running_var)
    cdef double unbias = <double>M / (M - 1) if M > 1 else 1.0
    cdef isize k, n, s, o
    cdef double acc, m, v, d, sc, sh
    cdef int nt = _threads_for(N * K * S, GRAIN)
    if nt > K:
        nt = <int>K
    if nt < 1:
        nt = 1
    with nogil:
        for k in prange(K, num_threads=nt, schedule="static"):
            acc = 0.0
            for n in range(N):
                o = (n * K + k) * S
                for s in range(S):
                    acc = acc + px[o + s]
            m = acc / M
            acc = 0.0
            for n in range(N):
                o = (n * K + k) * S
                for s in range(S):
                    d = px[o + s] - m
                    acc = acc + d * d
            v = acc / M
            pm[k] = <float>m
            pi[k] = <float>(1.0 / sqrt(v + eps))
            sc = pg[k] / sqrt(v + eps)
            sh = pb[k] - m * sc
            for n in range(N):
                o = (n * K + k) * S
                for s in range(S):
                    py[o + s] = <float>(px[o + s] * sc + sh)
            if avg_factor > 0:
                prm[k] = <float>((1 - avg_factor) * prm[k] + avg_factor * m)
                prv[k] = <float>((1 - avg_factor) * prv[k] + avg_factor * v * unbias)


def bn_grad(x, gamma, mean, invstd, dy, dx, dgamma, dbeta):
    """The backward of bn_forward_train (batch statistics) for x, dy, dx (N,K,R,C)
    and per-channel (K,) gamma, mean, invstd (as bn_forward_train left them):
    with xhat = (x - mean) * invstd and M = N*R*C,
    dbeta = sum dy, dgamma = sum dy * xhat,
    dx = gamma * invstd * (dy - dbeta/M - xhat * dgamma/M)."""
    op = "bn_grad"
    cdef cnp.ndarray ax = _f32_nd(x, op + " x", 4)
    cdef cnp.ndarray ady = _f32_nd(dy, op + " dy", 4)
    cdef cnp.ndarray adx = _f32_nd(dx, op + " dx", 4, True)
    if not _same_shape(ax, ady) or not _same_shape(ax, adx):
        raise ValueError(f"{op}: shapes differ: x {_shape(ax)}, dy {_shape(ady)}, dx {_shape(adx)}")
    for a, what in ((gamma, "gamma"), (mean, "mean"), (invstd, "invstd"), (dgamma, "dgamma"),
                    (dbeta, "dbeta")):
        _per_channel_check(op, ax, a, what)
    _f32(dgamma, op + " dgamma", True)
    _f32(dbeta, op + " dbeta", True)
    _no_alias(adx, ax, op)
    _no_alias(adx, ady, op)
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), S = _dim(ax, 2) * _dim(ax, 3)
    cdef isize M = N * S
    cdef const float* px = _ptr(ax)
    cdef const float* pdy = _ptr(ady)
    cdef float* pdx = _ptr(adx)
    cdef const float* pg = _ptr(gamma)
    cdef const float* pm = _ptr(mean)
    cdef const float* pi = _ptr(invstd)
    cdef float* pdg = _ptr(dgamma)
    cdef float* pdb = _ptr(dbeta)
    cdef isize k, n, s, o
    cdef double sb, sg, m, istd, c, a1, a2
    cdef int nt = _threads_for(N * K * S, GRAIN)
    if nt > K:
        nt = <int>K
    if nt < 1:
        nt = 1
    with nogil:
        for k in prange(K, num_threads=nt, schedule="static"):
            m = pm[k]
            istd = pi[k]
            sb = 0.0
            sg = 0.0
            for n in range(N):
                o = (n * K + k) * S
                for s in range(S):
                    sb = sb + pdy[o + s]
                    sg = sg + pdy[o + s] * (px[o + s] - m) * istd
            pdb[k] = <float>sb
            pdg[k] = <float>sg
            c = pg[k] * istd
            a1 = sb / M
            a2 = sg / M
            for n in range(N):
                o = (n * K + k) * S
                for s in range(S):
                    pdx[o + s] = <float>(c * (pdy[o + s] - a1 - (px[o + s] - m) * istd * a2))


def affine_grad(x, gamma, dy, dx, dgamma, dbeta):
    """The backward of y = x * gamma[k] + beta[k] for x, dy, dx (N,K,R,C):
    dx = dy * gamma[k], dgamma = sum dy * x, dbeta = sum dy (per channel).
    Any of dx, dgamma, dbeta may be None (not computed); x is only read for
    dgamma and may then be None too."""
    op = "affine_grad"
    cdef cnp.ndarray ady = _f32_nd(dy, op + " dy", 4)
    cdef cnp.ndarray ax = None, adx = None
    if dgamma is not None:
        ax = _f32_nd(x, op + " x", 4)
        if not _same_shape(ax, ady):
            raise ValueError(f"{op}: shapes differ: x {_shape(ax)}, dy {_shape(ady)}")
    if dx is not None:
        adx = _f32_nd(dx, op + " dx", 4, True)
        if not _same_shape(adx, ady):
            raise ValueError(f"{op}: shapes differ: dx {_shape(adx)}, dy {_shape(ady)}")
        _same_or_disjoint(adx, ady, op)
    for a, what in ((gamma, "gamma"), (dgamma, "dgamma"), (dbeta, "dbeta")):
        _per_channel_check(op, ady, a, what)
    if dgamma is not None:
        _f32(dgamma, op + " dgamma", True)
    if dbeta is not None:
        _f32(dbeta, op + " dbeta", True)
    cdef isize N = _dim(ady, 0), K = _dim(ady, 1), S = _dim(ady, 2) * _dim(ady, 3)
    cdef const float* px = _ptr(ax) if ax is not None else NULL
    cdef const float* pdy = _ptr(ady)
    cdef float* pdx = _ptr(adx) if adx is not None else NULL
    cdef const float* pg = _ptr(gamma)
    cdef float* pdg = _ptr(dgamma) if dgamma is not None else NULL
    cdef float* pdb = _ptr(dbeta) if dbeta is not None else NULL
    cdef isize k, n, s, o
    cdef double sb, sg
    cdef float g
    cdef int nt = _threads_for(N * K * S, GRAIN)
    if nt > K:
        nt = <int>K
    if nt < 1:
        nt = 1
    with nogil:
        for k in prange(K, num_threads=nt, schedule="static"):
            sb = 0.0
            sg = 0.0
            g = pg[k]
            for n in range(N):
                o = (n * K + k) * S
                if pdb != NULL:
                    for s in range(S):
                        sb = sb + pdy[o + s]
                if pdg != NULL:
                    for s in range(S):
                        sg = sg + pdy[o + s] * px[o + s]
                if pdx != NULL:
                    for s in range(S):
                        pdx[o + s] = pdy[o + s] * g
            if pdb != NULL:
                pdb[k] = <float>sb
            if pdg != NULL:
                pdg[k] = <float>sg


# ------------------------------------------------------------------ pooling

cdef void _pool_grad_plane(bint is_max, const float* x, const float* dy, float* dx,
                           int R, int C, int Ro, int Co, int nr, int nc,
                           int sy, int sx, int py, int px) noexcept nogil:
    cdef int oy, ox, r0, c0, r1, c1, r, c, br, bc
    cdef float best, g
    memset(dx, 0, <isize>R * C * sizeof(float))
    for oy in range(Ro):
        r0 = oy * sy - py
        r1 = min(r0 + nr, R)
        r0 = max(r0, 0)
        for ox in range(Co):
            c0 = ox * sx - px
            c1 = min(c0 + nc, C)
            c0 = max(c0, 0)
            g = dy[oy * Co + ox]
            if is_max:
                # the first largest in-bounds value (row-major) takes the gradient
                br = r0
                bc = c0
                best = x[r0 * C + c0]
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        if x[r * C + c] > best:
                            best = x[r * C + c]
                            br = r
                            bc = c
                dx[br * C + bc] += g
            else:
                g = g / ((r1 - r0) * (c1 - c0))
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        dx[r * C + c] += g


def _pool_grad(bint is_max, str op, x, dy, dx, int nr, int nc, int sy, int sx, int py, int px):
    cdef cnp.ndarray adx = _f32_nd(dx, op + " dx", 4, True)
    cdef cnp.ndarray ady = _f32_nd(dy, op + " dy", 4)
    cdef cnp.ndarray ax = adx
    if is_max:
        ax = _f32_nd(x, op + " x", 4)
        if not _same_shape(ax, adx):
            raise ValueError(f"{op}: shapes differ: x {_shape(ax)}, dx {_shape(adx)}")
        _no_alias(adx, ax, op)
    _no_alias(adx, ady, op)
    cdef isize N = _dim(adx, 0), K = _dim(adx, 1), R = _dim(adx, 2), C = _dim(adx, 3)
    if nr < 1 or nc < 1 or sy < 1 or sx < 1 or py < 0 or px < 0 or py >= nr or px >= nc \
            or nr > R + 2 * py or nc > C + 2 * px:
        raise ValueError(f"{op}: bad window {nr}x{nc}, stride ({sy}, {sx}), pad ({py}, {px}) "
                         f"for input {_shape(adx)}")
    cdef isize Ro = mdnn_out_size(R, nr, sy, py, 1), Co = mdnn_out_size(C, nc, sx, px, 1)
    if _dim(ady, 0) != N or _dim(ady, 1) != K or _dim(ady, 2) != Ro or _dim(ady, 3) != Co:
        raise ValueError(f"{op}: dy has shape {_shape(ady)}, expected {(N, K, Ro, Co)}")
    _check_int(R * C, op)
    cdef isize NK = N * K, i
    cdef const float* pxx = _ptr(ax)
    cdef const float* pdy = _ptr(ady)
    cdef float* pdx = _ptr(adx)
    cdef int nt = _threads_for(NK * R * C, GRAIN)
    with nogil:
        for i in prange(NK, num_threads=nt, schedule="static"):
            _pool_grad_plane(is_max, pxx + i * R * C, pdy + i * Ro * Co, pdx + i * R * C,
                             <int>R, <int>C, <int>Ro, <int>Co, nr, nc, sy, sx, py, px)


def max_pool_grad(x, dy, dx, int nr, int nc, int stride_y, int stride_x, int pad_y, int pad_x):
    """dx (N,K,R,C): each output's dy (N,K,Ro,Co) goes to the first largest
    in-bounds input of its window (row-major order), summed; elsewhere 0."""
    _pool_grad(True, "max_pool_grad", x, dy, dx, nr, nc, stride_y, stride_x, pad_y, pad_x)


def avg_pool_grad(dy, dx, int nr, int nc, int stride_y, int stride_x, int pad_y, int pad_x):
    """dx (N,K,R,C): each output's dy (N,K,Ro,Co) is shared equally by the
    in-bounds inputs of its window (padding excluded, as in avg_pool), summed."""
    _pool_grad(False, "avg_pool_grad", None, dy, dx, nr, nc, stride_y, stride_x, pad_y, pad_x)


# ------------------------------------------------------------------ softmax

def softmax_grad(y, dy, dx):
    """dx = y * (dy - sum_k dy * y) at each (n, r, c), y being softmax's output
    (N,K,R,C); same shapes; dx must not overlap y or dy."""
    op = "softmax_grad"
    cdef cnp.ndarray ay = _f32_nd(y, op + " y", 4)
    cdef cnp.ndarray ady = _f32_nd(dy, op + " dy", 4)
    cdef cnp.ndarray adx = _f32_nd(dx, op + " dx", 4, True)
    if not _same_shape(ay, ady) or not _same_shape(ay, adx):
        raise ValueError(f"{op}: shapes differ: y {_shape(ay)}, dy {_shape(ady)}, dx {_shape(adx)}")
    _no_alias(adx, ay, op)
    _no_alias(adx, ady, op)
    cdef isize N = _dim(ay, 0), K = _dim(ay, 1), S = _dim(ay, 2) * _dim(ay, 3)
    cdef const float* py = _ptr(ay)
    cdef const float* pdy = _ptr(ady)
    cdef float* pdx = _ptr(adx)
    cdef isize i, n, s, k, o
    cdef double acc
    cdef int nt = _threads_for(N * K * S, GRAIN)
    with nogil:
        for i in prange(N * S, num_threads=nt, schedule="static"):
            n = i // S
            s = i - n * S
            o = n * K * S + s
            acc = 0.0
            for k in range(K):
                acc = acc + pdy[o + k * S] * py[o + k * S]
            for k in range(K):
                pdx[o + k * S] = <float>(py[o + k * S] * (pdy[o + k * S] - acc))


# ------------------------------------------------------------------- losses

def loss_multiclass_log(x, labels, dx):
    """Softmax cross-entropy, averaged over the N samples of x (N,K,1,1) (any
    C-contiguous (N, ...) array of N*K values, K = x.size // N) with int64
    labels (N,) in [0, K). Writes dx = (softmax(x) - onehot(label)) / N and
    returns the mean loss, -log max(softmax(x)[label], 1e-10) (dlib's safe_log), as a
    Python float."""
    op = "loss_multiclass_log"
    cdef cnp.ndarray ax = _f32(x, op + " x")
    cdef cnp.ndarray adx = _f32(dx, op + " dx", True)
    if not cnp.PyArray_Check(labels) or cnp.PyArray_TYPE(<cnp.ndarray>labels) != cnp.NPY_INT64 \
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>labels) \
            or cnp.PyArray_NDIM(<cnp.ndarray>labels) != 1:
        raise ValueError(f"{op}: labels must be a C-contiguous int64 array (N,)")
    cdef cnp.ndarray al = <cnp.ndarray>labels
    if cnp.PyArray_NDIM(ax) < 1 or not _same_shape(ax, adx):
        raise ValueError(f"{op}: dx has shape {_shape(adx)}, x has {_shape(ax)}")
    _no_alias(adx, ax, op)
    cdef isize N = _dim(ax, 0), K, n, k
    if N == 0 or _dim(al, 0) != N:
        raise ValueError(f"{op}: expected {N} labels (one per sample of x {_shape(ax)}), got {_dim(al, 0)}")
    K = cnp.PyArray_SIZE(ax) // N
    cdef const long long* pl = <const long long*>cnp.PyArray_DATA(al)
    for n in range(N):
        if pl[n] < 0 or pl[n] >= K:
            raise ValueError(f"{op}: label {pl[n]} of sample {n} is outside [0, {K})")
    cdef const float* px = _ptr(ax)
    cdef float* pdx = _ptr(adx)
    cdef double total = 0.0, mx, z, scale = 1.0 / N
    cdef const float* xr
    cdef float* dr
    for n in range(N):
        xr = px + n * K
        dr = pdx + n * K
        mx = xr[0]
        for k in range(1, K):
            if xr[k] > mx:
                mx = xr[k]
        z = 0.0
        for k in range(K):
            z = z + exp(xr[k] - mx)
        for k in range(K):
            dr[k] = <float>(scale * exp(xr[k] - mx) / z)
        dr[pl[n]] = <float>(dr[pl[n]] - scale)
        # dlib's safe_log: -log(max(p, 1e-10)), so one sample adds at most ~23.03
        total = total + min(log(z) + mx - xr[pl[n]], 23.025850929940457)
    return total * scale


def loss_mean_squared(x, t, dx):
    """Mean squared error over the N samples of x and targets t (both any
    C-contiguous arrays of N*D values, N = x.shape[0]): loss = sum (x - t)^2 / N
    (dlib's loss_mean_squared: summed over a sample's outputs, averaged over
    samples); writes dx = 2 (x - t) / N; returns the loss."""
    op = "loss_mean_squared"
    cdef cnp.ndarray ax = _f32(x, op + " x")
    cdef cnp.ndarray at = _f32(t, op + " t")
    cdef cnp.ndarray adx = _f32(dx, op + " dx", True)
    if cnp.PyArray_NDIM(ax) < 1 or cnp.PyArray_SIZE(at) != cnp.PyArray_SIZE(ax) \
            or not _same_shape(ax, adx):
        raise ValueError(f"{op}: x {_shape(ax)}, t {_shape(at)} and dx {_shape(adx)} must hold "
                         f"the same number of values")
    _same_or_disjoint(adx, ax, op)
    _no_alias(adx, at, op)
    cdef isize N = _dim(ax, 0), M = cnp.PyArray_SIZE(ax), i
    if N == 0:
        raise ValueError(f"{op}: empty batch")
    cdef const float* px = _ptr(ax)
    cdef const float* pt = _ptr(at)
    cdef float* pdx = _ptr(adx)
    cdef double total = 0.0, d, scale = 1.0 / N
    for i in range(M):
        d = <double>px[i] - pt[i]
        total = total + d * d
        pdx[i] = <float>(2.0 * scale * d)
    return total * scale


# ------------------------------------------------------------------ solvers

def sgd_update(w, g, v, double lr, double weight_decay, double momentum):
    """dlib's sgd, in place: v = momentum * v - lr * (weight_decay * w + g); w += v.
    w, g, v: same number of float32 values."""
    op = "sgd_update"
    cdef cnp.ndarray aw = _f32(w, op + " w", True)
    cdef cnp.ndarray ag = _f32(g, op + " g")
    cdef cnp.ndarray av = _f32(v, op + " v", True)
    cdef isize n = cnp.PyArray_SIZE(aw), i
    if cnp.PyArray_SIZE(ag) != n or cnp.PyArray_SIZE(av) != n:
        raise ValueError(f"{op}: w {_shape(aw)}, g {_shape(ag)}, v {_shape(av)} differ in size")
    cdef float* pw = _ptr(aw)
    cdef const float* pg = _ptr(ag)
    cdef float* pv = _ptr(av)
    cdef float lr_ = lr, wd = weight_decay, mom = momentum, nv
    with nogil:
        for i in range(n):
            nv = mom * pv[i] - lr_ * (wd * pw[i] + pg[i])
            pv[i] = nv
            pw[i] = pw[i] + nv


def adam_update(w, g, m, v, double lr, double weight_decay, double beta1, double beta2,
                long long t, double eps=1e-8):
    """dlib's adam, in place, step t >= 1: with h = g + weight_decay * w,
    m = beta1 m + (1 - beta1) h, v = beta2 v + (1 - beta2) h^2,
    w -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)."""
    op = "adam_update"
    cdef cnp.ndarray aw = _f32(w, op + " w", True)
    cdef cnp.ndarray ag = _f32(g, op + " g")
    cdef cnp.ndarray am = _f32(m, op + " m", True)
    cdef cnp.ndarray av = _f32(v, op + " v", True)
    cdef isize n = cnp.PyArray_SIZE(aw), i
    if cnp.PyArray_SIZE(ag) != n or cnp.PyArray_SIZE(am) != n or cnp.PyArray_SIZE(av) != n:
        raise ValueError(f"{op}: w, g, m, v differ in size")
    if t < 1:
        raise ValueError(f"{op}: step t must be >= 1, got {t}")
    cdef float* pw = _ptr(aw)
    cdef const float* pg = _ptr(ag)
    cdef float* pm = _ptr(am)
    cdef float* pv = _ptr(av)
    cdef float alpha = lr * sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
    cdef float b1 = beta1, b2 = beta2, wd = weight_decay, e = eps, h, mm, vv
    with nogil:
        for i in range(n):
            h = pg[i] + wd * pw[i]
            mm = b1 * pm[i] + (1 - b1) * h
            vv = b2 * pv[i] + (1 - b2) * h * h
            pm[i] = mm
            pv[i] = vv
            pw[i] = pw[i] - alpha * mm / (sqrt(vv) + e)


def all_finite(a):
    """Whether every value of float32 array a is finite."""
    cdef cnp.ndarray aa = _f32(a, "all_finite a")
    cdef isize n = cnp.PyArray_SIZE(aa), i
    cdef const float* p = _ptr(aa)
    for i in range(n):
        if not isfinite(p[i]):
            return False
    return True

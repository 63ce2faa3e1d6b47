# cython: language_level=3
"""GEMM-based CPU kernels: conv2d (im2col + sgemm) and fc (sgemm).

Threading: OpenMP owns the cores. Work is cut into tasks (sample, pixel
chunk, filter block); each OpenMP thread runs its tasks with a
*single-threaded* sgemm (backends/cpu.py pins the BLAS that scipy loads to
one thread at import). This avoids two thread pools fighting over the same
cores (OpenMP team + OpenBLAS pthreads), and lets batch 1 still use every
core by splitting one sample's GEMM into panels.

Workspace: one grow-only buffer per module, guarded by a lock that is only
*tried*: a second Python thread entering concurrently gets a private buffer
for that call instead of waiting or racing.
"""
include "check.pxi"

from cython.parallel cimport prange, threadid
from libc.stdlib cimport free
from libc.string cimport memset, memcpy
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_acquire_lock, PyThread_release_lock,
                               NOWAIT_LOCK)
from scipy.linalg.cython_blas cimport sgemm

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

# ---------------------------------------------------------------- workspace

cdef float* _ws = NULL
cdef size_t _ws_n = 0
cdef PyThread_type_lock _ws_lock = PyThread_allocate_lock()


cdef float* _aligned(size_t n) except NULL:
    cdef void* p = NULL
    if posix_memalign(&p, 64, (n if n > 0 else 1) * sizeof(float)) != 0:
        raise MemoryError(f"cannot allocate a {n * 4} byte workspace")
    return <float*>p


cdef float* _workspace_acquire(size_t n, bint* private) except NULL:
    """The shared workspace (grown to n floats) or, if another thread holds
    it, a private buffer that the caller frees (private[0] = True)."""
    global _ws, _ws_n
    cdef float* p
    if PyThread_acquire_lock(_ws_lock, NOWAIT_LOCK):
        private[0] = False
        if n > _ws_n or _ws == NULL:       # never NULL: NULL means "error" here
            try:
                p = _aligned(n if n > 16 else 16)
            except MemoryError:
                PyThread_release_lock(_ws_lock)
                raise
            free(_ws)
            _ws = p
            _ws_n = n
        return _ws
    private[0] = True
    return _aligned(n)


cdef void _workspace_release(float* p, bint private) noexcept:
    if private:
        free(p)
    else:
        PyThread_release_lock(_ws_lock)


def workspace_bytes():
    """Size of the shared grow-only workspace, in bytes (for tests/benchmarks)."""
    return _ws_n * sizeof(float)


# ------------------------------------------------------------------ helpers

cdef inline void _epilogue(float* y, isize ld, int rows, int cols,
                           const float* b, bint relu) noexcept nogil:
    """y[r*ld + c] += b[r] (if b), then max(., 0) (if relu); rows x cols."""
    cdef int r, c
    cdef float bv
    cdef float* yr
    if b == NULL and not relu:
        return
    for r in range(rows):
        yr = y + r * ld
        bv = b[r] if b != NULL else 0.0
        if relu:
            for c in range(cols):
                yr[c] = max(yr[c] + bv, <float>0.0)
        else:
            for c in range(cols):
                yr[c] = yr[c] + bv


cdef inline int _cdiv(int a, int b) noexcept nogil:
    return (a + b - 1) // b


cdef void _im2col(const float* xn, float* col, int K, int R, int C,
                  int nr, int nc, int sy, int sx, int py, int px,
                  int Co, int p0, int pw) noexcept nogil:
    """col (K*nr*nc, pw): column t holds the receptive field of output pixel
    p0+t (row-major over (oy, ox)) of sample xn (K, R, C); zero padding."""
    cdef int k, i, j, p, oy, ox, iy, seg, t, lo, hi, a, e, ixs
    cdef float* dst
    cdef const float* src
    for k in range(K):
        for i in range(nr):
            for j in range(nc):
                dst = col + ((k * nr + i) * nc + j) * <isize>pw
                # valid ox range for this j: 0 <= ox*sx - px + j < C
                lo = _cdiv(px - j, sx) if px - j > 0 else 0
                hi = (C - 1 + px - j) // sx + 1 if C - 1 + px - j >= 0 else 0
                if hi > Co:
                    hi = Co
                p = p0
                oy = p0 // Co
                ox = p0 - oy * Co
                while p < p0 + pw:
                    seg = Co - ox
                    if seg > p0 + pw - p:
                        seg = p0 + pw - p
                    iy = oy * sy - py + i
                    if iy < 0 or iy >= R or hi <= lo:
                        memset(dst, 0, seg * sizeof(float))
                    else:
                        src = xn + (k * R + iy) * <isize>C
                        # [ox, ox+seg) = zeros [.., lo) copy [lo, hi) zeros [hi, ..)
                        a = lo if lo > ox else ox
                        e = hi if hi < ox + seg else ox + seg
                        if a > e:
                            a = e
                        for t in range(ox, a):
                            dst[t - ox] = 0.0
                        ixs = a * sx - px + j
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


cdef struct ConvArgs:
    const float* x
    const float* w
    const float* b
    float* y
    float* ws          # nthreads * ws_per_thread floats
    isize ws_per_thread
    int N, K, R, C, F, nr, nc, sy, sx, py, px, Ro, Co
    int P, KRS
    int pw, n_pc       # pixel chunk width, chunks per sample
    int fw, n_fb       # filter block height, blocks per sample
    bint direct        # 1x1, stride 1, pad 0: x[n] is already the column matrix
    bint relu


cdef void _conv_task(const ConvArgs* a, isize task, int tid) noexcept nogil:
    cdef int per_n = a.n_pc * a.n_fb
    cdef int n = <int>(task // per_n)
    cdef int r = <int>(task - <isize>n * per_n)
    cdef int pc = r // a.n_fb
    cdef int fb = r - pc * a.n_fb
    cdef int p0 = pc * a.pw
    cdef int pwid = a.pw if p0 + a.pw <= a.P else a.P - p0
    cdef int f0 = fb * a.fw
    cdef int fwid = a.fw if f0 + a.fw <= a.F else a.F - f0
    cdef const float* xn = a.x + <isize>n * a.K * a.R * a.C
    cdef float* yn = a.y + <isize>n * a.F * a.P
    cdef float* A
    cdef int lda, ldb = a.KRS, ldc = a.P, kk = a.KRS
    cdef float one = 1.0, zero = 0.0
    if a.direct:
        A = <float*>xn + p0
        lda = a.P
    else:
        A = a.ws + tid * a.ws_per_thread
        lda = pwid
        _im2col(xn, A, a.K, a.R, a.C, a.nr, a.nc, a.sy, a.sx, a.py, a.px,
                a.Co, p0, pwid)
    # column-major view: y_n^T (P x F) = col^T (P x KRS) * w^T (KRS x F)
    sgemm(b"N", b"N", &pwid, &fwid, &kk, &one, A, &lda,
          <float*>a.w + <isize>f0 * a.KRS, &ldb, &zero, yn + <isize>f0 * a.P + p0, &ldc)
    _epilogue(yn + <isize>f0 * a.P + p0, a.P, fwid, pwid,
              a.b + f0 if a.b != NULL else NULL, a.relu)


# Pixel-chunk width: one chunk of im2col columns (KRS x pw floats) should sit
# in L2 while sgemm packs it; but sgemm re-packs the weights on every call, so
# chunks must not be too narrow either. Tuned on the reference machine.
cdef int PW_BYTES = 512 * 1024
cdef int PW_MIN = 128


def conv2d(x, w, b, y, int stride_y, int stride_x, int pad_y, int pad_x, bint relu):
    """y (N,F,Ro,Co) = cross-correlation of x (N,K,R,C) with w (F,K,nr,nc),
    zero padding, + b (F,) if b is not None, then max(., 0) if relu."""
    cdef cnp.ndarray ax = _f32_nd(x, "conv2d x", 4)
    cdef cnp.ndarray aw = _f32_nd(w, "conv2d w", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "conv2d y", 4, True)
    cdef cnp.ndarray ab = None
    cdef ConvArgs a
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), R = _dim(ax, 2), C = _dim(ax, 3)
    cdef isize F = _dim(aw, 0), nr = _dim(aw, 2), nc = _dim(aw, 3)
    cdef isize Ro, Co
    if stride_y < 1 or stride_x < 1 or pad_y < 0 or pad_x < 0:
        raise ValueError(f"conv2d: strides must be >= 1 and pads >= 0, got "
                         f"stride ({stride_y}, {stride_x}) pad ({pad_y}, {pad_x})")
    if _dim(aw, 1) != K:
        raise ValueError(f"conv2d: w {_shape(aw)} does not match x {_shape(ax)} (channels)")
    if nr < 1 or nc < 1 or nr > R + 2 * pad_y or nc > C + 2 * pad_x:
        raise ValueError(f"conv2d: filter {nr}x{nc} does not fit the padded input "
                         f"{R}x{C} (pad {pad_y}, {pad_x})")
    Ro = 1 + (R + 2 * pad_y - nr) // stride_y
    Co = 1 + (C + 2 * pad_x - nc) // stride_x
    if _dim(ay, 0) != N or _dim(ay, 1) != F or _dim(ay, 2) != Ro or _dim(ay, 3) != Co:
        raise ValueError(f"conv2d: y has shape {_shape(ay)}, expected {(N, F, Ro, Co)}")
    if b is not None:
        ab = _f32(b, "conv2d b")
        if cnp.PyArray_SIZE(ab) != F:
            raise ValueError(f"conv2d: b has {cnp.PyArray_SIZE(ab)} elements, expected {F}")
    _no_alias(ay, ax, "conv2d")
    _no_alias(ay, aw, "conv2d")
    for v, what in ((K * nr * nc, "K*nr*nc"), (Ro * Co, "Ro*Co"), (K * R * C, "K*R*C"),
                    (F * Ro * Co, "F*Ro*Co"), (N, "N"), (F, "F")):
        _check_int(v, "conv2d " + what)
    if N == 0 or F == 0 or Ro * Co == 0:
        return

    a.x = _ptr(ax); a.w = _ptr(aw); a.y = _ptr(ay)
    a.b = _ptr(ab) if ab is not None else NULL
    a.N = <int>N; a.K = <int>K; a.R = <int>R; a.C = <int>C; a.F = <int>F
    a.nr = <int>nr; a.nc = <int>nc; a.sy = stride_y; a.sx = stride_x
    a.py = pad_y; a.px = pad_x; a.Ro = <int>Ro; a.Co = <int>Co
    a.P = <int>(Ro * Co); a.KRS = <int>(K * nr * nc); a.relu = relu
    a.direct = nr == 1 and nc == 1 and stride_y == 1 and stride_x == 1 and pad_y == 0 and pad_x == 0

    cdef int nt = _threads()
    # pixel chunks
    cdef isize pw = PW_BYTES // (4 * (a.KRS if a.KRS > 0 else 1))
    if pw < PW_MIN:
        pw = PW_MIN
    if a.direct or pw > a.P:
        pw = a.P
    # enough tasks to keep every thread busy: split the pixels further, then
    # (for few pixels and many filters) the filters.
    cdef isize n_pc = (a.P + pw - 1) // pw
    cdef isize n_fb = 1
    cdef isize want = nt if nt > 1 else 1
    if N * n_pc < want or (N * n_pc % want != 0 and N * n_pc < 4 * want):
        # a too-small / unbalanced task count: cut the work per sample into ~want pieces
        if a.P >= 32 * want:
            n_pc = want
            pw = (a.P + n_pc - 1) // n_pc
            pw = (pw + 15) // 16 * 16
            n_pc = (a.P + pw - 1) // pw
        elif a.F >= 16 * want:
            n_fb = want
    a.pw = <int>pw; a.n_pc = <int>n_pc
    a.fw = <int>((a.F + n_fb - 1) // n_fb)
    a.fw = (a.fw + 7) // 8 * 8 if n_fb > 1 else a.fw
    a.n_fb = <int>((a.F + a.fw - 1) // a.fw)

    cdef isize ntasks = N * a.n_pc * a.n_fb
    if ntasks < nt:
        nt = <int>ntasks
    # tiny problems: a parallel region costs more than it saves
    if <double>N * a.F * a.P * (a.KRS if a.KRS > 0 else 1) < 200000.0:
        nt = 1
    a.ws_per_thread = 0 if a.direct else (<isize>a.KRS * a.pw + 15) // 16 * 16
    cdef bint private = False
    cdef float* ws = _workspace_acquire(<size_t>(a.ws_per_thread * nt), &private)
    a.ws = ws
    cdef isize t
    try:
        with nogil:
            if nt == 1:
                for t in range(ntasks):
                    _conv_task(&a, t, 0)
            else:
                for t in prange(ntasks, num_threads=nt, schedule="dynamic"):
                    _conv_task(&a, t, threadid())
    finally:
        _workspace_release(ws, private)


cdef void _fc_task(const float* x, const float* w, const float* b, float* y,
                   int N, int D, int O, int n0, int nn, int o0, int no,
                   bint relu) noexcept nogil:
    cdef float one = 1.0, zero = 0.0
    cdef int ldw = D, ldx = D, ldy = O
    cdef int r, c
    cdef float* yr
    if D == 0:
        for r in range(nn):
            memset(y + <isize>(n0 + r) * O + o0, 0, no * sizeof(float))
    else:
        # column-major: y^T (O x N) = w (O x D) * x^T (D x N)
        sgemm(b"T", b"N", &no, &nn, &D, &one, <float*>w + <isize>o0 * D, &ldw,
              <float*>x + <isize>n0 * D, &ldx, &zero, y + <isize>n0 * O + o0, &ldy)
    # rows of y are samples: bias runs along the row
    if b == NULL and not relu:
        return
    for r in range(nn):
        yr = y + <isize>(n0 + r) * O + o0
        if b != NULL and relu:
            for c in range(no):
                yr[c] = max(yr[c] + b[o0 + c], <float>0.0)
        elif b != NULL:
            for c in range(no):
                yr[c] = yr[c] + b[o0 + c]
        else:
            for c in range(no):
                yr[c] = max(yr[c], <float>0.0)


def fc(x, w, b, y, bint relu):
    """y (N,O) = x (N,D) @ w (O,D).T + b (O,) if b is not None, then max(., 0)
    if relu. x may be any C-contiguous (N, ...) array of N*D elements, y any
    (N, ...) array of N*O elements."""
    cdef cnp.ndarray ax = _f32(x, "fc x")
    cdef cnp.ndarray aw = _f32_nd(w, "fc w", 2)
    cdef cnp.ndarray ay = _f32(y, "fc y", True)
    cdef cnp.ndarray ab = None
    cdef isize O = _dim(aw, 0), D = _dim(aw, 1), N
    if cnp.PyArray_NDIM(ax) < 1 or cnp.PyArray_NDIM(ay) < 1:
        raise ValueError("fc: x and y must have a sample axis")
    N = _dim(ax, 0)
    if cnp.PyArray_SIZE(ax) != N * D:
        raise ValueError(f"fc: x {_shape(ax)} does not hold N*D = {N}*{D} values (w is {_shape(aw)})")
    if _dim(ay, 0) != N or cnp.PyArray_SIZE(ay) != N * O:
        raise ValueError(f"fc: y has shape {_shape(ay)}, expected {(N, O)}")
    if b is not None:
        ab = _f32(b, "fc b")
        if cnp.PyArray_SIZE(ab) != O:
            raise ValueError(f"fc: b has {cnp.PyArray_SIZE(ab)} elements, expected {O}")
    _no_alias(ay, ax, "fc")
    _no_alias(ay, aw, "fc")
    for v in (N, O, D):
        _check_int(v, "fc")
    if N == 0 or O == 0:
        return
    cdef const float* px = _ptr(ax)
    cdef const float* pw = _ptr(aw)
    cdef const float* pb = _ptr(ab) if ab is not None else NULL
    cdef float* py = _ptr(ay)
    cdef int nt = _threads()
    if <double>N * O * (D if D > 0 else 1) < 200000.0:
        nt = 1
    # split the samples when there are enough of them, else the outputs
    cdef int ns = 1, no_ = 1, t
    if nt > 1:
        if N >= 8 * nt:
            ns = nt
        elif O >= 16 * nt:
            no_ = nt
        else:
            nt = 1
    cdef int bn = <int>((N + ns - 1) // ns)
    cdef int bo = <int>((O + no_ - 1) // no_)
    if no_ > 1:
        bo = (bo + 7) // 8 * 8
    cdef int ntasks = ns * no_
    cdef int n0, o0, nn, nno
    with nogil:
        for t in prange(ntasks, num_threads=nt, schedule="static"):
            n0 = (t // no_) * bn
            o0 = (t % no_) * bo
            nn = min(bn, <int>N - n0)
            nno = min(bo, <int>O - o0)
            if nn > 0 and nno > 0:
                _fc_task(px, pw, pb, py, <int>N, <int>D, <int>O, n0, nn, o0, nno, relu)


def set_num_threads(int n):
    """Set the OpenMP team size used by every CPU kernel (process-wide)."""
    if n < 1:
        raise ValueError(f"set_num_threads: need n >= 1, got {n}")
    openmp.omp_set_num_threads(n)


def get_num_threads():
    return openmp.omp_get_max_threads()

# cython: language_level=3
"""GEMM-based CPU kernels: conv2d and fc (sgemm).

conv2d has two paths, chosen per shape by _use_implicit (a rule measured on
the reference machine; tests force each path):
  - implicit: our own packed GEMM (gemm_avx2.h) with a 6x16 AVX2/FMA
    micro-kernel, B packed straight from the image (or read from padded
    input rows), weights read in place, bias/ReLU in the micro-kernel's store.
    1.05-3x faster than the path below on the ResNet/LeNet convs.
  - blas: im2col into a per-thread workspace + scipy's OpenBLAS sgemm + a
    bias/ReLU epilogue per block; kept where it wins (strided convs with
    output rows narrower than 8 at batch > 1, ragged last tiles of 5-15
    columns that are mostly padding) and on machines without AVX2.
conv2d_residual shares all of it: the residual z is one more pointer (NULL
for conv2d) that every epilogue above adds after the bias, before the ReLU.
fc at <= 4 samples (batch 1) runs as dot products along D (the narrow-tile
kernel of gemm_avx2.h) instead of sgemm, which packs w for a matrix-vector
product (ResNet-18's fc1000: 0.21 -> 0.025 ms).

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
include "act.pxi"

from libc.stdlib cimport free
from libc.string cimport memset, memcpy
from scipy.linalg.cython_blas cimport sgemm

cdef extern from "gemm_avx2.h" nogil:
    ctypedef struct mdnn_conv_t:
        const float* x
        const float* w
        const float* b
        const float* z
        float* y
        int N, K, R, C, F, nr, nc, sy, sx, py, px, Ro, Co, P, KRS
        int act
        float act_p
    int MDNN_NR, MDNN_KC, MDNN_MR, MDNN_MC, MDNN_NARROW
    int mdnn_have_avx2()
    int mdnn_kc, mdnn_mc, mdnn_zc_rows_outer
    void mdnn_conv_task(const mdnn_conv_t* c, long q0, int ncols, int f0, int nf,
                        float* bpack)
    int mdnn_direct_ok(const mdnn_conv_t* c)
    long mdnn_direct_ws(const mdnn_conv_t* c, int ncw)
    void mdnn_conv_task_direct(const mdnn_conv_t* c, long q0, int ncols, int f0, int nf,
                               float* pbuf)
    void mdnn_kernel_narrow(int mr, int w, int kc, const float* a, long lda,
                            const float* bt, float* out, const long* yoff, long ldo,
                            int mode, const float* bias, const float* zb, int act, float ap)
    int MDNN_EPI

include "workspace.pxi"
include "parallel.pxi"


def workspace_bytes():
    """Size of the shared grow-only workspace, in bytes (for tests/benchmarks)."""
    return _ws_n * sizeof(float)


# ------------------------------------------------------------------ helpers

cdef inline void _epilogue(float* y, isize ld, int rows, int cols,
                           const float* b, const float* z, int act, float ap) noexcept nogil:
    """y[r*ld + c] += b[r] (if b) + z[r*ld + c] (if z: the residual, laid out
    like y), then the activation act (activations.h); rows x cols."""
    cdef int r, c
    cdef float bv
    cdef float* yr
    cdef const float* zr
    if b == NULL and z == NULL and act == MDNN_ACT_IDENTITY:
        return
    for r in range(rows):
        yr = y + r * ld
        bv = b[r] if b != NULL else 0.0
        if z != NULL:
            zr = z + r * ld
            for c in range(cols):
                yr[c] = yr[c] + bv + zr[c]
        elif b != NULL:
            for c in range(cols):
                yr[c] = yr[c] + bv
        if act == MDNN_ACT_RELU:
            for c in range(cols):
                yr[c] = max(yr[c], <float>0.0)
        elif act != MDNN_ACT_IDENTITY:
            mdnn_act_array(act, ap, yr, yr, cols)


include "im2col.pxi"


cdef struct ConvArgs:
    const float* x
    const float* w
    const float* b
    const float* z     # residual (N, F, P), or NULL (plain conv2d)
    float* y
    float* ws          # nthreads * ws_per_thread floats
    isize ws_per_thread
    int N, K, R, C, F, nr, nc, sy, sx, py, px, Ro, Co
    int P, KRS
    int G, n_g         # samples per GEMM, sample groups (G > 1 only when pw == P)
    int pw, n_pc       # pixel chunk width, chunks per sample
    int fw, n_fb       # filter block height, blocks
    bint direct        # 1x1, stride 1, pad 0: x[n] is already the column matrix
    int act            # the epilogue's activation (activations.h) and its parameter
    float act_p


cdef void _conv_task_run(void* ctx, long task, int tid) noexcept nogil:
    _conv_task(<const ConvArgs*>ctx, task, tid)


cdef void _conv_task(const ConvArgs* a, isize task, int tid) noexcept nogil:
    """One task = (sample group, pixel chunk, filter block): im2col of the
    chunk into this thread's workspace, one single-threaded sgemm, then the
    bias/residual/activation epilogue on the block while it is still in cache."""
    cdef int per_g = a.n_pc * a.n_fb
    cdef int g = <int>(task // per_g)
    cdef int r = <int>(task - <isize>g * per_g)
    cdef int pc = r // a.n_fb
    cdef int fb = r - pc * a.n_fb
    cdef int f0 = fb * a.fw
    cdef int fwid = a.fw if f0 + a.fw <= a.F else a.F - f0
    cdef int n0 = g * a.G
    cdef int gn = a.G if n0 + a.G <= a.N else a.N - n0
    cdef isize xs = <isize>a.K * a.R * a.C, ys = <isize>a.F * a.P
    cdef const float* xn = a.x + n0 * xs
    cdef float* yn = a.y + n0 * ys
    cdef const float* zn = a.z + n0 * ys if a.z != NULL else NULL
    cdef const float* zs
    cdef float* col = a.ws + tid * a.ws_per_thread
    cdef float* out
    cdef float* A
    cdef int p0, pwid, lda, ldb = a.KRS, ldc = a.P, kk = a.KRS, m, s, f, p
    cdef float one = 1.0, zero = 0.0, bv
    cdef const float* src
    cdef float* dst
    if gn == 1:
        p0 = pc * a.pw
        pwid = a.pw if p0 + a.pw <= a.P else a.P - p0
        if a.direct:
            A = <float*>xn + p0
            lda = a.P
        else:
            A = col
            lda = pwid
            _im2col(xn, A, a.K, a.R, a.C, a.nr, a.nc, a.sy, a.sx, a.py, a.px, 1, 1,
                    a.Co, p0, pwid, pwid)
        # column-major view: y_n^T (P x F) = col^T (P x KRS) * w^T (KRS x F)
        sgemm(b"N", b"N", &pwid, &fwid, &kk, &one, A, &lda,
              <float*>a.w + <isize>f0 * a.KRS, &ldb, &zero, yn + <isize>f0 * a.P + p0, &ldc)
        _epilogue(yn + <isize>f0 * a.P + p0, a.P, fwid, pwid,
                  a.b + f0 if a.b != NULL else NULL,
                  zn + <isize>f0 * a.P + p0 if zn != NULL else NULL, a.act, a.act_p)
        return
    # Few pixels per sample: one GEMM over gn samples side by side
    # (m = gn*P columns), so sgemm gets a wide panel and packs w once per
    # group instead of once per sample; the result goes through a buffer and
    # is scattered into y (N, F, P) by the epilogue.
    m = gn * a.P
    for s in range(gn):
        if a.direct:
            for f in range(a.K):
                src = xn + s * xs + <isize>f * a.P
                dst = col + <isize>f * m + s * a.P
                for p in range(a.P):
                    dst[p] = src[p]
        else:
            _im2col(xn + s * xs, col + s * a.P, a.K, a.R, a.C, a.nr, a.nc, a.sy, a.sx,
                    a.py, a.px, 1, 1, a.Co, 0, a.P, m)
    out = col + <isize>a.KRS * m
    sgemm(b"N", b"N", &m, &fwid, &kk, &one, col, &m,
          <float*>a.w + <isize>f0 * a.KRS, &ldb, &zero, out, &m)
    for s in range(gn):
        for f in range(fwid):
            src = out + <isize>f * m + s * a.P
            dst = yn + s * ys + <isize>(f0 + f) * a.P
            for p in range(a.P):
                dst[p] = src[p]
        _epilogue(yn + s * ys + <isize>f0 * a.P, a.P, fwid, a.P,
                  a.b + f0 if a.b != NULL else NULL,
                  zn + s * ys + <isize>f0 * a.P if zn != NULL else NULL, a.act, a.act_p)


# Tuning knobs, measured on the reference machine (2-core EPYC, OpenBLAS
# Haswell kernels): one chunk of im2col columns (KRS x pw floats) should sit
# in L2 while sgemm packs it, but sgemm re-packs the weights on every call, so
# a GEMM should also have at least GEMM_MIN_M columns (pixels).
cdef isize PW_BYTES = 512 * 1024
cdef int GEMM_MIN_M = 192


cdef inline isize _ceil(isize a, isize b) noexcept nogil:
    return (a + b - 1) // b


cdef void _plan(ConvArgs* a, int nt) noexcept nogil:
    """Cut the work into tasks (sample groups x pixel chunks x filter
    blocks): enough tasks to keep nt threads busy and balanced, each task a
    GEMM large enough to run near sgemm's peak."""
    cdef isize pw, n_pc, G, n_g, n_fb = 1, tasks
    cdef int q
    G = 1
    if a.P < GEMM_MIN_M and a.N > 1:
        G = _ceil(GEMM_MIN_M, a.P)
        if G > _ceil(a.N, nt):
            G = _ceil(a.N, nt)         # keep at least nt groups
        if G < 1:
            G = 1
    n_g = _ceil(a.N, G)
    if G > 1 or a.direct:
        n_pc = 1
    else:
        pw = PW_BYTES // (4 * (a.KRS if a.KRS > 0 else 1))
        if pw < GEMM_MIN_M:
            pw = GEMM_MIN_M
        n_pc = _ceil(a.P, pw)
    tasks = n_g * n_pc
    if nt > 1 and tasks < 8 * nt and tasks % nt != 0:
        # few tasks that do not divide evenly among threads: cut each sample
        # (group) into more pieces, by pixels if there are enough, else filters
        q = nt
        while (n_g * q) % nt != 0:
            q += 1
        if G == 1 and a.P >= 64 * q:
            n_pc = _ceil(n_pc, q) * q
        elif a.F >= 16 * q:
            n_fb = q
    a.G = <int>G
    a.n_g = <int>n_g
    a.n_pc = <int>n_pc
    pw = _ceil(a.P, n_pc)
    if n_pc > 1:
        pw = _ceil(pw, 16) * 16
    a.pw = <int>pw
    a.n_pc = <int>_ceil(a.P, pw)
    if n_fb > 1:
        a.fw = <int>(_ceil(_ceil(a.F, n_fb), 8) * 8)
    else:
        a.fw = a.F
    a.n_fb = <int>_ceil(a.F, a.fw)
    if G > 1:
        a.ws_per_thread = <isize>(a.KRS + a.fw) * G * a.P
    elif a.direct:
        a.ws_per_thread = 0
    else:
        a.ws_per_thread = <isize>a.KRS * a.pw
    a.ws_per_thread = (a.ws_per_thread + 15) // 16 * 16


# ------------------------------------------------- implicit-GEMM path (ours)
#
# gemm_avx2.h: packed GEMM with a 6x16 AVX2/FMA micro-kernel, B packed
# straight from the image (or read from padded input rows), weights read in
# place, bias/relu in the store. Tasks: chunks of whole 16-column tiles of the
# flattened (sample, pixel) columns x (for few columns) filter blocks.

cdef struct IgArgs:
    mdnn_conv_t c
    float* ws
    isize ws_per_thread
    long Q             # columns: N*P flattened output pixels
    long T             # NR-column tiles
    int ncw, n_cc      # most columns per task (multiple of NR), column chunks
    int fw, n_fb       # filters per task, filter blocks
    bint direct        # Co % 8 == 0 (gemm_avx2.h): B read from padded rows, no packing


# B panel (kc x ncw floats) sized to sit in L2 (512 KiB per core) beside
# the weight block (MDNN_MC x kc).
cdef isize IG_PANEL_BYTES = 192 * 1024
cdef int IG_MIN_COLS = 64
# Padded-rows variant: input rows (all channels) per task.
cdef isize IG_DIRECT_BYTES = 128 * 1024

# Path choice (tests force a path; 0 = by shape).
cdef int _force_path = 0
# Convs whose output rows are a multiple of 8 read B from padded input rows.
cdef bint _ig_direct = True


def _have_avx2():
    """Whether the kernels were compiled with AVX2 + FMA (else the portable
    micro-kernel, and conv2d keeps to OpenBLAS unless a test forces it)."""
    return bool(mdnn_have_avx2())


def _set_direct(bint on):
    """Allow (True) or forbid the padded-rows variant of the implicit path
    (for tests and tuning); returns the previous setting."""
    global _ig_direct
    prev = _ig_direct
    _ig_direct = on
    return prev


def _set_conv_path(str name):
    """Force conv2d's path: "auto", "blas" (im2col + sgemm) or "implicit"
    (our packed GEMM). For tests and tuning; returns the previous name."""
    global _force_path
    names = ("auto", "blas", "implicit")
    if name not in names:
        raise ValueError(f"_set_conv_path: expected one of {names}, got {name!r}")
    prev = names[_force_path]
    _force_path = names.index(name)
    return prev


cdef void _ig_plan(IgArgs* g, int nt) noexcept nogil:
    cdef int KRS = g.c.KRS if g.c.KRS > 0 else 1
    cdef int nkb = (KRS + mdnn_kc - 1) // mdnn_kc
    cdef int kcs = (KRS + nkb - 1) // nkb
    cdef isize ncw = IG_PANEL_BYTES // (4 * kcs)
    cdef isize n_cc, q, rows
    cdef int n_fb = 1
    g.direct = _ig_direct and mdnn_direct_ok(&g.c)
    if g.direct and IG_DIRECT_BYTES > 0:
        # no B panel: size the chunk by its padded input rows instead
        rows = IG_DIRECT_BYTES // (4 * <isize>g.c.K * g.c.sy * g.c.sx *
                                   (g.c.Co + (g.c.nc - 1) // g.c.sx))
        if rows * g.c.Co > ncw:
            ncw = rows * g.c.Co
    ncw = ncw // MDNN_NR * MDNN_NR
    if ncw < IG_MIN_COLS:
        ncw = IG_MIN_COLS
    g.Q = <long>g.c.N * g.c.P
    n_cc = _ceil(g.Q, ncw)
    if nt > 1 and n_cc < 8 * nt and n_cc % nt != 0:
        # few chunks that do not divide evenly among threads: more, narrower
        # chunks if they stay wide enough, else split the filters
        q = _ceil(n_cc, nt) * nt
        if g.Q >= <isize>IG_MIN_COLS * q:
            n_cc = q
        elif g.c.F >= 12 * nt:
            n_fb = nt
    # chunks of whole NR-column tiles, as even as possible (sizes differ by
    # at most one tile): chunk cc holds tiles [cc*T/n_cc, (cc+1)*T/n_cc)
    g.T = _ceil(g.Q, MDNN_NR)
    if n_cc > g.T:
        n_cc = g.T
    g.n_cc = <int>n_cc
    ncw = _ceil(g.T, n_cc) * MDNN_NR
    g.ncw = <int>ncw
    if n_fb > 1:
        g.fw = <int>(_ceil(_ceil(g.c.F, n_fb), MDNN_MR) * MDNN_MR)
    else:
        g.fw = g.c.F
    g.n_fb = <int>_ceil(g.c.F, g.fw)
    if g.direct:
        g.ws_per_thread = (mdnn_direct_ws(&g.c, g.ncw) + 15) // 16 * 16
    else:
        g.ws_per_thread = (<isize>ncw * kcs + 15) // 16 * 16


cdef void _ig_task_run(void* ctx, long task, int tid) noexcept nogil:
    _ig_task(<const IgArgs*>ctx, task, tid)


cdef void _ig_task(const IgArgs* g, isize task, int tid) noexcept nogil:
    cdef int cc = <int>(task // g.n_fb)
    cdef int fb = <int>(task - <isize>cc * g.n_fb)
    cdef long q0 = (cc * g.T // g.n_cc) * MDNN_NR
    cdef long q1 = ((cc + 1) * g.T // g.n_cc) * MDNN_NR
    cdef int ncols = <int>((q1 if q1 < g.Q else g.Q) - q0)
    cdef int f0 = fb * g.fw
    cdef int nf = g.fw if f0 + g.fw <= g.c.F else g.c.F - f0
    if g.direct:
        mdnn_conv_task_direct(&g.c, q0, ncols, f0, nf, g.ws + tid * g.ws_per_thread)
    else:
        mdnn_conv_task(&g.c, q0, ncols, f0, nf, g.ws + tid * g.ws_per_thread)


cdef bint _use_implicit(const ConvArgs* a) noexcept nogil:
    """Our implicit GEMM or im2col + OpenBLAS? A rule measured on the
    reference machine (2-core EPYC, AVX2; bench/bench_cpu.py --convs-only): ours
    wins by 1.05-2.9x on the ResNet/LeNet convs except in the two cases below."""
    if _force_path == 1:
        return False
    if _force_path == 2:
        return True
    if not mdnn_have_avx2():
        return False      # the portable micro-kernel is no match for OpenBLAS
    cdef isize Q = <isize>a.N * a.P
    cdef isize padded = _ceil(Q, MDNN_NR) * MDNN_NR
    # a ragged last tile of <= MDNN_NARROW columns runs as dot products
    # (batch 1 at 7x7: 49 = 3*16 + 1); a wider one is padded to NR columns,
    # and when that is mostly padding OpenBLAS wastes less
    if Q % MDNN_NR <= MDNN_NARROW:
        padded = Q
    if (padded - Q) * 100 > 15 * padded:
        return False
    # strided convs with output rows narrower than 8 (ResNet-18's 14x14 ->
    # 7x7 stage) at batch > 1: every packed run is a short masked gather, and
    # OpenBLAS's im2col + sgemm is as fast or up to ~6% faster. At batch 1
    # (49 columns: 3 tiles + a narrow one) ours is ~10% faster.
    if (a.sy > 1 or a.sx > 1) and a.Co < 8 and a.N > 1:
        return False
    # 1x1 stride-1 unpadded convs (MobileNet's pointwise layers) at batch > 1: no
    # im2col is needed, each sample is one sgemm, and OpenBLAS ran 1.1-2.1x faster
    # than ours on 15 of MobileNet-v2's 19 such shapes at batch 16 (within 0.7-1.0x
    # on the other 4); at batch 1 ours was faster on 16 of 19
    # (bench/bench_cpu.py --convs-only --nets mobilenet_v2)
    if a.nr == 1 and a.nc == 1 and a.sy == 1 and a.sx == 1 and a.py == 0 and a.px == 0 \
            and a.N > 1:
        return False
    # and at batch 1 the 7x7 projections with long reductions (MobileNet-v2's 960 > 320,
    # 960 > 160, 576 > 160): 49 columns are 3 tiles and a narrow one, each re-reading the
    # filters' rows; OpenBLAS packs them once and ran 1.15-1.25x faster
    if a.nr == 1 and a.nc == 1 and a.sy == 1 and a.sx == 1 and a.py == 0 and a.px == 0 \
            and Q <= 64 and a.KRS >= 512:
        return False
    return True


cdef void _conv_implicit(const ConvArgs* a, int nt) except *:
    cdef IgArgs g
    g.c.x = a.x; g.c.w = a.w; g.c.b = a.b; g.c.z = a.z; g.c.y = a.y
    g.c.N = a.N; g.c.K = a.K; g.c.R = a.R; g.c.C = a.C; g.c.F = a.F
    g.c.nr = a.nr; g.c.nc = a.nc; g.c.sy = a.sy; g.c.sx = a.sx
    g.c.py = a.py; g.c.px = a.px; g.c.Ro = a.Ro; g.c.Co = a.Co
    g.c.P = a.P; g.c.KRS = a.KRS; g.c.act = a.act; g.c.act_p = a.act_p
    _ig_plan(&g, nt)
    cdef isize ntasks = <isize>g.n_cc * g.n_fb
    if ntasks < nt:
        nt = <int>ntasks
    cdef bint private = False
    cdef float* ws = _workspace_acquire(<size_t>(g.ws_per_thread * nt), &private)
    g.ws = ws
    cdef isize t
    try:
        with nogil:
            mdnn_parallel_for(ntasks, nt, _ig_task_run, &g)
    finally:
        _workspace_release(ws, private)


def _set_kc(int v):
    """Tuning knob: the largest K block of the implicit path (default 320,
    at most MDNN_KC = 512); returns the previous value."""
    global mdnn_kc
    prev = mdnn_kc
    mdnn_kc = max(16, min(v, MDNN_KC))
    return prev


def _set_mc(int v):
    """Tuning knob: the largest filter block of the implicit path (default 120,
    at most MDNN_MC = 240); returns the previous value."""
    global mdnn_mc
    prev = mdnn_mc
    mdnn_mc = max(6, min(v, MDNN_MC))
    return prev


def _set_zc_rows_outer(int v):
    """Tuning knob: the largest reduction length (K of a 1x1 conv) whose zero-copy route
    runs filter tiles outside column tiles (default 16); returns the previous value."""
    global mdnn_zc_rows_outer
    prev = mdnn_zc_rows_outer
    mdnn_zc_rows_outer = v
    return prev


def _set_direct_bytes(int v):
    """Tuning knob: bytes of padded input rows per task (padded-rows variant)."""
    global IG_DIRECT_BYTES
    IG_DIRECT_BYTES = v


def _set_panel(int v):
    """Tuning knob: bytes of packed B per task of the implicit path."""
    global IG_PANEL_BYTES
    IG_PANEL_BYTES = v


def _conv_path_for(x_shape, w_shape, int stride_y, int stride_x, int pad_y, int pad_x):
    """The path conv2d takes for these shapes: "implicit" or "blas"."""
    cdef ConvArgs a
    N, K, R, C = x_shape
    F, _, nr, nc = w_shape
    a.N, a.K, a.R, a.C, a.F, a.nr, a.nc = N, K, R, C, F, nr, nc
    a.sy, a.sx, a.py, a.px = stride_y, stride_x, pad_y, pad_x
    a.Ro = mdnn_out_size(R, nr, stride_y, pad_y, 1)
    a.Co = mdnn_out_size(C, nc, stride_x, pad_x, 1)
    a.P = a.Ro * a.Co
    a.KRS = K * nr * nc
    return "implicit" if a.KRS > 0 and _use_implicit(&a) else "blas"


def _ig_plan_for(x_shape, w_shape, int stride_y, int stride_x, int pad_y, int pad_x, int nt):
    """The implicit-GEMM task plan (for tests and tuning): a dict."""
    cdef IgArgs g
    N, K, R, C = x_shape
    F, _, nr, nc = w_shape
    g.c.N, g.c.K, g.c.R, g.c.C, g.c.F, g.c.nr, g.c.nc = N, K, R, C, F, nr, nc
    g.c.sy, g.c.sx, g.c.py, g.c.px = stride_y, stride_x, pad_y, pad_x
    g.c.Ro = mdnn_out_size(R, nr, stride_y, pad_y, 1)
    g.c.Co = mdnn_out_size(C, nc, stride_x, pad_x, 1)
    g.c.P = g.c.Ro * g.c.Co
    g.c.KRS = K * nr * nc
    _ig_plan(&g, nt)
    return dict(direct=bool(g.direct), ncw=g.ncw, n_cc=g.n_cc, T=g.T, fw=g.fw, n_fb=g.n_fb,
                ws_per_thread=g.ws_per_thread, tasks=g.n_cc * g.n_fb)


def conv2d(x, w, b, y, int stride_y, int stride_x, int pad_y, int pad_x, act):
    """y (N,F,Ro,Co) = cross-correlation of x (N,K,R,C) with w (F,K,nr,nc),
    zero padding, + b (F,) if b is not None, then the activation act
    (ops.Act; True: relu, False/None: identity)."""
    _conv(x, w, b, None, y, stride_y, stride_x, pad_y, pad_x, act, "conv2d")


def conv2d_residual(x, w, b, z, y, int stride_y, int stride_x, int pad_y, int pad_x,
                    act):
    """As conv2d, plus the residual z (N,F,Ro,Co, the shape of y) added in the
    same epilogue, before the activation: y = act(conv(x, w) + b + z). z must
    not share memory with y (it may with x or w: it is only read)."""
    _conv(x, w, b, z, y, stride_y, stride_x, pad_y, pad_x, act, "conv2d_residual")


cdef int _conv(x, w, b, z, y, int stride_y, int stride_x, int pad_y, int pad_x, act,
               str op) except -1:
    """conv2d (z is None) and conv2d_residual: validation, then one of the
    paths, the residual threaded through their epilogues as a pointer
    (NULL for conv2d)."""
    cdef float act_p
    cdef int act_code = _act(act, &act_p, op)
    cdef cnp.ndarray ax = _f32_nd(x, op + " x", 4)
    cdef cnp.ndarray aw = _f32_nd(w, op + " w", 4)
    cdef cnp.ndarray ay = _f32_nd(y, op + " y", 4, True)
    cdef cnp.ndarray ab = None
    cdef cnp.ndarray az = None
    cdef ConvArgs a
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), R = _dim(ax, 2), C = _dim(ax, 3)
    cdef isize F = _dim(aw, 0), nr = _dim(aw, 2), nc = _dim(aw, 3)
    cdef isize Ro, Co
    if stride_y < 1 or stride_x < 1 or pad_y < 0 or pad_x < 0:
        raise ValueError(f"{op}: strides must be >= 1 and pads >= 0, got "
                         f"stride ({stride_y}, {stride_x}) pad ({pad_y}, {pad_x})")
    if _dim(aw, 1) != K:
        raise ValueError(f"{op}: w {_shape(aw)} does not match x {_shape(ax)} (channels)")
    if nr < 1 or nc < 1 or nr > R + 2 * pad_y or nc > C + 2 * pad_x:
        raise ValueError(f"{op}: filter {nr}x{nc} does not fit the padded input "
                         f"{R}x{C} (pad {pad_y}, {pad_x})")
    Ro = mdnn_out_size(R, nr, stride_y, pad_y, 1)
    Co = mdnn_out_size(C, nc, stride_x, pad_x, 1)
    if _dim(ay, 0) != N or _dim(ay, 1) != F or _dim(ay, 2) != Ro or _dim(ay, 3) != Co:
        raise ValueError(f"{op}: y has shape {_shape(ay)}, expected {(N, F, Ro, Co)}")
    if b is not None:
        ab = _f32(b, op + " b")
        if cnp.PyArray_SIZE(ab) != F:
            raise ValueError(f"{op}: b has {cnp.PyArray_SIZE(ab)} elements, expected {F}")
    if op == "conv2d_residual":
        if z is None:
            raise ValueError("conv2d_residual: z (the residual) is required")
        az = _f32_nd(z, "conv2d_residual z", 4)
        if not _same_shape(az, ay):
            raise ValueError(f"conv2d_residual: z has shape {_shape(az)}, expected the "
                             f"shape of y {(N, F, Ro, Co)}")
        if _overlap(ay, az):
            raise ValueError("conv2d_residual: the residual z must not share memory with "
                             "the output y")
    _no_alias(ay, ax, op)
    _no_alias(ay, aw, op)
    _check_int(K * nr * nc * max(Ro * Co, F), op + " K*nr*nc*max(Ro*Co, F)")
    _check_int(N * Ro * Co, op + " N*Ro*Co")
    _check_int(K * R * C, op + " K*R*C")
    _check_int(F * Ro * Co, op + " F*Ro*Co")
    if N == 0 or F == 0 or Ro * Co == 0:
        return 0

    a.x = _ptr(ax); a.w = _ptr(aw); a.y = _ptr(ay)
    a.b = _ptr(ab) if ab is not None else NULL
    a.z = _ptr(az) if az is not None else NULL
    a.N = <int>N; a.K = <int>K; a.R = <int>R; a.C = <int>C; a.F = <int>F
    a.nr = <int>nr; a.nc = <int>nc; a.sy = stride_y; a.sx = stride_x
    a.py = pad_y; a.px = pad_x; a.Ro = <int>Ro; a.Co = <int>Co
    a.P = <int>(Ro * Co); a.KRS = <int>(K * nr * nc); a.act = act_code; a.act_p = act_p
    a.direct = nr == 1 and nc == 1 and stride_y == 1 and stride_x == 1 and pad_y == 0 and pad_x == 0

    # the team by the work (check.pxi, MACS_PER_THREAD): tiny layers stay on this thread
    cdef int nt = _threads_for_macs(<double>N * a.F * a.P * (a.KRS if a.KRS > 0 else 1))
    if a.KRS > 0 and _use_implicit(&a):
        _conv_implicit(&a, nt)
        return 0
    _plan(&a, nt)
    cdef isize ntasks = <isize>a.n_g * a.n_pc * a.n_fb
    if ntasks < nt:
        nt = <int>ntasks
    cdef bint private = False
    cdef float* ws = _workspace_acquire(<size_t>(a.ws_per_thread * nt), &private)
    a.ws = ws
    cdef isize t
    try:
        with nogil:
            mdnn_parallel_for(ntasks, nt, _conv_task_run, &a)
    finally:
        _workspace_release(ws, private)
    return 0


def _conv_plan(x_shape, w_shape, int stride_y, int stride_x, int pad_y, int pad_x, int nt):
    """The task plan conv2d would use (for tests and tuning): a dict."""
    cdef ConvArgs a
    N, K, R, C = x_shape
    F, _, nr, nc = w_shape
    a.N, a.K, a.R, a.C, a.F, a.nr, a.nc = N, K, R, C, F, nr, nc
    a.Ro = mdnn_out_size(R, nr, stride_y, pad_y, 1)
    a.Co = mdnn_out_size(C, nc, stride_x, pad_x, 1)
    a.P = a.Ro * a.Co
    a.KRS = K * nr * nc
    a.direct = nr == 1 and nc == 1 and stride_y == 1 and stride_x == 1 and pad_y == 0 and pad_x == 0
    _plan(&a, nt)
    return dict(G=a.G, n_g=a.n_g, pw=a.pw, n_pc=a.n_pc, fw=a.fw, n_fb=a.n_fb,
                ws_per_thread=a.ws_per_thread, tasks=a.n_g * a.n_pc * a.n_fb)


cdef void _fc_gemv(const float* x, const float* w, const float* b, float* y,
                   int N, int D, int O, int o0, int no, int act, float ap) noexcept nogil:
    """y[:, o0:o0+no] for N <= MDNN_NARROW samples: dot products along D
    (gemm_avx2.h's narrow-tile kernel, the samples as its columns), 6
    outputs at a time; w (O x D) streams through once."""
    cdef long yoff[4]
    cdef int u, o = o0, mr
    for u in range(N):
        yoff[u] = <long>u * O
    while o < o0 + no:
        mr = o0 + no - o if o0 + no - o < MDNN_MR else MDNN_MR
        mdnn_kernel_narrow(mr, N, D, w + <isize>o * D, D, x, y + o, yoff, 1, MDNN_EPI,
                           b + o if b != NULL else NULL, NULL, act, ap)
        o += mr


cdef void _fc_task(const float* x, const float* w, const float* b, float* y,
                   int N, int D, int O, int n0, int nn, int o0, int no,
                   int act, float ap) noexcept nogil:
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
    if b == NULL and act == MDNN_ACT_IDENTITY:
        return
    for r in range(nn):
        yr = y + <isize>(n0 + r) * O + o0
        if b != NULL:
            for c in range(no):
                yr[c] = yr[c] + b[o0 + c]
        if act == MDNN_ACT_RELU:
            for c in range(no):
                yr[c] = max(yr[c], <float>0.0)
        elif act != MDNN_ACT_IDENTITY:
            mdnn_act_array(act, ap, yr, yr, no)


cdef struct FcArgs:
    const float* x
    const float* w
    const float* b
    float* y
    int N, D, O, act
    float ap
    int nb, parts          # gemv: blocks of 6 outputs, cut into parts tasks
    int ns, no, bn, bo     # sgemm: samples x outputs tasks of bn x bo


cdef void _fc_gemv_run(void* ctx, long t, int tid) noexcept nogil:
    cdef const FcArgs* a = <const FcArgs*>ctx
    cdef int lo = <int>(t * a.nb // a.parts) * 6
    cdef int hi = min(<int>((t + 1) * a.nb // a.parts) * 6, a.O)
    if hi > lo:
        _fc_gemv(a.x, a.w, a.b, a.y, a.N, a.D, a.O, lo, hi - lo, a.act, a.ap)


cdef void _fc_sgemm_run(void* ctx, long t, int tid) noexcept nogil:
    cdef const FcArgs* a = <const FcArgs*>ctx
    cdef int n0 = <int>(t // a.no) * a.bn
    cdef int o0 = <int>(t % a.no) * a.bo
    cdef int nn = min(a.bn, a.N - n0)
    cdef int nno = min(a.bo, a.O - o0)
    if nn > 0 and nno > 0:
        _fc_task(a.x, a.w, a.b, a.y, a.N, a.D, a.O, n0, nn, o0, nno, a.act, a.ap)


def fc(x, w, b, y, act):
    """y (N,O) = x (N,D) @ w (O,D).T + b (O,) if b is not None, then max(., 0)
    the activation act. x may be any C-contiguous (N, ...) array of N*D elements, y any
    (N, ...) array of N*O elements."""
    cdef float ap
    cdef int act_code = _act(act, &ap, "fc")
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
    cdef int nt = _threads_for_macs(<double>N * O * (D if D > 0 else 1))
    cdef int nb, t0
    cdef FcArgs fa
    if mdnn_have_avx2() and N <= MDNN_NARROW and D > 0 and _force_path != 1:
        # a few samples: sgemm would pack w for a matrix-vector product
        nb = (<int>O + 5) // 6              # blocks of 6 outputs
        if nt > nb:
            nt = nb if nb > 0 else 1
        fa.x, fa.w, fa.b, fa.y = px, pw, pb, py
        fa.N, fa.D, fa.O, fa.nb, fa.parts, fa.act, fa.ap = <int>N, <int>D, <int>O, nb, 4 * nt, act_code, ap
        if fa.parts > nb:
            fa.parts = nb
        with nogil:
            mdnn_parallel_for(fa.parts, nt, _fc_gemv_run, &fa)
        return
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
    fa.x, fa.w, fa.b, fa.y = px, pw, pb, py
    fa.N, fa.D, fa.O, fa.act, fa.ap = <int>N, <int>D, <int>O, act_code, ap
    fa.ns, fa.no, fa.bn, fa.bo = ns, no_, bn, bo
    with nogil:
        mdnn_parallel_for(ntasks, nt, _fc_sgemm_run, &fa)


# ------------------------------------------------------------ conv2d_transpose
#
# dlib's cont_: the adjoint of conv2d. Per task (sample n, block of output
# channels [f0, f0+nf)): col (nf*nr*nc x R*C) = w[:, f0:f0+nf]^T (nf*nr*nc x K)
# * x_n (K x R*C) with one single-threaded sgemm, then col2im scatters the
# columns into y_n's nf planes (im2col.pxi, the conv geometry with y as the
# input), then the bias/activation epilogue on those planes. A 1x1 stride-1
# unpadded filter writes straight into y (no col2im). The channel block is the
# largest whose columns fit TR_COL_BYTES (L2), at least one channel; at 2+
# threads with fewer samples than threads, or samples that do not divide among
# them, the channels are split further so that every thread gets work.

cdef isize TR_COL_BYTES = 512 * 1024


cdef struct TrArgs:
    const float* x
    const float* w
    const float* b
    float* y
    float* ws
    isize ws_per_thread
    int N, K, R, C, F, nr, nc, sy, sx, py, px, Ro, Co, P, FRS
    int fw, n_fb
    bint direct
    int act
    float act_p


cdef void _tr_plan(TrArgs* a, int nt) noexcept nogil:
    cdef isize fw = TR_COL_BYTES // (4 * <isize>a.nr * a.nc * (a.P if a.P > 0 else 1))
    cdef isize q
    if fw < 1:
        fw = 1
    if fw > a.F:
        fw = a.F
    if nt > 1 and a.N % nt != 0 and a.N < 4 * nt:
        # few samples that do not divide among the threads: cut the channels too
        q = 1
        while (a.N * q) % nt != 0:
            q += 1
        if _ceil(a.F, fw) < q and a.F >= q:
            fw = _ceil(a.F, q)
    a.fw = <int>fw
    a.n_fb = <int>_ceil(a.F, fw)
    a.ws_per_thread = 0 if a.direct else (<isize>a.fw * a.nr * a.nc * a.P + 15) // 16 * 16


cdef void _tr_task_run(void* ctx, long task, int tid) noexcept nogil:
    _tr_task(<const TrArgs*>ctx, task, tid)


cdef void _tr_task(const TrArgs* a, isize task, int tid) noexcept nogil:
    cdef int n = <int>(task // a.n_fb)
    cdef int fb = <int>(task - <isize>n * a.n_fb)
    cdef int f0 = fb * a.fw
    cdef int nf = a.fw if f0 + a.fw <= a.F else a.F - f0
    cdef int rows = nf * a.nr * a.nc, P = a.P, K = a.K, ldb = a.FRS
    cdef isize op = <isize>a.Ro * a.Co
    cdef float one = 1.0, zero = 0.0
    cdef float* yn = a.y + (<isize>n * a.F + f0) * op
    cdef float* col = yn if a.direct else a.ws + tid * a.ws_per_thread
    # column-major: col^T (P x rows) = x_n^T (P x K) * w[:, f0 block] (K x rows)
    sgemm(b"N", b"T", &P, &rows, &K, &one, <float*>a.x + <isize>n * a.K * a.P, &P,
          <float*>a.w + <isize>f0 * a.nr * a.nc, &ldb, &zero, col, &P)
    if not a.direct:
        _col2im(col, yn, nf, a.Ro, a.Co, a.nr, a.nc, a.sy, a.sx, a.py, a.px, 1, 1, a.R, a.C)
    _epilogue(yn, op, nf, <int>op, a.b + f0 if a.b != NULL else NULL, NULL, a.act, a.act_p)


def _set_tr_col_bytes(isize v):
    """Tuning knob: bytes of columns per task of conv2d_transpose; returns the previous."""
    global TR_COL_BYTES
    prev = TR_COL_BYTES
    TR_COL_BYTES = v if v > 0 else 1
    return prev


cdef int _tr_fill(TrArgs* a, tuple xs, tuple ws, int sy, int sx, int py, int px, str op) except -1:
    N, K, R, C = xs
    Kw, F, nr, nc = ws
    if sy < 1 or sx < 1 or py < 0 or px < 0:
        raise ValueError(f"{op}: strides must be >= 1 and pads >= 0, got "
                         f"stride ({sy}, {sx}) pad ({py}, {px})")
    if Kw != K:
        raise ValueError(f"{op}: w {ws} does not match x {xs} (w.shape[0] is the input channels)")
    Ro = sy * (R - 1) + nr - 2 * py
    Co = sx * (C - 1) + nc - 2 * px
    if R < 1 or C < 1 or K < 1:
        raise ValueError(f"{op}: x {xs} is empty")
    if nr < 1 or nc < 1 or Ro < 1 or Co < 1:
        raise ValueError(f"{op}: filter {nr}x{nc} with pad ({py}, {px}) leaves no output "
                         f"(stride*(in-1) + n - 2*pad = {Ro}x{Co})")
    a.N, a.K, a.R, a.C, a.F, a.nr, a.nc = N, K, R, C, F, nr, nc
    a.sy = sy; a.sx = sx; a.py = py; a.px = px; a.Ro = Ro; a.Co = Co
    a.P = R * C; a.FRS = F * nr * nc
    a.direct = nr == 1 and nc == 1 and sy == 1 and sx == 1 and py == 0 and px == 0
    return 0


def _tr_plan_for(x_shape, w_shape, int stride_y, int stride_x, int pad_y, int pad_x, int nt):
    """conv2d_transpose's task plan (for tests and tuning): a dict."""
    cdef TrArgs a
    _tr_fill(&a, tuple(x_shape), tuple(w_shape), stride_y, stride_x, pad_y, pad_x, "_tr_plan_for")
    _tr_plan(&a, nt)
    return dict(fw=a.fw, n_fb=a.n_fb, tasks=a.N * a.n_fb, direct=bool(a.direct),
                ws_per_thread=a.ws_per_thread)


def conv2d_transpose(x, w, b, y, int stride_y, int stride_x, int pad_y, int pad_x, act):
    """y (N,F,Ro,Co) = the transposed convolution of x (N,K,R,C) with w (K,F,nr,nc)
    (dlib's cont_): x[n,k,i,j] * w[k,f,a,c] is added at y[n, f, i*stride_y - pad_y + a,
    j*stride_x - pad_x + c] (dropped outside), Ro = stride_y*(R-1) + nr - 2*pad_y (same
    for columns); + b (F,) unless None; then the activation act."""
    op = "conv2d_transpose"
    cdef float act_p
    cdef int act_code = _act(act, &act_p, op)
    cdef cnp.ndarray ax = _f32_nd(x, op + " x", 4)
    cdef cnp.ndarray aw = _f32_nd(w, op + " w", 4)
    cdef cnp.ndarray ay = _f32_nd(y, op + " y", 4, True)
    cdef cnp.ndarray ab = None
    cdef TrArgs a
    _tr_fill(&a, _shape(ax), _shape(aw), stride_y, stride_x, pad_y, pad_x, op)
    if _shape(ay) != (a.N, a.F, a.Ro, a.Co):
        raise ValueError(f"{op}: y has shape {_shape(ay)}, expected {(a.N, a.F, a.Ro, a.Co)}")
    if b is not None:
        ab = _f32(b, op + " b")
        if cnp.PyArray_SIZE(ab) != a.F:
            raise ValueError(f"{op}: b has {cnp.PyArray_SIZE(ab)} elements, expected {a.F}")
    _no_alias(ay, ax, op)
    _no_alias(ay, aw, op)
    _check_int(<isize>a.FRS * a.P, op + " F*nr*nc*R*C")
    _check_int(<isize>a.N * a.K * a.P, op + " N*K*R*C")
    _check_int(<isize>a.N * a.F * a.Ro * a.Co, op + " N*F*Ro*Co")
    _check_int(<isize>a.K * a.FRS, op + " w")
    if a.N == 0 or a.F == 0:
        return
    a.x = _ptr(ax); a.w = _ptr(aw); a.y = _ptr(ay)
    a.b = _ptr(ab) if ab is not None else NULL
    a.act = act_code; a.act_p = act_p
    cdef int nt = _threads_for_macs(<double>a.N * a.K * a.P * a.FRS)
    _tr_plan(&a, nt)
    cdef isize ntasks = <isize>a.N * a.n_fb, t
    if ntasks < nt:
        nt = <int>ntasks
    cdef bint private = False
    cdef float* ws = _workspace_acquire(<size_t>(a.ws_per_thread * nt), &private)
    a.ws = ws
    try:
        with nogil:
            mdnn_parallel_for(ntasks, nt, _tr_task_run, &a)
    finally:
        _workspace_release(ws, private)


def set_num_threads(int n):
    """Set the OpenMP team size used by every CPU kernel (process-wide)."""
    if n < 1:
        raise ValueError(f"set_num_threads: need n >= 1, got {n}")
    openmp.omp_set_num_threads(n)


def get_num_threads():
    return openmp.omp_get_max_threads()

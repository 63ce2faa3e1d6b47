# cython: language_level=3
"""Winograd convolution on the CPU: conv2d_winograd, its filter transform
(winograd_filters) and its route (winograd_tile). The ops are declared in the
"Winograd (CPU)" section of minidnn/ops.py; kernels/cpu/winograd.h has the
layouts and the loop nest.

A 3x3 stride-1 convolution as F(m x m, 3 x 3), m = 2, 4 or 6: the filters
are transformed once (winograd_filters, when the forward is compiled: the
layer caches the result, core.Plan.cached), each alpha x alpha input tile
(alpha = m + 2) once per call, and the products summed over channels are
alpha^2 GEMMs on gemm_avx2.h's micro-kernel; the bias, the residual z and
the activation are applied in the output transform.

Threading: tasks are (chunk of tiles, part of the filters), run by
parallel.h's parallel-for (claimed from a shared counter: a slow or
descheduled thread holds nobody up; each task is computed by one thread, so
results do not depend on the thread count's timing), each thread in its own
part of the module's grow-only workspace (workspace.pxi); the GIL is
released.
"""
include "check.pxi"
include "act.pxi"
include "parallel.pxi"

from libc.string cimport memset

cdef extern from "winograd.h" nogil:
    ctypedef struct mdnn_wino_t:
        const float* x
        const float* u
        const float* b
        const float* z
        float* y
        int N, K, R, C, F, py, px, Ro, Co
        int m, alpha, A2
        int tr, tc
        long ntiles
        int K8, S
        int act
        float act_p
        int unit
        long nunits
        int nchunks, Tst, fbw, nparts, part_blocks, kc
        long ws_band, ws_V, ws_M
    int mdnn_have_avx2()
    void mdnn_wino_filters(const float* w, float* u, int F, int K, int m, int f0, int f1)
    void mdnn_wino_task(const mdnn_wino_t* w, int chunk, int part, float* ws, int* last)

include "workspace.pxi"


def workspace_bytes():
    """Size of this module's grow-only workspace, in bytes (for tests/benchmarks)."""
    return _ws_n * sizeof(float)


# ------------------------------------------------------------------ the plan
#
# Tuning knobs, measured on the reference machine (2-core EPYC, 512 KiB L2
# per core): the per-thread working set of a chunk (V: alpha^2 x T tiles x K8
# floats, plus one M block: alpha^2 x T x fbw) should sit in L2, but a chunk
# reads all of U (alpha^2 x K x F floats, from L3 or memory), so it also
# needs enough tiles to amortise that.
cdef isize WINO_L2_BYTES = 384 * 1024
cdef int WINO_MIN_T = 24          # fewest tiles per chunk (unless there are fewer)
cdef int WINO_MAX_T = 240         # most tiles per chunk
cdef int WINO_FBW = 64            # filters per M block (a multiple of 16)
cdef int WINO_KC = 256            # K block of the GEMMs (<= MDNN_KC)
cdef int MAX_THREADS = 512        # the per-thread "last chunk" table of a call


cdef inline isize _ceil(isize a, isize b) noexcept nogil:
    return (a + b - 1) // b


cdef void _wino_geometry(mdnn_wino_t* w, int N, int K, int R, int C, int F, int py, int px,
                         int m) noexcept nogil:
    w.N = N; w.K = K; w.R = R; w.C = C; w.F = F; w.py = py; w.px = px
    w.Ro = R + 2 * py - 2
    w.Co = C + 2 * px - 2
    w.m = m
    w.alpha = m + 2
    w.A2 = w.alpha * w.alpha
    w.tr = <int>_ceil(w.Ro, m)
    w.tc = <int>_ceil(w.Co, m)
    w.ntiles = <long>N * w.tr * w.tc
    w.K8 = <int>_ceil(K, 8) * 8
    w.S = <int>_ceil(F, 16)


cdef void _wino_plan(mdnn_wino_t* w, int nt) noexcept nogil:
    """Chunks of tiles, filter blocks and parts: enough tasks for nt threads,
    each task's V and M block in L2 where that leaves enough tiles."""
    cdef isize fbw = min(<isize>w.S * 16, <isize>(WINO_FBW // 16 * 16 if WINO_FBW >= 16 else 16))
    cdef isize nblocks = _ceil(w.F, fbw)
    cdef isize T = WINO_L2_BYTES // (4 * <isize>w.A2 * (w.K8 + fbw))
    cdef isize nchunks, nparts = 1, q
    T = T // 6 * 6
    if T < WINO_MIN_T:
        T = WINO_MIN_T
    if T > WINO_MAX_T:
        T = WINO_MAX_T
    if T < 1:
        T = 1
    nchunks = _ceil(w.ntiles, T)
    if nt > 1 and nchunks < 4 * nt and nchunks % nt != 0:
        # few chunks that do not divide among the threads: split the filters
        # (each part reads its share of U) if there are enough blocks, else
        # more, smaller chunks (each reads all of U) while they keep 6 tiles
        if nblocks >= nt and nchunks < nt:
            nparts = nt
        else:
            q = _ceil(nchunks, nt) * nt
            if w.ntiles >= 6 * q:
                nchunks = q
            elif nblocks >= nt:
                nparts = nt
    if nchunks > w.ntiles:
        nchunks = w.ntiles
    if nchunks < 1:
        nchunks = 1
    # chunks of whole tile rows when they hold at least one: each input row band
    # is converted once
    w.unit = w.tc if w.ntiles // nchunks >= w.tc else 1
    w.nunits = w.ntiles // w.unit
    w.nchunks = <int>nchunks
    w.Tst = <int>(_ceil(w.nunits, nchunks) * w.unit)
    w.fbw = <int>fbw
    w.part_blocks = <int>_ceil(nblocks, nparts)
    w.nparts = <int>_ceil(nblocks, w.part_blocks)
    w.kc = WINO_KC
    cdef isize wb = min(<isize>w.Tst, <isize>w.tc) * w.m + 2
    w.ws_band = (<isize>w.alpha * wb * 8 + 15) // 16 * 16
    w.ws_V = (<isize>w.A2 * w.Tst * w.K8 + 15) // 16 * 16
    w.ws_M = (<isize>w.A2 * w.Tst * w.fbw + 15) // 16 * 16


# ------------------------------------------------------------------ the route

def _have_avx2():
    """Whether the kernels were compiled with AVX2 + FMA (else the portable 8-float
    vectors and micro-kernel: correct, slower; the route then keeps to conv2d)."""
    return bool(mdnn_have_avx2())

#
# 0: by shape (winograd_tile's rule), -1: never, 2/4/6: always that m.
cdef int _force = 0


def _set_winograd(mode):
    """Force the route of con_ layers' 3x3 stride-1 convolutions: "auto" (the
    measured rule), "off" (conv2d always), or "2", "4", "6" (conv2d_winograd at
    that m for every such shape). For tests and tuning; returns the previous mode."""
    global _force
    names = {"auto": 0, "off": -1, "2": 2, "4": 4, "6": 6}
    mode = str(mode)
    if mode not in names:
        raise ValueError(f"_set_winograd: expected one of {sorted(names)}, got {mode!r}")
    prev = next(k for k, v in names.items() if v == _force)
    _force = names[mode]
    return prev


def winograd_tile(x, w, int stride_y, int stride_x, int pad_y, int pad_x):
    """The output tile m (2, 4 or 6) at which conv2d_winograd runs the
    convolution of x (N, K, R, C) with w (F, K, nr, nc) at these strides and
    pads fastest, or 0 when conv2d is faster or the shape is not a 3x3
    stride-1 one (only shapes are read)."""
    N, K, R, C = (int(v) for v in x.shape)
    F, Kw, nr, nc = (int(v) for v in w.shape)
    if nr != 3 or nc != 3 or stride_y != 1 or stride_x != 1 or Kw != K or pad_y < 0 or pad_x < 0:
        return 0
    if R + 2 * pad_y < 3 or C + 2 * pad_x < 3 or N < 1 or K < 1 or F < 1:
        return 0
    if _force != 0:
        return 0 if _force < 0 else _force
    if not mdnn_have_avx2():
        return 0          # the portable kernels are no match for conv2d's OpenBLAS route
    return _rule(N, K, R, C, F, pad_y, pad_x)


# The rule's cost model, in units of one multiply-add of the GEMMs, fitted to
# 104 shapes timed on the reference machine (one core, interleaved: batch 1
# and 4-64, images 2x2 to 56x56, K and F from 1 to 512; the implicit GEMM of
# conv2d runs on the same micro-kernel at about the same rate):
#   implicit GEMM:  N Ro Co 9 K F
#   Winograd(m):    alpha^2 tiles K F16                   (the GEMMs)
#                 + alpha^2 tiles (WINO_C_IN K8 + WINO_C_OUT F8)   (transforms)
#                 + chunks alpha^2 K F16 (WINO_C_U_L3 if U fits in WINO_U_L3_BYTES,
#                                         else WINO_C_U_MEM)   (each chunk reads U)
# F16/F8/K8: rounded up to 16/8. The model's ratio is within ~2.5% (geometric
# mean) of the best measured choice over those shapes; Winograd is taken where
# it predicts at least WINO_MIN_GAIN, m = 4 unless m = 2 or 6 is predicted
# WINO_M_GAIN faster (F(6x6)'s error is twice F(4x4)'s: see tests/test_winograd.py).
# What it captures: Winograd loses when K or F is small (the transforms
# dominate: the stems with K = 3) and at few tiles with a large K F (batch 1
# at 2x2-3x3, 256-512 channels: U read from memory for 4-9 tiles).
cdef double WINO_C_IN = 4.0
cdef double WINO_C_OUT = 10.0
cdef double WINO_C_U_L3 = 0.5
cdef double WINO_C_U_MEM = 2.0
cdef double WINO_U_L3_BYTES = 4e6
cdef double WINO_MIN_GAIN = 1.1
cdef double WINO_M_GAIN = 1.1
cdef double WINO_C_M6 = 1.15       # F(6x6)'s larger transforms: measured ~12% above the model


cdef double _wino_cost(int N, int K, int R, int C, int F, int py, int px, int m) noexcept nogil:
    cdef mdnn_wino_t w
    _wino_geometry(&w, N, K, R, C, F, py, px, m)
    _wino_plan(&w, 1)
    cdef double a2 = w.A2, tiles = w.ntiles, f16 = w.S * 16.0
    cdef double ub = a2 * K * f16 * 4.0
    cdef double c = (a2 * tiles * K * f16 + a2 * tiles * (WINO_C_IN * w.K8 + WINO_C_OUT * _ceil(F, 8) * 8)
                     + w.nchunks * a2 * K * f16 * (WINO_C_U_L3 if ub <= WINO_U_L3_BYTES else WINO_C_U_MEM))
    return c * WINO_C_M6 if m == 6 else c


cdef int _rule(int N, int K, int R, int C, int F, int py, int px):
    """The measured rule: the m whose modelled cost is lowest, if it beats conv2d."""
    cdef double direct = <double>N * (R + 2 * py - 2) * (C + 2 * px - 2) * 9.0 * K * F
    cdef double c4 = _wino_cost(N, K, R, C, F, py, px, 4)
    cdef double c2 = _wino_cost(N, K, R, C, F, py, px, 2)
    cdef double c6 = _wino_cost(N, K, R, C, F, py, px, 6)
    cdef int m = 4
    cdef double c = c4
    if c2 * WINO_M_GAIN < c:
        m, c = 2, c2
    if c6 * WINO_M_GAIN < c:
        m, c = 6, c6
    return m if direct >= WINO_MIN_GAIN * c else 0


def _cost_model(x_shape, F, int pad_y, int pad_x):
    """The rule's modelled costs (for tests and tuning): {"direct": ..., 2: ..., 4: ..., 6: ...}."""
    N, K, R, C = (int(v) for v in x_shape)
    d = {m: _wino_cost(N, K, R, C, F, pad_y, pad_x, m) for m in (2, 4, 6)}
    d["direct"] = float(N) * (R + 2 * pad_y - 2) * (C + 2 * pad_x - 2) * 9.0 * K * F
    d["rule"] = _rule(N, K, R, C, F, pad_y, pad_x)
    return d


# ------------------------------------------------------------------ the filters

def winograd_filters(w, u, int m):
    """u (alpha^2, ceil(F/16), K, 16), alpha = m + 2: the Winograd transform
    G w[f, k] G^T of each 3x3 filter of w (F, K, 3, 3), in float64, packed in
    slivers of 16 filters (the lanes past F zero)."""
    op = "winograd_filters"
    cdef cnp.ndarray aw = _f32_nd(w, op + " w", 4)
    cdef cnp.ndarray au = _f32_nd(u, op + " u", 4, True)
    if m not in (2, 4, 6):
        raise ValueError(f"{op}: m must be 2, 4 or 6, got {m}")
    cdef isize F = _dim(aw, 0), K = _dim(aw, 1)
    cdef isize A = m + 2
    if _dim(aw, 2) != 3 or _dim(aw, 3) != 3:
        raise ValueError(f"{op}: w must be (F, K, 3, 3), got {_shape(aw)}")
    want = (A * A, (F + 15) // 16, K, 16)
    if _shape(au) != want:
        raise ValueError(f"{op}: u has shape {_shape(au)}, expected {want}")
    _no_alias(au, aw, op)
    _check_int(F * K * 9, op + " F*K*9")
    _check_int(A * A * ((F + 15) // 16) * K * 16, op + " u size")
    if F == 0 or K == 0:
        return
    cdef FilterRun fr
    fr.w = _ptr(aw)
    fr.u = _ptr(au)
    fr.F = <int>F
    fr.K = <int>K
    fr.m = m
    cdef int nb = <int>((F + 15) // 16), nt = _threads_for(F * K, 4096)
    with nogil:
        if F % 16:
            memset(fr.u, 0, <size_t>(A * A * ((F + 15) // 16) * K * 16) * sizeof(float))
        mdnn_parallel_for(nb, nt, _filters_run, &fr)


cdef struct FilterRun:
    const float* w
    float* u
    int F, K, m


cdef void _filters_run(void* ctx, long i, int tid) noexcept nogil:
    cdef FilterRun* r = <FilterRun*>ctx
    mdnn_wino_filters(r.w, r.u, r.F, r.K, r.m, <int>i * 16, min(<int>i * 16 + 16, r.F))


# ------------------------------------------------------------------ the convolution

def conv2d_winograd(x, u, b, z, y, int pad_y, int pad_x, int m, act):
    """y (N, F, Ro, Co) = act(conv2d(x, w) + b + z) for a 3x3 stride-1 filter
    bank w given as u = winograd_filters(w, m); F is y's channel count; b (F,)
    and z (the shape of y, never sharing its memory) may be None."""
    op = "conv2d_winograd"
    cdef float act_p
    cdef int act_code = _act(act, &act_p, op)
    cdef cnp.ndarray ax = _f32_nd(x, op + " x", 4)
    cdef cnp.ndarray au = _f32_nd(u, op + " u", 4)
    cdef cnp.ndarray ay = _f32_nd(y, op + " y", 4, True)
    cdef cnp.ndarray ab = None
    cdef cnp.ndarray az = None
    if m not in (2, 4, 6):
        raise ValueError(f"{op}: m must be 2, 4 or 6, got {m}")
    if pad_y < 0 or pad_x < 0:
        raise ValueError(f"{op}: pads must be >= 0, got ({pad_y}, {pad_x})")
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), R = _dim(ax, 2), C = _dim(ax, 3)
    cdef isize F = _dim(ay, 1), A = m + 2
    if R + 2 * pad_y < 3 or C + 2 * pad_x < 3:
        raise ValueError(f"{op}: a 3x3 filter does not fit the padded input {R}x{C} "
                         f"(pad {pad_y}, {pad_x})")
    cdef isize Ro = R + 2 * pad_y - 2, Co = C + 2 * pad_x - 2
    if _shape(ay) != (N, F, Ro, Co):
        raise ValueError(f"{op}: y has shape {_shape(ay)}, expected {(N, F, Ro, Co)}")
    want = (A * A, (F + 15) // 16, K, 16)
    if _shape(au) != want:
        raise ValueError(f"{op}: u has shape {_shape(au)}, expected {want} "
                         f"(winograd_filters of a ({F}, {K}, 3, 3) filter bank at m = {m})")
    if b is not None:
        ab = _f32(b, op + " b")
        if cnp.PyArray_SIZE(ab) != F:
            raise ValueError(f"{op}: b has {cnp.PyArray_SIZE(ab)} elements, expected {F}")
    if z is not None:
        az = _f32_nd(z, op + " z", 4)
        if not _same_shape(az, ay):
            raise ValueError(f"{op}: z has shape {_shape(az)}, expected the shape of y "
                             f"{(N, F, Ro, Co)}")
        if _overlap(ay, az):
            raise ValueError(f"{op}: the residual z must not share memory with the output y")
    _no_alias(ay, ax, op)
    _no_alias(ay, au, op)
    if ab is not None:
        _no_alias(ay, ab, op)
    _check_int(N * F * Ro * Co, op + " N*F*Ro*Co")
    _check_int(N * K * R * C, op + " N*K*R*C")
    _check_int(A * A * ((F + 15) // 16) * K * 16, op + " u size")
    _check_int(N * ((Ro + m - 1) // m) * ((Co + m - 1) // m), op + " tiles")
    if N == 0 or F == 0:
        return
    if K == 0:
        # no channels: the convolution is 0
        _fill_epilogue(ay, ab, az, act_code, act_p)
        return

    cdef mdnn_wino_t w
    _wino_geometry(&w, <int>N, <int>K, <int>R, <int>C, <int>F, pad_y, pad_x, m)
    w.x = _ptr(ax); w.u = _ptr(au); w.y = _ptr(ay)
    w.b = _ptr(ab) if ab is not None else NULL
    w.z = _ptr(az) if az is not None else NULL
    w.act = act_code; w.act_p = act_p
    cdef int nt = _threads_for_macs(<double>N * F * Ro * Co * K * 9 / 2.25)   # F(4x4): ~2.25x fewer
    if nt > MAX_THREADS:
        nt = MAX_THREADS
    _wino_plan(&w, nt)
    cdef isize ntasks = <isize>w.nchunks * w.nparts
    if ntasks < nt:
        nt = <int>ntasks
    _run(&w, nt, ntasks)


cdef struct WinoRun:
    const mdnn_wino_t* w
    float* ws
    isize per              # workspace floats per thread
    int* last              # per thread: the chunk whose V its workspace holds


cdef void _wino_task_run(void* ctx, long t, int tid) noexcept nogil:
    cdef WinoRun* r = <WinoRun*>ctx
    mdnn_wino_task(r.w, <int>(t // r.w.nparts), <int>(t % r.w.nparts), r.ws + tid * r.per,
                   &r.last[tid])


cdef int _run(const mdnn_wino_t* w, int nt, isize ntasks) except -1:
    cdef WinoRun r
    cdef bint private = False
    cdef int last[512]
    cdef int i
    r.w = w
    r.per = w.ws_band + w.ws_V + w.ws_M
    r.ws = _workspace_acquire(<size_t>(r.per * nt), &private)
    r.last = &last[0]
    for i in range(nt):
        last[i] = -1
    try:
        with nogil:
            mdnn_parallel_for(ntasks, nt, _wino_task_run, &r)
    finally:
        _workspace_release(r.ws, private)
    return 0


cdef int _fill_epilogue(cnp.ndarray ay, cnp.ndarray ab, cnp.ndarray az, int act,
                        float ap) except -1:
    """y = act(0 + b + z) (a convolution over zero channels)."""
    cdef isize N = _dim(ay, 0), F = _dim(ay, 1), P = _dim(ay, 2) * _dim(ay, 3), n, f, p
    cdef float* py = _ptr(ay)
    cdef const float* pb = _ptr(ab) if ab is not None else NULL
    cdef const float* pz = _ptr(az) if az is not None else NULL
    cdef float* row
    for n in range(N):
        for f in range(F):
            row = py + (n * F + f) * P
            for p in range(P):
                row[p] = (pb[f] if pb != NULL else 0.0) + (pz[(n * F + f) * P + p] if pz != NULL else 0.0)
            mdnn_act_array(act, ap, row, row, P)
    return 0


# ------------------------------------------------------------------ for tests and tuning

def _plan_for(x_shape, F, int pad_y, int pad_x, int m, int nt):
    """The task plan conv2d_winograd would use (a dict)."""
    cdef mdnn_wino_t w
    N, K, R, C = x_shape
    _wino_geometry(&w, N, K, R, C, F, pad_y, pad_x, m)
    _wino_plan(&w, nt)
    return dict(m=m, tiles=w.ntiles, tr=w.tr, tc=w.tc, unit=w.unit, nchunks=w.nchunks, Tst=w.Tst,
                fbw=w.fbw,
                nparts=w.nparts, part_blocks=w.part_blocks, kc=w.kc, K8=w.K8,
                ws_per_thread=w.ws_band + w.ws_V + w.ws_M,
                tasks=w.nchunks * w.nparts)


def _set_knob(str name, int value):
    """Set a tuning knob ("l2_bytes", "min_t", "max_t", "fbw", "kc"); returns the previous value."""
    global WINO_L2_BYTES, WINO_MIN_T, WINO_MAX_T, WINO_FBW, WINO_KC
    if name == "l2_bytes":
        prev = WINO_L2_BYTES; WINO_L2_BYTES = max(1024, value)
    elif name == "min_t":
        prev = WINO_MIN_T; WINO_MIN_T = max(1, value)
    elif name == "max_t":
        prev = WINO_MAX_T; WINO_MAX_T = max(1, value)
    elif name == "fbw":
        prev = WINO_FBW; WINO_FBW = max(16, value // 16 * 16)
    elif name == "kc":
        prev = WINO_KC; WINO_KC = max(8, min(value, 512))
    else:
        raise ValueError(f"_set_knob: unknown knob {name!r}")
    return prev


def _knobs():
    return dict(l2_bytes=WINO_L2_BYTES, min_t=WINO_MIN_T, max_t=WINO_MAX_T, fbw=WINO_FBW,
                kc=WINO_KC, max_threads=MAX_THREADS)

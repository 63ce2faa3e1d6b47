"""minidnn.backends.cuda: the ops of docs/INTERNALS.md on PyCUDA GPUArrays.

WHAT THIS MODULE REPRESENTS
    The CUDA backend. Same function names and signatures as backends/cpu.py;
    tensors are float32, C-contiguous PyCUDA ``GPUArray``s shaped (N, K, R, C)
    (``fc`` sees (N, D)), outputs are preallocated by the caller.

    Importing it initialises CUDA: it retains the device's *primary* context
    (the one the CUDA runtime, cuDNN and PyTorch use, so device pointers can
    be shared with them) and makes it current, like ``pycuda.autoprimaryctx``
    but keeping the handle in ``context``. It raises ``RuntimeError`` naming
    what is missing (PyCUDA, the driver, a GPU) and how to install it.

    Every kernel is launched on one stream owned by the backend, ``stream``
    (its raw handle is ``stream.handle``; hand it to cuDNN/cuBLAS). Launches
    are asynchronous: no op synchronises the host. ``to_numpy`` waits for the
    stream. Kernels come from kernels/cuda/*.cu, compiled on first use by
    PyCUDA's SourceModule (cached on disk by PyCUDA), one module per family.

    Per shape, the first call builds a plan (grid, block, prepared function,
    argument layout, any scratch such as the convolution index table or a
    split-K workspace) and caches it; later calls with the same shapes do a
    dict lookup, pack the arguments and launch. Plans and their scratch live
    as long as the process, so captured graphs never see them freed.
    conv2d_residual shares conv2d's kernels (an optional residual pointer in
    their epilogue and in the split-K reduction; 0 for conv2d) and its routing.
    conv2d and fc (batch > 8) choose their tile and split-K factor per shape:
    a time model ranks the candidates and the best few are timed once on the
    GPU, on the caller's arrays, when the plan is built (this synchronises;
    plans must therefore be built outside graph capture, which capture()'s
    warm-up run does). MINIDNN_CUDA_AUTOTUNE=0 uses the model alone, which
    makes the choice, and so the summation order, the same on every run.

    ``capture(fn)`` records everything ``fn()`` launches on ``stream`` into a
    CUDA graph and returns a ``Graph`` whose ``launch()`` replays it.

Extra names besides the contract: stream, context, device, Graph, capture,
synchronize, upload, copy, CudaMemoryError, load_kernels.
"""
from __future__ import annotations

import ctypes
import gc
import importlib.resources
import os
import shutil
import time
from pathlib import Path

import numpy as np

name = "cuda"

_INSTALL_HINT = 'install the GPU extra with: pip install "minidnn[gpu]"'

# ---------------------------------------------------------------------------
# Initialisation: PyCUDA, driver, device, primary context, stream.

try:
    import pycuda.driver as drv
    import pycuda.gpuarray as gpuarray
    from pycuda.compiler import SourceModule
    from pycuda._pvt_struct import pack as _pack
except Exception as _e:  # ImportError, or a PyCUDA whose libcuda cannot load
    raise RuntimeError(
        f"minidnn's CUDA backend needs PyCUDA, which cannot be imported ({_e!r}); "
        f"{_INSTALL_HINT} (it needs an NVIDIA driver and the CUDA toolkit's nvcc)"
    ) from _e

try:
    drv.init()
except Exception as _e:
    raise RuntimeError(
        f"minidnn's CUDA backend: the CUDA driver failed to initialise ({_e}); "
        "is an NVIDIA driver installed and a GPU visible (nvidia-smi)?"
    ) from _e

if drv.Device.count() < 1:
    raise RuntimeError(
        "minidnn's CUDA backend: the CUDA driver sees no GPU "
        "(check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    )


def _make_context():
    import atexit

    dev = drv.Device(0)
    ctx = dev.retain_primary_context()
    ctx.push()

    def _finish():
        try:
            from pycuda.tools import clear_context_caches

            drv.Context.pop()
            clear_context_caches()
        except Exception:
            pass

    atexit.register(_finish)
    return dev, ctx


try:
    device, context = _make_context()
    stream = drv.Stream()
except Exception as _e:
    raise RuntimeError(f"minidnn's CUDA backend: cannot create a CUDA context on GPU 0 ({_e})") from _e

_SM_COUNT = device.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
_CC = device.compute_capability()


class CudaMemoryError(MemoryError):
    """The GPU has not enough free memory for an allocation."""


def _alloc(shape, dtype=np.float32):
    try:
        return gpuarray.empty(shape, dtype)
    except drv.MemoryError:
        gc.collect()  # drop GPUArrays that are only waiting for the collector
        try:
            return gpuarray.empty(shape, dtype)
        except drv.MemoryError:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            try:
                free, total = drv.mem_get_info()
                have = f"{free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB"
            except Exception:
                have = "free memory unknown"
            raise CudaMemoryError(
                f"minidnn cuda: out of GPU memory allocating {nbytes / 2**20:.1f} MiB "
                f"for an array of shape {tuple(shape)} ({have})"
            ) from None


# ---------------------------------------------------------------------------
# Memory primitives of the backend contract.

def empty(shape):
    """A new uninitialised float32 GPUArray of `shape` (C order)."""
    return _alloc(tuple(int(s) for s in shape))


def asarray(a):
    """A new GPUArray holding a copy of the NumPy array `a` (floats become float32)."""
    a = np.asarray(a)
    if a.dtype.kind == "f" or a.dtype.kind == "b":
        a = a.astype(np.float32, copy=False)
    a = np.ascontiguousarray(a)
    out = _alloc(a.shape, a.dtype)
    if a.size:
        # synchronous copy on the legacy stream; `stream` is a blocking stream,
        # so this is ordered after the work already queued there
        drv.memcpy_htod(out.gpudata, a)
    return out


def upload(dst, src):
    """Copy the NumPy array `src` into the existing GPUArray `dst`, ordered on
    `stream` (no allocation). `src` must match dst's size; it is converted to
    dst's dtype and made contiguous first."""
    src = np.ascontiguousarray(src, dtype=dst.dtype)
    if src.size != dst.size:
        raise ValueError(f"upload: {src.shape} does not fit into {dst.shape}")
    drv.memcpy_htod_async(dst.gpudata, src, stream)


def copy(dst, src):
    """Copy GPUArray `src` into GPUArray `dst` (same size and dtype), ordered on `stream`."""
    if src.size != dst.size or src.dtype != dst.dtype:
        raise ValueError(f"copy: {src.shape} {src.dtype} does not fit into {dst.shape} {dst.dtype}")
    if src.size:
        drv.memcpy_dtod_async(dst.gpudata, src.gpudata, src.nbytes, stream)


def to_numpy(arr):
    """A NumPy copy of GPUArray `arr`, after all work queued on `stream`."""
    stream.synchronize()
    return arr.get()


def synchronize():
    """Wait until everything queued on `stream` has run."""
    stream.synchronize()


# ---------------------------------------------------------------------------
# Kernel modules.

def _kernel_dir() -> Path:
    try:
        d = importlib.resources.files("minidnn") / "kernels" / "cuda"
        if d.is_dir():
            return Path(str(d))
    except Exception:  # minidnn not importable as a package (source tree, mid-edit)
        pass
    d = Path(__file__).resolve().parents[2] / "kernels" / "cuda"
    if d.is_dir():
        return d
    raise RuntimeError(
        "minidnn's CUDA backend cannot find its kernels (minidnn/kernels/cuda in the "
        "installed package, or kernels/cuda in the source tree); reinstall minidnn"
    )


_modules: dict = {}


def _module(family):
    mod = _modules.get(family)
    if mod is None:
        src = (_kernel_dir() / f"{family}.cu").read_text()
        try:
            mod = SourceModule(src, no_extern_c=True, options=["-O3"])
        except Exception as e:
            if shutil.which("nvcc") is None:
                raise RuntimeError(
                    f"minidnn's CUDA backend compiles kernels/cuda/{family}.cu at run time "
                    "and needs nvcc (the CUDA toolkit) on PATH"
                ) from e
            raise
        _modules[family] = mod
    return mod


def load_kernels():
    """Compile/load every kernel module now (they are otherwise loaded on first use)."""
    for fam in ("conv", "gemm", "pool", "eltwise", "softmax"):
        _module(fam)


class _Kernel:
    """One prepared kernel with a fixed launch configuration, launched on `stream`."""

    __slots__ = ("fmt", "grid", "block", "shared", "_launch", "_func")

    def __init__(self, family, fname, fmt, grid, block, shared=0):
        func = _module(family).get_function(fname)
        func.prepare(fmt)
        self._func = func
        self.fmt = func.arg_format
        self.grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        self.shared = shared
        # Function._launch_kernel is what prepared_async_call ends in; calling it
        # with the arguments packed here skips per-call work we have done once.
        self._launch = getattr(func, "_launch_kernel", None)

    def __call__(self, *args):
        if self._launch is not None:
            self._launch(self.grid, self.block, _pack(self.fmt, *args), self.shared, stream)
        else:  # a PyCUDA without the private fast path
            self._func.prepared_async_call(self.grid, self.block, stream, *args,
                                           shared_size=self.shared)


def _ptr(a):
    return 0 if a is None else a.gpudata.__int__()


def _check(cond, what):
    if not cond:
        raise ValueError(f"minidnn cuda: {what}")


def _f32c(a, label):
    _check(a.dtype == np.float32, f"{label} must be float32, got {a.dtype}")
    _check(a.flags.c_contiguous, f"{label} must be C-contiguous")


def _blocks(n, per=256):
    return max(1, (n + per - 1) // per)


# ---------------------------------------------------------------------------
# conv2d

_CONV_CFGS = {  # name: (BM, BN, BK)
    "conv_128x128": (128, 128, 8),
    "conv_64x64": (64, 64, 16),
}
_FC_CFGS = {"fc_tile": (64, 64, 16)}
_plans: dict = {}

# A crude model, used to rank launch configurations before timing the best few
# (and alone when autotuning is off). Numbers measured on an H100: either tile
# sustains ~83 GMAC/s per SM with the SM full; fewer resident blocks hide less
# latency (_EFF[r-1] = relative throughput with r blocks resident).
_SM_MAC_RATE = 83e9
_OCC = {"conv_128x128": 2, "conv_64x64": 4, "fc_tile": 4}
_EFF = {"conv_128x128": (0.6, 1.0), "conv_64x64": (0.3, 0.55, 0.8, 1.0),
        "fc_tile": (0.3, 0.55, 0.8, 1.0)}
_ITER_LAT = 0.5e-6           # floor per k-tile iteration of a wave (load latency + barrier)
_MEM_BW = 2.5e12             # bytes/s
_LAUNCH_S = 2e-6             # one extra kernel launch

_force_gemm = None   # tests: (kernel name, S) overrides the choice
_AUTOTUNE = os.environ.get("MINIDNN_CUDA_AUTOTUNE", "1") not in ("0", "", "no", "false")


def _gemm_candidates(rows, cols, Kd, cfgs, out_elems):
    """[(model time, kernel name, BM, BN, BK, S, kchunk)] sorted, best first.
    GEMM: rows tiled by BM (blockIdx.y), cols by BN (blockIdx.x), Kd split S ways."""
    if _force_gemm is not None and _force_gemm[0] in cfgs:
        kname, S = _force_gemm
        BM, BN, BK = cfgs[kname]
        kchunk = -(-(-(-Kd // BK)) // S) * BK
        return [(0.0, kname, BM, BN, BK, -(-Kd // kchunk), kchunk)]
    cands = {}
    for kname, (BM, BN, BK) in cfgs.items():
        blocks = -(-cols // BN) * -(-rows // BM)
        nkt = -(-Kd // BK)
        occ, eff = _OCC[kname], _EFF[kname]
        for S in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            if S > 1 and (blocks * S > 8 * _SM_COUNT or nkt < 2 * S):
                continue
            kchunk = -(-nkt // S) * BK
            S = -(-Kd // kchunk)
            per_sm = -(-(blocks * S) // _SM_COUNT)      # blocks on the busiest SM
            full, r = divmod(per_sm, occ)
            work = BM * BN * kchunk / _SM_MAC_RATE       # one block alone at full rate
            t = full * occ * work / eff[occ - 1] + (r * work / eff[r - 1] if r else 0.0)
            t = max(t, (full + (r > 0)) * (kchunk // BK) * _ITER_LAT)
            if S > 1:
                t += (S + 1) * out_elems * 4 / _MEM_BW + _LAUNCH_S
            cands[(kname, S)] = (t, kname, BM, BN, BK, S, kchunk)
    return sorted(cands.values())


class _GemmPlan:
    """A (split-K) GEMM launch plus, when split, its reduction epilogue."""

    __slots__ = ("main", "main_name", "reduce", "ws", "keep", "S", "n_out", "inner", "F",
                 "args", "model_s", "tuned_s", "conv")


def _splitk_reduce_kernel(n_out):
    # (ws, b, z, y, n, S, inner, F, relu): z is the residual (0: none)
    return _Kernel("eltwise", "splitk_reduce", "PPPPiiiii", (_blocks(n_out),), (256,))


def _run_gemm(plan, x, w, b, y, relu, z=None):
    """One run of a GEMM plan (the autotuner's and the router's timing calls; the
    ops inline the same launches). Conv kernels take the residual z after b."""
    if plan.S == 1:
        if plan.conv:
            plan.main(x.gpudata, w.gpudata, _ptr(b), _ptr(z), y.gpudata, *plan.args)
        else:
            plan.main(x.gpudata, w.gpudata, _ptr(b), y.gpudata, *plan.args)
    else:
        if plan.conv:
            plan.main(x.gpudata, w.gpudata, 0, 0, plan.ws.gpudata, *plan.args)
        else:
            plan.main(x.gpudata, w.gpudata, 0, plan.ws.gpudata, *plan.args)
        plan.reduce(plan.ws.gpudata, _ptr(b), _ptr(z), y.gpudata, plan.n_out, plan.S,
                    plan.inner, plan.F, int(bool(relu)))


_spin = None


def _autotune(plans, x, w, b, y, relu, z=None, reps=3, rounds=2):
    """Time each candidate plan on the GPU (the op itself on the caller's
    arrays: inputs are only read, y is rewritten by every run) and return the
    fastest. A spin kernel runs first, so the host has queued every timed
    launch before the first event: host launch overhead stays out."""
    global _spin
    if len(plans) == 1:
        return plans[0]
    if _spin is None:
        _spin = _Kernel("eltwise", "spin_wait", "q", (1,), (1,))
    best = [float("inf")] * len(plans)
    for _ in range(rounds):
        for i, p in enumerate(plans):
            e0, e1 = drv.Event(), drv.Event()
            _spin(300_000)
            e0.record(stream)
            for _ in range(reps):
                _run_gemm(p, x, w, b, y, relu, z)
            e1.record(stream)
            e1.synchronize()
            best[i] = min(best[i], e1.time_since(e0) * 1e-3 / reps)
    i = min(range(len(plans)), key=best.__getitem__)
    plans[i].tuned_s = best[i]
    return plans[i]


def _pick_gemm(make, cands, x, w, b, y, relu, z=None, ntune=5):
    """Build the plan of the best modelled candidate, or time the best few."""
    if not _AUTOTUNE or len(cands) == 1:
        return make(*cands[0][1:], model_s=cands[0][0])
    top = cands[:ntune]
    for kname in {c[1] for c in cands}:   # also each tile's unsplit launch
        c1 = [c for c in cands if c[1] == kname and c[5] == 1]
        if c1 and c1[0] not in top:
            top.append(c1[0])
    plans = [make(*c[1:], model_s=c[0]) for c in top]
    return _autotune(plans, x, w, b, y, relu, z)


def _conv_plan(x, w, b, z, y, sy, sx, py, px, relu):
    _check(len(x.shape) == 4 and len(w.shape) == 4 and len(y.shape) == 4,
           "conv2d wants x (N,K,R,C), w (F,K,nr,nc), y (N,F,Ro,Co)")
    N, K, R, C = x.shape
    F, Kw, nr, nc = w.shape
    _check(Kw == K, f"conv2d: w has {Kw} input channels, x has {K}")
    _check(min(sy, sx) >= 1 and min(py, px) >= 0, "conv2d: strides >= 1, pads >= 0")
    Ro = 1 + (R + 2 * py - nr) // sy
    Co = 1 + (C + 2 * px - nc) // sx
    _check(Ro >= 1 and Co >= 1, f"conv2d: {nr}x{nc} filter larger than padded {R}x{C} input")
    _check(tuple(y.shape) == (N, F, Ro, Co), f"conv2d: y must be {(N, F, Ro, Co)}, got {y.shape}")
    _check(b is None or b.size == F, f"conv2d: b must have {F} elements")
    for a, lab in ((x, "x"), (w, "w"), (y, "y")) + (((b, "b"),) if b is not None else ()):
        _f32c(a, "conv2d " + lab)
    if z is not None:
        _check(tuple(z.shape) == tuple(y.shape),
               f"conv2d_residual: z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
        _f32c(z, "conv2d_residual z")
        _check_no_alias(z, y)
    _check(nr < 65536 and nc < 65536, "conv2d: filter too large")
    _check(x.size < 2**31 and y.size < 2**31 and w.size < 2**31,
           "conv2d: tensors beyond 2**31 elements are not supported")

    Kd = K * nr * nc
    P = Ro * Co
    Ncols = N * P
    # index table: q = (k, r, c) -> {k*R*C + r*C + c, r << 16 | c}
    q = np.arange(Kd, dtype=np.int64)
    k, rem = np.divmod(q, nr * nc)
    r, c = np.divmod(rem, nc)
    tab = np.empty((Kd, 2), dtype=np.int32)
    tab[:, 0] = k * R * C + r * C + c
    tab[:, 1] = (r << 16) | c
    tab_gpu = asarray(tab)
    # float4 stores of y (and loads of z at the same offsets)
    vec = int(P % 4 == 0 and _ptr(y) % 16 == 0 and _ptr(z) % 16 == 0)

    def make(kname, BM, BN, BK, S, kchunk, model_s):
        plan = _GemmPlan()
        plan.main_name, plan.S, plan.model_s, plan.tuned_s = kname, S, model_s, None
        plan.conv = True
        # arguments: conv.cu's CONV_ARGS (x, w, b, z, y, tab, F, Kd, ...)
        plan.main = _Kernel("conv", kname, "PPPPPP" + "i" * 14 + "qi",
                            (-(-Ncols // BN), -(-F // BM), S), (256,))
        plan.n_out, plan.inner, plan.F = int(y.size), P, F
        plan.keep = tab_gpu
        plan.ws = empty((S * y.size,)) if S > 1 else None
        plan.reduce = _splitk_reduce_kernel(plan.n_out) if S > 1 else None
        tail = (tab_gpu.gpudata, F, Kd, R, C, K * R * C, Co, P, Ncols, sy, sx, py, px)
        if S > 1:
            plan.args = tail + (0, kchunk, int(y.size), vec)
        else:
            plan.args = tail + (int(bool(relu)), kchunk, 0, vec)
        return plan

    return _pick_gemm(make, _gemm_candidates(F, Ncols, Kd, _CONV_CFGS, y.size), x, w, b, y, relu,
                      z)


# ---------------------------------------------------------------------------
# Routing convolutions through cuDNN, where it is installed.
#
# The route mode: "auto" lets each convolution shape take the faster of cuDNN
# and the own kernels, both timed on the GPU at its first call; "cudnn" always
# takes cuDNN (where it is installed); "own" never does. MINIDNN_CUDA_CONV sets
# it at import, set_conv_route() later. The choice per shape is kept in _routes
# and reported by conv_route() / dnn.backend_info.

_route_mode = os.environ.get("MINIDNN_CUDA_CONV", "auto").lower()
_routes: dict = {}      # (x shape, w shape, stride, pad, relu, residual) -> "cudnn" | "own"
_CUDNN = "cudnn"


def set_conv_route(mode):
    """Choose how convolutions run: "auto", "cudnn" or "own" (see above). Forgets the
    choices made so far: call it before compiling a net, or move the net again
    with net.to("cuda") so that it is recompiled."""
    global _route_mode
    if mode not in ("auto", "cudnn", "own"):
        raise ValueError(f"conv route must be 'auto', 'cudnn' or 'own', got {mode!r}")
    _route_mode = mode
    _routes.clear()
    for k in [k for k in _plans if k[0] == "conv"]:
        del _plans[k]


def use_cudnn():
    """Whether convolutions may run through cuDNN (it is installed and not turned off)."""
    return _cudnn_module() is not None


def _cudnn_module():
    """backends.cudnn when cuDNN can be used, else None."""
    if _route_mode == "own":
        return None
    from . import cudnn
    return cudnn if cudnn.available() else None


def _time_call(fn, reps=3, rounds=2):
    """The cost of fn() per call in seconds: the larger of its GPU time (events around
    reps calls queued behind a spin kernel, so launch costs stay out of it) and its
    host time (the same calls enqueued while the GPU spins). A graph replay removes
    the host part, an eager forward does not: the larger of the two is the one that
    can bound a forward, and at batch 1 cuDNN's host cost per call often does."""
    global _spin
    if _spin is None:
        _spin = _Kernel("eltwise", "spin_wait", "q", (1,), (1,))
    best_gpu = best_host = float("inf")
    for _ in range(rounds):
        e0, e1 = drv.Event(), drv.Event()
        _spin(2_000_000)
        e0.record(stream)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best_host = min(best_host, (time.perf_counter() - t) / reps)
        e1.record(stream)
        e1.synchronize()
        best_gpu = min(best_gpu, e1.time_since(e0) * 1e-3 / reps)
    return max(best_gpu, best_host)


def _choose_conv(x, w, b, z, y, sy, sx, py, px, relu):
    """The plan of one convolution shape (with the residual z, or z None): the own
    kernels' plan, or _CUDNN. Both are timed as called: with the residual when
    there is one."""
    route_key = (tuple(x.shape), tuple(w.shape), (sy, sx), (py, px), bool(relu), z is not None)
    cudnn = _cudnn_module()
    if cudnn is not None and _route_mode == "cudnn":
        _routes[route_key] = _CUDNN
        return _CUDNN
    plan = _conv_plan(x, w, b, z, y, sy, sx, py, px, relu)
    route = "own"
    if cudnn is not None:
        if z is None:
            def via_cudnn():
                cudnn.conv2d(x, w, b, y, sy, sx, py, px, relu)
        else:
            def via_cudnn():
                cudnn.conv2d_residual(x, w, b, z, y, sy, sx, py, px, relu)
        try:
            t_cudnn = _time_call(via_cudnn)
        except Exception:          # cuDNN cannot run this shape: the own kernel can
            t_cudnn = float("inf")
        t_own = _time_call(lambda: _run_gemm(plan, x, w, b, y, relu, z))
        if t_cudnn < t_own:
            plan, route = _CUDNN, _CUDNN
    _routes[route_key] = route
    return plan


def _cudnn_module_cached():
    from . import cudnn
    return cudnn


def conv_route(x_shape, w_shape, stride_y, stride_x, pad_y, pad_x, relu, residual=False):
    """"cudnn" or "own": the implementation chosen for this convolution shape, or None
    when the shape has not run yet. residual=True asks about conv2d_residual, whose
    route is chosen (and timed) separately from conv2d's."""
    return _routes.get((tuple(map(int, x_shape)), tuple(map(int, w_shape)),
                        (int(stride_y), int(stride_x)), (int(pad_y), int(pad_x)), bool(relu),
                        bool(residual)))


def _check_no_alias(z, y):
    """ValueError unless z and y are distinct, non-overlapping buffers."""
    if z is y:
        raise ValueError("minidnn cuda: conv2d_residual: z must not be y")
    zp, yp = z.gpudata.__int__(), y.gpudata.__int__()
    if zp < yp + y.nbytes and yp < zp + z.nbytes:
        raise ValueError("minidnn cuda: conv2d_residual: z overlaps y in memory "
                         f"(z at {zp:#x} + {z.nbytes} bytes, y at {yp:#x} + {y.nbytes} bytes)")


def conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x, relu):
    """y (N,F,Ro,Co) = cross-correlation of x (N,K,R,C) with w (F,K,nr,nc),
    zero padding, + b (F,) if b is not None, then max(., 0) if relu.
    Ro = 1 + (R + 2*pad_y - nr) // stride_y (same for columns).
    Runs the own implicit-GEMM kernel or cuDNN, whichever was faster for the shape."""
    key = ("conv", x.shape, w.shape, y.shape, b is None, stride_y, stride_x, pad_y, pad_x, relu,
           y.gpudata.__int__() & 15)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _choose_conv(x, w, b, None, y, int(stride_y), int(stride_x),
                                          int(pad_y), int(pad_x), relu)
    if plan is _CUDNN:
        _cudnn_module_cached().conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x, relu)
        return
    if plan.S == 1:
        plan.main(x.gpudata, w.gpudata, _ptr(b), 0, y.gpudata, *plan.args)
    else:
        plan.main(x.gpudata, w.gpudata, 0, 0, plan.ws.gpudata, *plan.args)
        plan.reduce(plan.ws.gpudata, _ptr(b), 0, y.gpudata, plan.n_out, plan.S,
                    plan.inner, plan.F, int(bool(relu)))


def conv2d_residual(x, w, b, z, y, stride_y, stride_x, pad_y, pad_x, relu):
    """conv2d plus a residual: y = conv(x, w) + b + z, then max(., 0) if relu, in the
    convolution's own epilogue (own kernels: the same kernels as conv2d; cuDNN: the
    fused call's z with alpha2 = 1). z (N,F,Ro,Co) float32 C-contiguous, y's shape;
    it must not be y nor overlap it (ValueError). Routed per shape like conv2d, timed
    with the residual; conv_route(..., residual=True) reports the choice."""
    _check_no_alias(z, y)
    zp = z.gpudata.__int__()
    key = ("conv", x.shape, w.shape, y.shape, b is None, stride_y, stride_x, pad_y, pad_x, relu,
           y.gpudata.__int__() & 15, "residual", z.shape, zp & 15)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _choose_conv(x, w, b, z, y, int(stride_y), int(stride_x),
                                          int(pad_y), int(pad_x), relu)
    if plan is _CUDNN:
        _cudnn_module_cached().conv2d_residual(x, w, b, z, y, stride_y, stride_x, pad_y, pad_x,
                                               relu)
        return
    if plan.S == 1:
        plan.main(x.gpudata, w.gpudata, _ptr(b), zp, y.gpudata, *plan.args)
    else:
        plan.main(x.gpudata, w.gpudata, 0, 0, plan.ws.gpudata, *plan.args)
        plan.reduce(plan.ws.gpudata, _ptr(b), zp, y.gpudata, plan.n_out, plan.S,
                    plan.inner, plan.F, int(bool(relu)))


# ---------------------------------------------------------------------------
# fc

def _fc_plan(x, w, b, y, relu):
    _check(len(w.shape) == 2, "fc wants w (O, D)")
    O, D = w.shape
    N = x.shape[0]
    _check(x.size == N * D, f"fc: x {x.shape} is not (N, {D}) when flattened")
    _check(y.size == N * O and y.shape[0] == N, f"fc: y must be ({N}, {O}), got {y.shape}")
    _check(b is None or b.size == O, f"fc: b must have {O} elements")
    for a, lab in ((x, "x"), (w, "w"), (y, "y")) + (((b, "b"),) if b is not None else ()):
        _f32c(a, "fc " + lab)
    if N <= 8:
        plan = _GemmPlan()
        plan.keep, plan.model_s, plan.tuned_s = None, None, None
        plan.n_out, plan.inner, plan.F = N * O, 1, O
        vec4 = int(D % 4 == 0 and _aligned16(x, w))
        plan.main_name = "fc_small"
        plan.main = _Kernel("gemm", "fc_small", "PPPPiiiii", (-(-O // 8),), (256,))
        plan.S, plan.ws, plan.reduce = 1, None, None
        plan.conv = False
        plan.args = (N, O, D, int(bool(relu)), vec4)
        return plan
    vec = int(O % 4 == 0 and _ptr(y) % 16 == 0)

    def make(kname, BM, BN, BK, S, kchunk, model_s):
        # GEMM rows = samples (x), columns = outputs (w)
        plan = _GemmPlan()
        plan.main_name, plan.S, plan.model_s, plan.tuned_s = kname, S, model_s, None
        plan.keep, plan.conv = None, False
        plan.n_out, plan.inner, plan.F = N * O, 1, O
        plan.main = _Kernel("gemm", kname, "PPPPiiiiiqi", (-(-O // BN), -(-N // BM), S), (256,))
        plan.ws = empty((S * N * O,)) if S > 1 else None
        plan.reduce = _splitk_reduce_kernel(plan.n_out) if S > 1 else None
        if S > 1:
            plan.args = (N, O, D, 0, kchunk, N * O, vec)
        else:
            plan.args = (N, O, D, int(bool(relu)), kchunk, 0, vec)
        return plan

    return _pick_gemm(make, _gemm_candidates(N, O, D, _FC_CFGS, N * O), x, w, b, y, relu)


def fc(x, w, b, y, relu):
    """y (N,O) = x (N,D) @ w(O,D).T + b (O,) if b is not None, then max(., 0) if relu.
    x may be any (N, ...) array of N*D elements (seen as (N, D))."""
    key = ("fc", x.shape, w.shape, y.shape, b is None, relu, _aligned16(x, w, y))
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _fc_plan(x, w, b, y, relu)
    if plan.S == 1:
        plan.main(x.gpudata, w.gpudata, _ptr(b), y.gpudata, *plan.args)
    else:
        plan.main(x.gpudata, w.gpudata, 0, plan.ws.gpudata, *plan.args)
        plan.reduce(plan.ws.gpudata, _ptr(b), 0, y.gpudata, plan.n_out, plan.S,
                    plan.inner, plan.F, int(bool(relu)))


# ---------------------------------------------------------------------------
# elementwise

def _aligned16(*arrs):
    return all(a.gpudata.__int__() % 16 == 0 for a in arrs)


class _EltPlan:
    __slots__ = ("k", "args")


def affine(x, gamma, beta, y, relu):
    """y = x * gamma[k] + beta[k] per channel k of x (N,K,R,C) (gamma, beta (K,)),
    then max(., 0) if relu. y may be x. FC mode: x seen as (N,D,1,1), K = D."""
    vec_ok = _aligned16(x, y)
    key = ("affine", x.shape, y.shape, gamma.size, relu, vec_ok)
    p = _plans.get(key)
    if p is None:
        _check(x.size == y.size, "affine: x and y sizes differ")
        K = int(gamma.size)
        _check(beta.size == K, "affine: gamma and beta sizes differ")
        _check(len(x.shape) >= 2 and x.shape[1] == K,
               f"affine: x {x.shape} must be (N, K, ...) with K = {K}")
        _f32c(x, "affine x")
        _f32c(y, "affine y")
        n = int(x.size)
        RC = n // (x.shape[0] * K) if n else 1
        p = _plans[key] = _EltPlan()
        if vec_ok and RC % 4 == 0:
            p.k = _Kernel("eltwise", "affine_v4", "PPPPiiii", (_blocks(n // 4),), (256,))
            p.args = (n // 4, K, RC // 4, int(bool(relu)))
        else:
            p.k = _Kernel("eltwise", "affine_f", "PPPPiiii", (_blocks(n),), (256,))
            p.args = (n, K, RC, int(bool(relu)))
    if p.args[0]:
        p.k(x.gpudata, gamma.gpudata, beta.gpudata, y.gpudata, *p.args)


def relu(x, y):
    """y = max(x, 0), elementwise; y may be x."""
    vec_ok = _aligned16(x, y)
    key = ("relu", x.size, y.size, vec_ok)
    p = _plans.get(key)
    if p is None:
        _check(x.size == y.size, "relu: x and y sizes differ")
        _f32c(x, "relu x")
        _f32c(y, "relu y")
        n = int(x.size)
        p = _plans[key] = _EltPlan()
        if vec_ok and n % 4 == 0:
            p.k = _Kernel("eltwise", "relu_v4", "PPi", (_blocks(n // 4),), (256,))
            p.args = (n // 4,)
        else:
            p.k = _Kernel("eltwise", "relu_f", "PPi", (_blocks(n),), (256,))
            p.args = (n,)
    if p.args[0]:
        p.k(x.gpudata, y.gpudata, *p.args)


def add(a, b, y, relu):
    """y = a + b (same shapes), then max(., 0) if relu; y may be a or b."""
    vec_ok = _aligned16(a, b, y)
    key = ("add", a.size, b.size, y.size, relu, vec_ok)
    p = _plans.get(key)
    if p is None:
        _check(a.size == b.size == y.size, f"add: sizes differ {a.shape} {b.shape} {y.shape}")
        for t, lab in ((a, "a"), (b, "b"), (y, "y")):
            _f32c(t, "add " + lab)
        n = int(a.size)
        p = _plans[key] = _EltPlan()
        if vec_ok and n % 4 == 0:
            p.k = _Kernel("eltwise", "add_v4", "PPPii", (_blocks(n // 4),), (256,))
            p.args = (n // 4, int(bool(relu)))
        else:
            p.k = _Kernel("eltwise", "add_f", "PPPii", (_blocks(n),), (256,))
            p.args = (n, int(bool(relu)))
    if p.args[0]:
        p.k(a.gpudata, b.gpudata, y.gpudata, *p.args)


# ---------------------------------------------------------------------------
# pooling

def _pool_plan(kind, x, y, nr, nc, sy, sx, py, px):
    _check(len(x.shape) == 4 and len(y.shape) == 4, f"{kind}: x and y must be (N,K,R,C)")
    N, K, R, C = x.shape
    _check(min(sy, sx, nr, nc) >= 1 and 0 <= py < nr and 0 <= px < nc,
           f"{kind}: need window >= 1, stride >= 1, 0 <= pad < window")
    Ro = 1 + (R + 2 * py - nr) // sy
    Co = 1 + (C + 2 * px - nc) // sx
    _check(tuple(y.shape) == (N, K, Ro, Co), f"{kind}: y must be {(N, K, Ro, Co)}, got {y.shape}")
    _f32c(x, kind + " x")
    _f32c(y, kind + " y")
    p = _EltPlan()
    total = int(y.size)
    if nr == R and nc == C and py == 0 and px == 0:  # global pooling: one output per plane
        p.k = _Kernel("pool", "global_pool", "PPiii", (_blocks(N * K, 8),), (256,))
        p.args = (N * K, R * C, int(kind == "max_pool"))
    else:
        p.k = _Kernel("pool", kind, "PPiiiiiiiiiii", (_blocks(total),), (256,))
        p.args = (total, R, C, Ro, Co, nr, nc, sy, sx, py, px)
    return p


def max_pool(x, y, nr, nc, stride_y, stride_x, pad_y, pad_x):
    """y (N,K,Ro,Co) = max over the in-bounds part of each nr x nc window of x (N,K,R,C)."""
    key = ("max_pool", x.shape, y.shape, nr, nc, stride_y, stride_x, pad_y, pad_x)
    p = _plans.get(key)
    if p is None:
        p = _plans[key] = _pool_plan("max_pool", x, y, nr, nc, stride_y, stride_x, pad_y, pad_x)
    p.k(x.gpudata, y.gpudata, *p.args)


def avg_pool(x, y, nr, nc, stride_y, stride_x, pad_y, pad_x):
    """y (N,K,Ro,Co) = mean over the in-bounds part of each window (padding not counted)."""
    key = ("avg_pool", x.shape, y.shape, nr, nc, stride_y, stride_x, pad_y, pad_x)
    p = _plans.get(key)
    if p is None:
        p = _plans[key] = _pool_plan("avg_pool", x, y, nr, nc, stride_y, stride_x, pad_y, pad_x)
    p.k(x.gpudata, y.gpudata, *p.args)


# ---------------------------------------------------------------------------
# softmax

def softmax(x, y):
    """For every (n, r, c) of x (N,K,R,C): y[n,:,r,c] = softmax(x[n,:,r,c]); y may be x."""
    key = ("softmax", x.shape, y.shape)
    p = _plans.get(key)
    if p is None:
        _check(x.size == y.size, "softmax: x and y sizes differ")
        _f32c(x, "softmax x")
        _f32c(y, "softmax y")
        shp = tuple(x.shape) + (1,) * (4 - len(x.shape))
        N, K = shp[0], shp[1]
        RC = int(np.prod(shp[2:]))
        p = _plans[key] = _EltPlan()
        if RC == 1:
            p.k = _Kernel("softmax", "softmax_rows", "PPii", (_blocks(N, 8),), (256,))
            p.args = (N, K)
        else:
            p.k = _Kernel("softmax", "softmax_strided", "PPiii", (_blocks(N * RC, 128),), (128,))
            p.args = (N, K, RC)
    p.k(x.gpudata, y.gpudata, *p.args)


# ---------------------------------------------------------------------------
# CUDA graphs: stream capture through the driver API (this PyCUDA build has no
# graph wrappers), on the raw handle of `stream`.

def _libcuda():
    for nm in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(nm)
        except OSError:
            continue
    raise RuntimeError("minidnn cuda: cannot load libcuda for graph capture")


_cu = None
_CAPTURE_MODE_RELAXED = 2


def _cu_lib():
    global _cu
    if _cu is None:
        lib = _libcuda()
        vp, u64 = ctypes.c_void_p, ctypes.c_ulonglong
        sig = {
            "cuStreamBeginCapture_v2": [vp, ctypes.c_int],
            "cuStreamEndCapture": [vp, ctypes.POINTER(vp)],
            "cuGraphInstantiateWithFlags": [ctypes.POINTER(vp), vp, u64],
            "cuGraphLaunch": [vp, vp],
            "cuGraphExecDestroy": [vp],
            "cuGraphDestroy": [vp],
            "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        }
        for fn, args in sig.items():
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = ctypes.c_int
        _cu = lib
    return _cu


def _cu_check(rc, what):
    if rc != 0:
        msg = ctypes.c_char_p()
        try:
            _cu.cuGetErrorString(rc, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else "?"
        except Exception:
            text = "?"
        raise RuntimeError(f"minidnn cuda: {what} failed with CUDA error {rc} ({text})")


class Graph:
    """A captured sequence of launches on `stream`. launch() replays it on
    `stream` (asynchronously, like any op). It replays the same device
    pointers: the arrays used while capturing must stay alive, and new inputs
    are fed by writing into them (upload)."""

    def __init__(self, graph, exec_):
        self._graph = graph
        self._exec = exec_
        self._cu = _cu
        self._launch = _cu.cuGraphLaunch
        self._stream = ctypes.c_void_p(stream.handle)

    def launch(self):
        rc = self._launch(self._exec, self._stream)
        if rc:
            _cu_check(rc, "cuGraphLaunch")

    replay = launch

    def close(self):
        if self._exec is not None:
            self._cu.cuGraphExecDestroy(self._exec)
            self._cu.cuGraphDestroy(self._graph)
            self._exec = self._graph = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def capture(fn, warmup=True):
    """Record the launches fn() makes on `stream` into a CUDA graph; returns a Graph.

    With warmup (the default) fn() first runs once normally, so that kernels
    are compiled and per-shape plans built before capture (neither may happen
    while capturing). Nothing fn() launches during capture executes then.
    """
    lib = _cu_lib()
    if warmup:
        fn()
        stream.synchronize()
    h = ctypes.c_void_p(stream.handle)
    _cu_check(lib.cuStreamBeginCapture_v2(h, _CAPTURE_MODE_RELAXED), "cuStreamBeginCapture")
    graph = ctypes.c_void_p()
    try:
        fn()
    finally:
        rc_end = lib.cuStreamEndCapture(h, ctypes.byref(graph))
    _cu_check(rc_end, "cuStreamEndCapture (was something synchronous called while capturing?)")
    exec_ = ctypes.c_void_p()
    rc = lib.cuGraphInstantiateWithFlags(ctypes.byref(exec_), graph, 0)
    if rc:
        lib.cuGraphDestroy(graph)
        _cu_check(rc, "cuGraphInstantiate")
    return Graph(graph, exec_)

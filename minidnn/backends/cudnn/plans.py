"""Plans: cuDNN's per-context state, per-shape plans and the convolution ops themselves.

Per CUDA context: one cuDNN handle, set to the backend's stream
(``minidnn.backends.cuda.stream``, or ``set_stream``), and one grow-only
workspace. Per convolution shape (x shape, w shape, stride, padding, and for
``conv2d_grouped`` dilation and group count: cudnnSetConvolutionGroupCount and the
dilation fields of cudnnSetConvolution2dDescriptor): the
descriptors and the forward algorithm, chosen once (cuDNN's heuristic
``cudnnGetConvolutionForwardAlgorithm_v7``; ``MINIDNN_CUDNN_FIND=1`` measures
with ``cudnnFindConvolutionForwardAlgorithm``; ``MINIDNN_CUDNN_ALGO=NAME``
forces one). Math is fp32 FMA only (CUDNN_FMA_MATH on cuDNN >= 8): no TF32,
whatever NVIDIA_TF32_OVERRIDE says.

The path of each call is policy.fused_policy's; when cuDNN answers a fused call
with NOT_SUPPORTED anyway, that (shape, algorithm, activation) falls back to
cudnnConvolutionForward [+ cudnnAddTensor(z)] + cudnnAddTensor(b)
(+ cudnnActivationForward), the decision is remembered (separately for the
residual form), and the output is the same.

Graph capture: the first call for a shape plans it (descriptors, algorithm,
workspace growth) and must come before a capture (a warm-up forward, or
``prepare``). Later calls only enqueue work on the stream. Workspaces that
were outgrown are kept alive, so a captured graph never points at freed memory.
"""
import contextlib
import ctypes
import os
import sys

from .bindings import (_ACT_IDENTITY, _ACT_RELU, _CROSS_CORRELATION, _DEFAULT_MATH, _FLOAT,
                       _FMA_MATH, _NCHW, _NOT_PROPAGATE_NAN, _ONE, _TENSOR_OP_ALLOW_CONVERSION,
                       _TENSOR_OP_MATH, _ZERO, FwdAlgoPerf, _call, _check, _int, _new, _ref, _sz,
                       _tensor_desc, _vp)
from .library import CudnnError, _state, load, unavailable_reason
from .policy import (ALGO, FUSED, FWD_ALGOS, IDENTITY, RELU, RESIDUAL, UNFUSED, cudnn_activation,
                     decode_version, fused_policy, is_not_supported, not_supported_code,
                     status_name)

_contexts = {}       # CUcontext -> _Context
_plans = {}          # (context, x shape, w shape, stride, pad[, dilation, groups]) -> _Plan
_fallback = {}       # (x shape, w shape, stride, pad[, dilation, groups], algo, activation)
                     # -> reason (dilation and groups only for a grouped/dilated shape)
_activations = {}    # activation -> descriptor
_settings = {"stream": None, "algo": None, "fused": None, "find": None}
_inject = {"algos": None, "active": False, "count": 0}


def set_stream(stream):
    """Use this PyCUDA Stream (or None: the default stream) for every later call.
    Without it, conv2d uses ``minidnn.backends.cuda.stream`` when that module is loaded."""
    _settings["stream"] = stream if stream is not None else False


def force_algorithm(name):
    """Force forward algorithm ``name`` (a FWD_ALGOS name) for shapes planned from now on;
    None returns to cuDNN's choice. ``MINIDNN_CUDNN_ALGO=NAME`` does the same."""
    if name is not None and name not in ALGO:
        raise ValueError(f"unknown cuDNN forward algorithm {name!r}; expected one of {FWD_ALGOS}")
    _settings["algo"] = name


def set_fused(enabled):
    """False: always the unfused calls (for comparison); True/None: the policy.
    ``MINIDNN_CUDNN_FUSED=0`` does the same."""
    _settings["fused"] = enabled


@contextlib.contextmanager
def inject_not_supported(algos=None):
    """Fault injection (tests): inside the block every fused call (for ``algos``, a
    set of names, or all) answers NOT_SUPPORTED without reaching cuDNN."""
    old = dict(_inject)
    _inject.update(algos=None if algos is None else set(algos), active=True, count=0)
    try:
        yield _inject
    finally:
        _inject.update(algos=old["algos"], active=old["active"])


def reset():
    """Forget every plan, remembered fallback and handle (tests; after a context is gone)."""
    lib = _state["lib"]
    for p in _plans.values():
        p.destroy(lib)
    _plans.clear()
    _fallback.clear()
    for c in _contexts.values():
        c.destroy(lib)
    _contexts.clear()


def _forced_algo():
    return _settings["algo"] or os.environ.get("MINIDNN_CUDNN_ALGO") or None


def _fused_allowed():
    if _settings["fused"] is not None:
        return bool(_settings["fused"])
    return os.environ.get("MINIDNN_CUDNN_FUSED", "1") != "0"


def _find_mode():
    if _settings["find"] is not None:
        return bool(_settings["find"])
    return os.environ.get("MINIDNN_CUDNN_FIND", "0") == "1"


class _Context:
    """One CUDA context: its cuDNN handle, the stream set on it, its workspace."""

    def __init__(self):
        self.handle = _vp()
        _call("cudnnCreate", ctypes.byref(self.handle))
        self.stream = None           # the CUstream last set on the handle
        self.workspace = None        # pycuda DeviceAllocation
        self.ws_size = 0
        self.retired = []            # outgrown workspaces, kept for captured graphs
        self.zeros = {}              # F -> zero bias (GPUArray), for b = None

    def set_stream(self, stream_handle):
        if stream_handle != self.stream:
            _call("cudnnSetStream", self.handle, _vp(stream_handle or None))
            self.stream = stream_handle

    def ensure_workspace(self, size):
        if size > self.ws_size:
            import pycuda.driver as drv
            new = max(int(size), 2 * self.ws_size)
            if self.workspace is not None:
                self.retired.append(self.workspace)
            self.workspace = drv.mem_alloc(new)
            self.ws_size = new

    def ws_ptr(self):
        return _vp(int(self.workspace)) if self.workspace is not None else _vp()

    def zero_bias(self, f):
        z = self.zeros.get(f)
        if z is None:
            import numpy as np
            import pycuda.gpuarray as ga
            z = self.zeros[f] = ga.to_gpu(np.zeros(f, np.float32))
        return z

    def destroy(self, lib):
        if lib is not None and self.handle:
            lib.cudnnDestroy(self.handle)
            self.handle = _vp()


def _context_key(ctx):
    # CUcontext as an int (PyCUDA >= 2013); a wrapper's id() would change per call.
    return int(getattr(ctx, "handle", 0) or 0) or "current"


def _current_context():
    import pycuda.driver as drv
    ctx = drv.Context.get_current()
    if ctx is None:
        raise RuntimeError("cuDNN: no current CUDA context (move the net to 'cuda' first)")
    key = _context_key(ctx)
    c = _contexts.get(key)
    if c is None:
        c = _contexts[key] = _Context()
    return key, c


def _stream_handle():
    s = _settings["stream"]
    if s is None:
        be = sys.modules.get("minidnn.backends.cuda")
        s = getattr(be, "stream", None) if be is not None else None
    if not s:
        return 0
    return int(getattr(s, "handle", s) or 0)


def _activation(act):
    d = _activations.get(act)
    if d is None:
        d = _activations[act] = _new("Activation", "cudnnSetActivationDescriptor",
                                     _ACT_RELU if act == RELU else _ACT_IDENTITY,
                                     _NOT_PROPAGATE_NAN, ctypes.c_double(0.0))
    return d


class _Plan:
    """One convolution shape on one context: descriptors, algorithm, workspace size,
    the path per activation and how many calls took it."""

    def __init__(self, ctx, xs, ws, stride, pad, dilation=(1, 1), groups=1):
        self.xs, self.ws, self.stride, self.pad = xs, ws, stride, pad
        self.dilation, self.groups = dilation, groups
        # what a grouped/dilated shape adds to the keys (nothing for a plain conv2d)
        self.extra = _extra(dilation, groups)
        self.ctx = ctx
        n, k, r, c = xs
        f, _, nr, nc = ws
        self.ys = (n, f, 1 + (r + 2 * pad[0] - (dilation[0] * (nr - 1) + 1)) // stride[0],
                   1 + (c + 2 * pad[1] - (dilation[1] * (nc - 1) + 1)) // stride[1])
        self.x_desc = _tensor_desc(xs)
        self.y_desc = _tensor_desc(self.ys)
        self.b_desc = _tensor_desc((1, f, 1, 1))
        self.w_desc = _new("Filter", "cudnnSetFilter4dDescriptor", _FLOAT, _NCHW,
                           *[int(s) for s in ws])
        self.conv_desc = _new("Convolution", "cudnnSetConvolution2dDescriptor",
                              pad[0], pad[1], stride[0], stride[1], dilation[0], dilation[1],
                              _CROSS_CORRELATION, _FLOAT)
        if groups != 1:
            _call("cudnnSetConvolutionGroupCount", self.conv_desc, groups)
        major = decode_version(_state["version"])[0]
        _call("cudnnSetConvolutionMathType", self.conv_desc,
              _FMA_MATH if major >= 8 else _DEFAULT_MATH)
        dims = [_int() for _ in range(4)]
        _call("cudnnGetConvolution2dForwardOutputDim", self.conv_desc, self.x_desc, self.w_desc,
              *[ctypes.byref(d) for d in dims])
        if tuple(d.value for d in dims) != self.ys:
            raise ValueError(f"cuDNN computes output {tuple(d.value for d in dims)} for x {xs}, "
                             f"w {ws}, stride {stride}, padding {pad}, dilation {dilation}, "
                             f"groups {groups}; expected {self.ys}")
        self.note = ""
        self.failed = set()          # algorithms cudnnConvolutionForward refused for this shape
        self.calls = {RELU: 0, IDENTITY: 0, (RELU, RESIDUAL): 0, (IDENTITY, RESIDUAL): 0}
        self.algo = None
        self.ws_bytes = 0
        self.choose_algo(exclude=())

    # -- algorithm ---------------------------------------------------------
    def _workspace_for(self, algo):
        size = _sz()
        code = _state["lib"].cudnnGetConvolutionForwardWorkspaceSize(
            self.ctx.handle, self.x_desc, self.w_desc, self.conv_desc, self.y_desc, ALGO[algo],
            ctypes.byref(size))
        return code, size.value

    def ranked_algos(self):
        """cuDNN's candidates, best first: [(name, status, memory, mathType, time)]."""
        n = len(FWD_ALGOS)
        perf = (FwdAlgoPerf * n)()
        got = _int()
        fn = "cudnnFindConvolutionForwardAlgorithm" if _find_mode() else \
            "cudnnGetConvolutionForwardAlgorithm_v7"
        _call(fn, self.ctx.handle, self.x_desc, self.w_desc, self.conv_desc, self.y_desc, n,
              ctypes.byref(got), perf)
        return [(FWD_ALGOS[p.algo], p.status, p.memory, p.mathType, p.time)
                for p in perf[:got.value] if 0 <= p.algo < n]

    def choose_algo(self, exclude):
        """Pick the forward algorithm: the forced one (even where cuDNN's workspace
        query refuses it: the calls then answer, and the fallback takes over), else
        cuDNN's best fp32 (non tensor-op) candidate not in ``exclude``. WINOGRAD*
        are left out unless forced: WINOGRAD_NONFUSED lost 2e-3 relative on 5x5."""
        exclude = set(exclude) | self.failed
        forced = _forced_algo()
        if forced and forced not in exclude:
            if forced not in ALGO:
                raise ValueError(f"MINIDNN_CUDNN_ALGO={forced!r}: expected one of {FWD_ALGOS}")
            code, size = self._workspace_for(forced)
            if code != 0:
                self.note += f"forced {forced}: workspace query {status_name(_state['version'], code)}; "
                size = 0
            self._take(forced, size)
            return
        for name, status, _mem, math, _t in self.ranked_algos():
            if status != 0 or name in exclude or name.startswith("WINOGRAD") or \
                    math in (_TENSOR_OP_MATH, _TENSOR_OP_ALLOW_CONVERSION):
                continue
            code, size = self._workspace_for(name)
            if code == 0:
                self._take(name, size)
                return
        raise CudnnError("choosing a forward algorithm", 0, "NOT_SUPPORTED",
                         f"no fp32 algorithm for x {self.xs}, w {self.ws}")

    def _take(self, algo, size):
        self.algo, self.ws_bytes = algo, size
        self.ctx.ensure_workspace(size)

    # -- path ----------------------------------------------------------------
    def fallback_key(self, act, residual=False):
        key = (self.xs, self.ws, self.stride, self.pad) + self.extra + (self.algo, act)
        return key + (RESIDUAL,) if residual else key

    def path(self, act, residual=False):
        if not _fused_allowed():
            return UNFUSED
        if self.fallback_key(act, residual) in _fallback:
            return UNFUSED
        return fused_policy(_state["version"], self.algo, act)

    def destroy(self, lib):
        if lib is None:
            return
        for name in ("x_desc", "y_desc", "b_desc"):
            lib.cudnnDestroyTensorDescriptor(getattr(self, name))
        lib.cudnnDestroyFilterDescriptor(self.w_desc)
        lib.cudnnDestroyConvolutionDescriptor(self.conv_desc)


def _extra(dilation, groups):
    """What a grouped or dilated shape adds to the plan and fallback keys: () for a
    plain convolution (dilation (1, 1), one group), else (dilation, groups)."""
    return () if tuple(dilation) == (1, 1) and groups == 1 else (tuple(dilation), groups)


def _plan(xs, ws, stride, pad, dilation=(1, 1), groups=1):
    key_ctx, ctx = _current_context()
    key = (key_ctx, xs, ws, stride, pad) + _extra(dilation, groups)
    p = _plans.get(key)
    if p is None:
        p = _plans[key] = _Plan(ctx, xs, ws, stride, pad, dilation, groups)
    return p


def _check_args(x, w, b, y, z=None, groups=1):
    import numpy as np
    for name, a in (("x", x), ("w", w), ("y", y)) + ((("b", b),) if b is not None else ()) + \
            ((("z", z),) if z is not None else ()):
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"cudnn.conv2d: {name} must be a C-contiguous float32 GPUArray, "
                             f"got dtype {a.dtype}")
    if z is not None:
        if tuple(z.shape) != tuple(y.shape):
            raise ValueError(f"cudnn.conv2d_residual: z must have y's shape {tuple(y.shape)}, "
                             f"got {tuple(z.shape)}")
        if z is y:
            raise ValueError("cudnn.conv2d_residual: z must not be y")
        zp, yp = int(z.ptr), int(y.ptr)
        if zp < yp + y.nbytes and yp < zp + z.nbytes:
            raise ValueError("cudnn.conv2d_residual: z overlaps y in memory")
    if len(x.shape) != 4 or len(w.shape) != 4 or len(y.shape) != 4 or \
            x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise ValueError(f"cudnn.conv2d: expected x (N,K,R,C), w (F,K/groups,nr,nc), "
                         f"y (N,F,Ro,Co) (groups {groups} dividing K and F); "
                         f"got x {x.shape}, w {w.shape}, y {y.shape}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"cudnn.conv2d: b must be ({w.shape[0]},), got {b.shape}")


def prepare(x_shape, w_shape, stride_y, stride_x, pad_y, pad_x):
    """Plan a convolution shape now (descriptors, algorithm, workspace): call before
    capturing a graph. Returns the chosen algorithm's name."""
    if load() is None:
        raise RuntimeError(f"cuDNN is not available: {unavailable_reason()}")
    p = _plan(tuple(map(int, x_shape)), tuple(map(int, w_shape)), (int(stride_y), int(stride_x)),
              (int(pad_y), int(pad_x)))
    return p.algo


def _cudnn_act(act, what):
    """RELU or IDENTITY for an op's ``act``; ValueError for an activation cuDNN lacks."""
    a = cudnn_activation(act)
    if a is None:
        try:
            shown = repr(act)
        except KeyError:            # an ops.Act whose code no layer has registered
            shown = f"activation code {act[0]}"
        raise ValueError(f"cudnn.{what}: cuDNN applies only relu and identity, not {shown}; "
                         "the CUDA backend runs any other activation in its own kernels")
    return a


def conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x, act):
    """The backend op through cuDNN: y (N,F,Ro,Co) = act(conv(x (N,K,R,C), w (F,K,nr,nc))
    + b (F,) unless None), act being relu or identity (an ops.Act, a bool, RELU or
    IDENTITY; ValueError for another activation). Enqueued on the backend's stream."""
    if load() is None:
        raise RuntimeError(f"cuDNN is not available: {unavailable_reason()}")
    _check_args(x, w, b, y)
    p = _plan(tuple(x.shape), tuple(w.shape), (int(stride_y), int(stride_x)),
              (int(pad_y), int(pad_x)))
    if tuple(y.shape) != p.ys:
        raise ValueError(f"cudnn.conv2d: y must be {p.ys}, got {tuple(y.shape)}")
    p.ctx.set_stream(_stream_handle())
    act = _cudnn_act(act, "conv2d")
    _run(p, x, w, b, y, act)
    p.calls[act] += 1


def conv2d_residual(x, w, b, z, y, stride_y, stride_x, pad_y, pad_x, act):
    """The backend op conv2d_residual through cuDNN: y = act(conv(x, w) + b (unless None)
    + z), act relu or identity as for conv2d. z: y's shape, float32, C-contiguous, neither y nor
    overlapping it (ValueError). One fused call with alpha2 = 1 where cuDNN runs it,
    else the unfused calls with cudnnAddTensor(z). Enqueued on the backend's stream."""
    if load() is None:
        raise RuntimeError(f"cuDNN is not available: {unavailable_reason()}")
    _check_args(x, w, b, y, z)
    p = _plan(tuple(x.shape), tuple(w.shape), (int(stride_y), int(stride_x)),
              (int(pad_y), int(pad_x)))
    if tuple(y.shape) != p.ys:
        raise ValueError(f"cudnn.conv2d_residual: y must be {p.ys}, got {tuple(y.shape)}")
    p.ctx.set_stream(_stream_handle())
    act = _cudnn_act(act, "conv2d_residual")
    _run(p, x, w, b, y, act, z)
    p.calls[(act, RESIDUAL)] += 1


def conv2d_grouped(x, w, b, y, stride_y, stride_x, pad_y, pad_x, dilation_y, dilation_x, groups,
                   act):
    """The backend op conv2d_grouped through cuDNN: y (N,F,Ro,Co) = act(grouped, dilated
    cross-correlation of x (N,K,R,C) with w (F,K/groups,nr,nc) + b (F,) unless None),
    act relu or identity as for conv2d (cudnnSetConvolutionGroupCount and the dilation
    of the convolution descriptor; the same fused/unfused policy and fallback as
    conv2d). Enqueued on the backend's stream."""
    if load() is None:
        raise RuntimeError(f"cuDNN is not available: {unavailable_reason()}")
    groups = int(groups)
    _check_args(x, w, b, y, groups=groups)
    p = _plan(tuple(x.shape), tuple(w.shape), (int(stride_y), int(stride_x)),
              (int(pad_y), int(pad_x)), (int(dilation_y), int(dilation_x)), groups)
    if tuple(y.shape) != p.ys:
        raise ValueError(f"cudnn.conv2d_grouped: y must be {p.ys}, got {tuple(y.shape)}")
    p.ctx.set_stream(_stream_handle())
    act = _cudnn_act(act, "conv2d_grouped")
    _run(p, x, w, b, y, act)
    p.calls[act] += 1


def _run(p, x, w, b, y, act, z=None):
    lib, v = _state["lib"], _state["version"]
    xp, wp, yp = _vp(x.ptr), _vp(w.ptr), _vp(y.ptr)
    residual = z is not None
    # the fused call's z: the residual with alpha2 = 1, else y itself with alpha2 = 0
    zp, alpha2 = (_vp(z.ptr), _ONE) if residual else (yp, _ZERO)
    for _attempt in range(len(FWD_ALGOS) + 1):
        if p.path(act, residual) == FUSED:
            bias = b if b is not None else p.ctx.zero_bias(p.ws[0])
            if _inject["active"] and (_inject["algos"] is None or p.algo in _inject["algos"]):
                _inject["count"] += 1
                code = not_supported_code(v)
            else:
                code = lib.cudnnConvolutionBiasActivationForward(
                    p.ctx.handle, _ref(_ONE), p.x_desc, xp, p.w_desc, wp, p.conv_desc,
                    ALGO[p.algo], p.ctx.ws_ptr(), p.ws_bytes, _ref(alpha2), p.y_desc, zp,
                    p.b_desc, _vp(bias.ptr), _activation(act), p.y_desc, yp)
            if code == 0:
                return
            if not is_not_supported(v, code):
                _check("cudnnConvolutionBiasActivationForward", code)
            # The safe fallback: remember it for this (shape, algorithm, activation,
            # residual or not).
            _fallback[p.fallback_key(act, residual)] = status_name(v, code)
        code = lib.cudnnConvolutionForward(
            p.ctx.handle, _ref(_ONE), p.x_desc, xp, p.w_desc, wp, p.conv_desc, ALGO[p.algo],
            p.ctx.ws_ptr(), p.ws_bytes, _ref(_ZERO), p.y_desc, yp)
        if code != 0:
            if not is_not_supported(v, code):
                _check("cudnnConvolutionForward", code)
            # This algorithm does not run this shape at all: take the next one.
            p.note += f"{p.algo}: {status_name(v, code)}; "
            p.failed.add(p.algo)
            p.choose_algo(exclude=p.failed)
            continue
        if residual:
            _call("cudnnAddTensor", p.ctx.handle, _ref(_ONE), p.y_desc, zp, _ref(_ONE),
                  p.y_desc, yp)
        if b is not None:
            _call("cudnnAddTensor", p.ctx.handle, _ref(_ONE), p.b_desc, _vp(b.ptr), _ref(_ONE),
                  p.y_desc, yp)
        if act == RELU:
            _call("cudnnActivationForward", p.ctx.handle, _activation(RELU), _ref(_ONE),
                  p.y_desc, yp, _ref(_ZERO), p.y_desc, yp)
        return
    raise CudnnError("cudnnConvolutionForward", 0, "NOT_SUPPORTED",
                     f"no algorithm ran x {p.xs}, w {p.ws}")


def conv_path(x_shape, w_shape, stride_y, stride_x, pad_y, pad_x, act, plan=True,
              residual=False, dilation=(1, 1), groups=1):
    """Which path a convolution takes through cuDNN: a dict with ``path`` (FUSED or
    UNFUSED), ``algorithm``, ``calls`` (how many calls took it), ``fallback`` (the
    status that made it fall back, if any) and ``note``. ``plan=True`` plans the shape
    when needed (needs the current CUDA context); otherwise None if never planned.
    ``residual=True``: the same for conv2d_residual (its own calls and fallback);
    ``dilation`` and ``groups``: those of a conv2d_grouped."""
    xs, ws = tuple(map(int, x_shape)), tuple(map(int, w_shape))
    stride, pad = (int(stride_y), int(stride_x)), (int(pad_y), int(pad_x))
    dilation, groups = (int(dilation[0]), int(dilation[1])), int(groups)
    geo = (xs, ws, stride, pad) + _extra(dilation, groups)
    act = _cudnn_act(act, "conv_path")
    p = None
    try:
        import pycuda.driver as drv
        ctx = drv.Context.get_current()
        if ctx is not None:
            p = _plans.get((_context_key(ctx),) + geo)
    except Exception:
        ctx = None
    if p is None:
        p = next((q for k, q in _plans.items() if k[1:] == geo), None)
    if p is None:
        if not plan or ctx is None or load() is None:
            return None
        p = _plan(xs, ws, stride, pad, dilation, groups)
    return {"path": p.path(act, residual), "algorithm": p.algo,
            "calls": p.calls[(act, RESIDUAL) if residual else act],
            "fallback": _fallback.get(p.fallback_key(act, residual)),
            "note": p.note.strip("; ")}

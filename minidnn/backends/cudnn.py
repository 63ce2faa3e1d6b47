"""cuDNN for the CUDA backend: ctypes bindings, a version-aware fused-convolution
policy and a safe fallback.

WHAT THIS MODULE REPRESENTS: an optional accelerator for ``conv2d`` on the GPU.
``conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x, relu)`` has the
signature of the backend op (docs/INTERNALS.md) and takes PyCUDA GPUArrays:
x (N,K,R,C), w (F,K,nr,nc), b (F,) or None, y (N,F,Ro,Co), all float32 and
C-contiguous; afterwards y = conv(x, w) + b, then max(y, 0) when relu. The
backend calls it only when ``available()``; cuDNN is never required.
``conv2d_residual(x, w, b, z, y, ...)`` (the backend op of that name) adds z
(y's shape, never aliasing y) before the relu: the fused call's z with
alpha2 = 1 (plain conv2d passes z = y with alpha2 = 0), or, unfused,
cudnnAddTensor(z) between the convolution and the bias.

Finding the library (once, at the first ``available()``):
  1. ``MINIDNN_CUDNN=0`` turns cuDNN off;
  2. ``MINIDNN_CUDNN_PATH`` names the file to load (nothing else is tried);
  3. the lib folder of an installed nvidia-cudnn-cu13 / nvidia-cudnn-cu12 wheel
     (found through importlib.metadata, then the ``nvidia`` namespace package);
  4. the system's library path (libcudnn.so.9, .so.8, .so).
The sub-libraries beside a libcudnn.so found by path (libcudnn_graph,
libcudnn_ops, libcudnn_cnn ...) are loaded first, from that same folder, so
that two cuDNN builds on one machine never mix.

Per CUDA context: one cuDNN handle, set to the backend's stream
(``minidnn.backends.cuda.stream``, or ``set_stream``), and one grow-only
workspace. Per convolution shape (x shape, w shape, stride, padding): the
descriptors and the forward algorithm, chosen once (cuDNN's heuristic
``cudnnGetConvolutionForwardAlgorithm_v7``; ``MINIDNN_CUDNN_FIND=1`` measures
with ``cudnnFindConvolutionForwardAlgorithm``; ``MINIDNN_CUDNN_ALGO=NAME``
forces one). Math is fp32 FMA only (CUDNN_FMA_MATH on cuDNN >= 8): no TF32,
whatever NVIDIA_TF32_OVERRIDE says.

The path of each convolution is decided by one pure function,
``fused_policy(version, algo, activation)``; when cuDNN answers a fused call
with NOT_SUPPORTED anyway, that (shape, algorithm, activation) falls back to
cudnnConvolutionForward [+ cudnnAddTensor(z)] + cudnnAddTensor(b)
(+ cudnnActivationForward), the decision is remembered (separately for the
residual form), and the output is the same.

Graph capture: the first call for a shape plans it (descriptors, algorithm,
workspace growth) and must come before a capture (a warm-up forward, or
``prepare``). Later calls only enqueue work on the stream. Workspaces that
were outgrown are kept alive, so a captured graph never points at freed memory.

The pure part (versions, status codes, policy) needs neither a GPU nor cuDNN.
``python -m minidnn.backends.cudnn`` prints the library found and a probe of
the fused call over algorithms x activations x shapes (JSON).
"""
import contextlib
import ctypes
import ctypes.util
import glob
import os
import sys

# ----------------------------------------------------------------------------
# The pure part: versions, status codes, algorithms, the policy.

FWD_ALGOS = ("IMPLICIT_GEMM", "IMPLICIT_PRECOMP_GEMM", "GEMM", "DIRECT", "FFT",
             "FFT_TILING", "WINOGRAD", "WINOGRAD_NONFUSED")
ALGO = {name: i for i, name in enumerate(FWD_ALGOS)}

RELU, IDENTITY = "relu", "identity"
RESIDUAL = "residual"   # conv2d_residual's calls and fallbacks are kept apart from conv2d's
FUSED, UNFUSED = "fused", "unfused"

# How backend_info names the paths.
PATH_NAMES = {FUSED: "fused cuDNN call", UNFUSED: "unfused cuDNN calls"}


def decode_version(v):
    """cudnnGetVersion() -> (major, minor, patch).

    Below 90000 it is major*1000 + minor*100 + patch (8.9.7 -> 8907, 7.6.5 -> 7605);
    from cuDNN 9 on it is major*10000 + minor*100 + patch (9.19.0 -> 91900).
    """
    v = int(v)
    if v < 0:
        raise ValueError(f"a cuDNN version is >= 0, got {v}")
    if v >= 90000:
        return v // 10000, (v // 100) % 100, v % 100
    return v // 1000, (v // 100) % 10, v % 100


def version_text(v):
    """cudnnGetVersion() -> "9.19.0"."""
    return "%d.%d.%d" % decode_version(v)


# Status codes before cuDNN 9 (cudnn.h of 7.x/8.x).
STATUS_V8 = {
    0: "SUCCESS", 1: "NOT_INITIALIZED", 2: "ALLOC_FAILED", 3: "BAD_PARAM",
    4: "INTERNAL_ERROR", 5: "INVALID_VALUE", 6: "ARCH_MISMATCH", 7: "MAPPING_ERROR",
    8: "EXECUTION_FAILED", 9: "NOT_SUPPORTED", 10: "LICENSE_ERROR",
    11: "RUNTIME_PREREQUISITE_MISSING", 12: "RUNTIME_IN_PROGRESS",
    13: "RUNTIME_FP_OVERFLOW", 14: "VERSION_MISMATCH",
}

# Status codes of cuDNN 9 (cudnn_graph.h): a category per thousand, details below it.
STATUS_V9 = {
    0: "SUCCESS",
    1001: "NOT_INITIALIZED", 1002: "SUBLIBRARY_VERSION_MISMATCH",
    1003: "SERIALIZATION_VERSION_MISMATCH", 1004: "DEPRECATED", 1005: "LICENSE_ERROR",
    1006: "RUNTIME_IN_PROGRESS", 1007: "RUNTIME_FP_OVERFLOW", 1008: "SUBLIBRARY_LOADING_FAILED",
    2000: "BAD_PARAM", 2001: "INVALID_VALUE", 2002: "BAD_PARAM_NULL_POINTER",
    2003: "BAD_PARAM_MISALIGNED_POINTER", 2004: "BAD_PARAM_NOT_FINALIZED",
    2005: "BAD_PARAM_OUT_OF_BOUND", 2006: "BAD_PARAM_SIZE_INSUFFICIENT",
    2007: "BAD_PARAM_STREAM_MISMATCH", 2008: "BAD_PARAM_SHAPE_MISMATCH",
    2009: "BAD_PARAM_DUPLICATED_ENTRIES", 2010: "BAD_PARAM_ATTRIBUTE_TYPE",
    2011: "BAD_PARAM_CUDA_GRAPH_MISMATCH", 2012: "BAD_PARAM_DESCRIPTOR_TYPE",
    3000: "NOT_SUPPORTED", 3001: "NOT_SUPPORTED_GRAPH_PATTERN", 3002: "NOT_SUPPORTED_SHAPE",
    3003: "NOT_SUPPORTED_DATA_TYPE", 3004: "NOT_SUPPORTED_LAYOUT",
    3005: "NOT_SUPPORTED_INCOMPATIBLE_CUDA_DRIVER", 3006: "NOT_SUPPORTED_INCOMPATIBLE_CUDART",
    3007: "NOT_SUPPORTED_ARCH_MISMATCH", 3008: "NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING",
    3009: "NOT_SUPPORTED_SUBLIBRARY_UNAVAILABLE", 3010: "NOT_SUPPORTED_SHARED_MEMORY_INSUFFICIENT",
    3011: "NOT_SUPPORTED_PADDING", 3012: "NOT_SUPPORTED_BAD_LAUNCH_PARAM",
    3013: "NOT_SUPPORTED_CUDA_GRAPH_NATIVE_API", 3014: "NOT_SUPPORTED_INVALID_DYNAMIC_SHAPE",
    4000: "INTERNAL_ERROR", 4001: "INTERNAL_ERROR_COMPILATION_FAILED",
    4002: "INTERNAL_ERROR_UNEXPECTED_VALUE", 4003: "INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
    4004: "INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", 4005: "INTERNAL_ERROR_BAD_LAUNCH_PARAM",
    4006: "INTERNAL_ERROR_TEXTURE_CREATION_FAILED",
    5000: "EXECUTION_FAILED", 5001: "EXECUTION_FAILED_CUDA_DRIVER",
    5002: "EXECUTION_FAILED_CUBLAS", 5003: "EXECUTION_FAILED_CUDART",
    5004: "EXECUTION_FAILED_CURAND",
}
_V9_CATEGORY = {1000: "NOT_INITIALIZED", 2000: "BAD_PARAM", 3000: "NOT_SUPPORTED",
                4000: "INTERNAL_ERROR", 5000: "EXECUTION_FAILED"}


def status_name(version, code):
    """The name of status ``code`` as the library of ``version`` means it
    ("NOT_SUPPORTED", "BAD_PARAM_NULL_POINTER" ...; "UNKNOWN(<code>)" otherwise)."""
    code = int(code)
    if decode_version(version)[0] >= 9:
        name = STATUS_V9.get(code)
        if name is None and code // 1000 * 1000 in _V9_CATEGORY:
            name = _V9_CATEGORY[code // 1000 * 1000] + f"({code})"
        return name or f"UNKNOWN({code})"
    return STATUS_V8.get(code, f"UNKNOWN({code})")


def status_category(version, code):
    """The family of a status: "SUCCESS", "NOT_SUPPORTED", "BAD_PARAM", ... The
    detailed cuDNN 9 codes (3002 NOT_SUPPORTED_SHAPE ...) map to their family;
    before 9, ARCH_MISMATCH and RUNTIME_PREREQUISITE_MISSING count as NOT_SUPPORTED,
    as cuDNN 9 files them."""
    code = int(code)
    if code == 0:
        return "SUCCESS"
    if decode_version(version)[0] >= 9:
        return _V9_CATEGORY.get(code // 1000 * 1000, f"UNKNOWN({code})")
    name = STATUS_V8.get(code, f"UNKNOWN({code})")
    return {"ARCH_MISMATCH": "NOT_SUPPORTED", "RUNTIME_PREREQUISITE_MISSING": "NOT_SUPPORTED",
            "INVALID_VALUE": "BAD_PARAM", "ALLOC_FAILED": "INTERNAL_ERROR",
            "MAPPING_ERROR": "EXECUTION_FAILED"}.get(name, name)


def is_not_supported(version, code):
    """True when ``code`` means NOT_SUPPORTED (9 before cuDNN 9; 3000-3999 in 9)."""
    return status_category(version, code) == "NOT_SUPPORTED"


def not_supported_code(version):
    """The plain NOT_SUPPORTED code of the library of ``version`` (9, or 3000 on cuDNN 9)."""
    return 3000 if decode_version(version)[0] >= 9 else 9


# Measured with `python -m minidnn.backends.cudnn` on an H100 (driver 580, sm_90),
# fp32 NCHW, CUDNN_FMA_MATH, alpha2 = 0, bias on, on 5 shapes: x (2,16,14,14) with
# 1x1 and 3x3/pad 1 filters, (1,8,15,17) 3x3 stride 2, (4,3,20,20) 5x5 pad 2,
# (1,3,32,32) 7x7 stride 2 pad 3. cuDNN 9.19.0 (PyTorch's nvidia-cudnn-cu13, cudart
# 13.1) and 9.14.0 (the system's, cudart 13.0) answered exactly alike:
#
#   algorithm              workspace query / plain conv    fused identity  fused relu
#   IMPLICIT_GEMM          SUCCESS on all 5                SUCCESS         SUCCESS
#   IMPLICIT_PRECOMP_GEMM  SUCCESS on all 5                SUCCESS         SUCCESS
#   GEMM                   SUCCESS on all 5                SUCCESS         SUCCESS
#   FFT                    SUCCESS on 3 (not stride 2)     SUCCESS         SUCCESS   (where it runs)
#   FFT_TILING             SUCCESS on all 5                SUCCESS         SUCCESS
#   WINOGRAD_NONFUSED      SUCCESS on 2 (3x3, 5x5 stride 1) SUCCESS        SUCCESS   (where it runs)
#   WINOGRAD               NOT_SUPPORTED on all 5          SUCCESS on all 5 (results equal to
#                                                          IMPLICIT_GEMM's: cuDNN 9 picks an engine)
#   DIRECT                 NOT_SUPPORTED on all 5          NOT_SUPPORTED   NOT_SUPPORTED
#
# So from 9.14 on identity is fused with every algorithm but DIRECT (relu always
# tries the fused call; DIRECT then falls back at run time, and as the plain
# convolution refuses DIRECT too, the next algorithm takes over). Every fused
# result matched the float64 reference to 5e-7 relative, except WINOGRAD_NONFUSED
# on 5x5 (2e-3, fused or not): minidnn never picks WINOGRAD* by itself (see
# _Plan.choose_algo), only when forced. cuDNN 8.x and 9.0-9.13 were not measured:
# they keep the documented rule (identity fused only with IMPLICIT_PRECOMP_GEMM).
_IDENTITY_FUSED_MEASURED = frozenset(set(FWD_ALGOS) - {"DIRECT"})
_MEASURED_FROM = 91400       # cuDNN 9.14: the oldest build measured


def fused_policy(version, algo, activation):
    """THE policy: FUSED (one cudnnConvolutionBiasActivationForward) or UNFUSED
    (cudnnConvolutionForward + cudnnAddTensor [+ cudnnActivationForward]).

    version: cudnnGetVersion(); algo: a name of FWD_ALGOS (or its number);
    activation: "relu" or "identity".
    - relu: fused with every algorithm (cuDNN may still answer NOT_SUPPORTED for
      a shape; the runtime fallback covers that, e.g. DIRECT on 9.19);
    - identity below cuDNN 8: fused only with IMPLICIT_PRECOMP_GEMM, the one
      algorithm cuDNN 7 accepts (dlib's NOT_SUPPORTED bug);
    - identity from cuDNN 8 on: fused where a measurement showed that it works
      (_IDENTITY_FUSED_MEASURED, from the builds measured on), else only with
      IMPLICIT_PRECOMP_GEMM, which cuDNN documents.
    """
    if not isinstance(algo, str):
        algo = FWD_ALGOS[int(algo)]
    if algo not in ALGO:
        raise ValueError(f"unknown cuDNN forward algorithm {algo!r}; expected one of {FWD_ALGOS}")
    if activation == RELU:
        return FUSED
    if activation != IDENTITY:
        raise ValueError(f"activation must be {RELU!r} or {IDENTITY!r}, got {activation!r}")
    if decode_version(version)[0] < 8 or int(version) < _MEASURED_FROM:
        return FUSED if algo == "IMPLICIT_PRECOMP_GEMM" else UNFUSED
    return FUSED if algo in _IDENTITY_FUSED_MEASURED else UNFUSED


# ----------------------------------------------------------------------------
# Finding and loading the library.

class CudnnError(RuntimeError):
    """A cuDNN call failed: ``call`` (the function), ``code`` and ``name`` (its status)."""

    def __init__(self, call, code, name, detail=""):
        self.call, self.code, self.name = call, code, name
        super().__init__(f"cuDNN {call} failed: CUDNN_STATUS_{name} ({code})"
                         + (f": {detail}" if detail else ""))


_SUBLIBS = ("graph", "engines_precompiled", "engines_runtime_compiled", "heuristic", "ops", "cnn")
_state = {"loaded": False, "lib": None, "path": None, "version": None, "reason": None,
          "sublibs": []}


def candidates():
    """Where the library is looked for, in order: [(path or soname, origin)]."""
    if os.environ.get("MINIDNN_CUDNN", "1").strip().lower() in ("0", "off", "false", "no"):
        return []
    explicit = os.environ.get("MINIDNN_CUDNN_PATH")
    if explicit:
        return [(explicit, "MINIDNN_CUDNN_PATH")]
    out, seen = [], set()

    def add(path, origin):
        real = os.path.realpath(path)
        if real not in seen and os.path.isfile(path):
            seen.add(real)
            out.append((path, origin))

    try:
        from importlib import metadata
        for dist in ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
            try:
                files = metadata.distribution(dist).files or ()
            except metadata.PackageNotFoundError:
                continue
            for f in files:
                s = str(f)
                if "/lib/libcudnn.so" in s and os.path.basename(s).count(".so.") == 1:
                    add(str(f.locate()), dist)
    except Exception:  # a broken metadata entry must not stop the search
        pass
    try:
        import importlib.util
        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or ()) if spec else ():
            for p in sorted(glob.glob(os.path.join(root, "cudnn", "lib", "libcudnn.so.*")),
                            reverse=True):
                add(p, "nvidia.cudnn")
    except Exception:
        pass
    for soname in ("libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"):
        out.append((soname, "system"))
    found = ctypes.util.find_library("cudnn")
    if found and found not in [c[0] for c in out]:
        out.append((found, "system"))
    return out


def _load_from(path):
    """dlopen libcudnn at ``path`` (preloading its sub-libraries from the same folder)."""
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 2)
    sublibs = []
    if os.path.sep in path:
        folder = os.path.dirname(os.path.realpath(path))
        for name in _SUBLIBS:
            for sub in sorted(glob.glob(os.path.join(folder, f"libcudnn_{name}.so.*"))):
                try:
                    ctypes.CDLL(sub, mode=mode)
                    sublibs.append(sub)
                except OSError:
                    pass
                break
    lib = ctypes.CDLL(path, mode=mode)
    return lib, sublibs


def load():
    """Load libcudnn once; return the ctypes library or None (``unavailable_reason()`` says why)."""
    st = _state
    if st["loaded"]:
        return st["lib"]
    st["loaded"] = True
    cands = candidates()
    if not cands:
        st["reason"] = "turned off by MINIDNN_CUDNN=0"
        return None
    errors = []
    for path, origin in cands:
        try:
            lib, sublibs = _load_from(path)
            lib.cudnnGetVersion.restype = ctypes.c_size_t
            v = int(lib.cudnnGetVersion())
        except (OSError, AttributeError) as e:
            errors.append(f"{path} ({origin}): {e}")
            if origin == "MINIDNN_CUDNN_PATH":
                break
            continue
        _bind(lib, v)
        st.update(lib=lib, path=_real_path(lib, path), version=v, sublibs=sublibs,
                  origin=origin)
        return lib
    if cands[0][1] == "MINIDNN_CUDNN_PATH":
        st["reason"] = f"MINIDNN_CUDNN_PATH cannot be loaded: {errors[0]}"
    else:
        st["reason"] = ("libcudnn not found (tried " + ", ".join(c[0] for c in cands) +
                        "); pip install 'minidnn[cudnn]', or set MINIDNN_CUDNN_PATH")
    return None


def _real_path(lib, fallback):
    """The file the dynamic loader actually opened for ``lib``."""
    try:
        dl = ctypes.CDLL(None)

        class DlInfo(ctypes.Structure):
            _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                        ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]
        info = DlInfo()
        addr = ctypes.cast(lib.cudnnGetVersion, ctypes.c_void_p)
        if dl.dladdr(addr, ctypes.byref(info)) and info.fname:
            return os.path.realpath(info.fname.decode())
    except Exception:
        pass
    return fallback


def available():
    """True when cuDNN can be used: not turned off, libcudnn loaded, PyCUDA importable."""
    if load() is None:
        return False
    try:
        import pycuda.driver  # noqa: F401  (the check itself)
    except Exception as e:
        _state["reason"] = f"PyCUDA cannot be imported ({e}); pip install 'minidnn[cudnn]'"
        return False
    return True


def version():
    """cudnnGetVersion() of the loaded library, or None."""
    load()
    return _state["version"]


def version_string():
    """The decoded version ("9.19.0"), or None."""
    v = version()
    return None if v is None else version_text(v)


def library_path():
    """The file of the loaded libcudnn, or None."""
    load()
    return _state["path"]


def unavailable_reason():
    """Why ``available()`` is False (None when it is True)."""
    return None if available() else _state["reason"]


# ----------------------------------------------------------------------------
# ctypes bindings

_vp, _int, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t


class FwdAlgoPerf(ctypes.Structure):
    """cudnnConvolutionFwdAlgoPerf_t (cuDNN 7, 8 and 9)."""
    _fields_ = [("algo", _int), ("status", _int), ("time", ctypes.c_float),
                ("memory", _sz), ("determinism", _int), ("mathType", _int),
                ("reserved", _int * 3)]


_SIGNATURES = {
    "cudnnCreate": [_vp],
    "cudnnDestroy": [_vp],
    "cudnnSetStream": [_vp, _vp],
    "cudnnCreateTensorDescriptor": [_vp],
    "cudnnDestroyTensorDescriptor": [_vp],
    "cudnnSetTensor4dDescriptor": [_vp, _int, _int, _int, _int, _int, _int],
    "cudnnCreateFilterDescriptor": [_vp],
    "cudnnDestroyFilterDescriptor": [_vp],
    "cudnnSetFilter4dDescriptor": [_vp, _int, _int, _int, _int, _int, _int],
    "cudnnCreateConvolutionDescriptor": [_vp],
    "cudnnDestroyConvolutionDescriptor": [_vp],
    "cudnnSetConvolution2dDescriptor": [_vp, _int, _int, _int, _int, _int, _int, _int, _int],
    "cudnnSetConvolutionMathType": [_vp, _int],
    "cudnnGetConvolution2dForwardOutputDim": [_vp, _vp, _vp, _vp, _vp, _vp, _vp],
    "cudnnGetConvolutionForwardAlgorithm_v7": [_vp, _vp, _vp, _vp, _vp, _int, _vp, _vp],
    "cudnnFindConvolutionForwardAlgorithm": [_vp, _vp, _vp, _vp, _vp, _int, _vp, _vp],
    "cudnnGetConvolutionForwardWorkspaceSize": [_vp, _vp, _vp, _vp, _vp, _int, _vp],
    "cudnnConvolutionForward": [_vp, _vp, _vp, _vp, _vp, _vp, _vp, _int, _vp, _sz, _vp, _vp, _vp],
    "cudnnConvolutionBiasActivationForward": [_vp, _vp, _vp, _vp, _vp, _vp, _vp, _int, _vp, _sz,
                                              _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp],
    "cudnnAddTensor": [_vp, _vp, _vp, _vp, _vp, _vp, _vp],
    "cudnnCreateActivationDescriptor": [_vp],
    "cudnnDestroyActivationDescriptor": [_vp],
    "cudnnSetActivationDescriptor": [_vp, _int, _int, ctypes.c_double],
    "cudnnActivationForward": [_vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp],
}


def _bind(lib, v):
    for name, args in _SIGNATURES.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, _int
    lib.cudnnGetErrorString.restype = ctypes.c_char_p
    lib.cudnnGetErrorString.argtypes = [_int]
    if hasattr(lib, "cudnnGetCudartVersion"):
        lib.cudnnGetCudartVersion.restype = ctypes.c_size_t
    if decode_version(v)[0] >= 9 and hasattr(lib, "cudnnGetLastErrorString"):
        lib.cudnnGetLastErrorString.argtypes = [ctypes.c_char_p, _sz]
        lib.cudnnGetLastErrorString.restype = None


def _last_error(lib):
    if decode_version(_state["version"])[0] >= 9 and hasattr(lib, "cudnnGetLastErrorString"):
        buf = ctypes.create_string_buffer(512)
        lib.cudnnGetLastErrorString(buf, 512)
        return buf.value.decode(errors="replace")
    return ""


def _check(call, code):
    if code != 0:
        v = _state["version"]
        raise CudnnError(call, code, status_name(v, code), _last_error(_state["lib"]))


def _call(name, *args):
    lib = _state["lib"]
    _check(name, getattr(lib, name)(*args))


_FLOAT, _NCHW, _CROSS_CORRELATION = 0, 0, 1
_DEFAULT_MATH, _TENSOR_OP_MATH, _TENSOR_OP_ALLOW_CONVERSION, _FMA_MATH = 0, 1, 2, 3
_ACT_RELU, _ACT_IDENTITY, _NOT_PROPAGATE_NAN = 1, 5, 0
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _ref(c):
    return ctypes.cast(ctypes.byref(c), _vp)


def _new(kind, setter=None, *args):
    d = _vp()
    _call(f"cudnnCreate{kind}Descriptor", ctypes.byref(d))
    if setter:
        _call(setter, d, *args)
    return d


def _tensor_desc(shape):
    return _new("Tensor", "cudnnSetTensor4dDescriptor", _NCHW, _FLOAT, *[int(s) for s in shape])


# ----------------------------------------------------------------------------
# Per-context state and per-shape plans

_contexts = {}       # CUcontext -> _Context
_plans = {}          # (context, x shape, w shape, stride, pad) -> _Plan
_fallback = {}       # (x shape, w shape, stride, pad, algo, activation) -> reason
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

    def __init__(self, ctx, xs, ws, stride, pad):
        self.xs, self.ws, self.stride, self.pad = xs, ws, stride, pad
        self.ctx = ctx
        n, k, r, c = xs
        f, _, nr, nc = ws
        self.ys = (n, f, 1 + (r + 2 * pad[0] - nr) // stride[0],
                   1 + (c + 2 * pad[1] - nc) // stride[1])
        self.x_desc = _tensor_desc(xs)
        self.y_desc = _tensor_desc(self.ys)
        self.b_desc = _tensor_desc((1, f, 1, 1))
        self.w_desc = _new("Filter", "cudnnSetFilter4dDescriptor", _FLOAT, _NCHW,
                           *[int(s) for s in ws])
        self.conv_desc = _new("Convolution", "cudnnSetConvolution2dDescriptor",
                              pad[0], pad[1], stride[0], stride[1], 1, 1,
                              _CROSS_CORRELATION, _FLOAT)
        major = decode_version(_state["version"])[0]
        _call("cudnnSetConvolutionMathType", self.conv_desc,
              _FMA_MATH if major >= 8 else _DEFAULT_MATH)
        dims = [_int() for _ in range(4)]
        _call("cudnnGetConvolution2dForwardOutputDim", self.conv_desc, self.x_desc, self.w_desc,
              *[ctypes.byref(d) for d in dims])
        if tuple(d.value for d in dims) != self.ys:
            raise ValueError(f"cuDNN computes output {tuple(d.value for d in dims)} for x {xs}, "
                             f"w {ws}, stride {stride}, padding {pad}; expected {self.ys}")
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
        key = (self.xs, self.ws, self.stride, self.pad, self.algo, act)
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


def _plan(xs, ws, stride, pad):
    key_ctx, ctx = _current_context()
    key = (key_ctx, xs, ws, stride, pad)
    p = _plans.get(key)
    if p is None:
        p = _plans[key] = _Plan(ctx, xs, ws, stride, pad)
    return p


def _check_args(x, w, b, y, z=None):
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
    if len(x.shape) != 4 or len(w.shape) != 4 or len(y.shape) != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"cudnn.conv2d: expected x (N,K,R,C), w (F,K,nr,nc), y (N,F,Ro,Co); "
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


def conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x, relu):
    """The backend op through cuDNN: y (N,F,Ro,Co) = conv(x (N,K,R,C), w (F,K,nr,nc))
    + b (F,) unless None, then max(., 0) if relu. Enqueued on the backend's stream."""
    if load() is None:
        raise RuntimeError(f"cuDNN is not available: {unavailable_reason()}")
    _check_args(x, w, b, y)
    p = _plan(tuple(x.shape), tuple(w.shape), (int(stride_y), int(stride_x)),
              (int(pad_y), int(pad_x)))
    if tuple(y.shape) != p.ys:
        raise ValueError(f"cudnn.conv2d: y must be {p.ys}, got {tuple(y.shape)}")
    p.ctx.set_stream(_stream_handle())
    act = RELU if relu else IDENTITY
    _run(p, x, w, b, y, act)
    p.calls[act] += 1


def conv2d_residual(x, w, b, z, y, stride_y, stride_x, pad_y, pad_x, relu):
    """The backend op conv2d_residual through cuDNN: y = conv(x, w) + b (unless None)
    + z, then max(., 0) if relu. z: y's shape, float32, C-contiguous, neither y nor
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
    act = RELU if relu else IDENTITY
    _run(p, x, w, b, y, act, z)
    p.calls[(act, RESIDUAL)] += 1


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


def conv_path(x_shape, w_shape, stride_y, stride_x, pad_y, pad_x, relu, plan=True,
              residual=False):
    """Which path a convolution takes through cuDNN: a dict with ``path`` (FUSED or
    UNFUSED), ``algorithm``, ``calls`` (how many calls took it), ``fallback`` (the
    status that made it fall back, if any) and ``note``. ``plan=True`` plans the shape
    when needed (needs the current CUDA context); otherwise None if never planned.
    ``residual=True``: the same for conv2d_residual (its own calls and fallback)."""
    xs, ws = tuple(map(int, x_shape)), tuple(map(int, w_shape))
    stride, pad = (int(stride_y), int(stride_x)), (int(pad_y), int(pad_x))
    act = RELU if relu else IDENTITY
    p = None
    try:
        import pycuda.driver as drv
        ctx = drv.Context.get_current()
        if ctx is not None:
            p = _plans.get((_context_key(ctx), xs, ws, stride, pad))
    except Exception:
        ctx = None
    if p is None:
        p = next((q for k, q in _plans.items() if k[1:] == (xs, ws, stride, pad)), None)
    if p is None:
        if not plan or ctx is None or load() is None:
            return None
        p = _plan(xs, ws, stride, pad)
    return {"path": p.path(act, residual), "algorithm": p.algo,
            "calls": p.calls[(act, RESIDUAL) if residual else act],
            "fallback": _fallback.get(p.fallback_key(act, residual)),
            "note": p.note.strip("; ")}


# ----------------------------------------------------------------------------
# The probe: python -m minidnn.backends.cudnn [--shapes small]

_PROBE_SHAPES = (   # (x shape, w shape, stride, pad)
    ((2, 16, 14, 14), (32, 16, 1, 1), (1, 1), (0, 0)),
    ((2, 16, 14, 14), (32, 16, 3, 3), (1, 1), (1, 1)),
    ((1, 8, 15, 17), (16, 8, 3, 3), (2, 2), (0, 0)),
    ((4, 3, 20, 20), (8, 3, 5, 5), (1, 1), (2, 2)),
    ((1, 3, 32, 32), (16, 3, 7, 7), (2, 2), (3, 3)),
)


def _reference(x, w, b, stride, pad, relu):
    import numpy as np
    n, k, r, c = x.shape
    f, _, nr, nc = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    ro = 1 + (r + 2 * pad[0] - nr) // stride[0]
    co = 1 + (c + 2 * pad[1] - nc) // stride[1]
    y = np.zeros((n, f, ro, co))
    for i in range(nr):
        for j in range(nc):
            patch = xp[:, :, i:i + stride[0] * ro:stride[0], j:j + stride[1] * co:stride[1]]
            y += np.einsum("nkrc,fk->nfrc", patch, w[:, :, i, j].astype(np.float64))
    if b is not None:
        y += b.reshape(1, f, 1, 1)
    return np.maximum(y, 0) if relu else y


def probe():
    """Try the fused call with every algorithm x activation on a few shapes; return a dict."""
    import numpy as np
    import pycuda.driver as drv
    import pycuda.gpuarray as ga
    out = {"library": library_path(), "version": version(), "version_text": version_string(),
           "origin": _state.get("origin"), "reason": unavailable_reason(),
           "sublibs_preloaded": [os.path.basename(s) for s in _state["sublibs"]]}
    if load() is None:
        return out
    lib = _state["lib"]
    if hasattr(lib, "cudnnGetCudartVersion"):
        out["cudart"] = int(lib.cudnnGetCudartVersion())
    out["device"] = drv.Context.get_device().name()
    v = _state["version"]
    rng = np.random.default_rng(0)
    rows = []
    key_ctx, ctx = _current_context()
    for xs, ws, stride, pad in _PROBE_SHAPES:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        b = rng.standard_normal(ws[0]).astype(np.float32)
        p = _Plan(ctx, xs, ws, stride, pad)
        heur = [a[0] for a in p.ranked_algos() if a[1] == 0]
        xg, wg, bg = ga.to_gpu(x), ga.to_gpu(w), ga.to_gpu(b)
        yg = ga.empty(p.ys, np.float32)
        for algo in FWD_ALGOS:
            row = {"x": xs, "w": ws, "stride": stride, "pad": pad, "algo": algo,
                   "heuristic_rank": heur.index(algo) if algo in heur else None}
            code, size = p._workspace_for(algo)
            row["workspace"] = status_name(v, code) if code else size
            size = 0 if code else size          # the calls still answer for themselves
            ctx.ensure_workspace(size)
            for act in (IDENTITY, RELU):
                ref = _reference(x, w, b, stride, pad, act == RELU)
                scale = max(1.0, float(np.abs(ref).max()))
                yg.fill(np.float32(np.nan))
                code = lib.cudnnConvolutionBiasActivationForward(
                    ctx.handle, _ref(_ONE), p.x_desc, _vp(xg.ptr), p.w_desc, _vp(wg.ptr),
                    p.conv_desc, ALGO[algo], ctx.ws_ptr(), size, _ref(_ZERO), p.y_desc,
                    _vp(yg.ptr), p.b_desc, _vp(bg.ptr), _activation(act), p.y_desc, _vp(yg.ptr))
                drv.Context.synchronize()
                row["fused_" + act] = status_name(v, code)
                if code == 0:
                    row["fused_" + act + "_err"] = float(np.abs(yg.get() - ref).max()) / scale
            yg.fill(np.float32(np.nan))
            code = lib.cudnnConvolutionForward(
                ctx.handle, _ref(_ONE), p.x_desc, _vp(xg.ptr), p.w_desc, _vp(wg.ptr),
                p.conv_desc, ALGO[algo], ctx.ws_ptr(), size, _ref(_ZERO), p.y_desc, _vp(yg.ptr))
            drv.Context.synchronize()
            row["conv"] = status_name(v, code)
            if code == 0:
                ref = _reference(x, w, None, stride, pad, False)
                row["conv_err"] = float(np.abs(yg.get() - ref).max()) / max(1.0, np.abs(ref).max())
            rows.append(row)
        p.destroy(lib)
    out["rows"] = rows
    # which cuDNN files ended up mapped into this process
    try:
        with open("/proc/self/maps") as fh:
            out["mapped"] = sorted({ln.split()[-1] for ln in fh if "libcudnn" in ln})
    except OSError:
        pass
    return out


if __name__ == "__main__":
    import json
    try:
        import pycuda.autoinit  # noqa: F401
    except Exception as e:
        print(json.dumps({"error": f"no CUDA context: {e}"}))
        sys.exit(1)
    print(json.dumps(probe(), default=str))

"""The GPU-free part of cuDNN: versions, status codes, algorithms, and THE policy.

Nothing here loads cuDNN, PyCUDA or a GPU (tests/test_cudnn_policy.py runs it
on the CPU). ``fused_policy(version, algo, activation)`` decides, per cuDNN
build and forward algorithm, whether a convolution takes the fused
cudnnConvolutionBiasActivationForward (FUSED) or the separate calls
(UNFUSED); ``cudnn_activation(act)`` says which minidnn activations cuDNN can
apply at all (identity and relu: the fused call accepts no other), so that the
CUDA backend routes every other activation elsewhere.
"""

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


# Measured with the probe (bench/cudnn_probe.py; then python -m minidnn.backends.cudnn)
# on an H100 (driver 580, sm_90), fp32 NCHW, CUDNN_FMA_MATH, alpha2 = 0, bias on, on 5
# shapes: x (2,16,14,14) with 1x1 and 3x3/pad 1 filters, (1,8,15,17) 3x3 stride 2,
# (4,3,20,20) 5x5 pad 2, (1,3,32,32) 7x7 stride 2 pad 3. cuDNN 9.19.0 (PyTorch's
# nvidia-cudnn-cu13, cudart 13.1) and 9.14.0 (the system's, cudart 13.0) answered
# exactly alike:
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
# plans._Plan.choose_algo), only when forced. cuDNN 8.x and 9.0-9.13 were not measured:
# they keep the documented rule (identity fused only with IMPLICIT_PRECOMP_GEMM).
_IDENTITY_FUSED_MEASURED = frozenset(set(FWD_ALGOS) - {"DIRECT"})
_MEASURED_FROM = 91400       # cuDNN 9.14: the oldest build measured


def fused_policy(version, algo, activation):
    """THE policy: FUSED (one cudnnConvolutionBiasActivationForward) or UNFUSED
    (cudnnConvolutionForward + cudnnAddTensor [+ cudnnActivationForward]).

    version: cudnnGetVersion(); algo: a name of FWD_ALGOS (or its number);
    activation: "relu" or "identity" (cuDNN has no other: see cudnn_activation).
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


# The MDNN_ACT_* codes (kernels/common/activations.h) cuDNN can apply, as its
# activation names. cudnnConvolutionBiasActivationForward documents only
# CUDNN_ACTIVATION_RELU and (from cuDNN 7.1, with the limits fused_policy
# encodes) CUDNN_ACTIVATION_IDENTITY; every other activation runs outside cuDNN:
# the CUDA backend then uses its own kernel, or cuDNN's convolution with the
# identity epilogue followed by its own activation kernel (backends/cuda/routing.py).
CUDNN_ACTIVATIONS = {0: IDENTITY, 1: RELU}


def cudnn_activation(act):
    """The cuDNN activation (RELU or IDENTITY) that computes minidnn activation ``act``,
    or None when cuDNN has none for it. ``act``: an ops.Act or a (code, param) pair, a
    bool (True: relu), None (identity), or the names RELU / IDENTITY themselves."""
    if act is None or act is False or act == IDENTITY:
        return IDENTITY
    if act is True or act == RELU:
        return RELU
    try:
        code = int(act[0])
    except Exception:
        raise ValueError(f"expected an activation (minidnn.ops.Act, a (code, param) pair, "
                         f"a bool or {RELU!r}/{IDENTITY!r}), got {act!r}") from None
    return CUDNN_ACTIVATIONS.get(code)

"""ctypes bindings: the signatures of the cuDNN functions minidnn calls, their
constants, and the call/check helpers (a failing call raises CudnnError with
its status decoded for the loaded version). Needs no GPU to import.
"""
import ctypes

from .library import CudnnError, _state
from .policy import decode_version, status_name

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
    "cudnnSetConvolutionGroupCount": [_vp, _int],
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


def bind(lib, v):
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

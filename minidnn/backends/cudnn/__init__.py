"""cuDNN for the CUDA backend: a version-aware fused-convolution policy, ctypes
bindings and a safe fallback.

WHAT THIS PACKAGE REPRESENTS: an optional accelerator for ``conv2d`` on the GPU.
``conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x, act)`` has the
signature of the backend op (minidnn/ops.py) and takes PyCUDA GPUArrays:
x (N,K,R,C), w (F,K,nr,nc), b (F,) or None, y (N,F,Ro,Co), all float32 and
C-contiguous; afterwards y = act(conv(x, w) + b), act being relu or identity
(an ops.Act, a bool, RELU or IDENTITY): cuDNN's fused call applies no other
activation, and ``cudnn_activation(act)`` says which ones it can, so that the
CUDA backend (backends/cuda/routing.py) runs every other one in its own
kernels. ``conv2d_residual(x, w, b, z, y, ...)`` adds z (y's shape, never
aliasing y) before the activation: the fused call's z with alpha2 = 1 (plain
conv2d passes z = y with alpha2 = 0), or, unfused, cudnnAddTensor(z) between
the convolution and the bias. The backend calls it only when ``available()``;
cuDNN is never required.

One concern a module:

    policy.py    GPU-free: versions, status codes, algorithms, fused_policy,
                 cudnn_activation (tests/test_cudnn_policy.py runs it on the CPU)
    library.py   finding and loading libcudnn (MINIDNN_CUDNN, MINIDNN_CUDNN_PATH,
                 the nvidia-cudnn wheels, the system's), what was loaded
    bindings.py  ctypes signatures, constants, checked calls
    plans.py     per-context handles and workspaces, per-shape plans (descriptors,
                 algorithm), the convolution calls and their fallback, conv_path

Importing the package needs neither a GPU nor cuDNN nor PyCUDA. The probe of
the fused call over algorithms x activations x shapes (with its own float64
reference) is bench/cudnn_probe.py.
"""
from .bindings import FwdAlgoPerf
from .library import (CudnnError, available, candidates, library_path, load, unavailable_reason,
                      version, version_string)
from .plans import (conv2d, conv2d_grouped, conv2d_residual, conv_path, force_algorithm,
                    inject_not_supported, prepare, reset, set_fused, set_stream)
from .policy import (ALGO, CUDNN_ACTIVATIONS, FUSED, FWD_ALGOS, IDENTITY, PATH_NAMES, RELU,
                     RESIDUAL, STATUS_V8, STATUS_V9, UNFUSED, cudnn_activation, decode_version,
                     fused_policy, is_not_supported, not_supported_code, status_category,
                     status_name, version_text)

__all__ = [
    # policy (GPU-free)
    "ALGO", "CUDNN_ACTIVATIONS", "FUSED", "FWD_ALGOS", "IDENTITY", "PATH_NAMES", "RELU",
    "RESIDUAL", "STATUS_V8", "STATUS_V9", "UNFUSED", "cudnn_activation", "decode_version",
    "fused_policy", "is_not_supported", "not_supported_code", "status_category", "status_name",
    "version_text",
    # the library
    "CudnnError", "available", "candidates", "library_path", "load", "unavailable_reason",
    "version", "version_string", "FwdAlgoPerf",
    # convolutions
    "conv2d", "conv2d_grouped", "conv2d_residual", "conv_path", "force_algorithm",
    "inject_not_supported",
    "prepare", "reset", "set_fused", "set_stream",
]

"""THE seam between layers and backends (dlib's ``tt::``).

One function per primitive. Each dispatches on the array type of its first
tensor argument: ``numpy.ndarray`` goes to ``backends/cpu.py``, a PyCUDA
``GPUArray`` to ``backends/cuda.py``. Both backends implement the same names
with the same signatures; docs/INTERNALS.md is the contract. Backends are
imported lazily, so importing minidnn needs neither the compiled kernels of a
backend that is not used nor any GPU software.

Every tensor is float32, C-contiguous, shaped (N, K, R, C); outputs ``y`` are
preallocated by the caller and filled in place.
"""
import importlib

import numpy as np

_by_type = {}       # array type -> backend module
_by_name = {}       # "cpu" / "cuda" -> backend module


def backend(name):
    """Return the backend module called ``name`` ("cpu" or "cuda"), importing it once.

    Raises RuntimeError with the reason (and how to install what is missing)
    when the backend cannot be loaded.
    """
    be = _by_name.get(name)
    if be is None:
        if name not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {name!r}: expected 'cpu' or 'cuda'")
        be = importlib.import_module(f"minidnn.backends.{name}")
        _by_name[name] = be
        _by_type[getattr(be, "array_type", np.ndarray if name == "cpu" else None)] = be
    return be


def backend_of(x):
    """The backend that owns array ``x``."""
    be = _by_type.get(type(x))
    if be is None:
        if isinstance(x, np.ndarray):
            return backend("cpu")
        raise TypeError(f"expected a numpy.ndarray or a device array, got {type(x).__name__}")
    return be


def conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x, relu):
    """y (N,F,Ro,Co) = cross-correlation of x (N,K,R,C) with w (F,K,nr,nc), zero padded,
    plus b (F,) unless None, then max(., 0) if relu; one pass."""
    backend_of(x).conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x, relu)


def fc(x, w, b, y, relu):
    """y (N,O) = x (N,D) @ w(O,D).T + b (O,) unless None, then max(., 0) if relu."""
    backend_of(x).fc(x, w, b, y, relu)


def affine(x, gamma, beta, y, relu):
    """y = x * gamma[k] + beta[k] per channel k of x (N,K,R,C), then max(., 0) if relu.
    FC-mode callers pass x viewed as (N, K*R*C, 1, 1)."""
    backend_of(x).affine(x, gamma, beta, y, relu)


def relu(x, y):
    """y = max(x, 0); y may be x."""
    backend_of(x).relu(x, y)


def add(a, b, y, relu):
    """y = a + b (same shapes), then max(., 0) if relu; y may be a or b."""
    backend_of(a).add(a, b, y, relu)


def max_pool(x, y, nr, nc, stride_y, stride_x, pad_y, pad_x):
    """y = max over the in-bounds part of each nr x nc window of x (padding never counts)."""
    backend_of(x).max_pool(x, y, nr, nc, stride_y, stride_x, pad_y, pad_x)


def avg_pool(x, y, nr, nc, stride_y, stride_x, pad_y, pad_x):
    """y = mean over the in-bounds part of each nr x nc window of x (padding excluded)."""
    backend_of(x).avg_pool(x, y, nr, nc, stride_y, stride_x, pad_y, pad_x)


def softmax(x, y):
    """y[n,:,r,c] = softmax over k of x[n,:,r,c]."""
    backend_of(x).softmax(x, y)

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


def conv2d_residual(x, w, b, z, y, stride_y, stride_x, pad_y, pad_x, relu):
    """As conv2d, plus z (N,F,Ro,Co) added before the relu in the same pass:
    y = conv(x, w) + b + z, then max(., 0) if relu. z never aliases y."""
    backend_of(x).conv2d_residual(x, w, b, z, y, stride_y, stride_x, pad_y, pad_x, relu)


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


# ---------------------------------------------------------------------------- training
# The backward passes, batch-norm with batch statistics, the losses and the
# solver updates (used by minidnn/train.py). They live in a separate backend
# module per device ("minidnn.backends.<name>_grad") so that inference never
# loads them; the GPU has none yet. Gradients are written into the
# preallocated outputs, never accumulated into.

_grad_by_name = {}


def _grad(x):
    """The training backend for the device that owns array x."""
    name = backend_of(x).name
    be = _grad_by_name.get(name)
    if be is None:
        if name != "cpu":
            raise NotImplementedError(f"training on the {name} backend is not supported yet: "
                                      f"train on the CPU, then move the net with net.to({name!r})")
        be = _grad_by_name[name] = importlib.import_module(f"minidnn.backends.{name}_grad")
    return be


def conv2d_grad_data(dy, w, dx, stride_y, stride_x, pad_y, pad_x):
    """dx (N,K,R,C) = d sum(dy * conv2d(x, w)) / dx for dy (N,F,Ro,Co), w (F,K,nr,nc)."""
    _grad(dy).conv2d_grad_data(dy, w, dx, stride_y, stride_x, pad_y, pad_x)


def conv2d_grad_params(x, dy, dw, db, stride_y, stride_x, pad_y, pad_x):
    """dw (F,K,nr,nc) = d sum(dy * conv2d(x, w)) / dw; db (F,) = sum of dy per filter
    (skipped when db is None)."""
    _grad(x).conv2d_grad_params(x, dy, dw, db, stride_y, stride_x, pad_y, pad_x)


def fc_grad_data(dy, w, dx):
    """dx (N,D) = dy (N,O) @ w (O,D)."""
    _grad(dy).fc_grad_data(dy, w, dx)


def fc_grad_params(x, dy, dw, db):
    """dw (O,D) = dy (N,O).T @ x (N,D); db (O,) = dy summed over samples (unless None)."""
    _grad(x).fc_grad_params(x, dy, dw, db)


def relu_grad(y, dy, dx):
    """dx = dy where relu's output y > 0, else 0; dx may be dy."""
    _grad(y).relu_grad(y, dy, dx)


def bn_forward_train(x, gamma, beta, y, mean, invstd, running_mean, running_var, avg_factor, eps):
    """Batch norm with this batch's statistics per channel of x (N,K,R,C) (FC mode: x
    viewed (N,D,1,1)): y = gamma (x - mean) invstd + beta; writes mean and invstd (K,);
    running_mean/var move towards the batch's by avg_factor (variance unbiased)."""
    _grad(x).bn_forward_train(x, gamma, beta, y, mean, invstd, running_mean, running_var,
                              avg_factor, eps)


def bn_grad(x, gamma, mean, invstd, dy, dx, dgamma, dbeta):
    """The backward of bn_forward_train: dx (N,K,R,C), dgamma and dbeta (K,)."""
    _grad(x).bn_grad(x, gamma, mean, invstd, dy, dx, dgamma, dbeta)


def affine_grad(x, gamma, dy, dx, dgamma, dbeta):
    """The backward of affine: dx = dy * gamma[k]; dgamma = sum dy * x; dbeta = sum dy
    (per channel); any output may be None."""
    _grad(dy).affine_grad(x, gamma, dy, dx, dgamma, dbeta)


def max_pool_grad(x, dy, dx, nr, nc, stride_y, stride_x, pad_y, pad_x):
    """dx (N,K,R,C): dy goes to the first largest in-bounds input of each window."""
    _grad(x).max_pool_grad(x, dy, dx, nr, nc, stride_y, stride_x, pad_y, pad_x)


def avg_pool_grad(dy, dx, nr, nc, stride_y, stride_x, pad_y, pad_x):
    """dx (N,K,R,C): dy shared equally by the in-bounds inputs of each window."""
    _grad(dy).avg_pool_grad(dy, dx, nr, nc, stride_y, stride_x, pad_y, pad_x)


def softmax_grad(y, dy, dx):
    """dx = y * (dy - sum_k dy * y) per (n, r, c), y being softmax's output."""
    _grad(y).softmax_grad(y, dy, dx)


def loss_multiclass_log(x, labels, dx):
    """Mean softmax cross-entropy of x (N,K,1,1) against int64 labels (N,);
    writes dx = (softmax(x) - onehot) / N; returns the loss (float)."""
    return _grad(x).loss_multiclass_log(x, labels, dx)


def loss_mean_squared(x, t, dx):
    """sum (x - t)^2 / N over x and targets t of N*D values; writes dx = 2 (x - t) / N;
    returns the loss (float)."""
    return _grad(x).loss_mean_squared(x, t, dx)


def sgd_update(w, g, v, lr, weight_decay, momentum):
    """In place: v = momentum v - lr (weight_decay w + g); w += v."""
    _grad(w).sgd_update(w, g, v, lr, weight_decay, momentum)


def adam_update(w, g, m, v, lr, weight_decay, beta1, beta2, t):
    """In place, step t >= 1: Adam with weight decay added to the gradient (dlib's adam)."""
    _grad(w).adam_update(w, g, m, v, lr, weight_decay, beta1, beta2, t)


def all_finite(a):
    """Whether every value of float32 array a is finite."""
    return _grad(a).all_finite(a)

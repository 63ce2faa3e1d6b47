"""THE seam between layers and backends (dlib's ``tt::``): every op declared once.

Each op is one entry of ``OPS``: its name, its tensor inputs, its outputs and
its attributes, in the order of its arguments, and one sentence of meaning.
From that table come the dispatch functions of this module (``ops.conv2d(...)``
runs the backend that owns the first tensor argument), the compiled forward's
rewrites (which argument is the output, which is the activation epilogue),
``backend_info``, and the contract test that every backend implements every op
with the same signature (tests/test_ops_contract.py).

Backends are modules registered under their name and their array type:
``numpy.ndarray`` -> ``backends/cpu.py``, PyCUDA's ``GPUArray`` ->
``backends/cuda``. They are imported lazily, so importing minidnn needs
neither the compiled kernels of a backend that is not used nor any GPU
software. Training ops (``grad=True``) live in a second module per device,
``backends/<name>_grad``, so that inference never loads them.

Conventions: every tensor is float32, C-contiguous, shaped (N, K, R, C) (fc
sees (N, D)); outputs are preallocated by the caller and filled in place,
never accumulated into. ``act`` is an activation (:class:`Act`: a code and one
float parameter; see kernels/common/activations.h) applied in the op's
epilogue; ``True`` means relu and ``False``/``None`` identity.
"""
import importlib
import inspect
from typing import NamedTuple

import numpy as np


# --------------------------------------------------------------------------- activations
class Act(NamedTuple):
    """An activation as data: ``code`` is its MDNN_ACT_* number in
    kernels/common/activations.h, ``param`` its one parameter (alpha, ceiling,
    beta; 0 when unused). ``name`` is what records and printing use."""
    code: int
    param: float = 0.0

    @property
    def name(self):
        return ACT_NAMES.get(self.code, f"act{self.code}")

    def __bool__(self):            # identity is "no activation"
        return self.code != 0

    def __repr__(self):
        if self.code in _PARAM_NAMES:
            return f"{self.name}({_PARAM_NAMES[self.code]}={self.param:g})"
        return self.name


# code -> name and code -> parameter name, for the activations of
# kernels/common/activations.h; each activation layer registers its own
# (layers/activations.py), tests/test_activations.py checks them against the header.
ACT_NAMES = {0: "identity", 1: "relu"}
_PARAM_NAMES = {}
IDENTITY = Act(0)
RELU = Act(1)


def register_act(code, name, param_name=None):
    """Declare activation ``code`` (its MDNN_ACT_* number) under ``name``."""
    if ACT_NAMES.get(code, name) != name:
        raise ValueError(f"activation code {code} is already {ACT_NAMES[code]!r}")
    ACT_NAMES[code] = name
    if param_name:
        _PARAM_NAMES[code] = param_name


def act_by_name(name, param=0.0):
    """The Act called ``name`` (KeyError when there is none)."""
    for code, n in ACT_NAMES.items():
        if n == name:
            return Act(code, float(param) if code in _PARAM_NAMES else 0.0)
    raise KeyError(name)


def act_param_name(code):
    """The name of activation ``code``'s parameter, or None when it has none."""
    return _PARAM_NAMES.get(code)


def as_act(a):
    """An :class:`Act` from an Act, a bool (True: relu) or None (identity)."""
    if isinstance(a, Act):
        return a
    if a is None or a is False:
        return IDENTITY
    if a is True:
        return RELU
    raise TypeError(f"expected an activation (minidnn.ops.Act) or a bool, got {a!r}")


# --------------------------------------------------------------------------- the table
class OpSpec(NamedTuple):
    """One op: ``args`` in call order = inputs, outputs, attributes."""
    name: str
    inputs: tuple
    outputs: tuple
    attrs: tuple
    optional: frozenset        # tensor arguments that may be None
    grad: bool                 # a training op (backends/<name>_grad)
    doc: str

    @property
    def args(self):
        return self.inputs + self.outputs + self.attrs

    @property
    def output_index(self):
        """Position of the (first) output argument."""
        return len(self.inputs)

    @property
    def act_index(self):
        """Position of the ``act`` attribute (the epilogue), or None."""
        a = self.args
        return a.index("act") if "act" in a else None

    def bind(self, args):
        """{argument name: value} for a call's positional ``args``."""
        return dict(zip(self.args, args))

    def call_args(self, named):
        """The positional arguments for ``named`` (a dict from bind())."""
        return tuple(named[a] for a in self.args)


OPS = {}


def _op(signature, doc, grad=False):
    """Declare an op: ``"name: x w b? -> y; stride_y act"`` (``?``: may be None)."""
    name, _, rest = signature.partition(":")
    tensors, _, attrs = rest.partition(";")
    ins, _, outs = tensors.partition("->")
    ins, outs, attrs = ins.split(), outs.split(), attrs.split()
    optional = frozenset(a.rstrip("?") for a in ins + outs if a.endswith("?"))
    spec = OpSpec(name.strip(), tuple(a.rstrip("?") for a in ins), tuple(a.rstrip("?") for a in outs),
                  tuple(attrs), optional, grad, doc)
    OPS[spec.name] = spec
    globals()[spec.name] = _dispatcher(spec)


def _dispatcher(spec):
    name = spec.name
    if spec.grad:
        def fn(*args):
            return getattr(_grad(args[0]), name)(*args)
    else:
        def fn(*args):
            return getattr(backend_of(args[0]), name)(*args)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = spec.doc
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in spec.args])
    fn.spec = spec
    return fn


def table():
    """The op table as markdown (name, arguments, meaning), for the docs."""
    rows = ["| op | arguments | training | meaning |", "| --- | --- | --- | --- |"]
    for s in OPS.values():
        ins = " ".join(a + ("?" if a in s.optional else "") for a in s.inputs)
        outs = " ".join(a + ("?" if a in s.optional else "") for a in s.outputs)
        rows.append(f"| {s.name} | `{ins} -> {outs}; {' '.join(s.attrs)}` | "
                    f"{'yes' if s.grad else ''} | {s.doc} |")
    return "\n".join(rows)


def spec_of(fn):
    """The OpSpec of an ops function or of a backend's implementation (by name), or None."""
    spec = getattr(fn, "spec", None)
    return spec if spec is not None else OPS.get(getattr(fn, "__name__", None))


# ---- inference ---------------------------------------------------------------------------
_op("conv2d: x w b? -> y; stride_y stride_x pad_y pad_x act",
    "y (N,F,Ro,Co) = cross-correlation of x (N,K,R,C) with w (F,K,nr,nc), zero padded, plus "
    "b (F,) unless None, then act; one pass.")
_op("conv2d_residual: x w b? z -> y; stride_y stride_x pad_y pad_x act",
    "As conv2d, plus z (N,F,Ro,Co) added before the activation in the same pass: "
    "y = act(conv(x, w) + b + z). z never aliases y.")
_op("fc: x w b? -> y; act",
    "y (N,O) = act(x (N,D) @ w (O,D).T + b (O,) unless None).")
_op("affine: x gamma beta -> y; act",
    "y = act(x * gamma[k] + beta[k]) per channel k of x (N,K,R,C); FC-mode callers pass x "
    "viewed as (N, K*R*C, 1, 1). y may be x.")
_op("activation: x -> y; act",
    "y = act(x) elementwise; y may be x.")
_op("add: a b -> y; act",
    "y = act(a + b) (same shapes); y may be a or b. The CUDA backend also takes (N,K,R,C) "
    "operands of other shapes than y, each index of y an operand lacks counting as 0 in it "
    "(dlib's zero-padded tt::add, add_prev_; y then overlaps neither; the CPU's add_prev_ "
    "does that case in NumPy).")
_op("max_pool: x -> y; nr nc stride_y stride_x pad_y pad_x",
    "y = max over the in-bounds part of each nr x nc window of x (padding never counts).")
_op("avg_pool: x -> y; nr nc stride_y stride_x pad_y pad_x",
    "y = mean over the in-bounds part of each nr x nc window of x (padding excluded).")
_op("softmax: x -> y",
    "y[n,:,r,c] = softmax over k of x[n,:,r,c].")

# ---- training ------------------------------------------------------------------------------
_op("conv2d_grad_data: dy w -> dx; stride_y stride_x pad_y pad_x",
    "dx (N,K,R,C) = d sum(dy * conv2d(x, w)) / dx for dy (N,F,Ro,Co), w (F,K,nr,nc).", grad=True)
_op("conv2d_grad_params: x dy -> dw db?; stride_y stride_x pad_y pad_x",
    "dw (F,K,nr,nc) = d sum(dy * conv2d(x, w)) / dw; db (F,) = sum of dy per filter "
    "(skipped when db is None).", grad=True)
_op("fc_grad_data: dy w -> dx",
    "dx (N,D) = dy (N,O) @ w (O,D).", grad=True)
_op("fc_grad_params: x dy -> dw db?",
    "dw (O,D) = dy (N,O).T @ x (N,D); db (O,) = dy summed over samples (unless None).", grad=True)
_op("activation_grad: x? y? dy -> dx; act",
    "dx = dy * act'(x), given x and y = act(x) (the derivative may read either; pass None "
    "for one it does not need: kernels/common/activations.h); dx may be dy.", grad=True)
_op("prelu_alpha_grad: x dy -> dalpha",
    "dalpha (1,) = sum of dy * x over the elements where x <= 0 (prelu's learned alpha).",
    grad=True)
_op("bn_forward_train: x gamma beta -> y mean invstd running_mean running_var; avg_factor eps",
    "Batch norm with this batch's statistics per channel of x (N,K,R,C) (FC mode: x viewed "
    "(N,D,1,1)): y = gamma (x - mean) invstd + beta; writes mean and invstd (K,); "
    "running_mean/var move towards the batch's by avg_factor (variance unbiased).", grad=True)
_op("bn_grad: x gamma mean invstd dy -> dx dgamma dbeta",
    "The backward of bn_forward_train: dx (N,K,R,C), dgamma and dbeta (K,).", grad=True)
_op("affine_grad: x gamma dy -> dx? dgamma? dbeta?",
    "The backward of affine: dx = dy * gamma[k]; dgamma = sum dy * x; dbeta = sum dy (per "
    "channel); any output may be None.", grad=True)
_op("max_pool_grad: x dy -> dx; nr nc stride_y stride_x pad_y pad_x",
    "dx (N,K,R,C): dy goes to the first largest in-bounds input of each window.", grad=True)
_op("avg_pool_grad: dy -> dx; nr nc stride_y stride_x pad_y pad_x",
    "dx (N,K,R,C): dy shared equally by the in-bounds inputs of each window.", grad=True)
_op("softmax_grad: y dy -> dx",
    "dx = y * (dy - sum_k dy * y) per (n, r, c), y being softmax's output.", grad=True)
_op("loss_multiclass_log: x labels -> dx",
    "Mean softmax cross-entropy of x (N,K,1,1) against int64 labels (N,); writes "
    "dx = (softmax(x) - onehot) / N; returns the loss (float).", grad=True)
_op("loss_mean_squared: x t -> dx",
    "sum (x - t)^2 / N over x and targets t of N*D values; writes dx = 2 (x - t) / N; "
    "returns the loss (float).", grad=True)
_op("sgd_update: w g v -> ; lr weight_decay momentum",
    "In place: v = momentum v - lr (weight_decay w + g); w += v.", grad=True)
_op("adam_update: w g m v -> ; lr weight_decay beta1 beta2 t eps",
    "In place, step t >= 1: Adam with weight decay added to the gradient (dlib's adam; eps 1e-8).",
    grad=True)
_op("all_finite: a -> ",
    "Whether every value of float32 array a is finite.", grad=True)

# ---- tensor and routing layers (catalogue)
_op("mul_scalar: x -> y; val",
    "y = val * x elementwise (multiply_, dropout_ at inference); y may be x.")
_op("mul: a b -> y",
    "y[n,k,r,c] = a[n,k,r,c] * b[n,k,r,c] for every index of y (N,K,R,C), an operand without "
    "that index counting as 0 (dlib's multiply_zero_padded: mult_prev_); y may be a or b when "
    "all three have one shape.")
_op("scale_channels: x s -> y",
    "y[n,k,r,c] = x[n,k,r,c] * s[n,k] for x, y (N,K,R,C) and s (N,K,1,1) (scale_, scale_prev_); "
    "y may be x.")
_op("copy_range: x -> y; x_offset y_offset count",
    "For each sample n: y[n].flat[y_offset : y_offset+count] = x[n].flat[x_offset : "
    "x_offset+count]; the rest of y is left as it is (concat_, extract_). x and y may share "
    "memory only with one sample.")
_op("l2normalize: x -> y; eps",
    "y[n] = x[n] / sqrt(eps + sum of x[n]^2) for each sample n (dlib's inverse_norms and "
    "scale_rows); y may be x.")
_op("reorg: x -> y; row_stride col_stride",
    "Space to depth (dlib's reorg): x (N,K,R,C) -> y (N, K*rs*cs, R/rs, C/cs), "
    "y[n, (dr*cs + dc)*K + k, r, c] = x[n, k, r*rs + dr, c*cs + dc].")
_op("resize_bilinear: x -> y",
    "Bilinear resize of each plane of x (N,K,R,C) to y (N,K,Ro,Co) with dlib's aligned corners: "
    "output (i, j) samples input (i*(R-1)/max(Ro-1,1), j*(C-1)/max(Co-1,1)).")
_op("dropout_train: x -> y mask; drop_rate key",
    "mask = 1 where u >= drop_rate, else 0, u in [0, 1) a counter hash of (key, flat index) "
    "(24 bits; the same for any thread count); y = x * mask, unscaled as dlib's dropout_.",
    grad=True)
_op("dot_channels: a b -> y",
    "y[n,k,0,0] = sum over (r, c) of a[n,k,r,c] * b[n,k,r,c] for a, b (N,K,R,C) (the "
    "gradient of scale_'s scales).", grad=True)
_op("l2normalize_grad: x y dy -> dx; eps",
    "The backward of l2normalize, y its output: per sample, dx = (dy - y * sum(dy * y)) / "
    "sqrt(eps + sum x^2); dx may be dy.", grad=True)
_op("reorg_grad: dy -> dx; row_stride col_stride",
    "The backward of reorg (a permutation): dx (N,K,R,C) from dy (N, K*rs*cs, R/rs, C/cs).",
    grad=True)
_op("resize_bilinear_grad: dy -> dx",
    "The backward of resize_bilinear: dx (N,K,R,C) = the transpose of the resize applied to "
    "dy (N,K,Ro,Co).", grad=True)


# ---- convolution family (catalogue) ------------------------------------------------------
# conv2d_grouped is the op of a con_ with groups > 1 or a dilation > 1 (conv2d, the hot
# path that every backend implements, stays as it is); conv2d_transpose is cont_'s.
_op("conv2d_grouped: x w b? -> y; stride_y stride_x pad_y pad_x dilation_y dilation_x groups act",
    "y (N,F,Ro,Co) = grouped, dilated cross-correlation of x (N,K,R,C) with w (F,K/groups,nr,nc): "
    "output channel f (group g = f // (F/groups)) sums over input channels [g K/groups, "
    "(g+1) K/groups), tap (i, j) reading x[n, k, oy*stride_y - pad_y + i*dilation_y, "
    "ox*stride_x - pad_x + j*dilation_x] (zero outside), Ro = 1 + (R + 2 pad_y - "
    "(dilation_y (nr-1) + 1)) // stride_y; plus b (F,) unless None, then act; one pass.")
_op("conv2d_transpose: x w b? -> y; stride_y stride_x pad_y pad_x act",
    "y (N,F,Ro,Co) = the transposed convolution of x (N,K,R,C) with w (K,F,nr,nc) (dlib's cont_, "
    "the adjoint of conv2d): x[n,k,i,j] w[k,f,a,c] summed into y[n, f, i*stride_y - pad_y + a, "
    "j*stride_x - pad_x + c] (dropped outside), Ro = stride_y (R-1) + nr - 2 pad_y; plus b (F,) "
    "unless None, then act.")
_op("conv2d_grouped_grad_data: dy w -> dx; stride_y stride_x pad_y pad_x dilation_y dilation_x groups",
    "dx (N,K,R,C) = d sum(dy * conv2d_grouped(x, w)) / dx for dy (N,F,Ro,Co), w (F,K/groups,nr,nc).",
    grad=True)
_op("conv2d_grouped_grad_params: x dy -> dw db?; stride_y stride_x pad_y pad_x dilation_y "
    "dilation_x groups",
    "dw (F,K/groups,nr,nc) = d sum(dy * conv2d_grouped(x, w)) / dw; db (F,) = sum of dy per "
    "filter (skipped when db is None).", grad=True)

# ---- Winograd (CPU) ------------------------------------------------------------------------
# A 3x3 stride-1 convolution as Winograd F(m x m, 3 x 3), m = 2, 4 or 6
# (kernels/cpu/winograd.pyx). Only the CPU backend has these ops: they are OPTIONAL (a
# backend without them runs conv2d, and a net moves to it all the same); con_.build emits
# conv2d_winograd where the backend has it and winograd_tile says it is faster, with u
# computed once per change of the filters (core.Plan.cached).
_op("winograd_tile: x w -> ; stride_y stride_x pad_y pad_x",
    "The output tile m (2, 4 or 6) at which the backend's conv2d_winograd runs conv2d(x, w) "
    "(x (N,K,R,C), w (F,K,nr,nc), these strides and pads) fastest, or 0 when conv2d is faster "
    "or the shape is not 3x3 stride 1 (a rule measured per shape; reads only the shapes; "
    "returns an int).")
_op("winograd_filters: w -> u; m",
    "u (alpha^2, ceil(F/16), K, 16), alpha = m + 2: the transform G w[f,k] G^T of each 3x3 "
    "filter of w (F,K,3,3), computed in float64, packed in slivers of 16 filters (zero past F).")
_op("conv2d_winograd: x u b? z? -> y; pad_y pad_x m act",
    "y (N,F,Ro,Co) = act(conv2d(x, w, stride 1) + b + z) for the 3x3 filters w given as "
    "u = winograd_filters(w, m); F is y's channel count; b (F,) and z (the shape of y, never "
    "aliasing it) may be None.")
OPTIONAL = frozenset({"winograd_tile", "winograd_filters", "conv2d_winograd"})


def winograd_filters_shape(w_shape, m):
    """The shape of winograd_filters' u for filters of shape w_shape (F, K, 3, 3)."""
    f, k = int(w_shape[0]), int(w_shape[1])
    return ((m + 2) ** 2, (f + 15) // 16, k, 16)

# ---- images (dlib input layers)
_op("tiled_pyramid: x -> ; rects",
    "In place on x (N,K,R,C) whose rectangle rects[0] (left, top, right, bottom, inclusive) "
    "holds level 0 of a tiled image pyramid: each rects[i], i >= 1, of every plane becomes "
    "dlib's bilinear resize of rects[i-1] (create_tiled_pyramid, bit for bit; the input layers "
    "build the pyramid where the net runs: on the host for a CPU net, on the GPU for a cuda "
    "one, whose backend has it).")
_op("resize_image_u8: img -> out",
    "out = dlib's bilinear resize_image of img, for the uint8 images (H,W,3) RGB or (H,W) "
    "grayscale the image input layers take (dlib's pyramid_up; bit for bit).")
# OPTIONAL like the Winograd ops: a device backend need not have them (the CUDA backend has
# both, backends/cuda/image_ops.py; a backend without them gets the tensor built on the host)
OPTIONAL = OPTIONAL | {"tiled_pyramid", "resize_image_u8"}



# --------------------------------------------------------------------------- backends
_by_type = {}       # array type -> backend module
_by_name = {}       # "cpu" / "cuda" -> backend module
_grad_by_name = {}
DEVICES = ("cpu", "cuda")


def register_backend(module, grad_module=None):
    """Register a backend module: it names itself (``module.name``) and the class of its
    arrays (``module.array_type``). Also used by tests for stand-in backends."""
    _by_name[module.name] = module
    _by_type[module.array_type] = module
    if grad_module is not None:
        _grad_by_name[module.name] = grad_module
    return module


def backend(name):
    """The backend module called ``name`` ("cpu" or "cuda"), imported once.

    Raises RuntimeError with the reason (and how to install what is missing)
    when the backend cannot be loaded.
    """
    be = _by_name.get(name)
    if be is None:
        if name not in DEVICES:
            raise ValueError(f"unknown device {name!r}: expected 'cpu' or 'cuda'")
        be = register_backend(importlib.import_module(f"minidnn.backends.{name}"))
    return be


def backend_of(x):
    """The backend that owns array ``x``."""
    be = _by_type.get(type(x))
    if be is None:
        if isinstance(x, np.ndarray):
            return backend("cpu")
        for t, b in _by_type.items():
            if isinstance(x, t):
                return b
        raise TypeError(f"expected a numpy.ndarray or a device array, got {type(x).__name__}")
    return be


def _grad(x):
    """The training backend for the device that owns array x."""
    name = backend_of(x).name
    be = _grad_by_name.get(name)
    if be is None:
        try:
            be = importlib.import_module(f"minidnn.backends.{name}_grad")
        except ModuleNotFoundError:
            raise NotImplementedError(
                f"training on the {name} backend is not supported yet: train on the CPU, "
                f"then move the net with net.to({name!r})") from None
        _grad_by_name[name] = be
    return be


def implementation(backend_module, name):
    """The backend's function for op ``name``; NotImplementedError when it has none."""
    spec = OPS[name]
    mod = backend_module
    if spec.grad:
        mod = _grad_by_name.get(backend_module.name)
        if mod is None:
            mod = _grad(backend_module.empty((1,)))
    fn = getattr(mod, name, None)
    if fn is None:
        raise NotImplementedError(f"the {backend_module.name} backend has no kernel for {name}")
    return fn

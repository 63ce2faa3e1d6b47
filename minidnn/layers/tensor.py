"""Layers that reshape, rescale or normalise a tensor (the catalogue's softmax_all,
l2normalize, dropout, multiply, extract, reorg, upsample, resize_to).

Each follows dlib's layer of the same name (dlib/dnn/layers.h and the tt:: functions of
dlib/cuda/cpu_dlib.cpp and tensor_tools.cpp); the docstrings say where it differs.
"""
import numpy as np

from .. import ops
from ..core import Layer, Node, ShapeError, f64, u32
from .common import CONV, pos_int, real


# ---------------------------------------------------------------------------- softmax_all
class softmax_all_(Layer):
    """WHAT THIS OBJECT REPRESENTS: for each sample, softmax over all its K*R*C values
    together (dlib's softmax_all_: tt::softmax_all is the channel softmax of the sample
    viewed as K*R*C channels at one location). Shape unchanged."""

    kind = "softmax_all"
    record = "softmax_all_1"
    forward_ops = ("softmax",)
    trainable = True
    output_mode = None

    @staticmethod
    def _view(a):
        return a.reshape(a.shape[0], -1, 1, 1)

    def build(self, plan, x):
        y = plan.empty(x.shape)
        plan.step(ops.softmax, self._view(x), self._view(y))
        return y

    def forward_train(self, ctx, x):
        y = np.empty(x.shape, np.float32)
        ops.softmax(self._view(x), self._view(y))
        return y

    def backward(self, ctx, dy):
        """dx = y * (dy - sum(dy * y)) over each sample (softmax_grad on the same view)."""
        if not ctx.need_dx:
            return None
        dx = np.empty(dy.shape, np.float32)
        ops.softmax_grad(self._view(ctx.y), self._view(dy), self._view(dx))
        return dx


def softmax_all(subnet):
    """dlib's softmax_all (see softmax_all_)."""
    return Node(softmax_all_(), subnet)


# ---------------------------------------------------------------------------- l2normalize
class l2normalize_(Layer):
    """WHAT THIS OBJECT REPRESENTS: each sample divided by its L2 norm, as dlib computes it:
    y[n] = x[n] / sqrt(eps + sum of x[n]^2) (tt::inverse_norms is
    1/sqrt(sum_cols(squared(x)) + eps), then scale_rows). Shape unchanged. eps > 0 (dlib
    accepts 0, which makes an all-zero sample NaN)."""

    kind = "l2normalize"
    settings = (f64("eps"),)
    record = "l2normalize_1"
    forward_ops = ("l2normalize",)
    trainable = True
    output_mode = None

    def __init__(self, eps=1e-5):
        super().__init__()
        self.eps = real("l2normalize", "eps", eps, 0, lo_open=True)

    def describe(self):
        return f"eps={self.eps:g}"

    def build(self, plan, x):
        y = plan.empty(x.shape)
        plan.step(ops.l2normalize, x, y, self.eps)
        return y

    def forward_train(self, ctx, x):
        y = np.empty(x.shape, np.float32)
        ops.l2normalize(x, y, self.eps)
        return y

    def backward(self, ctx, dy):
        """dx = (dy - y * sum(dy * y)) / sqrt(eps + sum x^2) per sample (dlib's dot_prods and
        scale_rows2)."""
        if not ctx.need_dx:
            return None
        dx = np.empty(dy.shape, np.float32)
        ops.l2normalize_grad(ctx.x, ctx.y, dy, dx, self.eps)
        return dx


def l2normalize(subnet, *, eps=1e-5):
    """dlib's l2normalize (see l2normalize_)."""
    return Node(l2normalize_(eps), subnet)


# ---------------------------------------------------------------------------- multiply, dropout
class _scalar_multiple(Layer):
    """Base of multiply_ and dropout_: at inference y = g * x for one scalar g (``factor``).

    Affine-like (g per channel, h = 0) once its channel count is known (after a forward),
    so fuse() folds it into a con_/fc_ directly below and, where it cannot, turns it into
    the equivalent affine_ as it does a bn_. Before any forward (a net just loaded, say)
    fuse() leaves it as it is."""

    forward_ops = ("mul_scalar",)
    trainable = True
    output_mode = None
    mode = CONV                    # the per-channel form fuse() reads

    def __init__(self):
        super().__init__()
        self._k = None             # channels of the last input (the per-channel form's size)

    def factor(self):
        raise NotImplementedError

    @property
    def affine_like(self):
        return self._k is not None

    def setup(self, in_shape):
        self._k = int(in_shape[1])

    # -- the affine form for fuse(): g = factor per channel, h = 0
    @property
    def gamma(self):
        return None if self._k is None else np.full(self._k, self.factor(), np.float32)

    @property
    def beta(self):
        return None if self._k is None else np.zeros(self._k, np.float32)

    def affine_form(self):
        if self._k is None:
            raise ValueError(f"{self.kind}: run a forward first (its channel count is unknown)")
        return np.full(self._k, float(self.factor())), np.zeros(self._k)

    def scale_shift(self):
        g, h = self.affine_form()
        return g.astype(np.float32), h.astype(np.float32)

    def build(self, plan, x):
        y = plan.empty(x.shape)
        plan.step(ops.mul_scalar, x, y, self.factor())
        return y


class multiply_(_scalar_multiple):
    """WHAT THIS OBJECT REPRESENTS: y = val * x (dlib's multiply_; what dlib deploys in place
    of a dropout_, with val = 1 - drop_rate). Shape unchanged."""

    kind = "multiply"
    settings = (f64("val"),)
    record = "multiply_1"

    def __init__(self, val=0.5):
        super().__init__()
        self.val = real("multiply", "val", val)

    def factor(self):
        return self.val

    def describe(self):
        return f"val={self.val:g}"

    def forward_train(self, ctx, x):
        y = np.empty(x.shape, np.float32)
        ops.mul_scalar(x, y, self.val)
        return y

    def backward(self, ctx, dy):
        if not ctx.need_dx:
            return None
        dx = np.empty(dy.shape, np.float32)
        ops.mul_scalar(dy, dx, self.val)
        return dx


_M64 = (1 << 64) - 1


def _mix64(z):
    """splitmix64's finaliser on a Python int (mod 2^64)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class dropout_(Layer):
    """WHAT THIS OBJECT REPRESENTS: dropout: an identity at inference; in training each value
    is zeroed with probability drop_rate and the kept ones are scaled by 1 / (1 - drop_rate)
    ("inverted" dropout), so the expected output is the same in both modes.

    (dlib's dropout_ zeroes without rescaling and expects the trained net's dropout layers
    to be replaced by multiply_(1 - drop_rate) for inference; minidnn's identity at
    inference needs the rescaling in training instead. A dlib file's dropout_ record is
    read as multiply_, as dlib reads it: minidnn/dlib.py.)

    The training mask comes from a counter hash (kernels/cpu/tensor.pyx, dropout_train)
    keyed by (trainer seed, training step, layer index): the same seed gives the same masks,
    and a run resumed from a synchronisation file draws the masks it would have drawn, with
    nothing saved. A value is kept when its 24-bit uniform u satisfies u >= drop_rate, so
    drop_rate 0 keeps everything and 1 drops everything.
    """

    kind = "dropout"
    settings = (f64("drop_rate"),)
    record = "dropout_1"
    trainable = True
    identity_at_inference = True
    output_mode = None

    def __init__(self, drop_rate=0.5):
        super().__init__()
        self.drop_rate = real("dropout", "drop_rate", drop_rate, 0, 1)
        self.last_key = None       # the mask key of the last training forward (for tests)

    def describe(self):
        return f"drop_rate={self.drop_rate:g}"

    def build(self, plan, x):
        return x                   # an identity at inference: no kernel, no copy

    @staticmethod
    def mask_key(seed, step, index):
        """The 64-bit key of the mask of layer<index> at training step ``step`` of a trainer
        seeded with ``seed``."""
        return _mix64(_mix64(_mix64(int(seed) + 0x9E3779B97F4A7C15) + int(step)) + int(index))

    def forward_train(self, ctx, x):
        key = self.mask_key(ctx.tape.seed, ctx.tape.step, ctx.index)
        self.last_key = key
        y = np.empty(x.shape, np.float32)
        mask = np.empty(x.shape, np.float32)
        ops.dropout_train(x, y, mask, self.drop_rate, key)
        if self.drop_rate < 1:     # the kept values, scaled: y = x * mask / (1 - p)
            keep = 1.0 / (1.0 - self.drop_rate)
            ops.mul_scalar(y, y, keep)
            ops.mul_scalar(mask, mask, keep)
        ctx.saved = mask
        return y

    def backward(self, ctx, dy):
        """dx = dy * mask / (1 - drop_rate) (the scaled mask)."""
        if not ctx.need_dx:
            return None
        dx = np.empty(dy.shape, np.float32)
        ops.mul(dy, ctx.saved, dx)
        return dx


def multiply(subnet, *, val=0.5):
    """dlib's multiply (see multiply_)."""
    return Node(multiply_(val), subnet)


def dropout(subnet, *, drop_rate=0.5):
    """dlib's dropout (see dropout_)."""
    return Node(dropout_(drop_rate), subnet)


# ---------------------------------------------------------------------------- extract
class extract_(Layer):
    """WHAT THIS OBJECT REPRESENTS: per sample, the k*nr*nc values that start at flat offset
    ``offset`` of the sample's K*R*C values, shaped (k, nr, nc) (dlib's extract_: an alias of
    each sample as a row, copy_tensor of the range). (N, K, R, C) -> (N, k, nr, nc); the
    input needs offset + k*nr*nc <= K*R*C.

    At batch 1 (or when the range is the whole sample) the output is a view of the input:
    no copy."""

    kind = "extract"
    settings = (u32("offset"), u32("k"), u32("nr"), u32("nc"))
    record = "extract_1"
    forward_ops = ("copy_range",)
    trainable = True

    def __init__(self, offset, k, nr, nc):
        super().__init__()
        self.offset = pos_int("extract", "offset", offset, 0)
        self.k = pos_int("extract", "k", k)
        self.nr = pos_int("extract", "nr", nr)
        self.nc = pos_int("extract", "nc", nc)

    def describe(self):
        return f"offset={self.offset}, k={self.k}, nr={self.nr}, nc={self.nc}"

    @property
    def count(self):
        return self.k * self.nr * self.nc

    def setup(self, in_shape):
        d = in_shape[1] * in_shape[2] * in_shape[3]
        if self.offset + self.count > d:
            raise ShapeError(f"extracting {self.count} values at offset {self.offset} needs "
                             f"{self.offset + self.count} values per sample, the input "
                             f"{tuple(in_shape)} has {d}")

    def _out_shape(self, x):
        return (x.shape[0], self.k, self.nr, self.nc)

    def build(self, plan, x):
        n, d = x.shape[0], int(np.prod(x.shape[1:]))
        if plan.device == "cpu" and (n == 1 or self.count == d):
            # a contiguous part of the input: the output is a view, no copy
            return x.reshape(n, d)[:, self.offset:self.offset + self.count].reshape(
                self._out_shape(x))
        if plan.device != "cpu" and (n == 1 or self.count == d) and plan.can_view():
            return plan.view(x, self.offset, self._out_shape(x))    # a device view: no copy
        y = plan.empty(self._out_shape(x))
        plan.step(ops.copy_range, x, y, self.offset, 0, self.count)
        return y

    def forward_train(self, ctx, x):
        y = np.empty(self._out_shape(x), np.float32)
        ops.copy_range(x, y, self.offset, 0, self.count)
        return y

    def backward(self, ctx, dy):
        """dx: dy at the extracted range, 0 elsewhere."""
        if not ctx.need_dx:
            return None
        dx = np.zeros(ctx.x.shape, np.float32)
        ops.copy_range(dy, dx, 0, self.offset, self.count)
        return dx


def extract(offset, k, nr, nc, subnet):
    """dlib's extract<offset, k, nr, nc, SUBNET> (see extract_)."""
    return Node(extract_(offset, k, nr, nc), subnet)


# ---------------------------------------------------------------------------- reorg
class reorg_(Layer):
    """WHAT THIS OBJECT REPRESENTS: space to depth (dlib's reorg_, YOLO's passthrough):
    (N, K, R, C) -> (N, K*rs*cs, R/rs, C/cs) with
    y[n, (dr*cs + dc)*K + k, r, c] = x[n, k, r*rs + dr, c*cs + dc]
    (dlib's tt::reorg since its fix of #3012: the offset within the block is the slower
    channel index, the input channel the faster one; PyTorch's pixel_unshuffle orders them
    the other way round). R and C must be multiples of the strides."""

    kind = "reorg"
    settings = (u32("row_stride"), u32("col_stride"))
    record = "reorg_1"
    forward_ops = ("reorg",)
    trainable = True

    def __init__(self, row_stride=2, col_stride=2):
        super().__init__()
        self.row_stride = pos_int("reorg", "row_stride", row_stride)
        self.col_stride = pos_int("reorg", "col_stride", col_stride)

    def describe(self):
        return f"row_stride={self.row_stride}, col_stride={self.col_stride}"

    def setup(self, in_shape):
        if in_shape[2] % self.row_stride or in_shape[3] % self.col_stride:
            raise ShapeError(f"the input's rows and columns {tuple(in_shape[2:])} must be "
                             f"multiples of row_stride={self.row_stride} and "
                             f"col_stride={self.col_stride}")

    def _out_shape(self, s):
        rs, cs = self.row_stride, self.col_stride
        return (s[0], s[1] * rs * cs, s[2] // rs, s[3] // cs)

    def build(self, plan, x):
        y = plan.empty(self._out_shape(x.shape))
        plan.step(ops.reorg, x, y, self.row_stride, self.col_stride)
        return y

    def forward_train(self, ctx, x):
        y = np.empty(self._out_shape(x.shape), np.float32)
        ops.reorg(x, y, self.row_stride, self.col_stride)
        return y

    def backward(self, ctx, dy):
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        ops.reorg_grad(dy, dx, self.row_stride, self.col_stride)
        return dx


def reorg(row_stride, col_stride, subnet):
    """dlib's reorg_<row_stride, col_stride> (dlib's reorg<SUBNET> is reorg(2, 2, subnet))."""
    return Node(reorg_(row_stride, col_stride), subnet)


# ---------------------------------------------------------------------------- upsample, resize_to
class _bilinear(Layer):
    """Base of upsample_ and resize_to_: each plane resized bilinearly to ``out_size``, with
    dlib's aligned corners (tt::resize_bilinear, resize_image: output (i, j) samples input
    (i*sy, j*sx), sy = (R-1)/max(Ro-1, 1), sx = (C-1)/max(Co-1, 1)); an identity (no copy)
    when the size does not change."""

    forward_ops = ("resize_bilinear",)
    trainable = True

    def out_size(self, r, c):
        raise NotImplementedError

    def _out_shape(self, s):
        return (s[0], s[1]) + tuple(self.out_size(s[2], s[3]))

    def build(self, plan, x):
        shape = self._out_shape(x.shape)
        if shape == tuple(x.shape):
            return x
        y = plan.empty(shape)
        plan.step(ops.resize_bilinear, x, y)
        return y

    def forward_train(self, ctx, x):
        shape = self._out_shape(x.shape)
        if shape == tuple(x.shape):
            return x
        y = np.empty(shape, np.float32)
        ops.resize_bilinear(x, y)
        return y

    def backward(self, ctx, dy):
        if not ctx.need_dx:
            return None
        if dy.shape == ctx.x.shape:
            return dy
        dx = np.empty(ctx.x.shape, np.float32)
        ops.resize_bilinear_grad(dy, dx)
        return dx


class upsample_(_bilinear):
    """WHAT THIS OBJECT REPRESENTS: bilinear upsampling by integer factors (dlib's
    upsample_<scale_y, scale_x>): (N, K, R, C) -> (N, K, scale_y*R, scale_x*C)."""

    kind = "upsample"
    settings = (u32("scale_y"), u32("scale_x"))
    record = "upsample_1"

    def __init__(self, scale_y=2, scale_x=2):
        super().__init__()
        self.scale_y = pos_int("upsample", "scale_y", scale_y)
        self.scale_x = pos_int("upsample", "scale_x", scale_x)

    def describe(self):
        return f"scale_y={self.scale_y}, scale_x={self.scale_x}"

    def out_size(self, r, c):
        return r * self.scale_y, c * self.scale_x


class resize_to_(_bilinear):
    """WHAT THIS OBJECT REPRESENTS: bilinear resizing to nr x nc (dlib's resize_to_<NR, NC>):
    (N, K, R, C) -> (N, K, nr, nc)."""

    kind = "resize_to"
    settings = (u32("nr"), u32("nc"))
    record = "resize_to_1"

    def __init__(self, nr, nc):
        super().__init__()
        self.nr = pos_int("resize_to", "nr", nr)
        self.nc = pos_int("resize_to", "nc", nc)

    def describe(self):
        return f"nr={self.nr}, nc={self.nc}"

    def out_size(self, r, c):
        return self.nr, self.nc


def upsample(scale, subnet, *, scale_y=None, scale_x=None):
    """dlib's upsample<scale, SUBNET> (scale_y = scale_x = scale); scale_y / scale_x give
    dlib's upsample_<scale_y, scale_x> (see upsample_)."""
    return Node(upsample_(scale if scale_y is None else scale_y,
                          scale if scale_x is None else scale_x), subnet)


def resize_to(nr, nc, subnet):
    """dlib's resize_to<NR, NC, SUBNET> (see resize_to_)."""
    return Node(resize_to_(nr, nc), subnet)


__all__ = ["softmax_all_", "softmax_all", "l2normalize_", "l2normalize", "multiply_", "multiply",
           "dropout_", "dropout", "extract_", "extract", "reorg_", "reorg", "upsample_",
           "upsample", "resize_to_", "resize_to"]

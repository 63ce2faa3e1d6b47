"""The layers (dlib's layer_details objects) and their dlib-style factories.

Each layer class carries dlib's name with a trailing underscore (``con_``,
``fc_``, ``bn_`` ...) and states what it represents. A factory (``con``,
``fc``, ``relu`` ...) builds the layer and puts it on top of its subnet, which
is always the last positional argument, as in dlib's templates.

Layers never import a backend: every computation goes through ``ops``.
Parameters are NumPy float32 arrays allocated at the first forward (dlib's
setup); they are writable, and what is written into them is what the next
forward uses.
"""
import numpy as np

from . import ops
from .core import Layer, Node, ShapeError, input_tensor_

CONV, FC = "conv", "fc"

# Parameter initialisation is deterministic: seeded once, reseedable.
_rng = [np.random.default_rng(0)]


def set_seed(seed):
    """Reseed the generator that initialises new parameters."""
    _rng[0] = np.random.default_rng(seed)


def _randn(shape, fan_in):
    # He initialisation, fine for ReLU networks.
    return (_rng[0].standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)


def _pos_int(layer, name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{layer}: {name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _float32_param(layer, name, value, shape):
    """Validate an array being assigned to a parameter slot."""
    if value is None:
        return None
    a = np.ascontiguousarray(value, dtype=np.float32)
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{layer}: {name} must have shape {tuple(shape)}, got {a.shape}")
    return a


def _out_size(layer, what, n, k, stride, pad):
    if k > n + 2 * pad:
        raise ShapeError(f"the {what} window ({k}) is larger than its padded input ({n} + 2*{pad})")
    return 1 + (n + 2 * pad - k) // stride


def _relu_backward(y, dy):
    """dx = dy where relu's output y > 0, else 0 (a new array)."""
    dx = np.empty(dy.shape, np.float32)
    ops.relu_grad(y, dy, dx)
    return dx


# ----------------------------------------------------------------------------
class con_(Layer):
    """WHAT THIS OBJECT REPRESENTS: a 2-D convolution layer (cross-correlation).

    input (N, K, R, C) -> output (N, num_filters, Ro, Co), with
    Ro = 1 + (R + 2*padding_y - nr) // stride_y (same for columns).
    ``filters`` is (num_filters, K, nr, nc); ``biases`` is (num_filters,) or
    None when the bias is disabled. ``fused_relu`` (set by fuse()) applies
    max(., 0) to the output in the same pass.
    """

    kind = "con"
    params = ("filters", "biases")

    def __init__(self, num_filters, nr, nc, stride_y=1, stride_x=1, padding_y=None, padding_x=None,
                 bias=True):
        super().__init__()
        self.num_filters = _pos_int("con", "num_filters", num_filters)
        self.nr = _pos_int("con", "nr", nr)
        self.nc = _pos_int("con", "nc", nc)
        self.stride_y = _pos_int("con", "stride_y", stride_y)
        self.stride_x = _pos_int("con", "stride_x", stride_x)
        # dlib's rule: pad by half the kernel at stride 1, else 0.
        self.padding_y = (self.nr // 2 if self.stride_y == 1 else 0) if padding_y is None \
            else _pos_int("con", "padding_y", padding_y, 0)
        self.padding_x = (self.nc // 2 if self.stride_x == 1 else 0) if padding_x is None \
            else _pos_int("con", "padding_x", padding_x, 0)
        self.bias = bool(bias)
        self.fused_relu = False
        self.filters = None
        self.biases = None

    def describe(self):
        d = (f"num_filters={self.num_filters}, nr={self.nr}, nc={self.nc}, stride_y={self.stride_y}, "
             f"stride_x={self.stride_x}, padding_y={self.padding_y}, padding_x={self.padding_x}")
        if not self.bias:
            d += ", bias=False"
        if self.fused_relu:
            d += ", fused_relu"
        return d

    def setup(self, in_shape):
        k = in_shape[1]
        if self.filters is None:
            self.filters = _randn((self.num_filters, k, self.nr, self.nc), k * self.nr * self.nc)
            self.biases = np.zeros(self.num_filters, np.float32) if self.bias else None
        elif self.filters.shape[1] != k:
            raise ShapeError(f"expected input with {self.filters.shape[1]} channels (K), "
                             f"got shape {in_shape}")

    def out_shape(self, x_shape):
        """(N, num_filters, Ro, Co) for an input (N, K, R, C); ShapeError if the window does not fit."""
        n, _, r, c = x_shape
        return (n, self.num_filters,
                _out_size(self, "convolution", r, self.nr, self.stride_y, self.padding_y),
                _out_size(self, "convolution", c, self.nc, self.stride_x, self.padding_x))

    def build(self, plan, x):
        y = plan.empty(self.out_shape(x.shape))
        plan.step(ops.conv2d, x, plan.param(self.filters), plan.param(self.biases), y,
                  self.stride_y, self.stride_x, self.padding_y, self.padding_x, self.fused_relu)
        return y

    # -- training (minidnn/train.py; ctx: train._Ctx) ---------------------
    def forward_train(self, ctx, x):
        """Training forward: the inference convolution into a new array (N, F, Ro, Co)."""
        y = np.empty(self.out_shape(x.shape), np.float32)
        ops.conv2d(x, self.filters, self.biases, y, self.stride_y, self.stride_x,
                   self.padding_y, self.padding_x, self.fused_relu)
        return y

    def backward(self, ctx, dy):
        """dy (N, F, Ro, Co) -> ctx.grads filters/biases, and dx (N, K, R, C) if ctx.need_dx."""
        if self.fused_relu:
            dy = _relu_backward(ctx.y, dy)
        geo = (self.stride_y, self.stride_x, self.padding_y, self.padding_x)
        ops.conv2d_grad_params(ctx.x, dy, ctx.grad("filters"), ctx.grad("biases"), *geo)
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        ops.conv2d_grad_data(dy, self.filters, dx, *geo)
        return dx



class fc_(Layer):
    """WHAT THIS OBJECT REPRESENTS: a fully connected layer.

    input (N, K, R, C), flattened to (N, D = K*R*C) in C order ->
    output (N, num_outputs, 1, 1) = x @ weights.T + biases. ``weights`` is
    (num_outputs, D); ``biases`` (num_outputs,) or None. ``fused_relu`` as in con_.
    """

    kind = "fc"
    params = ("weights", "biases")

    def __init__(self, num_outputs, bias=True):
        super().__init__()
        self.num_outputs = _pos_int("fc", "num_outputs", num_outputs)
        self.bias = bool(bias)
        self.fused_relu = False
        self.weights = None
        self.biases = None

    def describe(self):
        d = f"num_outputs={self.num_outputs}"
        if not self.bias:
            d += ", bias=False"
        if self.fused_relu:
            d += ", fused_relu"
        return d

    def setup(self, in_shape):
        d = in_shape[1] * in_shape[2] * in_shape[3]
        if self.weights is None:
            self.weights = _randn((self.num_outputs, d), d)
            self.biases = np.zeros(self.num_outputs, np.float32) if self.bias else None
        elif self.weights.shape[1] != d:
            raise ShapeError(f"expected {self.weights.shape[1]} inputs per sample (K*R*C), "
                             f"got shape {in_shape} ({d})")

    def build(self, plan, x):
        n = x.shape[0]
        y = plan.empty((n, self.num_outputs, 1, 1))
        plan.step(ops.fc, x.reshape(n, -1), plan.param(self.weights), plan.param(self.biases),
                  y.reshape(n, self.num_outputs), self.fused_relu)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        """Training forward: the inference product into a new array (N, O, 1, 1)."""
        n = x.shape[0]
        y = np.empty((n, self.num_outputs, 1, 1), np.float32)
        ops.fc(x.reshape(n, -1), self.weights, self.biases, y.reshape(n, -1), self.fused_relu)
        return y

    def backward(self, ctx, dy):
        """dy (N, O, 1, 1) -> ctx.grads weights/biases, and dx shaped like x if ctx.need_dx."""
        if self.fused_relu:
            dy = _relu_backward(ctx.y, dy)
        n = dy.shape[0]
        dy2 = dy.reshape(n, -1)
        ops.fc_grad_params(ctx.x.reshape(n, -1), dy2, ctx.grad("weights"), ctx.grad("biases"))
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        ops.fc_grad_data(dy2, self.weights, dx.reshape(n, -1))
        return dx



class relu_(Layer):
    """WHAT THIS OBJECT REPRESENTS: y = max(x, 0), elementwise; shape unchanged.
    Disabled (an identity) when fuse() moved it into the layer below."""

    kind = "relu"

    def build(self, plan, x):
        if plan.fuse_relu(x):      # the layer below applies it in the same pass
            return x
        y = plan.empty(x.shape)
        plan.step(ops.relu, x, y)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        y = np.empty(x.shape, np.float32)
        ops.relu(x, y)
        return y

    def backward(self, ctx, dy):
        """dx = dy where the output is positive, else 0."""
        return _relu_backward(ctx.y, dy) if ctx.need_dx else None



def _mode_below(subnet):
    """The affine/bn mode that follows the layer below: FC above fc_ and bn_fc, else CONV."""
    n = subnet
    while n is not None:
        l = n.layer_details()
        if isinstance(l, fc_):
            return FC
        if isinstance(l, (bn_, affine_)):
            return l.mode
        if isinstance(l, (con_, max_pool_, avg_pool_, input_tensor_, add_prev_, skip_)):
            return CONV
        n = n.subnet()
    return CONV


def _per_unit(mode, in_shape):
    return in_shape[1] if mode == CONV else in_shape[1] * in_shape[2] * in_shape[3]


def _affine_views(mode, x, y):
    if mode == CONV:
        return x, y
    n = x.shape[0]
    d = x.shape[1] * x.shape[2] * x.shape[3]
    return x.reshape(n, d, 1, 1), y.reshape(n, d, 1, 1)


class bn_(Layer):
    """WHAT THIS OBJECT REPRESENTS: batch normalisation at inference.

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta, per
    channel (mode "conv", arrays of shape (K,)) or per unit (mode "fc", arrays
    of shape (K*R*C,)). Shape unchanged. A trainer that trains the layer uses
    batch statistics instead and updates the running ones.
    """

    kind = "bn"
    params = ("gamma", "beta")

    def __init__(self, mode=CONV, eps=1e-5):
        super().__init__()
        if mode not in (CONV, FC):
            raise ValueError(f"bn: mode must be 'conv' or 'fc', got {mode!r}")
        if not eps > 0:
            raise ValueError(f"bn: eps must be > 0, got {eps!r}")
        self.mode = mode
        self.eps = float(eps)
        self.gamma = self.beta = self.running_mean = self.running_var = None

    @property
    def kind(self):
        return "bn_con" if self.mode == CONV else "bn_fc"

    def describe(self):
        return f"eps={self.eps:g}"

    def setup(self, in_shape):
        k = _per_unit(self.mode, in_shape)
        if self.gamma is None:
            self.gamma = np.ones(k, np.float32)
            self.beta = np.zeros(k, np.float32)
            self.running_mean = np.zeros(k, np.float32)
            self.running_var = np.ones(k, np.float32)
        elif self.gamma.shape[0] != k:
            unit = "channels (K)" if self.mode == CONV else "units per sample (K*R*C)"
            raise ShapeError(f"expected input with {self.gamma.shape[0]} {unit}, got shape {in_shape}")

    def scale_shift(self):
        """The equivalent affine transform: (gamma / sqrt(var + eps), beta - mean * scale)."""
        scale = (self.gamma / np.sqrt(self.running_var.astype(np.float64) + self.eps)).astype(np.float32)
        return scale, (self.beta - self.running_mean * scale).astype(np.float32)

    def build(self, plan, x):
        # Recomputed from the running statistics before every CPU forward (cheap: O(K)).
        ss = plan.derived(lambda out: np.copyto(out, self.scale_shift()), (2, self.gamma.shape[0]))
        y = plan.empty(x.shape)
        xv, yv = _affine_views(self.mode, x, y)
        plan.step(ops.affine, xv, ss[0], ss[1], yv, False)
        return y

    # -- training ---------------------------------------------------------
    # Running statistics follow dlib's bn_: after u updates (capped at the window),
    # running = (1 - a) * running + a * batch with a = 1 / (u + 1), so they are the
    # plain average of the first batches, then an exponential average over about
    # `running_stats_window_size` batches; the running variance is the unbiased one.
    running_stats_window_size = 100

    def forward_train(self, ctx, x):
        """Training forward: normalise with this batch's mean and variance (per channel
        or per unit) and, when ctx.update_stats, move the running statistics."""
        y = np.empty(x.shape, np.float32)
        xv, yv = _affine_views(self.mode, x, y)
        k = self.gamma.shape[0]
        mean, invstd = np.empty(k, np.float32), np.empty(k, np.float32)
        avg = 0.0
        if ctx.update_stats:
            u = getattr(self, "num_updates", 0)
            avg = 1.0 / (u + 1)
            self.num_updates = min(u + 1, int(self.running_stats_window_size))
        ops.bn_forward_train(xv, self.gamma, self.beta, yv, mean, invstd, self.running_mean,
                             self.running_var, avg, self.eps)
        ctx.saved = (mean, invstd)
        return y

    def backward(self, ctx, dy):
        """Through the batch statistics: ctx.grads gamma/beta, and dx."""
        mean, invstd = ctx.saved
        dx = np.empty(dy.shape, np.float32)
        xv, dxv = _affine_views(self.mode, ctx.x, dx)
        dyv = _affine_views(self.mode, dy, dy)[0]
        ops.bn_grad(xv, self.gamma, mean, invstd, dyv, dxv, ctx.grad("gamma"), ctx.grad("beta"))
        return dx if ctx.need_dx else None



class affine_(Layer):
    """WHAT THIS OBJECT REPRESENTS: y = gamma * x + beta per channel (mode "conv",
    arrays (K,)) or per unit (mode "fc", arrays (K*R*C,)); dlib's batch-norm
    replacement for inference. ``disable()`` makes it a free identity (fuse()
    does this after folding it into the layer below).
    """

    kind = "affine"
    params = ("gamma", "beta")

    def __init__(self, mode=CONV, gamma=None, beta=None):
        super().__init__()
        if mode not in (CONV, FC):
            raise ValueError(f"affine: mode must be 'conv' or 'fc', got {mode!r}")
        self.mode = mode
        self.gamma = _float32_param("affine", "gamma", gamma, None)
        self.beta = _float32_param("affine", "beta", beta, None if gamma is None else self.gamma.shape)

    @classmethod
    def from_bn(cls, bn):
        """The affine layer equal to batch-norm layer ``bn`` at inference."""
        scale, shift = bn.scale_shift()
        a = cls(bn.mode, scale, shift)
        if bn.disabled:
            a.disable()
        return a

    def describe(self):
        return f"mode={self.mode}"

    def disable(self):
        """Make this layer a free identity. As in dlib, its gamma and beta are dropped
        (they were folded elsewhere); enable() gives back an identity affine."""
        self.gamma = self.beta = None
        super().disable()

    def setup(self, in_shape):
        if self.disabled:              # folded elsewhere: stays parameter-free
            return
        k = _per_unit(self.mode, in_shape)
        if self.gamma is None:
            self.gamma = np.ones(k, np.float32)
            self.beta = np.zeros(k, np.float32)
        elif self.gamma.shape[0] != k:
            unit = "channels (K)" if self.mode == CONV else "units per sample (K*R*C)"
            raise ShapeError(f"expected input with {self.gamma.shape[0]} {unit}, got shape {in_shape}")

    def build(self, plan, x):
        y = plan.empty(x.shape)
        xv, yv = _affine_views(self.mode, x, y)
        plan.step(ops.affine, xv, plan.param(self.gamma), plan.param(self.beta), yv, False)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        y = np.empty(x.shape, np.float32)
        xv, yv = _affine_views(self.mode, x, y)
        ops.affine(xv, self.gamma, self.beta, yv, False)
        return y

    def backward(self, ctx, dy):
        """ctx.grads gamma/beta (sums of dy * x and dy per unit), and dx = dy * gamma."""
        dx = np.empty(dy.shape, np.float32) if ctx.need_dx else None
        xv = _affine_views(self.mode, ctx.x, ctx.x)[0]
        dyv = _affine_views(self.mode, dy, dy)[0]
        dxv = None if dx is None else _affine_views(self.mode, dx, dx)[0]
        ops.affine_grad(xv, self.gamma, dyv, dxv, ctx.grad("gamma"), ctx.grad("beta"))
        return dx



class _pool(Layer):
    def __init__(self, nr, nc, stride_y=1, stride_x=1, padding_y=0, padding_x=0):
        super().__init__()
        k = self.kind
        # nr = nc = 0 means "the whole input" (dlib's avg_pool_everything).
        self.nr = _pos_int(k, "nr", nr, 0)
        self.nc = _pos_int(k, "nc", nc, 0)
        if (self.nr == 0) != (self.nc == 0):
            raise ValueError(f"{k}: nr and nc must both be 0 (whole input) or both positive")
        self.stride_y = _pos_int(k, "stride_y", stride_y)
        self.stride_x = _pos_int(k, "stride_x", stride_x)
        self.padding_y = _pos_int(k, "padding_y", padding_y, 0)
        self.padding_x = _pos_int(k, "padding_x", padding_x, 0)
        if self.nr and (self.padding_y >= self.nr or self.padding_x >= self.nc):
            raise ValueError(f"{k}: padding ({self.padding_y}, {self.padding_x}) must be smaller "
                             f"than the window ({self.nr}, {self.nc})")

    def describe(self):
        return (f"nr={self.nr}, nc={self.nc}, stride_y={self.stride_y}, stride_x={self.stride_x}, "
                f"padding_y={self.padding_y}, padding_x={self.padding_x}")

    def build(self, plan, x):
        n, k, r, c = x.shape
        nr, nc = (self.nr, self.nc) if self.nr else (r, c)
        py, px = (self.padding_y, self.padding_x) if self.nr else (0, 0)
        ro = _out_size(self, "pooling", r, nr, self.stride_y, py)
        co = _out_size(self, "pooling", c, nc, self.stride_x, px)
        y = plan.empty((n, k, ro, co))
        plan.step(self._op, x, y, nr, nc, self.stride_y, self.stride_x, py, px)
        return y

    # -- training ---------------------------------------------------------
    def _window(self, shape):
        r, c = shape[2], shape[3]
        nr, nc = (self.nr, self.nc) if self.nr else (r, c)
        py, px = (self.padding_y, self.padding_x) if self.nr else (0, 0)
        return nr, nc, self.stride_y, self.stride_x, py, px

    def forward_train(self, ctx, x):
        n, k, r, c = x.shape
        nr, nc, sy, sx, py, px = self._window(x.shape)
        ro = _out_size(self, "pooling", r, nr, sy, py)
        co = _out_size(self, "pooling", c, nc, sx, px)
        y = np.empty((n, k, ro, co), np.float32)
        self._op(x, y, nr, nc, sy, sx, py, px)
        return y

    def backward(self, ctx, dy):
        """dx: max pooling routes dy to each window's (first) largest input, average
        pooling shares it equally among the window's in-bounds inputs."""
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        if isinstance(self, max_pool_):
            ops.max_pool_grad(ctx.x, dy, dx, *self._window(ctx.x.shape))
        else:
            ops.avg_pool_grad(dy, dx, *self._window(ctx.x.shape))
        return dx



class max_pool_(_pool):
    """WHAT THIS OBJECT REPRESENTS: max pooling over nr x nc windows; padding is
    ignored (never taken as 0). (N, K, R, C) -> (N, K, Ro, Co)."""

    kind = "max_pool"
    _op = staticmethod(ops.max_pool)


class avg_pool_(_pool):
    """WHAT THIS OBJECT REPRESENTS: average pooling over nr x nc windows, averaging
    the in-bounds pixels only. nr = nc = 0 averages everything: (N, K, 1, 1)."""

    kind = "avg_pool"
    _op = staticmethod(ops.avg_pool)


class softmax_(Layer):
    """WHAT THIS OBJECT REPRESENTS: at each (n, r, c), softmax over the channels k."""

    kind = "softmax"

    def build(self, plan, x):
        y = plan.empty(x.shape)
        plan.step(ops.softmax, x, y)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        y = np.empty(x.shape, np.float32)
        ops.softmax(x, y)
        return y

    def backward(self, ctx, dy):
        """dx = y * (dy - sum_k dy * y) at each (n, r, c)."""
        if not ctx.need_dx:
            return None
        dx = np.empty(dy.shape, np.float32)
        ops.softmax_grad(ctx.y, dy, dx)
        return dx



class _numbered(Layer):
    """Base of tagN, skipN and add_prevN: a structural layer with a number 1..10 that is
    never disabled."""

    prefix = ""

    def __init__(self, id):
        super().__init__()
        self.id = _pos_int(self.prefix, "id", id)

    @property
    def kind(self):
        return f"{self.prefix}{self.id}"

    def disable(self):
        raise ValueError(f"{self.kind}: {self.prefix} layers cannot be disabled")


class tag_(_numbered):
    """WHAT THIS OBJECT REPRESENTS: an identity marker (tagN) that skipN and
    add_prevN above it refer to. Costs nothing."""

    prefix = "tag"

    def build(self, plan, x):
        plan.tags[self.id] = x
        return x

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        ctx.tape.tags[self.id] = ctx
        return x

    def backward(self, ctx, dy):
        """dy plus what the skipN / add_prevN above sent to this tag."""
        return ctx.take_extra(dy)



class skip_(_numbered):
    """WHAT THIS OBJECT REPRESENTS: output = the output of the nearest tagN below
    (its input is ignored). Costs nothing."""

    prefix = "skip"

    def build(self, plan, x):
        t = plan.tags.get(self.id)
        if t is None:
            raise ShapeError(f"there is no tag{self.id} below this layer")
        return t

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        ctx.ref = ctx.tape.tags.get(self.id)
        if ctx.ref is None:
            raise ShapeError(f"there is no tag{self.id} below this layer")
        return ctx.ref.y

    def backward(self, ctx, dy):
        """All of dy goes to the tag; the input below gets no gradient (None)."""
        ctx.ref.add_extra(dy)
        return None



class add_prev_(_numbered):
    """WHAT THIS OBJECT REPRESENTS: output = input + the output of the nearest tagN
    below; both must have the same shape (N, K, R, C)."""

    prefix = "add_prev"

    def build(self, plan, x):
        t = plan.tags.get(self.id)
        if t is None:
            raise ShapeError(f"there is no tag{self.id} below this layer")
        if tuple(t.shape) != tuple(x.shape):
            raise ShapeError(f"expected the input and tag{self.id}'s output to have the same shape, "
                             f"got {tuple(x.shape)} and {tuple(t.shape)}")
        if plan.fuse_residual(x, t):     # the convolution below adds t in its epilogue
            return x
        y = plan.empty(x.shape)
        plan.step(ops.add, x, t, y, False)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        ctx.ref = ctx.tape.tags.get(self.id)
        if ctx.ref is None:
            raise ShapeError(f"there is no tag{self.id} below this layer")
        t = ctx.ref.y
        if tuple(t.shape) != tuple(x.shape):
            raise ShapeError(f"expected the input and tag{self.id}'s output to have the same shape, "
                             f"got {tuple(x.shape)} and {tuple(t.shape)}")
        y = np.empty(x.shape, np.float32)
        ops.add(x, t, y, False)
        return y

    def backward(self, ctx, dy):
        """dy goes both to the input below and to the tag."""
        ctx.ref.add_extra(dy)
        return dy



# ---------------------------------------------------------------------------- factories
def _node(layer, subnet):
    return Node(layer, subnet)


def input_tensor():
    """The input layer: float32 arrays shaped (N, K, R, C)."""
    return Node(input_tensor_(), None)


def con(num_filters, nr, nc, stride_y, stride_x, subnet, *, padding_y=None, padding_x=None, bias=True):
    return _node(con_(num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x, bias), subnet)


def fc(num_outputs, subnet, *, bias=True):
    return _node(fc_(num_outputs, bias), subnet)


def relu(subnet):
    return _node(relu_(), subnet)


def bn_con(subnet, *, eps=1e-5):
    return _node(bn_(CONV, eps), subnet)


def bn_fc(subnet, *, eps=1e-5):
    return _node(bn_(FC, eps), subnet)


def affine(subnet):
    return _node(affine_(_mode_below(subnet)), subnet)


def max_pool(nr, nc, stride_y, stride_x, subnet, *, padding_y=0, padding_x=0):
    return _node(max_pool_(nr, nc, stride_y, stride_x, padding_y, padding_x), subnet)


def avg_pool(nr, nc, stride_y, stride_x, subnet, *, padding_y=0, padding_x=0):
    return _node(avg_pool_(nr, nc, stride_y, stride_x, padding_y, padding_x), subnet)


def avg_pool_everything(subnet):
    return _node(avg_pool_(0, 0, 1, 1, 0, 0), subnet)


def softmax(subnet):
    return _node(softmax_(), subnet)


def _make_family(cls, prefix, n):
    def make(i):
        def factory(subnet):
            return _node(cls(i), subnet)
        factory.__name__ = factory.__qualname__ = f"{prefix}{i}"
        factory.__doc__ = f"{prefix}{i}(subnet): see {cls.__name__}."
        factory._matches = lambda layer, i=i: isinstance(layer, cls) and layer.id == i
        return factory
    return [make(i) for i in range(1, n + 1)]


(tag1, tag2, tag3, tag4, tag5, tag6, tag7, tag8, tag9, tag10) = _make_family(tag_, "tag", 10)
(skip1, skip2, skip3, skip4, skip5, skip6, skip7, skip8, skip9, skip10) = _make_family(skip_, "skip", 10)
(add_prev1, add_prev2, add_prev3, add_prev4, add_prev5, add_prev6, add_prev7, add_prev8, add_prev9,
 add_prev10) = _make_family(add_prev_, "add_prev", 10)

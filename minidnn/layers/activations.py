"""Pointwise activations: one class each, its factory beside it.

An activation is data (ops.Act: a code and one parameter); its formula and
derivative are written once, in kernels/common/activations.h, and used by the
standalone kernel, every epilogue (con/fc/affine/add on both backends) and the
backward. The compiled forward moves an activation into the epilogue of the
kernel below it when nothing else reads that kernel's output, and fuse()
does so for good (``con_.act``).

Adding one (docs/ADDING_A_LAYER.md): its formula and derivative in
activations.h under a new MDNN_ACT_* code, a class here with that ``code``
(and ``param`` for a parameter: a Field whose value is the activation's p),
its factory, its reference in tests/reference.py and a case in
tests/test_activations.py.
"""
import numpy as np

from .. import ops
from ..core import Act, Layer, Node, Param, f64
from .common import real


class ActivationLayer(Layer):
    """WHAT THIS OBJECT REPRESENTS: y = f(x) elementwise, shape unchanged; f is the
    activation ``act`` (kernels/common/activations.h). Disabled (an identity)
    when fuse() moved it into the epilogue of the layer below.

    A subclass declares ``kind``, ``record``, ``code`` (its MDNN_ACT_* number)
    and, if f has a parameter, ``settings = (f64(name),)`` with that name.
    """

    pointwise = True
    trainable = True
    output_mode = None
    forward_ops = ("activation",)
    code = None
    act_param = None          # the name of the activation's parameter (default: the setting's)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.code is not None:
            ops.register_act(cls.code, cls.kind,
                             cls.act_param or (cls.settings[0].name if cls.settings else None))

    @property
    def act(self):
        """The ops.Act this layer applies."""
        return Act(self.code, float(getattr(self, self.settings[0].name)) if self.settings else 0.0)

    def describe(self):
        return ", ".join(f"{f.name}={getattr(self, f.name):g}" for f in self.settings)

    def build(self, plan, x):
        act = self.act
        if plan.fuse_activation(x, act):      # the layer below applies it in the same pass
            return x
        y = plan.empty(x.shape)
        plan.step(ops.activation, x, y, act)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        y = np.empty(x.shape, np.float32)
        ops.activation(x, y, self.act)
        return y

    def backward(self, ctx, dy):
        """dx = dy * f'(x)."""
        if not ctx.need_dx:
            return None
        dx = np.empty(dy.shape, np.float32)
        ops.activation_grad(ctx.x, ctx.y, dy, dx, self.act)
        return dx


class relu_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = max(x, 0), elementwise (dlib's relu)."""

    kind = "relu"
    record = "relu_1"
    code = 1


def relu(subnet):
    return Node(relu_(), subnet)


__all__ = ["ActivationLayer", "relu_", "relu"]


# ---------------------------------------------------------------------------- the catalogue
class sig_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = 1 / (1 + e^-x), elementwise (dlib's sig)."""

    kind = "sig"
    record = "sig_1"
    code = 4


def sig(subnet):
    return Node(sig_(), subnet)


class htan_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = tanh(x), elementwise (dlib's htan)."""

    kind = "htan"
    record = "htan_1"
    code = 5


def htan(subnet):
    return Node(htan_(), subnet)


class leaky_relu_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = x for x > 0, alpha * x otherwise (dlib's leaky_relu)."""

    kind = "leaky_relu"
    record = "leaky_relu_1"
    code = 2
    settings = (f64("alpha"),)

    def __init__(self, alpha=0.01):
        super().__init__()
        self.alpha = real("leaky_relu", "alpha", alpha)


def leaky_relu(subnet, *, alpha=0.01):
    return Node(leaky_relu_(alpha), subnet)


class elu_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = x for x > 0, alpha * (e^x - 1) otherwise (dlib's elu)."""

    kind = "elu"
    record = "elu_1"
    code = 6
    settings = (f64("alpha"),)

    def __init__(self, alpha=1.0):
        super().__init__()
        self.alpha = real("elu", "alpha", alpha)


def elu(subnet, *, alpha=1.0):
    return Node(elu_(alpha), subnet)


class gelu_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = x * Phi(x) = x/2 (1 + erf(x / sqrt 2)), the erf form
    (dlib's gelu)."""

    kind = "gelu"
    record = "gelu_1"
    code = 7


def gelu(subnet):
    return Node(gelu_(), subnet)


class mish_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = x * tanh(ln(1 + e^x)), elementwise (dlib's mish)."""

    kind = "mish"
    record = "mish_1"
    code = 8


def mish(subnet):
    return Node(mish_(), subnet)


class silu_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = x / (1 + e^-x), elementwise (dlib's silu, "swish")."""

    kind = "silu"
    record = "silu_1"
    code = 9


def silu(subnet):
    return Node(silu_(), subnet)


class clipped_relu_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = min(max(x, 0), ceiling), elementwise (dlib's
    clipped_relu; ReLU6 with the default ceiling)."""

    kind = "clipped_relu"
    record = "clipped_relu_1"
    code = 10
    settings = (f64("ceiling"),)

    def __init__(self, ceiling=6.0):
        super().__init__()
        self.ceiling = real("clipped_relu", "ceiling", ceiling, 0, lo_open=True)


def clipped_relu(subnet, *, ceiling=6.0):
    return Node(clipped_relu_(ceiling), subnet)


class smelu_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: dlib's smelu as its code computes it: y = x for x >= beta,
    0 for x <= -beta, (x + beta)^2 / (4 beta) between."""

    kind = "smelu"
    record = "smelu_1"
    code = 11
    settings = (f64("beta"),)

    def __init__(self, beta=1.0):
        super().__init__()
        self.beta = real("smelu", "beta", beta, 0, lo_open=True)


def smelu(subnet, *, beta=1.0):
    return Node(smelu_(beta), subnet)


__all__ += ["sig_", "sig", "htan_", "htan", "leaky_relu_", "leaky_relu", "elu_", "elu", "gelu_",
            "gelu", "mish_", "mish", "silu_", "silu", "clipped_relu_", "clipped_relu", "smelu_",
            "smelu"]


class prelu_(ActivationLayer):
    """WHAT THIS OBJECT REPRESENTS: y = x for x > 0, alpha * x otherwise, with one learned
    scalar alpha for the whole layer (dlib's prelu; ``alpha`` is a (1,) array starting
    at ``initial``). fuse() folds it into the layer below with the alpha it has then."""

    kind = "prelu"
    record = "prelu_1"
    code = 3
    settings = (f64("initial"),)
    params = (Param("alpha", 1),)
    act_param = "alpha"

    def __init__(self, initial=0.25):
        super().__init__()
        self.initial = real("prelu", "initial", initial)

    @property
    def act(self):
        a = self.alpha
        return Act(self.code, float(np.float32(self.initial) if a is None else a[0]))

    def describe(self):
        return f"initial={self.initial:g}"

    def param_shape(self, name):
        return (1,)

    def setup(self, in_shape):
        if self.alpha is None:
            self.set_array("alpha", np.full(1, self.initial, np.float32))

    def build(self, plan, x):
        # reads alpha at every run, so that writes into it are seen (on a GPU, as any
        # parameter, at the next net.to("cuda"))
        y = plan.empty(x.shape)
        plan.step(self._run, x, y)
        return y

    def _run(self, x, y):
        ops.activation(x, y, self.act)

    def backward(self, ctx, dy):
        """dx = dy * (x > 0 ? 1 : alpha); d alpha = sum of dy * x where x <= 0."""
        ops.prelu_alpha_grad(ctx.x, dy, ctx.grad("alpha"))
        return super().backward(ctx, dy)


def prelu(subnet, *, initial=0.25):
    return Node(prelu_(initial), subnet)


__all__ += ["prelu_", "prelu"]

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
from ..core import Act, Layer, Node


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

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.code is not None:
            ops.register_act(cls.code, cls.kind, cls.settings[0].name if cls.settings else None)

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

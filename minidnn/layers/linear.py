"""The layers with weights and an epilogue: con_ (convolution) and fc_ (fully connected).

Both take an activation epilogue (``act``, an ops.Act: identity unless fuse() or
the compiled forward moved a pointwise layer into it) and let fuse() fold an
affine-like layer above into their weights (``fold``).
"""
import numpy as np

from .. import ops
from ..core import IDENTITY, Layer, Node, Param, ShapeError, act_field, boolean, structure_changed, u32
from .common import CONV, FC, pos_int, flag, out_size, randn


class _Linear(Layer):
    """What con_ and fc_ share: the bias switch, the activation epilogue, folding."""

    takes_epilogue = True
    trainable = True
    weight_name = None            # "filters" / "weights"

    def _init_epilogue(self, bias, act):
        self.bias = flag(self.kind, "bias", bias)
        self._act = ops.as_act(act)

    @property
    def act(self):
        """The activation applied in the epilogue (ops.Act; identity when none)."""
        return self._act

    @act.setter
    def act(self, a):
        self._act = ops.as_act(a)
        structure_changed()

    @property
    def fused_relu(self):
        """Whether the epilogue is relu (the act of fuse()-d relu_ layers)."""
        return self._act == ops.RELU

    @fused_relu.setter
    def fused_relu(self, v):
        self.act = ops.RELU if v else IDENTITY

    def _describe_epilogue(self, d):
        if not self.bias:
            d += ", bias=False"
        if self._act:
            d += f", fused_{self._act!r}"
        return d

    def param_optional(self, name):
        return name == "biases" and not self.bias

    def fold(self, g, h):
        """Fold y = g * out + h (per output unit, float64) into the weights and bias:
        W'[o] = g[o] W[o], b'[o] = g[o] b[o] + h[o] (b = 0 where there is no bias, which
        this enables). Returns False (changing nothing) if the sizes differ."""
        w = getattr(self, self.weight_name)
        if g.shape[0] != w.shape[0]:
            return False
        w[...] = (w.astype(np.float64) * g.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        b = np.zeros(w.shape[0]) if self.biases is None else self.biases.astype(np.float64)
        new_b = (g * b + h).astype(np.float32)
        if self.biases is None:
            self.set_array("biases", new_b)
            self.bias = True
        else:
            self.biases[...] = new_b
        return True

    # -- training: the epilogue's activation ----------------------------------
    def _train_out(self, ctx, z):
        """z is the pre-activation output; apply the epilogue's activation (kept apart
        in training so that its derivative can read z)."""
        if not self._act:
            return z
        ctx.saved = z
        y = np.empty(z.shape, np.float32)
        ops.activation(z, y, self._act)
        return y

    def _train_dz(self, ctx, dy):
        if not self._act:
            return dy
        dz = np.empty(dy.shape, np.float32)
        ops.activation_grad(ctx.saved, ctx.y, dy, dz, self._act)
        return dz


# ----------------------------------------------------------------------------
class con_(_Linear):
    """WHAT THIS OBJECT REPRESENTS: a 2-D convolution layer (cross-correlation).

    input (N, K, R, C) -> output (N, num_filters, Ro, Co), with
    Ro = 1 + (R + 2*padding_y - nr) // stride_y (same for columns).
    ``filters`` is (num_filters, K, nr, nc); ``biases`` is (num_filters,) or
    None when the bias is disabled. ``act`` (set by fuse()) is applied to the
    output in the same pass (``fused_relu`` is act == relu).
    """

    kind = "con"
    settings = (u32("num_filters"), u32("nr"), u32("nc"), u32("stride_y"), u32("stride_x"),
                u32("padding_y"), u32("padding_x"), boolean("bias"), act_field())
    params = (Param("filters", 4), Param("biases", 1))
    record = "con_2"
    old_records = {"con_1": "_read_con_1"}
    forward_ops = ("conv2d", "conv2d_residual")
    weight_name = "filters"

    def __init__(self, num_filters, nr, nc, stride_y=1, stride_x=1, padding_y=None, padding_x=None,
                 bias=True, act=IDENTITY):
        super().__init__()
        self.num_filters = pos_int("con", "num_filters", num_filters)
        self.nr = pos_int("con", "nr", nr)
        self.nc = pos_int("con", "nc", nc)
        self.stride_y = pos_int("con", "stride_y", stride_y)
        self.stride_x = pos_int("con", "stride_x", stride_x)
        # dlib's rule: pad by half the kernel at stride 1, else 0.
        self.padding_y = (self.nr // 2 if self.stride_y == 1 else 0) if padding_y is None \
            else pos_int("con", "padding_y", padding_y, 0)
        self.padding_x = (self.nc // 2 if self.stride_x == 1 else 0) if padding_x is None \
            else pos_int("con", "padding_x", padding_x, 0)
        if self.padding_y >= self.nr or self.padding_x >= self.nc:
            raise ValueError(f"con: padding ({self.padding_y}, {self.padding_x}) must be smaller "
                             f"than the filter ({self.nr}, {self.nc}), as dlib requires")
        self._init_epilogue(bias, act)

    def describe(self):
        return self._describe_epilogue(
            f"num_filters={self.num_filters}, nr={self.nr}, nc={self.nc}, stride_y={self.stride_y}, "
            f"stride_x={self.stride_x}, padding_y={self.padding_y}, padding_x={self.padding_x}")

    def param_shape(self, name):
        return (self.num_filters, None, self.nr, self.nc) if name == "filters" else (self.num_filters,)

    def setup(self, in_shape):
        k = in_shape[1]
        if self.filters is None:
            self.set_array("filters", randn((self.num_filters, k, self.nr, self.nc), k * self.nr * self.nc))
            self.set_array("biases", np.zeros(self.num_filters, np.float32) if self.bias else None)
        elif self.filters.shape[1] != k:
            raise ShapeError(f"expected input with {self.filters.shape[1]} channels (K), "
                             f"got shape {in_shape}")

    def check_record(self):
        if self.filters is not None and self.filters.shape != (self.num_filters, self.filters.shape[1],
                                                               self.nr, self.nc):
            raise ValueError(f"parameter filters has shape {self.filters.shape}: expected "
                             f"{(self.num_filters, self.filters.shape[1], self.nr, self.nc)}")
        if self.filters is None and self.biases is not None:
            raise ValueError("biases present without filters")
        if self.biases is not None and self.biases.shape != (self.num_filters,):
            raise ValueError(f"parameter biases has shape {self.biases.shape}: expected "
                             f"{(self.num_filters,)}")

    @classmethod
    def _read_con_1(cls, r, tag):
        """con_1: as con_2 with a fused_relu flag in place of the activation."""
        disabled = r.bool("disabled")
        f, nr, nc, sy, sx, py, px = (r.u32(n) for n in ("num_filters", "nr", "nc", "stride_y",
                                                         "stride_x", "padding_y", "padding_x"))
        layer = cls(f, nr, nc, sy, sx, py, px, r.bool("bias"), ops.RELU if r.bool("fused_relu") else IDENTITY)
        layer.set_array("filters", r.array("filters", 4))
        layer.set_array("biases", r.array("biases", 1))
        if disabled:
            layer.disable()
        return layer

    def out_shape(self, x_shape):
        """(N, num_filters, Ro, Co) for an input (N, K, R, C); ShapeError if the window does not fit."""
        n, _, r, c = x_shape
        return (n, self.num_filters,
                out_size("convolution", r, self.nr, self.stride_y, self.padding_y),
                out_size("convolution", c, self.nc, self.stride_x, self.padding_x))

    def build(self, plan, x):
        y = plan.empty(self.out_shape(x.shape))
        plan.step(ops.conv2d, x, plan.param(self.filters), plan.param(self.biases), y,
                  self.stride_y, self.stride_x, self.padding_y, self.padding_x, self._act)
        return y

    # -- training (ctx: train.tape.Ctx) ---------------------------------------
    def forward_train(self, ctx, x):
        """The convolution into a new array (N, F, Ro, Co), then the epilogue's activation."""
        z = np.empty(self.out_shape(x.shape), np.float32)
        ops.conv2d(x, self.filters, self.biases, z, self.stride_y, self.stride_x,
                   self.padding_y, self.padding_x, IDENTITY)
        return self._train_out(ctx, z)

    def backward(self, ctx, dy):
        """dy (N, F, Ro, Co) -> ctx.grads filters/biases, and dx (N, K, R, C) if ctx.need_dx."""
        dy = self._train_dz(ctx, dy)
        geo = (self.stride_y, self.stride_x, self.padding_y, self.padding_x)
        ops.conv2d_grad_params(ctx.x, dy, ctx.grad("filters"), ctx.grad("biases"), *geo)
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        ops.conv2d_grad_data(dy, self.filters, dx, *geo)
        return dx


class fc_(_Linear):
    """WHAT THIS OBJECT REPRESENTS: a fully connected layer.

    input (N, K, R, C), flattened to (N, D = K*R*C) in C order ->
    output (N, num_outputs, 1, 1) = act(x @ weights.T + biases). ``weights`` is
    (num_outputs, D); ``biases`` (num_outputs,) or None. ``act`` as in con_.
    """

    kind = "fc"
    settings = (u32("num_outputs"), boolean("bias"), act_field())
    params = (Param("weights", 2), Param("biases", 1))
    record = "fc_2"
    old_records = {"fc_1": "_read_fc_1"}
    forward_ops = ("fc",)
    output_mode = FC
    weight_name = "weights"

    def __init__(self, num_outputs, bias=True, act=IDENTITY):
        super().__init__()
        self.num_outputs = pos_int("fc", "num_outputs", num_outputs)
        self._init_epilogue(bias, act)

    def describe(self):
        return self._describe_epilogue(f"num_outputs={self.num_outputs}")

    def param_shape(self, name):
        return (self.num_outputs, None) if name == "weights" else (self.num_outputs,)

    def setup(self, in_shape):
        d = in_shape[1] * in_shape[2] * in_shape[3]
        if self.weights is None:
            self.set_array("weights", randn((self.num_outputs, d), d))
            self.set_array("biases", np.zeros(self.num_outputs, np.float32) if self.bias else None)
        elif self.weights.shape[1] != d:
            raise ShapeError(f"expected {self.weights.shape[1]} inputs per sample (K*R*C), "
                             f"got shape {in_shape} ({d})")

    def check_record(self):
        if self.weights is not None and self.weights.shape[0] != self.num_outputs:
            raise ValueError(f"parameter weights has shape {self.weights.shape}: expected "
                             f"{(self.num_outputs, self.weights.shape[1])}")
        if self.weights is None and self.biases is not None:
            raise ValueError("biases present without weights")
        if self.biases is not None and self.biases.shape != (self.num_outputs,):
            raise ValueError(f"parameter biases has shape {self.biases.shape}: expected "
                             f"{(self.num_outputs,)}")

    @classmethod
    def _read_fc_1(cls, r, tag):
        """fc_1: as fc_2 with a fused_relu flag in place of the activation."""
        disabled = r.bool("disabled")
        layer = cls(r.u32("num_outputs"), r.bool("bias"))
        if r.bool("fused_relu"):
            layer._act = ops.RELU
        layer.set_array("weights", r.array("weights", 2))
        layer.set_array("biases", r.array("biases", 1))
        if disabled:
            layer.disable()
        return layer

    def build(self, plan, x):
        n = x.shape[0]
        y = plan.empty((n, self.num_outputs, 1, 1))
        plan.step(ops.fc, x.reshape(n, -1), plan.param(self.weights), plan.param(self.biases),
                  y.reshape(n, self.num_outputs), self._act)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        """The product into a new array (N, O, 1, 1), then the epilogue's activation."""
        n = x.shape[0]
        z = np.empty((n, self.num_outputs, 1, 1), np.float32)
        ops.fc(x.reshape(n, -1), self.weights, self.biases, z.reshape(n, -1), IDENTITY)
        return self._train_out(ctx, z)

    def backward(self, ctx, dy):
        """dy (N, O, 1, 1) -> ctx.grads weights/biases, and dx shaped like x if ctx.need_dx."""
        dy = self._train_dz(ctx, dy)
        n = dy.shape[0]
        dy2 = dy.reshape(n, -1)
        ops.fc_grad_params(ctx.x.reshape(n, -1), dy2, ctx.grad("weights"), ctx.grad("biases"))
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        ops.fc_grad_data(dy2, self.weights, dx.reshape(n, -1))
        return dx


# ---------------------------------------------------------------------------- factories
def con(num_filters, nr, nc, stride_y, stride_x, subnet, *, padding_y=None, padding_x=None, bias=True):
    """dlib's con<num_filters, nr, nc, stride_y, stride_x, subnet> (see con_)."""
    return Node(con_(num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x, bias), subnet)


def fc(num_outputs, subnet, *, bias=True):
    """dlib's fc<num_outputs, subnet> (fc_no_bias: bias=False; see fc_)."""
    return Node(fc_(num_outputs, bias), subnet)


__all__ = ["con_", "fc_", "con", "fc"]

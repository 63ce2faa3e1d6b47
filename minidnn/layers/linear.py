"""The layers with weights and an epilogue: con_ (convolution, grouped and dilated too),
cont_ (transposed convolution) and fc_ (fully connected).

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
        with self.writable(self.weight_name) as w:      # in place, through the sanctioned path
            w[...] = (w.astype(np.float64) * g.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        b = np.zeros(w.shape[0]) if self.biases is None else self.biases.astype(np.float64)
        new_b = (g * b + h).astype(np.float32)
        if self.biases is None:
            self.set_array("biases", new_b)
            self.bias = True
        else:
            with self.writable("biases") as bw:
                bw[...] = new_b
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
class _ConForwardOps:
    """con_.forward_ops: on the class, every op a con_ may emit (the contract test checks
    that each exists); on a layer, the ops *that* layer emits: conv2d and conv2d_residual
    (and conv2d_winograd on a backend that has it: ops.OPTIONAL), or conv2d_grouped alone
    when it is grouped or dilated. Node.to reads the layer's, so
    an ordinary con moves to a device that lacks conv2d_grouped, and a grouped one raises
    NotImplementedError naming the layer."""

    ALL = ("conv2d", "conv2d_residual", "conv2d_grouped", "conv2d_winograd")
    PLAIN = ("conv2d", "conv2d_residual", "conv2d_winograd")
    GROUPED = ("conv2d_grouped",)

    def __get__(self, obj, cls=None):
        if obj is None:
            return self.ALL
        return self.GROUPED if obj.grouped else self.PLAIN


class con_(_Linear):
    """WHAT THIS OBJECT REPRESENTS: a 2-D convolution layer (cross-correlation), with
    groups and dilation beyond dlib.

    input (N, K, R, C) -> output (N, num_filters, Ro, Co), with
    Ro = 1 + (R + 2*padding_y - span_y) // stride_y, span_y = dilation_y*(nr-1) + 1
    (same for columns). ``filters`` is (num_filters, K/groups, nr, nc) (PyTorch's layout;
    (num_filters, K, nr, nc) at groups = 1); ``biases`` is (num_filters,) or None when the
    bias is disabled. With ``groups`` = G the input channels and the filters are cut in G
    equal groups, filter group g seeing only input group g (G = K: a depthwise
    convolution, num_filters = m K with a channel multiplier m). ``dilation_y/x`` spread
    the taps: tap (i, j) reads input row oy*stride_y - padding_y + i*dilation_y. ``act``
    (set by fuse()) is applied to the output in the same pass (``fused_relu`` is
    act == relu). groups = 1 and no dilation run the conv2d op; anything else
    conv2d_grouped (see ``forward_ops``).

    Default padding, dlib's rule extended to dilation: span//2 = dilation*(n//2) at
    stride 1, else 0; a padding must be smaller than the span (dlib: than the filter).
    """

    kind = "con"
    settings = (u32("num_filters"), u32("nr"), u32("nc"), u32("stride_y"), u32("stride_x"),
                u32("padding_y"), u32("padding_x"), boolean("bias"), act_field(),
                u32("groups"), u32("dilation_y"), u32("dilation_x"))
    params = (Param("filters", 4), Param("biases", 1))
    record = "con_3"
    old_records = {"con_2": "_read_con_2", "con_1": "_read_con_1"}
    forward_ops = _ConForwardOps()
    weight_name = "filters"

    def __init__(self, num_filters, nr, nc, stride_y=1, stride_x=1, padding_y=None, padding_x=None,
                 bias=True, act=IDENTITY, groups=1, dilation_y=1, dilation_x=1):
        super().__init__()
        self.num_filters = pos_int("con", "num_filters", num_filters)
        self.nr = pos_int("con", "nr", nr)
        self.nc = pos_int("con", "nc", nc)
        self.stride_y = pos_int("con", "stride_y", stride_y)
        self.stride_x = pos_int("con", "stride_x", stride_x)
        self.groups = pos_int("con", "groups", groups)
        self.dilation_y = pos_int("con", "dilation_y", dilation_y)
        self.dilation_x = pos_int("con", "dilation_x", dilation_x)
        if self.num_filters % self.groups:
            raise ValueError(f"con: num_filters ({self.num_filters}) must be a multiple of "
                             f"groups ({self.groups})")
        # dlib's rule: pad by half the kernel at stride 1, else 0 (half the dilated span)
        self.padding_y = (self.dilation_y * (self.nr // 2) if self.stride_y == 1 else 0) \
            if padding_y is None else pos_int("con", "padding_y", padding_y, 0)
        self.padding_x = (self.dilation_x * (self.nc // 2) if self.stride_x == 1 else 0) \
            if padding_x is None else pos_int("con", "padding_x", padding_x, 0)
        if self.padding_y >= self.span_y or self.padding_x >= self.span_x:
            what = "filter" if self.dilation_y == self.dilation_x == 1 else "dilated filter span"
            raise ValueError(f"con: padding ({self.padding_y}, {self.padding_x}) must be smaller "
                             f"than the {what} ({self.span_y}, {self.span_x}), as dlib requires")
        self._init_epilogue(bias, act)

    @property
    def span_y(self):
        """The rows one window covers: dilation_y*(nr-1) + 1."""
        return self.dilation_y * (self.nr - 1) + 1

    @property
    def span_x(self):
        return self.dilation_x * (self.nc - 1) + 1

    @property
    def grouped(self):
        """Whether this convolution runs as conv2d_grouped (groups > 1 or dilated)."""
        return self.groups > 1 or self.dilation_y > 1 or self.dilation_x > 1

    def describe(self):
        d = (f"num_filters={self.num_filters}, nr={self.nr}, nc={self.nc}, stride_y={self.stride_y}, "
             f"stride_x={self.stride_x}, padding_y={self.padding_y}, padding_x={self.padding_x}")
        if self.groups > 1:
            d += f", groups={self.groups}"
        if self.dilation_y > 1 or self.dilation_x > 1:
            d += f", dilation_y={self.dilation_y}, dilation_x={self.dilation_x}"
        return self._describe_epilogue(d)

    def param_shape(self, name):
        return (self.num_filters, None, self.nr, self.nc) if name == "filters" else (self.num_filters,)

    def setup(self, in_shape):
        k = in_shape[1]
        if k % self.groups:
            raise ShapeError(f"groups={self.groups} must divide the input channels, got shape "
                             f"{in_shape} ({k} channels)")
        kg = k // self.groups
        if self.filters is None:
            self.set_array("filters", randn((self.num_filters, kg, self.nr, self.nc), kg * self.nr * self.nc))
            self.set_array("biases", np.zeros(self.num_filters, np.float32) if self.bias else None)
        elif self.filters.shape[1] != kg:
            raise ShapeError(f"expected input with {self.filters.shape[1] * self.groups} channels (K), "
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
    def _read_con_2(cls, r, tag):
        """con_2: as con_3 without groups, dilation_y, dilation_x (1, 1, 1)."""
        disabled = r.bool("disabled")
        kw = {f.name: r.field(f) for f in cls.settings[:9]}
        layer = cls(**kw)
        layer.set_array("filters", r.array("filters", 4))
        layer.set_array("biases", r.array("biases", 1))
        if disabled:
            layer.disable()
        return layer

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
                out_size("convolution", r, self.nr, self.stride_y, self.padding_y, self.dilation_y),
                out_size("convolution", c, self.nc, self.stride_x, self.padding_x, self.dilation_x))

    def _geometry(self):
        g = (self.stride_y, self.stride_x, self.padding_y, self.padding_x)
        return g + (self.dilation_y, self.dilation_x, self.groups) if self.grouped else g

    def build(self, plan, x):
        y = plan.empty(self.out_shape(x.shape))
        m = 0
        if not self.grouped and plan.has("conv2d_winograd"):
            m = ops.winograd_tile(x, self.filters, *self._geometry())
        if m:
            # 3x3 stride 1 where Winograd is faster: the filters' transform is computed
            # once per change of the filters (Plan.cached keeps them read-only meanwhile)
            u = plan.cached(self, "filters", ("winograd", m), ops.winograd_filters_shape(self.filters.shape, m),
                            lambda w, out: ops.winograd_filters(w, out, m))
            plan.step(ops.conv2d_winograd, x, u, plan.param(self.biases), None, y,
                      self.padding_y, self.padding_x, m, self._act)
            return y
        op = ops.conv2d_grouped if self.grouped else ops.conv2d
        plan.step(op, x, plan.param(self.filters), plan.param(self.biases), y,
                  *self._geometry(), self._act)
        return y

    # -- training (ctx: train.tape.Ctx) ---------------------------------------
    def forward_train(self, ctx, x):
        """The convolution into a new array (N, F, Ro, Co), then the epilogue's activation."""
        z = np.empty(self.out_shape(x.shape), np.float32)
        op = ops.conv2d_grouped if self.grouped else ops.conv2d
        op(x, self.filters, self.biases, z, *self._geometry(), IDENTITY)
        return self._train_out(ctx, z)

    def backward(self, ctx, dy):
        """dy (N, F, Ro, Co) -> ctx.grads filters/biases, and dx (N, K, R, C) if ctx.need_dx."""
        dy = self._train_dz(ctx, dy)
        geo = self._geometry()
        if self.grouped:
            grad_params, grad_data = ops.conv2d_grouped_grad_params, ops.conv2d_grouped_grad_data
        else:
            grad_params, grad_data = ops.conv2d_grad_params, ops.conv2d_grad_data
        grad_params(ctx.x, dy, ctx.grad("filters"), ctx.grad("biases"), *geo)
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        grad_data(dy, self.filters, dx, *geo)
        return dx


class cont_(_Linear):
    """WHAT THIS OBJECT REPRESENTS: a transposed convolution layer (dlib's cont_,
    "deconvolution"): a convolution with fractional strides, the adjoint of con_.

    input (N, K, R, C) -> output (N, num_filters, Ro, Co), with
    Ro = stride_y*(R-1) + nr - 2*padding_y (same for columns): input pixel (i, j) of
    channel k adds x[n,k,i,j] * filters[k, f] to the nr x nc window of output channel f
    whose corner is (i*stride_y - padding_y, j*stride_x - padding_x); what falls outside
    is dropped. ``filters`` is (K, num_filters, nr, nc), as dlib and PyTorch;
    ``biases`` is (num_filters,) or None. Default padding (dlib's): nr//2 at stride 1,
    else 0; a padding must be smaller than the filter. ``act`` as in con_; fuse()
    folds a bn/affine above over axis 1 of the filters.
    """

    kind = "cont"
    settings = (u32("num_filters"), u32("nr"), u32("nc"), u32("stride_y"), u32("stride_x"),
                u32("padding_y"), u32("padding_x"), boolean("bias"), act_field())
    params = (Param("filters", 4), Param("biases", 1))
    record = "cont_1"
    forward_ops = ("conv2d_transpose",)
    weight_name = "filters"

    def __init__(self, num_filters, nr, nc, stride_y=1, stride_x=1, padding_y=None, padding_x=None,
                 bias=True, act=IDENTITY):
        super().__init__()
        self.num_filters = pos_int("cont", "num_filters", num_filters)
        self.nr = pos_int("cont", "nr", nr)
        self.nc = pos_int("cont", "nc", nc)
        self.stride_y = pos_int("cont", "stride_y", stride_y)
        self.stride_x = pos_int("cont", "stride_x", stride_x)
        self.padding_y = (self.nr // 2 if self.stride_y == 1 else 0) if padding_y is None \
            else pos_int("cont", "padding_y", padding_y, 0)
        self.padding_x = (self.nc // 2 if self.stride_x == 1 else 0) if padding_x is None \
            else pos_int("cont", "padding_x", padding_x, 0)
        if self.padding_y >= self.nr or self.padding_x >= self.nc:
            raise ValueError(f"cont: padding ({self.padding_y}, {self.padding_x}) must be smaller "
                             f"than the filter ({self.nr}, {self.nc}), as dlib requires")
        self._init_epilogue(bias, act)

    def describe(self):
        return self._describe_epilogue(
            f"num_filters={self.num_filters}, nr={self.nr}, nc={self.nc}, stride_y={self.stride_y}, "
            f"stride_x={self.stride_x}, padding_y={self.padding_y}, padding_x={self.padding_x}")

    def param_shape(self, name):
        return (None, self.num_filters, self.nr, self.nc) if name == "filters" else (self.num_filters,)

    def setup(self, in_shape):
        k = in_shape[1]
        if self.filters is None:
            # He initialisation over the inputs that reach one output pixel
            fan_in = max(1, k * self.nr * self.nc // (self.stride_y * self.stride_x))
            self.set_array("filters", randn((k, self.num_filters, self.nr, self.nc), fan_in))
            self.set_array("biases", np.zeros(self.num_filters, np.float32) if self.bias else None)
        elif self.filters.shape[0] != k:
            raise ShapeError(f"expected input with {self.filters.shape[0]} channels (K), "
                             f"got shape {in_shape}")

    def check_record(self):
        if self.filters is not None and self.filters.shape[1:] != (self.num_filters, self.nr, self.nc):
            raise ValueError(f"parameter filters has shape {self.filters.shape}: expected "
                             f"{(self.filters.shape[0], self.num_filters, self.nr, self.nc)}")
        if self.filters is None and self.biases is not None:
            raise ValueError("biases present without filters")
        if self.biases is not None and self.biases.shape != (self.num_filters,):
            raise ValueError(f"parameter biases has shape {self.biases.shape}: expected "
                             f"{(self.num_filters,)}")

    def fold(self, g, h):
        """As _Linear.fold, over axis 1 of the filters (the output channels of a transposed
        convolution): W'[:, o] = g[o] W[:, o], b'[o] = g[o] b[o] + h[o]."""
        w = self.filters
        if g.shape[0] != w.shape[1]:
            return False
        w[...] = (w.astype(np.float64) * g.reshape(1, -1, 1, 1)).astype(np.float32)
        b = np.zeros(w.shape[1]) if self.biases is None else self.biases.astype(np.float64)
        new_b = (g * b + h).astype(np.float32)
        if self.biases is None:
            self.set_array("biases", new_b)
            self.bias = True
        else:
            self.biases[...] = new_b
        return True

    def out_shape(self, x_shape):
        """(N, num_filters, Ro, Co) for an input (N, K, R, C); ShapeError when the padding
        leaves no output (a 1-pixel input with padding > n/2, say)."""
        n, _, r, c = x_shape
        ro = self.stride_y * (r - 1) + self.nr - 2 * self.padding_y
        co = self.stride_x * (c - 1) + self.nc - 2 * self.padding_x
        if ro < 1 or co < 1:
            raise ShapeError(f"the transposed convolution of a {r}x{c} input leaves no output: "
                             f"stride*(in-1) + n - 2*padding = {ro}x{co}")
        return (n, self.num_filters, ro, co)

    def _geometry(self):
        return (self.stride_y, self.stride_x, self.padding_y, self.padding_x)

    def build(self, plan, x):
        y = plan.empty(self.out_shape(x.shape))
        plan.step(ops.conv2d_transpose, x, plan.param(self.filters), plan.param(self.biases), y,
                  *self._geometry(), self._act)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        """The transposed convolution into a new array, then the epilogue's activation."""
        z = np.empty(self.out_shape(x.shape), np.float32)
        ops.conv2d_transpose(x, self.filters, self.biases, z, *self._geometry(), IDENTITY)
        return self._train_out(ctx, z)

    def backward(self, ctx, dy):
        """dy (N, F, Ro, Co) -> ctx.grads filters/biases, and dx (N, K, R, C) if ctx.need_dx.

        As dlib's cont_::backward: the transposed convolution's adjoint is the convolution,
        so dx = conv2d(dy, filters) (filters read as (F_out = K, K_in = num_filters)
        convolution filters), d filters = conv2d_grad_params with the roles of x and dy
        swapped, d biases = the sum of dy per channel."""
        dy = self._train_dz(ctx, dy)
        geo = self._geometry()
        ops.conv2d_grad_params(dy, ctx.x, ctx.grad("filters"), None, *geo)
        db = ctx.grad("biases")
        if db is not None:
            # affine_grad's dbeta is the per-channel sum of dy (x, read only for dgamma,
            # is passed as dy so that the op dispatches on dy's backend)
            ops.affine_grad(dy, np.ones(self.num_filters, np.float32), dy, None, None, db)
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        ops.conv2d(dy, self.filters, None, dx, *geo, IDENTITY)
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
def con(num_filters, nr, nc, stride_y, stride_x, subnet, *, padding_y=None, padding_x=None, bias=True,
        groups=1, dilation_y=1, dilation_x=1):
    """dlib's con<num_filters, nr, nc, stride_y, stride_x, subnet> (see con_); groups and
    dilation_y/x go beyond dlib (groups == input channels: a depthwise convolution)."""
    return Node(con_(num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x, bias,
                     groups=groups, dilation_y=dilation_y, dilation_x=dilation_x), subnet)


def cont(num_filters, nr, nc, stride_y, stride_x, subnet, *, padding_y=None, padding_x=None, bias=True):
    """dlib's cont<num_filters, nr, nc, stride_y, stride_x, subnet>: a transposed
    convolution (see cont_)."""
    return Node(cont_(num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x, bias), subnet)


def fc(num_outputs, subnet, *, bias=True):
    """dlib's fc<num_outputs, subnet> (fc_no_bias: bias=False; see fc_)."""
    return Node(fc_(num_outputs, bias), subnet)


__all__ = ["con_", "cont_", "fc_", "con", "cont", "fc"]

"""Pooling: max_pool_ and avg_pool_ (nr = nc = 0: the whole input, dlib's *_pool_everything)."""
import numpy as np

from .. import ops
from ..core import Layer, Node, u32
from .common import out_size, pos_int


class _pool(Layer):
    settings = (u32("nr"), u32("nc"), u32("stride_y"), u32("stride_x"), u32("padding_y"),
                u32("padding_x"))
    trainable = True

    def __init__(self, nr, nc, stride_y=1, stride_x=1, padding_y=0, padding_x=0):
        super().__init__()
        k = self.kind
        # nr = nc = 0 means "the whole input" (dlib's avg_pool_everything).
        self.nr = pos_int(k, "nr", nr, 0)
        self.nc = pos_int(k, "nc", nc, 0)
        if (self.nr == 0) != (self.nc == 0):
            raise ValueError(f"{k}: nr and nc must both be 0 (whole input) or both positive")
        self.stride_y = pos_int(k, "stride_y", stride_y)
        self.stride_x = pos_int(k, "stride_x", stride_x)
        self.padding_y = pos_int(k, "padding_y", padding_y, 0)
        self.padding_x = pos_int(k, "padding_x", padding_x, 0)
        if self.nr and (self.padding_y >= self.nr or self.padding_x >= self.nc):
            raise ValueError(f"{k}: padding ({self.padding_y}, {self.padding_x}) must be smaller "
                             f"than the window ({self.nr}, {self.nc})")

    def describe(self):
        return (f"nr={self.nr}, nc={self.nc}, stride_y={self.stride_y}, stride_x={self.stride_x}, "
                f"padding_y={self.padding_y}, padding_x={self.padding_x}")

    def _window(self, shape):
        """(nr, nc, stride_y, stride_x, pad_y, pad_x) for an input of this shape."""
        r, c = shape[2], shape[3]
        nr, nc = (self.nr, self.nc) if self.nr else (r, c)
        py, px = (self.padding_y, self.padding_x) if self.nr else (0, 0)
        return nr, nc, self.stride_y, self.stride_x, py, px

    def out_shape(self, shape):
        nr, nc, sy, sx, py, px = self._window(shape)
        return (shape[0], shape[1], out_size("pooling", shape[2], nr, sy, py),
                out_size("pooling", shape[3], nc, sx, px))

    def build(self, plan, x):
        y = plan.empty(self.out_shape(x.shape))
        plan.step(self._op, x, y, *self._window(x.shape))
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        y = np.empty(self.out_shape(x.shape), np.float32)
        self._op(x, y, *self._window(x.shape))
        return y


class max_pool_(_pool):
    """WHAT THIS OBJECT REPRESENTS: max pooling over nr x nc windows; padding is
    ignored (never taken as 0). (N, K, R, C) -> (N, K, Ro, Co)."""

    kind = "max_pool"
    record = "max_pool_1"
    forward_ops = ("max_pool",)
    _op = staticmethod(ops.max_pool)

    def backward(self, ctx, dy):
        """dx: dy goes to each window's (first) largest input."""
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        ops.max_pool_grad(ctx.x, dy, dx, *self._window(ctx.x.shape))
        return dx


class avg_pool_(_pool):
    """WHAT THIS OBJECT REPRESENTS: average pooling over nr x nc windows, averaging
    the in-bounds pixels only. nr = nc = 0 averages everything: (N, K, 1, 1)."""

    kind = "avg_pool"
    record = "avg_pool_1"
    forward_ops = ("avg_pool",)
    _op = staticmethod(ops.avg_pool)

    def backward(self, ctx, dy):
        """dx: dy shared equally among each window's in-bounds inputs."""
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        ops.avg_pool_grad(dy, dx, *self._window(ctx.x.shape))
        return dx


def max_pool(nr, nc, stride_y, stride_x, subnet, *, padding_y=0, padding_x=0):
    """dlib's max_pool<nr, nc, stride_y, stride_x, subnet> (see max_pool_)."""
    return Node(max_pool_(nr, nc, stride_y, stride_x, padding_y, padding_x), subnet)


def avg_pool(nr, nc, stride_y, stride_x, subnet, *, padding_y=0, padding_x=0):
    """dlib's avg_pool<nr, nc, stride_y, stride_x, subnet> (see avg_pool_)."""
    return Node(avg_pool_(nr, nc, stride_y, stride_x, padding_y, padding_x), subnet)


def avg_pool_everything(subnet):
    """dlib's avg_pool_everything: the mean over each channel, (N, K, 1, 1)."""
    return Node(avg_pool_(0, 0, 1, 1, 0, 0), subnet)


__all__ = ["max_pool_", "avg_pool_", "max_pool", "avg_pool", "avg_pool_everything"]

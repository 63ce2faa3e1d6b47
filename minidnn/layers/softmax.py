"""softmax_: softmax over the channels at each pixel."""
import numpy as np

from .. import ops
from ..core import Layer, Node


class softmax_(Layer):
    """WHAT THIS OBJECT REPRESENTS: at each (n, r, c), softmax over the channels k.
    (N, K, R, C) -> (N, K, R, C)."""

    kind = "softmax"
    record = "softmax_1"
    forward_ops = ("softmax",)
    trainable = True
    output_mode = None

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


def softmax(subnet):
    """dlib's softmax (see softmax_)."""
    return Node(softmax_(), subnet)


__all__ = ["softmax_", "softmax"]

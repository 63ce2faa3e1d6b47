"""Loss layers: the top of a network that is trained.

A loss node's ``forward(x)`` returns its subnet's output; calling the node,
``net(x)``, returns what the loss makes of it (labels, for a classifier).
"""
import numpy as np

from .core import Layer, Node, ShapeError


class loss_multiclass_log_(Layer):
    """WHAT THIS OBJECT REPRESENTS: softmax cross-entropy over the K outputs of a
    subnet whose output is (N, K, 1, 1). ``net(x)`` returns the int64 labels
    (N,) = argmax over k."""

    kind = "loss_multiclass_log"

    def setup(self, in_shape):
        if in_shape[2] != 1 or in_shape[3] != 1:
            raise ShapeError(f"expected the subnet's output to be (N, K, 1, 1), got {in_shape}")

    def to_label(self, out):
        return np.argmax(out.reshape(out.shape[0], -1), axis=1).astype(np.int64)


def loss_multiclass_log(subnet):
    return Node(loss_multiclass_log_(), subnet)

"""Loss layers: the top of a network that is trained.

A loss node's ``forward(x)`` returns its subnet's output; calling the node,
``net(x)``, returns what the loss makes of it (labels, for a classifier).
"""
import numpy as np

from . import ops
from .core import Layer, Node, ShapeError


class Loss(Layer):
    """WHAT THIS OBJECT REPRESENTS: the top layer of a network that is trained (dlib's
    loss_*_). Its input is the subnet's output; the hooks beyond core.Layer's:

    ``to_label(out) -> labels``: what ``net(x)`` returns for the subnet's output.
    ``check_labels(y, n, out_shape) -> labels``: the training labels of n samples in
        the form loss_and_grad takes; ValueError naming the loss for bad ones.
    ``loss_and_grad(out, labels, dout) -> float``: the mean loss of the batch; writes
        d loss / d out into dout (same shape as out).
    """

    is_loss = True
    output_mode = None
    check_finite = True       # net(x) raises ValueError for a sample whose scores are NaN/inf

    def to_label(self, out):
        return out

    def labels(self, out):
        """What ``net(x)`` returns: to_label(out), after refusing (ValueError naming the
        sample) a sample whose scores are not finite, which would otherwise give a
        valid-looking label; ``check_finite = False`` skips the check."""
        if self.check_finite:
            flat = out.reshape(out.shape[0], -1)
            bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
            if bad.size:
                raise ValueError(
                    f"{self.kind}: the network's output for sample {bad[0]} is not finite (NaN or "
                    f"inf; {bad.size} such samples in all; does the input hold NaN or inf?), so it "
                    f"has no {self.label_name}; set net.layer_details().check_finite = False to "
                    f"skip this check")
        return self.to_label(out)

    label_name = "label"

    def check_labels(self, y, n, out_shape):
        raise NotImplementedError(f"{self.kind}: check_labels")

    def loss_and_grad(self, out, labels, dout):
        raise NotImplementedError(f"{self.kind}: loss_and_grad")


class loss_multiclass_log_(Loss):
    """WHAT THIS OBJECT REPRESENTS: softmax cross-entropy over the K outputs of a
    subnet whose output is (N, K, 1, 1). ``net(x)`` returns the int64 labels
    (N,) = argmax over k."""

    kind = "loss_multiclass_log"
    record = "loss_multiclass_log_1"

    def setup(self, in_shape):
        if in_shape[2] != 1 or in_shape[3] != 1:
            raise ShapeError(f"expected the subnet's output to be (N, K, 1, 1), got {in_shape}")

    def to_label(self, out):
        return np.argmax(out.reshape(out.shape[0], -1), axis=1).astype(np.int64)


    # -- training (minidnn/train.py) --------------------------------------
    def check_labels(self, y, n, out_shape):
        """The labels of n samples as a C-contiguous int64 array (n,), for a subnet whose
        output is out_shape (N, K, 1, 1); ValueError unless each is an integer in [0, K)."""
        y = np.asarray(y)
        k = int(out_shape[1] * out_shape[2] * out_shape[3])
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"{self.kind}: expected {n} labels (one per sample), "
                             f"got an array of shape {y.shape}")
        if y.dtype.kind not in "iu":
            if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                raise ValueError(f"{self.kind}: labels must be integers in [0, {k}), got dtype {y.dtype}")
        bad = np.flatnonzero((y < 0) | (y >= k))
        if bad.size:
            raise ValueError(f"{self.kind}: label {y[bad[0]]} of sample {bad[0]} is outside [0, {k}) "
                             f"(the net has {k} outputs; {bad.size} bad labels in all)")
        return np.ascontiguousarray(y, np.int64)

    def loss_and_grad(self, out, labels, dout):
        """Mean softmax cross-entropy of out (N, K, 1, 1) against labels; writes its
        gradient into dout (same shape) and returns the loss."""
        return ops.loss_multiclass_log(out, labels, dout)


def loss_multiclass_log(subnet):
    return Node(loss_multiclass_log_(), subnet)



class loss_mean_squared_(Loss):
    """WHAT THIS OBJECT REPRESENTS: regression, dlib's loss_mean_squared (multi-output).

    The subnet's output (N, K, R, C) is compared with targets of K*R*C values per
    sample; the loss is sum((output - target)^2) / N (summed over a sample's
    outputs, averaged over the samples). ``net(x)`` returns the outputs: float32
    (N,) when there is one output per sample, else (N, K*R*C).
    """

    kind = "loss_mean_squared"
    record = "loss_mean_squared_1"

    def to_label(self, out):
        n = out.shape[0]
        v = out.reshape(n, -1)
        return v[:, 0].copy() if v.shape[1] == 1 else v.copy()

    def check_labels(self, y, n, out_shape):
        """The targets of n samples as a float32 array (n, D), D = K*R*C of out_shape;
        ValueError for the wrong length or size, or a non-finite target."""
        d = int(out_shape[1] * out_shape[2] * out_shape[3])
        y = np.asarray(y)
        if y.dtype.kind not in "iuf":
            raise ValueError(f"{self.kind}: targets must be numbers, got dtype {y.dtype}")
        if y.ndim == 0 or y.shape[0] != n:
            raise ValueError(f"{self.kind}: expected {n} targets (one per sample), "
                             f"got an array of shape {y.shape}")
        if y.size != n * d:
            raise ValueError(f"{self.kind}: expected {d} target values per sample (the net's "
                             f"output is {tuple(out_shape[1:])}), got shape {y.shape}")
        y = np.ascontiguousarray(y.reshape(n, d), np.float32)
        if not np.all(np.isfinite(y)):
            raise ValueError(f"{self.kind}: the targets contain NaN or infinity")
        return y

    def loss_and_grad(self, out, targets, dout):
        """sum((out - targets)^2) / N; writes the gradient 2 (out - targets) / N into dout."""
        return ops.loss_mean_squared(out, targets, dout)


def loss_mean_squared(subnet):
    return Node(loss_mean_squared_(), subnet)


__all__ = ["Loss", "loss_multiclass_log_", "loss_multiclass_log", "loss_mean_squared_",
           "loss_mean_squared"]

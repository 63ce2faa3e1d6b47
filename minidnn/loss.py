"""Loss layers: the top of a network that is trained.

A loss node's ``forward(x)`` returns its subnet's output; calling the node,
``net(x)``, returns what the loss makes of it (labels, for a classifier).
"""
import math

import numpy as np

from . import ops
from .core import Layer, Node, ShapeError, f64


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



# =========================================================================== the catalogue
# dlib's other losses (dlib/dnn/loss.h; the per-pixel arithmetic is in dlib/cuda/cpu_dlib.h).
# Their arithmetic is NumPy in float64 on the host, written here in each class: a loss
# sees only the subnet's output (a few thousand numbers at most), so clarity wins over a
# kernel. Each ``loss_and_grad`` returns the mean loss exactly as dlib's
# compute_loss_value_and_gradient defines it and writes the exact derivative of that
# loss into ``dout``; where dlib's code writes something else, the class docstring says so.

_SAFE_LOG_EPS = 1e-10                     # dlib's safe_log: log(max(p, 1e-10))
_SAFE_LOG_CAP = -math.log(_SAFE_LOG_EPS)  # so one term of -safe_log(p) is at most ~23.03


def _softplus(x):
    """log(1 + exp(x)) (dlib's log1pexp), without overflow."""
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _log_softmax_ch(z):
    """log softmax over axis 1 of float64 z."""
    m = z.max(axis=1, keepdims=True)
    return z - (np.log(np.exp(z - m).sum(axis=1, keepdims=True)) + m)


def _at(idx):
    """Where a bad value is, in words, from its index (sample first)."""
    idx = tuple(int(i) for i in idx)
    if len(idx) == 1:
        return f"sample {idx[0]}"
    if len(idx) == 2:
        return f"sample {idx[0]}, output {idx[1]}"
    if len(idx) == 3:
        return f"sample {idx[0]}, pixel (row {idx[1]}, column {idx[2]})"
    return f"sample {idx[0]}, channel {idx[1]}, pixel (row {idx[2]}, column {idx[3]})"


def _refuse(kind, y, bad, what):
    """ValueError naming the first element of y where ``bad`` holds."""
    if bad.any():
        first = np.argwhere(bad)[0]
        v = y[tuple(first)]
        raise ValueError(f"{kind}: {what} at {_at(first)} (value {getattr(v, 'item', lambda: v)()!r}; "
                         f"{int(bad.sum())} such values in all)")


def _samples(kind, y, n, what):
    """y as an array whose first dimension is the n samples."""
    if isinstance(y, (tuple, list)) and len(y) == 2 and n != 2 and \
            all(hasattr(a, "shape") for a in y):
        raise ValueError(f"{kind}: expected one array of {what}, got a pair of arrays")
    y = np.asarray(y)
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"{kind}: expected {what} for {n} samples (first dimension {n}), "
                         f"got an array of shape {y.shape}")
    return y


def _float_values(kind, y, what):
    if y.dtype.kind not in "iuf":
        raise ValueError(f"{kind}: {what} must be numbers, got dtype {y.dtype}")
    y = np.ascontiguousarray(y, np.float32)
    _refuse(kind, y, ~np.isfinite(y), f"{what} must be finite: NaN or infinity")
    return y


def _int_values(kind, y, what):
    """Integer labels as int64; floats holding integers are accepted."""
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            return y.astype(np.int64)
        raise ValueError(f"{kind}: {what} must be integers, got dtype {y.dtype}"
                         + (" with non-integer or non-finite values" if y.dtype.kind == "f" else ""))
    if y.dtype.kind == "u" and y.dtype.itemsize == 8 and y.size and y.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{kind}: {what} too large for int64")
    return y.astype(np.int64)


def _shaped(kind, y, n, shapes, what, out_shape):
    """y reshaped to the first of ``shapes`` (tuples after N) whose size it matches in a
    layout listed there; ValueError saying what was expected otherwise."""
    tail = tuple(y.shape[1:])
    for want, accept in shapes:
        if tail in accept:
            return y.reshape((n,) + want)
    wanted = " or ".join(str((n,) + a[0]) for _, a in shapes)
    raise ValueError(f"{kind}: expected {what} of shape {wanted} for the net's output "
                     f"{tuple(out_shape)}, got {y.shape}")


def _check_out(kind, out_shape, k=None, rc1=False):
    if rc1 and (out_shape[2] != 1 or out_shape[3] != 1):
        raise ShapeError(f"expected the subnet's output to be (N, K, 1, 1), got {tuple(out_shape)}")
    if k is not None and out_shape[1] != k:
        shown = "(N, 1, 1, 1)" if rc1 else "(N, 1, R, C)"
        raise ShapeError(f"expected the subnet's output to be {shown} (one output per "
                         f"{'sample' if rc1 else 'pixel'}), got {tuple(out_shape)}")


class _CatalogueLoss(Loss):
    """What the catalogue's losses share: the output shape checked at setup and again by
    check_labels (the subnet's output must fit the loss)."""

    def _out(self, out_shape):
        pass

    def setup(self, in_shape):
        self._out(in_shape)

    def _labels_for(self, out_shape):
        try:
            self._out(tuple(out_shape))
        except ShapeError as e:
            raise ValueError(f"{self.kind}: {e}") from None


# --------------------------------------------------------------------------- binary
class loss_binary_log_(_CatalogueLoss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_binary_log_ (dlib/dnn/loss.h): a sigmoid
    followed by cross-entropy, for a subnet with one output per sample, (N, 1, 1, 1).

    Labels: one nonzero number per sample, (N,): > 0 is the positive class, < 0 the
    negative one, and, as in dlib, |label| is the sample's weight (nominally +1 / -1).
    The loss is ``sum_i |y_i| softplus(-sign(y_i) x_i) / N``; the gradient written is its
    exact derivative ``|y_i| (sigmoid(x_i) - [y_i > 0]) / N`` (dlib's too).
    ``net(x)`` returns the raw scores, float32 (N,), as dlib's to_label: > 0 predicts +1.
    Arithmetic: NumPy, float64, in this class.
    """

    kind = "loss_binary_log"
    record = "loss_binary_log_1"
    label_name = "score"

    def _out(self, out_shape):
        _check_out(self.kind, out_shape, k=1, rc1=True)

    def to_label(self, out):
        return np.array(out.reshape(out.shape[0]), np.float32)

    def check_labels(self, y, n, out_shape):
        """Float32 (n,) labels; ValueError naming the sample for a label that is 0 or not finite."""
        self._labels_for(out_shape)
        y = _samples(self.kind, y, n, "labels")
        y = _shaped(self.kind, y, n, [((), [(), (1,), (1, 1, 1)])], "labels", out_shape)
        y = _float_values(self.kind, y, "labels")
        _refuse(self.kind, y, y == 0, "labels must be nonzero (> 0: the +1 class, < 0: the -1 "
                                      "class, |label| its weight), got 0")
        return y

    def loss_and_grad(self, out, labels, dout):
        n = out.shape[0]
        x = out.reshape(n).astype(np.float64)
        y = np.asarray(labels, np.float64)
        w, pos = np.abs(y), y > 0
        loss = float((w * np.where(pos, _softplus(-x), _softplus(x))).sum() / n)
        dout[...] = (w * (_sigmoid(x) - pos) / n).reshape(dout.shape)
        return loss


def loss_binary_log(subnet):
    return Node(loss_binary_log_(), subnet)


class loss_binary_hinge_(_CatalogueLoss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_binary_hinge_ (dlib/dnn/loss.h): the hinge
    loss for a subnet with one output per sample, (N, 1, 1, 1).

    Labels: +1 or -1 per sample, (N,) (dlib asserts exactly these). The loss is
    ``sum_i max(0, 1 - y_i x_i) / N``; the gradient ``-y_i / N`` where ``1 - y_i x_i > 0``,
    else 0 (dlib's, the derivative away from the kink). ``net(x)`` returns the raw
    scores, float32 (N,). Arithmetic: NumPy, float64, in this class.
    """

    kind = "loss_binary_hinge"
    record = "loss_binary_hinge_1"
    label_name = "score"

    def _out(self, out_shape):
        _check_out(self.kind, out_shape, k=1, rc1=True)

    def to_label(self, out):
        return np.array(out.reshape(out.shape[0]), np.float32)

    def check_labels(self, y, n, out_shape):
        """Float32 (n,) labels, each +1 or -1; ValueError naming the sample otherwise."""
        self._labels_for(out_shape)
        y = _samples(self.kind, y, n, "labels")
        y = _shaped(self.kind, y, n, [((), [(), (1,), (1, 1, 1)])], "labels", out_shape)
        y = _float_values(self.kind, y, "labels")
        _refuse(self.kind, y, (y != 1) & (y != -1), "labels must be +1 or -1")
        return y

    def loss_and_grad(self, out, labels, dout):
        n = out.shape[0]
        x = out.reshape(n).astype(np.float64)
        y = np.asarray(labels, np.float64)
        m = 1.0 - y * x
        active = m > 0
        loss = float(np.where(active, m, 0.0).sum() / n)
        dout[...] = np.where(active, -y / n, 0.0).reshape(dout.shape)
        return loss


def loss_binary_hinge(subnet):
    return Node(loss_binary_hinge_(), subnet)


class loss_multibinary_log_(_CatalogueLoss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_multibinary_log_ (dlib/dnn/loss.h): K
    binary classifiers with the log loss, for a subnet whose output is (N, K, 1, 1),
    with dlib's focusing parameter ``gamma`` (the focal loss; 0, the default, is plain
    cross-entropy).

    Labels: (N, K) nonzero numbers, > 0 for "in category k", < 0 for "not", |label| the
    weight (nominally +1 / -1). With s = sigmoid(x), the loss is dlib's
    ``sum_{i,k} |y| t f / N`` (divided by N, not N*K) with t = softplus(-x), f = (1 - s)^gamma
    for y > 0 and t = softplus(x), f = s^gamma for y < 0. The gradient written is its
    exact derivative: ``|y| f (s - 1 - gamma s t) / N`` (y > 0), ``|y| f (s + gamma (1 - s) t) / N``
    (y < 0). For gamma = 0 this is dlib's gradient; for gamma > 0 dlib's code writes
    ``f (s (gamma t + 1) - 1)`` and ``f s (gamma t + 1)``, which is not the derivative of its
    loss (checked by finite differences in tests/test_losses.py). ``net(x)`` returns the
    raw scores, float32 (N, K), as dlib's to_label. Arithmetic: NumPy, float64, here.
    """

    kind = "loss_multibinary_log"
    record = "loss_multibinary_log_1"
    settings = (f64("gamma"),)
    label_name = "score"

    def __init__(self, gamma=0.0):
        super().__init__()
        self.gamma = float(gamma)
        self.check_record()

    def check_record(self):
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"{self.kind}: gamma must be a finite number >= 0, got {self.gamma!r}")

    def describe(self):
        return f"gamma={self.gamma:g}"

    def _out(self, out_shape):
        _check_out(self.kind, out_shape, rc1=True)

    def to_label(self, out):
        return np.array(out.reshape(out.shape[0], -1), np.float32)

    def check_labels(self, y, n, out_shape):
        """Float32 (n, K) labels; ValueError naming the sample and output for a 0 or
        non-finite one, or for the wrong number per sample."""
        self._labels_for(out_shape)
        k = int(out_shape[1])
        y = _samples(self.kind, y, n, "labels")
        y = _shaped(self.kind, y, n, [((k,), [(k,), (k, 1, 1)] + ([()] if k == 1 else []))],
                    "labels", out_shape)
        y = _float_values(self.kind, y, "labels")
        _refuse(self.kind, y, y == 0, "labels must be nonzero (> 0: in the category, < 0: not, "
                                      "|label| its weight), got 0")
        return y

    def loss_and_grad(self, out, labels, dout):
        n = out.shape[0]
        x = out.reshape(n, -1).astype(np.float64)
        y = np.asarray(labels, np.float64).reshape(x.shape)
        g = self.gamma
        w, pos = np.abs(y), y > 0
        s, sm = _sigmoid(x), _sigmoid(-x)              # s and 1 - s
        t = np.where(pos, _softplus(-x), _softplus(x))
        f = np.where(pos, sm, s) ** g
        loss = float((w * t * f).sum() / n)
        d = np.where(pos, s - 1 - g * s * t, s + g * sm * t)
        dout[...] = (w * f * d / n).reshape(dout.shape)
        return loss


def loss_multibinary_log(subnet, *, gamma=0.0):
    return Node(loss_multibinary_log_(gamma=gamma), subnet)


# --------------------------------------------------------------------------- weighted classes
WEIGHTED_LABEL = np.dtype([("label", "<i8"), ("weight", "<f4")])


def weighted_labels(labels, weights=1.0):
    """dlib's weighted_label (label, weight) for n samples, as minidnn takes it: a NumPy
    structured array of dtype ``WEIGHTED_LABEL`` (fields ``label`` int64 and ``weight``
    float32), shape (n,). ``weights`` broadcasts (a number gives every sample that weight;
    dlib's default is 1). Index it like any array: ``y[idx]``, ``y["weight"]``."""
    labels = np.asarray(labels)
    out = np.empty(labels.shape, WEIGHTED_LABEL)
    out["label"] = labels
    out["weight"] = np.broadcast_to(np.asarray(weights, np.float32), labels.shape)
    return out


class loss_multiclass_log_weighted_(_CatalogueLoss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_multiclass_log_weighted_ (dlib/dnn/loss.h):
    softmax cross-entropy with a weight per sample, for a subnet output (N, K, 1, 1).

    Labels: dlib's weighted_label, here a structured array (n,) with fields ``label``
    (an integer in [0, K)) and ``weight`` (finite, >= 0): make it with
    ``dnn.weighted_labels(labels, weights)``. The loss is dlib's
    ``sum_i w_i (-safe_log(softmax(x_i)[y_i])) / N``, where safe_log(p) = log(max(p, 1e-10))
    caps a term at ~23.03 as dlib does; the gradient written is
    ``w_i (softmax(x_i) - onehot(y_i)) / N`` (dlib's; the exact derivative wherever the
    probability of the label is above 1e-10). All weights 1 is loss_multiclass_log.
    ``net(x)`` returns the int64 labels (N,), the first argmax. NumPy, float64, here.
    """

    kind = "loss_multiclass_log_weighted"
    record = "loss_multiclass_log_weighted_1"

    def _out(self, out_shape):
        _check_out(self.kind, out_shape, rc1=True)

    def to_label(self, out):
        return np.argmax(out.reshape(out.shape[0], -1), axis=1).astype(np.int64)

    def check_labels(self, y, n, out_shape):
        """The labels as a structured array of dtype WEIGHTED_LABEL (n,); ValueError naming
        the sample for a label outside [0, K) or a weight that is negative or not finite."""
        self._labels_for(out_shape)
        k = int(out_shape[1])
        y = _samples(self.kind, y, n, "weighted labels")
        names = y.dtype.names or ()
        if "label" not in names or "weight" not in names:
            raise ValueError(f"{self.kind}: labels must be a structured array with fields 'label' "
                             f"and 'weight' (dlib's weighted_label; make one with "
                             f"dnn.weighted_labels(labels, weights)), got dtype {y.dtype}")
        if y.ndim != 1:
            raise ValueError(f"{self.kind}: expected one weighted label per sample, shape ({n},), "
                             f"got {y.shape}")
        lab = _int_values(self.kind, np.asarray(y["label"]), "labels")
        _refuse(self.kind, lab, (lab < 0) | (lab >= k),
                f"labels must be in [0, {k}) (the net has {k} outputs)")
        wt = y["weight"]
        if wt.dtype.kind not in "iuf":
            raise ValueError(f"{self.kind}: weights must be numbers, got dtype {wt.dtype}")
        wt = wt.astype(np.float32)
        _refuse(self.kind, wt, ~np.isfinite(wt) | (wt < 0), "weights must be finite and >= 0")
        return weighted_labels(lab, wt)

    def loss_and_grad(self, out, labels, dout):
        n = out.shape[0]
        z = out.reshape(n, -1).astype(np.float64)
        lab = labels["label"]
        w = labels["weight"].astype(np.float64)
        logp = _log_softmax_ch(z)
        nll = np.minimum(-logp[np.arange(n), lab], _SAFE_LOG_CAP)
        loss = float((w * nll).sum() / n)
        g = np.exp(logp)
        g[np.arange(n), lab] -= 1.0
        dout[...] = (g * (w / n)[:, None]).reshape(dout.shape)
        return loss


def loss_multiclass_log_weighted(subnet):
    return Node(loss_multiclass_log_weighted_(), subnet)


# --------------------------------------------------------------------------- regression
class loss_mean_squared_multioutput_(_CatalogueLoss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_mean_squared_multioutput_ (dlib/dnn/loss.h):
    regression with K outputs per sample, for a subnet output (N, K, 1, 1).

    Targets: (N, K) numbers (finite). The loss is dlib's ``sum_{i,k} (y - x)^2 / N`` (summed
    over a sample's outputs, averaged over samples: the normalisation of minidnn's
    loss_mean_squared too, which also takes outputs with R, C > 1). The gradient written
    is the exact ``2 (x - y) / N``; dlib's code writes half of it, ``(x - y) / N`` (only the
    step size differs: as if sgd's learning rate were doubled; adam does not see it).
    ``net(x)`` returns float32 (N, K) (also for K = 1, as dlib's K x 1 matrices).
    Arithmetic: NumPy, float64, in this class.
    """

    kind = "loss_mean_squared_multioutput"
    record = "loss_mean_squared_multioutput_1"
    label_name = "output"

    def _out(self, out_shape):
        _check_out(self.kind, out_shape, rc1=True)

    def to_label(self, out):
        return np.array(out.reshape(out.shape[0], -1), np.float32)

    def check_labels(self, y, n, out_shape):
        """Float32 (n, K) targets; ValueError for the wrong shape or a non-finite target."""
        self._labels_for(out_shape)
        k = int(out_shape[1])
        y = _samples(self.kind, y, n, "targets")
        y = _shaped(self.kind, y, n, [((k,), [(k,), (k, 1, 1)] + ([()] if k == 1 else []))],
                    "targets", out_shape)
        return _float_values(self.kind, y, "targets")

    def loss_and_grad(self, out, targets, dout):
        n = out.shape[0]
        r = out.reshape(n, -1).astype(np.float64) - np.asarray(targets, np.float64).reshape(n, -1)
        loss = float((r * r).sum() / n)
        dout[...] = (2.0 * r / n).reshape(dout.shape)
        return loss


def loss_mean_squared_multioutput(subnet):
    return Node(loss_mean_squared_multioutput_(), subnet)


# --------------------------------------------------------------------------- per pixel
class loss_multiclass_log_per_pixel_(_CatalogueLoss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_multiclass_log_per_pixel_ (dlib/dnn/loss.h,
    arithmetic in dlib/cuda/cpu_dlib.h compute_loss_multiclass_log_per_pixel): softmax
    cross-entropy over the K channels at every pixel of a subnet output (N, K, R, C),
    for semantic segmentation (K < 65535).

    Labels: integers (N, R, C) in [0, K), or ``label_to_ignore`` = 65535 (uint16 max, dlib's)
    for a pixel whose truth is unknown: it adds no loss and gets zero gradient. The loss is
    dlib's ``sum over labelled pixels of -safe_log(softmax[label]) / (N R C)``: divided by
    all N*R*C pixels, ignored ones included (not by the labelled count, as PyTorch's
    cross_entropy(ignore_index=...) 'mean' does); safe_log caps a term at ~23.03. The
    gradient written is ``(softmax - onehot) / (N R C)`` at labelled pixels, 0 at ignored
    ones. ``net(x)`` returns the per-pixel argmax, uint16 (N, R, C) (dlib's
    matrix<uint16_t>; the first largest channel). Arithmetic: NumPy, float64, here.
    """

    kind = "loss_multiclass_log_per_pixel"
    record = "loss_multiclass_log_per_pixel_1"
    label_to_ignore = 65535

    def _out(self, out_shape):
        if out_shape[1] >= self.label_to_ignore:
            raise ShapeError(f"expected fewer than {self.label_to_ignore} channels (K), "
                             f"got {tuple(out_shape)}")

    def to_label(self, out):
        return np.argmax(out, axis=1).astype(np.uint16)

    def check_labels(self, y, n, out_shape):
        """uint16 labels (n, R, C); ValueError naming the sample and pixel for a label that is
        neither in [0, K) nor 65535, or for the wrong shape."""
        self._labels_for(out_shape)
        k, r, c = (int(v) for v in out_shape[1:])
        y = _samples(self.kind, y, n, "label images")
        y = _shaped(self.kind, y, n, [((r, c), [(r, c), (1, r, c)])], "labels", out_shape)
        y = _int_values(self.kind, y, "labels")
        _refuse(self.kind, y, ((y < 0) | (y >= k)) & (y != self.label_to_ignore),
                f"labels must be in [0, {k}) (the net has {k} channels) or "
                f"{self.label_to_ignore} (ignored)")
        return np.ascontiguousarray(y, np.uint16)

    def loss_and_grad(self, out, labels, dout):
        n, k, r, c = out.shape
        scale = 1.0 / (n * r * c)
        lab = np.asarray(labels).astype(np.int64)
        keep = lab != self.label_to_ignore
        safe = np.where(keep, lab, 0)[:, None]                  # (N, 1, R, C)
        logp = _log_softmax_ch(out.astype(np.float64))
        nll = np.minimum(-np.take_along_axis(logp, safe, axis=1)[:, 0], _SAFE_LOG_CAP)
        loss = float(nll[keep].sum() * scale)
        g = np.exp(logp)
        np.put_along_axis(g, safe, np.take_along_axis(g, safe, axis=1) - 1.0, axis=1)
        g *= keep[:, None] * scale
        dout[...] = g
        return loss


def loss_multiclass_log_per_pixel(subnet):
    return Node(loss_multiclass_log_per_pixel_(), subnet)


class loss_binary_log_per_pixel_(_CatalogueLoss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_binary_log_per_pixel_ (dlib/dnn/loss.h,
    arithmetic in dlib/cuda/cpu_dlib.h compute_loss_binary_log_per_pixel): loss_binary_log
    at every pixel of a subnet output (N, 1, R, C).

    Labels: numbers (N, R, C): > 0 the +1 class, < 0 the -1 class, |label| the pixel's
    weight (nominally +1 / -1), and 0 to ignore the pixel. The loss is dlib's
    ``sum_pixels |y| softplus(-sign(y) x) / (N R C)`` (divided by all pixels, ignored ones
    included); the gradient its exact derivative ``|y| (sigmoid(x) - [y > 0]) / (N R C)``
    (0 where y = 0). ``net(x)`` returns the raw scores, float32 (N, R, C).
    Arithmetic: NumPy, float64, in this class.
    """

    kind = "loss_binary_log_per_pixel"
    record = "loss_binary_log_per_pixel_1"
    label_name = "score"

    def _out(self, out_shape):
        _check_out(self.kind, out_shape, k=1)

    def to_label(self, out):
        return np.array(out[:, 0], np.float32)

    def check_labels(self, y, n, out_shape):
        """Float32 labels (n, R, C); ValueError for the wrong shape or a non-finite label."""
        self._labels_for(out_shape)
        r, c = int(out_shape[2]), int(out_shape[3])
        y = _samples(self.kind, y, n, "label images")
        y = _shaped(self.kind, y, n, [((r, c), [(r, c), (1, r, c)])], "labels", out_shape)
        return _float_values(self.kind, y, "labels")

    def loss_and_grad(self, out, labels, dout):
        n, _, r, c = out.shape
        scale = 1.0 / (n * r * c)
        x = out[:, 0].astype(np.float64)
        y = np.asarray(labels, np.float64)
        w, pos = np.abs(y), y > 0
        loss = float((w * np.where(pos, _softplus(-x), _softplus(x))).sum() * scale)
        dout[...] = (w * (_sigmoid(x) - pos) * scale)[:, None]
        return loss


def loss_binary_log_per_pixel(subnet):
    return Node(loss_binary_log_per_pixel_(), subnet)


class loss_mean_squared_per_pixel_(_CatalogueLoss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_mean_squared_per_pixel_ (dlib/dnn/loss.h):
    regression of every pixel of a subnet output (N, K, R, C).

    Targets: (N, R, C) or (N, 1, R, C) for K = 1 (dlib's loss_mean_squared_per_pixel,
    whose to_label requires K = 1), (N, K, R, C) for K > 1 (then exactly dlib's
    loss_mean_squared_per_channel_and_pixel<K>). The loss is dlib's mean over every value,
    ``sum (y - x)^2 / (N K R C)``; the gradient written is the exact ``2 (x - y) / (N K R C)``
    (dlib's code writes half of it, as for loss_mean_squared_multioutput). dlib does not
    ignore NaN targets (they would make the loss NaN), so NaN or infinite targets are
    refused (ValueError naming the sample and pixel). ``net(x)`` returns float32
    (N, R, C) for K = 1, else (N, K, R, C). Arithmetic: NumPy, float64, in this class.
    """

    kind = "loss_mean_squared_per_pixel"
    record = "loss_mean_squared_per_pixel_1"
    label_name = "output"

    def to_label(self, out):
        return np.array(out[:, 0] if out.shape[1] == 1 else out, np.float32)

    def check_labels(self, y, n, out_shape):
        """Float32 targets (n, K, R, C); ValueError for the wrong shape or a non-finite one."""
        self._labels_for(out_shape)
        k, r, c = (int(v) for v in out_shape[1:])
        y = _samples(self.kind, y, n, "target images")
        shape = _shaped(self.kind, y, n, [((k, r, c), [(k, r, c)] + ([(r, c)] if k == 1 else []))],
                        "targets", out_shape).shape
        return _float_values(self.kind, y, "targets").reshape(shape)    # errors in y's own layout

    def loss_and_grad(self, out, targets, dout):
        scale = 1.0 / out.size
        d = out.astype(np.float64) - np.asarray(targets, np.float64).reshape(out.shape)
        loss = float((d * d).sum() * scale)
        dout[...] = 2.0 * scale * d
        return loss


def loss_mean_squared_per_pixel(subnet):
    return Node(loss_mean_squared_per_pixel_(), subnet)


# --------------------------------------------------------------------------- metric learning
class loss_metric_(_CatalogueLoss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_metric_ (dlib/dnn/loss.h): metric learning
    of embeddings, the subnet output (N, D, 1, 1), over all pairs of the mini-batch.

    Labels: integer identities >= 0, (N,). With d the Euclidean distance of two embeddings,
    T = distance_threshold and m = margin, a pair of the same identity adds
    ``max(0, d - (T - m))`` and a pair of different identities ``max(0, (T + m) - d)``, but
    only the hardest negatives count: with P same-identity pairs and Q others in the
    batch, a negative pair counts only if d <= the min(P, Q)-th smallest negative distance
    (dlib's hard negative mining). Each pair is counted in both orders and the sum
    multiplied by ``0.5 / (P + 0.0001)``: dlib's normalisation, constant 0.0001 included.
    The gradient written is the exact derivative of that loss, d/dx |x - x'| = (x - x') / d
    for each counted term, with d taken as at least 0.001 for negative pairs (dlib's guard
    against dividing by zero; a positive pair at d = 0 gets 0). dlib's code writes half of
    it: its row of each sample takes the pair in one order only, while the loss counts
    both (only the step size differs, as for the mean squared losses). A mini-batch must hold a pair of
    the same identity and a pair of different ones (dlib asserts it; here ValueError).
    ``net(x)`` returns the embeddings, float32 (N, D). Arithmetic: NumPy, float64, here.
    """

    kind = "loss_metric"
    record = "loss_metric_1"
    settings = (f64("margin"), f64("distance_threshold"))
    label_name = "embedding"

    def __init__(self, margin=0.04, distance_threshold=0.6):
        super().__init__()
        self.margin, self.distance_threshold = float(margin), float(distance_threshold)
        self.check_record()

    def check_record(self):
        for name in ("margin", "distance_threshold"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{self.kind}: {name} must be a finite number > 0, got {v!r}")

    def describe(self):
        return f"margin={self.margin:g}, distance_threshold={self.distance_threshold:g}"

    def _out(self, out_shape):
        _check_out(self.kind, out_shape, rc1=True)

    def to_label(self, out):
        return np.array(out.reshape(out.shape[0], -1), np.float32)

    def check_labels(self, y, n, out_shape):
        """int64 identities (n,); ValueError naming the sample for a negative or non-integer
        one, or when the data holds no two samples of one identity or no two identities."""
        self._labels_for(out_shape)
        y = _samples(self.kind, y, n, "labels")
        y = _shaped(self.kind, y, n, [((), [(), (1,)])], "labels", out_shape)
        y = _int_values(self.kind, y, "labels")
        _refuse(self.kind, y, y < 0, "labels (identities) must be integers >= 0")
        counts = np.unique(y, return_counts=True)[1]
        if counts.size < 2 or counts.max() < 2:
            raise ValueError(f"{self.kind}: the labels need two samples of one identity and two "
                             f"different identities (got {counts.size} identities, at most "
                             f"{int(counts.max())} samples of one)")
        return np.ascontiguousarray(y)

    def loss_and_grad(self, out, labels, dout):
        n = out.shape[0]
        x = out.reshape(n, -1).astype(np.float64)
        y = np.asarray(labels)
        gram = x @ x.T
        sq = np.diag(gram)
        d2 = sq[:, None] + sq[None, :] - 2.0 * gram
        d2 = np.maximum(0.5 * (d2 + d2.T), 0.0)                # symmetric; dlib clamps at 0
        np.fill_diagonal(d2, 0.0)
        d = np.sqrt(d2)
        same = y[:, None] == y[None, :]
        iu = np.triu_indices(n, 1)
        upper_same = same[iu]
        p = int(upper_same.sum())
        q = int(upper_same.size - p)
        if p == 0 or q == 0:
            raise ValueError(f"{self.kind}: a mini-batch of {n} samples has "
                             f"{'no two samples of one identity' if p == 0 else 'one identity only'}"
                             f" (dlib: each mini-batch must contain both positive and negative "
                             f"pairs); use a larger mini_batch_size or more samples per identity")
        scale = 0.5 / (p + 0.0001)
        neg_thresh = np.sqrt(np.sort(d2[iu][~upper_same])[min(p, q) - 1])
        t, m = self.distance_threshold, self.margin
        off = ~np.eye(n, dtype=bool)
        pos = same & off & ~(d < t - m)
        neg = ~same & ~(d > t + m) & ~(d > neg_thresh)
        loss = float(scale * ((d[pos] - (t - m)).sum() + ((t + m) - d[neg]).sum()))
        gm = np.zeros((n, n))          # d loss / d x_r = sum_c gm[r, c] x_c (r = c included)
        with np.errstate(divide="ignore"):
            gm[pos] = np.where(d[pos] > 0, -2.0 * scale / d[pos], 0.0)
        gm[neg] = 2.0 * scale / np.maximum(d[neg], 0.001)
        gm[np.diag_indices(n)] = -gm.sum(axis=1)
        dout[...] = (gm @ x).reshape(dout.shape)
        return loss


def loss_metric(subnet, *, margin=0.04, distance_threshold=0.6):
    return Node(loss_metric_(margin=margin, distance_threshold=distance_threshold), subnet)


__all__ = ["Loss", "loss_multiclass_log_", "loss_multiclass_log", "loss_mean_squared_",
           "loss_mean_squared",
           "loss_binary_log_", "loss_binary_log", "loss_binary_hinge_", "loss_binary_hinge",
           "loss_multibinary_log_", "loss_multibinary_log",
           "WEIGHTED_LABEL", "weighted_labels",
           "loss_multiclass_log_weighted_", "loss_multiclass_log_weighted",
           "loss_mean_squared_multioutput_", "loss_mean_squared_multioutput",
           "loss_multiclass_log_per_pixel_", "loss_multiclass_log_per_pixel",
           "loss_binary_log_per_pixel_", "loss_binary_log_per_pixel",
           "loss_mean_squared_per_pixel_", "loss_mean_squared_per_pixel",
           "loss_metric_", "loss_metric"]

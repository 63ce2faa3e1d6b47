"""Per-unit affine transforms: bn_ (batch normalisation) and affine_ (its inference form)."""
import numpy as np

from .. import ops
from ..core import IDENTITY, Field, Layer, Node, Param, ShapeError, f64
from .common import CONV, FC, affine_views, mode_below, per_unit, real


def mode_field(name="mode"):
    """The conv/fc mode of an affine-like layer: a u8 in records, 0 conv, 1 fc."""
    return Field(name, "mode")


def _check_mode(layer, mode):
    if mode not in (CONV, FC):
        raise ValueError(f"{layer}: mode must be 'conv' or 'fc', got {mode!r}")
    return mode


def _unit(mode):
    return "channels (K)" if mode == CONV else "units per sample (K*R*C)"


class bn_(Layer):
    """WHAT THIS OBJECT REPRESENTS: batch normalisation at inference.

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta, per
    channel (mode "conv", arrays of shape (K,)) or per unit (mode "fc", arrays
    of shape (K*R*C,)). Shape unchanged. A trainer that trains the layer uses
    batch statistics instead and updates the running ones.
    """

    settings = (mode_field(), f64("eps"))
    params = (Param("gamma", 1), Param("beta", 1))
    state = (Param("running_mean", 1), Param("running_var", 1))
    record = "bn_2"
    old_records = {"bn_1": "_read_bn_1"}
    forward_ops = ("affine",)
    affine_like = True
    trainable = True

    def __init__(self, mode=CONV, eps=1e-5):
        super().__init__()
        self.mode = _check_mode("bn", mode)
        self.eps = real("bn", "eps", eps, 0, lo_open=True)
        self.num_updates = 0

    @property
    def kind(self):
        return "bn_con" if self.mode == CONV else "bn_fc"

    @property
    def output_mode(self):
        return self.mode

    def describe(self):
        return f"eps={self.eps:g}"

    def setup(self, in_shape):
        k = per_unit(self.mode, in_shape)
        if self.gamma is None:
            self.set_array("gamma", np.ones(k, np.float32))
            self.set_array("beta", np.zeros(k, np.float32))
            self.set_array("running_mean", np.zeros(k, np.float32))
            self.set_array("running_var", np.ones(k, np.float32))
        elif self.gamma.shape[0] != k:
            raise ShapeError(f"expected input with {self.gamma.shape[0]} {_unit(self.mode)}, "
                             f"got shape {in_shape}")

    def param_shape(self, name):
        return None if self.gamma is None else self.gamma.shape

    def affine_form(self):
        """(g, h) in float64 with y = g * x + h per unit (inference)."""
        g = self.gamma.astype(np.float64) / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        return g, self.beta.astype(np.float64) - self.running_mean.astype(np.float64) * g

    def scale_shift(self):
        """The equivalent affine transform in float32: (gamma / sqrt(var + eps), beta - mean * scale)."""
        scale = (self.gamma / np.sqrt(self.running_var.astype(np.float64) + self.eps)).astype(np.float32)
        return scale, (self.beta - self.running_mean * scale).astype(np.float32)

    def build(self, plan, x):
        # Recomputed from the running statistics before every CPU forward (cheap: O(K)).
        ss = plan.derived(lambda out: np.copyto(out, self.scale_shift()), (2, self.gamma.shape[0]))
        y = plan.empty(x.shape)
        xv, yv = affine_views(self.mode, x, y)
        plan.step(ops.affine, xv, ss[0], ss[1], yv, IDENTITY)
        return y

    # -- the record: bn_2 = bn_1's fields, then the running-average update count
    def check_record(self):
        arrays = [getattr(self, p) for p in ("gamma", "beta", "running_mean", "running_var")]
        present = [a is not None for a in arrays]
        if any(present) and not all(present):
            raise ValueError("parameters gamma, beta, running_mean, running_var must be all "
                             "present or all absent")
        if all(present) and len({a.shape for a in arrays}) != 1:
            raise ValueError(f"gamma, beta, running_mean and running_var have different shapes "
                             f"{[a.shape for a in arrays]}")

    def write_record(self, w):
        w.bool(self.disabled)
        w.mode(self.mode)
        w.f64(self.eps)
        for p in ("gamma", "beta", "running_mean", "running_var"):
            w.array(p, getattr(self, p), 1)
        w.u32("num_updates", int(self.num_updates))

    @classmethod
    def read_record(cls, r, tag):
        disabled = r.bool("disabled")
        mode = r.mode("mode")
        eps = r.f64("eps")
        if not (np.isfinite(eps) and eps > 0):
            raise ValueError(f"eps is {eps!r}: expected a finite number > 0")
        layer = cls(mode, eps)
        for p in ("gamma", "beta", "running_mean", "running_var"):
            layer.set_array(p, r.array(p, 1))
        if tag == "bn_2":
            n = r.u32("num_updates")
            if n > layer.running_stats_window_size:
                raise ValueError(f"num_updates is {n}: expected at most "
                                 f"{layer.running_stats_window_size} (the running-average window)")
            layer.num_updates = n
        if disabled:
            layer.disable()
        return layer

    _read_bn_1 = read_record          # bn_1: no update count

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
        xv, yv = affine_views(self.mode, x, y)
        k = self.gamma.shape[0]
        mean, invstd = np.empty(k, np.float32), np.empty(k, np.float32)
        avg = 0.0
        if ctx.update_stats:
            u = self.num_updates
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
        xv, dxv = affine_views(self.mode, ctx.x, dx)
        dyv = affine_views(self.mode, dy, dy)[0]
        ops.bn_grad(xv, self.gamma, mean, invstd, dyv, dxv, ctx.grad("gamma"), ctx.grad("beta"))
        return dx if ctx.need_dx else None


class affine_(Layer):
    """WHAT THIS OBJECT REPRESENTS: y = gamma * x + beta per channel (mode "conv",
    arrays (K,)) or per unit (mode "fc", arrays (K*R*C,)); dlib's batch-norm
    replacement for inference. ``disable()`` makes it a free identity (fuse()
    does this after folding it into the layer below).
    """

    kind = "affine"
    settings = (mode_field(),)
    params = (Param("gamma", 1), Param("beta", 1))
    record = "affine_2"
    old_records = {"affine_1": "_read_affine_1"}
    forward_ops = ("affine",)
    affine_like = True
    trainable = True

    def __init__(self, mode=CONV, gamma=None, beta=None):
        super().__init__()
        self.mode = _check_mode("affine", mode)
        g = None if gamma is None else np.ascontiguousarray(gamma, np.float32)
        b = None if beta is None else np.ascontiguousarray(beta, np.float32)
        if (g is None) != (b is None) or (g is not None and (g.ndim != 1 or g.shape != b.shape)):
            raise ValueError(f"affine: gamma and beta must be given together, 1-D and of one shape")
        self.set_array("gamma", g)
        self.set_array("beta", b)

    @classmethod
    def from_bn(cls, bn):
        """The affine layer equal to batch-norm layer ``bn`` at inference."""
        scale, shift = bn.scale_shift()
        a = cls(bn.mode, scale, shift)
        if bn.disabled:
            a.disable()
        return a

    @property
    def output_mode(self):
        return self.mode

    def describe(self):
        return f"mode={self.mode}"

    def param_shape(self, name):
        return None if self.gamma is None else self.gamma.shape

    def affine_form(self):
        return self.gamma.astype(np.float64), self.beta.astype(np.float64)

    def disable(self):
        """Make this layer a free identity. As in dlib, its gamma and beta are dropped
        (they were folded elsewhere); enable() gives back an identity affine."""
        self.set_array("gamma", None)
        self.set_array("beta", None)
        super().disable()

    def setup(self, in_shape):
        if self.disabled:              # folded elsewhere: stays parameter-free
            return
        k = per_unit(self.mode, in_shape)
        if self.gamma is None:
            self.set_array("gamma", np.ones(k, np.float32))
            self.set_array("beta", np.zeros(k, np.float32))
        elif self.gamma.shape[0] != k:
            raise ShapeError(f"expected input with {self.gamma.shape[0]} {_unit(self.mode)}, "
                             f"got shape {in_shape}")

    def check_record(self):
        if self.disabled:
            return                      # its parameters are not written
        if (self.gamma is None) != (self.beta is None):
            raise ValueError("parameters gamma, beta must be all present or all absent")
        if self.gamma is not None and self.beta.shape != self.gamma.shape:
            raise ValueError(f"parameter beta has shape {self.beta.shape}: expected {self.gamma.shape}")

    def write_record(self, w):
        w.bool(self.disabled)
        w.mode(self.mode)
        # a disabled affine has no parameters (disable() drops them; any assigned since
        # are stale): written absent
        w.array("gamma", None if self.disabled else self.gamma, 1)
        w.array("beta", None if self.disabled else self.beta, 1)

    @classmethod
    def read_record(cls, r, tag):
        disabled = r.bool("disabled")
        layer = cls(r.mode("mode"))
        layer.set_array("gamma", r.array("gamma", 1))
        layer.set_array("beta", r.array("beta", 1))
        if disabled:
            if layer.gamma is not None:
                raise ValueError("a disabled affine must have no gamma/beta")
            layer.disable()
        return layer

    @classmethod
    def _read_affine_1(cls, r, tag):
        """The older affine record: mode and parameters, no disabled flag (loads enabled)."""
        layer = cls(r.mode("mode"))
        layer.set_array("gamma", r.array("gamma", 1))
        layer.set_array("beta", r.array("beta", 1))
        return layer

    def build(self, plan, x):
        y = plan.empty(x.shape)
        xv, yv = affine_views(self.mode, x, y)
        plan.step(ops.affine, xv, plan.param(self.gamma), plan.param(self.beta), yv, IDENTITY)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        y = np.empty(x.shape, np.float32)
        xv, yv = affine_views(self.mode, x, y)
        ops.affine(xv, self.gamma, self.beta, yv, IDENTITY)
        return y

    def backward(self, ctx, dy):
        """ctx.grads gamma/beta (sums of dy * x and dy per unit), and dx = dy * gamma."""
        dx = np.empty(dy.shape, np.float32) if ctx.need_dx else None
        xv = affine_views(self.mode, ctx.x, ctx.x)[0]
        dyv = affine_views(self.mode, dy, dy)[0]
        dxv = None if dx is None else affine_views(self.mode, dx, dx)[0]
        ops.affine_grad(xv, self.gamma, dyv, dxv, ctx.grad("gamma"), ctx.grad("beta"))
        return dx


def bn_con(subnet, *, eps=1e-5):
    """dlib's bn_con: batch normalisation per channel (see bn_)."""
    return Node(bn_(CONV, eps), subnet)


def bn_fc(subnet, *, eps=1e-5):
    """dlib's bn_fc: batch normalisation per unit (see bn_)."""
    return Node(bn_(FC, eps), subnet)


def affine(subnet):
    """dlib's affine: per-channel (or, above an fc, per-unit) gamma * x + beta (see affine_)."""
    return Node(affine_(mode_below(subnet)), subnet)


__all__ = ["bn_", "affine_", "bn_con", "bn_fc", "affine"]

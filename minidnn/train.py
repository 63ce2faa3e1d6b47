"""Training: the solvers (``sgd``, ``adam``) and ``dnn_trainer``, in dlib's spirit.

    net = dnn.loss_multiclass_log(dnn.fc(10, dnn.relu(dnn.bn_con(dnn.con(8, 3, 3, 1, 1,
                                  dnn.input_tensor())))))
    trainer = dnn.dnn_trainer(net, dnn.sgd(weight_decay=5e-4, momentum=0.9))
    trainer.learning_rate = 0.1
    trainer.mini_batch_size = 64
    trainer.max_num_epochs = 20
    trainer.set_synchronization_file("net.sync", interval_seconds=60)
    trainer.train(x, labels)           # x float32 (N, K, R, C), labels int (N,)

Training runs a forward in *training mode* that is separate from the compiled
inference program (``Node.forward`` is untouched): a tape walks the chain
bottom-up calling each layer's ``forward_train(ctx, x)`` (batch-norm uses the
batch's statistics there and moves its running statistics), then top-down
calling ``backward(ctx, dy)``, which writes the parameter gradients into
``ctx.grads`` and returns the gradient for the layer below. Tags collect the
gradients that their skipN / add_prevN send them. Every numeric step is a
kernel behind ``minidnn.ops`` (Cython on the CPU); the solver then updates the
parameter arrays *in place*, so the compiled inference program sees them.

Weight decay applies to con_ filters and fc_ weights only (dlib's defaults:
biases and batch-norm / affine parameters have a weight decay multiplier of 0).

GPU training is not supported yet: a net on "cuda" raises NotImplementedError.
"""
import collections
import io
import json
import math
import os
import sys
import time

import numpy as np

from . import layers as _layers
from . import ops
from .core import LayerError, ShapeError, input_tensor_
from .serialize import atomic_write

_DECAYED = ("filters", "weights")       # the parameters weight decay applies to
_SYNC_VERSION = 1


# ---------------------------------------------------------------------------- the tape
class _Ctx:
    """What one node keeps between its training forward and backward.

    x, y: its input and output; grads: parameter name -> gradient array (kept
    across steps); saved: whatever the layer stores (batch statistics ...);
    ref: the tag context a skip / add_prev refers to; extra: the gradient sent
    to a tag from above; need_dx: whether the layer below wants a gradient.
    """

    __slots__ = ("index", "tape", "layer", "x", "y", "grads", "saved", "ref", "extra",
                 "need_dx", "update_stats")

    def __init__(self, index, tape, layer, need_dx):
        self.index, self.tape, self.layer, self.need_dx = index, tape, layer, need_dx
        self.x = self.y = self.saved = self.ref = self.extra = None
        self.grads = {}
        self.update_stats = True

    def grad(self, name):
        """The gradient array of parameter ``name`` (None when the parameter is None)."""
        p = getattr(self.layer, name)
        if p is None:
            return None
        g = self.grads.get(name)
        if g is None or g.shape != p.shape:
            g = self.grads[name] = np.empty(p.shape, np.float32)
        return g

    def zero_grads(self):
        for name in self.layer.params:
            g = self.grad(name)
            if g is not None:
                g[...] = 0

    def add_extra(self, g):
        if g is None:
            return
        if self.extra is None:
            self.extra = np.array(g, np.float32, copy=True)
        else:
            ops.add(self.extra, g, self.extra, False)

    def take_extra(self, dy):
        e, self.extra = self.extra, None
        if e is None:
            return dy
        if dy is not None:
            ops.add(e, dy, e, False)
        return e


_ROUTING = (_layers.tag_, _layers.skip_, _layers.add_prev_)


class _Tape:
    """The training forward/backward of a network (a chain of nodes, maybe with a loss on top)."""

    def __init__(self, net, input_grad=False):
        chain = net.chain()
        top = chain[0].layer_details()
        self.loss = top if hasattr(top, "loss_and_grad") else None
        nodes = chain[1:] if self.loss is not None else chain
        self.n_total = len(chain)
        self.nodes = [n for n in reversed(nodes) if not isinstance(n.layer_details(), input_tensor_)]
        self.ctxs = []
        for pos, node in enumerate(self.nodes):
            layer = node.layer_details()
            index = self.n_total - 1 - (pos + 1)     # layer<i> numbering, input at the bottom
            if not layer.disabled or isinstance(layer, _ROUTING):
                if not (hasattr(layer, "forward_train") and hasattr(layer, "backward")):
                    raise LayerError(f"layer<{index}> {layer.kind}: {type(layer).__name__} has no "
                                     f"training forward/backward, so this net cannot be trained")
            self.ctxs.append(_Ctx(index, self, layer, need_dx=pos > 0 or input_grad))
        self.tags = {}

    def forward(self, x, update_stats=True):
        """The training-mode output of the top node below the loss, for x (N, K, R, C)."""
        self.tags = {}
        for ctx in self.ctxs:
            layer = ctx.layer
            ctx.x, ctx.extra, ctx.update_stats = x, None, update_stats
            if layer.disabled and not isinstance(layer, _ROUTING):
                y = x
            else:
                try:
                    y = layer.forward_train(ctx, x)
                except ShapeError as e:
                    raise LayerError(f"layer<{ctx.index}> {layer.kind}: {e}") from None
            ctx.y = x = y
        return x

    def backward(self, dy):
        """From the gradient of the loss w.r.t. the output of forward(), fill every ctx.grads.
        Returns the gradient w.r.t. the input when the tape was made with input_grad=True
        (None if no path reaches it)."""
        for ctx in reversed(self.ctxs):
            layer = ctx.layer
            if layer.disabled and not isinstance(layer, _ROUTING):
                continue
            if dy is None and not isinstance(layer, _layers.tag_):
                ctx.zero_grads()         # this layer's output does not reach the loss
                continue
            dy = layer.backward(ctx, dy)
        return dy

    def parameters(self):
        """[(key, layer, name, array, gradient)] for every learnable array, bottom first."""
        out = []
        for ctx in self.ctxs:
            layer = ctx.layer
            if layer.disabled:
                continue
            for name in layer.params:
                p = getattr(layer, name)
                if p is not None:
                    out.append((f"{ctx.index}.{name}", layer, name, p, ctx.grad(name)))
        return out


# ---------------------------------------------------------------------------- solvers
class sgd:
    """dlib's sgd: v = momentum * v - lr * (weight_decay * w + g); w += v.

    One velocity per parameter array (created at its first update)."""

    name = "sgd"

    def __init__(self, weight_decay=0.0005, momentum=0.9):
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"sgd: weight_decay must be >= 0, got {weight_decay!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"sgd: momentum must be in [0, 1), got {momentum!r}")
        self.weight_decay = float(weight_decay)
        self.momentum = float(momentum)
        self.state = {}                 # key -> {"v": array}

    def settings(self):
        return {"weight_decay": self.weight_decay, "momentum": self.momentum}

    def update(self, key, w, g, lr, decay):
        st = self.state.get(key)
        if st is None or st["v"].shape != w.shape:
            st = self.state[key] = {"v": np.zeros(w.shape, np.float32)}
        ops.sgd_update(w, g, st["v"], lr, self.weight_decay if decay else 0.0, self.momentum)

    def __repr__(self):
        return f"sgd(weight_decay={self.weight_decay:g}, momentum={self.momentum:g})"


class adam:
    """dlib's adam: h = g + weight_decay * w; m, v = moving averages of h and h^2;
    w -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + 1e-8), t counting
    the updates of each parameter array."""

    name = "adam"

    def __init__(self, weight_decay=0.0, beta1=0.9, beta2=0.999):
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"adam: weight_decay must be >= 0, got {weight_decay!r}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"adam: beta1 and beta2 must be in [0, 1), got {beta1!r}, {beta2!r}")
        self.weight_decay = float(weight_decay)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.state = {}                 # key -> {"m": array, "v": array, "t": array(1)}

    def settings(self):
        return {"weight_decay": self.weight_decay, "beta1": self.beta1, "beta2": self.beta2}

    def update(self, key, w, g, lr, decay):
        st = self.state.get(key)
        if st is None or st["m"].shape != w.shape:
            st = self.state[key] = {"m": np.zeros(w.shape, np.float32),
                                    "v": np.zeros(w.shape, np.float32),
                                    "t": np.zeros(1, np.int64)}
        st["t"][0] += 1
        ops.adam_update(w, g, st["m"], st["v"], lr, self.weight_decay if decay else 0.0,
                        self.beta1, self.beta2, int(st["t"][0]))

    def __repr__(self):
        return f"adam(weight_decay={self.weight_decay:g}, beta1={self.beta1:g}, beta2={self.beta2:g})"


_SOLVERS = {"sgd": sgd, "adam": adam}


# ---------------------------------------------------------------------------- progress
def _steps_without_decrease(values, probability_of_decrease=0.51, keep=None):
    """dlib's count_steps_without_decrease: the largest j such that a least-squares line
    through the last j values does not decrease with probability >= 0.51. With ``keep``
    (a mask over values), only the kept values enter the line (j still counts them all)."""
    v = np.asarray(values, np.float64)
    keep = np.ones(v.size, bool) if keep is None else np.asarray(keep, bool)
    r = v[::-1][keep[::-1]]                 # newest first, as dlib walks them
    n = r.size
    if n < 3:
        return 0
    r = r - r.mean()
    m = np.arange(1, n + 1, dtype=np.float64)
    x = m - 1
    sx, sy = np.cumsum(x), np.cumsum(r)
    sxx, sxy, syy = np.cumsum(x * x), np.cumsum(x * r), np.cumsum(r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        vx = sxx - sx * sx / m
        slope = (sxy - sx * sy / m) / vx
        rss = np.maximum(syy - sy * sy / m - slope * slope * vx, 0.0)
        se = np.sqrt(rss / (m - 2) / vx)
        z = np.where(se > 0, slope / se, np.where(slope > 0, np.inf, -np.inf))
    from scipy.special import ndtr
    # newest first: a positive slope here is a decrease in time
    not_decreasing = ndtr(z) < probability_of_decrease
    not_decreasing[:2] = False              # fewer than 3 values: no test
    # at position j of the newest-first sequence, the line holds the kept values up to j
    kept_so_far = np.cumsum(keep[::-1])
    ok = kept_so_far >= 1
    flag = np.zeros(v.size, bool)
    flag[ok] = not_decreasing[kept_so_far[ok] - 1]
    hits = np.flatnonzero(flag)
    return int(hits[-1] + 1) if hits.size else 0


def _steps_without_decrease_robust(values, probability_of_decrease=0.51, quantile_discard=0.10):
    """dlib's robust variant: the same count, the largest 10% of the values left out of the
    line (so that a few spikes cannot hide a plateau)."""
    v = np.asarray(values, np.float64)
    if v.size < 3:
        return 0
    q = int(math.floor(v.size * (1 - quantile_discard)))
    q = min(max(q, 1), v.size)
    cutoff = np.partition(v, q - 1)[q - 1]
    return _steps_without_decrease(v, probability_of_decrease, keep=v <= cutoff)


class _Progress:
    """The progress bar on stderr: one line rewritten in place on a terminal, one line
    per epoch otherwise."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.last = 0.0

    def update(self, epoch, epochs, done, total, loss, lr, force=False):
        now = time.monotonic()
        if not self.tty or (not force and now - self.last < 0.1):
            return
        self.last = now
        width = 24
        fill = int(width * done / max(total, 1))
        bar = "=" * fill + (">" if fill < width else "") + " " * (width - fill - 1)
        self.stream.write(f"\repoch {epoch + 1}/{epochs} [{bar}] {done}/{total}  "
                          f"loss {loss:.4g}  lr {lr:.3g}   ")
        self.stream.flush()

    def epoch_done(self, epoch, epochs, loss, lr, steps_without_progress, seconds):
        line = (f"epoch {epoch + 1}/{epochs}  loss {loss:.4g}  lr {lr:.3g}  "
                f"steps without progress {steps_without_progress}  ({seconds:.1f} s)")
        self.stream.write(("\r" + line + " " * 8 + "\n") if self.tty else line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------- trainer
def _positive(name, v, integer=False):
    if integer:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"dnn_trainer: {name} must be an integer >= 1, got {v!r}")
        return int(v)
    v = float(v)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"dnn_trainer: {name} must be a finite number > 0, got {v!r}")
    return v


class dnn_trainer:
    """WHAT THIS OBJECT REPRESENTS: dlib's dnn_trainer: mini-batch training of a
    network with a loss layer on top, by a solver (``sgd()`` by default).

    Settings (attributes, also settable with dlib's ``set_*`` methods):
    ``learning_rate`` (0.01), ``min_learning_rate`` (1e-5: training stops when
    the learning rate falls below it), ``mini_batch_size`` (128),
    ``max_num_epochs`` (10000), ``iterations_without_progress_threshold`` (2000)
    and ``learning_rate_shrink_factor`` (0.1): when the loss of the last
    ``threshold`` mini-batches shows no decrease (dlib's test on a least-squares
    slope, plain and robust to spikes), the learning rate is multiplied by the
    shrink factor. ``seed`` fixes the shuffling (and the initial parameters of a
    net that has none yet): the same seed, data and thread count give the same
    trained net, bit for bit.

    ``set_synchronization_file(path, interval_seconds)`` checkpoints the net and
    the whole trainer state to ``path`` at most every ``interval_seconds`` and
    at the end, atomically; a training started again with the same file (after
    being killed, say) resumes at the mini-batch where the file was written.
    """

    def __init__(self, net, solver=None, *, seed=0, verbose=True, stream=None):
        self._check_device(net)
        top = net.layer_details()
        if not hasattr(top, "loss_and_grad"):
            raise ValueError(f"dnn_trainer: the network's top layer (layer<0> {top.kind}) must be a "
                             f"loss layer, e.g. dnn.loss_multiclass_log(net) or dnn.loss_mean_squared(net)")
        if solver is None:
            solver = sgd()
        if not hasattr(solver, "update") or getattr(solver, "name", None) not in _SOLVERS:
            raise TypeError(f"dnn_trainer: solver must be dnn.sgd(...) or dnn.adam(...), got {solver!r}")
        self.net = net
        self.solver = solver
        self.seed = int(seed)
        self.verbose = bool(verbose)
        self.stream = stream
        self._learning_rate = 0.01
        self._min_learning_rate = 1e-5
        self._mini_batch_size = 128
        self._max_num_epochs = 10000
        self._threshold = 2000
        self._shrink = 0.1
        self._sync_path = None
        self._sync_interval = 60.0
        self._reset_progress()

    def _reset_progress(self):
        self.epoch = 0                      # epochs completed
        self._perm = None                   # this epoch's sample order
        self._pos = 0                       # samples of this epoch done
        self._steps = 0                     # train_one_step calls
        self._losses = collections.deque()  # the last `threshold` mini-batch losses
        self._epoch_loss = [0.0, 0]         # sum, count in this epoch
        self._last_epoch_loss = float("nan")
        self._steps_without_progress = 0
        self._rng = np.random.default_rng(self.seed)
        self._tape = None

    # -- settings ---------------------------------------------------------------
    @property
    def learning_rate(self):
        return self._learning_rate

    @learning_rate.setter
    def learning_rate(self, v):
        self._learning_rate = _positive("learning_rate", v)
        self._losses.clear()
        self._steps_without_progress = 0

    @property
    def min_learning_rate(self):
        return self._min_learning_rate

    @min_learning_rate.setter
    def min_learning_rate(self, v):
        self._min_learning_rate = _positive("min_learning_rate", v)

    @property
    def mini_batch_size(self):
        return self._mini_batch_size

    @mini_batch_size.setter
    def mini_batch_size(self, v):
        self._mini_batch_size = _positive("mini_batch_size", v, integer=True)

    @property
    def max_num_epochs(self):
        return self._max_num_epochs

    @max_num_epochs.setter
    def max_num_epochs(self, v):
        self._max_num_epochs = _positive("max_num_epochs", v, integer=True)

    @property
    def iterations_without_progress_threshold(self):
        return self._threshold

    @iterations_without_progress_threshold.setter
    def iterations_without_progress_threshold(self, v):
        self._threshold = _positive("iterations_without_progress_threshold", v, integer=True)

    @property
    def learning_rate_shrink_factor(self):
        return self._shrink

    @learning_rate_shrink_factor.setter
    def learning_rate_shrink_factor(self, v):
        v = float(v)
        if not 0 < v <= 1:
            raise ValueError(f"dnn_trainer: learning_rate_shrink_factor must be in (0, 1], got {v!r}")
        self._shrink = v

    # dlib's spelling
    def set_learning_rate(self, v): self.learning_rate = v
    def set_min_learning_rate(self, v): self.min_learning_rate = v
    def set_mini_batch_size(self, v): self.mini_batch_size = v
    def set_max_num_epochs(self, v): self.max_num_epochs = v
    def set_iterations_without_progress_threshold(self, v): self.iterations_without_progress_threshold = v
    def set_learning_rate_shrink_factor(self, v): self.learning_rate_shrink_factor = v
    def get_learning_rate(self): return self._learning_rate
    def get_train_one_step_calls(self): return self._steps
    def get_steps_without_progress(self): return self._steps_without_progress

    def get_average_loss(self):
        """The mean mini-batch loss of the epoch in progress (of the last one, between epochs)."""
        s, c = self._epoch_loss
        return s / c if c else self._last_epoch_loss

    def be_verbose(self):
        self.verbose = True

    def be_quiet(self):
        self.verbose = False

    def set_synchronization_file(self, path, interval_seconds=60):
        """Checkpoint to ``path`` every ``interval_seconds`` (0: after every mini-batch) and at
        the end of train(); if ``path`` exists, the next train() resumes from it."""
        interval_seconds = float(interval_seconds)
        if not interval_seconds >= 0:
            raise ValueError(f"dnn_trainer: interval_seconds must be >= 0, got {interval_seconds!r}")
        self._sync_path = os.fspath(path)
        self._sync_interval = interval_seconds

    def __repr__(self):
        return (f"dnn_trainer(solver={self.solver!r}, learning_rate={self._learning_rate:g}, "
                f"min_learning_rate={self._min_learning_rate:g}, mini_batch_size={self._mini_batch_size}, "
                f"max_num_epochs={self._max_num_epochs}, iterations_without_progress_threshold="
                f"{self._threshold}, learning_rate_shrink_factor={self._shrink:g}, epoch={self.epoch})")

    # -- checks -----------------------------------------------------------------
    @staticmethod
    def _check_device(net):
        devices = {n.device for n in net.chain()}
        if devices != {"cpu"}:
            raise NotImplementedError(
                "dnn_trainer: GPU training is not supported yet (the net is on "
                f"{'/'.join(sorted(d for d in devices if d != 'cpu'))}): train on the CPU, "
                "then move the trained net with net.to('cuda') for inference")

    def _check_data(self, x, y):
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            raise ValueError(f"dnn_trainer: x must be a float32 array (N, K, R, C), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != np.float32:
            raise ValueError(f"dnn_trainer: x must have dtype float32, got {x.dtype}")
        if x.shape[0] < 1 or min(x.shape) < 1:
            raise ValueError(f"dnn_trainer: x is empty: shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("dnn_trainer: x contains NaN or infinity")
        if len(y) != x.shape[0]:
            raise ValueError(f"dnn_trainer: got {x.shape[0]} samples but {len(y)} labels")

    def _setup(self, x):
        """Allocate parameters (seeded) and validate shapes with one inference forward;
        return the output shape of the node below the loss."""
        self._check_device(self.net)
        fresh = any(getattr(n.layer_details(), p, 0) is None
                    for n in self.net.chain() for p in n.layer_details().params)
        below = self.net.subnet()
        if fresh:
            saved = _layers._rng[0]
            _layers.set_seed(self.seed)
            try:
                out = below.forward(x[:1])
            finally:
                _layers._rng[0] = saved
        else:
            out = below.forward(x[:1])
        self.net.layer_details().setup(tuple(out.shape))
        return tuple(out.shape)

    # -- training ---------------------------------------------------------------
    def train_one_step(self, x, y):
        """One solver step on the mini-batch x (N, K, R, C) float32 with labels y (as for
        train()); the learning rate and its plateau schedule advance as in train().
        Returns the mini-batch loss."""
        self._check_data(x, y)
        if self._tape is None:
            self._out_shape = self._setup(x)
            self._tape = _Tape(self.net)
        y = self.net.layer_details().check_labels(y, x.shape[0], self._out_shape)
        return self._step(x, y)

    def _step(self, x, y):
        tape = self._tape
        loss_layer = self.net.layer_details()
        out = tape.forward(np.ascontiguousarray(x))
        dout = np.empty(out.shape, np.float32)
        loss = float(loss_layer.loss_and_grad(out, y, dout))
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"dnn_trainer: the loss became {loss} at step {self._steps + 1} (epoch {self.epoch + 1}, "
                f"learning rate {self._learning_rate:g}): training diverged; lower the learning rate "
                f"or check the data")
        tape.backward(dout)
        lr = self._learning_rate
        for key, layer, name, p, g in tape.parameters():
            self.solver.update(key, p, g, lr, name in _DECAYED)
        self._steps += 1
        self._record(loss)
        return loss

    def _record(self, loss):
        self._epoch_loss[0] += loss
        self._epoch_loss[1] += 1
        if self._shrink == 1:
            return
        self._losses.append(loss)
        while len(self._losses) > self._threshold:
            self._losses.popleft()
        if len(self._losses) >= self._threshold:
            self._steps_without_progress = _steps_without_decrease(self._losses)
            if self._steps_without_progress >= self._threshold and \
                    _steps_without_decrease_robust(self._losses) >= self._threshold:
                self._learning_rate *= self._shrink
                self._steps_without_progress = 0
                self._losses.clear()
        else:
            self._steps_without_progress = 0

    def train(self, x, y):
        """Train on samples x (N, K, R, C) float32 and labels y (N,) (loss_multiclass_log:
        integers in [0, K); loss_mean_squared: targets, (N,) or (N, outputs)) until
        ``max_num_epochs`` epochs are done or the learning rate falls below
        ``min_learning_rate``. Returns self."""
        self._check_data(x, y)
        self._out_shape = out_shape = self._setup(x)
        n = x.shape[0]
        y = self.net.layer_details().check_labels(y, n, out_shape)
        self._tape = _Tape(self.net)
        self._fingerprint = self._make_fingerprint(x, y)
        if self._sync_path is not None and os.path.exists(self._sync_path):
            self._load_sync(self._sync_path)
        stream = self.stream if self.stream is not None else sys.stderr
        progress = _Progress(stream) if self.verbose else None
        last_sync = time.monotonic()
        mb = self._mini_batch_size
        while self.epoch < self._max_num_epochs and self._learning_rate >= self._min_learning_rate:
            t0 = time.monotonic()
            if self._perm is None:
                self._perm = self._rng.permutation(n)
                self._pos = 0
                self._epoch_loss = [0.0, 0]
            while self._pos < n and self._learning_rate >= self._min_learning_rate:
                idx = self._perm[self._pos:self._pos + mb]
                self._step(x[idx], y[idx])
                self._pos += len(idx)
                if progress:
                    progress.update(self.epoch, self._max_num_epochs, self._pos, n,
                                    self.get_average_loss(), self._learning_rate)
                if self._sync_path is not None and time.monotonic() - last_sync >= self._sync_interval:
                    self._save_sync(self._sync_path)
                    last_sync = time.monotonic()
            if self._pos >= n:
                self._last_epoch_loss = self.get_average_loss()
                if progress:
                    progress.epoch_done(self.epoch, self._max_num_epochs, self._last_epoch_loss,
                                        self._learning_rate, self._steps_without_progress,
                                        time.monotonic() - t0)
                self.epoch += 1
                self._perm = None
                self._pos = 0
                self._epoch_loss = [0.0, 0]
        if self._sync_path is not None:
            self._save_sync(self._sync_path)
        return self

    # -- synchronization --------------------------------------------------------
    def _make_fingerprint(self, x, y):
        kinds = [n.layer_details().kind for n in self.net.chain()]
        return {"layers": kinds, "x_shape": list(x.shape), "y_shape": list(y.shape)}

    def _bn_layers(self):
        return [(i, n.layer_details()) for i, n in enumerate(self.net.chain())
                if isinstance(n.layer_details(), _layers.bn_)]

    def _save_sync(self, path):
        from .serialize import serialize
        for key, layer, name, p, g in self._tape.parameters():
            if not ops.all_finite(p):
                raise FloatingPointError(f"dnn_trainer: parameter {name} of layer<{key.split('.')[0]}> "
                                         f"{layer.kind} is not finite: training diverged (not saved)")
        buf = io.BytesIO()
        serialize(self.net, buf)
        state = {
            "version": _SYNC_VERSION,
            "fingerprint": self._fingerprint,
            "solver": {"name": self.solver.name, "settings": self.solver.settings()},
            "settings": {"learning_rate": self._learning_rate, "min_learning_rate": self._min_learning_rate,
                         "mini_batch_size": self._mini_batch_size, "max_num_epochs": self._max_num_epochs,
                         "threshold": self._threshold, "shrink": self._shrink, "seed": self.seed},
            "epoch": self.epoch, "pos": self._pos, "steps": self._steps,
            "losses": list(self._losses), "epoch_loss": self._epoch_loss,
            "last_epoch_loss": None if math.isnan(self._last_epoch_loss) else self._last_epoch_loss,
            "steps_without_progress": self._steps_without_progress,
            "rng": self._rng.bit_generator.state,
            "bn_num_updates": {str(i): int(getattr(l, "num_updates", 0)) for i, l in self._bn_layers()},
            "solver_keys": sorted(self.solver.state),
        }
        arrays = {"net": np.frombuffer(buf.getvalue(), np.uint8),
                  "state": np.frombuffer(json.dumps(state).encode(), np.uint8)}
        if self._perm is not None:
            arrays["perm"] = np.asarray(self._perm, np.int64)
        for key, st in self.solver.state.items():
            for name, a in st.items():
                arrays[f"solver/{key}/{name}"] = a
        atomic_write(path, lambda f: np.savez(f, **arrays))

    def _load_sync(self, path):
        from .serialize import deserialize
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            state = json.loads(arrays["state"].tobytes().decode())
            saved_net = deserialize(io.BytesIO(arrays["net"].tobytes()))
        except Exception as e:
            raise ValueError(f"dnn_trainer: {path} is not a readable synchronization file: "
                             f"{type(e).__name__}: {e}") from None
        if state.get("version") != _SYNC_VERSION:
            raise ValueError(f"dnn_trainer: {path}: unsupported synchronization file version "
                             f"{state.get('version')!r}")
        fp = state["fingerprint"]
        if fp != self._fingerprint:
            raise ValueError(f"dnn_trainer: {path} was written for another net or data set "
                             f"(file: layers {fp['layers']}, x {fp['x_shape']}; now: layers "
                             f"{self._fingerprint['layers']}, x {self._fingerprint['x_shape']}); "
                             f"remove it or use another file")
        if state["solver"]["name"] != self.solver.name:
            raise ValueError(f"dnn_trainer: {path} was written by the {state['solver']['name']} solver, "
                             f"this trainer uses {self.solver.name}")
        # parameters and running statistics, copied in place (the compiled program keeps them)
        for i, (mine, theirs) in enumerate(zip(self.net.chain(), saved_net.chain())):
            a, b = mine.layer_details(), theirs.layer_details()
            for name in tuple(a.params) + ("running_mean", "running_var"):
                pa, pb = getattr(a, name, None), getattr(b, name, None)
                if pa is None or pb is None:
                    continue
                if pa.shape != pb.shape:
                    raise ValueError(f"dnn_trainer: {path}: layer<{i}> {a.kind} {name} has shape "
                                     f"{pb.shape} in the file, {pa.shape} in the net")
                np.copyto(pa, pb)
        for i, l in self._bn_layers():
            l.num_updates = int(state["bn_num_updates"].get(str(i), 0))
        s = state["settings"]
        self._learning_rate = s["learning_rate"]
        self.epoch, self._pos, self._steps = state["epoch"], state["pos"], state["steps"]
        self._losses = collections.deque(state["losses"])
        self._epoch_loss = list(state["epoch_loss"])
        lel = state["last_epoch_loss"]
        self._last_epoch_loss = float("nan") if lel is None else lel
        self._steps_without_progress = state["steps_without_progress"]
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
        self._perm = arrays.get("perm")
        self.solver.state = {}
        for key in state["solver_keys"]:
            prefix = f"solver/{key}/"
            self.solver.state[key] = {k[len(prefix):]: np.array(v) for k, v in arrays.items()
                                      if k.startswith(prefix)}

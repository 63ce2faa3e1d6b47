"""dnn_trainer: mini-batch training of a network with a loss on top, in dlib's spirit.

    net = dnn.loss_multiclass_log(dnn.fc(10, dnn.relu(dnn.bn_con(dnn.con(8, 3, 3, 1, 1,
                                  dnn.input_tensor())))))
    trainer = dnn.dnn_trainer(net, dnn.sgd(weight_decay=5e-4, momentum=0.9))
    trainer.learning_rate = 0.1
    trainer.mini_batch_size = 64
    trainer.max_num_epochs = 20
    trainer.set_synchronization_file("net.sync", interval_seconds=60)
    trainer.train(x, labels)           # x float32 (N, K, R, C), labels int (N,)

Each step runs the tape (train/tape.py: training forward and backward), then
the solver (train/solvers.py) updates the parameter arrays *in place*, through
``layer.writable(name)`` (which bumps their version, so that a transform a compiled
inference program keeps of them, Winograd's filters, is recomputed), so the compiled
inference program sees them. Weight decay applies to con_ filters and
fc_ weights only (dlib's defaults: biases and batch-norm / affine parameters
have a weight decay multiplier of 0). The synchronisation file is
train/sync.py's. GPU training is not supported yet: a net on "cuda" raises
NotImplementedError.
"""
import collections
import hashlib
import math
import os
import sys
import time

import numpy as np

from ..layers import common as _common
from . import sync
from .progress import Progress, steps_without_decrease, steps_without_decrease_robust
from .solvers import SOLVERS, sgd
from .tape import Tape

DECAYED = ("filters", "weights")       # the parameters weight decay applies to


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
        if not top.is_loss:
            raise ValueError(f"dnn_trainer: the network's top layer (layer<0> {top.kind}) must be a "
                             f"loss layer, e.g. dnn.loss_multiclass_log(net) or dnn.loss_mean_squared(net)")
        if solver is None:
            solver = sgd()
        if not isinstance(solver, tuple(SOLVERS.values())):
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
        finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"dnn_trainer: sample {bad[0]} of x contains NaN or infinity "
                             f"({bad.size} such samples in all)")
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
            saved = _common._rng[0]
            _common.set_seed(self.seed)
            try:
                out = below.forward(x[:1])
            finally:
                _common._rng[0] = saved
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
            self._tape = Tape(self.net)
        y = self.net.layer_details().check_labels(y, x.shape[0], self._out_shape)
        return self._step(x, y)

    def _step(self, x, y):
        tape = self._tape
        tape.seed, tape.step = self.seed, self._steps      # dropout masks come from these
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
            with layer.writable(name):         # in place: bumps the version (core.Plan.cached)
                self.solver.update(key, p, g, lr, name in DECAYED)
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
            self._steps_without_progress = steps_without_decrease(self._losses)
            if self._steps_without_progress >= self._threshold and \
                    steps_without_decrease_robust(self._losses) >= self._threshold:
                self._learning_rate *= self._shrink
                self._steps_without_progress = 0
                self._losses.clear()
        else:
            self._steps_without_progress = 0

    def train(self, x, y, *, ignore_fingerprint=False):
        """Train on samples x (N, K, R, C) float32 and labels y (N,) (loss_multiclass_log:
        integers in [0, K); loss_mean_squared: targets, (N,) or (N, outputs)) until
        ``max_num_epochs`` epochs are done or the learning rate falls below
        ``min_learning_rate``. Returns self.

        With a synchronisation file that exists, training resumes from it and says so
        on stderr ("resuming from FILE at epoch E, step S", or that it had already
        finished). A file written for another net, other data or other labels (a
        hash of their bytes is kept) is refused with ValueError, unless
        ``ignore_fingerprint=True``; changed trainer settings are reported and used."""
        self._check_data(x, y)
        self._out_shape = out_shape = self._setup(x)
        n = x.shape[0]
        y = self.net.layer_details().check_labels(y, n, out_shape)
        self._tape = Tape(self.net)
        self._n_samples = n
        self._fingerprint = self._make_fingerprint(x, y)
        stream = self.stream if self.stream is not None else sys.stderr
        if self._sync_path is not None and os.path.exists(self._sync_path):
            self._resume(self._sync_path, stream, ignore_fingerprint)
        progress = Progress(stream) if self.verbose else None
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
    def _settings(self):
        return {"learning_rate": self._learning_rate, "min_learning_rate": self._min_learning_rate,
                "mini_batch_size": self._mini_batch_size, "max_num_epochs": self._max_num_epochs,
                "iterations_without_progress_threshold": self._threshold,
                "learning_rate_shrink_factor": self._shrink, "seed": self.seed,
                "solver": repr(self.solver)}

    def _make_fingerprint(self, x, y):
        """What a checkpoint must have been written for: the net's layers, the data and
        labels (shapes and a hash of their bytes), and the settings the run started with."""
        kinds = [n.layer_details().kind for n in self.net.chain()]
        return {"layers": kinds, "x_shape": list(x.shape), "y_shape": list(y.shape),
                "x_sha256": hashlib.sha256(np.ascontiguousarray(x).data).hexdigest(),
                "y_sha256": hashlib.sha256(np.ascontiguousarray(y).data).hexdigest(),
                "settings": self._settings()}

    def _resume(self, path, stream, ignore_fingerprint):
        state, arrays, saved_net = sync.read(path)
        saved = state.get("fingerprint")
        if not isinstance(saved, dict):
            raise sync.InconsistentCheckpoint(f"dnn_trainer: inconsistent checkpoint {path}: "
                                              f"it has no fingerprint")
        diff = sync.describe_mismatch(saved, self._fingerprint)
        if diff and not ignore_fingerprint:
            raise ValueError(f"dnn_trainer: {path} was written for another net or data set: "
                             f"{'; '.join(diff)} differ. Remove the file (or use another) to start "
                             f"again, or pass ignore_fingerprint=True to resume from it anyway")
        mine = dict(self._fingerprint)
        start = saved.get("settings") or {}
        changed = [f"{k} {start.get(k)!r} -> {v!r}" for k, v in self._fingerprint["settings"].items()
                   if start.get(k, v) != v]
        sync.load(self, path, state, arrays, saved_net)
        # a resumed run keeps the fingerprint it started with (its first settings)
        self._fingerprint = dict(saved, **{k: mine[k] for k in mine if k != "settings"})
        done = not (self.epoch < self._max_num_epochs and self._learning_rate >= self._min_learning_rate)
        if done:
            stream.write(f"dnn_trainer: {path}: training already finished (epoch {self.epoch}, "
                         f"step {self._steps}, learning rate {self._learning_rate:g}); returning "
                         f"the trained net. Remove the file to train again.\n")
        else:
            stream.write(f"dnn_trainer: resuming from {path} at epoch {self.epoch + 1}, "
                         f"step {self._steps}\n")
        if changed:
            stream.write(f"dnn_trainer: settings changed since the run started: "
                         f"{', '.join(changed)}\n")
        stream.flush()

    def _save_sync(self, path):
        sync.save(self, path)

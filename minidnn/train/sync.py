"""The synchronisation file of dnn_trainer: a checkpoint it resumes from.

An .npz (no pickles) holding the net in minidnn's own format (``net``), the
trainer's state as JSON (``state``: settings, schedule, position, the RNG,
the fingerprint of what it trains) and the solver's arrays
(``solver/<key>/<name>``); written atomically (serialize.atomic_write).
"""
import collections
import io
import json
import math

import numpy as np

from .. import ops
from ..layers import bn_
from ..serialize import atomic_write

SYNC_VERSION = 1


def _bn_layers(net):
    return [(i, n.layer_details()) for i, n in enumerate(net.chain())
            if isinstance(n.layer_details(), bn_)]


def save(self, path):
    """Checkpoint trainer ``self`` (its net, solver state, schedule and position) to
    ``path`` atomically: an .npz of the net's own file bytes, a JSON state and arrays."""
    from ..serialize import serialize
    for key, layer, name, p, g in self._tape.parameters():
        if not ops.all_finite(p):
            raise FloatingPointError(f"dnn_trainer: parameter {name} of layer<{key.split('.')[0]}> "
                                     f"{layer.kind} is not finite: training diverged (not saved)")
    buf = io.BytesIO()
    serialize(self.net, buf)
    state = {
        "version": SYNC_VERSION,
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
        "bn_num_updates": {str(i): int(getattr(l, "num_updates", 0)) for i, l in _bn_layers(self.net)},
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

def load(self, path):
    """Restore trainer ``self`` from the checkpoint at ``path`` (ValueError when it is
    not one, or was written for another net, data set or solver)."""
    from ..serialize import deserialize
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        state = json.loads(arrays["state"].tobytes().decode())
        saved_net = deserialize(io.BytesIO(arrays["net"].tobytes()))
    except Exception as e:
        raise ValueError(f"dnn_trainer: {path} is not a readable synchronization file: "
                         f"{type(e).__name__}: {e}") from None
    if state.get("version") != SYNC_VERSION:
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
    for i, l in _bn_layers(self.net):
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

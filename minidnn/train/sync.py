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

class InconsistentCheckpoint(ValueError):
    """A synchronisation file that is readable but does not describe a training state
    this trainer can resume exactly (hand-edited, or damaged inside a valid zip)."""


def _need(cond, path, what):
    if not cond:
        raise InconsistentCheckpoint(f"dnn_trainer: inconsistent checkpoint {path}: {what}")


def _is_int(v, lo=0, hi=None):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read(path):
    """(state dict, arrays dict, the saved net) of the file at ``path``; ValueError when it
    is not a readable synchronization file."""
    from ..serialize import deserialize
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        state = json.loads(arrays["state"].tobytes().decode())
        saved_net = deserialize(arrays["net"].tobytes())
    except Exception as e:
        raise ValueError(f"dnn_trainer: {path} is not a readable synchronization file: "
                         f"{type(e).__name__}: {e}") from None
    _need(isinstance(state, dict), path, "the state is not a JSON object")
    if state.get("version") != SYNC_VERSION:
        raise ValueError(f"dnn_trainer: {path}: unsupported synchronization file version "
                         f"{state.get('version')!r}")
    return state, arrays, saved_net


def describe_mismatch(saved, now):
    """What differs between two fingerprints, in words (empty when they match)."""
    out = []
    for key, what in (("layers", "the net's layers"), ("x_shape", "the shape of x"),
                      ("y_shape", "the shape of the labels"), ("x_sha256", "the data x"),
                      ("y_sha256", "the labels")):
        if saved.get(key) != now.get(key):
            if key.endswith("sha256"):
                out.append(f"{what} (a hash of their bytes)")
            else:
                out.append(f"{what} ({saved.get(key)} in the file, {now.get(key)} now)")
    return out


def load(self, path, state, arrays, saved_net):
    """Restore trainer ``self`` from the checkpoint read from ``path`` (read()), after
    checking that it is complete and consistent with the net: InconsistentCheckpoint
    otherwise; nothing is changed unless everything fits."""
    n = self._n_samples
    # -- the state, field by field
    for key in ("fingerprint", "solver", "settings", "epoch", "pos", "steps", "losses",
                "epoch_loss", "last_epoch_loss", "steps_without_progress", "rng",
                "bn_num_updates", "solver_keys"):
        _need(key in state, path, f"the state has no {key!r}")
    s = state["settings"]
    _need(isinstance(s, dict) and _is_num(s.get("learning_rate")) and s["learning_rate"] > 0,
          path, "settings.learning_rate is not a positive number")
    _need(isinstance(state["solver"], dict) and state["solver"].get("name") in ("sgd", "adam"),
          path, "solver.name is not sgd or adam")
    if state["solver"]["name"] != self.solver.name:
        raise ValueError(f"dnn_trainer: {path} was written by the {state['solver']['name']} solver, "
                         f"this trainer uses {self.solver.name}")
    _need(_is_int(state["epoch"]), path, f"epoch {state['epoch']!r} is not an integer >= 0")
    _need(_is_int(state["pos"], 0, n), path, f"pos {state['pos']!r} is not in [0, {n}]")
    _need(_is_int(state["steps"]), path, f"steps {state['steps']!r} is not an integer >= 0")
    _need(isinstance(state["losses"], list) and all(_is_num(v) for v in state["losses"]),
          path, "losses is not a list of finite numbers")
    el = state["epoch_loss"]
    _need(isinstance(el, list) and len(el) == 2 and _is_num(el[0]) and _is_int(el[1]), path,
          "epoch_loss is not [sum, count]")
    lel = state["last_epoch_loss"]
    _need(lel is None or _is_num(lel), path, "last_epoch_loss is not a number")
    _need(_is_int(state["steps_without_progress"]), path, "steps_without_progress is not an integer")
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state["rng"]
    except Exception as e:
        raise InconsistentCheckpoint(f"dnn_trainer: inconsistent checkpoint {path}: the RNG state "
                                     f"is not one ({type(e).__name__}: {e})") from None
    perm = arrays.get("perm")
    if perm is not None:
        _need(perm.dtype == np.int64 and perm.shape == (n,) and
              np.array_equal(np.sort(perm), np.arange(n)), path,
              f"perm is not a permutation of the {n} samples")
    else:
        _need(state["pos"] == 0, path, "pos is not 0 but there is no permutation (perm)")
    # -- the net: the same structure and shapes
    mine, theirs = self.net.chain(), saved_net.chain()
    _need(len(mine) == len(theirs), path, f"the file's net has {len(theirs)} layers, this net {len(mine)}")
    pairs = []
    for i, (a_node, b_node) in enumerate(zip(mine, theirs)):
        a, b = a_node.layer_details(), b_node.layer_details()
        _need(type(a) is type(b), path, f"layer<{i}> is a {b.kind} in the file, a {a.kind} in the net")
        for name in tuple(a.params) + tuple(a.state):
            pa, pb = getattr(a, name), getattr(b, name)
            if pa is None and pb is None:
                continue
            _need(pa is not None and pb is not None and pa.shape == pb.shape, path,
                  f"layer<{i}> {a.kind} {name} has shape {None if pb is None else pb.shape} in the "
                  f"file, {None if pa is None else pa.shape} in the net")
            pairs.append((a, name, pb))
    bn_updates = state["bn_num_updates"]
    _need(isinstance(bn_updates, dict) and all(_is_int(v, 0, bn_.running_stats_window_size)
                                               for v in bn_updates.values()), path,
          "bn_num_updates is not a map of integers in [0, 100]")
    # -- the solver: one state per learnable array, of its shape, never reset
    params = {key: p for key, layer, name, p, g in self._tape.parameters()}
    keys = state["solver_keys"]
    _need(isinstance(keys, list) and all(isinstance(k, str) for k in keys), path,
          "solver_keys is not a list of names")
    _need(set(keys) <= set(params), path, f"solver state for arrays the net does not have: "
          f"{sorted(set(keys) - set(params))}")
    if state["steps"] > 0:
        _need(set(keys) == set(params), path, f"no solver state for {sorted(set(params) - set(keys))} "
              f"after {state['steps']} steps")
    want = {"sgd": ("v",), "adam": ("m", "v", "t")}[self.solver.name]
    solver_state = {}
    for key in keys:
        prefix = f"solver/{key}/"
        st = {k[len(prefix):]: np.array(v) for k, v in arrays.items() if k.startswith(prefix)}
        _need(set(st) == set(want), path, f"solver state of {key} has {sorted(st)}, expected {list(want)}")
        for name in want:
            if name == "t":
                _need(st["t"].shape == (1,) and st["t"].dtype == np.int64 and st["t"][0] >= 1, path,
                      f"solver state {key}/t is not one step count >= 1")
            else:
                _need(st[name].shape == params[key].shape and st[name].dtype == np.float32, path,
                      f"solver state {key}/{name} has shape {st[name].shape} ({st[name].dtype}), "
                      f"the parameter {params[key].shape} (float32)")
        solver_state[key] = st
    # -- everything fits: apply (parameters copied in place: the compiled program keeps them)
    for layer, name, pb in pairs:
        with layer.writable(name) as pa:
            np.copyto(pa, pb)
    for i, l in _bn_layers(self.net):
        l.num_updates = int(bn_updates.get(str(i), 0))
    self._learning_rate = float(s["learning_rate"])
    self.epoch, self._pos, self._steps = state["epoch"], state["pos"], state["steps"]
    self._losses = collections.deque(state["losses"])
    self._epoch_loss = list(el)
    self._last_epoch_loss = float("nan") if lel is None else float(lel)
    self._steps_without_progress = state["steps_without_progress"]
    self._rng = rng
    self._perm = perm
    self.solver.state = solver_state

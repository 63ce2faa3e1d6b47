"""Run a network over many inputs: ``python -m minidnn run MODEL INPUT... --out FILE``.

Inputs are image files (decoded with Pillow, the ``images`` extra) or ``.npy`` arrays,
given as files, folders (their image and .npy files, sorted), glob patterns, or file
lists (a ``.txt`` file of paths, one a line). They run in batches (consecutive inputs of
one shape), and each input gets one JSON line in FILE:

    {"input": "photos/a.jpg", "output": ...}      what the net's loss layer returns
    {"input": "photos/b.jpg", "error": "..."}     an input that could not be read or run

``output`` is what ``net(x)`` gives for that sample (a label, scores, detections,
a descriptor) or, for a net without a loss layer, its output tensor, as JSON numbers.
A run that stops (killed, interrupted) resumes where it stopped: inputs already in FILE
are skipped, a half-written last line is dropped. When a run completes, FILE holds
one line per input in input order, so the same inputs give the same file, whether run
here or on a Ray cluster (``run_ray`` in minidnn/ray_run.py).

How an input becomes a sample: the network's input layer says. For ``input_tensor``
nets an image becomes float32 (K, R, C) in [0, 1] (K = 1: grayscale, 3: RGB) and an
.npy array must be (K, R, C) (or (1, K, R, C)); input layers that take images (the
dlib models' ``input_rgb_image`` ...) get the uint8 image itself.
"""
import glob
import json
import math
import os
import sys
import time

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ARRAY_EXTS = (".npy",)


# ---------------------------------------------------------------------------- inputs
def expand_inputs(specs):
    """The input paths named by ``specs`` (files, folders, globs, .txt file lists), in order,
    without repeats."""
    out, seen = [], set()

    def add(p):
        if p not in seen:
            seen.add(p)
            out.append(p)
    for spec in specs:
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            for name in sorted(os.listdir(spec)):
                if name.lower().endswith(IMAGE_EXTS + ARRAY_EXTS):
                    add(os.path.join(spec, name))
        elif any(ch in spec for ch in "*?["):
            for p in sorted(glob.glob(spec, recursive=True)):
                if os.path.isfile(p):
                    add(p)
        elif spec.lower().endswith(".txt") and os.path.isfile(spec):
            base = os.path.dirname(spec)
            with open(spec, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        add(line if os.path.isabs(line) else os.path.join(base, line))
        else:
            add(spec)
    return out


def read_input(path):
    """The array in an .npy file, or an image as uint8 (H, W, 3) RGB or (H, W) grayscale."""
    low = path.lower()
    if low.endswith(ARRAY_EXTS):
        return np.load(path, allow_pickle=False)
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError('reading images needs Pillow: pip install "minidnn[images]"') from None
    with Image.open(path) as im:
        im = im.convert("L" if im.mode in ("L", "1", "I;16", "I", "F") else "RGB")
        return np.asarray(im, dtype=np.uint8)


def sample_for(net, a):
    """What the net's input layer takes for one input ``a`` (ValueError when it cannot)."""
    bottom = net.chain()[-1].layer_details()
    if bottom.takes_images:
        return bottom.check_image(a)
    k = bottom.k
    if a.dtype == np.uint8:                         # an image: (H, W) or (H, W, 3)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3:
            raise ValueError(f"expected an image, got an array of shape {a.shape}")
        if k == 1 and a.shape[2] == 3:
            a = (a @ np.array([0.299, 0.587, 0.114]))[:, :, None]
        elif k not in (None, a.shape[2]) and a.shape[2] == 1:
            a = np.repeat(a, k, axis=2)
        return np.ascontiguousarray(np.transpose(a, (2, 0, 1)), np.float32) / np.float32(255)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.dtype.kind not in "fiu":
        raise ValueError(f"expected a numeric array (K, R, C), got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a, np.float32)


def batch_of(net, samples):
    """The batch the net takes for samples of one shape."""
    if net.chain()[-1].layer_details().takes_images:
        return list(samples)
    return np.stack(samples)


def results(net, batch):
    """One JSON-able result per sample of ``batch``."""
    top = net.layer_details()
    if top.is_loss:
        out = net(batch)
        return [jsonable(out[i]) for i in range(len(out))]
    out = net.forward(batch)
    return [jsonable(out[i]) for i in range(out.shape[0])]


def jsonable(v):
    """v as JSON: numbers, lists, dicts (objects with to_dict())."""
    if hasattr(v, "to_dict"):
        return jsonable(v.to_dict())
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else repr(f)
    return v


def error_text(e):
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def process(net, paths, batch_size):
    """[(path, JSON line, whether it is an error)] for ``paths``: each read, converted,
    batched with its neighbours of the same shape, run; an input that fails gets an error
    line."""
    lines, pending = [], []

    def flush():
        if not pending:
            return
        try:
            outs = results(net, batch_of(net, [s for _, s in pending]))
            for (p, _), o in zip(pending, outs):
                lines.append((p, json.dumps({"input": p, "output": o}), False))
        except Exception as e:                       # the batch failed: each on its own
            if len(pending) == 1:
                lines.append((pending[0][0], json.dumps({"input": pending[0][0], "error": error_text(e)}),
                              True))
            else:
                for item in list(pending):
                    pending[:] = [item]
                    flush()
        pending.clear()

    for p in paths:
        try:
            s = sample_for(net, read_input(p))
        except Exception as e:
            flush()
            lines.append((p, json.dumps({"input": p, "error": error_text(e)}), True))
            continue
        if pending and (np.shape(pending[0][1]) != np.shape(s) or len(pending) >= batch_size):
            flush()
        pending.append((p, s))
    flush()
    return lines


# ---------------------------------------------------------------------------- the output file
def done_inputs(out):
    """The inputs FILE already has a line for (a half-written last line is cut off)."""
    done = set()
    if not os.path.exists(out):
        return done
    with open(out, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)                          # a line cut by a kill: drop it
        for line in data[:end].splitlines():
            try:
                done.add(json.loads(line)["input"])
            except (ValueError, KeyError, TypeError):
                continue
    return done


def finish(out, paths):
    """Rewrite FILE atomically with one line per input of ``paths``, in their order (the
    last line written for an input wins), if it has a line for every one of them."""
    from .serialize import atomic_write
    by_input = {}
    with open(out, encoding="utf-8") as f:
        for line in f:
            try:
                by_input[json.loads(line)["input"]] = line if line.endswith("\n") else line + "\n"
            except (ValueError, KeyError, TypeError):
                continue
    if any(p not in by_input for p in paths):
        return False
    text = "".join(by_input[p] for p in paths).encode("utf-8")
    atomic_write(out, lambda f: f.write(text))
    return True


class _Progress:
    def __init__(self, total, quiet):
        self.bar = None
        if quiet:
            return
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="input", file=sys.stderr)
        except ImportError:
            self.total, self.done, self.last = total, 0, 0.0

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)
        elif hasattr(self, "total"):
            self.done += n
            now = time.monotonic()
            if sys.stderr.isatty() and now - self.last > 0.2:
                self.last = now
                sys.stderr.write(f"\r{self.done}/{self.total} inputs")
                sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif hasattr(self, "total") and sys.stderr.isatty():
            sys.stderr.write("\n")


def run(net, specs, out, batch_size=16, quiet=False):
    """Run ``net`` over the inputs ``specs`` name, appending JSON lines to ``out``; returns
    (inputs run now, errors among them, seconds)."""
    paths = expand_inputs(specs)
    done = done_inputs(out)
    todo = [p for p in paths if p not in done]
    progress = _Progress(len(todo), quiet)
    t0 = time.perf_counter()
    n_err = 0
    with open(out, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), 4 * batch_size):
            chunk = todo[i:i + 4 * batch_size]
            for _, line, bad in process(net, chunk, batch_size):
                n_err += bad
                f.write(line + "\n")
            f.flush()
            progress.update(len(chunk))
    progress.close()
    seconds = time.perf_counter() - t0
    finish(out, paths)
    return len(todo), n_err, seconds

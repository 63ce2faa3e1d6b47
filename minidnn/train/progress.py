"""dlib's plateau test (count_steps_without_decrease and its robust variant) and the
progress bar of dnn_trainer."""
import math
import sys
import time

import numpy as np


def steps_without_decrease(values, probability_of_decrease=0.51, keep=None):
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


def steps_without_decrease_robust(values, probability_of_decrease=0.51, quantile_discard=0.10):
    """dlib's robust variant: the same count, the largest 10% of the values left out of the
    line (so that a few spikes cannot hide a plateau)."""
    v = np.asarray(values, np.float64)
    if v.size < 3:
        return 0
    q = int(math.floor(v.size * (1 - quantile_discard)))
    q = min(max(q, 1), v.size)
    cutoff = np.partition(v, q - 1)[q - 1]
    return steps_without_decrease(v, probability_of_decrease, keep=v <= cutoff)


class Progress:
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

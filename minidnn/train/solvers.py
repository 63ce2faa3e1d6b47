"""The solvers: dlib's sgd and adam, updating parameter arrays in place through ops."""
import math

import numpy as np

from .. import ops


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
        self.eps = 1e-8                 # dlib's
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
                        self.beta1, self.beta2, int(st["t"][0]), self.eps)

    def __repr__(self):
        return f"adam(weight_decay={self.weight_decay:g}, beta1={self.beta1:g}, beta2={self.beta2:g})"


SOLVERS = {"sgd": sgd, "adam": adam}

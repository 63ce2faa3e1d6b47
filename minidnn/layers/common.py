"""What the layers share: argument checks, parameter initialisation, output sizes."""
import numpy as np

from ..core import ShapeError, check_host_memory

CONV, FC = "conv", "fc"

# Parameter initialisation is deterministic: seeded once, reseedable.
_rng = [np.random.default_rng(0)]


def set_seed(seed):
    """Reseed the generator that initialises new parameters."""
    _rng[0] = np.random.default_rng(seed)


def randn(shape, fan_in):
    """He initialisation (fine for ReLU networks), float32."""
    check_host_memory(12 * int(np.prod(shape, dtype=np.float64)), f"a parameter of shape {shape}")
    return (_rng[0].standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)


def pos_int(layer, name, v, minimum=1):
    """v as an int >= minimum; ValueError naming the layer and argument otherwise
    (bools are not integers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{layer}: {name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def flag(layer, name, v):
    """v as a bool; ValueError unless it is one (numpy's bool too)."""
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{layer}: {name} must be True or False, got {v!r}")
    return bool(v)


def real(layer, name, v, lo=None, hi=None, lo_open=False):
    """v as a finite float within [lo, hi] ((lo, hi] with lo_open); ValueError otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{layer}: {name} must be a number, got {v!r}")
    v = float(v)
    bad = not np.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
        (hi is not None and v > hi)
    if bad:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{layer}: {name} must be a finite number in {rng}, got {v!r}")
    return v


def out_size(what, n, k, stride, pad, dilation=1):
    """The output length of a window of k taps (spread by ``dilation``) sliding with
    ``stride`` over n inputs padded by ``pad`` on both sides (kernels/common/geometry.h
    has the same rule); ShapeError when the window does not fit."""
    span = dilation * (k - 1) + 1
    if span > n + 2 * pad:
        raise ShapeError(f"the {what} window ({span}) is larger than its padded input ({n} + 2*{pad})")
    return 1 + (n + 2 * pad - span) // stride


def per_unit(mode, in_shape):
    """The number of per-unit parameters of an affine / batch-norm layer in ``mode``."""
    return in_shape[1] if mode == CONV else in_shape[1] * in_shape[2] * in_shape[3]


def affine_views(mode, x, y):
    """x, y viewed as the 4-D arrays the affine kernel takes in ``mode``."""
    if mode == CONV:
        return x, y
    n = x.shape[0]
    d = int(np.prod(x.shape[1:]))
    return x.reshape(n, d, 1, 1), y.reshape(n, d, 1, 1)


def mode_below(subnet):
    """The mode an affine_ put on ``subnet`` takes: the ``output_mode`` of the nearest layer
    below that declares one (fc_: fc; bn_/affine_: their own; most others: conv; pointwise
    layers and tags pass it through)."""
    n = subnet
    while n is not None:
        m = n.layer_details().output_mode
        if m is not None:
            return m
        n = n.subnet()
    return CONV

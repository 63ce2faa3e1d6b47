"""THE float64 reference: slow, obviously-correct NumPy for every primitive and every layer.

One entry per layer class in ``LAYERS`` (``@layer_ref(dnn.con_)``), one per activation
in ``ACTIVATIONS`` (by name), and ``forward(net, x)``, a whole-network evaluator built
only from them: it shares no code with the runtime's Program or backends (it walks the
nodes itself). The forward tests, the gradient tests (``train=True``: batch-norm uses
the batch's statistics; ``over``: float64 parameters in place of the layer's) and every
backend compare against it. Computed in float64 so that the reference is the exact side
of a comparison.
"""
import math

import numpy as np

import minidnn as dnn


# ---------------------------------------------------------------------------- primitives
def conv2d(x, w, b, sy, sx, py, px):
    """Direct definition: y[n,f,i,j] = sum_{k,a,c} xpad[n,k,i*sy+a,j*sx+c] * w[f,k,a,c] + b[f]."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    n, k, r, c = x.shape
    f, _, nr, nc = w.shape
    xp = np.zeros((n, k, r + 2 * py, c + 2 * px))
    xp[:, :, py:py + r, px:px + c] = x
    ro = 1 + (r + 2 * py - nr) // sy
    co = 1 + (c + 2 * px - nc) // sx
    y = np.zeros((n, f, ro, co))
    for a in range(nr):
        for cc in range(nc):
            patch = xp[:, :, a:a + sy * (ro - 1) + 1:sy, cc:cc + sx * (co - 1) + 1:sx]  # (n,k,ro,co)
            y += np.einsum("nkij,fk->nfij", patch, w[:, :, a, cc])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def fc(x, w, b):
    y = x.reshape(x.shape[0], -1).astype(np.float64) @ w.astype(np.float64).T
    if b is not None:
        y += b
    return y.reshape(x.shape[0], -1, 1, 1)


def relu(x):
    return np.maximum(x, 0)


def add(a, b):
    return a.astype(np.float64) + b.astype(np.float64)


def affine(x, gamma, beta):
    """y = x * gamma[k] + beta[k] per channel k of x (N, K, R, C)."""
    return (x.astype(np.float64) * gamma.astype(np.float64)[None, :, None, None]
            + beta.astype(np.float64)[None, :, None, None])


# ------------------------------------------------------------- backward passes
# Each is the adjoint of the forward above written with the same loop
# structure (so that it is obviously the transpose), in float64.

def conv2d_grad_data(dy, w, x_shape, sy, sx, py, px):
    """dx = d sum(dy * conv2d(x, w)) / dx: every tap (a, c) of conv2d read
    xpad[n, k, i*sy + a, j*sx + c] with weight w[f, k, a, c]; add dy back there."""
    dy = dy.astype(np.float64)
    w = w.astype(np.float64)
    n, k, r, c = x_shape
    f, _, nr, nc = w.shape
    ro, co = dy.shape[2], dy.shape[3]
    dxp = np.zeros((n, k, r + 2 * py, c + 2 * px))
    for a in range(nr):
        for cc in range(nc):
            dxp[:, :, a:a + sy * (ro - 1) + 1:sy, cc:cc + sx * (co - 1) + 1:sx] += \
                np.einsum("nfij,fk->nkij", dy, w[:, :, a, cc])
    return dxp[:, :, py:py + r, px:px + c]


def conv2d_grad_params(x, dy, w_shape, sy, sx, py, px):
    """(dw, db): dw[f, k, a, c] = sum_{n,i,j} dy[n, f, i, j] * xpad[n, k, i*sy + a, j*sx + c],
    db[f] = sum of dy[:, f]."""
    x = x.astype(np.float64)
    dy = dy.astype(np.float64)
    n, k, r, c = x.shape
    f, _, nr, nc = w_shape
    ro, co = dy.shape[2], dy.shape[3]
    xp = np.zeros((n, k, r + 2 * py, c + 2 * px))
    xp[:, :, py:py + r, px:px + c] = x
    dw = np.zeros((f, k, nr, nc))
    for a in range(nr):
        for cc in range(nc):
            patch = xp[:, :, a:a + sy * (ro - 1) + 1:sy, cc:cc + sx * (co - 1) + 1:sx]
            dw[:, :, a, cc] = np.einsum("nfij,nkij->fk", dy, patch)
    return dw, dy.sum(axis=(0, 2, 3))


def fc_grad_data(dy, w):
    """dx (N, D) = dy (N, O) @ w (O, D)."""
    return dy.reshape(dy.shape[0], -1).astype(np.float64) @ w.astype(np.float64)


def fc_grad_params(x, dy):
    """(dw (O, D) = dy.T @ x, db (O,) = sum of dy over samples)."""
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    dy = dy.reshape(dy.shape[0], -1).astype(np.float64)
    return dy.T @ x, dy.sum(axis=0)


def pool_grad(x, dy, nr, nc, sy, sx, py, px, how):
    """dx of pool(x, ...): how = "max" gives each output's dy to the first
    largest in-bounds input of its window (row-major), "avg" shares it equally
    among the window's in-bounds inputs; summed over outputs."""
    n, k, r, c = x.shape
    ro, co = dy.shape[2], dy.shape[3]
    dy = dy.astype(np.float64)
    dx = np.zeros((n, k, r, c))
    for i in range(ro):
        for j in range(co):
            r0, c0 = i * sy - py, j * sx - px
            r0, r1, c0, c1 = max(r0, 0), min(r0 + nr, r), max(c0, 0), min(c0 + nc, c)
            if how == "avg":
                dx[:, :, r0:r1, c0:c1] += (dy[:, :, i, j] / ((r1 - r0) * (c1 - c0)))[:, :, None, None]
                continue
            win = x[:, :, r0:r1, c0:c1].reshape(n, k, -1)
            best = win.argmax(axis=2)           # the first largest, row-major
            bi, bj = r0 + best // (c1 - c0), c0 + best % (c1 - c0)
            ni, ki = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
            np.add.at(dx, (ni, ki, bi, bj), dy[:, :, i, j])
    return dx


def pool(x, nr, nc, sy, sx, py, px, how):
    """how = np.max or np.mean over the in-bounds part of each window."""
    n, k, r, c = x.shape
    ro = 1 + (r + 2 * py - nr) // sy
    co = 1 + (c + 2 * px - nc) // sx
    y = np.zeros((n, k, ro, co))
    for i in range(ro):
        for j in range(co):
            r0, c0 = i * sy - py, j * sx - px
            win = x[:, :, max(r0, 0):min(r0 + nr, r), max(c0, 0):min(c0 + nc, c)].astype(np.float64)
            y[:, :, i, j] = how(win, axis=(2, 3))
    return y


def softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def per_unit(x, a, mode):
    """Broadcast a per-channel (conv) or per-unit (fc) array against x."""
    if mode == "conv":
        return a.astype(np.float64)[None, :, None, None]
    return a.astype(np.float64).reshape(1, *x.shape[1:])


# ---------------------------------------------------------------------------- activations
_erfc = np.vectorize(math.erfc, otypes=[np.float64])

# name -> f(x, p) in float64 (p: the activation's parameter)
ACTIVATIONS = {
    "identity": lambda x, p: x,
    "relu": lambda x, p: np.maximum(x, 0),
    "sig": lambda x, p: 1 / (1 + np.exp(-x)),
    "htan": lambda x, p: np.tanh(x),
    "leaky_relu": lambda x, p: np.where(x > 0, x, p * x),
    "prelu": lambda x, p: np.where(x > 0, x, p * x),
    "elu": lambda x, p: np.where(x > 0, x, p * np.expm1(np.minimum(x, 0))),
    "gelu": lambda x, p: 0.5 * x * _erfc(-x / math.sqrt(2)),
    "mish": lambda x, p: x * np.tanh(np.logaddexp(0, x)),
    "silu": lambda x, p: x / (1 + np.exp(-x)),
    "clipped_relu": lambda x, p: np.clip(x, 0, p),
    "smelu": lambda x, p: np.where(x >= p, x, np.where(x <= -p, 0, (x + p) ** 2 / (4 * p))),
}


def activation(x, act):
    """act(x) in float64 for an ops.Act."""
    return ACTIVATIONS[act.name](np.asarray(x, np.float64), float(act.param))


# ---------------------------------------------------------------------------- layers
LAYERS = {}      # layer class -> f(layer, y, env) -> y


def layer_ref(*classes):
    def register(f):
        for cls in classes:
            LAYERS[cls] = f
        return f
    return register


class Env:
    """What a reference layer sees besides its input: the tagged outputs so far, the
    float64 parameter overrides, and whether batch-norm uses batch statistics."""

    def __init__(self, over, train):
        self.tags, self.over, self.train = {}, over or {}, train

    def param(self, layer, name):
        a = self.over.get((id(layer), name))
        if a is not None:
            return a
        v = getattr(layer, name)
        return None if v is None else v.astype(np.float64)


@layer_ref(dnn.con_)
def _con(l, y, env):
    if l.groups > 1 or l.dilation_y > 1 or l.dilation_x > 1:      # the catalogue's section below
        y = conv2d_grouped(y, env.param(l, "filters"), env.param(l, "biases"), l.stride_y,
                           l.stride_x, l.padding_y, l.padding_x, l.dilation_y, l.dilation_x, l.groups)
    else:
        y = conv2d(y, env.param(l, "filters"), env.param(l, "biases"), l.stride_y, l.stride_x,
                   l.padding_y, l.padding_x)
    return activation(y, l.act)


@layer_ref(dnn.fc_)
def _fc(l, y, env):
    return activation(fc(y, env.param(l, "weights"), env.param(l, "biases")), l.act)


def _mode_view(y, mode):
    """(N, units, S) view for per-channel (conv: S = R*C) or per-unit (fc: S = 1) statistics."""
    n = y.shape[0]
    return y.reshape(n, y.shape[1], -1) if mode == "conv" else y.reshape(n, -1, 1)


@layer_ref(dnn.bn_)
def _bn(l, y, env):
    g, b = env.param(l, "gamma"), env.param(l, "beta")
    if env.train:
        v = _mode_view(y, l.mode)
        mean = v.mean(axis=(0, 2), keepdims=True)
        var = ((v - mean) ** 2).mean(axis=(0, 2), keepdims=True)
        return (g[None, :, None] * (v - mean) / np.sqrt(var + l.eps) + b[None, :, None]).reshape(y.shape)
    mean, var = per_unit(y, l.running_mean, l.mode), per_unit(y, l.running_var, l.mode)
    return per_unit(y, g, l.mode) * (y - mean) / np.sqrt(var + l.eps) + per_unit(y, b, l.mode)


@layer_ref(dnn.affine_)
def _affine(l, y, env):
    return per_unit(y, env.param(l, "gamma"), l.mode) * y + per_unit(y, env.param(l, "beta"), l.mode)


@layer_ref(dnn.max_pool_, dnn.avg_pool_)
def _pool(l, y, env):
    nr, nc = (l.nr, l.nc) if l.nr else y.shape[2:]
    py, px = (l.padding_y, l.padding_x) if l.nr else (0, 0)
    return pool(y, nr, nc, l.stride_y, l.stride_x, py, px,
                np.max if isinstance(l, dnn.max_pool_) else np.mean)


@layer_ref(dnn.softmax_)
def _softmax(l, y, env):
    return softmax(y)


@layer_ref(dnn.tag_)
def _tag(l, y, env):
    env.tags[l.id] = y
    return y


@layer_ref(dnn.skip_)
def _skip(l, y, env):
    return env.tags[l.id]


@layer_ref(dnn.add_prev_)
def _add_prev(l, y, env):
    return y + env.tags[l.id]


# ---------------------------------------------------------------------------- losses
LOSSES = {}      # loss class -> f(layer, out (float64), target) -> the mean loss (float)


def loss_ref(*classes):
    def register(f):
        for cls in classes:
            LOSSES[cls] = f
        return f
    return register


@loss_ref(dnn.loss_multiclass_log_)
def _multiclass_log(l, out, target):
    n = out.shape[0]
    z = out.reshape(n, -1)
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(n), np.asarray(target, np.int64)]))


@loss_ref(dnn.loss_mean_squared_)
def _mean_squared(l, out, target):
    n = out.shape[0]
    return float(((out.reshape(n, -1) - np.asarray(target, np.float64).reshape(n, -1)) ** 2).sum() / n)


def loss(layer, out, target):
    """The float64 loss of loss layer ``layer`` for the subnet output ``out``."""
    f = LOSSES.get(type(layer))
    if f is None:
        raise NotImplementedError(f"tests/reference.py has no loss entry for {type(layer).__name__}")
    return f(layer, np.asarray(out, np.float64), target)


@layer_ref(dnn.prelu_)
def _prelu(l, y, env):
    a = float(env.param(l, "alpha")[0])
    return np.where(y > 0, y, a * y)


def _pointwise(l, y, env):
    return activation(y, l.act)


def forward(net, x, over=None, train=False):
    """The output of ``net`` on x computed node by node with the references above (float64).

    Disabled layers are identities (routing layers are never disabled); a loss layer on
    top is skipped (its subnet's output is returned). ``over`` maps (id(layer), name) to
    float64 arrays used instead of the layer's parameters; ``train`` makes batch-norm use
    the batch's statistics.
    """
    env = Env(over, train)
    y = np.asarray(x, np.float64)
    for node in net.chain()[::-1]:
        l = node.layer_details()
        if l.is_input or l.is_loss or (l.disabled and not l.routing):
            continue
        f = LAYERS.get(type(l))
        if f is None and l.pointwise:
            f = _pointwise
        if f is None:
            raise NotImplementedError(f"tests/reference.py has no entry for {type(l).__name__}")
        y = f(l, y, env)
    return y


# ---- convolution family (catalogue) ---------------------------------------------------
def conv2d_grouped(x, w, b, sy, sx, py, px, dy=1, dx=1, groups=1):
    """Direct definition, group by group: for filters f of group g (F/groups each) and the
    input channels k of group g (K/groups each),
    y[n,f,i,j] = sum_{k,a,c} xpad[n,k,i*sy + a*dy, j*sx + c*dx] * w[f,k - g*K/groups,a,c] + b[f]."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    n, k, r, c = x.shape
    f, kg, nr, nc = w.shape
    assert k == kg * groups and f % groups == 0, (x.shape, w.shape, groups)
    fg = f // groups
    xp = np.zeros((n, k, r + 2 * py, c + 2 * px))
    xp[:, :, py:py + r, px:px + c] = x
    ro = 1 + (r + 2 * py - (dy * (nr - 1) + 1)) // sy
    co = 1 + (c + 2 * px - (dx * (nc - 1) + 1)) // sx
    y = np.zeros((n, f, ro, co))
    for g in range(groups):
        xg, wg = xp[:, g * kg:(g + 1) * kg], w[g * fg:(g + 1) * fg]
        for a in range(nr):
            for cc in range(nc):
                patch = xg[:, :, a * dy:a * dy + sy * (ro - 1) + 1:sy, cc * dx:cc * dx + sx * (co - 1) + 1:sx]
                y[:, g * fg:(g + 1) * fg] += np.einsum("nkij,fk->nfij", patch, wg[:, :, a, cc])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def conv2d_grouped_grad_data(dyv, w, x_shape, sy, sx, py, px, dy=1, dx=1, groups=1):
    """The adjoint of conv2d_grouped in x: every tap (a, c) read
    xpad[n, k, i*sy + a*dy, j*sx + c*dx] with weight w[f, k - g K/groups, a, c]; add dy back there."""
    dyv = dyv.astype(np.float64)
    w = w.astype(np.float64)
    n, k, r, c = x_shape
    f, kg, nr, nc = w.shape
    fg = f // groups
    ro, co = dyv.shape[2], dyv.shape[3]
    dxp = np.zeros((n, k, r + 2 * py, c + 2 * px))
    for g in range(groups):
        for a in range(nr):
            for cc in range(nc):
                dxp[:, g * kg:(g + 1) * kg, a * dy:a * dy + sy * (ro - 1) + 1:sy,
                    cc * dx:cc * dx + sx * (co - 1) + 1:sx] += \
                    np.einsum("nfij,fk->nkij", dyv[:, g * fg:(g + 1) * fg], w[g * fg:(g + 1) * fg, :, a, cc])
    return dxp[:, :, py:py + r, px:px + c]


def conv2d_grouped_grad_params(x, dyv, w_shape, sy, sx, py, px, dy=1, dx=1, groups=1):
    """(dw, db) of conv2d_grouped: dw[f, k', a, c] = sum_{n,i,j} dy[n,f,i,j] *
    xpad[n, g K/groups + k', i*sy + a*dy, j*sx + c*dx]; db[f] = sum of dy[:, f]."""
    x = x.astype(np.float64)
    dyv = dyv.astype(np.float64)
    n, k, r, c = x.shape
    f, kg, nr, nc = w_shape
    fg = f // groups
    ro, co = dyv.shape[2], dyv.shape[3]
    xp = np.zeros((n, k, r + 2 * py, c + 2 * px))
    xp[:, :, py:py + r, px:px + c] = x
    dw = np.zeros((f, kg, nr, nc))
    for g in range(groups):
        for a in range(nr):
            for cc in range(nc):
                patch = xp[:, g * kg:(g + 1) * kg, a * dy:a * dy + sy * (ro - 1) + 1:sy,
                           cc * dx:cc * dx + sx * (co - 1) + 1:sx]
                dw[g * fg:(g + 1) * fg, :, a, cc] = np.einsum("nfij,nkij->fk", dyv[:, g * fg:(g + 1) * fg], patch)
    return dw, dyv.sum(axis=(0, 2, 3))


def conv2d_transpose(x, w, b, sy, sx, py, px):
    """dlib's cont_ as its definition, the scatter loop: every input pixel x[n, k, i, j]
    adds x[n, k, i, j] * w[k, :, :, :] to the window of the full output whose corner is
    (i*sy, j*sx); the output is the full one with pad rows/columns cut from each side:
    Ro = sy*(R-1) + nr - 2*py."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    n, k, r, c = x.shape
    _, f, nr, nc = w.shape
    full = np.zeros((n, f, sy * (r - 1) + nr, sx * (c - 1) + nc))
    for i in range(r):
        for j in range(c):
            full[:, :, i * sy:i * sy + nr, j * sx:j * sx + nc] += np.einsum("nk,kfac->nfac", x[:, :, i, j], w)
    ro, co = sy * (r - 1) + nr - 2 * py, sx * (c - 1) + nc - 2 * px
    y = full[:, :, py:py + ro, px:px + co]
    if b is not None:
        y = y + b.astype(np.float64)[None, :, None, None]
    return y


@layer_ref(dnn.cont_)
def _cont(l, y, env):
    y = conv2d_transpose(y, env.param(l, "filters"), env.param(l, "biases"), l.stride_y, l.stride_x,
                         l.padding_y, l.padding_x)
    return activation(y, l.act)


def assert_close(actual, expected, rtol=1e-5):
    """|actual - expected| <= rtol * max(1, |expected|.max()) elementwise: 1e-5 relative to the
    output's scale (fp32 sums of many terms cannot promise more per element)."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * {scale:.3g}"

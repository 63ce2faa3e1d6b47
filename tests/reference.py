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
    t = env.tags[l.id]                   # dlib's tt::add: a missing channel counts as 0
    shape = tuple(max(a, b) for a, b in zip(y.shape, t.shape))
    return _zero_padded(y, shape) + _zero_padded(t, shape)


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
    # dlib's safe_log: -log(max(p, 1e-10))
    return float(np.mean(np.minimum(lse - z[np.arange(n), np.asarray(target, np.int64)],
                                    -np.log(1e-10))))


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


# ---- losses (catalogue)
# Independent float64 definitions of dlib's other losses, written term by term from the
# loops of dlib/dnn/loss.h and dlib/cuda/cpu_dlib.h (one term per sample, pixel or pair, in
# plain Python), sharing no code with minidnn/loss.py. Each takes the raw target a test
# gives (before check_labels).

def _log1pexp(v):
    """log(1 + e^v), dlib's log1pexp."""
    return v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v))


def _neg_log_softmax(z, y):
    """-safe_log(softmax(z)[y]) of a list of scores z: dlib's safe_log(p) = log(max(p, 1e-10))."""
    m = max(z)
    p = math.exp(z[y] - m) / sum(math.exp(v - m) for v in z)
    return -math.log(max(p, 1e-10))


@loss_ref(dnn.loss_binary_log_)
def _binary_log(l, out, target):
    """(1/N) sum |y| log1pexp(-x) for y > 0, |y| (x + log1pexp(-x)) for y < 0."""
    x, y = out.reshape(-1), np.asarray(target, np.float64).reshape(-1)
    n = len(x)
    total = 0.0
    for i in range(n):
        if y[i] > 0:
            total += y[i] * _log1pexp(-x[i])
        else:
            total += -y[i] * (x[i] + _log1pexp(-x[i]))
    return total / n


@loss_ref(dnn.loss_binary_hinge_)
def _binary_hinge(l, out, target):
    x, y = out.reshape(-1), np.asarray(target, np.float64).reshape(-1)
    return sum(max(0.0, 1 - y[i] * x[i]) for i in range(len(x))) / len(x)


@loss_ref(dnn.loss_multibinary_log_)
def _multibinary_log(l, out, target):
    """(1/N) sum_{i,k} |y| t focus, focus = (1 - sigmoid)^gamma (y > 0) or sigmoid^gamma (y < 0)."""
    n = out.shape[0]
    x = out.reshape(n, -1)
    y = np.asarray(target, np.float64).reshape(n, -1)
    total = 0.0
    for i in range(n):
        for k in range(x.shape[1]):
            v = x[i, k]
            s = 1 / (1 + math.exp(-v))
            if y[i, k] > 0:
                total += y[i, k] * _log1pexp(-v) * (1 - s) ** l.gamma
            else:
                total += -y[i, k] * (v + _log1pexp(-v)) * s ** l.gamma
    return total / n


@loss_ref(dnn.loss_multiclass_log_weighted_)
def _multiclass_log_weighted(l, out, target):
    n = out.shape[0]
    z = out.reshape(n, -1)
    return sum(float(target["weight"][i]) * _neg_log_softmax(list(z[i]), int(target["label"][i]))
               for i in range(n)) / n


@loss_ref(dnn.loss_mean_squared_multioutput_)
def _mean_squared_multioutput(l, out, target):
    n = out.shape[0]
    x = out.reshape(n, -1)
    y = np.asarray(target, np.float64).reshape(n, -1)
    return sum((y[i, k] - x[i, k]) ** 2 for i in range(n) for k in range(x.shape[1])) / n


@loss_ref(dnn.loss_multiclass_log_per_pixel_)
def _multiclass_log_per_pixel(l, out, target):
    """Sum over pixels not labelled 65535, divided by N*R*C (every pixel)."""
    n, k, r, c = out.shape
    y = np.asarray(target).reshape(n, r, c)
    total = 0.0
    for i in range(n):
        for a in range(r):
            for b in range(c):
                if int(y[i, a, b]) != 65535:
                    total += _neg_log_softmax(list(out[i, :, a, b]), int(y[i, a, b]))
    return total / (n * r * c)


@loss_ref(dnn.loss_binary_log_per_pixel_)
def _binary_log_per_pixel(l, out, target):
    """As loss_binary_log at each pixel (y = 0: ignored), divided by N*R*C."""
    n, _, r, c = out.shape
    y = np.asarray(target, np.float64).reshape(n, r, c)
    total = 0.0
    for i in range(n):
        for a in range(r):
            for b in range(c):
                v, t = out[i, 0, a, b], y[i, a, b]
                if t > 0:
                    total += t * _log1pexp(-v)
                elif t < 0:
                    total += -t * (v + _log1pexp(-v))
    return total / (n * r * c)


@loss_ref(dnn.loss_mean_squared_per_pixel_)
def _mean_squared_per_pixel(l, out, target):
    """sum (y - x)^2 / (N K R C) (dlib's per_pixel for K = 1, per_channel_and_pixel for K > 1)."""
    y = np.asarray(target, np.float64).reshape(out.shape)
    return sum((a - b) ** 2 for a, b in zip(y.reshape(-1), out.reshape(-1))) / out.size


@loss_ref(dnn.loss_metric_)
def _metric(l, out, target):
    """dlib's loss_metric_: over ordered pairs (r, c), r != c; positives add
    max(0, d - (T - m)), the hardest negatives (d <= the min(P, Q)-th smallest negative
    distance) add max(0, (T + m) - d); all times 0.5 / (P + 0.0001)."""
    n = out.shape[0]
    e = out.reshape(n, -1)
    y = [int(v) for v in np.asarray(target).reshape(-1)]
    dist = [[math.sqrt(sum((e[r, j] - e[c, j]) ** 2 for j in range(e.shape[1]))) for c in range(n)]
            for r in range(n)]
    pos = [(r, c) for r in range(n) for c in range(r + 1, n) if y[r] == y[c]]
    neg = sorted(dist[r][c] for r in range(n) for c in range(r + 1, n) if y[r] != y[c])
    neg_thresh = neg[min(len(pos), len(neg)) - 1]
    t, m = l.distance_threshold, l.margin
    total = 0.0
    for r in range(n):
        for c in range(n):
            if r == c:
                continue
            d = dist[r][c]
            if y[r] == y[c]:
                total += max(0.0, d - (t - m))
            elif d <= neg_thresh:
                total += max(0.0, (t + m) - d)
    return total * 0.5 / (len(pos) + 0.0001)


# ---- tensor and routing layers (catalogue)
def bilinear_matrix(n_in, n_out):
    """W (n_out, n_in) with resized = W @ line: dlib's aligned corners (resize_image): output i
    samples p = i * (n_in - 1) / max(n_out - 1, 1), between floor(p) and the next input."""
    w = np.zeros((n_out, n_in))
    scale = (n_in - 1) / max(n_out - 1, 1)
    for i in range(n_out):
        p = i * scale
        lo = min(int(math.floor(p)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        f = p - lo
        w[i, lo] += 1 - f
        w[i, hi] += f
    return w


def resize_bilinear(x, ro, co):
    x = np.asarray(x, np.float64)
    wy, wx = bilinear_matrix(x.shape[2], ro), bilinear_matrix(x.shape[3], co)
    return np.einsum("ir,nkrc,jc->nkij", wy, x, wx)


def dropout_mask(key, shape, drop_rate):
    """The mask of kernels/cpu/tensor.pyx's dropout_train, written again in NumPy: u_i = the top
    24 bits of splitmix64(key + (i+1) * golden); kept where u_i >= ceil(drop_rate * 2^24)."""
    i = np.arange(1, int(np.prod(shape)) + 1, dtype=np.uint64)
    z = np.full(i.shape, key, np.uint64) + i * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    thr = math.ceil(drop_rate * 16777216.0)
    return ((z >> np.uint64(40)) >= np.uint64(thr)).astype(np.float64).reshape(shape)


@layer_ref(dnn.softmax_all_)
def _softmax_all(l, y, env):
    n = y.shape[0]
    return softmax(y.reshape(n, -1, 1, 1)).reshape(y.shape)


@layer_ref(dnn.l2normalize_)
def _l2normalize(l, y, env):
    n = y.shape[0]
    s = (y.reshape(n, -1) ** 2).sum(axis=1)
    return y / np.sqrt(l.eps + s)[:, None, None, None]


@layer_ref(dnn.multiply_)
def _multiply(l, y, env):
    return l.val * y


@layer_ref(dnn.dropout_)
def _dropout(l, y, env):
    if env.train:        # inverted dropout: the kept values scaled by 1 / (1 - p)
        keep = 0.0 if l.drop_rate >= 1 else 1.0 / (1.0 - l.drop_rate)
        return y * dropout_mask(l.last_key, y.shape, l.drop_rate) * keep
    return y


@layer_ref(dnn.extract_)
def _extract(l, y, env):
    cnt = l.k * l.nr * l.nc
    return y.reshape(y.shape[0], -1)[:, l.offset:l.offset + cnt].reshape(y.shape[0], l.k, l.nr, l.nc)


@layer_ref(dnn.reorg_)
def _reorg(l, y, env):
    n, k, r, c = y.shape
    rs, cs = l.row_stride, l.col_stride
    out = np.zeros((n, k * rs * cs, r // rs, c // cs))
    for dr in range(rs):
        for dc in range(cs):
            j = dr * cs + dc
            out[:, j * k:(j + 1) * k] = y[:, :, dr::rs, dc::cs]
    return out


@layer_ref(dnn.upsample_)
def _upsample(l, y, env):
    return resize_bilinear(y, y.shape[2] * l.scale_y, y.shape[3] * l.scale_x)


@layer_ref(dnn.resize_to_)
def _resize_to(l, y, env):
    return resize_bilinear(y, l.nr, l.nc)


@layer_ref(dnn.resize_prev_to_tagged_)
def _resize_prev_to_tagged(l, y, env):
    t = env.tags[l.id]
    return resize_bilinear(y, t.shape[2], t.shape[3])


def _zero_padded(a, shape):
    out = np.zeros(shape)
    out[:a.shape[0], :a.shape[1], :a.shape[2], :a.shape[3]] = a
    return out


@layer_ref(dnn.mult_prev_)
def _mult_prev(l, y, env):
    t = env.tags[l.id]
    shape = tuple(max(a, b) for a, b in zip(y.shape, t.shape))
    return _zero_padded(y, shape) * _zero_padded(t, shape)


@layer_ref(dnn.scale_)
def _scale(l, y, env):
    return env.tags[l.id] * y            # scales: the input (N, K, 1, 1)


@layer_ref(dnn.scale_prev_)
def _scale_prev(l, y, env):
    return y * env.tags[l.id]            # scales: the tagged output (N, K, 1, 1)


@layer_ref(dnn.concat_)
def _concat(l, y, env):
    return np.concatenate([np.asarray(env.tags[i], np.float64) for i in l.ids], axis=1)


# ---- dlib input layers and losses
# dlib's image arithmetic is float32 SIMD code, not float64 math: these references reproduce
# dlib's source (dlib/image_transforms/interpolation.h, resize_image's optimised overloads;
# dlib/dnn/loss.h, loss_mmod_::to_label) in plain NumPy, so the kernels can be held to it bit
# for bit.
def _dlib_lanes(snc, dnc):
    """dlib's SIMD column loop: for the columns done four at a time, (left, right, lr_frac,
    1 - lr_frac) with the source positions accumulated in float32 lanes; the first column of
    the scalar tail; and x_scale."""
    xs = (snc - 1) / float(max(dnc - 1, 1))
    x = -4 * xs
    lanes = np.array([x, x + xs, x + 2 * xs, x + 3 * xs]).astype(np.float32)
    d = np.float32(4 * xs)
    cols = []
    c = 0
    while True:
        lanes = (lanes + d).astype(np.float32)
        left = lanes.astype(np.int32)                        # truncation, as _mm_cvttps_epi32
        if left[3] + 1 >= snc or c + 3 >= dnc:
            break
        frac = (lanes - left.astype(np.float32)).astype(np.float32)
        cols.extend(zip(left.tolist(), (left + 1).tolist(), frac.tolist(),
                        (np.float32(1) - frac).astype(np.float32).tolist()))
        c += 4
    return cols, c, xs


def dlib_resize(src, dnr, dnc):
    """dlib's resize_image(src, dst) (bilinear) into a dnr x dnc image: float32 planes (the
    tiled pyramid's tt::resize_bilinear), uint8 grayscale (H, W) or uint8 RGB (H, W, 3)."""
    snr, snc = src.shape[:2]
    rgb = src.ndim == 3
    kind = "float" if src.dtype == np.float32 else ("rgb" if rgb else "gray")
    cols, c0, xs = _dlib_lanes(snc, dnc)
    out = np.empty((dnr, dnc) + src.shape[2:], src.dtype)
    ys = (snr - 1) / float(max(dnr - 1, 1))
    y = -ys
    f32 = np.float32
    for r in range(dnr):
        y += ys
        top = int(math.floor(y))
        bottom = min(top + 1, snr - 1)
        tb = y - top
        ftb, fitb = f32(tb), f32(1 - tb)
        for k in range(3 if rgb else 1):
            st = src[top, :, k] if rgb else src[top]
            sb = src[bottom, :, k] if rgb else src[bottom]
            row = out[r, :, k] if rgb else out[r]
            for c, (lo, hi, fr, ifr) in enumerate(cols):
                fr, ifr = f32(fr), f32(ifr)
                v = f32(fitb * ifr) * f32(st[lo])
                v = f32(v + f32(fitb * fr) * f32(st[hi]))
                v = f32(v + f32(ftb * ifr) * f32(sb[lo]))
                v = f32(v + f32(ftb * fr) * f32(sb[hi]))
                if kind == "float":
                    row[c] = v
                elif kind == "rgb":
                    row[c] = int(v)
                else:
                    row[c] = int(float(v) + 0.5)
            x = -xs + c0 * xs
            for c in range(c0, dnc):
                x += xs
                lo = int(math.floor(x))
                hi = min(lo + 1, snc - 1)
                if kind == "rgb":
                    fr = x - lo
                    v = (1 - tb) * ((1 - fr) * float(st[lo]) + fr * float(st[hi])) + \
                        tb * ((1 - fr) * float(sb[lo]) + fr * float(sb[hi]))
                    row[c] = int(v)
                else:
                    fr = f32(x - lo)
                    a = f32(f32(f32(1) - fr) * f32(st[lo]) + f32(fr * f32(st[hi])))
                    b = f32(f32(f32(1) - fr) * f32(sb[lo]) + f32(fr * f32(sb[hi])))
                    v = f32((1 - tb) * float(a) + tb * float(b))
                    row[c] = v if kind == "float" else min(255, max(0, int(v)))
    return out


def dlib_tiled_pyramid(planes, rects):
    """dlib's create_tiled_pyramid inside a tensor: each rects[i], i >= 1, of every plane of
    ``planes`` (a float32 (N, K, R, C) copy, level 0 already at rects[0]) from rects[i-1]."""
    out = planes.copy()
    for n in range(out.shape[0]):
        for k in range(out.shape[1]):
            for (l0, t0, r0, b0), (l1, t1, r1, b1) in zip(rects, rects[1:]):
                out[n, k, t1:b1 + 1, l1:r1 + 1] = dlib_resize(
                    np.ascontiguousarray(out[n, k, t0:b0 + 1, l0:r0 + 1]), b1 - t1 + 1, r1 - l1 + 1)
    return out


def mmod_detections(out, windows, iou, covered, adjust, to_input, to_image, bbr=False):
    """dlib's loss_mmod_::to_label for one sample's output (K, R, C): windows [(w, h, label)],
    overlaps_nms (iou, covered), to_input(c, r) -> (x, y) in the input tensor, to_image(drect)
    -> drect in the image. Returns [(rect, score, label)], best first."""
    def lround(v):
        return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))

    def area(a):
        return 0 if a[0] > a[2] or a[1] > a[3] else (a[2] - a[0] + 1) * (a[3] - a[1] + 1)

    def overlaps(a, b):
        inner = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
        if inner == 0:
            return False
        outer = area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
        return inner / outer > iou or inner / area(a) > covered or inner / area(b) > covered

    nw = len(windows)
    dets = []
    for k in range(nw):
        for r in range(out.shape[1]):
            for c in range(out.shape[2]):
                s = float(out[k, r, c])
                if not s > adjust:
                    continue
                x, y = to_input(c, r)
                w, h = windows[k][0] - 1, windows[k][1] - 1
                d = to_image((x - w / 2, y - h / 2, x + w / 2, y + h / 2))
                box = tuple(float(lround(v)) for v in d)
                if bbr:
                    dx, dy, dw, dh = (float(out[nw + 4 * k + j, r, c]) for j in range(4))
                    bw, bh = d[2] - d[0], d[3] - d[1]
                    m = (d[0] + dx * bw, d[1] + dy * bh, d[2] + dx * bw, d[3] + dy * bh)
                    cx, cy = (m[0] + m[2]) / 2, (m[1] + m[3]) / 2
                    nw2, nh2 = bw * math.exp(dw) + 1 - 1, bh * math.exp(dh) + 1 - 1
                    box = (cx - nw2 / 2, cy - nh2 / 2, cx + nw2 / 2, cy + nh2 / 2)
                dets.append((s, tuple(lround(v) for v in box), windows[k][2]))
    dets.sort(key=lambda d: -d[0])
    kept = []
    for s, rect, label in dets:
        if not any(overlaps(k[0], rect) for k in kept):
            kept.append((rect, s, label))
    return kept


@loss_ref(dnn.loss_mmod_)
def _loss_mmod(l, out, target):
    raise NotImplementedError("loss_mmod_ trains in dlib only: minidnn runs dlib's detectors at "
                              "inference (their reference is mmod_detections)")

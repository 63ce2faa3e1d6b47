"""Slow, obviously-correct NumPy references for every primitive, and a whole
network evaluator built only from them (it shares no code with the runtime's
Program or backends: it walks the nodes itself).

Computed in float64 so that the reference is the exact side of a comparison.
"""
import numpy as np

import minidnn as dnn


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


def forward(net, x):
    """The output of ``net`` on x computed node by node with the references above.

    Disabled layers are identities; a con_/fc_ with ``fused_relu`` applies relu.
    Returns float64.
    """
    nodes = net.chain()[::-1]
    tags = {}
    y = x.astype(np.float64)
    for node in nodes:
        l = node.layer_details()
        if isinstance(l, dnn.input_tensor_):
            continue
        if isinstance(l, dnn.tag_):
            tags[l.id] = y
            continue
        if isinstance(l, dnn.skip_):
            y = tags[l.id]
            continue
        if isinstance(l, dnn.add_prev_):
            y = y + tags[l.id]
            continue
        if l.disabled:
            continue
        if isinstance(l, dnn.con_):
            y = conv2d(y, l.filters, l.biases, l.stride_y, l.stride_x, l.padding_y, l.padding_x)
            if l.fused_relu:
                y = relu(y)
        elif isinstance(l, dnn.fc_):
            y = fc(y, l.weights, l.biases)
            if l.fused_relu:
                y = relu(y)
        elif isinstance(l, dnn.relu_):
            y = relu(y)
        elif isinstance(l, dnn.bn_):
            mean, var = per_unit(y, l.running_mean, l.mode), per_unit(y, l.running_var, l.mode)
            y = per_unit(y, l.gamma, l.mode) * (y - mean) / np.sqrt(var + l.eps) + per_unit(y, l.beta, l.mode)
        elif isinstance(l, dnn.affine_):
            y = per_unit(y, l.gamma, l.mode) * y + per_unit(y, l.beta, l.mode)
        elif isinstance(l, (dnn.max_pool_, dnn.avg_pool_)):
            nr, nc = (l.nr, l.nc) if l.nr else y.shape[2:]
            py, px = (l.padding_y, l.padding_x) if l.nr else (0, 0)
            y = pool(y, nr, nc, l.stride_y, l.stride_x, py, px,
                     np.max if isinstance(l, dnn.max_pool_) else np.mean)
        elif isinstance(l, dnn.softmax_):
            y = softmax(y)
        elif isinstance(l, dnn.loss_multiclass_log_):
            continue
        else:
            raise NotImplementedError(type(l).__name__)
    return y


def assert_close(actual, expected, rtol=1e-5):
    """|actual - expected| <= rtol * max(1, |expected|.max()) elementwise: 1e-5 relative to the
    output's scale (fp32 sums of many terms cannot promise more per element)."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * {scale:.3g}"

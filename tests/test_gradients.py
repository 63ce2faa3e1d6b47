"""Numerical gradient checks for every layer's backward (dlib's test_layer idea).

For each network the analytic gradients of the runtime (its training forward
and the Cython backward kernels, float32) are compared with central
differences of an independent float64 reference of the training-mode forward
(built on tests/reference.py: batch-norm uses the batch's statistics). The
reference being float64, a step of 1e-6 gives derivatives exact to ~1e-9, so
the comparison measures only the float32 rounding of the kernels. The
runtime's training forward itself is checked against the same reference.

The objective is sum(W * output) for a fixed random W (any layer on top), or
the network's loss when it has one.
"""
import numpy as np
import pytest

import minidnn as dnn
from minidnn.train import _Tape

import reference as R

EPS = 1e-6
MAX_COORDS = 160       # coordinates checked per tensor (all of them when fewer)


# ------------------------------------------------------------------ reference
def _mode_view(y, mode):
    """(N, units, S) view for per-channel (conv: S = R*C) or per-unit (fc: S = 1) statistics."""
    n = y.shape[0]
    return y.reshape(n, y.shape[1], -1) if mode == "conv" else y.reshape(n, -1, 1)


def ref_train_forward(net, x, over):
    """float64 training-mode forward of ``net`` (without its loss layer) on x; ``over`` maps
    (id(layer), name) to float64 arrays that replace the layer's parameters."""
    nodes = net.chain()[::-1]
    tags = {}
    y = x.astype(np.float64)

    for node in nodes:
        l = node.layer_details()

        def P(name):
            a = over.get((id(l), name))
            return a if a is not None else getattr(l, name).astype(np.float64)

        if isinstance(l, (dnn.input_tensor_, dnn.loss_multiclass_log_, dnn.loss_mean_squared_)):
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
            y = R.conv2d(y, P("filters"), None if l.biases is None else P("biases"),
                         l.stride_y, l.stride_x, l.padding_y, l.padding_x)
            y = R.relu(y) if l.fused_relu else y
        elif isinstance(l, dnn.fc_):
            y = R.fc(y, P("weights"), None if l.biases is None else P("biases"))
            y = R.relu(y) if l.fused_relu else y
        elif isinstance(l, dnn.relu_):
            y = R.relu(y)
        elif isinstance(l, dnn.bn_):
            v = _mode_view(y, l.mode)
            mean = v.mean(axis=(0, 2), keepdims=True)
            var = ((v - mean) ** 2).mean(axis=(0, 2), keepdims=True)
            g, b = P("gamma")[None, :, None], P("beta")[None, :, None]
            y = (g * (v - mean) / np.sqrt(var + l.eps) + b).reshape(y.shape)
        elif isinstance(l, dnn.affine_):
            v = _mode_view(y, l.mode)
            y = (P("gamma")[None, :, None] * v + P("beta")[None, :, None]).reshape(y.shape)
        elif isinstance(l, (dnn.max_pool_, dnn.avg_pool_)):
            nr, nc = (l.nr, l.nc) if l.nr else y.shape[2:]
            py, px = (l.padding_y, l.padding_x) if l.nr else (0, 0)
            y = R.pool(y, nr, nc, l.stride_y, l.stride_x, py, px,
                       np.max if isinstance(l, dnn.max_pool_) else np.mean)
        elif isinstance(l, dnn.softmax_):
            y = R.softmax(y)
        else:
            raise NotImplementedError(type(l).__name__)
    return y


def ref_objective(net, x, over, target):
    out = ref_train_forward(net, x, over)
    top = net.layer_details()
    n = out.shape[0]
    if isinstance(top, dnn.loss_multiclass_log_):
        z = out.reshape(n, -1)
        m = z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
        return float(np.mean(lse - z[np.arange(n), target]))
    if isinstance(top, dnn.loss_mean_squared_):
        return float(((out.reshape(n, -1) - target.reshape(n, -1)) ** 2).sum() / n)
    return float((out * target).sum())


def numerical(f, a, rng):
    """Central differences of f() with respect to some coordinates of float64 array a
    (modified in place and restored). Returns (flat indices, derivatives)."""
    flat = a.reshape(-1)
    idx = np.arange(flat.size)
    if flat.size > MAX_COORDS:
        idx = np.sort(rng.choice(flat.size, MAX_COORDS, replace=False))
    d = np.empty(idx.size)
    for t, i in enumerate(idx):
        v = flat[i]
        flat[i] = v + EPS
        fp = f()
        flat[i] = v - EPS
        fm = f()
        flat[i] = v
        d[t] = (fp - fm) / (2 * EPS)
    return idx, d


def check_gradients(net, x, target=None, seed=0, rtol=2e-4):
    """Compare the runtime's gradients (input and every parameter) with numerical ones."""
    rng = np.random.default_rng(seed)
    below = net.subnet() if isinstance(net.layer_details(), (dnn.loss_multiclass_log_,
                                                             dnn.loss_mean_squared_)) else net
    out = below.forward(x)                    # setup: parameters exist
    top = net.layer_details()
    is_loss = below is not net
    if target is None:
        target = rng.standard_normal(out.shape)
    # the runtime: training forward + backward
    tape = _Tape(net, input_grad=True)
    y = tape.forward(x, update_stats=False)
    R.assert_close(y, ref_train_forward(net, x, {}))      # the training forward is right too
    if is_loss:
        dout = np.empty(y.shape, np.float32)
        t = target.astype(np.int64) if isinstance(top, dnn.loss_multiclass_log_) else \
            np.ascontiguousarray(target, np.float32)
        loss = top.loss_and_grad(y, t, dout)
        assert abs(loss - ref_objective(net, x, {}, target)) <= 1e-5 * max(1.0, abs(loss))
    else:
        dout = target.astype(np.float32)
    dx = tape.backward(dout)
    checked = 0
    # input
    x64 = x.astype(np.float64)
    idx, num = numerical(lambda: ref_objective(net, x64, {}, target), x64, rng)
    _compare("input", dx.reshape(-1)[idx], num, rtol)
    checked += 1
    # parameters
    for ctx in tape.ctxs:
        l = ctx.layer
        if l.disabled:
            continue
        for name in l.params:
            p = getattr(l, name)
            if p is None:
                continue
            p64 = p.astype(np.float64)
            over = {(id(l), name): p64}
            idx, num = numerical(lambda: ref_objective(net, x, over, target), p64, rng)
            _compare(f"layer<{ctx.index}> {l.kind} {name}", ctx.grads[name].reshape(-1)[idx], num, rtol)
            checked += 1
    return checked


def _compare(what, analytic, num, rtol):
    scale = max(1.0, float(np.abs(num).max()))
    err = float(np.abs(analytic.astype(np.float64) - num).max())
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


def _x(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _randomize(net, seed=3):
    """Non-trivial gamma/beta (bn, affine) and biases."""
    rng = np.random.default_rng(seed)
    for n in net.chain():
        l = n.layer_details()
        for name in ("gamma", "beta", "biases"):
            a = getattr(l, name, None)
            if a is not None:
                a[...] = rng.uniform(0.5, 1.5, a.shape) if name == "gamma" else rng.normal(0, 0.5, a.shape)
    return net


def _check(net, x, **kw):
    net.subnet().forward(x) if isinstance(net.layer_details(), (dnn.loss_multiclass_log_,
                                                                 dnn.loss_mean_squared_)) else net.forward(x)
    _randomize(net)
    assert check_gradients(net, x, **kw) >= 1


# ------------------------------------------------------------------ the layers
inp = dnn.input_tensor


@pytest.mark.parametrize("shape,args,kw", [
    ((2, 2, 7, 6), (3, 3, 3, 1, 1), {}),                                   # same padding
    ((3, 3, 9, 8), (4, 5, 3, 2, 3), {"padding_y": 1, "padding_x": 2}),     # odd strides, padding
    ((2, 3, 5, 7), (2, 1, 1, 1, 1), {}),                                   # 1x1: the direct path
    ((2, 2, 6, 5), (3, 2, 4, 3, 1), {"bias": False}),                      # no bias, stride 3x1
    ((1, 1, 4, 4), (2, 4, 4, 1, 1), {"padding_y": 0, "padding_x": 0}),     # window = input
])
def test_con(shape, args, kw):
    _check(dnn.con(*args, inp(), **kw), _x(shape))


def test_con_fused_relu():
    net = dnn.con(3, 3, 3, 2, 1, inp(), padding_y=1, padding_x=1)
    net.forward(_x((2, 2, 7, 5)))
    net.layer_details().fused_relu = True
    _check(net, _x((2, 2, 7, 5)))


def test_con_many_samples_threads():
    """Enough work for the multi-threaded partial sums of the filter gradient."""
    _check(dnn.con(8, 3, 3, 1, 1, inp()), _x((16, 4, 12, 11)))


@pytest.mark.parametrize("shape,kw", [((3, 2, 3, 4), {}), ((4, 7, 1, 1), {"bias": False}),
                                      ((1, 3, 2, 5), {})])
def test_fc(shape, kw):
    _check(dnn.fc(5, inp(), **kw), _x(shape))


def test_fc_fused_relu():
    net = dnn.fc(6, inp())
    net.forward(_x((5, 2, 3, 3)))
    net.layer_details().fused_relu = True
    _check(net, _x((5, 2, 3, 3)))


def test_fc_large():
    _check(dnn.fc(40, inp()), _x((64, 8, 4, 4)))


def test_relu():
    _check(dnn.relu(dnn.con(3, 3, 3, 1, 1, inp())), _x((2, 2, 5, 7)))


@pytest.mark.parametrize("shape", [(4, 3, 5, 3), (2, 2, 1, 7), (7, 1, 2, 2)])
def test_bn_con_training(shape):
    _check(dnn.bn_con(dnn.con(3, 3, 3, 1, 1, inp())), _x(shape))


@pytest.mark.parametrize("shape", [(5, 2, 3, 1), (3, 4, 2, 2)])
def test_bn_fc_training_per_unit(shape):
    _check(dnn.bn_fc(inp()), _x(shape))


def test_bn_fc_after_fc():
    _check(dnn.relu(dnn.bn_fc(dnn.fc(6, inp()))), _x((6, 2, 3, 3)))


@pytest.mark.parametrize("mode_net", ["conv", "fc"])
def test_affine(mode_net):
    if mode_net == "conv":
        net, x = dnn.affine(dnn.con(3, 3, 3, 1, 1, inp())), _x((2, 2, 5, 4))
    else:
        net, x = dnn.affine(dnn.fc(5, inp())), _x((3, 2, 2, 3))
    assert net.layer_details().mode == mode_net
    _check(net, x)


@pytest.mark.parametrize("pool", [dnn.max_pool, dnn.avg_pool])
@pytest.mark.parametrize("args,kw,shape", [
    ((2, 2, 2, 2), {}, (2, 3, 6, 6)),
    ((3, 3, 2, 2), {"padding_y": 1, "padding_x": 1}, (2, 2, 7, 8)),     # padded, overlapping
    ((2, 3, 1, 2), {}, (1, 2, 5, 7)),                                   # odd window and strides
    ((3, 2, 3, 1), {"padding_y": 2, "padding_x": 1}, (2, 1, 7, 5)),
])
def test_pools(pool, args, kw, shape):
    _check(pool(*args, inp(), **kw), _x(shape))


def test_avg_pool_everything():
    _check(dnn.avg_pool_everything(dnn.con(4, 3, 3, 1, 1, inp())), _x((3, 2, 5, 7)))


def test_softmax():
    _check(dnn.softmax(inp()), _x((3, 4, 2, 3)))
    _check(dnn.softmax(dnn.fc(5, inp())), _x((4, 3, 2, 2)))


def test_add_prev_and_tags():
    """A residual block: the gradient reaches tag1 through both paths."""
    def net():
        return dnn.relu(dnn.add_prev1(dnn.bn_con(dnn.con(3, 3, 3, 1, 1, dnn.relu(dnn.bn_con(
            dnn.con(3, 3, 3, 1, 1, dnn.tag1(dnn.con(3, 3, 3, 1, 1, inp())))))))))
    _check(net(), _x((3, 2, 5, 6)))


def test_skip_and_nested_tags():
    """try.py's downsampling block: skip1 jumps back to tag1, add_prev2 adds tag2's output."""
    def block(k, s, sub):
        return dnn.relu(dnn.add_prev2(dnn.bn_con(dnn.con(k, 3, 3, 1, 1, dnn.relu(dnn.bn_con(
            dnn.con(k, 3, 3, s, s, dnn.skip1(dnn.tag2(dnn.bn_con(dnn.con(k, 1, 1, s, s,
                    dnn.tag1(sub))))), padding_y=1, padding_x=1)))))))
    _check(dnn.fc(3, dnn.avg_pool_everything(block(4, 2, dnn.relu(dnn.con(3, 3, 3, 1, 1, inp()))))),
           _x((2, 2, 7, 7)))


def test_skip_leaves_unused_branch_with_zero_gradient():
    """Layers whose output a skip discards get zero parameter gradients."""
    net = dnn.fc(2, dnn.skip1(dnn.con(3, 3, 3, 1, 1, dnn.tag1(dnn.con(2, 3, 3, 1, 1, inp())))))
    x = _x((2, 1, 4, 4))
    net.forward(x)
    _check(net, x)
    tape = _Tape(net, input_grad=True)
    tape.forward(x, update_stats=False)
    tape.backward(np.ones((2, 2, 1, 1), np.float32))
    unused = tape.ctxs[2]
    assert isinstance(unused.layer, dnn.con_) and unused.layer.num_filters == 3
    assert not unused.grads["filters"].any() and not unused.grads["biases"].any()


def test_disabled_layers_are_identities():
    net = dnn.relu(dnn.affine(dnn.con(3, 3, 3, 1, 1, inp())))
    x = _x((2, 2, 5, 5))
    net.forward(x)
    dnn.fuse(net)          # the affine folded and disabled, the relu became con's epilogue
    _check(net, x)


# ------------------------------------------------------------------ losses
def test_loss_multiclass_log():
    net = dnn.loss_multiclass_log(dnn.fc(4, dnn.relu(dnn.bn_con(dnn.con(3, 3, 3, 2, 2, inp())))))
    x = _x((5, 2, 7, 6))
    _check(net, x, target=np.array([0, 3, 1, 2, 3]))


def test_loss_mean_squared():
    net = dnn.loss_mean_squared(dnn.fc(3, dnn.relu(dnn.con(2, 3, 3, 1, 1, inp()))))
    x = _x((4, 1, 5, 5))
    _check(net, x, target=np.random.default_rng(2).standard_normal((4, 3)))


def test_loss_mean_squared_single_output():
    net = dnn.loss_mean_squared(dnn.fc(1, inp()))
    _check(net, _x((6, 2, 2, 2)), target=np.random.default_rng(2).standard_normal(6))

"""One test harness for every layer and backend.

- ``check_gradients(net, x, target)``: the runtime's training forward and backward
  (input gradient and every parameter's) against central differences of the float64
  reference (tests/reference.py, ``train=True``).
- ``check_forward(net, x, device)``: the compiled forward on a device against the
  reference, unfused and fused, and after a save/load round trip.
The ``device`` fixture (conftest.py) runs a test on "cpu" and, under ``--gpu``, "cuda".
"""
import io

import numpy as np

import minidnn as dnn
from minidnn.train import Tape as _Tape

import reference as R

EPS = 1e-6
MAX_COORDS = 160       # coordinates checked per tensor (all of them when fewer)


def ref_objective(net, x, over, target):
    """The float64 objective: the loss on top (tests/reference.py's LOSSES), or
    sum(output * target) for a net without one."""
    out = R.forward(net, x, over, train=True)
    top = net.layer_details()
    if top.is_loss:
        return R.loss(top, out, target)
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
    below = net.subnet() if net.layer_details().is_loss else net
    out = below.forward(x)                    # setup: parameters exist
    top = net.layer_details()
    is_loss = below is not net
    if target is None:
        target = rng.standard_normal(out.shape)
    # the runtime: training forward + backward
    tape = _Tape(net, input_grad=True)
    y = tape.forward(x, update_stats=False)
    R.assert_close(y, R.forward(net, x, {}, train=True))   # the training forward is right too
    if is_loss:
        dout = np.empty(y.shape, np.float32)
        t = top.check_labels(target, y.shape[0], y.shape)
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




def randomize(net, seed=3):
    """Non-trivial gamma/beta (bn, affine), biases and batch-norm statistics, in place."""
    rng = np.random.default_rng(seed)
    for n in net.chain():
        l = n.layer_details()
        for name in tuple(l.params) + tuple(l.state):
            a = getattr(l, name)
            if a is None or name not in ("gamma", "beta", "biases", "running_mean", "running_var"):
                continue
            if name in ("gamma", "running_var"):
                a[...] = rng.uniform(0.5, 1.5, a.shape)
            else:
                a[...] = rng.normal(0, 0.5, a.shape)
    return net


def forward_on(net, x, device):
    """net.forward(x) with the net moved to ``device`` (and back to the CPU afterwards)."""
    if device == "cpu":
        return net.forward(x)
    net.to(device)
    try:
        return net.forward(x)
    finally:
        net.to("cpu")


def check_forward(net, x, device="cpu", rtol=1e-5, fuse=True, reload=True):
    """The output of ``net`` on ``device`` matches the float64 reference; so does the fused
    net (within 1e-5 of the unfused output) and the net loaded back from its own file."""
    below = net.subnet() if net.layer_details().is_loss else net
    y = forward_on(below, x, device)
    ref = R.forward(net, x)
    R.assert_close(y, ref, rtol)
    if reload:
        buf = io.BytesIO()
        dnn.serialize(net, buf)
        buf.seek(0)
        loaded = dnn.deserialize(buf)
        lb = loaded.subnet() if loaded.layer_details().is_loss else loaded
        np.testing.assert_array_equal(forward_on(lb, x, "cpu"), below.forward(x))
    if fuse:
        dnn.fuse(net)
        yf = forward_on(below, x, device)
        R.assert_close(yf, ref, rtol)
    return y

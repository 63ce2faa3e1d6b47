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

from harness import check_gradients, numerical  # noqa: F401  (the one gradient checker)


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
    net.subnet().forward(x) if net.layer_details().is_loss else net.forward(x)
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

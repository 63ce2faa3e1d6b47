"""Whole networks through the public API, against the NumPy reference (tests/reference.py)."""
import numpy as np
import pytest

import minidnn as dnn
from minidnn import nets
import reference as R

RNG = np.random.default_rng(1234)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def randomize_bn(net, rng=RNG):
    """Give every bn_/affine_ non-trivial parameters (gamma far from 1)."""
    for n in net.chain():
        l = n.layer_details()
        if isinstance(l, dnn.bn_):
            k = l.gamma.shape[0]
            l.gamma[:] = rng.uniform(0.2, 3.0, k) * rng.choice([-1, 1], k)
            l.beta[:] = rng.standard_normal(k)
            l.running_mean[:] = rng.standard_normal(k)
            l.running_var[:] = rng.uniform(0.3, 2.5, k)
        elif isinstance(l, dnn.affine_) and l.gamma is not None:
            l.gamma[:] = rng.uniform(0.2, 3.0, l.gamma.shape[0])
            l.beta[:] = rng.standard_normal(l.beta.shape[0])
    return net


def check(net, x):
    out = net.forward(x)
    R.assert_close(out, R.forward(net, x))
    return out


# ---------------------------------------------------------------------------- each layer
CONV_CASES = [
    # (N, K, R, C, F, nr, nc, sy, sx, py, px)
    (1, 1, 7, 7, 1, 1, 1, 1, 1, 0, 0),
    (2, 3, 9, 11, 5, 3, 3, 1, 1, 1, 1),
    (3, 2, 10, 7, 4, 5, 3, 2, 1, 2, 0),
    (1, 4, 13, 13, 3, 3, 5, 3, 2, 1, 2),
    (2, 5, 8, 9, 6, 4, 2, 2, 3, 0, 1),
    (1, 3, 5, 5, 2, 5, 5, 1, 1, 0, 0),      # window == input
    (4, 7, 6, 6, 9, 1, 1, 2, 2, 0, 0),      # 1x1 stride 2 projection
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_con(case, bias):
    n, k, r, c, f, nr, nc, sy, sx, py, px = case
    net = dnn.con(f, nr, nc, sy, sx, dnn.input_tensor(), padding_y=py, padding_x=px, bias=bias)
    x = rand(n, k, r, c)
    net.forward(x)
    l = net.layer_details()
    assert l.filters.shape == (f, k, nr, nc)
    assert (l.biases is None) == (not bias)
    if bias:
        l.biases[:] = rand(f)              # written parameters are what the next forward uses
    out = check(net, x)
    assert out.shape == (n, f, 1 + (r + 2 * py - nr) // sy, 1 + (c + 2 * px - nc) // sx)


def test_con_default_padding_is_dlibs_rule():
    assert dnn.con(4, 5, 3, 1, 1, dnn.input_tensor()).layer_details().padding_y == 2
    assert dnn.con(4, 5, 3, 1, 1, dnn.input_tensor()).layer_details().padding_x == 1
    l = dnn.con(4, 5, 3, 2, 1, dnn.input_tensor()).layer_details()
    assert (l.padding_y, l.padding_x) == (0, 1)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 4, 5), (5, 1, 7, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_fc(shape, bias):
    net = dnn.fc(7, dnn.input_tensor(), bias=bias)
    x = rand(*shape)
    net.forward(x)
    assert net.layer_details().weights.shape == (7, int(np.prod(shape[1:])))
    if bias:
        net.layer_details().biases[:] = rand(7)
    assert check(net, x).shape == (shape[0], 7, 1, 1)


@pytest.mark.parametrize("make", [dnn.relu, dnn.softmax, dnn.bn_con, dnn.bn_fc, dnn.affine])
@pytest.mark.parametrize("shape", [(1, 3, 5, 4), (3, 6, 7, 7), (2, 1, 1, 9)])
def test_elementwise_and_norm(make, shape):
    net = make(dnn.input_tensor())
    x = rand(*shape)
    net.forward(x)
    randomize_bn(net)
    check(net, x)


def test_affine_mode_follows_the_layer_below():
    assert dnn.affine(dnn.con(3, 3, 3, 1, 1, dnn.input_tensor())).layer_details().mode == "conv"
    assert dnn.affine(dnn.relu(dnn.fc(3, dnn.input_tensor()))).layer_details().mode == "fc"
    assert dnn.affine(dnn.bn_fc(dnn.input_tensor())).layer_details().mode == "fc"
    net = dnn.affine(dnn.bn_fc(dnn.con(3, 3, 3, 1, 1, dnn.input_tensor())))
    x = rand(2, 2, 5, 5)
    net.forward(x)
    assert net.layer_details().gamma.shape == (3 * 5 * 5,)
    randomize_bn(net)
    check(net, x)


POOL_CASES = [
    # (N, K, R, C, nr, nc, sy, sx, py, px)
    (1, 1, 4, 4, 2, 2, 2, 2, 0, 0),
    (2, 3, 9, 7, 3, 3, 2, 2, 1, 1),
    (1, 2, 8, 11, 3, 2, 1, 3, 2, 1),
    (3, 4, 5, 5, 5, 5, 1, 1, 0, 0),
    (2, 2, 10, 9, 4, 3, 3, 2, 3, 2),
]


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("make", [dnn.max_pool, dnn.avg_pool])
def test_pool(case, make):
    n, k, r, c, nr, nc, sy, sx, py, px = case
    net = make(nr, nc, sy, sx, dnn.input_tensor(), padding_y=py, padding_x=px)
    x = rand(n, k, r, c) - 2.0          # all-negative areas catch "padding counted as 0"
    out = check(net, x)
    assert out.shape == (n, k, 1 + (r + 2 * py - nr) // sy, 1 + (c + 2 * px - nc) // sx)


def test_avg_pool_everything():
    x = rand(3, 4, 5, 6)
    out = check(dnn.avg_pool_everything(dnn.input_tensor()), x)
    assert out.shape == (3, 4, 1, 1)
    np.testing.assert_allclose(out[..., 0, 0], x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_tag_skip_add_prev():
    inp = dnn.input_tensor()
    net = dnn.add_prev1(dnn.con(3, 3, 3, 1, 1, dnn.skip2(dnn.tag1(dnn.relu(dnn.tag2(inp))))))
    x = rand(2, 3, 6, 6)
    out = check(net, x)
    l = net.subnet().layer_details()
    ref = R.conv2d(x, l.filters, l.biases, 1, 1, 1, 1) + np.maximum(x, 0)
    R.assert_close(out, ref)
    # skip and tag outputs are the outputs of the right nodes
    np.testing.assert_array_equal(dnn.layer(net, 2).get_output(), x)
    np.testing.assert_array_equal(dnn.layer(net, dnn.tag1).get_output(), np.maximum(x, 0))


def test_nested_tags_use_the_nearest_below():
    inp = dnn.input_tensor()
    net = dnn.add_prev1(dnn.tag1(dnn.relu(dnn.tag1(inp))))
    x = rand(1, 2, 3, 3)
    np.testing.assert_allclose(net.forward(x), 2 * np.maximum(x, 0))


# ---------------------------------------------------------------------------- whole networks
def cifar_resnet(widths=(32, 64, 128), blocks=2, classes=10):
    """The CIFAR-style ResNet of minidnn.nets (basic blocks, tag/skip/add_prev shortcuts,
    1x1 stride-2 projections) with a loss on top."""
    return dnn.loss_multiclass_log(nets.cifar_resnet(widths, blocks, classes))


def test_cifar_resnet_matches_reference():
    net = cifar_resnet(widths=(8, 16, 32))
    x = rand(2, 3, 32, 32)
    net.forward(x)
    randomize_bn(net)
    out = check(net, x)
    assert out.shape == (2, 10, 1, 1)
    labels = net(x)
    assert labels.dtype == np.int64 and labels.shape == (2,)
    np.testing.assert_array_equal(labels, R.forward(net, x).reshape(2, 10).argmax(1))


def test_full_width_cifar_resnet_batch1():
    net = cifar_resnet()
    x = rand(1, 3, 32, 32)
    net.forward(x)
    randomize_bn(net)
    check(net, x)


def test_lenet_with_pools_and_bn_fc():
    net = dnn.loss_multiclass_log(dnn.fc(10, dnn.relu(dnn.bn_fc(dnn.fc(32, dnn.max_pool(2, 2, 2, 2,
        dnn.relu(dnn.bn_con(dnn.con(6, 5, 5, 1, 1, dnn.input_tensor(), padding_y=0, padding_x=0)))))))))
    for n in (1, 5):
        x = rand(n, 1, 28, 28)
        net.forward(x)
        randomize_bn(net)
        check(net, x)


def test_batch_size_can_change_and_outputs_are_independent_copies():
    net = dnn.fc(3, dnn.relu(dnn.con(4, 3, 3, 1, 1, dnn.input_tensor())))
    a, b = rand(1, 2, 5, 5), rand(4, 2, 5, 5)
    ya = net.forward(a)
    yb = net.forward(b)
    np.testing.assert_array_equal(net.forward(a), ya)   # ya was not overwritten by later calls
    assert yb.shape == (4, 3, 1, 1)
    check(net, b)


def test_node_forward_runs_up_to_that_node():
    net = dnn.fc(3, dnn.relu(dnn.con(4, 3, 3, 1, 1, dnn.input_tensor())))
    x = rand(2, 2, 5, 5)
    net.forward(x)
    mid = dnn.layer(net, 2)
    assert isinstance(mid.layer_details(), dnn.con_)
    np.testing.assert_allclose(mid.forward(x), R.forward(mid, x), rtol=1e-5, atol=1e-5)
    assert mid.subnet() is dnn.layer(net, 3)


# ---------------------------------------------------------------------------- API details
def test_print_lists_layers_like_dlib():
    net = dnn.loss_multiclass_log(dnn.fc(10, dnn.relu(dnn.con(16, 5, 5, 1, 1, dnn.input_tensor()))))
    s = str(net).splitlines()
    assert s[0].startswith("layer<0>    loss_multiclass_log")
    assert s[1] == "layer<1>    fc       (num_outputs=10)"
    assert s[3].startswith("layer<3>    con      (num_filters=16, nr=5, nc=5, stride_y=1, stride_x=1, "
                           "padding_y=2, padding_x=2)")
    assert s[4] == "layer<4>    input_tensor"
    net(rand(2, 1, 8, 8))
    s = str(net).splitlines()
    assert s[1].endswith("-> (2, 10, 1, 1)") and s[3].endswith("-> (2, 16, 8, 8)")
    dnn.layer(net, 2).layer_details().disable()
    assert "(disabled)" in str(net).splitlines()[2]


def test_layer_visit_and_count():
    net = dnn.fc(10, dnn.relu(dnn.tag1(dnn.con(16, 5, 5, 1, 1, dnn.input_tensor()))))
    assert dnn.layer(net, 0) is net
    assert isinstance(dnn.layer(net, dnn.tag1).layer_details(), dnn.tag_)
    assert dnn.layer(net, dnn.tag1) is dnn.layer(net, 2)
    seen = []
    dnn.visit_layers(net, lambda i, n: seen.append((i, n.layer_details().kind)))
    assert seen == [(0, "fc"), (1, "relu"), (2, "tag1"), (3, "con"), (4, "input_tensor")]
    back = []
    dnn.visit_layers_backwards(net, lambda i, n: back.append(i))
    assert back == [4, 3, 2, 1, 0]
    assert dnn.count_parameters(net) == 0        # allocated at the first forward
    net(rand(1, 3, 6, 6))
    assert dnn.count_parameters(net) == 16 * 3 * 25 + 16 + 10 * 16 * 36 + 10
    with pytest.raises(IndexError):
        dnn.layer(net, 5)


def test_disabled_relu_is_free_identity():
    net = dnn.relu(dnn.con(3, 3, 3, 1, 1, dnn.input_tensor()))
    x = rand(1, 2, 5, 5)
    y = net.forward(x)
    assert (y >= 0).all()
    net.layer_details().disable()
    assert net.layer_details().disabled
    z = net.forward(x)
    R.assert_close(z, R.forward(net.subnet(), x))
    assert (z < 0).any()


# ---------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    net = dnn.fc(3, dnn.con(4, 3, 3, 1, 1, dnn.input_tensor()))
    net(rand(1, 2, 5, 5))
    with pytest.raises(dnn.LayerError, match=r"layer<2> input_tensor.*rank 4"):
        net(np.zeros((2, 5, 5), np.float32))
    with pytest.raises(dnn.LayerError, match=r"float32"):
        net(np.zeros((1, 2, 5, 5), np.float64))
    with pytest.raises(dnn.LayerError, match=r"layer<2> input_tensor.*2 channels.*\(1, 3, 5, 5\)"):
        net(rand(1, 3, 5, 5))
    with pytest.raises(dnn.LayerError, match=r"layer<0> fc: expected 100 inputs"):
        net(rand(1, 2, 6, 6))
    with pytest.raises(dnn.LayerError, match=r"input_tensor"):
        net([[1.0]])
    assert net(rand(1, 2, 5, 5)).shape == (1, 3, 1, 1)   # still usable


def test_window_larger_than_padded_input():
    net = dnn.con(2, 7, 7, 1, 1, dnn.input_tensor(), padding_y=1, padding_x=1)
    with pytest.raises(dnn.LayerError, match=r"layer<0> con: the convolution window \(7\) is larger"):
        net(rand(1, 1, 4, 4))
    pool = dnn.max_pool(3, 3, 1, 1, dnn.input_tensor())
    with pytest.raises(dnn.LayerError, match=r"layer<0> max_pool: the pooling window"):
        pool(rand(1, 1, 2, 5))


def test_add_prev_shape_mismatch_and_missing_tags():
    # shapes that differ add as dlib's add_prev_ does: zero padded to the larger of each dimension
    net = dnn.add_prev1(dnn.con(3, 3, 3, 2, 2, dnn.tag1(dnn.input_tensor())))
    x = rand(1, 2, 8, 8)
    y = net(x)
    c = dnn.layer(net, 1).get_output()
    want = np.zeros((1, 3, 8, 8), np.float32)
    want[:, :, :3, :3] += c
    want[:, :2] += x
    assert y.shape == (1, 3, 8, 8) and np.array_equal(y, want)
    with pytest.raises(dnn.LayerError, match=r"layer<1> skip3: there is no tag3 below"):
        dnn.relu(dnn.skip3(dnn.tag1(dnn.input_tensor())))(rand(1, 1, 2, 2))
    with pytest.raises(dnn.LayerError, match=r"layer<0> add_prev2: there is no tag2 below"):
        dnn.add_prev2(dnn.input_tensor())(rand(1, 1, 2, 2))


def test_bad_construction():
    with pytest.raises(ValueError, match="con: num_filters"):
        dnn.con(0, 3, 3, 1, 1, dnn.input_tensor())
    with pytest.raises(TypeError, match="subnet"):
        dnn.relu(None)
    with pytest.raises(ValueError, match="max_pool: padding"):
        dnn.max_pool(2, 2, 1, 1, dnn.input_tensor(), padding_y=2)

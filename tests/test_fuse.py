"""fuse(net): exactness, including the two cases dlib's visitor gets wrong."""
import numpy as np
import pytest

import minidnn as dnn
import reference as R
from test_net import cifar_resnet, rand, randomize_bn


def prepared(net, x):
    net.forward(x)
    randomize_bn(net)
    for n in net.chain():
        l = n.layer_details()
        if getattr(l, "biases", None) is not None:
            l.biases[:] = rand(*l.biases.shape)       # non-zero conv biases
    return net


def fuse_and_compare(net, x):
    before = net.forward(x)
    ref = R.forward(net, x)
    R.assert_close(before, ref)
    dnn.fuse(net)
    after = net.forward(x)
    R.assert_close(after, ref)
    R.assert_close(R.forward(net, x), ref)           # the fused parameters are exact, not just the kernels
    return after


def kinds(net):
    return [(n.layer_details().kind, n.layer_details().disabled) for n in net.chain()]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_con_bn_relu(bias, relu):
    net = dnn.bn_con(dnn.con(5, 3, 3, 1, 1, dnn.input_tensor(), bias=bias))
    if relu:
        net = dnn.relu(net)
    x = rand(2, 3, 7, 6)
    prepared(net, x)
    fuse_and_compare(net, x)
    con = dnn.layer(net, dnn.con_).layer_details()
    assert con.bias and con.biases is not None            # fuse enabled the bias
    assert con.fused_relu == relu
    assert all(d for k, d in kinds(net) if k in ("affine", "relu"))
    assert not any(k.startswith("bn") for k, _ in kinds(net))


def test_dlib_bug_existing_bias_is_scaled_by_gamma():
    # y = gamma*(Wx + b) + beta: the folded bias must be gamma*b + beta, not b + beta
    net = dnn.affine(dnn.con(2, 1, 1, 1, 1, dnn.input_tensor()))
    x = rand(1, 1, 3, 3)
    net.forward(x)
    con, aff = net.subnet().layer_details(), net.layer_details()
    con.filters[:] = 1.0
    con.biases[:] = [1.0, 2.0]
    aff.gamma[:] = [3.0, -4.0]
    aff.beta[:] = [0.5, 0.25]
    before = net.forward(x)
    dnn.fuse(net)
    np.testing.assert_allclose(con.biases, [3.0 * 1.0 + 0.5, -4.0 * 2.0 + 0.25])
    np.testing.assert_allclose(con.filters[:, 0, 0, 0], [3.0, -4.0])
    np.testing.assert_allclose(net.forward(x), before, rtol=1e-6)


def test_dlib_bug_relu_kept_without_bias():
    net = dnn.relu(dnn.con(4, 3, 3, 1, 1, dnn.input_tensor(), bias=False))
    x = rand(2, 2, 5, 5)
    net.forward(x)
    before = fuse_and_compare(net, x)
    assert net.subnet().layer_details().fused_relu
    assert net.layer_details().disabled
    assert (before >= 0).all() and (net.forward(x) >= 0).all()


def test_fc_bn_fc_relu():
    net = dnn.fc(3, dnn.relu(dnn.bn_fc(dnn.fc(6, dnn.input_tensor()))))
    x = rand(4, 2, 3, 3)
    prepared(net, x)
    fuse_and_compare(net, x)
    assert dnn.layer(net, 3).layer_details().fused_relu
    assert [k for k, d in kinds(net) if not d] == ["fc", "fc", "input_tensor"]


def test_fc_with_bn_con_above():
    net = dnn.bn_con(dnn.fc(6, dnn.input_tensor(), bias=False))
    x = rand(3, 2, 2, 2)
    prepared(net, x)
    fuse_and_compare(net, x)
    assert net.layer_details().disabled


def test_bn_not_above_a_conv_becomes_affine():
    # bn above relu, bn_fc above a conv (spatially varying, cannot fold), bn on the input
    net = dnn.bn_con(dnn.relu(dnn.bn_fc(dnn.con(3, 3, 3, 1, 1, dnn.bn_con(dnn.input_tensor())))))
    x = rand(2, 2, 4, 4)
    prepared(net, x)
    fuse_and_compare(net, x)
    ks = kinds(net)
    assert ks == [("affine", False), ("relu", False), ("affine", False), ("con", False),
                  ("affine", False), ("input_tensor", False)]
    assert dnn.layer(net, 2).layer_details().mode == "fc"


def test_affine_in_front_of_conv_not_folded_backwards():
    net = dnn.con(3, 3, 3, 1, 1, dnn.affine(dnn.input_tensor()))
    x = rand(1, 2, 5, 5)
    prepared(net, x)
    fuse_and_compare(net, x)
    assert not net.subnet().layer_details().disabled


def test_residual_network_and_fusing_twice():
    net = cifar_resnet(widths=(8, 16, 16))
    x = rand(2, 3, 16, 16)
    prepared(net, x)
    fuse_and_compare(net, x)
    assert not any(k.startswith("bn") for k, _ in kinds(net))
    # relus after add_prev stay; those right above a folded bn went into the conv
    fused = [n.layer_details() for n in net.chain() if isinstance(n.layer_details(), dnn.con_)]
    assert sum(c.fused_relu for c in fused) == 7
    state = [(n.layer_details().kind, n.layer_details().disabled,
              [np.copy(getattr(n.layer_details(), p)) for p in n.layer_details().params
               if getattr(n.layer_details(), p) is not None]) for n in net.chain()]
    out = net.forward(x)
    dnn.fuse(net)
    again = [(n.layer_details().kind, n.layer_details().disabled,
              [getattr(n.layer_details(), p) for p in n.layer_details().params
               if getattr(n.layer_details(), p) is not None]) for n in net.chain()]
    assert [s[:2] for s in state] == [a[:2] for a in again]
    for s, a in zip(state, again):
        for p, q in zip(s[2], a[2]):
            np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(net.forward(x), out)


def test_tagged_conv_output_keeps_its_relu_separate():
    # relu above a tag is not "directly above" the conv: the tag's readers need the raw output
    net = dnn.add_prev1(dnn.relu(dnn.tag1(dnn.con(3, 3, 3, 1, 1, dnn.input_tensor()))))
    x = rand(1, 3, 5, 5)
    prepared(net, x)
    fuse_and_compare(net, x)
    assert not dnn.layer(net, dnn.con_).layer_details().fused_relu


def test_fuse_before_setup_is_a_clear_error():
    with pytest.raises(ValueError, match=r"layer<1> con has no parameters yet"):
        dnn.fuse(dnn.bn_con(dnn.con(3, 3, 3, 1, 1, dnn.input_tensor())))


def test_fused_net_faster_or_equal_in_steps():
    """Fusing removes kernel launches: the compiled program has fewer steps."""
    net = cifar_resnet(widths=(8, 16, 16))
    x = rand(1, 3, 16, 16)
    prepared(net, x)
    before = len(net._program(x.shape).steps)
    dnn.fuse(net)
    after = len(net._program(x.shape).steps)
    assert after < before


def _step_names(net, shape):
    return [getattr(fn, "__name__", "") for fn, _ in net._program(shape).steps]


def _residual_convs(net, shape):
    """The convolution steps that add a shortcut in their epilogue: conv2d_residual, and
    conv2d_winograd with its z set (Plan.fuse_residual)."""
    prog = net._program(shape)
    return sum(1 for (fn, args), spec in zip(prog.steps, prog.specs) if spec is not None and (
        spec.name == "conv2d_residual" or "z" in spec.optional and spec.bind(args)["z"] is not None))


def test_fused_residual_blocks_add_in_the_convolution_epilogue():
    """After fuse(), the conv below each add_prev adds the shortcut in its epilogue (and the
    relu above the add too): no separate add or relu pass is left."""
    net = cifar_resnet(widths=(8, 16, 16))
    x = rand(2, 3, 16, 16)
    prepared(net, x)
    ref = R.forward(net, x)
    dnn.fuse(net)
    names = _step_names(net, x.shape)
    if not hasattr(dnn.ops.backend("cpu"), "conv2d_residual"):
        pytest.skip("this CPU backend has no conv2d_residual")
    assert _residual_convs(net, x.shape) == 6 and "add" not in names and "relu" not in names
    R.assert_close(net.forward(x), ref)
    # the add_prev node's output is the relu'd sum, as the reference computes it
    add_node = dnn.layer(net, dnn.add_prev1)
    R.assert_close(add_node.get_output(), np.maximum(R.forward(add_node, x), 0))


def test_residual_fusion_falls_back_to_add_without_the_op(monkeypatch):
    be = dnn.ops.backend("cpu")
    monkeypatch.delattr(be, "conv2d_residual", raising=False)
    monkeypatch.delattr(be, "conv2d_winograd", raising=False)     # it takes the shortcut too
    net = cifar_resnet(widths=(8, 8, 8))
    x = rand(1, 3, 8, 8)
    prepared(net, x)
    ref = R.forward(net, x)
    dnn.fuse(net)
    names = _step_names(net, x.shape)
    assert names.count("add") == 6 and "conv2d_residual" not in names
    R.assert_close(net.forward(x), ref)


def test_no_residual_fusion_when_the_conv_output_is_read_elsewhere():
    # add_prev1 directly above a tagged conv: the tag's readers need the conv's own output
    net = dnn.add_prev2(dnn.tag1(dnn.con(3, 3, 3, 1, 1, dnn.tag2(dnn.input_tensor()))))
    net = dnn.add_prev1(net)
    x = rand(1, 3, 5, 5)
    prepared(net, x)
    R.assert_close(net.forward(x), R.forward(net, x))
    assert "conv2d_residual" not in _step_names(net, x.shape)

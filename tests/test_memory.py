"""The compiled CPU forward lets buffers of disjoint lifetimes share memory: the same
outputs, less memory, and get_output still right for every node."""
import numpy as np
import pytest

import minidnn as dnn
from minidnn import core, nets

import reference as R


@pytest.fixture
def no_reuse():
    core.reuse_memory[0] = False
    core.structure_changed()
    yield
    core.reuse_memory[0] = True
    core.structure_changed()


@pytest.mark.parametrize("fused", [False, True])
def test_shared_memory_gives_the_same_outputs(fused, no_reuse):
    net = nets.randomized(nets.cifar_resnet(widths=(8, 16, 16)), (1, 3, 16, 16))
    if fused:
        dnn.fuse(net)
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    plain = net.forward(x)
    inner_plain = [n.get_output() for n in net.chain()]
    core.reuse_memory[0] = True
    core.structure_changed()
    shared = net.forward(x)
    np.testing.assert_array_equal(shared, plain)
    prog = net.programs()[-1]
    assert prog.memory["planned"] < 0.5 * prog.memory["buffers"]
    for node, want in zip(net.chain(), inner_plain):          # every node's output, still
        np.testing.assert_array_equal(node.get_output(), want)


def test_resnet18_batch_32_peak_memory():
    net = nets.build("resnet18", 1)
    x = np.zeros((32, 3, 224, 224), np.float32)
    prog = core.Program(net, x.shape, dnn.ops.backend("cpu"))
    mib = {k: v / 2 ** 20 for k, v in prog.memory.items()}
    assert mib["buffers"] > 700 and mib["planned"] < 0.4 * mib["buffers"], mib


def test_get_output_is_the_latest_forward_even_where_its_buffer_was_reused():
    """A node whose buffer the latest forward reused is recomputed from that forward's input,
    never answered from an older program that still holds its buffer (here the one for
    batch 1, where the same node's output was kept): get_output and print(net) follow the
    latest forward's batch."""
    net = nets.randomized(nets.cifar_resnet(widths=(8, 16, 16)), (1, 3, 16, 16))
    rng = np.random.default_rng(1)
    x1 = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    x3 = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    core.reuse_memory[0] = False
    core.structure_changed()
    try:
        net.forward(x3)
        want = [n.get_output() for n in net.chain()]
        net.forward(x1)                       # every buffer kept: node_outputs holds them all
    finally:
        core.reuse_memory[0] = True
        core.structure_changed()
    net.forward(x1)
    net.forward(x3)                           # shares memory: some nodes' buffers reused
    reused = [n for n in net.chain() if n not in net.programs()[-1].node_outputs]
    assert reused
    for node, w in zip(net.chain(), want):
        np.testing.assert_array_equal(node.get_output(), w)
    assert "-> (1, " not in str(net)

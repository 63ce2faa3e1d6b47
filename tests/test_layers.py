"""Every layer through one harness, from one case list: the compiled forward on every
backend against tests/reference.py (unfused, fused, reloaded from its file), the training
backward against finite differences, and print(net). A new layer adds its cases here
(pointwise activations are discovered by tests/test_activations.py)."""
from typing import Callable, NamedTuple

import numpy as np
import pytest

import minidnn as dnn

from harness import check_forward, check_gradients, randomize


class Case(NamedTuple):
    id: str
    make: Callable          # make(subnet) -> net
    shape: tuple            # the input (N, K, R, C)
    grad: bool = True       # has a backward to check
    kinds: tuple = ()       # kinds print(net) must show


inp = dnn.input_tensor

CASES = [
    Case("con3x3", lambda s: dnn.con(4, 3, 3, 1, 1, s), (2, 3, 7, 6), kinds=("con",)),
    Case("con-strided-padded", lambda s: dnn.con(5, 5, 3, 2, 3, s, padding_y=1, padding_x=2),
         (1, 2, 11, 10)),
    Case("con1x1-nobias", lambda s: dnn.con(3, 1, 1, 1, 1, s, bias=False), (3, 4, 5, 5)),
    Case("fc", lambda s: dnn.fc(7, s), (3, 2, 3, 4), kinds=("fc",)),
    Case("fc-nobias", lambda s: dnn.fc(1, s, bias=False), (1, 5, 1, 1)),
    Case("bn_con", lambda s: dnn.bn_con(dnn.con(3, 3, 3, 1, 1, s)), (4, 2, 5, 5), kinds=("bn_con",)),
    Case("bn_fc", lambda s: dnn.bn_fc(dnn.fc(6, s)), (5, 3, 2, 2), kinds=("bn_fc",)),
    Case("affine", lambda s: dnn.affine(dnn.con(3, 3, 3, 1, 1, s)), (2, 2, 4, 5), kinds=("affine",)),
    Case("max_pool", lambda s: dnn.max_pool(3, 3, 2, 2, s, padding_y=1, padding_x=1), (2, 3, 7, 8),
         kinds=("max_pool",)),
    Case("avg_pool", lambda s: dnn.avg_pool(2, 3, 1, 2, s), (1, 2, 5, 7), kinds=("avg_pool",)),
    Case("avg_pool_everything", lambda s: dnn.avg_pool_everything(dnn.con(3, 3, 3, 1, 1, s)),
         (2, 2, 5, 7)),
    Case("softmax", lambda s: dnn.softmax(dnn.con(4, 3, 3, 1, 1, s)), (2, 3, 3, 4), kinds=("softmax",)),
    Case("residual", lambda s: dnn.relu(dnn.add_prev1(dnn.bn_con(dnn.con(3, 3, 3, 1, 1, dnn.relu(
        dnn.con(3, 3, 3, 1, 1, dnn.tag1(dnn.con(3, 1, 1, 1, 1, s)))))))), (2, 2, 6, 5),
         kinds=("tag1", "add_prev1")),
    Case("skip", lambda s: dnn.add_prev2(dnn.con(3, 3, 3, 1, 1, dnn.skip1(dnn.tag2(dnn.con(
        3, 3, 3, 1, 1, dnn.tag1(s))))), ), (1, 3, 5, 5), kinds=("skip1", "tag2")),
]


def _net(case, seed=0):
    dnn.set_seed(seed)
    net = case.make(inp())
    x = np.random.default_rng(seed + 1).standard_normal(case.shape).astype(np.float32)
    net.forward(x)
    randomize(net)
    return net, x


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_fused_and_reloaded(case, device):
    net, x = _net(case)
    check_forward(net, x, device)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("batch", [1, 3])
def test_batch_sizes(case, batch, device):
    net, _ = _net(case)
    x = np.random.default_rng(5).standard_normal((batch,) + case.shape[1:]).astype(np.float32)
    check_forward(net, x, device, fuse=False, reload=False)


@pytest.mark.parametrize("case", [c for c in CASES if c.grad], ids=[c.id for c in CASES if c.grad])
def test_gradients(case):
    net, x = _net(case)
    assert check_gradients(net, x) >= 1


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_print(case):
    net, _ = _net(case)
    text = str(net)
    for k in case.kinds:
        assert f"    {k}" in text, (k, text)
    assert text.splitlines()[-1].startswith(f"layer<{len(net) - 1}>    input_tensor")

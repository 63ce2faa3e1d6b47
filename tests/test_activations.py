"""Every pointwise activation, discovered from the layer registry: its code against
kernels/common/activations.h, its values and derivative against tests/reference.py (and
PyTorch where installed), standalone and fused into the con/fc epilogue, on every backend,
its file record, and print(net)."""
import io
import os
import re

import numpy as np
import pytest

import minidnn as dnn
from minidnn import ops
from minidnn.layers.activations import ActivationLayer

import reference as R
from harness import check_forward, check_gradients, forward_on, randomize

HEADER = os.path.join(os.path.dirname(__file__), "..", "kernels", "common", "activations.h")


def _classes():
    out, todo = [], list(ActivationLayer.__subclasses__())
    while todo:
        c = todo.pop(0)
        todo.extend(c.__subclasses__())
        if c.code is not None:
            out.append(c)
    return sorted(out, key=lambda c: c.code)


CLASSES = _classes()
# parameter values tried besides the default (the default is always tried)
PARAMS = {"leaky_relu": [0.2, -0.5], "elu": [0.3], "clipped_relu": [1.5], "smelu": [0.25, 3.0],
          "prelu": [0.1]}


def _layers():
    out = []
    for cls in CLASSES:
        out.append(pytest.param(cls, None, id=cls.kind))
        for p in PARAMS.get(cls.kind, []):
            out.append(pytest.param(cls, p, id=f"{cls.kind}-{p:g}"))
    return out


def make(cls, p, sub):
    layer = cls() if p is None else cls(p)
    return dnn.Node(layer, sub)


def _inputs(n=4099, seed=0):
    """Values over the whole range, the regions near 0 and near each parameter, and
    the kinks (+-1, +-p)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(-30, 30, n // 4), rng.normal(0, 1, n // 4),
                        rng.normal(0, 1e-3, n // 8), rng.uniform(-8, 8, n - n // 4 * 2 - n // 8),
                        [0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 6.0, 0.25, -0.25, 1e-30, -1e-30, 88.0,
                         -88.0, 100.0, -100.0]])
    return x.astype(np.float32)


def test_every_activation_has_a_header_code_and_a_reference():
    text = open(HEADER).read()
    codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define MDNN_ACT_(\w+) (\d+)", text)}
    count = codes.pop("COUNT")
    assert sorted(codes.values()) == list(range(count))
    names = {v: k for k, v in codes.items()}
    assert names[0] == "IDENTITY"
    for cls in CLASSES:
        assert names.get(cls.code) == cls.kind.upper(), (cls.kind, cls.code, names.get(cls.code))
        assert cls.kind in R.ACTIVATIONS, f"tests/reference.py has no {cls.kind}"
        assert ops.ACT_NAMES[cls.code] == cls.kind
    assert {c.kind for c in CLASSES} | {"identity"} == {n.lower() for n in codes}, \
        "an MDNN_ACT_ code without its layer class (or the other way round)"


@pytest.mark.parametrize("cls,p", _layers())
def test_values_match_the_reference_elementwise(cls, p, device):
    x = _inputs().reshape(1, 1, 1, -1)
    net = make(cls, p, dnn.input_tensor())
    y = forward_on(net, x, device)
    ref = R.activation(x, net.layer_details().act)
    # relative per element (the tails keep their digits), absolute below 1e-30
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("cls,p", _layers())
def test_nan_passes_through(cls, p):
    x = np.array([np.nan, 1.0, -1.0], np.float32).reshape(1, 1, 1, 3)
    y = make(cls, p, dnn.input_tensor()).forward(x)
    assert np.isnan(y[0, 0, 0, 0]) and not np.isnan(y[0, 0, 0, 1:]).any()


@pytest.mark.parametrize("cls,p", _layers())
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 4, 1, 1), (3, 2, 33, 31)])
def test_in_place_and_in_a_net(cls, p, shape, device):
    """After a con (epilogue at run time), after an affine, and above a tag (not fusable)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    for sub in (lambda s: dnn.con(4, 3, 3, 1, 1, s), lambda s: dnn.affine(s),
                lambda s: dnn.tag1(dnn.con(3, 1, 1, 1, 1, s))):
        net = make(cls, p, sub(dnn.input_tensor()))
        net.forward(x)
        randomize(net)
        check_forward(net, x, device)


@pytest.mark.parametrize("cls,p", _layers())
def test_fused_into_con_and_fc(cls, p, device):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 9, 7)).astype(np.float32)
    net = dnn.fc(5, make(cls, p, dnn.bn_fc(dnn.fc(6, make(cls, p, dnn.bn_con(dnn.con(
        4, 3, 3, 1, 1, dnn.input_tensor(), bias=False)))))))
    net.forward(x)
    randomize(net)
    before = net.forward(x)
    check_forward(net, x, device)                 # fuses the net too
    kinds = [n.layer_details() for n in net.chain()]
    epilogues = [l.act for l in kinds if l.takes_epilogue]
    assert epilogues[1:] == [make(cls, p, dnn.input_tensor()).layer_details().act] * 2
    assert all(l.disabled for l in kinds if l.pointwise)
    R.assert_close(net.forward(x), before.astype(np.float64))
    assert f"fused_{cls.kind}" in str(net)


@pytest.mark.parametrize("cls,p", _layers())
def test_gradients(cls, p):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 3, 4, 5)) * 1.5).astype(np.float32)
    x[np.abs(x) < 1e-2] = 0.5        # away from kinks, where central differences are wrong
    if p is not None or cls.settings:
        v = p if p is not None else getattr(cls(), cls.settings[0].name)
        x[np.abs(np.abs(x) - abs(v)) < 1e-2] = 0.5
    if cls.kind == "clipped_relu":
        x[np.abs(x - 6) < 1e-2] = 0.5
    net = make(cls, p, dnn.con(3, 3, 3, 1, 1, dnn.input_tensor()))
    net.forward(x)
    randomize(net)
    assert check_gradients(net, x) >= 2
    fused = make(cls, p, dnn.con(3, 3, 3, 1, 1, dnn.input_tensor()))
    fused.forward(x)
    randomize(fused)
    dnn.fuse(fused)                    # the activation in the con's epilogue, trained through
    assert fused.subnet().layer_details().act and check_gradients(fused, x) >= 2


@pytest.mark.parametrize("cls,p", _layers())
def test_record_round_trips_and_prints(cls, p):
    net = make(cls, p, dnn.input_tensor())
    buf = io.BytesIO()
    dnn.serialize(net, buf)
    buf.seek(0)
    back = dnn.deserialize(buf)
    assert type(back.layer_details()) is cls and back.layer_details().act == net.layer_details().act
    buf2 = io.BytesIO()
    dnn.serialize(back, buf2)
    assert buf2.getvalue() == buf.getvalue()
    line = str(net).splitlines()[0]
    assert line.startswith(f"layer<0>    {cls.kind}")
    if cls.settings:
        assert f"{cls.settings[0].name}=" in line


@pytest.mark.parametrize("cls,p", _layers())
def test_matches_pytorch(cls, p):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = _inputs(1000)
    layer = make(cls, p, dnn.input_tensor()).layer_details()
    a = layer.act.param
    t = torch.from_numpy(x.astype(np.float64))
    fns = {"relu": F.relu, "sig": torch.sigmoid, "htan": torch.tanh, "gelu": F.gelu,
           "mish": F.mish, "silu": F.silu, "leaky_relu": lambda v: F.leaky_relu(v, a),
           "prelu": lambda v: F.prelu(v, torch.tensor([a], dtype=torch.float64)),
           "elu": lambda v: F.elu(v, a), "clipped_relu": lambda v: torch.clamp(v, 0, a)}
    if cls.kind not in fns:
        pytest.skip(f"PyTorch has no {cls.kind}")
    y = dnn.Node(layer, dnn.input_tensor()).forward(x.reshape(1, 1, 1, -1)).reshape(-1)
    # atol: float64 PyTorch flushes the far tails (gelu below -8) to 0 where float32 still holds them
    np.testing.assert_allclose(y.astype(np.float64), fns[cls.kind](t).numpy(), rtol=2e-6, atol=1e-12)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="clipped_relu: ceiling"):
        dnn.clipped_relu(dnn.input_tensor(), ceiling=0)
    with pytest.raises(ValueError, match="smelu: beta"):
        dnn.smelu(dnn.input_tensor(), beta=-1)
    with pytest.raises(ValueError, match="leaky_relu: alpha"):
        dnn.leaky_relu(dnn.input_tensor(), alpha=float("nan"))
    with pytest.raises(ValueError, match="elu: alpha must be a number"):
        dnn.elu(dnn.input_tensor(), alpha="1")


# ------------------------------------------------------------ the AVX2 formulas (act_avx2.h)
def _bits_equal(a, b):
    """Equal bit for bit, any NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all() and (a.view(np.int32)[~nan] == b.view(np.int32)[~nan]).all())


@pytest.mark.parametrize("cls,p", _layers())
def test_vector_formulas_equal_the_scalar_ones(cls, p):
    """mdnn_act_array (the AVX2 formulas where compiled, 16 and 8 floats a step, the last
    n % 8 through a padded vector) equals the scalar mdnn_act of activations.h bit for bit,
    over the whole range, every length 1..40 (every tail), in place and not, and stays
    within the tolerance of the float64 reference."""
    from minidnn import _cpu_eltwise as E
    from minidnn.backends import cpu
    act = make(cls, p, dnn.input_tensor()).layer_details().act
    rng = np.random.default_rng(7)
    x = np.concatenate([_inputs(), rng.uniform(-90, 90, 20000), rng.normal(0, 1e-4, 2000),
                        [np.nan, np.inf, -np.inf, 87.3, -87.3, 88.3, 44.0, 20.0, 0.35, -0.35,
                         3e-39, -3e-39]]).astype(np.float32)
    ys, yv = np.empty_like(x), np.empty_like(x)
    E._activation_scalar(x, ys, act)
    cpu.activation(x, yv, act)
    assert _bits_equal(yv, ys), f"{cls.kind}: vector != scalar at {x[~((yv == ys) | (np.isnan(yv) & np.isnan(ys)))][:5]}"
    fin = np.isfinite(x) & (np.abs(x) < 1e30)
    np.testing.assert_allclose(yv[fin].astype(np.float64), R.activation(x[fin], act), rtol=2e-6, atol=1e-30)
    for n in range(1, 41):
        xs = x[1000:1000 + n].copy()
        y = np.full_like(xs, np.nan)
        cpu.activation(xs, y, act)
        assert _bits_equal(y, ys[1000:1000 + n]), (cls.kind, n)
        cpu.activation(xs, xs, act)
        assert _bits_equal(xs, ys[1000:1000 + n]), (cls.kind, n, "in place")


def test_vector_formulas_are_compiled():
    """The CPU build has AVX2 + FMA (CMakeLists.txt: -march=native on this machine): the
    vector formulas are the ones running."""
    from minidnn import _cpu_eltwise as E, _cpu_depthwise as D
    assert E._act_have_avx2() == D._dw_have_avx2()

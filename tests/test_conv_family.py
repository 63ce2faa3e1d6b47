"""The convolution family of the catalogue (issue 12): con with groups and dilation
(conv2d_grouped: the depthwise route and the grouped GEMM route), and cont, dlib's
transposed convolution (conv2d_transpose).

- layers through tests/harness.py: the compiled forward on every backend against the
  float64 reference (unfused, fused with bn/affine and activations, reloaded), batch 1
  and more, finite-difference gradients, print(net);
- every route forced (depthwise vs gemm, the depthwise vector blocks vs the scalar loop)
  at 1 and 2 threads, around each blocking constant (docs/INTERNALS.md), against the
  reference; the training kernels likewise;
- PyTorch cross-checks (torch.nn.functional.conv2d with groups/dilation and
  conv_transpose2d, float64) when torch is installed;
- records (con_3, con_2 and con_1 still loading, cont_1), forward_ops per layer.
"""
import io
import struct
import types
from typing import Callable, NamedTuple

import numpy as np
import pytest

import minidnn as dnn
from minidnn import _cpu_conv, _cpu_depthwise, ops
from minidnn.backends import cpu, cpu_grad

import reference as REF
from harness import check_forward, check_gradients, randomize

SILU = ops.act_by_name("silu")
RELU6 = ops.act_by_name("clipped_relu", 6.0)
AVX2 = _cpu_depthwise._dw_have_avx2()

# blocking constants walked here (test_blocking_constants keeps them honest)
DW_BLOCK = 8                    # depthwise.pyx: MDNN_DW_W output columns per vector block
DW_PAD_MAX_BYTES = 4 << 20      # depthwise.pyx: the largest padded-plane buffer
GR_PW_BYTES = 256 * 1024        # depthwise.pyx: im2col columns per gemm-route task
GR_MIN_PW = 64                  # depthwise.pyx: the narrowest pixel chunk
TR_COL_BYTES = 512 * 1024       # conv.pyx: columns per conv2d_transpose task


@pytest.fixture(autouse=True)
def _restore_settings():
    path = _cpu_depthwise._set_grouped_path("auto")
    vec = _cpu_depthwise._set_depthwise_vector(True)
    padded = _cpu_depthwise._set_depthwise_padded("auto")
    pairs = _cpu_depthwise._set_depthwise_row_pairs(True)
    stream = _cpu_depthwise._set_depthwise_stream_bytes(16 << 20)
    pw = _cpu_depthwise._set_pw_bytes(GR_PW_BYTES)
    tr = _cpu_conv._set_tr_col_bytes(TR_COL_BYTES)
    nt = cpu.get_num_threads()
    yield
    _cpu_depthwise._set_grouped_path(path)
    _cpu_depthwise._set_depthwise_vector(vec)
    _cpu_depthwise._set_depthwise_padded(padded)
    _cpu_depthwise._set_depthwise_row_pairs(pairs)
    _cpu_depthwise._set_depthwise_stream_bytes(stream)
    _cpu_depthwise._set_pw_bytes(pw)
    _cpu_conv._set_tr_col_bytes(tr)
    cpu.set_num_threads(nt)


def _rng(*key):
    return np.random.default_rng([abs(int(v)) for v in key])


def _out(n, k, s, p, d=1):
    return 1 + (n + 2 * p - (d * (k - 1) + 1)) // s


# ------------------------------------------------------------------ layers, one harness
class Case(NamedTuple):
    id: str
    make: Callable
    shape: tuple
    grad: bool = True
    text: tuple = ()          # what print(net) must show


inp = dnn.input_tensor
CASES = [
    Case("dw3x3", lambda s: dnn.con(5, 3, 3, 1, 1, s, groups=5), (2, 5, 9, 11),
         text=("con", "groups=5")),
    Case("dw3x3-s2-mult2", lambda s: dnn.con(6, 3, 3, 2, 2, s, groups=3, padding_y=1, padding_x=1),
         (1, 3, 10, 9)),
    Case("dw5x5-nobias", lambda s: dnn.con(3, 5, 5, 1, 1, s, groups=3, bias=False), (2, 3, 5, 9)),
    Case("dw-dilated", lambda s: dnn.con(4, 3, 3, 1, 1, s, groups=4, dilation_y=2, dilation_x=3),
         (1, 4, 9, 13), text=("dilation_y=2, dilation_x=3",)),
    Case("grouped", lambda s: dnn.con(6, 3, 3, 1, 1, s, groups=2), (2, 4, 6, 7)),
    Case("grouped-strided", lambda s: dnn.con(6, 3, 2, 2, 1, s, groups=3, padding_y=2, padding_x=1),
         (1, 6, 9, 8)),
    Case("grouped-1x1", lambda s: dnn.con(4, 1, 1, 1, 1, s, groups=2), (3, 6, 4, 5)),
    Case("dilated", lambda s: dnn.con(3, 3, 3, 1, 1, s, dilation_y=2, dilation_x=2), (2, 2, 8, 9)),
    Case("dilated-s3", lambda s: dnn.con(3, 3, 2, 3, 2, s, dilation_y=3, dilation_x=2,
                                         padding_y=2, padding_x=0), (1, 3, 13, 10)),
    Case("cont4x4-s2", lambda s: dnn.cont(3, 4, 4, 2, 2, s), (2, 4, 5, 6), text=("cont",)),
    Case("cont3x3", lambda s: dnn.cont(2, 3, 3, 1, 1, s), (1, 3, 6, 5)),
    Case("cont-s3-nobias", lambda s: dnn.cont(3, 5, 4, 3, 2, s, padding_y=2, padding_x=1, bias=False),
         (2, 2, 4, 3)),
    Case("cont1x1", lambda s: dnn.cont(3, 1, 1, 1, 1, s), (2, 4, 3, 3)),
    # fuse folds bn/affine into them and moves activations into their epilogue
    Case("bn-relu6-dw", lambda s: dnn.clipped_relu(dnn.bn_con(dnn.con(4, 3, 3, 1, 1, s, groups=4))),
         (3, 4, 6, 6)),
    Case("affine-silu-grouped", lambda s: dnn.silu(dnn.affine(dnn.con(4, 3, 3, 2, 2, s, groups=2))),
         (2, 4, 7, 7)),
    Case("bn-relu-cont", lambda s: dnn.relu(dnn.bn_con(dnn.cont(3, 2, 2, 2, 2, s))), (2, 3, 4, 5)),
    Case("affine-htan-cont", lambda s: dnn.htan(dnn.affine(dnn.cont(3, 3, 3, 2, 1, s, bias=False))),
         (1, 2, 4, 4)),
    Case("mobilenet-block", lambda s: dnn.add_prev1(dnn.bn_con(dnn.con(4, 1, 1, 1, 1, dnn.clipped_relu(
        dnn.bn_con(dnn.con(8, 3, 3, 1, 1, dnn.clipped_relu(dnn.bn_con(dnn.con(8, 1, 1, 1, 1, dnn.tag1(s)))),
                           groups=8)))))), (1, 4, 5, 4)),
    Case("unet-up", lambda s: dnn.con(2, 3, 3, 1, 1, dnn.relu(dnn.cont(4, 2, 2, 2, 2, dnn.max_pool(
        2, 2, 2, 2, dnn.relu(dnn.con(4, 3, 3, 1, 1, s, dilation_y=2, dilation_x=2)))))), (1, 2, 8, 8)),
]


def _net(case, seed=0):
    dnn.set_seed(seed)
    net = case.make(inp())
    x = np.random.default_rng(seed + 1).standard_normal(case.shape).astype(np.float32)
    net.forward(x)
    randomize(net)
    return net, x


def _require_ops(net, device):
    """Every backend runs the whole family (the CUDA one through
    minidnn/backends/cuda/conv_family.py): a missing op fails, it is never skipped."""
    if device == "cpu":
        return
    be = ops.backend(device)
    missing = sorted({o for n in net.chain() for o in n.layer_details().forward_ops
                      if not hasattr(be, o) and o not in ops.OPTIONAL})
    assert not missing, f"the {device} backend has no {', '.join(missing)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_fused_and_reloaded(case, device):
    net, x = _net(case)
    _require_ops(net, device)
    check_forward(net, x, device)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("batch", [1, 3])
def test_batch_sizes(case, batch, device):
    net, _ = _net(case)
    _require_ops(net, device)
    x = np.random.default_rng(5).standard_normal((batch,) + case.shape[1:]).astype(np.float32)
    check_forward(net, x, device, fuse=False, reload=False)


@pytest.mark.parametrize("case", [c for c in CASES if c.grad], ids=[c.id for c in CASES if c.grad])
def test_gradients(case):
    net, x = _net(case)
    assert check_gradients(net, x) >= 2


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_print(case):
    net, _ = _net(case)
    text = str(net)
    for t in case.text:
        assert t in text, (t, text)
    assert text.splitlines()[-1].split()[:2] == [f"layer<{len(net) - 1}>", "input_tensor"]


def test_print_as_dlib():
    net = dnn.cont(3, 4, 4, 2, 2, dnn.con(8, 3, 3, 1, 1, dnn.input_tensor(), groups=2))
    lines = str(net).splitlines()
    assert lines[0] == ("layer<0>    cont     (num_filters=3, nr=4, nc=4, stride_y=2, stride_x=2, "
                        "padding_y=0, padding_x=0)")
    assert lines[1] == ("layer<1>    con      (num_filters=8, nr=3, nc=3, stride_y=1, stride_x=1, "
                        "padding_y=1, padding_x=1, groups=2)")
    # a plain con prints exactly as before (dlib's)
    assert "groups" not in str(dnn.con(8, 3, 3, 1, 1, dnn.input_tensor()))


def test_fuse_folds_into_cont_over_its_output_channels():
    dnn.set_seed(2)
    net = dnn.relu(dnn.bn_con(dnn.cont(3, 3, 3, 2, 2, dnn.input_tensor(), bias=False)))
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)
    net.forward(x)
    randomize(net)
    y = net.forward(x)
    dnn.fuse(net)
    l = dnn.layer(net, 2).layer_details()
    assert isinstance(l, dnn.cont_) and l.bias and l.act == ops.RELU
    assert dnn.layer(net, 1).layer_details().disabled and dnn.layer(net, 0).layer_details().disabled
    REF.assert_close(net.forward(x), y.astype(np.float64))
    assert l.filters.shape == (4, 3, 3, 3)


def test_shapes_and_defaults():
    l = dnn.con_(8, 3, 3, 1, 1, groups=4, dilation_y=2, dilation_x=3)
    assert (l.padding_y, l.padding_x) == (2, 3)          # span // 2 at stride 1
    assert dnn.con_(8, 3, 3, 2, 2, dilation_y=2).padding_y == 0
    assert dnn.cont_(3, 4, 4, 2, 2).padding_y == 0 and dnn.cont_(3, 5, 3, 1, 1).padding_y == 2
    net = dnn.cont(3, 4, 4, 2, 2, dnn.input_tensor())
    assert net.forward(np.zeros((1, 2, 5, 7), np.float32)).shape == (1, 3, 12, 16)  # 2*(in-1)+4
    assert dnn.layer(net, 0).layer_details().filters.shape == (2, 3, 4, 4)
    net = dnn.con(6, 3, 3, 1, 1, dnn.input_tensor(), groups=3, dilation_y=2)
    assert net.forward(np.zeros((1, 9, 10, 10), np.float32)).shape == (1, 6, 10, 10)
    assert net.layer_details().filters.shape == (6, 3, 3, 3)


def test_errors():
    with pytest.raises(ValueError, match="multiple of groups"):
        dnn.con_(6, 3, 3, 1, 1, groups=4)
    with pytest.raises(ValueError, match="groups must be an integer >= 1"):
        dnn.con_(6, 3, 3, 1, 1, groups=0)
    with pytest.raises(ValueError, match="dilation_x must be an integer >= 1"):
        dnn.con_(6, 3, 3, 1, 1, dilation_x=0)
    with pytest.raises(ValueError, match="smaller than the dilated filter span"):
        dnn.con_(6, 3, 3, 1, 1, padding_y=5, dilation_y=2)
    with pytest.raises(ValueError, match="smaller than the filter"):
        dnn.cont_(3, 3, 3, 1, 1, padding_x=3)
    net = dnn.con(6, 3, 3, 1, 1, dnn.input_tensor(), groups=3)
    with pytest.raises(dnn.LayerError, match=r"layer<0> con: groups=3 must divide the input channels"):
        net.forward(np.zeros((1, 4, 5, 5), np.float32))
    net = dnn.cont(2, 3, 3, 1, 1, dnn.input_tensor(), padding_y=2)
    with pytest.raises(dnn.LayerError, match="layer<0> cont: the transposed convolution of a 1x3 input"):
        net.forward(np.zeros((1, 1, 1, 3), np.float32))
    x, w = np.zeros((1, 4, 5, 5), np.float32), np.zeros((4, 2, 3, 3), np.float32)
    y = np.zeros((1, 4, 5, 5), np.float32)
    with pytest.raises(ValueError, match="groups = 3 must be >= 1 and divide"):
        cpu.conv2d_grouped(x, w, None, y, 1, 1, 1, 1, 1, 1, 3, False)
    with pytest.raises(ValueError, match=r"expected w.shape\[1\] == 1"):
        cpu.conv2d_grouped(x, w, None, y, 1, 1, 1, 1, 1, 1, 4, False)
    with pytest.raises(ValueError, match="does not fit the padded input"):
        cpu.conv2d_grouped(x, np.zeros((4, 2, 3, 3), np.float32), None, y, 1, 1, 0, 0, 3, 1, 2, False)
    with pytest.raises(ValueError, match="y has shape"):
        cpu.conv2d_transpose(x, np.zeros((4, 2, 3, 3), np.float32), None, y, 1, 1, 1, 1, False)
    with pytest.raises(ValueError, match="must not share memory"):
        cpu.conv2d_grouped(y, np.zeros((4, 2, 3, 3), np.float32), None, y, 1, 1, 1, 1, 1, 1, 2, False)


# ------------------------------------------------------------------ forward_ops per layer
def test_forward_ops_follow_the_layer():
    assert set(dnn.con_.forward_ops) == {"conv2d", "conv2d_residual", "conv2d_grouped",
                                         "conv2d_winograd"}
    assert dnn.con_(4, 3, 3).forward_ops == ("conv2d", "conv2d_residual", "conv2d_winograd")
    assert dnn.con_(4, 3, 3, groups=2).forward_ops == ("conv2d_grouped",)
    assert dnn.con_(4, 3, 3, dilation_x=2).forward_ops == ("conv2d_grouped",)
    assert dnn.cont_(4, 3, 3).forward_ops == ("conv2d_transpose",)


class _FakeArray:
    def __init__(self, a):
        self.a = np.ascontiguousarray(a, np.float32)
        self.shape, self.dtype, self.size = self.a.shape, self.a.dtype, self.a.size

    def reshape(self, *shape):
        return _FakeArray(self.a.reshape(*shape))


@pytest.fixture
def device_without_grouped(monkeypatch):
    """A device backend (the CPU kernels on wrapped arrays) lacking the catalogue's ops,
    as the CUDA backend does until its kernels land."""
    mod = types.ModuleType("minidnn_fake_backend")
    mod.name, mod.array_type = "fake", _FakeArray
    mod.empty = lambda shape: _FakeArray(np.empty(shape, np.float32))
    mod.asarray = lambda a: _FakeArray(a)
    mod.to_numpy = lambda a: a.a.copy()
    mod.upload = lambda dst, src: np.copyto(dst.a, src)
    mod.copy = lambda dst, src: np.copyto(dst.a, src.a)
    for name in ("conv2d", "conv2d_residual", "activation", "add", "affine"):
        fn = getattr(cpu, name)
        setattr(mod, name, lambda *args, fn=fn: fn(*[a.a if isinstance(a, _FakeArray) else a for a in args]))
    monkeypatch.setattr(ops, "DEVICES", ops.DEVICES + ("fake",))
    monkeypatch.setitem(ops._by_name, "fake", mod)
    monkeypatch.setitem(ops._by_type, _FakeArray, mod)
    return mod


def test_only_grouped_cons_need_the_new_op(device_without_grouped):
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    plain = dnn.relu(dnn.con(4, 3, 3, 1, 1, dnn.input_tensor()))
    y = plain.forward(x)
    plain.to("fake")                                  # an ordinary con still moves
    np.testing.assert_allclose(plain.forward(x), y, rtol=1e-6)
    for net, op in ((dnn.con(4, 3, 3, 1, 1, dnn.input_tensor(), groups=4), "conv2d_grouped"),
                    (dnn.relu(dnn.con(4, 3, 3, 1, 1, dnn.input_tensor(), dilation_y=2)), "conv2d_grouped"),
                    (dnn.cont(4, 2, 2, 2, 2, dnn.input_tensor()), "conv2d_transpose")):
        net.forward(x)
        i = next(i for i, n in enumerate(net.chain()) if op in n.layer_details().forward_ops)
        with pytest.raises(NotImplementedError, match=f"layer<{i}> con.*no kernel for {op}"):
            net.to("fake")
        assert net.device == "cpu"


# ------------------------------------------------------------------ records
def _roundtrip(net):
    buf = io.BytesIO()
    dnn.serialize(net, buf)
    data = buf.getvalue()
    loaded = dnn.deserialize(data)
    assert dnn.serialize(loaded) == data          # one encoding
    return loaded, data


def test_records_round_trip():
    x = np.random.default_rng(0).standard_normal((2, 6, 7, 7)).astype(np.float32)
    net = dnn.cont(3, 3, 3, 2, 2, dnn.relu(dnn.con(6, 3, 3, 1, 1, dnn.input_tensor(), groups=3,
                                                   dilation_y=2, dilation_x=1, bias=False)),
                   padding_y=1, bias=False)
    y = net.forward(x)
    dnn.fuse(net)
    loaded, data = _roundtrip(net)
    assert b"con_3" in data and b"cont_1" in data
    c, t = dnn.layer(loaded, 2).layer_details(), dnn.layer(loaded, 0).layer_details()
    assert (c.groups, c.dilation_y, c.dilation_x, c.act) == (3, 2, 1, ops.RELU)
    assert (t.padding_y, t.padding_x, t.bias) == (1, 0, False)
    np.testing.assert_array_equal(loaded.forward(x), net.forward(x))
    REF.assert_close(loaded.forward(x), y.astype(np.float64))


def _rec(tag, payload):
    t = tag.encode()
    return struct.pack("<B", len(t)) + t + struct.pack("<Q", len(payload)) + payload


def _file(records):
    body = b"".join(records)
    import zlib
    head = struct.pack("<8sIIQ", b"MINIDNN\x00", 2, len(records), 24 + len(body) + 4)
    return head + body + struct.pack("<I", zlib.crc32(head + body))


def _arr(a):
    a = np.ascontiguousarray(a, "<f4")
    return struct.pack("<BB", 1, a.ndim) + b"".join(struct.pack("<I", d) for d in a.shape) + a.tobytes()


def test_con_2_and_con_1_still_load():
    """Older con records (written by hand from docs/FORMAT.md) load as groups = 1, no dilation."""
    w = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) / 50
    b = np.array([0.5, -1], np.float32)
    geo = b"".join(struct.pack("<I", v) for v in (2, 3, 3, 1, 1, 1, 1))
    relu = struct.pack("<B", 4) + b"relu" + struct.pack("<d", 0.0)
    con2 = _rec("con_2", b"\x00" + geo + b"\x01" + relu + _arr(w) + _arr(b))
    con1 = _rec("con_1", b"\x00" + geo + b"\x01" + b"\x01" + _arr(w) + _arr(b))
    inp_ = _rec("input_tensor_2", b"\x00" + struct.pack("<III", 3, 5, 5))
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 5)).astype(np.float32)
    ref = REF.relu(REF.conv2d(x, w, b, 1, 1, 1, 1))
    for rec in (con2, con1):
        net = dnn.deserialize(_file([rec, inp_]))
        l = net.layer_details()
        assert (l.groups, l.dilation_y, l.dilation_x, l.act) == (1, 1, 1, ops.RELU)
        REF.assert_close(net.forward(x), ref)
        assert b"con_3" in dnn.serialize(net)


def test_bad_records_are_refused():
    net = dnn.con(4, 3, 3, 1, 1, dnn.input_tensor(), groups=2)
    net.forward(np.zeros((1, 4, 5, 5), np.float32))
    data = bytearray(dnn.serialize(net))
    i = data.index(b"con_3") + 5 + 8 + 1 + 7 * 4 + 1 + 1 + 8 + 8   # ... act "identity", then groups
    assert struct.unpack_from("<I", data, i)[0] == 2
    struct.pack_into("<I", data, i, 3)                               # 4 filters in 3 groups
    import zlib
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    with pytest.raises(dnn.SerializationError, match="layer<0> record 'con_3'.*multiple of groups"):
        dnn.deserialize(bytes(data))


# ------------------------------------------------------------------ PyTorch cross-checks
@pytest.fixture(scope="module")
def torch():
    """PyTorch, imported only by the cross-checks (skipped when it is not installed)."""
    return pytest.importorskip("torch")


def _t(a):
    import torch
    return torch.tensor(np.asarray(a, np.float64))


@pytest.mark.parametrize("case", [c for c in CASES if c.id.startswith(("dw", "grouped", "dilated", "cont"))],
                         ids=lambda c: c.id)
def test_layers_match_pytorch(case, torch):
    net, x = _net(case)
    l = net.layer_details()
    w, b = _t(l.filters), None if l.biases is None else _t(l.biases)
    if isinstance(l, dnn.cont_):
        ref = torch.nn.functional.conv_transpose2d(_t(x), w, b, (l.stride_y, l.stride_x),
                                                   (l.padding_y, l.padding_x))
    else:
        ref = torch.nn.functional.conv2d(_t(x), w, b, (l.stride_y, l.stride_x), (l.padding_y, l.padding_x),
                                         (l.dilation_y, l.dilation_x), l.groups)
    REF.assert_close(net.forward(x), ref.numpy())


def test_references_match_pytorch(torch):
    """The float64 references themselves, forward and both gradients, on a spread of shapes."""
    rng = np.random.default_rng(7)
    for _ in range(10):
        g = int(rng.integers(1, 4))
        K, F = g * int(rng.integers(1, 3)), g * int(rng.integers(1, 3))
        nr, nc, sy, sx = (int(v) for v in rng.integers(1, 4, 4))
        dy, dx = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        py, px = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        R_, C = int(rng.integers(7, 12)), int(rng.integers(7, 12))
        x = rng.standard_normal((2, K, R_, C))
        w = rng.standard_normal((F, K // g, nr, nc))
        tx, tw = _t(x).requires_grad_(), _t(w).requires_grad_()
        out = torch.nn.functional.conv2d(tx, tw, None, (sy, sx), (py, px), (dy, dx), g)
        dyv = rng.standard_normal(tuple(out.shape))
        (out * _t(dyv)).sum().backward()
        np.testing.assert_allclose(REF.conv2d_grouped(x, w, None, sy, sx, py, px, dy, dx, g),
                                   out.detach().numpy(), atol=1e-10)
        np.testing.assert_allclose(REF.conv2d_grouped_grad_data(dyv, w, x.shape, sy, sx, py, px, dy, dx, g),
                                   tx.grad.numpy(), atol=1e-10)
        np.testing.assert_allclose(REF.conv2d_grouped_grad_params(x, dyv, w.shape, sy, sx, py, px, dy, dx, g)[0],
                                   tw.grad.numpy(), atol=1e-10)
        wt = rng.standard_normal((K, F, nr, nc))
        pty, ptx = min(py, nr - 1), min(px, nc - 1)
        np.testing.assert_allclose(REF.conv2d_transpose(x, wt, None, sy, sx, pty, ptx),
                                   torch.nn.functional.conv_transpose2d(_t(x), _t(wt), None, (sy, sx),
                                                                        (pty, ptx)).numpy(), atol=1e-10)


# ------------------------------------------------------------------ kernels: every route, every edge
def _check_grouped(case, routes, data=None):
    """conv2d_grouped on each route with the bias (linear), without bias + relu, with the
    bias + silu (a transcendental epilogue), against the reference."""
    N, K, R_, C, F, nr, nc, sy, sx, py, px, dy, dx, g = case
    rng = _rng(*case)
    x = rng.standard_normal((N, K, R_, C)).astype(np.float32)
    w = (rng.standard_normal((F, K // g, nr, nc)) / np.sqrt(K // g * nr * nc)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32)
    ref = REF.conv2d_grouped(x, w, None, sy, sx, py, px, dy, dx, g)
    bref = ref + b.astype(np.float64)[None, :, None, None]
    for route, vec, padded in routes:
        _cpu_depthwise._set_grouped_path(route)
        _cpu_depthwise._set_depthwise_vector(vec)
        _cpu_depthwise._set_depthwise_padded(padded)
        assert _cpu_depthwise._grouped_route_for(x.shape, w.shape, g) == \
            ("depthwise" if route == "depthwise" or (route == "auto" and g == K) else "gemm")
        for nt in (1, 2):
            cpu.set_num_threads(nt)
            y = np.full(ref.shape, np.nan, np.float32)
            cpu.conv2d_grouped(x, w, b, y, sy, sx, py, px, dy, dx, g, False)
            REF.assert_close(y, bref)
            y[...] = np.nan
            cpu.conv2d_grouped(x, w, None, y, sy, sx, py, px, dy, dx, g, True)
            REF.assert_close(y, REF.relu(ref))
            y[...] = np.nan
            cpu.conv2d_grouped(x, w, b, y, sy, sx, py, px, dy, dx, g, SILU)
            REF.assert_close(y, REF.activation(bref, SILU))


def _dw(N, K, R_, C, nr, nc, sy, sx, py, px, dy=1, dx=1, m=1):
    return (N, K, R_, C, K * m, nr, nc, sy, sx, py, px, dy, dx, K)


# Depthwise: output widths around the vector block (Co = 1..9, 15..17, 23..25: blocks
# of 8, a masked last block of 1..7 lanes), interior ranges [lo, hi) shorter than,
# equal to and longer than a block (pads 0..2 shift them), stride 2 blocks whose last
# (odd) input is the row's end (C even and odd), strides 3 (gathers), dilations 1..3,
# every compiled variant (3x3s1, 3x3s2, 5x5s1, 5x5s2, any), channel multipliers, window
# rows in the padding (pad = span - 1), 1-row and 1-column images, and enough planes
# for 2 threads (work >= MIN_PARALLEL_WORK).
DW_CASES = (
    [_dw(1, 3, 3, C, 3, 3, 1, 1, 1, 1) for C in (1, 2, 3, 7, 8, 9, 10, 15, 16, 17, 18, 23, 24, 25)]
    + [_dw(2, 2, 5, C, 3, 3, 2, 2, 1, 1) for C in (1, 2, 3, 15, 16, 17, 18, 31, 32, 33, 34)]
    + [_dw(1, 2, 6, C, 5, 5, 1, 1, 2, 2) for C in (1, 4, 8, 11, 12, 13, 20, 21)]
    + [_dw(2, 2, 7, C, 5, 5, 2, 2, p, p) for C in (5, 16, 19, 36) for p in (0, 2)]
    + [_dw(1, 3, 7, 21, 3, 3, 1, 1, p, q) for p, q in ((0, 0), (0, 2), (2, 1))]
    + [_dw(1, 2, 11, 30, 3, 3, 3, 3, 1, 1), _dw(2, 3, 9, 41, 3, 2, 3, 2, 2, 1),
       _dw(1, 2, 9, 27, 1, 1, 1, 1, 0, 0), _dw(1, 2, 9, 27, 1, 1, 2, 3, 0, 0),
       _dw(1, 2, 8, 26, 2, 4, 1, 1, 1, 3), _dw(1, 2, 1, 19, 1, 3, 1, 1, 0, 1),
       _dw(1, 2, 19, 1, 3, 1, 1, 1, 1, 0), _dw(1, 1, 4, 4, 4, 4, 1, 1, 3, 3)]
    + [_dw(1, 2, 13, 29, 3, 3, 1, 1, d, e, d, e) for d, e in ((2, 2), (3, 1), (1, 3))]
    + [_dw(2, 3, 12, 25, 3, 3, 2, 2, 2, 3, 2, 3), _dw(1, 2, 9, 35, 5, 3, 1, 2, 4, 4, 2, 3),
       _dw(1, 2, 11, 40, 3, 3, 1, 2, 1, 1, 1, 2)]
    + [_dw(1, 3, 8, 13, 3, 3, 1, 1, 1, 1, m=m) for m in (2, 3)]
    + [_dw(2, 5, 9, 10, 3, 3, 2, 2, 1, 1, m=2), _dw(1, 2, 9, 18, 5, 5, 2, 1, 2, 2, m=4)]
    + [_dw(2, 32, 28, 28, 3, 3, 1, 1, 1, 1), _dw(1, 24, 29, 30, 3, 3, 2, 2, 1, 1),
       _dw(3, 17, 14, 14, 5, 5, 1, 1, 2, 2)]
)
# (route, vector blocks, padded-plane variant)
DW_ROUTES = [("auto", True, "auto"), ("depthwise", True, "never"), ("depthwise", False, "auto"),
             ("gemm", True, "auto")]


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "_".join(map(str, c)))
def test_depthwise_routes(case):
    _check_grouped(case, DW_ROUTES if AVX2 else DW_ROUTES[2:])


def test_depthwise_padded_buffer_limit():
    """A plane whose padded buffer fits DW_PAD_MAX_BYTES is copied; one just past it is read
    in place (masked border blocks): both against the reference."""
    for C, padded in ((1000, True), (1020, False)):
        case = _dw(1, 1, C, C, 3, 3, 1, 1, 1, 1)
        plan = _cpu_depthwise._dw_plan_for((1, 1, C, C), (1, 1, 3, 3), 1, 1, 1, 1)
        assert plan["padded"] == (padded and AVX2), plan
        assert (4 * plan["Rp"] * plan["Wb"] <= DW_PAD_MAX_BYTES) == padded
        rng = _rng(C)
        x = rng.standard_normal((1, 1, C, C)).astype(np.float32)
        w = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
        y = np.full((1, 1, C, C), np.nan, np.float32)
        cpu.conv2d_grouped(x, w, None, y, 1, 1, 1, 1, 1, 1, 1, True)
        REF.assert_close(y, REF.relu(REF.conv2d_grouped(x, w, None, 1, 1, 1, 1)))


def test_depthwise_variants():
    v = _cpu_depthwise._depthwise_variant
    assert [v(3, 3, 1, 1), v(3, 3, 2, 1), v(5, 5, 1, 1), v(5, 5, 2, 1)] == ["3x3s1", "3x3s2", "5x5s1", "5x5s2"]
    assert {v(3, 3, 1, 2), v(3, 3, 3, 1), v(3, 5, 1, 1), v(1, 1, 1, 1)} == {"any"}
    seen = {v(c[5], c[6], c[8], c[12]) for c in DW_CASES}
    assert seen == {"3x3s1", "3x3s2", "5x5s1", "5x5s2", "any"}


# Grouped (1 < g < K) and dilated ungrouped convolutions: the gemm route's pixel chunks
# (GR_PW_BYTES / (4 K/g nr nc) columns, rounded to 16, at least GR_MIN_PW), halved at 2
# threads until 4 tasks per thread, the direct 1x1 mode, dilation 1..3 with strides 1..3.
GR_CASES = [
    (1, 4, 6, 7, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2), (2, 6, 9, 8, 6, 3, 2, 2, 1, 2, 1, 1, 1, 3),
    (3, 6, 4, 5, 4, 1, 1, 1, 1, 0, 0, 1, 1, 2),          # direct 1x1
    (2, 6, 5, 6, 4, 1, 1, 2, 1, 0, 0, 1, 1, 2),          # 1x1 stride 2: im2col
    (1, 2, 8, 9, 3, 3, 3, 1, 1, 2, 2, 2, 2, 1), (1, 3, 13, 10, 3, 3, 2, 3, 2, 2, 0, 3, 2, 1),
    (2, 8, 11, 12, 8, 3, 3, 1, 1, 3, 1, 3, 1, 4), (1, 4, 10, 10, 8, 2, 3, 2, 3, 1, 2, 2, 3, 2),
    (1, 6, 12, 12, 6, 3, 3, 1, 1, 1, 1, 1, 1, 3),
    (1, 64, 20, 20, 64, 3, 3, 1, 1, 1, 1, 1, 1, 2),      # 2 threads: chunks halved
    (4, 12, 9, 9, 24, 3, 3, 1, 1, 1, 1, 1, 1, 4),
]


@pytest.mark.parametrize("case", GR_CASES, ids=lambda c: "_".join(map(str, c)))
def test_grouped_routes(case):
    _check_grouped(case, [("auto", True, "auto")])


@pytest.mark.parametrize("pw_bytes", [4 * 9 * 16, 4 * 9 * 64 - 4, 4 * 9 * 64, 4 * 9 * 80, 4 * 9 * 96 + 4])
def test_grouped_pixel_chunks(pw_bytes):
    """Chunks of 64 (the floor), 64, 80 and 96 columns at K/g*nr*nc = 9 over P = 143, 144,
    145 and 160 pixels: a ragged last chunk of 1..15 columns and an exact one."""
    _cpu_depthwise._set_pw_bytes(pw_bytes)
    for C in (11, 12, 13, 16):
        case = (1, 2, 12, C, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2)
        for nt in (1, 2):
            plan = _cpu_depthwise._grouped_plan(case[:4], (4, 1, 3, 3), 1, 1, 1, 1, 1, 1, 2, nt)
            assert plan["pw"] % 16 == 0 and plan["pw"] >= GR_MIN_PW
            if nt == 1:
                assert plan["pw"] == max(GR_MIN_PW, pw_bytes // 36 // 16 * 16)
        _check_grouped(case, [("gemm", True, "auto")])


def test_grouped_plan_cuts():
    p = _cpu_depthwise._grouped_plan
    assert p((1, 4, 100, 100), (8, 2, 3, 3), 1, 1, 1, 1, 1, 1, 2, 1) == dict(
        pw=GR_PW_BYTES // (4 * 18) // 16 * 16, n_pc=-(-10000 // (GR_PW_BYTES // 72 // 16 * 16)),
        tasks=2 * -(-10000 // (GR_PW_BYTES // 72 // 16 * 16)), direct=False,
        ws_per_thread=18 * (GR_PW_BYTES // 72 // 16 * 16))
    # at 2 threads: halved until 4 tasks per thread (or the floor)
    assert p((1, 4, 16, 16), (8, 2, 3, 3), 1, 1, 1, 1, 1, 1, 2, 2)["tasks"] >= 8
    assert p((1, 4, 9, 9), (8, 2, 3, 3), 1, 1, 1, 1, 1, 1, 2, 2)["pw"] == GR_MIN_PW
    assert p((2, 4, 9, 9), (8, 2, 1, 1), 1, 1, 0, 0, 1, 1, 2, 2)["direct"]


# conv2d_transpose: the channel block fw = TR_COL_BYTES / (4 nr nc R C) (at least 1), the
# 2-thread channel split when the samples do not divide among the threads, the direct
# 1x1 mode, strides 1..3 with windows that overlap (stride < n) and leave gaps (stride > n).
TR_CASES = [
    (1, 3, 4, 5, 2, 4, 4, 2, 2, 1, 1), (2, 4, 5, 6, 3, 4, 4, 2, 2, 0, 0), (1, 2, 6, 5, 3, 3, 3, 1, 1, 1, 1),
    (3, 2, 4, 3, 3, 5, 4, 3, 2, 2, 1), (2, 4, 3, 3, 3, 1, 1, 1, 1, 0, 0), (1, 3, 4, 4, 2, 1, 1, 2, 3, 0, 0),
    (1, 2, 3, 4, 2, 2, 2, 3, 3, 0, 1), (2, 3, 5, 5, 4, 3, 3, 3, 3, 1, 2), (1, 16, 9, 9, 17, 4, 4, 2, 2, 1, 1),
    (3, 8, 7, 6, 9, 3, 3, 2, 2, 1, 1), (1, 1, 1, 1, 3, 3, 3, 1, 1, 0, 0),
]


def _check_transpose(case):
    N, K, R_, C, F, nr, nc, sy, sx, py, px = case
    rng = _rng(*case)
    x = rng.standard_normal((N, K, R_, C)).astype(np.float32)
    w = rng.standard_normal((K, F, nr, nc)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32)
    ref = REF.conv2d_transpose(x, w, None, sy, sx, py, px)
    bref = ref + b.astype(np.float64)[None, :, None, None]
    for nt in (1, 2):
        cpu.set_num_threads(nt)
        y = np.full(ref.shape, np.nan, np.float32)
        cpu.conv2d_transpose(x, w, b, y, sy, sx, py, px, False)
        REF.assert_close(y, bref)
        y[...] = np.nan
        cpu.conv2d_transpose(x, w, None, y, sy, sx, py, px, True)
        REF.assert_close(y, REF.relu(ref))
        y[...] = np.nan
        cpu.conv2d_transpose(x, w, b, y, sy, sx, py, px, SILU)
        REF.assert_close(y, REF.activation(bref, SILU))


@pytest.mark.parametrize("case", TR_CASES, ids=lambda c: "_".join(map(str, c)))
def test_transpose(case):
    _check_transpose(case)


@pytest.mark.parametrize("fw", [1, 2, 3, 5, 16, 17])
def test_transpose_channel_blocks(fw):
    """Channel blocks of fw out of F = 17 (a ragged last block) and 16 (exact at 2, 16),
    the knob set so that fw channels' columns just fit."""
    for F in (16, 17):
        case = (1, 3, 4, 5, F, 3, 3, 2, 2, 1, 1)
        _cpu_conv._set_tr_col_bytes(4 * 9 * 20 * fw + 3)
        plan = _cpu_conv._tr_plan_for(case[:4], (3, F, 3, 3), 2, 2, 1, 1, 1)
        assert plan["fw"] == min(fw, F) and plan["n_fb"] == -(-F // min(fw, F))
        _check_transpose(case)


def test_transpose_plan_cuts():
    p = _cpu_conv._tr_plan_for
    assert p((1, 8, 10, 10), (8, 4, 4, 4), 2, 2, 1, 1, 1)["fw"] == 4       # all 4 channels fit
    assert p((1, 8, 10, 10), (8, 4, 4, 4), 2, 2, 1, 1, 2)["n_fb"] == 2     # 2 threads, 1 sample
    assert p((3, 8, 10, 10), (8, 4, 4, 4), 2, 2, 1, 1, 2)["tasks"] % 2 == 0
    assert p((2, 8, 10, 10), (8, 4, 4, 4), 2, 2, 1, 1, 2)["n_fb"] == 1     # 2 samples: no split
    assert p((1, 8, 100, 100), (8, 64, 4, 4), 2, 2, 1, 1, 1)["fw"] == 1
    assert p((2, 8, 5, 5), (8, 4, 1, 1), 1, 1, 0, 0, 1)["direct"]


GRAD_CASES = [
    (2, 4, 7, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2), (3, 6, 5, 6, 6, 3, 2, 2, 1, 1, 0, 2, 1, 3),
    (2, 4, 9, 9, 8, 3, 3, 2, 2, 1, 1, 1, 1, 4), (3, 6, 4, 5, 4, 1, 1, 1, 1, 0, 0, 1, 1, 2),
    (1, 3, 11, 10, 3, 3, 3, 1, 2, 2, 2, 3, 2, 1), (5, 8, 12, 12, 16, 3, 3, 1, 1, 1, 1, 1, 1, 8),
    (3, 16, 10, 10, 16, 3, 3, 1, 1, 2, 2, 2, 2, 4),      # 2 threads: 3 samples over 2 parts
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "_".join(map(str, c)))
def test_grouped_grads(case):
    N, K, R_, C, F, nr, nc, sy, sx, py, px, dy, dx, g = case
    rng = _rng(*case)
    x = rng.standard_normal((N, K, R_, C)).astype(np.float32)
    w = rng.standard_normal((F, K // g, nr, nc)).astype(np.float32)
    d = rng.standard_normal((N, F, _out(R_, nr, sy, py, dy), _out(C, nc, sx, px, dx))).astype(np.float32)
    dx_ref = REF.conv2d_grouped_grad_data(d, w, x.shape, sy, sx, py, px, dy, dx, g)
    dw_ref, db_ref = REF.conv2d_grouped_grad_params(x, d, w.shape, sy, sx, py, px, dy, dx, g)
    for nt in (1, 2):
        cpu.set_num_threads(nt)
        got = np.full(x.shape, np.nan, np.float32)
        cpu_grad.conv2d_grouped_grad_data(d, w, got, sy, sx, py, px, dy, dx, g)
        REF.assert_close(got, dx_ref)
        gw, gb = np.full(w.shape, np.nan, np.float32), np.full(F, np.nan, np.float32)
        cpu_grad.conv2d_grouped_grad_params(x, d, gw, gb, sy, sx, py, px, dy, dx, g)
        REF.assert_close(gw, dw_ref)
        REF.assert_close(gb, db_ref)
        gw[...] = np.nan
        cpu_grad.conv2d_grouped_grad_params(x, d, gw, None, sy, sx, py, px, dy, dx, g)
        REF.assert_close(gw, dw_ref)


def test_deterministic_across_runs():
    x = _rng(1).standard_normal((2, 32, 28, 28)).astype(np.float32)
    w = _rng(2).standard_normal((64, 1, 3, 3)).astype(np.float32)
    y1, y2 = (np.empty((2, 64, 28, 28), np.float32) for _ in range(2))
    cpu.set_num_threads(2)
    cpu.conv2d_grouped(x, w, None, y1, 1, 1, 1, 1, 1, 1, 32, True)
    cpu.set_num_threads(1)
    cpu.conv2d_grouped(x, w, None, y2, 1, 1, 1, 1, 1, 1, 32, True)
    np.testing.assert_array_equal(y1, y2)       # one thread sums each output, in one order


def test_blocking_constants():
    """The constants this file walks are the kernels' own (docs/INTERNALS.md's table)."""
    k = _cpu_depthwise._blocking()
    assert k["dw_block"] == DW_BLOCK and k["dw_pad_max_bytes"] == DW_PAD_MAX_BYTES and k["gr_pw_bytes"] == GR_PW_BYTES and k["gr_min_pw"] == GR_MIN_PW
    assert _cpu_conv._set_tr_col_bytes(TR_COL_BYTES) == TR_COL_BYTES
    assert _cpu_depthwise._set_pw_bytes(GR_PW_BYTES) == GR_PW_BYTES


def test_trains():
    """A small depthwise-separable + transposed-convolution net learns (dnn_trainer)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 2, 6, 6)).astype(np.float32)
    t = (x[:, :1] * 0.5 - x[:, 1:] * 0.25).repeat(2, axis=2).repeat(2, axis=3)   # (64, 1, 12, 12)
    dnn.set_seed(0)
    net = dnn.loss_mean_squared(dnn.cont(1, 2, 2, 2, 2, dnn.con(4, 1, 1, 1, 1, dnn.relu(dnn.con(
        4, 3, 3, 1, 1, dnn.con(4, 1, 1, 1, 1, dnn.input_tensor()), groups=4)))))
    out = net.subnet().forward(x)
    assert out.shape == t.shape
    before = float(((out - t) ** 2).sum() / len(x))
    tr = dnn.dnn_trainer(net, dnn.adam())
    tr.set_learning_rate(0.01)
    tr.set_mini_batch_size(16)
    tr.set_max_num_epochs(30)
    tr.be_quiet()
    tr.train(x, t.reshape(len(x), -1))
    after = float(((net.subnet().forward(x) - t) ** 2).sum() / len(x))
    assert after < 0.2 * before, (before, after)


# ------------------------------------------------------------------ the 3x3 plane loop (mdnn_dw_plane33)
# The padded-plane 3x3 loop (column stride 1, or 2 from de-interleaved rows): row strides
# and dilations other than the column's, pads 0..3 (odd and even: the de-interleaved
# halves swap), input widths around the 16-float de-interleave step (15..17, 31..33),
# output widths around the block (whole stores spill into the next row; the plane's last
# block does not), planes per task around DW_TASK_OUTPUTS (2048) outputs, channel
# multipliers (a filled buffer reused), batch 1 and 3.
DW33_CASES = (
    [_dw(1, 2, 7, C, 3, 3, 2, 2, 1, p) for C in (15, 16, 17, 31, 32, 33) for p in (0, 1, 2, 3)]
    + [_dw(2, 3, 9, C, 3, 3, 1, 2, 1, 1) for C in (5, 8, 17, 18)]
    + [_dw(2, 3, 9, C, 3, 3, 2, 1, 1, 1) for C in (6, 9, 16, 25)]
    + [_dw(1, 2, 10, 19, 3, 3, s, s, 1, 1, 2, 1) for s in (1, 2)]
    + [_dw(3, 4, R_, C, 3, 3, 1, 1, 1, 1, m=m) for R_, C in ((1, 1), (2, 3), (3, 5), (5, 2)) for m in (1, 3)]
    + [_dw(1, 2, R_, C, 3, 3, 1, 1, 1, 1) for R_, C in ((32, 64), (64, 32), (63, 33), (41, 50))]
    + [_dw(3, 5, 8, 8, 3, 3, 2, 2, 1, 1, m=2), _dw(1, 40, 7, 7, 3, 3, 1, 1, 1, 1),
       _dw(1, 48, 14, 14, 3, 3, 2, 2, 1, 1), _dw(2, 6, 45, 45, 3, 3, 1, 1, 1, 1)]
)


@pytest.mark.parametrize("case", DW33_CASES, ids=lambda c: "_".join(map(str, c)))
@pytest.mark.parametrize("pairs,stream", [(True, False), (False, False), (True, True), (False, True)])
def test_depthwise_3x3_plane_loop(case, pairs, stream):
    """stream: every output streamed (DW_STREAM_BYTES = 0) where a block is 16-byte aligned."""
    assert _cpu_depthwise._dw_plan_for(case[:1] + case[1:4], (case[4], 1) + case[5:7], *case[7:13])["padded"] == AVX2
    _cpu_depthwise._set_depthwise_row_pairs(pairs)
    _cpu_depthwise._set_depthwise_stream_bytes(0 if stream else 16 << 20)
    _check_grouped(case, DW_ROUTES[:3] if AVX2 else DW_ROUTES[2:3])


DW_EPILOGUES = ["identity", "relu", "clipped_relu", "leaky_relu", "prelu", "smelu", "sig", "htan",
                "elu", "gelu", "mish", "silu"]


@pytest.mark.parametrize("name", DW_EPILOGUES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("stream", [False, True])
def test_depthwise_3x3_epilogues(name, stride, stream):
    """Every activation fused into the 3x3 loop: the cheap ones in registers, the others
    over the finished rows (planes of more than 1024 outputs flush them in pieces), against
    the reference and equal bit for bit to the activation run separately."""
    act = ops.act_by_name(name, 0.5 if name in ("leaky_relu", "prelu", "elu", "smelu") else 6.0)
    _cpu_depthwise._set_depthwise_stream_bytes(0 if stream else 16 << 20)
    for N, K, R_, C in ((2, 3, 45, 47), (1, 5, 7, 9), (2, 4, 16, 16)):
        rng = _rng(N, K, R_, C, stride)
        x = (rng.standard_normal((N, K, R_, C)) * 2).astype(np.float32)
        w = rng.standard_normal((K, 1, 3, 3)).astype(np.float32)
        b = rng.standard_normal(K).astype(np.float32)
        ref = REF.conv2d_grouped(x, w, None, stride, stride, 1, 1, 1, 1, K) + b.astype(np.float64)[None, :, None, None]
        for nt in (1, 2):
            cpu.set_num_threads(nt)
            lin = np.full(ref.shape, np.nan, np.float32)
            cpu.conv2d_grouped(x, w, b, lin, stride, stride, 1, 1, 1, 1, K, False)
            y = np.full(ref.shape, np.nan, np.float32)
            cpu.conv2d_grouped(x, w, b, y, stride, stride, 1, 1, 1, 1, K, act)
            REF.assert_close(y, REF.activation(ref, act))
            sep = np.empty_like(lin)
            cpu.activation(lin, sep, act)
            np.testing.assert_array_equal(y, sep)


def test_depthwise_tasks():
    """Small planes are handed out in runs of whole planes (at least DW_TASK_OUTPUTS outputs
    a task while there are 4 tasks a thread); the result does not depend on the split."""
    k = _cpu_depthwise._blocking()
    assert k["dw_task_outputs"] == 2048 and k["dw_tasks_per_thread"] == 4
    assert k["dw_stream_bytes"] == 16 << 20
    t = _cpu_depthwise._dw_tasks_for
    assert t((1, 960, 7, 7), (960, 1, 3, 3), 1, 1, 1, 1, 2) == (42, 23)      # ceil(2048 / 49)
    assert t((1, 32, 7, 7), (32, 1, 3, 3), 1, 1, 1, 1, 2) == (4, 8)          # 4 tasks a thread
    assert t((1, 32, 112, 112), (32, 1, 3, 3), 1, 1, 1, 1, 2) == (1, 32)
    assert t((1, 3, 7, 7), (3, 1, 3, 3), 1, 1, 1, 1, 2) == (1, 3)
    assert t((1, 960, 7, 7), (960, 1, 3, 3), 1, 1, 1, 1, 1) == (42, 23)
    for shape in ((1, 960, 7, 7), (2, 100, 45, 45), (1, 64, 32, 64)):
        rng = _rng(*shape)
        x = rng.standard_normal(shape).astype(np.float32)
        w = rng.standard_normal((shape[1], 1, 3, 3)).astype(np.float32)
        ys = []
        for nt in (1, 2):
            cpu.set_num_threads(nt)
            ys.append(np.full(shape, np.nan, np.float32))
            cpu.conv2d_grouped(x, w, None, ys[-1], 1, 1, 1, 1, 1, 1, shape[1], RELU6)
        np.testing.assert_array_equal(ys[0], ys[1])
        REF.assert_close(ys[0], REF.activation(REF.conv2d_grouped(x, w, None, 1, 1, 1, 1, 1, 1, shape[1]), RELU6))


def test_depthwise_buffer_borders_between_calls():
    """The padded buffers' borders are zeroed once a call: a call after a wider, taller one
    (the grow-only workspace holding its data) still reads zeros in the padding."""
    for shape, s in (((1, 2, 40, 40), 1), ((1, 2, 9, 11), 1), ((1, 2, 40, 40), 2), ((1, 2, 9, 11), 2),
                     ((1, 2, 3, 30), 1), ((1, 2, 30, 3), 2)):
        rng = _rng(*shape, s)
        x = (rng.standard_normal(shape) + 5).astype(np.float32)
        w = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
        Ro, Co = _out(shape[2], 3, s, 1), _out(shape[3], 3, s, 1)
        y = np.full((1, 2, Ro, Co), np.nan, np.float32)
        cpu.conv2d_grouped(x, w, None, y, s, s, 1, 1, 1, 1, 2, False)
        REF.assert_close(y, REF.conv2d_grouped(x, w, None, s, s, 1, 1, 1, 1, 2))


@pytest.mark.skipif(not AVX2, reason="no AVX2 build")
@pytest.mark.parametrize("case", [c for c in DW33_CASES if c[5:7] == (3, 3)][::3], ids=lambda c: "_".join(map(str, c)))
def test_depthwise_3x3_plane_loop_equals_the_scalar_loop(case):
    """The 3x3 plane loop sums each output in the scalar loop's order (the bias, then the
    taps row by row): where the window lies inside the image the vector and scalar routes
    agree bit for bit; at the border (the scalar loop skips the taps in the padding, the
    vector one adds their zeros, and GCC fuses the scalar loop's border cases
    differently) within the reference's tolerance."""
    N, K, R_, C, F, nr, nc, sy, sx, py, px, dy, dx, g = case
    rng = _rng(*case)
    x = rng.standard_normal((N, K, R_, C)).astype(np.float32)
    w = rng.standard_normal((F, 1, nr, nc)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32)
    ys = []
    for vec in (True, False):
        _cpu_depthwise._set_depthwise_vector(vec)
        ys.append(np.full((N, F, _out(R_, nr, sy, py, dy), _out(C, nc, sx, px, dx)), np.nan, np.float32))
        cpu.conv2d_grouped(x, w, b, ys[-1], sy, sx, py, px, dy, dx, g, RELU6)
    iy = np.arange(ys[0].shape[2]) * sy - py
    ix = np.arange(ys[0].shape[3]) * sx - px
    inside = ((iy >= 0) & (iy + 2 * dy < R_))[:, None] & ((ix >= 0) & (ix + 2 * dx < C))[None, :]
    np.testing.assert_array_equal(ys[0][..., inside], ys[1][..., inside])
    REF.assert_close(ys[0], ys[1].astype(np.float64))

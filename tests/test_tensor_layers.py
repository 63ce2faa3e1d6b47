"""The catalogue's tensor and routing layers (issue 12): softmax_all, l2normalize, dropout,
multiply, extract, reorg, upsample, resize_to, resize_prev_to_taggedN, concat, mult_prevN,
scaleN, scale_prevN.

Every case through tests/harness.py (the compiled forward on every backend against the
float64 reference, fused and reloaded; batch 1 and 3; the backward against finite
differences), print(net) as dlib prints it, the file records, PyTorch cross-checks in
float64, dropout's seeded masks (reproducible, resumable), fuse() folding multiply and
dropout, concat's zero-copy plan rewriting, and the kernels' edges and argument checks."""
import io
import sys
from typing import Callable, NamedTuple

import numpy as np
import pytest

import minidnn as dnn
from minidnn import ops
from minidnn.train import Tape

import reference as R
from harness import check_forward, check_gradients, randomize

ser = sys.modules["minidnn.serialize"]
inp = dnn.input_tensor


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class Case(NamedTuple):
    id: str
    make: Callable          # make(subnet) -> net
    shape: tuple            # the input (N, K, R, C)


def _se(s):                 # squeeze-and-excitation: scales (N, 4, 1, 1) from the tagged features
    return dnn.scale_prev2(dnn.skip1(dnn.tag2(dnn.sig(dnn.fc(4, dnn.avg_pool_everything(
        dnn.tag1(dnn.con(4, 1, 1, 1, 1, s))))))))


def _inception(s):
    return dnn.concat(dnn.tag1, dnn.tag2, dnn.tag3, dnn.tag3(dnn.con(2, 5, 5, 1, 1, dnn.skip4(
        dnn.tag2(dnn.con(3, 3, 3, 1, 1, dnn.skip4(dnn.tag1(dnn.con(1, 1, 1, 1, 1, dnn.tag4(s))))))))))


def _dense(s):              # DenseNet-style: each concat feeds the next one (nested zero copy)
    c1 = dnn.concat(dnn.tag1, dnn.tag2, dnn.tag2(dnn.relu(dnn.con(2, 3, 3, 1, 1, dnn.tag1(
        dnn.con(3, 1, 1, 1, 1, s))))))
    return dnn.concat(dnn.tag3, dnn.tag4, dnn.tag4(dnn.con(2, 3, 3, 1, 1, dnn.tag3(c1))))


CASES = [
    Case("softmax_all", lambda s: dnn.softmax_all(dnn.con(4, 1, 1, 1, 1, s)), (2, 3, 3, 4)),
    Case("softmax_all-fc", lambda s: dnn.softmax_all(dnn.fc(7, s)), (3, 2, 2, 2)),
    Case("l2normalize", lambda s: dnn.l2normalize(dnn.fc(5, s)), (3, 2, 3, 3)),
    Case("l2normalize-conv", lambda s: dnn.l2normalize(dnn.con(3, 1, 1, 1, 1, s), eps=0.5),
         (2, 2, 5, 3)),
    Case("multiply", lambda s: dnn.multiply(dnn.con(3, 1, 1, 1, 1, s), val=0.7), (2, 2, 5, 4)),
    Case("multiply-relu", lambda s: dnn.multiply(dnn.relu(dnn.con(3, 1, 1, 1, 1, s))), (1, 2, 4, 5)),
    Case("multiply-fc-relu", lambda s: dnn.relu(dnn.multiply(dnn.fc(6, s), val=-1.5)), (2, 3, 2, 2)),
    Case("dropout", lambda s: dnn.dropout(dnn.con(3, 1, 1, 1, 1, s), drop_rate=0.3), (2, 2, 5, 6)),
    Case("dropout-fc", lambda s: dnn.fc(3, dnn.relu(dnn.dropout(dnn.fc(8, s)))), (4, 2, 3, 3)),
    Case("extract", lambda s: dnn.extract(2, 2, 2, 3, dnn.con(4, 1, 1, 1, 1, s)), (2, 3, 5, 5)),
    Case("extract-input", lambda s: dnn.relu(dnn.extract(5, 3, 1, 4, s)), (3, 2, 3, 5)),
    Case("extract-all", lambda s: dnn.extract(0, 6, 2, 1, dnn.con(3, 1, 1, 1, 1, s)), (2, 2, 2, 2)),
    Case("reorg", lambda s: dnn.reorg(2, 2, dnn.con(3, 1, 1, 1, 1, s)), (2, 2, 4, 6)),
    Case("reorg-2x3", lambda s: dnn.reorg(2, 3, s), (1, 3, 6, 9)),
    Case("upsample", lambda s: dnn.upsample(2, dnn.con(3, 1, 1, 1, 1, s)), (2, 2, 3, 5)),
    Case("upsample-1x3", lambda s: dnn.upsample(1, s, scale_x=3), (1, 2, 4, 3)),
    Case("resize_to", lambda s: dnn.resize_to(5, 7, dnn.con(3, 1, 1, 1, 1, s)), (2, 2, 3, 4)),
    Case("resize_to-down", lambda s: dnn.resize_to(3, 2, s), (2, 2, 7, 5)),
    Case("resize_to-1x1", lambda s: dnn.resize_to(1, 1, s), (1, 3, 4, 6)),
    Case("resize_to-from-1x1", lambda s: dnn.resize_to(3, 4, dnn.avg_pool_everything(s)), (2, 2, 3, 3)),
    Case("resize_prev_to_tagged", lambda s: dnn.resize_prev_to_tagged1(dnn.con(
        3, 1, 1, 1, 1, dnn.max_pool(2, 2, 2, 2, dnn.tag1(dnn.con(2, 1, 1, 1, 1, s))))), (2, 2, 7, 6)),
    Case("resize_prev_to_tagged-same", lambda s: dnn.resize_prev_to_tagged1(dnn.con(
        3, 1, 1, 1, 1, dnn.tag1(s))), (1, 2, 4, 4)),
    Case("mult_prev", lambda s: dnn.mult_prev1(dnn.con(3, 1, 1, 1, 1, dnn.tag1(dnn.con(
        3, 1, 1, 1, 1, s)))), (2, 2, 4, 5)),
    Case("mult_prev-padded", lambda s: dnn.mult_prev1(dnn.con(2, 3, 3, 1, 1, dnn.max_pool(
        2, 2, 2, 2, dnn.tag1(dnn.con(3, 1, 1, 1, 1, s))))), (2, 2, 5, 6)),
    Case("scale", lambda s: dnn.scale1(dnn.sig(dnn.fc(4, dnn.avg_pool_everything(dnn.tag1(
        dnn.con(4, 1, 1, 1, 1, s)))))), (2, 2, 5, 5)),
    Case("scale_prev-se", _se, (3, 2, 4, 5)),
    Case("concat-inception", _inception, (2, 2, 5, 6)),
    Case("concat-dense", _dense, (1, 2, 4, 4)),
    Case("concat-relu", lambda s: dnn.relu(dnn.concat(dnn.tag1, dnn.tag2, dnn.tag2(dnn.con(
        2, 1, 1, 1, 1, dnn.tag1(dnn.con(3, 1, 1, 1, 1, s)))))), (1, 2, 3, 3)),
    Case("concat-same-tag-twice", lambda s: dnn.concat(dnn.tag1, dnn.tag2, dnn.tag1, dnn.tag2(
        dnn.con(2, 1, 1, 1, 1, dnn.tag1(dnn.con(3, 1, 1, 1, 1, s))))), (1, 2, 3, 4)),
    Case("concat-of-input", lambda s: dnn.relu(dnn.concat(dnn.tag1, 2, dnn.tag2(dnn.con(
        2, 1, 1, 1, 1, dnn.tag1(s))))), (1, 2, 3, 3)),
]
IDS = [c.id for c in CASES]


def _net(case, seed=0, batch=None):
    dnn.set_seed(seed)
    net = case.make(inp())
    shape = case.shape if batch is None else (batch,) + case.shape[1:]
    x = rand(*shape, seed=seed + 1)
    net.forward(x)
    randomize(net)
    return net, x


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_fused_and_reloaded(case, device):
    net, x = _net(case)
    check_forward(net, x, device)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_batch_sizes(case, batch, device):
    net, x = _net(case, batch=batch)
    check_forward(net, x, device, fuse=False, reload=False)


@pytest.fixture
def fewer_coords(monkeypatch):
    """Central differences at 40 random coordinates per tensor (the harness takes 160): these
    layers are linear or smooth, and the parameters checked belong to the layers below."""
    import harness
    monkeypatch.setattr(harness, "MAX_COORDS", 40)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients(case, fewer_coords):
    net, x = _net(case)
    assert check_gradients(net, x) >= 1


@pytest.mark.parametrize("case", CASES[::6], ids=IDS[::6])
def test_gradients_through_a_loss(case, fewer_coords):
    net, x = _net(case)
    net = dnn.loss_mean_squared(net)
    out = net.subnet().forward(x)
    assert check_gradients(net, x, rand(*out.shape, seed=7).reshape(out.shape[0], -1)) >= 1


@pytest.mark.parametrize("case", [c for c in CASES if c.id.startswith("concat")],
                         ids=[c.id for c in CASES if c.id.startswith("concat")])
def test_every_node_output_survives_the_zero_copy_rewrite(case):
    """At batch 1 the producers write into the concatenation (Plan.alias); at batch 2 they
    are copied. Every node's get_output() at batch 1 equals its first sample at batch 2."""
    net, x = _net(case, batch=1)
    x2 = np.concatenate([x, rand(*x.shape, seed=9)])
    net.forward(x2)
    two = [n.get_output()[:1] for n in net.chain()]
    net.forward(x)
    assert "copy_range" not in _step_names(net, x.shape) or case.id in (
        "concat-of-input", "concat-same-tag-twice")
    for i, (n, want) in enumerate(zip(net.chain(), two)):
        np.testing.assert_allclose(n.get_output(), want, rtol=1e-6, atol=1e-6,
                                   err_msg=f"layer<{i}>")


# ---------------------------------------------------------------- print(net) as dlib
@pytest.mark.parametrize("make, line", [
    (lambda s: dnn.softmax_all(s), "softmax_all"),
    (lambda s: dnn.l2normalize(s), "l2normalize(eps=1e-05)"),
    (lambda s: dnn.multiply(s), "multiply (val=0.5)"),
    (lambda s: dnn.multiply(s, val=0.25), "multiply (val=0.25)"),
    (lambda s: dnn.dropout(s), "dropout  (drop_rate=0.5)"),
    (lambda s: dnn.extract(2, 2, 2, 3, s), "extract  (offset=2, k=2, nr=2, nc=3)"),
    (lambda s: dnn.reorg(2, 3, s), "reorg    (row_stride=2, col_stride=3)"),
    (lambda s: dnn.upsample(2, s), "upsample (scale_y=2, scale_x=2)"),
    (lambda s: dnn.upsample(2, s, scale_y=3), "upsample (scale_y=3, scale_x=2)"),
    (lambda s: dnn.resize_to(5, 7, s), "resize_to(nr=5, nc=7)"),
    (lambda s: dnn.concat(dnn.tag1, dnn.tag3, dnn.tag3(dnn.tag1(s))), "concat   (1,3)"),
    (lambda s: dnn.mult_prev4(dnn.tag4(s)), "mult_prev4"),
    (lambda s: dnn.scale2(dnn.tag2(s)), "scale2"),
    (lambda s: dnn.scale_prev10(dnn.tag10(s)), "scale_prev10"),
    (lambda s: dnn.resize_prev_to_tagged7(dnn.tag7(s)), "resize_prev_to_tagged7"),
])
def test_print(make, line):
    net = make(inp())
    text = str(net).splitlines()
    assert text[0] == "layer<0>    " + line, text[0]
    assert text[-1].startswith(f"layer<{len(net) - 1}>") and "input_tensor" in text[-1]


# ---------------------------------------------------------------- file records
RECORDS = {"softmax_all_1": dnn.softmax_all_, "l2normalize_1": dnn.l2normalize_,
           "multiply_1": dnn.multiply_, "dropout_1": dnn.dropout_, "extract_1": dnn.extract_,
           "reorg_1": dnn.reorg_, "upsample_1": dnn.upsample_, "resize_to_1": dnn.resize_to_,
           "resize_prev_to_tagged_1": dnn.resize_prev_to_tagged_, "mult_prev_1": dnn.mult_prev_,
           "scale_1": dnn.scale_, "scale_prev_1": dnn.scale_prev_, "concat_1": dnn.concat_}


def test_every_record_is_registered():
    for tag, cls in RECORDS.items():
        assert ser.RECORDS[tag].cls is cls


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_record_round_trip_is_byte_exact(case):
    net, x = _net(case)
    data = dnn.serialize(net)
    back = dnn.deserialize(data)
    assert dnn.serialize(back) == data
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    assert str(back) == str(net)                 # the same layers, settings and shapes


def test_record_fields():
    net = dnn.concat(dnn.tag2, dnn.tag1, dnn.tag1(dnn.extract(1, 2, 1, 1, dnn.tag2(dnn.dropout(
        dnn.upsample(2, inp(), scale_x=3), drop_rate=0.25)))))
    back = dnn.deserialize(dnn.serialize(net))
    ls = [n.layer_details() for n in back.chain()]
    assert ls[0].ids == (2, 1)
    assert (ls[2].offset, ls[2].k, ls[2].nr, ls[2].nc) == (1, 2, 1, 1)
    assert ls[4].drop_rate == 0.25 and (ls[5].scale_y, ls[5].scale_x) == (2, 3)
    net = dnn.l2normalize(dnn.multiply(dnn.reorg(3, 1, dnn.resize_to(4, 9, inp())), val=-2), eps=3e-3)
    ls = [n.layer_details() for n in dnn.deserialize(dnn.serialize(net)).chain()]
    assert ls[0].eps == 3e-3 and ls[1].val == -2 and (ls[2].row_stride, ls[2].col_stride) == (3, 1)
    assert (ls[3].nr, ls[3].nc) == (4, 9)


def _patched(data, tag, at, value):
    """The file ``data`` with the u32 at payload offset ``at`` of record ``tag`` set to value
    (the CRC recomputed)."""
    import struct
    import zlib
    b = bytearray(data)
    t = tag.encode()
    p = b.index(bytes([len(t)]) + t) + 1 + len(t) + 8 + at
    b[p:p + 4] = struct.pack("<I", value)
    b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])))
    return bytes(b)


@pytest.mark.parametrize("make, tag, at, value, match", [
    (lambda: dnn.concat(dnn.tag1, dnn.tag1(inp())), "concat_1", 0, 0, "tag count 0"),
    (lambda: dnn.concat(dnn.tag1, dnn.tag1(inp())), "concat_1", 4, 2, "no tag2 below"),
    (lambda: dnn.extract(0, 1, 1, 1, inp()), "extract_1", 1 + 4, 0, "k must be an integer >= 1"),
    (lambda: dnn.reorg(2, 2, inp()), "reorg_1", 1 + 4, 0, "col_stride must be"),
    (lambda: dnn.upsample(2, inp()), "upsample_1", 1, 0, "scale_y must be"),
    (lambda: dnn.scale_prev1(dnn.tag1(inp())), "scale_prev_1", 0, 3, "no tag3 below"),
])
def test_bad_records_are_refused(make, tag, at, value, match):
    with pytest.raises(dnn.SerializationError, match=match):
        dnn.deserialize(_patched(dnn.serialize(make()), tag, at, value))


def test_bad_float_settings_are_refused():
    import struct
    import zlib
    data = bytearray(dnn.serialize(dnn.dropout(inp())))
    p = data.index(b"dropout_1") + 9 + 8 + 1
    data[p:p + 8] = struct.pack("<d", 1.5)
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])))
    with pytest.raises(dnn.SerializationError, match=r"drop_rate must be a finite number in \[0, 1\]"):
        dnn.deserialize(bytes(data))


# ---------------------------------------------------------------- construction and shapes
@pytest.mark.parametrize("make, match", [
    (lambda: dnn.dropout(inp(), drop_rate=1.5), "drop_rate"),
    (lambda: dnn.dropout(inp(), drop_rate=-0.1), "drop_rate"),
    (lambda: dnn.multiply(inp(), val=float("nan")), "val"),
    (lambda: dnn.l2normalize(inp(), eps=0), "eps"),
    (lambda: dnn.extract(-1, 1, 1, 1, inp()), "offset"),
    (lambda: dnn.extract(0, 0, 1, 1, inp()), "k must"),
    (lambda: dnn.reorg(0, 2, inp()), "row_stride"),
    (lambda: dnn.upsample(0, inp()), "scale_y"),
    (lambda: dnn.resize_to(3, 0, inp()), "nc"),
])
def test_bad_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_concat_takes_tags_then_the_subnet():
    with pytest.raises(TypeError, match="at least one tag"):
        dnn.concat(inp())
    with pytest.raises(TypeError, match="tag factories"):
        dnn.concat(dnn.skip1, dnn.tag1(inp()))
    with pytest.raises(ValueError, match="tag id must be an integer >= 1"):
        dnn.concat(0, dnn.tag1(inp()))


@pytest.mark.parametrize("make, shape, match", [
    (lambda: dnn.extract(3, 2, 2, 2, inp()), (1, 2, 2, 2), r"layer<0> extract: extracting 8 values "
                                                            r"at offset 3 needs 11"),
    (lambda: dnn.reorg(2, 2, inp()), (1, 1, 3, 4), r"layer<0> reorg: .* multiples"),
    (lambda: dnn.scale_prev1(dnn.tag1(inp())), (2, 3, 2, 2), r"layer<0> scale_prev1: expected scales"),
    (lambda: dnn.scale1(dnn.avg_pool_everything(dnn.con(2, 1, 1, 1, 1, dnn.tag1(inp())))),
     (2, 3, 2, 2), r"layer<0> scale1: expected scales shaped \(2, 3, 1, 1\) for an input "
                   r"\(2, 3, 2, 2\), got \(2, 2, 1, 1\)"),
    (lambda: dnn.concat(dnn.tag1, dnn.tag2, dnn.tag2(dnn.max_pool(2, 2, 2, 2, dnn.tag1(inp())))),
     (1, 2, 4, 4), r"layer<0> concat: the tagged outputs must agree in N, R and C"),
    (lambda: dnn.concat(dnn.tag1, dnn.tag2(inp())), (1, 2, 4, 4), r"layer<0> concat: there is no tag1"),
    (lambda: dnn.mult_prev3(dnn.tag1(inp())), (1, 2, 4, 4), r"layer<0> mult_prev3: there is no tag3"),
])
def test_shape_errors_name_the_layer(make, shape, match):
    with pytest.raises(dnn.LayerError, match=match):
        make().forward(np.zeros(shape, np.float32))


# ---------------------------------------------------------------- PyTorch, float64
try:
    import torch
    import torch.nn.functional as F
except ImportError:           # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def _t(a):
    return torch.tensor(np.asarray(a, np.float64))


def _close(actual, expected, rtol=1e-5):
    R.assert_close(actual, np.asarray(expected, np.float64), rtol)


@needs_torch
def test_torch_softmax_all_and_l2normalize():
    x = rand(3, 4, 5, 2)
    _close(dnn.softmax_all(inp()).forward(x), F.softmax(_t(x).reshape(3, -1), dim=1).reshape(x.shape))
    t = _t(x).reshape(3, -1)
    want = t / torch.sqrt(1e-5 + (t * t).sum(dim=1, keepdim=True))
    _close(dnn.l2normalize(inp()).forward(x), want.reshape(x.shape))
    # with eps negligible it is F.normalize (dlib adds eps inside the root; torch clamps the norm)
    _close(dnn.l2normalize(inp(), eps=1e-30).forward(x), F.normalize(t, dim=1).reshape(x.shape))


@needs_torch
@pytest.mark.parametrize("shape, size", [((2, 3, 4, 5), (7, 11)), ((1, 2, 9, 7), (4, 3)),
                                         ((2, 1, 1, 5), (3, 5)), ((1, 2, 3, 3), (1, 1))])
def test_torch_bilinear_align_corners(shape, size):
    x = rand(*shape)
    want = F.interpolate(_t(x), size=size, mode="bilinear", align_corners=True)
    _close(dnn.resize_to(*size, inp()).forward(x), want)
    if size[0] % shape[2] == 0 and size[1] % shape[3] == 0:
        _close(dnn.upsample(1, inp(), scale_y=size[0] // shape[2],
                            scale_x=size[1] // shape[3]).forward(x), want)


@needs_torch
def test_torch_upsample_and_resize_prev_to_tagged():
    x = rand(2, 3, 4, 5)
    _close(dnn.upsample(2, inp()).forward(x),
           F.interpolate(_t(x), scale_factor=2, mode="bilinear", align_corners=True))
    net = dnn.resize_prev_to_tagged1(dnn.max_pool(2, 2, 2, 2, dnn.tag1(inp())))
    pooled = F.max_pool2d(_t(x), 2, 2)
    _close(net.forward(x), F.interpolate(pooled, size=(4, 5), mode="bilinear", align_corners=True))


@needs_torch
def test_torch_reorg_is_pixel_unshuffle_with_dlibs_channel_order():
    x = rand(2, 3, 6, 8)
    y = dnn.reorg(2, 2, inp()).forward(x)
    pu = F.pixel_unshuffle(_t(x), 2)                    # channel k*4 + (dr*2 + dc)
    want = pu.reshape(2, 3, 4, 3, 4).transpose(1, 2).reshape(2, 12, 3, 4)   # (dr*2 + dc)*3 + k
    _close(y, want)
    # unequal strides: the same order, by unfold
    x = rand(1, 2, 4, 9)
    u = _t(x).reshape(1, 2, 2, 2, 3, 3).permute(0, 3, 5, 1, 2, 4).reshape(1, 2 * 3 * 2, 2, 3)
    _close(dnn.reorg(2, 3, inp()).forward(x), u)


@needs_torch
def test_torch_concat_mult_prev_scale_prev_extract():
    x = rand(1, 3, 4, 4)
    dnn.set_seed(0)
    net = dnn.concat(dnn.tag1, dnn.tag2, dnn.tag2(dnn.con(2, 3, 3, 1, 1, dnn.tag1(inp()))))
    y = net.forward(x)
    conv = dnn.layer(net, 1).subnet().layer_details()
    y2 = F.conv2d(_t(x), _t(conv.filters), _t(conv.biases), padding=1)
    _close(y, torch.cat([_t(x), y2], dim=1))
    _close(dnn.mult_prev1(dnn.relu(dnn.tag1(inp()))).forward(x), _t(x) * torch.relu(_t(x)))
    net = dnn.scale_prev1(dnn.skip2(dnn.tag1(dnn.avg_pool_everything(dnn.tag2(inp())))))
    _close(net.forward(x), _t(x) * _t(x).mean(dim=(2, 3), keepdim=True))
    _close(dnn.extract(3, 2, 2, 2, inp()).forward(x), _t(x).reshape(1, -1)[:, 3:11].reshape(1, 2, 2, 2))


# ---------------------------------------------------------------- dropout
def _dropout_net(p=0.5):
    return dnn.dropout(dnn.relu(dnn.dropout(inp(), drop_rate=p)), drop_rate=p)


def test_dropout_is_an_identity_at_inference():
    x = rand(2, 3, 4, 5)
    net = dnn.dropout(inp(), drop_rate=0.2)
    np.testing.assert_array_equal(net.forward(x), x)
    assert net._program(x.shape).steps == []                # no kernel, no copy


def test_dropout_masks_come_from_seed_step_and_layer():
    x = np.ones((4, 5, 6, 7), np.float32)
    net = _dropout_net()

    def run(seed, step):
        t = Tape(net, seed=seed)
        t.step = step
        y = t.forward(x)
        return [c.saved.copy() for c in t.ctxs if isinstance(c.layer, dnn.dropout_)], y

    (m1, m2), y = run(3, 10)
    (n1, n2), y2 = run(3, 10)
    np.testing.assert_array_equal(m1, n1)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(m1, m2)                      # another layer, another mask
    assert not np.array_equal(run(3, 11)[0][0], m1)        # another step
    assert not np.array_equal(run(4, 10)[0][0], m1)        # another seed
    key = dnn.dropout_.mask_key(3, 10, len(net) - 2)
    np.testing.assert_array_equal(m1, 2 * R.dropout_mask(key, x.shape, 0.5))
    assert abs(m1.mean() - 1.0) < 0.1 and set(np.unique(m1)) == {0.0, 2.0}   # kept: x / (1 - p)
    np.testing.assert_array_equal(y, x * m1 * m2)


def test_dropout_rates_at_the_edges_and_in_between():
    x = rand(1, 1, 300, 400)
    for p in (0.0, 0.1, 0.75, 1.0):
        y, m = np.empty_like(x), np.empty_like(x)
        ops.dropout_train(x, y, m, p, 12345)
        if p == 0.0:
            assert m.min() == 1 and np.array_equal(y, x)
        elif p == 1.0:
            assert m.max() == 0 and not y.any()
        else:
            assert abs(m.mean() - (1 - p)) < 0.005
        np.testing.assert_array_equal(m, R.dropout_mask(12345, x.shape, p))


def test_dropout_mask_is_the_same_for_any_thread_count():
    from minidnn.backends import cpu
    x = rand(2, 4, 128, 128)
    y, m = np.empty_like(x), np.empty_like(x)
    before = cpu.get_num_threads()
    try:
        got = []
        for nt in (1, 2, 3):
            cpu.set_num_threads(nt)
            ops.dropout_train(x, y, m, 0.4, 2 ** 64 - 1)
            got.append(m.copy())
    finally:
        cpu.set_num_threads(before)
    assert all(np.array_equal(g, got[0]) for g in got)


def _trainer(net, epochs, path=None):
    t = dnn.dnn_trainer(net, dnn.sgd(momentum=0.9), seed=5, verbose=False, stream=io.StringIO())
    t.learning_rate, t.mini_batch_size, t.max_num_epochs = 0.05, 8, epochs
    if path is not None:
        t.set_synchronization_file(path, interval_seconds=0)
    return t


def _dropout_classifier():
    return dnn.loss_multiclass_log(dnn.fc(3, dnn.dropout(dnn.relu(dnn.fc(8, dnn.dropout(
        inp(), drop_rate=0.2))), drop_rate=0.5)))


def test_training_with_dropout_is_reproducible_and_resumable(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 2, 2, 2)).astype(np.float32), rng.integers(0, 3, 40)
    a = _trainer(_dropout_classifier(), 3).train(x, y)
    b = _trainer(_dropout_classifier(), 3).train(x, y)
    np.testing.assert_array_equal(a.net.forward(x), b.net.forward(x))
    path = tmp_path / "d.sync"
    _trainer(_dropout_classifier(), 2, path).train(x, y)          # stopped after 2 epochs ...
    c = _trainer(_dropout_classifier(), 3, path).train(x, y)      # ... and resumed to 3
    assert "resuming" in c.stream.getvalue()
    np.testing.assert_array_equal(c.net.forward(x), a.net.forward(x))
    other = dnn.dnn_trainer(_dropout_classifier(), dnn.sgd(momentum=0.9), seed=6, verbose=False)
    other.learning_rate, other.mini_batch_size, other.max_num_epochs = 0.05, 8, 3
    assert not np.array_equal(other.train(x, y).net.forward(x), a.net.forward(x))


# ---------------------------------------------------------------- fuse()
def test_fuse_folds_multiply_and_drops_dropout():
    x = rand(2, 3, 6, 6)
    dnn.set_seed(1)
    net = dnn.relu(dnn.dropout(dnn.fc(5, dnn.relu(dnn.multiply(dnn.con(4, 3, 3, 1, 1, inp()),
                                                              val=-0.5))), drop_rate=0.3))
    want = net.forward(x)
    dnn.fuse(net)
    R.assert_close(net.forward(x), np.asarray(want, np.float64))
    kinds = [(n.layer_details().kind, n.layer_details().disabled) for n in net.chain()]
    assert kinds == [("relu", True), ("dropout", True), ("fc", False), ("relu", True),
                     ("affine", True), ("con", False), ("input_tensor", False)]
    assert net.subnet().subnet().layer_details().act and \
        dnn.layer(net, 5).layer_details().act            # relus in the epilogues
    back = dnn.deserialize(dnn.serialize(net))
    np.testing.assert_array_equal(back.forward(x), net.forward(x))


def test_fuse_turns_an_unfoldable_multiply_into_an_affine():
    x = rand(1, 2, 4, 4)
    net = dnn.multiply(dnn.max_pool(2, 2, 2, 2, inp()), val=3)
    want = net.forward(x)
    dnn.fuse(net)
    l = net.layer_details()
    assert isinstance(l, dnn.affine_) and not l.disabled and np.array_equal(l.gamma, [3, 3])
    np.testing.assert_array_equal(net.forward(x), want)


def test_fuse_of_a_loaded_net_leaves_multiply_and_dropout_unfused():
    # just loaded, nothing has run: their channel count is unknown, so fuse() cannot make
    # them per-channel affines (python -m minidnn fuse does exactly this)
    x = rand(2, 3, 5, 5)
    dnn.set_seed(3)
    net = dnn.multiply(dnn.dropout(dnn.con(4, 3, 3, 1, 1, inp()), drop_rate=0.1), val=2)
    want = net.forward(x)
    back = dnn.fuse(dnn.deserialize(dnn.serialize(net)))
    assert [n.layer_details().kind for n in back.chain()][:2] == ["multiply", "dropout"]
    R.assert_close(back.forward(x), np.asarray(want, np.float64))
    dnn.fuse(back)                               # after a forward they fold
    assert [(n.layer_details().kind, n.layer_details().disabled) for n in back.chain()][:2] == \
        [("affine", True), ("dropout", True)]     # the multiply folded into the con
    R.assert_close(back.forward(x), np.asarray(want, np.float64))


# ---------------------------------------------------------------- concat copies nothing
def _step_names(net, shape):
    return [getattr(f, "__name__", "") for f, _ in net._program(shape).steps]


def test_concat_at_batch_1_is_free_and_copies_at_larger_batches():
    net, x = _net(CASES[IDS.index("concat-inception")], batch=1)
    assert "copy_range" not in _step_names(net, x.shape)
    x3 = rand(3, *x.shape[1:])
    net.forward(x3)
    assert _step_names(net, x3.shape).count("copy_range") == 3
    check_forward(net, x3, fuse=False, reload=False)
    net, x = _net(CASES[IDS.index("concat-dense")], batch=1)
    assert "copy_range" not in _step_names(net, x.shape)


def test_concat_copies_what_it_cannot_place():
    # the input (tag1 on it) is copied; a tag listed twice is copied the second time
    net, x = _net(CASES[IDS.index("concat-of-input")])
    assert _step_names(net, x.shape).count("copy_range") == 1
    net, x = _net(CASES[IDS.index("concat-same-tag-twice")])
    assert _step_names(net, x.shape).count("copy_range") == 1


def test_a_layer_above_a_free_concat_sees_all_of_it():
    # add_prev and relu above a concat whose last slice is written by a conv: the addition
    # must not become that conv's residual epilogue (nor a relu its activation)
    dnn.set_seed(2)
    x = rand(1, 2, 5, 5)
    net = dnn.relu(dnn.add_prev5(dnn.concat(dnn.tag1, dnn.tag2, dnn.tag2(dnn.con(
        3, 3, 3, 1, 1, dnn.tag1(dnn.con(2, 1, 1, 1, 1, dnn.tag5(dnn.con(5, 1, 1, 1, 1, inp())))))))))
    net.forward(x)
    randomize(net)
    check_forward(net, x, fuse=False, reload=False)
    names = _step_names(net, x.shape)
    assert names == ["conv2d", "conv2d", "conv2d", "add"], names      # the relu: add's epilogue
    assert net._program(x.shape).steps[-1][1][-1] == ops.RELU
    t1, t2 = dnn.layer(net, dnn.tag1).get_output(), dnn.layer(net, dnn.tag2).get_output()
    t5 = dnn.layer(net, dnn.tag5).get_output()
    np.testing.assert_allclose(net.forward(x), np.maximum(np.concatenate([t1, t2], 1) + t5, 0),
                               rtol=1e-6, atol=1e-6)


def test_plan_alias_refuses_what_it_cannot_rewrite():
    from minidnn.core import Plan
    plan = Plan(ops.backend("cpu"))
    x = np.zeros((1, 2, 2, 2), np.float32)
    plan.outputs.append((None, x))
    a = plan.empty((1, 2, 2, 2))
    big = np.zeros((2, 4, 2, 2), np.float32)
    plan.step(ops.activation, x, a, ops.RELU)
    assert not plan.alias(x, big[:1, :2])                       # the program's input
    assert not plan.alias(a, big[:, :2])                        # not contiguous (2 samples)
    assert not plan.alias(a, big[:1, :3])                       # another shape
    assert not plan.alias(a[:, :1], big[:1, :1])                # a part of a buffer
    assert not plan.alias(a, a.reshape(-1)[:8].reshape(a.shape))  # its own storage
    plan.tags[1] = a.reshape(1, 8, 1, 1)
    dst = big[:1, 2:]
    assert plan.alias(a, dst)
    assert plan.steps[0][1][1] is not a and np.shares_memory(plan.steps[0][1][1], big)
    assert plan.tags[1].shape == (1, 8, 1, 1) and np.shares_memory(plan.tags[1], big)
    x[...] = 1
    plan.steps[0][0](*plan.steps[0][1])
    assert big[0, 2:].min() == 1 and big[1].max() == 0 and big[0, :2].max() == 0


# ---------------------------------------------------------------- devices
def test_a_device_without_these_kernels_names_the_layer(monkeypatch):
    from test_ops_contract import _fake_backend, FakeArray
    mod = _fake_backend()
    monkeypatch.setattr(ops, "DEVICES", ops.DEVICES + ("fake",))
    monkeypatch.setitem(ops._by_name, "fake", mod)
    monkeypatch.setitem(ops._by_type, FakeArray, mod)
    # with every op (the CPU kernels on stand-in device arrays) the layers run on it ...
    for case in CASES:
        net, x = _net(case)
        want = net.forward(x)
        net.to("fake", graphs=False)
        np.testing.assert_array_equal(net.forward(FakeArray(x)), want, err_msg=case.id)
    # ... and without one, moving the net says which layer lacks it
    for name, make, kind in [("copy_range", lambda s: dnn.concat(dnn.tag1, dnn.tag1(s)), "concat"),
                             ("resize_bilinear", lambda s: dnn.upsample(2, s), "upsample"),
                             ("scale_channels", lambda s: dnn.scale_prev1(dnn.tag1(s)), "scale_prev1"),
                             ("mul", lambda s: dnn.mult_prev1(dnn.tag1(s)), "mult_prev1"),
                             ("reorg", lambda s: dnn.reorg(2, 2, s), "reorg"),
                             ("l2normalize", lambda s: dnn.l2normalize(s), "l2normalize"),
                             ("softmax", lambda s: dnn.softmax_all(s), "softmax_all")]:
        delattr(mod, name) if hasattr(mod, name) else None
        with pytest.raises(NotImplementedError, match=rf"layer<0> {kind}: the fake backend has no "
                                                      rf"kernel for {name}"):
            make(inp()).to("fake")


# ---------------------------------------------------------------- kernels
def test_l2normalize_of_one_large_sample_splits_it_over_threads():
    from minidnn.backends import cpu
    x = rand(1, 3, 300, 301)
    before = cpu.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            cpu.set_num_threads(nt)
            y = np.empty_like(x)
            ops.l2normalize(x, y, 1e-5)
            outs.append(y)
    finally:
        cpu.set_num_threads(before)
    want = x / np.sqrt(1e-5 + (x.astype(np.float64) ** 2).sum())
    for y in outs:
        R.assert_close(y, want, 1e-5)
        assert abs(np.linalg.norm(y.astype(np.float64)) - 1) < 1e-5


@pytest.mark.parametrize("co", [1023, 1024, 1025, 2050])
def test_bilinear_rows_wider_than_its_table(co):
    x = rand(1, 1, 3, 37)
    y = np.empty((1, 1, 2, co), np.float32)
    ops.resize_bilinear(x, y)
    R.assert_close(y, R.resize_bilinear(x, 2, co))
    dy = rand(1, 1, 2, co, seed=3)
    dx = np.empty_like(x)
    ops.resize_bilinear_grad(dy, dx)
    wy, wx = R.bilinear_matrix(3, 2), R.bilinear_matrix(37, co)
    R.assert_close(dx, np.einsum("ir,nkij,jc->nkrc", wy, dy.astype(np.float64), wx), 1e-5)


def test_mul_zero_pads_and_cuts_like_dlib():
    a, b = rand(2, 3, 4, 5), rand(1, 4, 2, 6, seed=1)
    for shape in [(2, 4, 4, 6), (1, 2, 3, 3), (3, 5, 5, 7)]:
        y = np.empty(shape, np.float32)
        ops.mul(a, b, y)
        cut = (slice(shape[0]), slice(shape[1]), slice(shape[2]), slice(shape[3]))
        R.assert_close(y, R._zero_padded(a[cut], shape) * R._zero_padded(b[cut], shape))


def test_copy_range_and_its_checks():
    x, y = rand(2, 3, 2, 2), np.zeros((2, 5, 1, 1), np.float32)
    ops.copy_range(x, y, 7, 1, 3)
    np.testing.assert_array_equal(y[:, 1:4, 0, 0], x.reshape(2, -1)[:, 7:10])
    assert not y[:, 0].any() and not y[:, 4].any()
    with pytest.raises(ValueError, match="does not fit"):
        ops.copy_range(x, y, 10, 0, 3)
    with pytest.raises(ValueError, match="same number of samples"):
        ops.copy_range(x, np.zeros((1, 12), np.float32), 0, 0, 1)
    with pytest.raises(ValueError, match="share memory"):
        ops.copy_range(x, x, 0, 4, 4)
    z = np.arange(8, dtype=np.float32).reshape(1, 8)
    ops.copy_range(z, z, 0, 2, 5)                 # one sample: a memmove
    np.testing.assert_array_equal(z[0], [0, 1, 0, 1, 2, 3, 4, 7])


@pytest.mark.parametrize("call, match", [
    (lambda: ops.reorg(np.zeros((1, 1, 3, 4), np.float32), np.zeros((1, 4, 1, 2), np.float32), 2, 2),
     "multiples"),
    (lambda: ops.reorg(np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 4, 2, 3), np.float32), 2, 2),
     "expected the shape"),
    (lambda: ops.scale_channels(np.zeros((2, 3, 2, 2), np.float32), np.zeros((2, 3, 1, 2), np.float32),
                                np.zeros((2, 3, 2, 2), np.float32)), "s must have shape"),
    (lambda: ops.resize_bilinear(np.zeros((1, 2, 3, 3), np.float32), np.zeros((1, 3, 4, 4), np.float32)),
     "same samples and channels"),
    (lambda: ops.l2normalize(np.zeros((1, 2, 3, 3), np.float64), np.zeros((1, 2, 3, 3), np.float32), 1e-5),
     "float32"),
    (lambda: ops.dropout_train(np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32),
                               1.5, 0), "drop_rate"),
])
def test_kernel_argument_checks(call, match):
    with pytest.raises(ValueError, match=match):
        call()
    with pytest.raises(OverflowError):           # a mask key is an unsigned 64-bit integer
        ops.dropout_train(*(np.zeros(4, np.float32),) * 3, 0.5, -1)


@pytest.mark.parametrize("d", [1, 15, 16, 17, 1023, 1024, 1025, 2049])
def test_l2normalize_at_the_edges_of_its_sum_blocks(d):
    # _sumsq: 16 float lanes over chunks of CHUNK = 1024 values (kernels/cpu/tensor.pyx)
    x = rand(3, d, 1, 1, seed=d)
    y = np.empty_like(x)
    ops.l2normalize(x, y, 1e-5)
    x64 = x.astype(np.float64).reshape(3, -1)
    R.assert_close(y.reshape(3, -1), x64 / np.sqrt(1e-5 + (x64 ** 2).sum(1, keepdims=True)))
    dy, dx = rand(3, d, 1, 1, seed=d + 1), np.empty_like(x)
    ops.l2normalize_grad(x, y, dy, dx, 1e-5)
    y64, dy64 = y.astype(np.float64).reshape(3, -1), dy.astype(np.float64).reshape(3, -1)
    want = (dy64 - y64 * (dy64 * y64).sum(1, keepdims=True)) / np.sqrt(
        1e-5 + (x64 ** 2).sum(1, keepdims=True))
    R.assert_close(dx.reshape(3, -1), want)

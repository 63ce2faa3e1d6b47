"""The file format (docs/FORMAT.md): round trips bit for bit, the older affine_1
fixture, bad files (explicit cases and fuzzing), atomic saves, and the
`info` / `fuse` command line."""
import io
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minidnn as dnn
import reference as R

ser = sys.modules["minidnn.serialize"]      # (dnn.serialize is the function)
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(HERE, "data")
sys.path.insert(0, DATA)
import make_affine_1_fixture as fixture  # noqa: E402


# ----------------------------------------------------------------------------- nets
def _randomize_bn(net, seed):
    rng = np.random.default_rng(seed)
    for n in net.chain():
        l = n.layer_details()
        if isinstance(l, (dnn.bn_, dnn.affine_)) and l.gamma is not None:
            k = l.gamma.shape[0]
            l.gamma[:] = rng.uniform(0.2, 3.0, k) * rng.choice([-1, 1], k)
            l.beta[:] = rng.standard_normal(k)
            if isinstance(l, dnn.bn_):
                l.running_mean[:] = rng.standard_normal(k)
                l.running_var[:] = rng.uniform(0.5, 2.0, k)


def _block(k, s, sub):
    if s == 1:
        return dnn.relu(dnn.add_prev1(dnn.bn_con(dnn.con(k, 3, 3, 1, 1, dnn.relu(dnn.bn_con(
            dnn.con(k, 3, 3, 1, 1, dnn.tag1(sub))))))))
    return dnn.relu(dnn.add_prev2(dnn.bn_con(dnn.con(k, 3, 3, 1, 1, dnn.relu(dnn.bn_con(
        dnn.con(k, 3, 3, s, s, dnn.skip1(dnn.tag2(dnn.bn_con(dnn.con(k, 1, 1, s, s, dnn.tag1(sub))))),
                padding_y=1, padding_x=1)))))))


def residual_net():
    net = dnn.loss_multiclass_log(dnn.fc(10, dnn.avg_pool_everything(_block(8, 2, _block(4, 1, dnn.relu(
        dnn.bn_con(dnn.con(4, 3, 3, 1, 1, dnn.input_tensor()))))))))
    return net, (2, 3, 9, 9)


def fc_bn_fc_net():
    net = dnn.loss_multiclass_log(dnn.fc(5, dnn.relu(dnn.bn_fc(dnn.fc(12, dnn.max_pool(
        3, 3, 2, 2, dnn.relu(dnn.bn_con(dnn.con(6, 3, 3, 1, 1, dnn.input_tensor(), bias=False))),
        padding_y=1, padding_x=1), bias=False)))))
    return net, (3, 2, 7, 6)


def no_bias_net():
    net = dnn.softmax(dnn.affine(dnn.avg_pool(2, 2, 1, 1, dnn.relu(dnn.con(
        5, 3, 2, 2, 1, dnn.relu(dnn.con(4, 1, 1, 1, 1, dnn.input_tensor(), bias=False)),
        padding_y=0, padding_x=1, bias=False)), padding_y=1, padding_x=1)))
    return net, (2, 3, 8, 7)


NETS = {"residual": residual_net, "fc_bn_fc": fc_bn_fc_net, "no_bias": no_bias_net}


def built(name, fused=False, seed=0):
    """A net that has run a forward (parameters allocated) with non-trivial bn/affine values."""
    dnn.set_seed(seed)
    net, shape = NETS[name]()
    x = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    net.forward(x)
    _randomize_bn(net, seed + 2)
    if fused:
        dnn.fuse(net)
    return net, x


def to_bytes(net):
    b = io.BytesIO()
    dnn.serialize(net, b)
    return b.getvalue()


def from_bytes(data):
    return dnn.deserialize(io.BytesIO(data))


def describe(net):
    """Everything about a net's structure and parameters, for equality checks."""
    out = []
    for n in net.chain():
        l = n.layer_details()
        params = {p: getattr(l, p) for p in ("filters", "weights", "biases", "gamma", "beta",
                                             "running_mean", "running_var") if hasattr(l, p)}
        if isinstance(l, dnn.affine_) and l.disabled:
            # a disabled affine is saved without gamma/beta (affine_.disable() drops them; a
            # forward's setup may have given it identity ones again): they are never used
            params = {"gamma": None, "beta": None}
        out.append((type(l), l.kind, l.describe(), l.disabled, getattr(l, "fused_relu", None),
                    getattr(l, "bias", None), getattr(l, "k", None),
                    {p: None if a is None else (a.shape, a.tobytes()) for p, a in params.items()}))
    return out


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_round_trip_bit_for_bit(name, fused):
    net, x = built(name, fused)
    before = net.forward(x)
    data = to_bytes(net)
    loaded = from_bytes(data)
    assert describe(loaded) == describe(net)
    assert same_bits(loaded.forward(x), before)
    assert np.array_equal(loaded(x), net(x))
    assert to_bytes(loaded) == data                 # serialize(deserialize(f)) == f
    R.assert_close(loaded.forward(x), R.forward(net, x))


def test_fused_file_is_fused_and_matches_unfused():
    net, x = built("residual")
    unfused = net.forward(x)
    loaded = from_bytes(to_bytes(dnn.fuse(net)))
    kinds = [n.layer_details() for n in loaded.chain()]
    assert any(getattr(l, "fused_relu", False) for l in kinds)
    assert not any(isinstance(l, dnn.bn_) for l in kinds)
    disabled_affines = [l for l in kinds if isinstance(l, dnn.affine_) and l.disabled]
    assert disabled_affines and all(l.gamma is None and l.beta is None for l in disabled_affines)
    R.assert_close(loaded.forward(x), unfused.astype(np.float64))


def test_unallocated_parameters_round_trip_as_absent():
    net, shape = residual_net()                    # never run: no parameters, input K unset
    data = to_bytes(net)
    loaded = from_bytes(data)
    assert describe(loaded) == describe(net)
    for n in loaded.chain():
        l = n.layer_details()
        assert all(getattr(l, p) is None for p in l.params)
    assert loaded.layer_details() is not None and dnn.layer(loaded, len(loaded) - 1).layer_details().k is None
    assert to_bytes(loaded) == data
    x = np.ones(shape, np.float32)
    assert loaded.forward(x).shape == (2, 10, 1, 1)  # setup allocates them as usual
    assert dnn.layer(loaded, len(loaded) - 1).layer_details().k == 3


def test_settings_and_flags_round_trip():
    net = dnn.relu(dnn.bn_fc(dnn.fc(3, dnn.max_pool(3, 2, 1, 2, dnn.con(
        2, 4, 3, 3, 2, dnn.input_tensor(), padding_y=2, padding_x=0, bias=False),
        padding_y=1, padding_x=1), bias=False), eps=0.125))
    net.forward(np.ones((1, 1, 9, 8), np.float32))
    dnn.layer(net, 0).layer_details().disable()
    dnn.layer(net, 3).layer_details().disable()    # a disabled pool
    loaded = from_bytes(to_bytes(net))
    assert describe(loaded) == describe(net)
    con = dnn.layer(loaded, 4).layer_details()
    assert (con.num_filters, con.nr, con.nc, con.stride_y, con.stride_x, con.padding_y,
            con.padding_x, con.bias, con.biases) == (2, 4, 3, 3, 2, 2, 0, False, None)
    bn = dnn.layer(loaded, 1).layer_details()
    assert bn.mode == "fc" and bn.eps == 0.125
    assert dnn.layer(loaded, 0).layer_details().disabled
    assert dnn.layer(loaded, 3).layer_details().disabled


def test_loss_mean_squared_round_trips():
    from minidnn.loss import loss_mean_squared, loss_mean_squared_
    net = loss_mean_squared(dnn.fc(2, dnn.input_tensor()))
    x = np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1)
    out = net(x)
    data = to_bytes(net)
    assert b"loss_mean_squared_1" in data
    loaded = from_bytes(data)
    assert isinstance(loaded.layer_details(), loss_mean_squared_)
    assert same_bits(loaded(x), out) and to_bytes(loaded) == data


def test_path_and_open_file(tmp_path):
    net, x = built("fc_bn_fc", fused=True)
    p = tmp_path / "net.mdnn"
    dnn.serialize(net, p)                           # a PathLike
    dnn.serialize(net, str(tmp_path / "b.mdnn"))    # a str
    with open(tmp_path / "c.mdnn", "wb") as f:      # an open binary file
        dnn.serialize(net, f)
    data = p.read_bytes()
    assert (tmp_path / "b.mdnn").read_bytes() == data == (tmp_path / "c.mdnn").read_bytes()
    with open(p, "rb") as f:
        a = dnn.deserialize(f)
    b = dnn.deserialize(str(p))
    assert same_bits(a.forward(x), net.forward(x)) and same_bits(b.forward(x), net.forward(x))
    assert sorted(os.listdir(tmp_path)) == ["b.mdnn", "c.mdnn", "net.mdnn"]   # no temp files left


def test_format_md_example_is_exact():
    """The hex dump in docs/FORMAT.md is what serialize writes for its example net."""
    with open(os.path.join(REPO, "docs", "FORMAT.md")) as f:
        text = f.read()
    dump = text.split("## Example", 1)[1].split("```")[1]
    hexbytes = "".join(line.split(":", 1)[1].split("  ")[0] for line in dump.strip().splitlines())
    assert bytes.fromhex(hexbytes) == to_bytes(dnn.relu(dnn.input_tensor()))


def test_exports():
    assert issubclass(dnn.SerializationError, ValueError)
    assert dnn.serialize is ser.serialize and dnn.deserialize is ser.deserialize


# ----------------------------------------------------------------------------- versions
def test_older_affine_1_fixture_loads():
    path = os.path.join(DATA, "affine_1.mdnn")
    with open(path, "rb") as f:
        data = f.read()
    assert data == fixture.build(), "tests/data/affine_1.mdnn differs from what its script writes"
    net, version, tags = ser.load_with_info(path)
    assert version == 1
    assert tags == ["loss_multiclass_log_1", "affine_1", "fc_1", "max_pool_1", "relu_1", "affine_1",
                    "con_1", "input_tensor_1"]
    for i, params in fixture.expected_layers().items():
        l = dnn.layer(net, i).layer_details()
        for name, (shape, values) in params.items():
            a = getattr(l, name)
            assert a.dtype == np.float32 and a.shape == shape
            assert np.array_equal(a.ravel(), np.array(values, np.float32))
    affines = [dnn.layer(net, i).layer_details() for i in (1, 5)]
    assert [a.mode for a in affines] == ["fc", "conv"]
    assert not any(a.disabled for a in affines)     # affine_1 has no flag: enabled
    assert dnn.layer(net, 7).layer_details().k == 2
    x = np.random.default_rng(3).standard_normal((3, 2, 4, 4)).astype(np.float32)
    out = net.forward(x)
    R.assert_close(out, R.forward(net, x))
    # written back in the current version, it still computes the same bits
    data2 = to_bytes(net)
    _, _, tags2 = ser._decode(data2)
    assert tags2.count("affine_2") == 2 and "affine_1" not in tags2
    assert same_bits(from_bytes(data2).forward(x), out)
    # and fusing it folds both affines
    fused = dnn.fuse(from_bytes(data2))
    R.assert_close(fused.forward(x), R.forward(net, x))


def test_disabled_affine_is_written_without_parameters():
    net = dnn.affine(dnn.con(2, 1, 1, 1, 1, dnn.input_tensor()))
    net.forward(np.ones((1, 1, 2, 2), np.float32))
    net.layer_details().disable()
    net.layer_details().gamma = np.ones(2, np.float32)   # stale values: an identity anyway
    loaded = from_bytes(to_bytes(net))
    a = loaded.layer_details()
    assert a.disabled and a.gamma is None and a.beta is None


# ----------------------------------------------------------------------------- hand-made files
def u8(v):
    return struct.pack("<B", v)


def u32(v):
    return struct.pack("<I", v)


def arr(shape, fill=0.5, rank=None):
    n = int(np.prod(shape))
    return (u8(1) + u8(len(shape) if rank is None else rank) + b"".join(u32(d) for d in shape)
            + np.full(n, fill, "<f4").tobytes())


def rec(tag, payload):
    t = tag.encode()
    return u8(len(t)) + t + struct.pack("<Q", len(payload)) + payload


INPUT = rec("input_tensor_1", u8(0) + u32(0))
RELU = rec("relu_1", u8(0))


def con_rec(f=2, k=1, nr=1, nc=1, filters=None, biases=None, extra=b""):
    filters = arr((f, k, nr, nc)) if filters is None else filters
    biases = arr((f,)) if biases is None else biases
    return rec("con_1", u8(0) + u32(f) + u32(nr) + u32(nc) + u32(1) + u32(1) + u32(0) + u32(0)
               + u8(1) + u8(0) + filters + biases + extra)


def file_of(records, version=1, magic=b"MINIDNN\x00", count=None, crc=True):
    body = magic + u32(version) + u32(len(records) if count is None else count) + b"".join(records)
    return body + u32(zlib.crc32(body) if crc else 0)


def test_hand_made_file_loads():
    net = from_bytes(file_of([RELU, con_rec(), INPUT]))
    assert [type(n.layer_details()) for n in net.chain()] == [dnn.relu_, dnn.con_, dnn.input_tensor_]
    assert net.forward(np.ones((1, 1, 2, 2), np.float32)).tolist() == [[[[1.0, 1.0]] * 2] * 2]


BAD = {
    "empty": (b"", "header"),
    "wrong magic": (file_of([RELU, INPUT], magic=b"MINIDNX\x00"), "header: wrong magic"),
    "format version 3": (file_of([RELU, INPUT], version=3), "header: unsupported format version 3"),
    "format version 0": (file_of([RELU, INPUT], version=0), "header: unsupported format version 0"),
    "count 0": (file_of([], count=0), "header: record count 0"),
    "count huge": (file_of([RELU, INPUT], count=0xFFFFFFFF), "header: record count 4294967295"),
    "count too small": (file_of([RELU, INPUT], count=1), "trailer: "),
    "count too large": (file_of([RELU, INPUT], count=3), "layer<2>"),
    "trailing bytes": (file_of([RELU, INPUT])[:-4] + b"\0\0" + file_of([RELU, INPUT])[-4:], "trailer"),
    "trailing after crc": (file_of([RELU, INPUT]) + b"\0", "trailer: 1 unexpected bytes"),
    "bad crc": (file_of([RELU, INPUT], crc=False), "trailer: CRC-32 mismatch"),
    "unknown tag": (file_of([rec("frobnicate_1", b""), INPUT]), "layer<0> record 'frobnicate_1': unknown"),
    "newer version": (file_of([rec("relu_2", u8(0)), INPUT]), "layer<0> record 'relu_2': unknown "
                      "record tag (this minidnn reads relu_1)"),
    "tag not ascii": (file_of([rec("r\xe9lu_1", u8(0)), INPUT]), "layer<0>"),
    "tag length 0": (file_of([u8(0) + b"\0" * 9, INPUT]), "layer<0>"),
    "payload too long": (file_of([RELU[:-9] + struct.pack("<Q", 2**63) + u8(0), INPUT]),
                         "layer<0> record 'relu_1': payload of 9223372036854775808 bytes"),
    "unread payload": (file_of([rec("relu_1", u8(0) + u8(0)), INPUT]), "layer<0> record 'relu_1': 1 unread"),
    "short payload": (file_of([rec("input_tensor_1", u8(0))]), "layer<0> record 'input_tensor_1': k needs 4"),
    "bool 2": (file_of([rec("relu_1", u8(2)), INPUT]), "layer<0> record 'relu_1': flag disabled is 2"),
    "mode 2": (file_of([rec("affine_2", u8(0) + u8(2) + u8(0) + u8(0)), INPUT]), "mode is 2"),
    "absurd dimension": (file_of([con_rec(filters=u8(1) + u8(4) + u32(0xFFFFFFFF) * 4), INPUT]),
                         "layer<0> record 'con_1': parameter filters of shape"),
    "dimension 0": (file_of([con_rec(filters=u8(1) + u8(4) + u32(2) + u32(0) + u32(1) + u32(1)), INPUT]),
                    "every dimension must be >= 1"),
    "wrong rank": (file_of([con_rec(filters=arr((2, 1, 1), rank=3)), INPUT]), "filters has rank 3"),
    "filters vs num_filters": (file_of([con_rec(f=3, filters=arr((2, 1, 1, 1)), biases=arr((3,))), INPUT]),
                               "layer<0> record 'con_1': parameter filters has shape (2, 1, 1, 1)"),
    "biases shape": (file_of([con_rec(biases=arr((3,))), INPUT]), "parameter biases has shape (3,)"),
    "num_filters 0": (file_of([con_rec(f=0, filters=u8(0), biases=u8(0)), INPUT]),
                      "layer<0> record 'con_1': ValueError: con: num_filters must be"),
    "bad eps": (file_of([rec("bn_1", u8(0) + u8(0) + struct.pack("<d", -1.0) + u8(0) * 4), INPUT]),
                "eps is -1.0"),
    "nan eps": (file_of([rec("bn_1", u8(0) + u8(0) + struct.pack("<d", float("nan")) + u8(0) * 4), INPUT]),
                "eps is nan"),
    "bn partial": (file_of([rec("bn_1", u8(0) + u8(0) + struct.pack("<d", 1e-5) + arr((2,)) + u8(0) * 3),
                            INPUT]), "must be all present or all absent"),
    "disabled affine with gamma": (file_of([rec("affine_2", u8(1) + u8(0) + arr((2,)) + arr((2,))), INPUT]),
                                   "a disabled affine must have no gamma/beta"),
    "pool padding": (file_of([rec("max_pool_1", u8(0) + u32(2) + u32(2) + u32(1) + u32(1) + u32(2)
                                  + u32(0)), INPUT]), "layer<0> record 'max_pool_1': ValueError"),
    "tag id 0": (file_of([rec("tag_1", u32(0)), INPUT]), "layer<0> record 'tag_1'"),
    "skip without tag": (file_of([rec("skip_1", u32(1)), INPUT]),
                         "layer<0> record 'skip_1': there is no tag1 below"),
    "add_prev above other tag": (file_of([rec("add_prev_1", u32(2)), rec("tag_1", u32(1)), INPUT]),
                                 "layer<0> record 'add_prev_1': there is no tag2 below"),
    "tag above skip": (file_of([rec("tag_1", u32(1)), rec("skip_1", u32(1)), INPUT]), "layer<1>"),
    "no input": (file_of([RELU]), "layer<0> record 'relu_1': the bottom layer must be an input_tensor"),
    "input in the middle": (file_of([RELU, INPUT, INPUT]), "layer<1> record 'input_tensor_1': an input"),
    "loss below top": (file_of([RELU, rec("loss_multiclass_log_1", u8(0)), INPUT]),
                       "layer<1> record 'loss_multiclass_log_1': a loss layer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file(case):
    data, message = BAD[case]
    with pytest.raises(dnn.SerializationError) as e:
        from_bytes(data)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_absurd_dimension_allocates_nothing_large():
    data = file_of([con_rec(f=2, filters=u8(1) + u8(4) + u32(2) + u32(0x7FFFFFFF) + u32(1) + u32(1)),
                    INPUT])
    tracemalloc.start()
    try:
        with pytest.raises(dnn.SerializationError, match="layer<0> record 'con_1'"):
            from_bytes(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_saving_an_unloadable_net_is_refused():
    with pytest.raises(dnn.SerializationError, match="there is no tag1 below"):
        to_bytes(dnn.skip1(dnn.relu(dnn.input_tensor())))
    net = dnn.con(2, 1, 1, 1, 1, dnn.input_tensor())
    net.forward(np.ones((1, 1, 2, 2), np.float32))
    with pytest.raises(dnn.LayerError, match=r"con: biases must have shape \(2,\), got \(3,\)"):
        net.layer_details().biases = np.zeros(3, np.float32)       # refused at once
    net.layer_details().set_array("biases", np.zeros(3, np.float32))  # a layer broken from inside
    with pytest.raises(dnn.SerializationError, match="layer<0> record 'con_3': parameter biases has shape"):
        to_bytes(net)

    class mystery_(dnn.Layer):
        kind = "mystery"
    with pytest.raises(dnn.SerializationError, match="layer<0> mystery: no file record"):
        to_bytes(dnn.Node(mystery_(), dnn.input_tensor()))


def test_a_registered_record_round_trips(monkeypatch):
    class scale_(dnn.Layer):
        kind = "scale"

        def __init__(self, factor):
            super().__init__()
            self.factor = factor

    def write(w, l):
        w.bool(l.disabled)
        w.f64(l.factor)

    def read(r):
        disabled = r.bool("disabled")
        l = scale_(r.f64("factor"))
        if disabled:
            l.disable()
        return l

    monkeypatch.setitem(ser.RECORDS, "scale_1", ser.Record(scale_, write, read, None))
    net = dnn.Node(scale_(2.5), dnn.input_tensor())
    data = to_bytes(net)
    loaded = from_bytes(data)
    assert isinstance(loaded.layer_details(), scale_) and loaded.layer_details().factor == 2.5
    assert to_bytes(loaded) == data


# ----------------------------------------------------------------------------- fuzzing
@pytest.fixture(scope="module")
def small_fused_file():
    dnn.set_seed(7)
    net = dnn.loss_multiclass_log(dnn.fc(3, dnn.relu(dnn.bn_fc(dnn.fc(4, dnn.add_prev1(dnn.relu(
        dnn.bn_con(dnn.con(2, 3, 3, 1, 1, dnn.tag1(dnn.max_pool(2, 2, 1, 1, dnn.con(
            2, 1, 1, 1, 1, dnn.input_tensor()))), bias=False)))))))))
    net.forward(np.ones((1, 1, 4, 4), np.float32))
    _randomize_bn(net, 1)
    dnn.fuse(net)
    return to_bytes(net)


def test_every_truncation_is_rejected(small_fused_file):
    data = small_fused_file
    assert len(data) < 2000
    from_bytes(data)
    for n in range(len(data)):
        with pytest.raises(dnn.SerializationError):
            from_bytes(data[:n])


def _load_or_reject(data, check_crc):
    """The property: a SerializationError, or a net that writes back to the same bytes."""
    try:
        net, _, _ = ser._decode(data, check_crc=check_crc)
    except dnn.SerializationError:
        return False
    again = to_bytes(net)
    assert again[:-4] == bytes(data[:-4])
    return True


flips = st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=flips)
def test_random_byte_flips(small_fused_file, flips):
    data = bytearray(small_fused_file)
    for pos, x in flips:
        data[pos % len(data)] ^= x
    if data == small_fused_file:                # flips that cancel out
        return
    # with the CRC every flip is caught; without it the parser alone must never misbehave
    assert not _load_or_reject(bytes(data), check_crc=True)
    _load_or_reject(bytes(data), check_crc=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6), junk=st.binary(max_size=64))
def test_random_splices(small_fused_file, cut, junk):
    data = small_fused_file
    cut %= len(data)
    spliced = data[:cut] + junk + data[cut + len(junk) // 2:]
    _load_or_reject(spliced, check_crc=False)
    body = spliced[:-4]
    _load_or_reject(body + u32(zlib.crc32(body)), check_crc=True)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200))
def test_random_bytes_after_a_header(body):
    data = b"MINIDNN\x00" + u32(1) + body
    _load_or_reject(data + u32(zlib.crc32(data)), check_crc=True)


# ----------------------------------------------------------------------------- atomic saves
def test_failed_save_leaves_previous_file(tmp_path, monkeypatch):
    net, x = built("residual", fused=True)
    target = tmp_path / "net.mdnn"
    dnn.serialize(net, target)
    before = target.read_bytes()
    other, _ = built("fc_bn_fc")

    written = []

    def failing_write(w, l):                    # fails after several records were written
        written.append(l)
        raise OSError("disk full (simulated)")
    monkeypatch.setitem(ser.RECORDS, "fc_2", ser.Record(dnn.fc_, failing_write, ser.RECORDS["fc_2"].read, None))
    with pytest.raises(OSError, match="disk full"):
        dnn.serialize(other, target)
    assert written
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["net.mdnn"]
    monkeypatch.undo()

    def failing_replace(src, dst):
        raise OSError("rename failed (simulated)")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        dnn.serialize(other, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["net.mdnn"]
    assert same_bits(dnn.deserialize(target).forward(x), net.forward(x))
    dnn.serialize(other, target)                # and a good save replaces it
    assert target.read_bytes() == to_bytes(other)
    assert os.listdir(tmp_path) == ["net.mdnn"]


def test_failed_save_of_an_unsupported_net_leaves_previous_file(tmp_path):
    target = tmp_path / "net.mdnn"
    target.write_bytes(b"previous")
    with pytest.raises(dnn.SerializationError):
        dnn.serialize(dnn.skip1(dnn.input_tensor()), target)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["net.mdnn"]


class FailingFile(io.RawIOBase):
    def __init__(self, budget):
        self.budget = budget

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.budget:
            raise OSError("device error (simulated)")
        self.budget -= len(b)
        return len(b)


def test_write_error_on_a_file_object_propagates():
    net, _ = built("no_bias")
    with pytest.raises(OSError, match="device error"):
        dnn.serialize(net, FailingFile(100))


# ----------------------------------------------------------------------------- command line
def run_cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "minidnn", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_info(tmp_path):
    net, _ = built("residual", fused=True)
    path = tmp_path / "net.mdnn"
    dnn.serialize(net, path)
    r = run_cli("info", str(path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "format version 2" in lines[0] and f"{len(net)} layers" in lines[0]
    assert f"{dnn.count_parameters(net)} parameters" in lines[0]
    assert len(lines) == 1 + len(net)
    assert lines[1].startswith("layer<0>") and "[loss_multiclass_log_1]" in lines[1]
    assert any("(disabled)" in l and "[affine_2]" in l for l in lines)
    assert any("fused_relu" in l and "[con_3]" in l and "params: filters 4x3x3x3" in l for l in lines)
    assert "[input_tensor_2]: input 3x" in lines[-1]
    r = run_cli("info", os.path.join(DATA, "affine_1.mdnn"))
    assert r.returncode == 0 and r.stdout.count("[affine_1]") == 2


def test_cli_fuse(tmp_path):
    net, x = built("residual")
    src, dst = tmp_path / "in.mdnn", tmp_path / "out.mdnn"
    dnn.serialize(net, src)
    r = run_cli("fuse", str(src), str(dst))
    assert r.returncode == 0, r.stderr
    assert "fused" in r.stdout
    fused = dnn.deserialize(dst)
    assert not any(isinstance(n.layer_details(), dnn.bn_) for n in fused.chain())
    R.assert_close(fused.forward(x), R.forward(net, x))
    assert to_bytes(dnn.fuse(dnn.deserialize(src))) == dst.read_bytes()


@pytest.mark.parametrize("cmd", ["info", "fuse"])
def test_cli_bad_file(tmp_path, cmd):
    good = tmp_path / "good.mdnn"
    dnn.serialize(built("no_bias")[0], good)
    bad = tmp_path / "bad.mdnn"
    bad.write_bytes(good.read_bytes()[:-7])
    unrun = tmp_path / "unrun.mdnn"
    dnn.serialize(residual_net()[0], unrun)   # loads, but cannot be fused: no parameters
    cases = [bad, tmp_path / "missing.mdnn", tmp_path] + ([unrun] if cmd == "fuse" else [])
    for path in cases:
        out = tmp_path / "out.mdnn"
        r = run_cli(cmd, str(path), *([str(out)] if cmd == "fuse" else []))
        assert r.returncode != 0, path
        assert r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists()


# -- bn_2 (current) stores the running-average update count; bn_1 (older) still loads --------
def _bn_payload(num_updates=None):
    body = u8(0) + u8(0) + struct.pack("<d", 1e-5) + arr((2,), 0.5) + arr((2,), 0.25) \
        + arr((2,), 0.0) + arr((2,), 1.0)
    return body if num_updates is None else body + u32(num_updates)


def test_bn_1_still_loads_and_is_written_back_as_bn_2():
    net = dnn.deserialize(io.BytesIO(file_of([rec("bn_1", _bn_payload()), INPUT])))
    l = net.layer_details()
    assert isinstance(l, dnn.bn_) and getattr(l, "num_updates", 0) == 0
    np.testing.assert_array_equal(l.gamma, [0.5, 0.5])
    out = io.BytesIO()
    dnn.serialize(net, out)
    assert b"bn_2" in out.getvalue() and b"bn_1" not in out.getvalue()


def test_bn_2_round_trips_the_update_count():
    net = dnn.deserialize(io.BytesIO(file_of([rec("bn_2", _bn_payload(37)), INPUT])))
    assert net.layer_details().num_updates == 37
    out = io.BytesIO()
    dnn.serialize(net, out)
    assert dnn.deserialize(io.BytesIO(out.getvalue())).layer_details().num_updates == 37
    with pytest.raises(dnn.SerializationError, match=r"layer<0> record 'bn_2'.*num_updates"):
        dnn.deserialize(io.BytesIO(file_of([rec("bn_2", _bn_payload(101)), INPUT])))

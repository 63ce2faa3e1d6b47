"""Winograd convolution on the CPU (kernels/cpu/winograd.pyx and winograd.h, the
"Winograd (CPU)" ops of minidnn/ops.py): every variant against the float64 reference,
its blocking edges, the epilogue, the route con_.build takes, the reference nets, and
the filter cache that keeps the transformed filters (core.Plan.cached).

Measured error of each variant: max |y - ref| / max |ref| over the cases of this file
(test_variant_against_the_reference, test_blocking_edges and test_measured_error's
larger reductions; unit-variance inputs, filters scaled by 1/sqrt(9 K), a bias), on
the reference machine:

    F(2x2,3x3)  4.9e-7        F(4x4,3x3)  1.0e-5        F(6x6,3x3)  1.4e-5

(the implicit GEMM of conv2d: ~1e-7; the error grows slowly with K). MAX_REL_ERR, about
twice those, is what the tests enforce. F(6x6)'s error is within the bound of a reference net (1e-4 relative, checked
below with every variant forced) but twice F(4x4)'s, so the route takes it only where
it is clearly faster (winograd.pyx, _rule).
"""
import copy

import numpy as np
import pytest

import reference as REF
import minidnn as dnn
from minidnn import _cpu_winograd as W
from minidnn import nets, ops
from minidnn.backends import cpu

VARIANTS = (2, 4, 6)
MAX_REL_ERR = {2: 1e-6, 4: 2.5e-5, 6: 3e-5}
MEASURED = {2: 4.9e-7, 4: 1.0e-5, 6: 1.4e-5}      # the docstring's numbers
NET_RTOL = 1e-4

# winograd.pyx's defaults (test_blocking_constants keeps docs/INTERNALS.md's table honest)
KNOBS = dict(l2_bytes=384 * 1024, min_t=24, max_t=240, fbw=64, kc=256, max_threads=512)


# ------------------------------------------------------------------ settings
@pytest.fixture(autouse=True)
def _restore():
    mode = W._set_winograd("auto")
    W._set_winograd(mode)
    knobs = W._knobs()
    nt = cpu.get_num_threads()
    yield
    W._set_winograd(mode)
    for k, v in knobs.items():
        if k != "max_threads":
            W._set_knob(k, v)
    cpu.set_num_threads(nt)


@pytest.fixture(params=[1, 2], ids=["nt=1", "nt=2"])
def nt(request):
    cpu.set_num_threads(request.param)
    return request.param


def _rng(*key):
    return np.random.default_rng([abs(int(v)) for v in key])


def _data(N, K, R, C, F, py, px, seed=0):
    rng = _rng(N, K, R, C, F, py, px, seed)
    x = rng.standard_normal((N, K, R, C)).astype(np.float32)
    w = (rng.standard_normal((F, K, 3, 3)) / np.sqrt(9 * K)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32)
    return x, w, b


def _u(w, m):
    u = np.full(ops.winograd_filters_shape(w.shape, m), np.nan, np.float32)
    cpu.winograd_filters(w, u, m)
    return u


def _run(x, w, b, z, py, px, m, act=None):
    F, (N, _, R, C) = w.shape[0], x.shape
    y = np.full((N, F, R + 2 * py - 2, C + 2 * px - 2), np.nan, np.float32)
    cpu.conv2d_winograd(x, _u(w, m), b, z, y, py, px, m, act)
    return y


def _rel_err(y, ref):
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def _check(y, ref, m, factor=1.0):
    assert not np.isnan(y).any()
    err = _rel_err(y, ref)
    assert err <= factor * MAX_REL_ERR[m], f"F({m}x{m},3x3): relative error {err:.2e}"
    return err


# ------------------------------------------------------------------ the variants
def _geometry_cases():
    """(N, K, R, C, F, py, px): output rows and columns at m*k - 1, m*k, m*k + 1 (tile
    edges) for each m, padding 0, 1, 2 and mixed, odd sizes, batch 1 and 3."""
    cases = set()
    for m in VARIANTS:
        for k in (1, 2):
            for ro, co in ((m * k - 1, m * k + 1), (m * k, m * k), (m * k + 1, m * k - 1)):
                for py, px in ((0, 0), (1, 1), (2, 2), (0, 2), (2, 1)):
                    r, c = ro + 2 - 2 * py, co + 2 - 2 * px
                    if r >= 1 and c >= 1 and ro >= 1 and co >= 1:
                        cases.add((1 + (ro + co + py) % 3, 5 + px, r, c, 7 + py, py, px))
    cases.update({(1, 1, 1, 1, 1, 1, 1), (2, 3, 13, 11, 9, 1, 1), (1, 17, 31, 29, 23, 1, 1),
                  (3, 9, 16, 16, 16, 1, 1)})
    return sorted(cases)


GEOMETRY = _geometry_cases()


@pytest.mark.parametrize("m", VARIANTS)
@pytest.mark.parametrize("case", GEOMETRY, ids=lambda c: "x".join(map(str, c)))
def test_variant_against_the_reference(case, m, nt):
    N, K, R, C, F, py, px = case
    x, w, b = _data(*case)
    _check(_run(x, w, b, None, py, px, m), REF.conv2d(x, w, b, 1, 1, py, px), m)
    _check(_run(x, w, None, None, py, px, m), REF.conv2d(x, w, None, 1, 1, py, px), m)


@pytest.mark.parametrize("m", VARIANTS)
def test_measured_error(m):
    """Larger reductions (K up to 512): the error stays within MAX_REL_ERR, and the
    worst of these is near the docstring's measured number (the constants are honest)."""
    worst = 0.0
    for case in [(1, 64, 14, 14, 64, 1, 1), (1, 256, 14, 14, 256, 1, 1), (1, 512, 7, 7, 64, 1, 1),
                 (2, 70, 17, 13, 100, 1, 1), (1, 320, 9, 9, 24, 1, 1)]:
        x, w, b = _data(*case)
        worst = max(worst, _check(_run(x, w, b, None, *case[5:], m), REF.conv2d(x, w, b, 1, 1, *case[5:]), m))
    assert worst > MEASURED[m] / 4, "the measured error in the docstring is out of date"


# ------------------------------------------------------------------ blocking edges
F_EDGES = [5, 6, 7, 8, 9, 15, 16, 17, 63, 64, 65, 119, 120, 121, 239, 240, 241]
K_EDGES = [1, 7, 8, 9, 255, 256, 257, 319, 320, 321, 511, 512, 513]


@pytest.mark.parametrize("m", VARIANTS)
@pytest.mark.parametrize("F", F_EDGES)
def test_filter_edges(F, m, nt):
    """Filters at and around the output transform's 8-filter groups, the 16-filter
    slivers, the 64-filter M block (fbw) and the micro-kernel's 6/120/240."""
    case = (2, 9, 7, 9, F, 1, 1)
    x, w, b = _data(*case)
    _check(_run(x, w, b, None, 1, 1, m), REF.conv2d(x, w, b, 1, 1, 1, 1), m)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("K", K_EDGES)
def test_channel_edges(K, m, nt):
    """Channels at and around the 8-channel groups of the input transform (K8), the
    GEMMs' K block (kc = 256, split evenly) and the micro-kernel's 320/512."""
    case = (1, K, 6, 5, 17, 1, 1)
    x, w, b = _data(*case)
    _check(_run(x, w, b, None, 1, 1, m), REF.conv2d(x, w, b, 1, 1, 1, 1), m)


@pytest.mark.parametrize("knobs", [
    dict(max_t=1, min_t=1),                       # one tile per chunk: chunks inside tile rows
    dict(max_t=5, min_t=5),                       # chunks that straddle tile rows
    dict(min_t=6, max_t=6, fbw=16, kc=8),         # many M blocks and K blocks
    dict(l2_bytes=1024, min_t=240),               # whole tile rows per chunk (unit = tc)
    dict(kc=8, fbw=32),
], ids=["1tile", "5tiles", "blocks", "rows", "kc8"])
@pytest.mark.parametrize("m", VARIANTS)
def test_plan_edges(knobs, m, nt):
    for k, v in knobs.items():
        W._set_knob(k, v)
    for case in [(3, 11, 13, 10, 37, 1, 1), (1, 20, 9, 9, 70, 0, 2), (2, 8, 17, 16, 16, 1, 1)]:
        x, w, b = _data(*case)
        z = _rng(*case).standard_normal((case[0], case[4], case[2] + 2 * case[5] - 2,
                                        case[3] + 2 * case[6] - 2)).astype(np.float32)
        ref = REF.conv2d(x, w, b, 1, 1, case[5], case[6]) + z
        _check(_run(x, w, b, z, case[5], case[6], m), np.maximum(ref, 0) * 0 + ref, m)
        _check(_run(x, w, b, z, case[5], case[6], m, ops.RELU), np.maximum(ref, 0), m)


def test_plans_reach_every_cut():
    """The planner's cuts: chunks of whole tile rows (unit = tc) or of tiles, more
    chunks for the threads, or filter parts when there are too few tiles."""
    p = W._plan_for((16, 64, 56, 56), 64, 1, 1, 4, 2)
    assert p["unit"] == p["tc"] == 14 and p["nchunks"] >= 4 and p["nparts"] == 1
    p = W._plan_for((1, 64, 224, 224), 64, 1, 1, 4, 2)        # 56 tiles a row, 24 a chunk
    assert p["unit"] == 1 and p["Tst"] < p["tc"] and p["nchunks"] >= 8
    p = W._plan_for((1, 512, 7, 7), 512, 1, 1, 4, 2)          # 4 tiles, 512 filters
    assert p["nchunks"] == 1 and p["nparts"] == 2 and p["tasks"] == 2
    p = W._plan_for((1, 64, 28, 28), 64, 1, 1, 4, 2)          # 49 tiles, one filter block
    assert p["tasks"] % 2 == 0 and p["tasks"] >= 2
    p = W._plan_for((1, 64, 56, 56), 64, 1, 1, 4, 1)
    assert p["tasks"] == p["nchunks"] and p["Tst"] * p["nchunks"] >= p["tiles"]


def test_blocking_constants():
    """The defaults documented in docs/INTERNALS.md ("Blocking constants")."""
    assert W._knobs() == KNOBS


# ------------------------------------------------------------------ the epilogue
def _act_cases():
    out = []
    for code, name in sorted(ops.ACT_NAMES.items()):
        if name not in REF.ACTIVATIONS:
            continue
        p = {"leaky_relu": 0.1, "prelu": 0.25, "elu": 0.7, "clipped_relu": 1.5, "smelu": 0.6}.get(name, 0.0)
        out.append(pytest.param(ops.act_by_name(name, p), id=name))
    return out


@pytest.mark.parametrize("act", _act_cases())
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("m", VARIANTS)
def test_epilogue(act, residual, m, nt):
    """bias + residual z + every activation, on whole interior tiles of 8 filters (the
    transposing store) and on ragged edge tiles and filter tails (the general store)."""
    for case in [(2, 16, 2 * m + 2 - 2, 2 * m + 2 - 2, 16, 1, 1), (1, 12, 2 * m + 1, 2 * m - 1, 13, 1, 1)]:
        N, K, R, C, F, py, px = case
        x, w, b = _data(*case)
        conv = REF.conv2d(x, w, b, 1, 1, py, px)
        z = (_rng(*case, 9).standard_normal(conv.shape) if residual else np.zeros(conv.shape)).astype(np.float32)
        y = _run(x, w, b, z if residual else None, py, px, m, act)
        ref = REF.activation(conv + z, act)
        scale = max(1.0, float(np.abs(conv + z).max()))
        err = float(np.abs(y - ref).max()) / scale
        assert err <= 2 * MAX_REL_ERR[m] + 4e-6, f"{act!r}: {err:.2e}"


def test_bad_calls_are_refused():
    x, w, b = _data(1, 4, 6, 6, 5, 1, 1)
    u = _u(w, 4)
    y = np.empty((1, 5, 6, 6), np.float32)
    with pytest.raises(ValueError, match="m must be 2, 4 or 6"):
        cpu.conv2d_winograd(x, u, b, None, y, 1, 1, 3, None)
    with pytest.raises(ValueError, match="u has shape"):
        cpu.conv2d_winograd(x, _u(w, 2), b, None, y, 1, 1, 4, None)
    with pytest.raises(ValueError, match="y has shape"):
        cpu.conv2d_winograd(x, u, b, None, np.empty((1, 5, 5, 6), np.float32), 1, 1, 4, None)
    with pytest.raises(ValueError, match="b has"):
        cpu.conv2d_winograd(x, u, b[:4].copy(), None, y, 1, 1, 4, None)
    with pytest.raises(ValueError, match="must not share memory"):
        cpu.conv2d_winograd(x, u, b, y, y, 1, 1, 4, None)
    with pytest.raises(ValueError, match="does not fit"):
        cpu.conv2d_winograd(x[:, :, :1, :1].copy(), u, b, None, y, 0, 0, 4, None)
    with pytest.raises(ValueError, match=r"\(F, K, 3, 3\)"):
        cpu.winograd_filters(np.zeros((5, 4, 5, 5), np.float32), u, 4)
    with pytest.raises(ValueError, match="_set_winograd"):
        W._set_winograd("5")


# ------------------------------------------------------------------ the route
def test_route_follows_the_measured_rule():
    tile = cpu.winograd_tile
    z = np.zeros
    # the reference nets' 3x3 stride-1 layers: F(4x4)
    for N, K, R in [(1, 32, 32), (64, 64, 16), (1, 128, 8), (1, 64, 56), (16, 256, 14), (1, 512, 7)]:
        assert tile(z((N, K, R, R)), z((K, K, 3, 3)), 1, 1, 1, 1) == (4 if W._have_avx2() else 0)
    # stems (K = 3), 1x1, 5x5, strided: conv2d
    assert tile(z((1, 3, 32, 32)), z((32, 3, 3, 3)), 1, 1, 1, 1) == 0
    assert tile(z((1, 64, 8, 8)), z((64, 64, 1, 1)), 1, 1, 0, 0) == 0
    assert tile(z((1, 64, 8, 8)), z((64, 64, 5, 5)), 1, 1, 2, 2) == 0
    assert tile(z((1, 64, 8, 8)), z((64, 64, 3, 3)), 2, 2, 1, 1) == 0
    # forced: every 3x3 stride-1 shape, and nothing else
    W._set_winograd("6")
    assert tile(z((1, 3, 32, 32)), z((32, 3, 3, 3)), 1, 1, 1, 1) == 6
    assert tile(z((1, 64, 8, 8)), z((64, 64, 3, 3)), 2, 2, 1, 1) == 0
    W._set_winograd("off")
    assert tile(z((1, 64, 56, 56)), z((64, 64, 3, 3)), 1, 1, 1, 1) == 0


def _ops_of(net, shape):
    prog = net._program(shape)
    return [(s.name, s.bind(a)) for (f, a), s in zip(prog.steps, prog.specs) if s is not None]


@pytest.mark.parametrize("mode", ["off", "2", "4", "6"])
def test_forced_route_in_a_net(mode):
    """con_.build emits conv2d_winograd (at the forced m) or conv2d; grouped and dilated
    convolutions never take it; the output matches the reference either way."""
    W._set_winograd(mode)
    dnn.set_seed(3)
    net = dnn.relu(dnn.con(12, 3, 3, 1, 1, dnn.relu(dnn.con(10, 3, 3, 1, 1, dnn.con(
        8, 3, 3, 1, 1, dnn.input_tensor(), dilation_y=2, padding_y=2)))))
    x = _rng(5).standard_normal((2, 4, 9, 11)).astype(np.float32)
    y = net.forward(x)
    names = [n for n, _ in _ops_of(net, x.shape)]
    assert names[0] == "conv2d_grouped"
    if mode == "off":
        assert names[1:] == ["conv2d", "conv2d"]
    else:
        assert names[1:] == ["conv2d_winograd"] * 2
        assert all(a["m"] == int(mode) for n, a in _ops_of(net, x.shape) if n == "conv2d_winograd")
    np.testing.assert_allclose(y, REF.forward(net, x), rtol=0, atol=NET_RTOL * max(1, np.abs(y).max()))


def test_a_backend_without_the_op_runs_conv2d(monkeypatch):
    monkeypatch.delattr(cpu, "conv2d_winograd")
    W._set_winograd("4")
    net = dnn.con(16, 3, 3, 1, 1, dnn.input_tensor())
    x = _rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    net.forward(x)
    assert [n for n, _ in _ops_of(net, x.shape)] == ["conv2d"]
    assert net.layer_details().filters.flags.writeable


def test_epilogues_fuse_into_it():
    """The compiled forward moves a relu above it into its act, and an add_prev above it
    into its z (Plan.fuse_activation, Plan.fuse_residual): one step per convolution."""
    W._set_winograd("4")
    dnn.set_seed(1)
    net = dnn.relu(dnn.add_prev1(dnn.con(16, 3, 3, 1, 1, dnn.relu(dnn.con(16, 3, 3, 1, 1,
                                                                        dnn.tag1(dnn.input_tensor()))))))
    x = _rng(2).standard_normal((2, 16, 9, 9)).astype(np.float32)
    y = net.forward(x)
    steps = _ops_of(net, x.shape)
    assert [n for n, _ in steps] == ["conv2d_winograd", "conv2d_winograd"]
    assert steps[0][1]["act"] == ops.RELU and steps[0][1]["z"] is None
    assert steps[1][1]["act"] == ops.RELU and steps[1][1]["z"] is not None
    np.testing.assert_allclose(y, REF.forward(net, x), rtol=0, atol=NET_RTOL * np.abs(y).max())
    info = str(dnn.backend_info(net))
    assert info.count("Winograd F(4x4,3x3)") == 2 and "+residual" in info


# ------------------------------------------------------------------ the reference nets
def _net_err(net, x):
    y = net.forward(x)
    ref = REF.forward(net, x)
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("mode", ["auto", "2", "4", "6"])
def test_fused_cifar_resnet_within_1e4(mode):
    W._set_winograd(mode)
    net = nets.build("cifar_resnet", batch=2)
    dnn.fuse(net)
    x = _rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert _net_err(net, x) <= NET_RTOL
    n = sum(1 for name, _ in _ops_of(net, x.shape) if name == "conv2d_winograd")
    assert n == (10 if mode == "auto" else 11)        # auto: all but the stem (K = 3)


def test_fused_resnet18_within_1e4(nt):
    if not W._have_avx2():
        W._set_winograd("4")
    net = nets.build("resnet18", batch=1)
    dnn.fuse(net)
    x = _rng(8).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert _net_err(net, x) <= NET_RTOL
    assert sum(1 for name, _ in _ops_of(net, x.shape) if name == "conv2d_winograd") == 13


# ------------------------------------------------------------------ the filter cache
def _wino_net(seed=4):
    W._set_winograd("4")
    dnn.set_seed(seed)
    return dnn.relu(dnn.con(16, 3, 3, 1, 1, dnn.input_tensor()))


def _con(net):
    return dnn.layer(net, dnn.con_).layer_details()


def _counting(monkeypatch):
    calls = []
    real = cpu.winograd_filters

    def counted(w, u, m):
        calls.append(m)
        return real(w, u, m)
    monkeypatch.setattr(cpu, "winograd_filters", counted)
    return calls


def _ref(net, x):
    return REF.forward(net, x)


def _close(y, ref):
    np.testing.assert_allclose(y, ref, rtol=0, atol=NET_RTOL * max(1.0, np.abs(ref).max()))


def test_transform_once_per_change(monkeypatch):
    calls = _counting(monkeypatch)
    net = _wino_net()
    x1 = _rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    x2 = _rng(2).standard_normal((3, 16, 8, 8)).astype(np.float32)
    for _ in range(3):
        net.forward(x1)
        net.forward(x2)                 # another shape: another program, the same transform
    assert calls == [4]
    l = _con(net)
    with l.writable("filters") as w:
        w *= -1
    assert calls == [4]                 # lazily: at the next forward
    _close(net.forward(x2), _ref(net, x2))
    net.forward(x1)
    assert calls == [4, 4]


def test_in_place_write_raises_instead_of_being_ignored():
    net = _wino_net()
    x = _rng(1).standard_normal((2, 16, 7, 9)).astype(np.float32)
    net.forward(x)
    l = _con(net)
    assert not l.filters.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        l.filters[...] = 0
    with pytest.raises(ValueError, match="read-only"):
        l.filters[0] *= 2               # views of it are read-only too
    with pytest.raises(ValueError, match="read-only"):
        np.copyto(l.filters, 0)
    l.biases[...] = 3                   # biases are read in place: still writable
    _close(net.forward(x), _ref(net, x))


def test_writable_is_seen_by_the_next_forward():
    net = _wino_net()
    x = _rng(1).standard_normal((2, 16, 7, 9)).astype(np.float32)
    before = net.forward(x)
    l = _con(net)
    v = l.param_version("filters")
    with l.writable("filters") as w:
        assert w is l.filters and w.flags.writeable
        w[:, :, 1, 1] += 0.5
    assert l.param_version("filters") == v + 1 and not l.filters.flags.writeable
    after = net.forward(x)
    assert not np.allclose(after, before)
    _close(after, _ref(net, x))


def test_rebinding_and_flipping_the_flag():
    net = _wino_net()
    x = _rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    net.forward(x)
    l = _con(net)
    old = l.filters
    l.filters = old * 2                 # a new array: the old one is writable again
    assert old.flags.writeable
    _close(net.forward(x), _ref(net, x))
    assert not l.filters.flags.writeable
    # someone sets the flag themselves and writes: the next forward recomputes
    l.filters.flags.writeable = True
    l.filters[...] *= 0.5
    _close(net.forward(x), _ref(net, x))
    assert not l.filters.flags.writeable


def test_a_copy_of_the_net_stays_right():
    net = _wino_net()
    x = _rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    net.forward(x)
    lt = copy.deepcopy(_con(net))       # the layer, its arrays and its cache
    twin = dnn.relu(dnn.Node(lt, dnn.input_tensor()))
    if lt.filters.flags.writeable:      # deepcopy gives writable arrays: a write before the
        lt.filters[...] *= -1           # copy's first forward must be seen
    _close(twin.forward(x), _ref(twin, x))
    _close(net.forward(x), _ref(net, x))


def test_fuse_after_a_forward():
    """fuse() writes the locked filters through writable(); the fused net is right."""
    W._set_winograd("4")
    dnn.set_seed(6)
    net = dnn.relu(dnn.bn_con(dnn.con(16, 3, 3, 1, 1, dnn.input_tensor())))
    x = _rng(1).standard_normal((2, 16, 8, 8)).astype(np.float32)
    nets.randomized(net, x.shape)
    before = net.forward(x)
    assert not dnn.layer(net, dnn.con_).layer_details().filters.flags.writeable
    dnn.fuse(net)
    after = net.forward(x)
    np.testing.assert_allclose(after, before, rtol=0, atol=NET_RTOL * np.abs(before).max())
    _close(after, _ref(net, x))


def test_training_updates_are_seen(tmp_path):
    """The solver updates the filters in place through writable(); so does a
    checkpoint restore. An inference forward after either is never stale."""
    W._set_winograd("4")
    dnn.set_seed(2)

    def make():
        return dnn.loss_multiclass_log(dnn.fc(3, dnn.avg_pool_everything(dnn.relu(dnn.con(
            16, 3, 3, 1, 1, dnn.relu(dnn.con(16, 3, 3, 1, 1, dnn.input_tensor())))))))
    net = make()
    rng = _rng(3)
    x = rng.standard_normal((12, 4, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 12)
    body = net.subnet()
    body.forward(x)                                      # compiles: the filters are locked
    assert not dnn.layer(net, dnn.con_).layer_details().filters.flags.writeable
    t = dnn.dnn_trainer(net, dnn.sgd(), verbose=False)
    t.learning_rate, t.mini_batch_size, t.max_num_epochs = 0.1, 6, 2
    sync = tmp_path / "t.sync"
    t.set_synchronization_file(sync, interval_seconds=0)
    before = body.forward(x).copy()
    t.train(x, y)
    after = body.forward(x)
    assert not np.allclose(after, before)
    _close(after, _ref(body, x))
    # restore the checkpoint into a net that has run (locked filters)
    net2 = make()
    net2.subnet().forward(x)
    t2 = dnn.dnn_trainer(net2, dnn.sgd(), verbose=False)
    t2.max_num_epochs = 2
    t2.set_synchronization_file(sync)
    t2.train(x, y)                                       # nothing left to do: restores only
    _close(net2.subnet().forward(x), after)


def test_a_conv_conv2d_runs_keeps_writable_filters():
    W._set_winograd("off")
    net = dnn.con(16, 3, 3, 1, 1, dnn.input_tensor())
    x = _rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    net.forward(x)
    l = _con(net)
    l.filters[...] *= 2                 # read in place: seen by the next forward
    _close(net.forward(x), _ref(net, x))


@pytest.mark.parametrize("has_winograd", [True, False], ids=["with", "without"])
def test_on_a_device_backend(monkeypatch, has_winograd):
    """On a device, the transform is computed once and uploaded (Plan.cached's device
    branch); a device without the OPTIONAL ops runs conv2d, and the net moves there all
    the same."""
    from test_ops_contract import FakeArray, _fake_backend
    mod = _fake_backend()
    if not has_winograd:
        for name in ops.OPTIONAL:
            delattr(mod, name)
    monkeypatch.setattr(ops, "DEVICES", ops.DEVICES + ("fake",))
    monkeypatch.setitem(ops._by_name, "fake", mod)
    monkeypatch.setitem(ops._by_type, FakeArray, mod)
    net = _wino_net()
    x = _rng(1).standard_normal((2, 16, 7, 9)).astype(np.float32)
    want = net.forward(x)
    net.to("fake", graphs=False)
    got = net.forward(FakeArray(x))
    np.testing.assert_array_equal(got, want if has_winograd else got)
    _close(got, _ref(net, x))
    names = [n for n, _ in _ops_of(net, x.shape)]
    assert names == (["conv2d_winograd"] if has_winograd else ["conv2d"])

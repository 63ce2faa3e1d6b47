"""CUDA kernels (minidnn/backends/cuda/) against slow, obviously-correct NumPy
and against the CPU backend.

The tests marked gpu need a GPU: they run with `pytest --gpu` only; the few
unmarked ones check the kernel sources (minidnn/backends/cuda/source.py, loaded
by path: no PyCUDA needed) and run everywhere. References are
computed in float64 from the same float32 inputs. Tolerances: elementwise ops,
pooling and softmax must match to rtol 1e-5 (atol 1e-5 * max(1, |ref|.max()));
for the reductions of conv2d and fc the atol scale is instead the largest sum
of absolute products (the same sum with |x| and |w|): an fp32 dot product
of length L in any order errs by at most about L*eps of that, typically
sqrt(L)*eps, and 1e-5 covers sqrt(L)*eps (6e-8) up to L ~ 25000.
Outputs are poisoned with NaN before each call, so an unwritten element fails.
The activation tests compare every MDNN_ACT_* code of kernels/common/activations.h
in every epilogue with the CPU backend's kernels, which apply the same formulas.
"""
import importlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

from minidnn import ops

gpu = pytest.mark.gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cu():
    # raises the backend's own clear message when PyCUDA / the driver / a GPU is missing
    return importlib.import_module("minidnn.backends.cuda")


class _Internals:
    """What these tests reach behind the backend contract: the per-shape plan cache
    (kernels.plans) and the autotuner's forced choice (autotune.force_gemm)."""

    def __init__(self):
        from minidnn.backends.cuda import autotune, kernels
        self._autotune, self.kernels, self.plans = autotune, kernels, kernels.plans

    @property
    def force_gemm(self):
        return self._autotune.force_gemm

    @force_gemm.setter
    def force_gemm(self, v):
        self._autotune.force_gemm = v


@pytest.fixture(scope="module")
def tune(cu):
    return _Internals()


@pytest.fixture
def rng(request):
    # fresh inputs per test, reproducible per test name (crc32: the same in every process)
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _poisoned(cu, shape):
    return cu.asarray(np.full(shape, np.nan, np.float32))


def assert_close(got, ref, scale=None, rtol=1e-5):
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all(), "output has NaN/inf (unwritten or overflowed elements)"
    if scale is None:
        scale = np.abs(ref).max() if ref.size else 0.0
    atol = 1e-5 * max(1.0, float(scale))
    err = np.abs(got.astype(np.float64) - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), (
        f"{bad.sum()} of {ref.size} elements off; max err {err.max():.3g}, atol {atol:.3g}, "
        f"first bad at {np.argwhere(bad)[0]}: got {got[tuple(np.argwhere(bad)[0])]}, "
        f"ref {ref[tuple(np.argwhere(bad)[0])]}")


# --------------------------------------------------------------------------
# NumPy references (float64)

def conv_ref(x, w, b, sy, sx, py, px, relu):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    N, K, R, C = x.shape
    F, _, nr, nc = w.shape
    Ro = 1 + (R + 2 * py - nr) // sy
    Co = 1 + (C + 2 * px - nc) // sx
    xp = np.pad(x, ((0, 0), (0, 0), (py, py), (px, px)))
    y = np.zeros((N, F, Ro, Co))
    for r in range(nr):
        for c in range(nc):
            patch = xp[:, :, r:r + sy * (Ro - 1) + 1:sy, c:c + sx * (Co - 1) + 1:sx]
            y += np.einsum("nkhw,fk->nfhw", patch, w[:, :, r, c])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return np.maximum(y, 0) if relu else y


def pool_ref(x, nr, nc, sy, sx, py, px, kind):
    x = x.astype(np.float64)
    N, K, R, C = x.shape
    Ro = 1 + (R + 2 * py - nr) // sy
    Co = 1 + (C + 2 * px - nc) // sx
    y = np.empty((N, K, Ro, Co))
    for oy in range(Ro):
        for ox in range(Co):
            r0, c0 = oy * sy - py, ox * sx - px
            win = x[:, :, max(r0, 0):min(r0 + nr, R), max(c0, 0):min(c0 + nc, C)]
            y[:, :, oy, ox] = win.max(axis=(2, 3)) if kind == "max" else win.mean(axis=(2, 3))
    return y


def softmax_ref(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------
# conv2d

CONV_CASES = [
    # N, K, R, C, F, nr, nc, sy, sx, py, px, bias, relu
    (1, 3, 7, 9, 5, 3, 3, 1, 1, 0, 0, True, False),
    (2, 4, 11, 13, 7, 3, 5, 2, 1, 1, 2, True, True),
    (3, 5, 9, 10, 6, 2, 3, 3, 2, 1, 0, False, True),
    (2, 16, 17, 15, 33, 5, 5, 2, 2, 2, 2, True, True),
    (2, 3, 5, 6, 3, 1, 4, 3, 3, 0, 3, True, False),
    (1, 2, 3, 3, 2, 5, 5, 1, 1, 1, 1, True, True),       # window = padded image
    (4, 3, 32, 32, 16, 7, 7, 2, 2, 3, 3, False, False),  # stem-like
    (8, 32, 8, 8, 64, 1, 1, 1, 1, 0, 0, True, False),    # 1x1
    (2, 8, 9, 9, 4, 1, 1, 2, 2, 0, 0, True, True),       # 1x1 stride 2
    (1, 64, 14, 14, 130, 3, 3, 1, 1, 1, 1, True, True),  # F > 128, small grid
    (1, 512, 7, 7, 512, 3, 3, 1, 1, 1, 1, True, True),   # long reduction, batch 1
    (64, 16, 32, 32, 32, 3, 3, 1, 1, 1, 1, True, True),  # many columns
    (3, 7, 13, 11, 9, 4, 2, 2, 3, 2, 1, True, True),
]


def _conv_check(cu, rng, case):
    N, K, R, C, F, nr, nc, sy, sx, py, px, bias, relu = case
    x = _rand(rng, N, K, R, C)
    w = _rand(rng, F, K, nr, nc)
    b = _rand(rng, F) if bias else None
    Ro = 1 + (R + 2 * py - nr) // sy
    Co = 1 + (C + 2 * px - nc) // sx
    y = _poisoned(cu, (N, F, Ro, Co))
    cu.conv2d(cu.asarray(x), cu.asarray(w), None if b is None else cu.asarray(b), y,
              sy, sx, py, px, relu)
    ref = conv_ref(x, w, b, sy, sx, py, px, relu)
    absref = conv_ref(np.abs(x), np.abs(w), None if b is None else np.abs(b), sy, sx, py, px, False)
    assert_close(cu.to_numpy(y), ref, scale=absref.max())


@gpu
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(cu, rng, case):
    _conv_check(cu, rng, case)


@gpu
@pytest.mark.parametrize("force", [("conv_128x128", 1), ("conv_64x64", 1), ("conv_64x64", 3),
                                   ("conv_128x128", 5)])
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (1, 3, 6, 9, 12)])
def test_conv2d_every_config(cu, tune, rng, case, force):
    """Each tile configuration and split-K, whatever the heuristic would pick."""
    tune.plans.clear()
    tune.force_gemm = force
    try:
        _conv_check(cu, rng, case)
    finally:
        tune.force_gemm = None
        tune.plans.clear()


@gpu
def test_conv2d_reuses_plan_with_new_buffers(cu, rng):
    case = (2, 4, 11, 13, 7, 3, 5, 2, 1, 1, 2, True, True)
    for _ in range(3):
        _conv_check(cu, rng, case)


# --------------------------------------------------------------------------
# conv2d_residual: conv2d + z before the relu, in the conv's epilogue (or the
# split-K reduction, or cuDNN's fused call with alpha2 = 1 / its fallback)

@pytest.fixture(params=["own", "cudnn"])
def route(request, cu, tune):
    """Force the conv route for the test (and forget earlier choices); back to auto after."""
    cu.set_conv_route(request.param)
    if request.param == "cudnn" and not cu.use_cudnn():
        cu.set_conv_route("auto")
        pytest.skip("cuDNN is not available here")
    yield request.param
    tune.force_gemm = None
    cu.set_conv_route("auto")


def _out_shape(case):
    N, K, R, C, F, nr, nc, sy, sx, py, px = case[:11]
    return (N, F, 1 + (R + 2 * py - nr) // sy, 1 + (C + 2 * px - nc) // sx)


def _offset_array(cu, a, offset):
    """A GPUArray holding a, starting `offset` floats into a larger buffer (offset 1:
    not 16-byte aligned, which turns the float4 epilogue off)."""
    if offset == 0:
        return cu.asarray(a)
    buf = cu.asarray(np.concatenate([np.zeros(offset, np.float32), a.ravel()]))
    v = buf[offset:].reshape(a.shape)                  # a view: it keeps buf alive
    assert v.flags.c_contiguous and int(v.gpudata) % 16 == 4 * offset % 16
    return v


def _conv_res_check(cu, rng, case, relu=None, z_offset=0, route=None):
    N, K, R, C, F, nr, nc, sy, sx, py, px, bias, case_relu = case
    relu = case_relu if relu is None else relu
    x = _rand(rng, N, K, R, C)
    w = _rand(rng, F, K, nr, nc)
    b = _rand(rng, F) if bias else None
    ys = _out_shape(case)
    z = _rand(rng, *ys, scale=3.0)
    zg = _offset_array(cu, z, z_offset)
    y = _poisoned(cu, ys)
    cu.conv2d_residual(cu.asarray(x), cu.asarray(w), None if b is None else cu.asarray(b), zg, y,
                       sy, sx, py, px, relu)
    ref = conv_ref(x, w, b, sy, sx, py, px, False) + z.astype(np.float64)
    if relu:
        ref = np.maximum(ref, 0)
    absref = conv_ref(np.abs(x), np.abs(w), None if b is None else np.abs(b), sy, sx, py, px,
                      False) + np.abs(z)
    assert_close(cu.to_numpy(y), ref, scale=absref.max())
    assert np.array_equal(cu.to_numpy(zg), z)           # z is only read
    if route is not None:
        assert cu.conv_route(x.shape, w.shape, sy, sx, py, px, relu, residual=True) == route


@gpu
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_residual(cu, rng, route, case, relu):
    _conv_res_check(cu, rng, case, relu=relu, route=route)


@gpu
@pytest.mark.parametrize("force", [("conv_128x128", 1), ("conv_64x64", 1), ("conv_64x64", 3),
                                   ("conv_128x128", 5)])
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (1, 3, 6, 9, 12)])
def test_conv2d_residual_every_config(cu, tune, rng, case, force):
    """Each tile configuration and split-K (the residual then goes through splitk_reduce),
    on the own kernels, with z aligned (float4 epilogue where P % 4 == 0) and not."""
    cu.set_conv_route("own")
    tune.force_gemm = force
    try:
        for z_offset in (0, 1):
            for relu in (False, True):
                _conv_res_check(cu, rng, case, relu=relu, z_offset=z_offset)
        _conv_check(cu, rng, case)        # conv2d on the same shape: its own plan, no z
    finally:
        tune.force_gemm = None
        cu.set_conv_route("auto")


@gpu
def test_conv2d_residual_auto_route_is_reported_apart(cu, rng):
    """The residual form is routed (and timed) on its own: conv_route tells the two apart."""
    cu.set_conv_route("auto")
    case = (2, 16, 17, 15, 33, 5, 5, 2, 2, 2, 2, True, True)
    args = ((2, 16, 17, 15), (33, 16, 5, 5), 2, 2, 2, 2, True)
    _conv_res_check(cu, rng, case)
    assert cu.conv_route(*args, residual=True) in ("own", "cudnn")
    assert cu.conv_route(*args) is None                  # conv2d has not run this shape
    _conv_check(cu, rng, case)
    assert cu.conv_route(*args) in ("own", "cudnn")
    assert cu.conv_route(*args, residual=False) == cu.conv_route(*args)
    for _ in range(2):                                   # cached plans, new buffers
        _conv_res_check(cu, rng, case)


@gpu
def test_conv2d_residual_rejects_aliasing(cu, rng, route):
    x = cu.asarray(_rand(rng, 2, 3, 8, 8))
    w = cu.asarray(_rand(rng, 4, 3, 3, 3))
    b = cu.asarray(_rand(rng, 4))
    y = cu.empty((2, 4, 8, 8))
    with pytest.raises(ValueError, match="z"):
        cu.conv2d_residual(x, w, b, y, y, 1, 1, 1, 1, True)
    buf = cu.empty((3, 4, 8, 8))
    y2, z2 = buf[:2], buf[1:]                           # overlapping views of one buffer
    assert y2.flags.c_contiguous and z2.flags.c_contiguous
    with pytest.raises(ValueError, match="overlap"):
        cu.conv2d_residual(x, w, b, z2, y2, 1, 1, 1, 1, True)
    with pytest.raises(ValueError, match="overlap"):
        cu.conv2d_residual(x, w, b, buf[:2].reshape(2, 4, 8, 8), buf[1:3], 1, 1, 1, 1, False)
    # adjacent but disjoint views are fine
    big = cu.empty((4, 4, 8, 8))
    z = _rand(rng, 2, 4, 8, 8)
    cu.upload(big, np.concatenate([z, np.full_like(z, np.nan)]))
    cu.conv2d_residual(x, w, b, big[:2], big[2:], 1, 1, 1, 1, False)
    xh, wh, bh = cu.to_numpy(x), cu.to_numpy(w), cu.to_numpy(b)
    ref = conv_ref(xh, wh, bh, 1, 1, 1, 1, False) + z
    absref = conv_ref(np.abs(xh), np.abs(wh), np.abs(bh), 1, 1, 1, 1, False) + np.abs(z)
    assert_close(cu.to_numpy(big)[2:], ref, scale=absref.max())


@gpu
def test_graph_capture_conv2d_residual(cu, tune, rng, route):
    """conv2d_residual inside a captured graph (own route: forced split-K, so the
    residual goes through splitk_reduce), replayed with new x and new z written into
    the captured buffers."""
    cases = [(2, 8, 12, 12, 16, 3, 3, 1, 1, 1, 1), (1, 256, 7, 7, 64, 3, 3, 1, 1, 1, 1)]
    bufs = []
    for i, c in enumerate(cases):
        N, K, R, C, F, nr, nc = c[:7]
        ys = _out_shape(c + (True, True))
        bufs.append(dict(c=c, x=cu.asarray(_rand(rng, N, K, R, C)),
                         w=cu.asarray(_rand(rng, F, K, nr, nc)), b=cu.asarray(_rand(rng, F)),
                         z=cu.asarray(_rand(rng, *ys)), y=cu.empty(ys)))
    if route == "own":
        tune.force_gemm = ("conv_64x64", 3)              # the reduction inside the graph too

    def forward():
        for i, d in enumerate(bufs):
            sy, sx, py, px = d["c"][7:11]
            cu.conv2d_residual(d["x"], d["w"], d["b"], d["z"], d["y"], sy, sx, py, px, i == 0)

    def refs():
        out = []
        for i, d in enumerate(bufs):
            sy, sx, py, px = d["c"][7:11]
            xh, wh, bh, zh = (cu.to_numpy(d[k]) for k in "xwbz")
            r = conv_ref(xh, wh, bh, sy, sx, py, px, False) + zh
            a = conv_ref(np.abs(xh), np.abs(wh), np.abs(bh), sy, sx, py, px, False) + np.abs(zh)
            out.append((np.maximum(r, 0) if i == 0 else r, a.max()))
        return out

    try:
        g = cu.capture(forward)
        for d in bufs:
            cu.upload(d["y"], np.full(d["y"].shape, np.nan, np.float32))
            cu.upload(d["x"], _rand(rng, *d["x"].shape))
            cu.upload(d["z"], _rand(rng, *d["z"].shape))
        g.launch()
        for d, (r, scale) in zip(bufs, refs()):
            assert_close(cu.to_numpy(d["y"]), r, scale=scale)
        for d in bufs:
            assert cu.conv_route(d["x"].shape, d["w"].shape, *d["c"][7:11],
                                 d is bufs[0], residual=True) == route
        g.close()
    finally:
        tune.force_gemm = None


# --------------------------------------------------------------------------
# fc

FC_CASES = [
    # N, D, O, bias, relu
    (1, 10, 7, True, False),
    (3, 37, 129, True, True),
    (8, 512, 1000, True, False),
    (9, 100, 33, False, True),
    (64, 512, 1000, True, True),
    (130, 257, 70, True, False),
    (17, 3000, 5, True, True),
]


def _fc_check(cu, rng, N, D, O, bias, relu, xshape=None):
    x = _rand(rng, N, D)
    w = _rand(rng, O, D)
    b = _rand(rng, O) if bias else None
    y = _poisoned(cu, (N, O))
    xg = cu.asarray(x.reshape(xshape) if xshape else x)
    cu.fc(xg, cu.asarray(w), None if b is None else cu.asarray(b), y, relu)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b)
    if relu:
        ref = np.maximum(ref, 0)
    absref = np.abs(x).astype(np.float64) @ np.abs(w).T + (0 if b is None else np.abs(b))
    assert_close(cu.to_numpy(y), ref, scale=absref.max())


@gpu
@pytest.mark.parametrize("case", FC_CASES)
def test_fc(cu, rng, case):
    _fc_check(cu, rng, *case)


@gpu
def test_fc_4d_input(cu, rng):
    _fc_check(cu, rng, 5, 48, 11, True, True, xshape=(5, 3, 4, 4))
    _fc_check(cu, rng, 20, 48, 11, True, False, xshape=(20, 3, 4, 4))


@gpu
@pytest.mark.parametrize("force", [("fc_tile", 1), ("fc_tile", 3)])
def test_fc_tile_every_config(cu, tune, rng, force):
    tune.plans.clear()
    tune.force_gemm = force
    try:
        for case in FC_CASES[3:]:
            _fc_check(cu, rng, *case)
    finally:
        tune.force_gemm = None
        tune.plans.clear()


# --------------------------------------------------------------------------
# elementwise

@gpu
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (2, 4, 4, 4), (3, 7, 1, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_affine(cu, rng, shape, relu, inplace):
    x = _rand(rng, *shape)
    g, h = _rand(rng, shape[1]), _rand(rng, shape[1])
    xg = cu.asarray(x)
    y = xg if inplace else _poisoned(cu, shape)
    cu.affine(xg, cu.asarray(g), cu.asarray(h), y, relu)
    ref = x.astype(np.float64) * g[None, :, None, None] + h[None, :, None, None]
    assert_close(cu.to_numpy(y), np.maximum(ref, 0) if relu else ref)


@gpu
def test_affine_fc_mode_2d(cu, rng):
    x = _rand(rng, 6, 10)
    g, h = _rand(rng, 10), _rand(rng, 10)
    y = _poisoned(cu, (6, 10))
    cu.affine(cu.asarray(x), cu.asarray(g), cu.asarray(h), y, True)
    assert_close(cu.to_numpy(y), np.maximum(x.astype(np.float64) * g + h, 0))


@gpu
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (4, 8, 16, 16), (7,)])
@pytest.mark.parametrize("inplace", [False, True])
def test_relu(cu, rng, shape, inplace):
    """The activation op with relu (it replaced the relu op): True and ops.RELU alike."""
    for act in (True, ops.RELU):
        x = _rand(rng, *shape)
        xg = cu.asarray(x)
        y = xg if inplace else _poisoned(cu, shape)
        cu.activation(xg, y, act)
        assert_close(cu.to_numpy(y), np.maximum(x, 0))


@gpu
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (4, 8, 16, 16), (3,)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_add(cu, rng, shape, relu, inplace):
    a, b = _rand(rng, *shape), _rand(rng, *shape)
    ag, bg = cu.asarray(a), cu.asarray(b)
    y = ag if inplace else _poisoned(cu, shape)
    cu.add(ag, bg, y, relu)
    ref = a.astype(np.float64) + b
    assert_close(cu.to_numpy(y), np.maximum(ref, 0) if relu else ref)


# --------------------------------------------------------------------------
# pooling

POOL_CASES = [
    # N, K, R, C, nr, nc, sy, sx, py, px
    (2, 3, 7, 9, 3, 3, 2, 2, 1, 1),
    (1, 4, 8, 8, 2, 2, 2, 2, 0, 0),
    (2, 2, 9, 7, 3, 2, 1, 1, 1, 0),
    (3, 5, 7, 7, 7, 7, 1, 1, 0, 0),     # global
    (1, 4, 40, 40, 40, 40, 1, 1, 0, 0),  # global, large plane
    (2, 3, 11, 13, 5, 4, 3, 2, 2, 1),
    (2, 3, 6, 5, 3, 3, 1, 3, 2, 2),
    (1, 1, 1, 1, 1, 1, 1, 1, 0, 0),
]


@gpu
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool(cu, rng, kind, case):
    N, K, R, C, nr, nc, sy, sx, py, px = case
    x = _rand(rng, N, K, R, C) - 3.0   # all-negative-ish: padding must not count as 0
    ref = pool_ref(x, nr, nc, sy, sx, py, px, kind)
    y = _poisoned(cu, ref.shape)
    fn = cu.max_pool if kind == "max" else cu.avg_pool
    fn(cu.asarray(x), y, nr, nc, sy, sx, py, px)
    assert_close(cu.to_numpy(y), ref)


# --------------------------------------------------------------------------
# softmax

@gpu
@pytest.mark.parametrize("shape", [(4, 10, 1, 1), (3, 1000, 1, 1), (2, 7, 5, 3), (1, 1, 1, 1),
                                   (2, 33, 2, 2), (5, 3)])
@pytest.mark.parametrize("inplace", [False, True])
def test_softmax(cu, rng, shape, inplace):
    x = _rand(rng, *shape, scale=30.0)   # large logits: needs the max subtraction
    xg = cu.asarray(x)
    y = xg if inplace else _poisoned(cu, shape)
    cu.softmax(xg, y)
    x4 = x.reshape(shape + (1,) * (4 - len(shape)))
    assert_close(cu.to_numpy(y), softmax_ref(x4).reshape(shape))


# --------------------------------------------------------------------------
# graphs, memory, import errors

@gpu
def test_graph_capture_replay(cu, rng):
    x = cu.asarray(_rand(rng, 2, 3, 12, 12))
    w = cu.asarray(_rand(rng, 8, 3, 3, 3))
    b = cu.asarray(_rand(rng, 8))
    h = cu.empty((2, 8, 12, 12))
    p = cu.empty((2, 8, 6, 6))
    fw = cu.asarray(_rand(rng, 10, 8 * 36))
    fb = cu.asarray(_rand(rng, 10))
    z = cu.empty((2, 10))
    s = cu.empty((2, 10))

    def forward():
        cu.conv2d(x, w, b, h, 1, 1, 1, 1, True)
        cu.max_pool(h, p, 2, 2, 2, 2, 0, 0)
        cu.fc(p, fw, fb, z, False)
        cu.softmax(z, s)

    forward()
    eager = cu.to_numpy(s)
    g = cu.capture(forward)
    cu.upload(s, np.full((2, 10), np.nan, np.float32))
    g.launch()
    assert np.array_equal(cu.to_numpy(s), eager)
    for _ in range(3):
        g.launch()
    assert np.array_equal(cu.to_numpy(s), eager)

    # new input through the same buffer: the replay sees it
    x2 = _rand(rng, 2, 3, 12, 12)
    cu.upload(x, x2)
    g.launch()
    replayed = cu.to_numpy(s)
    forward()
    assert np.array_equal(cu.to_numpy(s), replayed)
    assert not np.array_equal(replayed, eager)
    g.close()


@gpu
def test_out_of_memory_is_a_clear_memory_error(cu):
    with pytest.raises(MemoryError, match="out of GPU memory"):
        cu.empty((1 << 42,))
    a = cu.empty((4, 4))   # the allocator still works
    assert a.shape == (4, 4)


@gpu
def test_contract_names(cu):
    for fn in ("conv2d", "conv2d_residual", "fc", "affine", "activation", "add", "max_pool",
               "avg_pool", "softmax", "empty", "asarray", "to_numpy"):
        assert callable(getattr(cu, fn)), fn
    assert cu.name == "cuda"
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    g = cu.asarray(x)
    assert g.dtype == np.float32 and g.shape == (2, 3)
    assert np.array_equal(cu.to_numpy(g), x.astype(np.float32))
    h = cu.empty((2, 3))
    cu.copy(h, g)
    assert np.array_equal(cu.to_numpy(h), x.astype(np.float32))
    cu.upload(h, x[::-1])
    assert np.array_equal(cu.to_numpy(h), x[::-1].astype(np.float32))


def test_import_without_pycuda_says_how_to_install():
    # needs no GPU: runs everywhere
    code = (
        "import sys\n"
        "sys.modules['pycuda'] = None\n"
        "try:\n"
        "    import minidnn.backends.cuda\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env).stdout
    assert "RuntimeError:" in out and "PyCUDA" in out and 'pip install "minidnn[gpu]"' in out


@gpu
def test_prepared_async_call_fallback(cu, tune, rng):
    """The launcher's public-API path (used where PyCUDA lacks _launch_kernel)."""
    x = _rand(rng, 1000)
    xg, y = cu.asarray(x), _poisoned(cu, (1000,))
    k = tune.kernels.Kernel("eltwise", "activation_f", (4,), (256,))
    k._launch = None
    k(xg.gpudata, y.gpudata, 1000, 1, 0.0)          # (x, y, n, act = relu, act_p)
    assert_close(cu.to_numpy(y), np.maximum(x, 0))


# --------------------------------------------------------------------------
# activations as data: every MDNN_ACT_* code in every epilogue, against the CPU backend

# (name, code, param) for each code of kernels/common/activations.h; params away from
# the defaults, so that a kernel ignoring its parameter fails
ACTS = [("identity", 0, 0.0), ("relu", 1, 0.0), ("leaky_relu", 2, 0.1), ("prelu", 3, 0.25),
        ("sig", 4, 0.0), ("htan", 5, 0.0), ("elu", 6, 0.7), ("gelu", 7, 0.0),
        ("mish", 8, 0.0), ("silu", 9, 0.0), ("clipped_relu", 10, 1.5), ("smelu", 11, 0.8)]
ACT_IDS = [a[0] for a in ACTS]


def _cpu():
    from minidnn.backends import cpu
    return cpu


def _act(a):
    return ops.Act(a[1], a[2])


@gpu
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 4, 4, 4), (7,), (1,)])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_activation_every_code(cu, rng, act, inplace, shape):
    """The standalone activation kernel (float4 and scalar paths) = the CPU's, per code."""
    x = _rand(rng, *shape, scale=4.0)            # reaches the saturated tails too
    ref = np.empty_like(x)
    _cpu().activation(x, ref, _act(act))
    xg = cu.asarray(x)
    y = xg if inplace else _poisoned(cu, shape)
    cu.activation(xg, y, _act(act))
    assert_close(cu.to_numpy(y), ref)


@gpu
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_affine_and_add_every_code(cu, rng, act):
    cpu = _cpu()
    for shape in ((2, 3, 5, 5), (2, 4, 4, 4)):   # scalar and float4 paths
        x, g, h = _rand(rng, *shape, scale=2.0), _rand(rng, shape[1]), _rand(rng, shape[1])
        ref = np.empty_like(x)
        cpu.affine(x, g, h, ref, _act(act))
        y = _poisoned(cu, shape)
        cu.affine(cu.asarray(x), cu.asarray(g), cu.asarray(h), y, _act(act))
        assert_close(cu.to_numpy(y), ref)
        a, b = _rand(rng, *shape, scale=2.0), _rand(rng, *shape, scale=2.0)
        cpu.add(a, b, ref, _act(act))
        y = _poisoned(cu, shape)
        cu.add(cu.asarray(a), cu.asarray(b), y, _act(act))
        assert_close(cu.to_numpy(y), ref)


# (N, K, R, C, F, nr, nc, sy, sx, py, px): P = Ro*Co odd (scalar stores) and % 4 == 0
ACT_CONV_CASES = [(2, 5, 11, 13, 7, 3, 3, 2, 1, 1, 1), (2, 4, 8, 8, 9, 3, 3, 1, 1, 1, 1)]


def _act_conv_check(cu, rng, case, act, residual=False, z_offset=0):
    """conv2d (or conv2d_residual) with activation act on the GPU against the CPU backend,
    in fp32 both; the tolerance scale is conv_ref's sum of absolute products."""
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    x, w, b = _rand(rng, N, K, R, C), _rand(rng, F, K, nr, nc), _rand(rng, F)
    ys = _out_shape(case + (True, True))
    ref = np.empty(ys, np.float32)
    y = _poisoned(cu, ys)
    absref = conv_ref(np.abs(x), np.abs(w), np.abs(b), sy, sx, py, px, False)
    if residual:
        z = _rand(rng, *ys, scale=2.0)
        _cpu().conv2d_residual(x, w, b, z, ref, sy, sx, py, px, _act(act))
        cu.conv2d_residual(cu.asarray(x), cu.asarray(w), cu.asarray(b),
                           _offset_array(cu, z, z_offset), y, sy, sx, py, px, _act(act))
        absref = absref + np.abs(z)
    else:
        _cpu().conv2d(x, w, b, ref, sy, sx, py, px, _act(act))
        cu.conv2d(cu.asarray(x), cu.asarray(w), cu.asarray(b), y, sy, sx, py, px, _act(act))
    assert_close(cu.to_numpy(y), ref, scale=absref.max())


@gpu
@pytest.mark.parametrize("force", [("conv_64x64", 1), ("conv_128x128", 1), ("conv_64x64", 3)])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_conv2d_epilogue_every_code(cu, tune, rng, act, force):
    """Each activation in the own kernels' epilogue (both tiles) and in the split-K
    reduction (S = 3), with and without the residual (z aligned and not)."""
    cu.set_conv_route("own")
    tune.force_gemm = force
    try:
        for case in ACT_CONV_CASES:
            _act_conv_check(cu, rng, case, act)
            _act_conv_check(cu, rng, case, act, residual=True)
            _act_conv_check(cu, rng, case, act, residual=True, z_offset=1)
    finally:
        tune.force_gemm = None
        cu.set_conv_route("auto")


@gpu
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_conv2d_every_code_on_each_route(cu, rng, route, act):
    """On the cuDNN route an activation cuDNN lacks is cuDNN's identity epilogue plus the
    own activation kernel; conv_route reports the route either way."""
    case = ACT_CONV_CASES[0]
    for residual in (False, True):
        _act_conv_check(cu, rng, case, act, residual=residual)
        N, K, R, C, F, nr, nc, sy, sx, py, px = case
        assert cu.conv_route((N, K, R, C), (F, K, nr, nc), sy, sx, py, px, _act(act),
                             residual=residual) == route


@gpu
@pytest.mark.parametrize("force", [None, ("fc_tile", 1), ("fc_tile", 3)])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_fc_epilogue_every_code(cu, tune, rng, act, force):
    """fc_small (N <= 8), fc_tile and its split-K reduction, O % 4 == 0 and not."""
    tune.force_gemm = force
    try:
        for N, D, O in ((3, 37, 129), (20, 100, 33), (17, 64, 8), (9, 513, 12)):
            x, w, b = _rand(rng, N, D), _rand(rng, O, D), _rand(rng, O)
            ref = np.empty((N, O), np.float32)
            _cpu().fc(x, w, b, ref, _act(act))
            y = _poisoned(cu, (N, O))
            cu.fc(cu.asarray(x), cu.asarray(w), cu.asarray(b), y, _act(act))
            absref = np.abs(x).astype(np.float64) @ np.abs(w).T + np.abs(b)
            assert_close(cu.to_numpy(y), ref, scale=absref.max())
    finally:
        tune.force_gemm = None


@gpu
def test_bad_activation_is_a_clear_error(cu):
    x = cu.empty((2, 3))
    with pytest.raises(ValueError, match="activation: unknown activation code 99"):
        cu.activation(x, x, ops.Act(99, 0.0))
    with pytest.raises(ValueError, match="act must be an activation"):
        cu.add(x, x, x, "relu")


# --------------------------------------------------------------------------
# the backend as ops sees it

@gpu
def test_backend_of_gpu_arrays_is_the_cuda_backend(cu):
    be = ops.backend("cuda")
    assert be is cu and be.array_type is cu.array_type
    a = cu.empty((4, 3))
    assert ops.backend_of(a) is cu
    assert ops.backend_of(a[1:]) is cu                     # a view is a GPUArray too
    assert ops.backend_of(cu.asarray(np.arange(3, dtype=np.int32))) is cu
    assert ops.backend_of(np.zeros(3, np.float32)) is ops.backend("cpu")


@gpu
def test_contract_is_the_ops_table(cu):
    """Every inference op of minidnn.ops.OPS (but the CPU-only ops.OPTIONAL ones), with the
    table's parameter names, and the memory/device names the runtime uses: exactly the
    package's __all__."""
    import inspect
    inference = {n: s for n, s in ops.OPS.items() if not s.grad}
    # the OPTIONAL ops (CPU-only Winograd) may be absent; every other op is there
    absent = {n for n in inference if not hasattr(cu, n)}
    assert absent <= set(ops.OPTIONAL), absent - set(ops.OPTIONAL)
    for name, spec in inference.items():
        if name in absent:
            continue
        params = tuple(inspect.signature(getattr(cu, name)).parameters)
        assert params == spec.args, (name, params, spec.args)
    extra = {"name", "array_type", "empty", "asarray", "to_numpy", "upload", "copy",
             "synchronize", "capture", "Graph", "stream", "context", "device", "CudaMemoryError",
             "load_kernels", "set_conv_route", "conv_route", "use_cudnn", "image_pyramid",
             "begin_run", "end_run", "run_lock", "exclusive", "view", "storage"}
    assert set(cu.__all__) == (set(inference) - absent) | extra
    assert all(hasattr(cu, n) for n in cu.__all__)
    g = cu.empty((2,))
    with pytest.raises(NotImplementedError, match="training"):
        ops.activation_grad(g, g, g, g, ops.RELU)     # training ops stay on the CPU


# --------------------------------------------------------------------------
# the kernel sources, on any machine (source.py needs no GPU: loaded by path)

def _source():
    spec = importlib.util.spec_from_file_location(
        "minidnn_cuda_source", ROOT / "minidnn" / "backends" / "cuda" / "source.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_sources_assemble_with_the_common_headers():
    src = _source()
    assert src.kernel_root() == ROOT / "kernels"             # a checkout uses its own kernels
    for fam in src.FAMILIES:
        text = src.assemble(fam)
        assert '#include "' not in text, fam                 # all of ours inlined
        assert text.startswith(f'#line 1 "{ROOT / "kernels" / "cuda" / (fam + ".cu")}"')
    for fam in ("conv", "gemm", "eltwise"):
        text = src.assemble(fam)
        assert f'#line 1 "{ROOT / "kernels" / "common" / "activations.h"}"' in text
        assert text.count("#define MINIDNN_ACTIVATIONS_H") == 1
    for fam in ("conv", "gemm"):                            # the shared tile core, once
        text = src.assemble(fam)
        assert text.count("#define MINIDNN_GEMM_TILE_CUH") == 1
        assert f'#line 1 "{ROOT / "kernels" / "cuda" / "gemm_tile.cuh"}"' in text


def test_every_kernel_the_backend_launches_is_declared():
    """Each Kernel("family", "name", ...) of the backend and each tile of the autotuner
    names a kernel of that family's source, whose format comes from its signature."""
    import re
    src = _source()
    code = "".join(p.read_text() for p in (ROOT / "minidnn" / "backends" / "cuda").glob("*.py"))
    launched = set(re.findall(r'Kernel\("(\w+)", "(\w+)"', code))
    launched |= {("conv", k) for k in re.findall(r'"(conv_\w+)": \(', code)}
    launched |= {("gemm", k) for k in re.findall(r'"(fc_\w+)": \(', code)}
    assert ("eltwise", "activation_f") in launched and ("conv", "conv_64x64") in launched
    for fam, name in launched:
        sig = src.signature(fam, name)
        assert len(sig.format) == len(sig.names) > 0
    conv = src.signature("conv", "conv_128x128")
    assert conv == src.signature("conv", "conv_64x64")._replace(kernel="conv_128x128")
    assert conv.names[:6] == ("x", "w", "b", "z", "y", "tab") and conv.format[:6] == "P" * 6
    assert conv.names[-5:] == ("act", "act_p", "kchunk", "out_zstride", "vec_store")
    assert conv.format[-5:] == "ifiqi"
    assert src.signature("eltwise", "activation_v4").format == "PPiif"
    assert src.signature("eltwise", "splitk_reduce").names[-2:] == ("act", "act_p")
    with pytest.raises(KeyError, match="relu_f"):
        src.signature("eltwise", "relu_f")


def test_signature_parser():
    src = _source()
    text = r'''
    #define ARGS const float* __restrict__ x, /* in */ \
        float* y, int n
    #define F(a) a                                   // function-like: never expanded
    extern "C" __global__ void __launch_bounds__(256, 2) k1(ARGS, long long t, float p) {}
    extern "C" __global__ void k2(const float4* a, unsigned int u, double d) { }
    __device__ void helper(int q) {}
    '''
    sigs = src.parse_signatures(text)
    assert set(sigs) == {"k1", "k2"}
    assert sigs["k1"].names == ("x", "y", "n", "t", "p") and sigs["k1"].format == "PPiqf"
    assert sigs["k2"].format == "PId"
    with pytest.raises(ValueError, match="half"):
        src.parse_signatures('extern "C" __global__ void k3(half h) {}')


def test_activation_codes_are_the_headers():
    src = _source()
    header = (ROOT / "kernels" / "common" / "activations.h").read_text()
    import re
    codes = {int(v) for k, v in re.findall(r"#define MDNN_ACT_(\w+) (\d+)", header) if k != "COUNT"}
    assert codes == set(range(src.act_count())) == {a[1] for a in ACTS}
    import minidnn  # noqa: F401  (its activation layers register their names)
    assert {a[1]: a[0] for a in ACTS} == ops.ACT_NAMES


@pytest.mark.skipif(os.environ.get("MINIDNN_TEST_NVCC") != "1" or shutil.which("nvcc") is None,
                    reason="set MINIDNN_TEST_NVCC=1 (with nvcc on PATH) to compile every kernel")
def test_kernels_compile_with_nvcc():
    """What PyCUDA would compile (same text, options and include path), for sm_90."""
    assert _source()._main(["--nvcc", "--arch", os.environ.get("MINIDNN_TEST_ARCH", "sm_90")]) == 0

"""The convolution family on the CUDA backend (minidnn/backends/cuda/conv_family.py,
kernels/cuda/conv_family.cu): conv2d_grouped (the depthwise kernels dw_tile / dw_direct,
the grouped implicit GEMM gconv_*, cuDNN's grouped/dilated convolution) and
conv2d_transpose (tconv_f4 / tconv_f1), against the float64 references of
tests/reference.py.

- GPU tests (marked gpu, run with ``pytest --gpu``): every kernel forced
  (conv_family.force_kernel) over odd sizes, strides 1/2/3, padding, dilation 1/2/3,
  groups 1/2/K, channel multipliers, batch 1 and more, around every blocking constant
  (DW_TH, DW_TW; the tiles' BM, BN and BK = 16; FT), every activation; each route forced
  (own kernel vs cuDNN, routing.set_conv_route) and auto; plans reused with new buffers
  (y aligned and not); graph capture and replay; grids beyond 65535 blocks; nets with
  grouped cons and conts moved to "cuda", fused, with backend_info.
- CPU tests (everywhere): every kernel of conv_family.cu parses with source.py's signature
  parser and, with nvcc on PATH, compiles for sm_90; the blocking constants of the host
  side match the kernels'; the host side's plans, run against a stand-in kernel launcher
  (no GPU), pass each kernel exactly its signature's arguments and a grid that covers the
  output; cuDNN's grouped plans (against tests/test_cudnn_policy.py's fake libcudnn) set the
  group count and the dilation.

Tolerances as tests/test_cuda_kernels.py: atol 1e-5 * the largest sum of absolute
products (|x| * |w| + |b|), rtol 1e-5; the activation is applied to the reference.
Outputs are poisoned with NaN first, so an unwritten element fails.
"""
import importlib
import importlib.util
import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest

import minidnn as dnn
from minidnn import ops

import reference as REF

gpu = pytest.mark.gpu
ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_FILE = ROOT / "kernels" / "cuda" / "conv_family.cu"
HOST_FILE = ROOT / "minidnn" / "backends" / "cuda" / "conv_family.py"

# (name, code, param) for each code of kernels/common/activations.h
ACTS = [("identity", 0, 0.0), ("relu", 1, 0.0), ("leaky_relu", 2, 0.1), ("prelu", 3, 0.25),
        ("sig", 4, 0.0), ("htan", 5, 0.0), ("elu", 6, 0.7), ("gelu", 7, 0.0),
        ("mish", 8, 0.0), ("silu", 9, 0.0), ("clipped_relu", 10, 1.5), ("smelu", 11, 0.8)]
ACT_IDS = [a[0] for a in ACTS]
DW_KERNELS = ("dw_tile", "dw_direct")
GCONV_KERNELS = ("gconv_64x64", "gconv_32x128", "gconv_16x256")
TCONV_KERNELS = ("tconv_f4", "tconv_f1")
ALL_KERNELS = set(DW_KERNELS + GCONV_KERNELS + TCONV_KERNELS)
RELU6 = ops.Act(10, 6.0)


def _A(a):
    return ops.Act(a[1], a[2])


def _act_of(i):
    """A different activation per case index (every code comes round)."""
    return _A(ACTS[i % len(ACTS)])


# ------------------------------------------------------------------ cases
def _dw_rc(Ro, Co, s, k=3, p=1, d=1):
    """The input size giving Ro x Co outputs at stride s, k taps, pad p, dilation d."""
    span = d * (k - 1) + 1
    return (Ro - 1) * s + span - 2 * p, (Co - 1) * s + span - 2 * p


# N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G
DW_CASES = [
    (1, 8, 9, 11, 8, 3, 3, 1, 1, 1, 1, 1, 1, 8),
    (2, 6, 17, 15, 12, 3, 3, 2, 2, 1, 1, 1, 1, 6),        # multiplier 2, stride 2
    (3, 4, 13, 10, 12, 5, 5, 3, 3, 2, 2, 1, 1, 4),        # multiplier 3, stride 3, 5x5
    (1, 5, 20, 33, 5, 3, 3, 1, 1, 2, 2, 2, 2, 5),         # dilation 2
    (2, 3, 21, 22, 3, 3, 3, 1, 2, 3, 3, 3, 3, 3),         # dilation 3, mixed strides
    (1, 4, 7, 7, 4, 3, 3, 2, 2, 1, 1, 1, 1, 4),           # 7 px, stride 2
    (2, 3, 8, 9, 6, 1, 1, 1, 1, 0, 0, 1, 1, 3),           # 1x1 depthwise
    (1, 2, 6, 40, 2, 2, 4, 1, 3, 0, 1, 2, 1, 2),          # non-square filter
    (1, 3, 5, 5, 3, 5, 5, 1, 1, 0, 0, 1, 1, 3),           # window = image: 1x1 output
    (2, 3, 4, 5, 3, 7, 7, 1, 2, 3, 3, 1, 1, 3),           # filter larger than the image
    (64, 8, 14, 14, 8, 3, 3, 1, 1, 1, 1, 1, 1, 8),        # batch 64
    (1, 2, 9, 9, 2, 3, 3, 2, 3, 0, 2, 3, 2, 2),
]
# around dw_tile's DW_TH (8) and DW_TW (32): Ro, Co = 7 8 9 / 15 16 17, 31 32 33 / 63 64 65
for _s in (1, 2):
    for _ro, _co in ((7, 31), (8, 32), (9, 33), (15, 63), (16, 64), (17, 65), (1, 1), (8, 1),
                     (1, 32)):
        _r, _c = _dw_rc(_ro, _co, _s)
        DW_CASES.append((2, 3, _r, _c, 3, 3, 3, _s, _s, 1, 1, 1, 1, 3))
# MobileNet's depthwise layers (3x3, pad 1, stride 1 and 2), batch 1
MOBILENET = [(32, 112, 1), (64, 112, 2), (128, 56, 1), (128, 56, 2), (256, 28, 1), (256, 28, 2),
             (512, 14, 1), (512, 14, 2), (1024, 7, 1)]

GROUPED_CASES = [
    (2, 4, 6, 7, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2),
    (1, 6, 9, 8, 6, 3, 2, 2, 1, 2, 1, 1, 1, 3),
    (3, 6, 4, 5, 4, 1, 1, 1, 1, 0, 0, 1, 1, 2),           # grouped 1x1
    (2, 2, 8, 9, 3, 3, 3, 1, 1, 2, 2, 2, 2, 1),           # dilated, one group
    (1, 3, 13, 10, 3, 3, 2, 3, 2, 2, 0, 3, 2, 1),         # dilation 3, stride 3
    (2, 8, 11, 11, 16, 3, 3, 2, 2, 3, 3, 3, 3, 4),        # dilated, grouped, stride 2
    (1, 32, 14, 14, 64, 3, 3, 1, 1, 1, 1, 1, 1, 8),       # ResNeXt-like
    (4, 16, 9, 9, 32, 3, 3, 1, 1, 1, 1, 1, 1, 8),
    (1, 12, 5, 7, 6, 5, 3, 1, 2, 2, 1, 1, 2, 3),
    (2, 8, 6, 6, 8, 3, 3, 1, 1, 1, 1, 1, 1, 4),           # Fg = 2
    (1, 64, 7, 7, 64, 3, 3, 1, 1, 1, 1, 1, 1, 32),        # Kg = 2, batch 1, 7 px
]
# around the tiles' BM (16 32 64) and BK (16): Fg and Kd = Kg*nr*nc = 15 16 17 ...
for _fg in (15, 16, 17, 31, 32, 33, 63, 64, 65):
    GROUPED_CASES.append((1, 6, 5, 6, 2 * _fg, 1, 1, 1, 1, 0, 0, 1, 1, 2))
for _kg in (15, 16, 17, 31, 32, 33):
    GROUPED_CASES.append((2, 2 * _kg, 4, 5, 6, 1, 1, 1, 1, 0, 0, 1, 1, 2))
# around BN (64 128 256): Ncols = N*Ro*Co = 63 64 65 127 128 129 255 256 257
for _nc in (63, 64, 65, 127, 128, 129, 255, 256, 257):
    GROUPED_CASES.append((1, 4, 1, _nc, 4, 1, 1, 1, 1, 0, 0, 1, 1, 2))
GROUPED_CASES.append((3, 4, 7, 9, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2))      # Ncols 189, P % 4 != 0
GROUPED_CASES.append((2, 4, 8, 8, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2))      # P % 4 == 0: float4 stores

# N, K, R, C, F, nr, nc, sy, sx, py, px
TRANSPOSE_CASES = [
    (2, 4, 5, 6, 3, 4, 4, 2, 2, 0, 0),
    (1, 3, 6, 5, 2, 3, 3, 1, 1, 1, 1),
    (2, 2, 4, 3, 3, 5, 4, 3, 2, 2, 1),
    (2, 4, 3, 3, 3, 1, 1, 1, 1, 0, 0),
    (1, 8, 7, 9, 5, 2, 2, 2, 2, 0, 0),
    (3, 5, 4, 4, 9, 3, 3, 3, 3, 1, 2),
    (1, 16, 8, 8, 8, 2, 2, 2, 2, 0, 0),
    (64, 8, 7, 7, 4, 4, 4, 2, 2, 1, 1),                    # batch 64
    (1, 3, 5, 6, 2, 5, 5, 1, 1, 4, 4),                    # pad = nr - 1
    (2, 3, 1, 1, 4, 3, 2, 2, 3, 0, 0),                    # 1x1 input
    (1, 2, 6, 7, 3, 2, 3, 3, 1, 1, 2),                    # stride > filter: gaps
    (1, 32, 14, 14, 16, 4, 4, 2, 2, 1, 1),                # U-Net-like
]
for _f in (1, 3, 4, 5, 7, 8, 9):                         # around FT = 4
    TRANSPOSE_CASES.append((2, 3, 4, 5, _f, 3, 3, 2, 2, 1, 1))


def _ids(cases):
    return ["-".join(map(str, c)) for c in cases]


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def cu():
    return importlib.import_module("minidnn.backends.cuda")


@pytest.fixture
def fam(cu):
    """conv_family, with force_kernel and the route put back after the test."""
    from minidnn.backends.cuda import conv_family
    conv_family.force_kernel = None
    yield conv_family
    conv_family.force_kernel = None
    cu.set_conv_route("auto")


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _poisoned(cu, shape, offset=0):
    """A NaN-filled GPUArray of shape, `offset` floats into a larger buffer (offset 1: not
    16-byte aligned)."""
    n = int(np.prod(shape))
    buf = cu.asarray(np.full(n + offset, np.nan, np.float32))
    return buf.reshape(shape) if offset == 0 else buf[offset:].reshape(shape)


def assert_close(got, ref, scale, rtol=1e-5):
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all(), "output has NaN/inf (unwritten or overflowed elements)"
    atol = 1e-5 * max(1.0, float(scale))
    err = np.abs(got.astype(np.float64) - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), (
        f"{bad.sum()} of {ref.size} elements off; max err {err.max():.3g}, atol {atol:.3g}, "
        f"first bad at {np.argwhere(bad)[0]}: got {got[tuple(np.argwhere(bad)[0])]}, "
        f"ref {ref[tuple(np.argwhere(bad)[0])]}")


def _dw_ref(x, w, b, sy, sx, py, px, dy, dx, groups):
    """reference.conv2d_grouped for groups == K, vectorised over the channels (many
    channels would take reference.py's loop over groups a long time):
    test_dw_ref_is_the_reference checks that the two agree."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    N, K, R, C = x.shape
    F, kg, nr, nc = w.shape
    assert groups == K and kg == 1 and F % K == 0
    xr = np.repeat(x, F // K, axis=1)            # output channel f reads input f // m
    xp = np.zeros((N, F, R + 2 * py, C + 2 * px))
    xp[:, :, py:py + R, px:px + C] = xr
    Ro = 1 + (R + 2 * py - (dy * (nr - 1) + 1)) // sy
    Co = 1 + (C + 2 * px - (dx * (nc - 1) + 1)) // sx
    y = np.zeros((N, F, Ro, Co))
    for a in range(nr):
        for c in range(nc):
            y += xp[:, :, a * dy:a * dy + sy * (Ro - 1) + 1:sy,
                    c * dx:c * dx + sx * (Co - 1) + 1:sx] * w[None, :, 0, a, c, None, None]
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def _grouped_out(case):
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    return (N, F, 1 + (R + 2 * py - (dy * (nr - 1) + 1)) // sy,
            1 + (C + 2 * px - (dx * (nc - 1) + 1)) // sx)


def _check_grouped(cu, rng, case, act, bias=True, y_offset=0, route=None):
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    x = _rand(rng, N, K, R, C)
    w = _rand(rng, F, K // G, nr, nc)
    b = _rand(rng, F) if bias else None
    y = _poisoned(cu, _grouped_out(case), y_offset)
    cu.conv2d_grouped(cu.asarray(x), cu.asarray(w), None if b is None else cu.asarray(b), y,
                      sy, sx, py, px, dy, dx, G, act)
    ref_fn = _dw_ref if G == K else REF.conv2d_grouped
    ref = ref_fn(x, w, b, sy, sx, py, px, dy, dx, G)
    absref = ref_fn(np.abs(x), np.abs(w), None if b is None else np.abs(b),
                    sy, sx, py, px, dy, dx, G)
    assert_close(cu.to_numpy(y), REF.activation(ref, ops.as_act(act)), absref.max())
    if route is not None:
        assert cu.conv_route(x.shape, w.shape, sy, sx, py, px, act, dilation=(dy, dx),
                             groups=G) == route


def _transpose_out(case):
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    return (N, F, sy * (R - 1) + nr - 2 * py, sx * (C - 1) + nc - 2 * px)


def _check_transpose(cu, rng, case, act, bias=True):
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    x = _rand(rng, N, K, R, C)
    w = _rand(rng, K, F, nr, nc)
    b = _rand(rng, F) if bias else None
    y = _poisoned(cu, _transpose_out(case))
    cu.conv2d_transpose(cu.asarray(x), cu.asarray(w), None if b is None else cu.asarray(b), y,
                        sy, sx, py, px, act)
    ref = REF.conv2d_transpose(x, w, b, sy, sx, py, px)
    absref = REF.conv2d_transpose(np.abs(x), np.abs(w), None if b is None else np.abs(b),
                                  sy, sx, py, px)
    assert_close(cu.to_numpy(y), REF.activation(ref, ops.as_act(act)), absref.max())


@pytest.fixture(params=["own", "cudnn"])
def route(request, cu, fam):
    cu.set_conv_route(request.param)
    if request.param == "cudnn" and not cu.use_cudnn():
        pytest.skip("cuDNN is not available here")
    yield request.param
    cu.set_conv_route("auto")


# ================================================================== GPU: each kernel forced
@gpu
@pytest.mark.parametrize("kernel", DW_KERNELS)
@pytest.mark.parametrize("case", DW_CASES, ids=_ids(DW_CASES))
def test_depthwise_kernels(cu, fam, rng, kernel, case):
    """dw_tile and dw_direct on every depthwise shape (multipliers, strides, dilations,
    around DW_TH and DW_TW), with and without bias, a different activation per case."""
    fam.force_kernel = kernel
    i = DW_CASES.index(case)
    _check_grouped(cu, rng, case, _act_of(i), bias=i % 3 != 2)


@gpu
@pytest.mark.parametrize("kernel", GCONV_KERNELS)
@pytest.mark.parametrize("case", GROUPED_CASES, ids=_ids(GROUPED_CASES))
def test_grouped_gemm_kernels(cu, fam, rng, kernel, case):
    """Each grouped implicit-GEMM tile on every grouped/dilated shape (around BM, BN, BK),
    y 16-byte aligned (float4 stores where P % 4 == 0) and not."""
    fam.force_kernel = kernel
    i = GROUPED_CASES.index(case)
    _check_grouped(cu, rng, case, _act_of(i), bias=i % 3 != 2)
    _check_grouped(cu, rng, case, _act_of(i + 1), bias=True, y_offset=1)


@gpu
@pytest.mark.parametrize("kernel", TCONV_KERNELS)
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=_ids(TRANSPOSE_CASES))
def test_transpose_kernels(cu, fam, rng, kernel, case):
    fam.force_kernel = kernel
    i = TRANSPOSE_CASES.index(case)
    _check_transpose(cu, rng, case, _act_of(i), bias=i % 3 != 2)


@gpu
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_every_activation_in_every_kernel(cu, fam, rng, act):
    """Each MDNN_ACT_* code in each kernel's epilogue (the tiles' three instantiations:
    identity, relu and any code)."""
    for kernel in DW_KERNELS:
        fam.force_kernel = kernel
        for case in (DW_CASES[1], DW_CASES[4]):
            _check_grouped(cu, rng, case, _A(act))
    for kernel in GCONV_KERNELS:
        fam.force_kernel = kernel
        for case in (GROUPED_CASES[0], GROUPED_CASES[5], GROUPED_CASES[-1]):
            _check_grouped(cu, rng, case, _A(act))
    for kernel in TCONV_KERNELS:
        fam.force_kernel = kernel
        for case in (TRANSPOSE_CASES[0], TRANSPOSE_CASES[2]):
            _check_transpose(cu, rng, case, _A(act))


# sh_h x sh_w = 82 x 154 floats of patch: 50.5 KiB > DW_SMEM_MAX, so dw_direct alone
BIG_PATCH = (1, 2, 70, 70, 4, 7, 7, 3, 3, 0, 0, 10, 10, 2)


@gpu
def test_depthwise_patch_beyond_shared_memory(cu, fam, rng):
    for kernel in ("dw_direct", None):
        fam.force_kernel = kernel
        _check_grouped(cu, rng, BIG_PATCH, ops.Act(7, 0.0))
    fam.force_kernel = "dw_tile"
    with pytest.raises(ValueError, match="cannot run this shape"):
        _check_grouped(cu, rng, BIG_PATCH, ops.RELU)


@gpu
def test_forced_kernel_that_cannot_run_the_shape_is_an_error(cu, fam, rng):
    fam.force_kernel = "gconv_64x64"
    with pytest.raises(ValueError, match="cannot run this shape"):
        _check_grouped(cu, rng, DW_CASES[0], ops.RELU)
    fam.force_kernel = "dw_tile"
    with pytest.raises(ValueError, match="cannot run this shape"):
        _check_grouped(cu, rng, GROUPED_CASES[0], ops.RELU)


@gpu
@pytest.mark.parametrize("batch", [1, 64])
def test_mobilenet_depthwise_layers(cu, fam, rng, batch):
    """MobileNet's 3x3 depthwise layers (stride 1 and 2, 112 .. 7 px) on each depthwise
    kernel, then auto (timed) against both; batch 64 against the CPU backend on a few
    samples (the float64 reference of the whole batch would be slow)."""
    from minidnn.backends import cpu
    for K, H, s in MOBILENET:
        x = _rand(rng, batch, K, H, H)
        w = _rand(rng, K, 1, 3, 3)
        b = _rand(rng, K)
        Ho = 1 + (H + 2 - 3) // s
        xs = x[:2]
        ref = REF.activation(_dw_ref(xs, w, b, s, s, 1, 1, 1, 1, K), RELU6)
        absref = _dw_ref(np.abs(xs), np.abs(w), np.abs(b), s, s, 1, 1, 1, 1, K)
        on_cpu = np.empty((batch, K, Ho, Ho), np.float32)
        cpu.conv2d_grouped(x, w, b, on_cpu, s, s, 1, 1, 1, 1, K, RELU6)
        xg, wg, bg = cu.asarray(x), cu.asarray(w), cu.asarray(b)
        for kernel in DW_KERNELS + (None,):
            fam.force_kernel = kernel
            y = _poisoned(cu, (batch, K, Ho, Ho))
            cu.conv2d_grouped(xg, wg, bg, y, s, s, 1, 1, 1, 1, K, RELU6)
            got = cu.to_numpy(y)
            assert_close(got[:2], ref, absref.max())
            assert_close(got, on_cpu, absref.max())


# ================================================================== GPU: routes
@gpu
@pytest.mark.parametrize("case", [DW_CASES[i] for i in (0, 1, 3, 10)] +
                         [GROUPED_CASES[i] for i in (0, 3, 5, 6)],
                         ids=_ids([DW_CASES[i] for i in (0, 1, 3, 10)] +
                                  [GROUPED_CASES[i] for i in (0, 3, 5, 6)]))
def test_each_route(cu, rng, route, case):
    """Own kernels vs cuDNN's grouped/dilated convolution, relu and identity (cuDNN's
    fused call) and an activation cuDNN lacks (its identity epilogue + the own activation
    kernel); conv_route reports the route under the grouped key only."""
    for act in (ops.RELU, ops.IDENTITY, ops.Act(9, 0.0), True, False):
        _check_grouped(cu, rng, case, act, route=route)
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    assert cu.conv_route((N, K, R, C), (F, K // G, nr, nc), sy, sx, py, px, ops.RELU) is None


@gpu
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_cudnn_route_every_activation(cu, rng, route, act):
    for case in (DW_CASES[1], GROUPED_CASES[5]):
        _check_grouped(cu, rng, case, _A(act), route=route)


@gpu
def test_cudnn_route_paths_are_reported(cu, fam, rng):
    """On the cuDNN route, cudnn.conv_path(dilation=, groups=) reports the grouped plan
    (and its calls), apart from a plain convolution of the same shapes."""
    from minidnn.backends import cudnn
    cu.set_conv_route("cudnn")
    if not cu.use_cudnn():
        pytest.skip("cuDNN is not available here")
    case = GROUPED_CASES[5]
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    _check_grouped(cu, rng, case, ops.RELU, route="cudnn")
    p = cudnn.conv_path((N, K, R, C), (F, K // G, nr, nc), sy, sx, py, px, ops.RELU, plan=False,
                        dilation=(dy, dx), groups=G)
    assert p is not None and p["calls"] >= 1, p


@gpu
@pytest.mark.parametrize("case", [DW_CASES[0], DW_CASES[10], GROUPED_CASES[6]],
                         ids=_ids([DW_CASES[0], DW_CASES[10], GROUPED_CASES[6]]))
def test_auto_route(cu, fam, rng, case):
    cu.set_conv_route("auto")
    _check_grouped(cu, rng, case, ops.RELU)
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    assert cu.conv_route((N, K, R, C), (F, K // G, nr, nc), sy, sx, py, px, ops.RELU,
                         dilation=(dy, dx), groups=G) in ("own", "cudnn")


# ================================================================== GPU: plans, graphs, grids
@gpu
def test_plans_are_reused_with_new_buffers(cu, fam, rng):
    for case in (DW_CASES[1], GROUPED_CASES[-1]):
        for offset in (0, 1, 0):
            _check_grouped(cu, rng, case, ops.RELU, y_offset=offset)
    for _ in range(2):
        _check_transpose(cu, rng, TRANSPOSE_CASES[0], ops.RELU)


@gpu
@pytest.mark.parametrize("route_name", ["own", "cudnn"])
def test_graph_capture_replay(cu, fam, rng, route_name):
    cu.set_conv_route(route_name)
    if route_name == "cudnn" and not cu.use_cudnn():
        pytest.skip("cuDNN is not available here")
    x = cu.asarray(_rand(rng, 2, 8, 12, 12))
    wd = cu.asarray(_rand(rng, 16, 1, 3, 3))          # depthwise, multiplier 2
    bd = cu.asarray(_rand(rng, 16))
    h = cu.empty((2, 16, 6, 6))
    wg = cu.asarray(_rand(rng, 8, 4, 3, 3))           # 4 groups, dilation 2
    g_out = cu.empty((2, 8, 6, 6))
    wt = cu.asarray(_rand(rng, 8, 3, 4, 4))           # transposed, stride 2
    bt = cu.asarray(_rand(rng, 3))
    out = cu.empty((2, 3, 12, 12))

    def forward():
        cu.conv2d_grouped(x, wd, bd, h, 2, 2, 1, 1, 1, 1, 8, ops.RELU)
        cu.conv2d_grouped(h, wg, None, g_out, 1, 1, 2, 2, 2, 2, 4, ops.Act(9, 0.0))
        cu.conv2d_transpose(g_out, wt, bt, out, 2, 2, 1, 1, ops.Act(5, 0.0))

    forward()
    eager = cu.to_numpy(out)
    g = cu.capture(forward)
    cu.upload(out, np.full(out.shape, np.nan, np.float32))
    g.launch()
    assert np.array_equal(cu.to_numpy(out), eager)
    cu.upload(x, _rand(rng, 2, 8, 12, 12))
    g.launch()
    replayed = cu.to_numpy(out)
    forward()
    assert np.array_equal(cu.to_numpy(out), replayed)
    assert not np.array_equal(replayed, eager)
    g.close()


@gpu
@pytest.mark.parametrize("kernel", DW_KERNELS)
def test_depthwise_grid_beyond_65535_planes(cu, fam, rng, kernel):
    """N*F = 2 * 40000 planes (dw_tile: one block each; dw_direct: 5000 blocks of 256)."""
    fam.force_kernel = kernel
    _check_grouped(cu, rng, (2, 40000, 4, 4, 40000, 3, 3, 1, 1, 1, 1, 1, 1, 40000), ops.RELU)


@gpu
def test_grouped_gemm_large_grid(cu, fam, rng):
    """Ncols = 4.4M pixels: 69000 column blocks of gconv_64x64 (beyond 65535)."""
    fam.force_kernel = "gconv_64x64"
    _check_grouped(cu, rng, (1, 4, 2100, 2100, 2, 1, 1, 1, 1, 0, 0, 1, 1, 2), ops.IDENTITY)


@gpu
@pytest.mark.parametrize("kernel", TCONV_KERNELS)
def test_transpose_large_grid(cu, fam, kernel):
    """16.8M output pixels (65600 blocks of 256) of a 2x2 stride-2 transposed convolution:
    y[2i + a, 2j + c] = x[i, j] w[a, c], exactly one product per element."""
    fam.force_kernel = kernel
    rng = np.random.default_rng(7)
    x = _rand(rng, 1, 1, 2050, 2048)
    w = _rand(rng, 1, 1, 2, 2)
    y = _poisoned(cu, (1, 1, 4100, 4096))
    cu.conv2d_transpose(cu.asarray(x), cu.asarray(w), None, y, 2, 2, 0, 0, False)
    ref = np.kron(x[0, 0].astype(np.float64), w[0, 0].astype(np.float64))
    got = cu.to_numpy(y)[0, 0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@gpu
def test_bad_arguments_are_clear_errors(cu, fam):
    x = cu.empty((1, 4, 5, 5))
    with pytest.raises(ValueError, match="groups"):
        cu.conv2d_grouped(x, cu.empty((6, 2, 3, 3)), None, cu.empty((1, 6, 5, 5)),
                          1, 1, 1, 1, 1, 1, 3, ops.RELU)
    with pytest.raises(ValueError, match="y must be"):
        cu.conv2d_grouped(x, cu.empty((4, 1, 3, 3)), None, cu.empty((1, 4, 4, 4)),
                          1, 1, 1, 1, 1, 1, 4, ops.RELU)
    with pytest.raises(ValueError, match="y must be"):
        cu.conv2d_transpose(x, cu.empty((4, 2, 2, 2)), None, cu.empty((1, 2, 9, 9)),
                            2, 2, 0, 0, ops.RELU)
    with pytest.raises(ValueError, match="unknown activation code"):
        cu.conv2d_transpose(x, cu.empty((4, 2, 2, 2)), None, cu.empty((1, 2, 10, 10)),
                            2, 2, 0, 0, ops.Act(99, 0.0))


@gpu
def test_empty_batch(cu, fam):
    y = cu.empty((0, 4, 5, 5))
    cu.conv2d_grouped(cu.empty((0, 4, 5, 5)), cu.empty((4, 1, 3, 3)), None, y,
                      1, 1, 1, 1, 1, 1, 4, ops.RELU)
    cu.conv2d_transpose(cu.empty((0, 4, 5, 5)), cu.empty((4, 4, 1, 1)), None, y,
                        1, 1, 0, 0, ops.RELU)
    cu.synchronize()


# ================================================================== GPU: nets
def _mobilenet_unet():
    inp = dnn.input_tensor()
    dw = dnn.clipped_relu(dnn.bn_con(dnn.con(16, 3, 3, 2, 2, dnn.relu(dnn.bn_con(
        dnn.con(8, 1, 1, 1, 1, inp))), groups=8, padding_y=1, padding_x=1)))
    grouped = dnn.silu(dnn.affine(dnn.con(16, 3, 3, 1, 1, dw, groups=4, dilation_y=2,
                                          dilation_x=2)))
    return dnn.relu(dnn.bn_con(dnn.cont(4, 4, 4, 2, 2, grouped, padding_y=1, padding_x=1)))


@gpu
@pytest.mark.parametrize("route_name", ["own", "cudnn", "auto"])
@pytest.mark.parametrize("batch", [1, 3])
def test_net_moves_fuses_and_reports(cu, fam, route_name, batch):
    """A net of a depthwise con (multiplier 2, stride 2), a grouped dilated con and a cont,
    with bn/affine and activations: moved to "cuda", unfused and fused (the affine folded,
    the activation in the epilogue), on each route, graph replayed; backend_info lists
    the grouped convolutions with their groups and dilation, and the cont."""
    from harness import randomize
    net = _mobilenet_unet()
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 3, 17, 18)).astype(np.float32)
    net.forward(x)
    randomize(net)
    ref = REF.forward(net, x)
    cu.set_conv_route(route_name)
    for fused in (False, True):
        if fused:
            dnn.fuse(net)
            ref_f = REF.forward(net, x)
            REF.assert_close(ref_f, ref)
        net.to("cuda")
        try:
            REF.assert_close(net.forward(x), ref)
            REF.assert_close(net.forward(x), ref)          # graph replay
            info = dnn.backend_info(net)
            convs = info["convolutions"]
            grouped = [c for c in convs if c.get("groups", 1) > 1]
            assert [c["groups"] for c in grouped] == [8, 4] or \
                sorted(c["groups"] for c in grouped) == [4, 8], convs
            assert any(c.get("dilation") == (2, 2) for c in convs), convs
            assert any(c.get("transposed") and c["path"] == "own kernel" for c in convs), convs
            if route_name == "own" or not info["cudnn"]:
                assert {c["path"] for c in convs} == {"own kernel"}, convs
            elif route_name == "cudnn":
                assert all(c["path"] != "own kernel" for c in grouped), convs
                silu = [c for c in grouped if c["act"] == "silu"]
                assert all(c["path"].endswith(" + own activation kernel") for c in silu), convs
            str(info)
        finally:
            net.to("cpu")


# ================================================================== CPU: the kernel sources
def _source():
    spec = importlib.util.spec_from_file_location(
        "minidnn_cuda_source_cf", ROOT / "minidnn" / "backends" / "cuda" / "source.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_conv_family_kernels_parse():
    """Every kernel of conv_family.cu parses with source.py's signature parser, with the
    (x, w, b, y) head every launch of conv_family.py passes and (act, act_p) as (int, float)."""
    src = _source()
    assert "conv_family" in src.FAMILIES
    text = src.assemble("conv_family")
    assert '#include "' not in text
    assert text.count("#define MINIDNN_GEMM_TILE_CUH") == 1
    assert text.count("#define MINIDNN_ACTIVATIONS_H") == 1
    sigs = src.signatures("conv_family")
    assert set(sigs) == ALL_KERNELS
    for s in sigs.values():
        assert s.names[:4] == ("x", "w", "b", "y") and s.format[:4] == "PPPP", s.describe()
        i = s.names.index("act")
        assert s.names[i + 1] == "act_p" and s.format[i:i + 2] == "if", s.describe()
    assert sigs["dw_direct"].format == "PPPPq" + "i" * 15 + "if"
    assert sigs["dw_tile"].format == "PPPP" + "i" * 19 + "if"
    for k in GCONV_KERNELS:
        assert sigs[k] == sigs["gconv_64x64"]._replace(kernel=k)
    assert sigs["gconv_64x64"].names[4] == "tab" and sigs["gconv_64x64"].format == \
        "PPPPP" + "i" * 14 + "ifi"
    assert sigs["tconv_f1"] == sigs["tconv_f4"]._replace(kernel="tconv_f1")
    assert sigs["tconv_f4"].format == "PPPPq" + "i" * 12 + "if"
    # every Kernel("conv_family", name, ...) the host side builds is one of them
    code = HOST_FILE.read_text()
    launched = set(re.findall(r'Kernel\("conv_family", "(\w+)"', code))
    launched |= set(re.findall(r'"((?:gconv|tconv)_\w+)": ', code))
    assert launched == ALL_KERNELS, launched


def test_blocking_constants_match_the_kernels():
    """conv_family.py's DW_TH, DW_TW, GCONV_CFGS and TCONV_FT are the kernels' own."""
    text = KERNEL_FILE.read_text()
    host = _host_module()
    assert int(re.search(r"#define DW_TH (\d+)", text).group(1)) == host.DW_TH
    assert int(re.search(r"#define DW_TW (\d+)", text).group(1)) == host.DW_TW
    assert host.DW_TH * host.DW_TW == 256                # one output per thread of 256
    for name, (BM, BN) in host.GCONV_CFGS.items():
        m = re.search(rf"void __launch_bounds__\(256\) {name}\(GCONV_ARGS\)\s*\{{\s*"
                      rf"gconv_igemm<(\d+), (\d+), (\d+), (\d+), (\d+)>", text)
        assert m, name
        bm, bn, bk, tm, tn = map(int, m.groups())
        assert (bm, bn) == (BM, BN) and bk == 16 and (bm // tm) * (bn // tn) == 256, name
    for name, ft in host.TCONV_FT.items():
        assert re.search(rf"{name}\(TCONV_ARGS\)\s*\{{\s*tconv_body<{ft}>", text), name


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_conv_family_compiles_with_nvcc():
    """What PyCUDA compiles (same text, options, include path), for sm_90 (or
    MINIDNN_TEST_ARCH); no kernel spills."""
    arch = os.environ.get("MINIDNN_TEST_ARCH", "sm_90")
    r = subprocess.run([sys.executable, str(ROOT / "minidnn" / "backends" / "cuda" / "source.py"),
                        "--nvcc", "--arch", arch, "conv_family"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nvcc ok" in r.stdout
    spills = [ln for ln in r.stdout.splitlines() if "spill" in ln and not ln.strip().startswith(
        "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")]
    assert not spills, spills


# ================================================================== CPU: the host side's plans
class _FakeArray:
    """What conv_family.py reads of a GPUArray: shape, dtype, flags, size, nbytes, gpudata."""
    _next = [1 << 20]

    def __init__(self, shape, offset=0, data=None):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(np.float32) if data is None else data.dtype
        self.flags = types.SimpleNamespace(c_contiguous=True)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize
        self.gpudata = _FakeArray._next[0] + 4 * offset
        _FakeArray._next[0] += (self.nbytes + 4 * offset + 511) // 256 * 256
        self.data = data


class _FakeKernel:
    """Kernel's stand-in: checks each launch against the kernel's C signature (count and
    types) and records (name, grid, block, shared, args)."""
    launches = []

    def __init__(self, family, name, grid, block, shared=0):
        self.sig = _source().signature(family, name)
        self.name = name
        self.grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        self.shared = shared
        assert 1 <= self.grid[0] < 2**31 and 1 <= self.grid[1] <= 65535 and \
            1 <= self.grid[2] <= 65535, (name, self.grid)
        assert self.block == (256, 1, 1), (name, self.block)
        assert 0 <= shared <= 48 * 1024, (name, shared)

    def __call__(self, *args):
        assert len(args) == len(self.sig.format), (self.sig.describe(), args)
        for a, c, n in zip(args, self.sig.format, self.sig.names):
            if c in "PiqI":
                assert isinstance(a, (int, np.integer)) and not isinstance(a, bool), (n, a)
                if c == "i":
                    assert -2**31 <= a < 2**31, (n, a)
            elif c == "f":
                assert isinstance(a, (float, int)), (n, a)
        _FakeKernel.launches.append((self.name, self.grid, self.block, self.shared,
                                     dict(zip(self.sig.names, args))))


def _host_module(autotune_on=False, timings=None):
    """conv_family.py loaded into a stand-in package (fake kernels, memory, autotune and
    ops; the real routing.py with the route "own"): no PyCUDA, no GPU."""
    pkg = types.ModuleType("fakecuda")
    pkg.__path__ = []
    kernels = types.ModuleType("fakecuda.kernels")
    kernels.Kernel = _FakeKernel
    kernels.plans = {}
    kernels.forget = lambda kind: [kernels.plans.pop(k) for k in list(kernels.plans)
                                   if k[0] == kind]
    kernels.blocks = lambda n, per=256: max(1, (n + per - 1) // per)

    def act_args(act, what):
        if act is None or act is False:
            return 0, 0.0
        if act is True:
            return 1, 0.0
        return int(act[0]), float(act[1])
    kernels.act_args = act_args
    memory = types.ModuleType("fakecuda.memory")
    memory.asarray = lambda a: _FakeArray(np.asarray(a).shape, data=np.asarray(a))
    memory.ptr = lambda a: 0 if a is None else a.gpudata
    autotune = types.ModuleType("fakecuda.autotune")
    autotune.AUTOTUNE = autotune_on
    autotune.time_call = lambda fn: (fn(), timings.pop(0) if timings else 1.0)[1]
    opsmod = types.ModuleType("fakecuda.ops")
    opsmod.activation = lambda x, y, act: None
    mods = {"fakecuda": pkg, "fakecuda.kernels": kernels, "fakecuda.memory": memory,
            "fakecuda.autotune": autotune, "fakecuda.ops": opsmod}
    saved = {k: sys.modules.get(k) for k in list(mods) + ["fakecuda.routing",
                                                          "fakecuda.conv_family"]}
    sys.modules.update(mods)
    try:
        for name in ("routing", "conv_family"):
            spec = importlib.util.spec_from_file_location(
                f"fakecuda.{name}", ROOT / "minidnn" / "backends" / "cuda" / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[f"fakecuda.{name}"] = mod
            spec.loader.exec_module(mod)
            setattr(pkg, name, mod)
        pkg.routing._mode = "own"
        return pkg.conv_family
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _plan_grouped(host, case, kernel, y_offset=0):
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    host.force_kernel = kernel
    _FakeKernel.launches.clear()
    y = _FakeArray(_grouped_out(case), y_offset)
    host.conv2d_grouped(_FakeArray((N, K, R, C)), _FakeArray((F, K // G, nr, nc)),
                        _FakeArray((F,)), y, sy, sx, py, px, dy, dx, G, ops.Act(9, 0.0))
    (launch,) = _FakeKernel.launches
    return launch


@pytest.mark.parametrize("kernel", DW_KERNELS)
@pytest.mark.parametrize("case", DW_CASES + [(2, 40000, 4, 4, 40000, 3, 3, 1, 1, 1, 1, 1, 1,
                                              40000)], ids=lambda c: "-".join(map(str, c)))
def test_depthwise_plans_cover_the_output(kernel, case):
    host = _host_module()
    name, grid, block, shared, a = _plan_grouped(host, case, kernel)
    N, F, Ro, Co = _grouped_out(case)
    K, nr, nc = case[1], case[5], case[6]
    assert name == kernel and a["act"] == 9 and a["m"] == F // K
    assert (a["K"], a["R"], a["C"], a["F"], a["Ro"], a["Co"], a["nr"], a["nc"]) == \
        (K, case[2], case[3], F, Ro, Co, nr, nc)
    assert (a["sy"], a["sx"], a["py"], a["px"], a["dy"], a["dx"]) == case[7:13]
    if kernel == "dw_direct":
        assert a["total"] == N * F * Ro * Co        # a grid-stride loop covers any grid
    else:
        assert a["tiles_x"] * host.DW_TW >= Co > (a["tiles_x"] - 1) * host.DW_TW
        ty = a["tiles_per_plane"] // a["tiles_x"]
        assert ty * host.DW_TH >= Ro > (ty - 1) * host.DW_TH
        assert grid[0] == N * F * a["tiles_per_plane"]
        assert a["sh_h"] == (host.DW_TH - 1) * a["sy"] + (nr - 1) * a["dy"] + 1
        assert a["sh_w"] == (host.DW_TW - 1) * a["sx"] + (nc - 1) * a["dx"] + 1
        assert shared == 4 * (a["sh_h"] * a["sh_w"] + nr * nc)


@pytest.mark.parametrize("kernel", GCONV_KERNELS)
@pytest.mark.parametrize("case", GROUPED_CASES + [(1, 4, 2100, 2100, 2, 1, 1, 1, 1, 0, 0, 1, 1,
                                                   2)], ids=lambda c: "-".join(map(str, c)))
def test_grouped_plans_cover_the_output(kernel, case):
    host = _host_module()
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    for y_offset in (0, 1):
        name, grid, block, shared, a = _plan_grouped(host, case, kernel, y_offset)
        _, _, Ro, Co = _grouped_out(case)
        BM, BN = host.GCONV_CFGS[kernel]
        Fg, P = F // G, Ro * Co
        assert name == kernel and grid[2] == G
        assert grid[0] * BN >= N * P > (grid[0] - 1) * BN
        assert grid[1] * BM >= Fg > (grid[1] - 1) * BM
        assert (a["Fg"], a["F"], a["Kd"], a["P"], a["Ncols"]) == (Fg, F, (K // G) * nr * nc, P,
                                                                   N * P)
        assert (a["KRC"], a["KgRC"], a["R"], a["C"], a["Co"]) == (K * R * C, (K // G) * R * C,
                                                                   R, C, Co)
        assert a["vec_store"] == int(P % 4 == 0 and y_offset == 0)
        tab = host.force_kernel and _tab_of(host, case, kernel)
        # the index table: tap (k, i, j) -> offset and (row << 16 | column), dilated
        kk, ii, jj = np.meshgrid(np.arange(K // G), np.arange(nr), np.arange(nc), indexing="ij")
        np.testing.assert_array_equal(tab[:, 0], (kk * R * C + ii * dy * C + jj * dx).ravel())
        np.testing.assert_array_equal(tab[:, 1], ((ii * dy) << 16 | (jj * dx)).ravel())


def _tab_of(host, case, kernel):
    plan = next(p for p in host.plans.values() if getattr(p, "name", None) == kernel)
    return plan.keep.data


@pytest.mark.parametrize("kernel", TCONV_KERNELS)
@pytest.mark.parametrize("case", TRANSPOSE_CASES + [(1, 1, 2050, 2048, 1, 2, 2, 2, 2, 0, 0)],
                         ids=lambda c: "-".join(map(str, c)))
def test_transpose_plans_cover_the_output(kernel, case):
    host = _host_module()
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    if kernel == "tconv_f4" and F < 2:
        pytest.skip("tconv_f4 is not offered for F = 1")
    host.force_kernel = kernel
    _FakeKernel.launches.clear()
    ys = _transpose_out(case)
    host.conv2d_transpose(_FakeArray((N, K, R, C)), _FakeArray((K, F, nr, nc)), None,
                          _FakeArray(ys), sy, sx, py, px, True)
    ((name, grid, block, shared, a),) = _FakeKernel.launches
    ft = host.TCONV_FT[kernel]
    npix = N * ys[2] * ys[3]
    assert name == kernel and a["npix"] == npix and a["act"] == 1 and a["b"] == 0
    assert grid[0] * 256 >= npix > (grid[0] - 1) * 256
    assert grid[1] * ft >= F > (grid[1] - 1) * ft
    assert (a["Ro"], a["Co"], a["F"], a["K"]) == (ys[2], ys[3], F, K)


def test_dw_tile_is_not_offered_beyond_its_shared_memory():
    host = _host_module()
    assert _plan_grouped(host, BIG_PATCH, "dw_direct")[0] == "dw_direct"
    with pytest.raises(ValueError, match="cannot run this shape"):
        _plan_grouped(host, BIG_PATCH, "dw_tile")
    host.force_kernel = None
    _FakeKernel.launches.clear()
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = BIG_PATCH
    host.conv2d_grouped(_FakeArray((N, K, R, C)), _FakeArray((F, 1, nr, nc)), None,
                        _FakeArray(_grouped_out(BIG_PATCH)), sy, sx, py, px, dy, dx, G, True)
    assert [ln[0] for ln in _FakeKernel.launches] == ["dw_direct"]


def test_own_candidates_are_timed_when_autotuning():
    """With autotuning the depthwise shape's two kernels (and the three tiles of a grouped
    one) are each timed and the fastest kept; without it the rule picks."""
    host = _host_module(autotune_on=True, timings=[2.0, 1.0])
    case = DW_CASES[0]
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    _FakeKernel.launches.clear()
    host.conv2d_grouped(_FakeArray((N, K, R, C)), _FakeArray((F, 1, nr, nc)), None,
                        _FakeArray(_grouped_out(case)), sy, sx, py, px, dy, dx, G, True)
    assert [ln[0] for ln in _FakeKernel.launches] == ["dw_tile", "dw_direct", "dw_direct"]
    host = _host_module(autotune_on=True, timings=[3.0, 1.0, 2.0])
    case = GROUPED_CASES[6]
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    _FakeKernel.launches.clear()
    host.conv2d_grouped(_FakeArray((N, K, R, C)), _FakeArray((F, K // G, nr, nc)), None,
                        _FakeArray(_grouped_out(case)), sy, sx, py, px, dy, dx, G, True)
    assert [ln[0] for ln in _FakeKernel.launches] == list(GCONV_KERNELS) + ["gconv_32x128"]
    host = _host_module()
    _FakeKernel.launches.clear()
    case = (1, 8, 7, 7, 8, 3, 3, 1, 1, 1, 1, 1, 1, 8)            # Co 7 < DW_TILE_MIN_CO
    host.conv2d_grouped(_FakeArray((1, 8, 7, 7)), _FakeArray((8, 1, 3, 3)), None,
                        _FakeArray(_grouped_out(case)), 1, 1, 1, 1, 1, 1, 8, True)
    assert [ln[0] for ln in _FakeKernel.launches] == ["dw_direct"]


def test_route_keys_keep_grouped_apart():
    """The route of a conv2d_grouped is recorded under its dilation and group count; a
    conv2d of the same shapes has its own."""
    host = _host_module()
    routing = sys.modules.get("fakecuda.routing") or host.routing
    case = GROUPED_CASES[3]
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    host.conv2d_grouped(_FakeArray((N, K, R, C)), _FakeArray((F, K // G, nr, nc)), None,
                        _FakeArray(_grouped_out(case)), sy, sx, py, px, dy, dx, G, True)
    xs, ws = (N, K, R, C), (F, K // G, nr, nc)
    assert routing.conv_route(xs, ws, sy, sx, py, px, True, dilation=(dy, dx), groups=G) == "own"
    assert routing.conv_route(xs, ws, sy, sx, py, px, True, dilation=(dy, dx)) == "own"
    assert routing.conv_route(xs, ws, sy, sx, py, px, True) is None
    assert routing.conv_route(xs, ws, sy, sx, py, px, False, dilation=(dy, dx), groups=G) is None


# ================================================================== CPU: cuDNN's grouped plans
from test_cudnn_policy import FakeCudnn, _Arr, fake  # noqa: E402,F401  (fake: a fixture)


class _RecordingCudnn(FakeCudnn):
    """FakeCudnn that also keeps the arguments of the descriptor calls."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.args = {}

    def __getattr__(self, name):
        f = super().__getattr__(name)

        def g(*args):
            if name in ("cudnnSetConvolution2dDescriptor", "cudnnSetConvolutionGroupCount"):
                self.args[name] = args[1:]
            return f(*args)
        return g


def test_cudnn_grouped_plan_sets_groups_and_dilation(fake, monkeypatch):
    from minidnn.backends import cudnn
    from minidnn.backends.cudnn import plans as cudnn_plans
    v = 91900
    fake(v, lambda algo, act: 0)
    rec = _RecordingCudnn(v, lambda algo, act: 0)
    from minidnn.backends.cudnn import library as cudnn_library
    monkeypatch.setitem(cudnn_library._state, "lib", rec)
    xs, ws, ys = (2, 8, 11, 11), (16, 2, 3, 3), (2, 16, 6, 6)   # stride 2, pad 3, dilation 3
    rec.out_dims = ys
    cudnn.conv2d_grouped(_Arr(xs, 1), _Arr(ws, 2), _Arr((16,), 3), _Arr(ys, 4), 2, 2, 3, 3, 3, 3,
                         4, True)
    assert rec.args["cudnnSetConvolution2dDescriptor"][:6] == (3, 3, 2, 2, 3, 3)
    assert rec.args["cudnnSetConvolutionGroupCount"] == (4,)
    assert "cudnnConvolutionBiasActivationForward" in rec.calls
    p = cudnn.conv_path(xs, ws, 2, 2, 3, 3, True, plan=False, dilation=(3, 3), groups=4)
    assert p["calls"] == 1 and p["path"] == cudnn.FUSED
    assert cudnn.conv_path(xs, ws, 2, 2, 3, 3, True, plan=False) is None    # not a plain conv2d
    # a plain conv2d keeps its keys and never sets a group count
    rec.args.clear()
    rec.out_dims = (2, 4, 11, 11)
    cudnn.conv2d(_Arr(xs, 1), _Arr((4, 8, 3, 3), 5), None, _Arr((2, 4, 11, 11), 6), 1, 1, 1, 1,
                 True)
    assert "cudnnSetConvolutionGroupCount" not in rec.args
    assert rec.args["cudnnSetConvolution2dDescriptor"][:6] == (1, 1, 1, 1, 1, 1)
    assert set(len(k) for k in cudnn_plans._plans) == {5, 7}
    with pytest.raises(ValueError, match="groups"):
        cudnn.conv2d_grouped(_Arr(xs, 1), _Arr((16, 3, 3, 3), 2), None, _Arr(ys, 4),
                             2, 2, 3, 3, 3, 3, 4, True)


# ================================================================== CPU: the references
@pytest.mark.parametrize("case", DW_CASES[:12], ids=_ids(DW_CASES[:12]))
def test_dw_ref_is_the_reference(case):
    N, K, R, C, F, nr, nc, sy, sx, py, px, dy, dx, G = case
    rng = np.random.default_rng(1)
    x, w, b = _rand(rng, N, K, R, C), _rand(rng, F, 1, nr, nc), _rand(rng, F)
    np.testing.assert_allclose(_dw_ref(x, w, b, sy, sx, py, px, dy, dx, G),
                               REF.conv2d_grouped(x, w, b, sy, sx, py, px, dy, dx, G),
                               rtol=1e-12, atol=1e-12)


# ================================================================== CPU: backend_info
def test_backend_info_lists_grouped_and_transposed_convolutions():
    net = _mobilenet_unet()
    net.forward(np.zeros((1, 3, 17, 18), np.float32))
    convs = dnn.backend_info(net)["convolutions"]
    assert [c.get("groups", 1) for c in convs] == [1, 8, 4, 1], convs
    assert convs[2]["dilation"] == (2, 2) and convs[3].get("transposed") is True
    assert {c["path"] for c in convs} == {"CPU kernel"}
    text = str(dnn.backend_info(net))
    assert "groups 8" in text and "dilation (2, 2)" in text and "cont" in text

"""The CUDA backend's tensor and routing ops (minidnn/backends/cuda/tensor_ops.py, kernels in
kernels/cuda/tensor.cu): mul_scalar, mul (zero padded), add of operands of other shapes
(zero padded, with the act epilogue), scale_channels, copy_range, l2normalize, reorg,
resize_bilinear, softmax of long rows (softmax_all), and concat's zero copy on the GPU.

The tests marked gpu run with ``pytest --gpu``: each op against a float64 NumPy reference
and the CPU backend, over odd sizes, batch 1 and > 1, in place where the contract allows
it, zero-padded shapes, unaligned views (the scalar paths), grids capped small (so every
grid-stride loop goes round, cheaply) and a few really large tensors. Outputs are poisoned
with NaN before each call, so an unwritten element fails.

The unmarked tests run anywhere (CI has no GPU): every kernel of tensor.cu parses (the
signature parser of source.py, loaded by path: no PyCUDA), compiles when nvcc is on PATH,
and every forward op of every layer class is in the CUDA backend's ``__all__`` (read from
its source), or ops.OPTIONAL.
"""
import ast
import importlib
import importlib.util
import pathlib
import re
import shutil
import zlib

import numpy as np
import pytest

import minidnn as dnn
from minidnn import ops

gpu = pytest.mark.gpu
ROOT = pathlib.Path(__file__).resolve().parents[1]




# ============================================================================ CPU-only
def _source():
    spec = importlib.util.spec_from_file_location(
        "minidnn_cuda_source_t", ROOT / "minidnn" / "backends" / "cuda" / "source.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_all():
    """The names of the CUDA backend's __all__, read from its source (no PyCUDA needed)."""
    tree = ast.parse((ROOT / "minidnn" / "backends" / "cuda" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("backends/cuda/__init__.py has no __all__")


def test_every_tensor_kernel_parses():
    src = _source()
    assert "tensor" in src.FAMILIES
    text = (ROOT / "kernels" / "cuda" / "tensor.cu").read_text()
    declared = set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', text))
    sigs = src.signatures("tensor")
    assert set(sigs) == declared and len(declared) >= 17
    for sig in sigs.values():
        assert len(sig.format) == len(sig.names) > 0, sig
    # every Kernel("tensor", ...) of the backend names one of them
    code = "".join(p.read_text() for p in (ROOT / "minidnn" / "backends" / "cuda").glob("*.py"))
    launched = set(re.findall(r'Kernel\("tensor", "(\w+)"', code))
    assert launched == declared, (launched ^ declared)
    # the formats the Python side packs (tensor_ops.py's comments give the order)
    assert sigs["mul_scalar_f"].format == "PPqf"
    assert sigs["mul_padded"].format == "PPPq" + "i" * 11
    assert sigs["add_padded"].format == "PPPq" + "i" * 11 + "if"
    assert sigs["add_padded"].names[-2:] == ("act", "act_p")
    assert sigs["copy_range_f"].format == "PPiqqq"
    assert sigs["copy_range_overlap"].format == "PPq"
    assert sigs["l2normalize_block"].format == "PPiqd"
    assert sigs["l2_partial"].format == "PPiqi"
    assert sigs["l2_scale"].format == "PPPiqid"
    assert sigs["reorg_f"].format == "PPq" + "i" * 8
    assert sigs["resize_bilinear_f"].format == "PPqiiiidd"
    assert sigs["softmax_rows_block"].format == "PPiq"
    assert sigs["scale_channels_v4"].format == "PPPqq"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_tensor_kernels_compile_with_nvcc():
    """What PyCUDA would compile (same text, options, include path) for sm_90."""
    assert _source()._main(["--nvcc", "--arch", "sm_90", "tensor"]) == 0


def test_every_forward_op_is_on_cuda():
    """Every op a registered layer class may emit is in the CUDA backend's __all__, or
    OPTIONAL (a backend may lack it)."""
    have = _cuda_all()
    missing = {}
    for cls in dnn.core.layer_classes():
        for op in cls.forward_ops:
            if op not in have and op not in ops.OPTIONAL:
                missing.setdefault(op, []).append(cls.__name__)
    assert not missing, f"forward ops without a CUDA kernel: {missing}"


# ============================================================================ GPU
@pytest.fixture(scope="module")
def cu():
    return importlib.import_module("minidnn.backends.cuda")


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def small_grids(cu):
    """Caps every tensor_ops grid at 2 blocks (x and y), so the grid-stride loops of every
    kernel go round several times on small tensors; the plans are rebuilt."""
    from minidnn.backends.cuda import kernels, tensor_ops
    saved = tensor_ops.GRID_CAP, tensor_ops.GRID_Y_CAP
    kernels.plans.clear()
    tensor_ops.GRID_CAP = tensor_ops.GRID_Y_CAP = 2
    yield
    tensor_ops.GRID_CAP, tensor_ops.GRID_Y_CAP = saved
    kernels.plans.clear()


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _poisoned(cu, shape):
    return cu.asarray(np.full(shape, np.nan, np.float32))


def _offset_array(cu, a, offset):
    """A GPUArray holding a, `offset` floats into a larger buffer (offset 1: not 16-byte
    aligned, so the float4 paths are off)."""
    if offset == 0:
        return cu.asarray(a)
    buf = cu.asarray(np.concatenate([np.zeros(offset, np.float32), a.ravel()]))
    return buf[offset:].reshape(a.shape)


def assert_close(got, ref, rtol=1e-5, atol=1e-6):
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all(), "NaN/inf in the output (an unwritten element?)"
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=rtol,
                               atol=atol * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0))


def _cpu():
    from minidnn.backends import cpu
    return cpu


# ---- references (float64)
def mul_ref(a, b, yshape):
    y = np.zeros(yshape)
    m = tuple(min(p, q, r) for p, q, r in zip(a.shape, b.shape, yshape))
    sl = tuple(slice(0, k) for k in m)
    y[sl] = a[sl].astype(np.float64) * b[sl]
    return y


def add_ref(a, b, yshape):
    y = np.zeros(yshape)
    for t in (a, b):
        sl = tuple(slice(0, min(p, q)) for p, q in zip(t.shape, yshape))
        y[sl] += t[sl]
    return y


def reorg_ref(x, rs, cs):
    N, K, R, C = x.shape
    x6 = x.reshape(N, K, R // rs, rs, C // cs, cs)            # n, k, r, dr, c, dc
    return x6.transpose(0, 3, 5, 1, 2, 4).reshape(N, rs * cs * K, R // rs, C // cs)


def _bl_tables(n_in, n_out):
    scale = (n_in - 1) / max(n_out - 1, 1)
    p = np.arange(n_out) * scale
    lo = np.clip(np.floor(p).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, p - lo


def resize_ref(x, Ro, Co):
    x = x.astype(np.float64)
    top, bot, ty = _bl_tables(x.shape[2], Ro)
    cl, cr, cf = _bl_tables(x.shape[3], Co)
    ht = x[:, :, top][:, :, :, cl] + cf * (x[:, :, top][:, :, :, cr] - x[:, :, top][:, :, :, cl])
    hb = x[:, :, bot][:, :, :, cl] + cf * (x[:, :, bot][:, :, :, cr] - x[:, :, bot][:, :, :, cl])
    return ht + ty[:, None] * (hb - ht)


def l2_ref(x, eps):
    x64 = x.astype(np.float64)
    s = (x64.reshape(x.shape[0], -1) ** 2).sum(axis=1)
    return x64 / np.sqrt(eps + s).reshape((-1,) + (1,) * (x.ndim - 1))


# ---------------------------------------------------------------- mul_scalar
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 3, 4, 4), (1, 7, 1, 1), (4, 6), (1001,)]


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
def test_mul_scalar(cu, rng, shape, inplace, offset):
    x = _rand(rng, *shape)
    xg = _offset_array(cu, x, offset)
    y = xg if inplace else _poisoned(cu, shape)
    cu.mul_scalar(xg, y, -0.7)
    got = cu.to_numpy(y)
    assert_close(got, x.astype(np.float64) * -0.7)
    want = np.empty_like(x)
    ops.mul_scalar(x, want, -0.7)
    np.testing.assert_array_equal(got, want)                  # one float product: exact


# ---------------------------------------------------------------- mul
MUL_CASES = [
    # a, b, y
    ((2, 3, 4, 5), (2, 3, 4, 5), (2, 3, 4, 5)),
    ((1, 4, 4, 4), (1, 4, 4, 4), (1, 4, 4, 4)),                # float4 path
    ((2, 3, 5, 6), (2, 3, 2, 3), (2, 3, 5, 6)),                # mult_prev after a pool
    ((2, 5, 3, 3), (2, 3, 3, 3), (2, 5, 3, 3)),                # fewer channels
    ((3, 2, 4, 5), (1, 2, 4, 5), (3, 2, 4, 5)),                # fewer samples
    ((2, 3, 4, 5), (2, 4, 3, 6), (2, 4, 4, 6)),                # each larger somewhere
    ((2, 3, 4, 5), (2, 4, 3, 6), (1, 2, 2, 3)),                # y smaller than both
    ((1, 1, 1, 7), (1, 1, 1, 3), (1, 1, 1, 9)),
]


@gpu
@pytest.mark.parametrize("sa, sb, sy", MUL_CASES)
def test_mul(cu, rng, sa, sb, sy):
    a, b = _rand(rng, *sa), _rand(rng, *sb)
    y = _poisoned(cu, sy)
    cu.mul(cu.asarray(a), cu.asarray(b), y)
    got = cu.to_numpy(y)
    assert_close(got, mul_ref(a, b, sy))
    want = np.full(sy, np.nan, np.float32)
    ops.mul(a, b, want)
    np.testing.assert_array_equal(got, want)


@gpu
@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 2, 2, 2)])
def test_mul_in_place(cu, rng, which, shape):
    a, b = _rand(rng, *shape), _rand(rng, *shape)
    ag, bg = cu.asarray(a), cu.asarray(b)
    y = ag if which == "a" else bg
    cu.mul(ag, bg, y)
    assert_close(cu.to_numpy(y), a.astype(np.float64) * b)


@gpu
def test_mul_padded_refuses_an_output_sharing_memory(cu, rng):
    a = cu.asarray(_rand(rng, 2, 3, 4, 5))
    b = cu.asarray(_rand(rng, 2, 3, 2, 2))
    with pytest.raises(ValueError, match="share memory"):
        cu.mul(a, b, a)


# ---------------------------------------------------------------- add, zero padded
ADD_CASES = [
    ((2, 5, 7, 6), (2, 3, 7, 6), (2, 5, 7, 6)),                # the face ResNet's shortcut
    ((2, 3, 4, 4), (2, 5, 8, 8), (2, 5, 8, 8)),
    ((2, 3, 8, 8), (2, 5, 4, 4), (2, 5, 8, 8)),                # "both" as dlib's ResNet
    ((1, 3, 5, 5), (3, 3, 5, 5), (3, 3, 5, 5)),
    ((2, 3, 4, 5), (2, 4, 3, 6), (1, 2, 2, 3)),                # y smaller than both
]
ACTS = [ops.Act(0), ops.Act(1), ops.Act(2, 0.1), ops.Act(4), ops.Act(7), ops.Act(10, 1.5)]


@gpu
@pytest.mark.parametrize("sa, sb, sy", ADD_CASES)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_add_zero_padded(cu, rng, sa, sb, sy, act):
    a, b = _rand(rng, *sa, scale=2.0), _rand(rng, *sb, scale=2.0)
    y = _poisoned(cu, sy)
    cu.add(cu.asarray(a), cu.asarray(b), y, act)
    got = cu.to_numpy(y)
    s = add_ref(a, b, sy).astype(np.float32)     # the padded sum (exact in float32)
    want = np.empty_like(s)
    ops.activation(s, want, act)                  # the CPU's formula of the same code
    assert_close(got, want)


@gpu
def test_add_same_shapes_still_flat(cu, rng):
    a, b = _rand(rng, 3, 4, 5, 6), _rand(rng, 3, 4, 5, 6)
    ag = cu.asarray(a)
    cu.add(ag, cu.asarray(b), ag, ops.RELU)                   # in place
    assert_close(cu.to_numpy(ag), np.maximum(a.astype(np.float64) + b, 0))


@gpu
def test_add_padded_refuses_an_output_sharing_memory(cu, rng):
    a = cu.asarray(_rand(rng, 2, 5, 4, 4))
    b = cu.asarray(_rand(rng, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="share memory"):
        cu.add(a, b, a, ops.IDENTITY)


# ---------------------------------------------------------------- scale_channels
@gpu
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 4, 4), (3, 2, 1, 1), (1, 1, 9, 3)])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
def test_scale_channels(cu, rng, shape, inplace, offset):
    x, s = _rand(rng, *shape), _rand(rng, shape[0], shape[1], 1, 1)
    xg = _offset_array(cu, x, offset)
    y = xg if inplace else _poisoned(cu, shape)
    cu.scale_channels(xg, cu.asarray(s), y)
    got = cu.to_numpy(y)
    assert_close(got, x.astype(np.float64) * s)
    want = np.empty_like(x)
    ops.scale_channels(x, s, want)
    np.testing.assert_array_equal(got, want)


@gpu
def test_scale_channels_checks_the_scales(cu, rng):
    x = cu.asarray(_rand(rng, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="s must have shape"):
        cu.scale_channels(x, cu.asarray(_rand(rng, 2, 3, 2, 1)), cu.empty((2, 3, 4, 4)))


# ---------------------------------------------------------------- copy_range
COPY_CASES = [
    # x shape, y shape, x_offset, y_offset, count
    ((1, 3, 4, 5), (1, 7, 4, 5), 0, 40, 60),
    ((3, 3, 4, 5), (3, 7, 4, 5), 0, 20, 60),                  # concat at batch 3
    ((3, 2, 4, 4), (3, 6, 4, 4), 0, 16, 32),                  # float4 path
    ((2, 6, 5, 5), (2, 2, 3, 4), 7, 1, 23),                   # extract
    ((4, 5, 3, 3), (4, 5, 3, 3), 0, 0, 45),                   # whole samples
    ((5, 9), (5, 4), 3, 0, 4),
    ((2, 3, 1, 1), (2, 3, 1, 1), 1, 0, 0),                    # nothing
]


@gpu
@pytest.mark.parametrize("sx, sy, xo, yo, cnt", COPY_CASES)
def test_copy_range(cu, rng, sx, sy, xo, yo, cnt):
    x, y0 = _rand(rng, *sx), _rand(rng, *sy)
    y = cu.asarray(y0)
    cu.copy_range(cu.asarray(x), y, xo, yo, cnt)
    want = y0.copy()
    ops.copy_range(x, want, xo, yo, cnt)                      # the rest of y stays
    np.testing.assert_array_equal(cu.to_numpy(y), want)


@gpu
@pytest.mark.parametrize("xo, yo, cnt", [(0, 3, 5000), (3, 0, 5000), (10, 11, 1), (0, 0, 7),
                                         (5, 2000, 1500), (1024, 0, 3000)])
def test_copy_range_within_one_sample_is_a_memmove(cu, rng, xo, yo, cnt):
    """One sample, x and y the same buffer, ranges overlapping in either direction."""
    a = _rand(rng, 1, 6000)
    g = cu.asarray(a)
    cu.copy_range(g, g, xo, yo, cnt)
    want = a.copy()
    ops.copy_range(want, want, xo, yo, cnt)                   # the CPU's memmove
    np.testing.assert_array_equal(cu.to_numpy(g), want)


@gpu
def test_copy_range_checks(cu, rng):
    x, y = cu.asarray(_rand(rng, 2, 3, 2, 2)), cu.empty((2, 5, 2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        cu.copy_range(x, y, 0, 10, 12)
    with pytest.raises(ValueError, match="same number of samples"):
        cu.copy_range(x, cu.empty((3, 5, 2, 2)), 0, 0, 4)
    with pytest.raises(ValueError, match="share memory"):
        cu.copy_range(x, x, 0, 1, 4)                          # two samples, one buffer


# ---------------------------------------------------------------- l2normalize
L2_SHAPES = [(3, 5, 1, 1), (1, 128, 1, 1), (7, 3, 5, 7), (2, 4096, 1, 1),
             (2, 3, 40, 41), (1, 3, 300, 301), (3, 1, 1, 1)]


@gpu
@pytest.mark.parametrize("shape", L2_SHAPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_l2normalize(cu, rng, shape, inplace):
    x = _rand(rng, *shape)
    xg = cu.asarray(x)
    y = xg if inplace else _poisoned(cu, shape)
    cu.l2normalize(xg, y, 1e-5)
    got = cu.to_numpy(y)
    assert_close(got, l2_ref(x, 1e-5))
    want = np.empty_like(x)
    ops.l2normalize(x, want, 1e-5)
    assert_close(got, want)


@gpu
def test_l2normalize_zero_sample_and_eps(cu):
    x = np.zeros((2, 3, 2, 2), np.float32)
    x[1] = 2.0
    y = _poisoned(cu, x.shape)
    cu.l2normalize(cu.asarray(x), y, 0.5)
    assert_close(cu.to_numpy(y), l2_ref(x, 0.5))


# ---------------------------------------------------------------- reorg
@gpu
@pytest.mark.parametrize("shape, rs, cs", [((2, 3, 4, 6), 2, 2), ((1, 3, 6, 9), 2, 3),
                                           ((3, 5, 3, 4), 3, 1), ((2, 1, 8, 8), 4, 4),
                                           ((1, 2, 5, 7), 1, 1)])
def test_reorg(cu, rng, shape, rs, cs):
    x = _rand(rng, *shape)
    N, K, R, C = shape
    y = _poisoned(cu, (N, K * rs * cs, R // rs, C // cs))
    cu.reorg(cu.asarray(x), y, rs, cs)
    got = cu.to_numpy(y)
    np.testing.assert_array_equal(got, reorg_ref(x, rs, cs))
    want = np.empty_like(got)
    ops.reorg(x, want, rs, cs)
    np.testing.assert_array_equal(got, want)


@gpu
def test_reorg_checks(cu, rng):
    x = cu.asarray(_rand(rng, 1, 2, 5, 4))
    with pytest.raises(ValueError, match="multiples"):
        cu.reorg(x, cu.empty((1, 8, 2, 2)), 2, 2)


# ---------------------------------------------------------------- resize_bilinear
RESIZE_CASES = [((2, 3, 3, 5), (6, 10)), ((1, 2, 4, 3), (4, 9)), ((2, 2, 7, 5), (3, 2)),
                ((1, 3, 4, 6), (1, 1)), ((2, 2, 1, 1), (3, 4)), ((3, 1, 17, 13), (29, 31)),
                ((1, 1, 5, 5), (5, 5))]


@gpu
@pytest.mark.parametrize("shape, out", RESIZE_CASES)
def test_resize_bilinear(cu, rng, shape, out):
    x = _rand(rng, *shape)
    ys = shape[:2] + out
    y = _poisoned(cu, ys)
    cu.resize_bilinear(cu.asarray(x), y)
    got = cu.to_numpy(y)
    assert_close(got, resize_ref(x, *out))
    want = np.empty(ys, np.float32)
    ops.resize_bilinear(x, want)
    assert_close(got, want)


# ---------------------------------------------------------------- softmax of long rows
@gpu
@pytest.mark.parametrize("N, K", [(1, 1024), (3, 5000), (2, 70001), (5, 1023)])
@pytest.mark.parametrize("inplace", [False, True])
def test_softmax_long_rows(cu, rng, N, K, inplace):
    x = _rand(rng, N, K, 1, 1, scale=3.0)
    xg = cu.asarray(x)
    y = xg if inplace else _poisoned(cu, x.shape)
    cu.softmax(xg, y)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    assert_close(cu.to_numpy(y), e / e.sum(axis=1, keepdims=True), rtol=2e-5, atol=1e-9)


@gpu
def test_softmax_all_view_on_the_gpu(cu, rng):
    """softmax_all's (N, K*R*C, 1, 1) view of a GPUArray (a reshape: a view, int gpudata)."""
    x = _rand(rng, 2, 30, 9, 11)
    xg, y = cu.asarray(x), _poisoned(cu, x.shape)
    cu.softmax(xg.reshape(2, -1, 1, 1), y.reshape(2, -1, 1, 1))
    f = x.reshape(2, -1).astype(np.float64)
    e = np.exp(f - f.max(axis=1, keepdims=True))
    assert_close(cu.to_numpy(y), (e / e.sum(axis=1, keepdims=True)).reshape(x.shape),
                 rtol=2e-5, atol=1e-9)


# ---------------------------------------------------------------- grid-stride loops
@gpu
def test_every_kernel_with_grids_capped_at_two_blocks(cu, rng, small_grids):
    """Each kernel with gridDim.x and gridDim.y capped at 2: every loop goes round."""
    x = _rand(rng, 5, 6, 7, 9)
    xg = cu.asarray(x)
    y = _poisoned(cu, x.shape)
    cu.mul_scalar(xg, y, 1.5)
    np.testing.assert_array_equal(cu.to_numpy(y), x * np.float32(1.5))
    x4 = _rand(rng, 5, 6, 8, 8)
    y4 = _poisoned(cu, x4.shape)
    cu.mul_scalar(cu.asarray(x4), y4, 1.5)
    np.testing.assert_array_equal(cu.to_numpy(y4), x4 * np.float32(1.5))
    b = _rand(rng, 5, 6, 7, 9)
    cu.mul(xg, cu.asarray(b), y)
    np.testing.assert_array_equal(cu.to_numpy(y), x * b)
    small = _rand(rng, 3, 4, 5, 6)
    yp = _poisoned(cu, x.shape)
    cu.mul(xg, cu.asarray(small), yp)
    assert_close(cu.to_numpy(yp), mul_ref(x, small, x.shape))
    cu.add(xg, cu.asarray(small), yp, ops.RELU)
    assert_close(cu.to_numpy(yp), np.maximum(add_ref(x, small, x.shape), 0))
    s = _rand(rng, 5, 6, 1, 1)
    cu.scale_channels(xg, cu.asarray(s), y)
    assert_close(cu.to_numpy(y), x.astype(np.float64) * s)
    cu.scale_channels(cu.asarray(x4), cu.asarray(s), y4)
    assert_close(cu.to_numpy(y4), x4.astype(np.float64) * s)
    big = cu.asarray(np.zeros((5, 20, 7, 9), np.float32))
    cu.copy_range(xg, big, 0, 7 * 63, 6 * 63)
    want = np.zeros((5, 20, 7, 9), np.float32)
    want[:, 7:13] = x
    np.testing.assert_array_equal(cu.to_numpy(big), want)
    big4 = cu.asarray(np.zeros((5, 20, 8, 8), np.float32))
    cu.copy_range(cu.asarray(x4), big4, 0, 4 * 64, 6 * 64)
    want4 = np.zeros((5, 20, 8, 8), np.float32)
    want4[:, 4:10] = x4
    np.testing.assert_array_equal(cu.to_numpy(big4), want4)
    one = _rand(rng, 1, 5000)
    g = cu.asarray(one)
    cu.copy_range(g, g, 0, 7, 4000)
    w = one.copy()
    w[0, 7:4007] = one[0, :4000]
    np.testing.assert_array_equal(cu.to_numpy(g), w)
    for shape in ((5, 6, 7, 9), (5, 3, 50, 41)):              # one block per sample; two passes
        v = _rand(rng, *shape)
        yv = _poisoned(cu, shape)
        cu.l2normalize(cu.asarray(v), yv, 1e-5)
        assert_close(cu.to_numpy(yv), l2_ref(v, 1e-5))
    yr = _poisoned(cu, (5, 6 * 7 * 9, 1, 1))
    cu.reorg(xg, yr, 7, 9)
    np.testing.assert_array_equal(cu.to_numpy(yr), reorg_ref(x, 7, 9))
    yb = _poisoned(cu, (5, 6, 13, 4))
    cu.resize_bilinear(xg, yb)
    assert_close(cu.to_numpy(yb), resize_ref(x, 13, 4))
    sm = _rand(rng, 5, 3000, 1, 1)
    ys = _poisoned(cu, sm.shape)
    cu.softmax(cu.asarray(sm), ys)
    e = np.exp(sm - sm.max(axis=1, keepdims=True)).astype(np.float64)
    assert_close(cu.to_numpy(ys), e / e.sum(axis=1, keepdims=True), rtol=2e-5, atol=1e-9)


@gpu
def test_large_tensors_cross_the_grid_cap(cu, rng):
    """Sizes past GRID_CAP * 256 values (and samples past 65535 in y)."""
    n = 65535 * 256 * 3 + 5
    x = _rand(rng, 1, n)
    xg = cu.asarray(x)
    y = cu.empty((1, n))
    cu.mul_scalar(xg, y, 2.0)
    np.testing.assert_array_equal(cu.to_numpy(y), x * np.float32(2.0))
    s = _rand(rng, 70000, 3, 1, 1)                            # 70000 samples: grid y loops
    xs = _rand(rng, 70000, 3, 2, 2)
    ys = cu.empty(xs.shape)
    cu.scale_channels(cu.asarray(xs), cu.asarray(s), ys)
    assert_close(cu.to_numpy(ys), xs.astype(np.float64) * s)
    big = cu.asarray(np.zeros((70000, 5, 2, 2), np.float32))
    cu.copy_range(cu.asarray(xs), big, 0, 4, 12)
    want = np.zeros((70000, 5, 2, 2), np.float32)
    want[:, 1:4] = xs
    np.testing.assert_array_equal(cu.to_numpy(big), want)
    yl = cu.empty(xs.shape)
    cu.l2normalize(cu.asarray(xs), yl, 1e-5)
    assert_close(cu.to_numpy(yl), l2_ref(xs, 1e-5))
    xl = _rand(rng, 66000, 4100, 1, 1, scale=0.5)              # two passes, 66000 samples
    gl = cu.asarray(xl)
    cu.l2normalize(gl, gl, 1e-5)
    assert_close(cu.to_numpy(gl), l2_ref(xl, 1e-5))


@gpu
def test_mul_scalar_past_2_31_elements(cu):
    """64-bit indices: 2**31 + 8 values (8 GiB), filled and checked on the GPU's side."""
    n = 2**31 + 8
    try:
        x = cu.empty((n,))
    except MemoryError:
        pytest.skip("not enough GPU memory for 2**31 floats")
    from minidnn.backends.cuda.gpu import drv
    drv.memset_d32(x.gpudata, int(np.float32(3.0).view(np.uint32)), n)   # synchronous
    cu.mul_scalar(x, x, 0.5)                                  # float4 path, n4 > 2**29
    tail = x[n - 1000:]
    head = x[:1000]
    cu.synchronize()
    assert (tail.get() == 1.5).all() and (head.get() == 1.5).all()
    odd = x[1:]                                               # unaligned: the scalar path
    cu.mul_scalar(odd, odd, 2.0)
    cu.synchronize()
    assert (x[n - 1000:].get() == 3.0).all() and x[:1].get()[0] == 1.5
    del x, odd, tail, head


# ---------------------------------------------------------------- graphs
@gpu
def test_graph_capture_of_the_tensor_ops(cu, rng):
    """Every op captured into one CUDA graph (plans built by the warm-up run), then replayed
    on new input values written into the same buffer."""
    x0 = _rand(rng, 2, 4, 6, 6)
    xg = cu.asarray(x0)
    s = cu.asarray(_rand(rng, 2, 4, 1, 1))
    a, b = cu.empty((2, 4, 6, 6)), cu.empty((2, 4, 6, 6))
    c, d = cu.empty((2, 4, 3, 3)), cu.empty((2, 16, 3, 3))
    e, f = cu.empty((2, 4, 11, 13)), cu.empty((2, 4, 6, 6))
    cat = cu.empty((2, 12, 6, 6))
    sm = cu.empty((2, 144, 1, 1))

    def steps():
        cu.mul_scalar(xg, a, 0.5)
        cu.scale_channels(a, s, b)
        cu.mul(b, xg, a)
        cu.l2normalize(a, a, 1e-5)
        cu.copy_range(a, c, 5, 0, 36)
        cu.reorg(a, d, 2, 2)
        cu.resize_bilinear(a, e)
        cu.add(c, xg, f, ops.RELU)
        cu.copy_range(a, cat, 0, 0, 144)
        cu.copy_range(f, cat, 0, 288, 144)
        cu.softmax(a.reshape(2, -1, 1, 1), sm)

    def run_cpu(x):
        cpu = _cpu()
        out = {k: np.zeros(v.shape, np.float32) for k, v in
               dict(a=a, b=b, c=c, d=d, e=e, f=f, cat=cat, sm=sm).items()}
        sh = cu.to_numpy(s)
        cpu.mul_scalar(x, out["a"], 0.5)
        cpu.scale_channels(out["a"], sh, out["b"])
        cpu.mul(out["b"], x, out["a"])
        cpu.l2normalize(out["a"], out["a"], 1e-5)
        cpu.copy_range(out["a"], out["c"], 5, 0, 36)
        cpu.reorg(out["a"], out["d"], 2, 2)
        cpu.resize_bilinear(out["a"], out["e"])
        out["f"][...] = np.maximum(add_ref(out["c"], x, x.shape), 0)
        cpu.copy_range(out["a"], out["cat"], 0, 0, 144)
        cpu.copy_range(out["f"], out["cat"], 0, 288, 144)
        cpu.softmax(out["a"].reshape(2, -1, 1, 1), out["sm"])
        return out

    cu.copy(cat, cu.asarray(np.zeros(cat.shape, np.float32)))
    g = cu.capture(steps, warmup=True)
    x1 = _rand(rng, 2, 4, 6, 6)
    cu.upload(xg, x1)
    g.launch()
    want = run_cpu(x1)
    for k, arr in dict(a=a, b=b, c=c, d=d, e=e, f=f, cat=cat, sm=sm).items():
        try:
            assert_close(cu.to_numpy(arr), want[k])
        except AssertionError as e:
            raise AssertionError(f"{k}: {e}") from None
    g.close()


# ---------------------------------------------------------------- layers on the GPU
def _step_names(net, shape):
    return [getattr(f, "__name__", "") for f, _ in net._program(shape).steps]


def _inception(s):
    return dnn.concat(dnn.tag1, dnn.tag2, dnn.tag3, dnn.tag3(dnn.con(2, 5, 5, 1, 1, dnn.skip4(
        dnn.tag2(dnn.con(3, 3, 3, 1, 1, dnn.skip4(dnn.tag1(dnn.con(1, 1, 1, 1, 1, dnn.tag4(s))))))))))


def _dense(s):
    c1 = dnn.concat(dnn.tag1, dnn.tag2, dnn.tag2(dnn.relu(dnn.con(2, 3, 3, 1, 1, dnn.tag1(
        dnn.con(3, 1, 1, 1, 1, s))))))
    return dnn.concat(dnn.tag3, dnn.tag4, dnn.tag4(dnn.con(2, 3, 3, 1, 1, dnn.tag3(c1))))


def _relu_concat(s):
    return dnn.relu(dnn.concat(dnn.tag1, dnn.tag2, dnn.tag2(dnn.con(
        2, 1, 1, 1, 1, dnn.tag1(dnn.con(3, 1, 1, 1, 1, s))))))


def _twice(s):
    return dnn.concat(dnn.tag1, dnn.tag2, dnn.tag1, dnn.tag2(
        dnn.con(2, 1, 1, 1, 1, dnn.tag1(dnn.con(3, 1, 1, 1, 1, s)))))


@gpu
@pytest.mark.parametrize("make, copies1", [(_inception, 0), (_dense, 1), (_relu_concat, 0),
                                           (_twice, 1)],
                         ids=["inception", "dense", "relu", "tag-twice"])
@pytest.mark.parametrize("graphs", [True, False])
def test_concat_producers_write_into_their_slice_on_the_gpu(make, copies1, graphs):
    """At batch 1 the producers write straight into the concatenation on the GPU too
    (core.Plan.alias with GPUArray views): no copy_range, except where a concat's output
    feeds another concat (dense: the inner one is copied, core.Plan._alias_device); at
    batch 3 the slices are not contiguous and are copied. Every node's output equals the
    CPU's."""
    dnn.set_seed(0)
    net = make(dnn.input_tensor())
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 2, 5, 6)).astype(np.float32)
        net.to("cpu")
        want = net.forward(x)
        outs = [n.get_output().copy() for n in net.chain()]
        net.to("cuda", graphs=graphs)
        got = net.forward(x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for i, (n, w) in enumerate(zip(net.chain(), outs)):
            np.testing.assert_allclose(n.get_output(), w, rtol=1e-5, atol=1e-5,
                                       err_msg=f"batch {batch} layer<{i}>")
        names = _step_names(net, x.shape)
        if batch == 1:
            assert names.count("copy_range") == copies1, names
        else:
            assert "copy_range" in names
        net.to("cpu")


@gpu
def test_add_prev_zero_padded_takes_the_relu_on_the_gpu():
    """add_prev of tensors of other shapes runs the padded add on the GPU, and a relu above
    it becomes its epilogue."""
    dnn.set_seed(1)
    net = dnn.relu(dnn.add_prev2(dnn.avg_pool(2, 2, 2, 2, dnn.skip1(dnn.tag2(dnn.con(
        5, 3, 3, 2, 2, dnn.tag1(dnn.input_tensor())))))))
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = net.forward(x)
    net.to("cuda")
    np.testing.assert_allclose(net.forward(x), want, rtol=1e-5, atol=1e-5)
    names = _step_names(net, x.shape)
    assert "add" in names and "activation" not in names, names


@gpu
def test_extract_at_batch_1_is_a_view_on_the_gpu():
    dnn.set_seed(2)
    net = dnn.relu(dnn.extract(3, 2, 2, 3, dnn.con(4, 1, 1, 1, 1, dnn.input_tensor())))
    x = np.random.default_rng(3).standard_normal((1, 2, 4, 5)).astype(np.float32)
    want = net.forward(x)
    net.to("cuda")
    np.testing.assert_allclose(net.forward(x), want, rtol=1e-5, atol=1e-5)
    assert "copy_range" not in _step_names(net, x.shape)
    x3 = np.random.default_rng(4).standard_normal((3, 2, 4, 5)).astype(np.float32)
    net.to("cpu")
    want3 = net.forward(x3)
    net.to("cuda")
    np.testing.assert_allclose(net.forward(x3), want3, rtol=1e-5, atol=1e-5)
    assert "copy_range" in _step_names(net, x3.shape)


@gpu
def test_views_and_storage(cu):
    a = cu.asarray(np.arange(24, dtype=np.float32))
    v = cu.view(a, 5, (2, 3))
    assert v.shape == (2, 3) and v.flags.c_contiguous
    np.testing.assert_array_equal(cu.to_numpy(v), np.arange(5, 11).reshape(2, 3))
    w = cu.view(v.reshape(6), 2, (3,))                        # a view of a view: same root
    root, off = cu.storage(w)
    assert root is a and off == 7
    np.testing.assert_array_equal(cu.to_numpy(w), [7, 8, 9])
    with pytest.raises(ValueError, match="does not fit"):
        cu.view(a, 20, (2, 3))

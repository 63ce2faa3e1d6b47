"""The CPU kernels (minidnn.backends.cpu) against slow, obviously-correct
NumPy references written here as plain loops / einsum in float64.

Tolerance: rtol=1e-5, atol=1e-5 * max(1, |ref|.max())."""
import itertools

import numpy as np
import pytest

cpu = pytest.importorskip("minidnn.backends.cpu")

RNG = np.random.default_rng(1234)


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def assert_close(got, ref):
    ref = np.asarray(ref, dtype=np.float64)
    atol = 1e-5 * max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=1e-5, atol=atol)


@pytest.fixture(params=[None, 1, 3], ids=["threads=default", "threads=1", "threads=3"])
def threads(request):
    """Run a test with the default team, one thread, and more threads than cores."""
    old = cpu.get_num_threads()
    if request.param is not None:
        cpu.set_num_threads(request.param)
    yield request.param
    cpu.set_num_threads(old)


# ------------------------------------------------------------- references

def out_size(n, k, s, p):
    return 1 + (n + 2 * p - k) // s


def ref_conv2d(x, w, b, sy, sx, py, px, relu):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    N, K, R, C = x.shape
    F, _, nr, nc = w.shape
    Ro, Co = out_size(R, nr, sy, py), out_size(C, nc, sx, px)
    xp = np.zeros((N, K, R + 2 * py, C + 2 * px))
    xp[:, :, py:py + R, px:px + C] = x
    y = np.zeros((N, F, Ro, Co))
    for i in range(nr):
        for j in range(nc):
            patch = xp[:, :, i:i + sy * (Ro - 1) + 1:sy, j:j + sx * (Co - 1) + 1:sx]
            y += np.einsum("nkrc,fk->nfrc", patch, w[:, :, i, j])
    if b is not None:
        y += b.astype(np.float64).reshape(1, F, 1, 1)
    return np.maximum(y, 0) if relu else y


def ref_pool(x, nr, nc, sy, sx, py, px, op):
    N, K, R, C = x.shape
    Ro, Co = out_size(R, nr, sy, py), out_size(C, nc, sx, px)
    y = np.zeros((N, K, Ro, Co))
    for oy in range(Ro):
        for ox in range(Co):
            y0, x0 = oy * sy - py, ox * sx - px
            win = x[:, :, max(y0, 0):min(y0 + nr, R), max(x0, 0):min(x0 + nc, C)]
            win = win.astype(np.float64).reshape(N, K, -1)
            y[:, :, oy, ox] = win.max(axis=2) if op == "max" else win.mean(axis=2)
    return y


def ref_softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ conv2d

# (N, K, R, C, F, nr, nc, sy, sx, py, px)
CONV_CASES = [
    (1, 1, 5, 5, 1, 3, 3, 1, 1, 0, 0),
    (2, 3, 7, 9, 4, 3, 3, 1, 1, 1, 1),
    (3, 5, 11, 13, 6, 3, 2, 2, 3, 1, 0),      # non-square kernel, mixed strides
    (1, 4, 9, 8, 5, 2, 5, 3, 1, 0, 2),
    (2, 3, 17, 15, 7, 5, 5, 2, 2, 2, 2),
    (3, 8, 10, 10, 16, 1, 1, 1, 1, 0, 0),     # direct 1x1 path
    (2, 8, 11, 11, 16, 1, 1, 2, 2, 0, 0),     # 1x1 stride-2 projection
    (1, 6, 4, 4, 3, 4, 4, 1, 1, 0, 0),        # kernel == input
    (2, 2, 3, 3, 3, 5, 5, 1, 1, 1, 1),        # kernel == padded input
    (1, 3, 6, 6, 4, 3, 3, 3, 3, 2, 2),        # big pad
    (1, 3, 80, 80, 8, 3, 3, 1, 1, 1, 1),      # several pixel chunks
    (3, 16, 19, 23, 24, 3, 3, 1, 1, 1, 1),    # odd batch: work split inside samples
    (1, 64, 5, 5, 96, 3, 3, 1, 1, 1, 1),      # batch 1, few pixels: filter split
    (5, 32, 12, 12, 33, 3, 3, 2, 2, 1, 1),
    (4, 3, 33, 31, 8, 7, 7, 2, 2, 3, 3),      # ResNet stem shape
]


@pytest.fixture(params=["auto", "blas", "implicit"], ids=lambda p: "path=" + p)
def conv_path(request):
    """Run a conv test with conv2d's own choice of path and with each path
    forced: im2col + OpenBLAS sgemm ("blas"), our packed implicit GEMM
    (kernels/cpu/gemm_avx2.h, "implicit")."""
    from minidnn import _cpu_conv
    old = _cpu_conv._set_conv_path(request.param)
    yield request.param
    _cpu_conv._set_conv_path(old)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_conv2d(case, bias, relu, threads, conv_path):
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    x, w = rand(N, K, R, C), rand(F, K, nr, nc)
    b = rand(F) if bias else None
    y = np.full((N, F, out_size(R, nr, sy, py), out_size(C, nc, sx, px)), np.nan, np.float32)
    cpu.conv2d(x, w, b, y, sy, sx, py, px, relu)
    assert_close(y, ref_conv2d(x, w, b, sy, sx, py, px, relu))


def test_conv2d_repeat_reuses_workspace():
    x, w, b = rand(2, 16, 20, 20), rand(8, 16, 3, 3), rand(8)
    y1 = cpu.empty((2, 8, 20, 20))
    y2 = cpu.empty((2, 8, 20, 20))
    cpu.conv2d(x, w, b, y1, 1, 1, 1, 1, True)
    cpu.conv2d(x, w, b, y2, 1, 1, 1, 1, True)
    np.testing.assert_array_equal(y1, y2)


# Implicit-GEMM edge cases (micro-tile MR=6 filters x NR=16 pixels, K blocks
# of <= 256 rows): every remainder of F mod 6 (and the 7/8/9-row merge),
# every remainder of the N*P columns mod 16, K = KRS spanning 1-3 blocks
# with ragged ends, tiles that straddle samples (P < 16 and P not a multiple
# of 16), strides 1-3, padding, batch 1 and > 1.
# (N, K, R, C, F, nr, nc, sy, sx, py, px)
IG_CASES = (
    [(1, 2, 4, 4 + q, 1 + q % 6, 3, 3, 1, 1, 1, 1) for q in range(16)]      # every N*P mod 16, F mod 6
    + [(2, 3, 5, 3, F, 3, 3, 1, 1, 1, 1) for F in (6, 7, 8, 9, 10, 11, 12, 13, 17)]
    + [(3, 29, 6, 5, 7, 3, 3, 1, 1, 1, 1),     # KRS = 261: two K blocks, ragged
       (2, 57, 5, 4, 5, 3, 3, 2, 1, 1, 0),     # KRS = 513: three K blocks
       (2, 300, 3, 3, 13, 1, 1, 1, 1, 0, 0),   # 1x1, KRS = 300
       (7, 4, 2, 2, 6, 1, 1, 1, 1, 0, 0),      # P = 4: four samples per tile
       (5, 3, 7, 7, 8, 3, 3, 1, 1, 1, 1),      # P = 49: straddling tiles
       (3, 6, 23, 21, 9, 3, 3, 2, 2, 1, 1),    # stride 2, odd sizes
       (2, 5, 40, 37, 11, 1, 1, 2, 2, 0, 0),   # 1x1 stride 2: the sx == 2 fast path
       (2, 4, 35, 34, 10, 3, 3, 3, 3, 1, 2),   # stride 3
       (1, 3, 20, 33, 6, 3, 4, 1, 2, 2, 1),    # mixed strides, non-square kernel
       (2, 5, 9, 40, 7, 5, 5, 2, 1, 2, 2),     # stride (2, 1)
       (1, 2, 38, 38, 5, 7, 7, 2, 2, 3, 3),    # stem-like
       (1, 6, 4, 4, 3, 4, 4, 1, 1, 0, 0),      # kernel == input: one column
       (3, 1, 28, 28, 6, 5, 5, 1, 1, 0, 0)]    # LeNet conv1
    # stride 1 with Co % 8 == 0 and P % 16 == 0: the padded-rows variant
    + [(3, 5, 16, 16, 13, 3, 3, 1, 1, 1, 1),   # Co = 16: a tile is one row
       (2, 40, 8, 8, 7, 3, 3, 1, 1, 1, 1),     # Co = 8: two rows per tile; KRS = 360: two K blocks
       (2, 57, 8, 8, 5, 3, 3, 1, 1, 1, 1),     # KRS = 513: three K blocks
       (2, 3, 10, 24, 9, 3, 3, 1, 1, 1, 1),    # Co = 24: tiles cross rows at 8
       (1, 6, 12, 12, 16, 5, 5, 1, 1, 0, 0),   # LeNet conv2 (Co = 8, no pad)
       (2, 2, 12, 40, 11, 5, 3, 1, 1, 2, 1),   # non-square kernel, pads 2/1
       (3, 4, 16, 16, 1, 1, 1, 1, 1, 0, 0),    # 1x1, one filter
       (2, 3, 5, 18, 6, 2, 3, 1, 1, 0, 0),     # pad 0, even kernel, Co = 16, P = 64
       # ... and strided: the buffer rows split into sx column phases
       (2, 5, 16, 16, 7, 3, 3, 2, 2, 1, 1),    # 3x3/2, Co = 8
       (2, 6, 17, 17, 5, 3, 3, 2, 2, 1, 1),    # odd input
       (2, 3, 38, 38, 13, 7, 7, 2, 2, 3, 3),   # ResNet stem-like, Co = 16
       (2, 3, 25, 48, 6, 3, 3, 3, 3, 1, 1),    # stride 3, Co = 16
       (1, 3, 15, 16, 8, 2, 2, 2, 2, 0, 0),    # 2x2/2, no pad
       (2, 4, 9, 31, 11, 3, 3, 1, 2, 1, 1),    # stride (1, 2), Co = 16
       (1, 40, 16, 16, 7, 3, 3, 2, 2, 1, 1)]   # KRS = 360: two K blocks
)


# The narrow-tile kernel (a ragged last tile of 1-4 columns runs as dot
# products along K): every width 1..4, every F mod 6 (and the 7/8/9 merge),
# K = KRS of 1..3 K blocks with a tail that is not a multiple of 8, strides
# 1-3, padding, batch 1 and > 1, and a narrow tile whose columns lie in
# different samples (P = 1, P = 2).
# (N, K, R, C, F, nr, nc, sy, sx, py, px)
IG_NARROW_CASES = (
    [(1, 3, 3 + q, 3 + q, 1 + q % 6, 3, 3, 1, 1, 0, 0) for q in range(4, 11)]   # P = 25 .. 121: widths 9, 4, 1, 0, 1, 4, 9
    + [(1, 2, 7, 7, F, 3, 3, 1, 1, 1, 1) for F in (1, 2, 3, 5, 6, 7, 8, 9, 13)]  # P = 49: width 1
    + [(1, 5, 14, 14, 11, 3, 3, 1, 1, 1, 1),   # P = 196: width 4
       (1, 40, 7, 7, 7, 3, 3, 1, 1, 1, 1),     # KRS = 360: two K blocks, tail of 4 floats
       (1, 57, 14, 14, 8, 3, 3, 2, 2, 1, 1),   # 3x3/2 -> 7x7, KRS = 513: three K blocks
       (1, 37, 14, 14, 9, 1, 1, 2, 2, 0, 0),   # 1x1/2 -> 7x7, KRS = 37
       (1, 3, 20, 20, 6, 3, 3, 3, 3, 1, 1),    # stride 3 -> 7x7
       (2, 4, 5, 7, 5, 3, 3, 1, 1, 0, 1),      # N*P = 2*3*7 = 42 = 2*16 + 10 (not narrow) ...
       (2, 4, 6, 7, 5, 3, 3, 1, 1, 0, 1),      # ... 2*28 = 56 = 3*16 + 8; padded path
       (3, 4, 5, 5, 7, 3, 3, 1, 1, 0, 0),      # 3*9 = 27 = 16 + 11
       (2, 4, 7, 3, 7, 3, 3, 1, 1, 0, 0),      # 2*5 = 10 < 16 columns
       (9, 6, 4, 4, 5, 3, 3, 1, 1, 0, 0),      # P = 4, N*P = 36: width 4 in one sample
       (18, 6, 3, 3, 7, 3, 3, 1, 1, 0, 0),     # P = 1, N = 18: width 2, two samples
       (19, 6, 3, 4, 13, 3, 3, 1, 1, 0, 0),    # P = 2, N*P = 38: width 6 (not narrow)
       (9, 6, 3, 4, 13, 3, 3, 1, 1, 0, 0),     # P = 2, N*P = 18: width 2 in one sample
       (5, 3, 7, 7, 8, 3, 3, 1, 1, 1, 1),      # P = 49, N = 5: 245 = 15*16 + 5
       (3, 3, 7, 7, 8, 3, 3, 1, 1, 1, 1)]      # 147 = 9*16 + 3, straddling tiles before
)


@pytest.mark.parametrize("case", IG_NARROW_CASES, ids=[str(c) for c in IG_NARROW_CASES])
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True), (False, True)],
                         ids=["nobias-linear", "bias-relu", "nobias-relu"])
@pytest.mark.parametrize("nt", [1, 2, 3], ids=["threads=1", "threads=2", "threads=3"])
def test_conv2d_implicit_narrow(case, bias, relu, nt):
    from minidnn import _cpu_conv
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    x, w = rand(N, K, R, C), rand(F, K, nr, nc)
    b = rand(F) if bias else None
    y = np.full((N, F, out_size(R, nr, sy, py), out_size(C, nc, sx, px)), np.nan, np.float32)
    old, old_nt = _cpu_conv._set_conv_path("implicit"), cpu.get_num_threads()
    cpu.set_num_threads(nt)
    try:
        cpu.conv2d(x, w, b, y, sy, sx, py, px, relu)
    finally:
        _cpu_conv._set_conv_path(old)
        cpu.set_num_threads(old_nt)
    assert_close(y, ref_conv2d(x, w, b, sy, sx, py, px, relu))


@pytest.mark.parametrize("case", IG_CASES, ids=[str(c) for c in IG_CASES])
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True), (True, False)],
                         ids=["nobias-linear", "bias-relu", "bias-linear"])
@pytest.mark.parametrize("nt", [1, 2, 3], ids=["threads=1", "threads=2", "threads=3"])
@pytest.mark.parametrize("direct", [True, False], ids=["padded-rows", "packed"])
def test_conv2d_implicit_edges(case, bias, relu, nt, direct):
    from minidnn import _cpu_conv
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    x, w = rand(N, K, R, C), rand(F, K, nr, nc)
    b = rand(F) if bias else None
    y = np.full((N, F, out_size(R, nr, sy, py), out_size(C, nc, sx, px)), np.nan, np.float32)
    old, old_nt = _cpu_conv._set_conv_path("implicit"), cpu.get_num_threads()
    old_direct = _cpu_conv._set_direct(direct)
    cpu.set_num_threads(nt)
    try:
        cpu.conv2d(x, w, b, y, sy, sx, py, px, relu)
    finally:
        _cpu_conv._set_conv_path(old)
        _cpu_conv._set_direct(old_direct)
        cpu.set_num_threads(old_nt)
    assert_close(y, ref_conv2d(x, w, b, sy, sx, py, px, relu))



# ------------------------------------------------------- conv2d_residual
#
# The residual z rides every epilogue conv2d has: the implicit path's
# micro-kernel store (packed and padded-rows B), its scratch-tile store
# (tiles straddling samples, ragged ends), the narrow-tile dot products, the
# im2col + OpenBLAS per-block epilogue and its sample-group scatter (incl. the
# direct 1x1 mode), over the same shape matrices as conv2d.

def ref_conv2d_residual(x, w, b, z, sy, sx, py, px, relu):
    y = ref_conv2d(x, w, b, sy, sx, py, px, False) + z.astype(np.float64)
    return np.maximum(y, 0) if relu else y


def _run_residual(case, bias, relu, path=None, nt=None, direct=None):
    from minidnn import _cpu_conv
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    x, w = rand(N, K, R, C), rand(F, K, nr, nc)
    b = rand(F) if bias else None
    shape = (N, F, out_size(R, nr, sy, py), out_size(C, nc, sx, px))
    z = rand(*shape, scale=2.0)
    z0 = z.copy()
    y = np.full(shape, np.nan, np.float32)
    old = _cpu_conv._set_conv_path(path) if path is not None else None
    old_nt = cpu.get_num_threads()
    old_direct = _cpu_conv._set_direct(direct) if direct is not None else None
    if nt is not None:
        cpu.set_num_threads(nt)
    try:
        cpu.conv2d_residual(x, w, b, z, y, sy, sx, py, px, relu)
    finally:
        if path is not None:
            _cpu_conv._set_conv_path(old)
        if direct is not None:
            _cpu_conv._set_direct(old_direct)
        cpu.set_num_threads(old_nt)
    np.testing.assert_array_equal(z, z0)           # z is only read
    assert_close(y, ref_conv2d_residual(x, w, b, z, sy, sx, py, px, relu))


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_conv2d_residual(case, bias, relu, threads, conv_path):
    _run_residual(case, bias, relu)


@pytest.mark.parametrize("case", IG_CASES, ids=[str(c) for c in IG_CASES])
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True), (False, True)],
                         ids=["nobias-linear", "bias-relu", "nobias-relu"])
@pytest.mark.parametrize("nt", [1, 2, 3], ids=["threads=1", "threads=2", "threads=3"])
@pytest.mark.parametrize("direct", [True, False], ids=["padded-rows", "packed"])
def test_conv2d_residual_implicit_edges(case, bias, relu, nt, direct):
    _run_residual(case, bias, relu, "implicit", nt, direct)


@pytest.mark.parametrize("case", IG_NARROW_CASES, ids=[str(c) for c in IG_NARROW_CASES])
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True), (False, True)],
                         ids=["nobias-linear", "bias-relu", "nobias-relu"])
@pytest.mark.parametrize("nt", [1, 2, 3], ids=["threads=1", "threads=2", "threads=3"])
def test_conv2d_residual_implicit_narrow(case, bias, relu, nt):
    _run_residual(case, bias, relu, "implicit", nt)


@pytest.mark.parametrize("case", IG_CASES + IG_NARROW_CASES,
                         ids=[str(c) for c in IG_CASES + IG_NARROW_CASES])
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True), (False, True)],
                         ids=["nobias-linear", "bias-relu", "nobias-relu"])
@pytest.mark.parametrize("nt", [1, 3], ids=["threads=1", "threads=3"])
def test_conv2d_residual_blas_edges(case, bias, relu, nt):
    _run_residual(case, bias, relu, "blas", nt)


@pytest.mark.parametrize("path", ["blas", "implicit"])
@pytest.mark.parametrize("direct", [True, False], ids=["padded-rows", "packed"])
def test_conv2d_residual_matches_conv2d_then_add(path, direct):
    """conv2d_residual == conv2d (no relu) + add (relu), on the shapes the
    benchmarks run; and with z == 0 it is conv2d itself."""
    from minidnn import _cpu_conv
    old, old_direct = _cpu_conv._set_conv_path(path), _cpu_conv._set_direct(direct)
    try:
        for (N, K, R, F, k, s, p) in [(3, 3, 32, 32, 3, 1, 1), (2, 32, 16, 64, 3, 2, 1),
                                      (3, 32, 16, 64, 1, 2, 0), (1, 64, 8, 128, 3, 1, 1),
                                      (1, 128, 7, 128, 3, 1, 1), (4, 64, 8, 64, 1, 1, 0)]:
            x, w, b = rand(N, K, R, R), rand(F, K, k, k, scale=0.1), rand(F)
            Ro = out_size(R, k, s, p)
            z = rand(N, F, Ro, Ro)
            y1, y2, t = (np.empty((N, F, Ro, Ro), np.float32) for _ in range(3))
            cpu.conv2d_residual(x, w, b, z, y1, s, s, p, p, True)
            cpu.conv2d(x, w, b, t, s, s, p, p, False)
            cpu.add(t, z, y2, True)
            assert_close(y1, y2.astype(np.float64))
            cpu.conv2d_residual(x, w, b, np.zeros_like(z), y1, s, s, p, p, True)
            cpu.conv2d(x, w, b, y2, s, s, p, p, True)
            np.testing.assert_array_equal(y1, y2)
    finally:
        _cpu_conv._set_conv_path(old)
        _cpu_conv._set_direct(old_direct)


def test_conv2d_residual_z_may_share_memory_with_x():
    """z is only read: it may be x itself (a same-shape conv's input)."""
    x, w, b = rand(2, 4, 9, 9), rand(4, 4, 3, 3), rand(4)
    y = cpu.empty(x.shape)
    cpu.conv2d_residual(x, w, b, x, y, 1, 1, 1, 1, True)
    assert_close(y, ref_conv2d_residual(x, w, b, x, 1, 1, 1, 1, True))


def test_conv2d_residual_batch_zero():
    """A batch of zero samples is accepted, writes nothing, and leaves the kernel usable."""
    x, w = rand(0, 3, 5, 5), rand(2, 3, 3, 3)
    buf = np.full(64, 7.0, np.float32)
    y = buf[:0].reshape(0, 2, 3, 3)
    assert cpu.conv2d_residual(x, w, None, cpu.empty((0, 2, 3, 3)), y, 1, 1, 0, 0, True) is None
    assert y.shape == (0, 2, 3, 3) and (buf == 7.0).all()
    x1, z1, y1 = rand(1, 3, 5, 5), rand(1, 2, 3, 3), cpu.empty((1, 2, 3, 3))
    cpu.conv2d_residual(x1, w, None, z1, y1, 1, 1, 0, 0, False)
    assert_close(y1, ref_conv2d(x1, w, None, 1, 1, 0, 0, False) + z1)


def _overlapping_z(y):
    """A z of y's shape that shares all but its first element with y."""
    big = np.empty(y.size + 1, np.float32)
    return big[1:].reshape(y.shape), big[:-1].reshape(y.shape)


BAD_RESIDUAL = {
    "z is y": lambda x, w, b, z, y: (x, w, b, y, y),
    "z overlaps y": lambda x, w, b, z, y: (x, w, b) + _overlapping_z(y),
    "z shape": lambda x, w, b, z, y: (x, w, b, cpu.empty((2, 4, 8, 7)), y),
    "z 3-d": lambda x, w, b, z, y: (x, w, b, z[0], y),
    "z float64": lambda x, w, b, z, y: (x, w, b, z.astype(np.float64), y),
    "z non-contiguous": lambda x, w, b, z, y: (x, w, b, np.asfortranarray(z), y),
    "z strided view": lambda x, w, b, z, y: (x, w, b, rand(2, 4, 8, 16)[..., ::2], y),
    "z list": lambda x, w, b, z, y: (x, w, b, z.tolist(), y),
    "z None": lambda x, w, b, z, y: (x, w, b, None, y),
    "y shape": lambda x, w, b, z, y: (x, w, b, z, cpu.empty((2, 4, 7, 8))),
    "y read-only": lambda x, w, b, z, y: (x, w, b, z, _readonly(y)),
    "y is x": lambda x, w, b, z, y: (y, rand(4, 4, 3, 3), b, z, y),
    "x float64": lambda x, w, b, z, y: (x.astype(np.float64), w, b, z, y),
    "w channels": lambda x, w, b, z, y: (x, rand(4, 2, 3, 3), b, z, y),
    "bias size": lambda x, w, b, z, y: (x, w, rand(5), z, y),
}


@pytest.mark.parametrize("bad", list(BAD_RESIDUAL), ids=list(BAD_RESIDUAL))
def test_conv2d_residual_bad_calls_raise(bad):
    x, w, b, y = _ok_conv()
    args = BAD_RESIDUAL[bad](x, w, b, rand(*y.shape), y)
    with pytest.raises(ValueError):
        cpu.conv2d_residual(*args, 1, 1, 1, 1, False)


def test_conv2d_residual_alias_message():
    x, w, b, y = _ok_conv()
    with pytest.raises(ValueError, match="z must not share memory"):
        cpu.conv2d_residual(x, w, b, y, y, 1, 1, 1, 1, True)


def _guarded(shape):
    """A float32 array of this shape that ends exactly where an unreadable
    page begins (reading one element past it would crash the process)."""
    import ctypes
    import mmap
    n = int(np.prod(shape)) * 4
    page = mmap.PAGESIZE
    size = (n + page - 1) // page * page
    buf = mmap.mmap(-1, size + page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(ctypes.c_void_p(base + size), page, 0) != 0:
        pytest.skip("mprotect is not available")
    a = np.frombuffer(buf, dtype=np.float32, count=n // 4, offset=size - n).reshape(shape)
    return a, buf


@pytest.mark.parametrize("case", [(1, 2, 8, 16, 4, 1, 1, 2, 2, 0, 0),    # sx == 2 reads
                                  (1, 2, 6, 33, 4, 3, 3, 2, 2, 0, 0),
                                  (2, 3, 5, 17, 5, 3, 3, 1, 1, 1, 1),
                                  (1, 1, 9, 20, 3, 2, 3, 3, 3, 0, 1),
                                  (2, 3, 8, 8, 5, 3, 3, 1, 1, 1, 1),      # padded rows, Co = 8
                                  (1, 2, 12, 12, 4, 5, 5, 1, 1, 0, 0)],
                         ids=str)
@pytest.mark.parametrize("direct", [True, False], ids=["padded-rows", "packed"])
def test_conv2d_implicit_never_reads_past_the_image(case, direct):
    from minidnn import _cpu_conv
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    x, buf = _guarded((N, K, R, C))
    x[...] = rand(N, K, R, C)
    w, b = rand(F, K, nr, nc), rand(F)
    y = np.empty((N, F, out_size(R, nr, sy, py), out_size(C, nc, sx, px)), np.float32)
    old = _cpu_conv._set_conv_path("implicit")
    old_direct = _cpu_conv._set_direct(direct)
    try:
        cpu.conv2d(x, w, b, y, sy, sx, py, px, True)
    finally:
        _cpu_conv._set_conv_path(old)
        _cpu_conv._set_direct(old_direct)
    assert_close(y, ref_conv2d(x, w, b, sy, sx, py, px, True))
    del x


def test_conv2d_paths_agree_on_resnet_shapes():
    """The two paths on the shapes the benchmarks run (smaller batch)."""
    from minidnn import _cpu_conv
    for (K, R, F, k, s, p) in [(3, 32, 32, 3, 1, 1), (32, 16, 64, 3, 2, 1), (32, 16, 64, 1, 2, 0),
                               (64, 8, 128, 3, 1, 1), (128, 7, 128, 3, 1, 1), (64, 14, 128, 1, 2, 0)]:
        x, w, b = rand(3, K, R, R), rand(F, K, k, k, scale=0.1), rand(F)
        Ro = out_size(R, k, s, p)
        ys = {}
        for path in ("blas", "implicit"):
            old = _cpu_conv._set_conv_path(path)
            try:
                ys[path] = np.empty((3, F, Ro, Ro), np.float32)
                cpu.conv2d(x, w, b, ys[path], s, s, p, p, True)
            finally:
                _cpu_conv._set_conv_path(old)
        assert_close(ys["implicit"], ys["blas"].astype(np.float64))


def test_conv2d_implicit_plan_is_even():
    """Column chunks are whole 16-column tiles, cover every column once and
    differ by at most one tile; tasks never exceed the workspace."""
    from minidnn import _cpu_conv
    for x_shape, w_shape, s, p in [((64, 32, 32, 32), (32, 32, 3, 3), 1, 1),
                                   ((16, 512, 7, 7), (512, 512, 3, 3), 1, 1),
                                   ((1, 512, 7, 7), (512, 512, 3, 3), 1, 1),
                                   ((3, 5, 6, 6), (7, 5, 3, 3), 1, 1)]:
        for nt in (1, 2, 3):
            g = _cpu_conv._ig_plan_for(x_shape, w_shape, s, s, p, p, nt)
            T, n = g["T"], g["n_cc"]
            sizes = [(c + 1) * T // n - c * T // n for c in range(n)]
            assert sum(sizes) == T and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            assert max(sizes) * 16 <= g["ncw"]
            assert g["fw"] * g["n_fb"] >= w_shape[0] and g["tasks"] == n * g["n_fb"]


def test_conv2d_implicit_cases_cover_both_variants():
    from minidnn import _cpu_conv
    seen = set()
    for N, K, R, C, F, nr, nc, sy, sx, py, px in IG_CASES:
        g = _cpu_conv._ig_plan_for((N, K, R, C), (F, K, nr, nc), sy, sx, py, px, 2)
        seen.add(g["direct"])
        if g["direct"] and _cpu_conv._have_avx2():
            assert out_size(C, nc, sx, px) % 8 == 0 and (sy == sx == 1 or nr * nc >= 4)
    assert seen == ({True, False} if _cpu_conv._have_avx2() else {False})


def test_conv2d_path_rule():
    from minidnn import _cpu_conv
    if not _cpu_conv._have_avx2():
        assert _cpu_conv._conv_path_for((64, 32, 32, 32), (32, 32, 3, 3), 1, 1, 1, 1) == "blas"
        return
    assert _cpu_conv._conv_path_for((64, 32, 32, 32), (32, 32, 3, 3), 1, 1, 1, 1) == "implicit"
    assert _cpu_conv._conv_path_for((64, 3, 32, 32), (32, 3, 3, 3), 1, 1, 1, 1) == "implicit"
    # batch 1 at 7x7: 49 = 3*16 + 1 columns, the last one a narrow (dot-product) tile
    assert _cpu_conv._conv_path_for((1, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1, 1) == "implicit"
    # a ragged last tile of 5..15 columns that is mostly padding -> OpenBLAS
    assert _cpu_conv._conv_path_for((1, 8, 5, 5), (8, 8, 3, 3), 1, 1, 0, 0) == "blas"
    # strided, output rows narrower than 8, batch > 1 -> OpenBLAS; batch 1 -> ours
    assert _cpu_conv._conv_path_for((16, 256, 14, 14), (512, 256, 1, 1), 2, 2, 0, 0) == "blas"
    assert _cpu_conv._conv_path_for((16, 256, 14, 14), (512, 256, 3, 3), 2, 2, 1, 1) == "blas"
    assert _cpu_conv._conv_path_for((1, 256, 14, 14), (512, 256, 3, 3), 2, 2, 1, 1) == "implicit"
    assert _cpu_conv._conv_path_for((16, 64, 16, 16), (128, 64, 1, 1), 2, 2, 0, 0) == "implicit"


def test_conv2d_batch_zero():
    """A batch of zero samples is accepted, writes nothing, and leaves the kernel usable."""
    x, w = rand(0, 3, 5, 5), rand(2, 3, 3, 3)
    buf = np.full(64, 7.0, np.float32)
    y = buf[:0].reshape(0, 2, 3, 3)
    assert cpu.conv2d(x, w, None, y, 1, 1, 0, 0, False) is None
    assert y.shape == (0, 2, 3, 3) and (buf == 7.0).all()
    x1, y1 = rand(1, 3, 5, 5), cpu.empty((1, 2, 3, 3))
    cpu.conv2d(x1, w, None, y1, 1, 1, 0, 0, False)
    assert_close(y1, ref_conv2d(x1, w, None, 1, 1, 0, 0, False))


# ---------------------------------------------------------------------- fc

# N <= 4 takes the dot-product (gemv) path on AVX2 machines: every N up to 4
# and 5 (sgemm again), D with tails 1..7 mod 8, O with every remainder mod 6
@pytest.mark.parametrize("N,D,O", [(1, 1, 1), (1, 7, 3), (3, 17, 5), (1, 300, 130),
                                   (37, 129, 65), (64, 512, 10), (2, 3000, 100),
                                   (1, 512, 1000), (2, 9, 7), (3, 15, 13), (4, 33, 12),
                                   (4, 64, 200), (5, 31, 11), (1, 8, 6), (2, 1001, 17)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("path", ["auto", "blas"], ids=lambda p: "path=" + p)
def test_fc(N, D, O, bias, relu, threads, path):
    from minidnn import _cpu_conv
    x, w = rand(N, D), rand(O, D)
    b = rand(O) if bias else None
    y = np.full((N, O), np.nan, np.float32)
    old = _cpu_conv._set_conv_path(path)
    try:
        cpu.fc(x, w, b, y, relu)
    finally:
        _cpu_conv._set_conv_path(old)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    if bias:
        ref += b
    assert_close(y, np.maximum(ref, 0) if relu else ref)


def test_fc_4d_views():
    x, w, b = rand(3, 4, 5, 6), rand(7, 120), rand(7)
    y = cpu.empty((3, 7, 1, 1))
    cpu.fc(x, w, b, y, False)
    ref = x.reshape(3, -1).astype(np.float64) @ w.astype(np.float64).T + b
    assert_close(y.reshape(3, 7), ref)


# ------------------------------------------------------------------ affine

@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 1, 1), (9, 33, 1, 1),
                                   (3, 16, 40, 40), (2, 64, 3, 3)])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_affine(shape, relu, inplace, threads):
    x = rand(*shape)
    g, be = rand(shape[1]), rand(shape[1])
    ref = x.astype(np.float64) * g.reshape(1, -1, 1, 1) + be.reshape(1, -1, 1, 1)
    ref = np.maximum(ref, 0) if relu else ref
    y = x if inplace else np.full(shape, np.nan, np.float32)
    cpu.affine(x, g, be, y, relu)
    assert_close(y, ref)


# ------------------------------------------------------------ relu and add

@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (4, 64, 33, 31), (1, 100003, 1, 1)])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_relu(shape, inplace, threads):
    x = rand(*shape)
    ref = np.maximum(x.astype(np.float64), 0)
    y = x if inplace else np.full(shape, np.nan, np.float32)
    cpu.activation(x, y, True)
    assert_close(y, ref)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (4, 64, 33, 31), (1, 100003, 1, 1)])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("where", ["out", "a", "b"])
def test_add(shape, relu, where, threads):
    a, b = rand(*shape), rand(*shape)
    ref = a.astype(np.float64) + b
    ref = np.maximum(ref, 0) if relu else ref
    y = {"out": np.full(shape, np.nan, np.float32), "a": a, "b": b}[where]
    cpu.add(a, b, y, relu)
    assert_close(y, ref)


# ----------------------------------------------------------------- pooling

# (N, K, R, C, nr, nc, sy, sx, py, px)
POOL_CASES = [
    (1, 1, 4, 4, 2, 2, 2, 2, 0, 0),
    (2, 3, 7, 9, 3, 3, 2, 2, 1, 1),
    (3, 2, 11, 10, 3, 2, 1, 3, 2, 1),
    (1, 4, 6, 6, 6, 6, 1, 1, 0, 0),          # global
    (2, 5, 9, 7, 4, 3, 3, 2, 3, 2),          # pad = window - 1
    (4, 16, 33, 33, 3, 3, 2, 2, 1, 1),
    (2, 64, 112, 112, 3, 3, 2, 2, 1, 1),     # ResNet-18 stem pool
    (1, 2, 3, 4200, 2, 3, 1, 2, 1, 1),       # rows wider than max_pool's stack buffer
    (2, 3, 9, 8, 3, 1, 2, 1, 1, 0),          # one-column window (vertical only)
    (2, 3, 8, 9, 1, 3, 1, 3, 0, 2),          # one-row window, stride 3
    (1, 2, 10, 11, 4, 4, 3, 3, 3, 3),        # pad = window - 1, stride 3
    (1, 3, 5, 5, 5, 1, 1, 1, 2, 0),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[str(c) for c in POOL_CASES])
@pytest.mark.parametrize("op", ["max", "avg"])
def test_pool(case, op, threads):
    N, K, R, C, nr, nc, sy, sx, py, px = case
    x = rand(N, K, R, C) - 3.0     # negative values: padding must never count as 0
    y = np.full((N, K, out_size(R, nr, sy, py), out_size(C, nc, sx, px)), np.nan, np.float32)
    getattr(cpu, op + "_pool")(x, y, nr, nc, sy, sx, py, px)
    assert_close(y, ref_pool(x, nr, nc, sy, sx, py, px, op))


# ----------------------------------------------------------------- softmax

@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 10, 1, 1), (7, 1000, 1, 1), (2, 3, 5, 7),
                                   (3, 21, 17, 19), (1, 4, 30, 30)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_softmax(shape, scale, inplace, threads):
    x = rand(*shape, scale=scale)
    ref = ref_softmax(x)
    y = x if inplace else np.full(shape, np.nan, np.float32)
    cpu.softmax(x, y)
    assert_close(y, ref)


def test_softmax_is_stable_for_huge_inputs():
    x = np.array([1e30, 1e30, -1e30], np.float32).reshape(1, 3, 1, 1)
    y = cpu.empty(x.shape)
    cpu.softmax(x, y)
    assert_close(y, [[[[0.5]], [[0.5]], [[0.0]]]])


# ---------------------------------------------------------- memory helpers

def test_memory_primitives():
    assert cpu.name == "cpu"
    e = cpu.empty((2, 3, 4, 5))
    assert e.shape == (2, 3, 4, 5) and e.dtype == np.float32 and e.flags.c_contiguous
    src = np.arange(6, dtype=np.float64).reshape(1, 6, 1, 1)
    a = cpu.asarray(src)
    assert a.dtype == np.float32 and a.flags.c_contiguous and not np.shares_memory(a, src)
    assert cpu.to_numpy(a) is a or np.array_equal(cpu.to_numpy(a), a)


def test_scipy_blas_pinned_numpy_untouched():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    info = threadpoolctl.threadpool_info()
    for lib in info:
        if lib["user_api"] == "blas" and lib["filepath"] in cpu._blas_pinned:
            assert lib["num_threads"] == 1


# --------------------------------------------------- bad calls never crash

def _ok_conv():
    return rand(2, 3, 8, 8), rand(4, 3, 3, 3), rand(4), cpu.empty((2, 4, 8, 8))


BAD_CONV = {
    "x float64": lambda x, w, b, y: (x.astype(np.float64), w, b, y),
    "x list": lambda x, w, b, y: (x.tolist(), w, b, y),
    "x non-contiguous": lambda x, w, b, y: (np.asfortranarray(x), w, b, y),
    "x 3-d": lambda x, w, b, y: (x[0], w, b, y),
    "w channels": lambda x, w, b, y: (x, rand(4, 2, 3, 3), b, y),
    "bias size": lambda x, w, b, y: (x, w, rand(5), y),
    "y shape": lambda x, w, b, y: (x, w, b, cpu.empty((2, 4, 7, 8))),
    "y read-only": lambda x, w, b, y: (x, w, b, _readonly(y)),
    "y is x": lambda x, w, b, y: (y, rand(4, 4, 3, 3), b, y),
    "y None": lambda x, w, b, y: (x, w, b, None),
}


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("bad", list(BAD_CONV), ids=list(BAD_CONV))
def test_conv2d_bad_calls_raise(bad):
    args = BAD_CONV[bad](*_ok_conv())
    with pytest.raises(ValueError):
        cpu.conv2d(*args, 1, 1, 1, 1, False)


@pytest.mark.parametrize("sy,sx,py,px", [(0, 1, 1, 1), (1, -1, 1, 1), (1, 1, -1, 0)])
def test_conv2d_bad_geometry_raises(sy, sx, py, px):
    x, w, b, y = _ok_conv()
    with pytest.raises(ValueError):
        cpu.conv2d(x, w, b, y, sy, sx, py, px, False)


def test_conv2d_filter_larger_than_input_raises():
    with pytest.raises(ValueError):
        cpu.conv2d(rand(1, 1, 3, 3), rand(1, 1, 5, 5), None, cpu.empty((1, 1, 1, 1)), 1, 1, 0, 0, False)


def test_fc_bad_calls_raise():
    x, w, y = rand(3, 10), rand(4, 10), cpu.empty((3, 4))
    for args in [(x, rand(4, 9), None, y), (x, w, rand(3), y), (x, w, None, cpu.empty((3, 5))),
                 (x.astype(np.float16), w, None, y), (x, w, None, x), (x, w[None], None, y),
                 (x[:, ::2], rand(4, 5), None, y)]:
        with pytest.raises(ValueError):
            cpu.fc(*args, False)


def test_eltwise_bad_calls_raise():
    x = rand(2, 3, 4, 5)
    with pytest.raises(ValueError):
        cpu.activation(x, cpu.empty((2, 3, 4, 6)), True)
    with pytest.raises(ValueError):
        cpu.activation(x, x.astype(np.float64), True)
    with pytest.raises(ValueError):
        cpu.add(x, rand(2, 3, 4, 4), cpu.empty(x.shape), False)
    with pytest.raises(ValueError):
        big = rand(2 * 3 * 4 * 5 + 1)
        cpu.activation(big[1:].reshape(x.shape), big[:-1].reshape(x.shape), True)   # partial overlap
    with pytest.raises(ValueError):
        cpu.affine(x, rand(4), rand(3), cpu.empty(x.shape), False)
    with pytest.raises(ValueError):
        cpu.softmax(x, cpu.empty((2, 3, 5, 4)))
    with pytest.raises(ValueError):
        cpu.softmax(x[0], x[0])


def test_pool_bad_calls_raise():
    x = rand(1, 2, 6, 6)
    for args in [(x, cpu.empty((1, 2, 3, 3)), 2, 2, 2, 2, 2, 0),     # pad >= window
                 (x, cpu.empty((1, 2, 4, 4)), 2, 2, 2, 2, 0, 0),     # wrong y
                 (x, cpu.empty((1, 2, 3, 3)), 2, 2, 0, 2, 0, 0),     # stride 0
                 (x, cpu.empty((1, 2, 1, 1)), 9, 9, 1, 1, 1, 1)]:    # window > input
        for op in (cpu.max_pool, cpu.avg_pool):
            with pytest.raises(ValueError):
                op(*args)


def test_set_num_threads_validates():
    with pytest.raises(ValueError):
        cpu.set_num_threads(0)


def test_conv_cases_cover_every_task_plan():
    """The conv cases above exercise each way conv2d cuts its work: sample
    groups (G > 1, incl. the direct 1x1 path), pixel chunks, filter blocks."""
    from minidnn import _cpu_conv
    seen = set()
    for nt in (1, 2, 3):
        for N, K, R, C, F, nr, nc, sy, sx, py, px in CONV_CASES:
            p = _cpu_conv._conv_plan((N, K, R, C), (F, K, nr, nc), sy, sx, py, px, nt)
            assert p["tasks"] >= 1 and p["pw"] >= 1 and p["fw"] >= 1
            direct = nr == nc == sy == sx == 1 and py == px == 0
            seen |= {k for k, hit in (("group", p["G"] > 1), ("group-direct", p["G"] > 1 and direct),
                                      ("chunks", p["n_pc"] > 1), ("filter-blocks", p["n_fb"] > 1)) if hit}
    assert seen == {"group", "group-direct", "chunks", "filter-blocks"}

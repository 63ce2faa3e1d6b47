"""Kernel tests that walk every blocking edge (issue 10).

Every blocked loop of the CPU kernels is run at shapes just below, at and
just above each of its block sizes, and at multiples plus 1..5, on every
route the router can pick (each route forced), at 1 and 2 threads, against
the float64 references of tests/reference.py. The blocking constants, and
the test below that walks each (docs/INTERNALS.md, "Blocking constants and
their edge tests", has the same table):

  conv2d / conv2d_residual, implicit GEMM (kernels/cpu/gemm_avx2.h, conv.pyx _ig_plan)
    filters F        MDNN_MR = 6 (micro-tile rows; 7..9 left are split in two),
                     mdnn_mc = 120 (filter block; a tail of 1..5 joins the last block),
                     MDNN_MC = 240 (its maximum), filter split across tasks at 2 threads
    reduction KRS    mdnn_kc = 320 (K block, blocks split evenly), MDNN_KC = 512 (maximum),
                     8-wide K steps of the narrow (dot-product) kernel
    columns N*P      MDNN_NR = 16 (micro-tile columns), MDNN_NARROW = 4 (a last tile of
                     1..4 columns runs as dot products), IG_MIN_COLS = 64, the B panel
                     (IG_PANEL_BYTES / (4 kc) columns) and padded-rows chunk
                     (IG_DIRECT_BYTES), tiles straddling samples
    -> test_conv2d_edges (forced "packed" and "padded-rows"), test_conv2d_knob_edges
       (mdnn_kc/mdnn_mc at their maxima 512/240 and minima 16/6),
       test_conv2d_random_shapes
  conv2d / conv2d_residual, im2col + sgemm ("blas", conv.pyx _plan)
    GEMM_MIN_M = 192 (sample groups G when P < 192), PW_BYTES (pixel chunks), the
    pixel split (P >= 64 q) and filter split (F >= 16 q, blocks of 8) at 2 threads,
    the direct 1x1 mode, im2col of a chunk that starts near the end of an output
    row (past the last column a wide tap reaches)
    -> test_conv2d_edges (forced "blas"), test_conv2d_random_shapes
  fc: gemv (N <= MDNN_NARROW = 4 on AVX2: blocks of 6 outputs split among threads,
    8-wide steps along D) and sgemm (samples split at N >= 8 nt, else outputs at
    O >= 16 nt in blocks of 8)            -> test_fc_edges
  conv2d_grad_data / conv2d_grad_params (per-thread sample chunks, partial sums
    added in order), fc_grad_data (N // 8 parts), fc_grad_params (O // 8 parts)
                                          -> test_conv2d_grad_edges, test_fc_grad_edges
  max_pool / avg_pool (the separable max_pool's MAXROW = 4096 row buffer, planes per
    thread) and their grads              -> test_pool_edges, test_pool_grad_edges
  activation / add (BLOCK = 2**14 per OpenMP iteration), affine, softmax
    (256-pixel chunks)                    -> test_eltwise_edges, test_softmax_edges

test_blocking_constants checks the constants the extension lets a test see
(mdnn_kc, mdnn_mc and their maxima, NR, NARROW, the B panel, GEMM_MIN_M): change
one and it fails, pointing here; test_conv_cases_cover_every_plan checks that
the case lists still reach every cut the planners make.

The random search (test_conv2d_random_shapes: filters up to 600, reduction
lengths K*nr*nc up to 5000, small images) is deterministic in CI: 60
derandomized examples. Run it wider with

    MINIDNN_EDGE_EXAMPLES=2000 python -m pytest tests/test_kernel_edges.py -k random
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as REF
import minidnn  # noqa: F401  (registers the activations)
from minidnn import _cpu_conv, ops
from minidnn.backends import cpu
from minidnn.backends import cpu_grad

# The blocking constants walked here (test_blocking_constants keeps them honest).
MR, NR, NARROW = 6, 16, 4          # gemm_avx2.h: MDNN_MR, MDNN_NR, MDNN_NARROW
KC, MC = 320, 120                  # mdnn_kc, mdnn_mc (defaults of the tuning knobs)
KC_MAX, MC_MAX = 512, 240          # MDNN_KC, MDNN_MC
MAXROW = 4096                      # pool.pyx: separable max_pool's row buffer
ELT_BLOCK = 1 << 14                # eltwise.pyx: BLOCK
ELT_GRAIN = 1 << 15                # eltwise.pyx / grad.pyx: GRAIN (per thread)
SOFTMAX_CHUNK = 256                # eltwise.pyx: _softmax_cols

SILU = ops.act_by_name("silu")
LEAKY = ops.act_by_name("leaky_relu", 0.1)
CLIPPED = ops.act_by_name("clipped_relu", 0.5)   # low: the clip is hit
SMELU = ops.act_by_name("smelu", 0.7)
AVX2 = _cpu_conv._have_avx2()
EXAMPLES = int(os.environ.get("MINIDNN_EDGE_EXAMPLES", "60"))


# ------------------------------------------------------------- settings
#
# Routes, knobs and the thread count are process-wide: every test here runs
# under an autouse fixture whose finalizer puts all of them back.

def _snapshot():
    path = _cpu_conv._set_conv_path("auto")
    _cpu_conv._set_conv_path(path)
    direct = _cpu_conv._set_direct(True)
    _cpu_conv._set_direct(direct)
    kc = _cpu_conv._set_kc(KC)
    _cpu_conv._set_kc(kc)
    mc = _cpu_conv._set_mc(MC)
    _cpu_conv._set_mc(mc)
    return path, direct, kc, mc, cpu.get_num_threads()


def _restore(s):
    path, direct, kc, mc, nt = s
    _cpu_conv._set_conv_path(path)
    _cpu_conv._set_direct(direct)
    _cpu_conv._set_kc(kc)
    _cpu_conv._set_mc(mc)
    cpu.set_num_threads(nt)


@pytest.fixture(autouse=True)
def _restore_settings():
    saved = _snapshot()
    yield
    _restore(saved)


@pytest.fixture(params=[1, 2], ids=["nt=1", "nt=2"])
def nt(request):
    """Run at 1 and at 2 threads (the finalizer of _restore_settings resets it)."""
    cpu.set_num_threads(request.param)
    return request.param


# conv2d routes: (conv path, padded-rows variant allowed)
ROUTES = {"blas": ("blas", True), "packed": ("implicit", False), "padded-rows": ("implicit", True)}


def _force_route(route):
    path, direct = ROUTES[route]
    _cpu_conv._set_conv_path(path)
    _cpu_conv._set_direct(direct)


@pytest.fixture
def conv_route(request):
    """Force conv2d's route (indirect parameter): im2col + sgemm ("blas"), the
    implicit GEMM with B packed ("packed") or read from padded rows ("padded-rows")."""
    _force_route(request.param)
    return request.param


# ------------------------------------------------------------ helpers

def out_size(n, k, s, p):
    return 1 + (n + 2 * p - k) // s


def _rng(*key):
    return np.random.default_rng([abs(int(v)) for v in key])


def _krs_geom(krs):
    """(K, nr, nc, py, px) with K*nr*nc == krs: 3x3 pad 1, 1x3 pad (0, 1) or 1x1."""
    if krs % 9 == 0:
        return krs // 9, 3, 3, 1, 1
    if krs % 3 == 0:
        return krs // 3, 1, 3, 0, 1
    return krs, 1, 1, 0, 0


def conv_case(N, Ro, Co, F, KRS):
    """(N, K, R, C, F, nr, nc, sy, sx, py, px), stride 1, with exactly this many
    filters, reduction length and output pixels."""
    K, nr, nc, py, px = _krs_geom(KRS)
    return (N, K, Ro + nr - 1 - 2 * py, Co + nc - 1 - 2 * px, F, nr, nc, 1, 1, py, px)


def _dims(case):
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    Ro, Co = out_size(R, nr, sy, py), out_size(C, nc, sx, px)
    return N, K * nr * nc, Ro, Co


def _case_id(case):
    N, KRS, Ro, Co = _dims(case)
    return f"F{case[4]}-KRS{KRS}-NP{N}x{Ro * Co}-" + "_".join(map(str, case))


def _direct_ok(case):
    """Whether the padded-rows variant takes this shape (gemm_avx2.h mdnn_direct_ok)."""
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    old = _cpu_conv._set_direct(True)
    try:
        return _cpu_conv._ig_plan_for((N, K, R, C), (F, K, nr, nc), sy, sx, py, px, 1)["direct"]
    finally:
        _cpu_conv._set_direct(old)


_DATA = {}


def _conv_data(case):
    """x, w, b, z and the float64 reference conv(x, w) (no bias) of a case,
    made once per case (the reference is the slow part)."""
    if case not in _DATA:
        N, K, R, C, F, nr, nc, sy, sx, py, px = case
        rng = _rng(*case)
        x = rng.standard_normal((N, K, R, C)).astype(np.float32)
        w = (rng.standard_normal((F, K, nr, nc)) / np.sqrt(K * nr * nc)).astype(np.float32)
        b = rng.standard_normal(F).astype(np.float32)
        ref = REF.conv2d(x, w, None, sy, sx, py, px)
        z = rng.standard_normal(ref.shape).astype(np.float32)
        _DATA[case] = (x, w, b, z, ref)
    return _DATA[case]


def _check_conv(case, data=None):
    """conv2d with bias (linear), conv2d without bias with the relu epilogue,
    conv2d_residual with bias and relu, conv2d with bias and a transcendental
    epilogue (silu): each against the reference."""
    N, K, R, C, F, nr, nc, sy, sx, py, px = case
    x, w, b, z, ref = data if data is not None else _conv_data(case)
    bref = ref + b.astype(np.float64)[None, :, None, None]
    y = np.full(ref.shape, np.nan, np.float32)
    cpu.conv2d(x, w, b, y, sy, sx, py, px, False)
    REF.assert_close(y, bref)
    y[...] = np.nan
    cpu.conv2d(x, w, None, y, sy, sx, py, px, True)
    REF.assert_close(y, REF.relu(ref))
    y[...] = np.nan
    cpu.conv2d_residual(x, w, b, z, y, sy, sx, py, px, True)
    REF.assert_close(y, REF.relu(bref + z))
    y[...] = np.nan
    cpu.conv2d(x, w, b, y, sy, sx, py, px, SILU)
    REF.assert_close(y, REF.activation(bref, SILU))
    # the activations applied to the accumulators in registers (gemm_avx2.h's
    # mdnn_act_ps), the residual included: every lane of every tile edge
    for act, pre in ((LEAKY, bref), (CLIPPED, bref + z), (SMELU, ref)):
        y[...] = np.nan
        if act is CLIPPED:
            cpu.conv2d_residual(x, w, b, z, y, sy, sx, py, px, act)
        else:
            cpu.conv2d(x, w, b if act is LEAKY else None, y, sy, sx, py, px, act)
        REF.assert_close(y, REF.activation(pre, act))


# -------------------------------------------------------- conv2d cases

# Filter counts: around MR (and the 7..9 split), around mc = 120 and MC = 240,
# 120m + 1..5 (a tail that joins the last filter block), and 247..251 (at 2
# threads with few columns the filters split into tasks of 126 + 121..125).
F_EDGES = ([1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 119, 120, 126, 127, 239, 240, 246, 247, 251, 366]
           + [120 * m + r for m in (1, 2, 3) for r in range(1, 6)])
# Reduction lengths: one K block with every tail mod 8 (the narrow kernel's
# steps), around kc = 320 and its multiples (blocks split evenly), around 512.
KRS_EDGES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 27, 319, 320, 321, 322, 323, 324, 325,
             511, 512, 513, 639, 640, 641, 645, 961, 1023, 1024, 1025, 1600]
# Output columns (N, Ro, Co): N*P around NR = 16 and its multiples + 1..5 (the
# narrow widths 1..4 and the first padded width 5), around 64 (IG_MIN_COLS and
# the 2-thread chunk split at 128), the B panel (144 columns at kc = 320), 192
# (the blas path's GEMM_MIN_M), tiles straddling samples (P = 1, 4, 9, 21, 49).
COL_EDGES = [(1, 1, 1), (1, 1, 2), (3, 1, 1), (1, 2, 2), (5, 1, 1), (1, 3, 5), (4, 2, 2),
             (1, 1, 17), (2, 3, 3), (1, 3, 6), (1, 4, 5), (3, 7, 1), (1, 31, 1), (2, 4, 4),
             (1, 3, 11), (17, 1, 2), (5, 7, 1), (4, 3, 3), (1, 5, 7), (1, 7, 9), (1, 8, 8),
             (5, 13, 1), (1, 127, 1), (2, 8, 8), (1, 129, 1), (1, 11, 13), (1, 12, 12),
             (5, 29, 1), (1, 7, 23), (3, 8, 8), (1, 193, 1), (1, 7, 7), (2, 7, 7), (3, 7, 7),
             (5, 7, 7), (1, 14, 14), (2, 3, 7), (9, 4, 4)]

CONV_CASES = []
# every filter edge with one short and two long (2- and 3-block) reductions
for i, F in enumerate(F_EDGES):
    for j, krs in enumerate((27, 645, 324)):
        CONV_CASES.append(conv_case(*COL_EDGES[(3 * i + j) % len(COL_EDGES)], F, krs))
# every reduction edge with filters that end in a merged tail (13, 125, 245)
for i, krs in enumerate(KRS_EDGES):
    F = (13, 125, 7, 245, 6, 121)[i % 6]
    CONV_CASES.append(conv_case(*COL_EDGES[(5 * i + 1) % len(COL_EDGES)], F, krs))
# every column edge, short and long reduction
for i, cols in enumerate(COL_EDGES):
    CONV_CASES.append(conv_case(*cols, (13, 125, 1, 245, 6)[i % 5], (27, 321)[i % 2]))
    CONV_CASES.append(conv_case(*cols, (123, 7, 243)[i % 3], (645, 36, 9)[i % 3]))
# padded rows (Co % 8 == 0, P % 16 == 0): chunks that start mid-sample, 2-3 K blocks
CONV_CASES += [
    (1, 36, 2, 8, 125, 3, 3, 1, 1, 1, 1),      # P = 16: one tile of two rows
    (7, 64, 8, 8, 13, 3, 3, 1, 1, 1, 1),       # KRS = 576, N*P = 448 > the 400-column chunk
    (2, 72, 4, 16, 245, 3, 3, 1, 1, 1, 1),     # KRS = 648: 3 K blocks
    (1, 3, 2, 24, 121, 3, 3, 1, 1, 1, 1),      # Co = 24: tiles cross rows at 8
    (3, 57, 8, 8, 365, 3, 3, 1, 1, 1, 1),      # KRS = 513
    (1, 40, 16, 16, 125, 3, 3, 2, 2, 1, 1),    # stride 2 -> Co = 8, KRS = 360
    (2, 36, 17, 16, 7, 3, 3, 2, 2, 1, 1),      # odd rows, stride 2
    (1, 114, 8, 8, 241, 3, 3, 1, 1, 1, 1),     # KRS = 1026: 4 K blocks
    (2, 3, 38, 38, 125, 7, 7, 2, 2, 3, 3),     # stem-like, KRS = 147, Co = 16
]
# blas pixel chunks that start at the end of an output row, past the last
# output column a tap reaches (kernels reaching 2+ columns beyond the right
# edge): im2col's segment then began past hi
CONV_CASES += [
    (1, 30, 26, 23, 7, 5, 5, 1, 1, 2, 2),      # chunks of 160: 160 % 23 = 22 = Co - 1
    (1, 30, 26, 15, 7, 5, 5, 1, 1, 2, 2),      # at 2 threads
    (1, 49, 32, 35, 13, 1, 5, 1, 1, 0, 2),     # chunks of 384: 384 % 35 = 34
    (1, 30, 13, 40, 7, 3, 6, 1, 1, 0, 7),      # pad 7 > nc - 1
    (1, 30, 19, 45, 7, 3, 7, 1, 2, 0, 5),      # stride 2
    (1, 150, 17, 46, 7, 1, 4, 1, 2, 0, 5),
]
# strides, pads and non-square kernels with a merged filter tail and 2+ K blocks
CONV_CASES += [
    (2, 40, 9, 9, 125, 3, 3, 2, 2, 1, 1),      # Co = 5
    (1, 81, 14, 14, 245, 3, 3, 2, 2, 1, 1),    # 14 -> 7: batch 1 at 7x7 (narrow width 1)
    (3, 400, 7, 7, 125, 1, 1, 2, 2, 0, 0),     # 1x1 stride 2
    (2, 30, 11, 10, 123, 3, 4, 3, 2, 2, 1),    # KRS = 360, mixed strides
    (1, 13, 12, 13, 364, 5, 5, 1, 3, 2, 0),    # KRS = 325
    (4, 330, 3, 3, 121, 1, 1, 1, 1, 1, 1),     # 1x1 with padding: not the blas direct mode
]
# 1x1 stride-1 unpadded convs with P % 16 == 0: the padded-rows route reads B straight
# from the image (no buffer), any Co: rows narrower than 8, chunks that span samples,
# 2+ K blocks, filter counts around MR, one filter
CONV_CASES += [
    (1, 16, 28, 28, 13, 1, 1, 1, 1, 0, 0),     # P = 784, Co = 28
    (3, 700, 4, 4, 19, 1, 1, 1, 1, 0, 0),      # P = 16, K over MDNN_KC
    (2, 5, 8, 6, 7, 1, 1, 1, 1, 0, 0),         # P = 48, Co = 6
    (1, 3, 16, 16, 1, 1, 1, 1, 1, 0, 0),       # one filter
    (5, 33, 2, 8, 6, 1, 1, 1, 1, 0, 0),        # P = 16, five samples
    (2, 17, 4, 8, 11, 1, 1, 1, 1, 0, 0),       # KRS = 17: column tiles outside
    (2, 16, 4, 8, 11, 1, 1, 1, 1, 0, 0),       # KRS = 16: filter tiles outside
]
# batch edges of the blas path's sample groups (P = 64 -> G = 3, P = 9 -> G = 22)
CONV_CASES += [conv_case(N, 8, 8, 125, 324) for N in (2, 3, 4, 7)]
CONV_CASES += [conv_case(N, 3, 3, 13, 645) for N in (21, 22, 23, 45)]
# the blas path's pixel chunks: pw = PW_BYTES / (4 KRS) columns (404 at KRS = 324)
CONV_CASES += [conv_case(1, 1, P, F, 324) for P, F in ((403, 31), (404, 32), (405, 33))]
CONV_CASES = list(dict.fromkeys(CONV_CASES))


def _conv_params():
    out = []
    for case in CONV_CASES:
        routes = ["blas", "packed"]
        if AVX2 and _direct_ok(case):
            routes.append("padded-rows")
        for r in routes:
            out.append(pytest.param(case, r, id=f"{r}-{_case_id(case)}"))
    return out


@pytest.mark.parametrize("case,conv_route", _conv_params(), indirect=["conv_route"])
def test_conv2d_edges(case, conv_route, nt):
    if conv_route == "padded-rows":
        N, K, R_, C, F, nr, nc, sy, sx, py, px = case
        assert _cpu_conv._ig_plan_for((N, K, R_, C), (F, K, nr, nc), sy, sx, py, px, nt)["direct"]
    _check_conv(case)


# The tuning knobs at their compile-time maxima (mdnn_kc = MDNN_KC = 512, the
# stack buffers of packing and of the narrow tiles full; mdnn_mc = MDNN_MC =
# 240) and at their minima (16, 6: many blocks on tiny shapes).
KNOB_CASES = {
    "max": [conv_case(*COL_EDGES[i % len(COL_EDGES)], F, krs)
            for i, (F, krs) in enumerate(
                [(F, krs) for F in (239, 240, 241, 245, 246, 481, 485)
                 for krs in (511, 512, 513, 1025)])],
    "min": [conv_case(*COL_EDGES[(7 * i) % len(COL_EDGES)], F, krs)
            for i, (F, krs) in enumerate(
                [(F, krs) for F in (5, 6, 7, 11, 12, 13, 17, 19, 31)
                 for krs in (15, 16, 17, 33, 81)])],
}
KNOBS = {"max": (KC_MAX, MC_MAX), "min": (16, 6)}


def _knob_params():
    out = []
    for knob, cases in KNOB_CASES.items():
        for case in dict.fromkeys(cases):
            for r in ["packed"] + (["padded-rows"] if AVX2 and _direct_ok(case) else []):
                out.append(pytest.param(knob, case, r, id=f"{knob}-{r}-{_case_id(case)}"))
    return out


@pytest.mark.parametrize("knob,case,conv_route", _knob_params(), indirect=["conv_route"])
def test_conv2d_knob_edges(knob, case, conv_route, nt):
    kc, mc = KNOBS[knob]
    assert _cpu_conv._set_kc(kc) == KC and _cpu_conv._set_mc(mc) == MC   # restored by the fixture
    _check_conv(case)


def test_conv_cases_cover_every_plan():
    """The cases above reach every way the planners cut the work, and the bug
    class of issue 10 (a tail of 1..5 filters merged into the last block of a
    task, with 2+ K blocks) on every implicit route."""
    seen = set()
    for case in CONV_CASES:
        N, K, R_, C, F, nr, nc, sy, sx, py, px = case
        _, KRS, Ro, Co = _dims(case)
        Q = N * Ro * Co
        for t in (1, 2):
            old = _cpu_conv._set_direct(False)
            try:
                g = _cpu_conv._ig_plan_for((N, K, R_, C), (F, K, nr, nc), sy, sx, py, px, t)
            finally:
                _cpu_conv._set_direct(old)
            p = _cpu_conv._conv_plan((N, K, R_, C), (F, K, nr, nc), sy, sx, py, px, t)
            seen |= {k for k, hit in (
                ("ig-chunks", g["n_cc"] > 1), ("ig-filter-split", g["n_fb"] > 1),
                ("blas-groups", p["G"] > 1), ("blas-chunks", p["n_pc"] > 1),
                ("blas-filter-split", p["n_fb"] > 1)) if hit}
            if g["n_fb"] > 1 and KRS > KC:
                last = F - (g["n_fb"] - 1) * g["fw"]
                if any(nf > MC and nf % MC and nf % MC < MR for nf in (g["fw"], last)):
                    seen.add("merged-tail-in-filter-task")
        if Q % NR and Q % NR <= NARROW:
            seen.add(f"narrow-{Q % NR}")
        if F > MC and F % MC < MR and F % MC and KRS > KC:
            seen.add(f"merged-tail-{F // MC}")
            if _direct_ok(case):
                seen.add("merged-tail-padded-rows")
        if _direct_ok(case):
            seen.add("padded-rows")
            old = _cpu_conv._set_direct(True)
            try:
                if _cpu_conv._ig_plan_for((N, K, R_, C), (F, K, nr, nc), sy, sx, py, px, 1)["n_cc"] > 1:
                    seen.add("padded-rows-chunks")
            finally:
                _cpu_conv._set_direct(old)
        if nr == nc == sy == sx == 1 and py == px == 0:
            seen.add("blas-direct")
        else:
            # a blas pixel chunk that starts past the last output column some
            # tap reaches (im2col's segment then starts beyond hi)
            his = [min(Co, (C - 1 + px - j) // sx + 1) for j in range(nc)]
            for t in (1, 2):
                p = _cpu_conv._conv_plan((N, K, R_, C), (F, K, nr, nc), sy, sx, py, px, t)
                if p["G"] == 1 and any((c * p["pw"]) % Co > min(his) for c in range(1, p["n_pc"])):
                    seen.add(f"blas-chunk-past-row-end-nt{t}")
    want = {"ig-chunks", "ig-filter-split", "blas-groups", "blas-chunks", "blas-filter-split",
            "merged-tail-in-filter-task", "narrow-1", "narrow-2", "narrow-3", "narrow-4",
            "merged-tail-1", "merged-tail-2", "merged-tail-3", "padded-rows",
            "padded-rows-chunks", "blas-direct", "blas-chunk-past-row-end-nt1",
            "blas-chunk-past-row-end-nt2"}
    if AVX2:
        want.add("merged-tail-padded-rows")
    assert want <= seen, want - seen


def test_blocking_constants():
    """The constants this file walks are the kernels' own: if one changes,
    revisit the edge lists above (and docs/INTERNALS.md)."""
    assert _cpu_conv._set_kc(1 << 20) == KC and _cpu_conv._set_kc(KC) == KC_MAX
    assert _cpu_conv._set_mc(1 << 20) == MC and _cpu_conv._set_mc(MC) == MC_MAX
    for q in (1, 15, 16, 17, 33):
        g = _cpu_conv._ig_plan_for((1, 1, 1, q), (1, 1, 1, 1), 1, 1, 0, 0, 1)
        assert g["T"] == -(-q // NR)
    # the B panel: IG_PANEL_BYTES / (4 kc) columns, rounded down to NR, at least 64
    g = _cpu_conv._ig_plan_for((1, KC, 1, 145), (1, KC, 1, 1), 1, 1, 0, 0, 1)
    assert g["n_cc"] == 2 and g["ncw"] == 80
    g = _cpu_conv._ig_plan_for((1, KC, 1, 144), (1, KC, 1, 1), 1, 1, 0, 0, 1)
    assert g["n_cc"] == 1
    assert _cpu_conv._conv_plan((4, 3, 8, 8), (8, 3, 3, 3), 1, 1, 1, 1, 1)["G"] == 3   # 192 / 64
    if AVX2:
        assert _cpu_conv._conv_path_for((1, 8, 4, 5), (8, 8, 3, 3), 1, 1, 1, 1) == "implicit"
        assert _cpu_conv._conv_path_for((1, 8, 3, 7), (8, 8, 3, 3), 1, 1, 1, 1) == "blas"
        # 1x1 at batch 1: OpenBLAS for K >= 512 over at most 64 pixels
        for K, R, path in ((512, 8, "blas"), (511, 8, "implicit"), (512, 9, "implicit"),
                           (960, 7, "blas")):
            assert _cpu_conv._conv_path_for((1, K, R, R), (16, K, 1, 1), 1, 1, 0, 0) == path
    # the zero-copy 1x1 route runs filter tiles outside up to KRS = 16 (cases 16 and 17 above)
    assert _cpu_conv._set_zc_rows_outer(16) == 16


# ------------------------------------------------------ random search

# values next to the block edges, which the search draws half of the time
F_NEAR = sorted({v for m in range(6) for v in range(MC * m - 2, MC * m + 8) if 1 <= v <= 600}
                | {v for m in range(1, 7) for v in (MR * m - 1, MR * m, MR * m + 1, MR * m + 3)})
KRS_NEAR = sorted({v for m in range(16) for v in (KC * m - 1, KC * m, KC * m + 1, KC * m + 3,
                                                    KC * m + 8, KC * m + 13, KC_MAX * m + 1)
                   if 1 <= v <= 5000})


@st.composite
def conv_shapes(draw):
    """A conv with F <= 600 filters and KRS = K*nr*nc <= 5000 (half of the
    time next to a block edge), kernels up to 5x5, strides up to 3, pads up to
    the kernel size, on a small image: the reference's cost F*KRS*N*P is kept
    under 2e7 multiply-adds by shrinking the batch and image when needed."""
    F = draw(st.one_of(st.sampled_from(F_NEAR), st.integers(1, 600)))
    nr, nc = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kmax = 5000 // (nr * nc)
    K = draw(st.one_of(st.sampled_from(KRS_NEAR).map(lambda v: min(kmax, max(1, v // (nr * nc)))),
                       st.integers(1, kmax)))
    sy, sx = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    py, px = draw(st.integers(0, nr)), draw(st.integers(0, nc))
    N = draw(st.integers(1, 3))
    # up to 32 x 32 when the filters and reduction are few (pixel chunks of
    # the blas path, several padded-rows chunks), shrunk below otherwise
    Rr = draw(st.integers(max(1, nr - 2 * py), 32))
    Cc = draw(st.integers(max(1, nc - 2 * px), 32))
    budget = max(1, int(2e7) // (F * K * nr * nc))
    while N * out_size(Rr, nr, sy, py) * out_size(Cc, nc, sx, px) > budget:
        if N > 1:
            N -= 1
        elif Rr > max(1, nr - 2 * py) and Rr >= Cc:
            Rr -= 1
        elif Cc > max(1, nc - 2 * px):
            Cc -= 1
        else:
            break
    return N, K, Rr, Cc, F, nr, nc, sy, sx, py, px


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(conv_shapes())
def test_conv2d_random_shapes(case):
    """Each drawn shape on every route (those that take it) at 1 and 2 threads;
    the autouse fixture restores the route and thread count afterwards."""
    N, K, R_, C, F, nr, nc, sy, sx, py, px = case
    rng = _rng(*case)
    x = rng.standard_normal((N, K, R_, C)).astype(np.float32)
    w = (rng.standard_normal((F, K, nr, nc)) / np.sqrt(K * nr * nc)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32)
    ref = REF.conv2d(x, w, None, sy, sx, py, px)
    z = rng.standard_normal(ref.shape).astype(np.float32)
    routes = ["blas", "packed"] + (["padded-rows"] if AVX2 and _direct_ok(case) else [])
    for route in routes:
        _force_route(route)
        for threads in (1, 2):
            cpu.set_num_threads(threads)
            _check_conv(case, (x, w, b, z, ref))


# ------------------------------------------------------------------ fc

# (N, O, D): N around the gemv limit (4) and the sgemm sample split (8 nt = 16),
# O around the 6-output blocks and the output split (16 nt = 32, blocks of 8),
# D with every tail mod 8 and long rows; some large enough for 2 threads
# (N*O*D >= 200000).
FC_CASES = [
    (1, 1, 1), (1, 5, 7), (1, 6, 8), (1, 7, 9), (1, 13, 15), (1, 12, 16), (1, 11, 17),
    (2, 1, 321), (2, 7, 16385), (3, 1, 70001), (3, 13, 513), (4, 6, 1025), (4, 33, 2049),
    (1, 125, 2049), (1, 121, 1603), (2, 245, 513), (3, 31, 2051), (4, 5, 10007),
    (5, 1, 3), (5, 7, 321), (5, 125, 645), (8, 13, 2048), (15, 31, 513), (15, 33, 513),
    (15, 32, 417), (16, 33, 513), (16, 13, 1025), (17, 7, 2049), (17, 125, 97),
    (33, 65, 129), (1, 1000, 512), (2, 600, 321),
]


def _fc_params():
    out = []
    for case in FC_CASES:
        for route in (["gemv"] if AVX2 and case[0] <= NARROW else []) + ["sgemm"]:
            out.append(pytest.param(case, route, id=f"{route}-N{case[0]}-O{case[1]}-D{case[2]}"))
    return out


@pytest.mark.parametrize("case,route", _fc_params())
@pytest.mark.parametrize("bias,relu", [(True, False), (False, True)], ids=["bias", "relu"])
def test_fc_edges(case, route, bias, relu, nt):
    # "blas" forces sgemm for any N; "auto" takes the gemv kernel at N <= 4
    _cpu_conv._set_conv_path("blas" if route == "sgemm" else "auto")
    N, O, D = case
    rng = _rng(N, O, D)
    x = rng.standard_normal((N, D)).astype(np.float32)
    w = (rng.standard_normal((O, D)) / np.sqrt(D)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32) if bias else None
    y = np.full((N, O), np.nan, np.float32)
    cpu.fc(x, w, b, y, relu)
    ref = REF.fc(x, w, b).reshape(N, O)
    REF.assert_close(y, REF.relu(ref) if relu else ref)


# ------------------------------------------------------------ backward

# (N, K, R, C, F, nr, nc, sy, sx, py, px): filter and reduction edges as
# above, batches that split unevenly over 2 threads (work >= 200000), the
# 1x1 stride-1 mode (no im2col), strides that skip input pixels.
GRAD_CONV_CASES = [
    conv_case(1, 7, 7, 125, 324), conv_case(2, 4, 5, 245, 645), conv_case(3, 3, 3, 121, 513),
    conv_case(5, 2, 3, 31, 321), conv_case(3, 8, 8, 13, 27), conv_case(1, 1, 1, 1, 1),
    conv_case(4, 4, 4, 6, 1025), conv_case(2, 7, 7, 365, 9), conv_case(7, 3, 3, 31, 640),
    (3, 320, 4, 4, 17, 1, 1, 1, 1, 0, 0),      # 1x1 stride 1: dx and x are the column matrices
    (2, 37, 9, 9, 123, 1, 1, 2, 2, 0, 0),      # 1x1 stride 2: skipped pixels get 0
    (3, 40, 9, 8, 125, 3, 3, 2, 2, 1, 1),      # KRS = 360
    (2, 5, 12, 11, 7, 5, 5, 3, 2, 2, 1),       # strides 3/2, pads 2/1
    (1, 3, 4, 4, 2, 4, 4, 1, 1, 0, 0),         # kernel == input
]


@pytest.mark.parametrize("case", GRAD_CONV_CASES, ids=_case_id)
def test_conv2d_grad_edges(case, nt):
    N, K, R_, C, F, nr, nc, sy, sx, py, px = case
    rng = _rng(*case)
    x = rng.standard_normal((N, K, R_, C)).astype(np.float32)
    w = (rng.standard_normal((F, K, nr, nc)) / np.sqrt(K * nr * nc)).astype(np.float32)
    dy = rng.standard_normal((N, F, out_size(R_, nr, sy, py), out_size(C, nc, sx, px))).astype(np.float32)
    dx = np.full(x.shape, np.nan, np.float32)
    cpu_grad.conv2d_grad_data(dy, w, dx, sy, sx, py, px)
    REF.assert_close(dx, REF.conv2d_grad_data(dy, w, x.shape, sy, sx, py, px))
    dw_ref, db_ref = REF.conv2d_grad_params(x, dy, w.shape, sy, sx, py, px)
    dw, db = np.full(w.shape, np.nan, np.float32), np.full(F, np.nan, np.float32)
    cpu_grad.conv2d_grad_params(x, dy, dw, db, sy, sx, py, px)
    REF.assert_close(dw, dw_ref)
    REF.assert_close(db, db_ref)
    dw[...] = np.nan
    cpu_grad.conv2d_grad_params(x, dy, dw, None, sy, sx, py, px)
    REF.assert_close(dw, dw_ref)


# (N, O, D): fc_grad_data splits the samples in N // 8 parts (at most nt),
# fc_grad_params the outputs in O // 8; both need N*O*D >= 200000 for 2 threads.
FC_GRAD_CASES = [(1, 1, 1), (7, 13, 9), (8, 125, 321), (15, 17, 1025), (16, 15, 1025),
                 (17, 16, 1025), (9, 245, 97), (33, 7, 1025), (2, 121, 1001), (24, 31, 513),
                 (5, 600, 67)]


@pytest.mark.parametrize("N,O,D", FC_GRAD_CASES, ids=lambda v: str(v))
def test_fc_grad_edges(N, O, D, nt):
    rng = _rng(N, O, D)
    x = rng.standard_normal((N, D)).astype(np.float32)
    w = (rng.standard_normal((O, D)) / np.sqrt(D)).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    dx = np.full(x.shape, np.nan, np.float32)
    cpu_grad.fc_grad_data(dy, w, dx)
    REF.assert_close(dx, REF.fc_grad_data(dy, w))
    dw_ref, db_ref = REF.fc_grad_params(x, dy)
    dw, db = np.full(w.shape, np.nan, np.float32), np.full(O, np.nan, np.float32)
    cpu_grad.fc_grad_params(x, dy, dw, db)
    REF.assert_close(dw, dw_ref)
    REF.assert_close(db, db_ref)


# ------------------------------------------------------------- pooling

# (N, K, R, C, nr, nc, sy, sx, py, px): the separable max_pool's row buffer
# (W = (Co - 1)*sx + nc padded columns: 4095, 4096, 4097 = MAXROW - 1, MAXROW,
# MAXROW + 1; past it the plain loop), 1-pixel windows (never separable),
# one-row and one-column windows, pad = window - 1, stride > window, global
# windows, and plane counts that split unevenly over 2 threads.
POOL_CASES = [
    (1, 1, 2, MAXROW - 1, 2, 1, 1, 1, 0, 0), (1, 1, 2, MAXROW, 2, 1, 1, 1, 0, 0),
    (1, 1, 2, MAXROW + 1, 2, 1, 1, 1, 0, 0),
    (1, 1, 3, MAXROW - 3, 3, 3, 1, 2, 1, 1),   # sx = 2: W = 4095
    (1, 1, 3, MAXROW - 1, 3, 3, 1, 2, 1, 1),   # W = 4097
    (1, 2, 2, MAXROW - 2, 2, 3, 1, 1, 0, 1),   # W = 4096 with padding
    (2, 3, 5, 6, 1, 1, 1, 1, 0, 0), (2, 3, 7, 9, 1, 1, 2, 3, 0, 0),
    (5, 3, 32, 32, 3, 3, 1, 1, 1, 1),          # 15 planes: work > 2 GRAIN
    (3, 7, 33, 31, 3, 3, 2, 2, 1, 1), (2, 9, 17, 16, 2, 2, 2, 2, 0, 0),
    (1, 3, 11, 10, 4, 4, 3, 3, 3, 3), (2, 2, 9, 13, 2, 2, 4, 5, 1, 1),
    (3, 5, 8, 1, 3, 1, 1, 1, 2, 0), (3, 5, 1, 8, 1, 3, 1, 1, 0, 2),
    (2, 3, 7, 7, 7, 7, 1, 1, 0, 0), (17, 1, 16, 16, 5, 5, 2, 2, 4, 4),
    # a window that is the whole plane (avg: eight partial sums): 1, 7, 8, 9 and 49 pixels
    (3, 5, 1, 1, 1, 1, 1, 1, 0, 0), (2, 4, 1, 7, 1, 7, 1, 1, 0, 0),
    (2, 4, 2, 4, 2, 4, 1, 1, 0, 0), (2, 4, 3, 3, 3, 3, 1, 1, 0, 0),
    (1, 1280, 7, 7, 7, 7, 1, 1, 0, 0),         # MobileNet's head: 1280 planes in tasks of 83
    # planes per task = GRAIN / 4 window reads (4096 / 9 = 455 planes of one 3x3 window),
    # at two threads (work > 2 GRAIN): 8 full tasks and a last one of 1, 0 or 454 planes
    (1, 3641, 3, 3, 3, 3, 1, 1, 0, 0), (1, 3640, 3, 3, 3, 3, 1, 1, 0, 0),
    (1, 3639, 3, 3, 3, 3, 1, 1, 0, 0),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "_".join(map(str, c)))
@pytest.mark.parametrize("op", ["max", "avg"])
def test_pool_edges(case, op, nt):
    N, K, R_, C, nr, nc, sy, sx, py, px = case
    x = (_rng(*case).standard_normal((N, K, R_, C)) - 3).astype(np.float32)
    y = np.full((N, K, out_size(R_, nr, sy, py), out_size(C, nc, sx, px)), np.nan, np.float32)
    getattr(cpu, op + "_pool")(x, y, nr, nc, sy, sx, py, px)
    REF.assert_close(y, REF.pool(x, nr, nc, sy, sx, py, px, np.max if op == "max" else np.mean))


POOL_GRAD_CASES = [c for c in POOL_CASES if c[3] < 1000] + [
    (17, 3, 40, 40, 3, 3, 2, 2, 1, 1),         # 51 planes * 1600 > 2 GRAIN: 2 threads
    (3, 1, 150, 151, 2, 2, 3, 3, 1, 0),        # 3 planes of 22650
]


@pytest.mark.parametrize("case", POOL_GRAD_CASES, ids=lambda c: "_".join(map(str, c)))
@pytest.mark.parametrize("op", ["max", "avg"])
def test_pool_grad_edges(case, op, nt):
    N, K, R_, C, nr, nc, sy, sx, py, px = case
    rng = _rng(*case)
    x = rng.standard_normal((N, K, R_, C)).astype(np.float32)
    dy = rng.standard_normal((N, K, out_size(R_, nr, sy, py), out_size(C, nc, sx, px))).astype(np.float32)
    dx = np.full(x.shape, np.nan, np.float32)
    if op == "max":
        cpu_grad.max_pool_grad(x, dy, dx, nr, nc, sy, sx, py, px)
    else:
        cpu_grad.avg_pool_grad(dy, dx, nr, nc, sy, sx, py, px)
    REF.assert_close(dx, REF.pool_grad(x, dy, nr, nc, sy, sx, py, px, op))


# ----------------------------------------------------------- eltwise

# element counts around the OpenMP blocks (BLOCK) once the tensor is large
# enough for 2 threads (2 GRAIN = 4 BLOCK), and below it
ELT_SIZES = [1, ELT_BLOCK - 1, ELT_BLOCK + 1, 2 * ELT_GRAIN - 1, 2 * ELT_GRAIN,
             2 * ELT_GRAIN + 1, 5 * ELT_BLOCK + 3]


@pytest.mark.parametrize("n", ELT_SIZES)
def test_eltwise_edges(n, nt):
    rng = _rng(n)
    a = rng.standard_normal((1, n, 1, 1)).astype(np.float32)
    b = rng.standard_normal((1, n, 1, 1)).astype(np.float32)
    y = np.full(a.shape, np.nan, np.float32)
    cpu.activation(a, y, True)                      # relu
    REF.assert_close(y, REF.relu(a.astype(np.float64)))
    y[...] = np.nan
    cpu.activation(a, y, SILU)                      # transcendental: threads from GRAIN / 8
    REF.assert_close(y, REF.activation(a, SILU))
    for relu in (False, True):
        y[...] = np.nan
        cpu.add(a, b, y, relu)
        ref = REF.add(a, b)
        REF.assert_close(y, REF.relu(ref) if relu else ref)
    # affine: per-unit rows (fc mode, P == 1: rows per thread) and per-channel planes
    m = max(1, n // 3)
    for shape in ((3, m, 1, 1), (1, 3, 1, m)):
        x = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape[1]).astype(np.float32)
        be = rng.standard_normal(shape[1]).astype(np.float32)
        y = np.full(shape, np.nan, np.float32)
        cpu.affine(x, g, be, y, True)
        REF.assert_close(y, REF.relu(REF.affine(x, g, be)))


@pytest.mark.parametrize("N,K,P", [(3, 5, 1), (2, 7, 255), (1, 3, 256), (2, 64, 257),
                                   (2, 64, 513), (5, 2, SOFTMAX_CHUNK * 3 + 1)])
def test_softmax_edges(N, K, P, nt):
    x = (_rng(N, K, P).standard_normal((N, K, 1, P)) * 3).astype(np.float32)
    y = np.full(x.shape, np.nan, np.float32)
    cpu.softmax(x, y)
    REF.assert_close(y, REF.softmax(x))

"""The convolution family of the catalogue on the GPU: conv2d_grouped and conv2d_transpose.

Same signatures and semantics as minidnn/ops.py and the CPU backend; kernels in
kernels/cuda/conv_family.cu. As the other ops (ops.py): the first call of a shape
builds a plan (kernel, grid, argument layout, scratch such as the index table),
cached in kernels.plans; later calls look it up and launch on the backend's stream,
with no allocation and no host synchronisation (graph capture, graph.py).

conv2d_grouped, per shape, runs one of
- the depthwise kernels (groups == K, any channel multiplier F/K): ``dw_tile``
  (a DW_TH x DW_TW output tile per block, its input patch and filter in shared
  memory) or ``dw_direct`` (one thread per output, taps read with bounds checks);
- the grouped implicit GEMM (any other groups, and dilated groups = 1):
  ``gconv_64x64``, ``gconv_32x128`` or ``gconv_16x256`` (filters x pixels per
  block; blockIdx.z is the group), the tile core of gemm_tile.cuh;
- cuDNN's grouped/dilated convolution (backends/cudnn: cudnn.conv2d_grouped), where
  it measured faster (routing.choose, as conv2d; MINIDNN_CUDA_CONV / set_conv_route).
  cuDNN applies only identity and relu: another activation on that route is
  cuDNN's identity epilogue, then the own activation kernel (routing.CudnnConv.post).
The own candidates of a shape are timed once at plan time (autotune.time_call)
when autotuning is on (MINIDNN_CUDA_AUTOTUNE), else a rule picks one.

conv2d_transpose runs ``tconv_f4`` or ``tconv_f1``: a gather (each output element
sums the inputs that land on it, no atomics), one thread per output pixel and 4 or 1
output channels; it has no cuDNN route.

``force_kernel`` (tests): the name of the conv_family.cu kernel a new plan must
use (ValueError when it cannot run the shape); it also keeps cuDNN out. It is part
of the plan keys, so plans made under one forced kernel never serve another.
"""
from __future__ import annotations

import numpy as np

from . import autotune, routing
from .autotune import time_call
from .kernels import Kernel, act_args, blocks, plans
from .memory import asarray, ptr
from .ops import activation

# conv_family.cu's blocking constants (tests/test_cuda_conv_family.py checks them)
DW_TH, DW_TW = 8, 32                # dw_tile: output rows x columns per block
DW_SMEM_MAX = 48 * 1024             # dw_tile's dynamic shared memory, at most
GCONV_CFGS = {                      # name: (BM filters, BN pixels) per block
    "gconv_64x64": (64, 64),
    "gconv_32x128": (32, 128),
    "gconv_16x256": (16, 256),
}
TCONV_FT = {"tconv_f4": 4, "tconv_f1": 1}   # output channels per thread
DW_KERNELS = ("dw_tile", "dw_direct")
DW_TILE_MIN_CO = 16                 # the rule without autotuning: dw_tile from Co >= 16
_MAX_GRID_YZ = 65535
_MAX_GRID_X = 2**31 - 1

force_kernel = None


def _check(cond, what):
    if not cond:
        raise ValueError(f"minidnn cuda: {what}")


def _f32c(a, label):
    _check(a.dtype == np.float32, f"{label} must be float32, got {a.dtype}")
    _check(a.flags.c_contiguous, f"{label} must be C-contiguous")


def _addr(a):
    """The device address of GPUArray a (0 for an empty one, which has no memory)."""
    g = a.gpudata
    return 0 if g is None else g.__int__()


def _no_overlap(a, y, op, label):
    ap, yp = _addr(a), _addr(y)
    _check(not (a.nbytes and y.nbytes and ap < yp + y.nbytes and yp < ap + a.nbytes),
           f"{op}: y overlaps {label}")


class _Plan:
    """One launch: ``k`` the Kernel (None: nothing to compute), ``args`` its arguments
    after (x, w, b, y), ``keep`` scratch the launch reads (the index table)."""

    __slots__ = ("k", "name", "args", "keep", "tuned_s")

    def __init__(self, k=None, name=None, args=(), keep=None):
        self.k, self.name, self.args, self.keep, self.tuned_s = k, name, args, keep, None


def _launch(plan, x, w, b, y):
    if plan.k is not None:
        plan.k(x.gpudata, w.gpudata, ptr(b), y.gpudata, *plan.args)


def _pick(cands, x, w, b, y, rule):
    """The plan to run among ``cands`` ({name: maker}): the forced kernel, else the
    fastest as timed (autotuning on, more than one), else ``rule``'s."""
    if force_kernel is not None:
        _check(force_kernel in cands, f"forced kernel {force_kernel!r} cannot run this shape "
                                      f"(candidates: {', '.join(cands)})")
        return cands[force_kernel]()
    if not autotune.AUTOTUNE or len(cands) == 1:
        return cands[rule if rule in cands else next(iter(cands))]()
    best, best_t = None, float("inf")
    for name, make in cands.items():
        p = make()
        t = time_call(lambda: _launch(p, x, w, b, y))
        if t < best_t:
            best, best_t = p, t
    best.tuned_s = best_t
    return best


# --------------------------------------------------------------------------- conv2d_grouped
def _grouped_geometry(x, w, b, y, sy, sx, py, px, dy, dx, G):
    op = "conv2d_grouped"
    _check(len(x.shape) == 4 and len(w.shape) == 4 and len(y.shape) == 4,
           f"{op} wants x (N,K,R,C), w (F,K/groups,nr,nc), y (N,F,Ro,Co)")
    N, K, R, C = map(int, x.shape)
    F, Kg, nr, nc = map(int, w.shape)
    _check(min(sy, sx) >= 1 and min(py, px) >= 0, f"{op}: strides >= 1, pads >= 0")
    _check(min(dy, dx) >= 1, f"{op}: dilations must be >= 1")
    _check(G >= 1 and K % G == 0 and F % G == 0,
           f"{op}: groups ({G}) must divide the input channels ({K}) and the filters ({F})")
    _check(Kg == K // G, f"{op}: w has {Kg} input channels per filter, x has {K} channels "
                         f"in {G} groups ({K // G} each)")
    _check(min(nr, nc, R, C) >= 1, f"{op}: empty filter or image")
    span_y, span_x = dy * (nr - 1) + 1, dx * (nc - 1) + 1
    _check(span_y <= R + 2 * py and span_x <= C + 2 * px,
           f"{op}: the {span_y}x{span_x} filter span is larger than the padded {R}x{C} input")
    Ro = 1 + (R + 2 * py - span_y) // sy
    Co = 1 + (C + 2 * px - span_x) // sx
    _check(tuple(y.shape) == (N, F, Ro, Co), f"{op}: y must be {(N, F, Ro, Co)}, got {y.shape}")
    _check(b is None or b.size == F, f"{op}: b must have {F} elements")
    for a, lab in ((x, "x"), (w, "w"), (y, "y")) + (((b, "b"),) if b is not None else ()):
        _f32c(a, f"{op} {lab}")
    _no_overlap(x, y, op, "x")
    _no_overlap(w, y, op, "w")
    _check(x.size < 2**31 and y.size < 2**31 and w.size < 2**31,
           f"{op}: tensors beyond 2**31 elements are not supported")
    return N, K, R, C, F, Kg, nr, nc, Ro, Co


def _dw_plans(x, w, y, geo, sy, sx, py, px, dy, dx, act):
    """{name: maker} of the depthwise kernels that can run the shape."""
    N, K, R, C, F, _, nr, nc, Ro, Co = geo
    code, p = act
    m = F // K
    out = {}
    sh_h = (DW_TH - 1) * sy + (nr - 1) * dy + 1
    sh_w = (DW_TW - 1) * sx + (nc - 1) * dx + 1
    smem = (sh_h * sh_w + nr * nc) * 4
    tiles_x, tiles_y = -(-Co // DW_TW), -(-Ro // DW_TH)
    nblocks = N * F * tiles_x * tiles_y
    if smem <= DW_SMEM_MAX and nblocks <= _MAX_GRID_X:
        def make_tile():
            # conv_family.cu: dw_tile(x, w, b, y, tiles_x, tiles_per_plane, K, R, C, F, m,
            # Ro, Co, nr, nc, sy, sx, py, px, dy, dx, sh_h, sh_w, act, act_p)
            k = Kernel("conv_family", "dw_tile", (nblocks,), (DW_TH * DW_TW,), shared=smem)
            return _Plan(k, "dw_tile", (tiles_x, tiles_x * tiles_y, K, R, C, F, m, Ro, Co, nr, nc,
                                        sy, sx, py, px, dy, dx, sh_h, sh_w, code, p))
        out["dw_tile"] = make_tile

    def make_direct():
        total = int(y.size)
        # conv_family.cu: dw_direct(x, w, b, y, total, K, R, C, F, m, Ro, Co, nr, nc,
        # sy, sx, py, px, dy, dx, act, act_p); a grid-stride loop covers any total
        k = Kernel("conv_family", "dw_direct", (min(blocks(total), _MAX_GRID_X),), (256,))
        return _Plan(k, "dw_direct", (total, K, R, C, F, m, Ro, Co, nr, nc, sy, sx, py, px,
                                      dy, dx, code, p))
    out["dw_direct"] = make_direct
    rule = "dw_tile" if Co >= DW_TILE_MIN_CO else "dw_direct"
    return out, rule


def _gconv_plans(x, w, y, geo, G, sy, sx, py, px, dy, dx, act):
    """{name: maker} of the grouped implicit-GEMM tiles, and the rule's choice (the
    least padded work; the larger tile on a tie)."""
    N, K, R, C, F, Kg, nr, nc, Ro, Co = geo
    _check((nr - 1) * dy < 65536 and (nc - 1) * dx < 65536,
           "conv2d_grouped: dilated filter span too large")
    _check(G <= _MAX_GRID_YZ, f"conv2d_grouped: at most {_MAX_GRID_YZ} groups on this route")
    code, p = act
    Fg = F // G
    Kd = Kg * nr * nc
    P = Ro * Co
    Ncols = N * P
    holder = {}

    def table():
        # q = (k, i, j) -> {k*R*C + i*dy*C + j*dx, (i*dy) << 16 | j*dx}
        if "tab" not in holder:
            q = np.arange(Kd, dtype=np.int64)
            k, rem = np.divmod(q, nr * nc)
            i, j = np.divmod(rem, nc)
            tab = np.empty((Kd, 2), dtype=np.int32)
            tab[:, 0] = k * R * C + i * dy * C + j * dx
            tab[:, 1] = ((i * dy) << 16) | (j * dx)
            holder["tab"] = asarray(tab)
        return holder["tab"]

    vec = int(P % 4 == 0 and _addr(y) % 16 == 0)
    out, work = {}, {}
    for name, (BM, BN) in GCONV_CFGS.items():
        gx, gy = -(-Ncols // BN), -(-Fg // BM)
        if gx > _MAX_GRID_X or gy > _MAX_GRID_YZ:
            continue

        def make(name=name, gx=gx, gy=gy):
            tab = table()
            # conv_family.cu's GCONV_ARGS: (x, w, b, y, tab, Fg, F, Kd, R, C, KRC, KgRC, Co,
            # P, Ncols, sy, sx, py, px, act, act_p, vec_store)
            k = Kernel("conv_family", name, (gx, gy, G), (256,))
            return _Plan(k, name, (tab.gpudata, Fg, F, Kd, R, C, K * R * C, Kg * R * C, Co, P,
                                   Ncols, sy, sx, py, px, code, p, vec), keep=tab)
        out[name] = make
        work[name] = (gx * BN * gy * BM, -BM)
    _check(out, "conv2d_grouped: the output is too large for the grouped kernels' grid")
    return out, min(work, key=work.__getitem__)


def _grouped_own(x, w, b, y, geo, sy, sx, py, px, dy, dx, G, act):
    K, Kg = geo[1], geo[5]
    if Kg == 1 and G == K:
        cands, rule = _dw_plans(x, w, y, geo, sy, sx, py, px, dy, dx, act)
    else:
        cands, rule = _gconv_plans(x, w, y, geo, G, sy, sx, py, px, dy, dx, act)
    return _pick(cands, x, w, b, y, rule)


def conv2d_grouped(x, w, b, y, stride_y, stride_x, pad_y, pad_x, dilation_y, dilation_x, groups,
                   act):
    """y (N,F,Ro,Co) = act(grouped, dilated cross-correlation of x (N,K,R,C) with
    w (F,K/groups,nr,nc) + b (F,) unless None): output channel f of group
    g = f // (F/groups) sums over input channels [g K/groups, (g+1) K/groups), tap (i, j)
    reading x[n, k, oy*stride_y - pad_y + i*dilation_y, ox*stride_x - pad_x + j*dilation_x]
    (zero outside); Ro = 1 + (R + 2 pad_y - (dilation_y (nr-1) + 1)) // stride_y.
    The own depthwise or grouped kernels or cuDNN, whichever was faster for the shape."""
    key = ("conv", "grouped", x.shape, w.shape, y.shape, b is None, stride_y, stride_x, pad_y,
           pad_x, dilation_y, dilation_x, groups, act, _addr(y) & 15, force_kernel)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _choose_grouped(x, w, b, y, int(stride_y), int(stride_x),
                                            int(pad_y), int(pad_x), int(dilation_y),
                                            int(dilation_x), int(groups),
                                            act_args(act, "conv2d_grouped"))
    if plan.__class__ is routing.CudnnConv:
        plan.conv2d_grouped(x, w, b, y, stride_y, stride_x, pad_y, pad_x, dilation_y, dilation_x,
                            groups)
        return
    if plan.k is not None:
        plan.k(x.gpudata, w.gpudata, ptr(b), y.gpudata, *plan.args)


def _choose_grouped(x, w, b, y, sy, sx, py, px, dy, dx, G, act):
    geo = _grouped_geometry(x, w, b, y, sy, sx, py, px, dy, dx, G)
    if y.size == 0:
        return _Plan()
    if force_kernel is not None:               # tests: the own kernel named, never cuDNN
        return _grouped_own(x, w, b, y, geo, sy, sx, py, px, dy, dx, G, act)
    key = routing.route_key(x.shape, w.shape, sy, sx, py, px, act, False, (dy, dx, G))

    def time_cudnn(via):
        return time_call(lambda: via.conv2d_grouped(x, w, b, y, sy, sx, py, px, dy, dx, G))
    return routing.choose(key, act,
                          make_own=lambda: _grouped_own(x, w, b, y, geo, sy, sx, py, px, dy, dx,
                                                        G, act),
                          time_own=lambda plan: time_call(lambda: _launch(plan, x, w, b, y)),
                          time_cudnn=time_cudnn, activation=activation)


# --------------------------------------------------------------------------- conv2d_transpose
def _transpose_plan(x, w, b, y, sy, sx, py, px, act):
    op = "conv2d_transpose"
    _check(len(x.shape) == 4 and len(w.shape) == 4 and len(y.shape) == 4,
           f"{op} wants x (N,K,R,C), w (K,F,nr,nc), y (N,F,Ro,Co)")
    N, K, R, C = map(int, x.shape)
    Kw, F, nr, nc = map(int, w.shape)
    _check(Kw == K, f"{op}: w has {Kw} input channels, x has {K}")
    _check(min(sy, sx) >= 1 and min(py, px) >= 0, f"{op}: strides >= 1, pads >= 0")
    _check(min(R, C, K, nr, nc) >= 1, f"{op}: empty input or filter")
    Ro = sy * (R - 1) + nr - 2 * py
    Co = sx * (C - 1) + nc - 2 * px
    _check(Ro >= 1 and Co >= 1, f"{op}: filter {nr}x{nc} with pad ({py}, {px}) leaves no output")
    _check(tuple(y.shape) == (N, F, Ro, Co), f"{op}: y must be {(N, F, Ro, Co)}, got {y.shape}")
    _check(b is None or b.size == F, f"{op}: b must have {F} elements")
    for a, lab in ((x, "x"), (w, "w"), (y, "y")) + (((b, "b"),) if b is not None else ()):
        _f32c(a, f"{op} {lab}")
    _no_overlap(x, y, op, "x")
    _no_overlap(w, y, op, "w")
    _check(x.size < 2**31 and y.size < 2**31 and w.size < 2**31,
           f"{op}: tensors beyond 2**31 elements are not supported")
    if y.size == 0:
        return _Plan()
    code, p = act
    npix = N * Ro * Co
    cands = {}
    for name, FT in TCONV_FT.items():
        gy = -(-F // FT)
        if gy > _MAX_GRID_YZ or (FT > 1 and F < FT // 2 and force_kernel != name):
            continue

        def make(name=name, gy=gy):
            # conv_family.cu's TCONV_ARGS: (x, w, b, y, npix, K, R, C, F, Ro, Co, nr, nc,
            # sy, sx, py, px, act, act_p)
            k = Kernel("conv_family", name, (blocks(npix), gy), (256,))
            return _Plan(k, name, (npix, K, R, C, F, Ro, Co, nr, nc, sy, sx, py, px, code, p))
        cands[name] = make
    _check(cands, f"{op}: too many output channels ({F}) for the grid")
    _check(blocks(npix) <= _MAX_GRID_X, f"{op}: output too large")
    return _pick(cands, x, w, b, y, "tconv_f4" if F >= 4 else "tconv_f1")


def conv2d_transpose(x, w, b, y, stride_y, stride_x, pad_y, pad_x, act):
    """y (N,F,Ro,Co) = act(the transposed convolution of x (N,K,R,C) with w (K,F,nr,nc)
    + b (F,) unless None) (dlib's cont_): x[n,k,i,j] w[k,f,a,c] summed into
    y[n, f, i*stride_y - pad_y + a, j*stride_x - pad_x + c] (dropped outside),
    Ro = stride_y (R-1) + nr - 2 pad_y. A gather: no atomics, every y element written once."""
    key = ("conv_transpose", x.shape, w.shape, y.shape, b is None, stride_y, stride_x, pad_y,
           pad_x, act, force_kernel)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _transpose_plan(x, w, b, y, int(stride_y), int(stride_x), int(pad_y),
                                            int(pad_x), act_args(act, "conv2d_transpose"))
    if plan.k is not None:
        plan.k(x.gpudata, w.gpudata, ptr(b), y.gpudata, *plan.args)


__all__ = ["conv2d_grouped", "conv2d_transpose"]

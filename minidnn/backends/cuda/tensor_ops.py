"""The catalogue's tensor and routing ops (minidnn/ops.py) on PyCUDA GPUArrays.

mul_scalar, mul (dlib's multiply_zero_padded), scale_channels, copy_range, l2normalize,
reorg and resize_bilinear, with the semantics and argument checks of the CPU kernels
(kernels/cpu/tensor.pyx); the kernels are kernels/cuda/tensor.cu. Also here: the plan of
ops.add for operands of other shapes (dlib's zero-padded tt::add, ``add_padded_plan``),
the block-per-row softmax plan for long rows (``softmax_rows_plan``, softmax_all), and
``view``, a C-contiguous GPUArray inside another one's memory (concat's zero copy:
core.Plan.alias).

As in ops.py: per shape (and per pointer fact that changes the launch: 16-byte alignment,
overlap) the first call builds a plan (prepared Kernel, grid, argument tuple, any scratch)
and caches it in kernels.plans; later calls do a dict lookup and launch. Argument checks
(shapes, dtypes, which buffers may share memory) run when a plan is built. Nothing
allocates or waits for the GPU in a call (l2normalize's scratch belongs to its plan), so
every op may be captured into a CUDA graph. Grids are capped (GRID_CAP blocks, 65535 in y)
and the kernels loop over the rest (grid-stride), so any size launches.
"""
from __future__ import annotations

import numpy as np

from .gpu import gpuarray
from .kernels import Kernel, blocks, plans
from .memory import aligned16, alloc, ptr

GRID_CAP = 65535          # blocks in x of a grid-stride launch (the kernels loop past it)
GRID_Y_CAP = 65535        # CUDA's limit on gridDim.y
_INT_MAX = 2**31 - 1
L2_BLOCK_MAX = 4096       # l2normalize: samples up to this many values take one block each
SOFTMAX_BLOCK_ROWS = 1024  # softmax rows (R*C == 1) from this length take a block per row


def _check(cond, what):
    if not cond:
        raise ValueError(f"minidnn cuda: {what}")


def _f32c(a, label):
    _check(a.dtype == np.float32, f"{label} must be float32, got {a.dtype}")
    _check(a.flags.c_contiguous, f"{label} must be C-contiguous")


def _grid(n, per=256):
    return min(blocks(n, per), GRID_CAP)


def _span(a):
    """(first byte, end byte) of GPUArray a's memory."""
    p = ptr(a)
    return p, p + a.nbytes


def _overlap(a, b):
    if a.nbytes == 0 or b.nbytes == 0:
        return False
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1


def _no_alias(y, x, what):
    _check(not _overlap(y, x), f"{what}: the output must not share memory with the input")


def _same_or_disjoint(y, x, what):
    _check(not _overlap(y, x) or ptr(y) == ptr(x),
           f"{what}: the output partially overlaps an input (only y is x is allowed)")


def _dims4(a, what):
    """The 4 dimensions of a (N, K, R, C) tensor (fewer dimensions padded with 1s, as dlib
    sees an (N, D) tensor: (N, D, 1, 1))."""
    s = tuple(int(d) for d in a.shape)
    _check(1 <= len(s) <= 4, f"{what}: expected (N, K, R, C), got shape {s}")
    s = s + (1,) * (4 - len(s))
    _check(max(s) <= _INT_MAX, f"{what}: dimension beyond 2**31 in {s}")
    return s


class _Plan:
    __slots__ = ("k", "args", "k2", "args2", "ws", "n")


# --------------------------------------------------------------------------- views
def view(a, offset, shape):
    """A C-contiguous float32 GPUArray of ``shape`` whose first element is element ``offset``
    of GPUArray ``a``'s memory (a's root buffer is kept alive through ``.base``). The Python
    side of concat's zero copy (core.Plan.alias): producers write straight into their slice
    of the output."""
    root = a
    while isinstance(getattr(root, "base", None), gpuarray.GPUArray):
        root = root.base
    shape = tuple(int(s) for s in shape)
    size = int(np.prod(shape, dtype=np.int64))
    start = (ptr(a) - ptr(root)) // 4 + int(offset)
    _check(a.dtype == np.float32 and 0 <= start and start + size <= root.size,
           f"view: {shape} at offset {offset} does not fit in an array of {root.size} values")
    return gpuarray.GPUArray(shape, np.float32, base=root, gpudata=ptr(root) + 4 * start)


def storage(a):
    """(root GPUArray owning a's memory, a's offset in it in elements)."""
    root = a
    while isinstance(getattr(root, "base", None), gpuarray.GPUArray):
        root = root.base
    return root, (ptr(a) - ptr(root)) // a.itemsize


# --------------------------------------------------------------------------- mul_scalar
def mul_scalar(x, y, val):
    """y = val * x elementwise (same shapes); y may be x."""
    vec = aligned16(x, y)
    key = ("mul_scalar", x.shape, y.shape, vec)
    p = plans.get(key)
    if p is None:
        _f32c(x, "mul_scalar x")
        _f32c(y, "mul_scalar y")
        _check(tuple(x.shape) == tuple(y.shape),
               f"mul_scalar: y has shape {tuple(y.shape)}, x has {tuple(x.shape)}")
        _same_or_disjoint(y, x, "mul_scalar")
        n = int(x.size)
        p = _Plan()
        # tensor.cu: mul_scalar_*(x, y, n, v)
        if vec and n % 4 == 0:
            p.k, p.n = Kernel("tensor", "mul_scalar_v4", (_grid(n // 4),), (256,)), n // 4
        else:
            p.k, p.n = Kernel("tensor", "mul_scalar_f", (_grid(n),), (256,)), n
        plans[key] = p
    if p.n:
        p.k(x.gpudata, y.gpudata, p.n, float(val))


# --------------------------------------------------------------------------- mul
def _padded_args(a, b, y, what):
    """The (n, K, R, C, Na, Ka, Ra, Ca, Nb, Kb, Rb, Cb) of a zero-padded elementwise op."""
    N, K, R, C = _dims4(y, what + " y")
    Na, Ka, Ra, Ca = _dims4(a, what + " a")
    Nb, Kb, Rb, Cb = _dims4(b, what + " b")
    _no_alias(y, a, what + " (operands of other shapes than y)")
    _no_alias(y, b, what + " (operands of other shapes than y)")
    return (int(y.size), K, R, C, Na, Ka, Ra, Ca, Nb, Kb, Rb, Cb)


def mul(a, b, y):
    """y[n,k,r,c] = a[n,k,r,c] * b[n,k,r,c] for every index of y (N,K,R,C), an operand
    without that index giving 0 (dlib's multiply_zero_padded); a, b, y may all have
    different shapes. With one shape for all three, y may be a or b."""
    vec = aligned16(a, b, y)
    key = ("mul", a.shape, b.shape, y.shape, vec)
    p = plans.get(key)
    if p is None:
        for t, lab in ((a, "a"), (b, "b"), (y, "y")):
            _f32c(t, "mul " + lab)
        p = _Plan()
        n = int(y.size)
        if tuple(a.shape) == tuple(b.shape) == tuple(y.shape):
            _same_or_disjoint(y, a, "mul")
            _same_or_disjoint(y, b, "mul")
            # tensor.cu: mul_*(a, b, y, n)
            if vec and n % 4 == 0:
                p.k, p.args = Kernel("tensor", "mul_v4", (_grid(n // 4),), (256,)), (n // 4,)
            else:
                p.k, p.args = Kernel("tensor", "mul_f", (_grid(n),), (256,)), (n,)
        else:
            _check(len(a.shape) == len(b.shape) == len(y.shape) == 4,
                   f"mul: operands of other shapes must be (N, K, R, C): a {tuple(a.shape)}, "
                   f"b {tuple(b.shape)}, y {tuple(y.shape)}")
            # tensor.cu: mul_padded(a, b, y, n, K, R, C, Na, Ka, Ra, Ca, Nb, Kb, Rb, Cb)
            p.k = Kernel("tensor", "mul_padded", (_grid(n),), (256,))
            p.args = _padded_args(a, b, y, "mul")
        p.n = n
        plans[key] = p
    if p.n:
        p.k(a.gpudata, b.gpudata, y.gpudata, *p.args)


# --------------------------------------------------------------------------- add, padded
def add_padded_plan(a, b, y, code, act_p):
    """ops.add's plan for operands of other shapes than y (dlib's zero-padded tt::add):
    y = act(a + b) for every index of y, an operand without that index counting as 0.
    Launched as ``p.k(a, b, y, *p.args)``; p.args[0] is the element count."""
    for t, lab in ((a, "a"), (b, "b"), (y, "y")):
        _f32c(t, "add " + lab)
    p = _Plan()
    n = int(y.size)
    # tensor.cu: add_padded(a, b, y, n, K, R, C, Na, Ka, Ra, Ca, Nb, Kb, Rb, Cb, act, act_p)
    p.k = Kernel("tensor", "add_padded", (_grid(n),), (256,))
    p.args = _padded_args(a, b, y, "add") + (code, act_p)
    return p


# --------------------------------------------------------------------------- scale_channels
def scale_channels(x, s, y):
    """y[n,k,r,c] = x[n,k,r,c] * s[n,k] for x, y (N,K,R,C) and s (N,K,1,1); y may be x."""
    vec = aligned16(x, y)
    key = ("scale_channels", x.shape, s.shape, y.shape, vec)
    p = plans.get(key)
    if p is None:
        for t, lab in ((x, "x"), (s, "s"), (y, "y")):
            _f32c(t, "scale_channels " + lab)
        _check(len(x.shape) == 4 and len(s.shape) == 4 and len(y.shape) == 4,
               "scale_channels wants x, y (N,K,R,C) and s (N,K,1,1)")
        _check(tuple(x.shape) == tuple(y.shape),
               f"scale_channels: y has shape {tuple(y.shape)}, x has {tuple(x.shape)}")
        N, K, R, C = (int(d) for d in x.shape)
        _check(tuple(s.shape) == (N, K, 1, 1),
               f"scale_channels: s must have shape {(N, K, 1, 1)}, got {tuple(s.shape)}")
        _same_or_disjoint(y, x, "scale_channels")
        _no_alias(y, s, "scale_channels")
        n, P = int(x.size), R * C
        p = _Plan()
        # tensor.cu: scale_channels_*(x, s, y, n, P)
        if vec and P % 4 == 0:
            p.k = Kernel("tensor", "scale_channels_v4", (_grid(n // 4),), (256,))
            p.args = (n // 4, P // 4)
        else:
            p.k = Kernel("tensor", "scale_channels_f", (_grid(n),), (256,))
            p.args = (n, max(P, 1))
        p.n = n
        plans[key] = p
    if p.n:
        p.k(x.gpudata, s.gpudata, y.gpudata, *p.args)


# --------------------------------------------------------------------------- copy_range
def copy_range(x, y, x_offset, y_offset, count):
    """For each sample n: y[n].flat[y_offset : y_offset+count] = x[n].flat[x_offset : ...];
    the rest of y is left as it is (concat_, extract_). x and y have the same number of
    samples; they may share memory only with one sample (then the ranges may overlap: a
    memmove)."""
    xp, yp = ptr(x), ptr(y)
    share = _overlap(x, y)
    # float4 copies need 16-byte aligned bases (the offsets are checked in the plan)
    # (when they share memory, the plan depends on where the ranges lie relative to each
    # other: their distance; None otherwise, never equal to a distance)
    key = ("copy_range", x.shape, y.shape, x_offset, y_offset, count, (xp | yp) & 15 == 0,
           (xp + 4 * x_offset) - (yp + 4 * y_offset) if share else None)
    p = plans.get(key)
    if p is None:
        p = plans[key] = _copy_range_plan(x, y, int(x_offset), int(y_offset), int(count), share)
    if p.n:
        p.k(xp + p.args2[0], yp + p.args2[1], *p.args)


def _copy_range_plan(x, y, xo, yo, cnt, share):
    _f32c(x, "copy_range x")
    _f32c(y, "copy_range y")
    _check(len(x.shape) >= 1 and len(y.shape) >= 1 and x.shape[0] == y.shape[0],
           f"copy_range: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same number "
           f"of samples (dimension 0)")
    _check(xo >= 0 and yo >= 0 and cnt >= 0,
           f"copy_range: offsets and count must be >= 0, got {xo}, {yo}, {cnt}")
    N = int(x.shape[0])
    Dx = int(x.size) // N if N else 0
    Dy = int(y.size) // N if N else 0
    _check(xo + cnt <= Dx and yo + cnt <= Dy,
           f"copy_range: range [{xo}, {xo + cnt}) of x's {Dx} values per sample or "
           f"[{yo}, {yo + cnt}) of y's {Dy} does not fit")
    _check(not share or N == 1, "copy_range: x and y share memory (allowed with one sample only)")
    p = _Plan()
    p.n = N * cnt
    xb, yb = ptr(x) + 4 * xo, ptr(y) + 4 * yo
    ranges_overlap = share and xb < yb + 4 * cnt and yb < xb + 4 * cnt
    if ranges_overlap:
        # the same sample's values moved within one buffer: one block, in chunk order
        # (tensor.cu: copy_range_overlap(x, y, count))
        p.k = Kernel("tensor", "copy_range_overlap", (1,), (1024,))
        p.args = (cnt,)
        p.args2 = (4 * xo, 4 * yo)
        p.n = cnt if xb != yb else 0            # a range onto itself: nothing to do
        return p
    vec = (ptr(x) | ptr(y)) & 15 == 0 and all(v % 4 == 0 for v in (Dx, Dy, xo, yo, cnt))
    w = 4 if vec else 1
    per = cnt // w
    gx = min(blocks(per), GRID_CAP)
    gy = min(max(N, 1), GRID_Y_CAP)
    # tensor.cu: copy_range_*(x + xo, y + yo, N, Dx, Dy, count) (in floats or float4s)
    if vec:
        p.k = Kernel("tensor", "copy_range_v4", (gx, gy), (256,))
    else:
        p.k = Kernel("tensor", "copy_range_f", (gx, gy), (256,))
    p.args = (N, Dx // w, Dy // w, per)
    p.args2 = (4 * xo, 4 * yo)
    return p


# --------------------------------------------------------------------------- l2normalize
def l2normalize(x, y, eps):
    """y[n] = x[n] / sqrt(eps + sum of x[n]^2) for each sample n of x, y (N,K,R,C) (dlib's
    inverse_norms then scale_rows); y may be x. The sum is in double, the scale
    (float)(1 / sqrt(sum + eps)) as the CPU kernel computes it."""
    key = ("l2normalize", x.shape, y.shape)
    p = plans.get(key)
    if p is None:
        p = plans[key] = _l2_plan(x, y)
    if p.n:
        e = float(eps)
        if p.k2 is None:
            p.k(x.gpudata, y.gpudata, *p.args, e)
        else:
            p.k(x.gpudata, p.ws.gpudata, *p.args)
            p.k2(x.gpudata, p.ws.gpudata, y.gpudata, *p.args2, e)


def _l2_plan(x, y):
    _f32c(x, "l2normalize x")
    _f32c(y, "l2normalize y")
    _check(tuple(x.shape) == tuple(y.shape),
           f"l2normalize: y has shape {tuple(y.shape)}, x has {tuple(x.shape)}")
    _same_or_disjoint(y, x, "l2normalize")
    N = int(x.shape[0]) if len(x.shape) else 1
    D = int(x.size) // N if N else 0
    _check(N <= _INT_MAX, "l2normalize: too many samples")
    p = _Plan()
    p.n, p.k2, p.ws = N * D, None, None
    if D <= L2_BLOCK_MAX:
        # tensor.cu: l2normalize_block(x, y, N, D, eps): a block per sample
        threads = 128 if D <= 2048 else 256
        p.k = Kernel("tensor", "l2normalize_block", (min(max(N, 1), GRID_CAP),), (threads,))
        p.args = (N, D)
        return p
    # two passes: B partial sums per sample (double scratch, owned by the plan), then scale
    B = int(min(64, -(-D // (256 * 16))))
    p.ws = alloc((max(N, 1) * B,), np.float64)
    gy = min(max(N, 1), GRID_Y_CAP)
    # tensor.cu: l2_partial(x, ws, N, D, B); l2_scale(x, ws, y, N, D, B, eps)
    p.k = Kernel("tensor", "l2_partial", (B, gy), (256,))
    p.args = (N, D, B)
    p.k2 = Kernel("tensor", "l2_scale", (min(blocks(D), 1024, GRID_CAP), gy), (256,))
    p.args2 = (N, D, B)
    return p


# --------------------------------------------------------------------------- reorg
def reorg(x, y, row_stride, col_stride):
    """dlib's reorg (space to depth): x (N,K,R,C) -> y (N, K*rs*cs, R/rs, C/cs) with
    y[n, (dr*cs + dc)*K + k, r, c] = x[n, k, r*rs + dr, c*cs + dc]."""
    key = ("reorg", x.shape, y.shape, row_stride, col_stride)
    p = plans.get(key)
    if p is None:
        rs, cs = int(row_stride), int(col_stride)
        _f32c(x, "reorg x")
        _f32c(y, "reorg y")
        _check(len(x.shape) == 4 and len(y.shape) == 4, "reorg wants x and y (N,K,R,C)")
        _check(rs >= 1 and cs >= 1,
               f"reorg: row_stride and col_stride must be >= 1, got {rs}, {cs}")
        N, K, R, C = (int(d) for d in x.shape)
        _check(R % rs == 0 and C % cs == 0,
               f"reorg: the input's rows and columns {(R, C)} must be multiples of the strides "
               f"{(rs, cs)}")
        want = (N, K * rs * cs, R // rs, C // cs)
        _check(tuple(y.shape) == want,
               f"reorg: expected the shape {want} for an input {tuple(x.shape)}, got "
               f"{tuple(y.shape)}")
        _check(K * rs * cs <= _INT_MAX, "reorg: too many output channels")
        _no_alias(y, x, "reorg")
        n = int(y.size)
        p = _Plan()
        # tensor.cu: reorg_f(x, y, n, K, R, C, Ko, Ro, Co, rs, cs)
        p.k = Kernel("tensor", "reorg_f", (_grid(n),), (256,))
        p.args = (n, K, R, C, K * rs * cs, R // rs, C // cs, rs, cs)
        p.n = n
        plans[key] = p
    if p.n:
        p.k(x.gpudata, y.gpudata, *p.args)


# --------------------------------------------------------------------------- resize_bilinear
def resize_bilinear(x, y):
    """Bilinear resize of each (n, k) plane of x (N,K,R,C) to y (N,K,Ro,Co), corners aligned
    as dlib's resize_image: output (i, j) samples input (i*sy, j*sx) with
    sy = (R-1)/max(Ro-1, 1), sx = (C-1)/max(Co-1, 1)."""
    key = ("resize_bilinear", x.shape, y.shape)
    p = plans.get(key)
    if p is None:
        _f32c(x, "resize_bilinear x")
        _f32c(y, "resize_bilinear y")
        _check(len(x.shape) == 4 and len(y.shape) == 4, "resize_bilinear wants x and y (N,K,R,C)")
        N, K, R, C = (int(d) for d in x.shape)
        _check(tuple(y.shape[:2]) == (N, K),
               f"resize_bilinear: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same "
               f"samples and channels (N, K)")
        _no_alias(y, x, "resize_bilinear")
        Ro, Co = int(y.shape[2]), int(y.shape[3])
        n = int(y.size)
        p = _Plan()
        p.n = n if R * C else 0
        sy = (R - 1) / float(Ro - 1 if Ro > 1 else 1)
        sx = (C - 1) / float(Co - 1 if Co > 1 else 1)
        # tensor.cu: resize_bilinear_f(x, y, n, R, C, Ro, Co, sy, sx)
        p.k = Kernel("tensor", "resize_bilinear_f", (_grid(n),), (256,))
        p.args = (n, R, C, Ro, Co, sy, sx)
        plans[key] = p
    if p.n:
        p.k(x.gpudata, y.gpudata, *p.args)


# --------------------------------------------------------------------------- softmax, long rows
def softmax_rows_plan(N, K):
    """ops.softmax's plan for rows of K >= SOFTMAX_BLOCK_ROWS contiguous values (R*C == 1,
    softmax_all's view of a sample): a block per row, where softmax.cu's warp per row
    would leave most of the GPU idle. Launched as ``p.k(x, y, *p.args)``."""
    p = _Plan()
    # tensor.cu: softmax_rows_block(x, y, N, K)
    threads = 1024 if K >= 65536 else 256
    p.k = Kernel("tensor", "softmax_rows_block", (min(max(N, 1), GRID_CAP),), (threads,))
    p.args = (N, K)
    p.n = N * K
    return p

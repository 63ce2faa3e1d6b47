"""The image ops of dlib's input layers on the GPU (kernels/cuda/image.cu).

``tiled_pyramid(x, rects)`` and ``resize_image_u8(img, out)`` are the OPTIONAL ops of
minidnn/ops.py with the CPU backend's signatures and results (kernels/cpu/image.pyx, dlib's
arithmetic bit for bit): the same float32/float64 operations in the same order, written in
image.cu as round-to-nearest intrinsics so that nothing is contracted into an FMA.

``image_pyramid(imgs, means, rects, shape, sizes)`` is what the pyramid input layers
(minidnn/layers/input.py) call on a "cuda" net: the host uint8 images are uploaded once,
enlarged by pyramid_up on the GPU (``sizes``: the image size after each pyramid_up),
written as float planes minus the means into rects[0] of an (N, K, R, C) tensor whose
other pixels are zero, and every further level is resized from the one before it.

Plans. A resize's geometry (per destination column: the source columns and weights dlib's
simd4f code accumulates in float32 over groups of four columns, or its scalar tail's; per
destination row: the source rows and weights) depends only on the sizes: it is computed
once per shape on the host (``resize_tables``, the CPU kernel's arithmetic in NumPy
float32/float64 scalars), uploaded, and kept in kernels.plans with the prepared launches.
A call looks its plan up and launches: the levels with at least BLOCK_LEVEL_PIXELS
destination pixels per plane one launch each (a thread per pixel), the smaller ones
together in one launch with one block per plane (levels in order, __syncthreads between).

Buffers. image_pyramid's device buffers (the uploaded images, the pyramid_up images, the
tensor) are per thread and per shape (nets serve from many threads, all launching on the
backend's one stream), allocated at the first call of a shape and reused: the tensor
returned is valid until the same thread's next image_pyramid call of that shape (the
forward copies it into the program's input first, in stream order). The tensor is zeroed
when it is allocated; the kernels write only the level rectangles, so the gaps stay zero.
"""
from __future__ import annotations

import threading

import numpy as np

from .gpu import drv, serialized, stream
from .kernels import Kernel, blocks, plans
from .image_geometry import resize_tables
from .memory import alloc

LV = 11                           # ints per level descriptor (image.cu)
BLOCK_LEVEL_PIXELS = 4096         # levels smaller than this (per plane) share one launch
THREADS = 256
BLOCK_THREADS = 512               # pyramid_levels_block's threads per plane
CACHED_SHAPES = 4                 # image_pyramid buffers kept per thread


def _check(cond, what):
    if not cond:
        raise ValueError(f"minidnn cuda: {what}")


def _table(a):
    """A new GPUArray holding the NumPy table a, its dtype kept (memory.asarray would make
    the float64 weights float32)."""
    a = np.ascontiguousarray(a)
    out = alloc(a.shape, a.dtype)
    if a.size:
        drv.memcpy_htod(out.gpudata, a)       # synchronous, as memory.asarray's copy
    return out


def _rects(rects, plane_rows, plane_cols, what):
    out = []
    for q in rects:
        try:
            l, t, r, b = (int(v) for v in q)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{what}: expected rectangles (left, top, right, bottom), "
                             f"got {q!r}") from None
        if not (0 <= l <= r < plane_cols and 0 <= t <= b < plane_rows):
            raise ValueError(f"{what}: rectangle {(l, t, r, b)} is not inside the "
                             f"{plane_rows} x {plane_cols} plane")
        out.append((l, t, r, b))
    return tuple(out)


# --------------------------------------------------------------------------- tiled_pyramid
class _PyramidPlan:
    """The levels of one (shape, rects): tables on the GPU and the prepared launches."""

    __slots__ = ("launches", "keep")

    def __init__(self, shape, rs):
        N, K, R, C = shape
        planes, plane = N * K, R * C
        lv, cis, cfs, ris, rfs, rds = [], [], [], [], [], []
        co = ro = 0
        for i in range(1, len(rs)):
            (sl, stp, sr, sb), (dl, dtp, dr, db) = rs[i - 1], rs[i]
            snr, snc, dnr, dnc = sb - stp + 1, sr - sl + 1, db - dtp + 1, dr - dl + 1
            nvec, ci, cf, _, ri, rf, rd = resize_tables(snr, snc, dnr, dnc)
            lv.append((sl, stp, snr, snc, dl, dtp, dnr, dnc, co, ro, nvec))
            cis.append(ci), cfs.append(cf), ris.append(ri), rfs.append(rf), rds.append(rd)
            co += dnc
            ro += dnr
        self.launches = []
        self.keep = ()
        if not lv:
            return
        g = [_table(np.array(lv, np.int32).ravel()), _table(np.concatenate(cis).ravel()),
             _table(np.concatenate(cfs).ravel()), _table(np.concatenate(ris).ravel()),
             _table(np.concatenate(rfs).ravel()), _table(np.concatenate(rds).ravel())]
        self.keep = tuple(g)                      # the tables live as long as the plan
        tables = tuple(a.gpudata for a in g)
        # image.cu: pyramid_level(x, lv, ci, cf, ri, rf, rd, level, planes, plane, C)
        #           pyramid_levels_block(x, lv, ci, cf, ri, rf, rd, first, last, plane, C)
        L = len(lv)
        first_small = L
        for i, d in enumerate(lv):
            if d[6] * d[7] < BLOCK_LEVEL_PIXELS:
                first_small = i
                break
            k = Kernel("image", "pyramid_level", (blocks(planes * d[6] * d[7], THREADS),),
                       (THREADS,))
            self.launches.append((k, tables + (i, planes, plane, C)))
        if first_small < L:
            k = Kernel("image", "pyramid_levels_block", (planes,), (BLOCK_THREADS,))
            self.launches.append((k, tables + (first_small, L, plane, C)))

    def run(self, xp):
        for k, args in self.launches:
            k(xp, *args)


def _pyramid_plan(x, rects):
    try:
        key = ("tiled_pyramid", x.shape, tuple(rects))
        plan = plans.get(key)
    except TypeError:                             # unhashable rectangles (lists, arrays)
        key, plan = None, None
    if plan is None:
        _check(len(x.shape) == 4, f"tiled_pyramid: x must be (N, K, R, C), got {x.shape}")
        _check(x.dtype == np.float32, f"tiled_pyramid x must be float32, got {x.dtype}")
        _check(x.flags.c_contiguous, "tiled_pyramid x must be C-contiguous")
        N, K, R, C = (int(s) for s in x.shape)
        _check(N * K * R * C < 2**31, "tiled_pyramid: tensors beyond 2**31 elements are not "
                                      "supported")
        rs = _rects(rects, R, C, "tiled_pyramid")
        if key is None:
            key = ("tiled_pyramid", x.shape, rs)
            plan = plans.get(key)
        if plan is None:
            plan = plans[key] = _PyramidPlan((N, K, R, C), rs)
    return plan


@serialized
def tiled_pyramid(x, rects):
    """In place on x (N,K,R,C) whose rectangle rects[0] (left, top, right, bottom,
    inclusive) holds level 0 of a tiled image pyramid: each rects[i], i >= 1, of every
    plane becomes dlib's bilinear resize of rects[i-1] (create_tiled_pyramid, bit for bit
    with the CPU backend)."""
    plan = _pyramid_plan(x, rects)
    if plan.launches and x.size:
        plan.run(x.gpudata)


# --------------------------------------------------------------------------- resize_image_u8
class _ResizePlan:
    """One uint8 resize shape (N images snr x snc x ch -> dnr x dnc x ch)."""

    __slots__ = ("k", "args", "keep")

    def __init__(self, N, snr, snc, dnr, dnc, ch):
        nvec, ci, cf, cd, ri, rf, rd = resize_tables(snr, snc, dnr, dnc)
        g = [_table(a.ravel()) for a in (ci, cf, cd, ri, rf, rd)]
        self.keep = tuple(g)
        # image.cu: resize_u8(src, dst, N, snr, snc, dnr, dnc, ch, nvec, ci, cf, cd, ri, rf, rd)
        self.k = Kernel("image", "resize_u8", (blocks(N * dnr * dnc, THREADS),), (THREADS,))
        self.args = (N, snr, snc, dnr, dnc, ch, nvec) + tuple(a.gpudata for a in g)


def _resize_plan(N, snr, snc, dnr, dnc, ch):
    key = ("resize_image_u8", N, snr, snc, dnr, dnc, ch)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _ResizePlan(N, snr, snc, dnr, dnc, ch)
    return plan


@serialized
def resize_image_u8(img, out):
    """out = dlib's bilinear resize_image of img, for uint8 GPUArrays (H,W,3) RGB or (H,W)
    grayscale (out (H2,W2[,3]) of the same kind; dlib's pyramid_up; bit for bit with the
    CPU backend)."""
    nd = len(img.shape)
    if nd not in (2, 3) or len(out.shape) != nd or (nd == 3 and (img.shape[2] != 3 or
                                                                 out.shape[2] != 3)):
        raise ValueError(f"resize_image_u8: expected (H, W, 3) or (H, W) images of one kind, "
                         f"got {tuple(img.shape)} and {tuple(out.shape)}")
    for a, what in ((img, "img"), (out, "out")):
        if a.dtype != np.uint8 or not a.flags.c_contiguous:
            raise ValueError(f"resize_image_u8 {what}: expected a C-contiguous uint8 array")
    if img.gpudata.__int__() == out.gpudata.__int__() and img.size:
        raise ValueError("resize_image_u8: the output must not share memory with the input")
    snr, snc, dnr, dnc = (int(v) for v in (img.shape[0], img.shape[1], out.shape[0],
                                           out.shape[1]))
    if snr * snc == 0 or dnr * dnc == 0:
        return
    ch = 3 if nd == 3 else 1
    _check(max(snr * snc, dnr * dnc) * ch < 2**31, "resize_image_u8: images beyond 2**31 "
                                                   "bytes are not supported")
    p = _resize_plan(1, snr, snc, dnr, dnc, ch)
    p.k(img.gpudata, out.gpudata, *p.args)


# --------------------------------------------------------------------------- image_pyramid
class _Buffers:
    """One thread's device buffers for one image_pyramid shape."""

    __slots__ = ("src", "ups", "x", "nbytes")

    def __init__(self, N, sizes, ch, shape):
        h, w = sizes[0]
        self.nbytes = h * w * ch
        self.src = alloc((N * self.nbytes,), np.uint8)
        self.ups = [alloc((N * hh * ww * ch,), np.uint8) for hh, ww in sizes[1:]]
        self.x = alloc(shape, np.float32)
        drv.memset_d32_async(self.x.gpudata, 0, int(self.x.size), stream)


class _ImagePlan:
    """The launches of one image_pyramid shape (shared by every thread)."""

    __slots__ = ("ups", "planes", "planes_args", "pyramid")

    def __init__(self, N, sizes, ch, means, rects, shape):
        self.ups = [_resize_plan(N, a[0], a[1], b[0], b[1], ch)
                    for a, b in zip(sizes[:-1], sizes[1:])]
        Nx, K, R, C = shape
        h, w = sizes[-1]
        l, t, r, b = rects[0]
        _check((r - l + 1, b - t + 1) == (w, h),
               f"image_pyramid: rects[0] {rects[0]} does not hold a {h} x {w} image")
        # image.cu: image_planes(img, x, N, H, W, ch, R, C, left, top, m0, m1, m2)
        self.planes = Kernel("image", "image_planes", (blocks(N * h * w, THREADS),), (THREADS,))
        m = [float(np.float32(v)) for v in means] + [0.0] * (3 - len(means))
        self.planes_args = (N, h, w, ch, R, C, l, t, m[0], m[1], m[2])
        self.pyramid = _PyramidPlan(shape, rects)


_tls = threading.local()


@serialized
def image_pyramid(imgs, means, rects, shape, sizes):
    """The tiled pyramid tensor (N, K, R, C) of ``imgs`` on the GPU (a GPUArray owned by
    this thread's cache: valid until its next call for the same shape).

    imgs: N host uint8 images of one size, C-contiguous, (H, W, 3) for K = 3 or (H, W) for
    K = 1; means: the K values subtracted before the division by 256 (zeros for the
    grayscale layers); rects: the level rectangles (tiled_pyramid_rects of the final
    image size); sizes: [(H, W), then the size after each pyramid_up] (one entry: no
    upsampling)."""
    N = len(imgs)
    K = int(shape[1])
    ch = 3 if K == 3 else 1
    key = ("image_pyramid", N, tuple(sizes), ch, tuple(means), tuple(rects), tuple(shape))
    plan = plans.get(key)
    if plan is None:
        _check(N >= 1 and int(shape[0]) == N, f"image_pyramid: {N} images for a batch of "
                                             f"{shape[0]}")
        _check(K in (1, 3) and len(means) == K, f"image_pyramid: {K} channels, means {means}")
        _check(int(np.prod(shape)) < 2**31, "image_pyramid: tensors beyond 2**31 elements are "
                                            "not supported")
        rs = _rects(rects, int(shape[2]), int(shape[3]), "image_pyramid")
        plan = plans[key] = _ImagePlan(N, [tuple(s) for s in sizes], ch, means, rs,
                                       tuple(int(s) for s in shape))
    cache = getattr(_tls, "bufs", None)
    if cache is None:
        cache = _tls.bufs = {}
    buf = cache.get(key)
    if buf is None:
        if len(cache) >= CACHED_SHAPES:
            stream.synchronize()                  # nothing queued may still use them
            del cache[next(iter(cache))]
        buf = cache[key] = _Buffers(N, sizes, ch, tuple(int(s) for s in shape))
    h, w = sizes[0]
    for i, a in enumerate(imgs):
        _check(a.dtype == np.uint8 and a.shape[:2] == (h, w) and a.size * 1 == buf.nbytes and
               a.flags.c_contiguous, f"image_pyramid: image {i} is not a C-contiguous uint8 "
                                     f"{h} x {w} x {ch} image")
        if i == 0:
            drv.memcpy_htod_async(buf.src.gpudata, a, stream)
        else:
            drv.memcpy_htod_async(buf.src.gpudata.__int__() + i * buf.nbytes, a, stream)
    src = buf.src.gpudata
    for p, dst in zip(plan.ups, buf.ups):
        p.k(src, dst.gpudata, *p.args)
        src = dst.gpudata
    xp = buf.x.gpudata
    plan.planes(src, xp, *plan.planes_args)
    plan.pyramid.run(xp)
    return buf.x

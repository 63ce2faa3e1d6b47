"""The geometry of dlib's bilinear resize_image, as tables for kernels/cuda/image.cu.

For an snr x snc -> dnr x dnc resize, ``resize_tables`` computes what kernels/cpu/image.pyx
computes per row and per column (the same float32 and float64 operations, in NumPy
scalars, in the same order): for each destination column the two source columns and the
weights of dlib's float32 lanes (the source position accumulated in float32 over groups of
four columns, truncated) or of its scalar tail (double positions); for each destination
row the two source rows and their weights. They depend only on the sizes, so the CUDA
backend (image_ops.py) computes them once per shape and the kernels only read them.

GPU-free and without package-relative imports (like source.py): tests load it by path.
"""
import math

import numpy as np

_f32 = np.float32
_ONE = np.float32(1.0)


def resize_tables(snr, snc, dnr, dnc):
    """dlib's resize_image geometry for an snr x snc -> dnr x dnc resize, as image.pyx
    computes it: (nvec, ci (dnc, 2) int32 [left, right], cf (dnc, 2) float32 [wl, wr],
    cd (dnc,) float64 [the tail's lr_frac], ri (dnr, 2) int32 [top, bottom],
    rf (dnr, 2) float32 [1 - tb_frac, tb_frac], rd (dnr, 2) float64 [the same in double]).
    Columns c < nvec are dlib's float32 lanes, the others its scalar tail."""
    ci = np.zeros((dnc, 2), np.int32)
    cf = np.zeros((dnc, 2), np.float32)
    cd = np.zeros(dnc, np.float64)
    x_scale = (snc - 1) / float(dnc - 1 if dnc - 1 > 1 else 1)
    x = -4 * x_scale
    fxs = _f32(4 * x_scale)
    lx = [_f32(x), _f32(x + x_scale), _f32(x + 2 * x_scale), _f32(x + 3 * x_scale)]
    c = 0
    while True:
        fl, lr = [0] * 4, [_f32(0)] * 4
        for j in range(4):
            lx[j] = _f32(lx[j] + fxs)
            fl[j] = int(lx[j])                       # truncation, as _mm_cvttps_epi32
            lr[j] = _f32(lx[j] - _f32(fl[j]))
        if fl[3] + 1 >= snc or c + 3 >= dnc:
            break
        for j in range(4):
            ci[c + j] = (fl[j], fl[j] + 1)
            cf[c + j] = (_f32(_ONE - lr[j]), lr[j])
        c += 4
    nvec = c
    x = -x_scale + c * x_scale
    for c in range(nvec, dnc):
        x += x_scale
        left = math.floor(x)
        right = left + 1 if left + 1 < snc - 1 else snc - 1
        lrd = x - left
        lrf = _f32(lrd)
        ci[c] = (left, right)
        cf[c] = (_f32(_ONE - lrf), lrf)
        cd[c] = lrd
    ri = np.zeros((dnr, 2), np.int32)
    rf = np.zeros((dnr, 2), np.float32)
    rd = np.zeros((dnr, 2), np.float64)
    y_scale = (snr - 1) / float(dnr - 1 if dnr - 1 > 1 else 1)
    y = -y_scale
    for r in range(dnr):
        y += y_scale
        top = math.floor(y)
        bottom = top + 1 if top + 1 < snr - 1 else snr - 1
        tb = y - top
        ri[r] = (top, bottom)
        rf[r] = (_f32(1 - tb), _f32(tb))
        rd[r] = (1 - tb, tb)
    return nvec, ci, cf, cd, ri, rf, rd

"""GPU benchmark of the convolution family: conv2d_grouped (MobileNet's depthwise layers,
grouped and dilated convolutions) and conv2d_transpose, each own kernel of
kernels/cuda/conv_family.cu (forced) against cuDNN's grouped/dilated convolution, fp32.

    python3 bench/bench_gpu_conv_family.py [--json PATH]

Per shape and batch (1 and 64): microseconds per call of every own kernel that can run
it, of cuDNN (the backend's cuDNN route: its own activation kernel after cuDNN where
the activation is not relu), and which route "auto" picked; each timing is
autotune.time_call (the larger of GPU and host time per call, as the router compares
them). With --json (default: $OUT/gpu_conv_family.json when $OUT is set) writes the
numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the checkout's minidnn

import minidnn  # noqa: E402,F401  (registers the activation names)
from minidnn import ops  # noqa: E402
from minidnn.backends import cuda as cu  # noqa: E402
from minidnn.backends.cuda import autotune, conv_family, kernels  # noqa: E402

RELU6 = ops.Act(10, 6.0)
# (label, x shape, w shape, stride, pad, dilation, groups)
GROUPED = []
for K, H, s in ((32, 112, 1), (64, 112, 2), (128, 56, 1), (128, 56, 2), (256, 28, 1),
                (256, 28, 2), (512, 14, 1), (512, 14, 2), (1024, 7, 1)):
    GROUPED.append((f"dw3x3 s{s} {K}x{H}", (K, H, H), (K, 1, 3, 3), s, 1, 1, K))
GROUPED += [
    ("dw3x3 x2 mult", (64, 56, 56), (128, 1, 3, 3), 1, 1, 1, 64),
    ("dw5x5 s2", (240, 28, 28), (240, 1, 5, 5), 2, 2, 1, 240),
    ("resnext g32", (256, 56, 56), (256, 8, 3, 3), 1, 1, 1, 32),
    ("grouped g4", (128, 28, 28), (128, 32, 3, 3), 1, 1, 1, 4),
    ("dilated d2", (256, 28, 28), (256, 256, 3, 3), 1, 2, 2, 1),
    ("dilated dw d3", (128, 28, 28), (128, 1, 3, 3), 1, 3, 3, 128),
]
# (label, x shape, w shape, stride, pad)
TRANSPOSED = [
    ("unet up 2x2 s2 512->256 28", (512, 28, 28), (512, 256, 2, 2), 2, 0),
    ("unet up 2x2 s2 128->64 112", (128, 112, 112), (128, 64, 2, 2), 2, 0),
    ("dcgan 4x4 s2 p1 256->128 16", (256, 16, 16), (256, 128, 4, 4), 2, 1),
    ("3x3 s1 p1 64->64 56", (64, 56, 56), (64, 64, 3, 3), 1, 1),
]


def _time(fn):
    fn()
    cu.synchronize()
    return autotune.time_call(fn) * 1e6


def bench_grouped(batch, rows):
    rng = np.random.default_rng(0)
    for label, xs, ws, s, p, d, g in GROUPED:
        x = cu.asarray(rng.standard_normal((batch,) + xs).astype(np.float32))
        w = cu.asarray(rng.standard_normal(ws).astype(np.float32))
        b = cu.asarray(rng.standard_normal(ws[0]).astype(np.float32))
        span = d * (ws[2] - 1) + 1
        ho = 1 + (xs[1] + 2 * p - span) // s
        wo = 1 + (xs[2] + 2 * p - span) // s
        y = cu.empty((batch, ws[0], ho, wo))
        row = {"op": "conv2d_grouped", "shape": label, "batch": batch}
        depthwise = ws[1] == 1 and g == xs[0]
        names = conv_family.DW_KERNELS if depthwise else tuple(conv_family.GCONV_CFGS)
        for name in names:
            conv_family.force_kernel = name
            try:
                row[name] = _time(lambda: cu.conv2d_grouped(x, w, b, y, s, s, p, p, d, d, g,
                                                            RELU6))
            except ValueError:
                row[name] = None
        conv_family.force_kernel = None
        if cu.use_cudnn():
            cu.set_conv_route("cudnn")
            try:
                row["cudnn"] = _time(lambda: cu.conv2d_grouped(x, w, b, y, s, s, p, p, d, d, g,
                                                               RELU6))
            except Exception as e:      # cuDNN cannot run it
                row["cudnn"] = f"failed: {e}"
        cu.set_conv_route("auto")
        cu.conv2d_grouped(x, w, b, y, s, s, p, p, d, d, g, RELU6)
        row["auto"] = cu.conv_route(x.shape, w.shape, s, s, p, p, RELU6, dilation=(d, d),
                                    groups=g)
        rows.append(row)
        print(row, flush=True)


def bench_transposed(batch, rows):
    rng = np.random.default_rng(1)
    for label, xs, ws, s, p in TRANSPOSED:
        x = cu.asarray(rng.standard_normal((batch,) + xs).astype(np.float32))
        w = cu.asarray(rng.standard_normal(ws).astype(np.float32))
        b = cu.asarray(rng.standard_normal(ws[1]).astype(np.float32))
        y = cu.empty((batch, ws[1], s * (xs[1] - 1) + ws[2] - 2 * p,
                      s * (xs[2] - 1) + ws[3] - 2 * p))
        row = {"op": "conv2d_transpose", "shape": label, "batch": batch}
        for name in conv_family.TCONV_FT:
            conv_family.force_kernel = name
            row[name] = _time(lambda: cu.conv2d_transpose(x, w, b, y, s, s, p, p, ops.RELU))
        conv_family.force_kernel = None
        rows.append(row)
        print(row, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ["OUT"], "gpu_conv_family.json")
                    if os.environ.get("OUT") else None)
    a = ap.parse_args()
    rows = []
    for batch in (1, 64):
        bench_grouped(batch, rows)
        bench_transposed(batch, rows)
        kernels.plans.clear()
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Depthwise convolution speed on the CPU (issue 12): is it at memory speed, and is a fused
activation free?

1. The depthwise 3x3 convolution (conv2d_grouped with groups == channels, the
   depthwise route, bias + relu6 epilogue) on MobileNet-v2's shapes at 224x224,
   batch 1: 32..960 channels at 112..7 pixels, strides 1 and 2. Its bytes are the
   input and output it must read and write (x + y + w + b); GB/s = bytes / time,
   against a plain NumPy copy (np.copyto) of the same number of bytes (half read,
   half written), timed in the same windows. "vs copy" = copy time / conv time
   (1.0: as fast as copying its bytes).
2. A fused con + activation against the con alone: the same convolution with the
   identity epilogue, relu, relu6 (clipped_relu) and silu, for the depthwise 3x3 and
   for a 1x1 pointwise conv (conv2d, 144 -> 24 at 56x56) of the same net; "cost" =
   time with the activation / time without (1.0: free).

The machine is shared and noisy: every measurement is the median over interleaved
windows (conv, copy, conv, copy ...) in which other processes used < 10% of the CPUs
(bench_cpu.py's rule; the 3 quietest when fewer were quiet: a 2-thread region waits
for a descheduled thread), and the result records the load average.

    python bench/bench_depthwise.py [--threads 2 1] [--windows 25] [--out bench/results/depthwise.json]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import minidnn as dnn                                    # noqa: E402
from minidnn import _cpu_depthwise, ops                  # noqa: E402
from minidnn.backends import cpu                         # noqa: E402
from bench_cpu import _busy_ticks, _own_ticks, _HZ, machine, versions  # noqa: E402

# MobileNet-v2 (224x224) depthwise layers: (channels, input size, stride)
SHAPES = [(32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (192, 28, 2),
          (384, 14, 1), (576, 14, 1), (576, 14, 2), (960, 7, 1)]
ACTS = [("identity", ops.IDENTITY), ("relu", ops.RELU), ("relu6", ops.act_by_name("clipped_relu", 6.0)),
        ("silu", ops.act_by_name("silu"))]


def _time(fn, min_s=0.02):
    """(seconds per call of fn, the share of the CPUs other processes used meanwhile):
    as many calls as fill min_s, their mean."""
    fn()
    n, b0, o0, t0 = 0, _busy_ticks(), _own_ticks(), time.perf_counter()
    while True:
        fn()
        n += 1
        t = time.perf_counter() - t0
        if t >= min_s:
            break
    b1, o1 = _busy_ticks(), _own_ticks()
    others = None if b0 is None else max(0.0, ((b1 - b0) - (o1 - o0)) / (t * _HZ * (os.cpu_count() or 1)))
    return t / n, others


def _interleaved(fns, windows):
    """Median seconds per call of each fn over alternating windows, keeping the windows in
    which other processes used < 10% of the CPUs (at least the 3 quietest); the count of
    quiet windows is returned too."""
    samples = []
    for _ in range(windows):
        samples.append([_time(f) for f in fns])
    noise = [max((o or 0.0) for _, o in row) for row in samples]
    quiet = [row for row, q in zip(samples, noise) if q < 0.10]
    kept = quiet if len(quiet) >= 3 else [samples[i] for i in np.argsort(noise)[:3]]
    return [float(np.median([row[i][0] for row in kept])) for i in range(len(fns))], len(quiet)


def depthwise_case(k, size, stride, act):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((1, k, size, size)).astype(np.float32)
    w = rng.standard_normal((k, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    out = (size + 2 - 3) // stride + 1
    y = np.empty((1, k, out, out), np.float32)
    nbytes = x.nbytes + y.nbytes + w.nbytes + b.nbytes

    def run(a=act):
        cpu.conv2d_grouped(x, w, b, y, stride, stride, 1, 1, 1, 1, k, a)
    return run, nbytes, (x, w, b, y)


def run_at(nt, windows):
    """Both tables at nt threads: (depthwise rows, total, fused rows)."""
    cpu.set_num_threads(nt)
    print(f"depthwise 3x3 + bias + relu6, batch 1, {nt} thread{'s' if nt > 1 else ''} "
          f"(median of {windows} interleaved windows)\n")
    print("| channels | in | stride | out | MB | ms | GB/s | copy GB/s | vs copy | quiet |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    relu6 = ACTS[2][1]
    for k, size, stride in SHAPES:
        run, nbytes, (x, w, b, y) = depthwise_case(k, size, stride, relu6)
        src = np.empty(nbytes // 8, np.float32)
        dst = np.empty_like(src)
        (t_conv, t_copy), quiet = _interleaved([run, lambda: np.copyto(dst, src)], windows)
        r = dict(threads=nt, channels=k, size=size, stride=stride, out=y.shape[2], bytes=nbytes,
                 ms=t_conv * 1e3, gbs=nbytes / t_conv / 1e9, copy_gbs=nbytes / t_copy / 1e9,
                 vs_copy=t_copy / t_conv, quiet_windows=quiet,
                 variant=_cpu_depthwise._dw_plan_for(x.shape, w.shape, stride, stride, 1, 1))
        rows.append(r)
        print(f"| {k} | {size} | {stride} | {r['out']} | {nbytes / 1e6:.2f} | {r['ms']:.3f} | "
              f"{r['gbs']:.1f} | {r['copy_gbs']:.1f} | {r['vs_copy']:.2f} | {quiet} |", flush=True)
    total_conv = sum(r["ms"] for r in rows)
    total_copy = sum(r["bytes"] / r["copy_gbs"] / 1e6 for r in rows)
    total = dict(threads=nt, conv_ms=total_conv, copy_ms=total_copy, vs_copy=total_copy / total_conv)
    print(f"\nall {len(rows)} layers: {total_conv:.3f} ms, copying their bytes {total_copy:.3f} ms "
          f"(vs copy {total_copy / total_conv:.2f})\n")

    print("fused activation vs the convolution alone (cost = ms with / ms without)\n")
    print("| conv | act | ms | cost | quiet |")
    print("| --- | --- | --- | --- | --- |")
    fused = []
    rng = np.random.default_rng(0)
    xp = rng.standard_normal((1, 144, 56, 56)).astype(np.float32)
    wp = rng.standard_normal((24, 144, 1, 1)).astype(np.float32)
    bp = rng.standard_normal(24).astype(np.float32)
    yp = np.empty((1, 24, 56, 56), np.float32)
    convs = [("depthwise 3x3 144@56", lambda a: depthwise_case(144, 56, 1, a)[0]),
             ("depthwise 3x3 576@14", lambda a: depthwise_case(576, 14, 1, a)[0]),
             ("1x1 conv2d 144>24@56", lambda a: (lambda: cpu.conv2d(xp, wp, bp, yp, 1, 1, 0, 0, a)))]
    for name, make in convs:
        times, quiet = _interleaved([make(a) for _, a in ACTS], windows)
        for (an, _), t in zip(ACTS, times):
            fused.append(dict(threads=nt, conv=name, act=an, ms=t * 1e3, cost=t / times[0],
                              quiet_windows=quiet))
            print(f"| {name} | {an} | {t * 1e3:.3f} | {t / times[0]:.3f} | {quiet} |", flush=True)
    print()
    return rows, total, fused


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                    help="thread counts to run at (default: 2, then 1)")
    ap.add_argument("--windows", type=int, default=25)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "depthwise.json"))
    ap.add_argument("--note", default=None, help="a line recorded with the results (e.g. the machine's load)")
    args = ap.parse_args()
    assert _cpu_depthwise._grouped_route_for((1, 8, 8, 8), (8, 1, 3, 3), 8) == "depthwise"
    load0 = os.getloadavg()
    rows, totals, fused = [], [], []
    for nt in args.threads:
        r, t, f = run_at(nt, args.windows)
        rows += r
        totals.append(t)
        fused += f
    load1 = os.getloadavg()
    out = dict(machine=machine(), versions=versions(), threads=args.threads,
               date=time.strftime("%Y-%m-%d %H:%M:%S"), load_average=dict(before=load0, after=load1),
               method=("median seconds per call over interleaved windows (each window: calls "
                       "filling 20 ms) in which other processes used < 10% of the CPUs (else the "
                       "3 quietest; quiet_windows counts them); bytes = x + y + w + b; the copy "
                       "moves the same bytes (np.copyto of bytes/2 onto bytes/2); vs_copy = copy "
                       "time / conv time; cost = time with the activation / time with the "
                       "identity epilogue"),
               depthwise=rows, totals=totals, fused_activation=fused)
    if args.note:
        out["note"] = args.note
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"load average {load0[0]:.1f} -> {load1[0]:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()

"""GPU benchmark of minidnn's own CUDA kernels, op by op, against PyTorch (cuDNN), fp32, TF32 off.

    python3 bench/bench_gpu_convs.py [--quick] [--json PATH]

1. ResNet-18 (ImageNet 224x224, BN folded into conv bias) forward at batch 64
   and batch 1 through minidnn.backends.cuda, eager and as a replayed CUDA
   graph, against the same network written with torch.nn.functional (same
   weights; cuDNN, cudnn.benchmark on, TF32 off). Also checks the logits agree.
2. Every distinct convolution of ResNet-18 (ImageNet batch 64 and 1, CIFAR
   32x32 batch 64): time per call, achieved TFLOP/s, against F.conv2d.
Times are medians of CUDA-event timings after warm-up. Prints a table; with
--json (default: $OUT/gpu_convs.json when $OUT is set) writes the numbers with the
machine and versions.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_backend():
    return importlib.import_module("minidnn.backends.cuda")


cu = load_backend()
from minidnn.backends.cuda import autotune, gpu, kernels  # noqa: E402  (behind the contract)
import pycuda.driver as drv  # noqa: E402

import torch  # noqa: E402  (after the backend: it retains the primary context first)
import torch.nn.functional as TF  # noqa: E402

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.benchmark = True


def time_cu(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    cu.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = drv.Event(), drv.Event()
        e0.record(cu.stream)
        fn()
        e1.record(cu.stream)
        e1.synchronize()
        ts.append(e1.time_since(e0))
    return statistics.median(ts)


def time_torch(fn, reps=20, warm=3):
    with torch.no_grad():
        for _ in range(warm):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1))
    return statistics.median(ts)


# ---------------------------------------------------------------------------
# ResNet-18 with BN folded, built twice: minidnn ops on GPUArrays, and torch.

class ResNet18:
    def __init__(self, N, img=224, cifar=False, seed=0):
        rng = np.random.default_rng(seed)
        self.ops, self.tops, self.convs = [], [], []
        self.N = N
        x = rng.standard_normal((N, 3, img, img)).astype(np.float32)
        self.x_np = x
        self.x = cu.asarray(x)
        self.tx = torch.from_numpy(x).cuda()
        cur = ("x", 3, img, img)
        self.buf = {"x": self.x}
        self.tbuf = {}
        self._n = 0

        def new(shape):
            self._n += 1
            nm = f"t{self._n}"
            self.buf[nm] = cu.empty(shape)
            return nm

        def conv(src, K, H, W, F, k, s, p, relu):
            w = (rng.standard_normal((F, K, k, k)) * np.sqrt(2.0 / (K * k * k))).astype(np.float32)
            b = (rng.standard_normal(F) * 0.1).astype(np.float32)
            Ho, Wo = 1 + (H + 2 * p - k) // s, 1 + (W + 2 * p - k) // s
            dst = new((N, F, Ho, Wo))
            wg, bg = cu.asarray(w), cu.asarray(b)
            tw, tb = torch.from_numpy(w).cuda(), torch.from_numpy(b).cuda()
            X, Y = self.buf[src], self.buf[dst]
            self.ops.append(lambda: cu.conv2d(X, wg, bg, Y, s, s, p, p, relu))
            def top(src=src, dst=dst):
                t = TF.conv2d(self.tbuf[src], tw, tb, stride=s, padding=p)
                self.tbuf[dst] = TF.relu(t) if relu else t
            self.tops.append(top)
            self.convs.append((N, K, H, W, F, k, s, p))
            return dst, F, Ho, Wo

        def block(src, C, H, W, F, s):
            h, _, Ho, Wo = conv(src, C, H, W, F, 3, s, 1, True)
            h2, _, _, _ = conv(h, F, Ho, Wo, F, 3, 1, 1, False)
            sc = src
            if s != 1 or C != F:
                sc, _, _, _ = conv(src, C, H, W, F, 1, s, 0, False)
            dst = new((N, F, Ho, Wo))
            A, B, Y = self.buf[h2], self.buf[sc], self.buf[dst]
            self.ops.append(lambda: cu.add(A, B, Y, True))
            def top(h2=h2, sc=sc, dst=dst):
                self.tbuf[dst] = TF.relu(self.tbuf[h2] + self.tbuf[sc])
            self.tops.append(top)
            return dst, F, Ho, Wo

        src, C, H, W = cur
        if cifar:
            src, C, H, W = conv(src, 3, H, W, 64, 3, 1, 1, True)
        else:
            src, C, H, W = conv(src, 3, H, W, 64, 7, 2, 3, True)
            Ho, Wo = 1 + (H + 2 - 3) // 2, 1 + (W + 2 - 3) // 2
            dst = new((N, C, Ho, Wo))
            X, Y = self.buf[src], self.buf[dst]
            self.ops.append(lambda X=X, Y=Y: cu.max_pool(X, Y, 3, 3, 2, 2, 1, 1))
            def top(src=src, dst=dst):
                self.tbuf[dst] = TF.max_pool2d(self.tbuf[src], 3, 2, 1)
            self.tops.append(top)
            src, H, W = dst, Ho, Wo
        for F, s in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
            src, C, H, W = block(src, C, H, W, F, s)
        dst = new((N, C, 1, 1))
        X, Y = self.buf[src], self.buf[dst]
        self.ops.append(lambda X=X, Y=Y, H=H, W=W: cu.avg_pool(X, Y, H, W, 1, 1, 0, 0))
        def top(src=src, dst=dst, H=H):
            self.tbuf[dst] = TF.avg_pool2d(self.tbuf[src], H)
        self.tops.append(top)
        fw = (rng.standard_normal((1000, C)) / np.sqrt(C)).astype(np.float32)
        fb = (rng.standard_normal(1000) * 0.1).astype(np.float32)
        fwg, fbg = cu.asarray(fw), cu.asarray(fb)
        tfw, tfb = torch.from_numpy(fw).cuda(), torch.from_numpy(fb).cuda()
        self.out = cu.empty((N, 1000))
        X, Y = self.buf[dst], self.out
        self.ops.append(lambda X=X, Y=Y: cu.fc(X, fwg, fbg, Y, False))
        def top(src=dst):
            self.tbuf["out"] = TF.linear(self.tbuf[src].reshape(N, -1), tfw, tfb)
        self.tops.append(top)

    def forward(self):
        for op in self.ops:
            op()

    def torch_forward(self):
        self.tbuf = {"x": self.tx}
        for op in self.tops:
            op()
        return self.tbuf["out"]


def flops_conv(N, K, H, W, F, k, s, p):
    Ho, Wo = 1 + (H + 2 * p - k) // s, 1 + (W + 2 * p - k) // s
    return 2.0 * N * F * Ho * Wo * K * k * k


def bench_net(N, quick, results):
    net = ResNet18(N)
    net.forward()
    got = cu.to_numpy(net.out)
    with torch.no_grad():
        ref = net.torch_forward().cpu().numpy()
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    reps = 10 if quick else 30
    t_eager = time_cu(net.forward, reps)
    g = cu.capture(net.forward)
    t_graph = time_cu(g.launch, reps * 3)
    t_torch = time_torch(net.torch_forward, reps)
    # host cost of issuing the ops (no sync inside)
    cu.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        net.forward()
    host_us = (time.perf_counter() - t0) / 5 / len(net.ops) * 1e6
    cu.synchronize()
    gflop = sum(flops_conv(*c) for c in net.convs) / 1e9
    r = dict(batch=N, ops=len(net.ops), conv_gflop=gflop, logits_rel_err=rel,
             minidnn_eager_ms=t_eager, minidnn_graph_ms=t_graph, torch_cudnn_ms=t_torch,
             host_us_per_op=host_us, ratio_graph_vs_cudnn=t_graph / t_torch)
    results.setdefault("resnet18_forward", []).append(r)
    print(f"ResNet-18 b{N}: minidnn eager {t_eager:.3f} ms, graph {t_graph:.3f} ms, "
          f"cuDNN (torch) {t_torch:.3f} ms, ratio {t_graph / t_torch:.2f}x, "
          f"{gflop / t_graph:.1f} TFLOP/s-ish, host {host_us:.1f} us/op, logits rel err {rel:.2e}",
          flush=True)
    g.close()
    return net


def bench_convs(label, net_convs, quick, results):
    seen = []
    for c in net_convs:
        if c not in seen:
            seen.append(c)
    rows = []
    reps = 5 if quick else 20
    for (N, K, H, W, F, k, s, p) in seen:
        rng = np.random.default_rng(1)
        x = rng.standard_normal((N, K, H, W)).astype(np.float32)
        w = rng.standard_normal((F, K, k, k)).astype(np.float32)
        b = rng.standard_normal(F).astype(np.float32)
        Ho, Wo = 1 + (H + 2 * p - k) // s, 1 + (W + 2 * p - k) // s
        xg, wg, bg, yg = cu.asarray(x), cu.asarray(w), cu.asarray(b), cu.empty((N, F, Ho, Wo))
        t = time_cu(lambda: cu.conv2d(xg, wg, bg, yg, s, s, p, p, True), reps)
        key = [kk for kk in kernels.plans if kk[0] == "conv" and kk[1] == (N, K, H, W) and kk[2] == (F, K, k, k)]
        plan = kernels.plans[key[-1]]
        tx, tw, tb = (torch.from_numpy(a).cuda() for a in (x, w, b))
        tt = time_torch(lambda: TF.relu(TF.conv2d(tx, tw, tb, stride=s, padding=p)), reps)
        fl = flops_conv(N, K, H, W, F, k, s, p)
        row = dict(shape=f"N{N} {K}->{F} {H}x{W} k{k} s{s} p{p}", ms=t, tflops=fl / t / 1e9,
                   torch_ms=tt, ratio=t / tt, kernel=plan.main_name, split=plan.S,
                   tuned_ms=None if plan.tuned_s is None else plan.tuned_s * 1e3,
                   model_ms=None if plan.model_s is None else plan.model_s * 1e3)
        rows.append(row)
        print(f"  {label:10s} {row['shape']:34s} {t:8.4f} ms {row['tflops']:6.1f} TF/s  "
              f"torch {tt:8.4f} ms  x{row['ratio']:.2f}  [{plan.main_name} S={plan.S}"
              f" tuned {row['tuned_ms'] or 0:.4f} model {row['model_ms'] or 0:.4f}]", flush=True)
        del xg, wg, bg, yg
    results.setdefault("convs", {})[label] = rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-one", default=None, metavar="KERNEL",
                    help="only run conv 128->128 28x28 batch 64 with this tile (for ncu)")
    a = ap.parse_args()
    if a.profile_one:
        autotune.force_gemm = (a.profile_one, 1)
        x, w, b = cu.empty((64, 128, 28, 28)), cu.empty((128, 128, 3, 3)), cu.empty((128,))
        for t in (x, w, b):
            cu.upload(t, np.random.default_rng(0).standard_normal(t.shape))
        y = cu.empty((64, 128, 28, 28))
        for _ in range(3):
            cu.conv2d(x, w, b, y, 1, 1, 1, 1, True)
        cu.synchronize()
        return
    out = a.json or (os.path.join(os.environ["OUT"], "gpu_convs.json") if os.environ.get("OUT") else None)
    res = dict(device=cu.device.name(), sm_count=gpu.SM_COUNT,
               driver=drv.get_driver_version(), pycuda=importlib.import_module("pycuda").VERSION_TEXT,
               torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
               tf32=False, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(res, flush=True)
    net64 = bench_net(64, a.quick, res)
    net1 = bench_net(1, a.quick, res)
    bench_convs("imagenet64", net64.convs, a.quick, res)
    del net64
    bench_convs("imagenet1", net1.convs, a.quick, res)
    cif = ResNet18(64, img=32, cifar=True)
    bench_convs("cifar64", cif.convs, a.quick, res)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", out)


if __name__ == "__main__":
    main()

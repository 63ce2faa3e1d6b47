"""GPU inference benchmark: whole networks through minidnn's public API against PyTorch.

    python3 bench/bench_gpu.py [--quick] [--out bench/results/gpu.json]

The three reference nets of bench_cpu.py (LeNet-style 1x28x28, the CIFAR ResNet
3x32x32, ResNet-18 3x224x224), at batch 1 and a large batch, fp32, TF32 off:

  minidnn, conv route "own"    the project's own CUDA kernels only
  minidnn, conv route "cudnn"  every convolution through cuDNN (fused bias+ReLU call
                               where the version-aware policy allows it)
  minidnn, conv route "auto"   the default: per shape, the faster of the two
each unfused and fused (dnn.fuse), eager (one launch per kernel) and replayed as a
CUDA graph; against PyTorch (cuDNN, cudnn.benchmark on, TF32 off; the same
network with batch-norm in eval mode) eager and replayed as a CUDA graph.

Latency: wall-clock per forward from a device-resident input to a device-resident
output, synchronised after each call (the host overhead counts), median of many
calls after warm-up. Every row's output is checked against PyTorch's. Prints a
markdown table and writes the figures with the device and versions as JSON.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import minidnn as dnn                                   # noqa: E402
from minidnn import ops                                 # noqa: E402

cu = ops.backend("cuda")                                # retains the primary context first
from minidnn.backends import cudnn                      # noqa: E402
import pycuda.driver as drv                               # noqa: E402
from bench_cpu import NETS, build, flops, torch_twin    # noqa: E402

import torch                                            # noqa: E402

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.benchmark = True

BATCHES = {"lenet": (1, 256), "cifar_resnet": (1, 64), "resnet18": (1, 64), "mobilenet_v2": (1, 64)}


def time_calls(fn, sync, reps, warm=3, budget_s=0.3):
    """Median wall-clock ms of fn() + sync(): at least `reps` calls, and more (up to 5000)
    until `budget_s` has passed, so that the microsecond-scale rows are not a handful of
    samples on a noisy host."""
    for _ in range(warm):
        fn()
    sync()
    ts = []
    end = time.perf_counter() + budget_s
    while len(ts) < reps or (len(ts) < 5000 and time.perf_counter() < end):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def torch_rows(net, x, reps):
    model = torch_twin(net).cuda()
    xt = torch.from_numpy(x).cuda()
    with torch.no_grad():
        ref = model(xt).float().cpu().numpy()
        eager = time_calls(lambda: model(xt), torch.cuda.synchronize, reps)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(xt)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = model(xt)
        graph = time_calls(g.replay, torch.cuda.synchronize, reps)
        np.testing.assert_allclose(static_out.cpu().numpy(), ref, rtol=1e-4, atol=1e-4)
    del model, g
    torch.cuda.empty_cache()
    return ref, eager, graph


def minidnn_rows(name, batch, x, ref, reps, quick):
    rows = []
    configs = [("own", False, False), ("own", False, True), ("own", True, False), ("own", True, True),
               ("cudnn", False, True), ("cudnn", True, True), ("auto", True, False), ("auto", True, True)]
    if quick:
        configs = [c for c in configs if c[2]]
    if not cudnn.available():
        configs = [c for c in configs if c[0] == "own"]
    for fused in (False, True):
        net = build(name, batch)                      # same seeds: the same parameters as the twin
        if fused:
            dnn.fuse(net)
        for route, f, graphs in configs:
            if f != fused:
                continue
            cu.set_conv_route(route)
            net.to("cuda", graphs=graphs)
            xd = cu.asarray(x)
            out = net.forward(xd)
            err = float(np.abs(out.reshape(ref.shape) - ref).max() / max(1.0, np.abs(ref).max()))
            ms = time_calls(lambda: net.forward_device(xd), cu.synchronize, reps)
            info = dnn.backend_info(net)
            paths = {}
            for c in info["convolutions"]:
                paths[c["path"]] = paths.get(c["path"], 0) + 1
            rows.append({"net": name, "batch": batch, "engine": "minidnn", "route": route,
                         "fused": fused, "graph": graphs, "ms": ms, "rel_err": err,
                         "conv_paths": paths})
            net.to("cpu")
    cu.set_conv_route("auto")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="graph rows only, fewer repetitions")
    ap.add_argument("--nets", default="lenet,cifar_resnet,resnet18,mobilenet_v2")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu.json"))
    a = ap.parse_args()
    results, md = [], []
    for name in a.nets.split(","):
        for batch in BATCHES[name]:
            x = np.random.default_rng(2).standard_normal((batch,) + NETS[name][0]).astype(np.float32)
            big = name in ("resnet18", "mobilenet_v2") and batch > 1
            reps = (10 if a.quick else 30) if big else (30 if a.quick else 100)
            net = build(name, batch)
            gflop = flops(net) / 1e9
            ref, t_eager, t_graph = torch_rows(net, x, reps)
            rows = [{"net": name, "batch": batch, "engine": "pytorch", "route": "cudnn", "fused": False,
                     "graph": False, "ms": t_eager, "rel_err": 0.0},
                    {"net": name, "batch": batch, "engine": "pytorch", "route": "cudnn", "fused": False,
                     "graph": True, "ms": t_graph, "rel_err": 0.0}]
            rows += minidnn_rows(name, batch, x, ref, reps, a.quick)
            for r in rows:
                r["gflop"] = gflop
                r["vs_pytorch_eager"] = t_eager / r["ms"]
                r["vs_pytorch_graph"] = t_graph / r["ms"]
                r["tflops"] = gflop / r["ms"]
            results += rows
            md += print_table(rows)
    meta = {"device": cu.device.name(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "torch_cudnn": torch.backends.cudnn.version(),
            "minidnn_cudnn": cudnn.version_string() if cudnn.available() else None,
            "cuda_driver": drv.get_driver_version(), "tf32": False, "quick": a.quick}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    mdpath = os.path.splitext(a.out)[0] + ".md"
    with open(mdpath, "w") as f:
        f.write(f"# bench_gpu.py on {meta['device']} ({meta['date']})\n\n"
                f"fp32, TF32 off. PyTorch {meta['torch']} (cuDNN {meta['torch_cudnn']}), minidnn's cuDNN "
                f"{meta['minidnn_cudnn']}, CUDA driver {meta['cuda_driver']}, Python {meta['python']}, "
                f"NumPy {meta['numpy']}. Wall-clock ms per forward, device-resident input and output, "
                f"synchronised after each call, median.\n" + "\n".join(md) + "\n")
    print(f"\n{meta}\nwrote {a.out} and {mdpath}")


def print_table(rows):
    """Print one net and batch as a Markdown table; return its lines."""
    r0 = rows[0]
    lines = [f"\n### {r0['net']}, batch {r0['batch']} ({r0['gflop']:.3f} GFLOP per forward)\n",
             "| engine | conv route | fused | graph | median ms | TFLOP/s | vs PyTorch eager | vs PyTorch graph "
             "| max rel err | conv paths |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paths = ", ".join(f"{k} x{v}" for k, v in r.get("conv_paths", {}).items())
        lines.append(f"| {r['engine']} | {r['route']} | {'yes' if r['fused'] else 'no'} | "
                     f"{'yes' if r['graph'] else 'no'} | {r['ms']:.3f} | {r['tflops']:.2f} | "
                     f"{r['vs_pytorch_eager']:.2f}x | {r['vs_pytorch_graph']:.2f}x | {r['rel_err']:.1e} | {paths} |")
    print("\n".join(lines), flush=True)
    return lines


if __name__ == "__main__":
    main()

"""Serving throughput: images per second of one network at batch 1, from

  1 thread  x 1 kernel thread    (the unit),
  1 thread  x 2 kernel threads   (one caller, the kernels use both cores),
  2 threads x 1 kernel thread    (two callers of the same net: thread-safe forward),
  Ray, 2 workers x 1 CPU         (minidnn.ray_run's Predictor pattern: the net from its
                                  file bytes in each actor; skipped without Ray),

on the fused CIFAR ResNet of minidnn.nets (or --net resnet18 / lenet), each for
--seconds of back-to-back forwards, the modes interleaved --rounds times (the machine
may be shared: the medians are reported). Prints a table and writes
bench/results/serving.json with the machine and versions.

    python bench/bench_serving.py [--net cifar_resnet] [--seconds 3] [--rounds 3] [--no-ray]
"""
import argparse
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minidnn as dnn                     # noqa: E402
from minidnn import nets                  # noqa: E402
from minidnn.backends import cpu          # noqa: E402

from bench_cpu import machine, versions   # noqa: E402


def _loop(net, x, seconds, count, i):
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        net.forward(x)
        n += 1
    count[i] = n


def threads_rate(net, x, n_threads, kernel_threads, seconds):
    cpu.set_num_threads(n_threads * kernel_threads)
    count = [0] * n_threads
    ts = [threading.Thread(target=_loop, args=(net, x, seconds, count, i)) for i in range(n_threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(count) / (time.perf_counter() - t0)


class _Worker:
    def __init__(self, model, shape):
        import minidnn as dnn
        from minidnn.backends import cpu
        cpu.set_num_threads(1)
        self.net = dnn.deserialize(model)
        self.x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        self.net.forward(self.x)

    def run(self, seconds):
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            self.net.forward(self.x)
            n += 1
        return n


def ray_rate(model, shape, workers, seconds, actors=None):
    import ray
    t0 = time.perf_counter()
    counts = ray.get([a.run.remote(seconds) for a in actors])
    return sum(counts) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="cifar_resnet", choices=sorted(nets.NETS))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "serving.json"))
    args = ap.parse_args()
    net = dnn.fuse(nets.build(args.net, 1))
    shape = (1,) + nets.NETS[args.net][1]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    net.forward(x)
    modes = {"1 thread x 1 kernel thread": (1, 1), "1 thread x 2 kernel threads": (1, 2),
             "2 threads x 1 kernel thread": (2, 1)}
    rates = {m: [] for m in modes}
    actors = None
    if not args.no_ray:
        try:
            import ray
            ray.init(num_cpus=2, log_to_driver=False)
            remote = ray.remote(num_cpus=1)(_Worker)
            actors = [remote.remote(dnn.serialize(net), shape) for _ in range(2)]
            ray.get([a.run.remote(0.1) for a in actors])
            rates["Ray, 2 workers x 1 CPU"] = []
        except ImportError:
            print("(Ray is not installed: its row is skipped)")
    for r in range(args.rounds):
        for m, (nt, kt) in modes.items():
            rates[m].append(threads_rate(net, x, nt, kt, args.seconds))
        if actors:
            rates["Ray, 2 workers x 1 CPU"].append(ray_rate(None, shape, 2, args.seconds, actors))
    med = {m: float(np.median(v)) for m, v in rates.items()}
    unit = med["1 thread x 1 kernel thread"]
    print(f"{args.net}, fused, batch 1, {os.cpu_count()} CPUs, median of {args.rounds} rounds "
          f"of {args.seconds:g} s")
    print(f"{'mode':34s} {'images/s':>10s} {'vs 1x1':>8s}")
    for m, v in med.items():
        print(f"{m:34s} {v:10.1f} {v / unit:7.2f}x")
    result = {"net": args.net, "batch": 1, "seconds": args.seconds, "rounds": args.rounds,
              "images_per_s": med, "all": rates, "machine": machine(), "versions": versions(),
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

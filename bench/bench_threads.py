"""CPU threads: fused minidnn latency of the reference nets at 1, 2, ... threads, each count in
its own process started with OMP_NUM_THREADS (the way a user sets it), against ONNX Runtime
at the same intra-op thread count when it is installed.

    python bench/bench_threads.py [--threads 1,2,4,8,16] [--nets demo,lenet,cifar_resnet,...]
                                  [--out bench/results/threads.json]

A machine with more cores than a small net at batch 1 has work for must not run slower with
more threads: the per-op team is sized by the op's work (kernels/cpu/parallel.h), so the
demo's net (1x8x8 digits, batch 16) and LeNet at batch 1 should be flat from 2 threads on.
Median of interleaved rounds; prints a Markdown table and writes the figures with the
machine and versions (JSON and a .md beside it).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, {root!r})
import minidnn as dnn
from minidnn import nets
from minidnn.__main__ import demo_net
name, batch, engine, rounds = {name!r}, {batch}, {engine!r}, {rounds}
if name == "demo":
    net = demo_net().subnet()
    shape = (batch, 1, 8, 8)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    net.forward(x)
    nets.randomized(net, shape)
else:
    net = nets.build(name, batch)
    shape = (batch,) + nets.NETS[name][1]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
if engine == "minidnn":
    dnn.fuse(net)
    fn = lambda: net.forward_device(x)
else:
    sys.path.insert(0, {here!r})
    import torch, onnxruntime as ort
    from bench_cpu import torch_twin, onnx_session
    torch.set_num_threads(int({nt}))
    sess = onnx_session(torch, ort, torch_twin(net), torch.from_numpy(x), int({nt}))
    iname = sess.get_inputs()[0].name
    fn = lambda: sess.run(None, {{iname: x}})
fn(); fn()
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < 0.3:
    fn(); n += 1
reps = max(3, min(200, int(n * 0.15 / 0.3)))
ts = []
for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    ts.append((time.perf_counter() - t) / reps)
print(json.dumps(sorted(ts)))
"""

NETS = {"demo": 16, "lenet": 1, "cifar_resnet": 1, "resnet18": 1, "mobilenet_v2": 1}


def run(name, batch, engine, nt, rounds):
    env = dict(os.environ, OMP_NUM_THREADS=str(nt))
    code = CHILD.format(root=os.path.dirname(HERE), here=HERE, name=name, batch=batch,
                        engine=engine, rounds=rounds, nt=nt)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    ts = json.loads(out.stdout.strip().splitlines()[-1])
    return 1e3 * ts[len(ts) // 2], 1e3 * ts[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default=None, help="comma-separated (default: 1, 2, 4 ... cores)")
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "threads.json"))
    a = ap.parse_args()
    cores = os.cpu_count()
    counts = ([int(t) for t in a.threads.split(",")] if a.threads else
              sorted({1, 2} | {c for c in (4, 8, 16, 32, 64) if c <= cores} | {cores}))
    engines = ["minidnn"]
    if not a.no_peers:
        try:
            import onnxruntime  # noqa: F401
            import torch  # noqa: F401
            engines.append("onnxruntime")
        except ImportError:
            print("onnxruntime or torch not importable: minidnn only")
    rows = []
    print(f"{platform.node()}: {cores} CPUs")
    print("| net | batch | engine | " + " | ".join(f"{t} thr ms" for t in counts) + " |")
    print("| --- | ---: | --- |" + " ---: |" * len(counts))
    for name in a.nets.split(","):
        batch = NETS[name]
        for engine in engines:
            if name == "demo" and engine != "minidnn":
                continue
            ms = {}
            for nt in counts:
                try:
                    ms[nt] = run(name, batch, engine, nt, a.rounds)
                except RuntimeError as e:
                    print(f"{engine} {name} at {nt} threads failed: {e}")
            rows.append(dict(net=name, batch=batch, engine=engine,
                             median_ms={str(k): v[0] for k, v in ms.items()},
                             min_ms={str(k): v[1] for k, v in ms.items()}))
            print(f"| {name} | {batch} | {engine} | " +
                  " | ".join(f"{ms[t][0]:.3f}" if t in ms else "-" for t in counts) + " |", flush=True)
    import numpy as np
    import minidnn as dnn
    info = dict(machine=dict(node=platform.node(), cpus=cores, platform=platform.platform(),
                             load_average=os.getloadavg()),
                versions=dict(python=platform.python_version(), minidnn=dnn.__version__,
                              numpy=np.__version__),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), thread_counts=counts, results=rows,
                method="each (net, engine, threads) in its own process with OMP_NUM_THREADS set; "
                       "median (and min) over rounds of back-to-back fused forwards")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(info, f, indent=1)
    lines = [f"# bench_threads.py: {info['date']}", "",
             f"{cores} CPUs ({platform.platform()}), load average {info['machine']['load_average'][0]:.2f}. "
             f"{info['method']}.", "",
             "| net | batch | engine | " + " | ".join(f"{t} threads (ms)" for t in counts) + " |",
             "| --- | ---: | --- |" + " ---: |" * len(counts)]
    for r in rows:
        lines.append(f"| {r['net']} | {r['batch']} | {r['engine']} | " +
                     " | ".join(f"{r['median_ms'][str(t)]:.3f}" if str(t) in r["median_ms"] else "-"
                                for t in counts) + " |")
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

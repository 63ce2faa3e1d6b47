"""CPU inference benchmark: minidnn (unfused and fused) against PyTorch eager and
ONNX Runtime, same thread count, three nets, batch 1 and a large batch.

    python bench/bench_cpu.py [--threads N] [--quick] [--out bench/results/cpu.json]
    python bench/bench_cpu.py --convs-only      # just the per-shape conv table

Before the nets, a per-shape table times every distinct convolution of the
three nets (at their large batch, and batch 1) through each of conv2d's two
paths, forced: "blas" (im2col + OpenBLAS sgemm) and "implicit" (our packed
GEMM, kernels/cpu/gemm_avx2.h), and, for the 3x3 stride-1 ones, the Winograd
route (conv2d_winograd, kernels/cpu/winograd.h, at the m its rule picks, or
F(4x4) where the rule keeps conv2d: then the column shows why), with its
speedup over the implicit GEMM (its GFLOP/s are effective: the direct
convolution's FLOPs over its time) and the route a con_ layer takes marked,
against OpenBLAS sgemm 2048^3 at the same thread count.

Nets (built with minidnn's dlib-style factories; PyTorch gets the same
architecture and minidnn's parameters, ONNX Runtime the PyTorch export):
  lenet     1x28x28: con5-bn-relu-pool, con5-bn-relu-pool, fc120-bn-relu, fc84-relu, fc10
  cifar     3x32x32 ResNet: stem con3 32, stages 32/64/128 of two basic blocks,
            shortcuts with tag/skip/add_prev, 1x1 stride-2 projections, avg pool, fc10
  resnet18  3x224x224 ResNet-18 (stem 7x7/2 + maxpool, 64/128/256/512, fc1000)

Batch-norm layers get random statistics, so fuse() has real folding to do;
every engine's output is checked against minidnn's before timing.

Each engine runs in its own process, so the thread pools of minidnn
(OpenMP), PyTorch (its own OpenMP) and ONNX Runtime never spin against each
other. Timing on a shared machine: each sample is a window of back-to-back
calls (after one untimed call); engines are interleaved window by window, and a
window is kept only if other processes used < 10% of the CPUs meanwhile
(from /proc/stat minus this process's own CPU time). The table reports the
median ms per forward over kept windows; "quiet" counts them (when fewer
than 3 windows were quiet, the quietest ones are used and the row is marked
noisy). "vs best peer" = best peer's ms / this engine's ms (> 1: faster
than every peer). GFLOP/s counts 2 * multiply-adds of the convolutions and
fully connected layers.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minidnn as dnn                                  # noqa: E402
from minidnn.backends import cpu as cpu_backend        # noqa: E402

# ------------------------------------------------------------------ timing

_HZ = os.sysconf("SC_CLK_TCK")


def _busy_ticks():
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return None
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]     # user nice system irq softirq steal


def _own_ticks():
    t = os.times()
    return (t.user + t.system) * _HZ


def _worker(conn, engine, name, batch, nt, window):
    """One engine in its own process, so thread pools (minidnn's OpenMP,
    PyTorch's OpenMP, ONNX Runtime's) never spin against each other."""
    try:
        fn, out = _engine(engine, name, batch, nt)
        conn.send(("ready", out))
        reps = None
        while True:
            cmd = conn.recv()
            if cmd == "stop":
                break
            fn()                                  # untimed: wake threads, warm caches
            if reps is None:
                t = time.perf_counter(); fn(); dt = time.perf_counter() - t
                reps = max(1, int(window / max(dt, 1e-6)))
            o0 = _own_ticks()
            ts = []
            w0 = time.perf_counter()
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            conn.send((float(np.median(ts)) * 1e3, time.perf_counter() - w0, _own_ticks() - o0))
    except Exception as e:  # reported to the coordinator, which skips the engine
        conn.send(("error", f"{type(e).__name__}: {e}"))


QUIET_LIMIT = 0.10      # a window is quiet when other processes used less of the CPUs than this


def _spin():
    while True:
        pass


def _spinner():
    """Another process keeping one core busy (a daemon: it dies with the benchmark)."""
    import multiprocessing as mp
    p = mp.get_context("spawn").Process(target=_spin, daemon=True)
    p.start()
    return p


class Engine:
    def __init__(self, engine, name, batch, nt, window):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, engine, name, batch, nt, window), daemon=True)
        self.proc.start()
        self.kept, self.all = [], []

    def ready(self):
        tag, payload = self.conn.recv()
        if tag == "error":
            self.close()
            raise RuntimeError(payload)
        return payload

    def sample(self):
        b0 = _busy_ticks()
        self.conn.send("window")
        msg = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        ms, wall, own = msg
        foreign = 0.0 if b0 is None else max(0.0, ((_busy_ticks() - b0) - own) / _HZ / (wall * os.cpu_count()))
        self.all.append((foreign, ms))
        if foreign < QUIET_LIMIT:
            self.kept.append(ms)

    def result(self):
        if len(self.kept) >= 3:
            return float(np.median(self.kept)), len(self.kept), False
        quietest = [ms for _, ms in sorted(self.all)[:3]]
        return float(np.median(quietest)), len(self.kept), True

    def close(self):
        try:
            self.conn.send("stop")
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=10)


def run_interleaved(engines, want, max_rounds):
    for _ in range(max_rounds):
        for e in engines.values():
            if len(e.kept) < want:
                e.sample()
        if all(len(e.kept) >= want for e in engines.values()):
            break
    return {name: e.result() for name, e in engines.items()}


# -------------------------------------------------------------------- nets

# The reference nets: minidnn.nets (shared with the tests), each at batch 1 and a large
# batch (32 for the two ResNets: the batch the targets name), and dlib's published
# models where their files are (MINIDNN_DLIB_MODELS or ../shared/dlib-models): the
# convolutional trunk between the input layer and the loss, on the tensor the input layer
# makes (the face detector's tiled pyramid of the 512x512 reference image; the face
# descriptor's 150x150 chip), so that every engine runs the same tensor program.
from minidnn import nets as _nets  # noqa: E402

NETS = {name: (shape, (1, {"cifar_resnet": 32, "resnet18": 32}.get(name, big)))
        for name, (_, shape, big) in _nets.NETS.items()}
DLIB_MODELS = os.environ.get("MINIDNN_DLIB_MODELS") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "dlib-models")
DLIB_NETS = {   # name: (zoo loader, file, input (K, R, C), batches)
    "dlib_face_detector": ("face_detector", "mmod_human_face_detector.dat", (3, 1895, 534), (1,)),
    "dlib_face_descriptor": ("face_descriptor", "dlib_face_recognition_resnet_model_v1.dat",
                             (3, 150, 150), (1, 16)),
}
for _name, (_, _file, _shape, _batches) in DLIB_NETS.items():
    if os.path.exists(os.path.join(DLIB_MODELS, _file)):
        NETS[_name] = (_shape, _batches)


def dlib_trunk(name):
    """A dlib model's layers between its input layer and its loss, over an input_tensor."""
    from minidnn import dlib_zoo
    from minidnn.core import Node
    loader, file, _, _ = DLIB_NETS[name]
    chain = getattr(dlib_zoo, loader)(os.path.join(DLIB_MODELS, file)).chain()
    net = dnn.input_tensor()
    for node in reversed(chain[1:-1]):
        net = Node(node.layer_details(), net)
    return net


def build(name, batch):
    """A minidnn net with its parameters (random batch-norm statistics and biases for the
    reference nets; dlib's own for its models), after one forward at ``batch``."""
    if name in DLIB_NETS:
        net = dlib_trunk(name)
        net.forward(_input(name, batch))
        return net
    return _nets.build(name, batch)


def flops(net):
    """2 * multiply-adds of the con_ and fc_ layers at the last forward's shapes."""
    total = 0
    for node in net.chain():
        l = node.layer_details()
        kind = type(l).__name__
        if kind == "con_":
            n, f, ro, co = node.get_output().shape
            total += 2 * n * f * ro * co * l.filters[0].size        # (K/groups) * nr * nc
        elif kind == "fc_":
            total += 2 * node.get_output().shape[0] * l.weights.size
    return total


# ------------------------------------------------------------- PyTorch twin

def torch_twin(net):
    """The same network as a torch.nn.Module with net's parameters (eval mode)."""
    import torch
    from torch import nn

    def con(l):
        g = getattr(l, "groups", 1)
        c = nn.Conv2d(l.filters.shape[1] * g, l.filters.shape[0], (l.nr, l.nc), (l.stride_y, l.stride_x),
                      (l.padding_y, l.padding_x), bias=l.biases is not None, groups=g,
                      dilation=(getattr(l, "dilation_y", 1), getattr(l, "dilation_x", 1)))
        c.weight.data = torch.from_numpy(l.filters.copy())
        if l.biases is not None:
            c.bias.data = torch.from_numpy(l.biases.copy())
        return c

    def bn(l, conv):
        b = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(l.gamma.size, eps=l.eps)
        for name, a in (("weight", l.gamma), ("bias", l.beta)):
            getattr(b, name).data = torch.from_numpy(a.copy())
        b.running_mean.data = torch.from_numpy(l.running_mean.copy())
        b.running_var.data = torch.from_numpy(l.running_var.copy())
        return b

    class Affine(nn.Module):
        """dlib's affine_ (a batch norm folded into per-channel gamma and beta)."""

        def __init__(self, gamma, beta):
            super().__init__()
            self.register_buffer("g", torch.from_numpy(gamma.reshape(1, -1, 1, 1).copy()))
            self.register_buffer("b", torch.from_numpy(beta.reshape(1, -1, 1, 1).copy()))

        def forward(self, x):
            return x * self.g + self.b

    def padded_add(a, b):
        """dlib's add_prev_: operands of different shapes are zero padded to the larger."""
        if a.shape == b.shape:
            return a + b
        def pad(t):
            return nn.functional.pad(t, [0, max(a.shape[3], b.shape[3]) - t.shape[3],
                                         0, max(a.shape[2], b.shape[2]) - t.shape[2],
                                         0, max(a.shape[1], b.shape[1]) - t.shape[1]])
        return pad(a) + pad(b)

    class Twin(nn.Module):
        """Replays minidnn's chain bottom-up: tags store, skips recall, add_prev adds."""

        def __init__(self):
            super().__init__()
            self.steps = []
            mods = []
            for node in reversed(net.chain()[:-1]):   # skip input_tensor
                l = node.layer_details()
                kind = type(l).__name__
                if kind == "con_":
                    m = con(l)
                elif kind == "fc_":
                    m = nn.Sequential(nn.Flatten(), nn.Linear(l.weights.shape[1], l.weights.shape[0],
                                                              bias=l.biases is not None))
                    m[1].weight.data = torch.from_numpy(l.weights.copy())
                    if l.biases is not None:
                        m[1].bias.data = torch.from_numpy(l.biases.copy())
                elif kind == "bn_":
                    m = bn(l, l.mode == "conv")
                elif kind == "relu_":
                    m = nn.ReLU()
                elif kind == "clipped_relu_":
                    m = nn.Hardtanh(0.0, l.ceiling)
                elif kind == "max_pool_":
                    m = nn.MaxPool2d((l.nr, l.nc), (l.stride_y, l.stride_x), (l.padding_y, l.padding_x))
                elif kind == "avg_pool_" and l.nr == 0:
                    m = nn.AdaptiveAvgPool2d(1)
                elif kind == "avg_pool_":
                    m = nn.AvgPool2d((l.nr, l.nc), (l.stride_y, l.stride_x), (l.padding_y, l.padding_x),
                                     count_include_pad=False)
                elif kind == "affine_":
                    m = Affine(l.gamma, l.beta)
                elif kind in ("tag_", "skip_", "add_prev_"):
                    self.steps.append((kind, l.id))
                    continue
                else:
                    raise NotImplementedError(kind)
                mods.append(m)
                self.steps.append(("mod", len(mods) - 1))
            self.mods = nn.ModuleList(mods)

        def forward(self, x):
            tags = {}
            for kind, i in self.steps:
                if kind == "mod":
                    m = self.mods[i]
                    if isinstance(m, nn.BatchNorm1d) and x.dim() == 4:
                        x = m(x.flatten(1)).reshape(x.shape)
                    else:
                        x = m(x)
                        if isinstance(m, nn.Sequential):      # fc: minidnn keeps (N, O, 1, 1)
                            x = x.reshape(x.shape[0], -1, 1, 1)
                elif kind == "tag_":
                    tags[i] = x
                elif kind == "skip_":
                    x = tags[i]
                else:
                    x = padded_add(x, tags[i])
            return x

    return Twin().eval()


# ------------------------------------------------------------------- main

def machine():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Core(s) per socket", "Socket(s)", "Thread(s) per core",
                             "L2 cache", "L3 cache", "Flags"):
                v = v.strip()
                if k.strip() == "Flags":
                    v = " ".join(f for f in v.split() if f in ("avx2", "fma", "avx512f", "avx512_bf16"))
                info[k.strip()] = v
    except OSError:
        pass
    return info


def versions():
    import scipy
    v = {"minidnn": getattr(dnn, "__version__", "?"), "numpy": np.__version__, "scipy": scipy.__version__}
    try:
        from threadpoolctl import threadpool_info
        v["blas"] = [f"{d['internal_api']} {d['version']} ({os.path.basename(d['filepath'])}, "
                     f"{d['num_threads']} threads)" for d in threadpool_info() if d["user_api"] == "blas"]
    except ImportError:
        pass
    for mod in ("torch", "onnxruntime", "onnx"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    return v


def _input(name, batch):
    return np.random.default_rng(2).standard_normal((batch,) + NETS[name][0]).astype(np.float32)


def _engine(engine, name, batch, nt):
    """(fn running one forward, its output on the benchmark input) for an engine,
    built inside the worker process."""
    x = _input(name, batch)
    cpu_backend.set_num_threads(nt)
    net = build(name, batch)
    if engine == "minidnn":
        return (lambda: net.forward_device(x)), net.forward(x)
    if engine == "minidnn fused":
        dnn.fuse(net)
        return (lambda: net.forward_device(x)), net.forward(x)
    import torch
    torch.set_num_threads(nt)
    torch.set_num_interop_threads(1)
    model = torch_twin(net)
    tx = torch.from_numpy(x)
    if engine == "pytorch":
        def fn():
            with torch.inference_mode():
                return model(tx)
        with torch.inference_mode():
            return fn, fn().numpy()
    if engine == "onnxruntime":
        import onnxruntime as ort
        sess = onnx_session(torch, ort, model, tx, nt)
        iname = sess.get_inputs()[0].name
        fn = lambda: sess.run(None, {iname: x})  # noqa: E731
        return fn, fn()[0]
    raise ValueError(engine)


# (name, K, R, F, k, stride, pad): every distinct conv of the three nets
CONV_SHAPES = {
    "lenet": [("con5 1>6", 1, 28, 6, 5, 1, 0), ("con5 6>16", 6, 12, 16, 5, 1, 0)],
    "cifar_resnet": [("stem 3>32", 3, 32, 32, 3, 1, 1), ("3x3 32", 32, 32, 32, 3, 1, 1),
                     ("3x3/2 32>64", 32, 32, 64, 3, 2, 1), ("1x1/2 32>64", 32, 32, 64, 1, 2, 0),
                     ("3x3 64", 64, 16, 64, 3, 1, 1), ("3x3/2 64>128", 64, 16, 128, 3, 2, 1),
                     ("1x1/2 64>128", 64, 16, 128, 1, 2, 0), ("3x3 128", 128, 8, 128, 3, 1, 1)],
    "resnet18": [("stem 7x7/2 3>64", 3, 224, 64, 7, 2, 3), ("3x3 64", 64, 56, 64, 3, 1, 1),
                 ("3x3/2 64>128", 64, 56, 128, 3, 2, 1), ("1x1/2 64>128", 64, 56, 128, 1, 2, 0),
                 ("3x3 128", 128, 28, 128, 3, 1, 1), ("3x3/2 128>256", 128, 28, 256, 3, 2, 1),
                 ("1x1/2 128>256", 128, 28, 256, 1, 2, 0), ("3x3 256", 256, 14, 256, 3, 1, 1),
                 ("3x3/2 256>512", 256, 14, 512, 3, 2, 1), ("1x1/2 256>512", 256, 14, 512, 1, 2, 0),
                 ("3x3 512", 512, 7, 512, 3, 1, 1)],
}


def conv_shapes_of(name):
    """The distinct dense (groups 1) square convolutions of a net, as CONV_SHAPES lists them."""
    net = build(name, 1)
    shapes = []
    for node in net.chain():
        l = node.layer_details()
        if type(l).__name__ == "con_" and getattr(l, "groups", 1) == 1 and l.nr == l.nc:
            F, K, k, _ = l.filters.shape
            R = node.subnet().get_output().shape[2]
            row = (f"{k}x{k}{'/' + str(l.stride_y) if l.stride_y > 1 else ''} {K}>{F} at {R}",
                   K, R, F, k, l.stride_y, l.padding_y)
            if row not in shapes:
                shapes.append(row)
    return shapes


def sgemm_gflops(nt, n=2048, reps=5):
    """OpenBLAS (scipy's) sgemm n^3 at nt threads: best of reps, GFLOP/s."""
    from scipy.linalg.blas import sgemm
    from threadpoolctl import threadpool_limits
    a = np.asfortranarray(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    with threadpool_limits(limits=nt, user_api="blas"):
        sgemm(1.0, a, a)
        best = min(_timed(lambda: sgemm(1.0, a, a)) for _ in range(reps))
    return 2.0 * n ** 3 / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def conv_table(nt, nets, reps):
    """Per-shape conv GFLOP/s through each path (best of reps interleaved windows)."""
    from minidnn import _cpu_conv
    cpu_backend.set_num_threads(nt)
    rng = np.random.default_rng(0)
    rows = []
    wino = hasattr(cpu_backend, "conv2d_winograd")
    print("| net | conv | batch | blas GFLOP/s | implicit GFLOP/s | implicit/blas | winograd GFLOP/s "
          "| winograd/implicit | auto picks |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for net in nets:
        for batch in sorted(NETS[net][1], reverse=True):
            for name, K, R, F, k, s, p in CONV_SHAPES.get(net) or conv_shapes_of(net):
                x = rng.standard_normal((batch, K, R, R)).astype(np.float32)
                w = (rng.standard_normal((F, K, k, k)) * 0.1).astype(np.float32)
                b = rng.standard_normal(F).astype(np.float32)
                Ro = 1 + (R + 2 * p - k) // s
                y = np.empty((batch, F, Ro, Ro), np.float32)
                fl = 2.0 * batch * F * Ro * Ro * K * k * k
                inner = max(1, int(0.05e9 / fl))
                best = {}
                wm = cpu_backend.winograd_tile(x, w, s, s, p, p) if wino else 0
                timed_m = wm or (4 if wino and k == 3 and s == 1 else 0)
                u = None
                if timed_m:
                    from minidnn import ops
                    u = np.empty(ops.winograd_filters_shape(w.shape, timed_m), np.float32)
                    cpu_backend.winograd_filters(w, u, timed_m)
                for _ in range(reps):
                    for path in ("blas", "implicit"):
                        old = _cpu_conv._set_conv_path(path)
                        try:
                            cpu_backend.conv2d(x, w, b, y, s, s, p, p, True)
                            t = _timed(lambda: [cpu_backend.conv2d(x, w, b, y, s, s, p, p, True)
                                                for _ in range(inner)]) / inner
                        finally:
                            _cpu_conv._set_conv_path(old)
                        best[path] = min(best.get(path, 1e9), t)
                    if u is not None:
                        cpu_backend.conv2d_winograd(x, u, b, None, y, p, p, timed_m, True)
                        t = _timed(lambda: [cpu_backend.conv2d_winograd(x, u, b, None, y, p, p, timed_m, True)
                                            for _ in range(inner)]) / inner
                        best["winograd"] = min(best.get("winograd", 1e9), t)
                auto = _cpu_conv._conv_path_for(x.shape, w.shape, s, s, p, p)
                g = {path: fl / t / 1e9 for path, t in best.items()}
                route = f"winograd F({wm}x{wm})" if wm else auto
                rows.append(dict(net=net, conv=name, batch=batch, x=list(x.shape), w=list(w.shape),
                                 stride=s, pad=p, blas_gflops=g["blas"], implicit_gflops=g["implicit"],
                                 winograd_m=timed_m or None, winograd_gflops=g.get("winograd"),
                                 winograd_over_implicit=(g["winograd"] / g["implicit"]
                                                         if "winograd" in g else None),
                                 auto=route, auto_gflops=g["winograd" if wm else auto]))
                wcol = (f"{g['winograd']:.1f} | {g['winograd'] / g['implicit']:.2f}"
                        + ("" if wm else f" (F({timed_m}x{timed_m}), not taken)")) if "winograd" in g else "- | -"
                print(f"| {net} | {name} | {batch} | {g['blas']:.1f} | {g['implicit']:.1f} | "
                      f"{g['implicit'] / g['blas']:.2f} | {wcol} | {route} |", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--quick", action="store_true", help="fewer windows (a smoke run)")
    ap.add_argument("--no-peers", action="store_true", help="minidnn only")
    ap.add_argument("--no-convs", action="store_true", help="skip the per-shape conv table")
    ap.add_argument("--convs-only", action="store_true", help="only the per-shape conv table")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results", "cpu.json"))
    ap.add_argument("--busy", type=int, default=0, metavar="P",
                    help="keep P other processes spinning meanwhile (the 'one core busy' comparison): "
                         "every window is kept, none is quiet")
    args = ap.parse_args()
    nt = args.threads
    spinners = [_spinner() for _ in range(args.busy)]
    global QUIET_LIMIT
    if args.busy:
        QUIET_LIMIT = 2.0          # the foreign load is the point: keep every window
    want, rounds = (3, 6) if args.quick else (5, 12)

    engines = ["minidnn", "minidnn fused"]
    if not args.no_peers:
        for mod, eng in (("torch", "pytorch"), ("onnxruntime", "onnxruntime")):
            try:
                __import__(mod)
                if mod == "onnxruntime":
                    __import__("onnx")
                engines.append(eng)
            except ImportError:
                print(f"{mod} not importable: {eng} skipped")
    peers = [e for e in engines if not e.startswith("minidnn")]

    conv_rows, sgemm = [], None
    if not args.no_convs:
        sgemm = sgemm_gflops(nt)
        print(f"OpenBLAS sgemm 2048^3 at {nt} threads: {sgemm:.1f} GFLOP/s")
        conv_rows = conv_table(nt, args.nets.split(","), 3 if args.quick else 5)
        print()
        if args.convs_only:
            return

    rows = []
    print(f"threads: {nt}   machine: {machine().get('Model name', '?')}   engines in separate processes")
    print("| net | batch | engine | ms | GFLOP/s | vs best peer | quiet windows |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name in args.nets.split(","):
        for batch in NETS[name][1]:
            net = build(name, batch)
            ref = net.forward(_input(name, batch))
            gflop = flops(net) / 1e9
            window = 0.25 if batch == 1 else 0.5
            live = {e: Engine(e, name, batch, nt, window) for e in engines}
            for e in list(live):
                try:
                    out = live[e].ready()
                except RuntimeError as err:
                    print(f"{e} failed on {name}: {err}: skipped")
                    del live[e]
                    continue
                err = float(np.abs(np.asarray(out).reshape(ref.shape) - ref).max()
                            / max(1.0, float(np.abs(ref).max())))
                if err > 1e-3:
                    raise AssertionError(f"{name} batch {batch}: {e} differs from minidnn (rel. {err:.2e})")
            try:
                res = run_interleaved(live, want, rounds)
            finally:
                for e in live.values():
                    e.close()
            best_peer = min((res[p][0] for p in peers if p in res), default=None)
            for engine, (ms, quiet, noisy) in res.items():
                ratio = best_peer / ms if best_peer else None
                rows.append(dict(net=name, batch=batch, engine=engine, ms=ms, gflops=gflop / (ms / 1e3),
                                 vs_best_peer=ratio, quiet_windows=quiet, noisy=noisy, gflop=gflop))
                print(f"| {name} | {batch} | {engine} | {ms:.3f} | {gflop / (ms / 1e3):.1f} | "
                      f"{'-' if ratio is None else f'{ratio:.2f}'} | {quiet}{' (noisy)' if noisy else ''} |",
                      flush=True)

    for p in spinners:
        p.kill()
    env = {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = dict(machine=machine(), versions=versions(), threads=nt, openmp_env=env, busy_processes=args.busy,
               date=time.strftime("%Y-%m-%d %H:%M:%S"),
               method=("each engine in its own process; median ms per forward over interleaved windows "
                       "in which other processes used < 10% CPU; vs_best_peer = best peer ms / engine ms; "
                       "GFLOP/s = 2*MACs of conv+fc"),
               sgemm_2048_gflops=sgemm, convs=conv_rows, results=rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    base = os.path.splitext(args.out)[0]
    with open(base + ".md", "w") as f:
        f.write(markdown(out))
    wrote = [args.out, base + ".md"]
    if chart(out, base + ".png"):
        wrote.append(base + ".png")
    print("wrote " + ", ".join(wrote))


def markdown(out):
    """The run as a Markdown page: machine, versions, the conv table, the net table."""
    m, v = out["machine"], out["versions"]
    lines = [f"# bench_cpu.py: {out['date']}", "",
             f"{m.get('Model name', '?')}, {m['cpus']} CPUs, {out['threads']} threads per engine"
             + (f", {out['busy_processes']} other process(es) spinning meanwhile"
                if out.get("busy_processes") else "") + ".",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "blas" and val) + ".",
             "Method: " + out["method"] + ".", ""]
    if out.get("sgemm_2048_gflops"):
        lines += [f"OpenBLAS sgemm 2048^3: {out['sgemm_2048_gflops']:.1f} GFLOP/s.", ""]
    if out["convs"]:
        lines += ["| net | conv | batch | blas GFLOP/s | implicit GFLOP/s | winograd GFLOP/s | route |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in out["convs"]:
            wg = f"{r['winograd_gflops']:.1f}" if r.get("winograd_gflops") else "-"
            lines.append(f"| {r['net']} | {r['conv']} | {r['batch']} | {r['blas_gflops']:.1f} | "
                         f"{r['implicit_gflops']:.1f} | {wg} | {r['auto']} |")
        lines.append("")
    lines += ["| net | batch | engine | ms | GFLOP/s | vs best peer | quiet windows |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in out["results"]:
        ratio = "-" if r["vs_best_peer"] is None else f"{r['vs_best_peer']:.2f}"
        lines.append(f"| {r['net']} | {r['batch']} | {r['engine']} | {r['ms']:.3f} | {r['gflops']:.1f} | "
                     f"{ratio} | {r['quiet_windows']}{' (noisy)' if r['noisy'] else ''} |")
    return "\n".join(lines) + "\n"


def chart(out, path):
    """The 'vs best peer' ratios of minidnn (fused and not) per net and batch as a bar chart
    (matplotlib, from the bench extra); False when matplotlib is missing or no peer ran."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no chart (pip install '.[bench]')")
        return False
    rows = [r for r in out["results"] if r["engine"].startswith("minidnn") and r["vs_best_peer"]]
    if not rows:
        return False
    cases = list(dict.fromkeys((r["net"], r["batch"]) for r in rows))
    engines = ["minidnn", "minidnn fused"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cases)), 4))
    width = 0.38
    for j, e in enumerate(engines):
        vals = [next((r["vs_best_peer"] for r in rows if (r["net"], r["batch"]) == c and r["engine"] == e),
                     0.0) for c in cases]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(cases))], vals, width, label=e)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{n}\nbatch {b}" for n, b in cases], fontsize=7)
    ax.set_ylabel("best peer's ms / minidnn's ms")
    busy = f", {out['busy_processes']} core(s) busy" if out.get("busy_processes") else ""
    ax.set_title(f"minidnn vs the best of PyTorch eager and ONNX Runtime ({out['threads']} threads{busy})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def onnx_session(torch, ort, model, tx, nt):
    """An ONNX Runtime session for the exported model (RuntimeError if the export fails)."""
    import tempfile
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", module="torch")
    path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    try:
        try:
            torch.onnx.export(model, (tx,), path, dynamo=False, opset_version=17)
        except TypeError:
            torch.onnx.export(model, (tx,), path, opset_version=17)
    except Exception as e:  # exporter missing pieces (e.g. onnxscript): skip the peer
        raise RuntimeError(f"ONNX export failed ({type(e).__name__}: {str(e)[:200]})") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = nt
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


if __name__ == "__main__":
    main()

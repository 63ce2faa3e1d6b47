"""dlib's published models: minidnn (as loaded, and fused) against dlib's own Python module,
same image, same thread count, interleaved in one run.

    python bench/bench_dlib.py [--models DIR] [--threads 2] [--rounds 7] [--out bench/results/dlib.json]

dlib's Python module (``pip install dlib``, or the wheel in ../shared/wheels) runs two of these
models: the CNN face detector (``cnn_face_detection_model_v1(img, upsample_num_times)``) and the
face descriptor (``face_recognition_model_v1.compute_face_descriptor(chip)``); the others are
timed in minidnn only. Each round times every implementation once, in turn, so that a busy
machine slows all of them alike; the table gives the median (and the fastest) of the rounds
and the speed-up of minidnn's median over dlib's. The inputs are dlib's reference inputs
(../shared/dlib-models/reference): the 512 x 512 astronaut image and its aligned 150 x 150
face chip. dlib is never a dependency of minidnn: without it only minidnn is timed.
"""
import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=os.environ.get("MINIDNN_DLIB_MODELS") or
                   os.path.join(os.path.dirname(ROOT), "shared", "dlib-models"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "dlib.json"))
    p.add_argument("--only", default=None, help="comma-separated case names")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU column instead (bench/results/dlib_gpu.json): each model fused on "
                        "'cuda' with graph replay, latency at batch 1 and images per second at a "
                        "large batch, beside the fused CPU net of the same machine")
    return p.parse_args()


def main():
    args = _args()
    if args.gpu:
        return gpu_main(args)
    n = str(args.threads)
    # every thread pool of both libraries: OpenMP (minidnn), OpenBLAS (dlib's wheel, scipy),
    # dlib's own thread pool (std::thread::hardware_concurrency: this machine's cores)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = n
    import numpy as np
    import minidnn as dnn
    from minidnn import dlib_zoo
    from minidnn.backends import cpu
    cpu.set_num_threads(args.threads)
    try:
        import dlib
    except ImportError:
        dlib = None
    blas = []
    try:
        from threadpoolctl import ThreadpoolController
        for lib in ThreadpoolController().lib_controllers:
            if lib.user_api == "blas" and dlib is not None and "dlib" in (lib.filepath or ""):
                lib.set_num_threads(args.threads)        # minidnn pins scipy's BLAS, not dlib's
                blas.append({"library": os.path.basename(lib.filepath), "version": lib.version,
                             "threads": lib.num_threads, "internal_api": lib.internal_api})
    except ImportError:
        pass

    M = args.models
    ref = os.path.join(M, "reference")
    img = np.load(os.path.join(ref, "py_cnn_face_detector.npz"))["image_astronaut"]
    chip = np.load(os.path.join(ref, "py_face_recognition_resnet_v1.npz"))["chip150_astronaut"]
    chip32 = np.load(os.path.join(ref, "cpp_gender.npz"))["images"][0]
    face = os.path.join(M, "mmod_human_face_detector.dat")
    resnet = os.path.join(M, "dlib_face_recognition_resnet_model_v1.dat")

    cases = []      # (name, what, {impl: callable})

    def add(name, what, path, loader, call, dlib_call=None):
        if not os.path.exists(path):
            return
        if args.only and name not in args.only.split(","):
            return
        impls = {"minidnn": lambda n=loader(path): call(n),
                 "minidnn fused": lambda n=dnn.fuse(loader(path)): call(n)}
        if dlib_call is not None and dlib is not None:
            impls["dlib"] = dlib_call
        cases.append((name, what, impls))

    det = dlib.cnn_face_detection_model_v1(face) if dlib is not None and os.path.exists(face) else None
    rec = dlib.face_recognition_model_v1(resnet) if dlib is not None and os.path.exists(resnet) else None
    for up in (0, 1):
        add(f"face_detector_up{up}", f"mmod_human_face_detector.dat, 512x512, upsample {up}", face,
            dlib_zoo.face_detector, lambda n, up=up: n(img, upsample=up),
            (lambda up=up: det(img, up)) if det is not None else None)
    add("face_descriptor", "dlib_face_recognition_resnet_model_v1.dat, one 150x150 chip", resnet,
        dlib_zoo.face_descriptor, lambda n: n(chip),
        (lambda: rec.compute_face_descriptor(chip)) if rec is not None else None)
    add("face_descriptor_x16", "the ResNet, a batch of 16 chips", resnet, dlib_zoo.face_descriptor,
        lambda n: n(np.stack([chip] * 16)),
        (lambda: rec.compute_face_descriptor([chip] * 16)) if rec is not None else None)
    add("densenet_face_descriptor", "face_recognition_densenet_model_v1.dat, one 150x150 chip",
        os.path.join(M, "face_recognition_densenet_model_v1.dat"), dlib_zoo.densenet_face_descriptor,
        lambda n: n(chip))
    add("vehicle_detector_rear", "mmod_rear_end_vehicle_detector.dat, 512x512",
        os.path.join(M, "mmod_rear_end_vehicle_detector.dat"), dlib_zoo.vehicle_detector,
        lambda n: n(img))
    add("gender_classifier", "dnn_gender_classifier_v1.dat, one 32x32 chip",
        os.path.join(M, "dnn_gender_classifier_v1.dat"), dlib_zoo.gender_classifier,
        lambda n: n(chip32))

    load_before = os.getloadavg()
    results = []
    for name, what, impls in cases:
        for f in impls.values():                 # warm up: compile, allocate, fault pages in
            f()
        times = {k: [] for k in impls}
        for _ in range(args.rounds):
            for k, f in impls.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        row = {"case": name, "what": what}
        for k, ts in times.items():
            row[k] = {"median_ms": 1e3 * float(np.median(ts)), "min_ms": 1e3 * float(np.min(ts)),
                      "all_ms": [round(1e3 * t, 2) for t in ts]}
        if "dlib" in times:
            for k in ("minidnn", "minidnn fused"):
                row[f"speedup {k}"] = row["dlib"]["median_ms"] / row[k]["median_ms"]
        row["fused_over_unfused"] = row["minidnn"]["median_ms"] / row["minidnn fused"]["median_ms"]
        results.append(row)
        _print_row(row)
    load_after = os.getloadavg()

    info = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "threads": args.threads, "rounds": args.rounds,
        "versions": {"python": platform.python_version(), "minidnn": dnn.__version__,
                     "numpy": np.__version__, "dlib": getattr(dlib, "__version__", None)},
        "dlib": None if dlib is None else {
            "DLIB_USE_BLAS": bool(getattr(dlib, "DLIB_USE_BLAS", False)),
            "DLIB_USE_LAPACK": bool(getattr(dlib, "DLIB_USE_LAPACK", False)),
            "DLIB_USE_CUDA": bool(getattr(dlib, "DLIB_USE_CUDA", False)),
            "blas": blas, "module": getattr(dlib, "__file__", None)},
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(_table(info))
    print(f"\nwrote {args.out} and {md}")


def gpu_main(args):
    """dlib's models on the GPU: latency (batch 1) and throughput (a large batch)."""
    import numpy as np
    import minidnn as dnn
    from minidnn import dlib_zoo, ops
    cu = ops.backend("cuda")
    M = args.models
    ref = os.path.join(M, "reference")
    img = np.load(os.path.join(ref, "py_cnn_face_detector.npz"))["image_astronaut"]
    chip = np.load(os.path.join(ref, "py_face_recognition_resnet_v1.npz"))["chip150_astronaut"]
    chip32 = np.load(os.path.join(ref, "cpp_gender.npz"))["images"][0]
    models = [  # name, file, loader, one input, the large batch
        ("face_detector", "mmod_human_face_detector.dat", dlib_zoo.face_detector, img, 16),
        ("vehicle_detector_rear", "mmod_rear_end_vehicle_detector.dat", dlib_zoo.vehicle_detector, img, 16),
        ("face_descriptor", "dlib_face_recognition_resnet_model_v1.dat", dlib_zoo.face_descriptor, chip, 256),
        ("densenet_face_descriptor", "face_recognition_densenet_model_v1.dat",
         dlib_zoo.densenet_face_descriptor, chip, 256),
        ("gender_classifier", "dnn_gender_classifier_v1.dat", dlib_zoo.gender_classifier, chip32, 1024),
    ]

    def timed(f, rounds):
        f()
        f()
        ts = []
        for _ in range(rounds):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return 1e3 * float(np.median(ts)), 1e3 * float(np.min(ts))

    results = []
    for name, file, loader, one, big in models:
        path = os.path.join(M, file)
        if not os.path.exists(path) or (args.only and name not in args.only.split(",")):
            continue
        cpu_net = dnn.fuse(loader(path))
        gpu_net = dnn.fuse(loader(path)).to("cuda")
        many = np.stack([one] * big)
        same = None
        if name.endswith("detector"):        # rectangles and labels equal, confidences within 1e-3
            a, b = cpu_net(one), gpu_net(one)
            same = len(a) == len(b) and all(p.rect == q.rect and p.label == q.label and
                                            abs(p.confidence - q.confidence) < 1e-3 for p, q in zip(a, b))
        row = {"case": name, "file": file, "large_batch": big, "same_detections": same}
        row["cpu_fused_ms"], _ = timed(lambda: cpu_net(one), max(3, args.rounds))
        row["cuda_ms"], row["cuda_min_ms"] = timed(lambda: gpu_net(one), 5 * args.rounds)
        ms, _ = timed(lambda: gpu_net(many), args.rounds)
        row["cuda_batch_ms"] = ms
        row["cuda_images_per_s"] = big / (ms / 1e3)
        results.append(row)
        print(f"{name:26s} cpu fused {row['cpu_fused_ms']:8.2f} ms   cuda {row['cuda_ms']:7.3f} ms "
              f"(min {row['cuda_min_ms']:.3f})   batch {big}: {row['cuda_images_per_s']:9.0f} images/s", flush=True)
    info = {"device": cu.device.name(), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "cpu_threads": "all (the CPU backend's default)", "rounds": args.rounds,
            "versions": {"python": platform.python_version(), "minidnn": dnn.__version__,
                         "numpy": np.__version__},
            "method": ("end to end per call of net(image) (detections or descriptors back on the host): "
                       "the input layer's tensor, the forward replayed as a CUDA graph, the loss's "
                       "labels; median of the rounds after two warm-up calls"),
            "results": results}
    out = os.path.join(os.path.dirname(args.out), "dlib_gpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(info, f, indent=1)
    lines = [f"# dlib's models on the GPU ({info['device']})", "",
             f"{info['method']}. CPU column: the same fused net on the GPU machine's CPU "
             f"({info['cpu']}, {info['cores']} cores).", "",
             "| model | CPU fused, batch 1 (ms) | CUDA, batch 1 (ms) | large batch | CUDA images/s | same detections |",
             "|---|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['cpu_fused_ms']:.2f} | {r['cuda_ms']:.3f} | {r['large_batch']} | "
                     f"{r['cuda_images_per_s']:.0f} | {'-' if r['same_detections'] is None else r['same_detections']} |")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _print_row(row):
    parts = [f"{row['case']:26s}"]
    for k in ("dlib", "minidnn", "minidnn fused"):
        if k in row:
            parts.append(f"{k} {row[k]['median_ms']:8.1f} ms")
    for k in ("speedup minidnn", "speedup minidnn fused"):
        if k in row:
            parts.append(f"{k.split(' ', 1)[1]} x{row[k]:.1f}")
    parts.append(f"fused/unfused x{row['fused_over_unfused']:.2f}")
    print("  ".join(parts), flush=True)


def _table(info):
    v = info["versions"]
    d = info["dlib"] or {}
    blas = ", ".join(f"{b['library']} {b['version']} ({b['threads']} threads)" for b in d.get("blas", [])) or "none found"
    lines = [
        "# dlib's models: minidnn against dlib", "",
        f"{info['machine']['cpu']}, {info['machine']['cores']} cores, {info['threads']} threads for each "
        f"library; load average {info['machine']['load_average_before'][0]:.2f} before, "
        f"{info['machine']['load_average_after'][0]:.2f} after (the machine is shared).",
        f"Python {v['python']}, minidnn {v['minidnn']}, NumPy {v['numpy']}, dlib {v['dlib']} "
        f"(DLIB_USE_BLAS={d.get('DLIB_USE_BLAS')}, BLAS: {blas}).",
        f"Median of {info['rounds']} interleaved rounds (fastest in brackets), ms; speed-up = dlib's "
        f"median / minidnn's.", "",
        "| model | input | dlib | minidnn | minidnn fused | speed-up (fused) | fused vs unfused |",
        "|---|---|---|---|---|---|---|"]
    for r in info["results"]:
        def cell(k):
            return f"{r[k]['median_ms']:.1f} ({r[k]['min_ms']:.1f})" if k in r else "-"
        sp = (f"{r['speedup minidnn']:.1f}x ({r['speedup minidnn fused']:.1f}x)"
              if "speedup minidnn" in r else "-")
        lines.append(f"| {r['case']} | {r['what']} | {cell('dlib')} | {cell('minidnn')} | "
                     f"{cell('minidnn fused')} | {sp} | {r['fused_over_unfused']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

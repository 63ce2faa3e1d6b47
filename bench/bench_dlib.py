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
    return p.parse_args()


def main():
    args = _args()
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

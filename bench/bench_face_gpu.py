"""dlib's CNN face detector end to end on the GPU: where the time of net(img) goes.

    python3 bench/bench_face_gpu.py [--model mmod_human_face_detector.dat] [--n 50]
                                    [--upsample 0] [--out bench/results/face_gpu.json]

The net is dlib_zoo.face_detector(model), minidnn.fuse()d, net.to("cuda"); the image is the
512 x 512 reference image of ../shared/dlib-models/reference/py_cnn_face_detector.npz
(MINIDNN_DLIB_MODELS overrides the folder). Each row is the median over N runs, after
warm-up, of wall-clock time with the stream synchronised at the end of the part:

    pyramid    the input layer's to_tensor on "cuda" (upload, pyramid_up, planes, levels)
    host pyr   the same on the CPU (what it replaced), for comparison
    trunk      the forward from the device tensor to the score map on the host
               (the copy into the program's input, the CUDA graph, the download)
    detection  the loss's labels (mmod detections and NMS) on the downloaded scores
    end to end net(img)

Writes the table and the device, library versions and settings to the JSON file.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minidnn  # noqa: E402
from minidnn import dlib_zoo  # noqa: E402


def models_dir():
    d = os.environ.get("MINIDNN_DLIB_MODELS")
    return Path(d) if d else ROOT.parent / "shared" / "dlib-models"


def median_ms(fn, n, sync):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(models_dir() / "mmod_human_face_detector.dat"))
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--upsample", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "face_gpu.json"))
    a = ap.parse_args(argv)

    img = np.load(models_dir() / "reference" / "py_cnn_face_detector.npz")["image_astronaut"]
    net = dlib_zoo.face_detector(a.model)
    minidnn.fuse(net)
    net.to("cuda")
    from minidnn.backends import cuda as cu
    sync = cu.synchronize
    inp = net.chain()[-1].layer_details()
    top = net.layer_details()
    up = a.upsample
    for _ in range(5):                                 # build plans, capture the graph
        dets = net(img, upsample=up)

    def pyramid():
        return inp.to_tensor(img, "cuda", 20, upsample=up)

    def host_pyramid():
        return inp.to_tensor(img, "cpu", 20, upsample=up)

    b = pyramid()
    b.node = net
    sync()

    def trunk():
        return net._forward_tensor(b.tensor)

    out = trunk()

    def detection():
        return top.labels(out, b)

    def end_to_end():
        return net(img, upsample=up)

    rows = {}
    for name, fn in (("pyramid", pyramid), ("host pyr", host_pyramid), ("trunk", trunk),
                     ("detection", detection), ("end to end", end_to_end)):
        fn()
        sync()
        med, best = median_ms(fn, a.n if name != "host pyr" else max(5, a.n // 5), sync)
        rows[name] = {"median_ms": round(med, 4), "min_ms": round(best, 4)}

    print(f"face detector, {img.shape[1]}x{img.shape[0]} image, upsample {up}, "
          f"input tensor {tuple(b.tensor.shape)}, {cu.device.name()}")
    print("| part | median ms | min ms |")
    print("|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['median_ms']:.3f} | {v['min_ms']:.3f} |")
    print("detections:", [(d.rect, round(d.confidence, 5)) for d in dets])

    import pycuda
    import pycuda.driver as drv
    res = {
        "device": cu.device.name(),
        "compute_capability": list(cu.device.compute_capability()),
        "cuda_driver": drv.get_driver_version(),
        "cuda_runtime_headers": drv.get_version(),
        "pycuda": pycuda.VERSION_TEXT,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "n": a.n, "upsample": up, "image": list(img.shape),
        "input_tensor": list(b.tensor.shape),
        "rows": rows,
        "detections": [[*d.rect, d.confidence] for d in dets],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

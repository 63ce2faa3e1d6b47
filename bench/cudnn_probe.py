"""Probe cuDNN's fused convolution: every forward algorithm x activation on a few shapes.

    python3 bench/cudnn_probe.py > probe.json

Prints (JSON) the library found, its version and origin, the sub-libraries
preloaded, and per (shape, algorithm): cuDNN's heuristic rank, the workspace
query's answer, the status of the fused call (cudnnConvolutionBiasActivationForward)
with identity and with relu and of the plain cudnnConvolutionForward, each
result's error against the float64 reference below. This is how the table
behind minidnn/backends/cudnn/policy.py's fused_policy was measured; rerun it
on a new cuDNN build before extending the policy to it.

Needs a GPU, PyCUDA and cuDNN; it creates its own CUDA context (pycuda.autoinit)
and reaches into the cudnn package's plans and bindings on purpose.
"""
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the checkout's minidnn

from minidnn.backends.cudnn import (ALGO, FWD_ALGOS, IDENTITY, RELU, library_path,  # noqa: E402
                                    load, status_name, unavailable_reason, version,
                                    version_string)
from minidnn.backends.cudnn.bindings import _ONE, _ZERO, _ref, _vp  # noqa: E402
from minidnn.backends.cudnn.library import _state  # noqa: E402
from minidnn.backends.cudnn.plans import _activation, _current_context, _Plan  # noqa: E402

_PROBE_SHAPES = (   # (x shape, w shape, stride, pad)
    ((2, 16, 14, 14), (32, 16, 1, 1), (1, 1), (0, 0)),
    ((2, 16, 14, 14), (32, 16, 3, 3), (1, 1), (1, 1)),
    ((1, 8, 15, 17), (16, 8, 3, 3), (2, 2), (0, 0)),
    ((4, 3, 20, 20), (8, 3, 5, 5), (1, 1), (2, 2)),
    ((1, 3, 32, 32), (16, 3, 7, 7), (2, 2), (3, 3)),
)


def _reference(x, w, b, stride, pad, relu):
    import numpy as np
    n, k, r, c = x.shape
    f, _, nr, nc = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    ro = 1 + (r + 2 * pad[0] - nr) // stride[0]
    co = 1 + (c + 2 * pad[1] - nc) // stride[1]
    y = np.zeros((n, f, ro, co))
    for i in range(nr):
        for j in range(nc):
            patch = xp[:, :, i:i + stride[0] * ro:stride[0], j:j + stride[1] * co:stride[1]]
            y += np.einsum("nkrc,fk->nfrc", patch, w[:, :, i, j].astype(np.float64))
    if b is not None:
        y += b.reshape(1, f, 1, 1)
    return np.maximum(y, 0) if relu else y


def probe():
    """Try the fused call with every algorithm x activation on a few shapes; return a dict."""
    import numpy as np
    import pycuda.driver as drv
    import pycuda.gpuarray as ga
    out = {"library": library_path(), "version": version(), "version_text": version_string(),
           "origin": _state.get("origin"), "reason": unavailable_reason(),
           "sublibs_preloaded": [os.path.basename(s) for s in _state["sublibs"]]}
    if load() is None:
        return out
    lib = _state["lib"]
    if hasattr(lib, "cudnnGetCudartVersion"):
        out["cudart"] = int(lib.cudnnGetCudartVersion())
    out["device"] = drv.Context.get_device().name()
    v = _state["version"]
    rng = np.random.default_rng(0)
    rows = []
    key_ctx, ctx = _current_context()
    for xs, ws, stride, pad in _PROBE_SHAPES:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        b = rng.standard_normal(ws[0]).astype(np.float32)
        p = _Plan(ctx, xs, ws, stride, pad)
        heur = [a[0] for a in p.ranked_algos() if a[1] == 0]
        xg, wg, bg = ga.to_gpu(x), ga.to_gpu(w), ga.to_gpu(b)
        yg = ga.empty(p.ys, np.float32)
        for algo in FWD_ALGOS:
            row = {"x": xs, "w": ws, "stride": stride, "pad": pad, "algo": algo,
                   "heuristic_rank": heur.index(algo) if algo in heur else None}
            code, size = p._workspace_for(algo)
            row["workspace"] = status_name(v, code) if code else size
            size = 0 if code else size          # the calls still answer for themselves
            ctx.ensure_workspace(size)
            for act in (IDENTITY, RELU):
                ref = _reference(x, w, b, stride, pad, act == RELU)
                scale = max(1.0, float(np.abs(ref).max()))
                yg.fill(np.float32(np.nan))
                code = lib.cudnnConvolutionBiasActivationForward(
                    ctx.handle, _ref(_ONE), p.x_desc, _vp(xg.ptr), p.w_desc, _vp(wg.ptr),
                    p.conv_desc, ALGO[algo], ctx.ws_ptr(), size, _ref(_ZERO), p.y_desc,
                    _vp(yg.ptr), p.b_desc, _vp(bg.ptr), _activation(act), p.y_desc, _vp(yg.ptr))
                drv.Context.synchronize()
                row["fused_" + act] = status_name(v, code)
                if code == 0:
                    row["fused_" + act + "_err"] = float(np.abs(yg.get() - ref).max()) / scale
            yg.fill(np.float32(np.nan))
            code = lib.cudnnConvolutionForward(
                ctx.handle, _ref(_ONE), p.x_desc, _vp(xg.ptr), p.w_desc, _vp(wg.ptr),
                p.conv_desc, ALGO[algo], ctx.ws_ptr(), size, _ref(_ZERO), p.y_desc, _vp(yg.ptr))
            drv.Context.synchronize()
            row["conv"] = status_name(v, code)
            if code == 0:
                ref = _reference(x, w, None, stride, pad, False)
                row["conv_err"] = float(np.abs(yg.get() - ref).max()) / max(1.0, np.abs(ref).max())
            rows.append(row)
        p.destroy(lib)
    out["rows"] = rows
    # which cuDNN files ended up mapped into this process
    try:
        with open("/proc/self/maps") as fh:
            out["mapped"] = sorted({ln.split()[-1] for ln in fh if "libcudnn" in ln})
    except OSError:
        pass
    return out


if __name__ == "__main__":
    try:
        import pycuda.autoinit  # noqa: F401
    except Exception as e:
        print(json.dumps({"error": f"no CUDA context: {e}"}))
        sys.exit(1)
    print(json.dumps(probe(), default=str))

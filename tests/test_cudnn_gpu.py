"""The cuDNN path on a GPU (run with --gpu): cuDNN (minidnn/backends/cudnn/) vs a
float64 NumPy reference and vs the own kernels, the fallback through fault
injection and through the DIRECT algorithm, backend_info, activations cuDNN
lacks, and every cuDNN build on the machine (each in its own process, through
MINIDNN_CUDNN_PATH).
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minidnn.backends import cudnn
from minidnn.backends.cudnn import plans as cudnn_plans

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (x shape, w shape, stride, pad): odd sizes, strides, paddings, 1x1, batch 1
SHAPES = [
    ((2, 3, 17, 19), (8, 3, 3, 3), (1, 1), (1, 1)),
    ((1, 16, 14, 14), (32, 16, 1, 1), (1, 1), (0, 0)),
    ((3, 8, 15, 13), (5, 8, 5, 3), (2, 1), (2, 1)),
    ((1, 3, 32, 32), (16, 3, 7, 7), (2, 2), (3, 3)),
    ((4, 64, 8, 8), (64, 64, 3, 3), (1, 1), (1, 1)),
]


@pytest.fixture(scope="module")
def gpu():
    """A current CUDA context (the backend's when it loads, else PyCUDA's own) and cuDNN."""
    try:
        from minidnn import ops
        ops.backend("cuda")
    except Exception:
        pass
    import pycuda.driver as drv
    if drv.Context.get_current() is None:
        import pycuda.autoinit  # noqa: F401
    if not cudnn.available():
        pytest.skip(f"cuDNN not available: {cudnn.unavailable_reason()}")
    yield drv
    cudnn.reset()


@pytest.fixture
def fresh(gpu):
    cudnn.reset()
    cudnn.force_algorithm(None)
    cudnn.set_fused(None)
    yield gpu
    cudnn.force_algorithm(None)
    cudnn.set_fused(None)


def reference(x, w, b, stride, pad, relu):
    """Slow, obviously correct: float64 cross-correlation with zero padding."""
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


def data(xs, ws, bias, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = (rng.standard_normal(ws) / np.sqrt(np.prod(ws[1:]))).astype(np.float32)
    b = rng.standard_normal(ws[0]).astype(np.float32) if bias else None
    return x, w, b


def run(x, w, b, stride, pad, relu, fn=None):
    import pycuda.gpuarray as ga
    fn = fn or cudnn.conv2d
    xs, ws = x.shape, w.shape
    ys = (xs[0], ws[0], 1 + (xs[2] + 2 * pad[0] - ws[2]) // stride[0],
          1 + (xs[3] + 2 * pad[1] - ws[3]) // stride[1])
    y = ga.to_gpu(np.full(ys, np.nan, np.float32))
    fn(ga.to_gpu(x), ga.to_gpu(w), None if b is None else ga.to_gpu(b), y,
       stride[0], stride[1], pad[0], pad[1], relu)
    import pycuda.driver as drv
    drv.Context.synchronize()          # the op ran on the backend's stream
    return y.get()


def close(got, ref, tol=2e-5):
    # fp32 FMA accumulation: ~1e-6 relative; TF32 would be ~1e-3 and fail here.
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got.astype(np.float64) - ref).max()) / scale
    assert np.isfinite(got).all() and err < tol, f"max error {err:.3g} (relative to {scale:.3g})"


def test_library_and_version(gpu):
    v = cudnn.version()
    assert cudnn.version_string() == cudnn.version_text(v)
    assert os.path.isfile(cudnn.library_path())
    want = os.environ.get("MINIDNN_TEST_CUDNN_DIR")
    if want:       # run by test_every_build: the file asked for is the one in use
        assert os.path.dirname(cudnn.library_path()) == os.path.realpath(want)
    print(f"cuDNN {cudnn.version_string()} from {cudnn.library_path()}")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1])))
def test_cudnn_vs_numpy(fresh, shape, bias, relu):
    xs, ws, stride, pad = shape
    x, w, b = data(xs, ws, bias)
    close(run(x, w, b, stride, pad, relu), reference(x, w, b, stride, pad, relu))
    info = cudnn.conv_path(xs, ws, *stride, *pad, relu)
    assert info["calls"] == 1 and info["algorithm"] in cudnn.FWD_ALGOS
    expected = cudnn.fused_policy(cudnn.version(), info["algorithm"],
                                  cudnn.RELU if relu else cudnn.IDENTITY)
    assert info["path"] == expected or info["fallback"]


def test_repeated_calls_reuse_the_plan(fresh):
    xs, ws, stride, pad = SHAPES[0]
    x, w, b = data(xs, ws, True)
    first = run(x, w, b, stride, pad, True)
    for _ in range(3):
        np.testing.assert_array_equal(run(x, w, b, stride, pad, True), first)
    assert cudnn.conv_path(xs, ws, *stride, *pad, True)["calls"] == 4
    assert len(cudnn_plans._plans) == 1


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s[1])))
def test_fault_injection_falls_back_to_the_same_result(fresh, shape, relu):
    xs, ws, stride, pad = shape
    x, w, b = data(xs, ws, True, seed=1)
    cudnn.set_fused(False)
    unfused = run(x, w, b, stride, pad, relu)
    cudnn.reset()
    cudnn.set_fused(None)
    with cudnn.inject_not_supported() as inj:
        injected = run(x, w, b, stride, pad, relu)
        path = cudnn.conv_path(xs, ws, *stride, *pad, relu)
    np.testing.assert_array_equal(injected, unfused)       # the same calls: bit for bit
    close(injected, reference(x, w, b, stride, pad, relu))
    policy = cudnn.fused_policy(cudnn.version(), path["algorithm"],
                                cudnn.RELU if relu else cudnn.IDENTITY)
    if policy == cudnn.FUSED:
        assert inj["count"] == 1 and path["fallback"] == "NOT_SUPPORTED"
        assert path["path"] == cudnn.UNFUSED
    # remembered after the injection ends
    again = run(x, w, b, stride, pad, relu)
    np.testing.assert_array_equal(again, unfused)
    assert cudnn.conv_path(xs, ws, *stride, *pad, relu)["path"] == cudnn.UNFUSED


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1])))
def test_forced_direct_works(fresh, shape, relu):
    """Forcing DIRECT gives the right result: through DIRECT where cuDNN runs it,
    else through the fallback (the refusal is remembered and reported)."""
    xs, ws, stride, pad = shape
    x, w, b = data(xs, ws, True, seed=2)
    cudnn.force_algorithm("DIRECT")
    first = run(x, w, b, stride, pad, relu)
    close(first, reference(x, w, b, stride, pad, relu))
    info = cudnn.conv_path(xs, ws, *stride, *pad, relu)
    print(f"DIRECT {xs} {ws} relu={relu}: {info}")
    if info["algorithm"] != "DIRECT":
        assert "DIRECT: NOT_SUPPORTED" in info["note"], info
    remembered = dict(cudnn_plans._fallback)
    np.testing.assert_array_equal(run(x, w, b, stride, pad, relu), first)
    assert cudnn_plans._fallback == remembered          # nothing new was tried


def test_direct_is_a_real_fallback_on_9_19(fresh):
    """Measured: cuDNN 9.19 answers the fused call with DIRECT NOT_SUPPORTED."""
    if cudnn.version() != 91900:
        pytest.skip(f"measured on cuDNN 9.19, this is {cudnn.version_string()}")
    xs, ws, stride, pad = SHAPES[0]
    x, w, b = data(xs, ws, True, seed=3)
    cudnn.force_algorithm("DIRECT")
    got = run(x, w, b, stride, pad, True)
    key = (xs, ws, stride, pad, "DIRECT", cudnn.RELU)
    assert cudnn_plans._fallback.get(key, "").startswith("NOT_SUPPORTED"), cudnn_plans._fallback
    close(got, reference(x, w, b, stride, pad, True))
    np.testing.assert_array_equal(run(x, w, b, stride, pad, True), got)


def test_stream_is_the_backends(fresh):
    import pycuda.driver as drv
    s = drv.Stream()
    cudnn.set_stream(s)
    try:
        xs, ws, stride, pad = SHAPES[1]
        x, w, b = data(xs, ws, True)
        close(run(x, w, b, stride, pad, True), reference(x, w, b, stride, pad, True))
        ctx = next(iter(cudnn_plans._contexts.values()))
        assert ctx.stream == s.handle
    finally:
        cudnn.set_stream(None)
        cudnn_plans._settings["stream"] = None


def _own_kernels():
    try:
        from minidnn import ops
        be = ops.backend("cuda")
        return be if hasattr(be, "conv2d") else None
    except Exception:
        return None


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1])))
def test_cudnn_vs_own_kernels(fresh, shape, relu, monkeypatch):
    be = _own_kernels()
    if be is None:
        pytest.skip("minidnn.backends.cuda is not usable here")
    if be.conv2d is cudnn.conv2d:
        pytest.skip("the backend's conv2d is the cuDNN path itself")
    be.set_conv_route("own")                             # reach the own kernel
    xs, ws, stride, pad = shape
    x, w, b = data(xs, ws, True, seed=4)
    try:
        own = run(x, w, b, stride, pad, relu, fn=be.conv2d)
    finally:
        be.set_conv_route("auto")
    via = run(x, w, b, stride, pad, relu)
    scale = max(1.0, float(np.abs(via).max()))
    assert float(np.abs(own - via).max()) / scale < 2e-5


@pytest.mark.parametrize("relu", [False, True])
def test_graph_capture_replays_cudnn(fresh, relu):
    """cuDNN calls on the backend's stream can be captured (warm-up plans the shape)."""
    import pycuda.driver as drv
    import pycuda.gpuarray as ga
    be = _own_kernels()
    if be is None or not hasattr(be, "capture"):
        pytest.skip("minidnn.backends.cuda with capture() is not usable here")
    xs, ws, stride, pad = SHAPES[4]
    x, w, b = data(xs, ws, True, seed=6)
    xg, wg, bg = ga.to_gpu(x), ga.to_gpu(w), ga.to_gpu(b)
    yg = ga.zeros((xs[0], ws[0], xs[2], xs[3]), np.float32)
    g = be.capture(lambda: cudnn.conv2d(xg, wg, bg, yg, *stride, *pad, relu))
    yg.fill(np.float32(0))
    drv.Context.synchronize()
    x2 = np.random.default_rng(7).standard_normal(xs).astype(np.float32)
    xg.set(x2)
    g.launch()
    drv.Context.synchronize()
    close(yg.get(), reference(x2, w, b, stride, pad, relu))


def test_backend_info_reports_each_convolution(fresh):
    import minidnn as dnn
    be = _own_kernels()
    if be is None:
        pytest.skip("minidnn.backends.cuda is not usable here")
    net = dnn.fc(10, dnn.relu(dnn.con(16, 3, 3, 1, 1, dnn.con(8, 5, 5, 2, 2, dnn.input_tensor()))))
    net.to("cuda")
    x = np.random.default_rng(5).standard_normal((2, 3, 21, 21)).astype(np.float32)
    net(x)
    info = dnn.backend_info(net)
    print(info)
    assert info["device"] == "cuda" and info["cudnn"] == cudnn.version_string()
    assert len(info["convolutions"]) == 2
    for c in info["convolutions"]:
        assert c["path"] in ("fused cuDNN call", "unfused cuDNN calls", "own kernel")
        if c["path"] != "own kernel":
            assert c["algorithm"] in cudnn.FWD_ALGOS
    assert [c["relu"] for c in info["convolutions"]] == [False, True]
    assert [c["act"] for c in info["convolutions"]] == ["identity", "relu"]


# -- conv2d_residual: z added before the activation (fused: alpha2 = 1) ----------------
def run_res(x, w, b, z, stride, pad, relu, fn=None):
    import pycuda.driver as drv
    import pycuda.gpuarray as ga
    fn = fn or cudnn.conv2d_residual
    y = ga.to_gpu(np.full(z.shape, np.nan, np.float32))
    zg = ga.to_gpu(z)
    fn(ga.to_gpu(x), ga.to_gpu(w), None if b is None else ga.to_gpu(b), zg, y,
       stride[0], stride[1], pad[0], pad[1], relu)
    drv.Context.synchronize()
    assert np.array_equal(zg.get(), z)          # z is only read
    return y.get()


def out_shape(xs, ws, stride, pad):
    return (xs[0], ws[0], 1 + (xs[2] + 2 * pad[0] - ws[2]) // stride[0],
            1 + (xs[3] + 2 * pad[1] - ws[3]) // stride[1])


def reference_res(x, w, b, z, stride, pad, relu):
    y = reference(x, w, b, stride, pad, False) + z
    return np.maximum(y, 0) if relu else y


def residual(xs, ws, stride, pad, seed=0):
    return np.random.default_rng(seed + 100).standard_normal(
        out_shape(xs, ws, stride, pad)).astype(np.float32)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1])))
def test_cudnn_residual_vs_numpy(fresh, shape, bias, relu):
    xs, ws, stride, pad = shape
    x, w, b = data(xs, ws, bias)
    z = residual(xs, ws, stride, pad)
    close(run_res(x, w, b, z, stride, pad, relu), reference_res(x, w, b, z, stride, pad, relu))
    info = cudnn.conv_path(xs, ws, *stride, *pad, relu, residual=True)
    assert info["calls"] == 1 and info["algorithm"] in cudnn.FWD_ALGOS
    expected = cudnn.fused_policy(cudnn.version(), info["algorithm"],
                                  cudnn.RELU if relu else cudnn.IDENTITY)
    assert info["path"] == expected or info["fallback"]
    assert cudnn.conv_path(xs, ws, *stride, *pad, relu)["calls"] == 0   # conv2d's own count


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s[1])))
def test_residual_fault_injection_falls_back_to_the_same_result(fresh, shape, relu):
    xs, ws, stride, pad = shape
    x, w, b = data(xs, ws, True, seed=1)
    z = residual(xs, ws, stride, pad, seed=1)
    cudnn.set_fused(False)
    unfused = run_res(x, w, b, z, stride, pad, relu)
    cudnn.reset()
    cudnn.set_fused(None)
    with cudnn.inject_not_supported() as inj:
        injected = run_res(x, w, b, z, stride, pad, relu)
        path = cudnn.conv_path(xs, ws, *stride, *pad, relu, residual=True)
    np.testing.assert_array_equal(injected, unfused)       # the same calls: bit for bit
    close(injected, reference_res(x, w, b, z, stride, pad, relu))
    policy = cudnn.fused_policy(cudnn.version(), path["algorithm"],
                                cudnn.RELU if relu else cudnn.IDENTITY)
    if policy == cudnn.FUSED:
        assert inj["count"] == 1 and path["fallback"] == "NOT_SUPPORTED"
        assert path["path"] == cudnn.UNFUSED
        # the residual's fallback is its own: plain conv2d still tries the fused call
        assert cudnn.conv_path(xs, ws, *stride, *pad, relu)["path"] == cudnn.FUSED
    again = run_res(x, w, b, z, stride, pad, relu)         # remembered after the injection
    np.testing.assert_array_equal(again, unfused)
    assert cudnn.conv_path(xs, ws, *stride, *pad, relu, residual=True)["path"] == cudnn.UNFUSED
    close(run(x, w, b, stride, pad, relu), reference(x, w, b, stride, pad, relu))


def test_residual_rejects_aliasing(fresh):
    import pycuda.gpuarray as ga
    xs, ws, stride, pad = SHAPES[0]
    x, w, b = data(xs, ws, True)
    xg, wg, bg = ga.to_gpu(x), ga.to_gpu(w), ga.to_gpu(b)
    ys = out_shape(xs, ws, stride, pad)
    y = ga.zeros(ys, np.float32)
    with pytest.raises(ValueError, match="z"):
        cudnn.conv2d_residual(xg, wg, bg, y, y, *stride, *pad, True)
    buf = ga.zeros((ys[0] + 1,) + ys[1:], np.float32)
    with pytest.raises(ValueError, match="overlap"):
        cudnn.conv2d_residual(xg, wg, bg, buf[1:], buf[:-1], *stride, *pad, True)
    with pytest.raises(ValueError, match="shape"):
        cudnn.conv2d_residual(xg, wg, bg, ga.zeros((1,) + ys[1:], np.float32), y,
                              *stride, *pad, True)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1])))
def test_residual_own_and_cudnn_routes(fresh, shape, relu):
    """The backend's conv2d_residual on each route (and cuDNN's fallback through fault
    injection) against the reference; conv_route reports the residual route."""
    be = _own_kernels()
    if be is None or not hasattr(be, "conv2d_residual"):
        pytest.skip("minidnn.backends.cuda with conv2d_residual is not usable here")
    xs, ws, stride, pad = shape
    x, w, b = data(xs, ws, True, seed=8)
    z = residual(xs, ws, stride, pad, seed=8)
    ref = reference_res(x, w, b, z, stride, pad, relu)
    got = {}
    try:
        for route in ("own", "cudnn", "fallback"):
            be.set_conv_route("cudnn" if route == "fallback" else route)
            if route == "fallback":
                cudnn.reset()
                with cudnn.inject_not_supported():
                    got[route] = run_res(x, w, b, z, stride, pad, relu, fn=be.conv2d_residual)
                info = cudnn.conv_path(xs, ws, *stride, *pad, relu, residual=True)
                assert info["path"] == cudnn.UNFUSED, info
            else:
                got[route] = run_res(x, w, b, z, stride, pad, relu, fn=be.conv2d_residual)
            assert be.conv_route(xs, ws, *stride, *pad, relu, residual=True) == \
                ("own" if route == "own" else "cudnn")
            assert be.conv_route(xs, ws, *stride, *pad, relu) is None
            close(got[route], ref)
    finally:
        be.set_conv_route("auto")
    scale = max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(got["own"] - got["cudnn"]).max()) / scale < 2e-5


@pytest.mark.parametrize("fused", [True, False])
def test_graph_capture_replays_cudnn_residual(fresh, fused):
    """The fused residual call and the unfused calls (AddTensor(z)) replay in a graph."""
    import pycuda.driver as drv
    import pycuda.gpuarray as ga
    be = _own_kernels()
    if be is None or not hasattr(be, "capture"):
        pytest.skip("minidnn.backends.cuda with capture() is not usable here")
    cudnn.set_fused(None if fused else False)
    xs, ws, stride, pad = SHAPES[4]
    x, w, b = data(xs, ws, True, seed=6)
    z = residual(xs, ws, stride, pad, seed=6)
    xg, wg, bg, zg = ga.to_gpu(x), ga.to_gpu(w), ga.to_gpu(b), ga.to_gpu(z)
    yg = ga.zeros(z.shape, np.float32)
    g = be.capture(lambda: cudnn.conv2d_residual(xg, wg, bg, zg, yg, *stride, *pad, True))
    yg.fill(np.float32(np.nan))
    drv.Context.synchronize()
    rng = np.random.default_rng(7)
    x2 = rng.standard_normal(xs).astype(np.float32)
    z2 = rng.standard_normal(z.shape).astype(np.float32)
    xg.set(x2)
    zg.set(z2)
    g.launch()
    drv.Context.synchronize()
    close(yg.get(), reference_res(x2, w, b, z2, stride, pad, True))
    g.close()


def test_one_build_per_process(gpu):
    """Every libcudnn file mapped comes from the folder of the library in use."""
    xs, ws, stride, pad = SHAPES[0]
    x, w, b = data(xs, ws, True)
    run(x, w, b, stride, pad, True)
    with open("/proc/self/maps") as f:
        mapped = {ln.split()[-1] for ln in f if "libcudnn" in ln}
    folders = {os.path.dirname(os.path.realpath(m)) for m in mapped}
    assert folders == {os.path.dirname(cudnn.library_path())}, mapped


# -- every cuDNN build on the machine, each in its own process ------------------------
def builds():
    """libcudnn.so.N files: the pip wheel's (PyTorch's environment) and the system's."""
    found = []
    try:
        import nvidia.cudnn
        for root in nvidia.cudnn.__path__:
            found += sorted(glob.glob(os.path.join(root, "lib", "libcudnn.so.[0-9]")))
    except ImportError:
        pass
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        for ln in out.splitlines():
            if ln.split("=>")[0].split()[:1] in (["libcudnn.so.9"], ["libcudnn.so.8"]):
                found.append(ln.split("=>")[-1].strip())
    except OSError:
        pass
    for pattern in ("/usr/lib/x86_64-linux-gnu/libcudnn.so.[0-9]",
                    "/usr/local/cuda/lib64/libcudnn.so.[0-9]", "/usr/lib64/libcudnn.so.[0-9]"):
        found += glob.glob(pattern)
    out, seen = [], set()
    for f in found:
        real = os.path.realpath(f)
        if os.path.isfile(real) and real not in seen:
            seen.add(real)
            out.append(f)
    return out


def test_every_build_loads_and_passes(gpu):
    libs = builds()
    print("cuDNN builds:", libs)
    if os.environ.get("MINIDNN_TEST_CUDNN_DIR"):
        pytest.skip("already inside one build's run")
    assert libs, "no cuDNN build found on this machine"
    results = {}
    for lib in libs:
        env = dict(os.environ, MINIDNN_CUDNN_PATH=lib,
                   MINIDNN_TEST_CUDNN_DIR=os.path.dirname(os.path.realpath(lib)),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        probe = subprocess.run([sys.executable, "-c",
                                "from minidnn.backends import cudnn; import json;"
                                "print(json.dumps([cudnn.version_string(), cudnn.library_path(),"
                                " cudnn.unavailable_reason()]))"],
                               env=env, capture_output=True, text=True, timeout=120)
        r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "--gpu",
                            "-q", "-p", "no:cacheprovider", "-k", "not every_build"],
                           env=env, capture_output=True, text=True, timeout=110, cwd=ROOT)
        summary = (r.stdout.strip().splitlines() or [""])[-1]
        results[lib] = (probe.stdout.strip(), r.returncode, summary)
        print(f"{lib}: {probe.stdout.strip()} -> {summary}")
        if r.returncode != 0:
            print(r.stdout[-4000:], r.stderr[-2000:])
    bad = {k: v for k, v in results.items() if v[1] != 0}
    assert not bad, json.dumps(bad, indent=1)

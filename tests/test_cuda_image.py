"""dlib's image pyramid input on the GPU (kernels/cuda/image.cu, backends/cuda/image_ops.py)
against the CPU backend (kernels/cpu/image.pyx, itself dlib's arithmetic bit for bit).

The tests marked gpu run with `pytest --gpu`: the tensor a pyramid input layer builds on
"cuda" must equal the CPU's exactly (assert_array_equal: the kernels do the CPU's float
operations in its order, without FMA contraction), for the 512 x 512 reference image, odd
sizes, RGB and grayscale layers, upsample 0 and 1, batches; the ops tiled_pyramid and
resize_image_u8 on GPUArrays likewise; the face detector on "cuda" finds dlib's
detections. The unmarked tests need no GPU: image.cu parses with source.py's signature
parser (and compiles with nvcc when it is on PATH), and a NumPy emulation of image.cu's
arithmetic on image_geometry.py's tables equals the CPU kernels bit for bit.
"""
import importlib
import importlib.util
import pathlib
import shutil
import threading

import numpy as np
import pytest

import minidnn as dnn
from minidnn import ops
from minidnn.layers import input as I

gpu = pytest.mark.gpu
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _by_path(name, rel):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _source():
    return _by_path("minidnn_cuda_source_img", "minidnn/backends/cuda/source.py")


def _geometry():
    return _by_path("minidnn_cuda_image_geometry", "minidnn/backends/cuda/image_geometry.py")


def _image(h, w, ch=3, seed=0):
    rng = np.random.default_rng(seed + 7919 * h + w)
    shape = (h, w, 3) if ch == 3 else (h, w)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    # smooth parts and the extremes, as photographs have
    img[: h // 2] = np.clip(img[: h // 2].astype(int) // 4 + 100, 0, 255).astype(np.uint8)
    img[0, 0] = 255
    img[-1, -1] = 0
    return img


SIZES = [(512, 512), (37, 53), (600, 401), (6, 6), (7, 9), (11, 5), (20, 31), (1, 40),
         (5, 1)]


# ---------------------------------------------------------------------------- GPU-free
def test_image_cu_parses_with_the_signature_parser():
    src = _source()
    assert "image" in src.FAMILIES
    sigs = src.signatures("image")
    assert set(sigs) == {"pyramid_level", "pyramid_levels_block", "image_planes", "resize_u8"}
    assert sigs["pyramid_level"].format == "PPPPPPPiiqi"
    assert sigs["pyramid_levels_block"].format == "PPPPPPPiiqi"
    assert sigs["image_planes"].names == ("img", "x", "N", "H", "W", "ch", "R", "C", "left",
                                          "top", "m0", "m1", "m2")
    assert sigs["image_planes"].format == "PPiiiiiiiifff"
    assert sigs["resize_u8"].format == "PPiiiiiii" + "P" * 6
    # every Kernel("image", ...) of image_ops.py names one of them
    import re
    code = (ROOT / "minidnn" / "backends" / "cuda" / "image_ops.py").read_text()
    launched = set(re.findall(r'Kernel\("image", "(\w+)"', code))
    assert launched == set(sigs)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_image_cu_compiles_with_nvcc():
    """What PyCUDA would compile (source.py's check: same text, options, include path)."""
    assert _source()._main(["--nvcc", "--arch", "sm_90", "image"]) == 0


def _emulate_resize(src, dnr, dnc, geo):
    """image.cu's resize_px on one float32 plane, in NumPy float32/float64 (each op rounded
    as the intrinsics round it)."""
    snr, snc = src.shape
    nvec, ci, cf, cd, ri, rf, rd = geo.resize_tables(snr, snc, dnr, dnc)
    st, sb = src[ri[:, 0]], src[ri[:, 1]]
    l, r = ci[:, 0], ci[:, 1]
    wl, wr = cf[:, 0][None, :], cf[:, 1][None, :]
    fitb, ftb = rf[:, 0][:, None], rf[:, 1][:, None]
    tlf, trf, blf, brf = fitb * wl, fitb * wr, ftb * wl, ftb * wr
    out = tlf * st[:, l]
    out = out + trf * st[:, r]
    out = out + blf * sb[:, l]
    out = out + brf * sb[:, r]
    a = (wl * st[:, l] + wr * st[:, r]).astype(np.float64)
    b = (wl * sb[:, l] + wr * sb[:, r]).astype(np.float64)
    tail = (rd[:, 0][:, None] * a + rd[:, 1][:, None] * b).astype(np.float32)
    return np.where(np.arange(dnc)[None, :] < nvec, out, tail)


def _emulate_resize_u8(img, dnr, dnc, geo):
    """image.cu's resize_u8 in NumPy."""
    snr, snc = img.shape[:2]
    ch = 3 if img.ndim == 3 else 1
    a3 = img.reshape(snr, snc, ch)
    nvec, ci, cf, cd, ri, rf, rd = geo.resize_tables(snr, snc, dnr, dnc)
    st, sb = a3[ri[:, 0]].astype(np.float32), a3[ri[:, 1]].astype(np.float32)
    l, r = ci[:, 0], ci[:, 1]
    wl, wr = cf[:, 0][None, :, None], cf[:, 1][None, :, None]
    fitb, ftb = rf[:, 0][:, None, None], rf[:, 1][:, None, None]
    tlf, trf, blf, brf = fitb * wl, fitb * wr, ftb * wl, ftb * wr
    out = tlf * st[:, l]
    out = out + trf * st[:, r]
    out = out + blf * sb[:, l]
    out = out + brf * sb[:, r]
    omtb, tb = rd[:, 0][:, None, None], rd[:, 1][:, None, None]
    if ch == 3:
        vec = np.trunc(out).astype(np.int64).astype(np.uint8)
        lr = cd[None, :, None]
        sd, bd = st.astype(np.float64), sb.astype(np.float64)
        v = omtb * ((1 - lr) * sd[:, l] + lr * sd[:, r]) + tb * ((1 - lr) * bd[:, l] + lr * bd[:, r])
        tail = np.trunc(v).astype(np.int64).astype(np.uint8)
    else:
        vec = np.trunc(out.astype(np.float64) + 0.5).astype(np.int64).astype(np.uint8)
        a = (wl * st[:, l] + wr * st[:, r]).astype(np.float64)
        b = (wl * sb[:, l] + wr * sb[:, r]).astype(np.float64)
        v = (omtb * a + tb * b).astype(np.float32)
        tail = np.where(v > 255, 255, np.where(v >= 0, np.trunc(np.maximum(v, 0)), 0)).astype(np.uint8)
    res = np.where(np.arange(dnc)[None, :, None] < nvec, vec, tail)
    return res.reshape((dnr, dnc) + img.shape[2:])


@pytest.mark.parametrize("snr,snc,dnr,dnc", [(512, 512, 426, 426), (37, 53, 30, 44),
                                             (600, 401, 500, 334), (7, 9, 5, 7), (1, 40, 1, 33),
                                             (40, 1, 33, 1), (5, 5, 9, 9), (13, 17, 13, 17),
                                             (3, 200, 2, 160)])
def test_tables_reproduce_the_cpu_resize(snr, snc, dnr, dnc):
    """image.cu's arithmetic on the tables equals kernels/cpu/image.pyx bit for bit."""
    geo = _geometry()
    rng = np.random.default_rng(snr * 1000 + snc)
    src = (rng.integers(0, 256, (snr, snc)).astype(np.float32) - np.float32(117.001)) * \
        np.float32(1 / 256)
    t = np.zeros((1, 1, max(snr, dnr), snc + 1 + dnc), np.float32)
    t[0, 0, :snr, :snc] = src
    ops.tiled_pyramid(t, [(0, 0, snc - 1, snr - 1), (snc + 1, 0, snc + dnc, dnr - 1)])
    np.testing.assert_array_equal(_emulate_resize(src, dnr, dnc, geo),
                                  t[0, 0, :dnr, snc + 1:])
    for ch in (3, 1):
        img = _image(snr, snc, ch)
        np.testing.assert_array_equal(_emulate_resize_u8(img, dnr, dnc, geo),
                                      I.resize_image_u8(img, dnr, dnc))


def test_tables_reproduce_the_cpu_pyramid_up():
    geo = _geometry()
    img = _image(64, 45)
    nr, nc = I.pyramid_up_size(64, 45)
    for a in (img, img[:, :, 1].copy()):
        np.testing.assert_array_equal(_emulate_resize_u8(a, nr, nc, geo), I.pyramid_up(a))


# ---------------------------------------------------------------------------- on the GPU
@pytest.fixture(scope="module")
def cu():
    return importlib.import_module("minidnn.backends.cuda")


def _layers():
    return {"rgb": I.input_rgb_image_pyramid_(6), "gray": I.input_grayscale_image_pyramid_(6),
            "rgb3": I.input_rgb_image_pyramid_(3, avg_red=10.5, pyramid_padding=4,
                                               pyramid_outer_padding=2)}


def _compare_layer(cu, layer, imgs, upsample):
    want = layer.to_tensor(imgs, "cpu", 0, upsample=upsample)
    got = layer.to_tensor(imgs, "cuda", 0, upsample=upsample)
    assert isinstance(got.tensor, cu.array_type)
    assert got.annotation == want.annotation and got.single == want.single
    assert tuple(got.tensor.shape) == want.tensor.shape
    np.testing.assert_array_equal(cu.to_numpy(got.tensor), want.tensor)


@gpu
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("kind", ["rgb", "gray", "rgb3"])
@pytest.mark.parametrize("upsample", [0, 1])
def test_gpu_pyramid_equals_cpu(cu, h, w, kind, upsample):
    layer = _layers()[kind]
    if upsample and h * w > 300 * 300 and kind != "rgb":
        pytest.skip("one large upsampled case (rgb) is enough")
    ch = 1 if kind == "gray" else 3
    img = _image(h, w, ch)
    _compare_layer(cu, layer, img, upsample)
    _compare_layer(cu, layer, img, upsample)        # the cached plan and buffers
    if ch == 3:
        _compare_layer(cu, layer, _image(h, w, 3, seed=1), upsample)   # buffers reused


@gpu
@pytest.mark.parametrize("kind", ["rgb", "gray"])
@pytest.mark.parametrize("upsample", [0, 1])
def test_gpu_pyramid_batch_of_two(cu, kind, upsample):
    layer = _layers()[kind]
    ch = 1 if kind == "gray" else 3
    for h, w in ((37, 53), (120, 97)):
        imgs = [_image(h, w, ch, seed=3), _image(h, w, ch, seed=4)]
        _compare_layer(cu, layer, imgs, upsample)
        _compare_layer(cu, layer, np.stack(imgs), upsample)


@gpu
def test_gpu_pyramid_of_the_reference_image(cu):
    """The 512 x 512 reference image, and the 160 x 160 one whose tensor dlib stored."""
    from test_dlib_nets import reference
    zp = reference("py_cnn_face_detector.npz")
    layer = _layers()["rgb"]
    for up in (0, 1):
        _compare_layer(cu, layer, zp["image_astronaut"], up)
    z = reference("cpp_face_mmod_dlibmodels.npz")
    got = layer.to_tensor(z["img0/image"], "cuda", 0)
    np.testing.assert_array_equal(cu.to_numpy(got.tensor), z["img0/input_tensor"])


@gpu
def test_gpu_pyramid_threads(cu):
    """Threads building pyramids at once (per-thread buffers on the one stream). A thread
    of PyCUDA's driver API needs the backend's context current (pushed) to use the GPU."""
    layer = _layers()["rgb"]
    imgs = [_image(97, 131, 3, seed=s) for s in range(4)]
    want = [layer.to_tensor(a, "cpu", 0).tensor for a in imgs]
    layer.to_tensor(imgs[0], "cuda", 0)          # compile image.cu in this thread
    bad = []

    def work(i):
        import pycuda.driver as drv
        cu.context.push()
        try:
            for _ in range(5):
                t = layer.to_tensor(imgs[i], "cuda", 0).tensor
                if not np.array_equal(cu.to_numpy(t), want[i]):
                    bad.append(i)
        except Exception as e:                   # noqa: BLE001 (reported below)
            bad.append(repr(e))
        finally:
            drv.Context.pop()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


@gpu
@pytest.mark.parametrize("h,w", [(512, 512), (37, 53), (7, 9)])
def test_gpu_tiled_pyramid_op(cu, h, w):
    """ops.tiled_pyramid on a GPUArray equals the CPU backend's, rects as lists too."""
    rects, nr, nc = I.tiled_pyramid_rects(6, h, w)
    rng = np.random.default_rng(h * w)
    t = np.zeros((2, 3, nr, nc), np.float32)
    l, tp, r, b = rects[0]
    t[:, :, tp:b + 1, l:r + 1] = rng.standard_normal((2, 3, h, w)).astype(np.float32)
    g = cu.asarray(t)
    ops.tiled_pyramid(t, rects)
    ops.tiled_pyramid(g, rects)
    np.testing.assert_array_equal(cu.to_numpy(g), t)
    g2 = cu.asarray(t)
    ops.tiled_pyramid(g2, [list(q) for q in rects])
    np.testing.assert_array_equal(cu.to_numpy(g2), t)
    with pytest.raises(ValueError, match="not inside"):
        ops.tiled_pyramid(g, [(0, 0, nc, 0)])


@gpu
@pytest.mark.parametrize("h,w,H,W", [(512, 512, 1024, 1024), (37, 53, 74, 106), (5, 7, 3, 2),
                                     (1, 9, 1, 17), (9, 1, 17, 1), (20, 20, 20, 20)])
def test_gpu_resize_image_u8_op(cu, h, w, H, W):
    import pycuda.gpuarray as gpuarray
    for ch in (3, 1):
        img = _image(h, w, ch)
        want = I.resize_image_u8(img, H, W)
        src = gpuarray.to_gpu(img)
        out = gpuarray.empty(want.shape, np.uint8)
        ops.resize_image_u8(src, out)
        np.testing.assert_array_equal(cu.to_numpy(out), want)


# ---------------------------------------------------------------------------- the face detector
def _face_net(device):
    from test_dlib_nets import model_path
    from minidnn import dlib_zoo
    net = dlib_zoo.face_detector(model_path("mmod_human_face_detector.dat"))
    dnn.fuse(net)
    return net.to(device)


def _dets(ds):
    return [(d.rect, d.confidence, d.label) for d in ds]


@gpu
def test_gpu_face_detector_is_dlibs(cu):
    from test_dlib_models import assert_dets
    from test_dlib_nets import reference
    zp = reference("py_cnn_face_detector.npz")
    z = reference("cpp_face_mmod_dlibmodels.npz")
    img = zp["image_astronaut"]
    cpu = _face_net("cpu")
    net = _face_net("cuda")
    for up in (0, 1):
        want = cpu(img, upsample=up)
        for _ in range(2):                         # the first run builds, then the graph
            got = net(img, upsample=up)
            assert [d.rect for d in got] == [d.rect for d in want]
            assert np.allclose([d.confidence for d in got], [d.confidence for d in want],
                               atol=1e-4)
            assert_dets(got, zp[f"dets_dlibmodels__astronaut__up{up}"])
    for j in (0, 1):
        assert_dets(net(z[f"img{j}/image"]), z[f"img{j}/dets"])
    assert_dets(net(z["img0/image"], adjust_threshold=float(z["dets_low_adjust_threshold"])),
                z["img0/dets_low"])
    many = net([img, img[:, ::-1].copy()])
    assert [d.rect for d in many[0]] == [d.rect for d in net(img)]
    assert len(many) == 2


# ---------------------------------------------------------------------------- image.cu on the CPU
# image.cu compiled as C++ by g++ (a few lines of shim for CUDA's names and intrinsics, with
# fp-contract off), launched by a stand-in PyCUDA whose "device memory" is host memory: the
# backend's real Python (image_ops.py, its plans, tables, argument lists and buffers) runs
# image.cu's real code. pyramid_levels_block runs with one thread per block (its
# __syncthreads are then no-ops and its loops cover every pixel). A subprocess, so that the
# stand-in never meets the real PyCUDA.
_SHIM = r'''
#include <cmath>
struct mdnn_dim3 { unsigned x, y, z; };
static mdnn_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline float __double2float_rn(double a) { return (float)a; }
static inline int __float2int_rz(float a) { return (int)a; }
static inline int __double2int_rz(double a) { return (int)a; }
static inline void __syncthreads() {}
'''

_LAUNCHERS = r'''
#define GRID(body) for (unsigned b = 0; b < gx; ++b) for (unsigned t = 0; t < bx; ++t) { \
    blockIdx.x = b; threadIdx.x = t; blockDim.x = bx; gridDim.x = gx; body; }
extern "C" void launch_pyramid_level(unsigned gx, unsigned bx, float* x, const int* lv,
    const int* ci, const float* cf, const int* ri, const float* rf, const double* rd,
    int level, int planes, long long plane, int C)
{ GRID(pyramid_level(x, lv, ci, cf, ri, rf, rd, level, planes, plane, C)) }
extern "C" void launch_pyramid_levels_block(unsigned gx, unsigned bx, float* x, const int* lv,
    const int* ci, const float* cf, const int* ri, const float* rf, const double* rd,
    int first, int last, long long plane, int C)
{ bx = 1; GRID(pyramid_levels_block(x, lv, ci, cf, ri, rf, rd, first, last, plane, C)) }
extern "C" void launch_image_planes(unsigned gx, unsigned bx, const unsigned char* img,
    float* x, int N, int H, int W, int ch, int R, int C, int left, int top,
    float m0, float m1, float m2)
{ GRID(image_planes(img, x, N, H, W, ch, R, C, left, top, m0, m1, m2)) }
extern "C" void launch_resize_u8(unsigned gx, unsigned bx, const unsigned char* src,
    unsigned char* dst, int N, int snr, int snc, int dnr, int dnc, int ch, int nvec,
    const int* ci, const float* cf, const double* cd, const int* ri, const float* rf,
    const double* rd)
{ GRID(resize_u8(src, dst, N, snr, snc, dnr, dnc, ch, nvec, ci, cf, cd, ri, rf, rd)) }
'''

_FAKE_PYCUDA = r'''
import ctypes, sys, types
import numpy as np

LIB = ctypes.CDLL(sys.argv[1])
pycuda = types.ModuleType("pycuda"); pycuda.VERSION = (0,); pycuda.VERSION_TEXT = "stand-in"
drv = types.ModuleType("pycuda.driver"); ga = types.ModuleType("pycuda.gpuarray")
comp = types.ModuleType("pycuda.compiler"); pvt = types.ModuleType("pycuda._pvt_struct")
tools = types.ModuleType("pycuda.tools"); tools.clear_context_caches = lambda: None
LAUNCHES = []

class Alloc:
    def __init__(self, nbytes):
        self.buf = np.zeros(max(int(nbytes), 1) + 16, np.uint8)
        self.addr = self.buf.ctypes.data
    def __int__(self): return self.addr
    __index__ = __int__

def _addr(p): return int(p)

class GPUArray:
    def __init__(self, shape, dtype):
        self.shape = tuple(int(s) for s in (shape if isinstance(shape, tuple) else (shape,)))
        self.dtype = np.dtype(dtype)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize
        self.flags = types.SimpleNamespace(c_contiguous=True)
        self.gpudata = Alloc(self.nbytes)
    def get(self):
        return self.gpudata.buf[:self.nbytes].view(self.dtype).reshape(self.shape).copy()

ga.GPUArray = GPUArray
ga.empty = lambda shape, dtype=np.float32: GPUArray(shape, dtype)
def to_gpu(a):
    a = np.ascontiguousarray(a); g = GPUArray(a.shape, a.dtype); drv.memcpy_htod(g.gpudata, a)
    return g
ga.to_gpu = to_gpu

class Error(Exception): pass
class MemoryError_(Error, MemoryError): pass
drv.Error, drv.MemoryError, drv.LogicError = Error, MemoryError_, Error
drv.init = lambda: None
class Ctx:
    def push(self): pass
class Device:
    count = staticmethod(lambda: 1)
    def __init__(self, i): pass
    def retain_primary_context(self): return Ctx()
    def get_attribute(self, a): return 132
    def compute_capability(self): return (9, 0)
    def name(self): return "stand-in"
drv.Device = Device
drv.Context = types.SimpleNamespace(pop=lambda: None, get_current=lambda: object())
drv.device_attribute = types.SimpleNamespace(MULTIPROCESSOR_COUNT=0)
class Stream:
    handle = 0
    def synchronize(self): pass
drv.Stream = Stream
drv.mem_get_info = lambda: (1 << 40, 1 << 40)
def memcpy_htod(dst, src, stream=None):
    src = np.ascontiguousarray(src); ctypes.memmove(_addr(dst), src.ctypes.data, src.nbytes)
drv.memcpy_htod = memcpy_htod
drv.memcpy_htod_async = memcpy_htod
drv.memcpy_dtod_async = lambda dst, src, n, stream=None: ctypes.memmove(_addr(dst), _addr(src), n)
def memset_d32_async(dst, value, count, stream=None):
    (ctypes.c_uint32 * int(count)).from_address(_addr(dst))[:] = [value] * int(count)
drv.memset_d32_async = memset_d32_async

C = {"P": ctypes.c_void_p, "i": ctypes.c_int, "q": ctypes.c_longlong, "f": ctypes.c_float,
     "d": ctypes.c_double}
class Function:
    def __init__(self, name): self.name = name
    def prepare(self, fmt): self.arg_format = fmt
    def _launch_kernel(self, grid, block, packed, shared, stream):
        fmt, args = packed
        assert len(fmt) == len(args), (self.name, fmt, args)
        assert grid[1] == grid[2] == block[1] == block[2] == 1 and block[0] <= 1024
        conv = [C[c](_addr(a) if c == "P" else a) for c, a in zip(fmt, args)]
        LAUNCHES.append(self.name)
        getattr(LIB, "launch_" + self.name)(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *conv)
class SourceModule:
    def __init__(self, src, **kw): pass
    def get_function(self, name): return Function(name)
comp.SourceModule = SourceModule
pvt.pack = lambda fmt, *args: (fmt, args)
pycuda.driver, pycuda.gpuarray, pycuda.compiler, pycuda._pvt_struct, pycuda.tools = \
    drv, ga, comp, pvt, tools
sys.modules.update({"pycuda": pycuda, "pycuda.driver": drv, "pycuda.gpuarray": ga,
                    "pycuda.compiler": comp, "pycuda._pvt_struct": pvt, "pycuda.tools": tools})
'''

_CHECKS = r'''
import numpy as np
from minidnn import ops
from minidnn.layers import input as I
import minidnn.backends.cuda as cu
rng = np.random.default_rng(5)
def image(h, w, ch):
    return rng.integers(0, 256, (h, w, 3) if ch == 3 else (h, w), dtype=np.uint8)
layers = [(I.input_rgb_image_pyramid_(6), 3), (I.input_grayscale_image_pyramid_(6), 1),
          (I.input_rgb_image_pyramid_(3, avg_red=10.5, pyramid_padding=4,
                                      pyramid_outer_padding=2), 3)]
cases = 0
for h, w in SIZES:
    for layer, ch in layers:
        for up in (0, 1):
            if up and h * w > 300 * 300 and layer is not layers[0][0]:
                continue
            for imgs in ([image(h, w, ch)], [image(h, w, ch), image(h, w, ch)]):
                for _ in range(2):
                    want = layer.to_tensor(imgs, "cpu", 0, upsample=up)
                    got = layer.to_tensor(imgs, "cuda", 0, upsample=up)
                    assert isinstance(got.tensor, cu.array_type)
                    assert got.annotation == want.annotation
                    np.testing.assert_array_equal(cu.to_numpy(got.tensor), want.tensor)
                    cases += 1
rects, nr, nc = I.tiled_pyramid_rects(6, 61, 75)
t = np.zeros((2, 3, nr, nc), np.float32)
l, tp, r, b = rects[0]
t[:, :, tp:b + 1, l:r + 1] = rng.standard_normal((2, 3, 75 - 14, 75)).astype(np.float32)[:, :, :61]
g = cu.asarray(t)
ops.tiled_pyramid(t, rects)
ops.tiled_pyramid(g, [list(q) for q in rects])
np.testing.assert_array_equal(cu.to_numpy(g), t)
for (h, w, H, W) in [(37, 53, 74, 106), (5, 7, 3, 2), (1, 9, 1, 17), (9, 1, 17, 1)]:
    for ch in (3, 1):
        a = image(h, w, ch)
        out = cu.array_type((H, W, 3) if ch == 3 else (H, W), np.uint8)
        ops.resize_image_u8(__import__("pycuda.gpuarray").gpuarray.to_gpu(a), out)
        np.testing.assert_array_equal(cu.to_numpy(out), I.resize_image_u8(a, H, W))
print("ok", cases, sorted(set(LAUNCHES)))
'''


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_image_cu_on_the_cpu_through_the_backend(tmp_path):
    """image.cu's own code (as C++) behind the backend's real image_ops.py equals the CPU
    kernels bit for bit: sizes, RGB/grayscale layers, upsample 0 and 1, batches of two, and
    the ops tiled_pyramid and resize_image_u8."""
    import subprocess
    import sys
    cu_src = (ROOT / "kernels" / "cuda" / "image.cu").read_text()
    (tmp_path / "image_host.cpp").write_text(_SHIM + cu_src + _LAUNCHERS)
    lib = tmp_path / "libimage_host.so"
    subprocess.run(["g++", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
                    "-o", str(lib), str(tmp_path / "image_host.cpp")], check=True)
    small = [s for s in SIZES if s != (600, 401)]
    script = _FAKE_PYCUDA + f"SIZES = {small!r}\n" + _CHECKS
    r = subprocess.run([sys.executable, "-c", script, str(lib)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok"), r.stdout
    for k in ("pyramid_level", "pyramid_levels_block", "image_planes", "resize_u8"):
        assert k in r.stdout, r.stdout

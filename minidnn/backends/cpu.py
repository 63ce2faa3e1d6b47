"""The CPU backend: numpy arrays + compiled Cython kernels (kernels/cpu/*.pyx).

Every op has the signature given in docs/INTERNALS.md. Tensors are float32,
C-contiguous (N, K, R, C) numpy arrays; outputs are preallocated by the
caller. Each kernel validates its arguments (dtype, contiguity, shapes,
aliasing) before touching memory and raises ValueError on a bad call.

Threading. The kernels are parallelised with OpenMP (one team, sized by
OMP_NUM_THREADS or the machine's cores; see set_num_threads). The GEMM-based
kernels (conv2d, fc) call scipy's sgemm from *inside* the OpenMP team, each
thread on its own panel, so the BLAS library that scipy loads must run
single-threaded: otherwise every OpenMP thread would wake its own BLAS
threads (2 cores -> 4+ busy threads) and the two pools would fight. At import
we therefore limit, with threadpoolctl, the BLAS libraries loaded by scipy
(not numpy's own private copy, which numpy wheels ship separately) to one
thread. Doing it once costs nothing per call; toggling it per call would
make OpenBLAS stop and restart its threads.
"""
import os

# OpenMP wait policy, set before libgomp loads (with our first extension):
# after a parallel region, GNU OpenMP's idle threads spin 300,000 PAUSEs
# (several ms on Zen) before sleeping. On a machine whose cores are shared
# with other processes that is catastrophic: a thread spinning on a core
# stalls the thread it waits for, and measured per-layer times grew 10-40x
# (batch-1 CIFAR ResNet: 6 ms -> 180 ms). A short spin keeps the wake-up
# of back-to-back layers fast on an idle machine (within ~4% of the default
# on a batch-1 conv/relu sequence) and costs little under contention. The
# user's own GOMP_SPINCOUNT / OMP_WAIT_POLICY always win.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"
    _spin_set_by_minidnn = True
else:
    _spin_set_by_minidnn = False

import numpy as np  # noqa: E402

import importlib  # noqa: E402
import pkgutil  # noqa: E402
import threading  # noqa: E402

import minidnn  # noqa: E402
from minidnn import ops as _ops  # noqa: E402
from minidnn._sources import check_fresh  # noqa: E402
from minidnn.core import check_host_memory as _check_host_memory  # noqa: E402

# every compiled kernels/cpu/NAME.pyx: the extension module minidnn._cpu_NAME
KERNEL_MODULES = tuple(importlib.import_module(f"minidnn.{m.name}")
                       for m in sorted(pkgutil.iter_modules(minidnn.__path__), key=lambda m: m.name)
                       if m.name.startswith("_cpu_"))
check_fresh(*KERNEL_MODULES)
_cpu_conv = importlib.import_module("minidnn._cpu_conv")

name = "cpu"
array_type = np.ndarray


def _collect(modules, grad):
    """The ops of minidnn/ops.py (inference or training ones), each taken from the compiled
    module that defines a function of its name (tests/test_ops_contract.py checks that
    every op is found, with its declared signature)."""
    found = {}
    for op, spec in _ops.OPS.items():
        if spec.grad == grad:
            for m in modules:
                fn = getattr(m, op, None)
                if fn is not None:
                    found[op] = fn
                    break
    return found


globals().update(_collect(KERNEL_MODULES, grad=False))


def empty(shape):
    """An uninitialised float32 C-contiguous array of the given shape."""
    _check_host_memory(4 * int(np.prod(shape, dtype=np.float64)), f"a buffer of shape {tuple(shape)}")
    return np.empty(shape, dtype=np.float32)


def asarray(a):
    """A float32 C-contiguous copy of a (always a copy: the runtime owns it)."""
    return np.array(a, dtype=np.float32, order="C", copy=True)


def to_numpy(a):
    """The numpy array itself (the CPU backend's arrays already are numpy)."""
    return a


# Threads. The kernels' OpenMP team size is a per-thread setting (OpenMP's ICV). The
# budget is the number of cores minidnn may use (OMP_NUM_THREADS or the machine's, or
# set_num_threads); a compiled forward (core.Program.run) calls begin_run/end_run, and
# while k Python threads run forwards at once each kernel team gets budget // k
# threads (at least 1), so N serving threads never oversubscribe the cores.
_budget = [_cpu_conv.get_num_threads()]
_active = [0]
_active_lock = threading.Lock()
_tl = threading.local()


def set_num_threads(n):
    """Use at most n threads in the CPU kernels (n >= 1), process-wide: the budget that
    concurrent forwards share."""
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: need n >= 1, got {n}")
    _budget[0] = n
    _cpu_conv.set_num_threads(n)
    _tl.nt = n


def get_num_threads():
    """The number of threads the CPU kernels may use (the budget set_num_threads sets)."""
    return _budget[0]


def begin_run():
    """Called by a compiled forward before its kernels: size this thread's kernel teams
    for the number of forwards running now."""
    with _active_lock:
        _active[0] += 1
        k = max(1, _budget[0] // _active[0])
    if getattr(_tl, "nt", None) != k:
        _cpu_conv.set_num_threads(k)
        _tl.nt = k


def end_run():
    with _active_lock:
        _active[0] -= 1


def _pin_scipy_blas():
    """Limit the BLAS libraries used by scipy's cython_blas to one thread
    (see the module docstring). Returns the libraries limited, for tests."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS)
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return []
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    numpy_private = (os.path.join(numpy_dir, "numpy"), os.path.join(numpy_dir, "numpy.libs"))
    limited = []
    ctl = ThreadpoolController()
    for lib in ctl.lib_controllers:
        if lib.user_api != "blas":
            continue
        path = os.path.realpath(lib.filepath or "")
        if path.startswith(numpy_private):
            continue  # numpy's own copy: scipy never calls it, leave it alone
        lib.set_num_threads(1)
        limited.append(path)
    return limited


_blas_pinned = _pin_scipy_blas()

"""Device setup: PyCUDA, the driver, GPU 0's primary context and the backend's stream.

Importing this module initialises CUDA: it retains the device's *primary*
context (the one the CUDA runtime, cuDNN and PyTorch use, so device pointers
can be shared with them) and makes it current, like ``pycuda.autoprimaryctx``
but keeping the handle in ``context``. It raises ``RuntimeError`` naming what
is missing (PyCUDA, the driver, a GPU) and how to install it.

Every kernel of the backend is launched on ``stream`` (its raw handle is
``stream.handle``; hand it to cuDNN/cuBLAS).
"""
from __future__ import annotations

INSTALL_HINT = 'install the GPU extra with: pip install "minidnn[gpu]"'

try:
    import pycuda.driver as drv
    import pycuda.gpuarray as gpuarray  # noqa: F401  (memory.py allocates with it)
except Exception as _e:  # ImportError, or a PyCUDA whose libcuda cannot load
    raise RuntimeError(
        f"minidnn's CUDA backend needs PyCUDA, which cannot be imported ({_e!r}); "
        f"{INSTALL_HINT} (it needs an NVIDIA driver and the CUDA toolkit's nvcc)"
    ) from _e

try:
    drv.init()
except Exception as _e:
    raise RuntimeError(
        f"minidnn's CUDA backend: the CUDA driver failed to initialise ({_e}); "
        "is an NVIDIA driver installed and a GPU visible (nvidia-smi)?"
    ) from _e

if drv.Device.count() < 1:
    raise RuntimeError(
        "minidnn's CUDA backend: the CUDA driver sees no GPU "
        "(check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    )


def _make_context():
    import atexit

    dev = drv.Device(0)
    ctx = dev.retain_primary_context()
    ctx.push()

    def _finish():
        try:
            from pycuda.tools import clear_context_caches

            drv.Context.pop()
            clear_context_caches()
        except Exception:
            pass

    atexit.register(_finish)
    return dev, ctx


try:
    device, context = _make_context()
    stream = drv.Stream()
except Exception as _e:
    raise RuntimeError(f"minidnn's CUDA backend: cannot create a CUDA context on GPU 0 ({_e})") from _e

# Threads. A CUDA context is current per thread, and every thread's work goes to the one
# `stream`, which a forward captures into a CUDA graph the first time: another thread's
# copy or launch on it meanwhile would land inside that graph (or fail the capture). So a
# forward's launches and its output's download, and every memory call of memory.py, run
# under `run_lock` (re-entrant), with the backend's context current: a thread that has no
# current context gets ours pushed for the duration and popped after (PyCUDA aborts the
# process when a thread exits with a context still pushed). Forwards from many threads
# are thereby serialised on the GPU, which runs one stream's work in order anyway. Lock
# order: run_lock before core's _build_lock (core.Node._program takes both so).
import threading  # noqa: E402

run_lock = threading.RLock()
_tl = threading.local()


def _enter():
    """Take run_lock and make the context current in this thread (see above)."""
    run_lock.acquire()
    depth = getattr(_tl, "depth", 0)
    if depth == 0:
        _tl.pushed = drv.Context.get_current() is None
        if _tl.pushed:
            try:
                context.push()
            except BaseException:
                run_lock.release()
                raise
    _tl.depth = depth + 1


def _exit():
    _tl.depth -= 1
    try:
        if _tl.depth == 0 and _tl.pushed:
            _tl.pushed = False
            drv.Context.pop()
    finally:
        run_lock.release()


def serialized(fn):
    """fn under run_lock, with the context current (memory.py's calls, the image ops)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _enter()
        try:
            return fn(*args, **kwargs)
        finally:
            _exit()
    return wrapper


class _Exclusive:
    """``with exclusive:`` run_lock held and the context current (core builds a device
    program so: its plans compile kernels and allocate)."""

    def __enter__(self):
        _enter()
        return self

    def __exit__(self, *exc):
        _exit()
        return False


exclusive = _Exclusive()


def begin_run():
    """Before a compiled forward's launches (core.Program.run): see run_lock."""
    _enter()


def end_run():
    _exit()


SM_COUNT = device.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
CC = device.compute_capability()

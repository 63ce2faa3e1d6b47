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

SM_COUNT = device.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
CC = device.compute_capability()

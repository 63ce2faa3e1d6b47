"""Kernel loading: compiled kernel families, prepared launches, and the per-shape plan cache.

``module(family)`` compiles kernels/cuda/<family>.cu on first use with
PyCUDA's SourceModule (cached on disk by PyCUDA): the text source.assemble()
makes (our #includes inlined), the include path [kernels/cuda, kernels/common]
and NVCC_OPTIONS; ``load_kernels()`` compiles every family now.

``Kernel(family, name, grid, block)`` is one prepared kernel with a fixed
launch configuration, launched on the backend's stream. Its argument format
comes from the kernel's C signature (source.signature), never from a string
written by hand; a call with the wrong number of arguments raises TypeError
naming the kernel's parameters.

``act_args(act, what)`` turns an op's activation into the (code, param) pair
the kernels take.

``plans`` holds the per-shape plans of the ops (ops.py): built at the first
call of a shape, kept for the life of the process (a captured graph may
point at their scratch buffers). routing.set_conv_route() drops the
convolution plans (``forget("conv")``).
"""
from __future__ import annotations

import shutil

from . import source
from .gpu import drv, stream

try:
    from pycuda.compiler import SourceModule
    from pycuda._pvt_struct import pack as _pack
except Exception as _e:  # pragma: no cover - gpu.py has already imported PyCUDA
    raise RuntimeError(
        f"minidnn's CUDA backend: PyCUDA's compiler cannot be imported ({_e!r})") from _e

plans: dict = {}
_modules: dict = {}


def forget(kind):
    """Drop every cached plan whose key starts with ``kind`` ("conv", "fc", ...)."""
    for k in [k for k in plans if k[0] == kind]:
        del plans[k]


def module(family):
    """The compiled SourceModule of kernels/cuda/<family>.cu (compiled once per process)."""
    mod = _modules.get(family)
    if mod is None:
        src = source.assemble(family)
        try:
            mod = SourceModule(src, no_extern_c=True, options=list(source.NVCC_OPTIONS),
                               include_dirs=source.include_dirs())
        except Exception as e:
            if shutil.which("nvcc") is None:
                raise RuntimeError(
                    f"minidnn's CUDA backend compiles kernels/cuda/{family}.cu at run time "
                    "and needs nvcc (the CUDA toolkit) on PATH"
                ) from e
            raise
        _modules[family] = mod
    return mod


def act_args(act, what):
    """(code, param) of an op's ``act`` argument, as the kernels take it: an ops.Act
    (code, param), True (relu) or False/None (identity), as the CPU kernels read it
    (kernels/cpu/act.pxi). ValueError naming the op for anything else or an unknown
    code (0 <= code < MDNN_ACT_COUNT of activations.h)."""
    if act is None or act is False:
        return 0, 0.0
    if act is True:
        return 1, 0.0
    try:
        code, param = int(act[0]), float(act[1])
    except Exception:
        raise ValueError(f"minidnn cuda: {what}: act must be an activation (minidnn.ops.Act) "
                         f"or a bool, got {act!r}") from None
    if not 0 <= code < source.act_count():
        raise ValueError(f"minidnn cuda: {what}: unknown activation code {code} "
                         f"(activations.h has 0 .. {source.act_count() - 1})")
    return code, param


def blocks(n, per=256):
    """The number of blocks of `per` threads that cover n items (at least 1)."""
    return max(1, (n + per - 1) // per)


def load_kernels():
    """Compile/load every kernel module now (they are otherwise loaded on first use)."""
    for fam in source.FAMILIES:
        module(fam)


class Kernel:
    """One prepared kernel with a fixed launch configuration, launched on `stream`."""

    __slots__ = ("sig", "fmt", "grid", "block", "shared", "_launch", "_func")

    def __init__(self, family, fname, grid, block, shared=0):
        self.sig = source.signature(family, fname)
        func = module(family).get_function(fname)
        func.prepare(self.sig.format)
        self._func = func
        self.fmt = func.arg_format
        self.grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        self.shared = shared
        # Function._launch_kernel is what prepared_async_call ends in; calling it
        # with the arguments packed here skips per-call work we have done once.
        self._launch = getattr(func, "_launch_kernel", None)

    def __call__(self, *args):
        try:
            if self._launch is not None:
                self._launch(self.grid, self.block, _pack(self.fmt, *args), self.shared, stream)
            else:  # a PyCUDA without the private fast path
                self._func.prepared_async_call(self.grid, self.block, stream, *args,
                                               shared_size=self.shared)
        except Exception as e:
            if len(args) != len(self.sig.names) or not isinstance(e, drv.Error):
                raise TypeError(f"minidnn cuda: bad arguments for kernel {self.sig.describe()}: "
                                f"got {len(args)} ({e})") from e
            raise

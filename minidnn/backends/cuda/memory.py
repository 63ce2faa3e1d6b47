"""Memory: the backend contract's allocation and copies, on PyCUDA GPUArrays.

Arrays are float32, C-contiguous ``GPUArray``s (``asarray`` keeps other
non-float dtypes, for index tables). Copies to and from the host and between
arrays are ordered on the backend's ``stream``; ``to_numpy`` and
``synchronize`` wait for it. Running out of GPU memory raises
``CudaMemoryError`` (a MemoryError) with the size asked for and what is free.
"""
from __future__ import annotations

import gc

import numpy as np

from .gpu import drv, gpuarray, serialized, stream


class CudaMemoryError(MemoryError):
    """The GPU has not enough free memory for an allocation."""


@serialized
def alloc(shape, dtype=np.float32):
    """A new uninitialised GPUArray; CudaMemoryError when it does not fit."""
    try:
        return gpuarray.empty(shape, dtype)
    except drv.MemoryError:
        gc.collect()  # drop GPUArrays that are only waiting for the collector
        try:
            return gpuarray.empty(shape, dtype)
        except drv.MemoryError:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            try:
                free, total = drv.mem_get_info()
                have = f"{free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB"
            except Exception:
                have = "free memory unknown"
            raise CudaMemoryError(
                f"minidnn cuda: out of GPU memory allocating {nbytes / 2**20:.1f} MiB "
                f"for an array of shape {tuple(shape)} ({have})"
            ) from None


@serialized
def empty(shape):
    """A new uninitialised float32 GPUArray of `shape` (C order)."""
    return alloc(tuple(int(s) for s in shape))


@serialized
def asarray(a):
    """A new GPUArray holding a copy of the NumPy array `a` (floats become float32)."""
    a = np.asarray(a)
    if a.dtype.kind == "f" or a.dtype.kind == "b":
        a = a.astype(np.float32, copy=False)
    a = np.ascontiguousarray(a)
    out = alloc(a.shape, a.dtype)
    if a.size:
        # synchronous copy on the legacy stream; `stream` is a blocking stream,
        # so this is ordered after the work already queued there
        drv.memcpy_htod(out.gpudata, a)
    return out


@serialized
def upload(dst, src):
    """Copy the NumPy array `src` into the existing GPUArray `dst`, ordered on
    `stream` (no allocation). `src` must match dst's size; it is converted to
    dst's dtype and made contiguous first."""
    src = np.ascontiguousarray(src, dtype=dst.dtype)
    if src.size != dst.size:
        raise ValueError(f"upload: {src.shape} does not fit into {dst.shape}")
    drv.memcpy_htod_async(dst.gpudata, src, stream)


@serialized
def copy(dst, src):
    """Copy GPUArray `src` into GPUArray `dst` (same size and dtype), ordered on `stream`."""
    if src.size != dst.size or src.dtype != dst.dtype:
        raise ValueError(f"copy: {src.shape} {src.dtype} does not fit into {dst.shape} {dst.dtype}")
    if src.size:
        drv.memcpy_dtod_async(dst.gpudata, src.gpudata, src.nbytes, stream)


@serialized
def to_numpy(arr):
    """A NumPy copy of GPUArray `arr`, after all work queued on `stream`."""
    stream.synchronize()
    return arr.get()


@serialized
def synchronize():
    """Wait until everything queued on `stream` has run."""
    stream.synchronize()


# ---- pointer facts, for the launches ------------------------------------------------
def ptr(a):
    """The device address of GPUArray `a` as an int (0 for None: a kernel's NULL)."""
    return 0 if a is None else a.gpudata.__int__()


def aligned16(*arrs):
    """Whether every array starts on a 16-byte boundary (float4 loads and stores)."""
    return all(a.gpudata.__int__() % 16 == 0 for a in arrs)

"""Graph capture: record what the ops launch on the backend's stream into a CUDA graph.

``capture(fn)`` records everything ``fn()`` launches on ``stream`` into a CUDA
graph and returns a ``Graph`` whose ``launch()`` replays it. Stream capture
goes through the driver API by ctypes (PyCUDA has no graph wrappers), on the
raw handle of ``stream``. Plans (and cuDNN's per-shape setup) must be built
before capture: capture() runs fn() once first unless told not to.
"""
from __future__ import annotations

import ctypes

from .gpu import stream

def _libcuda():
    for nm in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(nm)
        except OSError:
            continue
    raise RuntimeError("minidnn cuda: cannot load libcuda for graph capture")


_cu = None
_CAPTURE_MODE_RELAXED = 2


def _cu_lib():
    global _cu
    if _cu is None:
        lib = _libcuda()
        vp, u64 = ctypes.c_void_p, ctypes.c_ulonglong
        sig = {
            "cuStreamBeginCapture_v2": [vp, ctypes.c_int],
            "cuStreamEndCapture": [vp, ctypes.POINTER(vp)],
            "cuGraphInstantiateWithFlags": [ctypes.POINTER(vp), vp, u64],
            "cuGraphLaunch": [vp, vp],
            "cuGraphExecDestroy": [vp],
            "cuGraphDestroy": [vp],
            "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        }
        for fn, args in sig.items():
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = ctypes.c_int
        _cu = lib
    return _cu


def _cu_check(rc, what):
    if rc != 0:
        msg = ctypes.c_char_p()
        try:
            _cu.cuGetErrorString(rc, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else "?"
        except Exception:
            text = "?"
        raise RuntimeError(f"minidnn cuda: {what} failed with CUDA error {rc} ({text})")


class Graph:
    """A captured sequence of launches on `stream`. launch() replays it on
    `stream` (asynchronously, like any op). It replays the same device
    pointers: the arrays used while capturing must stay alive, and new inputs
    are fed by writing into them (upload)."""

    def __init__(self, graph, exec_):
        self._graph = graph
        self._exec = exec_
        self._cu = _cu
        self._launch = _cu.cuGraphLaunch
        self._stream = ctypes.c_void_p(stream.handle)

    def launch(self):
        rc = self._launch(self._exec, self._stream)
        if rc:
            _cu_check(rc, "cuGraphLaunch")

    replay = launch

    def close(self):
        if self._exec is not None:
            self._cu.cuGraphExecDestroy(self._exec)
            self._cu.cuGraphDestroy(self._graph)
            self._exec = self._graph = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def capture(fn, warmup=True):
    """Record the launches fn() makes on `stream` into a CUDA graph; returns a Graph.

    With warmup (the default) fn() first runs once normally, so that kernels
    are compiled and per-shape plans built before capture (neither may happen
    while capturing). Nothing fn() launches during capture executes then.
    """
    lib = _cu_lib()
    if warmup:
        fn()
        stream.synchronize()
    h = ctypes.c_void_p(stream.handle)
    _cu_check(lib.cuStreamBeginCapture_v2(h, _CAPTURE_MODE_RELAXED), "cuStreamBeginCapture")
    graph = ctypes.c_void_p()
    try:
        fn()
    finally:
        rc_end = lib.cuStreamEndCapture(h, ctypes.byref(graph))
    _cu_check(rc_end, "cuStreamEndCapture (was something synchronous called while capturing?)")
    exec_ = ctypes.c_void_p()
    rc = lib.cuGraphInstantiateWithFlags(ctypes.byref(exec_), graph, 0)
    if rc:
        lib.cuGraphDestroy(graph)
        _cu_check(rc, "cuGraphInstantiate")
    return Graph(graph, exec_)

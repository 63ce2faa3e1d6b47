"""minidnn.backends.cuda: the inference ops of minidnn/ops.py on PyCUDA GPUArrays.

WHAT THIS PACKAGE REPRESENTS
    The CUDA backend. Same op names and signatures as backends/cpu.py;
    tensors are float32, C-contiguous PyCUDA ``GPUArray``s shaped (N, K, R, C)
    (``fc`` sees (N, D)), outputs are preallocated by the caller; ``act`` is an
    ops.Act (or a bool: relu / identity) applied in the op's epilogue by the
    formulas of kernels/common/activations.h. Launches are asynchronous, on
    the backend's ``stream``; ``to_numpy`` waits for it. Training ops are
    CPU-only (ops raises NotImplementedError for them on a GPU array).

    Importing it initialises CUDA (the primary context of GPU 0, made
    current) and raises ``RuntimeError`` naming what is missing (PyCUDA, the
    driver, a GPU) and how to install it.

    This module is the backend contract and nothing else; each concern is a
    module of its own:

    gpu.py       PyCUDA, the driver, the device, its primary context, the stream
    memory.py    empty, asarray, upload, copy, to_numpy, synchronize, CudaMemoryError
    source.py    the kernels' sources: where they are, the text PyCUDA compiles
                 (#includes of kernels/common inlined), each kernel's argument
                 format parsed from its C signature; GPU-free, and runs by path
                 as an nvcc check
    kernels.py   compiled kernel families (SourceModule), prepared launches
                 (Kernel), the per-shape plan cache, act -> (code, param)
    autotune.py  the GEMM time model, the autotuner, GPU timing
    routing.py   own kernels vs cuDNN per convolution shape (set_conv_route,
                 conv_route, use_cudnn; cuDNN itself is backends/cudnn/)
    ops.py       the ops: per-shape plans and launches
    tensor_ops.py  the catalogue's tensor and routing ops (mul_scalar, mul, scale_channels,
                 copy_range, l2normalize, reorg, resize_bilinear), add's zero-padded
                 plan, views at offsets (view, storage: concat's zero copy)
    graph.py     CUDA graph capture (capture, Graph)
"""
from .gpu import context, device, stream
from .graph import Graph, capture
from .kernels import load_kernels
from .memory import CudaMemoryError, asarray, copy, empty, synchronize, to_numpy, upload
from .ops import activation, add, affine, avg_pool, conv2d, conv2d_residual, fc, max_pool, softmax
from .routing import conv_route, set_conv_route, use_cudnn
from .tensor_ops import (copy_range, l2normalize, mul, mul_scalar, reorg, resize_bilinear,
                         scale_channels, storage, view)

from pycuda.gpuarray import GPUArray as array_type  # noqa: E402  (gpu.py has checked PyCUDA)

name = "cuda"

__all__ = [
    # the ops (every inference op of minidnn.ops.OPS)
    "activation", "add", "affine", "avg_pool", "conv2d", "conv2d_residual", "fc", "max_pool",
    "softmax",
    # the catalogue's tensor and routing ops (tensor_ops.py)
    "mul_scalar", "mul", "scale_channels", "copy_range", "l2normalize", "reorg",
    "resize_bilinear",
    # the backend's identity and memory; view/storage: arrays at offsets into others
    # (concat's zero copy, core.Plan.alias)
    "name", "array_type", "empty", "asarray", "to_numpy", "upload", "copy", "synchronize",
    "CudaMemoryError", "view", "storage",
    # the device, graphs, kernels, convolution routing
    "device", "context", "stream", "capture", "Graph", "load_kernels",
    "set_conv_route", "conv_route", "use_cudnn",
]

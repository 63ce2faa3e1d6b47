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
    conv_family.py  conv2d_grouped (depthwise, grouped, dilated; own kernels or
                 cuDNN) and conv2d_transpose (kernels/cuda/conv_family.cu)
    image_ops.py the image ops of dlib's input layers (OPTIONAL ops tiled_pyramid and
                 resize_image_u8; image_pyramid, the pyramid input layers' whole tensor
                 built on the GPU from the uint8 images); image_geometry.py their
                 per-shape resize tables (GPU-free)
    tensor_ops.py  the catalogue's tensor and routing ops (mul_scalar, mul, scale_channels,
                 copy_range, l2normalize, reorg, resize_bilinear), add's zero-padded
                 plan, views at offsets (view, storage: concat's zero copy)
    graph.py     CUDA graph capture (capture, Graph)
"""
from .conv_family import conv2d_grouped, conv2d_transpose
from .gpu import begin_run, context, device, end_run, exclusive, run_lock, stream
from .graph import Graph, capture
from .image_ops import image_pyramid, resize_image_u8, tiled_pyramid
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
    # the convolution family (conv_family.py)
    "conv2d_grouped", "conv2d_transpose",
    # the catalogue's tensor and routing ops (tensor_ops.py)
    "mul_scalar", "mul", "scale_channels", "copy_range", "l2normalize", "reorg",
    "resize_bilinear",
    # the OPTIONAL image ops of dlib's input layers, and their whole pyramid on the GPU
    "tiled_pyramid", "resize_image_u8", "image_pyramid",
    # the backend's identity and memory; view/storage: arrays at offsets into others
    # (concat's zero copy, core.Plan.alias); begin_run/end_run: one forward at a time
    "name", "array_type", "empty", "asarray", "to_numpy", "upload", "copy", "synchronize",
    "CudaMemoryError", "view", "storage", "begin_run", "end_run", "run_lock", "exclusive",
    # the device, graphs, kernels, convolution routing
    "device", "context", "stream", "capture", "Graph", "load_kernels",
    "set_conv_route", "conv_route", "use_cudnn",
]

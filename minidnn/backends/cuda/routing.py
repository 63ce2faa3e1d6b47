"""Conv routing: which implementation runs each convolution shape, the own kernels or cuDNN.

The route mode: "auto" lets each convolution shape take the faster of cuDNN
and the own kernels, both timed on the GPU at its first call (the cost is the
larger of GPU time and host time per call, autotune.time_call, so an eager
batch-1 forward is not handed to cuDNN's slower host path); "cudnn" always
takes cuDNN (where it is installed); "own" never does. MINIDNN_CUDA_CONV sets
it at import, set_conv_route() later. The choice per shape is kept and
reported by conv_route() (and so by dnn.backend_info).

Activations: cuDNN's fused cudnnConvolutionBiasActivationForward applies only
identity and relu (cudnn.cudnn_activation says which activation it can apply).
For any other activation the cuDNN route is cuDNN's convolution with the
identity epilogue followed by the own ``activation`` kernel in place
(``CudnnConv.post``); in "auto" that pair is what is timed against the own
kernel, whose epilogue applies every activation.

conv2d_grouped (conv_family.py) is routed the same way, per shape, between its own
kernels and cuDNN's grouped/dilated convolution (cudnn.conv2d_grouped), with the
same activation rule; its route keys carry its dilation and group count
(``route_key(..., grouped=...)``), and conv_route(..., dilation=, groups=) reports
them. conv2d_transpose has no cuDNN route (always its own kernel).

cuDNN is optional: ``cudnn_module()`` is None when it is not installed, is
turned off (MINIDNN_CUDNN=0) or the route is "own".
"""
from __future__ import annotations

import os

from . import kernels
from .kernels import act_args

CUDNN, OWN = "cudnn", "own"
_mode = os.environ.get("MINIDNN_CUDA_CONV", "auto").lower()
_routes: dict = {}    # route_key(...) -> CUDNN | OWN


def set_conv_route(mode):
    """Choose how convolutions run: "auto", "cudnn" or "own" (see above). Forgets the
    choices made so far: call it before compiling a net, or move the net again
    with net.to("cuda") so that it is recompiled."""
    global _mode
    if mode not in ("auto", CUDNN, OWN):
        raise ValueError(f"conv route must be 'auto', 'cudnn' or 'own', got {mode!r}")
    _mode = mode
    _routes.clear()
    kernels.forget("conv")


def cudnn_module():
    """backends.cudnn when cuDNN can be used, else None."""
    if _mode == OWN:
        return None
    from .. import cudnn
    return cudnn if cudnn.available() else None


def use_cudnn():
    """Whether convolutions may run through cuDNN (it is installed and not turned off)."""
    return cudnn_module() is not None


def route_key(x_shape, w_shape, stride_y, stride_x, pad_y, pad_x, act, residual, grouped=None):
    """The key of one convolution shape's route; act is an (code, param) pair.
    grouped: (dilation_y, dilation_x, groups) of a conv2d_grouped (None: conv2d or
    conv2d_residual), so that its route is kept apart from conv2d's."""
    key = (tuple(map(int, x_shape)), tuple(map(int, w_shape)), (int(stride_y), int(stride_x)),
           (int(pad_y), int(pad_x)), (int(act[0]), float(act[1])), bool(residual))
    if grouped is not None:
        key += ("grouped",) + tuple(int(g) for g in grouped)
    return key


def conv_route(x_shape, w_shape, stride_y, stride_x, pad_y, pad_x, act, residual=False,
               dilation=None, groups=None):
    """"cudnn" or "own": the implementation chosen for this convolution shape, or None
    when the shape has not run yet. act: the convolution's activation (an ops.Act,
    or a bool: relu or identity). residual=True asks about conv2d_residual, whose
    route is chosen (and timed) separately from conv2d's. dilation ((dy, dx)) or
    groups given: asks about conv2d_grouped (the other one defaulting to (1, 1) or
    x's channels / w's channels)."""
    grouped = None
    if dilation is not None or groups is not None:
        dy, dx = (1, 1) if dilation is None else dilation
        g = int(x_shape[1]) // int(w_shape[1]) if groups is None else groups
        grouped = (dy, dx, g)
    return _routes.get(route_key(x_shape, w_shape, stride_y, stride_x, pad_y, pad_x,
                                 act_args(act, "conv_route"), residual, grouped))


class CudnnConv:
    """The cuDNN route of one convolution shape: cuDNN computes conv + b (+ z) and the
    activation it can apply (``cudnn_act``: cudnn.RELU or cudnn.IDENTITY); ``post``
    is the (code, param) the own activation kernel then applies to y in place, or
    None when cuDNN applied the activation itself. ``activation`` is the backend's
    activation op."""

    __slots__ = ("cudnn", "cudnn_act", "post", "activation")

    def __init__(self, cudnn, act, activation):
        self.cudnn, self.activation = cudnn, activation
        self.cudnn_act = cudnn.cudnn_activation(act)
        self.post = None
        if self.cudnn_act is None:
            self.cudnn_act, self.post = cudnn.IDENTITY, act

    def conv2d(self, x, w, b, y, sy, sx, py, px):
        self.cudnn.conv2d(x, w, b, y, sy, sx, py, px, self.cudnn_act)
        if self.post is not None:
            self.activation(y, y, self.post)

    def conv2d_residual(self, x, w, b, z, y, sy, sx, py, px):
        self.cudnn.conv2d_residual(x, w, b, z, y, sy, sx, py, px, self.cudnn_act)
        if self.post is not None:
            self.activation(y, y, self.post)

    def conv2d_grouped(self, x, w, b, y, sy, sx, py, px, dy, dx, groups):
        self.cudnn.conv2d_grouped(x, w, b, y, sy, sx, py, px, dy, dx, groups, self.cudnn_act)
        if self.post is not None:
            self.activation(y, y, self.post)


def choose(key, act, make_own, time_own, time_cudnn, activation):
    """The plan of one convolution shape, recorded under ``key`` (route_key):

    - route "own", or cuDNN not usable: ``make_own()``, the own kernels' plan;
    - route "cudnn": a CudnnConv (the own plan is not even built);
    - "auto": both, timed as the caller runs them (``time_own(plan)`` and
      ``time_cudnn(route)`` return seconds per call, inf where cuDNN cannot run
      the shape); the faster one.
    ``act`` is the (code, param) of the convolution; ``activation`` the backend's
    activation op (for CudnnConv.post)."""
    cudnn = cudnn_module()
    via = CudnnConv(cudnn, act, activation) if cudnn is not None else None
    if via is not None and _mode == CUDNN:
        _routes[key] = CUDNN
        return via
    own = make_own()
    route = OWN
    if via is not None:
        try:
            t_cudnn = time_cudnn(via)
        except Exception:          # cuDNN cannot run this shape: the own kernel can
            t_cudnn = float("inf")
        if t_cudnn < time_own(own):
            route = CUDNN
    _routes[key] = route
    return via if route == CUDNN else own


__all__ = ["CUDNN", "OWN", "CudnnConv", "choose", "conv_route", "cudnn_module", "route_key",
           "set_conv_route", "use_cudnn"]

"""backend_info(net): where a network runs and which path each convolution takes."""
from . import ops

CPU_KERNEL, OWN_KERNEL = "CPU kernel", "own kernel"


class BackendInfo(dict):
    """A dict (device, gpu, cudnn, cudnn_library, cudnn_reason, convolutions) that
    prints as a short report."""

    def __str__(self):
        lines = [f"device: {self['device']}" + (f" ({self['gpu']})" if self.get("gpu") else "")]
        if self.get("cudnn"):
            lines.append(f"cuDNN: {self['cudnn']} ({self['cudnn_library']})")
        else:
            lines.append(f"cuDNN: not used ({self.get('cudnn_reason') or 'not available'})")
        convs = self["convolutions"]
        if not convs:
            lines.append("convolutions: none compiled yet (run a forward, or pass input_shape)")
        for c in convs:
            algo = f", {c['algorithm']}" if c.get("algorithm") else ""
            fb = f" (fell back: {c['fallback']})" if c.get("fallback") else ""
            lines.append(f"layer<{c['layer']}> con {c['input']} * {c['filters']} stride "
                         f"{c['stride']} pad {c['padding']}{' +residual' if c.get('residual') else ''}"
                         f"{' +relu' if c['relu'] else ''}: "
                         f"{c['path']}{algo}{fb}")
        return "\n".join(lines)


def _use_cudnn(be):
    flag = getattr(be, "use_cudnn", None)
    return flag() if callable(flag) else flag


def backend_info(net, input_shape=None):
    """Report the device of ``net``, the cuDNN version (decoded, e.g. "9.19.0") and, for
    each convolution of its compiled forward, the path it takes ("fused cuDNN call",
    "unfused cuDNN calls", "own kernel", "CPU kernel") and the cuDNN algorithm.

    The convolutions are those of the forward compiled at the last call of ``net``;
    ``input_shape`` (N, K, R, C) compiles one for that shape when there is none yet.
    A convolution that has not yet run through cuDNN shows the path it will take.
    """
    from .backends import cudnn
    info = BackendInfo(device=net.device, gpu=None, cudnn=None, cudnn_library=None,
                       cudnn_reason=None, convolutions=[])
    be = None
    if net.device == "cuda":
        be = ops.backend("cuda")
        try:
            import pycuda.driver as drv
            info["gpu"] = drv.Context.get_device().name()
        except Exception:
            pass
    if cudnn.available():
        info["cudnn"], info["cudnn_library"] = cudnn.version_string(), cudnn.library_path()
    else:
        info["cudnn_reason"] = cudnn.unavailable_reason()

    progs = net.programs()
    if not progs and input_shape is not None:
        progs = [net._program(tuple(int(s) for s in input_shape))]
    if not progs:
        return info
    prog = progs[-1]
    nodes = net.chain()
    where = {}
    for node, y in prog.outputs:              # bottom-up: the first owner of a buffer made it
        where.setdefault(id(y), nodes.index(node))
    routed = _use_cudnn(be) if be is not None else False
    for fn, args in prog.steps:
        name = getattr(fn, "__name__", None)
        if name == "conv2d":
            (x, w, b, y, sy, sx, py, px, relu), z = args, None
        elif name == "conv2d_residual":         # a convolution that also adds its block's shortcut
            x, w, b, z, y, sy, sx, py, px, relu = args
        else:
            continue
        c = {"layer": where.get(id(y)), "input": tuple(x.shape), "filters": tuple(w.shape),
             "stride": (sy, sx), "padding": (py, px), "relu": bool(relu), "bias": b is not None,
             "residual": z is not None,
             "path": CPU_KERNEL if be is None else OWN_KERNEL, "algorithm": None,
             "fallback": None}
        route = getattr(be, "conv_route", None)
        if route is not None:
            route = route(x.shape, w.shape, sy, sx, py, px, relu, residual=z is not None)
        if route == "own":
            pass
        elif be is not None and info["cudnn"]:
            geometry = (x.shape, w.shape, sy, sx, py, px, relu)
            p = cudnn.conv_path(*geometry, plan=False, residual=z is not None)
            if (p is None or p["calls"] == 0) and routed:
                p = cudnn.conv_path(*geometry, plan=True, residual=z is not None)
            if p is not None and (p["calls"] > 0 or routed):
                c.update(path=cudnn.PATH_NAMES[p["path"]], algorithm=p["algorithm"],
                         fallback=p["fallback"])
        info["convolutions"].append(c)
    return info


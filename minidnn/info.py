"""backend_info(net): where a network runs and which path each convolution takes."""
from . import ops

CPU_KERNEL, OWN_KERNEL = "CPU kernel", "own kernel"
# appended to a cuDNN path when cuDNN cannot apply the convolution's activation
# (backends/cuda/routing.py: cuDNN with the identity epilogue, then the own kernel)
OWN_ACTIVATION = " + own activation kernel"
_CONV_OPS = ("conv2d", "conv2d_residual", "conv2d_winograd", "conv2d_grouped", "conv2d_transpose")


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
            act = c.get("act", "relu" if c.get("relu") else "identity")
            extra = ""
            if c.get("groups", 1) != 1:
                extra += f" groups {c['groups']}"
            if tuple(c.get("dilation", (1, 1))) != (1, 1):
                extra += f" dilation {c['dilation']}"
            kind = "cont" if c.get("transposed") else "con"
            lines.append(f"layer<{c['layer']}> {kind} {c['input']} * {c['filters']} stride "
                         f"{c['stride']} pad {c['padding']}{extra}"
                         f"{' +residual' if c.get('residual') else ''}"
                         f"{'' if act == 'identity' else ' +' + act}: "
                         f"{c['path']}{algo}{fb}")
        return "\n".join(lines)


def _use_cudnn(be):
    flag = getattr(be, "use_cudnn", None)
    return flag() if callable(flag) else flag


def _act_text(act):
    """repr(act) ("relu", "leaky_relu(alpha=0.01)"), or its code for an activation no
    layer has registered with ops."""
    try:
        return repr(act)
    except KeyError:
        return f"activation {act.code}" + (f"(param={act.param:g})" if act.param else "")


def _as_act(a):
    """An ops.Act for a step's act argument (an Act, a bool, or a (code, param) pair)."""
    if isinstance(a, tuple) and not isinstance(a, ops.Act):
        return ops.Act(int(a[0]), float(a[1]))
    return ops.as_act(a)


def _conv_steps(prog):
    """(named arguments, op name) of each convolution step of a compiled Program: the
    arguments bound by the op's OpSpec (ops.OPS), whatever their order."""
    specs = getattr(prog, "specs", None) or [None] * len(prog.steps)
    for (fn, args), spec in zip(prog.steps, specs):
        spec = spec or ops.spec_of(fn)
        if spec is not None and spec.name in _CONV_OPS:
            yield spec.bind(args), spec.name


def backend_info(net, input_shape=None):
    """Report the device of ``net``, the cuDNN version (decoded, e.g. "9.19.0") and, for
    each convolution of its compiled forward, the path it takes ("fused cuDNN call",
    "unfused cuDNN calls", "own kernel", "CPU kernel"; a cuDNN path + " + own activation
    kernel" when cuDNN cannot apply the activation), the cuDNN algorithm, and its
    activation (``act``: the ops.Act's repr; ``relu``: whether it is relu).
    Grouped or dilated convolutions (conv2d_grouped) also give ``groups`` and
    ``dilation`` and are routed like the others (own kernel or cuDNN); transposed ones
    (conv2d_transpose, ``transposed``: True) always run the own (or CPU) kernel.

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
    for a, name in _conv_steps(prog):
        if name == "conv2d_winograd":           # 3x3 stride 1 as Winograd F(m x m, 3 x 3) (CPU)
            x, b, y, act = a["x"], a["b"], a["y"], _as_act(a["act"])
            info["convolutions"].append(
                {"layer": where.get(id(y)), "input": tuple(x.shape),
                 "filters": (y.shape[1], x.shape[1], 3, 3), "stride": (1, 1),
                 "padding": (a["pad_y"], a["pad_x"]), "relu": act.code == ops.RELU.code,
                 "act": _act_text(act), "bias": b is not None, "residual": a["z"] is not None,
                 "path": f"{CPU_KERNEL}, Winograd F({a['m']}x{a['m']},3x3)", "algorithm": None,
                 "fallback": None})
            continue
        x, w, b, y = a["x"], a["w"], a["b"], a["y"]
        residual = name == "conv2d_residual"     # also adds its block's shortcut
        act = _as_act(a["act"])
        sy, sx, py, px = a["stride_y"], a["stride_x"], a["pad_y"], a["pad_x"]
        c = {"layer": where.get(id(y)), "input": tuple(x.shape), "filters": tuple(w.shape),
             "stride": (sy, sx), "padding": (py, px), "relu": act.code == ops.RELU.code,
             "act": _act_text(act), "bias": b is not None, "residual": residual,
             "path": CPU_KERNEL if be is None else OWN_KERNEL, "algorithm": None,
             "fallback": None}
        grouped = {}
        if name == "conv2d_grouped":
            grouped = {"dilation": (a["dilation_y"], a["dilation_x"]), "groups": a["groups"]}
            c.update(grouped)
        if name == "conv2d_transpose":          # no cuDNN route: the own (or CPU) kernel
            c["transposed"] = True
            info["convolutions"].append(c)
            continue
        route = getattr(be, "conv_route", None)
        if route is not None:
            route = route(x.shape, w.shape, sy, sx, py, px, act, residual=residual, **grouped)
        if route == "own":
            pass
        elif be is not None and info["cudnn"]:
            # what cuDNN itself applies: the activation, or identity and then the own kernel
            cudnn_act = cudnn.cudnn_activation(act)
            post = cudnn_act is None
            geometry = (x.shape, w.shape, sy, sx, py, px, cudnn.IDENTITY if post else cudnn_act)
            p = cudnn.conv_path(*geometry, plan=False, residual=residual, **grouped)
            if (p is None or p["calls"] == 0) and routed:
                p = cudnn.conv_path(*geometry, plan=True, residual=residual, **grouped)
            if p is not None and (p["calls"] > 0 or routed):
                c.update(path=cudnn.PATH_NAMES[p["path"]] + (OWN_ACTIVATION if post else ""),
                         algorithm=p["algorithm"], fallback=p["fallback"])
        info["convolutions"].append(c)
    return info

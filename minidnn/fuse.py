"""fuse(net): fold batch-norm / affine layers and ReLUs into the convolution or
fully connected layer below them, for deployment.

For each enabled con_ or fc_ L, looking up the chain through disabled layers:

1. a bn_ (running statistics) or affine_ directly above L is folded into it,
   per output unit o:  W'[o] = W[o] * g[o],  b'[o] = g[o] * b[o] + h[o]
   where (g, h) is the layer's affine form (bn: g = gamma / sqrt(var + eps),
   h = beta - mean * g); b = 0 where L had no bias (fuse enables it). The
   absorbed layer becomes a disabled affine_ (an identity that costs nothing).
2. a relu_ directly above L, or above the layer just absorbed, becomes L's
   epilogue (``L.fused_relu``) and is disabled, whether or not L has a bias.

A bn_ that cannot be folded (not directly above a con_ or fc_, or a per-unit
bn_fc above a convolution) becomes the equivalent affine_. Everything is
computed in float64 and stored in float32; fusing twice changes nothing.

dlib's visitor (PR #2294) adds beta without scaling an existing bias by gamma,
and drops the ReLU when the convolution has no bias; both are right here.
"""
import numpy as np

from .core import structure_changed
from .layers import CONV, affine_, bn_, con_, fc_, relu_


def _affine_form(layer):
    """(g, h) in float64 with y = g * x + h, for a bn_ (inference) or an affine_."""
    if isinstance(layer, bn_):
        g = layer.gamma.astype(np.float64) / np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
        return g, layer.beta.astype(np.float64) - layer.running_mean.astype(np.float64) * g
    return layer.gamma.astype(np.float64), layer.beta.astype(np.float64)


def _foldable(below, above):
    """Whether the per-unit transform ``above`` can be folded into ``below``."""
    if not isinstance(above, (bn_, affine_)) or above.disabled or above.gamma is None:
        return False
    if isinstance(below, con_):
        return above.mode == CONV          # per channel of the convolution's output
    return True                            # fc output (N, O, 1, 1): per channel == per unit


def _fold(below, above):
    g, h = _affine_form(above)
    w = below.filters if isinstance(below, con_) else below.weights
    if g.shape[0] != w.shape[0]:
        return False
    scale = g.reshape((-1,) + (1,) * (w.ndim - 1))
    w[...] = (w.astype(np.float64) * scale).astype(np.float32)
    b = np.zeros(w.shape[0]) if below.biases is None else below.biases.astype(np.float64)
    new_b = (g * b + h).astype(np.float32)
    if below.biases is None:
        below.biases = new_b
        below.bias = True
    else:
        below.biases[...] = new_b
    return True


def _disabled_affine(layer):
    a = affine_(layer.mode)
    a.disable()
    return a


def fuse(net):
    """Fold bn_/affine_ and relu_ layers into the con_/fc_ below them, in place; return net.

    Requires a network whose parameters exist (it has run a forward or been
    trained or loaded). The output is unchanged up to float32 rounding.
    """
    nodes = net.chain()[::-1]                      # bottom first
    for i, node in enumerate(nodes):
        l = node.layer_details()
        if getattr(l, "filters", 0) is None or getattr(l, "weights", 0) is None:
            raise ValueError(f"fuse: layer<{len(nodes) - 1 - i}> {l.kind} has no parameters yet: "
                             f"run a forward (or train or load the net) first")
    for i, node in enumerate(nodes):
        l = node.layer_details()
        if not isinstance(l, (con_, fc_)) or l.disabled or l.fused_relu:
            continue
        j = i + 1
        while j < len(nodes) and nodes[j].layer_details().disabled:
            j += 1
        if j < len(nodes) and _foldable(l, nodes[j].layer_details()):
            above = nodes[j].layer_details()
            if _fold(l, above):
                nodes[j]._layer = _disabled_affine(above)
                j += 1
                while j < len(nodes) and nodes[j].layer_details().disabled:
                    j += 1
        if j < len(nodes) and isinstance(nodes[j].layer_details(), relu_):
            l.fused_relu = True
            nodes[j].layer_details().disable()
    for node in nodes:
        l = node.layer_details()
        if isinstance(l, bn_):
            node._layer = affine_.from_bn(l)
    structure_changed()
    return net

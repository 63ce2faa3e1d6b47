"""fuse(net): fold batch-norm / affine layers and activations into the convolution or
fully connected layer below them, for deployment.

For each enabled layer L that takes an epilogue (con_, fc_), looking up the
chain through disabled layers:

1. an affine-like layer directly above L (a bn_ with its running statistics,
   an affine_) is folded into it, per output unit o:
   W'[o] = W[o] * g[o],  b'[o] = g[o] * b[o] + h[o]
   where (g, h) is the layer's affine form (bn: g = gamma / sqrt(var + eps),
   h = beta - mean * g); b = 0 where L had no bias (fuse enables it). The
   absorbed layer becomes a disabled affine_ (an identity that costs nothing).
2. a pointwise activation directly above L, or above the layer just absorbed,
   becomes L's epilogue (``L.act``; a prelu with its current alpha) and is
   disabled, whether or not L has a bias.

Layers that are identities at inference (dropout_) are disabled first, so that
what they separated folds together. A bn_ that cannot be folded (not directly above a con_ or fc_, or a per-unit
bn_fc above a convolution) becomes the equivalent affine_. Everything is
computed in float64 and stored in float32; fusing twice changes nothing.

dlib's visitor (PR #2294) adds beta without scaling an existing bias by gamma,
and drops the ReLU when the convolution has no bias; both are right here.
"""
from .core import check_not_running, structure_changed
from .layers import CONV, affine_


def _foldable(below, above):
    """Whether the per-unit transform ``above`` can be folded into ``below``."""
    if not above.affine_like or above.disabled or above.gamma is None:
        return False
    if below.output_mode == CONV:
        return above.mode == CONV          # per channel of the convolution's output
    return True                            # fc output (N, O, 1, 1): per channel == per unit


def _disabled_affine(layer):
    a = affine_(layer.mode)
    a.disable()
    return a


def _skip_disabled(nodes, j):
    while j < len(nodes) and nodes[j].layer_details().disabled:
        j += 1
    return j


def fuse(net):
    """Fold affine-like layers and activations into the con_/fc_ below them, in place;
    return net.

    Requires a network whose parameters exist (it has run a forward or been
    trained or loaded). The output is unchanged up to float32 rounding.
    """
    check_not_running(net, "fuse")
    nodes = net.chain()[::-1]                      # bottom first
    for i, node in enumerate(nodes):
        l = node.layer_details()
        if l.takes_epilogue and getattr(l, l.weight_name) is None:
            raise ValueError(f"fuse: layer<{len(nodes) - 1 - i}> {l.kind} has no parameters yet: "
                             f"run a forward (or train or load the net) first")
    for node in nodes:                             # identities at inference (dropout): gone
        l = node.layer_details()
        if l.identity_at_inference and not l.disabled:
            l.disable()
    for i, node in enumerate(nodes):
        l = node.layer_details()
        if not l.takes_epilogue or l.disabled or l.act:
            continue
        j = _skip_disabled(nodes, i + 1)
        if j < len(nodes) and _foldable(l, nodes[j].layer_details()):
            above = nodes[j].layer_details()
            if l.fold(*above.affine_form()):
                nodes[j]._layer = _disabled_affine(above)
                j = _skip_disabled(nodes, j + 1)
        if j < len(nodes) and nodes[j].layer_details().pointwise:
            l.act = nodes[j].layer_details().act
            nodes[j].layer_details().disable()
    for node in nodes:
        l = node.layer_details()
        if l.affine_like and not isinstance(l, affine_):
            node._layer = affine_.from_bn(l)
    structure_changed()
    return net

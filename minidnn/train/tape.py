"""The training tape: a network's training-mode forward and its backward.

A tape walks the chain bottom-up calling each layer's ``forward_train(ctx, x)``
(batch-norm uses the batch's statistics there and moves its running
statistics), then top-down calling ``backward(ctx, dy)``, which writes the
parameter gradients into ``ctx.grads`` and returns the gradient for the layer
below. Tags collect the gradients that their skipN / add_prevN send them.
This is separate from the compiled inference program (``Node.forward`` is
untouched); every numeric step is a kernel behind ``minidnn.ops``.
"""
import numpy as np

from .. import ops
from ..core import LayerError, ShapeError


class Ctx:
    """What one node keeps between its training forward and backward.

    x, y: its input and output; grads: parameter name -> gradient array (kept
    across steps); saved: whatever the layer stores (batch statistics ...);
    ref: the tag context a skip / add_prev refers to; extra: the gradient sent
    to a tag from above; need_dx: whether the layer below wants a gradient.
    """

    __slots__ = ("index", "tape", "layer", "x", "y", "grads", "saved", "ref", "extra",
                 "need_dx", "update_stats")

    def __init__(self, index, tape, layer, need_dx):
        self.index, self.tape, self.layer, self.need_dx = index, tape, layer, need_dx
        self.x = self.y = self.saved = self.ref = self.extra = None
        self.grads = {}
        self.update_stats = True

    def grad(self, name):
        """The gradient array of parameter ``name`` (None when the parameter is None)."""
        p = getattr(self.layer, name)
        if p is None:
            return None
        g = self.grads.get(name)
        if g is None or g.shape != p.shape:
            g = self.grads[name] = np.empty(p.shape, np.float32)
        return g

    def zero_grads(self):
        for name in self.layer.params:
            g = self.grad(name)
            if g is not None:
                g[...] = 0

    def add_extra(self, g):
        if g is None:
            return
        if self.extra is None:
            self.extra = np.array(g, np.float32, copy=True)
        else:
            ops.add(self.extra, g, self.extra, False)

    def take_extra(self, dy):
        e, self.extra = self.extra, None
        if e is None:
            return dy
        if dy is not None:
            ops.add(e, dy, e, False)
        return e


class Tape:
    """The training forward/backward of a network (a chain of nodes, maybe with a loss on top).

    ``seed`` and ``step`` say which training step a forward is (the trainer sets them: its
    seed and the number of steps done); random layers (dropout) derive their masks from
    (seed, step, layer index), so a run is reproducible and resumable without saving them.
    """

    def __init__(self, net, input_grad=False, seed=0):
        self.seed, self.step = int(seed), 0
        chain = net.chain()
        top = chain[0].layer_details()
        self.loss = top if top.is_loss else None
        nodes = chain[1:] if self.loss is not None else chain
        self.n_total = len(chain)
        self.nodes = [n for n in reversed(nodes) if not n.layer_details().is_input]
        self.ctxs = []
        for pos, node in enumerate(self.nodes):
            layer = node.layer_details()
            index = self.n_total - 1 - (pos + 1)     # layer<i> numbering, input at the bottom
            if not layer.disabled or layer.routing:
                if not layer.trainable:
                    raise LayerError(f"layer<{index}> {layer.kind}: {type(layer).__name__} has no "
                                     f"training forward/backward, so this net cannot be trained")
            self.ctxs.append(Ctx(index, self, layer, need_dx=pos > 0 or input_grad))
        self.tags = {}

    def forward(self, x, update_stats=True):
        """The training-mode output of the top node below the loss, for x (N, K, R, C)."""
        self.tags = {}
        for ctx in self.ctxs:
            layer = ctx.layer
            ctx.x, ctx.extra, ctx.update_stats = x, None, update_stats
            if layer.disabled and not layer.routing:
                y = x
            else:
                try:
                    y = layer.forward_train(ctx, x)
                except ShapeError as e:
                    raise LayerError(f"layer<{ctx.index}> {layer.kind}: {e}") from None
                except MemoryError as e:
                    raise MemoryError(f"layer<{ctx.index}> {layer.kind}: out of memory in the "
                                      f"training forward: {e}") from None
            ctx.y = x = y
        return x

    def backward(self, dy):
        """From the gradient of the loss w.r.t. the output of forward(), fill every ctx.grads.
        Returns the gradient w.r.t. the input when the tape was made with input_grad=True
        (None if no path reaches it)."""
        for ctx in reversed(self.ctxs):
            layer = ctx.layer
            if layer.disabled and not layer.routing:
                continue
            if dy is None and not layer.tags_defined():
                ctx.zero_grads()         # this layer's output does not reach the loss
                continue
            dy = layer.backward(ctx, dy)
        return dy

    def parameters(self):
        """[(key, layer, name, array, gradient)] for every learnable array, bottom first."""
        out = []
        for ctx in self.ctxs:
            layer = ctx.layer
            if layer.disabled:
                continue
            for name in layer.params:
                p = getattr(layer, name)
                if p is not None:
                    out.append((f"{ctx.index}.{name}", layer, name, p, ctx.grad(name)))
        return out

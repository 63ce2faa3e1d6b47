"""Layers that route tensors by tags: tagN, skipN, add_prevN (dlib's tag_, skip_, add_prev_).

Each refers to the nearest tagN below it, as in dlib. They cost nothing but
add_prev's addition (which the convolution below it takes into its epilogue
when it can).
"""
import numpy as np

from .. import ops
from ..core import IDENTITY, Layer, Node, ShapeError, u32
from .common import pos_int


class _numbered(Layer):
    """Base of tagN, skipN and add_prevN: a routing layer with a number 1..10."""

    prefix = ""
    settings = (u32("id"),)
    routing = True
    trainable = True

    def __init__(self, id):
        super().__init__()
        self.id = pos_int(self.prefix, "id", id)

    @property
    def kind(self):
        return f"{self.prefix}{self.id}"

    def write_record(self, w):
        w.u32("id", self.id)            # no disabled flag: routing layers are never disabled

    @classmethod
    def read_record(cls, r, tag):
        return cls(r.u32("id"))

    def tags_used(self):
        return (self.id,)

    def tagged(self, plan_or_tape):
        """The output of the nearest tagN below (from a Plan's or a training tape's tags)."""
        t = plan_or_tape.tags.get(self.id)
        if t is None:
            raise ShapeError(f"there is no tag{self.id} below this layer")
        return t


class tag_(_numbered):
    """WHAT THIS OBJECT REPRESENTS: an identity marker (tagN) that skipN and
    add_prevN above it refer to. Costs nothing."""

    prefix = "tag"
    record = "tag_1"
    output_mode = None

    def tags_used(self):
        return ()

    def tags_defined(self):
        return (self.id,)

    def build(self, plan, x):
        plan.tags[self.id] = x
        return x

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        ctx.tape.tags[self.id] = ctx
        return x

    def backward(self, ctx, dy):
        """dy plus what the skipN / add_prevN above sent to this tag."""
        return ctx.take_extra(dy)


class skip_(_numbered):
    """WHAT THIS OBJECT REPRESENTS: output = the output of the nearest tagN below
    (its input is ignored). Costs nothing."""

    prefix = "skip"
    record = "skip_1"

    def build(self, plan, x):
        return self.tagged(plan)

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        ctx.ref = self.tagged(ctx.tape)
        return ctx.ref.y

    def backward(self, ctx, dy):
        """All of dy goes to the tag; the input below gets no gradient (None)."""
        ctx.ref.add_extra(dy)
        return None


class add_prev_(_numbered):
    """WHAT THIS OBJECT REPRESENTS: output = input + the output of the nearest tagN
    below; both must have the same shape (N, K, R, C)."""

    prefix = "add_prev"
    record = "add_prev_1"
    forward_ops = ("add",)

    def _check(self, t, x):
        if tuple(t.shape) != tuple(x.shape):
            raise ShapeError(f"expected the input and tag{self.id}'s output to have the same shape, "
                             f"got {tuple(x.shape)} and {tuple(t.shape)}")

    def build(self, plan, x):
        t = self.tagged(plan)
        self._check(t, x)
        if plan.fuse_residual(x, t):     # the convolution below adds t in its epilogue
            return x
        y = plan.empty(x.shape)
        plan.step(ops.add, x, t, y, IDENTITY)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        ctx.ref = self.tagged(ctx.tape)
        t = ctx.ref.y
        self._check(t, x)
        y = np.empty(x.shape, np.float32)
        ops.add(x, t, y, IDENTITY)
        return y

    def backward(self, ctx, dy):
        """dy goes both to the input below and to the tag."""
        ctx.ref.add_extra(dy)
        return dy


def make_family(cls, prefix, n=10):
    """The factories prefix1 .. prefixN for a numbered layer class."""
    def make(i):
        def factory(subnet):
            return Node(cls(i), subnet)
        factory.__name__ = factory.__qualname__ = f"{prefix}{i}"
        factory.__doc__ = f"{prefix}{i}(subnet): see {cls.__name__}."
        factory._matches = lambda layer, i=i: isinstance(layer, cls) and layer.id == i
        return factory
    return [make(i) for i in range(1, n + 1)]


(tag1, tag2, tag3, tag4, tag5, tag6, tag7, tag8, tag9, tag10) = make_family(tag_, "tag")
(skip1, skip2, skip3, skip4, skip5, skip6, skip7, skip8, skip9, skip10) = make_family(skip_, "skip")
(add_prev1, add_prev2, add_prev3, add_prev4, add_prev5, add_prev6, add_prev7, add_prev8, add_prev9,
 add_prev10) = make_family(add_prev_, "add_prev")

__all__ = ["tag_", "skip_", "add_prev_"] + [f"{p}{i}" for p in ("tag", "skip", "add_prev")
                                           for i in range(1, 11)]

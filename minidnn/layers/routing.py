"""Layers that route tensors by tags: tagN, skipN, add_prevN (dlib's tag_, skip_, add_prev_),
and the catalogue's concat, mult_prevN, scaleN, scale_prevN, resize_prev_to_taggedN.

Each refers to the nearest tagN below it, as in dlib. They cost nothing but
add_prev's addition (which the convolution below it takes into its epilogue
when it can) and the catalogue's own kernels; concat's copies are free where the
producers can write straight into the concatenation (core.Plan.alias).
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
    below. As dlib's add_prev_ (tt::add), the two may differ in shape: the output takes the
    larger of each dimension, an element one of them lacks counting as 0 (the shortcut of a
    downsampling ResNet block, as in dlib's face descriptor). Equal shapes are the fast
    path; different ones are NumPy on the CPU, ops.add's zero-padded kernel on a device."""

    prefix = "add_prev"
    record = "add_prev_1"
    forward_ops = ("add",)

    def _shape(self, t, x):
        return tuple(max(a, b) for a, b in zip(x.shape, t.shape))

    def build(self, plan, x):
        t = self.tagged(plan)
        if tuple(t.shape) == tuple(x.shape):
            if plan.fuse_residual(x, t):     # the convolution below adds t in its epilogue
                return x
            y = plan.empty(x.shape)
            plan.step(ops.add, x, t, y, IDENTITY)
            return y
        y = plan.empty(self._shape(t, x))
        if plan.device != "cpu":
            # a device's add takes operands of other shapes (zero padded, act epilogue)
            plan.step(ops.add, x, t, y, IDENTITY)
            return y
        plan.steps.append((_padded_add, (x, t, y)))
        plan.specs.append(None)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        ctx.ref = self.tagged(ctx.tape)
        t = ctx.ref.y
        y = np.empty(self._shape(t, x), np.float32)
        if tuple(t.shape) == tuple(x.shape):
            ops.add(x, t, y, IDENTITY)
        else:
            _padded_add(x, t, y)
        return y

    def backward(self, ctx, dy):
        """dy goes both to the input below and to the tag (each its own part of it)."""
        t, x = ctx.ref.y, ctx.x

        def part(a):
            if tuple(a.shape) == tuple(dy.shape):
                return dy
            return np.ascontiguousarray(dy[:a.shape[0], :a.shape[1], :a.shape[2], :a.shape[3]])
        ctx.ref.add_extra(part(t))
        return part(x)


def _padded_add(a, b, y):
    """y = a + b, each zero padded to y's shape (dlib's tt::add of tensors of other sizes)."""
    y[...] = 0
    y[:a.shape[0], :a.shape[1], :a.shape[2], :a.shape[3]] += a
    y[:b.shape[0], :b.shape[1], :b.shape[2], :b.shape[3]] += b


def make_family(cls, prefix, n=10):
    """The factories prefix1 .. prefixN for a numbered layer class (each carries its
    ``layer_class`` and ``id``: concat reads which tag a tag factory stands for)."""
    def make(i):
        def factory(subnet):
            return Node(cls(i), subnet)
        factory.__name__ = factory.__qualname__ = f"{prefix}{i}"
        factory.__doc__ = f"{prefix}{i}(subnet): see {cls.__name__}."
        factory._matches = lambda layer, i=i: isinstance(layer, cls) and layer.id == i
        factory.layer_class, factory.id = cls, i
        return factory
    return [make(i) for i in range(1, n + 1)]


(tag1, tag2, tag3, tag4, tag5, tag6, tag7, tag8, tag9, tag10) = make_family(tag_, "tag")
(skip1, skip2, skip3, skip4, skip5, skip6, skip7, skip8, skip9, skip10) = make_family(skip_, "skip")
(add_prev1, add_prev2, add_prev3, add_prev4, add_prev5, add_prev6, add_prev7, add_prev8, add_prev9,
 add_prev10) = make_family(add_prev_, "add_prev")

__all__ = ["tag_", "skip_", "add_prev_"] + [f"{p}{i}" for p in ("tag", "skip", "add_prev")
                                           for i in range(1, 11)]


# ---------------------------------------------------------------------------- the catalogue
class mult_prev_(_numbered):
    """WHAT THIS OBJECT REPRESENTS: output = input * the output of the nearest tagN below,
    elementwise (dlib's mult_prev_). As dlib (multiply_zero_padded), the output has the
    larger of the two sizes in each dimension and a value missing from one of them counts
    as 0; with equal shapes it is the plain product."""

    prefix = "mult_prev"
    record = "mult_prev_1"
    forward_ops = ("mul",)

    @staticmethod
    def _shape(x, t):
        return tuple(max(a, b) for a, b in zip(x.shape, t.shape))

    def build(self, plan, x):
        t = self.tagged(plan)
        y = plan.empty(self._shape(x, t))
        plan.step(ops.mul, x, t, y)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        ctx.ref = self.tagged(ctx.tape)
        t = ctx.ref.y
        y = np.empty(self._shape(x, t), np.float32)
        ops.mul(x, t, y)
        return y

    def backward(self, ctx, dy):
        """d input = dy * tag, d tag = dy * input (each cut to its own shape)."""
        t = ctx.ref.y
        dt = np.empty(t.shape, np.float32)
        ops.mul(dy, ctx.x, dt)
        ctx.ref.add_extra(dt)
        if not ctx.need_dx:
            return None
        dx = np.empty(ctx.x.shape, np.float32)
        ops.mul(dy, t, dx)
        return dx


def _check_scales(scales, src):
    if scales.shape[0] != src.shape[0] or scales.shape[1] != src.shape[1] or \
            scales.shape[2] != 1 or scales.shape[3] != 1:
        raise ShapeError(f"expected scales shaped ({src.shape[0]}, {src.shape[1]}, 1, 1) for an "
                         f"input {tuple(src.shape)}, got {tuple(scales.shape)}")


class _scale_base(_numbered):
    """scale_ and scale_prev_: y[n,k,r,c] = src[n,k,r,c] * scales[n,k], scales (N,K,1,1)."""

    forward_ops = ("scale_channels",)
    scales_from_tag = None         # scale_: the input holds the scales; scale_prev_: the tag

    def _split(self, x, t):
        return (t, x) if self.scales_from_tag else (x, t)     # (scales, src)

    def build(self, plan, x):
        scales, src = self._split(x, self.tagged(plan))
        _check_scales(scales, src)
        y = plan.empty(src.shape)
        plan.step(ops.scale_channels, src, scales, y)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        ctx.ref = self.tagged(ctx.tape)
        scales, src = self._split(x, ctx.ref.y)
        _check_scales(scales, src)
        y = np.empty(src.shape, np.float32)
        ops.scale_channels(src, scales, y)
        return y

    def backward(self, ctx, dy):
        """d src = dy * scales (per channel); d scales = sum over (r, c) of dy * src."""
        scales, src = self._split(ctx.x, ctx.ref.y)
        dsrc = np.empty(src.shape, np.float32)
        ops.scale_channels(dy, scales, dsrc)
        dscales = np.empty(scales.shape, np.float32)
        ops.dot_channels(src, dy, dscales)
        to_input, to_tag = (dsrc, dscales) if self.scales_from_tag else (dscales, dsrc)
        ctx.ref.add_extra(to_tag)
        return to_input if ctx.need_dx else None


class scale_(_scale_base):
    """WHAT THIS OBJECT REPRESENTS: output = the output of the nearest tagN below, scaled per
    channel by this layer's input (dlib's scale_: SCALES = the input (N, K, 1, 1), the
    output has the shape of the tagged output: OUT(n,k,r,c) = TAGGED(n,k,r,c)*SCALES(n,k))."""

    prefix = "scale"
    record = "scale_1"
    scales_from_tag = False


class scale_prev_(_scale_base):
    """WHAT THIS OBJECT REPRESENTS: output = this layer's input scaled per channel by the
    output of the nearest tagN below (dlib's scale_prev_, the squeeze-and-excitation
    pattern: SCALES = the tagged output (N, K, 1, 1), OUT(n,k,r,c) = INPUT(n,k,r,c)*SCALES(n,k);
    the output has the input's shape)."""

    prefix = "scale_prev"
    record = "scale_prev_1"
    scales_from_tag = True


class resize_prev_to_tagged_(_numbered):
    """WHAT THIS OBJECT REPRESENTS: the input resized bilinearly (dlib's aligned corners, as
    upsample_) to the rows and columns of the nearest tagN's output (dlib's
    resize_prev_to_tagged_): (N, K, R, C) -> (N, K, Rt, Ct); an identity (no copy) when the
    sizes already agree (dlib copies). The tag gets no gradient."""

    prefix = "resize_prev_to_tagged"
    record = "resize_prev_to_tagged_1"
    forward_ops = ("resize_bilinear",)

    def _shape(self, x, t):
        if t.shape[0] != x.shape[0]:
            raise ShapeError(f"expected tag{self.id}'s output to have the input's {x.shape[0]} "
                             f"samples, got shape {tuple(t.shape)}")
        return (x.shape[0], x.shape[1], t.shape[2], t.shape[3])

    def build(self, plan, x):
        shape = self._shape(x, self.tagged(plan))
        if shape == tuple(x.shape):
            return x
        y = plan.empty(shape)
        plan.step(ops.resize_bilinear, x, y)
        return y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        shape = self._shape(x, self.tagged(ctx.tape).y)
        if shape == tuple(x.shape):
            return x
        y = np.empty(shape, np.float32)
        ops.resize_bilinear(x, y)
        return y

    def backward(self, ctx, dy):
        if not ctx.need_dx:
            return None
        if dy.shape == ctx.x.shape:
            return dy
        dx = np.empty(ctx.x.shape, np.float32)
        ops.resize_bilinear_grad(dy, dx)
        return dx


class concat_(Layer):
    """WHAT THIS OBJECT REPRESENTS: the outputs of the listed tags concatenated along the
    channels, in the order listed (dlib's concat_<tag...>); its own input is ignored (as a
    skip's). The tagged outputs must agree in N, R and C: (N, sum of K, R, C).

    The compiled forward copies nothing where it can: a tagged output that is a buffer of
    its own (not the net's input, not a view, not already placed) and whose slice of the
    output is contiguous (batch 1, or a single tag) becomes that slice (core.Plan.alias: its
    producer writes straight into the concatenation); the others are copied (copy_range).
    """

    kind = "concat"
    record = "concat_1"
    routing = True
    trainable = True
    forward_ops = ("copy_range",)

    def __init__(self, ids):
        super().__init__()
        ids = tuple(ids)
        if not ids:
            raise ValueError("concat: needs at least one tag")
        self.ids = tuple(pos_int("concat", "tag id", i) for i in ids)

    def describe(self):
        return ",".join(str(i) for i in self.ids)

    def tags_used(self):
        return tuple(dict.fromkeys(self.ids))

    def write_record(self, w):
        w.u32("count", len(self.ids))   # no disabled flag: routing layers are never disabled
        for i in self.ids:
            w.u32("id", i)

    @classmethod
    def read_record(cls, r, tag):
        n = r.u32("count")
        if not 1 <= n <= 4096:
            raise ValueError(f"concat: tag count {n} is out of range (1..4096)")
        return cls([r.u32("id") for _ in range(n)])

    def _tagged(self, tags):
        out = []
        for i in self.ids:
            t = tags.get(i)
            if t is None:
                raise ShapeError(f"there is no tag{i} below this layer")
            out.append(t)
        return out

    def _shape(self, ts):
        t0 = ts[0]
        for i, t in zip(self.ids, ts):
            if (t.shape[0], t.shape[2], t.shape[3]) != (t0.shape[0], t0.shape[2], t0.shape[3]):
                raise ShapeError(f"the tagged outputs must agree in N, R and C: tag{self.ids[0]} "
                                 f"has shape {tuple(t0.shape)}, tag{i} {tuple(t.shape)}")
        return (t0.shape[0], sum(t.shape[1] for t in ts), t0.shape[2], t0.shape[3])

    def build(self, plan, x):
        shape = self._shape(self._tagged(plan.tags))
        y = plan.empty(shape)
        cpu = isinstance(y, np.ndarray)
        views = plan.can_view()
        plane, k0 = shape[2] * shape[3], 0
        for i in self.ids:
            t = plan.tags[i]              # read again: an alias below may have replaced it
            kt = t.shape[1]
            if cpu:
                part = y[:, k0:k0 + kt]
            elif views and (shape[0] == 1 or kt == shape[1]):
                # a device (CUDA: a GPUArray at a pointer offset into y) where the slice is
                # contiguous: batch 1, or a single tag
                part = plan.view(y, k0 * plane, t.shape)
            else:
                # not contiguous (batch > 1), or a device without views: copied
                part = None
            if part is None or not part.flags.c_contiguous or not plan.alias(t, part):
                plan.step(ops.copy_range, t, y, 0, k0 * plane, kt * plane)
            k0 += kt
        # The output is a view of y, so that no later rewrite (fuse_activation,
        # fuse_residual) mistakes the producer of the last slice for the producer of it all.
        if cpu:
            return y[...]
        return plan.view(y, 0, shape) if views else y

    # -- training ---------------------------------------------------------
    def forward_train(self, ctx, x):
        refs = self._tagged(ctx.tape.tags)
        ts = [r.y for r in refs]
        shape = self._shape(ts)
        y = np.empty(shape, np.float32)
        plane, k0 = shape[2] * shape[3], 0
        for t in ts:
            ops.copy_range(t, y, 0, k0 * plane, t.shape[1] * plane)
            k0 += t.shape[1]
        ctx.saved = refs
        return y

    def backward(self, ctx, dy):
        """Each tag gets its channels of dy; the input below gets no gradient (None)."""
        plane, k0 = dy.shape[2] * dy.shape[3], 0
        for r in ctx.saved:
            k = r.y.shape[1]
            g = np.empty(r.y.shape, np.float32)
            ops.copy_range(dy, g, k0 * plane, 0, k * plane)
            r.add_extra(g)
            k0 += k
        return None


def concat(*args):
    """dlib's concat_<tag_a, tag_b, ...> on subnet: ``concat(dnn.tag1, dnn.tag2, subnet)``
    (tag factories, or their numbers, then the subnet last); see concat_."""
    if len(args) < 2:
        raise TypeError("concat(tag_a, ..., subnet): expected at least one tag and the subnet")
    *tags, subnet = args
    ids = []
    for t in tags:
        if getattr(t, "layer_class", None) is tag_:
            ids.append(t.id)
        elif isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            ids.append(int(t))
        else:
            raise TypeError(f"concat: expected tag factories (dnn.tag1 ...) or tag numbers before "
                            f"the subnet, got {t!r}")
    return Node(concat_(ids), subnet)


(mult_prev1, mult_prev2, mult_prev3, mult_prev4, mult_prev5, mult_prev6, mult_prev7, mult_prev8,
 mult_prev9, mult_prev10) = make_family(mult_prev_, "mult_prev")
(scale1, scale2, scale3, scale4, scale5, scale6, scale7, scale8, scale9,
 scale10) = make_family(scale_, "scale")
(scale_prev1, scale_prev2, scale_prev3, scale_prev4, scale_prev5, scale_prev6, scale_prev7,
 scale_prev8, scale_prev9, scale_prev10) = make_family(scale_prev_, "scale_prev")
(resize_prev_to_tagged1, resize_prev_to_tagged2, resize_prev_to_tagged3, resize_prev_to_tagged4,
 resize_prev_to_tagged5, resize_prev_to_tagged6, resize_prev_to_tagged7, resize_prev_to_tagged8,
 resize_prev_to_tagged9, resize_prev_to_tagged10) = make_family(resize_prev_to_tagged_,
                                                                "resize_prev_to_tagged")

__all__ += (["mult_prev_", "scale_", "scale_prev_", "resize_prev_to_tagged_", "concat_", "concat"]
            + [f"{p}{i}" for p in ("mult_prev", "scale", "scale_prev", "resize_prev_to_tagged")
               for i in range(1, 11)])

"""Networks as dlib-style nested layers, the layer contract, and the program that runs them.

A network is a chain of nodes (dlib's ``add_layer``): each node holds a layer
object (``layer_details()``) and the node below it (``subnet()``); the bottom
node is an input layer. ``fc(10, relu(con(16,5,5,1,1, input_tensor())))`` is
read bottom-up: input, con, relu, fc. tagN / skipN / add_prevN refer to the
nearest tagN below them, exactly as in dlib.

Running a node compiles the chain below it into a :class:`Program` once per
(input shape, device, structure revision): parameters are set up (dlib's
``setup``), every output buffer is allocated, and the forward becomes a flat
list of kernel calls that is replayed on each call. Identity layers (tags,
skips, disabled layers) cost nothing: their output *is* their input buffer.

Every layer is a subclass of :class:`Layer`, whose docstring is the contract.
"""
import collections
import contextlib
import os
import threading

import numpy as np

from . import ops
from .ops import IDENTITY, Act

# Bumped whenever something changes how a network must be compiled (a layer
# disabled or enabled, a fused epilogue added, parameters replaced): every
# cached Program is then rebuilt at the next forward.
_revision = [0]


def structure_changed():
    """Invalidate every compiled program (call after changing a layer's structure)."""
    _revision[0] += 1


# Threads. Every thread runs its own compiled programs (its own buffers; the
# parameters are shared), so concurrent forwards of one net never share memory.
# Building a program (which sets up parameters the first time) is serialised by
# one lock; running is not. Each thread remembers its last few programs, which is
# where get_output() finds a node's output.
_build_lock = threading.RLock()
_no_lock = contextlib.nullcontext()
_tls = threading.local()
_RECENT = 8


_running = set()        # the programs running now, in any thread (set.add/discard are atomic)


def check_not_running(net, what):
    """RuntimeError when another thread is running a forward through any node of ``net``
    (called by the operations that change a net's structure: fuse, to)."""
    nodes = set(net.chain())
    me = threading.get_ident()
    for prog in list(_running):
        if prog.thread != me and nodes.intersection(prog.node_outputs):
            raise RuntimeError(f"{what}: another thread is running a forward of this network; "
                               f"change a network only while no thread runs it")


def _physical_memory():
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


_PHYSICAL_MEMORY = _physical_memory()


def check_host_memory(nbytes, what):
    """MemoryError before asking for more host memory in one block than the machine has:
    where the OS overcommits, such an allocation succeeds and the process is killed when
    the pages are touched, which would be a crash instead of an error."""
    total = _PHYSICAL_MEMORY
    if total is not None and nbytes > total:
        raise MemoryError(f"{what} needs {nbytes / 2 ** 30:.1f} GiB; this machine has "
                          f"{total / 2 ** 30:.1f} GiB")


def _recent_programs():
    r = getattr(_tls, "recent", None)
    if r is None:
        r = _tls.recent = collections.deque(maxlen=_RECENT)
    return r


class LayerError(ValueError):
    """A user error located at one layer: the message names the layer index and the layer."""


class ShapeError(ValueError):
    """Raised by a layer's setup/build; the program turns it into a LayerError naming the layer."""


# --------------------------------------------------------------------------- declarations
class Field:
    """One setting of a layer (a constructor keyword argument) as its file record stores
    it: ``type`` is "u32", "f64", "bool" or "act" (an activation: name and parameter)."""

    __slots__ = ("name", "type")

    def __init__(self, name, type):
        self.name, self.type = name, type

    def __repr__(self):
        return f"{self.type}({self.name!r})"


def u32(name):
    return Field(name, "u32")


def f64(name):
    return Field(name, "f64")


def boolean(name):
    return Field(name, "bool")


def act_field(name="act"):
    return Field(name, "act")


class Param(str):
    """The name of an array attribute of a layer (a learnable parameter, or state such
    as running statistics) with its rank; it *is* the attribute's name."""

    def __new__(cls, name, ndim):
        s = super().__new__(cls, name)
        s.ndim = ndim
        return s


_layer_classes = []


class _ParamSlot:
    """The attribute of a declared Param: reading gives the array (or None); assigning
    validates it (Layer.validate_param), bumps its version (Layer.param_version) and
    invalidates every compiled program, so the next forward, save and GPU upload see the
    new array. Writing *into* the array (``layer.filters[...] = w``) needs neither: the
    CPU forward reads it in place -- except an array that a compiled forward keeps a
    transform of (Plan.cached: the filters of a convolution that runs as Winograd), which
    is read-only while the transform is cached; write it with ``layer.writable(name)``."""

    __slots__ = ("name", "key")

    def __init__(self, name):
        self.name, self.key = name, "_param_" + name

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        return obj.__dict__.get(self.key)

    def __set__(self, obj, value):
        new = obj.validate_param(self.name, value)
        obj._param_replaced(self.name, new)
        structure_changed()


def layer_classes():
    """Every Layer subclass that declares a file record, in definition order."""
    return list(_layer_classes)


# --------------------------------------------------------------------------- the contract
class Layer:
    """WHAT THIS OBJECT REPRESENTS: the computation of one node (dlib's layer_details).

    Its input is the output of the node below, a tensor (N, K, R, C); its output
    is one tensor, whose shape the layer decides. The hooks, each with what it
    requires and ensures (dlib's EXAMPLE_COMPUTATIONAL_LAYER_):

    ``setup(in_shape)``
        requires: in_shape = (N, K, R, C) of this layer's input.
        ensures: the parameters exist (allocated and initialised the first time,
        deterministically: layers.set_seed); a later call with another K raises
        ShapeError saying what was expected. N may change between calls.
    ``build(plan, x) -> y``
        requires: setup(x.shape) was called; x is the backend array holding the
        input (owned by the program).
        ensures: the layer's kernel calls are appended with ``plan.step(op, ...)``
        (only the ops named in ``forward_ops``), ``y`` is the buffer holding the
        output (``plan.empty`` or, for identities, x itself). An input it cannot
        take raises ShapeError. Called only when the layer is enabled.
    ``forward_train(ctx, x) -> y`` and ``backward(ctx, dy) -> dx`` (``trainable``)
        The training forward (new NumPy arrays; batch-norm uses batch statistics)
        and its backward: writes the gradient of each learnable parameter into
        ``ctx.grad(name)`` and returns dL/dx (None when ``not ctx.need_dx``).
        ``ctx`` (train.tape.Ctx) keeps x, y and whatever the layer saves.
    ``describe() -> str``
        Its settings as ``print(net)`` shows them (dlib's ``operator<<``).
    ``settings``, ``params``, ``state`` and ``record``: the file record
        ``settings`` are the constructor's keyword arguments (Fields, in record
        order), ``params`` the learnable arrays and ``state`` the other arrays
        the record stores (Params, with their rank). ``record`` is the tag it
        writes ("con_2"); ``old_records`` maps older tags to the classmethod that
        still reads them. serialize.py writes disabled, settings, then arrays,
        unless the layer defines ``write_record(w)`` / ``read_record(r, tag)``;
        ``check_record()`` validates the arrays against the settings.

    Capabilities, declared as class attributes (never probed):
    ``is_input`` (the bottom layer: ``to_tensor``, which returns the tensor or an
    :class:`InputBatch` (the tensor and what the layer knows about it); ``input_options``: the
    keyword arguments of ``net(x, ...)`` / ``net.forward(x, ...)`` it takes; ``takes_images``:
    it takes uint8 images, which ``check_image`` validates, rather than float tensors),
    ``is_loss`` (the top layer: ``to_label``, ``check_labels``, ``loss_and_grad``; see loss.py;
    ``label_options``: the keyword arguments of ``net(x, ...)`` it takes; ``takes_input_batch``:
    ``labels(out, batch, ...)`` also gets the InputBatch, e.g. to map detections back into
    the user's image),
    ``trainable``, ``routing`` (tag/skip/add_prev-like: never disabled, the
    training tape always runs it), ``pointwise`` (an activation: ``act`` is the
    ops.Act it applies, so fuse() may move it into the epilogue below),
    ``takes_epilogue`` (con/fc: fuse() folds an affine-like layer above into its
    parameters with ``fold(g, h)`` and moves an activation into ``act``),
    ``affine_like`` (bn/affine: ``affine_form() -> (g, h)`` per unit and ``mode``),
    ``identity_at_inference`` (dropout: fuse() disables it), ``output_mode`` ("conv" or "fc": the mode an affine_/bn_ put above defaults to; None
    passes on the mode of the layer below, as pointwise layers and tags do).
    """

    kind = "layer"
    settings = ()
    params = ()
    state = ()
    record = None
    old_records = {}
    write_record = None       # a method write_record(self, w) replaces the declared layout
    read_record = None        # and a classmethod read_record(cls, r, tag) reads it
    forward_ops = ()

    is_input = False
    takes_images = False
    input_options = ()
    is_loss = False
    label_options = ()
    takes_input_batch = False
    trainable = False
    routing = False
    pointwise = False
    takes_epilogue = False
    affine_like = False
    identity_at_inference = False
    output_mode = "conv"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        for p in tuple(cls.params) + tuple(cls.state):
            if not isinstance(cls.__dict__.get(p), _ParamSlot) and \
                    not any(isinstance(b.__dict__.get(p), _ParamSlot) for b in cls.__mro__[1:]):
                setattr(cls, p, _ParamSlot(p))
        if cls.__dict__.get("record"):
            _layer_classes.append(cls)

    # -- parameters ---------------------------------------------------------
    def set_array(self, name, value):
        """Set array attribute ``name`` as the layer's own code does (setup, fuse, readers):
        no validation and no recompilation (the program being built uses it anyway); its
        version is bumped."""
        self._param_replaced(name, value)

    def param_version(self, name):
        """A counter of the changes to array ``name`` made through the sanctioned paths: it
        is bumped when the array is replaced (assignment, set_array) and after every
        ``writable(name)`` block (fuse, the trainer's solver, a checkpoint restore). A
        parameter derived from the array (Plan.cached) is recomputed when it moves."""
        return self.__dict__.get("_versions", {}).get(name, 0)

    def _bump(self, name):
        v = self.__dict__.setdefault("_versions", {})
        v[name] = v.get(name, 0) + 1

    def _param_replaced(self, name, new):
        """Store ``new`` as array ``name``: bump the version and let the old array go
        writable again if a cached transform had made it read-only."""
        self.__dict__["_param_" + name] = new
        self._bump(name)
        locked = self.__dict__.get("_locked", {})
        if locked.get(name) is not None and locked[name] is not new:
            _unlock(locked.pop(name))

    def _lock_param(self, name, a):
        """Make array ``a`` (this layer's ``name``) read-only while a transform of it is
        cached (Plan.cached); ``writable`` and a replacement undo it."""
        locked = self.__dict__.setdefault("_locked", {})
        if a.flags.writeable:
            a.flags.writeable = False
            locked[name] = a

    @contextlib.contextmanager
    def writable(self, name):
        """The sanctioned way to write *into* parameter array ``name``:

            with layer.writable("filters") as w:
                w[...] = new_values

        yields the array itself, writeable for the block even when a cached transform
        (Plan.cached: a convolution that runs as Winograd) keeps it read-only otherwise;
        on exit its version is bumped, so that the next forward recomputes whatever was
        derived from it. fuse(), the trainer's solver and a checkpoint restore write
        through it. (A plain ``layer.filters[...] = w`` works on every array that no
        compiled forward transforms, and raises ValueError on one that is.)"""
        a = getattr(self, name)
        locked = self.__dict__.get("_locked", {})
        relock = a is not None and locked.get(name) is a
        depth = self.__dict__.setdefault("_writing", {})
        if relock:
            depth[name] = depth.get(name, 0) + 1
            a.flags.writeable = True
        try:
            yield a
        finally:
            self._bump(name)
            if relock:
                depth[name] -= 1
                if depth[name] == 0 and self.__dict__.get("_locked", {}).get(name) is a:
                    a.flags.writeable = False

    def param_shape(self, name):
        """The shape array ``name`` must have, with None for a dimension the settings do
        not fix (known once the input is), or None when anything of the right rank goes."""
        return None

    def param_optional(self, name):
        """Whether array ``name`` is absent by the layer's settings (bias=False, say):
        it stays None and cannot be assigned."""
        return False

    def validate_param(self, name, value):
        """The array to store for a user's ``layer.<name> = value``: float32, C-contiguous,
        of the declared rank and of the shape the layer has or its settings fix.
        Floating and integer arrays are converted to float32 (a copy, so the layer owns
        it); anything else, a wrong shape, or None where the layer needs an array
        raises LayerError."""
        decl = next(p for p in tuple(self.params) + tuple(self.state) if p == name)
        current = self.__dict__.get("_param_" + name)
        optional = self.param_optional(name)
        if value is None:
            if current is None or optional:
                return None
            raise LayerError(f"{self.kind}: {name} cannot be None (the layer uses it); "
                             f"assign a float32 array of shape {current.shape}")
        if optional and current is None:
            raise LayerError(f"{self.kind}: this layer has no {name} (bias=False); "
                             f"build the layer with a bias to give it one")
        a = np.asarray(value)
        if a.dtype.kind not in "fiu":
            raise LayerError(f"{self.kind}: {name} must be a float32 array, got dtype {a.dtype}")
        if a.ndim != decl.ndim:
            raise LayerError(f"{self.kind}: {name} must have {decl.ndim} dimensions, "
                             f"got shape {a.shape}")
        want = tuple(current.shape) if current is not None else self.param_shape(name)
        if want is not None and any(w is not None and w != g for w, g in zip(want, a.shape)):
            shown = "(" + ", ".join("?" if w is None else str(w) for w in want) + \
                ("," if len(want) == 1 else "") + ")"
            raise LayerError(f"{self.kind}: {name} must have shape {shown}, got {a.shape}")
        return np.array(a, dtype=np.float32, order="C", copy=True)

    def __init__(self):
        self._disabled = False

    # -- disabling (identity at no cost) --------------------------------
    @property
    def disabled(self):
        return self._disabled

    def disable(self):
        """Make this layer an identity that costs nothing in a forward pass."""
        if self.routing:
            raise ValueError(f"{self.kind}: routing layers cannot be disabled")
        if not self._disabled:
            self._disabled = True
            structure_changed()

    def enable(self):
        if self._disabled:
            self._disabled = False
            structure_changed()

    # -- interface --------------------------------------------------------
    def describe(self):
        return ""

    def setup(self, in_shape):
        pass

    def build(self, plan, x):
        return x

    def forward_train(self, ctx, x):
        raise NotImplementedError(f"{self.kind}: no training forward")

    def backward(self, ctx, dy):
        raise NotImplementedError(f"{self.kind}: no backward")

    def check_record(self):
        """Raise ValueError when the arrays do not fit the settings (on save and on load)."""

    def tags_defined(self):
        """The tag numbers this layer defines (tagN: (N,))."""
        return ()

    def tags_used(self):
        """The tag numbers this layer refers to (skipN, add_prevN ...: the nearest tagN below)."""
        return ()

    def num_parameters(self):
        return sum(getattr(self, p).size for p in self.params if getattr(self, p) is not None)

    def __repr__(self):
        d = self.describe()
        return f"{type(self).__name__}({d})" if d else f"{type(self).__name__}()"


class input_tensor_(Layer):
    """WHAT THIS OBJECT REPRESENTS: the input of a network: float32 arrays (N, K, R, C).

    After the first forward the channel count K is fixed; a later input with
    another K (or another rank or dtype) raises LayerError.
    """

    kind = "input_tensor"
    is_input = True
    record = "input_tensor_2"
    old_records = {"input_tensor_1": "read_record"}

    def __init__(self):
        super().__init__()
        self.k = None
        self.nr = self.nc = None      # rows and columns of the last input (None: none yet)

    def to_tensor(self, x, device, index):
        """The float32 (N, K, R, C) array for the user's input x (an array on ``device``);
        LayerError naming layer<index> when x is not one."""
        where = f"layer<{index}> {self.kind}"
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise LayerError(f"{where}: expected a float32 array shaped (N, K, R, C), "
                             f"got {type(x).__name__}")
        if not isinstance(x, np.ndarray) and device == "cpu":
            raise LayerError(f"{where}: a CPU net takes NumPy arrays, got {type(x).__name__}")
        if len(x.shape) != 4:
            raise LayerError(f"{where}: expected rank 4 (N, K, R, C), got shape {tuple(x.shape)}")
        if x.dtype != np.float32:
            raise LayerError(f"{where}: expected dtype float32, got {x.dtype}")
        if min(x.shape) < 1:
            raise LayerError(f"{where}: expected a non-empty array, got shape {tuple(x.shape)}")
        return x

    def setup(self, in_shape):
        if self.k is not None and self.k != in_shape[1]:
            raise ShapeError(f"expected input with {self.k} channels (K) as at setup, "
                             f"got shape {in_shape}")
        self.k = in_shape[1]
        self.nr, self.nc = in_shape[2], in_shape[3]

    def input_shape(self):
        """(K, R, C) of the last input, or None before the first forward."""
        return None if self.k is None or self.nr is None else (self.k, self.nr, self.nc)

    def write_record(self, w):
        w.bool(self.disabled)
        w.u32("k", 0 if self.k is None else self.k)
        w.u32("nr", 0 if self.nr is None else self.nr)
        w.u32("nc", 0 if self.nc is None else self.nc)

    @classmethod
    def read_record(cls, r, tag):
        """input_tensor_2: disabled, k, nr, nc (0: unknown); input_tensor_1 has no nr, nc."""
        disabled = r.bool("disabled")
        layer = cls()
        layer.k = r.u32("k") or None
        if tag != "input_tensor_1":
            layer.nr, layer.nc = r.u32("nr") or None, r.u32("nc") or None
        if disabled:
            layer.disable()
        return layer


# --------------------------------------------------------------------------- inputs
class InputBatch:
    """What an input layer's ``to_tensor`` returns when it has more to say than the tensor.

    ``tensor``: the batch the compiled forward runs on. ``annotation``: whatever the layer
    wants the loss to see (dlib's tensor annotation: the place of each pyramid level in a
    tiled pyramid, say). ``single``: the user passed one sample rather than a batch, so
    ``net(x)`` returns that sample's result alone (result[0]). ``layer``: the input layer.
    ``node``: the node ``net(x)`` was called on (set by Node.__call__). A loss that declares
    ``takes_input_batch`` receives it in ``labels(out, batch, ...)``.
    """

    __slots__ = ("tensor", "annotation", "single", "layer", "node")

    def __init__(self, tensor, annotation=None, single=False, layer=None):
        self.tensor, self.annotation, self.single, self.layer = tensor, annotation, bool(single), layer
        self.node = None


def _split_options(options, takers, where):
    """Split the keyword arguments of net(x, ...) among ``takers`` ([(layer, names)]);
    TypeError naming what the network takes for any other."""
    parts = [dict() for _ in takers]
    for k, v in options.items():
        for (_, names), part in zip(takers, parts):
            if k in names:
                part[k] = v
                break
        else:
            known = sorted({n for _, names in takers for n in names})
            raise TypeError(f"{where}: unexpected keyword argument {k!r} (this network takes "
                            f"{', '.join(known) if known else 'none'})")
    return parts


# --------------------------------------------------------------------------- nodes
class Node:
    """dlib's add_layer: a layer object on top of a subnetwork.

    ``forward(x)`` runs the chain from the input up to this node and returns
    its output as a NumPy array (N, K, R, C); ``node(x)`` does the same (a loss
    node returns labels instead).
    """

    def __init__(self, layer, subnet):
        if not isinstance(subnet, Node) and not (subnet is None and layer.is_input):
            raise TypeError(f"{layer.kind}: the subnet (last positional argument) must be a "
                            f"minidnn layer node, got {type(subnet).__name__}")
        if subnet is not None and subnet._layer.is_loss:
            raise ValueError(f"{layer.kind}: a loss layer ({subnet._layer.kind}) can only be the "
                             f"top of a network, not the subnet of another layer")
        self._layer = layer
        self._subnet = subnet
        self._tl = threading.local()      # this thread's compiled programs of this node
        self._device = "cpu"
        self._graphs = True
        self._device_params = None
        self._depth = 1 if subnet is None else subnet._depth + 1
        self._bottom = self if subnet is None else subnet._bottom

    # -- dlib's accessors -------------------------------------------------
    def layer_details(self):
        return self._layer

    def subnet(self):
        return self._subnet

    def _latest_program(self):
        """The calling thread's latest program that ran through this node, or None."""
        for prog in reversed(_recent_programs()):
            if self in prog.nodes:
                return prog
        return None

    def _last_output(self):
        """The backend buffer of this node's output in the calling thread's latest program
        that computed it, or None (also where that program has reused the buffer: an older
        program's buffer would be another forward's answer)."""
        prog = self._latest_program()
        return None if prog is None else prog.node_outputs.get(self)

    def _last_shape(self):
        """The shape of this node's output at the latest forward through it, or None."""
        prog = self._latest_program()
        return None if prog is None else prog.node_shapes[self]

    def get_output(self):
        """The output of this node at the last forward (in the calling thread) that went
        through it, as a NumPy array, or None. (A compiled CPU forward lets buffers share
        memory once they are no longer needed; a node whose buffer was reused recomputes
        its output here from that forward's input.)"""
        prog = self._latest_program()
        if prog is None:
            return None
        y = prog.node_outputs.get(self)
        if y is None:
            return self._forward_tensor(prog.x.copy())
        return ops.backend_of(y).to_numpy(y)

    def programs(self):
        """The calling thread's compiled programs of this node (for tools such as
        backend_info)."""
        return list(getattr(self._tl, "programs", {}).values())

    def chain(self):
        """The nodes from this one down to the input, top first."""
        nodes, n = [], self
        while n is not None:
            nodes.append(n)
            n = n._subnet
        return nodes

    def __len__(self):
        return self._depth

    # -- running ------------------------------------------------------------
    @property
    def device(self):
        return self._device

    def to(self, device, *, graphs=True):
        """Move the network (this node and everything below it) to "cpu" or "cuda".

        Parameters stay NumPy arrays on the host (the master copy): on "cuda"
        they are uploaded at the next forward, and again after every later
        ``to("cuda")``. The rule: after writing into the host parameters of a
        GPU net, call ``net.to("cuda")`` to make the next forward use them.
        With ``graphs`` (the default) each compiled GPU forward is captured
        once as a CUDA graph and replayed. Raises RuntimeError, saying what is
        missing and how to install it, when the device cannot be used, and
        NotImplementedError naming the first layer the device has no kernel for.
        """
        device = str(device)
        if device not in ops.DEVICES:
            raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")
        be = ops.backend(device)  # raises a clear RuntimeError if it cannot load
        check_not_running(self, "to")
        for i, n in enumerate(self.chain()):
            missing = [o for o in n._layer.forward_ops
                       if not hasattr(be, o) and o not in ops.OPTIONAL]
            if missing:
                raise NotImplementedError(
                    f"layer<{i}> {n._layer.kind}: the {device} backend has no kernel for "
                    f"{', '.join(missing)} yet; run this net on the CPU")
        with _build_lock:
            for n in self.chain():
                n._device = device
                n._graphs = bool(graphs)
                n._tl = threading.local()
                n._device_params = None
            structure_changed()
        return self

    def _program(self, shape):
        key = (shape, self._device, _revision[0])
        progs = getattr(self._tl, "programs", None)
        if progs is None:
            progs = self._tl.programs = {}
        prog = progs.get(key)
        if prog is None:
            # keep a few shapes (alternating batch sizes), drop stale structures
            for k in [k for k in progs if k[1:] != key[1:]]:
                del progs[k]
            while len(progs) >= 4:
                del progs[next(iter(progs))]
            be = ops.backend(self._device)
            # setup allocates parameters: one builder at a time; a device backend's own
            # lock first, its context current (backends/cuda/gpu.py: run_lock, then _build_lock)
            with getattr(be, "exclusive", _no_lock), _build_lock:
                prog = Program(self, shape, be, self._uploads(), self._graphs)
            if prog.revision == _revision[0]:
                progs[(shape, self._device, prog.revision)] = prog
        return prog

    def _uploads(self):
        """The device copies of the parameters, shared by every program of this device
        (and every thread)."""
        if self._device == "cpu":
            return None
        with _build_lock:
            if self._device_params is None or self._device_params[0] != _revision[0]:
                self._device_params = (_revision[0], {})
            return self._device_params[1]

    def _batch(self, x, options):
        """The InputBatch the input layer makes of the user's x (``options``: its
        input_options)."""
        bottom = self._bottom._layer
        t = bottom.to_tensor(x, self._device, self._depth - 1, **options)
        return t if isinstance(t, InputBatch) else InputBatch(t, layer=bottom)

    def _input_options(self, options, where):
        bottom = self._bottom._layer
        return _split_options(options, [(bottom, bottom.input_options)], where)[0]

    def _forward_tensor(self, x):
        prog = self._program(tuple(int(s) for s in x.shape))
        y = prog.run(x)
        return y.copy() if prog.device == "cpu" else prog.backend.to_numpy(y)

    def forward(self, x, **options):
        """Run the network up to this node on x (N, K, R, C) float32 (or what the input
        layer takes: images for dlib's image input layers); return this node's output as a
        new NumPy array. On a GPU net x may also be a device array. ``options`` are the
        input layer's (its ``input_options``)."""
        b = self._batch(x, self._input_options(options, "forward"))
        return self._forward_tensor(b.tensor)

    def forward_device(self, x, **options):
        """Like forward, but the output stays where the net runs: a GPUArray for a GPU
        net (a NumPy array on the CPU), owned by the net and valid until its next
        forward. Use it to chain networks without a round trip through the host."""
        t = self._batch(x, self._input_options(options, "forward_device")).tensor
        return self._program(tuple(int(s) for s in t.shape)).run(t)

    def __call__(self, x, **options):
        """forward(x), or for a loss node what the loss makes of the output (labels,
        detections, descriptors): for one sample (``InputBatch.single``) its result alone.
        ``options`` go to the input layer (``input_options``) and the loss (``label_options``)."""
        top = self._layer
        if not top.is_loss:
            return self.forward(x, **options)
        bottom = self._bottom._layer
        in_opts, label_opts = _split_options(options, [(bottom, bottom.input_options),
                                                       (top, top.label_options)], "net(x)")
        b = self._batch(x, in_opts)
        b.node = self
        out = self._forward_tensor(b.tensor)
        if top.takes_input_batch:
            res = top.labels(out, b, **label_opts)
        else:
            res = top.labels(out, **label_opts)
        return res[0] if b.single else res

    # -- printing ----------------------------------------------------------
    def __str__(self):
        lines = []
        for i, n in enumerate(self.chain()):
            layer = n._layer
            d = layer.describe()
            text = f"layer<{i}>".ljust(12) + layer.kind.ljust(9)
            if d:
                text += f"({d})"
            text = text.rstrip()
            if layer.disabled:
                text += " (disabled)"
            shape = n._last_shape()
            if shape is not None:
                text += f"  -> {shape}"
            lines.append(text)
        return "\n".join(lines)

    def __repr__(self):
        return self.__str__()


# --------------------------------------------------------------------------- the program
class Plan:
    """What a layer's ``build`` sees: allocation, parameters and the step list.

    ``index`` and ``layer`` name the layer being built (for error messages).
    """

    def __init__(self, backend):
        self.backend = backend
        self.device = backend.name
        self.steps = []           # [(function, args)]
        self.specs = []           # the OpSpec of each step (None for a plain callable)
        self.index = None
        self.layer = None
        self._uploaded = {}
        self.tags = {}
        self.buffers = []         # every buffer empty() made (memory planning reuses them)
        self.outputs = []         # (node, output buffer) of each node built so far, input first

    def empty(self, shape):
        a = self.backend.empty(tuple(int(s) for s in shape))
        self.buffers.append(a)
        return a

    def step(self, fn, *args):
        """Append a call ``fn(*args)`` to the forward program. An ``ops`` function is
        resolved to the backend's implementation now, not at every call."""
        spec = getattr(fn, "spec", None)
        if spec is not None:
            if self.layer is not None and spec.name not in self.layer.forward_ops:
                raise AssertionError(f"{self.layer.kind}.build emitted {spec.name}, which is not "
                                     f"in its forward_ops {self.layer.forward_ops}")
            impl = getattr(self.backend, spec.name, None)
            if impl is None:
                raise NotImplementedError(f"layer<{self.index}> {self.layer.kind}: the "
                                          f"{self.device} backend has no kernel for {spec.name}")
            fn = impl
        self.steps.append((fn, args))
        self.specs.append(spec)

    def _last_step_makes(self, x, names):
        """(spec, named arguments) of the last step if it is one of the ops ``names`` and
        writes ``x``, which nothing else reads (x is not tagged); else None."""
        if not self.steps or any(t is x for t in self.tags.values()):
            return None
        spec = self.specs[-1]
        if spec is None or spec.name not in names:
            return None
        out = self.steps[-1][1][spec.output_index]
        if out is not x and getattr(out, "base", None) is not x:
            return None
        return spec, spec.bind(self.steps[-1][1])

    def fuse_activation(self, x, act):
        """Make ``act`` the epilogue of the step that produced ``x``, if that op has an
        activation epilogue still unused and nothing else reads ``x`` (it is not
        tagged). Returns whether it did; the producing node's output then holds the
        activated values (dlib's in-place layers)."""
        last = self._last_step_makes(x, _EPILOGUE_OPS)
        if last is None or last[1]["act"]:
            return False
        spec, named = last
        named["act"] = act
        self.steps[-1] = (self.steps[-1][0], spec.call_args(named))
        return True

    def fuse_residual(self, x, z):
        """Make the step that produced ``x`` also add ``z`` in its epilogue (x += z in the
        same pass, before its activation), if nothing else reads x and the step applies no
        activation of its own: an op with an optional residual input ``z`` (``z?`` in its
        signature, conv2d_winograd) gets z set; a conv2d becomes a conv2d_residual, if
        the backend has it. Returns whether it did; the producing node's output then
        holds the sum (as with fuse_activation)."""
        last = self._last_step_makes(x, _RESIDUAL_OPS) if z is not x else None
        if last is None or last[1]["act"]:
            return False
        spec, named = last
        if "z" in spec.optional:
            if named["z"] is not None:
                return False
            named["z"] = z
            self.steps[-1] = (self.steps[-1][0], spec.call_args(named))
            return True
        impl = getattr(self.backend, "conv2d_residual", None)
        if impl is None:
            return False
        named["z"] = z
        spec = ops.OPS["conv2d_residual"]
        self.steps[-1] = (impl, spec.call_args(named))
        self.specs[-1] = spec
        return True

    def has(self, op):
        """Whether the backend implements op ``op`` (for layers that emit an OPTIONAL op)."""
        return hasattr(self.backend, op)

    def alias(self, old, new):
        """Make buffer ``old`` live inside ``new`` (a C-contiguous array of old's shape,
        e.g. a slice of a larger output): every step argument, tag and node output that is
        old's storage or a view of it becomes the same view of ``new``, so the steps that
        wrote ``old`` now write ``new`` and those that read it read ``new``. Returns whether it
        did: it refuses (changing nothing) unless both are NumPy arrays, or both arrays of a
        device backend that has ``storage`` and ``view`` (the CUDA backend: GPUArrays at
        pointer offsets, see _alias_device), ``old`` covers the whole of its storage (the
        buffer or a full view of it), that storage is not the program's input and does not
        overlap ``new``, and every view of it is C-contiguous.
        (A step that keeps a buffer elsewhere than in its arguments, in a closure say, would
        not be rewritten: steps pass their buffers as arguments.)"""
        if not isinstance(old, np.ndarray) or not isinstance(new, np.ndarray):
            if isinstance(old, np.ndarray) or isinstance(new, np.ndarray):
                return False
            return self._alias_device(old, new)
        base = old if old.base is None else old.base
        if not isinstance(base, np.ndarray) or base.size != old.size or old.shape != new.shape \
                or old.dtype != new.dtype or not new.flags.c_contiguous \
                or np.shares_memory(base, new):
            return False
        if self.outputs:
            inp = self.outputs[0][1]
            if inp is base or getattr(inp, "base", None) is base:
                return False

        def mine(a):
            return isinstance(a, np.ndarray) and (a is base or a.base is base)

        refs = [a for _, args in self.steps for a in args if mine(a)]
        refs += [a for a in self.tags.values() if mine(a)] + [a for _, a in self.outputs if mine(a)]
        if not all(a.flags.c_contiguous and a.dtype == base.dtype for a in refs):
            return False
        flat, start = new.reshape(-1), base.ctypes.data

        def sub(a):
            if not mine(a):
                return a
            o = (a.ctypes.data - start) // a.itemsize
            return flat[o:o + a.size].reshape(a.shape)

        self.steps[:] = [(fn, tuple(sub(a) for a in args)) for fn, args in self.steps]
        self.tags.update({k: sub(a) for k, a in self.tags.items()})
        self.outputs[:] = [(n, sub(a)) for n, a in self.outputs]
        return True

    def _alias_device(self, old, new):
        """alias() for a device backend's arrays: the backend's ``storage(a)`` gives the
        allocation that owns a's memory and a's offset in it (elements), ``view(a, offset,
        shape)`` a C-contiguous array of ``shape`` starting ``offset`` elements into a (a
        pointer offset: no copy). Two allocations never overlap, so ``old``'s storage
        overlaps ``new`` only when it is new's own storage."""
        be = self.backend
        storage, view = getattr(be, "storage", None), getattr(be, "view", None)
        kind = getattr(be, "array_type", None)
        if storage is None or view is None or kind is None \
                or not isinstance(old, kind) or not isinstance(new, kind):
            return False
        base, off = storage(old)
        if off != 0 or base.size != old.size or tuple(old.shape) != tuple(new.shape) \
                or old.dtype != new.dtype or not new.flags.c_contiguous \
                or storage(new)[0] is base:
            return False
        if self.outputs:
            inp = self.outputs[0][1]
            if isinstance(inp, kind) and storage(inp)[0] is base:
                return False

        def mine(a):
            return isinstance(a, kind) and storage(a)[0] is base

        refs = [a for _, args in self.steps for a in args if mine(a)]
        refs += [a for a in self.tags.values() if mine(a)] + [a for _, a in self.outputs if mine(a)]
        if not all(a.flags.c_contiguous and a.dtype == base.dtype for a in refs):
            return False
        # A buffer that already holds aliased producers (a concat inside a concat: views at
        # offsets into it) is copied, not aliased again, on a device: the nested case failed
        # on the H200 (test_cuda_tensor's "dense" net) and could not be diagnosed there
        # before the session's device time ran out; the copy is the path tested everywhere.
        if any(storage(a)[1] != 0 or a.size != base.size for a in refs):
            return False

        def sub(a):
            return view(new, storage(a)[1], a.shape) if mine(a) else a

        self.steps[:] = [(fn, tuple(sub(a) for a in args)) for fn, args in self.steps]
        self.tags.update({k: sub(a) for k, a in self.tags.items()})
        self.outputs[:] = [(n, sub(a)) for n, a in self.outputs]
        return True

    def view(self, a, offset, shape):
        """A C-contiguous view of ``shape`` starting ``offset`` elements into the
        C-contiguous array ``a`` (NumPy, or the device backend's ``view``: no copy)."""
        shape = tuple(int(s) for s in shape)
        if isinstance(a, np.ndarray):
            size = int(np.prod(shape, dtype=np.int64))
            return a.reshape(-1)[offset:offset + size].reshape(shape)
        return self.backend.view(a, offset, shape)

    def can_view(self):
        """Whether this plan's arrays can be viewed at offsets (view(), alias()): always on
        the CPU, on a device where the backend has ``view`` and ``storage``."""
        return self.device == "cpu" or (hasattr(self.backend, "view")
                                        and hasattr(self.backend, "storage"))

    def param(self, a):
        """The backend's view of host parameter array ``a`` (the array itself on the CPU)."""
        if a is None or self.device == "cpu":
            return a
        key = id(a)
        d = self._uploaded.get(key)
        if d is None:
            d = self._uploaded[key] = (self.backend.asarray(np.ascontiguousarray(a, np.float32)), a)
        return d[0]

    def derived(self, compute, shape):
        """A parameter computed from host parameters by ``compute(out)`` (a NumPy function).

        On the CPU it is recomputed before every forward, so writes into the
        host parameters are seen at the next forward; on a device it is
        computed once, like every parameter upload (see Node.to).
        """
        host = np.empty(shape, np.float32)
        if self.device == "cpu":
            compute(host)
            self.steps.append((compute, (host,)))
            self.specs.append(None)
            return host
        compute(host)
        return self.backend.asarray(host)

    def cached(self, layer, name, key, shape, compute):
        """A parameter derived from the host array ``layer.<name>`` by ``compute(a, out)``
        (out: float32 of ``shape``), kept on the layer under ``key`` for every program,
        input shape and thread that asks for it, and recomputed only when the array
        changes (a Winograd filter transform: far too slow to redo at every forward).

        On the CPU, while it is kept, the array is read-only, so that an in-place write
        raises instead of being silently ignored; changes go through the sanctioned
        paths, which bump the array's version (Layer.param_version): replacing it
        (``layer.<name> = a``, set_array) or writing through ``layer.writable(name)``
        (fuse, the trainer, a checkpoint restore). The forward starts with a check (one
        Python call): when the layer holds another array, its version moved, or the
        array is writeable again (someone set the flag), the derived array is recomputed
        in place before the kernels run. On a device it is computed once and uploaded,
        like every parameter (net.to("cuda") uploads again)."""
        cache = layer.__dict__.setdefault("_derived", {})
        entry = cache.get(key)
        if entry is None or entry.out.shape != tuple(shape):
            entry = cache[key] = _Derived(np.empty(shape, np.float32))
        src = getattr(layer, name)
        if self.device != "cpu":
            compute(src, entry.out)
            entry.source = None               # computed for the upload only: not kept fresh
            return self.backend.asarray(entry.out)

        own, versions, slot = layer.__dict__, layer.__dict__.setdefault("_versions", {}), "_param_" + name

        def refresh():                  # ~0.6 us when fresh
            a = own.get(slot)
            if entry.source is a and entry.version == versions.get(name, 0) \
                    and not a.flags.writeable:
                return
            with _build_lock:
                a = layer.__dict__.get("_param_" + name)
                version = layer.param_version(name)
                if entry.source is a and entry.version == version and not a.flags.writeable:
                    return
                layer._lock_param(name, a)
                compute(a, entry.out)
                entry.source, entry.version = a, version
        refresh.__name__ = f"refresh_{name}"
        refresh()
        self.steps.append((refresh, ()))
        self.specs.append(None)
        return entry.out

    def fail(self, message):
        raise LayerError(f"layer<{self.index}> {self.layer.kind}: {message}")


class _Derived:
    """A cached derived parameter (Plan.cached): ``out`` was computed from array
    ``source`` at version ``version`` of the layer's parameter."""

    __slots__ = ("out", "source", "version")

    def __init__(self, out):
        self.out, self.source, self.version = out, None, None


def _unlock(a):
    """Give an array a cached transform had made read-only its writeable flag back."""
    try:
        a.flags.writeable = True
    except ValueError:          # a view of a read-only array: it was never ours to lock
        pass


# ops whose ``act`` argument is an epilogue a pointwise layer above can take over
_EPILOGUE_OPS = tuple(name for name, s in ops.OPS.items() if not s.grad and "act" in s.attrs)
# ops that can take an add_prev's shortcut into their epilogue (Plan.fuse_residual): conv2d
# (as conv2d_residual) and every op with an optional residual input z
_RESIDUAL_OPS = ("conv2d",) + tuple(name for name, s in ops.OPS.items()
                                    if not s.grad and "z" in s.optional and "act" in s.attrs)


class Program:
    """The compiled forward of one chain for one input shape on one backend.

    On a device backend the whole step list is captured once into a CUDA graph
    (when the backend offers ``capture`` and the net allows it) and replayed.
    """

    def __init__(self, top, shape, backend, uploads=None, graphs=True):
        revision = _revision[0]
        nodes = top.chain()                 # top first
        self.backend = backend
        self.device = backend.name
        plan = Plan(backend)
        if uploads is not None:
            plan._uploaded = uploads        # device copies of parameters, shared by all shapes
        try:
            self.x = plan.empty(shape)
        except MemoryError as e:
            raise _named_memory_error(e, f"layer<{len(nodes) - 1}> {nodes[-1]._layer.kind}") from None
        y = self.x
        in_shape = shape
        outputs = plan.outputs              # Plan.alias may rewrite it
        for i in range(len(nodes) - 1, -1, -1):
            node = nodes[i]
            layer = node._layer
            plan.index, plan.layer = i, layer
            try:
                layer.setup(in_shape)
                if not layer.disabled and not layer.is_input:
                    y = layer.build(plan, y)
            except ShapeError as e:
                plan.fail(str(e))
            except MemoryError as e:
                raise _named_memory_error(e, f"layer<{i}> {layer.kind}") from None
            outputs.append((node, y))
            in_shape = tuple(y.shape)
        self.steps = plan.steps
        self.specs = plan.specs
        self.outputs = outputs
        self.memory = {"buffers": 0, "planned": 0}
        self.nodes = frozenset(n for n, _ in outputs)
        self.node_shapes = {n: tuple(int(d) for d in b.shape) for n, b in outputs}
        stale = set()
        if self.device == "cpu" and reuse_memory[0]:
            stale = self._share_memory(plan, y)
        self.node_outputs = {n: b for (n, b0), (_, b) in zip(outputs, self.outputs)
                             if id(_root(b0)) not in stale}
        self.y = y
        self.graph = None
        self._use_graph = graphs and self.device != "cpu" and hasattr(backend, "capture")
        self.revision = revision
        self.thread = threading.get_ident()
        # the backend's per-call thread accounting (CPU: kernel teams sized by the number
        # of threads running forwards at once), if it has one
        self._begin = getattr(backend, "begin_run", None)
        self._end = getattr(backend, "end_run", None)

    def _share_memory(self, plan, y):
        """Let buffers whose lifetimes do not overlap share memory (CPU): each buffer lives
        from the first step that uses it to the last one; buffers are placed, in order of
        first use, into the smallest free block that fits (blocks grow when none does),
        then every step argument is rewritten as the same view of its buffer's block.
        The input buffer and the output stay apart. Returns the ids of the (original)
        buffers whose memory a later buffer takes over (their node's get_output
        recomputes)."""
        roots = {id(b): b for b in plan.buffers}
        first, last = {}, {}
        for i, (fn, args) in enumerate(self.steps):
            for a in args:
                r = _root(a) if isinstance(a, np.ndarray) else None
                if r is not None and id(r) in roots:
                    first.setdefault(id(r), i)
                    last[id(r)] = i
        keep = {id(self.x), id(_root(y))}
        order = sorted((k for k in first if k not in keep), key=lambda k: (first[k], k))
        blocks, owner, free = [], {}, []          # block sizes (floats), buffer -> block
        ends = []                                 # (last use, block) of the placed buffers
        for k in order:
            ends.sort()
            while ends and ends[0][0] < first[k]:
                free.append(ends.pop(0)[1])
            need = roots[k].size
            fits = [b for b in free if blocks[b] >= need]
            if fits:
                b = min(fits, key=lambda b: blocks[b])
            elif free:
                b = max(free, key=lambda b: blocks[b])
                blocks[b] = need
            else:
                b = len(blocks)
                blocks.append(need)
            if b in free:
                free.remove(b)
            owner[k] = b
            ends.append((last[k], b))
        total = sum(b.nbytes for b in plan.buffers)
        memory = [np.empty(n, np.float32) for n in blocks]
        new_root = {k: memory[b][:roots[k].size].reshape(roots[k].shape) for k, b in owner.items()}

        def remap(a):
            if not isinstance(a, np.ndarray):
                return a
            r = _root(a)
            nr = new_root.get(id(r))
            if nr is None:
                return a
            off = a.__array_interface__["data"][0] - r.__array_interface__["data"][0]
            return np.ndarray(a.shape, a.dtype, buffer=nr.data, offset=off, strides=a.strides)
        self.steps = [(fn, tuple(remap(a) for a in args)) for fn, args in self.steps]
        self.outputs = [(n, remap(b)) for n, b in self.outputs]
        kept = sum(b.nbytes for b in plan.buffers if id(b) not in owner)
        self.memory = {"buffers": total, "planned": kept + 4 * sum(blocks)}
        # a buffer is stale after the run if its block is taken over later
        by_block = {}
        for k, b in owner.items():
            by_block.setdefault(b, []).append(k)
        stale = set()
        for ks in by_block.values():
            ks.sort(key=lambda k: first[k])
            stale.update(ks[:-1])
        return stale

    def _launch_steps(self):
        for fn, args in self.steps:
            fn(*args)

    def run(self, x):
        """Run on x (a NumPy array, or a device array on a device backend); return the
        output buffer (owned by the program, which belongs to the calling thread: valid
        until this thread's next run of it). RuntimeError if the net's structure or
        parameters were changed (by another thread) while it ran."""
        _running.add(self)
        if self._begin is not None:
            self._begin()
        try:
            if self.device == "cpu":
                np.copyto(self.x, x)
                self._launch_steps()
            else:
                be = self.backend
                if isinstance(x, np.ndarray):
                    be.upload(self.x, x)
                else:
                    be.copy(self.x, x)
                if self.graph is not None:
                    self.graph.launch()
                elif self._use_graph:
                    # capture() first runs the steps once (compiling kernels, building
                    # per-shape plans), then records them; the graph is launched from now on
                    with _build_lock:
                        self.graph = be.capture(self._launch_steps, warmup=True)
                    self.graph.launch()
                else:
                    self._launch_steps()
        finally:
            _running.discard(self)
            if self._end is not None:
                self._end()
        _recent_programs().append(self)
        return self.y


# Whether compiled CPU forwards let buffers of disjoint lifetimes share memory
# (Program._share_memory); tests turn it off to compare.
reuse_memory = [True]


def _root(a):
    """The array that owns a view's memory."""
    while isinstance(getattr(a, "base", None), np.ndarray):
        a = a.base
    return a


def _named_memory_error(e, where):
    """A MemoryError whose message names the layer (numpy's own subclass cannot be rebuilt
    from a message, so the result is a plain MemoryError unless the backend's has one)."""
    cls = type(e)
    msg = f"{where}: out of memory: {e}"
    try:
        return cls(msg)
    except Exception:
        return MemoryError(msg)


# --------------------------------------------------------------------------- visitors
def layer(net, i):
    """dlib's layer<i>(net): i = 0 is net itself; i may also be a tag factory
    (dnn.tag1 ...) or a layer class, giving the first such node from the top."""
    nodes = net.chain()
    if isinstance(i, (int, np.integer)):
        if not 0 <= i < len(nodes):
            raise IndexError(f"layer index {i} out of range: the network has {len(nodes)} layers")
        return nodes[i]
    for n in nodes:
        if getattr(i, "_matches", None) and i._matches(n._layer):
            return n
        if isinstance(i, type) and isinstance(n._layer, i):
            return n
    raise LookupError(f"no layer matching {getattr(i, '__name__', i)} in the network")


def visit_layers(net, fn):
    """Call fn(i, node) for every node, top (i = 0) to bottom."""
    for i, n in enumerate(net.chain()):
        fn(i, n)


def visit_layers_backwards(net, fn):
    """Call fn(i, node) for every node, bottom to top (i is still the index from the top)."""
    nodes = net.chain()
    for i in range(len(nodes) - 1, -1, -1):
        fn(i, nodes[i])


def count_parameters(net):
    """The number of learnable parameters (allocated at the first forward)."""
    return int(sum(n._layer.num_parameters() for n in net.chain()))


__all__ = ["Act", "IDENTITY", "Field", "InputBatch", "Layer", "LayerError", "Node", "Param", "Plan", "Program",
           "ShapeError", "count_parameters", "input_tensor_", "layer", "layer_classes",
           "structure_changed", "visit_layers", "visit_layers_backwards"]

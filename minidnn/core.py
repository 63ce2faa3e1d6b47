"""Networks as dlib-style nested layers, and the program that runs them.

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
"""
import numpy as np

from . import ops

# Bumped whenever something changes how a network must be compiled (a layer
# disabled or enabled, a fused epilogue added, parameters replaced): every
# cached Program is then rebuilt at the next forward.
_revision = [0]


def structure_changed():
    """Invalidate every compiled program (call after changing a layer's structure)."""
    _revision[0] += 1


class LayerError(ValueError):
    """A user error located at one layer: the message names the layer index and the layer."""


class ShapeError(ValueError):
    """Raised by a layer's setup/build; the program turns it into a LayerError naming the layer."""


class Layer:
    """WHAT THIS OBJECT REPRESENTS: the computation of one node (dlib's layer_details).

    A subclass defines ``kind`` (its printed name, dlib's without the trailing
    underscore), ``describe()`` (its settings, for printing), ``setup(in_shape)``
    (allocate parameters the first time; check the input afterwards) and
    ``build(plan, x) -> y`` (append its kernel calls to the plan and return the
    buffer holding its output; raise ShapeError for an input it cannot take).
    """

    kind = "layer"
    params = ()           # names of the learnable parameter attributes

    def __init__(self):
        self._disabled = False

    # -- disabling (identity at no cost) --------------------------------
    @property
    def disabled(self):
        return self._disabled

    def disable(self):
        """Make this layer an identity that costs nothing in a forward pass."""
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

    def num_parameters(self):
        return sum(getattr(self, p).size for p in self.params if getattr(self, p) is not None)

    def __repr__(self):
        d = self.describe()
        return f"{type(self).__name__}({d})" if d else f"{type(self).__name__}()"


class input_tensor_(Layer):
    """The input of a network: float32 arrays shaped (N, K, R, C).

    After the first forward the channel count K is fixed; a later input with
    another K (or another rank or dtype) raises LayerError.
    """

    kind = "input_tensor"

    def __init__(self):
        super().__init__()
        self.k = None

    def setup(self, in_shape):
        if self.k is None:
            self.k = in_shape[1]


class Node:
    """dlib's add_layer: a layer object on top of a subnetwork.

    ``forward(x)`` runs the chain from the input up to this node and returns
    its output as a NumPy array (N, K, R, C); ``node(x)`` does the same (a loss
    node returns labels instead).
    """

    def __init__(self, layer, subnet):
        if not isinstance(subnet, Node) and not (subnet is None and isinstance(layer, input_tensor_)):
            raise TypeError(f"{layer.kind}: the subnet (last positional argument) must be a "
                            f"minidnn layer node, got {type(subnet).__name__}")
        self._layer = layer
        self._subnet = subnet
        self._programs = {}
        self._output = None
        self._device = "cpu"
        self._graphs = True
        self._device_params = None

    # -- dlib's accessors -------------------------------------------------
    def layer_details(self):
        return self._layer

    def subnet(self):
        return self._subnet

    def get_output(self):
        """The output of this node at the last forward that went through it (NumPy)."""
        if self._output is None:
            return None
        return ops.backend_of(self._output).to_numpy(self._output)

    def chain(self):
        """The nodes from this one down to the input, top first."""
        nodes, n = [], self
        while n is not None:
            nodes.append(n)
            n = n._subnet
        return nodes

    def __len__(self):
        return len(self.chain())

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
        missing and how to install it, when the device cannot be used.
        """
        device = str(device)
        if device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")
        ops.backend(device)  # raises a clear RuntimeError if it cannot load
        for n in self.chain():
            n._device = device
            n._graphs = bool(graphs)
            n._programs.clear()
            n._device_params = None
            n._output = None
        structure_changed()
        return self

    def _program(self, shape):
        key = (shape, self._device, _revision[0])
        prog = self._programs.get(key)
        if prog is None:
            # keep a few shapes (alternating batch sizes), drop stale structures
            for k in [k for k in self._programs if k[1:] != key[1:]]:
                del self._programs[k]
            while len(self._programs) >= 4:
                del self._programs[next(iter(self._programs))]
            prog = Program(self, shape, ops.backend(self._device), self._uploads(), self._graphs)
            self._programs[key] = prog
        return prog

    def _uploads(self):
        """The device copies of the parameters, shared by every program of this device."""
        if self._device == "cpu":
            return None
        if self._device_params is None or self._device_params[0] != _revision[0]:
            self._device_params = (_revision[0], {})
        return self._device_params[1]

    def forward(self, x):
        """Run the network up to this node on x (N, K, R, C) float32; return this node's
        output as a new NumPy array. On a GPU net x may also be a device array."""
        prog = self._program(_check_input(self, x))
        y = prog.run(x)
        return y.copy() if prog.device == "cpu" else prog.backend.to_numpy(y)

    def forward_device(self, x):
        """Like forward, but the output stays where the net runs: a GPUArray for a GPU
        net (a NumPy array on the CPU), owned by the net and valid until its next
        forward. Use it to chain networks without a round trip through the host."""
        return self._program(_check_input(self, x)).run(x)

    def __call__(self, x):
        out = self.forward(x)
        to_label = getattr(self._layer, "to_label", None)
        return out if to_label is None else to_label(out)

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
            if n._output is not None:
                text += f"  -> {tuple(n._output.shape)}"
            lines.append(text)
        return "\n".join(lines)

    def __repr__(self):
        return self.__str__()


def _check_input(top, x):
    """Validate a user's input array; return its shape."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise LayerError(f"layer<{len(top) - 1}> input_tensor: expected a float32 array shaped "
                         f"(N, K, R, C), got {type(x).__name__}")
    if not isinstance(x, np.ndarray) and top._device == "cpu":
        raise LayerError(f"layer<{len(top) - 1}> input_tensor: a CPU net takes NumPy arrays, "
                         f"got {type(x).__name__}")
    if len(x.shape) != 4:
        raise LayerError(f"layer<{len(top) - 1}> input_tensor: expected rank 4 (N, K, R, C), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype != np.float32:
        raise LayerError(f"layer<{len(top) - 1}> input_tensor: expected dtype float32, got {x.dtype}")
    if min(x.shape) < 1:
        raise LayerError(f"layer<{len(top) - 1}> input_tensor: expected a non-empty array, "
                         f"got shape {tuple(x.shape)}")
    return tuple(int(s) for s in x.shape)


class Plan:
    """What a layer's ``build`` sees: allocation, parameters and the step list.

    ``index`` and ``layer`` name the layer being built (for error messages).
    """

    def __init__(self, backend):
        self.backend = backend
        self.device = backend.name
        self.steps = []
        self.index = None
        self.layer = None
        self._uploaded = {}
        self.tags = {}

    def empty(self, shape):
        return self.backend.empty(tuple(int(s) for s in shape))

    def step(self, fn, *args):
        """Append a call ``fn(*args)`` to the forward program. An ``ops`` function is
        resolved to the backend's implementation now, not at every call."""
        if getattr(fn, "__module__", None) == ops.__name__:
            fn = getattr(self.backend, fn.__name__)
        self.steps.append((fn, args))

    # ops whose last argument is a relu flag, and the position of their output
    _RELU_EPILOGUE = {"conv2d": 3, "conv2d_residual": 4, "fc": 3, "affine": 3, "add": 2}

    def _last_step_makes(self, x, names):
        """The last step, if it is one of the ops ``names`` and writes ``x``, which nothing
        else reads (x is not tagged); else None."""
        if not self.steps or any(t is x for t in self.tags.values()):
            return None
        fn, args = self.steps[-1]
        name = getattr(fn, "__name__", None)
        pos = self._RELU_EPILOGUE.get(name) if name in names else None
        if pos is None or args[pos] is not x and getattr(args[pos], "base", None) is not x:
            return None
        return fn, args

    def fuse_relu(self, x):
        """Turn on the relu epilogue of the step that produced ``x``, if it has one and
        nothing else reads ``x`` (it is not tagged). Returns whether it did; the
        producing node's output then holds the relu'd values (dlib's in-place layers)."""
        last = self._last_step_makes(x, self._RELU_EPILOGUE)
        if last is None:
            return False
        fn, args = last
        self.steps[-1] = (fn, args[:-1] + (True,))
        return True

    def fuse_residual(self, x, z):
        """Turn the convolution that produced ``x`` into one that also adds ``z`` in its
        epilogue (x += z in the same pass), if the backend can, nothing else reads x,
        and the convolution applies no relu of its own. Returns whether it did; the
        convolution's node output then holds the sum (as with fuse_relu)."""
        impl = getattr(self.backend, "conv2d_residual", None)
        last = self._last_step_makes(x, ("conv2d",)) if impl is not None else None
        if last is None or last[1][-1] or z is x:
            return False
        xin, w, b, y, *geometry = last[1]
        self.steps[-1] = (impl, (xin, w, b, z, y, *geometry))
        return True

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
            return host
        compute(host)
        return self.backend.asarray(host)

    def fail(self, message):
        raise LayerError(f"layer<{self.index}> {self.layer.kind}: {message}")


class Program:
    """The compiled forward of one chain for one input shape on one backend.

    On a device backend the whole step list is captured once into a CUDA graph
    (when the backend offers ``capture`` and the net allows it) and replayed.
    """

    def __init__(self, top, shape, backend, uploads=None, graphs=True):
        nodes = top.chain()                 # top first
        self.backend = backend
        self.device = backend.name
        plan = Plan(backend)
        if uploads is not None:
            plan._uploaded = uploads        # device copies of parameters, shared by all shapes
        try:
            self.x = plan.empty(shape)
        except MemoryError as e:
            raise type(e)(f"layer<{len(nodes) - 1}> input_tensor: {e}") from None
        y = self.x
        in_shape = shape
        outputs = []
        for i in range(len(nodes) - 1, -1, -1):
            node = nodes[i]
            layer = node._layer
            plan.index, plan.layer = i, layer
            if isinstance(layer, input_tensor_):
                if layer.k is not None and layer.k != in_shape[1]:
                    plan.fail(f"expected input with {layer.k} channels (K) as at setup, "
                              f"got shape {in_shape}")
                layer.setup(in_shape)
            else:
                try:
                    layer.setup(in_shape)
                    if not layer.disabled:
                        y = layer.build(plan, y)
                except ShapeError as e:
                    plan.fail(str(e))
                except MemoryError as e:
                    raise type(e)(f"layer<{i}> {layer.kind}: {e}") from None
            outputs.append((node, y))
            in_shape = tuple(y.shape)
        self.steps = plan.steps
        self.outputs = outputs
        self.y = y
        self.graph = None
        self._use_graph = graphs and self.device != "cpu" and hasattr(backend, "capture")

    def _launch_steps(self):
        for fn, args in self.steps:
            fn(*args)

    def run(self, x):
        """Run on x (a NumPy array, or a device array on a device backend); return the
        output buffer (owned by the program: valid until its next run)."""
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
                self.graph = be.capture(self._launch_steps, warmup=True)
                self.graph.launch()
            else:
                self._launch_steps()
        for node, y in self.outputs:
            node._output = y
        return self.y


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

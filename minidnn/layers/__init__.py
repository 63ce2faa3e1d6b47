"""The layers (dlib's layer_details objects) and their dlib-style factories.

Each layer class carries dlib's name with a trailing underscore (``con_``,
``fc_``, ``bn_`` ...), states what it represents, and holds everything about
itself: its build (the inference kernels), its training forward and backward,
its parameters and its file record (see core.Layer). A factory (``con``,
``fc``, ``relu`` ...) builds the layer and puts it on top of its subnet, which
is always the last positional argument, as in dlib's templates.

Layers never import a backend: every computation goes through ``ops``.
Parameters are NumPy float32 arrays allocated at the first forward (dlib's
setup); writing into them is seen by the next forward, assigning a new array
is validated (core.Layer.validate_param).

One module per family; this package exports the public names of each.
"""
from ..core import input_tensor_, Node
from . import activations, linear, norm, pool, routing, softmax as _softmax, tensor
from .common import CONV, FC, set_seed
from .activations import *  # noqa: F401,F403
from .linear import *  # noqa: F401,F403
from .norm import *  # noqa: F401,F403
from .pool import *  # noqa: F401,F403
from .routing import *  # noqa: F401,F403
from .softmax import *  # noqa: F401,F403
from .tensor import *  # noqa: F401,F403
from .input import *  # noqa: F401,F403  (dlib's image input layers; binds .input too)


def input_tensor():
    """The input layer: float32 arrays shaped (N, K, R, C)."""
    return Node(input_tensor_(), None)


__all__ = (["CONV", "FC", "set_seed", "input_tensor", "input_tensor_"] + activations.__all__
           + linear.__all__ + norm.__all__ + pool.__all__ + routing.__all__ + _softmax.__all__
           + tensor.__all__ + input.__all__)

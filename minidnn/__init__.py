"""minidnn: a standalone mini DNN runtime with dlib-style nested layers.

    import minidnn as dnn
    net = dnn.loss_multiclass_log(dnn.fc(10, dnn.relu(dnn.con(16, 5, 5, 1, 1, dnn.input_tensor()))))
    labels = net(x)            # x: float32 (N, K, R, C)
"""
import os as _os


def _use_installed_kernels():
    """Run from a source checkout (``python -m pytest`` or ``python -m minidnn`` in the
    repository root puts the checkout first on sys.path), this package has no
    compiled kernels: the ones ``pip install .`` built live in the installed copy,
    so add its folder to this package's search path."""
    here = _os.path.dirname(__file__)
    if any(f.startswith("_cpu_") for f in _os.listdir(here)):
        return
    try:
        from importlib.metadata import distribution
        installed = str(distribution("minidnn").locate_file("minidnn"))
    except Exception:
        return
    if _os.path.isdir(installed) and _os.path.realpath(installed) != _os.path.realpath(here):
        __path__.append(installed)


_use_installed_kernels()

from .core import (Layer, LayerError, Node, count_parameters, input_tensor_, layer,
                   visit_layers, visit_layers_backwards)
from .ops import Act
from .layers import *  # noqa: F401,F403  (every layer class and factory)
from .loss import *  # noqa: F401,F403
from .fuse import fuse
from .info import backend_info
from .serialize import SerializationError, deserialize, serialize
from .train import adam, dnn_trainer, sgd

__version__ = "0.1.0"

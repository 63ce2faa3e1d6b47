"""minidnn: a standalone mini DNN runtime with dlib-style nested layers.

    import minidnn as dnn
    net = dnn.loss_multiclass_log(dnn.fc(10, dnn.relu(dnn.con(16, 5, 5, 1, 1, dnn.input_tensor()))))
    labels = net(x)            # x: float32 (N, K, R, C)
"""
from ._sources import find_installed_kernels as _find_installed_kernels

_find_installed_kernels(__path__)

from .core import (Layer, LayerError, Node, count_parameters, input_tensor_, layer,
                   visit_layers, visit_layers_backwards)
from .ops import Act
from .layers import *  # noqa: F401,F403  (every layer class and factory)
from .loss import *  # noqa: F401,F403
from .mmod import *  # noqa: F401,F403  (dlib's loss_mmod, before serialize registers records)
from .fuse import fuse
from .info import backend_info
from .serialize import SerializationError, deserialize, serialize
from .train import adam, dnn_trainer, sgd
from .dlib import dlib_type, load_dlib, save_dlib
from . import dlib_zoo

__version__ = "0.1.0"

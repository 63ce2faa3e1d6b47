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
from .layers import (add_prev1, add_prev2, add_prev3, add_prev4, add_prev5, add_prev6,
                     add_prev7, add_prev8, add_prev9, add_prev10, add_prev_, affine, affine_,
                     avg_pool, avg_pool_, avg_pool_everything, bn_, bn_con, bn_fc, con, con_, fc,
                     fc_, input_tensor, max_pool, max_pool_, relu, relu_, set_seed, skip1, skip2,
                     skip3, skip4, skip5, skip6, skip7, skip8, skip9, skip10, skip_, softmax,
                     softmax_, tag1, tag2, tag3, tag4, tag5, tag6, tag7, tag8, tag9, tag10, tag_)
from .fuse import fuse
from .info import backend_info
from .loss import (loss_mean_squared, loss_mean_squared_, loss_multiclass_log,
                   loss_multiclass_log_)
from .serialize import SerializationError, deserialize, serialize
from .train import adam, dnn_trainer, sgd

__version__ = "0.1.0"

"""The CPU backend's training kernels (kernels/cpu/grad.pyx -> minidnn._cpu_grad).

Kept apart from backends/cpu.py so that inference never loads them; the
names and signatures are those of the training section of minidnn/ops.py.
Importing backends.cpu first pins scipy's BLAS to one thread (the kernels
call sgemm from inside their OpenMP team, like conv.pyx).
"""
from minidnn.backends import cpu as _cpu  # noqa: F401  (pins scipy's BLAS to one thread)
from minidnn import _cpu_grad
from minidnn._sources import check_fresh

check_fresh(_cpu_grad)

name = "cpu"

conv2d_grad_data = _cpu_grad.conv2d_grad_data
conv2d_grad_params = _cpu_grad.conv2d_grad_params
fc_grad_data = _cpu_grad.fc_grad_data
fc_grad_params = _cpu_grad.fc_grad_params
activation_grad = _cpu_grad.activation_grad
bn_forward_train = _cpu_grad.bn_forward_train
bn_grad = _cpu_grad.bn_grad
affine_grad = _cpu_grad.affine_grad
max_pool_grad = _cpu_grad.max_pool_grad
avg_pool_grad = _cpu_grad.avg_pool_grad
softmax_grad = _cpu_grad.softmax_grad
loss_multiclass_log = _cpu_grad.loss_multiclass_log
loss_mean_squared = _cpu_grad.loss_mean_squared
sgd_update = _cpu_grad.sgd_update
adam_update = _cpu_grad.adam_update
all_finite = _cpu_grad.all_finite
prelu_alpha_grad = _cpu_grad.prelu_alpha_grad

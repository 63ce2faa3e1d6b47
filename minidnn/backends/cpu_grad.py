"""The CPU backend's training kernels (kernels/cpu/grad.pyx -> minidnn._cpu_grad, and the
training functions of the other kernel modules).

Kept apart from backends/cpu.py so that inference never loads them; the
names and signatures are those of the training section of minidnn/ops.py.
Importing backends.cpu first pins scipy's BLAS to one thread (the kernels
call sgemm from inside their OpenMP team, like conv.pyx).
"""
from minidnn.backends import cpu as _cpu  # noqa: F401  (pins scipy's BLAS to one thread)

name = "cpu"
# the training ops, each from the compiled module that defines it (most are in _cpu_grad)
globals().update(_cpu._collect(_cpu.KERNEL_MODULES, grad=True))

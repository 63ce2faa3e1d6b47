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
globals().update(_cpu._collect((_cpu_grad,), grad=True))

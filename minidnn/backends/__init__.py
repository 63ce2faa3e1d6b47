"""minidnn backends: cpu (Cython kernels) and cuda (PyCUDA); see docs/INTERNALS.md."""

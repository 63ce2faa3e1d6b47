# Included by the kernel modules that need scratch memory (conv.pyx, grad.pyx):
# each module gets its own grow-only workspace, guarded by a lock that is only
# *tried*: a second Python thread entering concurrently gets a private buffer
# for that call instead of waiting or racing.
from libc.stdlib cimport free
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_acquire_lock, PyThread_release_lock,
                               NOWAIT_LOCK)

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)


cdef float* _ws = NULL
cdef size_t _ws_n = 0
cdef PyThread_type_lock _ws_lock = PyThread_allocate_lock()


cdef float* _aligned(size_t n) except NULL:
    cdef void* p = NULL
    if posix_memalign(&p, 64, (n if n > 0 else 1) * sizeof(float)) != 0:
        raise MemoryError(f"cannot allocate a {n * 4} byte workspace")
    return <float*>p


cdef float* _workspace_acquire(size_t n, bint* private) except NULL:
    """The shared workspace (grown to n floats) or, if another thread holds
    it, a private buffer that the caller frees (private[0] = True)."""
    global _ws, _ws_n
    cdef float* p
    if PyThread_acquire_lock(_ws_lock, NOWAIT_LOCK):
        private[0] = False
        if n > _ws_n or _ws == NULL:       # never NULL: NULL means "error" here
            try:
                p = _aligned(n if n > 16 else 16)
            except MemoryError:
                PyThread_release_lock(_ws_lock)
                raise
            free(_ws)
            _ws = p
            _ws_n = n
        return _ws
    private[0] = True
    return _aligned(n)


cdef void _workspace_release(float* p, bint private) noexcept:
    if private:
        free(p)
    else:
        PyThread_release_lock(_ws_lock)

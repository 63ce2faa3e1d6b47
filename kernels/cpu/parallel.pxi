# The parallel-for of parallel.h (textually included by the kernel modules that use it):
# the caller runs tasks too and never waits for a thread that is not running.

cdef extern from "parallel.h" nogil:
    ctypedef void (*mdnn_task_fn)(void* ctx, long task, int tid) noexcept nogil
    void mdnn_parallel_for(long ntasks, int team, mdnn_task_fn fn, void* ctx)
    ctypedef struct mdnn_pool_t:
        pass
    mdnn_pool_t* mdnn_pool_p
    const char* MDNN_POOL_CAPSULE

from cpython.pycapsule cimport PyCapsule_New, PyCapsule_GetPointer


cdef _share_pool():
    """One pool per process: the first kernel module imported publishes its pool on the
    minidnn package (a capsule), every later one adopts it (before any of them has run a
    task, so no module's own workers exist yet)."""
    global mdnn_pool_p
    import sys
    pkg = sys.modules.get("minidnn")
    if pkg is None:                     # imported outside the package: its own pool
        return
    cap = getattr(pkg, "_parallel_pool", None)
    if cap is None:
        pkg._parallel_pool = PyCapsule_New(<void*>mdnn_pool_p, MDNN_POOL_CAPSULE, NULL)
    else:
        mdnn_pool_p = <mdnn_pool_t*>PyCapsule_GetPointer(cap, MDNN_POOL_CAPSULE)


_share_pool()


def _pool_address():
    """The address of the pool this module's parallel-for uses (tests: one per process)."""
    return <size_t>mdnn_pool_p

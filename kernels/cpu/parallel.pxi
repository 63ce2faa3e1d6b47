# The parallel-for of parallel.h (textually included by the kernel modules that use it):
# the caller runs tasks too and never waits for a thread that is not running.

cdef extern from "parallel.h" nogil:
    ctypedef void (*mdnn_task_fn)(void* ctx, long task, int tid) noexcept nogil
    void mdnn_parallel_for(long ntasks, int team, mdnn_task_fn fn, void* ctx)

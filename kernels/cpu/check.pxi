# Shared argument checks for the CPU kernels (textually included by each .pyx).
#
# Every public kernel validates its arguments here, with the GIL held and
# before any raw pointer is touched, so a bad call raises ValueError instead
# of crashing the process. The checks are O(ndim) attribute reads: a few
# tens of nanoseconds each.

cimport numpy as cnp
cimport openmp

cnp.import_array()

ctypedef Py_ssize_t isize

cdef extern from "geometry.h" nogil:
    long mdnn_out_size(long n, long k, long stride, long pad, long dilation)

cdef extern from *:
    const char* MINIDNN_KERNEL_HASH      # set by CMakeLists.txt: the hash of the kernel sources


def _source_hash():
    """The hash of the kernel sources this module was built from (see CMakeLists.txt)."""
    return MINIDNN_KERNEL_HASH.decode("ascii")


cdef inline cnp.ndarray _f32(object a, str what, bint writable=False):
    """a as a float32, C-contiguous, aligned ndarray (else ValueError)."""
    if not cnp.PyArray_Check(a):
        raise ValueError(f"{what}: expected a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32:
        raise ValueError(f"{what}: expected dtype float32, got {arr.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{what}: expected a C-contiguous, aligned array")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{what}: the output array is read-only")
    return arr


cdef inline cnp.ndarray _f32_nd(object a, str what, int ndim, bint writable=False):
    cdef cnp.ndarray arr = _f32(a, what, writable)
    if cnp.PyArray_NDIM(arr) != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {_shape(arr)}")
    return arr


cdef inline isize _dim(cnp.ndarray a, int i) noexcept:
    return cnp.PyArray_DIMS(a)[i]


cdef inline float* _ptr(cnp.ndarray a) noexcept:
    return <float*>cnp.PyArray_DATA(a)


cdef inline int _check_int(isize v, str what) except -1:
    # sgemm and the loops index with C int: refuse sizes that would overflow.
    if v < 0 or v > 2147483647:
        raise ValueError(f"{what}: size {v} is out of range for the CPU kernels")
    return 0


cdef inline bint _overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef char* pa = <char*>cnp.PyArray_DATA(a)
    cdef char* pb = <char*>cnp.PyArray_DATA(b)
    cdef isize na = cnp.PyArray_NBYTES(a)
    cdef isize nb = cnp.PyArray_NBYTES(b)
    if na == 0 or nb == 0:
        return False
    return pa < pb + nb and pb < pa + na


cdef inline int _no_alias(cnp.ndarray y, cnp.ndarray x, str what) except -1:
    if _overlap(y, x):
        raise ValueError(f"{what}: the output must not share memory with the input")
    return 0


cdef inline int _same_or_disjoint(cnp.ndarray y, cnp.ndarray x, str what) except -1:
    # elementwise ops allow y is x (same buffer, same layout) but not partial overlap
    if _overlap(y, x) and cnp.PyArray_DATA(y) != cnp.PyArray_DATA(x):
        raise ValueError(f"{what}: the output partially overlaps an input (only y is x is allowed)")
    return 0


cdef inline int _threads() noexcept nogil:
    return openmp.omp_get_max_threads()


# Multiply-adds worth one thread of a convolution or fc: ~10 us of our GEMM's
# work per core, against the few microseconds of waking a pool worker. A layer
# smaller than a team's worth of this gets fewer threads (the demo's net at batch
# 16 on a 16-core machine ran ~3x slower than on 2 cores with every op on 16).
cdef enum:
    MACS_PER_THREAD = 262144


cdef inline int _threads_for_macs(double macs) noexcept nogil:
    """Threads for a GEMM-like op of `macs` multiply-adds (at least MACS_PER_THREAD each)."""
    cdef int nt = openmp.omp_get_max_threads()
    cdef double useful = macs / MACS_PER_THREAD
    if useful < 2.0:
        return 1
    if useful < nt:
        return <int>useful
    return nt


cdef inline int _threads_for(isize work, isize grain) noexcept nogil:
    """Threads worth using for `work` units when one thread should get at
    least `grain` units: a parallel region costs a few microseconds, so tiny
    tensors stay on the calling thread."""
    cdef int nt = openmp.omp_get_max_threads()
    cdef isize useful = work // grain
    if useful < 1:
        return 1
    if useful < nt:
        return <int>useful
    return nt


cdef inline tuple _shape(cnp.ndarray a):
    return tuple([cnp.PyArray_DIMS(a)[i] for i in range(cnp.PyArray_NDIM(a))])


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int i, nd = cnp.PyArray_NDIM(a)
    if nd != cnp.PyArray_NDIM(b):
        return False
    for i in range(nd):
        if cnp.PyArray_DIMS(a)[i] != cnp.PyArray_DIMS(b)[i]:
            return False
    return True

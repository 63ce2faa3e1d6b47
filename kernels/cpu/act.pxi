# The activations of kernels/common/activations.h (textually included by the .pyx
# that apply one): the C declarations and the parsing of an ``act`` argument.

cdef extern from "activations.h" nogil:
    int MDNN_ACT_IDENTITY, MDNN_ACT_RELU, MDNN_ACT_COUNT, MDNN_ACT_HAVE_AVX2
    float mdnn_act(int act, float x, float p)
    float mdnn_act_grad(int act, float x, float y, float p)
    int mdnn_act_reads_x(int act)
    int mdnn_act_reads_y(int act)
    void mdnn_act_array(int act, float p, const float* x, float* y, long n)
    void mdnn_act_grad_array(int act, float p, const float* x, const float* y,
                             const float* dy, float* dx, long n)


cdef inline int _act(object act, float* p, str what) except -1:
    """The code of activation ``act`` (an ops.Act (code, param), True for relu, False or
    None for identity); its parameter goes to p[0]. ValueError for anything else."""
    p[0] = 0.0
    if act is None or act is False:
        return 0
    if act is True:
        return 1
    cdef int code
    try:
        code = act[0]
        p[0] = act[1]
    except Exception:
        raise ValueError(f"{what}: act must be an activation (minidnn.ops.Act) or a bool, "
                         f"got {act!r}") from None
    if code < 0 or code >= MDNN_ACT_COUNT:
        raise ValueError(f"{what}: unknown activation code {code}")
    return code

# cython: language_level=3
"""Elementwise and per-pixel CPU kernels: activation, add, affine, softmax.

All are memory-bound: one pass, vectorised inner loops (-O3 -march=native),
OpenMP over contiguous blocks only when the tensor is large enough to pay
for a parallel region. activation/add/affine accept y is x (in place) and
apply their activation (kernels/common/activations.h) to each block while it
is in cache."""
include "check.pxi"
include "act.pxi"
include "parallel.pxi"

from libc.math cimport expf

# elements per thread below which a parallel region is not worth it
cdef isize GRAIN = 1 << 15
# contiguous block handed to one task of the parallel-for
cdef isize BLOCK = 1 << 14


cdef struct EltArgs:
    const float* a          # x (activation, affine, softmax), a (add)
    const float* b          # b (add)
    const float* g          # gamma (affine)
    const float* h          # beta (affine)
    float* y
    isize n, K, P, nchunk
    int code
    float p


cdef void _activation_run(void* ctx, long i, int tid) noexcept nogil:
    cdef const EltArgs* e = <const EltArgs*>ctx
    cdef isize o = i * BLOCK
    mdnn_act_array(e.code, e.p, e.a + o, e.y + o, min(BLOCK, e.n - o))


cdef void _add_run(void* ctx, long i, int tid) noexcept nogil:
    cdef const EltArgs* e = <const EltArgs*>ctx
    cdef isize o = i * BLOCK
    _add_block(e.a + o, e.b + o, e.y + o, min(BLOCK, e.n - o), e.code, e.p)


cdef void _affine_row_run(void* ctx, long n, int tid) noexcept nogil:
    cdef const EltArgs* e = <const EltArgs*>ctx
    _affine_row(e.a + n * e.K, e.y + n * e.K, e.K, e.g, e.h, e.code, e.p)


cdef void _affine_plane_run(void* ctx, long i, int tid) noexcept nogil:
    cdef const EltArgs* e = <const EltArgs*>ctx
    cdef isize k = i % e.K, o = i * e.P
    _affine_plane(e.a + o, e.y + o, e.P, e.g[k], e.h[k], e.code, e.p)


cdef void _softmax_row_run(void* ctx, long n, int tid) noexcept nogil:
    cdef const EltArgs* e = <const EltArgs*>ctx
    _softmax_row(e.a + n * e.K, e.y + n * e.K, e.K)


cdef void _softmax_cols_run(void* ctx, long t, int tid) noexcept nogil:
    cdef const EltArgs* e = <const EltArgs*>ctx
    cdef isize n_i = t // e.nchunk, c = t - n_i * e.nchunk
    _softmax_cols(e.a + n_i * e.K * e.P, e.y + n_i * e.K * e.P, <int>e.K, e.P, c * 256,
                  <int>min(256, e.P - c * 256))


def activation(x, y, act):
    """y = act(x), elementwise; same shapes; y may be x."""
    cdef float p
    cdef int code = _act(act, &p, "activation")
    cdef cnp.ndarray ax = _f32(x, "activation x")
    cdef cnp.ndarray ay = _f32(y, "activation y", True)
    if not _same_shape(ax, ay):
        raise ValueError(f"activation: y has shape {_shape(ay)}, x has {_shape(ax)}")
    _same_or_disjoint(ay, ax, "activation")
    cdef isize n = cnp.PyArray_SIZE(ax), nb = (n + BLOCK - 1) // BLOCK, i, o
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    # transcendental activations cost ~10x a relu per element: parallel sooner
    cdef int nt = _threads_for(n, GRAIN if code <= MDNN_ACT_RELU else GRAIN // 8)
    cdef EltArgs e
    e.a, e.y, e.n, e.code, e.p = px, py, n, code, p
    with nogil:
        if nt == 1:
            mdnn_act_array(code, p, px, py, n)
        else:
            mdnn_parallel_for(nb, nt, _activation_run, &e)


def _activation_scalar(x, y, act):
    """y = act(x) one element at a time through the scalar mdnn_act of activations.h
    (for tests: mdnn_act_array takes the AVX2 formulas of act_avx2.h when compiled with
    them, and they must agree bit for bit)."""
    cdef float p
    cdef int code = _act(act, &p, "_activation_scalar")
    cdef cnp.ndarray ax = _f32(x, "_activation_scalar x")
    cdef cnp.ndarray ay = _f32(y, "_activation_scalar y", True)
    if not _same_shape(ax, ay):
        raise ValueError(f"_activation_scalar: y has shape {_shape(ay)}, x has {_shape(ax)}")
    cdef isize n = cnp.PyArray_SIZE(ax), i
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    with nogil:
        for i in range(n):
            py[i] = mdnn_act(code, px[i], p)


def _act_have_avx2():
    """Whether mdnn_act_array runs the AVX2 formulas (act_avx2.h) in this build."""
    return bool(MDNN_ACT_HAVE_AVX2)


cdef inline void _add_block(const float* a, const float* b, float* y, isize n,
                            int code, float p) noexcept nogil:
    cdef isize i
    if code == MDNN_ACT_RELU:
        for i in range(n):
            y[i] = max(a[i] + b[i], <float>0.0)
        return
    for i in range(n):
        y[i] = a[i] + b[i]
    if code != MDNN_ACT_IDENTITY:
        mdnn_act_array(code, p, y, y, n)


def add(a, b, y, act):
    """y = act(a + b); same shapes; y may be a or b."""
    cdef float p
    cdef int code = _act(act, &p, "add")
    cdef cnp.ndarray aa = _f32(a, "add a")
    cdef cnp.ndarray ab = _f32(b, "add b")
    cdef cnp.ndarray ay = _f32(y, "add y", True)
    if not _same_shape(aa, ab) or not _same_shape(aa, ay):
        raise ValueError(f"add: shapes differ: a {_shape(aa)}, b {_shape(ab)}, y {_shape(ay)}")
    _same_or_disjoint(ay, aa, "add")
    _same_or_disjoint(ay, ab, "add")
    cdef isize n = cnp.PyArray_SIZE(aa), nb = (n + BLOCK - 1) // BLOCK, i, o
    cdef const float* pa = _ptr(aa)
    cdef const float* pb = _ptr(ab)
    cdef float* py = _ptr(ay)
    cdef int nt = _threads_for(n, GRAIN)
    if nt == 1:
        _add_block(pa, pb, py, n, code, p)
        return
    cdef EltArgs e
    e.a, e.b, e.y, e.n, e.code, e.p = pa, pb, py, n, code, p
    with nogil:
        mdnn_parallel_for(nb, nt, _add_run, &e)


cdef inline void _affine_plane(const float* x, float* y, isize n, float g, float b,
                               int code, float p) noexcept nogil:
    cdef isize i
    if code == MDNN_ACT_RELU:
        for i in range(n):
            y[i] = max(x[i] * g + b, <float>0.0)
        return
    for i in range(n):
        y[i] = x[i] * g + b
    if code != MDNN_ACT_IDENTITY:
        mdnn_act_array(code, p, y, y, n)


cdef inline void _affine_row(const float* x, float* y, isize K, const float* g,
                             const float* b, int code, float p) noexcept nogil:
    cdef isize i
    if code == MDNN_ACT_RELU:
        for i in range(K):
            y[i] = max(x[i] * g[i] + b[i], <float>0.0)
        return
    for i in range(K):
        y[i] = x[i] * g[i] + b[i]
    if code != MDNN_ACT_IDENTITY:
        mdnn_act_array(code, p, y, y, K)


def affine(x, gamma, beta, y, act):
    """y = act(x * gamma[k] + beta[k]) for x, y (N,K,R,C) and gamma, beta of K
    elements; y may be x."""
    cdef float p
    cdef int code = _act(act, &p, "affine")
    cdef cnp.ndarray ax = _f32_nd(x, "affine x", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "affine y", 4, True)
    cdef cnp.ndarray ag = _f32(gamma, "affine gamma")
    cdef cnp.ndarray ab = _f32(beta, "affine beta")
    if not _same_shape(ax, ay):
        raise ValueError(f"affine: y has shape {_shape(ay)}, x has {_shape(ax)}")
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), P = _dim(ax, 2) * _dim(ax, 3)
    if cnp.PyArray_SIZE(ag) != K or cnp.PyArray_SIZE(ab) != K:
        raise ValueError(f"affine: gamma and beta need {K} elements, got "
                         f"{cnp.PyArray_SIZE(ag)} and {cnp.PyArray_SIZE(ab)}")
    _same_or_disjoint(ay, ax, "affine")
    _no_alias(ay, ag, "affine")
    _no_alias(ay, ab, "affine")
    cdef const float* px = _ptr(ax)
    cdef const float* pg = _ptr(ag)
    cdef const float* pb = _ptr(ab)
    cdef float* py = _ptr(ay)
    cdef isize i, n, k, o
    cdef int nt = _threads_for(N * K * P, GRAIN)
    cdef EltArgs e
    e.a, e.y, e.g, e.h, e.K, e.P, e.code, e.p = px, py, pg, pb, K, P, code, p
    if P == 1:
        # FC mode (N, D, 1, 1): per-row vectors
        with nogil:
            if nt == 1 or N < 2:
                for n in range(N):
                    _affine_row(px + n * K, py + n * K, K, pg, pb, code, p)
            else:
                mdnn_parallel_for(N, nt, _affine_row_run, &e)
        return
    with nogil:
        if nt == 1:
            for i in range(N * K):
                k = i % K
                _affine_plane(px + i * P, py + i * P, P, pg[k], pb[k], code, p)
        else:
            mdnn_parallel_for(N * K, nt, _affine_plane_run, &e)


cdef void _softmax_cols(const float* x, float* y, int K, isize P, isize p0,
                        int pw) noexcept nogil:
    """softmax over k of x[k*P + p] for p in [p0, p0+pw), pw <= 256."""
    cdef float m[256]
    cdef float s[256]
    cdef int k, t
    cdef const float* xk
    cdef float* yk
    for t in range(pw):
        m[t] = x[p0 + t]
        s[t] = 0.0
    for k in range(1, K):
        xk = x + k * P + p0
        for t in range(pw):
            m[t] = max(m[t], xk[t])
    for k in range(K):
        xk = x + k * P + p0
        yk = y + k * P + p0
        for t in range(pw):
            yk[t] = expf(xk[t] - m[t])
            s[t] += yk[t]
    for t in range(pw):
        s[t] = 1.0 / s[t]
    for k in range(K):
        yk = y + k * P + p0
        for t in range(pw):
            yk[t] *= s[t]


cdef void _softmax_row(const float* x, float* y, isize K) noexcept nogil:
    cdef isize k
    cdef float m = x[0], s = 0.0
    for k in range(1, K):
        m = max(m, x[k])
    for k in range(K):
        y[k] = expf(x[k] - m)
        s += y[k]
    s = 1.0 / s
    for k in range(K):
        y[k] *= s


def softmax(x, y):
    """For each (n, r, c): y[n,:,r,c] = softmax(x[n,:,r,c]) over the channel
    axis, computed as exp(x - max) / sum; x, y (N,K,R,C); y may be x."""
    cdef cnp.ndarray ax = _f32_nd(x, "softmax x", 4)
    cdef cnp.ndarray ay = _f32_nd(y, "softmax y", 4, True)
    if not _same_shape(ax, ay):
        raise ValueError(f"softmax: y has shape {_shape(ay)}, x has {_shape(ax)}")
    _same_or_disjoint(ay, ax, "softmax")
    cdef isize N = _dim(ax, 0), K = _dim(ax, 1), P = _dim(ax, 2) * _dim(ax, 3)
    _check_int(K, "softmax K")
    if N * K * P == 0:
        return
    cdef const float* px = _ptr(ax)
    cdef float* py = _ptr(ay)
    cdef int nt = _threads_for(N * K * P, GRAIN)
    cdef isize n, t, nchunk, n_i, c
    cdef EltArgs e
    e.a, e.y, e.K, e.P = px, py, K, P
    if P == 1:
        with nogil:
            if nt == 1:
                for n in range(N):
                    _softmax_row(px + n * K, py + n * K, K)
            else:
                mdnn_parallel_for(N, nt, _softmax_row_run, &e)
        return
    nchunk = (P + 255) // 256
    e.nchunk = nchunk
    with nogil:
        mdnn_parallel_for(N * nchunk, nt, _softmax_cols_run, &e)

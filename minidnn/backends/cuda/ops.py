"""The inference ops of minidnn/ops.py on PyCUDA GPUArrays.

Same names and signatures as the CPU backend (minidnn/ops.py is the table).
Tensors are float32, C-contiguous GPUArrays shaped (N, K, R, C) (``fc`` sees
(N, D)); outputs are preallocated by the caller. Launches are asynchronous,
on the backend's stream: no op synchronises the host.

Per shape, the first call builds a plan (grid, block, prepared kernel,
argument layout, any scratch such as the convolution index table or a
split-K workspace) and caches it in kernels.plans; later calls with the same
shapes do a dict lookup, pack the arguments and launch. The activation
(``act``: an ops.Act or a bool, kernels.act_args) is part of the plan key and
its (code, param) part of the launch arguments: every kernel's epilogue
applies mdnn_act of kernels/common/activations.h.

conv2d_residual shares conv2d's kernels (the residual z in their epilogue and
in the split-K reduction; NULL for conv2d) and its routing (routing.py).
conv2d and fc (batch > 8) pick tile and split-K per shape (autotune.py).
"""
from __future__ import annotations

import numpy as np

from . import routing
from .autotune import CONV_CFGS, FC_CFGS, GemmPlan, gemm_candidates, pick_gemm, run_gemm, time_call
from .kernels import Kernel, act_args, blocks, plans
from .memory import aligned16, asarray, ptr
from .tensor_ops import SOFTMAX_BLOCK_ROWS, add_padded_plan, softmax_rows_plan


def _check(cond, what):
    if not cond:
        raise ValueError(f"minidnn cuda: {what}")


def _f32c(a, label):
    _check(a.dtype == np.float32, f"{label} must be float32, got {a.dtype}")
    _check(a.flags.c_contiguous, f"{label} must be C-contiguous")


# --------------------------------------------------------------------------- conv2d
def _check_no_alias(z, y):
    """ValueError unless z and y are distinct, non-overlapping buffers."""
    if z is y:
        raise ValueError("minidnn cuda: conv2d_residual: z must not be y")
    zp, yp = z.gpudata.__int__(), y.gpudata.__int__()
    if zp < yp + y.nbytes and yp < zp + z.nbytes:
        raise ValueError("minidnn cuda: conv2d_residual: z overlaps y in memory "
                         f"(z at {zp:#x} + {z.nbytes} bytes, y at {yp:#x} + {y.nbytes} bytes)")


def _conv_plan(x, w, b, z, y, sy, sx, py, px, act):
    """The own kernels' GemmPlan of one convolution shape (act: (code, param))."""
    _check(len(x.shape) == 4 and len(w.shape) == 4 and len(y.shape) == 4,
           "conv2d wants x (N,K,R,C), w (F,K,nr,nc), y (N,F,Ro,Co)")
    N, K, R, C = x.shape
    F, Kw, nr, nc = w.shape
    _check(Kw == K, f"conv2d: w has {Kw} input channels, x has {K}")
    _check(min(sy, sx) >= 1 and min(py, px) >= 0, "conv2d: strides >= 1, pads >= 0")
    Ro = 1 + (R + 2 * py - nr) // sy
    Co = 1 + (C + 2 * px - nc) // sx
    _check(Ro >= 1 and Co >= 1, f"conv2d: {nr}x{nc} filter larger than padded {R}x{C} input")
    _check(tuple(y.shape) == (N, F, Ro, Co), f"conv2d: y must be {(N, F, Ro, Co)}, got {y.shape}")
    _check(b is None or b.size == F, f"conv2d: b must have {F} elements")
    for a, lab in ((x, "x"), (w, "w"), (y, "y")) + (((b, "b"),) if b is not None else ()):
        _f32c(a, "conv2d " + lab)
    if z is not None:
        _check(tuple(z.shape) == tuple(y.shape),
               f"conv2d_residual: z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
        _f32c(z, "conv2d_residual z")
        _check_no_alias(z, y)
    _check(nr < 65536 and nc < 65536, "conv2d: filter too large")
    _check(x.size < 2**31 and y.size < 2**31 and w.size < 2**31,
           "conv2d: tensors beyond 2**31 elements are not supported")

    Kd = K * nr * nc
    P = Ro * Co
    Ncols = N * P
    # index table: q = (k, r, c) -> {k*R*C + r*C + c, r << 16 | c}
    q = np.arange(Kd, dtype=np.int64)
    k, rem = np.divmod(q, nr * nc)
    r, c = np.divmod(rem, nc)
    tab = np.empty((Kd, 2), dtype=np.int32)
    tab[:, 0] = k * R * C + r * C + c
    tab[:, 1] = (r << 16) | c
    tab_gpu = asarray(tab)
    # float4 stores of y (and loads of z at the same offsets)
    vec = int(P % 4 == 0 and ptr(y) % 16 == 0 and ptr(z) % 16 == 0)
    code, p = act

    def make(kname, BM, BN, BK, S, kchunk, model_s):
        plan = GemmPlan()
        plan.main_name, plan.model_s, plan.conv = kname, model_s, True
        # conv.cu's CONV_ARGS: (x, w, b, z, y, tab, F, Kd, R, C, KRC, Co, P, Ncols,
        # sy, sx, py, px, act, act_p, kchunk, out_zstride, vec_store)
        plan.main = Kernel("conv", kname, (-(-Ncols // BN), -(-F // BM), S), (256,))
        plan.keep = tab_gpu
        plan.set_split(S, int(y.size), P, F, code, p)
        tail = (tab_gpu.gpudata, F, Kd, R, C, K * R * C, Co, P, Ncols, sy, sx, py, px)
        if S > 1:      # raw partial sums; splitk_reduce applies b, z and act
            plan.args = tail + (0, 0.0, kchunk, int(y.size), vec)
        else:
            plan.args = tail + (code, p, kchunk, 0, vec)
        return plan

    return pick_gemm(make, gemm_candidates(F, Ncols, Kd, CONV_CFGS, y.size), x, w, b, y, z)


def _choose_conv(x, w, b, z, y, sy, sx, py, px, act):
    """The plan of one convolution shape (with the residual z, or z None): the own
    kernels' GemmPlan or a routing.CudnnConv. Both are timed as called: with the
    residual when there is one."""
    key = routing.route_key(x.shape, w.shape, sy, sx, py, px, act, z is not None)
    if z is None:
        def time_cudnn(via):
            return time_call(lambda: via.conv2d(x, w, b, y, sy, sx, py, px))
    else:
        def time_cudnn(via):
            return time_call(lambda: via.conv2d_residual(x, w, b, z, y, sy, sx, py, px))
    return routing.choose(key, act,
                          make_own=lambda: _conv_plan(x, w, b, z, y, sy, sx, py, px, act),
                          time_own=lambda plan: time_call(lambda: run_gemm(plan, x, w, b, y, z)),
                          time_cudnn=time_cudnn, activation=activation)


def conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x, act):
    """y (N,F,Ro,Co) = act(cross-correlation of x (N,K,R,C) with w (F,K,nr,nc),
    zero padding, + b (F,) if b is not None).
    Ro = 1 + (R + 2*pad_y - nr) // stride_y (same for columns).
    Runs the own implicit-GEMM kernel or cuDNN, whichever was faster for the shape."""
    key = ("conv", x.shape, w.shape, y.shape, b is None, stride_y, stride_x, pad_y, pad_x, act,
           y.gpudata.__int__() & 15)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _choose_conv(x, w, b, None, y, int(stride_y), int(stride_x),
                                         int(pad_y), int(pad_x), act_args(act, "conv2d"))
    if plan.__class__ is routing.CudnnConv:
        plan.conv2d(x, w, b, y, stride_y, stride_x, pad_y, pad_x)
        return
    if plan.S == 1:
        plan.main(x.gpudata, w.gpudata, ptr(b), 0, y.gpudata, *plan.args)
    else:
        plan.main(x.gpudata, w.gpudata, 0, 0, plan.ws.gpudata, *plan.args)
        plan.reduce(plan.ws.gpudata, ptr(b), 0, y.gpudata, *plan.reduce_args)


def conv2d_residual(x, w, b, z, y, stride_y, stride_x, pad_y, pad_x, act):
    """conv2d plus a residual: y = act(conv(x, w) + b + z), in the convolution's own
    epilogue (own kernels: the same kernels as conv2d; cuDNN: the fused call's z with
    alpha2 = 1). z (N,F,Ro,Co) float32 C-contiguous, y's shape; it must not be y nor
    overlap it (ValueError). Routed per shape like conv2d, timed with the residual;
    conv_route(..., residual=True) reports the choice."""
    _check_no_alias(z, y)
    zp = z.gpudata.__int__()
    key = ("conv", x.shape, w.shape, y.shape, b is None, stride_y, stride_x, pad_y, pad_x, act,
           y.gpudata.__int__() & 15, "residual", z.shape, zp & 15)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _choose_conv(x, w, b, z, y, int(stride_y), int(stride_x),
                                         int(pad_y), int(pad_x),
                                         act_args(act, "conv2d_residual"))
    if plan.__class__ is routing.CudnnConv:
        plan.conv2d_residual(x, w, b, z, y, stride_y, stride_x, pad_y, pad_x)
        return
    if plan.S == 1:
        plan.main(x.gpudata, w.gpudata, ptr(b), zp, y.gpudata, *plan.args)
    else:
        plan.main(x.gpudata, w.gpudata, 0, 0, plan.ws.gpudata, *plan.args)
        plan.reduce(plan.ws.gpudata, ptr(b), zp, y.gpudata, *plan.reduce_args)


# --------------------------------------------------------------------------- fc
def _fc_plan(x, w, b, y, act):
    _check(len(w.shape) == 2, "fc wants w (O, D)")
    O, D = w.shape
    N = x.shape[0]
    _check(x.size == N * D, f"fc: x {x.shape} is not (N, {D}) when flattened")
    _check(y.size == N * O and y.shape[0] == N, f"fc: y must be ({N}, {O}), got {y.shape}")
    _check(b is None or b.size == O, f"fc: b must have {O} elements")
    for a, lab in ((x, "x"), (w, "w"), (y, "y")) + (((b, "b"),) if b is not None else ()):
        _f32c(a, "fc " + lab)
    code, p = act
    if N <= 8:
        plan = GemmPlan()
        plan.main_name, plan.conv = "fc_small", False
        # gemm.cu's fc_small: (x, w, b, y, N, O, D, act, act_p, vec4)
        plan.main = Kernel("gemm", "fc_small", (-(-O // 8),), (256,))
        plan.set_split(1, N * O, 1, O, code, p)
        vec4 = int(D % 4 == 0 and aligned16(x, w))
        plan.args = (N, O, D, code, p, vec4)
        return plan
    vec = int(O % 4 == 0 and ptr(y) % 16 == 0)

    def make(kname, BM, BN, BK, S, kchunk, model_s):
        # GEMM rows = samples (x), columns = outputs (w)
        plan = GemmPlan()
        plan.main_name, plan.model_s, plan.conv = kname, model_s, False
        # gemm.cu's fc_tile: (x, w, b, y, N, O, D, act, act_p, kchunk, out_zstride, vec_store)
        plan.main = Kernel("gemm", kname, (-(-O // BN), -(-N // BM), S), (256,))
        plan.set_split(S, N * O, 1, O, code, p)
        if S > 1:      # raw partial sums; splitk_reduce applies b and act
            plan.args = (N, O, D, 0, 0.0, kchunk, N * O, vec)
        else:
            plan.args = (N, O, D, code, p, kchunk, 0, vec)
        return plan

    return pick_gemm(make, gemm_candidates(N, O, D, FC_CFGS, N * O), x, w, b, y)


def fc(x, w, b, y, act):
    """y (N,O) = act(x (N,D) @ w(O,D).T + b (O,) if b is not None).
    x may be any (N, ...) array of N*D elements (seen as (N, D))."""
    key = ("fc", x.shape, w.shape, y.shape, b is None, act, aligned16(x, w, y))
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _fc_plan(x, w, b, y, act_args(act, "fc"))
    if plan.S == 1:
        plan.main(x.gpudata, w.gpudata, ptr(b), y.gpudata, *plan.args)
    else:
        plan.main(x.gpudata, w.gpudata, 0, plan.ws.gpudata, *plan.args)
        plan.reduce(plan.ws.gpudata, ptr(b), 0, y.gpudata, *plan.reduce_args)


# --------------------------------------------------------------------------- elementwise
class _EltPlan:
    __slots__ = ("k", "args")


def affine(x, gamma, beta, y, act):
    """y = act(x * gamma[k] + beta[k]) per channel k of x (N,K,R,C) (gamma, beta (K,)).
    y may be x. FC mode: x seen as (N,D,1,1), K = D."""
    vec_ok = aligned16(x, y)
    key = ("affine", x.shape, y.shape, gamma.size, act, vec_ok)
    p = plans.get(key)
    if p is None:
        code, ap = act_args(act, "affine")
        _check(x.size == y.size, "affine: x and y sizes differ")
        K = int(gamma.size)
        _check(beta.size == K, "affine: gamma and beta sizes differ")
        _check(len(x.shape) >= 2 and x.shape[1] == K,
               f"affine: x {x.shape} must be (N, K, ...) with K = {K}")
        _f32c(x, "affine x")
        _f32c(y, "affine y")
        n = int(x.size)
        RC = n // (x.shape[0] * K) if n else 1
        p = _EltPlan()
        # eltwise.cu: affine_*(x, gamma, beta, y, n, K, RC, act, act_p)
        if vec_ok and RC % 4 == 0:
            p.k = Kernel("eltwise", "affine_v4", (blocks(n // 4),), (256,))
            p.args = (n // 4, K, RC // 4, code, ap)
        else:
            p.k = Kernel("eltwise", "affine_f", (blocks(n),), (256,))
            p.args = (n, K, RC, code, ap)
        plans[key] = p
    if p.args[0]:
        p.k(x.gpudata, gamma.gpudata, beta.gpudata, y.gpudata, *p.args)


def activation(x, y, act):
    """y = act(x), elementwise; y may be x."""
    vec_ok = aligned16(x, y)
    key = ("activation", x.size, y.size, act, vec_ok)
    p = plans.get(key)
    if p is None:
        code, ap = act_args(act, "activation")
        _check(x.size == y.size, "activation: x and y sizes differ")
        _f32c(x, "activation x")
        _f32c(y, "activation y")
        n = int(x.size)
        p = _EltPlan()
        # eltwise.cu: activation_*(x, y, n, act, act_p)
        if vec_ok and n % 4 == 0:
            p.k = Kernel("eltwise", "activation_v4", (blocks(n // 4),), (256,))
            p.args = (n // 4, code, ap)
        else:
            p.k = Kernel("eltwise", "activation_f", (blocks(n),), (256,))
            p.args = (n, code, ap)
        plans[key] = p
    if p.args[0]:
        p.k(x.gpudata, y.gpudata, *p.args)


def add(a, b, y, act):
    """y = act(a + b); y may be a or b (same shapes). Operands of other (N,K,R,C) shapes than
    y: each index of y an operand lacks counts as 0 in it (dlib's zero-padded tt::add,
    add_prev_; tensor_ops.add_padded_plan); y then shares memory with neither."""
    vec_ok = aligned16(a, b, y)
    key = ("add", a.shape, b.shape, y.shape, act, vec_ok)
    p = plans.get(key)
    if p is None:
        code, ap = act_args(act, "add")
        if not tuple(a.shape) == tuple(b.shape) == tuple(y.shape) and \
                len({tuple(t.shape) + (1,) * (4 - len(t.shape)) for t in (a, b, y)}) != 1:
            p = plans[key] = add_padded_plan(a, b, y, code, ap)
            if p.args[0]:
                p.k(a.gpudata, b.gpudata, y.gpudata, *p.args)
            return
        for t, lab in ((a, "a"), (b, "b"), (y, "y")):
            _f32c(t, "add " + lab)
        n = int(a.size)
        p = _EltPlan()
        # eltwise.cu: add_*(a, b, y, n, act, act_p)
        if vec_ok and n % 4 == 0:
            p.k = Kernel("eltwise", "add_v4", (blocks(n // 4),), (256,))
            p.args = (n // 4, code, ap)
        else:
            p.k = Kernel("eltwise", "add_f", (blocks(n),), (256,))
            p.args = (n, code, ap)
        plans[key] = p
    if p.args[0]:
        p.k(a.gpudata, b.gpudata, y.gpudata, *p.args)


# --------------------------------------------------------------------------- pooling
def _pool_plan(kind, x, y, nr, nc, sy, sx, py, px):
    _check(len(x.shape) == 4 and len(y.shape) == 4, f"{kind}: x and y must be (N,K,R,C)")
    N, K, R, C = x.shape
    _check(min(sy, sx, nr, nc) >= 1 and 0 <= py < nr and 0 <= px < nc,
           f"{kind}: need window >= 1, stride >= 1, 0 <= pad < window")
    Ro = 1 + (R + 2 * py - nr) // sy
    Co = 1 + (C + 2 * px - nc) // sx
    _check(tuple(y.shape) == (N, K, Ro, Co), f"{kind}: y must be {(N, K, Ro, Co)}, got {y.shape}")
    _f32c(x, kind + " x")
    _f32c(y, kind + " y")
    p = _EltPlan()
    total = int(y.size)
    if nr == R and nc == C and py == 0 and px == 0:  # global pooling: one output per plane
        # pool.cu: global_pool(x, y, planes, RC, is_max)
        p.k = Kernel("pool", "global_pool", (blocks(N * K, 8),), (256,))
        p.args = (N * K, R * C, int(kind == "max_pool"))
    else:
        # pool.cu: max_pool / avg_pool(x, y, total, R, C, Ro, Co, nr, nc, sy, sx, py, px)
        p.k = Kernel("pool", kind, (blocks(total),), (256,))
        p.args = (total, R, C, Ro, Co, nr, nc, sy, sx, py, px)
    return p


def max_pool(x, y, nr, nc, stride_y, stride_x, pad_y, pad_x):
    """y (N,K,Ro,Co) = max over the in-bounds part of each nr x nc window of x (N,K,R,C)."""
    key = ("max_pool", x.shape, y.shape, nr, nc, stride_y, stride_x, pad_y, pad_x)
    p = plans.get(key)
    if p is None:
        p = plans[key] = _pool_plan("max_pool", x, y, nr, nc, stride_y, stride_x, pad_y, pad_x)
    p.k(x.gpudata, y.gpudata, *p.args)


def avg_pool(x, y, nr, nc, stride_y, stride_x, pad_y, pad_x):
    """y (N,K,Ro,Co) = mean over the in-bounds part of each window (padding not counted)."""
    key = ("avg_pool", x.shape, y.shape, nr, nc, stride_y, stride_x, pad_y, pad_x)
    p = plans.get(key)
    if p is None:
        p = plans[key] = _pool_plan("avg_pool", x, y, nr, nc, stride_y, stride_x, pad_y, pad_x)
    p.k(x.gpudata, y.gpudata, *p.args)


# --------------------------------------------------------------------------- softmax
def softmax(x, y):
    """For every (n, r, c) of x (N,K,R,C): y[n,:,r,c] = softmax(x[n,:,r,c]); y may be x."""
    key = ("softmax", x.shape, y.shape)
    p = plans.get(key)
    if p is None:
        _check(x.size == y.size, "softmax: x and y sizes differ")
        _f32c(x, "softmax x")
        _f32c(y, "softmax y")
        shp = tuple(x.shape) + (1,) * (4 - len(x.shape))
        N, K = shp[0], shp[1]
        RC = int(np.prod(shp[2:]))
        p = _EltPlan()
        if RC == 1 and K >= SOFTMAX_BLOCK_ROWS:
            # long rows (softmax_all): tensor.cu's softmax_rows_block, a block per row
            p = softmax_rows_plan(N, K)
        elif RC == 1:
            # softmax.cu: softmax_rows(x, y, N, K)
            p.k = Kernel("softmax", "softmax_rows", (blocks(N, 8),), (256,))
            p.args = (N, K)
        else:
            # softmax.cu: softmax_strided(x, y, N, K, RC)
            p.k = Kernel("softmax", "softmax_strided", (blocks(N * RC, 128),), (128,))
            p.args = (N, K, RC)
        plans[key] = p
    p.k(x.gpudata, y.gpudata, *p.args)

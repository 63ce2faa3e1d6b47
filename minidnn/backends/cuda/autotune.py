"""The GEMM time model and autotuner of conv2d and fc, and GPU timing.

conv2d and fc (batch > 8) choose their tile and split-K factor per shape: a
crude time model (``gemm_candidates``) ranks the candidates, and the best few
are timed once on the GPU, on the caller's arrays, when the plan is built
(``pick_gemm``; this synchronises, so plans must be built outside graph
capture, which capture()'s warm-up run does). MINIDNN_CUDA_AUTOTUNE=0 uses the
model alone, which makes the choice, and so the summation order, the same on
every run. Tests force a choice with ``force_gemm = (kernel name, S)``.

A ``GemmPlan`` is one GEMM launch plus, when split S > 1 ways, its reduction:
the main kernel writes S slabs of raw partial sums into the plan's workspace
and eltwise.cu's splitk_reduce adds them up with bias, residual and the
activation. The activation is part of the plan (its code and parameter are in
``args`` or ``reduce_args``), so a plan serves one activation.

``time_call(fn)`` is the cost of a call as routing.py compares them: the larger
of its GPU time and its host time.
"""
from __future__ import annotations

import os
import time

from .gpu import SM_COUNT, drv, stream
from .kernels import Kernel, blocks
from .memory import empty, ptr

CONV_CFGS = {  # name: (BM, BN, BK)
    "conv_128x128": (128, 128, 8),
    "conv_64x64": (64, 64, 16),
}
FC_CFGS = {"fc_tile": (64, 64, 16)}

# A crude model, used to rank launch configurations before timing the best few
# (and alone when autotuning is off). Numbers measured on an H100: either tile
# sustains ~83 GMAC/s per SM with the SM full; fewer resident blocks hide less
# latency (_EFF[r-1] = relative throughput with r blocks resident).
_SM_MAC_RATE = 83e9
_OCC = {"conv_128x128": 2, "conv_64x64": 4, "fc_tile": 4}
_EFF = {"conv_128x128": (0.6, 1.0), "conv_64x64": (0.3, 0.55, 0.8, 1.0),
        "fc_tile": (0.3, 0.55, 0.8, 1.0)}
_ITER_LAT = 0.5e-6           # floor per k-tile iteration of a wave (load latency + barrier)
_MEM_BW = 2.5e12             # bytes/s
_LAUNCH_S = 2e-6             # one extra kernel launch

force_gemm = None    # tests: (kernel name, S) overrides the choice
AUTOTUNE = os.environ.get("MINIDNN_CUDA_AUTOTUNE", "1") not in ("0", "", "no", "false")


def gemm_candidates(rows, cols, Kd, cfgs, out_elems):
    """[(model time, kernel name, BM, BN, BK, S, kchunk)] sorted, best first.
    GEMM: rows tiled by BM (blockIdx.y), cols by BN (blockIdx.x), Kd split S ways."""
    if force_gemm is not None and force_gemm[0] in cfgs:
        kname, S = force_gemm
        BM, BN, BK = cfgs[kname]
        kchunk = -(-(-(-Kd // BK)) // S) * BK
        return [(0.0, kname, BM, BN, BK, -(-Kd // kchunk), kchunk)]
    cands = {}
    for kname, (BM, BN, BK) in cfgs.items():
        nblocks = -(-cols // BN) * -(-rows // BM)
        nkt = -(-Kd // BK)
        occ, eff = _OCC[kname], _EFF[kname]
        for S in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            if S > 1 and (nblocks * S > 8 * SM_COUNT or nkt < 2 * S):
                continue
            kchunk = -(-nkt // S) * BK
            S = -(-Kd // kchunk)
            per_sm = -(-(nblocks * S) // SM_COUNT)      # blocks on the busiest SM
            full, r = divmod(per_sm, occ)
            work = BM * BN * kchunk / _SM_MAC_RATE       # one block alone at full rate
            t = full * occ * work / eff[occ - 1] + (r * work / eff[r - 1] if r else 0.0)
            t = max(t, (full + (r > 0)) * (kchunk // BK) * _ITER_LAT)
            if S > 1:
                t += (S + 1) * out_elems * 4 / _MEM_BW + _LAUNCH_S
            cands[(kname, S)] = (t, kname, BM, BN, BK, S, kchunk)
    return sorted(cands.values())


class GemmPlan:
    """A (split-K) GEMM launch plus, when split, its reduction epilogue.

    main: the conv_* or fc_* Kernel; args: its arguments after the pointers;
    S > 1: ws (the S slabs), reduce (splitk_reduce) and reduce_args (its
    arguments after the pointers: n, S, inner, F, act, act_p); conv: whether
    main takes the residual z after b (conv.cu) or not (gemm.cu)."""

    __slots__ = ("main", "main_name", "reduce", "reduce_args", "ws", "keep", "S", "n_out",
                 "inner", "F", "args", "model_s", "tuned_s", "conv")

    def __init__(self):
        self.reduce = self.reduce_args = self.ws = self.keep = None
        self.model_s = self.tuned_s = None

    def set_split(self, S, n_out, inner, F, act_code, act_p):
        """S > 1: allocate the workspace and prepare the reduction (bias, residual and
        the activation are applied there)."""
        self.S, self.n_out, self.inner, self.F = S, n_out, inner, F
        if S > 1:
            self.ws = empty((S * n_out,))
            self.reduce = Kernel("eltwise", "splitk_reduce", (blocks(n_out),), (256,))
            self.reduce_args = (n_out, S, inner, F, act_code, act_p)


def run_gemm(plan, x, w, b, y, z=None):
    """One run of a GEMM plan (the autotuner's and the router's timing calls; the
    ops inline the same launches). Conv kernels take the residual z after b."""
    if plan.S == 1:
        if plan.conv:
            plan.main(x.gpudata, w.gpudata, ptr(b), ptr(z), y.gpudata, *plan.args)
        else:
            plan.main(x.gpudata, w.gpudata, ptr(b), y.gpudata, *plan.args)
    else:
        if plan.conv:
            plan.main(x.gpudata, w.gpudata, 0, 0, plan.ws.gpudata, *plan.args)
        else:
            plan.main(x.gpudata, w.gpudata, 0, plan.ws.gpudata, *plan.args)
        plan.reduce(plan.ws.gpudata, ptr(b), ptr(z), y.gpudata, *plan.reduce_args)


_spin = None


def _spin_kernel():
    global _spin
    if _spin is None:
        _spin = Kernel("eltwise", "spin_wait", (1,), (1,))
    return _spin


def autotune(plans, x, w, b, y, z=None, reps=3, rounds=2):
    """Time each candidate plan on the GPU (the op itself on the caller's
    arrays: inputs are only read, y is rewritten by every run) and return the
    fastest. A spin kernel runs first, so the host has queued every timed
    launch before the first event: host launch overhead stays out."""
    if len(plans) == 1:
        return plans[0]
    spin = _spin_kernel()
    best = [float("inf")] * len(plans)
    for _ in range(rounds):
        for i, p in enumerate(plans):
            e0, e1 = drv.Event(), drv.Event()
            spin(300_000)
            e0.record(stream)
            for _ in range(reps):
                run_gemm(p, x, w, b, y, z)
            e1.record(stream)
            e1.synchronize()
            best[i] = min(best[i], e1.time_since(e0) * 1e-3 / reps)
    i = min(range(len(plans)), key=best.__getitem__)
    plans[i].tuned_s = best[i]
    return plans[i]


def pick_gemm(make, cands, x, w, b, y, z=None, ntune=5):
    """Build the plan of the best modelled candidate, or time the best few.
    make(kname, BM, BN, BK, S, kchunk, model_s) builds one candidate's plan."""
    if not AUTOTUNE or len(cands) == 1:
        return make(*cands[0][1:], model_s=cands[0][0])
    top = cands[:ntune]
    for kname in {c[1] for c in cands}:   # also each tile's unsplit launch
        c1 = [c for c in cands if c[1] == kname and c[5] == 1]
        if c1 and c1[0] not in top:
            top.append(c1[0])
    plans = [make(*c[1:], model_s=c[0]) for c in top]
    return autotune(plans, x, w, b, y, z)


def time_call(fn, reps=3, rounds=2):
    """The cost of fn() per call in seconds: the larger of its GPU time (events around
    reps calls queued behind a spin kernel, so launch costs stay out of it) and its
    host time (the same calls enqueued while the GPU spins). A graph replay removes
    the host part, an eager forward does not: the larger of the two is the one that
    can bound a forward, and at batch 1 cuDNN's host cost per call often does."""
    spin = _spin_kernel()
    best_gpu = best_host = float("inf")
    for _ in range(rounds):
        e0, e1 = drv.Event(), drv.Event()
        spin(2_000_000)
        e0.record(stream)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best_host = min(best_host, (time.perf_counter() - t) / reps)
        e1.record(stream)
        e1.synchronize()
        best_gpu = min(best_gpu, e1.time_since(e0) * 1e-3 / reps)
    return max(best_gpu, best_host)

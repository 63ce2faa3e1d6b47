"""The cuDNN policy, version and status decoding, library discovery and the safe
fallback, on the CPU: no GPU, no cuDNN, no PyCUDA needed (runs in CI).

The fallback is exercised against a fake libcudnn (a Python object answering
the ctypes calls), so the bookkeeping -- fused call, NOT_SUPPORTED, separate
calls, decision remembered -- is checked for both status-code sets.
"""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from minidnn.backends import cudnn
from minidnn.backends.cudnn import FUSED, FWD_ALGOS, IDENTITY, RELU, UNFUSED
from minidnn.backends.cudnn import library as cudnn_library
from minidnn.backends.cudnn import plans as cudnn_plans

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = (7605, 8907, 90100, 91400, 91900)


# -- versions -----------------------------------------------------------------
@pytest.mark.parametrize("v, expected", [(7605, (7, 6, 5)), (8907, (8, 9, 7)), (8000, (8, 0, 0)),
                                         (90100, (9, 1, 0)), (91900, (9, 19, 0)),
                                         (91400, (9, 14, 0)), (100203, (10, 2, 3))])
def test_decode_version(v, expected):
    assert cudnn.decode_version(v) == expected
    assert cudnn.version_text(v) == "%d.%d.%d" % expected


def test_decode_version_rejects_negative():
    with pytest.raises(ValueError):
        cudnn.decode_version(-1)


# -- status codes -----------------------------------------------------------------
@pytest.mark.parametrize("v", [7605, 8907])
def test_status_codes_before_9(v):
    assert cudnn.not_supported_code(v) == 9
    assert cudnn.status_name(v, 9) == "NOT_SUPPORTED"
    assert cudnn.is_not_supported(v, 9)
    assert not cudnn.is_not_supported(v, 3000)        # 9's code means nothing to 8
    assert cudnn.status_name(v, 3000) == "UNKNOWN(3000)"
    assert cudnn.status_name(v, 0) == "SUCCESS"
    assert cudnn.status_name(v, 3) == "BAD_PARAM"
    assert cudnn.status_category(v, 6) == "NOT_SUPPORTED"    # ARCH_MISMATCH, filed as 9 does
    assert cudnn.status_category(v, 4) == "INTERNAL_ERROR"
    assert not cudnn.is_not_supported(v, 0)


@pytest.mark.parametrize("v", [90100, 91400, 91900])
def test_status_codes_from_9(v):
    assert cudnn.not_supported_code(v) == 3000
    assert cudnn.status_name(v, 3000) == "NOT_SUPPORTED"
    assert cudnn.status_name(v, 3002) == "NOT_SUPPORTED_SHAPE"
    assert cudnn.status_name(v, 3011) == "NOT_SUPPORTED_PADDING"
    for code in (3000, 3001, 3002, 3007, 3013, 3099):     # the whole family, future codes too
        assert cudnn.is_not_supported(v, code)
    assert cudnn.status_name(v, 3099) == "NOT_SUPPORTED(3099)"
    assert not cudnn.is_not_supported(v, 9)               # 8's code means nothing to 9
    assert not cudnn.is_not_supported(v, 2000)
    assert cudnn.status_category(v, 2002) == "BAD_PARAM"
    assert cudnn.status_category(v, 4004) == "INTERNAL_ERROR"
    assert cudnn.status_category(v, 5000) == "EXECUTION_FAILED"
    assert cudnn.status_name(v, 1008) == "SUBLIBRARY_LOADING_FAILED"
    assert cudnn.status_name(v, 77) == "UNKNOWN(77)"


# -- the policy ---------------------------------------------------------------
@pytest.mark.parametrize("v", VERSIONS)
@pytest.mark.parametrize("algo", FWD_ALGOS)
def test_relu_is_fused_with_every_algorithm(v, algo):
    assert cudnn.fused_policy(v, algo, RELU) == FUSED


@pytest.mark.parametrize("algo", FWD_ALGOS)
def test_identity_on_cudnn7_only_precomp_gemm(algo):
    expected = FUSED if algo == "IMPLICIT_PRECOMP_GEMM" else UNFUSED
    assert cudnn.fused_policy(7605, algo, IDENTITY) == expected


@pytest.mark.parametrize("v", [8907, 90100])
@pytest.mark.parametrize("algo", FWD_ALGOS)
def test_identity_unmeasured_versions_stay_with_the_documented_algorithm(v, algo):
    expected = FUSED if algo == "IMPLICIT_PRECOMP_GEMM" else UNFUSED
    assert cudnn.fused_policy(v, algo, IDENTITY) == expected


@pytest.mark.parametrize("v", [91400, 91900])
@pytest.mark.parametrize("algo", FWD_ALGOS)
def test_identity_measured_versions_follow_the_measurement(v, algo):
    # measured on 9.14 and 9.19 (see the table in cudnn/policy.py): the fused call with
    # identity answered SUCCESS for every algorithm but DIRECT.
    expected = UNFUSED if algo == "DIRECT" else FUSED
    assert cudnn.fused_policy(v, algo, IDENTITY) == expected


def test_policy_takes_algorithm_numbers_and_is_pure():
    for v in VERSIONS:
        for i, name in enumerate(FWD_ALGOS):
            for act in (RELU, IDENTITY):
                assert cudnn.fused_policy(v, i, act) == cudnn.fused_policy(v, name, act)
                assert cudnn.fused_policy(v, name, act) == cudnn.fused_policy(v, name, act)


def test_policy_rejects_bad_arguments():
    with pytest.raises(ValueError):
        cudnn.fused_policy(91900, "FASTEST", RELU)
    with pytest.raises(ValueError):
        cudnn.fused_policy(91900, "DIRECT", "sigmoid")


# -- finding the library ------------------------------------------------------------
def _py(code, **env):
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env)
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_turned_off_by_environment():
    out = _py("from minidnn.backends import cudnn; print(cudnn.candidates(), cudnn.available(),"
              " cudnn.version(), cudnn.unavailable_reason())", MINIDNN_CUDNN="0")
    assert out == "[] False None turned off by MINIDNN_CUDNN=0"


def test_explicit_path_that_cannot_load_is_a_clear_reason(tmp_path):
    bad = tmp_path / "libcudnn.so.9"
    bad.write_bytes(b"not a library")
    out = _py("from minidnn.backends import cudnn; print(cudnn.available());"
              "print(cudnn.unavailable_reason())", MINIDNN_CUDNN_PATH=str(bad))
    first, reason = out.split("\n", 1)
    assert first == "False"
    assert "MINIDNN_CUDNN_PATH" in reason and str(bad) in reason


def test_wheel_layout_is_found_before_the_system(tmp_path):
    lib = tmp_path / "nvidia" / "cudnn" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudnn.so.9").write_bytes(b"")
    code = ("import sys; sys.path.insert(0, %r); from minidnn.backends import cudnn;"
            "print(cudnn.candidates())" % str(tmp_path))
    out = _py(code, MINIDNN_CUDNN_PATH="")
    cands = eval(out)
    mine = cands.index((str(lib / "libcudnn.so.9"), "nvidia.cudnn"))
    first_system = [c[1] for c in cands].index("system")
    assert mine < first_system and cands[-1][1] == "system"


def test_import_needs_no_gpu_software():
    out = _py("import sys; import minidnn; from minidnn.backends import cudnn;"
              "print('pycuda' in sys.modules, 'ctypes' in sys.modules)")
    assert out.split()[0] == "False"


# -- the fallback, against a fake libcudnn ------------------------------------------
class _Arr:
    """What conv2d needs of a GPUArray."""

    def __init__(self, shape, ptr):
        self.shape, self.ptr, self.dtype = tuple(shape), ptr, np.dtype(np.float32)
        self.flags = type("F", (), {"c_contiguous": True})()


class FakeCudnn:
    """Answers the calls the cudnn package makes; ``fused_answer(algo, act)`` decides the fused call."""

    def __init__(self, version, fused_answer, heuristic=("IMPLICIT_PRECOMP_GEMM",),
                 conv_answer=lambda algo: 0, workspace_answer=lambda algo: 0):
        self.version, self.fused_answer, self.heuristic = version, fused_answer, heuristic
        self.conv_answer, self.workspace_answer = conv_answer, workspace_answer
        self.calls = []
        self.next = 100
        self.acts = {}

    def __getattr__(self, name):
        if not name.startswith("cudnn"):
            raise AttributeError(name)

        def f(*args):
            self.calls.append(name)
            if name.startswith("cudnnCreate"):
                self.next += 1
                args[0]._obj.value = self.next
            elif name == "cudnnSetActivationDescriptor":
                self.acts[args[0].value] = args[1]
            elif name == "cudnnGetConvolution2dForwardOutputDim":
                for ref, val in zip(args[3:], self.out_dims):
                    ref._obj.value = val
            elif name == "cudnnGetConvolutionForwardAlgorithm_v7":
                perf = args[7]
                for i, a in enumerate(self.heuristic):
                    perf[i].algo, perf[i].status, perf[i].mathType = FWD_ALGOS.index(a), 0, 3
                args[6]._obj.value = len(self.heuristic)
            elif name == "cudnnGetConvolutionForwardWorkspaceSize":
                args[6]._obj.value = 0
                return self.workspace_answer(FWD_ALGOS[args[5]])
            elif name == "cudnnConvolutionForward":
                return self.conv_answer(FWD_ALGOS[args[7]])
            elif name == "cudnnConvolutionBiasActivationForward":
                act = RELU if self.acts[args[15].value] == 1 else IDENTITY
                return self.fused_answer(FWD_ALGOS[args[7]], act)
            return 0
        return f


class _FakeCtx(cudnn_plans._Context):
    def zero_bias(self, f):
        return _Arr((f,), 7)


@pytest.fixture
def fake(monkeypatch):
    def install(version, fused_answer, **kw):
        lib = FakeCudnn(version, fused_answer, **kw)
        monkeypatch.setitem(cudnn_library._state, "lib", lib)
        monkeypatch.setitem(cudnn_library._state, "version", version)
        monkeypatch.setitem(cudnn_library._state, "loaded", True)
        ctx = []
        monkeypatch.setattr(cudnn_plans, "_current_context",
                            lambda: ("fake", ctx[0] if ctx else ctx.append(_FakeCtx()) or ctx[0]))
        monkeypatch.setattr(cudnn_plans, "_contexts", {})
        monkeypatch.setattr(cudnn_plans, "_plans", {})
        monkeypatch.setattr(cudnn_plans, "_fallback", {})
        monkeypatch.setattr(cudnn_plans, "_activations", {})
        monkeypatch.setattr(cudnn_plans, "_settings", {"stream": False, "algo": None,
                                                       "fused": None, "find": None})
        return lib
    return install


def _conv(lib, relu, bias=True, shape=((2, 3, 8, 8), (4, 3, 3, 3)), stride=1, pad=1):
    xs, ws = shape
    ro = 1 + (xs[2] + 2 * pad - ws[2]) // stride
    ys = (xs[0], ws[0], ro, ro)
    lib.out_dims = ys
    lib.calls.clear()
    cudnn.conv2d(_Arr(xs, 1), _Arr(ws, 2), _Arr((ws[0],), 3) if bias else None, _Arr(ys, 4),
                 stride, stride, pad, pad, relu)
    return [c for c in lib.calls if c in ("cudnnConvolutionBiasActivationForward",
                                          "cudnnConvolutionForward", "cudnnAddTensor",
                                          "cudnnActivationForward")]


@pytest.mark.parametrize("v", VERSIONS)
def test_fused_call_when_supported(fake, v):
    lib = fake(v, lambda algo, act: 0)
    assert _conv(lib, relu=True) == ["cudnnConvolutionBiasActivationForward"]
    assert cudnn.conv_path((2, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True)["path"] == FUSED


@pytest.mark.parametrize("v", VERSIONS)
def test_not_supported_falls_back_and_is_remembered(fake, v):
    ns = cudnn.not_supported_code(v)
    lib = fake(v, lambda algo, act: ns if algo == "DIRECT" else 0, heuristic=("DIRECT",))
    first = _conv(lib, relu=True)
    assert first == ["cudnnConvolutionBiasActivationForward", "cudnnConvolutionForward",
                     "cudnnAddTensor", "cudnnActivationForward"]
    # remembered: the fused call is not tried again for this shape and algorithm
    assert _conv(lib, relu=True) == ["cudnnConvolutionForward", "cudnnAddTensor",
                                     "cudnnActivationForward"]
    info = cudnn.conv_path((2, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True)
    assert info["path"] == UNFUSED and info["algorithm"] == "DIRECT"
    assert info["fallback"] == "NOT_SUPPORTED" and info["calls"] == 2
    # another shape with the same algorithm tries the fused call again
    assert _conv(lib, relu=True, shape=((1, 3, 9, 9), (4, 3, 3, 3)))[0] == \
        "cudnnConvolutionBiasActivationForward"


def test_detailed_cudnn9_codes_fall_back_too(fake):
    lib = fake(91900, lambda algo, act: 3002)   # NOT_SUPPORTED_SHAPE
    assert _conv(lib, relu=False, bias=True)[1:] == ["cudnnConvolutionForward", "cudnnAddTensor"]
    assert cudnn.conv_path((2, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, False)["fallback"] == \
        "NOT_SUPPORTED_SHAPE"


@pytest.mark.parametrize("v, code", [(8907, 3000), (91900, 9), (91900, 2000), (8907, 3)])
def test_other_errors_raise(fake, v, code):
    lib = fake(v, lambda algo, act: code)
    with pytest.raises(cudnn.CudnnError) as e:
        _conv(lib, relu=True)
    assert e.value.call == "cudnnConvolutionBiasActivationForward" and e.value.code == code


def test_identity_follows_the_policy(fake):
    lib = fake(7605, lambda algo, act: 0, heuristic=("IMPLICIT_GEMM",))
    assert _conv(lib, relu=False) == ["cudnnConvolutionForward", "cudnnAddTensor"]
    assert _conv(lib, relu=True) == ["cudnnConvolutionBiasActivationForward"]


def test_no_bias_uses_a_zero_bias_when_fused_and_nothing_when_not(fake):
    lib = fake(91900, lambda algo, act: 0)
    assert _conv(lib, relu=True, bias=False) == ["cudnnConvolutionBiasActivationForward"]
    cudnn.set_fused(False)
    assert _conv(lib, relu=True, bias=False) == ["cudnnConvolutionForward",
                                                 "cudnnActivationForward"]


def test_fault_injection_needs_no_library_answer(fake):
    lib = fake(91900, lambda algo, act: 0)
    with cudnn.inject_not_supported() as inj:
        assert _conv(lib, relu=True) == ["cudnnConvolutionForward", "cudnnAddTensor",
                                         "cudnnActivationForward"]
        assert inj["count"] == 1
    assert not cudnn_plans._inject["active"]


def test_forced_algorithm_is_used(fake):
    lib = fake(91900, lambda algo, act: 0)
    cudnn.force_algorithm("FFT")
    _conv(lib, relu=True)
    assert cudnn.conv_path((2, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True)["algorithm"] == "FFT"
    with pytest.raises(ValueError):
        cudnn.force_algorithm("FASTEST")


@pytest.mark.parametrize("v", [8907, 91900])
def test_forced_algorithm_that_cudnn_refuses_moves_on(fake, v):
    # what cuDNN 9.19 does with DIRECT: the workspace query, the fused call and the
    # plain convolution all answer NOT_SUPPORTED; the result comes from the next algorithm
    ns = cudnn.not_supported_code(v)
    lib = fake(v, lambda algo, act: ns if algo == "DIRECT" else 0,
               heuristic=("IMPLICIT_PRECOMP_GEMM", "GEMM"),
               conv_answer=lambda algo: ns if algo == "DIRECT" else 0,
               workspace_answer=lambda algo: ns if algo == "DIRECT" else 0)
    cudnn.force_algorithm("DIRECT")
    assert _conv(lib, relu=True) == ["cudnnConvolutionBiasActivationForward",
                                     "cudnnConvolutionForward",
                                     "cudnnConvolutionBiasActivationForward"]
    info = cudnn.conv_path((2, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True)
    assert info["algorithm"] == "IMPLICIT_PRECOMP_GEMM" and info["path"] == FUSED
    assert "DIRECT: NOT_SUPPORTED" in info["note"]
    assert ((2, 3, 8, 8), (4, 3, 3, 3), (1, 1), (1, 1), "DIRECT", RELU) in cudnn_plans._fallback
    # remembered: the next call goes straight to the algorithm that works
    assert _conv(lib, relu=True) == ["cudnnConvolutionBiasActivationForward"]


def test_winograd_is_never_picked_unless_forced(fake):
    lib = fake(91900, lambda algo, act: 0, heuristic=("WINOGRAD_NONFUSED", "GEMM"))
    _conv(lib, relu=True)
    assert cudnn.conv_path((2, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True)["algorithm"] == "GEMM"


def test_shape_mismatch_is_a_clear_error(fake):
    lib = fake(91900, lambda algo, act: 0)
    lib.out_dims = (2, 4, 8, 8)
    with pytest.raises(ValueError, match="y must be"):
        cudnn.conv2d(_Arr((2, 3, 8, 8), 1), _Arr((4, 3, 3, 3), 2), None, _Arr((2, 4, 7, 7), 4),
                     1, 1, 1, 1, False)


def test_perf_struct_layout():
    # cudnnConvolutionFwdAlgoPerf_t: int, int, float, size_t, int, int, int[3]
    assert ctypes.sizeof(cudnn.FwdAlgoPerf) == 48
    assert cudnn.FwdAlgoPerf.memory.offset == 16


# -- activations cuDNN can apply -------------------------------------------------------
def test_cudnn_applies_only_identity_and_relu():
    from minidnn import ops
    assert cudnn.cudnn_activation(None) == cudnn.cudnn_activation(False) == IDENTITY
    assert cudnn.cudnn_activation(ops.IDENTITY) == cudnn.cudnn_activation(IDENTITY) == IDENTITY
    assert cudnn.cudnn_activation(True) == cudnn.cudnn_activation(ops.RELU) == RELU
    assert cudnn.cudnn_activation(RELU) == cudnn.cudnn_activation((1, 0.0)) == RELU
    for code in range(2, 12):                    # leaky_relu .. smelu (activations.h)
        assert cudnn.cudnn_activation(ops.Act(code, 0.5)) is None
    with pytest.raises(ValueError):
        cudnn.cudnn_activation("sigmoid")


def test_other_activations_are_refused_before_any_call(fake):
    from minidnn import ops
    lib = fake(91900, lambda algo, act: 0)
    lib.out_dims = (2, 4, 8, 8)
    with pytest.raises(ValueError, match="relu and identity"):
        cudnn.conv2d(_Arr((2, 3, 8, 8), 1), _Arr((4, 3, 3, 3), 2), None, _Arr((2, 4, 8, 8), 4),
                     1, 1, 1, 1, ops.Act(4, 0.0))
    assert "cudnnConvolutionBiasActivationForward" not in lib.calls
    assert _conv(lib, relu=ops.RELU) == ["cudnnConvolutionBiasActivationForward"]

"""The backend contract, derived from ops.OPS: every backend implements every op with the
signature the table declares, and backends are found by the type of their arrays."""
import inspect
import sys
import types

import numpy as np
import pytest

import minidnn as dnn
from minidnn import ops


def _names(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()]


def _check_module(mod, grad, optional=()):
    missing, wrong = [], []
    for name, spec in ops.OPS.items():
        if spec.grad != grad:
            continue
        fn = getattr(mod, name, None)
        if fn is None:
            if name not in optional:
                missing.append(name)
        elif _names(fn) != list(spec.args):
            wrong.append(f"{name}{tuple(_names(fn))} != {spec.args}")
    assert not missing, f"{mod.__name__} lacks {missing}"
    assert not wrong, f"{mod.__name__}: " + "; ".join(wrong)


def test_cpu_backend_implements_every_op():
    _check_module(ops.backend("cpu"), grad=False)


def test_cpu_training_backend_implements_every_training_op():
    from minidnn.backends import cpu_grad
    _check_module(cpu_grad, grad=True)


@pytest.mark.gpu
def test_cuda_backend_implements_every_inference_op():
    # PENDING: the convolution family of the CUDA-convolutions branch (test_cuda_tensor.py)
    from test_cuda_tensor import PENDING
    _check_module(ops.backend("cuda"), grad=False, optional=ops.OPTIONAL | PENDING)


def test_dispatchers_carry_the_declared_signature():
    for name, spec in ops.OPS.items():
        fn = getattr(ops, name)
        assert _names(fn) == list(spec.args) and fn.spec is spec and fn.__doc__


def test_every_layers_forward_ops_exist():
    for cls in dnn.core.layer_classes():
        for name in cls.forward_ops:
            assert name in ops.OPS and not ops.OPS[name].grad, (cls.__name__, name)


# ---------------------------------------------------------------- a stand-in backend
class FakeArray:
    """A device array stand-in: wraps a NumPy array."""

    def __init__(self, a):
        self.a = np.ascontiguousarray(a, np.float32)
        self.shape, self.dtype, self.size = self.a.shape, self.a.dtype, self.a.size

    def reshape(self, *shape):
        return FakeArray(self.a.reshape(*shape))


def _fake_backend():
    """A backend module named "fake" that runs the CPU kernels on FakeArrays."""
    cpu = ops.backend("cpu")
    mod = types.ModuleType("minidnn_fake_backend")
    mod.name, mod.array_type = "fake", FakeArray
    mod.empty = lambda shape: FakeArray(np.empty(shape, np.float32))
    mod.asarray = lambda a: FakeArray(a)
    mod.to_numpy = lambda a: a.a.copy()
    mod.upload = lambda dst, src: np.copyto(dst.a, src)
    mod.copy = lambda dst, src: np.copyto(dst.a, src.a)

    def wrap(fn):
        def call(*args):
            return fn(*[a.a if isinstance(a, FakeArray) else a for a in args])
        call.__name__ = fn.__name__
        return call
    for name, spec in ops.OPS.items():
        if not spec.grad:
            setattr(mod, name, wrap(getattr(cpu, name)))
    return mod


@pytest.fixture
def fake_backend(monkeypatch):
    mod = _fake_backend()
    monkeypatch.setattr(ops, "DEVICES", ops.DEVICES + ("fake",))
    monkeypatch.setitem(ops._by_name, "fake", mod)
    monkeypatch.setitem(ops._by_type, FakeArray, mod)
    yield mod


def test_backend_of_finds_a_registered_array_type(fake_backend):
    assert ops.backend_of(FakeArray(np.zeros(3))) is fake_backend
    assert ops.backend_of(np.zeros(3, np.float32)) is ops.backend("cpu")
    with pytest.raises(TypeError, match="expected a numpy.ndarray or a device array"):
        ops.backend_of([1.0])


def test_register_backend_files_it_under_its_array_type(monkeypatch):
    mod = types.SimpleNamespace(name="other", array_type=type("OtherArray", (), {}))
    monkeypatch.setattr(ops, "_by_name", dict(ops._by_name))
    monkeypatch.setattr(ops, "_by_type", dict(ops._by_type))
    ops.register_backend(mod)
    assert ops._by_type[mod.array_type] is mod and ops._by_name["other"] is mod
    assert None not in ops._by_type


def test_a_net_on_a_device_backend_runs_and_get_output_works(fake_backend):
    dnn.set_seed(0)
    net = dnn.fc(3, dnn.relu(dnn.add_prev1(dnn.con(2, 3, 3, 1, 1, dnn.tag1(dnn.input_tensor())))))
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5)).astype(np.float32)
    want = net.forward(x)
    inner = [n.get_output() for n in net.chain()]
    net.to("fake", graphs=False)
    got = net.forward(FakeArray(x))
    np.testing.assert_array_equal(got, want)
    for node, w in zip(net.chain(), inner):
        np.testing.assert_array_equal(node.get_output(), w)
    assert isinstance(net.forward_device(FakeArray(x)), FakeArray)


def test_to_a_backend_without_a_layers_kernel_names_the_layer(fake_backend):
    del fake_backend.softmax
    net = dnn.softmax(dnn.relu(dnn.input_tensor()))
    with pytest.raises(NotImplementedError, match=r"layer<0> softmax: the fake backend has no kernel "
                                                  r"for softmax"):
        net.to("fake")

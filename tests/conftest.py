"""pytest options for minidnn.

`--gpu` runs the tests marked `gpu`. Without it they are skipped; with it a
machine without a usable GPU (no PyCUDA, no driver, no device) is an error,
not a silent skip: the session stops with the reason.
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="run the GPU tests (a usable CUDA GPU is then required)")
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only every N-th collected test starting at the I-th "
                          "(0 <= I < N), to split the suite over parallel processes")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; runs only with --gpu")
    if config.getoption("--gpu"):
        problem = _gpu_problem()
        if problem:
            raise pytest.UsageError(f"--gpu was given but no usable GPU: {problem}")


def _gpu_problem():
    try:
        import pycuda.driver as drv
    except Exception as e:  # ImportError, or a broken libcuda
        return f"PyCUDA cannot be imported ({e}); install it with pip install '.[gpu]'"
    try:
        drv.init()
        if drv.Device.count() < 1:
            return "the CUDA driver sees no device"
    except Exception as e:
        return f"the CUDA driver failed to initialise ({e})"
    return None


def _shard(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    try:
        i, n = (int(v) for v in spec.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"--shard expects I/N with 0 <= I < N, got {spec!r}")
    keep, drop = [], []
    for k, item in enumerate(items):
        (keep if k % n == i else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_collection_modifyitems(config, items):
    _shard(config, items)
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="GPU test: run with --gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Run a test on every backend: "cpu", and "cuda" under --gpu."""
    return request.param

"""Concurrent forwards: many threads calling one net give the single-threaded answers
(each thread runs its own compiled programs; the parameters are shared), kernel teams
shrink so threads do not oversubscribe the cores, and changing a net's structure while
another thread runs it is refused."""
import os
import threading
import time

import numpy as np
import pytest

import minidnn as dnn
from minidnn import core, nets
from minidnn.backends import cpu


def _net(fused):
    net = nets.randomized(nets.cifar_resnet(widths=(8, 16, 16), blocks=1), (1, 3, 16, 16))
    return dnn.fuse(net) if fused else net


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 3, r, r)).astype(np.float32)
            for n, r in ((1, 16), (3, 16), (2, 12), (1, 20), (5, 16), (1, 16), (2, 12), (4, 9))]


def _same(a, b):
    """Equal up to float32 rounding (kernel teams of different sizes may cut a reduction
    differently; shared buffers give wholly different values)."""
    if a.dtype.kind != "f":
        return np.array_equal(a, b)
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


def concurrent_mismatches(net, inputs, threads=8, rounds=3, call=None):
    """Run every input from `threads` threads at once, `rounds` times each; return how many
    results differ from the single-threaded ones, and the errors raised."""
    call = call or net.forward
    want = [call(x) for x in inputs]
    bad, errors = [0], []
    start = threading.Barrier(threads)

    def work(t):
        start.wait()
        for r in range(rounds):
            for i in range(len(inputs)):
                j = (i + t + r) % len(inputs)
                try:
                    got = call(inputs[j])
                except Exception as e:        # pragma: no cover - reported below
                    errors.append(e)
                    return
                if not _same(got, want[j]):
                    bad[0] += 1
    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return bad[0], errors


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_eight_threads_mixed_shapes_match_one_thread(fused):
    net = _net(fused)
    bad, errors = concurrent_mismatches(net, _inputs(), threads=8, rounds=3)
    assert not errors and bad == 0


def test_labels_and_get_output_per_thread():
    net = dnn.loss_multiclass_log(_net(False))
    xs = _inputs(1)
    bad, errors = concurrent_mismatches(net, xs, threads=4, rounds=2, call=net)
    assert not errors and bad == 0
    seen = {}

    def work(i):
        net.forward(xs[i])
        seen[i] = net.subnet().get_output()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(4):                 # each thread sees the output of its own last forward
        assert _same(seen[i], net.subnet().forward(xs[i]))


def test_stress_for_a_few_seconds():
    net = _net(True)
    xs = _inputs(2)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        bad, errors = concurrent_mismatches(net, xs, threads=6, rounds=1)
        assert not errors and bad == 0


def test_the_check_catches_shared_buffers(monkeypatch):
    """With programs shared between threads (the old design), the same check fails."""
    shared = {}

    def shared_program(self, shape):
        key = (id(self), shape, self._device, core._revision[0])
        prog = shared.get(key)
        if prog is None:
            with core._build_lock:
                prog = shared[key] = core.Program(self, shape, dnn.ops.backend("cpu"))
        return prog
    net = _net(False)
    xs = [x for x in _inputs(3) if x.shape == (1, 3, 16, 16)] * 4
    xs = [x + i for i, x in enumerate(xs)]
    monkeypatch.setattr(core.Node, "_program", shared_program)
    for _ in range(40):
        bad, errors = concurrent_mismatches(net, xs, threads=8, rounds=2)
        if bad:
            break
    assert bad > 0


def test_kernel_teams_shrink_with_concurrent_forwards(monkeypatch):
    seen = []
    real = cpu._cpu_conv.set_num_threads
    monkeypatch.setattr(cpu, "_budget", [4])
    monkeypatch.setattr(cpu._cpu_conv, "set_num_threads", lambda n: (seen.append(n), real(n)))
    cpu.begin_run()
    try:
        t = threading.Thread(target=lambda: (cpu.begin_run(), cpu.end_run()))
        t.start()
        t.join()
    finally:
        cpu.end_run()
    assert seen[:2] == [4, 2]            # alone: the whole budget; two at once: half each
    real(cpu.get_num_threads())


def test_changing_a_net_that_another_thread_runs_is_refused():
    net = _net(False)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    stop = threading.Event()
    ready = threading.Event()

    def spin():
        while not stop.is_set():
            net.forward(x)
            ready.set()
    t = threading.Thread(target=spin)
    t.start()
    ready.wait(30)
    refused = 0
    try:
        for _ in range(200):
            try:
                dnn.fuse(net)
            except RuntimeError as e:
                assert "another thread is running a forward" in str(e)
                refused += 1
                break
    finally:
        stop.set()
        t.join()
    assert refused == 1


def test_every_kernel_module_shares_one_worker_pool():
    """parallel.h's pool is one per process: the first kernel module imported publishes it
    and the others adopt it (a pool per module left the last module's workers spinning on
    the cores the next module's team needed). Then a forward that alternates modules (conv,
    depthwise, pooling, add) creates at most team - 1 worker threads in all."""
    import subprocess
    import sys
    code = (
        "import threading, numpy as np, minidnn as dnn\n"
        "from minidnn.backends import cpu\n"
        "mods = [m for m in cpu.KERNEL_MODULES if hasattr(m, '_pool_address')]\n"
        "assert len(mods) >= 5, mods\n"
        "assert len({m._pool_address() for m in mods}) == 1\n"
        "cpu.set_num_threads(3)\n"
        "x = dnn.tag1(dnn.con(32, 3, 3, 1, 1, dnn.input_tensor()))\n"
        "x = dnn.con(32, 3, 3, 1, 1, x, groups=32)\n"
        "x = dnn.max_pool(3, 3, 1, 1, dnn.con(32, 3, 3, 1, 1, x))\n"
        "net = dnn.relu(dnn.add_prev1(x))\n"
        "import os\n"
        "n0 = len(os.listdir('/proc/self/task'))\n"
        "net.forward(np.random.rand(2, 3, 64, 64).astype(np.float32))\n"
        "n1 = len(os.listdir('/proc/self/task'))\n"
        "assert n1 - n0 <= 2, (n0, n1)\n"
        "print('ok', n0, n1)\n")
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("no /proc/self/task here")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr

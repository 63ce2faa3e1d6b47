"""dnn_trainer, the solvers, batch-norm's running statistics, fuse after training,
the synchronization file (including a training killed and resumed), bad input."""
import io
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import minidnn as dnn
from minidnn.train import _steps_without_decrease, _steps_without_decrease_robust, _Tape

import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blobs(n=192, k=3, seed=0):
    """A small separable problem: class c has a bright c-th quadrant in a 1x6x6 image."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(0, 0.3, (n, 1, 6, 6)).astype(np.float32)
    for c in range(k):
        r, q = divmod(c, 2)
        x[y == c, 0, 3 * r:3 * r + 3, 3 * q:3 * q + 3] += 1.0
    return x, y


def small_net(k=3):
    return dnn.loss_multiclass_log(dnn.fc(k, dnn.relu(dnn.bn_fc(dnn.fc(16, dnn.max_pool(2, 2, 2, 2,
        dnn.relu(dnn.bn_con(dnn.con(6, 3, 3, 1, 1, dnn.input_tensor())))))))))


def trainer_for(net, solver=None, **settings):
    t = dnn.dnn_trainer(net, solver or dnn.sgd(), verbose=False)
    t.learning_rate = settings.pop("learning_rate", 0.05)
    t.mini_batch_size = settings.pop("mini_batch_size", 32)
    t.max_num_epochs = settings.pop("max_num_epochs", 8)
    for k, v in settings.items():
        setattr(t, k, v)
    return t


def params(net):
    out = {}
    for i, n in enumerate(net.chain()):
        l = n.layer_details()
        for name in tuple(l.params) + ("running_mean", "running_var"):
            a = getattr(l, name, None)
            if a is not None:
                out[f"{i}.{name}"] = a.copy()
    return out


# ------------------------------------------------------------------ training works
@pytest.mark.parametrize("solver", [dnn.sgd(), dnn.adam()], ids=["sgd", "adam"])
def test_trains_a_classifier(solver):
    x, y = blobs()
    net = small_net()
    t = trainer_for(net, solver, learning_rate=0.05 if solver.name == "sgd" else 0.01)
    t.train(x, y)
    assert t.epoch == 8 and t.get_train_one_step_calls() == 8 * 6
    assert t.get_average_loss() < 0.1
    xt, yt = blobs(seed=1)
    assert (net(xt) == yt).mean() >= 0.95


def test_regression_mean_squared():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 2, 2, 2)).astype(np.float32)
    w = rng.standard_normal((8, 2))
    y = (x.reshape(256, -1) @ w).astype(np.float32)            # (N, 2) targets
    net = dnn.loss_mean_squared(dnn.fc(2, dnn.input_tensor()))
    t = trainer_for(net, dnn.adam(), learning_rate=0.05, max_num_epochs=60)
    t.train(x, y)
    out = net(x)
    assert out.shape == (256, 2)
    assert np.abs(out - y).max() < 0.05
    one = dnn.loss_mean_squared(dnn.fc(1, dnn.input_tensor()))
    trainer_for(one, dnn.sgd(weight_decay=0), learning_rate=0.02, max_num_epochs=30).train(x, y[:, 0])
    assert one(x).shape == (256,)
    assert np.abs(one(x) - y[:, 0]).max() < 0.1


def test_deterministic_with_a_seed():
    x, y = blobs()
    a, b = small_net(), small_net()
    trainer_for(a, max_num_epochs=3).train(x, y)
    trainer_for(b, max_num_epochs=3).train(x, y)
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_sgd_matches_dlib_formula():
    w = np.array([1.0, -2.0, 0.5], np.float32)
    g = np.array([0.1, 0.2, -0.3], np.float32)
    s = dnn.sgd(weight_decay=0.01, momentum=0.9)
    w0 = w.copy()
    s.update("k", w, g, 0.1, True)
    v = -0.1 * (0.01 * w0 + g)
    np.testing.assert_allclose(w, w0 + v, rtol=1e-6)
    w1 = w.copy()
    s.update("k", w, g, 0.1, True)
    np.testing.assert_allclose(w, w1 + 0.9 * v - 0.1 * (0.01 * w1 + g), rtol=1e-6)


def test_adam_matches_formula():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(5).astype(np.float32)
    ref, m, v = w.astype(np.float64), np.zeros(5), np.zeros(5)
    a = dnn.adam(weight_decay=0.1, beta1=0.8, beta2=0.99)
    for t in range(1, 4):
        g = rng.standard_normal(5).astype(np.float32)
        a.update("k", w, g, 0.01, True)
        h = g + 0.1 * ref
        m = 0.8 * m + 0.2 * h
        v = 0.99 * v + 0.01 * h * h
        ref = ref - 0.01 * np.sqrt(1 - 0.99 ** t) / (1 - 0.8 ** t) * m / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)


def test_weight_decay_only_on_weights():
    net = dnn.loss_multiclass_log(dnn.fc(2, dnn.input_tensor()))
    x = np.zeros((4, 1, 1, 3), np.float32)                      # zero input: zero weight gradient
    y = np.array([0, 1, 0, 1])
    net.subnet().forward(x)
    fc = net.subnet().layer_details()
    fc.weights[...] = 1.0
    t = trainer_for(net, dnn.sgd(weight_decay=0.1, momentum=0), learning_rate=0.5, max_num_epochs=1,
                    mini_batch_size=4)
    t.train(x, y)
    np.testing.assert_allclose(fc.weights, 1 - 0.5 * 0.1, rtol=1e-6)   # decayed
    assert np.allclose(fc.biases, 0)     # the bias gradient is 0 here (balanced labels), no decay


# ------------------------------------------------------------------ batch-norm
def test_bn_running_statistics_follow_dlib():
    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 2, 3, 3)).astype(np.float32)
    net = dnn.bn_con(dnn.input_tensor())
    net.forward(x)
    bn = net.layer_details()
    tape = _Tape(net)
    tape.forward(x)                                 # first update: factor 1
    v = x.transpose(1, 0, 2, 3).reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(bn.running_mean, v.mean(1), rtol=1e-5)
    np.testing.assert_allclose(bn.running_var, v.var(1, ddof=1), rtol=1e-5)
    x2 = (x * 0.5 + 1).astype(np.float32)
    tape.forward(x2)                                # second: factor 1/2
    v2 = x2.transpose(1, 0, 2, 3).reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(bn.running_mean, (v.mean(1) + v2.mean(1)) / 2, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var, (v.var(1, ddof=1) + v2.var(1, ddof=1)) / 2, rtol=1e-5)
    assert bn.num_updates == 2
    tape.forward(x, update_stats=False)            # a gradient check's forward leaves them alone
    assert bn.num_updates == 2
    w = bn.running_stats_window_size
    bn.num_updates = w                              # the window is full: factor 1/(window + 1)
    before = bn.running_mean.copy()
    tape.forward(x)
    assert bn.num_updates == w
    np.testing.assert_allclose(bn.running_mean, before + (v.mean(1) - before) / (w + 1), rtol=1e-5)


def test_inference_after_training_uses_running_statistics_and_fuses_exactly():
    x, y = blobs()
    net = small_net()
    trainer_for(net).train(x, y)
    out = net.forward(x)
    R.assert_close(out, R.forward(net, x))          # the reference uses the running statistics
    labels = net(x)
    dnn.fuse(net)
    fused = net.forward(x)
    R.assert_close(fused, R.forward(net, x))
    R.assert_close(fused, out.astype(np.float64))
    assert (net(x) == labels).all()
    kinds = [n.layer_details().kind for n in net.chain()]
    assert "bn_con" not in kinds and "bn_fc" not in kinds


def test_trained_net_serializes():
    x, y = blobs()
    net = small_net()
    trainer_for(net, max_num_epochs=2).train(x, y)
    buf = io.BytesIO()
    dnn.serialize(net, buf)
    back = dnn.deserialize(io.BytesIO(buf.getvalue()))
    np.testing.assert_array_equal(back.forward(x), net.forward(x))


def test_loss_mean_squared_serializes():
    net = dnn.loss_mean_squared(dnn.fc(2, dnn.input_tensor()))
    x = np.ones((3, 1, 2, 2), np.float32)
    net(x)
    buf = io.BytesIO()
    dnn.serialize(net, buf)
    back = dnn.deserialize(io.BytesIO(buf.getvalue()))
    assert isinstance(back.layer_details(), dnn.loss_mean_squared_)
    np.testing.assert_array_equal(back(x), net(x))


# ------------------------------------------------------------------ learning rate schedule
def test_steps_without_decrease():
    rng = np.random.default_rng(0)
    assert _steps_without_decrease(np.linspace(10, 1, 200) + rng.normal(0, 0.1, 200)) < 20
    flat = rng.normal(0, 1, 300)
    assert _steps_without_decrease(flat) > 250
    assert _steps_without_decrease_robust(flat) > 200
    spiky = np.linspace(5, 1, 300)
    spiky[::25] += 50                                # spikes do not hide a decrease from the robust test
    assert _steps_without_decrease_robust(spiky) < 30


def test_learning_rate_shrinks_on_a_plateau_and_training_stops():
    # blank images, balanced labels: the initial zero biases are already optimal, so there is
    # no progress to make on any machine, whatever its thread count does to the last bits
    x = np.zeros((63, 1, 6, 6), np.float32)
    y = np.arange(63) % 3
    net = small_net()
    t = trainer_for(net, dnn.sgd(momentum=0), learning_rate=1e-3, mini_batch_size=8,
                    max_num_epochs=400, iterations_without_progress_threshold=30,
                    learning_rate_shrink_factor=0.1, min_learning_rate=2e-5)
    t.train(x, y)
    assert t.learning_rate < 2e-5                   # shrunk twice: 1e-3 -> 1e-4 -> 1e-5 < min
    assert t.epoch < 400                            # and that stopped the training


def test_train_one_step():
    x, y = blobs(n=64)
    net = small_net()
    t = trainer_for(net, learning_rate=0.05)
    losses = [t.train_one_step(x, y) for _ in range(30)]
    assert t.get_train_one_step_calls() == 30
    assert losses[-1] < losses[0] / 2
    with pytest.raises(ValueError, match="outside"):
        t.train_one_step(x, y + 5)


def test_settings_are_validated():
    t = dnn.dnn_trainer(small_net(), verbose=False)
    for name, bad in [("learning_rate", 0), ("learning_rate", float("nan")), ("mini_batch_size", 0),
                      ("mini_batch_size", 2.5), ("max_num_epochs", -1),
                      ("learning_rate_shrink_factor", 1.5), ("min_learning_rate", -1),
                      ("iterations_without_progress_threshold", 0)]:
        with pytest.raises(ValueError, match=name):
            setattr(t, name, bad)
    t.set_learning_rate(0.5)
    assert t.get_learning_rate() == 0.5 == t.learning_rate
    with pytest.raises(ValueError, match="momentum"):
        dnn.sgd(momentum=1.5)
    with pytest.raises(ValueError, match="beta"):
        dnn.adam(beta1=1.0)


# ------------------------------------------------------------------ errors
def test_bad_labels():
    x, y = blobs(n=40)
    t = trainer_for(small_net())
    with pytest.raises(ValueError, match="40 samples but 39 labels"):
        t.train(x, y[:-1])
    bad = y.copy()
    bad[7] = 3
    with pytest.raises(ValueError, match=r"label 3 of sample 7 is outside \[0, 3\)"):
        t.train(x, bad)
    bad[7] = -1
    with pytest.raises(ValueError, match="outside"):
        t.train(x, bad)
    with pytest.raises(ValueError, match="integers"):
        t.train(x, y + 0.5)
    with pytest.raises(ValueError, match="one per sample"):
        t.train(x, np.stack([y, y], 1))


def test_bad_targets_for_mean_squared():
    x = np.ones((10, 1, 2, 2), np.float32)
    t = trainer_for(dnn.loss_mean_squared(dnn.fc(2, dnn.input_tensor())))
    with pytest.raises(ValueError, match="expected 2 target values per sample"):
        t.train(x, np.ones(10))
    with pytest.raises(ValueError, match="NaN"):
        t.train(x, np.full((10, 2), np.nan))


def test_bad_input():
    x, y = blobs(n=40)
    t = trainer_for(small_net())
    with pytest.raises(ValueError, match="float32"):
        t.train(x.astype(np.float64), y)
    x[3, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        t.train(x, y)
    with pytest.raises(ValueError, match="loss layer"):
        dnn.dnn_trainer(dnn.fc(2, dnn.input_tensor()))


def test_diverging_training_stops_with_a_clear_error():
    x, y = blobs(n=64)
    t = trainer_for(dnn.loss_multiclass_log(dnn.fc(3, dnn.input_tensor())), dnn.sgd(momentum=0.9),
                    learning_rate=1e30, max_num_epochs=50)
    with pytest.raises(FloatingPointError, match="diverged"):
        t.train(x * 1e10, y)


def test_gpu_net_is_refused():
    net = small_net()
    for n in net.chain():           # what net.to("cuda") sets, without needing a GPU here
        n._device = "cuda"
    with pytest.raises(NotImplementedError, match="GPU training is not supported yet"):
        dnn.dnn_trainer(net)
    cpu = small_net()
    t = dnn.dnn_trainer(cpu, verbose=False)
    for n in cpu.chain():
        n._device = "cuda"
    with pytest.raises(NotImplementedError, match="GPU training is not supported yet"):
        t.train(*blobs(n=8))


def test_progress_bar_and_quiet(capsys):
    x, y = blobs(n=32)
    t = dnn.dnn_trainer(small_net(), verbose=True)
    t.max_num_epochs = 2
    t.train(x, y)
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "loss" in err and "lr 0.01" in err
    t = dnn.dnn_trainer(small_net(), verbose=False)
    t.max_num_epochs = 2
    t.train(x, y)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ synchronization
def test_sync_file_is_pickle_free_and_resumes(tmp_path):
    x, y = blobs()
    path = tmp_path / "train.sync"
    net = small_net()
    t = trainer_for(net, dnn.adam(), learning_rate=0.01, max_num_epochs=2)
    t.set_synchronization_file(path, interval_seconds=0)
    t.train(x, y)
    with np.load(path, allow_pickle=False) as z:        # arrays only: no pickle anywhere
        assert "net" in z.files and "state" in z.files
        saved = dnn.deserialize(io.BytesIO(z["net"].tobytes()))
    np.testing.assert_array_equal(saved.forward(x), net.forward(x))
    # a new trainer with the same file continues from epoch 2, up to the new maximum
    net2 = small_net()
    t2 = trainer_for(net2, dnn.adam(), learning_rate=0.01, max_num_epochs=4)
    t2.set_synchronization_file(path)
    t2.train(x, y)
    assert t2.epoch == 4 and t2.get_train_one_step_calls() == 4 * 6
    # == training 4 epochs in one go
    net3 = small_net()
    trainer_for(net3, dnn.adam(), learning_rate=0.01, max_num_epochs=4).train(x, y)
    p2, p3 = params(net2), params(net3)
    for k in p3:
        np.testing.assert_array_equal(p2[k], p3[k], err_msg=k)


def test_sync_file_of_another_net_is_refused(tmp_path):
    x, y = blobs(n=40)
    path = tmp_path / "train.sync"
    t = trainer_for(small_net(), max_num_epochs=1)
    t.set_synchronization_file(path)
    t.train(x, y)
    other = trainer_for(dnn.loss_multiclass_log(dnn.fc(3, dnn.input_tensor())), max_num_epochs=1)
    other.set_synchronization_file(path)
    with pytest.raises(ValueError, match="another net"):
        other.train(x, y)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable synchronization file"):
        t.train(x, y)


_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import minidnn as dnn
    from test_train import blobs, small_net, params, trainer_for
    sync, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    x, y = blobs()
    net = small_net()
    t = trainer_for(net, dnn.sgd(), max_num_epochs=epochs)
    t.set_synchronization_file(sync, interval_seconds=0)
    step = t._step
    def one_step(xb, yb):
        loss = step(xb, yb)
        if t.get_train_one_step_calls() == kill_at:      # killed after the update, before its sync
            os.kill(os.getpid(), signal.SIGKILL)
        return loss
    t._step = one_step
    t.train(x, y)
    np.savez(out, **params(net))
""")


def _run(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_killed_training_resumes_where_it_left_off(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(_SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    # uninterrupted
    r = _run(script, tmp_path / "a.sync", tmp_path / "a.npz", 0)
    assert r.returncode == 0, r.stderr
    # killed in the middle of epoch 2 (step 9 of 24), then started again with the same file
    r = _run(script, tmp_path / "b.sync", tmp_path / "b.npz", 9)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (tmp_path / "b.sync").exists() and not (tmp_path / "b.npz").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    r = _run(script, tmp_path / "b.sync", tmp_path / "b.npz", 0)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_training_killed_from_outside_resumes(tmp_path):
    """SIGKILL at an arbitrary moment (maybe while a checkpoint is being written): the
    file left behind is a whole checkpoint, and resuming from it gives the same net."""
    import time
    script = tmp_path / "train_script.py"
    script.write_text(_SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    epochs = 30
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(sync, out):
        return subprocess.Popen([sys.executable, str(script), str(sync), str(out), "0",
                                 str(epochs)], env=env, cwd=ROOT, stderr=subprocess.PIPE)

    def wait_for(path, p):
        deadline = time.monotonic() + 120
        while not path.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return time.monotonic()

    # uninterrupted, timing the span between the first checkpoint and the end
    p = start(tmp_path / "a.sync", tmp_path / "a.npz")
    t0 = wait_for(tmp_path / "a.sync", p)
    _, err = p.communicate(timeout=300)
    span = time.monotonic() - t0
    assert p.returncode == 0, err
    # killed somewhere in the middle of that span; a machine that ran faster this time
    # finishes first, and the next try kills sooner
    for attempt in range(4):
        sync, out = tmp_path / f"b{attempt}.sync", tmp_path / f"b{attempt}.npz"
        p = start(sync, out)
        wait_for(sync, p)
        time.sleep(span * 0.4 / 2 ** attempt)
        p.kill()
        p.wait(timeout=60)
        p.stderr.close()
        if p.returncode != 0 and not out.exists():
            break
    else:
        pytest.fail(f"the training (about {span:.2f} s) always finished before it was killed")
    assert p.returncode == -signal.SIGKILL
    assert sync.exists()
    r = _run(script, sync, out, 0, epochs)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "a.npz") as a, np.load(out) as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_demo_trains_fuses_and_reloads(capsys):
    """python -m minidnn demo: >= 97% held-out accuracy, unchanged by fusing and reloading."""
    from minidnn.__main__ import main
    assert main(["demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    acc = [float(line.split(":")[1].split("%")[0]) for line in out.splitlines()
           if line.startswith("held-out accuracy")]
    assert len(acc) == 2 and min(acc) >= 97.0 and acc[0] == acc[1]
    assert "largest output difference 0" in out          # the reloaded net is the same

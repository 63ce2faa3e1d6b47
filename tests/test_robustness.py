"""No silent wrong answers: what a new or adversarial user runs into (issue 16), one
section per item: rebound parameters, memory errors, reruns of a training, temporary
files, NaN inputs, construction checks, the CLI's arguments, endless streams."""
import fcntl
import io
import json
import os
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import minidnn as dnn

ser = sys.modules["minidnn.serialize"]


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- 1. parameters rebound
def test_rebinding_a_parameter_is_seen_by_every_later_forward_and_save():
    net = dnn.con(3, 3, 3, 1, 1, dnn.input_tensor())
    x2, x5 = rand(2, 2, 6, 6), rand(5, 2, 6, 6)
    net.forward(x2)
    net.forward(x5)                                  # two compiled programs
    con = net.layer_details()
    new = rand(*con.filters.shape, seed=9)
    con.filters = new
    assert con.filters is not new and np.array_equal(con.filters, new)   # the layer owns a copy
    for x in (x2, x5):                               # both batch sizes see it
        np.testing.assert_array_equal(net.forward(x), dnn.Node(_con_with(con), dnn.input_tensor()).forward(x))
    back = dnn.deserialize(dnn.serialize(net))
    np.testing.assert_array_equal(back.layer_details().filters, new)
    np.testing.assert_array_equal(back.forward(x2), net.forward(x2))


def _con_with(con):
    c = dnn.con_(con.num_filters, con.nr, con.nc, con.stride_y, con.stride_x, con.padding_y,
                 con.padding_x, con.bias)
    c.set_array("filters", con.filters.copy())
    c.set_array("biases", None if con.biases is None else con.biases.copy())
    return c


def test_rebinding_validates_shape_dtype_and_none():
    net = dnn.fc(4, dnn.input_tensor())
    net.forward(rand(1, 3, 2, 2))
    fc = net.layer_details()
    with pytest.raises(dnn.LayerError, match=r"fc: weights must have shape \(4, 12\), got \(4, 11\)"):
        fc.weights = np.zeros((4, 11), np.float32)
    with pytest.raises(dnn.LayerError, match="fc: weights cannot be None"):
        fc.weights = None
    with pytest.raises(dnn.LayerError, match="must be a float32 array, got dtype complex64"):
        fc.weights = np.zeros((4, 12), np.complex64)
    with pytest.raises(dnn.LayerError, match="must have 2 dimensions"):
        fc.weights = np.zeros(48, np.float32)
    fc.weights = np.ones((4, 12))                    # float64: converted (documented rule)
    assert fc.weights.dtype == np.float32 and fc.weights.flags.c_contiguous
    fc.biases = np.arange(8, dtype=np.float32)[::2]  # not contiguous: copied
    assert fc.biases.flags.c_contiguous
    np.testing.assert_allclose(net.forward(np.ones((1, 3, 2, 2), np.float32)).ravel(),
                               12 + np.arange(0, 8, 2))
    nobias = dnn.fc(2, dnn.input_tensor(), bias=False)
    nobias.forward(rand(1, 1, 1, 3))
    with pytest.raises(dnn.LayerError, match=r"has no biases \(bias=False\)"):
        nobias.layer_details().biases = np.zeros(2, np.float32)


def test_rebinding_before_the_first_forward_is_checked_against_the_settings():
    con = dnn.con_(4, 3, 3)
    with pytest.raises(dnn.LayerError, match=r"con: filters must have shape \(4, \?, 3, 3\)"):
        con.filters = np.zeros((4, 2, 5, 5), np.float32)
    con.filters = np.ones((4, 2, 3, 3), np.float32)
    con.biases = np.zeros(4, np.float32)
    net = dnn.Node(con, dnn.input_tensor())
    assert net.forward(np.ones((1, 2, 3, 3), np.float32))[0, :, 1, 1].tolist() == [18.0] * 4


@pytest.mark.gpu
def test_rebinding_reaches_the_gpu():
    net = dnn.fc(3, dnn.input_tensor())
    x = rand(2, 2, 2, 2)
    net.forward(x)
    net.to("cuda")
    net.forward(x)
    net.layer_details().weights = np.zeros((3, 8), np.float32)
    assert not net.forward(x).any() or np.allclose(net.forward(x), net.layer_details().biases)


# ---------------------------------------------------------------- 2. out of memory
@pytest.mark.parametrize("make,shape,where", [
    (lambda: dnn.fc(1_000_000, dnn.input_tensor()), (1, 3, 224, 224), r"layer<0> fc"),
    (lambda: dnn.con(100000, 11, 11, 1, 1, dnn.input_tensor(), padding_y=0, padding_x=0),
     (1, 3000, 12, 12), r"layer<0> con"),
])
def test_out_of_memory_is_a_memory_error_naming_the_layer(make, shape, where):
    net = make()
    x = np.broadcast_to(np.float32(0), shape)        # no memory of its own
    with pytest.raises(MemoryError, match=where + ": out of memory"):
        net.forward(x)


def test_an_input_too_large_to_copy_is_a_memory_error():
    net = dnn.relu(dnn.input_tensor())
    x = np.broadcast_to(np.float32(1), (1_000_000, 3, 224, 224))
    with pytest.raises(MemoryError, match=r"layer<1> input_tensor: out of memory"):
        net.forward(x)
    assert net.forward(np.ones((1, 1, 2, 2), np.float32)).sum() == 4      # still usable


# ---------------------------------------------------------------- 3. reruns of a training
def _trainer(net=None, epochs=2, seed=0):
    net = net or dnn.loss_multiclass_log(dnn.fc(3, dnn.relu(dnn.fc(8, dnn.input_tensor()))))
    t = dnn.dnn_trainer(net, dnn.sgd(), seed=seed, verbose=False, stream=io.StringIO())
    t.learning_rate, t.mini_batch_size, t.max_num_epochs = 0.05, 16, epochs
    return t


def _data(seed=0, n=48):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 2, 2)).astype(np.float32), rng.integers(0, 3, n)


def test_a_rerun_says_training_had_finished(tmp_path):
    x, y = _data()
    path = tmp_path / "t.sync"
    t = _trainer()
    t.set_synchronization_file(path)
    t.train(x, y)
    again = _trainer()
    again.set_synchronization_file(path)
    again.train(x, y)
    msg = again.stream.getvalue()
    assert "training already finished" in msg and str(path) in msg
    np.testing.assert_array_equal(again.net.forward(x), t.net.forward(x))


def test_a_resumed_run_says_where_it_resumes(tmp_path):
    x, y = _data()
    path = tmp_path / "t.sync"
    t = _trainer(epochs=1)
    t.set_synchronization_file(path)
    t.train(x, y)
    more = _trainer(epochs=3)
    more.set_synchronization_file(path)
    more.train(x, y)
    out = more.stream.getvalue()
    assert f"resuming from {path} at epoch 2, step 3" in out
    assert "max_num_epochs 1 -> 3" in out


def test_new_labels_of_the_same_shape_are_refused(tmp_path):
    x, y = _data()
    path = tmp_path / "t.sync"
    t = _trainer()
    t.set_synchronization_file(path)
    t.train(x, y)
    other = _trainer()
    other.set_synchronization_file(path)
    with pytest.raises(ValueError, match=r"the labels \(a hash of their bytes\)"):
        other.train(x, (y + 1) % 3)
    with pytest.raises(ValueError, match=r"the data x \(a hash"):
        other.train(x + 1, y)
    forced = _trainer()
    forced.set_synchronization_file(path)
    forced.train(x, (y + 1) % 3, ignore_fingerprint=True)
    assert "training already finished" in forced.stream.getvalue()


def _edit_sync(path, edit):
    """Rewrite a synchronisation file with edit(state dict, arrays dict) applied."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    state = json.loads(arrays["state"].tobytes().decode())
    edit(state, arrays)
    arrays["state"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("edit,what", [
    (lambda s, a: s.pop("epoch"), "the state has no 'epoch'"),
    (lambda s, a: s.update(pos=10 ** 6), "pos 1000000 is not in"),
    (lambda s, a: s.update(steps="many"), "steps 'many' is not an integer"),
    (lambda s, a: s.update(rng={"bit_generator": "nope"}), "the RNG state is not one"),
    (lambda s, a: a.update({k: v[:-1] for k, v in a.items() if k.startswith("solver/") and k.endswith("/v")}),
     "solver state .* has shape"),
    (lambda s, a: [a.pop(k) for k in [k for k in a if k.startswith("solver/")]], "has \\[\\], expected"),
    (lambda s, a: s.update(solver_keys=[]), "no solver state for"),
    (lambda s, a: a.update(perm=np.zeros(48, np.int64)), "perm is not a permutation"),
    (lambda s, a: s.update(epoch_loss=[1.0]), "epoch_loss is not"),
])
def test_a_hand_edited_checkpoint_is_inconsistent(tmp_path, edit, what):
    x, y = _data()
    path = tmp_path / "t.sync"
    t = _trainer(epochs=3)
    t.set_synchronization_file(path, interval_seconds=0)
    t.max_num_epochs = 1
    t.train(x, y)
    _edit_sync(path, lambda s, a: (a.__setitem__("perm", np.arange(48, dtype=np.int64)),
                                   s.update(pos=16)))
    _edit_sync(path, edit)
    again = _trainer(epochs=3)
    again.set_synchronization_file(path)
    with pytest.raises(ValueError, match="inconsistent checkpoint .*" + what):
        again.train(x, y)


# ---------------------------------------------------------------- 4. temporary files
def test_a_killed_saves_temp_file_is_removed_by_the_next_save(tmp_path):
    net = dnn.relu(dnn.input_tensor())
    target = tmp_path / "net.mdnn"
    stale = tmp_path / ".net.mdnn.0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    other = tmp_path / ".other.mdnn.0123abcd.tmp"     # another target's: not ours to remove
    other.write_bytes(b"y")
    mine = tmp_path / "notes.tmp"
    mine.write_bytes(b"z")
    dnn.serialize(net, target)
    assert sorted(os.listdir(tmp_path)) == [".other.mdnn.0123abcd.tmp", "net.mdnn", "notes.tmp"]


def test_a_temp_file_of_a_live_save_is_kept(tmp_path):
    target = tmp_path / "net.mdnn"
    live = tmp_path / ".net.mdnn.feedbeef.tmp"
    live.write_bytes(b"in progress")
    fd = os.open(live, os.O_RDWR)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "print('locked', flush=True); time.sleep(30)", str(live)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        dnn.serialize(dnn.relu(dnn.input_tensor()), target)
        assert live.exists()
    finally:
        holder.kill()
        holder.wait()
        os.close(fd)
    dnn.serialize(dnn.relu(dnn.input_tensor()), target)
    assert not live.exists()


def test_saving_to_a_directory_or_nothing_names_the_path(tmp_path):
    net = dnn.relu(dnn.input_tensor())
    with pytest.raises(IsADirectoryError, match=f"cannot save to {str(tmp_path)!r}: it is a directory"):
        dnn.serialize(net, str(tmp_path))
    with pytest.raises(IsADirectoryError, match="cannot save to ''"):
        dnn.serialize(net, "")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dnn.serialize(net, str(tmp_path / "no" / "such" / "net.mdnn"))
    assert os.listdir(tmp_path) == []


def test_a_read_only_target_is_refused_unless_overwrite(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write read-only files; os.access says so")
    net = dnn.relu(dnn.input_tensor())
    target = tmp_path / "net.mdnn"
    target.write_bytes(b"old")
    target.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only .*overwrite=True"):
        dnn.serialize(net, target)
    assert target.read_bytes() == b"old"
    dnn.serialize(net, target, overwrite=True)
    assert dnn.deserialize(target).layer_details().kind == "relu"


def test_read_only_check_without_root_privileges(tmp_path, monkeypatch):
    """The read-only rule through os.access, whoever runs the tests."""
    net = dnn.relu(dnn.input_tensor())
    target = tmp_path / "net.mdnn"
    target.write_bytes(b"old")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(target) and
                        mode == os.W_OK else real(p, mode))
    with pytest.raises(PermissionError, match="read-only"):
        dnn.serialize(net, target)
    assert target.read_bytes() == b"old"
    dnn.serialize(net, target, overwrite=True)
    assert target.read_bytes() != b"old"


# ---------------------------------------------------------------- 5. NaN and inf
def test_a_nan_sample_gets_no_label():
    net = dnn.loss_multiclass_log(dnn.fc(4, dnn.input_tensor()))
    x = rand(3, 1, 2, 2)
    net(x)
    x[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"output for sample 1 is not finite"):
        net(x)
    x[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"sample 1"):
        net(x)
    assert np.isnan(net.forward(np.where(np.isinf(x), np.nan, x))[1]).all()   # forward: the numbers
    net.layer_details().check_finite = False
    assert net(x).shape == (3,)


# ---------------------------------------------------------------- 6. construction checks
def test_construction_checks_like_dlibs():
    with pytest.raises(ValueError, match=r"con: padding \(3, 1\) must be smaller than the filter \(3, 3\)"):
        dnn.con(2, 3, 3, 1, 1, dnn.input_tensor(), padding_y=3, padding_x=1)
    with pytest.raises(ValueError, match="con: bias must be True or False, got 'no'"):
        dnn.con(2, 3, 3, 1, 1, dnn.input_tensor(), bias="no")
    with pytest.raises(ValueError, match="fc: bias must be True or False"):
        dnn.fc(2, dnn.input_tensor(), bias=0)
    with pytest.raises(ValueError, match="a loss layer .* can only be the top"):
        dnn.relu(dnn.loss_multiclass_log(dnn.fc(2, dnn.input_tensor())))
    with pytest.raises(ValueError, match="bn: eps must be a finite number"):
        dnn.bn_con(dnn.input_tensor(), eps=0)
    with pytest.raises(ValueError, match="max_pool: stride_y must be an integer >= 1"):
        dnn.max_pool(2, 2, True, 1, dnn.input_tensor())


# ---------------------------------------------------------------- 7. the command line
def _cli(*args, exe=(sys.executable, "-m", "minidnn")):
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,what", [
    (("bench", "--batch", "-1"), "--batch"), (("demo", "--epochs", "0"), "--epochs"),
    (("bench", "--repeat", "0"), "--repeat"), (("bench", "--shape", "0,1,1"), "--shape"),
    (("frobnicate",), "invalid choice"), (("fuse", "a.mdnn"), "required"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, what):
    r = _cli(*args)
    assert r.returncode == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("python -m minidnn")


def test_the_script_names_itself():
    exe = os.path.join(os.path.dirname(sys.executable), "minidnn")
    if not os.path.exists(exe):
        pytest.skip("the minidnn script is not installed beside this Python")
    r = _cli("--help", exe=(exe,))
    assert r.returncode == 0 and r.stdout.startswith("usage: minidnn ")


def test_bench_a_fused_net_and_its_stored_shape(tmp_path):
    net = dnn.relu(dnn.bn_con(dnn.con(4, 3, 3, 1, 1, dnn.input_tensor())))
    net.forward(rand(1, 2, 9, 7))
    dnn.fuse(net)
    dnn.serialize(net, tmp_path / "f.mdnn")
    r = _cli("bench", str(tmp_path / "f.mdnn"), "--repeat", "2")
    assert r.returncode == 0, r.stderr
    assert "input (1, 2, 9, 7)" in r.stdout and "as saved (already fused)" in r.stdout
    assert "unfused" not in r.stdout
    info = _cli("info", str(tmp_path / "f.mdnn"))
    assert "input 2x9x7" in info.stdout
    fresh = dnn.relu(dnn.input_tensor())
    dnn.serialize(fresh, tmp_path / "new.mdnn")
    r = _cli("bench", str(tmp_path / "new.mdnn"))
    assert r.returncode == 2 and "give --shape K,R,C" in r.stderr


def test_bench_reports_memory_errors(tmp_path):
    dnn.serialize(dnn.fc(1_000_000, dnn.input_tensor()), tmp_path / "big.mdnn")
    r = _cli("bench", str(tmp_path / "big.mdnn"), "--shape", "3,224,224")
    assert r.returncode == 1 and "out of memory" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- 9. endless streams
def test_an_endless_stream_is_not_read_without_bound():
    with open("/dev/zero", "rb") as f:
        with pytest.raises(dnn.SerializationError, match="wrong magic"):
            dnn.deserialize(f)
    with pytest.raises(dnn.SerializationError, match="wrong magic"):
        dnn.deserialize("/dev/zero")

    class Endless(io.RawIOBase):
        """A valid header, then zeros forever (counting what is read)."""
        def __init__(self, head):
            self.head, self.read_bytes = head, 0

        def readable(self):
            return True

        def readinto(self, b):
            n = len(b)
            chunk = (self.head + bytes(n))[:n]
            self.head = self.head[n:]
            b[:n] = chunk
            self.read_bytes += n
            return n

    good = dnn.serialize(dnn.relu(dnn.input_tensor()))
    stream = Endless(good[:24])
    with pytest.raises(dnn.SerializationError):
        dnn.deserialize(io.BufferedReader(stream))
    assert stream.read_bytes < 1 << 20
    huge = bytearray(good[:24])
    huge[16:24] = (1 << 62).to_bytes(8, "little")
    stream = Endless(bytes(huge))
    with pytest.raises(dnn.SerializationError, match="exceeds what a stream may hold"):
        dnn.deserialize(io.BufferedReader(stream))


def test_bytes_round_trip():
    net = dnn.fc(2, dnn.input_tensor())
    net.forward(rand(1, 1, 1, 3))
    data = dnn.serialize(net)
    assert isinstance(data, bytes) and dnn.serialize(dnn.deserialize(data)) == data
    assert dnn.serialize(dnn.deserialize(bytearray(data))) == data

"""python -m minidnn run: images and .npy arrays in, one JSON line per input out, resumable,
errors reported in the output; and its Ray form (skipped without Ray): the same file, a
killed worker losing nothing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minidnn as dnn
from minidnn import run as runmod

PIL = pytest.importorskip("PIL.Image")


def _classifier(path):
    dnn.set_seed(0)
    net = dnn.loss_multiclass_log(dnn.fc(5, dnn.avg_pool_everything(dnn.relu(dnn.con(
        4, 3, 3, 1, 1, dnn.input_tensor())))))
    net.forward(np.zeros((1, 3, 12, 12), np.float32))
    dnn.serialize(net, path)
    return net


def _images(folder, n, seed=0, size=12):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        a = rng.integers(0, 256, (size + i % 3, size, 3), dtype=np.uint8)
        p = folder / f"img{i:04d}.png"
        PIL.fromarray(a).save(p)
        paths.append(str(p))
    return paths


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "minidnn", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _lines(path):
    return [json.loads(l) for l in open(path, encoding="utf-8")]


def test_run_images_and_arrays(tmp_path):
    net = _classifier(tmp_path / "net.mdnn")
    imgs = _images(tmp_path / "imgs", 7)
    arr = tmp_path / "x.npy"
    np.save(arr, np.random.default_rng(1).standard_normal((3, 12, 12)).astype(np.float32))
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out.jsonl"
    r = _cli("run", str(tmp_path / "net.mdnn"), str(tmp_path / "imgs"), str(arr), "--out", str(out),
             "--batch", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "9 inputs" in r.stderr and "1 errors" in r.stderr and "inputs/s" in r.stderr
    lines = _lines(out)
    assert [l["input"] for l in lines] == sorted(imgs + [str(bad)]) + [str(arr)]
    by = {l["input"]: l for l in lines}
    assert "error" in by[str(bad)] and "output" not in by[str(bad)]
    for p in imgs:
        x = np.asarray(PIL.open(p).convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 255
        assert by[p]["output"] == int(net(x)[0])
    assert by[str(arr)]["output"] == int(net(np.load(arr)[None])[0])


def test_run_resumes_and_skips_what_is_done(tmp_path):
    _classifier(tmp_path / "net.mdnn")
    imgs = _images(tmp_path / "imgs", 10)
    out = tmp_path / "out.jsonl"
    r = _cli("run", str(tmp_path / "net.mdnn"), *imgs[:4], "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    with open(out, "a") as f:
        f.write('{"input": "' + imgs[4] + '", "outp')      # a line cut by a kill
    r = _cli("run", str(tmp_path / "net.mdnn"), str(tmp_path / "imgs" / "*.png"), "--out", str(out),
             "--quiet")
    assert r.returncode == 0, r.stderr
    assert "6 inputs" in r.stderr and "4 already in" in r.stderr
    lines = _lines(out)
    assert [l["input"] for l in lines] == imgs and all("output" in l for l in lines)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(os.path.relpath(p, tmp_path) for p in imgs[::-1]) + "\n")
    assert runmod.expand_inputs([str(listing)]) == [os.path.join(str(tmp_path), os.path.relpath(p, tmp_path))
                                                   for p in imgs[::-1]]


def test_run_net_without_a_loss_writes_its_output(tmp_path):
    net = dnn.fc(3, dnn.input_tensor())
    net.forward(np.zeros((1, 2, 2, 2), np.float32))
    dnn.serialize(net, tmp_path / "n.mdnn")
    x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    np.save(tmp_path / "a.npy", x)
    out = tmp_path / "o.jsonl"
    assert runmod.run(dnn.deserialize(tmp_path / "n.mdnn"), [str(tmp_path / "a.npy")], str(out),
                      quiet=True)[:2] == (1, 0)
    got = np.array(_lines(out)[0]["output"], np.float32)
    np.testing.assert_allclose(got, net.forward(x[None])[0], rtol=1e-6)


def test_run_arguments():
    r = _cli("run", "/no/such.mdnn", "x.png", "--out", "o.jsonl")
    assert r.returncode == 1 and "minidnn run: error" in r.stderr
    r = _cli("run", "m.mdnn")
    assert r.returncode == 2


# ---------------------------------------------------------------------------- Ray
def _ray_env(tmp_path, **extra):
    env = dict(os.environ, RAY_DISABLE_USAGE_STATS="1", RAY_memory_monitor_refresh_ms="0",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.update(extra)
    return env


def test_ray_gives_the_same_file_and_a_killed_worker_loses_nothing(tmp_path):
    pytest.importorskip("ray.data")
    _classifier(tmp_path / "net.mdnn")
    imgs = _images(tmp_path / "imgs", 240, size=10)
    plain, viaray, killed = (tmp_path / n for n in ("plain.jsonl", "ray.jsonl", "killed.jsonl"))
    r = _cli("run", str(tmp_path / "net.mdnn"), str(tmp_path / "imgs"), "--out", str(plain), "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("run", str(tmp_path / "net.mdnn"), str(tmp_path / "imgs"), "--out", str(viaray), "--quiet",
             "--ray", "--workers", "2", "--batch", "16", env=_ray_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert viaray.read_bytes() == plain.read_bytes()
    marker = tmp_path / "died"
    env = _ray_env(tmp_path, MINIDNN_RAY_DIE_ON=f"{imgs[130]},{marker}")
    r = _cli("run", str(tmp_path / "net.mdnn"), str(tmp_path / "imgs"), "--out", str(killed), "--quiet",
             "--ray", "--workers", "2", "--batch", "16", env=env)
    assert r.returncode == 0, r.stderr
    assert marker.exists()                       # a worker did die midway
    assert killed.read_bytes() == plain.read_bytes()
    assert [l["input"] for l in _lines(killed)] == imgs          # every input exactly once

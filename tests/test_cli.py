"""python -m minidnn bench."""
import subprocess
import sys

import numpy as np

import minidnn as dnn


def run(*args):
    return subprocess.run([sys.executable, "-m", "minidnn", *args], capture_output=True, text=True,
                          timeout=120)


def test_bench_a_saved_net(tmp_path):
    net = dnn.relu(dnn.bn_con(dnn.con(4, 3, 3, 1, 1, dnn.input_tensor())))
    net(np.zeros((1, 2, 6, 6), np.float32))
    dnn.serialize(net, tmp_path / "n.dnn")
    r = run("bench", str(tmp_path / "n.dnn"), "--shape", "2,6,6", "--repeat", "3")
    assert r.returncode == 0, r.stderr
    assert "unfused" in r.stdout and "fused is" in r.stdout


def test_bench_errors_are_one_line():
    r = run("bench", "--shape", "3,x")
    assert r.returncode == 2 and "K,R,C" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("bench", "/no/such/file.dnn", "--shape", "1,2,2")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    r = run("bench", "--shape", "1,1,1")            # the demo net cannot take a 1x1 image
    assert r.returncode == 1 and "layer<" in r.stderr

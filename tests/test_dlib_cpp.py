"""save_dlib against dlib itself: a small C++ program, compiled with g++ against dlib's source
(the PyPI sdist: ``pip download dlib==20.0.1 --no-binary :all: --no-deps``, unpacked), declares
``dnn.dlib_type(net)`` for each test network, ``deserialize``s the file minidnn wrote, runs it
on an input, writes the output tensor and serializes the network again. The output must match
minidnn's; dlib's own re-serialization of the file must be byte for byte minidnn's file.

Optional: set MINIDNN_DLIB_SOURCE to the unpacked sdist (the folder holding dlib/) to run it;
MINIDNN_DLIB_BUILD names a folder where the compiled dlib/all/source.cpp is kept between runs
(it takes a couple of minutes to compile). Skipped otherwise (and without g++).
"""
import hashlib
import os
import shutil
import subprocess

import numpy as np
import pytest

import minidnn as dnn
from minidnn import dlib as D

from test_dlib_nets import cpp_cases, models_dir

SRC = os.environ.get("MINIDNN_DLIB_SOURCE")
pytestmark = pytest.mark.skipif(
    not SRC or not os.path.isdir(os.path.join(SRC or "", "dlib")) or shutil.which("g++") is None,
    reason="set MINIDNN_DLIB_SOURCE to an unpacked dlib sdist (and have g++) to check save_dlib "
           "against dlib's C++")

FLAGS = ["-O2", "-std=c++17", "-DDLIB_NO_GUI_SUPPORT", "-DDLIB_DISABLE_ASSERTS", "-w"]

PROGRAM = r"""
#include <dlib/dnn.h>
#include <fstream>
#include <iostream>
#include <type_traits>
using namespace dlib;
using namespace std;

%(decls)s

template <class T, class = void> struct has_loss : std::false_type {};
template <class T> struct has_loss<T, std::void_t<typename T::loss_details_type>> : std::true_type {};
template <class T, class = void> struct is_mmod : std::false_type {};
template <class T> struct is_mmod<T, std::void_t<typename T::loss_details_type>>
    : std::is_same<typename T::loss_details_type, loss_mmod_> {};

template <typename net_type>
int run(const char* model, const char* input, const char* output, const char* resaved,
        const char* dets, double adjust)
{
    net_type net;
    deserialize(model) >> net;
    serialize(resaved) << net;
    typedef typename net_type::input_type in_t;
    resizable_tensor x;
    if constexpr (std::is_same<in_t, matrix<rgb_pixel>>::value ||
                  std::is_same<in_t, matrix<unsigned char>>::value)
    {
        std::vector<in_t> imgs(1);
        ifstream f(input, ios::binary);
        long nr, nc, ch;
        f >> nr >> nc >> ch;
        f.get();
        imgs[0].set_size(nr, nc);
        f.read((char*)&imgs[0](0, 0), nr * nc * ch);
        net.input_layer().to_tensor(imgs.begin(), imgs.end(), x);
        resizable_tensor out = net.forward(x);
        serialize(output) << out;
        if constexpr (is_mmod<net_type>::value)
        {
            ofstream d(dets);
            d.precision(17);
            for (auto&& r : net.process(imgs[0], adjust))
                d << r.rect.left() << " " << r.rect.top() << " " << r.rect.right() << " "
                  << r.rect.bottom() << " " << r.detection_confidence << " [" << r.label << "]\n";
        }
    }
    else
    {
        deserialize(input) >> x;
        resizable_tensor out = net.forward(x);
        serialize(output) << out;
    }
    return 0;
}

int main(int argc, char** argv)
{
    int which = atoi(argv[1]);
    double adjust = argc > 7 ? atof(argv[7]) : 0.0;
    try {
%(dispatch)s
    } catch (std::exception& e) { cerr << e.what() << endl; return 2; }
    return 1;
}
"""


@pytest.fixture(scope="module")
def cases():
    return cpp_cases(models_dir())


@pytest.fixture(scope="module")
def program(tmp_path_factory, cases):
    build = os.environ.get("MINIDNN_DLIB_BUILD") or str(tmp_path_factory.mktemp("dlib_build"))
    os.makedirs(build, exist_ok=True)
    src_o = os.path.join(build, "dlib_source.o")
    if not os.path.exists(src_o):
        subprocess.run(["g++", *FLAGS, "-I", SRC, "-c", os.path.join(SRC, "dlib", "all", "source.cpp"),
                        "-o", src_o + ".tmp"], check=True, timeout=1800)
        os.replace(src_o + ".tmp", src_o)
    decls, dispatch = [], []
    for i, c in enumerate(cases):
        decls.append(dnn.dlib_type(c.net, f"net_type{i}"))
        dispatch.append(f"        if (which == {i}) return run<net_type{i}>(argv[2], argv[3], argv[4], "
                        f"argv[5], argv[6], adjust);")
    text = PROGRAM % {"decls": "\n".join(decls), "dispatch": "\n".join(dispatch)}
    key = hashlib.sha256((text + " ".join(FLAGS)).encode()).hexdigest()[:16]
    exe = os.path.join(build, f"minidnn_dlib_check_{key}")
    if not os.path.exists(exe):
        cpp = exe + ".cpp"
        with open(cpp, "w") as f:
            f.write(text)
        subprocess.run(["g++", *FLAGS, "-I", SRC, cpp, src_o, "-o", exe + ".tmp", "-lpthread"],
                       check=True, timeout=3600)
        os.replace(exe + ".tmp", exe)
    return exe


def _write_input(path, x):
    if x.dtype == np.uint8:
        ch = 1 if x.ndim == 2 else 3
        with open(path, "wb") as f:
            f.write(f"{x.shape[0]} {x.shape[1]} {ch}\n".encode())
            f.write(np.ascontiguousarray(x).tobytes())
    else:
        o = D._Out()
        o.tensor(x)
        with open(path, "wb") as f:
            f.write(o.getvalue())


def _read_tensor(path):
    with open(path, "rb") as f:
        data = f.read()
    t, _ = D._Src(data).tensor(0, "output")
    return t.array()


def test_dlib_loads_what_save_dlib_writes(program, cases, tmp_path):
    for i, c in enumerate(cases):
        model = tmp_path / f"net{i}.dat"
        dnn.save_dlib(c.net, str(model))
        inp = tmp_path / f"in{i}"
        _write_input(str(inp), c.x)
        out, again, dets = tmp_path / f"out{i}", tmp_path / f"again{i}.dat", tmp_path / f"dets{i}"
        r = subprocess.run([program, str(i), str(model), str(inp), str(out), str(again), str(dets),
                            repr(c.adjust)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{c.name}: dlib failed: {r.stderr}"
        got = _read_tensor(str(out))
        want = c.net.forward(c.x)
        assert got.shape == want.shape, (c.name, got.shape, want.shape)
        scale = max(1.0, float(np.abs(want).max()))
        err = float(np.abs(got - want).max()) / scale
        assert err <= 1e-4, f"{c.name}: dlib's output differs from minidnn's by {err:.3g} (relative)"
        assert again.read_bytes() == model.read_bytes(), \
            f"{c.name}: dlib re-serializes the file differently from save_dlib"
        if c.net.layer_details().kind == "loss_mmod":
            mine = [d.rect + (d.confidence, d.label) for d in c.net(c.x, adjust_threshold=c.adjust)]
            theirs = []
            for ln in dets.read_text().splitlines():
                if ln.strip():
                    vals, label = ln.split(" [")
                    v = vals.split()
                    theirs.append(tuple(int(a) for a in v[:4]) + (float(v[4]), label[:-1]))
            # Scores equal to a few ulps (flat regions: the pyramid's zero padding) sort in an
            # order that depends on the last bits, which two implementations do not share:
            # compare the detections above the first such near tie.
            def near_tie(dets):
                s = sorted((d[4] for d in dets), reverse=True)
                return next((a for a, b in zip(s, s[1:]) if a - b < 1e-5), -np.inf)
            cut = max(near_tie(mine), near_tie(theirs)) + 1e-5
            mine = [d for d in mine if d[4] > cut]
            theirs = [d for d in theirs if d[4] > cut]
            assert len(mine) == len(theirs) and len(mine) >= 1, (c.name, mine, theirs)
            for a, b in zip(mine, theirs):
                assert a[:4] == b[:4] and a[5] == b[5] and abs(a[4] - b[4]) < 1e-3, (c.name, a, b)

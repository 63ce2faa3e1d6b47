"""Bad dlib files: 1000 corrupted files (truncations, flipped bytes, junk spliced in, other
formats, a dlib file of a layer minidnn lacks) each give a SerializationError naming where it
went wrong, or (a flip inside a weight, which dlib's format cannot notice) a network; never
another exception, a crash, a hang or an unbounded allocation."""
import bz2
import time

import numpy as np
import pytest

import minidnn as dnn
from minidnn import dlib as D

from test_dlib_nets import models_dir, synthetic_cases

LIMIT_S = 5.0           # the slowest load allowed (a hang or runaway parse fails)


def _corpus():
    """(name, bytes, structure factory or None) of the files corrupted below."""
    cases = {c.name: c for c in synthetic_cases()}
    out = [("layers", dnn.save_dlib(cases["layers"].net), lambda: synthetic_cases(seed=5)[0].net),
           ("detector", dnn.save_dlib(cases["detector"].net), None),
           ("grayscale", dnn.save_dlib(cases["grayscale"].net), None)]
    d = models_dir()
    if d is not None:
        import os
        from minidnn import dlib_zoo
        p = os.path.join(d, "mmod_human_face_detector.dat")
        if os.path.exists(p):
            with open(p, "rb") as f:
                out.append(("face_detector", f.read(), lambda: dlib_zoo.mmod_detector_net(45)))
    return out


def _unsupported_layer_file(base):
    """A file whose relu_2 records became dlib's layer_norm_ (a layer minidnn lacks):
    its fields as dlib writes them."""
    o = D._Out()
    o.string("layer_norm_")
    o.tensor(np.ones(4, np.float32), (4, 1, 1, 1))
    o.alias((1, 2, 1, 1))
    o.alias((1, 2, 1, 1))
    o.tensor(None)
    o.tensor(None)
    for v in (1.0, 1.0, 1.0, 0.0, 1e-5):
        o.real(v)
    rec = o.getvalue()
    old = b"\x01\x06relu_2" + b"0"
    assert old in base
    return base.replace(old, rec, 1), base.index(old)


def _load(data, make):
    t = time.perf_counter()
    try:
        dnn.load_dlib(data, make() if make is not None else None)
        outcome = "loaded"
    except dnn.SerializationError as e:
        msg = str(e)
        assert ("byte offset" in msg or msg.startswith(("bzip2:", "the file is empty", "this is a minidnn")))
        outcome = "refused"
    dt = time.perf_counter() - t
    assert dt < LIMIT_S, f"a load took {dt:.1f} s"
    return outcome


def test_a_thousand_corrupted_files():
    rng = np.random.default_rng(1234)
    corpus = _corpus()
    counts = {"loaded": 0, "refused": 0}
    n = 0

    def run(data, make):
        nonlocal n
        counts[_load(bytes(data), make)] += 1
        n += 1

    # truncations: the first 48 lengths of each file, then random ones
    for name, data, make in corpus:
        for k in range(48):
            run(data[:k], make)
    while n < 300:
        name, data, make = corpus[rng.integers(len(corpus))]
        run(data[:int(rng.integers(0, len(data)))], make)
    # byte flips: anywhere, and (half of them) in the structure: the first and last bytes
    # and around each record
    offsets = {name: [e.record_offset for e in D.inspect_dlib(data)[0]] for name, data, _ in corpus}
    while n < 750:
        name, data, make = corpus[rng.integers(len(corpus))]
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            if rng.random() < 0.5:
                pos = int(rng.integers(len(b)))
            else:
                anchor = [0, len(b) - 64] + offsets[name]
                pos = int(np.clip(anchor[rng.integers(len(anchor))] + rng.integers(-16, 64), 0, len(b) - 1))
            b[pos] ^= int(rng.integers(1, 256))
        run(b, make)
    # junk spliced in
    while n < 850:
        name, data, make = corpus[rng.integers(len(corpus))]
        cut = int(rng.integers(len(data)))
        junk = rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8).tobytes()
        run(data[:cut] + junk + data[cut + int(rng.integers(0, 40)):], make)
    # other formats
    own = dnn.serialize(synthetic_cases()[2].net)
    others = [b"", b"\x00" * 100, b"\xff" * 1000, own, own[:40], b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
              b"<html>not a model</html>", b"BZh9" + b"\x00" * 50, bz2.compress(corpus[0][1])[:200],
              bz2.compress(b"\x01\x01garbage"), b"\x01\x01" * 5000, b"\x01\x02" * 5000, b"\x01\x01\x01\x02" * 3000]
    while n < 900:
        x = others[(n - 850) % len(others)]
        if (n - 850) >= len(others):
            x = rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes()
        run(x, None)
    # a dlib file of a layer minidnn lacks (intact, truncated, flipped)
    bad, at = _unsupported_layer_file(corpus[0][1])
    with pytest.raises(dnn.SerializationError,
                       match=rf"record 'layer_norm_': dlib's layer_norm is not supported by minidnn "
                             rf"at byte offset {at}"):
        dnn.load_dlib(bad, corpus[0][2]())
    while n < 1000:
        b = bytearray(bad)
        if rng.random() < 0.5:
            b = b[:int(rng.integers(at, len(b)))]
        else:
            b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
        run(b, corpus[0][2] if rng.random() < 0.5 else None)
    assert n == 1000 and counts["refused"] > 800, counts


def test_unknown_records_name_the_tag_and_the_offset():
    data = dnn.save_dlib(synthetic_cases()[2].net)          # fc<3,relu<con<...,input_tensor>>>
    i = data.index(b"\x01\x06relu_2")
    bad = data[:i] + b"\x01\x06relU_2" + data[i + 8:]
    with pytest.raises(dnn.SerializationError, match=rf"unknown layer record 'relU_2' at byte offset {i}"):
        dnn.load_dlib(bad)


def test_sizes_are_checked_before_anything_is_allocated():
    """A tensor claiming 2**60 floats fails at its header, without allocating."""
    o = D._Out()
    o.sint(2)                              # add_layer v2 over ... a con_6 record
    o.sint(3)
    o.string("input_tensor")
    o.string("con_6")
    o.sint(2)
    for d in (1 << 30, 1 << 30, 1, 1):
        o.sint(d)
    with pytest.raises(dnn.SerializationError, match=r"needs 4611686018427387904 bytes"):
        dnn.load_dlib(o.getvalue())


def test_deep_nesting_is_bounded():
    data = b"\x01\x01" * 200000 + b"\x01\x02"
    t = time.perf_counter()
    with pytest.raises(dnn.SerializationError):
        dnn.load_dlib(data)
    assert time.perf_counter() - t < 10

"""Write tests/data/affine_1.mdnn byte by byte from docs/FORMAT.md (format version 1).

An independent writer: it uses struct.pack and zlib.crc32 only, never minidnn,
and writes the *older* affine record ``affine_1`` (no disabled flag), which
minidnn itself no longer writes. tests/test_serialize.py loads the file and
checks it against ``expected_layers()`` below.

The network (top first, as in print(net)):

    layer<0> loss_multiclass_log
    layer<1> affine   (mode=fc)         gamma, beta (5,)        <- affine_1
    layer<2> fc       (num_outputs=5)   weights (5, 16), biases (5,)
    layer<3> max_pool (2x2, stride 2)
    layer<4> relu
    layer<5> affine   (mode=conv)       gamma, beta (4,)        <- affine_1
    layer<6> con      (4 filters 3x3, stride 1, padding 1)  filters (4, 2, 3, 3), biases (4,)
    layer<7> input_tensor (k=2)

Input (N, 2, 4, 4) -> con (N, 4, 4, 4) -> pool (N, 4, 2, 2) -> fc (N, 5, 1, 1).

Run: python tests/data/make_affine_1_fixture.py   (rewrites the file; the bytes never change)
"""
import math
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "affine_1.mdnn")


def values(n, seed, scale=1.0, offset=0.0):
    """n deterministic float32-representable values (no RNG: reproducible anywhere)."""
    out = []
    for i in range(n):
        v = offset + scale * math.sin(1.7 * i + seed) * math.cos(0.3 * i * seed + 1.0)
        out.append(struct.unpack("<f", struct.pack("<f", v))[0])
    return out


def expected_layers():
    """The parameter values written, by layer index: {index: {name: (shape, values)}}."""
    return {
        1: {"gamma": ((5,), values(5, 11, 0.8, 1.5)), "beta": ((5,), values(5, 12, 0.5))},
        2: {"weights": ((5, 16), values(80, 13, 0.4)), "biases": ((5,), values(5, 14, 0.3))},
        5: {"gamma": ((4,), values(4, 15, 0.9, -1.2)), "beta": ((4,), values(4, 16, 0.7))},
        6: {"filters": ((4, 2, 3, 3), values(72, 17, 0.5)), "biases": ((4,), values(4, 18, 0.2))},
    }


def u8(v):
    return struct.pack("<B", v)


def u32(v):
    return struct.pack("<I", v)


def array(shape, vals):
    """array(d): present 1, rank, dims (u32), float32 data little-endian, C order."""
    return u8(1) + u8(len(shape)) + b"".join(u32(d) for d in shape) + struct.pack(f"<{len(vals)}f", *vals)


def record(tag, payload):
    t = tag.encode("ascii")
    return u8(len(t)) + t + struct.pack("<Q", len(payload)) + payload


def build():
    p = expected_layers()
    records = [
        record("loss_multiclass_log_1", u8(0)),                           # disabled
        record("affine_1", u8(1) + array(*p[1]["gamma"]) + array(*p[1]["beta"])),  # mode fc
        record("fc_1", u8(0) + u32(5) + u8(1) + u8(0)       # disabled, O, bias, fused_relu
               + array(*p[2]["weights"]) + array(*p[2]["biases"])),
        record("max_pool_1", u8(0) + u32(2) + u32(2) + u32(2) + u32(2) + u32(0) + u32(0)),
        record("relu_1", u8(0)),
        record("affine_1", u8(0) + array(*p[5]["gamma"]) + array(*p[5]["beta"])),  # mode conv
        record("con_1", u8(0) + u32(4) + u32(3) + u32(3) + u32(1) + u32(1) + u32(1) + u32(1)
               + u8(1) + u8(0) + array(*p[6]["filters"]) + array(*p[6]["biases"])),
        record("input_tensor_1", u8(0) + u32(2)),                         # disabled, k = 2
    ]
    body = b"MINIDNN\x00" + u32(1) + u32(len(records)) + b"".join(records)
    return body + u32(zlib.crc32(body))


if __name__ == "__main__":
    data = build()
    with open(PATH, "wb") as f:
        f.write(data)
    print(f"wrote {PATH} ({len(data)} bytes)")

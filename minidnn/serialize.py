"""The minidnn file format: ``serialize(net, dest)`` and ``deserialize(src) -> net``.

docs/FORMAT.md is the specification; this module is one implementation of it.
In short: a header (magic, format version, record count), then one record per
layer from the top of the network (layer<0>) down to its input, each starting
with a dlib-style version tag (``con_1``, ``affine_2`` ...), then a CRC-32
of everything before it. Nothing in a file is ever executed: a record tag
selects a reader from the table ``RECORDS``, and readers only parse numbers.

Adding a layer (or a new version of one) touches this file only: write a
writer and a reader below and ``register`` them. An older version of a record
stays registered with ``write=None`` so that old files keep loading (see
``affine_1``).

Every problem with a file raises :class:`SerializationError` (a ValueError)
naming the layer index and the record, before anything larger than the file
itself is allocated.
"""
import collections
import io
import os
import re
import secrets
import stat
import struct
import zlib

import numpy as np

from .core import Node, input_tensor_
from .layers import (CONV, FC, add_prev_, affine_, avg_pool_, bn_, con_, fc_, max_pool_, relu_,
                     skip_, softmax_, tag_)
from .loss import loss_mean_squared_, loss_multiclass_log_

MAGIC = b"MINIDNN\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sII")          # magic, format version, record count
_RECORD_HEAD_MAX_TAG = 64
_MAX_NDIM = 8


class SerializationError(ValueError):
    """A file (or a network being saved) that the format cannot represent: the
    message names the layer index and the record (or the header/trailer)."""


# ----------------------------------------------------------------------------- primitives
class Writer:
    """Encodes the fields of one record (little-endian)."""

    def __init__(self):
        self._buf = io.BytesIO()

    def u8(self, v):
        self._buf.write(struct.pack("<B", v))

    def bool(self, v):
        self.u8(1 if v else 0)

    def u32(self, name, v):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 0xFFFFFFFF:
            raise SerializationError(f"{name} = {v!r} is not an integer in [0, 2**32)")
        self._buf.write(struct.pack("<I", int(v)))

    def f64(self, v):
        self._buf.write(struct.pack("<d", float(v)))

    def array(self, name, a, ndim):
        """present u8; if 1: ndim u8, dims u32 x ndim, float32 data in C order."""
        if a is None:
            self.u8(0)
            return
        a = np.ascontiguousarray(a, dtype="<f4")
        if a.ndim != ndim:
            raise SerializationError(f"parameter {name} has shape {a.shape}: expected {ndim} dimensions")
        self.u8(1)
        self.u8(ndim)
        for d in a.shape:
            self.u32(f"{name} dimension", d)
        self._buf.write(memoryview(a).cast("B"))

    def getvalue(self):
        return self._buf.getbuffer()


class Reader:
    """Decodes the fields of one record payload; every read is bounds-checked."""

    def __init__(self, data, pos, end):
        self._data, self.pos, self.end = data, pos, end

    def _take(self, n, what):
        if n > self.end - self.pos:
            raise SerializationError(f"{what} needs {n} bytes at offset {self.pos}, "
                                     f"but the record has only {self.end - self.pos} left")
        p = self.pos
        self.pos += n
        return p

    def u8(self, what="u8"):
        return self._data[self._take(1, what)]

    def bool(self, name):
        v = self.u8(name)
        if v > 1:
            raise SerializationError(f"flag {name} is {v}: expected 0 or 1")
        return bool(v)

    def u32(self, name):
        return struct.unpack_from("<I", self._data, self._take(4, name))[0]

    def f64(self, name):
        return struct.unpack_from("<d", self._data, self._take(8, name))[0]

    def array(self, name, ndim):
        """A float32 array of rank ``ndim`` (a writable copy), or None when absent."""
        if not self.bool(f"{name} present"):
            return None
        got = self.u8(f"{name} rank")
        if got != ndim:
            raise SerializationError(f"parameter {name} has rank {got}: expected {ndim}")
        shape = tuple(self.u32(f"{name} dimension") for _ in range(ndim))
        if min(shape) < 1:
            raise SerializationError(f"parameter {name} has shape {shape}: every dimension must be >= 1")
        count = 1
        for d in shape:
            count *= d
        left = self.end - self.pos
        if 4 * count > left:        # checked before allocating anything
            raise SerializationError(f"parameter {name} of shape {shape} needs {4 * count} bytes, "
                                     f"but the record has only {left} left")
        p = self._take(4 * count, name)
        return np.frombuffer(self._data, "<f4", count, p).astype(np.float32).reshape(shape)

    def done(self):
        if self.pos != self.end:
            raise SerializationError(f"{self.end - self.pos} unread bytes at the end of the record")


def _mode_code(mode):
    if mode not in (CONV, FC):
        raise SerializationError(f"mode is {mode!r}: expected 'conv' or 'fc'")
    return 0 if mode == CONV else 1


def _read_mode(r):
    m = r.u8("mode")
    if m > 1:
        raise SerializationError(f"mode is {m}: expected 0 (conv) or 1 (fc)")
    return CONV if m == 0 else FC


def _maybe_disable(layer, disabled):
    if disabled:
        layer.disable()
    return layer


def _check_shape(name, a, shape):
    if a is not None and a.shape != shape:
        raise SerializationError(f"parameter {name} has shape {a.shape}: expected {shape}")


def _all_or_none(names, arrays):
    present = [a is not None for a in arrays]
    if any(present) and not all(present):
        raise SerializationError(f"parameters {', '.join(names)} must be all present or all absent")


# ----------------------------------------------------------------------------- records
def _write_input(w, l):
    w.bool(l.disabled)
    w.u32("k", 0 if l.k is None else l.k)


def _read_input(r):
    disabled = r.bool("disabled")
    k = r.u32("k")
    l = input_tensor_()
    l.k = k or None
    return _maybe_disable(l, disabled)


def _write_con(w, l):
    w.bool(l.disabled)
    for f in ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
        w.u32(f, getattr(l, f))
    w.bool(l.bias)
    w.bool(l.fused_relu)
    w.array("filters", l.filters, 4)
    w.array("biases", l.biases, 1)


def _read_con(r):
    disabled = r.bool("disabled")
    f, nr, nc, sy, sx, py, px = (r.u32(n) for n in ("num_filters", "nr", "nc", "stride_y", "stride_x",
                                                     "padding_y", "padding_x"))
    l = con_(f, nr, nc, sy, sx, py, px, r.bool("bias"))
    l.fused_relu = r.bool("fused_relu")
    l.filters = r.array("filters", 4)
    l.biases = r.array("biases", 1)
    return _maybe_disable(l, disabled)


def _check_con(l):
    if l.filters is not None:
        _check_shape("filters", l.filters, (l.num_filters, l.filters.shape[1], l.nr, l.nc))
    elif l.biases is not None:
        raise SerializationError("biases present without filters")
    _check_shape("biases", l.biases, (l.num_filters,))


def _write_fc(w, l):
    w.bool(l.disabled)
    w.u32("num_outputs", l.num_outputs)
    w.bool(l.bias)
    w.bool(l.fused_relu)
    w.array("weights", l.weights, 2)
    w.array("biases", l.biases, 1)


def _read_fc(r):
    disabled = r.bool("disabled")
    l = fc_(r.u32("num_outputs"), r.bool("bias"))
    l.fused_relu = r.bool("fused_relu")
    l.weights = r.array("weights", 2)
    l.biases = r.array("biases", 1)
    return _maybe_disable(l, disabled)


def _check_fc(l):
    if l.weights is not None:
        _check_shape("weights", l.weights, (l.num_outputs, l.weights.shape[1]))
    elif l.biases is not None:
        raise SerializationError("biases present without weights")
    _check_shape("biases", l.biases, (l.num_outputs,))


_BN_PARAMS = ("gamma", "beta", "running_mean", "running_var")


def _write_bn(w, l):
    w.bool(l.disabled)
    w.u8(_mode_code(l.mode))
    w.f64(l.eps)
    for p in _BN_PARAMS:
        w.array(p, getattr(l, p), 1)


def _read_bn(r):
    disabled = r.bool("disabled")
    mode = _read_mode(r)
    eps = r.f64("eps")
    if not (np.isfinite(eps) and eps > 0):
        raise SerializationError(f"eps is {eps!r}: expected a finite number > 0")
    l = bn_(mode, eps)
    for p in _BN_PARAMS:
        setattr(l, p, r.array(p, 1))
    return _maybe_disable(l, disabled)


def _write_bn_2(w, l):
    _write_bn(w, l)
    w.u32("num_updates", int(getattr(l, "num_updates", 0)))


def _read_bn_2(r):
    l = _read_bn(r)
    n = r.u32("num_updates")
    if n > l.running_stats_window_size:
        raise SerializationError(f"num_updates is {n}: expected at most "
                                 f"{l.running_stats_window_size} (the running-average window)")
    if n:
        l.num_updates = n
    return l


def _check_bn(l):
    arrays = [getattr(l, p) for p in _BN_PARAMS]
    _all_or_none(_BN_PARAMS, arrays)
    for p, a in zip(_BN_PARAMS, arrays):
        _check_shape(p, a, arrays[0].shape if arrays[0] is not None else None)


def _read_affine_1(r):
    """The older affine record: mode and parameters, no disabled flag (loads enabled)."""
    mode = _read_mode(r)
    return affine_(mode, r.array("gamma", 1), r.array("beta", 1))


def _write_affine_2(w, l):
    w.bool(l.disabled)
    w.u8(_mode_code(l.mode))
    # A disabled affine has no parameters (affine_.disable() drops them): written absent.
    w.array("gamma", None if l.disabled else l.gamma, 1)
    w.array("beta", None if l.disabled else l.beta, 1)


def _read_affine_2(r):
    disabled = r.bool("disabled")
    mode = _read_mode(r)
    gamma, beta = r.array("gamma", 1), r.array("beta", 1)
    if disabled and gamma is not None:
        raise SerializationError("a disabled affine must have no gamma/beta")
    l = affine_(mode)
    l.gamma, l.beta = gamma, beta
    return _maybe_disable(l, disabled)


def _check_affine(l):
    if l.disabled:
        return                      # its parameters are not written
    _all_or_none(("gamma", "beta"), (l.gamma, l.beta))
    if l.gamma is not None:
        _check_shape("beta", l.beta, l.gamma.shape)


_POOL_FIELDS = ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")


def _write_pool(w, l):
    w.bool(l.disabled)
    for f in _POOL_FIELDS:
        w.u32(f, getattr(l, f))


def _pool_reader(cls):
    def read(r):
        disabled = r.bool("disabled")
        return _maybe_disable(cls(*(r.u32(f) for f in _POOL_FIELDS)), disabled)
    return read


def _write_flag_only(w, l):
    w.bool(l.disabled)


def _flag_only_reader(cls):
    def read(r):
        return _maybe_disable(cls(), r.bool("disabled"))
    return read


def _write_id(w, l):
    w.u32("id", l.id)


def _id_reader(cls):
    def read(r):
        return cls(r.u32("id"))
    return read


# tag -> Record(cls, write, read, check). ``write`` is None for an older version that is only
# read; the newest registered record with a writer is the one written for ``cls``. ``check``
# (optional) validates a layer's parameters against its settings, on save and on load.
Record = collections.namedtuple("Record", "cls write read check")
RECORDS = {}
_TAG_RE = re.compile(r"[a-z][a-z0-9_]*_[0-9]+\Z")


def register(tag, cls, write, read, check=None):
    """Register the record ``tag`` (``name_version``) for layer class ``cls``.

    ``write(w, layer)`` encodes the layer's settings and parameters with a Writer;
    ``read(r) -> layer`` decodes them with a Reader (it may raise ValueError or
    SerializationError); pass ``write=None`` for an old version kept readable.
    """
    if not _TAG_RE.match(tag) or len(tag) > _RECORD_HEAD_MAX_TAG:
        raise ValueError(f"record tag {tag!r} must look like 'name_1' (lowercase, <= 64 chars)")
    RECORDS[tag] = Record(cls, write, read, check)


register("input_tensor_1", input_tensor_, _write_input, _read_input)
register("con_1", con_, _write_con, _read_con, _check_con)
register("fc_1", fc_, _write_fc, _read_fc, _check_fc)
register("relu_1", relu_, _write_flag_only, _flag_only_reader(relu_))
register("bn_1", bn_, None, _read_bn, _check_bn)              # older: no update count
register("bn_2", bn_, _write_bn_2, _read_bn_2, _check_bn)
register("affine_1", affine_, None, _read_affine_1, _check_affine)
register("affine_2", affine_, _write_affine_2, _read_affine_2, _check_affine)
register("max_pool_1", max_pool_, _write_pool, _pool_reader(max_pool_))
register("avg_pool_1", avg_pool_, _write_pool, _pool_reader(avg_pool_))
register("softmax_1", softmax_, _write_flag_only, _flag_only_reader(softmax_))
register("tag_1", tag_, _write_id, _id_reader(tag_))
register("skip_1", skip_, _write_id, _id_reader(skip_))
register("add_prev_1", add_prev_, _write_id, _id_reader(add_prev_))
register("loss_multiclass_log_1", loss_multiclass_log_, _write_flag_only,
         _flag_only_reader(loss_multiclass_log_))
register("loss_mean_squared_1", loss_mean_squared_, _write_flag_only,
         _flag_only_reader(loss_mean_squared_))


def _writer_tag(cls):
    tag = None
    for t, rec in RECORDS.items():
        if rec.cls is cls and rec.write is not None:
            tag = t
    return tag


def _kind(layer):
    try:
        return str(layer.kind)
    except Exception:
        return type(layer).__name__


def _check_structure(layers, where):
    """The checks that need the whole chain (layers top first); ``where(i)`` names layer i."""
    n = len(layers)
    if n == 0 or not isinstance(layers[-1], input_tensor_):
        raise SerializationError(f"{where(n - 1)}: the bottom layer must be an input_tensor")
    tags = set()
    for i in range(n - 1, -1, -1):
        l = layers[i]
        if isinstance(l, input_tensor_) and i != n - 1:
            raise SerializationError(f"{where(i)}: an input_tensor can only be the bottom layer")
        if _kind(l).startswith("loss") and i != 0:
            raise SerializationError(f"{where(i)}: a loss layer can only be the top layer (layer<0>)")
        if isinstance(l, tag_):
            tags.add(l.id)
        if isinstance(l, (skip_, add_prev_)) and l.id not in tags:
            raise SerializationError(f"{where(i)}: there is no tag{l.id} below this layer")


# ----------------------------------------------------------------------------- writing
def _encode(net, out):
    """Write ``net`` to the binary file object ``out``."""
    if not isinstance(net, Node):
        raise TypeError(f"serialize: expected a minidnn network (a Node), got {type(net).__name__}")
    nodes = net.chain()
    layers = [n.layer_details() for n in nodes]
    tags = []
    for i, l in enumerate(layers):
        tag = _writer_tag(type(l))
        if tag is None:
            raise SerializationError(f"layer<{i}> {_kind(l)}: no file record is registered for "
                                     f"{type(l).__name__} (see minidnn.serialize.register)")
        tags.append(tag)
    _check_structure(layers, lambda i: f"layer<{i}> record {tags[i]!r}")
    crc = 0

    def put(b):
        nonlocal crc
        crc = zlib.crc32(b, crc)
        out.write(b)

    put(_HEADER.pack(MAGIC, FORMAT_VERSION, len(layers)))
    for i, (l, tag) in enumerate(zip(layers, tags)):
        rec = RECORDS[tag]
        try:
            if rec.check is not None:
                rec.check(l)
            w = Writer()
            rec.write(w, l)
            payload = w.getvalue()
        except SerializationError as e:
            raise SerializationError(f"layer<{i}> record {tag!r}: {e}") from None
        t = tag.encode("ascii")
        put(struct.pack("<B", len(t)) + t + struct.pack("<Q", len(payload)))
        put(payload)
    out.write(struct.pack("<I", crc))


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return                      # e.g. Windows: folders cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def serialize(net, dest):
    """Save ``net`` (its whole structure, settings and parameters) to ``dest``: a path or a
    binary file object open for writing.

    Saving to a path is atomic: the file is written under a temporary name in the
    same folder, flushed and fsync'ed, then renamed over ``dest``; if anything fails
    the previous file is untouched and the temporary file removed. Raises
    SerializationError for a network the format cannot hold (an unregistered layer
    class, a skip without its tag, parameters of the wrong shape).
    """
    if hasattr(dest, "write"):
        _encode(net, dest)
        return
    atomic_write(dest, lambda f: _encode(net, f))


def atomic_write(path, write):
    """Write a file atomically: ``write(f)`` fills a temporary file in the same folder
    (binary), which is flushed, fsync'ed and renamed over ``path``; the folder is
    fsync'ed too. If anything fails, the previous file is untouched and the
    temporary file removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    while True:
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:                        # keep the permissions of the file being replaced
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


# ----------------------------------------------------------------------------- reading
def _known_versions(tag):
    name = tag.rpartition("_")[0]
    return [t for t in RECORDS if t.rpartition("_")[0] == name]


def _decode(data, check_crc=True):
    """Parse a whole file. Returns (net, format_version, [record tag per layer, top first])."""
    data = memoryview(data).cast("B")
    size = len(data)
    if size < _HEADER.size:
        raise SerializationError(f"header: the file has {size} bytes, too short for a minidnn "
                                 f"header ({_HEADER.size} bytes)")
    magic, version, count = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise SerializationError(f"header: wrong magic {bytes(magic)!r}: not a minidnn file "
                                 f"(expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise SerializationError(f"header: unsupported format version {version} "
                                 f"(this minidnn reads version {FORMAT_VERSION})")
    # the smallest record is 1 + 1 + 8 bytes (a 1-letter tag, an empty payload)
    if count < 1 or count * 10 > size - _HEADER.size - 4:
        raise SerializationError(f"header: record count {count} is impossible for a file of {size} bytes")
    pos = _HEADER.size
    end = size - 4                                  # the CRC trailer
    layers, tags = [], []
    for i in range(count):
        where = f"layer<{i}> record #{i} at offset {pos}"
        if end - pos < 1:
            raise SerializationError(f"{where}: the file ends before the record")
        n = data[pos]
        if not 1 <= n <= _RECORD_HEAD_MAX_TAG or end - pos < 1 + n + 8:
            raise SerializationError(f"{where}: truncated or bad record head (tag length {n})")
        try:
            tag = bytes(data[pos + 1:pos + 1 + n]).decode("ascii")
        except UnicodeDecodeError:
            raise SerializationError(f"{where}: the record tag is not ASCII") from None
        where = f"layer<{i}> record {tag!r}"
        plen = struct.unpack_from("<Q", data, pos + 1 + n)[0]
        pos += 1 + n + 8
        if plen > end - pos:
            raise SerializationError(f"{where}: payload of {plen} bytes at offset {pos}, but only "
                                     f"{max(end - pos, 0)} bytes are left before the checksum")
        rec = RECORDS.get(tag)
        if rec is None:
            known = _known_versions(tag)
            hint = f" (this minidnn reads {', '.join(known)})" if known else ""
            raise SerializationError(f"{where}: unknown record tag{hint}")
        r = Reader(data, pos, pos + plen)
        try:
            layer = rec.read(r)
            r.done()
            if rec.check is not None:
                rec.check(layer)
        except SerializationError as e:
            raise SerializationError(f"{where}: {e}") from None
        except Exception as e:      # a constructor refusing a setting, or a bug in a reader
            raise SerializationError(f"{where}: {type(e).__name__}: {e}") from e
        if not isinstance(layer, rec.cls):
            raise SerializationError(f"{where}: the reader returned a {type(layer).__name__}")
        layers.append(layer)
        tags.append(tag)
        pos += plen
    if pos != end:
        raise SerializationError(f"trailer: {end - pos} unexpected bytes after the last record "
                                 f"(layer<{count - 1}>) at offset {pos}")
    _check_structure(layers, lambda i: f"layer<{i}> record {tags[i]!r}" if 0 <= i < len(tags) else "file")
    crc = struct.unpack_from("<I", data, end)[0]
    if check_crc and crc != zlib.crc32(data[:end]):
        raise SerializationError(f"trailer: CRC-32 mismatch (stored {crc:08x}, computed "
                                 f"{zlib.crc32(data[:end]):08x}): the file is corrupted")
    net = None
    for layer in reversed(layers):
        net = Node(layer, net)
    return net, version, tags


def _read_all(src):
    if hasattr(src, "read"):
        data = src.read()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("deserialize: the file must be opened in binary mode ('rb')")
        return data
    with open(os.fspath(src), "rb") as f:
        return f.read()


def deserialize(src):
    """Load a network saved by :func:`serialize` from ``src``: a path or a binary file
    object (read to its end). Needs no code from the user: the file holds the whole
    structure. Raises SerializationError for anything that is not a valid file
    (OSError when the file cannot be read)."""
    return _decode(_read_all(src))[0]


def load_with_info(src):
    """Like deserialize, but returns (net, format_version, record tags top first)."""
    return _decode(_read_all(src))

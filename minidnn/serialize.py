"""The minidnn file format: ``serialize(net, dest)`` and ``deserialize(src) -> net``.

docs/FORMAT.md is the specification; this module is one implementation of it.
In short: a header (magic, format version, record count), then one record per
layer from the top of the network (layer<0>) down to its input, each starting
with a dlib-style version tag (``con_2``, ``affine_2`` ...), then a CRC-32
of everything before it. Nothing in a file is ever executed: a record tag
selects a reader from the table ``RECORDS``, and readers only parse numbers.

This module keeps the container, the registry and the checks. The records
themselves live with their layers (core.Layer: ``record``, ``settings``,
``params``, ``state``, ``old_records``, or ``write_record``/``read_record``):
every layer class that declares a record is registered here; ``register``
adds one by hand (a layer defined outside minidnn, say).

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

from . import ops
from .core import Node, layer_classes
from . import layers as _layers  # noqa: F401  (defines, and so registers, the layer classes)
from . import loss as _loss  # noqa: F401
from .layers.common import CONV, FC

MAGIC = b"MINIDNN\x00"
FORMAT_VERSION = 2
_HEADER_V1 = struct.Struct("<8sII")       # magic, format version, record count
_HEADER = struct.Struct("<8sIIQ")         # ... and (version 2) the file's length in bytes
_READ_VERSIONS = (1, 2)
_V1_MAX_BYTES = 1 << 34                   # a version-1 stream is read to its end, up to this
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

    def mode(self, v):
        if v not in (CONV, FC):
            raise SerializationError(f"mode is {v!r}: expected 'conv' or 'fc'")
        self.u8(0 if v == CONV else 1)

    def string(self, name, v):
        b = str(v).encode("ascii")
        if len(b) > 255:
            raise SerializationError(f"{name} {v!r} is longer than 255 bytes")
        self.u8(len(b))
        self._buf.write(b)

    def act(self, name, a):
        """An activation: its name (u8 length + ASCII), then its parameter (f64)."""
        a = ops.as_act(a)
        self.string(name, a.name)
        self.f64(a.param)

    def field(self, f, v):
        """One core.Field of a layer's settings."""
        if f.type == "u32":
            self.u32(f.name, v)
        elif f.type == "f64":
            self.f64(v)
        elif f.type == "bool":
            self.bool(v)
        elif f.type == "mode":
            self.mode(v)
        elif f.type == "act":
            self.act(f.name, v)
        else:
            raise SerializationError(f"field {f.name}: unknown field type {f.type!r}")

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

    def mode(self, name="mode"):
        m = self.u8(name)
        if m > 1:
            raise SerializationError(f"{name} is {m}: expected 0 (conv) or 1 (fc)")
        return CONV if m == 0 else FC

    def string(self, name):
        n = self.u8(f"{name} length")
        p = self._take(n, name)
        try:
            return bytes(self._data[p:p + n]).decode("ascii")
        except UnicodeDecodeError:
            raise SerializationError(f"{name} is not ASCII") from None

    def act(self, name="act"):
        a = self.string(name)
        p = self.f64(f"{name} parameter")
        try:
            act = ops.act_by_name(a, p)
        except KeyError:
            raise SerializationError(f"{name}: unknown activation {a!r}") from None
        if not np.isfinite(p):
            raise SerializationError(f"{name}: parameter {p!r} is not finite")
        if ops.act_param_name(act.code) is None and (p != 0 or np.signbit(p)):
            raise SerializationError(f"{name}: {a} has no parameter, but the record holds {p!r} "
                                     f"(expected 0)")
        return act

    def field(self, f):
        if f.type == "u32":
            return self.u32(f.name)
        if f.type == "f64":
            v = self.f64(f.name)
            if not np.isfinite(v):
                raise SerializationError(f"{f.name} is {v!r}: expected a finite number")
            return v
        if f.type == "bool":
            return self.bool(f.name)
        if f.type == "mode":
            return self.mode(f.name)
        if f.type == "act":
            return self.act(f.name)
        raise SerializationError(f"field {f.name}: unknown field type {f.type!r}")

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


# ----------------------------------------------------------------------------- records
# tag -> Record(cls, write, read, check). ``write(w, layer)`` is None for an older version
# that is only read; the newest registered record with a writer is the one written for
# ``cls``. ``read(r) -> layer``; ``check(layer)`` (optional) validates a layer's arrays
# against its settings, on save and on load.
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


def write_declared(w, layer):
    """The record of a layer from its declarations: disabled, its settings in order, then
    its ``params`` and ``state`` arrays."""
    w.bool(layer.disabled)
    for f in layer.settings:
        w.field(f, getattr(layer, f.name))
    for p in tuple(layer.params) + tuple(layer.state):
        w.array(p, getattr(layer, p), p.ndim)


def read_declared(cls, r):
    """The inverse of write_declared: the layer built from its settings (keyword
    arguments of its constructor), its arrays set, disabled last."""
    disabled = r.bool("disabled")
    layer = cls(**{f.name: r.field(f) for f in cls.settings})
    for p in tuple(cls.params) + tuple(cls.state):
        layer.set_array(p, r.array(p, p.ndim))
    if disabled:
        layer.disable()
    return layer


def _check(layer):
    try:
        layer.check_record()
    except SerializationError:
        raise
    except ValueError as e:
        raise SerializationError(str(e)) from None


def _register_layer_class(cls):
    """The records a layer class declares: its own (``record``) and its older ones."""
    if cls.write_record is not None:
        write = lambda w, l: l.write_record(w)                      # noqa: E731
    else:
        write = write_declared
    if cls.read_record is not None:
        read = lambda r, cls=cls, tag=cls.record: cls.read_record(r, tag)  # noqa: E731
    else:
        read = lambda r, cls=cls: read_declared(cls, r)             # noqa: E731
    for old, method in cls.old_records.items():
        register(old, cls, None, lambda r, cls=cls, m=method, t=old: getattr(cls, m)(r, t), _check)
    register(cls.record, cls, write, read, _check)


for _cls in layer_classes():
    _register_layer_class(_cls)


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
    if n == 0 or not layers[-1].is_input:
        raise SerializationError(f"{where(n - 1)}: the bottom layer must be an input_tensor")
    tags = set()
    for i in range(n - 1, -1, -1):
        l = layers[i]
        if l.is_input and i != n - 1:
            raise SerializationError(f"{where(i)}: an input_tensor can only be the bottom layer")
        if l.is_loss and i != 0:
            raise SerializationError(f"{where(i)}: a loss layer can only be the top layer (layer<0>)")
        for t in l.tags_used():
            if t not in tags:
                raise SerializationError(f"{where(i)}: there is no tag{t} below this layer")
        tags.update(l.tags_defined())


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
    chunks = []
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
        chunks.append(struct.pack("<B", len(t)) + t + struct.pack("<Q", len(payload)))
        chunks.append(payload)
    length = _HEADER.size + sum(len(c) for c in chunks) + 4
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, len(layers), length)
    crc = zlib.crc32(head)
    out.write(head)
    for c in chunks:
        crc = zlib.crc32(c, crc)
        out.write(c)
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


def serialize(net, dest=None, *, overwrite=False):
    """Save ``net`` (its whole structure, settings and parameters) to ``dest``: a path or a
    binary file object open for writing; with no ``dest``, return the file's bytes.

    Saving to a path is atomic: the file is written under a temporary name in the
    same folder (``.NAME.<random>.tmp``, locked while it is written), flushed and
    fsync'ed, then renamed over ``dest``; if anything fails the previous file is
    untouched and the temporary file removed. A temporary file of the same target
    left by a save that was killed (its lock is gone) is removed by the next save.
    A read-only ``dest`` is refused unless ``overwrite=True`` (as ``cp`` does).
    Raises SerializationError for a network the format cannot hold (an unregistered
    layer class, a skip without its tag, parameters of the wrong shape), and
    OSError naming ``dest`` when it cannot be written.
    """
    if dest is None:
        buf = io.BytesIO()
        _encode(net, buf)
        return buf.getvalue()
    if hasattr(dest, "write"):
        _encode(net, dest)
        return None
    atomic_write(dest, lambda f: _encode(net, f), overwrite=overwrite)
    return None


_TMP_RE = re.compile(r"\.(?P<base>.+)\.[0-9a-f]{8}\.tmp\Z")


def _lock(fd):
    """An exclusive lock on an open file, without waiting; False when someone holds it."""
    try:
        import fcntl
    except ImportError:             # no fcntl (Windows): temp files are never reclaimed
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def remove_stale_temp_files(path):
    """Remove the temporary files of ``path``'s earlier saves that died before renaming
    (``.NAME.<8 hex>.tmp`` in its folder, for the same NAME, that no live save holds
    locked). Returns the paths removed."""
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.match(name)
        if m is None or m.group("base") != base:
            continue
        tmp = os.path.join(folder, name)
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _lock(fd):           # nobody writes it: a dead save's leftover
                os.unlink(tmp)
                removed.append(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _check_target(path, overwrite):
    """OSError naming the user's path when it cannot be the target of a save."""
    if path == "":
        raise IsADirectoryError("cannot save to '': expected a file path")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save to {path!r}: it is a directory (expected a file path)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path!r}: the folder {folder!r} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK) and not overwrite:
        raise PermissionError(f"cannot save to {path!r}: the file is read-only "
                              f"(pass overwrite=True to replace it anyway)")


def atomic_write(path, write, overwrite=False):
    """Write a file atomically: ``write(f)`` fills a temporary file in the same folder
    (binary, locked while it is written), which is flushed, fsync'ed and renamed over
    ``path``; the folder is fsync'ed too. If anything fails, the previous file is
    untouched and the temporary file removed; temporary files of earlier saves of
    ``path`` that were killed are removed first (remove_stale_temp_files)."""
    path = os.fspath(path)
    _check_target(path, overwrite)
    remove_stale_temp_files(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    while True:
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise type(e)(e.errno, f"cannot save to {path!r}: {e.strerror}") from None
    _lock(fd)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            try:                    # keep the permissions of the file being replaced
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) | stat.S_IWUSR)
                if not os.access(path, os.W_OK):     # overwrite=True of a read-only file
                    os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            except OSError:
                pass
            os.replace(tmp, path)   # renamed while still locked: no one can mistake it
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
    version, count, head = _parse_header(data)
    if version >= 2:
        length = struct.unpack_from("<Q", data, _HEADER_V1.size)[0]
        if length != size:
            raise SerializationError(f"header: the file declares {length} bytes but has {size}")
    # the smallest record is 1 + 1 + 8 bytes (a 1-letter tag, an empty payload)
    if count < 1 or count * 10 > size - head - 4:
        raise SerializationError(f"header: record count {count} is impossible for a file of {size} bytes")
    pos = head
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


def _parse_header(data):
    """(version, record count, header size) of a file whose first bytes are ``data``."""
    size = len(data)
    if size < _HEADER_V1.size:
        raise SerializationError(f"header: the file has {size} bytes, too short for a minidnn "
                                 f"header ({_HEADER_V1.size} bytes)")
    magic, version, count = _HEADER_V1.unpack_from(data, 0)
    if magic != MAGIC:
        raise SerializationError(f"header: wrong magic {bytes(magic)!r}: not a minidnn file "
                                 f"(expected {MAGIC!r})")
    if version not in _READ_VERSIONS:
        raise SerializationError(f"header: unsupported format version {version} "
                                 f"(this minidnn reads versions {', '.join(map(str, _READ_VERSIONS))})")
    head = _HEADER.size if version >= 2 else _HEADER_V1.size
    if size < head:
        raise SerializationError(f"header: the file has {size} bytes, too short for a version "
                                 f"{version} header ({head} bytes)")
    return version, count, head


def _read_exactly(f, n, what):
    """n bytes from f (chunk by chunk: a short stream raises, an endless one is not read past)."""
    parts, got = [], 0
    while got < n:
        b = f.read(min(n - got, 1 << 24))
        if not isinstance(b, (bytes, bytearray)):
            raise TypeError("deserialize: the file must be opened in binary mode ('rb')")
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _read_file(f):
    """The bytes of one minidnn file from the binary stream f, reading no more than its
    header declares (version 2), or, for version 1, its end (at most _V1_MAX_BYTES)."""
    first = _read_exactly(f, _HEADER.size, "header")
    version, _, _ = _parse_header(first)          # a wrong magic stops here: /dev/zero too
    if version >= 2:
        length = struct.unpack_from("<Q", first, _HEADER_V1.size)[0]
        if length < _HEADER.size + 4:
            raise SerializationError(f"header: declared length {length} is too short for a file")
        size = _file_size(f)
        if size is not None and length > size:
            raise SerializationError(f"header: the file declares {length} bytes but has {size}")
        if length > _V1_MAX_BYTES and size is None:
            raise SerializationError(f"header: declared length {length} exceeds what a stream may hold")
        rest = _read_exactly(f, length - _HEADER.size, "file")
        data = first + rest
        if len(data) < length:
            raise SerializationError(f"the file ends after {len(data)} bytes, before the "
                                     f"{length} its header declares")
        if f.read(1):
            raise SerializationError(f"trailer: unexpected bytes after the {length} bytes the "
                                     f"header declares")
        return data
    data = first + _read_exactly(f, _V1_MAX_BYTES, "file")
    if len(data) > _V1_MAX_BYTES:
        raise SerializationError("a version-1 stream longer than 16 GiB is refused")
    return data


def _file_size(f):
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _read_all(src):
    if isinstance(src, (bytes, bytearray, memoryview)):
        return src
    if hasattr(src, "read"):
        return _read_file(src)
    with open(os.fspath(src), "rb") as f:
        return _read_file(f)


def deserialize(src):
    """Load a network saved by :func:`serialize` from ``src``: the file's bytes, a path, or
    a binary file object (read up to the end of the file its header declares). Needs no
    code from the user: the file holds the whole structure. Raises SerializationError
    for anything that is not a valid file (OSError when the file cannot be read)."""
    return _decode(_read_all(src))[0]


def load_with_info(src):
    """Like deserialize, but returns (net, format_version, record tags top first)."""
    return _decode(_read_all(src))

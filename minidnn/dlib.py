"""dlib's DNN file format: ``load_dlib(path, net=None)``, ``save_dlib(net, path)``,
``dlib_type(net)`` and ``inspect_dlib(path)``.

A dlib file is what dlib's ``serialize(net)`` writes (dlib/serialize.h, dlib/dnn/core.h and
every layer's serialize/deserialize in dlib/dnn/layers.h, input.h, loss.h; docs/DLIB.md and
../shared/dlib-models/FORMAT-NOTES.md describe it). It has no header: a loss wrapper's
version and record, one version int per wrapper from the outside in, the input layer, then
each layer's record and bookkeeping going back out. Tag and skip wrappers store no tag
number, add_prev_ and friends store none either and concat_ only how many tags it joins,
so, as in dlib, the network's topology comes from the caller: ``load_dlib(path, net)``
fills ``net``, built with the same factories as dlib's ``using net_type = ...``, and
checks every record against its layer; a file whose structure needs no tags loads with
``load_dlib(path)`` alone.

Reading never executes anything and never trusts a size: every count and dimension is
checked against the bytes left before anything is allocated, the nesting depth and the
parser's backtracking are bounded, and every problem raises
:class:`~minidnn.serialize.SerializationError` naming the record (its dlib version tag),
the layer and the byte offset. Files compressed with bzip2 (``.bz2``, as dlib.net serves
them) are read too (at most 4 GiB of decompressed data).
"""
import bz2
import copy
import io
import math
import os
import struct
import sys
import weakref

import numpy as np

from . import ops
from .core import IDENTITY, Node
from .serialize import SerializationError, atomic_write

_MAX_BYTES = 1 << 32          # a (decompressed) file larger than this is refused
_MAX_NEST = 20000             # wrappers nested inside one another
_MAX_ALTS = 8                 # readings of one position kept by the parser
_MAX_STEPS = 400000           # parser steps (each one a wrapper tried at a position)
_MAX_TAG = 128                # the longest version string accepted


# ============================================================================ primitives
class _Fail(Exception):
    """A reading that does not continue validly at ``pos`` (the parser backtracks)."""

    def __init__(self, pos, msg, rank=0):
        super().__init__(msg)
        self.pos, self.msg, self.rank = pos, msg, rank


class _Src:
    """The bytes of a file and the primitive decoders of dlib/serialize.h; each takes a
    position and returns (value, next position), raising _Fail past the end or on a value
    dlib would refuse."""

    def __init__(self, data):
        self.d = bytes(data) if not isinstance(data, bytes) else data
        self.n = len(self.d)
        self.worst = None         # the furthest failure seen (the error to report)

    def fail(self, pos, msg, rank=0):
        f = _Fail(pos, msg, rank)
        w = self.worst
        if w is None or (pos, rank) > (w.pos, w.rank):
            self.worst = f
        return f

    def _need(self, pos, n, what):
        if n > self.n - pos:
            raise self.fail(pos, f"{what} needs {n} bytes but the file has {max(self.n - pos, 0)} left")

    def byte(self, pos, what):
        self._need(pos, 1, what)
        return self.d[pos], pos + 1

    def sint(self, pos, what, size=8):
        """A compact signed int of at most ``size`` bytes (pack_int/unpack_int)."""
        self._need(pos, 1, what)
        c = self.d[pos]
        n = c & 0x0F
        if n == 0 or n > size:
            raise self.fail(pos, f"{what}: byte {c:#04x} is not the control byte of an integer "
                                 f"of at most {size} bytes")
        self._need(pos + 1, n, what)
        v = int.from_bytes(self.d[pos + 1:pos + 1 + n], "little")
        return (-v if c & 0x80 else v), pos + 1 + n

    def uint(self, pos, what, size=8):
        self._need(pos, 1, what)
        c = self.d[pos] & 0x8F
        if c == 0 or c > size:
            raise self.fail(pos, f"{what}: byte {self.d[pos]:#04x} is not the control byte of an "
                                 f"unsigned integer of at most {size} bytes")
        self._need(pos + 1, c, what)
        return int.from_bytes(self.d[pos + 1:pos + 1 + c], "little"), pos + 1 + c

    def real(self, pos, what, single=False):
        """A float/double as float_details (int64 mantissa, int16 exponent); ``single``:
        the C++ field is a float (the mantissa is rounded to float first, as dlib does)."""
        self._need(pos, 1, what)
        if self.d[pos] & 0x70:
            raise self.fail(pos, f"{what}: dlib's old ASCII number format is not supported "
                                 f"(byte {self.d[pos]:#04x})")
        m, p = self.sint(pos, f"{what} mantissa", 8)
        e, p = self.sint(p, f"{what} exponent", 2)
        if e == 32000:
            return math.inf, p
        if e == 32001:
            return -math.inf, p
        if e >= 32000:
            return math.nan, p
        if single:
            with np.errstate(over="ignore", under="ignore"):
                return float(np.ldexp(np.float32(m), e)), p
        try:
            return math.ldexp(float(m), e), p
        except OverflowError:
            return (math.inf if m > 0 else -math.inf), p

    def boolean(self, pos, what):
        self._need(pos, 1, what)
        c = self.d[pos]
        if c not in (0x30, 0x31):
            raise self.fail(pos, f"{what}: byte {c:#04x} is not a bool ('0' or '1')")
        return c == 0x31, pos + 1

    def string(self, pos, what, limit=None):
        n, p = self.uint(pos, f"{what} length")
        if limit is not None and n > limit:
            raise self.fail(pos, f"{what}: a string of {n} bytes (at most {limit} expected)")
        self._need(p, n, what)
        return self.d[p:p + n], p + n

    def tag(self, pos, what):
        """A version string: printable ASCII, at most _MAX_TAG bytes."""
        b, p = self.string(pos, what, _MAX_TAG)
        if not b or any(ch < 0x21 or ch > 0x7E for ch in b):
            raise self.fail(pos, f"{what}: {bytes(b)[:40]!r} is not a dlib version string")
        return b.decode("ascii"), p

    def tensor(self, pos, what):
        """A resizable_tensor: version 2, four dims, raw float32 data. Returns (_Tensor, pos):
        the shape and where the data is (read later, only for the parse that is kept)."""
        v, p = self.sint(pos, f"{what} version", 4)
        if v != 2:
            raise self.fail(pos, f"{what}: tensor version {v} (dlib writes 2)")
        dims = []
        for d in ("num_samples", "k", "nr", "nc"):
            x, p = self.sint(p, f"{what} {d}", 8)
            if x < 0:
                raise self.fail(p, f"{what}: negative dimension {d} = {x}")
            dims.append(x)
        count = dims[0] * dims[1] * dims[2] * dims[3]
        if 4 * count > self.n - p:
            raise self.fail(p, f"{what}: a tensor of shape {tuple(dims)} needs {4 * count} bytes "
                               f"but the file has {self.n - p} left")
        return _Tensor(tuple(dims), p, self), p + 4 * count

    def alias(self, pos, what):
        v, p = self.sint(pos, f"{what} version", 4)
        if v != 1:
            raise self.fail(pos, f"{what}: alias_tensor version {v} (dlib writes 1)")
        dims = []
        for d in ("num_samples", "k", "nr", "nc"):
            x, p = self.sint(p, f"{what} {d}", 8)
            if x < 0:
                raise self.fail(p, f"{what}: negative dimension {d} = {x}")
            dims.append(x)
        return tuple(dims), p


class _Tensor:
    """A tensor in the file: its shape and the offset of its data."""

    __slots__ = ("shape", "offset", "src")

    def __init__(self, shape, offset, src):
        self.shape, self.offset, self.src = shape, offset, src

    @property
    def size(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    def array(self):
        """The data as a new float32 array of the tensor's shape."""
        return np.frombuffer(self.src.d, "<f4", self.size, self.offset).astype(np.float32).reshape(self.shape)


# ============================================================================ record layouts
# Each dlib version string read by this module, with its fields in file order:
# i int, u unsigned, r double, f float, b bool, T tensor, A alias_tensor.
_CON = [("params", "T"), ("num_filters", "i"), ("nr", "i"), ("nc", "i"), ("stride_y", "i"),
        ("stride_x", "i"), ("padding_y", "i"), ("padding_x", "i"), ("filters", "A"),
        ("biases", "A"), ("learning_rate_multiplier", "r"), ("weight_decay_multiplier", "r"),
        ("bias_learning_rate_multiplier", "r"), ("bias_weight_decay_multiplier", "r")]
_FC = [("num_outputs", "u"), ("num_inputs", "u"), ("params", "T"), ("weights", "A"),
       ("biases", "A"), ("bias_mode", "i"), ("learning_rate_multiplier", "r"),
       ("weight_decay_multiplier", "r"), ("bias_learning_rate_multiplier", "r"),
       ("bias_weight_decay_multiplier", "r")]
_BN = [("params", "T"), ("gamma", "A"), ("beta", "A"), ("means", "T"), ("invstds", "T"),
       ("running_means", "T"), ("running_variances", "T"), ("num_updates", "u"),
       ("running_stats_window_size", "u"), ("learning_rate_multiplier", "r"),
       ("weight_decay_multiplier", "r"), ("bias_learning_rate_multiplier", "r"),
       ("bias_weight_decay_multiplier", "r"), ("eps", "r")]
_AFFINE = [("params", "T"), ("gamma", "A"), ("beta", "A"), ("mode", "i")]
_POOL = [("nr", "i"), ("nc", "i"), ("stride_y", "i"), ("stride_x", "i"), ("padding_y", "i"),
         ("padding_x", "i")]
_MEANS = [("avg_red", "f"), ("avg_green", "f"), ("avg_blue", "f")]

# version string -> (kind, fields)
LAYER_RECORDS = {
    "con_4": ("con", _CON), "con_5": ("con", _CON + [("use_bias", "b")]),
    "con_6": ("con", _CON + [("use_bias", "b"), ("use_relu", "b")]),
    "cont_1": ("cont", _CON), "cont_2": ("cont", _CON + [("use_bias", "b")]),
    "fc_2": ("fc", _FC), "fc_3": ("fc", _FC + [("use_bias", "b")]),
    "bn_con2": ("bn", _BN), "bn_fc2": ("bn", _BN),
    "affine_": ("affine", _AFFINE), "affine_2": ("affine", _AFFINE + [("disabled", "b")]),
    "relu_": ("relu", []), "relu_2": ("relu", [("disabled", "b")]),
    "prelu_": ("prelu", [("params", "T"), ("initial_param_value", "f")]),
    "leaky_relu_": ("leaky_relu", [("alpha", "f")]), "sig_": ("sig", []), "mish_": ("mish", []),
    "htan_": ("htan", []), "clipped_relu_": ("clipped_relu", [("ceiling", "f")]),
    "elu_": ("elu", [("alpha", "f")]), "gelu_": ("gelu", []), "smelu_": ("smelu", [("beta", "f")]),
    "silu_": ("silu", []), "softmax_": ("softmax", []), "softmax_all_": ("softmax_all", []),
    "max_pool_2": ("max_pool", _POOL), "avg_pool_2": ("avg_pool", _POOL),
    "add_prev_": ("add_prev", []), "mult_prev_": ("mult_prev", []),
    "resize_prev_to_tagged_": ("resize_prev_to_tagged", []),
    "scale_": ("scale", [("reshape_scales", "A"), ("reshape_src", "A")]),
    "scale_prev_": ("scale_prev", [("reshape_scales", "A"), ("reshape_src", "A")]),
    "concat_": ("concat", [("tag_count", "u")]),
    "multiply_": ("multiply", [("val", "f")]),
    "dropout_": ("dropout", [("drop_rate", "f"), ("mask", "T")]),
    "l2normalize_": ("l2normalize", [("eps", "r")]),
    "extract_": ("extract", [("offset", "i"), ("k", "i"), ("nr", "i"), ("nc", "i")]),
    "reorg_": ("reorg", [("row_stride", "i"), ("col_stride", "i")]),
    "upsample_": ("upsample", [("scale_y", "i"), ("scale_x", "i")]),
    "resize_to_": ("resize_to", [("nr", "i"), ("nc", "i"), ("scale_y", "r"), ("scale_x", "r")]),
}
INPUT_RECORDS = {
    "input_rgb_image": ("input_rgb_image", _MEANS),
    "input_rgb_image_sized": ("input_rgb_image_sized", _MEANS + [("nr", "u"), ("nc", "u")]),
    "input<matrix>": ("input_matrix", []),
    "input_rgb_image_pyramid": ("input_rgb_image_pyramid", _MEANS),
    "input_rgb_image_pyramid2": ("input_rgb_image_pyramid",
                                 _MEANS + [("pyramid_padding", "u"), ("pyramid_outer_padding", "u")]),
    "input_grayscale_image_pyramid": ("input_grayscale_image_pyramid",
                                      [("pyramid_padding", "u"), ("pyramid_outer_padding", "u")]),
    "input_tensor": ("input_tensor", []),
}
LOSS_RECORDS = {
    "loss_multiclass_log_": ("loss_multiclass_log", []),
    "loss_metric_": ("loss_metric", []),
    "loss_metric_2": ("loss_metric", [("margin", "f"), ("dist_thresh", "f")]),
    "loss_mmod_": ("loss_mmod", None),
    "loss_binary_log_": ("loss_binary_log", []), "loss_binary_hinge_": ("loss_binary_hinge", []),
    "loss_multibinary_log_": ("loss_multibinary_log", []),
    "loss_multibinary_log_2": ("loss_multibinary_log", [("gamma", "r")]),
    "loss_multiclass_log_weighted_": ("loss_multiclass_log_weighted", []),
    "loss_mean_squared_": ("loss_mean_squared", []),
    "loss_mean_squared_multioutput_": ("loss_mean_squared_multioutput", []),
    "loss_multiclass_log_per_pixel_": ("loss_multiclass_log_per_pixel", []),
    "loss_binary_log_per_pixel_": ("loss_binary_log_per_pixel", []),
    "loss_mean_squared_per_pixel_": ("loss_mean_squared_per_pixel", []),
    "loss_mean_squared_per_channel_and_pixel_": ("loss_mean_squared_per_pixel", []),
}
# dlib layers minidnn has no layer for (named in the error of a file that uses one)
UNSUPPORTED = ("layer_norm_", "rms_norm_", "linear_", "reshape_to_", "multm_prev_", "slice_",
               "transpose_", "positional_encodings_", "embeddings_", "tril_", "act_",
               "input_rgb_image_pair", "input<array2d>", "input<array<matrix>>", "loss_ranking_",
               "loss_epsilon_insensitive_", "loss_multimulticlass_log_", "loss_dot_", "loss_yolo_",
               "loss_barlow_twins_", "loss_multiclass_log_per_pixel_weighted_")


class _Rec:
    """One record as read: its kind (con, fc, bn ...), its dlib version string, the offset
    of that string, and its fields by name."""

    __slots__ = ("kind", "tag", "offset", "end", "fields")

    def __init__(self, kind, tag, offset, end, fields):
        self.kind, self.tag, self.offset, self.end, self.fields = kind, tag, offset, end, fields

    def __getitem__(self, k):
        return self.fields[k]

    def get(self, k, default=None):
        return self.fields.get(k, default)


def _read_fields(src, pos, layout, what):
    vals = {}
    for name, code in layout:
        w = f"{what} field {name}"
        if code == "i":
            vals[name], pos = src.sint(pos, w)
        elif code == "u":
            vals[name], pos = src.uint(pos, w)
        elif code == "r":
            vals[name], pos = src.real(pos, w)
        elif code == "f":
            vals[name], pos = src.real(pos, w, single=True)
        elif code == "b":
            vals[name], pos = src.boolean(pos, w)
        elif code == "T":
            vals[name], pos = src.tensor(pos, w)
        elif code == "A":
            vals[name], pos = src.alias(pos, w)
        else:  # pragma: no cover
            raise AssertionError(code)
    return vals, pos


def _read_record(src, pos, table, what):
    start = pos
    tag, pos = src.tag(pos, f"{what} version string")
    spec = table.get(tag)
    if spec is None:
        if tag in UNSUPPORTED:
            raise src.fail(start, f"record {tag!r}: dlib's {tag.rstrip('_')} is not supported by "
                                  f"minidnn", rank=3)
        others = LAYER_RECORDS if table is not LAYER_RECORDS else INPUT_RECORDS
        rank = 1 if tag in others or tag in LOSS_RECORDS else 2
        raise src.fail(start, f"unknown {what} record {tag!r}", rank=rank)
    kind, layout = spec
    what = f"record {tag!r}"
    if layout is None:                   # loss_mmod_
        fields, pos = _read_mmod_options(src, pos, what)
    else:
        fields, pos = _read_fields(src, pos, layout, what)
    return _Rec(kind, tag, start, pos, fields), pos


def _read_mmod_options(src, pos, what):
    v, pos = src.sint(pos, f"{what} mmod_options version", 4)
    if not 1 <= v <= 4:
        raise src.fail(pos, f"{what}: mmod_options version {v} (dlib reads 1 to 4)", rank=2)
    f = {"options_version": v}
    wins = []
    if v == 1:
        w, pos = src.uint(pos, f"{what} window width")
        h, pos = src.uint(pos, f"{what} window height")
        wins.append((w, h, ""))
    else:
        n, p0 = src.uint(pos, f"{what} number of detector windows")
        if n > (src.n - p0) // 6:
            raise src.fail(pos, f"{what}: {n} detector windows cannot fit in the file")
        pos = p0
        for j in range(n):
            dv, pos = src.sint(pos, f"{what} window {j} version", 4)
            if dv not in (1, 2):
                raise src.fail(pos, f"{what}: detector window version {dv} (dlib reads 1 and 2)")
            w, pos = src.uint(pos, f"{what} window {j} width")
            h, pos = src.uint(pos, f"{what} window {j} height")
            label = ""
            if dv == 2:
                b, pos = src.string(pos, f"{what} window {j} label", 1 << 16)
                try:
                    label = b.decode("utf-8")
                except UnicodeDecodeError:
                    raise src.fail(pos, f"{what}: window {j}'s label is not UTF-8") from None
            wins.append((w, h, label))
    f["detector_windows"] = wins
    for name in ("loss_per_false_alarm", "loss_per_missed_target", "truth_match_iou_threshold",
                 "nms_iou_thresh", "nms_percent_covered_thresh", "ignore_iou_thresh",
                 "ignore_percent_covered_thresh"):
        f[name], pos = src.real(pos, f"{what} {name}")
    f["assume_image_pyramid"] = 1
    f["use_bounding_box_regression"], f["bbr_lambda"] = False, 100.0
    if v >= 3:
        f["assume_image_pyramid"], pos = src.byte(pos, f"{what} assume_image_pyramid")
    if v >= 4:
        f["use_bounding_box_regression"], pos = src.boolean(pos, f"{what} use_bounding_box_regression")
        f["bbr_lambda"], pos = src.real(pos, f"{what} bbr_lambda")
    return f, pos


# ============================================================================ structure
# Parse trees (dlib/dnn/core.h):
#   ("loss", rec, net)                                   add_loss_layer
#   ("layer", offset, version, rec, flags, net | None)  add_layer (None: over the input,
#                                                        whose record is flags["input"])
#   ("tag", offset, version, net | None, flags)         add_tag_layer / add_skip_layer
#   ("repeat", offset, [block nets], net)               repeat
# A block of a repeat is a net over dlib's repeat_input_layer, which stores nothing.
class _Parser:
    def __init__(self, src):
        self.src = src
        self.memo = {}
        self.steps = 0

    def _step(self, pos):
        self.steps += 1
        if self.steps > _MAX_STEPS:
            raise SerializationError(f"the structure at byte offset {pos} is too ambiguous to "
                                     f"read (more than {_MAX_STEPS} readings tried)")

    def _book(self, pos, version, over_input):
        """The add_layer bookkeeping after the layer's record: 3 bools, tensors."""
        s = self.src
        flags = {}
        for name in ("this_layer_setup_called", "gradient_input_is_stale",
                     "get_output_and_gradient_input_disabled"):
            flags[name], pos = s.boolean(pos, f"add_layer {name}")
        _, pos = s.tensor(pos, "add_layer x_grad")
        _, pos = s.tensor(pos, "add_layer cached_output")
        if over_input:
            _, pos = s.tensor(pos, "add_layer grad_final")
            if version >= 3:
                flags["sample_expansion_factor"], pos = s.uint(pos, "add_layer sample_expansion_factor", 4)
        elif version >= 2:
            _, pos = s.tensor(pos, "add_layer params_grad")
        return flags, pos

    def _input(self, pos, block):
        if block:
            return None, pos
        return _read_record(self.src, pos, INPUT_RECORDS, "input layer")

    def net(self, pos, block, depth):
        key = (pos, block)
        got = self.memo.get(key)
        if got is not None:
            return got
        self._step(pos)
        s = self.src
        alts = []
        if depth > _MAX_NEST:
            raise SerializationError(f"the network at byte offset {pos} is nested more than "
                                     f"{_MAX_NEST} wrappers deep")
        try:
            v, p1 = s.sint(pos, "a wrapper's version", 4)
        except _Fail:
            self.memo[key] = alts
            return alts
        if v not in (1, 2, 3):
            s.fail(pos, f"wrapper version {v} (dlib writes 1 to 3)")
        if v in (1, 2):                                   # add_layer<LAYER, SUBNET>
            for sub, e in self.net(p1, block, depth + 1):
                try:
                    rec, e2 = _read_record(s, e, LAYER_RECORDS, "layer")
                    flags, e3 = self._book(e2, v, False)
                    alts.append((("layer", pos, v, rec, flags, sub), e3))
                except _Fail:
                    pass
        if v in (2, 3):                                   # add_layer<LAYER, INPUT>
            try:
                inp, e = self._input(p1, block)
                rec, e2 = _read_record(s, e, LAYER_RECORDS, "layer")
                flags, e3 = self._book(e2, v, True)
                flags["input"] = inp
                alts.append((("layer", pos, v, rec, flags, None), e3))
            except _Fail:
                pass
        if v == 1:                                        # add_tag_layer / add_skip_layer
            for sub, e in self.net(p1, block, depth + 1):
                alts.append((("tag", pos, 1, sub, {}), e))
        if v in (1, 2):                                   # add_tag_layer<ID, INPUT>
            try:
                inp, e = self._input(p1, block)
                _, e = s.tensor(e, "tag cached_output")
                _, e = s.tensor(e, "tag grad_final")
                flags = {"input": inp}
                flags["gradient_input_is_stale"], e = s.boolean(e, "tag gradient_input_is_stale")
                if v >= 2:
                    flags["sample_expansion_factor"], e = s.uint(e, "tag sample_expansion_factor", 4)
                alts.append((("tag", pos, v, None, flags), e))
            except _Fail:
                pass
        if v == 1:                                        # repeat<N, BLOCK, SUBNET>
            try:
                alts.extend(self._repeat(pos, p1, block, depth))
            except _Fail:
                pass
        self.memo[key] = alts[:_MAX_ALTS]
        return self.memo[key]

    def _repeat(self, pos, p1, block, depth):
        s = self.src
        n, p = s.uint(p1, "repeat count")
        if not 1 <= n <= (s.n - p) // 4:
            raise s.fail(p1, f"repeat count {n} cannot fit in the file")
        partial = {p: []}                 # end position -> the blocks read so far
        for _ in range(n):
            nxt = {}
            for start, blocks in partial.items():
                for t, e in self.net(start, True, depth + 1):
                    if e not in nxt and len(nxt) < _MAX_ALTS:
                        nxt[e] = blocks + [t]
            if not nxt:
                raise s.fail(p, "a repeat block does not parse")
            partial = nxt
        out = []
        for e, blocks in partial.items():
            for sub, e2 in self.net(e, block, depth + 1):
                out.append((("repeat", pos, blocks, sub), e2))
        return out

    def top(self):
        """Every reading of the file from byte 0: [(tree, end)]."""
        s = self.src
        alts = []
        try:
            v, p = s.sint(0, "the loss wrapper's version", 4)
            if v == 1:
                rec, p2 = _read_record(s, p, LOSS_RECORDS, "loss layer")
                for sub, e in self.net(p2, False, 1):
                    alts.append((("loss", rec, sub), e))
        except _Fail:
            pass
        alts.extend(self.net(0, False, 0))
        return alts


class Entry:
    """One layer of a dlib file, as ``print(net)`` numbers them (layer<i>): ``what`` is
    "loss", "layer", "tag" (a tag or a skip: the bytes do not say which) or "input";
    ``rec`` its record (None for tags); ``offset`` where its wrapper's bytes start (the
    record's version string for the loss and the input); ``flags`` the wrapper's
    bookkeeping; ``repeat`` (index of the repeat, block) when it sits in a repeat block."""

    __slots__ = ("what", "rec", "offset", "version", "flags", "repeat")

    def __init__(self, what, rec, offset, version=None, flags=None, repeat=None):
        self.what, self.rec, self.offset, self.version = what, rec, offset, version
        self.flags, self.repeat = flags or {}, repeat

    @property
    def tag(self):
        return self.rec.tag if self.rec is not None else "tag|skip"

    @property
    def record_offset(self):
        return self.rec.offset if self.rec is not None else self.offset


def _flatten(tree):
    """The entries of a parse tree, top first (iteratively: trees nest deeply)."""
    out = []
    stack = [(tree, None)]
    nrep = [0]
    while stack:
        t, rep = stack.pop()
        kind = t[0]
        if kind == "loss":
            out.append(Entry("loss", t[1], t[1].offset))
            stack.append((t[2], rep))
        elif kind == "layer":
            _, off, v, rec, flags, sub = t
            out.append(Entry("layer", rec, off, v, flags, rep))
            if sub is not None:
                stack.append((sub, rep))
            elif flags.get("input") is not None:
                out.append(Entry("input", flags["input"], flags["input"].offset))
        elif kind == "tag":
            _, off, v, sub, flags = t
            out.append(Entry("tag", None, off, v, flags, rep))
            if sub is not None:
                stack.append((sub, rep))
            elif flags.get("input") is not None:
                out.append(Entry("input", flags["input"], flags["input"].offset))
        elif kind == "repeat":
            _, off, blocks, sub = t
            r = nrep[0]
            nrep[0] += 1
            stack.append((sub, rep))
            for b in range(len(blocks) - 1, -1, -1):
                stack.append((blocks[b], (r, b, len(blocks))))
    return out


def _data(src):
    """The bytes of a dlib file: a path (plain or bzip2), a binary file object, or bytes."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif hasattr(src, "read"):
        data = src.read(_MAX_BYTES + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("load_dlib: the file must be opened in binary mode ('rb')")
    else:
        path = os.fspath(src)
        with open(path, "rb") as f:
            data = f.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise SerializationError(f"the file is larger than {_MAX_BYTES} bytes")
    if data[:3] == b"BZh":
        try:
            d = bz2.BZ2Decompressor()
            out = d.decompress(data, _MAX_BYTES + 1)
        except (OSError, ValueError, EOFError) as e:
            raise SerializationError(f"bzip2: the compressed file is corrupted ({e})") from None
        if len(out) > _MAX_BYTES:
            raise SerializationError(f"bzip2: the file decompresses to more than {_MAX_BYTES} bytes")
        if not d.eof:
            raise SerializationError("bzip2: the compressed file is truncated")
        data = out
    return data


def _parse(data):
    """(entries, end offset, src) of the first complete reading of a dlib file (all the
    readings when there are several: [(entries, end)])."""
    src = _Src(data)
    if src.n == 0:
        raise SerializationError("the file is empty: not a dlib network file")
    if data[:8] == b"MINIDNN\x00":
        raise SerializationError("this is a minidnn file, not a dlib one: load it with "
                                 "minidnn.deserialize")
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 6 * _MAX_NEST + 1000))
    try:
        alts = _Parser(src).top()
    except RecursionError:
        raise SerializationError("the network is nested too deeply to read") from None
    finally:
        sys.setrecursionlimit(old)
    readings = []
    for tree, end in alts:
        ent = _flatten(tree)
        if ent and ent[-1].what == "input":
            readings.append((ent, end))
    if not readings:
        w = src.worst
        if w is None:
            raise SerializationError("not a dlib network file (no reading of its first bytes)")
        raise SerializationError(f"not a dlib network file, or a corrupted one: {w.msg} at byte "
                                 f"offset {w.pos}")
    readings.sort(key=lambda r: -r[1])          # the reading that consumes the most first
    return readings, src


# ============================================================================ minidnn side
def _layers():
    from . import layers
    return layers


def _lc(name):
    """The minidnn layer class ``name`` (None when this minidnn has none yet)."""
    from . import layers, loss, mmod
    for mod in (layers, loss, mmod):
        c = getattr(mod, name, None)
        if c is not None:
            return c
    return None


# Per-layer dlib details minidnn's layers do not hold (learning-rate multipliers, bias
# modes, the wrapper's bookkeeping flags, alias shapes): kept from a file so that
# save_dlib writes it back as it was read.
_extras = weakref.WeakKeyDictionary()


def dlib_extras(layer):
    """The dlib details kept for ``layer`` from the file it was loaded from (a dict)."""
    try:
        return _extras.setdefault(layer, {})
    except TypeError:
        return {}


class _Mismatch(Exception):
    pass


def _where(i, layer, e):
    kind = layer.kind if layer is not None else (e.rec.kind if e.rec is not None else "tag|skip")
    return f"layer<{i}> {kind}: record {e.tag!r} at byte offset {e.record_offset}"


def _arr(t):
    return t.array() if isinstance(t, _Tensor) else np.asarray(t, np.float32)


def _as_int(v, what):
    if not -(1 << 31) <= v < (1 << 31):
        raise _Mismatch(f"{what} = {v} is out of range")
    return int(v)


# ---------------------------------------------------------------------------- records -> layers
def _con_params(rec):
    """(filters (F, K, nr, nc), biases (F,) or None, use_bias) of a con_/cont_ record,
    checked against its aliases and settings."""
    f = rec.fields
    nf, nr, nc = f["num_filters"], f["nr"], f["nc"]
    fa = f["filters"]
    params = f["params"]
    use_bias = f.get("use_bias", True)
    if rec.kind == "con":
        if fa[0] != nf or fa[2:] != (nr, nc):
            raise _Mismatch(f"the filters alias {fa} does not fit num_filters={nf}, nr={nr}, nc={nc}")
    nfl = fa[0] * fa[1] * fa[2] * fa[3]
    nbias = nf if use_bias else 0
    if params.size == 0:
        raise _Mismatch("the layer has no parameters (it was saved before it ever ran)")
    if params.size not in (nfl + nbias, nfl + nf) or (use_bias and params.size != nfl + nf):
        raise _Mismatch(f"params has {params.size} values, expected {nfl + nbias} "
                        f"(filters {fa}{' + ' + str(nf) + ' biases' if use_bias else ''})")
    p = params.array().reshape(-1)
    w = p[:nfl].reshape(fa).copy()
    b = p[nfl:nfl + nf].copy() if use_bias else None
    return w, b, bool(use_bias)


def _fc_params(rec):
    f = rec.fields
    no, ni = f["num_outputs"], f["num_inputs"]
    has_bias = f["bias_mode"] == 0 and f.get("use_bias", True)
    params = f["params"]
    if f["bias_mode"] not in (0, 1):
        raise _Mismatch(f"bias_mode {f['bias_mode']} (dlib: 0 FC_HAS_BIAS, 1 FC_NO_BIAS)")
    if params.size == 0:
        raise _Mismatch("the layer has no parameters (it was saved before it ever ran)")
    rows = params.size // max(no, 1)
    if no < 1 or params.size % no or rows not in (ni, ni + 1) or (has_bias and rows != ni + 1):
        raise _Mismatch(f"params has {params.size} values, expected {(ni + has_bias) * no} "
                        f"({ni} inputs{' + 1 bias row' if has_bias else ''} x {no} outputs)")
    p = params.array().reshape(rows, no)
    w = np.ascontiguousarray(p[:ni].T)              # dlib: input-major, (D, O) -> (O, D)
    b = p[ni].copy() if has_bias else None
    return w, b, has_bias


def _bn_arrays(rec):
    f = rec.fields
    params = f["params"].array().reshape(-1)
    k = f["gamma"]
    n = k[0] * k[1] * k[2] * k[3]
    if params.size != 2 * n or f["beta"] != k:
        raise _Mismatch(f"params has {params.size} values, expected gamma and beta of {k}")
    rm = f["running_means"].array().reshape(-1)
    rv = f["running_variances"].array().reshape(-1)
    if rm.size != n or rv.size != n:
        raise _Mismatch(f"running_means/running_variances have {rm.size}/{rv.size} values, "
                        f"expected {n}")
    return params[:n].copy(), params[n:].copy(), rm, rv, k


def _bn_to_affine(rec):
    """dlib's affine_(const bn_&): gamma' = gamma / sqrt(var + eps), beta' = beta - gamma' mean,
    in float32 as dlib computes them (eps rounded to float)."""
    g, b, rm, rv, _ = _bn_arrays(rec)
    eps = np.float32(rec["eps"])
    g2 = (g / np.sqrt(rv + eps)).astype(np.float32)
    b2 = (b - g2 * rm).astype(np.float32)
    return g2, b2


def _mode_of(rec):
    if rec.kind == "bn":
        return "conv" if rec.tag == "bn_con2" else "fc"
    m = rec["mode"]
    if m not in (0, 1):
        raise _Mismatch(f"mode {m} (dlib: 0 CONV_MODE, 1 FC_MODE)")
    return "conv" if m == 0 else "fc"


def _check_eq(what, got, want):
    if got != want:
        raise _Mismatch(f"{what} is {got} in the file but {want} in the network")


def _activation_layer(rec, tmpl):
    cls = _lc(rec.kind + "_")
    if cls is None:
        raise _Mismatch(f"this minidnn has no {rec.kind} layer")
    if tmpl is not None and not isinstance(tmpl, cls):
        raise _Mismatch(f"the file has {rec.kind} here")
    kw = {n: rec[n] for n in ("alpha", "ceiling", "beta") if n in rec.fields}
    for n, v in kw.items():
        if not math.isfinite(v):
            raise _Mismatch(f"{n} is {v!r}")
    if rec.kind == "prelu":
        p = rec["params"].array().reshape(-1)
        if p.size != 1:
            raise _Mismatch(f"prelu has {p.size} parameters, expected 1")
        init = rec["initial_param_value"]
        if not math.isfinite(init) or not math.isfinite(float(p[0])):
            raise _Mismatch("prelu's parameter is not finite")
        layer = tmpl if tmpl is not None else cls(init)
        layer.initial = init
        layer.set_array("alpha", p.astype(np.float32))
        return layer
    if tmpl is not None:
        layer = tmpl
        for n, v in kw.items():
            setattr(layer, n, v)
    else:
        layer = cls(**kw)
    if rec.get("disabled"):
        layer.disable()
    elif layer.disabled:
        layer.enable()
    return layer


def _make_layer(e, tmpl, i):
    """The minidnn layer for entry e (a layer record): ``tmpl`` is the caller's layer at that
    place (filled and returned, or replaced by an equivalent one) or None (a new layer)."""
    rec = e.rec
    k = rec.kind
    L = _layers()
    f = rec.fields
    tname = type(tmpl).__name__ if tmpl is not None else None
    if k in ("con", "cont"):
        cls = L.con_ if k == "con" else _lc("cont_")
        if cls is None:
            raise _Mismatch("this minidnn has no cont layer")
        w, b, use_bias = _con_params(rec)
        geo = {n: _as_int(f[n], n) for n in ("num_filters", "nr", "nc", "stride_y", "stride_x",
                                              "padding_y", "padding_x")}
        act = ops.RELU if f.get("use_relu") else IDENTITY
        if tmpl is not None:
            if not isinstance(tmpl, cls):
                raise _Mismatch(f"the file has a {k} here")
            for n, v in geo.items():
                _check_eq(n, v, getattr(tmpl, n))
            for n in ("groups", "dilation_y", "dilation_x"):
                if getattr(tmpl, n, 1) != 1:
                    raise _Mismatch(f"dlib's {k} has no {n} (the network's is {getattr(tmpl, n)})")
            layer = tmpl
            layer.bias = use_bias
            layer._act = act
        else:
            layer = cls(geo["num_filters"], geo["nr"], geo["nc"], geo["stride_y"], geo["stride_x"],
                        geo["padding_y"], geo["padding_x"], use_bias, act)
        if k == "cont" and w.shape[1] != geo["num_filters"]:
            raise _Mismatch(f"the filters alias {w.shape} does not fit num_filters={geo['num_filters']}")
        layer.set_array("filters", w)
        layer.set_array("biases", b)
        layer.check_record()
        ex = dlib_extras(layer)
        ex.update({n: f[n] for n in ("learning_rate_multiplier", "weight_decay_multiplier",
                                     "bias_learning_rate_multiplier", "bias_weight_decay_multiplier")})
        return layer
    if k == "fc":
        w, b, has_bias = _fc_params(rec)
        no = _as_int(f["num_outputs"], "num_outputs")
        if tmpl is not None:
            if not isinstance(tmpl, L.fc_):
                raise _Mismatch("the file has an fc here")
            _check_eq("num_outputs", no, tmpl.num_outputs)
            want_mode = 0 if tmpl.bias or _extras.get(tmpl, {}).get("bias_mode") == 0 else 1
            if f["bias_mode"] != want_mode:
                raise _Mismatch(f"the file's fc is {'fc' if f['bias_mode'] == 0 else 'fc_no_bias'}, "
                                f"the network's {'fc' if tmpl.bias else 'fc_no_bias'}")
            layer = tmpl
            layer.bias = has_bias
            layer._act = IDENTITY
        else:
            layer = L.fc_(no, has_bias)
        layer.set_array("weights", w)
        layer.set_array("biases", b)
        layer.check_record()
        ex = dlib_extras(layer)
        ex.update({n: f[n] for n in ("learning_rate_multiplier", "weight_decay_multiplier",
                                     "bias_learning_rate_multiplier", "bias_weight_decay_multiplier",
                                     "bias_mode")})
        ex["use_bias"] = bool(f.get("use_bias", True))
        if f["bias_mode"] == 0 and not has_bias:         # fc_3 with use_bias = false
            ex["bias_row"] = rec["params"].array().reshape(-1, no)[-1].copy() \
                if rec["params"].size == (f["num_inputs"] + 1) * no else None
        return layer
    if k == "bn":
        mode = _mode_of(rec)
        if tmpl is not None and isinstance(tmpl, L.bn_):
            _check_eq("mode", mode, tmpl.mode)
            g, b, rm, rv, shape = _bn_arrays(rec)
            eps = float(rec["eps"])
            if not (math.isfinite(eps) and eps > 0):
                raise _Mismatch(f"eps is {eps!r}")
            tmpl.eps = eps
            for n, a in (("gamma", g), ("beta", b), ("running_mean", rm), ("running_var", rv)):
                tmpl.set_array(n, a.astype(np.float32))
            tmpl.num_updates = min(int(rec["num_updates"]), tmpl.running_stats_window_size)
            ex = dlib_extras(tmpl)
            ex.update({n: f[n] for n in ("learning_rate_multiplier", "weight_decay_multiplier",
                                         "bias_learning_rate_multiplier", "bias_weight_decay_multiplier",
                                         "running_stats_window_size", "num_updates")})
            ex["shape"] = shape
            return tmpl
        if tmpl is not None and not isinstance(tmpl, L.affine_):
            raise _Mismatch(f"the file has {rec.tag} (read as bn_ or affine_) here")
        g, b = _bn_to_affine(rec)
        layer = _affine_into(tmpl, mode, g, b)
        dlib_extras(layer)["shape"] = _bn_arrays(rec)[4]
        return layer
    if k == "affine":
        mode = _mode_of(rec)
        if tmpl is not None and not isinstance(tmpl, L.affine_):
            raise _Mismatch("the file has an affine here")
        params = f["params"].array().reshape(-1)
        ga = f["gamma"]
        n = ga[0] * ga[1] * ga[2] * ga[3]
        disabled = bool(f.get("disabled"))
        if disabled:
            layer = tmpl if tmpl is not None else L.affine_(mode)
            layer.mode = mode
            layer.disable()
            dlib_extras(layer)["shape"] = ga
            return layer
        if params.size != 2 * n or f["beta"] != ga:
            raise _Mismatch(f"params has {params.size} values, expected gamma and beta of {ga}")
        layer = _affine_into(tmpl, mode, params[:n].copy(), params[n:].copy())
        dlib_extras(layer)["shape"] = ga
        return layer
    if k in ("relu", "prelu", "leaky_relu", "sig", "mish", "htan", "clipped_relu", "elu", "gelu",
             "smelu", "silu"):
        return _activation_layer(rec, tmpl)
    if k in ("max_pool", "avg_pool"):
        cls = L.max_pool_ if k == "max_pool" else L.avg_pool_
        geo = [_as_int(f[n], n) for n in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")]
        if tmpl is not None:
            if not isinstance(tmpl, cls):
                raise _Mismatch(f"the file has a {k} here")
            for n, v in zip(("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"), geo):
                _check_eq(n, v, getattr(tmpl, n))
            return tmpl
        return cls(*geo)
    if k in ("softmax", "softmax_all"):
        cls = _lc(k + "_")
        if cls is None:
            raise _Mismatch(f"this minidnn has no {k} layer")
        if tmpl is not None and not isinstance(tmpl, cls):
            raise _Mismatch(f"the file has a {k} here")
        return tmpl if tmpl is not None else cls()
    if k in ("add_prev", "mult_prev", "resize_prev_to_tagged", "scale", "scale_prev", "concat"):
        cls = _lc(k + "_")
        if cls is None:
            raise _Mismatch(f"this minidnn has no {k} layer")
        if tmpl is None:
            raise _NeedsNet(f"{k}_ refers to tags that dlib's files do not number")
        if not isinstance(tmpl, cls):
            raise _Mismatch(f"the file has a {k} here")
        if k == "concat":
            _check_eq("the number of tags", int(f["tag_count"]), len(tmpl.ids))
        if k in ("scale", "scale_prev"):
            dlib_extras(tmpl).update(reshape_scales=f["reshape_scales"], reshape_src=f["reshape_src"])
        return tmpl
    if k in ("multiply", "dropout"):
        mult, drop = _lc("multiply_"), _lc("dropout_")
        if k == "dropout" and drop is not None and isinstance(tmpl, drop):
            tmpl.drop_rate = float(f["drop_rate"])
            return tmpl
        if mult is None:
            raise _Mismatch("this minidnn has no multiply layer")
        val = float(f["val"]) if k == "multiply" else float(np.float32(1) - np.float32(f["drop_rate"]))
        if tmpl is not None:
            if not isinstance(tmpl, mult):
                raise _Mismatch(f"the file has a {k} here")
            tmpl.val = val
            return tmpl
        return mult(val=val)
    if k == "l2normalize":
        cls = _lc("l2normalize_")
        if cls is None:
            raise _Mismatch("this minidnn has no l2normalize layer")
        if tmpl is not None:
            if not isinstance(tmpl, cls):
                raise _Mismatch("the file has an l2normalize here")
            tmpl.eps = float(f["eps"])
            return tmpl
        return cls(eps=float(f["eps"]))
    if k in ("extract", "reorg", "upsample", "resize_to"):
        cls = _lc(k + "_")
        if cls is None:
            raise _Mismatch(f"this minidnn has no {k} layer")
        names = {"extract": ("offset", "k", "nr", "nc"), "reorg": ("row_stride", "col_stride"),
                 "upsample": ("scale_y", "scale_x"), "resize_to": ("nr", "nc")}[k]
        vals = [_as_int(f[n], n) for n in names]
        if tmpl is not None:
            if not isinstance(tmpl, cls):
                raise _Mismatch(f"the file has a {k} here")
            for n, v in zip(names, vals):
                _check_eq(n, v, getattr(tmpl, n))
            return tmpl
        return cls(*vals)
    raise _Mismatch(f"this minidnn cannot read dlib's {rec.tag}")  # pragma: no cover


def _affine_into(tmpl, mode, g, b):
    L = _layers()
    if tmpl is None:
        return L.affine_(mode, g, b)
    tmpl.mode = mode
    if tmpl.disabled:
        tmpl.enable()
    tmpl.set_array("gamma", np.ascontiguousarray(g, np.float32).reshape(-1))
    tmpl.set_array("beta", np.ascontiguousarray(b, np.float32).reshape(-1))
    return tmpl


class _NeedsNet(Exception):
    pass


def _make_input(e, tmpl):
    L = _layers()
    rec = e.rec
    k, f = rec.kind, rec.fields
    means = {n: f[n] for n in ("avg_red", "avg_green", "avg_blue") if n in f}
    if k == "input_rgb_image_sized":
        if tmpl is not None:
            if isinstance(tmpl, L.input_rgb_image_) and type(tmpl) is L.input_rgb_image_:
                pass                                # dlib's input_rgb_image reads a sized record
            elif not isinstance(tmpl, L.input_rgb_image_sized_):
                raise _Mismatch("the file has input_rgb_image_sized here")
            else:
                _check_eq("nr", f["nr"], tmpl.nr_)
                _check_eq("nc", f["nc"], tmpl.nc_)
            return _set_means(tmpl, means)
        return L.input_rgb_image_sized_(f["nr"], f["nc"], **means)
    if k == "input_rgb_image":
        if tmpl is not None:
            if type(tmpl) is not L.input_rgb_image_:
                raise _Mismatch("the file has input_rgb_image here")
            return _set_means(tmpl, means)
        return L.input_rgb_image_(**means)
    if k == "input_rgb_image_pyramid":
        pad = {n: f[n] for n in ("pyramid_padding", "pyramid_outer_padding") if n in f}
        if not pad:
            pad = {"pyramid_padding": 10, "pyramid_outer_padding": 11}
        if tmpl is not None:
            if not isinstance(tmpl, L.input_rgb_image_pyramid_):
                raise _Mismatch("the file has input_rgb_image_pyramid here")
            _set_means(tmpl, means)
            for n, v in pad.items():
                setattr(tmpl, n, _as_int(v, n))
            return tmpl
        return L.input_rgb_image_pyramid_(6, **means, **{n: _as_int(v, n) for n, v in pad.items()})
    if k == "input_grayscale_image_pyramid":
        pad = {n: _as_int(f[n], n) for n in ("pyramid_padding", "pyramid_outer_padding")}
        if tmpl is not None:
            if not isinstance(tmpl, L.input_grayscale_image_pyramid_):
                raise _Mismatch("the file has input_grayscale_image_pyramid here")
            for n, v in pad.items():
                setattr(tmpl, n, v)
            return tmpl
        return L.input_grayscale_image_pyramid_(6, **pad)
    if k == "input_matrix":
        if tmpl is not None:
            if not isinstance(tmpl, L.input_grayscale_image_):
                raise _Mismatch("the file has input<matrix> (minidnn: input_grayscale_image) here")
            return tmpl
        return L.input_grayscale_image_()
    if k == "input_tensor":
        if tmpl is not None:
            if type(tmpl).__name__ != "input_tensor_":
                raise _Mismatch("the file has input_tensor here")
            return tmpl
        return L.input_tensor_()
    raise _Mismatch(f"this minidnn cannot read dlib's {rec.tag}")  # pragma: no cover


def _set_means(layer, means):
    for n, v in means.items():
        if not math.isfinite(v):
            raise _Mismatch(f"{n} is {v!r}")
        setattr(layer, n, float(np.float32(v)))
    return layer


def _make_loss(e, tmpl):
    rec = e.rec
    k, f = rec.kind, rec.fields
    if k == "loss_mmod":
        from .mmod import detector_window_details, loss_mmod_, mmod_options, test_box_overlap
        try:
            wins = [detector_window_details(w, h, lab) for w, h, lab in f["detector_windows"]]
            opts = mmod_options(
                wins, loss_per_false_alarm=f["loss_per_false_alarm"],
                loss_per_missed_target=f["loss_per_missed_target"],
                truth_match_iou_threshold=f["truth_match_iou_threshold"],
                overlaps_nms=test_box_overlap(f["nms_iou_thresh"], f["nms_percent_covered_thresh"]),
                overlaps_ignore=test_box_overlap(f["ignore_iou_thresh"], f["ignore_percent_covered_thresh"]),
                use_bounding_box_regression=f["use_bounding_box_regression"],
                bbr_lambda=f["bbr_lambda"], assume_image_pyramid=bool(f["assume_image_pyramid"]))
        except ValueError as err:
            raise _Mismatch(str(err)) from None
        if not wins:
            raise _Mismatch("mmod_options has no detector windows")
        if tmpl is not None:
            if not isinstance(tmpl, loss_mmod_):
                raise _Mismatch("the file has loss_mmod here")
            tmpl.options = opts
            layer = tmpl
        else:
            layer = loss_mmod_(opts)
        dlib_extras(layer)["options_version"] = f["options_version"]
        return layer
    cls = _lc(k + "_")
    if cls is None:
        raise _Mismatch(f"this minidnn has no {k} loss")
    if tmpl is not None and not isinstance(tmpl, cls):
        raise _Mismatch(f"the file has {k} here")
    layer = tmpl if tmpl is not None else cls()
    if rec.tag == "loss_mean_squared_per_channel_and_pixel_" or k == "loss_mean_squared_per_pixel":
        dlib_extras(layer)["tag"] = rec.tag
    if k == "loss_metric":
        layer.margin = float(f.get("margin", np.float32(0.1)))
        layer.distance_threshold = float(f.get("dist_thresh", np.float32(0.75)))
    elif k == "loss_multibinary_log":
        layer.gamma = float(f.get("gamma", 0.0))
    check = getattr(layer, "check_record", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise _Mismatch(str(err)) from None
    return layer


def _is_tag(layer):
    n = type(layer).__name__
    return n in ("tag_", "skip_")


def _build(entries, net):
    """The minidnn network of a reading: ``net`` filled (each record checked against its
    layer) or, with net None, a new one. Raises _MatchError."""
    nodes = net.chain() if net is not None else None
    if nodes is not None and len(nodes) != len(entries):
        raise _MatchError(_count_problem(entries, nodes))
    made = []
    for i, e in enumerate(entries):
        tmpl = copy.copy(nodes[i].layer_details()) if nodes is not None else None
        try:
            if e.what == "loss":
                if tmpl is not None and not tmpl.is_loss:
                    raise _Mismatch(f"the file has the loss layer {e.rec.kind} here")
                layer = _make_loss(e, tmpl)
            elif e.what == "input":
                if tmpl is not None and not tmpl.is_input:
                    raise _Mismatch(f"the file has the input layer {e.rec.kind} here")
                layer = _make_input(e, tmpl)
            elif e.what == "tag":
                if tmpl is None:
                    raise _NeedsNet("tag and skip layers store no tag number")
                if not _is_tag(tmpl):
                    raise _Mismatch("the file has a tag or skip layer here")
                layer = tmpl
            else:
                if tmpl is not None and (tmpl.is_loss or tmpl.is_input or _is_tag(tmpl)):
                    raise _Mismatch(f"the file has a {e.rec.kind} layer here")
                layer = _make_layer(e, tmpl, i)
        except _Mismatch as err:
            raise _MatchError(f"{_where(i, tmpl, e)}: {err}") from None
        except _NeedsNet as err:
            raise _MatchError(f"{_where(i, tmpl, e)}: {err}: dlib takes the network's structure "
                              f"from its C++ type, so build the network with the same factories as "
                              f"its dlib type (see minidnn.dlib_zoo) and pass it: "
                              f"load_dlib(path, net)", needs_net=True) from None
        except (ValueError, TypeError) as err:
            raise _MatchError(f"{_where(i, tmpl, e)}: {type(err).__name__}: {err}") from None
        if e.what in ("layer", "tag"):
            ex = dlib_extras(layer)
            ex["wrapper_flags"] = {k: v for k, v in e.flags.items() if k != "input"}
        made.append(layer)
    if nodes is not None:
        for node, layer in zip(nodes, made):
            node._layer = layer
        from .core import structure_changed
        structure_changed()
        out = net
    else:
        out = None
        for layer in reversed(made):
            out = Node(layer, out)
    _check_channels(out, entries)
    return out


class _MatchError(Exception):
    def __init__(self, msg, needs_net=False):
        super().__init__(msg)
        self.needs_net = needs_net


def _count_problem(entries, nodes):
    n = min(len(entries), len(nodes))
    for i in range(n):
        e, layer = entries[i], nodes[i].layer_details()
        ok = (e.what == "loss") == layer.is_loss and (e.what == "input") == layer.is_input and \
            (e.what == "tag") == _is_tag(layer)
        if not ok:
            return (f"{_where(i, layer, e)}: the file has {len(entries)} layers and the network "
                    f"{len(nodes)}; they first differ here (the file has "
                    f"{e.rec.kind if e.rec is not None else 'a tag or skip'})")
    i = n
    if len(entries) > n:
        e = entries[n]
        return (f"the file has {len(entries)} layers, the network {len(nodes)}: the file's "
                f"layer<{i}> {e.rec.kind if e.rec else 'tag|skip'} (record {e.tag!r} at byte "
                f"offset {e.record_offset}) has no counterpart")
    return (f"the file has {len(entries)} layers, the network {len(nodes)}: the network's "
            f"layer<{i}> {nodes[i].layer_details().kind} has no record in the file")


def _check_channels(net, entries):
    """Each layer's parameters against the channels the layers below give it (dlib checks
    this when it runs; here it is checked at load, naming the record)."""
    nodes = net.chain()
    tags = {}
    ch = None
    for i in range(len(nodes) - 1, -1, -1):
        layer = nodes[i].layer_details()
        name = type(layer).__name__
        e = entries[i]
        try:
            if layer.is_input:
                ch = layer.k
            elif name == "tag_":
                tags[layer.id] = ch
            elif name == "skip_":
                ch = tags.get(layer.id)
            elif name in ("con_",) and layer.filters is not None:
                if ch is not None and layer.filters.shape[1] != ch:
                    raise _Mismatch(f"its filters take {layer.filters.shape[1]} channels, the "
                                    f"layers below give {ch}")
                ch = layer.num_filters
            elif name == "cont_" and layer.filters is not None:
                if ch is not None and layer.filters.shape[0] != ch:
                    raise _Mismatch(f"its filters take {layer.filters.shape[0]} channels, the "
                                    f"layers below give {ch}")
                ch = layer.num_filters
            elif name == "fc_":
                ch = layer.num_outputs
            elif name in ("affine_", "bn_") and layer.gamma is not None and layer.mode == "conv":
                if ch is not None and layer.gamma.shape[0] != ch:
                    raise _Mismatch(f"it has {layer.gamma.shape[0]} channels, the layers below "
                                    f"give {ch}")
            elif name == "concat_":
                parts = [tags.get(t) for t in layer.ids]
                ch = None if any(p is None for p in parts) else sum(parts)
            elif name in ("add_prev_", "mult_prev_"):
                # dlib's add_prev_/mult_prev_ take the larger of each dimension (zero padded)
                t = tags.get(layer.id)
                ch = None if ch is None or t is None else max(ch, t)
            elif name in ("extract_", "reorg_") or layer.is_loss:
                ch = None if not layer.is_loss else ch
        except _Mismatch as err:
            raise _MatchError(f"{_where(i, layer, e)}: {err}") from None


# ============================================================================ public: reading
def load_dlib(src, net=None, *, return_offset=False):
    """Load a network written by dlib's ``serialize(net)``: a path (plain or ``.bz2``), a
    binary file object or the file's bytes.

    ``net``: a minidnn network built with the same factories as the file's dlib type (the
    structure: tags, skips, add_prev, concat ...), which is filled in place and returned;
    each record is checked against its layer (kind, settings, parameter shapes), and a
    mismatch raises SerializationError naming the layer, the record and its byte offset.
    Without ``net`` the network is built from the file alone, which works for files without
    tags (dlib's bn_ records become affine_, dropout_ multiply_, as in dlib's inference
    nets; an input pyramid is taken as pyramid_down<6>). The data after the network (the
    vehicle detectors append a shape_predictor) is left alone: ``return_offset=True``
    returns ``(net, offset)``, the offset of the first byte after the network.
    """
    if net is not None and not isinstance(net, Node):
        raise TypeError(f"load_dlib: net must be a minidnn network (a Node), got {type(net).__name__}")
    data = _data(src)
    readings, _ = _parse(data)
    first = None
    for entries, end in readings:
        try:
            out = _build(entries, net)
        except _MatchError as err:
            if first is None:
                first = err
            continue
        except SerializationError:
            raise
        except Exception as err:       # a constructor refusing a value, or a bug: never escapes raw
            raise SerializationError(f"{type(err).__name__} while building the network: {err}") from err
        return (out, end) if return_offset else out
    raise SerializationError(str(first))


def inspect_dlib(src):
    """What a dlib file holds, without building a network: (entries, end offset, file size).
    Each entry (see Entry) is one layer as dlib's ``print(net)`` numbers them."""
    data = _data(src)
    readings, s = _parse(data)
    entries, end = readings[0]
    return entries, end, len(data)


def describe_entry(e):
    """One line of settings for an entry (python -m minidnn info)."""
    if e.rec is None:
        return ""
    f = e.rec.fields
    parts = []
    for k, v in f.items():
        if isinstance(v, _Tensor):
            if v.size:
                parts.append(f"{k} {'x'.join(map(str, v.shape))}")
        elif k in ("filters", "biases", "weights", "gamma", "beta", "reshape_scales", "reshape_src"):
            continue
        elif k == "detector_windows":
            parts.append("windows " + ",".join(f"{w}x{h}" + (f":{lab}" if lab else "")
                                               for w, h, lab in v))
        elif k.endswith("multiplier"):
            continue
        elif isinstance(v, float):
            parts.append(f"{k}={v:g}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


# ============================================================================ writing
class _Out:
    """The primitive encoders of dlib/serialize.h."""

    def __init__(self):
        self.b = io.BytesIO()

    def raw(self, b):
        self.b.write(b)

    def sint(self, v):
        v = int(v)
        neg = 0x80 if v < 0 else 0
        m = -v if v < 0 else v
        body = m.to_bytes(max(1, (m.bit_length() + 7) // 8), "little")
        if len(body) > 8:
            raise SerializationError(f"the integer {v} does not fit in 8 bytes")
        self.b.write(bytes([len(body) | neg]) + body)

    def uint(self, v):
        v = int(v)
        if v < 0:
            raise SerializationError(f"an unsigned field is negative ({v})")
        self.sint(v)

    def real(self, v, single=False):
        v = float(np.float32(v)) if single else float(v)
        digits = 24 if single else 53
        if math.isnan(v):
            m, e = 0, 32002
        elif v == math.inf:
            m, e = 0, 32000
        elif v == -math.inf:
            m, e = 0, 32001
        else:
            fr, ex = math.frexp(v)
            m = int(fr * (1 << digits))
            e = ex - digits
            for _ in range(8):
                if m & 0xFF:
                    break
                m >>= 8
                e += 8
        self.sint(m)
        self.sint(e)

    def boolean(self, v):
        self.b.write(b"1" if v else b"0")

    def string(self, s):
        b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        self.uint(len(b))
        self.b.write(b)

    def tensor(self, a, shape=None):
        """A resizable_tensor (version 2, dims, float32 LE data); a None array is empty."""
        if a is None:
            shape = (0, 0, 0, 0) if shape is None else shape
            data = b""
        else:
            a = np.ascontiguousarray(a, "<f4")
            shape = shape if shape is not None else a.shape
            data = a.tobytes()
        self.sint(2)
        for d in shape:
            self.sint(d)
        self.b.write(data)

    def alias(self, shape):
        self.sint(1)
        for d in shape:
            self.sint(d)

    def getvalue(self):
        return self.b.getvalue()


def _empty_tensor(o):
    o.tensor(None)


_MULTS = ("learning_rate_multiplier", "weight_decay_multiplier", "bias_learning_rate_multiplier",
          "bias_weight_decay_multiplier")


def _write_mults(o, layer, defaults):
    ex = _extras.get(layer, {})
    for n, d in zip(_MULTS, defaults):
        o.real(ex.get(n, d))


class _Writer:
    """save_dlib: each node's dlib record (the versions dlib 20 writes) and wrapper."""

    def __init__(self, net):
        self.nodes = net.chain()
        self.shapes = _shapes(net)

    def _fail(self, i, msg):
        layer = self.nodes[i].layer_details()
        raise SerializationError(f"layer<{i}> {layer.kind}: {msg}")

    def layer_record(self, o, i):
        layer = self.nodes[i].layer_details()
        name = type(layer).__name__
        L = _layers()
        in_shape = self.shapes[i + 1] if i + 1 < len(self.shapes) else None
        if name == "con_":
            if layer.filters is None:
                self._fail(i, "has no parameters yet: run a forward (or load it) before save_dlib")
            for n in ("groups", "dilation_y", "dilation_x"):
                if getattr(layer, n, 1) != 1:
                    self._fail(i, f"dlib's con_ has no {n}")
            act = layer.act
            if act and act != ops.RELU:
                self._fail(i, f"its epilogue applies {act!r}, which dlib's con_ cannot (only "
                              f"relu): save the unfused network")
            o.string("con_6")
            w = layer.filters.reshape(-1)
            p = w if layer.biases is None else np.concatenate([w, layer.biases])
            o.tensor(p, (p.size, 1, 1, 1))
            for n in ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
                o.sint(getattr(layer, n))
            o.alias(layer.filters.shape)
            o.alias((1, layer.num_filters, 1, 1) if layer.biases is not None else (0, 0, 0, 0))
            _write_mults(o, layer, (1, 1, 1, 0))
            o.boolean(layer.biases is not None)
            o.boolean(act == ops.RELU)
            return
        if name == "cont_":
            if layer.filters is None:
                self._fail(i, "has no parameters yet: run a forward (or load it) before save_dlib")
            if layer.act:
                self._fail(i, f"its epilogue applies {layer.act!r}, which dlib's cont_ cannot: "
                              f"save the unfused network")
            o.string("cont_2")
            w = layer.filters.reshape(-1)
            p = w if layer.biases is None else np.concatenate([w, layer.biases])
            o.tensor(p, (p.size, 1, 1, 1))
            for n in ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
                o.sint(getattr(layer, n))
            o.alias(layer.filters.shape)
            o.alias((1, layer.num_filters, 1, 1) if layer.biases is not None else (0, 0, 0, 0))
            _write_mults(o, layer, (1, 1, 1, 0))
            o.boolean(layer.biases is not None)
            return
        if name == "fc_":
            if layer.weights is None:
                self._fail(i, "has no parameters yet: run a forward (or load it) before save_dlib")
            if layer.act:
                self._fail(i, f"its epilogue applies {layer.act!r}, which dlib's fc_ cannot: "
                              f"save the unfused network")
            ex = _extras.get(layer, {})
            no, ni = layer.weights.shape
            mode = ex.get("bias_mode", 0 if layer.biases is not None else 1)
            if layer.biases is not None:
                mode = 0
            rows = [layer.weights.T]
            if layer.biases is not None:
                rows.append(layer.biases[None, :])
            elif mode == 0 and ex.get("bias_row") is not None:
                rows.append(ex["bias_row"][None, :])
            p = np.concatenate(rows, axis=0).astype(np.float32)
            o.string("fc_3")
            o.uint(no)
            o.uint(ni)
            o.tensor(p, (p.shape[0], p.shape[1], 1, 1))
            o.alias((ni, no, 1, 1))
            o.alias((1, no, 1, 1) if layer.biases is not None else (0, 0, 0, 0))
            o.sint(mode)
            _write_mults(o, layer, (1, 1, 1, 0))
            # fc_3's use_bias: dlib's default (true) for fc_no_bias, else whether it has one
            o.boolean(ex.get("use_bias", True) if mode == 1 else layer.biases is not None)
            return
        if name == "bn_":
            if layer.gamma is None:
                self._fail(i, "has no parameters yet: run a forward (or load it) before save_dlib")
            ex = _extras.get(layer, {})
            shape = self._unit_shape(i, layer, in_shape)
            o.string("bn_con2" if layer.mode == "conv" else "bn_fc2")
            p = np.concatenate([layer.gamma, layer.beta])
            o.tensor(p, (p.size, 1, 1, 1))
            o.alias(shape)
            o.alias(shape)
            _empty_tensor(o)
            _empty_tensor(o)
            o.tensor(layer.running_mean, shape)
            o.tensor(layer.running_var, shape)
            o.uint(ex.get("num_updates", layer.num_updates))
            o.uint(ex.get("running_stats_window_size", layer.running_stats_window_size))
            _write_mults(o, layer, (1, 0, 1, 1))
            o.real(layer.eps)
            return
        if name == "affine_":
            shape = self._unit_shape(i, layer, in_shape)
            o.string("affine_2")
            if layer.disabled or layer.gamma is None:
                _empty_tensor(o)
            else:
                p = np.concatenate([layer.gamma, layer.beta])
                o.tensor(p, (p.size, 1, 1, 1))
            o.alias(shape)
            o.alias(shape)
            o.sint(0 if layer.mode == "conv" else 1)
            o.boolean(layer.disabled)
            return
        if getattr(layer, "pointwise", False) and name.endswith("_"):
            self._activation(o, i, layer, name)
            return
        if name in ("max_pool_", "avg_pool_"):
            o.string(name + "2")
            for n in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
                o.sint(getattr(layer, n))
            return
        if name in ("softmax_", "softmax_all_", "add_prev_", "mult_prev_", "resize_prev_to_tagged_"):
            o.string(name)
            return
        if name in ("scale_", "scale_prev_"):
            ex = _extras.get(layer, {})
            t = self.shapes[i + 1]
            o.string(name)
            o.alias(ex.get("reshape_scales", (t[0] * t[1], 1, 1, 1) if t else (0, 0, 0, 0)))
            o.alias(ex.get("reshape_src", (t[0] * t[1], t[2] * t[3], 1, 1) if t else (0, 0, 0, 0)))
            return
        if name == "concat_":
            o.string("concat_")
            o.uint(len(layer.ids))
            return
        if name == "multiply_":
            o.string("multiply_")
            o.real(layer.val, single=True)
            return
        if name == "dropout_":
            o.string("dropout_")
            o.real(layer.drop_rate, single=True)
            _empty_tensor(o)
            return
        if name == "l2normalize_":
            o.string("l2normalize_")
            o.real(layer.eps)
            return
        if name == "extract_":
            o.string("extract_")
            for n in ("offset", "k", "nr", "nc"):
                o.sint(getattr(layer, n))
            return
        if name == "reorg_":
            o.string("reorg_")
            o.sint(layer.row_stride)
            o.sint(layer.col_stride)
            return
        if name == "upsample_":
            o.string("upsample_")
            o.sint(layer.scale_y)
            o.sint(layer.scale_x)
            return
        if name == "resize_to_":
            t = self.shapes[i + 1]
            o.string("resize_to_")
            o.sint(layer.nr)
            o.sint(layer.nc)
            sy = (layer.nr / t[2]) if t else 1.0
            sx = (layer.nc / t[3]) if t else 1.0
            o.real(sy)
            o.real(sx)
            return
        del L
        self._fail(i, f"dlib has no layer for minidnn's {type(layer).__name__}")

    def _unit_shape(self, i, layer, in_shape):
        ex = _extras.get(layer, {})
        k = layer.gamma.shape[0] if layer.gamma is not None else None
        if "shape" in ex and (k is None or int(np.prod(ex["shape"])) == k):
            return tuple(ex["shape"])
        if layer.mode == "conv":
            if k is None:
                k = in_shape[1] if in_shape else 0
            return (1, k, 1, 1)
        if in_shape is not None and (k is None or in_shape[1] * in_shape[2] * in_shape[3] == k):
            return (1,) + tuple(in_shape[1:])
        if k is not None:
            return (1, k, 1, 1)
        self._fail(i, "the shape of its input is unknown: run a forward before save_dlib")

    def _activation(self, o, i, layer, name):
        dis = layer.disabled
        if dis and not self._absorbed(i):
            pass
        if name == "relu_":
            o.string("relu_2")
            o.boolean(dis and self._absorbed_relu(i))
            return
        if name == "prelu_":
            o.string("prelu_")
            a = getattr(layer, layer.params[0]) if layer.params else None
            alpha = float(a.reshape(-1)[0]) if a is not None else float(getattr(layer, "initial", 0.25))
            o.tensor(np.array([alpha], np.float32), (1, 1, 1, 1))
            o.real(_extras.get(layer, {}).get("initial_param_value",
                                              getattr(layer, "initial", 0.25)), single=True)
            return
        simple = {"sig_": None, "mish_": None, "htan_": None, "gelu_": None, "silu_": None,
                  "leaky_relu_": "alpha", "elu_": "alpha", "clipped_relu_": "ceiling",
                  "smelu_": "beta"}
        if name not in simple:
            self._fail(i, f"dlib has no layer for minidnn's {name}")
        o.string(name)
        if simple[name]:
            o.real(getattr(layer, simple[name]), single=True)

    def _absorbed(self, i):
        return True

    def _absorbed_relu(self, i):
        """A disabled relu above a con/fc whose epilogue took it: dlib's fused form
        (relu_2 disabled, con_6 use_relu) only exists for a con below."""
        j = i + 1
        while j < len(self.nodes) and self.nodes[j].layer_details().disabled:
            j += 1
        below = self.nodes[j].layer_details() if j < len(self.nodes) else None
        return below is not None and type(below).__name__ == "con_" and below.act == ops.RELU

    def check_fusable(self):
        """A disabled activation other than relu over a con/fc, or a disabled relu whose
        layer below is not a con: dlib cannot hold that fusion (refused)."""
        for i, n in enumerate(self.nodes):
            layer = n.layer_details()
            if getattr(layer, "pointwise", False) and layer.disabled:
                if type(layer).__name__ != "relu_" or not self._absorbed_relu(i):
                    self._fail(i, f"fuse() moved this {layer.kind} into the layer below, which "
                                  f"dlib cannot express: save the unfused network")
            if type(layer).__name__ == "fc_" and layer.act:
                self._fail(i, f"fuse() moved {layer.act!r} into this fc, which dlib cannot "
                              f"express: save the unfused network")

    def input_record(self, o, i):
        layer = self.nodes[i].layer_details()
        name = type(layer).__name__
        if name == "input_rgb_image_":
            o.string("input_rgb_image")
            for m in layer.means:
                o.real(m, single=True)
        elif name == "input_rgb_image_sized_":
            o.string("input_rgb_image_sized")
            for m in layer.means:
                o.real(m, single=True)
            o.uint(layer.nr_)
            o.uint(layer.nc_)
        elif name == "input_rgb_image_pyramid_":
            o.string("input_rgb_image_pyramid2")
            for m in layer.means:
                o.real(m, single=True)
            o.uint(layer.pyramid_padding)
            o.uint(layer.pyramid_outer_padding)
        elif name == "input_grayscale_image_pyramid_":
            o.string("input_grayscale_image_pyramid")
            o.uint(layer.pyramid_padding)
            o.uint(layer.pyramid_outer_padding)
        elif name == "input_grayscale_image_":
            o.string("input<matrix>")
        elif name == "input_tensor_":
            o.string("input_tensor")
        else:
            self._fail(i, f"dlib has no input layer for minidnn's {name}")

    def loss_record(self, o, layer):
        name = type(layer).__name__
        if name == "loss_mmod_":
            opt = layer.options
            o.string("loss_mmod_")
            o.sint(4)
            o.uint(len(opt.detector_windows))
            for w in opt.detector_windows:
                o.sint(2)
                o.uint(w.width)
                o.uint(w.height)
                o.string(w.label)
            for v in (opt.loss_per_false_alarm, opt.loss_per_missed_target,
                      opt.truth_match_iou_threshold, opt.overlaps_nms.iou_thresh,
                      opt.overlaps_nms.percent_covered_thresh, opt.overlaps_ignore.iou_thresh,
                      opt.overlaps_ignore.percent_covered_thresh):
                o.real(v)
            o.raw(bytes([1 if opt.assume_image_pyramid else 0]))
            o.boolean(opt.use_bounding_box_regression)
            o.real(opt.bbr_lambda)
            return
        if name == "loss_metric_":
            o.string("loss_metric_2")
            o.real(layer.margin, single=True)
            o.real(layer.distance_threshold, single=True)
            return
        if name == "loss_multibinary_log_":
            o.string("loss_multibinary_log_2")
            o.real(getattr(layer, "gamma", 0.0))
            return
        if name in ("loss_multiclass_log_", "loss_binary_log_", "loss_binary_hinge_",
                    "loss_multiclass_log_weighted_", "loss_mean_squared_",
                    "loss_mean_squared_multioutput_", "loss_multiclass_log_per_pixel_",
                    "loss_binary_log_per_pixel_"):
            o.string(name)
            return
        if name == "loss_mean_squared_per_pixel_":
            # dlib has two losses: one channel, or any (per_channel_and_pixel)
            k = self.shapes[1][1] if self.shapes[1] else _channels_below(self.nodes, 1)
            tag = _extras.get(layer, {}).get("tag")
            if tag is None:
                tag = ("loss_mean_squared_per_pixel_" if k == 1 else
                       "loss_mean_squared_per_channel_and_pixel_")
            o.string(tag)
            return
        raise SerializationError(f"layer<0> {layer.kind}: dlib has no loss for minidnn's {name}")

    def _flags(self, i, layer):
        f = _extras.get(layer, {}).get("wrapper_flags")
        if f:
            return (f.get("this_layer_setup_called", True), f.get("gradient_input_is_stale", True),
                    f.get("get_output_and_gradient_input_disabled", False))
        return True, True, self._output_disabled(i)

    def _output_disabled(self, i):
        """dlib's get_output_and_gradient_input_disabled of node i: set when the layer above
        runs in place on its output (core.h this_layer_operates_inplace)."""
        if i == 0:
            return False
        above = self.nodes[i - 1].layer_details()
        me = self.nodes[i].layer_details()
        inplace = type(above).__name__ in ("dropout_", "multiply_", "affine_", "relu_",
                                           "leaky_relu_", "sig_", "htan_", "clipped_relu_", "elu_",
                                           "smelu_", "softmax_", "softmax_all_", "l2normalize_")
        needs_output = _is_tag(me) or type(me).__name__ in (
            "max_pool_", "avg_pool_", "relu_", "leaky_relu_", "sig_", "htan_", "clipped_relu_",
            "elu_", "smelu_", "softmax_", "softmax_all_", "l2normalize_")
        return inplace and not needs_output and not me.is_input

    def encode(self):
        nodes = self.nodes
        self.check_fusable()
        o = _Out()
        top = nodes[0].layer_details()
        start = 0
        if top.is_loss:
            o.sint(1)
            self.loss_record(o, top)
            start = 1
        n = len(nodes)
        if nodes[-1].layer_details().is_input is False or n - start < 2:
            if n - start < 2:
                raise SerializationError("save_dlib: a dlib network needs at least one layer "
                                         "above its input layer")
        # prefixes: one version int per wrapper, outermost first
        last = n - 2                                   # the node just above the input
        for i in range(start, n - 1):
            layer = nodes[i].layer_details()
            if _is_tag(layer):
                o.sint(2 if i == last else 1)
            else:
                o.sint(3 if i == last else 2)
        self.input_record(o, n - 1)
        # suffixes, innermost first
        for i in range(n - 2, start - 1, -1):
            layer = nodes[i].layer_details()
            if _is_tag(layer):
                if i == last:                          # add_tag_layer<ID, INPUT>
                    _empty_tensor(o)
                    _empty_tensor(o)
                    o.boolean(True)
                    o.uint(1)
                continue
            self.layer_record(o, i)
            setup, stale, dis = self._flags(i, layer)
            o.boolean(setup)
            o.boolean(stale)
            o.boolean(dis)
            _empty_tensor(o)
            _empty_tensor(o)
            if i == last:
                _empty_tensor(o)
                o.uint(1)
            else:
                _empty_tensor(o)
        return o.getvalue()


def _channels_below(nodes, i):
    """The channels node i outputs, from the layers' settings (None when they do not say)."""
    for n in nodes[i:]:
        layer = n.layer_details()
        for attr in ("num_filters", "num_outputs"):
            v = getattr(layer, attr, None)
            if v is not None:
                return v
        if not (layer.pointwise or layer.affine_like or layer.disabled or _is_tag(layer)):
            return None
    return None


def _shapes(net):
    """The output shape of each node at the last forward (None where unknown), top first."""
    out = []
    for n in net.chain():
        out.append(n._last_shape())
    return out


def save_dlib(net, dest=None, *, overwrite=False):
    """Write ``net`` in dlib's format (the record versions dlib 20 writes), so that a C++
    program declaring ``dlib_type(net)`` loads it with ``deserialize(path) >> net``.
    ``dest``: a path (written atomically, as minidnn.serialize does), a binary file object,
    or None to get the bytes. Parameters must exist (run a forward, load or train first).
    A fused network saves as dlib fuses: a relu folded into a con becomes con_6's use_relu
    and a disabled relu_2, a folded affine a disabled affine_2; fusions dlib cannot express
    (another activation in an epilogue) are refused. SerializationError names the layer
    dlib cannot hold."""
    if not isinstance(net, Node):
        raise TypeError(f"save_dlib: expected a minidnn network (a Node), got {type(net).__name__}")
    data = _Writer(net).encode()
    if dest is None:
        return data
    if hasattr(dest, "write"):
        dest.write(data)
        return None
    atomic_write(dest, lambda f: f.write(data), overwrite=overwrite)
    return None


# ============================================================================ dlib_type
def _cpp(layer, sub, tagnames):
    """The dlib C++ template of one layer over ``sub`` (the declaration below it)."""
    name = type(layer).__name__
    if name == "con_":
        default_py = layer.nr // 2 if layer.stride_y == 1 else 0
        default_px = layer.nc // 2 if layer.stride_x == 1 else 0
        args = f"{layer.num_filters},{layer.nr},{layer.nc},{layer.stride_y},{layer.stride_x}"
        if (layer.padding_y, layer.padding_x) != (default_py, default_px):
            return f"add_layer<con_<{args},{layer.padding_y},{layer.padding_x}>, {sub}>"
        return f"con<{args},{sub}>"
    if name == "cont_":
        args = f"{layer.num_filters},{layer.nr},{layer.nc},{layer.stride_y},{layer.stride_x}"
        dpy = layer.nr // 2 if layer.stride_y == 1 else 0
        dpx = layer.nc // 2 if layer.stride_x == 1 else 0
        if (layer.padding_y, layer.padding_x) != (dpy, dpx):
            return f"add_layer<cont_<{args},{layer.padding_y},{layer.padding_x}>, {sub}>"
        return f"cont<{args},{sub}>"
    if name == "fc_":
        ex = _extras.get(layer, {})
        no_bias = layer.biases is None and ex.get("bias_mode", 1) == 1
        return f"{'fc_no_bias' if no_bias else 'fc'}<{layer.num_outputs},{sub}>"
    if name == "bn_":
        return f"{'bn_con' if layer.mode == 'conv' else 'bn_fc'}<{sub}>"
    if name == "affine_":
        return f"affine<{sub}>"
    if name in ("max_pool_", "avg_pool_"):
        base = name[:-1]
        if layer.nr == 0:
            return f"{base}_everything<{sub}>"
        dpy = layer.nr // 2 if layer.stride_y == 1 else 0
        dpx = layer.nc // 2 if layer.stride_x == 1 else 0
        args = f"{layer.nr},{layer.nc},{layer.stride_y},{layer.stride_x}"
        if (layer.padding_y, layer.padding_x) != (dpy, dpx):
            return f"add_layer<{name}<{args},{layer.padding_y},{layer.padding_x}>, {sub}>"
        return f"{base}<{args},{sub}>"
    if name == "resize_prev_to_tagged_":           # dlib has no resize_prev_to_taggedN aliases
        return f"resize_prev_to_tagged<{tagnames(layer.id)},{sub}>"
    if name in ("tag_", "skip_", "add_prev_", "mult_prev_", "scale_", "scale_prev_"):
        base = name[:-1]
        if layer.id <= 10:
            return f"{base}{layer.id}<{sub}>"
        if name == "tag_":
            return f"add_tag_layer<{layer.id}, {sub}>"
        if name == "skip_":
            return f"add_skip_layer<{tagnames(layer.id)}, {sub}>"
        return f"add_layer<{name}<{tagnames(layer.id)}>, {sub}>"
    if name == "concat_":
        tags = ",".join(tagnames(t) for t in layer.ids)
        if 2 <= len(layer.ids) <= 5:
            return f"concat{len(layer.ids)}<{tags},{sub}>"
        return f"add_layer<concat_<{tags}>, {sub}>"
    if name in ("upsample_",):
        if layer.scale_y == layer.scale_x:
            return f"upsample<{layer.scale_y},{sub}>"
        return f"add_layer<upsample_<{layer.scale_y},{layer.scale_x}>, {sub}>"
    if name == "resize_to_":
        return f"resize_to<{layer.nr},{layer.nc},{sub}>"
    if name == "extract_":
        return f"extract<{layer.offset},{layer.k},{layer.nr},{layer.nc},{sub}>"
    if name == "reorg_":
        if (layer.row_stride, layer.col_stride) == (2, 2):
            return f"reorg<{sub}>"
        return f"add_layer<reorg_<{layer.row_stride},{layer.col_stride}>, {sub}>"
    if name in ("multiply_", "dropout_", "l2normalize_", "softmax_", "softmax_all_", "relu_",
                "prelu_", "leaky_relu_", "sig_", "mish_", "htan_", "clipped_relu_", "elu_",
                "gelu_", "smelu_", "silu_"):
        return f"{name[:-1]}<{sub}>"
    raise SerializationError(f"{layer.kind}: dlib has no layer for minidnn's {name}")


def _cpp_input(layer):
    name = type(layer).__name__
    if name == "input_rgb_image_":
        return "input_rgb_image"
    if name == "input_rgb_image_sized_":
        return (f"input_rgb_image_sized<{layer.nr_}>" if layer.nr_ == layer.nc_ else
                f"input_rgb_image_sized<{layer.nr_},{layer.nc_}>")
    if name == "input_rgb_image_pyramid_":
        return f"input_rgb_image_pyramid<pyramid_down<{layer.pyramid_down}>>"
    if name == "input_grayscale_image_pyramid_":
        return f"input_grayscale_image_pyramid<pyramid_down<{layer.pyramid_down}>>"
    if name == "input_grayscale_image_":
        return "input<matrix<unsigned char>>"
    if name == "input_tensor_":
        return "input_tensor"
    raise SerializationError(f"{layer.kind}: dlib has no input layer for minidnn's {name}")


def _cpp_loss(layer, sub, nodes):
    name = type(layer).__name__
    if name == "loss_mean_squared_per_pixel_":
        # dlib's is for one channel; loss_mean_squared_per_channel_and_pixel<K> for K
        k = nodes[1]._last_shape()
        k = int(k[1]) if k is not None else _channels_below(nodes, 1)
        tag = _extras.get(layer, {}).get("tag")
        if tag == "loss_mean_squared_per_channel_and_pixel_" or (tag is None and k not in (None, 1)):
            if k is None:
                raise SerializationError(f"{layer.kind}: the number of channels is unknown: run a "
                                         f"forward before dlib_type")
            return f"loss_mean_squared_per_channel_and_pixel<{k},{sub}>"
        return f"loss_mean_squared_per_pixel<{sub}>"
    return f"{name[:-1]}<{sub}>"


def dlib_type(net, name="net_type"):
    """The dlib C++ declaration of ``net``: ``using net_type = loss_mmod<con<1,9,9,1,1,...>>;``
    (tags, skips and add_prev named as in the net; a padding other than dlib's default is
    spelled with add_layer<con_<..., py, px>, SUBNET>)."""
    nodes = net.chain()

    def tagnames(t):
        return f"tag{t}" if t <= 10 else f"tag_id_{t}"
    decl = _cpp_input(nodes[-1].layer_details())
    for n in reversed(nodes[:-1]):
        layer = n.layer_details()
        decl = _cpp_loss(layer, decl, nodes) if layer.is_loss else _cpp(layer, decl, tagnames)
    return f"using {name} = {decl};"


__all__ = ["load_dlib", "save_dlib", "dlib_type", "inspect_dlib", "describe_entry", "Entry",
           "dlib_extras"]

"""dlib's loss_mmod at inference: the detections of a max-margin object detector
(dlib/dnn/loss.h: mmod_options, loss_mmod_::to_label and tensor_to_dets).

The subnet's output has one channel per detector window (five per window with bounding box
regression: the scores, then dx, dy, dw, dh of each window). Every output cell (k, r, c)
whose score exceeds ``adjust_threshold`` (0 by default) gives a box of window k's size
centred where the cell maps to in the input tensor (through each layer's
map_output_to_input), mapped into the image by the input layer (the tiled pyramid's
tiled_pyramid_to_image) and rounded; with bounding box regression the box is moved and
scaled by the regression outputs. Boxes are sorted by score and kept greedily unless they
overlap a kept one (``overlaps_nms``: IoU against the boxes' bounding union, or the part
of either box covered, as dlib's test_box_overlap computes them). ``net(image)`` returns
a list of :class:`mmod_rect` (a list of such lists for a list of images).
"""
import math
import weakref

import numpy as np

from .core import Layer, Node, ShapeError
from .loss import Loss


# ---------------------------------------------------------------------------- options
class test_box_overlap:
    """dlib's test_box_overlap: two rectangles overlap when the intersection over the area
    of their bounding union exceeds ``iou_thresh``, or covers more than
    ``percent_covered_thresh`` of either."""

    def __init__(self, iou_thresh=0.5, percent_covered_thresh=1.0):
        self.iou_thresh = float(iou_thresh)
        self.percent_covered_thresh = float(percent_covered_thresh)
        for name in ("iou_thresh", "percent_covered_thresh"):
            v = getattr(self, name)
            if not (0 <= v <= 1):
                raise ValueError(f"test_box_overlap: {name} must be in [0, 1], got {v!r}")

    def __call__(self, a, b):
        inner = _area(_intersect(a, b))
        if inner == 0:
            return False
        outer = _area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
        return (inner / outer > self.iou_thresh or inner / _area(a) > self.percent_covered_thresh
                or inner / _area(b) > self.percent_covered_thresh)

    def __eq__(self, other):
        return isinstance(other, test_box_overlap) and \
            (self.iou_thresh, self.percent_covered_thresh) == (other.iou_thresh,
                                                               other.percent_covered_thresh)

    def __repr__(self):
        return f"test_box_overlap({self.iou_thresh!r}, {self.percent_covered_thresh!r})"


def _intersect(a, b):
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))


def _area(r):
    """dlib's rectangle::area: (right - left + 1) * (bottom - top + 1), 0 when empty."""
    if r[0] > r[2] or r[1] > r[3]:
        return 0
    return (r[2] - r[0] + 1) * (r[3] - r[1] + 1)


class detector_window_details:
    """One sliding window of the detector: its size in input pixels and its label."""

    def __init__(self, width, height, label=""):
        self.width, self.height, self.label = int(width), int(height), str(label)
        if self.width < 1 or self.height < 1:
            raise ValueError(f"detector window {self.width}x{self.height}: the size must be >= 1")

    def __eq__(self, other):
        return isinstance(other, detector_window_details) and \
            (self.width, self.height, self.label) == (other.width, other.height, other.label)

    def __repr__(self):
        return f"detector_window_details({self.width}, {self.height}, {self.label!r})"


class mmod_options:
    """dlib's mmod_options, as its files store them (loss.h): the detector windows, the
    training settings (kept so that a file writes back as it was read) and the inference
    ones: ``overlaps_nms``, ``use_bounding_box_regression``."""

    def __init__(self, detector_windows=(), *, loss_per_false_alarm=1.0, loss_per_missed_target=1.0,
                 truth_match_iou_threshold=0.5, overlaps_nms=None, overlaps_ignore=None,
                 use_bounding_box_regression=False, bbr_lambda=100.0, assume_image_pyramid=True):
        self.detector_windows = [w if isinstance(w, detector_window_details)
                                 else detector_window_details(*w) for w in detector_windows]
        self.loss_per_false_alarm = float(loss_per_false_alarm)
        self.loss_per_missed_target = float(loss_per_missed_target)
        self.truth_match_iou_threshold = float(truth_match_iou_threshold)
        self.overlaps_nms = overlaps_nms if overlaps_nms is not None else test_box_overlap(0.4)
        self.overlaps_ignore = overlaps_ignore if overlaps_ignore is not None else test_box_overlap()
        self.use_bounding_box_regression = bool(use_bounding_box_regression)
        self.bbr_lambda = float(bbr_lambda)
        self.assume_image_pyramid = bool(assume_image_pyramid)

    def __eq__(self, other):
        return isinstance(other, mmod_options) and vars(self) == vars(other)

    def describe(self):
        """As dlib prints them: windows grouped by label ("label:WxH,...;...")."""
        by = {}
        for w in self.detector_windows:
            by.setdefault(w.label, []).append(f"{w.width}x{w.height}")
        wins = ";".join(f"{k}:{','.join(v)}" for k, v in sorted(by.items()))
        s = (f"detector_windows:({wins}), loss per FA:{self.loss_per_false_alarm:g}, loss per "
             f"miss:{self.loss_per_missed_target:g}, truth match IOU thresh:"
             f"{self.truth_match_iou_threshold:g}, use_bounding_box_regression:"
             f"{int(self.use_bounding_box_regression)}")
        if self.use_bounding_box_regression:
            s += f", bbr_lambda:{self.bbr_lambda:g}"
        return (s + f", overlaps_nms:({self.overlaps_nms.iou_thresh:g},"
                f"{self.overlaps_nms.percent_covered_thresh:g}), overlaps_ignore:("
                f"{self.overlaps_ignore.iou_thresh:g},{self.overlaps_ignore.percent_covered_thresh:g})")


# ---------------------------------------------------------------------------- detections
# node below a loss_mmod -> (structure revision, {(rows, columns): (x of each output column,
# y of each output row) in the input tensor}): _detect's point mapping, once per output size
_MAPS = weakref.WeakKeyDictionary()

class mmod_rect:
    """One detection: ``rect`` (left, top, right, bottom), inclusive, in the pixels of the
    image given to the net; ``confidence`` (the detector's score, a float); ``label`` (the
    detector window's label, "" when the file has none)."""

    __slots__ = ("rect", "confidence", "label")

    def __init__(self, rect, confidence, label=""):
        self.rect = tuple(int(v) for v in rect)
        self.confidence = float(confidence)
        self.label = label

    @property
    def detection_confidence(self):
        return self.confidence

    left = property(lambda self: self.rect[0])
    top = property(lambda self: self.rect[1])
    right = property(lambda self: self.rect[2])
    bottom = property(lambda self: self.rect[3])

    def to_dict(self):
        return {"rect": list(self.rect), "confidence": self.confidence, "label": self.label}

    def __eq__(self, other):
        return isinstance(other, mmod_rect) and (self.rect, self.confidence, self.label) == \
            (other.rect, other.confidence, other.label)

    def __repr__(self):
        return f"mmod_rect(rect={self.rect}, confidence={self.confidence:.6g}, label={self.label!r})"


def _lround(a):
    """C's lround of each element (halves away from zero), as int64."""
    a = np.asarray(a, np.float64)
    return np.where(a >= 0, np.floor(a + 0.5), -np.floor(-a + 0.5)).astype(np.int64)


def _nms_arrays(box, test):
    """Greedy NMS of integer boxes (n, 4) sorted best first: the indices kept. The first
    unsuppressed box is kept and every later one it overlaps is suppressed (the same as
    dlib's keep-unless-it-overlaps-a-kept-one, the test being symmetric)."""
    n = box.shape[0]
    b = box.astype(np.float64)
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    area[(b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])] = 0
    alive = np.ones(n, bool)
    keep = []
    i = 0
    while i < n:
        keep.append(i)
        rest = np.flatnonzero(alive[i + 1:]) + i + 1
        if rest.size:
            iw = np.minimum(b[rest, 2], b[i, 2]) - np.maximum(b[rest, 0], b[i, 0]) + 1
            ih = np.minimum(b[rest, 3], b[i, 3]) - np.maximum(b[rest, 1], b[i, 1]) + 1
            inner = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
            ow = np.maximum(b[rest, 2], b[i, 2]) - np.minimum(b[rest, 0], b[i, 0]) + 1
            oh = np.maximum(b[rest, 3], b[i, 3]) - np.minimum(b[rest, 1], b[i, 1]) + 1
            with np.errstate(divide="ignore", invalid="ignore"):
                over = (inner / (ow * oh) > test.iou_thresh) | \
                    (inner / area[rest] > test.percent_covered_thresh) | \
                    (inner / area[i] > test.percent_covered_thresh)
            alive[rest[(inner > 0) & over]] = False
        nxt = np.flatnonzero(alive[i + 1:])
        i = int(nxt[0]) + i + 1 if nxt.size else n
    return keep


def _map_output_to_input(node, p):
    """dlib's output_tensor_to_input_tensor: point p of ``node``'s output -> its input tensor,
    through every layer below (con/pool: p * stride - padding + size // 2; upsample:
    p / scale; pointwise, affine, tags: unchanged; skipN: from the tagged node)."""
    x, y = p
    n = node
    while n is not None:
        layer = n.layer_details()
        if layer.is_input:
            break
        kind = type(layer).__name__
        if kind in ("con_", "max_pool_", "avg_pool_") and getattr(layer, "nr", 0):
            x = x * layer.stride_x - layer.padding_x + layer.nc // 2
            y = y * layer.stride_y - layer.padding_y + layer.nr // 2
        elif kind == "cont_":
            x = (x + layer.padding_x - layer.nc // 2) / layer.stride_x
            y = (y + layer.padding_y - layer.nr // 2) / layer.stride_y
        elif kind == "upsample_":
            x, y = x / layer.scale_x, y / layer.scale_y
        elif kind == "skip_":
            t = n.subnet()
            while t is not None and not (type(t.layer_details()).__name__ == "tag_"
                                         and t.layer_details().id == layer.id):
                t = t.subnet()
            n = t
            continue
        elif not (layer.pointwise or layer.affine_like or layer.disabled or kind in (
                "tag_", "multiply_", "dropout_", "l2normalize_", "softmax_", "softmax_all_",
                "add_prev_", "mult_prev_", "scale_", "scale_prev_", "concat_")):
            raise ValueError(f"loss_mmod: dlib does not map points through {layer.kind} "
                             f"(map_output_to_input); it cannot be below a detector")
        n = n.subnet()
    return x, y


class loss_mmod_(Loss):
    """WHAT THIS OBJECT REPRESENTS: dlib's loss_mmod_ (max-margin object detection) at
    inference: ``net(image, adjust_threshold=0.0)`` returns the detections as dlib's
    ``net(image)`` / ``net.process(image, adjust_threshold)`` do (see the module docstring).
    Training with it is not supported (ValueError at train time)."""

    kind = "loss_mmod"
    record = "loss_mmod_1"
    takes_input_batch = True
    label_options = ("adjust_threshold",)
    label_name = "detections"

    def __init__(self, options=None):
        super().__init__()
        self.options = options if options is not None else mmod_options()
        if not isinstance(self.options, mmod_options):
            raise TypeError(f"loss_mmod: expected mmod_options, got {type(self.options).__name__}")

    def describe(self):
        return self.options.describe()

    def _channels(self):
        n = len(self.options.detector_windows)
        return 5 * n if self.options.use_bounding_box_regression else n

    def setup(self, in_shape):
        if not self.options.detector_windows:
            raise ShapeError("loss_mmod has no detector windows")
        if in_shape[1] != self._channels():
            raise ShapeError(f"expected the subnet's output to have {self._channels()} channels "
                             f"({len(self.options.detector_windows)} detector windows"
                             f"{', with bounding box regression' if self.options.use_bounding_box_regression else ''}"
                             f"), got {in_shape}")

    # -- detections ---------------------------------------------------------
    def labels(self, out, batch=None, adjust_threshold=0.0):
        """A list (one per sample) of lists of mmod_rect, best first."""
        t = float(adjust_threshold)
        if not math.isfinite(t):
            raise ValueError(f"{self.kind}: adjust_threshold must be a finite number, got {adjust_threshold!r}")
        if out.shape[1] != self._channels():
            raise ValueError(f"{self.kind}: the subnet's output has {out.shape[1]} channels, "
                             f"expected {self._channels()}")
        node = None if batch is None else getattr(batch, "node", None)
        layer = None if batch is None else batch.layer
        return [self._detect(out[i], t, node, layer, batch) for i in range(out.shape[0])]

    def to_label(self, out):
        return self.labels(out)

    def _detect(self, o, thresh, node, inp, batch):
        """dlib's tensor_to_dets and NMS for one sample's output o (K, R, C), vectorised:
        every candidate gets the same arithmetic as dlib gives it, element by element."""
        opts = self.options
        wins = opts.detector_windows
        nwin = len(wins)
        scores = o[:nwin]
        ks, rs, cs = np.nonzero(scores > thresh)    # in dlib's scan order: k, r, c
        if ks.size == 0:
            return []
        score = scores[ks, rs, cs].astype(np.float64)
        below = node.subnet() if node is not None else None
        if below is not None:
            # every column and every row of the output mapped once per output size (x
            # depends only on the column, y on the row): the same arithmetic per element
            xmap, ymap = self._output_to_input_maps(below, o.shape[1], o.shape[2])
            px, py = xmap[cs], ymap[rs]
        else:
            px, py = cs.astype(np.float64), rs.astype(np.float64)
        w = np.array([d.width - 1 for d in wins], np.float64)[ks]
        h = np.array([d.height - 1 for d in wins], np.float64)[ks]
        drect = np.stack([px - w / 2, py - h / 2, px + w / 2, py + h / 2], axis=1)
        if inp is not None:
            drect = inp.tensor_space_to_image_space_many(batch, drect)
        rect = _lround(drect)                       # intermediate_detection's rectangle
        bbr = rect.astype(np.float64)               # rect_bbr = the rounded rect
        if opts.use_bounding_box_regression:
            # dlib: w = rect.width() - 1 of the unrounded drectangle, translate_rect by
            # (dx w, dy h), then centered_drect(rect, w e^dw + 1, h e^dh + 1)
            off = nwin + ks * 4
            dx, dy, dw, dh = (o[off + j, rs, cs].astype(np.float64) for j in range(4))
            dw, dh = np.exp(dw), np.exp(dh)
            rw = (drect[:, 2] - drect[:, 0] + 1) - 1
            rh = (drect[:, 3] - drect[:, 1] + 1) - 1
            ml, mt = drect[:, 0] + dx * rw, drect[:, 1] + dy * rh
            mr, mb = drect[:, 2] + dx * rw, drect[:, 3] + dy * rh
            cx, cy = (ml + mr) / 2.0, (mt + mb) / 2.0
            nw, nh = (rw * dw + 1) - 1, (rh * dh + 1) - 1
            bbr = np.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], axis=1)
        order = np.lexsort((np.arange(score.size), -score))     # best first, then scan order
        boxes = _lround(bbr[order])
        keep = _nms_arrays(boxes, opts.overlaps_nms)
        out = []
        for i in keep:
            r = tuple(int(v) for v in boxes[i])
            if inp is not None:
                r = inp.image_space_to_user(batch, r)
            out.append(mmod_rect(r, float(score[order[i]]), wins[int(ks[order[i]])].label))
        return out

    # -- training -------------------------------------------------------------
    def _output_to_input_maps(self, below, rows, cols):
        """(_map_output_to_input of each output column's x, of each row's y) for ``below``,
        cached per (node, rows, columns) until the net's structure changes."""
        from .core import _revision
        per = _MAPS.get(below)
        if per is None or per[0] != _revision[0]:
            per = (_revision[0], {})
            _MAPS[below] = per
        got = per[1].get((rows, cols))
        if got is None:
            n = max(rows, cols)
            # one call on equally long arrays (the first cols x's and rows y's are the grid)
            px, py = _map_output_to_input(below, (np.resize(np.arange(cols, dtype=np.float64), n),
                                                  np.resize(np.arange(rows, dtype=np.float64), n)))
            got = (np.asarray(px, np.float64)[:cols].copy(), np.asarray(py, np.float64)[:rows].copy())
            if len(per[1]) >= 16:
                per[1].clear()
            per[1][(rows, cols)] = got
        return got

    def check_labels(self, y, n, out_shape):
        raise ValueError(f"{self.kind}: training a detector is not supported by minidnn (it runs "
                         f"dlib's trained detectors); train it with dlib")

    # -- the record (minidnn's own format) --------------------------------------
    def write_record(self, w):
        o = self.options
        w.u32("windows", len(o.detector_windows))
        for d in o.detector_windows:
            w.u32("width", d.width)
            w.u32("height", d.height)
            w.string("label", d.label)
        for v in (o.loss_per_false_alarm, o.loss_per_missed_target, o.truth_match_iou_threshold,
                  o.overlaps_nms.iou_thresh, o.overlaps_nms.percent_covered_thresh,
                  o.overlaps_ignore.iou_thresh, o.overlaps_ignore.percent_covered_thresh,
                  o.bbr_lambda):
            w.f64(v)
        w.bool(o.use_bounding_box_regression)
        w.bool(o.assume_image_pyramid)

    @classmethod
    def read_record(cls, r, tag):
        n = r.u32("windows")
        if not 1 <= n <= 4096:
            raise ValueError(f"loss_mmod: {n} detector windows (expected 1..4096)")
        wins = [detector_window_details(r.u32("width"), r.u32("height"), r.string("label"))
                for _ in range(n)]
        fa, miss, iou, nms_i, nms_p, ign_i, ign_p, lam = (
            r.field(f) for f in [_F(x) for x in ("loss_per_false_alarm", "loss_per_missed_target",
                                                  "truth_match_iou_threshold", "nms_iou",
                                                  "nms_covered", "ignore_iou", "ignore_covered",
                                                  "bbr_lambda")])
        bbr = r.bool("use_bounding_box_regression")
        pyr = r.bool("assume_image_pyramid")
        return cls(mmod_options(wins, loss_per_false_alarm=fa, loss_per_missed_target=miss,
                                truth_match_iou_threshold=iou,
                                overlaps_nms=test_box_overlap(nms_i, nms_p),
                                overlaps_ignore=test_box_overlap(ign_i, ign_p),
                                use_bounding_box_regression=bbr, bbr_lambda=lam,
                                assume_image_pyramid=pyr))


def _F(name):
    from .core import f64
    return f64(name)


def loss_mmod(subnet, options=None):
    """dlib's loss_mmod<subnet> with its mmod_options (see loss_mmod_)."""
    return Node(loss_mmod_(options), subnet)


__all__ = ["test_box_overlap", "detector_window_details", "mmod_options", "mmod_rect",
           "loss_mmod_", "loss_mmod"]

"""dlib's input layers for images (dlib/dnn/input.h): the network takes NumPy images as users
have them, uint8 (H, W, 3) RGB or (H, W) grayscale, one or a list (or a uint8 batch array).

- ``input_rgb_image``: planes R, G, B with value (p - mean) / 256 (dlib's per-channel means
  122.782, 117.001, 104.298 by default, stored as float32 as dlib does).
- ``input_rgb_image_sized(nr, nc)``: the same, for images of exactly nr x nc.
- ``input_grayscale_image``: dlib's ``input<matrix<unsigned char>>``, one plane p / 256.
- ``input_rgb_image_pyramid(N)`` / ``input_grayscale_image_pyramid(N)``: dlib's
  ``input_*_image_pyramid<pyramid_down<N>>``: every level of the image pyramid (each level
  N-1/N the size of the one before) in one tensor, placed and padded exactly as dlib's
  ``impl::compute_tiled_image_pyramid_details`` does, each level made from the previous one
  inside the tensor by dlib's bilinear resize (ops.tiled_pyramid, bit for bit). Rectangles
  in the tensor map back to the image with dlib's ``tiled_pyramid_to_image``; ``upsample=n``
  (``net(image, upsample=n)``) first enlarges the image n times with dlib's ``pyramid_up``
  (pyramid_down<2>), as dlib's Python ``cnn_face_detection_model_v1(img, n)`` does, and
  detections are mapped back down with ``rect_down``.

Rectangles here are tuples (left, top, right, bottom), inclusive, dlib's convention: a
``drectangle`` is a tuple of floats, a ``rectangle`` of ints (dlib rounds the former to
the latter with ``lround``).
"""
import math

import numpy as np

from .. import ops
from ..core import InputBatch, Layer, LayerError, Node, ShapeError, f64, u32
from .common import pos_int, real

DLIB_MEANS = (122.782, 117.001, 104.298)     # dlib's default avg_red, avg_green, avg_blue
_RECTS = {}     # (h, w, pyramid_down, padding, outer_padding) -> (rects, rows, columns)


def _f32(v):
    """v rounded to float32 (dlib stores the means as float), as a Python float."""
    return float(np.float32(v))


def _lround(v):
    """C's lround: to nearest, halves away from zero."""
    return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))


def rect_from_drect(r):
    """dlib's rectangle(drectangle): each coordinate lround'ed."""
    return tuple(_lround(v) for v in r)


def _point_round(v):
    """dlib's point(dpoint): floor(v + 0.5)."""
    return int(math.floor(v + 0.5))


# ---------------------------------------------------------------------------- pyramid_down<N>
def pyramid_down_size(n, nr, nc):
    """dlib's find_pyramid_down_output_image_size for pyramid_down<n>."""
    def trunc_div(a, b):
        q = abs(a) // b
        return q if a >= 0 else -q
    if n == 1:
        return 0, 0
    if n == 2:
        return trunc_div(nr - 3, 2), trunc_div(nc - 3, 2)
    if n == 3:
        return trunc_div(2 * (nr - 2), 3), trunc_div(2 * (nc - 2), 3)
    rate = (n - 1.0) / n
    return int(math.floor(rate * nr)), int(math.floor(rate * nc))


def point_up(n, p, levels=1):
    """pyramid_down<n>::point_up(p, levels) for a point (x, y) of floats."""
    x, y = float(p[0]), float(p[1])
    for _ in range(levels):
        if n == 1:
            return 0.0, 0.0
        if n == 2:
            x, y = (x + 1.25) * 2, (y + 0.75) * 2
        elif n == 3:
            x, y = x * 1.5 + 1.5, y * 1.5 + 1.5
        else:
            ratio = n / (n - 1.0)
            x, y = x * ratio + 0.3, y * ratio + 0.3
    return x, y


def point_down(n, p, levels=1):
    """pyramid_down<n>::point_down(p, levels)."""
    x, y = float(p[0]), float(p[1])
    for _ in range(levels):
        if n == 1:
            return 0.0, 0.0
        if n == 2:
            x, y = x / 2.0 - 1.25, y / 2.0 - 0.75
        elif n == 3:
            ratio = 2.0 / 3.0
            x, y = x * ratio - 1, y * ratio - 1
        else:
            ratio = (n - 1.0) / n
            x, y = (x - 0.3) * ratio, (y - 0.3) * ratio
    return x, y


def rect_up(n, r, levels=1):
    tl = point_up(n, (r[0], r[1]), levels)
    br = point_up(n, (r[2], r[3]), levels)
    return (tl[0], tl[1], br[0], br[1])


def rect_down(n, r, levels=1):
    tl = point_down(n, (r[0], r[1]), levels)
    br = point_down(n, (r[2], r[3]), levels)
    return (tl[0], tl[1], br[0], br[1])


def tiled_pyramid_rects(n, nr, nc, padding=10, outer_padding=11):
    """dlib's impl::compute_tiled_image_pyramid_details: ([rectangle of each level], rows,
    columns) of the tiled pyramid of an nr x nc image under pyramid_down<n>."""
    if nr * nc == 0:
        return [], 0, 0
    min_height = 5
    sizes = [(nr, nc)]                       # (height, width) of each level
    while True:
        nr, nc = pyramid_down_size(n, nr, nc)
        if nr * nc == 0 or nr < min_height:
            break
        sizes.append((nr, nc))
        if len(sizes) > 100000:               # cannot happen for n >= 2; guards n == 1 misuse
            break
    total_height = sum(h + padding for h, _ in sizes) - padding * 2
    h0, w0 = sizes[0]
    height = 0
    prev_width = 0
    for h, w in sizes:
        if w <= w0 - prev_width - padding and (height - h0) * 2 >= (total_height - h0):
            break
        height += h + padding
        prev_width = w
    height -= padding
    width = w0
    out_nr = height + outer_padding * 2
    out_nc = width + outer_padding * 2
    rects = []
    y = outer_padding
    i = 0
    while y < height + outer_padding and i < len(sizes):
        h, w = sizes[i]
        rects.append((outer_padding, y, outer_padding + w - 1, y + h - 1))
        y += h + padding
        i += 1
    y -= padding
    while i < len(sizes):
        h, w = sizes[i]
        p1 = (outer_padding + width - 1, y - 1)
        p2 = (p1[0] - (w - 1), p1[1] - (h - 1))      # p1 - rects[i].br_corner() (at origin)
        rect = (min(p1[0], p2[0]), min(p1[1], p2[1]), max(p1[0], p2[0]), max(p1[1], p2[1]))
        r0 = rects[0]
        if max(r0[0], rect[0]) <= min(r0[2], rect[2]) and max(r0[1], rect[1]) <= min(r0[3], rect[3]):
            break                                     # it would intersect the original image
        rects.append(rect)
        y -= h + padding
        i += 1
    return rects, out_nr, out_nc


def _contains(r, x, y):
    return r[0] <= x <= r[2] and r[1] <= y <= r[3]


def nearest_rect(rects, p):
    """dlib's nearest_rect(rects, point): the first rect containing p, else the nearest."""
    x, y = p
    best, idx = math.inf, 0
    for i, r in enumerate(rects):
        if _contains(r, x, y):
            return i
        nx = min(max(x, r[0]), r[2])
        ny = min(max(y, r[1]), r[3])
        d = math.sqrt((nx - x) ** 2 + (ny - y) ** 2)
        if d < best:
            best, idx = d, i
    return idx


def tiled_pyramid_to_image_many(n, rects, boxes):
    """tiled_pyramid_to_image of each drectangle row of boxes (m, 4), element for element
    the same arithmetic: the level of the nearest rect to each box's centre (the first that
    contains it: distance 0), the box moved to that level's origin and rect_up'ed."""
    boxes = np.asarray(boxes, np.float64)
    R = np.array(rects, np.float64)                         # (L, 4)
    cx = np.floor((boxes[:, 0] + boxes[:, 2]) / 2.0 + 0.5)
    cy = np.floor((boxes[:, 1] + boxes[:, 3]) / 2.0 + 0.5)
    nx = np.minimum(np.maximum(cx[:, None], R[None, :, 0]), R[None, :, 2])
    ny = np.minimum(np.maximum(cy[:, None], R[None, :, 1]), R[None, :, 3])
    level = np.argmin(np.sqrt((nx - cx[:, None]) ** 2 + (ny - cy[:, None]) ** 2), axis=1)
    out = boxes - np.stack([R[level, 0], R[level, 1], R[level, 0], R[level, 1]], axis=1)
    top = int(level.max(initial=0))
    if top == 0:
        return out
    # deepest level first, so that the boxes still going up are a prefix; each point_up
    # step is the same operations as before, in place
    order = np.argsort(-level, kind="stable")
    o = out[order]
    x, y = o[:, 0::2], o[:, 1::2]                 # views: (left, right), (top, bottom)
    count = np.bincount(level, minlength=top + 1)[::-1].cumsum()[::-1]   # boxes >= level
    for lvl in range(1, top + 1):
        k = int(count[lvl])
        xk, yk = x[:k], y[:k]
        if n == 1:
            xk[...] = 0.0
            yk[...] = 0.0
        elif n == 2:
            xk += 1.25
            xk *= 2
            yk += 0.75
            yk *= 2
        elif n == 3:
            xk *= 1.5
            xk += 1.5
            yk *= 1.5
            yk += 1.5
        else:
            ratio = n / (n - 1.0)
            xk *= ratio
            xk += 0.3
            yk *= ratio
            yk += 0.3
    out[order] = o
    return out


def tiled_pyramid_to_image(n, rects, r):
    """dlib's tiled_pyramid_to_image<pyramid_down<n>>(rects, drectangle r)."""
    cx, cy = (r[0] + r[2]) / 2.0, (r[1] + r[3]) / 2.0
    i = nearest_rect(rects, (_point_round(cx), _point_round(cy)))
    ox, oy = rects[i][0], rects[i][1]
    return rect_up(n, (r[0] - ox, r[1] - oy, r[2] - ox, r[3] - oy), i)


# ---------------------------------------------------------------------------- pyramid_up
def resize_image_u8(img, nr, nc):
    """dlib's resize_image(img, out) with bilinear interpolation for uint8 images (H, W, 3)
    or (H, W), into a new nr x nc image (ops.resize_image_u8: bit for bit)."""
    out = np.empty((nr, nc) + img.shape[2:], np.uint8)
    ops.resize_image_u8(np.ascontiguousarray(img), out)
    return out


def pyramid_up_size(nr, nc):
    """The (rows, columns) of dlib's pyramid_up of an nr x nc image: the size of
    rect_up(get_rect(img)) (bottom + 1, right + 1), (0, 0) when that rectangle is empty."""
    up = rect_from_drect(rect_up(2, (0, 0, nc - 1, nr - 1)))
    if up[2] < up[0] or up[3] < up[1]:
        return 0, 0
    return up[3] + 1, up[2] + 1


def pyramid_up(img):
    """dlib's pyramid_up(img) (pyramid_down<2>): the image enlarged to the size of
    rect_up(get_rect(img)) by resize_image's bilinear interpolation."""
    nr, nc = pyramid_up_size(*img.shape[:2])
    if nr == 0:
        return np.zeros((0, 0) + img.shape[2:], np.uint8)
    return resize_image_u8(img, nr, nc)


# ---------------------------------------------------------------------------- the layers
class _image_input(Layer):
    """What dlib's image input layers share: taking uint8 NumPy images (one, a list, or a
    batch array) and remembering the size of the last tensor (``input_shape``)."""

    is_input = True
    takes_images = True
    output_mode = "conv"
    channels = 3

    def __init__(self):
        super().__init__()
        self.nr = self.nc = None          # rows and columns of the last tensor

    @property
    def k(self):
        return self.channels

    def input_shape(self):
        return None if self.nr is None else (self.channels, self.nr, self.nc)

    def setup(self, in_shape):
        if in_shape[1] != self.channels:
            raise ShapeError(f"expected a tensor with {self.channels} channels, got {in_shape}")
        self.nr, self.nc = in_shape[2], in_shape[3]

    # -- images -----------------------------------------------------------
    def _bad(self, where, msg):
        return LayerError(f"{where}: {msg}")

    def check_image(self, a, where=None):
        """One image as this layer takes it: a C-contiguous uint8 array (H, W, 3) for the
        RGB layers (a grayscale (H, W) or (H, W, 1) image becomes RGB with r = g = b, as
        dlib's Python module does), (H, W) for the grayscale ones; LayerError otherwise."""
        where = where or self.kind
        if not isinstance(a, np.ndarray):
            raise self._bad(where, f"expected an image (a uint8 NumPy array), got {type(a).__name__}")
        if a.dtype != np.uint8:
            raise self._bad(where, f"expected a uint8 image, got dtype {a.dtype} (dlib's image "
                                   f"layers take 8-bit images, values 0..255)")
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if self.channels == 3:
            if a.ndim == 2:
                a = np.repeat(a[:, :, None], 3, axis=2)
            if a.ndim != 3 or a.shape[2] != 3:
                raise self._bad(where, f"expected an RGB image (H, W, 3) or a grayscale one "
                                       f"(H, W), got shape {a.shape}")
        elif a.ndim != 2:
            raise self._bad(where, f"expected a grayscale image (H, W), got shape {a.shape}")
        if a.shape[0] < 1 or a.shape[1] < 1:
            raise self._bad(where, f"expected a non-empty image, got shape {a.shape}")
        return np.ascontiguousarray(a)

    def _images(self, x, where):
        """(list of images, whether x was a single image)."""
        if isinstance(x, np.ndarray):
            if self.channels == 1 and x.ndim == 3 and x.shape[2] == 3:
                raise self._bad(where, f"expected grayscale images, (H, W), a list of them or a "
                                       f"batch (N, H, W); got shape {x.shape}, an RGB image? "
                                       f"(convert it to grayscale, or pass a list)")
            batch_rank = 4 if self.channels == 3 else 3
            if x.ndim == batch_rank and not (self.channels == 1 and x.ndim == 3 and x.shape[2] == 1):
                if x.shape[0] < 1:
                    raise self._bad(where, f"expected at least one image, got shape {x.shape}")
                return [self.check_image(x[i], where) for i in range(x.shape[0])], False
            if self.channels == 1 and x.ndim == 4 and x.shape[3] == 1:
                return [self.check_image(x[i], where) for i in range(x.shape[0])], False
            return [self.check_image(x, where)], True
        if isinstance(x, (list, tuple)):
            if not x:
                raise self._bad(where, "expected at least one image, got an empty list")
            return [self.check_image(a, f"{where}: image {i}") for i, a in enumerate(x)], False
        raise self._bad(where, f"expected an image (uint8 NumPy array) or a list of images, "
                               f"got {type(x).__name__}")

    def _same_size(self, imgs, where):
        h, w = imgs[0].shape[:2]
        for i, a in enumerate(imgs):
            if a.shape[:2] != (h, w):
                raise self._bad(where, f"all images of a batch must have the same size: image 0 "
                                       f"is {h} x {w}, image {i} is {a.shape[0]} x {a.shape[1]} "
                                       f"(run them one at a time)")
        return h, w

    def _planes(self, imgs, out, rect=None):
        """Write each image's planes into out (N, K, R, C) at rect (default: all of it):
        (p - mean) / 256 for the RGB layers, p / 256 for the grayscale ones, in float32 as
        dlib computes them."""
        l, t = (0, 0) if rect is None else (rect[0], rect[1])
        for i, a in enumerate(imgs):
            h, w = a.shape[:2]
            if self.channels == 3:
                for k, m in enumerate(self.means):
                    v = out[i, k, t:t + h, l:l + w]
                    np.subtract(a[:, :, k], np.float32(m), out=v, dtype=np.float32)
                    v *= np.float32(1 / 256)
            else:
                v = out[i, 0, t:t + h, l:l + w]
                np.multiply(a, np.float32(1 / 256), out=v, dtype=np.float32)

    def to_tensor(self, x, device, index):
        where = f"layer<{index}> {self.kind}"
        imgs, single = self._images(x, where)
        h, w = self._same_size(imgs, where)
        self._check_size(h, w, where)
        t = np.empty((len(imgs), self.channels, h, w), np.float32)
        self._planes(imgs, t)
        return InputBatch(t, single=single, layer=self)

    def _check_size(self, h, w, where):
        pass

    # -- mapping rectangles back (identity for the plain layers) ------------
    def tensor_space_to_image_space(self, batch, r):
        return r

    def tensor_space_to_image_space_many(self, batch, boxes):
        """tensor_space_to_image_space of each row of boxes (m, 4)."""
        return boxes

    def image_space_to_user(self, batch, r):
        return r


def _mean_fields():
    return (f64("avg_red"), f64("avg_green"), f64("avg_blue"))


class _rgb_means:
    def _init_means(self, avg_red, avg_green, avg_blue):
        self.avg_red = _f32(real(self.kind, "avg_red", avg_red))
        self.avg_green = _f32(real(self.kind, "avg_green", avg_green))
        self.avg_blue = _f32(real(self.kind, "avg_blue", avg_blue))

    @property
    def means(self):
        return (self.avg_red, self.avg_green, self.avg_blue)

    def _describe_means(self):
        return f"{self.avg_red:g},{self.avg_green:g},{self.avg_blue:g}"


class input_rgb_image_(_rgb_means, _image_input):
    """WHAT THIS OBJECT REPRESENTS: dlib's input_rgb_image: RGB images (H, W, 3) uint8 of
    any one size per batch -> (N, 3, H, W) float32, value (p - avg) / 256 per channel."""

    kind = "input_rgb_image"
    settings = _mean_fields()
    record = "input_rgb_image_1"

    def __init__(self, avg_red=DLIB_MEANS[0], avg_green=DLIB_MEANS[1], avg_blue=DLIB_MEANS[2]):
        super().__init__()
        self._init_means(avg_red, avg_green, avg_blue)

    def describe(self):
        return self._describe_means()


class input_rgb_image_sized_(_rgb_means, _image_input):
    """WHAT THIS OBJECT REPRESENTS: dlib's input_rgb_image_sized<NR, NC>: as input_rgb_image,
    for images of exactly nr x nc (any other size raises LayerError)."""

    kind = "input_rgb_image_sized"
    settings = (u32("nr_"), u32("nc_")) + _mean_fields()
    record = "input_rgb_image_sized_1"

    def __init__(self, nr_, nc_=None, avg_red=DLIB_MEANS[0], avg_green=DLIB_MEANS[1],
                 avg_blue=DLIB_MEANS[2]):
        super().__init__()
        self.nr_ = pos_int(self.kind, "nr", nr_)
        self.nc_ = self.nr_ if nc_ is None else pos_int(self.kind, "nc", nc_)
        self._init_means(avg_red, avg_green, avg_blue)

    def describe(self):
        return f"{self._describe_means()}, nr={self.nr_}, nc={self.nc_}"

    def _check_size(self, h, w, where):
        if (h, w) != (self.nr_, self.nc_):
            raise self._bad(where, f"expected {self.nr_} x {self.nc_} images (rows x columns), "
                                   f"got {h} x {w}")


class input_grayscale_image_(_image_input):
    """WHAT THIS OBJECT REPRESENTS: dlib's input<matrix<unsigned char>>: grayscale images
    (H, W) uint8 -> (N, 1, H, W) float32, value p / 256."""

    kind = "input_grayscale_image"
    record = "input_grayscale_image_1"
    channels = 1


class _pyramid_input(_image_input):
    """What the two pyramid input layers share (see the module docstring)."""

    input_options = ("upsample",)

    def _init_pyramid(self, pyramid_down, pyramid_padding, pyramid_outer_padding):
        self.pyramid_down = pos_int(self.kind, "pyramid_down", pyramid_down, 1)
        self.pyramid_padding = pos_int(self.kind, "pyramid_padding", pyramid_padding, 0)
        self.pyramid_outer_padding = pos_int(self.kind, "pyramid_outer_padding",
                                             pyramid_outer_padding, 0)

    def _describe_pyramid(self):
        return (f"pyramid_down={self.pyramid_down}, pyramid_padding={self.pyramid_padding}, "
                f"pyramid_outer_padding={self.pyramid_outer_padding}")

    def to_tensor(self, x, device, index, upsample=0):
        """The tiled pyramid of each image (after ``upsample`` pyramid_up's) as one tensor
        (N, K, R, C), in an InputBatch whose annotation holds the level rectangles."""
        where = f"layer<{index}> {self.kind}"
        if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or \
                not 0 <= upsample <= 8:
            raise LayerError(f"{where}: upsample must be an integer from 0 to 8, got {upsample!r}")
        imgs, single = self._images(x, where)
        h0, w0 = self._same_size(imgs, where)
        sizes = [(h0, w0)]
        for _ in range(int(upsample)):
            sizes.append(pyramid_up_size(*sizes[-1]))
        h, w = sizes[-1]
        rects, nr, nc = self._pyramid_rects(h, w)
        if not rects:
            raise LayerError(f"{where}: the image ({h0} x {w0}) is too small for a pyramid")
        annotation = {"rects": rects, "upsample": int(upsample), "image_size": (h0, w0)}
        shape = (len(imgs), self.channels, nr, nc)
        build = self._device_pyramid(device)
        if build is not None:
            # on the GPU: the images are uploaded as they are, pyramid_up, the planes and
            # the levels run there (backends/cuda/image_ops.py), the same values bit for bit
            means = self.means if self.channels == 3 else (0.0,)
            t = build(imgs, means, rects, shape, sizes)
            return InputBatch(t, annotation=annotation, single=single, layer=self)
        for _ in range(int(upsample)):
            imgs = [pyramid_up(a) for a in imgs]
        t = np.zeros(shape, np.float32)
        self._planes(imgs, t, rects[0])
        ops.tiled_pyramid(t, rects)
        return InputBatch(t, annotation=annotation, single=single, layer=self)

    def _pyramid_rects(self, h, w):
        """tiled_pyramid_rects of an h x w image under this layer's settings, cached (the
        same few image sizes come again and again)."""
        key = (h, w, self.pyramid_down, self.pyramid_padding, self.pyramid_outer_padding)
        got = _RECTS.get(key)
        if got is None:
            rects, nr, nc = tiled_pyramid_rects(self.pyramid_down, h, w, self.pyramid_padding,
                                                self.pyramid_outer_padding)
            got = (tuple(rects), nr, nc)
            if len(_RECTS) >= 256:
                _RECTS.clear()
            _RECTS[key] = got
        rects, nr, nc = got
        return list(rects), nr, nc

    @staticmethod
    def _device_pyramid(device):
        """The backend's image_pyramid (built on the device) for a device net, or None (the
        CPU, or a backend without it: built on the host and uploaded by the forward)."""
        if device == "cpu":
            return None
        return getattr(ops.backend(device), "image_pyramid", None)

    def tensor_space_to_image_space(self, batch, r):
        """A drectangle in the tiled pyramid -> the (possibly upsampled) image: dlib's
        input_layer(net).tensor_space_to_image_space."""
        return tiled_pyramid_to_image(self.pyramid_down, batch.annotation["rects"], r)

    def tensor_space_to_image_space_many(self, batch, boxes):
        return tiled_pyramid_to_image_many(self.pyramid_down, batch.annotation["rects"], boxes)

    def image_space_to_user(self, batch, r):
        """A rectangle of the image the net saw -> the user's image: rect_down(r, upsample)
        with pyramid_down<2>, rounded (what dlib's Python detector does after the net)."""
        n = batch.annotation["upsample"]
        if not n:
            return r
        return rect_from_drect(rect_down(2, r, n))


class input_rgb_image_pyramid_(_rgb_means, _pyramid_input):
    """WHAT THIS OBJECT REPRESENTS: dlib's input_rgb_image_pyramid<pyramid_down<N>>: each RGB
    image (H, W, 3) uint8 becomes its tiled image pyramid, (N, 3, R, C) float32 with level 0
    holding (p - avg) / 256 and zeros between the levels (see the module docstring)."""

    kind = "input_rgb_image_pyramid"
    settings = (u32("pyramid_down"),) + _mean_fields() + (u32("pyramid_padding"),
                                                          u32("pyramid_outer_padding"))
    record = "input_rgb_image_pyramid_1"

    def __init__(self, pyramid_down=6, avg_red=DLIB_MEANS[0], avg_green=DLIB_MEANS[1],
                 avg_blue=DLIB_MEANS[2], pyramid_padding=10, pyramid_outer_padding=11):
        super().__init__()
        self._init_means(avg_red, avg_green, avg_blue)
        self._init_pyramid(pyramid_down, pyramid_padding, pyramid_outer_padding)

    def describe(self):
        return f"{self._describe_means()}, {self._describe_pyramid()}"


class input_grayscale_image_pyramid_(_pyramid_input):
    """WHAT THIS OBJECT REPRESENTS: dlib's input_grayscale_image_pyramid<pyramid_down<N>>: as
    input_rgb_image_pyramid for grayscale images (H, W) uint8, value p / 256, one channel."""

    kind = "input_grayscale_image_pyramid"
    settings = (u32("pyramid_down"), u32("pyramid_padding"), u32("pyramid_outer_padding"))
    record = "input_grayscale_image_pyramid_1"
    channels = 1

    def __init__(self, pyramid_down=6, pyramid_padding=10, pyramid_outer_padding=11):
        super().__init__()
        self._init_pyramid(pyramid_down, pyramid_padding, pyramid_outer_padding)

    def describe(self):
        return self._describe_pyramid()


# ---------------------------------------------------------------------------- factories
def input_rgb_image(*, avg_red=DLIB_MEANS[0], avg_green=DLIB_MEANS[1], avg_blue=DLIB_MEANS[2]):
    """dlib's input_rgb_image (see input_rgb_image_)."""
    return Node(input_rgb_image_(avg_red, avg_green, avg_blue), None)


def input_rgb_image_sized(nr, nc=None, *, avg_red=DLIB_MEANS[0], avg_green=DLIB_MEANS[1],
                          avg_blue=DLIB_MEANS[2]):
    """dlib's input_rgb_image_sized<nr, nc> (nc defaults to nr; see input_rgb_image_sized_)."""
    return Node(input_rgb_image_sized_(nr, nc, avg_red, avg_green, avg_blue), None)


def input_grayscale_image():
    """dlib's input<matrix<unsigned char>> (see input_grayscale_image_)."""
    return Node(input_grayscale_image_(), None)


def input_rgb_image_pyramid(pyramid_down=6, *, avg_red=DLIB_MEANS[0], avg_green=DLIB_MEANS[1],
                            avg_blue=DLIB_MEANS[2], pyramid_padding=10, pyramid_outer_padding=11):
    """dlib's input_rgb_image_pyramid<pyramid_down<N>> (see input_rgb_image_pyramid_)."""
    return Node(input_rgb_image_pyramid_(pyramid_down, avg_red, avg_green, avg_blue,
                                         pyramid_padding, pyramid_outer_padding), None)


def input_grayscale_image_pyramid(pyramid_down=6, *, pyramid_padding=10, pyramid_outer_padding=11):
    """dlib's input_grayscale_image_pyramid<pyramid_down<N>> (see input_grayscale_image_pyramid_)."""
    return Node(input_grayscale_image_pyramid_(pyramid_down, pyramid_padding,
                                               pyramid_outer_padding), None)


__all__ = ["DLIB_MEANS", "input_rgb_image_", "input_rgb_image_sized_", "input_grayscale_image_",
           "input_rgb_image_pyramid_", "input_grayscale_image_pyramid_", "input_rgb_image",
           "input_rgb_image_sized", "input_grayscale_image", "input_rgb_image_pyramid",
           "input_grayscale_image_pyramid"]

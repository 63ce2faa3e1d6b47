"""dlib's input layers and loss_mmod, without dlib's files: the tiled pyramid and the image
resize against tests/reference.py's reproduction of dlib's code (bit for bit) and against
dlib's own resize_image when its Python module is installed; the pyramid's geometry; the
images the layers take and refuse; loss_mmod's detections against the reference."""
import math

import numpy as np
import pytest

import minidnn as dnn
from minidnn import ops
from minidnn.backends import cpu
from minidnn.layers import input as inp
from minidnn.mmod import mmod_options, test_box_overlap

import reference as R

try:
    import dlib
except ImportError:
    dlib = None


SIZES = [(1, 1, 1, 1), (1, 5, 2, 7), (7, 5, 15, 12), (33, 17, 27, 14), (12, 40, 10, 33),
         (5, 100, 4, 83), (64, 64, 53, 53), (9, 9, 30, 31), (40, 3, 33, 2)]


@pytest.mark.parametrize("snr,snc,dnr,dnc", SIZES)
def test_resize_kernels_are_dlibs_code(snr, snc, dnr, dnc):
    rng = np.random.default_rng(snr * 100 + snc)
    a = rng.integers(0, 256, (snr, snc, 3), dtype=np.uint8)
    np.testing.assert_array_equal(inp.resize_image_u8(a, dnr, dnc), R.dlib_resize(a, dnr, dnc))
    g = np.ascontiguousarray(a[:, :, 1])
    np.testing.assert_array_equal(inp.resize_image_u8(g, dnr, dnc), R.dlib_resize(g, dnr, dnc))
    f = rng.standard_normal((snr, snc)).astype(np.float32)
    t = np.zeros((1, 1, max(snr, dnr), snc + dnc + 1), np.float32)
    t[0, 0, :snr, :snc] = f
    ops.tiled_pyramid(t, [(0, 0, snc - 1, snr - 1), (snc + 1, 0, snc + dnc, dnr - 1)])
    np.testing.assert_array_equal(t[0, 0, :dnr, snc + 1:], R.dlib_resize(f, dnr, dnc))


@pytest.mark.skipif(dlib is None, reason="dlib's Python module is not installed")
def test_resize_kernels_against_dlib_itself():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w, H, W = (int(v) for v in rng.integers(1, 80, 4))
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(inp.resize_image_u8(a, H, W), dlib.resize_image(a, H, W))
        g = np.ascontiguousarray(a[:, :, 0])
        np.testing.assert_array_equal(inp.resize_image_u8(g, H, W), dlib.resize_image(g, H, W))
        f = rng.standard_normal((h, w)).astype(np.float32)
        t = np.zeros((1, 1, max(h, H), w + W + 1), np.float32)
        t[0, 0, :h, :w] = f
        ops.tiled_pyramid(t, [(0, 0, w - 1, h - 1), (w + 1, 0, w + W, H - 1)])
        np.testing.assert_array_equal(t[0, 0, :H, w + 1:], dlib.resize_image(f, H, W))


@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("threads", [1, 2])
def test_tiled_pyramid_layer_is_dlibs(n, threads):
    rng = np.random.default_rng(n)
    imgs = rng.integers(0, 256, (2, 37, 29, 3), dtype=np.uint8)
    layer = dnn.input_rgb_image_pyramid(n).layer_details()
    before = cpu.get_num_threads()
    cpu.set_num_threads(threads)
    try:
        b = layer.to_tensor(imgs, "cpu", 0)
    finally:
        cpu.set_num_threads(before)
    rects = b.annotation["rects"]
    t = np.zeros_like(b.tensor)
    l, tp, r, bt = rects[0]
    for k, m in enumerate(layer.means):
        t[:, k, tp:bt + 1, l:r + 1] = (imgs[..., k].astype(np.float32) - np.float32(m)) / np.float32(256)
    np.testing.assert_array_equal(b.tensor, R.dlib_tiled_pyramid(t, rects))
    # between and around the levels: zeros
    mask = np.ones(t.shape[2:], bool)
    for l, tp, r, bt in rects:
        mask[tp:bt + 1, l:r + 1] = False
    assert not b.tensor[:, :, mask].any()


def test_pyramid_geometry():
    # level sizes: pyramid_down<6> keeps floor(5/6 size); levels stop below 5 rows
    rects, nr, nc = inp.tiled_pyramid_rects(6, 160, 160)
    assert (nr, nc) == (631, 182) and len(rects) == 18
    assert rects[0] == (11, 11, 170, 170) and rects[1] == (11, 181, 143, 313)
    assert all(r[3] - r[1] + 1 >= 5 for r in rects)
    assert inp.tiled_pyramid_rects(2, 10, 10)[0] == [(11, 11, 20, 20)]   # (10-3)/2 = 3 rows < 5
    assert inp.pyramid_down_size(3, 20, 20) == (12, 12)
    # a point up and back down
    for n in (2, 3, 6):
        p = inp.point_down(n, inp.point_up(n, (17.0, 5.5), 3), 3)
        assert abs(p[0] - 17.0) < 1e-9 and abs(p[1] - 5.5) < 1e-9
    # a box in level 1 maps to the image through point_up
    box = (rects[1][0] + 10.0, rects[1][1] + 20.0, rects[1][0] + 30.0, rects[1][1] + 40.0)
    got = inp.tiled_pyramid_to_image(6, rects, box)
    assert np.allclose(got, inp.rect_up(6, (10.0, 20.0, 30.0, 40.0), 1))
    # pyramid_up's size: rect_up of the image rect under pyramid_down<2>, rounded
    assert inp.pyramid_up(np.zeros((512, 512, 3), np.uint8)).shape == (1025, 1026, 3)


def test_images_the_layers_take_and_refuse():
    rgb = dnn.input_rgb_image()
    img = np.zeros((6, 5, 3), np.uint8)
    assert rgb.forward(img).shape == (1, 3, 6, 5)
    assert rgb.forward([img, img]).shape == (2, 3, 6, 5)
    assert rgb.forward(np.zeros((3, 6, 5, 3), np.uint8)).shape == (3, 3, 6, 5)
    gray = np.full((6, 5), 200, np.uint8)
    np.testing.assert_array_equal(rgb.forward(gray)[0, 0], rgb.forward(np.repeat(gray[:, :, None], 3, 2))[0, 0])
    for bad, msg in ((img.astype(np.float32), "uint8"), (np.zeros((6, 5, 4), np.uint8), r"RGB image"),
                     ([], "empty list"), ([img, img[:5]], "same size"), ("x", "got str"),
                     (np.zeros((0, 5, 3), np.uint8), "non-empty")):
        with pytest.raises(dnn.LayerError, match=msg):
            rgb.forward(bad)
    sized = dnn.input_rgb_image_sized(6, 5)
    with pytest.raises(dnn.LayerError, match=r"expected 6 x 5 images \(rows x columns\), got 5 x 6"):
        sized.forward(np.zeros((5, 6, 3), np.uint8))
    g = dnn.input_grayscale_image()
    np.testing.assert_array_equal(g.forward(gray), gray[None, None] / np.float32(256))
    assert g.forward(np.zeros((4, 6, 5), np.uint8)).shape == (4, 1, 6, 5)
    with pytest.raises(dnn.LayerError, match="grayscale"):
        g.forward(img)
    pyr = dnn.input_rgb_image_pyramid()
    with pytest.raises(dnn.LayerError, match="upsample must be an integer"):
        pyr.forward(img, upsample=-1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'upsample'"):
        rgb.forward(img, upsample=1)


def test_means_are_dlibs_float32():
    layer = dnn.input_rgb_image().layer_details()
    assert layer.avg_red == float(np.float32(122.782))
    x = dnn.input_rgb_image().forward(np.full((1, 1, 3), 255, np.uint8))
    assert x[0, 0, 0, 0] == (np.float32(255) - np.float32(122.782)) / np.float32(256)


# ---------------------------------------------------------------------------- loss_mmod
def _detector(opts, k):
    dnn.set_seed(1)
    net = dnn.loss_mmod(dnn.con(k, 3, 3, 1, 1, dnn.relu(dnn.con(4, 5, 5, 2, 2,
                                                                dnn.input_rgb_image_pyramid(6)))), opts)
    return net


@pytest.mark.parametrize("bbr", [False, True])
def test_mmod_detections_follow_dlibs_to_label(bbr):
    wins = [(20, 20, "a"), (30, 14, "b"), (12, 24, "a")]
    opts = mmod_options(wins, overlaps_nms=test_box_overlap(0.3, 0.8), use_bounding_box_regression=bbr)
    net = _detector(opts, 15 if bbr else 3)
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (41, 53, 3), dtype=np.uint8)
    out = net.forward(img)
    assert out.shape[1] == (15 if bbr else 3)
    batch = net.chain()[-1].layer_details().to_tensor(img, "cpu", 0)
    rects = batch.annotation["rects"]
    for adjust in (0.0, -0.3, 0.2):
        got = [(d.rect, d.confidence, d.label) for d in net(img, adjust_threshold=adjust)]
        want = R.mmod_detections(out[0], wins, 0.3, 0.8, adjust, lambda c, r: (2 * c - 0 + 2, 2 * r + 2),
                                 lambda d: inp.tiled_pyramid_to_image(6, rects, d), bbr)
        assert [(w[0], w[2]) for w in want] == [(g[0], g[2]) for g in got]
        assert np.allclose([w[1] for w in want], [g[1] for g in got])
        assert len(got) > 0
    # a list of images: a list per image; upsample maps boxes back to the image given
    per = net([img, img], adjust_threshold=-0.3)
    assert len(per) == 2 and [d.to_dict() for d in per[0]] == [d.to_dict() for d in per[1]]
    up = net(img, upsample=1, adjust_threshold=-0.3)
    assert up and all(-60 < d.rect[0] < 120 for d in up)


def test_mmod_checks_its_windows_and_is_not_trained():
    net = _detector(mmod_options([(20, 20, "")]), 2)
    with pytest.raises(dnn.LayerError, match=r"expected the subnet's output to have 1 channels"):
        net.forward(np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="training a detector is not supported"):
        net.layer_details().check_labels([], 1, (1, 1, 1, 1))
    net = _detector(mmod_options([(20, 20, "")]), 1)
    with pytest.raises(ValueError, match="adjust_threshold must be a finite number"):
        net(np.zeros((40, 40, 3), np.uint8), adjust_threshold=math.nan)
    loaded = dnn.deserialize(dnn.serialize(net))
    assert loaded.layer_details().options == net.layer_details().options

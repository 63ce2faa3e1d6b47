"""The catalogue's losses (issue 12), each against dlib's definition:

- the value and gradient of each loss against the float64 reference (tests/reference.py,
  section "losses (catalogue)") by finite differences through a small net
  (harness.check_gradients), and directly with respect to the subnet's output for the
  edge cases (ignored pixels, zero weights, safe_log's cap, hard negatives);
- what ``net(x)`` returns (dlib's to_label), check_labels' errors (naming the loss and the
  sample), the file record round trip, print(net);
- a short dnn_trainer run per loss on synthetic data that lowers the loss, resumed from a
  synchronization file to exactly the net of an uninterrupted run;
- PyTorch (float64, autograd) where it has the same loss; skipped without torch.
"""
import zlib

import numpy as np
import pytest

import minidnn as dnn
from minidnn.core import layer_classes

import reference as R
from harness import check_gradients, numerical, randomize

inp = dnn.input_tensor
IGN = dnn.loss_multiclass_log_per_pixel_.label_to_ignore


def _x(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _pm1(shape, seed=2):
    return np.where(np.random.default_rng(seed).random(shape) < 0.5, -1.0, 1.0)


# ------------------------------------------------------------------ cases: net, x, target
def _metric_case():
    x = _x((8, 2, 2, 3))
    sub = dnn.fc(3, inp())
    emb = sub.forward(x).reshape(8, -1).astype(np.float64)
    d = np.sqrt(((emb[:, None] - emb[None]) ** 2).sum(-1))
    thresh = float(np.median(d[np.triu_indices(8, 1)]))     # some pairs on each side
    return dnn.loss_metric(sub, margin=0.1, distance_threshold=thresh), x, \
        np.array([0, 1, 2, 0, 1, 2, 0, 3])


def _cases():
    rng = np.random.default_rng(5)
    pix = rng.integers(0, 3, (3, 5, 4))
    pix[0, 1, 2] = pix[2, 4, 0] = pix[1, 0, 0] = IGN
    bpix = _pm1((3, 5, 4)) * rng.uniform(0.5, 2, (3, 5, 4))
    bpix[0, 0, :2] = 0
    return {
        "binary_log": lambda: (dnn.loss_binary_log(dnn.fc(1, inp())), _x((6, 2, 2, 3)),
                               _pm1(6) * np.array([1, 1, 2, 0.5, 1, 3])),
        "binary_log_batch1": lambda: (dnn.loss_binary_log(dnn.fc(1, inp())), _x((1, 3, 2, 2)),
                                      np.array([-1.0])),
        "binary_hinge": lambda: (dnn.loss_binary_hinge(dnn.fc(1, inp())), _x((7, 2, 2, 3)),
                                 _pm1(7)),
        "multibinary_log": lambda: (dnn.loss_multibinary_log(dnn.fc(3, inp())), _x((5, 2, 3, 1)),
                                    _pm1((5, 3)) * rng.uniform(0.5, 2, (5, 3))),
        "multibinary_log_focal": lambda: (dnn.loss_multibinary_log(dnn.fc(4, inp()), gamma=2.0),
                                          _x((5, 2, 3, 1)), _pm1((5, 4))),
        "multiclass_log_weighted": lambda: (
            dnn.loss_multiclass_log_weighted(dnn.fc(4, inp())), _x((6, 2, 2, 2)),
            dnn.weighted_labels([0, 3, 1, 2, 3, 0], [1.0, 0.5, 2.0, 0.0, 1.0, 3.0])),
        "mean_squared_multioutput": lambda: (
            dnn.loss_mean_squared_multioutput(dnn.fc(3, inp())), _x((5, 2, 2, 2)),
            rng.standard_normal((5, 3))),
        "mean_squared_multioutput_k1": lambda: (
            dnn.loss_mean_squared_multioutput(dnn.fc(1, inp())), _x((4, 1, 2, 3)),
            rng.standard_normal((4, 1))),
        "multiclass_log_per_pixel": lambda: (
            dnn.loss_multiclass_log_per_pixel(dnn.con(3, 3, 3, 1, 1, inp())), _x((3, 2, 5, 4)), pix),
        "binary_log_per_pixel": lambda: (
            dnn.loss_binary_log_per_pixel(dnn.con(1, 3, 3, 1, 1, inp())), _x((3, 2, 5, 4)), bpix),
        "mean_squared_per_pixel": lambda: (
            dnn.loss_mean_squared_per_pixel(dnn.con(1, 3, 3, 1, 1, inp())), _x((2, 2, 5, 3)),
            rng.standard_normal((2, 5, 3))),
        "mean_squared_per_pixel_k2": lambda: (
            dnn.loss_mean_squared_per_pixel(dnn.con(2, 3, 3, 1, 1, inp())), _x((2, 1, 4, 5)),
            rng.standard_normal((2, 2, 4, 5))),
        "metric": _metric_case,
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradient(case):
    net, x, target = CASES[case]()
    net.subnet().forward(x)
    randomize(net)
    assert check_gradients(net, x, target=target) >= 2


def test_reference_covers_every_loss():
    classes = [c for c in layer_classes() if c.is_loss]
    assert len(classes) >= 11
    for c in classes:
        assert c in R.LOSSES, c.__name__


# ------------------------------------------------------------------ direct checks on the output
def _grad(layer, out, target):
    out = np.asarray(out, np.float32)
    dout = np.full(out.shape, np.nan, np.float32)
    t = layer.check_labels(target, out.shape[0], out.shape)
    loss = layer.loss_and_grad(out, t, dout)
    assert np.isfinite(dout).all()
    return loss, dout


def _check_direct(layer, out, target, rtol=1e-5):
    """The loss against the reference, and every coordinate of the gradient against central
    differences of the reference with respect to the output."""
    out = np.asarray(out, np.float32)
    loss, dout = _grad(layer, out, target)
    ref = R.loss(layer, out, target)
    assert abs(loss - ref) <= 1e-6 * max(1.0, abs(ref))
    o64 = out.astype(np.float64)
    idx, num = numerical(lambda: R.loss(layer, o64, target), o64, np.random.default_rng(0))
    err = np.abs(dout.reshape(-1)[idx] - num).max()
    assert err <= rtol * max(1.0, np.abs(num).max()), err
    return loss, dout


def test_binary_log_weights_and_large_scores():
    l = dnn.loss_binary_log_()
    out = np.array([3.0, -40.0, 40.0, 0.2, -0.7], np.float32).reshape(5, 1, 1, 1)
    y = np.array([2.0, 1.0, -1.0, -0.5, 1.0])
    loss, dout = _check_direct(l, out, y)
    # |label| is the weight: twice the label, twice the term
    one, _ = _grad(l, out[:1], [1.0])
    two, _ = _grad(l, out[:1], [2.0])
    assert two == pytest.approx(2 * one, rel=1e-12)


def test_binary_hinge_gradient_is_dlibs():
    l = dnn.loss_binary_hinge_()
    out = np.array([2.0, 0.5, -0.3, -3.0], np.float32).reshape(4, 1, 1, 1)
    loss, dout = _grad(l, out, [1, 1, 1, -1])
    assert loss == pytest.approx((0 + 0.5 + 1.3 + 0) / 4)
    np.testing.assert_array_equal(dout.reshape(-1), np.float32([0, -0.25, -0.25, 0]))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_multibinary_log_focal_gradient_is_exact(gamma):
    """dlib's gradient for gamma > 0 is not its loss's derivative; ours is."""
    l = dnn.loss_multibinary_log_(gamma=gamma)
    out = _x((4, 3, 1, 1), 7) * 2
    y = _pm1((4, 3), 8) * np.random.default_rng(9).uniform(0.5, 2, (4, 3))
    _check_direct(l, out, y)
    if gamma:
        # dlib's formula, for the record: it differs
        x, w, pos = out.reshape(4, 3).astype(np.float64), np.abs(y), y > 0
        s = 1 / (1 + np.exp(-x))
        t = np.where(pos, np.log1p(np.exp(-x)), np.log1p(np.exp(x)))
        f = np.where(pos, (1 - s) ** gamma, s ** gamma)
        dlib = np.where(pos, w * f * (s * (gamma * t + 1) - 1), w * f * s * (gamma * t + 1)) / 4
        _, dout = _grad(l, out, y)
        assert np.abs(dout.reshape(4, 3) - dlib).max() > 1e-3


def test_multiclass_log_weighted_cases():
    l = dnn.loss_multiclass_log_weighted_()
    out = _x((5, 4, 1, 1), 3) * 3
    y = dnn.weighted_labels([0, 1, 2, 3, 1], [1, 0, 2.5, 1, 0.25])
    loss, dout = _check_direct(l, out, y)
    assert not dout[1].any()                               # weight 0: no gradient
    # all weights 1 is loss_multiclass_log
    lab = np.array([0, 1, 2, 3, 1])
    d1, d2 = np.empty_like(out), np.empty_like(out)
    a = l.loss_and_grad(out, l.check_labels(dnn.weighted_labels(lab), 5, out.shape), d1)
    b = dnn.loss_multiclass_log_().loss_and_grad(out, lab, d2)
    assert a == pytest.approx(b, rel=1e-6)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-8)
    # dlib's safe_log: a hopeless sample adds -log(1e-10), and still its gradient
    far = np.array([[0.0, 60.0]], np.float32).reshape(1, 2, 1, 1)
    loss, dout = _grad(l, far, dnn.weighted_labels([0], [2.0]))
    assert loss == pytest.approx(2 * -np.log(1e-10))
    assert loss == pytest.approx(R.loss(l, far, dnn.weighted_labels([0], [2.0])))
    np.testing.assert_allclose(dout.reshape(-1), [-2.0, 2.0], rtol=1e-6)


def test_mean_squared_normalisations():
    """multioutput: / N; per pixel: / (N K R C); loss_mean_squared keeps / N."""
    rng = np.random.default_rng(0)
    out = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    t = rng.standard_normal((3, 4))
    se = ((out.reshape(3, 4) - t) ** 2).sum()
    loss, dout = _check_direct(dnn.loss_mean_squared_multioutput_(), out, t)
    assert loss == pytest.approx(se / 3, rel=1e-6)
    d = np.empty_like(out)
    assert dnn.loss_mean_squared_().loss_and_grad(out, t.astype(np.float32), d) == \
        pytest.approx(se / 3, rel=1e-6)
    np.testing.assert_allclose(d, dout, rtol=1e-6)
    img = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    ti = rng.standard_normal((2, 3, 4, 5))
    loss, _ = _check_direct(dnn.loss_mean_squared_per_pixel_(), img, ti)
    assert loss == pytest.approx(((img - ti) ** 2).mean(), rel=1e-6)


def test_mean_squared_per_pixel_refuses_nan_targets():
    l = dnn.loss_mean_squared_per_pixel_()
    t = np.zeros((2, 3, 3))
    t[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"loss_mean_squared_per_pixel: .*sample 1, pixel \(row 2, column 0\)"):
        l.check_labels(t, 2, (2, 1, 3, 3))


def test_multiclass_log_per_pixel_ignores_and_divides_by_every_pixel():
    l = dnn.loss_multiclass_log_per_pixel_()
    out = _x((2, 3, 2, 3), 4) * 2
    y = np.random.default_rng(1).integers(0, 3, (2, 2, 3))
    y[0, 0, 0] = y[1, 1, 2] = IGN
    loss, dout = _check_direct(l, out, y)
    assert not dout[0, :, 0, 0].any() and not dout[1, :, 1, 2].any()
    # the same sum of terms, divided by N*R*C = 12 (not by the 10 labelled pixels)
    logp = out.astype(np.float64) - np.log(np.exp(out.astype(np.float64)).sum(1, keepdims=True))
    keep = y != IGN
    terms = -np.take_along_axis(logp, np.where(keep, y, 0)[:, None], 1)[:, 0][keep]
    assert loss == pytest.approx(terms.sum() / 12, rel=1e-6)
    everything_ignored, dz = _grad(l, out, np.full((2, 2, 3), IGN))
    assert everything_ignored == 0 and not dz.any()


def test_binary_log_per_pixel_zero_ignores():
    l = dnn.loss_binary_log_per_pixel_()
    out = _x((2, 1, 3, 4), 5) * 3
    y = _pm1((2, 3, 4), 6) * 1.5
    y[1, 2, :] = 0
    loss, dout = _check_direct(l, out, y)
    assert not dout[1, 0, 2].any()


def test_metric_hard_negatives_and_normalisation():
    """Only the min(P, Q) hardest negative pairs count; scale 0.5 / (P + 0.0001)."""
    e = np.array([[0, 0], [0.3, 0], [2, 0], [2, 0.2], [0.1, 0.5], [5, 5]], np.float32)
    y = [0, 0, 1, 1, 2, 3]                    # P = 2 positive pairs, Q = 13 negatives
    l = dnn.loss_metric_(margin=0.1, distance_threshold=0.6)
    out = e.reshape(6, 2, 1, 1)
    loss, dout = _check_direct(l, out, y)
    # the two hardest negatives: (0, 4) at 0.51 and (1, 4) at 0.58; positives at 0.3, 0.2 < 0.5
    d04, d14 = np.hypot(0.1, 0.5), np.hypot(0.2, 0.5)
    want = 2 * ((0.7 - d04) + (0.7 - d14)) * 0.5 / (2 + 0.0001)
    assert loss == pytest.approx(want, rel=1e-6)
    assert not dout[2].any() and not dout[3].any() and not dout[5].any()
    # default settings (dlib's 0.04 and 0.6), against the reference on random embeddings
    d = dnn.loss_metric_()
    assert (d.margin, d.distance_threshold) == (0.04, 0.6)
    out = (_x((10, 4, 1, 1), 3) * 0.3)
    _check_direct(d, out, [0, 1, 2, 0, 1, 2, 0, 1, 3, 3])


def test_metric_needs_positive_and_negative_pairs():
    l = dnn.loss_metric_()
    out = _x((4, 3, 1, 1))
    d = np.empty_like(out)
    with pytest.raises(ValueError, match="loss_metric: a mini-batch of 4 samples has no two samples of one identity"):
        l.loss_and_grad(out, np.array([0, 1, 2, 3]), d)
    with pytest.raises(ValueError, match="one identity only"):
        l.loss_and_grad(out, np.array([1, 1, 1, 1]), d)
    with pytest.raises(ValueError, match="loss_metric: the labels need two samples of one identity"):
        l.check_labels([0, 1, 2, 3], 4, out.shape)


# ------------------------------------------------------------------ net(x): dlib's to_label
def test_to_label():
    x = _x((5, 2, 3, 3))
    for make, shape, dtype in [
        (lambda s: dnn.loss_binary_log(dnn.fc(1, s)), (5,), np.float32),
        (lambda s: dnn.loss_binary_hinge(dnn.fc(1, s)), (5,), np.float32),
        (lambda s: dnn.loss_multibinary_log(dnn.fc(3, s)), (5, 3), np.float32),
        (lambda s: dnn.loss_mean_squared_multioutput(dnn.fc(1, s)), (5, 1), np.float32),
        (lambda s: dnn.loss_mean_squared_multioutput(dnn.fc(4, s)), (5, 4), np.float32),
        (lambda s: dnn.loss_metric(dnn.fc(6, s)), (5, 6), np.float32),
        (lambda s: dnn.loss_binary_log_per_pixel(dnn.con(1, 3, 3, 1, 1, s)), (5, 3, 3), np.float32),
        (lambda s: dnn.loss_mean_squared_per_pixel(dnn.con(1, 3, 3, 1, 1, s)), (5, 3, 3), np.float32),
        (lambda s: dnn.loss_mean_squared_per_pixel(dnn.con(2, 3, 3, 1, 1, s)), (5, 2, 3, 3), np.float32),
    ]:
        net = make(inp())
        got = net(x)
        assert got.shape == shape and got.dtype == dtype, net.layer_details().kind
        np.testing.assert_array_equal(got.reshape(-1), net.forward(x).reshape(-1))
    w = dnn.loss_multiclass_log_weighted(dnn.fc(4, inp()))
    got = w(x)
    assert got.dtype == np.int64 and got.shape == (5,)
    np.testing.assert_array_equal(got, w.forward(x).reshape(5, 4).argmax(1))
    px = dnn.loss_multiclass_log_per_pixel(dnn.con(3, 3, 3, 1, 1, inp()))
    got = px(x)
    assert got.dtype == np.uint16 and got.shape == (5, 3, 3)
    np.testing.assert_array_equal(got, px.forward(x).argmax(1))


def test_per_pixel_argmax_takes_the_first_largest():
    l = dnn.loss_multiclass_log_per_pixel_()
    out = np.zeros((1, 3, 1, 2), np.float32)
    out[0, 1:, 0, 1] = 5
    np.testing.assert_array_equal(l.labels(out), [[[0, 1]]])


def test_to_label_refuses_nan_scores():
    net = dnn.loss_binary_log(dnn.fc(1, inp()))
    x = _x((3, 1, 2, 2))
    x[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="loss_binary_log: the network's output for sample 2"):
        net(x)


def test_wrong_output_shapes_are_refused():
    x = _x((2, 1, 4, 4))
    for net, what in [
        (dnn.loss_binary_log(dnn.fc(2, inp())), "loss_binary_log: expected the subnet's output to be (N, 1, 1, 1)"),
        (dnn.loss_binary_hinge(dnn.con(1, 3, 3, 1, 1, inp())), "loss_binary_hinge: expected"),
        (dnn.loss_metric(dnn.con(2, 3, 3, 1, 1, inp())), "loss_metric: expected the subnet's output to be (N, K, 1, 1)"),
        (dnn.loss_binary_log_per_pixel(dnn.con(2, 3, 3, 1, 1, inp())), "loss_binary_log_per_pixel: expected"),
    ]:
        with pytest.raises(dnn.LayerError, match=r"layer<0> " + what.replace("(", r"\(").replace(")", r"\)")):
            net(x)
        t = dnn.dnn_trainer(net, verbose=False)
        with pytest.raises(ValueError):
            t.train(x, np.ones(2))


# ------------------------------------------------------------------ check_labels
BAD = [
    (dnn.loss_binary_log_, (3, 1, 1, 1), [1, 0, -1], r"loss_binary_log: labels must be nonzero .* at sample 1"),
    (dnn.loss_binary_log_, (3, 1, 1, 1), [1, np.nan, -1], r"loss_binary_log: labels must be finite.* at sample 1"),
    (dnn.loss_binary_log_, (3, 1, 1, 1), [1, 1], r"loss_binary_log: expected labels for 3 samples"),
    (dnn.loss_binary_log_, (3, 1, 1, 1), ["a", "b", "c"], r"loss_binary_log: labels must be numbers"),
    (dnn.loss_binary_hinge_, (3, 1, 1, 1), [1, -1, 0.5], r"loss_binary_hinge: labels must be \+1 or -1 at sample 2"),
    (dnn.loss_multibinary_log_, (2, 3, 1, 1), [[1, 1, 1], [1, 0, 1]],
     r"loss_multibinary_log: labels must be nonzero .* at sample 1, output 1"),
    (dnn.loss_multibinary_log_, (2, 3, 1, 1), [[1, 1], [1, 1]],
     r"loss_multibinary_log: expected labels of shape \(2, 3\)"),
    (dnn.loss_multiclass_log_weighted_, (3, 4, 1, 1), [0, 1, 2],
     r"loss_multiclass_log_weighted: labels must be a structured array .*weighted_labels"),
    (dnn.loss_multiclass_log_weighted_, (3, 4, 1, 1), dnn.weighted_labels([0, 4, 1]),
     r"loss_multiclass_log_weighted: labels must be in \[0, 4\) .* at sample 1"),
    (dnn.loss_multiclass_log_weighted_, (3, 4, 1, 1), dnn.weighted_labels([0, 1, 1], [1, 1, -2]),
     r"loss_multiclass_log_weighted: weights must be finite and >= 0 at sample 2"),
    (dnn.loss_mean_squared_multioutput_, (2, 3, 1, 1), np.zeros((2, 4)),
     r"loss_mean_squared_multioutput: expected targets of shape \(2, 3\)"),
    (dnn.loss_mean_squared_multioutput_, (2, 3, 1, 1), [[0, 0, 0], [0, np.inf, 0]],
     r"loss_mean_squared_multioutput: targets must be finite.* at sample 1, output 1"),
    (dnn.loss_multiclass_log_per_pixel_, (2, 3, 2, 2), np.array([[[0, 1], [2, 0]], [[0, 3], [1, 1]]]),
     r"loss_multiclass_log_per_pixel: labels must be in \[0, 3\) .* or 65535 .* at sample 1, pixel \(row 0, column 1\)"),
    (dnn.loss_multiclass_log_per_pixel_, (2, 3, 2, 2), np.zeros((2, 2, 3), int),
     r"loss_multiclass_log_per_pixel: expected labels of shape \(2, 2, 2\)"),
    (dnn.loss_multiclass_log_per_pixel_, (2, 3, 2, 2), np.full((2, 2, 2), 0.5),
     r"loss_multiclass_log_per_pixel: labels must be integers"),
    (dnn.loss_binary_log_per_pixel_, (1, 1, 2, 2), [[[0, 1], [np.nan, 1]]],
     r"loss_binary_log_per_pixel: labels must be finite.* at sample 0, pixel \(row 1, column 0\)"),
    (dnn.loss_mean_squared_per_pixel_, (2, 2, 2, 2), np.zeros((2, 2, 2)),
     r"loss_mean_squared_per_pixel: expected targets of shape \(2, 2, 2, 2\)"),
    (dnn.loss_metric_, (4, 2, 1, 1), [0, 0, -1, 1], r"loss_metric: labels \(identities\) must be integers >= 0 at sample 2"),
    (dnn.loss_metric_, (4, 2, 1, 1), [0, 0, 1.5, 1], r"loss_metric: labels must be integers"),
]


@pytest.mark.parametrize("cls,out_shape,y,msg", BAD, ids=[f"{b[0].kind}-{i}" for i, b in enumerate(BAD)])
def test_check_labels_errors(cls, out_shape, y, msg):
    with pytest.raises(ValueError, match=msg):
        cls().check_labels(y, out_shape[0], out_shape)


def test_check_labels_forms():
    """The accepted forms and what they become."""
    y = dnn.loss_binary_log_().check_labels([1, -2, 3], 3, (3, 1, 1, 1))
    assert y.dtype == np.float32 and y.shape == (3,)
    y = dnn.loss_multiclass_log_per_pixel_().check_labels(np.full((2, 1, 2, 2), IGN), 2, (2, 4, 2, 2))
    assert y.dtype == np.uint16 and y.shape == (2, 2, 2)
    y = dnn.loss_mean_squared_per_pixel_().check_labels(np.zeros((2, 3, 3)), 2, (2, 1, 3, 3))
    assert y.shape == (2, 1, 3, 3)
    w = dnn.weighted_labels(np.array([1, 2]), 0.5)
    assert w.dtype == dnn.WEIGHTED_LABEL and list(w["weight"]) == [0.5, 0.5]
    y = dnn.loss_multiclass_log_weighted_().check_labels(w, 2, (2, 3, 1, 1))
    assert y.dtype == dnn.WEIGHTED_LABEL
    y = dnn.loss_metric_().check_labels(np.array([3.0, 3.0, 1.0]), 3, (3, 2, 1, 1))
    assert y.dtype == np.int64


def test_settings_are_checked():
    with pytest.raises(ValueError, match="loss_multibinary_log: gamma must be"):
        dnn.loss_multibinary_log(inp(), gamma=-1)
    with pytest.raises(ValueError, match="loss_metric: margin must be"):
        dnn.loss_metric(inp(), margin=0)
    with pytest.raises(ValueError, match="loss_metric: distance_threshold must be"):
        dnn.loss_metric(inp(), distance_threshold=float("nan"))


def test_bad_settings_are_not_saved_or_loaded():
    net = dnn.loss_metric(dnn.fc(2, inp()), margin=0.5)
    data = dnn.serialize(net)
    net.layer_details().margin = -1.0
    with pytest.raises(dnn.SerializationError, match="loss_metric_1.*margin must be"):
        dnn.serialize(net)
    bad = bytearray(data)
    at = data.index(b"loss_metric_1") + len("loss_metric_1") + 8 + 1     # u64 length, disabled
    bad[at:at + 8] = np.float64(-1.0).tobytes()
    body = bytes(bad[:-4])
    bad[-4:] = np.uint32(zlib.crc32(body)).tobytes()
    with pytest.raises(dnn.SerializationError, match="loss_metric: margin must be"):
        dnn.deserialize(bytes(bad))


# ------------------------------------------------------------------ records and printing
PRINTS = {
    dnn.loss_binary_log: "loss_binary_log",
    dnn.loss_binary_hinge: "loss_binary_hinge",
    dnn.loss_multibinary_log: "loss_multibinary_log(gamma=0)",
    dnn.loss_multiclass_log_weighted: "loss_multiclass_log_weighted",
    dnn.loss_mean_squared_multioutput: "loss_mean_squared_multioutput",
    dnn.loss_multiclass_log_per_pixel: "loss_multiclass_log_per_pixel",
    dnn.loss_binary_log_per_pixel: "loss_binary_log_per_pixel",
    dnn.loss_mean_squared_per_pixel: "loss_mean_squared_per_pixel",
    dnn.loss_metric: "loss_metric(margin=0.04, distance_threshold=0.6)",
}


@pytest.mark.parametrize("factory", list(PRINTS), ids=lambda f: f.__name__)
def test_print_and_record_round_trip(factory):
    net = factory(dnn.con(1, 3, 3, 1, 1, inp()))
    assert str(net).splitlines()[0] == "layer<0>    " + PRINTS[factory]
    data = dnn.serialize(net)
    tag = type(net.layer_details()).record
    assert tag.endswith("_1") and tag.encode() in data
    back = dnn.deserialize(data)
    assert type(back.layer_details()) is type(net.layer_details())
    assert str(back) == str(net)


def test_record_keeps_settings():
    for net in (dnn.loss_multibinary_log(dnn.fc(2, inp()), gamma=1.5),
                dnn.loss_metric(dnn.fc(2, inp()), margin=0.125, distance_threshold=0.75)):
        net.forward(_x((2, 1, 2, 2)))
        back = dnn.deserialize(dnn.serialize(net))
        for f in net.layer_details().settings:
            assert getattr(back.layer_details(), f.name) == getattr(net.layer_details(), f.name)
        assert back.layer_details().describe() == net.layer_details().describe()
        np.testing.assert_array_equal(back.forward(_x((2, 1, 2, 2))), net.forward(_x((2, 1, 2, 2))))
    assert str(dnn.loss_multibinary_log(inp(), gamma=1.5)).startswith("layer<0>    loss_multibinary_log(gamma=1.5)")


# ------------------------------------------------------------------ dnn_trainer
def _problem(name, rng):
    """(net, x, labels, solver settings) of a small synthetic problem for each loss."""
    n = 64
    if name in ("binary_log", "binary_hinge", "multibinary_log", "multiclass_log_weighted",
                "mean_squared_multioutput", "metric"):
        x = rng.standard_normal((n, 1, 4, 4)).astype(np.float32)
        f = x.reshape(n, 4, 4)
        feats = np.stack([f[:, :2, :2].mean((1, 2)), f[:, 2:, 2:].mean((1, 2)),
                          f[:, :2, 2:].mean((1, 2))], 1)
        hidden = lambda k: dnn.fc(k, dnn.relu(dnn.fc(16, inp())))           # noqa: E731
        if name == "binary_log":
            return dnn.loss_binary_log(hidden(1)), x, np.where(feats[:, 0] > 0, 1.0, -1.0)
        if name == "binary_hinge":
            return dnn.loss_binary_hinge(hidden(1)), x, np.where(feats[:, 0] > 0, 1.0, -1.0)
        if name == "multibinary_log":
            return dnn.loss_multibinary_log(hidden(3), gamma=1.0), x, np.where(feats > 0, 1.0, -1.0)
        if name == "multiclass_log_weighted":
            lab = feats.argmax(1)
            return dnn.loss_multiclass_log_weighted(hidden(3)), x, \
                dnn.weighted_labels(lab, rng.uniform(0.5, 2.0, n))
        if name == "mean_squared_multioutput":
            return dnn.loss_mean_squared_multioutput(hidden(3)), x, feats * 2
        ids = rng.integers(0, 4, n)                          # 4 identities, clustered inputs
        centres = rng.standard_normal((4, 1, 4, 4)).astype(np.float32)
        x = (centres[ids] + 0.6 * x).astype(np.float32)
        return dnn.loss_metric(dnn.fc(4, dnn.relu(dnn.fc(16, inp())))), x, ids
    x = rng.standard_normal((32, 1, 5, 5)).astype(np.float32)
    conv = lambda k: dnn.con(k, 3, 3, 1, 1, dnn.relu(dnn.con(4, 3, 3, 1, 1, inp())))  # noqa: E731
    if name == "multiclass_log_per_pixel":
        lab = (x[:, 0] > 0.5).astype(np.int64) + (x[:, 0] > -0.5)
        lab[:, 0, :] = IGN
        return dnn.loss_multiclass_log_per_pixel(conv(3)), x, lab
    if name == "binary_log_per_pixel":
        lab = np.where(x[:, 0] > 0, 1.0, -1.0)
        lab[:, :, 0] = 0
        return dnn.loss_binary_log_per_pixel(conv(1)), x, lab
    k = 2 if name == "mean_squared_per_pixel_k2" else 1
    t = np.concatenate([x, -x], 1)[:, :k] if k == 2 else 0.5 * x[:, 0]
    return dnn.loss_mean_squared_per_pixel(conv(k)), x, t


PROBLEMS = ["binary_log", "binary_hinge", "multibinary_log", "multiclass_log_weighted",
            "mean_squared_multioutput", "multiclass_log_per_pixel", "binary_log_per_pixel",
            "mean_squared_per_pixel", "mean_squared_per_pixel_k2", "metric"]


def _data_loss(net, x, y):
    top = net.layer_details()
    out = net.subnet().forward(x)
    t = top.check_labels(y, x.shape[0], out.shape)
    return top.loss_and_grad(out, t, np.empty(out.shape, np.float32))


def _trainer(net, epochs, sync=None):
    t = dnn.dnn_trainer(net, dnn.adam(), seed=3, verbose=False)
    t.learning_rate = 0.02
    t.mini_batch_size = 16
    t.max_num_epochs = epochs
    if sync is not None:
        t.set_synchronization_file(sync, interval_seconds=0)
    return t


@pytest.mark.parametrize("name", PROBLEMS)
def test_trainer_lowers_the_loss_and_resumes_exactly(name, tmp_path):
    net, x, y = _problem(name, np.random.default_rng(0))
    _trainer(net, 1).train(x[:16], y[:16])               # parameters exist (same seed below)
    before = _data_loss(net, x, y)
    a, _, _ = _problem(name, np.random.default_rng(0))
    _trainer(a, 8).train(x, y)
    after = _data_loss(a, x, y)
    assert after < 0.7 * before, (before, after)
    # killed after 4 epochs and started again: exactly the uninterrupted net
    sync = str(tmp_path / "run.sync")
    b, _, _ = _problem(name, np.random.default_rng(0))
    _trainer(b, 4, sync).train(x, y)
    c, _, _ = _problem(name, np.random.default_rng(0))
    _trainer(c, 8, sync).train(x, y)
    for na, nc in zip(a.chain(), c.chain()):
        for p in na.layer_details().params:
            np.testing.assert_array_equal(getattr(na.layer_details(), p), getattr(nc.layer_details(), p))
    # net(x) is what the loss says after training too
    got = a(x)
    assert got.shape[0] == x.shape[0]


def test_trainer_refuses_bad_labels_naming_the_sample():
    net = dnn.loss_binary_hinge(dnn.fc(1, inp()))
    t = dnn.dnn_trainer(net, verbose=False)
    with pytest.raises(ValueError, match=r"loss_binary_hinge: labels must be \+1 or -1 at sample 3"):
        t.train(_x((5, 1, 2, 2)), np.array([1, -1, 1, 2, 1.0]))


def test_trainer_metric_batch_without_positive_pairs():
    net = dnn.loss_metric(dnn.fc(2, inp()))
    t = dnn.dnn_trainer(net, verbose=False)
    t.mini_batch_size = 2
    with pytest.raises(ValueError, match="loss_metric: a mini-batch of 2 samples"):
        t.train(_x((4, 1, 2, 2)), np.array([0, 1, 0, 1]))


# ------------------------------------------------------------------ PyTorch (float64) cross-check
def _torch():
    return pytest.importorskip("torch")


def _against_torch(layer, out, target, torch_loss):
    """Our loss and gradient against torch's loss (float64) and its autograd gradient."""
    torch = _torch()
    loss, dout = _grad(layer, out, target)
    o = torch.tensor(np.asarray(out, np.float64), requires_grad=True)
    tl = torch_loss(o)
    tl.backward()
    assert loss == pytest.approx(float(tl.detach()), rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(dout, o.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_torch_binary_log():
    F = _torch().nn.functional
    torch = _torch()
    out = _x((6, 1, 1, 1), 3) * 3
    y = _pm1(6) * np.array([1, 2, 1, 0.5, 1, 1])
    t = torch.tensor((y > 0).astype(np.float64))
    w = torch.tensor(np.abs(y))
    _against_torch(dnn.loss_binary_log_(), out, y,
                   lambda o: F.binary_cross_entropy_with_logits(o.reshape(6), t, weight=w))
    # with +-1 labels this is soft_margin_loss too
    pm = _pm1(6, 4)
    _against_torch(dnn.loss_binary_log_(), out, pm,
                   lambda o: F.soft_margin_loss(o.reshape(6), torch.tensor(pm)))


def test_torch_multibinary_log():
    torch = _torch()
    F = torch.nn.functional
    out = _x((4, 3, 1, 1), 3) * 2
    y = _pm1((4, 3), 5) * np.random.default_rng(1).uniform(0.5, 2, (4, 3))
    t, w = torch.tensor((y > 0) * 1.0), torch.tensor(np.abs(y))
    _against_torch(dnn.loss_multibinary_log_(), out, y,     # dlib divides by N, not N*K
                   lambda o: F.binary_cross_entropy_with_logits(o.reshape(4, 3), t, weight=w,
                                                                reduction="sum") / 4)

    def focal(o, g=2.0):                                     # the focal loss, autograd's gradient
        z = o.reshape(4, 3)
        p = torch.sigmoid(z)
        bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
        pt = torch.where(t > 0, p, 1 - p)
        return (w * (1 - pt) ** g * bce).sum() / 4
    _against_torch(dnn.loss_multibinary_log_(gamma=2.0), out, y, focal)


def test_torch_multiclass_log_weighted():
    torch = _torch()
    F = torch.nn.functional
    out = _x((5, 4, 1, 1), 3) * 2
    lab, w = np.array([0, 3, 1, 2, 1]), np.array([1.0, 0.5, 2.0, 0.0, 3.0])
    _against_torch(dnn.loss_multiclass_log_weighted_(), out, dnn.weighted_labels(lab, w),
                   lambda o: (F.cross_entropy(o.reshape(5, 4), torch.tensor(lab), reduction="none")
                              * torch.tensor(w)).sum() / 5)


def test_torch_multiclass_log_per_pixel():
    torch = _torch()
    F = torch.nn.functional
    out = _x((2, 3, 4, 5), 3) * 2
    y = np.random.default_rng(2).integers(0, 3, (2, 4, 5))
    y[0, :2, 1] = IGN
    # dlib divides by every pixel: torch's "sum" over labelled pixels / (N R C), not its "mean"
    _against_torch(dnn.loss_multiclass_log_per_pixel_(), out, y,
                   lambda o: F.cross_entropy(o, torch.tensor(y), ignore_index=IGN,
                                             reduction="sum") / (2 * 4 * 5))


def test_torch_binary_log_per_pixel():
    torch = _torch()
    F = torch.nn.functional
    out = _x((2, 1, 3, 4), 3) * 2
    y = _pm1((2, 3, 4), 7) * 2
    y[1, 0] = 0
    t, w = torch.tensor((y > 0) * 1.0), torch.tensor(np.abs(y))
    _against_torch(dnn.loss_binary_log_per_pixel_(), out, y,
                   lambda o: F.binary_cross_entropy_with_logits(o[:, 0], t, weight=w))


def test_torch_mean_squared():
    torch = _torch()
    F = torch.nn.functional
    out = _x((3, 4, 1, 1), 3)
    t = np.random.default_rng(3).standard_normal((3, 4))
    _against_torch(dnn.loss_mean_squared_multioutput_(), out, t,
                   lambda o: F.mse_loss(o.reshape(3, 4), torch.tensor(t), reduction="sum") / 3)
    img = _x((2, 3, 4, 2), 4)
    ti = np.random.default_rng(4).standard_normal((2, 3, 4, 2))
    _against_torch(dnn.loss_mean_squared_per_pixel_(), img, ti,
                   lambda o: F.mse_loss(o, torch.tensor(ti)))
    one = _x((2, 1, 4, 2), 5)
    t1 = np.random.default_rng(5).standard_normal((2, 4, 2))
    _against_torch(dnn.loss_mean_squared_per_pixel_(), one, t1,
                   lambda o: F.mse_loss(o[:, 0], torch.tensor(t1)))

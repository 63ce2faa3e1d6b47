"""The catalogue composes: small nets of its layers train on synthetic data made here to a
stated accuracy, then fuse and save without changing their outputs (issue 12)."""
import numpy as np
import pytest

import minidnn as dnn


def _train(net, x, y, epochs, lr=0.05, batch=16, solver=None, seed=0):
    t = dnn.dnn_trainer(net, solver or dnn.adam(), seed=seed, verbose=False)
    t.learning_rate, t.mini_batch_size, t.max_num_epochs = lr, batch, epochs
    t.train(x, y)
    return net


def _fuse_and_reload_unchanged(net, x):
    before = net.forward(x)
    dnn.fuse(net)
    fused = net.forward(x)
    scale = max(1.0, float(np.abs(before).max()))
    assert np.abs(fused - before).max() <= 1e-5 * scale
    back = dnn.deserialize(dnn.serialize(net))
    np.testing.assert_array_equal(back.forward(x), fused)
    return back


# ---------------------------------------------------------------- shapes to classify
def _shapes(n, size=12, seed=0):
    """Three classes: a horizontal bar, a vertical bar, a bright square; noise around."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 3, n)
    for i in range(n):
        a, b = rng.integers(1, size - 5, 2)
        if y[i] == 0:
            x[i, 0, a, 1:-1] += 2
        elif y[i] == 1:
            x[i, 0, 1:-1, b] += 2
        else:
            x[i, 0, a:a + 4, b:b + 4] += 2
    return x, y


def inception_se_net():
    """An Inception block (concat of 1x1, 3x3 and 5x5 branches) and a squeeze-and-
    excitation block (avg_pool_everything, fc, relu, fc, sig, scale) before the head."""
    t1 = dnn.tag1(dnn.relu(dnn.con(6, 3, 3, 1, 1, dnn.input_tensor())))
    b1 = dnn.tag2(dnn.relu(dnn.con(4, 1, 1, 1, 1, t1)))
    b2 = dnn.tag3(dnn.relu(dnn.con(4, 3, 3, 1, 1, dnn.skip1(b1))))
    b3 = dnn.tag4(dnn.relu(dnn.con(4, 5, 5, 1, 1, dnn.skip1(b2))))
    inc = dnn.tag5(dnn.concat(dnn.tag2, dnn.tag3, dnn.tag4, b3))            # 12 channels
    se = dnn.scale5(dnn.sig(dnn.fc(12, dnn.relu(dnn.fc(3, dnn.avg_pool_everything(inc))))))
    return dnn.loss_multiclass_log(dnn.fc(3, dnn.avg_pool_everything(dnn.max_pool(2, 2, 2, 2, se))))


def test_inception_and_se_blocks_train_fuse_and_save():
    x, y = _shapes(240)
    xt, yt = _shapes(120, seed=1)
    dnn.set_seed(0)
    net = _train(inception_se_net(), x, y, epochs=25, lr=0.01)
    acc = (net(xt) == yt).mean()
    assert acc >= 0.9, acc
    back = _fuse_and_reload_unchanged(net, xt)
    assert (back(xt) == net(xt)).all()
    kinds = [n.layer_details().kind for n in net.chain()]
    assert "concat" in kinds and "scale5" in kinds


# ---------------------------------------------------------------- segmentation
def _blobs(n, size=16, seed=0):
    """Per-pixel labels: 1 inside a disc, 2 inside a square, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.2, (n, 1, size, size)).astype(np.float32)
    lab = np.zeros((n, size, size), np.int64)
    rr, cc = np.mgrid[:size, :size]
    for i in range(n):
        r, c = rng.integers(4, size - 4, 2)
        disc = (rr - r) ** 2 + (cc - c) ** 2 <= 9
        lab[i][disc] = 1
        a, b = rng.integers(0, size - 4, 2)
        sq = (rr >= a) & (rr < a + 4) & (cc >= b) & (cc < b + 4) & ~disc
        lab[i][sq] = 2
        x[i, 0][disc] += 1.0
        x[i, 0][sq] -= 1.0
    return x, lab


def unet(transposed=False):
    """Encoder con/max_pool, decoder cont or upsample, skip connection by concat, per-pixel
    softmax loss."""
    enc = dnn.tag1(dnn.relu(dnn.bn_con(dnn.con(8, 3, 3, 1, 1, dnn.input_tensor()))))
    mid = dnn.relu(dnn.bn_con(dnn.con(16, 3, 3, 1, 1, dnn.max_pool(2, 2, 2, 2, enc))))
    if transposed:
        up = dnn.relu(dnn.cont(8, 2, 2, 2, 2, mid))
    else:
        up = dnn.relu(dnn.con(8, 3, 3, 1, 1, dnn.upsample(2, mid)))
    dec = dnn.concat(dnn.tag1, dnn.tag2, dnn.tag2(up))
    head = dnn.con(3, 1, 1, 1, 1, dnn.relu(dnn.con(8, 3, 3, 1, 1, dec)))
    return dnn.loss_multiclass_log_per_pixel(head)


@pytest.mark.parametrize("transposed", [False, True], ids=["upsample", "cont"])
def test_unet_segmenter_trains_fuses_and_saves(transposed):
    if transposed and not hasattr(dnn, "cont"):
        pytest.skip("cont is not in this build")
    x, lab = _blobs(160)
    xt, labt = _blobs(64, seed=1)
    dnn.set_seed(0)
    net = _train(unet(transposed), x, lab, epochs=30, lr=0.01)
    pred = net(xt)
    acc = (pred == labt).mean()
    assert pred.shape == labt.shape and acc >= 0.95, acc
    _fuse_and_reload_unchanged(net, xt)


# ---------------------------------------------------------------- MobileNet-v2 style
def test_mobilenet_v2_style_trains_fuses_and_saves():
    """Depthwise con, clipped_relu, add_prev and avg_pool_everything: minidnn.nets's
    inverted residual blocks at a small width, on the three shapes."""
    from minidnn import nets
    x, y = _shapes(240, size=16)
    xt, yt = _shapes(120, size=16, seed=1)
    dnn.set_seed(0)
    body = nets.mobilenet_v2(width=0.25, classes=3, config=((1, 8, 1, 1), (4, 16, 2, 2), (4, 16, 2, 1)),
                             last=32)
    net = _train(dnn.loss_multiclass_log(body), x, y, epochs=20, lr=0.01)
    acc = (net(xt) == yt).mean()
    assert acc >= 0.9, acc
    kinds = [n.layer_details() for n in net.chain()]
    assert any(l.kind == "con" and l.groups > 1 for l in kinds) and any(l.kind == "add_prev1" for l in kinds)
    _fuse_and_reload_unchanged(net, xt)

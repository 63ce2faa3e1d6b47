"""dlib's format without dlib: save_dlib / load_dlib round trips of networks built from every
layer dlib's format can hold, bit for bit, and dlib_type's declarations. Also the test
networks and helpers the other dlib tests share (test_dlib_cpp.py runs the same networks in
dlib's C++)."""
import os
from collections import namedtuple

import numpy as np
import pytest

import minidnn as dnn
from minidnn import dlib as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def models_dir():
    """The folder of dlib's model files: MINIDNN_DLIB_MODELS, else ../shared/dlib-models next
    to the repository, or None when neither exists."""
    d = os.environ.get("MINIDNN_DLIB_MODELS")
    if d:
        return d if os.path.isdir(d) else None
    d = os.path.join(os.path.dirname(ROOT), "shared", "dlib-models")
    return d if os.path.isdir(d) else None


def model_path(name):
    d = models_dir()
    p = None if d is None else os.path.join(d, name)
    if p is None or not os.path.exists(p):
        pytest.skip(f"dlib's model file {name} is not there (set MINIDNN_DLIB_MODELS)")
    return p


def reference(name):
    return np.load(model_path(os.path.join("reference", name)))


def has(*names):
    return all(hasattr(dnn, n) for n in names)


Case = namedtuple("Case", "name net x adjust")


def _randomize(net, seed):
    """Non-trivial parameters everywhere (biases, gamma/beta, running statistics)."""
    rng = np.random.default_rng(seed)
    for n in net.chain():
        layer = n.layer_details()
        for p in tuple(layer.params) + tuple(layer.state):
            a = getattr(layer, p)
            if a is None:
                continue
            if p in ("gamma", "running_var"):
                a[...] = rng.uniform(0.5, 1.5, a.shape)
            elif p in ("beta", "biases", "running_mean"):
                a[...] = rng.normal(0, 0.3, a.shape)
            elif p == "alpha":
                a[...] = 0.2
    return net


def _image(rng, h, w, ch=3):
    shape = (h, w, ch) if ch == 3 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def synthetic_cases(seed=0):
    """Small networks covering dlib's layers, parameters set up and randomised."""
    rng = np.random.default_rng(seed)
    dnn.set_seed(seed)
    cases = []

    # 1. the plain layers: con (dlib's and other paddings, with and without bias), bn_con,
    # affine, pools with padding, fc and fc_no_bias, activations, tags/skip/add_prev
    x = dnn.input_rgb_image()
    x = dnn.con(6, 3, 3, 1, 1, x)
    x = dnn.relu(dnn.bn_con(x))
    x = dnn.max_pool(3, 3, 2, 2, x, padding_y=1, padding_x=1)
    x = dnn.tag1(dnn.prelu(dnn.affine(dnn.con(8, 3, 3, 1, 1, x, bias=False))))
    x = dnn.sig(dnn.con(8, 3, 3, 1, 1, x))
    x = dnn.add_prev1(x)
    x = dnn.avg_pool(2, 2, 2, 2, x, padding_y=1, padding_x=1)
    x = dnn.htan(dnn.con(8, 1, 1, 1, 1, x))
    x = dnn.leaky_relu(x, alpha=0.125)
    x = dnn.elu(dnn.con(6, 5, 3, 2, 1, x), alpha=0.75)
    x = dnn.clipped_relu(x, ceiling=3.5)
    x = dnn.mish(dnn.gelu(dnn.silu(dnn.smelu(x, beta=0.5))))
    x = dnn.tag2(x)
    x = dnn.skip2(dnn.relu(dnn.con(4, 3, 3, 1, 1, x, padding_y=0, padding_x=1)))
    x = dnn.relu(dnn.fc(10, x))
    x = dnn.affine(x)                      # fc mode
    net = dnn.loss_multiclass_log(dnn.fc(5, x, bias=False))
    img = _image(rng, 33, 41)
    net.forward(img)
    cases.append(Case("layers", _randomize(net, 1), img, 0.0))

    # 2. grayscale input, bn_fc, avg_pool_everything, loss_metric
    x = dnn.relu(dnn.con(5, 3, 3, 1, 1, dnn.input_grayscale_image()))
    x = dnn.bn_fc(dnn.fc(7, dnn.avg_pool_everything(x)))
    net = dnn.loss_metric(dnn.fc(4, x, bias=False), margin=0.125, distance_threshold=0.5)
    g = _image(rng, 9, 12, ch=1)
    net.forward(g)
    cases.append(Case("grayscale", _randomize(net, 2), g, 0.0))

    # 3. input_tensor, no loss layer
    net = dnn.fc(3, dnn.relu(dnn.con(4, 3, 3, 2, 2, dnn.input_tensor())))
    t = rng.standard_normal((1, 2, 11, 9)).astype(np.float32)
    net.forward(t)
    cases.append(Case("tensor", _randomize(net, 3), t, 0.0))

    # 4. a small detector: sized windows, labels, pyramid input
    from minidnn.mmod import mmod_options, test_box_overlap
    opts = mmod_options([(20, 20, "a"), (30, 15, "b")], overlaps_nms=test_box_overlap(0.4, 0.9))
    x = dnn.relu(dnn.affine(dnn.con(8, 5, 5, 2, 2, dnn.input_rgb_image_pyramid(6))))
    net = dnn.loss_mmod(dnn.con(2, 5, 5, 1, 1, x), opts)
    img = _image(rng, 40, 50)
    net.forward(img)
    _randomize(net, 4)
    cases.append(Case("detector", net, img, -2.0))

    # 5. the same layers fused (dlib's fused forms: con_6 use_relu, disabled relu_2/affine_2)
    x = dnn.relu(dnn.affine(dnn.con(6, 3, 3, 1, 1, dnn.input_rgb_image_sized(12, 10))))
    x = dnn.relu(dnn.bn_con(dnn.con(6, 3, 3, 1, 1, x, bias=False)))
    net = dnn.loss_multiclass_log(dnn.fc(3, dnn.max_pool(2, 2, 2, 2, x)))
    img = _image(rng, 12, 10)
    net.forward(img)
    _randomize(net, 5)
    dnn.fuse(net)
    cases.append(Case("fused", net, img, 0.0))

    # 6. the catalogue's tensor and routing layers
    x = dnn.tag1(dnn.relu(dnn.con(4, 3, 3, 1, 1, dnn.input_rgb_image())))
    x = dnn.tag2(dnn.con(3, 3, 3, 1, 1, x))
    x = dnn.concat(dnn.tag1, dnn.tag2, x)                              # 7 channels
    x = dnn.multiply(x, val=0.75)
    x = dnn.tag3(dnn.cont(5, 4, 4, 2, 2, x))                           # 5 x 20 x 22
    x = dnn.scale3(dnn.sig(dnn.con(5, 1, 1, 1, 1, dnn.avg_pool_everything(x))))
    x = dnn.mult_prev3(dnn.htan(dnn.con(6, 3, 3, 2, 2, x)))            # zero padded: 6 x 20 x 22
    x = dnn.tag4(dnn.upsample(2, dnn.max_pool(2, 2, 2, 2, x)))
    x = dnn.resize_prev_to_tagged4(dnn.con(6, 3, 3, 2, 2, x))
    x = dnn.softmax(dnn.resize_to(9, 12, x))
    x = dnn.reorg(3, 2, dnn.cont(4, 3, 3, 1, 1, x, bias=False))        # 24 x 3 x 6
    x = dnn.tag6(dnn.extract(5, 4, 3, 5, x))                           # 4 x 3 x 5
    x = dnn.tag5(dnn.sig(dnn.con(4, 1, 1, 1, 1, dnn.avg_pool_everything(x))))
    x = dnn.scale_prev5(dnn.skip6(x))
    x = dnn.softmax_all(dnn.l2normalize(dnn.fc(6, x), eps=1e-4))
    net = dnn.loss_metric(dnn.fc(5, x))
    img = _image(rng, 10, 11)
    net.forward(img)
    cases.append(Case("catalogue", _randomize(net, 6), img, 0.0))

    # 7. dropout (random at inference in dlib, an identity in minidnn: not run in dlib) and
    # the catalogue's losses
    for i, (loss, k) in enumerate((("loss_binary_log", 1), ("loss_binary_hinge", 1),
                                   ("loss_multibinary_log", 3), ("loss_multiclass_log_weighted", 3),
                                   ("loss_mean_squared", 1), ("loss_mean_squared_multioutput", 3))):
        x = dnn.dropout(dnn.relu(dnn.con(3, 3, 3, 1, 1, dnn.input_tensor())), drop_rate=0.25)
        net = getattr(dnn, loss)(dnn.fc(k, x))
        t = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
        net.forward(t)
        cases.append(Case(f"loss{i}_{loss}", _randomize(net, 7 + i), t, 0.0))
    for i, loss in enumerate(("loss_multiclass_log_per_pixel", "loss_binary_log_per_pixel",
                              "loss_mean_squared_per_pixel")):
        k = 1 if loss == "loss_binary_log_per_pixel" else 3
        net = getattr(dnn, loss)(dnn.con(k, 3, 3, 1, 1, dnn.input_tensor()))
        t = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
        net.forward(t)
        cases.append(Case(f"pixel{i}_{loss}", _randomize(net, 20 + i), t, 0.0))
    return cases


def cpp_cases(models):
    """The synthetic cases, plus dlib's own models re-saved (when the files are there)."""
    from minidnn import dlib_zoo
    cases = [c for c in synthetic_cases() if not c.name.startswith("loss")]   # dropout_: random in dlib
    if models is not None:
        p = os.path.join(models, "mmod_human_face_detector.dat")
        if os.path.exists(p):
            img = np.load(os.path.join(models, "reference", "cpp_face_mmod_dlibmodels.npz"))["img0/image"]
            cases.append(Case("face_detector", dlib_zoo.face_detector(p), img, -0.5))
            cases.append(Case("face_detector_fused", dnn.fuse(dlib_zoo.face_detector(p)), img, -0.5))
        for f, load, ref in (("dlib_face_recognition_resnet_model_v1.dat", dlib_zoo.face_descriptor,
                              "cpp_resnet.npz"),
                             ("face_recognition_densenet_model_v1.dat",
                              dlib_zoo.densenet_face_descriptor, "cpp_densenet.npz"),
                             ("dnn_gender_classifier_v1.dat", dlib_zoo.gender_classifier,
                              "cpp_gender.npz")):
            p = os.path.join(models, f)
            if os.path.exists(p):
                imgs = np.load(os.path.join(models, "reference", ref))["images"]
                cases.append(Case(f, load(p), imgs[0], 0.0))
    return cases


# ---------------------------------------------------------------------------- tests
def _same(a, b):
    """Two networks equal layer for layer: class, settings, parameters bit for bit."""
    na, nb = a.chain(), b.chain()
    assert len(na) == len(nb)
    for i, (x, y) in enumerate(zip(na, nb)):
        la, lb = x.layer_details(), y.layer_details()
        assert type(la) is type(lb), (i, la, lb)
        assert la.describe() == lb.describe(), (i, la.describe(), lb.describe())
        assert la.disabled == lb.disabled, i
        for p in tuple(la.params) + tuple(la.state):
            pa, pb = getattr(la, p), getattr(lb, p)
            assert (pa is None) == (pb is None), (i, p)
            if pa is not None:
                assert pa.shape == pb.shape and np.array_equal(pa.view(np.uint32), pb.view(np.uint32)), (i, p)


@pytest.mark.parametrize("case", synthetic_cases(), ids=lambda c: c.name)
def test_round_trip_bit_for_bit(case):
    data = dnn.save_dlib(case.net)
    twin = _rebuild(case.name)
    loaded = dnn.load_dlib(data, twin)
    assert loaded is twin
    _same(case.net, loaded)
    assert dnn.save_dlib(loaded) == data
    np.testing.assert_array_equal(loaded.forward(case.x), case.net.forward(case.x))


def _rebuild(name):
    """The case's network built again (fresh parameters): the structure load_dlib fills."""
    return {c.name: c for c in synthetic_cases(seed=99)}[name].net


def test_a_file_without_tags_loads_without_a_network():
    case = {c.name: c for c in synthetic_cases()}["detector"]
    loaded = dnn.load_dlib(dnn.save_dlib(case.net))
    _same(case.net, loaded)
    assert [d.to_dict() for d in loaded(case.x, adjust_threshold=-2.0)] == \
        [d.to_dict() for d in case.net(case.x, adjust_threshold=-2.0)]


def test_a_file_with_tags_needs_the_network():
    case = {c.name: c for c in synthetic_cases()}["layers"]
    with pytest.raises(dnn.SerializationError, match=r"tag.*load_dlib\(path, net\)"):
        dnn.load_dlib(dnn.save_dlib(case.net))


def test_dlib_type_spells_dlibs_templates():
    cases = {c.name: c for c in synthetic_cases()}
    t = dnn.dlib_type(cases["layers"].net)
    assert t.startswith("using net_type = loss_multiclass_log<fc_no_bias<5,affine<relu<fc<10,skip2<")
    assert "add_layer<max_pool_<3,3,2,2,1,1>, " in t and "add_layer<con_<4,3,3,1,1,0,1>, " in t
    assert "add_layer<avg_pool_<2,2,2,2,1,1>, add_prev1<sig<con<8,3,3,1,1,tag1<prelu<affine<" in t
    assert t.endswith("relu<bn_con<con<6,3,3,1,1,input_rgb_image>>>>" + ">" * 27 + ";")
    assert dnn.dlib_type(cases["tensor"].net, "my_net") == \
        "using my_net = fc<3,relu<con<4,3,3,2,2,input_tensor>>>;"
    assert "input_rgb_image_pyramid<pyramid_down<6>>" in dnn.dlib_type(cases["detector"].net)
    assert "input<matrix<unsigned char>>" in dnn.dlib_type(cases["grayscale"].net)


def test_fused_net_saves_as_dlib_fuses():
    case = {c.name: c for c in synthetic_cases()}["fused"]
    entries, _, _ = D.inspect_dlib(dnn.save_dlib(case.net))
    recs = [(e.tag, e.rec.fields.get("use_relu"), e.rec.fields.get("disabled"))
            for e in entries if e.rec is not None and e.what == "layer"]
    assert ("con_6", True, None) in recs and ("relu_2", None, True) in recs
    assert ("affine_2", None, True) in recs


def test_fusions_dlib_cannot_hold_are_refused():
    net = dnn.fc(2, dnn.sig(dnn.con(3, 3, 3, 1, 1, dnn.input_tensor())))
    net.forward(np.ones((1, 1, 5, 5), np.float32))
    dnn.fuse(net)
    with pytest.raises(dnn.SerializationError, match=r"layer<1> sig: fuse\(\) moved"):
        dnn.save_dlib(net)


def test_unallocated_parameters_are_refused():
    net = dnn.fc(2, dnn.input_tensor())
    with pytest.raises(dnn.SerializationError, match="layer<0> fc: has no parameters yet"):
        dnn.save_dlib(net)


def test_save_dlib_to_a_path_and_back(tmp_path):
    case = {c.name: c for c in synthetic_cases()}["tensor"]
    p = tmp_path / "net.dat"
    dnn.save_dlib(case.net, str(p))
    assert p.read_bytes() == dnn.save_dlib(case.net)
    _same(case.net, dnn.load_dlib(str(p)))
    with open(p, "rb") as f:
        _same(case.net, dnn.load_dlib(f))
    import bz2
    q = tmp_path / "net.dat.bz2"
    q.write_bytes(bz2.compress(p.read_bytes()))
    _same(case.net, dnn.load_dlib(str(q)))


def test_trailing_data_is_left_with_its_offset():
    case = {c.name: c for c in synthetic_cases()}["tensor"]
    data = dnn.save_dlib(case.net)
    net, off = dnn.load_dlib(data + b"\x01\x01more", return_offset=True)
    assert off == len(data)
    _same(case.net, net)


def test_mismatches_name_the_layer_the_record_and_the_offset():
    case = {c.name: c for c in synthetic_cases()}["layers"]
    data = dnn.save_dlib(case.net)
    entries, _, _ = D.inspect_dlib(data)
    # another filter count
    wrong = _rebuild("layers")
    node = wrong.chain()[-2]
    node._layer = dnn.con_(7, 3, 3, 1, 1)
    off = entries[-2].rec.offset
    with pytest.raises(dnn.SerializationError,
                       match=rf"layer<{len(entries) - 2}> con: record 'con_6' at byte offset {off}: "
                             rf"num_filters is 6 in the file but 7 in the network"):
        dnn.load_dlib(data, wrong)
    # another layer kind
    wrong = _rebuild("layers")
    wrong.chain()[-2]._layer = dnn.fc_(6)
    with pytest.raises(dnn.SerializationError, match=r"record 'con_6' at byte offset \d+: the file has a con"):
        dnn.load_dlib(data, wrong)
    # another structure
    with pytest.raises(dnn.SerializationError, match="the file has 32 layers and the network 3"):
        dnn.load_dlib(data, dnn.loss_multiclass_log(dnn.fc(5, dnn.input_rgb_image())))
    # a mismatch leaves the caller's network untouched
    fresh = _rebuild("layers")
    fresh.chain()[3]._layer = dnn.con_(1, 1, 1, 1, 1)
    before = [n.layer_details() for n in fresh.chain()]
    arrays = [(a, a.copy()) for layer in before for a in
              (getattr(layer, p) for p in tuple(layer.params) + tuple(layer.state)) if a is not None]
    with pytest.raises(dnn.SerializationError):
        dnn.load_dlib(data, fresh)
    assert [n.layer_details() for n in fresh.chain()] == before
    now = [getattr(layer, p) for layer in before for p in tuple(layer.params) + tuple(layer.state)
           if getattr(layer, p) is not None]
    assert len(now) == len(arrays) and all(a is b and np.array_equal(a, c)
                                           for b, (a, c) in zip(now, arrays))


# ---------------------------------------------------------------------------- add_prev padding
@pytest.mark.parametrize("more", ["tag", "input", "both"])
def test_add_prev_zero_pads_channels_as_dlib(more, device):
    """dlib's add_prev_ adds a tensor with fewer channels as if the missing ones were 0 (the
    downsampling shortcut of dlib's face descriptor ResNet): forward, fused, reloaded and
    gradients, against the float64 reference."""
    import harness
    dnn.set_seed(3)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    if more == "tag":        # the tag has 5 channels, the input 3
        net = dnn.fc(2, dnn.relu(dnn.add_prev2(dnn.avg_pool(1, 1, 1, 1, dnn.skip1(dnn.tag2(
            dnn.con(5, 3, 3, 1, 1, dnn.tag1(dnn.input_tensor()))))))))
    elif more == "both":     # as dlib's ResNet: the tag has more channels, the input more rows
        x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
        net = dnn.fc(2, dnn.relu(dnn.add_prev2(dnn.avg_pool(2, 2, 2, 2, dnn.skip1(dnn.tag2(
            dnn.con(5, 3, 3, 2, 2, dnn.tag1(dnn.input_tensor()))))))))
    else:                    # the input has 5 channels, the tag 3
        net = dnn.fc(2, dnn.relu(dnn.add_prev1(dnn.bn_con(dnn.con(5, 3, 3, 1, 1, dnn.tag1(
            dnn.input_tensor()))))))
    net.forward(x)
    harness.randomize(net)
    assert harness.check_gradients(net, x) >= 2
    harness.check_forward(net, x, device)

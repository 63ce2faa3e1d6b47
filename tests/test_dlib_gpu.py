"""dlib's published models on "cuda" (``--gpu``; skipped where the model files are not:
MINIDNN_DLIB_MODELS): every model gives what it gives on the CPU, loaded and fused, at batch
1 and a larger batch: the tensor below the loss within 1e-4 relative, the same detections
(rectangles equal, confidences within 1e-3, labels equal), descriptors within 1e-4, the same
labels; and dlib's own stored answers where the small reference files are there."""
import numpy as np
import pytest

import minidnn as dnn
from minidnn import dlib_zoo

from test_dlib_nets import model_path, models_dir

pytestmark = pytest.mark.gpu

MODELS = [  # file, zoo loader, input maker
    ("mmod_human_face_detector.dat", "face_detector", "image"),
    ("mmod_rear_end_vehicle_detector.dat", "vehicle_detector", "image"),
    ("mmod_front_and_rear_end_vehicle_detector.dat", "vehicle_detector", "image"),
    ("dlib_face_recognition_resnet_model_v1.dat", "face_descriptor", "chip150"),
    ("face_recognition_densenet_model_v1.dat", "densenet_face_descriptor", "chip150"),
    ("dnn_gender_classifier_v1.dat", "gender_classifier", "chip32"),
]


def _ref(name):
    import os
    d = models_dir()
    p = None if d is None else os.path.join(d, "reference", name)
    if p is None or not os.path.exists(p):
        pytest.skip(f"reference file {name} is not there")
    return np.load(p)


def _inputs(kind):
    """One input and a batch of distinct ones (the image mirrored, the chip shifted)."""
    rng = np.random.default_rng(0)
    if kind == "image":
        try:
            one = _ref("py_cnn_face_detector.npz")["image_astronaut"]
        except pytest.skip.Exception:
            one = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
        return one, np.stack([one, one[:, ::-1], np.roll(one, 37, axis=0)])
    size = 150 if kind == "chip150" else 32
    try:
        one = (_ref("py_face_recognition_resnet_v1.npz")["chip150_astronaut"] if size == 150
               else _ref("cpp_gender.npz")["images"][0])
    except pytest.skip.Exception:
        one = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return one, np.stack([one, one[:, ::-1], np.roll(one, 5, axis=1), 255 - one])


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))


def same_results(a, b, what):
    """The results of net(x) on the two devices: detections, descriptors or labels."""
    if isinstance(a, list) and a and isinstance(a[0], list):          # a batch of detections
        assert len(a) == len(b), what
        for i, (p, q) in enumerate(zip(a, b)):
            same_results(p, q, f"{what}[{i}]")
        return
    if isinstance(a, list):                                            # detections of one image
        assert [d.rect for d in a] == [d.rect for d in b], (what, a, b)
        assert [d.label for d in a] == [d.label for d in b], what
        np.testing.assert_allclose([d.confidence for d in a], [d.confidence for d in b],
                                   atol=1e-3, err_msg=what)
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape)
    if a.dtype.kind in "iu":
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        assert rel_err(a, b) <= 1e-4, (what, rel_err(a, b))


@pytest.mark.parametrize("fused", [False, True], ids=["loaded", "fused"])
@pytest.mark.parametrize("file,loader,kind", MODELS, ids=[m[1] + ":" + m[0].split(".")[0] for m in MODELS])
def test_model_on_cuda_matches_the_cpu(file, loader, kind, fused):
    p = model_path(file)
    load = getattr(dlib_zoo, loader)
    cpu = load(p)
    gpu = load(p)
    if fused:
        dnn.fuse(cpu)
        dnn.fuse(gpu)
    gpu.to("cuda")
    one, many = _inputs(kind)
    for x, what in ((one, "batch 1"), (many, f"batch {len(many)}")):
        t_cpu, t_gpu = cpu.forward(x), gpu.forward(x)           # the tensor below the loss
        assert t_cpu.shape == t_gpu.shape, what
        assert rel_err(t_gpu, t_cpu) <= 1e-4, (what, rel_err(t_gpu, t_cpu))
        same_results(gpu(x), cpu(x), what)
    if kind == "image":
        for up in (0, 1):                    # the pyramid of an upsampled image on both devices
            same_results(gpu(one, upsample=up), cpu(one, upsample=up), f"upsample {up}")


def test_face_detector_on_cuda_gives_dlibs_detections():
    z = _ref("py_cnn_face_detector.npz")
    net = dnn.fuse(dlib_zoo.face_detector(model_path("mmod_human_face_detector.dat"))).to("cuda")
    for up in (0, 1):
        want = z[f"dets_dlibmodels__astronaut__up{up}"]
        got = net(z["image_astronaut"], upsample=up)
        assert [d.rect for d in got] == [tuple(int(v) for v in w[:4]) for w in want]
        np.testing.assert_allclose([d.confidence for d in got], want[:, 4], atol=1e-3)


def test_face_descriptor_on_cuda_gives_dlibs_descriptor():
    z = _ref("py_face_recognition_resnet_v1.npz")
    net = dlib_zoo.face_descriptor(model_path("dlib_face_recognition_resnet_model_v1.dat")).to("cuda")
    d = net(z["chip150_astronaut"])
    assert d.shape == (128,) and d.dtype == np.float32
    assert rel_err(d, z["descriptor_chip_astronaut"]) <= 1e-4


def test_gender_classifier_on_cuda_gives_dlibs_labels():
    z = _ref("cpp_gender.npz")
    net = dlib_zoo.gender_classifier(model_path("dnn_gender_classifier_v1.dat")).to("cuda")
    np.testing.assert_array_equal(net(z["images"]), z["labels"].reshape(-1))

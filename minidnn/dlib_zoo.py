"""dlib's published DNN models, loaded from the files users already have (dlib.net,
github.com/davisking/dlib-models, the face_recognition_models package).

Each loader builds the network with the structure of dlib's example net type (the C++
``using net_type = ...`` quoted in its docstring) and fills it with ``load_dlib``:

    net = dlib_zoo.face_detector("mmod_human_face_detector.dat")
    dets = net(image)                   # uint8 (H, W, 3) RGB -> [mmod_rect], as dlib's
    dets = net(image, upsample=1)       # cnn_face_detection_model_v1(img, 1)
    d = dlib_zoo.face_descriptor("dlib_face_recognition_resnet_model_v1.dat")(chip)  # (128,)

A detector's ``net(image, upsample=0, adjust_threshold=0.0)`` returns the detections (a list
per image for a list of images); a descriptor's ``net(chips)`` takes aligned uint8 chips,
(N, 150, 150, 3) or one (150, 150, 3), and returns float32 (N, 128) or (128,); the gender
classifier's ``net(chips)`` (32 x 32 chips) returns int labels (0 female, 1 male). Every
zoo net's ``net.forward(images)`` returns the tensor below its loss layer (the detector's
score maps, the descriptors as (N, 128, 1, 1), the classifier's logits). The returned
networks are ordinary minidnn networks: they print, fuse, save (minidnn's format or
dlib's), run on the GPU and train like any other.

``load(path)`` recognises which of these models a file holds from its records
(``identify(path)``); ``NETS`` maps each model's name to the function building its
structure (``dnn.dlib_type(NETS[name]())`` prints the C++ type).
"""
import numpy as np

from . import layers as L
from .dlib import inspect_dlib, load_dlib
from .loss import loss_metric, loss_multiclass_log
from .mmod import loss_mmod


def _need(name):
    f = getattr(L, name, None)
    if f is None:
        raise NotImplementedError(f"dlib_zoo: this minidnn has no {name} layer yet (the layer "
                                  f"catalogue); this model needs it")
    return f


# ---------------------------------------------------------------------------- detectors
def mmod_detector_net(num_filters=45):
    """dlib's MMOD detector (examples/dnn_mmod_face_detection_ex.cpp, with 45 filters, and
    dnn_mmod_find_cars_ex.cpp / dnn_mmod_find_cars2_ex.cpp, with 55)::

        template <long num_filters, typename SUBNET> using con5d = con<num_filters,5,5,2,2,SUBNET>;
        template <long num_filters, typename SUBNET> using con5  = con<num_filters,5,5,1,1,SUBNET>;
        template <typename SUBNET> using downsampler  = relu<affine<con5d<32, relu<affine<con5d<32,
                                                        relu<affine<con5d<16,SUBNET>>>>>>>>>;
        template <typename SUBNET> using rcon5  = relu<affine<con5<45,SUBNET>>>;
        using net_type = loss_mmod<con<1,9,9,1,1,rcon5<rcon5<rcon5<downsampler<
                                   input_rgb_image_pyramid<pyramid_down<6>>>>>>>>;

    (the detector windows and the number of output channels come from the file)."""
    def con5d(n, s):
        return L.con(n, 5, 5, 2, 2, s)

    def rcon5(s):
        return L.relu(L.affine(L.con(num_filters, 5, 5, 1, 1, s)))
    down = L.relu(L.affine(con5d(32, L.relu(L.affine(con5d(32, L.relu(L.affine(con5d(
        16, L.input_rgb_image_pyramid(6))))))))))
    return loss_mmod(L.con(1, 9, 9, 1, 1, rcon5(rcon5(rcon5(down)))))


def _out_channels(path):
    """The number of filters of a detector file's last con (1 per window, 5 with bbr)."""
    entries, _, _ = inspect_dlib(path)
    return [e for e in entries if e.what == "layer" and e.rec.kind == "con"]


def face_detector(path):
    """dlib's CNN face detector, mmod_human_face_detector.dat (see mmod_detector_net):
    ``net(image, upsample=0, adjust_threshold=0.0)`` returns dlib's detections."""
    return load_dlib(path, mmod_detector_net(45))


def vehicle_detector(path):
    """dlib's vehicle detectors, mmod_rear_end_vehicle_detector.dat (3 windows) and
    mmod_front_and_rear_end_vehicle_detector.dat (6 windows, labels "rear" and "front"):
    the MMOD net with 55 filters (dnn_mmod_find_cars_ex.cpp). The shape_predictor these
    files append after the network is left unread (load_dlib(..., return_offset=True)
    says where it starts)."""
    cons = _out_channels(path)
    net = mmod_detector_net(55)
    last = cons[0].rec["num_filters"] if cons else 1
    # the top con's filters: one per detector window (five with bounding box regression)
    top = net.subnet()
    top._layer = L.con_(last, 9, 9, 1, 1)
    return load_dlib(path, net)


# ---------------------------------------------------------------------------- face descriptors
def resnet_descriptor_net():
    """dlib's face recognition ResNet (examples/dnn_face_recognition_ex.cpp, anet_type)::

        template <template <int,template<typename>class,int,typename> class block, int N,
                  template<typename>class BN, typename SUBNET>
        using residual = add_prev1<block<N,BN,1,tag1<SUBNET>>>;
        template <...> using residual_down = add_prev2<avg_pool<2,2,2,2,skip1<tag2<
                                             block<N,BN,2,tag1<SUBNET>>>>>>;
        template <int N, template <typename> class BN, int stride, typename SUBNET>
        using block  = BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,SUBNET>>>>>;
        template <int N, typename SUBNET> using ares      = relu<residual<block,N,affine,SUBNET>>;
        template <int N, typename SUBNET> using ares_down = relu<residual_down<block,N,affine,SUBNET>>;
        alevel0 = ares_down<256>; alevel1 = ares<256,ares<256,ares_down<256>>>;
        alevel2 = ares<128,ares<128,ares_down<128>>>; alevel3 = ares<64,ares<64,ares<64,ares_down<64>>>>;
        alevel4 = ares<32,ares<32,ares<32>>>;
        using anet_type = loss_metric<fc_no_bias<128,avg_pool_everything<alevel0<alevel1<alevel2<
            alevel3<alevel4<max_pool<3,3,2,2,relu<affine<con<32,7,7,2,2,input_rgb_image_sized<150>
            >>>>>>>>>>>>;
    """
    def block(n, stride, s):
        return L.affine(L.con(n, 3, 3, 1, 1, L.relu(L.affine(L.con(n, 3, 3, stride, stride, s)))))

    def ares(n, s):
        return L.relu(L.add_prev1(block(n, 1, L.tag1(s))))

    def ares_down(n, s):
        return L.relu(L.add_prev2(L.avg_pool(2, 2, 2, 2, L.skip1(L.tag2(block(n, 2, L.tag1(s)))))))

    x = L.max_pool(3, 3, 2, 2, L.relu(L.affine(L.con(32, 7, 7, 2, 2, L.input_rgb_image_sized(150)))))
    x = ares(32, ares(32, ares(32, x)))                               # alevel4
    x = ares(64, ares(64, ares(64, ares_down(64, x))))                # alevel3
    x = ares(128, ares(128, ares_down(128, x)))                       # alevel2
    x = ares(256, ares(256, ares_down(256, x)))                       # alevel1
    x = ares_down(256, x)                                             # alevel0
    return loss_metric(L.fc(128, L.avg_pool_everything(x), bias=False))


def face_descriptor(path):
    """dlib's 128-D face descriptor, dlib_face_recognition_resnet_model_v1.dat (see
    resnet_descriptor_net): ``net(chips)`` takes aligned 150 x 150 uint8 RGB chips (N, 150,
    150, 3) or one (150, 150, 3) and returns float32 (N, 128) or (128,); two faces are the
    same person when their descriptors are closer than 0.6."""
    return load_dlib(path, resnet_descriptor_net())


def densenet_descriptor_net():
    """The DenseNet face descriptor of face_recognition_densenet_model_v1.dat (dlib-models),
    as its records and dlib's print-out of it show it (pre-activation dense layers of growth
    16 with a 64-filter bottleneck, concatenated with concat_<tag1, tag2>; transitions
    halving the channels; blocks of 3, 6, 12 and 8 layers)::

        template <typename SUBNET> using dense_layer = concat2<tag1,tag2,tag2<con<16,3,3,1,1,
            relu<affine<con<64,1,1,1,1 (no bias),relu<affine<tag1<SUBNET>>>>>>>>>>;
        template <long N, typename SUBNET> using transition = avg_pool<2,2,2,2,con<N,1,1,1,1,
            relu<affine<SUBNET>>>>;
        using net_type = loss_metric<fc_no_bias<128,avg_pool_everything<relu<affine<
            repeat<8,dense_layer,transition<130,repeat<12,dense_layer,transition<68,
            repeat<6,dense_layer,transition<40,repeat<3,dense_layer,
            add_layer<max_pool_<3,3,2,2,1,1>,relu<affine<add_layer<con_<32,7,7,2,2,3,3> (no bias),
            input_rgb_image>>>>>>>>>>>>>>>>>;

    minidnn has no repeat: the repeated layers are unrolled (the file's repeat blocks read
    into them one after the other)."""
    concat = _need("concat")

    def dense(s):
        t = L.tag1(s)
        x = L.relu(L.affine(t))
        x = L.relu(L.affine(L.con(64, 1, 1, 1, 1, x, bias=False)))
        x = L.tag2(L.con(16, 3, 3, 1, 1, x))
        return concat(L.tag1, L.tag2, x)

    def transition(n, s):
        return L.avg_pool(2, 2, 2, 2, L.con(n, 1, 1, 1, 1, L.relu(L.affine(s))))

    x = L.con(32, 7, 7, 2, 2, L.input_rgb_image(), padding_y=3, padding_x=3, bias=False)
    x = L.max_pool(3, 3, 2, 2, L.relu(L.affine(x)), padding_y=1, padding_x=1)
    for i, (n, t) in enumerate(((3, 40), (6, 68), (12, 130), (8, None))):
        for _ in range(n):
            x = dense(x)
        if t is not None:
            x = transition(t, x)
    x = L.avg_pool_everything(L.relu(L.affine(x)))
    return loss_metric(L.fc(128, x, bias=False))


def densenet_face_descriptor(path):
    """The DenseNet face descriptor, face_recognition_densenet_model_v1.dat (see
    densenet_descriptor_net): ``net(chips)`` as face_descriptor's."""
    return load_dlib(path, densenet_descriptor_net())


# ---------------------------------------------------------------------------- classifiers
def gender_classifier_net():
    """dlib-models' gender classifier (gender-classifier/dnn_gender_classifier_v1_ex.cpp,
    agender_type, with multiply for dropout as at inference)::

        template <int N, template <typename> class BN, int stride, typename SUBNET>
        using block = BN<con<N, 3, 3, stride, stride, relu<BN<con<N, 3, 3, stride, stride, SUBNET>>>>>;
        template <int N, typename SUBNET> using ares_ = relu<block<N, affine, 1, SUBNET>>;
        template <typename SUBNET> using alevel1 = avg_pool<2, 2, 2, 2, ares_<64, SUBNET>>;
        template <typename SUBNET> using alevel2 = avg_pool<2, 2, 2, 2, ares_<32, SUBNET>>;
        using agender_type = loss_multiclass_log<fc<2, multiply<relu<fc<16, multiply<
            alevel1<alevel2< input_rgb_image_sized<32>>>>>>>>>;
    """
    multiply = _need("multiply")

    def ares(n, s):
        return L.relu(L.affine(L.con(n, 3, 3, 1, 1, L.relu(L.affine(L.con(n, 3, 3, 1, 1, s))))))
    x = L.avg_pool(2, 2, 2, 2, ares(32, L.input_rgb_image_sized(32)))
    x = L.avg_pool(2, 2, 2, 2, ares(64, x))
    return loss_multiclass_log(L.fc(2, multiply(L.relu(L.fc(16, multiply(x))))))


def gender_classifier(path):
    """The gender classifier of dlib-models, dnn_gender_classifier_v1.dat (see
    gender_classifier_net): ``net(chips)`` takes aligned 32 x 32 uint8 RGB face chips and
    returns int labels, 0 female, 1 male (one int for one chip)."""
    return load_dlib(path, gender_classifier_net())


# ---------------------------------------------------------------------------- by name
NETS = {
    "face_detector": lambda: mmod_detector_net(45),
    "vehicle_detector": lambda: mmod_detector_net(55),
    "face_descriptor": resnet_descriptor_net,
    "densenet_face_descriptor": densenet_descriptor_net,
    "gender_classifier": gender_classifier_net,
}
LOADERS = {
    "face_detector": face_detector,
    "vehicle_detector": vehicle_detector,
    "face_descriptor": face_descriptor,
    "densenet_face_descriptor": densenet_face_descriptor,
    "gender_classifier": gender_classifier,
}


def identify(path):
    """The name (a key of LOADERS) of the published model a dlib file holds, recognised by
    its records, or None."""
    entries, _, _ = inspect_dlib(path)
    tags = [e.tag for e in entries]
    kinds = [e.rec.kind if e.rec is not None else "tag" for e in entries]
    top = kinds[0]
    if top == "loss_mmod":
        cons = [e.rec for e in entries if e.rec is not None and e.rec.kind == "con"]
        if len(cons) == 7 and all(e.what != "tag" for e in entries):
            width = cons[1]["num_filters"]
            return {45: "face_detector", 55: "vehicle_detector"}.get(width)
        return None
    if top == "loss_metric":
        if "concat" in kinds:
            return "densenet_face_descriptor"
        if entries[-1].rec.kind == "input_rgb_image_sized" and kinds.count("add_prev") == 14:
            return "face_descriptor"
        return None
    if top == "loss_multiclass_log" and entries[-1].rec.kind == "input_rgb_image_sized" and \
            "dropout_" in tags and len(entries) == 21:
        return "gender_classifier"
    return None


def load(path, name=None):
    """A zoo model from its file: ``name`` (a key of LOADERS) or, by default, the model
    identify(path) recognises; ValueError when it recognises none."""
    if name is None:
        name = identify(path)
        if name is None:
            raise ValueError(f"{path}: not one of the dlib models minidnn.dlib_zoo knows "
                             f"({', '.join(LOADERS)}); build its network and use load_dlib(path, net)")
    try:
        fn = LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown dlib model {name!r}: expected one of {', '.join(LOADERS)}") from None
    return fn(path)


__all__ = ["face_detector", "vehicle_detector", "face_descriptor", "densenet_face_descriptor",
           "gender_classifier", "mmod_detector_net", "resnet_descriptor_net",
           "densenet_descriptor_net", "gender_classifier_net", "identify", "load", "NETS", "LOADERS"]

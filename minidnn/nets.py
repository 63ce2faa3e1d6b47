"""The reference architectures: small CNNs the tests, the benchmarks and the docs share.

Each function returns a fresh network without a loss layer (wrap it in one to
train it); ``randomized(net, shape)`` gives it parameters and non-trivial
batch-norm statistics and biases, so that comparisons exercise everything.

- ``lenet()``: two 5x5 convs with batch-norm and max pooling, three fcs (1x28x28).
- ``cifar_resnet(widths, blocks, classes)``: basic residual blocks with tag/skip/
  add_prev shortcuts and 1x1 stride-2 projections (3x32x32).
- ``resnet18()``: ImageNet's ResNet-18 (3x224x224).
- ``mobilenet_v2(width, classes)``: MobileNet-v2: inverted residual blocks (1x1 expansion,
  depthwise 3x3, 1x1 projection, batch-norm, clipped_relu (ReLU6), add_prev shortcuts)
  (3x224x224).
"""
import numpy as np

from . import layers as L


def lenet(classes=10):
    net = L.max_pool(2, 2, 2, 2, L.relu(L.bn_con(L.con(6, 5, 5, 1, 1, L.input_tensor(),
                                                      padding_y=0, padding_x=0))))
    net = L.max_pool(2, 2, 2, 2, L.relu(L.bn_con(L.con(16, 5, 5, 1, 1, net,
                                                      padding_y=0, padding_x=0))))
    net = L.relu(L.bn_fc(L.fc(120, net)))
    net = L.relu(L.fc(84, net))
    return L.fc(classes, net)


def basic_block(k, sub):
    """relu(x + bn(con(relu(bn(con(x)))))), identity shortcut (tag1 / add_prev1)."""
    r = L.bn_con(L.con(k, 3, 3, 1, 1, L.relu(L.bn_con(L.con(k, 3, 3, 1, 1, L.tag1(sub))))))
    return L.relu(L.add_prev1(r))


def down_block(k, sub):
    """A stride-2 basic block whose shortcut is a 1x1 stride-2 projection (tag2 holds it;
    skip1 brings the block input back for the main path)."""
    proj = L.tag2(L.bn_con(L.con(k, 1, 1, 2, 2, L.tag1(sub))))
    r = L.relu(L.bn_con(L.con(k, 3, 3, 2, 2, L.skip1(proj), padding_y=1, padding_x=1)))
    return L.relu(L.add_prev2(L.bn_con(L.con(k, 3, 3, 1, 1, r))))


def cifar_resnet(widths=(32, 64, 128), blocks=2, classes=10):
    net = L.relu(L.bn_con(L.con(widths[0], 3, 3, 1, 1, L.input_tensor())))
    for s, k in enumerate(widths):
        for b in range(blocks):
            net = down_block(k, net) if (s > 0 and b == 0) else basic_block(k, net)
    return L.fc(classes, L.avg_pool_everything(net))


def resnet18(classes=1000):
    net = L.relu(L.bn_con(L.con(64, 7, 7, 2, 2, L.input_tensor(), padding_y=3, padding_x=3)))
    net = L.max_pool(3, 3, 2, 2, net, padding_y=1, padding_x=1)
    for s, k in enumerate((64, 128, 256, 512)):
        net = basic_block(k, net) if s == 0 else down_block(k, net)
        net = basic_block(k, net)
    return L.fc(classes, L.avg_pool_everything(net))


def _ch(c, width):
    """Channels scaled by the width multiplier, rounded to a multiple of 8 (as MobileNet)."""
    return max(8, int(c * width + 4) // 8 * 8)


def inverted_residual(sub, k_in, k_out, stride, expand):
    """MobileNet-v2's block: 1x1 expansion + bn + relu6 (unless expand == 1), depthwise 3x3
    (stride) + bn + relu6, 1x1 projection + bn; x + block(x) when the shapes allow."""
    residual = stride == 1 and k_in == k_out
    x = L.tag1(sub) if residual else sub
    hidden = k_in * expand
    if expand != 1:
        x = L.clipped_relu(L.bn_con(L.con(hidden, 1, 1, 1, 1, x, bias=False)))
    x = L.clipped_relu(L.bn_con(L.con(hidden, 3, 3, stride, stride, x, padding_y=1, padding_x=1,
                                      groups=hidden, bias=False)))
    x = L.bn_con(L.con(k_out, 1, 1, 1, 1, x, bias=False))
    return L.add_prev1(x) if residual else x


MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))      # (expansion t, channels c, blocks n, stride s)


def mobilenet_v2(width=1.0, classes=1000, config=MOBILENET_V2, last=1280):
    k = _ch(32, width)
    net = L.clipped_relu(L.bn_con(L.con(k, 3, 3, 2, 2, L.input_tensor(), padding_y=1, padding_x=1,
                                        bias=False)))
    for t, c, n, s in config:
        c = _ch(c, width)
        for i in range(n):
            net = inverted_residual(net, k, c, s if i == 0 else 1, t)
            k = c
    last = _ch(last, max(width, 1.0))
    net = L.clipped_relu(L.bn_con(L.con(last, 1, 1, 1, 1, net, bias=False)))
    return L.fc(classes, L.avg_pool_everything(net))


# name: (factory, input (K, R, C), the large batch the benchmarks use)
NETS = {
    "lenet": (lenet, (1, 28, 28), 256),
    "cifar_resnet": (cifar_resnet, (3, 32, 32), 64),
    "resnet18": (resnet18, (3, 224, 224), 16),
    "mobilenet_v2": (mobilenet_v2, (3, 224, 224), 16),
}


def randomized(net, shape, seed=1):
    """Give ``net`` parameters for inputs of ``shape`` (N, K, R, C) (one forward), then
    random batch-norm statistics, gammas, betas and biases drawn with ``seed``, in
    place; returns net."""
    net.forward(np.zeros((1,) + tuple(shape[1:]), np.float32))
    rng = np.random.default_rng(seed)
    for node in reversed(net.chain()):                 # bottom first
        l = node.layer_details()
        if isinstance(l, L.bn_):
            k = l.gamma.shape
            l.gamma[...] = rng.uniform(0.5, 1.5, k)
            l.beta[...] = rng.uniform(-0.2, 0.2, k)
            l.running_mean[...] = rng.uniform(-0.2, 0.2, k)
            l.running_var[...] = rng.uniform(0.5, 1.5, k)
        elif l.takes_epilogue and l.biases is not None:
            l.biases[...] = rng.uniform(-0.1, 0.1, l.biases.shape)
    return net


def build(name, batch=1, seed=0):
    """The reference net ``name`` (a key of NETS), seeded and randomized, for ``batch``."""
    from .layers import set_seed
    factory, shape, _ = NETS[name]
    set_seed(seed)
    return randomized(factory(), (batch,) + shape)

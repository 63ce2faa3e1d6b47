"""Whole networks on the GPU: net.to("cuda") against the CPU path and the NumPy reference."""
import importlib.util

import numpy as np
import pytest

import minidnn as dnn
import reference as R
from test_fuse import prepared
from test_net import cifar_resnet, rand

gpu = pytest.mark.gpu


def lenet():
    return dnn.loss_multiclass_log(dnn.fc(10, dnn.relu(dnn.bn_fc(dnn.fc(32, dnn.max_pool(2, 2, 2, 2,
        dnn.relu(dnn.bn_con(dnn.con(6, 5, 5, 1, 1, dnn.input_tensor(), padding_y=0, padding_x=0)))))))))


def odd_net():
    """Every layer kind, odd sizes, strides and paddings."""
    x = dnn.tag2(dnn.input_tensor())
    x = dnn.relu(dnn.bn_con(dnn.con(5, 5, 3, 2, 1, x, padding_y=2, padding_x=1)))
    x = dnn.tag1(dnn.max_pool(3, 3, 2, 2, x, padding_y=1, padding_x=1))
    x = dnn.skip3(dnn.tag3(x))
    x = dnn.add_prev1(dnn.affine(dnn.con(5, 3, 3, 1, 1, x)))
    x = dnn.avg_pool(3, 2, 2, 1, x, padding_y=1)
    return dnn.softmax(dnn.fc(7, x))


@gpu
@pytest.mark.parametrize("make,shape", [(lenet, (1, 1, 28, 28)), (lenet, (5, 1, 28, 28)),
                                        (odd_net, (3, 5, 17, 13)), (odd_net, (1, 5, 9, 11))])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_matches_cpu_and_reference(make, shape, fused, graphs):
    net = make()
    x = rand(*shape)
    prepared(net, x)
    if fused:
        dnn.fuse(net)
    cpu = net.forward(x)
    ref = R.forward(net, x)
    net.to("cuda", graphs=graphs)
    for _ in range(3):                       # first run builds, then capture/replay
        out = net.forward(x)
        R.assert_close(out, ref)
        R.assert_close(out, cpu.astype(np.float64))
    np.testing.assert_allclose(net(x), net.to("cpu")(x), rtol=1e-5, atol=1e-6)   # labels: exact


@gpu
def test_gpu_cifar_resnet_batches():
    net = cifar_resnet()
    for n in (1, 8):
        x = rand(n, 3, 32, 32)
        prepared(net.to("cpu"), x)
        ref = R.forward(net, x)
        net.to("cuda")
        R.assert_close(net.forward(x), ref)
        dnn.fuse(net)
        net.to("cuda")
        R.assert_close(net.forward(x), ref)


@gpu
def test_host_parameter_writes_reach_the_device_after_to_cuda():
    net = dnn.con(4, 3, 3, 1, 1, dnn.input_tensor())
    x = rand(2, 3, 8, 8)
    net.forward(x)
    net.to("cuda")
    a = net.forward(x)
    net.layer_details().biases[:] += 1.0
    net.to("cuda")                            # the documented rule: re-sync after host writes
    b = net.forward(x)
    np.testing.assert_allclose(b, a + 1.0, rtol=1e-5, atol=1e-5)


@gpu
def test_forward_device_chains_without_host_round_trip():
    import pycuda.gpuarray as gpuarray
    first = dnn.relu(dnn.con(4, 3, 3, 1, 1, dnn.input_tensor()))
    second = dnn.fc(3, dnn.con(2, 3, 3, 1, 1, dnn.input_tensor()))
    x = rand(2, 3, 8, 8)
    first.forward(x), second.forward(first.forward(x))
    expect = second.forward(first.forward(x))
    first.to("cuda"), second.to("cuda")
    mid = first.forward_device(x)
    assert isinstance(mid, gpuarray.GPUArray)
    R.assert_close(second.forward(mid), expect.astype(np.float64))


@gpu
def test_out_of_memory_names_the_layer_and_net_stays_usable():
    net = dnn.con(64, 3, 3, 1, 1, dnn.relu(dnn.input_tensor()))
    small = rand(1, 3, 8, 8)
    net.forward(small)
    net.to("cuda")
    ok = net.forward(small)
    huge = np.empty((4096, 3, 1024, 1024), np.float32)   # 48 GiB in, 1 TiB out: cannot fit
    with pytest.raises(MemoryError, match=r"layer<\d> (relu|con|input_tensor)"):
        net.forward(huge)
    np.testing.assert_array_equal(net.forward(small), ok)


@pytest.mark.skipif(importlib.util.find_spec("pycuda") is not None, reason="PyCUDA is installed here")
def test_to_cuda_without_pycuda_is_a_clear_error():
    net = dnn.relu(dnn.input_tensor())
    with pytest.raises(RuntimeError, match=r"PyCUDA.*pip install"):
        net.to("cuda")
    assert net.device == "cpu"
    assert net.forward(rand(1, 1, 2, 2)).shape == (1, 1, 2, 2)


@gpu
@pytest.mark.parametrize("route", ["own", "cudnn", "auto"])
def test_conv_routes_match_reference_and_are_reported(route):
    be = dnn.ops.backend("cuda")
    net = cifar_resnet(widths=(8, 16, 32))
    x = rand(4, 3, 32, 32)
    prepared(net, x)
    dnn.fuse(net)
    ref = R.forward(net, x)
    be.set_conv_route(route)
    try:
        net.to("cuda")
        R.assert_close(net.forward(x), ref)
        R.assert_close(net.forward(x), ref)          # graph replay
        info = dnn.backend_info(net)
        paths = {c["path"] for c in info["convolutions"]}
        assert len(info["convolutions"]) == 15
        if route == "own" or not info["cudnn"]:
            assert paths == {"own kernel"}
        elif route == "cudnn":
            assert "own kernel" not in paths
            relu_paths = {c["path"] for c in info["convolutions"] if c["relu"]}
            assert relu_paths == {"fused cuDNN call"}
    finally:
        be.set_conv_route("auto")


@gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_get_output_of_a_gpu_net_is_the_numpy_output(graphs):
    """node.get_output() on a GPU net: the CUDA backend is found from its GPUArrays
    (ops.backend_of) and every node's output comes back as NumPy, as on the CPU."""
    net = odd_net()
    x, x2 = rand(3, 5, 17, 13), rand(3, 5, 17, 13)
    prepared(net, x)
    net.forward(x2)
    cpu = [n.get_output().copy() for n in net.chain()]           # the outputs for x2
    net.forward(x)                        # the CPU program's last outputs are x's now
    top_x = net.get_output().copy()
    net.to("cuda", graphs=graphs)
    for _ in range(2):                                          # eager or captured, then replayed
        net.forward(x2)
        for i, (n, want) in enumerate(zip(net.chain(), cpu)):
            got = n.get_output()
            assert isinstance(got, np.ndarray) and got.dtype == np.float32, (i, type(got))
            R.assert_close(got, want.astype(np.float64))
        assert not np.allclose(net.get_output(), top_x)          # the GPU's, not the CPU's
    assert dnn.ops.backend_of(net.forward_device(x)) is dnn.ops.backend("cuda")


ACT_LAYERS = [("sig", dnn.sig), ("leaky_relu", lambda n: dnn.leaky_relu(n, alpha=0.2)),
              ("clipped_relu", lambda n: dnn.clipped_relu(n, ceiling=1.5)), ("gelu", dnn.gelu)]


@gpu
@pytest.mark.parametrize("route", ["own", "cudnn", "auto"])
@pytest.mark.parametrize("act_layer", ACT_LAYERS, ids=[a[0] for a in ACT_LAYERS])
def test_activation_cudnn_lacks_runs_and_is_reported(route, act_layer):
    """A convolution whose epilogue is an activation cuDNN has not (the compiled forward
    moves the activation layer above it into its epilogue): the own kernel applies it,
    or on the cuDNN route cuDNN's identity epilogue and then the own activation kernel;
    backend_info says which."""
    from minidnn.backends import cudnn
    name, factory = act_layer
    be = dnn.ops.backend("cuda")
    net = dnn.fc(5, factory(dnn.con(6, 3, 3, 1, 1, dnn.relu(dnn.con(4, 3, 3, 1, 1,
                                                                        dnn.input_tensor())))))
    x = rand(2, 3, 9, 9)
    cpu = net.forward(x)
    act = dnn.layer(net, 1).layer_details().act
    be.set_conv_route(route)
    try:
        net.to("cuda")
        for _ in range(2):                            # first run builds, then capture/replay
            R.assert_close(net.forward(x), cpu.astype(np.float64))
        info = dnn.backend_info(net)
        print(info)
        convs = {c["layer"]: c for c in info["convolutions"]}
        sig, rel = convs[2], convs[4]                 # con(6) + the activation, con(4) + relu
        assert not sig["relu"] and sig["act"] == repr(act) and sig["act"].startswith(name)
        assert rel["relu"] and rel["act"] == "relu"
        if route == "own" or not info["cudnn"]:
            assert sig["path"] == rel["path"] == "own kernel"
        elif route == "cudnn":
            own_act = {p + " + own activation kernel" for p in cudnn.PATH_NAMES.values()}
            assert sig["path"] in own_act
            assert sig["algorithm"] in cudnn.FWD_ALGOS
            assert rel["path"] == "fused cuDNN call"
        else:
            assert sig["path"] == "own kernel" or sig["path"].endswith(" + own activation kernel")
    finally:
        be.set_conv_route("auto")


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_many_threads_forward_one_gpu_net(graphs):
    """Serving threads on one GPU net (issue 15 on "cuda"): every thread gets its own
    programs (its own graph captured while other threads replay theirs), the backend's
    context is made current in each, and every result is the one-thread result."""
    import threading
    from minidnn import nets
    net = dnn.fuse(nets.randomized(nets.cifar_resnet(), (2, 3, 32, 32))).to("cuda", graphs=graphs)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1 + i % 3, 3, 32, 32)).astype(np.float32) for i in range(12)]
    want = [net.forward(x) for x in xs]
    got, errors = [None] * len(xs), []

    def work(i):
        try:
            for _ in range(5):
                got[i] = net.forward(xs[i])
                assert np.array_equal(dnn.ops.backend("cuda").to_numpy(net.forward_device(xs[i])), got[i])
        except Exception as e:          # reported below, with the thread's index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)

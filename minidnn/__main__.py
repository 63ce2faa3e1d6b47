"""Command line: python -m minidnn {demo, info, fuse, bench}."""
import argparse
import sys
import time

import numpy as np


def _median_ms(fn, x, repeat=20):
    fn(x)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def demo_net():
    """A small CNN with batch-norm (1x28x28 in, 10 classes)."""
    import minidnn as dnn
    return dnn.loss_multiclass_log(
        dnn.fc(10, dnn.relu(dnn.bn_fc(dnn.fc(64,
        dnn.max_pool(2, 2, 2, 2, dnn.relu(dnn.bn_con(dnn.con(32, 3, 3, 1, 1,
        dnn.max_pool(2, 2, 2, 2, dnn.relu(dnn.bn_con(dnn.con(16, 5, 5, 1, 1,
        dnn.input_tensor())))))))))))))


def cmd_demo(args):
    import minidnn as dnn
    rng = np.random.default_rng(0)
    net = demo_net()
    x = rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    net(x)                                       # setup: parameters are allocated
    for n in net.chain():                        # give batch-norm non-trivial statistics
        l = n.layer_details()
        if isinstance(l, dnn.bn_):
            k = l.gamma.shape[0]
            l.gamma[:] = rng.uniform(0.5, 2.0, k)
            l.beta[:] = rng.normal(0, 0.5, k)
            l.running_mean[:] = rng.normal(0, 0.5, k)
            l.running_var[:] = rng.uniform(0.5, 2.0, k)
    print("built a small CNN with batch-norm:\n")
    print(net)
    before = net.forward(x)
    labels = net(x)
    t_unfused = _median_ms(net.forward, x)
    print(f"\nforward of a batch of {args.batch} 1x28x28 images: output {before.shape}, "
          f"labels {labels[:8].tolist()}{' ...' if len(labels) > 8 else ''}")
    dnn.fuse(net)
    after = net.forward(x)
    t_fused = _median_ms(net.forward, x)
    print("\nafter dnn.fuse(net):\n")
    print(net)
    diff = float(np.abs(after - before).max())
    rel = diff / max(1.0, float(np.abs(before).max()))
    print(f"\nlargest output difference fused vs unfused: {diff:.3g} ({rel:.2g} relative)")
    print(f"labels unchanged: {bool((net(x) == labels).all())}")
    print(f"latency (median of 20, batch {args.batch}): unfused {t_unfused:.3f} ms, "
          f"fused {t_fused:.3f} ms ({t_unfused / t_fused:.2f}x)")
    return 0


def _fail(cmd, path, e):
    """One line on stderr and exit status 1 (a bad file, an unreadable path, an unfusable net)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"minidnn {cmd}: error: {path}: {msg}", file=sys.stderr)
    return 1


def _param_summary(layer):
    parts = []
    for p in layer.params:
        a = getattr(layer, p, None)
        if a is not None:
            parts.append(f"{p} {'x'.join(str(d) for d in a.shape)}")
    if getattr(layer, "running_mean", None) is not None:
        parts.append(f"running stats {layer.running_mean.shape[0]}")
    if getattr(layer, "k", None) is not None:
        parts.append(f"k={layer.k}")
    return ", ".join(parts)


def cmd_info(args):
    import minidnn as dnn
    from minidnn.serialize import SerializationError, load_with_info
    try:
        net, version, tags = load_with_info(args.file)
    except (SerializationError, OSError) as e:
        return _fail("info", args.file, e)
    nodes = net.chain()
    disabled = sum(n.layer_details().disabled for n in nodes)
    print(f"{args.file}: minidnn file format version {version}, {len(nodes)} layers, "
          f"{dnn.count_parameters(net)} parameters, {disabled} disabled")
    lines = str(net).splitlines()
    width = max(len(line) for line in lines)
    for line, node, tag in zip(lines, nodes, tags):
        layer = node.layer_details()
        n = layer.num_parameters()
        text = f"{line.ljust(width)}  [{tag}]"
        if n:
            text += f"  {n} params"
        summary = _param_summary(layer)
        if summary:
            text += f": {summary}"
        print(text.rstrip())
    return 0


def cmd_fuse(args):
    import minidnn as dnn
    try:
        net = dnn.deserialize(args.input)
        before = sum(n.layer_details().disabled for n in net.chain())
        dnn.fuse(net)
        after = sum(n.layer_details().disabled for n in net.chain())
    except (dnn.SerializationError, OSError, ValueError) as e:
        return _fail("fuse", args.input, e)
    try:
        dnn.serialize(net, args.output)
    except (dnn.SerializationError, OSError) as e:
        return _fail("fuse", args.output, e)
    print(f"fused {args.input} -> {args.output}: {after - before} layers folded into the layer "
          f"below ({after} of {len(net)} layers disabled)")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minidnn", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="build a small CNN with batch-norm, run it, fuse it")
    d.add_argument("--batch", type=int, default=16)
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("info", help="print a saved network: layers, parameters, format and record versions")
    i.add_argument("file")
    i.set_defaults(fn=cmd_info)
    f = sub.add_parser("fuse", help="load a saved network, fuse it (dnn.fuse), save the result")
    f.add_argument("input")
    f.add_argument("output")
    f.set_defaults(fn=cmd_fuse)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: python -m minidnn {demo, info, fuse, convert, bench, run}."""
import argparse
import os
import sys
import time

import numpy as np


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line ("prog: error: ..."), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text):
    """argparse type: an integer >= 1 (else the one-line usage error, exit 2)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _shape3(text):
    """argparse type: K,R,C, three integers >= 1."""
    try:
        shape = tuple(int(v) for v in text.split(","))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be K,R,C (three positive integers), got {text!r}") from None
    return shape


def _median_ms(fn, x, repeat=20):
    fn(x)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def demo_net():
    """A small CNN with batch-norm for the 8x8 digits (1x8x8 in, 10 classes)."""
    import minidnn as dnn
    return dnn.loss_multiclass_log(
        dnn.fc(10, dnn.relu(dnn.bn_fc(dnn.fc(64,
        dnn.max_pool(2, 2, 2, 2, dnn.relu(dnn.bn_con(dnn.con(32, 3, 3, 1, 1,
        dnn.relu(dnn.bn_con(dnn.con(16, 3, 3, 1, 1,
        dnn.input_tensor()))))))))))))


def load_digits():
    """The 8x8 digits shipped in minidnn/data (see minidnn.data.load_digits)."""
    from minidnn.data import load_digits as load
    return load()


def _accuracy(net, x, y):
    return float((net(x) == y).mean())


def cmd_demo(args):
    import os
    import tempfile
    import minidnn as dnn
    t_start = time.perf_counter()
    x, y = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(y))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    xtr, ytr, xte, yte = x[train], y[train], x[test], y[test]
    net = demo_net()
    print(f"8x8 handwritten digits (UCI, shipped in minidnn/data): {len(train)} for training, "
          f"{len(test)} held out\n")
    trainer = dnn.dnn_trainer(net, dnn.sgd(weight_decay=5e-4, momentum=0.9), seed=args.seed,
                              verbose=not args.quiet)
    trainer.learning_rate = 0.1
    trainer.min_learning_rate = 1e-4
    trainer.mini_batch_size = 32
    trainer.max_num_epochs = args.epochs
    trainer.iterations_without_progress_threshold = 150
    print(f"training a small CNN with batch-norm: {trainer}\n", flush=True)
    t0 = time.perf_counter()
    trainer.train(xtr, ytr)
    t_train = time.perf_counter() - t0
    print(f"\ntrained in {t_train:.1f} s ({trainer.get_train_one_step_calls()} mini-batches, "
          f"final learning rate {trainer.learning_rate:g}):\n")
    before = net.forward(xte)
    print(net)
    acc_before = _accuracy(net, xte, yte)
    xb = xte[:args.batch]
    t_unfused = _median_ms(net.forward, xb)
    print(f"\nheld-out accuracy: {acc_before:.2%} (training set {_accuracy(net, xtr, ytr):.2%})")
    dnn.fuse(net)
    after = net.forward(xte)
    acc_after = _accuracy(net, xte, yte)
    t_fused = _median_ms(net.forward, xb)
    print("\nafter dnn.fuse(net):\n")
    print(net)
    diff = float(np.abs(after - before).max())
    rel = diff / max(1.0, float(np.abs(before).max()))
    print(f"\nheld-out accuracy after fusing: {acc_after:.2%}")
    print(f"largest output difference fused vs unfused: {diff:.3g} ({rel:.2g} relative)")
    print(f"latency (median of 20, batch {len(xb)}): unfused {t_unfused:.3f} ms, "
          f"fused {t_fused:.3f} ms ({t_unfused / t_fused:.2f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits.dnn")
        dnn.serialize(net, path)
        size = os.path.getsize(path)
        loaded = dnn.deserialize(path)
        same = float(np.abs(loaded.forward(xte) - after).max())
        acc_loaded = _accuracy(loaded, xte, yte)
    print(f"saved with dnn.serialize: {size} bytes ({size / 1024:.1f} KiB); reloaded: held-out "
          f"accuracy {acc_loaded:.2%}, largest output difference {same:.3g}")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    if acc_after < 0.97 or same != 0.0:
        print("demo FAILED: expected >= 97% held-out accuracy and an exact reload", file=sys.stderr)
        return 1
    return 0


def _fail(cmd, path, e):
    """One line on stderr and exit status 1 (a bad file, an unreadable path, an unfusable net)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"minidnn {cmd}: error: {path}: {msg}", file=sys.stderr)
    return 1


def _param_summary(layer):
    parts = []
    for p in layer.params:
        a = getattr(layer, p)
        if a is not None:
            parts.append(f"{p} {'x'.join(str(d) for d in a.shape)}")
    for p in layer.state:
        a = getattr(layer, p)
        if a is not None:
            parts.append(f"{p} {'x'.join(str(d) for d in a.shape)}")
    if layer.is_input:
        shape = layer.input_shape()
        if shape is not None:
            parts.append(f"input {'x'.join(map(str, shape))} (K x R x C of the last input)")
        elif layer.k is not None:
            parts.append(f"input {layer.k} channels")
    return ", ".join(parts)


def _is_minidnn_file(path):
    """Whether ``path`` starts with minidnn's magic (else it is taken for a dlib file)."""
    from minidnn.serialize import MAGIC
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def cmd_info_dlib(args):
    """A dlib file's layers as dlib numbers them, each with its record and byte offset."""
    from minidnn import dlib as D
    from minidnn import dlib_zoo
    from minidnn.serialize import SerializationError
    try:
        entries, end, size = D.inspect_dlib(args.file)
        name = dlib_zoo.identify(args.file)
    except (SerializationError, OSError) as e:
        return _fail("info", args.file, e)
    rest = f"; bytes {end}..{size} follow it (not read)" if end < size else ""
    print(f"{args.file}: dlib network file (dlib's serialize(net)), {size} bytes, {len(entries)} "
          f"layers; the network ends at byte {end}{rest}")
    if name:
        print(f"recognised as minidnn.dlib_zoo.{name} (python -m minidnn convert {args.file} "
              f"OUT.dnn; python -m minidnn run {args.file} ...)")
    kinds = [e.rec.kind if e.rec is not None else "tag|skip" for e in entries]
    w = max(len(k) for k in kinds)
    tw = max(len(e.tag) for e in entries)
    for i, (e, k) in enumerate(zip(entries, kinds)):
        rep = f"  (repeat {e.repeat[0]}, block {e.repeat[1]} of {e.repeat[2]})" if e.repeat else ""
        text = (f"layer<{i}>".ljust(11) + k.ljust(w + 2) + f"[{e.tag}]".ljust(tw + 4) +
                f"@{e.record_offset}".ljust(11) + D.describe_entry(e) + rep)
        print(text.rstrip())
    return 0


def cmd_info(args):
    import minidnn as dnn
    from minidnn.serialize import SerializationError, load_with_info
    try:
        if not _is_minidnn_file(args.file):
            return cmd_info_dlib(args)
    except OSError as e:
        return _fail("info", args.file, e)
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


def _is_fused(net):
    """Whether fuse() would change nothing (the net is already fused)."""
    import minidnn as dnn
    probe = dnn.deserialize(dnn.serialize(net))
    before = dnn.serialize(probe)
    dnn.fuse(probe)
    return dnn.serialize(probe) == before


def cmd_bench(args):
    """Median latency of a saved net (or the demo's net), unfused vs fused, on a device."""
    import minidnn as dnn
    if args.file:
        try:
            net = dnn.deserialize(args.file)
        except (OSError, dnn.SerializationError) as e:
            return _fail("bench", args.file, e)
    else:
        net = demo_net()
    shape = args.shape
    if shape is None:
        shape = net.chain()[-1].layer_details().input_shape() if args.file else (1, 8, 8)
        if shape is None:
            print(f"minidnn bench: error: {args.file} does not say what input it takes (it never "
                  f"ran a forward before it was saved): give --shape K,R,C", file=sys.stderr)
            return 2
    x = np.random.default_rng(0).standard_normal((args.batch,) + tuple(shape)).astype(np.float32)
    try:
        net.forward(x)                                   # setup (parameters of a new net)
        fused_already = bool(args.file) and _is_fused(net)
        if args.device != "cpu":
            net.to(args.device)
        first = "as saved (already fused)" if fused_already else "unfused"
        rows = [(first, _median_ms(net.forward, x, args.repeat))]
        if not fused_already:
            dnn.fuse(net)
            if args.device != "cpu":
                net.to(args.device)
            rows.append(("fused", _median_ms(net.forward, x, args.repeat)))
    except (ValueError, RuntimeError, MemoryError, NotImplementedError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"minidnn bench: error: {msg}", file=sys.stderr)
        return 1
    print(f"{args.file or 'demo net'} on {args.device}, input {x.shape}, median of {args.repeat}:")
    for name, ms in rows:
        print(f"  {name:8s} {ms:9.3f} ms")
    if len(rows) == 2:
        print(f"  fused is {rows[0][1] / rows[1][1]:.2f}x the speed of unfused")
    return 0


def load_model(path, zoo=None):
    """A network from a file: minidnn's own format, or one of dlib's published models
    (minidnn.dlib_zoo: recognised from the file's records, or named by ``zoo``)."""
    import minidnn as dnn
    from minidnn import dlib_zoo
    if zoo is None and _is_minidnn_file(path):
        return dnn.deserialize(path)
    return dlib_zoo.load(path, zoo)


def cmd_convert(args):
    """A dlib model -> minidnn's format (or, for a .dat output, a minidnn file -> dlib's)."""
    import minidnn as dnn
    try:
        if _is_minidnn_file(args.input):
            net = dnn.deserialize(args.input)
        else:
            net = load_model(args.input, args.zoo)
    except (dnn.SerializationError, OSError, ValueError, NotImplementedError) as e:
        return _fail("convert", args.input, e)
    to_dlib = args.to == "dlib" or (args.to is None and args.output.lower().endswith(".dat"))
    try:
        if to_dlib:
            dnn.save_dlib(net, args.output)
        else:
            dnn.serialize(net, args.output)
    except (dnn.SerializationError, OSError) as e:
        return _fail("convert", args.output, e)
    print(f"converted {args.input} -> {args.output} ({'dlib' if to_dlib else 'minidnn'} format, "
          f"{len(net)} layers)")
    return 0


def dnn_serialize(net):
    import minidnn as dnn
    return dnn.serialize(net)


def cmd_run(args):
    """Run a net over images or .npy arrays, one JSON line per input (minidnn/run.py)."""
    from minidnn import run as runmod
    from minidnn.backends import cpu
    try:
        net = load_model(args.model, args.zoo)
        if args.zoo is None and _is_minidnn_file(args.model):
            with open(args.model, "rb") as f:
                model_bytes = f.read()
        else:                            # a dlib model: the Ray workers get minidnn's format
            model_bytes = dnn_serialize(net)
    except Exception as e:
        return _fail("run", args.model, e)
    paths = runmod.expand_inputs(args.inputs)
    if not paths:
        print("minidnn run: error: no inputs found", file=sys.stderr)
        return 2
    try:
        if args.ray is not None:
            from minidnn.ray_run import run_ray
            n, errors, seconds = run_ray(model_bytes, args.inputs, args.out,
                                         address=args.ray or None, workers=args.workers,
                                         cpus_per_worker=args.threads or 1,
                                         batch_size=args.batch, quiet=args.quiet)
        else:
            if args.threads:
                cpu.set_num_threads(args.threads)
            n, errors, seconds = runmod.run(net, args.inputs, args.out, batch_size=args.batch,
                                            quiet=args.quiet)
    except (RuntimeError, OSError) as e:
        print(f"minidnn run: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    skipped = len(paths) - n
    rate = n / seconds if seconds > 0 else float("inf")
    print(f"minidnn run: {n} inputs in {seconds:.2f} s ({rate:.1f} inputs/s), {errors} errors"
          + (f", {skipped} already in {args.out}" if skipped else "") + f"; results in {args.out}",
          file=sys.stderr)
    return 0


def main(argv=None):
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "python -m minidnn" if script in ("", "__main__.py", "-c") else script
    p = _Parser(prog=prog, description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="train a small batch-norm CNN on the 8x8 digits, fuse it, "
                                    "save and reload it")
    d.add_argument("--batch", type=_positive_int, default=16,
                   help="batch size of the latency measurement")
    d.add_argument("--epochs", type=_positive_int, default=20, help="training epochs")
    d.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and "
                                                         "the shuffling")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("info", help="print a saved network: layers, parameters, format and record "
                                    "versions (a dlib file: its records and their byte offsets)")
    i.add_argument("file")
    i.set_defaults(fn=cmd_info)
    f = sub.add_parser("fuse", help="load a saved network, fuse it (dnn.fuse), save the result")
    f.add_argument("input")
    f.add_argument("output")
    f.set_defaults(fn=cmd_fuse)
    c = sub.add_parser("convert", help="convert one of dlib's published models to minidnn's format "
                                       "(or, to a .dat output, a minidnn file to dlib's)")
    c.add_argument("input", help="a dlib model file (.dat, .dat.bz2) or a minidnn file")
    c.add_argument("output")
    c.add_argument("--zoo", default=None, metavar="NAME",
                   help="which minidnn.dlib_zoo model the dlib file is (default: recognised from "
                        "its records)")
    c.add_argument("--to", choices=("minidnn", "dlib"), default=None,
                   help="the output format (default: dlib for a .dat output, else minidnn)")
    c.set_defaults(fn=cmd_convert)
    b = sub.add_parser("bench", help="median latency of a saved network (or the demo's), "
                                     "unfused vs fused")
    b.add_argument("file", nargs="?", help="a saved network (default: the demo's 1x8x8 CNN)")
    b.add_argument("--shape", type=_shape3, default=None,
                   help="input K,R,C (default: the input shape stored in the file; 1,8,8 for the "
                        "demo net)")
    b.add_argument("--batch", type=_positive_int, default=1)
    b.add_argument("--repeat", type=_positive_int, default=50)
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.set_defaults(fn=cmd_bench)
    r = sub.add_parser("run", help="run a network over images or .npy arrays: one JSON line per "
                                   "input, resumable, optionally on a Ray cluster")
    r.add_argument("model", help="a saved network (minidnn's format, or one of dlib's published "
                                 "model files: see --zoo)")
    r.add_argument("--zoo", default=None, metavar="NAME",
                   help="for a dlib file: which minidnn.dlib_zoo model it is (default: recognised "
                        "from its records)")
    r.add_argument("inputs", nargs="+", help="image or .npy files, folders, glob patterns, or "
                                             ".txt lists of paths")
    r.add_argument("--out", required=True, help="the JSON-lines file (appended to; inputs already "
                                                "in it are skipped)")
    r.add_argument("--batch", type=_positive_int, default=16, help="inputs per batch (default 16)")
    r.add_argument("--threads", type=_positive_int, default=None,
                   help="kernel threads (per Ray worker with --ray)")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: a local cluster, or the one at ADDRESS (e.g. auto)")
    r.add_argument("--workers", type=_positive_int, default=2, help="Ray workers (default 2)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

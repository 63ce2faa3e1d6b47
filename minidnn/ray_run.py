"""The ``run`` command on a Ray cluster (``python -m minidnn run ... --ray [ADDRESS]``).

The inputs become a Ray Data dataset of paths; ``map_batches`` runs a callable class,
:class:`Predictor`, in a pool of actors: each loads the net once, from the file's
bytes (the net travels as its minidnn file: nothing is pickled but bytes and paths),
sets its kernels' thread count to the CPUs it was given, and turns a batch of paths
into the same JSON lines as a single-process run (minidnn/run.py's ``process``). The
driver appends them to the output file as they arrive, keeps the first line per
input (a batch retried after a worker died is not written twice), and when every
input has its line rewrites the file in input order: the same inputs give the same
file as ``python -m minidnn run`` without ``--ray``. Actors that die are restarted
and their batches retried (``max_restarts``, ``max_task_retries``).

Ray is an optional extra: ``pip install "minidnn[ray]"``. docs/SCALE.md says how to
point it at an existing cluster.
"""
import json
import os
import time

from . import run as _run


class Predictor:
    """A Ray Data callable class: one net per actor, batches of paths in, JSON lines out."""

    def __init__(self, model, threads=1, batch_size=16):
        import minidnn as dnn
        from minidnn.backends import cpu
        model = model if isinstance(model, (bytes, bytearray)) else _get(model)
        self.net = dnn.deserialize(model)
        cpu.set_num_threads(max(1, int(threads)))
        self.batch_size = batch_size

    def __call__(self, batch):
        import numpy as np
        paths = [str(p) for p in batch["input"]]
        _maybe_die(paths)
        lines = _run.process(self.net, paths, self.batch_size)
        return {"input": np.array([p for p, _, _ in lines], dtype=object),
                "line": np.array([line for _, line, _ in lines], dtype=object)}


def _get(ref):
    import ray
    return ray.get(ref)


def _maybe_die(paths):
    """Tests: MINIDNN_RAY_DIE_ON=path,marker makes the worker that meets ``path`` exit once
    (the marker file records that it did), as a killed worker would."""
    spec = os.environ.get("MINIDNN_RAY_DIE_ON")
    if not spec:
        return
    target, marker = spec.split(",", 1)
    if target in paths and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)


def run_ray(model_bytes, specs, out, address=None, workers=2, cpus_per_worker=1, batch_size=16,
            quiet=False, runtime_env=None):
    """Run the net of file bytes ``model_bytes`` over ``specs`` on Ray; returns (inputs run
    now, errors among them, seconds). ``address``: an existing cluster ("auto",
    "ray://host:10001" ...); None starts a local one."""
    try:
        import ray
    except ImportError:
        raise RuntimeError('--ray needs Ray: pip install "minidnn[ray]"') from None
    paths = _run.expand_inputs(specs)
    done = _run.done_inputs(out)
    todo = [p for p in paths if p not in done]
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {"num_cpus": max(workers * cpus_per_worker, 1)}
        if runtime_env:
            kw["runtime_env"] = runtime_env
        ray.init(log_to_driver=False, **kw)
        started = True
    t0 = time.perf_counter()
    n_err = 0
    try:
        if todo:
            ref = ray.put(bytes(model_bytes))
            ds = ray.data.from_items([{"input": p} for p in todo])
            ds = ds.map_batches(
                Predictor, batch_size=batch_size, batch_format="numpy",
                fn_constructor_kwargs={"model": ref, "threads": cpus_per_worker,
                                       "batch_size": batch_size},
                concurrency=workers, num_cpus=cpus_per_worker,
                max_restarts=-1, max_task_retries=-1)
            written = set(done)
            progress = _run._Progress(len(todo), quiet)
            with open(out, "a", encoding="utf-8") as f:
                for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
                    new = 0
                    for p, line in zip(b["input"], b["line"]):
                        if p in written:
                            continue
                        written.add(p)
                        n_err += json.loads(line).get("error") is not None
                        f.write(line + "\n")
                        new += 1
                    f.flush()
                    progress.update(new)
            progress.close()
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - t0
    _run.finish(out, paths)
    return len(todo), n_err, seconds

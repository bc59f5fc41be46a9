"""One benchmark process (or one rank under ``horovodrun``): builds wd-sok's own :class:`~wd_sok.train.Trainer`
in-process and times it, then prints one ``BENCH_RESULT {json}`` line (rank 0).

Modes (first argument):

``train [--scheme native|reference] [--breakdown] [--bytes] [--eval] -- <main.py flags>``
    ``Trainer(parse_config(flags))``; ``benchmark_train()`` (the ``--benchmark`` code path: live loader,
    ``benchmark_warmup_steps`` then ``benchmark_steps`` timed steps), then with ``--eval``
    ``benchmark_eval()``. ``--scheme reference`` swaps in :class:`ReferenceRuntime`: the reference's
    distribution scheme (Horovod ``DistributedGradientTape(sparse_as_dense=True)``: every embedding gradient
    converted to a dense tensor and allreduced with the MLP's, then a dense optimizer update of every table
    row), on the replicated backend. ``--breakdown`` times the parts of a step separately (see
    :func:`breakdown`). ``--bytes`` counts the bytes each rank sends per step (see :func:`bytes_per_step`).
    Every rank reports peak RSS and embedding bytes held.

``matmul --batch_sizes B.. --dims IN H1 .. 1 [--dtype float32|bfloat16]``
    The compute bound: GFLOP/s of ``tf.matmul`` on exactly the MLP's GEMMs, forward and backward (per layer
    Y = X W, dX = dY W^T, dW = X^T dY).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def emit(payload: dict[str, Any]) -> None:
    print("BENCH_RESULT " + json.dumps(payload, default=float), flush=True)


# ----------------------------------------------------------------------------- the reference scheme
def reference_runtime_class() -> type:
    """:class:`~wd_sok.distributed.Runtime` whose gradient allreduce is the reference's.

    Horovod's ``_make_cached_allreduce_grads_fn`` with ``sparse_as_dense=True`` does
    ``tf.convert_to_tensor`` on every ``IndexedSlices`` gradient *whatever the world size*, then allreduces
    all gradients (grouped). On one rank the allreduce is the identity but the dense conversion, and hence
    the optimizer's dense update of every row of every table (and its slots), still happen, as in the
    reference on one GPU. Used with the replicated backend (no ``sparse_variables``), so the train step
    hands it every gradient.
    """
    import tensorflow as tf

    from wd_sok.distributed import Runtime

    class ReferenceRuntime(Runtime):
        def allreduce_grads(self, grads: list) -> list:
            dense = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
            if self.size == 1:
                return dense
            return list(self.hvd.grouped_allreduce(dense, op=self.hvd.Sum))

    return ReferenceRuntime


# ----------------------------------------------------------------------------- train mode
def run_train(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="worker.py train")
    p.add_argument("--scheme", choices=("native", "reference"), default="native")
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--breakdown_steps", type=int, default=5)
    p.add_argument("--bytes", action="store_true")
    p.add_argument("--eval", action="store_true")
    p.add_argument("--tag", default="")
    p.add_argument("--paired_matmul", action="store_true", help="right after the timed steps, time the MLP's "
                   "GEMMs (fwd + bwd) at the local batch in this process (float32, bfloat16 with --amp): a "
                   "compute bound measured under the same machine load")
    p.add_argument("--interleaved", type=int, default=0, metavar="R",
                   help="after the benchmark, R rounds of [live train step, train step on a batch already in "
                   "memory, the MLP's GEMMs (fwd + bwd) at the local batch]: per-round ratios under the same load")
    p.add_argument("--held_steps", type=int, default=0, metavar="N",
                   help="after the timed steps, also time N training steps on batches held in memory (no loader: "
                        "compute and exchange only); reports held_step_s (median) and held_step_s_all")
    p.add_argument("--tracking_overhead", type=int, default=0, metavar="R",
                   help="after the timed steps, time the step with and without the change tracking (issue 23) in R "
                        "alternating blocks of 5 steps on batches held in memory; reports tracking")
    p.add_argument("--no_loader_fix", action="store_true", help="run Merlin's loader queue with its own 1 us "
                   "put timeout (a thread spinning on the full queue), as before wd_sok.data.merlin_compat")
    if "--" not in argv:
        raise SystemExit("worker.py train: give main.py flags after --")
    cut = argv.index("--")
    args, flags = p.parse_args(argv[:cut]), argv[cut + 1:]

    import tensorflow as tf

    from wd_sok.config import parse_config
    from wd_sok.distributed import Runtime
    from wd_sok.train import Trainer

    cfg = parse_config(flags)
    tf.config.set_visible_devices([], "GPU")
    if args.no_loader_fix:
        from wd_sok.data import merlin_compat

        merlin_compat.PUT_WAIT_S = 0.0  # max(Merlin's 1e-6, 0): the original busy wait
    rt = reference_runtime_class()() if args.scheme == "reference" else Runtime()
    if args.scheme == "reference" and cfg.embedding_backend != "replicated":
        raise SystemExit("--scheme reference needs --embedding_backend replicated")
    rss0 = common.current_rss_bytes()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, rt)
    build_s = time.perf_counter() - t0
    emb_bytes = int(trainer.model.wide_embedding.local_bytes() + trainer.model.deep_embedding.local_bytes())
    out: dict[str, Any] = {"tag": args.tag, "scheme": args.scheme, "backend": trainer.backend, "ranks": rt.size,
                           "global_batch": cfg.global_batch_size, "build_s": build_s,
                           "parameters": trainer.parameter_count(), "xla": cfg.xla, "amp": cfg.amp,
                           "rmsprop_update": cfg.rmsprop_update, "loader_fix": not args.no_loader_fix}
    lo0 = loopback_bytes()
    t0 = time.perf_counter()
    out["train_samples_per_s"] = trainer.benchmark_train()
    train_s = time.perf_counter() - t0
    lo1 = loopback_bytes()
    steps = cfg.benchmark_warmup_steps + cfg.benchmark_steps
    # median of the timed steps (a slow step, e.g. an epoch's first batch, cannot move it); the window's mean too
    out["step_s"] = common.median(trainer.benchmark_step_s)
    out["step_s_mean"] = cfg.global_batch_size / out["train_samples_per_s"]
    out["step_s_all"] = trainer.benchmark_step_s
    if lo0 is not None and lo1 is not None and rt.size > 1:
        # system-wide loopback counter (all ranks, and anything else on the machine): an upper bound
        out["loopback_bytes_per_step_all_ranks"] = (lo1 - lo0) / steps
        out["loopback_window_s"] = train_s
    if args.held_steps:
        out.update(held_steps(trainer, args.held_steps))
    if args.tracking_overhead:
        out["tracking"] = tracking_overhead(trainer, args.tracking_overhead)
    if args.paired_matmul:
        dims, layers = mlp_layers(trainer.model)
        secs, _ = gemm_seconds(trainer.local_batch, layers, "bfloat16" if cfg.amp else "float32")
        flops = 3 * 2 * sum(i * o for i, o in layers)
        out["paired_matmul"] = {"dims": dims, "dtype": "bfloat16" if cfg.amp else "float32", "seconds": secs,
                                "gflops": flops * trainer.local_batch / secs / 1e9,
                                "bound_samples_per_s": trainer.local_batch / secs}
    if args.eval:
        out["eval_samples_per_s"] = trainer.benchmark_eval()
    if args.interleaved:
        out["interleaved"] = interleaved(trainer, args.interleaved)
    out["probe_loss"] = probe_loss(trainer, rt)
    if args.bytes:
        out["bytes"] = bytes_per_step(trainer, rt, args.scheme)
    if args.breakdown:
        out["breakdown"] = breakdown(trainer, args.breakdown_steps)
    per_rank = np.array([common.peak_rss_bytes(), emb_bytes, rss0], np.float64)
    gathered = (np.array(rt.allgather_object(per_rank.tolist(), "bench_rank_facts")) if rt.size > 1
                else per_rank[None, :])
    out["peak_rss_bytes_per_rank"] = [int(x) for x in gathered[:, 0]]
    out["embedding_bytes_per_rank"] = [int(x) for x in gathered[:, 1]]
    out["rss_before_build_bytes_per_rank"] = [int(x) for x in gathered[:, 2]]
    out["embedding_bytes_total"] = int(sum(t.cardinality * t.dim * 4 for e in (
        trainer.model.wide_embedding, trainer.model.deep_embedding) for t in e.tables.values()))
    if rt.is_chief:
        emit(out)


def mlp_layers(model: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """The MLP's widths [input, hidden..., 1] and its layers' (in, out) pairs: the GEMMs a step runs."""
    dims = [int(model.hidden[0].kernel.shape[0])] + [int(d.units) for d in model.hidden] + [1]
    return dims, list(zip(dims[:-1], dims[1:], strict=True))


def _held_batches(trainer: Any, epoch: int, n: int) -> list[Any]:
    """The first ``n`` training batches of epoch ``epoch``, held in memory (Merlin's loader thread stopped)."""
    trainer.train_data.set_epoch(epoch)
    batches = [b for _, b in zip(range(n), trainer.train_data, strict=False)]
    trainer.train_data._loader.stop()  # noqa: SLF001 - end Merlin's thread after a partial epoch
    return batches


def held_steps(trainer: Any, n: int, held: int = 4, warmup: int = 3) -> dict[str, Any]:
    """``n`` training steps on ``held`` batches held in memory (cycled), each followed by the MLP's GEMMs
    (forward and backward at the local batch, float32) as a yardstick, after ``warmup`` untimed rounds.

    Without the loader (whose epoch starts and share of 2 cores make live step times vary 2x within a job),
    and divided by the yardstick timed right after it (this machine's speed drifts by a third over minutes),
    the step time of a job is reproduced across processes where the raw one is not. Every rank runs the same
    steps (the exchange is collective). Returns ``held_step_s_all`` [n], ``yardstick_s_all`` [n],
    ``held_step_s`` (median) and ``held_step_rel`` (median of step / yardstick).
    """
    import tensorflow as tf

    yardstick = _gemm_fn(trainer.local_batch, mlp_layers(trainer.model)[1], "float32")
    batches = _held_batches(trainer, 5, held)
    step, times, yard = trainer.global_step, [], []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        trainer.train_step(batches[i % len(batches)], tf.constant(step + i, tf.int64)).numpy()
        t_step, t_yard = time.perf_counter() - t0, yardstick()
        if i >= warmup:
            times.append(t_step)
            yard.append(t_yard)
    return {"held_step_s_all": times, "yardstick_s_all": yard, "held_step_s": common.median(times),
            "held_step_rel": common.median(t / y for t, y in zip(times, yard, strict=True))}


def tracking_overhead(trainer: Any, reps: int, block: int = 5, held: int = 4) -> dict[str, Any]:
    """The change tracking's cost on the train step (issue 23): the trainer's step (it marks the rows each
    sparse update changes, :mod:`wd_sok.changes`) vs the same step traced with the marking replaced by a
    no-op, on ``held`` batches held in memory, in ``reps`` alternating blocks of ``block`` steps each (so both
    see the same machine speed); every rank runs the same steps. Returns per-step seconds of both,
    ``overhead`` = median(tracked) / median(untracked) - 1, and ``marking_s`` (:func:`_marking_alone`) with
    ``marking_bound`` = marking_s / median(untracked)."""
    import tensorflow as tf

    from wd_sok import changes, steps

    batches = _held_batches(trainer, 6, held)
    count = trainer.global_step

    def run(step_fn: Any, n: int) -> list[float]:
        nonlocal count
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step_fn(batches[count % len(batches)], tf.constant(count, tf.int64)).numpy()
            times.append(time.perf_counter() - t0)
            count += 1
        return times

    mark_s = _marking_alone(trainer, batches[0])
    tracked = trainer.train_step
    original = changes.mark_applied
    changes.mark_applied = lambda *a, **k: []  # traced into the untracked step only (first call traces)
    try:
        untracked = steps.make_train_step(trainer.model, trainer.wide_opt, trainer.deep_opt, trainer.rt,
                                          trainer.cfg.global_batch_size, loss_scaling=trainer.compute == "float16")
        run(untracked, 3)
    finally:
        changes.mark_applied = original
    run(tracked, 3)
    on, off = [], []
    for _ in range(reps):
        on += run(tracked, block)
        off += run(untracked, block)
    return {"tracked_step_s_all": on, "untracked_step_s_all": off, "tracked_step_s": common.median(on),
            "untracked_step_s": common.median(off), "overhead": common.median(on) / common.median(off) - 1,
            "marking_s": mark_s, "marking_bound": mark_s / common.median(off)}


def _marking_alone(trainer: Any, batch: Any, calls: int = 50) -> float:
    """Seconds (median of ``calls``) of the marking ops alone, compiled as the step compiles them: every
    change mask of this rank marks as many random rows as the global batch has ids in its largest feature
    (with one feature per table, as in the ladder, at least as many as any table's shard receives, before
    dedup: an upper bound on what the tracked step adds, which needs no difference of two noisy step
    times)."""
    import tensorflow as tf

    from wd_sok import changes

    variables = [v for v in trainer.model.trainable_variables if changes.has_mask(v)]
    ids = max(int(tf.size(t.flat_values if isinstance(t, tf.RaggedTensor) else t))
              for t in batch.categorical.values()) * trainer.rt.size
    rows = [tf.random.uniform([ids], 0, int(v.shape[0]), tf.int64, seed=k) for k, v in enumerate(variables)]

    @tf.function
    def mark() -> tf.Tensor:
        with tf.control_dependencies([changes.mark_rows(v, r) for v, r in zip(variables, rows, strict=True)]):
            return tf.constant(0)

    times = []
    for _ in range(calls + 3):
        t0 = time.perf_counter()
        mark().numpy()
        times.append(time.perf_counter() - t0)
    return common.median(times[3:])


def interleaved(trainer: Any, rounds: int) -> dict[str, Any]:
    """Step time vs the GEMM bound measured in alternation, so that both see the same machine load.

    Round i: (1) one training step on the next batch of the live loader (what ``benchmark_train`` times),
    (2) one training step on a batch held in memory (compute only), (3) the MLP's GEMMs forward and backward
    at the local batch (the bound; float32, or bfloat16 with --amp). Reports per-round ratios' medians:
    ``fraction_live`` = t_gemm / t_live (the fraction of the bound that training achieves) and
    ``fraction_compute`` = t_gemm / t_prefetched (the same without the loader).
    """
    import tensorflow as tf

    cfg = trainer.cfg
    _, layers = mlp_layers(trainer.model)
    dtype = "bfloat16" if cfg.amp else "float32"
    gemm_one = _gemm_fn(trainer.local_batch, layers, dtype)
    trainer.train_data.set_epoch(7)
    it = iter(trainer.train_data)
    held = next(it)
    step = trainer.global_step

    def run(batch: Any) -> float:
        nonlocal step
        t0 = time.perf_counter()
        trainer.train_step(batch, tf.constant(step, tf.int64)).numpy()
        step += 1
        return time.perf_counter() - t0

    live, pre, gemm = [], [], []
    for i in range(rounds + 2):
        batch = next(it, None)
        if batch is None:
            trainer.train_data.set_epoch(8 + i)
            it = iter(trainer.train_data)
            batch = next(it)
        t_live, t_pre, t_gemm = run(batch), run(held), gemm_one()
        if i >= 2:  # two warm-up rounds
            live.append(t_live)
            pre.append(t_pre)
            gemm.append(t_gemm)
    trainer.train_data._loader.stop()  # noqa: SLF001
    flops = 3 * 2 * sum(a * b for a, b in layers) * trainer.local_batch
    return {"rounds": rounds, "dtype": dtype, "t_live_s": live, "t_prefetched_s": pre, "t_gemm_s": gemm,
            "fraction_live": common.median(g / t for g, t in zip(gemm, live, strict=True)),
            "fraction_compute": common.median(g / t for g, t in zip(gemm, pre, strict=True)),
            "gemm_gflops": flops / common.median(gemm) / 1e9}


def _gemm_fn(batch: int, layers: list[tuple[int, int]], dtype: str) -> Any:
    """A callable timing one pass of the MLP's GEMMs (fwd + bwd) at ``batch`` rows; returns seconds."""
    import tensorflow as tf

    dt = tf.dtypes.as_dtype(dtype)
    ws = [tf.cast(tf.random.normal([i, o]), dt) for i, o in layers]
    xs = [tf.cast(tf.random.normal([batch, i]), dt) for i, _ in layers]
    dys = [tf.cast(tf.random.normal([batch, o]), dt) for _, o in layers]

    @tf.function
    def gemms() -> list:
        out = []
        for w, x, dy in zip(ws, xs, dys, strict=True):
            out += [tf.matmul(x, w), tf.matmul(dy, w, transpose_b=True), tf.matmul(x, dy, transpose_a=True)]
        return out

    [t.numpy() for t in gemms()]  # noqa: B018 - trace and warm

    def once() -> float:
        t0 = time.perf_counter()
        [t.numpy() for t in gemms()]  # noqa: B018
        return time.perf_counter() - t0

    return once


def probe_loss(trainer: Any, rt: Any) -> float:
    """Mean BCE of the model on each rank's first test batch (summed over ranks): a fingerprint of the
    trained weights, equal across distribution schemes that compute the same updates."""
    batch = next(iter(trainer.eval_data))
    trainer.eval_data._loader.stop()  # noqa: SLF001
    probs = trainer.eval_step(batch).numpy().astype(np.float64)
    labels = batch.label.numpy()
    probs = np.clip(probs, 1e-7, 1 - 1e-7)
    bce = -(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
    s = rt.sum_host(np.array([bce.sum(), bce.size]), "probe_loss")
    return float(s[0] / max(s[1], 1))


def loopback_bytes() -> int | None:
    """Bytes transmitted on the loopback interface so far (system-wide), from /proc/net/dev."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    except OSError:
        return None
    return None


def bytes_per_step(trainer: Any, rt: Any, scheme: str, batches: int = 8) -> dict[str, Any]:
    """Bytes one rank sends per training step, counted analytically from the ids of real batches.

    * ``sharded`` (``wd_sok.embedding.sharded``: distinct ids per table travel once): per collection (wide:
      dim 1, deep: dims per table), the batch's *distinct* ids of each table whose owner ``g % N`` is another
      rank are sent as int64 keys (8 B); each comes back as a float32 vector (4 B x dim) forward, and its
      gradient (summed over the id's occurrences) goes back to the owner (4 B x dim) backward. The vectors a
      rank answers are counted as the ones it asks for (the same on average over ranks). The MLP and the
      other dense weights are allreduced: ring allreduce sends ``2 (N - 1) / N x 4 B x params`` per rank.
      ``before_dedup`` is the same count over every occurrence (the exchange before ids were deduplicated);
      ``dedup_ratio`` = total bytes after / before.
    * ``reference`` (and ``replicated`` with Horovod's IndexedSlices allgather, not counted here): every
      gradient, whole tables included, is allreduced densely: ``2 (N - 1) / N x 4 B x all parameters``.
    Averages over ``batches`` batches of this rank's training data; on one rank everything is 0.
    """
    n = rt.size
    model = trainer.model
    all_params = sum(int(np.prod(v.shape)) for v in model.wide_variables + model.deep_variables)
    dense_params = sum(int(np.prod(v.shape)) for v in model.dense_variables)  # replicated: tables included
    ring = 2.0 * (n - 1) / n * 4
    if scheme == "reference":
        return {"formula": "ring allreduce of every gradient, whole tables included: 2(N-1)/N * 4 B * params",
                "allreduce_bytes": ring * all_params, "alltoall_bytes": 0.0, "total_bytes": ring * all_params}
    plan = getattr(trainer, "plan", None)
    if trainer.backend == "sharded" and plan is not None and any(
            p.kind != "row_wise" for p in plan.placements().values()):
        mlp = sum(int(np.prod(v.shape)) for v in model.named_dense_variables().values())
        projected = max(plan.sent_per_rank())
        return {"formula": "the planner's projection (wd_sok.embedding.plan: exchange of distinct ids, table "
                           "gradients) + ring allreduce 2(N-1)/N * 4 B * MLP and wide dense params",
                "alltoall_bytes": projected, "allreduce_bytes": ring * mlp, "total_bytes": projected + ring * mlp}
    if trainer.backend != "sharded":
        return {"formula": "dense allreduce only (tables' IndexedSlices allgather not counted)",
                "allreduce_bytes": ring * dense_params, "alltoall_bytes": 0.0,
                "total_bytes": ring * dense_params}
    # [occurrences, distinct] remote ids and remote vector floats (1 + deep dim per id)
    remote_ids, remote_floats = np.zeros(2), np.zeros(2)
    seen = 0
    trainer.train_data.set_epoch(0)
    for batch in trainer.train_data:
        for name, ids in batch.categorical.items():
            flat = np.asarray(ids.flat_values if hasattr(ids, "flat_values") else ids).astype(np.int64)
            remote = np.array([np.sum(flat % n != rt.rank), np.sum(np.unique(flat) % n != rt.rank)], float)
            remote_ids += remote
            remote_floats += remote * (1 + model.deep_embedding.tables[name].dim)
        seen += 1
        if seen >= batches:
            break
    trainer.train_data._loader.stop()  # noqa: SLF001 - end Merlin's thread after a partial epoch
    seen = max(seen, 1)
    remote_ids /= seen
    remote_floats /= seen
    # keys of wide + deep, vectors forward + gradients backward
    alltoall = 2 * remote_ids * 8 + 2 * remote_floats * 4
    allreduce = ring * dense_params
    before = {"remote_ids_per_step": remote_ids[0], "alltoall_bytes": alltoall[0],
              "total_bytes": alltoall[0] + allreduce}
    return {"formula": "alltoall: distinct remote ids per table * 8 B (wide + deep) + 2 * their vectors * 4 B "
                       "* dim; plus ring allreduce 2(N-1)/N * 4 B * dense params",
            "remote_ids_per_step": remote_ids[1], "alltoall_bytes": alltoall[1], "allreduce_bytes": allreduce,
            "total_bytes": alltoall[1] + allreduce, "before_dedup": before,
            "dedup_ratio": (alltoall[1] + allreduce) / before["total_bytes"] if before["total_bytes"] else 1.0,
            "batches": seen}


# ----------------------------------------------------------------------------- where the time goes
def breakdown(trainer: Any, steps: int) -> dict[str, float]:
    """Seconds per step of the parts of a training step, each timed alone (median of ``steps`` runs).

    ``loader``: next batch from the live DataLoader. ``step``: the compiled train step on batches already
    in memory (no loader). ``forward``: loss only. ``grads``: forward + backward, no optimizer, no
    allreduce. ``apply_embedding`` / ``apply_dense``: the two optimizers' updates of the embedding tables
    (legacy FTRL on wide tables, legacy RMSprop on deep ones, sparse IndexedSlices updates) and of the MLP
    and other dense weights. ``mlp_fwd_bwd``: the MLP (with dropout, as trained) forward + backward on a
    random input of the same shape; ``mlp_fwd_bwd_no_dropout``: the same at rate 0; ``embedding_fwd_bwd``:
    the wide and deep lookups and their gradients.
    """
    import tensorflow as tf

    from wd_sok.steps import _apply

    model, cfg = trainer.model, trainer.cfg
    wide_vars, deep_vars = model.wide_variables, model.deep_variables
    variables = wide_vars + deep_vars
    emb_vars = list(model.wide_embedding.trainable_variables) + list(model.deep_embedding.trainable_variables)
    emb_ids = {id(v) for v in emb_vars}
    mlp_vars = [v for layer in model.hidden + [model.head] for v in layer.trainable_variables]
    gb = float(cfg.global_batch_size)

    trainer.train_data.set_epoch(1)
    it = iter(trainer.train_data)
    batches, loader_t = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        batches.append(next(it))
        loader_t.append(time.perf_counter() - t0)
    trainer.train_data._loader.stop()  # noqa: SLF001
    loader_t = loader_t[1:]  # the first includes Merlin's thread start

    def timed(call: Any) -> float:
        """Median seconds of ``call(i)`` (results fetched) over ``steps`` calls after one warm-up call."""
        tf.nest.map_structure(_fetch, call(0))
        ts = []
        for i in range(steps):
            t0 = time.perf_counter()
            tf.nest.map_structure(_fetch, call(i))
            ts.append(time.perf_counter() - t0)
        return common.median(ts)

    def loss_of(batch: Any, step: tf.Tensor) -> tf.Tensor:
        logits = model(batch, training=True, step=step)
        return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=batch.label, logits=logits)) / gb

    def norm(g: Any) -> tf.Tensor:
        return tf.reduce_sum(g.values if isinstance(g, tf.IndexedSlices) else g)

    @tf.function(reduce_retracing=True)
    def forward(batch: Any) -> tf.Tensor:
        return loss_of(batch, tf.constant(1, tf.int64))

    @tf.function(reduce_retracing=True)
    def grads_only(batch: Any) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_of(batch, tf.constant(1, tf.int64))
        grads = tape.gradient(loss, variables)
        return tf.add_n([norm(g) for g in grads if g is not None])

    @tf.function(reduce_retracing=True)
    def grads_list(batch: Any) -> list:
        with tf.GradientTape() as tape:
            loss = loss_of(batch, tf.constant(1, tf.int64))
        return tape.gradient(loss, variables)

    @tf.function(reduce_retracing=True)
    def embedding_fwd_bwd(batch: Any) -> tf.Tensor:
        ids = {name: batch.categorical[name] for name in model.categorical}
        with tf.GradientTape() as tape:
            w, d = model.wide_embedding(ids), model.deep_embedding(ids)
            s = tf.add_n([tf.reduce_sum(v) for v in list(w.values()) + list(d.values())])
        return tf.add_n([norm(g) for g in tape.gradient(s, emb_vars)])

    in_dim = int(model.hidden[0].kernel.shape[0])
    x = tf.random.normal([trainer.local_batch, in_dim])

    def mlp(rate: float) -> Any:
        @tf.function(reduce_retracing=True)
        def fn(x: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tf.reduce_sum(model._mlp(x, tf.constant(1, tf.int64), rate))  # noqa: SLF001
            return tf.add_n([norm(g) for g in tape.gradient(y, [x] + mlp_vars)])
        return fn

    grads = grads_list(batches[0])
    emb_grads = [g if id(v) in emb_ids else None for g, v in zip(grads, variables, strict=True)]
    dense_grads = [None if id(v) in emb_ids else g for g, v in zip(grads, variables, strict=True)]

    @tf.function(reduce_retracing=True)
    def apply(gs: list) -> tf.Tensor:
        _apply(trainer.wide_opt, trainer.deep_opt, gs, wide_vars, deep_vars, model)
        return tf.constant(0)

    eval_step = tf.function(lambda b: tf.sigmoid(model(b, training=False)), reduce_retracing=True)
    mlp_drop, mlp_plain = mlp(cfg.deep_dropout), mlp(0.0)

    def batch(i: int) -> Any:
        return batches[1 + i % steps]

    out = {
        "loader": common.median(loader_t),
        "step_prefetched": timed(lambda i: trainer.train_step(batch(i), tf.constant(trainer.global_step,
                                                                                    tf.int64))),
        "forward": timed(lambda i: forward(batch(i))),
        "grads": timed(lambda i: grads_only(batch(i))),
        "embedding_fwd_bwd": timed(lambda i: embedding_fwd_bwd(batch(i))),
        "mlp_fwd_bwd": timed(lambda i: mlp_drop(x)),
        "mlp_fwd_bwd_no_dropout": timed(lambda i: mlp_plain(x)),
        "apply_embedding": timed(lambda i: apply(emb_grads)),
        "apply_dense": timed(lambda i: apply(dense_grads)),
        "eval_forward": timed(lambda i: eval_step(batch(i))),
    }
    out["apply_total_by_difference"] = out["step_prefetched"] - out["grads"]
    return out


def _fetch(t: Any) -> Any:
    return t.numpy() if hasattr(t, "numpy") else t


# ----------------------------------------------------------------------------- matmul mode
def gemm_seconds(batch: int, layers: list[tuple[int, int]], dtype: str, iters: int = 5, xla: bool = False
                 ) -> tuple[float, list[float]]:
    """Median seconds (and the samples) of the MLP's GEMMs, forward and backward, at ``batch`` rows."""
    import tensorflow as tf

    dt = tf.dtypes.as_dtype(dtype)
    ws = [tf.cast(tf.random.normal([i, o]), dt) for i, o in layers]
    xs = [tf.cast(tf.random.normal([batch, i]), dt) for i, _ in layers]
    dys = [tf.cast(tf.random.normal([batch, o]), dt) for _, o in layers]

    @tf.function(jit_compile=xla)
    def gemms(ws: list, xs: list, dys: list) -> list:
        out = []
        for w, x, dy in zip(ws, xs, dys, strict=True):
            out.append(tf.matmul(x, w))                       # forward
            out.append(tf.matmul(dy, w, transpose_b=True))    # d input
            out.append(tf.matmul(x, dy, transpose_a=True))    # d weight
        return out

    gemms(ws, xs, dys)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        [t.numpy() for t in gemms(ws, xs, dys)]  # noqa: B018 - wait for the results
        ts.append(time.perf_counter() - t0)
    return common.median(ts), ts


def run_matmul(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="worker.py matmul")
    p.add_argument("--batch_sizes", type=int, nargs="+", required=True)
    p.add_argument("--dims", type=int, nargs="+", required=True, help="input width, hidden widths, output")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--xla", action="store_true")
    args = p.parse_args(argv)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    layers = list(zip(args.dims[:-1], args.dims[1:], strict=True))
    flops_per_sample = 3 * 2 * sum(i * o for i, o in layers)
    results = []
    for b in args.batch_sizes:
        t, ts = gemm_seconds(b, layers, args.dtype, args.iters, args.xla)
        results.append({"batch": b, "seconds": t, "samples": ts, "gflops": flops_per_sample * b / t / 1e9,
                        "bound_samples_per_s": b / t})
    emit({"mode": "matmul", "dtype": args.dtype, "xla": args.xla, "dims": args.dims,
          "flops_per_sample_fwd_bwd": flops_per_sample, "results": results})


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "matmul"):
        raise SystemExit(__doc__)
    {"train": run_train, "matmul": run_matmul}[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

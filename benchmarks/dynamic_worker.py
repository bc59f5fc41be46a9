"""Ranks of benchmarks/dynamic_tables.py (run under ``horovodrun --gloo``); rank 0 prints ``BENCH_RESULT {json}``.

``step``: the Wide & Deep train step (``wd_sok.steps.make_train_step``) on in-memory batches: ``--tables``
one-hot features of ``--rows`` rows (deep width ``--dim``, wide width 1), 4 numerics, MLP 256-256, Zipf ids
(a = 1.2) below ``--rows``; ``--kind fixed`` (the sharded backend) or ``dynamic`` (hash tables of capacity
``--rows``, min_count 1, LRU; the same ids). Median step time over ``--steps`` steps after ``--warmup``.

``keys``: one dynamic table (capacity ``--capacity``, width ``--dim``, lazy RMSprop) trained alone (loss
``sum(v * w)``) on batches of ``--batch`` ids per rank: a ``1 - --fresh`` share drawn Zipf from 1e5 head ids
(repeated, so they keep rows), the rest never seen before (raw ids ``2**40 + (step * N + rank) * B + i``), so
every step inserts ~``N * B * fresh`` distinct keys (after ``--warmup`` steps on head ids only, which
insert none of them). At each milestone of distinct keys inserted (over all
ranks) it records the median step time of the next ``--window`` steps, VmRSS, rows in use and pending keys; it stops
after the last milestone or when VmRSS passes ``--max_rss_gb`` (memory ends).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import current_rss_bytes  # noqa: E402
from wd_sok.data.batch import Batch  # noqa: E402
from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.embedding import make_embedding  # noqa: E402
from wd_sok.embedding.dynamic import DynamicEmbedding  # noqa: E402
from wd_sok.feature_spec import DynamicConfig, TableConfig  # noqa: E402
from wd_sok.model import WideDeepModel  # noqa: E402
from wd_sok.optim import LazyRMSprop  # noqa: E402
from wd_sok.steps import make_train_step  # noqa: E402


def step_job(args: argparse.Namespace, rt: Runtime) -> dict:
    dyn = DynamicConfig(args.rows, 1, "lru") if args.kind == "dynamic" else None
    names = [f"c{i}" for i in range(args.tables)]

    def tables(dim: int) -> list[TableConfig]:
        return [TableConfig(n, args.rows, dim, dynamic=dyn) for n in names]

    model = WideDeepModel(names, 4, make_embedding("sharded", tables(1), "zeros", 0, "wide", rt),
                          make_embedding("sharded", tables(args.dim), "glorot_normal", 0, "deep", rt),
                          [256, 256], 0.0, rank=rt.rank)
    wide_opt, deep_opt = tf.keras.optimizers.legacy.Ftrl(0.1), LazyRMSprop(1e-3, rho=0.5)
    model.wide_embedding.attach_optimizer(wide_opt)
    model.deep_embedding.attach_optimizer(deep_opt)
    local = args.batch // rt.size
    rng = np.random.default_rng([1, rt.rank])
    batches = []
    for _ in range(8):
        ids = {n: tf.constant(np.minimum(rng.zipf(1.2, local) - 1, args.rows - 1).astype(np.int64)) for n in names}
        batches.append(Batch(tf.constant(rng.normal(size=(local, 4)), tf.float32), ids,
                             tf.constant(rng.integers(0, 2, local), tf.float32)))
    model(batches[0], training=False)
    step = make_train_step(model, wide_opt, deep_opt, rt, args.batch)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step(batches[i % len(batches)], tf.constant(i, tf.int64)).numpy()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times = rt.sum_host(np.array(times), "times") / rt.size  # mean over ranks, per step
    return {"kind": args.kind, "rows": args.rows, "tables": args.tables, "dim": args.dim, "batch": args.batch,
            "ranks": rt.size, "step_ms": [1e3 * t for t in times], "median_ms": 1e3 * float(np.median(times)),
            "counters": {k: v.tolist() for k, v in model.deep_embedding.counters().items()}}


def keys_job(args: argparse.Namespace, rt: Runtime) -> dict:
    table = TableConfig("k", args.capacity, args.dim, dynamic=DynamicConfig(args.capacity, args.min_count, "lru"))
    emb = DynamicEmbedding([table], "glorot_normal", 0, "deep", rt)
    opt = LazyRMSprop(1e-3, rho=0.5)
    emb.attach_optimizer(opt)
    var = emb.shards["k"]

    @tf.function
    def step(ids: tf.Tensor, w: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(emb({"k": ids}, training=True)["k"] * w)
        opt.apply_gradients([(tape.gradient(loss, var), var)])

    b, n_head = args.batch, int(args.batch * (1 - args.fresh))
    rng = np.random.default_rng([2, rt.rank])
    w = tf.constant(rng.normal(size=(b, args.dim)), tf.float32)
    milestones = sorted(int(float(m)) for m in args.milestones.split(","))
    per_step = rt.size * (b - n_head)
    for _ in range(args.warmup):  # trace and warm up on head ids only: nothing new is inserted
        step(tf.constant(np.minimum(rng.zipf(1.2, b), 100_000).astype(np.int64)), w)
    out, inserted, s, base_rss = [], 0, 0, current_rss_bytes()
    while milestones:
        head = np.minimum(rng.zipf(1.2, n_head), 100_000).astype(np.int64)
        fresh = 2**40 + (s * rt.size + rt.rank) * b + np.arange(b - n_head, dtype=np.int64)
        ids = tf.constant(np.concatenate([head, fresh]))
        t0 = time.perf_counter()
        step(ids, w)
        dt = time.perf_counter() - t0
        s, inserted = s + 1, inserted + per_step
        if out and out[-1]["pending_steps"] > 0:
            out[-1]["step_ms"].append(1e3 * dt)
            out[-1]["pending_steps"] -= 1
        elif inserted >= milestones[0]:
            rss = rt.max_int(current_rss_bytes(), "rss")
            pending = rt.sum_host(np.array([emb.pending["k"].size().numpy() if "k" in emb.pending else 0,
                                            emb.keyed_count("k")]), "sizes")
            out.append({"keys_inserted": inserted, "steps": s, "rss_mb_max_rank": rss / 2**20,
                        "rss_growth_mb_max_rank": (rss - base_rss) / 2**20, "pending_keys": int(pending[0]),
                        "rows_in_use": int(pending[1]), "step_ms": [], "pending_steps": args.window})
            milestones.pop(0)
            if rss > args.max_rss_gb * 2**30:
                out[-1]["stopped"] = "memory"
                break
    while out and out[-1]["pending_steps"] > 0:  # the last milestone's 10 steps
        head = np.minimum(rng.zipf(1.2, n_head), 100_000).astype(np.int64)
        fresh = 2**40 + (s * rt.size + rt.rank) * b + np.arange(b - n_head, dtype=np.int64)
        t0 = time.perf_counter()
        step(tf.constant(np.concatenate([head, fresh])), w)
        out[-1]["step_ms"].append(1e3 * (time.perf_counter() - t0))
        out[-1]["pending_steps"] -= 1
        s += 1
    for m in out:
        m.pop("pending_steps")
        m["median_ms"] = float(np.median(m["step_ms"]))
    return {"capacity": args.capacity, "dim": args.dim, "batch_per_rank": b, "fresh": args.fresh,
            "min_count": args.min_count, "ranks": rt.size, "milestones": out,
            "counters": {k: v.tolist() for k, v in emb.counters().items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job", choices=("step", "keys"))
    p.add_argument("--kind", choices=("fixed", "dynamic"), default="fixed")
    p.add_argument("--rows", type=int, default=2**20)
    p.add_argument("--tables", type=int, default=3)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--capacity", type=int, default=2**20)
    p.add_argument("--fresh", type=float, default=0.9)
    p.add_argument("--min_count", type=int, default=1)
    p.add_argument("--milestones", default="1e5,1e6,1e7")
    p.add_argument("--max_rss_gb", type=float, default=6.0)
    p.add_argument("--window", type=int, default=30)
    args = p.parse_args()
    rt = Runtime()
    result = step_job(args, rt) if args.job == "step" else keys_job(args, rt)
    if rt.is_chief:
        print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

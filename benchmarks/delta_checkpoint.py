"""Delta vs full checkpoints (issue 23), one process: bytes and save time at 10 and 100 steps (``--after``) after
the base, restore time of full + delta vs full, and the change tracking's cost on the train step.

Model: 2 one-hot features of ``--rows`` rows each (deep width 32 with lazy RMSprop, wide width 1 with FTRL),
2 numerics, MLP 64-64, sharded backend on 1 rank, global batch ``--batch`` (4096); ids Zipf-distributed
(exponent ``--zipf``, ranks shuffled over the rows by a fixed permutation). Saves go through
``wd_sok.checkpoint.save`` (full, or ``base=`` for a delta) into ``--dir`` (default: a temporary folder).

Tracking overhead: the same step compiled twice, with the marking (what training runs) and with it replaced by
a no-op, timed in alternating blocks of ``--block`` steps (``--reps`` each); medians of per-step times.

Save times are the median of ``--saves`` (3) saves of the same state, the full and the delta alternating (one
save moves with the machine's load: 1.06 and 2.07 s for the same full checkpoint here).

Targets (issue 23): at 100 steps a delta <= 0.1 x a full checkpoint in bytes and in save time; tracking
overhead <= 3% of the step; full + delta restore <= 1.2 x a full restore.

Usage::

    .venv/bin/python benchmarks/delta_checkpoint.py                 # 1e6 rows (~3 min on 2 cores)
    .venv/bin/python benchmarks/delta_checkpoint.py --rows 100000   # quick
    .venv/bin/python benchmarks/delta_checkpoint.py --rows 10000000 --after 10 100 1000 \
        --out benchmarks/results/delta_checkpoint_1e7.json          # 1e7 rows, 1000 steps (~11 GB on disk)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wd_sok import changes, steps  # noqa: E402
from wd_sok.checkpoint import delta, reader, writer  # noqa: E402
from wd_sok.data.batch import Batch  # noqa: E402
from wd_sok.embedding.sharded import ShardedEmbedding  # noqa: E402
from wd_sok.feature_spec import TableConfig  # noqa: E402
from wd_sok.model import WideDeepModel  # noqa: E402
from wd_sok.optim import LazyRMSprop  # noqa: E402
from wd_sok.state import dense_state, import_dense, table_states  # noqa: E402

FEATURES = ("c0", "c1")


class OneRank(SimpleNamespace):
    def __init__(self) -> None:
        super().__init__(rank=0, size=1, is_chief=True, hvd=None)

    def allgather_object(self, obj: object, name: str) -> list:
        return [obj]

    def broadcast_object(self, obj: object, name: str) -> object:
        return obj

    def allreduce_grads(self, grads: list) -> list:
        return grads


def build(rows: int) -> tuple:
    rt = OneRank()
    deep = [TableConfig(f, rows, 32) for f in FEATURES]
    wide = [TableConfig(f, rows, 1) for f in FEATURES]
    model = WideDeepModel(list(FEATURES), 2, ShardedEmbedding(wide, "zeros", 0, "wide", rt),
                          ShardedEmbedding(deep, "glorot_normal", 0, "deep", rt), [64, 64], dropout=0.0, seed=0)
    model._mlp_impl(tf.zeros([1, 66]), tf.constant(0, tf.int64), 0.0)  # noqa: SLF001 - build the MLP
    do = LazyRMSprop(1e-3, rho=0.5, tables=model.deep_embedding.trainable_variables)
    return model, tf.keras.optimizers.legacy.Ftrl(0.02), do, rt


def batches(rows: int, batch: int, zipf: float, seed: int = 0):  # noqa: ANN201
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(99).permutation(rows)
    while True:
        ids = {f: tf.constant(perm[(rng.zipf(zipf, batch) - 1) % rows], tf.int64) for f in FEATURES}
        yield Batch(tf.constant(rng.normal(size=(batch, 2)), tf.float32), ids,
                    tf.constant(rng.integers(0, 2, batch), tf.float32))


def run_steps(step, data, n: int, first: int) -> list[float]:  # noqa: ANN001
    times = []
    for i in range(n):
        b = next(data)
        t0 = time.perf_counter()
        step(b, tf.constant(first + i, tf.int64)).numpy()
        times.append(time.perf_counter() - t0)
    return times


def save(folder: Path, m: tuple, step: int, base: Path | None) -> dict:
    model, wo, do, rt = m
    meta = {"epoch": 0, "step_in_epoch": step, "seed": 0, "config": {}, "backend": "sharded", "run": "b" * 16}
    t0 = time.perf_counter()
    out = writer.save(folder, step, table_states(model, wo, do), dense_state(model, wo, do), meta, rt, keep=100,
                      base=base)
    return {"path": out["path"], "bytes": out["total_bytes"], "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--zipf", type=float, default=1.2)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--after", type=int, nargs="+", default=[10, 100], help="steps after the base measured")
    p.add_argument("--saves", type=int, default=3, help="saves timed per checkpoint (median)")
    p.add_argument("--dir", default="")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "delta_checkpoint.json"))
    args = p.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="delta_bench_"))
    m = build(args.rows)
    model, wo, do, rt = m
    data = batches(args.rows, args.batch, args.zipf)
    tracked = steps.make_train_step(model, wo, do, rt, args.batch)
    run_steps(tracked, data, 3, 0)
    res: dict = {"load_average_at_start": list(os.getloadavg()), "rows": args.rows, "batch": args.batch,
                 "zipf": args.zipf, "features": len(FEATURES)}
    fulls = [save(folder / "full", m, 3, None)]
    base = Path(fulls[0]["path"])
    for s in table_states(model, wo, do):
        s.reset_changes()
    done = 3
    for after in sorted(args.after):
        run_steps(tracked, data, 3 + after - done, done)
        done = 3 + after
        # each save --saves times (the first kept; the others into folders removed at once): median seconds
        d = save(folder / "full", m, done, base)
        f = save(folder / f"full_{after}", m, done, None)
        d_s, f_s = [d["seconds"]], [f["seconds"]]
        for k in range(1, args.saves):
            for kept, times, where, b in ((d, d_s, f"delta_{after}_{k}", base), (f, f_s, f"full_{after}_{k}", None)):
                again = save(folder / where, m, done, b)
                assert again["bytes"] == kept["bytes"]
                times.append(again["seconds"])
                shutil.rmtree(folder / where)
        d["seconds"], f["seconds"] = statistics.median(d_s), statistics.median(f_s)
        if len(fulls) > 1:  # only the base and the latest full are read again: bounded disk
            shutil.rmtree(fulls.pop()["path"], ignore_errors=True)
        fulls.append(f)
        rows = sum(int(s.changed_saved().size) for s in table_states(model, wo, do) if s.key.startswith("deep/"))
        res[f"after_{after}"] = {"delta_bytes": d["bytes"], "full_bytes": f["bytes"], "delta_s": d["seconds"],
                                 "full_s": f["seconds"], "delta_s_all": d_s, "full_s_all": f_s,
                                 "changed_deep_rows": rows,
                                 "deep_rows": len(FEATURES) * args.rows,
                                 "bytes_ratio": d["bytes"] / f["bytes"], "time_ratio": d["seconds"] / f["seconds"]}
        print(json.dumps({f"after_{after}": res[f"after_{after}"]}), flush=True)
    # restore: full vs full + the 100-step delta
    fresh = build(args.rows)
    states = table_states(fresh[0], fresh[1], fresh[2])
    dense = lambda a, o: import_dense(fresh[0], fresh[1], fresh[2], a, o)  # noqa: E731
    t_full, t_pair = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        reader.read_one(Path(fulls[-1]["path"]), states, dense)
        t_full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        delta.read_pair(base, folder / "full" / f"ckpt-{done}", states, dense)
        t_pair.append(time.perf_counter() - t0)
    res["restore"] = {"full_s": min(t_full), "full_plus_delta_s": min(t_pair), "ratio": min(t_pair) / min(t_full)}
    print(json.dumps({"restore": res["restore"]}), flush=True)
    # tracking overhead: the step with and without the marking, alternating blocks
    original = changes.mark_applied
    changes.mark_applied = lambda *a, **k: []
    try:
        untracked = steps.make_train_step(model, wo, do, rt, args.batch)
        run_steps(untracked, data, 3, done)
    finally:
        changes.mark_applied = original
    on, off = [], []
    for _ in range(args.reps):
        on += run_steps(tracked, data, args.block, done)
        off += run_steps(untracked, data, args.block, done)
    res["step"] = {"tracked_ms": 1e3 * statistics.median(on), "untracked_ms": 1e3 * statistics.median(off),
                   "overhead": statistics.median(on) / statistics.median(off) - 1}
    print(json.dumps({"step": res["step"]}), flush=True)
    a100 = res.get("after_100", res[f"after_{max(args.after)}"])
    verdicts = {"delta_bytes_100_steps_le_0.1x": a100["bytes_ratio"] <= 0.1,
                "delta_time_100_steps_le_0.1x": a100["time_ratio"] <= 0.1,
                "tracking_overhead_le_3pct": res["step"]["overhead"] <= 0.03,
                "restore_full_plus_delta_le_1.2x": res["restore"]["ratio"] <= 1.2}
    res["targets"] = verdicts
    Path(args.out).write_text(json.dumps(res, indent=1))
    for name, ok in verdicts.items():
        print(f"target {name}: {'MET' if ok else 'NOT MET'}")
    if not args.dir:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

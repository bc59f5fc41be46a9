"""Dynamic tables' delta checkpoints over real ranks: saved under N, restored under M, compared key by key.

``--mode save`` (N ranks): tests/dist/dynamic_ckpt.py's collections (LRU with min_count 2, LFU; capacity 60),
4 training steps, a full checkpoint into ``--model_dir``/d, 6 more steps (keys evicted and re-admitted), then a
delta against it into d and a full checkpoint of the same state into ``--model_dir``/f.

``--mode restore`` (M ranks): one model restores d (full + delta), another f (full); every rank checks that
both hold the same keys with the same values, slots, counters, the same pending keys and clock. Rank 0
writes a JSON report to ``--out``; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist.dynamic_ckpt import Model, batch, dense, import_dense  # noqa: E402
from wd_sok import checkpoint  # noqa: E402
from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.state import table_states  # noqa: E402

META = {"epoch": 0, "step_in_epoch": 0, "run": "d" * 16}


def train(model: Model, rank: int, first: int, steps: int) -> None:
    pairs = ((model.wide_embedding, model.wide_opt), (model.deep_embedding, model.deep_opt))

    @tf.function(reduce_retracing=True)
    def step(ids: dict) -> None:
        for emb, opt in pairs:
            with tf.GradientTape() as tape:
                out = emb(ids, training=True)
                loss = tf.add_n([tf.reduce_sum(tf.square(out[n] - 0.3)) for n in out])
            grads = tape.gradient(loss, emb.sparse_variables)
            opt.apply_gradients(zip(grads, emb.sparse_variables, strict=True))

    for s in range(first, first + steps):
        step(batch(rank, s))


def by_key(model: Model) -> dict[str, dict]:
    out = {}
    for s in table_states(model, model.wide_opt, model.deep_opt):
        n = s.count()
        held = {a: s.read(a, 0, n) for a in s.arrays()}
        order = np.argsort(held["key"])
        pk, pc = s.pending()
        out[s.key] = {**{a: v[order] for a, v in held.items()}, "pending": dict(zip(pk.tolist(), pc.tolist(),
                                                                                    strict=True)),
                      "clock": s.collection.clock_value()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("save", "restore"), required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rt, root = Runtime(), Path(args.model_dir)
    report: dict = {"rank": rt.rank, "failures": []}
    if args.mode == "save":
        model = Model("sharded", rt, "evict")
        states = table_states(model, model.wide_opt, model.deep_opt)
        train(model, rt.rank, 0, 4)
        checkpoint.save(root / "d", 4, states, dense(model) if rt.is_chief else None, META, rt)
        for s in states:
            s.reset_changes()
        before = model.deep_embedding.counters()
        train(model, rt.rank, 4, 6)
        report["evictions"] = {k: int(v[2] - before[k][2]) for k, v in model.deep_embedding.counters().items()}
        out = checkpoint.save(root / "d", 10, states, dense(model) if rt.is_chief else None, META, rt,
                              base=root / "d" / "ckpt-4")
        full = checkpoint.save(root / "f", 10, states, dense(model) if rt.is_chief else None, META, rt)
        report["bytes"] = {"delta": out["total_bytes"], "full": full["total_bytes"]}
    else:
        got, want = Model("sharded", rt, "evict"), Model("sharded", rt, "evict")
        manifest, path = checkpoint.restore_latest(root / "d", table_states(got, got.wide_opt, got.deep_opt),
                                                   lambda a, o: import_dense(got, a, o), rt)
        checkpoint.restore_latest(root / "f", table_states(want, want.wide_opt, want.deep_opt),
                                  lambda a, o: import_dense(want, a, o), rt)
        report["restored"] = [path.name, manifest.get("kind", "full")]
        g, w = by_key(got), by_key(want)
        for key in w:
            for a in w[key]:
                same = g[key][a] == w[key][a] if a in ("pending", "clock") else np.array_equal(g[key][a], w[key][a])
                if not same:
                    report["failures"].append(f"rank {rt.rank}: {key}: {a} differs")
        report["keys"] = {k: int(v["key"].size) for k, v in w.items()}
    reports = rt.allgather_object(report, "report")
    if rt.is_chief:
        Path(args.out).write_text(json.dumps(reports))
    return 1 if any(r["failures"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())

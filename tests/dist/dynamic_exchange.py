"""Key-sharded dynamic tables under ``horovodrun -np N`` equal one process fed every rank's batch.

Every rank draws every rank's batches (from ``(seed, rank, step)``: big, negative, repeated raw ids, one-hot
and multi-hot, rank 1's second batch empty), trains its :class:`DynamicEmbedding` (capacity large enough
that nothing is evicted, ``min_count`` 2) for a few steps with legacy SGD on the loss ``sum(v * w_rank)``,
and an oracle: a one-process DynamicEmbedding trained on all ranks' batches at once with the summed loss.
Checked per rank: it holds exactly the oracle's keys with ``mix64(k) % N == rank``, each with the oracle's
row (1e-6), its lookups equal the oracle's, and the summed counters equal the oracle's. Rank 0 writes a
JSON report to ``--out``; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.embedding.dynamic import DynamicEmbedding  # noqa: E402
from wd_sok.embedding.keys import owner_np  # noqa: E402
from wd_sok.feature_spec import DynamicConfig, TableConfig  # noqa: E402

TABLES = [TableConfig("u", 4000, 3, dynamic=DynamicConfig(4000, 2, "lru")),
          TableConfig("m", 4000, 2, 3, True, "mean", DynamicConfig(4000, 2, "lfu"))]
BATCH, STEPS = 24, 4


def draw(rank: int, step: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, rank, step])
    n = 0 if (rank == 1 and step == 1) else BATCH
    u = (rng.zipf(1.4, n) * 7_000_003 * (-1) ** rng.integers(0, 2, n)).astype(np.int64)
    lengths = rng.integers(0, 4, n)
    m = (rng.zipf(1.4, int(lengths.sum())) + 2**41).astype(np.int64)
    return {"u": u, "m": (m, lengths)}


def to_tf(b: dict) -> dict:
    return {"u": tf.constant(b["u"], tf.int64), "m": tf.RaggedTensor.from_row_lengths(
        tf.constant(b["m"][0], tf.int64), tf.constant(b["m"][1], tf.int64))}


def concat(batches: list[dict]) -> dict:
    return {"u": np.concatenate([b["u"] for b in batches]),
            "m": (np.concatenate([b["m"][0] for b in batches]), np.concatenate([b["m"][1] for b in batches]))}


def make_step(emb: DynamicEmbedding, opt: tf.keras.optimizers.legacy.Optimizer):  # noqa: ANN201
    @tf.function(reduce_retracing=True)
    def step(ids: dict, w: dict) -> dict:
        with tf.GradientTape() as tape:
            out = emb(ids, training=True)
            loss = tf.add_n([tf.reduce_sum(out[n] * w[n]) for n in out])
        variables = emb.sparse_variables
        opt.apply_gradients([(g, v) for g, v in zip(tape.gradient(loss, variables), variables, strict=True)])
        return out
    return step


def weights(rank: int, step: int, rows: int) -> dict:
    rng = np.random.default_rng([99, rank, step])
    return {t.name: tf.constant(rng.normal(size=(rows, t.dim)), tf.float32) for t in TABLES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    rt = Runtime()
    n, r = rt.size, rt.rank
    emb = DynamicEmbedding(TABLES, "glorot_normal", 1, "deep", rt)
    oracle = DynamicEmbedding(TABLES, "glorot_normal", 1, "deep", None)
    opt, opt_o = tf.keras.optimizers.legacy.SGD(0.5), tf.keras.optimizers.legacy.SGD(0.5)
    emb.attach_optimizer(opt)
    oracle.attach_optimizer(opt_o)
    step, step_o = make_step(emb, opt), make_step(oracle, opt_o)
    failures = []
    for s in range(STEPS):
        batches = [draw(k, s, args.seed) for k in range(n)]
        ws = [weights(k, s, len(batches[k]["u"])) for k in range(n)]
        got = step(to_tf(batches[r]), ws[r])
        want = step_o(to_tf(concat(batches)), {t.name: tf.concat([w[t.name] for w in ws], 0) for t in TABLES})
        lo = sum(len(b["u"]) for b in batches[:r])
        for name in got:
            mine = want[name].numpy()[lo:lo + len(batches[r]["u"])]
            if not np.allclose(got[name].numpy(), mine, atol=1e-6):
                failures.append(f"step {s} {name}: lookups differ from the oracle's")
    for t in TABLES:
        keys, rows = (x.numpy() for x in emb.index[t.name].export())
        o_keys, o_rows = (x.numpy() for x in oracle.index[t.name].export())
        mine = np.sort(o_keys[owner_np(o_keys, n) == r])
        if not np.array_equal(np.sort(keys), mine):
            failures.append(f"{t.name}: rank {r} holds {keys.size} keys, the oracle's owned ones are {mine.size}")
            continue
        o_map = dict(zip(o_keys.tolist(), o_rows.tolist(), strict=True))
        values, o_values = emb.shards[t.name].numpy(), oracle.shards[t.name].numpy()
        for k, row in zip(keys.tolist(), rows.tolist(), strict=True):
            if not np.allclose(values[row], o_values[o_map[k]], atol=1e-6):
                failures.append(f"{t.name}: key {k}: row differs from the oracle's")
                break
        stats = rt.sum_host(emb.stats[t.name].numpy(), f"stats_{t.name}")
        if stats.tolist() != oracle.stats[t.name].numpy().tolist():
            failures.append(f"{t.name}: inserts/admissions/evictions {stats.tolist()} vs oracle "
                            f"{oracle.stats[t.name].numpy().tolist()}")
        if values[0].any():
            failures.append(f"{t.name}: the zero row changed")
    report = rt.allgather_object({"rank": r, "failures": failures,
                                  "keys": {t.name: int(emb.keyed_count(t.name)) for t in TABLES}}, "report")
    if rt.is_chief:
        Path(args.out).write_text(json.dumps(report))
    return 1 if any(x["failures"] for x in report) else 0


if __name__ == "__main__":
    sys.exit(main())

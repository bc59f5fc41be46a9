"""The sharded exchange sends each distinct id of a table once, under ``horovodrun -np N`` (or one process).

Every rank builds the same :class:`~wd_sok.embedding.sharded.ShardedEmbedding` (tables of
``tests/dist/common.py``'s widths, some repeating ids heavily) and a replicated oracle, and looks up its own
Zipf-skewed batch (drawn from ``(seed, rank)``, so every rank can redraw every other rank's batch).
Independently, in numpy, each rank works out from all ranks' batches: ``sent[d, t]`` = distinct ids of table
``t`` in its batch owned by ``d`` (``g % N == d``), and ``received[s, t]`` = the same for rank ``s``'s
batch and owner ``rank``. Checked per rank against what the exchange reports through ``exchange_hook``
(``received`` is counted from the keys the ids alltoall delivered), that the shard gradients hold exactly
one row per distinct id received (summed over occurrences before they travel), and that the pooled
vectors and those gradients equal the oracle's (its table gradients summed over ranks). Rank 0 writes a
JSON report to ``--out``; exit code 1 if any check fails.
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
from wd_sok.embedding.replicated import ReplicatedEmbedding  # noqa: E402
from wd_sok.embedding.sharded import ShardedEmbedding  # noqa: E402
from wd_sok.feature_spec import TableConfig  # noqa: E402

TABLES = [TableConfig("a", 7, 3), TableConfig("b", 1001, 4), TableConfig("p", 2, 2),
          TableConfig("m", 11, 4, 3, True, "mean"), TableConfig("n", 5003, 3, 2, True, "sum")]
BATCH = 64


def draw(rank: int, seed: int) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Rank ``rank``'s batch: one-hot [B] ids, multi-hot (values, row_lengths); Zipf-skewed ids."""
    rng = np.random.default_rng([seed, rank])
    out: dict = {}
    for t in TABLES:
        n = BATCH
        lengths = None
        if t.multihot:
            lengths = rng.integers(0, t.max_hotness + 1, BATCH)
            n = int(lengths.sum())
        ids = np.minimum(rng.zipf(1.2, n) - 1, t.cardinality - 1).astype(np.int64)
        out[t.name] = ids if lengths is None else (ids, lengths)
    return out


def to_tf(b: dict) -> dict[str, tf.Tensor | tf.RaggedTensor]:
    return {k: tf.RaggedTensor.from_row_lengths(v[0], v[1]) if isinstance(v, tuple) else tf.constant(v)
            for k, v in b.items()}


def flat(b: dict, name: str) -> np.ndarray:
    v = b[name]
    return v[0] if isinstance(v, tuple) else v


def expected_sent(b: dict, world: int) -> np.ndarray:
    """[N, T] distinct ids per (owner, table) of one rank's batch."""
    out = np.zeros((world, len(TABLES)), np.int64)
    for t, table in enumerate(TABLES):
        u = np.unique(flat(b, table.name))
        out[:, t] = np.bincount(u % world, minlength=world)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    rt = Runtime()
    n, r = rt.size, rt.rank
    batches = [draw(s, args.seed) for s in range(n)]
    sent_np = expected_sent(batches[r], n)
    recv_np = np.stack([expected_sent(batches[s], n)[r] for s in range(n)])  # [N sources, T]
    occurrences = sum(flat(batches[r], t.name).size for t in TABLES)

    layer = ShardedEmbedding(TABLES, "glorot_normal", 4, "deep", rt)
    oracle = ReplicatedEmbedding(TABLES, "glorot_normal", 4, "deep")
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    layer.exchange_hook = lambda sent, received: seen.append((sent.numpy(), received.numpy()))
    ids = to_tf(batches[r])

    def run(emb: tf.keras.layers.Layer, tables: list[tf.Variable]) -> tuple[dict, list]:
        with tf.GradientTape() as tape:
            out = emb(ids)
            loss = tf.add_n([tf.reduce_sum(out[t.name] ** 2) * (i + 1.0) for i, t in enumerate(TABLES)])
        return out, tape.gradient(loss, tables)

    out_s, grads_s = run(layer, [layer.shards[t.name] for t in TABLES])
    out_o, grads_o = run(oracle, [oracle.weights_by_name[t.name] for t in TABLES])
    failures: list[str] = []
    sent, received = seen[-1]
    if not np.array_equal(sent, sent_np):
        failures.append(f"rank {r}: sent {sent.tolist()} != numpy {sent_np.tolist()}")
    if not np.array_equal(received, recv_np):
        failures.append(f"rank {r}: received {received.tolist()} != numpy {recv_np.tolist()}")
    fwd = max(float(np.abs(out_s[k].numpy() - out_o[k].numpy()).max(initial=0.0)) for k in out_o)
    if fwd > 1e-6:
        failures.append(f"rank {r}: forward differs by {fwd:.3g}")
    grad = 0.0
    for t, (gs, go) in enumerate(zip(grads_s, grads_o, strict=True)):
        if gs.indices.shape[0] != recv_np[:, t].sum():
            failures.append(f"rank {r}: {TABLES[t].name}: {gs.indices.shape[0]} gradient rows arrived, "
                            f"{recv_np[:, t].sum()} distinct ids asked")
        whole = tf.convert_to_tensor(go)
        if n > 1:
            whole = rt.hvd.allreduce(whole, op=rt.hvd.Sum, name=f"oracle_grad_{t}")
        mine = whole.numpy()[r::n]  # local row l = global row r + l * N
        grad = max(grad, float(np.abs(tf.convert_to_tensor(gs).numpy() - mine).max(initial=0.0)))
    if grad > 1e-5:
        failures.append(f"rank {r}: shard gradients differ from the oracle's by {grad:.3g}")
    report = {"rank": r, "sent": sent.tolist(), "received": received.tolist(), "occurrences": occurrences,
              "distinct_sent": int(sent.sum()), "forward_diff": fwd, "grad_diff": grad, "failures": failures}
    reports = [report]
    if n > 1:
        gathered = rt.hvd.allgather_object(report, name="dedup_reports")
        reports = list(gathered)
    if r == 0:
        Path(args.out).write_text(json.dumps({"ranks": n, "reports": reports}, indent=1))
        bad = [f for rep in reports for f in rep["failures"]]
        print(("DEDUP PASS" if not bad else "DEDUP FAIL: " + "; ".join(bad)), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""One process, one thread: a traced sharded lookup + gradient of the ladder's 3 tables (2 one-hot, 1 multi-hot
of 1..3 ids, width 8) on Zipf(1.2) ids; prints the median and min of 30 timed calls.

With one rank the exchange is the identity, so this times the lookup's own compute (the per-table
``tf.unique`` of the deduplicated exchange included). ``--tree`` imports ``wd_sok`` from another checkout
(e.g. an older commit exported with ``git archive``) to compare.

Usage: ``OMP_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 .venv/bin/python benchmarks/lookup_micro.py --rows 1000000``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=32_768)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    args = p.parse_args(argv)
    sys.path.insert(0, args.tree)
    import numpy as np
    import tensorflow as tf

    from wd_sok.embedding.sharded import ShardedEmbedding
    from wd_sok.feature_spec import TableConfig

    rows = args.rows
    tables = [TableConfig("c0", rows, 8), TableConfig("c1", rows, 8), TableConfig("m0", rows, 8, 3, True, "sum")]
    layer = ShardedEmbedding(tables, "glorot_normal", 0, "deep", SimpleNamespace(rank=0, size=1, hvd=None))
    rng = np.random.default_rng(0)

    def zipf(n: int) -> np.ndarray:
        return np.minimum(rng.zipf(1.2, n) - 1, rows - 1)

    lengths = rng.integers(1, 4, args.batch)
    ids = {"c0": tf.constant(zipf(args.batch)), "c1": tf.constant(zipf(args.batch)),
           "m0": tf.RaggedTensor.from_row_lengths(zipf(int(lengths.sum())), lengths)}

    @tf.function
    def step(ids: dict) -> tf.Tensor:
        with tf.GradientTape() as tape:
            out = layer(ids)
            loss = tf.add_n([tf.reduce_sum(v) for v in out.values()])
        return tf.add_n([tf.reduce_sum(g.values) for g in tape.gradient(loss, layer.trainable_variables)])

    step(ids).numpy()
    ts = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        step(ids).numpy()
        ts.append(time.perf_counter() - t0)
    print(f"{args.tree}: rows {rows:.0e}, batch {args.batch}: median {np.median(ts) * 1e3:.2f} ms, "
          f"min {min(ts) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Dropout masks under ``horovodrun -np N``: different on every rank, a pure function of (seed, rank, layer, step).

Each rank builds the real :class:`wd_sok.train.Trainer` (dropout 0.5) twice from the same config and runs its
MLP in training mode on the same input (ones) at steps 3 and 4. Rank 0 writes ``--out`` (JSON): per rank pair
whether the outputs differ (the masks must), and whether the second Trainer and a repeated call reproduce the
first output exactly (they must: resume repeats masks). Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wd_sok.config import Config  # noqa: E402
from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.train import Trainer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rt = Runtime()
    cfg = Config(dataset_path=args.data, global_batch_size=48, eval_batch_size=48, num_epochs=1, seed=5,
                 deep_hidden_units=[32, 32], deep_dropout=0.5, deep_warmup_epochs=0.0,
                 model_dir=str(Path(args.out).parent / "ckpt"), results_dir=str(Path(args.out).parent / "res"))
    outs = []
    for _ in range(2):
        model = Trainer(cfg, rt).model
        width = model.hidden[0].kernel.shape[0]
        x = tf.ones([64, width])
        outs.append([model._mlp(x, tf.constant(s, tf.int64), 0.5).numpy() for s in (3, 4)])  # noqa: SLF001
        outs[-1].append(model._mlp(x, tf.constant(3, tf.int64), 0.5).numpy())  # noqa: SLF001
    mine = np.stack(outs[0][:2])  # [2 steps, 64]
    every = rt.hvd.allgather(tf.constant(mine[None]), name="mlp_outputs").numpy()  # [ranks, 2, 64]
    failures = []
    if not np.array_equal(outs[0][0], outs[1][0]) or not np.array_equal(outs[0][0], outs[0][2]):
        failures.append(f"rank {rt.rank}: the same (seed, rank, layer, step) gave another mask")
    if np.array_equal(outs[0][0], outs[0][1]):
        failures.append(f"rank {rt.rank}: steps 3 and 4 drew the same mask")
    same = [[bool(np.array_equal(every[i], every[j])) for j in range(rt.size)] for i in range(rt.size)]
    for i in range(rt.size):
        for j in range(i + 1, rt.size):
            if same[i][j]:
                failures.append(f"ranks {i} and {j} drew identical dropout masks")
    all_failures = rt.hvd.allgather_object(failures) if rt.size > 1 else [failures]
    if rt.is_chief:
        Path(args.out).write_text(json.dumps({"ranks": rt.size, "same": same,
                                              "failures": [f for fs in all_failures for f in fs]}))
    return 1 if any(all_failures) else 0


if __name__ == "__main__":
    sys.exit(main())

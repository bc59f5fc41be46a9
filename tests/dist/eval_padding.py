"""Evaluation and eval benchmark with uneven test shards, under ``horovodrun -np N`` (or one process).

Builds a real :class:`wd_sok.train.Trainer` (``--backend``), records the shape of every batch its eval step
is called with, runs ``evaluate()`` and then ``benchmark_eval()`` (which repeats passes over the test files),
and writes ``<out>/rank<r>.json`` per rank: the metrics, and per step (rows fed, real rows).

The weights are the initial ones, which do not depend on the rank count or backend (tables are a function of
(seed, table, row); dense weights come from rank 0), plus a wide numerical weight of 1 on ``x1`` (the planted
signal of tests/dist/common.py's data), set on every rank, so AUC and MAP@12 are far from chance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wd_sok.config import Config  # noqa: E402
from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.train import Trainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="sharded")
    parser.add_argument("--eval_batch_size", type=int, default=48)
    parser.add_argument("--bench_steps", type=int, default=0, help="also run benchmark_eval with this many steps")
    args = parser.parse_args()
    rt = Runtime()
    out = Path(args.out)
    cfg = Config(dataset_path=args.data, global_batch_size=48, eval_batch_size=args.eval_batch_size, seed=5,
                 deep_hidden_units=[16, 16], embedding_backend=args.backend, model_dir=str(out / "ckpt"),
                 results_dir=str(out / "results"), benchmark_warmup_steps=2, benchmark_steps=args.bench_steps)
    trainer = Trainer(cfg, rt)
    trainer.model.wide_kernel.assign([[1.0], [0.0]])
    seen: list[list[int]] = []
    step = trainer.eval_step

    def recording(batch):  # noqa: ANN001, ANN202 - a Batch in, probabilities out
        seen.append([batch.size, batch.real_size])
        return step(batch)

    trainer.eval_step = recording
    report = {"rank": rt.rank, "ranks": rt.size, "local_eval_batch": trainer.local_eval_batch,
              "rows": trainer.eval_data.rows, "metrics": trainer.evaluate(), "eval_steps": seen}
    if args.bench_steps:
        seen = []
        trainer.eval_step = recording
        report["bench_rate"] = trainer.benchmark_eval()
        report["bench_steps"] = seen
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rt.rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

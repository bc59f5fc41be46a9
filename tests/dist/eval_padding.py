"""Evaluation and eval benchmark with uneven test shards, under ``horovodrun -np N`` (or one process).

Builds a real :class:`wd_sok.train.Trainer` (``--backend``), records the shape of every batch its eval step
is called with, runs ``evaluate()`` and then ``benchmark_eval()`` (which repeats passes over the test files),
and writes ``<out>/rank<r>.json`` per rank: the metrics, and per step (rows fed, real rows).

The weights are the initial ones, which do not depend on the rank count or backend (tables are a function of
(seed, table, row); dense weights come from rank 0), plus a wide numerical weight of 1 on ``x1`` (the planted
signal of tests/dist/common.py's data), set on every rank, so AUC and MAP@12 are far from chance.

With ``--reference DIR`` (the output of a run whose eval batch pads nothing, e.g. 1 process at
``--eval_batch_size 6``), rank 0 also checks that every rank fed exactly the local eval batch in every step,
that all ranks ran the same step counts and that the metrics equal the reference's (``--atol``); it prints
``EVAL PADDING PASS`` or ``EVAL PADDING FAIL: ...`` and the exit code is 1 on failure (scripts/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tensorflow as tf

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
    parser.add_argument("--reference", default="", help="check against this run's rank0.json (see above)")
    parser.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args()
    rt = Runtime()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:  # one GPU per rank, as main.py does (SOK needs it)
        gpu = gpus[rt.local_rank % len(gpus)]
        tf.config.set_visible_devices([gpu], "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
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
    if not args.reference:
        return 0
    rt.barrier()  # every rank's file is written
    failures = []
    if rt.is_chief:
        failures = check([json.loads((out / f"rank{r}.json").read_text()) for r in range(rt.size)],
                         json.loads((Path(args.reference) / "rank0.json").read_text()), args.atol)
        print("EVAL PADDING " + (f"FAIL: {'; '.join(failures)}" if failures else
                                 f"PASS ({rt.size} ranks, {args.backend}, {report['metrics']})"), flush=True)
    return 1 if failures else 0


def check(reports: list[dict], reference: dict, atol: float) -> list[str]:
    """What is wrong with ``reports`` (one per rank) against an unpadded ``reference`` run."""
    failures = []
    for key in ("eval_steps", "bench_steps"):
        counts = {len(r.get(key, [])) for r in reports}
        if len(counts) > 1:
            failures.append(f"{key}: ranks ran different step counts {sorted(counts)}")
        for r in reports:
            sizes = {size for size, _ in r.get(key, [])}
            if sizes - {r["local_eval_batch"]}:
                failures.append(f"{key}: rank {r['rank']} fed {sorted(sizes)} rows, not {r['local_eval_batch']}")
    for r in reports:
        if sum(real for _, real in r["eval_steps"]) != r["rows"]:
            failures.append(f"rank {r['rank']}: real rows evaluated != its {r['rows']} test rows")
    for key in ("loss_val", "auc_roc", "streaming_map_val", "map_groups"):
        got, want = reports[0]["metrics"][key], reference["metrics"][key]
        if not abs(got - want) <= atol:
            failures.append(f"{key} {got} != {want} unpadded (atol {atol})")
    return failures


if __name__ == "__main__":
    sys.exit(main())

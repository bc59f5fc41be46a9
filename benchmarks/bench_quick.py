"""``make bench-quick``: a reduced embedding-scaling ladder plus one throughput point, in under 10 minutes.

* Ladder (``embedding_scaling.ladder``): 1e4 and 1e6 rows per table, 1 and 2 ranks, the dense-allreduce
  reference vs the sharded backend, one repetition, 2 + 5 steps (same model, data and measurements as
  ``embedding_scaling.py``).
* Dedup bytes (``embedding_scaling.dedup_points``): bytes sent per rank per step by the sharded backend at
  global batch 65,536 on the ladder's Zipf data (same rows, the largest ``--np``), ids deduplicated per table
  as the exchange does vs every occurrence sent (before): ``target dedup_bytes`` is after <= 0.5 x before.
* Ladder targets: ``planned_step`` (the planner's placement <= 1.05 x min(reference, all row-wise) at every
  point), plus embedding_scaling's flat-step, speed-up and bytes-per-rank targets.
* Throughput: the default model (5 x 1024, baseline spec) at global batch 4096: float32 (target >= 0.90 of
  the float32 matmul bound), ``--amp`` (bfloat16; target >= 0.70 of the bfloat16 bound), and float32 with
  Merlin's loader thread unpatched (``--no_loader_fix``: busy-waiting); each bound is the same GEMMs timed in
  the same process right after its steps (``worker.py --paired_matmul``), one repetition.

Single repetitions on a shared machine: read these as a smoke check of the trends, and run the full
scripts for figures. Writes ``benchmarks/results/bench_quick.json``.

Usage: ``make bench-quick`` or ``.venv/bin/python benchmarks/bench_quick.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import embedding_scaling  # noqa: E402
import throughput  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--np", type=int, nargs="+", default=[1, 2], dest="nps")
    p.add_argument("--batch", type=int, default=4096, help="throughput point's global batch")
    p.add_argument("--dedup_batch", type=int, default=65_536, help="global batch of the dedup bytes points")
    p.add_argument("--out", default="bench_quick")
    args = p.parse_args(argv)
    start = time.perf_counter()

    results = embedding_scaling.ladder(args.rows, args.nps, ["reference", "sharded", "planned"], reps=1, dim=8,
                                       hidden=[256, 256], batch=8192, warmup=2, steps=5, train_rows=60_000,
                                       timeout=600)
    ladder_rows, targets = embedding_scaling.summarize(results)
    dedup, dedup_target = embedding_scaling.dedup_points(args.rows, max(args.nps), args.dedup_batch, dim=8,
                                                         hidden=[256, 256], train_rows=150_000, timeout=600)
    targets["dedup_bytes"] = {"sharded": dedup_target}

    spec = common.load_spec_dict("baseline")
    data = common.ensure_dataset("baseline_300000_t100k", spec, 300_000, 100_000)
    dims = throughput.mlp_dims(spec, [1024] * 5)
    fwd, fwd_bwd = throughput.flops_per_sample(dims)
    points = {}
    with tempfile.TemporaryDirectory(prefix="wd_sok_quick_") as tmp:
        for name, mode, dtype, extra, goal in (("fp32", "fp32", "float32", [], 0.90),
                                                ("amp", "amp", "bfloat16", [], 0.70),
                                                ("fp32_merlin_spin", "fp32", "float32", ["--no_loader_fix"], None)):
            r = throughput.run_worker(["train", "--eval", "--paired_matmul", *extra, "--",
                                       *throughput.train_flags(data, args.batch, mode, 2, 5, Path(tmp) / name)], 600)
            pm = r["paired_matmul"]
            points[name] = {"batch": args.batch, "mode": mode, "train_samples_per_s": r["train_samples_per_s"],
                            "eval_samples_per_s": r["eval_samples_per_s"], "matmul_dtype": dtype,
                            "matmul_gflops": pm["gflops"], "bound_samples_per_s": pm["bound_samples_per_s"],
                            "fraction_of_bound": r["train_samples_per_s"] / pm["bound_samples_per_s"], "goal": goal}

    print("\nEmbedding ladder (1 repetition):")
    embedding_scaling.print_report(ladder_rows, {k: v for k, v in targets.items() if k != "dedup_bytes"})
    print(f"\nBytes sent per rank per step, sharded, global batch {args.dedup_batch}: deduplicated ids vs before:")
    embedding_scaling.print_dedup(dedup, dedup_target)
    print(f"\nThroughput, default model, batch {args.batch} ({fwd_bwd / 1e6:.1f} MFLOP/sample); bound = the same "
          f"GEMMs timed in the same process right after the steps, in the run's dtype:")
    for name, point in points.items():
        print(f"  {name:16s} train {point['train_samples_per_s']:,.0f} samples/s, eval "
              f"{point['eval_samples_per_s']:,.0f} samples/s; {point['matmul_dtype']} matmul "
              f"{point['matmul_gflops']:,.0f} GFLOP/s -> bound {point['bound_samples_per_s']:,.0f}: "
              f"{point['fraction_of_bound']:.1%} of bound")
        if point["goal"] is not None:
            met = point["fraction_of_bound"] >= point["goal"]
            targets[f"{name}_bound"] = {"goal": f">= {point['goal']:.2f} of the {point['matmul_dtype']} bound",
                                        "ratio": point["fraction_of_bound"], "met": met}
            print(f"target {name}_fraction_of_bound: {'MET' if met else 'NOT MET'} "
                  f"({point['fraction_of_bound']:.3f}; goal >= {point['goal']:.2f})")
    elapsed = time.perf_counter() - start
    path = common.write_json(args.out, {"params": vars(args), "elapsed_s": elapsed, "ladder": ladder_rows,
                                        "targets": targets, "dedup": dedup, "throughput": points, "raw_runs": results})
    print(f"\nbench-quick done in {elapsed / 60:.1f} min; {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

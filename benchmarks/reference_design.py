"""The reference's distribution scheme vs this project's sharded backend: same model, same data, 1 and 2 ranks.

Reference (NVIDIA DeepLearningExamples TF2 WideAndDeep): every rank holds every table; the train step wraps
the tape in ``hvd.DistributedGradientTape(sparse_as_dense=True)``, so every embedding gradient is converted
to a dense ``[rows, dim]`` tensor (``tf.convert_to_tensor`` of the IndexedSlices) and allreduced with the
MLP's gradients, then the optimizers update every row of every table. Re-implemented here as a
benchmark-only option, not a model class: ``worker.ReferenceRuntime`` (the project's ``Runtime`` with
Horovod's ``sparse_as_dense`` allreduce) driving the project's own replicated backend, Trainer and train
step. As in Horovod, the dense conversion happens at any world size (on one rank too).

Sharded: ``--embedding_backend sharded`` (tables row-sharded over ranks, ids and vectors exchanged with
``hvd.alltoall``, only the MLP allreduced; the deep tables' RMSprop is lazy, O(touched rows)).
``--dense_decay`` adds ``sharded_dense_decay`` (the sharded backend with ``--rmsprop_update dense``: Keras'
legacy sparse RMSprop, which decays every row of every table each step).

Model and data: the default model (5 x 1024, dropout 0.1; 91.8M parameters) on synthetic data from
``tests/feature_specs/baseline.yaml`` (300k training rows), global batch 4096, ``nproc // np`` threads per
rank, the project's loader as is (``wd_sok.data.merlin_compat``; ``--no_loader_fix`` runs Merlin's loader
thread unpatched, busy-waiting). The probe loss (test BCE after the
timed steps) checks that the schemes train the same model: equal up to float rounding at equal rank count.

Usage: ``.venv/bin/python benchmarks/reference_design.py [--reps 3] [--dense_decay]``; writes
``benchmarks/results/reference_design.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, nargs="+", default=[1, 2], dest="nps")
    common.add_backend_args(p)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096, help="global batch")
    p.add_argument("--hidden", type=int, nargs="+", default=[1024] * 5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=300_000, help="training rows of the synthetic dataset")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--out", default="reference_design")
    args = p.parse_args(argv)
    backends = common.chosen_backends(args)

    data = common.ensure_dataset(f"baseline_{args.rows}_t100k", "baseline", args.rows, 100_000)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wd_sok_refdesign_") as tmp:
        for rep in range(args.reps):
            for np_ in args.nps:
                for backend in backends:
                    flags = ["--dataset_path", str(data), "--global_batch_size", str(args.batch),
                             "--eval_batch_size", str(args.batch), "--deep_hidden_units", *map(str, args.hidden),
                             "--benchmark", "--benchmark_warmup_steps", str(args.warmup),
                             "--benchmark_steps", str(args.steps), "--model_dir", f"{tmp}/ckpt",
                             "--results_dir", f"{tmp}/results"]
                    r = common.run_job(backend, np_, flags, args.timeout,
                                       worker_flags=["--bytes"] + common.loader_worker_flags(args.no_loader_fix),
                                       tag=f"{backend}/np{np_}")
                    r.update({"np": np_, "rep": rep})
                    runs.append(r)
                    common.log(f"rep {rep} np {np_} {backend}: step {r['step_s'] * 1e3:.0f} ms, "
                               f"{r['train_samples_per_s']:,.0f} samples/s, sent/rank/step "
                               f"{r['bytes']['total_bytes'] / 2**20:.1f} MiB, peak RSS/rank "
                               f"{[round(x / 2**30, 2) for x in r['peak_rss_bytes_per_rank']]} GiB, "
                               f"probe loss {r['probe_loss']:.5f}")

    rows = []
    for np_ in args.nps:
        ref_step = common.median(r["step_s"] for r in runs if r["np"] == np_ and r["bench_backend"] == "reference")
        ref_loss = common.median(r["probe_loss"] for r in runs
                                 if r["np"] == np_ and r["bench_backend"] == "reference")
        for backend in backends:
            rs = [r for r in runs if r["np"] == np_ and r["bench_backend"] == backend]
            step = common.spread(r["step_s"] for r in rs)
            rows.append({
                "backend": backend, "np": np_, "step_ms": step["median"] * 1e3, "step_ms_min": step["min"] * 1e3,
                "step_ms_max": step["max"] * 1e3,
                "samples_per_s": common.median(r["train_samples_per_s"] for r in rs),
                "speedup_vs_reference": ref_step / step["median"],
                "sent_mib_per_rank_step": rs[0]["bytes"]["total_bytes"] / 2**20,
                "loopback_mib_per_step_all_ranks": (common.median(r["loopback_bytes_per_step_all_ranks"] for r in rs)
                                                    / 2**20 if "loopback_bytes_per_step_all_ranks" in rs[0] else None),
                "emb_mib_per_rank": [b / 2**20 for b in rs[0]["embedding_bytes_per_rank"]],
                "peak_rss_gib_per_rank": max(max(r["peak_rss_bytes_per_rank"]) for r in rs) / 2**30,
                "probe_loss": common.median(r["probe_loss"] for r in rs),
                "probe_loss_rel_diff_vs_reference": abs(common.median(r["probe_loss"] for r in rs) / ref_loss - 1),
                "step_ms_samples": [r["step_s"] * 1e3 for r in rs]})
    print(common.table(rows, [("backend", "backend"), ("np", "np"), ("step_ms", "step ms"), ("step_ms_min", "min"),
                              ("step_ms_max", "max"), ("samples_per_s", "samples/s"),
                              ("speedup_vs_reference", "x reference"), ("sent_mib_per_rank_step", "sent MiB/rank"),
                              ("loopback_mib_per_step_all_ranks", "lo MiB/step"),
                              ("peak_rss_gib_per_rank", "peak RSS GiB/rank"), ("probe_loss", "probe loss")]))
    path = common.write_json(args.out, {"params": {**vars(args), "backends": backends}, "dataset": str(data),
                                        "results": rows, "raw_runs": runs})
    plot(rows, common.RESULTS / f"{args.out}.png")
    common.log(f"wrote {path}")
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    nps = sorted({r["np"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        sel = [next(r for r in rows if r["backend"] == b and r["np"] == n) for n in nps]
        xs = np.arange(len(nps)) + i * width
        axes[0].bar(xs, [r["step_ms"] for r in sel], width, label=b)
        axes[1].bar(xs, [max(r["sent_mib_per_rank_step"], 1e-3) for r in sel], width, label=b)
    for ax in axes:
        ax.set_xticks(np.arange(len(nps)) + width * (len(backends) - 1) / 2, [f"{n} rank(s)" for n in nps])
        ax.legend()
    axes[0].set_ylabel("step time, ms (median)")
    axes[1].set_ylabel("MiB sent per rank per step")
    axes[1].set_yscale("log")
    fig.suptitle("Reference scheme (dense allreduce) vs sharded, default model, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

"""Train / eval samples/s of the default model vs this machine's measured matmul bound, on CPU.

The default Wide & Deep model (5 x 1024 MLP, dropout 0.1, replicated tables on one process, legacy FTRL +
RMSprop) on synthetic data from ``tests/feature_specs/baseline.yaml`` (91.8M parameters), at several global
batch sizes, with and without ``--xla`` and ``--amp`` (bfloat16 on CPU). Each configuration runs in a fresh
process (``benchmarks/worker.py train``: the project's ``Trainer`` and its ``benchmark_train`` /
``benchmark_eval``, i.e. ``main.py --benchmark``'s code path, live Merlin loader included).

Compute bound, measured in the same run: ``tf.matmul`` GFLOP/s on exactly the MLP's GEMMs forward and
backward (per dense layer: Y = X W, dX = dY W^T, dW = X^T dY) at each batch size, in float32 and bfloat16.
FLOPs per sample: 2 * in * out per dense layer forward; x3 for forward + backward (the input layer's dX is
needed: it is the embeddings' gradient). For the baseline spec the MLP input is 1,248 wide (sum of the 16
embedding widths + 13 numerics), so 2 * (1248*1024 + 4*1024*1024 + 1024*1) = 10.95 MFLOP forward,
32.8 MFLOP per training sample. Elementwise work (bias, ReLU, dropout), embeddings, loss and optimizers
are not counted: they are what the bound leaves out. ``fraction = samples/s / (matmul GFLOP/s / FLOPs per
sample)``; evaluation is held to the same GFLOP/s at a third of the FLOPs (forward only).

The machine is shared, so every training run also times the same GEMMs in its own process right after its
timed steps (``worker.py train --paired_matmul``): ``paired fraction`` = median over runs of train
samples/s / that run's bound. The separate ``matmul`` runs (one per repetition) are reported too.

Target: >= 70% of the bound for the default config (float32, no XLA), judged on the paired fraction. With
``--breakdown`` the default config is also profiled part by part (``worker.breakdown``).

Usage::

    .venv/bin/python benchmarks/throughput.py                          # ~40 min on 2 busy cores
    .venv/bin/python benchmarks/throughput.py --batch_sizes 4096 --reps 1 --modes fp32   # one quick point

Writes ``benchmarks/results/throughput.json`` and ``throughput.png``.
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

WORKER = str(common.BENCH / "worker.py")
MODES = {"fp32": [], "xla": ["--xla"], "amp": ["--amp"], "amp_xla": ["--amp", "--xla"]}
MODES.update({f"{m}+spin": flags for m, flags in list(MODES.items())})  # + worker --no_loader_fix


def worker_extra(mode: str) -> list[str]:
    """Worker flags of a mode: ``+spin`` modes run Merlin's loader thread unpatched (busy-waiting)."""
    return common.loader_worker_flags(mode.endswith("+spin"))


def mlp_dims(spec_dict: dict[str, Any], hidden: list[int]) -> list[int]:
    """[input width, hidden..., 1] of the deep MLP for a spec (embedding_dim of every categorical + numerics)."""
    ch, fs = spec_dict["channel_spec"], spec_dict["feature_spec"]
    cats = list(ch.get("onehot_categorical") or []) + list(ch.get("multihot_categorical") or [])
    width = sum(int(fs[n]["embedding_dim"]) for n in cats) + len(ch.get("numerical") or [])
    return [width, *hidden, 1]


def flops_per_sample(dims: list[int]) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs per sample of an MLP with these widths: 2*in*out per layer, x3."""
    fwd = sum(2 * i * o for i, o in zip(dims[:-1], dims[1:], strict=True))
    return fwd, 3 * fwd


def train_flags(data: Path, batch: int, mode: str, warmup: int, steps: int, run_dir: Path) -> list[str]:
    return ["--dataset_path", str(data), "--global_batch_size", str(batch), "--eval_batch_size", str(batch),
            "--benchmark", "--benchmark_warmup_steps", str(warmup), "--benchmark_steps", str(steps),
            "--embedding_backend", "replicated", "--model_dir", str(run_dir / "ckpt"),
            "--results_dir", str(run_dir / "results"), *MODES[mode]]


def run_worker(args: list[str], timeout: float) -> dict[str, Any]:
    """One ``worker.py`` process (default threads); its result, with the 1-minute load before and after."""
    load_before = os.getloadavg()[0]
    out = common.launch(1, [WORKER, *args], timeout=timeout)
    found = common.result_lines(out)
    if not found:
        raise RuntimeError(f"no BENCH_RESULT in output:\n{out[-3000:]}")
    return {**found[-1], "loadavg1_before_after": [load_before, os.getloadavg()[0]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--modes", nargs="+", default=["fp32", "xla", "amp", "amp_xla"], choices=list(MODES),
                   help="a '+spin' suffix runs the mode with worker --no_loader_fix")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=300_000, help="training rows of the synthetic dataset")
    p.add_argument("--breakdown", action="store_true", help="profile the default config (first batch size "
                   ">= 4096, fp32) part by part")
    p.add_argument("--breakdown_modes", nargs="+", default=["fp32"], choices=list(MODES))
    p.add_argument("--interleaved", type=int, default=0, metavar="R", help="also R rounds of alternating "
                   "[live step, in-memory step, GEMMs] per batch size for --interleaved_modes (worker.interleaved); "
                   "the target verdict then uses these per-round ratios")
    p.add_argument("--interleaved_modes", nargs="+", default=["fp32"], choices=list(MODES))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="throughput")
    args = p.parse_args(argv)

    spec = common.load_spec_dict("baseline")
    data = common.ensure_dataset(f"baseline_{args.rows}_t100k", spec, args.rows, 100_000)
    hidden = [1024] * 5
    dims = mlp_dims(spec, hidden)
    fwd, fwd_bwd = flops_per_sample(dims)
    common.log(f"MLP {dims}: {fwd / 1e6:.2f} MFLOP forward, {fwd_bwd / 1e6:.2f} MFLOP fwd+bwd per sample")
    dtypes = {"float32": any(not m.startswith("amp") for m in args.modes),
              "bfloat16": any(m.startswith("amp") for m in args.modes)}

    matmul: dict[tuple[str, int], list[float]] = {}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="wd_sok_thr_") as tmp:
        for rep in range(args.reps):
            for dtype, wanted in dtypes.items():
                if not wanted:
                    continue
                r = run_worker(["matmul", "--dtype", dtype, "--batch_sizes", *map(str, args.batch_sizes),
                                "--dims", *map(str, dims)], args.timeout)
                for row in r["results"]:
                    matmul.setdefault((dtype, row["batch"]), []).append(row["gflops"])
                    common.log(f"rep {rep} matmul {dtype} batch {row['batch']}: {row['gflops']:.1f} GFLOP/s")
            for b in args.batch_sizes:
                for mode in args.modes:
                    flags = train_flags(data, b, mode, args.warmup, args.steps, Path(tmp) / f"{mode}_{b}")
                    r = run_worker(["train", "--eval", "--paired_matmul", *worker_extra(mode), "--tag", f"{mode}@{b}",
                                    "--", *flags], args.timeout)
                    runs.setdefault((mode, b), []).append(r)
                    common.log(f"rep {rep} {mode} batch {b}: train {r['train_samples_per_s']:,.0f} eval "
                               f"{r['eval_samples_per_s']:,.0f} samples/s; paired matmul "
                               f"{r['paired_matmul']['gflops']:.0f} GFLOP/s -> "
                               f"{r['train_samples_per_s'] / r['paired_matmul']['bound_samples_per_s']:.1%} "
                               f"of bound (build {r['build_s']:.0f} s, load {r['loadavg1_before_after']})")
        breakdowns = {}
        if args.breakdown:
            b = next((x for x in args.batch_sizes if x >= 4096), args.batch_sizes[-1])
            for mode in args.breakdown_modes:
                flags = train_flags(data, b, mode, 2, 3, Path(tmp) / f"bd_{mode}_{b}")
                r = run_worker(["train", "--breakdown", "--breakdown_steps", "5", *worker_extra(mode), "--tag",
                                f"{mode}@{b}", "--", *flags], args.timeout)
                breakdowns[f"{mode}@{b}"] = {"batch": b, "live_step_s": r["step_s"], **r["breakdown"]}
                common.log(f"breakdown {mode}@{b}: {breakdowns[f'{mode}@{b}']}")

        inter: dict[str, Any] = {}
        for b in args.batch_sizes if args.interleaved else []:
            for mode in args.interleaved_modes:
                flags = train_flags(data, b, mode, 1, 1, Path(tmp) / f"il_{mode}_{b}")
                r = run_worker(["train", "--interleaved", str(args.interleaved), *worker_extra(mode), "--tag",
                                f"{mode}@{b}", "--", *flags], args.timeout)
                inter[f"{mode}@{b}"] = {"batch": b, "mode": mode, **r["interleaved"],
                                        "loadavg1_before_after": r["loadavg1_before_after"]}
                il = inter[f"{mode}@{b}"]
                common.log(f"interleaved {mode}@{b}: live {common.median(il['t_live_s']):.3f} s, in-memory "
                           f"{common.median(il['t_prefetched_s']):.3f} s, GEMMs {common.median(il['t_gemm_s']):.3f} s"
                           f" -> {il['fraction_live']:.1%} of bound ({il['fraction_compute']:.1%} without loader)")
    if not args.reps:
        target = {"goal": "train step >= 70% of the GEMM bound (interleaved rounds)",
                  "per_run": {k: {"fraction": v["fraction_live"], "met": v["fraction_live"] >= 0.7}
                              for k, v in inter.items()}}
        for k, t in target["per_run"].items():
            print(f"target >= 70% of bound, {k}: {'MET' if t['met'] else 'NOT MET'} ({t['fraction']:.1%})")
        path = common.write_json(args.out, {"params": vars(args), "dataset": str(data), "mlp_dims": dims,
                                            "flops_per_sample_forward": fwd, "flops_per_sample_train": fwd_bwd,
                                            "interleaved": inter, "target": target, "breakdown": breakdowns})
        common.log(f"wrote {path}")
        return 0

    rows = []
    for b in args.batch_sizes:
        for mode in args.modes:
            dtype = "bfloat16" if mode.startswith("amp") else "float32"  # noqa: SIM108
            gflops = common.median(matmul[(dtype, b)])
            train = common.spread(r["train_samples_per_s"] for r in runs[(mode, b)])
            ev = common.spread(r["eval_samples_per_s"] for r in runs[(mode, b)])
            bound = gflops * 1e9 / fwd_bwd
            paired = [r["train_samples_per_s"] / r["paired_matmul"]["bound_samples_per_s"] for r in runs[(mode, b)]]
            rows.append({"mode": mode, "batch": b, "train_samples_per_s": train["median"],
                         "paired_fraction": common.median(paired), "paired_fraction_samples": paired,
                         "paired_matmul_gflops": common.median(r["paired_matmul"]["gflops"] for r in runs[(mode, b)]),
                         "train_min": train["min"], "train_max": train["max"], "eval_samples_per_s": ev["median"],
                         "matmul_dtype": dtype, "matmul_gflops": gflops, "bound_samples_per_s": bound,
                         "fraction_of_bound": train["median"] / bound,
                         "eval_fraction_of_bound": ev["median"] / (gflops * 1e9 / fwd),
                         "achieved_mlp_gflops": train["median"] * fwd_bwd / 1e9,
                         "train_samples": [r["train_samples_per_s"] for r in runs[(mode, b)]],
                         "eval_samples": [r["eval_samples_per_s"] for r in runs[(mode, b)]]})
    default = [r for r in rows if r["mode"] == "fp32"]  # the project as is
    target = {"goal": "fp32 (default flags, no XLA/AMP) train samples/s >= 70% of the float32 matmul bound; "
                      "verdict on the conservative fraction: median train rate / the bound from the median of "
                      "the separate matmul runs (the paired and interleaved fractions, whose GEMM timings share "
                      "the loaded process and can exceed 1, are reported beside it)",
              "per_batch": {r["batch"]: {"fraction": r["fraction_of_bound"], "paired_fraction": r["paired_fraction"],
                                         "met": r["fraction_of_bound"] >= 0.7, "basis": "separate matmul runs"}
                            for r in default}}
    for v in inter.values():
        if v["mode"] == "fp32" and v["batch"] in target["per_batch"]:
            target["per_batch"][v["batch"]]["interleaved_fraction"] = v["fraction_live"]
    print(common.table(rows, [("mode", "mode"), ("batch", "batch"), ("train_samples_per_s", "train/s"),
                              ("train_min", "min"), ("train_max", "max"), ("eval_samples_per_s", "eval/s"),
                              ("matmul_gflops", "matmul GF/s"), ("bound_samples_per_s", "bound/s"),
                              ("fraction_of_bound", "train/bound"), ("paired_matmul_gflops", "paired GF/s"),
                              ("paired_fraction", "train/paired"), ("eval_fraction_of_bound", "eval/bound")]))
    for b, t in target["per_batch"].items():
        print(f"target >= 70% of bound at batch {b}: {'MET' if t['met'] else 'NOT MET'} ({t['fraction']:.1%})")
    # issue 16: fp32 >= 0.90 of its bound, --amp >= 0.70 of the bfloat16 bound, at every batch measured
    target["issue16"] = {}
    for r in rows:
        goal = {"fp32": 0.90, "amp": 0.70}.get(r["mode"])
        if goal is not None:
            met = r["fraction_of_bound"] >= goal
            target["issue16"][f"{r['mode']}@{r['batch']}"] = {"goal": goal, "fraction": r["fraction_of_bound"],
                                                             "paired_fraction": r["paired_fraction"], "met": met}
            print(f"target {r['mode']}_fraction_of_bound@{r['batch']}: {'MET' if met else 'NOT MET'} "
                  f"({r['fraction_of_bound']:.3f} vs the median separate {r['matmul_dtype']} matmul runs, "
                  f"{r['paired_fraction']:.3f} paired; goal >= {goal:.2f})")
    for name, bd in breakdowns.items():
        print(f"\nbreakdown {name} (seconds per step, median):")
        for k, v in bd.items():
            print(f"  {k:28s} {v:8.3f}")
    path = common.write_json(args.out, {
        "params": vars(args), "dataset": str(data), "mlp_dims": dims, "flops_per_sample_forward": fwd,
        "flops_per_sample_train": fwd_bwd,
        "flop_count": "2*in*out per dense layer forward (6 layers incl. the 1-unit head), x3 for fwd+bwd",
        "matmul_gflops_samples": {f"{d}@{b}": v for (d, b), v in matmul.items()},
        "results": rows, "target": target, "breakdown": breakdowns, "interleaved": inter,
        "raw_runs": {f"{m}@{b}": v for (m, b), v in runs.items()}})
    plot(rows, common.RESULTS / f"{args.out}.png")
    common.log(f"wrote {path}")
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        sel = [next(r for r in rows if r["mode"] == m and r["batch"] == b) for b in batches]
        xs = np.arange(len(batches)) + i * width
        axes[0].bar(xs, [r["train_samples_per_s"] for r in sel], width, label=m)
        axes[0].scatter(xs, [r["bound_samples_per_s"] for r in sel], marker="_", s=200, color="k")
        axes[1].bar(xs, [r["fraction_of_bound"] for r in sel], width, label=m)
    for ax in axes:
        ax.set_xticks(np.arange(len(batches)) + width * (len(modes) - 1) / 2, [str(b) for b in batches])
        ax.set_xlabel("global batch")
    axes[0].set_ylabel("train samples/s (median); - = matmul bound")
    axes[1].set_ylabel("train samples/s / matmul bound (medians)")
    axes[1].axhline(0.7, color="r", ls="--", lw=1, label="target 0.7")
    axes[0].legend()
    axes[1].legend()
    fig.suptitle("Wide & Deep 5x1024 on CPU: throughput vs measured matmul bound")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

"""wd-sok vs DeepCTR's WDL (deepctr 0.9.4) on the same synthetic data and hidden units: samples/s and AUC.

Same data (``tests/feature_specs/baseline.yaml``; the README demo's sizes: 200k train / 50k test rows), same
architecture (wide: dim-1 embeddings + linear numerics; deep: the spec's embedding widths, 5 x 1024 ReLU,
dropout 0.1, sum pooling of multi-hot lists), same epochs, global batch 4096, one process on CPU.

* ``wd-sok``: the project's Trainer, ``fit()`` with the demo flags (legacy FTRL lr 0.02 on the wide part,
  RMSprop rho 0.5 (lazy sparse update), lr 0.001 with 0.5 warm-up epochs on the deep part; live Merlin loader).
  Train samples/s per epoch are the ``train_throughput`` the trainer logs at each epoch end (evaluation
  and checkpointing excluded).
* ``deepctr_rmsprop``: DeepCTR WDL, one legacy RMSprop(lr 0.001, rho 0.5) for all weights (DeepCTR takes one
  optimizer), L2 terms 0 (wd-sok has none); ``deepctr_adam``: DeepCTR's documented usage,
  ``compile("adam", "binary_crossentropy")`` with its default L2 (1e-5 on embeddings and linear part).
  Data fed as in-memory numpy arrays (DeepCTR's usual input; multi-hot lists padded to max_hotness with
  id 0 = padding, so ids are shifted by +1 and vocabularies grow by 1). Samples/s per epoch from the
  wall time of ``model.fit(..., epochs=1)``.

AUC: exact (tie-aware rank AUC, ``wd_sok.tools.generate.auc``) of each model's test probabilities, next to
the Bayes-optimal AUC of the generated data; wd-sok's own streaming AUC (8000 buckets) is reported too.
Each framework runs in a fresh process; runs are interleaved over repetitions.

DeepCTR is not in the project's pinned environment: it is installed with ``pip install --no-deps
--target $WD_SOK_BENCH_DATA/deepctr_pkgs deepctr==0.9.4`` (done by this script if missing; nothing in
.venv changes) and put on PYTHONPATH for its runs only.

Usage: ``.venv/bin/python benchmarks/deepctr_peer.py [--epochs 2] [--reps 3]``; writes
``benchmarks/results/deepctr_peer.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # wd_sok, for the child processes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEEPCTR_DIR = common.DATA / "deepctr_pkgs"
FRAMEWORKS = ("wd-sok", "deepctr_rmsprop", "deepctr_adam")


def ensure_deepctr() -> Path:
    """deepctr 0.9.4 (no dependencies: TF, numpy, h5py, requests are already in .venv) in a side folder."""
    if not (DEEPCTR_DIR / "deepctr" / "models" / "wdl.py").exists():
        subprocess.run([common.PYTHON, "-m", "pip", "install", "--no-deps", "--target", str(DEEPCTR_DIR),
                        "deepctr==0.9.4"], check=True)
    return DEEPCTR_DIR


# ----------------------------------------------------------------------------- child processes
def child_wdsok(data: Path, epochs: int, batch: int, eval_batch: int, seed: int) -> dict[str, Any]:
    """Train wd-sok for ``epochs`` (demo flags) and score the test set."""
    import numpy as np
    import tensorflow as tf

    from wd_sok.config import parse_config
    from wd_sok.distributed import Runtime
    from wd_sok.reporting import Reporter
    from wd_sok.tools.generate import auc
    from wd_sok.train import Trainer

    tf.config.set_visible_devices([], "GPU")
    with tempfile.TemporaryDirectory(prefix="wd_sok_peer_") as tmp:
        cfg = parse_config(["--dataset_path", str(data), "--num_epochs", str(epochs), "--global_batch_size",
                            str(batch), "--eval_batch_size", str(eval_batch), "--deep_warmup_epochs", "0.5",
                            "--deep_learning_rate", "0.001", "--log_every", "100000", "--seed", str(seed),
                            "--embedding_backend", "replicated", "--model_dir", f"{tmp}/ckpt",
                            "--results_dir", f"{tmp}/results"])
        trainer = Trainer(cfg, Runtime())
        reporter = Reporter(cfg.results_dir, cfg.log_filename, enabled=True)
        trainer.attach(reporter)
        t0 = time.perf_counter()
        metrics = trainer.fit()
        fit_s = time.perf_counter() - t0
        reporter.close()
        rates = common.dllogger_values(Path(cfg.results_dir) / cfg.log_filename, "train_throughput")
        probs, labels = [], []
        t0 = time.perf_counter()
        for b in trainer.eval_data:
            probs.append(trainer.eval_step(b).numpy())
            labels.append(b.label.numpy())
        pred_s = time.perf_counter() - t0
        probs, labels = np.concatenate(probs), np.concatenate(labels)
    return {"framework": "wd-sok", "train_samples_per_s_by_epoch": rates,
            "fit_wall_s": fit_s,
            "auc": auc(probs, labels), "streaming_auc": metrics.get("auc_roc"), "loss_val": metrics.get("loss_val"),
            "eval_samples_per_s": len(labels) / pred_s, "parameters": trainer.parameter_count()}


def child_deepctr(data: Path, epochs: int, batch: int, eval_batch: int, seed: int, optimizer: str
                  ) -> dict[str, Any]:
    """Train DeepCTR WDL with the same architecture on in-memory arrays and score the test set."""
    import numpy as np
    import pyarrow.parquet as pq
    import tensorflow as tf

    from wd_sok.feature_spec import TEST, TRAIN, FeatureSpec
    from wd_sok.tools.generate import auc

    tf.config.set_visible_devices([], "GPU")
    tf.keras.utils.set_random_seed(seed)
    from deepctr.feature_column import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr.models import WDL

    spec = FeatureSpec.from_yaml(data / "feature_spec.yaml")
    dims = spec.embedding_dims()

    def arrays(mapping: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        tabs = [pq.read_table(f) for f in spec.files(mapping)]
        x: dict[str, np.ndarray] = {}
        for name in spec.onehot:
            x[name] = np.concatenate([t.column(name).to_numpy() for t in tabs]).astype(np.int32)[:, None]
        for name in spec.multihot:
            k, rows = spec.max_hotness(name), []
            for t in tabs:
                col = t.column(name).combine_chunks()
                vals, off = col.values.to_numpy().astype(np.int32) + 1, col.offsets.to_numpy()
                pad = np.zeros((len(off) - 1, k), np.int32)
                lengths = np.diff(off)
                mask = np.arange(k)[None, :] < lengths[:, None]
                pad[mask] = vals
                rows.append(pad)
            x[name] = np.concatenate(rows)
        for name in spec.numerical:
            x[name] = np.concatenate([t.column(name).to_numpy() for t in tabs]).astype(np.float32)[:, None]
        y = np.concatenate([t.column(spec.label).to_numpy() for t in tabs]).astype(np.float32)
        return x, y

    x_train, y_train = arrays(TRAIN)
    x_test, y_test = arrays(TEST)
    columns: list[Any] = [SparseFeat(n, vocabulary_size=spec.cardinality(n), embedding_dim=dims[n])
                          for n in spec.onehot]
    columns += [VarLenSparseFeat(SparseFeat(n, vocabulary_size=spec.cardinality(n) + 1, embedding_dim=dims[n]),
                                 maxlen=spec.max_hotness(n), combiner="sum") for n in spec.multihot]
    columns += [DenseFeat(n, 1) for n in spec.numerical]
    l2 = {} if optimizer == "adam" else {"l2_reg_linear": 0.0, "l2_reg_embedding": 0.0}
    model = WDL(columns, columns, dnn_hidden_units=[1024] * 5, dnn_dropout=0.1, seed=seed, **l2)
    opt = "adam" if optimizer == "adam" else tf.keras.optimizers.legacy.RMSprop(0.001, rho=0.5)
    model.compile(opt, "binary_crossentropy")
    rates = []
    n = (len(y_train) // batch) * batch  # whole batches, as wd-sok (drop_last)
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.fit({k: v[:n] for k, v in x_train.items()}, y_train[:n], batch_size=batch, epochs=1,
                  shuffle=True, verbose=0)
        rates.append(n / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    probs = model.predict(x_test, batch_size=eval_batch, verbose=0)[:, 0]
    pred_s = time.perf_counter() - t0
    return {"framework": f"deepctr_{optimizer}", "train_samples_per_s_by_epoch": rates,
            "auc": auc(probs, y_test), "eval_samples_per_s": len(y_test) / pred_s,
            "parameters": int(model.count_params())}


# ----------------------------------------------------------------------------- driver
def run_child(framework: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    extra = {"PYTHONPATH": f"{common.ROOT}:{DEEPCTR_DIR}"} if framework.startswith("deepctr") else {}
    cmd = [str(Path(__file__).resolve()), "--child", framework, "--data", str(data), "--epochs", str(args.epochs),
           "--batch", str(args.batch), "--eval_batch", str(args.eval_batch), "--seed", str(args.seed)]
    out = common.launch(1, cmd, timeout=args.timeout, env=common.bench_env(extra=extra))
    found = common.result_lines(out)
    if not found:
        raise RuntimeError(f"{framework}: no result\n{out[-3000:]}")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--train_rows", type=int, default=200_000)
    p.add_argument("--test_rows", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--eval_batch", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default="deepctr_peer")
    p.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        data = Path(args.data)
        if args.child.startswith("wd-sok"):
            res = child_wdsok(data, args.epochs, args.batch, args.eval_batch, args.seed)
        else:
            res = child_deepctr(data, args.epochs, args.batch, args.eval_batch, args.seed,
                                args.child.removeprefix("deepctr_"))
        print("BENCH_RESULT " + json.dumps(res, default=float), flush=True)
        return 0

    ensure_deepctr()
    data = common.ensure_dataset(f"baseline_{args.train_rows}_t{args.test_rows}", "baseline", args.train_rows,
                                 args.test_rows)
    report = json.loads((data / "generator_report.json").read_text())
    runs: dict[str, list[dict[str, Any]]] = {f: [] for f in args.frameworks}
    for rep in range(args.reps):
        for fw in args.frameworks:
            r = run_child(fw, data, args)
            runs[fw].append(r)
            common.log(f"rep {rep} {fw}: train {r['train_samples_per_s_by_epoch']} samples/s, AUC {r['auc']:.4f}")
    rows = []
    base = common.median(common.median(r["train_samples_per_s_by_epoch"]) for r in runs.get("wd-sok", []))
    for fw, rs in runs.items():
        train = common.spread(common.median(r["train_samples_per_s_by_epoch"]) for r in rs)
        rows.append({"framework": fw, "train_samples_per_s": train["median"], "train_min": train["min"],
                     "train_max": train["max"], "vs_wd_sok": train["median"] / base if base == base else None,
                     "eval_samples_per_s": common.median(r["eval_samples_per_s"] for r in rs),
                     "auc": common.median(r["auc"] for r in rs), "auc_min": min(r["auc"] for r in rs),
                     "auc_max": max(r["auc"] for r in rs), "parameters": rs[0]["parameters"]})
    print(common.table(rows, [("framework", "framework"), ("train_samples_per_s", "train/s"), ("train_min", "min"),
                              ("train_max", "max"), ("vs_wd_sok", "x wd-sok"), ("eval_samples_per_s", "eval/s"),
                              ("auc", "AUC"), ("auc_min", "AUC min"), ("auc_max", "AUC max"),
                              ("parameters", "params")]))
    print(f"Bayes-optimal test AUC of the data: {report['bayes_auc']:.4f}")
    path = common.write_json(args.out, {"params": {k: v for k, v in vars(args).items() if k not in ("child", "data")},
                                        "dataset": str(data), "bayes_auc": report["bayes_auc"], "results": rows,
                                        "raw_runs": runs})
    plot(rows, report["bayes_auc"], common.RESULTS / f"{args.out}.png")
    common.log(f"wrote {path}")
    return 0


def plot(rows: list[dict[str, Any]], bayes: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["framework"] for r in rows]
    axes[0].bar(names, [r["train_samples_per_s"] for r in rows])
    axes[0].set_ylabel("train samples/s (median)")
    axes[1].bar(names, [r["auc"] for r in rows])
    axes[1].axhline(bayes, color="r", ls="--", lw=1, label=f"Bayes-optimal {bayes:.3f}")
    axes[1].set_ylim(0.5, max(bayes, max(r["auc"] for r in rows)) + 0.02)
    axes[1].set_ylabel("test AUC (median)")
    axes[1].legend()
    fig.suptitle("wd-sok vs DeepCTR WDL, same data / architecture / epochs, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

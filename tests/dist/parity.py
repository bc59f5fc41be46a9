"""Parity of an embedding backend with the replicated oracle, under ``horovodrun -np N`` (or one process).

For each case ``combiner:plan`` (combiner sum or mean; plan ``row``: every table row-wise, ``auto``: the
planner's choice, ``mixed``: every placement at once through the spec's overrides, see :data:`MIXED`) two
real :class:`wd_sok.train.Trainer` s are built from the same config and seed: one with the backend under test
(``--backend``, default sharded), one replicated (whose table gradients Horovod allreduces). Each rank feeds both the same batches of its own data shard to the real
train steps. Checked (max over ranks, atol ``--atol``):

* forward probabilities on an eval batch before training and after 1 and 10 optimizer steps;
* every whole table (gathered in global row order) and its optimizer slots, and every dense weight, after
  1 and 10 steps.

Also checks that each rank holds within 5% of 1/N of a collection of realistic tables (1e5 rows).
Rank 0 writes a JSON report to ``--out``; the exit code is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wd_sok.config import Config  # noqa: E402
from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.embedding import make_embedding  # noqa: E402
from wd_sok.feature_spec import TableConfig  # noqa: E402
from wd_sok.train import Trainer  # noqa: E402

from tests.dist.state import gathered_state  # noqa: E402

CHECK_AFTER = (1, 10)
# every placement in one model (tests/dist/common.py's features): a row-wise table, a replicated one reduced
# sparse (1001 rows, ~24 touched per rank), a replicated one reduced dense (13 rows, all touched), and two
# table-wise ones (whose owners the planner picks: the ranks sending least)
MIXED = {"a": "row_wise", "b": "replicated", "p": "table_wise", "m": "table_wise", "n": "replicated"}
EXPECTED_MIXED = {"a": {"kind": "row_wise"}, "b": {"kind": "replicated", "reduction": "sparse"},
                  "n": {"kind": "replicated", "reduction": "dense"}}
REALISTIC = [TableConfig("big", 100_000, 16), TableConfig("mid", 25_013, 16), TableConfig("tiny", 4, 16),
             TableConfig("wide", 100_003, 1)]


def max_over_ranks(rt: Runtime, value: float, name: str) -> float:
    if rt.size == 1:
        return float(value)
    return float(rt.hvd.allreduce(tf.constant(value, tf.float64), op=rt.hvd.Max, name=name).numpy())


def state_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, list[str]]:
    """Max |a - b| over the keys of ``b`` (the oracle's), and the keys missing from ``a``."""
    missing = [k for k in b if k not in a]
    diffs = [float(np.max(np.abs(a[k].astype(np.float64) - b[k]), initial=0.0)) for k in b if k in a]
    return max(diffs, default=0.0), missing


def mixed_spec(data: str, rank: int) -> str:
    """A copy of ``data``'s spec with :data:`MIXED` placement overrides (one file per rank: no race)."""
    spec = yaml.safe_load((Path(data) / "feature_spec.yaml").read_text())
    for name, placement in MIXED.items():
        spec["feature_spec"][name]["placement"] = placement
    name = f"feature_spec_mixed_r{rank}.yaml"
    (Path(data) / name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return name


def run_case(rt: Runtime, data: str, backend: str, case: str, tmp: Path) -> dict:
    combiner, plan = case.split(":")
    cfg = Config(dataset_path=data, global_batch_size=48, eval_batch_size=48, num_epochs=1, seed=3,
                 deep_hidden_units=[16, 16], deep_dropout=0.1, combiner=combiner, deep_learning_rate=0.01,
                 deep_warmup_epochs=0.0, linear_learning_rate=0.1, model_dir=str(tmp / "ckpt"),
                 results_dir=str(tmp / "results"))
    if plan == "mixed":
        cfg = cfg.replace(fspec_file=mixed_spec(data, rt.rank))
    test = Trainer(cfg.replace(embedding_backend=backend, embedding_plan="row" if plan == "row" else "auto"), rt)
    oracle = Trainer(cfg.replace(embedding_backend="replicated"), rt)
    test.train_data.set_epoch(0)
    batches = [b for _, b in zip(range(max(CHECK_AFTER)), test.train_data, strict=False)]
    probe = next(iter(test.eval_data))
    report = {"backend": test.backend, "forward_0": 0.0,
              "placements": {n: test.model.deep_embedding.placement(n).describe() for n in test.spec.categorical},
              "wide_placements": {n: test.model.wide_embedding.placement(n).describe()
                                  for n in test.spec.categorical}}
    p0 = np.abs(test.eval_step(probe).numpy() - oracle.eval_step(probe).numpy()).max(initial=0.0)
    report["forward_0"] = max_over_ranks(rt, float(p0), f"fwd0_{combiner}")
    initial = gathered_state(oracle.model, oracle.wide_opt, oracle.deep_opt, rt)
    for step, batch in enumerate(batches, start=1):
        g = tf.constant(step - 1, tf.int64)
        loss_t, loss_o = test.train_step(batch, g), oracle.train_step(batch, g)
        report[f"loss_{step}"] = max_over_ranks(rt, abs(float(loss_t) - float(loss_o)), f"loss{step}{combiner}")
        if step in CHECK_AFTER:
            fwd = np.abs(test.eval_step(probe).numpy() - oracle.eval_step(probe).numpy()).max(initial=0.0)
            report[f"forward_{step}"] = max_over_ranks(rt, float(fwd), f"fwd{step}_{combiner}")
            diff, missing = state_diff(gathered_state(test.model, test.wide_opt, test.deep_opt, rt),
                                       gathered_state(oracle.model, oracle.wide_opt, oracle.deep_opt, rt))
            report[f"weights_{step}"] = max_over_ranks(rt, diff, f"w{step}_{combiner}")
            report[f"missing_{step}"] = missing
    # not vacuous: the oracle's tables and weights did move (tables only: moved_tables)
    final = gathered_state(oracle.model, oracle.wide_opt, oracle.deep_opt, rt)
    report["moved_tables"] = min(float(np.abs(final[k] - initial[k]).max())
                                 for k in initial if k.startswith(("wide/", "deep/")) and ":" not in k)
    report["steps"] = len(batches)
    return report


def memory_report(rt: Runtime, backend: str) -> dict:
    """This rank's share of a realistic collection, vs total / N."""
    emb = make_embedding(backend, REALISTIC, "glorot_normal", 0, "mem", rt)
    total = sum(t.cardinality * t.dim * 4 for t in REALISTIC)
    share = emb.local_bytes() / (total / rt.size)
    worst = max_over_ranks(rt, abs(share - 1.0), "mem_share")
    return {"local_bytes_rank0": emb.local_bytes(), "total_bytes": total, "worst_rel_deviation": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="sharded")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--cases", nargs="+", default=["sum:row", "mean:row"], help="combiner:plan ...")
    args = parser.parse_args()
    rt = Runtime()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:  # one GPU per rank, as main.py does
        gpu = gpus[rt.local_rank % len(gpus)]
        tf.config.set_visible_devices([gpu], "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
    tmp = Path(args.out).parent / f"parity_rank{rt.rank}"
    report = {"ranks": rt.size, "cases": {}}
    for case in args.cases:
        report["cases"][case] = run_case(rt, args.data, args.backend, case, tmp)
    report["memory"] = memory_report(rt, args.backend)
    failures = []
    for combiner, r in report["cases"].items():
        for key, value in r.items():
            if key.startswith(("forward_", "weights_", "loss_")) and not value <= args.atol:
                failures.append(f"{combiner}: {key} = {value:.3g} > {args.atol}")
            if key.startswith("missing_") and value:
                failures.append(f"{combiner}: {key}: {value}")
        if not r["moved_tables"] > 1e-3:
            failures.append(f"{combiner}: some table barely trained (max change {r['moved_tables']:.3g})")
        if r["steps"] < max(CHECK_AFTER):
            failures.append(f"{combiner}: only {r['steps']} training batches")
        if combiner.endswith(":mixed"):
            kinds = {n: p["kind"] for n, p in r["placements"].items()}
            if kinds != MIXED or any(r["placements"][n] != p for n, p in EXPECTED_MIXED.items()) \
                    or r["wide_placements"] != r["placements"]:
                failures.append(f"{combiner}: placements {r['placements']} (wide {r['wide_placements']})")
    if report["memory"]["worst_rel_deviation"] > 0.05:
        failures.append(f"memory: a rank holds {report['memory']['worst_rel_deviation']:.1%} off total/N")
    report["failures"] = failures
    if rt.is_chief:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(("PARITY PASS" if not failures else "PARITY FAIL") + f" ({rt.size} ranks, {args.backend}): "
              + ("; ".join(failures) or json.dumps(report["cases"])), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

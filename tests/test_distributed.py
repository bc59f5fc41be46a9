"""Model-parallel embeddings over real Horovod (Gloo) processes: parity, memory, checkpoints, end to end.

Every test launches ``horovodrun --gloo -np N -H localhost:N <python> ...`` (N > 1) or plain python (N = 1)
with a time limit; a missing ``horovodrun`` fails loudly rather than skipping. Data: tests/dist/common.py
(6 train / 3 test files, cardinalities 7, 1001, 2, 11, 13 so no shard split is even at 2 or 3 ranks).

Tolerances:

* parity (sharded vs replicated, same batches): atol 1e-5 on probabilities, whole tables, slots and dense
  weights (observed: bit-identical, since both sum the ranks' row gradients in rank order).
* checkpoint round trips (same weights evaluated by another backend / rank count): 1e-6 on BCE, AUC and
  MAP@12 (only float summation order over ranks and batch shapes differ).
* golden end to end (``horovodrun -np 2`` sharded vs one replicated process, same data, seed, global batch,
  no dropout): both see the same epoch of data, but grouped into different global batches (each rank draws
  its half batch from its own files), so they are two SGD trajectories of the same model, not the same
  numbers. Measured on this data (seeds 0-4): the sharded-vs-single difference at equal seed was at most
  0.0024 AUC, 0.0006 BCE, 0.0087 MAP@12, while single-process runs spread over seeds by 0.017 AUC,
  0.0072 BCE, 0.031 MAP@12 (max - min). The tolerances are that seed-to-seed spread (rounded up: 0.02 AUC,
  0.008 BCE, 0.035 MAP@12): a different batch grouping is a smaller perturbation than a different seed, so
  a correct backend stays well inside. Both runs must also have learned (AUC > 0.7; chance is 0.5). Exact
  equality of the mechanics is the parity test's job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist import common

LIMIT = 240  # seconds per launched command
METRICS = ("loss_val", "auc_roc", "streaming_map_val")


@pytest.fixture(scope="module")
def hvd_run() -> str:
    """horovodrun must exist: the multi-process tests are the point of this file, never skip them."""
    path = common.horovodrun()
    if not path:
        pytest.fail("horovodrun not found next to the Python running pytest nor on PATH: install Horovod "
                    "with Gloo (scripts/setup_env.sh) to run the multi-process tests")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return common.make_dataset(tmp_path_factory.mktemp("dist_data"))


@pytest.mark.parametrize("ranks,cases", [(2, ["sum:row", "mean:mixed"]), (3, ["mean:row", "sum:mixed"])])
def test_sharded_matches_replicated(hvd_run: str, data: Path, tmp_path: Path, ranks: int,
                                    cases: list[str]) -> None:
    """Forward and weights after 1 and 10 real train steps, plus per-rank memory share, for every table
    row-wise and for a mixed plan (row-wise, table-wise, replicated reduced sparse and dense at once).

    Every run covers both poolings: the wide tables always sum (dim 1, one-hot and multi-hot) and the deep
    multi-hot tables use the case's combiner.
    """
    out = tmp_path / "parity.json"
    args = ["tests/dist/parity.py", "--data", str(data), "--out", str(out), "--cases", *cases]
    common.check(common.launch(ranks, args, LIMIT))
    report = json.loads(out.read_text())
    assert report["ranks"] == ranks and report["failures"] == []
    for combiner in cases:
        r = report["cases"][combiner]
        assert r["backend"] == "sharded" and r["steps"] == 10
        for key in ("forward_0", "forward_1", "forward_10", "weights_1", "weights_10"):
            assert r[key] <= 1e-5, (combiner, key, r[key])
    assert report["memory"]["worst_rel_deviation"] <= 0.05


# ---------------------------------------------------------------- main.py: golden run and checkpoint round trips
@pytest.fixture(scope="module")
def trained(hvd_run: str, data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two trainings on the same data: 2 ranks sharded (every table row-wise: the exchange end to end; the
    planner would replicate these small tables) and 1 process replicated."""
    runs = {}
    for name, ranks, flags in (("sharded2", 2, ["sharded", "--embedding_plan", "row"]),
                               ("replicated1", 1, ["replicated"])):
        run_dir = tmp_path_factory.mktemp(name)
        common.check(common.launch(ranks, common.main_args(data, run_dir, "--embedding_backend", *flags), LIMIT))
        runs[name] = run_dir
    return runs


def test_golden_sharded_vs_single_process(trained: dict[str, Path]) -> None:
    sharded = common.final_metrics(trained["sharded2"] / "results")
    single = common.final_metrics(trained["replicated1"] / "results")
    assert sharded["auc_roc"] > 0.7 and single["auc_roc"] > 0.7, (sharded, single)
    assert abs(sharded["auc_roc"] - single["auc_roc"]) < 0.02, (sharded, single)
    assert abs(sharded["loss_val"] - single["loss_val"]) < 0.008, (sharded, single)
    assert abs(sharded["streaming_map_val"] - single["streaming_map_val"]) < 0.035, (sharded, single)


@pytest.mark.parametrize("source,ranks,backend", [
    ("sharded2", 1, "replicated"),   # 2 -> 1, sharded -> replicated
    ("sharded2", 3, "sharded"),      # 2 -> 3, uneven shards
    ("replicated1", 2, "sharded"),   # 1 -> 2, replicated -> sharded
])
def test_checkpoint_round_trip(trained: dict[str, Path], data: Path, tmp_path: Path, source: str, ranks: int,
                               backend: str) -> None:
    """Evaluating a checkpoint on another rank count / backend reproduces the training run's final eval."""
    args = common.main_args(data, tmp_path, "--embedding_backend", backend, "--evaluate", "--use_checkpoint")
    args[args.index("--model_dir") + 1] = str(trained[source] / "ckpt")
    common.check(common.launch(ranks, args, LIMIT))
    want = common.final_metrics(trained[source] / "results")
    got = common.final_metrics(tmp_path / "results")
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got, want)

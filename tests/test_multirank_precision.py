"""--amp (bfloat16 on CPU), --xla and float16 loss scaling under ``horovodrun -np 2`` (issue 12, item 7).

End to end: one epoch of tests/dist/common.py's data (50 steps of 48 rows, 5 tables, 16x16 MLP, no dropout)
with --amp and with --xla, against the same run in float32. Tolerances on BCE / AUC / MAP@12:

* --xla compiles the same float32 MLP: only fusion / summation order differ: 1e-4 on each metric.
* --amp computes the MLP in bfloat16 (8-bit mantissa, rel. precision 2**-8 = 0.004 per op) with float32
  weights and embeddings: 0.01 on BCE, 0.02 on AUC and 0.03 on MAP@12, under the seed-to-seed spread of this
  data measured for tests/test_distributed.py (0.0072 BCE, 0.017 AUC, 0.031 MAP@12 over seeds 0-4, one epoch
  more) rounded up; a broken bf16 path (no learning, NaN) is far outside. Both must also have learned.

Loss scaling (float16, forced on CPU through make_train_step): tests/dist/loss_scaling.py, where only rank 0's
table gradient is non-finite; both ranks must skip the step and halve the scale, and a finite scaled step
must equal an unscaled one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist import common

LIMIT = 300
TOL = {"amp": {"loss_val": 0.01, "auc_roc": 0.02, "streaming_map_val": 0.03},
       "xla": {"loss_val": 1e-4, "auc_roc": 1e-4, "streaming_map_val": 1e-4}}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return common.make_dataset(tmp_path_factory.mktemp("dist_data"))


@pytest.fixture(scope="module")
def fp32(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("fp32")
    common.check(common.launch(2, common.main_args(data, run), LIMIT))
    return common.final_metrics(run / "results")


@pytest.mark.parametrize("mode", ["amp", "xla"])
def test_amp_and_xla_match_float32(data: Path, fp32: dict, tmp_path: Path, mode: str) -> None:
    out = common.check(common.launch(2, common.main_args(data, tmp_path, f"--{mode}"), LIMIT))
    got = common.final_metrics(tmp_path / "results")
    assert got["auc_roc"] > 0.6 and fp32["auc_roc"] > 0.6, (got, fp32)  # both learned (chance: 0.5)
    for key, tol in TOL[mode].items():
        assert abs(got[key] - fp32[key]) <= tol, (mode, key, got[key], fp32[key])
    assert "nan" not in (tmp_path / "results/history.csv").read_text().lower(), out[-2000:]


def test_loss_scaling_skip_is_agreed_across_ranks(tmp_path: Path) -> None:
    out = tmp_path / "loss_scaling.json"
    common.check(common.launch(2, ["tests/dist/loss_scaling.py", "--out", str(out)], LIMIT))
    report = json.loads(out.read_text())
    assert report["ranks"] == 2 and report["failures"] == [], report
    nonfinite_on = [int(r[2]) for r in report["skipped"]]
    assert nonfinite_on == [1, 0]  # the rig: only rank 0's table gradient was non-finite
    assert [r[0] for r in report["skipped"]] == [0.0, 0.0]  # ... and neither rank applied the step
    assert [r[3] for r in report["skipped"]] == [2.0**14, 2.0**14]

"""Raw ids end to end: the generator's dynamic variant of a dataset (ids scrambled into [0, 2**62)) passes the
loader's checks, trains through main.py with dynamic tables, logs their counters, and learns what the same
data with fixed tables learns (same rows, labels and planted signal; only the ids differ)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tests.conftest import tiny_spec_dict
from tests.dist import common
from wd_sok.feature_spec import FeatureSpec
from wd_sok.tools.generate import generate

LIMIT = 300


def test_raw_ids_up_to_2_62_train_like_fixed_tables(tmp_path: Path) -> None:
    raw = tiny_spec_dict()
    raw["feature_spec"]["a"]["cardinality"] = 300
    raw["feature_spec"]["m"]["cardinality"] = 40
    spec = FeatureSpec.from_dict(raw, allow_csv=True)
    report = generate(spec, tmp_path / "fixed", 16_000, 4_000, seed=1)
    generate(spec, tmp_path / "dyn", 16_000, 4_000, seed=1, dynamic=["a", "m"])
    fixed_a = pq.read_table(tmp_path / "fixed" / "train").column("a").to_numpy()
    dyn_a = pq.read_table(tmp_path / "dyn" / "train").column("a").to_numpy()
    assert dyn_a.dtype == np.int64 and dyn_a.max() > 2**50 and np.unique(dyn_a).size == np.unique(fixed_a).size
    metrics = {}
    for name in ("fixed", "dyn"):
        out = common.check(common.launch(1, common.main_args(
            tmp_path / name, tmp_path / f"run_{name}", "--num_epochs", "3", "--global_batch_size", "256",
            "--eval_batch_size", "1024", "--deep_learning_rate", "0.003", "--linear_learning_rate", "0.05"),
            LIMIT))
        metrics[name] = common.final_metrics(tmp_path / f"run_{name}" / "results")
        if name == "dyn":
            assert "dynamic table deep/a: epoch 2: " in out and "dynamic table wide/m: epoch 2: " in out, out[-2000:]
    bayes = report["bayes_auc"]
    for name, m in metrics.items():  # both learned most of the planted signal
        assert m["auc_roc"] > 0.5 + 0.6 * (bayes - 0.5), (name, m, bayes)
    assert abs(metrics["dyn"]["auc_roc"] - metrics["fixed"]["auc_roc"]) < 0.02, metrics

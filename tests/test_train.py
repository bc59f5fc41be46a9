"""End-to-end training through main.py on planted-signal data (subprocesses, small model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from wd_sok.feature_spec import FeatureSpec
from wd_sok.tools.generate import generate

LEARNABLE = {
    "channel_spec": {"onehot_categorical": ["c1", "c2"], "multihot_categorical": ["m"],
                     "numerical": ["x1", "x2", "x3"], "label": ["clicked"], "map": ["display_id"]},
    "feature_spec": {"c1": {"cardinality": 20, "embedding_dim": 8}, "c2": {"cardinality": 50, "embedding_dim": 8},
                     "m": {"cardinality": 30, "max_hotness": 3, "embedding_dim": 8},
                     "x1": {}, "x2": {}, "x3": {}, "clicked": {}, "display_id": {}},
    "source_spec": {
        "train": [{"type": "parquet", "features": ["c1", "c2", "m", "x1", "x2", "x3", "clicked"],
                   "files": ["train/part_0.parquet"]}],
        "test": [{"type": "parquet", "features": ["c1", "c2", "m", "x1", "x2", "x3", "clicked", "display_id"],
                  "files": ["test/part_0.parquet"]}]},
    "metadata": {},
}
FAST = ["--eval_batch_size", "4096", "--deep_hidden_units", "64", "64", "--deep_warmup_epochs", "0.2",
        "--linear_learning_rate", "0.5", "--deep_learning_rate", "0.005", "--global_batch_size", "256"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("planted")
    (root / "spec.yaml").write_text(yaml.safe_dump(LEARNABLE))
    report = generate(FeatureSpec.from_yaml(root / "spec.yaml"), root / "data", n_train=40000, n_test=10000,
                      train_files=2, test_files=2, seed=0)
    return root / "data", report


def run_main(data: Path, work: Path, *args: str, expect: int = 0) -> tuple[list[dict], str]:
    """Run main.py; return the LOG records' (step, data) of results/log.json and the combined output."""
    cmd = [sys.executable, str(ROOT / "main.py"), "--dataset_path", str(data), "--model_dir", str(work / "ckpt"),
           "--results_dir", str(work / "results"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-3000:]
    log = work / "results" / "log.json"
    records = []
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line.removeprefix("DLLL "))
            if rec["type"] == "LOG":
                records.append(rec)
    return records, out


def final(records: list[dict]) -> dict:
    return [r for r in records if r["step"] == []][-1]["data"]


def test_reaches_bayes_optimal_auc(planted: tuple[Path, dict], tmp_path: Path) -> None:
    data, report = planted
    records, out = run_main(data, tmp_path, *FAST, "--num_epochs", "2")
    metrics = final(records)
    assert metrics["auc_roc"] >= report["bayes_auc"] - 0.02, (metrics, report["bayes_auc"])
    assert metrics["streaming_map_val"] > report["random_map12"] + 0.2
    assert metrics["map_groups"] == report["groups"]["test"]
    epochs = [r["step"] for r in records if len(r["step"]) == 1]
    assert epochs == [[1], [2]]  # the epoch counter moves (the reference's stays 0)
    assert (tmp_path / "results" / "history.csv").read_text().count("\n") == 3
    assert "MAP@12" in out


def test_resume_equals_uninterrupted_and_evaluate_reproduces(planted: tuple[Path, dict], tmp_path: Path) -> None:
    data, _ = planted
    whole, _ = run_main(data, tmp_path / "whole", *FAST, "--num_epochs", "2", "--deep_dropout", "0.1")
    steps = 40000 // 256
    # stop mid-epoch (1.5 epochs), then resume: the skipped batches and dropout masks must line up
    run_main(data, tmp_path / "split", *FAST, "--num_epochs", "2", "--max_steps", str(steps + steps // 2))
    resumed, _ = run_main(data, tmp_path / "split", *FAST, "--num_epochs", "2", "--use_checkpoint")
    a, b = final(whole), final(resumed)
    for key in ("loss_val", "auc_roc", "streaming_map_val"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    evaluated, _ = run_main(data, tmp_path / "split", *FAST, "--evaluate", "--use_checkpoint")
    c = final(evaluated)
    for key in ("loss_val", "auc_roc", "streaming_map_val"):
        assert c[key] == pytest.approx(a[key], abs=1e-7), key


def test_missing_checkpoint_is_an_error(planted: tuple[Path, dict], tmp_path: Path) -> None:
    data, _ = planted
    _, out = run_main(data, tmp_path, *FAST, "--use_checkpoint", expect=2)
    assert "no checkpoint" in out and str(tmp_path / "ckpt") in out


def test_benchmark_logs_throughput(planted: tuple[Path, dict], tmp_path: Path) -> None:
    data, _ = planted
    records, _ = run_main(data, tmp_path, *FAST, "--benchmark", "--benchmark_warmup_steps", "3",
                          "--benchmark_steps", "5")
    assert final(records)["train_throughput"] > 0
    records, _ = run_main(data, tmp_path / "e", *FAST, "--benchmark", "--evaluate", "--benchmark_warmup_steps",
                          "0", "--benchmark_steps", "2")
    assert final(records)["validation_throughput"] > 0


def test_help_lists_every_reference_flag() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "-h"], capture_output=True, text=True,
                         timeout=60).stdout
    for flag in ["--dataset_path", "--fspec_file", "--embedding_sizes_file", "--use_checkpoint", "--model_dir",
                 "--results_dir", "--log_filename", "--global_batch_size", "--eval_batch_size", "--num_epochs",
                 "--cpu", "--amp", "--xla", "--linear_learning_rate", "--deep_learning_rate",
                 "--deep_warmup_epochs", "--deep_hidden_units", "--deep_dropout", "--combiner",
                 "--num_auc_thresholds", "--disable_map_calculation", "--evaluate", "--benchmark",
                 "--benchmark_warmup_steps", "--benchmark_steps"]:
        assert flag in out, flag
    assert "131072" in out and "0.00012" in out  # defaults shown come from the config fields

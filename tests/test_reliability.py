"""Crash-resume: SIGKILL / SIGTERM mid-epoch, restart with --use_checkpoint, same final metrics as no crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_train import FAST, LEARNABLE, final, run_main
from wd_sok.checkpoint import list_checkpoints
from wd_sok.feature_spec import FeatureSpec
from wd_sok.tools.generate import generate

ARGS = [*FAST, "--global_batch_size", "128", "--num_epochs", "2", "--log_every", "20"]
KEYS = ("loss_val", "auc_roc", "streaming_map_val")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    (root / "spec.yaml").write_text(yaml.safe_dump(LEARNABLE))
    generate(FeatureSpec.from_yaml(root / "spec.yaml"), root / "data", n_train=20000, n_test=4000,
             train_files=2, test_files=2, seed=3)
    return root / "data"


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    records, _ = run_main(data, tmp_path_factory.mktemp("whole"), *ARGS)
    return final(records)


def _start(data: Path, work: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "main.py"), "--dataset_path", str(data), "--model_dir", str(work / "ckpt"),
           "--results_dir", str(work / "results"), *ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 300) -> list[str]:
    seen, end = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return seen
        if time.time() > end:
            break
    proc.kill()
    raise AssertionError(f"never saw {needle!r}:\n{''.join(seen[-30:])}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_mid_epoch_then_resumed_matches(data: Path, tmp_path: Path, uninterrupted: dict, sig: int) -> None:
    proc = _start(data, tmp_path, "--checkpoint_steps", "50")
    _wait_for(proc, "epoch 1 step 80 ")  # mid second epoch, after step checkpoints at 50 steps
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
        assert "checkpoint saved at epoch 1 step" in out
    else:
        assert proc.returncode == -signal.SIGKILL
    assert list_checkpoints(tmp_path / "ckpt"), "no checkpoint survived"
    assert not list((tmp_path / "ckpt").glob(".tmp-*")), "a temporary checkpoint was left behind"
    records, _ = run_main(data, tmp_path, *ARGS, "--checkpoint_steps", "50", "--use_checkpoint")
    got = final(records)
    for key in KEYS:  # same seed, same data order, same dropout masks: equal up to float summation order
        assert got[key] == pytest.approx(uninterrupted[key], abs=1e-6), key


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(data: Path, tmp_path: Path) -> None:
    records, _ = run_main(data, tmp_path, *ARGS)
    epochs = {r["step"][0]: r["data"] for r in records if len(r["step"]) == 1}
    ckpts = list_checkpoints(tmp_path / "ckpt")
    assert len(ckpts) == 2  # the last two are kept
    shard = max(ckpts[-1].glob("deep.*.value.*.npy"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated, as by a crash mid-copy
    records, out = run_main(data, tmp_path / "eval", *ARGS, "--model_dir", str(tmp_path / "ckpt"), "--evaluate",
                            "--use_checkpoint")
    assert f"{ckpts[-1]}: table 'deep/" in out and f"({shard.name}): 1000 bytes" in out, out[-3000:]
    assert "falling back to the previous checkpoint" in out
    got = final(records)
    for key in KEYS:
        assert got[key] == pytest.approx(epochs[1][key], abs=1e-7), key

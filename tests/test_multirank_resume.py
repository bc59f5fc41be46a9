"""Per-rank dropout and crash-resume under ``horovodrun -np 2`` (issue 12, items 1 and 8).

* Dropout: tests/dist/dropout_masks.py builds the real Trainer on each rank: the masks must differ between
  ranks (they used to be a function of (seed, layer, step) only, identical on every rank) and repeat exactly
  for the same (seed, rank, layer, step) (what resume relies on).
* Resume: 2 epochs (100 steps of 48 rows, dropout 0.1, --checkpoint_steps 20); rank 1 is killed with SIGKILL
  mid second epoch (after step 70), horovodrun stops the job, and the rerun with --use_checkpoint ends with the
  same BCE / AUC / MAP@12 as the uninterrupted run (1e-6: the same steps in the same order on the same data;
  only float summation order could differ).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.dist import common

LIMIT = 300
METRICS = ("loss_val", "auc_roc", "streaming_map_val")
RESUME = ("--num_epochs", "2", "--deep_dropout", "0.1", "--checkpoint_steps", "20", "--log_every", "10")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return common.make_dataset(tmp_path_factory.mktemp("dist_data"))


def test_dropout_masks_differ_across_ranks(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "dropout.json"
    common.check(common.launch(2, ["tests/dist/dropout_masks.py", "--data", str(data), "--out", str(out)],
                               LIMIT))
    report = json.loads(out.read_text())
    assert report["failures"] == [] and report["same"] == [[True, False], [False, True]], report


def _rank_pid(tag: str, rank: int) -> int | None:
    """The pid of the main.py process of ``rank`` launched with WD_SOK_TEST_TAG=tag (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"WD_SOK_TEST_TAG={tag}".encode() in env and f"HOROVOD_RANK={rank}".encode() in env \
                and b"main.py" in cmd:
            return int(entry.name)
    return None


def test_kill_one_rank_mid_epoch_then_resume_matches(data: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    common.check(common.launch(2, common.main_args(data, whole, *RESUME), LIMIT))
    want = common.final_metrics(whole / "results")

    run, tag = tmp_path / "crash", uuid.uuid4().hex
    cmd = [common.horovodrun(), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
           *common.main_args(data, run, *RESUME)]
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=common.env({"PYTHONUNBUFFERED": "1", "WD_SOK_TEST_TAG": tag}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, killed, end = [], False, time.time() + LIMIT
    try:
        for line in proc.stdout:
            seen.append(line)
            if "epoch 1 step 20 " in line:  # global step 70: checkpoints at 20, 40, 50 (epoch end), 60
                pid = _rank_pid(tag, 1)
                assert pid is not None, "rank 1's process not found"
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            if time.time() > end:
                break
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert killed, "".join(seen[-30:])
    assert proc.returncode != 0
    assert "final |" not in "".join(seen)
    resumed = common.check(common.launch(2, common.main_args(data, run, *RESUME, "--use_checkpoint"), LIMIT))
    assert "restored" in resumed
    got = common.final_metrics(run / "results")
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got, want)

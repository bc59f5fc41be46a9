"""Delta checkpoints over real ranks (horovodrun --gloo -np 2): a run checkpointing every 10 steps writes a full
checkpoint then deltas (retention keeps their base); full + latest delta restored under 1 and 3 ranks equals,
bit for bit (values, slots, dense state, step counters), the full checkpoint an otherwise identical run wrote
at the same step; SIGTERM to horovodrun saves a delta and the resumed run ends where the uninterrupted one does.

Data: tests/dist/common.py; tables row-wise (``--embedding_plan row``) so that sparse updates leave rows
untouched between checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.dist import common
from tests.dist.state import read_checkpoint
from wd_sok.checkpoint import list_checkpoints

LIMIT = 300
RUN = ("--embedding_plan", "row", "--checkpoint_steps", "10", "--full_checkpoint_ratio", "0.9")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not common.horovodrun():
        pytest.fail("horovodrun not found: install Horovod with Gloo (scripts/setup_env.sh)")
    return common.make_dataset(tmp_path_factory.mktemp("delta_data"))


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(deltas, fulls): the same 1-epoch 2-rank run with deltas, and with full checkpoints only."""
    deltas, fulls = tmp_path_factory.mktemp("deltas"), tmp_path_factory.mktemp("fulls")
    common.check(common.launch(2, common.main_args(data, deltas, *RUN), LIMIT))
    common.check(common.launch(2, common.main_args(data, fulls, *RUN[:-1], "0"), LIMIT))
    return deltas, fulls


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_deltas_written_and_retention_keeps_their_base(runs: tuple[Path, Path]) -> None:
    deltas, fulls = runs
    kept = list_checkpoints(deltas / "ckpt")
    assert [p.name for p in kept] == ["ckpt-10", "ckpt-40", "ckpt-50"]  # keep 2, plus the deltas' base
    assert "kind" not in manifest(kept[0])
    for p in kept[1:]:
        m = manifest(p)
        assert m["kind"] == "delta" and m["base"]["path"] == "ckpt-10" and m["world_size"] == 2, m
    full = manifest(list_checkpoints(fulls / "ckpt")[-1])
    assert "kind" not in full and full["step"] == 50
    delta_bytes = sum(f["bytes"] for f in manifest(kept[-1])["files"].values())
    full_bytes = sum(f["bytes"] for f in full["files"].values())
    print(f"delta at step 50 (40 steps after its base): {delta_bytes:,} bytes, full: {full_bytes:,}")
    assert delta_bytes < full_bytes


@pytest.mark.parametrize("ranks,backend", [(1, "replicated"), (3, "sharded")])
def test_full_plus_delta_restores_the_full_state_under_other_rank_counts(runs: tuple[Path, Path], data: Path,
                                                                         tmp_path: Path, ranks: int,
                                                                         backend: str) -> None:
    deltas, fulls = runs
    want, full = read_checkpoint(list_checkpoints(fulls / "ckpt")[-1])
    out = tmp_path / "state.npz"
    plan = ["--embedding_plan", "row"] if backend == "sharded" else []
    args = ["tests/dist/ckpt_state.py", "--out", str(out),
            *common.main_args(data, tmp_path, "--embedding_backend", backend, *plan, "--use_checkpoint")[1:]]
    args[args.index("--model_dir") + 1] = str(deltas / "ckpt")
    common.check(common.launch(ranks, args, LIMIT))
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["global_step"] == full["step"] == 50
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_sigterm_saves_a_delta_and_the_resume_matches(runs: tuple[Path, Path], data: Path, tmp_path: Path) -> None:
    """SIGTERM to horovodrun after step 25 (a full checkpoint at 10, a delta at 20): both ranks save a delta and
    exit 143 within horovodrun's 5 s; resuming ends with the uninterrupted run's metrics and state."""
    _, fulls = runs
    args = common.main_args(data, tmp_path, *RUN, "--log_every", "1")
    cmd = [common.horovodrun(), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, *args]
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=common.env({"PYTHONUNBUFFERED": "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "epoch 0 step 25 " in line:
                break
        else:
            raise AssertionError("".join(seen[-40:]))
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        elapsed = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(seen) + rest
    print(f"SIGTERM to horovodrun -> all ranks exited: {elapsed:.2f} s")
    assert elapsed < 5.0 and "exit with status code 137" not in out, out[-4000:]
    latest = list_checkpoints(tmp_path / "ckpt")[-1]
    m = manifest(latest)
    assert m["kind"] == "delta" and m["base"]["path"] == "ckpt-10" and m["step"] > 20, m
    assert "delta against ckpt-10" in out
    common.check(common.launch(2, [*args, "--use_checkpoint"], LIMIT))
    got = common.final_metrics(tmp_path / "results")
    want = common.final_metrics(fulls / "results")
    for key in ("loss_val", "auc_roc", "streaming_map_val"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got, want)


@pytest.mark.parametrize("ranks", [1, 3])
def test_dynamic_tables_delta_under_other_rank_counts(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                      ranks: int) -> None:
    """Dynamic tables (LRU / LFU, evictions between base and delta) saved under 2 ranks: full + delta restored
    under 1 and 3 ranks holds, key by key, what the full checkpoint of the same state gives."""
    if not common.horovodrun():
        pytest.fail("horovodrun not found: install Horovod with Gloo (scripts/setup_env.sh)")
    root = tmp_path_factory.getbasetemp() / "dynamic_delta"
    if not (root / "f").exists():
        common.check(common.launch(2, ["tests/dist/dynamic_delta.py", "--mode", "save", "--model_dir", str(root),
                                       "--out", str(root / "save.json")], LIMIT))
        saved = json.loads((root / "save.json").read_text())
        assert any(v > 0 for r in saved for v in r["evictions"].values()), saved
        # (60-row tables churned by 6 steps: this delta is about as large as a full one; it tests exactness)
    common.check(common.launch(ranks, ["tests/dist/dynamic_delta.py", "--mode", "restore", "--model_dir",
                                       str(root), "--out", str(tmp_path / "r.json")], LIMIT))
    reports = json.loads((tmp_path / "r.json").read_text())
    assert reports[0]["restored"] == ["ckpt-10", "delta"] and not any(r["failures"] for r in reports), reports

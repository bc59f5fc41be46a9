"""The life of a sharded table over real ranks (horovodrun --gloo): checkpoint under N, restore under M with
every row and slot in place, train on; preemption by SIGTERM to horovodrun; resume == uninterrupted.

Data: tests/dist/common.py (cardinalities 7, 1001, 2, 11, 13: no shard split is even at 2 or 3 ranks).
"""

from __future__ import annotations

import json
import os
import re
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
from wd_sok.schedule import deep_lr

LIMIT = 240
METRICS = ("loss_val", "auc_roc", "streaming_map_val")
TRAIN = ("--num_epochs", "2", "--checkpoint_steps", "20", "--log_every", "5")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return common.make_dataset(tmp_path_factory.mktemp("lifecycle_data"))


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run on 2 ranks (sharded), with step checkpoints."""
    if not common.horovodrun():
        pytest.fail("horovodrun not found: install Horovod with Gloo (scripts/setup_env.sh)")
    run = tmp_path_factory.mktemp("reference")
    common.check(common.launch(2, common.main_args(data, run, *TRAIN), LIMIT))
    return run


def records(results: Path) -> list[dict]:
    out = []
    for line in (results / "log.json").read_text().splitlines():
        rec = json.loads(line.removeprefix("DLLL "))
        if rec.get("type") == "LOG":
            out.append(rec)
    return out


@pytest.mark.parametrize("ranks,backend", [(1, "replicated"), (3, "sharded")])
def test_restore_under_another_rank_count_row_by_row(reference: Path, data: Path, tmp_path: Path, ranks: int,
                                                     backend: str) -> None:
    """Every table's values and slots, the dense weights and slots and the step counters, restored under M
    ranks, equal the 2-rank checkpoint read independently (numpy over its manifest), exactly; each rank holds
    only its own rows."""
    latest = list_checkpoints(reference / "ckpt")[-1]
    want, manifest = read_checkpoint(latest)
    assert manifest["world_size"] == 2
    out = tmp_path / "state.npz"
    plan = ["--embedding_plan", "row"] if backend == "sharded" else []  # the writer's was the planner's (auto)
    args = ["tests/dist/ckpt_state.py", "--out", str(out),
            *common.main_args(data, tmp_path, "--embedding_backend", backend, *plan, *TRAIN)[1:]]
    args[args.index("--model_dir") + 1] = str(reference / "ckpt")
    common.check(common.launch(ranks, args, LIMIT))
    info = json.loads(Path(str(out) + ".json").read_text())
    assert (info["global_step"], info["epoch"], info["step_in_epoch"]) == (
        manifest["step"], manifest["epoch"], manifest["step_in_epoch"])
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert not np.isnan(np.asarray(got[key], np.float64)).any(), key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    kinds = set()
    for held in info["held"]:  # rows per rank: by the restoring run's own plan, whatever the writer's was
        for key, rows in held["rows"].items():
            card, where = manifest["tables"][key]["cardinality"], held["placements"][key]
            kinds.add(where["kind"])
            want_rows = {"replicated": card, "row_wise": -(-(card - held["rank"]) // ranks),
                         "table_wise": card if where.get("owner") == held["rank"] else 0}[where["kind"]]
            assert rows == want_rows, (key, where)
    # the writer (2 ranks, the planner's plan: these small tables replicated, reduced dense) placed the
    # tables otherwise than the sharded reader (every table row-wise)
    assert kinds == ({"replicated"} if backend == "replicated" else {"row_wise"}), kinds
    assert manifest["embedding_plan"] == "auto"
    assert [t["plan"] for t in manifest["tables"].values()] == [{"kind": "replicated", "reduction": "dense"}] * 10


def test_resume_under_three_ranks_trains_on(reference: Path, data: Path, tmp_path: Path) -> None:
    """A 2-rank checkpoint resumed under 3 ranks continues at the same global step and schedule position."""
    saved = read_checkpoint(list_checkpoints(reference / "ckpt")[-1])[1]
    run = tmp_path / "resumed"
    args = common.main_args(data, run, "--num_epochs", "3", "--log_every", "5", "--use_checkpoint")
    args[args.index("--model_dir") + 1] = str(tmp_path / "ckpt")
    import shutil

    shutil.copytree(reference / "ckpt", tmp_path / "ckpt")
    out = common.check(common.launch(3, args, LIMIT))
    # the step-100 checkpoint closes epoch 1 (saved as epoch 1, step 50 of 50: the epoch-end save is the
    # same state, so it is not written twice)
    assert (saved["epoch"], saved["step_in_epoch"]) in ((1, 50), (2, 0))
    assert (f"restored {tmp_path / 'ckpt'}/ckpt-{saved['step']} (run {saved['run']}, epoch {saved['epoch']}, "
            f"step {saved['step']}; written by 2 rank(s)") in out
    # the plan is printed at start, one line per feature (b, 1001 rows: replicated, reduced dense)
    assert "embedding plan 'auto': 5 features, 3 ranks, global batch 48" in out
    assert re.search(r"\bb\s+1,001\s+4\s+\S+\s+replicated\(dense\)\s+0-2\b", out), out
    recs = records(run / "results")
    params = next(r["data"] for r in recs if r["step"] == "PARAMETER" and "steps_per_epoch" in r["data"])
    spe = params["steps_per_epoch"]
    train = [r for r in recs if isinstance(r["step"], list) and len(r["step"]) == 2]
    assert train and all(r["step"][0] == 2 for r in train), "the resumed run must continue in epoch 2"
    for r in train:  # the schedule position follows the restored step counter
        step = saved["step"] + r["step"][1]
        assert r["data"]["deep_lr"] == pytest.approx(deep_lr(step, spe, 0.01, 0.0, 3), rel=1e-6), r
    assert common.final_metrics(run / "results")["auc_roc"] > 0.7


def _start(args: list[str]) -> subprocess.Popen:
    cmd = [common.horovodrun(), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, *args]
    return subprocess.Popen(cmd, cwd=common.ROOT, env=common.env({"PYTHONUNBUFFERED": "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.parametrize("needle", ["epoch 0 step 20 ", "epoch 0 step 50 "], ids=["mid-epoch", "after-epoch-save"])
def test_sigterm_to_horovodrun_saves_once_and_resumes_exactly(reference: Path, data: Path, tmp_path: Path,
                                                              needle: str) -> None:
    """SIGTERM to horovodrun (what docker stop / Kubernetes / Slurm send): it forwards the signal to every
    rank and kills them 5 s later. The ranks agree on a stop step, save one checkpoint and exit 143 in time;
    resuming gives the uninterrupted run's final metrics. The second case signals right after the last step
    of epoch 0 is logged: the signal lands during the epoch-end save or the evaluation after it."""
    args = common.main_args(data, tmp_path, *TRAIN)
    proc = _start(args)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if needle in line:
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
    # horovodrun SIGKILLs the ranks 5 s after forwarding the signal: leaving within that, every rank exited on
    # its own, through our handler (143 = 128 + SIGTERM). horovodrun prints "Process <r> exit with status
    # code <c>" per rank, but racily (seen: only one of the two lines), so: each rank's own message, every
    # printed code 143, none 137 (SIGKILL), and the exit inside the grace period.
    for rank in (0, 1):
        assert f"[{rank}]<stderr>:wd-sok: signal 15: checkpoint saved at epoch" in out, out[-4000:]
    codes = re.findall(r"Process \d+ exit with status code (\d+)", out)
    assert codes and set(codes) == {"143"}, out[-4000:]
    assert elapsed < 5.0, f"{elapsed:.2f} s: past horovodrun's 5 s grace period"
    assert "Traceback" not in out.split("exit with status code")[0], out[-4000:]
    latest = list_checkpoints(tmp_path / "ckpt")[-1]
    stopped = json.loads((latest / "manifest.json").read_text())
    assert f"(global step {stopped['step']})" in out
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))
    common.check(common.launch(2, [*args, "--use_checkpoint"], LIMIT))
    got, want = common.final_metrics(tmp_path / "results"), common.final_metrics(reference / "results")
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got, want)

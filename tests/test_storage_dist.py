"""Checkpoints and data on a real S3 API server (moto, HTTP on 127.0.0.1) under ``horovodrun --gloo``, nothing
shared on local disk: data and model_dir only as s3:// URLs, every rank in a working, home and temporary
directory of its own (tests/dist/own_dirs.py; rank 0's logs land in its own folder).

Two ranks train on s3:// and are stopped by SIGTERM to horovodrun after step 25 (a full checkpoint at step 20):
both ranks save the agreed preemption checkpoint (a delta against ckpt-20, each rank uploading its own files)
and exit 143 within horovodrun's 5 s. The stop step S depends on timing, so the local-disk reference runs the
same commands with ``--max_steps S`` (a full checkpoint of the same state). Then one rank resumes from the S3
checkpoint and, from a copy of it, three ranks do (an S3 delta restored under 1 and 3 ranks, each rank reading
only the rows it owns); each finishes with the BCE / AUC / MAP@12 of the same resume from the local full
checkpoint (1e-6: the same steps on the same data; only float summation order could differ). The partial
objects of a killed save (a step prefix without a manifest) are invisible to the restore and removed at
start-up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist import common
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures
from tests.test_storage_s3 import upload
from wd_sok import storage

LIMIT = 300
METRICS = ("loss_val", "auc_roc", "streaming_map_val")
# row-wise tables: sparse updates leave rows untouched, so the preemption save is a delta (tests/test_delta_dist.py)
RUN = ("--num_epochs", "1", "--embedding_plan", "row", "--checkpoint_steps", "20", "--log_every", "5")
OWN = "tests/dist/own_dirs.py"

pytestmark = pytest.mark.skipif(not common.horovodrun(), reason="horovodrun not installed")


def _args(work: Path, data: str, model_dir: str, *extra: str) -> list[str]:
    """``own_dirs.py WORK main.py ...``: every rank runs in ``WORK/rank<r>``; logs in rank 0's ``results``."""
    args = common.main_args(Path("unused"), Path("unused"), *RUN, *extra)
    args[args.index("--dataset_path") + 1] = data
    args[args.index("--model_dir") + 1] = model_dir
    args[args.index("--results_dir") + 1] = "results"
    return [OWN, str(work), *args]


def _launch(np_: int, work: Path, data: str, model_dir: str, *extra: str) -> tuple[dict, str]:
    """One launch (wall time printed); (final metrics, output)."""
    t0 = time.perf_counter()
    out = common.check(common.launch(np_, _args(work, data, model_dir, *extra), LIMIT))
    print(f"{np_} rank(s), {model_dir}, {' '.join(extra)}: {time.perf_counter() - t0:.1f} s")
    return common.final_metrics(work / "rank0" / "results"), out


def _sigterm_after(needle: str, work: Path, data: str, model_dir: str) -> tuple[str, float]:
    """2 ranks, SIGTERM to horovodrun once ``needle`` is printed; (output, seconds from SIGTERM to exit)."""
    cmd = [common.horovodrun(), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
           *_args(work, data, model_dir)]
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=common.env({"PYTHONUNBUFFERED": "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, t_start = [], time.perf_counter()
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
    print(f"2 ranks, {model_dir}, SIGTERM after '{needle.strip()}': {time.perf_counter() - t_start:.1f} s; "
          f"SIGTERM to horovodrun -> all ranks exited: {elapsed:.2f} s")
    return "".join(seen) + rest, elapsed


def _copy_prefix(store: storage.Store, to: str) -> None:
    """Server-side copy of every object under ``store``'s root to the prefix ``to``."""
    src = store.fs._strip_protocol(store.root)  # noqa: SLF001
    dst = store.fs._strip_protocol(to)  # noqa: SLF001
    for key in store.fs.find(src):
        store.fs.copy(key, dst + key[len(src):])


def test_two_ranks_on_s3_sigterm_resume_under_one_and_three_ranks_equals_local_disk(
        s3_bucket: str, tmp_path: Path) -> None:  # noqa: F811
    data = common.make_dataset(tmp_path / "data")
    upload(data, f"{s3_bucket}/data")
    remote_data, model_dir = f"{s3_bucket}/data", f"{s3_bucket}/run"
    store = storage.Store(model_dir)

    # 2 ranks on s3://, stopped by SIGTERM to horovodrun after step 25 (full checkpoint at 20)
    out, elapsed = _sigterm_after("epoch 0 step 25 ", tmp_path / "s3" / "first", remote_data, model_dir)
    for rank in (0, 1):  # each rank's own message: it left through the agreed save, not horovodrun's SIGKILL
        assert f"[{rank}]<stderr>:wd-sok: signal 15: checkpoint saved at epoch" in out, out[-4000:]
    codes = re.findall(r"Process \d+ exit with status code (\d+)", out)
    assert codes and set(codes) == {"143"}, out[-4000:]
    assert elapsed < 5.0, f"{elapsed:.2f} s: past horovodrun's 5 s grace period"
    assert "Traceback" not in out.split("exit with status code")[0], out[-4000:]  # (horovodrun's own after)
    saved = re.search(r"checkpoint saved at epoch \d+ step \d+ \(global step (\d+)\)", out)
    stop = int(saved.group(1)) if saved else 0
    assert 25 <= stop < 50, out[-4000:]
    ckpts = [n for n in store.listdir() if n.startswith("ckpt-")]
    assert ckpts[-1] == f"ckpt-{stop}" and "ckpt-20" in ckpts, ckpts
    manifest = json.loads(store.read_bytes(f"ckpt-{stop}/manifest.json"))
    assert (manifest["step"], manifest["world_size"]) == (stop, 2)
    if stop % 20:  # the preemption save itself (else the periodic save at that step was the stop's checkpoint)
        assert manifest.get("kind") == "delta" and manifest["base"]["path"] == "ckpt-20", manifest
        assert "delta against ckpt-20" in out
    names = store.listdir(f"ckpt-{stop}")
    assert "manifest.json" in names and any("r00000-of-00002" in n for n in names) \
        and any("r00001-of-00002" in n for n in names)  # every rank uploaded its own files
    first = tmp_path / "s3" / "first"
    assert sorted(p.name for p in first.iterdir()) == ["rank0", "rank1"]  # nothing written outside them
    for rank in (0, 1):  # each rank checked its share of the data and remembered it in its own home
        assert list((first / f"rank{rank}" / ".cache" / "wd-sok" / "verdicts").glob("*.json")), rank

    # the same training on local disk, stopped at the same step by --max_steps (a full checkpoint there)
    _launch(2, tmp_path / "local" / "first", str(data), str(tmp_path / "local" / "ckpt"), "--max_steps", str(stop))
    shutil.copytree(tmp_path / "local" / "ckpt", tmp_path / "local" / "ckpt3")
    _copy_prefix(store, f"{s3_bucket}/run3")

    # a save killed mid-upload: shard objects under a step prefix, no manifest
    shard = next(n for n in names if n != "manifest.json")
    store.write_bytes(f"ckpt-90/{shard}", store.read_bytes(f"ckpt-{stop}/{shard}"))
    remote, out = _launch(1, tmp_path / "s3" / "resume1", remote_data, model_dir, "--use_checkpoint")
    assert f"restored {model_dir}/ckpt-{stop} (" in out and "written by 2 rank(s)" in out, out[-4000:]
    assert "ckpt-90" not in store.listdir()  # removed at start-up
    local, _ = _launch(1, tmp_path / "local" / "resume1", str(data), str(tmp_path / "local" / "ckpt"),
                       "--use_checkpoint")
    for k in METRICS:
        assert remote[k] == pytest.approx(local[k], abs=1e-6), (1, k, remote, local)

    remote, out = _launch(3, tmp_path / "s3" / "resume3", remote_data, f"{s3_bucket}/run3", "--use_checkpoint")
    assert f"restored {s3_bucket}/run3/ckpt-{stop} (" in out and "written by 2 rank(s)" in out, out[-4000:]
    local, _ = _launch(3, tmp_path / "local" / "resume3", str(data), str(tmp_path / "local" / "ckpt3"),
                       "--use_checkpoint")
    for k in METRICS:
        assert remote[k] == pytest.approx(local[k], abs=1e-6), (3, k, remote, local)

"""Checkpoints and data on a real S3 API server (moto, HTTP on 127.0.0.1) under ``horovodrun --gloo -np 2``:
nothing shared on local disk but rank 0's log folder (data and model_dir only as s3:// URLs).

Two ranks train 60 of 100 steps (checkpoints every 20), then one rank resumes from the latest checkpoint and
finishes: the final BCE / AUC / MAP@12 equal those of the same two runs on local disk. Every rank uploaded its
own shard files; the partial objects of a killed save (a step prefix without a manifest) are invisible to the
restore and removed at start-up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist import common
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures
from tests.test_storage_s3 import upload
from wd_sok import storage

LIMIT = 300
METRICS = ("loss_val", "auc_roc", "streaming_map_val")
RUN = ("--num_epochs", "2", "--checkpoint_steps", "20", "--log_every", "10")

pytestmark = pytest.mark.skipif(not common.horovodrun(), reason="horovodrun not installed")


def _args(data: str, model_dir: str, results: Path, *extra: str) -> list[str]:
    args = common.main_args(Path("unused"), results.parent, *RUN, *extra)
    args[args.index("--dataset_path") + 1] = data
    args[args.index("--model_dir") + 1] = model_dir
    args[args.index("--results_dir") + 1] = str(results)
    return args


def _two_then_one(data: str, model_dir: str, work: Path) -> tuple[dict, str]:
    """2 ranks to step 60, then 1 rank resumes to the end; (final metrics, the resume's output)."""
    common.check(common.launch(2, _args(data, model_dir, work / "first", "--max_steps", "60"), LIMIT))
    out = common.check(common.launch(1, _args(data, model_dir, work / "resume", "--use_checkpoint"), LIMIT))
    return common.final_metrics(work / "resume"), out


def test_two_ranks_checkpoint_to_s3_resume_one_rank_equals_local_disk(s3_bucket: str,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    data = common.make_dataset(tmp_path / "data")
    local, _ = _two_then_one(str(data), str(tmp_path / "local_ckpt"), tmp_path / "local")

    upload(data, f"{s3_bucket}/data")
    model_dir = f"{s3_bucket}/run"
    store = storage.Store(model_dir)
    common.check(common.launch(2, _args(f"{s3_bucket}/data", model_dir, tmp_path / "s3" / "first",
                                        "--max_steps", "60"), LIMIT))
    assert [n for n in store.listdir() if n.startswith("ckpt-")] == ["ckpt-50", "ckpt-60"]  # keep 2 (50: the epoch end)
    names = store.listdir("ckpt-60")
    assert "manifest.json" in names and any("r00000-of-00002" in n for n in names) \
        and any("r00001-of-00002" in n for n in names)  # every rank uploaded its own files
    # a save killed mid-upload: shard objects under a step prefix, no manifest
    store.write_bytes("ckpt-90/deep.b.value.r00001-of-00002.npy", store.read_bytes(
        next(f"ckpt-60/{n}" for n in names if n.startswith("deep.b.value"))))
    out = common.check(common.launch(1, _args(f"{s3_bucket}/data", model_dir, tmp_path / "s3" / "resume",
                                              "--use_checkpoint"), LIMIT))
    assert f"restored {model_dir}/ckpt-60" in out  # not the partial ckpt-90
    assert "ckpt-90" not in store.listdir()  # removed at start-up (ckpt-80 and ckpt-100 were saved after)
    remote = common.final_metrics(tmp_path / "s3" / "resume")
    for k in METRICS:
        assert remote[k] == pytest.approx(local[k], abs=1e-6), (k, remote, local)

"""Checkpoints through main.py: bad checkpoints are one-line errors (exit 2, nothing written or overwritten),
and checkpoints of the earlier single-file format convert with one command and evaluate the same."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT
from tests.dist.state import read_checkpoint
from tests.test_train import final, run_main
from wd_sok.checkpoint import list_checkpoints

ARGS = ["--global_batch_size", "32", "--eval_batch_size", "64", "--num_epochs", "1", "--deep_hidden_units", "8",
        "--deep_warmup_epochs", "0", "--log_every", "1000"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(dataset, model_dir with one checkpoint, final metrics) of a tiny one-epoch run."""
    from tests.conftest import tiny_frame, tiny_spec_dict

    root = tmp_path_factory.mktemp("ckpt_cli")
    data = root / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    for i in range(2):
        tiny_frame(100, seed=i).drop(columns=["d"]).to_parquet(data / f"train/part_{i}.parquet")
    start = 0
    for i in range(2):
        df = tiny_frame(40, seed=10 + i, start_display=start)
        start = int(df.d.max()) + 1
        df.to_parquet(data / f"test/part_{i}.parquet")
    (data / "feature_spec.yaml").write_text(yaml.safe_dump(tiny_spec_dict(), sort_keys=False))
    records, _ = run_main(data, root, *ARGS, "--keep_checkpoints", "1")
    assert len(list_checkpoints(root / "ckpt")) == 1
    return data, root / "ckpt", final(records)


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + (p.read_bytes() if p.is_file() else b"/"))
    return h.hexdigest()


def evaluate(data: Path, model_dir: Path, work: Path, expect: int = 0) -> tuple[list[dict], str]:
    return run_main(data, work, *ARGS, "--model_dir", str(model_dir), "--evaluate", "--use_checkpoint",
                    expect=expect)


@pytest.mark.parametrize("damage", ["other_spec", "missing_shard", "truncated_shard", "newer_format"])
def test_bad_checkpoint_is_one_line_exit_2(trained: tuple, tmp_path: Path, damage: str) -> None:
    data, model_dir, _ = trained
    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dir, ckpt)
    folder = list_checkpoints(ckpt)[-1]
    shard = folder / "deep.m.value.r00000-of-00001.npy"
    if damage == "other_spec":  # the same data with one table grown: the checkpoint does not fit it
        data = tmp_path / "data"
        shutil.copytree(trained[0], data)
        spec = yaml.safe_load((data / "feature_spec.yaml").read_text())
        spec["feature_spec"]["m"]["cardinality"] = 9
        (data / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        want = rf"{folder}: table 'deep/m' \(manifest\.json\): 6 x 4 in the checkpoint, 9 x 4 in this model"
    elif damage == "missing_shard":
        shard.unlink()
        want = rf"{folder}: table 'deep/m' \({shard.name}\): No such file"
    elif damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:-4])
        want = rf"{folder}: table 'deep/m' \({shard.name}\): \d+ bytes, the manifest says \d+ \(truncated\?\)"
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["version"] = 99
        (folder / "manifest.json").write_text(json.dumps(manifest))
        want = rf"{folder}: manifest\.json: format version 99 is newer than this wd-sok reads"
    before = tree_digest(ckpt)
    _, out = evaluate(data, ckpt, tmp_path / "eval", expect=2)
    errors = [line for line in out.splitlines() if line.startswith("wd-sok: error:")]
    assert len(errors) == 1 and __import__("re").search(want, errors[0]), out[-2000:]
    assert "Traceback" not in out
    assert tree_digest(ckpt) == before, "the checkpoint folder was changed"
    assert not (tmp_path / "eval" / "results" / "log.json").exists(), "a rejected run left a log"


def test_legacy_npz_converts_and_evaluates_the_same(trained: tuple, tmp_path: Path) -> None:
    """A checkpoint in the earlier format (whole tables + '__meta__' in one npz) -> one command -> same eval."""
    data, model_dir, metrics = trained
    folder = list_checkpoints(model_dir)[-1]
    arrays, manifest = read_checkpoint(folder)
    meta = {k: manifest[k] for k in ("epoch", "step_in_epoch", "global_step", "seed", "config", "backend")}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    np.savez(legacy / f"ckpt-{manifest['step']}.npz", **arrays,
             __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    _, out = evaluate(data, legacy, tmp_path / "before", expect=2)
    assert f"python -m wd_sok.checkpoint convert {legacy}" in out
    proc = subprocess.run([sys.executable, "-m", "wd_sok.checkpoint", "convert", str(legacy)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    converted, _ = read_checkpoint(list_checkpoints(legacy)[-1])
    assert sorted(converted) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(converted[key], value, err_msg=key)
    records, _ = evaluate(data, legacy, tmp_path / "after")
    got = final(records)
    for key in ("loss_val", "auc_roc", "streaming_map_val"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-7), key

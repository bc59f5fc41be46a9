"""main.py with its data and its export on a real S3 API server (moto, HTTP on 127.0.0.1): training from
s3:// equals training from the same files on local disk; the export is uploaded with its marker last and
serves; a missing bucket, a missing object or bad credentials stop the run with one line naming the URL
(exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import ROOT
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures
from wd_sok import storage

ARGS = ["--num_epochs", "1", "--deep_warmup_epochs", "0", "--global_batch_size", "32", "--eval_batch_size", "32",
        "--deep_hidden_units", "8", "--log_every", "1000", "--seed", "3"]


def upload(local: Path, url: str) -> None:
    """Copy a local dataset folder to ``url``."""
    store = storage.Store(url)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.write_bytes(path.relative_to(local).as_posix(), path.read_bytes())


def run_main(work: Path, *args: str, expect: int = 0) -> tuple[dict, str]:
    """main.py (subprocess, the S3 endpoint in its environment); returns (final metrics, output)."""
    cmd = [sys.executable, str(ROOT / "main.py"), "--results_dir", str(work / "results"), *ARGS, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**__import__("os").environ, "WD_SOK_CACHE_DIR": str(work / "cache")})
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-3000:]
    final = {}
    log = work / "results" / "log.json"
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line.removeprefix("DLLL "))
            if rec["type"] == "LOG" and rec.get("step") != "PARAMETER":
                final = rec["data"]
    return final, out


def test_train_from_s3_equals_local_and_exports_to_s3(tiny_dataset: Path, s3_bucket: str,  # noqa: F811
                                                       tmp_path: Path) -> None:
    upload(tiny_dataset, f"{s3_bucket}/data")
    local, _ = run_main(tmp_path / "local", "--dataset_path", str(tiny_dataset),
                        "--model_dir", str(tmp_path / "local" / "ckpt"))
    export = f"{s3_bucket}/export"
    remote, out = run_main(tmp_path / "s3", "--dataset_path", f"{s3_bucket}/data",
                           "--model_dir", str(tmp_path / "s3" / "ckpt"), "--export_dir", export)
    assert local and remote == local  # same rows, same order, same numbers
    assert f"exported SavedModel to {export}" in out
    assert storage.Store(export).exists("_WD_SOK_COMPLETE.json")

    import tensorflow as tf

    from wd_sok.export import fetch_export

    serve = tf.saved_model.load(str(fetch_export(export, tmp_path / "fetched"))).signatures["serving_default"]
    feats = {"a": tf.constant([1, 2], tf.int32), "b": tf.constant([0, 4], tf.int64),
             "m__values": tf.constant([1, 5], tf.int32), "m__offsets": tf.constant([0, 1, 2], tf.int64),
             "x1": tf.constant([0.5, -1.0]), "x2": tf.constant([0.0, 2.0])}
    p = serve(**feats)["probability"].numpy()
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))


def _one_line_error(out: str, url: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("wd-sok: error")]
    assert len(lines) == 1 and url in lines[0], out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return lines[0]


def test_missing_bucket_and_missing_object_exit_2_naming_the_url(tiny_dataset: Path, s3_bucket: str,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    _, out = run_main(tmp_path / "a", "--dataset_path", "s3://wd-sok-no-such-bucket/data",
                      "--model_dir", str(tmp_path / "a" / "ckpt"), expect=2)
    assert "does not exist" in _one_line_error(out, "s3://wd-sok-no-such-bucket/data/feature_spec.yaml")
    upload(tiny_dataset, f"{s3_bucket}/data")
    storage.Store(f"{s3_bucket}/data").delete("train/part_2.parquet")
    _, out = run_main(tmp_path / "b", "--dataset_path", f"{s3_bucket}/data",
                      "--model_dir", str(tmp_path / "b" / "ckpt"), expect=2)
    assert "does not exist" in _one_line_error(out, f"{s3_bucket}/data/train/part_2.parquet")
    _, out = run_main(tmp_path / "c", "--dataset_path", str(tiny_dataset), "--model_dir", str(tmp_path / "c"),
                      "--export_dir", "s3://wd-sok-no-such-bucket/export", expect=2)
    _one_line_error(out, "s3://wd-sok-no-such-bucket/export")


@pytest.fixture
def s3_auth(s3_server: str) -> None:  # noqa: F811
    """Turn on moto's credential checks (every request from now on; 'testing' is not a known key)."""
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


def test_bad_credentials_exit_2_naming_the_url(tiny_dataset: Path, s3_bucket: str, tmp_path: Path,  # noqa: F811
                                               s3_auth: None) -> None:
    _, out = run_main(tmp_path, "--dataset_path", f"{s3_bucket}/data", "--model_dir", str(tmp_path / "ckpt"),
                      expect=2)
    line = _one_line_error(out, f"{s3_bucket}/data/feature_spec.yaml")
    assert "access denied" in line and "testing" not in line


def test_checkpoints_on_s3_resume_fall_back_and_name_a_deleted_object(tiny_dataset: Path, s3_bucket: str,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    local, _ = run_main(tmp_path / "local", "--dataset_path", str(tiny_dataset), "--model_dir",
                        str(tmp_path / "local" / "ckpt"), "--num_epochs", "2")
    model_dir = f"{s3_bucket}/run"
    run_main(tmp_path / "a", "--dataset_path", str(tiny_dataset), "--model_dir", model_dir, "--num_epochs", "2",
             "--max_steps", "8", "--checkpoint_steps", "4")
    store = storage.Store(model_dir)
    assert store.listdir() == ["ckpt-6", "ckpt-8"]  # 4 went: keep 2
    remote, out = run_main(tmp_path / "b", "--dataset_path", str(tiny_dataset), "--model_dir", model_dir,
                           "--num_epochs", "2", "--use_checkpoint")
    assert f"restored {model_dir}/ckpt-8" in out and remote == local  # resumed = uninterrupted
    latest = sorted(store.listdir(), key=lambda n: int(n.split("-")[1]))[-1]  # ckpt-12
    victim = next(n for n in store.listdir(latest) if n.startswith("deep.a.value"))
    store.delete(f"{latest}/{victim}")
    _, out = run_main(tmp_path / "c", "--dataset_path", str(tiny_dataset), "--model_dir", model_dir,
                      "--num_epochs", "2", "--evaluate", "--use_checkpoint")
    assert f"{model_dir}/{latest}" in out and "falling back to the previous checkpoint" in out
    for name in store.listdir():  # now every checkpoint lacks a file
        for n in store.listdir(name):
            if n.startswith("deep.a.value"):
                store.delete(f"{name}/{n}")
    _, out = run_main(tmp_path / "d", "--dataset_path", str(tiny_dataset), "--model_dir", model_dir,
                      "--num_epochs", "2", "--evaluate", "--use_checkpoint", expect=2)
    line = _one_line_error(out, f"{model_dir}/")
    assert "no usable checkpoint" in line and victim in line
    assert len(store.listdir()) == 2  # nothing deleted by the failed attempts


def test_kill_9_during_an_upload_leaves_no_visible_checkpoint(tiny_dataset: Path, s3_bucket: str,  # noqa: F811
                                                              tmp_path: Path) -> None:
    import os
    import signal
    import time

    import yaml

    spec = yaml.safe_load((tiny_dataset / "feature_spec.yaml").read_text())
    spec["feature_spec"]["b"].update(cardinality=2_000_000, embedding_dim=16)  # ~280 MB of state: a slow save
    (tiny_dataset / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    model_dir = f"{s3_bucket}/run"
    store = storage.Store(model_dir)
    flags = ["--dataset_path", str(tiny_dataset), "--model_dir", model_dir, "--embedding_backend", "replicated"]
    run_main(tmp_path / "a", *flags, "--max_steps", "2")
    assert store.listdir() == ["ckpt-2"]
    cmd = [sys.executable, str(ROOT / "main.py"), "--results_dir", str(tmp_path / "b"), *ARGS, *flags,
           "--max_steps", "4", "--use_checkpoint"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "WD_SOK_CACHE_DIR": str(tmp_path / "cache")})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # files of ckpt-4 arriving, no manifest yet
            names = store.listdir("ckpt-4")
            if names and "manifest.json" not in names:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the save finished before it could be killed"
    assert "manifest.json" not in store.listdir("ckpt-4")  # partial objects, nothing committed
    _, out = run_main(tmp_path / "c", *flags, "--evaluate", "--use_checkpoint")
    assert f"restored {model_dir}/ckpt-2" in out
    assert store.listdir() == ["ckpt-2"]  # the killed save's objects were removed at start-up

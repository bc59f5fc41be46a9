"""gs:// through the same storage seam, against a real GCS JSON API server (gcp-storage-emulator, HTTP on
127.0.0.1): a streamed upload is invisible until closed and byte-exact after; main.py trains from gs:// data
exactly as from the same files on local disk, checkpoints to gs:// (retention, resume = uninterrupted, fall
back past a deleted object) and exports to gs:// with its marker last; a missing bucket or object stops the
run with one line naming the URL (exit 2)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.gcs_server import gcs_bucket, gcs_server  # noqa: F401 - fixtures
from tests.test_storage_s3 import _one_line_error, run_main, upload
from wd_sok import storage


def test_streamed_upload_appears_whole_on_close_and_reads_back_exactly(gcs_bucket: str) -> None:  # noqa: F811
    store = storage.Store(f"{gcs_bucket}/run")
    data = np.random.default_rng(0).integers(0, 256, storage.PART_BYTES * 2 + 12345, np.uint8)
    with store.open_write("ckpt-1/big.bin") as w:
        for i in range(0, data.size, 5 << 20):  # pieces that do not line up with the parts
            w.write(data[i:i + (5 << 20)])
        assert store.listdir() == []  # two parts uploaded, nothing visible yet
    assert w.size == data.size and w.crc == zlib.crc32(data.tobytes())
    assert store.listdir() == ["ckpt-1"] and store.listdir("ckpt-1") == ["big.bin"]
    assert store.size("ckpt-1/big.bin") == data.size and store.info("ckpt-1/big.bin")["etag"]
    assert store.read_bytes("ckpt-1/big.bin") == data.tobytes()
    at = storage.PART_BYTES - 7  # a range across the first part boundary
    assert store.read_range("ckpt-1/big.bin", at, 20) == data[at:at + 20].tobytes()
    assert zlib.crc32(store.read_bytes("ckpt-1/big.bin")) == zlib.crc32(data.tobytes())

    w = store.open_write("ckpt-2/big.bin")
    w.write(data[:storage.PART_BYTES + 1])  # one part uploaded
    w.abort()
    assert store.listdir() == ["ckpt-1"]  # the aborted upload left no object
    store.write_bytes("ckpt-1/manifest.json", b"{}")
    store.delete_prefix("ckpt-1")
    assert store.listdir() == [] and not store.exists("ckpt-1")


def test_train_from_gcs_equals_local_and_exports_to_gcs(tiny_dataset: Path, gcs_bucket: str,  # noqa: F811
                                                        tmp_path: Path) -> None:
    upload(tiny_dataset, f"{gcs_bucket}/data")
    local, _ = run_main(tmp_path / "local", "--dataset_path", str(tiny_dataset),
                        "--model_dir", str(tmp_path / "local" / "ckpt"))
    export = f"{gcs_bucket}/export"
    remote, out = run_main(tmp_path / "gcs", "--dataset_path", f"{gcs_bucket}/data",
                           "--model_dir", str(tmp_path / "gcs" / "ckpt"), "--export_dir", export)
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


def test_missing_bucket_and_missing_object_exit_2_naming_the_url(tiny_dataset: Path, gcs_bucket: str,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    _, out = run_main(tmp_path / "a", "--dataset_path", "gs://wd-sok-no-such-bucket/data",
                      "--model_dir", str(tmp_path / "a" / "ckpt"), expect=2)
    assert "does not exist" in _one_line_error(out, "gs://wd-sok-no-such-bucket/data/feature_spec.yaml")
    upload(tiny_dataset, f"{gcs_bucket}/data")
    storage.Store(f"{gcs_bucket}/data").delete("train/part_1.parquet")
    _, out = run_main(tmp_path / "b", "--dataset_path", f"{gcs_bucket}/data",
                      "--model_dir", str(tmp_path / "b" / "ckpt"), expect=2)
    assert "does not exist" in _one_line_error(out, f"{gcs_bucket}/data/train/part_1.parquet")
    _, out = run_main(tmp_path / "c", "--dataset_path", str(tiny_dataset),
                      "--model_dir", "gs://wd-sok-no-such-bucket/run", expect=2)
    line = _one_line_error(out, "gs://wd-sok-no-such-bucket/run")  # (--export_dir: the same check, S3 test)
    assert "bucket gs://wd-sok-no-such-bucket does not exist" in line


def test_checkpoints_on_gcs_resume_fall_back_and_name_a_deleted_object(tiny_dataset: Path,  # noqa: F811
                                                                       gcs_bucket: str,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    local, _ = run_main(tmp_path / "local", "--dataset_path", str(tiny_dataset), "--model_dir",
                        str(tmp_path / "local" / "ckpt"), "--num_epochs", "2")
    model_dir = f"{gcs_bucket}/run"
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


def test_missing_bucket_and_object_are_one_line_errors_naming_the_url(gcs_bucket: str) -> None:  # noqa: F811
    store = storage.Store("gs://no-such-bucket-wd-sok/x")
    for call in (store.listdir, lambda: store.read_bytes("y"), lambda: store.write_bytes("y", b"1")):
        with pytest.raises(storage.NotFound) as e:
            call()
        assert str(e.value).startswith("gs://no-such-bucket-wd-sok/x") and "\n" not in str(e.value)
        assert "bucket gs://no-such-bucket-wd-sok does not exist" in str(e.value)
    with pytest.raises(storage.NotFound, match=r"^gs://[-\w]+/x/y: not found \(no such object\)$"):
        storage.Store(f"{gcs_bucket}/x").read_bytes("y")

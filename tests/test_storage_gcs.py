"""gs:// through the same storage seam, against a real GCS JSON API server (gcp-storage-emulator, HTTP on
127.0.0.1): a streamed upload is invisible until closed and byte-exact after; main.py trains from gs:// data,
checkpoints to gs:// (retention, resume) and exports to gs:// with its marker last, ending with the numbers of
the same run on local disk; a missing bucket or object is one line naming the URL (exit 2)."""

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


def test_train_from_gcs_checkpoint_to_gcs_resume_and_export_to_gcs(tiny_dataset: Path, gcs_bucket: str,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    """Data, model_dir and export all on gs://: 8 steps with checkpoints every 4 (retention keeps 2), then a
    resume that finishes and exports: the final numbers equal the uninterrupted run on local disk; a missing
    parquet object is one line naming it (exit 2). (The fallback past a damaged checkpoint and the main.py-level
    missing-bucket lines go through the same seam: tests/test_storage_s3.py runs them against S3.)"""
    upload(tiny_dataset, f"{gcs_bucket}/data")
    data, model_dir, export = f"{gcs_bucket}/data", f"{gcs_bucket}/run", f"{gcs_bucket}/export"
    local, _ = run_main(tmp_path / "local", "--dataset_path", str(tiny_dataset), "--model_dir",
                        str(tmp_path / "local" / "ckpt"), "--num_epochs", "2")
    run_main(tmp_path / "a", "--dataset_path", data, "--model_dir", model_dir, "--num_epochs", "2",
             "--max_steps", "8", "--checkpoint_steps", "4")
    store = storage.Store(model_dir)
    assert store.listdir() == ["ckpt-6", "ckpt-8"]  # 4 went: keep 2
    remote, out = run_main(tmp_path / "b", "--dataset_path", data, "--model_dir", model_dir,
                           "--num_epochs", "2", "--use_checkpoint", "--export_dir", export)
    assert f"restored {model_dir}/ckpt-8" in out and local and remote == local  # resumed = uninterrupted
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

    storage.Store(data).delete("train/part_1.parquet")
    _, out = run_main(tmp_path / "c", "--dataset_path", data, "--model_dir", str(tmp_path / "c" / "ckpt"), expect=2)
    assert "does not exist" in _one_line_error(out, f"{data}/train/part_1.parquet")


def test_missing_bucket_and_object_are_one_line_errors_naming_the_url(gcs_bucket: str) -> None:  # noqa: F811
    store = storage.Store("gs://no-such-bucket-wd-sok/x")
    for call in (store.listdir, lambda: store.read_bytes("y"), lambda: store.write_bytes("y", b"1")):
        with pytest.raises(storage.NotFound) as e:
            call()
        assert str(e.value).startswith("gs://no-such-bucket-wd-sok/x") and "\n" not in str(e.value)
        assert "bucket gs://no-such-bucket-wd-sok does not exist" in str(e.value)
    with pytest.raises(storage.NotFound, match=r"^gs://[-\w]+/x/y: not found \(no such object\)$"):
        storage.Store(f"{gcs_bucket}/x").read_bytes("y")

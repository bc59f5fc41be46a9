"""The storage seam (wd_sok.storage) against a real S3 API server (moto, HTTP on 127.0.0.1) and local disk:
ranged reads, streamed multipart writes with bounded memory, listings, deletes, the commit protocol, the
export upload marker, ETag-keyed verdicts, one-line errors naming the URL."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures
from wd_sok import storage
from wd_sok.config import parse_config
from wd_sok.storage.tree import MARKER, download_tree, is_complete, upload_tree


def test_locations_join_and_parent() -> None:
    assert storage.is_url("s3://b/x") and storage.is_url("gs://b") and storage.is_url("memory://x")
    assert not storage.is_url("/tmp/x") and not storage.is_url(Path("/tmp/x")) and not storage.is_url("file:///t")
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")
    assert storage.join("s3://b/data", "train/p.parquet") == "s3://b/data/train/p.parquet"
    assert storage.join("s3://b/data/", "../other/p") == "s3://b/other/p"
    assert storage.join("/tmp/d", "s3://c/abs.parquet") == "s3://c/abs.parquet"  # a URL entry wins
    assert storage.join(Path("/tmp/d"), "a", "b") == Path("/tmp/d/a/b")
    assert storage.parent("s3://b/data/feature_spec.yaml") == "s3://b/data"
    assert storage.parent("/tmp/d/f.yaml") == Path("/tmp/d")


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> storage.Store:
    if request.param == "local":
        return storage.Store(tmp_path / "root")
    return storage.Store(request.getfixturevalue("s3_bucket") + "/root")


def test_write_list_read_ranges_delete(store: storage.Store) -> None:
    assert store.listdir() == [] and not store.exists()
    rec = store.write_bytes("a/x.bin", b"0123456789")
    assert rec == {"bytes": 10, "crc32": zlib.crc32(b"0123456789")}
    store.write_bytes("a/y.bin", b"y")
    store.write_bytes("b.bin", b"b")
    assert store.listdir() == ["a", "b.bin"] and store.listdir("a") == ["x.bin", "y.bin"]
    assert store.listdir("nothing") == []
    assert store.exists("a/x.bin") and store.exists("a") and not store.exists("a/z.bin")
    assert store.read_bytes("a/x.bin") == b"0123456789"
    assert store.read_range("a/x.bin", 3, 4) == b"3456"
    assert store.read_range("a/x.bin", 8, 100) == b"89"  # short at the end
    tag = store.info("a/x.bin")
    assert tag["size"] == 10 and tag["etag"]
    store.write_bytes("a/x.bin", b"different!")
    assert store.info("a/x.bin")["etag"] != tag["etag"]  # new content, new etag (the verdict cache's key)
    store.delete("a/y.bin")
    store.delete("a/y.bin")  # missing is fine
    assert store.listdir("a") == ["x.bin"]
    store.delete_prefix("a")
    assert store.listdir() == ["b.bin"]
    with pytest.raises(storage.NotFound, match=r"root/a/x\.bin: not found"):
        store.read_bytes("a/x.bin")


def test_streamed_write_is_multipart_with_bounded_memory(s3_bucket: str) -> None:  # noqa: F811
    store = storage.Store(s3_bucket)
    piece = 1 << 20
    total = 3 * storage.PART_BYTES + 5 * piece  # 3 full parts and a short last one
    data = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    with store.open_write("big.npy") as out:
        for lo in range(0, total, piece):
            out.write_behind(data[lo:lo + piece].copy())
    assert out.size == total and out.crc == zlib.crc32(data)
    assert out.peak_buffered == storage.PART_BYTES  # one part at most, whatever the object's size
    assert store.info("big.npy")["etag"].endswith("-4")  # S3's multipart ETag: 4 parts
    lo = storage.PART_BYTES - 100  # a ranged GET across a part boundary
    assert store.read_range("big.npy", lo, 300) == data[lo:lo + 300].tobytes()


def test_ranged_reads_in_flight_together_yield_in_order(s3_bucket: str) -> None:  # noqa: F811
    """An object's ranges are fetched :data:`~wd_sok.storage.paths.AHEAD` at a time (a big one first, so a
    later small one finishes before it): yielded in the order asked, the running CRC32 over them in that
    order, one GET and exactly its bytes counted per range."""
    from wd_sok.storage.paths import AHEAD, ObjectRangeReader, path

    assert AHEAD >= 2
    store = storage.Store(s3_bucket)
    data = np.random.default_rng(1).bytes(3 << 20)
    store.write_bytes("r.bin", data)
    spans = [(0, 2 << 20), (10, 5), (len(data) - 7, 100), (1 << 20, 4096), (123, 1)]  # the 3rd is short
    want = [data[o:o + n] for o, n in spans]
    before = dict(storage.store.TRAFFIC)
    with ObjectRangeReader(path(f"{s3_bucket}/r.bin"), crc=7) as r:
        got = [b.tobytes() for b in r.ranges(spans)]
    assert got == want
    assert r.crc == zlib.crc32(b"".join(want), 7)
    assert r.range_crcs == [zlib.crc32(w) for w in want] and r.bytes_read == sum(map(len, want))
    assert storage.store.TRAFFIC["get_requests"] - before["get_requests"] == len(spans)
    assert storage.store.TRAFFIC["get_bytes"] - before["get_bytes"] == sum(map(len, want))


def test_failed_write_leaves_no_object(store: storage.Store) -> None:
    with pytest.raises(RuntimeError), store.open_write("half.bin") as out:
        out.write(b"x" * 1000)
        raise RuntimeError("killed half-way")
    assert not store.exists("half.bin")


def test_staging_and_publish(store: storage.Store) -> None:
    staged = store.staging("ckpt-5", ".tmp-ckpt-5")
    assert staged == (".tmp-ckpt-5" if store.is_local else "ckpt-5")  # object stores: no rename
    store.write_bytes(f"{staged}/data.bin", b"d")
    store.write_bytes(f"{staged}/manifest.json", b"{}")  # written last: the commit on object stores
    store.publish(staged, "ckpt-5")
    assert store.listdir() == ["ckpt-5"] and store.listdir("ckpt-5") == ["data.bin", "manifest.json"]


def test_upload_tree_marker_last_and_download_checks(s3_bucket: str, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb" * 1000)
    (src / "variables" / "variables.index").write_bytes(b"ix")
    url = f"{s3_bucket}/export"
    storage.Store(url).write_bytes("stale.txt", b"from an older upload")
    assert not is_complete(url)
    with pytest.raises(storage.NotFound, match=f"{url}: not a complete upload"):
        download_tree(url, tmp_path / "never")
    marker = upload_tree(src, url)
    assert sorted(marker["files"]) == ["saved_model.pb", "variables/variables.index"]
    assert storage.Store(url).listdir() == sorted([MARKER, "saved_model.pb", "variables"])  # stale one gone
    out = download_tree(url, tmp_path / "dst")
    assert (out / "saved_model.pb").read_bytes() == b"pb" * 1000
    storage.Store(url).write_bytes("saved_model.pb", b"changed under the marker")
    with pytest.raises(storage.StorageError, match=r"saved_model\.pb: .* do not match the marker"):
        download_tree(url, tmp_path / "dst2")


def test_missing_bucket_and_object_are_one_line_errors_naming_the_url(s3_server: str) -> None:  # noqa: F811
    store = storage.Store("s3://no-such-bucket-wd-sok/x")
    for call in (store.listdir, lambda: store.read_bytes("y"), lambda: store.write_bytes("y", b"1")):
        with pytest.raises(storage.NotFound) as e:
            call()
        assert str(e.value).startswith("s3://no-such-bucket-wd-sok/x") and "\n" not in str(e.value)
        assert "does not exist" in str(e.value)


def test_memory_protocol_works_too() -> None:
    store = storage.Store("memory://wd-sok-test/root")
    store.delete_prefix("")
    with store.open_write("f.bin") as out:
        out.write(b"abc" * 10)
    assert store.read_range("f.bin", 3, 3) == b"abc" and store.listdir() == ["f.bin"]


def test_storage_options_reach_the_filesystem_and_are_never_logged(s3_bucket: str) -> None:  # noqa: F811
    import s3fs

    try:
        storage.configure(json.dumps({"default_block_size": 7 << 20}))
        assert storage.Store(s3_bucket).fs.default_block_size == 7 << 20
    finally:
        storage.configure(None)
        s3fs.S3FileSystem.clear_instance_cache()
    cfg = parse_config(["--storage_options", '{"key": "AKIA-SECRET", "secret": "s3cr3t"}'])
    assert "s3cr3t" not in cfg.to_json() and "AKIA" not in json.dumps(cfg.public())
    with pytest.raises(SystemExit):
        parse_config(["--storage_options", "[1, 2]"])


def test_verdict_cache_keys_remote_files_by_etag(s3_bucket: str, tmp_path: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from wd_sok.data.cache import VerdictCache

    monkeypatch.setenv("WD_SOK_CACHE_DIR", str(tmp_path / "cache"))
    store = storage.Store(f"{s3_bucket}/data")
    store.write_bytes("p.parquet", b"v1")
    url, rules = store.url("p.parquet"), {"columns": ["a"]}
    cache = VerdictCache(store.url())
    assert not cache.passed(url, rules)
    cache.add(url, rules)
    cache.commit()
    assert VerdictCache(store.url()).passed(url, rules)
    assert not VerdictCache(store.url()).passed(url, {"columns": ["b"]})  # other rules, other verdict
    store.write_bytes("p.parquet", b"v2")  # new content: new ETag, the old verdict no longer applies
    assert not VerdictCache(store.url()).passed(url, rules)

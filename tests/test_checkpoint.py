"""Sharded checkpoints in one process: round trips, resharding N -> M by global row id, the format on disk,
atomicity, fallback and the errors. Over real ranks: tests/test_lifecycle.py.

Where several ranks are needed without collectives, one process plays each rank in turn: writing uses the
writer's per-rank step (``_write_table``) and rank 0's commit, reading uses ``read_one`` (a rank's part of a
restore has no collective).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from tests.dist.state import gathered_state, read_checkpoint
from wd_sok import checkpoint
from wd_sok.checkpoint import format as fmt
from wd_sok.checkpoint import reader, writer
from wd_sok.data.batch import Batch
from wd_sok.embedding.replicated import ReplicatedEmbedding
from wd_sok.embedding.sharded import ShardedEmbedding
from wd_sok.feature_spec import TableConfig
from wd_sok.model import WideDeepModel
from wd_sok.optim import LazyRMSprop
from wd_sok.state import dense_state, import_dense, table_states
from wd_sok.steps import make_train_step

DEEP = [TableConfig("a", 7, 3), TableConfig("b", 50, 2), TableConfig("m", 11, 4, 3, True, "mean")]
WIDE = [TableConfig(t.name, t.cardinality, 1, t.max_hotness, t.multihot, "sum") for t in DEEP]


class FakeRuntime(SimpleNamespace):
    """Rank ``rank`` of ``size`` with the collectives of a lone process."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        super().__init__(rank=rank, size=size, is_chief=rank == 0, hvd=None)

    def allgather_object(self, obj: object, name: str) -> list:
        return [obj]

    def broadcast_object(self, obj: object, name: str) -> object:
        return obj

    def allreduce_grads(self, grads: list) -> list:
        return grads


def build(rank: int = 0, world: int = 1, backend: str = "sharded", seed: int = 0):
    """A small Wide & Deep model on rank ``rank`` of ``world`` with its two optimizers (built, no step)."""
    rt = FakeRuntime(rank, world)
    if backend == "sharded":
        wide, deep = (ShardedEmbedding(WIDE, "zeros", seed, "wide", rt),
                      ShardedEmbedding(DEEP, "glorot_normal", seed, "deep", rt))
    else:
        wide, deep = (ReplicatedEmbedding(WIDE, "zeros", seed, "wide", rank, world),
                      ReplicatedEmbedding(DEEP, "glorot_normal", seed, "deep", rank, world))
    model = WideDeepModel(["a", "b", "m"], 2, wide, deep, [8], dropout=0.0, seed=seed)
    width = sum(t.dim for t in DEEP) + 2
    model._mlp_impl(tf.zeros([1, width]), tf.constant(0, tf.int64), 0.0)  # builds the MLP; no lookup (collective)
    return model, tf.keras.optimizers.legacy.Ftrl(0.1), LazyRMSprop(0.01, rho=0.5), rt


def batch(n: int = 16, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, n)
    return Batch(tf.constant(rng.normal(size=(n, 2)), tf.float32),
                 {"a": tf.constant(rng.integers(0, 7, n), tf.int32), "b": tf.constant(rng.integers(0, 50, n)),
                  "m": tf.RaggedTensor.from_row_lengths(rng.integers(0, 11, lengths.sum()), lengths)},
                 tf.constant(rng.integers(0, 2, n), tf.float32))


def train(model, wide_opt, deep_opt, rt, steps: int = 3) -> None:
    step = make_train_step(model, wide_opt, deep_opt, rt, 16)
    for i in range(steps):
        step(batch(16, seed=i), tf.constant(i, tf.int64))


RUN = "0123456789abcdef"


def save(model_dir: Path, model, wide_opt, deep_opt, rt, step: int, keep: int = 2) -> dict:
    meta = {"epoch": 1, "step_in_epoch": 2, "global_step": step, "seed": 0, "config": {}, "backend": "test",
            "run": RUN}
    return checkpoint.save(model_dir, step, table_states(model, wide_opt, deep_opt),
                           dense_state(model, wide_opt, deep_opt), meta, rt, keep=keep)


def restore(model_dir: Path, model, wide_opt, deep_opt, rt) -> tuple[dict, Path]:
    return checkpoint.restore_latest(model_dir, table_states(model, wide_opt, deep_opt),
                                     lambda a, o: import_dense(model, wide_opt, deep_opt, a, o), rt)


def read_rank(folder: Path, model, wide_opt, deep_opt) -> dict:
    """One rank's part of a restore (no collective)."""
    return reader.read_one(folder, table_states(model, wide_opt, deep_opt),
                           lambda a, o: import_dense(model, wide_opt, deep_opt, a, o))


def assert_same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert not np.isnan(np.asarray(got[key], np.float64)).any(), f"{key}: rows missing"
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_round_trip_one_rank_is_exact(tmp_path: Path) -> None:
    model, wo, do, rt = build()
    train(model, wo, do, rt, steps=3)
    want = gathered_state(model, wo, do, rt)
    out = save(tmp_path, model, wo, do, rt, step=3)
    assert out["path"] == str(tmp_path / "ckpt-3") and out["bytes"] > 0
    fresh, wo2, do2, rt2 = build(seed=7)  # other initial values everywhere
    manifest, path = restore(tmp_path, fresh, wo2, do2, rt2)
    assert path == tmp_path / "ckpt-3" and manifest["epoch"] == 1 and manifest["step_in_epoch"] == 2
    assert_same_state(gathered_state(fresh, wo2, do2, rt2), want)
    # and training on from the restored state is the same as training on from the original
    train(model, wo, do, rt, steps=2)
    train(fresh, wo2, do2, rt2, steps=2)
    assert_same_state(gathered_state(fresh, wo2, do2, rt2), gathered_state(model, wo, do, rt))


def write_multi_rank(folder: Path, world: int, step: int = 5, backend: str = "sharded") -> dict:
    """A checkpoint as ``world`` ranks write it, each rank played in turn; returns the whole state."""
    tmp = folder / f"{fmt.TMP_PREFIX}{step}"
    tmp.mkdir(parents=True)
    records, rank0 = [], None
    for r in range(world):
        model, wo, do, rt = build(r, world, backend)
        for state in table_states(model, wo, do):  # known values: every row and slot says its global id
            rows = state.rows
            g = rows.global_rows(0, rows.count).astype(np.float32)[:, None]
            for k, array in enumerate(state.arrays()):
                var_rows = np.arange(rows.vstart, rows.vstart + rows.count * rows.vstride, rows.vstride)
                state.write(array, var_rows, np.repeat(g * 10 + k, state.table.dim, 1)
                            + np.arange(state.table.dim, dtype=np.float32) / 100)
        files: dict = {}
        records.append({"rank": r, "files": files, "error": "",
                        "tables": {s.key: writer._write_table(tmp, s, rt, files) for s in table_states(model, wo, do)}})
        rank0 = rank0 or (model, wo, do)
    info = {s.key: {"cardinality": s.table.cardinality, "dim": s.table.dim, "dtype": "float32"}
            for s in table_states(*rank0)}
    meta = {"epoch": 0, "step_in_epoch": step, "global_step": step, "seed": 0, "config": {}, "backend": backend,
            "tables": info}
    writer._commit(tmp, folder / f"ckpt-{step}", step, records, dense_state(*rank0), meta, world)
    return read_checkpoint(folder / f"ckpt-{step}")[0]


@pytest.mark.parametrize("source", ["sharded", "replicated"])
@pytest.mark.parametrize("world_in,world_out", [(2, 1), (2, 3), (3, 2), (2, 4), (1, 3)])
def test_reshard_by_global_row_id(tmp_path: Path, source: str, world_in: int, world_out: int) -> None:
    """Written by N ranks, read by each rank of M: every rank holds exactly its rows g % M, slots included."""
    whole = write_multi_rank(tmp_path, world_in, backend=source)
    folder = tmp_path / "ckpt-5"
    for r in range(world_out):
        model, wo, do, rt = build(r, world_out, "sharded", seed=3)
        read_rank(folder, model, wo, do)
        for state in table_states(model, wo, do):
            rows = state.rows
            g = rows.global_rows(0, rows.count)
            assert np.array_equal(g, np.arange(r, state.table.cardinality, world_out))
            for array in state.arrays():
                key = state.key if array == "value" else f"{state.key}:{array}"
                np.testing.assert_array_equal(state.read(array, 0, rows.count), whole[key][g], err_msg=key)


def test_a_rank_does_not_open_files_without_its_rows(tmp_path: Path) -> None:
    """2 -> 4 ranks: rank 0 owns only even rows, all in writer rank 0's files; rank 1's files may be gone."""
    whole = write_multi_rank(tmp_path, 2)
    folder = tmp_path / "ckpt-5"
    for f in folder.glob("*.r00001-of-00002.npy"):
        f.unlink()
    model, wo, do, rt = build(0, 4)
    read_rank(folder, model, wo, do)
    state = table_states(model, wo, do)[-1]
    np.testing.assert_array_equal(state.read("value", 0, state.rows.count), whole[state.key][0::4])
    model, wo, do, rt = build(1, 4)  # rank 1 owns odd rows: it needs the missing files
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"table 'wide/a' \(wide\.a\.value\.r00001-of-00002"):
        read_rank(folder, model, wo, do)


def test_format_on_disk(tmp_path: Path) -> None:
    """Manifest fields; every file is a standard .npy / .npz whose size and CRC32 the manifest gives."""
    model, wo, do, rt = build()
    train(model, wo, do, rt)
    save(tmp_path, model, wo, do, rt, step=3)
    folder = tmp_path / "ckpt-3"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "wd-sok-checkpoint" and manifest["version"] == fmt.VERSION
    assert (manifest["step"], manifest["world_size"], manifest["epoch"], manifest["step_in_epoch"]) == (3, 1, 1, 2)
    assert set(manifest["tables"]) == {f"{p}/{t.name}" for p in ("wide", "deep") for t in DEEP}
    entry = manifest["tables"]["deep/b"]
    assert (entry["cardinality"], entry["dim"], entry["dtype"]) == (50, 2, "float32")
    assert entry["arrays"] == ["value", "rms"] and manifest["tables"]["wide/b"]["arrays"] == [
        "value", "accumulator", "linear"]
    assert entry["shards"] == [{"rank": 0, "start": 0, "stride": 1, "count": 50,
                                "files": {"value": "deep.b.value.r00000-of-00001.npy",
                                          "rms": "deep.b.rms.r00000-of-00001.npy"}}]
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    for name, f in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert (len(data), zlib.crc32(data)) == (f["bytes"], f["crc32"]), name
    np.testing.assert_array_equal(np.load(folder / "deep.b.value.r00000-of-00001.npy"),
                                  model.deep_embedding.shards["b"].numpy())


def test_keep_latest_and_killed_saves_are_ignored_then_cleaned(tmp_path: Path) -> None:
    model, wo, do, rt = build()
    for step in (1, 2, 3):
        save(tmp_path, model, wo, do, rt, step=step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-2", "ckpt-3"]
    (tmp_path / ".tmp-ckpt-9").mkdir()  # a save killed before its rename
    (tmp_path / "ckpt-8").mkdir()       # a folder without a manifest is not a checkpoint
    (tmp_path / "ckpt-8" / "wide.a.value.r00000-of-00001.npy").write_bytes(b"x")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-2", "ckpt-3"]
    assert restore(tmp_path, *build())[1] == tmp_path / "ckpt-3"
    assert sorted(p.name for p in checkpoint.clean_temporaries(tmp_path)) == [".tmp-ckpt-9", "ckpt-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-2", "ckpt-3"]


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_latest_falls_back_with_a_warning(tmp_path: Path, damage: str) -> None:
    model, wo, do, rt = build()
    save(tmp_path, model, wo, do, rt, step=1)
    want = gathered_state(model, wo, do, rt)
    train(model, wo, do, rt)
    save(tmp_path, model, wo, do, rt, step=4)
    victim = tmp_path / "ckpt-4" / "deep.b.rms.r00000-of-00001.npy"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[:-8])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    fresh = build(seed=5)
    with pytest.warns(UserWarning, match=r"ckpt-4: table 'deep/b' \(deep\.b\.rms\.r00000-of-00001\.npy\).*"
                                         "falling back to the previous checkpoint"):
        _, path = restore(tmp_path, *fresh)
    assert path == tmp_path / "ckpt-1"
    assert_same_state(gathered_state(*fresh), want)


def test_errors_name_folder_table_and_file(tmp_path: Path) -> None:
    model, wo, do, rt = build()
    save(tmp_path, model, wo, do, rt, step=2)
    folder = tmp_path / "ckpt-2"
    victim = folder / "deep.a.value.r00000-of-00001.npy"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=rf"no usable checkpoint in {tmp_path}.*{folder}: "
                       r"table 'deep/a' \(deep\.a\.value\.r00000-of-00001\.npy\): 100 bytes"):
        restore(tmp_path, *build())
    # another feature spec: a table of another size, or missing
    other = tmp_path / "other"
    save(other, model, wo, do, rt, step=2)
    manifest = json.loads((other / "ckpt-2" / "manifest.json").read_text())
    manifest["tables"]["deep/b"]["cardinality"] = 51
    (other / "ckpt-2" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"ckpt-2: table 'deep/b' \(manifest\.json\): "
                       "51 x 2 in the checkpoint, 50 x 2 in this model"):
        restore(other, *build())
    del manifest["tables"]["deep/b"]
    (other / "ckpt-2" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"table 'deep/b' \(manifest\.json\): not in this"):
        restore(other, *build())
    manifest["version"] = fmt.VERSION + 1
    (other / "ckpt-2" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match="format version 2 is newer"):
        restore(other, *build())


@pytest.mark.parametrize(("direct", "early"), [("1", False), ("1", True), ("0", False)])
def test_direct_io_files_are_byte_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str,
                                        early: bool) -> None:
    """Chunks, an unaligned tail and arbitrary range reads give the same bytes with and without O_DIRECT, and
    when each write's aligned leftover goes out at once (``early``: its unaligned rest moves to the stage's
    front); staging buffers are reused by the next writer."""
    from wd_sok.checkpoint import directio

    monkeypatch.setenv("WD_SOK_DIRECT_IO", direct)
    monkeypatch.setattr(directio, "CHUNK", 3 * directio.ALIGN)
    monkeypatch.setattr(directio, "EARLY", directio.ALIGN + 1 if early else directio.CHUNK + 1)
    monkeypatch.setattr(directio, "_IDLE", [])  # buffers of the real CHUNK size are not for this test
    data = np.random.default_rng(0).bytes(10 * directio.ALIGN + 123)
    with directio.SequentialWriter(tmp_path / "f") as w:
        for i in range(0, len(data), 5000):  # pieces that straddle chunk boundaries
            w.write(data[i:i + 5000])
    assert w.size == len(data) and (tmp_path / "f").read_bytes() == data
    spans = [(0, 10), (4095, 2), (128, 3 * directio.ALIGN), (len(data) - 7, 7), (5, len(data) - 5)]
    with directio.RangeReader(tmp_path / "f", crc=7) as r:
        for (off, n), got in zip(spans, r.ranges(spans), strict=True):
            assert got.tobytes() == data[off:off + n], (off, n)
    assert r.crc == zlib.crc32(b"".join(data[o:o + n] for o, n in spans), 7)
    with directio.RangeReader(tmp_path / "f") as r:  # past the end: short
        assert [len(b) for b in r.ranges([(len(data) - 3, 10)])] == [3]
    if w.direct:  # O_DIRECT here: the closed writer's buffer serves the next one, which writes the same bytes
        assert len(directio._IDLE) == 1  # noqa: SLF001
        stage = directio._IDLE[0]  # noqa: SLF001
        with directio.SequentialWriter(tmp_path / "g") as w:
            assert w.stage is stage
            w.write(data[:7000])
        assert (tmp_path / "g").read_bytes() == data[:7000]

"""A model_dir belongs to one run (issue 22): lineage, retention, one file per table, what restore reads.

One process plays each run or rank (tests/test_checkpoint.py's helpers); main.py runs are in
tests/test_bad_input.py (refusal) and below (--overwrite, --use_checkpoint auto).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.dist.state import gathered_state
from tests.test_checkpoint import FakeRuntime, assert_same_state, build, read_rank, restore, train, write_multi_rank
from tests.test_dynamic_export import trainer_with_dynamic_tables
from tests.test_train import run_main
from wd_sok import checkpoint
from wd_sok.checkpoint import convert, lineage
from wd_sok.checkpoint import format as fmt
from wd_sok.checkpoint.format import shard_file
from wd_sok.embedding.replicated import ReplicatedEmbedding
from wd_sok.feature_spec import TableConfig
from wd_sok.model import WideDeepModel
from wd_sok.optim import LazyRMSprop
from wd_sok.state import dense_state, import_dense, table_states

RUN_A, RUN_B = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
TINY = ["--global_batch_size", "32", "--eval_batch_size", "64", "--deep_hidden_units", "8", "--deep_warmup_epochs",
        "0", "--num_epochs", "1"]


def save(model_dir: Path, parts: tuple, step: int, run: str, keep: int = 2) -> dict:
    model, wo, do, rt = parts
    meta = {"epoch": 0, "step_in_epoch": step, "global_step": step, "seed": 0, "config": {}, "backend": "test",
            **lineage.lineage_fields(run, 0, "f" * 64)}
    return checkpoint.save(model_dir, step, table_states(model, wo, do), dense_state(model, wo, do), meta, rt,
                           keep=keep)


def runs(model_dir: Path) -> list[tuple[str, str]]:
    return [(e.path.name, e.run) for e in lineage.scan(model_dir)]


def test_retention_keeps_this_runs_newest_and_never_another_runs(tmp_path: Path) -> None:
    """Run A leaves ckpt-19, ckpt-38; run B (a fresh run) saves from step 5: before, B's first save was
    deleted at once (retention by step number) and A's were deleted later; now each run keeps its own."""
    a, b = build(), build(seed=3)
    for step in (19, 38):
        save(tmp_path, a, step, RUN_A)
    out = save(tmp_path, b, 5, RUN_B)
    assert out["path"] == str(tmp_path / "ckpt-5")
    assert runs(tmp_path) == [("ckpt-19", RUN_A), ("ckpt-38", RUN_A), ("ckpt-5", RUN_B)]
    for step in (6, 7):
        save(tmp_path, b, step, RUN_B)
    assert runs(tmp_path) == [("ckpt-19", RUN_A), ("ckpt-38", RUN_A), ("ckpt-6", RUN_B), ("ckpt-7", RUN_B)]
    commits = [e.commit for e in lineage.scan(tmp_path)]
    assert commits == sorted(commits) and len(set(commits)) == 4


def test_restore_takes_the_newest_commit_not_the_highest_step(tmp_path: Path) -> None:
    a, b = build(), build(seed=3)
    save(tmp_path, a, 38, RUN_A)
    train(*b, steps=2)
    save(tmp_path, b, 5, RUN_B)
    want = gathered_state(*b)
    fresh = build(seed=9)
    manifest, path = restore(tmp_path, *fresh)
    assert (path.name, manifest["run"]) == ("ckpt-5", RUN_B)
    assert_same_state(gathered_state(*fresh), want)


def test_same_step_of_another_run_is_written_beside_it_not_over_it(tmp_path: Path) -> None:
    a, b = build(), build(seed=3)
    save(tmp_path, a, 5, RUN_A)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt-5").iterdir()}
    out = save(tmp_path, b, 5, RUN_B)
    assert out["path"] == str(tmp_path / f"ckpt-5-{RUN_B}")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt-5").iterdir()} == before
    # the same run reaching a step again (it resumed from an older checkpoint) replaces its own folder
    save(tmp_path, b, 5, RUN_B)
    assert runs(tmp_path) == [("ckpt-5", RUN_A), (f"ckpt-5-{RUN_B}", RUN_B)]


def test_rank0_listing_is_followed_by_every_rank(tmp_path: Path) -> None:
    """A rank whose own listing differs (a stale attribute cache) restores the folder rank 0 chose."""
    a = build()
    save(tmp_path, a, 1, RUN_A)
    train(*a, steps=1)
    save(tmp_path, a, 2, RUN_A)
    model, wo, do, _ = build(seed=5)

    class Follower(FakeRuntime):
        def broadcast_object(self, obj: object, name: str) -> object:
            return (["ckpt-1"], []) if name == "ckpt_listing" else obj

    rt = Follower(rank=1, size=1)
    _, path = checkpoint.restore_latest(tmp_path, table_states(model, wo, do),
                                        lambda x, o: import_dense(model, wo, do, x, o), rt)
    assert path == tmp_path / "ckpt-1"


@pytest.mark.parametrize("damage", ["drop_files", "bad_shard_count", "not_a_list"])
def test_parseable_but_damaged_manifest_falls_back(tmp_path: Path, damage: str) -> None:
    a = build()
    save(tmp_path, a, 1, RUN_A)
    save(tmp_path, a, 2, RUN_A)
    path = tmp_path / "ckpt-2" / "manifest.json"
    m = json.loads(path.read_text())
    if damage == "drop_files":
        del m["files"]
    elif damage == "bad_shard_count":
        m["tables"]["deep/a"]["shards"][0].pop("count")
    else:
        m["tables"]["deep/b"]["shards"] = {"x": 1}
    path.write_text(json.dumps(m))
    with pytest.warns(UserWarning, match=r"ckpt-2: manifest.json: damaged \(field '(files|tables/deep/[ab]|tables/"
                      r"deep/a/shards)'\); falling back"):
        _, got = restore(tmp_path, *build(seed=4))
    assert got == tmp_path / "ckpt-1"


def test_any_exception_in_a_save_is_the_agreed_verdict(tmp_path: Path) -> None:
    model, wo, do, rt = build()
    states = table_states(model, wo, do)
    real = states[0]

    class Broken:  # a table whose read fails with something other than an OSError
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def read(self, array: str, lo: int, hi: int) -> np.ndarray:
            raise ValueError("shape mismatch in a slot")

    states[0] = Broken()  # type: ignore[call-overload]
    meta = {"epoch": 0, "step_in_epoch": 0, "seed": 0, "config": {}, "run": RUN_A}
    with pytest.raises(checkpoint.CheckpointError, match="not saved: rank 0: ValueError: shape mismatch"):
        checkpoint.save(tmp_path, 3, states, dense_state(model, wo, do), meta, rt)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- one file per table
COLLIDING = [("年龄", "性别"), ("a b", "a_b"), ("a/b", "a.b"), ("x~y", "x%7Ey"), ("p" * 300, "p" * 299 + "q")]


@pytest.mark.parametrize("pair", COLLIDING)
def test_file_names_are_one_to_one_in_the_table_name(pair: tuple[str, str]) -> None:
    names = [shard_file(f"deep/{n}", "value", 0, 1) for n in pair]
    assert names[0] != names[1]
    assert all(len(n.encode()) < 255 for n in names)


def _colliding_model(seed: int) -> tuple:
    names = [n for pair in COLLIDING[:3] for n in pair]
    deep = [TableConfig(n, 5 + i, 2) for i, n in enumerate(names)]
    wide = [TableConfig(n, 5 + i, 1) for i, n in enumerate(names)]
    rt = FakeRuntime()
    model = WideDeepModel(names, 1, ReplicatedEmbedding(wide, "zeros", seed, "wide", 0, 1),
                          ReplicatedEmbedding(deep, "glorot_normal", seed, "deep", 0, 1), [4], dropout=0.0,
                          seed=seed)
    model._mlp_impl(tf.zeros([1, 2 * len(names) + 1]), tf.constant(0, tf.int64), 0.0)
    rng = np.random.default_rng(seed)
    for emb in (model.wide_embedding, model.deep_embedding):
        for var in emb.trainable_variables:
            var.assign(rng.normal(size=var.shape).astype(np.float32))
    return model, tf.keras.optimizers.legacy.Ftrl(0.1), LazyRMSprop(0.01, rho=0.5), rt


def test_colliding_feature_names_round_trip_exactly(tmp_path: Path) -> None:
    """Before, 年龄 and 性别 (and a b / a_b, a/b / a.b) shared one file: one table's rows came back in both."""
    parts = _colliding_model(0)
    want = gathered_state(*parts)
    save(tmp_path, parts, 1, RUN_A)
    manifest = json.loads((tmp_path / "ckpt-1" / "manifest.json").read_text())
    files = [n for t in manifest["tables"].values() for s in t["shards"] for n in s["files"].values()]
    assert len(files) == len(set(files)) and set(files) <= {p.name for p in (tmp_path / "ckpt-1").iterdir()}
    fresh = _colliding_model(1)
    restore(tmp_path, *fresh)
    assert_same_state(gathered_state(*fresh), want)


def test_checkpoint_whose_tables_share_a_file_is_refused(tmp_path: Path) -> None:
    """What the earlier file names wrote for such a spec: two tables pointing at one file."""
    parts = _colliding_model(0)
    save(tmp_path, parts, 1, RUN_A)
    path = tmp_path / "ckpt-1" / "manifest.json"
    m = json.loads(path.read_text())
    m["tables"]["deep/性别"]["shards"][0]["files"] = m["tables"]["deep/年龄"]["shards"][0]["files"]
    path.write_text(json.dumps(m))
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match="tables 'deep/年龄' and 'deep/性别' share the file"):
        restore(tmp_path, *_colliding_model(1))


# ---------------------------------------------------------------- dynamic tables: every file checked
@pytest.mark.parametrize("array", ["value", "count", "last"])
def test_dynamic_table_damage_in_any_file_falls_back(tmp_path: Path, array: str) -> None:
    """Before, only the key file's CRC was checked: a flipped byte in values, slots or counters restored."""
    t = trainer_with_dynamic_tables()
    parts = (t.model, tf.keras.optimizers.legacy.Ftrl(0.1), LazyRMSprop(0.01, rho=0.5), FakeRuntime())
    t.model.wide_embedding.attach_optimizer(parts[1])
    t.model.deep_embedding.attach_optimizer(parts[2])
    save(tmp_path, parts, 1, RUN_A)
    save(tmp_path, parts, 2, RUN_A)
    table = "deep/b"
    m = json.loads((tmp_path / "ckpt-2" / "manifest.json").read_text())
    name = m["tables"][table]["shards"][0]["files"][array]
    f = tmp_path / "ckpt-2" / name
    data = bytearray(f.read_bytes())
    assert len(data) > 128, "no row to damage"
    data[-1] ^= 0x40
    f.write_bytes(bytes(data))
    assert zlib.crc32(bytes(data)) != m["files"][name]["crc32"]
    with pytest.warns(UserWarning, match=f"ckpt-2: table '{table}' \\({name}\\): checksum does not match"):
        _, got = restore(tmp_path, *parts)
    assert got == tmp_path / "ckpt-1"


def test_a_block_read_alone_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank that reads only some blocks of a fixed table's file (here blocks of one row, so rank 0 of 2 reads
    the even rows of a file written by 1 rank) checks each block against its own CRC32 in the manifest; before,
    only the size was checked unless the whole file was read, and the damaged row was restored."""
    monkeypatch.setattr(fmt, "BLOCK_BYTES", 1)  # block_rows(dim) = 1
    whole = write_multi_rank(tmp_path, 1)
    folder = tmp_path / "ckpt-5"
    name = shard_file("deep/a", "value", 0, 1)
    entry = json.loads((folder / "manifest.json").read_text())["files"][name]
    assert entry["block_rows"] == 1 and len(entry["block_crc32"]) == whole["deep/a"].shape[0]
    data = bytearray((folder / name).read_bytes())
    with (folder / name).open("rb") as f:
        offset = fmt.read_npy_header(f)[2]
    data[offset + whole["deep/a"].shape[1] * 4 * 2 + 1] ^= 0x10  # row 2: rank 0's under 2 ranks
    (folder / name).write_bytes(bytes(data))
    model, wo, do, _ = build(1, 2, seed=3)
    read_rank(folder, model, wo, do)  # rank 1 reads odd rows only: nothing damaged among them
    model, wo, do, _ = build(0, 2, seed=3)
    with pytest.raises(checkpoint.CorruptCheckpoint, match=rf"table 'deep/a' \({name}\): rows 2-2 do not match"):
        read_rank(folder, model, wo, do)


def test_convert_names_a_damaged_legacy_checkpoint(tmp_path: Path) -> None:
    meta = np.frombuffer(json.dumps({"step_in_epoch": 0}).encode(), np.uint8)  # no "epoch"
    np.savez(tmp_path / "ckpt-3.npz", __meta__=meta, **{"deep/a": np.zeros((2, 2), np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt-3.npz: unreadable checkpoint \(missing field 'epoch'"):
        convert.convert(tmp_path / "ckpt-3.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-3.npz"]


# ---------------------------------------------------------------- main.py
def test_overwrite_and_auto_through_main(tiny_dataset: Path, tmp_path: Path) -> None:
    """--use_checkpoint auto on an empty folder starts fresh, then resumes; --overwrite starts over and removes
    the earlier run's checkpoints once its own first one is committed."""
    run_main(tiny_dataset, tmp_path, *TINY, "--use_checkpoint", "auto")
    first = runs(tmp_path / "ckpt")
    assert first and len({r for _, r in first}) == 1
    _, out = run_main(tiny_dataset, tmp_path, *TINY, "--num_epochs", "2", "--use_checkpoint", "auto")
    assert f"run {first[0][1]}, epoch 1" in out and "flags changed since: --num_epochs 1 -> 2" in out
    assert {r for _, r in runs(tmp_path / "ckpt")} == {first[0][1]}
    _, out = run_main(tiny_dataset, tmp_path, *TINY, "--overwrite")
    after = runs(tmp_path / "ckpt")
    assert after and first[0][1] not in {r for _, r in after} and len({r for _, r in after}) == 1
    assert "--overwrite: removed the 2 checkpoint(s)" in out

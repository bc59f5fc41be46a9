"""``python -m wd_sok.checkpoint consolidate`` (wd_sok/checkpoint/consolidate.py): full + delta -> a full checkpoint
that equals, file for file and restored under 1 or more ranks, the full checkpoint written at the delta's step
(fixed tables of every placement, written by 1 or 2 ranks; dynamic tables with evictions between base and delta);
damage is refused in one line with nothing written; no read is larger than a block."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.dist.dynamic_ckpt import Model as DynModel
from tests.dist.dynamic_ckpt import train as dyn_train
from tests.dist.state import gathered_state
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures
from tests.test_checkpoint import DEEP, RUN, WIDE, FakeRuntime, assert_same_state, build, read_rank, train
from tests.test_delta import _step_dyn, changed_ids, dyn_dense, dyn_import, dyn_state, late_batches, reset, save_delta
from wd_sok import changes, checkpoint
from wd_sok.checkpoint import consolidate as cons
from wd_sok.checkpoint import delta, merge, reader, writer
from wd_sok.checkpoint import format as fmt
from wd_sok.embedding.plan import Placement
from wd_sok.embedding.sharded import ShardedEmbedding
from wd_sok.model import WideDeepModel
from wd_sok.optim import LazyRMSprop
from wd_sok.state import dense_state, table_states

ROOT = Path(__file__).resolve().parents[1]
SAME = ("format", "version", "step", "world_size", "epoch", "step_in_epoch", "global_step", "seed", "config",
        "backend", "run", "tables")


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def assert_same_checkpoint(got: Path, want: Path, delta_folder: Path) -> None:
    """Every table file byte for byte, the manifest fields a full checkpoint of that step has, the dense state."""
    g, w, d = manifest(got), manifest(want), manifest(delta_folder)
    assert "kind" not in g and "base" not in g and "deltas" not in g
    for field in SAME:
        assert g.get(field) == w.get(field), field
    assert g["commit"] == d["commit"] and g["consolidated"]["delta"] == delta_folder.name
    tables = {n for e in w["tables"].values() for s in e["shards"] for n in s["files"].values()}
    assert {n: g["files"][n] for n in tables} == {n: w["files"][n] for n in tables}
    assert set(g["files"]) == set(w["files"]) and (got / "dense.npz").read_bytes() == (
        delta_folder / "dense.npz").read_bytes()
    for name in tables:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    with np.load(io.BytesIO((got / "dense.npz").read_bytes())) as a, np.load(want / "dense.npz") as b:
        assert_same_state({k: a[k] for k in a.files}, {k: b[k] for k in b.files})
    assert sorted(p.name for p in got.parent.iterdir() if p.name.startswith(fmt.TMP_PREFIX)) == []


def rank_state(model, wo, do) -> dict:  # noqa: ANN001
    """This rank's saved rows of every array of every table, and the dense state."""
    out = dense_state(model, wo, do)
    for s in table_states(model, wo, do):
        for a in s.arrays():
            out[f"{s.key}:{a}"] = s.read(a, 0, s.rows.count)
    return out


@pytest.mark.parametrize("backend", ["sharded", "replicated"])
def test_trained_full_plus_delta_consolidates_to_the_full_one(tmp_path: Path, backend: str) -> None:
    """Train, full at 3, train on few ids, delta at 7 and (another folder) full at 7: the consolidated folder
    has the full one's files; restored it is the trained state; it is the one a resume takes, a base for the
    next delta, and retention (not the tool) removes the delta it replaces."""
    d, f = tmp_path / "d", tmp_path / "f"
    model, wo, do, rt = build(backend=backend)
    train(model, wo, do, rt, steps=3)
    save_delta(d, None, model, wo, do, rt, step=3)
    reset(model, wo, do)
    late_batches(model, wo, do, rt, first=3, steps=4)
    want = gathered_state(model, wo, do, rt)
    assert save_delta(d, d / "ckpt-3", model, wo, do, rt, step=7)["kind"] == "delta"
    save_delta(f, None, model, wo, do, rt, step=7)
    assert cons.main([str(d / "ckpt-7")]) == 0
    got = d / f"ckpt-7-{RUN}"
    assert_same_checkpoint(got, f / "ckpt-7", d / "ckpt-7")
    assert (d / "ckpt-7" / "manifest.json").is_file()  # the delta stays
    fresh = build(seed=7, backend=backend)
    assert read_rank(got, *fresh[:3])["step"] == 7
    assert_same_state(gathered_state(*fresh), want)
    manifest_, path = checkpoint.restore_latest(d, table_states(*fresh[:3]), lambda a, o: None, fresh[3])
    assert path == got and [p.name for p in checkpoint.list_checkpoints(d)] == ["ckpt-3", "ckpt-7", got.name]
    late_batches(model, wo, do, rt, first=7, steps=2)  # a delta against the consolidated one restores exactly
    out = save_delta(d, got, model, wo, do, rt, step=9, keep=3)
    assert out["kind"] == "delta" and manifest(d / "ckpt-9")["base"]["path"] == got.name
    fresh = build(seed=8, backend=backend)
    read_rank(d / "ckpt-9", *fresh[:3])
    assert_same_state(gathered_state(*fresh), gathered_state(model, wo, do, rt))
    save_delta(d, None, model, wo, do, rt, step=10, keep=2)  # retention: the delta and its base go now
    assert [p.name for p in checkpoint.list_checkpoints(d)] == [got.name, "ckpt-9", "ckpt-10"]


PLACED = {"a": Placement("row_wise"), "b": Placement("table_wise", owner=1), "m": Placement("replicated")}


def build_placed(rank: int, world: int, seed: int = 0):  # noqa: ANN201
    """tests.test_checkpoint.build with the deep tables row-wise, table-wise (rank 1) and replicated."""
    rt = FakeRuntime(rank, world)
    place = PLACED if world > 1 else None
    model = WideDeepModel(["a", "b", "m"], 2, ShardedEmbedding(WIDE, "zeros", seed, "wide", rt, place),
                          ShardedEmbedding(DEEP, "glorot_normal", seed, "deep", rt, place), [8], dropout=0.0,
                          seed=seed)
    import tensorflow as tf

    model._mlp_impl(tf.zeros([1, sum(t.dim for t in DEEP) + 2]), tf.constant(0, tf.int64), 0.0)
    return model, tf.keras.optimizers.legacy.Ftrl(0.1), LazyRMSprop(0.01, rho=0.5), rt


def write_sim(tmp: Path, world: int, step: int, kind: str) -> None:
    """``kind`` "base" (full at 5), "delta" (at 9 against tmp/d/ckpt-5) or "full" (at 9) as ``world`` ranks
    write it, each rank played in turn: every row says its global id; at 9 rows changed_ids(...) changed."""
    folder = tmp / ("f" if kind == "full" else "d") / f"{fmt.TMP_PREFIX}{step}"
    folder.mkdir(parents=True)
    records, rank0 = [], None
    for r in range(world):
        model, wo, do, rt = build_placed(r, world)
        do.iterations.assign(5)
        wo.iterations.assign(5)
        for state in table_states(model, wo, do):
            rows = state.rows
            g = rows.global_rows(0, rows.count).astype(np.float32)[:, None]
            var_rows = np.arange(rows.vstart, rows.vstart + rows.count * rows.vstride, rows.vstride)
            for k, array in enumerate(state.arrays()):
                state.write(array, var_rows, np.repeat(g * 10 + k + 1, state.table.dim, 1))
        if kind != "base":  # step 9: some rows of every table changed (the lazy rms of the others owes 4 decays)
            do.iterations.assign(9)
            wo.iterations.assign(9)
            for state in table_states(model, wo, do):
                ids = changed_ids(state.key, state.table.cardinality)
                mask, var_rows = state.owned(ids)
                for k, array in enumerate(state.arrays()):
                    state.write(array, var_rows, np.repeat(-ids[mask, None].astype(np.float32) - k, state.table.dim,
                                                           1))
                changes.set_changed(state.var, var_rows)
        files: dict = {}
        write = (lambda s: delta.write_tables(folder, [s], r, world, files)[s.key]) if kind == "delta" else (  # noqa: B023
            lambda s: writer._write_table(folder, s, rt, files))  # noqa: B023
        records.append({"rank": r, "files": files, "error": "",
                        "tables": {s.key: write(s) for s in table_states(model, wo, do)}})
        rank0 = rank0 or (model, wo, do)
    info = {s.key: {"cardinality": s.table.cardinality, "dim": s.table.dim, "dtype": "float32",
                    "plan": s.collection.placement(s.table.name).describe(),
                    **({"placement": delta.PLACEMENT} if kind == "delta" else {})} for s in table_states(*rank0)}
    meta = {"epoch": 0, "step_in_epoch": step, "global_step": step, "seed": 0, "config": {}, "backend": "sharded",
            "run": RUN, "commit": 1 if kind == "base" else 2, "tables": info}
    if kind == "delta":
        meta.update(kind="delta", base=delta.base_ref(tmp / "d" / "ckpt-5"), deltas=1)
    writer._commit(folder, folder.parent / f"ckpt-{step}", step, records, dense_state(*rank0), meta, world)


@pytest.mark.parametrize("world_in", [1, 2])
def test_every_placement_written_by_n_ranks_consolidates_exactly(tmp_path: Path, world_in: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-wise, table-wise and replicated tables written by N ranks: the consolidated folder's files are the
    full one's; restored under 1 and 3 ranks (each played in turn) every rank holds what the full one gives it.
    Blocks of 64 bytes: many blocks per file and delta rows falling into several."""
    monkeypatch.setattr(fmt, "BLOCK_BYTES", 64)
    for kind, step in (("base", 5), ("delta", 9), ("full", 9)):
        write_sim(tmp_path, world_in, step, kind)
    got = cons.consolidate(tmp_path / "d" / "ckpt-9")
    assert got == tmp_path / "d" / f"ckpt-9-{RUN}"
    assert_same_checkpoint(got, tmp_path / "f" / "ckpt-9", tmp_path / "d" / "ckpt-9")
    for world_out in (1, 3):
        for r in range(world_out):
            a, b = build(r, world_out, seed=3), build(r, world_out, seed=4)
            read_rank(got, *a[:3])
            read_rank(tmp_path / "f" / "ckpt-9", *b[:3])
            assert_same_state(rank_state(*a[:3]), rank_state(*b[:3]))


def test_delta_of_another_rank_count_keeps_the_base_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Base by 2 ranks (row-wise, table-wise, replicated: strided shards), delta by 1 (after a resume under 1
    rank): the result keeps the base's shards and restores, under 1 and 3 ranks, what the full one written by
    1 rank at that step restores."""
    monkeypatch.setattr(fmt, "BLOCK_BYTES", 64)
    write_sim(tmp_path, 2, 5, "base")
    write_sim(tmp_path, 1, 9, "delta")
    write_sim(tmp_path, 1, 9, "full")
    got = cons.consolidate(tmp_path / "d" / "ckpt-9")
    assert manifest(got)["tables"] == manifest(tmp_path / "d" / "ckpt-5")["tables"]
    assert manifest(got)["world_size"] == 2 and manifest(got)["step"] == 9
    for world_out in (1, 3):
        for r in range(world_out):
            a, b = build(r, world_out, seed=3), build(r, world_out, seed=4)
            read_rank(got, *a[:3])
            read_rank(tmp_path / "f" / "ckpt-9", *b[:3])
            assert_same_state(rank_state(*a[:3]), rank_state(*b[:3]))


def test_dynamic_tables_with_evictions_consolidate_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LRU / LFU tables with keys evicted and re-admitted between the base (4) and the delta (10): the
    consolidated files are the full checkpoint's (positions, keys, values, slots, counters, pending keys,
    clock); restored under 1 and 2 ranks it equals the full one's restore."""
    monkeypatch.setattr(fmt, "BLOCK_BYTES", 96)  # a few blocks per file
    rt = FakeRuntime()
    model = DynModel("sharded", rt, "evict")
    states = lambda m: table_states(m, m.wide_opt, m.deep_opt)  # noqa: E731
    dyn_train(model, 0, 4)
    meta = {"epoch": 0, "step_in_epoch": 0, "run": RUN}
    checkpoint.save(tmp_path / "d", 4, states(model), dyn_dense(model), meta, rt)
    for s in states(model):
        s.reset_changes()
    before = model.deep_embedding.counters()
    for s in range(4, 10):
        _step_dyn(model, s)
    assert model.deep_embedding.counters()["v"][2] > before["v"][2]  # evictions since the base
    checkpoint.save(tmp_path / "f", 10, states(model), dyn_dense(model), meta, rt)
    out = checkpoint.save(tmp_path / "d", 10, states(model), dyn_dense(model), meta, rt,
                          base=tmp_path / "d" / "ckpt-4")
    assert out["kind"] == "delta"
    got = cons.consolidate(tmp_path / "d" / "ckpt-10", tmp_path / "out" / "full-10")
    assert_same_checkpoint(got, tmp_path / "f" / "ckpt-10", tmp_path / "d" / "ckpt-10")
    for world in (1, 2):
        for r in range(world):
            a, b = (DynModel("sharded", FakeRuntime(r, world), "evict") for _ in range(2))
            reader.read_one(got, states(a), dyn_import(a))
            reader.read_one(tmp_path / "f" / "ckpt-10", states(b), dyn_import(b))
            assert_same_state(dyn_state(a), dyn_state(b))
            if world == 1:
                assert_same_state(dyn_state(a), dyn_state(model))


@pytest.fixture()
def pair(tmp_path: Path) -> Path:
    """Base ckpt-5 and delta ckpt-9 written by 2 ranks under tmp_path/d."""
    write_sim(tmp_path, 2, 5, "base")
    write_sim(tmp_path, 2, 9, "delta")
    return tmp_path / "d"


@pytest.mark.parametrize("damage", ["flip", "truncate", "base_file", "base_manifest", "full", "exists"])
def test_damage_is_refused_in_one_line_and_nothing_is_written(pair: Path, damage: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    target, path = pair / "ckpt-9", pair / "ckpt-9"
    if damage in ("flip", "base_file"):
        victim = (pair / ("ckpt-9" if damage == "flip" else "ckpt-5")) / fmt.shard_file("deep/b", "value", 1, 2)
        data = victim.read_bytes()
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "truncate":
        victim = target / fmt.shard_file("deep/a", "row", 0, 2)
        victim.write_bytes(victim.read_bytes()[:-8])
    elif damage == "base_manifest":  # another save of step 5 replaced the base
        m = manifest(pair / "ckpt-5")
        m["written_unix"] += 1
        (pair / "ckpt-5" / "manifest.json").write_text(json.dumps(m))
    elif damage == "full":
        path = pair / "ckpt-5"
    else:
        (pair / f"ckpt-9-{RUN}").mkdir()
    before = sorted(p.name for p in pair.iterdir())
    assert cons.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wd-sok: error: "), err
    expect = {"flip": r"ckpt-9: deep\.b\.value\.r00001-of-00002\.npy: .*(damaged)",
              "truncate": r"ckpt-9: deep\.a\.row\.r00000-of-00002\.npy: .*(truncated or damaged)",
              "base_file": r"ckpt-5: deep\.b\.value\.r00001-of-00002\.npy: checksum does not match",
              "base_manifest": "its base ckpt-5 is not the checkpoint it was written against",
              "full": "ckpt-5: a full checkpoint already", "exists": f"ckpt-9-{RUN} exists"}[damage]
    import re

    assert re.search(expect, err), err
    assert sorted(p.name for p in pair.iterdir()) == before  # no folder, no temporary left


def test_reads_are_bounded_by_a_block(pair: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 64-byte blocks, no read of table data (base or delta, streamed or by rows) exceeds a block, while
    the largest array file holds far more: no array larger than a block is materialised."""
    monkeypatch.setattr(fmt, "BLOCK_BYTES", 64)
    sizes: list[int] = []
    real_binary, real_ranges = merge.open_binary, merge.open_ranges

    class Counted:
        def __init__(self, f) -> None:  # noqa: ANN001
            self.f = f

        def read(self, n: int = -1) -> bytes:
            data = self.f.read(n)
            sizes.append(len(data))
            return data

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.f, name)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    def ranges(path, crc=0):  # noqa: ANN001, ANN202
        r = real_ranges(path, crc)
        inner = r.ranges
        r.ranges = lambda spans: (sizes.append(s[1]) or data for s, data in zip(spans, inner(spans), strict=True))
        return r

    monkeypatch.setattr(merge, "open_binary", lambda p: Counted(real_binary(p)))
    monkeypatch.setattr(merge, "open_ranges", ranges)
    monkeypatch.setattr(cons, "open_binary", lambda p: Counted(real_binary(p)))
    got = cons.consolidate(pair / "ckpt-9")
    files = manifest(got)["files"]
    largest = max(v["bytes"] for k, v in files.items() if k != "dense.npz")
    assert sizes and max(sizes) <= 64 < largest // 4, (max(sizes), largest)


def test_cli_routes_and_help_says_nothing_is_deleted(pair: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cons.main(["--help"])
    assert "nothing is deleted" in " ".join(capsys.readouterr().out.split())
    run = subprocess.run([sys.executable, "-m", "wd_sok.checkpoint", "consolidate", str(pair / "ckpt-9")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (pair / f"ckpt-9-{RUN}" / "manifest.json").is_file() and (pair / "ckpt-9" / "manifest.json").is_file()


def test_s3_model_dir(pair: Path, tmp_path: Path, s3_bucket: str) -> None:  # noqa: F811
    """The same pair uploaded to an S3 API server (moto): consolidated there (storage seam), its objects are the
    local consolidation's files, manifest aside (its written time)."""
    from wd_sok import storage

    store = storage.Store(f"{s3_bucket}/d")
    for p in sorted(q for q in pair.rglob("*") if q.is_file()):
        store.write_bytes(p.relative_to(pair).as_posix(), p.read_bytes())
    local = cons.consolidate(pair / "ckpt-9")
    url = cons.consolidate(f"{s3_bucket}/d/ckpt-9")
    assert str(url) == f"{s3_bucket}/d/ckpt-9-{RUN}"
    names = manifest(local)["files"]
    assert json.loads(store.read_bytes(f"ckpt-9-{RUN}/manifest.json"))["files"] == names
    for name in names:
        assert store.read_bytes(f"ckpt-9-{RUN}/{name}") == (local / name).read_bytes(), name
    with pytest.raises(checkpoint.CheckpointError, match="exists"):
        cons.consolidate(f"{s3_bucket}/d/ckpt-9")


def _npy(folder: Path, name: str, array: np.ndarray, files: dict) -> str:
    buf = io.BytesIO()
    np.save(buf, array)
    (folder / name).write_bytes(buf.getvalue())
    files[name] = {"bytes": len(buf.getvalue()), "crc32": zlib.crc32(buf.getvalue())}
    return name


def _synthetic(folder: Path, step: int, shard: dict, arrays: dict, base: Path | None) -> None:
    """A one-table checkpoint written with numpy and json only (deep/big, one shard)."""
    folder.mkdir(parents=True)
    files: dict = {}
    buf = io.BytesIO()
    np.savez(buf, **{"opt/wide_iterations": np.int64(step), "opt/deep_iterations": np.int64(step)})
    (folder / "dense.npz").write_bytes(buf.getvalue())
    files["dense.npz"] = {"bytes": len(buf.getvalue()), "crc32": zlib.crc32(buf.getvalue())}
    shard = {**shard, "files": {a: _npy(folder, fmt.shard_file("deep/big", a, 0, 1), v, files)
                                for a, v in arrays.items()}}
    m = {"format": fmt.FORMAT, "version": fmt.VERSION, "step": step, "world_size": 1, "epoch": 0,
         "step_in_epoch": step, "run": RUN, "commit": 1 + (base is not None), "files": files,
         "tables": {"deep/big": {"arrays": list(arrays), "shards": [shard], "cardinality": 100_000, "dim": 16,
                                 "dtype": "float32", "placement": delta.PLACEMENT if base else fmt.PLACEMENT}}}
    if base is not None:
        m.update(kind="delta", base=delta.base_ref(base))
    (folder / "manifest.json").write_text(json.dumps(m))


def test_peak_memory_is_blocks_not_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100,000 x 16 table (6.4 MB per array) with 64 KiB blocks: the consolidated arrays equal a numpy
    reference (the delta's rows; the others the base's, rms halved 4 times), and tracemalloc's peak while
    consolidating stays under a quarter of one array."""
    import tracemalloc

    monkeypatch.setattr(fmt, "BLOCK_BYTES", 64 << 10)
    rng = np.random.default_rng(0)
    value, rms = (rng.normal(size=(100_000, 16)).astype(np.float32) for _ in range(2))
    rms = np.abs(rms)
    rows = np.arange(3, 100_000, 7, dtype=np.int64)
    new_value, new_rms = (rng.normal(size=(rows.size, 16)).astype(np.float32) for _ in range(2))
    _synthetic(tmp_path / "ckpt-5", 5, {"rank": 0, "start": 0, "stride": 1, "count": 100_000},
               {"value": value, "rms": rms}, None)
    _synthetic(tmp_path / "ckpt-9", 9, {"rank": 0, "start": 0, "stride": 0, "count": rows.size},
               {"row": rows, "value": new_value, "rms": new_rms}, tmp_path / "ckpt-5")
    want_value, want_rms = value.copy(), rms * np.float32(0.5 ** 4)
    want_value[rows], want_rms[rows] = new_value, new_rms
    del value, rms
    tracemalloc.start()
    try:
        got = cons.consolidate(tmp_path / "ckpt-9")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(np.load(got / fmt.shard_file("deep/big", "value", 0, 1)), want_value)
    np.testing.assert_array_equal(np.load(got / fmt.shard_file("deep/big", "rms", 0, 1)), want_rms)
    print(f"peak {peak} of a {want_value.nbytes}-byte array")
    assert peak < want_value.nbytes // 4, (peak, want_value.nbytes)

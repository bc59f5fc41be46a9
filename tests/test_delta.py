"""Delta checkpoints (wd_sok/checkpoint/delta.py) in one process: full + delta restores bit for bit what a full
checkpoint at the delta's step holds (values and slots, the lazy RMSprop's bookkeeping included: training on
matches too), for fixed tables written by N ranks and read by M (each rank played in turn, as in
tests/test_checkpoint.py) and for dynamic tables with evictions and re-admissions; damage is detected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.dist.dynamic_ckpt import Model as DynModel
from tests.dist.dynamic_ckpt import batch as dyn_batch
from tests.dist.dynamic_ckpt import train as dyn_train
from tests.dist.state import gathered_state
from tests.test_checkpoint import FakeRuntime, assert_same_state, build, restore, train
from wd_sok import changes, checkpoint
from wd_sok.checkpoint import delta, writer
from wd_sok.checkpoint import format as fmt
from wd_sok.state import dense_state, import_dense, table_states


def reset(model, wo, do) -> None:  # noqa: ANN001
    for s in table_states(model, wo, do):
        s.reset_changes()


META = {"epoch": 1, "step_in_epoch": 2, "seed": 0, "config": {}, "backend": "test", "run": "0123456789abcdef"}


def save_delta(model_dir: Path, base: Path | None, model, wo, do, rt, step: int, keep: int = 2) -> dict:  # noqa: ANN001
    """A delta against ``base`` (a full checkpoint when None) at ``step``."""
    return checkpoint.save(model_dir, step, table_states(model, wo, do), dense_state(model, wo, do),
                           {**META, "global_step": step}, rt, keep=keep, base=base)


def read_pair(base: Path, folder: Path, model, wo, do) -> dict:  # noqa: ANN001
    return delta.read_pair(base, folder, table_states(model, wo, do),
                           lambda a, o: import_dense(model, wo, do, a, o))


def late_batches(model, wo, do, rt, first: int, steps: int) -> None:  # noqa: ANN001
    """Steps on batches over a few ids only, so that most rows are untouched since the base."""
    from tests.test_checkpoint import batch
    from wd_sok.steps import make_train_step

    step = make_train_step(model, wo, do, rt, 16)
    for i in range(first, first + steps):
        b = batch(16, seed=100 + i)
        b.categorical["b"] = b.categorical["b"] % 5
        step(b, tf.constant(i, tf.int64))


@pytest.mark.parametrize("backend", ["sharded", "replicated"])
def test_full_plus_delta_equals_full_and_trains_on_alike(tmp_path: Path, backend: str) -> None:
    model, wo, do, rt = build(backend=backend)
    train(model, wo, do, rt, steps=3)
    save_delta(tmp_path, None, model, wo, do, rt, step=3)
    reset(model, wo, do)
    late_batches(model, wo, do, rt, first=3, steps=4)
    want = gathered_state(model, wo, do, rt)
    out = save_delta(tmp_path, tmp_path / "ckpt-3", model, wo, do, rt, step=7)
    assert out["kind"] == "delta"
    rows_b = int(model.deep_embedding.table_variable("b").shape[0])
    full = json.loads((tmp_path / "ckpt-3" / "manifest.json").read_text())["files"]
    assert 0 < out["total_bytes"] < sum(f["bytes"] for f in full.values())
    manifest = json.loads((tmp_path / "ckpt-7" / "manifest.json").read_text())
    assert manifest["kind"] == "delta" and manifest["base"]["path"] == "ckpt-3" and manifest["base"]["step"] == 3
    assert manifest["tables"]["deep/b"]["shards"][0]["count"] == 5 < rows_b  # only ids 0..4 of b were touched
    fresh, wo2, do2, rt2 = build(seed=7)
    got = read_pair(tmp_path / "ckpt-3", tmp_path / "ckpt-7", fresh, wo2, do2)
    assert got["step"] == 7
    assert_same_state(gathered_state(fresh, wo2, do2, rt2), want)
    for s in table_states(fresh, wo2, do2):  # the restored masks: the delta's rows (a next delta stays complete)
        np.testing.assert_array_equal(s.changed_rows(), table_states(model, wo, do)[
            [t.key for t in table_states(model, wo, do)].index(s.key)].changed_rows(), err_msg=s.key)
    late_batches(model, wo, do, rt, first=7, steps=2)
    late_batches(fresh, wo2, do2, rt2, first=7, steps=2)
    train(model, wo, do, rt, steps=1)
    train(fresh, wo2, do2, rt2, steps=1)
    assert_same_state(gathered_state(fresh, wo2, do2, rt2), gathered_state(model, wo, do, rt))


def write_ranks(tmp: Path, world: int, fill) -> None:  # noqa: ANN001
    """A full (``fill`` is None) or delta checkpoint as ``world`` ranks write it, each rank played in turn;
    ``fill(rank, model, wo, do)`` sets and marks the rows of a delta."""
    folder = tmp / (".tmp-ckpt-9" if fill else ".tmp-ckpt-5")
    folder.mkdir(parents=True)
    records, rank0 = [], None
    for r in range(world):
        model, wo, do, rt = build(r, world)
        do.iterations.assign(5)
        wo.iterations.assign(5)
        for state in table_states(model, wo, do):  # every saved row and slot says its global id
            rows = state.rows
            g = rows.global_rows(0, rows.count).astype(np.float32)[:, None]
            var_rows = np.arange(rows.vstart, rows.vstart + rows.count * rows.vstride, rows.vstride)
            for k, array in enumerate(state.arrays()):
                state.write(array, var_rows, np.repeat(g * 10 + k + 1, state.table.dim, 1))
        if fill:
            fill(r, model, wo, do)
        files: dict = {}
        write = (lambda s: delta.write_tables(folder, [s], r, world, files)[s.key]) if fill else (  # noqa: B023
            lambda s: writer._write_table(folder, s, rt, files))  # noqa: B023
        records.append({"rank": r, "files": files, "error": "",
                        "tables": {s.key: write(s) for s in table_states(model, wo, do)}})
        rank0 = rank0 or (model, wo, do)
    info = {s.key: {"cardinality": s.table.cardinality, "dim": s.table.dim, "dtype": "float32"}
            for s in table_states(*rank0)}
    meta = {"epoch": 0, "step_in_epoch": 5, "global_step": 5, "seed": 0, "config": {}, "backend": "sharded",
            "tables": info}
    if fill:
        meta.update(kind="delta", base=delta.base_ref(tmp / "ckpt-5"))
    step = 9 if fill else 5
    writer._commit(folder, tmp / f"ckpt-{step}", step, records, dense_state(*rank0), meta, world)


def changed_ids(key: str, cardinality: int) -> np.ndarray:
    return np.arange(cardinality)[(np.arange(cardinality) * 7 + len(key)) % 3 == 0]


def fill_delta(rank: int, model, wo, do) -> None:  # noqa: ANN001
    """Step 9: rows changed_ids(...) of every table get new values and slots (current as of step 9)."""
    do.iterations.assign(9)
    wo.iterations.assign(9)
    for state in table_states(model, wo, do):
        rows = changed_ids(state.key, state.table.cardinality)
        mask, var_rows = state.owned(rows)
        rows = rows[mask]
        for k, array in enumerate(state.arrays()):
            state.write(array, var_rows, np.repeat(-rows[:, None].astype(np.float32) - k, state.table.dim, 1))
        changes.set_changed(state.var, var_rows)


@pytest.mark.parametrize("world_in,world_out,piece", [(2, 1, 0), (2, 3, 0), (1, 2, 0), (2, 3, 40)])
def test_resharded_full_plus_delta_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world_in: int,
                                            world_out: int, piece: int) -> None:
    """Written by N ranks (base at step 5, delta at 9), read by each of M: rows the delta holds are its values;
    the others are the base's, their rms decayed by 0.5 ** (9 - 5) (what a full save at step 9 holds). With
    ``piece`` bytes per gathered piece (5 rows of table b), each rank's delta files of b are written in
    several pieces, each while the next is gathered."""
    if piece:
        monkeypatch.setattr(delta, "PIECE_BYTES", piece)
    write_ranks(tmp_path, world_in, None)
    write_ranks(tmp_path, world_in, fill_delta)
    if piece:
        shards = json.loads((tmp_path / "ckpt-9" / "manifest.json").read_text())["tables"]["deep/b"]["shards"]
        assert min(int(sh["count"]) for sh in shards) > delta.piece_rows(2) == 5
    for r in range(world_out):
        model, wo, do, rt = build(r, world_out, seed=3)
        manifest = read_pair(tmp_path / "ckpt-5", tmp_path / "ckpt-9", model, wo, do)
        assert manifest["step"] == 9 and int(do.iterations.numpy()) == 9
        for state in table_states(model, wo, do):
            rows = state.rows
            g = rows.global_rows(0, rows.count)
            hit = np.isin(g, changed_ids(state.key, state.table.cardinality))
            for k, array in enumerate(state.arrays()):
                want = (g * 10 + k + 1).astype(np.float32)
                if array == "rms":
                    want = want * np.float32(0.5 ** 4)
                want[hit] = -g[hit] - k
                got = state.read(array, 0, rows.count)
                np.testing.assert_array_equal(got, np.repeat(want[:, None], state.table.dim, 1),
                                              err_msg=f"{state.key}:{array} rank {r} of {world_out}")


@pytest.mark.parametrize("damage", ["flip", "truncate", "base"])
def test_damaged_delta_or_replaced_base_is_refused(tmp_path: Path, damage: str) -> None:
    write_ranks(tmp_path, 2, None)
    write_ranks(tmp_path, 2, fill_delta)
    folder = tmp_path / "ckpt-9"
    if damage == "base":  # another save of step 5 replaced the base: its manifest differs
        m = json.loads((tmp_path / "ckpt-5" / "manifest.json").read_text())
        m["written_unix"] += 1
        (tmp_path / "ckpt-5" / "manifest.json").write_text(json.dumps(m))
        match = "not the checkpoint it was written against"
    else:
        victim = folder / fmt.shard_file("deep/b", "row" if damage == "truncate" else "value", 1, 2)
        data = victim.read_bytes()
        victim.write_bytes(data[:-8] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
        match = r"table 'deep/b'"
    with pytest.raises(checkpoint.CorruptCheckpoint, match=match):
        read_pair(tmp_path / "ckpt-5", folder, *build(0, 1)[:3])


def dyn_state(model: DynModel) -> dict[str, np.ndarray]:
    """Every keyed array of every table in saved-row order (the layout), pending keys and the clocks."""
    out = {}
    for s in table_states(model, model.wide_opt, model.deep_opt):
        for a in s.arrays():
            out[f"{s.key}:{a}"] = s.read(a, 0, s.count())
        pk, pc = s.pending()
        order = np.argsort(pk)
        out[f"{s.key}:pending"] = np.stack([pk[order], pc[order]])
        out[f"{s.key}:clock"] = np.int64(s.collection.clock_value())
    return out


def dyn_dense(model: DynModel) -> dict[str, np.ndarray]:
    return {"opt/wide_iterations": np.int64(model.wide_opt.iterations.numpy()),
            "opt/deep_iterations": np.int64(model.deep_opt.iterations.numpy())}


def dyn_import(model: DynModel):  # noqa: ANN201
    def apply(arrays: dict, _origin: str) -> None:
        model.wide_opt.iterations.assign(int(arrays["opt/wide_iterations"]))
        model.deep_opt.iterations.assign(int(arrays["opt/deep_iterations"]))
    return apply


def test_dynamic_tables_full_plus_delta_equals_full_with_evictions(tmp_path: Path) -> None:
    """LRU / LFU tables of capacity 60 under a Zipf key stream: keys are evicted and re-admitted between the base
    (step 4) and the delta (step 10); full + delta restores the full checkpoint's rows position by position
    (same layout, pending keys, clock), and training on from both gives the same tables."""
    rt = FakeRuntime()
    model = DynModel("sharded", rt, "evict")
    states = lambda m: table_states(m, m.wide_opt, m.deep_opt)  # noqa: E731
    dyn_train(model, 0, 4)
    meta = {"epoch": 0, "step_in_epoch": 0}
    checkpoint.save(tmp_path / "d", 4, states(model), dyn_dense(model), meta, rt)
    for s in states(model):
        s.reset_changes()
    before = model.deep_embedding.counters()
    for s in range(4, 10):  # dyn_train restarts at batch 0: draw later batches by hand
        _step_dyn(model, s)
    evicted = {k: v[2] - before[k][2] for k, v in model.deep_embedding.counters().items()}
    assert evicted["v"] > 0, evicted  # v: LFU, 120 keys over 60 rows: evicted, re-admitted
    checkpoint.save(tmp_path / "f", 10, states(model), dyn_dense(model), meta, rt)
    out = checkpoint.save(tmp_path / "d", 10, states(model), dyn_dense(model), meta, rt, base=tmp_path / "d/ckpt-4")
    assert 0 < out["total_bytes"] < sum(f["bytes"] for f in json.loads(
        (tmp_path / "f/ckpt-10/manifest.json").read_text())["files"].values())
    a, b = DynModel("sharded", rt, "evict"), DynModel("sharded", rt, "evict")
    checkpoint.restore_latest(tmp_path / "f", states(a), dyn_import(a), rt)
    delta.read_pair(tmp_path / "d" / "ckpt-4", tmp_path / "d" / "ckpt-10", states(b), dyn_import(b))
    assert_same_state(dyn_state(b), dyn_state(a))
    assert_same_state(dyn_state(b), dyn_state(model))
    for m in (a, b, model):
        for s in range(10, 13):
            _step_dyn(m, s)
    assert_same_state(dyn_state(b), dyn_state(a))
    assert_same_state(dyn_state(b), dyn_state(model))


def _step_dyn(model: DynModel, s: int) -> None:
    pairs = ((model.wide_embedding, model.wide_opt), (model.deep_embedding, model.deep_opt))
    ids = dyn_batch(0, s)
    for emb, opt in pairs:
        with tf.GradientTape() as tape:
            out = emb(ids, training=True)
            loss = tf.add_n([tf.reduce_sum(tf.square(out[n] - 0.3)) for n in out])
        grads = tape.gradient(loss, emb.sparse_variables)
        opt.apply_gradients(zip(grads, emb.sparse_variables, strict=True))


def test_restore_latest_takes_the_delta_falls_back_and_retention_keeps_its_base(tmp_path: Path) -> None:
    """Full at 3, deltas at 5 and 7 (keep 2): the base survives retention; restore_latest reads full + the
    latest delta; a damaged latest delta falls back to the previous delta, then to the full one."""
    model, wo, do, rt = build()
    train(model, wo, do, rt, steps=3)
    save_delta(tmp_path, None, model, wo, do, rt, step=3)
    reset(model, wo, do)
    wants = {}
    for first in (3, 5):
        late_batches(model, wo, do, rt, first=first, steps=2)
        wants[first + 2] = gathered_state(model, wo, do, rt)
        save_delta(tmp_path, tmp_path / "ckpt-3", model, wo, do, rt, step=first + 2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-3", "ckpt-5", "ckpt-7"]
    fresh = build(seed=4)
    manifest, path = restore(tmp_path, *fresh)
    assert path.name == "ckpt-7" and manifest["kind"] == "delta"
    assert_same_state(gathered_state(*fresh), wants[7])
    victim = tmp_path / "ckpt-7" / fmt.shard_file("deep/b", "rms", 0, 1)
    victim.write_bytes(victim.read_bytes()[:-4])
    fresh = build(seed=5)
    with pytest.warns(UserWarning, match=r"ckpt-7: table 'deep/b'.*falling back"):
        _, path = restore(tmp_path, *fresh)
    assert path.name == "ckpt-5"
    assert_same_state(gathered_state(*fresh), wants[5])
    (tmp_path / "ckpt-5" / "dense.npz").unlink()
    with pytest.warns(UserWarning, match="falling back"):
        _, path = restore(tmp_path, *build(seed=6))
    assert path.name == "ckpt-3"
    # a new full one: ckpt-5 goes, ckpt-3 stays while ckpt-7 (kept) needs it; after the next, both go
    late_batches(model, wo, do, rt, first=7, steps=1)
    save_delta(tmp_path, None, model, wo, do, rt, step=8)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-3", "ckpt-7", "ckpt-8"]
    save_delta(tmp_path, None, model, wo, do, rt, step=9)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-8", "ckpt-9"]


def test_inspect_says_full_or_delta_base_rows_and_bytes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from wd_sok.checkpoint import inspect

    model, wo, do, rt = build()
    train(model, wo, do, rt, steps=2)
    save_delta(tmp_path, None, model, wo, do, rt, step=2)
    reset(model, wo, do)
    late_batches(model, wo, do, rt, first=2, steps=1)
    save_delta(tmp_path, tmp_path / "ckpt-2", model, wo, do, rt, step=3)
    assert inspect.main([str(tmp_path / "ckpt-3")]) == 0
    out = capsys.readouterr().out
    rows = len(np.unique(np.asarray(table_states(model, wo, do)[4].changed_rows())))  # deep/b
    assert "ckpt-3: delta against ckpt-2 (step 2), step 3, epoch 1 step 2, written by 1 rank(s)" in out
    assert f"  deep/b: {rows:,} changed rows of 50 ({100 * rows / 50:.1f}%), " in out
    assert inspect.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["ckpt-2", "ckpt-3"] and ": full, step 2" in lines[0]
    assert inspect.main([str(tmp_path / "nothing")]) == 2


def test_policy_full_first_then_deltas_by_size_count_and_preemption(tmp_path: Path) -> None:
    from wd_sok.checkpoint.policy import DeltaPolicy

    class Rt(FakeRuntime):
        def sum_host(self, values: np.ndarray, name: str) -> np.ndarray:
            return values

    model, wo, do, _ = build()
    rt, states = Rt(), table_states(model, wo, do)
    policy = DeltaPolicy(ratio=0.3, every=2)
    assert policy.choose(states, rt) is None and policy.choose(states, rt, preempted=True) is None
    changes.set_changed(states[4].var, np.arange(50))  # deep/b: every row
    policy.saved(tmp_path / "ckpt-1", None, states)   # a full one: the base; masks cleared
    assert policy.base == tmp_path / "ckpt-1" and states[4].changed_rows().size == 0
    changes.set_changed(states[4].var, np.array([3]))  # one row of 50 of one table
    assert policy.choose(states, rt) == tmp_path / "ckpt-1"
    assert policy.meta(policy.base) == {"deltas": 1}
    for s in states:  # every row of every table: more than 0.3 of a full one, and more than a full one
        changes.set_changed(s.var, np.arange(s.var.shape[0]))
    assert policy.choose(states, rt) is None and policy.choose(states, rt, preempted=True) is None
    for s in states:
        s.reset_changes()
    policy.saved(tmp_path / "ckpt-2", tmp_path / "ckpt-1", states)
    policy.saved(tmp_path / "ckpt-3", tmp_path / "ckpt-1", states)
    assert policy.deltas == 2 and policy.choose(states, rt) is None  # every=2 deltas written
    assert policy.choose(states, rt, preempted=True) == tmp_path / "ckpt-1"  # a preemption save still is one
    policy.restored({"kind": "delta", "base": {"path": "ckpt-1"}, "deltas": 1, "world_size": 3},
                    tmp_path / "ckpt-2", states, world=1)
    assert (policy.base, policy.deltas) == (tmp_path / "ckpt-1", 1)  # fixed tables: any rank count
    changes.set_changed(states[0].var, np.array([1]))
    policy.restored({"world_size": 2}, tmp_path / "ckpt-1", states, world=1)
    assert policy.base == tmp_path / "ckpt-1" and states[0].changed_rows().size == 0
    off = DeltaPolicy(0.0, 5)  # ratio 0: full checkpoints only
    off.base = tmp_path / "ckpt-1"
    assert off.choose(states, rt) is None and off.choose(states, rt, preempted=True) is None

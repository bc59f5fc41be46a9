"""Change tracking for delta checkpoints (wd_sok/changes.py): after k train steps each table's mask holds
exactly the rows whose gradient was non-zero (numpy reference: the ids the batches looked up; checked
against the rows whose value or slots actually moved), a reset forgets them, dense updates and optimizers
that decay every row mark every row, and dynamic tables mark the rows they counted or handed over."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tests.test_checkpoint import WIDE, batch, build
from tests.test_dynamic import dyn_table
from wd_sok import changes
from wd_sok.embedding.dynamic import DynamicEmbedding
from wd_sok.embedding.replicated import ReplicatedEmbedding
from wd_sok.optim import LazyRMSprop
from wd_sok.state import KeyedTableState, TableState, table_states
from wd_sok.steps import make_train_step


def ids_seen(seeds: list[int]) -> dict[str, np.ndarray]:
    """Per feature, the distinct ids the batches of ``seeds`` look up (numpy reference)."""
    out: dict[str, set] = {"a": set(), "b": set(), "m": set()}
    for s in seeds:
        b = batch(16, seed=s)
        for name, x in b.categorical.items():
            flat = x.flat_values if isinstance(x, tf.RaggedTensor) else x
            out[name] |= set(np.asarray(flat).tolist())
    return {k: np.array(sorted(v), np.int64) for k, v in out.items()}


def snapshot(states: list[TableState]) -> dict[str, np.ndarray]:
    return {f"{s.key}:{a}": s.read(a, 0, s.rows.count) for s in states for a in s.arrays()}


def moved_rows(before: dict, after: dict, state: TableState) -> np.ndarray:
    """Rows whose value or any slot differs between two snapshots (what really changed)."""
    diff = np.zeros(state.rows.count, bool)
    for a in state.arrays():
        diff |= (before[f"{state.key}:{a}"] != after[f"{state.key}:{a}"]).any(1)
    return np.flatnonzero(diff)


@pytest.mark.parametrize("backend", ["sharded", "replicated"])
def test_mask_equals_rows_with_gradient_after_k_steps_and_reset(backend: str) -> None:
    model, wo, do, rt = build(backend=backend)
    states = table_states(model, wo, do)
    step = make_train_step(model, wo, do, rt, 16)
    before = snapshot(states)
    for s in range(4):
        step(batch(16, seed=s), tf.constant(s, tf.int64))
    want = ids_seen([0, 1, 2, 3])
    after = snapshot(states)
    for state in states:
        got = state.changed_rows()
        np.testing.assert_array_equal(got, want[state.table.name], err_msg=state.key)
        np.testing.assert_array_equal(moved_rows(before, after, state), got, err_msg=state.key)
        np.testing.assert_array_equal(state.changed_saved(), got)  # one rank saves every row
    for state in states:
        state.reset_changes()
        assert state.changed_rows().size == 0
    step(batch(16, seed=9), tf.constant(4, tf.int64))
    want = ids_seen([9])
    for state in states:
        np.testing.assert_array_equal(state.changed_rows(), want[state.table.name], err_msg=state.key)


def test_every_row_when_the_optimizer_decays_every_row() -> None:
    """Keras' legacy RMSprop (not lazy) decays every row's rms each step: a delta must hold them all."""
    model, wo, _, rt = build()
    do = tf.keras.optimizers.legacy.RMSprop(0.01, rho=0.5)
    step = make_train_step(model, wo, do, rt, 16)
    step(batch(16, seed=0), tf.constant(0, tf.int64))
    for state in table_states(model, wo, do):
        n = state.table.cardinality
        want = np.arange(n) if state.key.startswith("deep/") else ids_seen([0])[state.table.name]
        np.testing.assert_array_equal(state.changed_rows(), want, err_msg=state.key)


def test_marking_rules() -> None:
    var = tf.Variable(tf.zeros([6, 2]))
    grads = [(tf.IndexedSlices(tf.ones([3, 2]), tf.constant([4, 1, 4])), var)]
    changes.mark_applied(LazyRMSprop(0.1, tables=[var]), grads, [var])  # no 'last' slot yet: every row
    np.testing.assert_array_equal(changes.changed(var), np.arange(6))
    changes.reset([var])
    opt = LazyRMSprop(0.1, tables=[var])
    opt._create_all_weights([var])  # noqa: SLF001 - slots as the train step creates them
    changes.mark_applied(opt, grads, [var])
    np.testing.assert_array_equal(changes.changed(var), [1, 4])
    changes.mark_applied(tf.keras.optimizers.legacy.Ftrl(0.1), [(tf.ones([6, 2]), var)], [var])  # dense grad
    np.testing.assert_array_equal(changes.changed(var), np.arange(6))
    other = tf.Variable(tf.zeros([3, 1]))
    changes.mark_applied(opt, [(tf.ones([3, 1]), other)], [var])  # not a table: no mask at all
    assert not changes.has_mask(other) and changes.changed(other).size == 0


def test_replicated_rank_saves_only_its_slice_of_the_changed_rows() -> None:
    emb = ReplicatedEmbedding(WIDE, "zeros", 0, "wide", rank=1, world=2)
    state = TableState("wide/b", emb.tables["b"], emb, None)
    changes.set_changed(state.var, np.array([0, 1, 2, 7, 49]))
    np.testing.assert_array_equal(state.changed_rows(), [0, 1, 2, 7, 49])
    np.testing.assert_array_equal(state.changed_saved(), [0, 3, 24])  # rows 1, 7, 49 = saved 0, 3, 24
    np.testing.assert_array_equal(state.rows.global_rows(0, state.rows.count)[state.changed_saved()], [1, 7, 49])


def test_dynamic_table_marks_counted_and_admitted_rows_with_evictions() -> None:
    """Capacity 4, LRU: the positions whose key, counters, value or slots changed since the reset are marked."""
    emb = DynamicEmbedding([dyn_table(cap=4, min_count=1, evict="lru")], "glorot_normal", 0, "deep", None)
    opt = LazyRMSprop(0.1, rho=0.5, tables=emb.trainable_variables)
    emb.attach_optimizer(opt)
    state = KeyedTableState("deep/u", emb.tables["u"], emb, opt)

    def step(keys: list[int]) -> None:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(emb({"u": tf.constant(keys, tf.int64)}, training=True)["u"] - 1))
        grads = tape.gradient(loss, emb.sparse_variables)
        opt.apply_gradients(zip(grads, emb.sparse_variables, strict=True))

    def snap() -> dict[str, np.ndarray]:
        return {a: state.read(a, 0, state.count()) for a in state.arrays()}

    step([10, 11, 12, 13])          # fills positions 0..3
    state.reset_changes()
    before = snap()
    step([11, 20])                   # 11 touched (position 1); 20 evicts LRU 10 (position 0)
    after = snap()
    assert sorted(after["key"].tolist()) == [11, 12, 13, 20]
    moved = np.zeros(4, bool)
    for a in state.arrays():  # rms as the legacy optimizer holds it: every row decays by rho each step
        moved |= (after[a] != (before[a] * 0.5 if a == "rms" else before[a])).reshape(4, -1).any(1)
    np.testing.assert_array_equal(state.changed_rows(), np.flatnonzero(moved))
    np.testing.assert_array_equal(state.changed_rows(), [0, 1])
    np.testing.assert_array_equal(state.read_at("key", state.changed_rows()), [20, 11])
    np.testing.assert_array_equal(state.read_at("rms", np.array([1, 3])), after["rms"][[1, 3]])

"""Sharded backend in one process: lookups equal the replicated oracle, placement, checkpoint layout, memory.

The exchange itself over real ranks is tested in test_distributed.py; here one process plays each rank of
N in turn where no collective is needed (construction, export ordering, import, memory share).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from wd_sok.embedding.replicated import ReplicatedEmbedding
from wd_sok.embedding.sharded import ShardedEmbedding, local_rows
from wd_sok.feature_spec import TableConfig

TABLES = [TableConfig("a", 7, 3), TableConfig("b", 5, 2), TableConfig("m", 11, 4, 3, True, "mean"),
          TableConfig("s", 13, 3, 2, True, "sum")]


def fake_runtime(rank: int = 0, size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(rank=rank, size=size, hvd=None, allgather=lambda t, name: t)


def batch(n: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths_m = rng.integers(0, 4, n)
    lengths_s = rng.integers(0, 3, n)
    return {
        "a": tf.constant(rng.integers(0, 7, n), tf.int32),
        "b": tf.constant(rng.integers(0, 5, n), tf.int64),
        "m": tf.RaggedTensor.from_row_lengths(rng.integers(0, 11, lengths_m.sum()).astype(np.int32), lengths_m),
        "s": tf.RaggedTensor.from_row_lengths(rng.integers(0, 13, lengths_s.sum()), lengths_s),
    }


def test_one_rank_equals_replicated_forward_and_gradient() -> None:
    sharded = ShardedEmbedding(TABLES, "glorot_normal", 5, "deep", fake_runtime())
    oracle = ReplicatedEmbedding(TABLES, "glorot_normal", 5, "deep")
    ids = batch()

    def run(layer: tf.keras.layers.Layer) -> tuple[dict, list]:
        with tf.GradientTape() as tape:
            out = layer(ids)
            loss = tf.add_n([tf.reduce_sum(v * v) for v in out.values()])
        return out, tape.gradient(loss, layer.trainable_variables)

    (out_s, grads_s), (out_o, grads_o) = run(sharded), run(oracle)
    for name in out_o:
        np.testing.assert_allclose(out_s[name].numpy(), out_o[name].numpy(), atol=1e-7)
    for gs, go in zip(grads_s, grads_o, strict=True):
        assert isinstance(gs, tf.IndexedSlices)  # local sparse gradients: never densified
        np.testing.assert_allclose(tf.convert_to_tensor(gs).numpy(), tf.convert_to_tensor(go).numpy(), atol=1e-6)


@pytest.mark.parametrize("traced", [False, True])
def test_duplicates_travel_once_and_their_gradients_are_summed(traced: bool) -> None:
    """Each distinct id of a table is looked up once: the hook's counts and the shard gradients' rows are the
    distinct ids (numpy ``np.unique``), and values and summed gradients still equal the replicated oracle's
    (traced too: the tf.function graph had its own shape-inference pitfall)."""
    sharded = ShardedEmbedding(TABLES, "glorot_normal", 5, "deep", fake_runtime())
    oracle = ReplicatedEmbedding(TABLES, "glorot_normal", 5, "deep")
    ids = batch(40, seed=3)
    seen: list[np.ndarray] = []
    sharded.exchange_hook = lambda sent, received: seen.append(sent.numpy())

    def run(layer: tf.keras.layers.Layer) -> tuple[dict, list]:
        with tf.GradientTape() as tape:
            out = layer(ids)
            loss = tf.add_n([tf.reduce_sum(v * v) for v in out.values()])
        return out, tape.gradient(loss, layer.trainable_variables)

    if traced:
        sharded.exchange_hook = None  # a trace-time hook would see symbolic tensors
        out_s, grads_s = tf.function(run)(sharded)
    else:
        out_s, grads_s = run(sharded)
        flat = {k: (v.flat_values if isinstance(v, tf.RaggedTensor) else v).numpy() for k, v in ids.items()}
        distinct = [np.unique(flat[t.name]).size for t in TABLES]
        assert [len(flat[t.name]) for t in TABLES] != distinct  # the batch does repeat ids
        np.testing.assert_array_equal(seen[-1], [distinct])  # [N = 1, T]
        for t, g in zip(TABLES, grads_s, strict=True):
            np.testing.assert_array_equal(np.sort(g.indices.numpy()), np.unique(flat[t.name]))
    out_o, grads_o = run(oracle)
    for name in out_o:
        np.testing.assert_allclose(out_s[name].numpy(), out_o[name].numpy(), atol=1e-7)
    for gs, go in zip(grads_s, grads_o, strict=True):
        np.testing.assert_allclose(tf.convert_to_tensor(gs).numpy(), tf.convert_to_tensor(go).numpy(), atol=1e-6)


def test_traced_lookup_and_empty_batch() -> None:
    layer = ShardedEmbedding(TABLES, "glorot_normal", 0, "deep", fake_runtime())
    fn = tf.function(layer.__call__)
    full = fn(batch())
    assert {k: tuple(v.shape) for k, v in full.items()} == {"a": (6, 3), "b": (6, 2), "m": (6, 4), "s": (6, 3)}
    empty = {k: v[:0] for k, v in batch().items()}
    out = fn(empty)
    assert all(v.shape[0] == 0 for v in out.values())
    # mean of an empty row is 0, like the replicated backend
    ids = batch()
    ids["m"] = tf.ragged.constant([[], [1, 2], [], [3], [], []], dtype=tf.int64)
    assert np.all(layer(ids)["m"].numpy()[[0, 2, 4, 5]] == 0.0)


@pytest.mark.parametrize("bad", [7, -1])
def test_out_of_range_ids_name_the_feature(bad: int) -> None:
    layer = ShardedEmbedding(TABLES, "zeros", 0, "wide", fake_runtime())
    ids = batch()
    ids["a"] = tf.constant([0, bad, 1, 2, 3, 4], tf.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature 'a': ids must lie in \[0, 7\)"):
        layer(ids)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_placement_rows_and_ownership(world: int) -> None:
    """Each rank's saved rows carry their global ids; put back by id, the shards are the N-independent
    whole table; ``owned`` picks exactly rows g % N == rank at local row g // N."""
    oracle = ReplicatedEmbedding(TABLES, "glorot_normal", 9, "deep")
    ranks = [ShardedEmbedding(TABLES, "glorot_normal", 9, "deep", fake_runtime(r, world)) for r in range(world)]
    for t in TABLES:
        counts = [layer.shards[t.name].shape[0] for layer in ranks]
        assert counts == [-(-(t.cardinality - r) // world) for r in range(world)] == [
            local_rows(t.cardinality, r, world).size for r in range(world)]
        whole = np.full((t.cardinality, t.dim), np.nan, np.float32)
        for layer in ranks:
            rows = layer.saved_rows(t.name)
            ids = rows.global_rows(0, rows.count)
            np.testing.assert_array_equal(ids, local_rows(t.cardinality, layer.rank, world))
            assert np.all(np.isnan(whole[ids])), "a row saved by two ranks"
            whole[ids] = layer.shards[t.name][rows.var_slice(0, rows.count)].numpy()
        np.testing.assert_array_equal(whole, oracle.weights_by_name[t.name].numpy())
        g = np.arange(t.cardinality, dtype=np.int64)
        for layer in ranks:
            mask, local = layer.owned(t.name, g)
            np.testing.assert_array_equal(g[mask], local_rows(t.cardinality, layer.rank, world))
            np.testing.assert_array_equal(local, np.arange(mask.sum()))


def test_replicated_ranks_save_disjoint_slices() -> None:
    """Replicated under 3 ranks: each saves rows rank::3 of its whole table (at those variable rows)."""
    for r in range(3):
        layer = ReplicatedEmbedding(TABLES, "glorot_normal", 1, "deep", rank=r, world=3)
        for t in TABLES:
            rows = layer.saved_rows(t.name)
            np.testing.assert_array_equal(rows.global_rows(0, rows.count), np.arange(r, t.cardinality, 3))
            np.testing.assert_array_equal(layer.weights_by_name[t.name][rows.var_slice(0, rows.count)].numpy(),
                                          layer.weights_by_name[t.name].numpy()[r::3])
            mask, var_rows = layer.owned(t.name, np.arange(t.cardinality))
            assert mask.all() and np.array_equal(var_rows, np.arange(t.cardinality))


def test_initial_rows_stream_in_blocks_like_one_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Filling a shard block by block gives the same values as drawing its rows at once."""
    from wd_sok.embedding import base

    monkeypatch.setattr(base, "ROW_BLOCK", 4)  # several blocks even for these small tables
    for r in range(2):
        layer = ShardedEmbedding(TABLES, "glorot_normal", 5, "deep", fake_runtime(r, 2))
        for t in TABLES:
            want = base.initial_rows(t, local_rows(t.cardinality, r, 2), 5, "glorot_normal")
            np.testing.assert_array_equal(layer.shards[t.name].numpy(), want)


@pytest.mark.parametrize("world", [2, 3, 8])
def test_memory_per_rank_within_5_percent_of_total_over_n(world: int) -> None:
    """Realistic cardinalities (Outbrain-like: ~1e5 rows, plus tiny tables that cannot split evenly)."""
    tables = [TableConfig("ad", 100_000, 16), TableConfig("doc", 30_011, 16), TableConfig("platform", 4, 16),
              TableConfig("country", 301, 16), TableConfig("topics", 350, 16, 3, True)]
    total = sum(t.cardinality * t.dim * 4 for t in tables)
    for r in range(world):
        layer = ShardedEmbedding(tables, "zeros", 0, "deep", fake_runtime(r, world))
        assert abs(layer.local_bytes() / (total / world) - 1.0) <= 0.05, (r, layer.local_bytes(), total / world)
        assert layer.sparse_variables == list(layer.shards.values())


def test_sok_module_imports_without_sok() -> None:
    """wd_sok.embedding.sok must import anywhere; building it without SOK is a clear configuration error."""
    import importlib.util

    from wd_sok.embedding import sok as sok_backend

    if importlib.util.find_spec("sparse_operation_kit") is not None:
        pytest.skip("SOK is installed here: the missing-SOK error path cannot be exercised")
    assert "sparse_operation_kit" not in sys.modules
    with pytest.raises(ValueError, match="needs Merlin SOK"):
        sok_backend.SokEmbedding(TABLES, "zeros", 0, "wide", fake_runtime())

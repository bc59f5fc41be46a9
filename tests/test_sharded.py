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
from wd_sok.embedding.sharded import ShardedEmbedding, local_rows, to_global_order
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
def test_placement_export_order_and_import(world: int) -> None:
    """Shards of all ranks, concatenated as allgather would, reorder into the N-independent whole table."""
    oracle = ReplicatedEmbedding(TABLES, "glorot_normal", 9, "deep")
    ranks = [ShardedEmbedding(TABLES, "glorot_normal", 9, "deep", fake_runtime(r, world)) for r in range(world)]
    for t in TABLES:
        rows = [layer.shards[t.name].shape[0] for layer in ranks]
        assert rows == [-(-(t.cardinality - r) // world) for r in range(world)] == [
            local_rows(t.cardinality, r, world).size for r in range(world)]
        gathered = np.concatenate([layer.shards[t.name].numpy() for layer in ranks])
        np.testing.assert_array_equal(to_global_order(gathered, t.cardinality, world),
                                      oracle.weights_by_name[t.name].numpy())
    # import: each rank keeps rows g % N == rank, and slots too
    opt = tf.keras.optimizers.legacy.RMSprop(0.1)
    whole = {f"deep/{t.name}": {"value": np.arange(t.cardinality * t.dim, dtype=np.float32).reshape(-1, t.dim),
                                "rms": np.full((t.cardinality, t.dim), 0.5, np.float32)} for t in TABLES}
    for r, layer in enumerate(ranks):
        layer.import_tables(whole, opt)
        for t in TABLES:
            np.testing.assert_array_equal(layer.shards[t.name].numpy(), whole[f"deep/{t.name}"]["value"][r::world])
            assert np.all(opt.get_slot(layer.shards[t.name], "rms").numpy() == 0.5)
    with pytest.raises(ValueError, match="checkpoint table 'deep/a'"):
        ranks[0].import_tables({**whole, "deep/a": {"value": np.zeros((8, 3), np.float32)}}, None)


def test_single_rank_export_is_the_whole_table() -> None:
    layer = ShardedEmbedding(TABLES, "glorot_normal", 1, "deep", fake_runtime())
    opt = tf.keras.optimizers.legacy.Ftrl(0.1)
    tables = layer.export_tables(opt)
    oracle = ReplicatedEmbedding(TABLES, "glorot_normal", 1, "deep")
    for t in TABLES:
        np.testing.assert_array_equal(tables[f"deep/{t.name}"]["value"], oracle.weights_by_name[t.name].numpy())
        assert set(tables[f"deep/{t.name}"]) == {"value", *opt.get_slot_names()}


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

"""Dynamic (hash-table) embeddings on one process: key placement, initial rows, admission / eviction against
an independent pure-Python model of the rules, slot resets, the zero row, and the spec-to-collection path."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from wd_sok.embedding import make_embedding
from wd_sok.embedding.composite import CompositeEmbedding
from wd_sok.embedding.dynamic import DynamicEmbedding
from wd_sok.embedding.keys import initial_key_rows, initial_key_rows_np, mix64, mix64_np, owner_np
from wd_sok.feature_spec import DynamicConfig, TableConfig


def dyn_table(name: str = "u", cap: int = 4, min_count: int = 1, evict: str = "lru", dim: int = 3,
              multihot: bool = False) -> TableConfig:
    return TableConfig(name, cap, dim, 3 if multihot else 1, multihot, "sum", DynamicConfig(cap, min_count, evict))


def test_mix64_known_values_and_tf_equals_numpy() -> None:
    # SplitMix64's finaliser of 0 is 0; of 1 it is 0x5692161d100b05e5 (by hand from the three steps)
    z = np.uint64(1)
    z ^= z >> np.uint64(30)
    with np.errstate(over="ignore"):
        z = np.uint64(int(z) * 0xBF58476D1CE4E5B9 % 2**64)
        z ^= z >> np.uint64(27)
        z = np.uint64(int(z) * 0x94D049BB133111EB % 2**64)
    z ^= z >> np.uint64(31)
    assert mix64_np(np.array([0, 1]))[1] == z and mix64_np(np.array([0]))[0] == 0
    keys = np.array([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345], np.int64)
    np.testing.assert_array_equal(mix64(tf.constant(keys)).numpy(), mix64_np(keys))


@pytest.mark.parametrize("world", [2, 3])
def test_sequential_ids_spread_evenly(world: int) -> None:
    counts = np.bincount(owner_np(np.arange(30000), world), minlength=world)
    assert np.all(np.abs(counts - 30000 / world) < 0.03 * 30000 / world)


def test_initial_rows_tf_equals_numpy_and_have_glorot_std() -> None:
    t = dyn_table(cap=1000, dim=8)
    keys = np.arange(-500, 1500, dtype=np.int64) * 7919
    ref = initial_key_rows_np(t, keys, 5, "glorot_normal")
    np.testing.assert_array_equal(initial_key_rows(t, tf.constant(keys), 5, "glorot_normal").numpy(), ref)
    assert abs(ref.std() / np.sqrt(2 / 1008) - 1) < 0.03 and abs(ref.mean()) < 3e-3
    assert not np.array_equal(ref, initial_key_rows_np(t, keys, 6, "glorot_normal"))
    assert not initial_key_rows_np(t, keys, 5, "zeros").any()


class Reference:
    """The admission / eviction rules of wd_sok/embedding/dynamic.py's docstring, one rank, in plain Python."""

    def __init__(self, cap: int, min_count: int, evict: str) -> None:
        self.cap, self.min_count, self.evict = cap, min_count, evict
        self.rows: dict[int, int] = {}
        self.key, self.count, self.last = {}, {}, {}
        self.pending: dict[int, int] = {}
        self.clock, self.stats = 0, [0, 0, 0]

    def step(self, ids: list[int]) -> None:
        self.clock += 1
        occ = Counter(ids)
        for k, n in occ.items():
            if k in self.rows:
                r = self.rows[k]
                self.count[r] += n
                self.last[r] = self.clock
        cands = []
        for k, n in occ.items():
            if k in self.rows:
                continue
            prev = self.pending.get(k, 0)
            self.stats[0] += prev == 0
            total = prev + n
            if self.min_count > 1:
                self.pending[k] = total
            if total >= self.min_count:
                cands.append((k, total))
        for k, total in sorted(cands):
            if len(self.key) < self.cap:
                r = len(self.key) + 1
            elif self.evict != "none":
                free = [r for r in self.key if self.last[r] != self.clock]
                if not free:
                    continue
                score = self.last if self.evict == "lru" else self.count
                r = min(free, key=lambda r: (score[r], r))
                del self.rows[self.key[r]]
                self.stats[2] += 1
            else:
                continue
            self.rows[k], self.key[r], self.count[r], self.last[r] = r, k, total, self.clock
            self.pending.pop(k, None)
            self.stats[1] += 1


@pytest.mark.parametrize("min_count,evict", [(1, "lru"), (2, "lru"), (1, "lfu"), (2, "none"), (3, "lfu")])
def test_admission_and_eviction_follow_the_rules(min_count: int, evict: str) -> None:
    t = dyn_table(cap=5, min_count=min_count, evict=evict)
    emb = DynamicEmbedding([t], "glorot_normal", 3, "deep", None)
    ref = Reference(5, min_count, evict)
    rng = np.random.default_rng(min_count)
    for step in range(25):
        ids = (rng.zipf(1.5, 12) * 1_000_003 - 7 * step).astype(np.int64)  # big, negative and repeated ids
        out = emb({"u": tf.constant(ids)}, training=True)["u"].numpy()
        ref.step(ids.tolist())
        want = np.stack([initial_key_rows_np(t, np.array([k]), 3, "glorot_normal")[0] if k in ref.rows
                         else np.zeros(3, np.float32) for k in ids])
        np.testing.assert_array_equal(out, want, err_msg=f"step {step}")
        keys, rows = (x.numpy() for x in emb.index["u"].export())
        assert dict(zip(keys.tolist(), rows.tolist(), strict=True)) == ref.rows, f"step {step}"
        assert emb.stats["u"].numpy().tolist() == ref.stats
        used = emb.keyed_count("u")
        assert used == len(ref.key)
        for r in range(1, used + 1):
            assert (emb.row_key["u"][r].numpy(), emb.row_count["u"][r].numpy(), emb.row_last["u"][r].numpy()) == (
                ref.key[r], ref.count[r], ref.last[r])
        pk, pc = emb.pending_items("u")
        assert dict(zip(pk.tolist(), pc.tolist(), strict=True)) == ({} if min_count == 1 else ref.pending)
    # the test reached capacity: rows were evicted, or (evict: none) admissions stopped at the capacity
    assert ref.stats[2] > 0 if evict != "none" else ref.stats[1] == 5 and ref.stats[0] > 5


def test_evaluation_lookups_change_nothing() -> None:
    emb = DynamicEmbedding([dyn_table(cap=3)], "glorot_normal", 0, "deep", None)
    emb({"u": tf.constant([5, 6], tf.int64)}, training=True)
    before = emb.stats["u"].numpy().copy()
    out = emb({"u": tf.constant([5, 99], tf.int64)}, training=False)["u"].numpy()
    assert not out[1].any() and out[0].any() and emb.keyed_count("u") == 2
    np.testing.assert_array_equal(emb.stats["u"].numpy(), before)


def test_evicted_row_gets_new_value_and_fresh_ftrl_slots_and_zero_row_stays_zero() -> None:
    t = dyn_table(cap=2, min_count=1, evict="lru", dim=2)
    emb = DynamicEmbedding([t], "glorot_normal", 1, "deep", None)
    opt = tf.keras.optimizers.legacy.Ftrl(0.5, initial_accumulator_value=0.25)
    emb.attach_optimizer(opt)
    var = emb.shards["u"]

    @tf.function
    def step(ids: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(emb({"u": ids}, training=True)["u"])
        opt.apply_gradients([(tape.gradient(loss, var), var)])

    step(tf.constant([10, 11], tf.int64))       # rows 1, 2
    step(tf.constant([11], tf.int64))           # 10 is now the least recently used
    acc = opt.get_slot(var, "accumulator")
    assert acc[1].numpy().tolist() != [0.25, 0.25]
    emb({"u": tf.constant([12, 11], tf.int64)}, training=True)  # 12 evicts 10 (row 1); no update yet
    assert emb.index["u"].lookup(tf.constant([10, 12], tf.int64)).numpy().tolist() == [-1, 1]
    np.testing.assert_array_equal(var[1].numpy(), initial_key_rows_np(t, np.array([12]), 1, "glorot_normal")[0])
    np.testing.assert_array_equal(acc[1].numpy(), [0.25, 0.25])
    np.testing.assert_array_equal(opt.get_slot(var, "linear")[1].numpy(), [0, 0])
    assert emb.stats["u"].numpy().tolist() == [3, 3, 1]
    emb2 = DynamicEmbedding([dyn_table(cap=1, evict="none", dim=2)], "glorot_normal", 1, "deep", None)
    opt2 = tf.keras.optimizers.legacy.RMSprop(0.1)
    emb2.attach_optimizer(opt2)
    for ids in ([1, 2, 3], [2, 3], [4]):   # only key 1 gets a row; the others read and train the zero row
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(emb2({"u": tf.constant(ids, tf.int64)}, training=True)["u"])
        opt2.apply_gradients([(tape.gradient(loss, emb2.shards["u"]), emb2.shards["u"])])
    assert not emb2.shards["u"][0].numpy().any() and emb2.keyed_count("u") == 1


def test_make_embedding_mixes_fixed_and_dynamic_tables_and_pools() -> None:
    tables = [TableConfig("a", 7, 3), dyn_table("u", cap=8, multihot=True), dyn_table("v", cap=8)]
    emb = make_embedding("replicated", tables, "glorot_normal", 0, "deep", None)
    assert isinstance(emb, CompositeEmbedding) and list(emb.tables) == ["a", "u", "v"]
    ids = {"a": tf.constant([1, 2], tf.int32), "u": tf.ragged.constant([[2**40, 2**40, 5], []], tf.int64),
           "v": tf.constant([-3, 9], tf.int64)}
    out = emb(ids, training=True)
    u = initial_key_rows_np(tables[1], np.array([2**40, 5]), 0, "glorot_normal")
    np.testing.assert_allclose(out["u"].numpy(), [2 * u[0] + u[1], np.zeros(3)], rtol=1e-6)
    np.testing.assert_array_equal(out["v"].numpy(), initial_key_rows_np(tables[2], np.array([-3, 9]), 0,
                                                                        "glorot_normal"))
    assert len(emb.sparse_variables) == 2 and emb.counters()["u"].tolist() == [2, 2, 0, 2]


@pytest.mark.parametrize("evict", ["lru", "lfu"])
def test_first_batch_larger_than_the_shard_admits_what_fits(evict: str) -> None:
    emb = DynamicEmbedding([dyn_table(cap=2, evict=evict)], "glorot_normal", 0, "deep", None)
    out = emb({"u": tf.constant([9, 8, 7], tf.int64)}, training=True)["u"].numpy()  # all touched: none evictable
    assert emb.index["u"].lookup(tf.constant([7, 8, 9], tf.int64)).numpy().tolist() == [1, 2, -1]
    assert out[0].tolist() == [0, 0, 0] and out[1].any() and out[2].any()
    emb({"u": tf.constant([9], tf.int64)}, training=True)  # now 9 evicts the oldest (LRU) / rarest (LFU): 7
    assert emb.index["u"].lookup(tf.constant([7, 8, 9], tf.int64)).numpy().tolist() == [-1, 2, 1]

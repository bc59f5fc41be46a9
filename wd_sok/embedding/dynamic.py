"""Dynamic (hash-table) embeddings on CPU under Horovod: any int64 id, rows handed out in the step.

Placement: key ``k`` lives on rank ``mix64(k) % N`` (:mod:`wd_sok.embedding.keys`). Per table, each rank holds

* ``index``: a ``tf.lookup.experimental.MutableHashTable`` key -> local row (int64; it reserves no key
  value, so every int64 is a valid id, unlike ``DenseHashTable``'s empty / deleted keys);
* ``shards[name]``: a [C + 1, dim] float32 variable, C = this rank's share of ``capacity`` (rows
  ``rank, rank + N, ...`` below it, as a fixed table's); **row 0 is the shared zero row**: ids without a row
  read it, its gradient is masked to 0, so it stays 0 under any optimizer;
* per row: ``row_key`` (the key in it), ``row_count`` (occurrences seen, for LFU), ``row_last`` (clock of the
  last training step that saw it, for LRU), all [C + 1] int64; ``used``: rows 1..used are occupied (rows are
  handed out in order and an evicted row is reused at once, so occupied rows are always 1..used);
* ``pending`` (``min_count > 1`` only): key -> occurrences for keys seen fewer than ``min_count`` times;
* ``stats``: [3] int64 running totals of inserts (sightings of a key without a row and without a pending
  count: a key's first, and with ``min_count: 1`` each one until it gets a row), admissions (keys given a
  row) and evictions (rows taken from a key for another).

A lookup runs the sharded backend's deduplicated exchange (:mod:`wd_sok.embedding.sharded`): per table one
``tf.unique``, the distinct keys with their occurrence counts (one [u, 3] int64 alltoall of (key, count,
table)) to their owners, the rows back in one fused float alltoall, :func:`~wd_sok.embedding.sharded.expand`
summing duplicate gradients before the backward alltoall. The shards are ``sparse_variables``.

On the owner, in a training lookup (``training=True``; evaluation and serving never change the tables), for
the distinct keys it received, in this order, with TensorFlow ops (deterministic for a given rank count):

1. keys with a row: ``row_count += occurrences``, ``row_last = clock``;
2. keys without one: ``total = pending + occurrences``; those with ``total >= min_count`` are candidates,
   taken in ascending key order: first into free rows (``used + 1, ...``), then, when the shard is full and
   ``evict`` is ``lru`` / ``lfu``, into the rows with the smallest ``row_last`` / ``row_count`` (ties: the
   lower row), never a row this step touched. Candidates left over (``evict: none``, or every row touched)
   read the zero row, and keep their count in ``pending``;
3. an admitted key's row gets ``row_key``, ``row_count = total``, ``row_last = clock``, its initial value
   (:func:`~wd_sok.embedding.keys.initial_key_rows`, a function of (seed, table, key)) and every optimizer
   slot reset to its initial value (:func:`wd_sok.optim.reset_slot_rows`); the evicted key leaves ``index``.

The wide and deep collections of a dynamic feature see the same ids every step and have the same capacity,
``min_count`` and policy, so they make the same decisions: the same keys have rows in both (tested).
``pending`` is not bounded: a stream of keys each seen once grows it (as TFRA's and Monolith's counters).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from wd_sok import changes
from wd_sok.distributed import Runtime
from wd_sok.embedding.base import EmbeddingCollection, Placement, ensure_slots, pool, strided_rows
from wd_sok.embedding.keys import initial_key_rows, initial_key_rows_np, owner, owner_np
from wd_sok.embedding.sharded import Ids, _counts, exchange_vectors, expand
from wd_sok.feature_spec import TableConfig
from wd_sok.optim import read_slot_rows, reset_slot_rows, write_slot_rows

DYNAMIC = Placement("dynamic")  # keys on rank mix64(key) % N, rows handed out by hash tables

INT64_MAX = np.iinfo(np.int64).max
STATS = ("inserts", "admissions", "evictions")
KEYED_ARRAYS = ("key", "count", "last")  # per-row int64 arrays a checkpoint holds besides values and slots


class DynamicEmbedding(EmbeddingCollection):
    """Dynamic tables of one collection (see the module docstring).

    Args:
        tables: tables whose ``dynamic`` is set (``cardinality`` = capacity over all ranks).
        initializer: "zeros" (wide) or "glorot_normal" (deep; see :func:`initial_key_rows`).
        seed: run seed.
        prefix: "wide" or "deep".
        runtime: rank and world size (None: one process).
    """

    def __init__(self, tables: list[TableConfig], initializer: str, seed: int, prefix: str,
                 runtime: Runtime | None, **kw) -> None:
        super().__init__(tables, initializer, seed, prefix, **kw)
        self.runtime = runtime
        self.rank, self.world = (runtime.rank, runtime.size) if runtime is not None else (0, 1)
        self.names = [t.name for t in tables]
        self.capacity = {t.name: strided_rows(t.cardinality, self.rank, self.world) for t in tables}
        object.__setattr__(self, "optimizer", None)  # untracked (set by attach_optimizer)
        self.clock = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{prefix}/dynamic_clock")
        self.index, self.pending, self.shards, self.row_key, self.row_count, self.row_last = ({} for _ in range(6))
        self.used, self.stats = {}, {}
        for t in tables:
            n, name = self.capacity[t.name] + 1, f"{prefix}/{t.name}"
            self.index[t.name] = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, -1,
                                                                         name=f"{prefix}_{t.name}_index")
            if t.dynamic.min_count > 1:
                self.pending[t.name] = tf.lookup.experimental.MutableHashTable(
                    tf.int64, tf.int64, 0, name=f"{prefix}_{t.name}_pending")
            self.shards[t.name] = tf.Variable(tf.zeros([n, t.dim]), name=name, trainable=True)
            for store, what in ((self.row_key, "key"), (self.row_count, "count"), (self.row_last, "last")):
                store[t.name] = tf.Variable(tf.zeros([n], tf.int64), trainable=False, name=f"{name}/{what}")
            self.used[t.name] = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}/used")
            self.stats[t.name] = tf.Variable(tf.zeros([3], tf.int64), trainable=False, name=f"{name}/stats")

    def attach_optimizer(self, optimizer: tf.keras.optimizers.legacy.Optimizer | None) -> None:
        """The optimizer of these tables: its slots are created now, and reset for every row handed over."""
        object.__setattr__(self, "optimizer", optimizer)
        ensure_slots(optimizer, list(self.shards.values()))

    # ------------------------------------------------------------------ lookup
    def call(self, ids: dict[str, Ids], training: bool | None = None) -> dict[str, tf.Tensor]:
        return self.lookup(ids, training=training is True)

    @tf.autograph.experimental.do_not_convert  # plain Python over tables (see EmbeddingCollection.lookup)
    def lookup(self, ids: dict[str, Ids], training: bool = False) -> dict[str, tf.Tensor]:
        """Pooled vectors ``{name: [B, dim] float32}`` for one-hot [B] or ragged [B, (k)] int64 ids; a
        training lookup also counts, admits and evicts (module docstring)."""
        if not self.names:
            return {}
        flat = [tf.cast(ids[n].flat_values if isinstance(ids[n], tf.RaggedTensor) else tf.reshape(ids[n], [-1]),
                        tf.int64) for n in self.names]
        if training:
            self.clock.assign_add(1)
        vectors = self._exchange(flat, training)
        out = {}
        for name, v in zip(self.names, vectors, strict=True):
            x, table = ids[name], self.tables[name]
            if isinstance(x, tf.RaggedTensor):
                out[name] = pool(x.with_flat_values(v), table.combiner)
            else:
                out[name] = tf.reshape(v, tf.concat([tf.shape(x, out_type=tf.int32), [table.dim]], 0))
        return out

    @tf.autograph.experimental.do_not_convert
    def _exchange(self, flat: list[tf.Tensor], training: bool) -> list[tf.Tensor]:
        """Per table [n_t] int64 keys -> [n_t, dim_t] float32 rows, each distinct key of a table sent once."""
        n_ranks, n_tables = self.world, len(self.names)
        dims = [self.tables[n].dim for n in self.names]
        uniq, inverse, occ = [], [], []
        for f in flat:
            u, inv = tf.unique(f, out_idx=tf.int32)
            uniq.append(u)
            inverse.append(inv)
            occ.append(tf.math.unsorted_segment_sum(tf.ones_like(f), inv, tf.size(u)))
        sizes = [tf.size(u, out_type=tf.int32) for u in uniq]
        table = tf.repeat(tf.range(n_tables, dtype=tf.int32), tf.stack(sizes))
        keys = tf.concat(uniq, 0)
        bucket = owner(keys, n_ranks) * n_tables + table
        order = tf.argsort(bucket, stable=True)
        send_counts = _counts(bucket, n_ranks, n_tables)                             # [N, T]
        payload = tf.gather(tf.stack([keys, tf.concat(occ, 0), tf.cast(table, tf.int64)], 1), order)
        recv, recv_splits = self._alltoall(payload, tf.reduce_sum(send_counts, 1), "keys")  # [m, 3]
        recv_table = tf.cast(recv[:, 2], tf.int32)
        source = tf.repeat(tf.range(n_ranks, dtype=tf.int32), recv_splits)
        recv_counts = _counts(source * n_tables + recv_table, n_ranks, n_tables)      # [N, T]
        keys_by_table = tf.dynamic_partition(recv[:, 0], recv_table, n_tables)
        occ_by_table = tf.dynamic_partition(recv[:, 1], recv_table, n_tables)

        rows = []
        for t, name in enumerate(self.names):
            local = self._resolve(name, keys_by_table[t], occ_by_table[t], training)  # [m_t], 0 = zero row
            rows.append(tf.gather(self.shards[name], local) * tf.cast(local > 0, tf.float32)[:, None])
        distinct = exchange_vectors(rows, recv_counts, send_counts, dims, order, table, sizes,
                                    lambda x, splits: self._alltoall(x, splits, "vectors"))
        return [expand(d, inverse[t]) for t, d in enumerate(distinct)]                # [n_t, dim_t]

    def _alltoall(self, tensor: tf.Tensor, splits: tf.Tensor, what: str) -> tuple[tf.Tensor, tf.Tensor]:
        if self.world == 1:
            return tensor, splits
        return self.runtime.hvd.alltoall(tensor, splits=splits, name=f"{self.prefix}_dyn_{what}")

    # ------------------------------------------------------------------ admission and eviction (owner)
    def _resolve(self, name: str, keys: tf.Tensor, occ: tf.Tensor, training: bool) -> tf.Tensor:
        """[m] int64 local rows of [m] received keys (0: no row); training lookups update the table."""
        u, inv = tf.unique(keys, out_idx=tf.int32)
        found = tf.reshape(self.index[name].lookup(u), tf.shape(u))                 # [u], -1 = absent
        if training:
            rows = self._admit(name, u, tf.math.unsorted_segment_sum(occ, inv, tf.size(u)), found)
        else:
            rows = tf.maximum(found, 0)
        return tf.gather(rows, inv)

    def _admit(self, name: str, u: tf.Tensor, occ: tf.Tensor, found: tf.Tensor) -> tf.Tensor:
        """Count, admit and evict for distinct keys ``u`` [u] seen ``occ`` [u] times, ``found`` [u] their
        rows (-1: none); returns [u] rows after admission (0: none)."""
        table, cfg = self.tables[name], self.tables[name].dynamic
        clock, used = self.clock.read_value(), self.used[name].read_value()
        present = found >= 0
        hit = tf.boolean_mask(found, present)
        self.row_count[name].scatter_add(tf.IndexedSlices(tf.boolean_mask(occ, present), hit))
        self.row_last[name].scatter_update(tf.IndexedSlices(tf.fill(tf.shape(hit), clock), hit))

        absent = tf.where(~present)[:, 0]
        a_keys, a_occ = tf.gather(u, absent), tf.gather(occ, absent)
        prev = (tf.reshape(self.pending[name].lookup(a_keys), tf.shape(a_keys)) if name in self.pending
                else tf.zeros_like(a_keys))
        total = prev + a_occ
        ready = total >= cfg.min_count
        c_pos, c_keys, c_tot = (tf.boolean_mask(x, ready) for x in (absent, a_keys, total))
        by_key = tf.argsort(c_keys, stable=True)
        c_pos, c_keys, c_tot = (tf.gather(x, by_key) for x in (c_pos, c_keys, c_tot))
        n_cand = tf.size(c_keys, out_type=tf.int64)
        n_fresh = tf.minimum(n_cand, self.capacity[name] - used)
        fresh = tf.range(used + 1, used + 1 + n_fresh, dtype=tf.int64)
        if cfg.evict == "none":
            victims = tf.zeros([0], tf.int64)
        else:
            victims = tf.cond(n_cand > n_fresh, lambda: self._victims(name, n_cand - n_fresh, clock, used),
                              lambda: tf.zeros([0], tf.int64))
        new_rows = tf.concat([fresh, victims], 0)
        n_admit = tf.size(new_rows)
        adm_pos, adm_keys, adm_tot = c_pos[:n_admit], c_keys[:n_admit], c_tot[:n_admit]

        index = self.index[name]
        index.remove(tf.gather(self.row_key[name], victims))
        index.insert(adm_keys, new_rows)
        if name in self.pending:
            self.pending[name].insert(a_keys, total)
            self.pending[name].remove(adm_keys)
        self.row_key[name].scatter_update(tf.IndexedSlices(adm_keys, new_rows))
        self.row_count[name].scatter_update(tf.IndexedSlices(adm_tot, new_rows))
        self.row_last[name].scatter_update(tf.IndexedSlices(tf.fill(tf.shape(new_rows), clock), new_rows))
        self.used[name].assign_add(n_fresh)
        var = self.shards[name]
        var.scatter_update(tf.IndexedSlices(initial_key_rows(table, adm_keys, self.seed, self.initializer),
                                            new_rows))
        reset_slot_rows(self.optimizer, var, new_rows)
        inserts = tf.reduce_sum(tf.cast(prev == 0, tf.int64))
        self.stats[name].assign_add(tf.stack([inserts, tf.cast(n_admit, tf.int64),
                                              tf.size(victims, out_type=tf.int64)]))
        rows = tf.maximum(tf.tensor_scatter_nd_update(found, adm_pos[:, None], new_rows), 0)
        changes.mark_rows(var, rows)  # counted, touched or handed over: changed since the last full checkpoint
        return rows

    def _victims(self, name: str, want: tf.Tensor, clock: tf.Tensor, used: tf.Tensor) -> tf.Tensor:
        """Up to ``want`` occupied rows to evict: smallest score (LRU: ``row_last``, LFU: ``row_count``),
        lower row first on ties, never a row touched this step; [k] int64 local rows, in that order.

        LRU runs in O(rows) without a sort: ``row_last`` values are step clocks, so a histogram of them finds
        the threshold clock below which every row goes (then the first rows at the threshold); only the k
        victims are sorted. (``top_k`` with k in the tens of thousands took 30 ms over 5e5 rows; this ~1 ms.)
        """
        last = self.row_last[name][1:used + 1]
        if self.tables[name].dynamic.evict == "lfu":
            score = tf.where(last == clock, tf.constant(INT64_MAX, tf.int64), self.row_count[name][1:used + 1])
            _, pick = tf.math.top_k(-score, k=tf.cast(tf.minimum(want, used), tf.int32))
            pick = tf.boolean_mask(pick, tf.gather(score, pick) < INT64_MAX)
            return tf.cast(pick, tf.int64) + 1
        low = tf.reduce_min(tf.concat([last, tf.reshape(clock, [1])], 0))  # no row yet (a first batch larger
        # than the shard): low = clock, nothing to evict
        hist = tf.math.unsorted_segment_sum(tf.cast(last < clock, tf.int64), last - low, clock - low + 1)
        cum = tf.math.cumsum(hist)                                   # rows untouched this step with last <= c
        k = tf.minimum(want, cum[-1])
        threshold = low + tf.searchsorted(cum, tf.reshape(k, [1]), side="left", out_type=tf.int64)[0]  # k-th clock
        below = tf.where(last < threshold)[:, 0]
        at = tf.where(last == threshold)[:, 0][:tf.maximum(k - tf.size(below, out_type=tf.int64), 0)]
        pick = tf.concat([below, at], 0)[:k]
        pick = tf.gather(pick, tf.argsort(tf.gather(last, pick), stable=True))  # by (last, row)
        return pick + 1

    # ------------------------------------------------------------------ training / logging
    @property
    def sparse_variables(self) -> list[tf.Variable]:
        """This rank's rows: their gradients arrive already summed over ranks."""
        return list(self.shards.values())

    def local_bytes(self) -> int:
        return int(sum(np.prod(v.shape) * v.dtype.size for v in self.shards.values()))

    def table_variable(self, name: str) -> tf.Variable:
        return self.shards[name]

    def placement(self, name: str) -> Placement:
        return DYNAMIC

    def counters(self) -> dict[str, np.ndarray]:
        """Per table [inserts, admissions, evictions, rows in use] on this rank (running totals), int64."""
        return {n: np.append(self.stats[n].numpy(), self.used[n].numpy()) for n in self.names}

    # ------------------------------------------------------------------ checkpoints (keyed)
    #: ([n] int64 keys, world) -> [n] int64 owning rank: this backend's placement (``mix64(k) % N``)
    owner_of_keys = staticmethod(owner_np)

    def owns(self, keys: np.ndarray) -> np.ndarray:
        """[n] bool: which of [n] int64 keys live on this rank."""
        return self.owner_of_keys(keys, self.world) == self.rank

    def keyed_count(self, name: str) -> int:
        """Rows in use (saved rows 0..count-1 are variable rows 1..count)."""
        return int(self.used[name].numpy())

    def read_keyed(self, name: str, array: str, lo: int, hi: int) -> np.ndarray:
        """Saved rows lo..hi-1 of ``array`` ("key", "count", "last" [n] int64; "value" or a slot [n, dim])."""
        rows = slice(lo + 1, hi + 1, 1)
        index = tf.range(lo + 1, hi + 1, dtype=tf.int64)
        if array in KEYED_ARRAYS:
            store = {"key": self.row_key, "count": self.row_count, "last": self.row_last}[array]
            return tf.gather(store[name], index).numpy()
        if array == "value":
            return tf.gather(self.shards[name], index).numpy()
        return read_slot_rows(self.optimizer, self.shards[name], array, rows)

    def read_keyed_rows(self, name: str, array: str, saved: np.ndarray) -> np.ndarray:
        """Saved rows ``saved`` [m] int64 (positions; variable rows ``saved + 1``) of ``array``, like
        :meth:`read_keyed`: [m] int64 or [m, dim] float32."""
        index = np.asarray(saved, np.int64) + 1
        if array in KEYED_ARRAYS:
            store = {"key": self.row_key, "count": self.row_count, "last": self.row_last}[array]
            return tf.gather(store[name], index).numpy()
        if array == "value":
            return tf.gather(self.shards[name], index).numpy()
        return read_slot_rows(self.optimizer, self.shards[name], array, index)

    def pending_items(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """([p] int64 keys, [p] int64 counts) of keys still below ``min_count`` (empty if min_count is 1)."""
        if name not in self.pending:
            return np.zeros([0], np.int64), np.zeros([0], np.int64)
        keys, counts = self.pending[name].export()
        return keys.numpy(), counts.numpy()

    def insert_keyed(self, name: str, arrays: dict[str, np.ndarray]) -> int:
        """Restore: give the keys ``arrays["key"]`` [n] the next free rows with their values, slots and
        counters (``arrays`` maps array name -> [n] or [n, dim]); returns how many did not fit (dropped)."""
        keys = np.asarray(arrays["key"], np.int64)
        used = self.keyed_count(name)
        n = min(keys.size, self.capacity[name] - used)
        if n <= 0:
            return int(keys.size)
        rows = tf.range(used + 1, used + 1 + n, dtype=tf.int64)
        self.index[name].insert(tf.constant(keys[:n]), rows)
        for array, values in arrays.items():
            values = values[:n]
            if array in KEYED_ARRAYS:
                store = {"key": self.row_key, "count": self.row_count, "last": self.row_last}[array]
                store[name].scatter_update(tf.IndexedSlices(tf.constant(values, tf.int64), rows))
            elif array == "value":
                self.shards[name].scatter_update(tf.IndexedSlices(tf.constant(values, tf.float32), rows))
            elif self.optimizer is not None:
                write_slot_rows(self.optimizer, self.shards[name], array, rows, values)
        self.used[name].assign(used + n)
        return int(keys.size - n)

    def clock_value(self) -> int:
        return int(self.clock.numpy())

    def set_clock(self, value: int) -> None:
        self.clock.assign(int(value))

    def clear_keyed(self, name: str) -> None:
        """Forget every key of table ``name`` (before a restore): no rows in use, nothing pending."""
        for table in (self.index[name], self.pending.get(name)):
            if table is not None:
                table.remove(table.export()[0])
        self.used[name].assign(0)
        for store in (self.row_key, self.row_count, self.row_last):
            store[name].assign(tf.zeros_like(store[name]))

    def insert_pending(self, name: str, keys: np.ndarray, counts: np.ndarray) -> None:
        if name in self.pending and len(keys):
            self.pending[name].insert(tf.constant(keys, tf.int64), tf.constant(counts, tf.int64))

    def initial_values(self, name: str, keys: np.ndarray) -> np.ndarray:
        """[n, dim] float32 initial rows of ``keys`` (numpy; equal to the step's)."""
        return initial_key_rows_np(self.tables[name], keys, self.seed, self.initializer)

"""Sharded backend: SOK's model-parallel placement reproduced with plain TensorFlow and Horovod alltoall.

Placement (as SOK's default "distributed" tables): global row ``g`` of a table lives on rank ``g % N`` at
local row ``g // N``; rank ``r`` holds ``ceil((cardinality - r) / N)`` rows, initialised from
:func:`initial_rows` of exactly those global rows, so the values never depend on ``N``.

One lookup of the whole collection (all its tables at once) is two alltoalls forward and one backward:

0. **distinct ids.** Every table's ids are flattened and concatenated, and one ``tf.unique`` over the pairs
   ``(id, table)`` keeps each distinct id of a table once, with the inverse index of every occurrence. Only
   distinct ids travel, so ids, vectors and gradients sent scale with the distinct ids per (table, owner),
   not with the batch's occurrences (Zipf-skewed logs repeat their head ids many times per batch).
1. **ids.** Distinct id ``g`` of table ``t`` becomes the key ``(g // N) * T + t`` for owner ``g % N``. Keys
   are sorted stably by ``(owner, t)`` and sent with ``hvd.alltoall`` (uneven splits). The owner decodes
   ``t`` and the local row from each key.
2. **vectors.** The owner gathers its local rows per table (``tf.gather`` on the local variable, so the
   gradient is an IndexedSlices that stays on this rank) and answers every requester with one flat float
   buffer holding, per table in order, that requester's vectors (tables of different widths fuse into one
   1-D alltoall). The requester cuts the buffer back into ``[u_t, dim_t]`` blocks, undoes the sort
   (``scatter_nd``), expands the distinct rows to every occurrence with the inverse index (:func:`expand`)
   and pools multi-hot rows (:func:`pool`).
3. **backward.** :func:`expand`'s gradient sums the gradients of repeated ids (``unsorted_segment_sum``
   into a dense ``[u_t, dim_t]``) *before* Horovod's alltoall gradient sends them back to the owners along
   the same splits (one vector per distinct id); ``tf.gather``'s gradient then sums every rank's
   contributions per local row. Hence these tables are ``sparse_variables``: their gradients are already
   global and must never be allreduced.

``ShardedEmbedding.exchange_hook`` (None in training; a Python check at trace time) receives the [N, T]
counts of distinct ids this rank sends and receives, which the tests and the byte benchmark read.

A train step of Wide & Deep (two collections) therefore runs 4 alltoalls forward and 2 backward, whatever
the number of tables. Every rank must run every lookup, including with an empty batch (B = 0).
With one process the exchange is the identity (no Horovod needed), which the unit tests use.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from wd_sok.distributed import Runtime
from wd_sok.embedding.base import ROW_WISE, EmbeddingCollection, Placement, RowMap, fill_initial, pool, strided_rows
from wd_sok.feature_spec import TableConfig

Ids = tf.Tensor | tf.RaggedTensor


def local_rows(cardinality: int, rank: int, world: int) -> np.ndarray:
    """Global rows owned by ``rank``, in local order: [ceil((cardinality - rank) / world)] int64."""
    return np.arange(rank, cardinality, world, dtype=np.int64)


@tf.autograph.experimental.do_not_convert
def checked_ids(x: Ids, table: TableConfig, prefix: str) -> tf.Tensor:
    """[n] int64 flattened ids of one feature, asserted to lie in [0, cardinality) (error names the feature).

    Args:
        x: [B] (or any shape) int ids, or a tf.RaggedTensor [B, (k)].
    Raises:
        tf.errors.InvalidArgumentError (when run) naming the feature, the range and the offending min / max.
    """
    values = x.flat_values if isinstance(x, tf.RaggedTensor) else tf.reshape(x, [-1])
    values = tf.cast(values, tf.int64)
    ok = tf.reduce_all((values >= 0) & (values < table.cardinality))
    check = tf.debugging.Assert(ok, [f"{prefix} embedding: feature '{table.name}': ids must lie in "
                                     f"[0, {table.cardinality}); got min", tf.reduce_min(values), "max",
                                     tf.reduce_max(values)])
    with tf.control_dependencies([check]):
        return tf.identity(values)


class RowShardedCollection(EmbeddingCollection):
    """What the sharded and SOK backends share: each table placed by its :class:`Placement`, and its
    checkpoint rows.

    * row-wise: row g on rank g % N, local row g // N (``[ceil((cardinality - rank) / N), dim]`` per rank);
    * table-wise: the whole ``[cardinality, dim]`` table on rank ``owner``, a ``[0, dim]`` variable elsewhere;
    * replicated: the whole table on every rank (each saves rows ``rank::N`` of it).

    Subclasses fill ``self.shards`` (feature name -> this rank's variable) and implement ``lookup``.
    """

    def __init__(self, tables: list[TableConfig], initializer: str, seed: int, prefix: str,
                 runtime: Runtime, placements: dict[str, Placement] | None = None, **kw) -> None:
        super().__init__(tables, initializer, seed, prefix, **kw)
        self.runtime = runtime
        self.world, self.rank = runtime.size, runtime.rank
        self.names = [t.name for t in tables]
        self.placements = {t.name: (placements or {}).get(t.name, ROW_WISE) for t in tables}
        for name, p in self.placements.items():
            if p.kind not in ("row_wise", "table_wise", "replicated") or not 0 <= p.owner < self.world:
                raise ValueError(f"{prefix} embedding: feature '{name}': bad placement {p} for {self.world} ranks")
        self.shards: dict[str, tf.Variable] = {}

    def placement(self, name: str) -> Placement:
        return self.placements[name]

    def held_rows(self, name: str) -> int:
        """Rows of table ``name`` in this rank's variable."""
        p, card = self.placements[name], self.tables[name].cardinality
        if p.kind == "row_wise":
            return strided_rows(card, self.rank, self.world)
        return card if p.kind == "replicated" or p.owner == self.rank else 0

    def new_shard(self, table: TableConfig) -> tf.Variable:
        """This rank's variable of ``table`` (see the class) with its initial rows (:func:`initial_rows` of
        exactly its global rows, so values never depend on the placement), filled block by block."""
        var = tf.Variable(tf.zeros([self.held_rows(table.name), table.dim]), name=f"{self.prefix}/{table.name}",
                          trainable=True)
        p = self.placements[table.name]
        rows = RowMap(0, 1, table.cardinality) if p.kind == "replicated" else self.saved_rows(table.name)
        fill_initial(var, table, rows, self.seed, self.initializer)
        return var

    # ------------------------------------------------------------------ training / checkpoints
    @property
    def sparse_variables(self) -> list[tf.Variable]:
        """Row-wise and table-wise tables: their gradients arrive already summed over ranks."""
        return [v for n, v in self.shards.items() if self.placements[n].kind != "replicated"]

    @property
    def dense_reduced_variables(self) -> list[tf.Variable]:
        return [v for n, v in self.shards.items()
                if self.placements[n].kind == "replicated" and self.placements[n].reduction == "dense"]

    def local_bytes(self) -> int:
        return int(sum(np.prod(v.shape) * v.dtype.size for v in self.shards.values()))

    def table_variable(self, name: str) -> tf.Variable:
        return self.shards[name]

    def saved_rows(self, name: str) -> RowMap:
        """Row-wise: global rows ``rank, rank + N, ...`` (the whole local shard); table-wise: every row on the
        owner, none elsewhere; replicated: rows ``rank::N`` of the local copy."""
        p, card = self.placements[name], self.tables[name].cardinality
        count = strided_rows(card, self.rank, self.world)
        if p.kind == "row_wise":
            return RowMap(start=self.rank, stride=self.world, count=count)
        if p.kind == "replicated":
            return RowMap(start=self.rank, stride=self.world, count=count, vstart=self.rank, vstride=self.world)
        return RowMap(start=0, stride=1, count=card if p.owner == self.rank else 0)

    def owned(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row-wise: rows with ``g % N == rank``, at local row ``g // N``; table-wise: all rows on the owner,
        none elsewhere; replicated: every row, at its own index."""
        p = self.placements[name]
        if p.kind == "row_wise":
            mask = rows % self.world == self.rank
            return mask, rows[mask] // self.world
        if p.kind == "replicated" or p.owner == self.rank:
            return np.ones(rows.shape, bool), rows
        return np.zeros(rows.shape, bool), rows[:0]


class ShardedEmbedding(RowShardedCollection):
    """Tables sharded row-wise over ranks (row g on rank g % N); lookups exchange ids and vectors.

    Args:
        tables: the tables (feature names, cardinalities, widths, combiners).
        initializer: "zeros" or "glorot_normal" (see :func:`initial_rows`).
        seed: run seed.
        prefix: "wide" or "deep".
        runtime: rank and world size; its Horovod module does the alltoalls when size > 1.
    """

    def __init__(self, tables: list[TableConfig], initializer: str, seed: int, prefix: str,
                 runtime: Runtime, placements: dict[str, Placement] | None = None, **kw) -> None:
        super().__init__(tables, initializer, seed, prefix, runtime, placements, **kw)
        for t in tables:
            self.shards[t.name] = self.new_shard(t)
        # the tables that go through the exchange (row- and table-wise), in table order
        self.exchanged = [n for n in self.names if self.placements[n].kind != "replicated"]
        # Called at trace time (eagerly: at every lookup) with two [N, T] int32 counts: the distinct ids this
        # rank sends to each (owner, table), and the ids it received from each (source, table) (= the vectors
        # it answers and the gradients it gets back); None in training. Tests and the byte benchmark read
        # the exchange through it.
        self.exchange_hook: Callable[[tf.Tensor, tf.Tensor], None] | None = None

    # ------------------------------------------------------------------ lookup
    @tf.autograph.experimental.do_not_convert  # see EmbeddingCollection.call
    def lookup(self, ids: dict[str, Ids]) -> dict[str, tf.Tensor]:
        """Pooled vectors ``{name: [B, dim] float32}`` for one-hot [B] or ragged [B, (k)] ids."""
        if not self.names:
            return {}
        flat = {name: checked_ids(ids[name], self.tables[name], self.prefix) for name in self.names}
        vectors = dict(zip(self.exchanged, self._exchange([flat[n] for n in self.exchanged]), strict=True))
        for name in self.names:
            if name not in vectors:  # replicated: a local gather of the distinct ids, their gradients summed
                uniq, inverse = tf.unique(flat[name], out_idx=tf.int32)
                vectors[name] = expand(tf.gather(self.shards[name], uniq), inverse)
        out = {}
        for name in self.names:
            v = vectors[name]
            x, table = ids[name], self.tables[name]
            if isinstance(x, tf.RaggedTensor):
                out[name] = pool(x.with_flat_values(v), table.combiner)
            else:
                out[name] = tf.reshape(v, tf.concat([tf.shape(x, out_type=tf.int32), [table.dim]], 0))
        return out

    @tf.autograph.experimental.do_not_convert  # plain Python over tables: trace as is (much faster)
    def _exchange(self, flat: list[tf.Tensor]) -> list[tf.Tensor]:
        """Look up every table's flat ids on their owners, each distinct id of a table once.

        Args:
            flat: per table, [n_t] int64 global row ids (any order, duplicates allowed).
        Returns:
            per table, [n_t, dim_t] float32 rows, in the order of ``flat``.
        """
        if not flat:
            return []
        n_ranks, n_tables = self.world, len(self.exchanged)
        dims = [self.tables[name].dim for name in self.exchanged]
        # 0. distinct (table, id) pairs: one tf.unique over all tables; first occurrences keep table order
        counts = tf.stack([tf.size(f, out_type=tf.int32) for f in flat])
        table_of = tf.repeat(tf.range(n_tables, dtype=tf.int64), counts)
        uniq, inverse = tf.unique(tf.concat(flat, 0) * n_tables + table_of, out_idx=tf.int32)
        ids, table = uniq // n_tables, tf.cast(uniq % n_tables, tf.int32)
        sizes = tf.unstack(tf.math.bincount(table, minlength=n_tables, maxlength=n_tables), num=n_tables)
        kinds = [self.placements[name] for name in self.exchanged]
        if all(p.kind == "row_wise" for p in kinds):
            owner, local = tf.cast(ids % n_ranks, tf.int32), ids // n_ranks
        else:  # table-wise tables: owner fixed per table, local row = global row
            row_wise = tf.gather(tf.constant([p.kind == "row_wise" for p in kinds]), table)
            owner = tf.where(row_wise, tf.cast(ids % n_ranks, tf.int32),
                             tf.gather(tf.constant([p.owner for p in kinds], tf.int32), table))
            local = tf.where(row_wise, ids // n_ranks, ids)
        keys = local * n_tables + tf.cast(table, tf.int64)

        # 1. ids to their owners, sorted by (owner, table)
        bucket = owner * n_tables + table
        order = tf.argsort(bucket, stable=True)
        send_counts = _counts(bucket, n_ranks, n_tables)                       # [N, T]
        recv_keys, recv_splits = self._alltoall(tf.gather(keys, order), tf.reduce_sum(send_counts, 1),
                                                "ids")
        recv_table = tf.cast(recv_keys % n_tables, tf.int32)
        recv_local = recv_keys // n_tables
        source = tf.repeat(tf.range(n_ranks, dtype=tf.int32), recv_splits)
        recv_counts = _counts(source * n_tables + recv_table, n_ranks, n_tables)  # [N, T]
        if self.exchange_hook is not None:
            self.exchange_hook(send_counts, recv_counts)

        # 2. local gathers, answered to each source; 3. cut per (owner, table), undo the sort
        rows_by_table = tf.dynamic_partition(recv_local, recv_table, n_tables)
        rows = [tf.gather(self.shards[name], rows_by_table[t]) for t, name in enumerate(self.exchanged)]
        distinct = exchange_vectors(rows, recv_counts, send_counts, dims, order, table, sizes,
                                    lambda x, splits: self._alltoall(x, splits, "vectors"))
        starts = tf.math.cumsum(tf.stack(sizes), exclusive=True)
        # tf.split, not tf.dynamic_partition: with the latter, grappler's shape inference mis-sized the
        # traced pooling gradient ("Incompatible shapes" in RaggedReduceSum's gradient, TF 2.15)
        inverse_by_table = tf.split(inverse, counts, num=n_tables)
        return [expand(d, inverse_by_table[t] - starts[t]) for t, d in enumerate(distinct)]  # [n_t, dim_t]

    def _alltoall(self, tensor: tf.Tensor, splits: tf.Tensor, what: str) -> tuple[tf.Tensor, tf.Tensor]:
        """``hvd.alltoall`` with uneven ``splits`` [N] int32; the identity on one rank."""
        if self.world == 1:
            return tensor, splits
        return self.runtime.hvd.alltoall(tensor, splits=splits, name=f"{self.prefix}_emb_{what}")


def exchange_vectors(rows: list[tf.Tensor], recv_counts: tf.Tensor, send_counts: tf.Tensor, dims: list[int],
                     order: tf.Tensor, table: tf.Tensor, sizes: list[tf.Tensor],
                     alltoall: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]) -> list[tf.Tensor]:
    """The vector half of an exchange (this backend's and the dynamic tables'): the owner answers, the
    requester unpacks.

    Args:
        rows: per table t, [m_t, dim_t] rows this rank answers, source-major (as the ids arrived).
        recv_counts, send_counts: [N, T] int32 ids received from / sent to each (rank, table).
        dims: per table its width.
        order: [u] int32, the sort of this rank's distinct ids by (owner, table) they were sent in.
        table: [u] int32 table of each distinct id, in first-occurrence order (tables contiguous, in order).
        sizes: per table [] int32 distinct ids.
        alltoall: ``(tensor, splits [N]) -> (received, splits)``, the identity on one rank.
    Returns:
        per table, [u_t, dim_t] rows of its distinct ids in first-occurrence order.
    """
    n_ranks, n_tables = int(recv_counts.shape[0]), len(dims)
    pieces: list[list[tf.Tensor]] = [[] for _ in range(n_ranks)]
    for t, r in enumerate(rows):  # each source gets [its table-0 rows, its table-1 rows, ...] flattened
        for s, part in enumerate(tf.split(r, recv_counts[:, t], num=n_ranks)):
            pieces[s].append(tf.reshape(part, [-1]))
    answer = tf.concat([p for per_source in pieces for p in per_source], 0)
    width = tf.constant(dims, tf.int32)
    back, _ = alltoall(answer, tf.reduce_sum(recv_counts * width, 1))
    parts = tf.split(back, tf.reshape(send_counts * width, [-1]), num=n_ranks * n_tables)
    position = tf.dynamic_partition(order, tf.gather(table, order), n_tables)
    starts = tf.math.cumsum(tf.stack(sizes), exclusive=True)
    out = []
    for t, dim in enumerate(dims):
        sorted_rows = tf.concat([tf.reshape(parts[d * n_tables + t], [-1, dim]) for d in range(n_ranks)], 0)
        index = (position[t] - starts[t])[:, None]
        out.append(tf.scatter_nd(index, sorted_rows, tf.stack([sizes[t], dim])))  # [u_t, dim_t]
    return out


@tf.custom_gradient
def expand(distinct: tf.Tensor, inverse: tf.Tensor) -> tuple[tf.Tensor, Callable]:
    """``tf.gather(distinct, inverse)``: the rows of the distinct ids back in the order of all ids.

    Args:
        distinct: [u, dim] float32 rows of the distinct ids.
        inverse: [n] int32 position in ``distinct`` of each id.
    Returns:
        [n, dim] float32; its gradient is the dense [u, dim] segment sum of the [n, dim] upstream gradient
        over ``inverse`` (explicit, so that duplicates are summed here, before the backward alltoall, and no
        IndexedSlices reaches the exchange).
    """
    def grad(dy: tf.Tensor) -> tuple[tf.Tensor, None]:
        return tf.math.unsorted_segment_sum(dy, inverse, tf.shape(distinct)[0]), None

    return tf.gather(distinct, inverse), grad


def _counts(bucket: tf.Tensor, n_ranks: int, n_tables: int) -> tf.Tensor:
    """Occurrences of each bucket ``rank * n_tables + table``.

    Args:
        bucket: [m] int32 bucket ids in [0, n_ranks * n_tables).
    Returns:
        [n_ranks, n_tables] int32 counts.
    """
    counts = tf.math.unsorted_segment_sum(tf.ones_like(bucket), bucket, n_ranks * n_tables)
    return tf.reshape(counts, [n_ranks, n_tables])

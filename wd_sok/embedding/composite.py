"""Collections that hold both kinds of table: fixed ones in a backend, dynamic ones in hash tables.

:class:`CompositeEmbedding` delegates every per-table call to the part holding that feature, so the model, the
train step, checkpoints and export see one collection whatever mix of tables it has. It knows nothing of
the parts' kinds beyond :meth:`EmbeddingCollection.lookup`'s contract (a part whose ``call`` takes
``training`` gets it, through Keras).

:class:`ServingDynamic`: the serving model's dynamic tables (rank 0, export only): per table a
``MutableHashTable`` raw id -> row (saved in the SavedModel's variables, not as a graph constant, so a
large table stays out of the 2 GB graph proto) and a [capacity + 1, dim] variable whose row 0 is zero: an id
without a row (unknown, or never admitted in training) reads the zero row.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from wd_sok.embedding.base import EmbeddingCollection, Placement, RowMap, pool
from wd_sok.feature_spec import TableConfig

Ids = tf.Tensor | tf.RaggedTensor


class CompositeEmbedding(EmbeddingCollection):
    """One collection over ``parts`` (each a collection of some of ``tables``; ``tables`` in model order)."""

    def __init__(self, tables: list[TableConfig], parts: list[EmbeddingCollection], initializer: str, seed: int,
                 prefix: str, **kw) -> None:
        super().__init__(tables, initializer, seed, prefix, **kw)
        self.parts = list(parts)
        self._part_of = {name: i for i, part in enumerate(self.parts) for name in part.tables}
        missing = [t.name for t in tables if t.name not in self._part_of]
        if missing:
            raise ValueError(f"{prefix} embedding: no part holds table(s) {', '.join(missing)}")

    def part(self, name: str) -> EmbeddingCollection:
        """The part holding table ``name``."""
        return self.parts[self._part_of[name]]

    def call(self, ids: dict[str, Ids], training: bool | None = None) -> dict[str, tf.Tensor]:
        out: dict[str, tf.Tensor] = {}
        for part in self.parts:  # every part on every rank, in the same order: their collectives match
            out.update(part({n: ids[n] for n in part.tables}, training=training))
        return {n: out[n] for n in self.tables}

    def lookup(self, ids: dict[str, Ids]) -> dict[str, tf.Tensor]:
        return self.call(ids, training=False)

    def attach_optimizer(self, optimizer: tf.keras.optimizers.legacy.Optimizer | None) -> None:
        for part in self.parts:
            part.attach_optimizer(optimizer)

    def apply_own(self, pairs: list[tuple]) -> list[tuple]:
        for part in self.parts:
            pairs = part.apply_own(pairs)
        return pairs

    @property
    def sparse_variables(self) -> list[tf.Variable]:
        return [v for part in self.parts for v in part.sparse_variables]

    @property
    def dense_reduced_variables(self) -> list[tf.Variable]:
        return [v for part in self.parts for v in part.dense_reduced_variables]

    def placement(self, name: str) -> Placement:
        return self.part(name).placement(name)

    def local_bytes(self) -> int:
        return sum(part.local_bytes() for part in self.parts)

    def counters(self) -> dict[str, np.ndarray]:
        """Dynamic tables' counters (see :meth:`DynamicEmbedding.counters`)."""
        out: dict[str, np.ndarray] = {}
        for part in self.parts:
            out.update(part.counters())
        return out

    def table_variable(self, name: str) -> tf.Variable:
        return self.part(name).table_variable(name)

    def saved_rows(self, name: str) -> RowMap:
        return self.part(name).saved_rows(name)

    def owned(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.part(name).owned(name, rows)


class ServingDynamic(EmbeddingCollection):
    """Serving copies of dynamic tables: raw int64 id -> row by hash lookup, unknown ids -> the zero row."""

    def __init__(self, tables: list[TableConfig], seed: int, prefix: str, **kw) -> None:
        super().__init__(tables, "zeros", seed, prefix, **kw)
        self.index = {t.name: tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, 0,
                                                                      name=f"{prefix}_{t.name}_serving_index")
                      for t in tables}
        self.values = {t.name: tf.Variable(tf.zeros([t.cardinality + 1, t.dim]), name=f"{prefix}/{t.name}")
                       for t in tables}
        self.filled = dict.fromkeys(self.values, 0)

    @tf.autograph.experimental.do_not_convert
    def lookup(self, ids: dict[str, Ids]) -> dict[str, tf.Tensor]:
        out = {}
        for name, table in self.tables.items():
            x = ids[name]
            flat = tf.cast(x.flat_values if isinstance(x, tf.RaggedTensor) else x, tf.int64)
            vectors = tf.gather(self.values[name], tf.reshape(self.index[name].lookup(flat), tf.shape(flat)))
            out[name] = pool(x.with_flat_values(vectors) if isinstance(x, tf.RaggedTensor) else vectors,
                             table.combiner)
        return out

    def add(self, name: str, keys: tf.Tensor, values: tf.Tensor) -> None:
        """Append rows: [n] int64 ``keys`` with [n, dim] ``values`` (export streams them block by block)."""
        n = int(keys.shape[0])
        if n == 0:
            return
        start = self.filled[name] + 1
        rows = tf.range(start, start + n, dtype=tf.int64)
        self.index[name].insert(keys, rows)
        self.values[name].scatter_update(tf.IndexedSlices(tf.cast(values, tf.float32), rows))
        self.filled[name] += n

    @property
    def hash_tables(self) -> list[tf.lookup.experimental.MutableHashTable]:
        return list(self.index.values())

    def table_variable(self, name: str) -> tf.Variable:
        return self.values[name]

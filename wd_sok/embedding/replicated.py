"""Replicated backend: every rank holds every whole table (the reference's placement and the test oracle).

Under Horovod its gradients are allreduced like dense ones (IndexedSlices are allgathered), which is exactly
what stops the reference from scaling; on one process it is the plain single-device model.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from wd_sok.embedding.base import EmbeddingCollection, Placement, RowMap, fill_initial, pool, strided_rows
from wd_sok.feature_spec import TableConfig


class ReplicatedEmbedding(EmbeddingCollection):
    """Whole tables on every rank; lookups are local gathers (gradients are IndexedSlices).

    ``rank`` / ``world`` only decide which rows this rank writes to a checkpoint (``rank::world``: the ranks
    hold the same tables, so each saves a disjoint slice of them, in parallel).
    """

    def __init__(self, tables: list[TableConfig], initializer: str, seed: int, prefix: str, rank: int = 0,
                 world: int = 1, **kw) -> None:
        super().__init__(tables, initializer, seed, prefix, **kw)
        self.rank, self.world = rank, world
        self.weights_by_name: dict[str, tf.Variable] = {}
        for t in tables:
            var = tf.Variable(tf.zeros([t.cardinality, t.dim]), name=f"{prefix}/{t.name}", trainable=True)
            fill_initial(var, t, RowMap(0, 1, t.cardinality), seed, initializer)
            self.weights_by_name[t.name] = var

    @tf.autograph.experimental.do_not_convert  # see EmbeddingCollection.call
    def lookup(self, ids: dict[str, tf.Tensor | tf.RaggedTensor]) -> dict[str, tf.Tensor]:
        out = {}
        for name, table in self.tables.items():
            vectors = tf.gather(self.weights_by_name[name], tf.cast(ids[name], tf.int64))
            out[name] = pool(vectors, table.combiner)
        return out

    def table_variable(self, name: str) -> tf.Variable:
        return self.weights_by_name[name]

    def placement(self, name: str) -> Placement:
        return Placement("replicated")

    def saved_rows(self, name: str) -> RowMap:
        card = self.tables[name].cardinality
        return RowMap(start=self.rank, stride=self.world, count=strided_rows(card, self.rank, self.world),
                      vstart=self.rank, vstride=self.world)

    def owned(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every row, at its own index."""
        return np.ones(rows.shape, bool), rows

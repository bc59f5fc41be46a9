"""Replicated backend: every rank holds every whole table (the reference's placement and the test oracle).

Under Horovod its gradients are allreduced like dense ones (IndexedSlices are allgathered), which is exactly
what stops the reference from scaling; on one process it is the plain single-device model.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from wd_sok.embedding.base import (
    EmbeddingCollection,
    ensure_slots,
    initial_rows,
    pool,
    read_slot,
    slot_names,
    write_slot,
)
from wd_sok.feature_spec import TableConfig


class ReplicatedEmbedding(EmbeddingCollection):
    """Whole tables on every rank; lookups are local gathers (gradients are IndexedSlices)."""

    def __init__(self, tables: list[TableConfig], initializer: str, seed: int, prefix: str, **kw) -> None:
        super().__init__(tables, initializer, seed, prefix, **kw)
        self.weights_by_name: dict[str, tf.Variable] = {}
        for t in tables:
            init = initial_rows(t, np.arange(t.cardinality), seed, initializer)
            self.weights_by_name[t.name] = tf.Variable(init, name=f"{prefix}/{t.name}", trainable=True)

    @tf.autograph.experimental.do_not_convert  # see EmbeddingCollection.call
    def lookup(self, ids: dict[str, tf.Tensor | tf.RaggedTensor]) -> dict[str, tf.Tensor]:
        out = {}
        for name, table in self.tables.items():
            vectors = tf.gather(self.weights_by_name[name], tf.cast(ids[name], tf.int64))
            out[name] = pool(vectors, table.combiner)
        return out

    def export_tables(self, optimizer=None) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for name, var in self.weights_by_name.items():
            entry = {"value": var.numpy()}
            for slot in slot_names(optimizer):
                entry[slot] = read_slot(optimizer, var, slot).numpy()
            out[f"{self.prefix}/{name}"] = entry
        return out

    def import_tables(self, tables: dict[str, dict[str, np.ndarray]], optimizer=None) -> None:
        ensure_slots(optimizer, list(self.weights_by_name.values()))
        for name, var in self.weights_by_name.items():
            entry = tables[f"{self.prefix}/{name}"]
            var.assign(entry["value"])
            for slot in slot_names(optimizer):
                if slot in entry:  # absent when the checkpoint was written before the first step
                    write_slot(optimizer, var, slot, entry[slot])

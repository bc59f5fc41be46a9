"""The embedding seam: what every backend (replicated, sharded, SOK) provides to the model.

Contract (as in TensorFlow Recommenders): a Keras layer called with a dict of feature ids returns a dict of
pooled feature vectors. Ids are one-hot [B] ints or multi-hot tf.RaggedTensor [B, (k)]; outputs are [B, dim]
float32, multi-hot rows pooled by the table's combiner (sum, or mean = sum / row length; empty rows give 0).

Checkpoints never see placement: :meth:`export_tables` returns whole tables (global row order) with their
optimizer slots, and :meth:`import_tables` takes the same, whatever the backend and rank count that wrote them.
"""

from __future__ import annotations

import zlib

import numpy as np
import tensorflow as tf

from wd_sok.feature_spec import TableConfig
from wd_sok.optim import read_slot, slot_names, write_slot  # noqa: F401 - re-exported for the backends

ROW_BLOCK = 1 << 16  # rows per independently seeded initialisation block
GLOROT_TRUNC = 0.87962566103423978  # std of a standard normal truncated at +-2 (Keras' correction)


def table_seed(seed: int, name: str) -> int:
    """A 64-bit seed per (run seed, table name), independent of rank count."""
    return (int(seed) << 32) ^ zlib.crc32(name.encode())


def initial_rows(table: TableConfig, rows: np.ndarray, seed: int, kind: str) -> np.ndarray:
    """Initial values of the given global rows of ``table``: a pure function of (seed, table, row).

    Args:
        table: the table.
        rows: [n] int64 global row ids.
        seed: run seed.
        kind: "zeros" or "glorot_normal" (truncated at 2 std, std = sqrt(2 / (rows + dim)) / 0.8796).

    Returns:
        [n, dim] float32.
    """
    rows = np.asarray(rows, np.int64)
    out = np.zeros((rows.size, table.dim), np.float32)
    if kind == "zeros" or rows.size == 0:
        return out
    if kind != "glorot_normal":
        raise ValueError(f"unknown initializer {kind!r}")
    std = np.sqrt(2.0 / (table.cardinality + table.dim)) / GLOROT_TRUNC
    key = table_seed(seed, table.name)
    blocks = rows // ROW_BLOCK
    for block in np.unique(blocks):
        gen = np.random.Generator(np.random.Philox(key=[key & (2**64 - 1), int(block)]))
        n = int(min(ROW_BLOCK, table.cardinality - block * ROW_BLOCK))
        vals = gen.standard_normal((n, table.dim), dtype=np.float32)
        bad = np.abs(vals) > 2.0
        while bad.any():  # resample outside +-2 std, like a truncated normal
            vals[bad] = gen.standard_normal(int(bad.sum()), dtype=np.float32)
            bad = np.abs(vals) > 2.0
        sel = blocks == block
        out[sel] = vals[rows[sel] - block * ROW_BLOCK] * std
    return out


def pool(vectors: tf.Tensor | tf.RaggedTensor, combiner: str) -> tf.Tensor:
    """Pool looked-up vectors: [B, dim] passes through; ragged [B, (k), dim] -> [B, dim] by sum or mean."""
    if not isinstance(vectors, tf.RaggedTensor):
        return vectors
    summed = tf.reduce_sum(vectors, axis=1)
    if combiner == "mean":
        counts = tf.cast(tf.maximum(vectors.row_lengths(), 1), summed.dtype)
        summed = summed / counts[:, None]
    return summed


class EmbeddingCollection(tf.keras.layers.Layer):
    """Base class of the backends: a set of tables looked up by feature name.

    Args:
        tables: what each table is (name, cardinality, dim, hotness, combiner); names are feature names.
        initializer: "zeros" (wide part) or "glorot_normal" (deep part).
        seed: run seed for the initial rows.
        prefix: "wide" or "deep"; tables are checkpointed as ``<prefix>/<name>``.
    """

    def __init__(self, tables: list[TableConfig], initializer: str, seed: int, prefix: str, **kw) -> None:
        super().__init__(name=f"{prefix}_embeddings", **kw)
        self.tables = {t.name: t for t in tables}
        self.initializer, self.seed, self.prefix = initializer, seed, prefix

    def call(self, ids: dict[str, tf.Tensor | tf.RaggedTensor]) -> dict[str, tf.Tensor]:
        """Pooled vectors ``{name: [B, dim] float32}`` for one-hot [B] or ragged [B, (k)] ids."""
        return self.lookup(ids)

    def lookup(self, ids: dict[str, tf.Tensor | tf.RaggedTensor]) -> dict[str, tf.Tensor]:
        """What :meth:`call` does. Backends decorate it with ``do_not_convert``: lookups are plain Python
        over tables, with no tensor-dependent control flow for AutoGraph to convert (and once, in a long
        test session, AutoGraph's cache of converted functions handed back a stale conversion here)."""
        raise NotImplementedError

    # ---- what a backend exposes to training and checkpoints
    @property
    def sparse_variables(self) -> list[tf.Variable]:
        """Variables whose gradients must NOT be dense-allreduced (sharded tables); [] when replicated."""
        return []

    def local_bytes(self) -> int:
        """Bytes of embedding values held by this rank."""
        return int(sum(np.prod(v.shape) * v.dtype.size for v in self.trainable_variables))

    def export_tables(self, optimizer: tf.keras.optimizers.legacy.Optimizer | None
                      ) -> dict[str, dict[str, np.ndarray]]:
        """``{"<prefix>/<name>": {"value": [rows, dim], "<slot>": [rows, dim], ...}}`` in global row order."""
        raise NotImplementedError

    def import_tables(self, tables: dict[str, dict[str, np.ndarray]],
                      optimizer: tf.keras.optimizers.legacy.Optimizer | None) -> None:
        """Load whole tables (and slots) written by any backend and rank count."""
        raise NotImplementedError


def ensure_slots(optimizer: tf.keras.optimizers.legacy.Optimizer | None, variables: list[tf.Variable]) -> None:
    """Create the optimizer's slots for ``variables`` now (legacy optimizers create them lazily)."""
    if optimizer is not None and variables:
        with tf.init_scope():
            optimizer._create_all_weights(variables)  # noqa: SLF001 - the legacy API's only way

"""The embedding seam: what every backend (replicated, sharded, SOK) provides to the model.

Contract (as in TensorFlow Recommenders): a Keras layer called with a dict of feature ids returns a dict of
pooled feature vectors. Ids are one-hot [B] ints or multi-hot tf.RaggedTensor [B, (k)]; outputs are [B, dim]
float32, multi-hot rows pooled by the table's combiner (sum, or mean = sum / row length; empty rows give 0).

Checkpoints never see placement and never gather a table: per table, a backend says which global rows this
rank saves and where they sit in its variable (:meth:`EmbeddingCollection.saved_rows`, a :class:`RowMap`), and
which global rows it owns on restore (:meth:`EmbeddingCollection.owned`). ``wd_sok.checkpoint`` streams those
rows, block by block, to and from per-rank files whose manifest records every row's global id, so a checkpoint
written under N ranks and one backend restores under M ranks and another.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from wd_sok.embedding.plan import ROW_WISE, Placement  # noqa: F401 - re-exported for the backends
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




@dataclass(frozen=True)
class RowMap:
    """The rows of one table a rank saves: saved row ``i`` (``0 <= i < count``) is global row
    ``start + i * stride`` and sits at row ``vstart + i * vstride`` of the rank's variable.

    Sharded (row g on rank g % N): ``start = rank, stride = N``, the whole local variable (``vstart 0,
    vstride 1``). Replicated under N ranks: every rank holds the whole table but saves only rows
    ``rank::N`` (``vstart = rank, vstride = N``), so the ranks write in parallel and nothing twice.
    """

    start: int
    stride: int
    count: int
    vstart: int = 0
    vstride: int = 1

    def global_rows(self, lo: int, hi: int) -> np.ndarray:
        """[hi - lo] int64 global ids of saved rows lo..hi-1."""
        return self.start + np.arange(lo, hi, dtype=np.int64) * self.stride

    def var_slice(self, lo: int, hi: int) -> slice:
        """The variable rows holding saved rows lo..hi-1 (a strided slice)."""
        return slice(self.vstart + lo * self.vstride, self.vstart + hi * self.vstride, self.vstride)


def strided_rows(cardinality: int, rank: int, world: int) -> int:
    """Rows ``rank, rank + world, ...`` below ``cardinality``: ceil((cardinality - rank) / world)."""
    return max(0, -(-(cardinality - rank) // world))


def fill_initial(var: tf.Variable, table: TableConfig, rows: RowMap, seed: int, kind: str) -> None:
    """Write the initial values of ``rows`` into ``var`` one :data:`ROW_BLOCK` of rows at a time.

    The variable is created with zeros; no second full-size copy of it (numpy or tf.constant) ever exists:
    the memory this adds is one block of [ROW_BLOCK, dim] float32 (plus one Philox block while drawing).
    """
    if kind == "zeros":
        return
    for lo in range(0, rows.count, ROW_BLOCK):
        hi = min(rows.count, lo + ROW_BLOCK)
        values = initial_rows(table, rows.global_rows(lo, hi), seed, kind)
        sl = rows.var_slice(lo, hi)
        var.scatter_update(tf.IndexedSlices(values, tf.range(sl.start, sl.stop, sl.step, dtype=tf.int64)))


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
    def attach_optimizer(self, optimizer: tf.keras.optimizers.legacy.Optimizer | None) -> None:
        """The optimizer owning these tables' slots (dynamic tables reset a row's slots when it changes key)."""

    def apply_own(self, pairs: list[tuple]) -> list[tuple]:
        """Apply the (grad, var) pairs of variables this collection updates itself (SOK's dynamic tables,
        through its optimizer wrapper); return the others, for the plain optimizer."""
        return pairs

    def counters(self) -> dict[str, np.ndarray]:
        """Dynamic tables' running [inserts, admissions, evictions, rows in use] on this rank; {} for fixed ones."""
        return {}

    @property
    def sparse_variables(self) -> list[tf.Variable]:
        """Variables whose gradients must NOT be dense-allreduced (sharded tables); [] when replicated."""
        return []

    @property
    def dense_reduced_variables(self) -> list[tf.Variable]:
        """Replicated tables whose gradient is cheaper reduced dense (a dense allreduce of [rows, dim]) than
        as the allgather of the touched rows; the train step densifies their gradients before reducing."""
        return []

    def placement(self, name: str) -> Placement:
        """Where table ``name`` lives (recorded in checkpoint manifests; restore may use another)."""
        return ROW_WISE

    def local_bytes(self) -> int:
        """Bytes of embedding values held by this rank."""
        return int(sum(np.prod(v.shape) * v.dtype.size for v in self.trainable_variables))

    # ---- what a backend exposes to checkpoints and export (never a whole table it does not own)
    def table_variable(self, name: str) -> tf.Variable:
        """The variable holding this rank's rows of table ``name``."""
        raise NotImplementedError

    def saved_rows(self, name: str) -> RowMap:
        """Which global rows of ``name`` this rank writes to a checkpoint, and where they sit in its variable."""
        raise NotImplementedError

    def owned(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of global ``rows`` [n] int64, which this rank holds: ([n] bool mask, [m] int64 variable rows of the
        masked ones, in order)."""
        raise NotImplementedError


def ensure_slots(optimizer: tf.keras.optimizers.legacy.Optimizer | None, variables: list[tf.Variable]) -> None:
    """Create the optimizer's slots for ``variables`` now (legacy optimizers create them lazily)."""
    if optimizer is not None and variables:
        with tf.init_scope():
            optimizer._create_all_weights(variables)  # noqa: SLF001 - the legacy API's only way

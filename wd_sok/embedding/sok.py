"""SOK backend: the same model-parallel placement on GPUs with Merlin Sparse Operation Kit 2.x (merlin-sok).

``sparse_operation_kit`` is imported only when a :class:`SokEmbedding` is built (never at package import), so
this module imports cleanly on CPU-only machines; building one there raises a clear error.

SOK 2.x functions relied on (sparse_operation_kit/__init__.py, distributed_variable.py, lookup.py):

* ``sok.init(comm_tool="horovod", use_legacy_optimizer=...)`` after ``hvd.init()``; it may run only once per
  process (its ``set_comm_tool`` raises on a second call), hence :func:`init_sok`'s guard. We pass
  ``use_legacy_optimizer=False`` where accepted: True would rebind ``tf.keras.optimizers`` to the legacy
  module, breaking this project's explicit ``tf.keras.optimizers.legacy.*`` references.
* ``sok.Variable(shape=[rows, dim], initializer=f, dtype=tf.float32)`` -> ``DistributedVariable`` (a
  ResourceVariable) holding rows ``g % N == rank`` at local row ``g // N``, local size
  ``rows // N + (rank < rows % N)`` = ceil((rows - rank) / N); ``f(shape=(local, dim), dtype)`` makes its
  value: we return :func:`initial_rows` of exactly this rank's rows (values independent of N), and check
  the resulting shape so a different placement fails loudly instead of silently mis-checkpointing.
* ``sok.lookup_sparse(params, sp_ids, combiners=...)`` -> one fused lookup for all tables (ids of every
  table are allgathered, looked up by their owners and returned by alltoall); ids are int64
  tf.RaggedTensor [B, (k)] (one-hot as rows of 1). Its gradient is an IndexedSlices on the local variable
  (local rows), already summed over ranks, so plain legacy Keras optimizers (FTRL, RMSprop) apply it.
  We always ask for "sum" and divide by the row length ourselves for "mean", so empty multi-hot rows give
  0 exactly as :func:`pool` does, whatever SOK does with them.
* ``sok.filter_variables(vars) -> (sok_vars, other_vars)``: :attr:`sparse_variables` (never allreduced).

Checkpoints do not use SOK's ``sok.dump`` / ``sok.load``: each rank streams its own rows and slots to its own
files in wd-sok's sharded format (``wd_sok.checkpoint``, through :class:`RowShardedCollection`'s row maps),
exactly as the sharded backend does, so checkpoints move between SOK, CPU backends and rank counts. The
initial rows are written the same way: ``sok.Variable`` starts from zeros and :func:`fill_initial` writes
them block by block (no full-shard tf.constant).
"""

from __future__ import annotations

import inspect
from types import ModuleType

import tensorflow as tf

from wd_sok.distributed import Runtime
from wd_sok.embedding.base import fill_initial
from wd_sok.embedding.sharded import Ids, RowShardedCollection, checked_ids, local_rows
from wd_sok.feature_spec import TableConfig

_SOK_READY = False


def init_sok(runtime: Runtime) -> ModuleType:
    """Import SOK and initialise it once per process (after ``hvd.init()``); returns the module.

    Raises ValueError (a configuration error, reported by main.py as such) when SOK or Horovod is missing.
    """
    global _SOK_READY
    try:
        import sparse_operation_kit as sok
    except Exception as e:  # ImportError, or its loader failing to find CUDA / libsparse_operation_kit.so
        raise ValueError(f"--embedding_backend sok needs Merlin SOK 2.x (pip merlin-sok) and a GPU: "
                           f"importing sparse_operation_kit failed ({e})") from None
    if not _SOK_READY:
        if runtime.hvd is None:
            raise ValueError("--embedding_backend sok needs Horovod (SOK communicates through it)")
        kwargs = {}
        if "use_legacy_optimizer" in inspect.signature(sok.init).parameters:
            kwargs["use_legacy_optimizer"] = False
        try:
            sok.init(**kwargs)
        except RuntimeError as e:  # initialised by someone else in this process already
            if "more than once" not in str(e):
                raise
        _SOK_READY = True
    return sok


class SokEmbedding(RowShardedCollection):
    """Tables as SOK distributed variables (row g on GPU g % N), looked up with ``sok.lookup_sparse``.

    Args:
        tables: the tables (feature names, cardinalities, widths, combiners).
        initializer: "zeros" or "glorot_normal" (see :func:`initial_rows`).
        seed: run seed.
        prefix: "wide" or "deep".
        runtime: rank and world size (Horovod initialised).
    """

    def __init__(self, tables: list[TableConfig], initializer: str, seed: int, prefix: str,
                 runtime: Runtime, **kw) -> None:
        super().__init__(tables, initializer, seed, prefix, runtime, **kw)
        sok = init_sok(runtime)
        for t in tables:
            def init(shape: tuple, dtype: tf.DType | None = None) -> tf.Tensor:
                return tf.zeros(shape, dtype or tf.float32)  # the initial rows follow block by block

            var = sok.Variable(shape=[t.cardinality, t.dim], initializer=init, dtype=tf.float32,
                                    name=f"{prefix}_{t.name}")
            expected = (local_rows(t.cardinality, self.rank, self.world).size, t.dim)
            if tuple(var.shape) != expected:
                raise RuntimeError(f"SOK placed {tuple(var.shape)} rows of table '{prefix}/{t.name}' on rank "
                                   f"{self.rank}, expected {expected} (row g on rank g % N): unsupported SOK")
            fill_initial(var, t, self.saved_rows(t.name), seed, initializer)
            self.shards[t.name] = var

    @tf.autograph.experimental.do_not_convert  # see EmbeddingCollection.call
    def lookup(self, ids: dict[str, Ids]) -> dict[str, tf.Tensor]:
        """Pooled vectors ``{name: [B, dim] float32}`` for one-hot [B] or ragged [B, (k)] ids."""
        if not self.names:
            return {}
        ragged = []
        for name in self.names:
            x, table = ids[name], self.tables[name]
            values = checked_ids(x, table, self.prefix)
            if isinstance(x, tf.RaggedTensor):
                ragged.append(tf.RaggedTensor.from_row_splits(values, tf.cast(x.row_splits, tf.int64),
                                                              validate=False))
            else:  # one-hot [B]: rows of exactly one id
                ragged.append(tf.RaggedTensor.from_tensor(values[:, None]))
        vectors = init_sok(self.runtime).lookup_sparse([self.shards[n] for n in self.names], ragged,
                                         combiners=["sum"] * len(self.names))
        out = {}
        for name, r, v in zip(self.names, ragged, vectors, strict=True):
            if self.tables[name].combiner == "mean":
                v = v / tf.cast(tf.maximum(r.row_lengths(), 1), v.dtype)[:, None]
            out[name] = v
        return out

    @property
    def sparse_variables(self) -> list[tf.Variable]:
        """The SOK variables (``sok.filter_variables``): gradients already global, never allreduced."""
        sok_vars, _ = init_sok(self.runtime).filter_variables(list(self.shards.values()))
        return sok_vars

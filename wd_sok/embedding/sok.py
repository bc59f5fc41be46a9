"""SOK backend: the same model-parallel placement on GPUs with Merlin Sparse Operation Kit 2.x (merlin-sok).

``sparse_operation_kit`` is imported only when a :class:`SokEmbedding` is built or ``--embedding_backend auto``
is resolved on a GPU machine (never at package import), so this module imports cleanly on CPU-only machines.
Only SOK >= 2.0 with its top-level API is supported (:func:`check_sok`): a ValueError naming the version found
and the one needed otherwise (main.py prints it as ``wd-sok: error: ...`` and exits 2).

Evidence, read from NVIDIA-Merlin/HugeCTR ``sparse_operation_kit/`` (paths below are relative to it; ``pkg/`` =
``sparse_operation_kit/sparse_operation_kit/``; lines at tag v24.06.00 unless another tag is named). No GPU
has run this module: it is right by these readings and by the CPU tests of everything around it
(tests/test_sok_backend.py runs it where SOK and a GPU exist).

* Versions and where the API lives. v23.08.00 is legacy SOK 1.2.0 (``pkg/core/_version.py:17-21``, exported as
  ``sok.__version__`` at ``pkg/__init__.py:19``); its top level has ``Init``, ``DistributedEmbedding``, ...
  (``pkg/__init__.py:35-42``) and the 2.x-style API only under ``sparse_operation_kit.experiment``
  (``pkg/experiment/__init__.py:62`` lookup_sparse, ``:73`` init, ``:128`` filter_variables). From v23.12.00
  (2.0.0) and v24.06.00 (2.1.0 = merlin-sok 2.1.0) it is top level: ``pkg/_version.py:17-21``, imported at
  ``pkg/__init__.py:49``, with ``Variable`` ``:55``, ``lookup_sparse`` ``:68``, ``dump, load`` ``:71``.
* ``sok.init(comm_tool="horovod", use_legacy_optimizer=True)`` (``pkg/__init__.py:75``, both 2.x tags), after
  ``hvd.init()``; it calls ``set_comm_tool`` (``:127``), which raises RuntimeError "cannot be set more than
  once" on a second call (``pkg/communication.py:173-181``, same file at v23.12.00 and v24.06.00): hence
  :func:`init_sok`'s once-only guard. We pass ``use_legacy_optimizer=False``: True rebinds
  ``tf.keras.optimizers`` to the legacy module (``pkg/__init__.py:119-123``), breaking this project's explicit
  ``tf.keras.optimizers.legacy.*`` references.
* ``sok.Variable(shape=[rows, dim], initializer=f, dtype=tf.float32)`` -> ``DistributedVariable`` (a
  ResourceVariable, ``pkg/distributed_variable.py:111-114``, ``:126``) with local size ``rows // N + (gpu <
  rows % N)`` (``:192-194``); it calls ``f(shape=(local, dim), dtype=dtype)`` (``:196``) and maps global id g
  to local row ``g // N`` (``key_map``, ``:231-232``); g lives on GPU ``g % N`` (``indices * num_gpus +
  global_gpu_id`` when it slices an initial value, ``:181-182``; the docstring example ``:51-58``). We return
  :func:`initial_rows` of exactly this rank's rows (values independent of N) and check the resulting shape,
  so a different placement fails loudly.
* ``sok.lookup_sparse(params, sp_ids, combiners=...)`` (``pkg/lookup.py:532``; impl ``:415``; v23.12.00 ``:507``
  / ``:390``): one fused lookup for all tables. It allgathers every rank's row lengths (``:481``) and keys, and
  derives the batch from their count: ``HotnessCalculate`` requires ``len % (lookups x GPUs) == 0`` and takes
  ``local_batchsize = len / lookups / GPUs`` (``kit_src/lookup/kernels/embedding_collection.cc:190-193``),
  ``LookupForward`` takes ``global_batch_size = len / lookups`` (``:447``) and ``PostprocessingForward``
  ``global_batch_size = local rows x num_gpus`` (``:852``; v23.12.00 ``:191``, ``:445``, ``:850``). So every rank
  must feed the same number of rows in every call: wd_sok/train.py pads evaluation batches to the local eval
  batch with masked rows (:func:`wd_sok.data.batch.pad_batch`), runs equal step counts everywhere, and
  training batches are always full (drop_last, steps agreed over ranks). Ids are int64 tf.RaggedTensor
  [B, (k)] (one-hot as rows of 1); padding rows are id 0 or empty rows. We always ask for "sum" and divide by
  the row length ourselves for "mean", so empty multi-hot rows give 0 exactly as :func:`pool` does.
* Gradients (``pkg/lookup.py:223-256``, v23.12.00 ``:198-231``): the vectors come back by alltoall (``:521``),
  so the backward op receives one gradient block per GPU (``top_grads[:num_gpus]``, ``:242``) and returns
  ``tf.IndexedSlices`` on the local variable with indices ``g // N`` (``:253-255``): local rows, already summed
  over every rank's samples. So plain legacy Keras optimizers (FTRL, RMSprop) apply them and they are never
  allreduced.
* ``sok.filter_variables(vars) -> (sok_vars, other_vars)`` (``pkg/__init__.py:131-182``: DistributedVariable,
  LocalizedVariable and DynamicVariable are SOK's): :attr:`sparse_variables`.

Not used: ``sok.dump`` / ``sok.load`` (``pkg/dump_load.py:1134`` / ``:1216``) handle only the optimizers named in
``optimizer_names = ["SGD", "Adamax", "Adadelta", "Adagrad", "Ftrl", "Adam"]`` (``pkg/dump_load.py:54``;
v23.12.00 ``:51``; any other raises, ``:125-141``): FTRL slots would be saved, but not RMSprop, the deep tables'
optimizer. And for a ``sok.Variable`` the dump allgathers every table's global keys (``local * N + gpu``) and
rows in rounds to GPU 0, which alone writes the files (``:541``, ``:561``, ``:569-570``, ``:603-612``): the
whole-table gather on one rank that per-rank checkpoints avoid. Instead each rank streams its own rows and
slots to its own files in wd-sok's sharded format (``wd_sok.checkpoint``, through :class:`RowShardedCollection`'s
row maps), exactly as the sharded backend does, so checkpoints move between SOK, CPU backends and rank counts.
The initial rows are written the same way: ``sok.Variable`` starts from zeros and :func:`fill_initial` writes
them block by block (no full-shard tf.constant). Also not used: ``sok.DynamicVariable`` (hash tables; needs
``sok.OptimizerWrapper``), ``sp_weights``, ``sok.all2all_dense_embedding``, ``sok.incremental_model_dump``
(v24.06.00): wd-sok's tables have fixed sizes.
"""

from __future__ import annotations

import inspect
from types import ModuleType

import tensorflow as tf

from wd_sok.distributed import Runtime
from wd_sok.embedding.base import Placement, fill_initial, pool
from wd_sok.embedding.sharded import Ids, RowShardedCollection, checked_ids, expand
from wd_sok.feature_spec import TableConfig

_SOK_READY = False
MIN_VERSION = (2, 0)
API = ("init", "Variable", "lookup_sparse", "filter_variables")


def parse_version(version: str) -> tuple[int, ...]:
    """``"2.1.0"`` -> (2, 1, 0); leading digits of each part only (``"2.1.0rc1"`` -> (2, 1, 0)); () if none."""
    out = []
    for part in str(version).split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_sok(sok: ModuleType) -> str:
    """The version of an imported ``sparse_operation_kit``; ValueError (one line) unless it is >= 2.0 with the
    top-level API this backend calls (legacy SOK 1.x has it only under ``sparse_operation_kit.experiment``)."""
    version = str(getattr(sok, "__version__", "unknown"))
    missing = [name for name in API if not hasattr(sok, name)]
    parsed = parse_version(version)
    if missing or not parsed or parsed < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        lacks = f" (no top-level {', '.join('sok.' + m for m in missing)})" if missing else ""
        raise ValueError(f"--embedding_backend sok needs Merlin SOK >= {need} (merlin-sok); found "
                         f"sparse_operation_kit {version}{lacks}: use the image of this repo's Dockerfile "
                         f"(merlin-sok 2.1.0), or --embedding_backend sharded")
    return version


def supported_sok() -> str | None:
    """The version of an importable, supported SOK (what ``--embedding_backend auto`` picks sok for), else None.

    Imports ``sparse_operation_kit`` (on a GPU machine, where ``auto`` asks); any failure counts as absent."""
    try:
        import sparse_operation_kit as sok
    except Exception:  # ImportError, or its loader failing to find CUDA / libsparse_operation_kit.so
        return None
    try:
        return check_sok(sok)
    except ValueError:
        return None


def init_sok(runtime: Runtime) -> ModuleType:
    """Import SOK, check its version and initialise it once per process (after ``hvd.init()``).

    Raises ValueError (a configuration error, reported by main.py as such) when SOK is missing, older than 2.0
    or lacks its top-level 2.x API, or when Horovod is missing.
    """
    global _SOK_READY
    try:
        import sparse_operation_kit as sok
    except Exception as e:  # ImportError, or its loader failing to find CUDA / libsparse_operation_kit.so
        raise ValueError(f"--embedding_backend sok needs Merlin SOK 2.x (pip merlin-sok) and a GPU: "
                         f"importing sparse_operation_kit failed ({e})") from None
    check_sok(sok)
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
    """Tables as SOK variables looked up with ``sok.lookup_sparse``: row-wise tables are SOK distributed
    variables (row g on GPU g % N), table-wise ones SOK localized variables (``mode="localized:<owner>"``:
    the whole table on the owner, ``[0, dim]`` elsewhere, ids not remapped: ``pkg/distributed_variable.py``
    ``LocalizedVariable``, ``:247-338`` at v24.06.00); replicated tables are plain variables gathered locally
    (their gradients reduced with the dense weights), as in the sharded backend.

    Args:
        tables: the tables (feature names, cardinalities, widths, combiners).
        initializer: "zeros" or "glorot_normal" (see :func:`initial_rows`).
        seed: run seed.
        prefix: "wide" or "deep".
        runtime: rank and world size (Horovod initialised).
        placements: feature -> :class:`Placement` (row-wise when absent).
    """

    def __init__(self, tables: list[TableConfig], initializer: str, seed: int, prefix: str,
                 runtime: Runtime, placements: dict[str, Placement] | None = None, **kw) -> None:
        super().__init__(tables, initializer, seed, prefix, runtime, placements, **kw)
        sok = init_sok(runtime)
        for t in tables:
            where = self.placements[t.name]
            if where.kind == "replicated":
                self.shards[t.name] = self.new_shard(t)
                continue

            def init(shape: tuple, dtype: tf.DType | None = None) -> tf.Tensor:
                return tf.zeros(shape, dtype or tf.float32)  # the initial rows follow block by block

            mode = "distributed" if where.kind == "row_wise" else f"localized:{where.owner}"
            var = sok.Variable(shape=[t.cardinality, t.dim], initializer=init, dtype=tf.float32,
                               name=f"{prefix}_{t.name}", mode=mode)
            expected = (self.held_rows(t.name), t.dim)
            if tuple(var.shape) != expected:
                raise RuntimeError(f"SOK placed {tuple(var.shape)} rows of table '{prefix}/{t.name}' on rank "
                                   f"{self.rank}, expected {expected} ({mode}): unsupported SOK")
            fill_initial(var, t, self.saved_rows(t.name), seed, initializer)
            self.shards[t.name] = var
        self.exchanged = [n for n in self.names if self.placements[n].kind != "replicated"]

    @tf.autograph.experimental.do_not_convert  # see EmbeddingCollection.call
    def lookup(self, ids: dict[str, Ids]) -> dict[str, tf.Tensor]:
        """Pooled vectors ``{name: [B, dim] float32}`` for one-hot [B] or ragged [B, (k)] ids."""
        if not self.names:
            return {}
        out = {}
        for name in self.names:
            if name not in self.exchanged:  # replicated: a local gather of the distinct ids
                x, table = ids[name], self.tables[name]
                uniq, inverse = tf.unique(checked_ids(x, table, self.prefix), out_idx=tf.int32)
                v = expand(tf.gather(self.shards[name], uniq), inverse)
                out[name] = (pool(x.with_flat_values(v), table.combiner) if isinstance(x, tf.RaggedTensor)
                             else tf.reshape(v, tf.concat([tf.shape(x, out_type=tf.int32), [table.dim]], 0)))
        if not self.exchanged:
            return out
        ragged = []
        for name in self.exchanged:
            x, table = ids[name], self.tables[name]
            values = checked_ids(x, table, self.prefix)
            if isinstance(x, tf.RaggedTensor):
                ragged.append(tf.RaggedTensor.from_row_splits(values, tf.cast(x.row_splits, tf.int64),
                                                              validate=False))
            else:  # one-hot [B]: rows of exactly one id
                ragged.append(tf.RaggedTensor.from_tensor(values[:, None]))
        vectors = init_sok(self.runtime).lookup_sparse([self.shards[n] for n in self.exchanged], ragged,
                                                       combiners=["sum"] * len(self.exchanged))
        for name, r, v in zip(self.exchanged, ragged, vectors, strict=True):
            if self.tables[name].combiner == "mean":
                v = v / tf.cast(tf.maximum(r.row_lengths(), 1), v.dtype)[:, None]
            out[name] = v
        return out

    @property
    def sparse_variables(self) -> list[tf.Variable]:
        """The SOK variables (``sok.filter_variables``): gradients already global, never allreduced."""
        sok_vars, _ = init_sok(self.runtime).filter_variables([self.shards[n] for n in self.exchanged])
        return sok_vars

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
them block by block (no full-shard tf.constant). Dynamic (hash-table) features use ``sok.DynamicVariable``
with ``sok.OptimizerWrapper``: :class:`SokDynamicEmbedding`. Not used: ``sp_weights``,
``sok.all2all_dense_embedding``, ``sok.incremental_model_dump`` (v24.06.00).
"""

from __future__ import annotations

import inspect
import sys
from types import ModuleType

import numpy as np
import tensorflow as tf
from packaging.version import InvalidVersion, Version

from wd_sok.distributed import Runtime
from wd_sok.embedding.base import EmbeddingCollection, Placement, fill_initial, pool
from wd_sok.embedding.sharded import Ids, RowShardedCollection, checked_ids, expand
from wd_sok.feature_spec import TableConfig
from wd_sok.optim import LazyRMSprop

_SOK_READY = False
MIN_VERSION = Version("2.0")
API = ("init", "Variable", "lookup_sparse", "filter_variables")


def parse_version(version: str) -> Version | None:
    """``version`` as a PEP 440 version (``packaging.version``: ``"2.0.0rc1"`` is a pre-release, older than
    2.0; ``"2.1.0+cuda12"`` is 2.1.0 with a local tag), or None if it is not one (``"unknown"``, "")."""
    try:
        return Version(str(version))
    except InvalidVersion:
        return None


def check_sok(sok: ModuleType) -> str:
    """The version of an imported ``sparse_operation_kit``; ValueError (one line) unless it is >= 2.0 with the
    top-level API this backend calls (legacy SOK 1.x has it only under ``sparse_operation_kit.experiment``)."""
    version = str(getattr(sok, "__version__", "unknown"))
    missing = [name for name in API if not hasattr(sok, name)]
    parsed = parse_version(version)
    if missing or parsed is None or parsed < MIN_VERSION:
        need = str(MIN_VERSION)
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


def sok_pooled(runtime: Runtime, variables: dict[str, tf.Variable], ids: dict[str, Ids], values: list[tf.Tensor],
               tables: dict[str, TableConfig], find_only: bool = False) -> dict[str, tf.Tensor]:
    """One fused ``sok.lookup_sparse`` over ``variables`` (feature -> SOK variable, in lookup order).

    Args:
        ids: per feature its one-hot [B] or ragged [B, (k)] ids (for the row structure).
        values: per feature of ``variables``, its flat [n] int64 ids, already checked.
        find_only: look up without inserting (dynamic tables built with ``filter_ratio=0``, see
            :class:`SokDynamicEmbedding`): unknown ids add nothing, as the zero row.
    Returns:
        ``{feature: [B, dim] float32}``, pooled by the table's combiner: SOK sums and we divide by the row
        length for "mean", so empty rows give 0 as :func:`pool` does.
    """
    ragged = []
    for name, v in zip(variables, values, strict=True):
        x = ids[name]
        ragged.append(tf.RaggedTensor.from_row_splits(v, tf.cast(x.row_splits, tf.int64), validate=False)
                      if isinstance(x, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(v[:, None]))  # one-hot
    extra = {"use_low_frequency_filter": True} if find_only else {}
    vectors = init_sok(runtime).lookup_sparse(list(variables.values()), ragged, combiners=["sum"] * len(ragged),
                                              **extra)
    out = {}
    for name, r, v in zip(variables, ragged, vectors, strict=True):
        if tables[name].combiner == "mean":
            v = v / tf.cast(tf.maximum(r.row_lengths(), 1), v.dtype)[:, None]
        out[name] = v
    return out


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
        values = [checked_ids(ids[n], self.tables[n], self.prefix) for n in self.exchanged]
        out.update(sok_pooled(self.runtime, {n: self.shards[n] for n in self.exchanged}, ids, values, self.tables))
        return out

    @property
    def sparse_variables(self) -> list[tf.Variable]:
        """The SOK variables (``sok.filter_variables``): gradients already global, never allreduced."""
        sok_vars, _ = init_sok(self.runtime).filter_variables([self.shards[n] for n in self.exchanged])
        return sok_vars



HKV_BUCKET = 128  # keys per HKV bucket (max_bucket_size, kit/variable/impl/variable_base.cu:65)
FILTER_TAG = "v25.03.00"  # the first HugeCTR tag whose lookup_sparse can look up without inserting


def find_only_lookup(sok: ModuleType) -> bool:
    """Whether ``sok.lookup_sparse`` takes ``use_low_frequency_filter`` (HugeCTR v25.03.00's SOK; the PyPI
    merlin-sok 2.1.0, built from 24.06, does not, with the same version string)."""
    try:
        return "use_low_frequency_filter" in inspect.signature(sok.lookup_sparse).parameters
    except (TypeError, ValueError):
        return False


def sok_refusal(table: TableConfig, world: int) -> str | None:
    """Why SOK's ``DynamicVariable`` cannot hold ``table`` as its spec says under ``world`` GPUs (one line), or
    None when it can: ``min_count: 1`` (SOK has no admission count), ``evict: lru`` (a full HKV table evicts its
    least recently used keys, kLru), ``capacity / world`` a power of two >= 128 (HKV's ``max_capacity`` per GPU,
    powers of two, whole 128-key buckets) and a SOK with the find-only lookup (v25.03.00)."""
    d = table.dynamic
    if d is None:
        return "not a dynamic table"
    if d.min_count != 1:
        return f"min_count {d.min_count}: SOK has no admission count (min_count: 1 only)"
    if d.evict != "lru":
        return (f"evict: {d.evict}: a full SOK (HKV) table evicts its least recently used keys, so it holds "
                "evict: lru only")
    share = d.capacity // max(world, 1)
    if d.capacity % max(world, 1) or share < HKV_BUCKET or share & (share - 1):
        return (f"capacity {d.capacity} over {world} GPU(s) is not a power of two >= {HKV_BUCKET} per GPU "
                "(SOK's max_capacity)")
    sok = sys.modules.get("sparse_operation_kit")
    if sok is None:
        try:
            import sparse_operation_kit as sok
        except Exception:  # no SOK: init_sok says so when the backend is built
            return None
    if not find_only_lookup(sok):
        return (f"this SOK's lookup_sparse cannot look up without inserting (HugeCTR {FILTER_TAG}'s "
                "use_low_frequency_filter): use the image of this repo's Dockerfile")
    return None


def sok_can_hold(table: TableConfig, world: int = 1) -> bool:
    """Whether SOK's DynamicVariable implements ``table``'s rules under ``world`` GPUs (:func:`sok_refusal`)."""
    return sok_refusal(table, world) is None


class SokDynamicEmbedding(EmbeddingCollection):
    """Dynamic tables as ``sok.DynamicVariable`` HKV hash tables (key k on GPU ``k % N``), for the tables SOK
    can hold as the spec says (:func:`sok_refusal`): ``min_count: 1``, ``evict: lru``, a power-of-two share.

    Read from NVIDIA-Merlin/HugeCTR at tag v25.03.00 (``pkg/`` = ``sparse_operation_kit/sparse_operation_kit/``,
    ``kit/`` = ``sparse_operation_kit/kit_src/``); tests/fake_sok.py follows the same lines, each cited there.

    * ``sok.DynamicVariable(dimension, initializer, var_type="hybrid", key_type=tf.int64, init_capacity=C,
      max_capacity=C, filter_ratio=0.0)`` with C = capacity / N, per GPU (``pkg/dynamic_variable.py:99-138``;
      the keyword arguments go to ``kit/variable/impl/variable_base.cu:42-99``). "hybrid" is HKV: a table of
      at most ``max_capacity`` keys (powers of two, ``pkg/dynamic_variable.py:67``; whole 128-key buckets)
      that evicts its least recently used keys when full (kLru, ``variable_base.cu:85``; per bucket, so a
      little before the whole table is full). The "hbm" DET table ignores every capacity (fixed 2E4 start,
      ``variable_base.cu:39-40``, then doubling without limit), so it cannot honour ``capacity``. Rows start
      from SOK's initializer: "random" (HKV: normal(0, 1)) for the deep part, "0" for the wide part.
    * ``sok.lookup_sparse([dynamic variables], ragged int64 ids, combiners=["sum"]...)`` inserts every id it
      does not hold (HKV ``find_or_insert``, ``kit/variable/impl/hkv_variable.cu:509``). Training lookups do
      that. Evaluation, the build-time forward pass and every ``training=False`` lookup pass
      ``use_low_frequency_filter=True`` (``pkg/lookup.py:543``, v25.03.00 only): with ``filter_ratio`` 0 an id
      the table does not hold is dropped before the lookup (``HugeCTR/embedding/
      all2all_embedding_collection.cu:577-622``; ``hkv_variable.cu:564-588``), so it reads zeros, as the CPU
      backend's zero row, and gets no row: the export then serves it the zero row. A SOK without it holds no
      dynamic table (:func:`sok_refusal`).
    * ``sok.OptimizerWrapper(opt)`` (``pkg/optimizer.py:231-372``): every slot is its own DynamicVariable of
      the same config, starting from the slots of a [1] dummy variable (``:236-249``); ``apply_gradients`` reads
      the rows and slot rows of the gradient's keys into static buffers (inserting them into the slot tables:
      a slot table holds the keys that received a gradient, the value table every key looked up in training;
      HKV evicts each table on its own), runs the optimizer's own sparse update and writes back. Any legacy
      optimizer with per-row slots of the table's width works: FTRL (wide) as is, and for the deep part plain
      legacy ``RMSprop`` with the deep optimizer's hyperparameters and schedule (:class:`~wd_sok.optim.
      LazyRMSprop`'s ``last`` slot is one float per row and cannot be built from the wrapper's slot template);
      its rms decays only on the steps a key is touched.
    * The wrapper swaps its own ``tf.Variable(0)`` (int32, ``:250``) in for the optimizer's ``iterations`` while
      it applies (``:352-362``): the wrapped schedule reads that counter. Before every apply it is set to the
      optimizer's step (the deep or wide optimizer wd-sok restores and advances), so after a resume the
      learning-rate schedule goes on from the restored step.
    * ``sok.export(var) -> (keys, values)`` of this GPU on the host (``pkg/dynamic_variable.py:465-491``; HKV
      order is not sorted, ``hkv_variable.cu:337``) and ``sok.assign(var, keys, values)`` (``:494-517``;
      inserts unknown keys, ``hkv_variable.cu:394``). A save exports the value table and each slot table with
      their own keys and writes the slots aligned to the value keys: a value key without a slot row (restored
      without that slot, or its slot row evicted apart from its value) saves the slot's fresh value, the one
      the wrapper would start it from; slot rows of keys the value table no longer holds are not saved. There
      is no ranged export, so a save holds one host copy of this rank's rows and of each slot. Count / last
      are not kept by SOK and are saved as 0.
    """

    def __init__(self, tables: list[TableConfig], initializer: str, seed: int, prefix: str,
                 runtime: Runtime, **kw) -> None:
        super().__init__(tables, initializer, seed, prefix, **kw)
        self.runtime, self.rank, self.world = runtime, runtime.rank, runtime.size
        sok = init_sok(runtime)
        for t in tables:
            why = sok_refusal(t, self.world)
            if why is not None:
                raise ValueError(f"{prefix} table '{t.name}': SOK cannot hold it: {why}")
        self.names = [t.name for t in tables]
        self.capacity = {t.name: t.dynamic.capacity // self.world for t in tables}  # HKV max_capacity per GPU
        self.vars = {t.name: sok.DynamicVariable(dimension=t.dim, initializer="0" if initializer == "zeros"
                                                 else "random", var_type="hybrid", key_type=tf.int64,
                                                 dtype=tf.float32, name=f"{prefix}_{t.name}_dynamic",
                                                 init_capacity=self.capacity[t.name],
                                                 max_capacity=self.capacity[t.name], filter_ratio=0.0)
                     for t in tables}
        object.__setattr__(self, "wrapper", None)
        object.__setattr__(self, "source", None)  # the optimizer wd-sok steps and restores (its iterations)
        object.__setattr__(self, "_exported", {})
        object.__setattr__(self, "_restored", dict.fromkeys(self.names, 0))
        self.wraps_optimizer = True  # slots live in sok.OptimizerWrapper's DynamicVariables, not the optimizer

    def attach_optimizer(self, optimizer: tf.keras.optimizers.legacy.Optimizer | None) -> None:
        """Wrap (a plain-RMSprop stand-in for) ``optimizer`` with ``sok.OptimizerWrapper``; create the slots."""
        if optimizer is None:
            return
        object.__setattr__(self, "source", optimizer)
        if isinstance(optimizer, LazyRMSprop):
            optimizer = tf.keras.optimizers.legacy.RMSprop(optimizer._get_hyper("learning_rate"),  # noqa: SLF001
                                                           rho=optimizer._get_hyper("rho"),  # noqa: SLF001
                                                           epsilon=optimizer.epsilon)
        wrapper = init_sok(self.runtime).OptimizerWrapper(optimizer)
        wrapper._create_slots(list(self.vars.values()))  # noqa: SLF001 - pkg/optimizer.py's only way
        object.__setattr__(self, "wrapper", wrapper)
        object.__setattr__(self, "optimizer", optimizer)

    def call(self, ids: dict[str, Ids], training: bool | None = None) -> dict[str, tf.Tensor]:
        return self.lookup(ids, training=training is True)

    @tf.autograph.experimental.do_not_convert
    def lookup(self, ids: dict[str, Ids], training: bool = False) -> dict[str, tf.Tensor]:
        """Pooled vectors; only a training lookup gives unknown ids rows (the others read zeros for them)."""
        if not self.names:
            return {}
        checked = []
        for name in self.names:
            x = ids[name]
            values = tf.cast(x.flat_values if isinstance(x, tf.RaggedTensor) else tf.reshape(x, [-1]), tf.int64)
            ok = tf.reduce_all((values != tf.int64.max) & (values != tf.int64.min))
            check = tf.debugging.Assert(ok, [f"{self.prefix} embedding: feature '{name}': SOK's dynamic tables "
                                             "reserve the ids INT64_MAX and INT64_MIN"])
            with tf.control_dependencies([check]):
                checked.append(tf.identity(values))
        return sok_pooled(self.runtime, self.vars, ids, checked, self.tables, find_only=not training)

    @property
    def sparse_variables(self) -> list[tf.Variable]:
        return init_sok(self.runtime).filter_variables(list(self.vars.values()))[0]

    def _sync_step(self) -> None:
        """The wrapper's step counter := the optimizer's (see the class docstring)."""
        counter = self.wrapper._iterations  # noqa: SLF001 - pkg/optimizer.py:250, the wrapper's own counter
        counter.assign(tf.cast(self.source.iterations, counter.dtype))

    def apply_own(self, pairs: list[tuple]) -> list[tuple]:
        """Apply the gradients of these tables through the SOK wrapper; return the other (grad, var) pairs."""
        mine = {id(v) for v in self.vars.values()}
        own = [(g, v) for g, v in pairs if id(v) in mine]
        if own and self.wrapper is not None:
            self._sync_step()
            self.wrapper.apply_gradients(own)
        return [(g, v) for g, v in pairs if id(v) not in mine]

    def table_variable(self, name: str) -> tf.Variable:
        return self.vars[name]

    def placement(self, name: str) -> Placement:
        return Placement("dynamic")

    # ---- keyed checkpoints (the interface of wd_sok.embedding.dynamic.DynamicEmbedding)
    owner_of_keys = staticmethod(lambda keys, world: np.asarray(keys, np.int64) % world)

    def owns(self, keys: np.ndarray) -> np.ndarray:
        return self.owner_of_keys(keys, self.world) == self.rank

    def fresh_slot(self, slot: str) -> float:
        """The value a new row of ``slot`` starts from: the wrapper's dummy-variable slot (a float initializer
        is its first element, ``kit/variable/kernels/dummy_var_handle.cc:157-166``)."""
        return float(np.reshape(self.wrapper._initial_vals[slot].numpy(), [-1])[0])  # noqa: SLF001

    def _export(self, name: str) -> dict[str, np.ndarray]:
        """This rank's keys (sorted) with their values and, aligned to them, their slots (one host copy)."""
        sok, dim = init_sok(self.runtime), self.tables[name].dim
        keys, values = (np.asarray(x) for x in sok.export(self.vars[name]))
        order = np.argsort(keys, kind="stable")
        keys = keys[order].astype(np.int64)
        out = {"key": keys, "value": values[order].reshape(keys.size, dim).astype(np.float32)}
        for slot in ([] if self.wrapper is None else self.wrapper.get_slot_names()):
            skeys, svalues = (np.asarray(x) for x in sok.export(self.wrapper.get_slot(self.vars[name], slot)))
            out[slot] = aligned(keys, skeys, svalues.reshape(skeys.size, dim), self.fresh_slot(slot))
        out["count"] = out["last"] = np.zeros(keys.size, np.int64)
        return out

    def keyed_count(self, name: str) -> int:
        self._exported[name] = self._export(name)  # the save reads blocks of this
        return int(self._exported[name]["key"].size)

    def read_keyed(self, name: str, array: str, lo: int, hi: int) -> np.ndarray:
        if name not in self._exported:
            self.keyed_count(name)
        return self._exported[name][array][lo:hi]

    def read_keyed_rows(self, name: str, array: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (positions of the last :meth:`keyed_count`) of ``array``."""
        if name not in self._exported:
            self.keyed_count(name)
        return self._exported[name][array][np.asarray(rows, np.int64)]

    def pending_items(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros([0], np.int64), np.zeros([0], np.int64)

    def clock_value(self) -> int:
        return 0

    def set_clock(self, value: int) -> None:
        """(No clock under SOK.) Called first by a restore: put the wrapper's step counter on time (it is set
        again before every apply, so the order of a restore's steps does not matter)."""
        if self.wrapper is not None and self.source is not None:
            self._sync_step()

    def clear_keyed(self, name: str) -> None:
        """SOK cannot empty a DynamicVariable (no remove op); a restore assigns every key it restores, counting
        them against this rank's capacity."""
        self._restored[name] = 0
        self._exported.pop(name, None)

    def insert_keyed(self, name: str, arrays: dict[str, np.ndarray]) -> int:
        """Assign restored keys with their values and the slots present (a slot absent from the checkpoint
        starts fresh); keys beyond this rank's capacity are dropped (returned count), first come first kept,
        since an HKV assign into a full table would evict restored keys instead."""
        sok, keys = init_sok(self.runtime), np.asarray(arrays["key"], np.int64)
        n = max(0, min(keys.size, self.capacity[name] - self._restored[name]))
        if n:
            index = tf.constant(keys[:n], tf.int64)
            sok.assign(self.vars[name], index, tf.constant(arrays["value"][:n], tf.float32))
            for slot in ([] if self.wrapper is None else self.wrapper.get_slot_names()):
                if slot in arrays:
                    sok.assign(self.wrapper.get_slot(self.vars[name], slot), index,
                               tf.constant(arrays[slot][:n], tf.float32))
        self._restored[name] += n
        self._exported.pop(name, None)
        return int(keys.size - n)

    def insert_pending(self, name: str, keys: np.ndarray, counts: np.ndarray) -> None:
        """(No admission under SOK: its tables have min_count 1.)"""


def aligned(keys: np.ndarray, slot_keys: np.ndarray, slot_rows: np.ndarray, fresh: float) -> np.ndarray:
    """[n, dim] float32: for each of the sorted ``keys`` its row of ``slot_rows`` (rows of ``slot_keys``, any
    order), or ``fresh`` where the slot table has no row for it; slot rows of other keys are left out."""
    out = np.full((keys.size, slot_rows.shape[1] if slot_rows.ndim == 2 else 1), fresh, np.float32)
    if slot_keys.size and keys.size:
        order = np.argsort(slot_keys, kind="stable")
        sk = slot_keys[order]
        pos = np.minimum(np.searchsorted(sk, keys), sk.size - 1)
        hit = sk[pos] == keys
        out[hit] = slot_rows[order][pos[hit]]
    return out

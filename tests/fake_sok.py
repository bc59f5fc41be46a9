"""A CPU stand-in for the dynamic-table part of ``sparse_operation_kit`` 2.1.0, following SOK's source where
wd_sok/embedding/sok.py's SokDynamicEmbedding depends on it.

References are NVIDIA-Merlin/HugeCTR at tag **v25.03.00** (the tag the image builds; ``pkg/`` =
``sparse_operation_kit/sparse_operation_kit/``, ``kit/`` = ``sparse_operation_kit/kit_src/``, ``HKV`` =
NVIDIA-Merlin/HierarchicalKV at the submodule commit 28046ba0, the same at v24.06.00). Where v24.06.00 differs
it is said; ``install(tag="v24.06.00")`` gives that API.

What each piece does, and where SOK does it:

* **Two kinds of table** (``DynamicVariable(var_type=...)``, ``pkg/dynamic_variable.py:99-138``; no
  ``var_type`` means "hybrid", ``:125``). ``"hbm"`` (DET) ignores every config key: it is built with a fixed
  initial capacity of 2E4 (``kit/variable/impl/variable_base.cu:39-40``) and grows without limit (cuco
  ``dynamic_map::reserve`` doubles ``capacity_``, ``.../cuco/detail/dynamic_map.inl:62-90``); the fake holds
  up to ``DET_ROWS`` keys and fails beyond (its limit, not SOK's). ``"hybrid"`` (HKV) reads ``init_capacity``
  and ``max_capacity`` from the keyword arguments (``variable_base.cu:44-53``, default 64 Mi each), which SOK
  says must be powers of two (``pkg/dynamic_variable.py:67``); HKV holds ``buckets x 128`` keys
  (``HKV include/merlin/core_kernels.cuh:309-320``), so a power of two below 128 still holds 128: the fake
  refuses those (ValueError). When an HKV table is full, inserting evicts (``evict_strategy`` default kLru,
  ``variable_base.cu:85``): the fake evicts the least recently looked-up keys of the whole table (HKV does it
  per 128-key bucket, so it may evict a little earlier; what the adapter relies on is that a table never holds
  more than ``max_capacity`` keys).
* **Lookups insert** (``lookup_sparse`` -> ``LookupForwardDynamic``, ``pkg/lookup.py:213-215``; the adapter's
  ``var->lookup`` on the unique keys, ``kit/lookup/impl/embedding_collection_adapter.cu:369``; DET
  ``lookup_or_insert``, ``.../cuco/detail/dynamic_map_kernels.cuh:67``; HKV ``find_or_insert``,
  ``kit/variable/impl/hkv_variable.cu:509``): an unknown key gets a row from the initializer. New rows: "random"
  (DET uniform (0, 1], HKV normal(0, 1)) is the constant 0.05 here so tests can work values by hand; a float
  string is that constant.
* **Lookups that do not insert** (v25.03.00 only): ``lookup_sparse(..., use_low_frequency_filter=True)``
  (``pkg/lookup.py:543``) runs ``ratio_filter`` first (``HugeCTR/embedding/all2all_embedding_collection.cu:577-
  622``): a key the table holds passes (``hkv_variable.cu:584``, ``find`` sets ``filtered``), an unknown key
  passes with probability ``filter_ratio`` (``:564-575``; the variable's ``filter_ratio`` keyword,
  ``variable_base.cu:92-96``, default 1.0), and keys that do not pass are removed before the lookup
  (``all2all_embedding_collection.cu:428-439``): they add nothing to the pooled vector and get no row. With
  ``filter_ratio=0`` that is a find-only lookup. HKV ``find`` does not refresh a key's LRU score. A DET table
  raises on it ("don't support ratio_filter", ``kit/variable/impl/det_variable.cu:252-254``).
* **export** (``pkg/dynamic_variable.py:465-491``) returns this GPU's (keys, values) on the host. DET sorts them
  by key (``det_variable.cu:164-167``); HKV returns them in bucket order (``export_batch``,
  ``hkv_variable.cu:337``): the fake returns an HKV table's keys last-inserted first (not sorted).
* **assign** (``pkg/dynamic_variable.py:494-517``; ``:516`` casts the indices and drops the result) inserts the
  keys it does not hold: DET looks them up first (inserting) and then scatters the values
  (``det_variable.cu:196``, ``:203``); HKV ``insert_or_assign`` (``hkv_variable.cu:394``), evicting if full.
* **OptimizerWrapper** (``pkg/optimizer.py:25-88``: a legacy Keras optimizer -> ``OptimizerWrapperV2``, ``:69-71``;
  ``:231-372``). ``__init__`` builds the slots of a [1] dummy variable and keeps them as the initial slot
  values (``:236-249``) and makes its own step counter ``tf.Variable(0)`` (int32, ``:250``). Each slot of a
  dynamic variable is a *separate* DynamicVariable (``_create_slots_dynamic``, ``:263-288``) of the same
  ``var_type``, built from that initial value (a float tensor initializer becomes a constant,
  ``kit/variable/kernels/dummy_var_handle.cc:157-166``) and, for HKV, with the variable's own keyword
  arguments (``:286``). ``apply_gradients`` (``:307-372``): per variable the unique gradient keys
  (``:313``) are read from the value table and from each slot table into static buffers (``to_static``,
  ``:317``, ``:347``; ``pkg/dynamic_variable.py:205-212``: a ``sparse_read``, which inserts), the wrapped
  optimizer's own sparse update runs on those buffers with the wrapper's counter swapped in for the optimizer's
  ``iterations`` ("# 2. Switch iterations", ``:352-362``), and the buffers are scattered back (``:365-372``). So
  a slot table holds exactly the keys that received a gradient (and restored ones), the value table every key
  looked up; the two are separate hash tables with separate key sets and separate evictions. The wrapped
  optimizer's learning-rate schedule reads the wrapper's counter, which nothing but ``apply_gradients`` moves.

In the fake a DynamicVariable is a ``tf.Variable`` of storage rows with a key -> row ``MutableHashTable``
beside it; gradients are IndexedSlices of storage rows (SOK's are of keys), translated to keys by the wrapper.
One process: the placement ``k % N`` is then the identity.
"""

from __future__ import annotations

import sys
from types import ModuleType

import tensorflow as tf

DET_ROWS = 1 << 14  # the fake's storage for an "hbm" table (SOK's grows without limit)
HKV_DEFAULT = 64 * 1024 * 1024  # variable_base.cu:44, :49
HKV_BUCKET = 128  # variable_base.cu:65 (max_bucket_size)
RANDOM = 0.05  # the fake's "random" row (SOK draws one)


def _value_of(initializer: object) -> float:
    """The constant a new row starts from (``parse_initializer``, det_variable.cu:85-103; a tensor initializer
    is its first element, dummy_var_handle.cc:157-166)."""
    if isinstance(initializer, str):
        if initializer in ("", "random", "normal", "uniform"):
            return RANDOM
        named = {"zeros": 0.0, "ones": 1.0}
        return named[initializer] if initializer in named else float(initializer)
    return float(tf.reshape(tf.convert_to_tensor(initializer), [-1])[0].numpy())


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def dynamic_variable(dimension: int, initializer: object = None, var_type: str | None = None,
                     name: str | None = None, constraint: object = None, trainable: bool = True,
                     key_type: tf.DType | None = None, dtype: tf.DType | None = None, mode: str | None = None,
                     **kwargs: object) -> tf.Variable:
    """``sok.DynamicVariable`` (see the module docstring)."""
    var_type = "hybrid" if var_type is None else var_type
    if var_type == "hybrid":
        init_cap = int(kwargs.get("init_capacity", HKV_DEFAULT))
        max_cap = int(kwargs.get("max_capacity", HKV_DEFAULT))
        if not (_pow2(init_cap) and _pow2(max_cap)) or max_cap < HKV_BUCKET or init_cap > max_cap:
            raise ValueError(f"fake SOK: HKV init_capacity {init_cap} / max_capacity {max_cap} must be powers of "
                             f"two, >= {HKV_BUCKET} (one bucket) and init <= max")
        rows, capacity, ratio = max_cap, max_cap, float(kwargs.get("filter_ratio", 1.0))
    elif var_type == "hbm":
        rows, capacity, ratio = DET_ROWS, None, None  # DET ignores the config (variable_base.cu:39-40)
    else:
        raise ValueError(f"fake SOK: unknown var_type {var_type!r}")
    value = _value_of("" if initializer is None else initializer)
    var = tf.Variable(tf.fill([rows, dimension], value), name=name or "sok_dynamic_Variable", trainable=trainable)
    var.index = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, -1)
    var.row_keys = tf.Variable(tf.zeros([rows], tf.int64), trainable=False)
    var.last = tf.Variable(tf.zeros([rows], tf.int64), trainable=False)  # LRU score (HKV kLru)
    var.filled = tf.Variable(0, dtype=tf.int64, trainable=False)
    var.clock = tf.Variable(0, dtype=tf.int64, trainable=False)
    var.static = tf.Variable(tf.zeros([rows, dimension]), trainable=False)  # to_static's buffer
    var.fresh, var.capacity, var.filter_ratio = value, capacity, ratio
    var.dimension, var.backend_type, var.config_dict = dimension, var_type, dict(kwargs)
    var.initializer_str = initializer
    return var


def size(var: tf.Variable) -> int:
    """Keys held (``DynamicVariable.size``, pkg/dynamic_variable.py:233-237)."""
    return int(var.filled.numpy())


def _find(var: tf.Variable, keys: tf.Tensor) -> tf.Tensor:
    """[n] storage rows of [n] keys, -1 where absent; inserts nothing and leaves the LRU scores."""
    return tf.reshape(var.index.lookup(keys), tf.shape(keys))


def _find_or_insert(var: tf.Variable, keys: tf.Tensor) -> tf.Tensor:
    """[n] storage rows of [n] int64 keys, giving new keys rows (fresh values), evicting LRU rows when full."""
    keys = tf.reshape(tf.cast(keys, tf.int64), [-1])
    u, inv = tf.unique(keys)
    found = _find(var, u)
    new = tf.boolean_mask(u, found < 0)
    m = tf.size(new, out_type=tf.int64)
    rows = tf.cast(tf.shape(var.row_keys)[0], tf.int64)
    free = rows - var.filled
    if var.capacity is None:
        tf.debugging.assert_less_equal(m, free, message="fake SOK: DET table beyond the fake's DET_ROWS")
    else:
        tf.debugging.assert_less_equal(m, rows, message="fake SOK: more new keys in one call than max_capacity")
    n_evict = tf.maximum(m - free, 0)
    used_now = tf.boolean_mask(found, found >= 0)  # this call's keys are the most recent: never evicted
    top = tf.constant(tf.int64.max, tf.int64)
    score = tf.where(tf.range(rows) < var.filled, var.last.read_value(), top)  # free rows are not evicted
    score = tf.tensor_scatter_nd_update(score, used_now[:, None], tf.fill(tf.shape(used_now), top))
    evicted = tf.cast(tf.math.top_k(-score, tf.cast(n_evict, tf.int32)).indices, tf.int64)
    var.index.remove(tf.gather(var.row_keys, evicted))
    new_rows = tf.concat([var.filled + tf.range(m - n_evict), evicted], 0)
    var.index.insert(new, new_rows)
    var.row_keys.scatter_update(tf.IndexedSlices(new, new_rows))
    var.scatter_update(tf.IndexedSlices(tf.fill([m, var.dimension], var.fresh), new_rows))
    var.filled.assign_add(m - n_evict)
    var.clock.assign_add(1)
    rows_u = _find(var, u)
    var.last.scatter_update(tf.IndexedSlices(tf.fill(tf.shape(rows_u), var.clock.read_value()), rows_u))
    return tf.gather(rows_u, inv)


def _lookup_sparse(params: list, sp_ids: list, sp_weights: object = None, combiners: list | None = None,
                   use_low_frequency_filter: bool = False) -> list[tf.Tensor]:
    """``sok.lookup_sparse`` over dynamic variables (one process)."""
    combiners = combiners or ["mean"] * len(params)
    out = []
    for var, ids, combiner in zip(params, sp_ids, combiners, strict=True):
        flat = tf.cast(ids.flat_values, tf.int64)
        if use_low_frequency_filter:
            if var.backend_type == "hbm":
                raise RuntimeError("SOK dynamic variable with DET backend don't support ratio_filter!")
            rows = _find(var, flat)
            keep = rows >= 0
            if var.filter_ratio >= 1.0:  # every unknown key passes (probability 1): a plain lookup
                rows, keep = _find_or_insert(var, flat), tf.ones_like(keep)
            elif var.filter_ratio > 0.0:
                raise NotImplementedError("fake SOK: filter_ratio strictly between 0 and 1 (random admission)")
            vectors = tf.gather(var, tf.maximum(rows, 0)) * tf.cast(keep, tf.float32)[:, None]
        else:
            keep = tf.ones_like(flat, tf.bool)
            vectors = tf.gather(var, _find_or_insert(var, flat))
        pooled = tf.reduce_sum(ids.with_flat_values(vectors), axis=1)
        if combiner == "mean":  # over the keys that passed the filter (the others were removed)
            kept = tf.reduce_sum(ids.with_flat_values(tf.cast(keep, tf.float32)), axis=1)
            pooled /= tf.maximum(kept, 1.0)[:, None]
        out.append(pooled)
    return out


def _lookup_sparse_2406(params: list, sp_ids: list, sp_weights: object = None,
                        combiners: list | None = None) -> list[tf.Tensor]:
    """v24.06.00's signature: no low-frequency filter (pkg/lookup.py:532 at that tag)."""
    return _lookup_sparse(params, sp_ids, sp_weights, combiners)


def export(var: tf.Variable) -> tuple[tf.Tensor, tf.Tensor]:
    """(keys, values) of the table: DET sorted by key, HKV not (last-inserted first here)."""
    n = var.filled.read_value()
    keys, values = var.row_keys[:n], var[:n]
    order = tf.argsort(keys) if var.backend_type == "hbm" else tf.range(n - 1, -1, -1)
    with tf.device("CPU"):
        return tf.identity(tf.gather(keys, order)), tf.identity(tf.gather(values, order))


def assign(var: tf.Variable, indices: tf.Tensor, values: tf.Tensor) -> None:
    """Set the rows of ``indices``, inserting (HKV: possibly evicting) keys the table does not hold."""
    rows = _find_or_insert(var, indices)
    var.scatter_update(tf.IndexedSlices(tf.convert_to_tensor(values, tf.float32), rows))


def _var_key(var: tf.Variable) -> object:
    """pkg/optimizer.py:290-295 (and Keras' own ``_var_key``)."""
    if getattr(var, "_in_graph_mode", False):
        return var._shared_name  # noqa: SLF001
    return var._unique_id  # noqa: SLF001


class OptimizerWrapper:
    """``sok.OptimizerWrapper`` of a legacy Keras optimizer (``OptimizerWrapperV2``, see the module docstring)."""

    def __init__(self, optimizer: tf.keras.optimizers.legacy.Optimizer) -> None:
        self._optimizer = optimizer
        unused = tf.Variable([0.0], name="unused", trainable=False)
        optimizer._create_slots([unused])  # noqa: SLF001
        names = optimizer.get_slot_names()
        slots = [optimizer.get_slot(unused, n) for n in names]
        optimizer._slots.pop(_var_key(unused), None)  # noqa: SLF001
        self._initial_vals = dict(zip(names, slots, strict=True))
        self._iterations = tf.Variable(0)  # int32, like SOK's

    @property
    def lr(self) -> object:
        return self._optimizer.lr

    def _create_slots(self, variables: list) -> None:
        for var in variables:
            if hasattr(var, "row_keys"):
                self._create_slots_dynamic(var)
            else:
                self._optimizer._create_slots(var)  # noqa: SLF001

    def _create_slots_dynamic(self, var: tf.Variable) -> None:
        slots = self._optimizer._slots.setdefault(_var_key(var), {})  # noqa: SLF001
        for name, initial in self._initial_vals.items():
            if name not in slots:
                config = {} if var.backend_type == "hbm" else var.config_dict
                slots[name] = dynamic_variable(var.dimension, initializer=initial, var_type=var.backend_type,
                                               name="DynamicSlot", trainable=False, **config)

    def get_slot_names(self) -> list[str]:
        return self._optimizer.get_slot_names()

    def get_slot(self, var: tf.Variable, name: str) -> tf.Variable:
        return self._optimizer.get_slot(var, name)

    @property
    def _slots(self) -> dict:
        return self._optimizer._slots  # noqa: SLF001

    def apply_gradients(self, grads_and_vars: list, global_step: object = None, name: str | None = None) -> None:
        opt = self._optimizer
        grads, buffers, back = [], [], []
        for g, v in grads_and_vars:
            if g is None:
                continue
            rows, pos = tf.unique(tf.cast(g.indices, tf.int64))  # storage rows (SOK: keys), optimizer.py:313
            keys = tf.gather(v.row_keys, rows)
            u = tf.size(rows, out_type=tf.int64)
            v.static.scatter_update(tf.IndexedSlices(tf.gather(v, rows), tf.range(u)))  # to_static
            self._create_slots_dynamic(v)
            writes = [(v, rows)]
            for slot_name, slot in opt._slots[_var_key(v)].items():  # noqa: SLF001
                srows = _find_or_insert(slot, keys)  # the slot's sparse_read inserts: slot rows appear here
                slot.static.scatter_update(tf.IndexedSlices(tf.gather(slot, srows), tf.range(u)))
                opt._slots.setdefault(_var_key(v.static), {})[slot_name] = slot.static  # noqa: SLF001
                writes.append((slot, srows))
            grads.append(tf.IndexedSlices(g.values, tf.cast(pos, tf.int64), tf.shape(v.static, out_type=tf.int64)))
            buffers.append(v.static)
            back.append((writes, u))
        if not grads:
            return
        own, opt._iterations = opt._iterations, self._iterations  # noqa: SLF001 - "# 2. Switch iterations"
        try:
            opt.apply_gradients(zip(grads, buffers, strict=True))
        finally:
            opt._iterations = own  # noqa: SLF001
        for writes, u in back:  # to_dynamic
            for table, rows in writes:
                table.scatter_update(tf.IndexedSlices(table.static[:u], rows))


def install(tag: str = "v25.03.00") -> ModuleType:
    """Put the fake in ``sys.modules['sparse_operation_kit']``: SOK 2.1.0's top-level API as built from HugeCTR
    ``tag`` (v25.03.00: ``lookup_sparse`` takes ``use_low_frequency_filter``; v24.06.00: it does not)."""
    mod = ModuleType("sparse_operation_kit")
    mod.__version__ = "2.1.0"  # pkg/_version.py at both tags
    mod.init = lambda comm_tool="horovod", use_legacy_optimizer=True: None
    mod.Variable = None
    mod.DynamicVariable = dynamic_variable
    mod.lookup_sparse = _lookup_sparse if tag == "v25.03.00" else _lookup_sparse_2406
    mod.export, mod.assign = export, assign
    mod.OptimizerWrapper = OptimizerWrapper
    mod.filter_variables = lambda vs: ([v for v in vs if hasattr(v, "row_keys")],
                                       [v for v in vs if not hasattr(v, "row_keys")])
    sys.modules["sparse_operation_kit"] = mod
    return mod

"""A CPU stand-in for the dynamic-table part of ``sparse_operation_kit`` 2.x, shaped like the calls
wd_sok/embedding/sok.py's SokDynamicEmbedding makes (its docstring cites the SOK source it follows).

``DynamicVariable`` is a tf.Variable of FAKE_ROWS rows with a key -> row ``MutableHashTable`` that grows on
lookup (as SOK's DET does); ``lookup_sparse`` is a local lookup (one process: the placement ``k % N`` is then
the identity), ``export`` / ``assign`` read and write (keys, rows), ``OptimizerWrapper`` applies the wrapped
legacy optimizer with its own ``iterations`` counter and shares the key table with the slots.
"""

from __future__ import annotations

import sys
from types import ModuleType

import tensorflow as tf

FAKE_ROWS = 4096


def _rows(var: tf.Variable, keys: tf.Tensor) -> tf.Tensor:
    """[n] rows of [n] int64 keys, allocating rows for new keys."""
    u, inv = tf.unique(keys)
    found = tf.reshape(var.table.lookup(u), tf.shape(u))
    new = tf.boolean_mask(u, found < 0)
    var.table.insert(new, var.filled + tf.range(tf.size(new, out_type=tf.int64)))
    var.filled.assign_add(tf.size(new, out_type=tf.int64))
    return tf.gather(tf.reshape(var.table.lookup(u), tf.shape(u)), inv)


def dynamic_variable(dimension: int, initializer: str = "random", var_type: str = "hbm", name: str | None = None,
                     key_type: tf.DType = tf.int64, dtype: tf.DType = tf.float32, **_kw: object) -> tf.Variable:
    value = 0.05 if initializer == "random" else float(initializer)
    var = tf.Variable(tf.fill([FAKE_ROWS, dimension], value), name=name)
    var.table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, -1)
    var.filled = tf.Variable(0, dtype=tf.int64, trainable=False)
    var.dimension, var.backend_type = dimension, var_type
    return var


def lookup_sparse(params: list, sp_ids: list, combiners: list) -> list[tf.Tensor]:
    out = []
    for var, ids, combiner in zip(params, sp_ids, combiners, strict=True):
        vectors = tf.gather(var, _rows(var, ids.flat_values))
        pooled = tf.reduce_sum(ids.with_flat_values(vectors), axis=1)
        if combiner == "mean":
            pooled /= tf.cast(tf.maximum(ids.row_lengths(), 1), tf.float32)[:, None]
        out.append(pooled)
    return out


def export(var: tf.Variable) -> tuple[tf.Tensor, tf.Tensor]:
    keys, rows = var.table.export()
    return keys, tf.gather(var, rows)


def assign(var: tf.Variable, indices: tf.Tensor, values: tf.Tensor) -> None:
    var.scatter_update(tf.IndexedSlices(values, _rows(var, indices)))


class OptimizerWrapper:
    def __init__(self, optimizer: tf.keras.optimizers.legacy.Optimizer) -> None:
        self._optimizer = optimizer
        self._iterations = tf.Variable(0, dtype=tf.int64, trainable=False)

    def _create_slots(self, variables: list) -> None:
        with tf.init_scope():
            self._optimizer._create_all_weights(variables)  # noqa: SLF001

    def get_slot_names(self) -> list[str]:
        return self._optimizer.get_slot_names()

    def get_slot(self, var: tf.Variable, name: str) -> tf.Variable:
        slot = self._optimizer.get_slot(var, name)
        slot.table, slot.filled = var.table, var.filled  # same keys, same rows
        return slot

    def apply_gradients(self, grads_and_vars: list) -> None:
        own, self._optimizer._iterations = self._optimizer._iterations, self._iterations  # noqa: SLF001
        try:
            self._optimizer.apply_gradients(grads_and_vars)
        finally:
            self._optimizer._iterations = own  # noqa: SLF001


def install() -> ModuleType:
    """Put the fake in ``sys.modules['sparse_operation_kit']`` (SOK 2.1.0's top-level API)."""
    mod = ModuleType("sparse_operation_kit")
    mod.__version__ = "2.1.0"
    mod.init = lambda comm_tool="horovod", use_legacy_optimizer=True: None
    mod.Variable = None
    mod.DynamicVariable = dynamic_variable
    mod.lookup_sparse = lookup_sparse
    mod.export, mod.assign = export, assign
    mod.OptimizerWrapper = OptimizerWrapper
    mod.filter_variables = lambda vs: ([v for v in vs if hasattr(v, "table")],
                                       [v for v in vs if not hasattr(v, "table")])
    sys.modules["sparse_operation_kit"] = mod
    return mod

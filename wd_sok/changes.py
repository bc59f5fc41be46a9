"""Which rows of each embedding table changed since the last full checkpoint (for delta checkpoints).

Per table variable ``[rows, dim]`` on this rank, a ``[rows]`` uint8 mask (one byte per row: 0.4% of a 32-wide
table with one slot) is set inside the compiled train step, with no host work:

* :func:`mark_applied`, just before the optimizers apply the gradients: an IndexedSlices gradient marks its
  ``indices`` (every row the sparse apply writes); a dense gradient (small replicated tables reduced dense)
  marks every row; so does a sparse gradient whose optimizer's sparse apply writes rows it was not given
  (Keras' legacy RMSprop decays every row's ``rms`` every step; Adam likewise). Row-local sparse applies:
  :class:`~wd_sok.optim.LazyRMSprop` with its ``last`` slot, FTRL, Adagrad, plain SGD.
* :func:`mark_rows`, inside a dynamic table's training lookup: the rows it counted, touched or handed to a
  new key (so a step whose update is skipped still records them).

``changed(var)`` returns the marked rows (``[m]`` int64 variable rows, ascending); ``reset(vars)`` clears the
masks after a full checkpoint. A variable without a mask yet (never trained) has none changed. Masks live in
a registry keyed by the variable (dropped with it), outside Keras' tracking: they are not weights, not
exported and not part of any checkpoint.
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from wd_sok.optim import LazyRMSprop, _has_slot

_MASKS: dict[int, tf.Variable] = {}
#: legacy optimizers whose sparse apply writes only the rows it is given (LazyRMSprop: see _row_local)
ROW_LOCAL = (tf.keras.optimizers.legacy.Ftrl, tf.keras.optimizers.legacy.Adagrad, tf.keras.optimizers.legacy.SGD)


def mask(var: tf.Variable) -> tf.Variable:
    """The [rows] uint8 change mask of ``var`` (created, zero, on first use; safe inside a tf.function)."""
    found = _MASKS.get(id(var))
    if found is None:
        with tf.init_scope():
            found = tf.Variable(tf.zeros([var.shape[0]], tf.uint8), trainable=False,
                                name=f"{var.name.split(':')[0]}/changed")
        _MASKS[id(var)] = found
        weakref.finalize(var, _MASKS.pop, id(var), None)
    return found


def has_mask(var: tf.Variable) -> bool:
    return id(var) in _MASKS


def mark_rows(var: tf.Variable, rows: tf.Tensor) -> tf.Operation:
    """Mark variable rows ``rows`` [n] (any int type, duplicates allowed) of ``var`` changed."""
    rows = tf.cast(tf.reshape(rows, [-1]), tf.int64)
    return mask(var).scatter_update(tf.IndexedSlices(tf.ones(tf.shape(rows), tf.uint8), rows))


def mark_all(var: tf.Variable) -> tf.Operation:
    m = mask(var)
    return m.assign(tf.ones(m.shape, tf.uint8), read_value=False)


def _row_local(optimizer: tf.keras.optimizers.legacy.Optimizer, var: tf.Variable) -> bool:
    """Does ``optimizer``'s sparse apply write only the rows of the gradient's indices?"""
    if isinstance(optimizer, LazyRMSprop):
        return not optimizer._momentum and not optimizer.centered and _has_slot(optimizer, var, "last")  # noqa: SLF001
    if isinstance(optimizer, tf.keras.optimizers.legacy.SGD):
        return not optimizer._momentum  # noqa: SLF001 - momentum decays every row
    return isinstance(optimizer, ROW_LOCAL)


def mark_applied(optimizer: tf.keras.optimizers.legacy.Optimizer, pairs: list[tuple], tables: list[tf.Variable]
                 ) -> list[tf.Operation]:
    """Mark what applying ``pairs`` [(grad, var)] with ``optimizer`` will change, for the variables in
    ``tables`` (the embedding tables; the MLP is saved whole in every checkpoint). Call before the apply."""
    ids = {id(v) for v in tables}
    ops = []
    for grad, var in pairs:
        if id(var) not in ids or grad is None:
            continue
        if isinstance(grad, tf.IndexedSlices) and _row_local(optimizer, var):
            ops.append(mark_rows(var, grad.indices))
        else:
            ops.append(mark_all(var))
    return ops


def changed(var: tf.Variable) -> np.ndarray:
    """[m] int64 variable rows of ``var`` marked since the last :func:`reset`, ascending."""
    found = _MASKS.get(id(var))
    if found is None:
        return np.zeros([0], np.int64)
    return np.flatnonzero(found.numpy().view(np.bool_)).astype(np.int64, copy=False)  # bool: 2x faster scan


def reset(variables: list[tf.Variable]) -> None:
    """Clear the masks of ``variables`` (after a full checkpoint of them)."""
    for var in variables:
        found = _MASKS.get(id(var))
        if found is not None:
            found.assign(tf.zeros_like(found))


def set_changed(var: tf.Variable, rows: np.ndarray) -> None:
    """Mark ``rows`` [m] int64 of ``var`` changed (after a restore of full + delta: the delta's rows)."""
    if len(rows):
        mark_rows(var, tf.constant(np.asarray(rows, np.int64)))

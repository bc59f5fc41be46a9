"""Optimizers: legacy RMSprop with an O(touched rows) sparse update, and portable slot access.

Keras 2's legacy ``RMSprop`` (momentum 0, not centered: the deep optimizer here and in the reference)
applies an IndexedSlices gradient of a table [rows, dim] as::

    rms.assign(rms * rho)                      # every row of the table, every step: O(rows x dim)
    rms[idx] += (1 - rho) * g**2
    var[idx] -= lr * g / (sqrt(rms[idx]) + eps)

so a step reads and writes the whole ``rms`` slot of every deep table, whatever the batch, and sharding
does not help (each rank decays its whole shard). :class:`LazyRMSprop` keeps a per-row ``last`` slot (the
optimizer step count after the row's last update) and applies the owed decays when a row is touched::

    rms[idx] = rho ** (t + 1 - last[idx]) * rms[idx] + (1 - rho) * g**2;   last[idx] = t + 1
    var[idx] -= lr * g / (sqrt(rms[idx]) + eps)

with ``t`` the step count before this update. Untouched rows get a zero gradient, so the weights follow
the legacy optimizer exactly (bit for bit when rho is a power of two, as the default 0.5; to float
rounding otherwise); ``rms`` of an untouched row is stale in memory but caught up whenever it is read,
checkpoints included: :func:`read_slot` returns the legacy optimizer's ``rms`` and :func:`write_slot` sets
``last`` to the current step, so checkpoints hold only ``rms``, in the legacy format, loadable by either.
Dense gradients (the MLP) take the legacy dense path and mark every row up to date.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import tensorflow as tf

Optimizer = tf.keras.optimizers.legacy.Optimizer


class LazyRMSprop(tf.keras.optimizers.legacy.RMSprop):
    """Legacy RMSprop (momentum 0, not centered) whose sparse update costs O(touched rows); see the module.

    Extra slot ``last``: [rows] int64 per table (``tables``; one step count per row: a float32 count would be
    exact only up to 2**24 steps, past which the owed decays round to 0 or 2 steps). Momentum or centered fall
    back to the legacy sparse update.
    """

    #: slots a checkpoint holds (``last`` is internal: it is reset to the current step on import)
    portable_slots = ("rms",)

    def __init__(self, *args: Any, tables: list[tf.Variable] | None = None, **kwargs: Any) -> None:
        """``tables``: the variables that may get sparse gradients (the embedding tables); only they get a
        ``last`` slot. Default None: every variable of rank >= 1. The others (the MLP) take the legacy dense
        update with no bookkeeping at all."""
        super().__init__(*args, **kwargs)
        self._tables = None if tables is None else {v.ref() for v in tables}

    def _create_slots(self, var_list: list[tf.Variable]) -> None:
        super()._create_slots(var_list)
        if self._momentum or self.centered:
            return
        for var in var_list:
            if var.shape.rank and (self._tables is None or var.ref() in self._tables):
                self._add_step_slot(var)

    def _add_step_slot(self, var: tf.Variable) -> None:
        """Keras' ``add_slot`` for the int64 ``last`` slot (``add_slot`` gives every slot the variable's dtype)."""
        keras_optimizer = sys.modules[tf.keras.optimizers.legacy.Optimizer.__module__]
        slots = self._slots.setdefault(keras_optimizer._var_key(var), {})  # noqa: SLF001
        if "last" in slots:
            return
        if "last" not in self._slot_names:
            self._slot_names.append("last")
        with self._distribution_strategy_scope(), \
                tf.distribute.get_strategy().extended.colocate_vars_with(var):
            slot = tf.Variable(tf.zeros([var.shape[0]], tf.int64), name=f"{var._shared_name}/last",  # noqa: SLF001
                               trainable=False)
        keras_optimizer.backend.track_variable(slot)
        slots["last"] = slot
        self._restore_slot_variable(slot_name="last", variable=var, slot_variable=slot)
        self._weights.append(slot)

    def _resource_apply_sparse(self, grad: tf.Tensor, var: tf.Variable, indices: tf.Tensor,
                               apply_state: Any = None) -> tf.Operation:
        if self._momentum or self.centered or not _has_slot(self, var, "last"):
            return super()._resource_apply_sparse(grad, var, indices, apply_state)
        var_device, var_dtype = var.device, var.dtype.base_dtype
        coef = (apply_state or {}).get((var_device, var_dtype)) or self._fallback_apply_state(var_device,
                                                                                              var_dtype)
        rms, last = self.get_slot(var, "rms"), self.get_slot(var, "last")
        now = tf.cast(self.iterations, tf.int64)
        owed = tf.cast(now + 1 - tf.gather(last, indices), var_dtype)  # exact: a count of steps, not a float
        decay = tf.pow(coef["rho"], owed)  # [n] decays owed, this step's included
        shape = tf.concat([tf.shape(indices), tf.ones([tf.rank(grad) - 1], tf.int32)], 0)
        rms_rows = tf.gather(rms, indices) * tf.reshape(decay, shape) + coef["one_minus_rho"] * grad * grad
        update_rms = rms.scatter_update(tf.IndexedSlices(rms_rows, indices))
        update_last = last.scatter_update(tf.IndexedSlices(tf.fill(tf.shape(indices), now + 1), indices))
        step = coef["lr_t"] * grad / (tf.sqrt(rms_rows) + coef["epsilon"])
        update_var = var.scatter_sub(tf.IndexedSlices(step, indices))
        return tf.group(update_rms, update_last, update_var)

    def _resource_apply_dense(self, grad: tf.Tensor, var: tf.Variable, apply_state: Any = None) -> tf.Operation:
        """The legacy dense update on caught-up ``rms`` (rows may owe decays from sparse steps), after which
        no row owes any: ``last`` = t + 1."""
        if self._momentum or self.centered or not _has_slot(self, var, "last"):
            return super()._resource_apply_dense(grad, var, apply_state)
        rms, last = self.get_slot(var, "rms"), self.get_slot(var, "last")
        now = tf.cast(self.iterations, last.dtype)
        catch_up = tf.cond(tf.reduce_all(last == now),  # the MLP: always up to date, skip the pass over rms
                           tf.no_op, lambda: rms.assign(self.caught_up_rms(var), read_value=False))
        with tf.control_dependencies([catch_up]):
            update = super()._resource_apply_dense(grad, var, apply_state)
        with tf.control_dependencies([update]):
            return last.assign(tf.fill(tf.shape(last), now + 1), read_value=False)

    def caught_up_rms(self, var: tf.Variable, rows: slice | np.ndarray | None = None) -> tf.Tensor:
        """[rows, ...] the ``rms`` the legacy optimizer would hold now for ``var`` (its rows ``rows``, all by
        default)."""
        rms, last = self.get_slot(var, "rms"), self.get_slot(var, "last")
        if rows is not None:  # a block of rows (checkpoints): read only those
            rms, last = read_rows(rms, rows), read_rows(last, rows)
        age = tf.cast(tf.cast(self.iterations, tf.int64) - last, rms.dtype)
        factor = tf.pow(tf.cast(self._get_hyper("rho"), rms.dtype), age)
        factor = tf.reshape(factor, tf.concat([tf.shape(factor), tf.ones([tf.rank(rms) - 1], tf.int32)], 0))
        return rms * factor


def slot_names(optimizer: Optimizer | None) -> list[str]:
    """The slots a checkpoint holds for ``optimizer`` (its own, less internal ones such as ``last``)."""
    if optimizer is None:
        return []
    names = list(optimizer.get_slot_names())
    portable = getattr(optimizer, "portable_slots", None)
    return [n for n in names if portable is None or n in portable]


def read_slot(optimizer: Optimizer, var: tf.Variable, slot: str) -> tf.Tensor:
    """Slot ``slot`` of ``var`` as the legacy optimizer would hold it (same shape as the slot)."""
    lazy = isinstance(optimizer, LazyRMSprop) and slot == "rms" and _has_slot(optimizer, var, "last")
    return optimizer.caught_up_rms(var) if lazy else tf.convert_to_tensor(optimizer.get_slot(var, slot))


def write_slot(optimizer: Optimizer, var: tf.Variable, slot: str, value: np.ndarray) -> None:
    """Set slot ``slot`` of ``var`` from a legacy-format value (set ``optimizer.iterations`` first)."""
    optimizer.get_slot(var, slot).assign(value)
    if isinstance(optimizer, LazyRMSprop) and slot == "rms" and _has_slot(optimizer, var, "last"):
        last = optimizer.get_slot(var, "last")
        last.assign(tf.fill(tf.shape(last), tf.cast(optimizer.iterations, last.dtype)))


def read_rows(var: tf.Variable, rows: slice | np.ndarray) -> tf.Tensor:
    """Rows ``rows`` (a slice with explicit start, stop, step, or an [n] int64 array of rows) of ``var`` as a
    new tensor, reading only those.

    A plain ``var[a:b:s]`` reads the whole variable first, and a table that was ever gathered from or
    scattered into is in TensorFlow's copy-on-read mode, so that read is a full copy of the table (hundreds
    of MB of peak memory per block). ``ResourceGather`` on the handle copies just the rows.
    """
    index = (tf.range(rows.start, rows.stop, rows.step, dtype=tf.int64) if isinstance(rows, slice)
             else tf.constant(np.asarray(rows, np.int64)))
    return tf.raw_ops.ResourceGather(resource=var.handle, indices=index, dtype=var.dtype)


def read_slot_rows(optimizer: Optimizer, var: tf.Variable, slot: str, rows: slice | np.ndarray) -> np.ndarray:
    """Rows ``rows`` (a possibly strided slice, or an [n] int64 array of rows) of slot ``slot`` of ``var``, as
    the legacy optimizer would hold them: [n, ...] numpy, a copy of those rows only."""
    if isinstance(optimizer, LazyRMSprop) and slot == "rms" and _has_slot(optimizer, var, "last"):
        return optimizer.caught_up_rms(var, rows).numpy()
    return read_rows(optimizer.get_slot(var, slot), rows).numpy()


def write_slot_rows(optimizer: Optimizer, var: tf.Variable, slot: str, index: tf.Tensor,
                    values: np.ndarray) -> None:
    """Set rows ``index`` [n] int64 of slot ``slot`` of ``var`` from legacy-format ``values`` [n, ...]
    (set ``optimizer.iterations`` first: the lazy optimizer's rows are then current as of that step)."""
    optimizer.get_slot(var, slot).scatter_update(tf.IndexedSlices(values, index))
    if isinstance(optimizer, LazyRMSprop) and slot == "rms" and _has_slot(optimizer, var, "last"):
        now = tf.cast(optimizer.iterations, tf.int64)
        optimizer.get_slot(var, "last").scatter_update(tf.IndexedSlices(tf.fill(tf.shape(index), now), index))


def _has_slot(optimizer: Optimizer, var: tf.Variable, slot: str) -> bool:
    try:
        optimizer.get_slot(var, slot)
    except KeyError:
        return False
    return True


def slot_initial(optimizer: Optimizer, slot: str) -> tf.Tensor:
    """The value a fresh row of slot ``slot`` starts from (a scalar float32; int64 for ``last``): FTRL's /
    Adagrad's ``initial_accumulator_value`` for "accumulator", the current step for :class:`LazyRMSprop`'s
    ``last`` (nothing owed), else 0 (RMSprop's ``rms``, FTRL's ``linear``, momenta)."""
    if slot == "accumulator":
        return tf.constant(float(getattr(optimizer, "_initial_accumulator_value", 0.0)), tf.float32)
    if slot == "last" and isinstance(optimizer, LazyRMSprop):
        return tf.cast(optimizer.iterations, tf.int64)
    return tf.constant(0.0, tf.float32)


def reset_slot_rows(optimizer: Optimizer | None, var: tf.Variable, index: tf.Tensor) -> list[tf.Operation]:
    """Set rows ``index`` [n] int64 of every slot of ``var`` to their initial values (a row handed to a new
    key must not inherit the old key's optimizer state). Slots not created yet are skipped."""
    ops = []
    if optimizer is None:
        return ops
    for name in optimizer.get_slot_names():
        if not _has_slot(optimizer, var, name):
            continue
        slot = optimizer.get_slot(var, name)
        # the static shape: tf.shape(slot) would read (copy) the whole slot variable
        shape = tf.concat([tf.shape(index), tf.constant(slot.shape[1:].as_list(), tf.int32)], 0)
        fill = tf.fill(shape, tf.cast(slot_initial(optimizer, name), slot.dtype))
        ops.append(slot.scatter_update(tf.IndexedSlices(fill, index)))
    return ops

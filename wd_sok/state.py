"""What a checkpoint holds, seen from the model: per-rank table rows with their slots, and replicated state.

* :class:`TableState`: one table of one embedding collection on this rank, with the optimizer that owns its
  slots. It reads and writes rows *block by block* through the backend's :class:`~wd_sok.embedding.base.RowMap`
  and :meth:`owned`, so no caller ever holds more than one block of a table beyond the variable itself.
* :func:`dense_state` / :func:`import_dense`: the data-parallel part (wide bias and numerics kernel, the MLP,
  their optimizer slots, the optimizers' iteration counters): identical on every rank, small, whole arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from wd_sok import changes
from wd_sok.embedding.base import EmbeddingCollection, RowMap, ensure_slots
from wd_sok.feature_spec import TableConfig
from wd_sok.model import WideDeepModel
from wd_sok.optim import read_rows, read_slot, read_slot_rows, slot_names, write_slot, write_slot_rows

Optimizer = tf.keras.optimizers.legacy.Optimizer


@dataclass(frozen=True)
class TableRef:
    """What both kinds of table state name: ``key`` is ``<prefix>/<feature>`` (e.g. ``deep/ad_id``), the
    table's config, the collection holding it on this rank and the optimizer owning its slots."""

    key: str
    table: TableConfig
    collection: EmbeddingCollection
    optimizer: Optimizer | None

    @property
    def var(self) -> tf.Variable:
        return self.collection.table_variable(self.table.name)


@dataclass(frozen=True)
class TableState(TableRef):
    """One table on this rank, its rows named by global row id."""

    @property
    def rows(self) -> RowMap:
        """The global rows this rank saves."""
        return self.collection.saved_rows(self.table.name)

    def arrays(self) -> list[str]:
        """"value" and the optimizer's portable slots (legacy format)."""
        return ["value", *slot_names(self.optimizer)]

    def owned(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of global ``rows`` [n], this rank's: ([n] bool, [m] int64 variable rows)."""
        return self.collection.owned(self.table.name, rows)

    def read(self, array: str, lo: int, hi: int) -> np.ndarray:
        """Saved rows lo..hi-1 of ``array``: [hi - lo, dim] float32 (a copy of those rows only)."""
        sl = self.rows.var_slice(lo, hi)
        if array == "value":
            return read_rows(self.var, sl).numpy()
        return read_slot_rows(self.optimizer, self.var, array, sl)

    def read_at(self, array: str, saved: np.ndarray) -> np.ndarray:
        """Saved rows ``saved`` [m] int64 (indices into :attr:`rows`) of ``array``: [m, dim] float32."""
        var_rows = self.rows.vstart + np.asarray(saved, np.int64) * self.rows.vstride
        if array == "value":
            return read_rows(self.var, var_rows).numpy()
        return read_slot_rows(self.optimizer, self.var, array, var_rows)

    def changed_rows(self) -> np.ndarray:
        """[m] int64 variable rows changed since the last full checkpoint (:mod:`wd_sok.changes`), ascending."""
        return changes.changed(self.var)

    def changed_saved(self) -> np.ndarray:
        """[m] int64 indices into :attr:`rows` (global row ``start + i * stride``) of the changed rows this rank
        saves, ascending (a replicated table's rank saves only its ``rank::N`` slice of them)."""
        rows, off = self.rows, self.changed_rows() - self.rows.vstart
        if rows.vstride == 1:  # every variable row from vstart on is saved here (no int64 division: 3x faster)
            return off[(off >= 0) & (off < rows.count)]
        keep = (off >= 0) & (off % rows.vstride == 0) & (off // rows.vstride < rows.count)
        return off[keep] // rows.vstride

    def reset_changes(self) -> None:
        """Forget the changed rows (after a full checkpoint)."""
        changes.reset([self.var])

    def write(self, array: str, var_rows: np.ndarray, values: np.ndarray) -> None:
        """Set variable rows ``var_rows`` [m] of ``array`` to ``values`` [m, dim]."""
        index = tf.constant(var_rows, tf.int64)
        if array == "value":
            self.var.scatter_update(tf.IndexedSlices(tf.constant(values, self.var.dtype), index))
        else:
            write_slot_rows(self.optimizer, self.var, array, index, values)


@dataclass(frozen=True)
class KeyedTableState(TableRef):
    """One dynamic table on this rank: its rows are named by key (any int64), not by a global row.

    ``collection`` is the dynamic part holding it (:class:`~wd_sok.embedding.dynamic.DynamicEmbedding`, or
    SOK's); a checkpoint holds per row ``key`` [n] int64, ``value`` and the portable slots [n, dim] float32,
    ``count`` and ``last`` [n] int64, and the keys still below ``min_count`` (``pending_key``,
    ``pending_count``), see :mod:`wd_sok.checkpoint.keyed`.
    """

    def arrays(self) -> list[str]:
        """Per-row arrays, in file order (the slots of the optimizer holding them: SOK's wrapped one, if any)."""
        wrapped = getattr(self.collection, "optimizer", None) if getattr(self.collection, "wraps_optimizer", False) \
            else None
        return ["key", "value", *slot_names(wrapped or self.optimizer), "count", "last"]

    def count(self) -> int:
        return self.collection.keyed_count(self.table.name)

    def read(self, array: str, lo: int, hi: int) -> np.ndarray:
        return self.collection.read_keyed(self.table.name, array, lo, hi)

    def read_at(self, array: str, saved: np.ndarray) -> np.ndarray:
        """Saved rows ``saved`` [m] int64 (positions 0..count-1) of ``array``: [m] int64 or [m, dim] float32."""
        saved = np.asarray(saved, np.int64)
        reader = getattr(self.collection, "read_keyed_rows", None)
        if reader is not None:
            return reader(self.table.name, array, saved)
        parts, step = [], 1 << 16  # a backend without row reads: contiguous spans, one block at a time
        for lo in range(0, int(saved[-1]) + 1 if saved.size else 0, step):
            sel = saved[(saved >= lo) & (saved < lo + step)]
            if sel.size:
                parts.append(self.read(array, lo, int(sel[-1]) + 1)[sel - lo])
        return np.concatenate(parts) if parts else self.read(array, 0, 0)

    def changed_rows(self) -> np.ndarray:
        """[m] int64 saved positions (variable row - 1; row 0 is the shared zero row) whose key, value, slots or
        counters changed since the last full checkpoint, ascending: rows counted, updated or handed to a new
        key (the evicted key is gone from that position: a delta's positions carry the evictions)."""
        var_rows = changes.changed(self.var)
        return var_rows[var_rows > 0] - 1

    def reset_changes(self) -> None:
        changes.reset([self.var])

    def pending(self) -> tuple[np.ndarray, np.ndarray]:
        return self.collection.pending_items(self.table.name)

    def owns(self, keys: np.ndarray) -> np.ndarray:
        return self.collection.owns(keys)


State = TableState | KeyedTableState


def table_states(model: WideDeepModel, wide_opt: Optimizer | None, deep_opt: Optimizer | None
                 ) -> list[State]:
    """Every table of the model on this rank, wide then deep, in spec order; optimizer slots created."""
    out: list[State] = []
    for emb, opt in ((model.wide_embedding, wide_opt), (model.deep_embedding, deep_opt)):
        states = [KeyedTableState(f"{emb.prefix}/{name}", t, emb.part(name), opt) if t.dynamic is not None
                  else TableState(f"{emb.prefix}/{name}", t, emb, opt) for name, t in emb.tables.items()]
        # a collection with its own optimizer wrapper (SOK's dynamic tables) keeps its slots there
        ensure_slots(opt, [s.var for s in states if not getattr(s.collection, "wraps_optimizer", False)])
        out += states
    return out


def _dense_groups(model: WideDeepModel, wide_opt: Optimizer, deep_opt: Optimizer
                  ) -> list[tuple[str, tf.Variable, Optimizer]]:
    wide_ids = {id(v) for v in model.wide_variables}
    return [(name, var, wide_opt if id(var) in wide_ids else deep_opt)
            for name, var in model.named_dense_variables().items()]


def _ensure_dense_slots(groups: list[tuple[str, tf.Variable, Optimizer]], wide_opt: Optimizer,
                        deep_opt: Optimizer) -> None:
    ensure_slots(wide_opt, [v for _, v, o in groups if o is wide_opt])
    ensure_slots(deep_opt, [v for _, v, o in groups if o is deep_opt])


def dense_state(model: WideDeepModel, wide_opt: Optimizer, deep_opt: Optimizer) -> dict[str, np.ndarray]:
    """The replicated state as ``{key: array}``: ``dense/<name>[:<slot>]``, ``opt/{wide,deep}_iterations``."""
    arrays: dict[str, np.ndarray] = {}
    groups = _dense_groups(model, wide_opt, deep_opt)
    _ensure_dense_slots(groups, wide_opt, deep_opt)  # before the first step too: every slot is saved
    for name, var, opt in groups:
        arrays[f"dense/{name}"] = var.numpy()
        for slot in slot_names(opt):
            arrays[f"dense/{name}:{slot}"] = read_slot(opt, var, slot).numpy()
    arrays["opt/wide_iterations"] = np.int64(wide_opt.iterations.numpy())
    arrays["opt/deep_iterations"] = np.int64(deep_opt.iterations.numpy())
    return arrays


def set_iterations(wide_opt: Optimizer, deep_opt: Optimizer, arrays: dict[str, np.ndarray]) -> None:
    """Optimizer step counters first: the lazy optimizer's restored slots are relative to them."""
    wide_opt.iterations.assign(int(arrays["opt/wide_iterations"]))
    deep_opt.iterations.assign(int(arrays["opt/deep_iterations"]))


def import_dense(model: WideDeepModel, wide_opt: Optimizer, deep_opt: Optimizer,
                 arrays: dict[str, np.ndarray], origin: str = "checkpoint") -> None:
    """Inverse of :func:`dense_state` (iteration counters included); the model must be built.

    Raises:
        KeyError naming ``origin`` and the variable when one is missing or of another shape.
    """
    set_iterations(wide_opt, deep_opt, arrays)
    groups = _dense_groups(model, wide_opt, deep_opt)
    _ensure_dense_slots(groups, wide_opt, deep_opt)
    for name, var, opt in groups:
        key = f"dense/{name}"
        if key not in arrays or tuple(arrays[key].shape) != tuple(var.shape):
            got = "missing" if key not in arrays else f"of shape {tuple(arrays[key].shape)}"
            raise KeyError(f"{origin}: variable '{key}' is {got}, expected shape {tuple(var.shape)} "
                           "(written for another feature spec or model?)")
        var.assign(arrays[key])
        for slot in slot_names(opt):
            if f"{key}:{slot}" in arrays:
                write_slot(opt, var, slot, arrays[f"{key}:{slot}"])

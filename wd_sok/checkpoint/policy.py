"""When a checkpoint is a delta (:mod:`wd_sok.checkpoint.delta`) and which full checkpoint it builds on.

* The first checkpoint of a run, any after a restore that leaves no usable base, and every epoch-end save
  (the trainer asks only for ``--checkpoint_steps`` and preemption saves) are full.
* A ``--checkpoint_steps`` save is a delta against the last full checkpoint while the delta would be at most
  ``ratio`` of a full one's table bytes (summed over ranks: every rank takes the same decision) and fewer than
  ``every`` deltas were written against it; else full, which resets the change masks and becomes the new base.
* A preemption save (SIGINT / SIGTERM) is a delta whenever a base exists and the delta is no larger than a
  full one: it must fit the launcher's grace period, and a delta writes what changed, not the whole table.
* ``ratio`` 0: full checkpoints only; so are runs with tables whose changes are not tracked (SOK's dynamic
  tables, :func:`wd_sok.checkpoint.delta.supported`).

After a restore, the base is the restored full checkpoint, or the restored delta's base (the restore marked
the delta's rows changed, so the next delta still holds them). Dynamic tables written under another rank count
leave no base: their deltas name positions in the writer ranks' rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wd_sok import changes
from wd_sok.checkpoint import delta
from wd_sok.distributed import Runtime
from wd_sok.state import KeyedTableState, State
from wd_sok.storage.paths import path as storage_path


class DeltaPolicy:
    """The full-or-delta choice of one run (see the module). ``base``: the full checkpoint folder the next delta
    is written against (None: the next save is full); ``deltas``: deltas written against it so far."""

    def __init__(self, ratio: float, every: int) -> None:
        self.ratio, self.every = ratio, every
        self.base: Path | None = None
        self.deltas = 0

    def choose(self, tables: list[State], runtime: Runtime, preempted: bool = False) -> Path | None:
        """Collective (one tiny allreduce unless the answer is fixed): the base for this save, None for full."""
        if self.base is None or self.ratio <= 0 or not delta.supported(tables):
            return None
        if self.deltas >= self.every and not preempted:
            return None
        out, full = runtime.sum_host(np.array(delta.sizes(tables), np.float64), "delta_sizes")
        return self.base if out <= (1.0 if preempted else self.ratio) * full else None

    def meta(self, base: Path | None) -> dict[str, Any]:
        """Manifest fields of the save about to be written (a delta's number since its base)."""
        return {"deltas": self.deltas + 1} if base is not None else {}

    def saved(self, path: str | Path, base: Path | None, tables: list[State]) -> None:
        """After a save (against ``base``, or full when None) committed as ``path``."""
        if base is None:  # later deltas hold the rows changed from now on
            changes.reset([s.var for s in tables])
            self.base, self.deltas = storage_path(path), 0
        else:
            self.deltas += 1

    def restored(self, manifest: dict[str, Any], path: Path, tables: list[State], world: int) -> None:
        """After a restore of checkpoint ``path`` (its ``manifest``) under ``world`` ranks."""
        self.deltas = int(manifest.get("deltas", 0))
        if delta.is_delta(manifest):
            self.base = delta.latest_base(manifest, path)
        else:
            changes.reset([s.var for s in tables])  # a delta tried before it may have marked rows
            self.base = path
        if any(isinstance(s, KeyedTableState) for s in tables) and int(manifest["world_size"]) != world:
            self.base = None

    def describe(self, base: Path | None) -> str:
        return f"delta against {base.name}, " if base is not None else ""

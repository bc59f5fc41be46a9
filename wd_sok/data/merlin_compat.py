"""Three fixes to merlin-dataloader 23.8 (pinned), applied once, before a Loader is built.

1. **All-empty list column** (CPU): ``_convert_df_to_tensors`` tests ``isinstance(leaves[0], list)`` on the
   flattened ids of a multi-hot column; when every list of the chunk is empty (a sparse multi-hot feature in
   the final partial batch, or in a whole file) pandas raises ``KeyError: 0`` from the loader thread and
   training dies. :func:`_pull_apart_list` returns those no ids as an empty int64 series that answers
   ``[0]`` with None, so the chunk becomes an all-empty ragged batch (pooled to zeros) as it should.
2. **Busy-waiting loader thread**: ``ChunkQueue.put`` retries ``queue.put(packet, timeout=put_wait)`` with
   ``put_wait=1e-6`` (not settable from ``Loader``). Once its queue is full, which is nearly always when the
   consumer is a training step on CPU, the thread spins a whole core and takes the GIL every microsecond
   until the step takes the chunk: on a 2-core machine that steals a large share of each training step.
   ``Queue.put`` wakes as soon as a slot frees, whatever the timeout, which only bounds how late ``stop()``
   is noticed, so a 50 ms timeout costs nothing.
3. **Slow list flattening** (CPU): ``merlin.core.dispatch.pull_apart_list`` flattens a list column with
   ``pd.Series(itertools.chain(*s))`` (one Python object per id, then pandas' type inference) and takes its
   offsets from ``s.map(len).cumsum()`` (a Python call per row). :func:`split_lists` converts the column's
   row arrays to one pyarrow ``ListArray`` instead (a C++ pass over the rows) and reads the values and
   offsets off it: the same values, dtype and offsets (int64). Measured with
   ``benchmarks/loader_throughput.py`` (3 multi-hot features): 36k rows/s (Merlin) -> 139k (an earlier
   ``np.concatenate``, batch 4096) -> see benchmarks/README.md for this one.
"""

from __future__ import annotations

from typing import Any

PUT_WAIT_S = 0.05
_applied = False


class _NoLeaves:
    """Stands in for an empty pandas series of ids: ``[0]`` is None, not ``empty`` (Merlin would make it
    None instead of a tensor), and converts to an empty int64 array."""

    empty = False

    def __init__(self, series: Any) -> None:
        import numpy as np

        self.series = series.astype(np.int64)

    def __getitem__(self, key: Any) -> Any:
        return None if key == 0 else self.series[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.series, name)

    def __len__(self) -> int:
        return 0


def split_lists(series: Any) -> tuple[Any, Any] | None:
    """``(values, offsets)`` pandas series of a pandas series whose rows are 1-D numpy arrays (what
    ``pull_apart_list`` returns for it: values [sum of lengths] in the rows' dtype, offsets [rows + 1] int64
    from 0), or None when the rows are something else (lists of lists, Python lists, nulls): Merlin's own
    path handles those."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if not isinstance(series, pd.Series) or not len(series):
        return None
    rows = series.to_numpy()
    first = rows[0]
    if not isinstance(first, np.ndarray) or first.ndim != 1 or first.dtype == object:
        return None
    try:
        lists = pa.array(rows, type=pa.list_(pa.from_numpy_dtype(first.dtype)))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError):
        return None
    if lists.null_count:  # a None row: Merlin's path raises on it, as it should
        return None
    values = lists.flatten().to_numpy(zero_copy_only=False)
    offsets = lists.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    return pd.Series(values), pd.Series(offsets)


def apply() -> None:
    """Patch merlin.dataloader's loader_base (idempotent; only CPU pandas chunks take the new paths)."""
    global _applied
    if _applied:
        return
    import pandas as pd
    from merlin.dataloader import loader_base

    original_pull = loader_base.pull_apart_list

    def _pull_apart_list(original: Any, device: Any = None) -> tuple[Any, Any]:
        split = split_lists(original)
        leaves, offsets = split if split is not None else original_pull(original, device=device)
        if isinstance(leaves, pd.Series) and len(leaves) == 0:
            leaves = _NoLeaves(leaves)
        return leaves, offsets

    loader_base.pull_apart_list = _pull_apart_list

    original_init = loader_base.ChunkQueue.__init__

    def _init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.put_wait = max(self.put_wait, PUT_WAIT_S)

    loader_base.ChunkQueue.__init__ = _init
    _applied = True

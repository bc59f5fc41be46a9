"""The NVTabular workflow of a prep run, fit on the staged train split only, and what it implies for the spec.

Graph (inputs: the staged columns of :mod:`wd_sok.prep.stage`)::

    vocabulary columns  >> Categorify(freq_threshold | max_size)  >> [multi-hot: ListSlice(max_hotness)]
                        >> FinishIds                                       -> ids in [0, V + 1)
    --hash_buckets cols >> HashIds(N)                                      -> ids in [0, N)
    numerical, train minimum >= 0 >> FillMissing(0) >> Clip(min 0) >> LogOp >> Normalize  -> float32
    numerical, train minimum <  0 >> FillMissing(0) >> Normalize                           -> float32
    label, map          (pass-through)

Ids. NVTabular 23.08's Categorify emits 0 (padding, never), 1 (null: never here, staging turns missing
cells into the category ``""``), 2 (out of vocabulary: unseen in train, below ``freq_threshold`` or past
``max_size``) and ``3 + rank`` for the V vocabulary values. :class:`FinishIds` maps that to
``max(id - 2, 0)``: **0 = unseen / rare**, 1..V = the vocabulary, so the spec's cardinality is V + 1.
The log rule: a numerical column gets ``log(1 + x)`` iff its training minimum is >= 0 (counts); values
below 0 that show up later (test, ``--apply``) are clipped to 0 first so the log stays finite. Columns with
negative training values (e.g. Criteo's I2) are only filled and normalised.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from dask.callbacks import Callback

from wd_sok.prep.options import PrepOptions
from wd_sok.prep.stage import StageStats

with warnings.catch_warnings():  # merlin warns that its torch/triton dtype mappings are absent
    warnings.filterwarnings("ignore", message=".*dtype mappings did not load.*", category=UserWarning)
    from merlin.core.dispatch import encode_list_column, flatten_list_column_values, is_list_dtype
    from nvtabular.ops.operator import ColumnSelector, Operator

logger = logging.getLogger("wd_sok.prep")
CATEGORIFY_RESERVED = 2  # Categorify's padding (0) and null (1) slots; its OOV id 2 becomes our 0


class FinishIds(Operator):
    """Categorify ids -> ours: ``max(id - 2, 0)`` (see the module docstring), lists element-wise."""

    def transform(self, col_selector: ColumnSelector, df: Any) -> Any:
        for name in col_selector.names:
            col = df[name]
            if is_list_dtype(col):
                values = flatten_list_column_values(col)
                shifted = (values - CATEGORIFY_RESERVED).clip(lower=0)
                df[name] = encode_list_column(col, shifted)
            else:
                df[name] = (col - CATEGORIFY_RESERVED).clip(lower=0)
        return df



class HashIds(Operator):
    """id = hash(value) % buckets, the hash of the value alone (pandas ``hash_array``, computed on the host
    so a workflow hashes alike on CPU and GPU). NVTabular 23.08's HashBucket is not used: on CPU it hashes
    with ``hash_pandas_object(series)``, whose default mixes in the row index, so one value gets different
    buckets in different rows."""

    def __init__(self, buckets: dict[str, int]) -> None:
        super().__init__()
        self.buckets = dict(buckets)

    def transform(self, col_selector: ColumnSelector, df: Any) -> Any:
        for name in col_selector.names:
            col = df[name]
            host = col.to_pandas() if hasattr(col, "to_pandas") and not isinstance(col, pd.Series) else col
            ids = pd.util.hash_array(host.to_numpy(dtype=object), categorize=True) % np.uint64(self.buckets[name])
            df[name] = type(col)(ids.astype(np.int64), index=col.index, name=name)
        return df


class FitProgress(Callback):
    """Log the share of finished dask tasks of each fit pass, in steps of 20%."""

    passes = 0

    def _start_state(self, dsk: Any, state: Any) -> None:
        self.passes += 1
        self.total, self.done, self.next, self.start = max(len(dsk), 1), 0, 0.2, time.perf_counter()

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self.done += 1
        if self.done / self.total >= self.next:
            logger.info("fit pass %d: %d%% of %d tasks (%.1f s)", self.passes, 100 * self.done // self.total,
                        self.total, time.perf_counter() - self.start)
            self.next += 0.2


def log_columns(opts: PrepOptions, stats: StageStats) -> list[str]:
    """Numerical columns that get log(1 + x): those whose training minimum is >= 0."""
    return [n for n in opts.numerical if stats.minimum.get(n, -1.0) >= 0]


def build_workflow(opts: PrepOptions, stats: StageStats, out_path: Path) -> tuple[Any, Any]:
    """(unfitted ``nvtabular.Workflow``, its Categorify op or None); ``out_path`` holds the vocabularies."""
    import nvtabular as nvt
    from nvtabular import ops

    vocab = [c for c in opts.categorical + list(opts.multihot) if c not in opts.hash_buckets]
    parts: list[Any] = []
    categorify = None
    if vocab:
        categorify = ops.Categorify(freq_threshold=opts.freq_threshold,
                                    max_size=opts.max_vocab + CATEGORIFY_RESERVED if opts.max_vocab else 0,
                                    out_path=str(out_path))
        encoded = vocab >> categorify
        onehot = [c for c in vocab if c in opts.categorical]
        if onehot:
            parts.append(encoded[onehot] >> FinishIds())
        for name in (c for c in vocab if c in opts.multihot):
            parts.append(encoded[[name]] >> ops.ListSlice(0, max(stats.hotness.get(name, 1), 1)) >> FinishIds())
    hashed = [c for c in opts.categorical if c in opts.hash_buckets]
    if hashed:
        parts.append(hashed >> HashIds({c: opts.hash_buckets[c] for c in hashed}))
    logged = log_columns(opts, stats)
    plain = [n for n in opts.numerical if n not in logged]
    if logged:
        parts.append(logged >> ops.FillMissing(fill_val=0.0) >> ops.Clip(min_value=0.0) >> ops.LogOp()
                     >> ops.Normalize(out_dtype=np.float32))
    if plain:
        parts.append(plain >> ops.FillMissing(fill_val=0.0) >> ops.Normalize(out_dtype=np.float32))
    passthrough = [opts.label] + ([opts.map] if opts.map else [])
    graph = parts[0]
    for node in parts[1:]:
        graph = graph + node
    return nvt.Workflow(graph + passthrough), categorify


def cardinalities(opts: PrepOptions, categorify: Any) -> dict[str, int]:
    """Table rows per categorical feature after :class:`FinishIds` / :class:`HashIds` (ids lie in [0, rows))."""
    cards = {name: int(n) for name, n in opts.hash_buckets.items()}
    if categorify is not None:
        vocab = [c for c in opts.categorical + list(opts.multihot) if c not in opts.hash_buckets]
        sizes = categorify.get_embedding_sizes(vocab)  # {name: (Categorify's rows, its width)}
        for name in vocab:
            cards[name] = int(sizes[name][0]) - CATEGORIFY_RESERVED
    return {name: cards[name] for name in opts.categorical + list(opts.multihot)}


def fit(opts: PrepOptions, stats: StageStats, workflow_dir: Path, cpu: bool) -> tuple[Any, dict[str, int]]:
    """Fit the workflow on the staged train files; return (fitted workflow, cardinalities)."""
    import nvtabular as nvt

    workflow, categorify = build_workflow(opts, stats, workflow_dir)
    train = nvt.Dataset([str(p) for p in stats.files["train"]], engine="parquet", cpu=cpu, part_size="1GB")
    with FitProgress():
        workflow.fit(train)
    return workflow, cardinalities(opts, categorify)

"""Write the transformed splits as parquet parts and the ``feature_spec.yaml`` that describes them.

Part files: ``{split}/part_{i}.parquet`` with the final dtypes (one-hot int32, or int64 raw ids with
``--raw-ids``, see :mod:`~wd_sok.outbrain.rawids`; multi-hot ``list<int32>`` of
1..3 ids, numerical and label float32, ``display_id`` int64 in test only). Train parts are cut at any row;
test parts are cut only where ``display_id`` changes, so a display never spans two files (the test split
arrives sorted by display_id). Every fixed categorical id is checked to lie in ``[0, cardinality)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from wd_sok.feature_spec import FeatureSpec
from wd_sok.outbrain import features as F
from wd_sok.outbrain import rawids as R


def part_plan(total_rows: int, rows_per_part: int, min_parts: int) -> int:
    """Target rows per part: ``ceil(total / max(min_parts, ceil(total / rows_per_part)))`` (>= 1)."""
    n_parts = max(min_parts, math.ceil(total_rows / max(rows_per_part, 1)), 1)
    return max(1, math.ceil(total_rows / n_parts))


def multihot_array(slots: np.ndarray) -> pa.ListArray:
    """int32 [n, k] slot ids (0 = empty) -> ``list<int32>`` of the non-zero ids in slot order; a row with
    none becomes ``[0]`` (the "unknown" id)."""
    keep = slots != F.UNKNOWN_ID
    empty = ~keep.any(axis=1)
    keep[empty, 0] = True
    counts = keep.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(slots[keep].astype(np.int32)))


def to_table(df: pd.DataFrame, with_map: bool, raw: R.DistinctIds | None = None) -> pa.Table:
    """Workflow output (pandas) -> arrow table in the spec's column order and dtypes; checks id ranges.

    ``raw``: the raw-id features (:mod:`~wd_sok.outbrain.rawids`), written int64 unchecked (``uuid`` after the
    other one-hot features); their values are recorded in it when it ``collects`` (the train split).
    """
    columns: dict[str, pa.Array] = {}
    raw_names = list(raw.parts) if raw is not None else []
    for name in F.ONEHOT_COLUMNS + [n for n in raw_names if n not in F.ONEHOT_COLUMNS]:
        values = df[name].to_numpy()
        if name in raw_names:
            if raw.collects:
                raw.observe(name, values)
            columns[name] = pa.array(values.astype(np.int64))
            continue
        _check_range(name, values)
        columns[name] = pa.array(values.astype(np.int32))
    for name in F.MULTIHOT_COLUMNS:
        slots = np.stack([df[c].to_numpy() for c in F.slot_columns(name)], axis=1)
        _check_range(name, slots)
        columns[name] = multihot_array(slots)
    for name in F.NUMERIC_COLUMNS:
        values = df[name].to_numpy(np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"feature '{name}': {int((~np.isfinite(values)).sum())} non-finite values")
        columns[name] = pa.array(values)
    columns[F.LABEL_COLUMN] = pa.array(df[F.LABEL_COLUMN].to_numpy(np.float32))
    if with_map:
        columns[F.DISPLAY_ID_COLUMN] = pa.array(df[F.DISPLAY_ID_COLUMN].to_numpy(np.int64))
    return pa.table(columns)


def _check_range(name: str, values: np.ndarray) -> None:
    card = F.HASH_BUCKETS[name]
    if values.size and (values.min() < 0 or values.max() >= card):
        raise ValueError(f"feature '{name}': ids outside [0, {card}): min {values.min()}, max {values.max()}")


def _display_cut(display_ids: np.ndarray, target: int) -> int:
    """Largest display boundary <= target (> 0), else the first boundary after it; 0 if there is none."""
    boundaries = np.flatnonzero(display_ids[1:] != display_ids[:-1]) + 1
    if not len(boundaries):
        return 0
    before = boundaries[boundaries <= target]
    return int(before[-1]) if len(before) else int(boundaries[0])


def write_parts(frames: Iterable[Any], out_dir: Path, split: str, target_rows: int,
                raw: R.DistinctIds | None = None) -> list[str]:
    """Write the workflow output ``frames`` (in order) as ``out_dir/split/part_{i}.parquet`` of about
    ``target_rows`` rows; returns the paths relative to ``out_dir``. Test parts end on display boundaries.
    ``raw``: see :func:`to_table`."""
    test = split == "test"
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    buffer: list[pa.Table] = []
    buffered = 0

    def flush(table: pa.Table) -> None:
        rel = f"{split}/part_{len(written)}.parquet"
        pq.write_table(table, out_dir / rel)
        written.append(rel)

    for frame in frames:
        if hasattr(frame, "to_pandas") and not isinstance(frame, pd.DataFrame):
            frame = frame.to_pandas()
        if not len(frame):
            continue
        buffer.append(to_table(frame, with_map=test, raw=raw))
        buffered += len(frame)
        while buffered > target_rows:
            table = pa.concat_tables(buffer)
            cut = target_rows
            if test:
                cut = _display_cut(table[F.DISPLAY_ID_COLUMN].to_numpy(), target_rows)
                if cut == 0:  # a single display so far: wait for its end
                    break
            flush(table.slice(0, cut))
            buffer, buffered = [table.slice(cut)], table.num_rows - cut
    if buffered:
        flush(pa.concat_tables(buffer))
    if not written:  # an empty split still gets one (empty) file so the spec stays valid
        names = F.ONEHOT_COLUMNS + [s for m in F.MULTIHOT_COLUMNS for s in F.slot_columns(m)] + \
            F.NUMERIC_COLUMNS + [F.LABEL_COLUMN, F.DISPLAY_ID_COLUMN] + list(raw.parts if raw else [])
        flush(to_table(pd.DataFrame({n: np.zeros(0, dtype=np.int64) for n in names}), with_map=test, raw=raw))
    return written


def build_spec(out_dir: Path, train_files: list[str], test_files: list[str], metadata: dict[str, Any],
               capacities: dict[str, int] | None = None) -> FeatureSpec:
    """The validated spec of the written dataset (embedding sizes live in the spec, nowhere else).

    ``capacities``: raw-id features -> their dynamic capacity (``uuid`` among them is appended to the one-hot
    channel); they are declared ``dynamic: {capacity}``, int64.
    """
    capacities = dict(capacities or {})
    onehot = F.ONEHOT_COLUMNS + [n for n in capacities if n not in F.ONEHOT_COLUMNS]
    feature_spec: dict[str, dict[str, Any]] = {}
    for name in onehot:
        if name in capacities:
            dim = F.EMBEDDING_DIMS.get(name, R.UUID_EMBEDDING_DIM)
            feature_spec[name] = {"dtype": "int64", "dynamic": {"capacity": capacities[name]}, "embedding_dim": dim}
            continue
        feature_spec[name] = {"dtype": "int32", "cardinality": F.HASH_BUCKETS[name],
                              "embedding_dim": F.EMBEDDING_DIMS[name]}
    for name in F.MULTIHOT_COLUMNS:
        feature_spec[name] = {"dtype": "int32", "cardinality": F.HASH_BUCKETS[name],
                              "max_hotness": F.MAX_HOTNESS, "embedding_dim": F.EMBEDDING_DIMS[name]}
    for name in F.NUMERIC_COLUMNS:
        feature_spec[name] = {"dtype": "float32"}
    feature_spec[F.LABEL_COLUMN] = {"dtype": "float32"}
    feature_spec[F.DISPLAY_ID_COLUMN] = {"dtype": "int64"}
    train_features = onehot + F.MULTIHOT_COLUMNS + F.NUMERIC_COLUMNS + [F.LABEL_COLUMN]
    raw = {
        "channel_spec": {"onehot_categorical": list(onehot),
                         "multihot_categorical": list(F.MULTIHOT_COLUMNS),
                         "numerical": list(F.NUMERIC_COLUMNS), "label": [F.LABEL_COLUMN],
                         "map": [F.DISPLAY_ID_COLUMN]},
        "feature_spec": feature_spec,
        "source_spec": {
            "train": [{"type": "parquet", "features": train_features, "files": list(train_files)}],
            "test": [{"type": "parquet", "features": [*train_features, F.DISPLAY_ID_COLUMN],
                      "files": list(test_files)}],
        },
        "metadata": metadata,
    }
    spec = FeatureSpec.from_dict(raw, base_directory=out_dir, origin=str(out_dir / "feature_spec.yaml"))
    return spec

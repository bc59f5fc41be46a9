"""Run the fitted workflow over staged files and write the output parquet parts.

Each part holds the output columns in spec order (one-hot, multi-hot, numerical, label[, map]) in the spec's
dtypes exactly (ids int32 or int64, multi-hot ``list<int>``, floats float32, map int64), since the loader
compares them. A split of R rows gets ``max(min_parts, ceil(R / rows_per_part))`` parts. Without a map the
parts keep the staged row order, cut at any row. With a map (test, or ``--apply`` input that has the map
column) the rows are sorted by map id across all parts (stable: rows of a group keep their input order) and
the parts are cut only between groups, so a group never spans two files.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from wd_sok.prep.errors import PrepError
from wd_sok.prep.options import PrepOptions

logger = logging.getLogger("wd_sok.prep")


def n_parts(rows: int, opts: PrepOptions) -> int:
    return max(opts.min_parts, math.ceil(rows / opts.rows_per_part), 1)


def frames(workflow: Any, files: list[Path], cpu: bool, what: str) -> Iterator[pd.DataFrame]:
    """The workflow's output over ``files``, one pandas frame per partition, in order (progress logged)."""
    import nvtabular as nvt

    ds = nvt.Dataset([str(p) for p in files], engine="parquet", cpu=cpu, part_size="1GB")
    ddf = workflow.transform(ds).to_ddf()
    start, rows = time.perf_counter(), 0
    for i in range(ddf.npartitions):
        frame = ddf.get_partition(i).compute(scheduler="synchronous")
        if hasattr(frame, "to_pandas") and not isinstance(frame, pd.DataFrame):
            frame = frame.to_pandas()
        rows += len(frame)
        logger.info("transform %s: partition %d/%d, %s rows (%s rows/s)", what, i + 1, ddf.npartitions,
                    f"{rows:,}", f"{rows / max(time.perf_counter() - start, 1e-9):,.0f}")
        yield frame


def part_name(prefix: str, i: int) -> str:
    """Relative path of part ``i``: ``prefix/part_i.parquet`` (``part_i.parquet`` without a prefix)."""
    return f"{prefix}/part_{i}.parquet" if prefix else f"part_{i}.parquet"


def _list_array(col: pd.Series, dtype: str) -> pa.Array:
    arrays = [np.asarray(v) for v in col.to_numpy()]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    values = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values))


def to_table(df: pd.DataFrame, opts: PrepOptions, dtypes: dict[str, str], cards: dict[str, int],
             columns: list[str]) -> pa.Table:
    """A workflow output frame -> an arrow table of ``columns`` in their spec dtypes (ids range-checked)."""
    out: dict[str, pa.Array] = {}
    for name in columns:
        if name in opts.multihot:
            out[name] = _list_array(df[name], dtypes[name])
            ids = out[name].flatten().to_numpy()
        else:
            values = df[name].to_numpy()
            out[name] = pa.array(values.astype(dtypes[name]))
            ids = values if name in cards else None
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= cards[name]):
            raise RuntimeError(f"column '{name}': workflow emitted ids outside [0, {cards[name]}): "
                               f"{ids.min()}..{ids.max()} (a bug)")
    return pa.table(out)


class Parts:
    """Cut a stream of tables into ``count`` parts of about ``ceil(rows / count)`` rows, in order."""

    def __init__(self, out_dir: Path, prefix: str, rows: int, count: int) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.target = max(1, math.ceil(rows / count))
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.files: list[str] = []
        (out_dir / prefix).mkdir(parents=True, exist_ok=True)

    def _flush(self, table: pa.Table) -> None:
        rel = part_name(self.prefix, len(self.files))
        pq.write_table(table, self.out_dir / rel)
        self.files.append(rel)

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.target:
            table = pa.concat_tables(self.buffer)
            self._flush(table.slice(0, self.target))
            rest = table.slice(self.target)
            self.buffer, self.buffered = [rest], rest.num_rows

    def close(self) -> list[str]:
        if self.buffered:
            self._flush(pa.concat_tables(self.buffer))
        return self.files


def write_split(workflow: Any, files: list[Path], rows: int, out_dir: Path, prefix: str, opts: PrepOptions,
                dtypes: dict[str, str], cards: dict[str, int], columns: list[str], cpu: bool) -> list[str]:
    """Transform ``files`` (``rows`` rows) and write them as parts in staged order; relative paths."""
    parts = Parts(out_dir, prefix, rows, n_parts(rows, opts))
    for frame in frames(workflow, files, cpu, prefix or "input"):
        parts.add(to_table(frame, opts, dtypes, cards, columns))
    return parts.close()


def group_bounds(files: list[Path], map_name: str, count: int) -> np.ndarray:
    """Upper map ids (exclusive) of ``count`` ranges of about equal rows, cut between groups; int64 [<=count-1].
    Reads only the map column of the staged ``files``."""
    counts: pd.Series | None = None
    for path in files:
        c = pq.read_table(path, columns=[map_name]).column(0).to_pandas().value_counts()
        counts = c if counts is None else counts.add(c, fill_value=0)
    counts = counts.sort_index()
    ids, cum = counts.index.to_numpy(np.int64), np.cumsum(counts.to_numpy())
    total = cum[-1]
    cuts = np.searchsorted(cum, [total * j / count for j in range(1, count)], side="left")
    cuts = np.unique(np.minimum(cuts + 1, len(ids)))
    return ids[cuts[cuts < len(ids)]]


def write_sorted(workflow: Any, files: list[Path], rows: int, out_dir: Path, prefix: str, opts: PrepOptions,
                 dtypes: dict[str, str], cards: dict[str, int], columns: list[str], cpu: bool,
                 scratch: Path) -> list[str]:
    """Like :func:`write_split`, but sorted by the map column and cut between groups (module docstring)."""
    count = n_parts(rows, opts)
    bounds = group_bounds(files, opts.map, count)
    if len(bounds) + 1 < opts.min_parts:
        raise PrepError(f"column '{opts.map}': the {prefix or 'input'} rows hold {len(bounds) + 1} group(s), "
                        f"fewer than the {opts.min_parts} parts asked for (--min_parts)")
    pieces: list[list[Path]] = [[] for _ in range(len(bounds) + 1)]
    scratch.mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(frames(workflow, files, cpu, prefix or "input")):
        table = to_table(frame, opts, dtypes, cards, columns)
        bucket = np.searchsorted(bounds, table.column(opts.map).to_numpy(), side="right")
        for j in np.unique(bucket):
            path = scratch / f"b{j}_{k}.parquet"
            pq.write_table(table.filter(pa.array(bucket == j)), path)
            pieces[j].append(path)
    written: list[str] = []
    (out_dir / prefix).mkdir(parents=True, exist_ok=True)
    for group in pieces:
        table = pa.concat_tables([pq.read_table(p) for p in group])
        order = np.argsort(table.column(opts.map).to_numpy(), kind="stable")
        rel = part_name(prefix, len(written))
        pq.write_table(table.take(pa.array(order)), out_dir / rel)
        written.append(rel)
    shutil.rmtree(scratch, ignore_errors=True)
    return written

"""Which rows each rank reads: row ranges of the concatenated files, balanced by rows, from footers alone.

Every rank computes the same plan from the parquet footers (row counts, row-group sizes, map-id statistics),
with no collective:

* the mapping's files are concatenated, in spec order (test) or in an order shuffled from (seed, epoch)
  (train), into one sequence of ``T`` global rows;
* rank r of N reads global rows ``[cut[r], cut[r+1])`` with ``cut[r] = r * T // N``, so every rank reads
  ``T // N`` or ``T // N + 1`` rows whatever the number of files (one file and many ranks included);
* on the test mapping with a map (display) channel each cut is moved forward to the next group start, so a
  display group is never split between ranks, even when it straddles two files (which the rank then reads
  one after the other). The map ids must be non-decreasing along the concatenation; row-group statistics
  catch a violation between row groups and files at start-up (the value checks catch one inside a group).

A rank's rows are a list of :data:`Segment` (file, first row, end row), read by row groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from wd_sok import storage
from wd_sok.feature_spec import SpecError

Segment = tuple[Path | str, int, int]  # (file: a path or URL, first row, end row), rows local to the file


@dataclass(frozen=True)
class FileInfo:
    """What the footer says about one parquet file.

    Attributes:
        path: the file.
        group_rows: rows of each row group, in file order.
        map_min, map_max: per row group, the map column's min / max from the statistics (None if absent).
    """

    path: Path | str
    group_rows: tuple[int, ...]
    map_min: tuple[int | None, ...] = ()
    map_max: tuple[int | None, ...] = ()

    @property
    def rows(self) -> int:
        return sum(self.group_rows)


def read_info(path: Path | str, metadata: pq.FileMetaData, map_feature: str | None) -> FileInfo:
    """The :class:`FileInfo` of ``path`` from its footer ``metadata``."""
    groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    lo: list[int | None] = []
    hi: list[int | None] = []
    if map_feature is not None:
        index = metadata.schema.names.index(map_feature) if map_feature in metadata.schema.names else -1
        for i in range(metadata.num_row_groups):
            stats = metadata.row_group(i).column(index).statistics if index >= 0 else None
            ok = stats is not None and stats.has_min_max
            lo.append(int(stats.min) if ok else None)
            hi.append(int(stats.max) if ok else None)
    return FileInfo(path, groups, tuple(lo), tuple(hi))


def even_cuts(total: int, world: int) -> list[int]:
    """``[r * total // world for r in 0..world]``: rank r reads rows [cut[r], cut[r+1])."""
    return [r * total // world for r in range(world + 1)]


def epoch_order(n_files: int, seed: int, epoch: int) -> list[int]:
    """The file order of ``epoch``: a permutation that is a function of (seed, epoch) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EED])).permutation(n_files).tolist()


def segments(infos: list[FileInfo], start: int, stop: int) -> list[Segment]:
    """The pieces of global rows [start, stop) of the concatenation of ``infos`` (in that order)."""
    out, offset = [], 0
    for info in infos:
        a, b = max(start, offset), min(stop, offset + info.rows)
        if a < b:
            out.append((info.path, a - offset, b - offset))
        offset += info.rows
    return out


def read_segment(path: Path | str, first: int, end: int, columns: list[str], group_rows: tuple[int, ...]):  # noqa: ANN201
    """Rows [first, end) of ``path`` (only the row groups that hold them are read) as a pyarrow Table."""
    bounds = np.concatenate([[0], np.cumsum(group_rows)]).astype(np.int64)
    g0 = int(np.searchsorted(bounds, first, side="right")) - 1
    g1 = int(np.searchsorted(bounds, end, side="left"))
    table = storage.parquet_file(path).read_row_groups(list(range(g0, g1)), columns=columns)
    return table.slice(first - int(bounds[g0]), end - first)


def check_map_order(infos: list[FileInfo], map_feature: str) -> None:
    """Refuse a test mapping whose row groups / files are out of map-id order (statistics only).

    A file or row group whose smallest id is below the previous one's largest cannot be sorted; an equal id
    is a group that continues across the boundary, which the cuts keep on one rank.
    """
    prev: tuple[Path, int] | None = None
    for info in infos:
        for lo, hi in zip(info.map_min, info.map_max, strict=True):
            if lo is None or hi is None:
                prev = None  # no statistics: the value checks still see it
                continue
            if prev is not None and lo < prev[1]:
                where = f"after {prev[0]}" if prev[0] != info.path else "in an earlier row group"
                raise SpecError(f"{info.path}: feature '{map_feature}': test mapping not sorted by map id: group "
                                f"{lo} comes {where}, which reaches {prev[1]} (sort the test rows by "
                                f"'{map_feature}')")
            prev = (info.path, hi)


def group_cuts(infos: list[FileInfo], map_feature: str, world: int) -> list[int]:
    """Even cuts moved forward to the next display-group start (the map ids are non-decreasing)."""
    total = sum(i.rows for i in infos)
    cuts = even_cuts(total, world)
    for r in range(1, world):
        cuts[r] = max(cuts[r - 1], _next_group_start(infos, map_feature, cuts[r]))
    return cuts


def _next_group_start(infos: list[FileInfo], map_feature: str, cut: int) -> int:
    """The first global row >= ``cut`` whose map id differs from row ``cut - 1``'s (or the end)."""
    if cut <= 0:
        return 0
    groups = [(info, g, rows) for info in infos for g, rows in enumerate(info.group_rows)]
    offset, value = 0, None
    for info, g, rows in groups:
        if value is None:
            if offset + rows < cut:  # row cut - 1 lies further on
                offset += rows
                continue
            ids = _map_ids(info, g, map_feature)
            value = ids[cut - 1 - offset]
            at = int(np.searchsorted(ids, value, side="right"))
        else:
            lo = info.map_min[g] if info.map_min else None
            if lo is not None and lo > value:
                return offset
            at = int(np.searchsorted(_map_ids(info, g, map_feature), value, side="right"))
        if at < rows:
            return offset + max(at, cut - offset)
        offset += rows
    return offset


def _map_ids(info: FileInfo, group: int, map_feature: str) -> np.ndarray:
    column = storage.parquet_file(info.path).read_row_group(group, columns=[map_feature]).column(0)
    return column.to_numpy(zero_copy_only=False)

"""Read the raw inputs block by block, check every value, split train/test and stage typed parquet.

Inputs: CSV / TSV (a header row, or ``--no_header --names``) or parquet, one file or a glob, read in blocks
(``pyarrow.csv.open_csv``, ``ParquetFile.iter_batches``) so files larger than memory stream through.
Staged columns (``stage/{train,test}/s_<k>.parquet`` of about 2^18 rows, every type explicit so that no block
is ever typed ``null``):

=================  ============================================================================
categorical        string; an empty or null cell becomes ``""`` (one more category: "missing")
multi-hot          list<string>: the cell split on its separator, empty items dropped ("" -> [])
numerical          float64; an empty cell is null (filled by the workflow)
label              float64, every value 0 or 1
map                int64 (the group id); only with ``--map``
=================  ============================================================================

Split (``--test_fraction F``): a row goes to test iff ``u < F``, ``u`` a uniform in [0, 1) from a seeded
hash of its ``--split_by`` value (so a group never straddles train and test) or, without ``--split_by``,
of its global row number in input order. Deterministic: the same inputs and seed give the same split.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from wd_sok.prep.errors import PrepError, show, where
from wd_sok.prep.options import PrepOptions

logger = logging.getLogger("wd_sok.prep")
CSV_BLOCK_BYTES = 1 << 24
PARQUET_BATCH_ROWS = 1 << 18
STAGE_ROWS = 1 << 18  # rows per staged file: a partition of the workflow's fit and transform
PARQUET_SUFFIXES = (".parquet", ".pq")
_SEED_MIX = np.uint64(0x9E3779B97F4A7C15)


def expand(pattern: str, flag: str) -> list[Path]:
    """Files matching ``pattern`` (a path or a glob), sorted; PrepError if none."""
    files = sorted(Path(p) for p in glob(pattern) if Path(p).is_file())
    if not files:
        raise PrepError(f"{flag} {pattern}: no file matches")
    return files


def uniform_hash(values: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic uniforms in [0, 1) from ``values`` (object strings or integers) [n] -> float64 [n]."""
    h = pd.util.hash_array(values, categorize=False)
    h = pd.util.hash_array(h ^ (np.uint64(seed) * _SEED_MIX))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class StageStats:
    """What staging saw. ``present``: non-missing cells per column in train; ``minimum``: train minimum of
    each numerical column (NaN if none); ``hotness``: longest list per multi-hot column (train and test)."""

    rows: dict[str, int] = field(default_factory=lambda: {"train": 0, "test": 0})
    files: dict[str, list[Path]] = field(default_factory=lambda: {"train": [], "test": []})
    present: dict[str, int] = field(default_factory=dict)
    minimum: dict[str, float] = field(default_factory=dict)
    hotness: dict[str, int] = field(default_factory=dict)
    has_label: bool = True
    has_map: bool = True


# ----------------------------------------------------------------------------- reading
def _csv_header(path: Path, sep: str) -> list[str]:
    try:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh, delimiter=sep), None)
    except OSError as e:
        raise PrepError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise PrepError(f"{path}: the header is not UTF-8 text") from None
    if not header:
        raise PrepError(f"{path}: empty file (a header row naming the columns is expected; "
                        f"use --no_header --names for files without one)")
    return [h.strip() for h in header]


def _present(path: Path, available: list[str], wanted: list[str], optional: tuple[str, ...]) -> list[str]:
    for name in wanted:
        if name not in available and name not in optional:
            shown = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
            raise PrepError(f"{where(path, name)}not found in the file (its columns: {shown})")
    return [n for n in wanted if n in available]


def read_blocks(path: Path, opts: PrepOptions, wanted: list[str],
                optional: tuple[str, ...] = ()) -> Iterator[tuple[pa.Table, int, bool]]:
    """Yield ``(table, first_line, is_parquet)`` blocks of ``path`` with the ``wanted`` columns present in it
    (CSV cells as strings, "" = null). ``optional`` columns may be absent. ``first_line``: the file line
    (CSV) or row (parquet, 0-based) of the block's first row."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise PrepError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None
        cols = _present(path, pf.schema_arrow.names, wanted, optional)
        row = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols):
            yield pa.Table.from_batches([batch]), row, True
            row += batch.num_rows
        return
    sep = opts.sep_for(path)
    if opts.header:
        names = _csv_header(path, sep)
        read = pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
        line = 2
    else:
        names = list(opts.names)
        read = pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, column_names=names)
        line = 1
    cols = _present(path, names, wanted, optional)
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in cols}, include_columns=cols,
                                   strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True)
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=pacsv.ParseOptions(delimiter=sep),
                                convert_options=convert)
        for batch in reader:
            yield pa.Table.from_batches([batch]), line, False
            line += batch.num_rows
    except pa.ArrowInvalid as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepError(f"{path}: malformed {'CSV' if sep != chr(9) else 'TSV'} near line {line}: {problem}") \
            from None
    except OSError as e:
        raise PrepError(f"{path}: cannot read ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- conversion
def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _cast(col: pa.Array, to: pa.DataType, fail: Callable[[int, str], PrepError], what: str) -> pa.Array:
    """Cast ``col`` to ``to``; on failure name the first cell that does not convert."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = pc.utf8_trim_whitespace(col)
    try:
        return pc.cast(col, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        lo, hi = 0, len(col)
        while hi - lo > 1:  # the first cell on which the cast fails
            mid = (lo + hi) // 2
            try:
                pc.cast(col.slice(lo, mid - lo), to)
                lo = mid
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                hi = mid
        raise fail(lo, f"value {show(col[lo].as_py())} is not {what}") from None


def _as_text(col: pa.Array) -> pa.Array:
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    return pc.fill_null(pc.utf8_trim_whitespace(col), "")


def _split_list(col: pa.Array, sep: str) -> pa.Array:
    """string cells -> list<string> of the non-empty items between ``sep`` ("" or null -> [])."""
    lists = pc.split_pattern(_as_text(col), sep)
    items = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    keep = pc.not_equal(items, "")
    parents = pc.filter(pc.list_parent_indices(lists), keep).to_numpy(zero_copy_only=False)
    lengths = np.bincount(parents, minlength=len(col))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
    return pa.ListArray.from_arrays(offsets, pc.filter(items, keep))


def convert_block(table: pa.Table, path: Path, line: int, parquet: bool, opts: PrepOptions) -> pa.Table:
    """One raw block -> the staged columns (module docstring), checking every value."""
    out: dict[str, pa.Array] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()

        def fail(i: int, problem: str, name: str = name) -> PrepError:
            return PrepError(f"{where(path, name, line + i, row=parquet)}{problem}")

        if name in opts.categorical or name == opts.split_only:
            out[name] = _as_text(col)
        elif name in opts.multihot:
            out[name] = _split_list(col, opts.multihot[name])
        elif name in opts.numerical:
            values = _cast(col, pa.float64(), fail, "a number")
            v = values.to_numpy(zero_copy_only=False)
            bad = _first(~np.isfinite(v) & ~np.isnan(v))
            if bad is not None:
                raise fail(bad, f"value {show(col[bad].as_py())} is not a finite number")
            out[name] = values
        elif name == opts.label:
            if col.null_count:
                raise fail(_first(col.is_null().to_numpy(zero_copy_only=False)), "label is missing (empty cell)")
            values = _cast(col, pa.float64(), fail, "a 0/1 label").to_numpy(zero_copy_only=False)
            bad = _first((values != 0) & (values != 1))
            if bad is not None:
                raise fail(bad, f"label {show(col[bad].as_py())} is not 0 or 1")
            out[name] = pa.array(values)
        elif name == opts.map:
            if col.null_count:
                raise fail(_first(col.is_null().to_numpy(zero_copy_only=False)), "map (group) id is missing")
            out[name] = _cast(col, pa.int64(), fail, "an integer group id")
    return pa.table(out)


# ----------------------------------------------------------------------------- staging
class Stager:
    """Writes staged blocks under ``folder/{train,test}`` and gathers :class:`StageStats`."""

    def __init__(self, opts: PrepOptions, folder: Path) -> None:
        self.opts, self.folder = opts, folder
        self.stats = StageStats()
        self.row_number = 0  # global input row of the next train-input row (row-hash split)
        # columns allowed to be absent (--apply: label, map) -> (fill value, arrow type); which files had them
        self.fill: dict[str, tuple[object, pa.DataType]] = {}
        self.had: dict[str, list[tuple[Path, bool]]] = {}
        self.pending: dict[str, list[pa.Table]] = {"train": [], "test": []}
        for split in ("train", "test"):
            (folder / split).mkdir(parents=True, exist_ok=True)

    def _track(self, table: pa.Table, split: str) -> None:
        st = self.stats
        for name in self.opts.multihot:
            lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
            longest = int(lengths.max()) if len(lengths) else 0
            st.hotness[name] = max(st.hotness.get(name, 0), longest)
        if split != "train":
            return
        for name in table.column_names:
            col = table.column(name)
            if name in self.opts.multihot:
                n = int(pc.sum(pc.greater(pc.list_value_length(col), 0)).as_py() or 0)
            elif name in self.opts.categorical:
                n = int(pc.sum(pc.not_equal(col, "")).as_py() or 0)
            else:
                n = len(col) - col.null_count
            st.present[name] = st.present.get(name, 0) + n
        for name in self.opts.numerical:
            low = pc.min(table.column(name)).as_py()
            if low is not None:
                st.minimum[name] = min(st.minimum.get(name, low), low)

    def _write(self, table: pa.Table, split: str) -> None:
        if not table.num_rows:
            return
        self._track(table, split)
        self.pending[split].append(table.select([n for n in table.column_names if n != self.opts.split_only]))
        self.stats.rows[split] += table.num_rows
        if sum(t.num_rows for t in self.pending[split]) >= STAGE_ROWS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        """Write the pending blocks of ``split`` as one staged file (one workflow partition)."""
        if self.pending[split]:
            path = self.folder / split / f"s_{len(self.stats.files[split]):05d}.parquet"
            pq.write_table(pa.concat_tables(self.pending[split]), path)
            self.stats.files[split].append(path)
            self.pending[split] = []

    def finish(self) -> StageStats:
        """Write what is still pending; return the statistics."""
        for split in self.pending:
            self._flush(split)
        return self.stats

    def add(self, table: pa.Table, role: str) -> None:
        """Stage a converted block from a train input (``role="train"``, split when ``test_fraction``) or a
        test input (``role="test"``)."""
        n = table.num_rows
        if role == "train" and self.opts.test_fraction > 0:
            if self.opts.split_by:
                key = table.column(self.opts.split_by)
                values = key.to_numpy(zero_copy_only=False) if pa.types.is_integer(key.type) else \
                    np.asarray(_as_text(key).to_numpy(zero_copy_only=False), dtype=object)
            else:
                values = np.arange(self.row_number, self.row_number + n, dtype=np.int64)
            test = uniform_hash(values, self.opts.seed) < self.opts.test_fraction
            self._write(table.filter(pa.array(~test)), "train")
            self._write(table.filter(pa.array(test)), "test")
        else:
            self._write(table, role)
        if role == "train":
            self.row_number += n

    def stage_files(self, files: list[Path], role: str) -> None:
        """Read, convert and stage every file (``role``: "train" or "test"); log progress per block. Columns
        in ``self.fill`` may be absent from a file: they are staged as a constant, and ``self.had`` says
        which files held them."""
        wanted = self.opts.input_columns()
        if role == "test" or self.opts.test_fraction == 0:
            wanted = [c for c in wanted if c != self.opts.split_only]
        start, rows = time.perf_counter(), 0
        optional = tuple(self.fill)
        for path in files:
            for k, (table, line, parquet) in enumerate(read_blocks(path, self.opts, wanted, optional)):
                staged = convert_block(table, path, line, parquet, self.opts)
                for name, (value, kind) in self.fill.items():
                    if k == 0:
                        self.had.setdefault(name, []).append((path, name in staged.column_names))
                    if name not in staged.column_names:
                        staged = staged.append_column(name, pa.array(np.full(staged.num_rows, value), kind))
                self.add(staged, role)
                rows += table.num_rows
                rate = rows / max(time.perf_counter() - start, 1e-9)
                logger.info("read %s: %s rows so far (%s rows/s)", path.name, f"{rows:,}", f"{rate:,.0f}")

"""CSV -> parquet transcoder for feature-spec datasets (``wd-sok-transcode``).

Input: a feature spec whose chunks are CSV files with a header row naming the columns (extra columns are
ignored). Cells: one-hot and map ids are integers, in [0, cardinality) unless the feature is dynamic (any
int64); a dynamic feature named in ``--hash_ids`` takes any text instead (string ids such as uuids), each id
stored as :func:`wd_sok.tools.rawids.hash_string` of its trimmed text (low 63 bits of its BLAKE2b-64);
numerical and label values are finite floats (labels in [0, 1]); a multi-hot cell is its ids separated by
spaces (``"5 17 3"``, as ``wd-sok-generate`` writes; the reference's ``"[5, 17, 3]"`` is accepted too), an
empty cell being an empty list. A mapping split
into several chunks is joined column-wise by row position. Map ids must not decrease along the test files.

Output (written to a temporary folder beside ``--output``, renamed into place only when complete):
``train/part_<i>.parquet`` and ``test/part_<i>.parquet`` of ``--chunk_size`` rows each (test parts are cut
only at map-group boundaries, so a part may hold up to one group more), each column in the spec's dtype
(multi-hot: ``list<int>``), and a feature spec with parquet chunks and explicit dtypes. Only channel
features are written. Bad input raises :class:`TranscodeError`, one line naming file, feature, line and
value; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from wd_sok.feature_spec import CHANNELS, TEST, TRAIN, FeatureSpec, SpecError
from wd_sok.tools.outdir import SPEC_FILE, atomic_output_dir, check_parquet_dtypes, output_spec_dict
from wd_sok.tools.rawids import hash_strings

DEFAULT_CHUNK_SIZE = 1 << 20
READ_BLOCK_BYTES = 1 << 24
INT_PATTERN = r"^-?[0-9]+$"
Fail = Callable[[int, str], "TranscodeError"]


class TranscodeError(ValueError):
    """Bad transcoder input; the message is one line: ``<file>: feature '<name>': line <n>: <problem>``."""


# ----------------------------------------------------------------------------- parsing
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def _first_true(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _first_failure(values: pa.Array, convert: Callable[[pa.Array], Any]) -> int:
    """Index of the first element of ``values`` on which ``convert`` raises (it raises on all of them)."""
    lo, hi = 0, len(values)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(values.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, ValueError):
            hi = mid
    return lo


def _parse_ints(text: pa.Array, rows: np.ndarray, fail: Fail, what: str, hint: str = "") -> np.ndarray:
    """int64[n] from trimmed strings; ``rows[i]`` is the row of ``text[i]`` for messages."""
    ok = pc.match_substring_regex(text, INT_PATTERN).to_numpy(zero_copy_only=False)
    bad = _first_true(~ok)
    if bad is not None:
        value = text[bad].as_py()
        problem = "empty value" if value == "" else f"{what} {_show(value)} is not an integer{hint}"
        raise fail(int(rows[bad]), problem)
    try:
        return pc.cast(text, pa.int64()).to_numpy()
    except pa.ArrowInvalid:
        bad = _first_failure(text, lambda part: pc.cast(part, pa.int64()))
        raise fail(int(rows[bad]), f"{what} {_show(text[bad].as_py())} does not fit int64") from None


def _check_ids(ids: np.ndarray, rows: np.ndarray, low: int, high: int, fail: Fail, what: str,
               rule: str) -> None:
    bad = _first_true((ids < low) | (ids > high))
    if bad is not None:
        raise fail(int(rows[bad]), f"{what} {ids[bad]} {rule}")


def _categorical_ids(text: pa.Array, rows: np.ndarray, spec: FeatureSpec, name: str, fail: Fail,
                     hashed: frozenset[str], what: str) -> np.ndarray:
    """int64[n] ids of trimmed id strings ``text`` (``rows[i]``: the row of ``text[i]``), range-checked: in
    [0, cardinality) for a fixed feature, within the dtype for a dynamic one (hashed if in ``hashed``)."""
    if name in hashed:
        empty = _first_true(pc.equal(text, "").to_numpy(zero_copy_only=False))
        if empty is not None:
            raise fail(int(rows[empty]), "empty value")
        return hash_strings(text.to_numpy(zero_copy_only=False))
    dynamic = spec.dynamic(name) is not None
    hint = f" (string ids of dynamic feature '{name}': pass --hash_ids {name})" if dynamic else ""
    ids = _parse_ints(text, rows, fail, what, hint)
    if dynamic:
        info = np.iinfo(spec.dtype(name))
        _check_ids(ids, rows, info.min, info.max, fail, "id", f"does not fit {spec.dtype(name)}")
    else:
        card = spec.cardinality(name)
        _check_ids(ids, rows, 0, card - 1, fail, "id", f"is outside [0, {card}) (cardinality)")
    return ids


def _convert_multihot(text: pa.Array, spec: FeatureSpec, name: str, fail: Fail,
                      hashed: frozenset[str]) -> pa.Array:
    n = len(text)
    clean = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"[\[\],]", " "))
    lists = pc.split_pattern_regex(clean, r"\s+")
    tokens = pc.list_flatten(lists)
    keep = pc.not_equal(tokens, "")
    tokens = pc.filter(tokens, keep)
    parents = pc.filter(pc.list_parent_indices(lists), keep).to_numpy(zero_copy_only=False)
    lengths = np.bincount(parents, minlength=n)
    hot = spec.max_hotness(name)
    bad = _first_true(lengths > hot)
    if bad is not None:
        raise fail(bad, f"list {_show(text[bad].as_py())} has {lengths[bad]} ids, more than "
                        f"max_hotness {hot}")
    ids = _categorical_ids(tokens, parents, spec, name, fail, hashed, "id")
    dtype = spec.dtype(name)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(ids.astype(dtype))).cast(
        pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))


def _convert_float(text: pa.Array, spec: FeatureSpec, name: str, fail: Fail) -> pa.Array:
    rows = np.arange(len(text))
    empty = _first_true(pc.equal(text, "").to_numpy(zero_copy_only=False))
    if empty is not None:
        raise fail(empty, "empty value")
    try:
        values = pc.cast(text, pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        bad = _first_failure(text, lambda part: pc.cast(part, pa.float64()))
        raise fail(bad, f"value {_show(text[bad].as_py())} is not a number") from None
    dtype = spec.dtype(name)
    stored = values.astype(dtype)
    bad = _first_true(~np.isfinite(stored))
    if bad is not None:
        raise fail(bad, f"value {_show(text[bad].as_py())} is not a finite {dtype}")
    if name == spec.label:
        _check_ids(values, rows, 0, 1, fail, "label", "is outside [0, 1]")
    return pa.array(stored)


def _convert(batch: pa.RecordBatch, spec: FeatureSpec, path: Path, first_line: int,
             state: dict[str, Any], hashed: frozenset[str] = frozenset()) -> pa.Table:
    """Typed table of one CSV batch of strings; ``state`` carries the last map id across batches."""
    columns = {}
    for name in batch.schema.names:
        def fail(row: int, problem: str, name: str = name) -> TranscodeError:
            return TranscodeError(f"{path}: feature '{name}': line {first_line + row}: {problem}")
        text = pc.utf8_trim_whitespace(batch.column(name))
        if name in spec.multihot:
            columns[name] = _convert_multihot(text, spec, name, fail, hashed)
        elif name in spec.onehot:
            ids = _categorical_ids(text, np.arange(len(text)), spec, name, fail, hashed, "value")
            columns[name] = pa.array(ids.astype(spec.dtype(name)))
        elif name == spec.map_feature:
            dtype = spec.dtype(name)
            ids = _parse_ints(text, np.arange(len(text)), fail, "value")
            info = np.iinfo(dtype)
            _check_ids(ids, np.arange(len(ids)), info.min, info.max, fail, "value", f"does not fit {dtype}")
            prev = np.concatenate([[state.get("last_map", ids[0] if len(ids) else 0)], ids[:-1]])
            bad = _first_true(ids < prev)
            if bad is not None:
                raise fail(bad, f"map id {ids[bad]} after {prev[bad]}: test rows must be sorted by "
                                f"'{name}' (groups contiguous)")
            if len(ids):
                state["last_map"] = int(ids[-1])
            columns[name] = pa.array(ids.astype(dtype))
        else:
            columns[name] = _convert_float(text, spec, name, fail)
    return pa.table(columns)


def read_chunk(spec: FeatureSpec, chunk: dict[str, Any], features: list[str],
               hashed: frozenset[str] = frozenset()) -> Iterator[pa.Table]:
    """Yield typed tables (columns ``features``, in that order) of one CSV chunk's files, in order
    (string ids of the dynamic features ``hashed`` hashed to int64)."""
    state: dict[str, Any] = {}
    for file in chunk["files"]:
        path = spec.base_directory / file
        try:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh), None)
        except OSError as e:
            raise TranscodeError(f"{path}: cannot read ({e.strerror})") from None
        if not header:
            raise TranscodeError(f"{path}: empty file (a header row naming the columns is required)")
        for name in features:
            if name not in header:
                raise TranscodeError(f"{path}: feature '{name}': column missing from the header")
        options = pacsv.ConvertOptions(column_types={n: pa.string() for n in features},
                                       include_columns=features)
        line = 2
        try:
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=READ_BLOCK_BYTES),
                                    convert_options=options)
            for batch in reader:
                yield _convert(batch, spec, path, line, state, hashed)
                line += batch.num_rows
        except pa.ArrowInvalid as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TranscodeError(f"{path}: malformed CSV near line {line}: {problem}") from None


class _Rows:
    """Take exactly-sized row blocks out of a stream of tables."""

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        self.tables, self.pending, self.count = tables, [], 0

    def take(self, n: int) -> pa.Table | None:
        """Up to ``n`` rows (fewer only at the end); None once the stream is exhausted."""
        while self.count < n:
            table = next(self.tables, None)
            if table is None:
                break
            self.pending.append(table)
            self.count += table.num_rows
        if not self.count:
            return None
        table = pa.concat_tables(self.pending)
        head, rest = table.slice(0, n), table.slice(n)
        self.pending, self.count = ([rest] if rest.num_rows else []), rest.num_rows
        return head


def _cut(n_rows: int, chunk_size: int, ids: np.ndarray | None, at_end: bool) -> int | None:
    """Rows to write as the next part out of ``n_rows`` buffered ones (map ids int[n_rows] or None),
    or None to wait for more rows."""
    if n_rows <= chunk_size:
        return n_rows if at_end else None
    if ids is None:
        return chunk_size
    cut = int(np.searchsorted(ids, ids[chunk_size], side="left"))
    if cut == 0:                      # one group larger than a part: the part holds the whole group
        cut = int(np.searchsorted(ids, ids[0], side="right"))
        if cut == n_rows and not at_end:
            return None
    return cut


def transcode_mapping(spec: FeatureSpec, mapping: str, out_dir: Path, chunk_size: int,
                      hashed: frozenset[str] = frozenset()) -> tuple[list[str], int]:
    """Write one mapping's parts under ``out_dir/mapping``; return (relative part paths, rows)."""
    wanted = {n for c in CHANNELS for n in spec.channel(c)}
    chunks = [c for c in spec.source_spec[mapping] if any(n in wanted for n in c["features"])]
    streams = [_Rows(read_chunk(spec, c, [n for n in c["features"] if n in wanted], hashed)) for c in chunks]
    map_name = spec.map_feature if mapping == TEST and spec.map_feature else None
    block = max(1 << 16, chunk_size)
    (out_dir / mapping).mkdir()
    parts: list[str] = []
    buffer: list[pa.Table] = []
    rows = 0
    at_end = False
    while not at_end:
        first = streams[0].take(block)
        want = first.num_rows if first is not None else 0
        others = [s.take(max(want, 1)) for s in streams[1:]]
        for i, other in enumerate(others, 1):
            if (other.num_rows if other is not None else 0) != want:
                raise TranscodeError(f"{spec.origin}: mapping '{mapping}': chunk {i} ({chunks[i]['files']}) "
                                     f"and chunk 0 ({chunks[0]['files']}) have different row counts")
        if first is None:
            at_end = True
        else:
            merged = pa.table({n: p.column(n) for p in [first, *others] for n in p.column_names})
            buffer.append(merged)
            rows += merged.num_rows
        if not buffer:
            continue
        table = pa.concat_tables(buffer)
        ids = table.column(map_name).to_numpy() if map_name else None
        start = 0
        while start < table.num_rows:
            cut = _cut(table.num_rows - start, chunk_size, None if ids is None else ids[start:], at_end)
            if cut is None:
                break
            rel = f"{mapping}/part_{len(parts)}.parquet"
            pq.write_table(table.slice(start, cut), out_dir / rel)
            parts.append(rel)
            start += cut
        buffer = [table.slice(start)] if start < table.num_rows else []
    if not rows:
        files = ", ".join(str(f) for f in spec.files(mapping))
        raise TranscodeError(f"{spec.origin}: mapping '{mapping}': no rows in {files}")
    return parts, rows


def transcode(spec: FeatureSpec | str | Path, out_dir: str | Path, chunk_size: int = DEFAULT_CHUNK_SIZE,
              overwrite: bool = False, feature_spec_out: str = SPEC_FILE,
              hash_ids: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Transcode a CSV dataset (a spec or its YAML path) into parquet under ``out_dir``.

    ``hash_ids``: dynamic int64 features whose cells are string ids, stored as their
    :func:`~wd_sok.tools.rawids.hash_string`.
    Returns {"rows": {train, test}, "parts": {train, test}, "feature_spec": path of the new spec}.
    Raises TranscodeError / SpecError (nothing is left at ``out_dir`` then).
    """
    if not isinstance(spec, FeatureSpec):
        spec = FeatureSpec.from_yaml(spec, allow_csv=True)
    if chunk_size < 1:
        raise TranscodeError(f"chunk_size must be >= 1, got {chunk_size}")
    for mapping in (TRAIN, TEST):
        for i, chunk in enumerate(spec.source_spec[mapping]):
            if chunk["type"] != "csv":
                raise TranscodeError(f"{spec.origin}: mapping '{mapping}' chunk {i}: type is "
                                     f"{chunk['type']!r}, the transcoder reads csv")
    try:
        check_parquet_dtypes(spec)
    except ValueError as e:
        raise TranscodeError(str(e)) from None
    for name in hash_ids:
        if name not in spec.dynamic_features or spec.dtype(name) != "int64":
            raise TranscodeError(f"{spec.origin}: feature '{name}': --hash_ids is for dynamic int64 features "
                                 f"(dynamic: {', '.join(spec.dynamic_features) or 'none'})")
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for mapping in (TRAIN, TEST):
            files[mapping], rows[mapping] = transcode_mapping(spec, mapping, tmp, chunk_size, frozenset(hash_ids))
        out_spec = FeatureSpec.from_dict(output_spec_dict(spec, files, "parquet"), base_directory=tmp,
                                         origin=str(Path(out_dir) / feature_spec_out))
        out_spec.to_yaml(tmp / feature_spec_out)
        sizes_file = spec.base_directory / "embedding_sizes.json"
        if sizes_file.is_file():
            shutil.copyfile(sizes_file, tmp / sizes_file.name)
    return {"rows": rows, "parts": {m: len(f) for m, f in files.items()},
            "feature_spec": str(Path(out_dir) / feature_spec_out)}


def main(argv: list[str] | None = None) -> int:
    """``wd-sok-transcode``: exit 0 and print a summary line, or print one error line and exit 2."""
    parser = argparse.ArgumentParser(prog="wd-sok-transcode", description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="", help="folder of the CSV dataset (holds --feature_spec_in)")
    parser.add_argument("--feature_spec_in", default=SPEC_FILE, help="input spec (relative to --input)")
    parser.add_argument("--output", required=True, help="output folder (missing or empty)")
    parser.add_argument("--feature_spec_out", default=SPEC_FILE, help="name of the written spec")
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE, help="rows per parquet part")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--hash_ids", default="", metavar="FEATURE[,FEATURE]",
                        help="dynamic int64 features holding string ids (e.g. uuids): store each as the low 63 "
                             "bits of the BLAKE2b-64 of its UTF-8 text (default: none, ids must be integers)")
    args = parser.parse_args(argv)
    try:
        summary = transcode(Path(args.input) / args.feature_spec_in, args.output, args.chunk_size,
                            args.overwrite, args.feature_spec_out,
                            [f.strip() for f in args.hash_ids.split(",") if f.strip()])
    except (SpecError, TranscodeError, OSError) as e:
        print(f"wd-sok-transcode: error: {e}", file=sys.stderr)
        return 2
    rows, parts = summary["rows"], summary["parts"]
    print(f"wrote {rows[TRAIN]} train rows in {parts[TRAIN]} parts and {rows[TEST]} test rows in "
          f"{parts[TEST]} parts; spec {summary['feature_spec']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

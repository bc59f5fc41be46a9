"""Keyed (dynamic) tables in the sharded checkpoint format: rows named by key, re-sharded by key on restore.

Per table and writing rank, standard .npy files ``<group>.<table>.<array>.r<rank>-of-<N>.npy``:

* ``key`` [n] int64, ``value`` [n, dim] float32, one per portable optimizer slot [n, dim] float32 (``rms``,
  ``accumulator``, ``linear``), ``count`` [n] int64 (occurrences seen) and ``last`` [n] int64 (clock of the
  last training step that saw it): row ``i`` of every file is the same key;
* ``pending_key`` / ``pending_count`` [p] int64: keys seen fewer than ``min_count`` times and their counts.

The manifest's table entry says ``placement: "dynamic"`` with the table's ``dynamic`` rules, and per shard
``{rank, count, pending, clock, files}`` (``clock``: the collection's training-step clock, the same on every
rank). A table's shards hold whatever keys their writers owned; nothing in the format depends on N.

Restore under M ranks (any backend with a keyed table): each rank streams every shard's files in lockstep,
block by block (:func:`~wd_sok.checkpoint.format.block_rows` rows at a time), keeps the keys it owns under M
(``collection.owns``: ``mix64(k) % M == rank`` for the CPU backend) and those rows of the other arrays: it
never holds more than one block of each array beyond its own rows. Keys are spread over every block, so every
block is read anyway, and every file read (keys, values, slots, counters, pending) is checked against the
manifest: size and header first, CRC32 at its end. Keys beyond a rank's capacity under M (a full table
re-sharded unevenly) are dropped, with a warning naming the table and how many.
"""

from __future__ import annotations

import io
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wd_sok.checkpoint.format import CorruptCheckpoint, block_rows, read_npy_header, shard_file, write_npy_header
from wd_sok.state import KeyedTableState
from wd_sok.storage.paths import AnyPath, open_binary, open_sequential

PLACEMENT = "dynamic"
INT_ARRAYS = ("key", "count", "last", "pending_key", "pending_count")


def table_info(state: KeyedTableState) -> dict[str, Any]:
    """The manifest fields of a keyed table besides its shards."""
    d = state.table.dynamic
    return {"cardinality": state.table.cardinality, "dim": state.table.dim, "dtype": "float32",
            "placement": PLACEMENT, "dynamic": {"capacity": d.capacity, "min_count": d.min_count,
                                                "evict": d.evict}}


def write_keyed(folder: Path, state: KeyedTableState, rank: int, world: int, files: dict[str, dict]
                ) -> dict[str, Any]:
    """Write this rank's rows (and pending keys) of one keyed table; returns its shard record."""
    n, dim = state.count(), state.table.dim
    pending_keys, pending_counts = state.pending()
    shard = {"rank": rank, "count": n, "pending": int(pending_keys.size),
             "clock": int(state.collection.clock_value()), "files": {}}
    step = block_rows(dim)

    def write(array: str, shape: tuple[int, ...], dtype: type, blocks: Any) -> None:
        name = shard_file(state.key, array, rank, world)
        header = io.BytesIO()
        write_npy_header(header, shape, dtype)
        with open_sequential(folder / name) as f:  # O_DIRECT + fsync; object stores: multipart upload
            f.write(header.getvalue())
            for block in blocks:
                f.write_behind(np.ascontiguousarray(block, dtype))
        files[name] = {"bytes": f.size, "crc32": f.crc}
        shard["files"][array] = name

    for array in state.arrays():
        wide = array not in INT_ARRAYS
        write(array, (n, dim) if wide else (n,), np.float32 if wide else np.int64,
              (state.read(array, lo, min(n, lo + step)) for lo in range(0, n, step)))
    write("pending_key", (pending_keys.size,), np.int64, [pending_keys])
    write("pending_count", (pending_keys.size,), np.int64, [pending_counts])
    return shard


def read_keyed(folder: Path, state: KeyedTableState, entry: dict[str, Any], files: dict[str, dict]) -> None:
    """Restore this rank's keys of one keyed table from every shard of its manifest ``entry``."""
    if entry.get("placement") != PLACEMENT:
        raise CorruptCheckpoint(f"{folder}: table '{state.key}': not a dynamic table in this checkpoint")
    coll, name = state.collection, state.table.name
    coll.clear_keyed(name)
    coll.set_clock(max([int(s.get("clock", 0)) for s in entry["shards"]] + [0]))
    wanted = [a for a in state.arrays() if a in entry["arrays"]]
    dropped = 0
    for shard in entry["shards"]:
        for keys_array, arrays, count in (("key", ["key", *wanted], int(shard["count"])),
                                          ("pending_key", ["pending_key", "pending_count"], int(shard["pending"]))):
            names = {a: shard["files"][a] for a in arrays}
            for got in _blocks(folder, state, names, files, count):
                mask = state.owns(got[keys_array])
                if not mask.any():
                    continue
                got = {a: v[mask] for a, v in got.items()}
                if keys_array == "key":
                    dropped += coll.insert_keyed(name, got)
                else:
                    coll.insert_pending(name, got["pending_key"], got["pending_count"])
    if dropped:
        warnings.warn(f"{folder}: table '{state.key}': {dropped} key(s) did not fit this rank's share of the "
                      "capacity under the new rank count and were dropped", stacklevel=2)


def _blocks(folder: Path, state: KeyedTableState, names: dict[str, str], files: dict[str, dict], count: int
            ) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{array: [<= block] or [<= block, dim] rows}`` of the files ``names`` (one shard: row i of each is
    the same key), front to back. Each file's size and header are checked before the first block and its CRC32
    after the last: a damaged file raises CorruptCheckpoint naming it."""
    dim, step = state.table.dim, block_rows(state.table.dim)
    opened: dict[str, tuple[Any, np.dtype, int]] = {}
    crcs: dict[str, int] = {}
    try:
        for array, name in names.items():
            where = f"{folder}: table '{state.key}' ({name})"
            f = open_binary(_check_size(folder, state, name, files))  # closed in finally; remote: ranged GETs
            opened[array] = (f, np.dtype(np.int64), 1)
            try:
                shape, dtype, offset = read_npy_header(f)
            except ValueError as e:
                raise CorruptCheckpoint(f"{where}: not a readable .npy file ({e})") from None
            wide = array not in INT_ARRAYS
            want = ((count, dim), np.float32) if wide else ((count,), np.int64)
            if shape != want[0] or dtype != want[1]:
                raise CorruptCheckpoint(f"{where}: holds {shape} {dtype}, the manifest says {want[0]} "
                                        f"{np.dtype(want[1])}")
            f.seek(0)
            crcs[array] = zlib.crc32(f.read(offset))
            opened[array] = (f, np.dtype(want[1]), dim if wide else 1)
        for lo in range(0, count, step):
            rows = min(count, lo + step) - lo
            block = {}
            for array, (f, dtype, width) in opened.items():
                data = f.read(rows * width * dtype.itemsize)
                if len(data) != rows * width * dtype.itemsize:
                    raise CorruptCheckpoint(f"{folder}: table '{state.key}' ({names[array]}): ends inside row "
                                            f"{lo + len(data) // (width * dtype.itemsize)}")
                crcs[array] = zlib.crc32(data, crcs[array])
                values = np.frombuffer(data, dtype)
                block[array] = values.reshape(rows, width) if width > 1 or array not in INT_ARRAYS else values
            yield block
    finally:
        for f, _, _ in opened.values():
            f.close()
    for array, name in names.items():
        if crcs[array] != files[name]["crc32"]:
            raise CorruptCheckpoint(f"{folder}: table '{state.key}' ({name}): checksum does not match the "
                                    "manifest (damaged file)")


def _check_size(folder: AnyPath, state: KeyedTableState, name: str, files: dict[str, dict]) -> AnyPath:
    path = folder / name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CorruptCheckpoint(f"{folder}: table '{state.key}' ({name}): {e.strerror}") from None
    if size != files.get(name, {}).get("bytes"):
        raise CorruptCheckpoint(f"{folder}: table '{state.key}' ({name}): {size} bytes, the manifest says "
                                f"{files.get(name, {}).get('bytes')} (truncated?)")
    return path

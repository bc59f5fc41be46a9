"""Keyed (dynamic) tables in the sharded checkpoint format: rows named by key, re-sharded by key on restore.

Per table and writing rank, standard .npy files ``<group>.<table>.<array>.r<rank>-of-<N>.npy``:

* ``key`` [n] int64, ``value`` [n, dim] float32, one per portable optimizer slot [n, dim] float32 (``rms``,
  ``accumulator``, ``linear``), ``count`` [n] int64 (occurrences seen) and ``last`` [n] int64 (clock of the
  last training step that saw it): row ``i`` of every file is the same key;
* ``pending_key`` / ``pending_count`` [p] int64: keys seen fewer than ``min_count`` times and their counts.

The manifest's table entry says ``placement: "dynamic"`` with the table's ``dynamic`` rules, and per shard
``{rank, count, pending, clock, files}`` (``clock``: the collection's training-step clock, the same on every
rank). A table's shards hold whatever keys their writers owned; nothing in the format depends on N.

Restore under M ranks (any backend with a keyed table): each rank streams every shard's ``key`` file block
by block (:func:`~wd_sok.checkpoint.format.block_rows` rows at a time, its CRC32 checked on the way), keeps
the keys it owns under M (``collection.owns``: ``mix64(k) % M == rank`` for the CPU backend) and copies just
those rows of the other arrays (memory-mapped reads of the block's owned rows): it never holds more than one
block beyond its own rows. Keys beyond a rank's capacity under M (a full table re-sharded unevenly) are
dropped, with a warning naming the table and how many.
"""

from __future__ import annotations

import io
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from wd_sok.checkpoint.directio import SequentialWriter
from wd_sok.checkpoint.format import CorruptCheckpoint, block_rows, read_npy_header, shard_file, write_npy_header
from wd_sok.state import KeyedTableState

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
        with SequentialWriter(folder / name) as f:
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
        for keys_array, arrays, count in (("key", wanted, int(shard["count"])),
                                          ("pending_key", ["pending_key", "pending_count"], int(shard["pending"]))):
            maps = {a: _open(folder, state, shard["files"][a], files, count) for a in arrays if a != keys_array}
            for lo, keys in _key_blocks(folder, state, shard["files"][keys_array], files, count):
                mask = state.owns(keys)
                if not mask.any():
                    continue
                got = {keys_array: keys[mask]}
                got.update({a: np.asarray(m[lo:lo + keys.size][mask]) for a, m in maps.items()})
                if keys_array == "key":
                    dropped += coll.insert_keyed(name, got)
                else:
                    coll.insert_pending(name, got["pending_key"], got["pending_count"])
    if dropped:
        warnings.warn(f"{folder}: table '{state.key}': {dropped} key(s) did not fit this rank's share of the "
                      "capacity under the new rank count and were dropped", stacklevel=2)


def _check_size(folder: Path, state: KeyedTableState, name: str, files: dict[str, dict]) -> Path:
    path = folder / name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CorruptCheckpoint(f"{folder}: table '{state.key}' ({name}): {e.strerror}") from None
    if size != files.get(name, {}).get("bytes"):
        raise CorruptCheckpoint(f"{folder}: table '{state.key}' ({name}): {size} bytes, the manifest says "
                                f"{files.get(name, {}).get('bytes')} (truncated?)")
    return path


def _open(folder: Path, state: KeyedTableState, name: str, files: dict[str, dict], count: int) -> np.ndarray:
    """A memory-mapped per-row array of a shard (rows are read only when indexed)."""
    path = _check_size(folder, state, name, files)
    try:
        arr = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise CorruptCheckpoint(f"{folder}: table '{state.key}' ({name}): not a readable .npy file ({e})") from None
    if arr.shape[:1] != (count,):
        raise CorruptCheckpoint(f"{folder}: table '{state.key}' ({name}): holds {arr.shape[0]} rows, the "
                                f"manifest says {count}")
    return arr


def _key_blocks(folder: Path, state: KeyedTableState, name: str, files: dict[str, dict], count: int):  # noqa: ANN202
    """Yield (first row, [<= block] int64 keys) of a key file, front to back; its CRC32 is checked at the end."""
    path = _check_size(folder, state, name, files)
    where = f"{folder}: table '{state.key}' ({name})"
    with open(path, "rb") as f:
        try:
            shape, dtype, offset = read_npy_header(f)
        except ValueError as e:
            raise CorruptCheckpoint(f"{where}: not a readable .npy file ({e})") from None
        if shape != (count,) or dtype != np.int64:
            raise CorruptCheckpoint(f"{where}: holds {shape} {dtype}, the manifest says ({count},) int64")
        f.seek(0)
        crc = zlib.crc32(f.read(offset))
        step = block_rows(state.table.dim)
        for lo in range(0, count, step):
            data = f.read(8 * (min(count, lo + step) - lo))
            crc = zlib.crc32(data, crc)
            yield lo, np.frombuffer(data, np.int64)
    if crc != files[name]["crc32"]:
        raise CorruptCheckpoint(f"{where}: checksum does not match the manifest (damaged file)")

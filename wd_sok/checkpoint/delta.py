"""Delta checkpoints: only the table rows changed since a full checkpoint (the base), plus the dense state.

A delta is a checkpoint folder of the same format (``ckpt-<step>/``, written in a temporary folder and renamed
once its manifest is in: a step exists iff its manifest does) whose manifest adds ``kind: "delta"`` and
``base: {step, path, crc32}`` (the base folder's name and the CRC32 of its ``manifest.json`` bytes, so a base
replaced by another save of the same step is refused). Deltas are differential: always relative to the last
full checkpoint, so a restore reads at most two folders. Per table and writing rank (:func:`shard_file`
names, ``.npy`` files, size and CRC32 in the manifest as in a full checkpoint):

* fixed tables: ``row`` [m] int64 global row ids (ascending), then ``value`` and every portable slot
  [m, dim] float32 of those rows (legacy format: the lazy RMSprop's ``rms`` caught up to the delta's step);
  shard ``{rank, count: m, start: 0, stride: 0, files}`` (no strided range: the ids are in the ``row`` file);
  the table's ``placement`` says :data:`PLACEMENT`.
* dynamic tables (rows named by key): ``pos`` [m] int64, the writer rank's saved positions that changed
  (ascending), and ``key`` / ``value`` / slots / ``count`` / ``last`` of those positions; all its pending
  keys (``pending_key`` / ``pending_count``). Shard ``{rank, count: rows in use, changed: m, pending, clock}``.
  A position keeps its row from the base unless the delta names it; an evicted key's position holds the key
  that took its row (the delta's positions carry the evictions: no key of the base survives a position the
  delta rewrote), and positions past the base's count are new rows. The writer ranks must be the base's.

Written by :func:`wd_sok.checkpoint.writer.save` with ``base=`` (same protocol, commit and retention, which
never removes a full checkpoint that a kept delta names: :func:`bases_needed`); a rank's files come from
:func:`write_tables`. :func:`wd_sok.checkpoint.reader.read_one` restores a delta with its base, so
``restore_latest`` takes the newest delta and, when it or its base is damaged, falls back to the previous
delta or the full one, every rank agreeing as for full checkpoints.

Restore (:func:`read_pair`, one rank, no collectives): the base's dense state first (the optimizers' step
counters at the base's step), the base's rows (each rank reads only blocks holding rows it owns), then the
delta's dense state (counters at the delta's step) and the delta's rows this rank owns (global ids in the
``row`` file -> owned mask), so the lazy RMSprop's ``last`` is the base's step for rows the delta does not
hold and the delta's step for those it does: caught up exactly as a full checkpoint at the delta's step
would hold them (rho = 0.5 scales exactly). Dynamic tables are merged position by position (base row or
delta row), then re-sharded by key as a full checkpoint is. Afterwards the change masks hold the delta's
rows, so a later delta against the same base stays complete.
"""

from __future__ import annotations

import io
import json
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from wd_sok import changes
from wd_sok.checkpoint import keyed, reader
from wd_sok.checkpoint.format import (
    DENSE,
    MANIFEST,
    CorruptCheckpoint,
    block_rows,
    read_manifest,
    read_npy_header,
    shard_file,
    write_npy_header,
)
from wd_sok.optim import write_slot_rows
from wd_sok.state import KeyedTableState, State, TableState
from wd_sok.storage.paths import is_object_path, open_binary, open_ranges, open_sequential

KIND = "delta"
PLACEMENT = "delta: the shard's row file holds each row's global id"
ROW, POS = "row", "pos"
PARALLEL_FILES = 4  # a rank's delta files written at once (_put_all)
PIECE_BYTES = 2 << 20  # a delta file's rows are gathered and written in pieces of about this many bytes


def piece_rows(dim: int) -> int:
    """Rows per gathered piece of a delta file of width ``dim`` (float32): small, so that the first bytes reach
    the disk while the next rows are still being gathered (a full checkpoint's blocks are 16x larger)."""
    return max(1, PIECE_BYTES // (4 * max(dim, 1)))


def is_delta(manifest: dict[str, Any]) -> bool:
    return manifest.get("kind") == KIND


def base_ref(base: Path) -> dict[str, Any]:
    """The manifest field ``base`` naming full checkpoint folder ``base``: ``{step, path, crc32}``."""
    data = (base / MANIFEST).read_bytes()
    return {"step": int(json.loads(data)["step"]), "path": base.name, "crc32": zlib.crc32(data)}


def sizes(tables: list[State]) -> tuple[int, int]:
    """(bytes this rank's delta would write now, bytes its full checkpoint would write) over ``tables``, table
    files only (the dense state is in both): the full-or-delta choice sums them over ranks."""
    out, full = 0, 0
    for s in tables:
        width = s.table.dim * 4 * sum(a not in keyed.INT_ARRAYS for a in s.arrays()) + 8 * sum(
            a in keyed.INT_ARRAYS for a in s.arrays())
        if isinstance(s, KeyedTableState):
            rows, changed = s.count(), int(s.changed_rows().size)
        else:
            rows, changed = s.rows.count, int(s.changed_saved().size)
        full += rows * width
        out += changed * (width + 8)
    return out, full


def supported(tables: list[State]) -> bool:
    """Whether every table's changed rows are tracked (:mod:`wd_sok.changes`): fixed tables and the CPU
    dynamic tables; SOK's dynamic tables are updated by SOK's optimizer wrapper (``apply_own``), which marks
    no rows, so a save holding one is full (a delta would drop their updates since the base)."""
    return all(not isinstance(s, KeyedTableState) or not getattr(s.collection, "wraps_optimizer", False)
               for s in tables)


def bases_needed(folders: list[Path]) -> set[str]:
    """Names of the full checkpoints the deltas among ``folders`` are written against (retention keeps them)."""
    needed = set()
    for folder in folders:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and is_delta(manifest):
            needed.add(str(manifest.get("base", {}).get("path", "")))
    return needed


def _nbytes(shape: tuple[int, ...], dtype: type) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _put(folder: Path, name: str, shape: tuple[int, ...], dtype: type, blocks: Any) -> dict[str, int]:
    """One .npy file from ``blocks`` (pieces written in order, each while the next is gathered when the file
    spans more than one; a one-piece file is written directly: no writer thread), fsynced; its entry."""
    header = io.BytesIO()
    write_npy_header(header, shape, dtype)
    behind = _nbytes(shape, dtype) > PIECE_BYTES
    with open_sequential(folder / name) as f:  # the full writer's path (O_DIRECT, CRC32; URLs: multipart)
        f.write(header.getvalue())
        for block in blocks:
            (f.write_behind if behind else f.write)(np.ascontiguousarray(block, dtype))
    return {"bytes": f.size, "crc32": f.crc}


def _put_all(folder: Path, puts: list[tuple[str, tuple[int, ...], type, Any]], files: dict) -> None:
    """The files ``puts`` [(name, shape, dtype, blocks)], up to :data:`PARALLEL_FILES` at a time: a delta's
    files are small (changed rows only), so one at a time its save is the sum of per-file costs (the rows'
    gather, the copy, CRC32, write and fsync, each waiting for the last) where they overlap (each releases the
    GIL); biggest first. Memory: two pieces (:func:`piece_rows`) per file in flight. Uploads (object stores)
    go one at a time, as the full writer's do (one part buffered per upload). ``files`` gets each file's
    entry, in ``puts`` order."""
    workers = 1 if is_object_path(folder) else min(PARALLEL_FILES, len(puts)) or 1
    order = sorted(range(len(puts)), key=lambda i: -_nbytes(*puts[i][1:3]))
    with ThreadPoolExecutor(workers) as pool:  # biggest first: the threads end together
        done = {i: pool.submit(_put, folder, *puts[i]) for i in order}
        for i, (name, *_) in enumerate(puts):
            files[name] = done[i].result()


def _blocks(state: State, array: str, rows: np.ndarray, step: int) -> Iterator[np.ndarray]:
    """Rows ``rows`` of ``array``, ``step`` at a time (read when the file's writer takes them)."""
    for lo in range(0, int(rows.size), step):
        yield state.read_at(array, rows[lo:lo + step])


def _rows_puts(state: TableState, rank: int, world: int) -> tuple[dict[str, Any], list]:
    """This rank's changed rows of one fixed table (global ids, then each array's rows): (shard, puts)."""
    saved, dim = state.changed_saved(), state.table.dim
    m, step = int(saved.size), piece_rows(dim)
    # start / stride 0: not a strided range (the global ids are in the row file); kept for manifest checks
    shard: dict[str, Any] = {"rank": rank, "count": m, "start": 0, "stride": 0, "files": {}}
    puts: list = []
    for array in (ROW, *state.arrays()):
        name = shard_file(state.key, array, rank, world)
        if array == ROW:
            puts.append((name, (m,), np.int64, [state.rows.start + saved * state.rows.stride]))
        else:
            puts.append((name, (m, dim), np.float32, _blocks(state, array, saved, step)))
        shard["files"][array] = name
    return shard, puts


def _keyed_puts(state: KeyedTableState, rank: int, world: int) -> tuple[dict[str, Any], list]:
    """This rank's changed positions of one dynamic table, with every per-row array, and all pending keys:
    (shard, puts)."""
    pos, dim = state.changed_rows(), state.table.dim
    m, step = int(pos.size), piece_rows(dim)
    pending_keys, pending_counts = state.pending()
    shard: dict[str, Any] = {"rank": rank, "count": state.count(), "changed": m, "pending": int(pending_keys.size),
                             "clock": int(state.collection.clock_value()), "files": {}}
    puts: list = []
    for array in (POS, *state.arrays()):
        name = shard_file(state.key, array, rank, world)
        narrow = array == POS or array in keyed.INT_ARRAYS
        blocks = [pos] if array == POS else _blocks(state, array, pos, step)
        puts.append((name, (m,) if narrow else (m, dim), np.int64 if narrow else np.float32, blocks))
        shard["files"][array] = name
    for array, values in (("pending_key", pending_keys), ("pending_count", pending_counts)):
        name = shard_file(state.key, array, rank, world)
        puts.append((name, (values.size,), np.int64, [values]))
        shard["files"][array] = name
    return shard, puts


def write_tables(folder: Path, tables: list[State], rank: int, world: int, files: dict) -> dict[str, Any]:
    """This rank's delta files of every table in ``tables`` (written together: :func:`_put_all`); returns the
    shard record of each table by key, and adds each file's entry to ``files``."""
    def plan(state: State) -> tuple[dict[str, Any], list]:
        return (_keyed_puts if isinstance(state, KeyedTableState) else _rows_puts)(state, rank, world)

    with ThreadPoolExecutor(min(PARALLEL_FILES, len(tables)) or 1) as pool:  # the change-mask scans at once
        planned = list(pool.map(plan, tables))
    _put_all(folder, [put for _, more in planned for put in more], files)
    return {state.key: shard for state, (shard, _) in zip(tables, planned, strict=True)}


# ---------------------------------------------------------------------------------------------- restore
def base_manifest(folder: Path, dm: dict[str, Any], base: Path) -> dict[str, Any]:
    """The manifest of ``base``, after checking it is the checkpoint delta ``folder`` (manifest ``dm``) was
    written against (the CRC32 of its manifest bytes) and holds the same tables; CorruptCheckpoint if not."""
    try:
        data = (base / MANIFEST).read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(f"{folder}: its base {base.name}: {e.strerror or e}") from None
    if zlib.crc32(data) != dm.get("base", {}).get("crc32"):
        raise CorruptCheckpoint(f"{folder}: its base {base.name} is not the checkpoint it was written against "
                                "(manifest checksum differs)")
    bm = read_manifest(base)
    if set(dm["tables"]) != set(bm["tables"]):
        raise CorruptCheckpoint(f"{folder}: {MANIFEST}: its tables are not its base's")
    return bm


def read_pair(base: Path, delta: Path, tables: list[State], import_dense: reader.DenseImport) -> dict[str, Any]:
    """Restore this rank's part of full checkpoint ``base`` + delta ``delta`` (no collectives); returns the
    delta's manifest. CorruptCheckpoint when either is damaged or ``delta`` was not written against ``base``."""
    dm = read_manifest(delta)
    if not is_delta(dm):
        raise CorruptCheckpoint(f"{delta}: {MANIFEST}: not a delta checkpoint")
    bm = base_manifest(delta, dm, base)
    reader.check_compatible(base, bm, tables)
    if any(isinstance(s, KeyedTableState) for s in tables) and dm["world_size"] != bm["world_size"]:
        raise CorruptCheckpoint(f"{delta}: written by {dm['world_size']} ranks, its base by {bm['world_size']}: "
                                "dynamic tables' positions do not match")
    import_dense(_dense(base, bm), f"{base}: {DENSE}")
    fixups = []
    for state in tables:
        entry = bm["tables"][state.key]
        if isinstance(state, KeyedTableState):
            fixups.append(_merge_keyed(base, delta, state, entry, bm["files"], dm["tables"][state.key], dm["files"]))
            continue
        for array in state.arrays():
            for shard in entry["shards"] if array in entry["arrays"] else []:
                reader._read_shard(base, state, array, shard, bm["files"])  # noqa: SLF001 - the full reader's
    import_dense(_dense(delta, dm), f"{delta}: {DENSE}")  # step counters now at the delta's step
    for state in tables:
        if isinstance(state, TableState):
            changes.reset([state.var])
            _apply_rows(delta, state, dm["tables"][state.key], dm["files"])
    for state, rows, slots in fixups:  # delta rows of dynamic tables: slots current as of the delta's step
        changes.reset([state.var])
        changes.set_changed(state.var, rows)
        for array, values in slots.items() if rows.size else ():
            write_slot_rows(state.optimizer, state.var, array, tf.constant(rows, tf.int64), values)
    return dm


def _dense(folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    data = reader._read_whole(folder, DENSE, manifest["files"], "dense state")  # noqa: SLF001
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def _array(folder: Path, key: str, name: str, files: dict, rows: int, check: bool) -> np.ndarray:
    """A memory-mapped [rows, ...] array file of a shard, its size checked (and its CRC32 when ``check``)."""
    where, path = f"{folder}: table '{key}' ({name})", folder / name
    try:
        size = path.stat().st_size
        if size != files.get(name, {}).get("bytes"):
            raise CorruptCheckpoint(f"{where}: {size} bytes, the manifest says {files.get(name, {}).get('bytes')}")
        if check:
            crc = 0
            with open_binary(path) as f:
                while chunk := f.read(8 << 20):
                    crc = zlib.crc32(chunk, crc)
            if crc != files[name].get("crc32"):
                raise CorruptCheckpoint(f"{where}: checksum does not match the manifest (damaged file)")
        if is_object_path(path):  # an object store: no memory map, the (delta-sized) file is fetched whole
            arr = np.load(io.BytesIO(path.read_bytes()))
        else:
            arr = np.load(path, mmap_mode="r" if rows else None)
    except OSError as e:
        raise CorruptCheckpoint(f"{where}: {e.strerror}") from None
    except ValueError as e:
        raise CorruptCheckpoint(f"{where}: not a readable .npy file ({e})") from None
    if rows and arr.shape[:1] != (rows,):
        raise CorruptCheckpoint(f"{where}: holds {arr.shape[0]} rows, the manifest says {rows}")
    return arr


def _apply_rows(folder: Path, state: TableState, entry: dict[str, Any], files: dict) -> None:
    """Write the delta's rows of one fixed table that this rank owns (every array); blocks without any are
    not read. Marks them changed."""
    dim, step = state.table.dim, block_rows(state.table.dim)
    for shard in entry["shards"]:
        m = int(shard["count"])
        if not m:
            continue
        rows = np.asarray(_array(folder, state.key, shard["files"][ROW], files, m, check=True))
        mask, var_rows = state.owned(rows)
        if not mask.any():
            continue
        changes.set_changed(state.var, var_rows)
        blocks = [lo for lo in range(0, m, step) if mask[lo:lo + step].any()]
        for array in (a for a in state.arrays() if a in entry["arrays"]):
            name, where = shard["files"][array], f"{folder}: table '{state.key}' ({shard['files'][array]})"
            _array(folder, state.key, name, files, m, check=False)  # size and shape
            with open_binary(folder / name) as f:
                _, _, offset = read_npy_header(f)
                f.seek(0)
                crc = zlib.crc32(f.read(offset))
            spans = [(offset + lo * dim * 4, (min(m, lo + step) - lo) * dim * 4) for lo in blocks]
            done = 0
            with open_ranges(folder / name, crc) as f:
                for lo, data in zip(blocks, f.ranges(spans), strict=True):
                    hi = min(m, lo + step)
                    block = data.view(np.float32).reshape(hi - lo, dim)[mask[lo:hi]]
                    n = int(mask[lo:hi].sum())
                    state.write(array, var_rows[done:done + n], block)
                    done += n
            if len(blocks) == -(-m // step) and f.crc != files[name]["crc32"]:
                raise CorruptCheckpoint(f"{where}: checksum does not match the manifest (damaged file)")


def _merge_keyed(base: Path, delta: Path, state: KeyedTableState, entry: dict[str, Any], bfiles: dict,
                 dentry: dict[str, Any], dfiles: dict) -> tuple[KeyedTableState, np.ndarray, dict]:
    """Restore one dynamic table from the base's rows overlaid, position by position, with the delta's; keep
    the keys this rank owns. Returns (state, [k] variable rows holding delta rows, {slot: [k, dim] values})
    for the slot rewrite at the delta's step."""
    coll, name, step = state.collection, state.table.name, block_rows(state.table.dim)
    coll.clear_keyed(name)
    coll.set_clock(max([int(s.get("clock", 0)) for s in dentry["shards"]] + [0]))
    wanted = [a for a in state.arrays() if a in entry["arrays"] and a in dentry["arrays"]]
    slots = [] if getattr(coll, "wraps_optimizer", False) else [  # SOK's wrapped slots: no step bookkeeping
        a for a in wanted if a not in keyed.INT_ARRAYS and a != "value"]
    fix_rows, fix = [], {a: [] for a in slots}
    dropped = 0
    by_rank = {int(s["rank"]): s for s in entry["shards"]}
    for d in dentry["shards"]:
        b = by_rank.get(int(d["rank"]), {"count": 0, "files": {}})
        nb, nd, m = int(b["count"]), int(d["count"]), int(d["changed"])
        pos = np.asarray(_array(delta, state.key, d["files"][POS], dfiles, m, check=True))
        dmaps = {a: _array(delta, state.key, d["files"][a], dfiles, m, check=True) for a in wanted}
        bmaps = {a: _array(base, state.key, b["files"][a], bfiles, nb, check=a == "key") for a in wanted if nb}
        for lo in range(0, nd, step):
            hi = min(nd, lo + step)
            a, z = np.searchsorted(pos, [lo, hi])
            dpos, upto = pos[a:z] - lo, max(0, min(hi, nb) - lo)
            from_delta = np.zeros(hi - lo, bool)
            from_delta[dpos] = True
            if not from_delta[upto:].all():
                raise CorruptCheckpoint(f"{delta}: table '{state.key}': rank {d['rank']}'s delta does not cover "
                                        f"its rows past the base's {nb}")
            keys = np.empty(hi - lo, np.int64)
            keys[:upto] = bmaps["key"][lo:lo + upto] if upto else keys[:0]
            keys[dpos] = dmaps["key"][a:z]
            own = state.owns(keys)
            if not own.any():
                continue
            got = {}
            for arr in wanted:
                out = np.empty((hi - lo, *dmaps[arr].shape[1:]), dmaps[arr].dtype)
                take = np.flatnonzero(own & ~from_delta)
                if take.size:
                    out[take] = bmaps[arr][lo + take]
                out[dpos] = dmaps[arr][a:z]
                got[arr] = out[own]
            used = coll.keyed_count(name)
            dropped += coll.insert_keyed(name, got)
            k = np.flatnonzero(from_delta[own])
            k = k[k < coll.keyed_count(name) - used]  # inserted (not dropped for capacity)
            fix_rows.append(used + 1 + k)
            for arr in slots:
                fix[arr].append(got[arr][k])
        pk, pc = (np.asarray(_array(delta, state.key, d["files"][a], dfiles, int(d["pending"]), check=True))
                  for a in ("pending_key", "pending_count"))
        mine = state.owns(pk) if pk.size else np.zeros(0, bool)
        coll.insert_pending(name, pk[mine], pc[mine])
    if dropped:
        warnings.warn(f"{delta}: table '{state.key}': {dropped} key(s) did not fit this rank's share of the "
                      "capacity under the new rank count and were dropped", stacklevel=2)
    rows = np.concatenate(fix_rows) if fix_rows else np.zeros(0, np.int64)
    return state, rows, {a: np.concatenate(v) if v else np.zeros((0, state.table.dim), np.float32)
                         for a, v in fix.items()}


def latest_base(manifest: dict[str, Any], folder: Path) -> Path:
    """The full checkpoint folder a delta's manifest names (beside ``folder``)."""
    return folder.parent / str(manifest["base"]["path"])


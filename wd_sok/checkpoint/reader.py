"""Collective restore of a sharded checkpoint under any rank count and backend.

Each rank reads the manifest, checks it against its model (tables, widths, format version), reads the
replicated dense state, then, for every table, walks the shard files block by block: a block whose global
rows (from the manifest) include none this rank owns is skipped without being read; the owned rows of the
others are written straight into the variable. Memory beyond the variables: one block (~32 MiB) plus the dense
state. A file read whole is checked against its CRC32; every file's size is checked against the manifest.

Rank 0 chooses, every rank follows: rank 0 lists the checkpoints (newest commit first,
:mod:`wd_sok.checkpoint.lineage`) and broadcasts the list, so ranks that see a folder through different caches
still read the same one. Ranks agree on every outcome, and each verdict names the folder it is about: if any
rank finds a checkpoint damaged (a missing or truncated file, a bad checksum, a damaged manifest), all warn
once and fall back to the previous one together; one written for another feature spec or by a newer format
is an error on every rank.
"""

from __future__ import annotations

import io
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from wd_sok.checkpoint import keyed, lineage
from wd_sok.checkpoint.format import (
    DENSE,
    MANIFEST,
    CheckpointError,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    block_rows,
    list_legacy,
    read_manifest,
    read_npy_header,
)
from wd_sok.distributed import Runtime
from wd_sok.state import KeyedTableState, State, TableState
from wd_sok.storage.paths import AnyPath, open_ranges, read_head
from wd_sok.storage.paths import path as storage_path

DenseImport = Callable[[dict[str, np.ndarray], str], None]
HEAD_BYTES = 4096  # read at once for a .npy header (wd-sok's are 128 bytes)


def restore_latest(model_dir: str | Path, tables: list[State], import_dense: DenseImport,
                   runtime: Runtime) -> tuple[dict[str, Any], Path]:
    """Load the newest usable checkpoint of ``model_dir`` into this rank's ``tables`` (collective).

    Args:
        tables: this rank's tables (:func:`wd_sok.state.table_states`).
        import_dense: applies the replicated arrays (``dense/*``, ``opt/*``) given ``(arrays, origin)``; it
            must set the optimizers' iteration counters (lazy slots are relative to them).

    Returns:
        (manifest, checkpoint folder).
    Raises:
        CheckpointError (every rank, same message) when none is usable.
    """
    listing: tuple[list[str], list[str]] = ([], [])
    if runtime.is_chief:  # rank 0 lists; every rank reads the folders rank 0 saw, in its order
        listing = ([p.name for p in reversed(lineage.list_checkpoints(model_dir))],
                   [p.name for p in list_legacy(model_dir)])
    names, legacy = runtime.broadcast_object(listing, "ckpt_listing")
    if not names:
        if legacy:
            raise CheckpointError(f"--use_checkpoint: {model_dir} holds only checkpoints of the earlier "
                                  f"single-file format ({legacy[-1]}); convert them once with: "
                                  f"python -m wd_sok.checkpoint convert {model_dir}")
        raise NoCheckpoint(f"--use_checkpoint: no checkpoint (ckpt-<step>/{MANIFEST}) in {model_dir}")
    last = ""
    for name in names:
        path = storage_path(model_dir) / name  # a Path, or an ObjectPath for a URL (wd_sok.storage)
        kind, message, manifest = "", "", {}
        try:
            manifest = read_one(path, tables, import_dense)
        except IncompatibleCheckpoint as e:
            kind, message = "incompatible", str(e)
        except CheckpointError as e:
            kind, message = "corrupt", str(e)
        except Exception as e:  # noqa: BLE001 - anything a damaged folder can raise: agreed, not a hang
            kind, message = "corrupt", f"{path}: {type(e).__name__}: {e}"
        verdicts = runtime.allgather_object((name, kind, message), "ckpt_restore")
        if any(v[0] != name for v in verdicts):  # cannot happen: every rank follows rank 0's list
            raise CheckpointError(f"--use_checkpoint: ranks restored different folders of {model_dir}")
        fatal = [m for _, k, m in verdicts if k == "incompatible"]
        if fatal:
            raise IncompatibleCheckpoint(fatal[0])
        damaged = [m for _, k, m in verdicts if k == "corrupt"]
        if not damaged:
            return manifest, path
        last = damaged[0]
        if runtime.is_chief:
            warnings.warn(f"{last}; falling back to the previous checkpoint", stacklevel=2)
    raise CheckpointError(f"--use_checkpoint: no usable checkpoint in {model_dir}; the oldest: {last}")


class NoCheckpoint(CheckpointError):
    """``model_dir`` holds no checkpoint at all (``--use_checkpoint auto`` then starts fresh)."""


def read_one(folder: Path, tables: list[State], import_dense: DenseImport) -> dict[str, Any]:
    """Restore this rank's part of checkpoint ``folder`` (no collectives); returns its manifest. A delta is
    restored on top of its base (:func:`wd_sok.checkpoint.delta.read_pair`)."""
    manifest = read_manifest(folder)
    if manifest.get("kind") == "delta":
        from wd_sok.checkpoint import delta  # it builds on this module's readers

        return delta.read_pair(folder.parent / str(manifest.get("base", {}).get("path", "")), folder, tables,
                               import_dense)
    check_compatible(folder, manifest, tables)
    _check_one_file_per_table(folder, manifest)
    files = manifest["files"]
    dense = np.load(io.BytesIO(_read_whole(folder, DENSE, files, "dense state")))
    try:
        import_dense({k: dense[k] for k in dense.files}, f"{folder}: {DENSE}")
    except KeyError as e:
        raise IncompatibleCheckpoint(str(e.args[0])) from None
    for state in tables:
        entry = manifest["tables"][state.key]
        if isinstance(state, KeyedTableState):
            keyed.read_keyed(folder, state, entry, files)
            continue
        for array in state.arrays():
            if array not in entry["arrays"]:
                continue  # a slot the writer's optimizer did not have: it keeps its initial value
            for shard in entry["shards"]:
                _read_shard(folder, state, array, shard, files)
    return manifest


def check_compatible(folder: Path, manifest: dict[str, Any], tables: list[State]) -> None:
    """Same tables with the same shapes, and rows that cover each table; else an error naming the table."""
    stored = manifest.get("tables", {})
    mine = {s.key: s for s in tables}
    for key in sorted(set(stored) | set(mine)):
        if key not in stored:
            raise IncompatibleCheckpoint(f"{folder}: table '{key}' ({MANIFEST}): not in this checkpoint "
                                         "(written for another feature spec?)")
        if key not in mine:
            raise IncompatibleCheckpoint(f"{folder}: table '{key}' ({MANIFEST}): not in this model's feature "
                                         "spec (the checkpoint was written for another one?)")
        entry, table = stored[key], mine[key].table
        if (entry["cardinality"], entry["dim"]) != (table.cardinality, table.dim):
            raise IncompatibleCheckpoint(
                f"{folder}: table '{key}' ({MANIFEST}): {entry['cardinality']} x {entry['dim']} in the "
                f"checkpoint, {table.cardinality} x {table.dim} in this model's feature spec")
        dynamic = entry.get("placement") == keyed.PLACEMENT
        if dynamic != isinstance(mine[key], KeyedTableState):
            kinds = ("a dynamic (keyed) table", "a fixed table")
            raise IncompatibleCheckpoint(f"{folder}: table '{key}' ({MANIFEST}): {kinds[not dynamic]} in the "
                                         f"checkpoint, {kinds[dynamic]} in this model's feature spec")
        if not dynamic and sum(s["count"] for s in entry["shards"]) != table.cardinality:
            raise CorruptCheckpoint(f"{folder}: table '{key}' ({MANIFEST}): its shards hold "
                                    f"{sum(s['count'] for s in entry['shards'])} of {table.cardinality} rows")


def _check_one_file_per_table(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a checkpoint in which two tables share a file (written before file names were one-to-one in the
    table name: e.g. features '年龄' and '性别' both became 'deep.__'): one table's rows would fill both."""
    owner: dict[str, str] = {}
    for key, entry in manifest["tables"].items():
        for shard in entry["shards"]:
            for name in shard["files"].values():
                if owner.setdefault(name, key) != key:
                    raise IncompatibleCheckpoint(
                        f"{folder}: tables '{owner[name]}' and '{key}' share the file {name} (written by a "
                        "wd-sok whose file names could collide): it cannot be restored exactly")


def _read_whole(folder: Path, name: str, files: dict[str, dict], what: str) -> bytes:
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(f"{folder}: {what} ({name}): {e.strerror}") from None
    want = files.get(name, {})
    if len(data) != want.get("bytes") or zlib.crc32(data) != want.get("crc32"):
        raise CorruptCheckpoint(f"{folder}: {what} ({name}): {len(data)} bytes / checksum do not match the "
                                f"manifest's {want.get('bytes')} bytes (truncated or damaged)")
    return data


def _head(path: AnyPath, length: int = HEAD_BYTES) -> bytes:
    """The first ``length`` bytes of a file (fewer if it is shorter): room for any header wd-sok writes."""
    return read_head(path, length)


def _read_shard(folder: AnyPath, state: TableState, array: str, shard: dict[str, Any],
                files: dict[str, dict]) -> None:
    """Copy the rows of one shard file that this rank owns into ``state``'s ``array``; a file holding none of
    them is not opened at all."""
    name, dim, count = shard["files"][array], state.table.dim, int(shard["count"])
    want = files.get(name, {})
    sums = want.get("block_crc32")  # one CRC32 per block of `block_rows` rows (written since 2026-12: older
    step = want.get("block_rows") if sums is not None else block_rows(dim)  # files check size when read in part)
    start, stride = int(shard["start"]), int(shard["stride"])
    where = f"{folder}: table '{state.key}' ({name})"
    if sums is not None and not (isinstance(step, int) and step > 0 and isinstance(sums, list)
                                 and len(sums) == -(-count // step)):
        raise CorruptCheckpoint(f"{where}: the manifest's block checksums do not fit {count} rows")

    def owned(lo: int) -> tuple[int, np.ndarray, np.ndarray]:
        hi = min(count, lo + step)
        return (hi, *state.owned(start + np.arange(lo, hi, dtype=np.int64) * stride))

    blocks = [lo for lo in range(0, count, step) if owned(lo)[1].any()]  # those holding rows this rank owns
    if not blocks:
        return
    path = folder / name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CorruptCheckpoint(f"{where}: {e.strerror}") from None
    if size != want.get("bytes"):
        raise CorruptCheckpoint(f"{where}: {size} bytes, the manifest says {want.get('bytes')} (truncated?)")
    whole = len(blocks) == -(-count // step)  # every block read: the checksum can be verified
    with io.BytesIO(_head(path)) as f:  # one read (one ranged GET remotely) for the header
        try:
            shape, dtype, offset = read_npy_header(f)
        except ValueError as e:
            raise CorruptCheckpoint(f"{where}: not a readable .npy file ({e})") from None
        f.seek(0)
        crc = zlib.crc32(f.read(offset))
    if shape != (count, dim) or dtype != np.float32:
        raise CorruptCheckpoint(f"{where}: holds {shape} {dtype}, the manifest says ({count}, {dim}) float32")
    spans = [(offset + lo * dim * 4, (min(count, lo + step) - lo) * dim * 4) for lo in blocks]
    with open_ranges(path, crc) as f:  # O_DIRECT where possible, ranged GETs remotely; next block meanwhile
        for k, (lo, data) in enumerate(zip(blocks, f.ranges(spans), strict=True)):
            hi, mask, var_rows = owned(lo)
            if data.size != (hi - lo) * dim * 4:
                raise CorruptCheckpoint(f"{where}: ends inside row {lo + data.size // (dim * 4)}")
            if sums is not None and f.range_crcs[k] != sums[lo // step]:
                raise CorruptCheckpoint(f"{where}: rows {lo}-{hi - 1} do not match their checksum (damaged file)")
            block = data.view(np.float32).reshape(hi - lo, dim)
            state.write(array, var_rows, block if mask.all() else block[mask])
    if whole and f.crc != want.get("crc32"):
        raise CorruptCheckpoint(f"{where}: checksum does not match the manifest (damaged file)")

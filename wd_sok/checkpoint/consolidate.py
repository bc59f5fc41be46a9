"""``python -m wd_sok.checkpoint consolidate PATH [--output OUT]``: a delta checkpoint and its base -> a new
full checkpoint of the delta's step, streamed block by block (:mod:`wd_sok.checkpoint.merge`).

The result is the full checkpoint the trainer would have written at the delta's step, file for file: every
table file holds the same bytes (names, shapes, CRC32; fixed tables in the base's layout: row-wise,
table-wise, replicated as saved, the base's writer ranks), the dense state is the delta's ``dense.npz`` (the
state at that step), and the manifest carries the delta's step, epoch, position, seed, config, backend, run
id, commit number and spec fingerprint, without ``kind`` / ``base`` / ``deltas``, plus ``consolidated``
(which delta and base it came from). Restored under any rank count it equals base + delta restored, bit for
bit (the lazy RMSprop's ``rms`` of rows the delta does not hold caught up as the optimizer does it).

Memory: one block per array of the table being merged plus at most a block of delta ids and rows, plus the
dense state; never a whole table. Every file read is checked as the reader checks it: the delta's files
(size and CRC32) before anything is written, the base's sizes and headers first and CRC32s as they are
streamed. Written atomically: a temporary folder (``.tmp-ckpt-*``, removed on any failure, or by the next
start of a trainer if killed), the manifest last, then the rename (an object store: written in place, the
manifest's upload is the commit).

Lineage: by default the result goes beside the delta as ``ckpt-<step>-<run>`` (the name a full checkpoint of
that step takes while ``ckpt-<step>`` is held), with the delta's run id and commit number, so it is listed
right after the delta and restored in its place; a trainer resuming from it takes it as the base of its next
deltas. The delta and its base are not removed: retention (``--keep_checkpoints``) or the user does that.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zlib
from typing import Any

import numpy as np

from wd_sok.checkpoint import delta, keyed
from wd_sok.checkpoint import format as fmt
from wd_sok.checkpoint import merge as blocks
from wd_sok.checkpoint.format import (
    DENSE,
    MANIFEST,
    TMP_PREFIX,
    CheckpointError,
    CorruptCheckpoint,
    fsync_dir,
    read_manifest,
    write_durable,
)
from wd_sok.checkpoint.reader import _read_whole
from wd_sok.storage import StorageError
from wd_sok.storage.paths import AnyPath, is_object_path, open_binary, rmtree
from wd_sok.storage.paths import path as storage_path


def consolidate(path: str | os.PathLike, output: str | os.PathLike | None = None) -> AnyPath:
    """Write the full checkpoint equal to delta ``path`` + its base; returns its folder.

    Args:
        path: a delta checkpoint folder (``ckpt-<step>``), local or a URL.
        output: the new folder (must not exist); default ``ckpt-<step>-<run>`` beside ``path``.

    Raises:
        CheckpointError (one line naming the folder / file) when ``path`` is not a delta, the delta or its
        base is damaged, or the output exists; nothing is written then.
    """
    folder = storage_path(path)
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}: not a checkpoint folder")
    dm = read_manifest(folder)
    if not delta.is_delta(dm):
        raise CheckpointError(f"{folder}: a full checkpoint already: nothing to consolidate")
    base = delta.latest_base(dm, folder)
    bm = _check_base(folder, dm, base)
    final = storage_path(output) if output is not None else _default_target(folder, dm)
    if final.exists():
        raise CheckpointError(f"{final} exists: not overwritten (remove it, or give another --output)")
    for name in dm["files"]:
        _verify(folder, name, dm["files"])
    dense = _read_whole(folder, DENSE, dm["files"], "dense state")  # noqa: SLF001 - the reader's checked read
    then, now = _iterations(base, bm), _iterations(folder, dm, dense)
    ages = {group: t - then.get(group, t) for group, t in now.items()}  # the decays rows not in the delta owe
    tmp = final if is_object_path(final) else final.parent / f"{TMP_PREFIX}{final.name}.consolidate"
    rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        files: dict[str, dict] = {}
        tables = {}
        for key, bentry in bm["tables"].items():
            merge = blocks.keyed_table if bentry.get("placement") == keyed.PLACEMENT else blocks.fixed_table
            tables[key] = merge(tmp, key, (base, bentry, bm["files"]), (folder, dm["tables"][key], dm["files"]),
                                ages.get(key.partition("/")[0], 0), files)
        files[DENSE] = write_durable(tmp / DENSE, dense)
        manifest = {k: v for k, v in dm.items() if k not in ("kind", "base", "deltas", "tables", "files")}
        manifest.update(world_size=bm["world_size"], consolidated={"delta": folder.name, "base": base.name,
                                                                   "written_unix": time.time()},
                        tables=tables, files=files)
        write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())  # the commit
        fsync_dir(tmp)
        if tmp != final:
            if final.exists():
                raise CheckpointError(f"{final} appeared meanwhile: not overwritten")
            os.rename(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        rmtree(tmp, first=MANIFEST)
        raise
    return final


def _check_base(folder: AnyPath, dm: dict[str, Any], base: AnyPath) -> dict[str, Any]:
    """The base's manifest, after checking it is the full checkpoint the delta was written against."""
    bm = delta.base_manifest(folder, dm, base)
    if delta.is_delta(bm):
        raise CorruptCheckpoint(f"{folder}: its base {base.name} is a delta, not a full checkpoint")
    for key, b in bm["tables"].items():
        d, marker = dm["tables"][key], (delta.POS if b.get("placement") == keyed.PLACEMENT else delta.ROW)
        if (d["cardinality"], d["dim"]) != (b["cardinality"], b["dim"]) or \
                set(d["arrays"]) != {marker, *b["arrays"]} or (d.get("placement") == keyed.PLACEMENT) != (
                    marker == delta.POS):
            raise CorruptCheckpoint(f"{folder}: table '{key}' ({MANIFEST}): not its base's table (shape, arrays "
                                    "or placement differ)")
        if marker == delta.POS and dm["world_size"] != bm["world_size"]:
            raise CorruptCheckpoint(f"{folder}: written by {dm['world_size']} ranks, its base by "
                                    f"{bm['world_size']}: dynamic tables' positions do not match")
        if marker == delta.ROW and sum(int(s["count"]) for s in b["shards"]) != b["cardinality"]:
            raise CorruptCheckpoint(f"{base}: table '{key}' ({MANIFEST}): its shards do not hold every row")
    return bm


def _default_target(folder: AnyPath, dm: dict[str, Any]) -> AnyPath:
    run = str(dm.get("run") or "")
    if not fmt.CKPT_RE.match(f"ckpt-0-{run}"):
        raise CheckpointError(f"{folder}: no run id in its {MANIFEST} to name the full checkpoint after; "
                              "give --output")
    return folder.parent / f"ckpt-{dm['step']}-{run}"


def _verify(folder: AnyPath, name: str, files: dict[str, dict]) -> None:
    """Size and CRC32 of one file against the manifest, streamed a block at a time."""
    crc, size = 0, 0
    try:
        with open_binary(folder / name) as f:
            while chunk := f.read(fmt.BLOCK_BYTES):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    except (OSError, StorageError) as e:
        raise CorruptCheckpoint(f"{folder}: {name}: {getattr(e, 'strerror', None) or e}") from None
    if (size, crc) != (files[name]["bytes"], files[name]["crc32"]):
        raise CorruptCheckpoint(f"{folder}: {name}: {size} bytes / checksum do not match the manifest's "
                                f"{files[name]['bytes']} bytes (truncated or damaged)")


def _iterations(folder: AnyPath, manifest: dict[str, Any], data: bytes | None = None) -> dict[str, int]:
    """The optimizers' step counters of a checkpoint's dense state: ``{"wide": t, "deep": t}``."""
    data = data if data is not None else _read_whole(folder, DENSE, manifest["files"], "dense state")  # noqa: SLF001
    with np.load(io.BytesIO(data)) as z:
        return {k.split("/")[1].removesuffix("_iterations"): int(z[k]) for k in z.files
                if k.startswith("opt/") and k.endswith("_iterations")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wd_sok.checkpoint consolidate",
        description="Write the full checkpoint equal to a delta checkpoint and its base (streamed, block by "
                    "block): restored under any rank count it is bit for bit the full checkpoint the trainer "
                    "would have written at the delta's step.",
        epilog="The delta and its base are left in place: nothing is deleted. With the default output the new "
               "full checkpoint carries the delta's run id and commit number, so it is the one a resume "
               "restores (and the base of the run's next deltas); retention (--keep_checkpoints) removes the "
               "delta and its base in due course, or remove them yourself. Exit 2 with one line when PATH is "
               "already full, the delta or its base is damaged, or the output exists.")
    parser.add_argument("path", help="a delta checkpoint folder (ckpt-<step>), local or a URL (s3://...)")
    parser.add_argument("--output", default=None,
                        help="the new checkpoint folder, which must not exist (default: ckpt-<step>-<run> beside "
                             "PATH, the delta's step and run id)")
    args = parser.parse_args(argv)
    try:
        final = consolidate(args.path, args.output)
    except (CheckpointError, OSError, StorageError) as e:
        print(f"wd-sok: error: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError) as e:  # a manifest field of the wrong shape
        print(f"wd-sok: error: {args.path}: damaged checkpoint ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(f"{args.path} + its base -> {final} (full)")
    return 0


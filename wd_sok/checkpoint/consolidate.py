"""``python -m wd_sok.checkpoint consolidate PATH [--output OUT]``: a delta checkpoint and its base -> a new
full checkpoint of the delta's step, streamed block by block.

The result is the full checkpoint the trainer would have written at the delta's step, file for file: every
table file holds the same bytes (same names, shapes, CRC32), the dense state is the delta's ``dense.npz``
(the state at that step), and the manifest carries the delta's step, epoch, position, seed, config, backend,
run id, commit number and spec fingerprint, without ``kind`` / ``base`` / ``deltas``, plus ``consolidated``
(which delta and base it came from). Fixed tables keep the base's shard layout (row-wise, table-wise,
replicated as saved; the writer ranks are the base's); each base block is read once, the delta rows falling
into it (global ids from the delta's ``row`` files, streamed in step) overwrite it. Rows the delta does not
hold keep the base's values and slots, with the lazy RMSprop's ``rms`` caught up from the base's step to the
delta's (``rms * rho ** (t_delta - t_base)``, computed by TensorFlow as the optimizer's own catch-up is:
exactly what a restore of base + delta, or a full save at the delta's step, holds). Dynamic tables are merged
position by position per writer rank (base row, or the delta's), with the delta's pending keys and clock.

Memory: one block (:func:`~wd_sok.checkpoint.format.block_rows`) per array of the table being merged, plus at
most a block of delta ids and rows, plus the dense state; never a whole table. Every file read is checked as
the reader checks it: the delta's files (size and CRC32) before anything is written, the base's sizes and
headers first and CRC32s as they are streamed; on any damage nothing is left behind.

Lineage: by default the result goes beside the delta as ``ckpt-<step>-<run>`` (the name a full checkpoint of
that step takes while ``ckpt-<step>`` is held), with the delta's run id and commit number, so it is listed
right after the delta and restored in its place (a trainer resuming from it takes it as the base of its next
deltas). The delta and its base are not removed: retention (``--keep_checkpoints``) or the user does that.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import zlib
from typing import Any

import numpy as np
import tensorflow as tf

from wd_sok.checkpoint import delta, keyed
from wd_sok.checkpoint import format as fmt
from wd_sok.checkpoint.format import (
    DENSE,
    MANIFEST,
    TMP_PREFIX,
    CheckpointError,
    CorruptCheckpoint,
    block_rows,
    fsync_dir,
    read_manifest,
    read_npy_header,
    write_durable,
    write_npy_header,
)
from wd_sok.checkpoint.reader import HEAD_BYTES, _read_whole
from wd_sok.storage import StorageError
from wd_sok.storage.paths import AnyPath, is_object_path, open_binary, open_ranges, open_sequential, read_head, rmtree
from wd_sok.storage.paths import path as storage_path

RHO = 0.5  # the deep tables' RMSprop decay (wd_sok/train.py builds LazyRMSprop with rho=0.5; not in manifests)
DECAYING = "rms"  # the one slot that changes on rows a step does not touch (RMSprop; FTRL's slots do not)
PENDING = ("pending_key", "pending_count")


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
    ages = _ages(_iterations(base, bm), _iterations(folder, dm, dense))
    tmp = final if is_object_path(final) else final.parent / f"{TMP_PREFIX}{final.name}.consolidate"
    rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        files: dict[str, dict] = {}
        tables = {}
        for key, bentry in bm["tables"].items():
            dentry, age = dm["tables"][key], ages.get(key.partition("/")[0], 0)
            if bentry.get("placement") == keyed.PLACEMENT:
                tables[key] = _keyed_table(tmp, key, (base, bentry, bm["files"]), (folder, dentry, dm["files"]),
                                           age, files)
            else:
                tables[key] = _fixed_table(tmp, key, (base, bentry, bm["files"]), (folder, dentry, dm["files"]),
                                           age, files)
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
    try:
        data = (base / MANIFEST).read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(f"{folder}: its base {base}: {e.strerror or e}") from None
    if zlib.crc32(data) != dm.get("base", {}).get("crc32"):
        raise CorruptCheckpoint(f"{folder}: its base {base.name} is not the checkpoint it was written against "
                                "(manifest checksum differs)")
    bm = read_manifest(base)
    if delta.is_delta(bm):
        raise CorruptCheckpoint(f"{folder}: its base {base.name} is a delta, not a full checkpoint")
    if set(dm["tables"]) != set(bm["tables"]):
        raise CorruptCheckpoint(f"{folder}: {MANIFEST}: its tables are not its base's")
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


def _ages(base: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """Per table group, the optimizer steps between the base and the delta (the decays rows not in it owe)."""
    return {g: now[g] - base[g] for g in now if g in base}


def _decay(block: np.ndarray, age: int) -> np.ndarray:
    """``rms`` rows [n, dim] caught up ``age`` steps: the optimizer's own ``caught_up_rms`` arithmetic
    (TensorFlow's float32 pow and multiply, denormals flushed as there)."""
    if not age or not block.size:
        return block
    ages = tf.cast(tf.fill([block.shape[0]], tf.constant(age, tf.int64)), tf.float32)
    factor = tf.pow(tf.constant(RHO, tf.float32), ages)
    return (tf.constant(block) * tf.reshape(factor, [-1, 1])).numpy()


class _Source:
    """One .npy file [count] (``width`` 0, int64) or [count, width] float32: its size and header checked when
    opened. ``stream``: read front to back, block by block (:meth:`next`), its CRC32 checked by :meth:`finish`
    (the base's files); else read by row ranges (:meth:`rows`: the delta's files, verified whole before)."""

    def __init__(self, folder: AnyPath, name: str, files: dict, count: int, width: int, step: int,
                 stream: bool = True) -> None:
        self.where, self.want = f"{folder}: {name}", files.get(name, {})
        self.dtype = np.dtype(np.float32 if width else np.int64)
        self.shape = (count, width) if width else (count,)
        path = folder / name
        try:
            size = path.stat().st_size
            head = read_head(path, HEAD_BYTES)
            shape, dtype, offset = read_npy_header(io.BytesIO(head))
        except (OSError, StorageError) as e:
            raise CorruptCheckpoint(f"{self.where}: {getattr(e, 'strerror', None) or e}") from None
        except ValueError as e:
            raise CorruptCheckpoint(f"{self.where}: not a readable .npy file ({e})") from None
        if size != self.want.get("bytes"):
            raise CorruptCheckpoint(f"{self.where}: {size} bytes, the manifest says {self.want.get('bytes')}")
        if shape != self.shape or dtype != self.dtype:
            raise CorruptCheckpoint(f"{self.where}: holds {shape} {dtype}, the manifest says {self.shape}")
        self.row = max(width, 1) * self.dtype.itemsize
        self.offset, self.path = offset, path
        if not stream:
            return
        self.reader = open_ranges(path, zlib.crc32(head[:offset]))
        self.blocks = self.reader.ranges([(offset + lo * self.row, (min(count, lo + step) - lo) * self.row)
                                          for lo in range(0, count, step)])

    def next(self) -> np.ndarray:
        """The next block, a writable copy."""
        data = next(self.blocks)
        return np.frombuffer(data, self.dtype).reshape(-1, *self.shape[1:]).copy()

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi-1 (random access)."""
        with open_binary(self.path) as f:
            f.seek(self.offset + lo * self.row)
            data = f.read((hi - lo) * self.row)
        return np.frombuffer(data, self.dtype).reshape(hi - lo, *self.shape[1:])

    def finish(self) -> None:
        for _ in self.blocks:  # rows past the merged ones (none in a checkpoint the trainer wrote)
            pass
        self.reader.close()
        if self.reader.crc != self.want.get("crc32"):
            raise CorruptCheckpoint(f"{self.where}: checksum does not match the manifest (damaged file)")


class _Ids:
    """Ascending int64 ids of a delta's ``row`` / ``pos`` file, consumed front to back a block at a time."""

    def __init__(self, source: _Source) -> None:
        self.src, self.done, self.buf = source, 0, np.zeros(0, np.int64)
        self.chunk = max(1, fmt.BLOCK_BYTES // 8)

    def upto(self, limit: int, keep: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices in the file, ids) of the ids <= ``limit`` not consumed yet, filtered by ``keep(ids)``."""
        parts = []
        while True:
            if not self.buf.size:
                if self.done + self.buf.size >= self.src.shape[0]:
                    break
                lo = self.done
                self.buf = self.src.rows(lo, min(self.src.shape[0], lo + self.chunk))
            k = int(np.searchsorted(self.buf, limit, side="right"))
            ids, index = self.buf[:k], self.done + np.arange(k, dtype=np.int64)
            mask = keep(ids) if keep is not None else slice(None)
            parts.append((index[mask], ids[mask]))
            self.buf, self.done = self.buf[k:], self.done + k
            if self.buf.size:
                break
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@contextlib.contextmanager
def _outputs(folder: AnyPath, names: dict[str, str], shapes: dict[str, tuple], files: dict) -> Any:
    """Open one streamed output per array (``{array: file name}``), headers written; records them at the end."""
    with contextlib.ExitStack() as stack:
        outs = {}
        for array, name in names.items():
            outs[array] = stack.enter_context(open_sequential(folder / name))
            header = io.BytesIO()
            write_npy_header(header, shapes[array], np.int64 if len(shapes[array]) == 1 else np.float32)
            outs[array].write(header.getvalue())
        yield outs
    for array, name in names.items():
        files[name] = {"bytes": outs[array].size, "crc32": outs[array].crc}


def _fixed_table(out: AnyPath, key: str, base: tuple, new: tuple, age: int, files: dict) -> dict[str, Any]:
    """One fixed table: each base shard file rewritten block by block with the delta's rows of it."""
    (bfolder, bentry, bfiles), (dfolder, dentry, dfiles) = base, new
    dim, step, arrays = int(bentry["dim"]), block_rows(int(bentry["dim"])), list(bentry["arrays"])
    dshards = [s for s in dentry["shards"] if int(s["count"])]
    placed = 0
    for shard in bentry["shards"]:
        count, start, stride = int(shard["count"]), int(shard["start"]), int(shard["stride"])
        sources = {a: _Source(bfolder, shard["files"][a], bfiles, count, dim, step) for a in arrays}
        deltas = [(d, _Ids(_Source(dfolder, d["files"][delta.ROW], dfiles, int(d["count"]), 0, step, False)),
                   {a: _Source(dfolder, d["files"][a], dfiles, int(d["count"]), dim, step, False) for a in arrays})
                  for d in dshards] if count else []

        def mine(g: np.ndarray, start: int = start, stride: int = stride) -> np.ndarray:
            return (g >= start) & ((g - start) % stride == 0)

        with _outputs(out, {a: shard["files"][a] for a in arrays}, dict.fromkeys(arrays, (count, dim)),
                      files) as outs:
            for lo in range(0, count, step):
                hi = min(count, lo + step)
                hits = []
                for _, ids, rows in deltas:
                    j, g = ids.upto(start + (hi - 1) * stride, mine)
                    if j.size:
                        hits.append((j, (g - start) // stride - lo, rows))
                        placed += j.size
                for a in arrays:
                    block = sources[a].next()
                    if a == DECAYING:
                        block = _decay(block, age)
                    for j, at, rows in hits:
                        block[at] = _gather(rows[a], j, step)
                    outs[a].write_behind(block)
        for s in sources.values():
            s.finish()
    if placed != sum(int(d["count"]) for d in dshards):
        raise CorruptCheckpoint(f"{dfolder}: table '{key}': {sum(int(d['count']) for d in dshards) - placed} "
                                "delta row id(s) name no row of the table, or are not ascending")
    return dict(bentry)  # the same shards and file names: the base's layout


def _gather(src: _Source, j: np.ndarray, step: int) -> np.ndarray:
    """Rows ``j`` (ascending, at most a block of them) of a delta file, read in spans of at most ``step`` rows."""
    parts, k = [], 0
    while k < j.size:
        lo = int(j[k])
        e = int(np.searchsorted(j, lo + step))
        parts.append(src.rows(lo, int(j[e - 1]) + 1)[j[k:e] - lo])
        k = e
    return np.concatenate(parts)


def _keyed_table(out: AnyPath, key: str, base: tuple, new: tuple, age: int, files: dict) -> dict[str, Any]:
    """One dynamic table: per writer rank, positions 0..count-1 from the base or, where the delta names them,
    the delta (:mod:`wd_sok.checkpoint.delta`); the delta's pending keys as they are."""
    (bfolder, bentry, bfiles), (dfolder, dentry, dfiles) = base, new
    dim, step = int(bentry["dim"]), block_rows(int(bentry["dim"]))
    arrays = [a for a in bentry["arrays"] if a not in PENDING]
    width = {a: 0 if a in keyed.INT_ARRAYS else dim for a in arrays}
    by_rank = {int(s["rank"]): s for s in bentry["shards"]}
    shards = []
    for d in dentry["shards"]:
        b = by_rank.get(int(d["rank"]), {"count": 0, "files": {}})
        nb, nd, m = int(b["count"]), int(d["count"]), int(d["changed"])
        sources = {a: _Source(bfolder, b["files"][a], bfiles, nb, width[a], step) for a in arrays} if nb else {}
        pos = _Ids(_Source(dfolder, d["files"][delta.POS], dfiles, m, 0, step, False))
        rows = {a: _Source(dfolder, d["files"][a], dfiles, m, width[a], step, False) for a in arrays}
        names = {a: d["files"][a] for a in arrays}
        with _outputs(out, names, {a: (nd, dim) if width[a] else (nd,) for a in arrays}, files) as outs:
            for lo in range(0, nd, step):
                hi = min(nd, lo + step)
                upto = max(0, min(hi, nb) - lo)
                j, p = pos.upto(hi - 1)
                fresh = np.zeros(hi - lo, bool)
                fresh[p - lo] = True
                if not fresh[upto:].all():
                    raise CorruptCheckpoint(f"{dfolder}: table '{key}': rank {d['rank']}'s delta does not cover "
                                            f"its rows past the base's {nb}")
                for a in arrays:
                    block = np.empty((hi - lo, dim) if width[a] else (hi - lo,), rows[a].dtype)
                    if upto:
                        part = sources[a].next()
                        block[:upto] = _decay(part, age)[:upto] if a == DECAYING else part[:upto]
                    if j.size:
                        block[p - lo] = rows[a].rows(int(j[0]), int(j[-1]) + 1)
                    outs[a].write_behind(block)
        if pos.done != m:
            raise CorruptCheckpoint(f"{dfolder}: table '{key}': rank {d['rank']}'s delta names positions past "
                                    f"its {nd} rows")
        for s in sources.values():
            s.finish()
        for a in PENDING:  # copied as they are (verified whole before)
            _copy(dfolder / d["files"][a], out / d["files"][a])
            files[d["files"][a]] = dict(dfiles[d["files"][a]])
            names[a] = d["files"][a]
        shards.append({"rank": int(d["rank"]), "count": nd, "pending": int(d["pending"]),
                       "clock": int(d["clock"]), "files": names})
    entry = {k: v for k, v in dentry.items() if k not in ("arrays", "shards")}
    return {"arrays": list(bentry["arrays"]), "shards": shards, **entry}


def _copy(src: AnyPath, dest: AnyPath) -> None:
    with open_binary(src) as f, open_sequential(dest) as w:
        while chunk := f.read(fmt.BLOCK_BYTES):
            w.write(chunk)


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
    print(f"{args.path} + its base -> {final} (full)")
    return 0


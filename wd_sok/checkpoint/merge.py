"""Block-by-block merge of one table of a full checkpoint (the base) with a delta's rows of it, for
:mod:`wd_sok.checkpoint.consolidate`: the table's files of the full checkpoint at the delta's step.

* :func:`fixed_table`: each base shard file is read once, front to back, a block
  (:func:`~wd_sok.checkpoint.format.block_rows`) at a time; the delta rows falling into the block (global ids
  from the delta shards' ``row`` files, consumed in step by :class:`Ids`) overwrite it; the result keeps the
  base's layout (shards, file names). Rows the delta does not hold keep the base's values and slots, the lazy
  RMSprop's ``rms`` caught up from the base's step to the delta's (:func:`decay`).
* :func:`keyed_table`: per writer rank, positions ``0..count-1`` of the delta's shard, each from the base or,
  where the delta's ``pos`` file names it, from the delta; pending keys as the delta holds them.

Memory: per array one block of the base, at most a block of delta ids and rows, one block being written.
Base files: size and header checked when opened, CRC32 as streamed (:meth:`Source.finish`); the delta's files
are verified whole by the caller before.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from typing import Any

import numpy as np
import tensorflow as tf

from wd_sok.checkpoint import delta, keyed
from wd_sok.checkpoint import format as fmt
from wd_sok.checkpoint.format import CorruptCheckpoint, block_rows, read_npy_header, write_npy_header
from wd_sok.checkpoint.reader import HEAD_BYTES
from wd_sok.storage import StorageError
from wd_sok.storage.paths import AnyPath, open_binary, open_ranges, open_sequential, read_head

RHO = 0.5  # the deep tables' RMSprop decay (wd_sok/train.py builds LazyRMSprop with rho=0.5; not in manifests)
DECAYING = "rms"  # the one slot that changes on rows a step does not touch (RMSprop; FTRL's slots do not)
PENDING = ("pending_key", "pending_count")


def decay(block: np.ndarray, age: int) -> np.ndarray:
    """``rms`` rows [n, dim] caught up ``age`` steps: the optimizer's own ``caught_up_rms`` arithmetic
    (TensorFlow's float32 pow and multiply, denormals flushed as there)."""
    if not age or not block.size:
        return block
    ages = tf.cast(tf.fill([block.shape[0]], tf.constant(age, tf.int64)), tf.float32)
    factor = tf.pow(tf.constant(RHO, tf.float32), ages)
    return (tf.constant(block) * tf.reshape(factor, [-1, 1])).numpy()


class Source:
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
        self.offset, self.path, self.f, self.blocks = offset, path, None, None
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
        """Rows lo..hi-1 (random access; the file stays open until :meth:`close`)."""
        self.f = self.f or open_binary(self.path)
        self.f.seek(self.offset + lo * self.row)
        data = self.f.read((hi - lo) * self.row)
        return np.frombuffer(data, self.dtype).reshape(hi - lo, *self.shape[1:])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()

    def finish(self) -> None:
        """Close; a streamed file: its CRC32 checked (any rows not taken are read first)."""
        self.close()
        if self.blocks is None:
            return
        for _ in self.blocks:  # rows past the merged ones (none in a checkpoint the trainer wrote)
            pass
        self.reader.close()
        if self.reader.crc != self.want.get("crc32"):
            raise CorruptCheckpoint(f"{self.where}: checksum does not match the manifest (damaged file)")


class Ids:
    """Ascending int64 ids of a delta's ``row`` / ``pos`` file, consumed front to back a block at a time."""

    def __init__(self, source: Source) -> None:
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
def _outputs(folder: AnyPath, names: dict[str, str], shapes: dict[str, tuple], files: dict,
             step: int = 0) -> Any:
    """Open one streamed output per array (``{array: file name}``), headers written; records them at the end
    (with ``step``: written in blocks of ``step`` rows, one CRC32 per block recorded too, as the writer does)."""
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
        if step:
            files[name] |= {"block_rows": step, "block_crc32": outs[array].pieces[1:]}


def fixed_table(out: AnyPath, key: str, base: tuple, new: tuple, age: int, files: dict) -> dict[str, Any]:
    """One fixed table: each base shard file rewritten block by block with the delta's rows of it."""
    (bfolder, bentry, bfiles), (dfolder, dentry, dfiles) = base, new
    dim, step, arrays = int(bentry["dim"]), block_rows(int(bentry["dim"])), list(bentry["arrays"])
    dshards = [s for s in dentry["shards"] if int(s["count"])]
    placed = 0
    for shard in bentry["shards"]:
        count, start, stride = int(shard["count"]), int(shard["start"]), int(shard["stride"])
        sources = {a: Source(bfolder, shard["files"][a], bfiles, count, dim, step) for a in arrays}
        deltas = [(d, Ids(Source(dfolder, d["files"][delta.ROW], dfiles, int(d["count"]), 0, step, False)),
                   {a: Source(dfolder, d["files"][a], dfiles, int(d["count"]), dim, step, False) for a in arrays})
                  for d in dshards] if count else []

        def mine(g: np.ndarray, start: int = start, stride: int = stride) -> np.ndarray:
            return (g >= start) & ((g - start) % stride == 0)

        with _outputs(out, {a: shard["files"][a] for a in arrays}, dict.fromkeys(arrays, (count, dim)),
                      files, step) as outs:
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
                        block = decay(block, age)
                    for j, at, rows in hits:
                        block[at] = _gather(rows[a], j, step)
                    outs[a].write_behind(block)
        for s in (*sources.values(), *(x for _, ids, rows in deltas for x in (ids.src, *rows.values()))):
            s.finish()
    if placed != sum(int(d["count"]) for d in dshards):
        raise CorruptCheckpoint(f"{dfolder}: table '{key}': {sum(int(d['count']) for d in dshards) - placed} "
                                "delta row id(s) name no row of the table, or are not ascending")
    return dict(bentry)  # the same shards and file names: the base's layout


def _gather(src: Source, j: np.ndarray, step: int) -> np.ndarray:
    """Rows ``j`` (ascending, at most a block of them) of a delta file, read in spans of at most ``step`` rows."""
    parts, k = [], 0
    while k < j.size:
        lo = int(j[k])
        e = int(np.searchsorted(j, lo + step))
        parts.append(src.rows(lo, int(j[e - 1]) + 1)[j[k:e] - lo])
        k = e
    return np.concatenate(parts)


def keyed_table(out: AnyPath, key: str, base: tuple, new: tuple, age: int, files: dict) -> dict[str, Any]:
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
        sources = {a: Source(bfolder, b["files"][a], bfiles, nb, width[a], step) for a in arrays} if nb else {}
        pos = Ids(Source(dfolder, d["files"][delta.POS], dfiles, m, 0, step, False))
        rows = {a: Source(dfolder, d["files"][a], dfiles, m, width[a], step, False) for a in arrays}
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
                        block[:upto] = decay(part, age)[:upto] if a == DECAYING else part[:upto]
                    if j.size:
                        block[p - lo] = rows[a].rows(int(j[0]), int(j[-1]) + 1)
                    outs[a].write_behind(block)
        if pos.done != m:
            raise CorruptCheckpoint(f"{dfolder}: table '{key}': rank {d['rank']}'s delta names positions past "
                                    f"its {nd} rows")
        for s in (*sources.values(), pos.src, *rows.values()):
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

"""Sequential file writes and range reads that bypass the page cache (O_DIRECT) where the filesystem allows.

Why: checkpoint files are written once and read once, far larger than any cache benefit, and on the machines
measured here the buffered path is the bottleneck (1 GiB with dd: 70-110 MB/s buffered + fsync, 560-1,500
MB/s with O_DIRECT; cold buffered reads 183 MB/s, O_DIRECT reads 970 MB/s). O_DIRECT needs file offsets,
sizes and memory addresses aligned to :data:`ALIGN`: data is staged through a page-aligned buffer (an
anonymous mmap), full aligned chunks go out directly, and the unaligned tail of a file is written after
turning O_DIRECT off on the descriptor. Filesystems without O_DIRECT (tmpfs, some network filesystems)
and ``WD_SOK_DIRECT_IO=0`` get plain buffered I/O with the same results.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wd_sok.storage.crc import Pieces

ALIGN = 4096
CHUNK = 8 << 20  # bytes staged per direct write
EARLY = 1 << 20  # staged bytes written at the end of a write() call rather than kept for the next one
IDLE_STAGES = 4  # staging buffers kept for the next writers (a delta's files written at once: 32 MiB held)
_DIRECT = getattr(os, "O_DIRECT", 0)
_IDLE: list[mmap.mmap] = []  # staging buffers of closed writers, their pages already mapped
_IDLE_LOCK = threading.Lock()


def _take_stage() -> mmap.mmap:
    """A page-aligned CHUNK-byte staging buffer: a closed writer's, or a new one. A new anonymous mapping
    faults in (and the kernel zeroes) each page on first touch: 6 ms of an 8 MB file's 7 ms copy here, which
    a delta's many small files would each pay again."""
    with _IDLE_LOCK:
        if _IDLE:
            return _IDLE.pop()
    return mmap.mmap(-1, CHUNK)


def _give_stage(stage: mmap.mmap) -> None:
    with _IDLE_LOCK:
        if len(_IDLE) < IDLE_STAGES:
            _IDLE.append(stage)
            return
    stage.close()


def _wanted() -> bool:
    return bool(_DIRECT) and os.environ.get("WD_SOK_DIRECT_IO", "1") != "0"


def _open(path: Path, flags: int) -> tuple[int, bool]:
    if _wanted():
        try:
            return os.open(path, flags | _DIRECT, 0o644), True
        except OSError:  # EINVAL: this filesystem has no O_DIRECT
            pass
    return os.open(path, flags, 0o644), False


class SequentialWriter:
    """Write one file front to back; ``close()`` makes it durable (fsync). :attr:`crc` is the running CRC32
    of everything written, :attr:`pieces` the CRC32 of each piece written (one per call); :meth:`write_behind`
    writes in a background thread while the caller prepares the next piece (one piece in flight: the caller
    must not change a piece it handed over until the next call)."""

    def __init__(self, path: Path) -> None:
        self.fd, self.direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.stage = _take_stage() if self.direct else None
        self.fill = 0
        self.size = 0
        self._crc = Pieces()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def write_behind(self, data: bytes | memoryview | np.ndarray) -> None:
        self._pool = self._pool or ThreadPoolExecutor(1)
        self._wait()
        self._pending = self._pool.submit(self.write, data)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        data = memoryview(data).cast("B")
        self._crc.add(data)
        self.size += len(data)
        if self.stage is None:
            while data:
                data = data[os.write(self.fd, data):]
            return
        while data:
            n = min(len(data), CHUNK - self.fill)
            self.stage[self.fill:self.fill + n] = data[:n]
            self.fill, data = self.fill + n, data[n:]
            if self.fill == CHUNK:
                self._flush(CHUNK)
        if self.fill >= EARLY:  # what this piece left staged goes out now (its aligned part), not at close: a
            self._flush(self.fill // ALIGN * ALIGN)  # file of a few pieces reaches the disk as they come

    @property
    def crc(self) -> int:
        return self._crc.crc

    @property
    def pieces(self) -> list[int]:
        return self._crc.pieces

    def _flush(self, n: int) -> None:
        """Write the first ``n`` staged bytes (a multiple of ALIGN); the rest moves to the front."""
        done = 0
        with memoryview(self.stage) as view:
            while done < n:
                with view[done:n] as rest:
                    done += os.write(self.fd, rest)
        if self.fill > n:
            self.stage.move(0, n, self.fill - n)
        self.fill -= n

    def close(self) -> None:
        try:
            self._wait()
            if self._pool is not None:
                self._pool.shutdown()
            if self.stage is not None and self.fill:
                aligned = self.fill // ALIGN * ALIGN
                tail = bytes(self.stage[aligned:self.fill])
                if aligned:
                    self._flush(aligned)
                if tail:  # the unaligned end of the file: through the page cache
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_DIRECT)
                    os.write(self.fd, tail)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            if self.stage is not None:
                stage, self.stage = self.stage, None
                _give_stage(stage)

    def __enter__(self) -> SequentialWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RangeReader:
    """Read byte ranges of one file in order, the next one prefetched by a background thread meanwhile.

    :meth:`ranges` yields each range as a uint8 numpy view of a page-aligned staging buffer (valid until the
    next one is taken: two buffers alternate) and keeps :attr:`crc`, the running CRC32 of every byte read, in
    order, and :attr:`range_crcs`, the CRC32 of each range (there when the range is yielded), computed in the
    reading thread too. O_DIRECT reads cover the aligned superset of a range.
    """

    def __init__(self, path: Path, crc: int = 0) -> None:
        self.fd, self.direct = _open(path, os.O_RDONLY)
        self._crc = Pieces(crc)
        self._buffers: list[np.ndarray] = []

    def _buffer(self, i: int, span: int) -> np.ndarray:
        while len(self._buffers) <= i:
            self._buffers.append(np.empty(0, np.uint8))
        if self._buffers[i].size < span + ALIGN:
            self._buffers[i] = np.empty(span + ALIGN, np.uint8)
        raw = self._buffers[i]
        skip = -raw.ctypes.data % ALIGN
        return raw[skip:skip + span]

    def _read(self, i: int, offset: int, length: int) -> np.ndarray:
        start = offset // ALIGN * ALIGN if self.direct else offset
        span = -(-(offset + length - start) // ALIGN) * ALIGN if self.direct else length
        buf = self._buffer(i, span)
        got = os.preadv(self.fd, [buf], start)
        lo = offset - start
        out = buf[lo:min(lo + length, got)]
        self._crc.add(out)
        return out

    @property
    def crc(self) -> int:
        return self._crc.crc

    @property
    def range_crcs(self) -> list[int]:
        return self._crc.pieces

    def ranges(self, spans: list[tuple[int, int]]) -> Iterator[np.ndarray]:
        """Yield the bytes of each (offset, length) of ``spans`` (short at the end of the file)."""
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self._read, 0, *spans[0]) if spans else None
            for k in range(len(spans)):
                data = pending.result()
                pending = pool.submit(self._read, (k + 1) % 2, *spans[k + 1]) if k + 1 < len(spans) else None
                yield data

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

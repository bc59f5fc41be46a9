"""Store (files under one root location, named by relative paths) and its streaming Writer."""

from __future__ import annotations

import os
import posixpath
import shutil
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from wd_sok.storage.crc import Pieces
from wd_sok.storage.location import (
    BUCKETED,
    Location,
    NotFound,
    errors,
    filesystem,
    is_url,
    join,
    local_path,
    parent,
    protocol,
)

PART_BYTES = 16 << 20  # multipart part size of streamed uploads: what one open writer buffers at most
TRAFFIC = {"get_requests": 0, "get_bytes": 0, "put_bytes": 0}  # remote bytes moved by this process (benchmarks)
_TRAFFIC_LOCK = threading.Lock()  # counted from several threads (ranged GETs in flight together)


def _count(**moved: int) -> None:
    with _TRAFFIC_LOCK:
        for key, n in moved.items():
            TRAFFIC[key] += n


class Writer:
    """A file or object written front to back: :meth:`write` (or :meth:`write_behind`, which writes a local
    file in a background thread while the caller prepares the next piece: one piece in flight, not to be
    changed until the next call; an upload writes at once), then :meth:`close`, which makes it durable and
    returns ``{"bytes", "crc32"}``; :attr:`pieces` holds the CRC32 of each piece written (one per call).

    Remote objects stream as multipart uploads of :data:`PART_BYTES` parts: the writer holds at most one
    part plus the piece being written (:attr:`peak_buffered` records the most it held).
    """

    def __init__(self, store: Store, rel: str) -> None:
        self.location = store.url(rel)
        self.size, self.peak_buffered = 0, 0
        self._crc = Pieces()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        if store.is_local:
            from wd_sok.checkpoint.directio import SequentialWriter

            Path(self.location).parent.mkdir(parents=True, exist_ok=True)
            self._local: Any = SequentialWriter(Path(self.location))
            self._remote: Any = None
        else:
            self._local = None
            with errors(self.location):
                self._remote = store.fs.open(self.location, "wb", block_size=PART_BYTES)

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        view = memoryview(data).cast("B")
        if self._local is not None:
            self._local.write(view)
            self.size, self._crc = self._local.size, self._local._crc  # noqa: SLF001 - the local writer's CRCs
            return
        self._crc.add(view)
        self.size += len(view)
        _count(put_bytes=len(view))
        buffer = getattr(self._remote, "buffer", None)  # fsspec's buffered files; memory:// has none
        with errors(self.location):
            while len(view):  # fed so that the buffer fills to exactly one part: parts of PART_BYTES, and no
                held = buffer.tell() if buffer is not None else self.size - len(view)  # more held than that
                room = max(1, PART_BYTES - held) if buffer is not None else len(view)
                self.peak_buffered = max(self.peak_buffered, held + min(room, len(view)))
                self._remote.write(view[:room])  # a full part is uploaded inside this call
                view = view[room:]
                buffer = getattr(self._remote, "buffer", None)  # a flush replaces it

    @property
    def crc(self) -> int:
        return self._crc.crc

    @property
    def pieces(self) -> list[int]:
        return self._crc.pieces

    def write_behind(self, data: bytes | memoryview | np.ndarray) -> None:
        if self._remote is not None:  # an upload is far slower than preparing the next piece: no overlap to
            self.write(data)  # gain, and one piece less held (the upload's peak memory is one piece + a part)
            return
        self._pool = self._pool or ThreadPoolExecutor(1)
        self._wait()
        self._pending = self._pool.submit(self.write, data)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> dict[str, int]:
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
        if self._local is not None:
            self._local.close()
        else:
            with errors(self.location):
                self._remote.close()  # completes the multipart upload: the object appears whole or not at all
        return {"bytes": self.size, "crc32": self.crc}

    def abort(self) -> None:
        """Drop what was written (a failed save): no object appears; a local file is removed."""
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - aborting anyway
            pass
        if self._local is not None:
            try:
                self._local.close()
            finally:
                Path(self.location).unlink(missing_ok=True)
        else:
            try:
                self._remote.discard()  # aborts the multipart upload
            except Exception:  # noqa: BLE001 - nothing was committed either way
                pass
            self._remote.closed = True  # never completed later (by garbage collection)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class Store:
    """Files under one root location, named by relative ``/``-separated paths ("" is the root itself).

    Args:
        root: a local path or a URL (``s3://bucket/prefix``); it need not exist yet.
    """

    def __init__(self, root: Location) -> None:
        self.is_local = not is_url(root)
        self.root: str = str(local_path(root)) if self.is_local else str(join(root))
        self.protocol = protocol(root)
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (created on first use; local stores only use it for listing helpers)."""
        if self._fs is None:
            if self.is_local:
                from fsspec.implementations.local import LocalFileSystem

                self._fs = LocalFileSystem()
            else:
                self._fs = filesystem(self.protocol)
        return self._fs

    def url(self, rel: str = "") -> str:
        """Full location of ``rel`` (a local path string or a URL)."""
        return str(join(self.root, rel)) if rel else self.root

    def join(self, *parts: str) -> str:
        """A relative path made of ``parts``."""
        return posixpath.join(*parts)

    def sub(self, rel: str) -> Store:
        """The store rooted at ``rel``."""
        return Store(self.url(rel))

    def _fresh(self, rel: str) -> str:
        url = self.url(rel)
        if not self.is_local:
            self.fs.invalidate_cache(url)  # other ranks and hosts write here: never answer from a listing cache
        return url

    def exists(self, rel: str = "") -> bool:
        """True if ``rel`` is an object / file, or a folder / prefix holding any."""
        if self.is_local:
            return os.path.exists(self.url(rel))
        with errors(self.url(rel)):
            return bool(self.fs.exists(self._fresh(rel)))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``, sorted: files and sub-folders / common prefixes; [] if
        there is nothing (a missing bucket is a :class:`NotFound`)."""
        if self.is_local:
            try:
                return sorted(os.listdir(self.url(rel)))
            except (FileNotFoundError, NotADirectoryError):
                return []
        url = self._fresh(rel)
        with errors(url):
            try:
                entries = self.fs.ls(url, detail=False)
            except FileNotFoundError:
                self.check_bucket()
                return []
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries} - {""})

    def check_bucket(self) -> None:
        """NotFound naming the root if its bucket / container does not exist (object stores only)."""
        if self.is_local or self.protocol not in BUCKETED:
            return
        bucket = f"{self.protocol}://{self.root.split('://', 1)[1].split('/', 1)[0]}"
        with errors(self.root):
            self.fs.invalidate_cache(bucket)
            if not self.fs.exists(bucket):
                raise NotFound(f"{self.root}: not found (bucket {bucket} does not exist)")

    def info(self, rel: str) -> dict[str, Any]:
        """``{"size": bytes, "etag": str}``: the etag is the object's ETag / generation (local: size and
        modification time), which changes whenever its content does."""
        url = self.url(rel)
        with errors(url):
            if self.is_local:
                st = os.stat(url)
                return {"size": st.st_size, "etag": f"{st.st_size}-{st.st_mtime_ns}"}
            info = self.fs.info(self._fresh(rel))
        tag = next((info[k] for k in ("ETag", "etag", "generation", "md5Hash", "mtime", "created") if info.get(k)),
                   "")
        return {"size": int(info.get("size") or 0), "etag": str(tag).strip('"')}

    def size(self, rel: str) -> int:
        return self.info(rel)["size"]

    def read_bytes(self, rel: str) -> bytes:
        """The whole file / object."""
        url = self.url(rel)
        with errors(url):
            if self.is_local:
                return Path(url).read_bytes()
            data = self.fs.cat_file(url)
        _count(get_requests=1, get_bytes=len(data))
        return data

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (short at the end): one ranged GET remotely, one pread locally."""
        url = self.url(rel)
        if length <= 0:
            return b""
        with errors(url):
            if self.is_local:
                fd = os.open(url, os.O_RDONLY)
                try:
                    return os.pread(fd, length, offset)
                finally:
                    os.close(fd)
            data = self.fs.cat_file(url, start=offset, end=offset + length)
        _count(get_requests=1, get_bytes=len(data))
        return data

    def open_read(self, rel: str) -> Any:
        """A seekable binary file object (remote reads fetch ranges on demand)."""
        url = self.url(rel)
        with errors(url):
            return open(url, "rb") if self.is_local else self.fs.open(url, "rb")

    def open_write(self, rel: str) -> Writer:
        """A streaming :class:`Writer` for ``rel`` (replacing it; folders are created as needed)."""
        return Writer(self, rel)

    def write_bytes(self, rel: str, data: bytes) -> dict[str, int]:
        """Write a small file durably (local: fsync; remote: one PUT); returns ``{"bytes", "crc32"}``."""
        url = self.url(rel)
        with errors(url):
            if self.is_local:
                Path(url).parent.mkdir(parents=True, exist_ok=True)
                with open(url, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                self.fs.pipe_file(url, data)
                _count(put_bytes=len(data))
        return {"bytes": len(data), "crc32": zlib.crc32(data)}

    def delete(self, rel: str) -> None:
        """Remove one file / object (missing is fine)."""
        url = self.url(rel)
        with errors(url):
            if self.is_local:
                Path(url).unlink(missing_ok=True)
            elif self.fs.exists(self._fresh(rel)):
                self.fs.rm_file(url)

    def delete_prefix(self, rel: str) -> None:
        """Remove ``rel`` and everything under it (a folder, or every object whose key starts with ``rel/``)."""
        url = self.url(rel)
        with errors(url):
            if self.is_local:
                if os.path.isdir(url) and not os.path.islink(url):
                    shutil.rmtree(url, ignore_errors=True)
                else:
                    Path(url).unlink(missing_ok=True)
                return
            if self.fs.exists(self._fresh(rel)):
                self.fs.rm(url, recursive=True)
            self.fs.invalidate_cache(url)

    def makedirs(self, rel: str = "") -> None:
        """Create the folder locally; nothing to do on object stores (prefixes need no creation)."""
        if self.is_local:
            with errors(self.url(rel)):
                os.makedirs(self.url(rel), exist_ok=True)

    # ---------------------------------------------------------------- commit protocol
    def staging(self, final: str, tmp: str) -> str:
        """Where to write a set of files that must appear together as ``final``: the temporary folder
        ``tmp`` locally (:meth:`publish` renames it), ``final`` itself on object stores (there the object
        written last, e.g. a manifest, is the commit; until it exists readers ignore the prefix)."""
        staged = tmp if self.is_local else final
        self.delete_prefix(staged)
        self.makedirs(staged)
        return staged

    def publish(self, staged: str, final: str) -> None:
        """Make ``staged`` visible as ``final`` (local: fsync, replace, rename, fsync; remote: nothing left to
        do, the last object written committed it)."""
        if not self.is_local or staged == final:
            return
        src, dst = Path(self.url(staged)), Path(self.url(final))
        with errors(dst):
            _fsync_dir(src)
            if dst.exists():  # an earlier run reached this step too: the newer one replaces it
                shutil.rmtree(dst)
            os.replace(src, dst)
            _fsync_dir(dst.parent)

    def probe_writable(self) -> None:
        """Write and delete a tiny object / file under the root; StorageError naming the root if that fails."""
        url = self.url(f".wd_sok_write_test_{os.getpid()}")
        with errors(self.root):
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
                Path(url).write_bytes(b"")
                os.unlink(url)
            else:
                self.fs.pipe_file(url, b"")
                self.fs.rm_file(url)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def arrow_source(location: Location) -> tuple[str, Any]:
    """``(path, filesystem)`` for pyarrow readers (``pq.ParquetFile(path, filesystem=fs)``): a local path
    and None, or the URL's path inside a pyarrow wrapper of its fsspec filesystem (reads are ranged GETs)."""
    if not is_url(location):
        return str(local_path(location)), None
    import pyarrow.fs as pafs

    fs = filesystem(protocol(location))
    return fs._strip_protocol(str(location)), pafs.PyFileSystem(pafs.FSSpecHandler(fs))  # noqa: SLF001


def read_text(location: Location) -> str:
    """A small text file anywhere."""
    if not is_url(location):
        return local_path(location).read_text()
    return Store(parent(location)).read_bytes(posixpath.basename(str(location))).decode()


def exists(location: Location) -> bool:
    if not is_url(location):
        return local_path(location).exists()
    return Store(parent(location)).exists(posixpath.basename(str(location)))


def parquet_file(location: Location) -> Any:
    """``pyarrow.parquet.ParquetFile`` of a local or remote file (remote: the footer and the column chunks
    asked for are fetched by ranged GETs); remote failures are :class:`StorageError` naming the URL."""
    import pyarrow.parquet as pq

    source, fs = arrow_source(location)
    if fs is None:
        return pq.ParquetFile(source)
    with errors(location):
        return pq.ParquetFile(source, filesystem=fs)

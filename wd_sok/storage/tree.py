"""A folder published to object storage all at once, as far as readers can tell: files first, a marker last.

Object stores cannot rename a prefix, so :func:`upload_tree` makes a folder visible the way a checkpoint's
manifest does: it removes the previous marker (from then on the old content counts as incomplete), clears
the prefix, uploads every file (streamed, each with its CRC32), and writes the marker object
:data:`MARKER` last, listing every file's size and CRC32. Until the marker exists the prefix is a temporary
one: :func:`download_tree` and :func:`is_complete` refuse it, and a second upload starts by clearing it. A
reader therefore sees the whole folder or none of it, never half (a reader racing a re-upload fails its
checksum rather than mixing two versions).
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

from wd_sok.storage.location import Location, NotFound, StorageError, errors
from wd_sok.storage.store import Store

MARKER = "_WD_SOK_COMPLETE.json"
FORMAT = "wd-sok-upload"
_CHUNK = 8 << 20


def upload_tree(local: Path, url: Location) -> dict[str, Any]:
    """Publish the local folder ``local`` under ``url`` (see the module docstring); returns the marker's
    content ``{"format", "written_unix", "files": {relative path: {"bytes", "crc32"}}}``."""
    store = Store(url)
    store.delete(MARKER)
    store.delete_prefix("")
    files: dict[str, dict[str, int]] = {}
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        with open(path, "rb") as f, store.open_write(rel) as out:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
        files[rel] = {"bytes": out.size, "crc32": out.crc}
    marker = {"format": FORMAT, "written_unix": time.time(), "files": files}
    store.write_bytes(MARKER, json.dumps(marker, indent=1).encode())
    return marker


def read_marker(url: Location) -> dict[str, Any]:
    """The marker of a complete upload; :class:`StorageError` naming ``url`` if there is none."""
    store = Store(url)
    try:
        marker = json.loads(store.read_bytes(MARKER))
    except NotFound:
        raise NotFound(f"{url}: not a complete upload ({MARKER} missing: never written, or still being "
                       "written)") from None
    except ValueError:
        raise StorageError(f"{url}: {MARKER} is not readable JSON") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise StorageError(f"{url}: {MARKER} is not a wd-sok upload marker")
    return marker


def is_complete(url: Location) -> bool:
    """True when ``url`` holds a complete upload (its marker exists)."""
    return Store(url).exists(MARKER)


def download_tree(url: Location, local: Path) -> Path:
    """Copy the complete upload at ``url`` into the local folder ``local`` (created), checking every file's
    size and CRC32 against the marker; returns ``local``. StorageError naming the URL and the file if any
    differs (a concurrent re-upload, a damaged object)."""
    store, local = Store(url), Path(local)
    for rel, want in read_marker(url)["files"].items():
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        crc, size = 0, 0
        with errors(store.url(rel)), store.open_read(rel) as src, open(target, "wb") as out:
            while chunk := src.read(_CHUNK):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
                out.write(chunk)
        if (size, crc) != (want["bytes"], want["crc32"]):
            raise StorageError(f"{store.url(rel)}: {size} bytes / CRC32 {crc} do not match the marker's "
                               f"{want['bytes']} / {want['crc32']} (changed or damaged while read)")
    return local

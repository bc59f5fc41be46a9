"""Locations (local paths or fsspec URLs), the remote filesystems' options, and one-line storage errors."""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Location = str | Path
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_OPTIONS: dict[str, Any] | None = None
BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss")


class StorageError(OSError):
    """A storage call failed; ``str()`` (and ``strerror``, for code that prints OSErrors by it) is one line
    naming the location (no credentials)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.strerror = message


class NotFound(StorageError, FileNotFoundError):
    """The object, folder or bucket does not exist."""


def configure(options: dict[str, Any] | str | None) -> None:
    """Keyword arguments for every remote filesystem (a dict or its JSON; None or "" resets to the
    environment's ``WD_SOK_STORAGE_OPTIONS``, else none)."""
    global _OPTIONS
    if isinstance(options, str):
        options = json.loads(options) if options.strip() else None
    if options is not None and not isinstance(options, dict):
        raise ValueError("--storage_options must be a JSON object")
    _OPTIONS = options


def options() -> dict[str, Any]:
    """The filesystem keyword arguments in force (see :func:`configure`)."""
    if _OPTIONS is not None:
        return dict(_OPTIONS)
    return json.loads(os.environ.get("WD_SOK_STORAGE_OPTIONS") or "{}")


def protocol(location: Location) -> str:
    """The URL scheme of ``location`` ("s3", "gs", ...), "" for a local path (``file://`` included)."""
    m = _URL.match(str(location)) if isinstance(location, str) else None
    return "" if m is None or m.group(1) in ("file", "local") else m.group(1)


def is_url(location: Location) -> bool:
    """True for a remote (non-``file://``) URL."""
    return bool(protocol(location))


def local_path(location: Location) -> Path:
    """``location`` as a local Path (``file://`` stripped); a remote URL is a ValueError."""
    if is_url(location):
        raise ValueError(f"{location}: a local path is needed here")
    s = str(location)
    return Path(s[7:] if s.startswith("file://") else s)


def join(base: Location, *parts: str) -> Location:
    """``base / parts``: a Path for a local base, a URL string for a remote one; an absolute part or URL wins."""
    for i in range(len(parts) - 1, -1, -1):
        if is_url(parts[i]):
            return join(parts[i], *parts[i + 1:])
    if not is_url(base):
        return local_path(base).joinpath(*parts)
    head = _URL.match(str(base)).group(0)  # type: ignore[union-attr]
    rest = posixpath.normpath(posixpath.join(str(base)[len(head):], *parts)) if parts else str(base)[len(head):]
    return head + rest.rstrip("/")


def parent(location: Location) -> Location:
    """The folder holding ``location``."""
    if not is_url(location):
        return local_path(location).parent
    head = _URL.match(str(location)).group(0)  # type: ignore[union-attr]
    return head + posixpath.dirname(str(location)[len(head):].rstrip("/"))


def filesystem(proto: str) -> Any:
    import fsspec

    try:
        return fsspec.filesystem(proto, **options())
    except (ImportError, ValueError) as e:
        raise StorageError(f"{proto}://: no usable fsspec filesystem for this protocol ({reason(e)})") from None


def reason(e: BaseException, location: Location = "") -> str:
    text = str(getattr(e, "strerror", None) or str(e) or type(e).__name__).strip()
    text = text.splitlines()[0][:300] if text else type(e).__name__
    if isinstance(e, FileNotFoundError) and re.match(r"https?://|b/", text):  # gcsfs names the request
        return "no such object"
    return "no such object" if str(location).endswith(text.strip("'\"")) else text


def missing(location: Location, e: FileNotFoundError) -> str:
    """Why ``location`` was not found: "bucket <url> does not exist" when that is the cause (one more request,
    on object stores only), else :func:`reason`."""
    proto = protocol(location)
    if proto in BUCKETED:
        bucket = f"{proto}://{str(location).split('://', 1)[1].split('/', 1)[0]}"
        try:
            fs = filesystem(proto)
            fs.invalidate_cache(bucket)
            if not fs.exists(bucket):
                return f"bucket {bucket} does not exist"
        except Exception:  # noqa: BLE001 - the original reason is still true
            pass
    return reason(e, location)


@contextmanager
def errors(location: Location) -> Iterator[None]:
    """Turn any failure of a storage call into a one-line :class:`StorageError` naming ``location``."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise NotFound(f"{location}: not found ({missing(location, e)})") from None
    except PermissionError as e:
        raise StorageError(f"{location}: access denied ({reason(e)}; check the credentials)") from None
    except Exception as e:  # botocore / aiohttp / gcsfs errors are not OSErrors
        raise StorageError(f"{location}: {type(e).__name__}: {reason(e)}") from None

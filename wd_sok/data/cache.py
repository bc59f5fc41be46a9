"""Remembered validation verdicts, so a restart does not read every file whole again.

A file that passed :func:`wd_sok.data.checks.check_file` is recorded under a key made of its resolved path,
size, modification time (ns), a hash of its parquet footer (an object on object storage: its URL, size and
ETag / generation, which the store changes with every new content) and a hash of what was checked (columns, their
dtypes / cardinalities / max_hotness / whether dynamic, the NaN policy, the map-order rule, the checks'
version). Any change to the file or to the rules gives another key, so a stale verdict is never used. Only
passes are recorded, and only when the run is known to start (:meth:`VerdictCache.commit`): a rejected run
writes nothing.

Where: ``<dataset>/.wd_sok_cache/verdicts/`` when the dataset folder is local and writable, else
``$XDG_CACHE_HOME/wd-sok/verdicts/`` (``~/.cache/wd-sok``); ``WD_SOK_CACHE_DIR`` overrides both, and
``WD_SOK_CACHE_DIR=off`` disables the cache. One small JSON file per verdict, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from wd_sok import storage

CHECKS_VERSION = 3  # bump when check_file's rules change: older verdicts are then ignored


def cache_root(dataset_dir: Path | str) -> Path | None:
    """The verdict folder for a dataset (see the module docstring); None when disabled."""
    override = os.environ.get("WD_SOK_CACHE_DIR")
    if override:
        return None if override == "off" else Path(override) / "verdicts"
    if storage.is_url(dataset_dir):  # remote data: the verdicts stay on this host
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wd-sok" / "verdicts"
    beside = Path(dataset_dir) / ".wd_sok_cache"
    if (beside.is_dir() and os.access(beside, os.W_OK)) or (not beside.exists() and os.access(dataset_dir, os.W_OK)):
        return beside / "verdicts"
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "wd-sok" / "verdicts"


def footer_hash(path: Path) -> str:
    """sha256 of the parquet footer (the last 8 + footer-length bytes: schema, row groups, statistics)."""
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        length = int.from_bytes(f.read(4), "little")
        f.seek(-(8 + length), os.SEEK_END)
        return hashlib.sha256(f.read(length + 8)).hexdigest()


def verdict_key(path: Path | str, rules: dict) -> str:
    """The key of ``path`` checked under ``rules`` (JSON-able); a URL is keyed by its ETag (one HEAD)."""
    if storage.is_url(path):
        info = storage.Store(storage.parent(path)).info(str(path).rsplit("/", 1)[1])
        ident = {"url": str(path), "size": info["size"], "etag": info["etag"], "rules": rules,
                 "version": CHECKS_VERSION}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    st = os.stat(path)
    ident = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "footer": footer_hash(path), "rules": rules, "version": CHECKS_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class VerdictCache:
    """Passed-file verdicts of one dataset: :meth:`passed` looks up, :meth:`add` + :meth:`commit` record."""

    def __init__(self, dataset_dir: Path | str) -> None:
        self.root = cache_root(dataset_dir)
        self._pending: dict[str, dict] = {}

    def passed(self, path: Path | str, rules: dict) -> bool:
        """True when ``path`` is recorded as having passed under ``rules``."""
        if self.root is None:
            return False
        try:
            return (self.root / f"{verdict_key(path, rules)}.json").is_file()
        except OSError:
            return False

    def add(self, path: Path | str, rules: dict) -> None:
        """Remember that ``path`` passed (written by :meth:`commit`)."""
        if self.root is not None:
            self._pending[verdict_key(path, rules)] = {"path": str(path), "verdict": "ok"}

    def commit(self) -> None:
        """Write the pending verdicts; a folder that cannot be written only costs the next start a re-check."""
        if self.root is None or not self._pending:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for key, record in self._pending.items():
                tmp = self.root / f".{key}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(record))
                os.replace(tmp, self.root / f"{key}.json")
        except OSError:
            pass
        self._pending.clear()

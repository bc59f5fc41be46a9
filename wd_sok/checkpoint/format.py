"""The sharded checkpoint format: one folder per step, one file per (table, array, writing rank), a manifest.

Layout of ``<model_dir>/ckpt-<step>/`` (written as ``.tmp-ckpt-<step>/`` and renamed when complete; named
``ckpt-<step>-<run>`` when another run's checkpoint holds ``ckpt-<step>``, see :mod:`wd_sok.checkpoint.lineage`).
``model_dir`` may be a URL (``s3://bucket/run``, :mod:`wd_sok.storage`): object stores have no rename, so the
objects are written under ``ckpt-<step>/`` directly and the manifest, uploaded last, is the commit::

    manifest.json                      written last (a step exists iff its manifest does)
    dense.npz                          replicated state: MLP and wide weights, their slots, iteration counters
    <group>.<table>.<array>.r<rank>-of-<N>.npy   (<table> escaped: :func:`shard_file`)
                                       rank's rows of one table's values (array "value") or one optimizer slot
                                       ("rms", "accumulator", "linear"): a standard .npy [count, dim] float32

The manifest (JSON; :data:`VERSION` 1) holds: ``format``, ``version``, ``step``, ``epoch``, ``step_in_epoch``,
``seed``, ``run`` / ``commit`` / ``spec_fingerprint`` (lineage), ``backend``, ``embedding_plan`` (the
writer's policy), ``world_size`` (of the writer), the resolved ``config``, per table ``{cardinality, dim,
dtype, arrays, placement, plan, shards: [{rank, start, stride, count, files: {array: name}}]}`` (``plan``:
where the writer held the table, ``{kind: row_wise|table_wise|replicated, owner?, reduction?}``,
informational: readers go by the shards' rows) and per file ``{bytes, crc32}``.
Row ``i`` of a shard file is global row ``start + i * stride``: the global id of every row is in the
manifest, not implied by the writer's rank count, so a reader under any rank count and backend reads,
of each file, only the row ranges holding rows it owns (and never a whole table it does not).
Dynamic (hash-table) tables name their rows by key instead: ``placement: "dynamic"``, per-rank key, value,
slot and counter files, re-sharded by key on restore (:mod:`wd_sok.checkpoint.keyed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from wd_sok.storage.paths import AnyPath, is_object_path, rmtree
from wd_sok.storage.paths import path as storage_path

FORMAT = "wd-sok-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
DENSE = "dense.npz"
PLACEMENT = "row i of a shard is global row start + i * stride"
CKPT_RE = re.compile(r"^ckpt-(\d+)(?:-([0-9a-f]{16}))?$")
LEGACY_RE = re.compile(r"^ckpt-(\d+)\.npz$")
TMP_PREFIX = ".tmp-ckpt-"
OLD_PREFIX = ".old-"  # a same-run step folder moved aside while its replacement is renamed in
NAME_MAX = 100  # escaped table names longer than this are cut and end in a hash (file names stay < 255 bytes)
BLOCK_BYTES = 32 << 20  # rows are streamed to and from files in blocks of about this many bytes


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required (or a save failed); the message is one line."""


class CorruptCheckpoint(CheckpointError):
    """A missing, truncated or damaged file: an older checkpoint may still be usable."""


class IncompatibleCheckpoint(CheckpointError):
    """Written for another feature spec or by a newer format version: no fallback can help."""


def shard_file(key: str, array: str, rank: int, world: int) -> str:
    """File name of ``rank``'s rows of table ``key`` ("deep/ad_id") and ``array`` ("value", "rms", ...).

    One-to-one in ``key``: the table name is percent-encoded as UTF-8 (every byte outside ``A-Za-z0-9_.-``,
    ``%`` included), so ``年龄`` / ``性别``, ``a b`` / ``a_b`` and ``a/b`` / ``a.b`` get different files; a name
    whose encoding exceeds :data:`NAME_MAX` keeps its first 60 characters plus ``~`` and 16 hex digits of its
    SHA-256 (``~`` never appears otherwise). Array names hold no ``.``, so the last field before the rank
    recovers the array. Readers do not parse names: the manifest maps each table and array to its files.
    """
    group, _, name = key.partition("/")
    safe = quote(name, safe="").replace("~", "%7E")
    if len(safe) > NAME_MAX:
        safe = f"{safe[:60]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return f"{group}.{safe}.{array}.r{rank:05d}-of-{world:05d}.npy"


def block_rows(dim: int) -> int:
    """Rows per streamed block for a table of width ``dim`` (float32)."""
    return max(1, BLOCK_BYTES // (4 * max(dim, 1)))


def list_legacy(model_dir: str | Path) -> list[AnyPath]:
    """Checkpoints of the earlier single-file format (``ckpt-<step>.npz``), oldest first."""
    d = storage_path(model_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := LEGACY_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def clean_temporaries(model_dir: str | Path) -> list[AnyPath]:
    """Remove what killed saves left (``.tmp-ckpt-*`` folders, step folders without a manifest); returns them.

    A step folder moved aside for a same-run replacement (``.old-ckpt-*``) goes back to its name if the
    replacement never arrived, else it is removed. Call on one rank at start-up, before any rank can save.
    On object storage (a URL) the partial objects of a killed save are those under a step prefix with no
    manifest: they are removed the same way (no ``.tmp-`` or ``.old-`` prefixes are written there).
    """
    d = storage_path(model_dir)
    if not d.is_dir():
        return []
    stale = []
    for p in d.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith(OLD_PREFIX) and CKPT_RE.match(p.name[len(OLD_PREFIX):]):
            home = d / p.name[len(OLD_PREFIX):]
            if not (home / MANIFEST).is_file():
                if home.exists():
                    rmtree(home)
                os.replace(p, home)  # local only: object stores never get an .old- prefix
                continue
            stale.append(p)
        elif p.name.startswith(TMP_PREFIX) or (CKPT_RE.match(p.name) and not (p / MANIFEST).is_file()):
            stale.append(p)
    for p in stale:
        rmtree(p)
    return stale


def read_manifest(folder: AnyPath) -> dict[str, Any]:
    """The manifest of checkpoint ``folder``: CorruptCheckpoint if unreadable or damaged (a field missing or of
    the wrong type: older checkpoints may still be usable), IncompatibleCheckpoint if too new."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{folder}: {MANIFEST} unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{folder}: {MANIFEST} is not a wd-sok checkpoint manifest")
    if not isinstance(manifest.get("version"), int):
        raise CorruptCheckpoint(f"{folder}: {MANIFEST}: damaged (field 'version')")
    if manifest["version"] > VERSION:
        raise IncompatibleCheckpoint(f"{folder}: {MANIFEST}: format version {manifest['version']} is newer "
                                     f"than this wd-sok reads ({VERSION}); upgrade wd-sok")
    problem = _damaged_field(manifest)
    if problem:
        raise CorruptCheckpoint(f"{folder}: {MANIFEST}: damaged (field {problem})")
    return manifest


def _damaged_field(m: dict[str, Any]) -> str:
    """The first field of manifest ``m`` that is missing or of the wrong type ('' if none)."""
    for name, kind in (("step", int), ("world_size", int), ("epoch", int), ("step_in_epoch", int),
                       ("tables", dict), ("files", dict)):
        if not isinstance(m.get(name), kind):
            return f"'{name}'"
    for name, f in m["files"].items():
        if not (isinstance(f, dict) and isinstance(f.get("bytes"), int) and isinstance(f.get("crc32"), int)):
            return f"'files/{name}'"
    for key, t in m["tables"].items():
        if not (isinstance(t, dict) and isinstance(t.get("shards"), list) and isinstance(t.get("arrays"), list)
                and isinstance(t.get("cardinality"), int) and isinstance(t.get("dim"), int)):
            return f"'tables/{key}'"
        for s in t["shards"]:
            if not (isinstance(s, dict) and isinstance(s.get("count"), int) and isinstance(s.get("files"), dict)
                    and all(isinstance(n, str) and n in m["files"] for n in s["files"].values())):
                return f"'tables/{key}/shards'"
            if t.get("placement") != "dynamic" and not all(isinstance(s.get(k), int) for k in ("start", "stride")):
                return f"'tables/{key}/shards'"
    return ""


def write_npy_header(f: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The standard .npy header (format 1.0) for a C-ordered array; data follows."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(shape)})


def read_npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the .npy file open as ``f`` (positioned at 0)."""
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = np.lib.format._read_array_header(f, version)  # noqa: SLF001 - numpy's own parser
    if fortran:
        raise ValueError("Fortran-ordered arrays are not written by wd-sok")
    return tuple(shape), dtype, f.tell()


def write_durable(path: AnyPath, data: bytes) -> dict[str, int]:
    """Write a small file and fsync it (an object: one PUT); its manifest entry ``{bytes, crc32}``."""
    if is_object_path(path):
        path.write_bytes(data)
        return {"bytes": len(data), "crc32": zlib.crc32(data)}
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def fsync_dir(path: AnyPath) -> None:
    """Make a rename or a new file inside ``path`` durable (nothing to do on object stores)."""
    if is_object_path(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

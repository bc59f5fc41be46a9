"""Placement-independent checkpoints: whole tables in global row order, dense weights, optimizer state.

A checkpoint is one ``ckpt-<step>.npz`` in ``model_dir`` holding arrays keyed ``<group>/<name>[:<slot>]``
plus a JSON ``meta`` entry (resolved config, epoch, step, step within epoch, data seed). It is written to a
temporary name and renamed, so a crash never leaves a half-written checkpoint under a real name; the last
``keep`` are kept and a truncated or corrupt latest one falls back to the one before, with a warning.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

CKPT_RE = re.compile(r"^ckpt-(\d+)\.npz$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def list_checkpoints(model_dir: str | Path) -> list[Path]:
    """Checkpoints in ``model_dir``, oldest first."""
    d = Path(model_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save(model_dir: str | Path, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any],
         keep: int = 2) -> Path:
    """Write ``arrays`` and ``meta`` atomically as ``ckpt-<step>.npz``; keep the newest ``keep``."""
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"ckpt-{step}.npz"
    tmp = d / f".tmp-ckpt-{step}-{os.getpid()}.npz"
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    for old in list_checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read one checkpoint; raises CheckpointError if it is truncated or corrupt."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from None
    if "__meta__" not in arrays:
        raise CheckpointError(f"{path}: not a wd-sok checkpoint (no meta entry)")
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    return arrays, meta


def load_latest(model_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], Path]:
    """The newest readable checkpoint in ``model_dir``; older ones are tried if the newest is corrupt."""
    candidates = list_checkpoints(model_dir)
    if not candidates:
        raise CheckpointError(f"--use_checkpoint: no checkpoint (ckpt-<step>.npz) in {model_dir}")
    for path in reversed(candidates):
        try:
            arrays, meta = load(path)
            return arrays, meta, path
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
    raise CheckpointError(f"--use_checkpoint: every checkpoint in {model_dir} is unreadable")

"""Run lineage: which run wrote each checkpoint of a model_dir, in which order, and what a new run may do there.

Every manifest records ``run`` (the id of the run that wrote it: 16 hex digits drawn by rank 0 at a fresh
start and kept by every resume of it), ``commit`` (1 + the highest commit number in the folder when it was
written: the commit order, independent of step numbers and clocks) and ``spec_fingerprint`` (SHA-256 of the
feature spec's parsed content). Checkpoints written before lineage existed have neither: run ``""`` and commit
0, older than any other, never deleted by retention.

Rules (each enforced by the caller named):

* a fresh training run (no ``--use_checkpoint``) in a folder holding checkpoints is refused at start
  (:func:`fresh_run_refusal`, agreed by every rank in :mod:`wd_sok.startup`), unless ``--overwrite``: then the
  checkpoints present at start are removed once the new run's first checkpoint is committed, not before;
* retention (:func:`expired`) keeps the newest ``keep`` checkpoints *of the current run* by commit order and
  never the folder just written; another run's checkpoints are never deleted;
* a save whose step folder holds another run's checkpoint is written beside it as ``ckpt-<step>-<run>``
  (:func:`folder_for`), never over it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wd_sok.checkpoint.format import CKPT_RE, MANIFEST, list_legacy
from wd_sok.storage.paths import AnyPath, rmtree
from wd_sok.storage.paths import path as storage_path


@dataclass(frozen=True)
class Entry:
    """One committed checkpoint folder (it has a manifest) as the listing sees it."""

    path: AnyPath
    step: int
    run: str  # "" for checkpoints written before lineage, or whose manifest is unreadable
    commit: int  # 0 for the same
    written_unix: float
    readable: bool

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.written_unix)) if self.written_unix else ""
        run = f"run {self.run}" if self.run else "written before run ids"
        return f"{self.path.name}: step {self.step}, {run}" + (f", {when}" if when else "")


def new_run_id() -> str:
    """A fresh run id: 16 random hex digits (drawn on rank 0 and broadcast)."""
    return secrets.token_hex(8)


def spec_fingerprint(spec: dict[str, Any]) -> str:
    """SHA-256 (hex) of what a feature spec says the model is (``FeatureSpec.to_dict()``'s channels and features;
    not where its files are, so a moved data set still resumes)."""
    content = {k: spec.get(k) for k in ("channel_spec", "feature_spec")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def scan(model_dir: str | Path) -> list[Entry]:
    """Committed checkpoints of ``model_dir`` (folders ``ckpt-<step>[-<run>]`` with a manifest), oldest commit
    first (ties, and checkpoints without lineage, by step)."""
    d = storage_path(model_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if not m or not (p / MANIFEST).is_file():
            continue
        try:
            manifest = json.loads((p / MANIFEST).read_text())
            run, commit = str(manifest.get("run", "")), int(manifest.get("commit", 0))
            written, readable = float(manifest.get("written_unix", 0.0)), True
        except (OSError, ValueError, TypeError, AttributeError):
            run, commit, written, readable = "", 0, 0.0, False
        found.append(Entry(p, int(m.group(1)), run, commit, written, readable))
    return sorted(found, key=lambda e: (e.commit, e.step, e.path.name))


def next_commit(entries: list[Entry]) -> int:
    """The commit number of the next checkpoint written into the folder listed as ``entries``."""
    return 1 + max((e.commit for e in entries), default=0)


def folder_for(model_dir: str | Path, step: int, run: str, entries: list[Entry]) -> AnyPath:
    """Where ``run`` commits step ``step``: ``ckpt-<step>``, unless another run's checkpoint holds that name."""
    plain = storage_path(model_dir) / f"ckpt-{step}"
    taken = next((e for e in entries if e.path.name == plain.name), None)
    if taken is None or (taken.run == run and run):
        return plain
    return storage_path(model_dir) / f"ckpt-{step}-{run}"


def expired(entries: list[Entry], run: str, keep: int, just_written: AnyPath) -> list[AnyPath]:
    """Checkpoints of ``run`` beyond the newest ``keep`` by commit order (never ``just_written``)."""
    mine = [e.path for e in entries if e.run == run and run]
    return [p for p in mine[:-keep] if p != just_written] if keep > 0 else []


def fresh_run_refusal(model_dir: str | Path) -> str | None:
    """The one-line refusal for a fresh run in ``model_dir`` if it holds checkpoints, else None."""
    entries = scan(model_dir)
    if entries:
        latest = entries[-1].describe()
        count = f"{len(entries)} checkpoint(s), latest {latest}"
    else:
        legacy = list_legacy(model_dir)
        if not legacy:
            return None
        count = f"{len(legacy)} checkpoint(s) of the earlier single-file format, latest {legacy[-1].name}"
    return (f"--model_dir {model_dir} holds {count}; resume that run with --use_checkpoint (or "
            "--use_checkpoint auto), or start over with --overwrite (they are removed once this run's first "
            "checkpoint is committed), or choose another --model_dir")


def overwritten(model_dir: str | Path) -> list[AnyPath]:
    """What ``--overwrite`` will remove after the new run's first commit: every checkpoint present now."""
    return [e.path for e in scan(model_dir)] + list_legacy(model_dir)


def remove(paths: list[AnyPath]) -> int:
    """Delete checkpoints (folders, manifest first, or earlier single-file ``.npz``); returns how many were
    there."""
    gone = 0
    for p in paths:
        if p.is_dir():
            rmtree(p, first=MANIFEST)
            gone += 1
        elif p.exists():
            p.unlink(missing_ok=True)
            gone += 1
    return gone


def lineage_fields(run: str, commit: int, fingerprint: str) -> dict[str, Any]:
    """The manifest fields this module reads back."""
    return {"run": run, "commit": commit, "spec_fingerprint": fingerprint}


def list_checkpoints(model_dir: str | Path) -> list[AnyPath]:
    """Committed checkpoint folders of ``model_dir``, oldest commit first (:func:`scan`)."""
    return [e.path for e in scan(model_dir)]

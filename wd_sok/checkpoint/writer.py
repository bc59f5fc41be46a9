"""Collective save of a sharded checkpoint: every rank streams its own rows; rank 0 adds the rest and commits.

Memory: besides the variables themselves, a rank holds one block (:func:`~wd_sok.checkpoint.format.block_rows`,
about 32 MiB) of one array at a time (a delta: two 2 MiB pieces per file in flight, up to
:data:`~wd_sok.checkpoint.delta.PARALLEL_FILES` files); rank 0 also holds the replicated dense state (the MLP
and its slots).
I/O: each rank writes ``rows x dim x 4`` bytes per array (values and every slot) of the rows it saves, in
parallel with the others. Collectives: one agreement that the folder exists, one gather of the per-rank file
records, one broadcast of the outcome; every rank makes the same calls whatever happens locally.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from wd_sok.checkpoint import delta, keyed, lineage
from wd_sok.checkpoint.format import (
    DENSE,
    FORMAT,
    MANIFEST,
    OLD_PREFIX,
    PLACEMENT,
    TMP_PREFIX,
    VERSION,
    CheckpointError,
    block_rows,
    fsync_dir,
    shard_file,
    write_durable,
    write_npy_header,
)
from wd_sok.distributed import Runtime
from wd_sok.state import KeyedTableState, State, TableState
from wd_sok.storage.paths import AnyPath, is_object_path, open_sequential, rmtree
from wd_sok.storage.paths import path as storage_path


def save(model_dir: str | Path, step: int, tables: list[State], dense: dict[str, np.ndarray] | None,
         meta: dict[str, Any], runtime: Runtime, keep: int = 2, base: Path | None = None) -> dict[str, Any]:
    """Write checkpoint ``ckpt-<step>`` (collective: every rank calls it with its own ``tables``), full, or a
    delta against full checkpoint folder ``base`` (:mod:`wd_sok.checkpoint.delta`: the rows changed since).

    Args:
        model_dir: the checkpoint folder, shared by every rank (a shared filesystem across hosts).
        step: global step (the folder's name).
        tables: this rank's tables (:func:`wd_sok.state.table_states`).
        dense: the replicated state (:func:`wd_sok.state.dense_state`); only rank 0's is used.
        meta: epoch, step_in_epoch, seed, backend, config, ``run`` (this run's id) and ``spec_fingerprint``...
            copied into the manifest (with ``commit``, the folder's next commit number).
        runtime: rank, world size, collectives.
        keep: checkpoints of this run kept (older ones of this run, by commit order, are removed after this one
            is committed; other runs' are never touched: :mod:`wd_sok.checkpoint.lineage`; nor is the base of
            a delta kept).
        base: for a delta, the full checkpoint it is written against (its rows are every rank's changed rows).

    Returns:
        ``{"path", "bytes" (this rank's), "seconds" (this rank's writing), "total_bytes", "kind"}``.

    Raises:
        CheckpointError (on every rank) when any rank failed, whatever the exception; nothing is left under a
        ``ckpt-*`` name then and no rank is left waiting in a collective.
    """
    model_dir = storage_path(model_dir)  # a Path, or an ObjectPath for a URL (wd_sok.storage)
    tmp = model_dir / f"{TMP_PREFIX}{step}"
    problem, final, commit, extra = "", model_dir / f"ckpt-{step}", 0, {}
    if runtime.is_chief:
        try:
            if base is not None:
                extra = {"kind": delta.KIND, "base": delta.base_ref(base)}
            entries = lineage.scan(model_dir)
            commit = lineage.next_commit(entries)
            final = lineage.folder_for(model_dir, step, str(meta.get("run", "")), entries)
            if is_object_path(final):  # no rename on object stores: written in place, the manifest last commits
                tmp = final
            if tmp.exists():  # an object store's same-run step saved before: its manifest goes first
                rmtree(tmp, first=MANIFEST)
            tmp.mkdir(parents=True)
        except OSError as e:
            problem = f"cannot create {tmp} ({e.strerror})"
        except Exception as e:  # noqa: BLE001 - any failure becomes the agreed verdict
            problem = f"{tmp}: {type(e).__name__}: {e}"
    problem, tmp = runtime.broadcast_object((problem, tmp), "ckpt_dir")
    if problem:
        raise CheckpointError(f"checkpoint at step {step} not saved: {problem}")

    t0 = time.perf_counter()
    record: dict[str, Any] = {"rank": runtime.rank, "tables": {}, "files": {}, "error": ""}
    try:
        if base is not None:  # a delta: this rank's changed rows only, several files at once
            record["tables"] = delta.write_tables(tmp, tables, runtime.rank, runtime.size, record["files"])
        else:
            for state in tables:
                if isinstance(state, KeyedTableState):  # dynamic: rows named by key (wd_sok.checkpoint.keyed)
                    record["tables"][state.key] = keyed.write_keyed(tmp, state, runtime.rank, runtime.size,
                                                                    record["files"])
                else:
                    record["tables"][state.key] = _write_table(tmp, state, runtime, record["files"])
    except OSError as e:
        record["error"] = f"rank {runtime.rank}: {e.filename or tmp}: {e.strerror}"
    except Exception as e:  # noqa: BLE001 - any failure becomes the agreed verdict, after the collective
        record["error"] = f"rank {runtime.rank}: {type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    mine = sum(f["bytes"] for f in record["files"].values())
    records = runtime.allgather_object(record, "ckpt_records")

    outcome = {"path": "", "error": next((r["error"] for r in records if r["error"]), "")}
    if runtime.is_chief:
        try:
            if outcome["error"]:
                raise CheckpointError(outcome["error"])
            info = {s.key: keyed.table_info(s) if isinstance(s, KeyedTableState) else
                    {"cardinality": s.table.cardinality, "dim": s.table.dim, "dtype": "float32",
                     "plan": s.collection.placement(s.table.name).describe(),
                     **({"placement": delta.PLACEMENT} if base is not None else {})} for s in tables}
            _commit(tmp, final, step, records, dense, {**meta, **extra, "commit": commit, "tables": info},
                    runtime.size)
            outcome["path"] = str(final)
        except Exception as e:  # noqa: BLE001 - any failure becomes the agreed verdict
            outcome["error"] = outcome["error"] or (str(e) if isinstance(e, OSError | CheckpointError)
                                                    else f"{type(e).__name__}: {e}")
            rmtree(tmp, first=MANIFEST)
        if not outcome["error"]:  # committed: this run's older checkpoints beyond `keep` go, nobody else's
            entries = lineage.scan(model_dir)
            expired = lineage.expired(entries, str(meta.get("run", "")), keep, final)
            needed = delta.bases_needed([e.path for e in entries if e.path not in expired])
            for old in expired:
                if old.name not in needed:  # a kept delta's base stays
                    rmtree(old, first=MANIFEST)
    outcome = runtime.broadcast_object(outcome, "ckpt_outcome")
    if outcome["error"]:
        raise CheckpointError(f"checkpoint at step {step} not saved: {outcome['error']}")
    return {"path": outcome["path"], "bytes": mine, "seconds": seconds, "kind": "delta" if base else "full",
            "total_bytes": sum(f["bytes"] for r in records for f in r["files"].values())}


def _write_table(folder: AnyPath, state: TableState, runtime: Runtime, files: dict[str, dict]) -> dict[str, Any]:
    """Write this rank's rows of every array of one table; returns its shard record."""
    rows, dim = state.rows, state.table.dim
    shard = {"rank": runtime.rank, "start": rows.start, "stride": rows.stride, "count": rows.count, "files": {}}
    step = block_rows(dim)
    for array in state.arrays():
        name = shard_file(state.key, array, runtime.rank, runtime.size)
        header = io.BytesIO()
        write_npy_header(header, (rows.count, dim), np.float32)
        with open_sequential(folder / name) as f:  # O_DIRECT + fsync on close; object stores: multipart upload
            f.write(header.getvalue())  # in the checksum too: a damaged header is a damaged file
            for lo in range(0, rows.count, step):  # block k is written while block k + 1 is read
                f.write_behind(np.ascontiguousarray(state.read(array, lo, min(rows.count, lo + step)), np.float32))
        # one CRC32 per block too (pieces after the header), so a rank reading only some blocks checks them
        files[name] = {"bytes": f.size, "crc32": f.crc, "block_rows": step, "block_crc32": f.pieces[1:]}
        shard["files"][array] = name
    return shard


def _commit(tmp: AnyPath, final: AnyPath, step: int, records: list[dict], dense: dict[str, np.ndarray] | None,
            meta: dict[str, Any], world: int) -> None:
    """Rank 0: dense state, then the manifest, then the rename that makes the step exist (object stores: the
    manifest's upload does; ``tmp`` is ``final`` there)."""
    files: dict[str, dict] = {}
    for r in records:
        files.update(r["files"])
    if dense is not None:
        buf = io.BytesIO()
        np.savez(buf, **dense)
        files[DENSE] = write_durable(tmp / DENSE, buf.getvalue())
    tables: dict[str, Any] = {}
    for r in records:
        for key, shard in r["tables"].items():
            entry = tables.setdefault(key, {"arrays": list(shard["files"]), "shards": []})
            entry["shards"].append(shard)
    for key, entry in tables.items():
        entry.update(meta["tables"][key])  # cardinality, dim, dtype (dynamic: placement, rules) from the config
        entry.setdefault("placement", PLACEMENT)
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world,
                "written_unix": time.time(), **{k: v for k, v in meta.items() if k != "tables"},
                "tables": tables, "files": files}
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)
    if tmp == final:  # an object store: the manifest just written is the commit
        return
    aside = final.parent / f"{OLD_PREFIX}{final.name}"
    if final.exists():  # this run reached this step before (it resumed from an older one): moved aside, not
        os.replace(final, aside)  # deleted, until the new one is in (clean_temporaries puts it back if killed)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)

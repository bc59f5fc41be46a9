"""Convert checkpoints of the earlier single-file format (``ckpt-<step>.npz``: whole tables in global row
order) into the sharded format, as if written by one rank. One process, one array at a time, streamed from
the zip member in blocks: memory stays at one block plus the dense state.

    python -m wd_sok.checkpoint convert MODEL_DIR [--remove]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from wd_sok.checkpoint.format import (
    DENSE,
    FORMAT,
    MANIFEST,
    PLACEMENT,
    TMP_PREFIX,
    VERSION,
    CheckpointError,
    block_rows,
    fsync_dir,
    list_legacy,
    read_npy_header,
    shard_file,
    write_durable,
    write_npy_header,
)

TABLE_GROUPS = ("wide/", "deep/")


def convert(npz: Path) -> Path:
    """Write ``ckpt-<step>/`` beside ``npz`` from it; returns the new folder (left alone if it exists).

    Raises CheckpointError (one line naming ``npz``) for anything unreadable in it; nothing is left behind then.
    """
    step = int(npz.name[len("ckpt-"):-len(".npz")])
    final = npz.parent / f"ckpt-{step}"
    if (final / MANIFEST).exists():
        return final
    tmp = npz.parent / f"{TMP_PREFIX}{step}-convert"
    try:
        return _convert(npz, step, tmp, final)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{npz}: unreadable checkpoint ({what})") from None


def _convert(npz: Path, step: int, tmp: Path, final: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    tables: dict[str, dict] = {}
    dense: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(npz) as z:
            names = [n[:-len(".npy")] for n in z.namelist() if n.endswith(".npy")]
            if "__meta__" not in names:
                raise CheckpointError(f"{npz}: not a wd-sok checkpoint (no meta entry)")
            meta = json.loads(np.load(io.BytesIO(z.read("__meta__.npy"))).tobytes().decode())
            for key in names:
                table, _, slot = key.partition(":")
                if key == "__meta__":
                    continue
                if not table.startswith(TABLE_GROUPS):
                    dense[key] = np.load(io.BytesIO(z.read(f"{key}.npy")))
                    continue
                array = slot or "value"
                name = shard_file(table, array, 0, 1)
                shape = _copy_member(z, f"{key}.npy", tmp / name, files)
                entry = tables.setdefault(table, {"cardinality": int(shape[0]), "dim": int(shape[1]),
                                                  "dtype": "float32", "placement": PLACEMENT, "arrays": [],
                                                  "shards": [{"rank": 0, "start": 0, "stride": 1,
                                                              "count": int(shape[0]), "files": {}}]})
                entry["arrays"].append(array)
                entry["shards"][0]["files"][array] = name
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{npz}: unreadable checkpoint ({e})") from None
    buf = io.BytesIO()
    np.savez(buf, **dense)
    files[DENSE] = write_durable(tmp / DENSE, buf.getvalue())
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": 1,
                "written_unix": time.time(), "converted_from": npz.name,
                "epoch": meta["epoch"], "step_in_epoch": meta["step_in_epoch"],
                "global_step": meta.get("global_step", step), "seed": meta.get("seed"),
                "backend": meta.get("backend"), "config": meta.get("config", {}),
                "tables": tables, "files": files}
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def _copy_member(z: zipfile.ZipFile, member: str, dest: Path, files: dict[str, dict]) -> tuple[int, int]:
    """Stream one [rows, dim] array out of the zip into a .npy shard file; returns its shape."""
    with z.open(member) as src:
        shape, dtype, _ = read_npy_header(src)
        if len(shape) != 2 or dtype != np.float32:
            raise ValueError(f"{member}: expected a [rows, dim] float32 table, got {shape} {dtype}")
        header = io.BytesIO()
        write_npy_header(header, shape, np.float32)
        crc = zlib.crc32(header.getvalue())
        with open(dest, "wb") as out:
            out.write(header.getvalue())
            step = block_rows(shape[1]) * shape[1] * 4
            left = shape[0] * shape[1] * 4
            while left:
                chunk = src.read(min(step, left))
                if not chunk:
                    raise ValueError(f"{member}: truncated")
                out.write(chunk)
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            out.flush()
            os.fsync(out.fileno())
            files[dest.name] = {"bytes": out.tell(), "crc32": crc}
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wd_sok.checkpoint",
                                     description="Convert ckpt-<step>.npz checkpoints to the sharded format")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert every ckpt-<step>.npz in MODEL_DIR")
    conv.add_argument("model_dir")
    conv.add_argument("--remove", action="store_true", help="delete each .npz once converted")
    args = parser.parse_args(argv)
    legacy = list_legacy(args.model_dir)
    if not legacy:
        print(f"wd-sok: error: no ckpt-<step>.npz in {args.model_dir}", file=sys.stderr)
        return 2
    for npz in legacy:
        try:
            folder = convert(npz)
        except CheckpointError as e:
            print(f"wd-sok: error: {e}", file=sys.stderr)
            return 2
        print(f"{npz} -> {folder}")
        if args.remove:
            npz.unlink()
    return 0

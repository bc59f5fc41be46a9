"""``python -m wd_sok.checkpoint inspect PATH``: what a checkpoint folder holds, or every checkpoint of a model_dir.

Per checkpoint: full or delta (and its base), step, epoch, writer ranks, run; per table the rows it holds
(a delta: the changed rows, of the table's cardinality; a dynamic table: keys in use, or changed positions)
and its bytes; the total and the dense state's bytes. Reads manifests only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wd_sok.checkpoint import delta, lineage
from wd_sok.checkpoint.format import DENSE, MANIFEST, CheckpointError, read_manifest


def describe(folder: Path, manifest: dict[str, Any], tables: bool = True) -> list[str]:
    """Lines describing one checkpoint (its ``manifest``)."""
    files = manifest.get("files", {})
    total = sum(f["bytes"] for f in files.values())
    kind = (f"delta against {manifest['base']['path']} (step {manifest['base']['step']})"
            if delta.is_delta(manifest) else "full")
    lines = [f"{folder.name}: {kind}, step {manifest['step']}, epoch {manifest['epoch']} step "
             f"{manifest['step_in_epoch']}, written by {manifest['world_size']} rank(s), run "
             f"{manifest.get('run') or '-'}: {total:,} bytes ({files.get(DENSE, {}).get('bytes', 0):,} dense)"]
    for key, entry in manifest["tables"].items() if tables else ():
        shards = entry["shards"]
        held = sum(int(s.get("changed", s["count"])) for s in shards)
        size = sum(files[n]["bytes"] for s in shards for n in s["files"].values())
        what = ("keys" if "changed" not in (shards[0] if shards else {}) else "changed keys") \
            if entry.get("placement") == "dynamic" else ("changed rows" if delta.is_delta(manifest) else "rows")
        share = f" ({100 * held / entry['cardinality']:.1f}%)" if entry["cardinality"] else ""
        lines.append(f"  {key}: {held:,} {what} of {entry['cardinality']:,}{share}, {size:,} bytes")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wd_sok.checkpoint inspect",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("path", help="a checkpoint folder (ckpt-<step>) or a model_dir")
    args = parser.parse_args(argv)
    path = Path(args.path)
    folders = [path] if (path / MANIFEST).is_file() else lineage.list_checkpoints(path)
    if not folders:
        print(f"wd-sok: error: no checkpoint (ckpt-<step>/{MANIFEST}) at {path}", file=sys.stderr)
        return 2
    for folder in folders:
        try:
            print("\n".join(describe(folder, read_manifest(folder), tables=len(folders) == 1)))
        except (CheckpointError, KeyError, TypeError) as e:
            print(f"{folder.name}: unreadable ({e})")
    return 0

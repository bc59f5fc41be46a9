"""Run a script of the repository in a working and temporary directory of this rank's own (as on separate hosts).

``python tests/dist/own_dirs.py BASE SCRIPT ARGS...`` (under horovodrun or alone): makes ``BASE/rank<r>``
(``r``: ``HOROVOD_RANK``, 0 when absent), points ``HOME``, ``XDG_CACHE_HOME`` (the data checks' verdict cache
of a remote dataset), ``TMPDIR`` (``tempfile``: the export's staging folder) at it, changes into it, and
replaces itself (``exec``: same pid, so horovodrun's SIGTERM reaches the script itself) with
``python ROOT/SCRIPT ARGS...``. Relative paths in ARGS (``--results_dir results``) then land in the rank's
own folder: nothing local is shared between ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> None:
    base, script, args = Path(argv[0]), argv[1], argv[2:]
    home = base / f"rank{os.environ.get('HOROVOD_RANK', '0')}"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ.update({"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "TMPDIR": str(home / "tmp")})
    os.chdir(home)
    os.execv(sys.executable, [sys.executable, str(ROOT / script), *args])


if __name__ == "__main__":
    main(sys.argv[1:])

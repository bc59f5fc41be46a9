"""Run main.py's ``main`` once per job in one process (one TensorFlow import for many refusals).

Usage: ``python tests/dist/main_many.py JOBS.json``; JOBS.json is a list of ``{"argv": [...], "out": DIR}``.
Each job's stdout and stderr (file descriptors 1 and 2, so native writes too) go to DIR/stdout and DIR/stderr
and its exit status to DIR/rc. Used by tests whose runs all stop at start-up checks (tests/test_bad_input.py).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import main  # noqa: E402 - the repository's main.py, after its folder is on the path


def run_one(argv: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out / "stdout", "wb") as o, open(out / "stderr", "wb") as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
        try:
            code = main.main(argv)
        except SystemExit as stop:  # argparse's usage errors
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is a failure the test reports
            traceback.print_exc()
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    (out / "rc").write_text(str(code))


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run_one(job["argv"], Path(job["out"]))

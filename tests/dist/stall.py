"""``main.py`` whose rank 0 sleeps ``WD_SOK_TEST_EXPORT_SLEEP`` seconds inside the export before it builds the
serving model, while rank 1 waits in the export's collectives (tests/test_stall.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wd_sok import export  # noqa: E402

_build = export.build_serving_model


def _slow_build(model):  # noqa: ANN001, ANN202 - export.build_serving_model's signature
    seconds = float(os.environ.get("WD_SOK_TEST_EXPORT_SLEEP", "0"))
    time.sleep(seconds)
    print(f"slept {seconds:.0f} s in the export", flush=True)
    return _build(model)


export.build_serving_model = _slow_build

if __name__ == "__main__":
    import main

    sys.exit(main.main(sys.argv[1:]))

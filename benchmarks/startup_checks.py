"""Start-up file checks alone: CPU and wall seconds to build the train and test DataLoaders of a dataset
(footers, schema, value checks; the verdict cache when the tree has one), twice in one process.

Usage (``tree``: a checkout to import wd_sok from; remove ``<data>/.wd_sok_cache`` first for a cold start)::

    .venv/bin/python benchmarks/startup_checks.py . /tmp/demo

Prints ``[[cpu_s, wall_s] first build, [cpu_s, wall_s] second build]``: without a cache both builds read every
file; with it the first (cold) checks and records, the second (warm) reads footers only.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path


def main() -> None:
    tree, data = sys.argv[1], Path(sys.argv[2])
    sys.path.insert(0, tree)
    warnings.filterwarnings("ignore")
    from wd_sok.data.loader import DataLoader
    from wd_sok.feature_spec import TEST, TRAIN, FeatureSpec

    spec = FeatureSpec.from_yaml(data / "feature_spec.yaml")
    out = []
    for _ in range(2):
        c0, w0 = time.process_time(), time.perf_counter()
        DataLoader(spec, TRAIN, 4096, shuffle=True, drop_last=True)
        DataLoader(spec, TEST, 16384, with_map=True)
        out.append([round(time.process_time() - c0, 2), round(time.perf_counter() - w0, 2)])
    print(json.dumps({"tree": str(Path(tree).resolve()), "data": str(data), "builds": out}))


if __name__ == "__main__":
    main()

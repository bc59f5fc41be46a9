"""Outbrain preprocessing throughput on CPU: clicks_train rows per second, end to end (stage, fit, write).

Usage: ``.venv/bin/python benchmarks/preproc_throughput.py [--displays 28250] [--seed 0]`` (28,250 synthetic
displays give ~200k click rows). Import time of NVTabular/TensorFlow is reported apart from the run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--displays", type=int, default=28250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="cpu")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.perf_counter()
    from wd_sok.outbrain import synthetic
    from wd_sok.outbrain.pipeline import preprocess
    import_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="wd_sok_preproc_bench_") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        t0 = time.perf_counter()
        counts = synthetic.generate(raw, displays=args.displays, seed=args.seed)
        gen_s = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            result = preprocess(raw, out, seed=args.seed, device=args.device)
            run_s = time.perf_counter() - t0
        rows = counts["clicks_train"]
        print(f"clicks_train rows: {rows} ({args.displays} displays); generate {gen_s:.1f} s; "
              f"imports {import_s:.1f} s")
        print(f"preprocess ({'cpu' if result.cpu else 'gpu'}, {os.cpu_count()} cores): {run_s:.2f} s -> "
              f"{rows / run_s:,.0f} clicks rows/s (train {result.rows['train']}, test {result.rows['test']})")


if __name__ == "__main__":
    main()

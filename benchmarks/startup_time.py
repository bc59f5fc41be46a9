"""Start-up time of main.py: process start to the end of the first training step, and a whole --evaluate run.

For each code tree given (``--trees name=path``, e.g. the commit before the verdict cache and this one) and
each dataset (``--data name=path``), interleaved per repetition:

* ``train_first_step_s``: from launching ``python main.py --log_every 1`` to the line of step 1 on stdout (the
  process is then stopped); includes Python / TensorFlow import, spec and file checks, model build, the
  first step's tracing;
* ``evaluate_s``: wall time of a whole ``main.py --evaluate`` (no checkpoint: initial weights), which also
  validates the training files.

With the verdict cache the first start of a dataset checks every file ("cold": the cache folder is removed
first) and later starts read footers only ("warm"); a tree without the cache is timed the same way (its
cold and warm are the same work). The demo arguments are the Makefile's (``DEMO_ARGS``). Usage::

    .venv/bin/python benchmarks/startup_time.py --trees before=/tmp/base after=. \\
        --data demo=/tmp/demo demo10x=/tmp/demo10x --reps 2

Writes ``benchmarks/results/startup_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_facts  # noqa: E402

DEMO_ARGS = ["--num_epochs", "2", "--global_batch_size", "4096", "--eval_batch_size", "16384",
             "--deep_warmup_epochs", "0.5", "--deep_learning_rate", "0.001"]


def _cmd(tree: Path, data: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, str(tree / "main.py"), "--dataset_path", str(data), "--model_dir", str(work / "ckpt"),
            "--results_dir", str(work / "results"), *DEMO_ARGS, *extra]


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def first_step_s(tree: Path, data: Path) -> float:
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        proc = subprocess.Popen(_cmd(tree, data, Path(work), "--log_every", "1"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=_env(tree), cwd=tree)
        try:
            for line in proc.stdout:
                if "epoch 0 step 1 " in line:
                    return time.perf_counter() - t0
            raise RuntimeError(f"{tree}: no first step (exit {proc.wait()})")
        finally:
            proc.kill()
            proc.wait()


def evaluate_s(tree: Path, data: Path) -> float:
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        proc = subprocess.run(_cmd(tree, data, Path(work), "--evaluate"), capture_output=True, text=True,
                              env=_env(tree), cwd=tree)
        if proc.returncode:
            raise RuntimeError(f"{tree}: --evaluate failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", nargs="+", required=True, help="name=path of a code tree (with main.py)")
    p.add_argument("--data", nargs="+", required=True, help="name=path of a dataset folder")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default="startup_time")
    args = p.parse_args()
    trees = {k: Path(v).resolve() for k, v in (t.split("=", 1) for t in args.trees)}
    datas = {k: Path(v).resolve() for k, v in (d.split("=", 1) for d in args.data)}
    rows = []
    for rep in range(args.reps):
        for dname, data in datas.items():
            for tname, tree in trees.items():
                shutil.rmtree(data / ".wd_sok_cache", ignore_errors=True)
                for phase in ("cold", "warm"):  # cold: nothing cached; warm: the previous start's verdicts
                    row = {"rep": rep, "data": dname, "tree": tname, "phase": phase,
                           "train_first_step_s": first_step_s(tree, data)}
                    if phase == "cold":
                        shutil.rmtree(data / ".wd_sok_cache", ignore_errors=True)
                    row["evaluate_s"] = evaluate_s(tree, data)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                shutil.rmtree(data / ".wd_sok_cache", ignore_errors=True)
    medians = {}
    for key in {(r["data"], r["tree"], r["phase"]) for r in rows}:
        sel = [r for r in rows if (r["data"], r["tree"], r["phase"]) == key]
        medians["/".join(key)] = {m: sorted(r[m] for r in sel)[len(sel) // 2] for m in
                                  ("train_first_step_s", "evaluate_s")}
    out = ROOT / "benchmarks" / "results" / f"{args.out}.json"
    out.write_text(json.dumps({"machine": machine_facts(), "trees": {k: str(v) for k, v in trees.items()},
                               "data": {k: str(v) for k, v in datas.items()}, "reps": args.reps,
                               "medians": dict(sorted(medians.items())), "rows": rows}, indent=1))
    for key, m in sorted(medians.items()):
        print(f"{key:32s} first step {m['train_first_step_s']:6.1f} s   --evaluate {m['evaluate_s']:6.1f} s")


if __name__ == "__main__":
    main()

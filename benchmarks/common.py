"""Shared by the benchmark scripts: machine facts, cached synthetic datasets, launching, statistics, output.

Every benchmark writes ``benchmarks/results/<name>.json`` holding ``machine`` (:func:`machine_facts`), its
parameters and raw per-repetition measurements next to their medians, so a figure can always be traced back
to the samples it came from. The machine is shared: compared configurations are measured interleaved in one
run (repetition r of every configuration before repetition r + 1 of any) and summarised by medians.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
SPECS = ROOT / "tests" / "feature_specs"
DATA = Path(os.environ.get("WD_SOK_BENCH_DATA", "/tmp/wd_sok_bench"))  # generated data (not in the repo)
PYTHON = sys.executable


# ----------------------------------------------------------------------------- facts
def machine_facts() -> dict[str, Any]:
    """nproc, CPU model and SIMD flags, memory, load, git commit (and whether the tree is dirty), versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    simd = sorted(f for f in (flags.group(1).split() if flags else [])
                  if f.startswith(("avx", "amx")) or f in ("fma", "sse4_2"))
    mhz = re.search(r"^cpu MHz\s*:\s*(.*)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpu_mhz": float(mhz.group(1)) if mhz else None,
        "cpu_simd_flags": simd,
        "mem_total_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "loadavg_at_start": list(os.getloadavg()),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_files": len([x for x in git("status", "--porcelain").splitlines() if x.strip()]),
        "python": platform.python_version(),
        "versions": _versions(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shared_machine": True,
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("tensorflow-cpu", "tensorflow", "horovod", "merlin-dataloader", "merlin-core", "numpy",
                 "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------- data
def load_spec_dict(name_or_path: str | Path) -> dict[str, Any]:
    """A feature spec as a plain dict: ``"baseline"`` means ``tests/feature_specs/baseline.yaml``."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SPECS / f"{name_or_path}.yaml"
    return yaml.safe_load(path.read_text())


def ensure_dataset(name: str, spec: dict[str, Any] | str, train_rows: int, test_rows: int,
                   train_files: int = 4, test_files: int = 2, seed: int = 0) -> Path:
    """Generate (once; cached under ``DATA/name``) a synthetic dataset for ``spec`` with wd_sok's generator.

    The cache is reused only if its ``generator_report.json`` has the same rows and seed and its spec the
    same features; otherwise the folder is regenerated.
    """
    from wd_sok.feature_spec import FeatureSpec
    from wd_sok.tools.generate import generate

    raw = load_spec_dict(spec) if isinstance(spec, str) else copy.deepcopy(spec)
    out = DATA / name
    stamp = {"rows": {"train": train_rows, "test": test_rows}, "seed": seed, "files": [train_files, test_files],
             "feature_spec": raw["feature_spec"]}
    stamp_file = out / "bench_stamp.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp)):
        return out
    DATA.mkdir(parents=True, exist_ok=True)
    fs = FeatureSpec.from_dict(raw, base_directory=SPECS, origin=f"<bench spec {name}>", allow_csv=True)
    generate(fs, out, train_rows, test_rows, train_files, test_files, seed, "parquet", overwrite=True)
    stamp_file.write_text(json.dumps(stamp))
    return out


# ----------------------------------------------------------------------------- processes
def horovodrun() -> str:
    """The horovodrun next to this Python (the project's .venv)."""
    here = Path(PYTHON).parent / "horovodrun"
    if not here.exists():
        raise FileNotFoundError(f"{here}: horovodrun not found (run make setup)")
    return str(here)


def bench_env(threads: int | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for launched ranks: quiet TensorFlow, the repo importable, optional thread caps."""
    out = dict(os.environ)
    out.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": f"{ROOT}:{out.get('PYTHONPATH', '')}".rstrip(":"),
                "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
    if threads:
        out.update({"OMP_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads),
                    "TF_NUM_INTEROP_THREADS": "2"})
    out.update(extra or {})
    return out


def launch(np_: int, args: Sequence[str], timeout: float, env: dict[str, str] | None = None,
           cwd: Path = ROOT) -> str:
    """Run ``python <args>`` on ``np_`` ranks (``horovodrun --gloo`` when np_ > 1); return its output.

    Raises RuntimeError with the output's tail on a non-zero exit or a timeout (the whole process group,
    horovodrun and its ranks, is killed then).
    """
    cmd = [PYTHON, *args]
    if np_ > 1:
        cmd = [horovodrun(), "--gloo", "-np", str(np_), "-H", f"localhost:{np_}", *cmd]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or bench_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    return out


def result_lines(output: str, tag: str = "BENCH_RESULT") -> list[dict[str, Any]]:
    """JSON objects printed by launched workers as ``<tag> {json}`` lines (horovodrun prefixes are allowed)."""
    found = []
    for line in output.splitlines():
        i = line.find(tag + " ")
        if i >= 0:
            found.append(json.loads(line[i + len(tag) + 1:]))
    return found


def dllogger_values(path: Path, key: str) -> list[float]:
    """Every value of ``key`` in the LOG records of a DLLogger ``log.json``."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("DLLL "):
            rec = json.loads(line[5:])
            if rec.get("type") == "LOG" and key in rec.get("data", {}):
                out.append(float(rec["data"][key]))
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- statistics and output
def median(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    return statistics.median(vals) if vals else float("nan")


def spread(values: Iterable[float]) -> dict[str, float]:
    """median, min, max and n of a sample."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (machine facts added under ``machine``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"benchmark": name, "machine": machine_facts(), **payload}
    path.write_text(json.dumps(body, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A fixed-width text table of ``rows`` with (key, header) ``columns``; floats get 3 significant digits."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # nan
                return "-"
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    line = "  ".join(h.rjust(w) for (_, h), w in zip(columns, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(out)


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- distributed jobs
WORKER = str(BENCH / "worker.py")
#: backend name -> (--embedding_backend, worker flags, extra main.py flags)
BACKENDS: dict[str, tuple[str, list[str], list[str]]] = {
    # the reference: replicated tables, dense-converted allreduce of every gradient, dense RMSprop decay
    "reference": ("replicated", ["--scheme", "reference"], ["--rmsprop_update", "dense"]),
    "replicated": ("replicated", [], []),                        # this project's replicated backend as is
    "sharded": ("sharded", [], ["--embedding_plan", "row"]),      # every table row-wise (g % N)
    "planned": ("sharded", [], ["--embedding_plan", "auto"]),     # the sharded backend as is: the planner's plan
    # sharded with Keras' legacy sparse RMSprop (decays every row every step): what the lazy update saves
    "sharded_dense_decay": ("sharded", [], ["--rmsprop_update", "dense", "--embedding_plan", "row"]),
}


def add_backend_args(parser: Any) -> None:
    """``--backends``, ``--dense_decay`` and ``--no_loader_fix``, shared by the scripts that compare backends."""
    parser.add_argument("--backends", nargs="+", default=["reference", "sharded", "planned"],
                        choices=list(BACKENDS))
    parser.add_argument("--dense_decay", action="store_true", help="add the sharded_dense_decay backend")
    parser.add_argument("--no_loader_fix", action="store_true", help="run Merlin's loader thread unpatched "
                        "(busy-waiting on its queue; see wd_sok.data.merlin_compat)")


def chosen_backends(args: Any) -> list[str]:
    """``--backends`` plus ``sharded_dense_decay`` when ``--dense_decay`` asks for it."""
    extra = ["sharded_dense_decay"] if args.dense_decay and "sharded_dense_decay" not in args.backends else []
    return args.backends + extra


def loader_worker_flags(no_loader_fix: bool) -> list[str]:
    """Worker flags for the loader: none (the project's loader) or ``--no_loader_fix``."""
    return ["--no_loader_fix"] if no_loader_fix else []


def run_job(backend: str, np_: int, flags: list[str], timeout: float, worker_flags: list[str] | None = None,
            tag: str = "") -> dict[str, Any]:
    """One ``worker.py train`` job on ``np_`` ranks (``nproc // np_`` threads per rank); its result dict.

    ``flags`` are main.py flags (``--embedding_backend`` is added from :data:`BACKENDS`).
    """
    emb, extra, main_flags = BACKENDS[backend]
    threads = max(1, (os.cpu_count() or 1) // np_)
    args = [WORKER, "train", *extra, *(worker_flags or []), "--tag", tag or backend, "--",
            *flags, *main_flags, "--embedding_backend", emb]
    load_before = os.getloadavg()[0]
    out = launch(np_, args, timeout=timeout, env=bench_env(threads=threads))
    found = result_lines(out)
    if not found:
        raise RuntimeError(f"{backend} np={np_}: no BENCH_RESULT\n{out[-3000:]}")
    res = found[-1]
    res.update({"bench_backend": backend, "threads_per_rank": threads,
                "loadavg1_before_after": [load_before, os.getloadavg()[0]]})
    return res

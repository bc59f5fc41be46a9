"""Shared by the multi-process tests and the scripts they launch: a small dataset with a planted signal,
the horovodrun launcher (time-limited, whole process group killed on timeout) and the log reader.

The dataset is written with pandas (independent of the project's generator), like tests/conftest.py's
tiny_dataset, but sized for learning and for sharding over up to 3 ranks:

* one-hot ``a`` (card 7, dim 3, int32), ``b`` (card 1001, dim 4, int64), ``p`` (card 2, dim 2: fewer rows
  than ranks at -np 3), multi-hot ``m`` (card 11, 0..3 ids, dim 4) and ``n`` (card 13, 1..2 ids, dim 3);
  no cardinality is divisible by 2 or 3, so shards are uneven; widths differ, so the fused vector exchange
  mixes widths; ``m`` has empty rows (mean of nothing = 0);
* numerics ``x1``, ``x2``; label ``y``; display id ``d`` (test only; groups of 2-4 rows, one click each,
  drawn from softmax of a hidden score ``s = w_a[a] + w_b[b] + w_p[p] + sum w_m[m] + sum w_n[n] + x1``);
* 6 train files and 3 test files of uneven sizes (so at -np 2 and 3 some ranks run out of eval batches
  first and feed empty batches to the collectives).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
DIST = Path(__file__).resolve().parent
FEATURES = {
    "a": {"dtype": "int32", "cardinality": 7, "embedding_dim": 3},
    "b": {"dtype": "int64", "cardinality": 1001, "embedding_dim": 4},
    "p": {"dtype": "int32", "cardinality": 2, "embedding_dim": 2},
    "m": {"dtype": "int32", "cardinality": 11, "max_hotness": 3, "embedding_dim": 4},
    "n": {"dtype": "int32", "cardinality": 13, "max_hotness": 2, "embedding_dim": 3},
    "x1": {"dtype": "float32"},
    "x2": {"dtype": "float32"},
    "y": {"dtype": "float32"},
    "d": {"dtype": "int64"},
}
TRAIN_ROWS = [400] * 6
TEST_ROWS = [150, 210, 96]


def _frame(n: int, rng: np.random.Generator, weights: dict[str, np.ndarray], start_display: int
           ) -> pd.DataFrame:
    """n rows in display groups of 2-4 with one click each, drawn from softmax(s) within the group."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(2, 5)))
    sizes[-1] -= sum(sizes) - n
    if sizes[-1] < 2:
        extra = sizes.pop()
        sizes[-1] += extra
    a = rng.integers(0, 7, n)
    b = np.minimum(rng.zipf(1.3, n) - 1, 1000)
    p = rng.integers(0, 2, n)
    m = [rng.integers(0, 11, rng.integers(0, 4)) for _ in range(n)]
    nn = [rng.integers(0, 13, rng.integers(1, 3)) for _ in range(n)]
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    s = (weights["a"][a] + weights["b"][b] + weights["p"][p] + x1
         + np.array([weights["m"][r].sum() for r in m]) + np.array([weights["n"][r].sum() for r in nn]))
    y = np.zeros(n, np.float32)
    start = 0
    for size in sizes:
        e = np.exp(s[start:start + size] - s[start:start + size].max())
        y[start + rng.choice(size, p=e / e.sum())] = 1.0
        start += size
    return pd.DataFrame({
        "a": a.astype(np.int32), "b": b.astype(np.int64), "p": p.astype(np.int32),
        "m": [r.astype(np.int32) for r in m], "n": [r.astype(np.int32) for r in nn],
        "x1": x1.astype(np.float32), "x2": x2.astype(np.float32), "y": y,
        "d": np.repeat(np.arange(start_display, start_display + len(sizes)), sizes).astype(np.int64),
    })


def make_dataset(root: Path, seed: int = 0) -> Path:
    """Write the dataset described in the module docstring under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    weights = {k: rng.normal(scale=1.0, size=FEATURES[k]["cardinality"]) for k in ("a", "b", "p", "m", "n")}
    cat = ["a", "b", "p", "m", "n"]
    train_cols = cat + ["x1", "x2", "y"]
    spec = {
        "channel_spec": {"onehot_categorical": ["a", "b", "p"], "multihot_categorical": ["m", "n"],
                         "numerical": ["x1", "x2"], "label": ["y"], "map": ["d"]},
        "feature_spec": FEATURES,
        "source_spec": {
            "train": [{"type": "parquet", "features": train_cols,
                       "files": [f"train/part_{i}.parquet" for i in range(len(TRAIN_ROWS))]}],
            "test": [{"type": "parquet", "features": train_cols + ["d"],
                      "files": [f"test/part_{i}.parquet" for i in range(len(TEST_ROWS))]}],
        },
        "metadata": {},
    }
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(parents=True, exist_ok=True)
    display = 0
    for i, n in enumerate(TRAIN_ROWS):
        df = _frame(n, rng, weights, display)
        df.drop(columns=["d"]).to_parquet(root / f"train/part_{i}.parquet")
    for i, n in enumerate(TEST_ROWS):
        df = _frame(n, rng, weights, display)
        display = int(df.d.max()) + 1
        df.to_parquet(root / f"test/part_{i}.parquet")
    (root / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def horovodrun() -> str:
    """A horovodrun for the tests: Horovod's own launcher, run by this Python (the project's .venv), without its
    build probe; without Horovod here, the horovodrun on PATH; '' if there is none.

    Before it starts the ranks, horovodrun checks that Horovod was built with Gloo by importing
    horovod.tensorflow (and so TensorFlow) in a child process: ~8 s of one core per launch, ~40 launches in the
    suite. Setup has already checked the build (scripts/setup_env.sh --dist), and a rank's ``hvd.init()`` fails
    on a build without Gloo anyway, so the tests' launcher answers the probe itself: the same
    ``horovod.runner.launch.run_commandline`` with ``gloo_built`` returning True (launch.py calls it only to
    refuse a build without Gloo). tests/test_bad_input.py and tests/test_first_run.py run the real one.
    """
    import importlib.util

    if importlib.util.find_spec("horovod") is None:  # the launcher script runs Horovod of this Python
        from shutil import which

        return which("horovodrun") or ""
    return str(_fast_launcher())


_LAUNCHER = """#!{python}
# horovodrun without its build probe: written by tests/dist/common.py (see horovodrun() there)
import sys

import horovod.runner.launch as launch

if __name__ == "__main__":  # Horovod starts helper processes by spawn, which imports this file again
    launch.gloo_built = lambda verbose=False: True
    sys.exit(launch.run_commandline())
"""


def _fast_launcher() -> Path:
    """The launcher script, written once per Python into the temp folder (atomically: write, then rename)."""
    import hashlib
    import tempfile

    text = _LAUNCHER.format(python=sys.executable)
    path = Path(tempfile.gettempdir()) / f"wd_sok_horovodrun_{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return path


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for launched processes: quiet TensorFlow, the repo importable, few threads per rank, no
    GPU (CPU tests) unless ``extra`` says otherwise."""
    out = dict(os.environ)
    out.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""})
    out.update(extra or {})
    return out


def launch(np_: int, args: list[str], timeout: float, cwd: Path = ROOT,
           extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python <args>`` on ``np_`` ranks (plain python when np_ == 1) with a time limit.

    The command runs in its own session; on timeout the whole process group (horovodrun and its ranks) is
    killed and a RuntimeError names the command and shows the tail of its output.
    """
    cmd = [sys.executable, *args]
    if np_ > 1:
        cmd = [horovodrun(), "--gloo", "-np", str(np_), "-H", f"localhost:{np_}", *cmd]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def check(result: subprocess.CompletedProcess) -> str:
    """The output of a finished launch; raises with the output's tail if it failed."""
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {' '.join(result.args)}\n{result.stdout[-6000:]}")
    return result.stdout


def final_metrics(results_dir: Path, log_filename: str = "log.json") -> dict:
    """The data of the last LOG record of a run's DLLogger file (the final metrics)."""
    last = None
    for line in (results_dir / log_filename).read_text().splitlines():
        if line.startswith("DLLL "):
            rec = json.loads(line[5:])
            if rec.get("type") == "LOG" and rec.get("step") != "PARAMETER":
                last = rec
    if last is None:
        raise AssertionError(f"no LOG record in {results_dir / log_filename}")
    return last["data"]


def main_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """``main.py`` arguments for a short run on ``data`` writing under ``run_dir``."""
    return ["main.py", "--dataset_path", str(data), "--model_dir", str(run_dir / "ckpt"),
            "--results_dir", str(run_dir / "results"), "--num_epochs", "1", "--global_batch_size", "48",
            "--eval_batch_size", "48", "--deep_hidden_units", "16", "16", "--deep_dropout", "0",
            "--deep_learning_rate", "0.01", "--deep_warmup_epochs", "0", "--linear_learning_rate", "0.1",
            "--log_every", "1000", *extra]

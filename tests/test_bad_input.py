"""Bad input: main.py exits non-zero with one clear line naming file / feature / value, and leaves no output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, make_tiny_dataset, null_inside_list

TINY = ["--global_batch_size", "32", "--eval_batch_size", "64", "--num_epochs", "1", "--deep_hidden_units", "8",
        "--deep_warmup_epochs", "0"]


def _parquet(path: Path, fn: Callable[[pd.DataFrame], pd.DataFrame | None]) -> None:
    df = pd.read_parquet(path)
    out = fn(df)
    (df if out is None else out).to_parquet(path)


def _spec(root: Path, fn: Callable[[dict], None]) -> None:
    raw = yaml.safe_load((root / "feature_spec.yaml").read_text())
    fn(raw)
    (root / "feature_spec.yaml").write_text(yaml.safe_dump(raw))


def _set(df: pd.DataFrame, col: str, row: int, value: object) -> pd.DataFrame:
    df = df.copy()
    values = list(df[col]) if df[col].dtype == object else df[col].to_numpy().copy()
    values[row] = value
    df[col] = pd.Series(values, dtype=df[col].dtype) if df[col].dtype != object else values
    return df


def _null_id(path: Path, col: str, row: int) -> None:
    """Write a true parquet null into ``col`` at ``row`` (pandas would turn an int column into float)."""
    table = pq.read_table(path)
    values = table.column(col).to_pylist()
    values[row] = None
    i = table.column_names.index(col)
    pq.write_table(table.set_column(i, col, pa.array(values, type=table.schema.field(col).type)), path)


def _int_label(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(y=df["y"].astype("int64"))


CASES: list[tuple[str, Callable[[Path], list[str] | None], str]] = [
    ("malformed yaml", lambda r: (r / "feature_spec.yaml").write_text("channel_spec: [oops\n"), r"malformed YAML"),
    ("unknown channel", lambda r: _spec(r, lambda s: s["channel_spec"].update(dense=["x1"])),
     r"unknown channel 'dense'"),
    ("unknown mapping", lambda r: _spec(r, lambda s: s["source_spec"].update(valid=s["source_spec"]["test"])),
     r"unknown mapping 'valid'"),
    ("undefined feature", lambda r: _spec(r, lambda s: s["channel_spec"]["numerical"].append("x3")),
     r"feature 'x3': in channel 'numerical' but not defined"),
    ("missing spec file", lambda r: (r / "feature_spec.yaml").unlink(), r"feature_spec.yaml: cannot read"),
    ("missing parquet", lambda r: (r / "train/part_1.parquet").unlink(),
     r"train/part_1.parquet: parquet file listed in the feature spec does not exist"),
    ("float categorical", lambda r: _parquet(r / "train/part_0.parquet", lambda d: d.assign(a=d.a.astype("f4"))),
     r"train/part_0.parquet: feature 'a': dtype float32 does not match the spec's int32"),
    ("int label", lambda r: _parquet(r / "test/part_1.parquet", _int_label),
     r"test/part_1.parquet: feature 'y': dtype int64 does not match the spec's float32"),
    ("id >= cardinality", lambda r: _parquet(r / "train/part_2.parquet", lambda d: _set(d, "a", 7, 7)),
     r"train/part_2.parquet: feature 'a': id outside \[0, 7\) \(row 7: 7\)"),
    ("negative id", lambda r: _parquet(r / "test/part_0.parquet", lambda d: _set(d, "b", 3, -2)),
     r"test/part_0.parquet: feature 'b': id outside \[0, 5\) \(row 3: -2\)"),
    ("multi-hot id out of range", lambda r: _parquet(
        r / "train/part_0.parquet", lambda d: _set(d, "m", 4, np.array([1, 9], np.int32))),
     r"train/part_0.parquet: feature 'm': id outside \[0, 6\) \(row 4: 9\)"),
    ("multi-hot too long", lambda r: _parquet(
        r / "train/part_3.parquet", lambda d: _set(d, "m", 11, np.array([1, 2, 3, 4], np.int32))),
     r"train/part_3.parquet: feature 'm': list longer than max_hotness 3 \(row 11: \[1, 2, 3, 4\]\)"),
    ("nan numeric", lambda r: _parquet(r / "train/part_1.parquet", lambda d: _set(d, "x2", 5, np.nan)),
     r"train/part_1.parquet: feature 'x2': not a finite number .*\(row 5: nan\)"),
    ("inf numeric", lambda r: _parquet(r / "test/part_1.parquet", lambda d: _set(d, "x1", 0, np.inf)),
     r"test/part_1.parquet: feature 'x1': not a finite number .*\(row 0: inf\)"),
    ("label outside 0/1", lambda r: _parquet(r / "train/part_0.parquet", lambda d: _set(d, "y", 2, 2.0)),
     r"train/part_0.parquet: feature 'y': label must be 0 or 1 \(row 2: 2.0\)"),
    ("null id", lambda r: _null_id(r / "train/part_0.parquet", "b", 6),
     r"train/part_0.parquet: feature 'b': missing value \(row 6: None\)"),
    # null_inside_list returns the new row; a list returned here would be taken as extra flags: "and []"
    ("null inside a multi-hot list", lambda r: null_inside_list(r / "train/part_1.parquet", "m", 8) and [],
     r"train/part_1.parquet: feature 'm': missing id inside a list \(row 8: \[.*None\]\)"),
    ("test rows not sorted by map id", lambda r: _parquet(r / "test/part_1.parquet", lambda d: d.iloc[::-1]),
     r"test/part_1.parquet: feature 'd': test rows not sorted by map id \(after \d+\) \(row \d+: \d+\)"),
    ("null numeric", lambda r: _null_id(r / "train/part_0.parquet", "x1", 9),
     r"train/part_0.parquet: feature 'x1': not a finite number .*\(row 9: nan\)"),
    ("missing column", lambda r: _parquet(r / "train/part_3.parquet", lambda d: d.drop(columns=["x2"])),
     r"train/part_3.parquet: feature 'x2': column missing from the parquet file"),
    ("empty train parquet", lambda r: _parquet(r / "train/part_2.parquet", lambda d: d.iloc[:0]),
     r"train/part_2.parquet: parquet file has no rows"),
    ("zero-row test set", lambda r: [_parquet(r / f"test/part_{i}.parquet", lambda d: d.iloc[:0]) for i in (0, 1)]
     and None, r"test/part_0.parquet: parquet file has no rows"),
    ("batch larger than dataset", lambda r: ["--global_batch_size", "4096"],
     r"--global_batch_size 4096 is larger than the training set \(200 rows"),
    ("unwritable model_dir", lambda r: ["--model_dir", "/proc/wd_sok_cannot_write_here"],
     r"--model_dir /proc/wd_sok_cannot_write_here is not writable"),
    ("warmup beyond epochs", lambda r: ["--deep_warmup_epochs", "3"],
     r"--deep_warmup_epochs 3.0 exceeds --num_epochs 1"),
    ("sok with cpu", lambda r: ["--embedding_backend", "sok", "--cpu"], r"--embedding_backend sok needs GPUs"),
    ("benchmark with max_steps", lambda r: ["--benchmark", "--max_steps", "3"], r"do not combine it with --max_steps"),
    ("bad combiner", lambda r: ["--combiner", "max"], r"argument --combiner: invalid choice: 'max'"),
    ("no map channel but MAP on", lambda r: _spec(r, lambda s: (s["channel_spec"].update(map=[]),
                                                              s["source_spec"]["test"][0]["features"].remove("d"))),
     r"MAP@12 needs a 'map' channel \(or pass --disable_map_calculation\)"),
]


def _argv(root: Path, extra: list[str]) -> list[str]:
    return ["--dataset_path", str(root), "--model_dir", str(root / "out/ckpt"), "--results_dir",
            str(root / "out/results"), *TINY, *extra]


def _run(root: Path, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "main.py"), *_argv(root, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, set[Path], Path]]:
    """Every case of CASES in its own broken copy of the tiny dataset, all run by one process
    (tests/dist/main_many.py: one TensorFlow import instead of one per case). name -> (dataset, files before, out)."""
    base, jobs, cases = tmp_path_factory.mktemp("bad_input"), [], {}
    for i, (name, break_it, _) in enumerate(CASES):
        root = make_tiny_dataset(base / f"case{i:02d}")
        extra = break_it(root)
        extra = extra if isinstance(extra, list) else []
        before = {p for p in root.rglob("*")}
        result = base / f"result{i:02d}"
        jobs.append({"argv": _argv(root, extra), "out": str(result)})
        cases[name] = (root, before, result)
    (base / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(ROOT / "tests/dist/main_many.py"), str(base / "jobs.json")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return cases


@pytest.mark.parametrize("name,message", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_cleanly(refusals: dict, name: str, message: str) -> None:
    root, before, result = refusals[name]
    stdout, stderr = (result / "stdout").read_text(), (result / "stderr").read_text()
    assert (result / "rc").read_text() == "2", stdout[-2000:] + stderr[-2000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors and any(re.search(message, line) for line in errors), stderr[-2000:]
    # nothing half-written: no checkpoint, no log, no new parquet
    after = {p for p in root.rglob("*")} - before
    leftovers = [p for p in after if p.is_file()]
    assert not leftovers, leftovers


def test_nan_policy_zero_fills_and_trains(tiny_dataset: Path) -> None:
    _parquet(tiny_dataset / "train/part_1.parquet", lambda d: _set(d, "x2", 5, np.nan))
    proc = _run(tiny_dataset, ["--nan_policy", "zero"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nan" not in (tiny_dataset / "out/results/history.csv").read_text().lower()


def test_groups_without_or_with_several_clicks_are_skipped_and_counted(tiny_dataset: Path) -> None:
    def two_clicks_and_none(df: pd.DataFrame) -> pd.DataFrame:
        first, second = df.d.unique()[:2]
        df = df.copy()
        df.loc[df.d == first, "y"] = 1.0  # every row of the first group clicked
        df.loc[df.d == second, "y"] = 0.0  # no click in the second
        return df

    _parquet(tiny_dataset / "test/part_0.parquet", two_clicks_and_none)
    proc = _run(tiny_dataset, [])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MAP@12 is undefined for 1 display group(s) without a click and 1 with several" in proc.stdout
    last = (tiny_dataset / "out/results/history.csv").read_text().splitlines()
    header, row = last[0].split(","), last[-1].split(",")
    values = dict(zip(header, row, strict=True))
    assert values["map_skipped_no_click"] == "1" and values["map_skipped_multi_click"] == "1"


def test_fewer_files_than_ranks(tiny_dataset: Path) -> None:
    """One training file (50 rows) on 2 ranks: each reads 25 rows (it used to be refused), 25 // 16 = 1 step of
    32 per epoch, and the log says how many rows an epoch uses."""
    if shutil.which("horovodrun", path=os.path.dirname(sys.executable)) is None:
        pytest.fail("horovodrun is missing from the venv")
    for i in (1, 2, 3):
        (tiny_dataset / f"train/part_{i}.parquet").unlink()
    _spec(tiny_dataset, lambda s: s["source_spec"]["train"][0].update(files=["train/part_0.parquet"]))
    cmd = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2",
           sys.executable, str(ROOT / "main.py"), "--dataset_path", str(tiny_dataset), "--model_dir",
           str(tiny_dataset / "out/ckpt"), "--results_dir", str(tiny_dataset / "out/results"), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 steps/epoch of 32 samples: 32 of 50 training rows per epoch" in proc.stdout + proc.stderr


def test_fresh_run_in_a_used_model_dir_is_refused_and_touches_nothing(tiny_dataset: Path) -> None:
    """Issue 22: a second fresh run in the same --model_dir deleted its own checkpoints and later resumed the
    first run's. Now it is refused at start with one line; nothing of the first run changes."""
    assert _run(tiny_dataset, []).returncode == 0
    out = tiny_dataset / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = _run(tiny_dataset, ["--deep_learning_rate", "0.01"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and re.search(
        r"--model_dir \S+/out/ckpt holds 1 checkpoint\(s\), latest ckpt-\d+: step \d+, run [0-9a-f]{16}, .* UTC; "
        r"resume that run with --use_checkpoint .* or start over with --overwrite", errors[0]), proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    proc = _run(tiny_dataset, ["--overwrite", "--use_checkpoint"])
    assert proc.returncode == 2 and "--overwrite starts over; --use_checkpoint yes resumes" in proc.stderr
    # auto with only damaged checkpoints: refused, not a silent fresh start over them
    for manifest in out.rglob("manifest.json"):
        manifest.write_text("{")
    proc = _run(tiny_dataset, ["--use_checkpoint", "auto"])
    assert proc.returncode == 2 and "no usable checkpoint in" in proc.stderr, proc.stderr[-2000:]

"""Shared fixtures: a tiny hand-made spec and dataset written with pandas (independent of the generator)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The real Outbrain rows (a test fixture that must not be redistributed with the project, so not in the
# repository): $WD_SOK_OUTBRAIN_SAMPLE, else the workspace's ../shared (or ../../shared for a worktree).
SAMPLE_PLACES = [Path(p) for p in [os.environ.get("WD_SOK_OUTBRAIN_SAMPLE", "")] if p] + [
    ROOT / ".." / "shared" / "data" / "outbrain_sample", ROOT / ".." / ".." / "shared" / "data" / "outbrain_sample"]
REAL_SAMPLE = next((p for p in SAMPLE_PLACES if (p / "clicks_train.csv").is_file()), SAMPLE_PLACES[0])


def need_real_sample() -> Path:
    """The real Outbrain sample's folder, or skip naming every place looked at and the variable that sets it."""
    if not (REAL_SAMPLE / "clicks_train.csv").is_file():
        pytest.skip("real Outbrain sample (clicks_train.csv, events.csv, promoted_content.csv) not found at "
                    + ", ".join(map(str, SAMPLE_PLACES)) + ": set WD_SOK_OUTBRAIN_SAMPLE to its folder")
    return REAL_SAMPLE
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tiny_spec_dict(n_train_files: int = 2, n_test_files: int = 2) -> dict:
    """2 one-hot, 1 multi-hot (max 3), 2 numerical, label, map: small enough to check by hand."""
    feats = {
        "a": {"dtype": "int32", "cardinality": 7, "embedding_dim": 3},
        "b": {"dtype": "int64", "cardinality": 5, "embedding_dim": 2},
        "m": {"dtype": "int32", "cardinality": 6, "max_hotness": 3, "embedding_dim": 4},
        "x1": {"dtype": "float32"},
        "x2": {"dtype": "float32"},
        "y": {"dtype": "float32"},
        "d": {"dtype": "int64"},
    }
    train_feats = ["a", "b", "m", "x1", "x2", "y"]
    return {
        "channel_spec": {"onehot_categorical": ["a", "b"], "multihot_categorical": ["m"],
                         "numerical": ["x1", "x2"], "label": ["y"], "map": ["d"]},
        "feature_spec": feats,
        "source_spec": {
            "train": [{"type": "parquet", "features": train_feats,
                       "files": [f"train/part_{i}.parquet" for i in range(n_train_files)]}],
            "test": [{"type": "parquet", "features": train_feats + ["d"],
                      "files": [f"test/part_{i}.parquet" for i in range(n_test_files)]}],
        },
        "metadata": {},
    }


def tiny_frame(n: int, seed: int, start_display: int = 0) -> pd.DataFrame:
    """n rows for tiny_spec_dict; display groups of 2-4 rows with exactly one click each."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(2, 5)))
    sizes[-1] -= sum(sizes) - n
    if sizes[-1] < 1:
        sizes.pop()
        sizes[-1] += n - sum(sizes)
    display = np.repeat(np.arange(start_display, start_display + len(sizes)), sizes).astype(np.int64)
    y = np.zeros(n, np.float32)
    starts = np.cumsum([0] + sizes[:-1])
    y[starts + rng.integers(0, np.array(sizes))] = 1.0
    return pd.DataFrame({
        "a": rng.integers(0, 7, n).astype(np.int32),
        "b": rng.integers(0, 5, n).astype(np.int64),
        "m": [rng.integers(0, 6, rng.integers(0, 4)).astype(np.int32) for _ in range(n)],
        "x1": rng.normal(size=n).astype(np.float32),
        "x2": rng.normal(size=n).astype(np.float32),
        "y": y,
        "d": display,
    })


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A tiny dataset folder with feature_spec.yaml; train 4x50 rows, test 2 files with whole groups."""
    return make_tiny_dataset(tmp_path)


def make_tiny_dataset(tmp_path: Path) -> Path:
    """``tiny_dataset``'s folder, written into ``tmp_path`` (which may be new)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tiny_spec_dict(n_train_files=4, n_test_files=2)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    for i in range(4):
        tiny_frame(50, seed=i).drop(columns=["d"]).to_parquet(tmp_path / f"train/part_{i}.parquet")
    start = 0
    for i in range(2):
        df = tiny_frame(40 + 3 * i, seed=100 + i, start_display=start)
        start = int(df.d.max()) + 1
        df.to_parquet(tmp_path / f"test/part_{i}.parquet")
    (tmp_path / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path


def null_inside_list(path: Path, col: str, row: int) -> list:
    """Put a null id inside row ``row``'s list of multi-hot ``col`` of a parquet file (rewritten in place);
    returns the new row (a NaN once converted by Merlin: the bad value the loader checks must catch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = table.column(col).to_pylist()
    rows[row] = [*(rows[row] or [1]), None]
    i = table.column_names.index(col)
    pq.write_table(table.set_column(i, col, pa.array(rows, type=table.schema.field(col).type)), path)
    return rows[row]

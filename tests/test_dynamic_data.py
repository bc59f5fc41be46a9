"""Dynamic (raw-id) features on the data side: value checks, verdict keys and the loader, with ids near 2**62,
negative ids and the int64 extremes, compared bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import tiny_frame, tiny_spec_dict
from wd_sok.data.checks import check_file, rules
from wd_sok.data.loader import DataLoader
from wd_sok.feature_spec import FeatureSpec, SpecError

BIG = [2**62 - 1, -(2**62), 2**63 - 1, -(2**63), -1, 0, 2**62 + 12345, 7]


def _dynamic_dataset(root: Path) -> Path:
    """tiny_dataset with 'b' (one-hot) and 'm' (multi-hot) dynamic int64 and raw ids drawn from BIG."""
    spec = tiny_spec_dict(n_train_files=2, n_test_files=1)
    spec["feature_spec"]["b"] = {"dynamic": {"capacity": 3}, "embedding_dim": 2}  # dtype defaults to int64
    spec["feature_spec"]["m"] = {"dtype": "int64", "dynamic": {"capacity": 4, "evict": "lfu"}, "max_hotness": 3,
                                 "embedding_dim": 4}
    rng = np.random.default_rng(5)
    big = np.array(BIG, dtype=np.int64)
    for mapping, n_files in (("train", 2), ("test", 1)):
        (root / mapping).mkdir()
        for i in range(n_files):
            df = tiny_frame(30, seed=10 * i + len(mapping))
            df["b"] = big[rng.integers(0, len(big), len(df))]
            df["m"] = [big[rng.integers(0, len(big), len(r))] for r in df["m"]]
            if mapping == "train":
                df = df.drop(columns=["d"])
            df.to_parquet(root / f"{mapping}/part_{i}.parquet")
    (root / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def test_raw_ids_pass_checks_and_leave_the_loader_bit_exact(tmp_path: Path) -> None:
    root = _dynamic_dataset(tmp_path)
    spec = FeatureSpec.from_yaml(root / "feature_spec.yaml")
    assert spec.dynamic_features == ["b", "m"] and spec.dtype("b") == "int64"
    for mapping in ("train", "test"):
        loader = DataLoader(spec, mapping, 8, with_map=mapping == "test")  # the value checks run here
        got_b, got_m = [], []
        for batch in loader:
            assert batch.categorical["b"].dtype.name == "int64"
            assert batch.categorical["m"].dtype.name == "int64"
            got_b.append(batch.categorical["b"].numpy())
            got_m += [tuple(r) for r in batch.categorical["m"].to_list()]
        want = pd.concat([pd.read_parquet(f) for f in spec.files(mapping)], ignore_index=True)
        np.testing.assert_array_equal(np.concatenate(got_b), want["b"].to_numpy())  # int64 ==: bit-exact
        assert got_m == [tuple(int(v) for v in r) for r in want["m"]]
        assert {int(v) for v in want["b"]} <= set(BIG) and len(set(want["b"])) > 3  # the extremes did occur


def test_dynamic_features_keep_the_other_checks(tmp_path: Path) -> None:
    root = _dynamic_dataset(tmp_path)
    spec = FeatureSpec.from_yaml(root / "feature_spec.yaml")
    path = root / "train/part_0.parquet"
    columns = ["a", "b", "m", "x1", "x2", "y"]
    df = pd.read_parquet(path)
    check_file(path, spec, columns)  # passes as written
    bad = df.copy()
    bad["b"] = bad["b"].astype("Int64")
    bad.loc[4, "b"] = None
    bad.to_parquet(path)
    with pytest.raises(SpecError, match=r"part_0.parquet: feature 'b': missing value \(row 4: None\)"):
        check_file(path, spec, columns)
    bad = df.copy()
    bad.at[6, "m"] = np.array([1, -5, 2**62, 9], np.int64)
    bad.to_parquet(path)
    with pytest.raises(SpecError, match=r"feature 'm': list longer than max_hotness 3 \(row 6: "
                                        r"\[1, -5, 4611686018427387904, 9\]\)"):
        check_file(path, spec, columns)
    bad = df.copy()
    bad["b"] = bad["b"].astype(np.float64)
    bad.to_parquet(path)
    with pytest.raises(SpecError, match=r"feature 'b': ids must be integers, got float64"):
        check_file(path, spec, columns)
    with pytest.raises(SpecError, match=r"feature 'b': dtype float64 does not match the spec's int64"):
        DataLoader(spec, "train", 8)
    # the same values under a fixed cardinality are out of range: the dynamic-ness is part of the verdict key
    fixed = tiny_spec_dict(n_train_files=2, n_test_files=1)
    fixed["feature_spec"]["b"] = {"dtype": "int64", "cardinality": 3, "embedding_dim": 2}
    fixed["feature_spec"]["m"] = {"dtype": "int64", "cardinality": 4, "max_hotness": 3, "embedding_dim": 4}
    fixed_spec = FeatureSpec.from_dict(fixed, base_directory=root)
    df.to_parquet(path)
    with pytest.raises(SpecError, match=r"feature 'b': id outside \[0, 3\)"):
        check_file(path, fixed_spec, columns)
    assert rules(fixed_spec, columns, "reject") != rules(spec, columns, "reject")
    assert rules(spec, columns, "reject")["columns"]["b"]["dynamic"] is True


def test_a_narrower_int_dtype_still_reaches_the_batch_as_int64(tmp_path: Path) -> None:
    spec = tiny_spec_dict(n_train_files=1, n_test_files=1)
    spec["feature_spec"]["a"] = {"dtype": "int32", "dynamic": {"capacity": 2}, "embedding_dim": 3}
    for mapping in ("train", "test"):
        (tmp_path / mapping).mkdir()
        df = tiny_frame(20, seed=1)
        df["a"] = np.arange(-10, 10, dtype=np.int32) * 200_000_000  # beyond [0, capacity), within int32
        (df.drop(columns=["d"]) if mapping == "train" else df).to_parquet(tmp_path / f"{mapping}/part_0.parquet")
    (tmp_path / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    batch = DataLoader(FeatureSpec.from_yaml(tmp_path / "feature_spec.yaml"), "train", 32).first()
    assert batch.categorical["a"].dtype.name == "int64"
    assert batch.categorical["a"].numpy().tolist() == [i * 200_000_000 for i in range(-10, 10)]

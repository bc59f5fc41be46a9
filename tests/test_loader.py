"""Loader: batches equal the parquet rows; per-rank sharding covers every row exactly once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from wd_sok.data.loader import DataLoader
from wd_sok.feature_spec import FeatureSpec, SpecError


def _rows(loader: DataLoader) -> pd.DataFrame:
    parts = []
    for batch in loader:
        df = pd.DataFrame({
            "a": batch.categorical["a"].numpy(), "b": batch.categorical["b"].numpy(),
            "m": [tuple(r) for r in batch.categorical["m"].to_list()],
            "x1": batch.numerical[:, 0].numpy(), "x2": batch.numerical[:, 1].numpy(),
            "y": batch.label.numpy()})
        if batch.map_ids is not None:
            df["d"] = batch.map_ids.numpy()
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def _expected(root: Path, mapping: str) -> pd.DataFrame:
    files = sorted((root / mapping).glob("*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    df["m"] = [tuple(int(v) for v in r) for r in df["m"]]
    return df


def _key(df: pd.DataFrame) -> list:
    return sorted(map(tuple, df[["a", "b", "m", "x1", "x2", "y"]].astype(str).values.tolist()))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharding_covers_every_row_once(tiny_dataset: Path, world: int) -> None:
    spec = FeatureSpec.from_yaml(tiny_dataset / "feature_spec.yaml")
    got = pd.concat([_rows(DataLoader(spec, "train", 16, rank=r, world=world, shuffle=True, seed=3))
                     for r in range(world)], ignore_index=True)
    want = _expected(tiny_dataset, "train")
    assert len(got) == len(want) == 200
    assert _key(got) == _key(want)


def test_test_mapping_in_order_with_values_and_dtypes(tiny_dataset: Path) -> None:
    spec = FeatureSpec.from_yaml(tiny_dataset / "feature_spec.yaml")
    loader = DataLoader(spec, "test", 32, with_map=True)
    batch = next(iter(loader))
    assert batch.numerical.dtype.name == "float32" and batch.numerical.shape == (32, 2)
    assert batch.categorical["a"].dtype.name == "int32" and batch.categorical["b"].dtype.name == "int64"
    assert batch.categorical["m"].dtype.name == "int32" and batch.map_ids.dtype.name == "int64"
    got = _rows(loader)
    want = _expected(tiny_dataset, "test")
    assert len(loader) == 3  # 83 rows / 32
    np.testing.assert_array_equal(got["d"].values, want["d"].values)  # order kept: sorted display ids
    for col in ["a", "b", "x1", "x2", "y"]:
        np.testing.assert_array_equal(got[col].values, want[col].values)
    assert list(got["m"]) == list(want["m"])


def test_shuffle_is_a_function_of_seed_and_epoch(tiny_dataset: Path) -> None:
    spec = FeatureSpec.from_yaml(tiny_dataset / "feature_spec.yaml")
    def order(seed: int, epoch: int) -> list:
        loader = DataLoader(spec, "train", 16, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return _rows(loader)["x1"].tolist()
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)


def test_missing_file_and_wrong_dtype_are_named(tiny_dataset: Path) -> None:
    spec = FeatureSpec.from_yaml(tiny_dataset / "feature_spec.yaml")
    (tiny_dataset / "train/part_2.parquet").unlink()
    with pytest.raises(SpecError, match=r"part_2.parquet: parquet file listed in the feature spec does not"):
        DataLoader(spec, "train", 16)
    df = pd.read_parquet(tiny_dataset / "test/part_0.parquet")
    df["a"] = df["a"].astype("float32")
    df.to_parquet(tiny_dataset / "test/part_0.parquet")
    with pytest.raises(SpecError, match=r"part_0.parquet: feature 'a': dtype float32 does not match the spec's int32"):
        DataLoader(spec, "test", 16)


@pytest.mark.parametrize("empty_rows", ["tail", "file"])
def test_multihot_batches_without_any_id(tiny_dataset: Path, empty_rows: str) -> None:
    """Merlin 23.8 crashed (KeyError: 0 in its loader thread) on a chunk whose lists are all empty: the last
    partial batch (``tail``: 50 rows = 3 x 16 + 2 empty ones) or a whole file of empty lists (``file``)."""
    path = tiny_dataset / "train/part_0.parquet"
    df = pd.read_parquet(path)
    empty = np.arange(len(df)) >= len(df) - 2 if empty_rows == "tail" else np.ones(len(df), bool)
    df["m"] = [np.array([], np.int32) if e else v for v, e in zip(df["m"], empty, strict=True)]
    df.to_parquet(path)
    spec = FeatureSpec.from_yaml(tiny_dataset / "feature_spec.yaml")
    loader = DataLoader(spec, "train", 16, rank=0, world=4)  # rank 0 of 4 reads part_0 alone
    batches = list(loader)
    assert [len(b.label) for b in batches] == [16, 16, 16, 2]
    assert all(b.categorical["m"].dtype.name == "int32" for b in batches)
    got = [tuple(r) for b in batches for r in b.categorical["m"].to_list()]
    assert got == [tuple(int(v) for v in r) for r in df["m"]]
    assert batches[-1].categorical["m"].flat_values.shape == (0,)


def test_verdict_cache_skips_the_value_pass_until_a_file_changes(tiny_dataset: Path, monkeypatch) -> None:  # noqa: ANN001
    """The second loader reads footers only; a rewritten file (new size / mtime / footer) is checked again, and
    other rules (another NaN policy) are another verdict."""
    from wd_sok.data import loader as loader_module

    calls: list[str] = []
    real = loader_module.check_file

    def counting(path, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loader_module, "check_file", counting)
    spec = FeatureSpec.from_yaml(tiny_dataset / "feature_spec.yaml")
    DataLoader(spec, "train", 16)
    assert sorted(calls) == [f"part_{i}.parquet" for i in range(4)]
    assert len(list((tiny_dataset / ".wd_sok_cache/verdicts").glob("*.json"))) == 4
    calls.clear()
    DataLoader(spec, "train", 16, rank=1, world=2)  # rank 1 of 2 would check parts 1 and 3: both cached
    DataLoader(spec, "train", 16)
    assert calls == []
    df = pd.read_parquet(tiny_dataset / "train/part_2.parquet")
    df.loc[3, "a"] = 6
    df.to_parquet(tiny_dataset / "train/part_2.parquet")
    DataLoader(spec, "train", 16)
    assert calls == ["part_2.parquet"]
    calls.clear()
    DataLoader(spec, "train", 16, nan_policy="zero")
    assert len(calls) == 4
    calls.clear()
    DataLoader(spec, "train", 16, commit_checks=False, nan_policy="zero", seed=1)  # cached above
    assert calls == []


def test_verdict_cache_falls_back_to_the_user_cache(tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from wd_sok.data.cache import cache_root

    monkeypatch.delenv("WD_SOK_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(tiny_dataset) == tiny_dataset / ".wd_sok_cache/verdicts"
    blocked = tmp_path / "blocked"  # a dataset folder where .wd_sok_cache cannot be a folder (as if read-only)
    blocked.mkdir()
    (blocked / ".wd_sok_cache").write_text("")
    assert cache_root(blocked) == tmp_path / "xdg/wd-sok/verdicts"
    if not os.access("/proc", os.W_OK):  # a read-only folder too (root can write anywhere: not checkable)
        assert cache_root(Path("/proc")) == tmp_path / "xdg/wd-sok/verdicts"
    monkeypatch.setenv("WD_SOK_CACHE_DIR", "off")
    assert cache_root(tiny_dataset) is None


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_split_lists_matches_merlins_pull_apart_list(dtype: str) -> None:
    """The pyarrow split of a shuffled list column (views into one buffer, empty rows included) gives
    Merlin's own values and offsets exactly, dtypes included; rows Merlin's path must handle are left to it."""
    from merlin.core.dispatch import pull_apart_list

    from wd_sok.data.merlin_compat import split_lists

    rng = np.random.default_rng(3)
    lens = rng.integers(0, 4, size=500)
    flat = rng.integers(0, 10**6, size=int(lens.sum())).astype(dtype)
    table = pa.table({"m": pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lens)].astype(np.int32)),
                                                    pa.array(flat))})
    series = table.to_pandas()["m"].sample(frac=1.0, random_state=1)  # as Merlin shuffles a chunk
    values, offsets = split_lists(series)
    want_values, want_offsets = pull_apart_list(series)
    assert values.dtype == want_values.dtype == np.dtype(dtype)
    assert offsets.dtype == want_offsets.dtype == np.int64
    np.testing.assert_array_equal(values.to_numpy(), want_values.to_numpy())
    np.testing.assert_array_equal(offsets.to_numpy(), want_offsets.to_numpy())
    assert split_lists(pd.Series([[1, 2], [3]])) is None  # Python lists: Merlin's path
    assert split_lists(pd.Series([np.array([1]), None])) is None  # a null row: Merlin's path (it raises)
    assert split_lists(pd.Series([], dtype=object)) is None

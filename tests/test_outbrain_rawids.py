"""Outbrain ``--raw-ids`` on the real sample: raw ids survive (string ids = BLAKE2b-63 computed here with
hashlib), missing -> -1, the spec says dynamic with the train split's distinct counts, everything else is the
default pipeline's output, and the loader delivers the ids as int64."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tests.conftest import need_real_sample
from tests.test_outbrain_preproc import _read_split
from wd_sok.data.loader import DataLoader
from wd_sok.feature_spec import FeatureSpec
from wd_sok.outbrain import features as F
from wd_sok.outbrain.cli import main
from wd_sok.outbrain.pipeline import preprocess

# beside the repository (../shared), or beside the worktrees folder (a git worktree at <root>/wt/<name>)
RAW = ["ad_id", "document_id", "document_id_promo", "campaign_id", "advertiser_id", "source_id", "geo_location",
       "geo_location_country", "geo_location_state", "publisher_id", "source_id_promo", "publisher_id_promo"]


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & (2**63 - 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    sample = need_real_sample()
    root = tmp_path_factory.mktemp("ob")
    raw = root / "raw"
    raw.mkdir()
    for csv in sample.glob("*.csv"):
        shutil.copy(csv, raw / csv.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preprocess(raw, root / "fixed")
        fixed_warnings = len(caught)
        preprocess(raw, root / "raw_ids", raw_ids=True, with_uuid=True)
    return {"raw": raw, "fixed": root / "fixed", "raw_ids": root / "raw_ids",
            "warnings": [str(w.message) for w in caught[fixed_warnings:]]}


def _expected(raw: Path, test_displays: set[int]) -> pd.DataFrame:
    """The click rows joined by hand: raw ad / document / campaign / advertiser ids, uuid and geo strings."""
    clicks = pd.read_csv(raw / "clicks_train.csv")
    events = pd.read_csv(raw / "events.csv", dtype={"uuid": str, "geo_location": str})
    promo = pd.read_csv(raw / "promoted_content.csv").rename(columns={"document_id": "document_id_promo"})
    df = clicks.merge(events, on="display_id", how="left").merge(promo, on="ad_id", how="left")
    df["is_test"] = df["display_id"].isin(test_displays)
    return df


def test_raw_ids_survive_and_the_spec_says_dynamic(runs: dict) -> None:
    spec = FeatureSpec.from_yaml(runs["raw_ids"] / "feature_spec.yaml")
    assert spec.onehot == F.ONEHOT_COLUMNS + ["uuid"]
    assert spec.dynamic_features == RAW + ["uuid"]
    assert spec.dynamic("platform") is None and all(spec.dynamic(n) is None for n in spec.multihot)
    assert all(spec.dtype(n) == "int64" for n in spec.dynamic_features)
    _, test = _read_split(runs["raw_ids"], "test")
    _, train = _read_split(runs["raw_ids"], "train")
    df = _expected(runs["raw"], set(test["display_id"]))
    want = df[df["is_test"]].sort_values("display_id", kind="mergesort").reset_index(drop=True)
    assert len(test) == len(want)
    assert test["uuid"].tolist() == [_h(u) for u in want["uuid"]]
    assert test["ad_id"].tolist() == want["ad_id"].tolist()
    assert test["document_id"].tolist() == want["document_id"].tolist()
    for name in ("document_id_promo", "campaign_id", "advertiser_id"):  # promoted_content covers ~30%
        assert test[name].tolist() == want[name].fillna(-1).astype(np.int64).tolist(), name
    assert (test["document_id_promo"] == -1).mean() > 0.5
    geo = want["geo_location"]
    assert test["geo_location"].tolist() == [_h(g) if isinstance(g, str) else -1 for g in geo]
    assert test["geo_location_country"].tolist() == [_h(g[:2]) if isinstance(g, str) else -1 for g in geo]
    assert test["geo_location_state"].tolist() == [_h(g[:5]) if isinstance(g, str) else -1 for g in geo]
    for name in ("source_id", "publisher_id", "source_id_promo", "publisher_id_promo"):  # no documents_meta
        assert (test[name] == -1).all() and (train[name] == -1).all(), name
    # capacities: distinct values over the train rows, counted here from the joined CSVs
    rows = df[~df["is_test"]]
    by_hand = {"ad_id": rows["ad_id"].nunique(), "document_id": rows["document_id"].nunique(),
               "uuid": rows["uuid"].nunique(), "geo_location": rows["geo_location"].nunique(dropna=False),
               "campaign_id": rows["campaign_id"].nunique(dropna=False), "source_id": 1}
    for name, count in by_hand.items():
        assert spec.cardinality(name) == count == train[name].nunique(), name
    assert spec.metadata["raw_ids"]["distinct_in_train"]["uuid"] == by_hand["uuid"]
    meta_warning = [w for w in runs["warnings"] if "documents_meta.csv not found" in w]
    assert len(meta_warning) == 1 and "(ids -1 (missing), CTRs 0.0" in meta_warning[0]


def test_everything_else_equals_the_default_run(runs: dict) -> None:
    for split in ("train", "test"):
        _, fixed = _read_split(runs["fixed"], split)
        _, raw = _read_split(runs["raw_ids"], split)
        assert list(raw.columns) == F.ONEHOT_COLUMNS + ["uuid"] + list(fixed.columns[len(F.ONEHOT_COLUMNS):])
        for name in fixed.columns:
            if name not in RAW:
                assert fixed[name].map(str).tolist() == raw[name].map(str).tolist(), (split, name)
        # the fixed run's bucket ids are the hash of the raw ids for the integer-id features
        for name in ("ad_id", "document_id", "campaign_id"):
            raw_ids = raw[name].to_numpy().astype(np.float64)
            np.testing.assert_array_equal(F.hash_ids(np.where(raw_ids < 0, np.nan, raw_ids), F.HASH_BUCKETS[name]),
                                          fixed[name].to_numpy())


def test_the_loader_takes_the_raw_dataset(runs: dict) -> None:
    spec = FeatureSpec.from_yaml(runs["raw_ids"] / "feature_spec.yaml")
    loader = DataLoader(spec, "test", 4096, with_map=True)  # value checks included: raw ids are no range error
    batch = loader.first()
    _, test = _read_split(runs["raw_ids"], "test")
    assert batch.categorical["uuid"].dtype.name == "int64"
    np.testing.assert_array_equal(batch.categorical["uuid"].numpy(), test["uuid"].to_numpy()[:batch.size])


def test_options_and_errors(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"uuid .* dynamic feature only \(add --raw-ids\)"):
        preprocess(runs["raw"], tmp_path / "a", with_uuid=True)
    assert not (tmp_path / "a").exists()
    assert main([str(runs["raw"]), str(tmp_path / "b"), "--raw-ids", "--raw-capacity", "ad_id=0", "--quiet"]) == 2
    assert "--raw-capacity: expected N or FEATURE=N" in capsys.readouterr().err
    assert main([str(runs["raw"]), str(tmp_path / "c"), "--raw-ids", "--raw-capacity", "uuid=9", "--quiet"]) == 2
    assert "'uuid' is not a raw-id feature" in capsys.readouterr().err and not (tmp_path / "c" / "train").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(runs["raw"]), str(tmp_path / "d"), "--raw-ids", "--raw-capacity", "ad_id=100000",
                     "--quiet"]) == 0
    spec = FeatureSpec.from_yaml(tmp_path / "d" / "feature_spec.yaml")
    assert spec.cardinality("ad_id") == 100000 and "uuid" not in spec.feature_spec
    assert spec.cardinality("document_id") == FeatureSpec.from_yaml(
        runs["raw_ids"] / "feature_spec.yaml").cardinality("document_id")
    assert pa.types.is_int64(pa.parquet.read_schema(spec.files("train")[0]).field("ad_id").type)

"""Generator with dynamic features: raw ids in [0, 2**62), the scramble (re-implemented here with Python ints),
the same planted signal as the fixed variant, distinct-id counts beyond the capacity, and the string hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import tiny_spec_dict
from wd_sok.feature_spec import FeatureSpec
from wd_sok.tools import generate as gen
from wd_sok.tools.rawids import dynamic_variant, hash_string, hash_strings, parse_counts, parse_features, scramble

M62 = (1 << 62) - 1


def _scramble_by_hand(b: int, seed: int, feature: str) -> int:
    """The documented scramble with Python integers (no numpy)."""
    digest = hashlib.blake2b(f"{seed}:{feature}".encode(), digest_size=8).digest()
    z = (b + (int.from_bytes(digest, "little") & M62)) & M62
    for shift, mult in ((31, 0xBF58476D1CE4E5B9), (29, 0x94D049BB133111EB), (32, 0xD6E8FEB86659FD93)):
        z ^= z >> shift
        z = (z * mult) & M62
    return z


def _tiny() -> FeatureSpec:
    return FeatureSpec.from_dict(tiny_spec_dict(n_train_files=2, n_test_files=2), allow_csv=True)


def test_scramble_matches_hand_values_and_is_injective() -> None:
    for b in (0, 1, 6, 12345, M62):
        assert int(scramble(np.array([b]), 3, "ad_id")[0]) == _scramble_by_hand(b, 3, "ad_id")
    ids = scramble(np.arange(300_000), 0, "a")
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() <= M62
    assert len(np.unique(ids)) == len(ids)
    assert ids.max() > 2**61  # spread over the whole range, not clustered near 0
    assert not np.array_equal(scramble(np.arange(10), 0, "a"), scramble(np.arange(10), 0, "b"))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 2\*\*62\)"):
        scramble(np.array([-1]), 0, "a")


def test_string_hash_is_the_documented_blake2b() -> None:
    uuid = "cb8c55702adb93"  # the first uuid of the real Outbrain sample
    want = int.from_bytes(hashlib.blake2b(uuid.encode("utf-8"), digest_size=8).digest(), "little") % 2**63
    assert hash_string(uuid) == want == 6512941317229499102  # pinned: must never change
    got = hash_strings([uuid, "é", uuid, ""])
    assert got.dtype == np.int64 and got.tolist() == [want, hash_string("é"), want, hash_string("")]
    with pytest.raises(TypeError, match="missing value"):
        hash_strings(["a", None])


def test_dynamic_variant_carries_the_same_signal(tmp_path: Path) -> None:
    fixed = gen.generate(_tiny(), tmp_path / "fixed", 300, 200, train_files=2, test_files=2, seed=4)
    dyn = gen.generate(_tiny(), tmp_path / "dyn", 300, 200, train_files=2, test_files=2, seed=4,
                       dynamic={"a": 3, "m": None})  # a table of 3 rows for 7 ids: the same data, evicting
    assert dyn.pop("dynamic") == {"a": {"capacity": 3, "distinct": 7, "seen_in_train": 7},
                                  "m": {"capacity": 6, "distinct": 6, "seen_in_train": 6}}
    assert dyn == fixed  # Bayes AUC / MAP@12 / logloss, CTRs, groups: identical
    spec = FeatureSpec.from_yaml(tmp_path / "dyn" / "feature_spec.yaml")
    assert spec.dynamic_features == ["a", "m"] and spec.cardinality("a") == 3 and spec.dtype("a") == "int64"
    assert spec.cardinality("m") == 6
    assert "cardinality" not in spec.feature_spec["a"] and spec.feature_spec["b"]["cardinality"] == 5
    for mapping in ("train", "test"):
        for name in ("part_0", "part_1"):
            f = pq.read_table(tmp_path / "fixed" / mapping / f"{name}.parquet").to_pandas()
            d = pq.read_table(tmp_path / "dyn" / mapping / f"{name}.parquet").to_pandas()
            assert list(d.columns) == list(f.columns)
            for col in set(f.columns) - {"a", "m"}:
                np.testing.assert_array_equal(d[col].to_numpy(), f[col].to_numpy())
            assert d["a"].dtype == np.int64
            assert d["a"].tolist() == [_scramble_by_hand(int(v), 4, "a") for v in f["a"]]
            assert [list(r) for r in d["m"]] == [[_scramble_by_hand(int(v), 4, "m") for v in r] for r in f["m"]]


def test_distinct_ids_beyond_the_capacity(tmp_path: Path) -> None:
    raw = tiny_spec_dict(n_train_files=1, n_test_files=1)
    raw["feature_spec"]["a"] = {"dynamic": {"capacity": 5, "evict": "lfu"}, "embedding_dim": 3}
    spec = FeatureSpec.from_dict(raw, allow_csv=True)
    report = gen.generate(spec, tmp_path / "out", 4000, 300, train_files=1, test_files=1, seed=2,
                          dynamic_distinct=1000)
    train = pq.read_table(tmp_path / "out" / "train" / "part_0.parquet")
    ids = train.column("a").to_numpy()
    universe = {_scramble_by_hand(b, 2, "a") for b in range(1000)}
    assert set(ids.tolist()) <= universe and ids.min() >= 0 and ids.max() <= M62
    seen = len(np.unique(ids))
    assert report["dynamic"] == {"a": {"capacity": 5, "distinct": 1000, "seen_in_train": seen}}
    assert 100 < seen <= 1000  # far more ids than rows of the table: eviction must happen
    # the report's Bayes AUC is that of the planted score recomputed from the written raw ids
    signal = gen.planted_signal(spec, seed=2, distinct={"a": 1000})
    test = pq.read_table(tmp_path / "out" / "test" / "part_0.parquet")
    assert report["bayes_auc"] == pytest.approx(gen.auc(signal.score(test), test.column("y").to_numpy()), abs=1e-12)
    assert json.loads((tmp_path / "out" / "generator_report.json").read_text()) == report


def test_bad_dynamic_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"feature 'x1': --dynamic needs a categorical feature"):
        gen.generate(_tiny(), tmp_path / "o", 50, 50, dynamic=["x1"])
    with pytest.raises(ValueError, match=r"feature 'b': a distinct-id count is only for dynamic features"):
        gen.generate(_tiny(), tmp_path / "o", 50, 50, dynamic=["a"], dynamic_distinct={"b": 9})
    raw = tiny_spec_dict()
    raw["feature_spec"]["a"] = {"dtype": "int32", "dynamic": {"capacity": 5}, "embedding_dim": 3}
    with pytest.raises(ValueError, match=r"feature 'a': dynamic ids reach 2\*\*62; declare dtype int64"):
        gen.generate(FeatureSpec.from_dict(raw, allow_csv=True), tmp_path / "o", 50, 50)
    with pytest.raises(ValueError, match=r"feature 'a': already dynamic"):
        dynamic_variant(raw, ["a"])
    assert not (tmp_path / "o").exists()
    assert parse_counts("", "f") is None and parse_counts("12", "f") == 12
    assert parse_counts("a=3, m=4", "f") == {"a": 3, "m": 4}
    for bad in ("0", "a=", "x", "a=-2"):
        with pytest.raises(ValueError, match=r"--dynamic_distinct: expected N or FEATURE=N"):
            parse_counts(bad, "--dynamic_distinct")
    assert parse_features("a, b=40,", "--dynamic") == {"a": None, "b": 40}
    for bad in ("a=0", "=3", "a=x"):
        with pytest.raises(ValueError, match=r"--dynamic: expected FEATURE\[=N\]"):
            parse_features(bad, "--dynamic")


def test_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "spec.yaml"
    _tiny().to_yaml(spec_path)
    args = ["--feature_spec_in", str(spec_path), "--train_rows", "200", "--test_rows", "100", "--train_files", "1",
            "--test_files", "1"]
    assert gen.main([*args, "--output", str(tmp_path / "out"), "--dynamic", "a,b=2", "--dynamic_distinct",
                     "a=50"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert {k: (v["capacity"], v["distinct"]) for k, v in report["dynamic"].items()} == {"a": (7, 50), "b": (2, 5)}
    assert gen.main([*args, "--output", str(tmp_path / "bad"), "--dynamic_distinct", "7"]) == 0  # none dynamic
    assert gen.main([*args, "--output", str(tmp_path / "bad2"), "--dynamic", "zz"]) == 2
    assert "feature 'zz': --dynamic needs a categorical feature" in capsys.readouterr().err

"""Every feature-spec rule has a failing spec whose one-line message names the file, feature and rule."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tiny_spec_dict
from wd_sok.feature_spec import DynamicConfig, FeatureSpec, SpecError


def _mutated(fn) -> dict:  # noqa: ANN001
    raw = copy.deepcopy(tiny_spec_dict())
    fn(raw)
    return raw


def _train(raw: dict) -> dict:
    return raw["source_spec"]["train"][0]


def _test(raw: dict) -> dict:
    return raw["source_spec"]["test"][0]


CASES = [
    ("two labels", lambda r: (r["channel_spec"]["label"].append("x2"), r["channel_spec"]["numerical"].remove("x2")),
     r"exactly one label feature is required, found 2"),
    ("no label", lambda r: r["channel_spec"].update(label=[]), r"exactly one label feature is required, found 0"),
    ("two maps", lambda r: (r["channel_spec"]["map"].append("d2"), r["feature_spec"].update(d2={"dtype": "int64"}),
                            _test(r)["features"].append("d2")), r"feature 'd2': at most one map feature"),
    ("map in train", lambda r: _train(r)["features"].append("d"),
     r"feature 'd': map feature belongs only in the 'test' mapping"),
    ("no cardinality", lambda r: r["feature_spec"]["a"].pop("cardinality"),
     r"feature 'a': categorical feature needs an integer cardinality >= 1, got None"),
    ("float cardinality", lambda r: r["feature_spec"]["a"].update(cardinality=7.5),
     r"feature 'a': categorical feature needs an integer cardinality >= 1, got 7.5"),
    ("no max_hotness", lambda r: r["feature_spec"]["m"].pop("max_hotness"),
     r"feature 'm': multi-hot feature needs an integer max_hotness >= 1, got None"),
    ("float categorical", lambda r: r["feature_spec"]["a"].update(dtype="float32"),
     r"feature 'a': categorical feature needs an integer dtype, got 'float32'"),
    ("int numerical", lambda r: r["feature_spec"]["x1"].update(dtype="int32"),
     r"feature 'x1': numerical feature needs a float dtype, got 'int32'"),
    ("int label", lambda r: r["feature_spec"]["y"].update(dtype="int8"),
     r"feature 'y': label feature needs a float dtype, got 'int8'"),
    ("undefined feature", lambda r: r["channel_spec"]["numerical"].append("x9"),
     r"feature 'x9': in channel 'numerical' but not defined in feature_spec"),
    ("missing from train", lambda r: _train(r)["features"].remove("x2"),
     r"feature 'x2': in channel 'numerical' but missing from mapping 'train'"),
    ("missing from test", lambda r: _test(r)["features"].remove("m"),
     r"feature 'm': in channel 'multihot_categorical' but missing from mapping 'test'"),
    ("unknown channel", lambda r: r["channel_spec"].update(sparse=["a"]), r"unknown channel 'sparse'"),
    ("unknown mapping", lambda r: r["source_spec"].update(valid=r["source_spec"]["test"]),
     r"unknown mapping 'valid' \(allowed: train, test\)"),
    ("missing mapping", lambda r: r["source_spec"].pop("test"), r"mapping 'test' is missing from source_spec"),
    ("unknown feature key", lambda r: r["feature_spec"]["a"].update(hash_buckets=3),
     r"feature 'a': unknown key 'hash_buckets'"),
    ("unknown top key", lambda r: r.update(extras={}), r"unknown top-level key 'extras'"),
    ("unknown chunk key", lambda r: _train(r).update(compression="gzip"),
     r"mapping 'train' chunk 0: unknown key 'compression'"),
    ("csv chunk", lambda r: _train(r).update(type="csv"),
     r"mapping 'train' chunk 0: type must be parquet, got 'csv' \(convert CSV with wd-sok-transcode\)"),
    ("two channels", lambda r: r["channel_spec"]["numerical"].append("a"),
     r"feature 'a': listed in two channels"),
    ("one-hot with hotness", lambda r: r["feature_spec"]["a"].update(max_hotness=2),
     r"feature 'a': one-hot feature cannot have max_hotness other than 1"),
    ("cardinality on numeric", lambda r: r["feature_spec"]["x1"].update(cardinality=3),
     r"feature 'x1': 'cardinality' is only for categorical features"),
    ("cardinality too big for dtype", lambda r: r["feature_spec"]["a"].update(dtype="int8", cardinality=1000),
     r"feature 'a': cardinality 1000 does not fit dtype 'int8'"),
    ("float map", lambda r: r["feature_spec"]["d"].update(dtype="float32"),
     r"feature 'd': map feature needs an integer dtype, got 'float32'"),
    ("source feature undefined", lambda r: _train(r)["features"].append("zz"),
     r"feature 'zz': in mapping 'train' chunk 0 but not defined in feature_spec"),
    ("duplicate in mapping", lambda r: _train(r)["features"].append("a"), r"feature 'a': listed twice in mapping"),
    ("no files", lambda r: _train(r).update(files=[]), r"mapping 'train' chunk 0: 'files' must be a non-empty list"),
]


@pytest.mark.parametrize("name,mutate,message", CASES, ids=[c[0] for c in CASES])
def test_rule_violation_message(tmp_path: Path, name: str, mutate, message: str) -> None:  # noqa: ANN001
    path = tmp_path / "feature_spec.yaml"
    path.write_text(yaml.safe_dump(_mutated(mutate)))
    with pytest.raises(SpecError, match=message) as err:
        FeatureSpec.from_yaml(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text


def test_files_versus_ranks() -> None:
    spec = FeatureSpec.from_dict(tiny_spec_dict(n_train_files=2, n_test_files=3), origin="s.yaml")
    spec.validate(world_size=2)
    with pytest.raises(SpecError, match=r"s.yaml: mapping 'train' has 2 file\(s\) for 3 ranks"):
        spec.validate(world_size=3)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("channel_spec:\n  label: [y\nfeature_spec: {}\n")
    with pytest.raises(SpecError, match=rf"{path}: malformed YAML at line \d+, column \d+"):
        FeatureSpec.from_yaml(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=rf"{tmp_path / 'nope.yaml'}: cannot read feature spec"):
        FeatureSpec.from_yaml(tmp_path / "nope.yaml")


def test_yaml_round_trip(tmp_path: Path) -> None:
    spec = FeatureSpec.from_yaml(ROOT / "data" / "outbrain_feature_spec.yaml")
    spec.to_yaml(tmp_path / "copy.yaml")
    again = FeatureSpec.from_yaml(tmp_path / "copy.yaml")
    assert again.to_dict() == spec.to_dict()
    assert len(again.onehot) == 13 and len(again.multihot) == 3 and len(again.numerical) == 13
    assert again.label == "clicked" and again.map_feature == "display_id"


def test_embedding_dims_have_one_source(tmp_path: Path) -> None:
    raw = tiny_spec_dict()
    spec = FeatureSpec.from_dict(raw, base_directory=tmp_path, origin="s.yaml")
    assert spec.embedding_dims() == {"a": 3, "b": 2, "m": 4}
    (tmp_path / "embedding_sizes.json").write_text('{"a": 5}')
    with pytest.raises(SpecError, match=r"feature 'a': embedding_dim defined both in the spec and in"):
        spec.embedding_dims()
    for props in raw["feature_spec"].values():
        props.pop("embedding_dim", None)
    spec = FeatureSpec.from_dict(raw, base_directory=tmp_path, origin="s.yaml")
    with pytest.raises(SpecError, match=r"feature 'b': no embedding_dim in the spec nor in"):
        spec.embedding_dims()
    (tmp_path / "embedding_sizes.json").write_text('{"a": 5, "b": 6, "m": 7}')
    assert spec.embedding_dims() == {"a": 5, "b": 6, "m": 7}


def test_default_dtypes_when_undeclared() -> None:
    raw = tiny_spec_dict()
    for props in raw["feature_spec"].values():
        props.pop("dtype")
    spec = FeatureSpec.from_dict(raw)
    assert [spec.dtype(n) for n in ("a", "m", "x1", "y", "d")] == ["int32", "int32", "float32", "float32", "int64"]


# ---- dynamic tables and placement overrides (issues 14 and 16)
def _spec_with(props: dict) -> dict:
    return {"channel_spec": {"onehot_categorical": ["uid"], "label": ["y"]},
            "feature_spec": {"uid": {"embedding_dim": 8, **props}, "y": {}},
            "source_spec": {m: [{"type": "parquet", "features": ["uid", "y"], "files": ["a.parquet"]}]
                            for m in ("train", "test")}}


def test_dynamic_feature_becomes_a_table_with_its_rules():
    spec = FeatureSpec.from_dict(_spec_with({"dynamic": {"capacity": 1000, "min_count": 3, "evict": "lfu"}}))
    (table,) = spec.tables({"uid": 8})
    assert table.cardinality == 1000 and table.dynamic == DynamicConfig(1000, 3, "lfu")
    assert spec.dtype("uid") == "int64" and spec.dynamic_features == ["uid"]
    (fixed,) = FeatureSpec.from_dict(_spec_with({"cardinality": 5, "placement": "replicated"})).tables({"uid": 8})
    assert fixed.dynamic is None and fixed.placement == "replicated"
    assert FeatureSpec.from_dict(_spec_with({"dynamic": {"capacity": 7}})).dynamic("uid") == DynamicConfig(7, 1, "lru")


@pytest.mark.parametrize("props, message", [
    ({"cardinality": 5, "dynamic": {"capacity": 10}}, "both 'dynamic' and 'cardinality'"),
    ({"dynamic": {"capacity": 0}}, "capacity must be an integer >= 1, got 0"),
    ({"dynamic": {}}, "capacity must be an integer >= 1, got None"),
    ({"dynamic": {"capacity": 10, "evict": "fifo"}}, "unknown eviction policy 'fifo'"),
    ({"dynamic": {"capacity": 10, "min_count": 0}}, "min_count must be an integer >= 1, got 0"),
    ({"dynamic": {"capacity": 10, "ttl": 3}}, "dynamic: unknown key 'ttl'"),
    ({"dynamic": 10}, "'dynamic' must be a mapping"),
    ({"dynamic": {"capacity": 10}, "dtype": "float32"}, "needs an integer dtype"),
    ({"dynamic": {"capacity": 10}, "placement": "replicated"}, "placed by key hash"),
    ({"cardinality": 5, "placement": "everywhere"}, "unknown placement 'everywhere'"),
])
def test_bad_dynamic_or_placement_is_one_line_naming_file_and_feature(props, message):
    with pytest.raises(SpecError) as e:
        FeatureSpec.from_dict(_spec_with(props), origin="spec.yaml")
    text = str(e.value)
    assert message in text and text.startswith("spec.yaml: feature 'uid': ") and "\n" not in text

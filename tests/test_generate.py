"""Tests of the synthetic data generator (wd_sok.tools.generate) and of the shipped feature specs."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wd_sok.feature_spec import FeatureSpec
from wd_sok.tools import generate as gen

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT / "tests" / "feature_specs"
VARIANTS = ["baseline", "less_onehot", "more_onehot", "no_onehot", "less_multihot", "more_multihot",
            "no_multihot", "less_numerical", "more_numerical", "no_numerical", "no_categorical",
            "more_multihot_moreless_hotness"]
NO_MAP_VARIANT = "less_numerical"
# reference facts: one-hot / multi-hot (cardinality, embedding dim[, max_hotness])
REFERENCE = {"ad_id": (250000, 128), "document_id": (300000, 128), "platform": (4, 19),
             "document_id_promo": (100000, 128), "campaign_id": (5000, 128), "advertiser_id": (2500, 64),
             "source_id": (4000, 64), "geo_location": (2500, 64), "geo_location_country": (300, 64),
             "geo_location_state": (2000, 64), "publisher_id": (1000, 64), "source_id_promo": (4000, 64),
             "publisher_id_promo": (1000, 64), "topic_id_list": (350, 64, 3),
             "entity_id_list": (10000, 64, 3), "category_id_list": (100, 64, 3)}


def load(name: str) -> FeatureSpec:
    return FeatureSpec.from_yaml(SPEC_DIR / f"{name}.yaml")


def read_mapping(spec: FeatureSpec, mapping: str) -> list[pa.Table]:
    return [pq.read_table(path) for path in spec.files(mapping)]


def arrow_type(spec: FeatureSpec, name: str) -> pa.DataType:
    scalar = pa.from_numpy_dtype(np.dtype(spec.dtype(name)))
    return pa.list_(scalar) if name in spec.multihot else scalar


def runs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start index, length) of each run of equal consecutive values."""
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return starts, np.diff(np.r_[starts, len(ids)])


# ----------------------------------------------------------------------------- the spec files
def test_spec_files_are_the_twelve_variants() -> None:
    assert sorted(p.stem for p in SPEC_DIR.glob("*.yaml")) == sorted(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_is_valid_with_embedding_dims(name: str) -> None:
    spec = load(name)
    dims = spec.embedding_dims()
    assert set(dims) == set(spec.categorical)
    for feature in spec.categorical:
        if feature in REFERENCE:
            assert (spec.cardinality(feature), dims[feature]) == REFERENCE[feature][:2], feature
            assert spec.max_hotness(feature) == (REFERENCE[feature] + (1,))[2], feature
    assert spec.label == "clicked"
    assert spec.map_feature == (None if name == NO_MAP_VARIANT else "display_id")
    assert spec.map_feature not in spec.features_in("train")


def test_variant_contents() -> None:
    base = load("baseline")
    assert (len(base.onehot), len(base.multihot), len(base.numerical)) == (13, 3, 13)
    assert len(load("less_onehot").onehot) < 13 < len(load("more_onehot").onehot)
    assert len(load("less_multihot").multihot) < 3 < len(load("more_multihot").multihot)
    assert len(load("less_numerical").numerical) < 13 < len(load("more_numerical").numerical)
    assert not load("no_onehot").onehot and not load("no_multihot").multihot
    assert not load("no_numerical").numerical and not load("no_categorical").categorical
    hot = load("more_multihot_moreless_hotness")
    assert {n: (hot.cardinality(n), hot.max_hotness(n)) for n in ("additional_1", "additional_2")} == {
        "additional_1": (1000, 10), "additional_2": (123, 2)}


def test_outbrain_spec_matches_baseline() -> None:
    data = FeatureSpec.from_yaml(ROOT / "data" / "outbrain_feature_spec.yaml")
    base = load("baseline")
    assert {c: data.channel(c) for c in data.channel_spec} == {c: base.channel(c) for c in base.channel_spec}
    assert data.embedding_dims() == base.embedding_dims()
    for name in data.feature_spec:
        assert data.dtype(name) == base.dtype(name)
        assert "dtype" in data.feature_spec[name]          # explicit in the data spec
    assert data.features_in("test") == base.features_in("test")


# ----------------------------------------------------------------------------- metrics by hand
def test_metrics_on_a_hand_made_three_group_case() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.3, 0.7, 0.1])
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 0, 0], dtype=np.float32)
    sizes = np.array([3, 2, 4])
    # clicked ranks: 3 (0.9, 0.5 ahead), 1, 3 (0.7 ahead and the equal 0.3 comes first)
    assert gen.map_at_k(scores, labels, sizes) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    # positives 0.1, 0.8, 0.3 vs negatives 0.9 0.5 0.2 0.3 0.7 0.1: 0.5 + 5 + 2.5 wins of 18 pairs
    assert gen.auc(scores, labels) == pytest.approx(8 / 18)
    expected_random = (Fraction(11, 18) + Fraction(3, 4) + Fraction(25, 48)) / 3
    assert gen.random_map_at_k(sizes) == pytest.approx(float(expected_random))
    assert gen.logloss(np.array([0.5, 0.25]), np.array([1.0, 0.0])) == pytest.approx(
        -(math.log(0.5) + math.log(0.75)) / 2)
    probs = gen.group_softmax(scores, sizes)
    assert probs[3:5] == pytest.approx([1 / (1 + math.exp(0.6)), 1 / (1 + math.exp(-0.6))])
    assert np.add.reduceat(probs, [0, 3, 5]) == pytest.approx([1, 1, 1])


def test_map_cutoff_ties_and_bad_groups() -> None:
    scores = np.r_[np.arange(13, 0, -1.0)]           # the last row has the 13th best score
    labels = np.zeros(13)
    labels[-1] = 1
    assert gen.map_at_k(scores, labels, [13]) == 0.0
    assert gen.map_at_k(scores, labels, [13], k=13) == pytest.approx(1 / 13)
    assert gen.random_map_at_k([13]) == pytest.approx(sum(1 / k for k in range(1, 13)) / 13)
    assert gen.auc(np.ones(6), [0, 1, 0, 1, 0, 0]) == 0.5
    with pytest.raises(ValueError):
        gen.map_at_k([0.1, 0.2, 0.3], [1, 1, 0], [3])


@pytest.mark.parametrize("n", list(range(2, 80)) + [1001, 12345])
def test_group_sizes_cover_rows(n: int) -> None:
    sizes = gen.draw_group_sizes(np.random.default_rng(n), n)
    assert sizes.sum() == n and sizes.min() >= 2 and sizes.max() <= 12


# ----------------------------------------------------------------------------- generated data
@pytest.mark.parametrize("name", VARIANTS)
def test_generate_variant(name: str, tmp_path: Path) -> None:
    spec = load(name)
    report = gen.generate(spec, tmp_path / "out", 600, 300, train_files=3, test_files=2, seed=7)
    assert json.loads((tmp_path / "out" / "generator_report.json").read_text()) == report
    out = FeatureSpec.from_yaml(tmp_path / "out" / "feature_spec.yaml")
    assert out.embedding_dims() == spec.embedding_dims()
    assert all("dtype" in props for props in out.feature_spec.values())
    assert [len(out.files(m)) for m in ("train", "test")] == [3, 2]
    for mapping, n_rows in (("train", 600), ("test", 300)):
        parts = read_mapping(out, mapping)
        table = pa.concat_tables(parts)
        assert table.num_rows == n_rows == report["rows"][mapping]
        assert table.column_names == out.features_in(mapping)
        for field in table.schema:
            assert field.type == arrow_type(spec, field.name), field.name
        for feature in spec.onehot:
            ids = table.column(feature).to_numpy()
            assert 0 <= ids.min() and ids.max() < spec.cardinality(feature)
        for feature in spec.multihot:
            column = table.column(feature).combine_chunks()
            lengths = column.value_lengths().to_numpy()
            assert lengths.min() == 1 and lengths.max() == spec.max_hotness(feature)
            flat = column.flatten().to_numpy()
            assert 0 <= flat.min() and flat.max() < spec.cardinality(feature)
        for feature in spec.numerical:
            x = table.column(feature).to_numpy()
            assert abs(x.mean()) < 0.3 and 0.8 < x.std() < 1.2
        labels = table.column("clicked").to_numpy()
        assert set(np.unique(labels)) <= {0.0, 1.0}
        if spec.map_feature is None:
            assert 0.05 < labels.mean() < 0.3
            continue
        assert labels.sum() == report["groups"][mapping]     # one click per group
        if mapping == "test":
            ids = table.column("display_id").to_numpy()
            assert np.all(np.diff(ids) >= 0)
            starts, sizes = runs(ids)
            assert sizes.min() >= 2 and sizes.max() <= 12
            assert np.all(np.add.reduceat(labels, starts) == 1)
            for left, right in zip(parts, parts[1:], strict=False):      # a group never spans two files
                assert left.column("display_id")[-1].as_py() < right.column("display_id")[0].as_py()
    assert 0.5 < report["bayes_auc"] < 1 and 0 < report["bayes_logloss"] < 1
    if spec.map_feature:
        assert report["random_map12"] < report["bayes_map12"] <= 1
    else:
        assert "bayes_map12" not in report and "random_map12" not in report


@pytest.mark.parametrize("name", ["baseline", NO_MAP_VARIANT, "more_multihot_moreless_hotness"])
def test_report_equals_independent_recomputation(name: str, tmp_path: Path) -> None:
    spec = load(name)
    report = gen.generate(spec, tmp_path / "out", 100, 300, train_files=1, test_files=2, seed=11)
    signal = gen.planted_signal(spec, seed=11)
    out = FeatureSpec.from_yaml(tmp_path / "out" / "feature_spec.yaml")
    test = pa.concat_tables(read_mapping(out, "test"))
    rows = test.to_pylist()
    scores = []
    for row in rows:                                   # s(x) row by row, in plain Python
        s = sum(float(signal.weights[f][row[f]]) for f in spec.onehot)
        s += sum(float(signal.weights[f][i]) for f in spec.multihot for i in row[f])
        numerics = zip(spec.numerical, signal.numeric_weights, strict=True)
        s += sum(float(v) * float(row[f]) for f, v in numerics)
        scores.append(s)
    assert np.allclose(scores, signal.score(test), rtol=0, atol=1e-9)
    labels = [row["clicked"] for row in rows]
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    assert report["bayes_auc"] == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    if spec.map_feature is None:
        probs = [1 / (1 + math.exp(-(s + signal.bias))) for s in scores]
    else:
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row["display_id"], []).append(i)
        probs, ap, rand = [0.0] * len(rows), [], []
        for members in groups.values():
            total = sum(math.exp(scores[i]) for i in members)
            for i in members:
                probs[i] = math.exp(scores[i]) / total
            clicked = [i for i in members if labels[i] == 1]
            assert len(clicked) == 1
            order = sorted(members, key=lambda i: -scores[i])
            rank = order.index(clicked[0]) + 1
            ap.append(1 / rank if rank <= 12 else 0.0)
            rand.append(sum(1 / k for k in range(1, min(len(members), 12) + 1)) / len(members))
        assert report["bayes_map12"] == pytest.approx(sum(ap) / len(ap), abs=1e-12)
        assert report["random_map12"] == pytest.approx(sum(rand) / len(rand), abs=1e-12)
    bce = [-(y * math.log(p) + (1 - y) * math.log(1 - p)) for p, y in zip(probs, labels, strict=True)]
    assert report["bayes_logloss"] == pytest.approx(sum(bce) / len(bce), rel=1e-9)


def test_signal_strength_on_baseline(tmp_path: Path) -> None:
    report = gen.generate(load("baseline"), tmp_path / "out", 200, 20000, train_files=1, test_files=1)
    assert 0.75 < report["bayes_auc"] < 0.85
    assert report["bayes_map12"] > report["random_map12"] + 0.2
    assert 0.12 < report["ctr"]["test"] < 0.17


def test_ids_are_skewed(tmp_path: Path) -> None:
    gen.generate(load("no_multihot"), tmp_path / "out", 4000, 20, train_files=1, test_files=1, seed=3)
    table = pq.read_table(tmp_path / "out" / "train" / "part_0.parquet")
    ad = table.column("ad_id").to_numpy()
    _, counts = np.unique(ad, return_counts=True)
    assert counts.max() > 0.05 * len(ad)              # a popular ad
    assert len(counts) > 300                           # and a long tail of rare ones
    assert len(np.unique(table.column("platform").to_numpy())) == 4


def test_seeded_and_independent_of_train_size(tmp_path: Path) -> None:
    spec = load("no_onehot")
    gen.generate(spec, tmp_path / "a", 300, 200, train_files=2, test_files=2, seed=5)
    gen.generate(spec, tmp_path / "b", 300, 200, train_files=2, test_files=2, seed=5)
    gen.generate(spec, tmp_path / "c", 500, 200, train_files=2, test_files=2, seed=5)
    gen.generate(spec, tmp_path / "d", 300, 200, train_files=2, test_files=2, seed=6)
    files = [f"{m}/part_{i}.parquet" for m in ("train", "test") for i in range(2)]
    read = {d: [pq.read_table(tmp_path / d / f) for f in files] for d in "abcd"}
    assert all(x.equals(y) for x, y in zip(read["a"], read["b"], strict=True))
    assert all(x.equals(y) for x, y in zip(read["a"][2:], read["c"][2:], strict=True))     # same test data
    assert not read["a"][2].equals(read["d"][2])


def test_declared_dtypes_are_kept(tmp_path: Path) -> None:
    raw = {"channel_spec": {"onehot_categorical": ["item"], "multihot_categorical": ["tags"],
                            "numerical": ["x"], "label": ["y"], "map": ["g"]},
           "feature_spec": {"item": {"cardinality": 70000, "dtype": "int64", "embedding_dim": 8},
                            "tags": {"cardinality": 300, "dtype": "int16", "max_hotness": 4,
                                     "embedding_dim": 4},
                            "x": {"dtype": "float64"}, "y": {"dtype": "float64"}, "g": {"dtype": "int32"}},
           "source_spec": {"train": [{"type": "parquet", "features": ["y", "x", "tags", "item"],
                                      "files": ["t"]}],
                           "test": [{"type": "parquet", "features": ["g", "item", "tags", "x", "y"],
                                     "files": ["v"]}]}}
    spec = FeatureSpec.from_dict(raw)
    gen.generate(spec, tmp_path / "out", 50, 50, train_files=1, test_files=1)
    out = FeatureSpec.from_yaml(tmp_path / "out" / "feature_spec.yaml")
    for mapping in ("train", "test"):
        table = pq.read_table(out.files(mapping)[0])
        assert table.column_names == raw["source_spec"][mapping][0]["features"]
        assert {f.name: f.type for f in table.schema} == {n: arrow_type(spec, n) for n in table.column_names}
        assert {n: out.feature_spec[n]["dtype"] for n in table.column_names} == {
            n: raw["feature_spec"][n]["dtype"] for n in table.column_names}


def test_float16_is_refused_for_parquet(tmp_path: Path) -> None:
    raw = load("no_categorical").to_dict()
    raw["feature_spec"]["ad_id_ctr"]["dtype"] = "float16"
    spec = FeatureSpec.from_dict(raw)
    with pytest.raises(ValueError, match="'ad_id_ctr'.*float16"):
        gen.generate(spec, tmp_path / "out", 60, 60, train_files=1, test_files=1)
    with pytest.raises(ValueError, match="float16"):
        gen.generate(spec, tmp_path / "out", 60, 60, train_files=1, test_files=1, file_format="csv")
    assert not (tmp_path / "out").exists()


def test_bad_requests(tmp_path: Path) -> None:
    spec = load("no_onehot")
    with pytest.raises(ValueError, match="display groups"):
        gen.generate(spec, tmp_path / "a", 600, 12, test_files=3)
    with pytest.raises(ValueError, match="file_format"):
        gen.generate(spec, tmp_path / "b", 600, 100, file_format="tsv")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        gen.generate(spec, tmp_path / "c", 60, 60, train_files=1, test_files=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]      # nothing left behind
    gen.generate(spec, tmp_path / "c", 60, 60, train_files=1, test_files=1, overwrite=True)
    assert not (tmp_path / "c" / "keep.txt").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--feature_spec_in", str(SPEC_DIR / "no_numerical.yaml"), "--output", str(tmp_path / "out"),
            "--train_rows", "120", "--test_rows", "60", "--train_files", "2", "--test_files", "1",
            "--seed", "2", "--format", "csv"]
    assert gen.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "Bayes" in lines[1]
    assert json.loads(lines[0]) == json.loads((tmp_path / "out" / "generator_report.json").read_text())
    out = FeatureSpec.from_yaml(tmp_path / "out" / "feature_spec.yaml", allow_csv=True)
    assert [c["type"] for m in ("train", "test") for c in out.source_spec[m]] == ["csv", "csv"]
    assert gen.main(["--feature_spec_in", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "x"),
                     "--train_rows", "10", "--test_rows", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.yaml" in err

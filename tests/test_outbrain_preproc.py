"""Outbrain preprocessing: schema, formulas (re-computed with plain pandas), split, spec, real data."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.conftest import need_real_sample  # noqa: E402
from wd_sok.feature_spec import FeatureSpec  # noqa: E402
from wd_sok.outbrain import features as F  # noqa: E402
from wd_sok.outbrain import synthetic  # noqa: E402
from wd_sok.outbrain.output import _display_cut, write_parts  # noqa: E402
from wd_sok.outbrain.pipeline import preprocess  # noqa: E402
from wd_sok.outbrain.raw import OutbrainDataWarning, stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONEHOT = ["ad_id", "document_id", "platform", "document_id_promo", "campaign_id", "advertiser_id",
          "source_id", "geo_location", "geo_location_country", "geo_location_state", "publisher_id",
          "source_id_promo", "publisher_id_promo"]
MULTIHOT = ["topic_id_list", "entity_id_list", "category_id_list"]
NUMERIC = ["document_id_document_id_promo_sim_categories", "document_id_document_id_promo_sim_topics",
           "document_id_document_id_promo_sim_entities", "document_id_promo_ctr", "publisher_id_promo_ctr",
           "source_id_promo_ctr", "document_id_promo_count", "publish_time_days_since_published", "ad_id_ctr",
           "advertiser_id_ctr", "campaign_id_ctr", "ad_id_count", "publish_time_promo_days_since_published"]
CARD = {"ad_id": 250000, "document_id": 300000, "platform": 4, "document_id_promo": 100000,
        "campaign_id": 5000, "advertiser_id": 2500, "source_id": 4000, "geo_location": 2500,
        "geo_location_country": 300, "geo_location_state": 2000, "publisher_id": 1000,
        "source_id_promo": 4000, "publisher_id_promo": 1000, "topic_id_list": 350,
        "entity_id_list": 10000, "category_id_list": 100}
DIMS = {name: 128 if name in ("ad_id", "document_id", "document_id_promo", "campaign_id") else 64
        for name in CARD} | {"platform": 19}
THRESH = {"ad_id": 5, "document_id_promo": 5, "source_id_promo": 10, "publisher_id_promo": 10,
          "advertiser_id": 10, "campaign_id": 10}
DELTA_MS = 1465876799998


def _read_split(out: Path, split: str) -> tuple[list[pa.Table], pd.DataFrame]:
    spec = FeatureSpec.from_yaml(out / "feature_spec.yaml")
    tables = [pq.read_table(p) for p in spec.files(split)]
    return tables, pa.concat_tables(tables).to_pandas()


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    raw = tmp_path_factory.mktemp("raw")
    synthetic.generate(raw, displays=3000, seed=1)
    out = tmp_path_factory.mktemp("out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = preprocess(raw, out, seed=0, rows_per_part=2500)
    return {"raw": raw, "out": out, "result": result,
            "warnings": [w for w in caught if issubclass(w.category, OutbrainDataWarning)]}


@pytest.fixture(scope="module")
def reference(synthetic_run: dict) -> dict:
    """Independent pandas re-computation over the raw CSVs (train displays = all minus the test ones)."""
    raw = synthetic_run["raw"]
    clicks = pd.read_csv(raw / "clicks_train.csv")
    events = pd.read_csv(raw / "events.csv")
    promo = pd.read_csv(raw / "promoted_content.csv").rename(columns={"document_id": "document_id_promo"})
    meta = pd.read_csv(raw / "documents_meta.csv")
    _, test = _read_split(synthetic_run["out"], "test")
    test_displays = set(test["display_id"])
    df = clicks.merge(events, on="display_id", how="left").merge(promo, on="ad_id", how="left")
    for suffix, key in (("", "document_id"), ("_promo", "document_id_promo")):
        m = meta.rename(columns={c: c + suffix for c in ("source_id", "publisher_id", "publish_time")})
        df = df.merge(m.rename(columns={"document_id": key}), on=key, how="left")
    df["is_test"] = df["display_id"].isin(test_displays)
    df["day"] = df["timestamp"] // 86_400_000
    return {"df": df, "test": test, "train": df[~df["is_test"]],
            "test_raw": df[df["is_test"]].sort_values("display_id", kind="mergesort").reset_index(drop=True)}


def test_features_dtypes_and_ranges(synthetic_run: dict) -> None:
    out = synthetic_run["out"]
    spec = FeatureSpec.from_yaml(out / "feature_spec.yaml")
    assert spec.onehot == ONEHOT and spec.multihot == MULTIHOT and spec.numerical == NUMERIC
    assert spec.label == "clicked" and spec.map_feature == "display_id"
    assert len(spec.onehot + spec.multihot + spec.numerical) == 29
    assert spec.embedding_dims() == DIMS
    for split in ("train", "test"):
        tables, df = _read_split(out, split)
        expected = ONEHOT + MULTIHOT + NUMERIC + ["clicked"] + (["display_id"] if split == "test" else [])
        for table in tables:
            assert table.column_names == expected
            for name in ONEHOT:
                assert table.schema.field(name).type == pa.int32()
            for name in MULTIHOT:
                assert table.schema.field(name).type == pa.list_(pa.int32())
            for name in NUMERIC + ["clicked"]:
                assert table.schema.field(name).type == pa.float32()
            if split == "test":
                assert table.schema.field("display_id").type == pa.int64()
        assert len(df) == synthetic_run["result"].rows[split] > 0
        for name in ONEHOT:
            assert df[name].min() >= 0 and df[name].max() < CARD[name], name
        for name in MULTIHOT:
            lengths = df[name].map(len)
            assert lengths.between(1, 3).all(), name
            flat = np.concatenate(df[name].to_numpy())
            assert flat.min() >= 0 and flat.max() < CARD[name], name
            assert (flat == 0).sum() == (df[name].map(lambda v: list(v) == [0])).sum(), "0 only as [0]"
        for name in NUMERIC:
            assert np.isfinite(df[name]).all(), name
        assert set(df["clicked"].unique()) == {0.0, 1.0}
        for name in ("document_id_document_id_promo_sim_topics", "ad_id_ctr"):
            assert df[name].between(0, 1.0 + 1e-6).all()
    assert not synthetic_run["warnings"], [str(w.message) for w in synthetic_run["warnings"]]


def test_split_rule(synthetic_run: dict, reference: dict) -> None:
    df, test = reference["df"], reference["test"]
    per_display = df.groupby("display_id").agg(day=("day", "first"), is_test=("is_test", "first"))
    train_days = per_display.loc[~per_display["is_test"], "day"]
    assert len(train_days) > 0 and (train_days <= 10).all()
    assert per_display.loc[per_display["day"] > 10, "is_test"].all()
    eligible = per_display[per_display["day"] <= 10]
    assert 0.75 < (~eligible["is_test"]).mean() < 0.85  # uniform draw > 0.2
    u = F.display_uniform(per_display.index.to_numpy(), seed=0)
    np.testing.assert_array_equal(~per_display["is_test"].to_numpy(), (per_display["day"] <= 10) & (u > 0.2))
    # no display in both splits: every test display has all its click rows in test, and rows add up
    assert (test.groupby("display_id").size() == df[df["is_test"]].groupby("display_id").size()).all()
    n_test = int(df["is_test"].sum())
    assert synthetic_run["result"].rows == {"train": len(df) - n_test, "test": n_test}
    # test sorted by display_id, several files, none sharing a display
    tables, _ = _read_split(synthetic_run["out"], "test")
    assert len(tables) > 1
    ids = [t["display_id"].to_numpy() for t in tables]
    assert all((np.diff(i) >= 0).all() for i in ids)
    assert all(a[-1] < b[0] for a, b in zip(ids, ids[1:], strict=False))
    np.testing.assert_array_equal(test["clicked"].to_numpy(), reference["test_raw"]["clicked"].to_numpy())


def test_ctr_counts_days_match_pandas(reference: dict) -> None:
    train, test, raw = reference["train"], reference["test"], reference["test_raw"]
    for key, thresh in THRESH.items():
        stats = train.dropna(subset=[key]).groupby(key)["clicked"].agg(["sum", "count"])
        s = stats.reindex(raw[key])
        expected = np.where(s["count"].to_numpy() >= thresh, s["sum"].to_numpy() / s["count"].to_numpy(), 0.0)
        expected = np.nan_to_num(expected)
        np.testing.assert_allclose(test[f"{key}_ctr"], expected, atol=1e-6, err_msg=key)
        assert (expected > 0).sum() > 50, key
        if key in ("ad_id", "document_id_promo"):
            views = train.groupby(key).size().reindex(train[key]).to_numpy()
            logs = np.log1p(views.astype(np.float32))
            mean, std = logs.astype(np.float64).mean(), logs.astype(np.float64).std(ddof=1)
            v = train.groupby(key).size().reindex(raw[key]).fillna(0).to_numpy()
            np.testing.assert_allclose(test[f"{key}_count"], (np.log1p(v) - mean) / std, atol=1e-4)
    # hand-picked rows: the first row of 5 displays with a non-zero ad CTR
    picked = test.index[test["ad_id_ctr"] > 0][:5]
    for i in picked:
        ad = raw.loc[i, "ad_id"]
        rows = train[train["ad_id"] == ad]
        assert len(rows) >= 5 and test.loc[i, "ad_id_ctr"] == pytest.approx(rows["clicked"].mean(), abs=1e-6)
    for suffix in ("", "_promo"):
        publish = pd.to_datetime(reference["df"][f"publish_time{suffix}"])
        event = pd.to_datetime(reference["df"]["timestamp"] + DELTA_MS, unit="ms")
        days = ((event - publish) // pd.Timedelta(days=1)).clip(0, 3650)
        median = days[~reference["df"]["is_test"]].median()
        d = days[reference["df"]["is_test"]].to_numpy()
        test_ids = reference["df"].loc[reference["df"]["is_test"], "display_id"].to_numpy()
        order = np.argsort(test_ids, kind="stable")
        expected = np.log1p(np.where(np.isnan(d[order]), median, d[order]))
        np.testing.assert_allclose(test[f"publish_time{suffix}_days_since_published"], expected, rtol=1e-6)


def _tfidf_similarity(table: pd.DataFrame, term: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Straightforward dict-based tf-idf cosine (independent of the package)."""
    n_docs = table["document_id"].nunique()
    df_t = table.groupby(term)["document_id"].nunique()
    vectors: dict[int, dict] = defaultdict(dict)
    for d, t, c in table[["document_id", term, "confidence_level"]].itertuples(index=False):
        vectors[d][t] = vectors[d].get(t, 0.0) + c * math.log(n_docs / df_t[t])
    norms = {d: math.sqrt(sum(w * w for w in v.values())) for d, v in vectors.items()}
    out = np.zeros(len(a))
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x in vectors and y in vectors and norms[x] > 0 and norms[y] > 0:
            dot = sum(w * vectors[y].get(t, 0.0) for t, w in vectors[x].items())
            out[i] = dot / (norms[x] * norms[y])
    return out


@pytest.mark.parametrize("table,term", [("categories", "category_id"), ("topics", "topic_id"),
                                        ("entities", "entity_id")])
def test_similarity_and_lists_match_pandas(synthetic_run: dict, reference: dict, table: str,
                                           term: str) -> None:
    side = pd.read_csv(synthetic_run["raw"] / f"documents_{table}.csv")
    raw, test = reference["test_raw"], reference["test"]
    docs, promo_docs = raw["document_id"].to_numpy(), raw["document_id_promo"].to_numpy()
    expected = _tfidf_similarity(side, term, docs, promo_docs)
    got = test[f"document_id_document_id_promo_sim_{table}"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (expected > 0).sum() >= 20 and (expected == 0).sum() >= 20
    # multi-hot: min(3, #terms) ids per document ([0] when none), identical lists for identical documents
    name = {"categories": "category_id_list", "topics": "topic_id_list", "entities": "entity_id_list"}[table]
    n_terms = side.groupby("document_id").size().reindex(raw["document_id"]).fillna(0).to_numpy()
    lists = test[name].map(tuple)
    np.testing.assert_array_equal(lists.map(len).to_numpy(), np.maximum(np.minimum(n_terms, 3), 1))
    assert (lists[n_terms == 0] == (0,)).all() and not lists[n_terms > 0].map(lambda v: 0 in v).any()
    assert lists.groupby(raw["document_id"].to_numpy()).nunique().max() == 1


def test_missing_and_partial_tables_warn_once(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    synthetic.generate(raw, displays=600, seed=3, promoted_coverage=0.5,
                       side_tables=("promoted_content", "documents_meta", "documents_topics"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = preprocess(raw, tmp_path / "out", min_parts=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, OutbrainDataWarning)]
    assert len(messages) == 3, messages
    for table, feature in (("documents_entities.csv", "entity_id_list"),
                           ("documents_categories.csv", "category_id_list")):
        hits = [m for m in messages if table in m]
        assert len(hits) == 1 and feature in hits[0] and "not found" in hits[0]
    clicks = pd.read_csv(raw / "clicks_train.csv")
    coverage = clicks["ad_id"].isin(pd.read_csv(raw / "promoted_content.csv")["ad_id"]).mean()
    cover_msg = [m for m in messages if "promoted_content.csv covers" in m]
    assert len(cover_msg) == 1 and f"{coverage:.1%}" in cover_msg[0]
    assert result.missing_tables == ["documents_entities.csv", "documents_categories.csv"]
    spec = FeatureSpec.from_yaml(result.spec_path)
    assert len(spec.files("train")) >= 2 and len(spec.files("test")) >= 2
    _, df = _read_split(tmp_path / "out", "test")
    assert (df["entity_id_list"].map(list) == pd.Series([[0]] * len(df))).all()
    assert (df["document_id_document_id_promo_sim_entities"] == 0).all()
    assert (df["document_id_promo"] == 0).mean() == pytest.approx(1 - coverage, abs=0.1)


def test_deterministic_and_refuses_overwrite(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    synthetic.generate(raw, displays=300, seed=5)
    preprocess(raw, tmp_path / "a")
    preprocess(raw, tmp_path / "b")
    for split in ("train", "test"):
        assert _read_split(tmp_path / "a", split)[1].equals(_read_split(tmp_path / "b", split)[1])
    with pytest.raises(FileExistsError):
        preprocess(raw, tmp_path / "a")
    assert not (Path.cwd() / "categories").exists()


def test_chunked_staging_matches_single_chunk(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    synthetic.generate(raw, displays=400, seed=9, side_tables=("promoted_content", "documents_topics"))
    clicks = pd.read_csv(raw / "clicks_train.csv")
    clicks.sample(frac=1.0, random_state=0).to_csv(raw / "clicks_train.csv", index=False)  # unsorted input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutbrainDataWarning)
        one = stage(raw, tmp_path / "one")
        many = stage(raw, tmp_path / "many", chunk_rows=333, test_bucket_displays=25)
    assert len(one.train_files) == 1 and len(many.train_files) > 3 and len(many.test_files) > 3
    assert one.rows == many.rows and one.displays == many.displays

    def load(files: list[Path]) -> pd.DataFrame:
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    test_one, test_many = load(one.test_files), load(many.test_files)
    assert test_one["display_id"].is_monotonic_increasing
    pd.testing.assert_frame_equal(test_one, test_many)
    key = ["display_id", "ad_id"]
    train_one = load(one.train_files).sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(train_one, load(many.train_files).sort_values(key, ignore_index=True))


def test_display_boundaries_in_writer(tmp_path: Path) -> None:
    assert _display_cut(np.array([1, 1, 2, 2, 2, 3]), 4) == 2
    assert _display_cut(np.array([1, 1, 1, 2]), 2) == 3
    assert _display_cut(np.array([7, 7, 7]), 1) == 0
    n = 40
    rng = np.random.default_rng(0)
    display = np.sort(rng.integers(0, 12, size=n))
    frame = {c: np.zeros(n, np.int32) for c in ONEHOT + [s for m in MULTIHOT for s in F.slot_columns(m)]}
    frame |= {c: np.zeros(n, np.float32) for c in NUMERIC + ["clicked"]} | {"display_id": display}
    frames = [pd.DataFrame(frame).iloc[i:i + 7] for i in range(0, n, 7)]
    files = write_parts(iter(frames), tmp_path, "test", target_rows=9)
    ids = [pq.read_table(tmp_path / f)["display_id"].to_numpy() for f in files]
    assert sum(map(len, ids)) == n and len(files) >= 4
    assert all(a[-1] < b[0] for a, b in zip(ids, ids[1:], strict=False))


def test_real_sample(tmp_path: Path) -> None:
    sample = need_real_sample()
    raw = tmp_path / "raw"
    raw.mkdir()
    for csv in sample.glob("*.csv"):
        shutil.copy(csv, raw / csv.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = preprocess(raw, tmp_path / "out")
    messages = [str(w.message) for w in caught if issubclass(w.category, OutbrainDataWarning)]
    present = {p.stem for p in raw.glob("*.csv")}
    missing = [t for t in ("documents_meta", "documents_topics", "documents_entities", "documents_categories")
               if t not in present]
    for table in missing:
        assert sum(f"{table}.csv not found" in m for m in messages) == 1, (table, messages)
    clicks = pd.read_csv(raw / "clicks_train.csv")
    partial = clicks["ad_id"].isin(pd.read_csv(raw / "promoted_content.csv")["ad_id"]).mean() < 1
    assert len(messages) == len(missing) + int(partial), messages
    spec = FeatureSpec.from_yaml(result.spec_path)
    assert spec.embedding_dims() == DIMS
    _, train = _read_split(tmp_path / "out", "train")
    _, test = _read_split(tmp_path / "out", "test")
    assert len(train) + len(test) == len(clicks) and len(train) > len(test) > 0
    assert test["display_id"].is_monotonic_increasing
    assert test.groupby("display_id")["clicked"].sum().eq(1).all()
    # random ranking MAP@12 on the test part (expected value of a uniformly random order: mean H_n / n)
    sizes = test.groupby("display_id").size().to_numpy()
    expected_map = np.mean([sum(1 / k for k in range(1, min(n, 12) + 1)) / n for n in sizes])
    ranked = test.assign(s=np.random.default_rng(0).random(len(test)))
    ranked = ranked.sort_values(["display_id", "s"], ascending=[True, False])
    rank = ranked.groupby("display_id").cumcount().to_numpy() + 1
    clicked = ranked["clicked"].to_numpy() == 1
    drawn_map = float(np.where(rank[clicked] <= 12, 1 / rank[clicked], 0).mean())
    print(f"\nreal sample: train {len(train)} rows / test {len(test)} rows ({len(sizes)} displays); "
          f"random MAP@12 expected {expected_map:.4f}, seeded draw {drawn_map:.4f}")
    assert 0.4 < expected_map < 0.56 and abs(drawn_map - expected_map) < 0.06
    # and the trainer takes it end to end, reporting MAP@12 over every test display
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--dataset_path", str(tmp_path / "out"), "--model_dir",
         str(tmp_path / "ckpt"), "--results_dir", str(tmp_path / "res"), "--global_batch_size", "512",
         "--eval_batch_size", "2048", "--num_epochs", "2", "--deep_warmup_epochs", "1", "--deep_hidden_units", "64",
         "64"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = pd.read_csv(tmp_path / "res" / "history.csv")
    assert history["map_groups"].tolist() == [len(sizes)] * 2
    assert history["map_skipped_no_click"].sum() == 0 and history["map_skipped_multi_click"].sum() == 0
    assert 0.0 < history["streaming_map_val"].iloc[-1] <= 1.0
    print(f"real sample trained 2 epochs: MAP@12 {history['streaming_map_val'].iloc[-1]:.4f} "
          f"(random {expected_map:.4f}), AUC {history['auc_roc'].iloc[-1]:.4f}")


def test_preproc_script(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    synthetic.generate(raw, displays=200, seed=7, side_tables=("promoted_content",))
    proc = subprocess.run([str(ROOT / "scripts" / "preproc.sh"), str(raw), str(tmp_path / "out"), "--quiet",
                           "--min-parts", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("OutbrainDataWarning") == 4, proc.stderr
    spec = FeatureSpec.from_yaml(tmp_path / "out" / "feature_spec.yaml")
    assert len(spec.files("train")) == 2 and all(p.is_file() for p in spec.files("test"))
    usage = subprocess.run([str(ROOT / "scripts" / "preproc.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr

"""wd-sok-prep (wd_sok.prep): raw Criteo / Avazu-format files -> parquet + spec -> main.py, --apply, errors.

Every expected value is recomputed here from the raw files with pandas / numpy (vocabulary sizes, ids,
the log / normalise rule, the split, the sort), independently of NVTabular.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import prep_data as D
from wd_sok.feature_spec import FeatureSpec
from wd_sok.prep.cli import main
from wd_sok.prep.options import embedding_width
from wd_sok.prep.stage import uniform_hash

ROOT = Path(__file__).resolve().parents[1]
NAMES = ",".join(D.CRITEO_NAMES)
AVAZU_CATS = ["C1", "banner_pos", "site_id", "site_domain", "app_id", "device_model", "device_type", "C14",
              "C15", "hour"]
TRAIN_ARGS = ["--global_batch_size", "256", "--eval_batch_size", "4096", "--num_epochs", "3",
              "--deep_hidden_units", "32", "32", "--deep_warmup_epochs", "0", "--deep_learning_rate", "0.02",
              "--linear_learning_rate", "0.2", "--deep_dropout", "0"]


def run_prep(*argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def read(spec: FeatureSpec, mapping: str) -> pd.DataFrame:
    return pa.concat_tables([pq.read_table(p) for p in spec.files(mapping)]).to_pandas()


def raw_criteo(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", header=None, names=D.CRITEO_NAMES, dtype=str, keep_default_na=False)


def best_single_column_auc(train: pd.DataFrame, test: pd.DataFrame, label: str, columns: list[str]) -> float:
    """The best test AUC of a one-column lookup table: each raw value scored by its train click rate."""
    y = train[label].astype(int)
    best = 0.5
    for c in columns:
        ctr = y.groupby(train[c].to_numpy()).mean()
        score = test[c].map(ctr).fillna(y.mean()).to_numpy()
        best = max(best, D.auc(score, test[label].astype(int).to_numpy()))
    return best


def train_cmd(dataset: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), "--dataset_path", str(dataset), "--model_dir", str(work / "ck"),
            "--results_dir", str(work / "res"), *TRAIN_ARGS, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Prep a Criteo-format TSV pair and an Avazu-format CSV, then train main.py on both (concurrently)."""
    root = tmp_path_factory.mktemp("prep")
    p_train = D.write_criteo(root / "criteo_train.tsv", 8000, seed=0)
    p_test = D.write_criteo(root / "criteo_test.tsv", 2000, seed=1)
    ints, cats = ",".join(D.CRITEO_INTS), ",".join(D.CRITEO_CATS)
    rc, criteo_out, err = run_prep("--train", str(root / "criteo_train.tsv"), "--test", str(root / "criteo_test.tsv"),
                                   "--no_header", "--names", NAMES, "--label", "label", "--numerical", ints,
                                   "--categorical", cats, "--output", str(root / "criteo"))
    assert rc == 0, err
    p_avazu, _ = D.write_avazu(root / "avazu.csv", 8000, seed=0)
    rc, avazu_out, err = run_prep("--train", str(root / "avazu.csv"), "--test_fraction", "0.25", "--split_by", "hour",
                                  "--map", "display", "--label", "click", "--categorical", ",".join(AVAZU_CATS),
                                  "--multihot", "tags=|", "--rows_per_part", "1500", "--output", str(root / "avazu"))
    assert rc == 0, err
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmds = {"criteo": train_cmd(root / "criteo", root / "run_criteo", "--disable_map_calculation"),
            "avazu": train_cmd(root / "avazu", root / "run_avazu")}
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in cmds.items()}
    errors = {name: proc.communicate(timeout=600)[1] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, errors[name][-3000:]
    return {"root": root, "p_test": p_test, "p_train": p_train, "p_avazu": p_avazu, "criteo_out": criteo_out,
            "avazu_out": avazu_out,
            "criteo": FeatureSpec.from_yaml(root / "criteo" / "feature_spec.yaml"),
            "avazu": FeatureSpec.from_yaml(root / "avazu" / "feature_spec.yaml")}


def test_embedding_width_rule() -> None:
    assert [embedding_width(c) for c in (1, 2, 25, 1000, 10**6)] == [6, 7, 13, 34, 64]


def test_criteo_spec_dtypes_and_parts(runs: dict) -> None:
    spec = runs["criteo"]
    spec.validate(world_size=2)  # horovodrun -np 2 gets >= 1 file per rank and split
    assert spec.onehot == D.CRITEO_CATS and spec.numerical == D.CRITEO_INTS and spec.label == "label"
    assert len(spec.files("train")) >= 2 and len(spec.files("test")) >= 2
    for mapping in ("train", "test"):
        for path in spec.files(mapping):
            schema = pq.read_schema(path)
            assert schema.names == D.CRITEO_CATS + D.CRITEO_INTS + ["label"]
            for name in D.CRITEO_CATS:
                assert schema.field(name).type == pa.int32() == pa.from_numpy_dtype(np.dtype(spec.dtype(name)))
            for name in D.CRITEO_INTS + ["label"]:
                assert schema.field(name).type == pa.float32()
    assert sum(len(read(spec, m)) for m in ("train", "test")) == 10000
    summary = runs["criteo_out"]
    assert "train: 8,000 rows" in summary and "test: 2,000 rows" in summary and "rows/s" in summary
    assert f"C1 25/{embedding_width(25)}" in summary


def test_criteo_vocabulary_ids_match_pandas(runs: dict) -> None:
    """Ids: 0 = unseen in train, 1..V = the train values (a missing cell is the value ''); cardinality V + 1."""
    spec, root = runs["criteo"], runs["root"]
    raw_train, raw_test = raw_criteo(root / "criteo_train.tsv"), raw_criteo(root / "criteo_test.tsv")
    train, test = read(spec, "train"), read(spec, "test")
    for name in D.CRITEO_CATS:
        seen = set(raw_train[name])
        assert spec.cardinality(name) == len(seen) + 1, name
        assert spec.feature_spec[name]["embedding_dim"] == embedding_width(len(seen) + 1)
        assert sorted(train[name].unique()) == list(range(1, len(seen) + 1)), name  # every id, none is 0
        pairs = pd.concat([pd.DataFrame({"raw": raw_train[name], "id": train[name]}),
                           pd.DataFrame({"raw": raw_test[name], "id": test[name]})]).drop_duplicates()
        unseen = ~pairs["raw"].isin(seen)
        assert (pairs.loc[unseen, "id"] == 0).all(), name
        known = pairs[~unseen]
        assert known["raw"].is_unique and known["id"].is_unique, name  # one id per value, both splits
    assert 0 < (test["C4"] == 0).sum() == (~raw_test["C4"].isin(set(raw_train["C4"]))).sum()  # unseen -> 0


def test_criteo_numericals_match_numpy(runs: dict) -> None:
    """log(1 + max(x, 0)) iff the train minimum is >= 0 (every column but I2), missing -> 0, then train z-score."""
    spec, root = runs["criteo"], runs["root"]
    raw = {m: raw_criteo(root / f"criteo_{m}.tsv") for m in ("train", "test")}
    out = {m: read(spec, m) for m in ("train", "test")}
    saved = json.loads((root / "criteo" / "prep.json").read_text())
    assert saved["log_columns"] == [n for n in D.CRITEO_INTS if n != "I2"]
    for name in D.CRITEO_INTS:
        x = {m: pd.to_numeric(raw[m][name].replace("", np.nan)).fillna(0).to_numpy(np.float64) for m in raw}
        assert (x["train"].min() < 0) == (name == "I2")
        if name != "I2":
            x = {m: np.log1p(np.maximum(v, 0)) for m, v in x.items()}
        mean, std = x["train"].mean(), x["train"].std(ddof=1)
        for m in raw:
            np.testing.assert_allclose(out[m][name], (x[m] - mean) / std, atol=2e-5, err_msg=f"{m} {name}")
    assert (out["train"]["I2"] < 0).any() and np.isfinite(out["test"].to_numpy()).all()
    np.testing.assert_array_equal(out["test"]["label"], raw["test"]["label"].astype(np.float32))


def test_criteo_trains_above_floor(runs: dict) -> None:
    """Floor: the best one-column train-CTR lookup's AUC and the Bayes AUC - 0.1, whichever is higher."""
    root = runs["root"]
    raw_train, raw_test = raw_criteo(root / "criteo_train.tsv"), raw_criteo(root / "criteo_test.tsv")
    bayes = D.auc(runs["p_test"], raw_test["label"].astype(int).to_numpy())
    single = best_single_column_auc(raw_train, raw_test, "label", D.CRITEO_INTS + D.CRITEO_CATS)
    history = pd.read_csv(root / "run_criteo" / "res" / "history.csv")
    got = history["auc_roc"].iloc[-1]
    print(f"\ncriteo: AUC {got:.4f}, Bayes {bayes:.4f}, best single column {single:.4f}")
    assert 0.75 < bayes < 0.87 and single < bayes - 0.08
    assert max(single, bayes - 0.1) < got < bayes + 0.01


def test_apply_reproduces_training_transform(runs: dict, tmp_path: Path) -> None:
    root, spec = runs["root"], runs["criteo"]
    for mapping in ("train", "test"):
        rc, out, err = run_prep("--apply", str(root / "criteo"), "--input", str(root / f"criteo_{mapping}.tsv"),
                                "--output", str(tmp_path / mapping), "--quiet")
        assert rc == 0, err
        applied = FeatureSpec.from_yaml(tmp_path / mapping / "feature_spec.yaml")
        assert applied.files("train") == [p.resolve() for p in spec.files("train")]
        assert len(applied.files("test")) == len(spec.files(mapping))
        got = pa.concat_tables([pq.read_table(p) for p in applied.files("test")])
        want = pa.concat_tables([pq.read_table(p) for p in spec.files(mapping)])
        assert got.schema.equals(want.schema) and got.equals(want), mapping  # row by row, bit for bit


def test_apply_serving_rows_without_label(runs: dict, tmp_path: Path) -> None:
    raw = raw_criteo(runs["root"] / "criteo_test.tsv").head(50)
    raw.loc[0, "C1"], raw.loc[0, "I2"] = "deadbeef", "-40"  # a value never seen in training; a low I2
    raw.drop(columns="label").to_csv(tmp_path / "serve.tsv", sep="\t", header=False, index=False)
    names = ",".join(D.CRITEO_NAMES[1:])
    rc, out, err = run_prep("--apply", str(runs["root"] / "criteo"), "--input", str(tmp_path / "serve.tsv"),
                            "--names", names, "--output", str(tmp_path / "served"), "--quiet")
    assert rc == 0, err
    assert "input: 50 rows" in out and not (tmp_path / "served" / "feature_spec.yaml").exists()
    served = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "served").glob("part_*.parquet"))])
    test = read(runs["criteo"], "test").head(50)
    assert list(served.columns) == D.CRITEO_CATS + D.CRITEO_INTS
    assert served["C1"].iloc[0] == 0 and served["I2"].iloc[0] < test["I2"].min()  # I2: normalised, not clipped
    pd.testing.assert_frame_equal(served.iloc[1:].reset_index(drop=True),
                                  test.iloc[1:].drop(columns="label").reset_index(drop=True))


def test_avazu_split_groups_sort_and_multihot(runs: dict) -> None:
    spec, root = runs["avazu"], runs["root"]
    raw = pd.read_csv(root / "avazu.csv", dtype=str, keep_default_na=False)
    train, test = read(spec, "train"), read(spec, "test")
    spec.validate(world_size=2)
    assert spec.map_feature == "display" and spec.multihot == ["tags"] and spec.max_hotness("tags") == 3
    # split by hour: test = the rows whose hour hashes below 0.25 (whole hours, so whole displays)
    in_test = uniform_hash(np.asarray(raw["hour"], dtype=object), 0) < 0.25
    assert len(test) == in_test.sum() and len(train) == (~in_test).sum()
    assert set(test["display"]) == set(raw.loc[in_test, "display"].astype(int))
    assert (test["hour"] == 0).all() and (train["hour"] > 0).all()  # test hours are unseen in train
    # test sorted by display across files, a display never in two files, groups whole and in input order
    ids = [pq.read_table(p).column("display").to_numpy() for p in spec.files("test")]
    assert len(ids) >= 2 and all(len(i) for i in ids)
    assert (np.diff(np.concatenate(ids)) >= 0).all() and all(a[-1] < b[0] for a, b in zip(ids, ids[1:], strict=False))
    raw_test = raw[in_test].assign(d=lambda f: f["display"].astype(int)).sort_values("d", kind="stable")
    np.testing.assert_array_equal(test["click"], raw_test["click"].astype(np.float32))
    # multi-hot: the '|' items of each cell, '' -> [], ids consistent with the train vocabulary
    assert pq.read_schema(spec.files("test")[0]).field("tags").type == pa.list_(pa.int32())
    items = raw_test["tags"].map(lambda s: [t for t in s.split("|") if t])
    np.testing.assert_array_equal(test["tags"].map(len), items.map(len))
    vocab = sorted({t for s in raw.loc[~in_test, "tags"] for t in s.split("|") if t})
    assert spec.cardinality("tags") == len(vocab) + 1 == 13
    pairs = {(t, int(i)) for ts, ids_ in zip(items, test["tags"], strict=True) for t, i in zip(ts, ids_, strict=True)}
    assert len(pairs) == len({t for t, _ in pairs}) == len({i for _, i in pairs})  # one id per tag
    assert all(i > 0 for _, i in pairs)


def test_avazu_trains_with_map(runs: dict) -> None:
    root = runs["root"]
    raw = pd.read_csv(root / "avazu.csv", dtype=str, keep_default_na=False)
    in_test = uniform_hash(np.asarray(raw["hour"], dtype=object), 0) < 0.25
    y = raw["click"].astype(int).to_numpy()
    bayes = D.auc(runs["p_avazu"][in_test], y[in_test])
    single = best_single_column_auc(raw[~in_test], raw[in_test], "click", AVAZU_CATS + ["tags"])
    history = pd.read_csv(root / "run_avazu" / "res" / "history.csv")
    got = history["auc_roc"].iloc[-1]
    print(f"\navazu: AUC {got:.4f}, Bayes {bayes:.4f}, best single column {single:.4f}, "
          f"MAP@12 {history['streaming_map_val'].iloc[-1]:.4f}")
    assert max(single, bayes - 0.1) < got < bayes + 0.01
    groups = raw.loc[in_test, "display"].nunique()
    last = history.iloc[-1]
    assert last["map_groups"] + last["map_skipped_no_click"] + last["map_skipped_multi_click"] == groups


def test_vocabulary_threshold_cap_and_hashing(tmp_path: Path) -> None:
    """Hand-worked: train values a x5, b x3, c x1, '' x1; test adds the unseen value z."""
    values = ["a"] * 5 + ["b"] * 3 + ["c", ""]
    pd.DataFrame({"y": [0, 1] * 5, "k": values, "h": values}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"y": [0, 1, 0, 1, 1], "k": ["a", "b", "c", "", "z"], "h": ["a", "b", "c", "", "z"]}).to_csv(
        tmp_path / "test.csv", index=False)
    base = ["--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv"), "--label", "y",
            "--categorical", "k,h", "--hash_buckets", "h=7", "--rows_per_part", "3", "--quiet"]
    cases = {"threshold": (["--freq_threshold", "2"], 3), "cap": (["--max_vocab", "2"], 2), "all": ([], 5)}
    for case, (flags, card) in cases.items():
        rc, _, err = run_prep(*base, *flags, "--output", str(tmp_path / case))
        assert rc == 0, err
        spec = FeatureSpec.from_yaml(tmp_path / case / "feature_spec.yaml")
        assert spec.cardinality("k") == card and spec.cardinality("h") == 7, case
        train, test = read(spec, "train"), read(spec, "test")
        if case == "threshold":  # a (5), b (3) kept, most frequent first; c, '' (1 each) rare -> 0
            assert train["k"].tolist() == [1] * 5 + [2] * 3 + [0, 0] and test["k"].tolist() == [1, 2, 0, 0, 0]
        elif case == "cap":  # 2 table rows: 0 and the commonest value
            assert train["k"].tolist() == [1] * 5 + [0] * 5 and test["k"].tolist() == [1, 0, 0, 0, 0]
        else:  # a, b, then c and '' (tied: either order); the unseen z -> 0
            assert train["k"].tolist()[:8] == [1] * 5 + [2] * 3 and sorted(train["k"][8:]) == [3, 4]
            assert test["k"].tolist() == [*train["k"][[0, 5, 8, 9]], 0]
        assert train["h"].between(0, 6).all() and train["h"].nunique() > 1
        assert test["h"].tolist()[:4] == train["h"][[0, 5, 8, 9]].tolist()  # same value -> same bucket


def _tiny_criteo(path: Path, rows: int = 20, edit: dict | None = None) -> None:
    lines, _ = D.criteo_rows(rows, seed=5)
    for (row, col), value in (edit or {}).items():
        lines[row][D.CRITEO_NAMES.index(col)] = value
    path.write_text("".join("\t".join(r) + "\n" for r in lines))


BAD_INPUTS = {
    # case: (file edits, extra or replacement flags, expected message fragments)
    "label_not_01": ({(2, "label"): "2"}, [], ["train.tsv: column 'label': line 3: label '2' is not 0 or 1"]),
    "label_missing": ({(4, "label"): ""}, [], ["train.tsv: column 'label': line 5: label is missing"]),
    "not_a_number": ({(6, "I3"): "12x"}, [], ["train.tsv: column 'I3': line 7: value '12x' is not a number"]),
    "infinite": ({(1, "I4"): "inf"}, [], ["column 'I4': line 2: value 'inf' is not a finite number"]),
    "all_null": ({(i, "I6"): "" for i in range(20)}, [], ["train.tsv: column 'I6': every value is missing"]),
    "listed_twice": ({}, ["--categorical", "C1,C2", "--numerical", "I1,C2"],
                     ["column 'C2' is listed twice (--categorical and --numerical)"]),
    "unknown_in_names": ({}, ["--numerical", "I1,I99"], ["column 'I99' (--numerical) is not among --names"]),
    "unknown_in_header": ({}, ["--no_header_off"], ["test.csv: column 'C99': not found in the file"]),
    "bad_field_count": ({(3, "C26"): "ab\tcd"}, [], ["train.tsv: malformed TSV", "Expected 40 columns, got 41"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, case: str) -> None:
    edits, flags, fragments = BAD_INPUTS[case]
    _tiny_criteo(tmp_path / "train.tsv", edit=edits)
    _tiny_criteo(tmp_path / "test.tsv")
    argv = ["--train", str(tmp_path / "train.tsv"), "--test", str(tmp_path / "test.tsv"), "--no_header",
            "--names", NAMES, "--label", "label", "--categorical", "C1,C2", "--numerical", "I1,I2,I3,I4,I6"]
    if flags == ["--no_header_off"]:  # a header file that lacks a listed column
        raw_criteo(tmp_path / "test.tsv").to_csv(tmp_path / "test.csv", index=False)
        argv = ["--train", str(tmp_path / "test.csv"), "--test_fraction", "0.5", "--label", "label",
                "--categorical", "C1,C99"]
    else:
        for flag in flags[::2]:
            i = argv.index(flag)
            del argv[i:i + 2]
        argv += flags
    out_dir = tmp_path / "out"
    rc, out, err = run_prep(*argv, "--output", str(out_dir), "--quiet")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wd-sok-prep: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out_dir.exists() and not list(tmp_path.glob(".out*"))  # no output, no temporary folder


def test_group_split_between_train_and_test_is_refused(tmp_path: Path) -> None:
    D.write_avazu(tmp_path / "a.csv", 400, seed=3, group_size=4)
    frame = pd.read_csv(tmp_path / "a.csv", dtype=str, keep_default_na=False)
    frame["hour"] = frame["hour"].sample(frac=1.0, random_state=0).to_numpy()  # hours no longer hold groups
    frame.to_csv(tmp_path / "a.csv", index=False)
    rc, _, err = run_prep("--train", str(tmp_path / "a.csv"), "--test_fraction", "0.3", "--split_by", "hour",
                          "--map", "display", "--label", "click", "--categorical", "site_id", "--output",
                          str(tmp_path / "out"), "--quiet")
    assert rc == 2 and "column 'display': group" in err and "in both train and test" in err
    assert not (tmp_path / "out").exists()
    rc, _, err = run_prep("--train", str(tmp_path / "a.csv"), "--test_fraction", "0.3", "--map", "display",
                          "--label", "click", "--categorical", "site_id", "--output", str(tmp_path / "out"),
                          "--quiet")  # split_by defaults to the map column
    assert rc == 0, err


def test_module_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "wd_sok.prep", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--apply DIR" in proc.stdout and "--test_fraction" in proc.stdout


def test_parquet_glob_input_equals_tsv_input(tmp_path: Path) -> None:
    """The same rows as one TSV or as a glob of two parquet files (typed numbers, nulls) give the same dataset."""
    _tiny_criteo(tmp_path / "all.tsv", rows=300)
    raw = raw_criteo(tmp_path / "all.tsv")
    typed = raw.copy()
    for name in D.CRITEO_INTS:
        typed[name] = pd.to_numeric(typed[name].replace("", np.nan))
    typed["label"] = typed["label"].astype(np.int64)
    typed["C5"] = typed["C5"].replace("", None)  # a null cell reads as the empty value
    for i, rows in enumerate((slice(0, 120), slice(120, 300))):
        pq.write_table(pa.Table.from_pandas(typed.iloc[rows], preserve_index=False), tmp_path / f"p{i}.parquet")
    common = ["--test_fraction", "0.3", "--label", "label", "--numerical", ",".join(D.CRITEO_INTS),
              "--categorical", ",".join(D.CRITEO_CATS), "--quiet"]
    rc, _, err = run_prep("--train", str(tmp_path / "all.tsv"), "--no_header", "--names", NAMES, *common,
                          "--output", str(tmp_path / "from_tsv"))
    assert rc == 0, err
    rc, _, err = run_prep("--train", str(tmp_path / "p*.parquet"), *common, "--output", str(tmp_path / "from_pq"))
    assert rc == 0, err
    a = FeatureSpec.from_yaml(tmp_path / "from_tsv" / "feature_spec.yaml")
    b = FeatureSpec.from_yaml(tmp_path / "from_pq" / "feature_spec.yaml")
    assert a.feature_spec == b.feature_spec
    for mapping in ("train", "test"):
        pd.testing.assert_frame_equal(read(a, mapping), read(b, mapping))
    assert len(read(a, "test")) == (uniform_hash(np.arange(300), 0) < 0.3).sum()  # row-number split
    typed.loc[7, "label"] = 3
    pq.write_table(pa.Table.from_pandas(typed, preserve_index=False), tmp_path / "bad.parquet")
    rc, _, err = run_prep("--train", str(tmp_path / "bad.parquet"), *common, "--output", str(tmp_path / "bad"))
    assert rc == 2 and "bad.parquet: column 'label': row 7: label 3 is not 0 or 1" in err


def test_existing_output_is_left_alone(tmp_path: Path) -> None:
    _tiny_criteo(tmp_path / "t.tsv", rows=40)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    rc, _, err = run_prep("--train", str(tmp_path / "t.tsv"), "--test_fraction", "0.5", "--no_header", "--names",
                          NAMES, "--label", "label", "--categorical", "C1", "--output", str(tmp_path / "out"))
    assert rc == 2 and "output exists" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_readme_commands_use_real_flags() -> None:
    """The 'Bring your own data' commands parse with wd-sok-prep's and main.py's own parsers."""
    from wd_sok.config import parse_config
    from wd_sok.prep.cli import parser

    text = (ROOT / "README.md").read_text().split("## Bring your own data", 1)[1].split("\n## ", 1)[0]
    block = text.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    block = block.replace("$NAMES", NAMES).replace("$(seq -s, -f I%g 1 13)", ",".join(D.CRITEO_INTS))
    block = block.replace("$(seq -s, -f C%g 1 26)", ",".join(D.CRITEO_CATS))
    commands = [line.split() for line in block.splitlines() if line.strip() and not line.startswith(("#", "NAMES"))]
    preps = [c[3:] for c in commands if c[1:3] == ["-m", "wd_sok.prep"]]
    trains = [c[2:] for c in commands if c[1] == "main.py"]
    assert len(preps) == 2 and len(trains) == 1
    for argv in preps:
        args = parser().parse_args(argv)  # exits (SystemExit) on an unknown flag
        assert args.output
    assert parse_config(trains[0]).disable_map_calculation

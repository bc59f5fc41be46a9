"""Tests of the CSV -> parquet transcoder (wd_sok.tools.transcode)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from wd_sok.feature_spec import FeatureSpec
from wd_sok.tools.generate import generate
from wd_sok.tools.transcode import TranscodeError, main, transcode

SPEC_DIR = Path(__file__).resolve().parent / "feature_specs"


def read(spec_path: Path, mapping: str) -> list[pa.Table]:
    spec = FeatureSpec.from_yaml(spec_path)
    return [pq.read_table(p) for p in spec.files(mapping)]


@pytest.fixture(scope="module", params=["baseline", "less_numerical", "more_multihot_moreless_hotness"])
def roundtrip(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder generated as parquet, folder generated as csv then transcoded with 128-row parts)."""
    root = tmp_path_factory.mktemp(request.param)
    spec = FeatureSpec.from_yaml(SPEC_DIR / f"{request.param}.yaml")
    generate(spec, root / "parquet", 600, 300, train_files=3, test_files=2, seed=4)
    generate(spec, root / "csv", 600, 300, train_files=3, test_files=2, seed=4, file_format="csv")
    transcode(root / "csv" / "feature_spec.yaml", root / "transcoded", chunk_size=128)
    return root / "parquet", root / "transcoded"


@pytest.mark.parametrize("mapping", ["train", "test"])
def test_transcoded_rows_equal_generated_rows(roundtrip: tuple[Path, Path], mapping: str) -> None:
    direct, transcoded = roundtrip
    expected = pa.concat_tables(read(direct / "feature_spec.yaml", mapping))
    got = pa.concat_tables(read(transcoded / "feature_spec.yaml", mapping))
    assert got.schema == expected.schema                  # names, order, dtypes (list<int32> stays integer)
    for name in expected.column_names:
        want, have = expected.column(name).combine_chunks(), got.column(name).combine_chunks()
        if pa.types.is_list(want.type):
            assert have.to_pylist() == want.to_pylist(), name
        else:
            assert np.array_equal(have.to_numpy(), want.to_numpy()), name    # float32 exact


def test_transcoded_parts_and_spec(roundtrip: tuple[Path, Path]) -> None:
    direct, transcoded = roundtrip
    spec = FeatureSpec.from_yaml(transcoded / "feature_spec.yaml")       # parquet chunks validate
    source = FeatureSpec.from_yaml(direct / "feature_spec.yaml")
    assert spec.to_dict()["feature_spec"] == source.to_dict()["feature_spec"]   # explicit dtypes, dims kept
    train = read(transcoded / "feature_spec.yaml", "train")
    assert [t.num_rows for t in train] == [128] * 4 + [88]
    test = read(transcoded / "feature_spec.yaml", "test")
    assert sum(t.num_rows for t in test) == 300 and all(0 < t.num_rows <= 128 for t in test)
    if spec.map_feature:
        for left, right in zip(test, test[1:], strict=False):           # cut only between groups
            assert left.column("display_id")[-1].as_py() < right.column("display_id")[0].as_py()
    else:
        assert [t.num_rows for t in test] == [128, 128, 44]
    leftovers = [p.name for p in transcoded.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_groups_larger_than_a_part_stay_whole(tmp_path: Path) -> None:
    spec = FeatureSpec.from_yaml(SPEC_DIR / "no_onehot.yaml")
    generate(spec, tmp_path / "csv", 40, 200, train_files=1, test_files=1, seed=1, file_format="csv")
    summary = transcode(tmp_path / "csv" / "feature_spec.yaml", tmp_path / "out", chunk_size=5)
    test = read(tmp_path / "out" / "feature_spec.yaml", "test")
    assert summary["parts"] == {"train": 8, "test": len(test)}
    sizes = [part.num_rows for part in test]
    assert max(sizes) > 5                                                # a group longer than a part
    for part in test:                                                    # ... is a part of its own
        assert part.num_rows <= 5 or len(set(part.column("display_id").to_pylist())) == 1
    for left, right in zip(test, test[1:], strict=False):
        assert left.column("display_id")[-1].as_py() < right.column("display_id")[0].as_py()


# ----------------------------------------------------------------------------- hand-written CSV
TINY = {"channel_spec": {"onehot_categorical": ["item"], "multihot_categorical": ["tags"], "numerical": ["x"],
                         "label": ["y"], "map": ["g"]},
        "feature_spec": {"item": {"cardinality": 5, "embedding_dim": 4},
                         "tags": {"cardinality": 10, "max_hotness": 3, "embedding_dim": 4},
                         "x": {}, "y": {}, "g": {}},
        "source_spec": {"train": [{"type": "csv", "features": ["y", "item", "tags", "x"],
                                   "files": ["train.csv"]}],
                        "test": [{"type": "csv", "features": ["g", "y", "item", "tags", "x"],
                                  "files": ["test.csv"]}]},
        "metadata": {}}
GOOD_TRAIN = [{"y": "1", "item": "4", "tags": "1 2 3", "x": "0.5"},
              {"y": "0", "item": "0", "tags": "[7, 9]", "x": "-1e-3"},
              {"y": "0", "item": " 2 ", "tags": "", "x": "3"}]
GOOD_TEST = [{"g": "3", "y": "0", "item": "1", "tags": "9", "x": "1.25"},
             {"g": "3", "y": "1", "item": "2", "tags": "0 0", "x": "-2"},
             {"g": "8", "y": "1", "item": "3", "tags": "5", "x": "0"}]


def write_tiny(folder: Path, train: list[dict], test: list[dict], spec: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("test.csv", test)):
        with open(folder / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (folder / "feature_spec.yaml").write_text(yaml.safe_dump(spec or TINY, sort_keys=False))
    return folder / "feature_spec.yaml"


def test_tiny_dataset_values(tmp_path: Path) -> None:
    summary = transcode(write_tiny(tmp_path / "in", GOOD_TRAIN, GOOD_TEST), tmp_path / "out")
    assert summary["rows"] == {"train": 3, "test": 3} and summary["parts"] == {"train": 1, "test": 1}
    train = read(tmp_path / "out" / "feature_spec.yaml", "train")[0]
    assert train.column("tags").type == pa.list_(pa.int32())
    assert train.to_pydict() == {"y": [1.0, 0.0, 0.0], "item": [4, 0, 2], "tags": [[1, 2, 3], [7, 9], []],
                                 "x": [0.5, pytest.approx(-1e-3), 3.0]}
    test = read(tmp_path / "out" / "feature_spec.yaml", "test")[0]
    assert test.schema.field("g").type == pa.int64() and test.column("g").to_pylist() == [3, 3, 8]
    assert test.column("tags").to_pylist() == [[9], [0, 0], [5]]


def test_chunks_are_joined_by_row(tmp_path: Path) -> None:
    spec = yaml.safe_load(yaml.safe_dump(TINY))
    spec["source_spec"]["train"] = [{"type": "csv", "features": ["y", "item"], "files": ["train.csv"]},
                                    {"type": "csv", "features": ["tags", "x"], "files": ["extra.csv"]}]
    first = [{k: r[k] for k in ("y", "item")} for r in GOOD_TRAIN]
    path = write_tiny(tmp_path / "in", first, GOOD_TEST, spec)
    with open(tmp_path / "in" / "extra.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["x", "tags"])
        writer.writeheader()
        writer.writerows({"x": r["x"], "tags": r["tags"]} for r in GOOD_TRAIN)
    transcode(path, tmp_path / "out")
    train = read(tmp_path / "out" / "feature_spec.yaml", "train")[0]
    assert train.column_names == ["y", "item", "tags", "x"]
    assert train.column("tags").to_pylist() == [[1, 2, 3], [7, 9], []]
    with open(tmp_path / "in" / "extra.csv", "a", newline="") as fh:
        fh.write("1.0,4\n")
    with pytest.raises(TranscodeError, match="different row counts"):
        transcode(path, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def bad(rows: list[dict], index: int, **changes: str) -> list[dict]:
    rows = [dict(r) for r in rows]
    rows[index].update(changes)
    return rows


ERRORS = {  # case: (train rows, test rows, file, feature, text that the message must hold)
    "non-integer id": (bad(GOOD_TRAIN, 1, item="1.5"), GOOD_TEST, "train.csv", "item",
                       "'1.5' is not an integer"),
    "word as id": (GOOD_TRAIN, bad(GOOD_TEST, 2, item="abc"), "test.csv", "item", "'abc'"),
    "id beyond cardinality": (bad(GOOD_TRAIN, 0, item="5"), GOOD_TEST, "train.csv", "item",
                              "id 5 is outside [0, 5)"),
    "negative id": (bad(GOOD_TRAIN, 0, item="-1"), GOOD_TEST, "train.csv", "item", "id -1 is outside"),
    "too long multi-hot": (bad(GOOD_TRAIN, 2, tags="1 2 3 4"), GOOD_TEST, "train.csv", "tags",
                           "'1 2 3 4' has 4 ids, more than max_hotness 3"),
    "bad multi-hot id": (bad(GOOD_TRAIN, 0, tags="1 x 3"), GOOD_TEST, "train.csv", "tags", "id 'x'"),
    "multi-hot id beyond cardinality": (GOOD_TRAIN, bad(GOOD_TEST, 1, tags="3 10"), "test.csv", "tags",
                                        "id 10 is outside"),
    "word as number": (bad(GOOD_TRAIN, 1, x="abc"), GOOD_TEST, "train.csv", "x", "'abc' is not a number"),
    "empty number": (bad(GOOD_TRAIN, 1, x=""), GOOD_TEST, "train.csv", "x", "empty value"),
    "infinite number": (bad(GOOD_TRAIN, 1, x="inf"), GOOD_TEST, "train.csv", "x", "'inf' is not a finite"),
    "label out of range": (GOOD_TRAIN, bad(GOOD_TEST, 0, y="2"), "test.csv", "y", "outside [0, 1]"),
    "unsorted map": (GOOD_TRAIN, bad(GOOD_TEST, 2, g="1"), "test.csv", "g", "map id 1 after 3"),
    "missing column": ([{k: v for k, v in r.items() if k != "x"} for r in GOOD_TRAIN], GOOD_TEST, "train.csv",
                       "x", "column missing"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_a_clear_error_and_leaves_nothing(case: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    train, test, file, feature, text = ERRORS[case]
    spec_path = write_tiny(tmp_path / "in", train, test)
    with pytest.raises(TranscodeError) as err:
        transcode(spec_path, tmp_path / "out")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert str(tmp_path / "in" / file) in message and f"feature '{feature}'" in message and text in message
    if case != "missing column":
        assert "line " in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]          # no output, no temporary folder
    assert main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and text in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_cli_success_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny(tmp_path / "in", GOOD_TRAIN, GOOD_TEST)
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert main(args + ["--chunk_size", "2"]) == 0
    assert "3 train rows in 2 parts" in capsys.readouterr().out
    assert main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2   # not empty
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "out"), "--output", str(tmp_path / "again")]) == 2  # parquet input
    assert "reads csv" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()

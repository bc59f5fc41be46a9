"""Transcoder with dynamic features: any int64 id, string ids hashed (--hash_ids), one-line errors."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import tiny_spec_dict
from tests.test_transcode import GOOD_TEST, GOOD_TRAIN, TINY, read, write_tiny
from wd_sok.feature_spec import FeatureSpec
from wd_sok.tools.generate import generate
from wd_sok.tools.transcode import TranscodeError, main, transcode


def _dynamic_tiny() -> dict:
    spec = copy.deepcopy(TINY)
    spec["feature_spec"]["item"] = {"dynamic": {"capacity": 4}, "embedding_dim": 4}
    spec["feature_spec"]["tags"] = {"dynamic": {"capacity": 8}, "max_hotness": 3, "embedding_dim": 4}
    return spec


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & (2**63 - 1)


def _rows(items: list[str], tags: list[str]) -> list[dict]:
    return [dict(r, item=i, tags=t) for r, i, t in zip(GOOD_TRAIN, items, tags, strict=True)]


def test_any_int64_id_is_kept(tmp_path: Path) -> None:
    train = _rows(["-5", "9223372036854775807", " 4611686018427387904 "], ["-9223372036854775808 7", "", "12"])
    transcode(write_tiny(tmp_path / "in", train, GOOD_TEST, _dynamic_tiny()), tmp_path / "out")
    table = read(tmp_path / "out" / "feature_spec.yaml", "train")[0]
    assert table.schema.field("item").type == pa.int64() and table.schema.field("tags").type == pa.list_(pa.int64())
    assert table.column("item").to_pylist() == [-5, 2**63 - 1, 2**62]
    assert table.column("tags").to_pylist() == [[-(2**63), 7], [], [12]]
    spec = FeatureSpec.from_yaml(tmp_path / "out" / "feature_spec.yaml")
    assert spec.dynamic_features == ["item", "tags"] and spec.cardinality("tags") == 8


def test_string_ids_are_hashed(tmp_path: Path) -> None:
    train = _rows(["cb8c55702adb93", " 79a85fa78311b9 ", "123"], ["a b", "", "[x, 5]"])
    path = write_tiny(tmp_path / "in", train, GOOD_TEST, _dynamic_tiny())
    transcode(path, tmp_path / "out", hash_ids=["item", "tags"])
    table = read(tmp_path / "out" / "feature_spec.yaml", "train")[0]
    assert table.column("item").to_pylist() == [6512941317229499102, _h("79a85fa78311b9"), _h("123")]
    assert table.column("tags").to_pylist() == [[_h("a"), _h("b")], [], [_h("x"), _h("5")]]
    test = read(tmp_path / "out" / "feature_spec.yaml", "test")[0]
    assert test.column("item").to_pylist() == [_h(r["item"]) for r in GOOD_TEST]
    assert main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "cli"), "--hash_ids", "item,tags"]) == 0
    assert read(tmp_path / "cli" / "feature_spec.yaml", "train")[0].equals(table)


@pytest.mark.parametrize(("items", "hash_ids", "message"), [
    (["1", "ab12", "3"], (), r"train.csv: feature 'item': line 3: value 'ab12' is not an integer \(string ids "
                             r"of dynamic feature 'item': pass --hash_ids item\)"),
    (["1", "9223372036854775808", "3"], (), r"train.csv: feature 'item': line 3: value '9223372036854775808' "
                                            r"does not fit int64"),
    (["1", "u", ""], ("item",), r"train.csv: feature 'item': line 4: empty value"),
    (["1", "2", "3"], ("x",), r"feature 'x': --hash_ids is for dynamic int64 features \(dynamic: item, tags\)"),
])
def test_bad_dynamic_input_is_one_line_and_leaves_nothing(tmp_path: Path, items: list[str], hash_ids: tuple,
                                                          message: str) -> None:
    path = write_tiny(tmp_path / "in", _rows(items, ["1", "", "2"]), GOOD_TEST, _dynamic_tiny())
    with pytest.raises(TranscodeError, match=message) as err:
        transcode(path, tmp_path / "out", hash_ids=hash_ids)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["in"]


def test_fixed_features_keep_the_range_check(tmp_path: Path) -> None:
    path = write_tiny(tmp_path / "in", _rows(["1", "-5", "3"], ["1", "", "2"]), GOOD_TEST)
    with pytest.raises(TranscodeError, match=r"feature 'item': line 3: id -5 is outside \[0, 5\) \(cardinality\)"):
        transcode(path, tmp_path / "out")
    with pytest.raises(TranscodeError, match=r"feature 'item': --hash_ids is for dynamic int64 features"):
        transcode(path, tmp_path / "out", hash_ids=["item"])


def test_generated_csv_with_raw_ids_round_trips(tmp_path: Path) -> None:
    spec = FeatureSpec.from_dict(tiny_spec_dict(n_train_files=1, n_test_files=1), allow_csv=True)
    generate(spec, tmp_path / "pq", 200, 100, train_files=1, test_files=1, seed=3, dynamic=["a", "m"])
    generate(spec, tmp_path / "csv", 200, 100, train_files=1, test_files=1, seed=3, dynamic=["a", "m"],
             file_format="csv")
    transcode(tmp_path / "csv" / "feature_spec.yaml", tmp_path / "out")
    for mapping in ("train", "test"):
        want = read(tmp_path / "pq" / "feature_spec.yaml", mapping)[0]
        got = read(tmp_path / "out" / "feature_spec.yaml", mapping)[0]
        assert got.schema == want.schema and got.column("a").to_pylist() == want.column("a").to_pylist()
        assert got.column("m").to_pylist() == want.column("m").to_pylist()
        assert np.asarray(want.column("a")).max() > 2**40  # raw ids, far beyond any cardinality

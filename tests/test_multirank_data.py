"""Multi-rank data: rows balanced over ranks for any file count, display groups whole on one rank, the map-id
order checked at start-up, validation verdicts cached (issue 12, items 2, 3, 5). All under horovodrun (Gloo).

Data: tests/dist/common.py's dataset (6 x 400 training rows, 3 test files of 150 / 210 / 96 rows in display
groups of 2-4 with one click each), rearranged per test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.dist import common

LIMIT = 240
METRICS = ("loss_val", "auc_roc", "streaming_map_val")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return common.make_dataset(tmp_path_factory.mktemp("dist_data"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".wd_sok_cache"))
    return dst


def _set_files(root: Path, mapping: str, files: list[str]) -> None:
    spec = yaml.safe_load((root / "feature_spec.yaml").read_text())
    spec["source_spec"][mapping][0]["files"] = files
    (root / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _log_params(results: Path) -> dict:
    for line in (results / "log.json").read_text().splitlines():
        rec = json.loads(line.removeprefix("DLLL "))
        if rec.get("step") == "PARAMETER":
            return rec["data"]
    raise AssertionError("no PARAMETER record")


# ---------------------------------------------------------------- item 2: rows balanced over ranks
def test_rows_balanced_with_fewer_files_than_ranks(data: Path, tmp_path: Path) -> None:
    """-np 3 over 2 training files of 1,200 and 400 rows: each rank reads 533 or 534 rows (T // N or T // N + 1)
    per epoch, every row exactly once, in an order that is a function of (seed, epoch); with drop_last each
    rank yields 533 // 16 = 33 batches, so 1,600 - 3 * 33 * 16 = 16 rows (< one global batch of 48) are left
    out. Rank r used to read whole files r, r + N, ...: 2 files for 3 ranks was refused."""
    root = _copy(data, tmp_path / "d")
    frames = [pd.read_parquet(root / f"train/part_{i}.parquet") for i in range(4)]
    pd.concat(frames[:3], ignore_index=True).to_parquet(root / "train/big.parquet")
    frames[3].to_parquet(root / "train/small.parquet")
    _set_files(root, "train", ["train/big.parquet", "train/small.parquet"])
    want = sorted(float(v) for f in frames for v in f["x1"].astype("float32"))
    assert len(set(want)) == 1600
    out = tmp_path / "balance.json"
    common.check(common.launch(3, ["tests/dist/balance.py", "--data", str(root), "--out", str(out)], LIMIT))
    ranks = json.loads(out.read_text())["per_rank"]
    assert [r["total"] for r in ranks] == [1600] * 3
    assert [len(r["epoch0"]) for r in ranks] == [533, 533, 534]
    for epoch in ("epoch0", "epoch1"):
        assert sorted(v for r in ranks for v in r[epoch]) == want, epoch  # every row once
    assert all(r["again0"] == r["epoch0"] for r in ranks)  # a pure function of (seed, epoch)
    assert any(r["epoch1"] != r["epoch0"] for r in ranks)
    assert [r["len_dropped"] for r in ranks] == [33] * 3
    assert [len(r["dropped0"]) for r in ranks] == [33 * 16] * 3
    assert all(r["dropped0"] == r["epoch0"][:33 * 16] for r in ranks)


def test_three_equal_files_on_two_ranks_use_every_row(data: Path, tmp_path: Path) -> None:
    """The issue's example: 3 equal files (400 rows) on 2 ranks at global batch 48 trained 16 steps (768 of
    1,200 rows) per epoch; balanced by rows it is 1,200 // 2 // 24 = 25 steps, all 1,200 rows, logged."""
    root = _copy(data, tmp_path / "d")
    _set_files(root, "train", [f"train/part_{i}.parquet" for i in range(3)])
    out = common.check(common.launch(2, common.main_args(root, tmp_path / "run", "--max_steps", "1"), LIMIT))
    params = _log_params(tmp_path / "run/results")
    assert params["steps_per_epoch"] == 25 and params["train_rows_per_epoch"] == 1200, params
    assert "25 steps/epoch of 48 samples: 1,200 of 1,200 training rows per epoch" in out


# ---------------------------------------------------------------- item 3: display groups
def _straddling(data: Path, root: Path) -> tuple[Path, int]:
    """The test rows re-split into 3 files cut in the middle of display groups; returns (root, groups)."""
    root = _copy(data, root)
    files = sorted((root / "test").glob("part_*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    starts = df.index[df.d != df.d.shift()].tolist()
    cuts = [starts[40] + 1, starts[90] + 1]  # one row into a group: the group straddles two files
    assert df.d[cuts[0] - 1] == df.d[cuts[0]] and df.d[cuts[1] - 1] == df.d[cuts[1]]
    for f in files:
        f.unlink()
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(df)], strict=True)):
        df.iloc[a:b].to_parquet(root / f"test/part_{i}.parquet")
    return root, int(df.d.nunique())


@pytest.fixture(scope="module")
def straddling(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, dict]:
    """The straddling data and its metrics evaluated by one replicated process (the untouched reference)."""
    root, groups = _straddling(data, tmp_path_factory.mktemp("straddle") / "d")
    run = tmp_path_factory.mktemp("straddle_ref")
    common.check(common.launch(1, common.main_args(root, run, "--evaluate", "--embedding_backend", "replicated"),
                               LIMIT))
    return root, groups, common.final_metrics(run / "results")


@pytest.mark.parametrize("ranks", [2, 3])
def test_display_groups_cut_between_files_stay_on_one_rank(straddling: tuple[Path, int, dict], tmp_path: Path,
                                                         ranks: int) -> None:
    """Groups cut between test files (and rank cuts that fall inside a group) are evaluated whole: the same
    group count with none skipped, and the same BCE / AUC / MAP@12 as one process (1e-6; same initial
    weights on any number of ranks). File-per-rank sharding split 2 groups: each counted twice, the half
    without the click skipped as 'no click', the other half ranked against fewer ads."""
    root, groups, want = straddling
    common.check(common.launch(ranks, common.main_args(root, tmp_path, "--evaluate"), LIMIT))
    got = common.final_metrics(tmp_path / "results")
    assert got["map_groups"] == want["map_groups"] == groups, (got, groups)
    assert got["map_skipped_no_click"] == got["map_skipped_multi_click"] == 0, got
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got, want)


def test_unsorted_test_mapping_refused_at_startup(data: Path, tmp_path: Path) -> None:
    """Test files listed out of map-id order: refused before training (it used to fail after an epoch), one
    line naming both files and the group, exit 2 on every rank."""
    root = _copy(data, tmp_path / "d")
    _set_files(root, "test", ["test/part_1.parquet", "test/part_0.parquet", "test/part_2.parquet"])
    first = pd.read_parquet(root / "test/part_0.parquet").d.min()
    res = common.launch(2, common.main_args(root, tmp_path / "run"), LIMIT)
    assert res.returncode != 0
    lines = [ln for ln in res.stdout.splitlines() if "wd-sok: error" in ln]
    assert len(lines) == 1, res.stdout[-3000:]
    assert "test/part_0.parquet" in lines[0] and "after" in lines[0] and "test/part_1.parquet" in lines[0]
    assert f"group {first} " in lines[0] and "not sorted by map id" in lines[0], lines[0]
    assert "epoch 0 step" not in res.stdout and "Traceback" not in res.stdout.split("Process ")[0]
    assert "exit with status code 2" in res.stdout


# ---------------------------------------------------------------- item 5: verdict cache
def test_verdicts_cached_beside_the_data_and_invalidated_by_a_change(data: Path, tmp_path: Path) -> None:
    """-np 2 --evaluate checks all 9 files (each rank its share) and records 9 verdicts in
    <dataset>/.wd_sok_cache; an edited file gets a new key and is checked again (its bad id is caught)."""
    root = _copy(data, tmp_path / "d")
    common.check(common.launch(2, common.main_args(root, tmp_path / "a", "--evaluate"), LIMIT))
    verdicts = sorted((root / ".wd_sok_cache/verdicts").glob("*.json"))
    assert len(verdicts) == 9
    assert {json.loads(v.read_text())["path"] for v in verdicts} == {str(p) for p in root.rglob("part_*.parquet")}
    df = pd.read_parquet(root / "train/part_4.parquet")
    df.loc[17, "a"] = 7  # cardinality 7
    df.to_parquet(root / "train/part_4.parquet")
    res = common.launch(2, common.main_args(root, tmp_path / "b", "--evaluate"), LIMIT)
    assert res.returncode != 0
    assert "train/part_4.parquet: feature 'a': id outside [0, 7) (row 17: 7)" in res.stdout, res.stdout[-3000:]
    assert len(list((root / ".wd_sok_cache/verdicts").glob("*.json"))) == 9  # the failed run wrote nothing

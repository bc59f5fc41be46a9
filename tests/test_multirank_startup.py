"""Start-up failures under ``horovodrun -np 2``: all ranks agree (issue 12, items 4 and 6).

A bad value in a file that only rank 1 validates (rank r checks files r, r + N, ...) used to make rank 1 print
the error and exit while rank 0 sat in a collective and died with a Horovod traceback. Now every rank runs its
local checks, all agree in one collective, and all exit 2; rank 0 prints the one-line message once.
horovodrun still reports the exit codes and raises its own RuntimeError (that part is the launcher's).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import null_inside_list
from tests.dist import common

LIMIT = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return common.make_dataset(tmp_path_factory.mktemp("dist_data"))


def _rank_lines(out: str, rank: int) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(f"[{rank}]<")]


def test_bad_value_seen_by_one_rank_stops_every_rank_cleanly(data: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    shutil.copytree(data, root)
    bad = null_inside_list(root / "train/part_3.parquet", "n", 12)  # part_3: validated by rank 1 of 2
    res = common.launch(2, common.main_args(root, tmp_path / "run"), LIMIT)
    out = res.stdout
    errors = [ln for ln in out.splitlines() if "wd-sok: error" in ln]
    want = f"train/part_3.parquet: feature 'n': missing id inside a list (row 12: {bad!r})"
    assert len(errors) == 1 and want in errors[0], out[-4000:]
    assert errors[0].startswith("[0]<stderr>:"), errors  # printed by rank 0, naming the failing rank
    assert "(rank 1)" in errors[0]
    statuses = re.findall(r"Process (\d) exit with status code (\d+)", out)
    assert sorted(statuses) == [("0", "2"), ("1", "2")], (statuses, out[-3000:])
    for rank in (0, 1):  # no Python traceback, no Horovod error from either rank
        lines = "\n".join(_rank_lines(out, rank))
        assert "Traceback" not in lines and "HorovodInternalError" not in lines, lines[-3000:]
    assert not (tmp_path / "run/ckpt").exists() or not any((tmp_path / "run/ckpt").iterdir())
    assert not (tmp_path / "run/results/log.json").exists()


def test_unwritable_model_dir_on_rank_0_stops_rank_1_too(data: Path, tmp_path: Path) -> None:
    """Only rank 0 checks the output folders: rank 1 must not go on into the first collective alone."""
    args = common.main_args(data, tmp_path / "run")
    args[args.index("--model_dir") + 1] = "/proc/wd_sok_cannot_write_here"
    res = common.launch(2, args, LIMIT)
    errors = [ln for ln in res.stdout.splitlines() if "wd-sok: error" in ln]
    assert len(errors) == 1 and "--model_dir /proc/wd_sok_cannot_write_here is not writable" in errors[0], \
        res.stdout[-3000:]
    assert sorted(re.findall(r"Process (\d) exit with status code (\d+)", res.stdout)) == [("0", "2"), ("1", "2")]
    assert "Traceback" not in "\n".join(_rank_lines(res.stdout, 1))

"""Dynamic tables over several processes (horovodrun --gloo): the exchange against a one-process oracle, and
checkpoints saved under N ranks restored under M ranks (and another backend), row by row, against an
independent numpy read of the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist import common

LIMIT = 240


def _need_horovod() -> None:
    if not common.horovodrun():
        pytest.fail("horovodrun not found: install Horovod with Gloo (scripts/setup_env.sh)")


def test_exchange_matches_one_process_oracle(tmp_path: Path) -> None:
    _need_horovod()
    out = tmp_path / "exchange.json"
    common.check(common.launch(2, ["tests/dist/dynamic_exchange.py", "--out", str(out)], LIMIT))
    report = json.loads(out.read_text())
    assert [r["failures"] for r in report] == [[], []], report
    assert all(r["keys"]["u"] > 0 and r["keys"]["m"] > 0 for r in report)  # both ranks own keys


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dynamic tables trained (with evictions and pending keys) and saved under 2 ranks."""
    _need_horovod()
    root = tmp_path_factory.mktemp("dynamic_ckpt")
    out = root / "save.json"
    common.check(common.launch(2, ["tests/dist/dynamic_ckpt.py", "--mode", "save", "--model_dir",
                                   str(root / "ckpt"), "--out", str(out)], LIMIT))
    report = json.loads(out.read_text())
    assert [r["failures"] for r in report] == [[], []], report
    evictions = sum(r["counters"][n][2] for r in report for n in ("u", "v"))
    assert evictions > 0, report  # the saved state went through evictions
    return root / "ckpt"


@pytest.mark.parametrize("ranks", [1, 3])
def test_checkpoint_restores_under_other_rank_counts(saved: Path, tmp_path: Path, ranks: int) -> None:
    out = tmp_path / "restore.json"
    common.check(common.launch(ranks, ["tests/dist/dynamic_ckpt.py", "--mode", "restore", "--model_dir",
                                       str(saved), "--out", str(out)], LIMIT))
    report = json.loads(out.read_text())
    assert [r["failures"] for r in report] == [[]] * ranks, report
    rows = [r["rows"]["u"] + r["rows"]["v"] for r in report]
    assert all(n > 0 for n in rows)
    if ranks == 1:  # everything fits one rank: nothing dropped
        assert not any(report[0]["dropped"].values())

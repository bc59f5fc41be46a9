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

"""Deduplicated id exchange of the sharded backend over real Horovod (Gloo) ranks: each distinct id of a
table travels once per (table, owner), counted independently in numpy (tests/dist/dedup.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist import common


def test_exchange_sends_distinct_ids_once(tmp_path: Path, ranks: int = 2) -> None:
    """(One process: tests/test_sharded.py::test_duplicates_travel_once_and_their_gradients_are_summed.)"""
    if not common.horovodrun():
        pytest.fail("horovodrun not found: install Horovod with Gloo (scripts/setup_env.sh)")
    out = tmp_path / "dedup.json"
    common.check(common.launch(ranks, ["tests/dist/dedup.py", "--out", str(out)], 180))
    report = json.loads(out.read_text())
    assert report["ranks"] == ranks and len(report["reports"]) == ranks
    for rep in report["reports"]:
        assert rep["failures"] == [], rep["failures"]
        assert rep["distinct_sent"] < rep["occurrences"] / 2  # Zipf batches: dedup is not vacuous
        assert rep["forward_diff"] <= 1e-6 and rep["grad_diff"] <= 1e-5
    assert all(sum(rep["sent"][1 - rep["rank"]]) > 0 for rep in report["reports"])  # ids crossed ranks

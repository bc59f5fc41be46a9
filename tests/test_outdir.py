"""The atomic output folder shared by the data tools and the export: all or nothing, readable by others."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from wd_sok.tools.outdir import atomic_dir, atomic_output_dir


def test_atomic_dir_replaces_on_success_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not final.exists()  # nothing visible until the block ends
    assert (final / "a.txt").read_text() == "1"
    assert stat.S_IMODE(final.stat().st_mode) == 0o755  # not mkdtemp's 0700
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("half-way")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]  # the old folder untouched
    with atomic_dir(final) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old siblings left


def test_atomic_output_dir_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder"), atomic_output_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "x").read_text() == "keep"
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "y").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["y"]

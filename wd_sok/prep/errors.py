"""The one error type of ``wd-sok-prep``: bad input, reported as one line naming file, column and value."""

from __future__ import annotations

from typing import Any


class PrepError(ValueError):
    """Bad prep input; the message is one line: ``<file>: column '<name>': <line or row>: <problem>``."""


def show(value: Any) -> str:
    """``repr`` of a cell for a message, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def where(path: object, column: str | None = None, line: int | None = None, row: bool = False) -> str:
    """Message prefix ``<path>: column '<c>': line <n>: `` (``row <n>`` for parquet inputs)."""
    parts = [str(path)]
    if column is not None:
        parts.append(f"column '{column}'")
    if line is not None:
        parts.append(f"{'row' if row else 'line'} {line}")
    return ": ".join(parts) + ": "

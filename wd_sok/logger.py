"""A small DLLogger-compatible logger (the ``dllogger`` package is not on PyPI).

File format, one JSON object per line after the prefix ``DLLL `` (as DLLogger's JSONStreamBackend, except
that ``timestamp`` and ``elapsedtime`` are numbers, not strings)::

    DLLL {"timestamp": 1732800000.12, "datetime": "2024-11-28 15:20:00.120000", "elapsedtime": 3.5,
          "type": "LOG", "step": [1, 200], "data": {"loss": 0.4513, "throughput": 18204.3}}
    DLLL {"timestamp": ..., "datetime": ..., "elapsedtime": ..., "type": "METADATA",
          "metric": "throughput", "metadata": {"unit": "samples/s", "format": ":,.0f"}}

``step`` is whatever the caller passes, made JSON-serialisable: ``[epoch, step]``, ``"PARAMETER"`` for the
run configuration, ``[]`` for final results. Values are converted to plain Python (numpy scalars and arrays,
tensors with ``.numpy()``). A readable line also goes to stdout, e.g. ``epoch 1 step 200 | loss 0.4513 |
throughput 18,204 samples/s``, formatted with the ``format`` / ``unit`` registered through
:meth:`Logger.metadata`. Only the process created with ``enabled=True`` (rank 0) writes anything.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON-serialisable Python: numpy scalars/arrays and tensors (anything with
    ``.numpy()``) become Python numbers/lists; dicts, lists and tuples are converted recursively (tuples
    become lists); other unknown objects become ``str(value)``."""
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray | np.generic):
        value = value.numpy()
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def format_step(step: Any) -> str:
    """Readable step: ``[e, s]`` -> ``epoch e step s``, ``[e]`` -> ``epoch e``, ``[]`` -> ``final``, an int
    -> ``step n``, a string as is."""
    step = to_jsonable(step)
    if isinstance(step, list):
        if not step:
            return "final"
        names = ("epoch", "step", "substep")
        return " ".join(f"{names[i] if i < len(names) else ''} {v}".strip() for i, v in enumerate(step))
    if isinstance(step, int):
        return f"step {step}"
    return str(step)


def _format_value(value: Any, fmt: str | None) -> str:
    """One value for stdout: a registered format (``":.4f"`` or ``".4f"``) wins; otherwise ints get digit
    grouping, floats >= 1000 are rounded with grouping, other floats get 4 significant digits."""
    if fmt is not None:
        try:
            return format(value, fmt.lstrip(":"))
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


class Logger:
    """DLLogger-style logger: ``DLLL {json}`` lines to ``path`` and readable lines to ``stream``.

    A record logged with ``verbosity`` v reaches the file if ``v <= file_verbosity`` and stdout if
    ``v <= stdout_verbosity``. The file is opened line-buffered (truncated unless ``append``), its parent
    folder is created, and each line is flushed. With ``enabled=False`` (ranks other than 0) every method is
    a no-op and no file or folder is created. Usable as a context manager.
    """

    def __init__(self, path: str | Path | None, enabled: bool = True, *, append: bool = False,
                 file_verbosity: int = 1, stdout_verbosity: int = 0, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.file_verbosity = file_verbosity
        self.stdout_verbosity = stdout_verbosity
        self._stream = stream
        self._start = time.time()
        self._meta: dict[str, dict[str, Any]] = {}
        self._file: TextIO | None = None
        self.path = Path(path) if path is not None else None
        if enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if append else "w", buffering=1, encoding="utf-8")

    def _write(self, record_type: str, body: dict[str, Any]) -> None:
        now = time.time()
        record = {"timestamp": now, "datetime": str(_dt.datetime.fromtimestamp(now)),
                  "elapsedtime": now - self._start, "type": record_type, **body}
        assert self._file is not None
        self._file.write("DLLL " + json.dumps(record) + "\n")
        self._file.flush()

    def log(self, step: Any, data: dict[str, Any], verbosity: int = 0) -> None:
        """Log ``data`` (metric name -> value) at ``step`` (``[epoch, step]``, ``"PARAMETER"``, ``[]``)."""
        if not self.enabled:
            return
        step_j, data_j = to_jsonable(step), to_jsonable(dict(data))
        if self._file is not None and verbosity <= self.file_verbosity:
            self._write("LOG", {"step": step_j, "data": data_j})
        if verbosity <= self.stdout_verbosity:
            parts = [format_step(step_j)]
            for k, v in data_j.items():
                meta = self._meta.get(k, {})
                unit = meta.get("unit")
                parts.append(f"{k} {_format_value(v, meta.get('format'))}" + (f" {unit}" if unit else ""))
            stream = self._stream or sys.stdout
            stream.write(" | ".join(parts) + "\n")
            stream.flush()

    def metadata(self, name: str, meta: dict[str, Any]) -> None:
        """Describe metric ``name`` (keys as DLLogger: ``unit``, ``format`` like ``":.4f"``, ``GOAL``,
        ``STAGE``); ``unit`` and ``format`` are used for the stdout line. Written to the file as METADATA."""
        if not self.enabled:
            return
        meta_j = to_jsonable(dict(meta))
        self._meta[name] = meta_j
        if self._file is not None:
            self._write("METADATA", {"metric": name, "metadata": meta_j})

    def flush(self) -> None:
        """Flush the file and stdout."""
        if self._file is not None:
            self._file.flush()
        if self.enabled:
            (self._stream or sys.stdout).flush()

    def close(self) -> None:
        """Flush and close the file (further file writes are dropped, stdout keeps working)."""
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

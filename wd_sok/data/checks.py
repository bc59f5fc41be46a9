"""One pass over a rank's parquet files before training: every value the model would choke on is named.

Checks, per file and column (pyarrow compute; no Python loop over rows):
  - categorical ids in [0, cardinality)  (one-hot, and every id inside multi-hot lists); a dynamic feature's
    ids are any int64 (negative included): only integer type, nulls and list lengths are checked;
  - multi-hot lists no longer than max_hotness, and no null inside a list;
  - numerical values finite (NaN, null or inf rejected, unless the run fills them with 0: ``--nan_policy zero``);
  - labels in {0, 1};
  - nulls in any other column;
  - map (display) ids non-decreasing (test mapping with MAP@12: rows of a group are contiguous).
Each failure is a :class:`~wd_sok.feature_spec.SpecError` "<file>: feature '<name>': <what> (row <i>: <value>)".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wd_sok import storage
from wd_sok.feature_spec import FeatureSpec, SpecError

NAN_POLICIES = ("reject", "zero")


def _first(mask: pa.Array | np.ndarray) -> int:
    """Index of the first True of a boolean array."""
    arr = mask.to_numpy(zero_copy_only=False) if isinstance(mask, pa.Array | pa.ChunkedArray) else mask
    return int(np.flatnonzero(arr)[0])


def rules(spec: FeatureSpec, columns: list[str], nan_policy: str) -> dict:
    """What :func:`check_file` checks, as JSON (the verdict cache's key: other rules, other verdicts)."""
    return {"columns": {n: {k: spec.feature_spec[n].get(k) for k in ("dtype", "cardinality", "max_hotness")}
                        | {"dynamic": n in spec.categorical and spec.dynamic(n) is not None} for n in columns},
            "categorical": [n for n in columns if n in spec.categorical], "label": spec.label,
            "numerical": [n for n in columns if n in spec.numerical], "map": spec.map_feature in columns,
            "multihot": [n for n in columns if n in spec.multihot], "nan_policy": nan_policy}


def check_file(path: Path | str, spec: FeatureSpec, columns: list[str], nan_policy: str = "reject") -> None:
    """Raise SpecError at the first bad value in ``path`` (see the module docstring)."""
    table = storage.parquet_file(path).read(columns=columns)
    for name in columns:
        col = table.column(name).combine_chunks()

        def fail(what: str, row: int, value: object, name: str = name) -> SpecError:
            return SpecError(f"{path}: feature '{name}': {what} (row {row}: {value!r})")

        if col.null_count and name not in spec.numerical:  # a numerical null reads as NaN: the NaN policy
            row = _first(col.is_null())
            raise fail("missing value", row, None)
        if name in spec.categorical:
            dynamic = spec.dynamic(name) is not None
            card = spec.cardinality(name)
            if name in spec.multihot:
                lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
                hot = spec.max_hotness(name)
                if lengths.size and lengths.max() > hot:
                    row = _first(lengths > hot)
                    raise fail(f"list longer than max_hotness {hot}", row, col[row].as_py())
                flat = pc.list_flatten(col)
                owner = np.repeat(np.arange(len(col)), lengths)
                if flat.null_count:  # a null id would become NaN, and NaN passes every comparison
                    row = int(owner[_first(flat.is_null())])
                    raise fail("missing id inside a list", row, col[row].as_py())
                values = flat.to_numpy(zero_copy_only=False)
            else:
                values = col.to_numpy(zero_copy_only=False)
                owner = np.arange(len(col))
            if values.dtype.kind not in "iu":
                raise fail(f"ids must be integers, got {values.dtype}", 0, values[:1].tolist())
            if dynamic:
                continue  # any int64 id is valid (the loader checked the column dtype)
            bad = (values < 0) | (values >= card)
            if bad.any():
                i = _first(bad)
                raise fail(f"id outside [0, {card})", int(owner[i]), int(values[i]))
        elif name == spec.map_feature:
            values = col.to_numpy(zero_copy_only=False)
            down = np.flatnonzero(values[1:] < values[:-1])
            if down.size:
                i = int(down[0]) + 1
                raise fail(f"test rows not sorted by map id (after {int(values[i - 1])})", i, int(values[i]))
        elif name in spec.numerical and nan_policy == "reject":
            values = col.to_numpy(zero_copy_only=False)
            bad = ~np.isfinite(values)
            if bad.any():
                i = _first(bad)
                raise fail("not a finite number (use --nan_policy zero to fill with 0)", i, float(values[i]))
        elif name == spec.label:
            values = col.to_numpy(zero_copy_only=False)
            bad = (values != 0) & (values != 1)
            if bad.any():
                i = _first(bad)
                raise fail("label must be 0 or 1", i, float(values[i]))

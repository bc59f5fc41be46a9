"""``--raw-ids``: the Outbrain id features kept as raw int64 ids, for dynamic (hash-table) embeddings.

Without it the 12 id features (every one-hot feature but ``platform``) are hashed into fixed buckets
(:func:`wd_sok.outbrain.features.hash_ids`). With it they are written as they are, int64:

* integer ids (``ad_id``, ``document_id``, ``campaign_id``, ...): the raw id itself;
* string ids (``geo_location`` and its ``_country`` / ``_state`` prefixes, and ``uuid`` with ``--uuid``):
  :func:`wd_sok.tools.rawids.hash_string` of the text (low 63 bits of its BLAKE2b-64, the transcoder's
  ``--hash_ids`` hash);
* a missing value (no side-table row, empty cell): :data:`MISSING_ID` (-1, never a raw id nor a hash).

The spec declares them ``dynamic: {capacity: C}`` with dtype int64, where C is the number of distinct ids
(missing included) in the train split, unless ``--raw-capacity`` sets it. ``platform`` (3 values) and the
multi-hot vocabularies stay fixed. ``--uuid`` adds the events' ``uuid`` (the user) as one more one-hot
feature; it is dynamic-only (tens of millions of users), so it needs ``--raw-ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from wd_sok.outbrain import features as F
from wd_sok.tools.rawids import hash_strings

MISSING_ID = -1
UUID_COLUMN = "uuid"
UUID_EMBEDDING_DIM = 64
RAW_COLUMNS = [c for c in F.ONEHOT_COLUMNS if c != "platform"]


def features(with_uuid: bool) -> list[str]:
    """The raw-id features in spec order: the 12 id features, then ``uuid`` if asked for."""
    return RAW_COLUMNS + ([UUID_COLUMN] if with_uuid else [])


def string_raw_ids(values: Any) -> np.ndarray:
    """Strings [n] -> int64[n] :func:`~wd_sok.tools.rawids.hash_string` ids; MISSING_ID for missing or ""."""
    s = pd.Series(values, copy=False).astype(object)
    missing = (s.isna() | (s.astype(str).str.len() == 0)).to_numpy()
    out = np.full(len(s), MISSING_ID, dtype=np.int64)
    out[~missing] = hash_strings(s[~missing].astype(str).to_numpy(dtype=object))
    return out


def geo_raw_parts(geo: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``geo_location`` strings ("US>CA>807") [n] -> int64[n] raw ids of (full, first 2 chars, first 5 chars),
    the prefixes of :func:`wd_sok.outbrain.features.geo_parts`."""
    s = pd.Series(geo, copy=False).astype(object)
    s = s.where(s.notna(), None)
    text = s.astype("string")
    return (string_raw_ids(s), string_raw_ids(text.str.slice(0, 2).astype(object)),
            string_raw_ids(text.str.slice(0, 5).astype(object)))


def raw_column(values: Any) -> np.ndarray:
    """A staged id column [n] -> int64[n]: integer columns as they are, float ones (NaN = missing, integral
    values below 2**53) with NaN -> MISSING_ID. pandas or cudf."""
    if np.dtype(getattr(values, "dtype", np.asarray(values).dtype)).kind in "iu":  # no nulls: -1 is stored
        return (values.to_numpy() if hasattr(values, "to_numpy") else np.asarray(values)).astype(np.int64)
    v = F.as_float(values)  # float ids: pandas NaN or cudf nulls
    return np.where(np.isfinite(v), v, MISSING_ID).astype(np.int64)


class DistinctIds:
    """The raw-id features and, when ``collects``, their distinct values over the frames :meth:`observe` saw."""

    def __init__(self, names: Sequence[str], collects: bool = True) -> None:
        self.parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.collects = collects

    def observe(self, name: str, values: np.ndarray) -> None:
        self.parts[name].append(np.unique(values))

    def counts(self) -> dict[str, int]:
        """Distinct ids per feature (at least 1, so an empty split still gives a valid capacity)."""
        return {n: max(1, len(np.unique(np.concatenate(p)))) if p else 1 for n, p in self.parts.items()}


def capacities(distinct: dict[str, int], override: dict[str, int] | int | None) -> dict[str, int]:
    """Capacity per raw-id feature: ``override`` (one int for all, or per feature), else ``distinct``."""
    if isinstance(override, int):
        return dict.fromkeys(distinct, override)
    unknown = sorted(set(override or {}) - set(distinct))
    if unknown:
        raise ValueError(f"--raw-capacity: '{unknown[0]}' is not a raw-id feature ({', '.join(distinct)})")
    return {n: (override or {}).get(n, c) for n, c in distinct.items()}

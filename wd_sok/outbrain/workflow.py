"""The NVTabular workflow: everything fit on the TRAIN split (CTRs, views, normalisation, medians,
multi-hot vocabularies) plus the id hashing, applied identically to train and test.

Graph (inputs are the staged columns of :mod:`wd_sok.outbrain.raw`)::

    12 raw ids            >> LambdaOp(hash_ids)                              -> int32 one-hot ids
                             (--raw-ids: >> LambdaOp(raw_column)             -> int64 raw ids, + uuid)
    platform              >> LambdaOp(encode_platform)                       -> int32
    CTR_INPUTS            >> TrainKeyStats(clicked)   -> *_ctr (float32), ad_id_count, document_id_promo_count
    *_count               >> LogOp (log1p) >> Normalize (train mean/std)     -> float32
    *_days_since_published >> TrainMedianFill >> LogOp (log1p)               -> float32
    similarities (pass-through, float32); multi-hot slots >> TrainVocabulary -> int32 slots
    clicked, display_id (pass-through)

Three operators are our own :class:`merlin.dag.ops.stat_operator.StatOperator` s rather than NVTabular's
``JoinGroupby`` / ``Categorify`` / ``FillMedian``: in NVTabular 23.08 on CPU, ``JoinGroupby`` crashes on
keys unseen in train (``astype(int)`` of NaN counts), ``Categorify`` crashes on a partition whose column is
all null (always the case for a missing side table) and on list columns; ``FillMedian`` is approximate.
Ours keep their (small) statistics in memory and write nothing to disk (no ``./categories`` folder).
"""

from __future__ import annotations

import warnings
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd

from wd_sok.outbrain import features as F
from wd_sok.outbrain import rawids as R

with warnings.catch_warnings():  # merlin warns that its torch/triton dtype mappings are absent
    warnings.filterwarnings("ignore", message=".*dtype mappings did not load.*", category=UserWarning)
    from merlin.dag.ops.stat_operator import StatOperator
    from merlin.dag.selector import ColumnSelector

HASHED_COLUMNS = [c for c in F.ONEHOT_COLUMNS if c != "platform"]


def _like(col: Any, values: np.ndarray) -> Any:
    """A series of ``col``'s backend (pandas or cudf) holding ``values``, same index and name."""
    return type(col)(values, index=col.index, name=col.name)


def _to_pandas(obj: Any) -> Any:
    return obj.to_pandas() if hasattr(obj, "to_pandas") and not isinstance(obj, pd.DataFrame | pd.Series) \
        else obj


def _hash_column(col: Any) -> Any:
    return _like(col, F.hash_ids(col, F.HASH_BUCKETS[col.name]))


def _raw_id_column(col: Any) -> Any:
    return _like(col, R.raw_column(col))


def _platform_column(col: Any) -> Any:
    return _like(col, F.encode_platform(col))


class TrainKeyStats(StatOperator):
    """Per key column ``k``: ``k_ctr`` (float32) and, for ``count_columns``, ``k_count`` (float64 views).

    Fit: ``clicks(k) = sum(label)``, ``views(k) = count`` over train rows with a non-missing key.
    Transform: ``k_ctr = ctr_with_threshold(clicks, views, thresholds[k])`` (0.0 for unseen/missing keys),
    ``k_count = views`` (0.0 for unseen/missing keys).
    """

    def __init__(self, label: str = F.LABEL_COLUMN, thresholds: dict[str, int] | None = None,
                 count_columns: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.target = label
        self.thresholds = dict(thresholds or F.CTR_THRESHOLDS)
        self.count_columns = tuple(count_columns)
        self.stats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def fit(self, col_selector: ColumnSelector, ddf: dd.DataFrame) -> Any:
        return {col: ddf[[col, self.target]].groupby(col, dropna=True)[self.target].agg(["sum", "count"])
                for col in col_selector.names}

    def fit_finalize(self, dask_stats: dict[str, Any]) -> None:
        for col, table in dask_stats.items():
            table = _to_pandas(table).sort_index()
            keys = F.as_float(table.index.to_series())
            ok = np.isfinite(keys)
            self.stats[col] = (keys[ok], table["sum"].to_numpy(np.float64)[ok],
                               table["count"].to_numpy(np.float64)[ok])

    def lookup(self, col: str, keys: Any) -> tuple[np.ndarray, np.ndarray]:
        """(clicks, views) per key, float64 [n]; NaN clicks and 0 views for unseen or missing keys."""
        table_keys, clicks, views = self.stats[col]
        k = F.as_float(keys)
        if len(table_keys) == 0:
            return np.full(len(k), np.nan), np.zeros(len(k))
        pos = np.minimum(np.searchsorted(table_keys, k), len(table_keys) - 1)
        found = np.isfinite(k) & (table_keys[pos] == k)
        return np.where(found, clicks[pos], np.nan), np.where(found, views[pos], 0.0)

    def transform(self, col_selector: ColumnSelector, df: Any) -> Any:
        out = type(df)(index=df.index)
        for col in col_selector.names:
            clicks, views = self.lookup(col, df[col])
            out[f"{col}_ctr"] = F.ctr_with_threshold(clicks, views, self.thresholds[col])
            if col in self.count_columns:
                out[f"{col}_count"] = views
        return out

    def column_mapping(self, col_selector: ColumnSelector) -> dict[str, list[str]]:
        mapping = {}
        for col in col_selector.names:
            mapping[f"{col}_ctr"] = [col]
            if col in self.count_columns:
                mapping[f"{col}_count"] = [col]
        return mapping

    @property
    def dependencies(self) -> list[str]:
        return [self.target]

    def clear(self) -> None:
        self.stats = {}


class TrainMedianFill(StatOperator):
    """Fill NaN with the exact train median (numpy semantics: mean of the two middle values for an even
    count) of a discrete-valued column, computed from its value counts; ``default`` if train has no value."""

    def __init__(self, default: float = 0.0) -> None:
        super().__init__()
        self.default = default
        self.medians: dict[str, float] = {}

    def fit(self, col_selector: ColumnSelector, ddf: dd.DataFrame) -> Any:
        return {col: ddf[col].value_counts(dropna=True) for col in col_selector.names}

    def fit_finalize(self, dask_stats: dict[str, Any]) -> None:
        for col, counts in dask_stats.items():
            counts = _to_pandas(counts)
            self.medians[col] = F.median_from_counts(counts.index.to_numpy(np.float64),
                                                     counts.to_numpy(np.int64), self.default)

    def transform(self, col_selector: ColumnSelector, df: Any) -> Any:
        for col in col_selector.names:
            df[col] = df[col].fillna(self.medians[col])
        return df

    def clear(self) -> None:
        self.medians = {}


class TrainVocabulary(StatOperator):
    """Frequency-capped vocabulary, fit on train, shared by the slot columns ``{feature}_{j}`` of a feature.

    ids: 0 for a missing slot (NaN), :data:`~wd_sok.outbrain.features.OOV_ID` (1) for a value outside the
    vocabulary, ``2 + rank`` for the ``sizes[feature] - 2`` most frequent train values (rank by count
    descending, ties by smaller value), so ids lie in ``[0, sizes[feature])``.
    """

    def __init__(self, sizes: dict[str, int]) -> None:
        super().__init__()
        self.sizes = dict(sizes)
        self.vocab: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def feature_of(slot: str) -> str:
        return slot.rsplit("_", 1)[0]

    def fit(self, col_selector: ColumnSelector, ddf: dd.DataFrame) -> Any:
        return {col: ddf[col].value_counts(dropna=True) for col in col_selector.names}

    def fit_finalize(self, dask_stats: dict[str, Any]) -> None:
        totals: dict[str, pd.Series] = {}
        for col, counts in dask_stats.items():
            name = self.feature_of(col)
            counts = _to_pandas(counts)
            totals[name] = counts if name not in totals else totals[name].add(counts, fill_value=0)
        for name, counts in totals.items():
            table = pd.DataFrame({"value": counts.index.to_numpy(np.float64), "n": counts.to_numpy()})
            table = table.sort_values(["n", "value"], ascending=[False, True], kind="mergesort")
            table = table.head(self.sizes[name] - F.FIRST_VOCAB_ID)
            ids = np.arange(len(table), dtype=np.int64) + F.FIRST_VOCAB_ID
            order = np.argsort(table["value"].to_numpy(), kind="mergesort")
            self.vocab[name] = (table["value"].to_numpy()[order], ids[order])

    def encode(self, name: str, values: Any) -> np.ndarray:
        """Raw slot values (float64, NaN = empty slot) -> int32 ids [n]."""
        v = F.as_float(values)
        keys, ids = self.vocab.get(name, (np.empty(0), np.empty(0, dtype=np.int64)))
        out = np.full(len(v), F.OOV_ID, dtype=np.int64)
        if len(keys):
            pos = np.minimum(np.searchsorted(keys, v), len(keys) - 1)
            found = keys[pos] == v
            out[found] = ids[pos[found]]
        out[~np.isfinite(v)] = F.UNKNOWN_ID
        return out.astype(np.int32)

    def transform(self, col_selector: ColumnSelector, df: Any) -> Any:
        for col in col_selector.names:
            df[col] = _like(df[col], self.encode(self.feature_of(col), df[col]))
        return df

    def clear(self) -> None:
        self.vocab = {}


def build_workflow(raw_features: list[str] | None = None) -> Any:
    """The (unfitted) ``nvtabular.Workflow``; fit it on the staged train split only.

    ``raw_features`` (``--raw-ids``, :mod:`~wd_sok.outbrain.rawids`): these id columns pass through as int64
    raw ids (-1 = missing) instead of being hashed into buckets.
    """
    import nvtabular as nvt
    from nvtabular import ops

    raw = list(raw_features or [])
    fixed = [c for c in HASHED_COLUMNS if c not in raw]
    hashed = fixed >> ops.LambdaOp(_hash_column, dtype=np.int32) if fixed else None
    if raw:
        raw_ids = raw >> ops.LambdaOp(_raw_id_column, dtype=np.int64)
        hashed = raw_ids if hashed is None else hashed + raw_ids
    platform = ["platform"] >> ops.LambdaOp(_platform_column, dtype=np.int32)
    stats = F.CTR_INPUTS >> TrainKeyStats(count_columns=("ad_id", "document_id_promo"))
    ctr = stats[[f"{c}_ctr" for c in F.CTR_INPUTS]]
    counts = stats[F.COUNT_COLUMNS] >> ops.LogOp() >> ops.Normalize(out_dtype=np.float32)
    days = F.DAYS_COLUMNS >> TrainMedianFill(default=0.0) >> ops.LogOp()
    slots = [s for name in F.MULTIHOT_COLUMNS for s in F.slot_columns(name)]
    multihot = slots >> TrainVocabulary({name: F.HASH_BUCKETS[name] for name in F.MULTIHOT_COLUMNS})
    outputs = hashed + platform + ctr + counts + days + F.SIM_COLUMNS + multihot + [F.LABEL_COLUMN,
                                                                                      F.DISPLAY_ID_COLUMN]
    return nvt.Workflow(outputs)

"""The 29 Outbrain features: names, sizes, and the exact formulas (pure numpy/pandas, backend-free).

Output dataset (one row per ``clicks_train.csv`` row):

* ``clicked`` (label, float32, 0.0/1.0); ``display_id`` (map, int64, test files only).
* 13 one-hot categorical ids (int32, in ``[0, cardinality)``), hashed with :func:`hash_ids`::

      id = 0                                              if the raw value is missing/unknown
      id = 1 + splitmix64(int64(raw)) mod (cardinality - 1)  otherwise

  Missing means: the display has no ``geo_location``, the ad is not in ``promoted_content`` (``*_promo``,
  ``campaign_id``, ``advertiser_id``), the document is not in ``documents_meta`` or its ``publisher_id`` /
  ``source_id`` is empty (``source_id*``, ``publisher_id*``), or the table is absent altogether.
  ``platform`` (values 1, 2, 3) is not hashed: ``id = platform`` for 1..3, 0 otherwise.
  Strings (``geo_location`` and its ``_country`` = first 2 chars / ``_state`` = first 5 chars prefixes) are
  first turned into integers with :func:`string_ids` (pandas' SipHash, fixed key, lowest 52 bits).
* 3 multi-hot lists (list<int32>, 1..3 ids, ``max_hotness`` 3): the display document's topics / entities /
  categories with the 3 highest ``confidence_level`` (ties: smaller raw id first), most confident first.
  Ids come from a vocabulary fit on the train split (:class:`wd_sok.outbrain.workflow.TrainVocabulary`,
  shared by a feature's 3 slots): the ``cardinality - 2`` most frequent train values get ids
  ``2 .. cardinality-1`` (by count descending, ties by smaller value); rarer or unseen values get the
  out-of-vocabulary id 1. A document with no rows in the table (or a missing table) gets ``[0]``: id 0 is
  reserved for "unknown" and is never a real value, so the model sees one "unknown" embedding.
* 13 numerical features (float32):

  - ``document_id_document_id_promo_sim_{categories,topics,entities}``: tf-idf cosine similarity of the
    display document and the promoted document (:class:`TfidfIndex`); 0.0 when either document has no rows
    in the table, the ad is not in ``promoted_content``, or the table is absent.
  - ``{ad_id,advertiser_id,campaign_id,document_id_promo,publisher_id_promo,source_id_promo}_ctr``:
    ``clicks / views`` of the key over the TRAIN split rows, 0.0 when ``views < threshold``
    (:data:`CTR_THRESHOLDS`: 5 for ad_id and document_id_promo, 10 otherwise), when the key never occurs in
    train, or when the key is missing (see above).
  - ``ad_id_count``, ``document_id_promo_count``: ``(log1p(views) - mean) / std`` with ``views`` the key's
    train-split row count (0 when unseen in train or missing) and mean / sample std (ddof 1) of
    ``log1p(views)`` over the train rows (NVTabular ``LogOp`` + ``Normalize``; std 0 -> only the mean is
    subtracted).
  - ``publish_time_days_since_published`` / ``publish_time_promo_days_since_published`` for the display /
    promoted document: ``days = floor((timestamp + TIMESTAMP_DELTA_MS - publish_time_ms) / 86_400_000)``
    clipped to ``[0, 3650]`` (:func:`days_since_published`); missing publish times are filled with the
    train-split median of ``days`` (0 days if train has no publish time at all), then ``log1p``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

ONEHOT_COLUMNS = ["ad_id", "document_id", "platform", "document_id_promo", "campaign_id", "advertiser_id",
                  "source_id", "geo_location", "geo_location_country", "geo_location_state", "publisher_id",
                  "source_id_promo", "publisher_id_promo"]
MULTIHOT_COLUMNS = ["topic_id_list", "entity_id_list", "category_id_list"]
CATEGORICAL_COLUMNS = ONEHOT_COLUMNS + MULTIHOT_COLUMNS
SIM_COLUMNS = ["document_id_document_id_promo_sim_categories", "document_id_document_id_promo_sim_topics",
               "document_id_document_id_promo_sim_entities"]
CTR_INPUTS = ["ad_id", "source_id_promo", "document_id_promo", "publisher_id_promo", "advertiser_id",
              "campaign_id"]
COUNT_COLUMNS = ["ad_id_count", "document_id_promo_count"]
DAYS_COLUMNS = ["publish_time_days_since_published", "publish_time_promo_days_since_published"]
NUMERIC_COLUMNS = [*SIM_COLUMNS, "document_id_promo_ctr", "publisher_id_promo_ctr", "source_id_promo_ctr",
                   "document_id_promo_count", "publish_time_days_since_published", "ad_id_ctr",
                   "advertiser_id_ctr", "campaign_id_ctr", "ad_id_count",
                   "publish_time_promo_days_since_published"]
LABEL_COLUMN = "clicked"
DISPLAY_ID_COLUMN = "display_id"

HASH_BUCKETS: dict[str, int] = {
    "ad_id": 250000, "document_id": 300000, "platform": 4, "document_id_promo": 100000, "campaign_id": 5000,
    "advertiser_id": 2500, "source_id": 4000, "geo_location": 2500, "geo_location_country": 300,
    "geo_location_state": 2000, "publisher_id": 1000, "source_id_promo": 4000, "publisher_id_promo": 1000,
    "topic_id_list": 350, "entity_id_list": 10000, "category_id_list": 100,
}
EMBEDDING_DIMS: dict[str, int] = {
    "ad_id": 128, "document_id": 128, "platform": 19, "document_id_promo": 128, "campaign_id": 128,
    "advertiser_id": 64, "source_id": 64, "geo_location": 64, "geo_location_country": 64,
    "geo_location_state": 64, "publisher_id": 64, "source_id_promo": 64, "publisher_id_promo": 64,
    "topic_id_list": 64, "entity_id_list": 64, "category_id_list": 64,
}
MAX_HOTNESS = 3
CTR_THRESHOLDS: dict[str, int] = {"ad_id": 5, "document_id_promo": 5, "source_id_promo": 10,
                                  "publisher_id_promo": 10, "advertiser_id": 10, "campaign_id": 10}
# events.csv timestamps are ms since 2016-06-14 03:59:59.998 UTC (the reference's TIMESTAMP_DELTA)
TIMESTAMP_DELTA_MS = 1465876799998
MS_PER_DAY = 86_400_000
MAX_DAYS = 3650
# reserved ids: 0 "unknown" (missing value / no side-table data); multi-hot: 1 out-of-vocabulary, 2.. vocab
UNKNOWN_ID = 0
OOV_ID = 1
FIRST_VOCAB_ID = 2
# split rule: train iff day <= TRAIN_MAX_DAY and display_uniform(display_id, seed) > TEST_FRACTION
TRAIN_MAX_DAY = 10
TEST_FRACTION = 0.2

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK52 = (1 << 52) - 1


def as_float(values: Any) -> np.ndarray:
    """Any 1-D numeric container (numpy, pandas incl. nullable, cudf) -> float64 numpy, NaN for missing."""
    if hasattr(values, "to_numpy"):
        try:
            return values.to_numpy(dtype="float64", na_value=np.nan)
        except TypeError:  # cudf: na_value unsupported for some dtypes
            return np.asarray(values.astype("float64").fillna(np.nan).to_numpy(), dtype=np.float64)
    return np.asarray(values, dtype=np.float64)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of ``x + golden`` (uint64 -> uint64, wrapping arithmetic): a fixed, seedless hash
    that gives the same result on every platform and backend (unlike pandas/cudf ``hash_values``)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def hash_ids(values: Any, cardinality: int) -> np.ndarray:
    """Raw integer ids (float64 with NaN for missing, shape [n]) -> int32 ids in ``[0, cardinality)``.

    ``0`` for missing, else ``1 + splitmix64(int64(v)) % (cardinality - 1)``.
    """
    if cardinality < 2:
        raise ValueError(f"cardinality must be >= 2 to hold the unknown id and one bucket, got {cardinality}")
    v = as_float(values)
    missing = ~np.isfinite(v)
    raw = np.where(missing, 0.0, v).astype(np.int64).view(np.uint64)
    ids = (splitmix64(raw) % np.uint64(cardinality - 1)).astype(np.int64) + 1
    ids[missing] = UNKNOWN_ID
    return ids.astype(np.int32)


def encode_platform(values: Any) -> np.ndarray:
    """``platform`` (1 desktop, 2 mobile, 3 tablet) -> int32 id = platform for 1..3, else 0. Shape [n]."""
    v = as_float(values)
    ok = np.isin(v, (1.0, 2.0, 3.0))
    return np.where(ok, np.nan_to_num(v), 0).astype(np.int32)


def string_ids(values: pd.Series) -> np.ndarray:
    """Strings -> float64 integer ids in ``[0, 2**52)`` (exact in float64); NaN for missing or empty strings.

    Uses ``pandas.util.hash_array`` (SipHash-2-4 with pandas' fixed key), stable across runs and machines.
    """
    s = pd.Series(values, copy=False).astype(object)
    missing = s.isna().to_numpy() | (s.astype(str).str.len() == 0).to_numpy()
    h = pd.util.hash_array(s.where(~missing, "").astype(str).to_numpy(dtype=object), categorize=True)
    out = (h & np.uint64(_MASK52)).astype(np.float64)
    out[missing] = np.nan
    return out


def term_ids(values: pd.Series) -> np.ndarray:
    """Side-table term ids (ints, or strings such as Kaggle's hex entity ids) -> float64, NaN for missing."""
    if pd.api.types.is_numeric_dtype(values):
        return as_float(values)
    return string_ids(values)


def geo_parts(geo: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``geo_location`` strings ("US>CA>807") -> string ids of (full, first 2 chars, first 5 chars)."""
    s = pd.Series(geo, copy=False).astype(object)
    s = s.where(s.notna(), None)
    text = s.astype("string")
    return string_ids(s), string_ids(text.str.slice(0, 2).astype(object)), \
        string_ids(text.str.slice(0, 5).astype(object))


def parse_publish_time(values: pd.Series) -> np.ndarray:
    """``publish_time`` "YYYY-MM-DD HH:MM:SS" strings -> float64 ms since the epoch; NaN if missing/bad."""
    t = pd.to_datetime(pd.Series(values, copy=False), format="%Y-%m-%d %H:%M:%S", errors="coerce")
    ms = t.to_numpy(dtype="datetime64[ms]").astype(np.int64).astype(np.float64)
    ms[t.isna().to_numpy()] = np.nan
    return ms


def days_since_published(timestamp_ms: Any, publish_ms: Any) -> np.ndarray:
    """float64 ``floor((timestamp + TIMESTAMP_DELTA_MS - publish_ms) / MS_PER_DAY)`` clipped to
    ``[0, MAX_DAYS]``; NaN where either input is missing. Shapes [n] -> [n]."""
    delta = as_float(timestamp_ms) + TIMESTAMP_DELTA_MS - as_float(publish_ms)
    return np.clip(np.floor(delta / MS_PER_DAY), 0, MAX_DAYS)


def display_uniform(display_ids: Any, seed: int) -> np.ndarray:
    """Seeded uniform draw in ``[0, 1)`` per display, a pure function of ``(display_id, seed)`` (so the split
    does not depend on row order or chunking):
    ``(splitmix64(display_id ^ splitmix64(seed)) >> 11) / 2**53``."""
    key = splitmix64(np.array([int(seed) % 2**64], dtype=np.uint64))[0]
    ids = np.asarray(display_ids, dtype=np.int64).view(np.uint64)
    return (splitmix64(ids ^ key) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def is_train(day: Any, uniform: Any) -> np.ndarray:
    """The split rule: ``(day <= TRAIN_MAX_DAY) & (uniform > TEST_FRACTION)``; bool [n]."""
    return (np.asarray(day) <= TRAIN_MAX_DAY) & (np.asarray(uniform) > TEST_FRACTION)


def ctr_with_threshold(clicks: Any, views: Any, threshold: int) -> np.ndarray:
    """float32 ``clicks / views`` where ``views >= threshold`` (and > 0), else 0.0 (also for NaN inputs)."""
    c, v = as_float(clicks), as_float(views)
    ok = np.isfinite(c) & np.isfinite(v) & (v >= max(threshold, 1))
    return np.where(ok, c / np.where(ok, v, 1.0), 0.0).astype(np.float32)


def median_from_counts(values: np.ndarray, counts: np.ndarray, default: float) -> float:
    """Exact median of a multiset given as distinct ``values`` with ``counts`` (``np.median`` semantics:
    mean of the two middle order statistics for an even total); ``default`` when the total is 0."""
    keep = np.isfinite(values) & (counts > 0)
    values, counts = values[keep], counts[keep]
    total = int(counts.sum())
    if total == 0:
        return float(default)
    order = np.argsort(values, kind="mergesort")
    values, cum = values[order], np.cumsum(counts[order])
    lo = values[np.searchsorted(cum, (total - 1) // 2, side="right")]
    hi = values[np.searchsorted(cum, total // 2, side="right")]
    return float((lo + hi) / 2)


def merge_duplicate_terms(doc_ids: Any, terms: Any, confidence: Any) -> pd.DataFrame:
    """Side-table rows -> one row per (document_id, term) with summed ``confidence_level``; rows with a
    missing document, term or confidence are dropped. Columns: document_id, term (float64), confidence."""
    df = pd.DataFrame({"document_id": as_float(doc_ids), "term": as_float(terms),
                       "confidence": as_float(confidence)}).dropna()
    return df.groupby(["document_id", "term"], sort=True, as_index=False)["confidence"].sum()


class TfidfIndex:
    """tf-idf document vectors over one side table (topics, entities or categories), for cosine similarity.

    With ``c(d, t)`` the ``confidence_level`` of term ``t`` in document ``d`` (duplicates summed), ``N`` the
    number of documents with at least one row and ``df(t)`` the number of documents containing ``t``::

        w(d, t) = c(d, t) * log(N / df(t))          # as the reference (NVTabular ColumnSimilarity "tfidf")
        v(d)    = w(d, .) / ||w(d, .)||_2            # all-zero rows stay zero
        sim(a, b) = <v(a), v(b)>                     # 0.0 when a or b has no rows (or is missing)

    (The reference takes ``N`` = largest document_id + 1, the height of its id-indexed sparse matrix; here
    ``N`` counts documents, so the weights do not depend on how ids are numbered.)
    """

    def __init__(self, doc_ids: Any, terms: Any, confidence: Any) -> None:
        table = merge_duplicate_terms(doc_ids, terms, confidence)
        self.documents = np.unique(table["document_id"].to_numpy())
        rows = np.searchsorted(self.documents, table["document_id"].to_numpy())
        term_values, cols = np.unique(table["term"].to_numpy(), return_inverse=True)
        n_docs = len(self.documents)
        doc_freq = np.bincount(cols, minlength=len(term_values)).astype(np.float64)
        idf = np.log(max(n_docs, 1) / np.maximum(doc_freq, 1.0))
        w = table["confidence"].to_numpy() * idf[cols]
        norm = np.sqrt(np.bincount(rows, weights=w * w, minlength=n_docs))
        w = np.divide(w, norm[rows], out=np.zeros_like(w), where=norm[rows] > 0)
        # one extra, empty row (index n_docs) for unknown documents
        self.matrix = sp.csr_matrix((w, (rows, cols)), shape=(n_docs + 1, max(len(term_values), 1)))

    def rows(self, doc_ids: Any) -> np.ndarray:
        """Document ids (float64, NaN allowed) -> matrix rows; unknown documents -> the empty last row."""
        d = as_float(doc_ids)
        n = len(self.documents)
        if n == 0:
            return np.zeros(len(d), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.documents, d), n - 1)
        found = np.isfinite(d) & (self.documents[pos] == d)
        return np.where(found, pos, n)

    def similarity(self, doc_a: Any, doc_b: Any) -> np.ndarray:
        """float32 [n] cosine similarity of the tf-idf vectors of ``doc_a[i]`` and ``doc_b[i]``."""
        a = self.matrix[self.rows(doc_a)]
        b = self.matrix[self.rows(doc_b)]
        return np.asarray(a.multiply(b).sum(axis=1), dtype=np.float64).ravel().astype(np.float32)


def top_k_slots(doc_ids: Any, terms: Any, confidence: Any, prefix: str, k: int = MAX_HOTNESS) -> pd.DataFrame:
    """Per document, its ``k`` terms of highest confidence (ties: smaller term first), most confident first.

    Returns a DataFrame indexed by document_id (float64) with float64 columns ``{prefix}_0 .. {prefix}_{k-1}``
    (NaN where the document has fewer than ``j + 1`` terms).
    """
    table = merge_duplicate_terms(doc_ids, terms, confidence)
    table = table.sort_values(["document_id", "confidence", "term"], ascending=[True, False, True],
                              kind="mergesort")
    table["slot"] = table.groupby("document_id").cumcount()
    table = table[table["slot"] < k]
    wide = table.pivot(index="document_id", columns="slot", values="term")
    wide = wide.reindex(columns=range(k))
    wide.columns = [f"{prefix}_{j}" for j in range(k)]
    return wide.astype(np.float64)


def slot_columns(name: str, k: int = MAX_HOTNESS) -> list[str]:
    """Staged slot columns of multi-hot feature ``name``: ``[name_0, ..., name_{k-1}]``."""
    return [f"{name}_{j}" for j in range(k)]

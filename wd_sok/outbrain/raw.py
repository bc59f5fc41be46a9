"""Read and join the raw Outbrain CSVs, compute the row-local features, split, and stage as parquet.

Inputs (in ``input_dir``; ``.csv``, ``.csv.zip`` or ``.csv.gz``; ``page_views*`` is ignored):
``clicks_train`` and ``events`` are required; ``promoted_content``, ``documents_meta``, ``documents_topics``,
``documents_entities`` and ``documents_categories`` are optional. Each absent optional table raises ONE
:class:`OutbrainDataWarning` naming the file and the features it affects (those get the fill values of
:mod:`wd_sok.outbrain.features`); a ``promoted_content`` covering only part of the click rows raises one
warning with the coverage fraction; click rows whose display is not in ``events`` are dropped (one warning).

Split (per display, from ``events``): ``day = timestamp // 86_400_000``; train iff ``day <= 10`` and
``display_uniform(display_id, seed) > 0.2`` (see :mod:`~wd_sok.outbrain.features`), else test.

Staged layout under ``stage_dir`` (all row-local, nothing fit on data yet):

* ``train/part_XXXXX.parquet``: one file per clicks chunk, rows shuffled within the chunk (seeded).
* ``test/part_XXXXX.parquet``: display-id range buckets, each sorted by display_id (stable, so the rows of a
  display keep their clicks_train order); bucket files in order give the test split globally sorted.

Staged columns: display_id (int64), ad_id (int64), clicked (float32); raw ids document_id, platform,
geo_location{,_country,_state}, document_id_promo, campaign_id, advertiser_id, source_id, publisher_id,
source_id_promo, publisher_id_promo (float64, NaN = missing); the 2 ``*_days_since_published`` (float64 days,
NaN = missing); the 3 similarities (float32); multi-hot slots ``{name}_0.._2`` (float64 raw term ids, NaN).
With ``raw_ids`` the 3 geo columns are int64 raw ids (-1 = missing) and ``with_uuid`` adds ``uuid`` (int64).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from wd_sok.outbrain import features as F
from wd_sok.outbrain import rawids as R

logger = logging.getLogger("wd_sok.outbrain")

NA_VALUES = ["\\N", ""]
REQUIRED = {"clicks_train": ["display_id", "ad_id", "clicked"],
            "events": ["display_id", "document_id", "timestamp", "platform", "geo_location"]}
OPTIONAL = {"promoted_content": ["ad_id", "document_id", "campaign_id", "advertiser_id"],
            "documents_meta": ["document_id", "source_id", "publisher_id", "publish_time"],
            "documents_topics": ["document_id", "topic_id", "confidence_level"],
            "documents_entities": ["document_id", "entity_id", "confidence_level"],
            "documents_categories": ["document_id", "category_id", "confidence_level"]}
SIDE = {"documents_topics": ("topic_id", "topics", "topic_id_list"),
        "documents_entities": ("entity_id", "entities", "entity_id_list"),
        "documents_categories": ("category_id", "categories", "category_id_list")}
AFFECTED = {
    "promoted_content": ["document_id_promo", "campaign_id", "advertiser_id", "source_id_promo",
                         "publisher_id_promo", "document_id_promo_ctr", "publisher_id_promo_ctr",
                         "source_id_promo_ctr", "advertiser_id_ctr", "campaign_id_ctr",
                         "document_id_promo_count",
                         "publish_time_promo_days_since_published", *F.SIM_COLUMNS],
    "documents_meta": ["source_id", "publisher_id", "source_id_promo", "publisher_id_promo",
                       "source_id_promo_ctr", "publisher_id_promo_ctr", "publish_time_days_since_published",
                       "publish_time_promo_days_since_published"],
    "documents_topics": ["topic_id_list", "document_id_document_id_promo_sim_topics"],
    "documents_entities": ["entity_id_list", "document_id_document_id_promo_sim_entities"],
    "documents_categories": ["category_id_list", "document_id_document_id_promo_sim_categories"],
}
GEO_COLUMNS = ("geo_location", "geo_location_country", "geo_location_state")
FILLS = {
    "promoted_content": "ids 0 (unknown), CTRs 0.0, promo view count 0 (then log1p + normalisation), "
                        "similarities 0.0, publish age = train median",
    "documents_meta": "ids 0 (unknown), CTRs 0.0, publish ages = train median (0 days if train has none)",
    "documents_topics": "list [0] (unknown), similarity 0.0",
    "documents_entities": "list [0] (unknown), similarity 0.0",
    "documents_categories": "list [0] (unknown), similarity 0.0",
}


class OutbrainDataWarning(UserWarning):
    """Raw data is missing or partial; the affected features get their documented fill values."""


def _warn(message: str) -> None:
    warnings.warn(message, OutbrainDataWarning, stacklevel=3)


def find_table(input_dir: Path, name: str) -> Path | None:
    """``input_dir/name.csv`` (or ``.csv.zip`` / ``.csv.gz``) if present, else None."""
    for suffix in (".csv", ".csv.zip", ".csv.gz"):
        path = Path(input_dir) / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def read_table(path: Path, columns: list[str], **kwargs: object) -> pd.DataFrame:
    """Read ``columns`` of a CSV, failing with one line naming the file and the first missing column."""
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column '{missing[0]}' (expected {', '.join(columns)})")
    return pd.read_csv(path, usecols=columns, na_values=NA_VALUES, keep_default_na=True, **kwargs)


@dataclass
class SideTables:
    """Lookup tables for the join. ``None`` / absent keys mean the CSV is missing.

    promoted: index ad_id (int64) -> document_id_promo, campaign_id, advertiser_id (float64).
    meta: index document_id (float64) -> source_id, publisher_id, publish_ms (float64).
    slots: multi-hot name -> DataFrame indexed by document_id with the 3 slot columns (float64).
    tfidf: "categories" | "topics" | "entities" -> :class:`~wd_sok.outbrain.features.TfidfIndex`.
    """

    promoted: pd.DataFrame | None = None
    meta: pd.DataFrame | None = None
    slots: dict[str, pd.DataFrame] = field(default_factory=dict)
    tfidf: dict[str, F.TfidfIndex] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _fills(name: str, raw_ids: bool) -> str:
    """The fill values of table ``name``'s features, as the warnings say them (raw ids: -1 for missing)."""
    return FILLS[name].replace("ids 0 (unknown)", f"ids {R.MISSING_ID} (missing)") if raw_ids else FILLS[name]


def load_side_tables(input_dir: Path, raw_ids: bool = False) -> SideTables:
    """Read the optional tables; one :class:`OutbrainDataWarning` per missing one."""
    side = SideTables()
    for name in OPTIONAL:
        path = find_table(input_dir, name)
        if path is None:
            _warn(f"{Path(input_dir) / (name + '.csv')} not found: features {', '.join(AFFECTED[name])} "
                  f"get fill values ({_fills(name, raw_ids)})")
            side.missing.append(f"{name}.csv")
            continue
        df = read_table(path, OPTIONAL[name])
        logger.info("read %s: %d rows", path.name, len(df))
        if name == "promoted_content":
            df = df.dropna(subset=["ad_id"]).drop_duplicates("ad_id")
            side.promoted = pd.DataFrame({"document_id_promo": F.as_float(df["document_id"]),
                                          "campaign_id": F.as_float(df["campaign_id"]),
                                          "advertiser_id": F.as_float(df["advertiser_id"])},
                                         index=pd.Index(df["ad_id"].astype(np.int64), name="ad_id"))
        elif name == "documents_meta":
            df = df.dropna(subset=["document_id"]).drop_duplicates("document_id")
            side.meta = pd.DataFrame({"source_id": F.as_float(df["source_id"]),
                                      "publisher_id": F.as_float(df["publisher_id"]),
                                      "publish_ms": F.parse_publish_time(df["publish_time"])},
                                     index=pd.Index(F.as_float(df["document_id"]), name="document_id"))
        else:
            term_col, sim_name, list_name = SIDE[name]
            terms = F.term_ids(df[term_col])
            side.tfidf[sim_name] = F.TfidfIndex(df["document_id"], terms, df["confidence_level"])
            side.slots[list_name] = F.top_k_slots(df["document_id"], terms, df["confidence_level"], list_name)
    return side


def load_events(path: Path, seed: int, raw_ids: bool = False, with_uuid: bool = False) -> pd.DataFrame:
    """events.csv -> DataFrame indexed by display_id (unique, sorted) with document_id, timestamp, platform,
    the 3 geo ids (float64, see :func:`~wd_sok.outbrain.features.geo_parts`; with ``raw_ids`` int64 raw ids,
    see :func:`~wd_sok.outbrain.rawids.geo_raw_parts`), ``uuid`` (int64 raw ids, only ``with_uuid``),
    day (int64), is_train (bool)."""
    columns = REQUIRED["events"] + (["uuid"] if with_uuid else [])
    ev = read_table(path, columns, dtype={"geo_location": "category", "uuid": object})
    ev = ev.dropna(subset=["display_id", "timestamp"])
    n = len(ev)
    ev = ev.drop_duplicates("display_id")
    if len(ev) < n:
        _warn(f"{path}: {n - len(ev)} duplicate display_id rows; the first one of each display is kept")
    ev["display_id"] = ev["display_id"].astype(np.int64)
    ev = ev.set_index("display_id").sort_index()
    ev["day"] = (ev["timestamp"].astype(np.int64) // F.MS_PER_DAY).astype(np.int64)
    # geo string ids, computed once per distinct geo_location (category codes -> ids)
    geo = ev.pop("geo_location").astype("category")
    codes = geo.cat.codes.to_numpy()
    parts = (R.geo_raw_parts if raw_ids else F.geo_parts)(pd.Series(geo.cat.categories.astype(object)))
    missing = R.MISSING_ID if raw_ids else np.nan
    for col, ids in zip(GEO_COLUMNS, parts, strict=True):
        ev[col] = np.where(codes >= 0, ids[np.maximum(codes, 0)] if len(ids) else missing, missing)
    if with_uuid:
        ev["uuid"] = R.string_raw_ids(ev["uuid"])
    ev["is_train"] = F.is_train(ev["day"].to_numpy(), F.display_uniform(ev.index.to_numpy(), seed))
    return ev


def join_chunk(clicks: pd.DataFrame, events: pd.DataFrame, side: SideTables) -> pd.DataFrame:
    """One chunk of clicks_train (with an event for every row) -> staged columns (see module docstring)
    plus ``is_train`` (bool). Row order is kept."""
    ev = events.reindex(clicks["display_id"].to_numpy())
    out = pd.DataFrame({"display_id": clicks["display_id"].to_numpy(np.int64),
                        "ad_id": clicks["ad_id"].to_numpy(np.int64),
                        "clicked": clicks["clicked"].to_numpy(np.float32)})
    out["document_id"] = F.as_float(ev["document_id"])
    out["platform"] = F.as_float(ev["platform"])
    for col in GEO_COLUMNS + (("uuid",) if "uuid" in ev else ()):  # int64 raw ids with --raw-ids
        out[col] = ev[col].to_numpy(ev[col].dtype)
    n = len(out)
    nan = np.full(n, np.nan)
    if side.promoted is not None:
        promo = side.promoted.reindex(out["ad_id"].to_numpy())
        for col in ("document_id_promo", "campaign_id", "advertiser_id"):
            out[col] = promo[col].to_numpy()
    else:
        out["document_id_promo"] = out["campaign_id"] = out["advertiser_id"] = nan
    timestamp = ev["timestamp"].to_numpy(np.float64)
    for doc_col, suffix in (("document_id", ""), ("document_id_promo", "_promo")):
        if side.meta is not None:
            meta = side.meta.reindex(out[doc_col].to_numpy())
            source, publisher, publish = (meta[c].to_numpy()
                                          for c in ("source_id", "publisher_id", "publish_ms"))
        else:
            source = publisher = publish = nan
        out[f"source_id{suffix}"] = source
        out[f"publisher_id{suffix}"] = publisher
        out[f"publish_time{suffix}_days_since_published"] = F.days_since_published(timestamp, publish)
    for sim_col in F.SIM_COLUMNS:
        index = side.tfidf.get(sim_col.rsplit("_", 1)[1])
        out[sim_col] = (index.similarity(out["document_id"], out["document_id_promo"]) if index is not None
                        else np.zeros(n, dtype=np.float32))
    for name in F.MULTIHOT_COLUMNS:
        slots = side.slots.get(name)
        looked_up = slots.reindex(out["document_id"].to_numpy()) if slots is not None else None
        for col in F.slot_columns(name):
            out[col] = looked_up[col].to_numpy() if looked_up is not None else nan
    out["is_train"] = ev["is_train"].to_numpy(bool)
    return out


@dataclass
class StageResult:
    """What :func:`stage` wrote: file lists in order and row/display counts per split."""

    train_files: list[Path]
    test_files: list[Path]
    rows: dict[str, int]
    displays: dict[str, int]
    dropped_rows: int
    promoted_coverage: float | None
    missing_tables: list[str]


def _write(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)


def stage(input_dir: str | Path, stage_dir: str | Path, seed: int = 0, chunk_rows: int = 5_000_000,
          test_bucket_displays: int = 2_000_000, raw_ids: bool = False, with_uuid: bool = False) -> StageResult:
    """Join, split and stage the raw data (see module docstring); returns the staged files and counts.
    ``raw_ids`` / ``with_uuid``: string ids as int64 raw ids, and a ``uuid`` column (:mod:`~wd_sok.outbrain.rawids`)."""
    input_dir, stage_dir = Path(input_dir), Path(stage_dir)
    paths = {name: find_table(input_dir, name) for name in REQUIRED}
    for name, path in paths.items():
        if path is None:
            raise FileNotFoundError(f"{input_dir / (name + '.csv')}: required Outbrain table not found")
    side = load_side_tables(input_dir, raw_ids)
    events = load_events(paths["events"], seed, raw_ids, with_uuid)
    logger.info("events: %d displays (%d train by the split rule)", len(events),
                int(events["is_train"].sum()))
    test_ids = events.index.to_numpy()[~events["is_train"].to_numpy()]
    bounds = test_ids[test_bucket_displays::test_bucket_displays]  # display-id ranges bucketing the test set
    rows = {"train": 0, "test": 0}
    dropped = covered = incomplete = 0
    train_files: list[Path] = []
    bucket_chunks: dict[int, list[Path]] = {}
    header = pd.read_csv(paths["clicks_train"], nrows=0).columns
    missing_cols = [c for c in REQUIRED["clicks_train"] if c not in header]
    if missing_cols:
        raise ValueError(f"{paths['clicks_train']}: missing column '{missing_cols[0]}' "
                         f"(expected {', '.join(REQUIRED['clicks_train'])})")
    clicks_iter = pd.read_csv(paths["clicks_train"], usecols=REQUIRED["clicks_train"], chunksize=chunk_rows,
                              na_values=NA_VALUES)
    seen = np.zeros(len(events), dtype=bool)  # events rows (displays) with at least one click row
    for i, clicks in enumerate(clicks_iter):
        complete = clicks.notna().all(axis=1).to_numpy()
        incomplete += int((~complete).sum())
        clicks = clicks[complete]
        position = events.index.get_indexer(clicks["display_id"].to_numpy(np.int64))
        known = position >= 0
        dropped += int((~known).sum())
        clicks = clicks[known]
        seen[position[known]] = True
        if side.promoted is not None:
            covered += int(np.isin(clicks["ad_id"].to_numpy(), side.promoted.index.to_numpy()).sum())
        joined = join_chunk(clicks, events, side)
        is_train = joined.pop("is_train").to_numpy()
        train = joined[is_train]
        test = joined[~is_train]
        rows["train"] += len(train)
        rows["test"] += len(test)
        if len(train):
            order = np.random.default_rng([seed, i]).permutation(len(train))
            path = stage_dir / "train" / f"part_{i:05d}.parquet"
            _write(train.iloc[order], path)
            train_files.append(path)
        if len(test):
            bucket = np.searchsorted(bounds, test["display_id"].to_numpy(), side="right")
            for b in np.unique(bucket):
                path = stage_dir / "test_chunks" / f"b{b:05d}" / f"c{i:05d}.parquet"
                _write(test[bucket == b], path)
                bucket_chunks.setdefault(int(b), []).append(path)
        logger.info("staged clicks chunk %d: %d train / %d test rows", i, len(train), len(test))
    total = rows["train"] + rows["test"]
    if dropped:
        _warn(f"{paths['clicks_train']}: {dropped} click rows have no display in {paths['events'].name} "
              f"(no timestamp to split on); they are dropped")
    if incomplete:
        _warn(f"{paths['clicks_train']}: {incomplete} rows with an empty display_id, ad_id or clicked "
              f"are dropped")
    dropped += incomplete
    coverage = None
    if side.promoted is not None and total:
        coverage = covered / total
        if covered < total:
            _warn(f"{find_table(input_dir, 'promoted_content')} covers {coverage:.1%} of the click rows "
                  f"({covered} of {total}): the other rows get fill values for "
                  f"{', '.join(AFFECTED['promoted_content'])} ({_fills('promoted_content', raw_ids)})")
    test_files = []
    for b in sorted(bucket_chunks):
        part = pd.concat([pd.read_parquet(p) for p in bucket_chunks[b]], ignore_index=True)
        part = part.sort_values("display_id", kind="mergesort")
        path = stage_dir / "test" / f"part_{b:05d}.parquet"
        _write(part, path)
        test_files.append(path)
        for p in bucket_chunks[b]:
            p.unlink()
    if not train_files:
        raise ValueError(f"{input_dir}: the split left no train rows (need displays with day <= "
                         f"{F.TRAIN_MAX_DAY}); cannot fit statistics")
    is_train = events["is_train"].to_numpy()
    displays = {"train": int((seen & is_train).sum()), "test": int((seen & ~is_train).sum())}
    return StageResult(train_files, test_files, rows, displays, dropped, coverage, side.missing)

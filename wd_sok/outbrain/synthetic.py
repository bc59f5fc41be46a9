"""Synthetic Outbrain raw data: the seven Kaggle CSVs, mutually consistent, in Kaggle's exact formats.

Files and columns (as in the competition):

* ``clicks_train.csv``: display_id, ad_id, clicked (0/1); every display has 2-12 distinct ads, exactly one
  clicked; rows ordered by display_id.
* ``events.csv``: display_id, uuid (14 hex chars), document_id, timestamp (ms since the dataset start,
  displays spread over days 0..14 and numbered in time order), platform (1..3), geo_location
  ("US>CA>807", "GB>H9", "SG", ...; a few empty).
* ``promoted_content.csv``: ad_id, document_id, campaign_id, advertiser_id (optionally only some ads).
* ``documents_meta.csv``: document_id, source_id, publisher_id, publish_time ("YYYY-MM-DD HH:MM:SS"; some
  empty fields, as in Kaggle).
* ``documents_{topics,entities,categories}.csv``: document_id, topic_id | entity_id (32 hex chars) |
  category_id, confidence_level; 0..5 rows per document.

The click is drawn per display with probability proportional to a latent ad quality times a bonus when the
ad's document shares a topic with the display's document, so CTRs and similarities carry signal.
Usage: ``python -m wd_sok.outbrain.synthetic OUT_DIR --displays 5000 --seed 0``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

SIDE_TABLES = ("promoted_content", "documents_meta", "documents_topics", "documents_entities",
               "documents_categories")
_COUNTRIES = np.array(["US", "GB", "CA", "AU", "IN", "SG", "DE", "FR"])
_COUNTRY_P = np.array([0.62, 0.08, 0.08, 0.05, 0.06, 0.03, 0.04, 0.04])
_US_STATES = np.array(["CA", "TX", "NY", "FL", "IL", "PA", "OH", "MI", "WA", "SC"])
_START = pd.Timestamp("2016-06-14 03:59:59.998")


def _hex(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    words = rng.integers(0, 2 ** 63, size=(n, (width + 15) // 16), dtype=np.int64)
    return np.array(["".join(f"{w:016x}" for w in row)[:width] for row in words.tolist()])


def _geo(rng: np.random.Generator, n: int) -> np.ndarray:
    country = rng.choice(_COUNTRIES, size=n, p=_COUNTRY_P)
    state = rng.choice(_US_STATES, size=n)
    dma = rng.integers(500, 882, size=n).astype(str)
    region = np.char.add("H", rng.integers(1, 10, size=n).astype(str))
    full_us = np.char.add(np.char.add(np.char.add("US>", state), ">"), dma)
    other = np.where(rng.random(n) < 0.7, np.char.add(np.char.add(country, ">"), region), country)
    geo = np.where(country == "US", np.where(rng.random(n) < 0.95, full_us, "US"), other).astype(object)
    geo[rng.random(n) < 0.005] = ""
    return geo


def _doc_terms(rng: np.random.Generator, docs: np.ndarray, vocab: np.ndarray, max_terms: int) -> pd.DataFrame:
    n_terms = rng.integers(0, max_terms + 1, size=len(docs))
    doc_col = np.repeat(docs, n_terms)
    term = vocab[rng.zipf(1.3, size=len(doc_col)) % len(vocab)]
    df = pd.DataFrame({"document_id": doc_col, "term": term,
                       "confidence_level": np.round(rng.uniform(0.01, 1.0, size=len(doc_col)), 6)})
    return df.drop_duplicates(["document_id", "term"]).reset_index(drop=True)


def generate(out_dir: str | Path, displays: int = 3000, seed: int = 0, promoted_coverage: float = 1.0,
             side_tables: tuple[str, ...] = SIDE_TABLES, days: int = 15) -> dict[str, int]:
    """Write the raw CSVs into ``out_dir``; returns the row count per written file (name without ``.csv``).

    Args:
        displays: number of displays (click rows are ~7x that).
        promoted_coverage: fraction of ads listed in promoted_content.csv (the rest is left out).
        side_tables: which of :data:`SIDE_TABLES` to write (clicks_train and events are always written).
        days: displays are spread uniformly over days ``0 .. days - 1``.
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_docs = max(300, displays // 2)
    n_ads = max(150, displays // 2)
    docs = np.sort(rng.choice(np.arange(1, 3_000_000), size=n_docs, replace=False))
    doc_pop = rng.lognormal(0.0, 1.2, size=n_docs)
    doc_pop /= doc_pop.sum()

    # ads -> promoted documents, campaigns, advertisers
    ad_ids = np.sort(rng.choice(np.arange(1, 600_000), size=n_ads, replace=False))
    advertisers = rng.integers(1, max(20, n_ads // 10), size=n_ads)
    campaigns = advertisers * 7 + rng.integers(0, 5, size=n_ads)
    ad_docs = rng.choice(docs, size=n_ads)
    quality = rng.lognormal(0.0, 0.8, size=n_ads)
    ad_pop = rng.lognormal(0.0, 1.0, size=n_ads)
    ad_pop /= ad_pop.sum()

    # events: numbered in time order
    ts = np.sort(rng.integers(0, days * 86_400_000, size=displays))
    display_ids = np.arange(1, displays + 1)
    events = pd.DataFrame({"display_id": display_ids, "uuid": _hex(rng, displays, 14),
                           "document_id": rng.choice(docs, size=displays, p=doc_pop), "timestamp": ts,
                           "platform": rng.choice([1, 2, 3], size=displays, p=[0.45, 0.45, 0.10]),
                           "geo_location": _geo(rng, displays)})

    # side tables over all documents
    topics = _doc_terms(rng, docs, np.arange(300), 5).rename(columns={"term": "topic_id"})
    entities = _doc_terms(rng, docs, _hex(rng, max(500, n_docs), 32), 4).rename(columns={"term": "entity_id"})
    categories = _doc_terms(rng, docs, np.arange(1000, 2100, 11), 3).rename(columns={"term": "category_id"})

    # clicks: k ads per display (distinct), one click by quality x topic overlap (Gumbel-max)
    k = rng.integers(2, 13, size=displays)
    cand = pd.DataFrame({"display_id": np.repeat(display_ids, k + 6)})
    cand["ad"] = rng.choice(n_ads, size=len(cand), p=ad_pop)
    cand = cand.drop_duplicates(["display_id", "ad"])
    cand = cand[cand.groupby("display_id").cumcount().to_numpy() < k[cand["display_id"].to_numpy() - 1]]
    short = cand.groupby("display_id").size().reindex(display_ids, fill_value=0) < 2
    if short.any():  # rare: too few distinct candidates; top up with unused ads
        extra = []
        for d in display_ids[short.to_numpy()]:
            have = set(cand.loc[cand["display_id"] == d, "ad"])
            extra += [(d, a) for a in rng.permutation(n_ads) if a not in have][: 2 - len(have)]
        cand = pd.concat([cand, pd.DataFrame(extra, columns=["display_id", "ad"])])
    cand = cand.sort_values("display_id", kind="mergesort").reset_index(drop=True)
    doc_topics = topics.groupby("document_id")["topic_id"].apply(frozenset)
    ev_doc = events["document_id"].to_numpy()[cand["display_id"].to_numpy() - 1]
    t_event = doc_topics.reindex(ev_doc).to_numpy()
    t_ad = doc_topics.reindex(ad_docs[cand["ad"].to_numpy()]).to_numpy()
    overlap = np.array([isinstance(a, frozenset) and isinstance(b, frozenset) and bool(a & b)
                        for a, b in zip(t_event, t_ad, strict=True)])
    score = np.log(quality[cand["ad"].to_numpy()] * np.where(overlap, 3.0, 1.0)) + rng.gumbel(size=len(cand))
    cand["score"] = score
    winner = cand.groupby("display_id")["score"].idxmax()
    clicks = pd.DataFrame({"display_id": cand["display_id"], "ad_id": ad_ids[cand["ad"].to_numpy()],
                           "clicked": 0})
    clicks.loc[winner.to_numpy(), "clicked"] = 1

    promoted = pd.DataFrame({"ad_id": ad_ids, "document_id": ad_docs, "campaign_id": campaigns,
                             "advertiser_id": advertisers})
    if promoted_coverage < 1.0:
        promoted = promoted.sample(frac=promoted_coverage, random_state=seed).sort_values("ad_id")
    publish = _START - pd.to_timedelta(rng.exponential(200.0, size=n_docs), unit="D")
    publish = publish + pd.to_timedelta(rng.integers(-3, 0, size=n_docs) * (rng.random(n_docs) < 0.02), "D")
    publish_str = pd.Series(publish.strftime("%Y-%m-%d %H:%M:%S"), dtype=object)
    publish_str[rng.random(n_docs) < 0.05] = ""
    publisher = pd.Series(rng.integers(1, max(30, n_docs // 20), size=n_docs), dtype="Int64")
    publisher[rng.random(n_docs) < 0.05] = pd.NA
    meta = pd.DataFrame({"document_id": docs, "source_id": rng.integers(1, max(50, n_docs // 8), size=n_docs),
                         "publisher_id": publisher, "publish_time": publish_str})

    tables = {"clicks_train": clicks, "events": events, "promoted_content": promoted, "documents_meta": meta,
              "documents_topics": topics, "documents_entities": entities, "documents_categories": categories}
    counts = {}
    for name, df in tables.items():
        if name in SIDE_TABLES and name not in side_tables:
            continue
        df.to_csv(out / f"{name}.csv", index=False)
        counts[name] = len(df)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic Outbrain raw CSVs (Kaggle formats).")
    p.add_argument("out_dir")
    p.add_argument("--displays", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--promoted-coverage", type=float, default=1.0)
    p.add_argument("--skip", nargs="*", default=[], choices=SIDE_TABLES, help="side tables not to write")
    args = p.parse_args(argv)
    counts = generate(args.out_dir, args.displays, args.seed, args.promoted_coverage,
                      tuple(t for t in SIDE_TABLES if t not in args.skip))
    for name, n in counts.items():
        print(f"{name}.csv: {n} rows")


if __name__ == "__main__":
    main()

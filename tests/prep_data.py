"""Raw files in the Criteo and Avazu formats with a planted signal, for the wd-sok-prep tests.

Both return the true click probability of every row, so a test can compute the Bayes AUC (the AUC of the
true probabilities on the rows the model is scored on): the ceiling a model of those rows can reach.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CRITEO_INTS = [f"I{i}" for i in range(1, 14)]
CRITEO_CATS = [f"C{i}" for i in range(1, 27)]
CRITEO_NAMES = ["label", *CRITEO_INTS, *CRITEO_CATS]


def hex_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct 8-digit hex strings (Criteo's hashed categorical values)."""
    return np.array([f"{v:08x}" for v in rng.choice(1 << 32, size=n, replace=False)], dtype=object)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Exact ROC AUC (ties count one half), by ranks."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    lo = 0
    while lo < len(s):  # average ranks of tied scores
        hi = lo
        while hi + 1 < len(s) and s[hi + 1] == s[lo]:
            hi += 1
        ranks[lo:hi + 1] = (lo + hi) / 2 + 1
        lo = hi + 1
    r = np.empty(len(s))
    r[order] = ranks
    pos = label == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def criteo_rows(n: int, seed: int) -> tuple[list[list[str]], np.ndarray]:
    """Criteo rows as cell strings (label, I1..I13, C1..C26) and their click probabilities [n].

    Signal: C1 (24 values, effects N(0, 1.3)), C2 (60 values, N(0, 0.8), 15% empty) and log1p(I1)
    (a count, 20% empty). I2 takes values in [-3, 40] (negatives, as in Criteo), I5 is half empty; the other
    columns are noise (2% of their cells one-off values, unseen elsewhere); C20 is 90% empty.
    """
    rng = np.random.default_rng(1000 + seed)
    vocab_rng = np.random.default_rng(7)  # the same vocabularies and effects in every file
    c1, c2 = hex_ids(vocab_rng, 24), hex_ids(vocab_rng, 60)
    e1, e2 = vocab_rng.normal(0, 1.5, 24), vocab_rng.normal(0, 1.0, 60)
    noise_vocab = [hex_ids(vocab_rng, k) for k in vocab_rng.integers(3, 60, size=24)]
    i1 = rng.geometric(0.15, n) - 1
    k1 = rng.zipf(1.6, n) % 24
    k2 = rng.integers(0, 60, n)
    has_c2 = rng.random(n) > 0.15
    has_i1 = rng.random(n) > 0.2
    logit = -1.0 + e1[k1] + np.where(has_c2, e2[k2], 0.0) + np.where(has_i1, 1.2 * (np.log1p(i1) - 1.7), -0.5)
    p = _sigmoid(logit)
    label = (rng.random(n) < p).astype(int)
    ints = [np.where(has_i1, i1.astype(str), "")]
    ints.append(rng.integers(-3, 41, n).astype(str))  # I2: negatives, never empty
    for j in range(3, 14):
        values = rng.geometric(0.05, n).astype(str)
        empty = rng.random(n) < (0.5 if j == 5 else 0.1)
        ints.append(np.where(empty, "", values))
    cats = [c1[k1], np.where(has_c2, c2[k2], "")]
    for j, vocab in enumerate(noise_vocab):
        values = vocab[rng.integers(0, len(vocab), n)]
        values = np.where(rng.random(n) < 0.02, hex_ids(rng, n), values)  # a long tail of one-off values
        empty = rng.random(n) < (0.9 if j + 3 == 20 else 0.2)
        cats.append(np.where(empty, "", values))
    columns = [label.astype(str), *ints, *cats]
    rows = [list(r) for r in zip(*columns, strict=True)]
    return rows, p


def write_criteo(path: Path, n: int, seed: int) -> np.ndarray:
    """A Criteo-format TSV (no header) of ``n`` rows; returns the click probabilities [n]."""
    rows, p = criteo_rows(n, seed)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return p


AVAZU_HEADER = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "app_id", "device_model",
                "device_type", "C14", "C15", "tags", "display"]


def write_avazu(path: Path, n: int, seed: int, group_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """An Avazu-format CSV (header; hex-string ids, an hour column YYMMDDHH, one per display group, click
    label) with a multi-hot ``tags`` column ("|"-separated, sometimes empty) and an integer ``display`` group
    id (``group_size`` consecutive rows). Signal: site_id (40 values), banner_pos, the tag "t0".
    Returns (p [n], hour [n])."""
    rng = np.random.default_rng(2000 + seed)
    vocab_rng = np.random.default_rng(11)
    sites, domains, apps, models = (hex_ids(vocab_rng, k) for k in (40, 25, 30, 80))
    e_site = vocab_rng.normal(0, 1.2, 40)
    tag_names = np.array([f"t{i}" for i in range(12)], dtype=object)
    k_site = rng.integers(0, 40, n)
    banner = rng.choice([0, 1, 2, 7], n, p=[0.6, 0.3, 0.07, 0.03])
    n_tags = rng.integers(0, 4, n)
    tags = [tag_names[rng.choice(12, size=k, replace=False)] for k in n_tags]
    has_t0 = np.array([("t0" in t) for t in tags])
    logit = -1.2 + e_site[k_site] + np.where(banner == 1, 0.8, 0.0) + np.where(has_t0, 1.0, 0.0)
    p = _sigmoid(logit)
    label = (rng.random(n) < p).astype(int)
    display = 1000 * (seed + 1) + np.arange(n) // group_size
    group_hour = 14102100 + 100 * rng.integers(0, 3, n) + rng.integers(0, 24, n)  # one hour per display
    hour = group_hour[np.arange(n) // group_size]
    lines = [",".join(AVAZU_HEADER)]
    for i in range(n):
        lines.append(",".join([
            str(int(rng.integers(1 << 62))), str(label[i]), str(hour[i]), str(1005 + i % 3), str(banner[i]),
            sites[k_site[i]], domains[i % 25], apps[rng.integers(0, 30)], models[rng.integers(0, 80)],
            str(1 + i % 2), str(15000 + rng.integers(0, 50)), "320", "|".join(tags[i]), str(display[i])]))
    path.write_text("\n".join(lines) + "\n")
    return p, hour

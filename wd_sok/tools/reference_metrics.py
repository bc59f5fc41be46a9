"""Reference metrics of generated data, in plain numpy: AUC, exact MAP@k, log loss, group softmax.

:mod:`wd_sok.tools.generate` reports the Bayes-optimal values of its planted signal with these.
"""

from __future__ import annotations

import numpy as np

MAP_K = 12


def group_starts(group_sizes: np.ndarray) -> np.ndarray:
    """int64[G] index of each group's first row, for consecutive groups of ``group_sizes`` (int[G])."""
    sizes = np.asarray(group_sizes, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of float[n] ``scores`` for 0/1 ``labels`` (float/int[n]); ties count 1/2 (average ranks)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    n_pos, n = int(labels.sum()), len(labels)
    if n_pos == 0 or n_pos == n:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    first = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    last = np.r_[first[1:], n]                       # tie block [first, last) has ranks first+1..last
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((first + 1 + last) / 2.0, last - first)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * (n - n_pos)))


def map_at_k(scores: np.ndarray, labels: np.ndarray, group_sizes: np.ndarray, k: int = MAP_K) -> float:
    """Exact MAP@k over consecutive groups (int[G] sizes) of float[n] scores with one click per group.

    Per group: 1/rank of the clicked row when rank <= k, else 0; rows are ranked by descending score,
    equal scores by row order (a stable sort, as ``tf.math.top_k``). Raises ValueError unless every
    group has exactly one positive label.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    sizes = np.asarray(group_sizes, dtype=np.int64)
    starts = group_starts(sizes)
    clicks = np.add.reduceat(labels.astype(np.int64), starts) if len(sizes) else np.zeros(0, np.int64)
    if sizes.sum() != len(scores) or np.any(clicks != 1):
        raise ValueError("map_at_k needs groups covering all rows with exactly one click each")
    group_of_row = np.repeat(np.arange(len(sizes)), sizes)
    clicked_row = np.flatnonzero(labels)[group_of_row]
    clicked_score = scores[clicked_row]
    ahead = (scores > clicked_score) | ((scores == clicked_score) & (np.arange(len(scores)) < clicked_row))
    rank = 1 + np.add.reduceat(ahead.astype(np.int64), starts)
    return float(np.where(rank <= k, 1.0 / rank, 0.0).mean())


def random_map_at_k(group_sizes: np.ndarray, k: int = MAP_K) -> float:
    """Expected MAP@k of a uniformly random ranking: mean over groups of (1/n) * sum_{j<=min(n,k)} 1/j."""
    sizes = np.asarray(group_sizes, dtype=np.int64)
    harmonic = np.cumsum(1.0 / np.arange(1, k + 1))
    return float((harmonic[np.minimum(sizes, k) - 1] / sizes).mean())


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean binary cross-entropy of click probabilities float[n] against 0/1 labels float[n]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean())


def group_softmax(scores: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """float64[n] softmax of ``scores`` within each consecutive group of ``group_sizes`` rows."""
    sizes = np.asarray(group_sizes, dtype=np.int64)
    starts = group_starts(sizes)
    shifted = np.exp(scores - np.repeat(np.maximum.reduceat(scores, starts), sizes))
    return shifted / np.repeat(np.add.reduceat(shifted, starts), sizes)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))

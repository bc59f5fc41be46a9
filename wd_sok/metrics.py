"""Evaluation metrics in numpy, exact and streaming: MAP@k over display groups, ROC AUC, binary cross-entropy.

They run on the host after each evaluation batch (predictions come back as numpy). Each streaming metric
exposes its state as a small float64 array (``sums()`` / ``counts()``) that ranks can allreduce (sum) before
turning it into a value with the matching static function, so multi-process evaluation stays exact.

Fixes relative to the reference implementation (NVIDIA DeepLearningExamples TF2 WideAndDeep):

* MAP counters start at 0 (the reference started them at 1), groups of any size are handled (the reference
  failed above 30 rows) and groups with zero or several clicks are skipped and counted (MAP is undefined).
* AUC is computed on probabilities (the reference fed probabilities where logits were expected).

Conventions shared by all metrics: inputs may have any shape with B elements (e.g. ``[B]`` or ``[B, 1]``) and
are flattened; a row is a click / positive iff ``label > 0.5``.
"""

from __future__ import annotations

import math

import numpy as np

#: Probabilities are clipped to [BCE_EPS, 1 - BCE_EPS] before the log (same value as Keras' backend epsilon).
BCE_EPS = 1e-7


def _flat(name: str, a: np.ndarray, dtype: type, n: int | None = None) -> np.ndarray:
    """``a`` as a 1-D array of ``dtype`` (no copy when already so); checks its length against ``n``."""
    out = np.asarray(a).reshape(-1).astype(dtype, copy=False)
    if n is not None and out.size != n:
        raise ValueError(f"{name} has {out.size} elements, expected {n}")
    return out


def _nan_lowest(p: np.ndarray) -> np.ndarray:
    """float64 ``p`` with NaN replaced by -inf (a NaN score ranks below every number)."""
    nan = np.isnan(p)
    return np.where(nan, -np.inf, p) if nan.any() else p


# ----------------------------------------------------------------------------------------------- MAP@k


class StreamingMap:
    """Exact MAP@k over display groups, fed batch by batch.

    Rows arrive sorted by map (display) id across the whole stream, but a group may straddle batch
    boundaries: the trailing (possibly incomplete) group of each batch is kept as carry and completed by the
    next batch; :meth:`finalize` flushes it at the end of the stream.

    Per group with exactly one click, the clicked row's rank is computed with a deterministic, pessimistic
    tie rule::

        rank = 1 + number of OTHER rows of the group with prob >= clicked prob

    (rows tied with the click are counted as ranked above it; a NaN prob counts as the lowest score), and
    ``AP@k = 1 / rank`` if ``rank <= k`` else 0. MAP = sum(AP) / number of scored groups. Groups without a
    click or with several clicks are skipped and counted in ``skipped_no_click`` / ``skipped_multi_click``.

    The work per batch is a handful of vectorised O(B) passes (``reduceat``), no Python loop per group.
    """

    def __init__(self, k: int = 12, check_sorted: bool = True) -> None:
        """``k``: cut-off rank (>= 1). ``check_sorted``: raise ValueError if map ids ever decrease (a
        non-sorted stream would silently split groups)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.check_sorted = check_sorted
        self.reset()

    def reset(self) -> None:
        """Forget everything (counters and carry); start a new stream."""
        self.sum_ap = 0.0
        self.n_groups = 0
        self.skipped_no_click = 0
        self.skipped_multi_click = 0
        self._carry_ids = np.empty(0, np.int64)
        self._carry_p = np.empty(0, np.float64)
        self._carry_y = np.empty(0, np.bool_)

    @property
    def pending_rows(self) -> int:
        """Rows of the trailing group held as carry (not yet scored)."""
        return int(self._carry_ids.size)

    def update(self, map_ids: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> None:
        """Add one batch of B rows.

        ``map_ids``: int (any integer dtype, cast to int64), B elements, non-decreasing, continuing the
        previous batch. ``probs``: float, B elements (predicted click probabilities). ``labels``: float or
        int, B elements (click iff > 0.5). Every complete group is scored; the last group is carried.
        """
        ids = _flat("map_ids", map_ids, np.int64)
        n = ids.size
        p = _nan_lowest(_flat("probs", probs, np.float64, n))
        y = _flat("labels", labels, np.float64, n) > 0.5
        if n == 0:
            return
        if self.check_sorted:
            if self._carry_ids.size and ids[0] < self._carry_ids[-1]:
                raise ValueError(f"map ids not sorted across batches: {self._carry_ids[-1]} then {ids[0]}")
            if n > 1 and np.any(ids[1:] < ids[:-1]):
                raise ValueError("map ids are not sorted (non-decreasing) within the batch")
        if self._carry_ids.size:
            ids = np.concatenate([self._carry_ids, ids])
            p = np.concatenate([self._carry_p, p])
            y = np.concatenate([self._carry_y, y])
        starts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        last = int(starts[-1]) if starts.size else 0
        if last:
            self._score(p[:last], y[:last], np.concatenate([[0], starts[:-1]]))
        # copies, so the carry does not keep the whole batch alive
        self._carry_ids, self._carry_p, self._carry_y = ids[last:].copy(), p[last:].copy(), y[last:].copy()

    def _score(self, p: np.ndarray, clicked: np.ndarray, starts: np.ndarray) -> None:
        """Score complete groups. ``p``: float64 [N]; ``clicked``: bool [N]; ``starts``: int [G], the first
        row of each group (starts[0] == 0, strictly increasing)."""
        n_clicks = np.add.reduceat(clicked.astype(np.int64), starts)
        one = n_clicks == 1
        self.skipped_no_click += int(np.count_nonzero(n_clicks == 0))
        self.skipped_multi_click += int(np.count_nonzero(n_clicks > 1))
        if not one.any():
            return
        sizes = np.diff(np.append(starts, p.size))
        # the clicked prob of each group (exact for one-click groups, which are the only ones used)
        p_click = np.maximum.reduceat(np.where(clicked, p, -np.inf), starts)
        beats = (p >= np.repeat(p_click, sizes)) & ~clicked
        rank = 1 + np.add.reduceat(beats.astype(np.int64), starts)[one]
        ap = np.where(rank <= self.k, 1.0 / rank, 0.0)
        self.sum_ap += float(ap.sum())
        self.n_groups += int(rank.size)

    def finalize(self) -> None:
        """End of stream: score the carried group as complete. Idempotent."""
        if self._carry_ids.size:
            self._score(self._carry_p, self._carry_y, np.zeros(1, np.int64))
            self.reset_carry()

    def reset_carry(self) -> None:
        """Drop the carried rows without scoring them."""
        self._carry_ids = self._carry_ids[:0]
        self._carry_p = self._carry_p[:0]
        self._carry_y = self._carry_y[:0]

    def sums(self) -> np.ndarray:
        """float64 [4]: [sum_ap, n_groups, n_skipped_no_click, n_skipped_multi_click], to allreduce (sum)
        over ranks before :meth:`value_from_sums`. Finalizes first (call it at the end of the stream)."""
        self.finalize()
        return np.array([self.sum_ap, self.n_groups, self.skipped_no_click, self.skipped_multi_click],
                        np.float64)

    @staticmethod
    def value_from_sums(sums: np.ndarray) -> float:
        """MAP@k = sum_ap / n_groups from (possibly allreduced) :meth:`sums`; NaN if no group was scored."""
        s = np.asarray(sums, np.float64)
        return float(s[0] / s[1]) if s[1] > 0 else math.nan

    def result(self) -> float:
        """MAP@k of this process alone (finalizes first)."""
        return self.value_from_sums(self.sums())


# ------------------------------------------------------------------------------------------------- AUC


def exact_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC by ranks (Mann-Whitney U): P(score_pos > score_neg) + 0.5 * P(tie).

    ``probs``: float, B elements; ``labels``: B elements, positive iff > 0.5. Tied scores get their mid-rank
    (a tied positive/negative pair counts 1/2); NaN scores rank lowest. O(B log B). Returns NaN if there are
    no positives or no negatives.
    """
    p = _nan_lowest(_flat("probs", probs, np.float64))
    pos = _flat("labels", labels, np.float64, p.size) > 0.5
    n_pos = int(np.count_nonzero(pos))
    n_neg = p.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mid-rank of each distinct value
    rank_sum = float(mid_rank[inverse.reshape(-1)][pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (float(n_pos) * float(n_neg))


def auc_from_counts(counts: np.ndarray) -> float:
    """ROC AUC from histogram counts (float or int [2, T]: row 0 positives, row 1 negatives per bucket,
    bucket t covering probs [t/T, (t+1)/T)). Pairs in different buckets are ordered by bucket; pairs in the
    same bucket count as ties (1/2) -- the trapezoid rule over the bucket thresholds. NaN without positives
    or negatives."""
    c = np.asarray(counts, np.float64)
    if c.ndim != 2 or c.shape[0] != 2:
        raise ValueError(f"counts must have shape [2, T], got {c.shape}")
    pos, neg = c
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    pos_above = np.cumsum(pos[::-1])[::-1] - pos  # positives in strictly higher buckets
    return float(np.dot(neg, pos_above + 0.5 * pos) / (n_pos * n_neg))


class StreamingAuc:
    """ROC AUC on probabilities, streamed through a fixed histogram of ``num_thresholds`` equal buckets over
    [0, 1] for positives and for negatives (probs outside [0, 1] are clipped into the end buckets, NaN goes
    to bucket 0). Ranks allreduce (sum) :meth:`counts`, then :func:`auc_from_counts`. The only error versus
    :func:`exact_auc` comes from pairs that share a bucket (counted as ties): at most the fraction of such
    pairs, ~1/T for spread-out scores."""

    def __init__(self, num_thresholds: int = 8000) -> None:
        if num_thresholds < 1:
            raise ValueError(f"num_thresholds must be >= 1, got {num_thresholds}")
        self.num_thresholds = int(num_thresholds)
        self._counts = np.zeros((2, self.num_thresholds), np.float64)

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> StreamingAuc:
        """A metric holding ``counts`` (float [2, T], e.g. after an allreduce)."""
        c = np.asarray(counts, np.float64)
        if c.ndim != 2 or c.shape[0] != 2:
            raise ValueError(f"counts must have shape [2, T], got {c.shape}")
        m = cls(c.shape[1])
        m._counts = c.copy()
        return m

    def reset(self) -> None:
        """Zero the histogram."""
        self._counts[:] = 0.0

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """Add B predictions. ``probs``: float, B elements in [0, 1]; ``labels``: B elements (pos iff > 0.5).
        """
        t = self.num_thresholds
        p = _flat("probs", probs, np.float64)
        pos = _flat("labels", labels, np.float64, p.size) > 0.5
        if p.size == 0:
            return
        bucket = np.clip(np.floor(np.nan_to_num(p, nan=0.0) * t), 0, t - 1).astype(np.int64)
        bucket += np.where(pos, 0, t)  # negatives in the second row
        self._counts += np.bincount(bucket, minlength=2 * t).reshape(2, t)

    def counts(self) -> np.ndarray:
        """float64 [2, T] copy: row 0 positives, row 1 negatives per bucket."""
        return self._counts.copy()

    def result(self) -> float:
        """AUC of this process's histogram."""
        return auc_from_counts(self._counts)


# ------------------------------------------------------------------------------------------------- BCE


class StreamingBce:
    """Mean binary cross-entropy ``-(y log p + (1 - y) log(1 - p))`` over all rows seen, with ``p`` clipped
    to [eps, 1 - eps] (``eps`` = :data:`BCE_EPS` = 1e-7 by default, as Keras). State: [sum, count]."""

    def __init__(self, eps: float = BCE_EPS) -> None:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.eps = float(eps)
        self.reset()

    def reset(self) -> None:
        """Zero the sums."""
        self._sum = 0.0
        self._count = 0

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """Add B rows. ``probs``: float, B elements; ``labels``: float, B elements (used as given, so soft
        labels work). A NaN prob makes the result NaN."""
        p = np.clip(_flat("probs", probs, np.float64), self.eps, 1.0 - self.eps)
        y = _flat("labels", labels, np.float64, p.size)
        self._sum += float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).sum())
        self._count += int(p.size)

    def sums(self) -> np.ndarray:
        """float64 [2]: [sum of losses, row count], to allreduce (sum) before :meth:`value_from_sums`."""
        return np.array([self._sum, self._count], np.float64)

    @staticmethod
    def value_from_sums(sums: np.ndarray) -> float:
        """Mean loss from (possibly allreduced) :meth:`sums`; NaN if no rows."""
        s = np.asarray(sums, np.float64)
        return float(s[0] / s[1]) if s[1] > 0 else math.nan

    def result(self) -> float:
        """Mean loss of this process."""
        return self.value_from_sums(self.sums())

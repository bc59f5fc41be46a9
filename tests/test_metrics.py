"""Metrics against hand-worked values and independent brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wd_sok.metrics import BCE_EPS, StreamingAuc, StreamingBce, StreamingMap, auc_from_counts, exact_auc

# ------------------------------------------------------------------------------------- references


def brute_map(ids, probs, labels, k=12):
    """Per-group python loop: (sum_ap, n_groups, n_no_click, n_multi_click), pessimistic ties."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for i, p, y in zip(ids.tolist(), probs.tolist(), labels.tolist(), strict=True):
        groups.setdefault(i, []).append((p, y))
    sum_ap, n, no, multi = 0.0, 0, 0, 0
    for rows in groups.values():
        clicks = [j for j, (_, y) in enumerate(rows) if y > 0.5]
        if not clicks:
            no += 1
            continue
        if len(clicks) > 1:
            multi += 1
            continue
        c = clicks[0]
        rank = 1 + sum(1 for j, (p, _) in enumerate(rows) if j != c and p >= rows[c][0])
        sum_ap += 1.0 / rank if rank <= k else 0.0
        n += 1
    return sum_ap, n, no, multi


def brute_auc(probs, labels):
    """O(n^2) pair count: P(pos > neg) + 0.5 P(tie)."""
    pos = [p for p, y in zip(probs, labels, strict=True) if y > 0.5]
    neg = [p for p, y in zip(probs, labels, strict=True) if y <= 0.5]
    s = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return s / (len(pos) * len(neg))


def random_groups(rng, n_groups, max_size=60):
    """Sorted ids with gaps, groups of 1..max_size rows, mostly one click, some 0 / several clicks;
    probs with ties."""
    sizes = rng.integers(1, max_size + 1, n_groups)
    ids = np.repeat(np.cumsum(rng.integers(1, 4, n_groups)) + 1000, sizes).astype(np.int64)
    labels = np.zeros(ids.size, np.float32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for s, size in zip(starts, sizes, strict=True):
        n_clicks = rng.choice([0, 1, 2, 3], p=[0.1, 0.8, 0.05, 0.05])
        labels[s + rng.choice(size, min(n_clicks, size), replace=False)] = 1.0
    probs = rng.random(ids.size).astype(np.float32)
    coarse = rng.random(ids.size) < 0.5
    probs[coarse] = np.round(probs[coarse] * 10) / 10  # plenty of ties
    return ids, probs, labels, sizes


def feed(metric, ids, probs, labels, cuts):
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        metric.update(ids[a:b], probs[a:b], labels[a:b])


# ------------------------------------------------------------------------------------------- MAP


def test_map_hand_worked_ranks_1_3_13():
    ids = np.array([10] * 3 + [11] * 4 + [12] * 13)
    probs = np.concatenate([[0.9, 0.5, 0.1], [0.8, 0.7, 0.6, 0.1], np.linspace(0.9, 0.1, 13)])
    labels = np.zeros(20)
    labels[[0, 3 + 2, 7 + 12]] = 1  # ranks 1, 3, 13
    m = StreamingMap()
    m.update(ids, probs, labels)
    assert m.pending_rows == 13  # the last group waits for more rows
    np.testing.assert_allclose(m.sums(), [1 + 1 / 3, 3, 0, 0])
    assert m.result() == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m.pending_rows == 0


def test_map_rank_12_counts_and_k():
    probs = np.linspace(0.9, 0.1, 12)
    labels = np.zeros(12)
    labels[11] = 1  # rank 12
    m = StreamingMap()
    m.update(np.zeros(12, np.int64), probs, labels)
    assert m.result() == pytest.approx(1 / 12)
    m6 = StreamingMap(k=6)
    m6.update(np.zeros(12, np.int64), probs, labels)
    assert m6.result() == 0.0


def test_map_ties_are_pessimistic_and_nan_ranks_last():
    m = StreamingMap()
    # group 0: click tied with two others at 0.5 -> rank 3; group 1: clicked prob NaN -> rank 4 (last)
    m.update(np.array([0, 0, 0, 0, 1, 1, 1, 1]),
             np.array([0.5, 0.5, 0.2, 0.5, np.nan, 0.1, 0.0, 0.3]),
             np.array([1, 0, 0, 0, 1, 0, 0, 0]))
    np.testing.assert_allclose(m.sums(), [1 / 3 + 1 / 4, 2, 0, 0])


def test_map_skipped_groups_are_counted_not_scored():
    ids = np.array([1, 1, 2, 2, 2, 3, 3, 4])
    probs = np.array([0.3, 0.4, 0.9, 0.8, 0.1, 0.2, 0.7, 0.5])
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 0])  # no click, two clicks, click (0.2 < 0.7) at rank 2, none
    m = StreamingMap()
    assert m.sums().tolist() == [0, 0, 0, 0]  # counters start at zero
    assert math.isnan(m.result())
    m.update(ids, probs, labels)
    np.testing.assert_allclose(m.sums(), [0.5, 1, 2, 1])
    assert (m.n_groups, m.skipped_no_click, m.skipped_multi_click) == (1, 2, 1)
    assert m.result() == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_matches_brute_force_with_groups_straddling_batches(seed):
    rng = np.random.default_rng(seed)
    ids, probs, labels, sizes = random_groups(rng, 250)
    assert sizes.max() > 30
    want = brute_map(ids, probs, labels)
    assert want[1] > 150 and want[2] > 0 and want[3] > 0

    cuts = np.unique(np.concatenate([[0, ids.size], np.cumsum(rng.integers(1, 150, ids.size))]))
    cuts = cuts[cuts <= ids.size]
    # coverage: some group straddles a cut, and some batch lies strictly inside one group
    inside = [a for a, b in zip(cuts[:-1], cuts[1:], strict=True)
              if 0 < a and b < ids.size and ids[a - 1] == ids[b]]
    assert inside and np.any(ids[cuts[1:-1] - 1] == ids[cuts[1:-1]])

    m = StreamingMap()
    feed(m, ids, probs, labels, cuts)
    np.testing.assert_allclose(m.sums(), want, rtol=1e-12)

    whole = StreamingMap()
    whole.update(ids, probs, labels)
    np.testing.assert_allclose(whole.sums(), want, rtol=1e-12)


def test_map_one_row_at_a_time_and_empty_batches():
    rng = np.random.default_rng(7)
    ids, probs, labels, _ = random_groups(rng, 30, max_size=40)
    m = StreamingMap()
    m.update(ids[:0], probs[:0], labels[:0])
    for i in range(ids.size):
        m.update(ids[i:i + 1], probs[i:i + 1, None], labels[i:i + 1, None])  # [B, 1] shapes are fine
        m.update(ids[:0], probs[:0], labels[:0])
    np.testing.assert_allclose(m.sums(), brute_map(ids, probs, labels), rtol=1e-12)


def test_map_sums_of_two_ranks_add_up():
    rng = np.random.default_rng(3)
    ids, probs, labels, _ = random_groups(rng, 100)
    split = int(np.searchsorted(ids, ids[ids.size // 2]))  # a group boundary
    ranks = [StreamingMap(), StreamingMap()]
    ranks[0].update(ids[:split], probs[:split], labels[:split])
    ranks[1].update(ids[split:], probs[split:], labels[split:])
    total = ranks[0].sums() + ranks[1].sums()
    want = brute_map(ids, probs, labels)
    np.testing.assert_allclose(total, want, rtol=1e-12)
    assert StreamingMap.value_from_sums(total) == pytest.approx(want[0] / want[1])


def test_map_rejects_unsorted_ids():
    m = StreamingMap()
    with pytest.raises(ValueError):
        m.update(np.array([1, 2, 1]), np.zeros(3), np.zeros(3))
    m = StreamingMap()
    m.update(np.array([5, 6]), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError):
        m.update(np.array([4]), np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError):
        m.update(np.array([7, 8]), np.zeros(3), np.zeros(2))


# ------------------------------------------------------------------------------------------- AUC


def test_exact_auc_hand_worked():
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert exact_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert exact_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert exact_auc(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0
    assert math.isnan(exact_auc(np.array([0.2, 0.3]), np.array([1, 1])))


@pytest.mark.parametrize("seed", range(4))
def test_exact_auc_equals_brute_force_pair_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    labels = (rng.random(n) < 0.4).astype(np.float32)
    labels[:2] = [0, 1]
    probs = np.round(rng.random(n), 1)  # many ties
    assert exact_auc(probs, labels) == pytest.approx(brute_auc(probs.tolist(), labels.tolist()), abs=1e-12)


def test_histogram_auc_close_to_exact_on_random_data():
    rng = np.random.default_rng(11)
    n = 200_000
    labels = (rng.random(n) < 0.2).astype(np.float32)
    probs = (1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * labels - 1.0)))).astype(np.float32)
    m = StreamingAuc()
    for a in range(0, n, 30_000):
        m.update(probs[a:a + 30_000], labels[a:a + 30_000])
    want = exact_auc(probs, labels)
    assert 0.7 < want < 0.9
    assert abs(m.result() - want) < 1e-3
    assert m.counts().sum() == n and m.counts()[0].sum() == labels.sum()


def test_histogram_auc_exact_when_scores_are_bucket_values():
    rng = np.random.default_rng(5)
    t = 100
    probs = (rng.integers(0, t, 3000) + 0.5) / t  # one value per bucket: same ties as exact
    labels = (rng.random(3000) < probs).astype(np.float64)
    m = StreamingAuc(num_thresholds=t)
    m.update(probs, labels)
    assert m.result() == pytest.approx(exact_auc(probs, labels), abs=1e-12)


def test_histogram_auc_edges_and_allreduce():
    m = StreamingAuc(num_thresholds=10)
    # 1.0 and values > 1 land in the top bucket, < 0 in the bottom one
    m.update(np.array([1.0, 1.5, -0.2, 0.0, 0.55]), np.array([1, 1, 0, 0, 1]))
    c = m.counts()
    assert c[0, 9] == 2 and c[1, 0] == 2 and c[0, 5] == 1
    assert m.result() == 1.0
    assert auc_from_counts(np.array([[0, 1], [1, 0]])) == 1.0
    assert auc_from_counts(np.array([[1, 0], [0, 1]])) == 0.0
    assert auc_from_counts(np.array([[2, 0], [2, 0]])) == 0.5
    assert math.isnan(auc_from_counts(np.array([[0, 0], [3, 1]])))
    # two "ranks": summed counts give the AUC of all data
    rng = np.random.default_rng(2)
    p, y = rng.random(1000), (rng.random(1000) < 0.5)
    a, b = StreamingAuc(50), StreamingAuc(50)
    a.update(p[:400], y[:400])
    b.update(p[400:], y[400:])
    full = StreamingAuc(50)
    full.update(p, y)
    merged = StreamingAuc.from_counts(a.counts() + b.counts())
    assert merged.result() == full.result()


# ------------------------------------------------------------------------------------------- BCE


def test_bce_hand_worked_and_streamed():
    m = StreamingBce()
    m.update(np.array([0.9]), np.array([1.0]))
    m.update(np.array([0.2, 0.5]), np.array([0.0, 1.0]))
    # -(ln 0.9 + ln 0.8 + ln 0.5) / 3
    want = (0.10536051565782628 + 0.2231435513142097 + 0.6931471805599453) / 3
    assert m.result() == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(m.sums(), [want * 3, 3])
    assert StreamingBce.value_from_sums(m.sums()) == pytest.approx(want, rel=1e-12)


def test_bce_clips_with_eps():
    assert BCE_EPS == 1e-7
    m = StreamingBce()
    m.update(np.array([0.0]), np.array([1.0]))  # -ln(1e-7)
    assert m.result() == pytest.approx(16.11809565095832, rel=1e-12)
    m = StreamingBce()
    m.update(np.array([1.0, 0.0]), np.array([1.0, 0.0]))  # both -ln(1 - 1e-7) ~ 1e-7
    assert m.result() == pytest.approx(1.00000005e-7, rel=1e-6)
    assert math.isnan(StreamingBce().result())

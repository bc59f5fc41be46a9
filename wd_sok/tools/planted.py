"""The planted signal of generated data: Zipf id popularity, seeded weights, the hidden score s(x).

See :mod:`wd_sok.tools.generate` for how rows and clicks are drawn from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wd_sok.feature_spec import FeatureSpec
from wd_sok.tools.rawids import scramble
from wd_sok.tools.reference_metrics import group_softmax, sigmoid

ZIPF_EXPONENT = 1.2          # P(rank r) ~ (r + 1) ** -1.2, truncated to the cardinality
SIGNAL_STD = {True: 1.6, False: 1.3}   # std of s(x) with / without display groups
NUMERICAL_SHARE = 0.25       # variance share of one numerical feature (a categorical feature has 1)
NO_MAP_CTR = 0.15            # mean click rate targeted without display groups


def zipf_pmf(cardinality: int, exponent: float = ZIPF_EXPONENT) -> np.ndarray:
    """float64[cardinality]: probability of each popularity rank under :func:`zipf_ranks`."""
    top = (cardinality + 1.0) ** (1.0 - exponent)
    cdf = (np.arange(1, cardinality + 2, dtype=np.float64) ** (1.0 - exponent) - 1.0) / (top - 1.0)
    return np.diff(cdf)


def zipf_ranks(rng: np.random.Generator, cardinality: int, size: int,
               exponent: float = ZIPF_EXPONENT) -> np.ndarray:
    """int64[size] popularity ranks in [0, cardinality): floor of a truncated power law on [1, card+1)."""
    top = (cardinality + 1.0) ** (1.0 - exponent)
    x = (1.0 + rng.random(size) * (top - 1.0)) ** (1.0 / (1.0 - exponent))
    return np.minimum(np.floor(x).astype(np.int64) - 1, cardinality - 1)


@dataclass
class PlantedSignal:
    """The hidden click model of a generated dataset (rebuild it with :func:`planted_signal`).

    Feature f has ``n_f`` ids: its cardinality, or for a dynamic feature its number of distinct ids (the
    capacity unless :func:`planted_signal` is told otherwise). The model lives on base ids ``[0, n_f)``; a
    dynamic feature writes ``raw_ids[f][base]`` instead, a :func:`~wd_sok.tools.rawids.scramble` of the base
    id into ``[0, 2**62)``, so a fixed and a dynamic dataset of the same spec carry the same signal.

    Attributes:
        rank_to_id: per categorical feature, int64[n_f]: base id of each popularity rank.
        weights: per categorical feature, float64[n_f]: w_f by base id, centred and scaled under the
            id distribution so each feature adds the same variance to s.
        numeric_weights: float64[n_numerical]: v, in the order of ``numerical`` (the spec's names).
        bias: b, added to s only without display groups.
        grouped: True when clicks are drawn per display group (the spec has a map channel).
        raw_ids: per dynamic feature, int64[n_f]: the written (raw) id of each base id, all distinct.
    """

    rank_to_id: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    numeric_weights: np.ndarray
    numerical: list[str]
    bias: float
    grouped: bool
    raw_ids: dict[str, np.ndarray] = field(default_factory=dict)

    def written(self, name: str, base: np.ndarray) -> np.ndarray:
        """int64[n]: the ids feature ``name`` writes for base ids int64[n] (raw ids for a dynamic feature)."""
        return self.raw_ids[name][base] if name in self.raw_ids else base

    def base(self, name: str, ids: np.ndarray) -> np.ndarray:
        """int64[n]: base ids of written ids int[n] (inverse of :meth:`written`); ValueError for a foreign id."""
        ids = np.asarray(ids).astype(np.int64)
        if name not in self.raw_ids:
            return ids
        raw = self.raw_ids[name]
        order = np.argsort(raw, kind="stable")
        pos = np.minimum(np.searchsorted(raw[order], ids), len(raw) - 1)
        found = raw[order][pos] == ids
        if not found.all():
            raise ValueError(f"feature '{name}': id {int(ids[~found][0])} is not one of its {len(raw)} raw ids")
        return order[pos]

    def score(self, table: pa.Table) -> np.ndarray:
        """float64[n]: s(x) of each row of ``table`` (columns named as the features; any int/float dtypes)."""
        s = np.zeros(table.num_rows, dtype=np.float64)
        for name, w in self.weights.items():
            column = table.column(name)
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                flat = self.base(name, pc.list_flatten(column).to_numpy(zero_copy_only=False))
                parent = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
                s += np.bincount(parent, weights=w[flat], minlength=table.num_rows)
            else:
                s += w[self.base(name, column.to_numpy())]
        for name, v in zip(self.numerical, self.numeric_weights, strict=True):
            s += v * table.column(name).to_numpy().astype(np.float64)
        return s

    def click_probability(self, scores: np.ndarray, group_sizes: np.ndarray | None) -> np.ndarray:
        """float64[n] true P(click): group softmax of s, or sigmoid(s + b) without groups."""
        if self.grouped:
            return group_softmax(scores, group_sizes)
        return sigmoid(scores + self.bias)


def _bias_for_ctr(std: float, ctr: float) -> float:
    """b with E[sigmoid(std * z + b)] = ctr for z ~ N(0, 1) (bisection on a quadrature grid)."""
    z = np.linspace(-8.0, 8.0, 2001)
    pdf = np.exp(-0.5 * z * z)
    pdf /= pdf.sum()
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if (sigmoid(std * z + mid) * pdf).sum() < ctr else (lo, mid)
    return 0.5 * (lo + hi)


def planted_signal(spec: FeatureSpec, seed: int = 0, distinct: dict[str, int] | None = None) -> PlantedSignal:
    """The seeded hidden model for ``spec``; :func:`generate` with the same seed uses exactly this one.

    ``distinct``: number of distinct ids per dynamic feature (default: its capacity; may exceed it).
    """
    distinct = dict(distinct or {})
    for name in distinct:
        if name not in spec.dynamic_features:
            raise ValueError(f"{spec.origin}: feature '{name}': a distinct-id count is only for dynamic features "
                             f"(dynamic: {', '.join(spec.dynamic_features) or 'none'})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    grouped = spec.map_feature is not None
    shares = len(spec.categorical) + NUMERICAL_SHARE * len(spec.numerical)
    unit_var = SIGNAL_STD[grouped] ** 2 / shares if shares else 0.0
    rank_to_id: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    raw_ids: dict[str, np.ndarray] = {}
    for name in spec.categorical:
        card = distinct.get(name, spec.cardinality(name))
        perm = rng.permutation(card).astype(np.int64)
        w = rng.standard_normal(card)
        p = np.empty(card)
        p[perm] = zipf_pmf(card)
        w -= (p * w).sum()
        var = (p * w * w).sum()
        mean_hot = (1 + spec.max_hotness(name)) / 2.0 if name in spec.multihot else 1.0
        w = w * np.sqrt(unit_var / mean_hot / var) if var > 1e-12 else np.zeros(card)
        rank_to_id[name], weights[name] = perm, w
        if spec.dynamic(name) is not None:
            raw_ids[name] = scramble(np.arange(card), seed, name)
    v = rng.standard_normal(len(spec.numerical))
    if len(v):
        v *= np.sqrt(unit_var * NUMERICAL_SHARE * len(v)) / max(np.linalg.norm(v), 1e-12)
    bias = 0.0 if grouped else _bias_for_ctr(SIGNAL_STD[False], NO_MAP_CTR)
    return PlantedSignal(rank_to_id, weights, v, spec.numerical, bias, grouped, raw_ids)

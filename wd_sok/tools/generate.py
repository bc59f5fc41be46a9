"""Synthetic click logs with a planted, known signal, generated from any valid feature spec.

Rows come in display groups of 2-12 consecutive rows with exactly one click each (or, without a ``map``
channel, independent rows with Bernoulli clicks). A hidden score

    s(x) = sum_f w_f[id_f]  (+ sum over the ids of each multi-hot list)  +  v . numerics

with seeded weights decides the clicks: within a group the click is drawn from ``softmax(s)``; without
groups a row clicks with probability ``sigmoid(s + b)``. Ranking by ``s`` is monotone in the true
posterior, so the Bayes-optimal AUC / MAP@12 are those of ``s`` on the generated test labels; the report
gives them, with the Bayes log loss (of the true click probabilities) and the MAP@12 of a random ranking.

Data layout written into ``out_dir``:
    feature_spec.yaml        paths relative to out_dir, explicit dtypes, the input's embedding_dim kept
    train/part_<i>.<ext>     ``train_files`` files; groups never span two files
    test/part_<i>.<ext>      ``test_files`` files, sorted by the map id, split only at group boundaries
    generator_report.json    the report returned by :func:`generate`

Columns: one-hot ids int (spec dtype) in [0, cardinality), Zipf-skewed with exponent ``ZIPF_EXPONENT``
(popular ids repeat; a seeded permutation decides which ids are popular); multi-hot ``list<int>`` of
1..max_hotness ids drawn the same way (duplicates inside a list are possible); numerics standard normal;
label 0/1; map ids strictly increasing per group with gaps of 1-3 (like a subset of real display ids).
CSV files (``file_format="csv"``, for ``wd-sok-transcode``) have a header row; a multi-hot cell is its
ids separated by one space (``"5 17 3"``). Train groups are kept contiguous too (the train mapping just
carries no map column), so a train file has about 1/7 clicks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from wd_sok.feature_spec import TEST, TRAIN, FeatureSpec, SpecError
from wd_sok.tools.transcode import SPEC_FILE, atomic_output_dir, check_parquet_dtypes, output_spec_dict

ZIPF_EXPONENT = 1.2          # P(rank r) ~ (r + 1) ** -1.2, truncated to the cardinality
SIGNAL_STD = {True: 1.6, False: 1.3}   # std of s(x) with / without display groups
NUMERICAL_SHARE = 0.25       # variance share of one numerical feature (a categorical feature has 1)
NO_MAP_CTR = 0.15            # mean click rate targeted without display groups
MIN_GROUP, MAX_GROUP = 2, 12
MAP_K = 12
MULTIHOT_SEPARATOR = " "     # CSV encoding of a multi-hot cell: ids joined by this
REPORT_FILE = "generator_report.json"
FORMATS = ("parquet", "csv")


# ----------------------------------------------------------------------------- metrics
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


# ----------------------------------------------------------------------------- the planted signal
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

    Attributes:
        rank_to_id: per categorical feature, int64[cardinality]: id of each popularity rank.
        weights: per categorical feature, float64[cardinality]: w_f, centred and scaled under the
            id distribution so each feature adds the same variance to s.
        numeric_weights: float64[n_numerical]: v, in the order of ``numerical`` (the spec's names).
        bias: b, added to s only without display groups.
        grouped: True when clicks are drawn per display group (the spec has a map channel).
    """

    rank_to_id: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    numeric_weights: np.ndarray
    numerical: list[str]
    bias: float
    grouped: bool

    def score(self, table: pa.Table) -> np.ndarray:
        """float64[n]: s(x) of each row of ``table`` (columns named as the features; any int/float dtypes)."""
        s = np.zeros(table.num_rows, dtype=np.float64)
        for name, w in self.weights.items():
            column = table.column(name)
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
                parent = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
                s += np.bincount(parent, weights=w[flat], minlength=table.num_rows)
            else:
                s += w[column.to_numpy().astype(np.int64)]
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


def planted_signal(spec: FeatureSpec, seed: int = 0) -> PlantedSignal:
    """The seeded hidden model for ``spec``; :func:`generate` with the same seed uses exactly this one."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    grouped = spec.map_feature is not None
    shares = len(spec.categorical) + NUMERICAL_SHARE * len(spec.numerical)
    unit_var = SIGNAL_STD[grouped] ** 2 / shares if shares else 0.0
    rank_to_id: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    for name in spec.categorical:
        card = spec.cardinality(name)
        perm = rng.permutation(card).astype(np.int64)
        w = rng.standard_normal(card)
        p = np.empty(card)
        p[perm] = zipf_pmf(card)
        w -= (p * w).sum()
        var = (p * w * w).sum()
        mean_hot = (1 + spec.max_hotness(name)) / 2.0 if name in spec.multihot else 1.0
        w = w * np.sqrt(unit_var / mean_hot / var) if var > 1e-12 else np.zeros(card)
        rank_to_id[name], weights[name] = perm, w
    v = rng.standard_normal(len(spec.numerical))
    if len(v):
        v *= np.sqrt(unit_var * NUMERICAL_SHARE * len(v)) / max(np.linalg.norm(v), 1e-12)
    bias = 0.0 if grouped else _bias_for_ctr(SIGNAL_STD[False], NO_MAP_CTR)
    return PlantedSignal(rank_to_id, weights, v, spec.numerical, bias, grouped)


# ----------------------------------------------------------------------------- rows
def draw_group_sizes(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    """int64[G] group sizes in [2, 12] summing to ``n_rows`` (>= 2)."""
    if n_rows < MIN_GROUP:
        raise ValueError(f"need at least {MIN_GROUP} rows to form a display group, got {n_rows}")
    sizes = rng.integers(MIN_GROUP, MAX_GROUP + 1, size=n_rows // MIN_GROUP + 1)
    keep = int(np.searchsorted(np.cumsum(sizes), n_rows, side="right"))
    sizes = sizes[:keep]
    rest = n_rows - int(sizes.sum())
    if rest == 1:                     # too small for a group: grow the last group, or move a row from it
        grow = bool(sizes[-1] < MAX_GROUP)
        sizes[-1] += 1 if grow else -1
        rest = 0 if grow else 2
    return np.concatenate([sizes, [rest]]).astype(np.int64) if rest else sizes.astype(np.int64)


def draw_rows(spec: FeatureSpec, signal: PlantedSignal, rng: np.random.Generator,
              n_rows: int) -> tuple[pa.Table, np.ndarray | None, np.ndarray, np.ndarray]:
    """Draw ``n_rows`` rows of every channel feature.

    Returns (table with all channel features incl. the map column when grouped, group sizes int64[G] or
    None, scores s float64[n], true click probabilities float64[n]).
    """
    sizes = draw_group_sizes(rng, n_rows) if signal.grouped else None
    columns: dict[str, pa.Array] = {}
    if sizes is not None and spec.map_feature:
        display, dtype = np.cumsum(rng.integers(1, 4, size=len(sizes))) - 1, spec.dtype(spec.map_feature)
        if display[-1] > np.iinfo(dtype).max:
            raise ValueError(f"feature '{spec.map_feature}': {len(sizes)} display ids do not fit '{dtype}'")
        columns[spec.map_feature] = pa.array(np.repeat(display, sizes).astype(dtype))
    for name in spec.onehot:
        ranks = zipf_ranks(rng, spec.cardinality(name), n_rows)
        columns[name] = pa.array(signal.rank_to_id[name][ranks].astype(spec.dtype(name)))
    for name in spec.multihot:
        lengths = rng.integers(1, spec.max_hotness(name) + 1, size=n_rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = signal.rank_to_id[name][zipf_ranks(rng, spec.cardinality(name), int(offsets[-1]))]
        list_type = pa.list_(pa.from_numpy_dtype(np.dtype(spec.dtype(name))))
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                 pa.array(ids.astype(spec.dtype(name)))).cast(list_type)
    for name in spec.numerical:
        columns[name] = pa.array(rng.standard_normal(n_rows, dtype=np.float32).astype(spec.dtype(name)))
    table = pa.table(columns) if columns else pa.table({"_": pa.nulls(n_rows)}).drop(["_"])
    scores = signal.score(table)
    probs = signal.click_probability(scores, sizes)
    labels = np.zeros(n_rows, dtype=spec.dtype(spec.label))
    if sizes is not None:             # Gumbel-max: the argmax of s + Gumbel noise is a softmax draw
        starts = group_starts(sizes)
        noisy = scores + rng.gumbel(size=n_rows)
        labels[np.lexsort((-noisy, np.repeat(np.arange(len(sizes)), sizes)))[starts]] = 1
    else:
        labels[rng.random(n_rows) < probs] = 1
    return table.append_column(spec.label, pa.array(labels)), sizes, scores, probs


def split_points(n_rows: int, sizes: np.ndarray | None, n_files: int, what: str) -> np.ndarray:
    """int64[n_files + 1] row boundaries of ``n_files`` non-empty files, at group starts when grouped."""
    if n_files < 1:
        raise ValueError(f"{what}: need at least one file, got {n_files}")
    if sizes is None:
        if n_rows < n_files:
            raise ValueError(f"{what}: {n_rows} rows cannot fill {n_files} files")
        return np.linspace(0, n_rows, n_files + 1).round().astype(np.int64)
    if len(sizes) < n_files:
        raise ValueError(f"{what}: {len(sizes)} display groups ({n_rows} rows) cannot fill {n_files} files; "
                         f"ask for more rows or fewer files")
    bounds = np.concatenate([group_starts(sizes), [n_rows]])
    return bounds[np.linspace(0, len(sizes), n_files + 1).round().astype(np.int64)]


# ----------------------------------------------------------------------------- output
def csv_ready(table: pa.Table) -> pa.Table:
    """``table`` with each list column turned into strings of ids joined by ``MULTIHOT_SEPARATOR``."""
    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type):
            text = pc.binary_join(pc.cast(table.column(i), pa.list_(pa.string())), MULTIHOT_SEPARATOR)
            table = table.set_column(i, field.name, text)
    return table


def generate(spec: FeatureSpec, out_dir: str | Path, n_train: int, n_test: int, train_files: int = 4,
             test_files: int = 2, seed: int = 0, file_format: str = "parquet",
             overwrite: bool = False) -> dict[str, Any]:
    """Write a synthetic dataset for ``spec`` into ``out_dir`` (see the module docstring); return the report.

    The report (also ``out_dir/generator_report.json``) has ``rows`` {train, test}, ``bayes_auc``,
    ``bayes_logloss``, ``ctr`` {train, test}, ``train`` {bayes_auc, bayes_logloss} and, only when the
    spec has a map channel, ``groups`` {train, test}, ``bayes_map12`` and ``random_map12``.
    Test data and the hidden model do not depend on ``n_train`` nor on ``file_format``.
    """
    if file_format not in FORMATS:
        raise ValueError(f"file_format must be one of {', '.join(FORMATS)}, got {file_format!r}")
    check_parquet_dtypes(spec)        # CSV output is only for the transcoder, which writes parquet
    signal = planted_signal(spec, seed)
    ext = file_format
    report: dict[str, Any] = {"rows": {TRAIN: n_train, TEST: n_test}, "seed": seed, "format": file_format}
    files: dict[str, list[str]] = {}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        plan = ((TRAIN, n_train, train_files, 1), (TEST, n_test, test_files, 2))
        for mapping, n_rows, n_files, stream in plan:
            rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
            if n_rows < 1:
                raise ValueError(f"{mapping}: need at least one row, got {n_rows}")
            table, sizes, scores, probs = draw_rows(spec, signal, rng, n_rows)
            bounds = split_points(n_rows, sizes, n_files, mapping)
            labels = table.column(spec.label).to_numpy()
            stats = {"bayes_auc": auc(scores, labels), "bayes_logloss": logloss(probs, labels)}
            if sizes is not None:
                stats.update(bayes_map12=map_at_k(scores, labels, sizes), random_map12=random_map_at_k(sizes))
                report.setdefault("groups", {})[mapping] = len(sizes)
            report.setdefault("ctr", {})[mapping] = float(labels.mean(dtype=np.float64))
            if mapping == TRAIN:
                report[TRAIN] = {k: stats[k] for k in ("bayes_auc", "bayes_logloss")}
            else:
                report.update(stats)
            table = table.select([n for n in spec.features_in(mapping) if n in table.column_names])
            if file_format == "csv":
                table = csv_ready(table)
            (tmp / mapping).mkdir()
            files[mapping] = []
            for i in range(n_files):
                rel = f"{mapping}/part_{i}.{ext}"
                part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
                if file_format == "csv":
                    pacsv.write_csv(part, tmp / rel, pacsv.WriteOptions(quoting_style="needed"))
                else:
                    pq.write_table(part, tmp / rel)
                files[mapping].append(rel)
        out_spec = FeatureSpec.from_dict(output_spec_dict(spec, files, ext), base_directory=tmp,
                                         origin=str(Path(out_dir) / SPEC_FILE), allow_csv=True)
        out_spec.to_yaml(tmp / SPEC_FILE)
        sizes_file = spec.base_directory / "embedding_sizes.json"
        if sizes_file.is_file():
            shutil.copyfile(sizes_file, tmp / sizes_file.name)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``wd-sok-generate``: print the report as one JSON line, then a human summary; exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="wd-sok-generate", description=__doc__.splitlines()[0])
    parser.add_argument("--feature_spec_in", required=True, help="feature spec YAML to generate data for")
    parser.add_argument("--output", required=True, help="output folder (missing or empty)")
    parser.add_argument("--train_rows", type=int, required=True)
    parser.add_argument("--test_rows", type=int, required=True)
    parser.add_argument("--train_files", type=int, default=4)
    parser.add_argument("--test_files", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=FORMATS, default="parquet")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        spec = FeatureSpec.from_yaml(args.feature_spec_in, allow_csv=True)
        report = generate(spec, args.output, args.train_rows, args.test_rows, args.train_files,
                          args.test_files, args.seed, args.format, args.overwrite)
    except (SpecError, ValueError, OSError) as e:
        print(f"wd-sok-generate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    ranking = (f", MAP@12 {report['bayes_map12']:.4f} (random {report['random_map12']:.4f})"
               if "bayes_map12" in report else "")
    print(f"wrote {args.train_rows} train / {args.test_rows} test rows ({args.format}, {args.train_files}+"
          f"{args.test_files} files) to {args.output} in {time.perf_counter() - start:.1f} s; Bayes-optimal "
          f"test AUC {report['bayes_auc']:.4f}{ranking}, logloss {report['bayes_logloss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

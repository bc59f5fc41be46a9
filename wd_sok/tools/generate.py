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
1..max_hotness ids drawn the same way (duplicates inside a list are possible). A dynamic feature's ids are
int64 raw ids in [0, 2**62): base id b in [0, n) (n distinct ids: the capacity, or ``dynamic_distinct``)
written as ``scramble(b)`` (:mod:`wd_sok.tools.rawids`, a keyed bijection, so no two ids collide);
``--dynamic F[=C]`` turns fixed feature F into such a feature (capacity C, default its cardinality) with the
same rows and labels; numerics standard normal;
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from wd_sok.feature_spec import TEST, TRAIN, FeatureSpec, SpecError
from wd_sok.tools.outdir import SPEC_FILE, atomic_output_dir, check_parquet_dtypes, output_spec_dict
from wd_sok.tools.planted import (  # noqa: F401 - re-exported: the generator's public names
    ZIPF_EXPONENT,
    PlantedSignal,
    planted_signal,
    zipf_pmf,
    zipf_ranks,
)
from wd_sok.tools.rawids import dynamic_variant, parse_counts, parse_features
from wd_sok.tools.reference_metrics import (  # noqa: F401 - auc and group_starts are re-exported for callers
    MAP_K,
    auc,
    group_softmax,
    group_starts,
    logloss,
    map_at_k,
    random_map_at_k,
    sigmoid,
)

MIN_GROUP, MAX_GROUP = 2, 12
MULTIHOT_SEPARATOR = " "     # CSV encoding of a multi-hot cell: ids joined by this
REPORT_FILE = "generator_report.json"
FORMATS = ("parquet", "csv")


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
        ranks = zipf_ranks(rng, len(signal.weights[name]), n_rows)
        columns[name] = pa.array(signal.written(name, signal.rank_to_id[name][ranks]).astype(spec.dtype(name)))
    for name in spec.multihot:
        lengths = rng.integers(1, spec.max_hotness(name) + 1, size=n_rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = signal.written(name, signal.rank_to_id[name][zipf_ranks(rng, len(signal.weights[name]),
                                                                      int(offsets[-1]))])
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
    for i, column_field in enumerate(table.schema):
        if pa.types.is_list(column_field.type):
            text = pc.binary_join(pc.cast(table.column(i), pa.list_(pa.string())), MULTIHOT_SEPARATOR)
            table = table.set_column(i, column_field.name, text)
    return table


def generate(spec: FeatureSpec, out_dir: str | Path, n_train: int, n_test: int, train_files: int = 4,
             test_files: int = 2, seed: int = 0, file_format: str = "parquet", overwrite: bool = False,
             dynamic: Sequence[str] | Mapping[str, int | None] = (),
             dynamic_distinct: dict[str, int] | int | None = None) -> dict[str, Any]:
    """Write a synthetic dataset for ``spec`` into ``out_dir`` (see the module docstring); return the report.

    ``dynamic``: fixed categorical features written as dynamic ones (int64, ``dynamic: {capacity: C}``, C the
    mapping's value or the cardinality): the same rows and labels as without, each id replaced by its
    scramble, whatever C. ``dynamic_distinct``: the number of distinct ids of every dynamic feature (an int)
    or per feature (a dict); default: the cardinality of a converted feature, else the capacity.
    The report (also ``out_dir/generator_report.json``) has ``rows`` {train, test}, ``bayes_auc``,
    ``bayes_logloss``, ``ctr`` {train, test}, ``train`` {bayes_auc, bayes_logloss}, only when the
    spec has a map channel ``groups`` {train, test}, ``bayes_map12`` and ``random_map12``, and only with
    dynamic features ``dynamic`` {feature: {capacity, distinct, seen_in_train}}.
    Test data and the hidden model do not depend on ``n_train`` nor on ``file_format``.
    """
    if file_format not in FORMATS:
        raise ValueError(f"file_format must be one of {', '.join(FORMATS)}, got {file_format!r}")
    converted = {n: spec.cardinality(n) for n in dynamic if n in spec.categorical and spec.dynamic(n) is None}
    if dynamic:
        spec = FeatureSpec.from_dict(dynamic_variant(spec.to_dict(), dynamic, spec.origin),
                                     base_directory=spec.base_directory, origin=spec.origin, allow_csv=True)
    check_parquet_dtypes(spec)        # CSV output is only for the transcoder, which writes parquet
    for name in spec.dynamic_features:
        if spec.dtype(name) != "int64":
            raise ValueError(f"{spec.origin}: feature '{name}': dynamic ids reach 2**62; declare dtype int64, "
                             f"not {spec.dtype(name)}")
    if isinstance(dynamic_distinct, int):
        dynamic_distinct = dict.fromkeys(spec.dynamic_features, dynamic_distinct)
    signal = planted_signal(spec, seed, converted | (dynamic_distinct or {}))
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
            for name in signal.raw_ids:
                info = report.setdefault("dynamic", {}).setdefault(name, {
                    "capacity": spec.cardinality(name), "distinct": len(signal.raw_ids[name])})
                if mapping == TRAIN:
                    column = table.column(name)
                    ids = pc.list_flatten(column) if pa.types.is_list(column.type) else column
                    info["seen_in_train"] = len(np.unique(ids.to_numpy(zero_copy_only=False)))
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
    parser.add_argument("--dynamic", default="", metavar="FEATURE[=CAPACITY][,...]",
                        help="write these fixed categorical features as dynamic ones (capacity: CAPACITY, "
                             "default their cardinality; int64 raw ids = a scramble of the fixed ids: the same "
                             "rows and labels whatever the capacity)")
    parser.add_argument("--dynamic_distinct", default="", metavar="N|FEATURE=N[,...]",
                        help="distinct ids of every (or of each named) dynamic feature (default: a --dynamic "
                             "feature's cardinality, else the capacity)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        spec = FeatureSpec.from_yaml(args.feature_spec_in, allow_csv=True)
        report = generate(spec, args.output, args.train_rows, args.test_rows, args.train_files,
                          args.test_files, args.seed, args.format, args.overwrite,
                          parse_features(args.dynamic, "--dynamic"),
                          parse_counts(args.dynamic_distinct, "--dynamic_distinct"))
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

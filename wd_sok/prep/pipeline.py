"""A prep run, end to end: stage (check + split) -> fit the workflow on train -> write parts, spec, workflow.

Output folder (written into a temporary folder beside it and renamed into place only when complete, so a
failed run leaves nothing)::

    OUTPUT/feature_spec.yaml        # channels, dtypes, cardinalities, embedding widths, files, metadata
    OUTPUT/train/part_<i>.parquet   # features + label, input order
    OUTPUT/test/part_<i>.parquet    # features + label (+ map, sorted by it, groups never split)
    OUTPUT/workflow/                # the fitted NVTabular workflow (+ its vocabularies), for --apply
    OUTPUT/prep.json                # options, cardinalities, dtypes: how --apply reads and writes
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wd_sok.prep import write
from wd_sok.prep.errors import PrepError
from wd_sok.prep.options import OPTIONS_FILE, SPEC_FILE, WORKFLOW_DIR, PrepOptions
from wd_sok.prep.spec import build_spec, column_dtypes
from wd_sok.prep.stage import Stager, StageStats, expand
from wd_sok.prep.workflow import fit, log_columns
from wd_sok.tools.outdir import atomic_output_dir

logger = logging.getLogger("wd_sok.prep")


@dataclass
class PrepResult:
    """What a run wrote: rows and part files per split, table rows per categorical feature, log columns."""

    output: Path
    rows: dict[str, int]
    files: dict[str, list[str]]
    cardinalities: dict[str, int]
    log_columns: list[str]
    cpu: bool
    seconds: float


def quiet_merlin() -> None:
    """Silence NVTabular's CPU-mode and dtype-table warnings (they say nothing about the user's data)."""
    for message in (".*CPU mode.*", ".*dtype mappings did not load.*", ".*experimental.*"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def use_cpu(device: str) -> bool:
    """True when NVTabular runs on CPU (``auto``: GPU when cudf can use one). PrepError for a missing GPU."""
    from wd_sok.outbrain.pipeline import detect_cpu

    try:
        return detect_cpu(device)
    except (RuntimeError, ValueError) as e:
        raise PrepError(f"--device {device}: {e}") from None


def check_present(stats: StageStats, opts: PrepOptions, where: str) -> None:
    """PrepError for a feature column with no value at all in the training rows."""
    for name in opts.features:
        if not stats.present.get(name, 0):
            raise PrepError(f"{where}: column '{name}': every value is missing in the "
                            f"{stats.rows['train']:,} training rows")


def _ids(files: list[Path], name: str) -> set[int]:
    import pyarrow.parquet as pq

    return {int(v) for f in files for v in pq.read_table(f, columns=[name]).column(0).unique().to_pylist()}


def check_groups(stats: StageStats, map_name: str, split_by: str | None) -> None:
    """PrepError if a map group has rows in both train and test (possible when --split_by is another column)."""
    both = _ids(stats.files["train"], map_name) & _ids(stats.files["test"], map_name)
    if both:
        raise PrepError(f"column '{map_name}': group {min(both)} has rows in both train and test (split by "
                        f"'{split_by}'); split by the map column, or use a --split_by whose values hold whole groups")


def prep(opts: PrepOptions, train: str, test: str | None, output: str | Path, device: str = "auto",
         overwrite: bool = False) -> PrepResult:
    """Prepare ``train`` (and ``test``, or a ``test_fraction`` split of train) into ``output``."""
    start = time.perf_counter()
    if opts.map and opts.test_fraction and not opts.split_by:
        opts.split_by = opts.map  # a group is never split between train and test
    opts.check()
    if bool(test) == bool(opts.test_fraction):
        raise PrepError("give either --test FILE|GLOB or --test_fraction F (not both)" if test else
                        "no test data: give --test FILE|GLOB or --test_fraction F")
    if opts.split_by and not opts.test_fraction:
        raise PrepError("--split_by needs --test_fraction")
    train_files = expand(train, "--train")
    test_files = expand(test, "--test") if test else []
    cpu = use_cpu(device)
    out = Path(output)
    with atomic_output_dir(out, overwrite) as tmp:
        stager = Stager(opts, tmp / ".stage")
        stager.stage_files(train_files, "train")
        stager.stage_files(test_files, "test")
        stats = stager.finish()
        where = str(train_files[0]) if len(train_files) == 1 else f"--train {train}"
        if not stats.rows["train"]:
            raise PrepError(f"{where}: no training rows" + (" left after the split" if opts.test_fraction else ""))
        if not stats.rows["test"]:
            raise PrepError(f"--test_fraction {opts.test_fraction}: no row fell into test (raise it)" if
                            opts.test_fraction else f"--test {test}: no rows")
        check_present(stats, opts, where)
        if opts.map and opts.test_fraction:
            check_groups(stats, opts.map, opts.split_by)
        logger.info("staged %s train and %s test rows; fitting the workflow (%s)", f"{stats.rows['train']:,}",
                    f"{stats.rows['test']:,}", "cpu" if cpu else "gpu")
        workflow, cards = fit(opts, stats, tmp / WORKFLOW_DIR, cpu)
        dtypes = column_dtypes(opts, cards)
        columns = opts.features + [opts.label]
        files = {"train": write.write_split(workflow, stats.files["train"], stats.rows["train"], tmp, "train",
                                            opts, dtypes, cards, columns, cpu)}
        if opts.map:
            files["test"] = write.write_sorted(workflow, stats.files["test"], stats.rows["test"], tmp, "test", opts,
                                               dtypes, cards, columns + [opts.map], cpu, tmp / ".stage" / "sort")
        else:
            files["test"] = write.write_split(workflow, stats.files["test"], stats.rows["test"], tmp, "test", opts,
                                              dtypes, cards, columns, cpu)
        workflow.save(str(tmp / WORKFLOW_DIR))
        logs = log_columns(opts, stats)
        hotness = {n: max(1, stats.hotness.get(n, 1)) for n in opts.multihot}
        saved = {"options": json.loads(opts.to_json()), "cardinalities": cards, "dtypes": dtypes,
                 "max_hotness": hotness, "log_columns": logs}
        (tmp / OPTIONS_FILE).write_text(json.dumps(saved, indent=1))
        metadata = _metadata(opts, train, test, stats, cards, logs, cpu)
        spec = build_spec(out / SPEC_FILE, tmp, opts, cards, hotness, files, metadata)
        spec.to_yaml(tmp / SPEC_FILE)
        shutil.rmtree(tmp / ".stage", ignore_errors=True)
    seconds = time.perf_counter() - start
    return PrepResult(out, dict(stats.rows), files, cards, logs, cpu, seconds)


def _metadata(opts: PrepOptions, train: str, test: str | None, stats: StageStats, cards: dict[str, int],
              logs: list[str], cpu: bool) -> dict[str, Any]:
    import nvtabular

    if test:
        split = f"train = --train {train}, test = --test {test}"
    else:
        key = f"its '{opts.split_by}' value" if opts.split_by else "its row number in input order"
        split = f"test iff uniform_hash({key}, seed {opts.seed}) < {opts.test_fraction}"
    return {
        "generated_by": "wd_sok.prep", "nvtabular": nvtabular.__version__, "backend": "cpu" if cpu else "gpu",
        "split": split + (f"; test sorted by '{opts.map}', groups never split across files" if opts.map else ""),
        "rows": dict(stats.rows),
        "ids": "0 = unseen in train or rarer than freq_threshold / past max_vocab; 1.. = training vocabulary; "
               "a missing cell is the category ''" + ("; hashed columns: hash % buckets" if opts.hash_buckets
                                                      else ""),
        "freq_threshold": opts.freq_threshold, "max_vocab": opts.max_vocab,
        "hash_buckets": dict(opts.hash_buckets), "vocabulary_rows": dict(cards),
        "numerical": "missing -> 0; log(1 + max(x, 0)) for columns whose training minimum is >= 0 "
                     f"({', '.join(logs) or 'none'}); then (x - mean) / std of the training rows",
    }

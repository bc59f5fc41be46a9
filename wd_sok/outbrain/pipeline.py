"""End-to-end preprocessing: stage (pandas, chunked) -> fit on train (NVTabular) -> write parts + spec.

Output folder layout::

    OUTPUT_DIR/feature_spec.yaml       # channels, dtypes, cardinalities, embedding_dim, files, metadata
    OUTPUT_DIR/train/part_{i}.parquet  # 29 features (+ uuid with --uuid) + clicked
    OUTPUT_DIR/test/part_{i}.parquet   # 29 features + clicked + display_id, sorted by display_id

Scratch data goes to ``OUTPUT_DIR/.tmp`` (removed at the end); nothing is written to the working directory.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wd_sok.outbrain import features as F
from wd_sok.outbrain import rawids as R
from wd_sok.outbrain.output import build_spec, part_plan, write_parts
from wd_sok.outbrain.raw import stage
from wd_sok.outbrain.workflow import build_workflow

logger = logging.getLogger("wd_sok.outbrain")
SPEC_NAME = "feature_spec.yaml"
OUTPUTS = ("train", "test", SPEC_NAME)


@dataclass
class PreprocessResult:
    """Where the dataset went and what it holds."""

    spec_path: Path
    rows: dict[str, int]
    displays: dict[str, int]
    files: dict[str, list[str]]
    missing_tables: list[str]
    promoted_coverage: float | None
    cpu: bool
    seconds: float


def detect_cpu(device: str = "auto") -> bool:
    """True when NVTabular should run on CPU: ``device="cpu"``, or ``"auto"`` without a usable GPU + cudf.
    ``device="gpu"`` without one raises RuntimeError."""
    if device == "cpu":
        return True
    try:
        from merlin.core.compat import HAS_GPU, cudf
    except ImportError:  # pragma: no cover - merlin is a dependency
        HAS_GPU, cudf = False, None
    usable = bool(HAS_GPU) and cudf is not None
    if device == "gpu" and not usable:
        raise RuntimeError("device='gpu' requested but no GPU with cudf is available")
    if device not in ("auto", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
    return not usable


def _partitions(ddf: Any) -> Any:
    """Yield the computed partitions of a dask DataFrame, in order."""
    for i in range(ddf.npartitions):
        yield ddf.get_partition(i).compute(scheduler="synchronous")


def preprocess(input_dir: str | Path, output_dir: str | Path, seed: int = 0, rows_per_part: int = 1_000_000,
               min_parts: int = 1, chunk_rows: int = 5_000_000, device: str = "auto",
               overwrite: bool = False, raw_ids: bool = False, with_uuid: bool = False,
               raw_capacity: dict[str, int] | int | None = None) -> PreprocessResult:
    """Preprocess the raw Outbrain CSVs in ``input_dir`` into ``output_dir`` (see module docstring).

    Args:
        seed: seed of the per-display split draw and of the train row shuffle.
        rows_per_part, min_parts: each split gets ``max(min_parts, ceil(rows / rows_per_part))`` parts of
            equal size (test parts end on display boundaries, so their sizes vary slightly).
        chunk_rows: clicks_train rows joined per chunk (bounds the staging memory).
        device: "auto" (GPU when NVTabular can use one, else CPU), "cpu" or "gpu".
        overwrite: replace an existing dataset in ``output_dir`` (only train/, test/ and the spec).
        raw_ids: keep the 12 id features as int64 raw ids, declared dynamic (see :mod:`wd_sok.outbrain.rawids`).
        with_uuid: add the events' ``uuid`` as a dynamic one-hot feature (needs ``raw_ids``).
        raw_capacity: dynamic capacity of every raw-id feature (an int) or per feature (a dict); default: the
            number of distinct ids in the train split.
    """
    if with_uuid and not raw_ids:
        raise ValueError("uuid has tens of millions of values: it is a dynamic feature only (add --raw-ids)")
    if raw_capacity is not None and not raw_ids:
        raise ValueError("--raw-capacity is for --raw-ids datasets")
    raw = R.features(with_uuid) if raw_ids else []
    start = time.perf_counter()
    out = Path(output_dir)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out}: already holds {', '.join(existing)} "
                              f"(pass overwrite=True / --overwrite)")
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # scratch of an interrupted run
    try:
        return _run(Path(input_dir), out, tmp, seed, rows_per_part, min_parts, chunk_rows, device, start, raw,
                    raw_capacity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(input_dir: Path, out: Path, tmp: Path, seed: int, rows_per_part: int, min_parts: int,
         chunk_rows: int, device: str, start: float, raw: list[str],
         raw_capacity: dict[str, int] | int | None) -> PreprocessResult:
    if raw:
        R.capacities(dict.fromkeys(raw, 1), raw_capacity)  # a bad --raw-capacity fails before any work
    staged = stage(input_dir, tmp / "stage", seed=seed, chunk_rows=chunk_rows, raw_ids=bool(raw),
                   with_uuid=R.UUID_COLUMN in raw)
    logger.info("staged %s rows, %s displays", staged.rows, staged.displays)
    cpu = detect_cpu(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CPU mode.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*dtype mappings did not load.*", category=UserWarning)
        import nvtabular as nvt

        workflow = build_workflow(raw)
        train_ds = nvt.Dataset([str(p) for p in staged.train_files], engine="parquet", cpu=cpu,
                               part_size="256MB")
        workflow.fit(train_ds)
        logger.info("workflow fit on %d train rows (cpu=%s)", staged.rows["train"], cpu)
        files: dict[str, list[str]] = {}
        seen = R.DistinctIds(raw) if raw else None  # distinct train ids: the default capacities
        for split, sources in (("train", staged.train_files), ("test", staged.test_files)):
            target = part_plan(staged.rows[split], rows_per_part, min_parts)
            if sources:
                ds = nvt.Dataset([str(p) for p in sources], engine="parquet", cpu=cpu, part_size="256MB")
                frames = _partitions(workflow.transform(ds).to_ddf())
            else:
                frames = iter(())
            ids = seen if split == "train" or seen is None else R.DistinctIds(raw, collects=False)
            files[split] = write_parts(frames, out, split, target, ids)
            logger.info("wrote %d %s parts", len(files[split]), split)
    metadata = {
        "dataset": "outbrain-click-prediction", "generated_by": "wd_sok.outbrain", "seed": seed,
        "split": f"per display: train iff timestamp // {F.MS_PER_DAY} <= {F.TRAIN_MAX_DAY} and "
                 f"display_uniform(display_id, seed) > {F.TEST_FRACTION}; test sorted by display_id",
        "rows": dict(staged.rows), "displays": dict(staged.displays),
        "missing_tables": list(staged.missing_tables),
        "promoted_content_coverage": None if staged.promoted_coverage is None
        else round(staged.promoted_coverage, 6),
        "dropped_click_rows": staged.dropped_rows,
    }
    capacities = R.capacities(seen.counts(), raw_capacity) if seen is not None else None
    if capacities:
        metadata["raw_ids"] = {"features": raw, "missing_id": R.MISSING_ID, "distinct_in_train": seen.counts(),
                               "string_hash": "low 63 bits of BLAKE2b-64 of the UTF-8 text (wd_sok.tools.rawids)"}
    spec = build_spec(out, files["train"], files["test"], metadata, capacities)
    spec.to_yaml(out / SPEC_NAME)
    seconds = time.perf_counter() - start
    logger.info("done in %.1f s: %s", seconds, out / SPEC_NAME)
    return PreprocessResult(out / SPEC_NAME, dict(staged.rows), dict(staged.displays), files,
                            list(staged.missing_tables), staged.promoted_coverage, cpu, seconds)

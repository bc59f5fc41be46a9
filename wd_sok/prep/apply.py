"""``--apply DIR``: run the workflow fitted by a prep run over new (or serving) files, unchanged.

Reads the inputs exactly as the training files were read (``DIR/prep.json``: separator, header or names,
column roles), with the same checks, and transforms them with ``DIR/workflow`` (vocabularies, fill values,
log rule, means and standard deviations of the training rows; unseen values -> id 0; multi-hot lists longer
than the training maximum are cut to it). The label and the map column may be absent (serving data);
``--sep``, ``--header`` and ``--no_header --names`` override how the inputs are read.

Output (atomic, like a prep run): ``OUTPUT/part_<i>.parquet`` in the training dtypes, in input order (sorted
by map id, groups never split, when the map column is present), and, when the label is present, a
``feature_spec.yaml`` whose test mapping is these parts and whose train mapping is DIR's training parts
(absolute paths), so ``main.py --dataset_path OUTPUT --evaluate --use_checkpoint`` scores the new data.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa

from wd_sok.feature_spec import FeatureSpec, SpecError
from wd_sok.prep import write
from wd_sok.prep.errors import PrepError
from wd_sok.prep.options import OPTIONS_FILE, SPEC_FILE, WORKFLOW_DIR, PrepOptions
from wd_sok.prep.pipeline import PrepResult, use_cpu
from wd_sok.prep.spec import build_spec
from wd_sok.prep.stage import Stager, expand
from wd_sok.tools.outdir import atomic_output_dir


def _load(prep_dir: Path) -> tuple[PrepOptions, dict, FeatureSpec]:
    try:
        saved = json.loads((prep_dir / OPTIONS_FILE).read_text())
        spec = FeatureSpec.from_yaml(prep_dir / SPEC_FILE)
    except (OSError, ValueError) as e:
        raise PrepError(f"--apply {prep_dir}: not a prep output folder ({str(e).splitlines()[0]})") from None
    except SpecError as e:
        raise PrepError(f"--apply {prep_dir}: {e}") from None
    opts = PrepOptions(**saved["options"])
    opts.test_fraction, opts.split_by = 0.0, None  # apply never splits
    return opts, saved, spec


def _presence(stager: Stager, name: str) -> bool:
    """Whether every input file held ``name``; PrepError if only some did."""
    had = stager.had.get(name, [])
    if had and any(h for _, h in had) and not all(h for _, h in had):
        lacking = next(p for p, h in had if not h)
        raise PrepError(f"{lacking}: column '{name}' not found, though other --input files have it")
    return bool(had) and all(h for _, h in had)


def apply(prep_dir: str | Path, inputs: str, output: str | Path, device: str = "auto", overwrite: bool = False,
          reader: dict | None = None) -> PrepResult:
    """Transform ``inputs`` with the workflow of ``prep_dir`` into ``output`` (module docstring).

    ``reader``: overrides of how the inputs are read (``sep``, ``header``, ``names``); default: as in training.
    """
    import nvtabular as nvt

    start = time.perf_counter()
    prep_dir, out = Path(prep_dir), Path(output)
    opts, saved, train_spec = _load(prep_dir)
    for key, value in (reader or {}).items():
        setattr(opts, key, value)
    if not opts.header:
        if not opts.names:
            raise PrepError("--no_header needs --names COL1,COL2,... naming every field in order")
        for name in opts.features:
            if name not in opts.names:
                raise PrepError(f"column '{name}' (a feature of {prep_dir}) is not among --names")
    files = expand(inputs, "--input")
    cpu = use_cpu(device)
    workflow = nvt.Workflow.load(str(prep_dir / WORKFLOW_DIR))
    cards, dtypes = saved["cardinalities"], saved["dtypes"]
    with atomic_output_dir(out, overwrite) as tmp:
        stager = Stager(opts, tmp / ".stage")
        stager.fill[opts.label] = (0.0, pa.float64())
        if opts.map:
            stager.fill[opts.map] = (0, pa.int64())
        stager.stage_files(files, "train")
        rows = stager.finish().rows["train"]
        if not rows:
            raise PrepError(f"--input {inputs}: no rows")
        has_label = _presence(stager, opts.label)
        has_map = bool(opts.map) and _presence(stager, opts.map)
        columns = opts.features + ([opts.label] if has_label else []) + ([opts.map] if has_map else [])
        staged = stager.stats.files["train"]
        if has_map:
            parts = write.write_sorted(workflow, staged, rows, tmp, "", opts, dtypes, cards, columns, cpu,
                                       tmp / ".stage" / "sort")
        else:
            parts = write.write_split(workflow, staged, rows, tmp, "", opts, dtypes, cards, columns, cpu)
        if has_label:
            train_files = [str(p.resolve()) for p in train_spec.files("train")]
            metadata = dict(train_spec.metadata) | {"applied_to": inputs, "applied_from": str(prep_dir.resolve())}
            spec = build_spec(out / SPEC_FILE, tmp, opts, cards, saved["max_hotness"],
                              {"train": train_files, "test": parts}, metadata, with_map=has_map)
            spec.to_yaml(tmp / SPEC_FILE)
        shutil.rmtree(tmp / ".stage", ignore_errors=True)
    return PrepResult(out, {"input": rows}, {"input": parts}, dict(cards), list(saved["log_columns"]), cpu,
                      time.perf_counter() - start)

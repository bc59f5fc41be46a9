"""Command line: ``python -m wd_sok.outbrain INPUT_DIR OUTPUT_DIR [options]`` (or ``scripts/preproc.sh``).

Reads the Kaggle Outbrain CSVs from INPUT_DIR and writes ``train/``, ``test/`` and ``feature_spec.yaml`` into
OUTPUT_DIR. Missing optional tables produce one warning each (on stderr) and their features' fill values.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m wd_sok.outbrain",
                                description="Preprocess the Outbrain Click Prediction CSVs for Wide & Deep.")
    p.add_argument("input_dir", help="folder with clicks_train.csv, events.csv and the optional side tables")
    p.add_argument("output_dir", help="folder to write train/, test/ and feature_spec.yaml into")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-display split draw (default 0)")
    p.add_argument("--rows-per-part", type=int, default=1_000_000, help="rows per parquet part (default 1e6)")
    p.add_argument("--min-parts", type=int, default=1,
                   help="at least this many parts per split, e.g. the number of training ranks (default 1)")
    p.add_argument("--chunk-rows", type=int, default=5_000_000,
                   help="clicks_train rows joined per chunk; bounds memory (default 5e6)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="NVTabular backend: auto = GPU if cudf can use one, else CPU (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUTPUT_DIR")
    p.add_argument("--raw-ids", action="store_true",
                   help="keep the 12 id features as int64 raw ids (strings: low 63 bits of BLAKE2b-64; missing: -1) "
                        "declared dynamic, instead of hashing them into fixed buckets (default off)")
    p.add_argument("--uuid", action="store_true",
                   help="add the events' uuid (the user) as a dynamic one-hot feature; needs --raw-ids (default off)")
    p.add_argument("--raw-capacity", default="", metavar="N|FEATURE=N[,...]",
                   help="dynamic capacity of every (or each named) raw-id feature "
                        "(default: its number of distinct ids in the train split)")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # merlin imports TensorFlow for its dtype tables
    warnings.formatwarning = lambda message, category, *_, **__: f"{category.__name__}: {message}\n"
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from wd_sok.outbrain.pipeline import preprocess
    from wd_sok.tools.rawids import parse_counts

    try:
        result = preprocess(args.input_dir, args.output_dir, seed=args.seed, rows_per_part=args.rows_per_part,
                            min_parts=args.min_parts, chunk_rows=args.chunk_rows, device=args.device,
                            overwrite=args.overwrite, raw_ids=args.raw_ids, with_uuid=args.uuid,
                            raw_capacity=parse_counts(args.raw_capacity, "--raw-capacity"))
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"spec: {result.spec_path}")
    for split in ("train", "test"):
        print(f"{split}: {result.rows[split]} rows, {result.displays[split]} displays, "
              f"{len(result.files[split])} file(s)")
    if result.missing_tables:
        print(f"missing tables (fill values used): {', '.join(result.missing_tables)}")
    print(f"backend: {'cpu' if result.cpu else 'gpu'}; {result.seconds:.1f} s")
    return 0

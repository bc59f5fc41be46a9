"""Command line of ``wd-sok-prep`` / ``python -m wd_sok.prep`` (see :mod:`wd_sok.prep`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from wd_sok.prep.errors import PrepError
from wd_sok.prep.options import EMBEDDING_RULE, PrepOptions, embedding_width

PROG = "wd-sok-prep"
USAGE = """
  %(prog)s --train FILE|GLOB (--test FILE|GLOB | --test_fraction F [--split_by COL]) --label COL
           [--categorical C1,C2,...] [--numerical N1,...] [--multihot COL=SEP ...] [--map COL]
           [--sep SEP] [--no_header --names COL1,COL2,...] --output DIR
  %(prog)s --apply DIR --input FILE|GLOB --output DIR2"""
SEPARATORS = {"\\t": "\t", "tab": "\t", "space": " ", "comma": ",", "pipe": "|"}


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _sep(text: str) -> str:
    return SEPARATORS.get(text, text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, usage=USAGE, description="Raw CSV / TSV / parquet -> a trainable "
                                "parquet dataset and feature_spec.yaml (NVTabular, fit on the training rows).")
    io = p.add_argument_group("inputs and output")
    io.add_argument("--train", help="training file or glob (.csv, .tsv/.txt, .parquet)")
    io.add_argument("--test", help="test file or glob (else --test_fraction splits --train)")
    io.add_argument("--test_fraction", type=float, default=0.0, help="share of --train sent to test (by hash)")
    io.add_argument("--split_by", help="column whose value decides the split, so a group stays on one side "
                    "(default: --map if given, else the row number)")
    io.add_argument("--seed", type=int, default=0, help="seed of the split hash (default 0)")
    io.add_argument("--output", help="output folder (missing or empty; written atomically)")
    io.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    io.add_argument("--apply", metavar="DIR", help="apply the workflow fitted in DIR (a prep output) to --input")
    io.add_argument("--input", help="with --apply: file or glob to transform")
    cols = p.add_argument_group("columns")
    cols.add_argument("--label", help="0/1 label column")
    cols.add_argument("--categorical", type=_list, default=[], help="one-hot categorical columns, comma-separated")
    cols.add_argument("--numerical", type=_list, default=[], help="numerical columns, comma-separated")
    cols.add_argument("--multihot", nargs="+", action="extend", default=[], metavar="COL=SEP",
                      help="multi-hot column and the separator of its items (e.g. tags='|'; tab, space)")
    cols.add_argument("--map", help="group column (integers) kept in test for MAP@12; test is sorted by it")
    cols.add_argument("--sep", type=_sep, default="", help="field separator (default: tab for .tsv/.txt, "
                      "comma otherwise; 'tab' and '\\t' mean tab)")
    cols.add_argument("--no_header", action="store_true", help="CSV files have no header row (give --names)")
    cols.add_argument("--names", type=_list, default=[], help="with --no_header: every field's name, in order")
    cols.add_argument("--header", action="store_true", help="with --apply: the --input files have a header row "
                      "(by default they are read as the training files were)")
    enc = p.add_argument_group("encoding")
    enc.add_argument("--freq_threshold", type=int, default=0,
                     help="values seen fewer times in train get id 0, like unseen ones (default 0: keep all)")
    enc.add_argument("--max_vocab", type=int, default=0, help="at most this many table rows per categorical "
                     "feature, id 0 included: the most frequent values are kept (default 0: no cap)")
    enc.add_argument("--hash_buckets", nargs="+", action="extend", default=[], metavar="COL=N|N",
                     help="hash these one-hot columns to N buckets instead of a vocabulary (N alone: all)")
    enc.add_argument("--rows_per_part", type=int, default=1_000_000, help="rows per parquet part (default 1e6)")
    enc.add_argument("--min_parts", type=int, default=2,
                     help="at least this many parts per split: the most training ranks it serves (default 2)")
    enc.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                     help="NVTabular backend: auto = GPU when cudf can use one, else CPU")
    enc.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _pairs(items: list[str], flag: str, convert: type = str) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise PrepError(f"{flag} {item!r}: expected COL=VALUE")
        if name in out:
            raise PrepError(f"column '{name}' is listed twice ({flag})")
        try:
            out[name] = convert(value)
        except ValueError:
            raise PrepError(f"{flag} {item!r}: {value!r} is not a valid value") from None
    return out


def options(args: argparse.Namespace) -> PrepOptions:
    """The :class:`PrepOptions` of a training-mode command line (not yet checked)."""
    if not args.train or not args.label:
        raise PrepError("--train, --label and --output are required (or --apply DIR --input ... --output ...)")
    multihot = {k: _sep(str(v)) for k, v in _pairs(args.multihot, "--multihot").items()}
    everywhere = [h for h in args.hash_buckets if "=" not in h]
    if len(everywhere) > 1:
        raise PrepError(f"--hash_buckets: one bare N at most, got {everywhere}")
    buckets: dict[str, object] = {}
    if everywhere:
        try:
            buckets = {c: int(everywhere[0]) for c in args.categorical}
        except ValueError:
            raise PrepError(f"--hash_buckets {everywhere[0]!r}: not an integer") from None
    buckets |= _pairs([h for h in args.hash_buckets if "=" in h], "--hash_buckets", int)
    return PrepOptions(label=args.label, categorical=args.categorical, numerical=args.numerical,
                       multihot=multihot, map=args.map, split_by=args.split_by, sep=args.sep,
                       header=not args.no_header, names=args.names, freq_threshold=args.freq_threshold,
                       max_vocab=args.max_vocab, hash_buckets={k: int(v) for k, v in buckets.items()},
                       test_fraction=args.test_fraction, seed=args.seed, rows_per_part=args.rows_per_part,
                       min_parts=args.min_parts)


def summary(result: object) -> str:
    """The final report: rows and parts per split, vocabulary sizes and widths, log columns, time."""
    lines = []
    total = sum(result.rows.values())
    for split, rows in result.rows.items():
        lines.append(f"{split}: {rows:,} rows in {len(result.files[split])} part(s)")
    if result.cardinalities:
        lines.append(f"vocabulary (table rows / embedding width by {EMBEDDING_RULE}): " + ", ".join(
            f"{n} {c:,}/{embedding_width(c)}" for n, c in result.cardinalities.items()))
    lines.append(f"log(1 + x): {', '.join(result.log_columns) or 'none'}")
    lines.append(f"output: {result.output} ({'cpu' if result.cpu else 'gpu'}; {result.seconds:.1f} s, "
                 f"{total / max(result.seconds, 1e-9):,.0f} rows/s)")
    return "\n".join(lines)


def _log_to_stderr(quiet: bool) -> None:
    """Progress lines of the ``wd_sok.prep`` logger go to the current stderr (INFO, or WARNING if quiet)."""
    log = logging.getLogger("wd_sok.prep")
    for handler in [h for h in log.handlers if getattr(h, "wd_sok_prep", False)]:
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.wd_sok_prep = True
    handler.setFormatter(logging.Formatter("%(asctime)s wd-sok-prep: %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Exit 0 after printing the summary, or print one error line and exit 2 (nothing written)."""
    args = parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # merlin imports TensorFlow for its dtype tables
    _log_to_stderr(args.quiet)
    from wd_sok.prep.pipeline import quiet_merlin

    quiet_merlin()
    try:
        with warnings.catch_warnings():
            quiet_merlin()
            if not args.output:
                raise PrepError("--output DIR is required")
            if args.apply:
                if args.train or args.test or args.label:
                    raise PrepError("--apply DIR takes --input and --output (the rest comes from DIR/prep.json)")
                if not args.input:
                    raise PrepError("--apply DIR needs --input FILE|GLOB")
                from wd_sok.prep.apply import apply

                reader = {"sep": args.sep} if args.sep else {}
                if args.no_header or args.names:
                    reader |= {"header": False, "names": args.names}
                elif args.header:
                    reader |= {"header": True, "names": []}
                result = apply(args.apply, args.input, args.output, args.device, args.overwrite, reader)
            else:
                from wd_sok.prep.pipeline import prep

                result = prep(options(args), args.train, args.test, args.output, args.device, args.overwrite)
    except (PrepError, FileExistsError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0

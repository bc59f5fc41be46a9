"""Where the data tools write: an atomically renamed output folder, and the spec of what was written."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from wd_sok.feature_spec import CHANNELS, TEST, TRAIN, FeatureSpec

SPEC_FILE = "feature_spec.yaml"


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``, renamed to ``out_dir`` only if the block succeeds.

    ``out_dir`` may be missing or empty; a non-empty one is an error unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out_dir}: output exists and is not an empty folder (pass overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / "x")
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def output_spec_dict(spec: FeatureSpec, files: dict[str, list[str]], file_type: str) -> dict[str, Any]:
    """Spec of the written data: channel features only, explicit dtypes, one chunk per mapping."""
    names = [n for c in CHANNELS for n in spec.channel(c)]
    features = {}
    for name in names:
        props = {k: v for k, v in spec.feature_spec[name].items() if k != "dtype"}
        features[name] = {"dtype": spec.dtype(name), **props}
    source = {}
    for mapping in (TRAIN, TEST):
        present = [n for n in spec.features_in(mapping) if n in names]
        source[mapping] = [{"type": file_type, "features": present, "files": files[mapping]}]
    return {"channel_spec": {c: spec.channel(c) for c in CHANNELS if c in spec.channel_spec},
            "feature_spec": features, "source_spec": source, "metadata": dict(spec.metadata)}


def check_parquet_dtypes(spec: FeatureSpec) -> None:
    """Raise ValueError for a channel feature whose dtype parquet cannot store (float16 in pyarrow 14)."""
    for name in (n for c in CHANNELS for n in spec.channel(c)):
        if spec.dtype(name) == "float16":
            raise ValueError(f"{spec.origin}: feature '{name}': dtype float16 cannot be stored in parquet "
                             f"(pyarrow {pa.__version__}); declare float32")

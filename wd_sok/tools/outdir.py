"""Where the data tools write: an atomically renamed output folder, and the spec of what was written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from wd_sok import storage
from wd_sok.feature_spec import CHANNELS, TEST, TRAIN, FeatureSpec
from wd_sok.storage.tree import upload_tree

SPEC_FILE = "feature_spec.yaml"


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``, renamed to ``final`` (replacing what was there) only if the
    block succeeds; on failure nothing of it is left and ``final`` is untouched. The folder gets mode 0755,
    as ``mkdir`` gives (``mkdtemp`` makes it 0700: others could not read a shared dataset or export).

    ``final`` may be a URL (s3://...): the block then fills a local temporary folder, which is uploaded on
    success with a marker object written last (:func:`wd_sok.storage.tree.upload_tree`: readers that check
    the marker never see half of it; a failed block uploads nothing)."""
    if storage.is_url(final):
        with tempfile.TemporaryDirectory(prefix="wd_sok_upload-") as local:
            yield Path(local)
            upload_tree(Path(local), final)
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(old / "previous")
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """:func:`atomic_dir` for a data tool's output: ``out_dir`` may be missing or empty; a non-empty one is
    an error unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out_dir}: output exists and is not an empty folder (pass overwrite)")
    with atomic_dir(out_dir) as tmp:
        yield tmp


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

"""Sharded, placement-independent checkpoints (see :mod:`wd_sok.checkpoint.format` for the layout).

``save`` (collective): every rank writes its own rows of every table and slot; rank 0 writes the replicated
state and the manifest last, then renames the folder into place. ``restore_latest`` (collective): every rank
reads only the rows it owns under the current rank count and backend; damaged checkpoints fall back to the
previous one on every rank together. Which run wrote each checkpoint, and what a new run may do in a folder
holding them, is :mod:`wd_sok.checkpoint.lineage`. ``python -m wd_sok.checkpoint convert DIR`` converts the earlier
single-file ``ckpt-<step>.npz`` checkpoints.
"""

from wd_sok.checkpoint.format import (
    CheckpointError,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    clean_temporaries,
    read_manifest,
)
from wd_sok.checkpoint.lineage import list_checkpoints
from wd_sok.checkpoint.reader import NoCheckpoint, restore_latest
from wd_sok.checkpoint.writer import save

__all__ = ["CheckpointError", "CorruptCheckpoint", "IncompatibleCheckpoint", "NoCheckpoint", "clean_temporaries",
           "list_checkpoints", "read_manifest", "restore_latest", "save"]

"""The one batch type that flows from the loader to the model, the metrics and the embedding backends.

Collective lookups (SOK, the sharded backend) need every rank to feed the same number of rows in every step:
SOK derives the global batch as ``local rows x number of GPUs`` (see wd_sok/embedding/sok.py). Short batches
are therefore padded to the local batch size with :func:`pad_batch`; padded rows carry ``mask`` 0 and valid
dummy inputs (id 0, empty multi-hot rows, zero numerics), and every consumer drops them (:func:`real_rows`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf


class Batch(NamedTuple):
    """One batch of B rows.

    Attributes:
        numerical: [B, n_numerical] float32 (n_numerical may be 0).
        categorical: feature name -> ids; one-hot features as [B] int tensors, multi-hot features as
            tf.RaggedTensor [B, (hotness)] of ints (row lengths 0..max_hotness).
        label: [B] float32 in {0, 1}.
        map_ids: [B] int64 display ids (test mapping with a map channel), else None.
        mask: [B] float32, 1 for a real row and 0 for padding (see :func:`pad_batch`); None = all rows real.
    """

    numerical: tf.Tensor
    categorical: dict[str, tf.Tensor | tf.RaggedTensor]
    label: tf.Tensor
    map_ids: tf.Tensor | None = None
    mask: tf.Tensor | None = None

    @property
    def size(self) -> int:
        """B, padding included."""
        return int(self.label.shape[0])

    @property
    def real_size(self) -> int:
        """Rows that are not padding."""
        return self.size if self.mask is None else int(np.count_nonzero(self.mask.numpy() > 0))


def head(batch: Batch, n: int) -> Batch:
    """The first ``n`` rows of ``batch`` (``n`` = 0: an empty batch with the same structure and dtypes)."""
    return Batch(batch.numerical[:n], {k: v[:n] for k, v in batch.categorical.items()}, batch.label[:n],
                 None if batch.map_ids is None else batch.map_ids[:n],
                 None if batch.mask is None else batch.mask[:n])


def pad_batch(batch: Batch, size: int) -> Batch:
    """``batch`` grown to exactly ``size`` rows by appending masked padding rows.

    Real rows keep their place (first) and get mask 1; each padding row has mask 0, label 0, zero numerics,
    id 0 for every one-hot feature (a valid row of every table), an empty multi-hot list and the map id of the
    last real row (0 if none), so map ids stay sorted. Raises ValueError if ``batch`` has more than ``size`` rows.
    """
    n = batch.size
    if n > size:
        raise ValueError(f"batch of {n} rows cannot be padded to {size}")
    mask = batch.mask if batch.mask is not None else tf.ones([n], tf.float32)
    k = size - n
    if k == 0:
        return batch._replace(mask=mask)

    def grow(x: tf.Tensor, fill: tf.Tensor | int | float = 0) -> tf.Tensor:
        pad = tf.fill(tf.concat([[k], tf.shape(x)[1:]], 0), tf.cast(fill, x.dtype))
        return tf.concat([x, pad], 0)

    categorical: dict[str, tf.Tensor | tf.RaggedTensor] = {}
    for name, x in batch.categorical.items():
        if isinstance(x, tf.RaggedTensor):  # k empty rows: the last row split repeated
            splits = tf.concat([x.row_splits, tf.fill([k], x.row_splits[-1])], 0)
            categorical[name] = tf.RaggedTensor.from_row_splits(x.values, splits, validate=False)
        else:
            categorical[name] = grow(x)
    map_ids = None
    if batch.map_ids is not None:
        map_ids = grow(batch.map_ids, batch.map_ids[-1] if n else 0)
    return Batch(grow(batch.numerical), categorical, grow(batch.label), map_ids, grow(mask))


def real_rows(batch: Batch, *arrays: np.ndarray) -> list[np.ndarray]:
    """``arrays`` (host arrays with one entry per row of ``batch``) restricted to its real rows."""
    if batch.mask is None:
        return [np.asarray(a) for a in arrays]
    keep = batch.mask.numpy() > 0
    return [np.asarray(a)[keep] for a in arrays]

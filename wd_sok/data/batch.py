"""The one batch type that flows from the loader to the model, the metrics and the embedding backends."""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class Batch(NamedTuple):
    """One batch of B rows.

    Attributes:
        numerical: [B, n_numerical] float32 (n_numerical may be 0).
        categorical: feature name -> ids; one-hot features as [B] int tensors, multi-hot features as
            tf.RaggedTensor [B, (hotness)] of ints (row lengths 0..max_hotness).
        label: [B] float32 in {0, 1}.
        map_ids: [B] int64 display ids (test mapping with a map channel), else None.
    """

    numerical: tf.Tensor
    categorical: dict[str, tf.Tensor | tf.RaggedTensor]
    label: tf.Tensor
    map_ids: tf.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.label.shape[0])

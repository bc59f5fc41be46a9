"""Outbrain Click Prediction preprocessing: raw Kaggle CSVs -> parquet parts + ``feature_spec.yaml``.

Pipeline (``python -m wd_sok.outbrain INPUT_DIR OUTPUT_DIR``, see :mod:`wd_sok.outbrain.cli`):

1. :mod:`~wd_sok.outbrain.raw` reads and joins the CSVs chunk by chunk, computes the row-local features (no
   statistics: geo splits, days since published, tf-idf similarities, top-3 topic/entity/category slots),
   splits displays into train/test and stages them as parquet (test globally sorted by ``display_id``).
2. :mod:`~wd_sok.outbrain.workflow` fits an NVTabular workflow on the train split only (CTRs, view counts,
   normalisation, medians, multi-hot vocabularies) and transforms both splits.
3. :mod:`~wd_sok.outbrain.output` writes the parts (test cut only at display boundaries) and the spec.

Feature formulas and fill values are documented in :mod:`wd_sok.outbrain.features`.
"""

from wd_sok.outbrain.features import (
    CATEGORICAL_COLUMNS,
    EMBEDDING_DIMS,
    HASH_BUCKETS,
    MULTIHOT_COLUMNS,
    NUMERIC_COLUMNS,
)
from wd_sok.outbrain.raw import OutbrainDataWarning

__all__ = ["CATEGORICAL_COLUMNS", "EMBEDDING_DIMS", "HASH_BUCKETS", "MULTIHOT_COLUMNS", "NUMERIC_COLUMNS",
           "OutbrainDataWarning", "preprocess"]


def preprocess(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy re-export (NVTabular imports are slow)
    """See :func:`wd_sok.outbrain.pipeline.preprocess`."""
    from wd_sok.outbrain.pipeline import preprocess as _preprocess

    return _preprocess(*args, **kwargs)

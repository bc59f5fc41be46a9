"""The ``feature_spec.yaml`` of a prep output: channels, dtypes, cardinalities, widths, files, metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wd_sok.feature_spec import FeatureSpec
from wd_sok.prep.options import EMBEDDING_RULE, PrepOptions, embedding_width


def id_dtype(cardinality: int) -> str:
    """int32 while every id fits it, else int64."""
    return "int32" if cardinality <= 2 ** 31 else "int64"


def column_dtypes(opts: PrepOptions, cards: dict[str, int]) -> dict[str, str]:
    """The stored dtype of every output column (multi-hot: of its list items)."""
    dtypes = {name: id_dtype(cards[name]) for name in opts.categorical + list(opts.multihot)}
    dtypes |= {name: "float32" for name in opts.numerical} | {opts.label: "float32"}
    if opts.map:
        dtypes[opts.map] = "int64"
    return dtypes


def build_spec(origin: Path, base: Path, opts: PrepOptions, cards: dict[str, int], hotness: dict[str, int],
               files: dict[str, list[str]], metadata: dict[str, Any], with_map: bool = True) -> FeatureSpec:
    """The validated spec of the written data (``files``: paths relative to ``base``, or absolute)."""
    dtypes = column_dtypes(opts, cards)
    features: dict[str, dict[str, Any]] = {}
    for name in opts.categorical:
        features[name] = {"dtype": dtypes[name], "cardinality": cards[name],
                          "embedding_dim": embedding_width(cards[name])}
    for name in opts.multihot:
        features[name] = {"dtype": dtypes[name], "cardinality": cards[name],
                          "max_hotness": max(1, hotness.get(name, 1)), "embedding_dim": embedding_width(cards[name])}
    for name in opts.numerical + [opts.label]:
        features[name] = {"dtype": "float32"}
    channels: dict[str, list[str]] = {"onehot_categorical": list(opts.categorical),
                                      "multihot_categorical": list(opts.multihot),
                                      "numerical": list(opts.numerical), "label": [opts.label]}
    train_features = opts.features + [opts.label]
    test_features = list(train_features)
    if opts.map and with_map:
        features[opts.map] = {"dtype": "int64"}
        channels["map"] = [opts.map]
        test_features.append(opts.map)
    raw = {
        "channel_spec": channels,
        "feature_spec": features,
        "source_spec": {"train": [{"type": "parquet", "features": train_features, "files": files["train"]}],
                        "test": [{"type": "parquet", "features": test_features, "files": files["test"]}]},
        "metadata": {"embedding_dim_rule": EMBEDDING_RULE, **metadata},
    }
    return FeatureSpec.from_dict(raw, base_directory=base, origin=str(origin))

"""Test-side views of model state as whole arrays: the oracle comparisons need them, the library never does.

* :func:`gathered_state`: every table (values and slots) in global row order, assembled on every rank from
  each rank's saved rows and their global ids (Horovod allgather), plus the replicated dense state.
* :func:`read_checkpoint`: a checkpoint folder read with numpy and json only (independent of
  wd_sok.checkpoint's reader): whole tables by the global ids its manifest gives each shard row.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from wd_sok.state import dense_state, table_states


def gathered_state(model: Any, wide_opt: Any, deep_opt: Any, rt: Any) -> dict[str, np.ndarray]:
    """``{"<prefix>/<f>[:<slot>]": [cardinality, dim], "dense/...": ..., "opt/...": ...}`` (collective)."""
    arrays = dense_state(model, wide_opt, deep_opt)
    for state in table_states(model, wide_opt, deep_opt):
        rows = state.rows
        ids = rows.global_rows(0, rows.count)
        for array in state.arrays():
            values = state.read(array, 0, rows.count)
            if rt.size > 1:
                all_ids = rt.hvd.allgather(tf.constant(ids), name=f"t_ids_{state.key}_{array}").numpy()
                values = rt.hvd.allgather(tf.constant(values), name=f"t_v_{state.key}_{array}").numpy()
            else:
                all_ids = ids
            whole = np.full((state.table.cardinality, state.table.dim), np.nan, np.float32)
            whole[all_ids] = values
            arrays[state.key if array == "value" else f"{state.key}:{array}"] = whole
    return arrays


def read_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(whole arrays keyed like :func:`gathered_state`, manifest) of one checkpoint folder."""
    manifest = json.loads((folder / "manifest.json").read_text())
    with np.load(io.BytesIO((folder / "dense.npz").read_bytes())) as z:
        arrays = {k: z[k] for k in z.files}
    for key, entry in manifest["tables"].items():
        for array in entry["arrays"]:
            whole = np.full((entry["cardinality"], entry["dim"]), np.nan, np.float32)
            for shard in entry["shards"]:
                part = np.load(folder / shard["files"][array])
                whole[shard["start"] + np.arange(shard["count"]) * shard["stride"]] = part
            arrays[key if array == "value" else f"{key}:{array}"] = whole
    return arrays, manifest

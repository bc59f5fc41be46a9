"""Model + optimizer state as plain arrays (for checkpoints), independent of backend and rank count."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from wd_sok.embedding.base import ensure_slots, read_slot, slot_names, write_slot
from wd_sok.model import WideDeepModel

Optimizer = tf.keras.optimizers.legacy.Optimizer


def export_state(model: WideDeepModel, wide_opt: Optimizer, deep_opt: Optimizer) -> dict[str, np.ndarray]:
    """All weights and optimizer slots as ``{key: array}``; a collective call for sharded tables.

    Keys: ``wide/<feature>[:<slot>]`` and ``deep/<feature>[:<slot>]`` for whole tables [rows, dim],
    ``dense/<name>[:<slot>]`` for the rest, ``opt/wide_iterations`` and ``opt/deep_iterations``.
    """
    arrays: dict[str, np.ndarray] = {}
    for emb, opt in ((model.wide_embedding, wide_opt), (model.deep_embedding, deep_opt)):
        for name, entry in emb.export_tables(opt).items():
            for slot, value in entry.items():
                arrays[name if slot == "value" else f"{name}:{slot}"] = value
    wide_ids = {id(v) for v in model.wide_variables}
    for name, var in model.named_dense_variables().items():
        arrays[f"dense/{name}"] = var.numpy()
        opt = wide_opt if id(var) in wide_ids else deep_opt
        for slot in slot_names(opt):
            try:
                arrays[f"dense/{name}:{slot}"] = read_slot(opt, var, slot).numpy()
            except KeyError:  # slots not created yet (no step taken): nothing to save
                pass
    arrays["opt/wide_iterations"] = np.int64(wide_opt.iterations.numpy())
    arrays["opt/deep_iterations"] = np.int64(deep_opt.iterations.numpy())
    return arrays


def import_state(model: WideDeepModel, wide_opt: Optimizer, deep_opt: Optimizer,
                 arrays: dict[str, np.ndarray]) -> None:
    """Inverse of :func:`export_state`; the model must be built (called once)."""
    wide_opt.iterations.assign(int(arrays["opt/wide_iterations"]))  # first: lazy slots are relative to it
    deep_opt.iterations.assign(int(arrays["opt/deep_iterations"]))
    for emb, opt in ((model.wide_embedding, wide_opt), (model.deep_embedding, deep_opt)):
        tables = {}
        for name in emb.tables:
            key = f"{emb.prefix}/{name}"
            if key not in arrays:
                raise KeyError(f"checkpoint has no table '{key}' (was it written for another feature spec?)")
            tables[key] = {"value": arrays[key]}
            tables[key].update({k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{key}:")})
        emb.import_tables(tables, opt)
    wide_ids = {id(v) for v in model.wide_variables}
    named = model.named_dense_variables()
    ensure_slots(wide_opt, [v for v in named.values() if id(v) in wide_ids])
    ensure_slots(deep_opt, [v for v in named.values() if id(v) not in wide_ids])
    for name, var in named.items():
        key = f"dense/{name}"
        if key not in arrays or tuple(arrays[key].shape) != tuple(var.shape):
            raise KeyError(f"checkpoint variable '{key}' missing or of another shape than {tuple(var.shape)}")
        var.assign(arrays[key])
        opt = wide_opt if id(var) in wide_ids else deep_opt
        for slot in slot_names(opt):
            if f"{key}:{slot}" in arrays:
                write_slot(opt, var, slot, arrays[f"{key}:{slot}"])

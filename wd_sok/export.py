"""Export a trained model as a TensorFlow SavedModel that serves click probabilities from raw features.

Whatever backend trained the model (replicated, sharded over N ranks, SOK), the export is the same: rank 0
alone builds a *replicated*, float32, dropout-free, non-XLA copy of the model on its CPU, and every rank
streams the rows it holds into it table by table, one block (~32 MiB) at a time, with their global row ids
(:func:`copy_tables`: an alltoall whose only destination is rank 0). No optimizer slot travels, and no rank
but 0 ever holds more than a block of a table it does not own; rank 0 holds the serving model's tables (the
values, float32), which a single SavedModel inherently needs, since its variables are one TensorFlow
checkpoint written by one process. The SavedModel needs only TensorFlow to run (no wd_sok, no Horovod, no SOK).

Serving signature ``serving_default`` (every input is 1-D; B rows per request, B may be 0):

- ``<onehot>``: [B], the spec's integer dtype: one id per row, in [0, cardinality); for a dynamic feature any
  raw int64 id: its trained row, or a zero row for an id without one (never seen, or not admitted);
- ``<multihot>__values``: [N], the spec's integer dtype: every row's ids back to back (Merlin's convention);
- ``<multihot>__offsets``: [B + 1] int64: row i is ``values[offsets[i]:offsets[i+1]]``; offsets[0] = 0, an
  empty row pools to zeros; pooled by the training combiner (sum or mean);
- ``<numerical>``: [B] float32: one value per row.

Output: ``{"probability": [B] float32}``, sigmoid of the Wide & Deep logit. Ids outside [0, cardinality),
malformed offsets or inputs of different row counts are an InvalidArgumentError (never a silent zero); so are
non-finite numerics, unless training ran with ``--nan_policy zero``, which serving then applies too.

Layout of the export folder (written to a temporary sibling, then renamed into place; a URL such as
``s3://bucket/export``: written locally, then uploaded with the marker object ``_WD_SOK_COMPLETE.json``
last, which :func:`fetch_export` checks, see :mod:`wd_sok.storage.tree`)::

    saved_model.pb, variables/          the SavedModel
    assets/feature_spec.yaml            the training feature spec (source paths are the training data's)
    assets/signature.json               inputs, output, tables, hidden units, training facts (machine-readable)
    assets/README.md                    the same for people, with a usage example
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from wd_sok import storage
from wd_sok.checkpoint.format import block_rows
from wd_sok.data.batch import Batch
from wd_sok.embedding.base import EmbeddingCollection
from wd_sok.embedding.composite import CompositeEmbedding, ServingDynamic
from wd_sok.embedding.replicated import ReplicatedEmbedding
from wd_sok.model import WideDeepModel
from wd_sok.optim import read_rows
from wd_sok.storage.tree import MARKER, download_tree
from wd_sok.tools.outdir import atomic_dir

SIGNATURE = "serving_default"
OUTPUT = "probability"
VALUES, OFFSETS = "__values", "__offsets"
_INPUT_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")  # what TensorFlow accepts as a signature input


def export_saved_model(trainer: Any, export_dir: str | Path) -> None:
    """Write ``trainer``'s model to ``export_dir`` as a SavedModel (see the module docstring).

    Collective: every rank must call it (each streams its rows to rank 0); only rank 0 writes. An existing
    ``export_dir`` is replaced atomically if it is empty or holds a SavedModel, else it is an error.

    Args:
        trainer: a built :class:`wd_sok.train.Trainer` (uses ``.model``, ``.spec``, ``.rt``, ``.cfg``,
            ``.deep_opt``, ``.backend``, ``.epoch``).
        export_dir: destination folder.
    """
    export_dir = export_dir if storage.is_url(export_dir) else Path(export_dir)
    model: WideDeepModel = trainer.model
    problem = ""
    if trainer.rt.is_chief:  # fail before the collective, and on every rank (none is left waiting in it)
        try:
            _check_destination(export_dir)
            _input_specs(trainer.spec, model.categorical)
        except ValueError as e:
            problem = str(e)
    if trainer.rt.size > 1 and trainer.rt.sum_host(np.array([float(bool(problem))]), "export_check")[0]:
        problem = problem or "rank 0 cannot write the export (see its error)"
    if problem:
        raise ValueError(problem)
    serving = build_serving_model(model) if trainer.rt.is_chief else None
    copy_tables(model, serving, trainer.rt)  # collective: every rank, same calls
    if serving is None:
        return
    info = describe(trainer, model)
    with atomic_dir(export_dir) as tmp:
        save(serving, trainer.spec, tmp, info["nan_policy"])
        assets = tmp / "assets"
        assets.mkdir(exist_ok=True)
        trainer.spec.to_yaml(assets / "feature_spec.yaml")
        (assets / "signature.json").write_text(json.dumps(info, indent=2) + "\n")
        (assets / "README.md").write_text(readme(info))


def fetch_export(export_dir: str | Path, local_dir: str | Path) -> Path:
    """A local folder holding the SavedModel at ``export_dir``, for ``tf.saved_model.load``: ``export_dir``
    itself if local; a URL's complete upload copied (and checksummed) into ``local_dir`` otherwise, or a
    :class:`~wd_sok.storage.StorageError` if its marker is missing (not written, or still being written)."""
    if not storage.is_url(export_dir):
        return Path(export_dir)
    return download_tree(export_dir, Path(local_dir))


# ----------------------------------------------------------------------------- model copy
def build_serving_model(model: WideDeepModel) -> WideDeepModel:
    """A replicated float32 copy of ``model`` (same tables, widths, combiners, hidden units) with zero tables
    and ``model``'s dense weights; :func:`copy_tables` fills the tables.

    Built on the CPU (rank 0's accelerator is busy with training state); the SavedModel pins no device.
    """
    with tf.device("/CPU:0"):
        wide = _replicated_like(model.wide_embedding)
        deep = _replicated_like(model.deep_embedding)
        serving = WideDeepModel(model.categorical, model.n_numerical, wide, deep,
                                [layer.units for layer in model.hidden], dropout=0.0, compute_dtype="float32",
                                seed=model.seed, xla=False)
        serving(_dummy_batch(model), training=False)  # create every variable
        targets = serving.named_dense_variables()
        for name, var in model.named_dense_variables().items():
            targets[name].assign(tf.cast(var, tf.float32))
    return serving


def copy_tables(model: WideDeepModel, serving: WideDeepModel | None, runtime: Any) -> None:
    """Stream every table's values from the ranks holding them into ``serving`` (rank 0; None elsewhere).

    Collective: every rank calls it and, per table, makes the same number of block transfers (the most any
    rank needs; a rank out of rows sends an empty block). Each block is [<= block_rows(dim), dim] float32 with
    its [n] int64 global row ids, copied to the host first, so GPU tables travel through host memory.
    """
    for prefix in ("wide", "deep"):
        emb = getattr(model, f"{prefix}_embedding")
        for name, table in emb.tables.items():
            if table.dynamic is not None:
                _copy_keyed(emb, serving, prefix, name, runtime)
                continue
            rows, var = emb.saved_rows(name), emb.table_variable(name)
            step = block_rows(table.dim)
            blocks = runtime.max_int(-(-rows.count // step), f"export_blocks_{prefix}_{name}")
            for b in range(blocks):
                lo, hi = min(rows.count, b * step), min(rows.count, (b + 1) * step)
                values = read_rows(var, rows.var_slice(lo, hi)) if hi > lo else tf.zeros([0, table.dim])
                with tf.device("/CPU:0"):  # on the variable's device above, then to host memory
                    values = tf.identity(values)
                    ids = tf.constant(rows.global_rows(lo, hi))
                values = runtime.gather_to_chief(values, f"export_v_{prefix}_{name}_{b}")
                ids = runtime.gather_to_chief(ids, f"export_i_{prefix}_{name}_{b}")
                if serving is not None:
                    target = getattr(serving, f"{prefix}_embedding").table_variable(name)
                    target.scatter_update(tf.IndexedSlices(tf.cast(values, tf.float32), ids))


def _replicated_like(emb: EmbeddingCollection) -> EmbeddingCollection:
    # zeros: the streamed values overwrite them, so skip the (whole-table) glorot draw
    fixed = [t for t in emb.tables.values() if t.dynamic is None]
    dynamic = [t for t in emb.tables.values() if t.dynamic is not None]
    if not dynamic:
        return ReplicatedEmbedding(fixed, "zeros", emb.seed, emb.prefix)
    parts = [ReplicatedEmbedding(fixed, "zeros", emb.seed, emb.prefix)] if fixed else []
    return CompositeEmbedding(list(emb.tables.values()), [*parts, ServingDynamic(dynamic, emb.seed, emb.prefix)],
                              "zeros", emb.seed, emb.prefix)


def _copy_keyed(emb: EmbeddingCollection, serving: WideDeepModel | None, prefix: str, name: str, runtime: Any
                ) -> None:
    """A dynamic table's (key, value) rows, block by block from every rank to rank 0's serving table."""
    part, dim = emb.part(name), emb.tables[name].dim
    count, step = part.keyed_count(name), block_rows(dim)
    for b in range(runtime.max_int(-(-count // step), f"export_blocks_{prefix}_{name}")):
        lo, hi = min(count, b * step), min(count, (b + 1) * step)
        with tf.device("/CPU:0"):
            keys = tf.constant(part.read_keyed(name, "key", lo, hi), tf.int64)
            values = tf.constant(part.read_keyed(name, "value", lo, hi).reshape(hi - lo, dim), tf.float32)
        keys = runtime.gather_to_chief(keys, f"export_k_{prefix}_{name}_{b}")
        values = runtime.gather_to_chief(values, f"export_v_{prefix}_{name}_{b}")
        if serving is not None:
            getattr(serving, f"{prefix}_embedding").part(name).add(name, keys, values)


def _dummy_batch(model: WideDeepModel) -> Batch:
    """One row of id 0 per feature (multi-hot: one id) and zero numerics."""
    categorical: dict[str, tf.Tensor | tf.RaggedTensor] = {}
    for name in model.categorical:
        table = model.deep_embedding.tables[name]
        zero = tf.zeros([1], tf.int64)
        categorical[name] = (tf.RaggedTensor.from_row_splits(zero, tf.constant([0, 1], tf.int64))
                             if table.multihot else zero)
    return Batch(tf.zeros([1, model.n_numerical], tf.float32), categorical, tf.zeros([1], tf.float32))


# ----------------------------------------------------------------------------- signature
def _input_specs(spec: Any, categorical: list[str]) -> dict[str, tf.TensorSpec]:
    """Signature inputs by name: one-hot ids [B], multi-hot values [N] + offsets [B+1] int64, numerics [B]."""
    specs: dict[str, tf.TensorSpec] = {}
    for name in categorical:
        dtype = tf.as_dtype(spec.dtype(name))
        if name in spec.multihot:
            specs[name + VALUES] = tf.TensorSpec([None], dtype, name=name + VALUES)
            specs[name + OFFSETS] = tf.TensorSpec([None], tf.int64, name=name + OFFSETS)
        else:
            specs[name] = tf.TensorSpec([None], dtype, name=name)
    for name in spec.numerical:
        specs[name] = tf.TensorSpec([None], tf.float32, name=name)
    for name in specs:
        if not _INPUT_NAME.match(name):
            raise ValueError(f"feature '{name}' cannot be a SavedModel input name (allowed: letters, digits, "
                             "'_', '.', '-', '/'; not starting with '_', '-' or '/'); rename it in the spec")
    if not specs:
        raise ValueError("the feature spec has no input features to serve")
    return specs


def serving_function(serving: WideDeepModel, spec: Any, nan_policy: str = "reject"
                     ) -> tf.types.experimental.ConcreteFunction:
    """The ``serving_default`` concrete function of ``serving`` for ``spec``'s raw features.

    ``nan_policy`` treats non-finite numerics as training did: "reject" (an error) or "zero" (filled with 0).
    """
    specs = _input_specs(spec, serving.categorical)
    tables = serving.deep_embedding.tables
    numerical = list(spec.numerical)

    @tf.function(input_signature=[specs])
    def serve(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        rows = _row_count(inputs, serving.categorical, tables, numerical)
        checks = []
        for name in serving.categorical:
            table = tables[name]
            msg = f"{name}: ids must lie in [0, {table.cardinality})"
            flat = tf.cast(inputs[name + VALUES if table.multihot else name], tf.int64)
            if table.dynamic is None:  # a dynamic table takes any raw id (unknown ones read the zero row)
                checks += [tf.debugging.assert_non_negative(flat, message=msg),
                           tf.debugging.assert_less(flat, tf.constant(table.cardinality, tf.int64),
                                                    message=msg)]
            if table.multihot:
                checks.append(tf.debugging.assert_equal(tf.size(inputs[name + OFFSETS], out_type=tf.int64),
                              rows + 1, message=f"{name}{OFFSETS} must hold B + 1 offsets (B rows)"))
            else:
                checks.append(tf.debugging.assert_equal(tf.size(flat, out_type=tf.int64), rows, message=(
                    f"{name} must hold one id per row (B rows, as the other inputs)")))
        for name in numerical:
            checks.append(tf.debugging.assert_equal(tf.size(inputs[name], out_type=tf.int64), rows, message=(
                f"{name} must hold one value per row (B rows, as the other inputs)")))
        with tf.control_dependencies(checks):
            categorical = {}
            for name in serving.categorical:
                if tables[name].multihot:
                    # validate=True: offsets start at 0, never decrease and end at len(values)
                    categorical[name] = tf.RaggedTensor.from_row_splits(
                        tf.cast(inputs[name + VALUES], tf.int64), tf.identity(inputs[name + OFFSETS]))
                else:
                    categorical[name] = tf.cast(inputs[name], tf.int64)                  # [B]
            if numerical:
                x = tf.stack([inputs[n] for n in numerical], axis=1)                     # [B, n]
                if nan_policy == "zero":
                    x = tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))
                else:
                    x = tf.debugging.assert_all_finite(x, "numerical inputs must be finite (NaN / inf)")
            else:
                x = tf.zeros(tf.stack([rows, 0]), tf.float32)                            # [B, 0]
            label = tf.zeros(tf.reshape(rows, [1]), tf.float32)                         # [B]
            logit = serving(Batch(x, categorical, label), training=False)
        return {OUTPUT: tf.sigmoid(logit)}

    return serve.get_concrete_function()


def _row_count(inputs: dict[str, tf.Tensor], categorical: list[str], tables: dict, numerical: list[str]
               ) -> tf.Tensor:
    """B (int64 scalar) from the first input that fixes it: a one-hot id, offsets (size - 1), a numeric."""
    for name in categorical:
        if tables[name].multihot:
            return tf.maximum(tf.size(inputs[name + OFFSETS], out_type=tf.int64) - 1, 0)
        return tf.size(inputs[name], out_type=tf.int64)
    return tf.size(inputs[numerical[0]], out_type=tf.int64)


def save(serving: WideDeepModel, spec: Any, path: Path, nan_policy: str = "reject") -> None:
    """``tf.saved_model.save`` of ``serving``'s variables with only the serving signature (no Keras state)."""
    root = tf.Module()
    root.weights = list(serving.variables)  # tracked, so the signature's captured variables are saved
    root.hash_tables = [t for e in (serving.wide_embedding, serving.deep_embedding)
                        for p in getattr(e, "parts", [e]) for t in getattr(p, "hash_tables", [])]
    tf.saved_model.save(root, str(path), signatures={SIGNATURE: serving_function(serving, spec, nan_policy)})


# ----------------------------------------------------------------------------- description
def describe(trainer: Any, model: WideDeepModel) -> dict[str, Any]:
    """The JSON written to ``assets/signature.json``: inputs, output, model shape and training facts."""
    spec = trainer.spec
    inputs = {name: {"shape": [None], "dtype": s.dtype.name}
              for name, s in _input_specs(spec, model.categorical).items()}
    for name in model.categorical:
        if name in spec.multihot:
            inputs[name + VALUES]["meaning"] = f"ids of '{name}', all rows concatenated"
            inputs[name + OFFSETS]["meaning"] = f"B + 1 row offsets into {name}{VALUES} (first 0)"
        else:
            inputs[name]["meaning"] = f"id of '{name}' per row"
        if spec.dynamic(name) is not None:
            for key in [k for k in inputs if k in (name, name + VALUES)]:
                inputs[key]["meaning"] += " (raw int64 ids, any value; an unknown id reads a zero row)"
    for name in spec.numerical:
        inputs[name]["meaning"] = f"numerical '{name}' per row"
    deep = model.deep_embedding.tables
    return {
        "signature": SIGNATURE,
        "inputs": inputs,
        "outputs": {OUTPUT: {"shape": [None], "dtype": "float32", "meaning": "click probability (sigmoid)"}},
        "features": {"onehot": spec.onehot, "multihot": spec.multihot, "numerical": spec.numerical,
                     "label": spec.label},
        "tables": [{"name": t.name, "cardinality": t.cardinality, "deep_dim": t.dim, "multihot": t.multihot,
                    "combiner": t.combiner, "dynamic": t.dynamic is not None} for t in deep.values()],
        "hidden_units": [layer.units for layer in model.hidden],
        "trained": {"backend": getattr(trainer, "backend", None), "ranks": trainer.rt.size,
                    "global_step": int(trainer.deep_opt.iterations.numpy()), "epoch": getattr(trainer, "epoch", None),
                    "amp": bool(trainer.cfg.amp), "combiner": trainer.cfg.combiner, "seed": trainer.cfg.seed},
        "serving_dtype": "float32",
        "nan_policy": getattr(trainer.cfg, "nan_policy", "reject"),
        "tensorflow": tf.__version__,
    }


def readme(info: dict[str, Any]) -> str:
    """``assets/README.md``: the signature in prose and an example request."""
    shapes = {OFFSETS: "[B + 1]", VALUES: "[total ids]"}
    lines = ["# wd-sok SavedModel", "",
             f"Signature `{info['signature']}` returns `{OUTPUT}` [B] float32: the click probability per row.",
             "Every input is 1-D; B rows per call (B may be 0).", "",
             "| input | shape | dtype | meaning |", "| --- | --- | --- | --- |"]
    for name, i in info["inputs"].items():
        shape = next((v for k, v in shapes.items() if name.endswith(k)), "[B]")
        lines.append(f"| `{name}` | {shape} | {i['dtype']} | {i['meaning']} |")
    tables = ", ".join("{name} ({cardinality} x {deep_dim}, {combiner})".format(**t) for t in info["tables"])
    lines += [
        "", "Multi-hot features follow Merlin's convention: `<name>__values` holds every row's ids back to back "
        "and `<name>__offsets` the B + 1 offsets (row i is `values[offsets[i]:offsets[i+1]]`; an empty row pools "
        "to 0). Ids must lie in [0, cardinality): anything else is an error, as are inputs of different row counts.",
        "", "Non-finite numerical values: " + ("replaced by 0 (trained with --nan_policy zero)."
                                               if info["nan_policy"] == "zero" else "an error (--nan_policy reject)."),
        "", f"Tables: {tables or 'none'}; hidden units {info['hidden_units']}. Serving runs in float32, no dropout.",
        "", "```python", "import tensorflow as tf",
        f"serve = tf.saved_model.load(EXPORT_DIR).signatures[{info['signature']!r}]",
        f"probability = serve(**features)[{OUTPUT!r}]  # features: input name -> 1-D tensor, as above", "```", "",
        "`feature_spec.yaml` is the training spec; `signature.json` holds the same facts for programs.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- atomic write
def _check_destination(export_dir: Path | str) -> None:
    """An existing ``export_dir`` may be replaced only if it is empty or holds a SavedModel (a URL: an
    upload of one, complete or not), and it must be writable."""
    if storage.is_url(export_dir):
        store = storage.Store(export_dir)
        try:
            names = store.listdir()
            if names and not ({MARKER, "saved_model.pb"} & set(names)):
                raise ValueError(f"--export_dir {export_dir} holds objects that are not a SavedModel export; "
                                 "refusing to replace them")
            store.probe_writable()
        except OSError as e:
            raise ValueError(f"--export_dir {e}") from None
        return
    if export_dir.exists() and (not export_dir.is_dir() or (
            any(export_dir.iterdir()) and not (export_dir / "saved_model.pb").exists())):
        raise ValueError(f"--export_dir {export_dir} exists and is not an empty folder or a SavedModel; "
                         "refusing to replace it")
    try:
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.probe-", dir=export_dir.parent))
        probe.rmdir()
    except OSError as e:
        raise ValueError(f"--export_dir {export_dir}: cannot write beside it ({e.strerror})") from None

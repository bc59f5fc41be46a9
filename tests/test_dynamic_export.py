"""Serving a model with dynamic tables: the SavedModel takes raw int64 ids; an unknown id reads the zero row."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tensorflow as tf

from tests.conftest import tiny_spec_dict
from wd_sok.data.batch import Batch
from wd_sok.embedding import make_embedding
from wd_sok.embedding.keys import initial_key_rows_np
from wd_sok.export import export_saved_model
from wd_sok.feature_spec import FeatureSpec
from wd_sok.model import WideDeepModel

KNOWN_B = [10**12, -7, 42]          # admitted in training (min_count 1)
KNOWN_M = [2**40, 3]


def trainer_with_dynamic_tables() -> SimpleNamespace:
    raw = tiny_spec_dict()
    raw["feature_spec"]["b"] = {"dtype": "int64", "embedding_dim": 2, "dynamic": {"capacity": 6}}
    raw["feature_spec"]["m"] = {"dtype": "int64", "max_hotness": 3, "embedding_dim": 4,
                                "dynamic": {"capacity": 5, "min_count": 2, "evict": "lfu"}}
    spec = FeatureSpec.from_dict(raw, validate=False)
    rt = SimpleNamespace(rank=0, size=1, is_chief=True, max_int=lambda value, name: value,
                         gather_to_chief=lambda tensor, name: tensor)
    cat = spec.categorical
    dims = spec.embedding_dims()
    model = WideDeepModel(cat, len(spec.numerical),
                          make_embedding("replicated", spec.tables(dict.fromkeys(cat, 1)), "zeros", 0, "wide", None),
                          make_embedding("replicated", spec.tables(dims, "mean"), "glorot_normal", 0, "deep", None),
                          [8, 4], 0.0)
    # two training forward passes admit b's ids at once and m's ids at their second sighting
    ids = {"a": tf.constant([1, 2, 3], tf.int32), "b": tf.constant(KNOWN_B, tf.int64),
           "m": tf.ragged.constant([KNOWN_M, [], [3]], tf.int64)}
    batch = Batch(tf.zeros([3, 2]), ids, tf.zeros([3]))
    model(batch, training=True)
    model(batch, training=True)
    rng = np.random.default_rng(0)
    for emb in (model.wide_embedding, model.deep_embedding):  # non-zero wide rows, so the wide path counts
        var = emb.part("b").table_variable("b")
        var.assign(np.vstack([np.zeros((1, var.shape[1])), rng.normal(size=(var.shape[0] - 1, var.shape[1]))]))
    for var in model.named_dense_variables().values():
        var.assign(rng.normal(size=var.shape).astype(np.float32))
    cfg = SimpleNamespace(amp=False, combiner="mean", seed=0, nan_policy="reject")
    return SimpleNamespace(model=model, spec=spec, rt=rt, cfg=cfg, deep_opt=tf.keras.optimizers.legacy.RMSprop(),
                           backend="replicated", epoch=0)


def test_saved_model_serves_raw_ids_and_unknown_ids_read_zero(tmp_path: Path) -> None:
    trainer = trainer_with_dynamic_tables()
    export_saved_model(trainer, tmp_path / "sm")
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    # the exported tables, read back from the SavedModel's variables: key -> row per hash table (wide b, wide m,
    # deep b, deep m: the model's order), and the deep m rows
    ckpt = tf.train.load_checkpoint(str(tmp_path / "sm" / "variables" / "variables"))
    tables = [dict(zip(ckpt.get_tensor(f"hash_tables/{i}/.ATTRIBUTES/table-keys").tolist(),
                       ckpt.get_tensor(f"hash_tables/{i}/.ATTRIBUTES/table-values").tolist(), strict=True))
              for i in range(4)]
    assert [set(t) for t in tables] == [set(KNOWN_B), set(KNOWN_M), set(KNOWN_B), set(KNOWN_M)]
    values = next(v.numpy() for v in loaded.weights if tuple(v.shape) == (6, 4))  # deep m: capacity 5 + 1
    assert not values[0].any() and sorted(tables[3].values()) == [1, 2]  # the zero row; rows 1..2 used
    want = initial_key_rows_np(trainer.model.deep_embedding.tables["m"], np.array(KNOWN_M), 0, "glorot_normal")
    np.testing.assert_array_equal(np.stack([values[tables[3][k]] for k in KNOWN_M]), want)

    serve = loaded.signatures["serving_default"]
    unknown_b, unknown_m = [5, 2**62, -(2**63)], [77, -1]

    def request(b: list[int], m_values: list[int], offsets: list[int]) -> dict:
        return {"a": tf.constant([1, 2, 3], tf.int32), "b": tf.constant(b, tf.int64),
                "m__values": tf.constant(m_values, tf.int64), "m__offsets": tf.constant(offsets, tf.int64),
                "x1": tf.constant([0.5, -1.0, 2.0]), "x2": tf.constant([0.0, 1.0, -1.0])}

    def expected(b: list[int], m_values: list[int], offsets: list[int]) -> np.ndarray:
        ids = {"a": tf.constant([1, 2, 3], tf.int32), "b": tf.constant(b, tf.int64),
               "m": tf.RaggedTensor.from_row_splits(tf.constant(m_values, tf.int64), tf.constant(offsets, tf.int64))}
        x = tf.constant([[0.5, 0.0], [-1.0, 1.0], [2.0, -1.0]])
        return tf.sigmoid(trainer.model(Batch(x, ids, tf.zeros([3])), training=False)).numpy()

    for b, mv, off in ((KNOWN_B, [2**40, 3, 3], [0, 2, 2, 3]), (unknown_b, unknown_m, [0, 1, 1, 2]),
                       ([KNOWN_B[0], 5, 2**62], [3, 77], [0, 2, 2, 2])):
        np.testing.assert_allclose(serve(**request(b, mv, off))["probability"].numpy(), expected(b, mv, off),
                                   rtol=0, atol=1e-6)
    # by hand: an unknown id is the zero row, i.e. the same as any other unknown id, and as no id at all for m
    one = serve(**request(unknown_b, [77, -1], [0, 1, 2, 2]))["probability"].numpy()
    two = serve(**request([11, 12, 13], [], [0, 0, 0, 0]))["probability"].numpy()
    np.testing.assert_array_equal(one, two)
    known = serve(**request(KNOWN_B, [], [0, 0, 0, 0]))["probability"].numpy()
    assert np.all(np.abs(known - two) > 1e-6)

"""Wide & Deep forward against a numpy re-implementation; the reference parameter count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT, tiny_spec_dict
from wd_sok.data.batch import Batch
from wd_sok.embedding import make_embedding
from wd_sok.feature_spec import FeatureSpec
from wd_sok.model import WideDeepModel


def _model(spec: FeatureSpec, combiner: str, hidden: list[int], seed: int = 0) -> WideDeepModel:
    dims = spec.embedding_dims()
    cat = spec.categorical
    wide = make_embedding("replicated", spec.tables(dict.fromkeys(cat, 1)), "zeros", seed, "wide", None)
    deep = make_embedding("replicated", spec.tables(dims, combiner), "glorot_normal", seed, "deep", None)
    return WideDeepModel(cat, len(spec.numerical), wide, deep, hidden, dropout=0.5, seed=seed)


def _batch() -> Batch:
    ids_m = tf.ragged.constant([[1, 2, 2], [], [5], [0, 3]], dtype=tf.int32)
    return Batch(numerical=tf.constant([[0.5, -1.0], [2.0, 0.0], [-0.3, 0.7], [1.0, 1.0]], tf.float32),
                 categorical={"a": tf.constant([0, 6, 3, 3], tf.int32), "b": tf.constant([4, 0, 1, 2], tf.int64),
                              "m": ids_m},
                 label=tf.constant([1.0, 0.0, 0.0, 1.0]))


def _numpy_forward(model: WideDeepModel, batch: Batch, combiner: str) -> np.ndarray:
    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    w = {k: v.numpy() for k, v in model.wide_embedding.weights_by_name.items()}
    d = {k: v.numpy() for k, v in model.deep_embedding.weights_by_name.items()}
    rows_m = batch.categorical["m"].to_list()
    a, b, x = batch.categorical["a"].numpy(), batch.categorical["b"].numpy(), batch.numerical.numpy()
    wides, deeps = [], []
    for i in range(4):
        wide = model.wide_bias.numpy() + w["a"][a[i], 0] + w["b"][b[i], 0] + sum(w["m"][j, 0] for j in rows_m[i])
        wide += x[i] @ model.wide_kernel.numpy()[:, 0]
        pooled = sum((d["m"][j] for j in rows_m[i]), np.zeros(4, np.float32))
        if combiner == "mean" and rows_m[i]:
            pooled = pooled / len(rows_m[i])
        h = np.concatenate([d["a"][a[i]], d["b"][b[i]], pooled, x[i]])  # documented order
        for layer in model.hidden:
            h = relu(h @ layer.kernel.numpy() + layer.bias.numpy())
        deep = h @ model.head.kernel.numpy()[:, 0] + model.head.bias.numpy()[0]
        wides.append(wide)
        deeps.append(deep)
    return np.array(wides), np.array(deeps)


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_forward_matches_numpy(combiner: str) -> None:
    spec = FeatureSpec.from_dict(tiny_spec_dict())
    model = _model(spec, combiner, [8, 5])
    batch = _batch()
    model(batch)  # build
    rng = np.random.default_rng(0)
    for var in model.wide_variables:  # the wide part starts at zero: give it values to check
        var.assign(rng.normal(size=var.shape).astype(np.float32))
    wide, deep = _numpy_forward(model, batch, combiner)
    ids = batch.categorical
    np.testing.assert_allclose(model.wide_logit(batch, ids).numpy(), wide, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.deep_logit(batch, ids, training=False).numpy(), deep, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model(batch, training=False).numpy(), wide + deep, rtol=1e-5, atol=1e-5)


def test_wide_part_starts_at_zero_and_deep_is_glorot() -> None:
    spec = FeatureSpec.from_dict(tiny_spec_dict())
    model = _model(spec, "sum", [8])
    model(_batch())
    assert all(not np.any(v.numpy()) for v in model.wide_variables)
    table = model.deep_embedding.weights_by_name["m"].numpy()  # 6 x 4: std sqrt(2/10)/0.8796, cut at 2 std
    assert np.abs(table).max() <= 2 * np.sqrt(2 / 10) / 0.87962566103423978 + 1e-6
    assert table.std() > 0.1


def test_dropout_masks_are_a_function_of_step() -> None:
    spec = FeatureSpec.from_dict(tiny_spec_dict())
    model = _model(spec, "sum", [64, 64])
    batch = _batch()
    r1 = model(batch, training=True, step=3).numpy()
    r2 = model(batch, training=True, step=3).numpy()
    r3 = model(batch, training=True, step=4).numpy()
    np.testing.assert_array_equal(r1, r2)
    assert not np.allclose(r1, r3)
    assert not np.allclose(r1, model(batch, training=False).numpy())


def test_reference_parameter_count() -> None:
    """Outbrain spec, reference embedding sizes, 5x1024: worked out by hand in the comments below."""
    spec = FeatureSpec.from_yaml(ROOT / "data" / "outbrain_feature_spec.yaml", validate=False)
    spec.validate()
    # wide: one weight per categorical row (sum of cardinalities 682,754) + 13 numeric weights + bias
    wide = 682_754 + 13 + 1
    # deep tables: 250000*128 + 300000*128 + 4*19 + 100000*128 + 5000*128 + (2500+4000+2500+300+2000+1000
    #   +4000+1000)*64 + (350+10000+100)*64 = 85,616,076
    deep_tables = 85_616_076
    # MLP: input 4*128 + 19 + 8*64 + 3*64 + 13 = 1248; 1248*1024+1024 + 4*(1024*1024+1024) + 1024+1
    mlp = 1248 * 1024 + 1024 + 4 * (1024 * 1024 + 1024) + 1025
    model = _model(spec, "sum", [1024] * 5)
    n_num = len(spec.numerical)
    batch = Batch(tf.zeros([2, n_num]), {n: (tf.zeros([2], tf.int32) if n in spec.onehot else
                                             tf.ragged.constant([[1], []], tf.int32)) for n in spec.categorical},
                  tf.zeros([2]))
    model(batch)
    counted = sum(int(np.prod(v.shape)) for v in model.wide_variables + model.deep_variables)
    assert counted == wide + deep_tables + mlp == 91_777_245


def test_paths_are_relative_to_the_spec(tmp_path: Path) -> None:
    spec = FeatureSpec.from_dict(tiny_spec_dict(), base_directory=tmp_path)
    assert spec.files("train")[0] == tmp_path / "train/part_0.parquet"

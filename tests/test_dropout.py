"""Stateless 16-bit dropout: the mask against a numpy re-derivation from Philox's words, and the fused
ReLU + dropout (XLA) bit-equal to the unfused ops, forward and gradient, in float32 and bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from wd_sok.dropout import _keep, dropout, dropout_threshold, keep_scale, relu_dropout


@pytest.mark.parametrize("units", [64, 7])
def test_dropout_from_16_bit_words(units: int) -> None:
    """The mask is the documented function of Philox's int32 words (each read as two little-endian uint16,
    re-derived here with numpy), dropped fraction ~ 6554 / 65536 for rate 0.1, kept values scaled exactly."""
    seed = tf.constant([123, 7], tf.int64)
    x = tf.ones([4000, units])
    y = dropout(x, 0.1, seed).numpy()
    words = tf.random.stateless_uniform([4000, (units + 1) // 2], seed=seed, minval=None, maxval=None,
                                        dtype=tf.int32).numpy()  # the default (auto-selected) algorithm
    bits = words.astype("<i4").view("<u2").reshape(4000, -1)[:, :units]
    t = dropout_threshold(0.1)
    assert t == 6554
    assert keep_scale(0.1) == 65536 / (65536 - 6554)
    np.testing.assert_array_equal(y > 0, bits >= t)
    np.testing.assert_allclose(y[y > 0], 65536 / (65536 - t), rtol=1e-7)
    p, n = t / 65536, y.size
    assert abs((y == 0).mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(dropout(x, 0.1, seed).numpy(), y)  # a pure function of the seed
    assert not np.array_equal(dropout(x, 0.1, seed + 1).numpy(), y)


@pytest.mark.parametrize("units", [1024, 7])
def test_xla_draws_the_same_words_as_tensorflow(units: int) -> None:
    """The fused forward draws its bits inside an XLA kernel: XLA's Philox must give TF's kernel's words."""
    seed = tf.constant([2**40 + 5, 3], tf.int64)
    shape = tf.constant([33, units])
    threshold = tf.constant(dropout_threshold(0.3), tf.uint16)
    eager = _keep(shape, units, threshold, seed).numpy()
    compiled = tf.function(lambda s: _keep(shape, units, threshold, s), jit_compile=True)(seed).numpy()
    np.testing.assert_array_equal(compiled, eager)
    assert 0.2 < 1 - eager.mean() < 0.4


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("units", [256, 7])
def test_relu_dropout_is_bit_equal_to_relu_then_dropout(dtype: tf.DType, units: int) -> None:
    """Forward and gradient of the fused op equal ``dropout(relu(h))`` and its autodiff gradient exactly,
    with exact zeros (ReLU), dropped units, and the gradient of h == 0 (ReLU's subgradient 0) in the data."""
    rng = np.random.default_rng(0)
    h_np = rng.normal(size=(97, units)).astype(np.float32)
    h_np[0, :] = 0.0
    h = tf.cast(tf.constant(h_np), dtype)
    dy = tf.cast(tf.constant(rng.normal(size=(97, units)).astype(np.float32)), dtype)
    seed = tf.constant([11, 4], tf.int64)

    def run(fn):
        with tf.GradientTape() as tape:
            tape.watch(h)
            y = fn(h)
        return y.numpy(), tape.gradient(y, h, output_gradients=dy).numpy()

    y_fused, g_fused = run(lambda v: relu_dropout(v, 0.1, seed))
    y_ref, g_ref = run(lambda v: dropout(tf.nn.relu(v), 0.1, seed))
    assert y_fused.dtype == y_ref.dtype == dtype.as_numpy_dtype
    np.testing.assert_array_equal(y_fused, y_ref)
    np.testing.assert_array_equal(g_fused, g_ref)
    kept = (y_ref != 0).mean()
    assert 0.4 < kept < 0.5  # about half positive, 0.9 of those kept: both the ReLU and the mask act
    # the same in a tf.function (as the train step calls it)
    y_graph = tf.function(lambda v: relu_dropout(v, 0.1, seed))(h).numpy()
    np.testing.assert_array_equal(y_graph, y_ref)


def test_relu_dropout_rejects_unknown_units() -> None:
    with pytest.raises(ValueError, match="known units"):
        relu_dropout(tf.zeros([2, 3, 4]), 0.1, tf.constant([1, 2], tf.int64))

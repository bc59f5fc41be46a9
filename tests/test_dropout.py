"""Stateless 16-bit dropout: the mask against a numpy re-derivation of the counter-hash words, and the fused
ReLU + dropout (XLA) bit-equal to the unfused ops, forward and gradient, in float32 and bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from wd_sok.dropout import _keep, dropout, dropout_threshold, keep_scale, mix32, random_words, relu_dropout


def _mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 in numpy uint32 (wrapping multiplies), written from its published definition."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _numpy_words(rows: int, words: int, seed: tuple[int, int]) -> np.ndarray:
    w = np.array(seed, "<i8").view("<u4")  # [lo0, hi0, lo1, hi1]
    k0, k1 = np.uint32(0x243F6A88), np.uint32(0x85A308D3)
    for i in range(4):
        k0 = _mix32(np.array(k0 ^ w[3 - i]))
        k1 = _mix32(np.array(k1 ^ w[i]))
    counter = (np.arange(rows, dtype=np.uint32)[:, None] * np.uint32(words) + np.arange(words, dtype=np.uint32))
    return _mix32(_mix32(counter ^ k0) ^ k1)


def test_mix32_known_values() -> None:
    """TensorFlow's mix32 equals the numpy one; lowbias32 fixes 0 and is injective."""
    x = tf.constant([0, 1, 0xFFFFFFFF, 123456789], tf.uint32)
    np.testing.assert_array_equal(mix32(x).numpy(), _mix32(x.numpy()))
    assert int(mix32(tf.constant(0, tf.uint32))) == 0
    assert len(set(_mix32(np.arange(1 << 16, dtype=np.uint32)).tolist())) == 1 << 16  # injective on a range


@pytest.mark.parametrize("units", [64, 7])
def test_dropout_from_16_bit_words(units: int) -> None:
    """The mask is the documented function of the counter-hash words (each read as two 16-bit halves, low
    half first; re-derived here with numpy), dropped fraction ~ 6554 / 65536 for rate 0.1, kept values
    scaled exactly, masks independent across seeds."""
    seed = (2**62 + 123, 7)
    x = tf.ones([4000, units])
    y = dropout(x, 0.1, tf.constant(seed, tf.int64)).numpy()
    words = _numpy_words(4000, (units + 1) // 2, seed)
    bits = words.astype("<u4").view("<u2").reshape(4000, -1)[:, :units]
    t = dropout_threshold(0.1)
    assert t == 6554
    assert keep_scale(0.1) == 65536 / (65536 - 6554)
    np.testing.assert_array_equal(y > 0, bits >= t)
    np.testing.assert_allclose(y[y > 0], 65536 / (65536 - t), rtol=1e-7)
    p, n = t / 65536, y.size
    assert abs((y == 0).mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(dropout(x, 0.1, tf.constant(seed, tf.int64)).numpy(), y)  # pure function
    other = dropout(x, 0.1, tf.constant([seed[0], seed[1] + 1], tf.int64)).numpy()  # the next step
    both = ((y == 0) & (other == 0)).mean()
    assert abs(both - p * p) < 4 * np.sqrt(p * p / n)  # drops of two steps are independent


def test_bits_are_uniform_and_uncorrelated() -> None:
    """Each of the 16-bit halves is uniform (chi-square over 64 bins), and neighbouring units and rows are
    uncorrelated: the counter hash is good enough where dropout reads it."""
    words = random_words(tf.constant(2048), 512, tf.constant([5, 9], tf.int64)).numpy()
    halves = words.astype("<u4").view("<u2").reshape(2048, 1024).astype(np.float64)
    counts = np.bincount((halves.ravel() // 1024).astype(np.int64), minlength=64)
    expected = halves.size / 64
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 120  # 63 degrees of freedom: p(chi2 > 120) < 1e-5
    u = halves / 65535.0 - 0.5
    sd = 1 / np.sqrt(u[:, 1:].size)
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        r = (a * b).mean() / (u * u).mean()
        assert abs(r) < 5 * sd


@pytest.mark.parametrize("units", [1024, 7])
def test_xla_draws_the_same_words_as_tensorflow(units: int) -> None:
    """The fused forward draws its bits inside an XLA kernel: XLA's uint32 arithmetic must give TF's words."""
    seed = tf.constant([2**40 + 5, 3], tf.int64)
    rows = tf.constant(33)
    threshold = tf.constant(dropout_threshold(0.3), tf.uint32)
    eager = _keep(rows, units, threshold, seed).numpy()
    compiled = tf.function(lambda s: _keep(rows, units, threshold, s), jit_compile=True)(seed).numpy()
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

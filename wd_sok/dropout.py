"""Stateless dropout from 16 random bits per activation, fused with the ReLU before it.

The mask of an activation ``[B, U]`` comes from a counter-based generator (:func:`random_words`): uint32
words ``[B, ceil(U / 2)]``, word ``(r, j)`` a keyed hash (two rounds of the lowbias32 bijection) of its
position ``r * ceil(U / 2) + j``, keyed by the seed [2] int64 (the model's (seed, rank, layer) key and the
step). Unit ``u`` reads the low or high 16 bits of word ``u // 2`` and is kept when they are >=
:func:`dropout_threshold` ``t``; kept values are scaled by ``65536 / (65536 - t)`` (the exact inverse keep
probability). Like Philox, a pure function of (seed, position), but 10 integer ops per word that XLA fuses
into the loop using them: on the 2-core Xeon, Philox's words alone cost 10-15 ms per [8192, 1024] layer, this
hash ~1 ms. Its statistical checks (uniform halves, uncorrelated neighbours and steps) are in
tests/test_dropout.py; a dropout mask needs no cryptographic strength.

:func:`relu_dropout` computes ``relu(h) * mask`` in one XLA-compiled pass (the bits are drawn inside the
fused loop, never stored) and its gradient in another, ``dy * scale where y > 0 else 0``: ``y > 0`` exactly
where the unit was kept and ``h > 0``, so no mask is kept for the backward pass and ReLU's gradient comes
with it. Both are bit-identical to ``tf.nn.relu`` followed by :func:`dropout` (and to their gradients):
``h * scale`` is the same single rounding in float32 and bfloat16 (tests/test_dropout.py).
"""

from __future__ import annotations

import tensorflow as tf

DROPOUT_BITS = 16  # random bits per activation: one 32-bit hash word masks two activations


def dropout_threshold(rate: float) -> int:
    """The 16-bit threshold of ``rate``: an activation is dropped when its bits are below it, so the drop
    probability is ``threshold / 65536`` (0.1 -> 6554 / 65536 = 0.100006)."""
    return int(round(rate * (1 << DROPOUT_BITS)))


def keep_scale(rate: float) -> float:
    """The factor kept activations are multiplied by: ``65536 / (65536 - threshold)``."""
    return (1 << DROPOUT_BITS) / ((1 << DROPOUT_BITS) - dropout_threshold(rate))


_MIX = (0x7FEB352D, 0x846CA68B)  # "lowbias32" (C. Wellons, hash-prospector): a 32-bit bijection, bias ~1.7e-4


def mix32(x: tf.Tensor) -> tf.Tensor:
    """The lowbias32 integer hash of uint32 ``x`` (any shape): ``x ^= x >> 16; x *= M1; x ^= x >> 15;
    x *= M2; x ^= x >> 16``, a bijection whose output bits each flip with probability ~1/2 when any input bit
    does."""
    for shift, mult in ((16, _MIX[0]), (15, _MIX[1])):
        x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(shift, tf.uint32)))
        x = x * tf.constant(mult, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def stream_keys(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Two uint32 keys from the [2] int64 ``seed``: each a chain of :func:`mix32` over all four 32-bit words
    of the seed, in opposite orders (so two seeds share both keys with probability ~2^-64)."""
    w = tf.reshape(tf.bitcast(seed, tf.uint32), [4])
    k0, k1 = tf.constant(0x243F6A88, tf.uint32), tf.constant(0x85A308D3, tf.uint32)  # digits of pi
    for i in range(4):
        k0 = mix32(tf.bitwise.bitwise_xor(k0, w[3 - i]))
        k1 = mix32(tf.bitwise.bitwise_xor(k1, w[i]))
    return k0, k1


def random_words(rows: tf.Tensor, words: int, seed: tf.Tensor) -> tf.Tensor:
    """uint32 [rows, words]: word ``(r, j)`` is ``mix32(mix32(c ^ k0) ^ k1)`` of its counter
    ``c = r * words + j`` (mod 2^32: words repeat only past 2^32 per layer and step) and the
    :func:`stream_keys` of ``seed``. A counter-based generator (like Philox, a pure function of seed and
    position) at 10 integer ops per word, which XLA fuses into the loop that uses it."""
    k0, k1 = stream_keys(seed)
    counter = (tf.cast(tf.range(rows), tf.uint32)[:, None] * tf.constant(words, tf.uint32)
               + tf.cast(tf.range(words), tf.uint32)[None, :])
    return mix32(tf.bitwise.bitwise_xor(mix32(tf.bitwise.bitwise_xor(counter, k0)), k1))


def _keep(rows: tf.Tensor, units: int, threshold: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """bool [rows, units]: the kept activations of the mask drawn from ``seed`` ([2] int64), ``threshold``
    a uint32 scalar (:func:`dropout_threshold`): unit ``u`` reads
    the low (even ``u``) or high (odd ``u``) 16 bits of word ``u // 2`` (shifts, not a bitcast: XLA fuses
    shifts into the loop; a bitcast to uint16 made it 3x slower)."""
    words = random_words(rows, (units + 1) // 2, seed)
    halves = tf.bitwise.right_shift(words[:, :, None], tf.constant([0, 16], tf.uint32))
    halves = tf.bitwise.bitwise_and(halves, tf.constant(0xFFFF, tf.uint32))
    keep = tf.reshape(halves >= threshold, [rows, 2 * ((units + 1) // 2)])
    return keep[:, :units] if units % 2 else keep


def dropout(x: tf.Tensor, rate: float, seed: tf.Tensor) -> tf.Tensor:
    """Stateless dropout of ``x`` [B, U] (unfused ops; the reference :func:`relu_dropout` is tested against)."""
    units = int(x.shape[-1])
    keep = _keep(tf.shape(x)[0], units, tf.constant(dropout_threshold(rate), tf.uint32), seed)
    mask = tf.where(keep, tf.constant(keep_scale(rate), x.dtype), tf.constant(0, x.dtype))
    return x * mask  # the gradient is dy * mask: no second select


@tf.function(jit_compile=True)
def _relu_dropout_forward(h: tf.Tensor, threshold: tf.Tensor, scale: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    keep = _keep(tf.shape(h)[0], int(h.shape[-1]), threshold, seed) & (h > 0)
    return tf.where(keep, h * scale, tf.zeros_like(h))


@tf.function(jit_compile=True)
def _relu_dropout_backward(y: tf.Tensor, dy: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    return tf.where(y > 0, dy * scale, tf.zeros_like(dy))


def relu_dropout(h: tf.Tensor, rate: float, seed: tf.Tensor) -> tf.Tensor:
    """``dropout(tf.nn.relu(h), rate, seed)`` for pre-activations ``h`` [B, U] (float32 or bfloat16), fused:
    one pass forward (bits drawn inside it), one backward (``dh = dy * scale`` where ``y > 0``, else 0)."""
    if h.shape.rank != 2 or h.shape[-1] is None:
        raise ValueError(f"relu_dropout expects [batch, units] with known units, got shape {h.shape}")
    threshold = tf.constant(dropout_threshold(rate), tf.uint32)
    scale = tf.constant(keep_scale(rate), h.dtype)

    @tf.custom_gradient
    def fused(h: tf.Tensor) -> tuple[tf.Tensor, object]:
        y = _relu_dropout_forward(h, threshold, scale, seed)

        def grad(dy: tf.Tensor) -> tf.Tensor:
            return _relu_dropout_backward(y, dy, scale)

        return y, grad

    return fused(h)

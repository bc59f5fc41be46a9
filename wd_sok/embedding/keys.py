"""Raw int64 keys of dynamic tables: the 64-bit mix that places them, and their initial rows.

Both functions exist twice, in TensorFlow (used in the step) and in numpy (checkpoints, tests, the SOK
backend's restore), computing the same bits:

* :func:`mix64` is SplitMix64's finaliser (Steele, Lea & Flood 2014; the mixing step of ``java.util.
  SplittableRandom``): a bijection of 64-bit words whose output bits each depend on every input bit, so
  sequential raw ids (1, 2, 3, ...) spread evenly over ranks. Key ``k`` lives on rank ``mix64(k) % N``.
* :func:`initial_key_rows`: the initial row of key ``k`` is a pure function of (seed, table, key, column):
  ``a * (2 u - 1)`` with ``u = (mix64(mix64(k ^ s) + (j + 1) * G) >> 40) / 2**24`` (``s`` the table's seed,
  ``G`` the golden-ratio constant), uniform on [-a, a) with ``a = sqrt(3) * std`` and ``std = sqrt(2 /
  (capacity + dim))`` (Glorot's std; a uniform rather than a truncated normal, because it is one mix per
  value). A key evicted and admitted again starts from the same row; the rank count never matters.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from wd_sok.embedding.base import table_seed
from wd_sok.feature_spec import TableConfig

M1, M2, GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


def mix64_np(keys: np.ndarray) -> np.ndarray:
    """[n] uint64 SplitMix64 finaliser of [n] int64 (or uint64) keys."""
    z = np.asarray(keys).astype(np.int64).view(np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(M1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(M2)
        z ^= z >> np.uint64(31)
    return z


def mix64(keys: tf.Tensor) -> tf.Tensor:
    """Same as :func:`mix64_np` in TensorFlow: [n] int64 -> [n] uint64."""
    z = tf.bitcast(tf.cast(keys, tf.int64), tf.uint64) if keys.dtype != tf.uint64 else keys
    for shift, mul in ((30, M1), (27, M2)):
        z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(shift, tf.uint64)))
        z = z * tf.constant(mul, tf.uint64)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


def owner_np(keys: np.ndarray, world: int) -> np.ndarray:
    """[n] int64 rank holding each key: ``mix64(k) % world``."""
    return (mix64_np(keys) % np.uint64(world)).astype(np.int64)


def owner(keys: tf.Tensor, world: int) -> tf.Tensor:
    """[n] int32 rank holding each of [n] int64 ``keys``."""
    if world == 1:
        return tf.zeros(tf.shape(keys), tf.int32)
    return tf.cast(mix64(keys) % tf.constant(world, tf.uint64), tf.int32)


def _amplitude(table: TableConfig, kind: str) -> float:
    if kind == "zeros":
        return 0.0
    if kind != "glorot_normal":
        raise ValueError(f"unknown initializer {kind!r}")
    return float(np.sqrt(3.0) * np.sqrt(2.0 / (table.cardinality + table.dim)))


def initial_key_rows_np(table: TableConfig, keys: np.ndarray, seed: int, kind: str) -> np.ndarray:
    """[n, dim] float32 initial rows of [n] int64 ``keys`` (see the module docstring)."""
    keys = np.asarray(keys, np.int64)
    a = np.float32(_amplitude(table, kind))
    if a == 0 or keys.size == 0:
        return np.zeros((keys.size, table.dim), np.float32)
    s = np.uint64(table_seed(seed, table.name) & _U64)
    base = mix64_np(keys.view(np.uint64) ^ s)[:, None]
    with np.errstate(over="ignore"):
        cols = (np.arange(1, table.dim + 1, dtype=np.uint64) * np.uint64(GOLDEN))[None, :]
        u = (mix64_np((base + cols).reshape(-1)) >> np.uint64(40)).astype(np.float32) / np.float32(2**24)
    return ((np.float32(2) * u - np.float32(1)) * a).reshape(keys.size, table.dim).astype(np.float32)


def initial_key_rows(table: TableConfig, keys: tf.Tensor, seed: int, kind: str) -> tf.Tensor:
    """Same as :func:`initial_key_rows_np` in TensorFlow: [n] int64 -> [n, dim] float32."""
    a = _amplitude(table, kind)
    if a == 0:
        return tf.zeros(tf.stack([tf.size(keys), table.dim]), tf.float32)
    s = tf.constant(table_seed(seed, table.name) & _U64, tf.uint64)
    base = mix64(tf.bitwise.bitwise_xor(tf.bitcast(tf.cast(keys, tf.int64), tf.uint64), s))[:, None]
    cols = tf.constant([(j * GOLDEN) & _U64 for j in range(1, table.dim + 1)], tf.uint64)[None, :]
    u = tf.cast(tf.bitwise.right_shift(mix64(tf.reshape(base + cols, [-1])), tf.constant(40, tf.uint64)),
                tf.float32) / float(2**24)
    return tf.reshape((2.0 * u - 1.0) * a, tf.stack([tf.size(keys), table.dim]))

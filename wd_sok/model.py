"""Wide & Deep: logit = wide(x) + deep(x); the embedding layers come in as arguments (any backend).

Wide: per categorical feature a (cardinality, 1) table, zero-initialised, multi-hot rows summed; plus
numerics [B, n] @ kernel (n, 1), zero-initialised; plus a scalar bias.
Deep: per categorical feature a (cardinality, dim) table; the input is the concatenation, in the spec's
order (one-hot features, then multi-hot features, then the raw numerics), of
[emb(f1), ..., emb(fk), numerics]; then ReLU layers each followed by dropout, then a linear unit.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from wd_sok.data.batch import Batch
from wd_sok.dropout import relu_dropout
from wd_sok.embedding.base import EmbeddingCollection


def dropout_key(seed: int, rank: int, layer: int) -> int:
    """The first half of layer ``layer``'s stateless dropout seed on ``rank`` (the step is the second)."""
    return int(np.random.SeedSequence([seed, rank, layer]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class WideDeepModel(tf.keras.Model):
    """Returns logits [B] float32 for a :class:`Batch`.

    Args:
        categorical: categorical feature names in deep-input order.
        n_numerical: number of numerical features.
        wide_embedding: dim-1 tables (zero-initialised), one per categorical feature.
        deep_embedding: dim-d tables, one per categorical feature.
        hidden_units: widths of the deep ReLU layers.
        dropout: dropout rate after each hidden layer.
        compute_dtype: "float32", or "bfloat16"/"float16" for mixed precision in the MLP.
        seed: initialiser seed; dropout masks are a stateless function of (seed, rank, layer, step): a
            resumed run repeats them, and each rank draws its own.
        rank: this process's rank (its rows get masks independent of the other ranks').
        xla: compile the MLP (forward and backward) with XLA.
    """

    def __init__(self, categorical: list[str], n_numerical: int, wide_embedding: EmbeddingCollection,
                 deep_embedding: EmbeddingCollection, hidden_units: list[int], dropout: float,
                 compute_dtype: str = "float32", seed: int = 0, rank: int = 0, xla: bool = False) -> None:
        super().__init__(name="wide_deep")
        self.categorical, self.n_numerical = list(categorical), n_numerical
        self.wide_embedding, self.deep_embedding = wide_embedding, deep_embedding
        self.wide_bias = self.add_weight("wide/bias", shape=(), initializer="zeros")
        self.wide_kernel = (self.add_weight("wide/numerical", shape=(n_numerical, 1), initializer="zeros")
                            if n_numerical else None)
        policy = (tf.keras.mixed_precision.Policy(f"mixed_{compute_dtype}") if compute_dtype != "float32"
                  else "float32")
        # ReLU is applied in _mlp_impl: fused with dropout when training (wd_sok/dropout.py)
        self.hidden = [tf.keras.layers.Dense(u, name=f"deep/dense_{i}", dtype=policy,
                                             kernel_initializer=tf.keras.initializers.GlorotUniform(seed + i))
                       for i, u in enumerate(hidden_units)]
        self.dropout, self.seed, self.rank = dropout, seed, rank
        self.dropout_keys = [dropout_key(seed, rank, i) for i in range(len(hidden_units))]
        self.head = tf.keras.layers.Dense(1, name="deep/head", dtype=policy,
                                          kernel_initializer=tf.keras.initializers.GlorotUniform(seed + 99))

        self._mlp = tf.function(self._mlp_impl, jit_compile=True, reduce_retracing=True) if xla else self._mlp_impl

    @tf.autograph.experimental.do_not_convert  # plain Python over layers (see EmbeddingCollection.lookup)
    def call(self, batch: Batch, training: bool = False, step: tf.Tensor | int = 0) -> tf.Tensor:
        """Logits [B] float32; ``step`` seeds the dropout masks when training."""
        ids = {name: batch.categorical[name] for name in self.categorical}
        return self.wide_logit(batch, ids) + self.deep_logit(batch, ids, training, step)

    @tf.autograph.experimental.do_not_convert  # plain Python over layers (see EmbeddingCollection.lookup)
    def wide_logit(self, batch: Batch, ids: dict) -> tf.Tensor:
        """[B] float32: sum of the per-feature weights + numerics @ kernel + bias."""
        logit = tf.zeros_like(batch.label) + self.wide_bias
        if self.categorical:
            wide = self.wide_embedding(ids)
            logit += tf.add_n([wide[name][:, 0] for name in self.categorical])
        if self.wide_kernel is not None:
            logit += tf.linalg.matvec(batch.numerical, self.wide_kernel[:, 0])
        return logit

    @tf.autograph.experimental.do_not_convert  # plain Python over layers (see EmbeddingCollection.lookup)
    def deep_logit(self, batch: Batch, ids: dict, training: bool, step: tf.Tensor | int = 0) -> tf.Tensor:
        """[B] float32: MLP over [embeddings in spec order, numerics]."""
        parts = []
        if self.categorical:
            deep = self.deep_embedding(ids)
            parts = [deep[name] for name in self.categorical]
        if self.n_numerical:
            parts.append(batch.numerical)
        x = tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]
        rate = self.dropout if training else 0.0
        return self._mlp(x, tf.cast(step, tf.int64), rate)

    @tf.autograph.experimental.do_not_convert  # plain Python over layers (see EmbeddingCollection.lookup)
    def _mlp_impl(self, x: tf.Tensor, step: tf.Tensor, rate: float) -> tf.Tensor:
        for i, dense in enumerate(self.hidden):
            if rate > 0.0:  # ReLU + stateless dropout in one pass: mask = f(seed, rank, layer, step)
                x = relu_dropout(dense(x), rate, tf.stack([tf.constant(self.dropout_keys[i], tf.int64), step]))
            else:
                x = tf.nn.relu(dense(x))
        return tf.cast(self.head(x)[:, 0], tf.float32)

    # ---- variable groups (the two optimizers, and what is sharded)
    @property
    def wide_variables(self) -> list[tf.Variable]:
        own = [self.wide_bias] + ([self.wide_kernel] if self.wide_kernel is not None else [])
        return list(self.wide_embedding.trainable_variables) + own

    @property
    def deep_variables(self) -> list[tf.Variable]:
        dense = [v for layer in self.hidden + [self.head] for v in layer.trainable_variables]
        return list(self.deep_embedding.trainable_variables) + dense

    @property
    def dense_variables(self) -> list[tf.Variable]:
        """Everything that is data-parallel (allreduced, broadcast at start)."""
        sparse = {id(v) for v in self.sparse_variables}
        return [v for v in self.wide_variables + self.deep_variables if id(v) not in sparse]

    def named_dense_variables(self) -> dict[str, tf.Variable]:
        """Stable names (independent of Keras' layer numbering) of the non-embedding variables."""
        named = {"wide/bias": self.wide_bias}
        if self.wide_kernel is not None:
            named["wide/numerical"] = self.wide_kernel
        for layer in self.hidden + [self.head]:
            if layer.built:
                named[f"{layer.name}/kernel"] = layer.kernel
                named[f"{layer.name}/bias"] = layer.bias
        return named

    @property
    def sparse_variables(self) -> list[tf.Variable]:
        """Sharded embedding tables: gradients stay local, never allreduced."""
        return self.wide_embedding.sparse_variables + self.deep_embedding.sparse_variables

    @property
    def dense_reduced_variables(self) -> list[tf.Variable]:
        """Replicated tables whose gradients are reduced dense (see ``EmbeddingCollection``)."""
        return self.wide_embedding.dense_reduced_variables + self.deep_embedding.dense_reduced_variables

"""The compiled train and eval steps.

Loss scale: each rank's loss is sum(BCE over its rows) / global_batch, so dense gradients summed over ranks
and sharded-table gradients (which arrive as the sum over ranks through the alltoall) both equal the gradient
of the global mean loss. Dense gradients are allreduced; sharded-table gradients never are; replicated tables'
(IndexedSlices of their distinct rows) are allgathered, or densified and allreduced where the plan says so.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from wd_sok import changes
from wd_sok.data.batch import Batch
from wd_sok.distributed import Runtime
from wd_sok.model import WideDeepModel

Optimizer = tf.keras.optimizers.legacy.Optimizer


def make_train_step(model: WideDeepModel, wide_opt: Optimizer, deep_opt: Optimizer, runtime: Runtime,
                    global_batch: int, loss_scaling: bool = False) -> Callable[[Batch, tf.Tensor], tf.Tensor]:
    """Return ``step(batch, global_step) -> local BCE sum`` (a scalar float32 tensor).

    With ``loss_scaling`` (float16 compute) the loss is scaled dynamically: the scale halves and the update is
    skipped when a gradient is not finite on any rank (one int32 min-allreduce per step: ranks agree), and
    doubles after 2000 finite steps.
    """
    scale = tf.Variable(2.0**15, trainable=False, dtype=tf.float32) if loss_scaling else None
    good_steps = tf.Variable(0, trainable=False, dtype=tf.int64) if loss_scaling else None

    @tf.function(reduce_retracing=True)
    def step(batch: Batch, global_step: tf.Tensor) -> tf.Tensor:
        wide_vars, deep_vars = model.wide_variables, model.deep_variables
        sparse = {id(v) for v in model.sparse_variables}
        densify = {id(v) for v in model.dense_reduced_variables}
        with tf.GradientTape() as tape:
            logits = model(batch, training=True, step=global_step)
            loss_sum = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=batch.label, logits=logits))
            loss = loss_sum / float(global_batch)
            if scale is not None:
                loss = loss * scale
        variables = wide_vars + deep_vars
        grads = tape.gradient(loss, variables)
        dense = [i for i, v in enumerate(variables) if id(v) not in sparse and grads[i] is not None]
        for i in dense:  # small replicated tables: a dense allreduce and update beat the sparse machinery
            if id(variables[i]) in densify:
                grads[i] = tf.convert_to_tensor(grads[i])
        for i, g in _pairs(dense, runtime.allreduce_grads([grads[i] for i in dense])):
            grads[i] = g
        if scale is not None:
            grads = [None if g is None else _unscale(g, scale) for g in grads]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(_values(g))) for g in grads if g is not None])
            if runtime.size > 1:  # sharded-table gradients are local: apply or skip on every rank alike
                finite = runtime.hvd.allreduce(tf.cast(finite, tf.int32), op=runtime.hvd.Min,
                                               name="all_grads_finite") > 0

            def apply() -> tf.Tensor:
                _apply(wide_opt, deep_opt, grads, wide_vars, deep_vars, model)
                good_steps.assign_add(1)
                return tf.constant(True)

            def skip() -> tf.Tensor:
                scale.assign(tf.maximum(scale / 2.0, 1.0))
                good_steps.assign(0)
                return tf.constant(False)

            tf.cond(finite, apply, skip)
            grow = good_steps >= 2000
            scale.assign(tf.where(grow, scale * 2.0, scale))
            good_steps.assign(tf.where(grow, tf.zeros_like(good_steps), good_steps))
        else:
            _apply(wide_opt, deep_opt, grads, wide_vars, deep_vars, model)
        return loss_sum

    step.loss_scale = scale  # the dynamic scale variable (None without loss scaling), for inspection
    return step


@tf.autograph.experimental.do_not_convert  # see _pairs
def _pairs(a: list, b: list) -> list[tuple]:
    """``list(zip(a, b, strict=True))`` outside AutoGraph: TensorFlow 2.12's AutoGraph (the GPU image's) replaces
    ``zip`` in traced code by a version without ``strict`` (TypeError); scripts/check_tf_compat.sh found it."""
    return list(zip(a, b, strict=True))


@tf.autograph.experimental.do_not_convert  # see _pairs
def _apply(wide_opt: Optimizer, deep_opt: Optimizer, grads: list, wide_vars: list, deep_vars: list,
           model: WideDeepModel) -> None:
    """Apply the gradients; tables a collection updates itself (SOK's dynamic ones) go through it first."""
    n = len(wide_vars)
    wide = model.wide_embedding.apply_own([(g, v) for g, v in zip(grads[:n], wide_vars, strict=True) if g is not None])
    deep = model.deep_embedding.apply_own([(g, v) for g, v in zip(grads[n:], deep_vars, strict=True) if g is not None])
    tables = model.wide_embedding.trainable_variables + model.deep_embedding.trainable_variables
    changes.mark_applied(wide_opt, wide, tables)  # rows changed since the last full checkpoint (delta saves)
    changes.mark_applied(deep_opt, deep, tables)
    wide_opt.apply_gradients(wide)
    deep_opt.apply_gradients(deep)


def _values(g: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    return g.values if isinstance(g, tf.IndexedSlices) else g


def _unscale(g: tf.Tensor | tf.IndexedSlices, scale: tf.Variable) -> tf.Tensor | tf.IndexedSlices:
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values / scale, g.indices, g.dense_shape)
    return g / tf.cast(scale, g.dtype)


def make_eval_step(model: WideDeepModel) -> Callable[[Batch], tf.Tensor]:
    """Return ``step(batch) -> click probabilities [B] float32``, one per row, padding rows included.

    The evaluation loop feeds batches padded to the local eval batch size (equal shapes on every rank for the
    collective lookups) and drops the rows whose ``batch.mask`` is 0 before any metric sees them.
    """

    @tf.function(reduce_retracing=True)
    def step(batch: Batch) -> tf.Tensor:
        return tf.sigmoid(model(batch, training=False))

    return step

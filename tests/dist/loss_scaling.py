"""Float16 loss scaling under ``horovodrun -np N``: the "all gradients finite" decision is the same on every rank.

A one-feature Wide & Deep model (sharded tables, float16 compute, hidden layer of 2 units) is rigged so that only
the deep table's gradient is non-finite, and only on rank 0: every rank feeds even ids (all owned by rank 0 under
the ``g % N`` placement), the table holds 0.5 everywhere, and hidden unit 1's kernel is -inf on the embedding
inputs. Then unit 1's pre-activation is -inf (ReLU: 0, so the forward pass is finite), its back-propagated
delta is 0, and d loss / d embedding = delta @ kernel^T holds 0 * -inf = NaN, which the backward alltoall sends
to the owner, rank 0. Every dense gradient stays finite, so only a cross-rank agreement makes rank 1 skip too.

Checked, on every rank: that step is skipped (optimizer iterations stay 0, dense weights unchanged) and the
loss scale halves, identically across ranks. Then, with the kernel made finite, a scaled step applies on
every rank and matches an unscaled float16 step of an identical model (the power-of-2 scale is exact): atol 1e-6
on every dense weight. Rank 0 writes ``--out`` (JSON); exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wd_sok.data.batch import Batch  # noqa: E402
from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.embedding import make_embedding  # noqa: E402
from wd_sok.feature_spec import TableConfig  # noqa: E402
from wd_sok.model import WideDeepModel  # noqa: E402
from wd_sok.steps import make_train_step  # noqa: E402


def build(rt: Runtime, loss_scaling: bool) -> tuple:
    wide = make_embedding("sharded", [TableConfig("a", 8, 1)], "zeros", 0, "wide", rt)
    deep = make_embedding("sharded", [TableConfig("a", 8, 2)], "glorot_normal", 0, "deep", rt)
    model = WideDeepModel(["a"], 1, wide, deep, [2], 0.0, compute_dtype="float16", seed=0, rank=rt.rank)
    wide_opt = tf.keras.optimizers.legacy.Ftrl(0.1)
    deep_opt = tf.keras.optimizers.legacy.RMSprop(0.01, rho=0.5)
    step = make_train_step(model, wide_opt, deep_opt, rt, global_batch=4 * rt.size, loss_scaling=loss_scaling)
    return model, deep_opt, step


def batch() -> Batch:
    return Batch(numerical=tf.constant([[1.0], [0.5], [-1.0], [2.0]]), categorical={"a": tf.constant([0, 2, 4, 6])},
                 label=tf.constant([0.0, 1.0, 0.0, 1.0]))


def gathered(rt: Runtime, values: list[float]) -> np.ndarray:
    """[ranks, len(values)] float64: every rank's values."""
    return rt.hvd.allgather(tf.constant([values], tf.float64), name="gathered").numpy()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rt = Runtime()
    model, deep_opt, step = build(rt, loss_scaling=True)
    model(batch(), training=False)
    for v in model.deep_embedding.sparse_variables:
        v.assign(tf.fill(v.shape, 0.5))
    kernel = model.hidden[0].kernel  # rows: 2 embedding inputs, then 1 numerical
    finite_kernel = kernel.numpy()
    rigged = finite_kernel.copy()
    rigged[:2, 1] = -np.inf
    kernel.assign(rigged)
    dense_before = [v.numpy().copy() for v in model.dense_variables]
    step(batch(), tf.constant(0, tf.int64))
    local_nonfinite = 0.0  # which rank saw the NaN: its table gradient (recomputed, unscaled)
    with tf.GradientTape() as tape:
        logits = model(batch(), training=True)
        loss = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=batch().label, logits=logits))
    grads = tape.gradient(loss, model.deep_embedding.sparse_variables)
    for g in grads:
        values = g.values if isinstance(g, tf.IndexedSlices) else g
        local_nonfinite += float(not np.all(np.isfinite(values.numpy())))
    moved = sum(not np.array_equal(v.numpy(), b) for v, b in zip(model.dense_variables, dense_before, strict=True))
    skipped = gathered(rt, [float(deep_opt.iterations.numpy()), float(moved), local_nonfinite,
                            float(step.loss_scale.numpy())])
    # a finite scaled step == an unscaled one (float16 compute both), on every rank
    kernel.assign(finite_kernel)
    ref_model, ref_opt, ref_step = build(rt, loss_scaling=False)
    ref_model(batch(), training=False)
    for dst, src in zip(ref_model.dense_variables + ref_model.sparse_variables,
                        model.dense_variables + model.sparse_variables, strict=True):
        dst.assign(src)
    step(batch(), tf.constant(1, tf.int64))
    ref_step(batch(), tf.constant(1, tf.int64))
    diff = max(float(np.abs(a.numpy() - b.numpy()).max())
               for a, b in zip(model.dense_variables, ref_model.dense_variables, strict=True))
    applied = gathered(rt, [float(deep_opt.iterations.numpy()), float(ref_opt.iterations.numpy()), diff])
    failures = []
    if not skipped[:, 2].any() or skipped[:, 2].all():
        failures.append(f"the rig should make exactly one rank's table gradient non-finite: {skipped[:, 2]}")
    if (skipped[:, 0] != 0).any():
        failures.append(f"a rank applied the non-finite step (iterations per rank {skipped[:, 0]})")
    if (skipped[:, 1] != 0).any():
        failures.append(f"dense weights moved on a skipped step (per rank {skipped[:, 1]})")
    if (skipped[:, 3] != 2.0**14).any():
        failures.append(f"the loss scale should halve from 2**15 on every rank: {skipped[:, 3]}")
    if (applied[:, 0] != 1).any() or (applied[:, 1] != 1).any():
        failures.append(f"the finite step did not apply everywhere: {applied[:, :2]}")
    if (applied[:, 2] > 1e-6).any():
        failures.append(f"scaled step != unscaled step: max |diff| per rank {applied[:, 2]}")
    if rt.is_chief:
        Path(args.out).write_text(json.dumps({"ranks": rt.size, "skipped": skipped.tolist(),
                                              "applied": applied.tolist(), "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

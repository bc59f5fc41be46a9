"""LazyRMSprop: the legacy sparse RMSprop's updates at O(touched rows), and checkpoint slots in legacy form."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from wd_sok.optim import LazyRMSprop, read_slot, slot_names, write_slot

ROWS, DIM, LR, EPS = 40, 3, 0.01, 1e-7


def _grads(steps: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per step: ids (with repeats; some rows untouched for many steps) and [n, DIM] gradients."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        ids = rng.integers(0, ROWS // 2, rng.integers(1, 12)) * rng.integers(1, 3)  # odd rows > 20: never
        out.append((ids.astype(np.int64), rng.normal(size=(len(ids), DIM)).astype(np.float32)))
    return out


def _apply(opt: tf.keras.optimizers.legacy.Optimizer, var: tf.Variable, ids: np.ndarray, g: np.ndarray) -> None:
    opt.apply_gradients([(tf.IndexedSlices(tf.constant(g), tf.constant(ids), tf.constant([ROWS, DIM])), var)])


def _numpy_rmsprop(init: np.ndarray, grads: list, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """The legacy update written out: every row's rms decays each step; duplicate ids are summed first."""
    var, rms = init.astype(np.float64), np.zeros_like(init, np.float64)
    for ids, g in grads:
        rows = np.unique(ids)
        summed = np.stack([g[ids == r].sum(0) for r in rows])
        rms *= rho
        rms[rows] += (1 - rho) * summed**2
        var[rows] -= LR * summed / (np.sqrt(rms[rows]) + EPS)
    return var, rms


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_lazy_follows_legacy_and_numpy(rho: float) -> None:
    init = np.random.default_rng(1).normal(size=(ROWS, DIM)).astype(np.float32)
    grads = _grads(25, seed=2)
    a, b = tf.Variable(init), tf.Variable(init)
    legacy, lazy = tf.keras.optimizers.legacy.RMSprop(LR, rho=rho), LazyRMSprop(LR, rho=rho)
    for ids, g in grads:
        _apply(legacy, a, ids, g)
        _apply(lazy, b, ids, g)
    want_var, want_rms = _numpy_rmsprop(init, grads, rho)
    np.testing.assert_allclose(b.numpy(), want_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(read_slot(lazy, b, "rms").numpy(), want_rms, rtol=1e-5, atol=1e-12)
    if rho == 0.5:  # powers of two: the lazy update is the legacy one bit for bit
        np.testing.assert_array_equal(b.numpy(), a.numpy())
        np.testing.assert_array_equal(read_slot(lazy, b, "rms").numpy(), legacy.get_slot(a, "rms").numpy())
    else:
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7)
    # stale in memory for rows not touched last step (this is what saves the dense pass), exact when read
    assert not np.array_equal(lazy.get_slot(b, "rms").numpy(), legacy.get_slot(a, "rms").numpy())


@pytest.mark.parametrize("target", ["lazy", "legacy"])
def test_checkpointed_slots_are_legacy_format_and_resume_exactly(target: str) -> None:
    """Save after 10 steps (rms caught up, no 'last'), load into a fresh optimizer, continue 10 steps: the
    weights equal an uninterrupted legacy run's."""
    rho = 0.5
    init = np.random.default_rng(3).normal(size=(ROWS, DIM)).astype(np.float32)
    grads = _grads(20, seed=4)
    ref, ref_opt = tf.Variable(init), tf.keras.optimizers.legacy.RMSprop(LR, rho=rho)
    for ids, g in grads:
        _apply(ref_opt, ref, ids, g)

    first, first_opt = tf.Variable(init), LazyRMSprop(LR, rho=rho)
    for ids, g in grads[:10]:
        _apply(first_opt, first, ids, g)
    assert slot_names(first_opt) == ["rms"]
    saved = {"value": first.numpy(), "rms": read_slot(first_opt, first, "rms").numpy(),
             "iterations": int(first_opt.iterations.numpy())}

    var = tf.Variable(np.zeros_like(init))
    opt = LazyRMSprop(LR, rho=rho) if target == "lazy" else tf.keras.optimizers.legacy.RMSprop(LR, rho=rho)
    opt._create_all_weights([var])  # noqa: SLF001 - what wd_sok.embedding.base.ensure_slots does
    opt.iterations.assign(saved["iterations"])
    var.assign(saved["value"])
    write_slot(opt, var, "rms", saved["rms"])
    for ids, g in grads[10:]:
        _apply(opt, var, ids, g)
    np.testing.assert_array_equal(var.numpy(), ref.numpy())
    np.testing.assert_array_equal(read_slot(opt, var, "rms").numpy(), ref_opt.get_slot(ref, "rms").numpy())


def test_dense_and_mixed_gradients_match_legacy() -> None:
    """Dense gradients (the MLP; tables under sparse_as_dense) take the legacy path, and the rms read for a
    checkpoint is the legacy one, also when dense and sparse steps alternate on one variable."""
    init = np.random.default_rng(5).normal(size=(ROWS, DIM)).astype(np.float32)
    a, b = tf.Variable(init), tf.Variable(init)
    legacy, lazy = tf.keras.optimizers.legacy.RMSprop(LR, rho=0.5), LazyRMSprop(LR, rho=0.5)
    for k, (ids, g) in enumerate(_grads(9, seed=6)):
        for opt, var in ((legacy, a), (lazy, b)):
            if k % 3 == 1:  # a dense step
                opt.apply_gradients([(tf.constant(np.full((ROWS, DIM), k + 1.0, np.float32)), var)])
            else:
                _apply(opt, var, ids, g)
        np.testing.assert_array_equal(b.numpy(), a.numpy())
        np.testing.assert_array_equal(read_slot(lazy, b, "rms").numpy(), legacy.get_slot(a, "rms").numpy())


def test_only_tables_keep_the_last_slot_and_dense_weights_follow_keras_exactly() -> None:
    """``tables=``: the MLP's variables get no ``last`` bookkeeping (no per-step catch-up check or fill), and
    both kinds still follow the legacy optimizer bit for bit (rho 0.5)."""
    rng = np.random.default_rng(3)
    t0, k0 = rng.normal(size=(ROWS, DIM)).astype(np.float32), rng.normal(size=(DIM, 5)).astype(np.float32)
    ta, tb, ka, kb = tf.Variable(t0), tf.Variable(t0), tf.Variable(k0), tf.Variable(k0)
    legacy, lazy = tf.keras.optimizers.legacy.RMSprop(LR, rho=0.5), LazyRMSprop(LR, rho=0.5, tables=[tb])
    for ids, g in _grads(6, seed=8):
        gk = tf.constant(rng.normal(size=k0.shape).astype(np.float32))
        for opt, table, kernel in ((legacy, ta, ka), (lazy, tb, kb)):
            opt.apply_gradients([(tf.IndexedSlices(tf.constant(g), tf.constant(ids), tf.constant([ROWS, DIM])),
                                  table), (gk, kernel)])
    assert lazy.get_slot(tb, "last") is not None
    with pytest.raises(KeyError):
        lazy.get_slot(kb, "last")
    np.testing.assert_array_equal(tb.numpy(), ta.numpy())
    np.testing.assert_array_equal(kb.numpy(), ka.numpy())
    np.testing.assert_array_equal(read_slot(lazy, kb, "rms").numpy(), legacy.get_slot(ka, "rms").numpy())
    np.testing.assert_array_equal(read_slot(lazy, tb, "rms").numpy(), legacy.get_slot(ta, "rms").numpy())


@pytest.mark.parametrize("start", [2**24 + 1, 2**31 + 3])
def test_step_counts_past_float32_precision_follow_legacy_and_numpy(start: int) -> None:
    """Issue 22: the per-row step bookkeeping is int64. With float32 counts, past 2**24 steps (small batches on
    a large data set) the owed decays were rounded to 0 or 2 steps: rms and weights drifted from the legacy
    optimizer's with no warning. Resumed at step ``start`` (as a restore sets it), 25 more steps must match."""
    rho = 0.5
    init = np.random.default_rng(7).normal(size=(ROWS, DIM)).astype(np.float32)
    grads = _grads(25, seed=8)
    a, b = tf.Variable(init), tf.Variable(init)
    legacy, lazy = tf.keras.optimizers.legacy.RMSprop(LR, rho=rho), LazyRMSprop(LR, rho=rho)
    for opt, var in ((legacy, a), (lazy, b)):
        opt._create_all_weights([var])  # noqa: SLF001 - what wd_sok.embedding.base.ensure_slots does
        opt.iterations.assign(start)
        write_slot(opt, var, "rms", np.zeros((ROWS, DIM), np.float32))  # every row current as of `start`
    assert lazy.get_slot(b, "last").dtype == tf.int64
    for ids, g in grads:
        _apply(legacy, a, ids, g)
        _apply(lazy, b, ids, g)
    assert int(lazy.iterations.numpy()) == start + 25
    want_var, want_rms = _numpy_rmsprop(init, grads, rho)
    np.testing.assert_allclose(b.numpy(), want_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(read_slot(lazy, b, "rms").numpy(), want_rms, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(b.numpy(), a.numpy())
    np.testing.assert_array_equal(read_slot(lazy, b, "rms").numpy(), legacy.get_slot(a, "rms").numpy())

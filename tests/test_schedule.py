"""Deep learning-rate schedule against hand-worked values; the TF schedule against the python one."""

from __future__ import annotations

import pytest
import tensorflow as tf

from wd_sok.schedule import DeepLrSchedule, deep_lr

# base 0.00012, 10 steps/epoch, warm-up 6 epochs (60 steps), 20 epochs (200 steps):
# remaining = 140, base/8 from step 60 + 70 = 130
HAND = {0: 0.0, 1: 0.000002, 30: 0.00006, 59: 0.000118, 60: 0.00003, 129: 0.00003, 130: 0.000015,
        199: 0.000015, 500: 0.000015}
ARGS = {"steps_per_epoch": 10, "base_lr": 0.00012, "warmup_epochs": 6, "num_epochs": 20}


@pytest.mark.parametrize("step,want", sorted(HAND.items()))
def test_deep_lr_hand_worked(step, want):
    assert deep_lr(step, **ARGS) == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_no_warmup_and_short_runs():
    # no warm-up: 10 epochs x 4 steps, base/4 for steps 0..19, base/8 from 20
    kw = {"steps_per_epoch": 4, "base_lr": 0.8, "warmup_epochs": 0, "num_epochs": 10}
    assert [deep_lr(s, **kw) for s in (0, 19, 20, 39)] == [0.2, 0.2, 0.1, 0.1]
    # num_epochs <= warmup_epochs: warm-up, then straight to base/8 (nothing remains)
    kw = {"steps_per_epoch": 4, "base_lr": 0.8, "warmup_epochs": 2, "num_epochs": 1}
    got = [deep_lr(s, **kw) for s in (0, 4, 7, 8, 100)]
    assert got == pytest.approx([0.0, 0.4, 0.7, 0.1, 0.1], rel=1e-12)
    # odd remaining (5 steps): base/8 from the first step >= 2 + 2.5
    kw = {"steps_per_epoch": 1, "base_lr": 0.8, "warmup_epochs": 2, "num_epochs": 7}
    assert [deep_lr(s, **kw) for s in (1, 2, 4, 5)] == [0.4, 0.2, 0.2, 0.1]
    # zero epochs in total
    assert deep_lr(3, steps_per_epoch=4, base_lr=0.8, warmup_epochs=0, num_epochs=0) == 0.1
    with pytest.raises(ValueError):
        deep_lr(0, steps_per_epoch=0, base_lr=0.8, warmup_epochs=0, num_epochs=1)


def test_tf_schedule_matches_python_eager_and_in_tf_function():
    sched = DeepLrSchedule(**ARGS)
    steps = sorted(HAND)
    graph = tf.function(lambda s: sched(s))
    for step in steps:
        want = deep_lr(step, **ARGS)
        for got in (sched(step), sched(tf.constant(step, tf.int64)), graph(tf.constant(step, tf.int64))):
            assert got.dtype == tf.float32
            assert float(got) == pytest.approx(want, rel=1e-6, abs=1e-12)
    no_warmup = DeepLrSchedule(steps_per_epoch=4, base_lr=0.8, warmup_epochs=0, num_epochs=10)
    assert [float(no_warmup(s)) for s in (0, 20)] == pytest.approx([0.2, 0.1])


def test_tf_schedule_config_round_trip_and_optimizer():
    sched = DeepLrSchedule(**ARGS)
    clone = DeepLrSchedule.from_config(sched.get_config())
    assert clone.get_config() == sched.get_config()
    assert float(clone(130)) == pytest.approx(0.000015, rel=1e-6)
    # inside a real optimizer step: SGD at iteration 30 moves w by lr * grad = 0.00006 * 1
    opt = tf.keras.optimizers.SGD(learning_rate=sched)
    w = tf.Variable(1.0)
    opt.build([w])
    opt.iterations.assign(30)
    opt.apply_gradients([(tf.constant(1.0), w)])
    assert float(w) == pytest.approx(1.0 - 0.00006, abs=1e-7)
    assert int(opt.iterations) == 31

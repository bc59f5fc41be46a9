"""Learning-rate schedule of the deep part (the wide part uses a constant learning rate).

Rule (project spec)::

    warmup_steps = warmup_epochs * steps_per_epoch
    remaining    = max(0, num_epochs * steps_per_epoch - warmup_steps)
    step <  warmup_steps                    -> base_lr * step / warmup_steps   (linear warm-up from 0)
    step <  warmup_steps + remaining / 2    -> base_lr / 4
    otherwise                               -> base_lr / 8

``remaining / 2`` is a real number (no rounding), so with an odd ``remaining`` the switch to base/8 happens
at the first integer step >= warmup_steps + remaining / 2. Degenerate cases need no division by zero:
``warmup_epochs == 0`` skips the warm-up (step 0 already gets base/4), and ``num_epochs <= warmup_epochs``
leaves no remaining steps, so every step after the warm-up gets base/8. Steps past the end keep base/8.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def _phase_bounds(steps_per_epoch: int, warmup_epochs: float, num_epochs: float) -> tuple[float, float]:
    """(warmup_steps, step at which base/8 starts), both as floats."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if warmup_epochs < 0 or num_epochs < 0:
        raise ValueError(f"epochs must be >= 0, got warmup {warmup_epochs}, total {num_epochs}")
    warmup_steps = float(warmup_epochs) * steps_per_epoch
    remaining = max(0.0, float(num_epochs) * steps_per_epoch - warmup_steps)
    return warmup_steps, warmup_steps + remaining / 2.0


def deep_lr(step: int, steps_per_epoch: int, base_lr: float, warmup_epochs: float,
            num_epochs: float) -> float:
    """Deep-part learning rate at global ``step`` (0-based optimizer iterations); see the module docstring."""
    warmup_steps, eighth_from = _phase_bounds(steps_per_epoch, warmup_epochs, num_epochs)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step < eighth_from:
        return base_lr / 4.0
    return base_lr / 8.0


class DeepLrSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """:func:`deep_lr` as a Keras schedule (graph-safe, usable inside ``tf.function``).

    ``__call__(step)`` takes a scalar integer or float tensor (the optimizer's ``iterations``) and returns a
    scalar of ``dtype`` (float32 by default); the arithmetic is done in float64, so it matches
    :func:`deep_lr` to the output dtype's precision.
    """

    def __init__(self, steps_per_epoch: int, base_lr: float, warmup_epochs: float, num_epochs: float,
                 dtype: str = "float32", name: str | None = None) -> None:
        super().__init__()
        self.warmup_steps, self.eighth_from = _phase_bounds(steps_per_epoch, warmup_epochs, num_epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.base_lr = float(base_lr)
        self.warmup_epochs = warmup_epochs
        self.num_epochs = num_epochs
        self.dtype = tf.as_dtype(dtype)
        self.name = name

    def __call__(self, step: Any) -> tf.Tensor:
        with tf.name_scope(self.name or "DeepLrSchedule"):
            s = tf.cast(step, tf.float64)
            base = tf.constant(self.base_lr, tf.float64)
            # max(.., 1) only guards the unused branch of tf.where when warmup_steps == 0
            warm = base * s / max(self.warmup_steps, 1.0)
            lr = tf.where(s < self.warmup_steps, warm,
                          tf.where(s < self.eighth_from, base / 4.0, base / 8.0))
            return tf.cast(lr, self.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"steps_per_epoch": self.steps_per_epoch, "base_lr": self.base_lr,
                "warmup_epochs": self.warmup_epochs, "num_epochs": self.num_epochs,
                "dtype": self.dtype.name, "name": self.name}

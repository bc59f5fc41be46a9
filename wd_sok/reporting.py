"""What a run tells people: DLLogger lines, a progress line, TensorBoard scalars, a CSV and a PNG to look at.

Files in ``results_dir``: ``log.json`` (DLLogger format), ``history.csv`` (one row per evaluation),
``tensorboard/`` (scalars: loss, deep_lr, throughput per step; loss_val, auc_roc, streaming_map_val per epoch),
``learning_curve.png`` (written at the end of training).

Only rank 0 reports; other ranks get a reporter that does nothing.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

from wd_sok.logger import Logger

METRICS = {
    "loss": {"unit": None, "format": ":.5f", "GOAL": "MINIMIZE", "STAGE": "TRAIN"},
    "loss_val": {"unit": None, "format": ":.5f", "GOAL": "MINIMIZE", "STAGE": "VAL"},
    "auc_roc": {"unit": None, "format": ":.5f", "GOAL": "MAXIMIZE", "STAGE": "VAL"},
    "streaming_map_val": {"unit": None, "format": ":.5f", "GOAL": "MAXIMIZE", "STAGE": "VAL"},
    "train_throughput": {"unit": "samples/s", "format": ":,.0f", "GOAL": "MAXIMIZE", "STAGE": "TRAIN"},
    "validation_throughput": {"unit": "samples/s", "format": ":,.0f", "GOAL": "MAXIMIZE", "STAGE": "VAL"},
    "deep_lr": {"unit": None, "format": ":.3g"},
    "eta_s": {"unit": "s", "format": ":.0f"},
}


class Reporter:
    """Rank 0's voice: ``results_dir/log_filename`` (DLLogger JSON), stdout, ``results_dir/history.csv``."""

    def __init__(self, results_dir: str | Path, log_filename: str, enabled: bool, append: bool = False) -> None:
        self.enabled = enabled
        self.results_dir = Path(results_dir)
        self.logger = Logger(self.results_dir / log_filename if enabled else None, enabled=enabled, append=append)
        for name, meta in METRICS.items():
            self.logger.metadata(name, {k: v for k, v in meta.items() if v is not None})
        self.history = self.results_dir / "history.csv"
        self._train_curve: list[tuple[int, float]] = []
        self._tb = None
        if enabled:
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(str(self.results_dir / "tensorboard"))

    def params(self, params: dict[str, Any]) -> None:
        """The resolved configuration and run facts, to the log file only."""
        self.logger.log("PARAMETER", params, verbosity=1)

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"[wd-sok] {message}", file=sys.stdout, flush=True)

    def step(self, step: list[int], data: dict[str, Any], global_step: int | None = None) -> None:
        """A training progress record; with ``global_step`` also TensorBoard scalars and the curve."""
        self.logger.log(step, data)
        if self.enabled and global_step is not None:
            self._scalars(global_step, data)
            if "loss" in data:
                self._train_curve.append((global_step, float(data["loss"])))

    def _scalars(self, step: int, data: dict[str, Any]) -> None:
        import tensorflow as tf

        with self._tb.as_default(step=step):
            for key, value in data.items():
                if isinstance(value, int | float):
                    tf.summary.scalar(key, value)
        self._tb.flush()

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Log the evaluation after ``epoch`` epochs and append it to history.csv."""
        self.logger.log([epoch], metrics)
        if not self.enabled:
            return
        self._scalars(epoch, {f"epoch/{k}": v for k, v in metrics.items()})
        new = not self.history.exists()
        with open(self.history, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", *metrics])
            if new:
                writer.writeheader()
            writer.writerow({"epoch": epoch, **metrics})

    def final(self, metrics: dict[str, Any]) -> None:
        self.logger.log([], metrics)
        self.logger.flush()

    def plot_learning_curve(self) -> Path | None:
        """``learning_curve.png``: training loss per step and the evaluation metrics per epoch."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = list(csv.DictReader(open(self.history))) if self.history.exists() else []
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        if self._train_curve:
            steps, losses = zip(*self._train_curve, strict=True)
            left.plot(steps, losses, label="train loss")
        if rows:
            right.set_xlabel("epoch")
            for key in ("loss_val", "auc_roc", "streaming_map_val"):
                if key in rows[0]:
                    right.plot([int(r["epoch"]) for r in rows], [float(r[key]) for r in rows], "o-", label=key)
            right.legend()
            right.set_title("evaluation")
        left.set_xlabel("step")
        left.set_title("training BCE")
        left.legend()
        fig.tight_layout()
        out = self.results_dir / "learning_curve.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        self.logger.close()
        if self._tb is not None:
            self._tb.close()

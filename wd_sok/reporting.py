"""What a run tells people: DLLogger lines, a readable progress line, and a per-epoch CSV to plot.

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

    def __init__(self, results_dir: str | Path, log_filename: str, enabled: bool) -> None:
        self.enabled = enabled
        self.results_dir = Path(results_dir)
        self.logger = Logger(self.results_dir / log_filename if enabled else None, enabled=enabled)
        for name, meta in METRICS.items():
            self.logger.metadata(name, {k: v for k, v in meta.items() if v is not None})
        self.history = self.results_dir / "history.csv"

    def params(self, params: dict[str, Any]) -> None:
        """The resolved configuration and run facts, to the log file only."""
        self.logger.log("PARAMETER", params, verbosity=1)

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"[wd-sok] {message}", file=sys.stdout, flush=True)

    def step(self, step: list[int], data: dict[str, Any]) -> None:
        self.logger.log(step, data)

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Log the evaluation after ``epoch`` epochs and append it to history.csv."""
        self.logger.log([epoch], metrics)
        if not self.enabled:
            return
        new = not self.history.exists()
        with open(self.history, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", *metrics])
            if new:
                writer.writeheader()
            writer.writerow({"epoch": epoch, **metrics})

    def final(self, metrics: dict[str, Any]) -> None:
        self.logger.log([], metrics)
        self.logger.flush()

    def close(self) -> None:
        self.logger.close()

"""One rank of a checkpoint-lifecycle benchmark job (launched by checkpoint_scaling.py, under horovodrun).

    ckpt_worker.py train   --steps K <main.py flags>   build, train K steps, save one checkpoint
    ckpt_worker.py restore --steps K <main.py flags>   build, restore the latest checkpoint, export, train K

Every rank prints one ``BENCH_RESULT {json}`` line: per phase its wall time and peak RSS (VmHWM, reset
between phases through /proc/self/clear_refs), bytes it wrote / read, and its embedding bytes.
With ``WD_SOK_BENCH_MEM_CAP_GB`` set, the rank first moves itself into a memory cgroup of that size of its
own (a device-sized budget per process); exceeding it gets the rank OOM-killed, which the driver reports.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CGROUP = Path("/sys/fs/cgroup/memory")


def cap_memory() -> str:
    """Join a fresh memory cgroup limited to WD_SOK_BENCH_MEM_CAP_GB (if set); its path, or ''."""
    cap = os.environ.get("WD_SOK_BENCH_MEM_CAP_GB")
    if not cap:
        return ""
    group = CGROUP / f"wd_sok_bench_{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(int(float(cap) * 2**30)))
    (group / "cgroup.procs").write_text(str(os.getpid()))
    return str(group)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    mode, steps = sys.argv[1], int(sys.argv[3])
    assert sys.argv[2] == "--steps"
    group = cap_memory()
    import tensorflow as tf

    from wd_sok.config import parse_config
    from wd_sok.distributed import Runtime
    from wd_sok.state import table_states
    from wd_sok.storage.store import TRAFFIC
    from wd_sok.train import Trainer

    cfg = parse_config(sys.argv[4:])
    rt = Runtime()
    out: dict = {"mode": mode, "rank": rt.rank, "ranks": rt.size, "cgroup": group}
    t0 = time.perf_counter()
    trainer = Trainer(cfg, rt)
    out["init_s"], out["init_peak"] = time.perf_counter() - t0, peak()
    out["embedding_bytes"] = trainer.model.wide_embedding.local_bytes() + trainer.model.deep_embedding.local_bytes()

    def train(k: int) -> None:
        """k steps; every rank the same number (steps_per_epoch is agreed: a step is a collective)."""
        epoch = 0
        while k > 0:
            trainer.train_data.set_epoch(epoch)
            n = min(k, trainer.steps_per_epoch)
            for _, batch in zip(range(n), trainer.train_data, strict=False):
                trainer.train_step(batch, tf.constant(trainer.global_step, tf.int64)).numpy()
            k, epoch = k - n, epoch + 1

    if mode == "train":
        t0 = time.perf_counter()
        train(steps)
        out["train_s"], out["train_peak"] = time.perf_counter() - t0, peak()
        reset_peak()
        t0 = time.perf_counter()
        saved = trainer.save()
        out["save_s"], out["save_peak"] = time.perf_counter() - t0, peak()
        out["save_bytes"], out["save_write_s"] = saved["bytes"], saved["seconds"]
        out["storage_traffic"] = dict(TRAFFIC)  # bytes sent to object storage (0 for a local model_dir)
    else:
        reset_peak()
        t0 = time.perf_counter()
        trainer.restore()
        out["restore_s"], out["restore_peak"] = time.perf_counter() - t0, peak()
        out["restore_bytes"] = sum(s.rows.count * s.table.dim * 4 * len(s.arrays())
                                   for s in table_states(trainer.model, trainer.wide_opt, trainer.deep_opt))
        out["storage_traffic"] = dict(TRAFFIC)  # bytes fetched from object storage: vs restore_bytes (owned)
        if cfg.export_dir:
            reset_peak()
            t0 = time.perf_counter()
            from wd_sok.export import export_saved_model

            export_saved_model(trainer, cfg.export_dir)
            out["export_s"], out["export_peak"] = time.perf_counter() - t0, peak()
        reset_peak()
        t0 = time.perf_counter()
        train(steps)
        out["resume_train_s"], out["resume_train_peak"] = time.perf_counter() - t0, peak()
    print("BENCH_RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

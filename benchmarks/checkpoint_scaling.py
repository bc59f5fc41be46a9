"""Checkpoint lifecycle vs table size: peak RSS per rank and wall time of train, save, restore and export.

Model: 2 one-hot tables of ``rows`` rows, deep width 32 (+ the wide dim-1 tables), 2 numerics, MLP 64-64,
global batch 4096; table state per rank = values + every slot (deep: RMSprop ``rms``; wide: FTRL
``accumulator`` and ``linear``) = rows x (32 x 2 + 1 x 3) x 4 bytes per table, divided over the ranks.
Each case: ``ckpt_worker.py train`` (build, 10 steps, one save) then ``ckpt_worker.py restore`` (a new
launch under the same rank count: build, restore, export a SavedModel, 10 more steps).

Cases: the size ladder uncapped at 1 and 2 ranks, and a capped case: every process confined to a memory
cgroup of ``--cap_gb`` (a device-sized budget per rank) with a table state larger than one rank can hold
under it: 1 rank is expected to be OOM-killed, 2 ranks to train, save, restore, export and train on.

Beside the figures: the disk's raw sequential write speed (dd, 1 GiB, O_DIRECT and buffered + fsync).

Targets: save peak RSS per rank <= 1.25 x its training peak; save and restore >= 500 MB/s per rank;
embedding bytes per rank within 5% of total / N.

Usage::

    .venv/bin/python benchmarks/checkpoint_scaling.py                        # ladder + capped case (~25 min)
    .venv/bin/python benchmarks/checkpoint_scaling.py --rows 1000000 --no_cap # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DIM = 32
HIDDEN = ["64", "64"]


def spec(rows: int) -> dict[str, Any]:
    onehot, numerical = ["c0", "c1"], ["x0", "x1"]
    fs: dict[str, Any] = {"display_id": {}, "clicked": {}, **{n: {} for n in numerical}}
    fs.update({n: {"cardinality": rows, "embedding_dim": DIM} for n in onehot})
    train = ["clicked", *onehot, *numerical]
    return {"channel_spec": {"onehot_categorical": onehot, "multihot_categorical": [], "numerical": numerical,
                             "label": ["clicked"], "map": ["display_id"]},
            "feature_spec": fs,
            "source_spec": {"train": [{"type": "parquet", "features": train, "files": ["train/part_0.parquet"]}],
                            "test": [{"type": "parquet", "features": ["display_id", *train],
                                      "files": ["test/part_0.parquet"]}]},
            "metadata": {}}


def state_bytes(rows: int) -> int:
    """Total table state: 2 tables x rows x (deep 32 x (value + rms) + wide 1 x (value + 2 FTRL slots)) x 4."""
    return 2 * rows * (DIM * 2 + 3) * 4


def disk_speed(folder: Path) -> dict[str, float]:
    """MB/s of writing 1 GiB sequentially: O_DIRECT (raw) and buffered + fsync (what a save's fsync sees)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, flag in (("direct_MBps", "oflag=direct"), ("buffered_fsync_MBps", "conv=fsync")):
        target = folder / "dd_test"
        proc = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", "count=64", flag],
                              capture_output=True, text=True, check=False)
        target.unlink(missing_ok=True)
        line = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        seconds = float(line.split(" s,")[0].split(",")[-1]) if " s," in line else float("nan")
        out[name] = round(2**30 / seconds / 1e6, 1)
    return out


def run_case(rows: int, ranks: int, cap_gb: float | None, steps: int, timeout: float,
             export: bool = True) -> dict[str, Any]:
    data = common.ensure_dataset(f"ckpt_{rows}", spec(rows), 32768, 8192, train_files=4, test_files=2)
    work = common.DATA / f"ckpt_run_{rows}_{ranks}"
    shutil.rmtree(work, ignore_errors=True)
    flags = ["--dataset_path", str(data), "--model_dir", str(work / "ckpt"), "--results_dir", str(work / "res"),
             *(["--export_dir", str(work / "export")] if export else []),
             "--global_batch_size", "4096", "--eval_batch_size", "8192",
             "--deep_hidden_units", *HIDDEN, "--num_epochs", "1", "--deep_warmup_epochs", "0",
             "--embedding_backend", "sharded"]
    env = common.bench_env(threads=max(1, (os.cpu_count() or 2) // ranks),
                           extra={"WD_SOK_BENCH_MEM_CAP_GB": str(cap_gb)} if cap_gb else None)
    case: dict[str, Any] = {"rows": rows, "ranks": ranks, "cap_gb": cap_gb, "state_bytes": state_bytes(rows)}
    try:
        for mode in ("train", "restore"):
            out = common.launch(ranks, ["benchmarks/ckpt_worker.py", mode, "--steps", str(steps), *flags],
                                timeout, env=env)
            for r in common.result_lines(out):
                case.setdefault("per_rank", {}).setdefault(str(r["rank"]), {}).update(r)
        case["ok"] = True
    except RuntimeError as e:
        lines = str(e).splitlines()
        case["ok"], case["error"], case["output_tail"] = False, lines[0][:300], lines[-25:]
        case["oom_killed"] = lines[0].startswith(("exit -9", "exit 137")) or "status code 137" in str(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _remove_cgroups()
    return case


def _remove_cgroups() -> None:
    for group in Path("/sys/fs/cgroup/memory").glob("wd_sok_bench_*"):
        try:
            group.rmdir()
        except OSError:
            pass


def summarize(case: dict[str, Any]) -> dict[str, Any]:
    """Worst rank's figures of one case."""
    if not case.get("ok"):
        return {"rows": case["rows"], "ranks": case["ranks"], "cap_gb": case["cap_gb"],
                "state_GB": case["state_bytes"] / 1e9, "ok": False, "oom": case.get("oom_killed")}
    ranks = list(case["per_rank"].values())

    def worst(key: str) -> float:
        return max((r[key] for r in ranks if key in r), default=float("nan"))

    total_emb = 2 * case["rows"] * (DIM + 1) * 4
    return {
        "rows": case["rows"], "ranks": case["ranks"], "cap_gb": case["cap_gb"], "ok": True,
        "state_GB": case["state_bytes"] / 1e9,
        "train_peak_GB": worst("train_peak") / 1e9, "save_peak_GB": worst("save_peak") / 1e9,
        "save_over_train": max(r["save_peak"] / r["train_peak"] for r in ranks),
        "restore_peak_GB": worst("restore_peak") / 1e9, "export_peak_GB": worst("export_peak") / 1e9,
        "resume_peak_GB": worst("resume_train_peak") / 1e9,
        "train_s": worst("train_s"), "save_s": worst("save_s"), "restore_s": worst("restore_s"),
        "export_s": worst("export_s"), "resume_train_s": worst("resume_train_s"),
        "save_MBps": min(r["save_bytes"] / r["save_write_s"] / 1e6 for r in ranks),
        "restore_MBps": min(r["restore_bytes"] / r["restore_s"] / 1e6 for r in ranks),
        "emb_share_dev": max(abs(r["embedding_bytes"] / (total_emb / case["ranks"]) - 1) for r in ranks),
    }


def targets(rows: list[dict[str, Any]], capped: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    ok = [r for r in rows + capped if r["ok"]]
    out = []
    worst = max((r["save_over_train"] for r in ok), default=float("nan"))
    out.append(("checkpoint_peak_rss", worst <= 1.25, f"save peak / training peak <= {worst:.2f} (<= 1.25)"))
    save = min((r["save_MBps"] for r in ok), default=0.0)
    restore = min((r["restore_MBps"] for r in ok), default=0.0)
    out.append(("save_throughput", save >= 500, f"min {save:,.0f} MB/s per rank (>= 500)"))
    out.append(("restore_throughput", restore >= 500, f"min {restore:,.0f} MB/s per rank (>= 500)"))
    dev = max((r["emb_share_dev"] for r in ok), default=float("nan"))
    out.append(("embedding_bytes_per_rank", dev <= 0.05, f"max {dev:.2%} off total/N (<= 5%)"))
    if capped:
        one = [r for r in capped if r["ranks"] == 1]
        two = [r for r in capped if r["ranks"] == 2]
        met = bool(one and not one[0]["ok"] and two and two[0]["ok"])
        out.append(("sharded_beyond_one_process", met,
                    f"under a {capped[0]['cap_gb']} GB cap per process: 1 rank "
                    f"{'fails' if one and not one[0]['ok'] else 'runs'}, 2 ranks "
                    f"{'train, save, restore and train on' if two and two[0]['ok'] else 'fail'}"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--np", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cap_gb", type=float, default=5.0)
    parser.add_argument("--cap_rows", type=int, default=10_000_000)
    parser.add_argument("--no_cap", action="store_true")
    parser.add_argument("--no_ladder", action="store_true", help="only the capped case")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out", default="checkpoint_scaling")
    args = parser.parse_args(argv)
    disk = disk_speed(common.DATA)
    common.log(f"disk: {disk}")
    raw, rows_out, capped = [], [], []
    for rows in [] if args.no_ladder else args.rows:
        for ranks in args.np:
            case = run_case(rows, ranks, None, args.steps, args.timeout)
            raw.append(case)
            rows_out.append(summarize(case))
            common.log(f"{rows:,} rows x {ranks} rank(s): {rows_out[-1]}")
    if not args.no_cap:
        for ranks in (1, 2):
            # no export here: a SavedModel holds every table's values in one process (rank 0), which is
            # what one process cannot hold in this case
            case = run_case(args.cap_rows, ranks, args.cap_gb, args.steps, args.timeout, export=False)
            raw.append(case)
            capped.append(summarize(case))
            common.log(f"capped {args.cap_gb} GB, {args.cap_rows:,} rows x {ranks} rank(s): {capped[-1]}")
    verdicts = targets(rows_out, capped)
    columns = [("rows", "rows/table"), ("ranks", "ranks"), ("cap_gb", "cap GB"), ("state_GB", "state GB"),
               ("ok", "ok"), ("train_peak_GB", "train peak"), ("save_peak_GB", "save peak"),
               ("restore_peak_GB", "restore peak"), ("export_peak_GB", "export peak"), ("save_s", "save s"),
               ("restore_s", "restore s"), ("export_s", "export s"), ("save_MBps", "save MB/s"),
               ("restore_MBps", "restore MB/s")]
    print(common.table(rows_out + capped, columns))
    print(f"disk raw sequential write: {disk['direct_MBps']:,.0f} MB/s (O_DIRECT), "
          f"{disk['buffered_fsync_MBps']:,.0f} MB/s (buffered + fsync)")
    for name, met, figure in verdicts:
        print(f"target {name}: {'MET' if met else 'NOT MET'} ({figure})")
    common.write_json(args.out, {"machine": common.machine_facts(), "params": vars(args), "disk": disk,
                                 "summary": rows_out + capped, "raw": raw,
                                 "targets": [{"name": n, "met": m, "figure": f} for n, m, f in verdicts]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

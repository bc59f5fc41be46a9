"""Preemption with delta checkpoints at scale (issue 23): SIGTERM to ``horovodrun --gloo -np 2`` a few steps
after a full base checkpoint -> both ranks save a delta and exit 143 inside horovodrun's 5 s grace period;
resuming ends where the uninterrupted run does.

Model (as ``checkpoint_scaling.py``): 2 one-hot features of ``--rows`` rows each, deep width 32 (lazy
RMSprop: value + ``rms``), wide width 1 (FTRL: value + 2 slots), 2 numerics, MLP 64-64, sharded backend with
every table row-wise, global batch 4096; ids Zipf-skewed (``wd_sok.tools.generate``). Table state:
2 x rows x (32 x 2 + 3) x 4 bytes (10.7 GB at 2e7 rows), half per rank.

One epoch of ``--steps`` steps with ``--checkpoint_steps`` (10): a full checkpoint at step 10, then deltas.
For each ``--kill_at`` step k: a run is sent SIGTERM (to horovodrun, as Kubernetes / Slurm do) once rank 0
has logged step k; measured: signal -> horovodrun's exit (wall), each rank's exit code (horovodrun's
``Process i exit with status code c`` lines), the checkpoint written (its manifest must say ``kind: delta``,
against the full base), its bytes vs the base's; then the same command with ``--use_checkpoint`` finishes the
epoch and its final metrics (loss, AUC, MAP@12) are compared with those of one uninterrupted run.

Targets: ``sigterm_delta_5s`` (per kill step): both ranks exit 143, a delta was written, signal -> exit
< 5 s; ``resume_equals_uninterrupted``: final metrics equal (|diff| <= 1e-6). ``timeline``: the output lines
after the signal, timestamped as read (the save line, each rank's last line, horovodrun's exit lines). The
launch environment passes through (e.g. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: see benchmarks/README.md).

Usage::

    .venv/bin/python benchmarks/delta_sigterm.py                         # 2 x 2e7 x 32 (~25 min, 14 GB RAM)
    .venv/bin/python benchmarks/delta_sigterm.py --kill_at 14 --no_resume --out delta_sigterm_2e7_timeline
    .venv/bin/python benchmarks/delta_sigterm.py --rows 1000000 --steps 20 --kill_at 14   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from checkpoint_scaling import HIDDEN, spec, state_bytes  # noqa: E402

GRACE_S = 5.0  # horovodrun's GRACEFUL_TERMINATION_TIME_S before it SIGKILLs the ranks
METRICS = ("loss_val", "auc_roc", "streaming_map_val")
EXIT = re.compile(r"Process (\d+) exit with status code (-?\d+)")
SAVED = re.compile(r"saved (\S+) \((delta against (\S+), )?([\d,.]+) MiB; rank 0 wrote ([\d,.]+) MiB at ([\d,]+) MB/s")


def facts() -> dict[str, Any]:
    """Load average and free memory now (the machine is shared)."""
    mem = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in
                                                     Path("/proc/meminfo").read_text().splitlines())}
    return {"load": [round(x, 2) for x in os.getloadavg()], "mem_available_GB": round(mem["MemAvailable"] / 1e9, 1)}


def flags(data: Path, run: Path, args: argparse.Namespace) -> list[str]:
    return ["main.py", "--dataset_path", str(data), "--model_dir", str(run / "ckpt"),
            "--results_dir", str(run / "res"), "--global_batch_size", str(args.batch),
            "--eval_batch_size", "8192", "--deep_hidden_units", *HIDDEN, "--num_epochs", "1",
            "--deep_warmup_epochs", "0", "--embedding_backend", "sharded", "--embedding_plan", "row",
            "--checkpoint_steps", str(args.checkpoint_steps), "--log_every", "1"]


def final_metrics(run: Path) -> dict[str, float]:
    return {k: common.dllogger_values(run / "res" / "log.json", k)[-1] for k in METRICS}


def checkpoints(model_dir: Path) -> dict[int, dict[str, Any]]:
    """{step: manifest} of the committed checkpoints in ``model_dir``."""
    out = {}
    for m in model_dir.glob("ckpt-*/manifest.json"):
        manifest = json.loads(m.read_text())
        out[int(manifest["step"])] = {**manifest, "_folder": m.parent.name}
    return out


def total_bytes(manifest: dict[str, Any]) -> int:
    return sum(f["bytes"] for f in manifest["files"].values())


def interrupted(data: Path, run: Path, kill_at: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run sent SIGTERM after step ``kill_at``: timings, exit codes and what it wrote."""
    cmd = [common.horovodrun(), "--gloo", "-np", "2", "-H", "localhost:2", common.PYTHON, *flags(data, run, args)]
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=common.bench_env(threads=1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[tuple[float, str]] = []
    reached = threading.Event()
    marker = f"epoch 0 step {kill_at} "

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append((time.perf_counter(), line))
            if marker in line:
                reached.set()
        reached.set()  # ended before the step (reported below)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t_start = time.perf_counter()
    try:
        reached.wait(args.timeout)
        if proc.poll() is not None or not any(marker in line for _, line in lines):
            raise RuntimeError(f"run ended or timed out before step {kill_at}:\n"
                               + "".join(line for _, line in lines[-40:]))
        before = facts()
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
        elapsed = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(30)
    out = "".join(line for _, line in lines)
    logs = Path(f"{args.dir}_logs")  # kept (the run folders are removed)
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"kill_{kill_at}.txt").write_text(out)
    exits = dict(sorted((int(i), int(c)) for i, c in EXIT.findall(out)))
    saves = [(t - t0, SAVED.search(line)) for t, line in lines if SAVED.search(line)]
    last = saves[-1] if saves else (None, None)
    ckpts = checkpoints(run / "ckpt")
    newest = ckpts[max(ckpts)] if ckpts else {}
    base = ckpts.get(int(newest.get("base", {}).get("step", -1)), {})
    res = {"kill_after_step": kill_at, "signal_to_exit_s": elapsed, "horovodrun_exit": code,
           "rank_exit_codes": exits, "facts_at_signal": before, "startup_to_signal_s": t0 - t_start,
           "saved_step": newest.get("step"), "saved_kind": newest.get("kind", "full"),
           "saved_base": newest.get("base", {}).get("path"), "deltas_since_base": newest.get("deltas"),
           "delta_bytes": total_bytes(newest) if newest else 0, "base_bytes": total_bytes(base) if base else 0,
           "save_line_after_signal_s": last[0] if last[1] and last[1].group(2) and last[0] > 0 else None,
           "temporaries_left": sorted(p.name for p in (run / "ckpt").glob(".tmp-*")),
           "sigkilled": "status code 137" in out or "status code -9" in out,
           # what happened when, seconds after the signal (the save line, each rank's exit line, horovodrun's)
           "timeline": [(round(t - t0, 3), line.strip()[:160]) for t, line in lines if t >= t0]}
    res["ok"] = (elapsed < GRACE_S and exits == {0: 143, 1: 143} and res["saved_kind"] == "delta"
                 and (res["saved_step"] or 0) > kill_at - 1 and not res["sigkilled"])
    return res


def resume(data: Path, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = common.launch(2, [*flags(data, run, args), "--use_checkpoint"], args.timeout,
                        env=common.bench_env(threads=1))
    Path(f"{args.dir}_logs", f"{run.name}_resume.txt").write_text(out)
    restored = next((line.split("]", 1)[-1].strip() for line in out.splitlines() if "restored" in line), "")
    return {"resume_s": time.perf_counter() - t0, "restored_line": restored[:300], "metrics": final_metrics(run)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--steps", type=int, default=30, help="train steps in the (one) epoch")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--checkpoint_steps", type=int, default=10)
    p.add_argument("--kill_at", type=int, nargs="+", default=[14, 25])
    p.add_argument("--dir", default="/tmp/wd_sok_delta_sigterm", help="run folders (removed afterwards)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--out", default="")
    p.add_argument("--no_resume", action="store_true", help="only the interrupted runs (no resume, no reference)")
    args = p.parse_args(argv)
    name = args.out or f"delta_sigterm_{args.rows:.0e}".replace("+0", "").replace("+", "")
    res: dict[str, Any] = {"params": vars(args), "state_bytes": state_bytes(args.rows), "start": facts()}
    print(f"start: {res['start']}", flush=True)
    common.log(f"dataset: 2 x {args.rows:,} rows, {args.steps} steps of {args.batch}")
    data = common.ensure_dataset(f"delta_sigterm_{args.rows}", spec(args.rows), args.steps * args.batch, 8192,
                                 train_files=2, test_files=1)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    res["kills"] = []
    try:
        for k in args.kill_at:
            run = root / f"kill_{k}"
            common.log(f"run interrupted after step {k}")
            r = interrupted(data, run, k, args)
            print(json.dumps(r), flush=True)
            res["kills"].append(r)
            if not args.no_resume:
                common.log("resume")
                r["resume"] = resume(data, run, args)
                print(json.dumps(r["resume"]), flush=True)
            shutil.rmtree(run / "ckpt", ignore_errors=True)
        if not args.no_resume:
            common.log("uninterrupted run")
            t0 = time.perf_counter()
            ref = root / "uninterrupted"
            common.launch(2, flags(data, ref, args), args.timeout, env=common.bench_env(threads=1))
            res["uninterrupted"] = {"seconds": time.perf_counter() - t0, "metrics": final_metrics(ref)}
        res["end"] = facts()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    want = res.get("uninterrupted", {}).get("metrics")
    lines = []
    for r in res["kills"]:
        if want:
            got = r["resume"]["metrics"]
            r["resume"]["max_abs_diff"] = max(abs(got[k] - want[k]) for k in METRICS)
            r["resume"]["equal"] = r["resume"]["max_abs_diff"] <= 1e-6
        ratio = r["delta_bytes"] / r["base_bytes"] if r["base_bytes"] else float("nan")
        lines += [f"target sigterm_delta_5s (SIGTERM after step {r['kill_after_step']}): "
                  f"{'MET' if r['ok'] else 'NOT MET'} ({r['signal_to_exit_s']:.1f} s; rank exits "
                  f"{r['rank_exit_codes']}; {r['saved_kind']} at step {r['saved_step']} against "
                  f"{r['saved_base']}: {r['delta_bytes'] / 1e6:,.1f} MB vs full {r['base_bytes'] / 1e6:,.1f} MB = "
                  f"{ratio:.4f}x; load at signal {r['facts_at_signal']['load']})"]
        if want:
            lines.append(f"target resume_equals_uninterrupted (after step {r['kill_after_step']}): "
                         f"{'MET' if r['resume']['equal'] else 'NOT MET'} (max |diff| "
                         f"{r['resume']['max_abs_diff']:.2e} over {', '.join(METRICS)})")
    res["target_lines"] = lines
    path = common.write_json(name, res)
    print("\n".join(lines))
    print(f"end: {res['end']}; results: {path}")
    return 0 if all(r["ok"] and r.get("resume", {}).get("equal", True) for r in res["kills"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoints on object storage vs local disk: save / restore throughput per rank, upload peak RSS, restore bytes.

The model and the jobs are checkpoint_scaling.py's (2 one-hot tables of ``rows`` rows, deep width 32, the wide
tables, RMSprop / FTRL slots; ``ckpt_worker.py train`` builds, trains 10 steps and saves one checkpoint, then
``ckpt_worker.py restore`` restores it in a new launch under the same rank count). Each case runs twice: with
``--model_dir`` on local disk, and as an ``s3://`` URL on an S3 API server on this machine (moto in server
mode, HTTP on 127.0.0.1, objects held in its memory; the data stays local). Figures per case (worst rank):
save and restore MB/s per rank (bytes of the rank's own table files / its time), the save's peak RSS over the
training peak, and on S3 the bytes a rank fetched on restore over the bytes of the rows it owns (manifest,
dense state and .npy headers included).

Targets (issue 24): S3 throughput >= 0.5x local; upload peak RSS <= 1.25x the training peak; restore
transfers <= 1.1x the bytes of the owned rows.

Usage::

    .venv/bin/python benchmarks/storage_s3.py                  # 1e6 rows, 1 and 2 ranks (~5 min)
    .venv/bin/python benchmarks/storage_s3.py --rows 1000000 10000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint_scaling  # noqa: E402
import common  # noqa: E402


def start_s3() -> tuple[Any, dict[str, str]]:
    """moto's ThreadedMotoServer on a free port of 127.0.0.1; (server, environment for the workers)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="wd-sok-bench")
    return server, env


def server_speed(mb: int = 256) -> dict[str, float]:
    """MB/s of one plain PUT and one GET of ``mb`` MB with boto3 against the server: its own ceiling here."""
    import time

    import boto3

    client, body = boto3.client("s3"), os.urandom(mb << 20)
    t0 = time.perf_counter()
    client.put_object(Bucket="wd-sok-bench", Key="raw", Body=body)
    put = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = client.get_object(Bucket="wd-sok-bench", Key="raw")["Body"].read()
    get = time.perf_counter() - t0
    client.delete_object(Bucket="wd-sok-bench", Key="raw")
    assert len(got) == len(body)
    return {"put_MBps": round(len(body) / put / 1e6, 1), "get_MBps": round(len(body) / get / 1e6, 1)}


def run_case(rows: int, ranks: int, where: str, env_extra: dict[str, str], steps: int,
             timeout: float) -> dict[str, Any]:
    data = common.ensure_dataset(f"ckpt_{rows}", checkpoint_scaling.spec(rows), 32768, 8192, train_files=4,
                                 test_files=2)
    work = common.DATA / f"s3_run_{rows}_{ranks}_{where}"
    shutil.rmtree(work, ignore_errors=True)
    model_dir = str(work / "ckpt") if where == "local" else f"s3://wd-sok-bench/{uuid.uuid4().hex[:8]}"
    flags = ["--dataset_path", str(data), "--model_dir", model_dir, "--results_dir", str(work / "res"),
             "--global_batch_size", "4096", "--eval_batch_size", "8192", "--deep_hidden_units",
             *checkpoint_scaling.HIDDEN, "--num_epochs", "1", "--deep_warmup_epochs", "0",
             "--embedding_backend", "sharded"]
    env = common.bench_env(threads=max(1, (os.cpu_count() or 2) // ranks), extra=env_extra)
    case: dict[str, Any] = {"rows": rows, "ranks": ranks, "where": where, "per_rank": {}}
    try:
        for mode in ("train", "restore"):
            out = common.launch(ranks, ["benchmarks/ckpt_worker.py", mode, "--steps", str(steps), *flags],
                                timeout, env=env)
            for r in common.result_lines(out):
                case["per_rank"].setdefault(str(r["rank"]), {}).update(
                    {f"{mode}_{k}" if k == "storage_traffic" else k: v for k, v in r.items()})
        case["ok"] = True
    except RuntimeError as e:
        case["ok"], case["error"] = False, str(e).splitlines()[-25:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if where == "s3":  # the server holds objects in memory
            from wd_sok import storage

            storage.Store(model_dir).delete_prefix("")
    return case


def summarize(case: dict[str, Any]) -> dict[str, Any]:
    out = {"rows": case["rows"], "ranks": case["ranks"], "where": case["where"], "ok": case["ok"]}
    if not case["ok"]:
        return out
    ranks = list(case["per_rank"].values())
    out.update({
        "save_MBps": min(r["save_bytes"] / r["save_write_s"] / 1e6 for r in ranks),
        "restore_MBps": min(r["restore_bytes"] / r["restore_s"] / 1e6 for r in ranks),
        "save_s": max(r["save_s"] for r in ranks), "restore_s": max(r["restore_s"] for r in ranks),
        "save_over_train": max(r["save_peak"] / r["train_peak"] for r in ranks),
        "owned_MB": max(r["restore_bytes"] for r in ranks) / 1e6,
    })
    if case["where"] == "s3":
        out["fetched_over_owned"] = max(r["restore_storage_traffic"]["get_bytes"] / r["restore_bytes"]
                                        for r in ranks)
        out["fetched_MB"] = max(r["restore_storage_traffic"]["get_bytes"] for r in ranks) / 1e6
        out["uploaded_MB"] = max(r["train_storage_traffic"]["put_bytes"] for r in ranks) / 1e6
    return out


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    out = []
    pairs = [(a, b) for a in rows for b in rows if a["ok"] and b["ok"] and a["where"] == "s3"
             and b["where"] == "local" and (a["rows"], a["ranks"]) == (b["rows"], b["ranks"])]
    for kind in ("save", "restore"):
        ratios = [a[f"{kind}_MBps"] / b[f"{kind}_MBps"] for a, b in pairs]
        worst = min(ratios, default=float("nan"))
        out.append((f"s3_{kind}_vs_local", worst >= 0.5, f"min S3 / local {worst:.2f} (>= 0.5)"))
    s3 = [r for r in rows if r["ok"] and r["where"] == "s3"]
    peak = max((r["save_over_train"] for r in s3), default=float("nan"))
    out.append(("upload_peak_rss", peak <= 1.25, f"save peak / training peak <= {peak:.2f} (<= 1.25)"))
    fetched = max((r["fetched_over_owned"] for r in s3), default=float("nan"))
    out.append(("restore_bytes", fetched <= 1.1, f"fetched / owned <= {fetched:.3f} (<= 1.1)"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--np", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out", default="storage_s3")
    args = parser.parse_args(argv)
    server, env = start_s3()
    raw, summary = [], []
    try:
        speed = server_speed()
        common.log(f"S3 server alone (boto3, one 256 MiB object): {speed}")
        for rows in args.rows:
            for ranks in args.np:
                for where in ("local", "s3"):
                    case = run_case(rows, ranks, where, env, args.steps, args.timeout)
                    raw.append(case)
                    summary.append(summarize(case))
                    common.log(f"{rows:,} rows x {ranks} rank(s), {where}: {summary[-1]}")
    finally:
        server.stop()
    verdicts = targets(summary)
    columns = [("rows", "rows/table"), ("ranks", "ranks"), ("where", "model_dir"), ("ok", "ok"),
               ("save_MBps", "save MB/s"), ("restore_MBps", "restore MB/s"), ("save_s", "save s"),
               ("restore_s", "restore s"), ("save_over_train", "save/train peak"), ("owned_MB", "owned MB"),
               ("fetched_MB", "fetched MB"), ("fetched_over_owned", "fetched/owned"),
               ("uploaded_MB", "uploaded MB")]
    print(common.table(summary, columns))
    print(f"S3 server alone (boto3, one 256 MiB object): PUT {speed['put_MBps']:,.0f} MB/s, GET "
          f"{speed['get_MBps']:,.0f} MB/s")
    for name, met, figure in verdicts:
        print(f"target {name}: {'MET' if met else 'NOT MET'} ({figure})")
    common.write_json(args.out, {"machine": common.machine_facts(), "params": vars(args), "server": speed,
                                 "summary": summary,
                                 "raw": raw, "targets": [{"name": n, "met": m, "figure": f}
                                                         for n, m, f in verdicts]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

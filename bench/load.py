"""Load bench for the scale-out setup (issue 7), not a timed test.

(a) 20 runs (tiny-bert, 3-5 steps each) queued at once against two
    `peft-studio worker` processes on PostgreSQL + Redis: all finish, each exactly
    once (attempts == 1, metric steps 1..n with no duplicates);
(b) the headline: 200 concurrent GET /api/estimate of distinct queries (several models
    and methods, each computed), three bursts of new queries, p50 / p95 / max latency,
    from a separate client process (asyncio, one new connection per request); beside it
    one query 200 times (a cache hit). Every response body is checked against the CLI's
    answer for the same inputs (`peft-studio estimate ... --json`).

Uses its own PostgreSQL database (created on STUDIO_BENCH_PG_ADMIN, default
postgresql://postgres@127.0.0.1:5432/postgres, dropped afterwards) and Redis db 12
(flushed before and after). Prints the figures and writes bench/RESULTS-load.md.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/load.py [--runs 20] [--estimates 200]
    .venv/bin/python bench/load.py --estimates-only      # (b) alone on SQLite; prints only
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
# the distinct queries: several models and methods, each with its own rank, batch, sequence and dtype, so
# no two share a method config (each plan and count is worked out again) and none is an answer already held
DISTINCT_MODELS = ("llama-2-7b", "llama-2-13b", "llama-3-8b", "mistral-7b", "smollm2-135m", "gpt2-medium",
                   "roberta-base", "bert-base")
DISTINCT_METHODS = ("lora", "dora", "qlora", "loha")
ROUNDS = 3          # distinct bursts, each of new queries; the headline is their median p95


def distinct_queries(n: int, round_: int) -> list[dict]:
    """n distinct estimate queries (round_ shifts every sequence length: no query repeats across rounds)."""
    return [{"model": DISTINCT_MODELS[i % len(DISTINCT_MODELS)],
             "method": DISTINCT_METHODS[(i // len(DISTINCT_MODELS)) % len(DISTINCT_METHODS)],
             "r": 1 + i, "batch": 1 + i % 4, "seq": 128 * (1 + i % 8) + round_, "dtype": ("bf16", "fp16")[i % 2]}
            for i in range(n)]


def query_string(q: dict) -> str:
    return "&".join(f"{k}={v}" for k, v in q.items())


def cli_argv(q: dict) -> list[str]:
    """`peft-studio estimate ... --json` arguments for one query."""
    return ["estimate", *[a for k, v in q.items() for a in (f"--{k.replace('_', '-')}", str(v))], "--json"]


def cli_answers(queries: list[dict]) -> list[dict]:
    """The CLI's answers, from a process of their own that runs the CLI's entry point
    (studio.cli.main: argument parsing, the estimator, the --json printing) per query;
    the first is also asked of the `peft-studio` console script as a check of that."""
    import json

    out = subprocess.run([sys.executable, __file__, "--cli-answers"], input=json.dumps(queries), text=True,
                         capture_output=True, check=True, cwd=REPO)
    answers = json.loads(out.stdout.strip().splitlines()[-1])
    script = Path(sys.executable).with_name("peft-studio")
    if queries and script.exists():
        one = subprocess.run([str(script), *cli_argv(queries[0])], capture_output=True, text=True, check=True)
        if json.loads(one.stdout.strip().splitlines()[-1]) != answers[0]:
            raise RuntimeError(f"the console script and studio.cli.main disagree on {queries[0]}")
    return answers


def cli_answers_child() -> None:
    import contextlib
    import io
    import json

    from studio import cli

    answers = []
    for q in json.loads(sys.stdin.read()):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = cli.main(cli_argv(q))
        answers.append(json.loads(buf.getvalue().strip().splitlines()[-1]) if code == 0 else {"exit": code})
    print(json.dumps(answers))


async def concurrent_gets(host: str, port: int, queries: list[str]) -> list[tuple[float, int, bytes]]:
    """Every query on its own new connection, all sent at once: (latency ms, status, body)."""
    import asyncio

    async def one(q: str) -> tuple[float, int, bytes]:
        t = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET /api/estimate?{q} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = await reader.read()
        ms = (time.perf_counter() - t) * 1000
        writer.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        return ms, status, data.partition(b"\r\n\r\n")[2]

    return await asyncio.gather(*[one(q) for q in queries])


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in ms (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def estimate_client(port: int, server_pid: int) -> None:
    """Runs in its own process (the server keeps its own core). Reads the bursts (lists
    of query strings) as JSON on stdin; prints per burst the latencies, statuses, bodies
    and the server process's CPU time over the burst (less sensitive to a busy machine)."""
    import asyncio
    import json

    bursts = json.loads(sys.stdin.read())
    asyncio.run(concurrent_gets("127.0.0.1", port, [ESTIMATE_QUERY]))     # warm-up: imports, catalog
    out = []
    for queries in bursts:
        cpu0, own0, t0 = cpu_ms(server_pid), time.process_time(), time.perf_counter()
        res = asyncio.run(concurrent_gets("127.0.0.1", port, queries))
        wall, cpu = time.perf_counter() - t0, cpu_ms(server_pid) - cpu0
        out.append({"lat": [ms for ms, _, _ in res], "status": [s for _, s, _ in res],
                    "body": [b.decode("utf-8", "replace") for _, _, b in res], "wall": wall, "server_cpu_ms": cpu,
                    "client_cpu_ms": (time.process_time() - own0) * 1000})
    print(json.dumps(out))


def bench_estimates(url: str, server_pid: int, n: int) -> dict:
    """n concurrent GET /api/estimate from a separate client process (asyncio, raw
    HTTP/1.1, one new connection per request, all sent at once): ROUNDS bursts of n
    distinct queries (each computed by the estimator), then n repeats of one query
    (answered from the estimator's cache). Every body is checked against the CLI's
    answer for the same inputs."""
    import json

    port = int(url.rsplit(":", 1)[1])
    rounds = [distinct_queries(n, k) for k in range(ROUNDS)]
    same = dict(q.split("=") for q in ESTIMATE_QUERY.split("&"))
    bursts = [[query_string(q) for q in qs] for qs in rounds] + [[ESTIMATE_QUERY] * n]
    load_before = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, "--estimate-client", str(port), str(server_pid)],
                         input=json.dumps(bursts),
                         capture_output=True, text=True, check=True)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()[0]
    want = cli_answers([q for qs in rounds for q in qs] + [same])
    expected = [want[k * n:(k + 1) * n] for k in range(ROUNDS)] + [[want[-1]] * n]
    figures = []
    for res, answers in zip(results, expected):
        lat, statuses = res["lat"], res["status"]
        wrong = 0
        for body, answer in zip(res["body"], answers):
            try:
                wrong += json.loads(body) != answer
            except ValueError:
                wrong += 1
        figures.append({"n": n, "ok": sum(s == 200 for s in statuses), "statuses": sorted(set(statuses)),
                        "wrong": wrong, "p50_ms": pct(lat, 0.5), "p95_ms": pct(lat, 0.95), "max_ms": max(lat),
                        "wall_s": res["wall"], "rps": n / res["wall"], "server_cpu_ms": res["server_cpu_ms"],
                        "client_cpu_ms": res["client_cpu_ms"]})
    return {"distinct": figures[:ROUNDS], "same": figures[ROUNDS], "load": (load_before, load_after),
            "p95_ms": statistics.median(f["p95_ms"] for f in figures[:ROUNDS])}


def estimate_lines(est: dict) -> list[str]:
    n = est["same"]["n"]
    fig = lambda f: (f"{f['ok']}/{f['n']} ok (statuses {f['statuses']}), {f['n'] - f['wrong']}/{f['n']} bodies equal "  # noqa: E731
                     f"the CLI's answer; latency p50 {f['p50_ms']:.0f} ms, p95 {f['p95_ms']:.0f} ms, max "
                     f"{f['max_ms']:.0f} ms; {f['rps']:.0f} requests/s; CPU: server {f['server_cpu_ms']:.0f} ms, "
                     f"client {f['client_cpu_ms']:.0f} ms")
    lines = [f"(b) {n} concurrent GET /api/estimate, {n} distinct queries (each computed; "
             f"{', '.join(DISTINCT_MODELS)} x {', '.join(DISTINCT_METHODS)}, r 1..{n}, batch 1..4, seq 128..1024, "
             f"bf16/fp16): p95 {est['p95_ms']:.0f} ms (median of {ROUNDS} bursts of new queries; target < 100 ms)"]
    lines += [f"    distinct, burst {k + 1}: {fig(f)}" for k, f in enumerate(est["distinct"])]
    lines.append(f"    beside it, one query {n} times (llama-2-7b, lora r 8; a cache hit): {fig(est['same'])}")
    lines.append(f"    1-minute load average {est['load'][0]:.2f} before the bursts, {est['load'][1]:.2f} after")
    return lines


def estimates_ok(est: dict) -> bool:
    return all(f["ok"] == f["n"] and not f["wrong"] for f in [*est["distinct"], est["same"]])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--estimates", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--estimates-only", action="store_true",
                    help="only (b), against a studio on SQLite with no workers; prints, writes nothing")
    ap.add_argument("--estimate-client", nargs=2, metavar=("PORT", "SERVER_PID"), help=argparse.SUPPRESS)
    ap.add_argument("--cli-answers", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS-load.md")
    args = ap.parse_args()
    if args.estimate_client:
        estimate_client(*map(int, args.estimate_client))
        return 0
    if args.cli_answers:
        cli_answers_child()
        return 0
    st = Stamp("bench/load.py")
    print(st.header(), flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    env = os.environ.copy()
    env.update({"STUDIO_DATA_DIR": str(tmp / "data"), "STUDIO_HEARTBEAT_INTERVAL": "1",
                "STUDIO_HEARTBEAT_TIMEOUT": "30", "PYTHONUNBUFFERED": "1",
                "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false",
                "STUDIO_MODEL_CACHE": env.get("STUDIO_MODEL_CACHE", str(REPO / ".cache" / "models"))})
    for k in ("STUDIO_USERS", "STUDIO_USERS_FILE", "STUDIO_DATABASE_URL", "STUDIO_BROKER_URL"):
        env.pop(k, None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.estimates_only:
        procs = Procs(env, tmp)
        try:
            serve = procs.start("serve", "serve", "--port", str(port), "--no-worker")
            wait_http(url + "/api/live", serve)
            est = bench_estimates(url, serve.pid, args.estimates)
        except Exception:
            print(procs.logs(), file=sys.stderr)
            raise
        finally:
            procs.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        print("\n".join(estimate_lines(est)))
        return 0 if estimates_ok(est) else 1

    import psycopg
    import redis

    db_name = f"studio_bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    admin.execute(f'CREATE DATABASE "{db_name}"')
    pg_url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{db_name}"
    rds = redis.Redis.from_url(REDIS_URL)
    rds.flushdb()
    env.update({"STUDIO_DATABASE_URL": pg_url, "STUDIO_BROKER_URL": REDIS_URL})
    procs = Procs(env, tmp)
    try:
        serve = procs.start("serve", "serve", "--port", str(port), "--no-worker")
        wait_http(url + "/api/live", serve)
        procs.start("worker-w1", "worker", "--name", "w1@bench")
        procs.start("worker-w2", "worker", "--name", "w2@bench")
        with httpx.Client(base_url=url, timeout=120) as c:
            runs = bench_runs(c, args.runs, args.timeout)
        est = bench_estimates(url, serve.pid, args.estimates)
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
             "    problems: " + ("; ".join(runs["problems"]) or "none"), *estimate_lines(est)]
    print("\n".join(lines))
    if not args.no_write:
        body = ("One `peft-studio serve --no-worker` (uvicorn with uvloop + httptools, one process) and two "
                "`peft-studio worker` processes on the same machine; the estimate requests come from a separate "
                "client process (asyncio, raw HTTP/1.1, a new connection per request, all sent at once), after "
                "(a) has finished. The headline is the computed path: each burst is 200 queries the studio has "
                "not been asked before, so the estimator works each one out (its plan, counts and saved "
                "activations). A clean query is answered by the /api app's pure-ASGI estimate path "
                "(`studio/routes/estimate.py`: the route's own parameter rules and login dependency, no FastAPI "
                "or pydantic on the way); repeats of one query are answered from the estimator's LRU "
                "(`engine.estimator`, the one estimate cache). Every response body is compared with the CLI's "
                "answer for the same inputs (`peft-studio estimate ... --json`: `studio.cli.main` run per query "
                "in a process of its own, the first also through the console script).\n\n```\n"
                + "\n".join(lines) + "\n```\n")
        print("wrote", st.write("load", body, title="Load bench"))
    return 0 if not runs["problems"] and estimates_ok(est) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: isolated data dirs, a served studio (embedded or Redis +
PostgreSQL), and the real local services. Nothing here mocks the parts under test."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# converted bundled models are cached across test sessions (gitignored)
os.environ.setdefault("STUDIO_MODEL_CACHE", str(REPO / ".cache" / "models"))

PG_ADMIN_URL = os.environ.get("STUDIO_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_DB = int(os.environ.get("STUDIO_TEST_REDIS_DB", "11"))


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    """Each test gets its own data dir and SQLite database; no broker (embedded)."""
    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    for var in ("STUDIO_DATABASE_URL", "STUDIO_BROKER_URL", "STUDIO_USERS", "STUDIO_USERS_FILE", "STUDIO_ADMINS"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.fixture
def settings(_isolated_data_dir, monkeypatch, tmp_path):
    """Settings of this test's data dir, its SQLite schema at head, and a file:// artifact
    store beside it (not inside the data dir, as a shared mount would be)."""
    from studio.runtime import prepare_database
    from workers.settings import load_settings

    monkeypatch.setenv("STUDIO_ARTIFACT_URL", (tmp_path / "store").as_uri())
    s = load_settings()
    prepare_database(s)
    return s


def require(module: str):
    """Import a test dependency (pyproject's `test` extra, or a product dependency). Missing,
    the test fails and says how to install it: it never turns into a skip."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"test dependency {module!r} is not installed ({e}); run `make install-dev` "
                    f"(pip install -e '.[test]')", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s ({last})")


def wait_status(client, run_id: int, statuses=("succeeded", "failed", "cancelled"), timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} still {run['status']} after {timeout} s")


def wait_workers(client, studio, at_least: int = 1, timeout: float = 90.0) -> list[dict]:
    """GET /api/workers until `at_least` workers have registered; fails with the
    studio's logs if they do not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(workers := client.get("/api/workers").json()) < at_least:
        assert time.monotonic() < deadline, studio.logs()
        time.sleep(0.5)
    return workers


class Studio:
    """A `peft-studio serve` process (and optional separate workers) on loopback."""

    def __init__(self, env: dict, tmp: Path, embedded_worker: bool = True, start_timeout: float = 180.0):
        self.env = env
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers: list[subprocess.Popen] = []
        args = [sys.executable, "-m", "studio.cli", "serve", "--port", str(self.port)]
        if not embedded_worker:
            args.append("--no-worker")
        self.log = open(tmp / f"serve-{self.port}.log", "w")
        self.proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_http(self.url + "/api/health", timeout=start_timeout, proc=self.proc)
        except BaseException:   # never leave a studio (and its worker) running behind a failed start
            self.stop()
            raise

    def client(self, **kw):
        import httpx

        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def start_worker(self, name: str) -> subprocess.Popen:
        log = open(self.tmp / f"worker-{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "studio.cli", "worker", "--name", name], env=self.env, cwd=REPO,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(p)
        return p

    def logs(self) -> str:
        self.log.flush()
        out = (self.tmp / f"serve-{self.port}.log").read_text()[-6000:]
        for f in self.tmp.glob("worker-*.log"):
            out += f"\n--- {f.name}\n" + f.read_text()[-3000:]
        return out

    def stop(self) -> None:
        stop_groups([self.proc, *self.workers])
        self.log.close()


def stop_groups(procs: list[subprocess.Popen], wait_s: float = 20.0) -> None:
    """SIGTERM each process's group (they are started with start_new_session), wait up to
    `wait_s` for each, then SIGKILL the group of any still running."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(wait_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def studio_env(tmp: Path, **extra) -> dict:
    env = os.environ.copy()
    env.update({"STUDIO_DATA_DIR": str(tmp / "data"), "STUDIO_HEARTBEAT_INTERVAL": "1",
                "STUDIO_HEARTBEAT_TIMEOUT": "8", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def studio(tmp_path):
    """The studio on the embedded default (SQLite + filesystem broker + its own worker)."""
    s = Studio(studio_env(tmp_path), tmp_path)
    yield s
    s.stop()


# ------------------------------------------------------------------ PostgreSQL and Redis

@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    psycopg = require("psycopg")
    name = f"studio_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {e}")
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    from workers import db as dbmod
    for url, eng in list(dbmod._ENGINES.items()):
        if url != "__pid__" and name in url:
            eng.dispose()
            dbmod._ENGINES.pop(url, None)
    admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


def fresh_redis(db: int):
    """Yield the URL of Redis database `db`, emptied before and after (a fixture's body);
    fails the test when Redis is not reachable."""
    redis = require("redis")
    url = f"redis://127.0.0.1:6379/{db}"
    r = redis.Redis.from_url(url)
    try:
        r.ping()
    except redis.ConnectionError as e:
        pytest.fail(f"Redis is not reachable at {url}: {e}")
    r.flushdb()
    yield url
    r.flushdb()
    r.close()


@pytest.fixture
def redis_url():
    """A Redis database number of our own, emptied before and after."""
    yield from fresh_redis(REDIS_TEST_DB)

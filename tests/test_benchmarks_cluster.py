"""Benchmark jobs on the cluster setup: PostgreSQL, Redis (db 12) and a separate
`peft-studio worker` take a job from the same queue as runs and store its scores; a worker
killed while it evaluates leaves no job `running`: the reaper fails it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import yaml

from conftest import Studio, fresh_redis, studio_env

pytestmark = [pytest.mark.postgres, pytest.mark.redis]
FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
REDIS_DB = 12


@pytest.fixture
def redis_db():
    yield from fresh_redis(REDIS_DB)


def wait_job(c, jid: int, statuses, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while (job := c.get(f"/api/benchmarks/{jid}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


def test_a_separate_worker_evaluates_and_a_killed_one_leaves_nothing_running(tmp_path, pg_url, redis_db):
    env = studio_env(tmp_path, STUDIO_DATABASE_URL=pg_url, STUDIO_BROKER_URL=redis_db,
                     STUDIO_HEARTBEAT_TIMEOUT=30)
    s = Studio(env, tmp_path)
    try:
        worker = s.start_worker("wb@test")
        with s.client() as c:
            up = c.post("/api/datasets", files={"file": ("mc.jsonl", (FIXTURES / "mc.jsonl").read_bytes(),
                                                         "application/json")}).json()
            cfg = yaml.safe_load((FIXTURES / "user_mc.yaml").read_text())
            cfg["dataset_kwargs"]["data_files"] = up["path"]
            r = c.post("/api/benchmarks", json={"model": "tiny-llama", "user_tasks": [yaml.safe_dump(cfg)]})
            assert r.status_code == 202, r.text
            job = wait_job(c, r.json()["id"], ("succeeded", "failed"))
            assert job["status"] == "succeeded", (job, s.logs())
            assert job["worker"] == "wb@test" and job["results"][0]["n_samples"] == 6

            # a harness task: indexing the harness's registry keeps the job running a while
            jid = c.post("/api/benchmarks", json={"model": "tiny-llama", "tasks": ["arc_easy"]}).json()["id"]
            wait_job(c, jid, ("running",), timeout=120)
            worker.send_signal(signal.SIGKILL)
            job = wait_job(c, jid, ("failed", "succeeded"), timeout=120)
            assert job["status"] == "failed" and "stopped sending heartbeats" in job["error"], job
    finally:
        s.stop()

"""The studio end to end with real processes: `peft-studio serve` with its
embedded worker (SQLite + filesystem broker), and the scale-out setup
(PostgreSQL + Redis + separate `peft-studio worker` processes)."""

import io
import json
import os
import signal
import time
import zipfile

import pytest

from conftest import Studio, studio_env, wait_status


def run_config(name="e2e", steps=12, **training):
    return {"name": name, "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 200},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
            "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 5e-3, "max_seq_len": 32,
                         "eval_every": 6, "eval_batches": 2, **training}}


def check_adapter_zip(data: bytes) -> dict:
    z = zipfile.ZipFile(io.BytesIO(data))
    names = set(z.namelist())
    assert {"adapter_config.json", "adapter_model.safetensors", "peft_studio.json", "README.md",
            "run_config.yaml", "metrics.jsonl"} <= names
    conf = json.loads(z.read("adapter_config.json"))
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "SEQ_CLS"
    return conf


def submit_and_finish(client, cfg, timeout=180):
    r = client.post("/api/runs", json=cfg)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    return rid, wait_status(client, rid, timeout=timeout)


def test_embedded_default_trains_to_succeeded_and_adapter_downloads(studio):
    with studio.client() as c:
        rid, run = submit_and_finish(c, run_config())
        assert run["status"] == "succeeded", studio.logs()
        assert run["steps_done"] == 12 and run["measured_peak_bytes"] > 0 and run["n_trainable"] > 0
        assert run["worker_host"].startswith("embedded-")
        metrics = c.get(f"/api/runs/{rid}/metrics").json()
        assert [m["step"] for m in metrics] == list(range(1, 13))
        assert metrics[5]["eval"]["accuracy"] is not None
        r = c.get(f"/api/runs/{rid}/adapter")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        assert 'filename="e2e-run' in r.headers["content-disposition"]
        check_adapter_zip(r.content)
        assert any(x["id"] == rid for x in c.get("/api/runs").json())
        assert c.get("/api/workers").json()[0]["device"] == "cpu"
        spec = c.get("/api/openapi.json").json()
        assert {"/runs", "/runs/{run_id}", "/runs/{run_id}/metrics", "/runs/{run_id}/adapter",
                "/runs/{run_id}/cancel", "/estimate"} <= set(spec["paths"])


def test_bad_requests_get_clear_errors(studio):
    with studio.client() as c:
        bad = run_config()
        bad["method"]["target_modules"] = ["query", "valeu"]
        r = c.post("/api/runs", json=bad)
        assert r.status_code == 422 and "method.target_modules" in r.json()["detail"] and "'valeu'" in r.json()["detail"]
        bad = run_config(batch_size=0)
        r = c.post("/api/runs", json=bad)
        assert r.status_code == 422 and "training.batch_size" in r.json()["detail"]
        r = c.post("/api/runs", content=b"not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert c.get("/api/runs/999999").status_code == 404
        assert c.get("/api/runs/999999/adapter").status_code == 404
        assert c.get("/api/runs", params={"status": "bogus"}).status_code == 422
        assert c.get("/api/runs").json() == []   # nothing half-created


def test_cancel_a_running_and_a_queued_run(studio):
    with studio.client() as c:
        long = c.post("/api/runs", json=run_config("long", steps=100000, eval_every=0)).json()["id"]
        queued = c.post("/api/runs", json=run_config("waiting", steps=5)).json()["id"]
        deadline = time.monotonic() + 120
        while c.get(f"/api/runs/{long}").json()["steps_done"] < 3:
            assert time.monotonic() < deadline, studio.logs()
            time.sleep(0.3)
        assert c.post(f"/api/runs/{queued}/cancel").json()["status"] == "cancelled"
        assert c.post(f"/api/runs/{long}/cancel").json()["status"] == "running"
        run = wait_status(c, long, timeout=60)
        assert run["status"] == "cancelled" and run["steps_done"] < 100000
        assert c.get(f"/api/runs/{queued}").json()["status"] == "cancelled"
        # the worker skips the cancelled queued run and keeps serving
        rid, run = submit_and_finish(c, run_config("after", steps=3))
        assert run["status"] == "succeeded"
        assert c.get(f"/api/runs/{queued}").json()["started_at"] is None


def test_killed_embedded_worker_fails_its_run_and_is_restarted(studio):
    with studio.client() as c:
        rid = c.post("/api/runs", json=run_config("doomed", steps=100000, eval_every=0)).json()["id"]
        deadline = time.monotonic() + 120
        while (run := c.get(f"/api/runs/{rid}").json())["steps_done"] < 2:
            assert time.monotonic() < deadline, studio.logs()
            time.sleep(0.3)
        os.kill(run["worker_pid"], signal.SIGKILL)
        run = wait_status(c, rid, timeout=60)
        assert run["status"] == "failed" and "exited" in run["error"]
        # the supervisor started a new worker, which trains the next run
        rid2, run2 = submit_and_finish(c, run_config("next", steps=3), timeout=180)
        assert run2["status"] == "succeeded" and run2["worker_host"] != run["worker_host"]


@pytest.mark.postgres
@pytest.mark.redis
def test_redis_and_postgres_with_separate_workers(tmp_path, pg_url, redis_url):
    secret = "s3cret-Pw"   # the local server trusts loopback; the password must still never be logged
    url = pg_url.replace("postgres@", f"postgres:{secret}@")
    env = studio_env(tmp_path, STUDIO_DATABASE_URL=url, STUDIO_BROKER_URL=redis_url)
    s = Studio(env, tmp_path)
    try:
        s.start_worker("w1@test")
        with s.client() as c:
            rid, run = submit_and_finish(c, run_config("pg-redis"))
            assert run["status"] == "succeeded", s.logs()
            assert run["worker_host"] == "w1@test"
            check_adapter_zip(c.get(f"/api/runs/{rid}/adapter").content)
            # a worker killed mid-run: the heartbeat reaper marks its run failed
            rid = c.post("/api/runs", json=run_config("killed", steps=100000, eval_every=0)).json()["id"]
            deadline = time.monotonic() + 120
            while (run := c.get(f"/api/runs/{rid}").json())["steps_done"] < 2:
                assert time.monotonic() < deadline, s.logs()
                time.sleep(0.3)
            s.workers[0].send_signal(signal.SIGKILL)
            run = wait_status(c, rid, timeout=60)
            assert run["status"] == "failed" and "heartbeat" in run["error"], run
            assert "postgres:***@" in s.logs() and secret not in s.logs()
            assert secret not in json.dumps(c.get("/api/runs").json())
    finally:
        s.stop()

"""Scale-out under a small load: several runs queued at once against two separate
`peft-studio worker` processes on PostgreSQL + Redis all finish, each exactly once.
(The timed version, 20 runs plus 200 concurrent estimates, is bench/load.py.)"""

from __future__ import annotations

import time

import pytest

from conftest import Studio, studio_env, wait_workers

N_RUNS = 6


def run_config(i: int) -> dict:
    return {"name": f"load-{i}", "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
            "training": {"max_steps": 3 + i % 3, "batch_size": 4, "max_seq_len": 32, "eval_every": 0, "seed": i}}


@pytest.mark.postgres
@pytest.mark.redis
def test_runs_queued_at_once_on_two_workers_finish_exactly_once(tmp_path, pg_url, redis_url):
    env = studio_env(tmp_path, STUDIO_DATABASE_URL=pg_url, STUDIO_BROKER_URL=redis_url)
    s = Studio(env, tmp_path, embedded_worker=False)
    try:
        s.start_worker("w1@load")
        s.start_worker("w2@load")
        with s.client() as c:
            # both workers are listening before the runs go out: each claims one run at a time
            # (prefetch 1, solo pool), so both must get some
            wait_workers(c, s, at_least=2)
            ids = []
            for i in range(N_RUNS):
                r = c.post("/api/runs", json=run_config(i))
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            deadline = time.monotonic() + 420
            while True:
                runs = {rid: c.get(f"/api/runs/{rid}").json() for rid in ids}
                if all(r["status"] in ("succeeded", "failed", "cancelled") for r in runs.values()):
                    break
                assert time.monotonic() < deadline, ({k: v["status"] for k, v in runs.items()}, s.logs())
                time.sleep(1)
            for i, rid in enumerate(ids):
                run, steps = runs[rid], 3 + i % 3
                assert run["status"] == "succeeded", (run["error"], s.logs())
                assert run["attempts"] == 1, run          # claimed by one worker, once
                assert run["steps_done"] == steps
                metric_steps = [m["step"] for m in c.get(f"/api/runs/{rid}/metrics").json()]
                assert metric_steps == list(range(1, steps + 1)), metric_steps   # no step written twice
                assert c.get(f"/api/runs/{rid}/adapter").status_code == 200
            # both workers trained, and nothing else did (how many each took depends on timing)
            hosts = [runs[rid]["worker_host"] for rid in ids]
            assert set(hosts) == {"w1@load", "w2@load"}, hosts
    finally:
        s.stop()

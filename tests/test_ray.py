"""A run of two ranks on a Ray cluster: the test starts a local Ray head (two CPUs,
its own temp dir and port), a studio whose worker has STUDIO_RAY_ADDRESS and only
one local device, and submits through REST. Every step's metrics reach the
database, each rank's place (with its Ray node's address) is recorded, the adapter
downloads."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import Studio, free_port, require, studio_env, wait_status, wait_workers

require("ray")      # in the test extra: missing, the tests fail (never skip)
RAY = Path(sys.executable).parent / "ray"


@pytest.fixture
def ray_head():
    port = free_port()
    tmp = Path(tempfile.gettempdir()) / f"ray-{uuid.uuid4().hex[:6]}"   # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([str(RAY), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
                             "--port", str(port), "--temp-dir", str(tmp), "--include-dashboard", "false",
                             "--object-store-memory", str(200 * 2 ** 20), "--disable-usage-stats"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "Ray runtime started" in line or "--block" in line:
                break
            assert proc.poll() is None, "ray start exited"
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)      # every Ray process of this head is in its session
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_a_two_worker_run_on_ray_succeeds_with_every_steps_metrics(tmp_path, ray_head):
    s = Studio(studio_env(tmp_path, STUDIO_RAY_ADDRESS=ray_head, STUDIO_WORKER_DEVICES="1",
                          RAY_USAGE_STATS_ENABLED="0"), tmp_path)
    try:
        with s.client() as c:
            w = wait_workers(c, s)[0]
            assert w["ray_address"] == ray_head and w["devices"] == 1
            run_cfg = {"name": "on-ray", "model": "tiny-llama", "task": "causal_lm",
                       "dataset": {"name": "demo-instruct", "max_rows": 64},
                       "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                       "training": {"max_steps": 5, "batch_size": 2, "max_seq_len": 32, "eval_every": 0,
                                    "learning_rate": 1e-2, "distributed": {"world_size": 2, "strategy": "ddp"}, "eval_generate": 0}}
            r = c.post("/api/runs", json=run_cfg)       # one local device: only Ray can host it
            assert r.status_code == 201, r.text
            rid = r.json()["id"]
            run = wait_status(c, rid, timeout=400)
            assert run["status"] == "succeeded", (run["error"], s.logs())
            metrics = c.get(f"/api/runs/{rid}/metrics").json()
            assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5] and all(m["loss"] > 0 for m in metrics)
            assert [x["rank"] for x in run["ranks"]] == [0, 1] and all(x["pid"] > 0 for x in run["ranks"])
            # the ranks ran on Ray: a Ray rank records its node's address, a local rank has none
            assert all(x.get("node_ip") for x in run["ranks"]), run["ranks"]
            assert run["world_size"] == 2 and run["steps_done"] == 5
            assert c.get(f"/api/runs/{rid}/adapter").status_code == 200
    finally:
        s.stop()

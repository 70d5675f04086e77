"""Faults survived, each against the real component and bounded in time:
checkpoint/resume, retries after a killed worker, a Redis restart with runs
queued, a PostgreSQL restart mid-run, and a studio restart."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import Studio, free_port, studio_env, wait_status
from engine.config import parse_run_config
from engine.prepare import prepare_run
from engine.train import train
from studio.runtime import prepare_database
from workers import db
from workers.checkpoints import load_checkpoint, save_checkpoint
from workers.settings import load_settings


def cfg_dict(name, steps, **training):
    return {"name": name, "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 200},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
            "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 5e-3, "max_seq_len": 32,
                         "eval_every": 0, **training}}


def wait_steps(c, rid, n, timeout=120, studio=None):
    deadline = time.monotonic() + timeout
    while (run := c.get(f"/api/runs/{rid}").json())["steps_done"] < n:
        assert time.monotonic() < deadline, studio.logs() if studio else run
        assert run["status"] in ("queued", "running"), run
        time.sleep(0.2)
    return run


def assert_contiguous_metrics(c, rid, steps):
    m = c.get(f"/api/runs/{rid}/metrics").json()
    assert [r["step"] for r in m] == list(range(1, steps + 1))


# ------------------------------------------------------------------ checkpoints

def test_resume_from_a_checkpoint_equals_training_straight_through(tmp_path):
    """Checkpoint (adapter, optimizer, scheduler, RNG, data position) at step 6,
    restore into a fresh model, finish: same weights as 12 uninterrupted steps."""
    cfg = parse_run_config(cfg_dict("ckpt", 12, checkpoint_every=6, scheduler="cosine", warmup_steps=2))
    straight = prepare_run(cfg)
    train(straight)
    saved = {}
    first = prepare_run(cfg)
    train(first, on_checkpoint=lambda step, st: saved.setdefault(step, st), should_stop=lambda: 6 in saved)
    settings = load_settings()
    prepare_database(settings)
    with db.transaction(settings.database_url) as s:
        rid = db.create_run(s, cfg.to_dict()).id
    save_checkpoint(settings, rid, saved[6])       # through the artifact store, verified on the way back
    state = load_checkpoint(settings, rid)
    second = prepare_run(cfg)
    res = train(second, resume_state=state)
    assert res.steps == 12 and [h["step"] for h in res.history] == list(range(7, 13))
    a = dict(straight.model.named_parameters())
    for n, p in second.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[n], rtol=0, atol=1e-6)


def test_cancel_then_resume_continues_the_curve(studio):
    with studio.client() as c:
        rid = c.post("/api/runs", json=cfg_dict("resumable", 300, checkpoint_every=5)).json()["id"]
        wait_steps(c, rid, 12, studio=studio)
        c.post(f"/api/runs/{rid}/cancel")
        run = wait_status(c, rid)
        assert run["status"] == "cancelled"
        stopped_at = run["steps_done"]
        assert stopped_at >= 12
        r = c.post(f"/api/runs/{rid}/resume")
        assert r.status_code == 200 and r.json()["from_step"] == stopped_at, r.text
        run = wait_status(c, rid, timeout=180)
        assert run["status"] == "succeeded" and run["steps_done"] == 300 and run["attempts"] == 2
        assert run["resumed_from_step"] == stopped_at
        assert_contiguous_metrics(c, rid, 300)
        assert c.post(f"/api/runs/{rid}/resume").status_code == 422   # succeeded: nothing to resume


def test_killed_worker_with_retries_is_requeued_and_resumes(studio):
    with studio.client() as c:
        rid = c.post("/api/runs", json=cfg_dict("retry", 300, checkpoint_every=4, retries=1)).json()["id"]
        run = wait_steps(c, rid, 10, studio=studio)
        os.kill(run["worker_pid"], signal.SIGKILL)
        # requeue after the heartbeat timeout, then ~290 steps with 73 checkpoints: 160 s on a
        # loaded 2-core machine (a deadline, not the property under test)
        run = wait_status(c, rid, timeout=300)
        assert run["status"] == "succeeded", (run, studio.logs())
        assert run["attempts"] == 2 and run["steps_done"] == 300
        # the second attempt started from a checkpoint (every 4 steps) at or after step 8, not from 0
        assert run["resumed_from_step"] >= 8 and run["resumed_from_step"] % 4 == 0, run
        assert_contiguous_metrics(c, rid, 300)


# ------------------------------------------------------------------ Redis restart

class RedisServer:
    def __init__(self, port):
        self.port = port
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.redis
def test_redis_restart_loses_no_queued_run_and_runs_none_twice(tmp_path):
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed")
    redis = RedisServer(free_port())
    redis.start()
    env = studio_env(tmp_path, STUDIO_BROKER_URL=f"redis://127.0.0.1:{redis.port}/0")
    s = Studio(env, tmp_path)
    try:
        with s.client() as c:
            ids = [c.post("/api/runs", json=cfg_dict(f"q{i}", 4)).json()["id"] for i in range(4)]
            redis.stop()          # everything the broker held is gone (no persistence)
            redis.start()
            time.sleep(3)         # the studio notices the lost queue and re-sends it
            s.start_worker("after-restart@test")
            s.start_worker("second@test")
            for rid in ids:
                run = wait_status(c, rid, timeout=240)
                assert run["status"] == "succeeded", s.logs()
                assert run["attempts"] == 1
                assert_contiguous_metrics(c, rid, 4)
    finally:
        s.stop()
        redis.stop()


# ------------------------------------------------------------------ PostgreSQL restart

class PgCluster:
    """A throwaway PostgreSQL cluster of our own, so restarting it disturbs nothing else."""

    def __init__(self, port):
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="pgtest-")
        os.chmod(self.dir, 0o777)
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.data = os.path.join(self.dir, "data")
        self._as_postgres([f"{self.bin}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres"])

    def _as_postgres(self, cmd):
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def start(self):
        self._as_postgres([f"{self.bin}/pg_ctl", "-D", self.data, "-w", "-l", os.path.join(self.dir, "log"),
                           "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start"])

    def stop(self, mode="fast"):
        self._as_postgres([f"{self.bin}/pg_ctl", "-D", self.data, "-w", "-m", mode, "stop"])

    def cleanup(self):
        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.postgres
def test_postgres_restart_mid_run(tmp_path):
    pg = PgCluster(free_port())
    try:
        pg.start()
        url = f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/postgres"
        env = studio_env(tmp_path, STUDIO_DATABASE_URL=url)
        s = Studio(env, tmp_path)
        try:
            with s.client() as c:
                rid = c.post("/api/runs", json=cfg_dict("pg-restart", 400)).json()["id"]
                wait_steps(c, rid, 5, studio=s)
                pg.stop()
                time.sleep(2)
                pg.start()
                run = wait_status(c, rid, timeout=240)
                assert run["status"] == "succeeded", s.logs()
                assert run["attempts"] == 1
                assert_contiguous_metrics(c, rid, 400)   # no metric row lost or duplicated
        finally:
            s.stop()
    finally:
        pg.cleanup()


# ------------------------------------------------------------------ studio restart

def test_studio_restart_embedded_requeues_and_resumes(tmp_path):
    env = studio_env(tmp_path)
    s = Studio(env, tmp_path)
    with s.client() as c:
        rid = c.post("/api/runs", json=cfg_dict("survivor", 400, checkpoint_every=10)).json()["id"]
        queued = c.post("/api/runs", json=cfg_dict("waiting", 3)).json()["id"]
        wait_steps(c, rid, 8, studio=s)
    s.stop()        # SIGTERM: the worker checkpoints and gives the run back to the queue
    s2 = Studio(env, tmp_path)
    try:
        with s2.client() as c:
            for r in (rid, queued):
                run = wait_status(c, r, timeout=240)
                assert run["status"] == "succeeded", s2.logs()
            run = c.get(f"/api/runs/{rid}").json()
            assert run["steps_done"] == 400 and run["attempts"] == 2
            # resumed, not restarted: the second attempt began at the checkpoint SIGTERM wrote, at
            # or after the 8 steps seen before the stop (a restart from 0 leaves this None)
            assert run["resumed_from_step"] is not None and 8 <= run["resumed_from_step"] < 400, run
            assert_contiguous_metrics(c, rid, 400)
    finally:
        s2.stop()


@pytest.mark.redis
def test_studio_restart_scale_out_running_run_carries_on(tmp_path, redis_url):
    env = studio_env(tmp_path, STUDIO_BROKER_URL=redis_url)
    s = Studio(env, tmp_path)
    w = s.start_worker("steady@test")
    with s.client() as c:
        rid = c.post("/api/runs", json=cfg_dict("carries-on", 150)).json()["id"]
        wait_steps(c, rid, 5, studio=s)
    os.killpg(s.proc.pid, signal.SIGKILL)
    s.proc.wait()
    s.workers.remove(w)
    s2 = Studio(env, tmp_path)
    s2.workers.append(w)
    try:
        with s2.client() as c:
            run = wait_status(c, rid, timeout=240)
            assert run["status"] == "succeeded" and run["attempts"] == 1, s2.logs()
            assert run["worker_host"] == "steady@test"
    finally:
        s2.stop()

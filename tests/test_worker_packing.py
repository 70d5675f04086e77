"""Packing runs onto one worker by memory (workers/packing.py, docs/packing.md), with
real `peft-studio worker` processes on the embedded broker and real child processes:
four runs share one worker at once; memory for two lets only two run at a time; a
run over its budget is stopped while its neighbours finish; cancel and a killed
child; STUDIO_WORKER_CONCURRENCY=1 is the one-run worker of before."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import threading
import time

import pytest

import conftest
from conftest import Studio, stop_groups, studio_env, wait_status
from workers import packing
from workers.packing import BUDGET_ERROR, CPU_PROCESS_MB, GIB, MIB, RUN_SLACK_BYTES, MemoryBudget, run_budget
from workers.settings import load_settings

# tiny-bert's submit (CUDA) estimate is ~1.0 GiB, so it is routed to workers of >= 2 GiB;
# on a CPU worker its own estimate is ~5 MiB and it reserves ~0.8 GiB (cap + 640 MiB process until a child
# has reported its measured baseline).
FOUR_FIT_GB = "4"
HEARTBEAT_TIMEOUT = 90
# each run is a fresh interpreter importing torch and transformers: ~10 s alone, minutes when the
# 2-core machine is shared; the suite's 600 s per test is too short for four at once under load
pytestmark = pytest.mark.timeout(2400)


def run_cfg(name: str, steps: int, method: dict | None = None) -> dict:
    return {"name": name, "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 100},
            "method": method or {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "training": {"max_steps": steps, "batch_size": 8, "max_seq_len": 32, "eval_every": 0}}


def at(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso)


def patient_studio(env: dict, tmp, **kw) -> Studio:
    """A Studio that may take up to 5 minutes to answer (a shared, loaded machine)."""
    plain = conftest.wait_http
    conftest.wait_http = lambda url, timeout=300.0, proc=None: plain(url, max(timeout, 300.0), proc)
    try:
        return Studio(env, tmp, **kw)
    finally:
        conftest.wait_http = plain


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """The studio without its embedded worker; each test starts the workers it needs
    on the same embedded broker (the data dir's)."""
    tmp = tmp_path_factory.mktemp("packing")
    # heartbeats may lag on a loaded 2-core machine; the reaper is not under test here
    s = patient_studio(studio_env(tmp, STUDIO_HEARTBEAT_TIMEOUT=HEARTBEAT_TIMEOUT), tmp, embedded_worker=False)
    yield s
    s.stop()


def client(studio: Studio):
    """An API client that waits up to 5 minutes for an answer (a shared, loaded machine)."""
    import httpx

    return httpx.Client(base_url=studio.url, timeout=300)


@contextlib.contextmanager
def worker(studio: Studio, name: str, **env):
    studio.env = dict(studio_env(studio.tmp, STUDIO_HEARTBEAT_TIMEOUT=HEARTBEAT_TIMEOUT),
                      **{k: str(v) for k, v in env.items()})
    p = studio.start_worker(name)
    try:
        with client(studio) as c:
            deadline = time.monotonic() + 300
            while not any(w["name"] == name for w in c.get("/api/workers").json()):
                assert p.poll() is None and time.monotonic() < deadline, studio.logs()
                time.sleep(0.5)
        yield p
    finally:
        stop_groups([p], wait_s=60)
        studio.workers.remove(p)


class WorkerWatch:
    """Samples GET /api/workers in a thread: the most runs one worker showed at once."""

    def __init__(self, studio: Studio, name: str):
        self.studio, self.name = studio, name
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        with client(self.studio) as c:
            while not self._stop.wait(0.5):
                for w in c.get("/api/workers").json():
                    if w["name"] == self.name:
                        self.samples.append(w)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)


def submit(c, cfg: dict) -> int:
    r = c.post("/api/runs", json=cfg)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_steps(c, rid: int, n: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (run := c.get(f"/api/runs/{rid}").json())["steps_done"] < n:
        assert run["status"] in ("queued", "running") and time.monotonic() < deadline, run
        time.sleep(0.3)
    return run


# ------------------------------------------------------------------ budgets, without processes

def until_in_line(pool: MemoryBudget, n: int, answered: list, timeout: float = 30) -> None:
    """Wait until `n` requests wait in the pool's line, or one was answered. A request joins
    the line and tests its turn under the pool's lock, so a ticket seen under that lock is one
    that has been refused once and now waits: no sleep decides what the pool has seen."""
    deadline = time.monotonic() + timeout
    while True:
        with pool._cond:                        # the pool's own record of its waiters
            if len(pool._line) >= n or answered:
                return
        assert time.monotonic() < deadline, f"{n} request(s) never reached the pool"
        time.sleep(0.01)


def test_the_budget_is_the_estimate_plus_the_margin_and_waits_first_come_first_served():
    s = load_settings()
    b = run_budget(s, run_cfg("b", 3), "cpu", 3 * GIB)
    assert b.estimate and b.estimate_source == "cpu" and not b.exclusive
    assert b.cap == int(b.estimate * 1.2) + RUN_SLACK_BYTES
    assert b.reservation == b.cap + int(CPU_PROCESS_MB * MIB)       # a CPU process's own memory, until measured
    packing.note_baseline(700 * MIB)                                # a child reported its baseline: measured
    packing.note_baseline(600 * MIB)
    try:
        assert run_budget(s, run_cfg("b", 3), "cpu", 3 * GIB).reservation == b.cap + 700 * MIB
    finally:
        packing._STATE.pop("measured_process", None)
    assert run_budget(s, run_cfg("b", 3), "cuda:X", 80 * GIB).reservation == \
        run_budget(s, run_cfg("b", 3), "cuda:X", 80 * GIB).cap     # CUDA: device memory only
    alone = run_budget(s, run_cfg("b", 3), "cpu", GIB // 2)
    assert alone.exclusive and alone.reservation == GIB // 2       # too big to share: runs alone
    dist = run_cfg("d", 3)
    dist["training"]["distributed"] = {"world_size": 2}
    assert run_budget(s, dist, "cpu", 3 * GIB).exclusive

    pool, never = MemoryBudget(100), threading.Event()
    assert pool.acquire(1, 60, never) and pool.reserved() == 60
    got = []
    t2 = threading.Thread(target=lambda: got.append(("big", pool.acquire(2, 150, never))), daemon=True)
    t2.start()                                  # larger than everything: waits for an empty worker
    until_in_line(pool, 1, got)
    t3 = threading.Thread(target=lambda: got.append(("small", pool.acquire(3, 10, never))), daemon=True)
    t3.start()                                  # would fit now, but comes after the big one
    until_in_line(pool, 2, got)
    assert got == []
    pool.release(1)
    t2.join(5)
    assert got == [("big", True)] and pool.reserved() == 150
    pool.release(2)
    t3.join(5)
    assert got[-1] == ("small", True)
    stop = threading.Event()
    stop.set()
    assert pool.acquire(4, 95, stop) is False and pool.reserved() == 10   # a stopping worker gives up


def test_bad_packing_settings_are_refused_by_name(monkeypatch):
    for var, value, words in (("STUDIO_WORKER_CONCURRENCY", "0", "at least 1"),
                              ("STUDIO_WORKER_CONCURRENCY", "two", "not a whole number"),
                              ("STUDIO_WORKER_MEMORY_MARGIN", "-0.1", "between 0 and 10"),
                              ("STUDIO_WORKER_MEMORY_MARGIN", "nan", "between 0 and 10")):
        monkeypatch.setenv(var, value)
        with pytest.raises(ValueError, match=words) as e:
            load_settings()
        assert var in str(e.value)
        monkeypatch.delenv(var)


# ------------------------------------------------------------------ real workers

def test_four_runs_share_one_worker_at_once(studio):
    with worker(studio, "four@test", STUDIO_WORKER_CONCURRENCY=4, STUDIO_WORKER_MEMORY_GB=FOUR_FIT_GB) as wp, \
            WorkerWatch(studio, "four@test") as watch, client(studio) as c:
        ids = [submit(c, run_cfg(f"four-{i}", 12)) for i in range(4)]
        runs = [wait_status(c, rid, timeout=1800) for rid in ids]
    assert all(r["status"] == "succeeded" for r in runs), (runs, studio.logs())
    assert {r["worker_host"] for r in runs} == {"four@test"}
    pids = {r["worker_pid"] for r in runs}
    assert len(pids) == 4 and wp.pid not in pids                      # one process per run
    starts, ends = [at(r["started_at"]) for r in runs], [at(r["finished_at"]) for r in runs]
    assert max(starts) < min(ends), [(r["started_at"], r["finished_at"]) for r in runs]   # all four at once
    assert all(r["results"]["steps"] == 12 for r in runs), runs     # each trained all its steps (no clock)
    most = max(watch.samples, key=lambda w: len(w["running"]))
    assert len(most["running"]) == 4 and set(most["running"]) == set(ids), most
    assert most["concurrency"] == 4 and most["total_memory"] == 4 * GIB
    assert 4 * 0.5 * GIB < most["reserved_memory"] <= most["total_memory"], most


def test_three_tiny_llama_runs_fit_their_budgets_with_the_default_margin(studio):
    """Issue 25: each was stopped as over its budget (RSS 0.104 GiB above its baseline against a cap
    of 0.102 GiB = estimate 0.033 + 20% + 64 MiB): the final evaluation's generations and the
    libraries' set-up are memory no estimate row shows, now in the measured runtime allowance."""
    llama = {"model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct", "max_rows": 100},
             "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}}
    with worker(studio, "llama@test", STUDIO_WORKER_CONCURRENCY=3, STUDIO_WORKER_MEMORY_GB=3), \
            client(studio) as c:
        ids = [submit(c, {**run_cfg(f"llama-{i}", 12), **llama}) for i in range(3)]
        runs = [wait_status(c, rid, timeout=1800) for rid in ids]
    assert all(r["status"] == "succeeded" for r in runs), ([(r["status"], r["error"]) for r in runs], studio.logs())
    assert len({r["worker_pid"] for r in runs}) == 3
    starts, ends = [at(r["started_at"]) for r in runs], [at(r["finished_at"]) for r in runs]
    assert max(starts) < min(ends), [(r["started_at"], r["finished_at"]) for r in runs]   # all three at once


def test_memory_for_two_runs_only_two_at_a_time(studio):
    # each run reserves its cap (~0.17 GiB) + 800 MiB here, so 2 GiB holds two (the routing needs 2 GiB)
    with worker(studio, "two@test", STUDIO_WORKER_CONCURRENCY=4, STUDIO_WORKER_MEMORY_GB=2,
                STUDIO_WORKER_PROCESS_MB=800), client(studio) as c:
        ids = [submit(c, run_cfg(f"two-{i}", 12)) for i in range(4)]
        runs = [wait_status(c, rid, timeout=1800) for rid in ids]
    assert all(r["status"] == "succeeded" for r in runs), (runs, studio.logs())
    spans = [(at(r["started_at"]), at(r["finished_at"])) for r in runs]
    at_once = [sum(1 for s, e in spans if s <= t < e) for t, _ in spans]
    assert max(at_once) == 2, spans                                    # packed, but never three
    assert len({r["worker_pid"] for r in runs}) == 4


def test_an_overrun_is_stopped_while_neighbours_finish_cancel_and_a_killed_child(studio):
    with worker(studio, "faults@test", STUDIO_WORKER_CONCURRENCY=4, STUDIO_WORKER_MEMORY_GB=FOUR_FIT_GB) as wp, \
            client(studio) as c:
        ok = submit(c, run_cfg("neighbour", 30))
        # intrinsic dimension's dense projection (D x d floats, ~450 MiB here) is a buffer, in no
        # row of the estimate: the run really holds far more than its ~6 MiB estimate
        over = submit(c, run_cfg("overrun", 60, {"name": "intrinsic_dimension", "d": 7000, "projection": "dense"}))
        cancel = submit(c, run_cfg("to-cancel", 2000))
        kill = submit(c, run_cfg("to-kill", 2000))
        wait_steps(c, cancel, 3)
        victim = wait_steps(c, kill, 3)
        assert victim["worker_pid"] != wp.pid
        assert c.post(f"/api/runs/{cancel}/cancel").status_code == 200
        os.kill(victim["worker_pid"], signal.SIGKILL)
        o = wait_status(c, over, timeout=1500)
        k = wait_status(c, kill, timeout=120)
        cc = wait_status(c, cancel, timeout=120)
        n = wait_status(c, ok, timeout=1500)
    assert o["status"] == "failed" and BUDGET_ERROR in o["error"], (o, studio.logs())
    assert "estimate" in o["error"] and "margin 20%" in o["error"] and "GiB" in o["error"], o["error"]
    used = float(o["error"].split("it used ")[1].split(" GiB")[0])
    assert used > 0.3, o["error"]                                      # the projection it really held
    assert k["status"] == "failed" and "killed by signal 9 (SIGKILL)" in k["error"], k
    assert cc["status"] == "cancelled", cc
    assert n["status"] == "succeeded" and n["steps_done"] == 30, (n, studio.logs())
    with client(studio) as c:
        assert not [r for r in c.get("/api/runs").json() if r["status"] == "running"]


def test_concurrency_one_is_the_one_run_worker_of_before(studio):
    with worker(studio, "solo@test", STUDIO_WORKER_CONCURRENCY=1, STUDIO_WORKER_MEMORY_GB=FOUR_FIT_GB) as wp, \
            client(studio) as c:
        ids = [submit(c, run_cfg(f"solo-{i}", 10)) for i in range(2)]
        runs = [wait_status(c, rid, timeout=900) for rid in ids]
        w = next(w for w in c.get("/api/workers").json() if w["name"] == "solo@test")
    assert all(r["status"] == "succeeded" for r in runs), (runs, studio.logs())
    assert {r["worker_pid"] for r in runs} == {wp.pid}                  # in the worker's own process
    a, b = sorted(runs, key=lambda r: r["started_at"])
    assert at(a["finished_at"]) <= at(b["started_at"])                  # one at a time
    assert w["concurrency"] == 1 and w["reserved_memory"] is None

"""Scale-out: memory-aware routing and priorities, with real Redis and worker processes."""


import pytest

from conftest import Studio, studio_env, wait_status, wait_workers
from workers.queue import GIB, queue_for_estimate, worker_queues
from workers.settings import load_settings


def cfg(name, steps=3, **over):
    d = {"name": name, "model": "tiny-bert", "task": "classification",
         "dataset": {"name": "demo-sentiment", "max_rows": 100},
         "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
         "training": {"max_steps": steps, "batch_size": 8, "max_seq_len": 32, "eval_every": 0}}
    d.update(over)
    return d


def test_a_run_only_reaches_queues_of_workers_that_can_hold_it():
    s = load_settings()
    for est in (0.3 * GIB, 1 * GIB, 5 * GIB, 30 * GIB, 79 * GIB):
        q = queue_for_estimate(s, int(est))
        holders = [m for m in (2, 8, 24, 48, 80) if q in worker_queues(s, m * GIB)]
        assert holders and all(m * GIB >= est for m in holders)
        assert all(q not in worker_queues(s, m * GIB) for m in (2, 8, 24, 48, 80) if m * GIB < est)
    assert queue_for_estimate(s, None) == s.queue and s.queue in worker_queues(s, None)


@pytest.mark.redis
def test_memory_aware_routing_and_refusal(tmp_path, redis_url):
    env = studio_env(tmp_path, STUDIO_BROKER_URL=redis_url)
    s = Studio(env, tmp_path)
    try:
        small_env = dict(env, STUDIO_WORKER_MEMORY_GB="0.5")
        big_env = dict(env, STUDIO_WORKER_MEMORY_GB="6")
        s.env = small_env
        s.start_worker("small@test")
        s.env = big_env
        s.start_worker("big@test")
        with s.client() as c:
            mem = {w["name"]: w["total_memory"] for w in wait_workers(c, s, at_least=2)}
            assert mem == {"small@test": GIB // 2, "big@test": 6 * GIB}
            ids = [c.post("/api/runs", json=cfg(f"r{i}")).json()["id"] for i in range(3)]
            for rid in ids:
                run = wait_status(c, rid, timeout=180)
                assert run["status"] == "succeeded", s.logs()
                assert run["estimated_peak_bytes"] > GIB // 2
                assert run["worker_host"] == "big@test"   # the 0.5 GiB worker cannot hold ~1 GiB
            huge = cfg("huge", model="smollm2-135m", task="causal_lm", dataset={"name": "demo-instruct"},
                       method={"name": "full"}, training={"max_steps": 1, "batch_size": 64, "max_seq_len": 2048})
            r = c.post("/api/runs", json=huge)
            assert r.status_code == 422, r.text
            msg = r.json()["detail"]
            assert "memory" in msg and "big@test" in msg and "GiB" in msg
    finally:
        s.stop()


@pytest.mark.redis
def test_priorities_move_queued_runs_up_and_down(tmp_path, redis_url):
    env = studio_env(tmp_path, STUDIO_BROKER_URL=redis_url)
    s = Studio(env, tmp_path)
    try:
        with s.client() as c:
            a, b, cc = (c.post("/api/runs", json=cfg(n)).json()["id"] for n in ("a", "b", "c"))
            assert c.post(f"/api/runs/{cc}/priority", json={"priority": 5}).json()["priority"] == 5
            assert c.post(f"/api/runs/{a}/priority", json={"priority": -5}).status_code == 200
            assert c.post(f"/api/runs/{a}/priority", json={"priority": 9}).status_code == 422
            s.start_worker("only@test")
            runs = [wait_status(c, rid, timeout=180) for rid in (a, b, cc)]
            assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in runs), s.logs()
            order = sorted(runs, key=lambda r: r["started_at"])
            assert [r["name"] for r in order] == ["c", "b", "a"], s.logs()
            assert c.post(f"/api/runs/{a}/priority", json={"priority": 1}).status_code == 422   # not queued
    finally:
        s.stop()


def test_the_stored_estimate_is_per_device_for_the_runs_world_size_and_strategy(tmp_path):
    from engine.config import parse_run_config
    from studio.service import SubmitError, estimate_for

    def est(world, strategy):
        c = cfg("e", model="smollm2-135m", task="causal_lm", dataset={"name": "demo-instruct"},
                method={"name": "full"},
                training={"max_steps": 1, "distributed": {"world_size": world, "strategy": strategy}})
        return estimate_for(parse_run_config(c), load_settings())["rows"]

    one, four = est(1, "fsdp"), est(4, "fsdp")
    for row in ("gradients", "optimizer"):
        assert four[row] < one[row] / 2, row
    assert four["weights"] < one["weights"] * 0.6      # a quarter plus the all-gathered block
    assert est(4, "ddp")["weights"] == one["weights"]
    bad = parse_run_config(cfg("x", model="no-such-org/no-such-model"))
    with pytest.raises(SubmitError, match="estimate: cannot estimate the memory of 'no-such-org/no-such-model'"):
        estimate_for(bad, load_settings())


def test_worker_queues_route_runs_of_n_ranks_by_devices_and_per_device_memory():
    from workers.queue import queue_for_run

    s = load_settings()
    q = queue_for_run(s, int(3 * GIB), world_size=2)
    assert q in worker_queues(s, 16 * GIB, devices=2, device_memory=[8 * GIB, 8 * GIB])
    assert q not in worker_queues(s, 16 * GIB, devices=1, device_memory=[16 * GIB])          # one device
    assert q not in worker_queues(s, 16 * GIB, devices=2, device_memory=[14 * GIB, 2 * GIB])  # second too small
    assert queue_for_run(s, int(3 * GIB), world_size=2, ray=True) in worker_queues(s, GIB, ray=True)


def test_a_two_rank_run_is_refused_when_no_worker_has_two_devices(tmp_path):
    s = Studio(studio_env(tmp_path, STUDIO_WORKER_DEVICES="1"), tmp_path)
    try:
        with s.client() as c:
            assert wait_workers(c, s)[0]["devices"] == 1
            two = cfg("two", model="tiny-llama", task="causal_lm", dataset={"name": "demo-instruct"},
                      method={"name": "lora", "r": 4, "target_modules": ["q_proj"]},
                      training={"max_steps": 1, "distributed": {"world_size": 2}})
            r = c.post("/api/runs", json=two)
            assert r.status_code == 422, r.text
            msg = r.json()["detail"]
            assert msg.startswith("training.distributed.world_size: this run needs 2 devices with ")
            assert "GiB each" in msg and "has 1 device of" in msg, msg
            assert c.get("/api/runs").json() == []
    finally:
        s.stop()

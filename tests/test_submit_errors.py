"""No swallowed errors on the way from a run config to the queue: an estimate the
config makes impossible is a 422 naming it, an estimator (or structure check) that
breaks is a 500 with its reason, and no run is ever queued past the capacity check
without an estimate. Through the real /api app in process on a fresh SQLite file.

Where the estimator must break, it is replaced by one that raises: the estimator is
not what these tests test, the submit path's handling of its failure is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_config(**over) -> dict:
    cfg = {"name": "submit-errors", "model": "tiny-bert", "task": "classification",
           "dataset": {"name": "demo-sentiment", "max_rows": 50},
           "method": {"name": "lora", "r": 2, "target_modules": ["query", "value"]},
           "training": {"max_steps": 2, "batch_size": 4, "max_seq_len": 16, "eval_every": 0}}
    cfg.update(over)
    return cfg


@pytest.fixture
def api():
    from fastapi.testclient import TestClient

    from studio.api import build_api
    from workers import db
    from workers.settings import load_settings

    settings = load_settings()
    settings.ensure_dirs()
    db.upgrade(settings.database_url)
    client = TestClient(build_api(settings), raise_server_exceptions=False)
    client.settings = settings
    return client


def add_worker(settings, name: str, total_memory: int) -> None:
    from workers import db

    with db.transaction(settings.database_url) as s:
        db.upsert_worker(s, name, host="h", pid=1, queue=f"q-{name}", device="cuda:test", total_memory=total_memory,
                         free_memory=total_memory, devices=1, device_memory=[total_memory], heartbeat_at=db.utcnow())


def test_an_estimate_the_config_makes_impossible_is_a_422_naming_it(api):
    r = api.post("/runs", json=run_config(model="no-such-org/no-such-model"))
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("estimate: cannot estimate the memory of 'no-such-org/no-such-model'")
    assert api.get("/runs").json() == []


def test_a_broken_estimator_is_a_500_with_its_reason_not_a_skipped_check(api, monkeypatch):
    import engine.estimator.runs

    def broken(*a, **k):
        raise RuntimeError("estimator exploded")

    # the studio estimates a submitted run through engine.estimator.runs (its precision resolved for CUDA)
    monkeypatch.setattr(engine.estimator.runs, "estimate", broken)
    add_worker(api.settings, "w-small", 1 << 20)   # a worker the run could never fit
    r = api.post("/runs", json=run_config())
    assert r.status_code == 500, r.text
    detail = r.json()["detail"]
    assert detail.startswith("estimate: the estimator failed on 'tiny-bert' with 'lora'"), detail
    assert "RuntimeError: estimator exploded" in detail and "fault in the studio" in detail
    assert api.get("/runs").json() == []       # nothing queued without its capacity check


@pytest.mark.parametrize("total", [None, 0, -5, 1.5, True])
def test_an_estimate_without_a_byte_total_is_a_500(api, monkeypatch, total):
    import engine.estimator
    import engine.estimator.runs

    real = engine.estimator.estimate

    def no_total(*a, **k):
        est = real(*a, **k)
        est.rows["total"] = total
        est.to_json = lambda: {"n_params": est.n_params, "n_trainable": est.n_trainable, "rows": dict(est.rows)}
        return est

    monkeypatch.setattr(engine.estimator.runs, "estimate", no_total)
    r = api.post("/runs", json=run_config())
    assert r.status_code == 500 and r.json()["detail"].startswith("estimate: the estimator gave "), r.text
    assert api.get("/runs").json() == []


def test_the_capacity_check_never_passes_without_an_estimate(api):
    from studio import service

    for missing in (None, 0):
        with pytest.raises(service.InternalError, match="capacity check cannot run without one"):
            service.check_capacity(api.settings, missing)
    # with a real estimate, a worker too small for the run refuses it (422 naming the reason)
    add_worker(api.settings, "w-tiny", 1 << 20)
    r = api.post("/runs", json=run_config())
    assert r.status_code == 422 and r.json()["detail"].startswith("memory: this run needs an estimated"), r.text
    add_worker(api.settings, "w-big", 64 << 30)
    r = api.post("/runs", json=run_config())
    assert r.status_code == 201, r.text
    assert api.get(f"/runs/{r.json()['id']}").json()["estimated_peak_bytes"] > 0


def test_a_broken_structure_check_is_a_500_and_only_quantized_bases_skip_it(api, monkeypatch):
    import engine.prepare

    # QLoRA quantizes real weights, which the meta device has not: its check waits for the worker
    r = api.post("/runs", json=run_config(method={"name": "qlora", "r": 2, "target_modules": ["query", "value"]}))
    assert r.status_code == 201, r.text

    def broken(cfg, conf):
        raise RuntimeError("meta check exploded")

    monkeypatch.setattr(engine.prepare, "dry_run", broken)
    r = api.post("/runs", json=run_config())
    assert r.status_code == 500, r.text
    assert r.json()["detail"].startswith("method: the structure check of 'lora' on 'tiny-bert' failed "
                                         "(RuntimeError: meta check exploded)"), r.text
    assert len(api.get("/runs").json()) == 1


def test_the_estimator_swallows_no_exception():
    """No `except Exception` (or bare except) in engine/estimator: an estimate is right or an error."""
    offenders = []
    for f in sorted((REPO / "engine" / "estimator").rglob("*.py")):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"^\s*except\s*(:|\(?\s*(Base)?Exception\b)", line):
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)

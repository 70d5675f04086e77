"""GET /api/estimate: the answer equals the estimator's, repeats give the same bytes,
the estimator's own cache holds the route's answers (the one estimate cache), bad
queries are refused every time, and with login on every request needs credentials."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from engine import estimator
from engine.estimator import estimate
from studio.api import build_api
from studio.auth import Auth
from workers import db
from workers.settings import load_settings

QUERY = {"model": "llama-2-7b", "method": "lora", "r": 8, "seq": 4096, "batch": 1}


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    for k in ("STUDIO_USERS", "STUDIO_USERS_FILE", "STUDIO_DATABASE_URL"):
        monkeypatch.delenv(k, raising=False)
    s = load_settings()
    s.ensure_dirs()
    db.upgrade(s.database_url)
    return s


def test_estimate_route_matches_the_estimator_and_repeats_are_identical(settings):
    c = TestClient(build_api(settings))
    first = c.get("/estimate", params=QUERY)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "application/json"
    want = estimate("llama-2-7b", {"name": "lora", "r": 8}, batch_size=1, seq_len=4096, dtype="bf16").to_json()
    assert first.json() == want
    assert first.json()["n_trainable"] == 4_194_304 and first.json()["n_params"] == 6_738_415_616
    again = c.get("/estimate", params=QUERY)
    assert again.status_code == 200 and again.content == first.content
    assert int(again.headers["content-length"]) == len(first.content)
    other = c.get("/estimate", params=dict(QUERY, r=16))
    assert other.status_code == 200 and other.json()["n_trainable"] == 2 * 4_194_304


def test_the_route_answers_from_the_estimators_cache(settings):
    """The route computes through engine.estimator.estimate, whose LRU then holds the
    answer: the same question asked of the estimator directly is a cache hit."""
    c = TestClient(build_api(settings))
    query = dict(QUERY, model="mistral-7b", r=12, seq=1536, batch=3)     # asked nowhere else in this run
    estimator.clear_estimate_cache()
    r = c.get("/estimate", params=query)
    assert r.status_code == 200, r.text
    assert estimator.estimate_cache_info().currsize >= 1
    hits = estimator.estimate_cache_info().hits
    direct = estimate("mistral-7b", {"name": "lora", "r": 12}, batch_size=3, seq_len=1536, dtype="bf16")
    assert estimator.estimate_cache_info().hits == hits + 1
    assert r.json() == direct.to_json()


def test_bad_estimate_queries_are_refused_every_time(settings):
    c = TestClient(build_api(settings))
    for _ in range(2):
        r = c.get("/estimate", params=dict(QUERY, r=0))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "r"]
        r = c.get("/estimate", params=dict(QUERY, model="no-such-model"))
        assert r.status_code == 422 and "no-such-model" in r.json()["detail"]
    # a good query after the bad ones is still answered
    assert c.get("/estimate", params=QUERY).status_code == 200


def test_with_login_every_estimate_needs_credentials(settings, monkeypatch):
    monkeypatch.setenv("STUDIO_USERS", "alice:a-pass")
    c = TestClient(build_api(settings, Auth.from_env()))
    ok = {"authorization": "Basic " + base64.b64encode(b"alice:a-pass").decode()}
    assert c.get("/estimate", params=QUERY, headers=ok).status_code == 200
    assert c.get("/estimate", params=QUERY, headers=ok).status_code == 200
    assert c.get("/estimate", params=QUERY).status_code == 401
    bad = {"authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
    assert c.get("/estimate", params=QUERY, headers=bad).status_code == 401

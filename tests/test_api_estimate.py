"""GET /api/estimate: the answer equals the estimator's, repeats are served from the
encoded-answer fast path byte for byte, bad queries are never cached, and with login
on every request still needs credentials."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from engine.estimator import estimate
from studio.api import EstimateAnswers, build_api
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


def answers_of(api) -> EstimateAnswers | None:
    for m in api.user_middleware:
        if "answers" in m.kwargs:
            return m.kwargs["answers"]
    return None


def test_estimate_route_matches_the_estimator_and_repeats_hit_the_fast_path(settings):
    api = build_api(settings)
    store = answers_of(api)
    assert store is not None and store.answers == {}
    c = TestClient(api)
    first = c.get("/estimate", params=QUERY)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "application/json"
    want = estimate("llama-2-7b", {"name": "lora", "r": 8}, batch_size=1, seq_len=4096, dtype="bf16").to_json()
    assert first.json() == want
    assert first.json()["n_trainable"] == 4_194_304 and first.json()["n_params"] == 6_738_415_616
    assert len(store.answers) == 1
    # the stored bytes are what the fast path sends; a repeat is identical to the first answer
    (stored,) = store.answers.values()
    assert stored == first.content
    again = c.get("/estimate", params=QUERY)
    assert again.status_code == 200 and again.content == first.content
    assert int(again.headers["content-length"]) == len(first.content)
    # a changed query is a different answer, computed by the route and stored next to the first
    other = c.get("/estimate", params=dict(QUERY, r=16))
    assert other.status_code == 200 and other.json()["n_trainable"] == 2 * 4_194_304
    assert len(store.answers) == 2


def test_bad_estimate_queries_are_refused_every_time_and_never_stored(settings):
    api = build_api(settings)
    store = answers_of(api)
    c = TestClient(api)
    for _ in range(2):
        r = c.get("/estimate", params=dict(QUERY, r=0))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "r"]
        r = c.get("/estimate", params=dict(QUERY, model="no-such-model"))
        assert r.status_code == 422 and "no-such-model" in r.json()["detail"]
    assert store.answers == {}


def test_stored_answers_are_bounded():
    s = EstimateAnswers(maxsize=3)
    for i in range(7):
        s.store(str(i).encode(), b"{}")
    assert 1 <= len(s.answers) <= 3 and s.get(b"6") == b"{}"


def test_with_login_every_estimate_needs_credentials(settings, monkeypatch):
    monkeypatch.setenv("STUDIO_USERS", "alice:a-pass")
    auth = Auth.from_env()
    api = build_api(settings, auth)
    assert answers_of(api) is None   # no fast path past the login check
    c = TestClient(api)
    ok = {"authorization": "Basic " + base64.b64encode(b"alice:a-pass").decode()}
    assert c.get("/estimate", params=QUERY, headers=ok).status_code == 200
    assert c.get("/estimate", params=QUERY, headers=ok).status_code == 200
    assert c.get("/estimate", params=QUERY).status_code == 401

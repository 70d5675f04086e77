"""Optional login: users from STUDIO_USERS / STUDIO_USERS_FILE, HTTP Basic on
/api, Gradio's login page for the UI, runs recorded with who launched them,
and no serving on a public address without login unless overridden."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys

import httpx
import pytest
from fastapi import HTTPException
from starlette.requests import Request

from conftest import REPO, Studio, free_port, studio_env
from studio import auth as auth_mod
from studio.auth import Auth
from studio.server import is_loopback


def basic(name: str, pw: str) -> dict:
    return {"authorization": "Basic " + base64.b64encode(f"{name}:{pw}".encode()).decode()}


def request_with(headers: dict, client: str = "10.0.0.1") -> Request:
    return Request({"type": "http", "method": "GET", "path": "/api/runs", "client": (client, 1234),
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})


def test_users_from_environment_and_file(tmp_path, monkeypatch):
    assert not Auth.from_env().enabled
    f = tmp_path / "users.txt"
    f.write_text("# team\ncarol:sha256:" + hashlib.sha256(b"c-pass").hexdigest() + "\n\ndave:plain\n")
    monkeypatch.setenv("STUDIO_USERS", "alice:secret, bob:hunter2")
    monkeypatch.setenv("STUDIO_USERS_FILE", str(f))
    monkeypatch.setenv("STUDIO_ADMINS", "bob")
    a = Auth.from_env()
    assert a.enabled and set(a.users) == {"alice", "bob", "carol", "dave"}
    assert "secret" not in repr(a.users)                      # only hashes are kept
    assert a.check("alice", "secret") and a.check("carol", "c-pass") and a.check("dave", "plain")
    assert not a.check("alice", "wrong") and not a.check("nobody", "secret")
    assert a.is_admin("bob") and not a.is_admin("alice") and not a.is_admin(None)
    monkeypatch.setenv("STUDIO_USERS", "justaname")
    with pytest.raises(ValueError, match="name:password"):
        Auth.from_env()
    # a user name is stored as each run's owner: it fits the column on every database
    monkeypatch.delenv("STUDIO_USERS_FILE")
    for name in ("x" * 101, "eve\x1b[31m", "del\x7f"):
        monkeypatch.setenv("STUDIO_USERS", f"{name}:pw")
        with pytest.raises(ValueError, match="at most 100 printable characters"):
            Auth.from_env()


def test_failed_logins_are_rate_limited(monkeypatch):
    a = Auth(users={"alice": auth_mod._hash("pw")})
    for _ in range(auth_mod.MAX_FAILURES):
        assert not a.check("alice", "nope", "1.2.3.4")
    assert not a.check("alice", "pw", "1.2.3.4")              # locked out even with the right password
    assert a.check("alice", "pw", "5.6.7.8")                  # another client is not
    monkeypatch.setattr(auth_mod, "WINDOW_S", 0.0)
    assert a.check("alice", "pw", "1.2.3.4")                  # the window passed


def test_api_user_reads_http_basic():
    a = Auth(users={"alice": auth_mod._hash("pw")})
    assert a.api_user(request_with(basic("alice", "pw"))) == "alice"
    for headers in ({}, basic("alice", "bad"), {"authorization": "Basic !!!"}):
        with pytest.raises(HTTPException) as e:
            a.api_user(request_with(headers, client="9.9.9.9"))
        assert e.value.status_code == 401 and e.value.headers["WWW-Authenticate"] == "Basic"
    for _ in range(auth_mod.MAX_FAILURES):
        with pytest.raises(HTTPException):
            a.api_user(request_with(basic("alice", "bad"), client="7.7.7.7"))
    with pytest.raises(HTTPException) as e:
        a.api_user(request_with(basic("alice", "pw"), client="7.7.7.7"))
    assert e.value.status_code == 429


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("192.0.2.7")


def test_public_address_without_login_refuses_to_start(tmp_path):
    env = studio_env(tmp_path)
    p = subprocess.run([sys.executable, "-m", "studio.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "refusing to serve on non-loopback address '0.0.0.0' without login" in p.stdout + p.stderr
    assert not (tmp_path / "data" / "studio.db").exists()     # nothing was started


def test_public_address_is_allowed_with_login_or_explicit_override(monkeypatch):
    """serve() goes on to uvicorn with login on, or with the override; uvicorn itself is not started here."""
    import studio.server as server

    started = []
    monkeypatch.setattr(server.uvicorn, "run", lambda app, host, port, **kw: started.append((host, port)))
    assert server.serve(host="0.0.0.0", port=1, allow_public=True, embedded_worker=False) == 0
    monkeypatch.setenv("STUDIO_USERS", "alice:pw")
    assert server.serve(host="0.0.0.0", port=2, embedded_worker=False) == 0
    assert started == [("0.0.0.0", 1), ("0.0.0.0", 2)]


def run_config(name: str) -> dict:
    return {"name": name, "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 100},
            "method": {"name": "lora", "r": 2, "target_modules": ["query", "value"]},
            "training": {"max_steps": 2, "batch_size": 4, "max_seq_len": 16, "eval_every": 0}}


def test_served_studio_with_login_records_and_scopes_owners(tmp_path):
    s = Studio(studio_env(tmp_path, STUDIO_USERS="alice:a-pass,bob:b-pass,root:r-pass", STUDIO_ADMINS="root"),
               tmp_path)
    try:
        with s.client() as c:
            assert c.get("/api/runs").status_code == 401
            # every /api path is closed as served (the walk is test_every_api_route_needs_credentials),
            # the liveness probe answers and says nothing
            for path in ("/api/health", "/api/methods", "/api/openapi.json", "/api/docs", "/api/workers"):
                assert c.get(path).status_code == 401, path
            assert c.get("/api/live").json() == {"ok": True}
            # the UI's data routes are Gradio's, behind its login
            for path in ("/gradio_api/info", "/config", "/gradio_api/openapi.json"):
                r = c.get(path)
                assert r.status_code in (401, 403) or "auth_required" in r.text, (path, r.status_code, r.text[:200])
            assert c.post("/gradio_api/queue/join", json={}).status_code in (401, 403)
            assert c.post("/gradio_api/upload").status_code in (401, 403)
            # the studio's own FastAPI documents nothing outside /api
            assert c.get("/openapi.json").status_code != 200 or "PEFT Studio API" not in c.get("/openapi.json").text
            assert c.get("/api/runs", headers=basic("alice", "nope")).status_code == 401
            ra = c.post("/api/runs", json=run_config("alices"), headers=basic("alice", "a-pass"))
            rb = c.post("/api/runs", json=run_config("bobs"), headers=basic("bob", "b-pass"))
            assert ra.status_code == rb.status_code == 201
            a_id, b_id = ra.json()["id"], rb.json()["id"]
            assert c.get(f"/api/runs/{a_id}", headers=basic("alice", "a-pass")).json()["owner"] == "alice"
            assert [r["id"] for r in c.get("/api/runs", headers=basic("alice", "a-pass")).json()] == [a_id]
            assert c.get(f"/api/runs/{b_id}", headers=basic("alice", "a-pass")).status_code == 404
            admin_view = c.get("/api/runs", headers=basic("root", "r-pass")).json()
            assert {(r["id"], r["owner"]) for r in admin_view} == {(a_id, "alice"), (b_id, "bob")}
            # the UI: Gradio's login page guards the app
            assert c.get("/config").status_code in (401, 403) or "auth_required" in c.get("/config").text
            bad = c.post("/login", data={"username": "alice", "password": "wrong"})
            assert bad.status_code >= 400
            ok = c.post("/login", data={"username": "alice", "password": "a-pass"})
            assert ok.status_code == 200, ok.text
            assert c.get("/config").status_code == 200 and "auth_required" not in c.get("/config").text
    finally:
        s.stop()


# ------------------------------------------------------------------ every /api route behind the login

def api_with_login(tmp_path):
    from fastapi.testclient import TestClient

    from studio.api import build_api
    from workers import db
    from workers.settings import load_settings

    settings = load_settings()
    settings.ensure_dirs()
    db.upgrade(settings.database_url)
    a = Auth(users={"alice": auth_mod._hash("a-pass")})
    return TestClient(build_api(settings, a), raise_server_exceptions=False)


def concrete(path: str) -> str:
    """An OpenAPI path with each {param} replaced by a valid-looking value."""
    import re

    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_api_route_needs_credentials(tmp_path):
    """Walk every path and method of the OpenAPI document (fetched with credentials),
    and every route the app has (docs included), without credentials: each is 401.
    Only /live answers, and it says nothing but that the studio is up."""
    c = api_with_login(tmp_path)
    good = basic("alice", "a-pass")
    doc = c.get("/openapi.json", headers=good)
    assert doc.status_code == 200, doc.text
    walked = []
    for path, ops in doc.json()["paths"].items():
        for method in ops:
            if method not in ("get", "post", "put", "patch", "delete", "head", "options"):
                continue
            if path == "/live":
                continue
            walked.append((method.upper(), path))
    # the framework's own routes, and anything mounted, are walked too (not in the document)
    from studio.api import flat_routes

    for route in flat_routes(c.app):
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if route.path != "/live" and (method, route.path) not in walked:
                walked.append((method, route.path))
    assert ("GET", "/health") in walked and ("GET", "/methods") in walked and ("GET", "/docs") in walked
    assert ("GET", "/openapi.json") in walked and ("POST", "/runs") in walked and ("GET", "/estimate") in walked
    open_routes = []
    for method, path in walked:
        # (a wrong password on three routes only: five failures in a minute lock the client out, 429)
        tries = [{}, {"authorization": "Bearer x"}]
        for headers in tries + ([basic("alice", "wrong")] if walked.index((method, path)) < 3 else []):
            r = c.request(method, concrete(path), headers=headers, params={"model": "gpt2", "method": "lora"})
            if r.status_code != 401 or r.headers.get("www-authenticate") != "Basic":
                open_routes.append((method, path, headers, r.status_code, r.text[:100]))
    assert not open_routes, open_routes
    # an unknown path says 401, not 404: nothing about the routes is revealed either
    assert c.get("/no/such/route").status_code == 401
    # with credentials, the same routes answer (the gate is not a blanket refusal)
    assert c.get("/health", headers=good).json()["status"] == "ok"
    assert any(m["name"] == "lora" for m in c.get("/methods", headers=good).json())
    assert c.get("/docs", headers=good).status_code == 200
    assert c.get("/runs/1", headers=good).status_code == 404
    # the liveness route is open and reveals nothing, not even run counts
    r = c.get("/live")
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert c.post("/live").status_code == 401


def test_login_gate_rate_limits_wrong_passwords_before_any_route(tmp_path):
    c = api_with_login(tmp_path)
    for _ in range(auth_mod.MAX_FAILURES):
        assert c.get("/openapi.json", headers=basic("alice", "bad")).status_code == 401
    assert c.get("/openapi.json", headers=basic("alice", "a-pass")).status_code == 429

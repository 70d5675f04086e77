"""Per-user API keys (workers.api_keys, migration 0008): only a sha256 is stored, a key
opens only its owner's account and nothing once revoked; the CLI (`peft-studio keys`)
and the UI's "API keys" accordion create, list and revoke them; /v1 with login off is
open, as /api is."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, text

from conftest import REPO
from workers import api_keys


def check_keys(url: str) -> None:
    row, key = api_keys.create_key(url, "alice", "laptop")
    assert key.startswith("pst-") and len(key) >= 40 and row["prefix"] == key[:12]
    eng = create_engine(url)
    with eng.connect() as c:
        stored = [tuple(r) for r in c.execute(text("SELECT key_hash, prefix, name, owner FROM api_keys"))]
    eng.dispose()
    assert stored == [(hashlib.sha256(key.encode()).hexdigest(), key[:12], "laptop", "alice")]
    assert not any(key in str(v) for r in stored for v in r)           # the key itself is nowhere
    assert api_keys.owner_of(url, key) == ("alice", row["id"])
    assert api_keys.owner_of(url, key + "x") is None and api_keys.owner_of(url, "") is None
    _b, bobs = api_keys.create_key(url, "bob", "ci")
    assert [k["name"] for k in api_keys.list_keys(url, "alice")] == ["laptop"]
    assert {k["owner"] for k in api_keys.list_keys(url, None, everyone=True)} == {"alice", "bob"}
    assert not api_keys.revoke_key(url, "bob", row["id"])                # not bob's to revoke
    assert api_keys.owner_of(url, key) == ("alice", row["id"])
    assert api_keys.revoke_key(url, "alice", row["id"])
    assert api_keys.owner_of(url, key) is None
    assert api_keys.list_keys(url, "alice")[0]["revoked_at"] is not None
    assert api_keys.owner_of(url, bobs)[0] == "bob"
    with pytest.raises(api_keys.ApiKeyError, match="^name:"):
        api_keys.create_key(url, "alice", "  ")


def test_keys_are_stored_hashed_and_revocable_on_sqlite(settings):
    check_keys(settings.database_url)


@pytest.mark.postgres
def test_keys_are_stored_hashed_and_revocable_on_postgres(pg_url):
    from workers import db

    db.upgrade(pg_url)
    check_keys(pg_url)


def test_auth_takes_a_key_only_for_a_user_of_the_studio(settings):
    from studio.auth import Auth

    _r, key = api_keys.create_key(settings.database_url, "alice", "k")
    _r, gone = api_keys.create_key(settings.database_url, "mallory", "k")      # not (or no longer) a user
    auth = Auth(users={"alice": "x"}, key_lookup=lambda k: (api_keys.owner_of(settings.database_url, k) or [None])[0])
    assert auth.key_user(key, "c") == "alice"
    assert auth.key_user(gone, "c") is None


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "studio.cli", "keys", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_creates_lists_and_revokes_a_users_keys(tmp_path):
    env = {**os.environ, "STUDIO_DATA_DIR": str(tmp_path / "data"), "STUDIO_USERS": "alice:pw,bob:pw"}
    p = cli("create", "laptop", "--user", "alice", "--json", env=env)
    assert p.returncode == 0, p.stderr
    made = json.loads(p.stdout)
    assert made["key"].startswith("pst-") and made["owner"] == "alice"
    listed = json.loads(cli("list", "--user", "alice", "--json", env=env).stdout)
    assert [(k["id"], k["revoked_at"]) for k in listed] == [(made["id"], None)]
    assert "key" not in listed[0] and made["key"] not in cli("list", "--user", "alice", env=env).stdout
    assert json.loads(cli("list", "--user", "bob", "--json", env=env).stdout) == []
    p = cli("revoke", str(made["id"]), "--user", "bob", env=env)
    assert p.returncode == 2 and "ID: no key" in p.stderr
    p = cli("create", "x", "--user", "carol", env=env)
    assert p.returncode == 2 and "--user" in p.stderr
    assert cli("revoke", str(made["id"]), "--user", "alice", env=env).returncode == 0
    assert json.loads(cli("list", "--user", "alice", "--json", env=env).stdout)[0]["revoked_at"]


def test_ui_panel_creates_shows_once_and_revokes_only_own_keys(settings):
    import gradio as gr

    from studio.auth import Auth
    from studio.ui.common import Ctx
    from studio.ui.keys_panel import KeysPanel

    ctx = Ctx(settings, Auth(users={"alice": "x", "bob": "y"}))
    with gr.Blocks():
        panel = KeysPanel(ctx)
    alice, bob = SimpleNamespace(username="alice"), SimpleNamespace(username="bob")
    shown, rows, msg, name = panel.on_create("notebook", alice)
    key = shown["value"]
    assert shown["visible"] and key.startswith("pst-") and msg.startswith("✓") and name == ""
    assert api_keys.owner_of(settings.database_url, key)[0] == "alice"
    assert [r[1] for r in rows] == ["notebook"] and key not in json.dumps(rows)
    assert panel.rows(bob) == []
    key_id = rows[0][0]
    _rows, msg = panel.on_revoke(key_id, bob)
    assert msg.startswith("✗") and api_keys.owner_of(settings.database_url, key) is not None
    rows, msg = panel.on_revoke(key_id, alice)
    assert msg.startswith("✓") and rows[0][5].startswith("revoked") and api_keys.owner_of(settings.database_url, key) is None
    assert panel.on_create("", alice)[2].startswith("✗ name:")


def test_v1_with_login_off_is_open_as_api_is(settings):
    from fastapi.testclient import TestClient

    from studio.openai_api import build_v1

    with TestClient(build_v1(settings, None)) as c:
        r = c.get("/models")
        assert r.status_code == 200 and "smollm2-135m" in {m["id"] for m in r.json()["data"]}
        r = c.post("/completions", json={"model": "run-1", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

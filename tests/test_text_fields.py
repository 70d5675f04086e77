"""Text fields of a run config on both databases: names, paths, column names, target
modules and the other strings refuse control characters and lone surrogates with a
422 naming the field (PostgreSQL cannot store NUL; no driver encodes a surrogate), the
column limits hold, a body that is not UTF-8 is a 422, and times come back in UTC the
same way. Runs go through the real /api app in process on SQLite and on PostgreSQL."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from engine.config import ConfigError, load_run_config, parse_run_config


def base_config() -> dict:
    return {"name": "text-fields", "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 50},
            "method": {"name": "lora", "r": 2, "target_modules": ["query", "value"]},
            "training": {"max_steps": 2, "batch_size": 4, "max_seq_len": 16, "eval_every": 0}}


def with_value(path: str, value) -> dict:
    """The base config with the field at dotted `path` set to `value`."""
    cfg = copy.deepcopy(base_config())
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    if path.startswith("dataset.") and path.split(".")[1] in ("path", "validation_path"):
        cfg["dataset"].pop("name")
    if path.startswith("dataset.") and path.split(".")[1] in ("prompt_column", "response_column"):
        cfg["task"] = "causal_lm"
    return cfg


# every free-text field a run config has (method options included), with a harmless value around the bad one
FIELDS = ["name", "model", "dataset.name", "dataset.path", "dataset.validation_path", "dataset.text_column",
          "dataset.label_column", "dataset.prompt_column", "dataset.response_column", "method.name",
          "method.target_modules.0", "method.target_modules.1", "training.scheduler", "training.device"]
BAD = {"NUL": "\x00", "escape": "\x1b", "newline": "\n", "tab": "\t", "DEL": "\x7f", "C1 NEL": "\x85",
       "lone surrogate": "\ud800"}


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, tmp_path, monkeypatch):
    """The /api app in process on a fresh SQLite file or a fresh PostgreSQL database."""
    from fastapi.testclient import TestClient

    from studio.api import build_api
    from workers import db
    from workers.settings import load_settings

    if request.param == "postgresql":
        monkeypatch.setenv("STUDIO_DATABASE_URL", request.getfixturevalue("pg_url"))
    settings = load_settings()
    settings.ensure_dirs()
    assert settings.database_url.startswith(request.param)
    db.upgrade(settings.database_url)
    return TestClient(build_api(settings), raise_server_exceptions=False)


def test_control_characters_in_any_text_field_are_a_422_naming_it(api):
    refused = []
    for field in FIELDS:
        for what, ch in BAD.items():
            cfg = with_value(field, f"ab{ch}cd")
            # ASCII JSON: a lone surrogate travels as the escape "\ud800", as a client would send it
            r = api.post("/runs", content=json.dumps(cfg), headers={"content-type": "application/json"})
            detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else r.text
            kind = "lone surrogate" if what == "lone surrogate" else "control character"
            if not (r.status_code == 422 and isinstance(detail, str) and detail.startswith(f"{field}: ")
                    and kind in detail):
                refused.append((field, what, r.status_code, detail))
    assert not refused, refused
    # keys too: an unknown key is refused anyway, but by a message that names it printably
    r = api.post("/runs", content=json.dumps({**base_config(), "na\x00me": "x"}),
                 headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("config: key "), r.text
    assert api.get("/runs").json() == []


def test_printable_unicode_and_the_column_limits_behave_alike(api):
    name = ("résumé 日本語 ✓ — " * 20)[:200]
    r = api.post("/runs", json=with_value("name", name))
    assert r.status_code == 201, r.text
    run = api.get(f"/runs/{r.json()['id']}").json()
    assert run["name"] == name and run["config"]["name"] == name
    # the limits of the database columns are the config's limits (SQLite ignores VARCHAR(n))
    for field, n in (("name", 201), ("model", 501)):
        r = api.post("/runs", json=with_value(field, "m" * n))
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: "), (field, r.text)
    # times are naive UTC in both databases and come back marked UTC
    created = dt.datetime.fromisoformat(run["created_at"].replace("Z", "+00:00"))
    assert created.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 120
    assert [x["id"] for x in api.get("/runs").json()] == [run["id"]]


def test_a_body_that_is_not_utf8_is_a_422(api):
    body = b'{"name": "caf\xe9", "model": "tiny-bert", "dataset": {"name": "demo-sentiment"}, ' \
           b'"method": {"name": "lora"}}'
    r = api.post("/runs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("body: "), r.text
    assert api.get("/runs").json() == []


def test_the_cli_path_applies_the_same_rule(tmp_path):
    """`peft-studio train/submit` read YAML through load_run_config: the same check, same message."""
    f = tmp_path / "run.yaml"
    f.write_text('name: "a\\0b"\nmodel: tiny-bert\ndataset: {name: demo-sentiment}\nmethod: {name: lora}\n')
    with pytest.raises(ConfigError, match=r"^name: contains a control character \('\\x00', U\+0000\)"):
        load_run_config(f)
    f.write_text("name: caf\u00e9\nmodel: tiny-bert\n", encoding="latin-1")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_run_config(f)


def test_prose_fields_may_hold_tab_and_newline_but_nothing_else():
    cfg = base_config()
    cfg["method"] = {"name": "prompt_tuning", "init": "text", "init_text": "Classify:\tthe review\nbelow"}
    assert parse_run_config(cfg).method.init_text == "Classify:\tthe review\nbelow"
    for ch in ("\x00", "\x1b", "\x85", "\ud800"):
        cfg["method"]["init_text"] = f"Classify{ch}"
        with pytest.raises(ConfigError, match=r"^method\.init_text: contains "):
            parse_run_config(cfg)


def test_large_numbers_behave_alike(api):
    """Integers at their limits: PostgreSQL's INTEGER is 32-bit where SQLite's is 64-bit."""
    r = api.post("/runs", json=with_value("training.max_steps", 10_000_000))   # the config's limit
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert api.get(f"/runs/{rid}").json()["max_steps"] == 10_000_000
    for field, value in (("training.max_steps", 10_000_001), ("method.r", 2**31), ("training.seed", 2**64)):
        r = api.post("/runs", json=with_value(field, value))
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: "), (field, r.text)
    for path in (f"/runs/{2**40}", f"/runs/{2**63 - 1}", f"/runs/{2**40}/metrics",
                 f"/runs/{rid}/metrics?after_step={2**63 - 1}"):
        r = api.get(path)
        assert r.status_code in (200, 404), (path, r.status_code, r.text)
    assert api.get(f"/runs/{rid}/metrics", params={"after_step": 2**40}).json() == []
    r = api.post(f"/runs/{rid}/priority", json={"priority": 2**40})
    assert r.status_code == 422, r.text

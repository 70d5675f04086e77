"""GET /api/estimate: the answer equals the estimator's, repeats give the same bytes,
the estimator's own cache holds the route's answers (the one estimate cache), bad
queries are refused every time, and with login on every request needs credentials."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from engine import estimator
from engine.estimator import estimate
from studio.api import build_api, flat_routes
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


# ---- the fast path (studio.routes.estimate): same answers, same validation, same login ----

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import typing  # noqa: E402

from studio import cli  # noqa: E402
from studio.routes.estimate import PARAMS, REQUIRED, EstimateFastPath, parse_query  # noqa: E402

# distinct queries over several models and methods, as a person would ask them: (REST query, CLI args)
DISTINCT = [
    ({"model": "llama-2-7b", "method": "lora", "r": 3, "seq": 777}, []),
    ({"model": "mistral-7b", "method": "dora", "r": 5, "batch": 3, "dtype": "fp16"}, []),
    ({"model": "llama-3-8b", "method": "qlora", "r": 16, "quant": "nf4-dq", "grad_checkpointing": "true"}, []),
    ({"model": "llama-2-13b", "method": "lora", "r": 7, "world_size": 4, "strategy": "fsdp", "optimizer": "adamw_8bit"},
     []),
    ({"model": "smollm2-135m", "method": "ia3", "batch": 5, "seq": 333, "optimizer": "sgd"}, []),
    ({"model": "gpt2-medium", "method": "houlsby", "formula": "appendix", "dtype": "fp32"}, []),
    ({"model": "roberta-base", "method": "loha", "r": 6, "task": "classification", "seq": 200}, []),
    ({"model": "bert-base", "method": "lora", "r": 9, "target_modules": "query,value,key", "seq": 96}, []),
    ({"model": "llama-2-7b", "method": "prefix_tuning", "seq": 1500, "batch": 2, "formula": "slide"}, []),
    ({"model": "minilm", "method": "full", "seq": 64, "batch": 16, "optimizer": "paged_adamw_8bit"}, []),
]


def cli_answer(query: dict) -> dict:
    """`peft-studio estimate ... --json` for the same inputs (the CLI's own entry point)."""
    argv = ["estimate"]
    for k, v in query.items():
        if k == "grad_checkpointing":
            argv += ["--grad-checkpointing"] if v == "true" else []
        else:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv + ["--json"]) == 0
    return json.loads(out.getvalue())


def test_distinct_queries_over_rest_equal_the_engine_and_the_cli(settings):
    c = TestClient(build_api(settings))
    bodies = set()
    for query, _ in DISTINCT:
        r = c.get("/estimate", params=query)
        assert r.status_code == 200, (query, r.text)
        assert r.headers["content-type"] == "application/json"
        want = cli_answer(query)
        assert r.json() == want, query
        m = {"name": query["method"], **({"r": query["r"]} if "r" in query else {})}
        if "target_modules" in query:
            m["target_modules"] = query["target_modules"].split(",")
        kw = {k: query[k] for k in ("dtype", "quant", "formula", "optimizer", "world_size", "strategy", "task")
              if k in query}
        direct = estimate(query["model"], m, batch_size=query.get("batch", 1), seq_len=query.get("seq", 512),
                          **{"dtype": "bf16", **kw}, grad_checkpointing=query.get("grad_checkpointing") == "true")
        assert r.json() == direct.to_json(), query
        bodies.add(r.content)
    assert len(bodies) == len(DISTINCT)      # distinct questions, distinct answers


def test_the_fast_path_mirrors_the_routes_parameters(settings):
    """PARAMS (what the fast path accepts) names the FastAPI route's query parameters with
    the same defaults, bounds and choices, so neither can drift from the other."""
    import annotated_types

    api = build_api(settings)
    route = next(r for r in flat_routes(api) if getattr(r, "path", "") == "/estimate")
    fields = {f.name: f for f in route.dependant.query_params}
    assert set(fields) == set(PARAMS)
    for name, (kind, default, rule) in PARAMS.items():
        info = fields[name].field_info
        assert (default is REQUIRED) == info.is_required(), name
        if default is not REQUIRED:
            assert info.default == default, name
        ann = info.annotation
        args = ([a for a in typing.get_args(ann) if a is not type(None)] if typing.get_origin(ann) is typing.Union
                else [ann])
        meta = {type(m).__name__: m for m in info.metadata}
        if kind == "choice":
            assert typing.get_origin(args[0]) is typing.Literal and set(typing.get_args(args[0])) == set(rule), name
        elif kind == "bool":
            assert args == [bool], name
        elif kind == "int":
            assert args == [int], name
            assert (meta["Ge"].ge, meta["Le"].le) == rule, name
        else:
            assert args == [str], name
            assert meta["MaxLen"].max_length == rule[1], name
            assert getattr(meta.get("MinLen"), "min_length", 0) == rule[0], name
        assert all(isinstance(m, (annotated_types.Ge, annotated_types.Le, annotated_types.MinLen,
                                  annotated_types.MaxLen)) for m in info.metadata), name


async def _call(app, query: bytes, headers=()) -> tuple[int, dict, bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/api/estimate", "raw_path": b"/api/estimate", "root_path": "/api", "query_string": query,
             "headers": [(b"host", b"test"), *headers], "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_the_fast_path_answers_clean_queries_and_passes_the_rest_on(settings):
    reached = []

    async def framework(scope, receive, send):      # stands in for FastAPI behind the fast path
        reached.append(scope["query_string"])
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def no_login(request):
        return None

    fast = EstimateFastPath(framework, settings=settings, user=no_login)
    status, headers, body = asyncio.run(_call(fast, b"model=llama-2-7b&method=lora&r=11&seq=999&batch=2"))
    assert status == 200 and reached == []
    assert headers[b"content-type"] == b"application/json" and int(headers[b"content-length"]) == len(body)
    assert json.loads(body) == estimate("llama-2-7b", {"name": "lora", "r": 11}, batch_size=2, seq_len=999,
                                        dtype="bf16").to_json()
    passed_on = [b"model=llama-2-7b&method=lora&r=08", b"model=llama-2-7b&method=lora&r=%2B8",
                 b"model=llama-2-7b&method=lora&r=0", b"model=llama-2-7b&method=lora&r=4097",
                 b"model=llama-2-7b&method=lora&r=8&r=9", b"model=llama-2-7b&method=lora&rank=8",
                 b"model=llama-2-7b&method=lora&grad_checkpointing=yes", b"model=llama-2-7b&method=lora&dtype=int8",
                 b"model=llama-2-7b", b"model=&method=lora", b"model=no-such-model&method=lora",
                 b"model=llama-2-7b&method=lora&seq=1", b"model=/etc&method=lora"]
    for q in passed_on:
        assert asyncio.run(_call(fast, q))[0] == 599, q
    assert reached == passed_on


# good and bad queries, plain and odd forms: both paths must answer each one the same
AGREE = [
    "model=llama-2-7b&method=lora&r=8", "model=llama-2-7b&method=lora&r=4096&seq=1048576&batch=65536",
    "model=llama-2-7b&method=lora&r=08", "model=llama-2-7b&method=lora&r=%2B8", "model=llama-2-7b&method=lora&r=8.0",
    "model=llama-2-7b&method=lora&r=0", "model=llama-2-7b&method=lora&r=4097", "model=llama-2-7b&method=lora&r=",
    "model=llama-2-7b&method=lora&r=8&r=16", "model=llama-2-7b&method=lora&unknown=1",
    "model=llama-2-7b&method=lora&grad_checkpointing=1", "model=llama-2-7b&method=lora&grad_checkpointing=yes",
    "model=llama-2-7b&method=lora&grad_checkpointing=maybe", "model=llama-2-7b&method=lora&dtype=int8",
    "model=llama-2-7b&method=lora&task=causal_lm", "model=llama-2-7b&method=lora&world_size=0",
    "model=llama-2-7b&method=ia3&r=8", "model=llama-2-7b&method=nope", "model=no-such-model&method=lora",
    "model=../../etc/passwd&method=lora", "model=%00&method=lora", "model=llama-2-7b&method=lora&seq=1",
    "model=llama-2-7b&method=lora&target_modules=q_proj,%20v_proj", "model=llama-2-7b&method=lora&target_modules=",
    "model=llama-2-7b&method=lora&target_modules=nothing_here", "method=lora", "model=llama-2-7b",
    "model=" + "x" * 501 + "&method=lora", "model=llama-2-7b&method=lora&batch=1&batch=2", "",
    "model=minilm&method=bitfit&seq=%35%31%32",
]


def test_the_fast_path_and_the_framework_route_answer_alike(settings):
    fast = TestClient(build_api(settings))
    ref_api = build_api(settings)
    ref_api.user_middleware = [m for m in ref_api.user_middleware if m.cls is not EstimateFastPath]
    ref = TestClient(ref_api)
    statuses = set()
    for q in AGREE:
        a, b = fast.get("/estimate?" + q), ref.get("/estimate?" + q)
        assert (a.status_code, a.content) == (b.status_code, b.content), q
        assert a.headers["content-type"] == b.headers["content-type"], q
        if a.status_code == 422:
            detail = a.json()["detail"]
            assert detail and (isinstance(detail, str) or detail[0]["loc"][0] == "query"), q
        statuses.add(a.status_code)
    assert statuses == {200, 422}
    assert parse_query(b"model=llama-2-7b&method=lora&r=8") is not None      # the fast path did take some


def test_login_on_the_fast_path(settings, monkeypatch):
    """The fast path asks the route's login dependency: no or wrong credentials are 401
    (each failure counted once: the sixth wrong attempt in a row is 429), the right ones 200."""
    monkeypatch.setenv("STUDIO_USERS", "alice:a-pass")
    auth = Auth.from_env()
    reached = []

    async def framework(scope, receive, send):
        reached.append(scope["query_string"])
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def user(request):
        return auth.api_user(request)

    fast = EstimateFastPath(framework, settings=settings, user=user)
    q = b"model=llama-2-7b&method=lora&r=8"
    status, headers, body = asyncio.run(_call(fast, q))
    assert status == 401 and headers[b"www-authenticate"] == b"Basic" and b"login required" in body
    good = (b"authorization", b"Basic " + base64.b64encode(b"alice:a-pass"))
    assert asyncio.run(_call(fast, q, [good]))[0] == 200
    wrong = (b"authorization", b"Basic " + base64.b64encode(b"alice:nope"))
    assert [asyncio.run(_call(fast, q, [wrong]))[0] for _ in range(6)] == [401] * 5 + [429]
    assert reached == []
    # and through the whole /api app: the same refusals as every other route
    c = TestClient(build_api(settings, auth))
    r = c.get("/estimate", params=QUERY)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
    ok = {"authorization": "Basic " + base64.b64encode(b"alice:a-pass").decode()}
    assert c.get("/estimate", params=dict(QUERY, r=21), headers=ok).json() == estimate(
        "llama-2-7b", {"name": "lora", "r": 21}, batch_size=1, seq_len=4096, dtype="bf16").to_json()


def test_the_estimators_per_model_caches_hand_out_fresh_copies():
    """The speedups the fast path leans on (catalog configs read once, per-config facts
    kept, a cheaper copy of a cached answer) never let a caller's edits reach another."""
    cfg = estimator.load_model_config("llama-2-7b")
    cfg["num_hidden_layers"] = 1
    assert estimator.load_model_config("llama-2-7b")["num_hidden_layers"] == 32
    first = estimate("llama-2-7b", {"name": "lora", "r": 13, "target_modules": ["q_proj"]}, seq_len=300)
    first.inputs["method"]["target_modules"].append("v_proj")
    first.inputs["method"]["r"] = 1
    first.rows["total"] = 0
    again = estimate("llama-2-7b", {"name": "lora", "r": 13, "target_modules": ["q_proj"]}, seq_len=300)
    assert again.inputs["method"]["target_modules"] == ["q_proj"] and again.inputs["method"]["r"] == 13
    assert again.rows["total"] > 0
    # a config dict with the catalog's content is the same question as the catalog name
    assert estimate(estimator.load_model_config("mistral-7b"), "lora", seq_len=301).to_json() == \
        estimate("mistral-7b", "lora", seq_len=301).to_json()

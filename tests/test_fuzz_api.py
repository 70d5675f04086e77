"""The REST API fuzzed with schemathesis from its own OpenAPI document, in process
(the /api FastAPI app over ASGI, a fresh data dir and SQLite database; no worker,
so every run that validates just stays queued).

What must hold for every generated request, valid or not:
- never a 5xx;
- every 4xx carries a `detail` that names the field (our own errors are
  "field.path: message"; FastAPI's request validation errors are lists whose
  items carry `loc`).

Two passes:
1. the document exactly as served, every operation, positive and negative cases;
2. POST /runs again with the document's `method` and `model` narrowed to what the
   studio really accepts (each method's own config schema, tiny/catalog models),
   so the fuzzer gets past "unknown method" and exercises the meta-device check.
   Nothing is excluded in either pass.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import schemathesis
from hypothesis import given, settings as hsettings
from schemathesis import GenerationMode

MAX_EXAMPLES = 100

# "dataset.path: ...", "method.r: ...", "training.max_steps: ...", "upload: ...", "body: ..."
FIELD_PREFIX = re.compile(r"^[A-Za-z_][\w\[\]]*(\.[\w\[\]]+)*: ")


SEEN: list[tuple[str, int, str]] = []   # (operation, status, detail head) of every fuzzed call


def check_response(case, response) -> None:
    status = response.status_code
    SEEN.append((f"{case.method} {case.path}", status, response.text[:120]))
    where = f"{case.method} {case.path} -> {status}: {response.text[:800]!r}\ncase: {case!r}"
    assert status < 500, where
    if 400 <= status < 500:
        ctype = response.headers.get("content-type") or [""]
        assert (ctype[0] if isinstance(ctype, list) else ctype).startswith("application/json"), where
        body = response.json()
        assert isinstance(body, dict) and body.get("detail"), where
        detail = body["detail"]
        if isinstance(detail, list):   # FastAPI request validation: each item names its location
            assert all(isinstance(d, dict) and d.get("loc") and d.get("msg") for d in detail), where
        elif status == 404:
            assert isinstance(detail, str) and re.search(r"not found|no adapter|Not Found", detail), where
        else:
            assert isinstance(detail, str), where
            assert FIELD_PREFIX.match(detail), where


@pytest.fixture(scope="module")
def api_app(tmp_path_factory):
    from workers import db
    from workers.settings import load_settings

    from studio.api import build_api

    tmp = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_DATA_DIR", str(tmp / "data"))
        mp.setenv("STUDIO_MAX_UPLOAD_MB", "2")
        mp.delenv("STUDIO_DATABASE_URL", raising=False)
        mp.delenv("STUDIO_BROKER_URL", raising=False)
        settings = load_settings()
    settings.ensure_dirs()
    db.upgrade(settings.database_url)
    api = build_api(settings)
    yield api, settings
    # nothing outside the data dir was written by the fuzzed uploads, and no temp files were left
    leftovers = [p.name for p in settings.uploads_dir.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def fuzz_schema(api_app):
    api, _ = api_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    return schema


def narrowed_document(api) -> dict:
    """The served document with POST /runs' `method` a oneOf over each method's config
    schema and `model` a choice of models whose structure the studio can check."""
    from engine.methods import METHODS

    doc = copy.deepcopy(api.openapi())
    comps = doc["components"]["schemas"]
    variants = []
    for name, spec in METHODS.items():
        s = spec.config_cls.model_json_schema(ref_template="#/components/schemas/{model}")
        for k, v in s.pop("$defs", {}).items():
            comps.setdefault(k, v)
        s.setdefault("properties", {})["name"] = {"const": name, "type": "string"}
        s["required"] = sorted(set(s.get("required", [])) | {"name"})
        comps[f"Method_{name}"] = s
        variants.append({"$ref": f"#/components/schemas/Method_{name}"})
    rc = comps["RunConfig"]
    rc["properties"]["method"] = {"oneOf": variants}
    # models with weights here: a catalog model (gpt2, bert-base) is refused before the
    # structure check since #24, and a free-form dataset is refused before it too (the other
    # fuzz cases cover both); with them in, whether any draw reached the check hung on the
    # order in which pydantic had built the schemas
    rc["properties"]["model"] = {"enum": ["tiny-bert", "tiny-llama"]}
    rc["properties"]["dataset"] = {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"name": {"enum": ["demo-sentiment", "demo-instruct"]}}}
    doc["paths"] = {"/runs": {"post": doc["paths"]["/runs"]["post"]}}
    return doc


@pytest.fixture(scope="module")
def runs_schema(api_app):
    api, _ = api_app
    schema = schemathesis.openapi.from_dict(narrowed_document(api))
    schema.app = api
    return schema


# every health check on: a strategy that filters out most of what it draws, or one too slow
# to reach its budget, fails the test instead of quietly testing less. Derandomized, so a
# failure reproduces; no example database (nothing written outside the test's dirs).
SETTINGS = dict(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None)
MODES = ("positive", "negative")


def fuzz(schema, label: str, mode: str, max_examples: int) -> None:
    """Run `max_examples` cases of one operation in one generation mode; fail on the first bad answer."""
    ops = [r.ok() for r in schema.get_all_operations()]
    op = next(o for o in ops if f"{o.method.upper()} {o.path}" == label)
    strategy = op.as_strategy(generation_mode=GenerationMode(mode))

    @hsettings(**{**SETTINGS, "max_examples": max_examples})
    @given(case=strategy)
    def run(case):
        check_response(case, case.call())

    run()


def served_cases() -> list[tuple[str, str]]:
    """(operation, mode) for every operation of the document as served (no exclusions), read
    at collection time: routes other engineers add are fuzzed too. An operation that takes no
    input (no parameters, no body) has no invalid request: it gets the positive mode only.
    Building the document touches no database."""
    from workers.settings import load_settings

    from studio.api import build_api

    doc = build_api(load_settings()).openapi()
    cases = []
    for path, item in doc["paths"].items():
        for m, op in item.items():
            if m not in ("get", "post", "put", "patch", "delete"):
                continue
            has_inputs = bool(op.get("parameters") or op.get("requestBody") or item.get("parameters"))
            cases += [(f"{m.upper()} {path}", mode) for mode in MODES if mode == "positive" or has_inputs]
    return cases


CASES = served_cases()


@pytest.mark.parametrize("label,mode", CASES, ids=[f"{label}-{mode}" for label, mode in CASES])
def test_api_never_5xx_and_4xx_name_the_field(fuzz_schema, label, mode):
    fuzz(fuzz_schema, label, mode, MAX_EXAMPLES)


def test_run_configs_with_real_methods_never_5xx(runs_schema):
    SEEN.clear()
    fuzz(runs_schema, "POST /runs", "positive", 2 * MAX_EXAMPLES)
    # the narrowed document gets past the schema: some configs are queued, so the
    # meta-device check of real method configs ran
    assert sum(s == 201 for _, s, _ in SEEN) >= 5, SEEN[:20]


def test_a_method_name_that_is_not_a_string_is_a_422_naming_the_field(api_app):
    """Found by the fuzzer at 100 examples: {"method": {"name": []}} was a 500 (unhashable list)."""
    from fastapi.testclient import TestClient

    api, _ = api_app
    with TestClient(api) as c:
        for bad in ([], {}, 3):
            r = c.post("/runs", json={"model": "tiny-bert", "dataset": {"name": "demo-sentiment"},
                                      "method": {"name": bad}})
            assert r.status_code == 422, r.text
            assert r.json()["detail"].startswith("method.name: "), r.text

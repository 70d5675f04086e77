"""POST /api/generate over the real /api app (in process, SQLite, runs trained here by
the worker's own execute_run): the base and several runs' adapters side by side,
each equal to the run rebuilt alone; streaming; classification probabilities; the
refusals; LRU eviction of bases under STUDIO_PLAYGROUND_MEMORY_GB; the login gate."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from fastapi.testclient import TestClient

from studio import artifacts, playground, service
from studio.api import build_api

PROMPT = "Name a colour of the sky."


def causal(name: str, method: dict, model: str = "tiny-llama", task: str = "causal_lm") -> dict:
    ds = {"name": "demo-instruct" if task == "causal_lm" else "demo-sentiment", "max_rows": 40}
    return {"name": name, "model": model, "task": task, "dataset": ds, "method": method,
            "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 2e-2, "max_seq_len": 48,
                         "eval_every": 0, "eval_batches": 1, "eval_generate": 0}}


RUNS = {
    "lora": causal("lora", {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "ia3": causal("ia3", {"name": "ia3"}),
    "prefix": causal("prefix", {"name": "prefix_tuning", "num_virtual_tokens": 4}),
    "bert-lora": causal("bert-lora", {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                        "tiny-bert", "classification"),
    "bert-houlsby": causal("bert-houlsby", {"name": "houlsby", "bottleneck_size": 4}, "tiny-bert", "classification"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The runs above trained in this process, owned by alice, and one left queued."""
    from studio.runtime import prepare_database
    from workers.settings import load_settings
    from workers.tasks import execute_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_DATA_DIR", str(tmp_path_factory.mktemp("generate") / "data"))
        for var in ("STUDIO_DATABASE_URL", "STUDIO_BROKER_URL", "STUDIO_USERS", "STUDIO_PLAYGROUND_MEMORY_GB"):
            mp.delenv(var, raising=False)
        settings = load_settings()
        prepare_database(settings)
        ids = {}
        for key, cfg in RUNS.items():
            rid = service.submit_run(settings, cfg, owner="alice")
            assert execute_run(rid, settings) == "succeeded", service.get_run(settings, rid)["error"]
            ids[key] = rid
        ids["queued"] = service.submit_run(settings, RUNS["lora"], owner="alice")
        playground.CACHE.clear()
        yield settings, ids
        playground.CACHE.clear()


@pytest.fixture(scope="module")
def client(trained):
    with TestClient(build_api(trained[0]), raise_server_exceptions=False) as c:
        yield c


def post(client, ids: list[int], **kw):
    return client.post("/generate", json={"run_ids": ids, "prompt": PROMPT, **kw})


def greedy_alone(model, tokenizer, n: int) -> str:
    """The reference: transformers' own greedy generate on a separately built model."""
    ids = playground.prompt_ids(tokenizer, PROMPT)
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=sorted(playground.stop_ids(model, tokenizer)))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_base_and_three_adapters_side_by_side_each_equal_to_the_run_alone(trained, client):
    settings, ids = trained
    chosen = [ids["lora"], ids["ia3"], ids["prefix"]]
    r = post(client, chosen, max_new_tokens=12, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "causal_lm" and body["model"] == "tiny-llama"
    assert [o["run_id"] for o in body["outputs"]] == [None, *chosen]
    assert body["settings"]["temperature"] == 0 and body["settings"]["max_new_tokens"] == 12
    outputs = [o["output"] for o in body["outputs"]]
    assert any(outputs[1:]) and len(set(outputs)) >= 2, outputs     # trained adapters answer, not all alike
    assert all(o["tokens"] <= 12 for o in body["outputs"])
    for rid, got in zip(chosen, outputs[1:]):
        prep = artifacts.load_trained(settings, rid)
        assert got == greedy_alone(prep.model, prep.tokenizer, 12), rid
    base = artifacts.load_base(settings, prep.config, []).model
    assert outputs[0] == greedy_alone(base, prep.tokenizer, 12)
    # the base was loaded once; the three runs hang off it
    assert len(playground.CACHE.keys()) == 1
    bank = playground.CACHE._items[playground.CACHE.keys()[0]]
    assert sorted(k[0] for k in bank.keys()) == sorted(chosen)
    assert bank.views_bytes < 0.1 * bank.base_bytes


def test_sampling_is_repeatable_by_seed(client, trained):
    ids = trained[1]
    runs = [ids["lora"], ids["prefix"]]
    a = post(client, runs, max_new_tokens=10, temperature=1.5, top_p=0.95, seed=5).json()
    b = post(client, runs, max_new_tokens=10, temperature=1.5, top_p=0.95, seed=5).json()
    c = post(client, runs, max_new_tokens=10, temperature=1.5, top_p=0.95, seed=6).json()
    out = lambda ans: [o["output"] for o in ans["outputs"]]   # noqa: E731
    assert out(a) == out(b) and a["settings"]["seed"] == 5
    assert out(a) != out(c)
    # no seed given: the one drawn is reported, and posting it again gives the same answer
    unseeded = post(client, runs, max_new_tokens=10, temperature=1.5, top_p=0.95).json()
    seed = unseeded["settings"]["seed"]
    assert 0 <= seed < 2**31
    again = post(client, runs, max_new_tokens=10, temperature=1.5, top_p=0.95, seed=seed).json()
    assert out(again) == out(unseeded) and again["settings"]["seed"] == seed
    nearby = post(client, runs, max_new_tokens=10, temperature=1.5, top_p=0.95, seed=(seed + 1) % 2**31).json()
    assert out(nearby) != out(unseeded)               # the seed decides the answer: the comparison says something


def test_streamed_tokens_arrive_in_order_and_join_to_the_answer(client, trained):
    ids = trained[1]
    runs = [ids["lora"], ids["ia3"], ids["prefix"]]
    whole = post(client, runs, max_new_tokens=12).json()
    with client.stream("POST", "/generate", json={"run_ids": runs, "prompt": PROMPT, "max_new_tokens": 12,
                                                      "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    *tokens, last = lines
    assert tokens and all(set(t) == {"run_id", "token"} for t in tokens)
    timeless = lambda outs: [{k: v for k, v in o.items() if k != "seconds"} for o in outs]   # noqa: E731
    assert last["done"] is True and timeless(last["outputs"]) == timeless(whole["outputs"])
    for o in whole["outputs"]:
        assert "".join(t["token"] for t in tokens if t["run_id"] == o["run_id"]) == o["output"]
    # columns take turns: the first token of every column that speaks comes before any column's last
    speaking = {t["run_id"] for t in tokens}
    firsts = [next(i for i, t in enumerate(tokens) if t["run_id"] == rid) for rid in speaking]
    assert max(firsts) < len(speaking) * 2
    # a client that leaves after the first line holds nothing: the next request on this base answers
    with client.stream("POST", "/generate", json={"run_ids": runs, "prompt": PROMPT, "max_new_tokens": 40,
                                                      "stream": True}) as r:
        assert json.loads(next(r.iter_lines()))["token"]
    assert post(client, runs, max_new_tokens=3).status_code == 200


def test_classification_runs_give_probabilities_that_sum_to_one(client, trained):
    settings, ids = trained
    runs = [ids["bert-lora"], ids["bert-houlsby"]]
    body = client.post("/generate", json={"run_ids": runs, "prompt": "a wonderful, moving film"}).json()
    assert body["task"] == "classification" and [o["run_id"] for o in body["outputs"]] == [None, *runs]
    labels = service.get_run(settings, ids["bert-lora"])
    for o in body["outputs"]:
        probs = o["probabilities"]
        assert len(probs) >= 2 and abs(sum(probs.values()) - 1) < 1e-5 and o["output"] == max(probs, key=probs.get)
    for rid, o in zip(runs, body["outputs"][1:]):
        prep = artifacts.load_trained(settings, rid)
        enc = prep.tokenizer(["a wonderful, moving film"], return_tensors="pt", truncation=True, max_length=48)
        with torch.no_grad():
            want = torch.softmax(prep.model(**enc).logits[0], -1)
        got = torch.tensor([o["probabilities"][name] for name in prep.examples.labels])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert labels["status"] == "succeeded"


def test_runs_of_another_base_or_task_and_bad_requests_are_refused(client, trained):
    ids = trained[1]
    r = post(client, [ids["lora"], ids["bert-lora"]])
    assert r.status_code == 409
    assert r.json()["detail"] == (f"run_ids: run {ids['bert-lora']} was trained on tiny-bert, not tiny-llama, the base "
                                  f"of run {ids['lora']}; choose runs of one base model")
    # another task on the same model (the run row as the studio reads it, its config a classification one)
    run = service.get_run(trained[0], ids["lora"])
    other = {**run, "id": 77, "config": {**run["config"], "task": "classification",
                                         "dataset": {"name": "demo-sentiment", "max_rows": 40}}}
    with pytest.raises(playground.Refused, match="run_ids: run 77 is a classification run, not causal_lm like run"):
        playground.choose([run, other])
    r = post(client, [ids["queued"]])
    assert r.status_code == 409 and r.json()["detail"].startswith(f"run_ids: run {ids['queued']} is queued")
    assert post(client, [999999]).status_code == 404
    r = post(client, [ids["lora"], ids["lora"]])
    assert r.status_code == 422 and "listed twice" in r.json()["detail"]
    r = client.post("/generate", json={"run_ids": [ids["lora"]], "prompt": "   "})
    assert r.status_code == 422 and r.json()["detail"] == "prompt: type some text first"
    for bad in ({"max_new_tokens": playground.MAX_NEW_TOKENS + 1}, {"temperature": -1}, {"top_p": 0},
                {"run_ids": []}, {"prompt": "x" * (playground.MAX_INPUT_CHARS + 1)}, {"colour": "blue"}):
        r = client.post("/generate", json={"run_ids": [ids["lora"]], "prompt": PROMPT, **bad})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["detail"][0]["loc"][-1] == next(iter(bad)), (bad, r.text)


def test_bases_are_evicted_least_recently_used_within_the_memory_limit(client, trained, monkeypatch):
    ids = trained[1]
    playground.CACHE.clear()
    monkeypatch.setenv("STUDIO_PLAYGROUND_MEMORY_GB", "0.006")       # one tiny base (~4 MB) and its adapters
    assert post(client, [ids["lora"]], max_new_tokens=2).status_code == 200
    (llama_key,) = playground.CACHE.keys()
    assert llama_key[:2] == ("tiny-llama", "causal_lm")
    assert client.post("/generate", json={"run_ids": [ids["bert-lora"]], "prompt": "fine"}).status_code == 200
    (bert_key,) = playground.CACHE.keys()
    assert bert_key[:2] == ("tiny-bert", "classification")
    assert playground.CACHE.used_bytes() <= 0.006e9
    monkeypatch.setenv("STUDIO_PLAYGROUND_MEMORY_GB", "0.1")
    assert post(client, [ids["lora"]], max_new_tokens=2).status_code == 200
    assert playground.CACHE.keys() == [bert_key, llama_key]          # both fit now; llama most recent
    playground.CACHE.clear()
    monkeypatch.setenv("STUDIO_PLAYGROUND_MEMORY_GB", "0.001")
    r = post(client, [ids["lora"]], max_new_tokens=2)
    assert r.status_code == 409 and "more than the playground's limit of 0.00 GB" in r.json()["detail"]
    assert playground.CACHE.keys() == []


def test_with_login_on_generate_needs_credentials_and_shows_only_your_runs(trained):
    from studio import auth as auth_mod
    from studio.auth import Auth

    settings, ids = trained
    auth = Auth(users={"alice": auth_mod._hash("a-pw"), "bob": auth_mod._hash("b-pw")})
    cred = lambda u, p: {"authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}  # noqa: E731
    body = {"run_ids": [ids["bert-lora"]], "prompt": "fine"}
    with TestClient(build_api(settings, auth=auth), raise_server_exceptions=False) as c:
        assert c.post("/generate", json=body).status_code == 401
        assert c.post("/generate", json=body, headers=cred("alice", "wrong")).status_code == 401
        assert c.post("/generate", json=body, headers=cred("bob", "b-pw")).status_code == 404
        r = c.post("/generate", json=body, headers=cred("alice", "a-pw"))
        assert r.status_code == 200 and r.json()["outputs"][1]["run_id"] == ids["bert-lora"]

"""The OpenAI-compatible /v1 through the official `openai` client against a real studio
(build_app under uvicorn on 127.0.0.1, login on, API keys), with runs trained here by the
worker's own execute_run: sync, async and streaming completions and chat, logprobs and
echo against the run rebuilt alone, n > 1, stop, seed, usage, model names, batching of
concurrent requests (counted), runs of one base on one loaded base, and every refusal in
OpenAI's error shape (bad key 401, someone else's run 404, a classifier 400, bad fields 422).
/api takes the same key."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from conftest import require
from v1_helpers import serve_in_thread

openai = require("openai")

TRAINING = {"max_steps": 2, "batch_size": 4, "learning_rate": 2e-2, "max_seq_len": 48, "eval_every": 0,
            "eval_batches": 1, "eval_generate": 0}


def causal(name, method):
    return {"name": name, "model": "tiny-llama", "task": "causal_lm",
            "dataset": {"name": "demo-instruct", "max_rows": 24}, "method": method, "training": TRAINING}


RUNS = {
    "lora": ("alice", causal("alice-lora", {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})),
    "ia3": ("alice", causal("alice-ia3", {"name": "ia3"})),
    "bob": ("bob", causal("bob-lora", {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]})),
    "clf": ("alice", {"name": "alice-clf", "model": "tiny-bert", "task": "classification",
                      "dataset": {"name": "demo-sentiment", "max_rows": 24},
                      "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]}, "training": TRAINING}),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from studio import service
    from studio.runtime import prepare_database
    from studio.server import build_app
    from workers import api_keys
    from workers.settings import load_settings
    from workers.tasks import execute_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_DATA_DIR", str(tmp_path_factory.mktemp("v1") / "data"))
        for var in ("STUDIO_DATABASE_URL", "STUDIO_BROKER_URL", "STUDIO_USERS_FILE", "STUDIO_PLAYGROUND_MEMORY_GB",
                    "STUDIO_ARTIFACT_URL"):
            mp.delenv(var, raising=False)
        mp.setenv("STUDIO_USERS", "alice:apw,bob:bpw,root:rpw")
        mp.setenv("STUDIO_ADMINS", "root")
        settings = load_settings()
        prepare_database(settings)
        ids = {}
        for key, (owner, cfg) in RUNS.items():
            rid = service.submit_run(settings, cfg, owner=owner)
            assert execute_run(rid, settings) == "succeeded", service.get_run(settings, rid)["error"]
            ids[key] = rid
        url = settings.database_url
        keys = {u: api_keys.create_key(url, u, "test")[1] for u in ("alice", "bob", "root")}
        revoked_row, keys["revoked"] = api_keys.create_key(url, "alice", "old")
        api_keys.revoke_key(url, "alice", revoked_row["id"])
        with serve_in_thread(build_app(settings)) as base_url:
            yield {"settings": settings, "ids": ids, "keys": keys, "url": base_url}


def client(served, who="alice", **kw):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=served["keys"][who], max_retries=0, **kw)


def aclient(served, who="alice"):
    return openai.AsyncOpenAI(base_url=served["url"] + "/v1", api_key=served["keys"][who], max_retries=0)


@pytest.fixture(scope="module")
def alone(served):
    """Run `lora` rebuilt alone in this process (engine.adapters through studio.artifacts)."""
    from studio import artifacts

    prep = artifacts.load_trained(served["settings"], served["ids"]["lora"])
    return prep.model.eval(), prep.tokenizer


def reference_greedy(model, tok, ids, n):
    from engine.serving import stop_token_ids

    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop_token_ids(model, tok)))
    new = out[0, len(ids):].tolist()
    stops = stop_token_ids(model, tok)
    kept = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    return tok.decode(kept, skip_special_tokens=True), len(new)


PROMPT = "Name a colour of the sky."


# ---------------------------------------------------------------- models


def test_models_are_the_bases_and_the_callers_causal_runs(served):
    ids = served["ids"]
    mine = {m.id for m in client(served).models.list()}
    assert {"tiny-llama", "smollm2-135m", f"run-{ids['lora']}", f"run-{ids['ia3']}"} <= mine
    assert f"run-{ids['bob']}" not in mine and f"run-{ids['clf']}" not in mine
    admin = {m.id for m in client(served, "root").models.list()}
    assert f"run-{ids['bob']}" in admin
    m = client(served).models.retrieve(f"run-{ids['lora']}")
    assert m.owned_by == "alice" and m.model_extra["parent"] == "tiny-llama" and m.model_extra["name"] == "alice-lora"


# ---------------------------------------------------------------- completions and chat


def test_completion_is_the_runs_own_greedy_continuation_with_usage(served, alone):
    from engine.serving import text_prompt_ids

    model, tok = alone
    ids = text_prompt_ids(tok, PROMPT)
    want, made = reference_greedy(model, tok, ids, 6)
    r = client(served).completions.create(model=f"run-{served['ids']['lora']}", prompt=PROMPT, max_tokens=6,
                                          temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == made
    assert r.usage.total_tokens == len(ids) + made
    by_name = client(served).completions.create(model="alice-lora", prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_name.choices[0].text == want


def test_chat_sync_and_async_agree_and_follow_the_prompt_format(served, alone):
    from engine.serving import chat_prompt_ids

    model, tok = alone
    msgs = [{"role": "user", "content": PROMPT}]
    want, _ = reference_greedy(model, tok, chat_prompt_ids(tok, msgs), 5)
    name = f"run-{served['ids']['lora']}"
    r = client(served).chat.completions.create(model=name, messages=msgs, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want

    async def go():
        async with aclient(served) as c:
            return await c.chat.completions.create(model=name, messages=msgs, max_tokens=5, temperature=0)
    assert asyncio.run(go()).choices[0].message.content == want


def test_streaming_completion_and_chat_concatenate_to_the_whole_answer(served):
    c, name = client(served), f"run-{served['ids']['lora']}"
    whole = c.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    chunks = list(c.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    msgs = [{"role": "user", "content": PROMPT}]
    chat_whole = c.chat.completions.create(model=name, messages=msgs, max_tokens=6, temperature=0)
    stream = c.chat.completions.create(model=name, messages=msgs, max_tokens=6, temperature=0, stream=True)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat_whole.choices[0].message.content

    async def go():
        async with aclient(served) as ac:
            s = await ac.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
            return "".join([ch.choices[0].text async for ch in s])
    assert asyncio.run(go()) == whole


def test_logprobs_with_echo_score_the_prompt_as_the_run_alone(served, alone):
    from engine.serving import text_prompt_ids

    model, tok = alone
    ids = text_prompt_ids(tok, "The sky is blue and the grass is green")
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    r = client(served).completions.create(model=f"run-{served['ids']['lora']}", prompt=[ids], max_tokens=1,
                                          temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    want = [float(logp[j, ids[j + 1]]) for j in range(len(ids) - 1)] + [float(logp[-1].max())]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for j, top in enumerate(lp.top_logprobs[1:]):
        assert max(top.values()) == pytest.approx(float(logp[j].max()), abs=1e-4)
    assert r.choices[0].text.startswith(tok.decode(ids))
    scored = client(served).completions.create(model=f"run-{served['ids']['lora']}", prompt=[ids], max_tokens=0,
                                               echo=True, logprobs=0)
    assert scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want[:-1], abs=1e-4)


def test_n_choices_stop_and_seed(served):
    c, name = client(served), f"run-{served['ids']['ia3']}"
    kw = dict(model=name, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11)
    a = c.completions.create(n=3, **kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    texts = [ch.text for ch in a.choices]
    assert len(set(texts)) > 1                                      # each choice its own draw
    assert [ch.text for ch in c.completions.create(n=3, **kw).choices] == texts   # the seed repeats them
    other = c.completions.create(n=3, **{**kw, "seed": 12})
    assert [ch.text for ch in other.choices] != texts
    full = texts[0]
    words = full.split()
    assert len(words) >= 3, full
    stop = words[1]
    r = c.completions.create(n=1, stop=[stop], **kw)
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}], n=2, max_tokens=4,
                                     temperature=1.0, seed=5, logprobs=True, top_logprobs=2)
    assert len(chat.choices) == 2
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


# ---------------------------------------------------------------- batching and sharing


def test_concurrent_requests_are_batched_into_fewer_forwards(served):
    from engine import serving
    from studio.openai_api import runner

    name, n, steps = f"run-{served['ids']['lora']}", 4, 5
    prompts = [f"{PROMPT} {k}" for k in range(n)]
    c = client(served)
    one_by_one = [c.completions.create(model=name, prompt=p, max_tokens=steps, temperature=0).choices[0].text
                  for p in prompts]
    old = runner.BATCHER.window_s
    runner.BATCHER.window_s = 1.0        # gather what arrives together (the requests below are concurrent)
    try:
        batches, forwards = runner.BATCHER.batches, serving.FORWARDS.value

        async def go():
            async with aclient(served) as ac:
                return await asyncio.gather(*[ac.completions.create(model=name, prompt=p, max_tokens=steps,
                                                                    temperature=0) for p in prompts])
        answers = asyncio.run(go())
        batches, forwards = runner.BATCHER.batches - batches, serving.FORWARDS.value - forwards
    finally:
        runner.BATCHER.window_s = old
    assert [a.choices[0].text for a in answers] == one_by_one
    assert batches < n
    assert forwards < n * min(a.usage.completion_tokens for a in answers)


def test_runs_of_one_base_share_one_loaded_base(served):
    from studio import playground as pg

    c = client(served)
    for key in ("lora", "ia3"):
        c.completions.create(model=f"run-{served['ids'][key]}", prompt="hi", max_tokens=1)
    tiny = [k for k in pg.CACHE.keys() if k[0] == "tiny-llama" and k[1] == "causal_lm"]
    assert len(tiny) == 1
    bank = pg.CACHE.bank(tiny[0], None)
    attached = {k[0] for k in bank.keys()}
    assert {served["ids"]["lora"], served["ids"]["ia3"]} <= attached


# ---------------------------------------------------------------- refusals, in OpenAI's shape


def error_of(exc) -> dict:
    body = exc.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_missing_and_revoked_keys_are_401(served):
    for key in ("pst-not-a-key", served["keys"]["revoked"]):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0).models.list()
        assert e.value.status_code == 401 and error_of(e)["code"] == "invalid_api_key"
    r = httpx.get(served["url"] + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    # HTTP Basic (the /api login) is not a /v1 key
    r = httpx.get(served["url"] + "/v1/models", auth=("alice", "apw"))
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_someone_elses_run_is_404_as_if_it_did_not_exist(served):
    bob_run = f"run-{served['ids']['bob']}"
    with pytest.raises(openai.NotFoundError) as e:
        client(served).completions.create(model=bob_run, prompt="hi", max_tokens=1)
    err = error_of(e)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    with pytest.raises(openai.NotFoundError) as e2:
        client(served).completions.create(model="run-999999", prompt="hi", max_tokens=1)
    assert error_of(e2)["message"] == err["message"].replace(bob_run, "run-999999")
    with pytest.raises(openai.NotFoundError):
        client(served).completions.create(model="bob-lora", prompt="hi", max_tokens=1)      # nor by name
    ok = client(served, "bob").completions.create(model=bob_run, prompt="hi", max_tokens=1)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_classifier_bad_fields_and_unknown_routes_answer_in_openai_shape(served):
    c = client(served)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=f"run-{served['ids']['clf']}", prompt="hi", max_tokens=1)
    assert error_of(e)["code"] == "model_not_supported"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.completions.create(model="tiny-llama", prompt="hi", max_tokens=1, extra_body={"bogus": 1})
    assert error_of(e)["param"] == "bogus"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.completions.create(model="tiny-llama", prompt="hi", temperature=9)
    assert error_of(e)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-llama", prompt=[[10**9]], max_tokens=1)
    assert error_of(e)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-llama", prompt="hi " * 400, max_tokens=400)
    assert error_of(e)["code"] == "context_length_exceeded"
    r = httpx.get(served["url"] + "/v1/nothing", headers={"Authorization": f"Bearer {served['keys']['alice']}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_api_takes_the_same_key_and_shows_its_owners_runs(served):
    hdr = {"Authorization": f"Bearer {served['keys']['alice']}"}
    runs = httpx.get(served["url"] + "/api/runs", headers=hdr).json()
    assert {r["owner"] for r in runs} == {"alice"}
    r = httpx.get(served["url"] + "/api/runs", headers={"Authorization": f"Bearer {served['keys']['revoked']}"})
    assert r.status_code == 401


@pytest.mark.slow
def test_the_bundled_smollm2_answers_through_its_chat_template(served):
    r = client(served).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"

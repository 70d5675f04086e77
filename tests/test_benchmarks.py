"""Benchmarks without the queue: the harness's model interface over the engine
(engine.harness.EngineLM) answers the harness's requests as its own `hf` model does on the
same weights; a user's task YAML is refused when it could run code or read a path; the
harness's templates render in Jinja's sandbox; a benchmark job whose worker died is
failed by the reaper; the REST routes check their input and their owner."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import require

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


# ---------------------------------------------------------------- user task YAML

GOOD = """
task: user_mc
dataset_path: json
dataset_kwargs:
  data_files: upload:0123456789abcdef0123456789abcdef.jsonl
test_split: train
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: choices
doc_to_target: answer
"""


@pytest.mark.parametrize("text, field", [
    (GOOD.replace("doc_to_choice: choices", "doc_to_choice: !function utils.choices"),
     "user_tasks[0]: YAML tags are not allowed"),
    (GOOD + "process_docs: utils.process\n", "user_tasks[0].process_docs: not allowed"),
    (GOOD + "include: ../../etc/task.yaml\n", "user_tasks[0].include: not allowed"),
    (GOOD + "class: lm_eval.api.task.ConfigurableTask\n", "user_tasks[0].class: not allowed"),
    (GOOD.replace("upload:0123456789abcdef0123456789abcdef.jsonl", "/etc/passwd"),
     "user_tasks[0].dataset_kwargs.data_files: '/etc/passwd' is not an upload"),
    (GOOD.replace("dataset_path: json", "dataset_path: hellaswag"), "user_tasks[0].dataset_path: one of"),
    (GOOD.replace("task: user_mc", "task: hellaswag"), "user_tasks[0].task: name it user_<something>"),
    (GOOD.replace("task: user_mc", "task: ../x"), "user_tasks[0].task: a task name"),
    ("task: [", "user_tasks[0]: not valid YAML"),
    ("- a\n- b\n", "user_tasks[0]: a YAML mapping"),
    (GOOD + "x: !!python/object/apply:os.system ['true']\n", "user_tasks[0]: YAML tags are not allowed"),
])
def test_unsafe_or_malformed_user_tasks_are_refused_naming_the_field(text, field):
    from workers.benchmarks import BenchmarkRequestError, parse_user_task

    with pytest.raises(BenchmarkRequestError) as e:
        parse_user_task(text)
    assert str(e.value).startswith(field), str(e.value)


def test_a_user_task_over_an_upload_that_was_never_made_is_refused(settings):
    from workers.benchmarks import BenchmarkRequestError, check_user_tasks

    with pytest.raises(BenchmarkRequestError, match=r"^user_tasks\[0\]\.dataset_kwargs\.data_files: no uploaded"):
        check_user_tasks([GOOD], settings)


def test_templates_render_in_the_sandbox():
    """A template reaching for Python internals stops with a SecurityError; a plain one renders."""
    require("lm_eval")
    from jinja2.exceptions import SecurityError
    from lm_eval.utils import apply_template

    from engine.harness import sandbox_templates

    sandbox_templates()
    assert apply_template("Q: {{question}}", {"question": "why?"}) == "Q: why?"
    with pytest.raises(SecurityError):
        apply_template("{{ question.__class__.__mro__[1].__subclasses__() }}", {"question": "x"})


# ---------------------------------------------------------------- EngineLM against the harness's hf model

@pytest.fixture(scope="module")
def smollm2():
    from engine.models import load_model

    loaded = load_model("smollm2-135m", "causal_lm")
    return loaded.model.eval(), loaded.tokenizer


def test_engine_lm_answers_as_the_harness_hf_model_on_the_same_weights(smollm2):
    """Log-likelihoods (of choices, of an empty context, rolling over long text) and greedy
    generations with stop strings: the same as lm_eval's HFLM on the same model object."""
    require("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from engine.harness import EngineLM

    model, tok = smollm2
    ours = EngineLM(model, tok, batch_size=3, max_length=64)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=64, device="cpu")

    def inst(kind, args, i):
        return Instance(request_type=kind, doc={}, arguments=args, idx=i)
    pairs = [("Question: What do bees make?\nAnswer:", " honey"), ("Question: What do bees make?\nAnswer:", " silk"),
             ("The sky is ", "blue"), ("", "Hello world"), ("Two plus two is", " four, of course.")]
    ll = [inst("loglikelihood", p, i) for i, p in enumerate(pairs)]
    a, b = ours.loglikelihood(ll), ref.loglikelihood(ll)
    assert [g for _, g in a] == [g for _, g in b]
    assert [s for s, _ in a] == pytest.approx([s for s, _ in b], abs=1e-4)
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)     # > 64 tokens: several windows
    roll = [inst("loglikelihood_rolling", (long,), 0), inst("loglikelihood_rolling", ("Short text.",), 1)]
    assert ours.loglikelihood_rolling(roll) == pytest.approx(ref.loglikelihood_rolling(roll), abs=1e-3)
    gen = [inst("generate_until", ("Question: What is the capital of France?\nAnswer:",
                                   {"until": ["\n"], "max_gen_toks": 10, "do_sample": False}), 0),
           inst("generate_until", ("1, 2, 3, 4,", {"until": [","], "max_gen_toks": 8}), 1)]
    assert ours.generate_until(gen) == ref.generate_until(gen)


def test_an_adapter_changes_the_scores_and_the_base_is_untouched(smollm2):
    """A run's method on the engine's model: the harness sees the adapted model (scores move),
    and evaluating it leaves the base weights as they were."""
    require("lm_eval")
    import torch
    from lm_eval.api.instance import Instance

    from engine.harness import EngineLM

    model, tok = smollm2
    req = [Instance(request_type="loglikelihood", doc={}, arguments=("The sky is", " blue"), idx=0)]
    before = EngineLM(model, tok).loglikelihood(req)[0][0]
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    from engine.adapter_bank import AdapterBank

    bank = AdapterBank(model, tok, "causal_lm")

    def bump(m):                 # a stand-in "adapter": a private, changed copy of one norm
        m.model.norm.weight = torch.nn.Parameter(m.model.norm.weight.detach() * 1.5)
        return m
    view = bank.attach_with("bump", bump).model
    after = EngineLM(view, tok).loglikelihood(req)[0][0]
    assert after != pytest.approx(before, abs=1e-3)
    assert EngineLM(model, tok).loglikelihood(req)[0][0] == pytest.approx(before, abs=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


# ---------------------------------------------------------------- the reaper

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db(request, settings):
    """The test's settings on SQLite, and on a fresh PostgreSQL database at head."""
    if request.param == "sqlite":
        return settings
    import dataclasses

    from workers import db

    url = request.getfixturevalue("pg_url")
    db.upgrade(url)
    return dataclasses.replace(settings, database_url=url)


def test_a_job_whose_worker_died_is_failed_never_left_running(any_db):
    import datetime as dt

    from workers import db
    from workers.benchmarks import claim_job, create_job
    from workers.queue import reap_and_requeue

    with db.transaction(any_db.database_url) as s:
        stale = create_job(s, run_id=None, model="tiny-llama", seed=0, owner=None, tasks=["x"], user_tasks=[],
                           limit=None, num_fewshot=None).id
        fresh = create_job(s, run_id=None, model="tiny-llama", seed=0, owner=None, tasks=["x"], user_tasks=[],
                           limit=None, num_fewshot=None).id
        gone = create_job(s, run_id=None, model="tiny-llama", seed=0, owner=None, tasks=["x"], user_tasks=[],
                          limit=None, num_fewshot=None).id
        assert claim_job(s, stale, 0, "w-dead", 1) and claim_job(s, fresh, 0, "w-live", 2)
        assert claim_job(s, gone, 0, "embedded-1", 3)
        assert not claim_job(s, stale, 0, "w-other", 4)            # claimed once only
        s.get(db.BenchmarkJob, stale).heartbeat_at = db.utcnow() - dt.timedelta(seconds=600)
    reap_and_requeue(any_db, 60)
    reap_and_requeue(any_db, 0, host="embedded-1", reason="the worker exited (code -9)")
    with db.transaction(any_db.database_url) as s:
        st = {j: (s.get(db.BenchmarkJob, j).status, s.get(db.BenchmarkJob, j).error) for j in (stale, fresh, gone)}
    assert st[stale][0] == "failed" and "w-dead stopped sending heartbeats" in st[stale][1]
    assert st[fresh] == ("running", None)
    assert st[gone] == ("failed", "the worker exited (code -9)")


# ---------------------------------------------------------------- REST input and owners

def test_rest_refuses_bad_requests_naming_the_field(settings):
    from fastapi.testclient import TestClient

    from studio import service
    from studio.api import build_api
    from workers import db

    cfg = {"name": "cls", "model": "tiny-bert", "task": "classification", "dataset": {"name": "demo-sentiment"},
           "method": {"name": "lora", "r": 2, "target_modules": ["query"]}, "training": {"max_steps": 1}}
    rid = service.submit_run(settings, cfg, owner=None)
    with TestClient(build_api(settings), raise_server_exceptions=False) as c:
        r = c.post(f"/runs/{rid}/evaluate", json={"tasks": ["user_x"]})
        assert r.status_code == 422 and "only succeeded runs" in r.json()["detail"]
        with db.transaction(settings.database_url) as s:
            s.get(db.Run, rid).status = "succeeded"
            s.add(db.Adapter(run_id=rid, key="k", size=1, sha256="0" * 64, files=[]))
        r = c.post(f"/runs/{rid}/evaluate", json={"tasks": ["user_x"]})
        assert r.status_code == 422 and "benchmarks score causal language models" in r.json()["detail"]
        assert c.post("/runs/999/evaluate", json={"tasks": ["a"]}).status_code == 404
        r = c.post("/benchmarks", json={"model": "tiny-llama", "tasks": ["a b"]})
        assert r.status_code == 422 and r.json()["detail"].startswith("tasks: 'a b' is not a task name")
        r = c.post("/benchmarks", json={"model": "tiny-llama", "tasks": ["a"], "limit": -1})
        assert r.status_code == 422 and r.json()["detail"].startswith("limit:")
        r = c.post("/benchmarks", json={"model": "tiny-llama", "tasks": ["a"], "bogus": 1})
        assert r.status_code == 422 and r.json()["detail"] == "bogus: unknown field"
        r = c.post("/benchmarks", json={"model": "/etc", "tasks": ["a"]})
        assert r.status_code == 422 and r.json()["detail"].startswith("model:")
        r = c.post("/benchmarks", json={"model": "tiny-llama", "tasks": ["arc_easy"], "limit": 3})
        assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["tasks"] == ["arc_easy"]
        jid = r.json()["id"]
        assert c.get(f"/benchmarks/{jid}").json()["limit"] == 3
        assert c.post(f"/benchmarks/{jid}/cancel").json() == {"status": "cancelled"}
        assert c.get("/benchmarks/424242").status_code == 404
        assert c.get("/benchmarks?run_ids=x").status_code == 422


def test_with_login_on_a_user_evaluates_and_sees_only_their_own_runs_and_jobs(settings):
    import base64

    from fastapi.testclient import TestClient

    from studio import auth as auth_mod
    from studio import service
    from studio.api import build_api
    from studio.auth import Auth
    from workers import db

    cfg = {"name": "llama", "model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
           "method": {"name": "lora", "r": 2, "target_modules": ["q_proj"]}, "training": {"max_steps": 1}}
    rid = service.submit_run(settings, cfg, owner="alice")
    with db.transaction(settings.database_url) as s:
        s.get(db.Run, rid).status = "succeeded"
        s.add(db.Adapter(run_id=rid, key="k", size=1, sha256="0" * 64, files=[]))
    auth = Auth(users={"alice": auth_mod._hash("a-pw"), "bob": auth_mod._hash("b-pw")})

    def cred(u, p):
        return {"authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}
    body = {"tasks": ["arc_easy"], "limit": 2}
    with TestClient(build_api(settings, auth=auth), raise_server_exceptions=False) as c:
        assert c.post(f"/runs/{rid}/evaluate", json=body).status_code == 401
        assert c.get("/benchmarks").status_code == 401
        assert c.post(f"/runs/{rid}/evaluate", json=body, headers=cred("bob", "b-pw")).status_code == 404
        r = c.post(f"/runs/{rid}/evaluate", json=body, headers=cred("alice", "a-pw"))
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        assert [j["id"] for j in c.get("/benchmarks", headers=cred("alice", "a-pw")).json()] == [jid]
        assert c.get("/benchmarks", headers=cred("bob", "b-pw")).json() == []
        assert c.get(f"/benchmarks/{jid}", headers=cred("bob", "b-pw")).status_code == 404
        assert c.get(f"/benchmarks?run_ids={rid}", headers=cred("bob", "b-pw")).status_code == 404
        assert c.post(f"/benchmarks/{jid}/cancel", headers=cred("bob", "b-pw")).status_code == 404


def test_cli_evaluate_queues_a_job_or_says_why_not(settings, capsys, tmp_path):
    import json

    from studio.cli import main

    assert main(["evaluate", "base", "--model", "tiny-llama", "--tasks", "arc_easy,hellaswag", "--limit", "5"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "queued" and job["tasks"] == ["arc_easy", "hellaswag"] and job["limit"] == 5
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "999", "--tasks", "arc_easy"])
    assert e.value.code == 2 and "run 999 not found" in capsys.readouterr().err
    bad = tmp_path / "t.yaml"
    bad.write_text(GOOD.replace("doc_to_choice: choices", "doc_to_choice: !function utils.x"))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "base", "--model", "tiny-llama", "--user-task", str(bad)])
    assert e.value.code == 2 and "error: user_tasks[0]: YAML tags are not allowed" in capsys.readouterr().err


def test_compare_ranks_runs_by_a_benchmark_metric_best_first_by_its_own_direction():
    from studio import benchmarks, compare

    def job(jid, rid, results, status="succeeded"):
        return {"id": jid, "run_id": rid, "model": "m", "seed": None, "status": status, "results": results}

    def res(task, **metrics):
        return {"task": task, "metrics": {k: {"value": v, "stderr": 0.01, "higher_is_better": hib}
                                          for k, (v, hib) in metrics.items()}}
    runs = [{"id": i, "name": f"r{i}", "method": "lora"} for i in (1, 2, 3, 4)]
    jobs = [job(1, 1, [res("mc", acc=(0.5, True)), res("ppl", perplexity=(9.0, False))]),
            job(2, 2, [res("mc", acc=(0.7, True)), res("ppl", perplexity=(12.0, False))]),
            job(3, 1, [res("mc", acc=(0.9, True))]),                      # run 1's newest mc score
            job(4, 3, [res("mc", acc=(0.99, True))], status="failed"),    # a failed job counts for nothing
            job(5, None, [res("mc", acc=(0.1, True))])]                   # the base is not a run to rank
    assert compare.benchmark_choices(jobs) == ["mc / acc", "ppl / perplexity"]
    scores = benchmarks.latest_scores(jobs)
    acc = compare.rank_by_benchmark(runs, scores, "mc / acc")
    assert [(r[0], r[1], r[3]) for r in acc] == [(1, "#1 r1", "0.9000 ± 0.0100"), (2, "#2 r2", "0.7000 ± 0.0100")]
    ppl = compare.rank_by_benchmark(runs, scores, "ppl / perplexity")
    assert [r[1] for r in ppl] == ["#1 r1", "#2 r2"]                    # lower perplexity first
    assert compare.rank_by_benchmark(runs, scores, "") == []

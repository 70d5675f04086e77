"""Every method is evaluated, not only the peft-format ones: tiny-llama runs of LoRA, prefix
tuning and Houlsby adapters (our own format, no peft equivalent) are trained by the
worker's own execute_run, then benchmarked by the worker's own execute_benchmark (the
function the queued task calls) on a user task over an uploaded file; each job succeeds,
scores every document, and each adapted model scores otherwise than the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
METHODS = {"lora": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 4},
           "houlsby": {"name": "houlsby"}}


def config(method: dict) -> dict:
    return {"name": f"bm-{method['name']}", "model": "tiny-llama", "task": "causal_lm",
            "dataset": {"name": "demo-instruct", "max_rows": 40}, "method": method,
            "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-2, "max_seq_len": 48,
                         "eval_every": 0, "eval_batches": 1, "eval_generate": 0}}


def test_runs_of_every_kind_of_method_and_the_base_are_evaluated(settings):
    from studio import benchmarks as bm
    from studio import service
    from workers.benchmarks import execute_benchmark
    from workers.tasks import execute_run

    up = service.save_upload(settings, "gen.jsonl", FIXTURES / "gen.jsonl")
    cfg = yaml.safe_load((FIXTURES / "user_ppl.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"] = up["path"]
    body = {"user_tasks": [yaml.safe_dump(cfg)]}

    ppl = {}
    for key, method in METHODS.items():
        rid = service.submit_run(settings, config(method))
        assert execute_run(rid, settings) == "succeeded", service.get_run(settings, rid)["error"]
        job = bm.submit_for_run(settings, service.get_run(settings, rid), body)
        assert execute_benchmark(job["id"], settings, 0) == "succeeded", bm.get_job(settings, job["id"])["error"]
        res = bm.get_job(settings, job["id"])["results"]
        assert [r["task"] for r in res] == ["user_ppl"] and res[0]["n_samples"] == 4
        ppl[key] = res[0]["metrics"]["perplexity"]["value"]
        assert execute_benchmark(job["id"], settings, 0) == "succeeded"     # a second message: a no-op
    base = bm.submit_for_base(settings, {**body, "model": "tiny-llama", "seed": 0})
    assert execute_benchmark(base["id"], settings, 0) == "succeeded", bm.get_job(settings, base["id"])["error"]
    ppl["base"] = bm.get_job(settings, base["id"])["results"][0]["metrics"]["perplexity"]["value"]
    for key in METHODS:
        assert ppl[key] != pytest.approx(ppl["base"], rel=1e-4), (key, ppl)

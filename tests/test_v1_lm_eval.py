"""lm-evaluation-harness's own `local-completions` model pointed at our /v1/completions
(a served studio, login on, the run's API key in OPENAI_API_KEY as the harness sends it)
scores a multiple-choice task exactly as the harness's `hf` model scores the run's merged
model: the same log-likelihood for every (question, choice), so the same accuracy.
The task is harness YAML over a local jsonl (tests/fixtures/v1_tasks/)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import require
from v1_helpers import serve_in_thread

FIXTURES = Path(__file__).parent / "fixtures" / "v1_tasks"
TASK = "v1_colours"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from studio import service
    from studio.artifacts import merged_zip_path
    from studio.runtime import prepare_database
    from studio.server import build_app
    from workers import api_keys
    from workers.settings import load_settings
    from workers.tasks import execute_run

    tmp = tmp_path_factory.mktemp("v1-lm-eval")
    tasks = tmp / "tasks"
    shutil.copytree(FIXTURES, tasks)
    yaml = tasks / f"{TASK}.yaml"
    yaml.write_text(yaml.read_text().replace("DATA_FILE", str(tasks / "colours.jsonl")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_DATA_DIR", str(tmp / "data"))
        for var in ("STUDIO_DATABASE_URL", "STUDIO_BROKER_URL", "STUDIO_USERS_FILE", "STUDIO_ADMINS",
                    "STUDIO_ARTIFACT_URL"):
            mp.delenv(var, raising=False)
        mp.setenv("STUDIO_USERS", "alice:apw")
        settings = load_settings()
        prepare_database(settings)
        cfg = {"name": "eval-lora", "model": "tiny-llama", "task": "causal_lm",
               "dataset": {"name": "demo-instruct", "max_rows": 24},
               "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
               "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-2, "max_seq_len": 48,
                            "eval_every": 0, "eval_batches": 1, "eval_generate": 0}}
        rid = service.submit_run(settings, cfg, owner="alice")
        assert execute_run(rid, settings) == "succeeded", service.get_run(settings, rid)["error"]
        zpath, _ = merged_zip_path(settings, rid)
        merged = tmp / "merged"
        with zipfile.ZipFile(zpath) as z:
            z.extractall(merged)
        _row, key = api_keys.create_key(settings.database_url, "alice", "lm-eval")
        mp.setenv("OPENAI_API_KEY", key)        # what local-completions sends as the Bearer key
        with serve_in_thread(build_app(settings)) as url:
            yield {"url": url, "run": f"run-{rid}", "merged": str(merged), "tasks": str(tasks)}


def evaluate(model, model_args: dict | None, tasks_dir: str) -> dict:
    lm_eval = require("lm_eval")
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK],
                                   task_manager=TaskManager(include_path=tasks_dir), log_samples=True,
                                   batch_size=4, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def loglikelihoods(res: dict) -> dict:
    """(doc id, choice) -> the log-likelihood the harness got for it."""
    out = {}
    for s in res["samples"][TASK]:
        for j, resp in enumerate(s["resps"]):
            out[(s["doc_id"], j)] = float(resp[0][0])
    return out


def test_local_completions_on_v1_scores_as_hf_on_the_merged_model(setup):
    from transformers import AutoTokenizer

    # the tiny test model's tokenizer is MiniLM's (BERT's): no BOS/EOS of its own, and
    # its special tokens would end every text with [SEP]; both harness models get the
    # model's BOS ([CLS]) as the prefix of an empty context and no special tokens otherwise
    tok = AutoTokenizer.from_pretrained(setup["merged"])
    same = {"add_bos_token": False, "custom_prefix_token_id": tok.cls_token_id}
    from lm_eval.models.huggingface import HFLM

    hf_lm = HFLM(pretrained=setup["merged"], dtype="float32", device="cpu", batch_size=4, add_bos_token=False)
    hf_lm.custom_prefix_token_id = tok.cls_token_id      # HFLM takes no such argument; its property reads this
    hf = evaluate(hf_lm, None, setup["tasks"])
    api = evaluate("local-completions", {"model": setup["run"], "base_url": setup["url"] + "/v1/completions",
                                         "tokenizer": setup["merged"], "tokenizer_backend": "huggingface",
                                         "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True,
                                         **same}, setup["tasks"])
    want, got = loglikelihoods(hf), loglikelihoods(api)
    assert len(want) == 8 * 3 and set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-3), k
    assert api["results"][TASK]["acc,none"] == hf["results"][TASK]["acc,none"]
    assert api["results"][TASK]["acc_norm,none"] == hf["results"][TASK]["acc_norm,none"]

"""The training loop on tiny random models: loss falls, evaluation, cancel,
schedules, and the peft-format files of a trained LoRA adapter."""

import json
import math

import pytest
from safetensors.torch import load_file

from engine.adapters import save_adapter
from engine.config import parse_run_config
from engine.prepare import prepare_run
from engine.train import lr_lambda, train


def cfg(model="tiny-bert", task="classification", steps=25, **training):
    ds = "demo-sentiment" if task == "classification" else "demo-instruct"
    targets = ["query", "value"] if "bert" in model else ["q_proj", "v_proj"]
    return parse_run_config({
        "name": f"{model}-test", "model": model, "task": task, "dataset": {"name": ds, "max_rows": 200},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": targets},
        "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 5e-3, "max_seq_len": 48,
                     "eval_every": 0, "eval_batches": 4, "eval_generate": 0, **training}})


@pytest.mark.parametrize("model,task", [("tiny-bert", "classification"), ("tiny-llama", "causal_lm"),
                                        ("tiny-llama", "classification")])
def test_training_lowers_the_loss(model, task):
    prep = prepare_run(cfg(model, task, steps=30))
    res = train(prep)
    first = sum(h["loss"] for h in res.history[:5]) / 5
    last = sum(h["loss"] for h in res.history[-5:]) / 5
    assert res.steps == 30 and last < first
    assert res.n_trainable < res.n_params and res.tokens_per_s > 0 and res.peak_memory_bytes > 0
    metric = "accuracy" if task == "classification" else "perplexity"
    assert metric in res.eval
    if task == "causal_lm":
        assert math.isclose(res.eval["perplexity"], math.exp(res.eval["eval_loss"]), rel_tol=1e-6)


def test_should_stop_cancels_at_the_next_step():
    prep = prepare_run(cfg(steps=50))
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    res = train(prep, should_stop=stop)
    assert res.cancelled and res.steps == 3


def test_gradient_accumulation_and_cosine_schedule():
    prep = prepare_run(cfg(steps=6, grad_accum=2, scheduler="cosine", warmup_steps=2))
    res = train(prep)
    lrs = [h["lr"] for h in res.history]
    assert lrs[0] < lrs[1] >= lrs[2] > lrs[-1]
    f = lr_lambda("linear", 0, 10)
    assert f(0) == 1.0 and f(10) == 0.0


def test_seeds_make_runs_reproducible():
    a = train(prepare_run(cfg(steps=5)))
    b = train(prepare_run(cfg(steps=5)))
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


@pytest.mark.parametrize("model,task,head", [("tiny-bert", "classification", True), ("tiny-llama", "causal_lm", False)])
def test_trained_lora_is_written_in_peft_format(tmp_path, model, task, head):
    prep = prepare_run(cfg(model, task, steps=3))
    train(prep)
    save_adapter(prep, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8
    assert conf["task_type"] == ("SEQ_CLS" if head else "CAUSAL_LM")
    assert conf["base_model_name_or_path"] == model
    assert set(conf["target_modules"]) == ({"query", "value"} if head else {"q_proj", "v_proj"})
    assert "run_config" not in conf   # our metadata is in its own file
    meta = json.loads((tmp_path / "peft_studio.json").read_text())
    assert meta["method"] == "lora" and meta["run_config"]["model"] == model
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert any(k.startswith("base_model.model.") and k.endswith(".lora_A.weight") for k in keys)
    assert ("base_model.model.classifier.weight" in keys) == head

"""A few end-to-end checks on the bundled real models."""

import pytest

from engine.config import parse_run_config
from engine.prepare import prepare_run
from engine.train import train


@pytest.mark.slow
def test_lora_on_minilm_learns_demo_sentiment():
    cfg = parse_run_config({
        "name": "minilm-lora", "model": "minilm", "task": "classification", "dataset": {"name": "demo-sentiment"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "training": {"max_steps": 40, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 4,
                     "max_seq_len": 48, "eval_every": 20}})
    prep = prepare_run(cfg)
    assert prep.n_params == 22_787_714 and prep.n_trainable == 74_498
    res = train(prep)
    first = sum(h["loss"] for h in res.history[:5]) / 5
    last = sum(h["loss"] for h in res.history[-5:]) / 5
    val = prep.examples.validation
    majority = max(sum(r["label"] == lab for r in val) for lab in prep.examples.labels) / len(val)
    assert last < first
    assert res.eval["accuracy"] > majority + 0.15, (res.eval, majority)


@pytest.mark.slow
def test_lora_on_smollm2_lowers_eval_loss():
    cfg = parse_run_config({
        "name": "smollm2-lora", "model": "smollm2-135m", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 8, "batch_size": 4, "learning_rate": 3e-3, "max_seq_len": 48,
                     "eval_every": 0, "eval_batches": 3, "eval_generate": 0}})
    prep = prepare_run(cfg)
    assert prep.n_trainable == 460_800
    from engine.train import evaluate, pick_device
    from engine.batching import encode_examples
    enc = encode_examples(prep.tokenizer, prep.examples.validation, "causal_lm", 48)
    before = evaluate(prep.model, enc, "causal_lm", 8, prep.tokenizer.pad_token_id, pick_device("cpu"), None, 3)
    res = train(prep)
    assert res.eval["eval_loss"] < before["eval_loss"] - 0.2, (before, res.eval)

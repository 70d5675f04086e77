"""Helpers of the method battery: the tiny random models of engine.models, with enough
blocks for every method's default config (LLaMA-Adapter adapts the top 8 by default)."""

from __future__ import annotations

import functools

import pytest
import torch

from engine.config import parse_run_config
from engine.methods import ApplyContext, count_parameters
from engine.models import TINY_MODELS, load_tokenizer, tiny_config
from engine.prepare import Prepared, apply_method

LAYERS = 8
# (tiny model, task): a decoder for causal LM and an encoder for classification
SETUPS = [("tiny-llama", "causal_lm"), ("tiny-bert", "classification")]
DATASETS = {"causal_lm": "demo-instruct", "classification": "demo-sentiment"}


@functools.lru_cache(maxsize=None)
def tokenizer(name: str):
    return load_tokenizer(name)


def base_model(name: str, task: str):
    """The same random tiny model every call (seeded), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = tokenizer(name)
    cfg = tiny_config(TINY_MODELS[name], vocab_size=len(tok), num_hidden_layers=LAYERS)
    if TINY_MODELS[name] == "llama":
        cfg.pad_token_id = tok.pad_token_id
    if task == "classification":
        cfg.num_labels = 2
    torch.manual_seed(0)
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    model = cls.from_config(cfg).float().eval()
    model.config.name_or_path = name
    return model


def run_config(spec, name: str, task: str):
    """A run config with the method's default settings."""
    return parse_run_config({"model": name, "task": task, "dataset": {"name": DATASETS[task]},
                             "method": {"name": spec.name}, "training": {"max_steps": 1, "seed": 0}})


# The refusals we expect, (method, tiny model) -> the start of the error: LLaMA-Adapter's
# gated prompts need Llama attention. A pair refused for another reason, or any other
# method refusing a model, is a failure: a method that wrongly starts refusing a model it
# supports must not lose its battery to a skip.
REFUSALS = {
    ("llama_adapter", "tiny-bert"): "method.name: llama_adapter needs a Llama-architecture model",
}


def prepare(spec, name: str, task: str) -> Prepared:
    """The method applied to the tiny model the way engine.prepare does it; a skip for the
    pairs in REFUSALS when the method refuses with the expected error."""
    cfg = run_config(spec, name, task)
    ctx = ApplyContext(task=task, seed=0, tokenizer=tokenizer(name))
    expected = REFUSALS.get((spec.name, name))
    try:
        model = apply_method(base_model(name, task), spec, cfg.method, ctx)
    except ValueError as e:
        if expected is not None and str(e).startswith(expected):
            pytest.skip(f"{spec.name} refuses {name}, as expected: {e}")
        raise
    assert expected is None, f"{spec.name} now accepts {name}: take the pair out of REFUSALS so the battery runs it"
    model.eval()
    n, t = count_parameters(model)
    return Prepared(cfg, model, tokenizer(name), None, spec, ctx, n, t)


def batch(name: str) -> dict:
    enc = tokenizer(name)(["the film was wonderful", "dull", "what is the capital of france"],
                          return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def logits(model, b: dict) -> torch.Tensor:
    model.eval()
    return model(**b).logits


@torch.no_grad()
def perturb_trainable(model, scale: float = 0.2, seed: int = 1) -> None:
    """Move every trainable tensor away from its initialisation (many start at an
    identity: zero B, zero gates, unit IA³ vectors), so the checks see a real adapter."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)

"""training.compile: every transformer block is compiled (engine.compile) and the run
trains exactly as in eager mode. The CPU suite compiles with the `aot_eager` backend
(dynamo's graph capture and AOT autograd, the parts that break on unsupported code,
without Inductor's C++ build, which takes minutes on two cores); the GPU check
measures Inductor."""

from __future__ import annotations

import pytest
import torch

from engine.arch import blocks
from engine.config import parse_run_config
from engine.prepare import prepare_run
from engine.train import train


def run(compile_: bool, method: dict):
    cfg = parse_run_config({
        "name": "compile", "model": "tiny-llama", "task": "causal_lm",
        "dataset": {"name": "demo-instruct", "max_rows": 48}, "method": method,
        "training": {"max_steps": 3, "batch_size": 4, "max_seq_len": 32, "eval_every": 0, "eval_batches": 1,
                     "eval_generate": 0, "packing": True, "compile": compile_}})
    prep = prepare_run(cfg)
    res = train(prep)
    return prep, res


@pytest.mark.slow     # a minute of graph capture on two cores
def test_compiled_blocks_train_like_eager(monkeypatch):
    method = {"name": "lora", "r": 4}
    monkeypatch.setenv("STUDIO_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    _, eager = run(False, method)
    prep, compiled = run(True, method)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks(prep.model))
    assert [h["loss"] for h in compiled.history] == pytest.approx([h["loss"] for h in eager.history], rel=1e-5)
    # the compiled module keeps its parameter names: the adapter exports as before
    assert any("lora_A" in n for n, p in prep.model.named_parameters() if p.requires_grad)


def test_cudagraphs_setting_parses_and_trains_on_cpu(monkeypatch):
    """`compile: cudagraphs` is accepted; on the CPU (no CUDA graphs) it trains as compiled."""
    monkeypatch.setenv("STUDIO_COMPILE_BACKEND", "aot_eager")
    from engine.config import ConfigError, parse_run_config as parse
    prep, res = run("cudagraphs", {"name": "lora", "r": 2})
    assert res.steps == 3 and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks(prep.model))
    with pytest.raises((ConfigError, ValueError), match="training.compile"):
        parse({"model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
               "method": {"name": "lora"}, "training": {"compile": "sometimes"}})


def test_eager_by_default():
    prep, _ = run(False, {"name": "lora", "r": 2})
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in blocks(prep.model))


def test_bucketed_padding_is_masked():
    from engine.batching import pad_to_multiple
    ids = torch.arange(1, 11).view(2, 5)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "position_ids": torch.arange(5).repeat(2, 1)}
    out = pad_to_multiple(batch, 4, pad_id=0)
    assert out["input_ids"].shape == (2, 8)
    assert out["input_ids"][:, 5:].eq(0).all() and out["attention_mask"][:, 5:].eq(0).all()
    assert out["labels"][:, 5:].eq(-100).all() and out["position_ids"][:, 5:].eq(0).all()
    assert torch.equal(out["input_ids"][:, :5], ids) and torch.equal(out["labels"][:, :5], ids)
    cls = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    assert torch.equal(pad_to_multiple(cls, 4, 0)["labels"], torch.tensor([0, 1]))
    assert pad_to_multiple(out, 4, 0) is out                 # already a multiple: untouched

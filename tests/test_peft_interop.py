"""Adapters we export load in the real `peft` package with the same outputs, and
peft-format adapters load back into the engine. peft is the reference here only
(tests and bench/); no product code imports it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import require  # noqa: E402

peft = require("peft")   # the test extra: missing, these tests fail (never skip)

from engine.adapters import (PEFT_CONFIG, METADATA, adapter_files, load_peft_adapter_into, merged_model_files,
                             write_dir_atomic)
from engine.config import parse_run_config
from engine.methods import ApplyContext, count_parameters, get_method
from engine.models import load_model
from engine.prepare import Prepared, apply_method

ATOL = 1e-5


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    m = GPT2LMHeadModel(cfg).float().eval()
    m.config.name_or_path = "tiny-gpt2"
    return m


def base_model(name: str, task: str):
    if name == "tiny-gpt2":
        return tiny_gpt2(), None
    lm = load_model(name, task)
    return lm.model, lm.tokenizer


def prepare(model, tok, method: dict, task: str, model_name: str = "tiny-llama") -> Prepared:
    cfg = parse_run_config({"model": model_name, "task": task, "dataset": {"name": "demo-sentiment"},
                            "method": method})
    spec = get_method(cfg.method.name)
    ctx = ApplyContext(task=task, seed=0)
    model = apply_method(model, spec, cfg.method, ctx)
    n, t = count_parameters(model)
    return Prepared(cfg, model, tok, None, spec, ctx, n, t)


@torch.no_grad()
def perturb_trainable(model, scale=0.2, seed=1):
    """Make the adapter non-trivial (B != 0, magnitudes and IA3 vectors != initial)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def inputs(vocab: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 11), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits(model, batch):
    model.eval()
    return model(**batch).logits.float()


def export_to(prep: Prepared, path) -> dict:
    files = adapter_files(prep)
    write_dir_atomic(path, files)
    return json.loads(files[PEFT_CONFIG])


def peft_logits(base, adapter_dir, batch):
    from peft import PeftModel
    pm = PeftModel.from_pretrained(base, str(adapter_dir))
    n_layers = sum(1 for _, m in pm.named_modules() if hasattr(m, "lora_A") or hasattr(m, "ia3_l"))
    assert n_layers > 0, "peft injected no adapter layers"
    return logits(pm, batch)


CASES = [
    # (id, model, task, method)
    ("lora-llama", "tiny-llama", "causal_lm", {"name": "lora", "r": 4, "alpha": 8}),
    ("lora-all-linear-llama", "tiny-llama", "causal_lm", {"name": "lora", "r": 4, "target_modules": "all-linear"}),
    ("rslora-llama", "tiny-llama", "causal_lm",
     {"name": "lora", "r": 4, "alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("pissa-llama", "tiny-llama", "causal_lm", {"name": "lora", "r": 4, "alpha": 4, "init": "pissa"}),
    ("pissa-rslora-llama", "tiny-llama", "causal_lm",
     {"name": "lora", "r": 4, "alpha": 4, "init": "pissa", "use_rslora": True}),
    ("rank-pattern-llama", "tiny-llama", "causal_lm",
     {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"],
      "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.up_proj": 6}, "alpha_pattern": {"q_proj": 3.0}}),
    ("random-rank-llama", "tiny-llama", "causal_lm",
     {"name": "lora", "r": 4, "target_modules": "all-linear", "random_rank": [1, 8], "random_rank_seed": 3}),
    ("dora-llama", "tiny-llama", "causal_lm", {"name": "dora", "r": 4, "alpha": 8}),
    ("ia3-llama", "tiny-llama", "causal_lm", {"name": "ia3"}),
    ("lora-bert", "tiny-bert", "classification", {"name": "lora", "r": 4, "alpha": 8}),
    ("lora-bert-dense", "tiny-bert", "classification",
     {"name": "lora", "r": 2, "target_modules": ["query", "output.dense"]}),
    ("dora-bert", "tiny-bert", "classification",
     {"name": "dora", "r": 4, "target_modules": ["query", "value", "intermediate.dense"]}),
    ("ia3-bert", "tiny-bert", "classification", {"name": "ia3"}),
    ("lora-llama-cls", "tiny-llama", "classification", {"name": "lora", "r": 4}),
    ("lora-gpt2", "tiny-gpt2", "causal_lm", {"name": "lora", "r": 4, "target_modules": ["c_attn", "c_fc"]}),
    ("dora-gpt2", "tiny-gpt2", "causal_lm", {"name": "dora", "r": 4}),
    ("ia3-gpt2", "tiny-gpt2", "causal_lm", {"name": "ia3"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_peft_loads_our_adapter_with_equal_outputs(case, tmp_path):
    _, name, task, method = case
    model, tok = base_model(name, task)
    pristine = copy.deepcopy(model)
    batch = inputs(model.config.vocab_size)
    base_out = logits(pristine, batch)
    prep = prepare(model, tok, method, task, name)
    perturb_trainable(prep.model)
    ours = logits(prep.model, batch)
    assert (ours - base_out).abs().max() > 1e-3, "the adapter is trivial; the test would prove nothing"
    cfg = export_to(prep, tmp_path)
    assert not ({"run_config", "method", "paper"} & set(cfg)), "our metadata leaked into adapter_config.json"
    assert (tmp_path / METADATA).exists()
    theirs = peft_logits(copy.deepcopy(pristine), tmp_path, batch)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)

    # ... and the engine imports the same files back with the same outputs
    back = load_peft_adapter_into(copy.deepcopy(pristine), tmp_path)
    if task == "classification":
        from engine.adapters import load_peft_tensors
        from safetensors.torch import load_file
        for p in back.parameters():
            p.requires_grad_(True)
        load_peft_tensors(back, {k: v for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()
                                 if ".classifier." in k or ".score." in k})
    torch.testing.assert_close(logits(back, batch), ours, atol=ATOL, rtol=0)


def test_qlora_exports_a_lora_that_peft_loads_on_the_dequantized_base(tmp_path):
    from engine.methods.qlora import dequantized_base
    model, tok = base_model("tiny-llama", "causal_lm")
    batch = inputs(model.config.vocab_size)
    prep = prepare(model, tok, {"name": "qlora", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                   "causal_lm")
    perturb_trainable(prep.model)
    ours = logits(prep.model, batch)
    deq = dequantized_base(prep.model)
    assert (logits(deq, batch) - ours).abs().max() > 1e-3
    cfg = export_to(prep, tmp_path)
    assert cfg["peft_type"] == "LORA"
    theirs = peft_logits(deq, tmp_path, batch)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_import_of_a_peft_made_lora_with_rank_pattern_and_dora(tmp_path):
    from peft import LoraConfig, get_peft_model
    model, _ = base_model("tiny-llama", "causal_lm")
    pristine = copy.deepcopy(model)
    batch = inputs(model.config.vocab_size)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                          rank_pattern={"gate_proj": 2}, use_rslora=True, use_dora=True))
    perturb_trainable(pm)
    theirs = logits(pm, batch)
    pm.save_pretrained(str(tmp_path))
    ours = load_peft_adapter_into(pristine, tmp_path)
    torch.testing.assert_close(logits(ours, batch), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", [
    {"name": "lora", "r": 4, "init": "pissa"}, {"name": "dora", "r": 4}, {"name": "ia3"},
    {"name": "qlora", "r": 4}, {"name": "adalora", "init_r": 4, "target_r": 2},
], ids=lambda m: m["name"] + ("-pissa" if m.get("init") else ""))
def test_merged_model_export_reloads_with_automodel(method, tmp_path):
    from transformers import AutoModelForSequenceClassification
    model, tok = base_model("tiny-bert", "classification")
    batch = inputs(model.config.vocab_size)
    prep = prepare(model, tok, method, "classification", "tiny-bert")
    perturb_trainable(prep.model, scale=0.05)
    ours = logits(prep.model, batch)
    out = merged_model_files(prep)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).float()
    # (merged qlora = the dequantized base plus the LoRA delta, in fp32)
    torch.testing.assert_close(logits(reloaded, batch), ours, atol=ATOL, rtol=0)
    assert (out / "tokenizer_config.json").exists()


def test_a_bf16_runs_adapter_loads_in_peft_on_a_bf16_base(tmp_path):
    """A LoRA trained under training.precision bf16 (bf16 frozen base, fp32 adapter)
    exports the same peft files as ever (fp32 tensors); peft loads them onto the base
    loaded in bf16 and, under the same autocast, gives our logits to bf16 precision."""
    from peft import PeftModel
    from engine.prepare import prepare_run
    from engine.train import train

    cfg = parse_run_config({
        "model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct", "max_rows": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "training": {"max_steps": 6, "batch_size": 8, "max_seq_len": 48, "learning_rate": 2e-2, "eval_every": 0,
                     "eval_batches": 1, "eval_generate": 0, "precision": "bf16", "device": "cpu"}})
    prep = prepare_run(cfg)
    train(prep)
    write_dir_atomic(tmp_path / "a", adapter_files(prep))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    assert any(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)   # it trained

    base = load_model("tiny-llama", "causal_lm", dtype=torch.bfloat16).model
    pm = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    prep.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = prep.model(input_ids=ids).logits.float()
        theirs = pm(input_ids=ids).logits.float()
    scale = ours.abs().max()
    assert (ours - theirs).abs().max() <= 2e-2 * scale
    with pm.disable_adapter(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        without = pm(input_ids=ids).logits.float()
    assert (ours - without).abs().max() > 10 * (ours - theirs).abs().max()   # the adapter is what matches

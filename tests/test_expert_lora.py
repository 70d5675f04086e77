"""LoRA on the 3-D expert tensors of mixture-of-experts models (`target_parameters`,
engine/methods/expert_lora.py) on tiny Mixtral and Qwen3-MoE: it trains (gradients reach
the expert LoRA, router and experts frozen), saves, reloads and merges with the same
logits; peft loads our adapter and we load peft's with the same logits (peft's layout:
nesting, A/B interleaving); the estimator's count and rows are exact (hidden states:
the experts' share measured as the change from attention-only LoRA); and the options
that have no meaning on an expert tensor are refused, naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.adapters import adapter_files, load_peft_adapter_into, save_adapter, write_dir_atomic
from engine.arch import arch_for_model_type
from engine.dims import dims_of_model
from engine.methods.expert_lora import ExpertLora, expert_delta
from engine.models import LoadedModel

from conftest import require
from test_arch_families import (base_model, batch, logits, perturb_trainable, prepare, reloads_the_same, tokenizer,
                                train_two_steps, within)

MOE = ["mixtral", "qwen3_moe"]
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATOL = 1e-5


def lora(**kw) -> dict:
    return {"name": "lora", "r": 4, "alpha": 8, "target_parameters": BOTH, **kw}


def expert_layers(model) -> dict[str, ExpertLora]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLora)}


@pytest.mark.parametrize("family", MOE)
def test_expert_lora_trains_saves_reloads_and_merges(family, tmp_path):
    prep = prepare(lora(), family)
    ex = arch_for_model_type(family).experts
    layers = expert_layers(prep.model)
    # peft's nesting: the module's first parameter (gate_up_proj) innermost, under base_layer
    assert {(n.split("layers.")[1], m.parameter_name) for n, m in layers.items()} == {
        (f"{i}.mlp.experts{'.base_layer' if p == 'gate_up_proj' else ''}", p)
        for i in range(2) for p in ("gate_up_proj", "down_proj")}
    trained = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trained), sorted(trained)
    assert any(".mlp.experts." in n for n in trained)
    frozen = [p for n, p in prep.model.named_parameters() if ex.router in n or n.endswith(("gate_up_proj", "down_proj"))]
    assert len(frozen) == 3 * 2 and not any(p.requires_grad for p in frozen)
    # the count from the config alone equals the built model's: r·E·(in+out) per expert tensor
    dims = dims_of_model(prep.model)
    assert prep.spec.count_trainable(dims, prep.config.method, prep.config.task) == prep.n_trainable
    assert sum(p.numel() for n, p in prep.model.named_parameters() if ".mlp.experts." in n and p.requires_grad) \
        == 2 * 4 * dims.num_experts * (2 * dims.hidden_size + 3 * dims.expert_intermediate_size)

    train_two_steps(prep)
    for layer in layers.values():
        assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_B.weight.abs().sum() > 0, "the expert LoRA trained"
    assert all(p.grad is None for p in frozen)
    b, trained_logits = reloads_the_same(prep, family, tmp_path)
    assert (trained_logits - logits(base_model(family), b)).abs().max() > 1e-3
    prep.spec.merge(prep.model)
    assert not expert_layers(prep.model)
    torch.testing.assert_close(logits(prep.model, b), trained_logits, atol=ATOL, rtol=0)


def test_the_update_is_each_experts_own_low_rank_product():
    """ΔW_e = s · B[:, e-th r-slice in peft's interleaving] @ A[e-th r rows], and a merge/unmerge round trip."""
    prep = prepare(lora(r=2, alpha=6), "mixtral")
    layer = next(iter(expert_layers(prep.model).values()))
    perturb_trainable(prep.model)
    E, r = layer.num_experts, layer.r
    a, bw = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    delta = layer.delta_weight()
    assert delta.shape == layer.param().shape
    for e in range(E):
        a_e = torch.stack([a[e * r + j] for j in range(r)])            # rows e·r .. e·r + r - 1
        b_e = torch.stack([bw[:, j * E + e] for j in range(r)], dim=1)  # columns j·E + e
        torch.testing.assert_close(delta[e], 3.0 * b_e @ a_e)
    torch.testing.assert_close(expert_delta(a, bw, E, 3.0), delta)
    w0 = layer.param().detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.param().detach(), w0 + delta)
    layer.unmerge()
    torch.testing.assert_close(layer.param().detach(), w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("method,written", [
    (lora(), sorted(BOTH)),
    (lora(r=2, target_parameters=["down_proj"], rank_pattern={"down_proj": 3}, use_rslora=True),
     ["mlp.experts.down_proj"]),
    (lora(target_parameters=["layers.1.mlp.experts.gate_up_proj"]), ["model.layers.1.mlp.experts.gate_up_proj"])],
    ids=["both", "down-rank_pattern-rslora", "one-block"])
def test_peft_loads_our_expert_adapter_with_the_same_logits(family, method, written, tmp_path):
    require("peft")
    from peft import PeftModel

    prep = prepare(method, family)
    perturb_trainable(prep.model)
    b = batch()
    ours = logits(prep.model, b)
    write_dir_atomic(tmp_path, adapter_files(prep))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == written
    pm = PeftModel.from_pretrained(base_model(family), str(tmp_path)).eval()
    # our tensors are peft's, key for key and shape for shape (its nesting and A/B layout)
    theirs = {"base_model.model." + k.removeprefix("base_model.model.").replace(".default", ""): tuple(v.shape)
              for k, v in pm.state_dict().items() if ".lora_" in k}
    assert {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()} == theirs
    torch.testing.assert_close(logits(pm, b), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", MOE)
def test_we_load_peft_s_expert_adapter_with_the_same_logits(family, tmp_path):
    require("peft")
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(base_model(family), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                       target_parameters=BOTH))
    perturb_trainable(pm)
    b = batch()
    theirs = logits(pm, b)
    pm.save_pretrained(str(tmp_path))
    ours = load_peft_adapter_into(base_model(family), tmp_path)
    assert len(expert_layers(ours)) == 4
    torch.testing.assert_close(logits(ours, b), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", MOE)
def test_qlora_adapts_the_unquantized_experts(family, tmp_path):
    prep = prepare({"name": "qlora", "r": 2, "target_parameters": ["gate_up_proj"]}, family)
    layers = expert_layers(prep.model)
    assert len(layers) == 2 and all(l.param().dtype == torch.float32 for l in layers.values())
    dims = dims_of_model(prep.model)
    assert prep.spec.count_trainable(dims, prep.config.method, prep.config.task) == prep.n_trainable
    train_two_steps(prep)
    reloads_the_same(prep, family, tmp_path)


@pytest.mark.parametrize("family", MOE)
def test_the_estimator_rows_are_exact_and_the_experts_share_is_measured(family):
    from engine.estimator import estimate
    from engine.measure import measure_prepared, prepare_for_measure, step_peak

    hidden = {}
    for key, method in (("attention", {"name": "lora", "r": 4}), ("experts", lora())):
        model = base_model(family)
        prep = prepare_for_measure("tiny-llama", method, task="causal_lm", attention="sdpa",
                                   loaded=LoadedModel(model, tokenizer(), family, 0.0))
        est = estimate(model.config.to_dict(), method, batch_size=4, seq_len=32, task="causal_lm", device="cpu",
                       dtype="fp32", attention="sdpa")
        assert est.n_trainable == prep.n_trainable
        sp = step_peak(prep, batch_size=4, seq_len=32)
        assert (est.rows["weights"], est.rows["gradients"], est.rows["optimizer"]) == \
            (sp.weights, sp.gradients, sp.optimizer)
        measured = measure_prepared(prep, batch_size=4, seq_len=32, backward=False).rows["hidden_states"]
        assert within(est.rows["hidden_states"], measured)
        hidden[key] = (est.rows["hidden_states"], measured)
    est_share = hidden["experts"][0] - hidden["attention"][0]
    measured_share = hidden["experts"][1] - hidden["attention"][1]
    assert measured_share > 0 and within(est_share, measured_share), (est_share, measured_share)


# ---- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,match", [
    (lora(target_parameters=["experts.up_proj"]), r"method\.target_parameters: 'experts\.up_proj' names no expert "
                                                  r"tensor of this mixtral model; candidates: mlp\.experts\.gate_up_proj"),
    (lora(target_parameters=["mlp.gate.weight"]), r"the router mlp\.gate stays frozen"),
    (lora(dropout=0.1), r"method\.dropout: must be 0 with target_parameters"),
    (lora(init="pissa"), r"method\.init: 'pissa' is not available with target_parameters"),
    (lora(target_parameters=[]), r"target_parameters"),
    ({"name": "dora", "target_parameters": BOTH}, r"method\.target_parameters: not available with dora"),
    ({"name": "adalora", "target_parameters": BOTH}, r"method\.target_parameters: not available with adalora"),
    ({"name": "ia3", "target_parameters": BOTH}, r"target_parameters"),
])
def test_expert_lora_refusals_name_the_field(method, match):
    with pytest.raises(ValueError, match=match):
        prepare(method, "mixtral")


def test_a_dense_model_has_no_expert_tensors_to_target():
    with pytest.raises(ValueError, match=r"method\.target_parameters: this llama model has no mixture-of-experts"):
        prepare(lora(), "llama")


def test_target_modules_naming_the_experts_points_to_target_parameters():
    with pytest.raises(ValueError, match=r"method\.target_modules: 'gate_up_proj' .* adapt the experts with "
                                         r"method\.target_parameters"):
        prepare({"name": "lora", "target_modules": ["gate_up_proj"]}, "qwen3_moe")


@pytest.mark.parametrize("family", ["mixtral"])
def test_the_adapter_bank_serves_an_expert_adapter_without_writing_the_base(family, tmp_path):
    """A view shares the base's expert tensors (ΔW is added in the forward, never into W) and
    decodes as the trained model does."""
    from engine.adapter_bank import AdapterBank
    from engine.generation import greedy_decode

    prep = prepare(lora(), family)
    perturb_trainable(prep.model)
    b = batch()
    trained = logits(prep.model, b)
    save_adapter(prep, tmp_path)
    base = base_model(family)
    base_experts = [p for n, p in base.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    before = [p.detach().clone() for p in base_experts]
    bank = AdapterBank(base, tokenizer(), "causal_lm")
    view = bank.attach("experts", prep.config, tmp_path)
    assert view.shares_base
    view_experts = {id(p) for n, p in view.model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}
    assert view_experts == {id(p) for p in base_experts}
    torch.testing.assert_close(logits(bank.view("experts"), b), trained, atol=ATOL, rtol=0)
    assert all(torch.equal(p, q) for p, q in zip(base_experts, before))
    prompts = ["the film was", "what is"]
    ours = greedy_decode(bank.view("experts"), tokenizer(), prompts, max_new_tokens=4, batch_size=2)
    assert ours == greedy_decode(prep.model, tokenizer(), prompts, max_new_tokens=4, batch_size=2)


@pytest.mark.parametrize("precision", ["bf16"])   # fp32 runs through every test above
def test_a_run_with_expert_lora_trains_through_the_run_path(precision, tmp_path):
    """From a model directory, through prepare_run and train: the loss moves and is finite
    (bf16: the expert tensors stay bf16, the LoRA factors train in fp32 and are cast to W's
    dtype for W + ΔW, as peft does)."""
    import math

    from engine.config import parse_run_config
    from engine.prepare import prepare_run
    from engine.train import train

    base_model("mixtral").save_pretrained(tmp_path / "m", safe_serialization=True)
    tokenizer().save_pretrained(tmp_path / "m")
    cfg = parse_run_config({"model": str(tmp_path / "m"), "task": "causal_lm",
                            "dataset": {"name": "demo-instruct", "max_rows": 16}, "method": lora(),
                            "training": {"max_steps": 2, "batch_size": 2, "max_seq_len": 16, "eval_every": 0,
                                         "eval_batches": 1, "eval_generate": 0, "precision": precision}})
    prep = prepare_run(cfg)
    layers = expert_layers(prep.model)
    assert len(layers) == 4
    wdt = torch.bfloat16 if precision == "bf16" else torch.float32
    assert all(l.param().dtype == wdt and l.lora_A.weight.dtype == torch.float32 for l in layers.values())
    res = train(prep)
    assert res.steps == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    assert all(l.lora_B.weight.abs().sum() > 0 for l in layers.values()), "the expert LoRA trained"

"""The LoRA family and the baselines: configs, layers, merges, NF4, AdaLoRA's
allocation and exact trainable-parameter counts from the config alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from engine.arch import head_modules
from engine.config import ConfigError, parse_run_config
from engine.dims import dims_from_config, dims_of_model
from engine.methods import ApplyContext, count_parameters, get_method, parse_method_config
from engine.methods.base import AdapterLayer, QuantizedLayer, WrapsBaseLayer
from engine.methods.targeting import TargetModulesError
from engine.models import load_model
from engine.prepare import apply_method

FAMILY = ["lora", "dora", "adalora", "qlora", "ia3", "bitfit", "ln_tuning", "full", "top_k"]


def tiny(name="tiny-llama", task="causal_lm"):
    return load_model(name, task).model


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()


def apply(model, method: dict, task="causal_lm"):
    cfg = parse_method_config(method)
    spec = get_method(cfg.name)
    return apply_method(model, spec, cfg, ApplyContext(task=task, seed=0)), spec, cfg


def batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def out(model, b):
    model.eval()
    return model(**b).logits


@torch.no_grad()
def perturb(model, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---- registry and configs ------------------------------------------------------------------------

def test_every_family_method_is_registered_with_a_paper_and_a_count():
    for name in FAMILY:
        spec = get_method(name)
        assert spec.paper and spec.count_trainable is not None, name
        assert "arXiv" in spec.paper or name == "full"
        assert spec.config_cls.model_config.get("extra") == "forbid"
    assert get_method("full").trains_head is False


@pytest.mark.parametrize("method", [{"name": m} for m in FAMILY])
def test_each_method_is_selectable_in_a_run_config(method):
    cfg = parse_run_config({"model": "tiny-bert", "dataset": {"name": "demo-sentiment"}, "method": method})
    assert cfg.method.name == method["name"]


@pytest.mark.parametrize("method,field", [
    ({"name": "lora", "r": 0}, "method.r"),
    ({"name": "lora", "rank": 8}, "method.rank"),
    ({"name": "lora", "dropout": 1.5}, "method.dropout"),
    ({"name": "lora", "init": "xavier"}, "method.init"),
    ({"name": "lora", "random_rank": [8, 2]}, "method.random_rank"),
    ({"name": "lora", "rank_pattern": {"q_proj": 0}}, "method.rank_pattern"),
    ({"name": "adalora", "init_r": 4, "target_r": 8}, "method"),
    ({"name": "qlora", "compute_dtype": "fp8"}, "method.compute_dtype"),
    ({"name": "top_k", "k": 0}, "method.k"),
    ({"name": "ia3", "extra": 1}, "method.extra"),
])
def test_bad_method_values_are_rejected_naming_the_field(method, field):
    with pytest.raises(ConfigError) as e:
        parse_run_config({"model": "tiny-bert", "dataset": {"name": "demo-sentiment"}, "method": method})
    assert field in str(e.value)


def test_unknown_target_module_lists_candidates():
    with pytest.raises(TargetModulesError) as e:
        apply(tiny(), {"name": "lora", "target_modules": ["q_proj", "query"]})
    assert "'query'" in str(e.value) and "v_proj" in str(e.value)


def test_bitfit_on_llama_adds_zero_biases():
    m, _, _ = apply(tiny(), {"name": "bitfit"})
    added = [p for n, p in m.named_parameters() if p.requires_grad]
    assert added and all(n.endswith("_proj.bias") for n, p in m.named_parameters() if p.requires_grad)
    assert all((p == 0).all() for p in added)


def test_top_k_larger_than_the_model_is_an_error():
    with pytest.raises(ValueError, match="method.k"):
        apply(tiny(), {"name": "top_k", "k": 3})


# ---- LoRA layers ---------------------------------------------------------------------------------

def test_lora_scaling_rslora_and_initialisations():
    m, _, _ = apply(tiny(), {"name": "lora", "r": 4, "alpha": 8, "use_rslora": True})
    layer = m.model.layers[0].self_attn.q_proj
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    m, _, _ = apply(tiny(), {"name": "lora", "r": 4, "alpha": 8, "init": "gaussian"})
    a = m.model.layers[0].self_attn.q_proj.lora_A.weight
    assert a.std().item() == pytest.approx(1 / 4, rel=0.35)


def test_pissa_keeps_the_output_and_starts_from_the_principal_subspace():
    base = tiny()
    b = batch(base.config.vocab_size)
    ref = out(base, b)
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    m, _, _ = apply(base, {"name": "lora", "r": 4, "alpha": 4, "init": "pissa"})
    torch.testing.assert_close(out(m, b), ref, atol=1e-5, rtol=0)
    layer = m.model.layers[0].self_attn.q_proj
    _, s, _ = torch.linalg.svd(w)
    sv = torch.linalg.svdvals(layer.delta_weight())
    torch.testing.assert_close(sv[:4], s[:4], atol=1e-4, rtol=1e-4)
    assert sv[4:].max() < 1e-4


@pytest.mark.parametrize("model_fn,method", [
    (tiny, {"name": "lora", "r": 4, "target_modules": "all-linear"}),
    (tiny, {"name": "dora", "r": 4}),
    (tiny, {"name": "ia3"}),
    (tiny, {"name": "adalora", "init_r": 4, "target_r": 2}),
    (tiny, {"name": "qlora", "r": 4}),
    (tiny_gpt2, {"name": "lora", "r": 4, "target_modules": ["c_attn", "c_proj"]}),
    (tiny_gpt2, {"name": "dora", "r": 4}),
    (tiny_gpt2, {"name": "ia3"}),
], ids=["lora", "dora", "ia3", "adalora", "qlora", "lora-gpt2", "dora-gpt2", "ia3-gpt2"])
def test_merge_gives_the_unmerged_outputs_and_unmerge_restores(model_fn, method):
    m, spec, _ = apply(model_fn(), method)
    perturb(m)
    b = batch(m.config.vocab_size)
    before = out(m, b)
    layers = [x for _, x in m.named_modules() if isinstance(x, AdapterLayer)]
    assert layers
    for x in layers:
        x.merge()
    torch.testing.assert_close(out(m, b), before, atol=1e-5, rtol=0)
    for x in layers:
        x.unmerge()
    torch.testing.assert_close(out(m, b), before, atol=1e-5, rtol=0)
    spec.merge(m)
    assert not any(isinstance(x, (WrapsBaseLayer, QuantizedLayer)) for x in m.modules())
    torch.testing.assert_close(out(m, b), before, atol=1e-5, rtol=0)


def test_gpt2_conv1d_is_targeted_with_fan_in_fan_out():
    m, _, _ = apply(tiny_gpt2(), {"name": "lora", "r": 2, "target_modules": "all-linear"})
    layer = m.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_A.weight.shape == (2, 32) and layer.lora_B.weight.shape == (96, 2)


def test_random_rank_is_reproducible_from_seed_and_range():
    cfg = {"name": "lora", "target_modules": "all-linear", "random_rank": [1, 16], "random_rank_seed": 7}
    r1 = {n: x.r for n, x in apply(tiny(), cfg)[0].named_modules() if hasattr(x, "lora_A")}
    r2 = {n: x.r for n, x in apply(tiny(), cfg)[0].named_modules() if hasattr(x, "lora_A")}
    r3 = {n: x.r for n, x in apply(tiny(), {**cfg, "random_rank_seed": 8})[0].named_modules() if hasattr(x, "lora_A")}
    assert r1 == r2 and r1 != r3
    assert all(1 <= r <= 16 for r in r1.values()) and len(set(r1.values())) > 2


def test_inject_lora_is_reusable_on_any_named_linear():
    from engine.methods.lora import LoraLinear, inject_lora
    m = tiny()
    got = inject_lora(m, ["model.layers.1.mlp.up_proj"], r=2, alpha=4, dropout=0.1)
    assert isinstance(got["model.layers.1.mlp.up_proj"], LoraLinear)
    assert isinstance(m.model.layers[1].mlp.up_proj, LoraLinear)


# ---- DoRA, IA3 -----------------------------------------------------------------------------------

def test_dora_starts_at_the_base_model_and_magnitude_is_the_row_norm():
    base = tiny()
    b = batch(base.config.vocab_size)
    ref = out(base, b)
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    m, _, _ = apply(base, {"name": "dora", "r": 4})
    torch.testing.assert_close(out(m, b), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.model.layers[0].self_attn.q_proj.lora_magnitude_vector.detach(), w.norm(dim=1))


def test_ia3_scales_keys_values_and_ffn_input():
    m, _, _ = apply(tiny(), {"name": "ia3"})
    layer = m.model.layers[0]
    assert layer.self_attn.k_proj.ia3_l.shape == (16, 1) and not layer.self_attn.k_proj.is_feedforward
    assert layer.mlp.down_proj.ia3_l.shape == (1, 64) and layer.mlp.down_proj.is_feedforward
    assert not hasattr(layer.self_attn.q_proj, "ia3_l")


# ---- QLoRA / NF4 ---------------------------------------------------------------------------------

def test_nf4_code_values_and_packing():
    from engine.methods.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4
    assert len(NF4_CODE) == 16 and NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    w = torch.tensor(NF4_CODE * 4).view(2, 32) * 3.0     # exactly representable: absmax 3 in every block
    qs = quantize_nf4(w, double_quant=False)
    assert qs.packed.dtype == torch.uint8 and qs.packed.numel() == w.numel() // 2
    torch.testing.assert_close(dequantize_nf4(qs), w)


def test_nf4_bits_per_parameter_and_error_is_small():
    from engine.methods.nf4 import quantization_error
    torch.manual_seed(0)
    w = torch.randn(512, 1024) * 0.02
    dq = quantization_error(w, double_quant=True)
    no = quantization_error(w, double_quant=False)
    assert 4.0 < dq["bits_per_param"] <= 4.13
    assert 4.0 < no["bits_per_param"] <= 4.5
    assert dq["relative_fro_error"] < 0.12 and no["relative_fro_error"] < 0.12
    assert dq["max_abs_error"] < 0.02


def test_qlora_stores_4bit_weights_counts_them_and_trains_on_cpu():
    m = tiny()
    n0, _ = count_parameters(m)
    m, spec, cfg = apply(m, {"name": "qlora", "r": 4})
    from engine.methods.qlora import NF4Linear, quantization_report
    q = [x for x in m.modules() if isinstance(x, NF4Linear)]
    assert len(q) == 14 and all(x.weight.dtype == torch.uint8 for x in q)
    total, trainable = count_parameters(m)
    assert total == n0 + trainable          # the NF4 weights count as the parameters they stand for
    rep = quantization_report(m)
    assert rep["total"]["numel"] == sum(x.in_features * x.out_features for x in q)
    assert 0 < rep["total"]["rmse"] < 0.05
    b = batch(m.config.vocab_size)
    m.train()
    loss = m(**b, labels=b["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def file_mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process that map `path`."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == str(path):
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_qlora_keeps_no_tensor_in_the_weights_file_mapping(tmp_path):
    """The fp32 weights quantized away must not stay resident through the safetensors
    mapping that the embedding (or any other tensor left in it) keeps alive."""
    d = tmp_path / "tiny"
    lm = load_model("tiny-llama", "causal_lm")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    weights = (d / "model.safetensors").resolve()
    from transformers import AutoModelForCausalLM

    def in_mapping(t):
        return any(lo <= t.data_ptr() < hi for lo, hi in file_mapped_ranges(weights))
    # transformers' from_pretrained does map the file (else this test would prove nothing)
    ref = AutoModelForCausalLM.from_pretrained(d)
    assert any(in_mapping(p) for p in ref.parameters())
    # with qlora applied to it, own_unquantized_tensors copies what stayed in the mapping out
    ref, _, _ = apply(ref, {"name": "qlora", "r": 4})
    assert not [n for n, t in list(ref.named_parameters()) + list(ref.named_buffers()) if in_mapping(t)]
    # engine.models streams the file (engine.loading): nothing is in the mapping from the start
    m = load_model(str(d), "causal_lm", allowed_roots=[tmp_path]).model
    assert not [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if in_mapping(t)]
    m, _, _ = apply(m, {"name": "qlora", "r": 4})
    assert not [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if in_mapping(t)]
    b = batch(m.config.vocab_size)
    assert torch.isfinite(out(m, b)).all()


def test_qlora_keeps_each_nf4_tensor_once():
    """The NF4 data of a layer is held by its weight and absmax only: its quantization
    state keeps empty placeholders, not views pinning another copy (which held 55 MB
    on SmolLM2)."""
    from engine.methods.qlora import NF4Linear
    m, _, _ = apply(tiny(), {"name": "qlora", "r": 4})
    layers = [mod for mod in m.modules() if isinstance(mod, NF4Linear)]
    assert layers
    for layer in layers:
        assert layer.qstate.packed.untyped_storage().nbytes() == 0
        assert layer.qstate.absmax.untyped_storage().nbytes() == 0
        assert layer.weight.untyped_storage().nbytes() == layer.weight.numel()   # 2 codes per byte, no more


def test_qlora_bf16_compute():
    m, _, _ = apply(tiny(), {"name": "qlora", "r": 4, "compute_dtype": "bf16"})
    b = batch(m.config.vocab_size)
    assert torch.isfinite(out(m, b)).all()


# ---- AdaLoRA -------------------------------------------------------------------------------------

def test_adalora_hooks_mask_ranks_down_to_the_target_budget():
    from engine.methods.adalora import rank_summary
    m, spec, cfg = apply(tiny(), {"name": "adalora", "init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2,
                                  "deltaT": 1, "orth_reg_weight": 0.1})
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    b = batch(m.config.vocab_size)
    total = 8
    m.train()
    for step in range(total):
        loss = m(**b, labels=b["input_ids"]).loss + spec.extra_loss(m)
        loss.backward()
        spec.after_backward(m, step, total)
        opt.step()
        opt.zero_grad()
        spec.after_step(m, step, total)
        if step == 0:
            assert sum(rank_summary(m).values()) == 6 * 4     # warm-up: full budget
    ranks = rank_summary(m)
    assert sum(ranks.values()) == 2 * len(ranks)
    assert spec.extra_loss(m).item() > 0


# ---- exact trainable counts ----------------------------------------------------------------------

COUNT_METHODS = [
    {"name": "lora", "r": 8},
    {"name": "lora", "r": 4, "target_modules": "all-linear", "rank_pattern": {"v_proj|value": 2}},
    {"name": "lora", "r": 4, "target_modules": "all-linear", "random_rank": [1, 12], "random_rank_seed": 5},
    {"name": "lora", "r": 2, "target_modules": r".*\.(q_proj|query|down_proj|output\.dense)"},
    {"name": "lora", "r": 3, "use_rslora": True, "target_modules": r".*(k_proj|up_proj|key|intermediate\.dense)"},
    {"name": "dora", "r": 4},
    {"name": "adalora", "init_r": 6, "target_r": 2},
    {"name": "qlora", "r": 4, "target_modules": "all-linear"},
    {"name": "ia3"},
    {"name": "bitfit"},
    {"name": "ln_tuning"},
    {"name": "full"},
    {"name": "top_k", "k": 1},
]


def expected_count(model, spec, cfg, task):
    n = spec.count_trainable(dims_of_model(model), cfg, task)
    if task == "classification" and spec.trains_head:
        n += sum(p.numel() for _, h in head_modules(model) for p in h.parameters())
    return n


def method_id(m):
    return "-".join(str(v) for v in m.values())[:40]


@pytest.mark.parametrize("model_name,task", [("tiny-llama", "causal_lm"), ("tiny-llama", "classification"),
                                             ("tiny-bert", "classification")])
@pytest.mark.parametrize("method", COUNT_METHODS, ids=method_id)
def test_trainable_count_from_config_equals_the_engine(model_name, task, method):
    m, spec, cfg = apply(tiny(model_name, task), method, task)
    assert count_parameters(m)[1] == expected_count(m, spec, cfg, task)


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "target_modules": "all-linear"}, {"name": "dora"},
                                    {"name": "ia3"}, {"name": "bitfit"}, {"name": "full"}, {"name": "ln_tuning"},
                                    {"name": "top_k", "k": 1}], ids=method_id)
def test_trainable_count_gpt2(method):
    m, spec, cfg = apply(tiny_gpt2(), method)
    assert count_parameters(m)[1] == expected_count(m, spec, cfg, "causal_lm")


def test_full_count_is_the_whole_model():
    m, spec, cfg = apply(tiny("tiny-bert", "classification"), {"name": "full"}, "classification")
    total, trainable = count_parameters(m)
    assert total == trainable == spec.count_trainable(dims_of_model(m), cfg, "classification")


LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "intermediate_size": 11008, "vocab_size": 32000}


def test_llama2_7b_anchor():
    spec, cfg = get_method("lora"), parse_method_config({"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]})
    assert spec.count_trainable(dims_from_config(LLAMA2_7B), cfg, "causal_lm") == 4_194_304


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
                                    {"name": "dora", "r": 8}, {"name": "ia3"}, {"name": "ln_tuning"},
                                    {"name": "top_k", "k": 2}, {"name": "full"},
                                    {"name": "lora", "target_modules": "all-linear", "random_rank": [2, 16]}],
                         ids=method_id)
def test_counts_on_smollm2(method):
    m, spec, cfg = apply(load_model("smollm2-135m", "causal_lm").model, method)
    assert count_parameters(m)[1] == expected_count(m, spec, cfg, "causal_lm")
    if method == {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}:
        assert count_parameters(m)[1] == 460_800


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "lora", "r": 8}, {"name": "adalora"}, {"name": "ia3"},
                                    {"name": "bitfit"}, {"name": "full"}, {"name": "qlora", "r": 8}],
                         ids=method_id)
def test_counts_on_minilm(method):
    m, spec, cfg = apply(load_model("minilm", "classification").model, method, "classification")
    assert count_parameters(m)[1] == expected_count(m, spec, cfg, "classification")

"""Compacter / Compacter++ (engine.methods.compacter) and UniPELT (engine.methods.unipelt)
on the tiny random models (hidden 32, 2 layers): exact counts, the shared PHM rule,
Compacter++'s FFN-only placement, UniPELT's input-dependent gates, training, saving,
generation, and clear errors. The method battery (tests/methods) covers the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.adapters import load_own_adapter, save_adapter
from engine.arch import head_modules
from engine.config import ConfigError, parse_run_config
from engine.dims import dims_from_config, dims_of_model
from engine.methods import ApplyContext, count_parameters, get_method, parse_method_config
from engine.methods.compacter import RULE_ATTR, PHMLinear
from engine.methods.unipelt import Gate, GatedLoraLinear, GatedSerialAdapter
from engine.models import load_model, minilm_dir
from engine.prepare import Prepared, apply_method
from engine.loss import compute_loss
from method_helpers import TEXTS, assert_cached_greedy_matches_uncached, head_count, logits, perturb_trainable
from method_helpers import fixed_batch as shared_batch

COMBOS = [("tiny-llama", "causal_lm"), ("tiny-bert", "classification")]


def prepared(model_name: str, task: str, method: dict, seed: int = 0) -> Prepared:
    ds = "demo-sentiment" if task == "classification" else "demo-instruct"
    cfg = parse_run_config({"model": model_name, "task": task, "dataset": {"name": ds}, "method": method,
                            "training": {"max_steps": 1, "seed": seed}})
    lm = load_model(model_name, task, seed=0)
    spec = get_method(method["name"])
    ctx = ApplyContext(task=task, seed=seed, tokenizer=lm.tokenizer)
    model = apply_method(lm.model, spec, cfg.method, ctx)
    n, t = count_parameters(model)
    return Prepared(cfg, model, lm.tokenizer, None, spec, ctx, n, t)


def fixed_batch(tok, task: str, texts=None, special: bool = True) -> dict:
    texts = texts or TEXTS
    return shared_batch(tok, task, texts, special, labels=[1] * len(texts))


# ---- exact counts ------------------------------------------------------------------------------------

COUNT_CONFIGS = [
    {"name": "compacter"},
    {"name": "compacter", "variant": "compacter++"},
    {"name": "compacter", "n": 2, "phm_rank": 3, "bottleneck_size": 8, "layers": [1]},
    {"name": "compacter", "n": 8, "bottleneck_size": 16, "train_layernorm": False, "activation": "gelu"},
    {"name": "unipelt"},
    {"name": "unipelt", "prefix": False, "r": 4},
    {"name": "unipelt", "lora": False, "adapter": False, "num_virtual_tokens": 3, "prefix_projection": False},
    {"name": "unipelt", "lora": False, "prefix": False, "bottleneck_size": 6,
     "target_modules": ["q_proj", "k_proj", "v_proj"]},
]


@pytest.mark.parametrize("model_name,task", COMBOS)
@pytest.mark.parametrize("method", COUNT_CONFIGS, ids=lambda m: json.dumps(m, sort_keys=True))
def test_count_from_config_equals_real_parameters(method, model_name, task):
    if "target_modules" in method and model_name == "tiny-bert":
        method = {**method, "target_modules": ["query", "key", "value"]}
    prep = prepared(model_name, task, method)
    expected = prep.spec.count_trainable(dims_of_model(prep.model), prep.config.method, task)
    assert prep.n_trainable == expected + head_count(prep.model, task)
    # and by hand, for the default compacter on the tiny model: hidden 32, width 32/8 = 4, n = 4, rank 1
    if method == {"name": "compacter"}:
        per_adapter = (1 * (32 + 4) + 4) + (1 * (4 + 32) + 32)
        norms = 2 * 32 * (2 if model_name == "tiny-bert" else 1)
        assert expected == 4 ** 3 + 2 * (2 * per_adapter + norms)


BUNDLED = {
    "minilm": (lambda: json.loads((minilm_dir() / "config.json").read_text()), "classification"),
    "smollm2-135m": (lambda: json.loads((Path(__file__).resolve().parents[1] / "engine" / "catalog" /
                                         "smollm2-135m.json").read_text()), "causal_lm"),
}


@pytest.mark.parametrize("bundled", list(BUNDLED))
@pytest.mark.parametrize("method", [{"name": "compacter"}, {"name": "compacter", "variant": "compacter++"},
                                    {"name": "unipelt"}], ids=["compacter", "compacter++", "unipelt"])
def test_count_on_bundled_configs(method, bundled):
    """The bundled models' real shapes (meta tensors: no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    load, task = BUNDLED[bundled]
    cfg = load()
    clean = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    config = AutoConfig.for_model(cfg["model_type"], **clean)
    config.num_labels = 2
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    spec = get_method(method["name"])
    mcfg = parse_method_config(method)
    model = apply_method(model, spec, mcfg, ApplyContext(task=task))
    _, trainable = count_parameters(model)
    assert trainable == spec.count_trainable(dims_from_config(cfg), mcfg, task) + head_count(model, task)


# ---- Compacter -------------------------------------------------------------------------------------------

def test_phm_weight_is_a_sum_of_kronecker_products():
    prep = prepared("tiny-llama", "causal_lm", {"name": "compacter", "phm_rank": 2})
    perturb_trainable(prep.model)
    layer = next(m for m in prep.model.modules() if isinstance(m, PHMLinear))
    a = layer.rule.weight
    want = sum(torch.kron(a[i], layer.phm_s[i] @ layer.phm_t[i].T) for i in range(a.shape[0]))
    torch.testing.assert_close(layer.phm_weight(), want)
    assert layer.phm_weight().shape == (layer.out_features, layer.in_features)


def test_phm_backward_rebuilds_the_weight_with_exact_gradients():
    """The custom backward (W rebuilt, not kept) gives autograd's gradients of x W^T + b."""
    from engine.methods.compacter import PHMLinearFunction, phm_weight

    g = torch.Generator().manual_seed(0)
    x, rule = torch.randn(2, 3, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, 2, generator=g,
                                                                                   dtype=torch.float64)
    s, t = torch.randn(2, 3, 2, generator=g, dtype=torch.float64), torch.randn(2, 4, 2, generator=g,
                                                                               dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    args = [v.requires_grad_(True) for v in (x, rule, s, t, bias)]
    assert torch.autograd.gradcheck(PHMLinearFunction.apply, args)
    out = PHMLinearFunction.apply(*args)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, phm_weight(rule, s, t), bias))


@pytest.mark.parametrize("name", ["compacter", "unipelt"])
def test_a_step_under_bf16_autocast(name):
    """The training loop's mixed precision (bf16 autocast; CPU here, CUDA on GPUs): fp32
    parameters, bf16 activations, finite gradients for every trainable tensor."""
    prep = prepared("tiny-llama", "causal_lm", {"name": name})
    model = prep.model
    perturb_trainable(model, scale=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_loss(model, fixed_batch(prep.tokenizer, "causal_lm"), "causal_lm")
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for _, p in params), [n for n, p in params if p.grad is None]


@pytest.mark.parametrize("model_name,task", COMBOS)
def test_the_slow_weights_are_one_tensor_shared_by_every_layer(model_name, task):
    prep = prepared(model_name, task, {"name": "compacter"})
    model = prep.model
    phm = [m for m in model.modules() if isinstance(m, PHMLinear)]
    assert len(phm) == 2 * 2 * 2            # 2 blocks x (attention, FFN) x (down, up)
    shared = getattr(model, RULE_ATTR).weight
    assert all(m.rule.weight is shared for m in phm)
    names = [n for n, p in model.named_parameters() if p is shared]
    assert names == [f"{RULE_ATTR}.weight"]
    # one tensor: a gradient from every layer lands in it
    perturb_trainable(model)
    compute_loss(model, fixed_batch(prep.tokenizer, task), task).backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0


@pytest.mark.parametrize("model_name,task", COMBOS)
def test_compacter_plus_plus_only_touches_the_ffn(model_name, task):
    prep = prepared(model_name, task, {"name": "compacter", "variant": "compacter++"})
    model = prep.model
    ffn_out = "mlp.down_proj" if model_name == "tiny-llama" else "output.dense"
    ffn_norm = "post_attention_layernorm" if model_name == "tiny-llama" else "output.LayerNorm"
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "SerialAdapter"]
    assert len(wrapped) == 2 and all(n.endswith(ffn_out) for n in wrapped)
    heads = {n for n, h in head_modules(model)}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad
                 and not any(n.startswith(h + ".") for h in heads)]
    assert trainable
    for n in trainable:
        assert n == f"{RULE_ATTR}.weight" or f".{ffn_out}." in n or f".{ffn_norm}." in n, n
    # plain compacter adapts the attention output too
    full = prepared(model_name, task, {"name": "compacter"})
    assert sum(type(m).__name__ == "SerialAdapter" for m in full.model.modules()) == 4


def test_an_adapter_starts_as_the_identity():
    lm = load_model("tiny-llama", "causal_lm", seed=0)
    batch = fixed_batch(lm.tokenizer, "causal_lm")
    before = logits(lm.model, batch)
    prep = prepared("tiny-llama", "causal_lm", {"name": "compacter"})
    torch.testing.assert_close(logits(prep.model, batch), before)


def test_n_must_divide_the_sizes():
    with pytest.raises(ValueError, match=r"method\.n"):
        prepared("tiny-llama", "causal_lm", {"name": "compacter", "n": 3})        # 3 does not divide 32
    with pytest.raises(ValueError, match=r"method\.n"):
        prepared("tiny-bert", "classification", {"name": "compacter", "bottleneck_size": 6})   # n = 4
    with pytest.raises(ConfigError, match=r"method\.n"):
        parse_run_config({"model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
                          "method": {"name": "compacter", "n": 4, "bottleneck_size": 6}})
    with pytest.raises(ConfigError, match=r"method\.variant"):
        parse_run_config({"model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
                          "method": {"name": "compacter", "variant": "compacter+++"}})


# ---- UniPELT ---------------------------------------------------------------------------------------

def gate_values(model, batch) -> dict[str, torch.Tensor]:
    out = {}
    hooks = [m.register_forward_hook(lambda mod, args, res, name=n: out.__setitem__(name, res.detach()))
             for n, m in model.named_modules() if isinstance(m, Gate)]
    logits(model, batch)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("model_name,task", COMBOS)
def test_unipelt_gates_depend_on_the_input(model_name, task):
    prep = prepared(model_name, task, {"name": "unipelt"})
    model = prep.model
    kinds = {"lora": GatedLoraLinear, "adapter": GatedSerialAdapter}
    for kind, cls in kinds.items():
        assert sum(isinstance(m, cls) for m in model.modules()) == 2 * (2 if kind == "lora" else 1), kind
    perturb_trainable(model, scale=0.5)
    # no [CLS] in front: a decoder's prefix gate reads the first token, which must differ here
    a = gate_values(model, fixed_batch(prep.tokenizer, task, ["the film was wonderful", "dull"], special=False))
    b = gate_values(model, fixed_batch(prep.tokenizer, task, ["what is the capital", "two plus two"],
                                       special=False))
    assert len(a) == 2 * (2 + 1 + 1)         # per block: LoRA on q and v, the prefix, the adapter
    assert any(".studio_prefix_gate" in n for n in a)
    for name in a:
        assert ((a[name] > 0) & (a[name] < 1)).all(), name
        assert not torch.allclose(a[name], b[name]), f"{name} does not depend on the input"
    if task == "classification":     # encoder: one gate per example and sub-module, as in the paper
        assert all(v.shape[1:] == (1, 1) for v in a.values())
    else:                            # decoder: LoRA and adapter gates per token, the prefix gate per example
        seq = fixed_batch(prep.tokenizer, task, ["the film was wonderful", "dull"], special=False)["input_ids"]
        for name, v in a.items():
            assert v.shape[1] == (1 if "studio_prefix_gate" in name else seq.shape[1]), name


@pytest.mark.parametrize("model_name,task", COMBOS)
def test_all_three_sub_modules_and_their_gates_get_gradients(model_name, task):
    # a bottleneck of 8, not the default 32/16 = 2, whose two ReLUs can both be off after the perturbation
    prep = prepared(model_name, task, {"name": "unipelt", "bottleneck_size": 8})
    model = prep.model
    model.eval()
    # at the start LoRA's B is zero (so its A and gate get no gradient yet); B, the prefix and the adapter do
    compute_loss(model, fixed_batch(prep.tokenizer, task), task).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for part in ("lora_B", "studio_prefix.groups", "adapter.down", "adapter.up", "studio_prefix_gate",
                 "gate.linear"):
        assert any(part in n and g is not None and g.abs().sum() > 0 for n, g in grads.items()), part
    # away from the initialisation, every trainable tensor gets a gradient
    model.zero_grad()
    perturb_trainable(model, scale=0.2)
    compute_loss(model, fixed_batch(prep.tokenizer, task), task).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


@pytest.mark.parametrize("model_name,task", COMBOS)
def test_padding_does_not_change_an_example(model_name, task):
    """Pooled gates average over the real tokens only (the attention mask), so an example
    gives the same logits alone and padded in a batch with a longer one."""
    prep = prepared(model_name, task, {"name": "unipelt"})
    perturb_trainable(prep.model, scale=0.5)
    alone = logits(prep.model, fixed_batch(prep.tokenizer, task, ["dull"]))
    padded = logits(prep.model, fixed_batch(prep.tokenizer, task, ["dull", "the film was wonderful and moving"]))
    if task == "classification":
        torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=0)
    else:                           # right padding: the real positions come first
        torch.testing.assert_close(padded[:1, :alone.shape[1]], alone, atol=1e-5, rtol=0)


def test_a_closed_gate_switches_its_sub_module_off():
    prep = prepared("tiny-bert", "classification", {"name": "unipelt", "lora": False, "prefix": False})
    model = prep.model
    base = logits(load_model("tiny-bert", "classification", seed=0).model, fixed_batch(prep.tokenizer,
                                                                                       "classification"))
    for _, head in head_modules(model):
        head.requires_grad_(False)          # the head stays as the base model's
    perturb_trainable(model, scale=0.5)
    batch = fixed_batch(prep.tokenizer, "classification")
    assert not torch.allclose(logits(model, batch), base, atol=1e-4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Gate):
                m.linear.weight.zero_()
                m.linear.bias.fill_(-1e4)       # sigmoid -> 0
    torch.testing.assert_close(logits(model, batch), base, atol=1e-5, rtol=0)


def test_unipelt_generation_with_the_cache_matches_uncached_argmax():
    """Decoder gates look at no later token, so cached greedy decoding equals full forwards."""
    assert_cached_greedy_matches_uncached(prepared("tiny-llama", "causal_lm", {"name": "unipelt", "num_virtual_tokens": 3}))


def test_unipelt_needs_one_sub_module():
    with pytest.raises(ConfigError, match=r"method\.lora"):
        parse_run_config({"model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
                          "method": {"name": "unipelt", "lora": False, "prefix": False, "adapter": False}})


# ---- both methods: training, saving, merging, other architectures ---------------------------------------

@pytest.mark.parametrize("method,model_name,task", [
    ({"name": "compacter"}, "tiny-llama", "causal_lm"),
    ({"name": "compacter", "variant": "compacter++"}, "tiny-bert", "classification"),
    ({"name": "unipelt"}, "tiny-llama", "causal_lm"),
    ({"name": "unipelt"}, "tiny-bert", "classification"),
], ids=["compacter-llama", "compacter++-bert", "unipelt-llama", "unipelt-bert"])
def test_training_lowers_the_loss(method, model_name, task):
    prep = prepared(model_name, task, method)
    model = prep.model
    batch = fixed_batch(prep.tokenizer, task)
    if task == "classification":     # the method, not the head, must move the features
        for _, head in head_modules(model):
            head.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.eval()
    with torch.no_grad():
        first = compute_loss(model, batch, task).item()
    for _ in range(8):
        compute_loss(model, batch, task).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        last = compute_loss(model, batch, task).item()
    assert last < first - 1e-3, (first, last)


@pytest.mark.parametrize("method,model_name,task", [
    ({"name": "compacter"}, "tiny-bert", "classification"),
    ({"name": "compacter", "variant": "compacter++"}, "tiny-llama", "causal_lm"),
    ({"name": "unipelt", "lora_dropout": 0.1, "prefix_projection": False}, "tiny-llama", "causal_lm"),
], ids=["compacter-bert", "compacter++-llama", "unipelt-llama"])   # (the battery: each default on both)
def test_save_then_load_gives_identical_outputs(method, model_name, task, tmp_path):
    prep = prepared(model_name, task, method)
    perturb_trainable(prep.model)
    batch = fixed_batch(prep.tokenizer, task)
    ours = logits(prep.model, batch)
    save_adapter(prep, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()     # no peft format
    fresh = prepared(model_name, task, method, seed=5)
    assert not torch.allclose(logits(fresh.model, batch), ours)
    load_own_adapter(fresh.model, tmp_path)
    assert torch.equal(logits(fresh.model, batch), ours)
    if method["name"] == "compacter":                 # the shared rule came back into every layer
        rule = getattr(fresh.model, RULE_ATTR).weight
        assert all(m.rule.weight is rule for m in fresh.model.modules() if isinstance(m, PHMLinear))


@pytest.mark.parametrize("name", ["compacter", "unipelt"])
def test_specs_say_not_mergeable_and_no_peft_format(name):
    spec = get_method(name)
    assert not spec.mergeable and spec.merge is None and spec.peft_export is None
    assert "arXiv:" in spec.paper and spec.plan is not None and spec.count_trainable is not None


def test_gated_lora_refuses_to_merge():
    prep = prepared("tiny-llama", "causal_lm", {"name": "unipelt"})
    layer = next(m for m in prep.model.modules() if isinstance(m, GatedLoraLinear))
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge()


@pytest.mark.parametrize("name", ["compacter", "unipelt"])
def test_other_architectures_are_refused_clearly(name, monkeypatch):
    from dataclasses import replace

    from transformers import GPT2Config, GPT2LMHeadModel

    import engine.arch as arch_module

    # every family engine.arch describes has checked bottleneck adapters now (GPT-2 since it joined the
    # family battery): refuse a description without them
    monkeypatch.setitem(arch_module._BY_MODEL_TYPE, "gpt2", replace(arch_module.GPT2, bottleneck_adapters=False))
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100))
    spec = get_method(name)
    with pytest.raises(ValueError, match=rf"^method\.name: {name} does not support gpt2 models"):
        apply_method(model, spec, parse_method_config({"name": name}), ApplyContext(task="causal_lm"))

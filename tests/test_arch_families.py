"""The family battery: every registered method over a tiny random model of every family
engine.arch describes (2 blocks, hidden 32, built from the family's transformers config
class). Each cell either trains two steps, saves, reloads with the same outputs and
merges, or refuses with a message that names the field and the family; the peft-format
methods' adapters load in `peft` (the test-only reference) with the same logits; the
estimator's weights / gradients / optimizer rows are exact and its hidden states within
±10% of the CPU measure (engine.measure) for lora and full on every family (DeBERTa and
ModernBERT at a second shape: test_encoder_activations; GPT-2: test_gpt2_activations); GGUF export is refused, clearly,
where our exporter cannot write the architecture."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from engine.adapters import adapter_files, load_adapter, save_adapter
from engine.arch import ARCHS, arch_for_model_type, head_modules, model_type_of
from engine.config import parse_run_config
from engine.dims import dims_of_model
from engine.methods import ApplyContext, count_parameters
from engine.methods.registry import SPECS
from engine.models import LoadedModel, load_tokenizer, tiny_config
from engine.prepare import Prepared, apply_method

from conftest import require

# about 550 cells: 3 min on this 2-core machine when quiet, 25 min while four sessions shared it
pytestmark = pytest.mark.slow

FAMILIES = [a.family for a in ARCHS if a.config_class and a.tiny]
DATASETS = {"causal_lm": "demo-instruct", "classification": "demo-sentiment"}
ATOL = 1e-5


def task_of(family: str) -> str:
    return "classification" if arch_for_model_type(family).is_encoder else "causal_lm"


@functools.lru_cache(maxsize=None)
def tokenizer():
    return load_tokenizer("tiny-bert")


def base_model(family: str):
    """The same random tiny model of `family` every call (a copy of one seeded build), fp32, eval mode."""
    return copy.deepcopy(_pristine(family))


@functools.lru_cache(maxsize=None)
def _pristine(family: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task = task_of(family)
    cfg = tiny_config(family, vocab_size=len(tokenizer()))
    cfg.pad_token_id = tokenizer().pad_token_id
    if task == "classification":
        cfg.num_labels = 2
    torch.manual_seed(0)
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation="eager").float().eval()
    model.config.name_or_path = f"tiny-{family}"
    return model


def run_config(method: dict, family: str):
    task = task_of(family)
    return parse_run_config({"model": "tiny-llama", "task": task, "dataset": {"name": DATASETS[task]},
                             "method": method, "training": {"max_steps": 2, "seed": 0}})


def prepare(method: dict, family: str) -> Prepared:
    cfg = run_config(method, family)
    ctx = ApplyContext(task=cfg.task, seed=0, tokenizer=tokenizer())
    spec_name = cfg.method.name
    from engine.methods import get_method

    spec = get_method(spec_name)
    model = apply_method(base_model(family), spec, cfg.method, ctx)
    model.eval()
    n, t = count_parameters(model)
    return Prepared(cfg, model, tokenizer(), None, spec, ctx, n, t)


def batch() -> dict:
    enc = tokenizer()(["the film was wonderful", "dull", "what is the capital of france"],
                      return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def logits(model, b: dict) -> torch.Tensor:
    model.eval()
    return model(**b).logits.float()


@torch.no_grad()
def perturb_trainable(model, scale: float = 0.2, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def train_two_steps(prep: Prepared) -> None:
    model = prep.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    b = batch()
    for _ in range(2):
        if prep.config.task == "classification":
            out = model(**b, labels=torch.tensor([1, 0, 1]))
        else:
            out = model(**b, labels=b["input_ids"])
        loss = out.loss + (prep.spec.extra_loss(model) if prep.spec.extra_loss else 0)
        assert torch.isfinite(loss), loss
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "no gradient reached"
        opt.step()
        opt.zero_grad()
    model.eval()


def reloads_the_same(prep: Prepared, family: str, tmp_path) -> tuple[dict, torch.Tensor]:
    """Move the trained parameters off their start, save the adapter, load it onto a fresh
    base and check the logits are the trained model's. Returns (batch, trained logits)."""
    perturb_trainable(prep.model)
    b = batch()
    trained = logits(prep.model, b)
    save_adapter(prep, tmp_path)
    loaded = load_adapter(base_model(family), prep.config, tmp_path)
    torch.testing.assert_close(logits(loaded, b), trained, atol=ATOL, rtol=0)
    return b, trained


CELLS = [(spec, fam) for fam in FAMILIES for spec in SPECS]


@pytest.mark.parametrize("spec,family", CELLS, ids=[f"{f}-{s.name}" for s, f in CELLS])
def test_method_trains_saves_reloads_and_merges_or_refuses(spec, family, tmp_path):
    arch = arch_for_model_type(family)
    try:
        prep = prepare({"name": spec.name}, family)
    except (ValueError, NotImplementedError) as e:
        msg = str(e)
        assert msg.startswith(("method.", "method:")), f"a refusal must name the field: {msg}"
        assert arch.family in msg or model_type_of(arch) in msg, f"a refusal must name the family: {msg}"
        assert spec.name not in ("lora", "full", "bitfit" if arch.norm_bias else "lora"), \
            f"{spec.name} must work on every family: {msg}"
        pytest.skip(f"{spec.name} refuses {family}: {msg}")
    # the count from the config alone equals the built model's
    dims = dims_of_model(prep.model)
    expected = spec.count_trainable(dims, prep.config.method, prep.config.task)
    if spec.trains_head and prep.config.task == "classification":
        expected += sum(p.numel() for _, h in head_modules(prep.model) for p in h.parameters())
    assert prep.n_trainable == expected > 0
    train_two_steps(prep)
    b, trained = reloads_the_same(prep, family, tmp_path)
    if spec.mergeable:
        spec.merge(prep.model)
        torch.testing.assert_close(logits(prep.model, b), trained, atol=ATOL, rtol=0)


def test_lora_and_full_work_on_every_family():
    """The two methods every family must take (the grid above skips refusals)."""
    for family in FAMILIES:
        for name in ("lora", "full"):
            prepare({"name": name}, family)


# ---- peft interop ------------------------------------------------------------------------------

PEFT_METHODS = [{"name": "lora", "r": 4, "alpha": 8}, {"name": "lora", "r": 2, "target_modules": "all-linear"},
                {"name": "dora", "r": 4}, {"name": "ia3"}, {"name": "loha"}, {"name": "lokr"}, {"name": "vera"},
                {"name": "oft"}, {"name": "prompt_tuning", "num_virtual_tokens": 4},
                {"name": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
                {"name": "prefix_tuning", "num_virtual_tokens": 4}]
# qlora's adapter is a LoRA over an NF4 base (tests/test_peft_interop.py checks it on the dequantized base)
PEFT_CELLS = [(m, f) for f in FAMILIES for m in PEFT_METHODS]


@pytest.mark.parametrize("method,family", PEFT_CELLS,
                         ids=[f"{f}-{m['name']}-{m.get('target_modules', 'default')}" for m, f in PEFT_CELLS])
def test_peft_loads_our_adapter_with_the_same_logits(method, family, tmp_path):
    from peft import PeftModel

    require("peft")
    from engine.adapters import write_dir_atomic

    try:
        prep = prepare(method, family)
    except ValueError as e:       # refused: the method battery above checks the refusal names why
        pytest.skip(f"{method['name']} refuses {family}: {e}")
    perturb_trainable(prep.model)
    enc = tokenizer()(["the movie was a delight from start to end"], return_tensors="pt")
    b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    ours = logits(prep.model, b)
    assert (ours - logits(base_model(family), b)).abs().max() > 1e-3, "a trivial adapter proves nothing"
    write_dir_atomic(tmp_path, adapter_files(prep))
    pm = PeftModel.from_pretrained(base_model(family), str(tmp_path))
    theirs = logits(pm, b)
    if theirs.shape != ours.shape:       # peft returns the virtual tokens' logits of a causal LM too
        theirs = theirs[:, theirs.shape[1] - ours.shape[1]:]
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


# ---- estimator against the CPU measure ------------------------------------------------------------

def within(est: int, measured: int, pct: float = 10.0) -> bool:
    return abs(est - measured) <= pct / 100 * measured


ROW_CELLS = [(m, f) for f in FAMILIES for m in ({"name": "lora", "r": 4}, {"name": "full"})]


@pytest.mark.parametrize("method,family", ROW_CELLS, ids=[f"{f}-{m['name']}" for m, f in ROW_CELLS])
def test_estimator_rows_match_one_real_step(method, family):
    from engine.estimator import estimate
    from engine.measure import measure_prepared, prepare_for_measure, step_peak

    task = task_of(family)
    model = base_model(family)
    n_base = sum(p.numel() for p in model.parameters())
    attention = "sdpa" if model._supports_sdpa else "eager"      # Gemma 2: eager only (soft-capped attention)
    loaded = LoadedModel(model, tokenizer(), f"tiny-{family}", 0.0)
    prep = prepare_for_measure("tiny-llama", method, task=task, loaded=loaded, attention=attention)
    est = estimate(model.config.to_dict(), method, batch_size=4, seq_len=32, task=task, device="cpu",
                   dtype="fp32", attention=attention)
    assert est.n_params == n_base and est.n_trainable == prep.n_trainable
    sp = step_peak(prep, batch_size=4, seq_len=32)
    assert (sp.gradients, sp.optimizer) == (est.rows["gradients"], est.rows["optimizer"])
    assert est.rows["weights"] == sp.weights, (est.rows["weights"], sp.weights)
    hidden = measure_prepared(prep, batch_size=4, seq_len=32, backward=False).rows["hidden_states"]
    assert within(est.rows["hidden_states"], hidden), (est.rows["hidden_states"], hidden)


# ---- GGUF ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [f for f in FAMILIES if arch_for_model_type(f).is_decoder])
def test_gguf_export_is_refused_clearly_where_the_exporter_cannot_write(family):
    """Every decoder family the battery builds has a llama.cpp architecture; its tiny model
    is either written or refused naming the config field llama.cpp would read differently
    (the battery's Gemma uses head_dim 8 with query_pre_attn_scalar 256, Qwen3-MoE leaves
    norm_topk_prob off): tests/test_gguf_families.py checks the files themselves."""
    from engine.gguf_archs import GGUFExportError, gguf_hparams

    cfg = base_model(family).config.to_dict()
    assert arch_for_model_type(family).gguf_arch
    refused = {"gemma2": "query_pre_attn_scalar is 256", "gemma3_text": "query_pre_attn_scalar is 256",
               "qwen3_moe": "norm_topk_prob is false"}
    if family in refused:
        with pytest.raises(GGUFExportError, match=f"GGUF export of {family}: {refused[family]}"):
            gguf_hparams(cfg)
    else:
        assert gguf_hparams(cfg)["block_count"] == 2


# ---- the run path, the loss, refusals ------------------------------------------------------------

@pytest.mark.parametrize("family", [f for f in FAMILIES if arch_for_model_type(f).is_decoder])
def test_the_training_loss_is_the_models_own_loss(family):
    """The chunked loss calls the LM head itself: it must apply what the family's forward
    does to the logits (Granite's logits_scaling, Gemma 2's soft-capping)."""
    from engine.loss import compute_loss

    model = base_model(family)
    if family == "granite":
        model.config.logits_scaling = 4.0
    if family == "gemma2":
        model.config.final_logit_softcapping = 0.5
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        ours = compute_loss(model, b, "causal_lm")
        theirs = model(**b).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_directory_of_each_family_trains_through_the_run_path(family, tmp_path):
    from engine.prepare import prepare_run
    from engine.train import train

    task = task_of(family)
    base_model(family).save_pretrained(tmp_path / "m", safe_serialization=True)
    tokenizer().save_pretrained(tmp_path / "m")
    cfg = parse_run_config({"model": str(tmp_path / "m"), "task": task, "dataset": {"name": DATASETS[task],
                                                                                    "max_rows": 16},
                            "method": {"name": "lora", "r": 2},
                            "training": {"max_steps": 2, "batch_size": 2, "max_seq_len": 16, "eval_every": 0,
                                         "eval_batches": 1, "eval_generate": 0}})
    prep = prepare_run(cfg)
    assert arch_for_model_type(prep.model.config.model_type).family == family
    res = train(prep)
    assert res.steps == 2 and all(math.isfinite(h["loss"]) for h in res.history)


def test_a_model_type_outside_the_list_is_refused_with_the_list():
    from engine.prepare import dry_run

    import transformers

    cfg = run_config({"name": "lora"}, "llama")
    conf = transformers.OPTConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                  num_attention_heads=4, word_embed_proj_dim=32).to_dict()
    with pytest.raises(ValueError) as e:
        dry_run(cfg, conf)
    for mt in ("qwen3", "gemma2", "gemma3_text", "phi3", "smollm3", "olmo2", "granite", "mixtral", "qwen3_moe",
               "roberta", "deberta-v2", "modernbert", "llama", "bert"):
        assert repr(mt) in str(e.value), (mt, str(e.value))


def test_catalog_entries_of_the_new_families_are_estimated():
    from engine.estimator import estimate

    # parameter counts of the published models (model cards, rounded to their shown digits)
    published = {"qwen3-8b": 8.19e9, "gemma-2-9b": 9.24e9, "smollm3-3b": 3.08e9, "olmo-2-7b": 7.30e9,
                 "granite-3.3-8b": 8.17e9, "mixtral-8x7b": 46.7e9, "qwen3-30b-a3b": 30.5e9, "phi-4-mini": 3.84e9,
                 "deberta-v3-large": 0.435e9, "modernbert-large": 0.395e9, "gemma-3-12b": 11.77e9}
    for name, n in published.items():
        est = estimate(name, {"name": "lora"}, batch_size=1, seq_len=256)
        assert abs(est.n_params - n) <= 0.01 * n, (name, est.n_params)
        assert est.rows["total"] > est.rows["weights"] > 0


@pytest.mark.parametrize("family", [f for f in FAMILIES if arch_for_model_type(f).experts])
def test_moe_lora_targets_attention_by_default_and_the_experts_through_target_parameters(family):
    arch = arch_for_model_type(family)
    prep = prepare({"name": "lora", "r": 2, "target_modules": "all-linear"}, family)
    trained = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert trained and all(".self_attn." in n for n in trained), sorted(trained)[:5]   # experts and router frozen
    for target in (["gate_up_proj"], ["experts"], ["gate"]):
        with pytest.raises(ValueError, match="3-D parameters .* adapt the experts with method.target_parameters"):
            prepare({"name": "lora", "r": 2, "target_modules": target}, family)
    # the experts' tensors as peft names them (tests/test_expert_lora.py checks the layout and peft's logits)
    prep = prepare({"name": "lora", "r": 2, "target_parameters": [f"{arch.experts.path}.{p}" for p in
                                                                  arch.experts.params]}, family)
    trained = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert {n.split(".mlp.")[1] for n in trained if ".mlp." in n} == {
        "experts.base_layer.lora_A.weight", "experts.base_layer.lora_B.weight",
        "experts.lora_A.weight", "experts.lora_B.weight"}
    assert not any(arch.experts.router in n for n in trained)
    dims = dims_of_model(prep.model)
    assert dims.num_experts == 4 and dims.experts_per_token == 2
    assert arch.experts.router.endswith("gate")


@pytest.mark.parametrize("family", [f for f in FAMILIES if arch_for_model_type(f).experts])
def test_the_estimator_counts_all_experts_for_weights_and_the_active_ones_for_activations(family):
    from engine.estimator import estimate

    ex = arch_for_model_type(family).experts
    cfg = tiny_config(family, 1000).to_dict()

    def est(**over):
        return estimate(dict(cfg, **over), {"name": "lora", "r": 2}, batch_size=2, seq_len=32, task="causal_lm",
                        device="cpu", dtype="fp32")

    base, one_active = est(), est(**{ex.active_key: 1})
    more_experts = est(**{ex.num_key: 8, "num_local_experts": 8})
    assert one_active.rows["weights"] == base.rows["weights"] < more_experts.rows["weights"]
    assert one_active.rows["hidden_states"] < base.rows["hidden_states"]
    per_expert = 3 * cfg["hidden_size"] * cfg[ex.intermediate_key] + cfg["hidden_size"]
    assert more_experts.n_params - base.n_params == 4 * per_expert * cfg["num_hidden_layers"]
    # LoRA on the expert tensors trains r·(in+out) per expert of every expert, and keeps W+ΔW of all of
    # them, but only the active experts' tokens: its activations grow with both
    tp = {"target_parameters": [f"{ex.path}.{p}" for p in ex.params]}
    ex_base, ex_one, ex_more = (estimate(dict(cfg, **over), {"name": "lora", "r": 2, **tp}, batch_size=2, seq_len=32,
                                         task="causal_lm", device="cpu", dtype="fp32")
                                for over in ({}, {ex.active_key: 1}, {ex.num_key: 8, "num_local_experts": 8}))
    h, i = cfg["hidden_size"], cfg[ex.intermediate_key]
    per_expert_lora = 2 * ((h + 2 * i) + (i + h))
    assert ex_base.n_trainable - base.n_trainable == 4 * per_expert_lora * cfg["num_hidden_layers"]
    assert ex_more.n_trainable - ex_base.n_trainable == 4 * per_expert_lora * cfg["num_hidden_layers"]
    assert ex_one.n_trainable == ex_base.n_trainable
    assert ex_one.rows["hidden_states"] < ex_base.rows["hidden_states"] < ex_more.rows["hidden_states"]
    assert ex_base.rows["hidden_states"] - base.rows["hidden_states"] > ex_one.rows["hidden_states"] - \
        one_active.rows["hidden_states"] > 0


MOE_CELLS = [(m, f) for f in FAMILIES if arch_for_model_type(f).experts for m in ("lora", "full")]


@pytest.mark.parametrize("method_name,family", MOE_CELLS, ids=[f"{f}-{m}" for m, f in MOE_CELLS])
def test_the_experts_activations_match_the_measure(method_name, family):
    """The routed experts' share of the hidden states (measured as the change from one to
    two active experts per token, so the loss's logits do not drown it) is what the
    estimator says, within 10%: with LoRA on attention, and with every expert tensor
    training (full: each one's per-token input is kept too)."""
    from engine.estimator import estimate
    from engine.measure import measure_prepared, prepare_for_measure

    ex = arch_for_model_type(family).experts
    hidden = {}
    for k in (1, 2):
        model = base_model(family)
        setattr(model.config, ex.active_key, k)
        for m in model.modules():
            if hasattr(m, "top_k"):
                m.top_k = k
        method = {"name": "lora", "r": 4} if method_name == "lora" else {"name": method_name}
        prep = prepare_for_measure("tiny-llama", method, task="causal_lm",
                                   loaded=LoadedModel(model, tokenizer(), family, 0.0))
        measured = measure_prepared(prep, batch_size=4, seq_len=32, backward=False).rows["hidden_states"]
        est = estimate(model.config.to_dict(), method, batch_size=4, seq_len=32, task="causal_lm", device="cpu",
                       dtype="fp32").rows["hidden_states"]
        hidden[k] = (measured, est)
    measured_delta, est_delta = hidden[2][0] - hidden[1][0], hidden[2][1] - hidden[1][1]
    assert measured_delta > 0 and within(est_delta, measured_delta), (est_delta, measured_delta)

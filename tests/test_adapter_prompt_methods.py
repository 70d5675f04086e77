"""The adapter and prompt methods (houlsby, parallel_adapter, prompt_tuning, p_tuning,
prefix_tuning, llama_adapter, mam, s4) on the tiny models: forward shapes, a few
training steps, save/load round trips, exact trainable counts, generation, config
errors; and a short real run on the bundled models (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.adapters import OWN_WEIGHTS, PEFT_WEIGHTS, load_own_adapter, save_adapter
from engine.config import ConfigError, parse_run_config
from engine.dims import dims_from_config, dims_of_model
from engine.methods import ApplyContext, count_parameters, get_method, parse_method_config
from engine.methods.prefix import prefix_bank
from engine.methods.s4 import group_sizes
from engine.models import load_model, minilm_dir
from engine.arch import head_modules
from engine.prepare import Prepared, apply_method
from engine.loss import compute_loss
from method_helpers import assert_cached_greedy_matches_uncached, fixed_batch, head_count, logits, perturb_trainable

# small settings so the tiny models (hidden 32, 2 layers, 4 heads / 2 kv heads) stay fast
METHODS = {
    "houlsby": {"bottleneck_size": 4},
    "parallel_adapter": {"bottleneck_size": 4, "placement": "both"},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "p_tuning": {"num_virtual_tokens": 3, "encoder_type": "lstm", "encoder_hidden_size": 8},
    "prefix_tuning": {"num_virtual_tokens": 3, "encoder_hidden_size": 16},
    "llama_adapter": {"adapter_len": 3, "adapter_layers": 1},
    "mam": {"num_virtual_tokens": 3, "bottleneck_size": 4},
    # tiny models have 2 layers: spindle puts them in G2 (adapter, prefix) and G3 (adapter, prefix, bitfit),
    # with different prefix lengths so the per-layer slot masking is exercised
    "s4": {"groups": [{"strategies": ["adapter", "lora"]},
                      {"strategies": ["adapter", "prefix"], "adapter_size": 4, "prefix_tokens": 2},
                      {"strategies": ["adapter", "prefix", "bitfit"], "adapter_size": 4, "prefix_tokens": 4},
                      {"strategies": ["prefix", "bitfit", "lora"]}]},
}
LLAMA_ONLY = {"llama_adapter"}
COMBOS = [("tiny-llama", "causal_lm"), ("tiny-llama", "classification"), ("tiny-bert", "classification")]
CASES = [(m, model, task) for m in METHODS for model, task in COMBOS if not (m in LLAMA_ONLY and model == "tiny-bert")]
IDS = [f"{m}-{model}-{task}" for m, model, task in CASES]


def method_dict(name: str) -> dict:
    return {"name": name, **METHODS[name]}


def prepared(model_name: str, task: str, method: dict, seed: int = 0) -> Prepared:
    """A model with the method applied, the way engine.prepare does it (no data loaded).
    The base model is always the same; `seed` only changes the method's initialisation."""
    ds = "demo-sentiment" if task == "classification" else "demo-instruct"
    cfg = parse_run_config({"model": model_name, "task": task, "dataset": {"name": ds}, "method": method,
                            "training": {"max_steps": 1, "seed": seed}})
    lm = load_model(model_name, task, seed=0)
    spec = get_method(method["name"])
    ctx = ApplyContext(task=task, seed=seed, tokenizer=lm.tokenizer)
    model = apply_method(lm.model, spec, cfg.method, ctx)
    n, t = count_parameters(model)
    return Prepared(cfg, model, lm.tokenizer, None, spec, ctx, n, t)


# ---- the matrix ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method,model_name,task", CASES, ids=IDS)
def test_forward_shape_and_exact_count(method, model_name, task):
    prep = prepared(model_name, task, method_dict(method))
    batch = fixed_batch(prep.tokenizer, task)
    out = logits(prep.model, batch)
    b, t = batch["input_ids"].shape
    if task == "classification":
        assert out.shape == (b, 2)
    else:
        assert out.shape == (b, t, prep.model.config.vocab_size)
        hidden = prep.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          use_cache=False).last_hidden_state
        assert hidden.shape == (b, t, prep.model.config.hidden_size)
    assert torch.isfinite(out).all()
    spec = prep.spec
    expected = spec.count_trainable(dims_of_model(prep.model), prep.config.method, task) + head_count(prep.model, task)
    assert prep.n_trainable == expected
    # nothing of the base model trains (beyond the head and what the method says)
    base_names = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert base_names and not any(("embed_tokens" in n or "word_embeddings" in n) for n in base_names)


@pytest.mark.parametrize("method,model_name,task", CASES, ids=IDS)
def test_training_steps_lower_the_loss(method, model_name, task):
    """AdamW on a fixed batch lowers the loss through the method's own parameters.
    (For classification the head is frozen here and all labels are one class: random
    tiny models give nearly the same features for every input, so a balanced batch
    cannot be fitted, but the method must still move the features towards the class.)"""
    prep = prepared(model_name, task, method_dict(method))
    model = prep.model
    batch = fixed_batch(prep.tokenizer, task)
    if task == "classification":
        batch["labels"] = torch.ones_like(batch["labels"])
        for _, head in head_modules(model):
            head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.eval()   # no dropout: the same batch gives the same loss
    with torch.no_grad():
        first = compute_loss(model, batch, task).item()
    for _ in range(8):
        loss = compute_loss(model, batch, task)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        last = compute_loss(model, batch, task).item()
    assert last < first - 1e-3, (first, last)


@pytest.mark.parametrize("method,model_name,task", CASES, ids=IDS)
def test_save_load_gives_identical_outputs(method, model_name, task, tmp_path):
    prep = prepared(model_name, task, method_dict(method))
    perturb_trainable(prep.model)
    batch = fixed_batch(prep.tokenizer, task)
    ours = logits(prep.model, batch)
    save_adapter(prep, tmp_path)
    fresh = prepared(model_name, task, method_dict(method), seed=5)   # different random init
    assert not torch.allclose(logits(fresh.model, batch), ours)
    if prep.spec.peft_export:
        # peft format: the prompt (MLP / encoder folded) plus the head; loaded back by the method's load_state
        tensors = load_file(str(tmp_path / PEFT_WEIGHTS))
        prep.spec.load_state(fresh.model, tensors)
        torch.testing.assert_close(logits(fresh.model, batch), ours, atol=1e-6, rtol=0)
    else:
        assert (tmp_path / OWN_WEIGHTS).exists()
        load_own_adapter(fresh.model, tmp_path)
        assert torch.equal(logits(fresh.model, batch), ours)


# ---- generation ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_generation_matches_uncached_argmax(method):
    assert_cached_greedy_matches_uncached(prepared("tiny-llama", "causal_lm", method_dict(method)))


# ---- config and architecture errors ---------------------------------------------------------------

def run_config(method: dict, model="tiny-llama", task="causal_lm") -> dict:
    ds = "demo-sentiment" if task == "classification" else "demo-instruct"
    return {"model": model, "task": task, "dataset": {"name": ds}, "method": method}


@pytest.mark.parametrize("method,error", [
    ({"name": "houlsby", "bottleneck_size": 8, "reduction_factor": 4}, "method.bottleneck_size or method.reduction_factor"),
    ({"name": "houlsby", "bottlenek_size": 8}, "method.bottlenek_size: unknown key"),
    ({"name": "houlsby", "layers": [0, 0]}, "method.layers"),
    ({"name": "parallel_adapter", "scale": 0}, "method.scale"),
    ({"name": "prompt_tuning", "num_virtual_tokens": 0}, "method.num_virtual_tokens"),
    ({"name": "prompt_tuning", "init": "text"}, "method.init_text"),
    ({"name": "p_tuning", "encoder_type": "gru"}, "method.encoder_type"),
    ({"name": "p_tuning", "encoder_num_layers": 3}, "method.encoder_num_layers"),
    ({"name": "prefix_tuning", "prefix_len": 3}, "method.prefix_len: unknown key"),
    ({"name": "llama_adapter", "adapter_len": -1}, "method.adapter_len"),
    ({"name": "mam", "scale": -1}, "method.scale"),
    ({"name": "s4", "pattern": "hourglass"}, "method.pattern"),
    ({"name": "s4", "groups": [{"strategies": ["adapter"]}]}, "method.groups"),
    ({"name": "s4", "groups": [{"strategies": ["adapter"], "lora_r": 4}] * 4}, "lora_r is set but 'lora'"),
    ({"name": "s4", "groups": [{"strategies": ["dropout"]}] * 4}, "method.groups.0.strategies"),
])
def test_config_errors_name_the_field(method, error):
    with pytest.raises(ConfigError) as e:
        parse_run_config(run_config(method))
    assert error in str(e.value)


def test_all_eight_methods_are_selectable_in_a_run_config():
    for name in METHODS:
        cfg = parse_run_config(run_config({"name": name}))
        assert cfg.method.name == name
        spec = get_method(name)
        assert spec.paper and "arXiv" in spec.paper and spec.summary and spec.trains
        assert spec.count_trainable is not None and not spec.mergeable


def test_llama_adapter_on_bert_is_a_clear_error():
    with pytest.raises(ValueError, match="llama_adapter needs a Llama-architecture model"):
        prepared("tiny-bert", "classification", method_dict("llama_adapter"))


def test_layer_index_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"method.layers: \[5\] out of range"):
        prepared("tiny-llama", "causal_lm", {"name": "houlsby", "layers": [5]})
    with pytest.raises(ValueError, match="method.adapter_layers"):
        prepared("tiny-llama", "causal_lm", {"name": "llama_adapter", "adapter_layers": 3})


def test_prompt_text_init_uses_token_embeddings():
    prep = prepared("tiny-llama", "causal_lm", {"name": "prompt_tuning", "num_virtual_tokens": 5, "init": "text",
                                                "init_text": "classify the review"})
    ids = prep.tokenizer("classify the review", add_special_tokens=False)["input_ids"]
    emb = prep.model.get_input_embeddings().weight
    want = emb[torch.tensor((ids * 5)[:5])]
    got = prep.model.model.studio_prompt.embedding
    assert torch.equal(got.detach(), want.detach())


# ---- method-specific behaviour ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["houlsby", "parallel_adapter", "llama_adapter"])
def test_identity_or_near_identity_at_start(method):
    base = load_model("tiny-llama", "causal_lm").model
    prep = prepared("tiny-llama", "causal_lm", method_dict(method))
    batch = fixed_batch(prep.tokenizer, "causal_lm")
    diff = (logits(prep.model, batch) - logits(base, batch)).abs().max().item()
    assert diff < (1e-2 if method == "houlsby" else 1e-6)


def test_prefix_shapes_follow_grouped_query_attention():
    prep = prepared("tiny-llama", "causal_lm", {"name": "prefix_tuning", "num_virtual_tokens": 3})
    cfg = prep.model.config
    assert cfg.num_key_value_heads == 2 and cfg.num_attention_heads == 4
    exp = prep.spec.peft_export(prep.model, prep.config.method, prep.ctx)
    kv_dim = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert exp.tensors["prompt_embeddings"].shape == (3, cfg.num_hidden_layers * 2 * kv_dim)
    assert exp.adapter_config["num_attention_heads"] == 2 and exp.adapter_config["token_dim"] == kv_dim
    # the cache the backbone sees holds N prefix slots per layer with kv heads
    batch = fixed_batch(prep.tokenizer, "causal_lm")
    out = prep.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
    keys = out.past_key_values.layers[0].keys
    assert keys.shape == (4, 2, 3 + batch["input_ids"].shape[1], kv_dim // 2)


def test_prefix_mlp_is_folded_for_saving_and_inference():
    prep = prepared("tiny-llama", "causal_lm", method_dict("prefix_tuning"))
    perturb_trainable(prep.model)
    batch = fixed_batch(prep.tokenizer, "causal_lm")
    before = logits(prep.model, batch)
    from engine.methods.prefix import fold_prefixes
    fold_prefixes(prep.model)
    group = prefix_bank(prep.model).groups[0]
    assert group.mlp is None and group.folded is not None
    torch.testing.assert_close(logits(prep.model, batch), before, atol=1e-6, rtol=0)


def test_s4_spindle_groups_and_paper_preset():
    assert group_sizes(24, "spindle") == [4, 8, 8, 4]
    assert group_sizes(30, "spindle") == [5, 10, 10, 5]
    assert group_sizes(12, "uniform") == [3, 3, 3, 3]
    assert sum(group_sizes(30, "increasing")) == 30 and group_sizes(30, "increasing") == [3, 6, 9, 12]
    assert group_sizes(30, "decreasing") == [12, 9, 6, 3]
    cfg = parse_method_config({"name": "s4"})
    assert cfg.pattern == "spindle"
    assert [g.strategies for g in cfg.groups] == [["adapter", "lora"], ["adapter", "prefix"],
                                                  ["adapter", "prefix", "bitfit"], ["prefix", "bitfit", "lora"]]


def test_s4_layer_without_prefix_ignores_the_prefix_slots():
    """Layer 0 has no prefix (its group: zero-initialised BitFit biases), layer 1 has one;
    both layers hold the same number of cache slots, so layer 0 must mask all of them:
    its output equals the base model's."""
    method = {"name": "s4", "pattern": "uniform",
              "groups": [{"strategies": ["bitfit"]}, {"strategies": ["prefix"], "prefix_tokens": 3},
                         {"strategies": ["adapter"]}, {"strategies": ["lora"]}]}
    prep = prepared("tiny-llama", "causal_lm", method)
    base = load_model("tiny-llama", "causal_lm").model.eval()
    with torch.no_grad():
        for g in prefix_bank(prep.model).groups:
            g.embedding.add_(1.0)
    prep.model.eval()
    batch = fixed_batch(prep.tokenizer, "causal_lm")
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        ours, theirs = prep.model(**kw), base(**kw)
    assert ours.hidden_states[1].shape == theirs.hidden_states[1].shape
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.hidden_states[1][real], theirs.hidden_states[1][real], atol=1e-5, rtol=0)
    assert not torch.allclose(ours.hidden_states[2][real], theirs.hidden_states[2][real], atol=1e-3)


def test_s4_bitfit_adds_zero_biases_on_llama():
    prep = prepared("tiny-llama", "causal_lm", {"name": "s4", "pattern": "uniform",
                                                "groups": [{"strategies": ["bitfit"]}, {"strategies": ["bitfit"]},
                                                           {"strategies": ["bitfit"]}, {"strategies": ["bitfit"]}]})
    q = prep.model.model.layers[0].self_attn.q_proj
    assert q.bias is not None and q.bias.requires_grad and torch.equal(q.bias, torch.zeros_like(q.bias))


# ---- counts on the bundled models' configs (meta tensors: no weights) --------------------------------

def meta_model(cfg: dict, task: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    clean = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    config = AutoConfig.for_model(cfg["model_type"], **clean)
    if task == "classification":
        config.num_labels = 2
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config)


BUNDLED_CONFIGS = {
    "minilm": lambda: json.loads((minilm_dir() / "config.json").read_text()),
    "smollm2-135m": lambda: json.loads((Path(__file__).resolve().parents[1] / "engine" / "catalog" /
                                        "smollm2-135m.json").read_text()),
}
BUNDLED_CASES = [("minilm", "classification"), ("smollm2-135m", "causal_lm")]
PAPER_SIZED = {
    "houlsby": {"reduction_factor": 16},
    "parallel_adapter": {"bottleneck_size": 64},
    "prompt_tuning": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20, "encoder_type": "mlp", "encoder_hidden_size": 128},
    "prefix_tuning": {"num_virtual_tokens": 10},
    "llama_adapter": {"adapter_len": 10, "adapter_layers": 8},
    "mam": {"num_virtual_tokens": 30, "bottleneck_size": 64},
    "s4": {},
}


@pytest.mark.parametrize("bundled,task", BUNDLED_CASES)
@pytest.mark.parametrize("method", list(PAPER_SIZED))
def test_count_trainable_on_bundled_configs(method, bundled, task):
    if method in LLAMA_ONLY and bundled == "minilm":
        pytest.skip("llama_adapter is Llama-only (tested above)")
    cfg = BUNDLED_CONFIGS[bundled]()
    model = meta_model(cfg, task)
    spec = get_method(method)
    mcfg = parse_method_config({"name": method, **PAPER_SIZED[method]})
    model = apply_method(model, spec, mcfg, ApplyContext(task=task))
    _, trainable = count_parameters(model)
    assert trainable == spec.count_trainable(dims_from_config(cfg), mcfg, task) + head_count(model, task)


# ---- short real runs through the engine ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model_name,task,dataset,method", [
    ("smollm2-135m", "causal_lm", "demo-instruct", {"name": "prefix_tuning", "num_virtual_tokens": 8}),
    ("minilm", "classification", "demo-sentiment", {"name": "houlsby", "bottleneck_size": 16}),
])
def test_short_real_run(model_name, task, dataset, method, tmp_path):
    from engine.prepare import prepare_run
    from engine.train import train

    cfg = parse_run_config({"name": f"t-{method['name']}", "model": model_name, "task": task,
                            "dataset": {"name": dataset, "max_rows": 64},
                            "method": method, "training": {"max_steps": 3, "batch_size": 4, "max_seq_len": 32,
                                                           "eval_every": 0, "eval_batches": 1, "device": "cpu", "eval_generate": 0}})
    prep = prepare_run(cfg)
    assert prep.n_trainable == prep.spec.count_trainable(dims_of_model(prep.model), cfg.method, task) + \
        head_count(prep.model, task)
    result = train(prep)
    assert result.steps == 3 and result.final_loss is not None and result.eval
    save_adapter(prep, tmp_path)
    assert (tmp_path / (PEFT_WEIGHTS if prep.spec.peft_export else OWN_WEIGHTS)).exists()


def test_prompt_tokens_beyond_absolute_positions_are_a_clear_error():
    from engine.measure import prepare_for_measure
    prep = prepare_for_measure("tiny-bert", {"name": "prompt_tuning", "num_virtual_tokens": 4},
                               task="classification")
    limit = prep.model.config.max_position_embeddings
    ids = torch.ones(1, limit - 3, dtype=torch.long)
    with pytest.raises(ValueError, match="num_virtual_tokens: 4 virtual tokens.*positions"):
        prep.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    ids = torch.ones(1, limit - 4, dtype=torch.long)         # exactly fits
    assert prep.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape[0] == 1
    # prefix slots take positions too (BERT numbers the new tokens after the cache)
    prep = prepare_for_measure("tiny-bert", {"name": "prefix_tuning", "num_virtual_tokens": 4},
                               task="classification")
    ids = torch.ones(1, limit, dtype=torch.long)
    with pytest.raises(ValueError, match="num_virtual_tokens: 4 virtual tokens"):
        prep.model(input_ids=ids, attention_mask=torch.ones_like(ids))

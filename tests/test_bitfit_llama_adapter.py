"""BitFit on a bias-free Llama (bias addition, LLaMA-Adapter V2 style) and
llama_adapter's default depth, on tiny Llamas."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from engine.adapters import merged_model_files
from engine.config import parse_run_config
from engine.dims import dims_of_model
from engine.methods import ApplyContext, count_parameters, get_method, parse_method_config
from engine.models import TINY_VOCAB, tiny_config
from engine.prepare import apply_method, prepare_run


def bitfit_run():
    return prepare_run(parse_run_config({
        "model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct", "max_rows": 40},
        "method": {"name": "bitfit"}}))


def test_bitfit_adds_zero_biases_to_a_bias_free_llama_and_trains_only_them():
    prep = bitfit_run()
    model, spec = prep.model, get_method("bitfit")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.num_hidden_layers
    assert len(trainable) == 7 * layers and all(n.endswith("_proj.bias") for n in trainable)
    assert all((p == 0).all() for p in trainable.values())           # training starts at the base model
    assert prep.n_trainable == spec.count_trainable(dims_of_model(model), prep.config.method, "causal_lm")
    assert prep.n_trainable == sum(p.numel() for p in trainable.values())


def test_bitfit_merged_export_keeps_the_added_biases(tmp_path):
    prep = bitfit_run()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in prep.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ids = torch.randint(3, 1000, (2, 12), generator=g)
    prep.model.eval()
    trained = prep.model(input_ids=ids).logits
    merged_dir = merged_model_files(prep)
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert reloaded.config.attention_bias and reloaded.config.mlp_bias
    assert reloaded.model.layers[0].mlp.down_proj.bias is not None
    torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=1e-5, rtol=0)
    base = LlamaForCausalLM(tiny_config("llama", TINY_VOCAB))
    assert base.model.layers[0].self_attn.q_proj.bias is None                  # the base really had none


def test_bitfit_on_a_llama_with_biases_trains_its_own():
    model = LlamaForCausalLM(tiny_config("llama", 200, attention_bias=True))
    spec = get_method("bitfit")
    cfg = parse_method_config({"name": "bitfit"})
    model = apply_method(model, spec, cfg, ApplyContext(task="causal_lm"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("self_attn" in n for n in names)                      # no MLP biases added
    assert count_parameters(model)[1] == spec.count_trainable(dims_of_model(model), cfg, "causal_lm")


def four_layer_llama():
    return LlamaForCausalLM(tiny_config("llama", 200, num_hidden_layers=4))


def test_llama_adapter_default_depth_fits_a_four_layer_model():
    spec = get_method("llama_adapter")
    cfg = parse_method_config({"name": "llama_adapter", "adapter_len": 2})
    model = apply_method(four_layer_llama(), spec, cfg, ApplyContext(task="causal_lm"))
    adapted = [i for i, b in enumerate(model.model.layers) if hasattr(b.self_attn, "adaption_prompt")]
    assert adapted == [0, 1, 2, 3]                                            # min(8, 4)
    dims = dims_of_model(model)
    assert count_parameters(model)[1] == spec.count_trainable(dims, cfg, "causal_lm") == 4 * (2 * 32 + 4)
    assert sum(1 for lp in spec.plan(dims, cfg, "causal_lm").layers if lp.adaption_prompt) == 4
    out = model(input_ids=torch.randint(3, 200, (1, 6))).logits
    assert torch.isfinite(out).all()


def test_llama_adapter_explicit_depth_too_large_is_refused():
    spec = get_method("llama_adapter")
    cfg = parse_method_config({"name": "llama_adapter", "adapter_layers": 9})
    with pytest.raises(ValueError, match=r"method\.adapter_layers: 9 is more than the model's 4 layers"):
        apply_method(four_layer_llama(), spec, cfg, ApplyContext(task="causal_lm"))
    with pytest.raises(ValueError, match=r"method\.adapter_layers"):
        spec.count_trainable(dims_of_model(four_layer_llama()), cfg, "causal_lm")

"""engine.swaps: the fused SwiGLU MLP gives the same values and gradients as the
model's own MLP, saves a third less for backward and keeps parameter names; the
FastLinear swap keeps names, state and logits. (The fused RMSNorm/RoPE layers are
checked with their kernels in test_fused.py.)"""

from __future__ import annotations

import copy

import pytest
import torch

from engine import fused
from engine.measure import SavedTensorRecorder
from engine.models import load_model
from engine.swaps import FastLinear, SwiGLUMLP, fuse_swiglu_mlps, output_is_unsaved, use_fast_linears


def test_swiglu_torch_path_gradients_match_autograd_in_double():
    g = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert not fused.applies(g, u)                             # float64: the torch ops, not the C loop
    assert torch.autograd.gradcheck(fused.swiglu, (g, u))
    # only one input needing a gradient: the other gets none, and the values still match
    for needs in ((True, False), (False, True)):
        a = torch.randn(4, 6, dtype=torch.float64, requires_grad=needs[0])
        b = torch.randn(4, 6, dtype=torch.float64, requires_grad=needs[1])
        out = fused.swiglu(a, b)
        ref = torch.nn.functional.silu(a.detach()) * b.detach()
        torch.testing.assert_close(out.detach(), ref)
        out.sum().backward()
        assert (a.grad is not None) == needs[0] and (b.grad is not None) == needs[1]


def test_swiglu_torch_path_keeps_gate_and_up_only():
    gate = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    with SavedTensorRecorder([]) as ours:
        fused.swiglu(gate, up)
    with SavedTensorRecorder([]) as autograd_default:
        torch.nn.functional.silu(gate) * up
    one = gate.numel() * gate.element_size()
    assert ours.total_bytes == 2 * one and autograd_default.total_bytes == 3 * one


def test_fused_mlp_keeps_names_values_and_gradients_and_saves_less():
    model = load_model("tiny-llama", "causal_lm").model.float()
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    assert fuse_swiglu_mlps(model) == model.config.num_hidden_layers
    assert fuse_swiglu_mlps(model) == 0                        # idempotent
    assert [n for n, _ in model.named_parameters()] == names     # adapters and exports see the same names
    assert all(isinstance(layer.mlp, SwiGLUMLP) for layer in model.model.layers)
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for m in (model, ref):
        for p in m.parameters():
            p.requires_grad_(True)
    with SavedTensorRecorder(list(model.parameters())) as fused_rec:
        out = model(input_ids=ids).logits
    with SavedTensorRecorder(list(ref.parameters())) as ref_rec:
        plain = ref(input_ids=ids).logits
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)
    out.float().pow(2).mean().backward()
    plain.float().pow(2).mean().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    # one FFN-wide tensor (silu(gate)) per layer fewer
    cfg = model.config
    one = 2 * 16 * cfg.intermediate_size * 4
    assert ref_rec.total_bytes - fused_rec.total_bytes == pytest.approx(cfg.num_hidden_layers * one, rel=0.01)


def test_bert_has_no_swiglu_to_fuse():
    model = load_model("tiny-bert", "classification").model
    assert fuse_swiglu_mlps(model) == 0


def test_fast_linears_keep_names_state_and_logits():
    model = load_model("tiny-llama", "causal_lm").model.float()
    ref = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = use_fast_linears(model)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in ref.modules()) and n > 0
    assert use_fast_linears(model) == 0
    assert all(isinstance(m, FastLinear) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.state_dict().keys() == state.keys()
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_output_is_unsaved_for_plain_and_fast_linears_and_declared_layers():
    lin = torch.nn.Linear(4, 4)
    assert output_is_unsaved(lin)
    assert use_fast_linears(lin) == 1 and isinstance(lin, FastLinear) and output_is_unsaved(lin)
    assert not output_is_unsaved(torch.nn.LayerNorm(4))
    assert not output_is_unsaved(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    declared = type("Declared", (torch.nn.Module,), {"output_unsaved": True})()
    assert output_is_unsaved(declared)

"""engine.kernels: the fused SwiGLU gives the same values and gradients as the
model's own MLP, saves a third less for backward, and keeps parameter names."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.kernels import SwiGLUMLP, _SwiGLUProduct, fuse_swiglu_mlps, swiglu
from engine.measure import SavedTensorRecorder
from engine.models import load_model


def test_swiglu_product_gradients_match_autograd_in_double():
    g = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUProduct.apply, (g, u))
    # only one input needing a gradient: the other gets none, and the values still match
    for needs in ((True, False), (False, True)):
        a = torch.randn(4, 6, dtype=torch.float64, requires_grad=needs[0])
        b = torch.randn(4, 6, dtype=torch.float64, requires_grad=needs[1])
        out = swiglu(a, b)
        ref = torch.nn.functional.silu(a.detach()) * b.detach()
        torch.testing.assert_close(out.detach(), ref)
        out.sum().backward()
        assert (a.grad is not None) == needs[0] and (b.grad is not None) == needs[1]


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
        fused = model(input_ids=ids).logits
    with SavedTensorRecorder(list(ref.parameters())) as ref_rec:
        plain = ref(input_ids=ids).logits
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    fused.float().pow(2).mean().backward()
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

"""The one-node LoRA linear (engine.methods.lora_fused) against the module path: same
loss and same gradients for every trainable tensor, in fp32 and under bf16 autocast,
for LoRA (dense base, with a bias too) and QLoRA (NF4 base); and it is really taken
where it applies and left where it does not (dropout, DoRA, merged)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.measure import prepare_for_measure, synthetic_batch
from engine.methods import lora_fused
from engine.methods.lora import LoraLinear
from engine.loss import compute_loss
from tests.method_helpers import perturb_trainable

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    lora_fused.set_mode("auto")


def loss_and_grads(model, batch, mode: str, amp: bool):
    lora_fused.set_mode(mode)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = compute_loss(model, batch, "causal_lm")
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def lora_output_nodes(model, batch, mode: str) -> set[str]:
    """grad_fn class names of every LoRA layer's output in one forward."""
    lora_fused.set_mode(mode)
    seen = set()

    def node(out):
        fn = out.grad_fn
        while type(fn).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
            fn = fn.next_functions[0][0]
        seen.add(type(fn).__name__)

    hooks = [m.register_forward_hook(lambda mod, a, out: node(out))
             for m in model.modules() if isinstance(m, LoraLinear)]
    compute_loss(model, batch, "causal_lm")
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_equals_module_path(method, amp):
    prep = prepare_for_measure("tiny-llama", {"name": method, "r": 4, "target_modules": ALL})
    model = prep.model.train()
    perturb_trainable(model, scale=0.2)                 # B = 0 at init would hide half the math
    batch = synthetic_batch("causal_lm", 2, 12, model.get_input_embeddings().num_embeddings)
    loss_ref, g_ref = loss_and_grads(model, batch, "off", amp)
    loss_fused, g_fused = loss_and_grads(model, batch, "on", amp)
    assert lora_output_nodes(model, batch, "on") == {"_LoraLinearFnBackward"}
    assert "_LoraLinearFnBackward" not in lora_output_nodes(model, batch, "off")
    assert g_ref.keys() == g_fused.keys() and any("lora_A" in n for n in g_ref)
    for n in g_ref:
        assert g_fused[n].dtype == g_ref[n].dtype == torch.float32, n
    if not amp:
        assert loss_fused == pytest.approx(loss_ref, rel=1e-5)
        for n in g_ref:
            err = (g_fused[n] - g_ref[n]).norm() / g_ref[n].norm().clamp_min(1e-12)
            assert err < 1e-5, f"{n}: relative gradient error {err:.2e}"
        return
    # bf16: both paths round differently; each is judged against the fp32 truth, and the
    # fused one may not be much worse than the module path (on this 32-wide random model
    # bf16 alone moves the gradients by ~10%; a wrong formula moves them by ~100%)
    loss32, g32 = loss_and_grads(model, batch, "off", False)
    assert loss_fused == pytest.approx(loss32, rel=2e-2)
    for n in g32:
        rel = lambda g: float((g[n] - g32[n]).norm() / g32[n].norm().clamp_min(1e-12))  # noqa: E731
        assert rel(g_fused) < 0.3 and rel(g_fused) <= 2 * rel(g_ref) + 0.02, \
            f"{n}: fused {rel(g_fused):.3f} vs module path {rel(g_ref):.3f} from fp32"


def test_fused_with_bias_and_input_grad():
    """A base with a bias, an input that requires grad: every gradient matches."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    ref = LoraLinear(copy.deepcopy(base), r=3, alpha=6.0)
    nn.init.normal_(ref.lora_B.weight)
    ref.base_layer.bias.requires_grad_(True)
    fused = copy.deepcopy(ref)
    x = torch.randn(5, 7, 24)
    outs = []
    for layer, mode in ((ref, "off"), (fused, "on")):
        lora_fused.set_mode(mode)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        outs.append((y.detach(), xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad,
                     layer.base_layer.bias.grad))
    assert type(fused(x).grad_fn.next_functions[0][0]).__name__ == "_LoraLinearFnBackward"
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_not_taken_where_it_does_not_apply():
    lora_fused.set_mode("on")
    torch.manual_seed(0)
    with_dropout = LoraLinear(nn.Linear(8, 8), r=2, alpha=4.0, dropout=0.1)
    assert with_dropout.fused_weight() is None
    plain = LoraLinear(nn.Linear(8, 8), r=2, alpha=4.0)
    assert plain.fused_weight() is not None
    plain.merge()
    assert plain.fused_weight() is None
    prep = prepare_for_measure("tiny-llama", {"name": "dora", "r": 2})
    batch = synthetic_batch("causal_lm", 1, 6, prep.model.get_input_embeddings().num_embeddings)
    assert "_LoraLinearFnBackward" not in lora_output_nodes(prep.model, batch, "on")


def test_mode_from_env(monkeypatch):
    monkeypatch.setenv("STUDIO_FUSED_LORA", "sometimes")
    with pytest.raises(ValueError, match="STUDIO_FUSED_LORA"):
        lora_fused._mode_from_env()
    with pytest.raises(ValueError, match="expected auto, on or off"):
        lora_fused.set_mode("maybe")
    assert not lora_fused.enabled_for(torch.zeros(1))            # auto: CUDA tensors only

"""Our LoRA training step equals peft's (issue 17, item 9): the equivalence that makes
bench/engine_vs_peft.py's speed figures a comparison of the same work.

Both sides are built as the bench builds them, from one tiny random Llama, one
batch and one LoRA initialisation:
- engine: `engine.prepare.apply_method` (with its layer swaps: fused SwiGLU,
  RMSNorm and RoPE kernels, FastLinear GEMMs) and `engine.loss.compute_loss`
  (the chunked cross-entropy);
- peft: `peft.get_peft_model` on the untouched transformers model, and the model's
  own loss.

Checked within 1e-5 relative, with the fused C kernels on and off: the loss and
every LoRA gradient (A and B of every adapted layer) of one step, then the losses,
gradients and updated LoRA weights of each of 5 AdamW steps. LoRA dropout is on
(p = 0.1) and both sides draw their masks from the same RNG state, so a different
scaling, a dropout in another place or of another rate fails here (checked by
breaking each in the engine once: scaling x1.0005, rsLoRA scaling, dropout after A,
no dropout, p x1.5; and the fused SwiGLU x1.0001, which fails the fused-on cases only). peft is a test dependency
(the `test` extra): without it this file fails, it does not skip.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import LlamaForCausalLM

from engine import fused
from engine.methods import ApplyContext, get_method, parse_method_config
from engine.models import tiny_config
from engine.optim import make_optimizer
from engine.prepare import apply_method
from engine.loss import compute_loss

RTOL = 1e-5
VOCAB = 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"name": "lora", "r": 4, "alpha": 12, "dropout": 0.1, "target_modules": TARGETS}
N_LAYERS = 2


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_config("llama", VOCAB, num_hidden_layers=N_LAYERS)
    return LlamaForCausalLM(cfg).float()


def batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (3, 17), generator=g)
        labels = ids.clone()
        labels[0, :5] = -100           # a masked prompt: both sides must average over the same tokens
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def key(name: str) -> str:
    """A LoRA parameter's name without peft's wrapper prefix and adapter name."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {key(n): p for n, p in model.named_parameters() if p.requires_grad}


def build_pair():
    """(engine model, peft model) with the same base weights and the same LoRA A and B
    (B non-zero, so that A's gradient is not trivially zero)."""
    base = tiny_llama()
    cfg = parse_method_config(LORA)
    ours = apply_method(copy.deepcopy(base), get_method("lora"), cfg, ApplyContext(task="causal_lm", seed=0))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=TARGETS,
        task_type="CAUSAL_LM"))
    a, b = lora_params(ours), lora_params(theirs)
    assert set(a) == set(b) and len(a) == 2 * len(TARGETS) * N_LAYERS, (sorted(a), sorted(b))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in sorted(a):
            init = a[name].detach().clone()
            if ".lora_B." in name:
                init = torch.randn(init.shape, generator=g) * 0.1
            a[name].copy_(init)
            b[name].copy_(init)
    ours.train()
    theirs.train()
    return ours, theirs


def step_loss(model, batch: dict, side: str, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)            # the same dropout masks on both sides
    if side == "engine":
        return compute_loss(model, batch, "causal_lm")
    return model(**batch).loss


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_same(ours: dict, theirs: dict, what: str) -> None:
    for name in sorted(theirs):
        t = theirs[name]
        assert t is not None and t.abs().max() > 0, f"{what} {name}: zero on peft's side, the check proves nothing"
        err = rel(ours[name], t)
        assert err <= RTOL, f"{what} {name}: relative difference {err:.2e} > {RTOL:g}"


@pytest.fixture(params=[True, False], ids=["fused-on", "fused-off"])
def fused_kernels(request):
    if request.param and fused.library() is None:
        pytest.fail(f"the fused kernels should build here: {fused.unavailable_reason()}")
    fused.set_enabled(request.param)
    try:
        assert fused.applies(torch.ones(4)) is request.param     # the switch the engine's layers read
        yield request.param
    finally:
        fused.set_enabled(fused._enabled_by_env())


def test_one_lora_step_equals_peft(fused_kernels):
    ours, theirs = build_pair()
    batch = batches(1)[0]
    lo, lt = step_loss(ours, batch, "engine", 11), step_loss(theirs, batch, "peft", 11)
    lo.backward()
    lt.backward()
    assert abs(lo.item() - lt.item()) <= RTOL * abs(lt.item()), (lo.item(), lt.item())
    assert_same({n: p.grad for n, p in lora_params(ours).items()},
                {n: p.grad for n, p in lora_params(theirs).items()}, "gradient")
    # dropout was really on: the same step without it gives another loss
    ours.eval()
    with torch.no_grad():
        assert abs(compute_loss(ours, batch, "causal_lm").item() - lo.item()) > 1e-4


def test_five_adamw_steps_equal_peft(fused_kernels):
    """Each step starts both sides from the same LoRA weights (peft's), each side steps
    its own AdamW, whose moments come from its own gradients of all earlier steps. Not
    re-syncing compares rounding amplified: Adam turns the last-bit differences of
    near-zero gradient elements into lr-sized moves (measured here without re-sync:
    gradients 1.7e-5 to 4e-5 apart by step 2 with eps 1e-8 to 1e-6, losses still within
    2e-7). eps = 1e-5 bounds that amplification (lr / eps) so that one step's update is
    comparable at 1e-5 (measured: gradients within 2.6e-6, updated weights within 7.6e-7
    over 4 batch seeds, fused kernels on and off)."""
    ours, theirs = build_pair()
    po, pt = lora_params(ours), lora_params(theirs)
    assert type(make_optimizer("adamw", list(po.values()), lr=1e-3)) is torch.optim.AdamW   # what train() uses
    opts = {"engine": torch.optim.AdamW(list(po.values()), lr=1e-3, weight_decay=0.01, eps=1e-5),
            "peft": torch.optim.AdamW(list(pt.values()), lr=1e-3, weight_decay=0.01, eps=1e-5)}
    start = {n: p.detach().clone() for n, p in pt.items()}
    for i, batch in enumerate(batches(5)):
        with torch.no_grad():
            for n, p in po.items():
                p.copy_(pt[n])
        losses, grads = {}, {}
        for side, model in (("engine", ours), ("peft", theirs)):
            loss = step_loss(model, batch, side, 100 + i)
            loss.backward()
            losses[side] = loss.item()
            grads[side] = {n: p.grad.clone() for n, p in lora_params(model).items()}
            opts[side].step()
            opts[side].zero_grad(set_to_none=True)
        assert abs(losses["engine"] - losses["peft"]) <= RTOL * abs(losses["peft"]), (i, losses)
        assert_same(grads["engine"], grads["peft"], f"step {i + 1} gradient")
        assert_same({n: p.detach() for n, p in po.items()}, {n: p.detach() for n, p in pt.items()},
                    f"weight after step {i + 1}")
    # the steps moved every adapter tensor (A from its init too)
    moved = min(rel(p.detach(), start[n]) for n, p in pt.items())
    assert moved > 1e-3, moved

"""AdaLoRA: adaptive budget allocation for low-rank adaptation.

Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen, Zhao, "AdaLoRA: Adaptive
Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023, arXiv:2303.10512.

Each target layer learns an SVD-shaped update W + (alpha / init_r) * P diag(Λ) Q
(P = `lora_B`, out x init_r; Λ = `lora_E`, init_r x 1; Q = `lora_A`, init_r x in).
During training the importance of every singular triplet is estimated from the
sensitivity |θ · ∂L/∂θ|, smoothed (beta1) and weighted by its uncertainty (beta2),
and the least important triplets are masked (Λ_i = 0) so that the total rank
follows a cubic schedule from init_r to target_r per layer: full budget for the
first `tinit` steps, then the cubic decrease, then fixed at target_r for the last
`tfinal` steps, re-allocating every `deltaT` steps. An orthogonality regulariser
orth_reg_weight * mean(||Q Q^T - I||_F + ||P^T P - I||_F) keeps P and Q near
orthogonal. The trainable-parameter count stays init_r * (in + out + 1) per layer
(masked triplets are zeros, not removed).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..arch import arch_of, set_submodule
from .base import AdapterLayer, ApplyContext, MethodConfig, MethodSpec, freeze_all, merge_and_unload
from .plan import Plan, low_rank_plan
from .targeting import check_target_list, is_conv1d, linear_like, resolve_targets, resolve_targets_in_dims
from .lora import dense_weight, layer_compute_dtype, layer_features


class AdaLoraConfig(MethodConfig):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0, le=4096, description="starting rank per layer")
    target_r: int = Field(8, gt=0, le=4096, description="average final rank per layer")
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[list[str], str, None] = None
    tinit: int = Field(0, ge=0, description="steps of warm-up with the full budget")
    tfinal: int = Field(0, ge=0, description="final steps with the budget fixed at target_r")
    deltaT: int = Field(1, gt=0, description="steps between two budget allocations")
    beta1: float = Field(0.85, ge=0.0, lt=1.0, description="EMA of the sensitivity")
    beta2: float = Field(0.85, ge=0.0, lt=1.0, description="EMA of the uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0.0)

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        return check_target_list(v)

    @model_validator(mode="before")
    @classmethod
    def _no_expert_tensors(cls, data):
        # lora's target_parameters (expert tensors of MoE models) has no AdaLoRA form: say why, not just "extra"
        if isinstance(data, dict) and data.get("target_parameters"):
            raise ValueError("method.target_parameters: not available with adalora: its SVD-form update "
                             "P·diag(E)·Q and rank budget are per linear layer, and peft's AdaLoRA has no "
                             "expert-tensor form; use method lora (or qlora) for the experts of a "
                             "mixture-of-experts model")
        return data

    @model_validator(mode="after")
    def _budget(self):
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        return self


class SVDLinear(AdapterLayer):
    """y = base(x) + (alpha / r) * B diag(E) A dropout(x)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        self.r = r
        self.scaling = alpha / r
        self.fan_in_fan_out = is_conv1d(base)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        fin, fout = layer_features(base)
        dev, dt = base.weight.device, layer_compute_dtype(base)
        self.lora_A = nn.Parameter(torch.randn(r, fin, device=dev, dtype=dt) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.randn(fout, r, device=dev, dtype=dt) * 0.02)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        dx = self.lora_dropout(x.to(self.lora_A.dtype))
        return y + ((dx @ (self.lora_A * self.lora_E).T) @ self.lora_B.T * self.scaling).to(y.dtype)

    def active_rank(self) -> int:
        return int((self.lora_E.detach() != 0).sum())


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLinear)]


# ---- importance and budget -----------------------------------------------------------------------

class RankAllocator:
    """Keeps the smoothed sensitivity and uncertainty of every AdaLoRA parameter and
    masks the least important singular values to follow the budget schedule."""

    def __init__(self, cfg: AdaLoraConfig, n_layers: int):
        self.cfg = cfg
        self.n_layers = n_layers
        self.init_budget = cfg.init_r * n_layers
        self.target_budget = cfg.target_r * n_layers
        self.ipt: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}
        self.last_budget = self.init_budget

    def budget(self, step: int, total: int) -> tuple[int, bool]:
        """(budget in ranks, whether to re-allocate now) for 0-based `step` of `total`."""
        c = self.cfg
        if step < c.tinit:
            return self.init_budget, False
        span = total - c.tfinal - c.tinit
        if step >= total - c.tfinal or span <= 0:
            return self.target_budget, True
        mul = 1 - (step - c.tinit) / span
        b = int((self.init_budget - self.target_budget) * mul ** 3 + self.target_budget)
        return b, step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self, layers) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for _, layer in layers:
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                if p.grad is None:
                    continue
                s = (p * p.grad).abs()
                k = id(p)
                if k not in self.ipt:
                    self.ipt[k] = torch.zeros_like(p)
                    self.unc[k] = torch.zeros_like(p)
                self.ipt[k].mul_(b1).add_(s, alpha=1 - b1)
                self.unc[k].mul_(b2).add_((s - self.ipt[k]).abs(), alpha=1 - b2)

    def score(self, p: torch.Tensor) -> torch.Tensor:
        k = id(p)
        if k not in self.ipt:
            return torch.zeros_like(p)
        return self.ipt[k] * self.unc[k]

    def triplet_scores(self, layer: SVDLinear) -> torch.Tensor:
        """Importance of each of the layer's r triplets: s(E_i) + mean s(A_i,:) + mean s(B_:,i)."""
        return (self.score(layer.lora_E).view(-1) + self.score(layer.lora_A).mean(dim=1)
                + self.score(layer.lora_B).mean(dim=0))

    @torch.no_grad()
    def mask_to_budget(self, layers, budget: int) -> None:
        scores = torch.cat([self.triplet_scores(l).float().cpu() for _, l in layers])
        n_drop = scores.numel() - budget
        if n_drop <= 0:
            return
        threshold = torch.kthvalue(scores, n_drop).values
        for _, l in layers:
            keep = (self.triplet_scores(l) > threshold.to(l.lora_E.device)).view(-1, 1)
            l.lora_E.masked_fill_(~keep, 0.0)
        self.last_budget = budget


def allocator_of(model: nn.Module) -> RankAllocator:
    alloc = getattr(model, "_adalora_allocator", None)
    if alloc is None:
        raise RuntimeError("AdaLoRA hooks called on a model without AdaLoRA applied")
    return alloc


def adalora_after_backward(model: nn.Module, step: int, total: int) -> None:
    allocator_of(model).update_importance(svd_layers(model))


def adalora_after_step(model: nn.Module, step: int, total: int) -> None:
    alloc = allocator_of(model)
    budget, now = alloc.budget(step, total)
    if now:
        alloc.mask_to_budget(svd_layers(model), budget)


def orthogonal_regularization(model: nn.Module) -> torch.Tensor:
    alloc = getattr(model, "_adalora_allocator", None)
    layers = svd_layers(model)
    w = alloc.cfg.orth_reg_weight if alloc is not None else 0.0
    if not layers or w == 0:
        p = next(model.parameters())
        return p.new_zeros(())
    total = 0.0
    for _, l in layers:
        a, b = l.lora_A, l.lora_B
        eye = torch.eye(l.r, device=a.device, dtype=a.dtype)
        total = total + torch.linalg.norm(a @ a.T - eye) + torch.linalg.norm(b.T @ b - eye)
    return w * total / (2 * len(layers))


# ---- apply / count -------------------------------------------------------------------------------

def apply_adalora(model: nn.Module, cfg: AdaLoraConfig, ctx: ApplyContext) -> None:
    freeze_all(model)
    targets = cfg.target_modules or list(arch_of(model).default_lora_targets)
    names = resolve_targets(model, targets, want=linear_like)
    torch.manual_seed(ctx.seed)
    for n in names:
        set_submodule(model, n, SVDLinear(model.get_submodule(n), cfg.init_r, cfg.alpha, cfg.dropout))
    # a plain attribute (not a module): the training hooks find the allocator here
    object.__setattr__(model, "_adalora_allocator", RankAllocator(cfg, len(names)))


def count_adalora_trainable(dims, cfg: AdaLoraConfig, task: str) -> int:
    targets = cfg.target_modules or list(dims.arch.default_lora_targets)
    return sum(cfg.init_r * (l.in_features + l.out_features + 1)
               for l in resolve_targets_in_dims(dims, targets, task))


def rank_summary(model: nn.Module) -> dict[str, int]:
    """Active (unmasked) rank of every AdaLoRA layer."""
    return {n: l.active_rank() for n, l in svd_layers(model)}


def plan_adalora(dims, cfg: AdaLoraConfig, task: str) -> Plan:
    """Every target at the starting rank init_r (masked triplets stay in the tensors)."""
    targets = cfg.target_modules or list(dims.arch.default_lora_targets)
    ranks = {l.name: cfg.init_r for l in resolve_targets_in_dims(dims, targets, task)}
    return low_rank_plan(dims, ranks, float(cfg.dropout or 0.0))


SPEC = MethodSpec(
    name="adalora", config_cls=AdaLoraConfig, apply=apply_adalora,
    paper="Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning "
          "(arXiv:2303.10512)",
    summary="SVD-form low-rank updates whose rank budget is re-allocated by importance during training.",
    trains="P, Λ, Q of each target layer (singular values masked to the budget)",
    mergeable=True, merge=merge_and_unload, count_trainable=count_adalora_trainable,
    extra_loss=orthogonal_regularization, after_backward=adalora_after_backward, after_step=adalora_after_step,
    family="lora", plan=plan_adalora,
    default_lr=0.03,   # bench/RESULTS-default-lr.md
)

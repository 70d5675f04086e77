"""LoHa: low-rank Hadamard-product adaptation.

Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning", ICLR 2022, arXiv:2108.06098
(the LoHa adapter of the LyCORIS library and of peft).

A frozen weight W (out x in) becomes W + ΔW with

    ΔW = s · (B₁A₁) ⊙ (B₂A₂),   B₁, B₂: out x r,   A₁, A₂: r x in,   s = alpha / r

              x ──► W ─────────────────────────┐
              │                                 (+) ──► y
              └──► (B₁A₁ ⊙ B₂A₂)·s ────────────┘

so a rank-r budget reaches rank up to r² for 2r(out+in) parameters. peft's names
and initialisation: hada_w1_a = B₁ and hada_w1_b = A₁ (likewise w2); every factor
Kaiming-uniform except hada_w2_b = 0, so training starts from the base model
(`init_weights: false`: all random). `rank_dropout` drops rows of ΔW during
training (rescaled by the kept fraction), `module_dropout` skips the whole update
for a step with that probability. Mergeable; exported in peft's LOHA format.
ΔW is built once per forward by a function that keeps only the four factors for
backward and rebuilds the products there (as FedPara does); the linear over x then
keeps x and ΔW (the estimator's `weight_saved`).
"""

from __future__ import annotations

import math
import re
from typing import Literal, Union

import torch
from pydantic import Field, field_validator
from torch import nn

from .base import ApplyContext, MethodConfig, MethodSpec, PeftExport, merge_and_unload
from .lora import check_alpha_pattern, check_rank_pattern, pattern_value
from .plan import Plan
from .reparam import (FAMILY, DenseDeltaLinear, delta_dtype, layers_of, load_by_name, peft_targets,
                      targets_in_dims, weight_saved_plan, wrap_targets)
from .targeting import check_target_list


class LohaConfig(MethodConfig):
    name: Literal["loha"] = "loha"
    r: int = Field(8, gt=0, le=4096, description="rank of each of the two Hadamard factors")
    alpha: float = Field(8.0, gt=0, description="scale = alpha / r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability of dropping a row of ΔW per step")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability of skipping the update per step")
    target_modules: Union[list[str], str, None] = Field(
        None, description="module name suffixes, a regex, or 'all-linear'; default per architecture")
    init_weights: bool = Field(True, description="true: hada_w2_b = 0 (start from the base model); false: random")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="module-name regex -> rank")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="module-name regex -> alpha")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        return check_target_list(v)

    @field_validator("rank_pattern")
    @classmethod
    def _ranks(cls, v):
        return check_rank_pattern(v)

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas(cls, v):
        return check_alpha_pattern(v)


def rank_alpha(cfg, name: str) -> tuple[int, float]:
    """A module's (r, alpha) after rank_pattern / alpha_pattern (peft's suffix-regex rule)."""
    return pattern_value(cfg.rank_pattern, name) or cfg.r, pattern_value(cfg.alpha_pattern, name) or cfg.alpha


class _HadamardDelta(torch.autograd.Function):
    """(w1a @ w1b) ⊙ (w2a @ w2b) · s, saving only the factors for backward."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, s: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.s = s
        return (w1a @ w1b) * (w2a @ w2b) * s

    @staticmethod
    def backward(ctx, g):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g = g * ctx.s
        g1 = g * (w2a @ w2b)
        g2 = g * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


class LohaLinear(DenseDeltaLinear):
    """y = base(x) + x @ ΔWᵀ with ΔW = s·(hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, cfg: LohaConfig):
        super().__init__(base, r, alpha, cfg.rank_dropout, cfg.module_dropout, rank_dropout_scale=True)
        out, fin = base.weight.shape
        kw = dict(device=base.weight.device, dtype=delta_dtype(base))
        self.hada_w1_a = nn.Parameter(torch.empty(out, r, **kw))
        self.hada_w1_b = nn.Parameter(torch.empty(r, fin, **kw))
        self.hada_w2_a = nn.Parameter(torch.empty(out, r, **kw))
        self.hada_w2_b = nn.Parameter(torch.empty(r, fin, **kw))
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if cfg.init_weights:
                self.hada_w2_b.zero_()

    def delta_weight(self) -> torch.Tensor:
        return _HadamardDelta.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling)


def apply_loha(model: nn.Module, cfg: LohaConfig, ctx: ApplyContext) -> None:
    wrap_targets(model, cfg.target_modules, "loha", ctx.seed,
                 lambda n, base: LohaLinear(base, *rank_alpha(cfg, n), cfg))


def count_loha_trainable(dims, cfg: LohaConfig, task: str) -> int:
    return sum(2 * rank_alpha(cfg, l.name)[0] * (l.in_features + l.out_features)
               for l in targets_in_dims(dims, cfg.target_modules, task))


def dense_delta_plan(dims, target_modules, task: str) -> Plan:
    """Each target adds x @ ΔWᵀ: x and the dense ΔW (out x in) are kept for backward."""
    return weight_saved_plan(dims, {l.name: l.in_features * l.out_features
                                    for l in targets_in_dims(dims, target_modules, task)})


def plan_loha(dims, cfg: LohaConfig, task: str) -> Plan:
    return dense_delta_plan(dims, cfg.target_modules, task)


def lycoris_rank_config(per_module: dict[str, tuple[int, float]], cfg) -> dict:
    """r, alpha and the per-module patterns for adapter_config.json: full module
    names (escaped), so peft gives each module exactly its rank and alpha."""
    r0, a0 = cfg.r, float(cfg.alpha)
    ranks = {re.escape(n): r for n, (r, _) in per_module.items() if r != r0}
    alphas = {re.escape(n): a for n, (_, a) in per_module.items() if a != a0}
    return {"r": r0, "alpha": a0, "rank_pattern": ranks, "alpha_pattern": alphas}


def export_loha_peft(model: nn.Module, cfg: LohaConfig, ctx: ApplyContext) -> PeftExport:
    layers = layers_of(model, LohaLinear)
    if not layers:
        raise ValueError("the model has no LoHa layers to export")
    tensors = {}
    for n, l in layers:
        for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            tensors[f"base_model.model.{n}.{p}"] = getattr(l, p).detach().contiguous()
    config = {
        "peft_type": "LOHA", **lycoris_rank_config({n: (l.r, l.alpha) for n, l in layers}, cfg),
        "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
        "target_modules": peft_targets(model, layers), "use_effective_conv2d": False,
        "init_weights": cfg.init_weights, "inference_mode": True,
    }
    return PeftExport(adapter_config=config, tensors=tensors)


def config_from_peft(cfg: dict) -> LohaConfig:
    """Our config for a peft LOHA adapter_config.json."""
    unsupported = [k for k in ("layers_to_transform", "exclude_modules", "use_effective_conv2d") if cfg.get(k)]
    if unsupported:
        raise ValueError(f"peft LoHa adapter uses options the engine does not import: {', '.join(unsupported)}")
    t = cfg.get("target_modules")
    return LohaConfig(r=cfg.get("r", 8), alpha=cfg.get("alpha", 8), target_modules=t if isinstance(t, str) else list(t),
                      rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {})


def load_loha_state(model: nn.Module, tensors: dict) -> None:
    load_by_name(model, tensors, LohaLinear)


PEFT_TYPE = "LOHA"

SPEC = MethodSpec(
    name="loha", config_cls=LohaConfig, apply=apply_loha,
    paper="Hyeon-Woo et al. 2022, FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated "
          "Learning (arXiv:2108.06098)",
    summary="Trains ΔW = (B₁A₁) ⊙ (B₂A₂): a Hadamard product of two rank-r updates reaches rank r²; mergeable.",
    trains="two pairs of low-rank factors per target linear layer",
    mergeable=True, merge=merge_and_unload, peft_export=export_loha_peft, count_trainable=count_loha_trainable,
    load_state=load_loha_state, family=FAMILY, plan=plan_loha,
    default_lr=0.03,   # bench/RESULTS-default-lr.md
)

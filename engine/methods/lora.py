"""LoRA: Low-Rank Adaptation.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
arXiv:2106.09685.

A frozen weight W (out x in) is adapted as W + (alpha / r) * B @ A with
A (r x in) and B (out x r); B starts at zero so training starts from the base
model. Only A and B train.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
from pydantic import Field, field_validator
from torch import nn

from ..arch import set_submodule
from .base import ApplyContext, MethodConfig, PeftExport, freeze_all
from .targeting import resolve_targets, short_names


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, le=4096, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: scale = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[list[str], str, None] = Field(
        None, description="module name suffixes, a regex, or 'all-linear'; default per architecture")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module")
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty")
        return v


class LoraLinear(nn.Module):
    """A Linear with a low-rank residual: y = base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r = r
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, cfg: LoraConfig, ctx: ApplyContext) -> None:
    from ..arch import arch_of
    freeze_all(model)
    targets = cfg.target_modules or list(arch_of(model).default_lora_targets)
    torch.manual_seed(ctx.seed)
    for name in resolve_targets(model, targets, want=lambda m: isinstance(m, nn.Linear)):
        base = model.get_submodule(name)
        set_submodule(model, name, LoraLinear(base, cfg.r, cfg.alpha, cfg.dropout))


def lora_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight and put the plain Linear back."""
    for name, layer in lora_layers(model):
        layer.merge()
        set_submodule(model, name, layer.base_layer)


def export_lora_peft(model: nn.Module, cfg: LoraConfig, ctx: ApplyContext) -> PeftExport:
    layers = lora_layers(model)
    tensors = {}
    for name, layer in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
    config = {
        "peft_type": "LORA",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": short_names(n for n, _ in layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return PeftExport(adapter_config=config, tensors=tensors)

"""DoRA: Weight-Decomposed Low-Rank Adaptation.

Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen, "DoRA: Weight-Decomposed Low-Rank
Adaptation", ICML 2024, arXiv:2402.09353.

The adapted weight is split into magnitude and direction:
W' = m * (W + s B A) / ||W + s B A||_c, where ||.||_c is the norm of each output
row (a column of the paper's in x out layout) and m, a learned vector initialised
to ||W||_c, trains with A and B. As the paper suggests (Sec. 4.3), the norm is
treated as a constant in backward. Mergeable; exported as peft LoRA with
`use_dora: true` and the `lora_magnitude_vector` tensors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

import torch
from torch import nn

from ..gemm import linear
from .base import ApplyContext, MethodSpec, PeftExport, merge_and_unload
from .lora import LoraConfig, LoraLinear, apply_lora, count_lora_trainable, dense_weight, lora_family_plan, \
    lora_peft_export, lora_targets_in_dims
from .plan import Plan


class DoraConfig(LoraConfig):
    name: Literal["dora"] = "dora"

    @model_validator(mode="after")
    def _no_expert_tensors(self):
        if self.target_parameters:
            raise ValueError("method.target_parameters: not available with dora: DoRA renormalises each output "
                             "row of one weight, and peft defines no DoRA on expert tensors (its ParamWrapper "
                             "refuses use_dora); use method lora for the experts")
        return self


class DoraLinear(LoraLinear):
    """LoRA plus a learned magnitude per output feature."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, **kw):
        super().__init__(base, r, alpha, dropout, **kw)
        with torch.no_grad():
            norm = self.adapted_weight().norm(dim=1)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.weight.dtype).clone())
        self._merged_norm = None

    def adapted_weight(self) -> torch.Tensor:
        """W + s B A, (out x in)."""
        w = dense_weight(self.base_layer)
        return w.to(self.lora_A.weight.dtype) + self.delta_weight()

    def magnitude_scale(self) -> torch.Tensor:
        """m / ||W + s B A||_c with the norm detached."""
        with torch.no_grad():
            norm = self.adapted_weight().norm(dim=1)
        return self.lora_magnitude_vector / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        dt = self.lora_A.weight.dtype
        xin = x if x.dtype == dt else x.to(dt)
        w = dense_weight(self.base_layer).to(dt)
        scale = self.magnitude_scale()
        bias = self.base_layer.bias
        if isinstance(self.lora_dropout, nn.Identity):
            out = scale * (linear(xin, w) + self.lora_out(xin))
            if bias is not None:
                out = out + bias.to(dt)
            return out.to(x.dtype)
        dx = self.lora_dropout(xin)
        y = self.base_layer(x).to(dt)
        return (y + (scale - 1) * linear(dx, w) + scale * (self.lora_B(self.lora_A(dx)) * self.scaling)).to(x.dtype)

    def _set_base(self, w_out_in: torch.Tensor) -> None:
        wt = self.base_layer.weight
        wt.copy_((w_out_in.T if self.fan_in_fan_out else w_out_in).to(wt.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        adapted = self.adapted_weight()
        norm = adapted.norm(dim=1)
        self._merged_norm = norm
        self._set_base((self.lora_magnitude_vector / norm)[:, None] * adapted)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = dense_weight(self.base_layer).to(self.lora_A.weight.dtype)
        adapted = w * (self._merged_norm / self.lora_magnitude_vector)[:, None]
        self._set_base(adapted - self.delta_weight())
        self.merged = False


def dora_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DoraLinear)]


def apply_dora(model: nn.Module, cfg: DoraConfig, ctx: ApplyContext) -> None:
    apply_lora(model, cfg, ctx, layer_cls=DoraLinear)


def count_dora_trainable(dims, cfg: DoraConfig, task: str) -> int:
    return count_lora_trainable(dims, cfg, task) + sum(l.out_features for l in lora_targets_in_dims(dims, cfg, task))


def export_dora_peft(model: nn.Module, cfg: DoraConfig, ctx: ApplyContext) -> PeftExport:
    layers = dora_layers(model)
    mags = {f"base_model.model.{n}.lora_magnitude_vector": l.lora_magnitude_vector.detach() for n, l in layers}
    return lora_peft_export(model, layers, cfg, extra_tensors=mags, use_dora=True)


def plan_dora(dims, cfg: DoraConfig, task: str) -> Plan:
    return lora_family_plan(dims, cfg, task, dora=True)


SPEC = MethodSpec(
    name="dora", config_cls=DoraConfig, apply=apply_dora,
    paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)",
    summary="LoRA on the direction of each weight plus a learned magnitude vector; mergeable.",
    trains="A, B and a magnitude per output feature on the target linear layers",
    mergeable=True, merge=merge_and_unload, peft_export=export_dora_peft, count_trainable=count_dora_trainable,
    family="lora", plan=plan_dora,
    default_lr=0.005,   # bench/RESULTS-default-lr.md
)

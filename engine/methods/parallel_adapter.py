"""Parallel adapter: a scaled bottleneck beside the FFN (or the attention).

He, Zhou, Ma, Berg-Kirkpatrick & Neubig 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning", ICLR 2022, arXiv:2110.04366.

    h = sublayer(x) + s * up(act(down(x)))      (up starts at zero)

The layers and their placement are in engine.methods.bottleneck. Not mergeable.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import ApplyContext, MethodSpec, freeze_all
from .bottleneck import (BottleneckSize, adapter_plan, add_parallel_adapters, bottleneck_params, bottleneck_width,
                         check_family, chosen_layers)
from .plan import Plan


class ParallelAdapterConfig(BottleneckSize):
    name: Literal["parallel_adapter"] = "parallel_adapter"
    placement: Literal["ffn", "attn", "both"] = Field("ffn", description="beside the FFN (the paper's best) or attention")
    scale: float = Field(4.0, gt=0, le=1000, description="s in h + s * adapter(x) (He et al. use 4)")


def apply_parallel_adapter(model: nn.Module, cfg: ParallelAdapterConfig, ctx: ApplyContext) -> None:
    check_family(model, "parallel_adapter")
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    layers = chosen_layers(model.config.num_hidden_layers, cfg.layers)
    width = bottleneck_width(model.config.hidden_size, cfg.bottleneck_size, cfg.reduction_factor)
    add_parallel_adapters(model, width, cfg.activation, layers, cfg.placement, cfg.scale)


def count_parallel_adapter(dims, cfg: ParallelAdapterConfig, task: str) -> int:
    layers = chosen_layers(dims.num_layers, cfg.layers)
    width = bottleneck_width(dims.hidden_size, cfg.bottleneck_size, cfg.reduction_factor)
    sites = 2 if cfg.placement == "both" else 1
    return len(layers) * sites * bottleneck_params(dims.hidden_size, width)


def plan_parallel_adapter(dims, cfg: ParallelAdapterConfig, task: str) -> Plan:
    return adapter_plan(dims, cfg, "parallel", cfg.placement)


SPEC = MethodSpec(
    name="parallel_adapter", config_cls=ParallelAdapterConfig, apply=apply_parallel_adapter,
    paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv:2110.04366)",
    summary="A scaled bottleneck adapter computed from the FFN (or attention) input, added beside it.",
    trains="bottleneck adapters beside the FFN and/or attention",
    count_trainable=count_parallel_adapter, family="adapter", plan=plan_parallel_adapter,
    default_lr=0.003,   # bench/RESULTS-default-lr.md
)

"""MAM adapter ("Mix-And-Match").

He, Zhou, Ma, Berg-Kirkpatrick & Neubig 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning", ICLR 2022, arXiv:2110.04366, section 4.6.

The paper's best combination: prefix tuning on the attention (a short prefix,
l = 30 in the paper) plus a scaled parallel adapter beside the FFN (bottleneck
512, scale s = 4). Here it is exactly our `prefix_tuning` (engine.methods.prefix,
with the same MLP reparameterisation) and our `parallel_adapter` on the FFN
(engine.methods.bottleneck), applied together. Not mergeable.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from .base import ApplyContext, MethodSpec, freeze_all
from .bottleneck import (BottleneckSize, adapter_plan, add_parallel_adapters, bottleneck_params, bottleneck_width, check_family,
                         chosen_layers)
from .plan import Plan
from .prefix import add_prefix_groups, check_prefix_family, count_prefix_group


class MamConfig(BottleneckSize):
    name: Literal["mam"] = "mam"
    num_virtual_tokens: int = Field(30, gt=0, le=4096, description="prefix length per layer (paper: 30)")
    prefix_projection: bool = Field(True, description="MLP reparameterisation of the prefix during training")
    prefix_hidden_size: Optional[int] = Field(None, gt=0, le=65536, description="prefix MLP width")
    scale: float = Field(4.0, gt=0, le=1000, description="s of the parallel FFN adapter (paper: 4)")


def apply_mam(model: nn.Module, cfg: MamConfig, ctx: ApplyContext) -> None:
    check_family(model, "mam")
    check_prefix_family(model, "mam")
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    n_layers = model.config.num_hidden_layers
    add_prefix_groups(model, [(list(range(n_layers)), cfg.num_virtual_tokens)], cfg.prefix_projection,
                      cfg.prefix_hidden_size)
    layers = chosen_layers(n_layers, cfg.layers)
    width = bottleneck_width(model.config.hidden_size, cfg.bottleneck_size, cfg.reduction_factor)
    add_parallel_adapters(model, width, cfg.activation, layers, "ffn", cfg.scale)


def count_mam(dims, cfg: MamConfig, task: str) -> int:
    prefix = count_prefix_group(dims, dims.num_layers, cfg.num_virtual_tokens, cfg.prefix_projection,
                                cfg.prefix_hidden_size)
    layers = chosen_layers(dims.num_layers, cfg.layers)
    width = bottleneck_width(dims.hidden_size, cfg.bottleneck_size, cfg.reduction_factor)
    return prefix + len(layers) * bottleneck_params(dims.hidden_size, width)


def plan_mam(dims, cfg: MamConfig, task: str) -> Plan:
    """Parallel FFN adapters in the chosen blocks, the prefix in every block."""
    plan = adapter_plan(dims, cfg, "parallel", "ffn")
    for lp in plan.layers:
        lp.prefix = int(cfg.num_virtual_tokens)
    return plan


SPEC = MethodSpec(
    name="mam", config_cls=MamConfig, apply=apply_mam,
    paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv:2110.04366), "
          "Mix-And-Match adapter",
    summary="Prefix tuning on attention plus a scaled parallel adapter beside the FFN.",
    trains="prefixes (with their MLP) and parallel FFN adapters",
    count_trainable=count_mam, family="adapter", plan=plan_mam,
    default_lr=0.001,   # bench/RESULTS-default-lr.md
)

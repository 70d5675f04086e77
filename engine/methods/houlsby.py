"""Houlsby adapters: serial bottleneck adapters after attention and after the FFN.

Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan &
Gelly 2019, "Parameter-Efficient Transfer Learning for NLP", ICML 2019,
arXiv:1902.00751.

    h -> proj(h) -> y + up(act(down(y)))        (near-identity at the start)

The layers and their placement are in engine.methods.bottleneck; by default the
blocks' layer norms train too, as in the paper. Not mergeable.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import ApplyContext, MethodSpec, freeze_all
from .bottleneck import (BottleneckSize, adapter_plan, add_serial_adapters, bottleneck_params, bottleneck_width,
                         check_family, chosen_layers, sublayer_norm_params)
from .plan import Plan, layers_subset


class HoulsbyConfig(BottleneckSize):
    name: Literal["houlsby"] = "houlsby"
    placement: Literal["both", "attn", "ffn"] = Field(
        "both", description="after the attention sublayer, after the FFN, or both (the paper)")
    train_layernorm: bool = Field(True, description="also train the blocks' layer norms (the paper does)")
    init_std: float = Field(1e-2, gt=0, le=1.0, description="std of the near-identity initialisation")


def apply_houlsby(model: nn.Module, cfg: HoulsbyConfig, ctx: ApplyContext) -> None:
    check_family(model, "houlsby", parallel=False)
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    layers = chosen_layers(model.config.num_hidden_layers, cfg.layers)
    width = bottleneck_width(model.config.hidden_size, cfg.bottleneck_size, cfg.reduction_factor)
    add_serial_adapters(model, width, cfg.activation, layers, cfg.placement, cfg.init_std, cfg.train_layernorm)


def count_houlsby(dims, cfg: HoulsbyConfig, task: str) -> int:
    layers = chosen_layers(dims.num_layers, cfg.layers)
    width = bottleneck_width(dims.hidden_size, cfg.bottleneck_size, cfg.reduction_factor)
    sites = 2 if cfg.placement == "both" else 1
    per = sites * bottleneck_params(dims.hidden_size, width)
    norms = sublayer_norm_params(dims, layers) if cfg.train_layernorm else 0
    return len(layers) * per + norms


def plan_houlsby(dims, cfg: HoulsbyConfig, task: str) -> Plan:
    plan = adapter_plan(dims, cfg, "serial", cfg.placement)
    if cfg.train_layernorm:
        for i in layers_subset(dims, cfg.layers):
            plan.layers[i].norms = True
    return plan


SPEC = MethodSpec(
    name="houlsby", config_cls=HoulsbyConfig, apply=apply_houlsby,
    paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (arXiv:1902.00751)",
    summary="Serial bottleneck adapters after attention and after the FFN, near-identity init.",
    trains="bottleneck adapters (down, up projections with biases) and, by default, the blocks' layer norms",
    count_trainable=count_houlsby, family="adapter", plan=plan_houlsby,
    default_lr=0.01,   # bench/RESULTS-default-lr.md
)

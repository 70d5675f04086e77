"""Top-k: train the last k transformer blocks plus the final norm (if the model has one).

Lee, Tang, Lin, "What Would Elsa Do? Freezing Layers During Transformer
Fine-Tuning", 2019, arXiv:1911.03090.

Nothing is added, so "merging" changes nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..arch import arch_of
from .base import ApplyContext, MethodConfig, MethodSpec, freeze_all, merge_and_unload
from .baselines import block_params, final_norm_path, norm_params
from .plan import Plan, block_paths, empty_plan


class TopKConfig(MethodConfig):
    name: Literal["top_k"] = "top_k"
    k: int = Field(2, gt=0, le=1024, description="how many of the last blocks train")


def apply_top_k(model: nn.Module, cfg: TopKConfig, ctx: ApplyContext) -> None:
    arch = arch_of(model)
    blocks = model.get_submodule(arch.blocks_path)
    if cfg.k > len(blocks):
        raise ValueError(f"method.k: {cfg.k} exceeds the model's {len(blocks)} blocks")
    freeze_all(model)
    for block in list(blocks)[-cfg.k:]:
        for p in block.parameters():
            p.requires_grad_(True)
    path = final_norm_path(arch)
    if path:
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(True)


def count_top_k(dims, cfg: TopKConfig, task: str) -> int:
    if cfg.k > dims.num_layers:
        raise ValueError(f"method.k: {cfg.k} exceeds the model's {dims.num_layers} blocks")
    first = norm_params(dims) if cfg.k == dims.num_layers and dims.arch.first_attn_norm_identity else 0
    return cfg.k * block_params(dims) - first + (norm_params(dims) if final_norm_path(dims.arch) else 0)


def plan_top_k(dims, cfg: TopKConfig, task: str) -> Plan:
    plan = empty_plan(dims)
    paths = block_paths(dims)
    for lp in plan.layers[max(0, dims.num_layers - int(cfg.k)):]:
        lp.full, lp.norms = set(paths), True
    plan.final_norm = True
    return plan


SPEC = MethodSpec(
    name="top_k", config_cls=TopKConfig, apply=apply_top_k,
    paper="Lee et al. 2019, What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning (arXiv:1911.03090)",
    summary="Trains the last k blocks and the final norm; everything below stays frozen.",
    trains="the last k transformer blocks", mergeable=True, merge=merge_and_unload, count_trainable=count_top_k,
    family="selective", adds_params=False, trains_base_weights=True, plan=plan_top_k,
    default_lr=0.003,   # bench/RESULTS-default-lr.md
)

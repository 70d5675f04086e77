"""S4: a composition found in the PEFT design space.

Chen, Zhang, Shi, Li, Smola & Yang 2023, "Parameter-Efficient Fine-Tuning
Design Spaces", ICLR 2023, arXiv:2301.01821.

The design space: split the layers into 4 consecutive groups by a pattern, give
each group a set of strategies from {Adapter, Prefix, BitFit, LoRA}, each with
its own size. The paper's result (S4): spindle grouping; G1: Adapter + LoRA,
G2: Adapter + Prefix, G3: Adapter + Prefix + BitFit, G4: Prefix + BitFit + LoRA.

Group sizes come from proportions over the layers, rounded by largest remainder:
spindle 1:2:2:1 (24 layers -> 4, 8, 8, 4 as in the paper), uniform 1:1:1:1,
increasing 1:2:3:4, decreasing 4:3:2:1. With fewer than 4 layers some groups are
empty (nothing is added for them).

Each strategy for a group is the same code as the method alone, restricted to
the group's layers:
- Adapter: Houlsby serial bottleneck adapters (engine.methods.bottleneck), after
  attention and FFN by default (`adapter_placement`), layer norms frozen.
- Prefix: prefix tuning (engine.methods.prefix) on the group's layers only;
  groups may use different lengths — every layer gets the longest length of
  cache slots and the slots a layer does not use are masked out for it.
- LoRA: engine.methods.lora.inject_lora on the group's query and value projections.
- BitFit: the bias terms of every linear layer in the group's blocks, plus the
  LayerNorm biases where they exist (BERT). Llama blocks have no biases: there
  we *add* a zero-initialised trainable bias to each of the 7 linear layers
  (q, k, v, o, gate, up, down), which leaves the model unchanged at the start
  and is exactly BitFit's parameterisation for a model that has biases; RMSNorm
  has no bias and gets none.
Not mergeable as a whole (adapters and prefixes cannot be folded into weights).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..arch import arch_of, blocks
from .base import ApplyContext, MethodConfig, MethodSpec, freeze_all
from .bottleneck import add_serial_adapters, bottleneck_params, check_family
from .lora import inject_lora
from .plan import Plan, empty_plan
from .prefix import add_prefix_groups, check_prefix_family, count_prefix_group

Strategy = Literal["adapter", "prefix", "bitfit", "lora"]
PATTERNS = {"spindle": (1, 2, 2, 1), "uniform": (1, 1, 1, 1), "increasing": (1, 2, 3, 4), "decreasing": (4, 3, 2, 1)}
SIZE_FIELDS = {"adapter_size": "adapter", "prefix_tokens": "prefix", "lora_r": "lora", "lora_alpha": "lora"}


class S4Group(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategies: list[Strategy] = Field(..., description="any of adapter, prefix, bitfit, lora")
    adapter_size: int = Field(16, gt=0, le=65536, description="adapter bottleneck width")
    prefix_tokens: int = Field(10, gt=0, le=4096, description="prefix length")
    lora_r: int = Field(8, gt=0, le=4096)
    lora_alpha: float = Field(16.0, gt=0)

    @field_validator("strategies")
    @classmethod
    def _non_empty_unique(cls, v):
        if not v:
            raise ValueError("must name at least one strategy")
        if len(set(v)) != len(v):
            raise ValueError("a strategy is listed twice")
        return v

    @model_validator(mode="after")
    def _sizes_match_strategies(self):
        for field, strategy in SIZE_FIELDS.items():
            if field in self.model_fields_set and strategy not in self.strategies:
                raise ValueError(f"{field} is set but {strategy!r} is not among this group's strategies")
        return self


def paper_groups() -> list[S4Group]:
    return [S4Group(strategies=["adapter", "lora"]), S4Group(strategies=["adapter", "prefix"]),
            S4Group(strategies=["adapter", "prefix", "bitfit"]), S4Group(strategies=["prefix", "bitfit", "lora"])]


class S4Config(MethodConfig):
    name: Literal["s4"] = "s4"
    pattern: Literal["spindle", "uniform", "increasing", "decreasing"] = "spindle"
    groups: list[S4Group] = Field(default_factory=paper_groups, description="exactly 4 groups, first to last layers")
    adapter_placement: Literal["both", "attn", "ffn"] = "both"
    prefix_projection: bool = Field(True, description="MLP reparameterisation of the prefixes during training")

    @field_validator("groups")
    @classmethod
    def _four(cls, v):
        if len(v) != 4:
            raise ValueError(f"must have exactly 4 groups (G1..G4), got {len(v)}")
        return v


def group_sizes(num_layers: int, pattern: str) -> list[int]:
    """Layers per group: proportional to the pattern, rounded by largest remainder."""
    w = PATTERNS[pattern]
    exact = [num_layers * x / sum(w) for x in w]
    sizes = [int(e) for e in exact]
    order = sorted(range(4), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: num_layers - sum(sizes)]:
        sizes[i] += 1
    return sizes


def group_layers(num_layers: int, pattern: str) -> list[list[int]]:
    out, start = [], 0
    for n in group_sizes(num_layers, pattern):
        out.append(list(range(start, start + n)))
        start += n
    return out


# ---- BitFit for a group ------------------------------------------------------------------------

def add_bitfit(model: nn.Module, layers: list[int]) -> None:
    """Train every bias in the given blocks; give bias-less linear layers a zero bias to train."""
    for i in layers:
        for mod in blocks(model)[i].modules():
            if isinstance(mod, nn.Linear):
                if mod.bias is None:
                    w = mod.weight
                    mod.bias = nn.Parameter(torch.zeros(mod.out_features, device=w.device, dtype=w.dtype))
                mod.bias.requires_grad_(True)
            elif isinstance(mod, nn.LayerNorm) and mod.bias is not None:
                mod.bias.requires_grad_(True)


def bitfit_params_per_block(dims) -> int:
    n = sum(l.out_features for l in dims.block_linears())
    if dims.norm == "layernorm":
        n += 2 * dims.hidden_size
    return n


def lora_module_names(model: nn.Module, layers: list[int]) -> list[str]:
    arch = arch_of(model)
    return [f"{arch.blocks_path}.{i}.{p}" for i in layers for p in dict.fromkeys((arch.q, arch.v))]


def lora_params_per_block(dims, r: int) -> int:
    by_path = {l.path: l for l in dims.block_linears()}
    arch = dims.arch
    return sum(r * (by_path[p].in_features + by_path[p].out_features) for p in dict.fromkeys((arch.q, arch.v)))


# ---- apply and count ---------------------------------------------------------------------------

def apply_s4(model: nn.Module, cfg: S4Config, ctx: ApplyContext) -> None:
    check_family(model, "s4", parallel=False)
    freeze_all(model)
    torch.manual_seed(ctx.seed)
    per_group = group_layers(model.config.num_hidden_layers, cfg.pattern)
    prefix_groups = []
    for g, layers in zip(cfg.groups, per_group):
        if not layers:
            continue
        if "bitfit" in g.strategies:
            add_bitfit(model, layers)
        if "lora" in g.strategies:
            inject_lora(model, lora_module_names(model, layers), g.lora_r, g.lora_alpha)
        if "adapter" in g.strategies:
            add_serial_adapters(model, g.adapter_size, "relu", layers, cfg.adapter_placement, 1e-2, False)
        if "prefix" in g.strategies:
            prefix_groups.append((layers, g.prefix_tokens))
    if prefix_groups:
        check_prefix_family(model, "s4")
        add_prefix_groups(model, prefix_groups, cfg.prefix_projection, None)


def count_s4(dims, cfg: S4Config, task: str) -> int:
    total = 0
    sites = 2 if cfg.adapter_placement == "both" else 1
    for g, layers in zip(cfg.groups, group_layers(dims.num_layers, cfg.pattern)):
        n = len(layers)
        if not n:
            continue
        if "bitfit" in g.strategies:
            total += n * bitfit_params_per_block(dims)
        if "lora" in g.strategies:
            total += n * lora_params_per_block(dims, g.lora_r)
        if "adapter" in g.strategies:
            total += n * sites * bottleneck_params(dims.hidden_size, g.adapter_size)
        if "prefix" in g.strategies:
            total += count_prefix_group(dims, n, g.prefix_tokens, cfg.prefix_projection, None)
    return total


def plan_s4(dims, cfg: S4Config, task: str) -> Plan:
    """Per layer group: serial adapters, prefix, BitFit, LoRA on the query and value
    projections. Every layer gets the longest prefix's slots (masked where its group has none)."""
    plan = empty_plan(dims)
    groups = cfg.groups
    sites = ["attn", "ffn"] if cfg.adapter_placement == "both" else [cfg.adapter_placement]
    qv = list(dict.fromkeys(p for p in (dims.arch.q, dims.arch.v)))     # one path when q/k/v are fused
    n_max = max([g.prefix_tokens for g in groups if "prefix" in g.strategies] or [0])
    for g, idx in zip(groups, group_layers(dims.num_layers, cfg.pattern)):
        for i in idx:
            lp = plan.layers[i]
            if "adapter" in g.strategies:
                lp.adapters = [("serial", site, g.adapter_size) for site in sites]
            if "prefix" in g.strategies:
                lp.prefix = n_max
            if "lora" in g.strategies:
                lp.lora = {p: (g.lora_r, 0.0) for p in qv}
            if "bitfit" in g.strategies:
                lp.bias = True
    if n_max:
        for lp in plan.layers:
            lp.prefix = lp.prefix or n_max
    return plan


SPEC = MethodSpec(
    name="s4", config_cls=S4Config, apply=apply_s4,
    paper="Chen et al. 2023, Parameter-Efficient Fine-Tuning Design Spaces (arXiv:2301.01821)",
    summary="Layers in 4 groups (spindle by default), each with its own mix of Adapter, Prefix, BitFit and LoRA.",
    trains="per group: adapters, prefixes, LoRA on query/value, biases (added zero biases on Llama)",
    count_trainable=count_s4, family="adapter", plan=plan_s4,
    default_lr=0.001,   # bench/RESULTS-default-lr.md
)

"""LN tuning: train only the normalization layers.

Zhao, Gu, Gan, Wang, Xu, "Tuning LayerNorm in Attention: Towards Efficient
Multi-Modal LLM Finetuning", ICLR 2024, arXiv:2312.11420.

The weights (and biases, for LayerNorm) of every LayerNorm / RMSNorm in the model
become trainable; nothing is added, so "merging" changes nothing.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from .base import ApplyContext, MethodConfig, MethodSpec, freeze_all, merge_and_unload
from .baselines import block_norm_params, norm_modules, norm_params
from .plan import Plan, empty_plan


class LnTuningConfig(MethodConfig):
    name: Literal["ln_tuning"] = "ln_tuning"


def apply_ln_tuning(model: nn.Module, cfg: LnTuningConfig, ctx: ApplyContext) -> None:
    freeze_all(model)
    mods = norm_modules(model)
    if not mods:
        raise ValueError("method.name: ln_tuning found no normalization layers in this model")
    for _, m in mods:
        for p in m.parameters():
            p.requires_grad_(True)


def count_ln_tuning(dims, cfg, task: str) -> int:
    """Every block norm (q/k norms included), the final norm, the embeddings' norm and
    a norm after the pooler (ModernBERT's head), as the architecture has them."""
    arch = dims.arch
    extra = sum(1 for p in (arch.final_norm, arch.embed_norm) if p) + (1 if dims.relative_norm else 0)
    extra += 1 if arch.pooler_norm and task == "classification" else 0
    return block_norm_params(dims) + extra * norm_params(dims)


def plan_ln_tuning(dims, cfg, task: str) -> Plan:
    plan = empty_plan(dims)
    for lp in plan.layers:
        lp.norms = True
    plan.final_norm = True
    plan.input_grad = dims.arch.embed_norm is not None    # the embeddings' norm trains too
    return plan


SPEC = MethodSpec(
    name="ln_tuning", config_cls=LnTuningConfig, apply=apply_ln_tuning,
    paper="Zhao et al. 2024, Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning "
          "(arXiv:2312.11420)",
    summary="Trains only the normalization layers.",
    trains="LayerNorm / RMSNorm weights and biases", mergeable=True, merge=merge_and_unload,
    count_trainable=count_ln_tuning, family="selective", adds_params=False, plan=plan_ln_tuning,
    default_lr=0.01,   # bench/RESULTS-default-lr.md
)

"""Full fine-tuning: every weight trains. The reference point for quality and cost
(e.g. Devlin et al. 2019, BERT, arXiv:1810.04805). `trains_head=False` because
the head trains anyway; nothing is added, so "merging" changes nothing."""

from __future__ import annotations

from typing import Literal

from torch import nn

from .base import ApplyContext, MethodConfig, MethodSpec, merge_and_unload
from .baselines import total_params
from .plan import Plan, block_paths, empty_plan


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


def apply_full(model: nn.Module, cfg: FullConfig, ctx: ApplyContext) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def count_full(dims, cfg, task: str) -> int:
    return total_params(dims, task)


def plan_full(dims, cfg, task: str) -> Plan:
    plan = empty_plan(dims)
    paths = block_paths(dims)
    for lp in plan.layers:
        lp.full, lp.norms = set(paths), True
    plan.embeddings = plan.final_norm = plan.lm_head = plan.pooler = True
    return plan


SPEC = MethodSpec(
    name="full", config_cls=FullConfig, apply=apply_full,
    paper="Full fine-tuning (baseline; e.g. Devlin et al. 2019, BERT, arXiv:1810.04805)",
    summary="Trains every weight: the reference point for quality and cost.",
    trains="every parameter", mergeable=True, merge=merge_and_unload, trains_head=False, count_trainable=count_full,
    family="selective", adds_params=False, trains_base_weights=True, plan=plan_full,
    default_lr=0.0003,   # bench/RESULTS-default-lr.md
)

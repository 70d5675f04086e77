"""BitFit: train only the bias terms.

Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022, arXiv:2106.10199.

Every bias of the model except the heads' (the classification head trains anyway)
becomes trainable. Llama-family models have no biases: we refuse with a clear
error rather than invent zero-initialised ones (that would change the
architecture and its saved form). Nothing is added, so "merging" changes nothing.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..arch import arch_of
from .base import ApplyContext, MethodConfig, MethodSpec, freeze_all, merge_and_unload
from .baselines import final_norm_path, is_head_param, norms_per_block
from .plan import Plan, empty_plan


class BitFitConfig(MethodConfig):
    name: Literal["bitfit"] = "bitfit"


def apply_bitfit(model: nn.Module, cfg: BitFitConfig, ctx: ApplyContext) -> None:
    freeze_all(model)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and not is_head_param(model, n)]
    if not biases:
        raise ValueError(f"method.name: bitfit trains bias terms, and this {arch_of(model).family} model has none "
                         f"(Llama-family models have no biases); choose ln_tuning, lora or another method")
    for p in biases:
        p.requires_grad_(True)


def count_bitfit(dims, cfg, task: str) -> int:
    if dims.family == "llama" and not (dims.attention_bias or dims.mlp_bias):
        return 0
    n = sum(l.out_features for l in dims.block_linears() if l.bias) * dims.num_layers
    if dims.norm == "layernorm":
        n_norms = dims.num_layers * norms_per_block(dims) + (1 if final_norm_path(dims.family) else 0)
        n_norms += 1 if dims.family == "bert" else 0          # embeddings LayerNorm
        n += n_norms * dims.hidden_size
    if dims.family == "bert":
        n += dims.hidden_size                                 # pooler bias
    return n


def plan_bitfit(dims, cfg, task: str) -> Plan:
    """Bias gradients need no saved input, but the gradient flows from the first bias on."""
    plan = empty_plan(dims)
    for lp in plan.layers:
        lp.bias = True
    plan.input_grad = dims.family == "bert"          # the embedding LayerNorm's bias trains
    return plan


SPEC = MethodSpec(
    name="bitfit", config_cls=BitFitConfig, apply=apply_bitfit,
    paper="Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked "
          "Language-models (arXiv:2106.10199)",
    summary="Trains only the bias terms (models without biases, like Llama, are refused).",
    trains="bias vectors", mergeable=True, merge=merge_and_unload, count_trainable=count_bitfit,
    family="selective", adds_params=False, plan=plan_bitfit,
)

"""BitFit: train only the bias terms.

Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022, arXiv:2106.10199.

Every bias of the model except the heads' (the classification head trains anyway)
becomes trainable. A model with no biases at all (Llama) gets zero-initialised bias
vectors on every linear layer of its blocks, and only those train: bias *addition*,
as in LLaMA-Adapter V2's bias tuning (Gao et al. 2023, arXiv:2304.15010). They start
at zero, so training starts at the base model; they are the linears' own `.bias`,
so they save and load by name, and the merged export keeps them as the model's
biases (the config's `attention_bias` / `mlp_bias` turned on so transformers loads them).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

import torch
from ..arch import arch_of, blocks
from .base import ApplyContext, MethodConfig, MethodSpec, freeze_all, merge_and_unload
from .baselines import final_norm_path, is_head_param, norms_per_block
from .plan import Plan, empty_plan


class BitFitConfig(MethodConfig):
    name: Literal["bitfit"] = "bitfit"


# the config flag that makes transformers build (and load) the biases of each block part
BIAS_FLAGS = (("attn_path", "attention_bias"), ("ffn_path", "mlp_bias"))


def add_block_biases(model: nn.Module) -> list[nn.Parameter]:
    """Zero bias vectors on every bias-free nn.Linear of every block."""
    arch = arch_of(model)
    missing = [flag for _, flag in BIAS_FLAGS if not hasattr(model.config, flag)]
    if missing:
        raise ValueError(f"method.name: bitfit would add biases to this bias-free {arch.family} model, but its "
                         f"config has no {missing[0]!r} flag to keep them in a merged export; choose ln_tuning, "
                         f"lora or another method")
    added = []
    for block in blocks(model):
        for m in block.modules():
            if isinstance(m, nn.Linear) and m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype))
                added.append(m.bias)
    return added


def apply_bitfit(model: nn.Module, cfg: BitFitConfig, ctx: ApplyContext) -> None:
    freeze_all(model)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and not is_head_param(model, n)]
    if not biases:
        biases = add_block_biases(model)
    for p in biases:
        p.requires_grad_(True)


def merge_bitfit(model: nn.Module) -> None:
    """Nothing to fold; biases added to a bias-free model are declared in its config
    so that the saved model loads them."""
    merge_and_unload(model)
    arch = arch_of(model)
    for path_attr, flag in BIAS_FLAGS:
        if not hasattr(model.config, flag) or getattr(model.config, flag):
            continue
        part = getattr(arch, path_attr)
        if any(m.bias is not None for b in blocks(model) for m in b.get_submodule(part).modules()
               if isinstance(m, nn.Linear)):
            setattr(model.config, flag, True)


def count_bitfit(dims, cfg, task: str) -> int:
    linears, arch = dims.block_linears(), dims.arch
    norm_biased = dims.norm == "layernorm" and arch.norm_bias
    if not any(l.bias for l in linears) and not norm_biased:   # bias-free: one added per output
        return sum(l.out_features for l in linears) * dims.num_layers
    n = sum(l.out_features for l in linears if l.bias) * dims.num_layers
    if norm_biased:
        n_norms = dims.num_layers * norms_per_block(dims) + sum(1 for p in (arch.final_norm, arch.embed_norm) if p)
        n_norms += 1 if dims.relative_norm else 0
        n += n_norms * dims.hidden_size
    if arch.pooler and arch.pooler_bias:
        n += dims.pooler_hidden_size or dims.hidden_size      # pooler bias
    return n


def plan_bitfit(dims, cfg, task: str) -> Plan:
    """Bias gradients need no saved input, but the gradient flows from the first bias on."""
    plan = empty_plan(dims)
    for lp in plan.layers:
        lp.bias = True
    plan.input_grad = dims.arch.embed_norm is not None and dims.arch.norm_bias   # the embedding norm's bias trains
    return plan


SPEC = MethodSpec(
    name="bitfit", config_cls=BitFitConfig, apply=apply_bitfit,
    paper="Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked "
          "Language-models (arXiv:2106.10199)",
    summary="Trains only the bias terms; on bias-free models (Llama) adds zero-initialised biases to every "
            "block linear and trains those.",
    trains="bias vectors (added ones on bias-free models)", mergeable=True, merge=merge_bitfit,
    count_trainable=count_bitfit,
    family="selective", adds_params=False, plan=plan_bitfit,
    default_lr=0.01,   # bench/RESULTS-default-lr.md
)

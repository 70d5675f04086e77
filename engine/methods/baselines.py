"""Baselines that train a subset of the model's own weights.

- `bitfit`: bias terms only. Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple
  Parameter-efficient Fine-tuning for Transformer-based Masked Language-models",
  ACL 2022, arXiv:2106.10199. Llama-family models have no biases: we raise a
  clear error rather than invent zero-initialised biases (that would change the
  architecture and its saved form).
- `ln_tuning`: normalization layers only (LayerNorm / RMSNorm weights and biases).
  Zhao, Gu, Gan, Wang, Xu, "Tuning LayerNorm in Attention: Towards Efficient
  Multi-Modal LLM Finetuning", ICLR 2024, arXiv:2312.11420.
- `full`: every weight (the reference point; `trains_head=False` because the
  head trains anyway).
- `top_k`: the last k transformer blocks plus the final norm (if the model has one).
  Lee, Tang, Lin, "What Would Elsa Do? Freezing Layers During Transformer
  Fine-Tuning", 2019, arXiv:1911.03090.

All of them are trivially "mergeable": the trained weights are the model's own.
Their exact trainable counts are computed from the config (`ModelDims`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..arch import arch_of
from .base import ApplyContext, MethodConfig, freeze_all


class BitFitConfig(MethodConfig):
    name: Literal["bitfit"] = "bitfit"


class LnTuningConfig(MethodConfig):
    name: Literal["ln_tuning"] = "ln_tuning"


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


class TopKConfig(MethodConfig):
    name: Literal["top_k"] = "top_k"
    k: int = Field(2, gt=0, le=1024, description="how many of the last blocks train")


# ---- which parameters ----------------------------------------------------------------------------

def is_head_param(model: nn.Module, name: str) -> bool:
    return name.split(".")[0] in arch_of(model).head_names


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    types = set(arch_of(model).norm_types)
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in types]


def final_norm_path(family: str) -> str | None:
    return {"llama": "model.norm", "gpt2": "transformer.ln_f"}.get(family)


def apply_bitfit(model: nn.Module, cfg: BitFitConfig, ctx: ApplyContext) -> None:
    freeze_all(model)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and not is_head_param(model, n)]
    if not biases:
        raise ValueError(f"method.name: bitfit trains bias terms, and this {arch_of(model).family} model has none "
                         f"(Llama-family models have no biases); choose ln_tuning, lora or another method")
    for p in biases:
        p.requires_grad_(True)


def apply_ln_tuning(model: nn.Module, cfg: LnTuningConfig, ctx: ApplyContext) -> None:
    freeze_all(model)
    mods = norm_modules(model)
    if not mods:
        raise ValueError("method.name: ln_tuning found no normalization layers in this model")
    for _, m in mods:
        for p in m.parameters():
            p.requires_grad_(True)


def apply_full(model: nn.Module, cfg: FullConfig, ctx: ApplyContext) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def apply_top_k(model: nn.Module, cfg: TopKConfig, ctx: ApplyContext) -> None:
    arch = arch_of(model)
    blocks = model.get_submodule(arch.blocks_path)
    if cfg.k > len(blocks):
        raise ValueError(f"method.k: {cfg.k} exceeds the model's {len(blocks)} blocks")
    freeze_all(model)
    for block in list(blocks)[-cfg.k:]:
        for p in block.parameters():
            p.requires_grad_(True)
    path = final_norm_path(arch.family)
    if path:
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(True)


def no_merge(model: nn.Module) -> None:
    """The trained weights already are the model's weights."""


# ---- exact counts from the config ----------------------------------------------------------------

def norm_params(dims) -> int:
    """Parameters of one normalization layer."""
    return dims.hidden_size * (2 if dims.norm == "layernorm" else 1)


def norms_per_block(dims) -> int:
    return 2


def block_params(dims) -> int:
    lin = sum(l.in_features * l.out_features + (l.out_features if l.bias else 0) for l in dims.block_linears())
    return lin + norms_per_block(dims) * norm_params(dims)


def embedding_params(dims) -> int:
    h = dims.hidden_size
    if dims.family == "llama":
        return dims.vocab_size * h
    if dims.family == "gpt2":
        return (dims.vocab_size + dims.max_position_embeddings) * h
    return (dims.vocab_size + dims.max_position_embeddings + dims.type_vocab_size) * h + norm_params(dims)


def head_params(dims, task: str) -> int:
    """Parameters outside the backbone: BERT's pooler, the classifier (num_labels
    from dims if it has them, else 2) or an untied LM head."""
    h = dims.hidden_size
    n_labels = getattr(dims, "num_labels", None) or 2
    if task == "classification":
        if dims.family == "bert":
            return h * h + h + h * n_labels + n_labels
        return h * n_labels
    if dims.family == "bert":
        return h * h + h
    return 0 if dims.tie_word_embeddings else dims.vocab_size * h


def total_params(dims, task: str) -> int:
    final = norm_params(dims) if final_norm_path(dims.family) else 0
    return embedding_params(dims) + dims.num_layers * block_params(dims) + final + head_params(dims, task)


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


def count_ln_tuning(dims, cfg, task: str) -> int:
    n_norms = dims.num_layers * norms_per_block(dims) + (1 if final_norm_path(dims.family) else 0)
    n_norms += 1 if dims.family == "bert" else 0
    return n_norms * norm_params(dims)


def count_full(dims, cfg, task: str) -> int:
    return total_params(dims, task)


def count_top_k(dims, cfg: TopKConfig, task: str) -> int:
    if cfg.k > dims.num_layers:
        raise ValueError(f"method.k: {cfg.k} exceeds the model's {dims.num_layers} blocks")
    return cfg.k * block_params(dims) + (norm_params(dims) if final_norm_path(dims.family) else 0)

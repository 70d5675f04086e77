"""What the selective methods (bitfit, ln_tuning, full, top_k: each in its own
module) share: which of a model's own parameters are heads or norms, and exact
parameter counts of a model's parts from its config (`ModelDims`)."""

from __future__ import annotations

from torch import nn

from ..arch import arch_of


# ---- which parameters ----------------------------------------------------------------------------

def is_head_param(model: nn.Module, name: str) -> bool:
    return name.split(".")[0] in arch_of(model).head_names


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    types = set(arch_of(model).norm_types)
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in types]


def final_norm_path(family: str) -> str | None:
    return {"llama": "model.norm", "gpt2": "transformer.ln_f"}.get(family)


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

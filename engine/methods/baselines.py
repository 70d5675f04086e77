"""What the selective methods (bitfit, ln_tuning, full, top_k: each in its own
module) share: which of a model's own parameters are heads or norms, and exact
parameter counts of a model's parts from its config (`ModelDims`)."""

from __future__ import annotations

from torch import nn

from .. import param_counts
from ..arch import arch_of


# ---- which parameters ----------------------------------------------------------------------------

def is_head_param(model: nn.Module, name: str) -> bool:
    return name.split(".")[0] in arch_of(model).head_names


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    types = set(arch_of(model).norm_types)
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__ in types or type(m).__name__.endswith("RMSNorm") or isinstance(m, nn.LayerNorm)]


def final_norm_path(arch) -> str | None:
    """The model-level final norm of an architecture (None: it has none)."""
    return arch.final_norm


# ---- exact counts from the config ----------------------------------------------------------------

def norm_params(dims) -> int:
    """Parameters of one (hidden-size) normalization layer."""
    return param_counts.norm_params(dims)


def norms_per_block(dims) -> int:
    """Hidden-size norms per block (the q/k norms of Qwen3 / Gemma 3 / OLMo 2 are not among them)."""
    return len(dims.arch.block_norms())


def block_norm_params(dims) -> int:
    """Parameters of every block norm of the model (q/k norms included)."""
    return param_counts.all_blocks_params(dims) - dims.num_layers * (
        param_counts.block_params(dims) - dims.block_norm_params())


def block_params(dims) -> int:
    return param_counts.block_params(dims)


def total_params(dims, task: str) -> int:
    return param_counts.total_params(dims, task, getattr(dims, "num_labels", None) or 2)

"""Exact parameter counts from a model config: what the transformers model for a
task would hold, and what a method trains (asked of the method's spec)."""

from __future__ import annotations

from typing import Optional

from .. import param_counts
from ..dims import ModelDims
from ..param_counts import block_params, linear_params, norm_params  # noqa: F401  (re-exported)
from .catalog import default_task, model_dims


def block_linear_weights(dims: ModelDims) -> int:
    """Weights (no biases) of one block's linears: what NF4 quantizes in a block."""
    return sum(s.in_features * s.out_features for s in dims.block_linears())


def frozen_linear_params(dims: ModelDims) -> int:
    """Weights of every block linear: what NF4 quantizes (embeddings, norms, heads stay in 16/32 bit)."""
    return dims.num_layers * block_linear_weights(dims)


def head_params(cfg: dict, dims: ModelDims, task: str, num_labels: int) -> int:
    """The task head that a prepared run trains (classifier / score); 0 for causal LM."""
    return param_counts.head_params(dims, task, num_labels)


def count_total_params(cfg: dict, task: Optional[str] = None, num_labels: int = 2) -> int:
    """Exact parameter count of the transformers model for `task`
    (AutoModelForSequenceClassification / AutoModelForCausalLM), tied weights once."""
    dims = model_dims(cfg)
    return param_counts.total_params(dims, task or default_task(dims), num_labels)


def count_trainable(spec, method_cfg, dims: ModelDims, cfg: dict, task: str, num_labels: int) -> int:
    """spec.count_trainable(dims, cfg, task), plus the classification head when the
    method leaves it trainable. Raises NotImplementedError for a method without
    an exact count (never a guess)."""
    if spec.count_trainable is None:
        raise NotImplementedError(
            f"method {spec.name!r} has no count_trainable yet, so the estimator cannot give an exact "
            f"trainable-parameter count for it (engine/methods must implement MethodSpec.count_trainable)")
    n = int(spec.count_trainable(dims, method_cfg, task))
    if task == "classification" and spec.trains_head:
        n += head_params(cfg, dims, task, num_labels)
    return n


def added_params(spec, n_tr: int, head: int) -> int:
    """Parameters a method adds to the model (adapters, prompts, LoRA matrices):
    its trainable count minus the (existing) classification head; 0 for methods
    that train parameters the model already has."""
    return max(0, n_tr - head) if spec.adds_params else 0
